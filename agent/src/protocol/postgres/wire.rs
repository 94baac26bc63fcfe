//! The PostgreSQL v3 wire format as the handler needs it: framed reads with size caps (cancel-safe, so a
//! session can wait on both sides at once), the startup packets, the few messages Warden writes itself, and
//! the fields it reads out of the messages it relays. Encoding of client-side messages comes from
//! `postgres-protocol`.

use std::io;

use bytes::{Buf as _, BufMut as _, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

/// A stream either side of the handler: plain TCP or TLS.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// PostgreSQL's own limit for the large client messages (Query, Parse, Bind, CopyData, FunctionCall) and
/// for anything the upstream sends.
pub const MAX_LARGE: usize = (1 << 30) - 1;
/// PostgreSQL's limit for every other client message (`PQ_SMALL_MESSAGE_LIMIT`).
pub const MAX_SMALL: usize = 10_000;
/// PostgreSQL's limit for a startup packet (`MAX_STARTUP_PACKET_LENGTH`).
pub const MAX_STARTUP: usize = 10_000;

pub const SSL_REQUEST: i32 = 80_877_103;
pub const GSSENC_REQUEST: i32 = 80_877_104;
pub const CANCEL_REQUEST: i32 = 80_877_102;
/// Protocol 3.0.
pub const PROTOCOL_3: i32 = 196_608;

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("connection closed mid-message")]
    Truncated,
    #[error("message `{tag}` of {len} bytes is over the {cap}-byte limit")]
    TooLarge { tag: char, len: usize, cap: usize },
    #[error("malformed message: {0}")]
    Malformed(String),
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// One message: its type byte and its body (without the length).
#[derive(Debug, Clone)]
pub struct Frame {
    pub tag: u8,
    pub body: Bytes,
}

impl Frame {
    /// The message as it goes on the wire.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.push(self.tag);
        out.extend_from_slice(&len_field(self.body.len() + 4));
        out.extend_from_slice(&self.body);
    }

    pub fn wire_len(&self) -> usize {
        self.body.len() + 5
    }
}

fn len_field(n: usize) -> [u8; 4] {
    i32::try_from(n).unwrap_or(i32::MAX).to_be_bytes()
}

/// Which caps apply to what a side sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    Client,
    Server,
}

fn cap(peer: Peer, tag: u8) -> usize {
    match (peer, tag) {
        (Peer::Server, _) | (Peer::Client, b'Q' | b'P' | b'B' | b'd' | b'F' | b'f' | b'p') => MAX_LARGE,
        (Peer::Client, _) => MAX_SMALL,
    }
}

/// The room a connection's first read gets; each read that fills its room doubles the next one's, up to
/// [`READ_MAX`]. A session that only ever sends small statements keeps small buffers (idle sessions are
/// most sessions), one that streams large results reads in large chunks.
const READ_MIN: usize = 2 * 1024;
const READ_MAX: usize = 64 * 1024;

/// A framed connection: reads whole messages (cancel-safe), buffers writes until [`Conn::flush`].
pub struct Conn {
    pub io: Box<dyn Io>,
    buf: BytesMut,
    /// The room the next read asks for (see [`READ_MIN`]).
    chunk: usize,
    /// Nothing is allocated up front; it grows to the largest batch written.
    pub out: Vec<u8>,
    peer: Peer,
}

impl Conn {
    pub fn new(io: Box<dyn Io>, peer: Peer) -> Self {
        Self { io, buf: BytesMut::new(), chunk: READ_MIN, out: Vec::new(), peer }
    }

