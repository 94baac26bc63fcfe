//! Warden's kernel programs, attached once at the cgroup2 root with pinned links.
//!
//! For a socket opened by a process whose cgroup (or any ancestor) is tagged:
//! - `connect4/6` classify the destination: a target is rewritten to the proxy and its origin stored by
//!   socket cookie; an allow-listed destination passes; anything else is refused (EPERM) and reported.
//! - `sock_ops` indexes the origin by the socket's local endpoint once established (the proxy's accept
//!   peer) and forgets it when the socket closes.
//! - `getpeername4/6` show the process the original peer.
//! - `sendmsg4/6` let UDP reach only allow-listed destinations.
//! - `bind4/6` keep tagged processes off the proxy's port; `sock_create` refuses raw, packet and every
//!   other socket kind that could carry traffic around these hooks.
//!
//! Untagged processes pay one tag-map lookup per ancestor level and are never changed.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_TCP_CLOSE, bpf_sock_addr,
    },
    helpers::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_current_pid_tgid,
        bpf_get_current_uid_gid, bpf_get_socket_cookie, bpf_ktime_get_ns,
    },
    macros::{cgroup_sock, cgroup_sock_addr, lsm, map, sock_ops},
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf, lpm_trie::Key},
    programs::{LsmContext, SockAddrContext, SockContext, SockOpsContext},
};
use warden_common::{
    AF_INET, AF_INET6, AF_NETLINK, AF_UNIX, AllowKey, Binding, Endpoint, Event, GUARD, MAX_CGROUP_DEPTH,
    Origin, ProxyConfig, TargetRef, event,
};

const ALLOW: i32 = 1;
const DENY: i32 = 0;

const SOCK_STREAM: u32 = 1;
const SOCK_DGRAM: u32 = 2;
const IPPROTO_TCP: u32 = 6;
const IPPROTO_UDP: u32 = 17;

/// Tagged cgroups: cgroup id → binding.
#[map(name = "WARDEN_TAGS")]
static TAGS: HashMap<u64, Binding> = HashMap::pinned(65_536, 0);

/// Protected destinations: endpoint → target.
#[map(name = "WARDEN_TARGETS")]
static TARGETS: HashMap<Endpoint, TargetRef> = HashMap::pinned(65_536, 0);

/// Destinations tagged processes may reach directly.
#[map(name = "WARDEN_ALLOW")]
static ALLOWED: LpmTrie<AllowKey, u32> = LpmTrie::pinned(16_384, 0);

/// The proxy's listeners (slot 0).
#[map(name = "WARDEN_PROXY")]
static PROXY: Array<ProxyConfig> = Array::pinned(1, 0);

/// Origins of redirected sockets by socket cookie, from connect() until close. LRU so connects that
/// never complete cannot exhaust it; a live entry is only needed for getpeername.
#[map(name = "WARDEN_ORIGINS")]
static ORIGINS: LruHashMap<u64, Origin> = LruHashMap::pinned(262_144, 0);

/// Origins of established redirected sockets by their local endpoint (the proxy's accept peer).
#[map(name = "WARDEN_BY_ADDR")]
static BY_ADDR: LruHashMap<Endpoint, Origin> = LruHashMap::pinned(262_144, 0);

/// Refusals, for the audit record.
#[map(name = "WARDEN_EVENTS")]
static EVENTS: RingBuf = RingBuf::pinned(1 << 20, 0);

/// Events that found the ring buffer full (slot 0, per CPU): the daemon records how many were lost.
#[map(name = "WARDEN_LOST")]
static LOST: PerCpuArray<u64> = PerCpuArray::pinned(1, 0);

/// The binding that applies to the current task: its nearest tagged ancestor (or itself).
#[inline(always)]
fn tagged() -> Option<(u64, Binding)> {
    let mut i = 0;
    while i <= MAX_CGROUP_DEPTH {
        let level = MAX_CGROUP_DEPTH - i;
        // SAFETY: a plain helper call with an integer argument.
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(level) };
        if id != 0 {
            // SAFETY: the value is Copy and read at once; the map holds plain integers.
            if let Some(b) = unsafe { TAGS.get(&id) } {
                return Some((id, *b));
            }
        }
        i += 1;
    }
    None
}

#[inline(always)]
fn proxy() -> Option<ProxyConfig> {
    PROXY.get(0).copied()
}

