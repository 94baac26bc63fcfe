//! The audit record: one writer owns the hash-chained JSON-lines files; everyone else queues records in
//! one bounded queue, and whoever holds the writer writes the queue as a batch (a durable append that
//! found it idle, or the writer task; see [`Audit::append_durable`]).
//!
//! # Record format
//!
//! Each record is one line: a JSON object serialised compactly (no whitespace, `serde_json`'s escaping:
//! only `"`, `\` and control characters are escaped, other text is raw UTF-8), terminated by `\n`. Keys
//! come in this order: `seq`, `ts`, `host`, `event`, the record's own fields (in the order they were added),
//! `prev`, `hash`. No key appears twice; the reserved keys never appear among a record's own fields.
//!
//! - `seq`: unsigned integer, 0 for the first record ever written, then +1 per record with no gap, across
//!   files and restarts.
//! - `ts`: the time the writer serialised the record, RFC 3339 UTC with exactly nine fractional digits,
//!   `2026-11-23T08:58:37.123456789Z`.
//! - `prev`: the `hash` of the previous record (the record with `seq - 1`); for `seq` 0 it is the SHA-256 of
//!   the empty string, `e3b0c442…b855`. So `prev` is the SHA-256 of the previous record's line as it was
//!   hashed, i.e. without its own `hash` key.
//! - `hash`: 64 lowercase hex digits, the SHA-256 of the line's bytes with the final `,"hash":"<hex>"` removed:
//!   every line ends in exactly `,"hash":"<64 hex>"}`, and the hashed bytes are the line without its last
//!   75 bytes, followed by `}` (and without the newline).
//!
//! A line is *canonical* when parsing it and serialising the parsed object again gives the same bytes.
//! `verify` requires every line to be canonical (this refuses repeated keys, added whitespace and changed
//! escapes, so the parsed fields it reasons about are exactly the bytes that were hashed), recomputes each
//! hash from the bytes on disk, and checks `seq` and `prev` against the line before.
//!
//! # Durability
//!
//! A record appended with [`Audit::append_durable`] is fdatasync'd before the call returns (group commit:
//! one fdatasync per batch, every record queued during a batch's fdatasync in the next one). A record appended with [`Audit::append`] is written to the file within a
//! millisecond (it survives a crash of the daemon from then on; records nobody waits on are gathered
//! that long into one write) and made durable with the next durable batch, or within 50 ms.
//!
//! # Files
//!
//! `audit.dir/audit-<first seq, 20 digits>.jsonl`, root-owned, mode 0600, in a 0700 directory. The writer
//! starts a new file when the current one reaches `max_file_bytes` or the UTC day changes. The chain runs
//! across files: the first record of a file has as `prev` the `hash` of the last record of the file before.
//!
//! # Events written by the writer itself
//!
//! - `audit.started` (`version`, `pid`) on every start; `audit.stopped` on clean shutdown.
//! - `recovered` (`unclean`, and when a torn or invalid tail was cut: `file`, `cut_bytes`, `saved_to`,
//!   `reason`, `last_good_seq`; `also_cut` lists the same for older files when the newest held nothing
//!   valid). Recovery reads the newest file from its start and keeps the longest prefix of whole lines
//!   that check and chain; everything from the first line that does not (a torn write, or damage) to the
//!   end is cut, and the cut bytes are kept beside the file as `<file>.torn-<unix ns>`.
//! - `checkpoint` (`covers_seq`, `covers_hash`, `time`, `key`, `sig`): every `checkpoint_records` records,
//!   every `checkpoint_seconds` when anything is unsigned, and at shutdown. `covers_seq`/`covers_hash` are
//!   the `seq`/`hash` of the record just before it, `time` equals its `ts`, `key` is the first 16 hex digits
//!   of the SHA-256 of the public key, and `sig` is the hex Ed25519 signature of the bytes
//!   `warden-audit-checkpoint-v1\n<host as a JSON string>\n<covers_seq>\n<covers_hash>\n<time>`.
//!   A signature over `covers_hash` commits to every record before it through the chain.
//! - `retention.deleted` (`files`, `through_seq`, `through_hash`, `retain_days`, `recordings`): old files
//!   removed by retention, with the terminal recordings their `ssh.recording` records name (deleted
//!   with the segment whose chain holds their hash, never before); `through_hash` is the hash of the last deleted record, which the oldest kept file's first
//!   `prev` must equal. `verify` accepts a chain that starts after seq 0 only when such a record explains it.
//!
//! # Export mark
//!
//! `audit.dir/exported` holds the highest seq an auditor has confirmed receiving. The HTTPS endpoint raises
//! it to `since - 1` when an auditor asks for `since` (asking for more confirms what came before), and
//! `warden audit export --mark` raises it to the last record it wrote. With `retain_until_exported`,
//! retention deletes only files whose every record is at or below the mark.
//!
//! # Shipping
//!
//! With `[audit.ship]` on (see [`ship`] for the bucket's layout), [`Audit::seal`] seals the current file
//! when it holds anything but checkpoints and `audit.shipped` records; every sealed file then ends in a
//! checkpoint, a start never appends to a file written before it (it may be in the bucket already), and
//! retention deletes only files at or below `audit.dir/shipped`, the last seq shipped (shipped counts as
//! exported, and the export mark alone no longer lets a file go). The shipper records `audit.shipped`
//! (`segment`, `first_seq`, `last_seq`, `key`, `sha256`, `version_id`, `bytes`, `retain_until`) per
//! upload, `audit.pubkey_published` (`key`, `pubkey`, `version_id`, `retain_until`) when it first
//! publishes the host's key, and `audit.ship_conflict` (`key`, `reason`) when the bucket holds other bytes
//! under a key it would write.

pub mod budget;
pub mod files;
pub mod format;
pub mod serve;
pub mod ship;
pub mod sign;
pub mod verify;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{Map, Value};
use time::OffsetDateTime;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::AuditConfig;

pub use files::{Bound, export_lines, mark_exported, mark_shipped, read_exported, read_shipped};
pub use writer::Head;

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit queue is full; refusing new work until the writer catches up")]
    QueueFull,
    #[error("audit writer has stopped: {reason}")]
    Stopped { reason: String },
    #[error("the audit record cannot be made durable now (the writer retries): {reason}")]
    Unavailable { reason: String },
    #[error("record field {field:?} is reserved for the writer; rename the field")]
    ReservedField { field: String },
    #[error("cannot serialise the record: {reason}")]
    Encode { reason: String },
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("audit signing key {}: {reason}", path.display())]
    Key { path: PathBuf, reason: String },
    #[error("{}: {reason}", path.display())]
    Corrupt { path: PathBuf, reason: String },
    #[error("cannot lock {} ({errno}): another warden daemon is writing this audit directory; stop it first", path.display())]
    Locked { path: PathBuf, errno: nix::errno::Errno },
    #[error("audit endpoint: {reason}")]
    Serve { reason: String },
}

impl AuditError {
    pub(crate) fn io(action: &'static str, path: &Path, source: std::io::Error) -> Self {
        AuditError::Io { action, path: path.to_path_buf(), source }
    }
}

/// Wall-clock time for `ts` and day rotation; tests pass their own.
pub type Clock = Arc<dyn Fn() -> OffsetDateTime + Send + Sync>;

/// One record before the writer gives it `seq`, `ts`, `host`, `prev` and `hash`.
#[derive(Debug, Clone)]
pub struct Record {
    pub event: String,
    /// The record's own fields, after the [`SharedFields`] it starts with, if any (and after its
    /// [`Raw`] fields: a record has either, never both, see [`Record::field`]).
    pub fields: Map<String, Value>,
    shared: Option<Arc<SharedFields>>,
    /// A record made with [`Record::with_shared`]: its fields serialised as they are added.
    raw: Option<Raw>,
}

