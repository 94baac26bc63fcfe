//! The byte format of one audit line: encoding (writer), and checking a line from disk (verify, recovery).

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

/// `prev` of the very first record: hex SHA-256 of the empty string.
pub const GENESIS_PREV: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

/// Keys the writer sets; a record's own fields may not use them.
pub const RESERVED: [&str; 6] = ["seq", "ts", "host", "event", "prev", "hash"];

/// Length of the tail `,"hash":"<64 hex>"}` every line ends with.
const HASH_TAIL_LEN: usize = 9 + 64 + 2;

/// Hex SHA-256 of bytes.
pub fn sha256_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    // Not `hex::encode`, whose char iterator costs more per record than the JSON around it.
    let mut s = String::with_capacity(64);
    for b in Sha256::digest(bytes) {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 15)]));
    }
    s
}

/// Encodes one record as its line (without the trailing newline) and returns `(line, hash)`.
///
/// The line is exactly `serde_json`'s compact serialisation of an object whose keys are, in order,
/// `seq`, `ts`, `host`, `event`, the record's own fields, `prev`, `hash`.
pub fn encode(
    seq: u64,
    ts: &str,
    host: &str,
    event: &str,
    fields: &Map<String, Value>,
    prev: &str,
) -> Result<(Vec<u8>, String), serde_json::Error> {
    encode_with(seq, ts, host, event, b"", fields, prev)
}

/// Serialises fields as [`encode`] writes a record's own fields: `,"key":value` for each, in order.
pub fn encode_fields(out: &mut Vec<u8>, fields: &Map<String, Value>) -> Result<(), serde_json::Error> {
    for (key, value) in fields {
        out.push(b',');
        serde_json::to_writer(&mut *out, key)?;
        out.push(b':');
        serde_json::to_writer(&mut *out, &canonical_value(value))?;
    }
    Ok(())
}

/// [`encode`] with fields serialised beforehand by [`encode_fields`] (`shared`, none of whose keys is in
/// `fields`), written before `fields`: the same line as [`encode`] of all the fields in that order.
pub fn encode_with(
    seq: u64,
    ts: &str,
    host: &str,
    event: &str,
    shared: &[u8],
    fields: &Map<String, Value>,
    prev: &str,
) -> Result<(Vec<u8>, String), serde_json::Error> {
    let mut line = Vec::with_capacity(256 + shared.len() + 32 * fields.len());
    line.extend_from_slice(b"{\"seq\":");
    {
        use std::io::Write as _;
        let _ = write!(line, "{seq}");
    }
    line.extend_from_slice(b",\"ts\":");
    serde_json::to_writer(&mut line, ts)?;
    line.extend_from_slice(b",\"host\":");
    serde_json::to_writer(&mut line, host)?;
    line.extend_from_slice(b",\"event\":");
    serde_json::to_writer(&mut line, event)?;
    line.extend_from_slice(shared);
    encode_fields(&mut line, fields)?;
    line.extend_from_slice(b",\"prev\":\"");
    line.extend_from_slice(prev.as_bytes());
    line.extend_from_slice(b"\"}");
    let hash = sha256_hex(&line);
    line.pop();
    line.extend_from_slice(b",\"hash\":\"");
    line.extend_from_slice(hash.as_bytes());
    line.extend_from_slice(b"\"}");
    Ok((line, hash))
}

/// Writes values as [`encode_fields`] does, straight from their `Serialize` (for raw records): a float is
/// written as `serde_json::to_value` and [`canonical_value`] would have it (an `f32` widened to `f64`;
/// one whose text does not parse back to itself as a string), everything else compactly.
pub struct RawFormatter;

impl serde_json::ser::Formatter for RawFormatter {
    fn write_f32<W: ?Sized + std::io::Write>(&mut self, writer: &mut W, value: f32) -> std::io::Result<()> {
        self.write_f64(writer, f64::from(value))
    }

    fn write_f64<W: ?Sized + std::io::Write>(&mut self, writer: &mut W, value: f64) -> std::io::Result<()> {
        let Some(n) = serde_json::Number::from_f64(value) else { return writer.write_all(b"null") };
        let number = Value::Number(n);
        match canonical_value(&number) {
            std::borrow::Cow::Borrowed(v) => serde_json::to_writer(writer, v),
            std::borrow::Cow::Owned(v) => serde_json::to_writer(writer, &v),
        }
        .map_err(std::io::Error::other)
    }
}

