//! The operator's view of a grant: the control API's JSON (`warden grants --json`) and the table.

use std::fmt::Write as _;

use std::sync::atomic::Ordering;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use super::Grant;
use crate::timestamp;

/// One live or pending grant as the control socket reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantView {
    pub id: String,
    /// `active` or `pending` (waiting for `warden grant approve`).
    pub status: String,
    pub identity: String,
    pub client_id: String,
    pub cgroup: String,
    pub target: String,
    pub access: String,
    pub rule: String,
    pub ttl_secs: u64,
    pub mask: Vec<String>,
    pub commands: Option<Vec<String>>,
    /// `none` or `required`.
    pub approval: String,
    /// `auto` (the first connection) or `operator NAME`.
    pub issued_by: String,
    /// RFC 3339: when the grant was asked for (issued, for grants that needed no approval).
    pub requested_at: String,
    /// RFC 3339; absent while pending.
    pub expires_at: Option<String>,
    pub remaining_secs: Option<u64>,
    /// Live sessions under the grant.
    pub sessions: usize,
}

/// A readable table for `warden grants`.
pub fn table(views: &[GrantView]) -> String {
    if views.is_empty() {
        return "no live grants\n".to_owned();
    }
    let header = ["ID", "STATUS", "IDENTITY", "CGROUP", "TARGET", "ACCESS", "EXPIRES IN", "SESSIONS", "RULE"];
    let rows: Vec<[String; 9]> = views
        .iter()
        .map(|v| {
            [
                v.id.clone(),
                v.status.clone(),
                v.identity.clone(),
                v.cgroup.clone(),
                v.target.clone(),
                v.access.clone(),
                v.remaining_secs.map_or_else(|| "-".to_owned(), human),
                v.sessions.to_string(),
                v.rule.clone(),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &[&str]| {
        let mut l = String::new();
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == cells.len() {
                l.push_str(cell);
            } else {
                let _ = write!(l, "{cell:<w$}  ");
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&header);
    for row in &rows {
        line(&row.each_ref().map(String::as_str));
    }
    out
}

/// `14m03s`, `2h00m`, `45s`.
fn human(secs: u64) -> String {
    match secs {
        s if s >= 3600 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        s if s >= 60 => format!("{}m{:02}s", s / 60, s % 60),
        s => format!("{s}s"),
    }
}

/// Whether a grant runs (`active`) or waits for approval (`pending`).
pub(super) fn status(g: &Grant) -> &'static str {
    if g.expiry.get().is_some() { "active" } else { "pending" }
}

/// The operator's view of one grant now.
pub(super) fn view(g: &Grant, now: SystemTime) -> GrantView {
    GrantView {
        id: g.id.clone(),
        status: status(g).to_owned(),
        identity: g.key.identity.clone(),
        client_id: g.key.client_id.clone(),
        cgroup: g.key.cgroup.clone(),
        target: g.key.target.clone(),
        access: g.key.access.as_str().to_owned(),
        rule: g.rule.clone(),
        ttl_secs: g.ttl.as_secs(),
        mask: g.mask.clone(),
        commands: g.commands.clone(),
        approval: g.approval.as_str().to_owned(),
        issued_by: g.issued_by.clone(),
        requested_at: timestamp::format_system(g.requested_at),
        expires_at: g.expiry.get().map(timestamp::format_system),
        remaining_secs: g.expiry.get().map(|at| at.duration_since(now).unwrap_or_default().as_secs()),
        sessions: g.sessions.load(Ordering::Relaxed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(id: &str, status: &str, remaining: Option<u64>) -> GrantView {
        GrantView {
            id: id.into(),
            status: status.into(),
            identity: "research-bot".into(),
            client_id: "0oa1".into(),
            cgroup: "warden/task-7".into(),
            target: "orders-db".into(),
            access: "read".into(),
            rule: "research agents read orders".into(),
            ttl_secs: 900,
            mask: vec![],
            commands: None,
            approval: "none".into(),
            issued_by: "auto".into(),
            requested_at: "2026-01-01T00:00:00Z".into(),
            expires_at: None,
            remaining_secs: remaining,
            sessions: 2,
        }
    }

    #[test]
    fn table_aligns_columns() {
        let t = table(&[v("g0123456789", "active", Some(843)), v("gabc", "pending", None)]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3, "{t}");
        assert!(lines[0].starts_with("ID           STATUS   IDENTITY"), "{t}");
        assert!(lines[1].contains("14m03s") && lines[1].ends_with("research agents read orders"), "{t}");
        assert!(lines[2].contains("pending") && lines[2].contains(" - "), "{t}");
        let col = |l: &str| l.find("orders-db");
        assert_eq!(col(lines[1]), col(lines[2]));
        assert_eq!(table(&[]), "no live grants\n");
        assert_eq!(human(7200), "2h00m");
        assert_eq!(human(45), "45s");
    }
}