#[inline(always)]
fn is_allowed(dst: &Endpoint) -> bool {
    let mut key = AllowKey { port: dst.port.to_be_bytes(), ip: [0; 16] };
    let mut w = 0;
    while w < 4 {
        let b = dst.ip[w].to_ne_bytes();
        key.ip[w * 4] = b[0];
        key.ip[w * 4 + 1] = b[1];
        key.ip[w * 4 + 2] = b[2];
        key.ip[w * 4 + 3] = b[3];
        w += 1;
    }
    if ALLOWED.get(Key::new(16 + 128, key)).is_some() {
        return true;
    }
    key.port = [0, 0];
    ALLOWED.get(Key::new(16 + 128, key)).is_some()
}

/// True for any endpoint on one of the proxy's ports: tagged processes never reach the proxy except
/// through a rewrite, so an origin can never be forged by connecting to it directly.
#[inline(always)]
fn is_proxy_port(p: &ProxyConfig, dst: &Endpoint) -> bool {
    (p.v4.port != 0 && dst.port == p.v4.port) || (p.v6.port != 0 && dst.port == p.v6.port)
}

/// True when `e` reaches a target's listener without being the target's own address: a guard entry, or
/// this host under another spelling (0.0.0.0, 127/8, ::, ::1) on a port where a target lives on this host.
#[inline(always)]
fn shadows_target(e: &Endpoint) -> bool {
    // SAFETY: read-only lookups of Copy values.
    unsafe {
        if let Some(t) = TARGETS.get(e) {
            return t.id == GUARD;
        }
        e.is_this_host() && TARGETS.get(&Endpoint::local_port_guard(e.port)).is_some()
    }
}

#[inline(always)]
fn report(kind: u32, tag: (u64, Binding), dst: &Endpoint, family: u32, sock_type: u32, protocol: u32) {
    // SAFETY: plain helper calls.
    let (pid_tgid, uid_gid, cgroup, now) = unsafe {
        (
            bpf_get_current_pid_tgid(),
            bpf_get_current_uid_gid(),
            bpf_get_current_cgroup_id(),
            bpf_ktime_get_ns(),
        )
    };
    if let Some(mut entry) = EVENTS.reserve::<Event>(0) {
        entry.write(Event {
            cgroup,
            tagged_cgroup: tag.0,
            ktime_ns: now,
            dst: *dst,
            kind,
            sock_type,
            protocol,
            family,
            pid: pid_tgid as u32,
            tgid: (pid_tgid >> 32) as u32,
            uid: uid_gid as u32,
            gid: (uid_gid >> 32) as u32,
            binding: tag.1.id,
        });
        entry.submit(0);
    } else if let Some(n) = LOST.get_ptr_mut(0) {
        // SAFETY: this CPU's slot of a per-CPU array; nothing else writes it while this program runs.
        unsafe { *n += 1 };
    }
}

/// Reads the destination of a sock_addr context as an endpoint.
#[inline(always)]
unsafe fn destination(sa: *const bpf_sock_addr, v6: bool) -> Endpoint {
    // SAFETY: the caller passes the program's own context as `sa` (this function's contract). Each field
    // is read with its natural 4-byte width, as the verifier requires.
    unsafe {
        let port = u16::from_be((*sa).user_port as u16);
        if v6 {
            Endpoint::new(
                [
                    core::ptr::read_volatile(&raw const (*sa).user_ip6[0]),
                    core::ptr::read_volatile(&raw const (*sa).user_ip6[1]),
                    core::ptr::read_volatile(&raw const (*sa).user_ip6[2]),
                    core::ptr::read_volatile(&raw const (*sa).user_ip6[3]),
                ],
                port,
            )
        } else {
            Endpoint::mapped((*sa).user_ip4, port)
        }
    }
}

/// Rewrites the destination of a sock_addr context.
#[inline(always)]
unsafe fn rewrite(sa: *mut bpf_sock_addr, v6: bool, to: &Endpoint) {
    // SAFETY: the caller passes the program's own context as `sa`, in a connect or getpeername hook
    // (this function's contract), where user_ip4/user_ip6/user_port are writable with 4-byte stores.
    unsafe {
        if v6 {
            core::ptr::write_volatile(&raw mut (*sa).user_ip6[0], to.ip[0]);
            core::ptr::write_volatile(&raw mut (*sa).user_ip6[1], to.ip[1]);
            core::ptr::write_volatile(&raw mut (*sa).user_ip6[2], to.ip[2]);
            core::ptr::write_volatile(&raw mut (*sa).user_ip6[3], to.ip[3]);
        } else {
            (*sa).user_ip4 = to.ip[3];
        }
        (*sa).user_port = u32::from(to.port.to_be());
    }
}

