//! Who opened a connection the proxy accepted: the kernel's origin record, turned into the daemon's
//! terms (process, user, cgroup path, original destination, wall-clock time). [`Origins`] is the seam the
//! proxy asks; [`KernelOrigins`] (the kernel's maps) is the production source.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::bpf::{Kernel, socket_addr};

/// The origin of one redirected connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnOrigin {
    /// Process id (the kernel's tgid) and thread id.
    pub pid: u32,
    pub tid: u32,
    pub uid: u32,
    pub gid: u32,
    /// The process's own cgroup id and its path relative to the cgroup2 root (`/a/b`).
    pub cgroup_id: u64,
    pub cgroup: String,
    /// The tagged cgroup whose binding applies.
    pub tagged_cgroup: u64,
    pub binding: u32,
    pub target: u32,
    /// Where the process was connecting to.
    pub dst: SocketAddr,
    /// When it called connect().
    pub at: SystemTime,
}

/// Where the proxy learns who opened an accepted connection.
pub trait Origins: Send + Sync + 'static {
    /// The origin of the connection whose peer (as `accept` saw it) is `peer`; `None` when it did not come
    /// through the kernel's redirect.
    fn lookup(&self, peer: SocketAddr) -> Option<ConnOrigin>;

    /// The origin of the connection from `peer` to the proxy's `local` address, found by the client
    /// socket itself rather than the kernel's index by local endpoint: the way to the origin of a socket
    /// the index never saw (made outside every tagged cgroup, so no `sock_ops` ran for it).
    fn lookup_socket(&self, _local: SocketAddr, _peer: SocketAddr) -> Option<ConnOrigin> {
        None
    }
}

/// The kernel's origin maps (filled by the `sock_ops` program).
pub struct KernelOrigins {
    pub kernel: Arc<Kernel>,
    pub cgroup_root: PathBuf,
    /// The cgroup paths seen so far, by cgroup id.
    pub paths: CgroupPaths,
}

impl KernelOrigins {
    pub fn new(kernel: Arc<Kernel>, cgroup_root: PathBuf) -> Self {
        Self { kernel, cgroup_root, paths: CgroupPaths::default() }
    }
}

impl Origins for KernelOrigins {
    fn lookup(&self, peer: SocketAddr) -> Option<ConnOrigin> {
        let o = self.kernel.origin(peer)?;
        let cgroup = self.paths.path(&self.cgroup_root, o.cgroup, o.tgid);
        Some(origin(&o, cgroup))
    }

    fn lookup_socket(&self, local: SocketAddr, peer: SocketAddr) -> Option<ConnOrigin> {
        // The client socket on this host connected from `peer` to `local`, and the origin the connect hook
        // stored under its cookie: only a redirected socket of a tagged task has one.
        let cookie = crate::sockdiag::tcp_cookie(peer, local)?;
        let o = self.kernel.origin_by_cookie(cookie)?;
        let cgroup = self.paths.path(&self.cgroup_root, o.cgroup, o.tgid);
        Some(origin(&o, cgroup))
    }
}

/// How many cgroup paths [`CgroupPaths`] keeps before it starts afresh.
const PATHS_KEPT: usize = 1024;

/// Cgroup id → path, so a connection from a cgroup seen before costs one `statx` (the path still names
/// that cgroup: its directory's inode is the id) rather than reading `/proc/PID/cgroup`. A renamed or
/// removed cgroup fails the check and is looked up afresh. Bounded: past [`PATHS_KEPT`] it is cleared.
#[derive(Default)]
pub struct CgroupPaths {
    known: std::sync::Mutex<std::collections::HashMap<u64, String>>,
}

impl CgroupPaths {
    /// The path (relative to the root, `/a/b`) of cgroup `id`, which process `tgid` was in at connect();
    /// `id:N` when it cannot be found (the process has exited).
    pub fn path(&self, root: &Path, id: u64, tgid: u32) -> String {
        let known = self.known.lock().ok().and_then(|k| k.get(&id).cloned());
        if let Some(rel) = known
            && crate::cgroup::id(&root.join(rel.trim_start_matches('/'))).is_ok_and(|i| i == id)
        {
            return rel;
        }
        let Some(full) = crate::cgroup::process_cgroup(root, tgid) else { return format!("id:{id}") };
        let rel = crate::cgroup::relative(root, &full);
        // Only a path that names this very cgroup is kept (the process may have moved since connect()).
        if crate::cgroup::id(&full).is_ok_and(|i| i == id)
            && let Ok(mut k) = self.known.lock()
        {
            if k.len() >= PATHS_KEPT {
                k.clear();
            }
            k.insert(id, rel.clone());
        }
        rel
    }
}

fn origin(o: &warden_common::Origin, cgroup: String) -> ConnOrigin {
    ConnOrigin {
        pid: o.tgid,
        tid: o.pid,
        uid: o.uid,
        gid: o.gid,
        cgroup_id: o.cgroup,
        cgroup,
        tagged_cgroup: o.tagged_cgroup,
        binding: o.binding,
        target: o.target,
        dst: socket_addr(&o.dst),
        at: monotonic_to_wall(o.ktime_ns),
    }
}

/// Converts a CLOCK_MONOTONIC timestamp (bpf_ktime_get_ns) to wall-clock time.
pub fn monotonic_to_wall(ktime_ns: u64) -> SystemTime {
    let now_mono = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| Duration::new(t.tv_sec().unsigned_abs(), u32::try_from(t.tv_nsec()).unwrap_or(0)))
        .unwrap_or_default();
    let ago = now_mono.saturating_sub(Duration::from_nanos(ktime_ns));
    SystemTime::now() - ago
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt as _;

    use super::*;

    #[test]
    fn a_cached_cgroup_path_is_used_only_while_it_still_names_that_cgroup() {
        let root = tempfile::tempdir().unwrap();
        let a = root.path().join("a");
        std::fs::create_dir(&a).unwrap();
        let id = std::fs::metadata(&a).unwrap().ino();
        let paths = CgroupPaths::default();
        paths.known.lock().unwrap().insert(id, "/a".into());
        // A pid that cannot exist: only the cache can answer.
        let gone = u32::MAX;
        assert_eq!(paths.path(root.path(), id, gone), "/a");
        // Renamed: the cached path names nothing (or another cgroup) now, so it is not trusted.
        std::fs::rename(&a, root.path().join("b")).unwrap();
        assert_eq!(paths.path(root.path(), id, gone), format!("id:{id}"));
        std::fs::create_dir(&a).unwrap();
        assert_eq!(paths.path(root.path(), id, gone), format!("id:{id}"));
    }
}
