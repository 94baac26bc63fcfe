//! Policy and time-bound grants through the real daemon, with the real clock.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::dataplane::assert_reached;
use crate::harness::{IdentitySpec, Idp, Server, TestCgroup, Warden, privileged, tcp_policy, wait_for};

fn start(name: &str, idp: &Idp, policy: &str) -> Warden {
    Warden::builder(name).policy(policy).identity(IdentitySpec::pkjwt(idp, "bot"), &idp.issuer).start()
}

fn json(out: &std::process::Output) -> Value {
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("json output")
}

/// Runs `probe.py hold` in the background; the handle yields its JSON answer.
fn hold(cg: &TestCgroup, server: &Server, secs: u32) -> std::thread::JoinHandle<Value> {
    let port = server.addr.port().to_string();
    let secs = secs.to_string();
    let cg_path = cg.path.clone();
    let cg = TestCgroup::adopt(cg_path);
    std::thread::spawn(move || cg.probe(&["hold", "127.0.0.5", &port, &secs]))
}

/// Waits for a live session (as `warden sessions --json` shows it) and returns it.
fn live_session(w: &Warden) -> Value {
    wait_for("a live session", Duration::from_secs(10), || {
        let list = json(&w.cli(&["sessions", "--json"]));
        list.as_array()?.first().cloned()
    })
}

#[test]
fn a_grant_expires_on_its_own_cuts_its_session_and_is_not_renewed() {
    if !privileged("a_grant_expires_on_its_own_cuts_its_session_and_is_not_renewed") {
        return;
    }
    let idp = Idp::start();
    let db = Server::start("127.0.0.5", "db");
    let w = start("expiry", &idp, &tcp_policy("db", db.addr, "3s"));
    let cg = w.cgroup("agent");
    w.tag(&cg, "bot");

    let began = Instant::now();
    let v = hold(&cg, &db, 15).join().unwrap();
    let held = began.elapsed();
    assert_eq!(v["ok"], true, "{v}");
    assert_ne!(v["ended"], "still open", "the session must be cut at expiry: {v}");
    assert!(
        held >= Duration::from_millis(2500) && held < Duration::from_secs(10),
        "cut after ~3 s, not {held:?}: {v}"
    );
    let expired = w.wait_record("grant.expired", |r| r["event"] == "grant.expired");
    let end = w.wait_record("session.end", |r| r["event"] == "session.end");
    assert_eq!(end["reason"], "grant_expired", "{end}");
    assert_eq!(end["grant"].as_str().or(expired["grant"].as_str()), expired["grant"].as_str());

    // Reconnecting is refused: a task's grant does not renew itself.
    let v = cg.probe(&["connect", "127.0.0.5", &db.addr.port().to_string()]);
    assert_eq!(v["ok"], false, "{v}");
    let refused = w.wait_record("session.refused", |r| r["event"] == "session.refused");
    assert_eq!(refused["code"], "grant", "{refused}");
    assert!(refused["reason"].as_str().unwrap().contains("does not renew"), "{refused}");
    assert_eq!(db.clients(), 1);

    // An operator can issue a fresh one; then it works again.
    let out = w.cli(&[
        "grant",
        "issue",
        "--identity",
        "bot",
        "--target",
        "db",
        "--cgroup",
        cg.path.to_str().unwrap(),
        "--json",
    ]);
    let issued = json(&out);
    assert_eq!(issued["status"], "active", "{issued}");
    assert_reached(&cg.probe(&["connect", "127.0.0.5", &db.addr.port().to_string()]), "db");
}

