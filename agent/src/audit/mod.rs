//! The audit record: one writer task owns the hash-chained JSON-lines files; everyone else hands it
//! records through a bounded queue.
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
//! one fdatasync per batch). A record appended with [`Audit::append`] is written to the file within a
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
use tokio::sync::{mpsc, oneshot};
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

struct Msg {
    record: Record,
    ack: Option<oneshot::Sender<Result<u64, AuditError>>>,
    /// While the writer cannot write, hold it rather than refuse it ([`Audit::append_or_hold`]).
    hold: bool,
    /// When a durable append was queued (for the set-up breakdown).
    queued: Option<Instant>,
}

#[derive(Debug)]
struct Shared {
    /// Why appends are refused (writer failed or stopped); `None` while healthy.
    stopped: Mutex<Option<String>>,
    /// Why the writer cannot write now (disk full, no descriptors, an I/O error) while it retries; `None`
    /// while it writes. Durable appends are refused meanwhile; the others are held (see [`Fault`]).
    fault: Mutex<Option<String>>,
    /// Whether `stopped` or `fault` may be set: appends read those locks only then (one load per
    /// append while healthy). Set before either is set, cleared after `fault` is cleared.
    troubled: std::sync::atomic::AtomicBool,
    /// Durable appends the handle refused at once during a fault, for `audit.resumed`.
    refused: std::sync::atomic::AtomicU64,
    /// Where the chain stands after the last batch.
    head: Mutex<Head>,
    /// Wakes the writer to seal its current file ([`Audit::seal`]).
    seal_wake: tokio::sync::Notify,
    /// Ends the writer's linger at once: a durable append is waiting ([`LINGER`]).
    urgent: tokio::sync::Notify,
    seal_waiters: Mutex<Vec<oneshot::Sender<Result<bool, AuditError>>>>,
    /// How many files the writer has sealed since it started; the shipper waits on changes.
    sealed: tokio::sync::watch::Sender<u64>,
}

impl Default for Shared {
    fn default() -> Self {
        Self {
            stopped: Mutex::default(),
            fault: Mutex::default(),
            troubled: std::sync::atomic::AtomicBool::new(false),
            refused: std::sync::atomic::AtomicU64::new(0),
            head: Mutex::default(),
            seal_wake: tokio::sync::Notify::new(),
            urgent: tokio::sync::Notify::new(),
            seal_waiters: Mutex::default(),
            sealed: tokio::sync::watch::Sender::new(0),
        }
    }
}

