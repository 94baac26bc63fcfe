//! Protocol handlers, chosen by the target's kind: opaque TCP, and (being built) PostgreSQL and SSH. This
//! module owns the dispatch from a [`TargetKind`] to its handler ([`Handlers`], [`Greeting`]) and what
//! every handler shares with the proxy: what a handler reads before the gate decides ([`Hello`]), the byte
//! counters, why a session ended ([`End`]), why one was refused ([`RefusalCode`], [`Refusal`]), the
//! session a handler runs ([`Session`], [`Cut`]) and its mid-session questions ([`Ask`], [`Authorize`]).
//!
//! A handler owns its wire format, its state machine, how it refuses (a TCP reset, a PostgreSQL
//! `ErrorResponse`, an SSH disconnect message) and the records it writes. A new protocol is a module
//! `protocol/<name>/` with the shape of `tcp` (`new`, `hello`, and a greeting with `hello`, `refuse`,
//! `connect`, `run`), a [`TargetKind`] variant, and one arm per method below.

pub mod postgres;
pub mod splice;
pub mod ssh;
pub mod tcp;

use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use tokio::net::TcpStream;

use crate::audit::{Audit, Record};
use crate::origin::ConnOrigin;
use crate::policy::{Target, TargetKind, Terms};

/// Every protocol's handler, with the state it shares across sessions.
#[derive(Debug)]
pub struct Handlers {
    tcp: tcp::Tcp,
    postgres: postgres::Postgres,
    ssh: ssh::Ssh,
}

