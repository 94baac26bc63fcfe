//! Watching a relayed sftp subsystem channel (SFTP version 3, draft-ietf-secsh-filexfer-02, what OpenSSH
//! speaks; `scp` in OpenSSH 9 and later uses it too) and turning its packets into file operations: a
//! file opened, read and written through a handle and closed; a remove, rename, mkdir, rmdir, setstat,
//! symlink or hard link, each with the server's answer. Pure: the channel bridge feeds it the bytes it
//! relays and writes the [`Op`]s it returns as `ssh.sftp` records.
//!
//! The relay never depends on this parser: every byte is relayed as it came, whatever it is. The parser
//! keeps only the first [`PREFIX_CAP`] bytes of a packet (enough for the header and two paths) and counts
//! the rest, so file data is never copied or buffered; a packet it does not understand is counted in
//! [`Sftp::unparsed`]; a stream it cannot frame (a length over [`MAX_PACKET`]) stops being parsed
//! ([`Sftp::lost`]) and is still relayed. Pending requests and open handles are bounded too.
//!
//! Hand-written rather than `russh-sftp`'s protocol types: those decode a whole packet from one buffer,
//! which would mean holding and copying every `WRITE` and `DATA` payload (up to 256 KiB each) on the hot
//! path, while only their lengths are recorded here.

use std::collections::HashMap;
use std::time::Instant;

/// How much of each packet is kept for parsing: the type, the request id and two 4 KiB paths.
pub const PREFIX_CAP: usize = 9 * 1024;
/// The longest packet the parser frames (OpenSSH's limit is 256 KiB; some servers go higher).
pub const MAX_PACKET: u32 = 1 << 20;
/// At most this many requests awaiting an answer, and this many open handles, are tracked (OpenSSH's
/// client keeps up to 64 requests in flight); with [`PREFIX_CAP`] and [`MAX_HANDLE`] this bounds a
/// channel's parser to a few MiB whatever the client or server sends, and a few KiB in practice.
const MAX_TRACKED: usize = 128;
/// The longest handle the protocol allows (draft-02: "MUST NOT be longer than 256 bytes").
const MAX_HANDLE: usize = 256;

mod fxp {
    pub const OPEN: u8 = 3;
    pub const CLOSE: u8 = 4;
    pub const READ: u8 = 5;
    pub const WRITE: u8 = 6;
    pub const SETSTAT: u8 = 9;
    pub const REMOVE: u8 = 13;
    pub const MKDIR: u8 = 14;
    pub const RMDIR: u8 = 15;
    pub const RENAME: u8 = 18;
    pub const SYMLINK: u8 = 20;
    pub const STATUS: u8 = 101;
    pub const HANDLE: u8 = 102;
    pub const DATA: u8 = 103;
    pub const EXTENDED: u8 = 200;
}

/// Which way the bytes go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    /// Client to server: requests.
    Up,
    /// Server to client: replies.
    Down,
}

/// One file operation, as recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Op {
    /// `file` (a handle closed, or still open when the channel ended), `open` (an open the server
    /// refused), `remove`, `rename`, `mkdir`, `rmdir`, `setstat`, `symlink`, `hardlink`.
    pub op: &'static str,
    pub path: String,
    /// The second path of a rename, symlink or hard link.
    pub to: Option<String>,
    /// For `file` and `open`: how it was opened (`read`, `write`, `append`, `create`, `truncate`,
    /// `exclusive`, comma-separated).
    pub mode: Option<String>,
    pub bytes_read: u64,
    pub bytes_written: u64,
    /// The server's answer: `ok`, a status name (`no such file`, `permission denied`, ...), or `open`
    /// for a handle still open when the channel ended.
    pub status: String,
    pub duration_ms: u64,
}

impl Op {
    fn simple(op: &'static str, path: String, to: Option<String>, status: String) -> Self {
        Self { op, path, to, mode: None, bytes_read: 0, bytes_written: 0, status, duration_ms: 0 }
    }
}

/// Splits one direction's byte stream into packets, keeping each packet's prefix.
#[derive(Debug, Default)]
struct Framer {
    len: [u8; 4],
    len_have: usize,
    /// Bytes of the current packet still to come (after its length).
    left: u32,
    /// The current packet's total length.
    total: u32,
    prefix: Vec<u8>,
    lost: bool,
}

