//! `warden status`: the daemon's state at a glance, assembled from each subsystem's read-only view (the
//! control socket's JSON, for `--json` and scripts, and a readable summary of it); and the metrics the
//! daemon reads at each scrape rather than tracks (map occupancy, live grants, the audit queue).

use std::collections::HashMap;
use std::fmt::Write as _;

use serde_json::{Value, json};
use warden_common::names;

use super::State;
use crate::bpf;
use crate::metrics::Metrics;
use crate::timestamp::format_system as rfc3339;

/// The status document.
pub fn status(state: &State) -> Value {
    let report = &state.kernel.report;
    let pinned = bpf::pinned_links(&state.config.agent.bpffs_dir);
    let unavailable: Vec<Value> =
        report.unavailable.iter().map(|(p, why)| json!({ "program": p, "error": why })).collect();
    let missing: Vec<&str> = names::PROGRAMS
        .iter()
        .copied()
        .filter(|p| !pinned.contains(p) && !report.unavailable.iter().any(|(u, _)| u == p))
        .collect();
    let kernel_tags: HashMap<u64, u32> = state.kernel.tags().into_iter().collect();
    let bindings = state.bindings.all();
    let cgroups: Vec<Value> = bindings
        .iter()
        .map(|b| {
            json!({
                "cgroup": b.cgroup,
                "cgroup_id": b.cgroup_id,
                "identity": b.identity,
                "task": b.task,
                "source": if b.from_config { "config" } else { "control" },
                "tagged_in_kernel": kernel_tags.get(&b.cgroup_id) == Some(&b.id),
                "programs": state.kernel.cgroup_links(b.cgroup_id),
            })
        })
        .collect();
    let identities: Vec<Value> = state
        .identities
        .states()
        .into_iter()
        .map(|t| {
            json!({
                "name": t.name,
                "client_id": t.client_id,
                "valid_until": t.valid_until.map(rfc3339),
                "valid": t.valid_until.is_some_and(|u| u > std::time::SystemTime::now()),
                "last_error": t.last_error.as_ref().map(|(_, e)| e),
                "last_error_at": t.last_error.as_ref().map(|(at, _)| rfc3339(*at)),
            })
        })
        .collect();
    let grants = state.grants.list();
    let pending = grants.iter().filter(|g| g.status == "pending").count();
    let sessions = state.sessions.views();
    let head = state.audit.head();
    let (depth, capacity) = state.audit.queue();
    let live_origins = state.kernel.live_origins();
    json!({
        "pid": std::process::id(),
        "version": env!("CARGO_PKG_VERSION"),
        "programs": {
            "attached": report.attached,
            "adopted": report.adopted,
            "pinned": pinned,
            "per_cgroup": report.per_cgroup,
            "unavailable": unavailable,
            "missing": missing,
        },
        "cgroups": cgroups,
        "identities": identities,
        "grants": { "live": grants.len() - pending, "pending": pending, "list": grants },
        "sessions": { "live": sessions.len(), "list": sessions },
        "audit": {
            "dir": state.audit.dir().display().to_string(),
            "seq": head.seq,
            "hash": head.hash,
            "last_checkpoint": head.checkpoint_seq.map(|seq| json!({ "seq": seq, "time": head.checkpoint_time })),
            "queue": { "depth": depth, "capacity": capacity },
            "stopped": state.audit.stopped_reason(),
            "unavailable": state.audit.unavailable_reason(),
        },
        "kernel": {
            "tags": kernel_tags.len(),
            "origins": live_origins,
            "targets": state.kernel.target_entries(),
            "allow": state.kernel.allow_entries(),
            "events_lost": state.kernel.events_lost(),
        },
        "shipping": state.shipping.as_ref().map_or_else(|| json!({ "enabled": false }), |s| json!(s.status())),
        "metrics": { "listen": (!state.config.metrics.listen.is_empty()).then(|| state.config.metrics.listen.clone()) },
        "targets": state.policy.current().targets().map(|t| t.name.clone()).collect::<Vec<_>>(),
        "proxy_listen": state.config.proxy_listen().iter().map(ToString::to_string).collect::<Vec<_>>(),
        // Kept from the first status format, for scripts that read them.
        "links": pinned,
        "live_origins": live_origins,
    })
}

/// Reads what the metrics sample rather than track; runs just before each scrape.
pub fn sample(state: &State, m: &Metrics) {
    let k = &state.kernel;
    m.bpf_map("tags", k.tags().len());
    m.bpf_map("origins", k.live_origins());
    m.bpf_map("targets", k.target_entries());
    m.bpf_map("allow", k.allow_entries());
    m.events_lost_total("ring_full", k.events_lost());
    let grants = state.grants.list();
    let pending = grants.iter().filter(|g| g.status == "pending").count();
    m.grants_pending.set(i64::try_from(pending).unwrap_or(i64::MAX));
    m.grants_live.set(i64::try_from(grants.len() - pending).unwrap_or(i64::MAX));
    let (depth, capacity) = state.audit.queue();
    m.audit_queue_depth.set(i64::try_from(depth).unwrap_or(i64::MAX));
    m.audit_queue_capacity.set(i64::try_from(capacity).unwrap_or(i64::MAX));
}