/// Fields many records start with (a session's `session`, `pid`, `identity`...), checked and serialised
/// once, so a record made with [`Record::with_shared`] neither copies nor re-serialises them.
#[derive(Debug)]
pub struct SharedFields {
    fields: Map<String, Value>,
    /// `fields` as the writer serialises a record's fields ([`format::encode_fields`]).
    json: Vec<u8>,
}

impl SharedFields {
    pub fn new(fields: Map<String, Value>) -> Result<Arc<Self>, AuditError> {
        if let Some(key) = fields.keys().find(|k| format::RESERVED.contains(&k.as_str())) {
            return Err(AuditError::ReservedField { field: key.clone() });
        }
        let mut json = Vec::new();
        format::encode_fields(&mut json, &fields)
            .map_err(|e| AuditError::Encode { reason: e.to_string() })?;
        Ok(Arc::new(Self { fields, json }))
    }
}

/// The fields of a record on a hot path (a `pg.query` per statement), written as the writer would write
/// them, as they are added: the shared fields' JSON, then `,"key":value` per field, in one buffer. No map,
/// no per-field key or value allocation; the same bytes as the map would give ([`format::RawFormatter`]
/// writes floats as [`format::encode_fields`] does; debug builds compare every field with the map's
/// encoding). A key that would need more than this (reserved, shared, repeated, escaped, one too many)
/// turns the record back into a map first ([`Record::unraw`]), which then behaves as before.
#[derive(Debug, Clone)]
struct Raw {
    json: Vec<u8>,
    /// Where each own key starts in `json` (its opening quote), to refuse a repeated key.
    keys: [u32; RAW_KEYS],
    count: usize,
}

/// Own fields a raw record keeps before it turns into a map.
const RAW_KEYS: usize = 16;

impl Raw {
    fn has(&self, key: &str) -> bool {
        self.keys[..self.count].iter().any(|&at| {
            let at = at as usize + 1;
            self.json.get(at..at + key.len()) == Some(key.as_bytes())
                && self.json.get(at + key.len()) == Some(&b'"')
        })
    }

    /// Appends `,"key":value`, or gives back the value's error with the buffer as it was.
    fn push(&mut self, key: &str, value: &impl Serialize) -> Result<(), serde_json::Error> {
        let start = self.json.len();
        self.json.push(b',');
        let at = u32::try_from(self.json.len()).unwrap_or(u32::MAX);
        self.json.push(b'"');
        self.json.extend_from_slice(key.as_bytes());
        self.json.extend_from_slice(b"\":");
        let mut ser = serde_json::Serializer::with_formatter(&mut self.json, format::RawFormatter);
        if let Err(e) = value.serialize(&mut ser) {
            self.json.truncate(start);
            return Err(e);
        }
        self.keys[self.count] = at;
        self.count += 1;
        Ok(())
    }
}

impl Record {
    pub fn new(event: &str) -> Self {
        Self { event: event.to_owned(), fields: Map::new(), shared: None, raw: None }
    }

    /// A record that starts with `shared`'s fields, its own written as they are added (see [`Raw`]).
    pub fn with_shared(event: &str, shared: Arc<SharedFields>) -> Self {
        let mut json = Vec::with_capacity(shared.json.len() + 192);
        json.extend_from_slice(&shared.json);
        let raw = Raw { json, keys: [0; RAW_KEYS], count: 0 };
        Self { event: event.to_owned(), fields: Map::new(), shared: Some(shared), raw: Some(raw) }
    }

    /// Adds a field. A value that cannot be serialised is recorded as a string saying so. A key of the
    /// shared fields replaces that field in place, as for a record's own fields.
    #[must_use]
    pub fn field(mut self, key: &str, value: impl Serialize) -> Self {
        if let Some(raw) = &mut self.raw {
            let plain = |c: &u8| *c >= 0x20 && *c != b'"' && *c != b'\\' && *c < 0x7f;
            let shared = self.shared.as_ref().is_some_and(|s| s.fields.contains_key(key));
            if raw.count < RAW_KEYS
                && key.bytes().all(|c| plain(&c))
                && !format::RESERVED.contains(&key)
                && !shared
                && !raw.has(key)
                && raw.push(key, &value).is_ok()
            {
                #[cfg(debug_assertions)]
                raw_matches_map(raw, key, &value);
                return self;
            }
            self.unraw();
        }
        let value =
            serde_json::to_value(value).unwrap_or_else(|e| Value::String(format!("<unserialisable: {e}>")));
        if self.shared.as_ref().is_some_and(|s| s.fields.contains_key(key)) {
            self.unshare();
        }
        self.fields.insert(key.to_owned(), value);
        self
    }

    /// Turns a raw record into a map of its own fields (its shared ones left shared), as if every field
    /// had been added to the map.
    fn unraw(&mut self) {
        let Some(raw) = self.raw.take() else { return };
        let shared = self.shared.as_ref().map_or(0, |s| s.json.len());
        let own = &raw.json[shared..];
        let mut object = Vec::with_capacity(own.len() + 2);
        object.push(b'{');
        object.extend_from_slice(own.get(1..).unwrap_or_default());
        object.push(b'}');
        match serde_json::from_slice::<Map<String, Value>>(&object) {
            Ok(map) => self.fields = map,
            Err(e) => {
                // Not reachable: the buffer holds what serde_json wrote. Kept visible if it ever is.
                self.fields.insert("unraw_error".into(), Value::String(e.to_string()));
            }
        }
    }

    /// Moves the shared fields into the record's own (before them).
    fn unshare(&mut self) {
        self.unraw();
        if let Some(shared) = self.shared.take() {
            let mut all = shared.fields.clone();
            all.extend(std::mem::take(&mut self.fields));
            self.fields = all;
        }
    }

    /// The event, the serialised shared fields and the record's own fields, as the writer encodes them
    /// (the shared ones moved into the record's own if a key was added to both; for a raw record the
    /// serialised fields are all of them and the map is empty).
    pub(crate) fn parts(&mut self) -> (&str, &[u8], &Map<String, Value>) {
        if self.raw.is_some() && !self.fields.is_empty() {
            // Someone wrote `fields` directly: keep every field, in order.
            let extra = std::mem::take(&mut self.fields);
            self.unraw();
            self.fields.extend(extra);
        }
        if self.raw.is_some() {
            let json = self.raw.as_ref().map_or(&[][..], |r| &r.json[..]);
            return (&self.event, json, &self.fields);
        }
        if self.shared.as_ref().is_some_and(|s| self.fields.keys().any(|k| s.fields.contains_key(k))) {
            self.unshare();
        }
        match &self.shared {
            Some(s) => (&self.event, &s.json, &self.fields),
            None => (&self.event, b"", &self.fields),
        }
    }
}

/// Debug builds: the raw field just written is exactly what the map would have written.
#[cfg(debug_assertions)]
fn raw_matches_map(raw: &Raw, key: &str, value: &impl Serialize) {
    let value =
        serde_json::to_value(value).unwrap_or_else(|e| Value::String(format!("<unserialisable: {e}>")));
    let mut map = Map::new();
    map.insert(key.to_owned(), value);
    let mut expected = Vec::new();
    format::encode_fields(&mut expected, &map).expect("a map value serialises");
    let start = raw.keys[raw.count - 1] as usize - 1;
    assert_eq!(
        String::from_utf8_lossy(&raw.json[start..]),
        String::from_utf8_lossy(&expected),
        "a raw record field differs from its map encoding"
    );
}

/// A record queued for the next batch, and who waits on it.
struct Msg {
    record: Record,
    /// The durable append waiting on it: answered with its result, or handed the next batch to lead.
    ack: Option<oneshot::Sender<Reply>>,
    /// When a durable append was queued (for the set-up breakdown).
    queued: Option<Instant>,
}

