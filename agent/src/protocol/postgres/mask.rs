//! Masking result values: which RowDescription fields carry a masked column, what replaces their values,
//! the catalog query that resolves a grant's `mask` entries on the upstream, and which error fields may
//! quote a value. Pure; the handler runs the query and rewrites the messages.
//!
//! # The rule (with [`super::classify`])
//! - A result column is masked when its source, as the server reports it in RowDescription (table OID and
//!   attribute number), is a masked column, or when its name is a bare masked name (defence in depth: a
//!   column the server reports without a source but named `email` is masked too). Sources survive aliases,
//!   plain subquery/CTE columns, cursors (`FETCH`) and prepared statements; anything that computes from a
//!   masked column (expressions, casts, aggregates, row and JSON constructors, set operations) has no
//!   source, which is why [`super::classify`] refuses those statements instead.
//! - A masked value is replaced by a value every client decodes in both formats: for text-like types
//!   (`text`, `varchar`, `bpchar`, `name`, `unknown`) the text `[masked]` (their binary form is the same
//!   bytes), for `"char"` `*`, for `json`/`jsonb` the JSON string `"[masked]"` (`jsonb` binary carries its
//!   version byte), and for every other type SQL NULL (a fixed value of another type could be taken for
//!   data, and NULL decodes in every driver and format).
//! - Under masks, the handler filters error and notice fields through [`error_field`]: detail, hint,
//!   context and internal query may quote row values (`Failing row contains (...)`, `Key (email)=(...)`),
//!   and messages of classes that quote input values (`22`, `P0`, `XX`...) are replaced.

/// The masked columns resolved against the upstream catalog: (table oid, attnum) pairs, and bare names.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MaskSet {
    pub columns: Vec<(u32, i16)>,
    pub names: Vec<String>,
}

/// The result of [`resolve_query`]: the masked columns, and the relations (views, materialized views)
/// that expose one, for [`super::classify::SessionState::new`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resolved {
    pub set: MaskSet,
    pub tainted: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum MaskError {
    #[error("mask resolution returned a malformed row ({row:?}); the upstream answered an unexpected shape")]
    Row { row: Vec<String> },
}

/// OIDs of the types [`replacement`] gives a non-NULL value.
mod oid {
    pub const CHAR: u32 = 18;
    pub const NAME: u32 = 19;
    pub const TEXT: u32 = 25;
    pub const JSON: u32 = 114;
    pub const UNKNOWN: u32 = 705;
    pub const BPCHAR: u32 = 1042;
    pub const VARCHAR: u32 = 1043;
    pub const JSONB: u32 = 3802;
}

/// For each RowDescription field (table oid, column attnum, name, type oid), whether to mask it.
pub fn masked_fields(fields: &[(u32, i16, &str, u32)], set: &MaskSet) -> Vec<bool> {
    fields
        .iter()
        .map(|&(table, attnum, name, _)| {
            (table != 0 && set.columns.contains(&(table, attnum)))
                || set.names.iter().any(|n| n.eq_ignore_ascii_case(name))
        })
        .collect()
}

/// The bytes that replace a masked value of `type_oid` in `format` (0 text, 1 binary); None = send NULL.
pub fn replacement(type_oid: u32, format: i16) -> Option<&'static [u8]> {
    match (type_oid, format) {
        (oid::TEXT | oid::VARCHAR | oid::BPCHAR | oid::NAME | oid::UNKNOWN, 0 | 1) => Some(b"[masked]"),
        (oid::CHAR, 0 | 1) => Some(b"*"),
        (oid::JSON, 0 | 1) | (oid::JSONB, 0) => Some(b"\"[masked]\""),
        (oid::JSONB, 1) => Some(b"\x01\"[masked]\""),
        _ => None,
    }
}

/// A mask entry as (table or `schema.table`, column), lowercased; `None` table for a bare column.
fn split_entry(entry: &str) -> Option<(Option<String>, String)> {
    let e = entry.trim().to_lowercase().replace('\0', "");
    if e.is_empty() {
        return None;
    }
    Some(match e.rsplit_once('.') {
        Some((t, c)) => (Some(t.to_string()), c.to_string()),
        None => (None, e),
    })
}