    /// A complete message already buffered, if any.
    pub fn try_next(&mut self) -> Result<Option<Frame>, WireError> {
        if self.buf.len() < 5 {
            return Ok(None);
        }
        let tag = self.buf[0];
        let len = i32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]);
        let len = usize::try_from(len).map_err(|_| WireError::Malformed(format!("negative length {len}")))?;
        if len < 4 {
            return Err(WireError::Malformed(format!("length {len} is under 4")));
        }
        let cap = cap(self.peer, tag);
        if len > cap {
            return Err(WireError::TooLarge { tag: char::from(tag), len, cap });
        }
        if self.buf.len() < len + 1 {
            // Grow towards the message, never trusting a large length for one allocation.
            let want = (len + 1 - self.buf.len()).min(1 << 20);
            self.buf.reserve(want);
            return Ok(None);
        }
        let mut m = self.buf.split_to(len + 1);
        m.advance(5);
        Ok(Some(Frame { tag, body: m.freeze() }))
    }

    /// The next message; `None` at a clean end of stream (between messages). Cancel-safe.
    pub async fn next(&mut self) -> Result<Option<Frame>, WireError> {
        loop {
            if let Some(f) = self.try_next()? {
                return Ok(Some(f));
            }
            if self.buf.capacity() - self.buf.len() < self.chunk / 2 {
                self.buf.reserve(self.chunk);
            }
            let room = self.buf.capacity() - self.buf.len();
            let n = self.io.read_buf(&mut self.buf).await?;
            if n == 0 {
                return if self.buf.is_empty() { Ok(None) } else { Err(WireError::Truncated) };
            }
            if n == room && self.chunk < READ_MAX {
                self.chunk *= 2;
            }
        }
    }

    /// Whether bytes of a further message are already buffered.
    pub fn has_buffered(&self) -> bool {
        !self.buf.is_empty()
    }

    pub fn send(&mut self, f: &Frame) {
        f.encode(&mut self.out);
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.out.extend_from_slice(bytes);
    }

    /// Writes what is buffered. Returns the bytes written.
    pub async fn flush(&mut self) -> io::Result<usize> {
        let n = self.out.len();
        if n > 0 {
            self.io.write_all(&self.out).await?;
            self.out.clear();
        }
        self.io.flush().await?;
        Ok(n)
    }
}

/// A packet before the session starts (no type byte): SSLRequest, GSSENCRequest, CancelRequest or
/// StartupMessage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Initial {
    Ssl,
    GssEnc,
    Cancel { pid: i32, key: Vec<u8> },
    Startup { version: i32, params: Vec<(String, String)> },
}

/// Reads one initial packet from a raw stream.
pub async fn read_initial<S: AsyncRead + Unpin + ?Sized>(s: &mut S) -> Result<Initial, WireError> {
    let mut len = [0u8; 4];
    read_exact(s, &mut len).await?;
    let len = i32::from_be_bytes(len);
    let len = usize::try_from(len).map_err(|_| WireError::Malformed(format!("negative length {len}")))?;
    if !(8..=MAX_STARTUP).contains(&len) {
        return Err(WireError::TooLarge { tag: '0', len, cap: MAX_STARTUP });
    }
    let mut body = vec![0u8; len - 4];
    read_exact(s, &mut body).await?;
    parse_initial(&body)
}

async fn read_exact<S: AsyncRead + Unpin + ?Sized>(s: &mut S, buf: &mut [u8]) -> Result<(), WireError> {
    match s.read_exact(buf).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(WireError::Truncated),
        Err(e) => Err(e.into()),
    }
}

/// Parses an initial packet's body (after the length).
pub fn parse_initial(body: &[u8]) -> Result<Initial, WireError> {
    let mut r = Reader::new(body);
    let code = r.i32()?;
    match code {
        SSL_REQUEST => Ok(Initial::Ssl),
        GSSENC_REQUEST => Ok(Initial::GssEnc),
        CANCEL_REQUEST => {
            let pid = r.i32()?;
            let key = r.rest().to_vec();
            if key.is_empty() || key.len() > 256 {
                return Err(WireError::Malformed(format!("cancel key of {} bytes", key.len())));
            }
            Ok(Initial::Cancel { pid, key })
        }
        v if v >> 16 == 3 => {
            let mut params = Vec::new();
            loop {
                let k = r.cstr()?;
                if k.is_empty() {
                    break;
                }
                let v = r.cstr()?;
                params.push((k.to_owned(), v.to_owned()));
            }
            Ok(Initial::Startup { version: v, params })
        }
        v => Err(WireError::Malformed(format!("unsupported protocol version {}.{}", v >> 16, v & 0xffff))),
    }
}

