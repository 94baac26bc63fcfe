//! The `#[repr(C)]` types Warden's kernel programs and its daemon share: map keys and values, and the
//! events the kernel sends through the ring buffer. Every address is kept in IPv6 form (IPv4 as
//! `::ffff:a.b.c.d`), as the kernel's network-order 32-bit words, so one key type serves both families
//! and an IPv4-mapped destination can never be classified differently from its IPv4 form.
#![no_std]

/// Deepest cgroup level whose tag is honoured. `warden tag` refuses deeper cgroups, and the kernel
/// programs check every ancestor level from this one up to the root.
pub const MAX_CGROUP_DEPTH: i32 = 16;

pub const AF_UNIX: u16 = 1;
pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;
pub const AF_NETLINK: u16 = 16;

/// Names of the pinned maps (under `<bpffs_dir>/maps`) and programs (links under `<bpffs_dir>/links`).
pub mod names {
    pub const TAGS: &str = "WARDEN_TAGS";
    pub const TARGETS: &str = "WARDEN_TARGETS";
    pub const ALLOW: &str = "WARDEN_ALLOW";
    pub const PROXY: &str = "WARDEN_PROXY";
    pub const ORIGINS: &str = "WARDEN_ORIGINS";
    pub const BY_ADDR: &str = "WARDEN_BY_ADDR";
    pub const EVENTS: &str = "WARDEN_EVENTS";
    /// Per-CPU count of events the kernel could not put in the ring buffer (it was full).
    pub const LOST: &str = "WARDEN_LOST";
    /// Attached only where BPF LSM is enabled; without it the others still enforce.
    pub const OPTIONAL: &[&str] = &["warden_socket_create"];
    /// Every program, in attach order.
    pub const PROGRAMS: &[&str] = &[
        "warden_sock_ops",
        "warden_getpeername4",
        "warden_getpeername6",
        "warden_sock_create",
        "warden_socket_create",
        "warden_bind4",
        "warden_bind6",
        "warden_sendmsg4",
        "warden_sendmsg6",
        "warden_connect4",
        "warden_connect6",
    ];
}

/// An endpoint: an address in IPv6 form (network-order words) and a port in host order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Endpoint {
    pub ip: [u32; 4],
    pub port: u16,
    pub pad: u16,
}

impl Endpoint {
    pub const fn new(ip: [u32; 4], port: u16) -> Self {
        Self { ip, port, pad: 0 }
    }

    /// `::ffff:a.b.c.d` from an IPv4 address in network order.
    pub const fn mapped(ip4_be: u32, port: u16) -> Self {
        Self::new([0, 0, 0xffff_u32.to_be(), ip4_be], port)
    }

    pub const fn is_v4_mapped(&self) -> bool {
        self.ip[0] == 0 && self.ip[1] == 0 && self.ip[2] == 0xffff_u32.to_be()
    }

    /// The key under which the target map marks "a target listens on this host at `port`": an
    /// all-ones address, which no TCP peer can have. Connects to (and binds of) this host's other
    /// spellings of that port (0.0.0.0, 127/8, ::, ::1, mapped) are refused, since they reach the same
    /// listener when it is bound to a wildcard or to the address of the connecting socket.
    pub const fn local_port_guard(port: u16) -> Self {
        Self::new([u32::MAX; 4], port)
    }

    /// An address that always means this host: IPv4 0.0.0.0/8 and 127.0.0.0/8 (plain or mapped),
    /// IPv6 `::` and `::1`.
    pub const fn is_this_host(&self) -> bool {
        if self.is_v4_mapped() {
            let first = self.ip[3].to_ne_bytes()[0];
            first == 0 || first == 127
        } else {
            self.ip[0] == 0
                && self.ip[1] == 0
                && self.ip[2] == 0
                && (self.ip[3] == 0 || self.ip[3] == 1_u32.to_be())
        }
    }
}

/// What the tag map holds for a tagged cgroup.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Binding {
    /// The daemon's number for this binding (cgroup → identity).
    pub id: u32,
    pub pad: u32,
}

/// What the target map holds for a protected `ip:port`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TargetRef {
    /// The daemon's number for the policy target; [`GUARD`] for an endpoint that reaches a target's
    /// listener under another address (refused, never redirected).
    pub id: u32,
    pub pad: u32,
}