/// A handle to the writer; cheap to clone.
#[derive(Clone)]
pub struct Audit {
    tx: mpsc::Sender<Msg>,
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

const MAX_BATCH: usize = 4096;
/// How long the writer lets records nobody waits on gather before it writes them: one write (and one
/// wake-up of the writer) per millisecond rather than per record, at a PostgreSQL session's statement
/// rate. A durable append, a seal or shutdown ends the wait at once.
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
        let (tx, rx) = mpsc::channel(opts.config.queue.max(1));
        let shared = Arc::new(Shared { head: Mutex::new(w.head()), ..Shared::default() });
        let failed = CancellationToken::new();
        let audit =
            Audit { tx, shared: shared.clone(), failed: failed.clone(), dir: opts.config.dir.clone() };
        let period =
            (opts.config.checkpoint_seconds > 0).then(|| Duration::from_secs(opts.config.checkpoint_seconds));
        let handle = tokio::spawn(run(w, rx, shutdown, shared, failed, period));
        Ok((audit, handle))
    }

    /// Fires when the writer can no longer write (disk full, I/O error): end live sessions with
    /// [`Audit::stopped_reason`] as the reason. After that every append is refused.
    pub fn failed(&self) -> CancellationToken {
        self.failed.clone()
    }

    /// Why appends are refused, if they are.
    pub fn stopped_reason(&self) -> Option<String> {
        self.shared.stopped.lock().ok().and_then(|g| g.clone())
    }

    /// Why the writer cannot make records durable right now, while it retries (durable appends are
    /// refused meanwhile), if it cannot.
    pub fn unavailable_reason(&self) -> Option<String> {
        self.shared.fault.lock().ok().and_then(|g| g.clone())
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
        let max = self.tx.max_capacity();
        (max - self.tx.capacity(), max)
    }

    fn send(&self, msg: Msg) -> Result<(), AuditError> {
        if self.shared.troubled.load(std::sync::atomic::Ordering::Acquire) {
            if let Some(reason) = self.stopped_reason() {
                return Err(AuditError::Stopped { reason });
            }
            if !msg.hold
                && let Some(reason) = self.unavailable_reason()
            {
                self.shared.refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return Err(AuditError::Unavailable { reason });
            }
        }
        self.tx.try_send(msg).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => AuditError::QueueFull,
            mpsc::error::TrySendError::Closed(_) => AuditError::Stopped {
                reason: self.stopped_reason().unwrap_or_else(|| "the audit writer has shut down".into()),
            },
        })
    }

    /// Appends a record and waits until it is durable (fsync'd). Returns its `seq`. Fails at once with
    /// `QueueFull` when the queue is full, with `Unavailable` while the writer cannot write (it retries),
    /// and with `Stopped` once the writer has failed for good or shut down.
    pub async fn append_durable(&self, record: Record) -> Result<u64, AuditError> {
        let (ack, done) = oneshot::channel();
        self.send(Msg { record, ack: Some(ack), hold: false, queued: Some(Instant::now()) })?;
        self.shared.urgent.notify_one();
        done.await.unwrap_or_else(|_| {
            Err(AuditError::Stopped {
                reason: self.stopped_reason().unwrap_or_else(|| "the audit writer has shut down".into()),
            })
        })
    }

    /// Queues a record without waiting for the disk; fails at once when the queue is full, and with
    /// `Unavailable` while the writer cannot write (a protocol handler that records before it forwards
    /// then ends its session).
    pub fn append(&self, record: Record) -> Result<(), AuditError> {
        self.send(Msg { record, ack: None, hold: false, queued: None })
    }

    /// Like [`Audit::append`] for a record of something already done (a session's end, a refusal already
    /// enforced): while the writer cannot write, it is held in memory (at most `audit.queue` records; past
    /// that counted in `audit.resumed` as `dropped`) and written when the writer resumes.
    pub fn append_or_hold(&self, record: Record) -> Result<(), AuditError> {
        self.send(Msg { record, ack: None, hold: true, queued: None })
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

fn set_fault(shared: &Shared, reason: Option<&str>) {
    use std::sync::atomic::Ordering;
    if reason.is_some() {
        shared.troubled.store(true, Ordering::Release);
    }
    if let Ok(mut g) = shared.fault.lock() {
        *g = reason.map(str::to_owned);
        if reason.is_none() {
            // Under the `stopped` lock, as `set_stopped` sets it, so neither store undoes the other.
            match shared.stopped.lock() {
                Ok(s) => shared.troubled.store(s.is_some(), Ordering::Release),
                Err(_) => shared.troubled.store(true, Ordering::Release),
            }
        }
    }
}

fn set_stopped(shared: &Shared, reason: &str) {
    let mut g = shared.stopped.lock();
    shared.troubled.store(true, std::sync::atomic::Ordering::Release);
    if let Ok(g) = &mut g
        && g.is_none()
    {
        **g = Some(reason.to_owned());
    }
}

/// Runs one batch on the blocking pool (write + fdatasync, then a seal when asked), then answers every
/// waiter.
async fn commit(
    w: writer::Writer,
    batch: Vec<Msg>,
    force_checkpoint: bool,
    sync: bool,
    shared: &Shared,
    seal: bool,
) -> (Option<writer::Writer>, Option<String>, Vec<Record>) {
    let queued: Vec<Instant> = batch.iter().filter_map(|m| m.queued).collect();
    let (records, acks): (Vec<Record>, Vec<_>) = batch.into_iter().map(|m| (m.record, m.ack)).unzip();
    // A batch nobody waits on is one write to the page cache: done in place, since handing the worker
    // to another thread (block_in_place) costs more than the write (thread wake-ups and switches for
    // every batch of a busy PostgreSQL session's records).
    let inline = !sync && !seal;
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
    let held = answer(acks, outcome.results, outcome.records, outcome.fatal.as_deref());
    (w, outcome.fatal, held)
}

/// Answers each record's waiter, if it has one, with its result. After a failed write (`fatal`), a record
/// that was not written is `Unavailable` to its waiter; one nobody waits on is given back, to be held and
/// written when the writer resumes.
fn answer(
    acks: Vec<Option<oneshot::Sender<Result<u64, AuditError>>>>,
    results: Vec<Result<u64, AuditError>>,
    records: Vec<Record>,
    fatal: Option<&str>,
) -> Vec<Record> {
    let mut held = Vec::new();
    let mut results = results.into_iter();
    let mut records = records.into_iter();
    for ack in acks {
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
            Some(ack) => {
                let _ = ack.send(result);
            }
            None if matches!(result, Err(AuditError::Unavailable { .. })) => held.extend(record),
            None => {}
        }
    }
    held
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
                let _ = ack.send(Err(AuditError::Unavailable { reason: self.last.clone() }));
            }
            None if self.held.len() < hold => self.held.push(m.record),
            None => self.dropped += 1,
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
        let mut again = answer(acks, outcome.results, outcome.records, Some(&reason));
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

