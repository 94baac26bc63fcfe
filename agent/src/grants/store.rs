//! `state_dir/grants.json`: the on-disk form of live grants and of spent ones (so a restart renews
//! nothing), written atomically (temp file, fsync, rename, fsync of the directory), mode 0600.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::{Expiry, Grant, GrantError, GrantKey, Phase};
use crate::policy::{Access, Approval};
use crate::timestamp;

pub const FILE: &str = "grants.json";
const VERSION: u32 = 1;

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Stored {
    pub version: u32,
    pub grants: Vec<StoredGrant>,
    pub spent: Vec<StoredSpent>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoredGrant {
    pub id: String,
    pub identity: String,
    pub client_id: String,
    pub cgroup: String,
    pub target: String,
    pub access: String,
    pub rule: String,
    pub ttl_secs: u64,
    pub mask: Vec<String>,
    pub commands: Option<Vec<String>>,
    pub approval: String,
    pub issued_by: String,
    /// RFC 3339.
    pub requested_at: String,
    /// RFC 3339; `None` while pending approval.
    pub expires_at: Option<String>,
}

/// A task (identity + cgroup) whose grant for a target has ended: no automatic grant for it again.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoredSpent {
    pub identity: String,
    pub cgroup: String,
    pub target: String,
    pub grant: String,
    /// `expired`, `revoked by NAME`, or `ended by a policy change: ...`.
    pub how: String,
    /// RFC 3339.
    pub ended_at: String,
}

pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join(FILE)
}

/// Reads the file; a missing file is an empty store, a corrupt one an error (refusing to guess beats
/// forgetting which tasks already used their grant).
pub fn read(path: &Path) -> Result<Stored, GrantError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(Stored { version: VERSION, ..Stored::default() });
        }
        Err(source) => return Err(GrantError::Read { path: path.to_path_buf(), source }),
    };
    let stored: Stored = serde_json::from_str(&text)
        .map_err(|source| GrantError::Corrupt { path: path.to_path_buf(), source })?;
    if stored.version != VERSION {
        return Err(GrantError::Version { path: path.to_path_buf(), found: stored.version });
    }
    Ok(stored)
}

pub fn write(path: &Path, stored: &Stored) -> Result<(), GrantError> {
    let err = |source| GrantError::Write { path: path.to_path_buf(), source };
    let tmp = path.with_extension("json.tmp");
    let mut bytes = serde_json::to_vec_pretty(stored).map_err(|e| err(std::io::Error::other(e)))?;
    bytes.push(b'\n');
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(err)?;
    f.write_all(&bytes).map_err(err)?;
    f.sync_all().map_err(err)?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(err)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(err)?;
    }
    Ok(())
}

impl Stored {
    pub fn new(grants: Vec<StoredGrant>, spent: Vec<StoredSpent>) -> Self {
        Self { version: VERSION, grants, spent }
    }
}

/// What is written for the grant table now.
pub(super) fn snapshot(state: &super::State) -> Stored {
    let grants = state.grants.values().map(stored).collect();
    let spent = state
        .spent
        .iter()
        .map(|(t, s)| StoredSpent {
            identity: t.identity.clone(),
            cgroup: t.cgroup.clone(),
            target: t.target.clone(),
            grant: s.grant.clone(),
            how: s.how.clone(),
            ended_at: timestamp::format_system(s.ended_at),
        })
        .collect();
    Stored::new(grants, spent)
}

fn stored(g: &Grant) -> StoredGrant {
    StoredGrant {
        id: g.id.clone(),
        identity: g.key.identity.clone(),
        client_id: g.key.client_id.clone(),
        cgroup: g.key.cgroup.clone(),
        target: g.key.target.clone(),
        access: g.key.access.as_str().to_owned(),
        rule: g.rule.clone(),
        ttl_secs: g.ttl.as_secs(),
        mask: g.mask.clone(),
        commands: g.commands.clone(),
        approval: g.approval.as_str().to_owned(),
        issued_by: g.issued_by.clone(),
        requested_at: timestamp::format_system(g.requested_at),
        expires_at: g.expiry.get().map(timestamp::format_system),
    }
}

/// A stored grant back in memory; its expiry never moves later, and never leaves more than its TTL.
pub(super) fn restore(s: StoredGrant, now: SystemTime) -> Option<Grant> {
    let Some(access) = Access::parse(&s.access) else {
        tracing::warn!(grant = %s.id, access = %s.access, "dropping a stored grant with an unknown access");
        return None;
    };
    let requested_at = timestamp::parse(&s.requested_at)?;
    let ttl = Duration::from_secs(s.ttl_secs);
    let expires_at = match &s.expires_at {
        None => None,
        Some(t) => Some(timestamp::parse(t)?.min(now + ttl)),
    };
    let phase = if expires_at.is_some() { Phase::Active } else { Phase::Pending };
    Some(Grant {
        id: s.id,
        key: GrantKey {
            identity: s.identity,
            client_id: s.client_id,
            cgroup: s.cgroup,
            target: s.target,
            access,
        },
        rule: s.rule,
        ttl,
        mask: s.mask,
        commands: s.commands,
        approval: if s.approval == "required" { Approval::Required } else { Approval::None },
        issued_by: s.issued_by,
        requested_at,
        expiry: Expiry::new(expires_at),
        phase: watch::Sender::new(phase),
        sessions: Arc::new(AtomicUsize::new(0)),
    })
}
