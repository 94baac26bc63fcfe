//! Grants: identity + cgroup + target + access bound to an expiry. Every session runs under a live
//! grant; when the grant ends (expiry, revocation, a policy that no longer allows it) all its sessions
//! are told at once.
//!
//! # Semantics (what an operator can rely on)
//! - A grant is keyed by [`GrantKey`]: identity, client id, cgroup (the task: `warden exec` makes one
//!   per task), target and access. Many sessions share one grant.
//! - **The first allowed connection issues the grant** (`grant.issued`), lasting the rule's TTL from
//!   that moment. `warden grant issue` issues one ahead of time instead ([`Grants::issue`]).
//! - **No silent renewal.** Once a task's grant for a target has ended (expired, revoked, or ended by a
//!   policy change), that identity + cgroup + target is *spent*: later connections are refused
//!   ([`GrantRefusal::Spent`]) until an operator issues a fresh grant. A new task (a new cgroup) gets
//!   its own first grant. Spent marks are stored with the grants and are dropped only by
//!   [`Grants::forget_cgroup`] (the daemon calls it when a task's cgroup goes away or is untagged).
//! - **Approval.** With `approval: required` the first connection creates a *pending* grant
//!   (`grant.issued` with status `pending`) and is held up to [`GrantsOptions::approval_wait`]; then it
//!   is refused with "pending approval (grant ID); run `warden grant approve ID`". A later connection
//!   waits on the same pending grant. The TTL starts at approval (`grant.approved`). A pending grant
//!   nobody approves within [`GrantsOptions::pending_max`] lapses (`grant.expired`, reason
//!   `not approved`) without spending the task. An operator's `issue` counts as approval. Revoking a
//!   pending grant denies it and spends the task.
//! - **Expiry** is recorded once (`grant.expired`) and resolves every [`Lease::ended`] at once.
//!   **Revocation** (`grant.revoked`) does the same, immediately.
//! - **Restarts extend nothing.** Grants and spent marks live in `state_dir/grants.json` (0600, written
//!   atomically); on open, grants keep their original expiry, those that expired while the daemon was
//!   down are dropped with `grant.expired`, and no grant is left with more time than its TTL even if
//!   the wall clock went backwards.
//! - **Policy changes** ([`Grants::revalidate`]): a grant the new policy no longer allows ends
//!   (`grant.revoked` by `policy`, [`GrantEnd::PolicyChanged`]); one whose rule now has a shorter TTL is
//!   shortened; none is lengthened.
//!
//! A grant's expiry is kept in one place, its [`Expiry`], which the table and every lease share. The
//! operator's view is `view.rs`, the on-disk form `store.rs`, the records `records.rs`.

mod records;
mod store;
mod view;

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};
use tokio::sync::{Notify, watch};

pub use crate::clock::{Clock, SystemClock, TestClock};
use records::{expired_record, issued_record};
pub use view::{GrantView, table};
use view::{status, view};

use crate::audit::{Audit, AuditError, Record};
use crate::policy::{Access, Approval, Decision, Policy, Subject, Terms};
use crate::timestamp;
use store::restore;

/// How long timers sleep at most before looking at the wall clock again (it may jump).
const MAX_NAP: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum GrantError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path} is not a valid grants file ({source}); fix it, or move it aside to forget every grant and spent task"
    )]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path} has format version {found}, which this warden does not know; upgrade warden")]
    Version { path: PathBuf, found: u32 },
    #[error("cannot write {path}: {source}; check that state_dir is writable by the daemon")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no live grant has id {id}; see `warden grants`")]
    NotFound { id: String },
    #[error("grant {id} is not waiting for approval (it is {status})")]
    NotPending { id: String, status: String },
    #[error("grant {id} already covers this ({status}); revoke it first with `warden grant revoke {id}`")]
    AlreadyExists { id: String, status: String },
    #[error("cannot record the grant in the audit log: {0}")]
    Audit(#[source] AuditError),
}

/// Why a connection gets no grant. The messages are what the client and the audit record show.
#[derive(Debug, thiserror::Error)]
pub enum GrantRefusal {
    #[error(
        "grant {id} for {target} {how} at {at}; a task's grant does not renew itself: an operator can issue a fresh one with `warden grant issue`"
    )]
    Spent { id: String, target: String, how: String, at: String },
    #[error("pending approval (grant {id}); run `warden grant approve {id}`")]
    PendingApproval { id: String },
    #[error("grant {id} was not approved within {waited_secs}s and lapsed; connect again to ask again")]
    Lapsed { id: String, waited_secs: u64 },
    #[error("cannot record the grant, so the connection does not proceed: {0}")]
    Audit(#[source] AuditError),
    #[error("cannot store the grant, so the connection does not proceed: {0}")]
    Store(#[source] GrantError),
}

/// Why a grant ended; every [`Lease`] under it sees the same.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GrantEnd {
    Expired,
    Revoked { by: String },
    PolicyChanged { reason: String },
}

impl std::fmt::Display for GrantEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Expired => f.write_str("grant expired"),
            Self::Revoked { by } => write!(f, "grant revoked by {by}"),
            Self::PolicyChanged { reason } => write!(f, "grant ended by a policy change: {reason}"),
        }
    }
}

/// What a grant is for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct GrantKey {
    /// The identity's name in the config (`[identity.NAME]`).
    pub identity: String,
    pub client_id: String,
    pub cgroup: String,
    pub target: String,
    pub access: Access,
}

