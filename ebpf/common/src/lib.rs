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
    /// The range of cgroup levels holding tags ([`Depth`], slot 0): the hooks look only there.
    pub const DEPTH: &str = "WARDEN_DEPTH";
    /// Redirected sockets in flight per tagged cgroup (tagged cgroup id → count, `i64`).
    pub const INFLIGHT: &str = "WARDEN_INFLIGHT";
    /// Spliced opaque TCP sessions: both sockets of each, by socket cookie (a sockhash).
    pub const SPLICE: &str = "WARDEN_SPLICE";
    /// Spliced socket cookie → [`SplicePeer`].
    pub const SPLICE_PEER: &str = "WARDEN_SPLICE_PEER";
    /// The stream verdict program attached to the splice map (not to a cgroup); without it, sessions are
    /// relayed in user space.
    pub const SPLICE_PROGRAM: &str = "warden_splice";
    /// Limits the daemon may override ([`Limits`], slot 0; zero fields mean the built-in defaults).
    pub const LIMITS: &str = "WARDEN_LIMITS";
    /// Attached only where the kernel takes them: the LSM hook needs BPF LSM enabled; the setsockopt hook
    /// needs the current-task helpers in sockopt programs (6.x). Without them the others still enforce
    /// (`warden_egress` drops the packets a refused socket option would have shaped).
    pub const OPTIONAL: &[&str] = &["warden_socket_create", "warden_setsockopt"];
    /// Attached to each tagged cgroup when it is tagged (link pinned as `<name>_cgroup_<cgroup id>`; bpffs
    /// names may not hold dots), not to the root: only sockets made in a tagged cgroup's subtree run them,
    /// so an untagged socket never pays for them. In attach order: the bookkeeping of redirected sockets
    /// first, then the refusals, all before the tag goes in.
    pub const PER_CGROUP: &[&str] = &[
        "warden_sock_ops",
        "warden_sock_release",
        "warden_getpeername4",
        "warden_getpeername6",
        "warden_sock_create",
        "warden_setsockopt",
        "warden_egress",
    ];
    /// Every program attached at the root, in attach order: those that judge the calling task whatever
    /// cgroup its socket was made in (connect, sendmsg), or that guard every process (bind, the LSM hook).
    pub const PROGRAMS: &[&str] = &[
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

    /// The IPv4 endpoints (mapped, same port) this IPv6 address embeds, that a relay or tunnel on the path
    /// turns it into: 6to4 (`2002:V4::/48`), Teredo (`2001:0:SERVER::` with the client obfuscated in the
    /// last 32 bits: both), ISATAP (interface id `0:5efe:V4` or `200:5efe:V4`, under any prefix).
    #[expect(clippy::inline_always, reason = "called from the kernel programs, where it must be inlined")]
    #[inline(always)]
    pub fn embedded_v4(&self) -> [Option<Self>; 2] {
        if self.is_v4_mapped() {
            return [None, None];
        }
        let w0 = self.ip[0].to_ne_bytes();
        let w1 = self.ip[1].to_ne_bytes();
        let w2 = self.ip[2].to_ne_bytes();
        if w0[0] == 0x20 && w0[1] == 0x02 {
            let v4 = u32::from_ne_bytes([w0[2], w0[3], w1[0], w1[1]]);
            return [Some(Self::mapped(v4, self.port)), None];
        }
        if w0 == [0x20, 0x01, 0, 0] {
            return [Some(Self::mapped(self.ip[1], self.port)), Some(Self::mapped(!self.ip[3], self.port))];
        }
        if (w2[0] == 0 || w2[0] == 2) && w2[1] == 0 && w2[2] == 0x5e && w2[3] == 0xfe {
            return [Some(Self::mapped(self.ip[3], self.port)), None];
        }
        [None, None]
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

/// The cgroup levels (0 = the root) at which tags exist, in slot 0 of the depth map. With `known == 0`
/// (a map nobody has filled yet) the hooks check every level from [`MAX_CGROUP_DEPTH`] to the root; the
/// daemon widens the range before it adds a tag and narrows it only after it removed one, so a tagged
/// cgroup is never outside it. `lo > hi` means no tags at all.
///
/// `common`, when not 0, is a cgroup every tagged cgroup is (or is below), at level `common_level`
/// (`<= lo`): the deepest such one the daemon knows. A task whose ancestor at that level is another cgroup
/// is untagged, found with one helper call and no map lookup. The daemon clears it (0) while it widens the
/// range for a new tag, and sets it again once the tag is in.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Depth {
    pub known: u32,
    pub lo: u32,
    pub hi: u32,
    pub common_level: u32,
    pub common: u64,
}

/// Redirected sockets one tagged cgroup may have in flight (from connect() until close) unless
/// [`Limits::origins_per_cgroup`] says otherwise: a flood from one cgroup refuses only its own connects and
/// cannot push other cgroups' origins out of the LRU origin map.
pub const ORIGINS_PER_CGROUP: u32 = 4096;

/// What the splice map's verdict program needs for one spliced socket: where its bytes go, and how many it
/// has sent there.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SplicePeer {
    /// The peer socket's cookie (its key in the splice map).
    pub peer: u64,
    /// Bytes received on this socket and redirected to the peer.
    pub bytes: u64,
}