impl Framer {
    /// Feeds bytes; calls `packet(prefix, total_len)` for every complete packet. False once lost.
    fn feed(&mut self, mut data: &[u8], mut packet: impl FnMut(&[u8], u32)) -> bool {
        while !self.lost && !data.is_empty() {
            if self.left == 0 {
                let take = (4 - self.len_have).min(data.len());
                self.len[self.len_have..self.len_have + take].copy_from_slice(&data[..take]);
                self.len_have += take;
                data = &data[take..];
                if self.len_have < 4 {
                    break;
                }
                self.len_have = 0;
                let len = u32::from_be_bytes(self.len);
                if len == 0 || len > MAX_PACKET {
                    self.lost = true;
                    break;
                }
                self.left = len;
                self.total = len;
                self.prefix.clear();
            }
            // At most `left`, so it fits a u32.
            let take = u32::try_from(data.len()).unwrap_or(u32::MAX).min(self.left);
            let n = take as usize;
            let room = PREFIX_CAP.saturating_sub(self.prefix.len()).min(n);
            self.prefix.extend_from_slice(&data[..room]);
            self.left -= take;
            data = &data[n..];
            if self.left == 0 {
                packet(&self.prefix, self.total);
            }
        }
        !self.lost
    }
}

/// A cursor over a packet prefix.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn u8(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }
    fn u32(&mut self) -> Option<u32> {
        let (b, rest) = self.0.split_first_chunk::<4>()?;
        self.0 = rest;
        Some(u32::from_be_bytes(*b))
    }
    fn u64(&mut self) -> Option<u64> {
        let (b, rest) = self.0.split_first_chunk::<8>()?;
        self.0 = rest;
        Some(u64::from_be_bytes(*b))
    }
    fn bytes(&mut self) -> Option<&'a [u8]> {
        let n = self.u32()? as usize;
        if n > self.0.len() {
            return None;
        }
        let (b, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(b)
    }
    fn string(&mut self) -> Option<String> {
        self.bytes().map(|b| String::from_utf8_lossy(b).into_owned())
    }
}

#[derive(Debug)]
enum Pending {
    Open { path: String, mode: String, at: Instant },
    Close { handle: Vec<u8> },
    Read { handle: Vec<u8> },
    Op { op: &'static str, path: String, to: Option<String> },
}

#[derive(Debug)]
struct File {
    path: String,
    mode: String,
    opened: Instant,
    read: u64,
    written: u64,
}

/// The sftp state of one channel.
#[derive(Debug, Default)]
pub struct Sftp {
    up: Framer,
    down: Framer,
    pending: HashMap<u32, Pending>,
    files: HashMap<Vec<u8>, File>,
    /// Packets that were framed but not understood (or not tracked: over the bounds).
    pub unparsed: u64,
}

fn mode(pflags: u32) -> String {
    const NAMES: [(u32, &str); 6] =
        [(1, "read"), (2, "write"), (4, "append"), (8, "create"), (0x10, "truncate"), (0x20, "exclusive")];
    let names: Vec<&str> = NAMES.iter().filter(|(bit, _)| pflags & bit != 0).map(|(_, n)| *n).collect();
    names.join(",")
}

fn status_name(code: u32, message: &str) -> String {
    let name = match code {
        0 => return "ok".into(),
        1 => "eof",
        2 => "no such file",
        3 => "permission denied",
        4 => "failure",
        5 => "bad message",
        6 => "no connection",
        7 => "connection lost",
        8 => "unsupported",
        _ => "error",
    };
    if message.is_empty() { name.into() } else { format!("{name}: {message}") }
}

fn millis(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX)
}

impl Sftp {
    /// Whether a direction's stream could not be framed (it is still relayed, no longer parsed).
    pub fn lost(&self) -> bool {
        self.up.lost || self.down.lost
    }

    /// Feeds bytes relayed in `dir`; completed operations are pushed to `out`.
    pub fn feed(&mut self, dir: Dir, data: &[u8], out: &mut Vec<Op>) {
        let Self { up, down, pending, files, unparsed } = self;
        let mut state = State { pending, files, unparsed };
        match dir {
            Dir::Up => {
                up.feed(data, |p, total| {
                    if state.request(p, total).is_none() {
                        *state.unparsed += 1;
                    }
                });
            }
            Dir::Down => {
                down.feed(data, |p, _| {
                    if state.reply(p, out).is_none() {
                        *state.unparsed += 1;
                    }
                });
            }
        }
    }

    /// The channel ended: files still open are reported with status `open`.
    pub fn finish(&mut self, out: &mut Vec<Op>) {
        let mut files: Vec<File> = self.files.drain().map(|(_, f)| f).collect();
        files.sort_by_key(|f| f.opened);
        for f in files {
            out.push(Op {
                op: "file",
                duration_ms: millis(f.opened),
                path: f.path,
                to: None,
                mode: Some(f.mode),
                bytes_read: f.read,
                bytes_written: f.written,
                status: "open".into(),
            });
        }
        self.pending.clear();
    }
}