/// What a durable append waiting on its record hears: its result, or that it leads the next batch.
enum Reply {
    Done(Result<u64, AuditError>),
    Lead(Box<Lead>),
}

/// The writer and a batch to write with it; the leader's own record is `batch[mine]` (it keeps that
/// result itself rather than being answered).
struct Lead {
    writer: writer::Writer,
    batch: Vec<Msg>,
    mine: usize,
}

/// The queue, and the writer while nobody writes with it. Whoever takes the writer writes the whole queue
/// as one batch (group commit): a durable append that finds the writer idle (the leader: it writes and
/// fdatasyncs on its own thread), a durable append the previous holder handed the writer and what queued
/// meanwhile, or the writer task (records nobody waits on, checkpoints, seals, the delayed sync, a fault
/// to ride out, shutdown). Taking the writer and the queue under one lock keeps the chain in queue order.
#[derive(Default)]
struct Queue {
    msgs: Vec<Msg>,
    writer: Option<writer::Writer>,
    /// The writer task waits for the writer: its next holder gives it to the task rather than to a
    /// waiting append (so checkpoints, seals and shutdown are never starved by a stream of sessions).
    task_wants: bool,
    /// A fault for the writer task to ride out, left by a holder whose batch failed with the writer.
    fault_pending: Option<Fault>,
    /// Why appends are refused for good (the writer failed, was lost or shut down); `None` while healthy.
    stopped: Option<String>,
    /// Why the writer cannot write now (disk full, no descriptors, an I/O error) while it retries; `None`
    /// while it writes. Durable appends are refused meanwhile; the others are held (see [`Fault`]).
    fault: Option<String>,
    /// The writer is gone (a batch panicked): nothing will be written again.
    lost: bool,
}

struct Shared {
    q: Mutex<Queue>,
    /// How many records the queue holds (`audit.queue`).
    cap: usize,
    /// Wakes the writer task: records nobody waits on were queued while the writer was idle, or a fault
    /// was left for it, or records arrived during a fault.
    wake: tokio::sync::Notify,
    /// Tells the writer task that the writer it asked for (`task_wants`) is back in the queue.
    idle: tokio::sync::Notify,
    /// Durable appends the handle refused at once during a fault, for `audit.resumed`.
    refused: std::sync::atomic::AtomicU64,
    /// Where the chain stands after the last batch.
    head: Mutex<Head>,
    /// Wakes the writer to seal its current file ([`Audit::seal`]).
    seal_wake: tokio::sync::Notify,
    seal_waiters: Mutex<Vec<oneshot::Sender<Result<bool, AuditError>>>>,
    /// How many files the writer has sealed since it started; the shipper waits on changes.
    sealed: tokio::sync::watch::Sender<u64>,
    /// Fired when the writer fails for good.
    failed: CancellationToken,
}

impl Shared {
    fn new(w: writer::Writer, cap: usize, failed: CancellationToken) -> Self {
        Self {
            head: Mutex::new(w.head()),
            q: Mutex::new(Queue { writer: Some(w), ..Queue::default() }),
            cap,
            wake: tokio::sync::Notify::new(),
            idle: tokio::sync::Notify::new(),
            refused: std::sync::atomic::AtomicU64::new(0),
            seal_wake: tokio::sync::Notify::new(),
            seal_waiters: Mutex::default(),
            sealed: tokio::sync::watch::Sender::new(0),
            failed,
        }
    }

    /// The queue, locked (never across an await; a poisoned lock is still the queue).
    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.q.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether a record may be queued now: refused for good once stopped, at once during a fault unless it
    /// is to be held, and when the queue is full.
    fn admit(&self, q: &Queue, hold: bool) -> Result<(), AuditError> {
        if let Some(reason) = &q.stopped {
            return Err(AuditError::Stopped { reason: reason.clone() });
        }
        if !hold && let Some(reason) = &q.fault {
            self.refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Err(AuditError::Unavailable { reason: reason.clone() });
        }
        if q.msgs.len() >= self.cap {
            return Err(AuditError::QueueFull);
        }
        Ok(())
    }

    /// Gives the writer back after a batch: to the writer task if it asked for it; else, with everything
    /// queued meanwhile, to the first durable append waiting (it leads the next batch, so one fdatasync
    /// covers every record that arrived during the last one); else back to the queue, waking the writer
    /// task when records nobody waits on are left. Never blocks: a waiter's drop calls it too.
    fn pass_on(&self, mut w: writer::Writer) {
        loop {
            let (tx, lead) = {
                let mut q = self.lock();
                if q.task_wants {
                    q.task_wants = false;
                    q.writer = Some(w);
                    drop(q);
                    self.idle.notify_one();
                    return;
                }
                let next = q.msgs.iter_mut().enumerate().find_map(|(i, m)| m.ack.take().map(|tx| (i, tx)));
                let Some((mine, tx)) = next else {
                    let left = !q.msgs.is_empty();
                    q.writer = Some(w);
                    drop(q);
                    if left {
                        self.wake.notify_one();
                    }
                    return;
                };
                (tx, Lead { writer: w, batch: std::mem::take(&mut q.msgs), mine })
            };
            match tx.send(Reply::Lead(Box::new(lead))) {
                // That append is no longer waiting: its record stays queued, nobody waits on it now.
                Err(Reply::Lead(back)) => w = self.restore(*back),
                _ => return,
            }
        }
    }

    /// Puts a batch nobody is writing back at the front of the queue (its order kept); returns the writer.
    fn restore(&self, lead: Lead) -> writer::Writer {
        let Lead { writer, mut batch, .. } = lead;
        let mut q = self.lock();
        batch.append(&mut q.msgs);
        q.msgs = batch;
        writer
    }

    /// A batch failed with the writer still there: refuse durable work from now on, and leave the writer
    /// and the fault (with the records nobody waited on that were not written) to the writer task.
    fn fault_with(&self, w: writer::Writer, reason: &str, held: Vec<Record>) {
        tracing::error!(%reason, "audit writer cannot write; refusing new sessions until it can, retrying");
        let fault = Fault::new(w.now(), reason.to_owned(), held);
        {
            let mut q = self.lock();
            q.fault = Some(reason.to_owned());
            q.fault_pending = Some(fault);
            q.task_wants = false;
            q.writer = Some(w);
        }
        fail_seals(self, || AuditError::Unavailable { reason: reason.to_owned() });
        self.idle.notify_one();
        self.wake.notify_one();
    }

    /// The writer is gone or failed for good: refuse everything from now on, answer every waiter with
    /// `Stopped` (their senders dropped), and end the live sessions.
    fn lose(&self, reason: &str) {
        tracing::error!(%reason, "audit writer failed; refusing new sessions and ending live ones");
        let msgs = {
            let mut q = self.lock();
            q.lost = true;
            if q.stopped.is_none() {
                q.stopped = Some(reason.to_owned());
            }
            std::mem::take(&mut q.msgs)
        };
        drop(msgs);
        fail_seals(self, || AuditError::Stopped { reason: reason.to_owned() });
        self.failed.cancel();
        self.idle.notify_one();
        self.wake.notify_one();
    }

    fn set_head(&self, w: &writer::Writer) {
        if let Ok(mut head) = self.head.lock() {
            *head = w.head();
        }
    }
}

/// A durable append waiting on its record. Dropped before the answer comes (its future cancelled), it
/// passes on a batch it was handed to lead, so the writer never goes down with it.
struct Waiting<'a> {
    rx: Option<oneshot::Receiver<Reply>>,
    shared: &'a Shared,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if let Some(mut rx) = self.rx.take() {
            rx.close();
            if let Ok(Reply::Lead(lead)) = rx.try_recv() {
                let w = self.shared.restore(*lead);
                self.shared.pass_on(w);
            }
        }
    }
}

