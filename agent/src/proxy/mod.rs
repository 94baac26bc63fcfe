//! The transparent proxy: accepts the connections the kernel redirected, finds who opened them, asks the
//! gate (identity → policy → grant) whether they may go on, records `session.start` durably, connects
//! upstream and runs the target's protocol handler until either side closes, the grant ends, an
//! operator kills the session, the audit record fails, or the daemon stops; then records `session.end`.
//!
//! **No byte reaches an upstream before its session's `session.start` record is durable.**

pub mod sessions;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::audit::{Audit, Record};
use crate::bpf::Kernel;
use crate::origin::{self, ConnOrigin};
use crate::protocol::tcp;
pub use sessions::{SessionInfo, Sessions};

/// How long an upstream connect may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The identity a session runs as, as recorded.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct IdentityView {
    /// The configured identity name.
    pub name: String,
    pub sub: String,
    pub client_id: String,
    pub groups: Vec<String>,
}

/// A future that resolves, with a reason, when a session's grant ends.
pub type GrantEnd = Pin<Box<dyn Future<Output = String> + Send>>;

/// What the gate hands a session it admits.
pub struct Admission {
    pub target: String,
    pub protocol: String,
    pub identity: Option<IdentityView>,
    pub grant: Option<String>,
    pub rule: Option<String>,
    pub access: Option<String>,
    /// Resolves when the grant expires or is revoked; the session is then cut.
    pub until: Option<GrantEnd>,
}

impl std::fmt::Debug for Admission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admission")
            .field("target", &self.target)
            .field("identity", &self.identity)
            .field("grant", &self.grant)
            .finish_non_exhaustive()
    }
}

/// Why the gate refused a session: recorded, and what the client is told where the protocol allows.
#[derive(Debug, Clone)]
pub struct Refusal {
    /// Machine-readable: `unknown_binding`, `unknown_target`, `identity`, `policy`, `grant`, ...
    pub code: &'static str,
    pub reason: String,
    pub target: Option<String>,
    pub identity: Option<IdentityView>,
}

/// Decides whether a connection may proceed: the seam where identity, policy and grants plug in.
pub trait Gate: Send + Sync + 'static {
    fn admit<'a>(
        &'a self,
        origin: &'a ConnOrigin,
    ) -> Pin<Box<dyn Future<Output = Result<Admission, Refusal>> + Send + 'a>>;
}

/// Everything a session needs, shared by all of them.
pub struct Proxy {
    pub kernel: Arc<Kernel>,
    pub cgroup_root: PathBuf,
    pub audit: Audit,
    pub sessions: Arc<Sessions>,
    pub gate: Arc<dyn Gate>,
    /// Fires when the audit record can no longer be written: every live session ends.
    pub audit_failed: CancellationToken,
    pub shutdown: CancellationToken,
    /// Caps concurrent sessions; connections beyond it are refused and recorded.
    pub limit: Arc<Semaphore>,
}

impl Proxy {
    /// Accepts on one listener until shutdown.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        loop {
            let (stream, peer) = tokio::select! {
                () = self.shutdown.cancelled() => return,
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        // EMFILE and friends: back off briefly instead of spinning.
                        tracing::warn!(error = %e, "proxy accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let this = self.clone();
            tokio::spawn(async move { this.connection(stream, peer).await });
        }
    }

    async fn connection(self: Arc<Self>, client: TcpStream, peer: SocketAddr) {
        let Some(origin) = origin::lookup(&self.kernel, peer, &self.cgroup_root) else {
            tracing::warn!(%peer, "connection to the proxy with no origin; closing");
            let _ = self.audit.append(
                Record::new("connect.refused")
                    .field("decision", "deny")
                    .field(
                        "reason",
                        "connection reached the proxy without going through the kernel's redirect",
                    )
                    .field("peer", peer.to_string()),
            );
            reset(client);
            return;
        };
        let Ok(permit) = self.limit.clone().try_acquire_owned() else {
            self.refuse(
                &origin,
                client,
                &Refusal {
                    code: "overloaded",
                    reason: "too many concurrent sessions".into(),
                    target: None,
                    identity: None,
                },
            );
            return;
        };
        let id = new_session_id();
        let span = tracing::info_span!("session", session = %id, pid = origin.pid, cgroup = %origin.cgroup, dst = %origin.dst);
        self.clone().session(id, origin, client).instrument(span).await;
        drop(permit);
    }

    fn refuse(&self, origin: &ConnOrigin, client: TcpStream, refusal: &Refusal) {
        tracing::info!(code = refusal.code, reason = %refusal.reason, "session refused");
        let rec = origin_fields(Record::new("session.refused"), origin)
            .field("target", &refusal.target)
            .field("identity", &refusal.identity)
            .field("decision", "deny")
            .field("code", refusal.code)
            .field("reason", &refusal.reason);
        if let Err(e) = self.audit.append(rec) {
            tracing::error!(error = %e, "could not record a refused session");
        }
        reset(client);
    }

