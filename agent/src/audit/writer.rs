//! The single writer: owns the current file, the chain state and the signing key; recovers on start,
//! group-commits batches with one fdatasync, rotates, signs checkpoints and applies retention.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ed25519_dalek::SigningKey;
use serde::Serialize;
use serde_json::{Map, Value};
use time::{Date, OffsetDateTime};

use super::files::{self, file_name};
use super::format::{self, GENESIS_PREV, RESERVED};
use super::{AuditError, Clock, Record, sign};
use crate::metrics::SetupStep;
use crate::timestamp::format as format_ts;

/// What `Writer::open` found and repaired, reported in a `recovered` record.
#[derive(Debug, Default)]
pub struct Recovery {
    /// The last record before this start was not `audit.stopped`: the previous run did not shut down cleanly.
    pub unclean: bool,
    /// Bytes cut from the end of the newest file(s) (a torn or invalid tail) and where they were saved,
    /// newest file first. A newest file left with no valid record is removed and its predecessor checked too.
    pub cuts: Vec<Cut>,
}

#[derive(Debug)]
pub struct Cut {
    pub file: PathBuf,
    pub bytes: u64,
    pub saved_to: PathBuf,
    pub reason: String,
    pub last_good_seq: Option<u64>,
}

impl Cut {
    /// How a cut is written into `recovered` (`also_cut`) and `audit.resumed` (`cut`).
    pub fn to_json(&self) -> Value {
        serde_json::json!({
            "file": self.file.display().to_string(),
            "cut_bytes": self.bytes,
            "saved_to": self.saved_to.display().to_string(),
            "reason": self.reason,
            "last_good_seq": self.last_good_seq,
        })
    }
}

pub struct Settings {
    pub dir: PathBuf,
    pub host: String,
    pub max_file_bytes: u64,
    pub retain_days: u32,
    pub retain_until_exported: bool,
    pub checkpoint_records: u64,
    pub clock: Clock,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Shipping to object storage is on: every sealed file ends with a checkpoint, a start never appends to
    /// a file written before it (a sealed file may already be in the bucket), and retention deletes only
    /// shipped files.
    pub ship: bool,
}

pub struct Writer {
    /// An exclusive flock on `audit.dir/.lock`, held for the writer's life: one writer per directory.
    _lock: nix::fcntl::Flock<File>,
    s: Settings,
    key: SigningKey,
    key_id: String,
    file: File,
    path: PathBuf,
    file_len: u64,
    file_day: Date,
    next_seq: u64,
    prev: String,
    /// Records written since the last checkpoint (checkpoints themselves not counted).
    unsigned: u64,
    buf: Vec<u8>,
    /// Written but not yet fdatasync'd (a batch nobody waited on).
    dirty: bool,
    /// Records encoded into `buf` since the last write (for the metrics).
    buffered: u64,
    /// The last checkpoint: its seq and time.
    last_checkpoint: Option<(u64, String)>,
    /// Records in the current file other than checkpoints and `audit.shipped`: whether sealing it now
    /// would ship anything new (so a quiet host does not ship a file per interval of its own bookkeeping).
    content: u64,
    /// Files sealed (rotated away from) since the writer opened.
    sealed: u64,
}

/// Where the chain stands, for `warden status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Head {
    /// The last record's seq and hash (`None` before the first record).
    pub seq: Option<u64>,
    pub hash: Option<String>,
    /// The last checkpoint record: its own seq and time.
    pub checkpoint_seq: Option<u64>,
    pub checkpoint_time: Option<String>,
}

/// The outcome of one batch: a result per record, in order, and the reason the writer must stop, if any.
pub struct BatchOutcome {
    pub results: Vec<Result<u64, AuditError>>,
    pub fatal: Option<String>,
    /// The batch's records, given back so that those not written can be held and written again.
    pub records: Vec<Record>,
}

