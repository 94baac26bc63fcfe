//! PostgreSQL sessions: Warden terminates the agent's connection (TLS under its local CA, no password
//! asked), logs in upstream with the target's credentials, and relays the session message by message,
//! classifying every statement before it is forwarded, recording it, and masking columns.
//!
//! One job per file: [`wire`] (framing, caps, the messages Warden writes), [`ca`] (the local TLS CA),
//! [`upstream`] (TLS and authentication upstream), [`session`] (the relay state machine), [`pool`] (idle
//! upstream connections), [`cancel`] (minted cancel keys); [`classify`] and [`mask`] are the statement
//! rules.

pub mod ca;
pub mod cancel;
pub mod classify;
pub mod mask;
pub mod pool;
mod session;
pub mod upstream;
pub mod wire;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpStream;

use crate::audit::{Audit, Record};
use crate::origin::ConnOrigin;
use crate::policy::{PostgresTarget, Target, TargetKind, Terms};
use crate::protocol::{End, Hello, Refusal, RefusalCode, Session};
use wire::{Conn, Initial, Io, Peer};

/// How long a client has to get from connect to a complete startup message.
pub const HELLO_DEADLINE: Duration = Duration::from_secs(10);
/// How long the upstream TCP connect may take.
pub const CONNECT_DEADLINE: Duration = Duration::from_secs(10);
/// Idle upstream connections kept per target, and for how long.
pub const POOL_MAX_IDLE: usize = 32;
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Statements whose classification is cached.
pub const CLASSIFIER_CACHE: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum PostgresError {
    #[error(transparent)]
    Ca(#[from] ca::CaError),
}

/// Why a connection ended before the gate could decide (recorded by the proxy with code `protocol`).
#[derive(Debug, thiserror::Error)]
pub enum HelloError {
    #[error("target `{0}` is not a postgres target")]
    NotPostgres(String),
    #[error("the client sent no startup message within {}s", HELLO_DEADLINE.as_secs())]
    Timeout,
    #[error("the client closed the connection before its startup message")]
    Closed,
    #[error("client TLS: {0}")]
    Tls(String),
    #[error("malformed startup: {0}")]
    Protocol(String),
    #[error(transparent)]
    Ca(#[from] ca::CaError),
    #[error("client i/o: {0}")]
    Io(#[from] std::io::Error),
}

impl From<wire::WireError> for HelloError {
    fn from(e: wire::WireError) -> Self {
        match e {
            wire::WireError::Truncated => Self::Closed,
            wire::WireError::Io(e) => Self::Io(e),
            e => Self::Protocol(e.to_string()),
        }
    }
}

/// State every PostgreSQL session shares.
pub(crate) struct Shared {
    pub audit: Audit,
    pub ca: ca::Ca,
    pub classifier: classify::Classifier,
    pub keys: cancel::Keys,
    pub pool: pool::Pool,
    /// Upstream TLS configurations by target name.
    tls: Mutex<HashMap<String, Arc<rustls::ClientConfig>>>,
}

impl Shared {
    fn upstream_tls(
        &self,
        target: &Target,
        pg: &PostgresTarget,
    ) -> Result<Arc<rustls::ClientConfig>, String> {
        let mut m = self.tls.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(c) = m.get(&target.name) {
            return Ok(c.clone());
        }
        let c = upstream::tls_config(pg)?;
        m.insert(target.name.clone(), c.clone());
        Ok(c)
    }
}

/// The PostgreSQL handler: its CA, classifier cache, cancel keys and pool.
#[derive(Clone)]
pub struct Postgres {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Postgres {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Postgres").finish_non_exhaustive()
    }
}

impl Postgres {
    /// Loads (or makes) the local CA in `state_dir`.
    pub fn new(state_dir: &Path, audit: Audit) -> Result<Self, PostgresError> {
        Ok(Self {
            shared: Arc::new(Shared {
                audit,
                ca: ca::Ca::load_or_create(state_dir)?,
                classifier: classify::Classifier::new(CLASSIFIER_CACHE),
                keys: cancel::Keys::default(),
                pool: pool::Pool::new(POOL_MAX_IDLE, POOL_IDLE_TIMEOUT),
                tls: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// The CA certificate clients trust for `sslmode=verify-full`.
    pub fn ca_pem(&self) -> &str {
        self.shared.ca.pem()
    }

    /// Idle pooled upstream connections now.
    pub fn pooled(&self) -> usize {
        self.shared.pool.idle_count()
    }

    /// Reads the client's TLS negotiation and startup message (or serves a CancelRequest: `Ok(None)`).
    pub async fn hello(
        &self,
        client: TcpStream,
        target: &Arc<Target>,
        origin: &ConnOrigin,
    ) -> Result<Option<Greeting>, HelloError> {
        tokio::time::timeout(HELLO_DEADLINE, self.hello_inner(client, target, origin))
            .await
            .map_err(|_| HelloError::Timeout)?
    }

    async fn hello_inner(
        &self,
        client: TcpStream,
        target: &Arc<Target>,
        origin: &ConnOrigin,
    ) -> Result<Option<Greeting>, HelloError> {
        let TargetKind::Postgres(_) = &target.kind else {
            return Err(HelloError::NotPostgres(target.name.clone()));
        };
        let _ = client.set_nodelay(true);
        let mut timing = Setup::new();
        let mut first = [0u8; 1];
        if client.peek(&mut first).await? == 0 {
            return Err(HelloError::Closed);
        }
        let mut tls = false;
        let mut io: Box<dyn Io> = if first[0] == 0x16 {
            // PostgreSQL 17's direct TLS: a ClientHello first, ALPN `postgresql` required.
            let s = self.accept_tls(Box::new(client), target).await?;
            let alpn = s.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
            if alpn.as_deref() != Some(b"postgresql") {
                return Err(HelloError::Tls("direct TLS without ALPN `postgresql`".into()));
            }
            tls = true;
            timing.tls = Some(timing.start.elapsed());
            Box::new(s)
        } else {
            Box::new(client)
        };
        let (version, params) = loop {
            match wire::read_initial(&mut io).await {
                Ok(Initial::Ssl) if !tls => {
                    io.write_all(b"S").await?;
                    io.flush().await?;
                    let began = timing.start.elapsed();
                    io = Box::new(self.accept_tls(io, target).await?);
                    timing.tls = Some(timing.start.elapsed().saturating_sub(began));
                    tls = true;
                }
                Ok(Initial::GssEnc) if !tls => {
                    io.write_all(b"N").await?;
                    io.flush().await?;
                }
                Ok(Initial::Ssl | Initial::GssEnc) => {
                    return Err(fatal(io, HelloError::Protocol("encryption requested twice".into())).await);
                }
                Ok(Initial::Cancel { pid, key }) => {
                    self.cancel(pid, &key, target, origin).await;
                    return Ok(None);
                }
                Ok(Initial::Startup { version, params }) => break (version, params),
                Err(e) => return Err(fatal(io, e.into()).await),
            }
        };
        let minor = version & 0xffff;
        let mut hello = Hello::default();
        // Every other parameter is relayed, once `connect` has checked it against the grant.
        let mut passed = Vec::new();
        let mut unknown = Vec::new();
        for (k, v) in params {
            match k.as_str() {
                "user" => hello.user = Some(v),
                "database" => hello.database = Some(v),
                _ if k.starts_with("_pq_.") => unknown.push(k),
                _ => passed.push((k, v)),
            }
        }
        if hello.user.is_none() {
            return Err(fatal(io, HelloError::Protocol("no user in the startup message".into())).await);
        }
        if hello.database.is_none() {
            hello.database.clone_from(&hello.user);
        }
        hello.details.insert("tls".into(), tls.into());
        hello.details.insert("protocol".into(), format!("3.{minor}").into());
        passed.sort();
        if !passed.is_empty() {
            let names: Vec<&str> = passed.iter().map(|(k, _)| k.as_str()).collect();
            hello.details.insert("parameters".into(), names.into());
        }
        timing.hello = timing.start.elapsed();
        Ok(Some(Greeting {
            shared: self.shared.clone(),
            client: Conn::new(io, Peer::Client),
            hello,
            target: target.clone(),
            negotiate: (minor > 0 || !unknown.is_empty()).then_some(unknown),
            client_params: passed,
            upstream: None,
            timing,
        }))
    }

    async fn accept_tls(
        &self,
        io: Box<dyn Io>,
        target: &Target,
    ) -> Result<tokio_rustls::server::TlsStream<Box<dyn Io>>, HelloError> {
        let config = self.shared.ca.server_config(&target.host)?;
        tokio_rustls::TlsAcceptor::from(config).accept(io).await.map_err(|e| HelloError::Tls(e.to_string()))
    }

    /// A CancelRequest: forwarded to the upstream backend if the key was minted for a live session from
    /// the same tagged cgroup; recorded either way.
    async fn cancel(&self, pid: i32, key: &[u8], target: &Target, origin: &ConnOrigin) {
        let secret = <[u8; 4]>::try_from(key).map(i32::from_be_bytes);
        let resolved = match secret {
            Ok(secret) => self.shared.keys.resolve((pid, secret), origin.tagged_cgroup),
            Err(_) => Err(cancel::Denied::UnknownKey),
        };
        let mut r = Record::new("pg.cancel")
            .field("pid", origin.pid)
            .field("uid", origin.uid)
            .field("cgroup", &origin.cgroup)
            .field("target", &target.name)
            .field("dst", origin.dst.to_string());
        // Recorded before it is forwarded: an unrecorded cancel is not sent.
        match resolved {
            Ok(issued) => {
                r = r.field("cancelled_session", &issued.session).field("forwarded", true);
                if let Err(e) = self.shared.audit.append(r) {
                    tracing::warn!(error = %e, "pg.cancel could not be recorded; not forwarding it");
                    return;
                }
                if let Err(e) = cancel::send(issued.upstream, issued.backend).await {
                    tracing::warn!(error = %e, session = %issued.session, "the upstream did not take the cancel");
                }
            }
            Err(d) => {
                r = r.field("forwarded", false).field("denied", d.as_str());
                if let Err(e) = self.shared.audit.append(r) {
                    tracing::warn!(error = %e, "pg.cancel could not be recorded");
                }
            }
        }
    }
}

/// Tells the client why its startup failed (best effort), and hands the error back.
async fn fatal(mut io: Box<dyn Io>, e: HelloError) -> HelloError {
    let mut out = Vec::new();
    wire::error_response("FATAL", "08P01", &format!("warden: {e}")).encode(&mut out);
    let _ = io.write_all(&out).await;
    let _ = io.shutdown().await;
    e
}

/// The upstream leg once `connect` ran.
enum Connected {
    /// A TCP connection, not yet logged in.
    Fresh(TcpStream, SocketAddr),
    /// An idle pooled connection, already logged in and reset.
    Pooled(upstream::Upstream),
}

/// A client that sent its startup message, waiting for the gate.
pub struct Greeting {
    shared: Arc<Shared>,
    client: Conn,
    hello: Hello,
    target: Arc<Target>,
    /// `Some(unknown options)` when the client asked for a newer minor version or `_pq_` options.
    negotiate: Option<Vec<String>>,
    /// The client's startup parameters (sorted; part of the pool key), passed upstream once `connect`
    /// checked them against the grant.
    client_params: Vec<(String, String)>,
    upstream: Option<Connected>,
    timing: Setup,
}

/// Where a session's set-up time went, logged at `debug` under the target `pg_setup` once the client has
/// its first `ReadyForQuery` (what `cargo xtask bench postgres` breaks the connection cost down with).
#[derive(Debug, Clone, Copy)]
struct Setup {
    /// When the handler got the connection (after the proxy's accept and origin lookup).
    start: Instant,
    /// The agent-side TLS handshake, if the client asked for TLS.
    tls: Option<Duration>,
    /// From `start` to a complete startup message (including `tls`).
    hello: Duration,
    /// From `start` to [`Greeting::connect`]: the proxy's identity, policy and grant decision in between.
    connect_start: Duration,
    /// The pool checkout or the upstream TCP connect.
    checkout: Duration,
    pooled: bool,
}

impl Setup {
    fn new() -> Self {
        Self {
            start: Instant::now(),
            tls: None,
            hello: Duration::ZERO,
            connect_start: Duration::ZERO,
            checkout: Duration::ZERO,
            pooled: false,
        }
    }

    /// `run_start`: the handler's `run` began (the proxy waited for the durable `session.start` in
    /// between); `login_done`: the upstream session was ready and the client's greeting was queued.
    fn log(&self, run_start: Duration, login_done: Duration) {
        let us = |d: Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        let after_connect = self.connect_start + self.checkout;
        tracing::debug!(
            target: "pg_setup",
            pooled = self.pooled,
            tls_us = self.tls.map(us),
            hello_us = us(self.hello),
            gate_us = us(self.connect_start.saturating_sub(self.hello)),
            checkout_us = us(self.checkout),
            durable_wait_us = us(run_start.saturating_sub(after_connect)),
            login_us = us(login_done.saturating_sub(run_start)),
            greeting_us = us(self.start.elapsed().saturating_sub(login_done)),
            total_us = us(self.start.elapsed()),
            "postgres connection set-up"
        );
    }
}

impl std::fmt::Debug for Greeting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Greeting")
            .field("target", &self.target.name)
            .field("hello", &self.hello)
            .finish_non_exhaustive()
    }
}

impl Greeting {
    pub fn hello(&self) -> &Hello {
        &self.hello
    }

    /// Tells the client the gate's refusal as `FATAL` (`3D000` for a database, else `28000`).
    pub async fn refuse(mut self, refusal: &Refusal) {
        let code = if refusal.code == RefusalCode::Database { "3D000" } else { "28000" };
        self.client.send(&wire::error_response("FATAL", code, &format!("warden: {}", refusal.reason)));
        let _ = self.client.flush().await;
        let _ = self.client.io.shutdown().await;
    }

    fn pg(&self) -> &PostgresTarget {
        match &self.target.kind {
            TargetKind::Postgres(pg) => pg,
            // hello() admits only postgres targets.
            _ => unreachable!("a postgres greeting for a non-postgres target"),
        }
    }

    fn database(&self) -> &str {
        self.hello.database.as_deref().unwrap_or_default()
    }

    fn pool_key(&self, dst: SocketAddr, terms: &Terms) -> pool::Key {
        let login = self.pg().credentials.for_access(terms.access);
        pool::Key {
            target: self.target.name.clone(),
            dst,
            user: login.user.clone(),
            password_file: login.password_file.clone(),
            database: self.database().to_owned(),
            access: terms.access,
            client_params: self.client_params.clone(),
        }
    }

    /// Opens the upstream TCP connection (no payload), or takes an idle pooled one. Refuses a database
    /// outside the target's `databases` here too.
    pub async fn connect(&mut self, dst: SocketAddr, terms: &Terms) -> Result<(), End> {
        if !self.pg().databases.iter().any(|d| d == self.database()) {
            let msg = format!(
                "warden: database `{}` is not one of target `{}`'s databases in the policy",
                self.database(),
                self.target.name
            );
            self.client.send(&wire::error_response("FATAL", "3D000", &msg));
            let _ = self.client.flush().await;
            return Err(End::PolicyChanged { reason: msg });
        }
        // A startup parameter that would lift the grant's limits (read-only, role, the settings Warden
        // parses by), directly or in `options`, refuses the session, as the same `SET` would be refused.
        let params: Vec<(&str, &str)> =
            self.client_params.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        if let Err(r) = classify::check_startup(&params, terms.access) {
            let msg = format!(
                "{} (a startup parameter; policy rule `{}` grants `{}` access to target `{}`)",
                r.message, terms.rule, terms.access, self.target.name
            );
            self.client.send(&wire::error_response("FATAL", r.sqlstate, &msg));
            let _ = self.client.flush().await;
            return Err(End::PolicyChanged { reason: msg });
        }
        self.timing.connect_start = self.timing.start.elapsed();
        if let Some(up) = self.shared.pool.take(&self.pool_key(dst, terms)).await {
            self.upstream = Some(Connected::Pooled(up));
            self.timing.pooled = true;
            self.timing.checkout = self.timing.start.elapsed().saturating_sub(self.timing.connect_start);
            return Ok(());
        }
        let tcp = match tokio::time::timeout(CONNECT_DEADLINE, TcpStream::connect(dst)).await {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => return Err(End::UpstreamUnreachable { detail: e.to_string() }),
            Err(_) => return Err(End::UpstreamTimeout),
        };
        let _ = tcp.set_nodelay(true);
        self.upstream = Some(Connected::Fresh(tcp, dst));
        self.timing.checkout = self.timing.start.elapsed().saturating_sub(self.timing.connect_start);
        Ok(())
    }

    /// Logs in upstream (if fresh) and relays the session until it ends.
    pub async fn run(self, session: Session) -> End {
        session::run(self, session).await
    }
}
