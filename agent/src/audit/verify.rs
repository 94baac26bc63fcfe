//! `warden audit verify`: walks every file from the bytes on disk and finds the first record that breaks
//! the chain, the format or a checkpoint signature.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use ed25519_dalek::VerifyingKey;

use super::AuditError;
use super::files;
use super::format::{self, GENESIS_PREV};
use super::sign;

/// The first thing found wrong, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub file: PathBuf,
    /// 1-based line number in `file`.
    pub line: usize,
    pub seq: Option<u64>,
    pub what: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.file.display(), self.line)?;
        if let Some(seq) = self.seq {
            write!(f, " (seq {seq})")?;
        }
        write!(f, ": {}", self.what)
    }
}

/// What verify found. `problem` is `None` when every record is intact.
#[derive(Debug, Default)]
pub struct Report {
    pub files: usize,
    pub records: u64,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    pub hosts: BTreeSet<String>,
    pub checkpoints: u64,
    /// The last seq covered by a checkpoint (its signature checked when a public key was given).
    pub signed_through: Option<u64>,
    /// Records after the last checkpoint: intact, but not yet covered by a signature.
    pub unsigned_tail: u64,
    pub signatures_checked: bool,
    pub notes: Vec<String>,
    pub problem: Option<Problem>,
}

impl Report {
    pub fn intact(&self) -> bool {
        self.problem.is_none()
    }
}

struct Walk<'a> {
    /// The audit directory, when verifying one: terminal recordings (`ssh.recording`) are checked there.
    dir: Option<&'a Path>,
    pubkey: Option<&'a VerifyingKey>,
    key_id: Option<String>,
    report: Report,
    expected: Option<(u64, String)>,
    /// The chain starts after seq 0: (first seq, its prev, file, line) until a retention record explains it.
    start_gap: Option<(u64, String, PathBuf, usize)>,
}

/// Verifies every `*.jsonl` file in `dir`, in chain order.
pub fn verify_dir(dir: &Path, pubkey: Option<&VerifyingKey>) -> Result<Report, AuditError> {
    let paths = files::list_any(dir)?;
    let mut chain = Chain::new(pubkey);
    chain.walk.dir = Some(dir);
    chain.walk.report.files = paths.len();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.contains(".jsonl.torn-") {
                chain.note(format!(
                    "{name}: bytes cut from a torn file by crash recovery (not part of the chain)"
                ));
            }
        }
    }
    if paths.is_empty() {
        chain.walk.report.problem = Some(Problem {
            file: dir.to_path_buf(),
            line: 0,
            seq: None,
            what: "no audit files (*.jsonl) here; pass the audit directory with --dir".into(),
        });
        return Ok(chain.walk.report);
    }
    let count = paths.len();
    for (i, path) in paths.iter().enumerate() {
        let bytes = std::fs::read(path).map_err(|source| AuditError::io("read", path, source))?;
        if !chain.segment(path, &bytes, i + 1 == count) {
            break;
        }
    }
    Ok(chain.finish())
}

/// Verifies a chain fed one segment at a time, from any source (a directory, a bucket): the same checks
/// as [`verify_dir`]. Call [`Chain::segment`] in chain order, then [`Chain::finish`].
pub struct Chain<'a> {
    walk: Walk<'a>,
}

impl<'a> Chain<'a> {
    pub fn new(pubkey: Option<&'a VerifyingKey>) -> Self {
        Chain {
            walk: Walk {
                dir: None,
                pubkey,
                key_id: pubkey.map(sign::key_id),
                report: Report { signatures_checked: pubkey.is_some(), ..Report::default() },
                expected: None,
                start_gap: None,
            },
        }
    }

    /// Checks one segment's bytes (`name` is where it came from, for problems). `last`: the newest
    /// segment, whose final line may still be incomplete. Returns false once a problem is found (then
    /// stop feeding; [`Chain::finish`] reports it).
    pub fn segment(&mut self, name: &Path, bytes: &[u8], last: bool) -> bool {
        if self.walk.report.problem.is_some() {
            return false;
        }
        if let Err(p) = self.walk.file(name, bytes, last) {
            self.walk.report.problem = Some(p);
            return false;
        }
        true
    }

    /// Records a problem found outside the records (a missing segment, a lock not in place).
    pub fn fail(&mut self, problem: Problem) {
        if self.walk.report.problem.is_none() {
            self.walk.report.problem = Some(problem);
        }
    }

    pub fn note(&mut self, note: String) {
        self.walk.report.notes.push(note);
    }

    /// The seq and hash the next segment must start from (`None` before the first record).
    pub fn expected(&self) -> Option<(u64, &str)> {
        self.walk.expected.as_ref().map(|(s, h)| (*s, h.as_str()))
    }

    pub fn report(&self) -> &Report {
        &self.walk.report
    }

    pub fn report_mut(&mut self) -> &mut Report {
        &mut self.walk.report
    }

    /// Ends the walk: a chain that starts after seq 0 with nothing explaining it is a problem.
    pub fn finish(mut self) -> Report {
        if self.walk.report.problem.is_none()
            && let Some((seq, _, file, line)) = self.walk.start_gap.take()
        {
            self.walk.report.problem = Some(Problem {
                file,
                line,
                seq: Some(seq),
                what: format!(
                    "the chain starts at seq {seq}: records 0..={} are missing and no retention.deleted record accounts for them",
                    seq - 1
                ),
            });
        }
        self.walk.report
    }
}

