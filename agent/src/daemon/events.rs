//! Kernel events: the programs' refusals, read from the ring buffer and recorded, at most
//! `REFUSALS_PER_SECOND` per tagged cgroup; the rest (and ring-buffer overflows) are counted in
//! `events.lost`.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use warden_common::event;

use super::State;
use crate::audit::Record;
use crate::audit::budget::{Budget, REFUSALS_PER_SECOND};
use crate::bpf;

/// Reads the kernel's refusal events and records them.
pub(super) async fn events(state: Arc<State>, mut reader: bpf::EventReader) {
    let mut unrecorded = Unrecorded { kernel_seen: state.kernel.events_lost(), ..Unrecorded::default() };
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut batch = Vec::new();
    loop {
        tokio::select! {
            () = state.shutdown.cancelled() => {
                unrecorded.record(&state);
                return;
            }
            _ = tick.tick() => {
                unrecorded.record(&state);
                continue;
            }
            r = reader.read(&mut batch) => if r.is_err() { return },
        }
        for ev in batch.drain(..) {
            state.metrics.refused(crate::metrics::RefusalKind::Kernel, kernel_code(ev.kind));
            if !unrecorded.admit(ev.tagged_cgroup, std::time::Instant::now()) {
                state.metrics.events_lost("rate_limited", 1);
                continue;
            }
            if !state.record_event(&ev) {
                unrecorded.queue_full += 1;
                state.metrics.events_lost("queue_full", 1);
            }
        }
    }
}

/// A kernel event's refusal code, for the metrics.
fn kernel_code(kind: u32) -> &'static str {
    match kind {
        event::CONNECT_REFUSED => "connect",
        event::SENDMSG_REFUSED => "sendmsg",
        event::PROXY_REFUSED => "proxy_port",
        event::ORIGIN_FULL => "origin_full",
        event::SOCKET_REFUSED => "socket",
        event::BIND_REFUSED => "bind",
        _ => "unknown",
    }
}

/// Kernel events that did not become records of their own, until an `events.lost` record accounts for them.
#[derive(Default)]
struct Unrecorded {
    /// The kernel's count of events that found the ring buffer full, as of the last record.
    kernel_seen: u64,
    /// Events the audit queue had no room for.
    queue_full: u64,
    /// Per tagged cgroup: the records of the current second, and those over the budget.
    budget: Budget<u64>,
}

impl Unrecorded {
    /// True when an event of this tagged cgroup may be recorded in full.
    fn admit(&mut self, tagged_cgroup: u64, now: std::time::Instant) -> bool {
        self.budget.admit(&tagged_cgroup, now)
    }

    /// Appends `events.lost` when anything went unrecorded since the last one (kept for the next try if
    /// the record cannot be queued either).
    fn record(&mut self, state: &State) {
        let now = std::time::Instant::now();
        self.budget.prune(now);
        let kernel = state.kernel.events_lost();
        let ring_full = kernel.saturating_sub(self.kernel_seen);
        if ring_full == 0 && self.queue_full == 0 && self.budget.over().is_empty() {
            return;
        }
        let limited: Vec<Value> = self
            .budget
            .over()
            .iter()
            .map(|(id, n)| {
                let binding = state.bindings.all().into_iter().find(|b| b.cgroup_id == *id);
                json!({
                    "cgroup_id": id,
                    "cgroup": binding.as_ref().map(|b| b.cgroup.clone()),
                    "identity": binding.map(|b| b.identity),
                    "events": n,
                })
            })
            .collect();
        let rec = Record::new("events.lost")
            .field("ring_full", ring_full)
            .field("queue_full", self.queue_full)
            .field("rate_limited", limited)
            .field("per_second", REFUSALS_PER_SECOND)
            .field("decision", "deny")
            .field(
                "reason",
                "kernel refusals that were enforced but not recorded one by one (counted here instead)",
            );
        match state.audit.append_or_hold(rec) {
            Ok(()) => {
                tracing::warn!(
                    ring_full,
                    queue_full = self.queue_full,
                    "kernel refusals not recorded one by one"
                );
                self.kernel_seen = kernel;
                self.queue_full = 0;
                self.budget.clear_over();
            }
            Err(e) => tracing::error!(error = %e, "could not record lost kernel events; will retry"),
        }
    }
}