impl Writer {
    /// Opens the directory, recovers the newest file and positions the chain after its last good record.
    pub fn open(s: Settings, key: SigningKey) -> Result<(Self, Recovery), AuditError> {
        create_dir(&s.dir)?;
        let lock = lock_dir(&s.dir)?;
        let mut recovery = Recovery::default();
        let (tail, cuts) = find_tail(&s.dir, &s.clock)?;
        recovery.cuts = cuts;
        let now = (s.clock)();
        let key_id = sign::key_id(&key.verifying_key());
        let last_checkpoint = tail.as_ref().and_then(|t| t.scan.last_checkpoint.clone());
        let (file, path, file_len, next_seq, prev, unsigned) = if let Some(t) = tail {
            let last = t.scan.last.as_ref().map(|l| (l.seq, l.hash.clone()));
            let (seq, hash) = last.unwrap_or((0, GENESIS_PREV.to_owned()));
            recovery.unclean = t.scan.last_event.as_deref() != Some("audit.stopped");
            let file = OpenOptions::new()
                .append(true)
                .open(&t.path)
                .map_err(|source| AuditError::io("open", &t.path, source))?;
            (file, t.path, t.len, seq + 1, hash, t.scan.unsigned)
        } else {
            let path = s.dir.join(file_name(0));
            let file = create_file(&path)?;
            sync_dir(&s.dir)?;
            (file, path, 0, 0, GENESIS_PREV.to_owned(), 0)
        };
        let file_day = file_day(&path, now);
        let mut w = Writer {
            _lock: lock,
            s,
            key,
            key_id,
            file,
            path,
            file_len,
            file_day,
            next_seq,
            prev,
            unsigned,
            buf: Vec::with_capacity(64 * 1024),
            dirty: false,
            buffered: 0,
            last_checkpoint,
            content: 0,
            sealed: 0,
        };
        if w.s.ship && w.file_len > 0 {
            // The newest file may have been sealed and shipped before a crash; never append to it.
            if w.unsigned > 0 {
                let mut buf = Vec::new();
                w.checkpoint(&mut buf, now);
                w.flush(&mut buf, true).map_err(|reason| AuditError::Stopped { reason })?;
            }
            w.new_file(now).map_err(|reason| AuditError::Stopped { reason })?;
        }
        Ok((w, recovery))
    }

    /// Writes a batch, rotating and checkpointing as needed; one fdatasync per file touched.
    /// Writes a batch. With `sync` it is durable (fdatasync'd, with anything written before it) when this
    /// returns; without, it is written (it survives the process) and left for a later [`Writer::sync`].
    pub fn write_batch(&mut self, records: Vec<Record>, force_checkpoint: bool, sync: bool) -> BatchOutcome {
        let mut results: Vec<Result<u64, AuditError>> = Vec::with_capacity(records.len());
        let mut pending: Vec<usize> = Vec::new();
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        let fail = |results: &mut Vec<Result<u64, AuditError>>, pending: &[usize], reason: &str| {
            for &i in pending {
                results[i] = Err(AuditError::Stopped { reason: reason.to_owned() });
            }
        };
        let mut records = records;
        for i in 0..records.len() {
            if let Some(key) = records[i].fields.keys().find(|k| RESERVED.contains(&k.as_str())) {
                results.push(Err(AuditError::ReservedField { field: key.clone() }));
                continue;
            }
            let now = (self.s.clock)();
            if self.needs_rotation(now, buf.len()) {
                if self.s.ship && self.unsigned > 0 {
                    self.checkpoint(&mut buf, now);
                }
                if let Err(reason) = self.flush(&mut buf, true) {
                    fail(&mut results, &pending, &reason);
                    self.buf = buf;
                    return BatchOutcome { results, fatal: Some(reason), records };
                }
                pending.clear();
                if let Err(reason) = self.rotate(now, &mut buf) {
                    results.push(Err(AuditError::Stopped { reason: reason.clone() }));
                    self.buf = buf;
                    return BatchOutcome { results, fatal: Some(reason), records };
                }
            }
            let (event, shared, fields) = records[i].parts();
            let shipped = event == "audit.shipped";
            match self.encode(&mut buf, now, event, shared, fields) {
                Ok(seq) => {
                    pending.push(results.len());
                    results.push(Ok(seq));
                    self.unsigned += 1;
                    if !shipped {
                        self.content += 1;
                    }
                }
                Err(e) => results.push(Err(AuditError::Encode { reason: e.to_string() })),
            }
            if self.s.checkpoint_records > 0 && self.unsigned >= self.s.checkpoint_records {
                self.checkpoint(&mut buf, now);
            }
        }
        if force_checkpoint && self.unsigned > 0 {
            let now = (self.s.clock)();
            self.checkpoint(&mut buf, now);
        }
        let fatal = self.flush(&mut buf, sync).err();
        if let Some(reason) = &fatal {
            fail(&mut results, &pending, reason);
        }
        self.buf = buf;
        BatchOutcome { results, fatal, records }
    }

