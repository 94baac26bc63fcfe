//! Okta identities verified at the boundary, through the real daemon and a real OpenID provider.

use std::time::Duration;

use serde_json::Value;

use crate::dataplane::assert_reached;
use crate::harness::{IdentitySpec, Idp, Server, Warden, privileged, tcp_policy, wait_for};

fn idp_stats(idp: &Idp) -> Value {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", idp.port)).unwrap();
    write!(s, "GET /admin/stats HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    serde_json::from_str(out.split("\r\n\r\n").nth(1).unwrap_or("{}")).unwrap()
}

fn refused(w: &Warden, cg: &crate::harness::TestCgroup, port: u16) -> Value {
    let v = cg.probe(&["connect", "127.0.0.5", &port.to_string()]);
    assert_eq!(v["ok"], false, "the session must not reach the target: {v}");
    w.wait_record("session.refused", |r| r["event"] == "session.refused")
}

#[test]
fn private_key_jwt_and_client_secret_identities_get_through_and_are_named() {
    if !privileged("private_key_jwt_and_client_secret_identities_get_through_and_are_named") {
        return;
    }
    let idp = Idp::start();
    let db = Server::start("127.0.0.5", "db");
    // The secret client's token carries groups "agents-ops"; the operator maps it into agents-research
    // locally, as Okta service apps have no groups of their own.
    let mut secret = IdentitySpec::secret(&idp, "ops-bot", "agent-secret-basic");
    secret.groups = vec!["agents-research".into()];
    let w = Warden::builder("idok")
        .policy(&tcp_policy("db", db.addr, "5m"))
        .identity(IdentitySpec::pkjwt(&idp, "research-bot"), &idp.issuer)
        .identity(secret, &idp.issuer)
        .start();
    let port = db.addr.port().to_string();
    for (name, client, group) in [
        ("research-bot", "agent-pkjwt-rs", "agents-research"),
        ("ops-bot", "agent-secret-basic", "agents-ops"),
    ] {
        let cg = w.cgroup(name);
        w.tag(&cg, name);
        assert_reached(&cg.probe(&["connect", "127.0.0.5", &port]), "db");
        let start = w
            .wait_record("session.start", |r| r["event"] == "session.start" && r["identity"]["name"] == name);
        assert_eq!(start["identity"]["client_id"], client, "{start}");
        assert_eq!(start["identity"]["sub"], client, "{start}");
        let groups: Vec<&str> =
            start["identity"]["groups"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
        assert!(groups.contains(&group), "token groups recorded: {start}");
        if name == "ops-bot" {
            assert!(groups.contains(&"agents-research"), "local groups recorded: {start}");
        }
    }
    // Nothing about the token itself is in the record or the log.
    let everything = std::fs::read_dir(w.audit_dir())
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
        .collect::<String>()
        + &w.log();
    assert!(!everything.contains("eyJ"), "a JWT (or part of one) leaked into the record or the log");
}

#[test]
fn a_disabled_client_or_a_wrong_audience_is_refused_with_the_reason() {
    if !privileged("a_disabled_client_or_a_wrong_audience_is_refused_with_the_reason") {
        return;
    }
    let idp = Idp::start();
    let db = Server::start("127.0.0.5", "db");
    let mut wrong_aud = IdentitySpec::pkjwt(&idp, "wrong-aud");
    wrong_aud.audience = "api://someone-else".into();
    let mut disabled = IdentitySpec::secret(&idp, "disabled", "agent-secret-post");
    disabled.auth.push_str("\ntoken_endpoint_auth_method = \"client_secret_post\"");
    let w = Warden::builder("idbad")
        .policy(&tcp_policy("db", db.addr, "5m"))
        .identity(wrong_aud, &idp.issuer)
        .identity(disabled, &idp.issuer)
        .start();
    idp.admin("/admin/disable?client=agent-secret-post");

    let cg = w.cgroup("a");
    w.tag(&cg, "wrong-aud");
    let rec = refused(&w, &cg, db.addr.port());
    assert_eq!(rec["code"], "identity", "{rec}");
    let rejected =
        w.wait_record("token.rejected", |r| r["event"] == "token.rejected" && r["identity"] == "wrong-aud");
    assert_eq!(rejected["reason"], "wrong_audience", "{rejected}");

    let cg = w.cgroup("b");
    w.tag(&cg, "disabled");
    let v = cg.probe(&["connect", "127.0.0.5", &db.addr.port().to_string()]);
    assert_eq!(v["ok"], false, "{v}");
    let rejected =
        w.wait_record("token.rejected", |r| r["event"] == "token.rejected" && r["identity"] == "disabled");
    assert_eq!(rejected["reason"], "token_request_refused", "{rejected}");
    assert_eq!(db.clients(), 0, "no unverified session reached the target");
}

#[test]
fn keys_rotated_at_the_provider_are_picked_up_and_a_down_provider_refuses_cleanly() {
    if !privileged("keys_rotated_at_the_provider_are_picked_up_and_a_down_provider_refuses_cleanly") {
        return;
    }
    let mut idp = Idp::start();
    let db = Server::start("127.0.0.5", "db");
    // agent-short's tokens live 5 s, so Warden needs a fresh one (signed with the new key) soon.
    let mut short = IdentitySpec::secret(&idp, "short", "agent-short");
    short.groups = vec!["agents-research".into()];
    let w = Warden::builder("idrot")
        .policy(&tcp_policy("db", db.addr, "5m"))
        .identity(short, &idp.issuer)
        .start();
    let cg = w.cgroup("agent");
    w.tag(&cg, "short");
    let port = db.addr.port().to_string();
    assert_reached(&cg.probe(&["connect", "127.0.0.5", &port]), "db");
    let before = idp_stats(&idp);
    idp.admin("/admin/rotate?drop_old=1");
    // Sessions keep going; once the short token is renewed, it is signed with the new key, which Warden
    // finds by fetching the JWKS again (no restart).
    let mut reached = 0;
    wait_for("a session verified with the rotated key", Duration::from_secs(30), || {
        let v = cg.probe(&["connect", "127.0.0.5", &port]);
        assert_eq!(v["ok"], true, "sessions keep working across the rotation: {v}");
        reached += 1;
        let now = idp_stats(&idp);
        let renewed = now["token"].as_u64() > before["token"].as_u64()
            && now["jwks"].as_u64() > before["jwks"].as_u64();
        std::thread::sleep(Duration::from_millis(500));
        renewed.then_some(())
    });
    assert_reached(&cg.probe(&["connect", "127.0.0.5", &port]), "db");
    let starts = w.records().iter().filter(|r| r["event"] == "session.start").count();
    assert_eq!(starts, reached + 2);

    // The provider goes away: once the cached token has expired, new sessions are refused, cleanly.
    idp.stop();
    let mut served_from_cache = 0;
    wait_for("a session refused for want of a verifiable identity", Duration::from_secs(30), || {
        let v = cg.probe(&["connect", "127.0.0.5", &port]);
        if v["ok"] == true {
            served_from_cache += 1; // the cached token is still valid: that is fine
            std::thread::sleep(Duration::from_millis(300));
            return None;
        }
        Some(())
    });
    w.wait_record("idp.unreachable", |r| r["event"] == "idp.unreachable");
    let rec = w.wait_record("session.refused", |r| r["event"] == "session.refused");
    assert_eq!(rec["code"], "identity", "{rec}");
    assert_eq!(db.clients(), reached + 2 + served_from_cache);
    // The daemon is still up and answering.
    assert!(w.cli(&["status"]).status.success());
}