#[inline(always)]
fn connect(ctx: &SockAddrContext, v6: bool) -> i32 {
    let Some(tag) = tagged() else { return ALLOW };
    let sa = ctx.sock_addr;
    // SAFETY: `sa` is this program's context.
    let (dst, sock_type, protocol) = unsafe { (destination(sa, v6), (*sa).type_, (*sa).protocol) };
    let family = u32::from(if v6 { AF_INET6 } else { AF_INET });
    let Some(proxy) = proxy() else {
        // Not configured yet: nothing is a target, only the allow list passes.
        if is_allowed(&dst) {
            return ALLOW;
        }
        report(event::CONNECT_REFUSED, tag, &dst, family, sock_type, protocol);
        return DENY;
    };
    if is_proxy_port(&proxy, &dst) {
        report(event::PROXY_REFUSED, tag, &dst, family, sock_type, protocol);
        return DENY;
    }
    if sock_type == SOCK_STREAM {
        if shadows_target(&dst) {
            report(event::CONNECT_REFUSED, tag, &dst, family, sock_type, protocol);
            return DENY;
        }
        // SAFETY: read-only lookup of a Copy value.
        if let Some(target) = unsafe { TARGETS.get(&dst) } {
            // An IPv4 (or IPv4-mapped) destination goes to the IPv4 listener, IPv6 to the IPv6 one.
            let to = if dst.is_v4_mapped() { proxy.v4 } else { proxy.v6 };
            if to.port == 0 || (!v6 && !to.is_v4_mapped()) {
                report(event::CONNECT_REFUSED, tag, &dst, family, sock_type, protocol);
                return DENY;
            }
            // SAFETY: plain helper calls; the context pointer is valid for the cookie helper.
            let (cookie, pid_tgid, uid_gid, cgroup, now) = unsafe {
                (
                    bpf_get_socket_cookie(sa.cast()),
                    bpf_get_current_pid_tgid(),
                    bpf_get_current_uid_gid(),
                    bpf_get_current_cgroup_id(),
                    bpf_ktime_get_ns(),
                )
            };
            let origin = Origin {
                cgroup,
                tagged_cgroup: tag.0,
                ktime_ns: now,
                cookie,
                dst,
                family: family as u16,
                pad0: 0,
                target: target.id,
                pid: pid_tgid as u32,
                tgid: (pid_tgid >> 32) as u32,
                uid: uid_gid as u32,
                gid: (uid_gid >> 32) as u32,
                binding: tag.1.id,
            };
            if ORIGINS.insert(&cookie, &origin, 0).is_err() {
                // Fail closed: a connection whose origin cannot be found would reach the proxy anonymous.
                aya_log_ebpf::error!(ctx, "origin map full: refused a connect to port {}", dst.port);
                report(event::ORIGIN_FULL, tag, &dst, family, sock_type, protocol);
                return DENY;
            }
            // SAFETY: this program's context; connect hooks may rewrite the destination.
            unsafe { rewrite(sa, v6, &to) };
            return ALLOW;
        }
    }
    if is_allowed(&dst) {
        return ALLOW;
    }
    report(event::CONNECT_REFUSED, tag, &dst, family, sock_type, protocol);
    DENY
}

#[cgroup_sock_addr(connect4)]
pub fn warden_connect4(ctx: SockAddrContext) -> i32 {
    connect(&ctx, false)
}

#[cgroup_sock_addr(connect6)]
pub fn warden_connect6(ctx: SockAddrContext) -> i32 {
    connect(&ctx, true)
}

/// Unconnected UDP (sendto/sendmsg with an address): only to the allow list.
#[inline(always)]
fn sendmsg(ctx: &SockAddrContext, v6: bool) -> i32 {
    let Some(tag) = tagged() else { return ALLOW };
    let sa = ctx.sock_addr;
    // SAFETY: `sa` is this program's context.
    let (dst, sock_type, protocol) = unsafe { (destination(sa, v6), (*sa).type_, (*sa).protocol) };
    if is_allowed(&dst) {
        return ALLOW;
    }
    let family = u32::from(if v6 { AF_INET6 } else { AF_INET });
    report(event::SENDMSG_REFUSED, tag, &dst, family, sock_type, protocol);
    DENY
}

