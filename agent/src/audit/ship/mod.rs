//! Shipping sealed audit segments to S3-compatible object storage under Object Lock, and verifying or
//! exporting a host's chain from the bucket alone.
//!
//! # In the bucket
//!
//! Under the host's prefix `P` (`[audit.ship] prefix` with `{host}` replaced, e.g. `hosts/web-1/`):
//!
//! - `P/pubkey`: the host's Ed25519 public key, 64 hex digits and a newline, written once
//!   (`If-None-Match: *`) with a COMPLIANCE lock the shipper extends to `retention` from now at every start
//!   and daily, so it outlives every segment. Verify trusts the *oldest* version of this key (or
//!   `--pubkey`): whoever takes the host's root later cannot replace the key the bucket first held.
//! - `P/recordings/<name>.cast`: the terminal recordings a segment's `ssh.recording` records name, byte
//!   for byte, written once like segments (same lock, checksums, `sha256` metadata) and before the
//!   segment, so a shipped segment's recordings are always in the bucket; `verify --s3` checks each
//!   against the `sha256` its record holds.
//! - `P/segments/audit-<first seq, 20 digits>.jsonl`: one sealed file of the writer, byte for byte. The
//!   key is the segment's identity (its first seq; a sealed file never changes), so shipping it again
//!   after a crash finds the same key. With shipping on, every sealed file ends in a signed checkpoint,
//!   so each object is signed on its own. Each is written once (`If-None-Match: *`) with Object Lock
//!   COMPLIANCE until `retention` from the upload, `Content-MD5` and `x-amz-checksum-sha256` (the storage
//!   refuses a body that does not match) and metadata `sha256`, `first-seq`, `last-seq`, `last-hash`.
//!   Later versions of a key (someone with write access putting again) never replace the first one for
//!   verify, which reads the oldest version of every key.
//!
//! # On the host
//!
//! The writer seals its current file on rotation and, asked by the shipper, at least every `interval`
//! when the file holds anything but checkpoints and `audit.shipped` records (so a quiet host does not
//! ship its own bookkeeping every minute). The shipper uploads sealed files oldest first, records each
//! upload as `audit.shipped` (`segment`, `first_seq`, `last_seq`, `key`, `sha256`, `version_id`, `bytes`,
//! `retain_until`), then raises `audit.dir/shipped` to the segment's last seq. Retention deletes only
//! files at or below that mark. While the storage is unreachable it retries with backoff (1 s doubling
//! to 5 min) and files stay on disk. A segment whose key already holds other bytes is never overwritten:
//! the shipper records `audit.ship_conflict` once and stops shipping (the chain in the bucket would
//! otherwise fork); an operator must look.

mod config;
mod progress;
pub mod remote;
pub mod s3;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use ed25519_dalek::VerifyingKey;
use time::OffsetDateTime;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use config::{ShipConfig, check_endpoint};
pub use progress::{LastError, LastShipped, Pending, Progress, ShipStatus, Shipping, pending};
pub use remote::Location;
pub use s3::{Connection, Store};

use super::{Audit, AuditError, Record, files, format, sign};

