//! Opaque TCP spliced in the kernel (`bpf::Kernel::splice`): once a session is admitted and its
//! `session.start` is durable, the client's and the upstream's sockets are spliced, and this handler only
//! watches them: end of stream on one is passed on as a half-close of the other, an error ends the session,
//! and the kernel's byte counts feed the session's counters (live, and finally for `session.end`). A session
//! cut from outside (grant expiry, revocation, kill, shutdown) drops this future: the splice ends at once
//! and the proxy closes both sockets. Where the kernel lacks splicing, [`relay`] returns `None` and the
//! caller relays in user space.
//!
//! **Not wired into the handler.** Opaque TCP is relayed by `tcp/spliced.rs` (`splice(2)` through kernel
//! pipes), which keeps every guarantee this module keeps and measured faster (BENCHMARKS.md, "Relay
//! path"). The kernel path alone is fast (tests/privileged/splice.rs: ~10-17 µs a round trip, ~14 Gbit/s
//! on this 2-CPU machine), and wired in (call [`relay`] from `tcp::Greeting::run`, falling back to the
//! relay there on `None`) the privileged suite passed and set-up latency was unchanged (the durable record
//! dominates). But `cargo xtask bench` measured bulk throughput through it at 1.87 Gbit/s (1 connection)
//! and 2.61 (4) against 5.34/3.55 direct and 4.02/6.06 for haproxy in the same run (2026-12-07, before
//! `tcp/spliced.rs`): below even the copying relay. The kernel moves redirected bytes to the peer's
//! send queue in a worker (the psock backlog), which backs off a jiffy whenever the peer's send buffer is
//! full. Streaming 512 MiB between two spliced loopback pairs in one process measured 2.3-2.7 Gbit/s (4 MiB
//! send buffers: 2.6-3.0) against 5.5-6.9 direct and 2.6-2.8 for a plain user-space copy: on par with the
//! copying relay, at about 0.45x direct, with the copying moved out of the daemon.
//!
//! **The `sk_msg` design was tried and is not usable as is (2026-12-07, Linux 6.18).** The idea: the
//! bytes cross TCP once if the agent's own socket joins a sockhash (sock_ops, at establishment) with an
//! `sk_msg` program that redirects each write to the egress of Warden's upstream socket, in the writer's
//! context (`tcp_bpf_sendmsg` → `tcp_bpf_push` into the upstream socket, blocking on its send buffer).
//! Built and run end to end (kept for reference on branch `splice-skmsg-wip`), it met two walls:
//! - **A socket in a sockhash reads through `tcp_bpf_recvmsg`,** which waits once and returns `EAGAIN`
//!   to a *blocking* `recv` woken without data (the socket's wait queue is shared with write-space
//!   wakeups): a Python agent doing `shutdown(SHUT_WR)` then `recv` got `-1 EAGAIN` and crashed, with
//!   nothing redirected yet. Every agent socket would carry that, spliced or not; only a kernel that loops
//!   in `tcp_msg_wait_data` (or a way to join the sockhash without the read-side proto) fixes it.
//! - **Ordering at the switch.** Bytes the agent wrote before the splice sit in its own send queue and in
//!   the accepted socket, while a redirect is synchronous, so the program may redirect only once the
//!   daemon has written upstream every byte passed the ordinary way (a per-socket count in a map, compared
//!   with the daemon's). For a bulk sender that starts before admission the gate never opens: the program
//!   counted every write, and the daemon stayed 2-5 MiB behind (the agent's send queue plus the accepted
//!   socket's receive queue) for the whole 256 MiB, so all of it was relayed by the daemon and none
//!   redirected. `bpf_msg_cork_bytes` could hold the writer while the daemon catches up, but a corked
//!   message that no later write completes is never sent (an interactive agent would hang).
//! - (sk_msg programs also cannot call `bpf_get_socket_cookie`; the local endpoint works as the key.)

use std::os::fd::AsRawFd as _;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpStream;

use super::tcp::{Counters, Finished};
use crate::bpf::{Kernel, Splice};

/// Ends the splice when the session ends, however it ends, and leaves the final counts in the counters.
struct Spliced<'a> {
    kernel: &'a Kernel,
    splice: Splice,
    counters: &'a Counters,
    /// Bytes this handler forwarded itself (anything queued before the splice took over).
    up: u64,
    down: u64,
}

impl Spliced<'_> {
    fn publish(&self) {
        let b = self.kernel.spliced_bytes(&self.splice);
        self.counters.up.store(self.up + b.a_to_b, Ordering::Relaxed);
        self.counters.down.store(self.down + b.b_to_a, Ordering::Relaxed);
    }
}

impl Drop for Spliced<'_> {
    fn drop(&mut self) {
        let b = self.kernel.unsplice(&self.splice);
        self.counters.up.store(self.up + b.a_to_b, Ordering::Relaxed);
        self.counters.down.store(self.down + b.b_to_a, Ordering::Relaxed);
    }
}