/// A handle to the writer; cheap to clone.
#[derive(Clone)]
pub struct Audit {
    shared: Arc<Shared>,
    failed: CancellationToken,
    dir: PathBuf,
}

impl std::fmt::Debug for Audit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Audit").field("dir", &self.dir).finish_non_exhaustive()
    }
}

/// Everything [`Audit::start_with`] needs; [`AuditOptions::in_dir`] builds one for tests and tools.
#[derive(Clone)]
pub struct AuditOptions {
    pub config: AuditConfig,
    pub state_dir: PathBuf,
    pub host: String,
    pub clock: Clock,
    /// Where the writer counts records, bytes and fsync latency.
    pub metrics: Arc<crate::metrics::Metrics>,
}

impl AuditOptions {
    pub fn new(config: &AuditConfig, state_dir: &Path, host: String) -> Self {
        Self {
            config: config.clone(),
            state_dir: state_dir.to_path_buf(),
            host,
            clock: Arc::new(OffsetDateTime::now_utc),
            metrics: crate::metrics::unserved(),
        }
    }

    /// The same options, counting into `metrics`.
    #[must_use]
    pub fn with_metrics(mut self, metrics: Arc<crate::metrics::Metrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// Audit files in `root/audit`, the signing key in `root`, host `test-host`, default settings.
    pub fn in_dir(root: &Path) -> Self {
        let config = AuditConfig { dir: root.join("audit"), ..AuditConfig::default() };
        Self::new(&config, root, "test-host".into())
    }
}

/// How long the writer task lets records nobody waits on gather before it writes them: one write (and
/// one wake-up of the writer task) per millisecond rather than per record, at a PostgreSQL session's
/// statement rate. A durable append meanwhile takes them into its own batch; a seal or shutdown ends the
/// wait at once.
const LINGER: Duration = Duration::from_millis(1);
/// The longest a written record waits to be made durable when nobody waits on it.
const SYNC_DELAY: Duration = Duration::from_millis(50);
impl Audit {
    /// Opens (and recovers) the audit directory, loads or creates the signing key, writes `audit.started`
    /// (and `recovered` when the last run did not stop cleanly) durably, and spawns the writer task.
    /// On `shutdown` the writer writes everything queued, `audit.stopped` and a final checkpoint, then exits;
    /// appends after that are refused. So cancel `shutdown` only after the proxy has ended its sessions
    /// (their `session.end` records queued), e.g. with a token of its own cancelled after the proxy drains.
    ///
    /// Must be called inside a tokio runtime. Does blocking file I/O (recovery) before it returns.
    /// When the writer fails (disk full, I/O error) it fires [`Audit::failed`] and its task ends early.
    pub fn start(
        config: &AuditConfig,
        state_dir: &Path,
        host: String,
        shutdown: CancellationToken,
    ) -> Result<(Audit, JoinHandle<()>), AuditError> {
        Self::start_with(&AuditOptions::new(config, state_dir, host), shutdown)
    }

    pub fn start_with(
        opts: &AuditOptions,
        shutdown: CancellationToken,
    ) -> Result<(Audit, JoinHandle<()>), AuditError> {
        let key = sign::load_or_create(&opts.state_dir)?;
        let settings = writer::Settings {
            dir: opts.config.dir.clone(),
            host: opts.host.clone(),
            max_file_bytes: opts.config.max_file_bytes,
            retain_days: opts.config.retain_days,
            retain_until_exported: opts.config.retain_until_exported,
            checkpoint_records: opts.config.checkpoint_records,
            clock: opts.clock.clone(),
            metrics: opts.metrics.clone(),
            ship: opts.config.ship.enabled(),
        };
        let (mut w, recovery) = writer::Writer::open(settings, key)?;
        let mut first = vec![
            Record::new("audit.started")
                .field("version", env!("CARGO_PKG_VERSION"))
                .field("pid", std::process::id()),
        ];
        if recovery.unclean || !recovery.cuts.is_empty() {
            let mut r = Record::new("recovered").field("unclean", recovery.unclean);
            if let Some(cut) = recovery.cuts.first() {
                r = r
                    .field("file", cut.file.display().to_string())
                    .field("cut_bytes", cut.bytes)
                    .field("saved_to", cut.saved_to.display().to_string())
                    .field("reason", &cut.reason)
                    .field("last_good_seq", cut.last_good_seq);
            }
            if recovery.cuts.len() > 1 {
                let more: Vec<Value> = recovery.cuts[1..].iter().map(writer::Cut::to_json).collect();
                r = r.field("also_cut", more);
            }
            first.push(r);
        }
        let outcome = w.write_batch(first, false, true);
        if let Some(reason) = outcome.fatal {
            return Err(AuditError::Stopped { reason });
        }
        w.retain_now().map_err(|reason| AuditError::Stopped { reason })?;
        let failed = CancellationToken::new();
        let shared = Arc::new(Shared::new(w, opts.config.queue.max(1), failed.clone()));
        let audit = Audit { shared: shared.clone(), failed, dir: opts.config.dir.clone() };
        // Timed checkpoints count from now, not from when the writer task is first polled (a leader may
        // write before it is).
        let period = (opts.config.checkpoint_seconds > 0).then(|| {
            let p = Duration::from_secs(opts.config.checkpoint_seconds);
            (tokio::time::Instant::now() + p, p)
        });
        let handle = tokio::spawn(run(shared, shutdown, period));
        Ok((audit, handle))
    }

    /// Fires when the writer can no longer write (disk full, I/O error): end live sessions with
    /// [`Audit::stopped_reason`] as the reason. After that every append is refused.
    pub fn failed(&self) -> CancellationToken {
        self.failed.clone()
    }

    /// Why appends are refused, if they are.
    pub fn stopped_reason(&self) -> Option<String> {
        self.shared.lock().stopped.clone()
    }