/// [`TargetRef::id`] of a guard entry: another spelling of a target on this host, refused.
pub const GUARD: u32 = 0;

/// The proxy's listeners, in slot 0 of the proxy array map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProxyConfig {
    /// IPv4 listener as a mapped address (port 0: none).
    pub v4: Endpoint,
    /// IPv6 listener (port 0: none).
    pub v6: Endpoint,
}

/// Key of the allow list (an LPM trie): the port (network order, 0 = any port) then the address.
/// A prefix covers the port's 16 bits plus the address bits.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AllowKey {
    pub port: [u8; 2],
    pub ip: [u8; 16],
}

/// Who opened a redirected connection and where it was going: stored by socket cookie at connect,
/// indexed by the connecting socket's local endpoint once established.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Origin {
    /// The process's own cgroup (not necessarily the tagged ancestor).
    pub cgroup: u64,
    /// The tagged cgroup whose binding applies.
    pub tagged_cgroup: u64,
    /// CLOCK_MONOTONIC nanoseconds at connect().
    pub ktime_ns: u64,
    pub cookie: u64,
    /// The original destination.
    pub dst: Endpoint,
    /// `AF_INET` or `AF_INET6`: the connecting socket's family.
    pub family: u16,
    pub pad0: u16,
    pub target: u32,
    /// Thread id and process id (tgid) in the initial pid namespace.
    pub pid: u32,
    pub tgid: u32,
    pub uid: u32,
    pub gid: u32,
    pub binding: u32,
}

/// Kinds of [`Event`].
pub mod event {
    /// connect() to a destination that is neither a target nor allowed.
    pub const CONNECT_REFUSED: u32 = 1;
    /// UDP sendmsg() to a destination that is not allowed.
    pub const SENDMSG_REFUSED: u32 = 2;
    /// socket() of a family, type or protocol tagged processes may not open.
    pub const SOCKET_REFUSED: u32 = 3;
    /// bind() to the proxy's port.
    pub const BIND_REFUSED: u32 = 4;
    /// connect() straight to the proxy's listener.
    pub const PROXY_REFUSED: u32 = 5;
    /// A target connect() refused because its origin could not be stored (map full): fail closed.
    pub const ORIGIN_FULL: u32 = 6;
}

/// One event from the kernel, through the ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Event {
    pub cgroup: u64,
    pub tagged_cgroup: u64,
    pub ktime_ns: u64,
    pub dst: Endpoint,
    pub kind: u32,
    /// Socket type (SOCK_STREAM = 1, SOCK_DGRAM = 2, ...).
    pub sock_type: u32,
    pub protocol: u32,
    pub family: u32,
    pub pid: u32,
    pub tgid: u32,
    pub uid: u32,
    pub gid: u32,
    pub binding: u32,
}

// No implicit padding anywhere: the kernel and the daemon must agree byte for byte.
const _: () = assert!(core::mem::size_of::<Endpoint>() == 20);
const _: () = assert!(core::mem::size_of::<Origin>() == 80);
const _: () = assert!(core::mem::size_of::<Event>() == 80);
const _: () = assert!(core::mem::size_of::<ProxyConfig>() == 40);
const _: () = assert!(core::mem::size_of::<AllowKey>() == 18);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: #[repr(C)] integers and explicit padding only (sizes checked above): any bit pattern is valid.
    unsafe impl aya::Pod for super::Endpoint {}
    // SAFETY: #[repr(C)] integers and explicit padding only (sizes checked above): any bit pattern is valid.
    unsafe impl aya::Pod for super::Binding {}
    // SAFETY: #[repr(C)] integers and explicit padding only (sizes checked above): any bit pattern is valid.
    unsafe impl aya::Pod for super::TargetRef {}
    // SAFETY: #[repr(C)] integers and explicit padding only (sizes checked above): any bit pattern is valid.
    unsafe impl aya::Pod for super::ProxyConfig {}
    // SAFETY: #[repr(C)] integers and explicit padding only (sizes checked above): any bit pattern is valid.
    unsafe impl aya::Pod for super::AllowKey {}
    // SAFETY: #[repr(C)] integers and explicit padding only (sizes checked above): any bit pattern is valid.
    unsafe impl aya::Pod for super::Origin {}
    // SAFETY: #[repr(C)] integers and explicit padding only (sizes checked above): any bit pattern is valid.
    unsafe impl aya::Pod for super::Event {}
}