#[derive(Debug, Clone)]
pub struct GrantsOptions {
    /// How long a connection is held waiting for `warden grant approve`.
    pub approval_wait: Duration,
    /// How long a pending grant waits for approval before it lapses.
    pub pending_max: Duration,
}

impl Default for GrantsOptions {
    fn default() -> Self {
        Self { approval_wait: Duration::from_secs(60), pending_max: Duration::from_secs(3600) }
    }
}

/// What a grant's sessions watch.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    /// Issued, its `grant.issued` record not yet durable: nothing runs under it yet.
    Recording,
    Pending,
    /// Its expiry is in the grant's [`Expiry`].
    Active,
    Ended(GrantEnd),
}

/// When a grant expires (`None` while pending): the one place its expiry is kept, shared by the grant
/// table and every lease, so a policy change that brings it forward is seen by all at once.
#[derive(Debug, Default)]
struct Expiry(AtomicU64);

impl Expiry {
    fn new(at: Option<SystemTime>) -> Arc<Self> {
        let e = Arc::new(Self::default());
        e.set(at);
        e
    }

    fn get(&self) -> Option<SystemTime> {
        match self.0.load(Ordering::Acquire) {
            0 => None,
            n => Some(SystemTime::UNIX_EPOCH + Duration::from_nanos(n)),
        }
    }

    fn set(&self, at: Option<SystemTime>) {
        let n = at.map_or(0, |t| {
            let nanos = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_nanos();
            u64::try_from(nanos).unwrap_or(u64::MAX).max(1)
        });
        self.0.store(n, Ordering::Release);
    }
}

#[derive(Debug)]
struct Grant {
    id: String,
    key: GrantKey,
    rule: String,
    ttl: Duration,
    mask: Vec<String>,
    commands: Option<Vec<String>>,
    approval: Approval,
    issued_by: String,
    requested_at: SystemTime,
    expiry: Arc<Expiry>,
    phase: watch::Sender<Phase>,
    sessions: Arc<AtomicUsize>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Task {
    identity: String,
    cgroup: String,
    target: String,
}

impl Task {
    fn of(key: &GrantKey) -> Self {
        Self { identity: key.identity.clone(), cgroup: key.cgroup.clone(), target: key.target.clone() }
    }
}

#[derive(Debug, Clone)]
struct Spent {
    grant: String,
    how: String,
    ended_at: SystemTime,
}

#[derive(Debug, Default)]
struct State {
    grants: BTreeMap<String, Grant>,
    spent: HashMap<Task, Spent>,
}

struct Inner {
    path: PathBuf,
    audit: Audit,
    clock: Arc<dyn Clock>,
    options: GrantsOptions,
    state: Mutex<State>,
    /// Wakes the expiry task when a deadline moves.
    wake: Arc<Notify>,
    ids: AtomicU64,
}

/// The grant table; cheap to clone. Needs a tokio runtime: opening it starts the expiry task, which
/// stops when the last handle is dropped.
#[derive(Clone)]
pub struct Grants {
    inner: Arc<Inner>,
}

/// One session's hold on a grant. Dropping it ends the session's hold (the session count falls).
#[derive(Debug)]
pub struct Lease {
    pub grant_id: String,
    pub access: Access,
    pub rule: String,
    rx: watch::Receiver<Phase>,
    expiry: Arc<Expiry>,
    clock: Arc<dyn Clock>,
    sessions: Arc<AtomicUsize>,
}

impl Lease {
    /// When the grant expires now (a policy change may bring it forward).
    pub fn expires_at(&self) -> SystemTime {
        match &*self.rx.borrow() {
            Phase::Active => self.expiry.get().unwrap_or_else(|| self.clock.now()),
            Phase::Recording | Phase::Pending | Phase::Ended(_) => self.clock.now(),
        }
    }

