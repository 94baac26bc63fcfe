//! Loads, attaches and pins the kernel programs; fills their maps; hands out their events.
//!
//! **Only this module calls aya.** The root programs ([`names::PROGRAMS`]) are attached once, at the
//! cgroup2 root, and the per-cgroup ones ([`names::PER_CGROUP`]) to each tagged cgroup when it is tagged,
//! all through BPF links pinned under `<bpffs_dir>/links`; maps are pinned under `<bpffs_dir>/maps`. On
//! start the daemon re-opens what is pinned and attaches only what is missing, so a restart (even after
//! `kill -9`) never has a window without enforcement. Only [`uninstall`] (and untagging, for a cgroup's own
//! links) unpins.

mod splice;
pub use splice::{Splice, SplicedBytes};

use std::collections::HashSet;
use std::fs::File;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsFd as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use aya::Btf;
use aya::Ebpf;
use aya::EbpfLoader;
use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Array, HashMap, MapData, MapError, PerCpuArray, RingBuf};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::{CgroupAttachMode, CgroupSkbAttachType, Program, ProgramError};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use warden_common::{
    AllowKey, Binding, Depth, Endpoint, Event, MAX_CGROUP_DEPTH, Origin, ProxyConfig, TargetRef, names,
};

/// The kernel programs, built by build.rs from ebpf/programs (empty when built without the toolchain).
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/warden-ebpf.o"));

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// The kernel programs' aya-log reader, writing through the `log` facade (bridged into tracing).
pub type KernelLogger = aya_log::EbpfLogger<&'static dyn log::Log>;