/// Reads fields out of a message body.
pub struct Reader<'a> {
    b: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(b: &'a [u8]) -> Self {
        Self { b }
    }

    fn short() -> WireError {
        WireError::Malformed("message ends early".into())
    }

    pub fn u8(&mut self) -> Result<u8, WireError> {
        let (&x, rest) = self.b.split_first().ok_or_else(Self::short)?;
        self.b = rest;
        Ok(x)
    }

    pub fn i16(&mut self) -> Result<i16, WireError> {
        let v = self.bytes(2)?;
        Ok(i16::from_be_bytes([v[0], v[1]]))
    }

    pub fn i32(&mut self) -> Result<i32, WireError> {
        let v = self.bytes(4)?;
        Ok(i32::from_be_bytes([v[0], v[1], v[2], v[3]]))
    }

    pub fn u32(&mut self) -> Result<u32, WireError> {
        let v = self.bytes(4)?;
        Ok(u32::from_be_bytes([v[0], v[1], v[2], v[3]]))
    }

    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.b.len() < n {
            return Err(Self::short());
        }
        let (x, rest) = self.b.split_at(n);
        self.b = rest;
        Ok(x)
    }

    /// A NUL-terminated UTF-8 string.
    pub fn cstr(&mut self) -> Result<&'a str, WireError> {
        let end = self
            .b
            .iter()
            .position(|&c| c == 0)
            .ok_or_else(|| WireError::Malformed("string without its NUL".into()))?;
        let s = std::str::from_utf8(&self.b[..end])
            .map_err(|_| WireError::Malformed("string is not UTF-8".into()))?;
        self.b = &self.b[end + 1..];
        Ok(s)
    }

    /// A length-prefixed value (`-1` = NULL).
    pub fn value(&mut self) -> Result<Option<&'a [u8]>, WireError> {
        let n = self.i32()?;
        if n < 0 {
            return Ok(None);
        }
        self.bytes(usize::try_from(n).map_err(|_| Self::short())?).map(Some)
    }

    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.b)
    }
}

fn frame(tag: u8, body: BytesMut) -> Frame {
    Frame { tag, body: body.freeze() }
}

/// An `ErrorResponse` with severity, SQLSTATE and message.
pub fn error_response(severity: &str, code: &str, message: &str) -> Frame {
    let mut b = BytesMut::new();
    for (t, v) in [(b'S', severity), (b'V', severity), (b'C', code), (b'M', message)] {
        b.put_u8(t);
        b.put_slice(v.as_bytes());
        b.put_u8(0);
    }
    b.put_u8(0);
    frame(b'E', b)
}

pub fn ready_for_query(status: u8) -> Frame {
    let mut b = BytesMut::new();
    b.put_u8(status);
    frame(b'Z', b)
}

pub fn authentication_ok() -> Frame {
    let mut b = BytesMut::new();
    b.put_i32(0);
    frame(b'R', b)
}

pub fn parameter_status(name: &str, value: &str) -> Frame {
    let mut b = BytesMut::new();
    b.put_slice(name.as_bytes());
    b.put_u8(0);
    b.put_slice(value.as_bytes());
    b.put_u8(0);
    frame(b'S', b)
}

pub fn backend_key_data(pid: i32, key: i32) -> Frame {
    let mut b = BytesMut::new();
    b.put_i32(pid);
    b.put_i32(key);
    frame(b'K', b)
}

/// `NegotiateProtocolVersion`: the newest minor version we speak (3.0) and the options we do not know.
pub fn negotiate_protocol_version(unknown: &[String]) -> Frame {
    let mut b = BytesMut::new();
    b.put_i32(PROTOCOL_3);
    b.put_i32(i32::try_from(unknown.len()).unwrap_or(i32::MAX));
    for o in unknown {
        b.put_slice(o.as_bytes());
        b.put_u8(0);
    }
    frame(b'v', b)
}

/// A client message built by a `postgres-protocol` encoder.
pub fn encoded(f: impl FnOnce(&mut BytesMut) -> io::Result<()>) -> Vec<u8> {
    let mut b = BytesMut::new();
    // The encoders fail only on strings holding NUL; callers pass none.
    let _ = f(&mut b);
    b.to_vec()
}