    fn needs_rotation(&self, now: OffsetDateTime, pending: usize) -> bool {
        let len = self.file_len + pending as u64;
        len > 0
            && (now.date() != self.file_day || (self.s.max_file_bytes > 0 && len >= self.s.max_file_bytes))
    }

    /// Serialises one record into `buf` and advances the chain. The chain only moves when encoding succeeded.
    fn encode(
        &mut self,
        buf: &mut Vec<u8>,
        now: OffsetDateTime,
        event: &str,
        shared: &[u8],
        fields: &Map<String, Value>,
    ) -> Result<u64, serde_json::Error> {
        let ts = format_ts(now);
        let (line, hash) =
            format::encode_with(self.next_seq, &ts, &self.s.host, event, shared, fields, &self.prev)?;
        buf.extend_from_slice(&line);
        buf.push(b'\n');
        let seq = self.next_seq;
        self.next_seq += 1;
        self.prev = hash;
        self.buffered += 1;
        if event == "checkpoint" {
            self.last_checkpoint = Some((seq, ts));
        }
        Ok(seq)
    }

    /// Appends a signed checkpoint covering the record just before it.
    fn checkpoint(&mut self, buf: &mut Vec<u8>, now: OffsetDateTime) {
        if self.next_seq == 0 {
            return;
        }
        let covers_seq = self.next_seq - 1;
        let time = format_ts(now);
        let message = sign::checkpoint_message(&self.s.host, covers_seq, &self.prev, &time);
        let mut fields = Map::new();
        fields.insert("covers_seq".into(), Value::from(covers_seq));
        fields.insert("covers_hash".into(), Value::from(self.prev.clone()));
        fields.insert("time".into(), Value::from(time));
        fields.insert("key".into(), Value::from(self.key_id.clone()));
        fields.insert("sig".into(), Value::from(sign::sign(&self.key, &message)));
        if self.encode(buf, now, "checkpoint", b"", &fields).is_ok() {
            self.unsigned = 0;
        }
    }

    /// Writes `buf` to the current file and, with `sync`, makes it (and anything written before) durable.
    /// On failure the file is cut back to its last written length so no half batch stays behind, and the
    /// reason is returned.
    fn flush(&mut self, buf: &mut Vec<u8>, sync: bool) -> Result<(), String> {
        if buf.is_empty() {
            return if sync { self.sync() } else { Ok(()) };
        }
        let records = std::mem::take(&mut self.buffered);
        let result = self.file.write_all(buf).and_then(|()| if sync { self.timed_sync() } else { Ok(()) });
        match result {
            Ok(()) => {
                self.s.metrics.audit_written(records, buf.len() as u64);
                if sync {
                    self.s.metrics.audit_batch(records);
                }
                self.file_len += buf.len() as u64;
                self.dirty = !sync;
                buf.clear();
                Ok(())
            }
            Err(e) => {
                let _ = self.file.set_len(self.file_len).and_then(|()| self.file.sync_data());
                buf.clear();
                Err(format!("cannot write {}: {e}", self.path.display()))
            }
        }
    }