    /// Why the writer cannot make records durable right now, while it retries (durable appends are
    /// refused meanwhile), if it cannot.
    pub fn unavailable_reason(&self) -> Option<String> {
        self.shared.lock().fault.clone()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the chain stands after the last batch written (seq, hash, last checkpoint).
    pub fn head(&self) -> Head {
        self.shared.head.lock().map(|h| h.clone()).unwrap_or_default()
    }

    /// Records queued for the writer now, and how many the queue holds.
    pub fn queue(&self) -> (usize, usize) {
        (self.shared.lock().msgs.len(), self.shared.cap)
    }

    /// Queues a record nobody waits on; wakes the writer task when the writer is idle and this is the
    /// first record queued (a batch in progress passes the queue on when it ends), or during a fault.
    fn send(&self, record: Record, hold: bool) -> Result<(), AuditError> {
        let wake = {
            let mut q = self.shared.lock();
            self.shared.admit(&q, hold)?;
            q.msgs.push(Msg { record, ack: None, queued: None });
            (q.writer.is_some() && q.msgs.len() == 1) || q.fault.is_some()
        };
        if wake {
            self.shared.wake.notify_one();
        }
        Ok(())
    }

    /// Appends a record and waits until it is durable (fsync'd). Returns its `seq`. Fails at once with
    /// `QueueFull` when the queue is full, with `Unavailable` while the writer cannot write (it retries),
    /// and with `Stopped` once the writer has failed for good or shut down.
    ///
    /// Group commit, led by the appenders: one that finds the writer idle takes it with everything queued
    /// and writes and fdatasyncs the batch itself, on its own thread (`block_in_place`; see
    /// [`off_runtime`]), so a lone session pays one fdatasync and no hand-off to another task. Appends that
    /// come meanwhile queue and wait; when the batch is durable, the first of them is handed the writer
    /// and everything queued, and leads the next batch under one fdatasync; the others hear their result
    /// from whoever wrote their batch.
    pub async fn append_durable(&self, record: Record) -> Result<u64, AuditError> {
        let queued = Some(Instant::now());
        let next = {
            let mut q = self.shared.lock();
            self.shared.admit(&q, false)?;
            if let Some(writer) = q.writer.take() {
                q.msgs.push(Msg { record, ack: None, queued });
                let batch = std::mem::take(&mut q.msgs);
                Ok(Lead { mine: batch.len() - 1, writer, batch })
            } else {
                let (tx, rx) = oneshot::channel();
                q.msgs.push(Msg { record, ack: Some(tx), queued });
                Err(rx)
            }
        };
        let lead = match next {
            Ok(lead) => lead,
            Err(rx) => {
                let mut waiting = Waiting { rx: Some(rx), shared: &self.shared };
                let reply = match waiting.rx.as_mut() {
                    Some(rx) => rx.await,
                    None => return Err(self.gone()),
                };
                waiting.rx = None;
                match reply {
                    Ok(Reply::Done(result)) => return result,
                    Ok(Reply::Lead(lead)) => *lead,
                    Err(_) => return Err(self.gone()),
                }
            }
        };
        self.lead(lead).await
    }

    /// Writes a batch this append leads (fdatasync'd), passes the writer on, and returns its own result.
    async fn lead(&self, lead: Lead) -> Result<u64, AuditError> {
        let Lead { writer, batch, mine } = lead;
        let done = commit(writer, batch, false, true, &self.shared, false, Some(mine)).await;
        match (done.writer, done.fatal) {
            (Some(w), None) => self.shared.pass_on(w),
            (Some(w), Some(reason)) => self.shared.fault_with(w, &reason, done.held),
            (None, reason) => self.shared.lose(reason.as_deref().unwrap_or("the audit writer was lost")),
        }
        done.mine.unwrap_or_else(|| Err(self.gone()))
    }

    /// The error for an append the writer will never answer.
    fn gone(&self) -> AuditError {
        AuditError::Stopped {
            reason: self.stopped_reason().unwrap_or_else(|| "the audit writer has shut down".into()),
        }
    }

    /// Queues a record without waiting for the disk; fails at once when the queue is full, and with
    /// `Unavailable` while the writer cannot write (a protocol handler that records before it forwards
    /// then ends its session).
    pub fn append(&self, record: Record) -> Result<(), AuditError> {
        self.send(record, false)
    }

    /// Like [`Audit::append`] for a record of something already done (a session's end, a refusal already
    /// enforced): while the writer cannot write, it is held in memory (at most `audit.queue` records; past
    /// that counted in `audit.resumed` as `dropped`) and written when the writer resumes.
    pub fn append_or_hold(&self, record: Record) -> Result<(), AuditError> {
        self.send(record, true)
    }

    /// Seals the current file now (after the records queued before this call) when it holds anything
    /// but checkpoints and `audit.shipped` records, and starts a new one. Returns whether it sealed.
    pub async fn seal(&self) -> Result<bool, AuditError> {
        let (ack, done) = oneshot::channel();
        {
            // Checked under the waiters' lock: the writer sets `stopped` before it drains the waiters.
            let mut waiters = self
                .shared
                .seal_waiters
                .lock()
                .map_err(|_| AuditError::Stopped { reason: "the audit writer has shut down".into() })?;
            if let Some(reason) = self.stopped_reason() {
                return Err(AuditError::Stopped { reason });
            }
            if let Some(reason) = self.unavailable_reason() {
                return Err(AuditError::Unavailable { reason });
            }
            waiters.push(ack);
        }
        self.shared.seal_wake.notify_one();
        done.await.unwrap_or_else(|_| {
            Err(AuditError::Stopped {
                reason: self.stopped_reason().unwrap_or_else(|| "the audit writer has shut down".into()),
            })
        })
    }

    /// Changes each time the writer seals a file (rotation, or [`Audit::seal`]).
    pub fn sealed(&self) -> tokio::sync::watch::Receiver<u64> {
        self.shared.sealed.subscribe()
    }
}

/// Answers every pending [`Audit::seal`] with why the writer cannot seal.
fn fail_seals(shared: &Shared, error: impl Fn() -> AuditError) {
    let waiters = shared.seal_waiters.lock().map(|mut g| std::mem::take(&mut *g)).unwrap_or_default();
    for waiter in waiters {
        let _ = waiter.send(Err(error()));
    }
}

fn set_stopped(shared: &Shared, reason: &str) {
    let mut q = shared.lock();
    if q.stopped.is_none() {
        q.stopped = Some(reason.to_owned());
    }
}

/// What one batch left: the writer (`None` if it was lost), why the batch failed, the records nobody
/// waited on that were not written (to hold), and the leader's own result.
struct Committed {
    writer: Option<writer::Writer>,
    fatal: Option<String>,
    held: Vec<Record>,
    mine: Option<Result<u64, AuditError>>,
}

/// Runs one batch (write, fdatasync with `sync`, then a seal when asked; see [`off_runtime`] for where),
/// then answers every waiter and notes where the chain stands. `mine` is the leader's own record, whose
/// result is returned rather than sent.
async fn commit(
    w: writer::Writer,
    batch: Vec<Msg>,
    force_checkpoint: bool,
    sync: bool,
    shared: &Shared,
    seal: bool,
    mine: Option<usize>,
) -> Committed {
    let queued: Vec<Instant> = batch.iter().filter_map(|m| m.queued).collect();
    let (records, acks): (Vec<Record>, Vec<_>) = batch.into_iter().map(|m| (m.record, m.ack)).unzip();
    // A batch nobody waits on is one write to the page cache: done in place, since handing the worker
    // to another thread (block_in_place) costs more than the write (thread wake-ups and switches for
    // every batch of a busy PostgreSQL session's records). A batch with an fdatasync is not, even a lone
    // session's: measured with `examples/audit_commit.rs`, an fdatasync made right on the worker saved
    // the hand-off's futex calls (about 4 per connection) but itself took 1.5 ms on average against
    // 0.3 ms under `block_in_place` in the same minutes, and the runtime lost a worker meanwhile.
    // On a current-thread runtime (tests, tools) a leader's batch is done right here too: handed to the
    // blocking pool, it would leave the writer in a task the leader's future no longer awaits if that
    // future were dropped meanwhile (the writer task's own batches are never dropped).
    let multi =
        tokio::runtime::Handle::current().runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread;
    let inline = (!sync && !seal) || (mine.is_some() && !multi);
    let joined = off_runtime(inline, move || {
        let mut w = w;
        let started = Instant::now();
        let mut outcome = w.write_batch(records, force_checkpoint, sync);
        w.timed(&queued, started);
        let mut sealed = Ok(false);
        if seal && outcome.fatal.is_none() {
            sealed = w.seal();
            if let Err(reason) = &sealed {
                outcome.fatal = Some(reason.clone());
            }
        }
        let count = w.sealed();
        ((w, count, sealed), outcome)
    })
    .await;
    let joined = joined.map(|((w, count, sealed), outcome)| {
        shared.set_head(&w);
        shared.sealed.send_if_modified(|c| std::mem::replace(c, count) != count);
        if seal {
            let waiters = shared.seal_waiters.lock().map(|mut g| std::mem::take(&mut *g)).unwrap_or_default();
            for waiter in waiters {
                let _ = waiter.send(sealed.clone().map_err(|reason| AuditError::Stopped { reason }));
            }
        }
        (w, outcome)
    });
    let (w, outcome) = match joined {
        Ok((w, outcome)) => (Some(w), outcome),
        Err(e) => (
            None,
            writer::BatchOutcome {
                results: Vec::new(),
                fatal: Some(format!("writer task failed: {e}")),
                records: Vec::new(),
            },
        ),
    };
    let (held, mine) = answer(acks, outcome.results, outcome.records, outcome.fatal.as_deref(), mine);
    Committed { writer: w, fatal: outcome.fatal, held, mine }
}

/// Answers each record's waiter, if it has one, with its result; the result of `mine` (the leader's own
/// record) is returned. After a failed write (`fatal`), a record that was not written is `Unavailable` to
/// its waiter; one nobody waits on is given back, to be held and written when the writer resumes.
fn answer(
    acks: Vec<Option<oneshot::Sender<Reply>>>,
    results: Vec<Result<u64, AuditError>>,
    records: Vec<Record>,
    fatal: Option<&str>,
    mine: Option<usize>,
) -> (Vec<Record>, Option<Result<u64, AuditError>>) {
    let mut held = Vec::new();
    let mut own = None;
    let mut results = results.into_iter();
    let mut records = records.into_iter();
    for (i, ack) in acks.into_iter().enumerate() {
        let record = records.next();
        let result =
            results.next().unwrap_or_else(|| Err(AuditError::Stopped { reason: "not written".into() }));
        let result = match (result, fatal) {
            (Err(AuditError::Stopped { .. }), Some(reason)) => {
                Err(AuditError::Unavailable { reason: reason.to_owned() })
            }
            (r, _) => r,
        };
        if let Err(e) = &result
            && !matches!(e, AuditError::Stopped { .. } | AuditError::Unavailable { .. })
        {
            tracing::warn!(error = %e, "audit record refused");
        }
        match ack {
            _ if mine == Some(i) => own = Some(result),
            Some(ack) => {
                let _ = ack.send(Reply::Done(result));
            }
            None if matches!(result, Err(AuditError::Unavailable { .. })) => held.extend(record),
            None => {}
        }
    }
    (held, own)
}

/// The first wait before the writer tries again after a failed write; it doubles up to `RETRY_MAX`.
const RETRY_FIRST: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(2);

/// What happened while the writer could not write, for its `audit.resumed` record, and the records it
/// holds to write when it resumes.
struct Fault {
    since: OffsetDateTime,
    first: String,
    last: String,
    attempts: u64,
    /// Durable appends refused (sessions not started, grants not changed).
    refused: u64,
    /// Records nobody waited on (a `session.end`, a refusal), in order, written after `audit.resumed`.
    held: Vec<Record>,
    /// Records past the hold's bound, counted and lost.
    dropped: u64,
}

impl Fault {
    fn new(since: OffsetDateTime, reason: String, held: Vec<Record>) -> Self {
        Self { since, first: reason.clone(), last: reason, attempts: 0, refused: 0, held, dropped: 0 }
    }

