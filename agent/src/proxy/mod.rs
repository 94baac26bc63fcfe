//! The transparent proxy: accepts the connections the kernel redirected and takes each along one path:
//! its origin (who opened it) → its target (the gate) → the target's handler reads the hello → the gate
//! decides (identity → policy → grant) → `session.start` is made durable while the handler connects
//! upstream → the handler runs until the session ends on its own or is cut (the grant ends, an operator
//! kills it, the policy changes, the audit record fails, the daemon stops) → `session.end` with the typed
//! cause. It knows no protocol: `protocol::Handlers` dispatches on the target's kind.
//!
//! **No byte reaches an upstream before its session's `session.start` record is durable.**

pub mod per_cgroup;
pub mod refusals;
pub mod sessions;

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument as _;

use crate::audit::{Audit, Record};
use crate::metrics::{Metrics, RefusalKind, SetupStep};
use crate::origin::{ConnOrigin, Origins};
use crate::policy::{Target, Terms};
use crate::protocol::{
    Authorize, Counters, Cut, End, Greeting, Handlers, Hello, IdentityView, Refusal, RefusalCode, Session,
};
pub use sessions::{SessionInfo, Sessions};

/// How long a client may take to send what its handler must read before the decision.
const HELLO_DEADLINE: Duration = Duration::from_secs(10);
/// How long a handler may take to return once its session is cut, before it is dropped.
const CUT_GRACE: Duration = Duration::from_secs(2);

/// A future that resolves, with the cause, when a session's grant ends.
pub type GrantEnd = Pin<Box<dyn Future<Output = End> + Send>>;

/// What the gate hands a session it admits.
pub struct Admission {
    /// What the grant allows.
    pub terms: Terms,
    pub identity: Option<IdentityView>,
    pub grant: Option<String>,
    /// Resolves when the grant expires, is revoked or is ended by a policy change; the session is then cut.
    pub until: Option<GrantEnd>,
}

impl std::fmt::Debug for Admission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admission")
            .field("terms", &self.terms)
            .field("identity", &self.identity)
            .field("grant", &self.grant)
            .finish_non_exhaustive()
    }
}

/// Decides whether a connection may proceed: the seam where bindings, identity, policy and grants plug in.
/// It also answers a handler's mid-session questions ([`Authorize`]).
pub trait Gate: Authorize + 'static {
    /// Step 2: the policy target this connection was redirected for (a refusal here is a reset).
    fn target(&self, origin: &ConnOrigin) -> Result<Arc<Target>, Refusal>;

    /// Step 4: identity → policy → grant, with what the target's handler read from the client.
    fn admit<'a>(
        &'a self,
        origin: &'a ConnOrigin,
        target: &'a Arc<Target>,
        hello: &'a Hello,
    ) -> Pin<Box<dyn Future<Output = Result<Admission, Refusal>> + Send + 'a>>;
}

/// Everything a session needs, shared by all of them.
pub struct Proxy {
    /// Who opened each accepted connection (the kernel, in production).
    pub origins: Arc<dyn Origins>,
    pub protocols: Handlers,
    pub audit: Audit,
    pub sessions: Arc<Sessions>,
    pub gate: Arc<dyn Gate>,
    /// Fires when the audit record can no longer be written: every live session ends.
    pub audit_failed: CancellationToken,
    pub shutdown: CancellationToken,
    /// Caps concurrent sessions; connections beyond it are refused and recorded.
    pub limit: Arc<Semaphore>,
    /// The connections in flight, so a stop can wait for their end records.
    pub tasks: TaskTracker,
    pub metrics: Arc<Metrics>,
    /// The budget of refusal records per source and second.
    pub refusals: Arc<refusals::Refusals>,
    /// Caps the connections one tagged cgroup holds (hello, pending approval, live).
    pub per_cgroup: Arc<per_cgroup::PerCgroup>,
}