#[cgroup_sock_addr(sendmsg4)]
pub fn warden_sendmsg4(ctx: SockAddrContext) -> i32 {
    sendmsg(&ctx, false)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn warden_sendmsg6(ctx: SockAddrContext) -> i32 {
    sendmsg(&ctx, true)
}

/// Tagged processes may not bind the proxy's port (to impersonate it while the daemon is down), nor a
/// target's endpoint on this host (to stand in for the target when it is down and receive what Warden
/// sends upstream).
#[inline(always)]
fn bind(ctx: &SockAddrContext, v6: bool) -> i32 {
    let Some(tag) = tagged() else { return ALLOW };
    let sa = ctx.sock_addr;
    // SAFETY: `sa` is this program's context.
    let (local, sock_type, protocol) = unsafe { (destination(sa, v6), (*sa).type_, (*sa).protocol) };
    // SAFETY: read-only lookup of a Copy value.
    let target =
        sock_type == SOCK_STREAM && (unsafe { TARGETS.get(&local) }.is_some() || shadows_target(&local));
    let proxy_port = proxy().is_some_and(|p| is_proxy_port(&p, &local));
    if target || proxy_port {
        let family = u32::from(if v6 { AF_INET6 } else { AF_INET });
        report(event::BIND_REFUSED, tag, &local, family, sock_type, protocol);
        return DENY;
    }
    ALLOW
}

#[cgroup_sock_addr(bind4)]
pub fn warden_bind4(ctx: SockAddrContext) -> i32 {
    bind(&ctx, false)
}

#[cgroup_sock_addr(bind6)]
pub fn warden_bind6(ctx: SockAddrContext) -> i32 {
    bind(&ctx, true)
}

/// A redirected socket's peer is its original destination.
#[inline(always)]
fn getpeername(ctx: &SockAddrContext, v6: bool) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: the context pointer is valid for the cookie helper.
    let cookie = unsafe { bpf_get_socket_cookie(sa.cast()) };
    // SAFETY: read-only lookup of a Copy value.
    if let Some(origin) = unsafe { ORIGINS.get(&cookie) } {
        let dst = origin.dst;
        if v6 || dst.is_v4_mapped() {
            // SAFETY: this program's context; getpeername hooks may rewrite the address.
            unsafe { rewrite(sa, v6, &dst) };
        }
    }
    ALLOW
}

#[cgroup_sock_addr(getpeername4)]
pub fn warden_getpeername4(ctx: SockAddrContext) -> i32 {
    getpeername(&ctx, false)
}

#[cgroup_sock_addr(getpeername6)]
pub fn warden_getpeername6(ctx: SockAddrContext) -> i32 {
    getpeername(&ctx, true)
}

/// Which sockets a tagged process may open: TCP and UDP over IPv4/IPv6 (which the hooks above govern),
/// Unix and netlink sockets; nothing else (raw, packet, ICMP, SCTP, MPTCP, vsock, XDP, ...).
#[inline(always)]
fn socket_allowed(family: u32, sock_type: u32, protocol: u32) -> bool {
    match family as u16 {
        AF_UNIX | AF_NETLINK => true,
        AF_INET | AF_INET6 => {
            (sock_type == SOCK_STREAM && (protocol == 0 || protocol == IPPROTO_TCP))
                || (sock_type == SOCK_DGRAM && (protocol == 0 || protocol == IPPROTO_UDP))
        }
        _ => false,
    }
}

/// IPv4/IPv6 sockets (this hook runs only for those families); the LSM hook below covers every family
/// where BPF LSM is enabled.
#[cgroup_sock(sock_create)]
pub fn warden_sock_create(ctx: SockContext) -> i32 {
    let Some(tag) = tagged() else { return ALLOW };
    let sk = ctx.sock;
    // SAFETY: `sk` is this program's context; family, type and protocol are readable.
    let (family, sock_type, protocol) = unsafe { ((*sk).family, (*sk).type_, (*sk).protocol) };
    if socket_allowed(family, sock_type, protocol) {
        return ALLOW;
    }
    report(event::SOCKET_REFUSED, tag, &Endpoint::default(), family, sock_type, protocol);
    DENY
}