struct State<'a> {
    pending: &'a mut HashMap<u32, Pending>,
    files: &'a mut HashMap<Vec<u8>, File>,
    unparsed: &'a mut u64,
}

impl State<'_> {
    fn track(&mut self, id: u32, p: Pending) -> Option<()> {
        // A repeated id replaces its entry; a new one needs room.
        (self.pending.len() < MAX_TRACKED || self.pending.contains_key(&id)).then(|| {
            self.pending.insert(id, p);
        })
    }

    /// A client request. `None`: not understood or not tracked.
    fn request(&mut self, prefix: &[u8], total: u32) -> Option<()> {
        let mut r = Reader(prefix);
        let kind = r.u8()?;
        if !matches!(
            kind,
            fxp::OPEN
                | fxp::CLOSE
                | fxp::READ
                | fxp::WRITE
                | fxp::SETSTAT
                | fxp::REMOVE
                | fxp::MKDIR
                | fxp::RMDIR
                | fxp::RENAME
                | fxp::SYMLINK
                | fxp::EXTENDED
        ) {
            // INIT, stat, realpath, opendir, readdir, ...: relayed, nothing to record.
            return Some(());
        }
        let id = r.u32()?;
        match kind {
            fxp::OPEN => {
                let path = r.string()?;
                let pflags = r.u32()?;
                self.track(id, Pending::Open { path, mode: mode(pflags), at: Instant::now() })
            }
            fxp::CLOSE => {
                let handle = r.bytes()?.to_vec();
                if self.files.contains_key(&handle) {
                    self.track(id, Pending::Close { handle })?;
                }
                Some(())
            }
            fxp::READ => {
                let handle = r.bytes()?;
                if self.files.contains_key(handle) {
                    self.track(id, Pending::Read { handle: handle.to_vec() })?;
                }
                Some(())
            }
            fxp::WRITE => {
                let handle = r.bytes()?;
                let _offset = r.u64()?;
                let len = r.u32()?;
                // The data itself is past the prefix; its length must fit the packet.
                let header = 1 + 4 + 4 + handle.len() + 8 + 4;
                if u64::from(len) + header as u64 != u64::from(total) {
                    return None;
                }
                if let Some(f) = self.files.get_mut(handle) {
                    f.written += u64::from(len);
                }
                Some(())
            }
            fxp::REMOVE | fxp::MKDIR | fxp::RMDIR | fxp::SETSTAT => {
                let op = match kind {
                    fxp::REMOVE => "remove",
                    fxp::MKDIR => "mkdir",
                    fxp::RMDIR => "rmdir",
                    _ => "setstat",
                };
                let path = r.string()?;
                self.track(id, Pending::Op { op, path, to: None })
            }
            fxp::RENAME | fxp::SYMLINK => {
                let op = if kind == fxp::RENAME { "rename" } else { "symlink" };
                let (a, b) = (r.string()?, r.string()?);
                self.track(id, Pending::Op { op, path: a, to: Some(b) })
            }
            fxp::EXTENDED => {
                let name = r.bytes()?;
                let op = match name {
                    b"posix-rename@openssh.com" => "rename",
                    b"hardlink@openssh.com" => "hardlink",
                    // statvfs, fsync, limits, ...: nothing to record.
                    _ => return Some(()),
                };
                let (a, b) = (r.string()?, r.string()?);
                self.track(id, Pending::Op { op, path: a, to: Some(b) })
            }
            _ => Some(()),
        }
    }

    /// A server reply. `None`: not understood.
    fn reply(&mut self, prefix: &[u8], out: &mut Vec<Op>) -> Option<()> {
        let mut r = Reader(prefix);
        let kind = r.u8()?;
        if !matches!(kind, fxp::STATUS | fxp::HANDLE | fxp::DATA) {
            // VERSION, NAME, ATTRS, EXTENDED_REPLY: nothing to record.
            return Some(());
        }
        let id = r.u32()?;
        let Some(pending) = self.pending.remove(&id) else { return Some(()) };
        match (kind, pending) {
            (fxp::HANDLE, Pending::Open { path, mode, at }) => {
                let handle = r.bytes()?.to_vec();
                if self.files.len() >= MAX_TRACKED || handle.len() > MAX_HANDLE {
                    return None;
                }
                self.files.insert(handle, File { path, mode, opened: at, read: 0, written: 0 });
            }
            (fxp::STATUS, Pending::Open { path, mode, at }) => {
                let (code, message) = (r.u32()?, r.string().unwrap_or_default());
                out.push(Op {
                    mode: Some(mode),
                    duration_ms: millis(at),
                    ..Op::simple("open", path, None, status_name(code, &message))
                });
            }
            (fxp::DATA, Pending::Read { handle }) => {
                let len = r.u32()?;
                if let Some(f) = self.files.get_mut(&handle) {
                    f.read += u64::from(len);
                }
            }
            (fxp::STATUS, Pending::Read { .. }) => {}
            (fxp::STATUS, Pending::Close { handle }) => {
                let (code, message) = (r.u32()?, r.string().unwrap_or_default());
                if let Some(f) = self.files.remove(&handle) {
                    out.push(Op {
                        op: "file",
                        duration_ms: millis(f.opened),
                        path: f.path,
                        to: None,
                        mode: Some(f.mode),
                        bytes_read: f.read,
                        bytes_written: f.written,
                        status: status_name(code, &message),
                    });
                }
            }
            (fxp::STATUS, Pending::Op { op, path, to }) => {
                let (code, message) = (r.u32()?, r.string().unwrap_or_default());
                out.push(Op::simple(op, path, to, status_name(code, &message)));
            }
            _ => return None,
        }
        Some(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn string(b: &mut Vec<u8>, s: &[u8]) {
        b.extend_from_slice(&u32::try_from(s.len()).unwrap().to_be_bytes());
        b.extend_from_slice(s);
    }

    fn packet(kind: u8, id: u32, body: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
        let mut b = vec![kind];
        b.extend_from_slice(&id.to_be_bytes());
        body(&mut b);
        let mut p = u32::try_from(b.len()).unwrap().to_be_bytes().to_vec();
        p.extend(b);
        p
    }

    fn status(id: u32, code: u32) -> Vec<u8> {
        packet(fxp::STATUS, id, |b| {
            b.extend_from_slice(&code.to_be_bytes());
            string(b, b"");
            string(b, b"");
        })
    }

    /// Feeds `bytes` in chunks of `chunk` (1 byte at the worst), to exercise the framing.
    fn feed(s: &mut Sftp, dir: Dir, bytes: &[u8], chunk: usize, out: &mut Vec<Op>) {
        for c in bytes.chunks(chunk) {
            s.feed(dir, c, out);
        }
    }

    fn session(chunk: usize) -> (Sftp, Vec<Op>) {
        let mut s = Sftp::default();
        let mut out = Vec::new();
        // INIT / VERSION (no request id to track).
        let init = [0, 0, 0, 5, 1, 0, 0, 0, 3];
        feed(&mut s, Dir::Up, &init, chunk, &mut out);
        feed(&mut s, Dir::Down, &[0, 0, 0, 5, 2, 0, 0, 0, 3], chunk, &mut out);
        let open = packet(fxp::OPEN, 1, |b| {
            string(b, b"/tmp/dst.txt");
            b.extend_from_slice(&(2u32 | 8 | 0x10).to_be_bytes());
            b.extend_from_slice(&0u32.to_be_bytes());
        });
        feed(&mut s, Dir::Up, &open, chunk, &mut out);
        feed(&mut s, Dir::Down, &packet(fxp::HANDLE, 1, |b| string(b, b"h0")), chunk, &mut out);
        let data = vec![7u8; 20_000];
        let write = packet(fxp::WRITE, 2, |b| {
            string(b, b"h0");
            b.extend_from_slice(&0u64.to_be_bytes());
            string(b, &data);
        });
        feed(&mut s, Dir::Up, &write, chunk, &mut out);
        feed(&mut s, Dir::Down, &status(2, 0), chunk, &mut out);
        let read = packet(fxp::READ, 3, |b| {
            string(b, b"h0");
            b.extend_from_slice(&0u64.to_be_bytes());
            b.extend_from_slice(&32768u32.to_be_bytes());
        });
        feed(&mut s, Dir::Up, &read, chunk, &mut out);
        feed(&mut s, Dir::Down, &packet(fxp::DATA, 3, |b| string(b, &data[..1234])), chunk, &mut out);
        feed(&mut s, Dir::Up, &packet(fxp::CLOSE, 4, |b| string(b, b"h0")), chunk, &mut out);
        feed(&mut s, Dir::Down, &status(4, 0), chunk, &mut out);
        let rename = packet(fxp::EXTENDED, 5, |b| {
            string(b, b"posix-rename@openssh.com");
            string(b, b"/tmp/a");
            string(b, b"/tmp/b");
        });
        feed(&mut s, Dir::Up, &rename, chunk, &mut out);
        feed(&mut s, Dir::Down, &status(5, 0), chunk, &mut out);
        feed(&mut s, Dir::Up, &packet(fxp::REMOVE, 6, |b| string(b, b"/nope")), chunk, &mut out);
        feed(&mut s, Dir::Down, &status(6, 2), chunk, &mut out);
        (s, out)
    }

    #[test]
    fn a_session_becomes_file_operations_however_it_is_split() {
        for chunk in [1, 3, 7, 4096, 1 << 20] {
            let (s, out) = session(chunk);
            assert_eq!(out.len(), 3, "{out:?}");
            let f = &out[0];
            assert_eq!((f.op, f.path.as_str(), f.status.as_str()), ("file", "/tmp/dst.txt", "ok"));
            assert_eq!(f.mode.as_deref(), Some("write,create,truncate"));
            assert_eq!((f.bytes_written, f.bytes_read), (20_000, 1234));
            assert_eq!(
                (out[1].op, out[1].path.as_str(), out[1].to.as_deref()),
                ("rename", "/tmp/a", Some("/tmp/b"))
            );
            assert_eq!((out[2].op, out[2].status.as_str()), ("remove", "no such file"));
            assert_eq!(s.unparsed, 0);
            assert!(!s.lost());
        }
    }

    #[test]
    fn files_left_open_are_reported_at_the_end() {
        let mut s = Sftp::default();
        let mut out = Vec::new();
        let open = packet(fxp::OPEN, 9, |b| {
            string(b, b"/etc/hosts");
            b.extend_from_slice(&1u32.to_be_bytes());
            b.extend_from_slice(&0u32.to_be_bytes());
        });
        s.feed(Dir::Up, &open, &mut out);
        s.feed(Dir::Down, &packet(fxp::HANDLE, 9, |b| string(b, b"x")), &mut out);
        assert!(out.is_empty());
        s.finish(&mut out);
        assert_eq!(
            (out[0].op, out[0].status.as_str(), out[0].mode.as_deref()),
            ("file", "open", Some("read"))
        );
    }

    #[test]
    fn tracking_is_bounded() {
        let mut s = Sftp::default();
        let mut out = Vec::new();
        for id in 0..1000u32 {
            s.feed(Dir::Up, &packet(fxp::REMOVE, id, |b| string(b, &[b'a'; 4000])), &mut out);
        }
        assert_eq!(s.pending.len(), MAX_TRACKED);
        assert_eq!(s.unparsed, 1000 - MAX_TRACKED as u64);
        // An over-long handle is not kept.
        let open = packet(fxp::OPEN, 5000, |b| {
            string(b, b"/x");
            b.extend_from_slice(&1u32.to_be_bytes());
            b.extend_from_slice(&0u32.to_be_bytes());
        });
        s.pending.clear();
        s.feed(Dir::Up, &open, &mut out);
        s.feed(Dir::Down, &packet(fxp::HANDLE, 5000, |b| string(b, &[1; 300])), &mut out);
        assert!(s.files.is_empty());
    }

    #[test]
    fn garbage_is_counted_and_an_unframeable_stream_is_given_up() {
        let mut s = Sftp::default();
        let mut out = Vec::new();
        // A reply to nothing, a truncated request, an unknown type: counted or ignored, never fatal.
        s.feed(Dir::Down, &status(77, 0), &mut out);
        s.feed(Dir::Up, &[0, 0, 0, 2, fxp::OPEN, 1], &mut out);
        s.feed(Dir::Up, &[0, 0, 0, 1, 250], &mut out);
        assert_eq!(s.unparsed, 1);
        assert!(!s.lost());
        // A write whose data length does not fit its packet.
        let bad = packet(fxp::WRITE, 2, |b| {
            string(b, b"h");
            b.extend_from_slice(&0u64.to_be_bytes());
            b.extend_from_slice(&999u32.to_be_bytes());
        });
        s.feed(Dir::Up, &bad, &mut out);
        assert_eq!(s.unparsed, 2);
        s.feed(Dir::Up, &[0xff, 0xff, 0xff, 0xff, 1, 2, 3], &mut out);
        assert!(s.lost());
        s.feed(Dir::Up, &[0, 0, 0, 5, 1, 0, 0, 0, 3], &mut out);
        assert!(out.is_empty());
    }
}
