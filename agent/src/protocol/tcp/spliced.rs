//! The opaque relay without copies through user space: per direction, `splice(2)` from the source socket
//! into a kernel pipe and from the pipe into the destination socket, driven by tokio's readiness. The
//! pages the kernel received are passed on by reference, so the daemon never touches the bytes; it only
//! counts them (from splice's return values, live in the session's counters), passes end of stream on as
//! a half-close, and ends on the first error as the copying relay (`relay.rs`) does.
//!
//! A direction holds a pipe (`pipes.rs`) only while it moves data: an idle session holds none. When no
//! pipe can be had (all lent, or out of descriptors) that burst is copied through a user-space buffer
//! instead; where the kernel refuses to splice a socket (`EINVAL`, `ENOSYS`) the direction copies for
//! the rest of the session. The counters say which way a session's bytes went (`session.end`'s `relay`:
//! `splice`, or `splice+copy` when some were copied). A cut drops the future: a pipe still holding bytes is closed, not lent again.

use std::io::{self, ErrorKind};
use std::os::fd::AsFd as _;
use std::sync::atomic::{AtomicU64, Ordering};

use nix::errno::Errno;
use nix::fcntl::{SpliceFFlags, splice};
use tokio::io::{AsyncWriteExt as _, Interest};
use tokio::net::TcpStream;
use tokio::net::tcp::{ReadHalf, WriteHalf};

use super::pipes::{Lease, Pipes};
use super::relay::{self, BUFFER, Finished, Side, both};
use crate::protocol::{Counters, RelayPath};

const FLAGS: SpliceFFlags = SpliceFFlags::SPLICE_F_MOVE.union(SpliceFFlags::SPLICE_F_NONBLOCK);

/// Relays until both directions are done or one fails, splicing through pipes lent by `pipes`.
pub async fn relay(
    client: &mut TcpStream,
    upstream: &mut TcpStream,
    counters: &Counters,
    pipes: &Pipes,
) -> Finished {
    counters.relayed(RelayPath::Splice);
    let (mut cr, mut cw) = client.split();
    let (mut ur, mut uw) = upstream.split();
    let up = pump(&mut cr, &mut uw, &counters.up, counters, pipes);
    let down = pump(&mut ur, &mut cw, &counters.down, counters, pipes);
    both(up, down).await
}

/// How a burst (the bytes a direction moved between two waits for readiness) ended.
enum Burst {
    /// The source has nothing more for now.
    Idle,
    /// End of stream from the source.
    Eof,
    /// The kernel cannot splice these sockets: copy from now on.
    Unsupported,
}

/// One direction, until end of stream (passed on as a half-close) or an error (which side failed).
async fn pump(
    r: &mut ReadHalf<'_>,
    w: &mut WriteHalf<'_>,
    count: &AtomicU64,
    counters: &Counters,
    pipes: &Pipes,
) -> Result<(), Side> {
    loop {
        r.as_ref().readable().await.map_err(|_| Side::Read)?;
        let burst = match pipes.lend() {
            Ok(mut lease) => splice_burst(r.as_ref(), w, &mut lease, count).await?,
            Err(why) => {
                tracing::debug!(?why, "no pipe for this burst; copying it in user space");
                copy_burst(r.as_ref(), w, count, counters).await?
            }
        };
        match burst {
            Burst::Idle => {}
            Burst::Eof => {
                let _ = w.shutdown().await;
                return Ok(());
            }
            Burst::Unsupported => {
                counters.relayed(RelayPath::Copy);
                // Boxed: its in-task buffer stays out of every idle session's future.
                return Box::pin(relay::pump(r, w, count)).await;
            }
        }
    }
}

/// Splices until the source would block, ends, or fails; the lease's pipe is empty again when it returns
/// `Ok`.
async fn splice_burst(
    src: &TcpStream,
    w: &mut WriteHalf<'_>,
    lease: &mut Lease<'_>,
    count: &AtomicU64,
) -> Result<Burst, Side> {
    let size = lease.pipe().size;
    loop {
        let spliced_in = src.try_io(Interest::READABLE, || {
            sys(splice(src.as_fd(), None, &lease.pipe().write, None, size, FLAGS))
        });
        match spliced_in {
            Ok(0) => return Ok(Burst::Eof),
            Ok(n) => lease.queued = n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(Burst::Idle),
            Err(e) if unsupported(&e) => {
                tracing::warn!(error = %e, "the kernel cannot splice this session; relaying it in user space");
                return Ok(Burst::Unsupported);
            }
            Err(_) => return Err(Side::Read),
        }
        let dst = w.as_ref();
        while lease.queued > 0 {
            let out = dst.try_io(Interest::WRITABLE, || {
                sys(splice(&lease.pipe().read, None, dst.as_fd(), None, lease.queued, FLAGS))
            });
            match out {
                Ok(n) => {
                    lease.queued -= n;
                    count.fetch_add(n as u64, Ordering::Relaxed);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    dst.writable().await.map_err(|_| Side::Write)?;
                }
                Err(e) if unsupported(&e) => {
                    tracing::warn!(error = %e, "the kernel cannot splice into this socket; relaying in user space");
                    drain_by_copy(lease, w, count).await?;
                    return Ok(Burst::Unsupported);
                }
                Err(_) => return Err(Side::Write),
            }
        }
    }
}