/// Makes the kernel look at what a socket already had queued: setting `SO_RCVLOWAT` runs the socket's
/// data-ready path, which for a spliced socket sends its whole receive queue through the verdict program,
/// in order, so nothing queued before the splice is left behind (or overtaken).
fn flush_queued(s: &TcpStream) {
    let one: libc::c_int = 1;
    // SAFETY: setsockopt reads `size_of::<c_int>()` bytes from `one`, which lives for the call.
    let _ = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&raw const one).cast(),
            libc::socklen_t::try_from(std::mem::size_of::<libc::c_int>()).unwrap_or_default(),
        )
    };
}

/// Every byte ever written into a TCP socket (acknowledged, plus still queued): `tcpi_bytes_acked` + SIOCOUTQ.
fn written(s: &TcpStream) -> Option<u64> {
    // struct tcp_info: tcpi_bytes_acked is the u64 at offset 120 (Linux 4.2 and later).
    let mut info = [0u64; 32];
    let mut len = libc::socklen_t::try_from(std::mem::size_of_val(&info)).unwrap_or_default();
    // SAFETY: getsockopt writes at most `len` bytes into `info`, which lives for the call.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &raw mut len,
        )
    };
    if rc != 0 || len < 128 {
        return None;
    }
    let mut queued: libc::c_int = 0;
    // SAFETY: SIOCOUTQ writes one int into `queued`, which lives for the call.
    if unsafe { libc::ioctl(s.as_raw_fd(), libc::TIOCOUTQ, &raw mut queued) } != 0 {
        return None;
    }
    Some(info[15] + u64::try_from(queued).unwrap_or(0))
}

/// How long a half-close waits for the kernel to finish moving what it already took for the peer.
const DRAIN: Duration = Duration::from_secs(30);

/// Waits until everything the kernel redirected towards `to` (`expected` bytes in all) is in `to`'s send
/// queue, so that a FIN sent next cannot overtake it: the verdict program hands redirected bytes to a
/// kernel worker, which may not have written them yet when the other socket's end of stream is seen.
async fn drained(to: &TcpStream, expected: impl Fn() -> u64) {
    let deadline = tokio::time::Instant::now() + DRAIN;
    while written(to).is_some_and(|w| w < expected()) && tokio::time::Instant::now() < deadline {
        // The kernel's worker gives no readiness event for this: look again shortly.
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// What one readiness event on a spliced socket meant.
enum Event {
    Eof,
    Data(usize),
    Nothing,
    Failed,
}

fn probe(s: &TcpStream, buf: &mut [u8]) -> Event {
    match s.try_read(buf) {
        Ok(0) => Event::Eof,
        Ok(n) => Event::Data(n),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Event::Nothing,
        Err(e) => {
            tracing::debug!(error = %e, "spliced socket read failed");
            Event::Failed
        }
    }
}

/// Splices `client` and `upstream` and waits until both directions are done or one fails. `None` when the
/// kernel cannot splice (the caller relays in user space).
pub async fn relay(
    kernel: &Kernel,
    client: &mut TcpStream,
    upstream: &mut TcpStream,
    counters: &Counters,
) -> Option<Finished> {
    let splice = match kernel.splice(&*client, &*upstream) {
        Ok(Some(s)) => s,
        Ok(None) => return None,
        Err(e) => {
            tracing::warn!(error = %e, "cannot splice the session in the kernel; relaying it in user space");
            return None;
        }
    };
    tracing::debug!("session spliced in the kernel");
    let mut spliced = Spliced { kernel, splice, counters, up: 0, down: 0 };
    flush_queued(client);
    flush_queued(upstream);
    // Only end of stream and errors should reach user space now; a few bytes that raced the splice are
    // forwarded here.
    let mut buf = [0u8; 4096];
    let (mut client_done, mut upstream_done) = (false, false);
    let mut first_closed = None;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    while !(client_done && upstream_done) {
        tokio::select! {
            r = client.readable(), if !client_done => {
                if r.is_err() { return Some(Finished::ClientError) }
                match probe(client, &mut buf) {
                    Event::Eof => {
                        client_done = true;
                        first_closed.get_or_insert(Finished::ClientClosed);
                        let up = spliced.up;
                        drained(upstream, || up + kernel.spliced_bytes(&splice).a_to_b).await;
                        let _ = upstream.shutdown().await;
                    }
                    Event::Data(n) => {
                        if upstream.write_all(&buf[..n]).await.is_err() { return Some(Finished::UpstreamError) }
                        spliced.up += n as u64;
                    }
                    Event::Nothing => {}
                    Event::Failed => return Some(Finished::ClientError),
                }
            }
            r = upstream.readable(), if !upstream_done => {
                if r.is_err() { return Some(Finished::UpstreamError) }
                match probe(upstream, &mut buf) {
                    Event::Eof => {
                        upstream_done = true;
                        first_closed.get_or_insert(Finished::UpstreamClosed);
                        let down = spliced.down;
                        drained(client, || down + kernel.spliced_bytes(&splice).b_to_a).await;
                        let _ = client.shutdown().await;
                    }
                    Event::Data(n) => {
                        if client.write_all(&buf[..n]).await.is_err() { return Some(Finished::ClientError) }
                        spliced.down += n as u64;
                    }
                    Event::Nothing => {}
                    Event::Failed => return Some(Finished::UpstreamError),
                }
            }
            _ = tick.tick() => spliced.publish(),
        }
    }
    drop(spliced);
    Some(first_closed.unwrap_or(Finished::ClientClosed))
}
