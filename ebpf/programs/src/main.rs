//! Warden's kernel programs. `connect4/6`, `sendmsg4/6`, `bind4/6` (and the LSM hook) are attached once at
//! the cgroup2 root with pinned links: they judge the calling task, whatever cgroup its socket was made in.
//! The others are attached to each tagged cgroup at tag time (`names::PER_CGROUP`): the kernel runs a
//! cgroup's programs for the sockets made in its subtree only, so untagged sockets never run them.
//!
//! For a socket opened by a process whose cgroup (or any ancestor) is tagged:
//! - `connect4/6` classify the destination: a target is rewritten to the proxy and its origin stored by
//!   socket cookie; an allow-listed destination passes; anything else is refused (EPERM) and reported.
//! - `sock_ops` indexes the origin by the socket's local endpoint once established (the proxy's accept
//!   peer) and forgets it when the socket closes.
//! - `getpeername4/6` show the process the original peer.
//! - `sendmsg4/6` let UDP reach only allow-listed destinations.
//! - `bind4/6` keep every process but root outside tagged cgroups (the daemon) off the proxy's port;
//!   `sock_create` refuses raw, packet and every other socket kind that could carry traffic around these
//!   hooks.
//! - `setsockopt` refuses options that route packets elsewhere (IPv6 routing headers, IPv4 source routes);
//!   `egress` drops packets that carry them anyway (set through ancillary data).
//! - `sock_release` forgets origins of sockets that closed before sock_ops could see them.
//!
//! Untagged processes run only the root programs: `connect4/6` and `sendmsg4/6` pay one tag-map lookup per
//! cgroup level that holds tags (`WARDEN_DEPTH`) and change nothing; `bind4/6` leave at once for any port
//! but the proxy's.
#![no_std]
#![no_main]
// The BPF target has no compare-and-swap, so core's atomic types offer no fetch_add: the intrinsic gives
// the BPF atomic add instruction directly.
#![expect(internal_features, reason = "core::intrinsics::atomic_xadd is the BPF atomic add")]
#![feature(core_intrinsics)]

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{
    bindings::{
        BPF_NOEXIST, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_TCP_CLOSE, __sk_buff, bpf_sock_addr,
    },
    helpers::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_current_pid_tgid,
        bpf_get_current_uid_gid, bpf_get_socket_cookie, bpf_ktime_get_ns, bpf_skb_ancestor_cgroup_id,
        bpf_skb_cgroup_id,
    },
    macros::{cgroup_skb, cgroup_sock, cgroup_sock_addr, cgroup_sockopt, lsm, map, sock_ops, stream_verdict},
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf, SockHash, lpm_trie::Key},
    programs::{LsmContext, SkBuffContext, SockAddrContext, SockContext, SockOpsContext, SockoptContext},
};
use warden_common::{
    AF_INET, AF_INET6, AF_NETLINK, AF_UNIX, AllowKey, Binding, Depth, Endpoint, Event, GUARD, Limits,
    MAX_CGROUP_DEPTH, ORIGIN_CONNECTING, ORIGINS_PER_CGROUP, Origin, ProxyConfig, SplicePeer, TargetRef,
    event,
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

/// The cgroup levels that hold tags (slot 0), kept by the daemon: untagged tasks pay for those levels only.
#[map(name = "WARDEN_DEPTH")]
static DEPTH: Array<Depth> = Array::pinned(1, 0);

/// Redirected sockets in flight per tagged cgroup: each has a bounded share of the origin map.
#[map(name = "WARDEN_INFLIGHT")]
static INFLIGHT: HashMap<u64, i64> = HashMap::pinned(65_536, 0);

/// Limits the daemon may override (slot 0).
#[map(name = "WARDEN_LIMITS")]
static LIMITS: Array<Limits> = Array::pinned(1, 0);

/// The nearest tagged ancestor (or itself) among the cgroup ids `ancestor(level)` gives. Only the levels
/// that hold tags are looked at, deepest first, and only below the tags' common ancestor: a task outside
/// it costs one `ancestor` call and no map lookup.
#[inline(always)]
fn nearest_tag(ancestor: impl Fn(i32) -> u64) -> Option<(u64, Binding)> {
    let (mut level, lo) = match DEPTH.get(0) {
        Some(d) if d.known != 0 => {
            if d.hi < d.lo {
                return None;
            }
            if d.common != 0 && ancestor(d.common_level.min(MAX_CGROUP_DEPTH as u32) as i32) != d.common {
                return None;
            }
            (d.hi.min(MAX_CGROUP_DEPTH as u32) as i32, d.lo as i32)
        }
        _ => (MAX_CGROUP_DEPTH, 0),
    };
    let mut i = 0;
    while i <= MAX_CGROUP_DEPTH && level >= lo {
        let id = ancestor(level);
        level -= 1;
        i += 1;
        if id == 0 {
            continue;
        }
        // SAFETY: the value is Copy and read at once; the map holds plain integers.
        if let Some(b) = unsafe { TAGS.get(&id) } {
            return Some((id, *b));
        }
    }
    None
}

/// The binding that applies to the current task: its nearest tagged ancestor (or itself).
#[inline(always)]
fn tagged() -> Option<(u64, Binding)> {
    // SAFETY: a plain helper call with an integer argument.
    nearest_tag(|level| unsafe { bpf_get_current_ancestor_cgroup_id(level) })
}

/// Takes one of the tagged cgroup's in-flight slots; false when it has used its share (or the count
/// cannot be kept: fail closed).
#[inline(always)]
fn take_share(tagged_cgroup: u64) -> bool {
    let cap = match LIMITS.get(0) {
        Some(l) if l.origins_per_cgroup != 0 => l.origins_per_cgroup,
        _ => ORIGINS_PER_CGROUP,
    };
    let ptr = if let Some(p) = INFLIGHT.get_ptr_mut(&tagged_cgroup) {
        p
    } else {
        // Another CPU may create it first: that is fine, the lookup below finds it.
        let _ = INFLIGHT.insert(&tagged_cgroup, &0, u64::from(BPF_NOEXIST));
        let Some(p) = INFLIGHT.get_ptr_mut(&tagged_cgroup) else { return false };
        p
    };
    // SAFETY: a pointer to a live map value, 8-byte aligned; the kernel programs only touch it with
    // atomic adds, so a racing CPU can overshoot the cap by at most one per CPU.
    unsafe {
        if core::ptr::read_volatile(ptr) >= i64::from(cap) {
            return false;
        }
        atomic_xadd::<i64, i64, { AtomicOrdering::Relaxed }>(ptr, 1);
    }
    true
}

/// Gives back a slot taken by [`take_share`] (a count below zero, after the daemon reset it, counts as 0).
#[inline(always)]
fn release_share(tagged_cgroup: u64) {
    if let Some(ptr) = INFLIGHT.get_ptr_mut(&tagged_cgroup) {
        // SAFETY: as in take_share.
        unsafe { atomic_xadd::<i64, i64, { AtomicOrdering::Relaxed }>(ptr, -1) };
    }
}

/// Forgets a redirected socket's origin and gives back its slot, once (only the call that deletes the
/// entry gives the slot back).
#[inline(always)]
fn forget_origin(cookie: u64, origin: &Origin) {
    if ORIGINS.remove(&cookie).is_ok() {
        release_share(origin.tagged_cgroup);
    }
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

/// True when `e` embeds an IPv4 endpoint that is a target, a guard, or this host on a target's port.
#[inline(always)]
fn embeds_target(e: &Endpoint) -> bool {
    for v4 in e.embedded_v4().iter().flatten() {
        // SAFETY: read-only lookup of a Copy value.
        if unsafe { TARGETS.get(v4) }.is_some() || shadows_target(v4) {
            return true;
        }
    }
    false
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
        if shadows_target(&dst) || embeds_target(&dst) {
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
                flags: 0,
                target: target.id,
                pid: pid_tgid as u32,
                tgid: (pid_tgid >> 32) as u32,
                uid: uid_gid as u32,
                gid: (uid_gid >> 32) as u32,
                binding: tag.1.id,
            };
            // A socket connecting again (after a failed attempt) already holds its slot.
            // SAFETY: read-only lookup of a Copy value.
            let held = unsafe { ORIGINS.get(&cookie) }.is_some_and(|o| o.tagged_cgroup == tag.0);
            if !held && !take_share(tag.0) {
                report(event::ORIGIN_QUOTA, tag, &dst, family, sock_type, protocol);
                return DENY;
            }
            if ORIGINS.insert(&cookie, &origin, 0).is_err() {
                // Fail closed: a connection whose origin cannot be found would reach the proxy anonymous.
                aya_log_ebpf::error!(ctx, "origin map full: refused a connect to port {}", dst.port);
                if !held {
                    release_share(tag.0);
                }
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

/// Only root outside tagged cgroups (the daemon) may bind the proxy's port: any other process could
/// impersonate the proxy while the daemon is down, and keep it from starting again. Tagged processes may
/// not bind a target's endpoint on this host either (to stand in for the target when it is down and
/// receive what Warden sends upstream).
#[inline(always)]
fn bind(ctx: &SockAddrContext, v6: bool) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: `sa` is this program's context.
    let (local, sock_type, protocol) = unsafe { (destination(sa, v6), (*sa).type_, (*sa).protocol) };
    let family = u32::from(if v6 { AF_INET6 } else { AF_INET });
    if proxy().is_some_and(|p| is_proxy_port(&p, &local)) {
        let tag = tagged();
        // The real uid in the initial user namespace: root of a user namespace is not root here.
        let uid = bpf_get_current_uid_gid() as u32;
        if tag.is_some() || uid != 0 {
            report(event::BIND_REFUSED, tag.unwrap_or_default(), &local, family, sock_type, protocol);
            return DENY;
        }
        return ALLOW;
    }
    let Some(tag) = tagged() else { return ALLOW };
    // SAFETY: read-only lookup of a Copy value.
    let target =
        sock_type == SOCK_STREAM && (unsafe { TARGETS.get(&local) }.is_some() || shadows_target(&local));
    if target {
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

/// A redirected socket's peer is its original destination. Only a peer on the proxy's port can be one:
/// every other socket leaves at once.
#[inline(always)]
fn getpeername(ctx: &SockAddrContext, v6: bool) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: `sa` is this program's context; user_port is readable with a 4-byte load.
    let port = u16::from_be(unsafe { (*sa).user_port } as u16);
    if !proxy().is_some_and(|p| (p.v4.port != 0 && port == p.v4.port) || (p.v6.port != 0 && port == p.v6.port))
    {
        return ALLOW;
    }
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

/// Attached to each tagged cgroup: only sockets made in a tagged subtree run it. Only sockets connecting to
/// the proxy's port (every redirected one) go past the first checks; state callbacks are asked for on
/// redirected sockets only.
#[sock_ops]
pub fn warden_sock_ops(ctx: SockOpsContext) -> u32 {
    let op = ctx.op();
    if op != BPF_SOCK_OPS_TCP_CONNECT_CB
        && op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB
        && op != BPF_SOCK_OPS_STATE_CB
    {
        return 1;
    }
    if op != BPF_SOCK_OPS_STATE_CB && !to_proxy_port(&ctx) {
        return 1;
    }
    // SAFETY: the sock_ops context is valid for the cookie helper.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
    if op == BPF_SOCK_OPS_TCP_CONNECT_CB {
        if let Some(o) = ORIGINS.get_ptr_mut(&cookie) {
            // SAFETY: a live map value; only this socket's own callbacks write its flags.
            unsafe { (*o).flags |= ORIGIN_CONNECTING };
            // Be told when this socket closes, even if it never establishes.
            let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
        }
        return 1;
    }
    // SAFETY: read-only lookup of a Copy value.
    let origin = (unsafe { ORIGINS.get(&cookie) }).copied();
    if op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        let local = local_endpoint(&ctx);
        if let Some(origin) = origin {
            let _ = BY_ADDR.insert(&local, &origin, 0);
        } else if to_proxy_port(&ctx) {
            // A tagged socket at the proxy without an origin (the LRU evicted it): whatever an earlier
            // socket left under this local endpoint is not its origin. (Untagged sockets never run this
            // program: an entry lives only as long as a redirected socket of a tagged cgroup holds the
            // endpoint, and the proxy takes it only for a connection that reached the redirect's address.)
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
        if let Some(origin) = origin {
            forget_origin(cookie, &origin);
        }
    }
    1
}

/// A redirected socket closed before it ever reached `TCP_CONNECT_CB` (its connect failed after the
/// rewrite, so it is still in TCP_CLOSE): sock_ops will never see it close, so its origin and its slot go
/// here. Every other socket leaves after two field reads.
#[cgroup_sock(sock_release)]
pub fn warden_sock_release(ctx: SockContext) -> i32 {
    let sk = ctx.sock;
    // SAFETY: `sk` is this program's context; type and state are readable.
    if unsafe { (*sk).type_ != SOCK_STREAM || (*sk).state != BPF_TCP_CLOSE } {
        return ALLOW;
    }
    // SAFETY: the context pointer is valid for the cookie helper.
    let cookie = unsafe { bpf_get_socket_cookie(sk.cast()) };
    // SAFETY: read-only lookup of a Copy value.
    if let Some(origin) = unsafe { ORIGINS.get(&cookie) }.copied()
        && origin.flags & ORIGIN_CONNECTING == 0
    {
        forget_origin(cookie, &origin);
    }
    ALLOW
}

const SOL_IP: i32 = 0;
const SOL_IPV6: i32 = 41;
const IP_OPTIONS: i32 = 4;

/// True for the socket options that change where a packet goes or what a router does with it: IPv4
/// options (source routes among them) and IPv6 routing, destination-options and hop-by-hop headers, in
/// both the RFC 3542 and the RFC 2292 spellings (including IPV6_2292PKTOPTIONS, which sets them all).
#[inline(always)]
fn routes_packets(level: i32, optname: i32) -> bool {
    match level {
        SOL_IP => optname == IP_OPTIONS,
        // IPV6_2292HOPOPTS 3, 2292DSTOPTS 4, 2292RTHDR 5, 2292PKTOPTIONS 6, HOPOPTS 54, RTHDRDSTOPTS 55,
        // RTHDR 57, DSTOPTS 59.
        SOL_IPV6 => matches!(optname, 3..=6 | 54 | 55 | 57 | 59),
        _ => false,
    }
}

/// Tagged processes may not set options that route packets somewhere other than the address the connect
/// and sendmsg hooks judged.
#[cgroup_sockopt(setsockopt)]
pub fn warden_setsockopt(ctx: SockoptContext) -> i32 {
    let so = ctx.sockopt;
    // SAFETY: `so` is this program's context; level and optname are readable.
    let (level, optname) = unsafe { ((*so).level, (*so).optname) };
    if !routes_packets(level, optname) {
        return ALLOW;
    }
    let Some(tag) = tagged() else { return ALLOW };
    // SAFETY: `so` is this program's context; its socket pointer is valid for reads of family.
    let family = unsafe { (*(*so).__bindgen_anon_1.sk).family };
    report(event::SOCKOPT_REFUSED, tag, &Endpoint::default(), family, optname as u32, level as u32);
    DENY
}

const IPPROTO_HOPOPTS: u8 = 0;
const IPPROTO_ROUTING: u8 = 43;
const IPPROTO_DSTOPTS: u8 = 60;

/// The ancillary forms (IPV6_RTHDR / IPV6_DSTOPTS / IPV6_HOPOPTS, IP_RETOPTS cmsgs on sendmsg) never reach a
/// socket-option hook: every packet a tagged cgroup's socket sends with IPv4 options or an IPv6 routing,
/// destination-options or hop-by-hop header is dropped (sendmsg fails with EPERM). Attached to each tagged
/// cgroup (not the root), so untagged sockets never run it; other packets leave after one header read.
#[cgroup_skb(egress)]
pub fn warden_egress(ctx: SkBuffContext) -> i32 {
    let skb = ctx.skb.skb;
    // SAFETY: `skb` is this program's context; data and data_end bound the packet's linear part, read
    // directly within them (checked).
    let (shaped, v6) = unsafe {
        let data = (*skb).data as usize;
        let end = (*skb).data_end as usize;
        if data + 8 > end {
            // Not even a header in the linear part: read through the helper.
            match (ctx.load::<u8>(0), ctx.load::<u8>(6)) {
                (Ok(b), Ok(nh)) => shaped_header(b, nh),
                _ => return 1,
            }
        } else {
            shaped_header(*(data as *const u8), *((data + 6) as *const u8))
        }
    };
    if !shaped {
        return 1;
    }
    // SAFETY: a plain helper call on this program's context.
    let tag = nearest_tag(|level| unsafe { bpf_skb_ancestor_cgroup_id(skb, level) }).unwrap_or_default();
    let dst = if v6 {
        let mut ip = [0u32; 4];
        let mut i = 0;
        while i < 4 {
            ip[i] = ctx.load::<u32>(24 + i * 4).unwrap_or(0);
            i += 1;
        }
        Endpoint::new(ip, 0)
    } else {
        Endpoint::mapped(ctx.load::<u32>(16).unwrap_or(0), 0)
    };
    let family = u32::from(if v6 { AF_INET6 } else { AF_INET });
    report_skb(skb, tag, &dst, family);
    0
}

/// (carries options or routing/extension headers, is IPv6) from the first byte and the IPv6 next-header.
#[inline(always)]
fn shaped_header(first: u8, next_header: u8) -> (bool, bool) {
    match first >> 4 {
        4 => (first & 0x0f != 5, false),
        6 => (matches!(next_header, IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS), true),
        _ => (false, false),
    }
}

/// Like [`report`], for a packet: the socket's cgroup, no process (the packet may leave from softirq).
#[inline(always)]
fn report_skb(skb: *mut __sk_buff, tag: (u64, Binding), dst: &Endpoint, family: u32) {
    // SAFETY: plain helper calls on this program's context.
    let (cgroup, now) = unsafe { (bpf_skb_cgroup_id(skb), bpf_ktime_get_ns()) };
    if let Some(mut entry) = EVENTS.reserve::<Event>(0) {
        entry.write(Event {
            cgroup,
            tagged_cgroup: tag.0,
            ktime_ns: now,
            dst: *dst,
            kind: event::PACKET_REFUSED,
            family,
            binding: tag.1.id,
            ..Event::default()
        });
        entry.submit(0);
    } else if let Some(n) = LOST.get_ptr_mut(0) {
        // SAFETY: this CPU's slot of a per-CPU array; nothing else writes it while this program runs.
        unsafe { *n += 1 };
    }
}

/// True when a sock_ops socket's peer port is one of the proxy's ports.
#[inline(always)]
fn to_proxy_port(ctx: &SockOpsContext) -> bool {
    // remote_port holds the network-order port in its upper 16 bits (as the kernel documents it,
    // `bpf_ntohl(remote_port)` is the port).
    let port = u32::from_be(ctx.remote_port()) as u16;
    proxy().is_some_and(|p| (p.v4.port != 0 && port == p.v4.port) || (p.v6.port != 0 && port == p.v6.port))
}

/// Both sockets of each spliced session (the proxy's accepted client socket and its upstream socket).
#[map(name = "WARDEN_SPLICE")]
static SPLICE: SockHash<u64> = SockHash::pinned(65_536, 0);

/// Each spliced socket's peer and byte count, by cookie.
#[map(name = "WARDEN_SPLICE_PEER")]
static SPLICE_PEER: LruHashMap<u64, SplicePeer> = LruHashMap::pinned(131_072, 0);

const SK_PASS: u32 = 1;

/// Bytes arriving on a spliced socket go straight out of its peer (no copy through user space), counted.
/// A socket whose peer entry is gone (the daemon is ending the splice) passes its bytes to user space.
#[stream_verdict]
pub fn warden_splice(ctx: SkBuffContext) -> u32 {
    // An empty segment (the FIN) stays with its own socket: end of stream is the handler's to pass on, after
    // the bytes before it, and redirecting it would fail on a peer whose sending side is already shut.
    if ctx.len() == 0 {
        return SK_PASS;
    }
    // SAFETY: the context pointer is valid for the cookie helper.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb.cast()) };
    let Some(p) = SPLICE_PEER.get_ptr_mut(&cookie) else { return SK_PASS };
    // SAFETY: a live map value, 8-byte aligned; the byte count is only changed with atomic adds.
    let peer = unsafe {
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*p).bytes, u64::from(ctx.len()));
        (*p).peer
    };
    SPLICE.redirect_skb(&ctx, peer, 0) as u32
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