    /// Makes everything written so far durable.
    pub fn sync(&mut self) -> Result<(), String> {
        if !self.dirty {
            return Ok(());
        }
        self.timed_sync().map_err(|e| format!("cannot sync {}: {e}", self.path.display()))?;
        self.dirty = false;
        Ok(())
    }

    /// fdatasync, timed for the metrics.
    fn timed_sync(&self) -> std::io::Result<()> {
        let started = std::time::Instant::now();
        #[cfg(test)]
        test_hook::before_sync(&self.s.dir)?;
        let r = self.file.sync_data();
        self.s.metrics.audit_synced(started.elapsed());
        r
    }

    /// The writer's clock, now.
    pub fn now(&self) -> OffsetDateTime {
        (self.s.clock)()
    }

    /// Counts, for the set-up breakdown, how long each durable record of a batch that started at `started`
    /// waited in the queue, and how long the batch took.
    pub fn timed(&self, queued: &[std::time::Instant], started: std::time::Instant) {
        let batch = started.elapsed();
        for q in queued {
            self.s.metrics.setup_step(SetupStep::Queue, started.saturating_duration_since(*q));
            self.s.metrics.setup_step(SetupStep::Batch, batch);
        }
    }

    /// Where the chain stands now.
    pub fn head(&self) -> Head {
        let last = self.next_seq.checked_sub(1);
        Head {
            seq: last,
            hash: last.map(|_| self.prev.clone()),
            checkpoint_seq: self.last_checkpoint.as_ref().map(|c| c.0),
            checkpoint_time: self.last_checkpoint.as_ref().map(|c| c.1.clone()),
        }
    }

    /// After a failed write: finds where the chain really stands on disk and continues from there. The
    /// newest file is checked again from its start (a torn tail is cut and kept beside it, an empty file a
    /// failed rotation left is removed), the chain state is taken from its last good record, and the file
    /// is opened again. With shipping on, a non-empty file is sealed and a new one started, as at start.
    /// Returns what was cut. On failure nothing changed; call it again later.
    pub fn reposition(&mut self) -> Result<Vec<Cut>, String> {
        let (tail, cuts) = find_tail(&self.s.dir, &self.s.clock).map_err(|e| e.to_string())?;
        let Some(t) = tail else {
            return Err(format!("no valid audit record is left in {}", self.s.dir.display()));
        };
        let Some(last) = t.scan.last.as_ref() else {
            return Err("the newest audit file has no record".into());
        };
        let file = OpenOptions::new()
            .append(true)
            .open(&t.path)
            .map_err(|e| format!("cannot open {}: {e}", t.path.display()))?;
        let now = (self.s.clock)();
        if t.path != self.path {
            self.file_day = file_day(&t.path, now);
            self.content = 0;
        }
        self.file = file;
        self.next_seq = last.seq + 1;
        self.prev.clone_from(&last.hash);
        self.path = t.path;
        self.file_len = t.len;
        self.unsigned = t.scan.unsigned;
        self.last_checkpoint = t.scan.last_checkpoint;
        self.dirty = false;
        self.buffered = 0;
        if self.s.ship && self.file_len > 0 {
            let mut buf = Vec::new();
            if self.unsigned > 0 {
                self.checkpoint(&mut buf, now);
            }
            self.flush(&mut buf, true)?;
            self.new_file(now)?;
        }
        Ok(cuts)
    }

    /// Whether records were written but not yet made durable.
    pub fn is_dirty(&self) -> bool {
        self.dirty
    }

