//! `state_dir/grants.json`: the on-disk form of live grants and of spent ones (so a restart renews
//! nothing), written atomically (temp file, fsync, rename, fsync of the directory), mode 0600.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::GrantError;

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