impl Walk<'_> {
    fn file(&mut self, path: &Path, bytes: &[u8], last_file: bool) -> Result<(), Problem> {
        let mut offset = 0;
        let mut line_no = 0;
        while offset < bytes.len() {
            line_no += 1;
            let Some(end) = bytes[offset..].iter().position(|&b| b == b'\n') else {
                if last_file {
                    self.report.notes.push(format!(
                        "{}:{line_no}: the last line is incomplete (being written now, or torn by a crash; \
                         the daemon cuts it on its next start)",
                        path.display()
                    ));
                    return Ok(());
                }
                return Err(Problem {
                    file: path.to_path_buf(),
                    line: line_no,
                    seq: format::peek_seq(&bytes[offset..]),
                    what: "incomplete line (no newline) before the end of the chain".into(),
                });
            };
            self.line(path, line_no, &bytes[offset..offset + end])?;
            offset += end + 1;
        }
        Ok(())
    }

    fn line(&mut self, path: &Path, line_no: usize, bytes: &[u8]) -> Result<(), Problem> {
        let problem =
            |seq: Option<u64>, what: String| Problem { file: path.to_path_buf(), line: line_no, seq, what };
        let line = format::check_line(bytes).map_err(|e| problem(format::peek_seq(bytes), e.to_string()))?;
        let seq = line.seq;
        match &self.expected {
            None => {
                if seq == 0 && line.prev != GENESIS_PREV {
                    return Err(problem(
                        Some(seq),
                        "the first record's prev is not the SHA-256 of the empty string".into(),
                    ));
                }
                if seq > 0 {
                    self.start_gap = Some((seq, line.prev.clone(), path.to_path_buf(), line_no));
                }
                self.report.first_seq = Some(seq);
            }
            Some((want, want_prev)) => {
                if seq < *want {
                    return Err(problem(
                        Some(seq),
                        format!("seq {seq} where {want} was expected: a duplicated or reordered record"),
                    ));
                }
                if seq > *want {
                    return Err(problem(
                        Some(seq),
                        format!(
                            "seq {seq} where {want} was expected: records {want}..={} are missing here \
                             (deleted, moved, or in a removed file)",
                            seq - 1
                        ),
                    ));
                }
                if line.prev != *want_prev {
                    return Err(problem(
                        Some(seq),
                        format!(
                            "prev does not match the hash of seq {}: a record was inserted, altered or replaced",
                            want - 1
                        ),
                    ));
                }
            }
        }
        if line.event == "ssh.recording"
            && let Some(dir) = self.dir
        {
            check_recording(dir, &line).map_err(|what| problem(Some(seq), what))?;
        }
        if line.event == "checkpoint" {
            self.checkpoint(&line).map_err(|what| problem(Some(seq), what))?;
        } else {
            self.report.unsigned_tail += 1;
        }
        if line.event == "retention.deleted"
            && let Some((first, prev, _, _)) = &self.start_gap
            && line.u64_field("through_seq") == Some(first - 1)
            && line.str_field("through_hash") == Some(prev.as_str())
        {
            self.report.notes.push(format!(
                "records 0..={} were deleted by retention, as recorded at seq {seq}",
                first - 1
            ));
            self.start_gap = None;
        }
        self.report.records += 1;
        self.report.last_seq = Some(seq);
        self.report.hosts.insert(line.host.clone());
        self.expected = Some((seq + 1, line.hash));
        Ok(())
    }

    fn checkpoint(&mut self, line: &format::Line) -> Result<(), String> {
        let covers_seq = line.u64_field("covers_seq");
        let covers_hash = line.str_field("covers_hash");
        let (Some(covers_seq), Some(covers_hash), Some(time), Some(sig)) =
            (covers_seq, covers_hash, line.str_field("time"), line.str_field("sig"))
        else {
            return Err("checkpoint lacks covers_seq, covers_hash, time or sig".into());
        };
        if line.seq == 0 || covers_seq != line.seq - 1 || covers_hash != line.prev {
            return Err("checkpoint does not cover the record just before it".into());
        }
        if time != line.ts {
            return Err("checkpoint time differs from its ts".into());
        }
        if let Some(pubkey) = self.pubkey {
            if line.str_field("key") != self.key_id.as_deref() {
                return Err(format!(
                    "checkpoint is signed by key {} but the given public key is {}",
                    line.str_field("key").unwrap_or("(none)"),
                    self.key_id.as_deref().unwrap_or_default()
                ));
            }
            let message = sign::checkpoint_message(&line.host, covers_seq, covers_hash, time);
            if !sign::verify(pubkey, &message, sig) {
                return Err("checkpoint signature does not verify: a forged or altered checkpoint".into());
            }
        }
        self.report.checkpoints += 1;
        self.report.signed_through = Some(covers_seq);
        self.report.unsigned_tail = 0;
        Ok(())
    }
}

/// An `ssh.recording` record names a terminal recording (`file`, relative to the audit directory) and its
/// `sha256` and `bytes`: the file on disk must still hash to them.
fn check_recording(dir: &Path, line: &format::Line) -> Result<(), String> {
    let (Some(file), Some(want)) = (line.str_field("file"), line.str_field("sha256")) else {
        return Err("ssh.recording lacks file or sha256".into());
    };
    let rel = Path::new(file);
    if rel.is_absolute() || rel.components().any(|c| matches!(c, std::path::Component::ParentDir)) {
        return Err(format!("ssh.recording names {file:?}, outside the audit directory"));
    }
    let path = dir.join(rel);
    let (got, bytes) = files::hash_file(&path)
        .map_err(|e| format!("recording {} cannot be read ({e}): removed or moved", path.display()))?;
    if got != want || line.u64_field("bytes").is_some_and(|b| b != bytes) {
        return Err(format!(
            "recording {} does not match its record (sha256 {got}, {bytes} bytes): the recording was altered",
            path.display()
        ));
    }
    Ok(())
}