    /// Takes a record that arrived during the fault: a durable one is refused at once, another held.
    fn take(&mut self, m: Msg, hold: usize) {
        match m.ack {
            Some(ack) => {
                self.refused += 1;
                let _ = ack.send(Reply::Done(Err(AuditError::Unavailable { reason: self.last.clone() })));
            }
            None if self.held.len() < hold => self.held.push(m.record),
            None => self.dropped += 1,
        }
    }

    /// Takes everything queued (records held during the fault, and durable appends queued just before it).
    fn drain(&mut self, shared: &Shared) {
        let msgs = std::mem::take(&mut shared.lock().msgs);
        for m in msgs {
            self.take(m, shared.cap);
        }
    }

    fn record(&self, cuts: &[writer::Cut]) -> Record {
        let mut r = Record::new("audit.resumed")
            .field("since", crate::timestamp::format(self.since))
            .field("reason", &self.first)
            .field("attempts", self.attempts)
            .field("refused", self.refused)
            .field("held", self.held.len())
            .field("dropped", self.dropped);
        if self.last != self.first {
            r = r.field("last_error", &self.last);
        }
        if !cuts.is_empty() {
            let cut: Vec<Value> = cuts.iter().map(writer::Cut::to_json).collect();
            r = r.field("cut", cut);
        }
        r
    }
}

/// One attempt to resume: find where the chain stands on disk, then write `audit.resumed` and the held
/// records durably. Gives the writer and the fault back, the fault emptied on success.
async fn resume(w: writer::Writer, mut fault: Fault) -> (Option<writer::Writer>, Fault, bool) {
    let joined = tokio::task::spawn_blocking(move || {
        let mut w = w;
        fault.attempts += 1;
        let cuts = match w.reposition() {
            Ok(cuts) => cuts,
            Err(reason) => {
                fault.last = reason;
                return (w, fault, false);
            }
        };
        let mut batch = Vec::with_capacity(fault.held.len() + 1);
        batch.push(fault.record(&cuts));
        batch.append(&mut fault.held);
        let outcome = w.write_batch(batch, false, true);
        let Some(reason) = outcome.fatal else { return (w, fault, true) };
        // Hold again what was not written (the `audit.resumed` record is made anew next time).
        let acks = outcome.records.iter().map(|_| None).collect();
        let (mut again, _) = answer(acks, outcome.results, outcome.records, Some(&reason), None);
        if !again.is_empty() && again[0].event == "audit.resumed" {
            again.remove(0);
        }
        fault.held = again;
        fault.last = reason;
        (w, fault, false)
    })
    .await;
    match joined {
        Ok((w, fault, ok)) => (Some(w), fault, ok),
        Err(e) => {
            let reason = format!("writer task failed: {e}");
            (None, Fault::new(OffsetDateTime::now_utc(), reason, Vec::new()), false)
        }
    }
}

/// While the writer cannot write (the writer task holds it): refuses durable appends, holds the others
/// (up to `audit.queue`), answers seals with the fault, and tries to resume after a backoff (100 ms
/// doubling to 2 s). Returns the writer once it has resumed, or the reason it will not (shutdown came and
/// a last attempt failed too, the held records lost and logged; or the writer was lost).
async fn ride_out(
    w: writer::Writer,
    mut fault: Fault,
    shutdown: &CancellationToken,
    shared: &Shared,
) -> Result<writer::Writer, String> {
    let mut w = Some(w);
    let mut delay = RETRY_FIRST;
    let retry = tokio::time::sleep(delay);
    tokio::pin!(retry);
    loop {
        let last_try = tokio::select! {
            biased;
            () = shutdown.cancelled() => true,
            () = shared.wake.notified() => {
                fault.drain(shared);
                continue;
            }
            () = shared.seal_wake.notified() => {
                fail_seals(shared, || AuditError::Unavailable { reason: fault.last.clone() });
                continue;
            }
            () = &mut retry => false,
        };
        fault.drain(shared);
        let Some(writer) = w.take() else { return Err(fault.last) };
        // Durable appends the handle refused at once count as refused too.
        fault.refused += shared.refused.swap(0, std::sync::atomic::Ordering::Relaxed);
        let (back, f, resumed) = resume(writer, fault).await;
        fault = f;
        w = back;
        if resumed {
            shared.lock().fault = None;
            fault.refused += shared.refused.swap(0, std::sync::atomic::Ordering::Relaxed);
            tracing::warn!(
                since = %crate::timestamp::format(fault.since),
                attempts = fault.attempts,
                refused = fault.refused,
                dropped = fault.dropped,
                "audit writer resumed"
            );
            return w.ok_or(fault.last);
        }
        if w.is_none() {
            tracing::error!(reason = %fault.last, "audit writer lost");
            return Err(fault.last);
        }
        shared.lock().fault = Some(fault.last.clone());
        if last_try {
            tracing::error!(reason = %fault.last, lost = fault.held.len(), "audit writer could not resume before shutdown; held records lost");
            return Err(fault.last);
        }
        tracing::debug!(reason = %fault.last, attempts = fault.attempts, "audit writer still cannot write");
        delay = (delay * 2).min(RETRY_MAX);
        retry.as_mut().reset(tokio::time::Instant::now() + delay);
    }
}

/// Runs the writer's blocking work (write, fdatasync) where it costs the fewest thread hand-offs. On the
/// multi-threaded runtime the calling task's own thread does it (`block_in_place`: the worker's core, with
/// its other tasks, is handed to another thread meanwhile, so a session's fdatasync stalls no other
/// session), and the sessions waiting on the batch are answered by the thread that made it durable.
/// Elsewhere (the tests' current-thread runtimes) on the blocking pool. With `inline` (no fdatasync in
/// the batch: a write to the page cache, and the rare rotation), right here. A panic in `f` is returned
/// as an error either way.
async fn off_runtime<T: Send + 'static>(
    inline: bool,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, String> {
    use tokio::runtime::{Handle, RuntimeFlavor};
    if inline {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|_| "the batch panicked".to_owned())
    } else if Handle::current().runtime_flavor() == RuntimeFlavor::MultiThread {
        tokio::task::block_in_place(|| std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)))
            .map_err(|_| "the batch panicked".to_owned())
    } else {
        tokio::task::spawn_blocking(f).await.map_err(|e| e.to_string())
    }
}