/// A protocol handler could not start (its keys or state could not be loaded).
#[derive(Debug, thiserror::Error)]
pub enum HandlersError {
    #[error(transparent)]
    Postgres(#[from] postgres::PostgresError),
    #[error(transparent)]
    Ssh(#[from] ssh::SshError),
}

/// The client's hello could not be read; recorded as `session.refused` with code `protocol`. The handler
/// has already told the client, or closed the connection.
#[derive(Debug, thiserror::Error)]
pub enum HelloError {
    #[error(transparent)]
    Tcp(#[from] tcp::HelloError),
    #[error(transparent)]
    Postgres(#[from] postgres::HelloError),
    #[error(transparent)]
    Ssh(#[from] ssh::HelloError),
}

impl Handlers {
    /// Every handler's shared state (`state_dir` holds what must outlive a restart, e.g. a local CA);
    /// opaque TCP's (`tcp`: how it relays) is made by the caller.
    pub fn new(state_dir: &Path, audit: &Audit, tcp: tcp::Tcp) -> Result<Self, HandlersError> {
        Ok(Self {
            tcp,
            postgres: postgres::Postgres::new(state_dir, audit.clone())?,
            ssh: ssh::Ssh::new(state_dir, audit.clone())?,
        })
    }

    /// Step 3 of a connection: the target's handler reads what the gate needs from the client. `Ok(None)`
    /// when the connection was fully handled without a session (a PostgreSQL CancelRequest).
    pub async fn hello(
        &self,
        client: TcpStream,
        target: &Arc<Target>,
        origin: &ConnOrigin,
    ) -> Result<Option<Greeting>, HelloError> {
        match &target.kind {
            TargetKind::Tcp => Ok(self.tcp.hello(client, target, origin).await?.map(Greeting::Tcp)),
            TargetKind::Postgres(_) => Ok(self
                .postgres
                .hello(client, target, origin)
                .await?
                .map(|g| Greeting::Postgres(Box::new(g)))),
            TargetKind::Ssh(_) => Ok(self.ssh.hello(client, target, origin).await?.map(Greeting::Ssh)),
        }
    }
}

/// A client connection its handler has greeted, waiting for the gate's decision and then its upstream.
#[derive(Debug)]
pub enum Greeting {
    Tcp(tcp::Greeting),
    Postgres(Box<postgres::Greeting>),
    Ssh(ssh::Greeting),
}

impl Greeting {
    /// What the handler read before the decision.
    pub fn hello(&self) -> &Hello {
        match self {
            Self::Tcp(g) => g.hello(),
            Self::Postgres(g) => g.hello(),
            Self::Ssh(g) => g.hello(),
        }
    }

    /// Tells the client it was refused, in its protocol's terms.
    pub async fn refuse(self, refusal: &Refusal) {
        match self {
            Self::Tcp(g) => g.refuse(refusal).await,
            Self::Postgres(g) => (*g).refuse(refusal).await,
            Self::Ssh(g) => g.refuse(refusal).await,
        }
    }

    /// The upstream connection (a TCP connect, or a pooled upstream): no payload before `run`.
    pub async fn connect(&mut self, dst: SocketAddr, terms: &Terms) -> Result<(), End> {
        match self {
            Self::Tcp(g) => g.connect(dst, terms).await,
            Self::Postgres(g) => g.connect(dst, terms).await,
            Self::Ssh(g) => g.connect(dst, terms).await,
        }
    }

    /// The session, until it ends on its own or is cut.
    pub async fn run(self, session: Session) -> End {
        match self {
            Self::Tcp(g) => g.run(session).await,
            Self::Postgres(g) => (*g).run(session).await,
            Self::Ssh(g) => g.run(session).await,
        }
    }
}

/// The identity a session runs as, as recorded.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct IdentityView {
    /// The configured identity name.
    pub name: String,
    pub sub: String,
    pub client_id: String,
    pub groups: Vec<String>,
}

/// Why a connection, or a request inside a session, was refused: recorded, and told to the client in the
/// protocol's own terms where it allows (a reset for opaque TCP).
#[derive(Debug, Clone)]
pub struct Refusal {
    pub code: RefusalCode,
    pub reason: String,
    pub target: Option<String>,
    pub identity: Option<Arc<IdentityView>>,
}

impl Refusal {
    pub fn new(code: RefusalCode, reason: impl Into<String>) -> Self {
        Self { code, reason: reason.into(), target: None, identity: None }
    }
}

/// What a handler asks the gate mid-session (SSH decides per channel and per command).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ask<'a> {
    /// Run one command (`exec` channel request).
    Exec { command: &'a str },
    /// An interactive shell (with or without a PTY).
    Shell,
    /// Port forwarding (`direct-tcpip` for `-L`/`-W`, `tcpip-forward` for `-R`) or agent forwarding.
    Forward { what: &'a str },
    /// A subsystem such as `sftp`.
    Subsystem { name: &'a str },
}

/// Answers a handler's mid-session questions against the current policy and the session's grant.
pub trait Authorize: Send + Sync {
    fn authorize(&self, session: &Session, ask: &Ask<'_>) -> Result<(), Refusal>;
}

/// Ends a session from outside it, once, with the first cause given: a grant's end, an operator's kill, a
/// policy change, the audit writer failing, the daemon stopping. Cheap to clone; every clone sees the same.
#[derive(Debug, Clone, Default)]
pub struct Cut {
    inner: Arc<CutInner>,
}

#[derive(Debug, Default)]
struct CutInner {
    end: OnceLock<End>,
    fired: CancellationToken,
}

impl Cut {
    pub fn new() -> Self {
        Self::default()
    }

    /// Cuts the session with `end`; false (and `end` is dropped) if it was already cut for another cause.
    pub fn cut(&self, end: End) -> bool {
        let first = self.inner.end.set(end).is_ok();
        self.inner.fired.cancel();
        first
    }

    /// The cause, once cut.
    pub fn cause(&self) -> Option<&End> {
        self.inner.end.get()
    }

    /// Resolves with the cause when the session is cut.
    pub async fn cut_with(&self) -> End {
        self.inner.fired.cancelled().await;
        self.inner.end.get().cloned().unwrap_or(End::KilledByOperator)
    }
}

/// One admitted session, as a protocol handler sees it once `session.start` is durable.
pub struct Session {
    pub id: String,
    pub origin: ConnOrigin,
    pub target: Arc<Target>,
    /// What the grant allows: access, masks, command allow-list, forwarding, sftp.
    pub terms: Terms,
    pub identity: Option<IdentityView>,
    pub grant: Option<String>,
    pub audit: Audit,
    pub counters: Arc<Counters>,
    /// Resolves when something outside the session ends it; a handler tells the client why, then returns
    /// that cause. The proxy drops a handler that does not return soon after.
    pub cut: Cut,
    pub authorize: Arc<dyn Authorize>,
}

impl Session {
    /// A record of this session's with the fields every session record carries.
    pub fn record(&self, event: &str) -> Record {
        let o = &self.origin;
        Record::new(event)
            .field("session", &self.id)
            .field("pid", o.pid)
            .field("uid", o.uid)
            .field("cgroup", &o.cgroup)
            .field("identity", &self.identity)
            .field("target", &self.target.name)
            .field("dst", o.dst.to_string())
            .field("grant", &self.grant)
    }

    /// Asks the gate whether `ask` is within this session's grant now.
    pub fn ask(&self, ask: &Ask<'_>) -> Result<(), Refusal> {
        self.authorize.authorize(self, ask)
    }
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("id", &self.id)
            .field("target", &self.target.name)
            .finish_non_exhaustive()
    }
}

/// What a protocol must read from the client before the gate can decide: nothing for opaque TCP; the
/// startup message's database and user for PostgreSQL. Recorded in `session.start` / `session.refused`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Hello {
    /// PostgreSQL: the database the client asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub database: Option<String>,
    /// The user name the client gave (PostgreSQL startup `user`, SSH user); recorded, never trusted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Protocol details worth recording (e.g. the SSH client's version and the auth methods offered).
    #[serde(skip_serializing_if = "serde_json::Map::is_empty")]
    pub details: serde_json::Map<String, serde_json::Value>,
}

/// Bytes a session moved, shared with `warden sessions` while it runs and read for `session.end`.
#[derive(Debug, Default)]
pub struct Counters {
    /// Client → upstream.
    pub up: AtomicU64,
    /// Upstream → client.
    pub down: AtomicU64,
    /// How an opaque TCP session's bytes went (`RelayPath` bits); none for the other protocols.
    paths: AtomicU8,
}

/// How the opaque relay moved a session's bytes: `session.end`'s `relay`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum RelayPath {
    /// `splice(2)` through a kernel pipe: the bytes never entered user space.
    Splice = 1,
    /// Read into and written from a user-space buffer.
    Copy = 2,
}

impl Counters {
    /// Some of the session's bytes went this way.
    pub fn relayed(&self, path: RelayPath) {
        self.paths.fetch_or(path as u8, Ordering::Relaxed);
    }

    /// `splice`, `copy`, or `splice+copy` (spliced, with some bursts copied: no pipe could be had, or the
    /// kernel refused); `None` for sessions of the other protocols.
    pub fn relay(&self) -> Option<&'static str> {
        match self.paths.load(Ordering::Relaxed) {
            1 => Some("splice"),
            2 => Some("copy"),
            3 => Some("splice+copy"),
            _ => None,
        }
    }
}

/// Why a session ended. Recorded as `session.end`'s `reason` (the `as_str` spelling) with the cause's
/// details; each cause is its own variant so a kill, a revocation, a policy change and an expiry are never
/// confused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// The client closed first (then the upstream finished too).
    ClientClosed,
    UpstreamClosed,
    ClientError,
    UpstreamError,
    /// The upstream could not be reached (`detail`: the error).
    UpstreamUnreachable {
        detail: String,
    },
    UpstreamTimeout,
    /// The client broke the protocol (malformed or oversized messages, a handshake deadline missed).
    ProtocolError {
        detail: String,
    },
    /// The upstream refused Warden's login or broke the protocol (a host key mismatch, bad credentials).
    UpstreamRefused {
        detail: String,
    },
    GrantExpired,
    GrantRevoked {
        by: String,
    },
    PolicyChanged {
        reason: String,
    },
    KilledByOperator,
    /// The audit record can no longer be written: the session cannot go on unrecorded.
    AuditUnavailable,
    DaemonShutdown,
}

impl End {
    /// The stable spelling recorded as `reason`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::ClientClosed => "client_closed",
            Self::UpstreamClosed => "upstream_closed",
            Self::ClientError => "client_error",
            Self::UpstreamError => "upstream_error",
            Self::UpstreamUnreachable { .. } => "upstream_unreachable",
            Self::UpstreamTimeout => "upstream_timeout",
            Self::ProtocolError { .. } => "protocol_error",
            Self::UpstreamRefused { .. } => "upstream_refused",
            Self::GrantExpired => "grant_expired",
            Self::GrantRevoked { .. } => "grant_revoked",
            Self::PolicyChanged { .. } => "policy_changed",
            Self::KilledByOperator => "killed_by_operator",
            Self::AuditUnavailable => "audit_unavailable",
            Self::DaemonShutdown => "daemon_shutdown",
        }
    }