    /// Starts a new file named after the next seq, then applies retention (which may add a record to `buf`).
    fn rotate(&mut self, now: OffsetDateTime, buf: &mut Vec<u8>) -> Result<(), String> {
        self.new_file(now)?;
        self.retention(now, buf);
        Ok(())
    }

    /// Seals the current file now when it holds anything but checkpoints and `audit.shipped` records:
    /// signs what is unsigned (with shipping on), makes it durable, and starts a new file. Returns whether
    /// it sealed.
    pub fn seal(&mut self) -> Result<bool, String> {
        if self.content == 0 || self.file_len == 0 {
            return Ok(false);
        }
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        let now = (self.s.clock)();
        if self.s.ship && self.unsigned > 0 {
            self.checkpoint(&mut buf, now);
        }
        let result = self.flush(&mut buf, true).and_then(|()| self.rotate(now, &mut buf));
        let result = result.and_then(|()| self.flush(&mut buf, true));
        self.buf = buf;
        result.map(|()| true)
    }

    /// How many files this writer has sealed (rotated away from).
    pub fn sealed(&self) -> u64 {
        self.sealed
    }

    fn new_file(&mut self, now: OffsetDateTime) -> Result<(), String> {
        let path = self.s.dir.join(file_name(self.next_seq));
        let file = create_file(&path).map_err(|e| e.to_string())?;
        sync_dir(&self.s.dir).map_err(|e| e.to_string())?;
        self.file = file;
        self.path = path;
        self.file_len = 0;
        self.file_day = now.date();
        self.content = 0;
        self.sealed += 1;
        Ok(())
    }

    /// Deletes the oldest rotated files that are past `retain_days` (and, with `retain_until_exported`,
    /// wholly exported), oldest first and never leaving a hole, and records what it deleted.
    /// Applies retention now (at start) and writes its record, if any.
    pub fn retain_now(&mut self) -> Result<(), String> {
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        let now = (self.s.clock)();
        self.retention(now, &mut buf);
        let result = self.flush(&mut buf, true);
        self.buf = buf;
        result
    }

    fn retention(&mut self, now: OffsetDateTime, buf: &mut Vec<u8>) {
        if self.s.retain_days == 0 {
            return;
        }
        let Ok(listed) = files::list_writer_files(&self.s.dir) else { return };
        // With shipping on, only shipped files may go (shipped counts as exported).
        let read_mark = if self.s.ship { files::read_shipped } else { files::read_exported };
        let exported = match read_mark(&self.s.dir) {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(error = %e, "audit retention skipped");
                return;
            }
        };
        let cutoff = now - Duration::from_secs(u64::from(self.s.retain_days) * 86_400);
        let mut deleted = Vec::new();
        let mut recordings = Vec::new();
        let mut through: Option<(u64, PathBuf)> = None;
        for pair in listed.windows(2) {
            let ((_, path), (next_first, next_path)) = (&pair[0], &pair[1]);
            if *path == self.path {
                break;
            }
            let old_enough = std::fs::metadata(path)
                .and_then(|m| m.modified())
                .is_ok_and(|m| OffsetDateTime::from(m) < cutoff);
            let last_seq = next_first.saturating_sub(1);
            let exported_ok =
                (!self.s.retain_until_exported && !self.s.ship) || exported.is_some_and(|e| e >= last_seq);
            if !old_enough || !exported_ok {
                break;
            }
            // The recordings whose hashes this segment's chain holds go with it (after it: a crash in
            // between leaves a recording no record names, never a record whose recording is gone).
            let named = match files::recordings_named(path) {
                Ok(n) => n,
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "audit retention cannot read a file");
                    break;
                }
            };
            if let Err(e) = std::fs::remove_file(path) {
                tracing::warn!(path = %path.display(), error = %e, "audit retention cannot delete a file");
                break;
            }
            for name in named {
                let rec = self.s.dir.join(&name);
                match std::fs::remove_file(&rec) {
                    Ok(()) => recordings.push(name),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => {
                        tracing::warn!(path = %rec.display(), error = %e, "audit retention cannot delete a recording");
                    }
                }
            }
            deleted.push(path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default());
            through = Some((last_seq, next_path.clone()));
        }
        let Some((through_seq, next_path)) = through else { return };
        let _ = sync_dir(&self.s.dir);
        // The first record of the oldest kept file links to the last deleted record.
        let through_hash = first_prev(&next_path).unwrap_or_default();
        let mut fields = Map::new();
        fields.insert("files".into(), Value::from(deleted));
        fields.insert("through_seq".into(), Value::from(through_seq));
        fields.insert("through_hash".into(), Value::from(through_hash));
        fields.insert("retain_days".into(), Value::from(self.s.retain_days));
        if !recordings.is_empty() {
            fields.insert("recordings".into(), Value::from(recordings));
        }
        if self.encode(buf, now, "retention.deleted", b"", &fields).is_ok() {
            self.unsigned += 1;
            self.content += 1;
        }
    }
}

