//! Opaque TCP: nothing to read before the gate decides, a refusal is a reset, the upstream is one TCP
//! connect, and the session is the byte relay until either side closes or the session is cut: spliced
//! through kernel pipes (`spliced.rs`, `pipes.rs`) unless `agent.tcp_relay = "copy"`, else copied
//! through user-space buffers (`relay.rs`). An error on one side (a reset) resets the other.

pub mod pipes;
pub mod relay;
pub mod spliced;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;

pub use pipes::Pipes;
pub use relay::{BUFFER, Counters, Finished, relay};

use super::{End, Hello, Refusal, RelayPath, Session};
use crate::origin::ConnOrigin;
use crate::policy::{Target, Terms};

/// How long an upstream connect may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Opaque TCP's shared state: the pipes its sessions splice through (`None`: copy every byte).
#[derive(Debug, Default)]
pub struct Tcp {
    pipes: Option<Arc<Pipes>>,
}

/// Opaque TCP's hello never fails (it reads nothing).
#[derive(Debug, thiserror::Error)]
#[error("opaque tcp reads no hello")]
pub struct HelloError;

impl Tcp {
    /// Sessions copy their bytes through user-space buffers.
    pub fn copying() -> Self {
        Self { pipes: None }
    }

    /// Sessions splice their bytes through `pipes` (copying a burst when none can be had).
    pub fn splicing(pipes: Pipes) -> Self {
        Self { pipes: Some(Arc::new(pipes)) }
    }

    /// Step 3 of a connection: opaque TCP reads nothing before the gate decides.
    #[expect(clippy::unused_async, reason = "every handler has this shape; others read and write here")]
    pub async fn hello(
        &self,
        client: TcpStream,
        _target: &Arc<Target>,
        _origin: &ConnOrigin,
    ) -> Result<Option<Greeting>, HelloError> {
        Ok(Some(Greeting { client, upstream: None, hello: Hello::default(), pipes: self.pipes.clone() }))
    }
}

/// A client connection waiting for the gate's decision, then for its upstream.
#[derive(Debug)]
pub struct Greeting {
    client: TcpStream,
    upstream: Option<TcpStream>,
    hello: Hello,
    pipes: Option<Arc<Pipes>>,
}

impl Greeting {
    pub fn hello(&self) -> &Hello {
        &self.hello
    }

    /// A refusal is a reset: the client sees an error rather than a clean, empty stream.
    #[expect(clippy::unused_async, reason = "every handler has this shape; others read and write here")]
    pub async fn refuse(self, _refusal: &Refusal) {
        reset(self.client);
        if let Some(u) = self.upstream {
            reset(u);
        }
    }

    /// The upstream TCP handshake, no payload.
    pub async fn connect(&mut self, dst: SocketAddr, _terms: &Terms) -> Result<(), End> {
        match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(dst)).await {
            Ok(Ok(s)) => {
                self.upstream = Some(s);
                Ok(())
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "upstream connect failed");
                Err(End::UpstreamUnreachable { detail: e.to_string() })
            }
            Err(_) => Err(End::UpstreamTimeout),
        }
    }

    /// Relays until either side closes or the session is cut.
    pub async fn run(self, session: Session) -> End {
        let Self { mut client, upstream, pipes, .. } = self;
        let Some(mut upstream) = upstream else {
            return End::UpstreamUnreachable { detail: "no upstream connection".into() };
        };
        let _ = upstream.set_nodelay(true);
        let _ = client.set_nodelay(true);
        // Opaque bytes have no way to say why a session was cut: both connections just close.
        let finished = tokio::select! {
            biased;
            end = session.cut.cut_with() => return end,
            f = async {
                if let Some(p) = &pipes {
                    spliced::relay(&mut client, &mut upstream, &session.counters, p).await
                } else {
                    session.counters.relayed(RelayPath::Copy);
                    relay(&mut client, &mut upstream, &session.counters).await
                }
            } => f,
        };
        // A reset (or any error) on one side is passed on as a reset of the other.
        match finished {
            Finished::ClientError => reset(upstream),
            Finished::UpstreamError => reset(client),
            Finished::ClientClosed | Finished::UpstreamClosed => {}
        }
        End::from(finished)
    }
}

/// Closes with a reset (SO_LINGER 0).
pub fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}