#[test]
fn approval_holds_the_connection_until_an_operator_approves() {
    if !privileged("approval_holds_the_connection_until_an_operator_approves") {
        return;
    }
    let idp = Idp::start();
    let db = Server::start("127.0.0.5", "db");
    let policy = tcp_policy("db", db.addr, "5m").replace("ttl: 5m", "ttl: 5m\n        approval: required");
    let w = start("approval", &idp, &policy);
    let cg = w.cgroup("agent");
    w.tag(&cg, "bot");
    let port = db.addr.port().to_string();
    let cg2 = TestCgroup::adopt(cg.path.clone());
    let waiting = std::thread::spawn(move || cg2.probe(&["connect", "127.0.0.5", &port]));

    let pending = wait_for("a pending grant", Duration::from_secs(10), || {
        let list = json(&w.cli(&["grants", "--json"]));
        list.as_array()?.iter().find(|g| g["status"] == "pending").cloned()
    });
    assert_eq!(db.clients(), 0, "nothing reaches the target before approval");
    let table = w.cli(&["grants"]);
    assert!(String::from_utf8_lossy(&table.stdout).contains("pending"), "readable table");
    let id = pending["id"].as_str().unwrap();
    let out = w.cli(&["grant", "approve", id]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v = waiting.join().unwrap();
    assert_reached(&v, "db");
    w.wait_record("grant.approved", |r| r["event"] == "grant.approved");
}

#[test]
fn revocation_and_kill_end_live_sessions_at_once() {
    if !privileged("revocation_and_kill_end_live_sessions_at_once") {
        return;
    }
    let idp = Idp::start();
    let db = Server::start("127.0.0.5", "db");
    let w = start("revoke", &idp, &tcp_policy("db", db.addr, "10m"));
    let cg = w.cgroup("agent");
    w.tag(&cg, "bot");

    // `warden sessions kill` ends one session.
    let h = hold(&cg, &db, 20);
    let live = live_session(&w);
    assert_eq!(live["target"], "db", "{live}");
    let table = w.cli(&["sessions"]);
    assert!(String::from_utf8_lossy(&table.stdout).contains("SESSION"), "readable table");
    let out = w.cli(&["sessions", "kill", live["session"].as_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v = h.join().unwrap();
    assert_ne!(v["ended"], "still open", "{v}");
    let end = w.wait_record("killed session.end", |r| {
        r["event"] == "session.end" && r["session"] == live["session"]
    });
    assert_eq!(end["reason"], "killed_by_operator", "{end}");

    // `warden grant revoke` ends the grant and every session under it.
    let h = hold(&cg, &db, 20);
    live_session(&w);
    let grant = json(&w.cli(&["grants", "--json"]))[0].clone();
    let began = Instant::now();
    let out = w.cli(&["grant", "revoke", grant["id"].as_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v = h.join().unwrap();
    assert_ne!(v["ended"], "still open", "{v}");
    assert!(began.elapsed() < Duration::from_secs(5), "revocation cuts at once");
    w.wait_record("grant.revoked", |r| r["event"] == "grant.revoked");
    w.wait_record("revoked session.end", |r| r["event"] == "session.end" && r["reason"] == "grant_revoked");
}

#[test]
fn removing_a_target_ends_its_sessions_as_a_policy_change() {
    if !privileged("removing_a_target_ends_its_sessions_as_a_policy_change") {
        return;
    }
    let idp = Idp::start();
    let db = Server::start("127.0.0.5", "db");
    let other = Server::start("127.0.0.6", "other");
    // Two targets; the edit removes `db`: its grant ends and its sessions are cut, both as policy_changed.
    let w = start("rmtarget", &idp, &policy_of_two(&db, &other));
    let cg = w.cgroup("agent");
    w.tag(&cg, "bot");

    let h = hold(&cg, &db, 20);
    let live = live_session(&w);
    std::fs::write(w.policy_path(), tcp_policy("other", other.addr, "10m")).unwrap();
    let v = h.join().unwrap();
    assert_ne!(v["ended"], "still open", "{v}");
    let end = w.wait_record("the removed target's session.end", |r| {
        r["event"] == "session.end" && r["session"] == live["session"]
    });
    assert_eq!(end["reason"], "policy_changed", "the true cause, never killed_by_operator: {end}");
}

/// A policy with targets `db` and `other`, both granted to the research group.
fn policy_of_two(db: &Server, other: &Server) -> String {
    [
        "targets:".to_owned(),
        "  db:".into(),
        "    protocol: tcp".into(),
        format!("    address: \"{}\"", db.addr),
        "  other:".into(),
        "    protocol: tcp".into(),
        format!("    address: \"{}\"", other.addr),
        "rules:".into(),
        "  - name: research reaches both".into(),
        "    match: { groups: [agents-research] }".into(),
        "    grant:".into(),
        "      - target: db".into(),
        "        access: connect".into(),
        "        ttl: 10m".into(),
        "      - target: other".into(),
        "        access: connect".into(),
        "        ttl: 10m".into(),
        String::new(),
    ]
    .join("\n")
}

#[test]
fn no_matching_rule_is_refused_and_a_bad_policy_edit_keeps_the_old_policy() {
    if !privileged("no_matching_rule_is_refused_and_a_bad_policy_edit_keeps_the_old_policy") {
        return;
    }
    let idp = Idp::start();
    let db = Server::start("127.0.0.5", "db");
    let good = tcp_policy("db", db.addr, "10m");
    let w = start("policy", &idp, &good.replace("agents-research", "some-other-group"));
    let cg = w.cgroup("agent");
    w.tag(&cg, "bot");
    let port = db.addr.port().to_string();

    // The identity's groups match no rule: refused, and the record says why.
    let v = cg.probe(&["connect", "127.0.0.5", &port]);
    assert_eq!(v["ok"], false, "{v}");
    let rec = w.wait_record("session.refused", |r| r["event"] == "session.refused");
    assert_eq!(rec["code"], "policy", "{rec}");
    assert!(rec["reason"].as_str().unwrap().contains("no rule"), "{rec}");
    assert_eq!(rec["identity"]["client_id"], "agent-pkjwt-rs", "{rec}");

    // A good edit applies (the file watcher picks it up) and the identity gets through.
    std::fs::write(w.policy_path(), &good).unwrap();
    w.wait_record("policy.reloaded applied", |r| {
        r["event"] == "policy.reloaded" && r["outcome"] == "applied"
    });
    assert_reached(&cg.probe(&["connect", "127.0.0.5", &port]), "db");

    // A live session the next policy no longer allows is ended.
    let h = hold(&cg, &db, 20);
    live_session(&w);
    std::fs::write(w.policy_path(), good.replace("agents-research", "another-group")).unwrap();
    let v = h.join().unwrap();
    assert_ne!(v["ended"], "still open", "{v}");
    w.wait_record("policy-ended session", |r| r["event"] == "session.end" && r["reason"] == "policy_changed");
    std::fs::write(w.policy_path(), &good).unwrap();
    wait_for("the policy to allow again", Duration::from_secs(10), || {
        let n = w
            .records()
            .iter()
            .filter(|r| r["event"] == "policy.reloaded" && r["outcome"] == "applied")
            .count();
        (n >= 3).then_some(())
    });
    // The grant that policy ended is spent for this task; an operator issues a fresh one.
    let out = w.cli(&[
        "grant",
        "issue",
        "--identity",
        "bot",
        "--target",
        "db",
        "--cgroup",
        cg.path.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // An edit with a typo is rejected whole; the old policy keeps working.
    std::fs::write(w.policy_path(), good.replace("access: connect", "acess: connect")).unwrap();
    let nix_pid = nix::unistd::Pid::from_raw(i32::try_from(w.pid().unwrap()).unwrap());
    nix::sys::signal::kill(nix_pid, nix::sys::signal::Signal::SIGHUP).unwrap();
    let rejected = w.wait_record("policy.reloaded rejected", |r| {
        r["event"] == "policy.reloaded" && r["outcome"] == "rejected"
    });
    assert!(rejected.to_string().contains("acess"), "the record names the error: {rejected}");
    assert_reached(&cg.probe(&["connect", "127.0.0.5", &port]), "db");
    assert!(w.cli(&["status"]).status.success());
}
