//! Opaque TCP: nothing to read before the gate decides, a refusal is a reset, the upstream is one TCP
//! connect, and the session is the byte relay (`relay.rs`) until either side closes or the session is cut.

pub mod relay;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;

pub use relay::{BUFFER, Counters, Finished, relay};

use super::{End, Hello, Refusal, Session};
use crate::origin::ConnOrigin;
use crate::policy::{Target, Terms};

/// How long an upstream connect may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Opaque TCP keeps no state across sessions.
#[derive(Debug, Default)]
pub struct Tcp;

/// Opaque TCP's hello never fails (it reads nothing).
#[derive(Debug, thiserror::Error)]
#[error("opaque tcp reads no hello")]
pub struct HelloError;

impl Tcp {
    pub fn new() -> Self {
        Self
    }

    /// Step 3 of a connection: opaque TCP reads nothing before the gate decides.
    #[expect(clippy::unused_async, reason = "every handler has this shape; others read and write here")]
    pub async fn hello(
        &self,
        client: TcpStream,
        _target: &Arc<Target>,
        _origin: &ConnOrigin,
    ) -> Result<Option<Greeting>, HelloError> {
        Ok(Some(Greeting { client, upstream: None, hello: Hello::default() }))
    }
}

/// A client connection waiting for the gate's decision, then for its upstream.
#[derive(Debug)]
pub struct Greeting {
    client: TcpStream,
    upstream: Option<TcpStream>,
    hello: Hello,
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
        let Self { mut client, upstream, .. } = self;
        let Some(mut upstream) = upstream else {
            return End::UpstreamUnreachable { detail: "no upstream connection".into() };
        };
        let _ = upstream.set_nodelay(true);
        let _ = client.set_nodelay(true);
        // Opaque bytes have no way to say why a session was cut: both connections just close.
        tokio::select! {
            biased;
            end = session.cut.cut_with() => end,
            f = relay(&mut client, &mut upstream, &session.counters) => End::from(f),
        }
    }
}

/// Closes with a reset (SO_LINGER 0).
pub fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}