fn literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// SQL that resolves mask entries to (table oid, attnum) on the upstream (run once per session/pool conn).
///
/// One statement, catalog only (safe under a read-only transaction), answering rows of five text columns:
/// `kind` (`c`: a masked column; `t`: a relation exposing one), schema, relation name, relation OID,
/// attribute number (0 for `t`). A `table.col` entry covers that table (by name in any schema, or by
/// `schema.table`) and its inheritance children and partitions; a bare `col` every user relation's `col`.
/// Views and materialized views whose definition depends on a masked column (or on a whole row of its
/// table), directly or through other views, and views with a masked column, are `t` rows.
pub fn resolve_query(mask: &[String]) -> String {
    let values: Vec<String> = mask
        .iter()
        .filter_map(|m| split_entry(m))
        .map(|(t, c)| format!("({}, {})", t.map_or_else(|| "NULL".to_string(), |t| literal(&t)), literal(&c)))
        .collect();
    let values = if values.is_empty() { "(NULL, NULL)".to_string() } else { values.join(", ") };
    format!(
        "WITH RECURSIVE m(tbl, col) AS (VALUES {values}), \
         named(oid, col) AS ( \
           SELECT c.oid, m.col FROM pg_catalog.pg_class c \
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             JOIN m ON m.tbl IS NOT NULL AND (pg_catalog.lower(c.relname) = m.tbl \
               OR pg_catalog.lower(n.nspname || '.' || c.relname) = m.tbl) \
           UNION \
           SELECT i.inhrelid, named.col FROM pg_catalog.pg_inherits i JOIN named ON i.inhparent = named.oid), \
         cols(oid, attnum, relkind) AS ( \
           SELECT a.attrelid, a.attnum, c.relkind FROM pg_catalog.pg_attribute a \
             JOIN pg_catalog.pg_class c ON c.oid = a.attrelid \
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
           WHERE a.attnum > 0 AND NOT a.attisdropped AND c.relkind IN ('r', 'p', 'v', 'm', 'f') \
             AND n.nspname NOT IN ('pg_catalog', 'information_schema') \
             AND (pg_catalog.lower(a.attname) IN (SELECT col FROM m WHERE tbl IS NULL AND col IS NOT NULL) \
               OR (a.attrelid, pg_catalog.lower(a.attname)) IN (SELECT oid, col FROM named))), \
         tainted(oid) AS ( \
           SELECT r.ev_class FROM pg_catalog.pg_depend d \
             JOIN pg_catalog.pg_rewrite r ON d.objid = r.oid \
             JOIN cols ON cols.oid = d.refobjid AND (d.refobjsubid = cols.attnum OR d.refobjsubid = 0) \
           WHERE d.classid = 'pg_catalog.pg_rewrite'::pg_catalog.regclass \
             AND d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass AND r.ev_class <> d.refobjid \
           UNION \
           SELECT r.ev_class FROM pg_catalog.pg_depend d \
             JOIN pg_catalog.pg_rewrite r ON d.objid = r.oid \
             JOIN tainted t ON t.oid = d.refobjid \
           WHERE d.classid = 'pg_catalog.pg_rewrite'::pg_catalog.regclass \
             AND d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass AND r.ev_class <> d.refobjid) \
         SELECT 'c', n.nspname, c.relname, c.oid::pg_catalog.text, cols.attnum::pg_catalog.text FROM cols \
           JOIN pg_catalog.pg_class c ON c.oid = cols.oid JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
         UNION ALL \
         SELECT 't', n.nspname, c.relname, c.oid::pg_catalog.text, '0' FROM \
           (SELECT oid FROM tainted UNION SELECT oid FROM cols WHERE relkind IN ('v', 'm')) x \
           JOIN pg_catalog.pg_class c ON c.oid = x.oid JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace"
    )
}