/// While the writer cannot write: refuses durable appends, holds the others (up to `hold`), answers seals
/// with the fault, and tries to resume after a backoff (100 ms doubling to 2 s). Returns the writer once it
/// has resumed, or `None` when shutdown came and a last attempt failed too (the held records are lost and
/// logged).
async fn ride_out(
    w: writer::Writer,
    mut fault: Fault,
    rx: &mut mpsc::Receiver<Msg>,
    shutdown: &CancellationToken,
    shared: &Shared,
) -> Option<writer::Writer> {
    let hold = rx.max_capacity();
    let mut w = Some(w);
    let mut delay = RETRY_FIRST;
    let retry = tokio::time::sleep(delay);
    tokio::pin!(retry);
    let mut open = true;
    loop {
        let last_try = tokio::select! {
            biased;
            () = shutdown.cancelled() => true,
            msg = rx.recv(), if open => {
                match msg {
                    Some(m) => fault.take(m, hold),
                    None => open = false,
                }
                continue;
            }
            () = shared.seal_wake.notified() => {
                fail_seals(shared, || AuditError::Unavailable { reason: fault.last.clone() });
                continue;
            }
            () = &mut retry => false,
        };
        let writer = w.take()?;
        // Durable appends the handle refused at once count as refused too.
        fault.refused += shared.refused.swap(0, std::sync::atomic::Ordering::Relaxed);
        let (back, f, resumed) = resume(writer, fault).await;
        fault = f;
        w = back;
        if resumed {
            set_fault(shared, None);
            fault.refused += shared.refused.swap(0, std::sync::atomic::Ordering::Relaxed);
            tracing::warn!(
                since = %crate::timestamp::format(fault.since),
                attempts = fault.attempts,
                refused = fault.refused,
                dropped = fault.dropped,
                "audit writer resumed"
            );
            return w;
        }
        if w.is_none() {
            tracing::error!(reason = %fault.last, "audit writer lost");
            return None;
        }
        set_fault(shared, Some(&fault.last));
        if last_try {
            tracing::error!(reason = %fault.last, lost = fault.held.len(), "audit writer could not resume before shutdown; held records lost");
            return None;
        }
        tracing::debug!(reason = %fault.last, attempts = fault.attempts, "audit writer still cannot write");
        delay = (delay * 2).min(RETRY_MAX);
        retry.as_mut().reset(tokio::time::Instant::now() + delay);
    }
}

/// Runs the writer's blocking work (write, fdatasync) where it costs the fewest thread hand-offs. On the
/// multi-threaded runtime the writer task's own worker does it (`block_in_place`: the worker's other tasks
/// move to another thread meanwhile), so no thread has to be woken to start the batch, and the sessions
/// waiting on it are answered by the thread that made it durable. Elsewhere (the tests' current-thread
/// runtimes) on the blocking pool, as before. With `inline` (no fdatasync in the batch: a write to the
/// page cache, and the rare rotation), right here. A panic in `f` is returned as an error either way.
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

