//! Ending the connected TCP and UDP sockets a cgroup's processes already hold when it is tagged.
//!
//! The kernel programs judge a socket when it connects (or sends to an address); a connection made before
//! the tag would keep talking to its peer ungoverned. At tag time the daemon lists the socket inodes the
//! cgroup's processes (the whole subtree) hold open, finds them in the kernel's socket tables through
//! `NETLINK_SOCK_DIAG`, and destroys (`SOCK_DESTROY`, as `ss -K` does) every TCP socket that is not
//! listening and every connected UDP socket, except those `keep` names (connections to Warden's proxy).
//! TCP peers get a reset; the process sees `ECONNABORTED`. Only sockets of this network namespace are
//! visible: a namespace an agent makes for itself has no route out unless root gives it one.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum SockDiagError {
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the kernel's socket diagnostics (NETLINK_SOCK_DIAG) failed: {0}; Warden needs CONFIG_INET_DIAG and \
         CONFIG_INET_DIAG_DESTROY to end the sockets a cgroup held before it was tagged"
    )]
    Netlink(#[source] std::io::Error),
    #[error(
        "destroying a {proto} socket to {peer} failed: {source}; the kernel needs CONFIG_INET_DIAG_DESTROY"
    )]
    Destroy {
        proto: &'static str,
        peer: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// What [`end_connected`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ended {
    pub tcp: usize,
    pub udp: usize,
}

const NETLINK_SOCK_DIAG: i32 = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLM_F_DUMP: u16 = 0x300;
const TCP_ESTABLISHED: u32 = 1;
const TCP_LISTEN: u32 = 10;
/// `struct nlmsghdr`, `struct inet_diag_req_v2` and `struct inet_diag_msg` sizes.
const NLMSG_HDR: usize = 16;
const REQ_LEN: usize = 56;
const MSG_LEN: usize = 72;

/// Destroys the connected inet sockets held by processes in `cgroup` (and its descendants), except those
/// whose peer `keep` accepts.
pub fn end_connected(cgroup: &Path, keep: impl Fn(SocketAddr) -> bool) -> Result<Ended, SockDiagError> {
    let inodes = socket_inodes(cgroup)?;
    let mut ended = Ended::default();
    if inodes.is_empty() {
        return Ok(ended);
    }
    let nl = Netlink::open()?;
    for family in [libc::AF_INET, libc::AF_INET6] {
        for (protocol, states) in
            [(libc::IPPROTO_TCP, !(1u32 << TCP_LISTEN)), (libc::IPPROTO_UDP, 1u32 << TCP_ESTABLISHED)]
        {
            let found = nl.dump(family, protocol, states)?;
            for sock in found.into_iter().filter(|s| inodes.contains(&s.inode) && !keep(s.peer)) {
                nl.destroy(family, protocol, &sock)?;
                if protocol == libc::IPPROTO_TCP {
                    ended.tcp += 1;
                } else {
                    ended.udp += 1;
                }
            }
        }
    }
    Ok(ended)
}

/// The cookie of the TCP socket on this host whose local endpoint is `local` and whose peer is `peer`
/// (an exact lookup, as `ss` makes for one socket); `None` when there is none or the lookup fails.
pub fn tcp_cookie(local: SocketAddr, peer: SocketAddr) -> Option<u64> {
    if local.is_ipv4() != peer.is_ipv4() {
        return None;
    }
    let family = if local.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 };
    let mut req = [0u8; REQ_LEN];
    req[0] = u8::try_from(family).ok()?;
    req[1] = u8::try_from(libc::IPPROTO_TCP).ok()?;
    req[4..8].copy_from_slice(&u32::MAX.to_ne_bytes());
    // inet_diag_sockid: sport, dport (network order), src[16], dst[16], if, cookie[2].
    let id = &mut req[8..];
    id[0..2].copy_from_slice(&local.port().to_be_bytes());
    id[2..4].copy_from_slice(&peer.port().to_be_bytes());
    let put = |ip: IpAddr, to: &mut [u8]| match ip {
        IpAddr::V4(v4) => to[..4].copy_from_slice(&v4.octets()),
        IpAddr::V6(v6) => to.copy_from_slice(&v6.octets()),
    };
    put(local.ip(), &mut id[4..20]);
    put(peer.ip(), &mut id[20..36]);
    // INET_DIAG_NOCOOKIE: any socket with this tuple.
    id[40..48].fill(0xff);
    let nl = Netlink::open().ok()?;
    nl.send(SOCK_DIAG_BY_FAMILY, NLM_F_ACK, &req).ok()?;
    let mut cookie = None;
    nl.receive(|kind, p| {
        if kind == SOCK_DIAG_BY_FAMILY && p.len() >= MSG_LEN {
            let word = |o: usize| u64::from(u32::from_ne_bytes([p[o], p[o + 1], p[o + 2], p[o + 3]]));
            cookie = Some(word(44) | (word(48) << 32));
        }
    })
    .ok()?;
    cookie
}

