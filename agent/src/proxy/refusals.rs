//! The proxy's refusal records under a budget: connections with no origin (one source for them all, since
//! any local process can open them and a TCP peer's uid cannot be asked) and refusals of tagged origins
//! (per tagged cgroup) each get at most a budget of full records per second; the rest are still refused
//! but only counted, and summed up once a second in an `events.lost` record.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use serde_json::{Value, json};

use crate::audit::budget::{Budget, REFUSALS_PER_SECOND};
use crate::audit::{Audit, Record};
use crate::metrics::Metrics;

/// Whose refusal a record would be.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Source {
    /// A connection that reached the proxy without going through the kernel's redirect.
    NoOrigin,
    /// A refusal of a connection redirected from this tagged cgroup.
    Cgroup(u64),
}

/// The proxy's refusal budget, shared by its listeners and connections.
#[derive(Debug)]
pub struct Refusals(Mutex<Inner>);

#[derive(Debug)]
struct Inner {
    budget: Budget<Source>,
    /// The cgroup path of each tagged cgroup over its budget, for the `events.lost` record.
    cgroups: HashMap<u64, String>,
}

impl Default for Refusals {
    fn default() -> Self {
        Self::new(REFUSALS_PER_SECOND)
    }
}

impl Refusals {
    /// A budget of `per_second` full records per source.
    #[must_use]
    pub fn new(per_second: u32) -> Self {
        Self(Mutex::new(Inner { budget: Budget::new(per_second), cgroups: HashMap::new() }))
    }

    /// True when this refusal may be recorded in full; otherwise it is counted for `events.lost`.
    pub(super) fn admit(&self, source: &Source, cgroup: Option<&str>, metrics: &Metrics) -> bool {
        let mut inner = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if inner.budget.admit(source, Instant::now()) {
            return true;
        }
        if let (Source::Cgroup(id), Some(path)) = (source, cgroup) {
            inner.cgroups.entry(*id).or_insert_with(|| path.to_owned());
        }
        metrics.events_lost("rate_limited", 1);
        false
    }

    /// Appends `events.lost` when refusals went unrecorded since the last one (kept for the next try if
    /// the record cannot be queued).
    pub(super) fn flush(&self, audit: &Audit) {
        let mut inner = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        inner.budget.prune(Instant::now());
        if inner.budget.over().is_empty() {
            return;
        }
        let limited: Vec<Value> = inner
            .budget
            .over()
            .iter()
            .map(|(source, n)| match source {
                Source::NoOrigin => json!({ "source": "no_origin", "events": n }),
                Source::Cgroup(id) => json!({
                    "source": "proxy",
                    "cgroup_id": id,
                    "cgroup": inner.cgroups.get(id),
                    "events": n,
                }),
            })
            .collect();
        let total: u64 = inner.budget.over().values().sum();
        let rec = Record::new("events.lost")
            .field("ring_full", 0)
            .field("queue_full", 0)
            .field("rate_limited", limited)
            .field("per_second", inner.budget.per_second())
            .field("decision", "deny")
            .field(
                "reason",
                "proxy refusals that were enforced but not recorded one by one (counted here instead)",
            );
        match audit.append_or_hold(rec) {
            Ok(()) => {
                tracing::warn!(events = total, "proxy refusals not recorded one by one");
                inner.budget.clear_over();
                inner.cgroups.clear();
            }
            Err(e) => tracing::error!(error = %e, "could not record lost proxy refusals; will retry"),
        }
    }
}