/// A value whose serialisation parses back to the same bytes: a float that would not survive a round trip
/// through the parser is written as a string instead, so every line the writer produces is canonical.
fn canonical_value(value: &Value) -> std::borrow::Cow<'_, Value> {
    use std::borrow::Cow;
    match value {
        Value::Number(n) if n.is_f64() => {
            let text = n.to_string();
            match serde_json::from_str::<Value>(&text) {
                Ok(Value::Number(back)) if back.to_string() == text => Cow::Borrowed(value),
                _ => Cow::Owned(Value::String(text)),
            }
        }
        Value::Array(items) => {
            let mapped: Vec<_> = items.iter().map(canonical_value).collect();
            if mapped.iter().all(|v| matches!(v, Cow::Borrowed(_))) {
                Cow::Borrowed(value)
            } else {
                Cow::Owned(Value::Array(mapped.into_iter().map(Cow::into_owned).collect()))
            }
        }
        Value::Object(map) => {
            let mapped: Vec<_> = map.iter().map(|(k, v)| (k, canonical_value(v))).collect();
            if mapped.iter().all(|(_, v)| matches!(v, Cow::Borrowed(_))) {
                Cow::Borrowed(value)
            } else {
                Cow::Owned(Value::Object(
                    mapped.into_iter().map(|(k, v)| (k.clone(), v.into_owned())).collect(),
                ))
            }
        }
        _ => Cow::Borrowed(value),
    }
}

/// A line read back from disk that passed [`check_line`].
#[derive(Debug, Clone)]
pub struct Line {
    pub seq: u64,
    pub ts: String,
    pub host: String,
    pub event: String,
    pub prev: String,
    pub hash: String,
    /// The whole object, in file order.
    pub object: Map<String, Value>,
}

impl Line {
    pub fn str_field(&self, key: &str) -> Option<&str> {
        self.object.get(key).and_then(Value::as_str)
    }

    pub fn u64_field(&self, key: &str) -> Option<u64> {
        self.object.get(key).and_then(Value::as_u64)
    }
}

/// What is wrong with one line, on its own (chain links are checked by the caller).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LineError {
    #[error("not a JSON object: {0}")]
    NotJson(String),
    #[error(
        "not in canonical form (re-serialising the parsed object gives other bytes: a repeated key, whitespace or a changed escape)"
    )]
    NotCanonical,
    #[error("keys out of order: expected {expected} at position {position}, found {found}")]
    KeyOrder { position: usize, expected: &'static str, found: String },
    #[error("field {field} is missing or has the wrong type")]
    BadField { field: &'static str },
    #[error("hash mismatch: the line records {recorded} but its bytes hash to {computed}")]
    HashMismatch { recorded: String, computed: String },
}

/// Checks one line (without its newline) from the bytes: canonical JSON, key order, field types, and that
/// `hash` is the SHA-256 of the line with `,"hash":"…"` removed.
pub fn check_line(bytes: &[u8]) -> Result<Line, LineError> {
    let object: Map<String, Value> =
        serde_json::from_slice(bytes).map_err(|e| LineError::NotJson(e.to_string()))?;
    let reserialised = serde_json::to_vec(&object).map_err(|e| LineError::NotJson(e.to_string()))?;
    if reserialised != bytes {
        return Err(LineError::NotCanonical);
    }
    let keys: Vec<&String> = object.keys().collect();
    let len = keys.len();
    let expect = |position: usize, expected: &'static str| -> Result<(), LineError> {
        match keys.get(position) {
            Some(k) if k.as_str() == expected => Ok(()),
            Some(k) => Err(LineError::KeyOrder { position, expected, found: (*k).clone() }),
            None => Err(LineError::KeyOrder { position, expected, found: "nothing".into() }),
        }
    };
    if len < 6 {
        return Err(LineError::KeyOrder {
            position: len,
            expected: RESERVED.get(len).copied().unwrap_or("hash"),
            found: "end of object".into(),
        });
    }
    for (i, key) in ["seq", "ts", "host", "event"].into_iter().enumerate() {
        expect(i, key)?;
    }
    expect(len - 2, "prev")?;
    expect(len - 1, "hash")?;
    for key in &keys[4..len - 2] {
        if RESERVED.contains(&key.as_str()) {
            return Err(LineError::KeyOrder {
                position: 4,
                expected: "a record field",
                found: (*key).clone(),
            });
        }
    }
    let seq = object.get("seq").and_then(Value::as_u64).ok_or(LineError::BadField { field: "seq" })?;
    let text = |field: &'static str| -> Result<String, LineError> {
        object.get(field).and_then(Value::as_str).map(str::to_owned).ok_or(LineError::BadField { field })
    };
    let ts = text("ts")?;
    let host = text("host")?;
    let event = text("event")?;
    let prev = text("prev")?;
    let hash = text("hash")?;
    if !is_hex64(&prev) {
        return Err(LineError::BadField { field: "prev" });
    }
    if !is_hex64(&hash) || bytes.len() < HASH_TAIL_LEN {
        return Err(LineError::BadField { field: "hash" });
    }
    // Canonical form and `hash` last with 64 hex digits mean the line ends in exactly `,"hash":"<hex>"}`.
    let mut unhashed = bytes[..bytes.len() - HASH_TAIL_LEN].to_vec();
    unhashed.push(b'}');
    let computed = sha256_hex(&unhashed);
    if computed != hash {
        return Err(LineError::HashMismatch { recorded: hash, computed });
    }
    Ok(Line { seq, ts, host, event, prev, hash, object })
}

