//! Terminal recordings: asciicast v2 files under `audit.dir/recordings/` (0600), whose SHA-256 goes into
//! the audit chain (`ssh.recording`) when they close, and `warden audit replay`.
//!
//! Format (asciicast v2): a JSON header line `{"version":2,"width":W,"height":H,"timestamp":UNIX,"env":
//! {"TERM":...},"title":...}`, then one JSON array per event: `[seconds since start, "o" | "i" | "r",
//! data]`: `o` what the terminal printed, `i` what was typed, `r` a resize (`"COLSxROWS"`). Bytes that are
//! not UTF-8 are written as U+FFFD (the byte counts in the records are exact).

use std::fs::File;
use std::io::{BufRead as _, BufWriter, Write as _};
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;
use sha2::{Digest as _, Sha256};

/// The directory under the audit directory that holds recordings.
pub const DIR: &str = "recordings";

/// A recording being written.
pub struct Recording {
    out: BufWriter<File>,
    /// Relative to the audit directory, as recorded.
    name: String,
    hasher: Sha256,
    bytes: u64,
    started: Instant,
    /// An incomplete UTF-8 sequence carried to the next chunk, per stream (`o`, `i`).
    carry: [Vec<u8>; 2],
}

/// A closed recording, as `ssh.recording` records it.
#[derive(Debug, Clone)]
pub struct Closed {
    pub file: String,
    pub sha256: String,
    pub bytes: u64,
    pub duration_ms: u64,
}

impl std::fmt::Debug for Recording {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recording").field("file", &self.name).finish_non_exhaustive()
    }
}

impl Recording {
    /// Creates `audit_dir/recordings/SESSION-CHANNEL.cast` and writes the header.
    pub fn create(
        audit_dir: &Path,
        session: &str,
        channel: u32,
        size: (u32, u32),
        term: Option<&str>,
        title: &str,
    ) -> std::io::Result<Self> {
        let dir = audit_dir.join(DIR);
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&dir)?;
        let safe: String = session
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' })
            .collect();
        let name = format!("{DIR}/{safe}-{channel}.cast");
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(audit_dir.join(&name))?;
        let mut r = Self {
            out: BufWriter::with_capacity(64 * 1024, file),
            name,
            hasher: Sha256::new(),
            bytes: 0,
            started: Instant::now(),
            carry: [Vec::new(), Vec::new()],
        };
        let timestamp = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or_default();
        let mut header = serde_json::json!({
            "version": 2,
            "width": size.0.max(1),
            "height": size.1.max(1),
            "timestamp": timestamp,
            "title": title,
        });
        if let Some(term) = term {
            header["env"] = serde_json::json!({ "TERM": term });
        }
        r.line(&header.to_string())?;
        Ok(r)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    fn line(&mut self, text: &str) -> std::io::Result<()> {
        self.hasher.update(text.as_bytes());
        self.hasher.update(b"\n");
        self.bytes += text.len() as u64 + 1;
        self.out.write_all(text.as_bytes())?;
        self.out.write_all(b"\n")
    }

    fn event(&mut self, kind: &str, data: &str) -> std::io::Result<()> {
        let t = self.started.elapsed().as_secs_f64();
        let line = format!("[{t:.6},{},{}]", Value::from(kind), Value::from(data));
        self.line(&line)
    }

    fn stream(&mut self, which: usize, kind: &str, data: &[u8]) -> std::io::Result<()> {
        let mut bytes = std::mem::take(&mut self.carry[which]);
        bytes.extend_from_slice(data);
        let mut text = String::with_capacity(bytes.len());
        let mut rest = &bytes[..];
        loop {
            match std::str::from_utf8(rest) {
                Ok(s) => {
                    text.push_str(s);
                    break;
                }
                Err(e) => {
                    let (good, bad) = rest.split_at(e.valid_up_to());
                    text.push_str(std::str::from_utf8(good).unwrap_or_default());
                    if let Some(n) = e.error_len() {
                        text.push('\u{fffd}');
                        rest = &bad[n..];
                    } else {
                        self.carry[which] = bad.to_vec();
                        break;
                    }
                }
            }
        }
        if text.is_empty() { Ok(()) } else { self.event(kind, &text) }
    }

    /// What the terminal printed.
    pub fn output(&mut self, data: &[u8]) -> std::io::Result<()> {
        self.stream(0, "o", data)
    }

    /// What was typed.
    pub fn input(&mut self, data: &[u8]) -> std::io::Result<()> {
        self.stream(1, "i", data)
    }

    pub fn resize(&mut self, cols: u32, rows: u32) -> std::io::Result<()> {
        self.event("r", &format!("{cols}x{rows}"))
    }

    /// Flushes and syncs the file; what the chain records about it.
    pub fn close(mut self) -> std::io::Result<Closed> {
        for which in 0..2 {
            if !self.carry[which].is_empty() {
                let kind = if which == 0 { "o" } else { "i" };
                self.carry[which].clear();
                self.event(kind, "\u{fffd}")?;
            }
        }
        self.out.flush()?;
        self.out.get_ref().sync_all()?;
        let duration_ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        Ok(Closed {
            file: self.name.clone(),
            sha256: hex::encode(self.hasher.clone().finalize()),
            bytes: self.bytes,
            duration_ms,
        })
    }
}

pub use crate::audit::files::hash_file;

/// The recording an audit line names, if it is an `ssh.recording` record (for `audit export --recordings`).
pub fn named_in(line: &[u8]) -> Option<String> {
    const EVENT: &[u8] = b"\"event\":\"ssh.recording\"";
    if !line.windows(EVENT.len()).any(|w| w == EVENT) {
        return None;
    }
    let obj = serde_json::from_slice::<serde_json::Map<String, Value>>(line).ok()?;
    obj.get("file").and_then(Value::as_str).map(str::to_owned)
}