/// The socket inodes the processes of `cgroup` and its descendants hold open.
fn socket_inodes(cgroup: &Path) -> Result<HashSet<u32>, SockDiagError> {
    let mut pids = Vec::new();
    collect_pids(cgroup, &mut pids)?;
    let mut inodes = HashSet::new();
    for pid in pids {
        // A process that exits meanwhile holds nothing any more.
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { continue };
        for fd in fds.filter_map(Result::ok) {
            let Ok(target) = std::fs::read_link(fd.path()) else { continue };
            let target = target.to_string_lossy();
            if let Some(n) = target.strip_prefix("socket:[").and_then(|t| t.strip_suffix(']'))
                && let Ok(n) = n.parse()
            {
                inodes.insert(n);
            }
        }
    }
    Ok(inodes)
}

fn collect_pids(dir: &Path, out: &mut Vec<u32>) -> Result<(), SockDiagError> {
    let procs = dir.join("cgroup.procs");
    let text = std::fs::read_to_string(&procs).map_err(|source| SockDiagError::Io { path: procs, source })?;
    out.extend(text.split_whitespace().filter_map(|p| p.parse::<u32>().ok()));
    let entries = std::fs::read_dir(dir).map_err(|source| SockDiagError::Io { path: dir.into(), source })?;
    for e in entries.filter_map(Result::ok) {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            collect_pids(&e.path(), out)?;
        }
    }
    Ok(())
}

/// One socket from a dump: its `inet_diag_sockid` (48 bytes, kept as the kernel gave it) and what we
/// judge it by.
struct Found {
    id: [u8; 48],
    inode: u32,
    peer: SocketAddr,
}

struct Netlink {
    fd: OwnedFd,
}

impl Netlink {
    fn open() -> Result<Self, SockDiagError> {
        // SAFETY: a plain socket(2) call; the result is checked before use.
        let fd = unsafe {
            libc::socket(libc::AF_NETLINK, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, NETLINK_SOCK_DIAG)
        };
        if fd < 0 {
            return Err(SockDiagError::Netlink(std::io::Error::last_os_error()));
        }
        // SAFETY: the kernel just returned this descriptor; nothing else owns it.
        Ok(Self { fd: unsafe { OwnedFd::from_raw_fd(fd) } })
    }