#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    #[error(
        "this warden binary was built without its kernel programs; run `sudo scripts/setup.sh` (installs the \
         pinned nightly and bpf-linker) and rebuild"
    )]
    NoPrograms,
    #[error(
        "bpffs is not mounted at {path} and mounting it failed: {source}; mount it (`mount -t bpf bpf {path}`) or set agent.bpffs_dir"
    )]
    Mount {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("cannot prepare {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("loading the kernel programs failed (are you root, with BTF?): {0}")]
    Load(#[source] Box<aya::EbpfError>),
    #[error(
        "the kernel programs pinned under {bpffs_dir} come from another warden build ({pinned}, this one is \
         {embedded}); they keep enforcing. To load this build's, run `warden uninstall --config FILE` (it lifts \
         enforcement until the next start) and start again"
    )]
    OtherBuild { bpffs_dir: PathBuf, pinned: String, embedded: String },
    #[error("program {name} is missing from the kernel object")]
    MissingProgram { name: &'static str },
    #[error("map {name} is missing from the kernel object")]
    MissingMap { name: &'static str },
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: Box<ProgramError>,
    },
    #[error("program {name}: kernel BTF unavailable: {detail}")]
    Btf { name: &'static str, detail: String },
    #[error("pinning the link of {name} at {path}: {detail}")]
    Pin { name: &'static str, path: PathBuf, detail: String },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: Box<MapError>,
    },
}

fn map_err(name: &'static str) -> impl Fn(MapError) -> BpfError {
    move |source| BpfError::Map { name, source: Box::new(source) }
}

/// Where the programs attach and pin.
#[derive(Debug, Clone)]
pub struct Settings {
    pub bpffs_dir: PathBuf,
    pub cgroup_root: PathBuf,
    /// Where the hash of the attached build is kept (`bpf-object.sha256`).
    pub state_dir: PathBuf,
}

/// What `install` found and did.
#[derive(Debug, Clone, Default)]
pub struct InstallReport {
    /// Programs whose pinned links were already there and were adopted.
    pub adopted: Vec<&'static str>,
    /// Programs attached (and pinned) by this start.
    pub attached: Vec<&'static str>,
    /// Optional programs this kernel would not take, and why (e.g. BPF LSM not enabled).
    pub unavailable: Vec<(&'static str, String)>,
    /// Per-cgroup programs loaded by this start, attached to each cgroup as it is tagged.
    pub per_cgroup: Vec<&'static str>,
}

/// The loaded maps. Cheap lookups take `&self`; updates go through short, synchronous locks that are
/// never held across an await.
pub struct Kernel {
    tags: Mutex<Tags>,
    targets: Mutex<HashMap<MapData, Endpoint, TargetRef>>,
    allow: Mutex<LpmTrie<MapData, AllowKey, u32>>,
    proxy: Mutex<Array<MapData, ProxyConfig>>,
    by_addr: HashMap<MapData, Endpoint, Origin>,
    origins: HashMap<MapData, u64, Origin>,
    inflight: Mutex<HashMap<MapData, u64, i64>>,
    events: Mutex<Option<RingBuf<MapData>>>,
    lost: PerCpuArray<MapData, u64>,
    logger: Mutex<Option<KernelLogger>>,
    pub report: InstallReport,
    splice: Mutex<Option<aya::maps::SockHash<MapData, u64>>>,
    splice_peer: Mutex<HashMap<MapData, u64, warden_common::SplicePeer>>,
    /// The loaded object, for the per-cgroup programs attached at tag time.
    ebpf: Mutex<Option<Ebpf>>,
    links_dir: PathBuf,
    maps_dir: PathBuf,
    cgroup_root: PathBuf,
}

/// The tag map, the depth map, and the ancestry of each tag this daemon set (under one lock, so the
/// depth range always covers every tag in the map).
struct Tags {
    map: HashMap<MapData, u64, Binding>,
    depth: Array<MapData, Depth>,
    /// Each tag's cgroup ids from the root (level 0) down to itself (its level is the last index).
    ancestry: std::collections::HashMap<u64, Vec<u64>>,
}

impl Tags {
    /// The range covering the tags' levels and their common ancestor, or every level if the map holds a
    /// tag of unknown ancestry (one a previous daemon set and this one has not re-applied yet).
    fn exact(&self) -> Depth {
        let all_known = self.map.keys().filter_map(Result::ok).all(|k| self.ancestry.contains_key(&k));
        if !all_known {
            return Depth::default();
        }
        depth_of(&self.ancestry.values().map(Vec::as_slice).collect::<Vec<_>>())
    }

    fn write_depth(&mut self, d: Depth) -> Result<(), BpfError> {
        self.depth.set(0, d, 0).map_err(map_err(names::DEPTH))
    }

    /// The current range widened to include `level`, with no common ancestor (a range not yet known stays
    /// "every level").
    fn widened(&self, level: u32) -> Depth {
        match self.depth.get(&0, 0) {
            Ok(d) if d.known != 0 && d.lo <= d.hi => {
                Depth { known: 1, lo: d.lo.min(level), hi: d.hi.max(level), ..Depth::default() }
            }
            Ok(d) if d.known != 0 => Depth { known: 1, lo: level, hi: level, ..Depth::default() },
            _ => Depth::default(),
        }
    }
}

/// The depth range of tags with these ancestries (cgroup ids from the root down to the tag; an id of 0
/// is unknown), and their deepest common ancestor below the root, if any.
fn depth_of(ancestries: &[&[u64]]) -> Depth {
    let levels = ancestries.iter().map(|a| u32::try_from(a.len().saturating_sub(1)).unwrap_or(u32::MAX));
    let (Some(lo), Some(hi)) = (levels.clone().min(), levels.max()) else {
        return Depth { known: 1, lo: 1, hi: 0, ..Depth::default() };
    };
    let mut d = Depth { known: 1, lo, hi, ..Depth::default() };
    let Some(first) = ancestries.first() else { return d };
    // The deepest level at which every ancestry names the same known cgroup.
    let shared = (0..first.len())
        .take_while(|&i| first[i] != 0 && ancestries.iter().all(|a| a.get(i) == Some(&first[i])))
        .last();
    if let Some(level) = shared.filter(|&l| l > 0) {
        d.common_level = u32::try_from(level).unwrap_or(u32::MAX);
        d.common = first[level];
    }
    d
}

/// The cgroup ids of `path`'s ancestors under `root`, from the root (level 0) down to `path` itself (id
/// `cgroup_id`); 0 where one cannot be read.
fn ancestry(root: &Path, path: &Path, cgroup_id: u64) -> Vec<u64> {
    let mut ids = vec![crate::cgroup::id(root).unwrap_or(0)];
    let mut at = root.to_path_buf();
    if let Ok(rel) = path.strip_prefix(root) {
        for c in rel.components() {
            at.push(c);
            ids.push(crate::cgroup::id(&at).unwrap_or(0));
        }
    }
    if let Some(last) = ids.last_mut() {
        *last = cgroup_id;
    }
    ids
}

impl std::fmt::Debug for Kernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kernel").field("report", &self.report).finish_non_exhaustive()
    }
}

/// An endpoint in the kernel's form: IPv6 words in network order (IPv4 mapped), port in host order.
pub fn endpoint(addr: SocketAddr) -> Endpoint {
    let v6 = match addr.ip() {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    let o = v6.octets();
    let word = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
    Endpoint::new([word(0), word(4), word(8), word(12)], addr.port())
}

/// The socket address an endpoint stands for (IPv4-mapped addresses come back as IPv4).
pub fn socket_addr(e: &Endpoint) -> SocketAddr {
    let mut o = [0u8; 16];
    for (i, w) in e.ip.iter().enumerate() {
        o[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
    }
    let v6 = std::net::Ipv6Addr::from(o);
    let ip = v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4);
    SocketAddr::new(ip, e.port)
}

fn allow_key(net: ipnet::IpNet, port: u16) -> Key<AllowKey> {
    let (ip, bits) = match net {
        ipnet::IpNet::V4(n) => (n.network().to_ipv6_mapped(), 96 + u32::from(n.prefix_len())),
        ipnet::IpNet::V6(n) => (n.network(), u32::from(n.prefix_len())),
    };
    Key::new(16 + bits, AllowKey { port: port.to_be_bytes(), ip: ip.octets() })
}

/// Mounts bpffs at the directory holding `dir` if nothing is mounted there yet, then creates `dir`.
fn prepare_bpffs(dir: &Path) -> Result<(), BpfError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| BpfError::Io { path, source }
    };
    let mount_point = dir.ancestors().find(|p| p.exists()).unwrap_or(Path::new("/"));
    let on_bpffs = nix::sys::statfs::statfs(mount_point).is_ok_and(|s| s.filesystem_type().0 == BPF_FS_MAGIC);
    if !on_bpffs {
        let target = Path::new("/sys/fs/bpf");
        if !dir.starts_with(target) {
            return Err(BpfError::Mount { path: dir.to_path_buf(), source: nix::Error::ENOTDIR });
        }
        std::fs::create_dir_all(target).map_err(io(target))?;
        nix::mount::mount(Some("bpf"), target, Some("bpf"), nix::mount::MsFlags::empty(), None::<&str>)
            .map_err(|source| BpfError::Mount { path: target.to_path_buf(), source })?;
    }
    for sub in ["maps", "links"] {
        let p = dir.join(sub);
        std::fs::create_dir_all(&p).map_err(io(&p))?;
    }
    Ok(())
}