/// One burst through a user-space buffer (allocated for the burst, as the copying relay does).
async fn copy_burst(
    src: &TcpStream,
    w: &mut WriteHalf<'_>,
    count: &AtomicU64,
    counters: &Counters,
) -> Result<Burst, Side> {
    let mut buf = vec![0u8; BUFFER];
    loop {
        match src.try_read(&mut buf) {
            Ok(0) => return Ok(Burst::Eof),
            Ok(n) => {
                w.write_all(&buf[..n]).await.map_err(|_| Side::Write)?;
                count.fetch_add(n as u64, Ordering::Relaxed);
                counters.relayed(RelayPath::Copy);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(Burst::Idle),
            Err(_) => return Err(Side::Read),
        }
    }
}

/// What is left in a pipe the destination refused to splice from, written the ordinary way.
async fn drain_by_copy(lease: &mut Lease<'_>, w: &mut WriteHalf<'_>, count: &AtomicU64) -> Result<(), Side> {
    let mut buf = vec![0u8; lease.queued];
    let mut have = 0;
    while have < buf.len() {
        match nix::unistd::read(&lease.pipe().read, &mut buf[have..]) {
            Ok(0) | Err(_) => return Err(Side::Write),
            Ok(n) => have += n,
        }
    }
    w.write_all(&buf).await.map_err(|_| Side::Write)?;
    lease.queued = 0;
    count.fetch_add(have as u64, Ordering::Relaxed);
    Ok(())
}

fn sys(r: nix::Result<usize>) -> io::Result<usize> {
    r.map_err(io::Error::from)
}

/// The kernel does not splice these file descriptors (as opposed to the connection failing).
fn unsupported(e: &io::Error) -> bool {
    matches!(e.raw_os_error().map(Errno::from_raw), Some(Errno::EINVAL | Errno::ENOSYS | Errno::EOPNOTSUPP))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt as _;
    use tokio::net::TcpListener;

    /// A connected loopback pair: (the peer's end, the end the relay holds).
    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let peer = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (held, _) = l.accept().await.unwrap();
        (peer, held)
    }

    /// Bulk both ways with a half-close each way, through `pipes`: every byte intact and counted.
    async fn bulk_both_ways(pipes: &Pipes) -> Counters {
        let (mut client, mut client_held) = pair().await;
        let (mut server, mut server_held) = pair().await;
        let counters = Counters::default();
        let up: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let down: Vec<u8> = (0..2_000_000u32).map(|i| (i % 241) as u8).collect();
        let relay = relay(&mut client_held, &mut server_held, &counters, pipes);
        let ends = async {
            // The client sends everything and half-closes; the server reads to the end, then answers.
            let client_side = async {
                client.write_all(&up).await.unwrap();
                client.shutdown().await.unwrap();
                let mut got = Vec::new();
                client.read_to_end(&mut got).await.unwrap();
                assert!(got == down, "the answer arrived intact after the client's half-close");
            };
            let server_side = async {
                let mut got = Vec::new();
                server.read_to_end(&mut got).await.unwrap();
                assert!(got == up, "the upload arrived intact, then end of stream");
                server.write_all(&down).await.unwrap();
                server.shutdown().await.unwrap();
            };
            tokio::join!(client_side, server_side);
        };
        let (finished, ()) = tokio::join!(relay, ends);
        assert_eq!(finished, Finished::ClientClosed);
        assert_eq!(counters.up.load(Ordering::Relaxed), up.len() as u64);
        assert_eq!(counters.down.load(Ordering::Relaxed), down.len() as u64);
        counters
    }

    #[tokio::test]
    async fn splices_both_ways_with_half_close_and_exact_counts() {
        let pipes = Pipes::new(4, 64 * 1024);
        let counters = bulk_both_ways(&pipes).await;
        assert_eq!(counters.relay(), Some("splice"));
        // Every pipe came back empty: the pool keeps them for the next burst.
        assert!(pipes.open() <= 2);
    }

    #[tokio::test]
    async fn without_pipes_bursts_are_copied() {
        let pipes = Pipes::new(0, 64 * 1024);
        let counters = bulk_both_ways(&pipes).await;
        assert_eq!(counters.relay(), Some("splice+copy"));
    }

    #[tokio::test]
    async fn a_reset_from_one_side_ends_the_relay_as_that_sides_error() {
        let (client, mut client_held) = pair().await;
        let (server, mut server_held) = pair().await;
        let counters = Counters::default();
        let pipes = Pipes::new(4, 64 * 1024);
        let relay = relay(&mut client_held, &mut server_held, &counters, &pipes);
        let reset = async {
            server.set_zero_linger().unwrap();
            drop(server);
        };
        let (finished, ()) = tokio::join!(relay, reset);
        assert_eq!(finished, Finished::UpstreamError);
        drop(client);
    }

    #[test]
    fn only_refusals_to_splice_fall_back_to_copying() {
        assert!(unsupported(&io::Error::from_raw_os_error(libc::EINVAL)));
        assert!(unsupported(&io::Error::from_raw_os_error(libc::ENOSYS)));
        assert!(!unsupported(&io::Error::from_raw_os_error(libc::ECONNRESET)));
        assert!(!unsupported(&io::Error::from_raw_os_error(libc::EPIPE)));
    }
}
