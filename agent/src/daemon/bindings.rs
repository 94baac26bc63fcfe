//! Bindings: which cgroup runs as which identity. Stored in `state_dir/bindings.json` so a restarted
//! daemon knows the binding numbers its pinned tag map still carries.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// One cgroup bound to an identity.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Binding {
    /// The number the kernel's tag map carries.
    pub id: u32,
    /// Relative to the cgroup2 root, `/a/b`.
    pub cgroup: String,
    pub cgroup_id: u64,
    pub identity: String,
    pub task: Option<String>,
    /// From `[[binding]]` in the config (re-applied at every start) rather than `warden tag`/`exec`.
    pub from_config: bool,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Stored {
    next: u32,
    bindings: BTreeMap<String, Binding>,
}

#[derive(Debug)]
pub struct Bindings {
    path: PathBuf,
    inner: Mutex<Stored>,
}

impl Bindings {
    pub fn open(state_dir: &Path) -> std::io::Result<Self> {
        let path = state_dir.join("bindings.json");
        let stored = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::error!(path = %path.display(), error = %e, "bindings file unreadable; starting without run-time bindings");
                Stored::default()
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Stored::default(),
            Err(e) => return Err(e),
        };
        Ok(Self { path, inner: Mutex::new(stored) })
    }

    /// Adds (or updates) the binding of a cgroup; the id stays if the cgroup was bound before.
    pub fn add(
        &self,
        cgroup: &str,
        cgroup_id: u64,
        identity: &str,
        task: Option<String>,
        from_config: bool,
    ) -> std::io::Result<Binding> {
        let mut s = self.inner.lock().expect("bindings lock");
        let id = if let Some(b) = s.bindings.get(cgroup) {
            b.id
        } else {
            s.next += 1;
            s.next
        };
        let b = Binding {
            id,
            cgroup: cgroup.to_owned(),
            cgroup_id,
            identity: identity.to_owned(),
            task,
            from_config,
        };
        s.bindings.insert(cgroup.to_owned(), b.clone());
        self.save(&s)?;
        Ok(b)
    }

    pub fn remove(&self, cgroup: &str) -> std::io::Result<Option<Binding>> {
        let mut s = self.inner.lock().expect("bindings lock");
        let removed = s.bindings.remove(cgroup);
        self.save(&s)?;
        Ok(removed)
    }

    pub fn by_id(&self, id: u32) -> Option<Binding> {
        self.inner.lock().expect("bindings lock").bindings.values().find(|b| b.id == id).cloned()
    }

    pub fn all(&self) -> Vec<Binding> {
        self.inner.lock().expect("bindings lock").bindings.values().cloned().collect()
    }

    /// Atomic replace: write a temporary file, fsync, rename.
    fn save(&self, s: &Stored) -> std::io::Result<()> {
        let tmp = self.path.with_extension("json.tmp");
        let mut f =
            std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
        f.write_all(&serde_json::to_vec_pretty(s).unwrap_or_default())?;
        f.sync_all()?;
        std::fs::rename(&tmp, &self.path)
    }
}