    /// Resolves when the grant ends, with why. Every lease of the grant resolves at the same moment.
    pub async fn ended(&mut self) -> GrantEnd {
        loop {
            if let Phase::Ended(end) = &*self.rx.borrow_and_update() {
                return end.clone();
            }
            if self.rx.changed().await.is_err() {
                break;
            }
        }
        // The grant table is gone (daemon shutting down): hold no longer than the grant would have.
        loop {
            let left = self.expires_at().duration_since(self.clock.now()).unwrap_or_default();
            if left.is_zero() {
                return GrantEnd::Expired;
            }
            tokio::time::sleep(left.min(MAX_NAP)).await;
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.sessions.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Grants {
    /// Opens `state_dir/grants.json` with the default options.
    pub fn open(state_dir: &Path, audit: Audit, clock: Arc<dyn Clock>) -> Result<Self, GrantError> {
        Self::open_with(state_dir, audit, clock, GrantsOptions::default())
    }

    /// Opens the stored grants: expired ones are dropped (`grant.expired`), the rest keep their
    /// original expiry. Starts the expiry task.
    pub fn open_with(
        state_dir: &Path,
        audit: Audit,
        clock: Arc<dyn Clock>,
        options: GrantsOptions,
    ) -> Result<Self, GrantError> {
        let path = store::path(state_dir);
        if !state_dir.is_dir() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(state_dir)
                .map_err(|source| GrantError::Write { path: state_dir.to_path_buf(), source })?;
        }
        let stored = store::read(&path)?;
        let now = clock.now();
        let mut state = State::default();
        for s in stored.spent {
            let ended_at = timestamp::parse(&s.ended_at).unwrap_or(now);
            let task = Task { identity: s.identity, cgroup: s.cgroup, target: s.target };
            state.spent.insert(task, Spent { grant: s.grant, how: s.how, ended_at });
        }
        let mut records = Vec::new();
        for g in stored.grants {
            let Some(grant) = restore(g, now) else { continue };
            match grant.expiry.get() {
                Some(at) if at <= now => {
                    records.push(expired_record(&grant, "expired while the daemon was down"));
                    state.spent.insert(
                        Task::of(&grant.key),
                        Spent { grant: grant.id.clone(), how: "expired".into(), ended_at: at },
                    );
                }
                None if grant.requested_at + options.pending_max <= now => {
                    records.push(expired_record(&grant, "not approved"));
                }
                _ => {
                    state.grants.insert(grant.id.clone(), grant);
                }
            }
        }
        let inner = Arc::new(Inner {
            path,
            audit,
            clock,
            options,
            state: Mutex::new(state),
            wake: Arc::new(Notify::new()),
            ids: AtomicU64::new(0),
        });
        for r in records {
            inner.record(r);
        }
        inner.persist(&inner.lock())?;
        tokio::spawn(expiry_task(Arc::downgrade(&inner), inner.wake.clone()));
        Ok(Self { inner })
    }

    /// Finds the live grant for `key`, or issues one under `terms` (which the caller has just had from
    /// the policy). Waits for approval when the terms require it. Refuses when the task's grant for
    /// this target was spent (see the module docs).
    pub async fn acquire(&self, key: GrantKey, terms: &Terms) -> Result<Lease, GrantRefusal> {
        let inner = &self.inner;
        let (id, rx, issued) = {
            let mut state = inner.lock();
            let now = inner.clock.now();
            inner.expire_due(&mut state, now);
            if let Some(g) = state.grants.values().find(|g| g.key == key) {
                (g.id.clone(), g.phase.subscribe(), None)
            } else if let Some(spent) = state.spent.get(&Task::of(&key)) {
                return Err(GrantRefusal::Spent {
                    id: spent.grant.clone(),
                    target: key.target.clone(),
                    how: spent.how.clone(),
                    at: timestamp::format_system(spent.ended_at),
                });
            } else {
                let pending = terms.approval == Approval::Required;
                let grant = inner.new_grant(&state, key, terms, "auto".into(), now, pending);
                let record = issued_record(&grant);
                let rx = grant.phase.subscribe();
                let id = grant.id.clone();
                state.grants.insert(id.clone(), grant);
                if let Err(e) = inner.persist(&state) {
                    state.grants.remove(&id);
                    return Err(GrantRefusal::Store(e));
                }
                inner.wake.notify_one();
                (id, rx, Some(record))
            }
        };
        if let Some(record) = issued {
            if let Err(e) = inner.audit.append_durable(record).await {
                // No record, no grant.
                inner.end(&id, &GrantEnd::Revoked { by: "warden (audit unavailable)".into() }, false);
                return Err(GrantRefusal::Audit(e));
            }
            inner.recorded(&id);
        }
        self.lease_when_active(id, rx).await
    }

    async fn lease_when_active(
        &self,
        id: String,
        mut rx: watch::Receiver<Phase>,
    ) -> Result<Lease, GrantRefusal> {
        let inner = &self.inner;
        let wait = rx.wait_for(|p| !matches!(p, Phase::Recording | Phase::Pending));
        let phase = match tokio::time::timeout(inner.options.approval_wait, wait).await {
            Err(_) => return Err(GrantRefusal::PendingApproval { id }),
            Ok(Err(_)) => Phase::Ended(GrantEnd::Expired),
            Ok(Ok(p)) => p.clone(),
        };
        match phase {
            Phase::Active => {
                let state = inner.lock();
                let Some(g) = state.grants.get(&id) else {
                    return Err(self.refusal_for_ended(&id));
                };
                g.sessions.fetch_add(1, Ordering::Relaxed);
                Ok(Lease {
                    grant_id: id,
                    access: g.key.access,
                    rule: g.rule.clone(),
                    rx,
                    expiry: g.expiry.clone(),
                    clock: inner.clock.clone(),
                    sessions: g.sessions.clone(),
                })
            }
            Phase::Recording | Phase::Pending | Phase::Ended(_) => Err(self.refusal_for_ended(&id)),
        }
    }

    fn refusal_for_ended(&self, id: &str) -> GrantRefusal {
        let state = self.inner.lock();
        match state.spent.values().find(|s| s.grant == id) {
            Some(s) => GrantRefusal::Spent {
                id: id.to_owned(),
                target: state
                    .spent
                    .iter()
                    .find(|(_, v)| v.grant == id)
                    .map(|(t, _)| t.target.clone())
                    .unwrap_or_default(),
                how: s.how.clone(),
                at: timestamp::format_system(s.ended_at),
            },
            None => GrantRefusal::Lapsed {
                id: id.to_owned(),
                waited_secs: self.inner.options.pending_max.as_secs(),
            },
        }
    }

    /// Live and pending grants, oldest first.
    pub fn list(&self) -> Vec<GrantView> {
        let state = self.inner.lock();
        let now = self.inner.clock.now();
        let mut grants: Vec<&Grant> = state.grants.values().collect();
        grants.sort_by_key(|g| (g.requested_at, &g.id));
        grants.into_iter().map(|g| view(g, now)).collect()
    }

    /// Issues a grant ahead of the first connection (`warden grant issue`), active at once: an
    /// operator issuing it is its approval. Works for spent tasks too: this is the "fresh grant".
    pub async fn issue(&self, key: GrantKey, terms: &Terms, by: &str) -> Result<GrantView, GrantError> {
        let inner = &self.inner;
        let (id, record, v) = {
            let mut state = inner.lock();
            let now = inner.clock.now();
            inner.expire_due(&mut state, now);
            if let Some(g) = state.grants.values().find(|g| g.key == key) {
                return Err(GrantError::AlreadyExists { id: g.id.clone(), status: status(g).into() });
            }
            let grant = inner.new_grant(&state, key, terms, format!("operator {by}"), now, false);
            let record = issued_record(&grant);
            let v = view(&grant, now);
            let id = grant.id.clone();
            state.grants.insert(id.clone(), grant);
            if let Err(e) = inner.persist(&state) {
                state.grants.remove(&id);
                return Err(e);
            }
            inner.wake.notify_one();
            (id, record, v)
        };
        if let Err(e) = inner.audit.append_durable(record).await {
            inner.end(&id, &GrantEnd::Revoked { by: "warden (audit unavailable)".into() }, false);
            return Err(GrantError::Audit(e));
        }
        inner.recorded(&id);
        Ok(v)
    }

    /// Approves a pending grant (`warden grant approve ID`): its TTL starts now and held connections
    /// proceed.
    pub async fn approve(&self, id: &str, by: &str) -> Result<GrantView, GrantError> {
        let inner = &self.inner;
        let (record, v) = {
            let mut state = inner.lock();
            let now = inner.clock.now();
            inner.expire_due(&mut state, now);
            let g = state.grants.get_mut(id).ok_or_else(|| GrantError::NotFound { id: id.to_owned() })?;
            if g.expiry.get().is_some() {
                return Err(GrantError::NotPending { id: id.to_owned(), status: status(g).into() });
            }
            let expires_at = now + g.ttl;
            g.expiry.set(Some(expires_at));
            let record = Record::new("grant.approved")
                .field("grant", &g.id)
                .field("by", by)
                .field("identity", &g.key.identity)
                .field("cgroup", &g.key.cgroup)
                .field("target", &g.key.target)
                .field("access", g.key.access.as_str())
                .field("expires_at", timestamp::format_system(expires_at));
            let v = view(g, now);
            if let Err(e) = inner.persist(&state) {
                if let Some(g) = state.grants.get_mut(id) {
                    g.expiry.set(None);
                }
                return Err(e);
            }
            (record, v)
        };
        // Recorded before anything runs under it.
        let recorded = inner.audit.append_durable(record).await;
        {
            let state = inner.lock();
            if let (Some(g), Ok(_)) = (state.grants.get(id), &recorded)
                && g.expiry.get().is_some()
            {
                g.phase.send_replace(Phase::Active);
            }
        }
        inner.wake.notify_one();
        recorded.map_err(|e| {
            inner.end(id, &GrantEnd::Revoked { by: "warden (audit unavailable)".into() }, false);
            GrantError::Audit(e)
        })?;
        Ok(v)
    }

    /// Ends a grant now (`warden grant revoke ID`): every session under it is cut at once and the task
    /// is spent; then `grant.revoked` is written durably.
    pub async fn revoke(&self, id: &str, by: &str) -> Result<GrantView, GrantError> {
        let v = {
            let state = self.inner.lock();
            let g = state.grants.get(id).ok_or_else(|| GrantError::NotFound { id: id.to_owned() })?;
            view(g, self.inner.clock.now())
        };
        if let Some(record) = self.inner.end(id, &GrantEnd::Revoked { by: by.to_owned() }, true) {
            self.inner.audit.append_durable(record).await.map_err(GrantError::Audit)?;
        }
        Ok(v)
    }

    /// Re-decides every grant under a new policy (call it with each applied policy). `subject_of` gives
    /// the subject (groups, scopes) of a grant's identity as the daemon last verified it: the grant is
    /// then decided afresh, as a new connection would be. Where it returns `None`, only the grant's rule
    /// is re-checked ([`Policy::rule_grants`]: target and rule still there, still granting this
    /// access), so pass subjects to also catch a rule whose `match` no longer covers the identity.
    /// Grants the policy no longer allows end (`grant.revoked` by `policy`, sessions cut); a shorter
    /// TTL shortens them. Returns the grants that ended.
    pub fn revalidate(
        &self,
        policy: &Policy,
        subject_of: impl Fn(&GrantView) -> Option<Subject>,
    ) -> Vec<GrantView> {
        let inner = &self.inner;
        let mut ended = Vec::new();
        let mut changed = false;
        let decisions: Vec<(String, Result<Terms, String>, GrantView)> = {
            let state = inner.lock();
            let now = inner.clock.now();
            state
                .grants
                .values()
                .map(|g| {
                    let v = view(g, now);
                    let decision = match subject_of(&v) {
                        None => policy.rule_grants(&g.rule, &g.key.target, g.key.access),
                        Some(s) => policy.decide(&s, &g.key.target, Some(g.key.access)),
                    };
                    let decision = match decision {
                        Decision::Allow(t) => Ok(t),
                        Decision::Deny { reason } => Err(reason),
                    };
                    (g.id.clone(), decision, v)
                })
                .collect()
        };
        for (id, decision, v) in decisions {
            match decision {
                Err(reason) => {
                    if let Some(record) = inner.end(&id, &GrantEnd::PolicyChanged { reason }, true) {
                        inner.record(record);
                    }
                    ended.push(v);
                }
                Ok(terms) => {
                    let mut state = inner.lock();
                    let Some(g) = state.grants.get_mut(&id) else { continue };
                    g.rule = terms.rule;
                    g.mask = terms.mask;
                    g.commands = terms.commands;
                    if terms.ttl < g.ttl {
                        if let Some(at) = g.expiry.get() {
                            let started = at.checked_sub(g.ttl).unwrap_or(at);
                            let latest = started + terms.ttl;
                            if latest < at {
                                g.expiry.set(Some(latest));
                            }
                        }
                        g.ttl = terms.ttl;
                    }
                    changed = true;
                }
            }
        }
        if changed {
            if let Err(e) = inner.persist(&inner.lock()) {
                tracing::error!(error = %e, "could not store revalidated grants");
            }
            inner.wake.notify_one();
        }
        ended
    }

    /// Forgets the spent marks of a cgroup that no longer exists (or was untagged), so a new task in a
    /// cgroup of the same name starts afresh.
    pub fn forget_cgroup(&self, cgroup: &str) -> Result<(), GrantError> {
        let mut state = self.inner.lock();
        state.spent.retain(|task, _| task.cgroup != cgroup);
        self.inner.persist(&state)
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn record(&self, record: Record) {
        if let Err(e) = self.audit.append(record) {
            tracing::error!(error = %e, "could not record a grant event");
        }
    }

    fn persist(&self, state: &State) -> Result<(), GrantError> {
        store::write(&self.path, &store::snapshot(state))
    }

    fn new_id(&self, state: &State, now: SystemTime) -> String {
        loop {
            let n = self.ids.fetch_add(1, Ordering::Relaxed);
            let mut h = Sha256::new();
            h.update(format!("{now:?}/{n}/{}", std::process::id()));
            let id = format!("g{}", &hex::encode(h.finalize())[..10]);
            if !state.grants.contains_key(&id) && !state.spent.values().any(|s| s.grant == id) {
                return id;
            }
        }
    }

    fn new_grant(
        &self,
        state: &State,
        key: GrantKey,
        terms: &Terms,
        issued_by: String,
        now: SystemTime,
        pending: bool,
    ) -> Grant {
        let expires_at = (!pending).then(|| now + terms.ttl);
        Grant {
            id: self.new_id(state, now),
            key,
            rule: terms.rule.clone(),
            ttl: terms.ttl,
            mask: terms.mask.clone(),
            commands: terms.commands.clone(),
            approval: terms.approval,
            issued_by,
            requested_at: now,
            expiry: Expiry::new(expires_at),
            phase: watch::Sender::new(Phase::Recording),
            sessions: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// The issued record is durable: what the grant's sessions wait for can start.
    fn recorded(&self, id: &str) {
        let state = self.lock();
        if let Some(g) = state.grants.get(id) {
            g.phase.send_replace(if g.expiry.get().is_some() { Phase::Active } else { Phase::Pending });
        }
    }

    /// Ends every grant whose time is up; returns the next deadline, if any.
    fn expire_due(&self, state: &mut State, now: SystemTime) -> Option<SystemTime> {
        let mut due = Vec::new();
        let mut next: Option<SystemTime> = None;
        for g in state.grants.values() {
            let deadline = g.expiry.get().unwrap_or(g.requested_at + self.options.pending_max);
            if deadline <= now {
                due.push(g.id.clone());
            } else {
                next = Some(next.map_or(deadline, |n| n.min(deadline)));
            }
        }
        if due.is_empty() {
            return next;
        }
        for id in due {
            let Some(g) = state.grants.remove(&id) else { continue };
            match g.expiry.get() {
                Some(at) => {
                    self.record(expired_record(&g, "ttl reached"));
                    state.spent.insert(
                        Task::of(&g.key),
                        Spent { grant: g.id.clone(), how: "expired".into(), ended_at: at },
                    );
                    tracing::info!(grant = %g.id, target = %g.key.target, cgroup = %g.key.cgroup, "grant expired");
                }
                None => self.record(expired_record(&g, "not approved")),
            }
            g.phase.send_replace(Phase::Ended(GrantEnd::Expired));
        }
        if let Err(e) = self.persist(state) {
            tracing::error!(error = %e, "could not store expired grants");
        }
        next
    }

    /// Ends one grant now and tells its sessions. With `spend`, the task is spent and the
    /// `grant.revoked` record to write is returned.
    fn end(&self, id: &str, why: &GrantEnd, spend: bool) -> Option<Record> {
        let mut state = self.lock();
        let g = state.grants.remove(id)?;
        let now = self.clock.now();
        let how = match why {
            GrantEnd::Expired => "expired".to_owned(),
            GrantEnd::Revoked { by } => format!("was revoked by {by}"),
            GrantEnd::PolicyChanged { reason } => format!("was ended by a policy change ({reason})"),
        };
        let mut record = None;
        if spend {
            let (by, reason) = match why {
                GrantEnd::Revoked { by } => (by.clone(), None),
                GrantEnd::PolicyChanged { reason } => ("policy".to_owned(), Some(reason.clone())),
                GrantEnd::Expired => ("warden".to_owned(), None),
            };
            record = Some(records::revoked(&g, &by, reason.as_deref()));
            state.spent.insert(Task::of(&g.key), Spent { grant: g.id.clone(), how, ended_at: now });
        }
        g.phase.send_replace(Phase::Ended(why.clone()));
        if let Err(e) = self.persist(&state) {
            tracing::error!(error = %e, "could not store an ended grant");
        }
        self.wake.notify_one();
        record
    }
}

/// Sleeps until the next deadline (never longer than [`MAX_NAP`], as the wall clock may jump), ends
/// what is due, and stops when the grant table is dropped.
async fn expiry_task(inner: Weak<Inner>, wake: Arc<Notify>) {
    loop {
        let nap = {
            let Some(inner) = inner.upgrade() else { return };
            let now = inner.clock.now();
            let next = inner.expire_due(&mut inner.lock(), now);
            next.map_or(MAX_NAP, |at| at.duration_since(now).unwrap_or_default().min(MAX_NAP))
        };
        tokio::select! {
            () = tokio::time::sleep(nap) => {}
            () = wake.notified() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::AuditOptions;
    use serde_json::Value;
    use std::os::unix::fs::PermissionsExt;
    use tokio_util::sync::CancellationToken;

    const MIN: Duration = Duration::from_secs(60);

    /// The one place tests build an audit handle: a real writer in `root/audit`.
    fn audit(root: &Path) -> Audit {
        Audit::start_with(&AuditOptions::in_dir(root), CancellationToken::new()).unwrap().0
    }

    /// Every record written so far (a durable marker flushes the queue first).
    async fn records(audit: &Audit, root: &Path) -> Vec<Value> {
        audit.append_durable(Record::new("test.flush")).await.unwrap();
        let mut files: Vec<PathBuf> =
            std::fs::read_dir(root.join("audit")).unwrap().map(|e| e.unwrap().path()).collect();
        files.sort();
        let mut out = Vec::new();
        for f in files {
            let Ok(text) = std::fs::read_to_string(&f) else { continue };
            out.extend(text.lines().filter_map(|l| serde_json::from_str::<Value>(l).ok()));
        }
        out.into_iter().filter(|r| r.get("event").is_some()).collect()
    }

    fn events<'a>(records: &'a [Value], event: &str) -> Vec<&'a Value> {
        records.iter().filter(|r| r["event"] == event).collect()
    }

    fn key(cgroup: &str) -> GrantKey {
        GrantKey {
            identity: "research-bot".into(),
            client_id: "0oa1".into(),
            cgroup: cgroup.into(),
            target: "orders-db".into(),
            access: Access::Read,
        }
    }

    fn terms(ttl: Duration, approval: Approval) -> Terms {
        Terms {
            rule: "research agents read orders".into(),
            target: "orders-db".into(),
            access: Access::Read,
            ttl,
            mask: vec!["email".into()],
            approval,
            commands: None,
            forward: false,
            sftp: false,
        }
    }

    struct Fixture {
        dir: tempfile::TempDir,
        audit: Audit,
        clock: Arc<TestClock>,
        grants: Grants,
    }

    fn fixture(options: GrantsOptions) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let audit = audit(dir.path());
        let clock = Arc::new(TestClock::new(SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000)));
        let grants = Grants::open_with(dir.path(), audit.clone(), clock.clone(), options).unwrap();
        Fixture { dir, audit, clock, grants }
    }

    #[tokio::test(start_paused = true)]
    async fn expiry_cuts_every_session_and_later_connections_are_refused() {
        let f = fixture(GrantsOptions::default());
        let t = terms(15 * MIN, Approval::None);
        let mut first = f.grants.acquire(key("task-1"), &t).await.unwrap();
        let mut second = f.grants.acquire(key("task-1"), &t).await.unwrap();
        assert_eq!(first.grant_id, second.grant_id, "sessions of one task share its grant");
        assert_eq!(first.expires_at(), f.clock.now() + 15 * MIN);
        assert_eq!(f.grants.list()[0].sessions, 2);

        tokio::time::advance(14 * MIN + Duration::from_secs(59)).await;
        assert_eq!(f.grants.list().len(), 1, "still live a second before expiry");
        let (ea, eb) = tokio::join!(first.ended(), second.ended());
        assert_eq!((ea, eb), (GrantEnd::Expired, GrantEnd::Expired));
        assert_eq!(f.clock.now(), SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000) + 15 * MIN);
        assert!(f.grants.list().is_empty());

        // No silent renewal: the same task is refused, naming the grant and the way out.
        let err = f.grants.acquire(key("task-1"), &t).await.unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains(&format!("grant {} for orders-db expired", first.grant_id)), "{msg}");
        assert!(msg.contains("does not renew itself") && msg.contains("warden grant issue"), "{msg}");
        // A new task gets its own first grant.
        let c = f.grants.acquire(key("task-2"), &t).await.unwrap();
        assert_ne!(c.grant_id, first.grant_id);

        let recs = records(&f.audit, f.dir.path()).await;
        let issued = events(&recs, "grant.issued");
        assert_eq!(issued.len(), 2);
        assert_eq!(issued[0]["grant"], first.grant_id.as_str());
        assert_eq!(issued[0]["cgroup"], "task-1");
        assert_eq!(issued[0]["rule"], "research agents read orders");
        assert!(issued[0]["expires_at"].is_string());
        let expired = events(&recs, "grant.expired");
        assert_eq!(expired.len(), 1, "expiry is recorded once: {expired:?}");
        assert_eq!(expired[0]["grant"], first.grant_id.as_str());
    }

    #[tokio::test(start_paused = true)]
    async fn an_operator_issue_is_the_fresh_grant_after_expiry() {
        let f = fixture(GrantsOptions::default());
        let t = terms(MIN, Approval::None);
        drop(f.grants.acquire(key("task-1"), &t).await.unwrap());
        tokio::time::advance(2 * MIN).await;
        assert!(matches!(f.grants.acquire(key("task-1"), &t).await, Err(GrantRefusal::Spent { .. })));
        let v = f.grants.issue(key("task-1"), &t, "alice").await.unwrap();
        assert_eq!(
            (v.status.as_str(), v.issued_by.as_str(), v.remaining_secs),
            ("active", "operator alice", Some(60))
        );
        let lease = f.grants.acquire(key("task-1"), &t).await.unwrap();
        assert_eq!(lease.grant_id, v.id);
        let again = f.grants.issue(key("task-1"), &t, "alice").await.unwrap_err();
        assert!(
            again.to_string().contains(&format!("revoke it first with `warden grant revoke {}`", v.id)),
            "{again}"
        );
        // After the operator's grant expires the task is spent again.
        drop(lease);
        tokio::time::advance(2 * MIN).await;
        assert!(matches!(f.grants.acquire(key("task-1"), &t).await, Err(GrantRefusal::Spent { .. })));
    }

    #[tokio::test(start_paused = true)]
    async fn approval_holds_the_connection_until_approved_and_the_ttl_starts_then() {
        let f = fixture(GrantsOptions { approval_wait: MIN, ..GrantsOptions::default() });
        let t = terms(10 * MIN, Approval::Required);
        let grants = f.grants.clone();
        let t2 = t.clone();
        let held = tokio::spawn(async move { grants.acquire(key("task-1"), &t2).await });
        // Wait (in virtual time, without advancing it) for the pending grant to appear.
        let pending = loop {
            if let Some(v) = f.grants.list().pop() {
                break v;
            }
            tokio::task::yield_now().await;
        };
        assert_eq!((pending.status.as_str(), pending.expires_at.as_deref()), ("pending", None));
        tokio::time::advance(Duration::from_secs(30)).await;
        let approved = f.grants.approve(&pending.id, "alice").await.unwrap();
        assert_eq!(approved.remaining_secs, Some(600), "the ttl starts at approval");
        let lease = held.await.unwrap().unwrap();
        assert_eq!(lease.grant_id, pending.id);
        assert!(
            f.grants.approve(&pending.id, "alice").await.unwrap_err().to_string().contains("not waiting")
        );
        let recs = records(&f.audit, f.dir.path()).await;
        assert_eq!(events(&recs, "grant.issued")[0]["status"], "pending");
        assert_eq!(events(&recs, "grant.approved")[0]["by"], "alice");
    }

    #[tokio::test(start_paused = true)]
    async fn an_unapproved_connection_is_refused_after_the_wait_with_the_command_to_run() {
        let f = fixture(GrantsOptions { approval_wait: Duration::from_secs(5), pending_max: 10 * MIN });
        let t = terms(10 * MIN, Approval::Required);
        let err = f.grants.acquire(key("task-1"), &t).await.unwrap_err();
        let id = f.grants.list()[0].id.clone();
        assert_eq!(
            err.to_string(),
            format!("pending approval (grant {id}); run `warden grant approve {id}`")
        );
        // A retry waits on the same request; nobody approves, so it lapses without spending the task.
        tokio::time::advance(11 * MIN).await;
        assert!(f.grants.list().is_empty());
        let grants = f.grants.clone();
        let t2 = t.clone();
        let retry = tokio::spawn(async move { grants.acquire(key("task-1"), &t2).await });
        let fresh = loop {
            if let Some(v) = f.grants.list().pop() {
                break v;
            }
            tokio::task::yield_now().await;
        };
        assert_ne!(fresh.id, id, "a lapsed request is asked afresh");
        f.grants.approve(&fresh.id, "bob").await.unwrap();
        assert!(retry.await.unwrap().is_ok());
        let recs = records(&f.audit, f.dir.path()).await;
        assert_eq!(events(&recs, "grant.expired")[0]["reason"], "not approved");
    }

    #[tokio::test(start_paused = true)]
    async fn revocation_ends_live_sessions_at_once_and_spends_the_task() {
        let f = fixture(GrantsOptions::default());
        let t = terms(15 * MIN, Approval::None);
        let mut a = f.grants.acquire(key("task-1"), &t).await.unwrap();
        let v = f.grants.revoke(&a.grant_id, "alice").await.unwrap();
        assert_eq!(v.sessions, 1);
        let start = tokio::time::Instant::now();
        assert_eq!(a.ended().await, GrantEnd::Revoked { by: "alice".into() });
        assert_eq!(start.elapsed(), Duration::ZERO, "no waiting for the ttl");
        let err = f.grants.acquire(key("task-1"), &t).await.unwrap_err();
        assert!(err.to_string().contains("was revoked by alice"), "{err}");
        assert!(matches!(f.grants.revoke(&a.grant_id, "alice").await, Err(GrantError::NotFound { .. })));
        let recs = records(&f.audit, f.dir.path()).await;
        let revoked = events(&recs, "grant.revoked");
        assert_eq!((revoked[0]["by"].as_str(), revoked[0]["sessions"].as_u64()), (Some("alice"), Some(1)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_restart_keeps_the_original_expiry_and_drops_what_expired_meanwhile() {
        let f = fixture(GrantsOptions::default());
        let t = terms(15 * MIN, Approval::None);
        let short = terms(5 * MIN, Approval::None);
        let lease = f.grants.acquire(key("task-1"), &t).await.unwrap();
        let expires = lease.expires_at();
        let other = f.grants.acquire(key("task-2"), &short).await.unwrap();
        let file = f.dir.path().join("grants.json");
        assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);

        // The daemon is down for 10 minutes.
        drop((lease, other));
        drop(f.grants);
        f.clock.jump(10 * MIN);
        let reopened = Grants::open(f.dir.path(), f.audit.clone(), f.clock.clone()).unwrap();
        let views = reopened.list();
        assert_eq!(views.len(), 1, "{views:?}");
        assert_eq!(views[0].cgroup, "task-1");
        assert_eq!(views[0].remaining_secs, Some(5 * 60), "original expiry, not a fresh ttl");
        let lease = reopened.acquire(key("task-1"), &t).await.unwrap();
        assert_eq!(lease.expires_at(), expires);
        // The grant that expired while down is spent: no renewal through a restart.
        assert!(matches!(reopened.acquire(key("task-2"), &short).await, Err(GrantRefusal::Spent { .. })));
        let recs = records(&f.audit, f.dir.path()).await;
        let expired = events(&recs, "grant.expired");
        assert_eq!(expired[0]["reason"], "expired while the daemon was down");
        assert_eq!(expired[0]["cgroup"], "task-2");
    }

    #[tokio::test(start_paused = true)]
    async fn a_policy_change_ends_disallowed_grants_and_shortens_others() {
        let f = fixture(GrantsOptions::default());
        let t = terms(15 * MIN, Approval::None);
        let mut kept = f.grants.acquire(key("task-1"), &t).await.unwrap();
        let mut other_key = key("task-2");
        other_key.identity = "other-bot".into();
        let mut cut = f.grants.acquire(other_key.clone(), &t).await.unwrap();

        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("p.yaml");
        std::fs::write(
            &file,
            "targets:\n  orders-db: { protocol: postgres, address: 127.0.0.1:5432, databases: [o], credentials: { user: u } }\nrules:\n  - name: research agents read orders\n    match: { groups: [research] }\n    grant: [{ target: orders-db, access: read, ttl: 5m }]\n",
        )
        .unwrap();
        let policy = crate::policy::load(&[file]).unwrap();
        tokio::time::advance(MIN).await;
        let ended = f.grants.revalidate(&policy, |v| {
            let groups = if v.identity == "research-bot" { vec!["research".to_owned()] } else { vec![] };
            Some(Subject { client_id: v.client_id.clone(), sub: v.client_id.clone(), groups, scopes: vec![] })
        });
        assert_eq!(ended.len(), 1);
        assert_eq!(ended[0].identity, "other-bot");
        let GrantEnd::PolicyChanged { reason } = cut.ended().await else { panic!() };
        assert!(reason.contains("no rule grants client 0oa1"), "{reason}");
        assert_eq!(f.grants.list()[0].remaining_secs, Some(4 * 60), "shortened to the new 5m ttl");
        assert_eq!(kept.ended().await, GrantEnd::Expired);
        assert!(matches!(f.grants.acquire(other_key, &t).await, Err(GrantRefusal::Spent { .. })));
        f.grants.forget_cgroup("task-2").unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn without_subjects_a_grant_ends_when_its_rule_stops_granting() {
        let f = fixture(GrantsOptions::default());
        let t = terms(15 * MIN, Approval::None);
        let mut lease = f.grants.acquire(key("task-1"), &t).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("p.yaml");
        let text = |access: &str| {
            format!(
                "targets:\n  orders-db: {{ protocol: postgres, address: 127.0.0.1:5432, databases: [o], credentials: {{ user: u }} }}\nrules:\n  - name: research agents read orders\n    match: {{ groups: [research] }}\n    grant: [{{ target: orders-db, access: {access}, ttl: 15m }}]\n"
            )
        };
        std::fs::write(&file, text("write")).unwrap();
        let still = crate::policy::load(std::slice::from_ref(&file)).unwrap();
        assert!(f.grants.revalidate(&still, |_| None).is_empty(), "write includes read: the grant stays");
        std::fs::write(&file, text("read").replace("research agents read orders", "renamed")).unwrap();
        let renamed = crate::policy::load(&[file]).unwrap();
        assert_eq!(f.grants.revalidate(&renamed, |_| None).len(), 1);
        assert_eq!(
            lease.ended().await,
            GrantEnd::PolicyChanged {
                reason: "rule `research agents read orders` is no longer in the policy".into()
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_first_connections_share_one_grant_issued_once() {
        let f = fixture(GrantsOptions::default());
        let t = terms(15 * MIN, Approval::None);
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..20 {
            let (grants, t) = (f.grants.clone(), t.clone());
            set.spawn(async move { grants.acquire(key("task-1"), &t).await });
        }
        let leases: Vec<Lease> = set.join_all().await.into_iter().map(Result::unwrap).collect();
        assert!(leases.iter().all(|l| l.grant_id == leases[0].grant_id));
        assert_eq!(f.grants.list()[0].sessions, 20);
        drop(leases);
        assert_eq!(f.grants.list()[0].sessions, 0, "dropping a lease ends its hold");
        let recs = records(&f.audit, f.dir.path()).await;
        assert_eq!(events(&recs, "grant.issued").len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn forgetting_a_cgroup_lets_a_new_task_there_start_afresh() {
        let f = fixture(GrantsOptions::default());
        let t = terms(MIN, Approval::None);
        drop(f.grants.acquire(key("task-1"), &t).await.unwrap());
        tokio::time::advance(2 * MIN).await;
        assert!(f.grants.acquire(key("task-1"), &t).await.is_err());
        f.grants.forget_cgroup("task-1").unwrap();
        assert!(f.grants.acquire(key("task-1"), &t).await.is_ok());
    }
}