    fn send(&self, kind: u16, flags: u16, body: &[u8; REQ_LEN]) -> std::io::Result<()> {
        let mut msg = [0u8; NLMSG_HDR + REQ_LEN];
        let len = u32::try_from(msg.len()).unwrap_or(u32::MAX);
        msg[0..4].copy_from_slice(&len.to_ne_bytes());
        msg[4..6].copy_from_slice(&kind.to_ne_bytes());
        msg[6..8].copy_from_slice(&(flags | NLM_F_REQUEST).to_ne_bytes());
        msg[NLMSG_HDR..].copy_from_slice(body);
        // SAFETY: an all-zero sockaddr_nl is valid; the family is set below (pid 0 = the kernel).
        let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        kernel.nl_family = u16::try_from(libc::AF_NETLINK).unwrap_or_default();
        // SAFETY: the buffer and the address are live for the call and their lengths are theirs.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                msg.as_ptr().cast(),
                msg.len(),
                0,
                (&raw const kernel).cast(),
                u32::try_from(std::mem::size_of::<libc::sockaddr_nl>()).unwrap_or_default(),
            )
        };
        if n < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) }
    }

    /// Reads netlink messages, handing each (type, payload) to `f`, until DONE or an ack/error.
    fn receive(&self, mut f: impl FnMut(u16, &[u8])) -> std::io::Result<()> {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            // SAFETY: recv(2) writes at most `buf.len()` bytes into the live buffer.
            let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            let n = usize::try_from(n).map_err(|_| std::io::Error::last_os_error())?;
            let mut at = 0;
            while at + NLMSG_HDR <= n {
                let word = |o: usize| u32::from_ne_bytes([buf[o], buf[o + 1], buf[o + 2], buf[o + 3]]);
                let len = word(at) as usize;
                let kind = u16::from_ne_bytes([buf[at + 4], buf[at + 5]]);
                if len < NLMSG_HDR || at + len > n {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        "truncated netlink message",
                    ));
                }
                let payload = &buf[at + NLMSG_HDR..at + len];
                match kind {
                    NLMSG_DONE => return Ok(()),
                    NLMSG_ERROR => {
                        let code =
                            payload.get(..4).map_or(0, |b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
                        return if code == 0 {
                            Ok(())
                        } else {
                            Err(std::io::Error::from_raw_os_error(-code))
                        };
                    }
                    _ => f(kind, payload),
                }
                at += (len + 3) & !3;
            }
        }
    }

    fn dump(&self, family: i32, protocol: i32, states: u32) -> Result<Vec<Found>, SockDiagError> {
        let mut req = [0u8; REQ_LEN];
        req[0] = u8::try_from(family).unwrap_or_default();
        req[1] = u8::try_from(protocol).unwrap_or_default();
        req[4..8].copy_from_slice(&states.to_ne_bytes());
        self.send(SOCK_DIAG_BY_FAMILY, NLM_F_DUMP, &req).map_err(SockDiagError::Netlink)?;
        let mut out = Vec::new();
        self.receive(|kind, p| {
            if kind != SOCK_DIAG_BY_FAMILY || p.len() < MSG_LEN {
                return;
            }
            let mut id = [0u8; 48];
            id.copy_from_slice(&p[4..52]);
            let inode = u32::from_ne_bytes([p[68], p[69], p[70], p[71]]);
            let port = u16::from_be_bytes([id[2], id[3]]);
            let dst = &id[20..36];
            let ip = if family == libc::AF_INET {
                IpAddr::V4(Ipv4Addr::new(dst[0], dst[1], dst[2], dst[3]))
            } else {
                let mut o = [0u8; 16];
                o.copy_from_slice(dst);
                IpAddr::V6(Ipv6Addr::from(o)).to_canonical()
            };
            out.push(Found { id, inode, peer: SocketAddr::new(ip, port) });
        })
        .map_err(SockDiagError::Netlink)?;
        Ok(out)
    }

    fn destroy(&self, family: i32, protocol: i32, sock: &Found) -> Result<(), SockDiagError> {
        let mut req = [0u8; REQ_LEN];
        req[0] = u8::try_from(family).unwrap_or_default();
        req[1] = u8::try_from(protocol).unwrap_or_default();
        req[4..8].copy_from_slice(&u32::MAX.to_ne_bytes());
        req[8..].copy_from_slice(&sock.id);
        let proto = if protocol == libc::IPPROTO_TCP { "TCP" } else { "UDP" };
        let err = |source| SockDiagError::Destroy { proto, peer: sock.peer, source };
        self.send(SOCK_DESTROY, NLM_F_ACK, &req).map_err(err)?;
        match self.receive(|_, _| {}) {
            // Gone meanwhile (closed by its process): nothing left to end.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
            r => r.map_err(err),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cgroup_without_processes_holds_no_sockets() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("cgroup.procs"), "").unwrap();
        assert!(socket_inodes(dir.path()).unwrap().is_empty());
        assert_eq!(end_connected(dir.path(), |_| false).unwrap(), Ended::default());
    }
}