pub fn is_hex64(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Reads `seq` from the start of a line without parsing it all (`{"seq":N,`); for seeking, never for trust.
pub fn peek_seq(line: &[u8]) -> Option<u64> {
    let rest = line.strip_prefix(b"{\"seq\":")?;
    let end = rest.iter().position(|b| !b.is_ascii_digit())?;
    std::str::from_utf8(&rest[..end]).ok()?.parse().ok()
}

/// Reads `ts` from a line (`{"seq":N,"ts":"…"`); for seeking, never for trust.
pub fn peek_ts(line: &[u8]) -> Option<&str> {
    let start = line.windows(6).position(|w| w == b",\"ts\":")? + 7;
    let len = line.get(start..)?.iter().position(|&b| b == b'"')?;
    std::str::from_utf8(&line[start..start + len]).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields() -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("session".into(), Value::from("s-1"));
        m.insert("text".into(), Value::from("select \"x\"\n from t -- é"));
        m.insert("rows".into(), Value::from(3));
        m.insert("duration_s".into(), Value::from(0.125));
        m
    }

    #[test]
    fn encoded_line_checks_and_hash_covers_the_line_without_hash() {
        let (line, hash) =
            encode(7, "2026-11-23T08:00:00.000000001Z", "h1", "pg.query", &fields(), GENESIS_PREV).unwrap();
        let text = String::from_utf8(line.clone()).unwrap();
        assert!(text.starts_with(
            r#"{"seq":7,"ts":"2026-11-23T08:00:00.000000001Z","host":"h1","event":"pg.query","session":"s-1""#
        ));
        assert!(text.ends_with(&format!(r#","prev":"{GENESIS_PREV}","hash":"{hash}"}}"#)));
        let without = text.replace(&format!(r#","hash":"{hash}""#), "");
        assert_eq!(sha256_hex(without.as_bytes()), hash);
        let parsed = check_line(&line).unwrap();
        assert_eq!((parsed.seq, parsed.hash.as_str(), parsed.event.as_str()), (7, hash.as_str(), "pg.query"));
        assert_eq!(peek_seq(&line), Some(7));
        assert_eq!(peek_ts(&line), Some("2026-11-23T08:00:00.000000001Z"));
    }

    /// The line a record encodes to (as the writer would, at seq 3).
    fn encoded(mut r: crate::audit::Record) -> Vec<u8> {
        let (event, json, own) = r.parts();
        encode_with(3, "t", "h", event, json, own, GENESIS_PREV).unwrap().0
    }

    /// A record made from shared fields is the same line as one holding them all, and a key added again
    /// replaces the shared field in place (never a repeated key).
    #[test]
    fn shared_fields_make_the_same_line() {
        use crate::audit::{Record, SharedFields};
        let shared = SharedFields::new(fields()).unwrap();
        let line = encoded;
        let mut all = Record::new("pg.query");
        all.fields = fields();
        let all = all.field("n", 1);
        assert_eq!(line(Record::with_shared("pg.query", shared.clone()).field("n", 1)), line(all.clone()));
        let replaced = line(Record::with_shared("pg.query", shared.clone()).field("n", 1).field("rows", 9));
        assert_eq!(replaced, line(all.field("rows", 9)));
        assert!(check_line(&replaced).is_ok());
        let mut reserved = Map::new();
        reserved.insert("seq".into(), Value::from(1));
        assert!(SharedFields::new(reserved).is_err());
    }

    /// A record built raw (fields written as added) is byte for byte the line the map would give, for
    /// every kind of value a handler records, floats that do and do not survive a round trip included;
    /// a repeated, shared or reserved key turns it back into the map's behaviour.
    #[test]
    fn raw_fields_make_the_same_line() {
        use crate::audit::{Record, SharedFields};
        let shared = SharedFields::new(fields()).unwrap();
        let line = encoded;
        let map = || {
            let mut all = Record::new("pg.result");
            all.fields = fields();
            all
        };
        let add = |r: Record| {
            r.field("n", 7u64)
                .field("protocol", "simple")
                .field("text", "SELECT \"a\"\n\t'é' \\ \u{1}")
                .field("commands", vec!["SELECT 1".to_owned()])
                .field("none", None::<String>)
                .field("ok", true)
                .field("duration_ms", 0.1 + 0.2)
                .field("tiny", 1e-7)
                .field("small", 0.1f32)
                .field("nan", f64::NAN)
                .field("params", serde_json::json!({ "count": 2, "redacted": true }))
        };
        let raw = line(add(Record::with_shared("pg.result", shared.clone())));
        assert_eq!(String::from_utf8_lossy(&raw), String::from_utf8_lossy(&line(add(map()))));
        assert!(check_line(&raw).is_ok());
        // A repeated own key replaces in place; a shared key too; a reserved key is left for the writer.
        let again = |r: Record| add(r).field("n", 8u64).field("rows", 1u64).field("session", "s-2");
        let raw = line(again(Record::with_shared("pg.result", shared.clone())));
        assert_eq!(String::from_utf8_lossy(&raw), String::from_utf8_lossy(&line(again(map()))));
        assert!(check_line(&raw).is_ok());
        let mut reserved = Record::with_shared("pg.result", shared.clone()).field("seq", 1u64);
        assert!(reserved.parts().2.contains_key("seq"), "the writer sees a reserved key and refuses it");
        // More fields than a raw record tracks.
        let many = |mut r: Record| {
            for i in 0..40u64 {
                r = r.field(&format!("k{i}"), i);
            }
            r
        };
        let raw = line(many(Record::with_shared("pg.result", shared)));
        assert_eq!(raw, line(many(map())));
    }

    #[test]
    fn genesis_is_sha256_of_nothing() {
        assert_eq!(sha256_hex(b""), GENESIS_PREV);
    }

    #[test]
    fn an_edited_byte_is_a_hash_mismatch() {
        let (line, _) = encode(1, "t", "h", "e", &fields(), GENESIS_PREV).unwrap();
        let edited = String::from_utf8(line).unwrap().replace("\"rows\":3", "\"rows\":4");
        assert!(matches!(check_line(edited.as_bytes()), Err(LineError::HashMismatch { .. })));
    }

    #[test]
    fn non_canonical_forms_are_refused() {
        let (line, _) = encode(1, "t", "h", "e", &fields(), GENESIS_PREV).unwrap();
        let text = String::from_utf8(line).unwrap();
        let spaced = text.replacen(',', ", ", 1);
        assert_eq!(check_line(spaced.as_bytes()).unwrap_err(), LineError::NotCanonical);
        let escaped = text.replace('é', "\\u00e9");
        assert_eq!(check_line(escaped.as_bytes()).unwrap_err(), LineError::NotCanonical);
        let dup = text.replacen("\"rows\":3", "\"rows\":3,\"rows\":3", 1);
        assert_eq!(check_line(dup.as_bytes()).unwrap_err(), LineError::NotCanonical);
    }

    #[test]
    fn reserved_keys_and_order_are_enforced() {
        let (good, _) = encode(1, "t", "h", "e", &fields(), GENESIS_PREV).unwrap();
        assert!(check_line(&good).is_ok(), "the control: a line as encoded passes");
        // A field named like a reserved key repeats it: the parsed object no longer re-serialises the same.
        let mut f = Map::new();
        f.insert("seq".into(), Value::from(1));
        let (line, _) = encode(1, "t", "h", "e", &f, GENESIS_PREV).unwrap();
        assert_eq!(check_line(&line).unwrap_err(), LineError::NotCanonical);
        // The same keys in another order, still canonical JSON: refused for the order, naming it.
        let parsed: Map<String, Value> = serde_json::from_slice(&good).unwrap();
        let mut swapped = Map::new();
        for key in ["seq", "host", "ts"] {
            swapped.insert(key.into(), parsed[key].clone());
        }
        for (k, v) in &parsed {
            swapped.entry(k.clone()).or_insert_with(|| v.clone());
        }
        let err = check_line(&serde_json::to_vec(&swapped).unwrap()).unwrap_err();
        assert_eq!(err, LineError::KeyOrder { position: 1, expected: "ts", found: "host".into() });
    }
}
