//! What the shipper has done and will do next, for `warden status`: the last segment shipped, the last
//! error, the next attempt and whether a conflict stopped it; and the segments still waiting on disk,
//! read from the audit directory when asked.

use std::path::Path;
use std::sync::Mutex;
use std::time::SystemTime;

use serde::Serialize;

use super::super::{AuditError, files};
use crate::timestamp::format_system as rfc3339;

/// The shipper's latest news; written by the shipper between requests (never across an await), read
/// by `status`.
#[derive(Debug, Default)]
pub struct Progress(Mutex<Inner>);

#[derive(Debug, Default, Clone)]
struct Inner {
    last_shipped: Option<Shipped>,
    last_error: Option<(SystemTime, String)>,
    next_attempt: Option<SystemTime>,
    stopped: Option<String>,
}

#[derive(Debug, Clone)]
struct Shipped {
    segment: String,
    key: String,
    first_seq: u64,
    last_seq: u64,
    bytes: u64,
    at: SystemTime,
}

impl Progress {
    fn with(&self, f: impl FnOnce(&mut Inner)) {
        f(&mut self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
    }

    pub(super) fn shipped(&self, segment: &str, key: &str, first_seq: u64, last_seq: u64, bytes: u64) {
        let at = SystemTime::now();
        let segment = segment.to_owned();
        let key = key.to_owned();
        self.with(|s| s.last_shipped = Some(Shipped { segment, key, first_seq, last_seq, bytes, at }));
    }

    pub(super) fn failed(&self, error: String, stopped: Option<String>) {
        self.with(|s| {
            s.last_error = Some((SystemTime::now(), error));
            if stopped.is_some() {
                s.stopped = stopped;
            }
        });
    }

    pub(super) fn next_attempt(&self, at: SystemTime) {
        self.with(|s| s.next_attempt = Some(at));
    }

    fn snapshot(&self) -> Inner {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }
}

/// The shipping part of `warden status`.
#[derive(Debug, Clone, Serialize)]
pub struct ShipStatus {
    pub enabled: bool,
    pub bucket: String,
    /// This host's key prefix in the bucket.
    pub prefix: String,
    /// The last seq shipped (`audit.dir/shipped`), across restarts.
    pub shipped_through: Option<u64>,
    /// The last segment this daemon shipped since it started.
    pub last_shipped: Option<LastShipped>,
    /// Sealed files not shipped yet, and their size.
    pub pending: Pending,
    pub last_error: Option<LastError>,
    /// When the shipper next seals and ships (its interval) or retries (after a failure).
    pub next_attempt: Option<String>,
    /// Set when the bucket holds other bytes under one of this host's keys: shipping stopped there.
    pub stopped: Option<String>,
    /// Since the daemon started.
    pub segments_shipped: u64,
    pub bytes_shipped: u64,
    pub failures: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct LastShipped {
    pub segment: String,
    pub key: String,
    pub first_seq: u64,
    pub last_seq: u64,
    pub bytes: u64,
    pub at: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct LastError {
    pub error: String,
    pub at: String,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Pending {
    pub segments: u64,
    pub bytes: u64,
    /// The oldest pending segment's file name.
    pub oldest: Option<String>,
}

/// Sealed files in `dir` (every writer file but the newest) whose records are not all shipped.
pub fn pending(dir: &Path) -> Result<Pending, AuditError> {
    let shipped = files::read_shipped(dir)?;
    let listed = files::list_writer_files(dir)?;
    let mut out = Pending::default();
    for w in listed.windows(2) {
        let Some(last_seq) = w[1].0.checked_sub(1) else { continue };
        if shipped.is_some_and(|m| m >= last_seq) {
            continue;
        }
        out.segments += 1;
        out.bytes += std::fs::metadata(&w[0].1).map_or(0, |m| m.len());
        if out.oldest.is_none() {
            out.oldest = Some(files::file_name(w[0].0));
        }
    }
    Ok(out)
}

/// A running shipper as `status` sees it.
#[derive(Debug, Clone)]
pub struct Shipping {
    pub bucket: String,
    pub prefix: String,
    pub audit_dir: std::path::PathBuf,
    pub stats: std::sync::Arc<super::Stats>,
}

impl Shipping {
    pub fn status(&self) -> ShipStatus {
        use std::sync::atomic::Ordering::Relaxed;
        let s = self.stats.progress.snapshot();
        let (pending, dir_error) = match pending(&self.audit_dir) {
            Ok(p) => (p, None),
            Err(e) => (Pending::default(), Some(e.to_string())),
        };
        let last_error = match (dir_error, s.last_error) {
            (Some(e), _) => Some(LastError { error: e, at: rfc3339(SystemTime::now()) }),
            (None, Some((at, error))) => Some(LastError { error, at: rfc3339(at) }),
            (None, None) => None,
        };
        ShipStatus {
            enabled: true,
            bucket: self.bucket.clone(),
            prefix: self.prefix.clone(),
            shipped_through: files::read_shipped(&self.audit_dir).ok().flatten(),
            last_shipped: s.last_shipped.map(|l| LastShipped {
                segment: l.segment,
                key: l.key,
                first_seq: l.first_seq,
                last_seq: l.last_seq,
                bytes: l.bytes,
                at: rfc3339(l.at),
            }),
            pending,
            last_error,
            next_attempt: s.next_attempt.map(rfc3339),
            stopped: s.stopped,
            segments_shipped: self.stats.segments.load(Relaxed),
            bytes_shipped: self.stats.bytes.load(Relaxed),
            failures: self.stats.failures.load(Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pending_counts_sealed_files_above_the_shipped_mark() {
        let dir = tempfile::tempdir().unwrap();
        for (first, body) in [(1u64, "aaaa\n"), (4, "bb\n"), (9, "c\n")] {
            std::fs::write(dir.path().join(files::file_name(first)), body).unwrap();
        }
        let p = pending(dir.path()).unwrap();
        assert_eq!((p.segments, p.bytes), (2, 8), "the newest file is being written: {p:?}");
        assert_eq!(p.oldest.as_deref(), Some(files::file_name(1).as_str()));
        files::mark_shipped(dir.path(), 3).unwrap();
        let p = pending(dir.path()).unwrap();
        assert_eq!((p.segments, p.bytes, p.oldest), (1, 3, Some(files::file_name(4))));
        files::mark_shipped(dir.path(), 8).unwrap();
        assert_eq!(pending(dir.path()).unwrap().segments, 0);
    }
}
