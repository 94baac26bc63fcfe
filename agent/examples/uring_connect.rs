//! A probe for the privileged tests: connect(2) through io_uring (IORING_OP_CONNECT) instead of the
//! syscall, then read the greeting. Prints one JSON line like tests/privileged/probe.py.
//!
//! usage: uring_connect IP PORT

use std::io::Read as _;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsRawFd as _, FromRawFd as _};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let addr: SocketAddr = format!("{}:{}", args[1], args[2]).parse().expect("IP PORT");
    let pid = std::process::id();
    match connect(addr) {
        Ok((peer, data)) => println!(
            r#"{{"ok":true,"peer":["{}",{}],"data":{:?},"pid":{pid}}}"#,
            peer.ip(),
            peer.port(),
            data
        ),
        Err(e) => println!(
            r#"{{"ok":false,"errno":{},"error":{:?},"pid":{pid}}}"#,
            e.raw_os_error().unwrap_or(0),
            e.to_string()
        ),
    }
}

fn connect(addr: SocketAddr) -> std::io::Result<(SocketAddr, String)> {
    let domain = if addr.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 };
    // SAFETY: plain socket(2).
    let fd = unsafe { libc::socket(domain, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: we own the fresh descriptor.
    let stream = unsafe { TcpStream::from_raw_fd(fd) };
    let (storage, len) = sockaddr(addr);
    let mut ring = io_uring::IoUring::new(4)?;
    let op = io_uring::opcode::Connect::new(
        io_uring::types::Fd(stream.as_raw_fd()),
        (&raw const storage).cast(),
        len,
    )
    .build()
    .user_data(1);
    // SAFETY: `storage` outlives the submission (we wait for its completion below).
    unsafe { ring.submission().push(&op).map_err(|_| std::io::Error::other("submission queue full"))? };
    ring.submit_and_wait(1)?;
    let cqe = ring.completion().next().ok_or_else(|| std::io::Error::other("no completion"))?;
    if cqe.result() < 0 {
        return Err(std::io::Error::from_raw_os_error(-cqe.result()));
    }
    let mut stream = stream;
    stream.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
    let mut buf = [0u8; 200];
    let n = stream.read(&mut buf)?;
    Ok((stream.peer_addr()?, String::from_utf8_lossy(&buf[..n]).into_owned()))
}

fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: an all-zero sockaddr_storage is valid.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::sa_family_t::try_from(libc::AF_INET).expect("AF_INET"),
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(a.ip().octets()) },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_in fits in sockaddr_storage.
            unsafe { std::ptr::write((&raw mut storage).cast(), sin) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::sa_family_t::try_from(libc::AF_INET6).expect("AF_INET6"),
                sin6_port: a.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr { s6_addr: a.ip().octets() },
                sin6_scope_id: 0,
            };
            // SAFETY: sockaddr_in6 fits in sockaddr_storage.
            unsafe { std::ptr::write((&raw mut storage).cast(), sin6) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, libc::socklen_t::try_from(len).expect("small"))
}