/// Read [`resolve_query`]'s rows (text format) for the grant's `mask` entries.
pub fn resolved(mask: &[String], rows: &[[&str; 5]]) -> Result<Resolved, MaskError> {
    let mut out = Resolved::default();
    for m in mask {
        if let Some((None, c)) = split_entry(m) {
            out.set.names.push(c);
        }
    }
    for row in rows {
        let bad = || MaskError::Row { row: row.iter().map(ToString::to_string).collect() };
        let oid: u32 = row[3].parse().map_err(|_| bad())?;
        let attnum: i16 = row[4].parse().map_err(|_| bad())?;
        match row[0] {
            "c" => out.set.columns.push((oid, attnum)),
            "t" => {
                out.tainted.push(row[2].to_lowercase());
            }
            _ => return Err(bad()),
        }
    }
    out.set.columns.sort_unstable();
    out.set.columns.dedup();
    out.tainted.sort();
    out.tainted.dedup();
    Ok(out)
}

/// What to do with one field of an ErrorResponse/NoticeResponse under masks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorField {
    Keep,
    Drop,
    /// Replace the field's text with this.
    Replace(&'static str),
}

/// SQLSTATE classes whose messages name objects, never quote row or input values.
const MESSAGE_SAFE_CLASSES: &[&str] = &[
    "08", "0A", "0B", "0L", "0P", "23", "25", "26", "28", "2B", "2D", "34", "3D", "3F", "40", "42", "44",
    "53", "54", "55", "57",
];

/// Under masks, what happens to error/notice field `field` (the protocol's one-byte code) of a message with
/// SQLSTATE `sqlstate`: severity, code, position, file/line/routine and object names are kept; detail, hint,
/// context (`W`) and internal query are dropped (they quote rows and values); the message is kept only for
/// classes that never quote values.
pub fn error_field(field: u8, sqlstate: &str) -> ErrorField {
    match field {
        b'S' | b'V' | b'C' | b'P' | b'F' | b'L' | b'R' | b's' | b't' | b'c' | b'd' | b'n' => ErrorField::Keep,
        b'M' if MESSAGE_SAFE_CLASSES.contains(&sqlstate.get(..2).unwrap_or("")) => ErrorField::Keep,
        b'M' => ErrorField::Replace("the server's message is withheld because masks apply to this session"),
        _ => ErrorField::Drop,
    }
}

