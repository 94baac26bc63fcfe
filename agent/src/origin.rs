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
}

/// The kernel's origin maps (filled by the `sock_ops` program).
pub struct KernelOrigins {
    pub kernel: Arc<Kernel>,
    pub cgroup_root: PathBuf,
}

impl Origins for KernelOrigins {
    fn lookup(&self, peer: SocketAddr) -> Option<ConnOrigin> {
        lookup(&self.kernel, peer, &self.cgroup_root)
    }
}

/// Looks up the origin of an accepted connection by its peer address.
pub fn lookup(kernel: &Kernel, peer: SocketAddr, cgroup_root: &Path) -> Option<ConnOrigin> {
    let o = kernel.origin(peer)?;
    let cgroup = crate::cgroup::process_cgroup(cgroup_root, o.tgid)
        .map_or_else(|| format!("id:{}", o.cgroup), |p| crate::cgroup::relative(cgroup_root, &p));
    Some(ConnOrigin {
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
    })
}

/// Converts a CLOCK_MONOTONIC timestamp (bpf_ktime_get_ns) to wall-clock time.
pub fn monotonic_to_wall(ktime_ns: u64) -> SystemTime {
    let now_mono = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| Duration::new(t.tv_sec().unsigned_abs(), u32::try_from(t.tv_nsec()).unwrap_or(0)))
        .unwrap_or_default();
    let ago = now_mono.saturating_sub(Duration::from_nanos(ktime_ns));
    SystemTime::now() - ago
}