#[derive(Debug, thiserror::Error)]
pub enum ShipError {
    #[error("audit.ship: {reason}")]
    Config { reason: String },
    #[error("cannot {op} {key}: {reason}")]
    Request { op: &'static str, key: String, reason: String },
    #[error("{key}: {reason}")]
    Conflict { key: String, reason: String },
    #[error("{path}: {reason}")]
    Segment { path: PathBuf, reason: String },
    #[error(transparent)]
    Audit(#[from] AuditError),
}

/// The key of a segment under the host prefix.
pub fn segment_key(prefix: &str, file_name: &str) -> String {
    format!("{prefix}segments/{file_name}")
}

/// The key of a terminal recording (`recordings/...`, as its `ssh.recording` record names it) under the
/// host prefix.
pub fn recording_key(prefix: &str, name: &str) -> String {
    format!("{prefix}{name}")
}

/// The key of the host's public key under the host prefix.
pub fn pubkey_key(prefix: &str) -> String {
    format!("{prefix}pubkey")
}

/// Counters of one shipper, for the bench and `status`.
#[derive(Debug, Default)]
pub struct Stats {
    /// Requests sent to the storage (puts, heads, gets, lists, retention updates).
    pub requests: AtomicU64,
    pub segments: AtomicU64,
    pub bytes: AtomicU64,
    pub failures: AtomicU64,
    /// The last segment shipped, the last error, the next attempt.
    pub progress: Progress,
}

/// Everything the shipper needs.
#[derive(Clone)]
pub struct ShipOptions {
    pub store: Store,
    /// This host's key prefix, ending in `/`.
    pub prefix: String,
    pub audit_dir: PathBuf,
    pub pubkey: VerifyingKey,
    pub retention: Duration,
    pub interval: Duration,
    pub stats: Arc<Stats>,
}

/// Starts the shipper when `[audit.ship]` is on: builds the client, then ships until `shutdown`. Returns
/// the task and the view `status` reads.
pub async fn spawn(
    config: &ShipConfig,
    audit: &Audit,
    state_dir: &Path,
    host: &str,
    shutdown: CancellationToken,
) -> Result<Option<(JoinHandle<()>, Shipping)>, ShipError> {
    if !config.enabled() {
        return Ok(None);
    }
    let store = Store::connect(&config.connection(), config.bucket.get_ref()).await?;
    let key = sign::load(state_dir)?;
    let opts = ShipOptions {
        store,
        prefix: config.host_prefix(host),
        audit_dir: audit.dir().to_path_buf(),
        pubkey: key.verifying_key(),
        retention: config.retention(),
        interval: config.interval(),
        stats: Arc::default(),
    };
    tracing::info!(bucket = config.bucket.get_ref(), prefix = %opts.prefix, "audit shipping on");
    let shipping = Shipping {
        bucket: config.bucket.get_ref().clone(),
        prefix: opts.prefix.clone(),
        audit_dir: opts.audit_dir.clone(),
        stats: opts.stats.clone(),
    };
    Ok(Some((tokio::spawn(run(opts, audit.clone(), shutdown)), shipping)))
}

const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(300);
const KEY_REFRESH: Duration = Duration::from_secs(86_400);

/// Ships until `shutdown`: seals every `interval`, ships whatever is sealed, retries with backoff.
pub async fn run(opts: ShipOptions, audit: Audit, shutdown: CancellationToken) {
    let mut shipper = Shipper::new(opts, audit);
    let mut sealed = shipper.audit.sealed();
    let mut tick =
        tokio::time::interval_at(tokio::time::Instant::now() + shipper.o.interval, shipper.o.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut backoff = BACKOFF_MIN;
    let mut retry_at: Option<tokio::time::Instant> = None;
    let stats = shipper.o.stats.clone();
    let interval = shipper.o.interval;
    stats.progress.next_attempt(SystemTime::now() + interval);
    loop {
        if retry_at.is_none_or(|t| t <= tokio::time::Instant::now()) {
            // Cancelling mid-upload is safe: the next start finds the key and checks its bytes.
            let outcome = tokio::select! {
                () = shutdown.cancelled() => break,
                r = shipper.ship_pending() => r,
            };
            match outcome {
                Ok(()) => {
                    if retry_at.take().is_some() {
                        stats.progress.next_attempt(SystemTime::now() + interval);
                    }
                    backoff = BACKOFF_MIN;
                }
                Err(e) => {
                    stats.failures.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(error = %e, retry_in = ?backoff, "audit shipping failed; segments stay on disk");
                    shipper.note_failure(&e);
                    let stopped = shipper.conflict.clone();
                    stats.progress.failed(e.to_string(), stopped);
                    stats.progress.next_attempt(SystemTime::now() + backoff);
                    retry_at = Some(tokio::time::Instant::now() + backoff);
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
        tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            _ = tick.tick() => {
                if retry_at.is_none() {
                    stats.progress.next_attempt(SystemTime::now() + interval);
                }
                if let Err(e) = shipper.audit.seal().await {
                    tracing::debug!(error = %e, "audit seal refused");
                }
            }
            r = sealed.changed() => if r.is_err() { break },
            () = async { match retry_at { Some(t) => tokio::time::sleep_until(t).await, None => std::future::pending().await } } => {}
        }
    }
}

/// Ships sealed segments in order; one per call of [`Shipper::ship_pending`] loop iteration.
pub struct Shipper {
    o: ShipOptions,
    audit: Audit,
    key_checked: Option<tokio::time::Instant>,
    /// Whether a segment was shipped since start: the first one is looked up before it is put, in
    /// case a crash came between an upload and its record.
    shipped_since_start: bool,
    /// A key holding other bytes than the segment: shipping stops there.
    conflict: Option<String>,
    conflict_recorded: bool,
}

impl Shipper {
    pub fn new(o: ShipOptions, audit: Audit) -> Self {
        Self {
            o,
            audit,
            key_checked: None,
            shipped_since_start: false,
            conflict: None,
            conflict_recorded: false,
        }
    }

    pub fn stats(&self) -> Arc<Stats> {
        self.o.stats.clone()
    }

    fn count(&self, n: u64) {
        self.o.stats.requests.fetch_add(n, Ordering::Relaxed);
    }

    fn note_failure(&mut self, e: &ShipError) {
        if let ShipError::Conflict { key, reason } = e
            && !self.conflict_recorded
        {
            self.conflict_recorded = true;
            let _ = self
                .audit
                .append(Record::new("audit.ship_conflict").field("key", key).field("reason", reason));
        }
    }

    /// Publishes (or checks) the public key, then ships every sealed, unshipped segment, oldest first.
    pub async fn ship_pending(&mut self) -> Result<(), ShipError> {
        if let Some(reason) = &self.conflict {
            return Err(ShipError::Conflict { key: self.o.prefix.clone(), reason: reason.clone() });
        }
        if self.key_checked.is_none_or(|t| t.elapsed() >= KEY_REFRESH) {
            self.publish_key().await?;
            self.key_checked = Some(tokio::time::Instant::now());
        }
        loop {
            let shipped = files::read_shipped(&self.o.audit_dir)?;
            let listed = files::list_writer_files(&self.o.audit_dir)?;
            // Every file but the newest is sealed; the newest is being written.
            let next = listed.windows(2).find_map(|w| {
                let last_seq = w[1].0.checked_sub(1)?;
                (shipped.is_none_or(|m| m < last_seq)).then(|| (w[0].1.clone(), w[0].0, last_seq))
            });
            let Some((path, first_seq, last_seq)) = next else { return Ok(()) };
            self.ship_one(&path, first_seq, last_seq).await?;
        }
    }

    async fn publish_key(&mut self) -> Result<(), ShipError> {
        let key = pubkey_key(&self.o.prefix);
        let body = format!("{}\n", sign::pubkey_hex(&self.o.pubkey)).into_bytes();
        let sums = s3::Checksums::of(&body);
        let until = OffsetDateTime::now_utc() + self.o.retention;
        self.count(1);
        match self.o.store.put_locked(&key, body.clone(), &sums, until, &[]).await? {
            s3::Put::Created { version_id } => {
                self.audit
                    .append_durable(
                        Record::new("audit.pubkey_published")
                            .field("key", &key)
                            .field("pubkey", sign::pubkey_hex(&self.o.pubkey))
                            .field("version_id", version_id)
                            .field("retain_until", crate::timestamp::format(until)),
                    )
                    .await?;
                Ok(())
            }
            s3::Put::Exists => {
                // The first version is the one verify trusts: it must be ours.
                self.count(1);
                let versions = self.o.store.versions(&key).await?;
                let first = remote::oldest(&versions, &key).ok_or_else(|| ShipError::Conflict {
                    key: key.clone(),
                    reason: "the key exists but lists no version".into(),
                })?;
                self.count(1);
                let (held, head) = self.o.store.get(&key, first.version_id.as_deref()).await?;
                if held != body {
                    let reason = format!(
                        "the bucket holds another public key for this host ({}); verify would trust it, not \
                         this host's key: check the prefix (two hosts with one name?) or the key file",
                        String::from_utf8_lossy(&held).trim()
                    );
                    self.conflict = Some(reason.clone());
                    return Err(ShipError::Conflict { key, reason });
                }
                if head.retain_until.is_none_or(|t| t < until - Duration::from_secs(86_400)) {
                    self.count(1);
                    self.o.store.extend_retention(&key, first.version_id.as_deref(), until).await?;
                }
                Ok(())
            }
        }
    }

    async fn ship_one(&mut self, path: &Path, first_seq: u64, last_seq: u64) -> Result<(), ShipError> {
        let bytes = std::fs::read(path).map_err(|source| AuditError::io("read", path, source))?;
        let last_line = check_segment(path, &bytes, first_seq, last_seq)?;
        let mut recordings = Vec::new();
        for rec in files::recordings_named(path)? {
            if let Some(key) = self.ship_recording(&rec).await? {
                recordings.push(key);
            }
        }
        let name = files::file_name(first_seq);
        let key = segment_key(&self.o.prefix, &name);
        let sums = s3::Checksums::of(&bytes);
        let sha256 = sums.sha256_hex();
        let len = bytes.len() as u64;
        let until = OffsetDateTime::now_utc() + self.o.retention;
        let meta = [
            ("first-seq", first_seq.to_string()),
            ("last-seq", last_seq.to_string()),
            ("last-hash", last_line.hash.clone()),
        ];
        let mut existing = None;
        if !self.shipped_since_start {
            self.count(1);
            existing = self.o.store.head(&key, None).await?;
        }
        let (version_id, retain_until) = if let Some(head) = existing {
            self.already_there(&key, &head, &sums)?;
            (head.version_id, head.retain_until.unwrap_or(until))
        } else {
            self.count(1);
            match self.o.store.put_locked(&key, bytes, &sums, until, &meta).await? {
                s3::Put::Created { version_id } => (version_id, until),
                s3::Put::Exists => {
                    self.count(1);
                    let head = self.o.store.head(&key, None).await?.ok_or_else(|| ShipError::Request {
                        op: "head",
                        key: key.clone(),
                        reason: "the storage refused the write as existing but has no such key".into(),
                    })?;
                    self.already_there(&key, &head, &sums)?;
                    (head.version_id, head.retain_until.unwrap_or(until))
                }
            }
        };
        self.audit
            .append_durable(
                Record::new("audit.shipped")
                    .field("segment", &name)
                    .field("first_seq", first_seq)
                    .field("last_seq", last_seq)
                    .field("key", &key)
                    .field("sha256", &sha256)
                    .field("version_id", version_id)
                    .field("bytes", len)
                    .field("retain_until", crate::timestamp::format(retain_until))
                    .field("recordings", recordings),
            )
            .await?;
        files::mark_shipped(&self.o.audit_dir, last_seq)?;
        self.shipped_since_start = true;
        self.o.stats.progress.shipped(&name, &key, first_seq, last_seq, len);
        self.o.stats.segments.fetch_add(1, Ordering::Relaxed);
        self.o.stats.bytes.fetch_add(len, Ordering::Relaxed);
        tracing::debug!(%key, first_seq, last_seq, bytes = len, "audit segment shipped");
        Ok(())
    }

    /// Uploads one terminal recording (write-once, locked, checksummed); its key, or `None` when the
    /// file is gone from disk (verify then reports it missing from the bucket).
    async fn ship_recording(&mut self, name: &str) -> Result<Option<String>, ShipError> {
        let path = self.o.audit_dir.join(name);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                tracing::warn!(path = %path.display(), "a recording named in the audit trail is missing; not shipped");
                return Ok(None);
            }
            Err(source) => return Err(AuditError::io("read", &path, source).into()),
        };
        let key = recording_key(&self.o.prefix, name);
        let sums = s3::Checksums::of(&bytes);
        let until = OffsetDateTime::now_utc() + self.o.retention;
        let len = bytes.len() as u64;
        self.count(1);
        if let s3::Put::Exists = self.o.store.put_locked(&key, bytes, &sums, until, &[]).await? {
            self.count(1);
            let head = self.o.store.head(&key, None).await?.ok_or_else(|| ShipError::Request {
                op: "head",
                key: key.clone(),
                reason: "the storage refused the write as existing but has no such key".into(),
            })?;
            self.already_there(&key, &head, &sums)?;
        }
        self.o.stats.bytes.fetch_add(len, Ordering::Relaxed);
        Ok(Some(key))
    }

    /// The key already holds an object: fine when it is these very bytes (shipped before a crash).
    fn already_there(&mut self, key: &str, head: &s3::Head, sums: &s3::Checksums) -> Result<(), ShipError> {
        let same = match (&head.sha256_b64, &head.meta_sha256) {
            (Some(b64), _) => *b64 == sums.sha256_b64(),
            (None, Some(hex)) => *hex == sums.sha256_hex(),
            (None, None) => false,
        };
        if same {
            return Ok(());
        }
        let reason = "the bucket already holds different bytes for this segment; not overwriting it (is \
                      another host shipping under this prefix, or was the local file changed?)"
            .to_owned();
        self.conflict = Some(reason.clone());
        Err(ShipError::Conflict { key: key.to_owned(), reason })
    }
}

/// A sealed file is whole lines, starts at `first_seq` and ends at `last_seq`; returns its last line.
fn check_segment(
    path: &Path,
    bytes: &[u8],
    first_seq: u64,
    last_seq: u64,
) -> Result<format::Line, ShipError> {
    let bad = |reason: String| ShipError::Segment { path: path.to_path_buf(), reason };
    if bytes.last() != Some(&b'\n') {
        return Err(bad("does not end with a whole line; a sealed file never does".into()));
    }
    let body = &bytes[..bytes.len() - 1];
    let first = body.split(|b| *b == b'\n').next().unwrap_or_default();
    let last = body.rsplit(|b| *b == b'\n').next().unwrap_or_default();
    if format::peek_seq(first) != Some(first_seq) {
        return Err(bad(format!("its first record is not seq {first_seq}")));
    }
    let line = format::check_line(last).map_err(|e| bad(format!("its last line: {e}")))?;
    if line.seq != last_seq {
        return Err(bad(format!(
            "its last record is seq {} where the next file starts at {}",
            line.seq,
            last_seq + 1
        )));
    }
    Ok(line)
}