/// The fields of an `ErrorResponse` or `NoticeResponse` Warden reads: severity, SQLSTATE, message.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ErrorFields {
    pub severity: String,
    pub code: String,
    pub message: String,
}

pub fn parse_error(body: &[u8]) -> ErrorFields {
    let mut r = Reader::new(body);
    let mut e = ErrorFields::default();
    while let Ok(t) = r.u8() {
        if t == 0 {
            break;
        }
        let Ok(v) = r.cstr() else { break };
        match t {
            b'V' => v.clone_into(&mut e.severity),
            b'S' if e.severity.is_empty() => v.clone_into(&mut e.severity),
            b'C' => v.clone_into(&mut e.code),
            b'M' => v.clone_into(&mut e.message),
            _ => {}
        }
    }
    e
}

/// One `RowDescription` field as masking needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field {
    pub name: String,
    pub table: u32,
    pub column: i16,
    pub type_oid: u32,
    pub format: i16,
}

pub fn parse_row_description(body: &[u8]) -> Result<Vec<Field>, WireError> {
    let mut r = Reader::new(body);
    let n = r.i16()?;
    let mut out = Vec::with_capacity(usize::try_from(n).unwrap_or(0));
    for _ in 0..n {
        let name = r.cstr()?.to_owned();
        let table = r.u32()?;
        let column = r.i16()?;
        let type_oid = r.u32()?;
        let _typlen = r.i16()?;
        let _typmod = r.i32()?;
        let format = r.i16()?;
        out.push(Field { name, table, column, type_oid, format });
    }
    Ok(out)
}

/// Rewrites a `DataRow`, replacing each masked column's value with `replace(column)` (`None` = NULL).
pub fn mask_data_row(
    body: &[u8],
    masked: &[bool],
    replace: impl Fn(usize) -> Option<&'static [u8]>,
) -> Result<Frame, WireError> {
    let mut r = Reader::new(body);
    let n = r.i16()?;
    let mut b = BytesMut::with_capacity(body.len());
    b.put_i16(n);
    for i in 0..usize::try_from(n).unwrap_or(0) {
        let v = r.value()?;
        let v = if masked.get(i).copied().unwrap_or(false) {
            if v.is_some() { replace(i) } else { None }
        } else {
            v
        };
        match v {
            Some(v) => {
                b.put_i32(i32::try_from(v.len()).unwrap_or(i32::MAX));
                b.put_slice(v);
            }
            None => b.put_i32(-1),
        }
    }
    Ok(frame(b'D', b))
}

/// The rows a `CommandComplete` tag reports (`SELECT 3`, `INSERT 0 1`, `UPDATE 2`), if it reports any.
pub fn tag_rows(tag: &str) -> Option<u64> {
    let last = tag.rsplit(' ').next()?;
    if last == tag {
        return None;
    }
    last.parse().ok()
}

/// A `Bind` message's fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind {
    pub portal: String,
    pub statement: String,
    pub formats: Vec<i16>,
    pub params: Vec<Option<Vec<u8>>>,
}

pub fn parse_bind(body: &[u8]) -> Result<Bind, WireError> {
    let mut r = Reader::new(body);
    let portal = r.cstr()?.to_owned();
    let statement = r.cstr()?.to_owned();
    let nf = r.i16()?;
    let formats = (0..nf).map(|_| r.i16()).collect::<Result<Vec<_>, _>>()?;
    let np = r.i16()?;
    let params = (0..np).map(|_| r.value().map(|v| v.map(<[u8]>::to_vec))).collect::<Result<Vec<_>, _>>()?;
    let nr = r.i16()?;
    for _ in 0..nr {
        r.i16()?;
    }
    Ok(Bind { portal, statement, formats, params })
}

/// A fastpath `FunctionCall` message's fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FunctionCall {
    /// The function's OID in `pg_proc`.
    pub oid: u32,
    pub formats: Vec<i16>,
    pub args: Vec<Option<Vec<u8>>>,
}