    /// The cause's detail, recorded as `detail` when there is one.
    pub fn detail(&self) -> Option<&str> {
        match self {
            Self::UpstreamUnreachable { detail }
            | Self::ProtocolError { detail }
            | Self::UpstreamRefused { detail } => Some(detail),
            Self::GrantRevoked { by } => Some(by),
            Self::PolicyChanged { reason } => Some(reason),
            _ => None,
        }
    }

    /// Whether the session ended because something outside it cut it (grant, operator, daemon), as
    /// opposed to finishing on its own: a handler tells the client why where its protocol can.
    pub fn is_cut(&self) -> bool {
        matches!(
            self,
            Self::GrantExpired
                | Self::GrantRevoked { .. }
                | Self::PolicyChanged { .. }
                | Self::KilledByOperator
                | Self::AuditUnavailable
                | Self::DaemonShutdown
        )
    }
}

impl fmt::Display for End {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ClientClosed => f.write_str("the client closed the session"),
            Self::UpstreamClosed => f.write_str("the upstream closed the session"),
            Self::ClientError => f.write_str("the client connection failed"),
            Self::UpstreamError => f.write_str("the upstream connection failed"),
            Self::UpstreamUnreachable { detail } => write!(f, "the upstream is unreachable: {detail}"),
            Self::UpstreamTimeout => f.write_str("the upstream did not answer in time"),
            Self::ProtocolError { detail } => write!(f, "protocol error: {detail}"),
            Self::UpstreamRefused { detail } => write!(f, "the upstream refused warden: {detail}"),
            Self::GrantExpired => f.write_str("the grant expired"),
            Self::GrantRevoked { by } => write!(f, "the grant was revoked by {by}"),
            Self::PolicyChanged { reason } => write!(f, "the policy no longer allows this session: {reason}"),
            Self::KilledByOperator => f.write_str("an operator ended the session"),
            Self::AuditUnavailable => f.write_str("the audit record cannot be written"),
            Self::DaemonShutdown => f.write_str("warden is shutting down"),
        }
    }
}