    async fn session(self: Arc<Self>, id: String, origin: ConnOrigin, mut client: TcpStream) {
        let admission = tokio::select! {
            () = self.shutdown.cancelled() => return reset(client),
            r = self.gate.admit(&origin) => r,
        };
        let admission = match admission {
            Ok(a) => a,
            Err(refusal) => return self.refuse(&origin, client, &refusal),
        };
        let started = Instant::now();
        let start = origin_fields(Record::new("session.start"), &origin)
            .field("session", &id)
            .field("identity", &admission.identity)
            .field("target", &admission.target)
            .field("protocol", &admission.protocol)
            .field("grant", &admission.grant)
            .field("rule", &admission.rule)
            .field("access", &admission.access)
            .field("decision", "allow")
            .field("reason", allow_reason(&admission));
        // The record before the first byte: the upstream handshake (no payload) runs while session.start is
        // made durable; if the record cannot be, the session does not proceed and the upstream connection
        // is dropped unused.
        let connect = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(origin.dst));
        let (recorded, upstream) = tokio::join!(self.audit.append_durable(start), connect);
        if let Err(e) = recorded {
            tracing::error!(error = %e, "session.start could not be recorded; refusing");
            if let Ok(Ok(u)) = upstream {
                reset(u);
            }
            return reset(client);
        }
        let counters = Arc::new(tcp::Counters::default());
        let kill = CancellationToken::new();
        self.sessions.insert(SessionInfo {
            session: id.clone(),
            pid: origin.pid,
            uid: origin.uid,
            cgroup: origin.cgroup.clone(),
            identity: admission.identity.as_ref().map(|i| i.name.clone()),
            target: admission.target.clone(),
            dst: origin.dst,
            grant: admission.grant.clone(),
            started: SystemTime::now(),
            counters: counters.clone(),
            kill: kill.clone(),
        });
        let until = admission.until.unwrap_or_else(|| Box::pin(std::future::pending()));
        let reason: String = tokio::select! {
            r = Self::run(&mut client, upstream, &counters) => r,
            why = until => why,
            () = kill.cancelled() => "killed_by_operator".into(),
            () = self.audit_failed.cancelled() => "audit_unavailable".into(),
            () = self.shutdown.cancelled() => "daemon_shutdown".into(),
        };
        self.sessions.remove(&id);
        let end = origin_fields(Record::new("session.end"), &origin)
            .field("session", &id)
            .field("identity", &admission.identity)
            .field("target", &admission.target)
            .field("grant", &admission.grant)
            .field("decision", "allow")
            .field("bytes_up", counters.up.load(Ordering::Relaxed))
            .field("bytes_down", counters.down.load(Ordering::Relaxed))
            .field("duration_ms", u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX))
            .field("reason", &reason);
        tracing::info!(%reason, "session ended");
        if let Err(e) = self.audit.append(end) {
            tracing::error!(error = %e, "could not record session.end");
        }
    }

    /// Runs the protocol handler over the upstream connection; returns why it finished.
    async fn run(
        client: &mut TcpStream,
        upstream: Result<std::io::Result<TcpStream>, tokio::time::error::Elapsed>,
        counters: &tcp::Counters,
    ) -> String {
        let mut upstream = match upstream {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "upstream connect failed");
                return "upstream_unreachable".into();
            }
            Err(_) => return "upstream_timeout".into(),
        };
        let _ = upstream.set_nodelay(true);
        let _ = client.set_nodelay(true);
        tcp::relay(client, &mut upstream, counters).await.reason().into()
    }
}

/// Why a session was allowed, in words.
fn allow_reason(a: &Admission) -> String {
    match (&a.rule, &a.access, &a.grant) {
        (Some(rule), Some(access), Some(grant)) => format!("rule `{rule}` grants {access} (grant {grant})"),
        _ => "allowed".to_owned(),
    }
}

/// The origin fields every session record carries.
fn origin_fields(r: Record, o: &ConnOrigin) -> Record {
    r.field("pid", o.pid)
        .field("uid", o.uid)
        .field("gid", o.gid)
        .field("cgroup", &o.cgroup)
        .field("cgroup_id", o.cgroup_id)
        .field("dst", o.dst.to_string())
}

/// Closes with a reset, so a refused client sees an error rather than a clean, empty stream.
fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}

/// A session id: unique across restarts (time-based prefix) and unguessable enough to not collide.
fn new_session_id() -> String {
    use std::sync::atomic::AtomicU64;
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("s{:x}{:05x}{:04x}", now.as_secs(), now.subsec_micros(), n & 0xffff)
}