async fn run(
    w: writer::Writer,
    mut rx: mpsc::Receiver<Msg>,
    shutdown: CancellationToken,
    shared: Arc<Shared>,
    failed: CancellationToken,
    period: Option<Duration>,
) {
    let mut w = Some(w);
    let mut tick = period.map(|p| {
        let mut i = tokio::time::interval_at(tokio::time::Instant::now() + p, p);
        i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        i
    });
    // Batches nobody waits on are written within LINGER (they survive a crash of the process) but made durable
    // only with the next durable batch, or within SYNC_DELAY: a session's start pays one fdatasync, not
    // also one for the previous session's end.
    let mut sync_by: Option<tokio::time::Instant> = None;
    loop {
        let mut batch = Vec::new();
        let mut force = false;
        let mut sync_only = false;
        let mut seal = false;
        tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            msg = rx.recv() => match msg {
                Some(m) => batch.push(m),
                None => break,
            },
            () = shared.seal_wake.notified() => seal = true,
            () = async { match sync_by { Some(t) => tokio::time::sleep_until(t).await, None => std::future::pending().await } } => {
                sync_only = true;
            }
            _ = async { match tick.as_mut() { Some(t) => t.tick().await, None => std::future::pending().await } } => {
                force = true;
            }
        }
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(m) => batch.push(m),
                Err(_) => break,
            }
        }
        if !batch.is_empty() && !force && !seal && batch.iter().all(|m| m.ack.is_none()) {
            // Only records nobody waits on: let more gather (not polling the queue, so senders do not
            // wake the writer meanwhile), unless something urgent comes.
            tokio::select! {
                biased;
                () = shutdown.cancelled() => {}
                () = shared.urgent.notified() => {}
                () = shared.seal_wake.notified() => seal = true,
                () = tokio::time::sleep(LINGER) => {}
            }
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(m) => batch.push(m),
                    Err(_) => break,
                }
            }
        }
        let durable = force || sync_only || seal || batch.iter().any(|m| m.ack.is_some());
        let Some(writer) = w.take() else { break };
        let (back, fatal, held) = commit(writer, batch, force, durable, &shared, seal).await;
        w = back;
        if let Some(reason) = &fatal
            && let Some(writer) = w.take()
        {
            // A failure the writer can ride out: refuse what must be durable, hold the rest, retry.
            tracing::error!(%reason, "audit writer cannot write; refusing new sessions until it can, retrying");
            set_fault(&shared, Some(reason));
            fail_seals(&shared, || AuditError::Unavailable { reason: reason.clone() });
            let fault = Fault::new(writer.now(), reason.clone(), held);
            w = ride_out(writer, fault, &mut rx, &shutdown, &shared).await;
            if let (Some(wr), Ok(mut head)) = (&w, shared.head.lock()) {
                *head = wr.head();
            }
            sync_by = None;
            if w.is_none() {
                break;
            }
            continue;
        }
        if let (Some(wr), Ok(mut head)) = (&w, shared.head.lock()) {
            *head = wr.head();
        }
        sync_by = match &w {
            Some(wr) if wr.is_dirty() => sync_by.or_else(|| Some(tokio::time::Instant::now() + SYNC_DELAY)),
            _ => None,
        };
        if let Some(reason) = fatal {
            tracing::error!(%reason, "audit writer failed; refusing new sessions and ending live ones");
            set_stopped(&shared, &reason);
            fail_seals(&shared, || AuditError::Stopped { reason: reason.clone() });
            failed.cancel();
            rx.close();
            while let Some(m) = rx.recv().await {
                if let Some(ack) = m.ack {
                    let _ = ack.send(Err(AuditError::Stopped { reason: reason.clone() }));
                }
            }
            return;
        }
    }
    // Shutdown: refuse new work, write what is queued, then `audit.stopped` and a final checkpoint.
    set_stopped(&shared, "the audit writer has shut down");
    fail_seals(&shared, || AuditError::Stopped { reason: "the audit writer has shut down".into() });
    rx.close();
    let mut rest = Vec::new();
    while let Ok(m) = rx.try_recv() {
        rest.push(m);
    }
    rest.push(Msg { record: Record::new("audit.stopped"), ack: None, hold: false, queued: None });
    if let Some(writer) = w.take() {
        let (_, fatal, _) = commit(writer, rest, true, true, &shared, false).await;
        if let Some(reason) = fatal {
            tracing::error!(%reason, "audit writer failed while shutting down");
            failed.cancel();
        }
    }
}