/// Why a connection or a request inside a session was refused; recorded as `code`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RefusalCode {
    /// The cgroup is tagged but this daemon does not know its binding.
    UnknownBinding,
    /// The destination is no longer a target in the policy.
    UnknownTarget,
    /// The identity could not be verified (token fetch or verification failed).
    Identity,
    /// No rule grants this identity this target and access.
    Policy,
    /// A grant could not be had (spent, pending approval, revoked).
    Grant,
    /// Too many concurrent sessions (daemon-wide or for this cgroup).
    Overloaded,
    /// The handler's hello could not be read (malformed, timed out).
    Protocol,
    /// PostgreSQL: the requested database is not in the target's `databases`.
    Database,
    /// Warden cannot take the session now: it is shutting down, or the audit record cannot be written.
    Unavailable,
    /// Inside a session: the request is not within the grant (a write under `read`, a masked column, a
    /// command outside the allow-list, a forwarding request).
    NotGranted,
}

impl RefusalCode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::UnknownBinding => "unknown_binding",
            Self::UnknownTarget => "unknown_target",
            Self::Identity => "identity",
            Self::Policy => "policy",
            Self::Grant => "grant",
            Self::Overloaded => "overloaded",
            Self::Protocol => "protocol",
            Self::Database => "database",
            Self::Unavailable => "unavailable",
            Self::NotGranted => "not_granted",
        }
    }
}

impl fmt::Display for RefusalCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for RefusalCode {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_first_cause_wins() {
        let cut = Cut::new();
        assert!(cut.cut(End::PolicyChanged { reason: "target removed".into() }));
        assert!(!cut.cut(End::KilledByOperator));
        assert_eq!(cut.clone().cut_with().await.as_str(), "policy_changed");
    }

    #[test]
    fn end_reasons_keep_their_recorded_spellings() {
        assert_eq!(End::KilledByOperator.as_str(), "killed_by_operator");
        assert_eq!(End::PolicyChanged { reason: "x".into() }.as_str(), "policy_changed");
        assert_eq!(End::GrantRevoked { by: "operator".into() }.detail(), Some("operator"));
        assert!(End::GrantExpired.is_cut() && !End::ClientClosed.is_cut());
        assert_eq!(serde_json::to_value(RefusalCode::UnknownTarget).unwrap(), "unknown_target");
    }
}