/// Limits, in slot 0 of the limits map; 0 means the default.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    pub origins_per_cgroup: u32,
    pub pad: u32,
}

/// [`Origin::flags`]: the socket reached `TCP_CONNECT_CB`, so sock_ops sees it close and forgets the
/// origin then; until this is set, `sock_release` does.
pub const ORIGIN_CONNECTING: u16 = 1;

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
    /// [`ORIGIN_CONNECTING`], set by the kernel.
    pub flags: u16,
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
    /// setsockopt() of an option that changes where packets go (IPv6 routing/destination/hop-by-hop
    /// headers, IPv4 options); `protocol` holds the level, `sock_type` the option name.
    pub const SOCKOPT_REFUSED: u32 = 7;
    /// A packet leaving with an IPv6 routing/destination/hop-by-hop header or IPv4 options (set through
    /// ancillary data), dropped; `dst` is the packet's destination.
    pub const PACKET_REFUSED: u32 = 8;
    /// A target connect() refused because its tagged cgroup has its share of in-flight origins.
    pub const ORIGIN_QUOTA: u32 = 9;
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
const _: () = assert!(core::mem::size_of::<Depth>() == 24);
const _: () = assert!(core::mem::size_of::<Limits>() == 8);
const _: () = assert!(core::mem::size_of::<SplicePeer>() == 16);

#[cfg(test)]
mod tests {
    extern crate std;

    use super::Endpoint;

    fn v6(s: &str, port: u16) -> Endpoint {
        let a: std::net::Ipv6Addr = s.parse().unwrap();
        let o = a.octets();
        let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
        Endpoint::new([w(0), w(4), w(8), w(12)], port)
    }

    fn v4(a: [u8; 4], port: u16) -> Endpoint {
        Endpoint::mapped(u32::from_ne_bytes(a), port)
    }

    #[test]
    fn embedded_ipv4_targets_are_found_in_6to4_teredo_and_isatap() {
        let t = [127, 0, 0, 5];
        assert_eq!(v6("2002:7f00:5::1", 80).embedded_v4(), [Some(v4(t, 80)), None]);
        assert_eq!(v6("2002:7f00:5:ffff::abcd", 80).embedded_v4(), [Some(v4(t, 80)), None]);
        assert_eq!(v6("2001:0:7f00:5::1", 80).embedded_v4()[0], Some(v4(t, 80)));
        assert_eq!(v6("2001:0:a00:1::80ff:fffa", 80).embedded_v4()[1], Some(v4(t, 80)));
        assert_eq!(v6("2001:db8::5efe:7f00:5", 80).embedded_v4(), [Some(v4(t, 80)), None]);
        assert_eq!(v6("fe80::200:5efe:7f00:5", 80).embedded_v4(), [Some(v4(t, 80)), None]);
        for none in ["2001:db8::1", "::1", "64:ff9b::7f00:5", "2003::1"] {
            assert_eq!(v6(none, 80).embedded_v4(), [None, None], "{none}");
        }
        assert_eq!(v4(t, 80).embedded_v4(), [None, None]);
    }
}

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
    // SAFETY: #[repr(C)] integers and explicit padding only (sizes checked above): any bit pattern is valid.
    unsafe impl aya::Pod for super::Depth {}
    // SAFETY: #[repr(C)] integers and explicit padding only (sizes checked above): any bit pattern is valid.
    unsafe impl aya::Pod for super::Limits {}
    // SAFETY: #[repr(C)] integers and explicit padding only (sizes checked above): any bit pattern is valid.
    unsafe impl aya::Pod for super::SplicePeer {}
}