pub fn parse_function_call(body: &[u8]) -> Result<FunctionCall, WireError> {
    let mut r = Reader::new(body);
    let oid = r.u32()?;
    let nf = r.i16()?;
    let formats = (0..nf).map(|_| r.i16()).collect::<Result<Vec<_>, _>>()?;
    let na = r.i16()?;
    let args = (0..na).map(|_| r.value().map(|v| v.map(<[u8]>::to_vec))).collect::<Result<Vec<_>, _>>()?;
    r.i16()?;
    if !r.rest().is_empty() {
        return Err(WireError::Malformed("FunctionCall with trailing bytes".into()));
    }
    Ok(FunctionCall { oid, formats, args })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn_over(bytes: Vec<u8>, peer: Peer) -> Conn {
        let (mut a, b) = tokio::io::duplex(1 << 16);
        tokio::spawn(async move {
            a.write_all(&bytes).await.unwrap();
        });
        Conn::new(Box::new(b), peer)
    }

    #[tokio::test]
    async fn frames_are_read_whole_and_truncation_is_an_error() {
        let mut bytes = Vec::new();
        ready_for_query(b'I').encode(&mut bytes);
        bytes.extend_from_slice(&[b'Q', 0, 0, 0, 9, b's']);
        let mut c = conn_over(bytes, Peer::Server);
        let f = c.next().await.unwrap().unwrap();
        assert_eq!((f.tag, &f.body[..]), (b'Z', &b"I"[..]));
        assert!(matches!(c.next().await, Err(WireError::Truncated)));
    }

    #[tokio::test]
    async fn oversized_and_undersized_lengths_are_refused() {
        let mut c = conn_over(vec![b'S', 0x7f, 0, 0, 0], Peer::Client);
        assert!(matches!(c.next().await, Err(WireError::TooLarge { tag: 'S', .. })));
        let mut c = conn_over(vec![b'Q', 0, 0, 0, 2], Peer::Client);
        assert!(matches!(c.next().await, Err(WireError::Malformed(_))));
    }

    #[test]
    fn startup_packets_parse() {
        let mut b = PROTOCOL_3.to_be_bytes().to_vec();
        b.extend_from_slice(b"user\0bob\0database\0orders\0\0");
        assert_eq!(
            parse_initial(&b).unwrap(),
            Initial::Startup {
                version: PROTOCOL_3,
                params: vec![("user".into(), "bob".into()), ("database".into(), "orders".into())]
            }
        );
        let mut c = CANCEL_REQUEST.to_be_bytes().to_vec();
        c.extend_from_slice(&7i32.to_be_bytes());
        c.extend_from_slice(&9i32.to_be_bytes());
        assert_eq!(parse_initial(&c).unwrap(), Initial::Cancel { pid: 7, key: 9i32.to_be_bytes().to_vec() });
        assert!(parse_initial(&[0, 2, 0, 0]).is_err());
        assert!(parse_initial(&PROTOCOL_3.to_be_bytes()).is_err());
    }

    #[test]
    fn data_rows_are_masked_by_column() {
        let mut b = BytesMut::new();
        b.put_i16(3);
        for v in [&b"1"[..], b"alice@example.com"] {
            b.put_i32(i32::try_from(v.len()).unwrap());
            b.put_slice(v);
        }
        b.put_i32(-1);
        let f = mask_data_row(&b, &[false, true, true], |_| Some(b"***")).unwrap();
        let mut r = Reader::new(&f.body);
        assert_eq!(r.i16().unwrap(), 3);
        assert_eq!(r.value().unwrap(), Some(&b"1"[..]));
        assert_eq!(r.value().unwrap(), Some(&b"***"[..]));
        assert_eq!(r.value().unwrap(), None);
    }

    #[test]
    fn command_tags_give_rows() {
        assert_eq!(tag_rows("SELECT 3"), Some(3));
        assert_eq!(tag_rows("INSERT 0 12"), Some(12));
        assert_eq!(tag_rows("BEGIN"), None);
        assert_eq!(tag_rows("CREATE TABLE"), None);
    }

    #[test]
    fn error_fields_are_read() {
        let e = parse_error(&error_response("ERROR", "25006", "no writes").body);
        assert_eq!(
            (e.severity.as_str(), e.code.as_str(), e.message.as_str()),
            ("ERROR", "25006", "no writes")
        );
    }
}