/// Loads the object (re-using pinned maps), attaches every root program that has no pinned link yet, loads
/// the per-cgroup ones (attached at tag time), and returns the maps. Attach order: refusals first, the
/// connect rewrites last; a redirect needs a tag, and a tag goes in only after its cgroup's bookkeeping
/// programs (sock_ops, getpeername) are attached, so no redirected socket can exist before its origin can
/// be indexed.
pub fn install(settings: &Settings) -> Result<Kernel, BpfError> {
    if EBPF_OBJECT.is_empty() {
        return Err(BpfError::NoPrograms);
    }
    prepare_bpffs(&settings.bpffs_dir)?;
    let maps_dir = settings.bpffs_dir.join("maps");
    let links_dir = settings.bpffs_dir.join("links");
    // Adopting programs of another build would pair them with this build's idea of the maps: refuse.
    let embedded = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(EBPF_OBJECT));
    let hash_file = settings.state_dir.join("bpf-object.sha256");
    let pinned = std::fs::read_to_string(&hash_file).ok().map(|h| h.trim().to_owned());
    if let Some(pinned) = pinned
        && pinned != embedded
        && !pinned_links(&settings.bpffs_dir).is_empty()
    {
        return Err(BpfError::OtherBuild { bpffs_dir: settings.bpffs_dir.clone(), pinned, embedded });
    }
    let mut ebpf = EbpfLoader::new()
        .default_map_pin_directory(&maps_dir)
        .load(EBPF_OBJECT)
        .map_err(|e| BpfError::Load(Box::new(e)))?;
    let cgroup = File::open(&settings.cgroup_root)
        .map_err(|source| BpfError::Io { path: settings.cgroup_root.clone(), source })?;
    let mut report = InstallReport::default();
    for &name in names::PROGRAMS {
        let pin = links_dir.join(name);
        if pin.exists() && PinnedLink::from_pin(&pin).is_ok() {
            report.adopted.push(name);
            continue;
        }
        let _ = std::fs::remove_file(&pin);
        match load(&mut ebpf, name).and_then(|()| attach_pinned(&mut ebpf, name, &cgroup, &pin)) {
            Ok(()) => report.attached.push(name),
            Err(e) if names::OPTIONAL.contains(&name) => report.unavailable.push((name, e.to_string())),
            Err(e) => return Err(e),
        }
    }
    std::fs::write(&hash_file, &embedded)
        .map_err(|source| BpfError::Io { path: hash_file.clone(), source })?;
    let logger = attach_logger(&links_dir);
    // Per-cgroup programs are loaded now and attached when a cgroup is tagged (set_tag), before its tag
    // goes in. An optional one this kernel refuses is left out of every cgroup, and said so.
    for &name in names::PER_CGROUP {
        match load(&mut ebpf, name) {
            Ok(()) => report.per_cgroup.push(name),
            Err(e) if names::OPTIONAL.contains(&name) => report.unavailable.push((name, e.to_string())),
            Err(e) => return Err(e),
        }
    }
    let splice = match splice::attach(&mut ebpf) {
        Ok(hash) => Some(hash),
        Err(e) => {
            report.unavailable.push((names::SPLICE_PROGRAM, e));
            None
        }
    };
    let mut kernel = Kernel::from_ebpf(&mut ebpf, report, logger)?;
    kernel.splice = Mutex::new(splice);
    kernel.links_dir.clone_from(&links_dir);
    kernel.maps_dir.clone_from(&maps_dir);
    kernel.cgroup_root.clone_from(&settings.cgroup_root);
    kernel.ebpf = Mutex::new(Some(ebpf));
    Ok(kernel)
}