impl Proxy {
    /// Accepts on one listener until shutdown.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut accept_errors = AcceptErrors::default();
        // A redirected connection always arrives at the address the kernel rewrote it to (an unspecified
        // listen address is reached through loopback, see `bpf::Kernel::set_proxy`). On a listener bound to
        // an unspecified address, a connection that arrived at another one came past the redirect: it has
        // no origin, whatever the index holds for its peer (a live redirected socket's local endpoint can
        // be shared, with SO_REUSEADDR, by a socket connecting to another of this host's addresses).
        let redirect_to = listener.local_addr().ok().filter(|a| a.ip().is_unspecified()).map(|a| {
            let ip = if a.is_ipv4() {
                std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)
            } else {
                std::net::IpAddr::V6(std::net::Ipv6Addr::LOCALHOST)
            };
            SocketAddr::new(ip, a.port())
        });
        loop {
            let (stream, peer) = tokio::select! {
                () = self.shutdown.cancelled() => return self.refusals.flush(&self.audit),
                _ = tick.tick() => {
                    self.refusals.flush(&self.audit);
                    continue;
                }
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        // EMFILE and friends: back off briefly instead of spinning.
                        accept_errors.warn(&e);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let past_redirect = redirect_to.is_some_and(|to| !stream.local_addr().is_ok_and(|l| l == to));
            let this = self.clone();
            self.tasks.spawn(async move { this.connection(stream, peer, past_redirect).await });
        }
    }

    /// Resolves once every connection accepted so far has finished (and recorded its end).
    pub async fn drained(&self) {
        self.tasks.close();
        self.tasks.wait().await;
        self.refusals.flush(&self.audit);
    }

    async fn connection(self: Arc<Self>, client: TcpStream, peer: SocketAddr, past_redirect: bool) {
        let running = Instant::now();
        let origin = if past_redirect {
            None
        } else {
            self.origins.lookup(peer).or_else(|| {
                // Not in the index: a socket made outside every tagged cgroup (its sock_ops never ran) may
                // still have been redirected by the connect hook, which judges the task.
                client.local_addr().ok().and_then(|local| self.origins.lookup_socket(local, peer))
            })
        };
        let Some(origin) = origin else {
            self.metrics.refused(RefusalKind::Gate, "no_origin");
            // Reset first: the refusal stands whether or not it is recorded in full.
            crate::protocol::tcp::reset(client);
            if !self.refusals.admit(&refusals::Source::NoOrigin, None, &self.metrics) {
                return;
            }
            tracing::warn!(%peer, "connection to the proxy with no origin; closing");
            let _ = self.audit.append_or_hold(
                Record::new("connect.refused")
                    .field("decision", "deny")
                    .field(
                        "reason",
                        "connection reached the proxy without going through the kernel's redirect",
                    )
                    .field("peer", peer.to_string()),
            );
            return;
        };
        let Ok(permit) = self.limit.clone().try_acquire_owned() else {
            self.record_refusal(
                &origin,
                &Refusal::new(RefusalCode::Overloaded, "too many concurrent sessions"),
                None,
            );
            crate::protocol::tcp::reset(client);
            return;
        };
        let Some(slot) = self.per_cgroup.try_take(origin.tagged_cgroup) else {
            let why = format!(
                "the cgroup holds {} sessions and pending approvals, its share (agent.max_sessions_per_cgroup)",
                self.per_cgroup.max()
            );
            self.record_refusal(&origin, &Refusal::new(RefusalCode::Overloaded, why), None);
            crate::protocol::tcp::reset(client);
            return;
        };
        let looked_up = Instant::now();
        // The kernel stamped the connect(); its wall time is as old as it was when the lookup read it.
        let since_connect = SystemTime::now().duration_since(origin.at).unwrap_or_default();
        let clock =
            Stamps { accept: since_connect.saturating_sub(looked_up - running), running, last: looked_up };
        self.metrics.setup_step(SetupStep::Accept, clock.accept);
        self.metrics.setup_step(SetupStep::Origin, looked_up - running);
        let id = new_session_id();
        let span = tracing::info_span!("session", session = %id, pid = origin.pid, cgroup = %origin.cgroup, dst = %origin.dst, identity = tracing::field::Empty, target = tracing::field::Empty);
        self.clone().session(id, origin, client, clock).instrument(span).await;
        drop(slot);
        drop(permit);
    }

    fn record_refusal(&self, origin: &ConnOrigin, refusal: &Refusal, hello: Option<&Hello>) {
        let span = tracing::Span::current();
        if let Some(i) = &refusal.identity {
            span.record("identity", i.name.as_str());
        }
        if let Some(t) = &refusal.target {
            span.record("target", t.as_str());
        }
        let kind =
            if refusal.code == RefusalCode::Protocol { RefusalKind::Protocol } else { RefusalKind::Gate };
        self.metrics.refused(kind, refusal.code.as_str());
        let source = refusals::Source::Cgroup(origin.tagged_cgroup);
        if !self.refusals.admit(&source, Some(&origin.cgroup), &self.metrics) {
            return;
        }
        tracing::info!(code = %refusal.code, reason = %refusal.reason, "session refused");
        let mut rec = origin_fields(Record::new("session.refused"), origin)
            .field("target", &refusal.target)
            .field("identity", refusal.identity.as_deref())
            .field("decision", "deny")
            .field("code", refusal.code)
            .field("reason", &refusal.reason);
        if let Some(h) = hello.filter(|h| **h != Hello::default()) {
            rec = rec.field("hello", h);
        }
        if let Err(e) = self.audit.append_or_hold(rec) {
            tracing::error!(error = %e, "could not record a refused session");
        }
    }

    async fn session(self: Arc<Self>, id: String, origin: ConnOrigin, client: TcpStream, mut clock: Stamps) {
        // 2. The target.
        let target = match self.gate.target(&origin) {
            Ok(t) => t,
            Err(refusal) => {
                self.record_refusal(&origin, &refusal, None);
                return crate::protocol::tcp::reset(client);
            }
        };
        tracing::Span::current().record("target", target.name.as_str());
        // 3. The hello, under a deadline.
        let hello = tokio::select! {
            () = self.shutdown.cancelled() => return,
            r = tokio::time::timeout(HELLO_DEADLINE, self.protocols.hello(client, &target, &origin)) => r,
        };
        let refused = |reason: String| {
            let mut r = Refusal::new(RefusalCode::Protocol, reason);
            r.target = Some(target.name.clone());
            r
        };
        let mut greeting = match hello {
            Ok(Ok(Some(g))) => g,
            Ok(Ok(None)) => return,
            Ok(Err(e)) => return self.record_refusal(&origin, &refused(e.to_string()), None),
            Err(_) => {
                let why = format!(
                    "the client sent no {} hello within {HELLO_DEADLINE:?}",
                    target.protocol().as_str()
                );
                return self.record_refusal(&origin, &refused(why), None);
            }
        };
        clock.step(&self.metrics, SetupStep::Hello);
        // 4. The decision.
        let admission = tokio::select! {
            () = self.shutdown.cancelled() => {
                return greeting.refuse(&Refusal::new(RefusalCode::Unavailable, "warden is shutting down")).await;
            }
            r = self.gate.admit(&origin, &target, greeting.hello()) => r,
        };
        let admission = match admission {
            Ok(a) => a,
            Err(refusal) => {
                let hello = greeting.hello().clone();
                greeting.refuse(&refusal).await;
                return self.record_refusal(&origin, &refusal, Some(&hello));
            }
        };
        // The gate times its own steps (identity, policy, grant).
        clock.last = Instant::now();
        if let Some(i) = &admission.identity {
            tracing::Span::current().record("identity", i.name.as_str());
        }
        // 5. The record before the first byte: the upstream handshake (no payload) runs while session.start is
        // made durable; if the record cannot be, the session does not proceed and the upstream connection
        // is dropped unused.
        let started = Instant::now();
        let mut start = origin_fields(Record::new("session.start"), &origin)
            .field("session", &id)
            .field("identity", &admission.identity)
            .field("target", &target.name)
            .field("protocol", target.protocol().as_str())
            .field("grant", &admission.grant)
            .field("rule", &admission.terms.rule)
            .field("access", admission.terms.access.as_str())
            .field("decision", "allow")
            .field("reason", allow_reason(&admission));
        if *greeting.hello() != Hello::default() {
            start = start.field("hello", greeting.hello());
        }
        clock.step(&self.metrics, SetupStep::Record);
        let timed = |step, since: Instant| self.metrics.setup_step(step, since.elapsed());
        // The connect is polled first, so its SYN (or the pool checkout) is under way before this task makes
        // the record durable: a session that leads its batch does the fdatasync on its own thread
        // (`Audit::append_durable`), and the kernel completes the handshake meanwhile.
        let (connected, recorded) = tokio::join!(
            biased;
            async {
                let since = Instant::now();
                let r = greeting.connect(origin.dst, &admission.terms).await;
                timed(SetupStep::Connect, since);
                r
            },
            async {
                let since = Instant::now();
                let r = self.audit.append_durable(start).await;
                timed(SetupStep::Durable, since);
                r
            }
        );
        if let Err(e) = recorded {
            tracing::error!(error = %e, "session.start could not be recorded; refusing");
            self.metrics.refused(RefusalKind::Gate, RefusalCode::Unavailable.as_str());
            return greeting
                .refuse(&Refusal::new(RefusalCode::Unavailable, "the audit record cannot be written"))
                .await;
        }
        // 6. The session.
        let Admission { terms, identity, grant, until } = admission;
        let counters = Arc::new(Counters::default());
        let cut = Cut::new();
        self.sessions.insert(SessionInfo {
            session: id.clone(),
            pid: origin.pid,
            uid: origin.uid,
            cgroup: origin.cgroup.clone(),
            identity: identity.as_ref().map(|i| i.name.clone()),
            target: target.name.clone(),
            dst: origin.dst,
            grant: grant.clone(),
            started: SystemTime::now(),
            counters: counters.clone(),
            cut: cut.clone(),
        });
        self.metrics.session_started(&target.name, target.protocol().as_str());
        self.metrics.setup_step(SetupStep::Total, clock.accept + clock.running.elapsed());
        let end = if let Err(end) = connected {
            end
        } else {
            let authorize: Arc<dyn Authorize> = self.gate.clone();
            let session = Session {
                id: id.clone(),
                origin: origin.clone(),
                target: target.clone(),
                terms,
                identity: identity.clone(),
                grant: grant.clone(),
                audit: self.audit.clone(),
                counters: counters.clone(),
                cut: cut.clone(),
                authorize,
            };
            self.run(greeting, session, until).await
        };
        self.sessions.remove(&id);
        // 7. The end.
        let mut rec = origin_fields(Record::new("session.end"), &origin)
            .field("session", &id)
            .field("identity", &identity)
            .field("target", &target.name)
            .field("grant", &grant)
            .field("decision", "allow")
            .field("bytes_up", counters.up.load(Ordering::Relaxed))
            .field("bytes_down", counters.down.load(Ordering::Relaxed))
            .field("duration_ms", u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX))
            .field("reason", end.as_str());
        if let Some(detail) = end.detail() {
            rec = rec.field("detail", detail);
        }
        if let Some(relay) = counters.relay() {
            rec = rec.field("relay", relay);
        }
        tracing::info!(reason = end.as_str(), "session ended");
        self.metrics.session_ended(
            &target.name,
            target.protocol().as_str(),
            end.as_str(),
            started.elapsed(),
            counters.up.load(Ordering::Relaxed),
            counters.down.load(Ordering::Relaxed),
        );
        if let Err(e) = self.audit.append_or_hold(rec) {
            tracing::error!(error = %e, "could not record session.end");
        }
    }

    /// Runs the handler until the session ends on its own, or is cut from outside: then the handler has
    /// `CUT_GRACE` to tell the client why and return the cause.
    async fn run(&self, greeting: Greeting, session: Session, until: Option<GrantEnd>) -> End {
        let cut = session.cut.clone();
        let run = greeting.run(session);
        tokio::pin!(run);
        let until = until.unwrap_or_else(|| Box::pin(std::future::pending()));
        let outside = async {
            let end = tokio::select! {
                // Already cut (an operator's kill, a policy change through the registry).
                _ = cut.cut_with() => return,
                end = until => end,
                () = self.audit_failed.cancelled() => End::AuditUnavailable,
                () = self.shutdown.cancelled() => End::DaemonShutdown,
            };
            // The first cause wins: a cause given earlier through the registry stays.
            cut.cut(end);
        };
        tokio::select! {
            end = &mut run => return end,
            () = outside => {}
        }
        if let Ok(end) = tokio::time::timeout(CUT_GRACE, &mut run).await {
            return end;
        }
        tracing::warn!("the protocol handler did not end its cut session in time; dropped");
        cut.cause().cloned().unwrap_or(End::KilledByOperator)
    }
}

