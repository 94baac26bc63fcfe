//! Prometheus metrics: one registry with every metric family the daemon exports, as typed fields, and the
//! calls the subsystems make when something happens (one call per event). `serve` exposes the registry
//! on `[metrics] listen` (off by default).
//!
//! This module is at the bottom of the layering: it imports no other subsystem. Subsystems get an
//! `Arc<Metrics>` and call it; values that are cheaper to read than to track (BPF map occupancy, live
//! grants, the audit queue) are read at each scrape by a [`Sampler`] the daemon installs.
//!
//! Label values are bounded: targets and identities come from the policy and the config, codes and
//! outcomes from closed sets in the code. Never a session id, a pid or an address.

pub mod serve;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::{Family, MetricConstructor};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

/// Reads sampled values into the metrics just before each scrape.
pub type Sampler = Box<dyn Fn(&Metrics) + Send + Sync>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SessionLabels {
    pub target: String,
    pub protocol: String,
    /// Why the session ended (`session.end` reason): `closed`, `grant_expired`, `killed_by_operator`, ...
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TargetLabels {
    pub target: String,
    pub protocol: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BytesLabels {
    pub target: String,
    pub protocol: String,
    /// `up` (client to upstream) or `down`.
    pub direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabels {
    pub kind: &'static str,
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IdentityOutcome {
    pub identity: String,
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IdentityLabels {
    pub identity: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TargetOnly {
    pub target: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MapLabels {
    pub map: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    pub version: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CauseLabels {
    pub cause: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StepLabels {
    pub step: &'static str,
}

/// One step of an admitted connection's set-up, in the order they happen (`warden_setup_step_seconds`).
/// `Durable` and `Connect` overlap (the upstream connect runs while `session.start` is made durable);
/// `Queue` and `Batch` are parts of `Durable` (the rest is the wake-ups handing the acknowledgement back).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SetupStep {
    /// The kernel's `connect()` (the origin's time) to the proxy's connection task running: the redirect,
    /// the handshake with the listener, `accept` and the task's first poll.
    Accept,
    /// The origin lookup: the kernel map read and the cgroup path.
    Origin,
    /// The target and the hello (what the target's handler reads before the decision).
    Hello,
    /// The binding and its verified identity (cached token, or a token request).
    Identity,
    /// The policy decision (and a PostgreSQL target's database check).
    Policy,
    /// The grant (a live one, a new one, or a wait for approval).
    Grant,
    /// Building the `session.start` record.
    Record,
    /// `session.start` queued until the writer takes its batch.
    Queue,
    /// The writer's batch: serialisation, hash chain, write and fdatasync.
    Batch,
    /// `session.start` appended until durable (queue + batch + the hand-off back).
    Durable,
    /// The handler's upstream connect.
    Connect,
    /// The kernel's `connect()` to the handler starting its session.
    Total,
}

impl SetupStep {
    pub const ALL: [SetupStep; 12] = [
        Self::Accept,
        Self::Origin,
        Self::Hello,
        Self::Identity,
        Self::Policy,
        Self::Grant,
        Self::Record,
        Self::Queue,
        Self::Batch,
        Self::Durable,
        Self::Connect,
        Self::Total,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Accept => "accept",
            Self::Origin => "origin",
            Self::Hello => "hello",
            Self::Identity => "identity",
            Self::Policy => "policy",
            Self::Grant => "grant",
            Self::Record => "record",
            Self::Queue => "queue",
            Self::Batch => "batch",
            Self::Durable => "durable",
            Self::Connect => "connect",
            Self::Total => "total",
        }
    }
}

/// Who refused a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalKind {
    /// The kernel programs (connect, sendmsg, socket, bind), from the event ring.
    Kernel,
    /// The proxy's gate: binding, identity, policy, grant, overload, no origin.
    Gate,
    /// A protocol handler refused a command or a login in the protocol's own terms.
    Protocol,
}

impl RefusalKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Kernel => "kernel",
            Self::Gate => "gate",
            Self::Protocol => "protocol",
        }
    }
}

/// The buckets every histogram of one family is made with.
#[derive(Clone)]
pub struct Buckets(Vec<f64>);

impl MetricConstructor<Histogram> for Buckets {
    fn new_metric(&self) -> Histogram {
        Histogram::new(self.0.iter().copied())
    }
}

/// Every metric family. Cheap to share (`Arc<Metrics>`); each method is one event.
pub struct Metrics {
    registry: Registry,
    sampler: Mutex<Option<Sampler>>,

    pub sessions: Family<SessionLabels, Counter>,
    pub sessions_live: Family<TargetLabels, Gauge>,
    pub session_duration: Family<TargetLabels, Histogram, Buckets>,
    pub session_bytes: Family<BytesLabels, Counter>,
    pub refusals: Family<RefusalLabels, Counter>,

    pub token_fetches: Family<IdentityOutcome, Counter>,
    pub token_fetch_duration: Family<IdentityLabels, Histogram, Buckets>,
    pub token_verifications: Family<IdentityOutcome, Counter>,

    pub grants_live: Gauge,
    pub grants_pending: Gauge,
    pub grants_issued: Family<TargetOnly, Counter>,
    pub grants_expired: Family<TargetOnly, Counter>,
    pub grants_revoked: Family<TargetOnly, Counter>,

    pub audit_queue_depth: Gauge,
    pub audit_queue_capacity: Gauge,
    pub audit_records: Counter,
    pub audit_bytes: Counter,
    pub audit_fsync_duration: Histogram,
    /// Records per fdatasync'd batch (group commit).
    pub audit_batch_records: Histogram,

    pub setup_steps: Family<StepLabels, Histogram, Buckets>,
    /// `setup_steps`' histograms, resolved once, indexed by `SetupStep as usize` (no lookup per connection).
    setup_step: Vec<Histogram>,

    pub bpf_map_entries: Family<MapLabels, Gauge>,
    pub events_lost: Family<CauseLabels, Counter>,
    /// 1, labelled with the version: which build a scrape came from.
    pub build_info: Family<BuildLabels, Gauge>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh registry with every family registered under the `warden_` prefix.
    pub fn new() -> Self {
        // Sessions last from milliseconds to hours; token requests and fsyncs from sub-millisecond up.
        let session = Buckets(exponential_buckets(0.01, 4.0, 12).collect());
        let request = Buckets(exponential_buckets(0.001, 2.5, 12).collect());
        // Set-up steps take from a microsecond to (a token request, an approval) seconds.
        let step = Buckets(exponential_buckets(0.000_001, 2.0, 24).collect());
        let mut m = Self {
            registry: Registry::with_prefix("warden"),
            sampler: Mutex::new(None),
            sessions: Family::default(),
            sessions_live: Family::default(),
            session_duration: Family::new_with_constructor(session),
            session_bytes: Family::default(),
            refusals: Family::default(),
            token_fetches: Family::default(),
            token_fetch_duration: Family::new_with_constructor(request),
            token_verifications: Family::default(),
            grants_live: Gauge::default(),
            grants_pending: Gauge::default(),
            grants_issued: Family::default(),
            grants_expired: Family::default(),
            grants_revoked: Family::default(),
            audit_queue_depth: Gauge::default(),
            audit_queue_capacity: Gauge::default(),
            audit_records: Counter::default(),
            audit_bytes: Counter::default(),
            // 10 µs to about 0.4 s in steps of 25 %, so a p50 read from the buckets (the bench sets it beside a
            // bare fdatasync's) is within a few per cent.
            audit_fsync_duration: Histogram::new(exponential_buckets(0.000_01, 1.25, 48)),
            audit_batch_records: Histogram::new(exponential_buckets(1.0, 2.0, 13)),
            setup_steps: Family::new_with_constructor(step),
            setup_step: Vec::new(),
            bpf_map_entries: Family::default(),
            events_lost: Family::default(),
            build_info: Family::default(),
        };
        m.build_info.get_or_create(&BuildLabels { version: env!("CARGO_PKG_VERSION") }).set(1);
        m.setup_step = SetupStep::ALL
            .iter()
            .map(|s| m.setup_steps.get_or_create(&StepLabels { step: s.as_str() }).clone())
            .collect();
        m.register()
    }

    fn register(mut self) -> Self {
        let r = &mut self.registry;
        r.register(
            "sessions",
            "Proxied sessions that ended, by target, protocol and outcome",
            self.sessions.clone(),
        );
        r.register("sessions_live", "Sessions running now", self.sessions_live.clone());
        r.register_with_unit(
            "session_duration",
            "How long proxied sessions lasted",
            Unit::Seconds,
            self.session_duration.clone(),
        );
        r.register_with_unit(
            "session",
            "Bytes relayed by ended sessions, by direction (up: client to upstream)",
            Unit::Bytes,
            self.session_bytes.clone(),
        );
        r.register(
            "refusals",
            "Refused connections, by who refused (kernel, gate, protocol) and code",
            self.refusals.clone(),
        );
        r.register(
            "token_fetches",
            "Client-credentials token requests to the identity provider, by outcome",
            self.token_fetches.clone(),
        );
        r.register_with_unit(
            "token_fetch_duration",
            "Time a token request took, discovery and retries included",
            Unit::Seconds,
            self.token_fetch_duration.clone(),
        );
        r.register(
            "token_verifications",
            "Access tokens verified against the issuer's keys, by outcome (ok or the rejection reason)",
            self.token_verifications.clone(),
        );
        r.register("grants_live", "Active grants", self.grants_live.clone());
        r.register("grants_pending", "Grants waiting for approval", self.grants_pending.clone());
        r.register(
            "grants_issued",
            "Grants issued (first connection or operator)",
            self.grants_issued.clone(),
        );
        r.register(
            "grants_expired",
            "Grants that reached their TTL or lapsed unapproved",
            self.grants_expired.clone(),
        );
        r.register(
            "grants_revoked",
            "Grants revoked by an operator or a policy change",
            self.grants_revoked.clone(),
        );
        r.register(
            "audit_queue_depth",
            "Records waiting for the audit writer",
            self.audit_queue_depth.clone(),
        );
        r.register(
            "audit_queue_capacity",
            "Records the audit queue holds before new sessions are refused",
            self.audit_queue_capacity.clone(),
        );
        r.register(
            "audit_records",
            "Audit records written (checkpoints included)",
            self.audit_records.clone(),
        );
        r.register_with_unit(
            "audit_written",
            "Bytes written to the audit files",
            Unit::Bytes,
            self.audit_bytes.clone(),
        );
        r.register_with_unit(
            "audit_fsync_duration",
            "Time one fdatasync of the audit file took",
            Unit::Seconds,
            self.audit_fsync_duration.clone(),
        );
        r.register(
            "audit_batch_records",
            "Records written per fdatasync of the audit file (group commit)",
            self.audit_batch_records.clone(),
        );
        r.register_with_unit(
            "setup_step",
            "Time each step of an admitted connection's set-up took (accept, origin, hello, identity, policy, \
             grant, record, queue, batch, durable, connect, total)",
            Unit::Seconds,
            self.setup_steps.clone(),
        );
        r.register(
            "bpf_map_entries",
            "Entries in the kernel programs' maps (tags, origins, targets, allow)",
            self.bpf_map_entries.clone(),
        );
        r.register(
            "events_lost",
            "Kernel refusals not recorded one by one (ring_full, queue_full, rate_limited); all were enforced",
            self.events_lost.clone(),
        );
        r.register("build_info", "The running warden's version (always 1)", self.build_info.clone());
        self
    }

    /// Installs the function that reads sampled values before each scrape (the daemon's).
    pub fn set_sampler(&self, sampler: Sampler) {
        *self.sampler.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(sampler);
    }

    /// Samples, then encodes every family in the Prometheus text format (0.0.4), or OpenMetrics text.
    pub fn encode(&self, openmetrics: bool) -> String {
        if let Some(sample) = &*self.sampler.lock().unwrap_or_else(std::sync::PoisonError::into_inner) {
            sample(self);
        }
        let mut out = String::new();
        let encoded = if openmetrics {
            prometheus_client::encoding::text::encode(&mut out, &self.registry)
        } else {
            prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)
        };
        // Writing to a String cannot fail; an encoder error would be a bug in a label value.
        if let Err(e) = encoded {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        out
    }

    // ---- proxy ----

    /// A session passed the gate and its `session.start` is durable.
    pub fn session_started(&self, target: &str, protocol: &str) {
        self.sessions_live.get_or_create(&target_labels(target, protocol)).inc();
    }

    /// A session ended (`session.end` written).
    pub fn session_ended(
        &self,
        target: &str,
        protocol: &str,
        outcome: &str,
        took: Duration,
        up: u64,
        down: u64,
    ) {
        let labels = target_labels(target, protocol);
        self.sessions_live.get_or_create(&labels).dec();
        self.session_duration.get_or_create(&labels).observe(took.as_secs_f64());
        self.sessions
            .get_or_create(&SessionLabels {
                target: target.to_owned(),
                protocol: protocol.to_owned(),
                outcome: outcome.to_owned(),
            })
            .inc();
        for (direction, n) in [("up", up), ("down", down)] {
            let l = BytesLabels { target: target.to_owned(), protocol: protocol.to_owned(), direction };
            self.session_bytes.get_or_create(&l).inc_by(n);
        }
    }

    /// A connection was refused.
    pub fn refused(&self, kind: RefusalKind, code: &str) {
        self.refusals.get_or_create(&RefusalLabels { kind: kind.as_str(), code: code.to_owned() }).inc();
    }

    // ---- identity ----

    /// One token request (with its retries) finished: `outcome` is `ok` or the failure's reason.
    pub fn token_fetched(&self, identity: &str, outcome: &str, took: Duration) {
        let id = IdentityLabels { identity: identity.to_owned() };
        self.token_fetch_duration.get_or_create(&id).observe(took.as_secs_f64());
        self.token_fetches
            .get_or_create(&IdentityOutcome { identity: identity.to_owned(), outcome: outcome.to_owned() })
            .inc();
    }

    /// One token verified: `outcome` is `ok` or the rejection reason (`expired`, `bad_signature`, ...).
    pub fn token_verified(&self, identity: &str, outcome: &str) {
        self.token_verifications
            .get_or_create(&IdentityOutcome { identity: identity.to_owned(), outcome: outcome.to_owned() })
            .inc();
    }

    // ---- grants ----

    pub fn grant_issued(&self, target: &str) {
        self.grants_issued.get_or_create(&TargetOnly { target: target.to_owned() }).inc();
    }

    pub fn grant_expired(&self, target: &str) {
        self.grants_expired.get_or_create(&TargetOnly { target: target.to_owned() }).inc();
    }

    pub fn grant_revoked(&self, target: &str) {
        self.grants_revoked.get_or_create(&TargetOnly { target: target.to_owned() }).inc();
    }

    // ---- audit ----

    /// One batch reached the file: `records` records in `bytes` bytes.
    pub fn audit_written(&self, records: u64, bytes: u64) {
        self.audit_records.inc_by(records);
        self.audit_bytes.inc_by(bytes);
    }

    pub fn audit_synced(&self, took: Duration) {
        self.audit_fsync_duration.observe(took.as_secs_f64());
    }

    /// One fdatasync made `records` records durable (the records written since the previous one).
    pub fn audit_batch(&self, records: u64) {
        #[expect(clippy::cast_precision_loss, reason = "a batch holds far fewer than 2^52 records")]
        self.audit_batch_records.observe(records as f64);
    }

    // ---- kernel ----

    /// Kernel events that were not recorded one by one.
    pub fn events_lost(&self, cause: &'static str, n: u64) {
        if n > 0 {
            self.events_lost.get_or_create(&CauseLabels { cause }).inc_by(n);
        }
    }

    /// Raises a counter kept by the kernel (e.g. `ring_full`, since the map was created) to `total`.
    pub fn events_lost_total(&self, cause: &'static str, total: u64) {
        let c = self.events_lost.get_or_create(&CauseLabels { cause });
        let now = c.get();
        if total > now {
            c.inc_by(total - now);
        }
    }

    pub fn bpf_map(&self, map: &'static str, entries: usize) {
        self.bpf_map_entries
            .get_or_create(&MapLabels { map })
            .set(i64::try_from(entries).unwrap_or(i64::MAX));
    }
}

impl Metrics {
    /// One set-up step of one connection took `took`.
    pub fn setup_step(&self, step: SetupStep, took: Duration) {
        if let Some(h) = self.setup_step.get(step as usize) {
            h.observe(took.as_secs_f64());
        }
    }
}

fn target_labels(target: &str, protocol: &str) -> TargetLabels {
    TargetLabels { target: target.to_owned(), protocol: protocol.to_owned() }
}

/// A shared handle for subsystems built without a served registry (tests, tools).
pub fn unserved() -> Arc<Metrics> {
    Arc::new(Metrics::new())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_prometheus_conventions() {
        let m = Metrics::new();
        m.session_started("db", "tcp");
        m.session_ended("db", "tcp", "closed", Duration::from_millis(1500), 10, 20);
        m.refused(RefusalKind::Gate, "policy");
        m.token_fetched("bot", "ok", Duration::from_millis(30));
        m.token_verified("bot", "ok");
        m.grant_issued("db");
        m.audit_written(3, 300);
        m.audit_synced(Duration::from_micros(400));
        m.audit_batch(3);
        m.setup_step(SetupStep::Durable, Duration::from_micros(150));
        m.events_lost_total("ring_full", 7);
        m.events_lost_total("ring_full", 5);
        m.bpf_map("tags", 2);
        let text = m.encode(false);
        for line in [
            "warden_sessions_total{target=\"db\",protocol=\"tcp\",outcome=\"closed\"} 1",
            "warden_sessions_live{target=\"db\",protocol=\"tcp\"} 0",
            "warden_session_duration_seconds_count{target=\"db\",protocol=\"tcp\"} 1",
            "warden_session_bytes_total{target=\"db\",protocol=\"tcp\",direction=\"down\"} 20",
            "warden_refusals_total{kind=\"gate\",code=\"policy\"} 1",
            "warden_token_fetches_total{identity=\"bot\",outcome=\"ok\"} 1",
            "warden_token_fetch_duration_seconds_count{identity=\"bot\"} 1",
            "warden_token_verifications_total{identity=\"bot\",outcome=\"ok\"} 1",
            "warden_grants_issued_total{target=\"db\"} 1",
            "warden_audit_records_total 3",
            "warden_audit_written_bytes_total 300",
            "warden_audit_fsync_duration_seconds_count 1",
            "warden_audit_batch_records_sum 3.0",
            "warden_setup_step_seconds_count{step=\"durable\"} 1",
            "warden_setup_step_seconds_count{step=\"accept\"} 0",
            "warden_events_lost_total{cause=\"ring_full\"} 7",
            "warden_bpf_map_entries{map=\"tags\"} 2",
            concat!("warden_build_info{version=\"", env!("CARGO_PKG_VERSION"), "\"} 1"),
        ] {
            assert!(text.lines().any(|l| l == line), "missing `{line}` in\n{text}");
        }
        let om = m.encode(true);
        assert!(om.ends_with("# EOF\n"), "{om}");
    }

    #[test]
    fn the_sampler_runs_before_each_scrape() {
        let m = Metrics::new();
        m.set_sampler(Box::new(|m: &Metrics| {
            m.grants_live.inc();
        }));
        assert!(m.encode(false).contains("warden_grants_live 1\n"));
        assert!(m.encode(false).contains("warden_grants_live 2\n"));
    }
}