/// The kernel programs' log (aya-log), found through the running connect4 program (adopted or new),
/// so it reads what the attached programs write, not what a freshly loaded copy would.
fn attach_logger(links_dir: &Path) -> Option<KernelLogger> {
    let pinned = PinnedLink::from_pin(links_dir.join("warden_connect4")).ok()?;
    let info = FdLink::from(pinned).info().ok()?;
    match aya_log::EbpfLogger::init_from_id(info.program_id()) {
        Ok(l) => Some(l),
        Err(e) => {
            tracing::debug!(error = %e, "kernel program logs unavailable");
            None
        }
    }
}

/// Loads a program into the kernel (verified, not attached).
fn load(ebpf: &mut Ebpf, name: &'static str) -> Result<(), BpfError> {
    let perr = |source: ProgramError| BpfError::Program { name, source: Box::new(source) };
    let program = ebpf.program_mut(name).ok_or(BpfError::MissingProgram { name })?;
    match program {
        Program::CgroupSockAddr(p) => p.load(),
        Program::CgroupSock(p) => p.load(),
        Program::SockOps(p) => p.load(),
        Program::CgroupSockopt(p) => p.load(),
        Program::CgroupSkb(p) => p.load(),
        Program::Lsm(p) => {
            let btf = Btf::from_sys_fs().map_err(|e| BpfError::Btf { name, detail: e.to_string() })?;
            p.load("socket_create", &btf)
        }
        _ => return Err(BpfError::MissingProgram { name }),
    }
    .map_err(perr)
}

/// Attaches a loaded program to `cgroup` (the LSM program: to its hook) through a link pinned at `pin`.
/// A link is attached as if with `BPF_F_ALLOW_MULTI`: a descendant cgroup's programs run besides it, never
/// instead of it, and only a process that may use bpf(2) can detach it.
fn attach_pinned(ebpf: &mut Ebpf, name: &'static str, cgroup: &File, pin: &Path) -> Result<(), BpfError> {
    let perr = |source: ProgramError| BpfError::Program { name, source: Box::new(source) };
    let pin_err = |detail: String| BpfError::Pin { name, path: pin.into(), detail };
    // The cgroup program types share one shape: attach, take the link as an FdLink.
    macro_rules! cgroup_link {
        ($p:expr) => {{
            let id = $p.attach(cgroup, CgroupAttachMode::Single).map_err(perr)?;
            FdLink::try_from($p.take_link(id).map_err(perr)?).map_err(|e| pin_err(e.to_string()))?
        }};
    }
    let program = ebpf.program_mut(name).ok_or(BpfError::MissingProgram { name })?;
    let link: FdLink = match program {
        Program::CgroupSockAddr(p) => cgroup_link!(p),
        Program::CgroupSock(p) => cgroup_link!(p),
        Program::SockOps(p) => cgroup_link!(p),
        Program::CgroupSockopt(p) => {
            // aya 0.14 cannot turn a sockopt link into an FdLink (to pin it): make the link here.
            let prog = p.fd().map_err(perr)?;
            return pin_raw_link(prog.as_fd(), cgroup.as_fd(), BPF_CGROUP_SETSOCKOPT, pin)
                .map_err(|e| pin_err(format!("creating the link: {e}")));
        }
        Program::CgroupSkb(p) => {
            let id = p.attach(cgroup, CgroupSkbAttachType::Egress, CgroupAttachMode::Single).map_err(perr)?;
            FdLink::try_from(p.take_link(id).map_err(perr)?).map_err(|e| pin_err(e.to_string()))?
        }
        Program::Lsm(p) => {
            let id = p.attach().map_err(perr)?;
            FdLink::from(p.take_link(id).map_err(perr)?)
        }
        _ => return Err(BpfError::MissingProgram { name }),
    };
    link.pin(pin).map_err(|e| pin_err(e.to_string()))?;
    Ok(())
}

/// `bpf_attach_type` of cgroup/setsockopt programs (uapi/linux/bpf.h).
const BPF_CGROUP_SETSOCKOPT: u32 = 22;

