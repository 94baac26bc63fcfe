//! The grant records: `grant.issued`, `grant.expired`, `grant.revoked` (approvals are written where
//! they happen, in `Grants::approve`).

use std::sync::atomic::Ordering;

use super::Grant;
use super::view::status;
use crate::audit::Record;
use crate::timestamp;

pub(super) fn issued_record(g: &Grant) -> Record {
    Record::new("grant.issued")
        .field("grant", &g.id)
        .field("status", status(g))
        .field("identity", &g.key.identity)
        .field("client_id", &g.key.client_id)
        .field("cgroup", &g.key.cgroup)
        .field("target", &g.key.target)
        .field("access", g.key.access.as_str())
        .field("rule", &g.rule)
        .field("ttl_secs", g.ttl.as_secs())
        .field("approval", g.approval.as_str())
        .field("issued_by", &g.issued_by)
        .field("expires_at", g.expiry.get().map(timestamp::format_system))
}

pub(super) fn expired_record(g: &Grant, reason: &str) -> Record {
    Record::new("grant.expired")
        .field("grant", &g.id)
        .field("reason", reason)
        .field("identity", &g.key.identity)
        .field("client_id", &g.key.client_id)
        .field("cgroup", &g.key.cgroup)
        .field("target", &g.key.target)
        .field("access", g.key.access.as_str())
        .field("rule", &g.rule)
        .field("expires_at", g.expiry.get().map(timestamp::format_system))
        .field("sessions", g.sessions.load(Ordering::Relaxed))
}

pub(super) fn revoked(g: &Grant, by: &str, reason: Option<&str>) -> Record {
    Record::new("grant.revoked")
        .field("grant", &g.id)
        .field("by", by)
        .field("reason", reason)
        .field("identity", &g.key.identity)
        .field("client_id", &g.key.client_id)
        .field("cgroup", &g.key.cgroup)
        .field("target", &g.key.target)
        .field("access", g.key.access.as_str())
        .field("rule", &g.rule)
        .field("sessions", g.sessions.load(Ordering::Relaxed))
}
