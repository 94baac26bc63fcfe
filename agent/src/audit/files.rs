//! The audit directory: file names, listing in chain order, the export mark, and streaming lines out.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::AuditError;
use super::format::{peek_seq, peek_ts};

/// The name of the file whose first record has `seq`: `audit-<seq, 20 digits>.jsonl`.
pub fn file_name(seq: u64) -> String {
    format!("audit-{seq:020}.jsonl")
}

/// The writer's files (`audit-<seq>.jsonl`), ordered by the seq in their name.
pub fn list_writer_files(dir: &Path) -> Result<Vec<(u64, PathBuf)>, AuditError> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|source| AuditError::io("list", dir, source))? {
        let entry = entry.map_err(|source| AuditError::io("list", dir, source))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(digits) = name.strip_prefix("audit-").and_then(|n| n.strip_suffix(".jsonl")) else {
            continue;
        };
        if digits.len() == 20
            && let Ok(seq) = digits.parse::<u64>()
        {
            out.push((seq, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// Every `*.jsonl` file in `dir` (the writer's, or an auditor's saved pulls), ordered by the `seq` of its
/// first line, then by name. Files whose first line has no readable seq sort last, so verify reports them.
pub fn list_any(dir: &Path) -> Result<Vec<PathBuf>, AuditError> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|source| AuditError::io("list", dir, source))? {
        let entry = entry.map_err(|source| AuditError::io("list", dir, source))?;
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "jsonl") && path.is_file() {
            let mut first = Vec::new();
            let file = File::open(&path).map_err(|source| AuditError::io("open", &path, source))?;
            BufReader::new(file)
                .read_until(b'\n', &mut first)
                .map_err(|source| AuditError::io("read", &path, source))?;
            out.push((peek_seq(&first).unwrap_or(u64::MAX), path));
        }
    }
    out.sort();
    Ok(out.into_iter().map(|(_, p)| p).collect())
}

/// Where the export mark lives: the highest seq an auditor has confirmed, as decimal text.
pub const EXPORTED_FILE: &str = "exported";

/// The highest seq confirmed exported, if any.
pub fn read_exported(dir: &Path) -> Result<Option<u64>, AuditError> {
    read_mark(dir, EXPORTED_FILE)
}

/// Raises the export mark to `seq` (never lowers it); written atomically.
pub fn mark_exported(dir: &Path, seq: u64) -> Result<(), AuditError> {
    write_mark(dir, EXPORTED_FILE, seq)
}

/// Where the ship mark lives: the last seq of the newest segment shipped to object storage, as decimal
/// text. Segments are shipped in order, so every record at or below it is in the bucket.
pub const SHIPPED_FILE: &str = "shipped";

/// The highest seq shipped to object storage, if any.
pub fn read_shipped(dir: &Path) -> Result<Option<u64>, AuditError> {
    read_mark(dir, SHIPPED_FILE)
}

/// Raises the ship mark to `seq` (never lowers it); written atomically.
pub fn mark_shipped(dir: &Path, seq: u64) -> Result<(), AuditError> {
    write_mark(dir, SHIPPED_FILE, seq)
}

fn read_mark(dir: &Path, name: &str) -> Result<Option<u64>, AuditError> {
    let path = dir.join(name);
    match std::fs::read_to_string(&path) {
        Ok(text) => text.trim().parse().map(Some).map_err(|_| AuditError::Corrupt {
            path,
            reason: format!("expected a decimal sequence number; delete the file to forget what was {name}"),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(AuditError::io("read", &path, source)),
    }
}

fn write_mark(dir: &Path, name: &str, seq: u64) -> Result<(), AuditError> {
    if read_mark(dir, name)?.is_some_and(|old| old >= seq) {
        return Ok(());
    }
    let path = dir.join(name);
    let tmp = dir.join(format!(".{name}.{}", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut f =
            std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
        writeln!(f, "{seq}")?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        File::open(dir).and_then(|d| d.sync_all())
    };
    write().map_err(|source| AuditError::io("write", &path, source))
}

/// One end of an export range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bound {
    Seq(u64),
    Time(OffsetDateTime),
}

impl std::str::FromStr for Bound {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Ok(seq) = s.parse() {
            return Ok(Bound::Seq(seq));
        }
        OffsetDateTime::parse(s, &Rfc3339)
            .map(Bound::Time)
            .map_err(|_| format!("{s:?} is neither a sequence number nor an RFC 3339 time"))
    }
}

fn line_after(line: &[u8], bound: &Bound) -> bool {
    match bound {
        Bound::Seq(s) => peek_seq(line).is_some_and(|seq| seq >= *s),
        Bound::Time(t) => {
            peek_ts(line).and_then(|ts| OffsetDateTime::parse(ts, &Rfc3339).ok()).is_some_and(|ts| ts >= *t)
        }
    }
}

fn line_before(line: &[u8], bound: &Bound) -> bool {
    match bound {
        Bound::Seq(s) => peek_seq(line).is_some_and(|seq| seq <= *s),
        Bound::Time(t) => {
            peek_ts(line).and_then(|ts| OffsetDateTime::parse(ts, &Rfc3339).ok()).is_some_and(|ts| ts <= *t)
        }
    }
}

/// Calls `out` with every complete line (newline included, the exact bytes on disk) of the writer's files
/// in `dir` within `since..=until`. A trailing line still being written (no newline yet) is left out.
/// Returns the seq of the last line passed to `out`.
pub fn export_lines(
    dir: &Path,
    since: Option<&Bound>,
    until: Option<&Bound>,
    mut out: impl FnMut(&[u8]) -> std::io::Result<()>,
) -> Result<Option<u64>, AuditError> {
    let files = list_writer_files(dir)?;
    let mut last = None;
    for (i, (_, path)) in files.iter().enumerate() {
        // A file is wholly before `since` when the next one starts at or before it.
        if let (Some(Bound::Seq(s)), Some((next, _))) = (since, files.get(i + 1))
            && *next <= *s
        {
            continue;
        }
        if let (Some(Bound::Seq(u)), Some((first, _))) = (until, files.get(i))
            && *first > *u
        {
            break;
        }
        let file = match File::open(path) {
            Ok(f) => f,
            // Retention may delete a file between listing and opening.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(source) => return Err(AuditError::io("open", path, source)),
        };
        let reader = BufReader::with_capacity(256 * 1024, file);
        match filter_lines(reader, path, since, until, &mut out, &mut last)? {
            Flow::Continue => {}
            Flow::Stop => return Ok(last),
        }
    }
    Ok(last)
}

/// Whether [`filter_lines`] reached the `until` bound (stop) or the end of its input (continue).
pub enum Flow {
    Continue,
    Stop,
}

/// Passes every complete line of `reader` within `since..=until` to `out` and keeps `last` at the seq of the
/// last line passed. `name` names the input in errors. A trailing line with no newline is left out.
pub fn filter_lines(
    mut reader: impl BufRead,
    name: &Path,
    since: Option<&Bound>,
    until: Option<&Bound>,
    out: &mut impl FnMut(&[u8]) -> std::io::Result<()>,
    last: &mut Option<u64>,
) -> Result<Flow, AuditError> {
    let mut line = Vec::with_capacity(512);
    loop {
        line.clear();
        let n = reader.read_until(b'\n', &mut line).map_err(|source| AuditError::io("read", name, source))?;
        if n == 0 || line.last() != Some(&b'\n') {
            return Ok(Flow::Continue);
        }
        if since.is_some_and(|b| !line_after(&line, b)) {
            continue;
        }
        if until.is_some_and(|b| !line_before(&line, b)) {
            if matches!(until, Some(Bound::Seq(_))) {
                return Ok(Flow::Stop);
            }
            continue;
        }
        out(&line).map_err(|source| AuditError::io("write", Path::new("the output"), source))?;
        *last = peek_seq(&line).or(*last);
    }
}

/// The SHA-256 (hex) and size of a file (a terminal recording the chain names).
pub fn hash_file(path: &Path) -> std::io::Result<(String, u64)> {
    use sha2::Digest as _;
    let mut f = std::fs::File::open(path)?;
    let mut h = sha2::Sha256::new();
    let n = std::io::copy(&mut f, &mut h)?;
    Ok((hex::encode(h.finalize()), n))
}

/// The terminal recordings (`file` of each `ssh.recording` record, relative to the audit directory) that a
/// segment's chain holds the hash of: retention deletes them with the segment, never before. Names
/// outside the audit directory's `recordings/` are skipped (never deleted).
pub fn recordings_named(segment: &Path) -> Result<Vec<String>, AuditError> {
    let file = File::open(segment).map_err(|source| AuditError::io("open", segment, source))?;
    let mut out = Vec::new();
    for line in BufReader::new(file).lines() {
        let line = line.map_err(|source| AuditError::io("read", segment, source))?;
        if !line.contains("\"ssh.recording\"") {
            continue;
        }
        let Ok(serde_json::Value::Object(m)) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        if m.get("event").and_then(|e| e.as_str()) != Some("ssh.recording") {
            continue;
        }
        if let Some(name) = m.get("file").and_then(|f| f.as_str())
            && recording_path_ok(name)
        {
            out.push(name.to_owned());
        }
    }
    Ok(out)
}

/// Creates the missing parent directories of `path`, readable by their owner only (0700).
pub fn private_parent(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::DirBuilderExt as _;
    let Some(parent) = path.parent() else { return Ok(()) };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(parent)
        .map_err(|e| format!("cannot create {}: {e}", parent.display()))
}

/// Writes `bytes` to `path` readable by its owner only (0600), creating missing parent directories (0700).
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<(), String> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    private_parent(path)?;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(bytes))
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// Whether a recording name stays inside `recordings/` of the audit directory.
pub fn recording_path_ok(name: &str) -> bool {
    let rel = Path::new(name);
    rel.starts_with("recordings") && rel.components().all(|c| matches!(c, std::path::Component::Normal(_)))
}