const EPERM: i32 = 1;

/// `socket()` of any family: vsock (the hypervisor), packet, XDP, Bluetooth... are refused for tagged
/// processes here, since cgroup/sock_create never sees them.
#[lsm(hook = "socket_create")]
pub fn warden_socket_create(ctx: LsmContext) -> i32 {
    // socket_create(int family, int type, int protocol, int kern), then the previous program's verdict.
    let (family, sock_type, protocol, kern, previous): (i32, i32, i32, i32, i32) =
        (ctx.arg(0), ctx.arg(1), ctx.arg(2), ctx.arg(3), ctx.arg(4));
    if previous != 0 {
        return previous;
    }
    if kern != 0 {
        return 0;
    }
    let Some(tag) = tagged() else { return 0 };
    let (family, sock_type, protocol) = (family as u32, sock_type as u32, protocol as u32);
    if socket_allowed(family, sock_type, protocol) {
        return 0;
    }
    report(event::SOCKET_REFUSED, tag, &Endpoint::default(), family, sock_type, protocol);
    -EPERM
}

#[inline(always)]
fn local_endpoint(ctx: &SockOpsContext) -> Endpoint {
    let port = ctx.local_port() as u16; // host order in bpf_sock_ops
    if ctx.family() == u32::from(AF_INET) {
        Endpoint::mapped(ctx.local_ip4(), port)
    } else {
        let ops = ctx.ops;
        // SAFETY: the context; each word is loaded on its own at a constant offset, since the verifier
        // refuses loads through a context pointer that was moved.
        let ip = unsafe {
            [
                core::ptr::read_volatile(&raw const (*ops).local_ip6[0]),
                core::ptr::read_volatile(&raw const (*ops).local_ip6[1]),
                core::ptr::read_volatile(&raw const (*ops).local_ip6[2]),
                core::ptr::read_volatile(&raw const (*ops).local_ip6[3]),
            ]
        };
        Endpoint::new(ip, port)
    }
}

#[sock_ops]
pub fn warden_sock_ops(ctx: SockOpsContext) -> u32 {
    let op = ctx.op();
    if op != BPF_SOCK_OPS_TCP_CONNECT_CB
        && op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB
        && op != BPF_SOCK_OPS_STATE_CB
    {
        return 1;
    }
    // SAFETY: the sock_ops context is valid for the cookie helper.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
    // SAFETY: read-only lookup of a Copy value.
    let origin = (unsafe { ORIGINS.get(&cookie) }).copied();
    if op == BPF_SOCK_OPS_TCP_CONNECT_CB {
        if origin.is_some() {
            // Be told when this socket closes, even if it never establishes.
            let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
        }
    } else if op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        let local = local_endpoint(&ctx);
        if let Some(origin) = origin {
            let _ = BY_ADDR.insert(&local, &origin, 0);
        } else if to_proxy_port(&ctx) {
            // A connection to the proxy without an origin (an untagged client, or one whose origin the LRU
            // evicted): whatever an earlier socket left under this local endpoint is not its origin.
            let _ = BY_ADDR.remove(&local);
        }
    } else if ctx.arg(1) == BPF_TCP_CLOSE {
        // Only this socket's own entry: the origin may have been evicted from ORIGINS meanwhile, and the
        // local endpoint may already serve a newer connection.
        let local = local_endpoint(&ctx);
        // SAFETY: read-only lookup of a Copy value.
        if unsafe { BY_ADDR.get(&local) }.is_some_and(|o| o.cookie == cookie) {
            let _ = BY_ADDR.remove(&local);
        }
        let _ = ORIGINS.remove(&cookie);
    }
    1
}

/// True when a sock_ops socket's peer port is one of the proxy's ports.
#[inline(always)]
fn to_proxy_port(ctx: &SockOpsContext) -> bool {
    // remote_port holds the network-order port in its upper 16 bits (as the kernel documents it,
    // `bpf_ntohl(remote_port)` is the port).
    let port = u32::from_be(ctx.remote_port()) as u16;
    proxy().is_some_and(|p| (p.v4.port != 0 && port == p.v4.port) || (p.v6.port != 0 && port == p.v6.port))
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