/// Takes the writer for the writer task, with everything queued and a fault left to ride out, waiting
/// while an append writes with it (which then gives it to the task). `None` once the writer is lost.
async fn acquire(shared: &Shared) -> Option<(writer::Writer, Vec<Msg>, Option<Fault>)> {
    loop {
        {
            let mut q = shared.lock();
            if q.lost {
                return None;
            }
            if let Some(w) = q.writer.take() {
                q.task_wants = false;
                let batch = std::mem::take(&mut q.msgs);
                let fault = q.fault_pending.take();
                return Some((w, batch, fault));
            }
            q.task_wants = true;
        }
        shared.idle.notified().await;
    }
}

/// The writer task: what no durable append does itself. Records nobody waits on (gathered for
/// `LINGER`, written in place), the delayed fdatasync of what they left written (`SYNC_DELAY`), timed
/// checkpoints, seals, riding out a fault, and the last batch at shutdown.
async fn run(
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    period: Option<(tokio::time::Instant, Duration)>,
) {
    let mut tick = period.map(|(first, p)| {
        let mut i = tokio::time::interval_at(first, p);
        i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        i
    });
    // Batches nobody waits on are written within LINGER (they survive a crash of the process) but made durable
    // only with the next durable batch, or within SYNC_DELAY: a session's start pays one fdatasync, not
    // also one for the previous session's end.
    let mut sync_by: Option<tokio::time::Instant> = None;
    loop {
        let mut force = false;
        let mut sync_only = false;
        let mut seal = false;
        let mut woken = false;
        tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            () = shared.wake.notified() => woken = true,
            () = shared.seal_wake.notified() => seal = true,
            () = async { match sync_by { Some(t) => tokio::time::sleep_until(t).await, None => std::future::pending().await } } => {
                sync_only = true;
            }
            _ = async { match tick.as_mut() { Some(t) => t.tick().await, None => std::future::pending().await } } => {
                force = true;
            }
        }
        if woken && shared.lock().fault_pending.is_none() {
            // Records nobody waits on: let more gather (a durable append meanwhile takes them into its own
            // batch), unless a seal or shutdown comes.
            tokio::select! {
                biased;
                () = shutdown.cancelled() => {}
                () = shared.seal_wake.notified() => seal = true,
                () = tokio::time::sleep(LINGER) => {}
            }
        }
        let Some((w, batch, fault)) = acquire(&shared).await else { return };
        if let Some(mut fault) = fault {
            // A batch failed with the writer: ride it out, then go on.
            sync_by = None;
            for m in batch {
                fault.take(m, shared.cap);
            }
            match ride_out(w, fault, &shutdown, &shared).await {
                Ok(w) => {
                    shared.set_head(&w);
                    shared.pass_on(w);
                    continue;
                }
                Err(reason) => return shared.lose(&reason),
            }
        }
        let work = force || seal || (sync_only && w.is_dirty());
        if batch.is_empty() && !work {
            if sync_only {
                sync_by = None;
            }
            shared.pass_on(w);
            continue;
        }
        let durable = force || sync_only || seal || batch.iter().any(|m| m.ack.is_some());
        let done = commit(w, batch, force, durable, &shared, seal, None).await;
        match (done.writer, done.fatal) {
            (Some(w), None) => {
                sync_by = if w.is_dirty() {
                    sync_by.or_else(|| Some(tokio::time::Instant::now() + SYNC_DELAY))
                } else {
                    None
                };
                shared.pass_on(w);
            }
            (Some(w), Some(reason)) => {
                sync_by = None;
                shared.fault_with(w, &reason, done.held);
            }
            (None, reason) => return shared.lose(reason.as_deref().unwrap_or("the audit writer was lost")),
        }
    }
    // Shutdown: refuse new work, write what is queued, then `audit.stopped` and a final checkpoint.
    set_stopped(&shared, "the audit writer has shut down");
    fail_seals(&shared, || AuditError::Stopped { reason: "the audit writer has shut down".into() });
    let Some((mut w, mut rest, fault)) = acquire(&shared).await else { return };
    if let Some(mut fault) = fault {
        for m in rest.drain(..) {
            fault.take(m, shared.cap);
        }
        match ride_out(w, fault, &shutdown, &shared).await {
            Ok(back) => w = back,
            Err(reason) => return shared.lose(&reason),
        }
        rest = std::mem::take(&mut shared.lock().msgs);
    }
    rest.push(Msg { record: Record::new("audit.stopped"), ack: None, queued: None });
    let done = commit(w, rest, true, true, &shared, false, None).await;
    match (done.writer, done.fatal) {
        (Some(w), None) => {
            // Appends queued after the last take were refused (`stopped` is set); nothing is left.
            shared.lock().lost = true;
            drop(w);
        }
        (_, reason) => {
            tracing::error!(
                reason = reason.as_deref().unwrap_or("lost"),
                "audit writer failed while shutting down"
            );
            shared.lose(reason.as_deref().unwrap_or("the audit writer failed while shutting down"));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use warden_test_support::audit_records as records;

    use super::*;

    fn intact(root: &Path) {
        let key = sign::load_or_create(root).unwrap().verifying_key();
        let report = verify::verify_dir(&root.join("audit"), Some(&key)).unwrap();
        assert!(report.intact(), "{:?}", report.problem);
    }

    /// Counts the writer's fdatasyncs in `dir`, each after `pause`.
    fn count_syncs(dir: &Path, pause: Duration) -> Arc<AtomicU64> {
        let n = Arc::new(AtomicU64::new(0));
        let counted = n.clone();
        writer::test_hook::set(
            dir,
            Arc::new(move || {
                counted.fetch_add(1, Ordering::SeqCst);
                std::thread::sleep(pause);
                Ok(())
            }),
        );
        n
    }

    /// 64 senders, 5 durable records each, on a multi-threaded runtime (leaders sync with
    /// `block_in_place`): every one is acknowledged, each sender's records are in the chain in the order it
    /// sent them, with the seqs it was told, and far fewer fdatasyncs than records were made.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_durable_appends_are_acknowledged_in_chain_order_under_few_fsyncs() {
        let root = tempfile::tempdir().unwrap();
        let opts = AuditOptions::in_dir(root.path());
        let shutdown = CancellationToken::new();
        let (audit, handle) = Audit::start_with(&opts, shutdown.clone()).unwrap();
        let syncs = count_syncs(&opts.config.dir, Duration::from_millis(2));
        let tasks: Vec<_> = (0..64u64)
            .map(|s| {
                let audit = audit.clone();
                tokio::spawn(async move {
                    let mut seqs = Vec::new();
                    for i in 0..5u64 {
                        let r = Record::new("test.durable").field("sender", s).field("i", i);
                        seqs.push(audit.append_durable(r).await.unwrap());
                        // A record nobody waits on between them, in the same order.
                        audit.append(Record::new("test.after").field("sender", s).field("i", i)).unwrap();
                    }
                    seqs
                })
            })
            .collect();
        let mut told = Vec::new();
        for t in tasks {
            told.push(t.await.unwrap());
        }
        let synced = syncs.load(Ordering::SeqCst);
        shutdown.cancel();
        handle.await.unwrap();
        let all = records(&opts.config.dir);
        for (s, seqs) in told.iter().enumerate() {
            assert!(seqs.windows(2).all(|w| w[0] < w[1]), "sender {s}: {seqs:?}");
            for (i, seq) in seqs.iter().enumerate() {
                let r = &all[usize::try_from(*seq).unwrap()];
                assert_eq!(
                    (r["event"].as_str(), r["sender"].as_u64(), r["i"].as_u64()),
                    (Some("test.durable"), Some(s as u64), Some(i as u64))
                );
            }
            // The record it queued after each durable one comes after it in the chain.
            let after: Vec<u64> = all
                .iter()
                .filter(|r| r["event"] == "test.after" && r["sender"] == s)
                .map(|r| r["seq"].as_u64().unwrap())
                .collect();
            assert_eq!(after.len(), 5);
            assert!(seqs.iter().zip(&after).all(|(d, a)| d < a), "sender {s}: {seqs:?} {after:?}");
        }
        assert!(synced < 320 / 2, "{synced} fdatasyncs for 320 durable records");
        intact(root.path());
    }

    /// A lone durable append on a multi-threaded runtime is made durable by its own task, in one fdatasync.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lone_durable_append_pays_one_fsync() {
        let root = tempfile::tempdir().unwrap();
        let opts = AuditOptions::in_dir(root.path());
        let shutdown = CancellationToken::new();
        let (audit, handle) = Audit::start_with(&opts, shutdown.clone()).unwrap();
        let syncs = count_syncs(&opts.config.dir, Duration::ZERO);
        for i in 0..10u64 {
            audit.append_durable(Record::new("test.one").field("i", i)).await.unwrap();
        }
        assert_eq!(syncs.load(Ordering::SeqCst), 10);
        shutdown.cancel();
        handle.await.unwrap();
        intact(root.path());
    }

    /// The fdatasync of a batch that holds many waiting appends fails: every one of them hears
    /// `Unavailable` (none is acknowledged, none is in the chain), new durable appends are refused until the
    /// writer has resumed on its own, and then everything is acknowledged again and the chain verifies.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_failed_fsync_fails_every_waiter_of_its_batch_and_the_writer_recovers() {
        let root = tempfile::tempdir().unwrap();
        let opts = AuditOptions::in_dir(root.path());
        let shutdown = CancellationToken::new();
        let (audit, handle) = Audit::start_with(&opts, shutdown.clone()).unwrap();
        // The first fdatasync is slow (the others queue behind it), the second fails, then it heals.
        let calls = Arc::new(AtomicU64::new(0));
        let c = calls.clone();
        writer::test_hook::set(
            &opts.config.dir,
            Arc::new(move || match c.fetch_add(1, Ordering::SeqCst) {
                0 => {
                    std::thread::sleep(Duration::from_millis(100));
                    Ok(())
                }
                1 => Err(std::io::Error::from_raw_os_error(nix::libc::ENOSPC)),
                _ => Ok(()),
            }),
        );
        let first = {
            let audit = audit.clone();
            tokio::spawn(async move { audit.append_durable(Record::new("test.first")).await })
        };
        while calls.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let waiters: Vec<_> = (0..16u64)
            .map(|i| {
                let audit = audit.clone();
                tokio::spawn(
                    async move { audit.append_durable(Record::new("test.failed").field("i", i)).await },
                )
            })
            .collect();
        let first_seq = first.await.unwrap().unwrap();
        for w in waiters {
            let r = w.await.unwrap();
            assert!(matches!(r, Err(AuditError::Unavailable { .. })), "{r:?}");
        }
        // Refused at once while it rides the fault out, then acknowledged again.
        let mut refused = 0;
        let resumed_seq = loop {
            match audit.append_durable(Record::new("test.later")).await {
                Ok(seq) => break seq,
                Err(AuditError::Unavailable { .. }) => refused += 1,
                Err(e) => panic!("{e}"),
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        assert!(refused > 0);
        assert!(resumed_seq > first_seq);
        shutdown.cancel();
        handle.await.unwrap();
        let all = records(&opts.config.dir);
        assert!(all.iter().all(|r| r["event"] != "test.failed"), "an unacknowledged record is in the chain");
        let resumed: Vec<_> = all.iter().filter(|r| r["event"] == "audit.resumed").collect();
        assert_eq!(resumed.len(), 1);
        assert!(resumed[0]["reason"].as_str().unwrap().contains("No space"), "{}", resumed[0]["reason"]);
        intact(root.path());
    }

    /// A waiting append whose future is dropped (its session gone) while a batch is being synced: the
    /// writer is handed on to the next waiter, and the dropped one's record is still written.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_dropped_waiter_does_not_take_the_writer_with_it() {
        let root = tempfile::tempdir().unwrap();
        let opts = AuditOptions::in_dir(root.path());
        let shutdown = CancellationToken::new();
        let (audit, handle) = Audit::start_with(&opts, shutdown.clone()).unwrap();
        let syncs = count_syncs(&opts.config.dir, Duration::from_millis(50));
        let first = {
            let audit = audit.clone();
            tokio::spawn(async move { audit.append_durable(Record::new("test.first")).await })
        };
        while syncs.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let dropped =
            tokio::time::timeout(Duration::from_millis(5), audit.append_durable(Record::new("test.dropped")))
                .await;
        assert!(dropped.is_err(), "the batch before it is still being synced");
        let next = {
            let audit = audit.clone();
            tokio::spawn(async move { audit.append_durable(Record::new("test.next")).await })
        };
        first.await.unwrap().unwrap();
        let next_seq = next.await.unwrap().unwrap();
        // And again, with nobody else waiting when the writer is handed to the dropped one.
        let third = {
            let audit = audit.clone();
            tokio::spawn(async move { audit.append_durable(Record::new("test.third")).await })
        };
        while syncs.load(Ordering::SeqCst) < 3 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let gone =
            tokio::time::timeout(Duration::from_millis(5), audit.append_durable(Record::new("test.gone")))
                .await;
        assert!(gone.is_err());
        third.await.unwrap().unwrap();
        let last = audit.append_durable(Record::new("test.last")).await.unwrap();
        assert!(last > next_seq);
        shutdown.cancel();
        handle.await.unwrap();
        let events: Vec<String> =
            records(&opts.config.dir).iter().map(|r| r["event"].as_str().unwrap().to_owned()).collect();
        for e in ["test.first", "test.dropped", "test.next", "test.third", "test.gone", "test.last"] {
            assert!(events.iter().any(|x| x == e), "{e} missing: {events:?}");
        }
        intact(root.path());
    }

    /// On the tests' current-thread runtime (no `block_in_place`) the same commit path works.
    #[tokio::test]
    async fn durable_appends_on_a_current_thread_runtime() {
        let root = tempfile::tempdir().unwrap();
        let opts = AuditOptions::in_dir(root.path());
        let shutdown = CancellationToken::new();
        let (audit, handle) = Audit::start_with(&opts, shutdown.clone()).unwrap();
        let tasks: Vec<_> = (0..20u64)
            .map(|i| {
                let audit = audit.clone();
                tokio::spawn(async move { audit.append_durable(Record::new("test.ct").field("i", i)).await })
            })
            .collect();
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        shutdown.cancel();
        handle.await.unwrap();
        intact(root.path());
    }
}
