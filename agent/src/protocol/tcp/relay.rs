//! The opaque relay: bytes both ways, counted, honouring half-close.

use std::sync::atomic::{AtomicU64, Ordering};

pub use crate::protocol::Counters;
use crate::protocol::End;

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

/// Per-direction buffer for bulk traffic. Allocated only while a direction moves bulk data (a read fills
/// the small buffer) and given back at the first short read, so an idle or interactive session holds
/// none: one allocation per burst, none per packet.
pub const BUFFER: usize = 32 * 1024;

/// What each direction reads into when it is not moving bulk data (inside the pump, no allocation).
const SMALL: usize = 1024;

/// How a relay finished on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finished {
    /// The client closed first (then the upstream finished too).
    ClientClosed,
    UpstreamClosed,
    ClientError,
    UpstreamError,
}

impl From<Finished> for End {
    fn from(f: Finished) -> Self {
        match f {
            Finished::ClientClosed => Self::ClientClosed,
            Finished::UpstreamClosed => Self::UpstreamClosed,
            Finished::ClientError => Self::ClientError,
            Finished::UpstreamError => Self::UpstreamError,
        }
    }
}

/// Which socket of a direction failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Side {
    Read,
    Write,
}

/// Copies until EOF, then shuts the writer down (half-close). Errors say which side failed.
pub(super) async fn pump<R, W>(r: &mut R, w: &mut W, count: &AtomicU64) -> Result<(), Side>
where
    R: AsyncRead + Unpin + ?Sized,
    W: AsyncWrite + Unpin + ?Sized,
{
    let mut small = [0u8; SMALL];
    let mut bulk: Option<Box<[u8]>> = None;
    loop {
        let n = match bulk.as_mut() {
            Some(b) => r.read(b).await,
            None => r.read(&mut small).await,
        }
        .map_err(|_| Side::Read)?;
        if n == 0 {
            let _ = w.shutdown().await;
            return Ok(());
        }
        let data = match &bulk {
            Some(b) => &b[..n],
            None => &small[..n],
        };
        w.write_all(data).await.map_err(|_| Side::Write)?;
        count.fetch_add(n as u64, Ordering::Relaxed);
        match (&bulk, n) {
            (None, SMALL) => bulk = Some(vec![0u8; BUFFER].into_boxed_slice()),
            (Some(_), n) if n < SMALL => bulk = None,
            _ => {}
        }
    }
}

/// Relays until both directions are done or one fails.
pub async fn relay<C, U>(client: &mut C, upstream: &mut U, counters: &Counters) -> Finished
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let (mut cr, mut cw) = tokio::io::split(client);
    let (mut ur, mut uw) = tokio::io::split(upstream);
    let up = pump(&mut cr, &mut uw, &counters.up);
    let down = pump(&mut ur, &mut cw, &counters.down);
    both(up, down).await
}

/// Drives both directions until both are done or one fails: how the session finished.
pub(super) async fn both(
    up: impl Future<Output = Result<(), Side>>,
    down: impl Future<Output = Result<(), Side>>,
) -> Finished {
    tokio::pin!(up, down);
    let mut first_closed = None;
    let mut up_done = false;
    let mut down_done = false;
    while !(up_done && down_done) {
        tokio::select! {
            r = &mut up, if !up_done => {
                up_done = true;
                match r {
                    Ok(()) => { first_closed.get_or_insert(Finished::ClientClosed); }
                    Err(Side::Read) => return Finished::ClientError,
                    Err(Side::Write) => return Finished::UpstreamError,
                }
            }
            r = &mut down, if !down_done => {
                down_done = true;
                match r {
                    Ok(()) => { first_closed.get_or_insert(Finished::UpstreamClosed); }
                    Err(Side::Read) => return Finished::UpstreamError,
                    Err(Side::Write) => return Finished::ClientError,
                }
            }
        }
    }
    first_closed.unwrap_or(Finished::ClientClosed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn relays_both_ways_with_half_close_and_counts() {
        let (mut client, mut client_peer) = tokio::io::duplex(1024);
        let (mut upstream, mut upstream_peer) = tokio::io::duplex(1024);
        let counters = Counters::default();
        let relay = relay(&mut client_peer, &mut upstream_peer, &counters);
        let ends = async {
            client.write_all(b"hello upstream").await.unwrap();
            client.shutdown().await.unwrap();
            let mut got = Vec::new();
            upstream.read_to_end(&mut got).await.unwrap();
            assert_eq!(got, b"hello upstream");
            upstream.write_all(b"reply after half-close").await.unwrap();
            upstream.shutdown().await.unwrap();
            let mut back = Vec::new();
            client.read_to_end(&mut back).await.unwrap();
            assert_eq!(back, b"reply after half-close");
        };
        let (finished, ()) = tokio::join!(relay, ends);
        assert_eq!(finished, Finished::ClientClosed);
        assert_eq!(counters.up.load(Ordering::Relaxed), 14);
        assert_eq!(counters.down.load(Ordering::Relaxed), 22);
    }

    /// Bulk data (reads that fill the small buffer, then the bulk one) and small messages after it all
    /// arrive intact and in order.
    #[tokio::test]
    async fn relays_bulk_then_small_intact() {
        let (mut client, mut client_peer) = tokio::io::duplex(64 * 1024);
        let (mut upstream, mut upstream_peer) = tokio::io::duplex(64 * 1024);
        let counters = Counters::default();
        let relay = relay(&mut client_peer, &mut upstream_peer, &counters);
        let sent: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let ends = async {
            let write = async {
                client.write_all(&sent).await.unwrap();
                for _ in 0..10 {
                    client.write_all(b"small").await.unwrap();
                    tokio::task::yield_now().await;
                }
                client.shutdown().await.unwrap();
            };
            let mut got = Vec::new();
            let read = upstream.read_to_end(&mut got);
            let ((), r) = tokio::join!(write, read);
            r.unwrap();
            assert_eq!(&got[..sent.len()], &sent[..]);
            assert_eq!(&got[sent.len()..], b"small".repeat(10).as_slice());
            upstream.shutdown().await.unwrap();
        };
        let (finished, ()) = tokio::join!(relay, ends);
        assert_eq!(finished, Finished::ClientClosed);
        assert_eq!(counters.up.load(Ordering::Relaxed), 300_050);
    }
}