struct Tail {
    path: PathBuf,
    len: u64,
    scan: Scan,
}

struct Scan {
    total_len: u64,
    good_len: u64,
    last: Option<format::Line>,
    last_event: Option<String>,
    unsigned: u64,
    bad_reason: Option<String>,
    last_checkpoint: Option<(u64, String)>,
}

/// Finds the newest file with a valid record: cuts an invalid tail (kept beside the file), removes a newest
/// file left with no valid record and goes on to its predecessor. `None` when no file holds a record.
fn find_tail(dir: &Path, clock: &Clock) -> Result<(Option<Tail>, Vec<Cut>), AuditError> {
    let mut cuts = Vec::new();
    let mut listed = files::list_writer_files(dir)?;
    while let Some((_, path)) = listed.last().cloned() {
        let scan = scan_file(&path)?;
        if scan.good_len < scan.total_len {
            cuts.push(cut_tail(&path, &scan, clock)?);
        }
        if scan.last.is_some() {
            return Ok((Some(Tail { path, len: scan.good_len, scan }), cuts));
        }
        // Nothing valid in the newest file: drop it and continue from its predecessor.
        std::fs::remove_file(&path).map_err(|source| AuditError::io("remove", &path, source))?;
        listed.pop();
    }
    Ok((None, cuts))
}

/// Reads a file and finds the longest prefix of whole, valid, chained lines.
fn scan_file(path: &Path) -> Result<Scan, AuditError> {
    let mut bytes = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .map_err(|source| AuditError::io("read", path, source))?;
    let mut scan = Scan {
        total_len: bytes.len() as u64,
        good_len: 0,
        last: None,
        last_event: None,
        unsigned: 0,
        bad_reason: None,
        last_checkpoint: None,
    };
    let mut offset = 0usize;
    while offset < bytes.len() {
        let Some(end) = bytes[offset..].iter().position(|&b| b == b'\n') else {
            scan.bad_reason = Some("the last line is incomplete (torn write)".into());
            break;
        };
        let line = &bytes[offset..offset + end];
        let parsed = match format::check_line(line) {
            Ok(l) => l,
            Err(e) => {
                scan.bad_reason = Some(format!("invalid line: {e}"));
                break;
            }
        };
        if let Some(prev) = &scan.last
            && (parsed.seq != prev.seq + 1 || parsed.prev != prev.hash)
        {
            scan.bad_reason = Some(format!("line does not continue the chain after seq {}", prev.seq));
            break;
        }
        if parsed.event == "checkpoint" {
            scan.unsigned = 0;
            scan.last_checkpoint = Some((parsed.seq, parsed.ts.clone()));
        } else {
            scan.unsigned += 1;
            scan.last_event = Some(parsed.event.clone());
        }
        scan.last = Some(parsed);
        offset += end + 1;
        scan.good_len = offset as u64;
    }
    Ok(scan)
}