/// An `ErrorResponse` or `NoticeResponse` body with every field passed through [`error_field`]; `None` when
/// nothing changes. A malformed body is withheld whole but for its SQLSTATE.
pub fn filter_error_body(body: &[u8]) -> Option<Vec<u8>> {
    let mut fields = Vec::new();
    let mut rest = body;
    while let Some((&code, tail)) = rest.split_first() {
        if code == 0 {
            break;
        }
        let Some(end) = tail.iter().position(|&b| b == 0) else { break };
        fields.push((code, &tail[..end]));
        rest = &tail[end + 1..];
    }
    let sqlstate =
        fields.iter().find(|(c, _)| *c == b'C').map_or("", |(_, v)| std::str::from_utf8(v).unwrap_or(""));
    let mut out = Vec::with_capacity(body.len());
    let mut changed = false;
    for &(code, value) in &fields {
        let value = match error_field(code, sqlstate) {
            ErrorField::Keep => value,
            ErrorField::Drop => {
                changed = true;
                continue;
            }
            ErrorField::Replace(text) => {
                changed = true;
                text.as_bytes()
            }
        };
        out.push(code);
        out.extend_from_slice(value);
        out.push(0);
    }
    out.push(0);
    (changed || out.len() != body.len()).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set() -> MaskSet {
        MaskSet { columns: vec![(16384, 2)], names: vec!["phone".into()] }
    }

    #[test]
    fn fields_are_masked_by_source_and_by_bare_name() {
        let fields = [
            (16384, 2, "e", 25),       // customers.email under an alias
            (16384, 1, "id", 23),      // another column of the table
            (0, 0, "upper", 25),       // computed, no source
            (16390, 3, "PHONE", 1043), // a bare masked name, any table
            (0, 0, "email", 25),       // named like a table.col mask but no source: by source only
        ];
        assert_eq!(masked_fields(&fields, &set()), vec![true, false, false, true, false]);
    }

    #[test]
    fn replacements_decode_in_both_formats() {
        assert_eq!(replacement(25, 0), Some(&b"[masked]"[..]));
        assert_eq!(replacement(1043, 1), Some(&b"[masked]"[..]));
        assert_eq!(replacement(3802, 1), Some(&b"\x01\"[masked]\""[..]));
        assert_eq!(replacement(114, 0), Some(&b"\"[masked]\""[..]));
        assert_eq!(replacement(23, 0), None);
        assert_eq!(replacement(17, 1), None);
        assert_eq!(replacement(25, 2), None);
        // the jsonb text form parses as JSON
        let v: serde_json::Value = serde_json::from_slice(replacement(3802, 0).unwrap()).unwrap();
        assert_eq!(v, serde_json::json!("[masked]"));
    }

    #[test]
    fn resolve_query_quotes_entries() {
        let q = resolve_query(&["customers.email".into(), "o'neil".into(), " ".into()]);
        assert!(q.contains("('customers', 'email')"), "{q}");
        assert!(q.contains("(NULL, 'o''neil')"), "{q}");
        // It is one statement the real parser reads, and a read under the classifier's own rules.
        let c = super::super::classify::classify(&q, crate::policy::Access::Read, &[], &[], &[]);
        assert!(c.is_ok(), "{c:?}");
        let empty = resolve_query(&[]);
        assert!(pg_query::parse(&empty, 0).is_ok());
    }

    #[test]
    fn resolved_rows_become_a_mask_set() {
        let mask = vec!["customers.email".to_string(), "phone".to_string()];
        let rows = [
            ["c", "public", "customers", "16384", "2"],
            ["c", "public", "customers", "16384", "2"],
            ["t", "public", "Customer_View", "16400", "0"],
        ];
        let r = resolved(&mask, &rows).unwrap();
        assert_eq!(r.set.columns, vec![(16384, 2)]);
        assert_eq!(r.set.names, vec!["phone".to_string()]);
        assert_eq!(r.tainted, vec!["customer_view".to_string()]);
        assert!(resolved(&mask, &[["c", "public", "t", "x", "1"]]).is_err());
    }

    #[test]
    fn an_error_body_is_rebuilt_without_the_fields_that_quote_values() {
        let body = b"SERROR\0C23505\0Mduplicate key value violates unique constraint\0DKey (email)=(ann@example.com) already exists.\0\0";
        let out = filter_error_body(body).unwrap();
        assert_eq!(out, b"SERROR\0C23505\0Mduplicate key value violates unique constraint\0\0");
        let body = b"SERROR\0C22P02\0Minvalid input syntax for type integer: \"ann@example.com\"\0\0";
        let out = String::from_utf8(filter_error_body(body).unwrap()).unwrap();
        assert!(!out.contains("ann@") && out.contains("withheld"), "{out}");
        assert_eq!(filter_error_body(b"SERROR\0C42P01\0Mrelation \"x\" does not exist\0\0"), None);
    }

    #[test]
    fn error_fields_that_quote_values_are_withheld() {
        assert_eq!(error_field(b'D', "23502"), ErrorField::Drop);
        assert_eq!(error_field(b'W', "42601"), ErrorField::Drop);
        assert_eq!(error_field(b'H', "42703"), ErrorField::Drop);
        assert_eq!(error_field(b'M', "42703"), ErrorField::Keep);
        assert!(matches!(error_field(b'M', "22P02"), ErrorField::Replace(_)));
        assert!(matches!(error_field(b'M', "P0001"), ErrorField::Replace(_)));
        assert_eq!(error_field(b'C', "22P02"), ErrorField::Keep);
    }
}