/// Creates a BPF link attaching `prog` to the cgroup `target` and pins it at `pin` (BPF_LINK_CREATE then
/// BPF_OBJ_PIN); the link's own descriptor is closed, so the pin alone keeps it attached.
fn pin_raw_link(
    prog: std::os::fd::BorrowedFd<'_>,
    target: std::os::fd::BorrowedFd<'_>,
    attach_type: u32,
    pin: &Path,
) -> std::io::Result<()> {
    use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
    use std::os::unix::ffi::OsStrExt as _;
    const BPF_OBJ_PIN: libc::c_long = 6;
    const BPF_LINK_CREATE: libc::c_long = 28;
    // union bpf_attr, link_create: prog_fd, target_fd, attach_type, flags; the rest zero.
    let mut attr = [0u32; 16];
    attr[0] = u32::try_from(prog.as_raw_fd()).map_err(|_| std::io::ErrorKind::InvalidInput)?;
    attr[1] = u32::try_from(target.as_raw_fd()).map_err(|_| std::io::ErrorKind::InvalidInput)?;
    attr[2] = attach_type;
    // SAFETY: bpf(2) reads `size_of_val(&attr)` bytes from a live, initialised buffer.
    let fd =
        unsafe { libc::syscall(libc::SYS_bpf, BPF_LINK_CREATE, attr.as_ptr(), std::mem::size_of_val(&attr)) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let raw = i32::try_from(fd).map_err(|_| std::io::ErrorKind::InvalidData)?;
    // SAFETY: the kernel just returned this descriptor; nothing else owns it.
    let link = unsafe { OwnedFd::from_raw_fd(raw) };
    let path =
        std::ffi::CString::new(pin.as_os_str().as_bytes()).map_err(|_| std::io::ErrorKind::InvalidInput)?;
    // union bpf_attr, obj_pin: pathname (u64), bpf_fd (u32), file_flags, path_fd; the rest zero.
    let mut pin_attr = [0u64; 4];
    pin_attr[0] = path.as_ptr() as u64;
    pin_attr[1] = u64::from(u32::try_from(link.as_raw_fd()).map_err(|_| std::io::ErrorKind::InvalidInput)?);
    // SAFETY: bpf(2) reads the attribute buffer and the NUL-terminated path, both live for the call.
    let rc = unsafe {
        libc::syscall(libc::SYS_bpf, BPF_OBJ_PIN, pin_attr.as_ptr(), std::mem::size_of_val(&pin_attr))
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

impl Kernel {
    fn from_ebpf(
        ebpf: &mut Ebpf,
        report: InstallReport,
        logger: Option<KernelLogger>,
    ) -> Result<Self, BpfError> {
        fn take<T: TryFrom<aya::maps::Map, Error = MapError>>(
            ebpf: &mut Ebpf,
            name: &'static str,
        ) -> Result<T, BpfError> {
            let map = ebpf.take_map(name).ok_or(BpfError::MissingMap { name })?;
            T::try_from(map).map_err(map_err(name))
        }
        Ok(Self {
            tags: Mutex::new(Tags {
                map: take(ebpf, names::TAGS)?,
                depth: take(ebpf, names::DEPTH)?,
                ancestry: std::collections::HashMap::new(),
            }),
            inflight: Mutex::new(take(ebpf, names::INFLIGHT)?),
            targets: Mutex::new(take(ebpf, names::TARGETS)?),
            allow: Mutex::new(take(ebpf, names::ALLOW)?),
            proxy: Mutex::new(take(ebpf, names::PROXY)?),
            by_addr: take(ebpf, names::BY_ADDR)?,
            origins: take(ebpf, names::ORIGINS)?,
            events: Mutex::new(Some(take(ebpf, names::EVENTS)?)),
            lost: take(ebpf, names::LOST)?,
            logger: Mutex::new(logger),
            report,
            splice: Mutex::new(None),
            splice_peer: Mutex::new(take(ebpf, names::SPLICE_PEER)?),
            ebpf: Mutex::new(None),
            links_dir: PathBuf::new(),
            maps_dir: PathBuf::new(),
            cgroup_root: PathBuf::new(),
        })
    }

    /// The origin of a connection the proxy accepted, by its peer address.
    pub fn origin(&self, peer: SocketAddr) -> Option<Origin> {
        self.by_addr.get(&endpoint(peer), 0).ok()
    }

    /// The origin the connect hook stored for the socket with this cookie (redirected, not yet closed).
    pub fn origin_by_cookie(&self, cookie: u64) -> Option<Origin> {
        self.origins.get(&cookie, 0).ok().filter(|o| o.cookie == cookie)
    }

    /// Forgets an origin the proxy has consumed (sock_ops also forgets it when the socket closes).
    pub fn forget_origin(&self, _peer: SocketAddr) {
        // The LRU map is written by the kernel only; userspace deletion would need `&mut`. Entries go
        // at close (sock_ops) or under LRU pressure.
    }

    /// Where the kernel rewrites target connections to. An unspecified listen address is reached
    /// through loopback.
    pub fn set_proxy(&self, listeners: &[SocketAddr]) -> Result<(), BpfError> {
        let norm = |a: SocketAddr| {
            let ip = match a.ip() {
                IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
                IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
                ip => ip,
            };
            endpoint(SocketAddr::new(ip, a.port()))
        };
        let config = ProxyConfig {
            v4: listeners.iter().find(|a| a.is_ipv4()).map(|a| norm(*a)).unwrap_or_default(),
            v6: listeners.iter().find(|a| a.is_ipv6()).map(|a| norm(*a)).unwrap_or_default(),
        };
        self.proxy.lock().expect("proxy map lock").set(0, config, 0).map_err(map_err(names::PROXY))
    }

    /// Tags the cgroup at `path` (id `cgroup_id`). First its own programs ([`names::PER_CGROUP`]) are
    /// attached to it, with pinned links (kept if already there); then, since the hooks look only at levels
    /// between the shallowest and the deepest tag, the depth range is widened to cover it; then the tag goes
    /// in, and the range is narrowed to exactly the tags' levels. Any failure before the tag refuses it.
    pub fn set_tag(&self, path: &Path, cgroup_id: u64, binding: u32) -> Result<(), BpfError> {
        if let Err(e) = self.attach_per_cgroup(path, cgroup_id) {
            // Refused: a cgroup that is not tagged keeps none of the programs attached on the way.
            if !self.tags().iter().any(|(id, _)| *id == cgroup_id) {
                for &name in names::PER_CGROUP {
                    let _ = std::fs::remove_file(self.per_cgroup_pin(name, cgroup_id));
                }
            }
            return Err(e);
        }
        let level = crate::cgroup::level(&self.cgroup_root, path).min(MAX_CGROUP_DEPTH.unsigned_abs());
        let mut tags = self.tags.lock().expect("tag map lock");
        let wide = tags.widened(level);
        tags.write_depth(wide)?;
        let value = Binding { id: binding, pad: 0 };
        tags.map.insert(cgroup_id, value, 0).map_err(map_err(names::TAGS))?;
        tags.ancestry.insert(cgroup_id, ancestry(&self.cgroup_root, path, cgroup_id));
        let exact = tags.exact();
        if let Err(e) = tags.write_depth(exact) {
            // The wider range stays: still correct, only slower for untagged processes.
            tracing::warn!(error = %e, "could not narrow the kernel's tag depth range");
        }
        Ok(())
    }

    fn per_cgroup_pin(&self, name: &str, cgroup_id: u64) -> PathBuf {
        self.links_dir.join(format!("{name}_cgroup_{cgroup_id}"))
    }

    /// Attaches every per-cgroup program this start loaded to the cgroup at `path`, keeping links already
    /// pinned (a tag being re-applied, or adopted from an earlier daemon).
    fn attach_per_cgroup(&self, path: &Path, cgroup_id: u64) -> Result<(), BpfError> {
        let mut ebpf = self.ebpf.lock().expect("ebpf lock");
        let Some(ebpf) = ebpf.as_mut() else { return Ok(()) };
        let mut cgroup = None;
        for &name in &self.report.per_cgroup {
            let pin = self.per_cgroup_pin(name, cgroup_id);
            if pin.exists() && PinnedLink::from_pin(&pin).is_ok() {
                continue;
            }
            let _ = std::fs::remove_file(&pin);
            let cgroup = match &mut cgroup {
                Some(f) => f,
                None => cgroup.insert(
                    File::open(path).map_err(|source| BpfError::Io { path: path.to_path_buf(), source })?,
                ),
            };
            attach_pinned(ebpf, name, cgroup, &pin)?;
        }
        Ok(())
    }

    /// The per-cgroup programs whose links are pinned for `cgroup_id`.
    pub fn cgroup_links(&self, cgroup_id: u64) -> Vec<&'static str> {
        names::PER_CGROUP.iter().copied().filter(|n| self.per_cgroup_pin(n, cgroup_id).exists()).collect()
    }

    /// Untags a cgroup, narrows the depth range, forgets the cgroup's in-flight count, detaches its own
    /// programs (after the tag is gone: never a tagged cgroup without them), then forgets the origins of its
    /// redirected sockets: once its `sock_ops` is detached nothing would delete them when those sockets
    /// close, and a later connection from the same local endpoint must never find one.
    pub fn remove_tag(&self, cgroup_id: u64) -> Result<(), BpfError> {
        let mut tags = self.tags.lock().expect("tag map lock");
        match tags.map.remove(&cgroup_id) {
            Ok(()) | Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(map_err(names::TAGS)(e)),
        }
        tags.ancestry.remove(&cgroup_id);
        let exact = tags.exact();
        if let Err(e) = tags.write_depth(exact) {
            tracing::warn!(error = %e, "could not narrow the kernel's tag depth range");
        }
        drop(tags);
        let _ = self.inflight.lock().expect("inflight map lock").remove(&cgroup_id);
        for &name in names::PER_CGROUP {
            let _ = std::fs::remove_file(self.per_cgroup_pin(name, cgroup_id));
        }
        // Origins first: sock_ops copies an origin into the index, so only a run that read one before this
        // (and before its link went) can still add an index entry; the gate refuses such an entry anyway,
        // since its binding is gone and binding numbers are never reused.
        let purged = purge_origins::<u64>(&self.maps_dir, names::ORIGINS, cgroup_id)
            .and_then(|a| Ok(a + purge_origins::<Endpoint>(&self.maps_dir, names::BY_ADDR, cgroup_id)?));
        match purged {
            Ok(n) if n > 0 => tracing::debug!(cgroup_id, entries = n, "forgot the untagged cgroup's origins"),
            Ok(_) => {}
            // The gate still refuses them (their binding is gone), so this is not fatal.
            Err(e) => tracing::warn!(cgroup_id, error = %e, "could not forget the untagged cgroup's origins"),
        }
        Ok(())
    }

    /// The cgroup levels the kernel programs look at for tags: `None` for every level.
    pub fn tag_levels(&self) -> Option<(u32, u32)> {
        let tags = self.tags.lock().expect("tag map lock");
        tags.depth.get(&0, 0).ok().filter(|d| d.known != 0).map(|d| (d.lo, d.hi))
    }

    /// Live entries in the origin index (one per established redirected socket; they go at close).
    pub fn live_origins(&self) -> usize {
        self.by_addr.keys().filter_map(Result::ok).count()
    }

    /// Tagged cgroup ids and their binding numbers, as the kernel sees them.
    pub fn tags(&self) -> Vec<(u64, u32)> {
        let tags = self.tags.lock().expect("tag map lock");
        tags.map.iter().filter_map(Result::ok).map(|(k, v)| (k, v.id)).collect()
    }

    /// Entries in the target map (targets and their guards).
    pub fn target_entries(&self) -> usize {
        self.targets.lock().expect("target map lock").keys().flatten().count()
    }

    /// Entries in the allow list.
    pub fn allow_entries(&self) -> usize {
        self.allow.lock().expect("allow map lock").keys().flatten().count()
    }

    /// Makes the target map exactly `targets` (endpoint → target number).
    pub fn sync_targets(&self, targets: &[(SocketAddr, u32)]) -> Result<(), BpfError> {
        let mut map = self.targets.lock().expect("target map lock");
        let want: std::collections::HashMap<Endpoint, u32> =
            targets.iter().map(|(a, id)| (endpoint(*a), *id)).collect();
        let stale: Vec<Endpoint> =
            map.keys().filter_map(Result::ok).filter(|k| !want.contains_key(k)).collect();
        for (k, id) in &want {
            map.insert(k, TargetRef { id: *id, pad: 0 }, 0).map_err(map_err(names::TARGETS))?;
        }
        for k in stale {
            let _ = map.remove(&k);
        }
        Ok(())
    }

    /// Makes the allow list exactly `entries` (network, port; port 0 = any).
    pub fn sync_allow(&self, entries: &[(ipnet::IpNet, u16)]) -> Result<(), BpfError> {
        let mut map = self.allow.lock().expect("allow map lock");
        let want: Vec<Key<AllowKey>> = entries.iter().map(|(n, p)| allow_key(*n, *p)).collect();
        let want_set: HashSet<(u32, [u8; 2], [u8; 16])> =
            want.iter().map(|k| (k.prefix_len(), k.data().port, k.data().ip)).collect();
        let stale: Vec<Key<AllowKey>> = map
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !want_set.contains(&(k.prefix_len(), k.data().port, k.data().ip)))
            .collect();
        for k in &want {
            map.insert(k, 1, 0).map_err(map_err(names::ALLOW))?;
        }
        for k in stale {
            let _ = map.remove(&k);
        }
        Ok(())
    }

    /// The kernel programs' logger (aya-log), as a task forwarding its lines to our log until `shutdown`;
    /// `None` once taken or where unavailable. Must be called inside a tokio runtime.
    pub fn take_log_forwarder(
        &self,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> Option<impl Future<Output = ()> + Send + 'static> {
        let logger = self.logger.lock().expect("logger lock").take()?;
        // SAFETY: the logger owns its ring buffer fd, which stays open and the same while the AsyncFd
        // (which owns the logger) lives.
        let mut afd = unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) }.ok()?;
        Some(async move {
            loop {
                let mut guard = tokio::select! {
                    () = shutdown.cancelled() => return,
                    g = afd.readable_mut() => match g { Ok(g) => g, Err(_) => return },
                };
                guard.get_inner_mut().flush();
                guard.clear_ready();
            }
        })
    }

    /// How many kernel events found the ring buffer full, since the map was created (all CPUs).
    pub fn events_lost(&self) -> u64 {
        self.lost.get(&0, 0).map_or(0, |per_cpu| per_cpu.iter().sum())
    }

    /// The reader of the kernel's events; `None` once taken, or if the ring cannot be polled. Must be
    /// called inside a tokio runtime.
    pub fn take_events(&self) -> Option<EventReader> {
        let ring = self.events.lock().expect("events lock").take()?;
        // SAFETY: the ring buffer owns its map fd, which stays open and the same for as long as the AsyncFd
        // (which owns the ring buffer) lives, and as_raw_fd always returns it.
        match unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) } {
            Ok(afd) => Some(EventReader { afd }),
            Err(e) => {
                tracing::error!(error = %e, "cannot poll the kernel event ring; refusals will not be recorded");
                None
            }
        }
    }
}

