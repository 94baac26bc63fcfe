//! Opaque TCP sessions spliced in the kernel: once a session is admitted and its `session.start` is durable,
//! both of its sockets (the proxy's accepted client socket and its upstream socket) go into the splice
//! sockhash, whose stream verdict program (`warden_splice`) sends every byte arriving on one straight out
//! of the other, counting them, with no copy through user space.
//!
//! What stays with the caller (the protocol handler): watching both sockets for end of stream and errors
//! (a FIN or a reset still reaches the socket, and shows as readable: EOF or an error), propagating
//! half-close with `shutdown(Write)` on the other socket, and ending the splice ([`Kernel::unsplice`], then
//! closing or shutting down both) on grant expiry, revocation, `warden sessions kill` or daemon stop. A
//! daemon that dies closes the sockets with it (the kernel drops them from the map), so a restart finds no
//! live spliced session to adopt. Where the kernel refuses the program, [`Kernel::splice`] returns `None`
//! and the session is relayed in user space; `bpf.installed` lists `warden_splice` as unavailable.

use std::os::fd::{AsFd, AsRawFd as _, BorrowedFd};

use aya::Ebpf;
use aya::maps::{MapData, SockHash};
use aya::programs::Program;
use warden_common::{SplicePeer, names};

use super::{BpfError, Kernel, map_err};

/// One spliced session: the cookies of its two sockets. End it with [`Kernel::unsplice`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Splice {
    a: u64,
    b: u64,
}

/// Bytes moved by a splice, each way.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SplicedBytes {
    /// Received on the first socket and sent out of the second (client → upstream, for the proxy).
    pub a_to_b: u64,
    pub b_to_a: u64,
}

/// Takes the splice map and attaches the verdict program to it; the program stays attached while the
/// returned map and the loaded object live (it is not pinned: the sockets die with the daemon anyway).
pub(super) fn attach(ebpf: &mut Ebpf) -> Result<SockHash<MapData, u64>, String> {
    let map = ebpf.take_map(names::SPLICE).ok_or("the splice map is missing from the kernel object")?;
    let hash = SockHash::<MapData, u64>::try_from(map).map_err(|e| e.to_string())?;
    let Some(Program::SkSkb(p)) = ebpf.program_mut(names::SPLICE_PROGRAM) else {
        return Err("the splice program is missing from the kernel object".into());
    };
    p.load().map_err(|e| e.to_string())?;
    p.attach(hash.fd()).map_err(|e| e.to_string())?;
    Ok(hash)
}

/// A socket's cookie (`SO_COOKIE`): its key in the splice maps.
fn cookie(fd: BorrowedFd<'_>) -> std::io::Result<u64> {
    let mut value: u64 = 0;
    let mut len = libc::socklen_t::try_from(std::mem::size_of::<u64>()).unwrap_or_default();
    // SAFETY: getsockopt writes at most `len` bytes into `value`, which lives for the call.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            (&raw mut value).cast(),
            &raw mut len,
        )
    };
    if rc == 0 { Ok(value) } else { Err(std::io::Error::last_os_error()) }
}

impl Kernel {
    /// True when this kernel took the splice program.
    pub fn splice_available(&self) -> bool {
        self.splice.lock().expect("splice map lock").is_some()
    }

    /// Splices two connected TCP sockets: from now on what arrives on one leaves through the other, in the
    /// kernel. `Ok(None)` where splicing is unavailable (relay in user space instead). On an error nothing
    /// stays spliced.
    pub fn splice(&self, a: &impl AsFd, b: &impl AsFd) -> Result<Option<Splice>, BpfError> {
        let mut guard = self.splice.lock().expect("splice map lock");
        let Some(hash) = guard.as_mut() else { return Ok(None) };
        let io = |source| BpfError::Io { path: "SO_COOKIE".into(), source };
        let s = Splice { a: cookie(a.as_fd()).map_err(io)?, b: cookie(b.as_fd()).map_err(io)? };
        let mut peers = self.splice_peer.lock().expect("splice peer lock");
        let undo = |hash: &mut SockHash<MapData, u64>,
                    peers: &mut aya::maps::HashMap<MapData, u64, SplicePeer>| {
            for k in [s.a, s.b] {
                let _ = peers.remove(&k);
                let _ = hash.remove(&k);
            }
        };
        let steps = (|| {
            peers.insert(s.a, SplicePeer { peer: s.b, bytes: 0 }, 0)?;
            peers.insert(s.b, SplicePeer { peer: s.a, bytes: 0 }, 0)?;
            hash.insert(s.a, a.as_fd().as_raw_fd(), 0)?;
            hash.insert(s.b, b.as_fd().as_raw_fd(), 0)
        })();
        if let Err(e) = steps {
            undo(hash, &mut peers);
            return Err(map_err(names::SPLICE)(e));
        }
        Ok(Some(s))
    }

    /// Bytes the kernel has moved for a splice so far.
    pub fn spliced_bytes(&self, s: &Splice) -> SplicedBytes {
        let peers = self.splice_peer.lock().expect("splice peer lock");
        let bytes = |k: u64| peers.get(&k, 0).map_or(0, |p| p.bytes);
        SplicedBytes { a_to_b: bytes(s.a), b_to_a: bytes(s.b) }
    }

    /// Ends a splice and returns its final byte counts; the caller then closes (or shuts down) both sockets.
    pub fn unsplice(&self, s: &Splice) -> SplicedBytes {
        let bytes = self.spliced_bytes(s);
        // The peer entries first: the verdict program passes bytes up once its entry is gone.
        {
            let mut peers = self.splice_peer.lock().expect("splice peer lock");
            let _ = peers.remove(&s.a);
            let _ = peers.remove(&s.b);
        }
        if let Some(hash) = self.splice.lock().expect("splice map lock").as_mut() {
            let _ = hash.remove(&s.a);
            let _ = hash.remove(&s.b);
        }
        bytes
    }
}