/// Failed accepts (EMFILE and friends, retried every 50 ms) logged at most once per `EVERY`, with how many
/// failed since the last line, so running out of descriptors does not also flood the log.
#[derive(Default)]
struct AcceptErrors {
    last: Option<Instant>,
    since: u64,
}

impl AcceptErrors {
    const EVERY: Duration = Duration::from_secs(10);

    fn warn(&mut self, e: &std::io::Error) {
        self.since += 1;
        if self.last.is_some_and(|t| t.elapsed() < Self::EVERY) {
            return;
        }
        tracing::warn!(error = %e, failures = self.since, "proxy accept failed (logged at most every 10 s)");
        self.last = Some(Instant::now());
        self.since = 0;
    }
}

/// Where a connection's set-up stands, for `warden_setup_step_seconds`: cheap monotonic stamps, no log lines.
struct Stamps {
    /// The kernel's connect() to the connection task running.
    accept: Duration,
    /// When the connection task started.
    running: Instant,
    /// The end of the last step timed.
    last: Instant,
}

impl Stamps {
    /// The step that ends now began where the last one ended.
    fn step(&mut self, metrics: &Metrics, step: SetupStep) {
        let now = Instant::now();
        metrics.setup_step(step, now - self.last);
        self.last = now;
    }
}

/// Why a session was allowed, in words.
fn allow_reason(a: &Admission) -> String {
    match &a.grant {
        Some(grant) => format!("rule `{}` grants {} (grant {grant})", a.terms.rule, a.terms.access.as_str()),
        None => "allowed".to_owned(),
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

/// A session id: unique across restarts (time-based prefix) and unguessable enough to not collide.
fn new_session_id() -> String {
    use std::sync::atomic::AtomicU64;
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("s{:x}{:05x}{:04x}", now.as_secs(), now.subsec_micros(), n & 0xffff)
}