/// The kernel's events (refusals), read from the ring buffer.
pub struct EventReader {
    afd: AsyncFd<RingBuf<MapData>>,
}

impl EventReader {
    /// Waits until events are ready, then appends every whole one to `out`. Cancel-safe: nothing is
    /// consumed before the wait ends.
    pub async fn read(&mut self, out: &mut Vec<Event>) -> std::io::Result<()> {
        let mut guard = self.afd.readable_mut().await?;
        let ring = guard.get_inner_mut();
        while let Some(item) = ring.next() {
            if item.len() >= std::mem::size_of::<Event>() {
                // SAFETY: the kernel wrote a whole `Event` (checked length); read_unaligned copes with any
                // alignment of the ring's bytes, and every bit pattern is a valid `Event`.
                out.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) });
            }
        }
        guard.clear_ready();
        Ok(())
    }
}

/// Deletes every entry of the pinned origin map `name` (keyed by `K`) whose origin is `cgroup_id`'s.
fn purge_origins<K: aya::Pod>(
    maps_dir: &Path,
    name: &'static str,
    cgroup_id: u64,
) -> Result<usize, BpfError> {
    if maps_dir.as_os_str().is_empty() {
        return Ok(0);
    }
    let data = MapData::from_pin(maps_dir.join(name)).map_err(map_err(name))?;
    let mut map: HashMap<MapData, K, Origin> =
        HashMap::try_from(aya::maps::Map::LruHashMap(data)).map_err(map_err(name))?;
    let stale: Vec<K> = map
        .iter()
        .filter_map(Result::ok)
        .filter(|(_, o)| o.tagged_cgroup == cgroup_id)
        .map(|(k, _)| k)
        .collect();
    for k in &stale {
        let _ = map.remove(k);
    }
    Ok(stale.len())
}