/// Saves the bytes after the good prefix beside the file (`<file>.torn-<unix time>`) and truncates.
fn cut_tail(path: &Path, scan: &Scan, clock: &Clock) -> Result<Cut, AuditError> {
    let mut bytes = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .map_err(|source| AuditError::io("read", path, source))?;
    let good = usize::try_from(scan.good_len).unwrap_or(bytes.len()).min(bytes.len());
    let saved_to = PathBuf::from(format!("{}.torn-{}", path.display(), clock().unix_timestamp_nanos()));
    let mut saved = create_file(&saved_to)?;
    saved
        .write_all(&bytes[good..])
        .and_then(|()| saved.sync_all())
        .map_err(|source| AuditError::io("write", &saved_to, source))?;
    let file =
        OpenOptions::new().write(true).open(path).map_err(|source| AuditError::io("open", path, source))?;
    file.set_len(scan.good_len)
        .and_then(|()| file.sync_all())
        .map_err(|source| AuditError::io("truncate", path, source))?;
    let reason = scan.bad_reason.clone().unwrap_or_else(|| "unknown".into());
    tracing::warn!(file = %path.display(), bytes = bytes.len() - good, saved_to = %saved_to.display(), %reason,
        "audit recovery cut the end of the newest file");
    Ok(Cut {
        file: path.to_path_buf(),
        bytes: (bytes.len() - good) as u64,
        saved_to,
        reason,
        last_good_seq: scan.last.as_ref().map(|l| l.seq),
    })
}

fn first_prev(path: &Path) -> Option<String> {
    let mut first = Vec::new();
    let file = File::open(path).ok()?;
    std::io::BufRead::read_until(&mut std::io::BufReader::new(file), b'\n', &mut first).ok()?;
    let object: Map<String, Value> = serde_json::from_slice(first.trim_ascii_end()).ok()?;
    object.get("prev").and_then(Value::as_str).map(str::to_owned)
}

fn file_day(path: &Path, now: OffsetDateTime) -> Date {
    std::fs::metadata(path)
        .and_then(|m| m.created().or_else(|_| m.modified()))
        .map_or(now.date(), |t| OffsetDateTime::from(t).date())
}

fn lock_dir(dir: &Path) -> Result<nix::fcntl::Flock<File>, AuditError> {
    let path = dir.join(".lock");
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(|source| AuditError::io("open", &path, source))?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
        .map_err(|(_, errno)| AuditError::Locked { path, errno })
}

pub fn create_dir(dir: &Path) -> Result<(), AuditError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| AuditError::io("create", dir, source))
}

fn create_file(path: &Path) -> Result<File, AuditError> {
    OpenOptions::new()
        .append(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|source| AuditError::io("create", path, source))
}

fn sync_dir(dir: &Path) -> Result<(), AuditError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|source| AuditError::io("sync", dir, source))
}

/// Tests' way into the writer's fdatasync: a hook per audit directory, run before each one (it may
/// wait, to let appends queue behind a batch, or fail, as a full disk would).
#[cfg(test)]
pub(crate) mod test_hook {
    use std::path::{Path, PathBuf};
    use std::sync::{Arc, Mutex};

    pub type Hook = Arc<dyn Fn() -> std::io::Result<()> + Send + Sync>;

    static HOOKS: Mutex<Vec<(PathBuf, Hook)>> = Mutex::new(Vec::new());

    pub fn set(dir: &Path, hook: Hook) {
        let mut hooks = HOOKS.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        hooks.retain(|(d, _)| d != dir);
        hooks.push((dir.to_path_buf(), hook));
    }

    pub(super) fn before_sync(dir: &Path) -> std::io::Result<()> {
        let hook = {
            let hooks = HOOKS.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            hooks.iter().find(|(d, _)| d == dir).map(|(_, h)| h.clone())
        };
        hook.map_or(Ok(()), |h| h())
    }
}