/// Copies recordings (paths relative to `audit_dir`, as recorded) to the same relative paths under `to`,
/// 0600. A name that leaves the audit directory is refused.
pub fn copy_recordings(audit_dir: &Path, files: &[String], to: &Path) -> Result<usize, String> {
    for file in files {
        let rel = Path::new(file);
        if rel.is_absolute() || rel.components().any(|c| matches!(c, std::path::Component::ParentDir)) {
            return Err(format!("an ssh.recording record names {file:?}, outside the audit directory"));
        }
        let dst = to.join(rel);
        crate::audit::files::private_parent(&dst)?;
        std::fs::copy(audit_dir.join(rel), &dst).map_err(|e| format!("cannot copy recording {file}: {e}"))?;
        std::fs::set_permissions(&dst, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .map_err(|e| format!("cannot chmod {}: {e}", dst.display()))?;
    }
    Ok(files.len())
}

/// One `ssh.recording` record of a session.
#[derive(Debug, Clone)]
pub struct Listed {
    pub channel: Option<u64>,
    pub path: PathBuf,
    pub sha256: String,
}

/// The recordings `session` has in the audit chain in `audit_dir`, in the order they closed.
pub fn recordings_of(audit_dir: &Path, session: &str) -> Result<Vec<Listed>, String> {
    let mut found = Vec::new();
    crate::audit::export_lines(audit_dir, None, None, |line| {
        if let Ok(obj) = serde_json::from_slice::<serde_json::Map<String, Value>>(line)
            && obj.get("event").and_then(Value::as_str) == Some("ssh.recording")
            && obj.get("session").and_then(Value::as_str) == Some(session)
            && let (Some(file), Some(sha)) =
                (obj.get("file").and_then(Value::as_str), obj.get("sha256").and_then(Value::as_str))
        {
            found.push(Listed {
                channel: obj.get("channel").and_then(Value::as_u64),
                path: audit_dir.join(file),
                sha256: sha.to_owned(),
            });
        }
        Ok(())
    })
    .map_err(|e| e.to_string())?;
    Ok(found)
}

/// `warden audit replay SESSION [--speed N]`: plays each of the session's recordings to `out` with its
/// timing divided by `speed` (`0`: all at once). A recording whose hash differs from its record is not
/// played.
pub fn replay(
    audit_dir: &Path,
    session: &str,
    speed: f64,
    out: &mut dyn std::io::Write,
) -> Result<(), String> {
    let listed = recordings_of(audit_dir, session)?;
    if listed.is_empty() {
        return Err(format!(
            "session {session:?} has no terminal recording in {} (only ssh shells and PTY commands are recorded)",
            audit_dir.display()
        ));
    }
    for rec in &listed {
        let (sha, _) =
            hash_file(&rec.path).map_err(|e| format!("cannot read recording {}: {e}", rec.path.display()))?;
        if sha != rec.sha256 {
            return Err(format!(
                "recording {} does not match the SHA-256 in the audit record (it was altered); \
                 run `warden audit verify`",
                rec.path.display()
            ));
        }
        let file = File::open(&rec.path).map_err(|e| format!("cannot open {}: {e}", rec.path.display()))?;
        let mut last = 0.0f64;
        for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
            let line = line.map_err(|e| format!("cannot read {}: {e}", rec.path.display()))?;
            if i == 0 {
                continue;
            }
            let Ok(Value::Array(ev)) = serde_json::from_str::<Value>(&line) else { continue };
            let (Some(t), Some(kind), Some(data)) = (
                ev.first().and_then(Value::as_f64),
                ev.get(1).and_then(Value::as_str),
                ev.get(2).and_then(Value::as_str),
            ) else {
                continue;
            };
            if kind != "o" {
                continue;
            }
            if speed > 0.0 && t > last {
                out.flush().map_err(|e| e.to_string())?;
                std::thread::sleep(std::time::Duration::from_secs_f64(((t - last) / speed).min(60.0)));
            }
            last = t;
            out.write_all(data.as_bytes()).map_err(|e| format!("cannot write: {e}"))?;
        }
        out.flush().map_err(|e| e.to_string())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recording_is_asciicast_v2_and_its_hash_is_the_files() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = Recording::create(dir.path(), "s-1", 0, (80, 24), Some("xterm"), "shell").unwrap();
        r.output(b"$ ").unwrap();
        r.input(b"echo hi\r").unwrap();
        // A UTF-8 sequence split across chunks stays whole; a bad byte becomes U+FFFD.
        r.output(&"é".as_bytes()[..1]).unwrap();
        r.output(&"é".as_bytes()[1..]).unwrap();
        r.output(b"\xff!").unwrap();
        r.resize(100, 30).unwrap();
        let closed = r.close().unwrap();
        assert_eq!(closed.file, "recordings/s-1-0.cast");
        let path = dir.path().join(&closed.file);
        assert_eq!(hash_file(&path).unwrap(), (closed.sha256.clone(), closed.bytes));
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines[0]["version"], 2);
        assert_eq!(lines[0]["width"], 80);
        assert_eq!(lines[0]["env"]["TERM"], "xterm");
        let events: Vec<(String, String)> = lines[1..]
            .iter()
            .map(|e| (e[1].as_str().unwrap().to_owned(), e[2].as_str().unwrap().to_owned()))
            .collect();
        let want = [("o", "$ "), ("i", "echo hi\r"), ("o", "é"), ("o", "\u{fffd}!"), ("r", "100x30")];
        assert_eq!(events, want.map(|(a, b)| (a.to_owned(), b.to_owned())));
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&path).unwrap().permissions()) & 0o777,
            0o600
        );
    }
}