/// What is lost without an optional program, and the fix.
pub fn without(program: &str) -> &'static str {
    match program {
        "warden_socket_create" => {
            "non-IP sockets (vsock, packet) from tagged processes are not refused; enable BPF LSM (add `bpf` to \
             the kernel's lsm= list) to close them"
        }
        "warden_setsockopt" => {
            "routing socket options are not refused at setsockopt (their packets are still dropped on egress); \
             a 6.x kernel takes this program"
        }
        names::SPLICE_PROGRAM => {
            "opaque TCP sessions are relayed in user space instead of spliced in the kernel (needs \
             CONFIG_BPF_STREAM_PARSER)"
        }
        _ => "see ARCHITECTURE.md, kernel hooks",
    }
}

/// True when every program's link is pinned under `bpffs_dir`.
pub fn pinned_links(bpffs_dir: &Path) -> Vec<&'static str> {
    names::PROGRAMS.iter().copied().filter(|n| bpffs_dir.join("links").join(n).exists()).collect()
}

/// Detaches and unpins every program and map. Unpinning a link with no other open descriptor detaches it.
pub fn uninstall(bpffs_dir: &Path) -> Result<Vec<PathBuf>, BpfError> {
    let mut removed = Vec::new();
    for sub in ["links", "maps"] {
        let dir = bpffs_dir.join(sub);
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for entry in entries.filter_map(Result::ok) {
            let path = entry.path();
            std::fs::remove_file(&path).map_err(|source| BpfError::Io { path: path.clone(), source })?;
            removed.push(path);
        }
        let _ = std::fs::remove_dir(&dir);
    }
    let _ = std::fs::remove_dir(bpffs_dir);
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_round_trip_and_map_ipv4() {
        for s in ["127.0.0.5:5432", "[::1]:22", "[2001:db8::1]:443"] {
            let a: SocketAddr = s.parse().unwrap();
            assert_eq!(socket_addr(&endpoint(a)), a);
        }
        let v4 = endpoint("127.0.0.5:5432".parse().unwrap());
        let mapped = endpoint("[::ffff:127.0.0.5]:5432".parse().unwrap());
        assert_eq!(v4, mapped);
        assert!(v4.is_v4_mapped());
        assert_eq!(v4.ip[3], u32::from_ne_bytes([127, 0, 0, 5]));
    }

    #[test]
    fn the_depth_range_names_the_tags_deepest_common_ancestor() {
        let d = depth_of;
        // No tags: an empty range.
        let none = d(&[]);
        assert!(none.known == 1 && none.lo > none.hi, "{none:?}");
        // One tag: its own id is the common ancestor, at its level.
        assert_eq!(d(&[&[1, 10, 20]]), Depth { known: 1, lo: 2, hi: 2, common_level: 2, common: 20 });
        // Siblings and a nested tag: their parent.
        let two = d(&[&[1, 10, 20], &[1, 10, 21, 30]]);
        assert_eq!(two, Depth { known: 1, lo: 2, hi: 3, common_level: 1, common: 10 });
        let nested = d(&[&[1, 10, 20], &[1, 10, 20, 30]]);
        assert_eq!((nested.common_level, nested.common), (2, 20));
        // Only the root in common, or an id that could not be read: no common ancestor.
        assert_eq!(d(&[&[1, 10], &[1, 11]]).common, 0);
        assert_eq!(d(&[&[1, 0, 20], &[1, 0, 21]]).common, 0);
        assert_eq!(d(&[&[1, 0, 20]]).common, 0, "an unknown ancestor ends the shared prefix");
    }

    #[test]
    fn allow_keys_cover_port_then_prefix() {
        let k = allow_key("10.0.0.0/8".parse().unwrap(), 53);
        assert_eq!(k.prefix_len(), 16 + 96 + 8);
        assert_eq!(k.data().port, 53u16.to_be_bytes());
        let k = allow_key("::/0".parse().unwrap(), 0);
        assert_eq!(k.prefix_len(), 16);
    }
}