/// `shipping: off`, or where to and how far, what waits, and what went wrong last.
fn render_shipping(out: &mut String, s: &Value) {
    if s["enabled"] != true {
        out.push_str("shipping: off\n");
        return;
    }
    let through = if s["shipped_through"].is_null() {
        "nothing shipped yet".to_owned()
    } else {
        format!("shipped through seq {}", or_dash(&s["shipped_through"]))
    };
    let _ = write!(out, "shipping: s3://{}/{}; {through}", or_dash(&s["bucket"]), or_dash(&s["prefix"]));
    let last = &s["last_shipped"];
    if !last.is_null() {
        let _ = write!(
            out,
            " (last {} seq {}-{} at {})",
            or_dash(&last["segment"]),
            or_dash(&last["first_seq"]),
            or_dash(&last["last_seq"]),
            or_dash(&last["at"])
        );
    }
    let p = &s["pending"];
    let _ = write!(out, "; {} pending ({} bytes)", or_dash(&p["segments"]), or_dash(&p["bytes"]));
    if !s["next_attempt"].is_null() {
        let _ = write!(out, "; next attempt {}", or_dash(&s["next_attempt"]));
    }
    out.push('\n');
    let e = &s["last_error"];
    if !e.is_null() {
        let _ = writeln!(out, "  last error at {}: {}", or_dash(&e["at"]), or_dash(&e["error"]));
    }
    if !s["stopped"].is_null() {
        let _ = writeln!(out, "  SHIPPING STOPPED: {}", or_dash(&s["stopped"]));
    }
}

fn list(v: &Value) -> Vec<String> {
    v.as_array().map(|a| a.iter().filter_map(|x| x.as_str().map(str::to_owned)).collect()).unwrap_or_default()
}