impl State {
    /// Records one kernel refusal; false when the audit record could not take it.
    fn record_event(&self, ev: &warden_common::Event) -> bool {
        let (name, via, reason) = match ev.kind {
            event::CONNECT_REFUSED => {
                ("connect.refused", "connect", "destination is neither a target nor allowed")
            }
            event::SENDMSG_REFUSED => ("connect.refused", "sendmsg", "UDP destination is not allowed"),
            event::PROXY_REFUSED => ("connect.refused", "connect", "direct connection to the proxy port"),
            event::ORIGIN_FULL => ("connect.refused", "connect", "origin map full; refused to fail closed"),
            event::SOCKET_REFUSED => {
                ("socket.refused", "socket", "socket family, type or protocol not allowed")
            }
            event::BIND_REFUSED => ("bind.refused", "bind", "binding the proxy's port"),
            event::ORIGIN_QUOTA => {
                ("connect.refused", "connect", "the cgroup has its share of in-flight redirected connections")
            }
            event::SOCKOPT_REFUSED => (
                "socket.refused",
                "setsockopt",
                "socket option that routes packets elsewhere (IPv6 extension header, IPv4 options)",
            ),
            event::PACKET_REFUSED => (
                "connect.refused",
                "packet",
                "packet with an IPv6 routing/options header or IPv4 options, dropped",
            ),
            _ => ("kernel.event", "unknown", "unknown kernel event"),
        };
        let binding = self.bindings.by_id(ev.binding);
        let cgroup = crate::cgroup::process_cgroup(&self.cgroup_root, ev.tgid).map_or_else(
            || binding.as_ref().map(|b| b.cgroup.clone()).unwrap_or_default(),
            |p| crate::cgroup::relative(&self.cgroup_root, &p),
        );
        let mut rec = Record::new(name)
            .field("pid", ev.tgid)
            .field("tid", ev.pid)
            .field("uid", ev.uid)
            .field("gid", ev.gid)
            .field("cgroup", cgroup)
            .field("cgroup_id", ev.cgroup)
            .field("identity", binding.as_ref().map(|b| b.identity.clone()))
            .field("via", via);
        if ev.kind == event::SOCKET_REFUSED {
            rec = rec.field("family", ev.family).field("type", ev.sock_type).field("protocol", ev.protocol);
        } else if ev.kind == event::SOCKOPT_REFUSED {
            rec = rec.field("family", ev.family).field("level", ev.protocol).field("option", ev.sock_type);
        } else {
            let proto = match ev.sock_type {
                1 => "tcp",
                2 => "udp",
                _ => "other",
            };
            rec = rec.field("dst", bpf::socket_addr(&ev.dst).to_string()).field("proto", proto);
        }
        rec = rec
            .field("decision", "deny")
            .field("reason", reason)
            .field("at", crate::timestamp::format_system(crate::origin::monotonic_to_wall(ev.ktime_ns)));
        if let Err(e) = self.audit.append_or_hold(rec) {
            tracing::debug!(error = %e, "could not record a kernel refusal");
            return false;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_recorded_up_to_a_budget_per_cgroup_and_second_then_counted() {
        let mut u = Unrecorded::default();
        let t0 = std::time::Instant::now();
        let admitted = (0..REFUSALS_PER_SECOND + 50).filter(|_| u.admit(7, t0)).count();
        assert_eq!(admitted, REFUSALS_PER_SECOND as usize);
        assert_eq!(u.budget.over()[&7], 50);
        // Another cgroup has its own budget; a new second starts afresh.
        assert!(u.admit(8, t0));
        assert!(u.admit(7, t0 + Duration::from_millis(1000)));
    }
}