fn or_dash(v: &Value) -> String {
    match v {
        Value::Null => "-".to_owned(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The readable summary `warden status` prints.
pub fn render(v: &Value) -> String {
    let mut out = String::new();
    let programs = &v["programs"];
    let _ = writeln!(out, "warden {} (pid {})", or_dash(&v["version"]), or_dash(&v["pid"]));
    let pinned = list(&programs["pinned"]);
    let _ = writeln!(
        out,
        "programs: {} pinned ({} attached now, {} adopted)",
        pinned.len(),
        list(&programs["attached"]).len(),
        list(&programs["adopted"]).len()
    );
    for u in programs["unavailable"].as_array().into_iter().flatten() {
        let _ = writeln!(out, "  unavailable: {}: {}", or_dash(&u["program"]), or_dash(&u["error"]));
    }
    for m in list(&programs["missing"]) {
        let _ = writeln!(out, "  NOT PINNED: {m}");
    }
    let cgroups = v["cgroups"].as_array().cloned().unwrap_or_default();
    let _ = writeln!(out, "tagged cgroups: {}", cgroups.len());
    for c in &cgroups {
        let kernel = if c["tagged_in_kernel"] == true { "" } else { "  (NOT tagged in the kernel)" };
        let _ = writeln!(out, "  {}  identity {}{kernel}", or_dash(&c["cgroup"]), or_dash(&c["identity"]));
    }
    let _ = writeln!(out, "identities:");
    for i in v["identities"].as_array().into_iter().flatten() {
        let token = if i["valid"] == true {
            format!("token valid until {}", or_dash(&i["valid_until"]))
        } else {
            "no valid token".to_owned()
        };
        let _ = write!(out, "  {}: {token}", or_dash(&i["name"]));
        if !i["last_error"].is_null() {
            let _ = write!(
                out,
                "; last error at {}: {}",
                or_dash(&i["last_error_at"]),
                or_dash(&i["last_error"])
            );
        }
        out.push('\n');
    }
    let grants = &v["grants"];
    let _ =
        writeln!(out, "grants: {} live, {} pending", or_dash(&grants["live"]), or_dash(&grants["pending"]));
    for grant in grants["list"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "  {} {} {} -> {} ({}, {} sessions)",
            or_dash(&grant["id"]),
            or_dash(&grant["status"]),
            or_dash(&grant["identity"]),
            or_dash(&grant["target"]),
            or_dash(&grant["access"]),
            or_dash(&grant["sessions"])
        );
    }
    let sessions = &v["sessions"];
    let _ = writeln!(out, "sessions: {} live", or_dash(&sessions["live"]));
    for session in sessions["list"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "  {} pid {} {} -> {} since {}",
            or_dash(&session["session"]),
            or_dash(&session["pid"]),
            or_dash(&session["identity"]),
            or_dash(&session["target"]),
            or_dash(&session["started"])
        );
    }
    let a = &v["audit"];
    let checkpoint = &a["last_checkpoint"];
    let _ = writeln!(
        out,
        "audit: seq {} hash {}; last checkpoint {}; queue {}/{}",
        or_dash(&a["seq"]),
        or_dash(&a["hash"]),
        if checkpoint.is_null() {
            "none".to_owned()
        } else {
            format!("seq {} at {}", or_dash(&checkpoint["seq"]), or_dash(&checkpoint["time"]))
        },
        or_dash(&a["queue"]["depth"]),
        or_dash(&a["queue"]["capacity"])
    );
    if !a["unavailable"].is_null() {
        let _ = writeln!(
            out,
            "  AUDIT UNAVAILABLE (new sessions refused, retrying): {}",
            or_dash(&a["unavailable"])
        );
    }
    if !a["stopped"].is_null() {
        let _ = writeln!(out, "  AUDIT STOPPED: {}", or_dash(&a["stopped"]));
    }
    let k = &v["kernel"];
    let _ = writeln!(
        out,
        "kernel maps: {} tags, {} origins, {} target entries; {} events lost",
        or_dash(&k["tags"]),
        or_dash(&k["origins"]),
        or_dash(&k["targets"]),
        or_dash(&k["events_lost"])
    );
    render_shipping(&mut out, &v["shipping"]);
    let metrics =
        v["metrics"]["listen"].as_str().map_or_else(|| "off".to_owned(), |l| format!("http://{l}/metrics"));
    let _ = writeln!(out, "metrics: {metrics}");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_summary_names_what_is_wrong() {
        let v = json!({
            "version": "0.1.0", "pid": 7,
            "programs": { "pinned": ["a"], "attached": [], "adopted": ["a"],
                          "unavailable": [{ "program": "warden_socket_create", "error": "EPERM" }],
                          "missing": ["warden_bind4"] },
            "cgroups": [{ "cgroup": "/agents/a", "identity": "bot", "tagged_in_kernel": false }],
            "identities": [{ "name": "bot", "valid": false, "valid_until": null,
                             "last_error": "identity provider unreachable", "last_error_at": "2026-01-01T00:00:00Z" }],
            "grants": { "live": 1, "pending": 0, "list": [] },
            "sessions": { "live": 0, "list": [] },
            "audit": { "seq": 12, "hash": "ab", "last_checkpoint": { "seq": 10, "time": "t" },
                       "queue": { "depth": 0, "capacity": 8192 }, "stopped": null },
            "kernel": { "tags": 1, "origins": 0, "targets": 3, "events_lost": 0 },
            "shipping": { "enabled": false },
            "metrics": { "listen": "127.0.0.1:9464" },
        });
        let text = render(&v);
        for want in [
            "unavailable: warden_socket_create: EPERM",
            "NOT PINNED: warden_bind4",
            "/agents/a  identity bot  (NOT tagged in the kernel)",
            "bot: no valid token; last error at 2026-01-01T00:00:00Z: identity provider unreachable",
            "grants: 1 live, 0 pending",
            "audit: seq 12 hash ab; last checkpoint seq 10 at t; queue 0/8192",
            "shipping: off",
            "metrics: http://127.0.0.1:9464/metrics",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
    }

    #[test]
    fn the_shipping_line_says_how_far_what_waits_and_what_failed() {
        let mut out = String::new();
        render_shipping(
            &mut out,
            &json!({
                "enabled": true, "bucket": "audit-lock", "prefix": "hosts/web-1/", "shipped_through": 41,
                "last_shipped": { "segment": "audit-00000000000000000001.jsonl", "first_seq": 1,
                                  "last_seq": 41, "at": "2026-01-01T00:00:00Z" },
                "pending": { "segments": 2, "bytes": 900 },
                "last_error": { "error": "cannot put k: connection refused", "at": "2026-01-01T00:01:00Z" },
                "next_attempt": "2026-01-01T00:01:04Z",
                "stopped": "the bucket already holds different bytes",
            }),
        );
        for want in [
            "shipping: s3://audit-lock/hosts/web-1/; shipped through seq 41 (last \
             audit-00000000000000000001.jsonl seq 1-41 at 2026-01-01T00:00:00Z); 2 pending (900 bytes); next \
             attempt 2026-01-01T00:01:04Z\n",
            "  last error at 2026-01-01T00:01:00Z: cannot put k: connection refused\n",
            "  SHIPPING STOPPED: the bucket already holds different bytes\n",
        ] {
            assert!(out.contains(want), "missing {want:?} in\n{out}");
        }
        let mut off = String::new();
        render_shipping(&mut off, &json!({ "enabled": false }));
        assert_eq!(off, "shipping: off\n");
    }
}
