//! Observing a real daemon: `/metrics` on `[metrics] listen` moves with sessions, refusals, tokens, grants
//! and the kernel maps; `warden status --json` shows the same state; `log_format = "json"` writes one JSON
//! object per line whose session lines carry the session span, and no credential is ever logged.

#[path = "../../agent/tests/support/prometheus_text.rs"]
mod prometheus_text;

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::TcpStream;
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;

use crate::harness::{IdentitySpec, Idp, Server, Warden, free_port, privileged, tcp_policy, wait_for};
use prometheus_text::Exposition;

/// `GET /metrics` over loopback, parsed (the parser checks the whole exposition).
fn scrape(port: u16) -> Exposition {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to the metrics endpoint");
    write!(s, "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("read the scrape");
    let (head, body) = raw.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.to_ascii_lowercase().contains("content-type: text/plain; version=0.0.4"), "{head}");
    // The body may come chunked or with a length; hyper sends a length for a whole body.
    prometheus_text::parse(body).unwrap_or_else(|e| panic!("not the Prometheus text format: {e}\n{body}"))
}

fn status(daemon: &Warden) -> Value {
    let out = daemon.cli(&["status", "--json"]);
    assert!(out.status.success(), "warden status --json: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("status is JSON")
}

#[test]
fn metrics_status_and_json_logs_follow_a_session() {
    if !privileged("metrics_status_and_json_logs_follow_a_session") {
        return;
    }
    let idp = Idp::start();
    let db = Server::start("127.0.0.5", "db");
    let port = free_port();
    let warden = Warden::builder("observe")
        .policy(&tcp_policy("db", db.addr, "5m"))
        .identity(IdentitySpec::pkjwt(&idp, "bot"), &idp.issuer)
        .agent_extra("log_format = \"json\"\n")
        .config_extra(&format!("[metrics]\nlisten = \"127.0.0.1:{port}\"\n"))
        .start();
    let first_scrape = wait_for("the metrics endpoint", Duration::from_secs(10), || {
        TcpStream::connect(("127.0.0.1", port)).ok().map(|_| scrape(port))
    });
    assert_eq!(first_scrape.value("warden_bpf_map_entries", &[("map", "tags")]), Some(0.0));
    assert!(first_scrape.value("warden_bpf_map_entries", &[("map", "targets")]).unwrap() >= 1.0);
    assert_eq!(first_scrape.value("warden_sessions_total", &[]), None, "no session yet");

    let cg = warden.cgroup("agent");
    warden.tag(&cg, "bot");
    assert_eq!(scrape(port).value("warden_bpf_map_entries", &[("map", "tags")]), Some(1.0));

    // A session held open: it is live in the metrics and in status, with its origin in the kernel's map.
    let script = crate::harness::probe_script();
    let mut holder = cg
        .command("python3", &[script.to_str().unwrap(), "holder", "127.0.0.5", &db.addr.port().to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("holder");
    let mut lines = BufReader::new(holder.stdout.take().unwrap()).lines();
    let first = lines.next().expect("holder output").expect("holder line");
    let held: Value = serde_json::from_str(&first).expect("holder JSON");
    assert_eq!(held["ok"], true, "{held}");
    let start = warden.wait_record("session.start", |r| r["event"] == "session.start");
    let live = scrape(port);
    let db_tcp = [("target", "db"), ("protocol", "tcp")];
    assert_eq!(live.value("warden_sessions_live", &db_tcp), Some(1.0));
    assert!(live.value("warden_bpf_map_entries", &[("map", "origins")]).unwrap() >= 1.0);
    assert_eq!(live.value("warden_grants_live", &[]), Some(1.0));
    assert_eq!(live.value("warden_grants_issued_total", &[("target", "db")]), Some(1.0));
    assert!(
        live.value("warden_token_fetches_total", &[("identity", "bot"), ("outcome", "ok")]).unwrap() >= 1.0
    );
    assert!(
        live.value("warden_token_verifications_total", &[("identity", "bot"), ("outcome", "ok")]).unwrap()
            >= 1.0
    );
    assert!(live.value("warden_token_fetch_duration_seconds_count", &[("identity", "bot")]).unwrap() >= 1.0);

    let st = status(&warden);
    assert!(!st["programs"]["pinned"].as_array().unwrap().is_empty(), "{st}");
    assert_eq!(st["programs"]["missing"], serde_json::json!([]), "{st}");
    let cgroup = &st["cgroups"][0];
    assert_eq!(cgroup["cgroup"], cg.rel(), "{st}");
    assert_eq!(cgroup["identity"], "bot", "{st}");
    assert_eq!(cgroup["tagged_in_kernel"], true, "{st}");
    let ident = &st["identities"][0];
    assert_eq!(ident["name"], "bot", "{st}");
    assert_eq!(ident["valid"], true, "{st}");
    assert!(ident["valid_until"].is_string(), "{st}");
    assert_eq!(st["grants"]["live"], 1, "{st}");
    assert_eq!(st["grants"]["list"][0]["target"], "db", "{st}");
    assert_eq!(st["sessions"]["live"], 1, "{st}");
    assert_eq!(st["sessions"]["list"][0]["session"], start["session"], "{st}");
    assert!(st["audit"]["seq"].as_u64().unwrap() >= start["seq"].as_u64().unwrap(), "{st}");
    assert_eq!(st["audit"]["hash"].as_str().map(str::len), Some(64), "{st}");
    assert!(st["audit"]["queue"]["capacity"].as_u64().unwrap() > 0, "{st}");
    assert_eq!(st["shipping"]["enabled"], false, "{st}");
    assert_eq!(st["kernel"]["tags"], 1, "{st}");
    // checkpoint_seconds = 1 in the harness: a checkpoint follows within seconds.
    let st = wait_for("a checkpoint in status", Duration::from_secs(10), || {
        let now = status(&warden);
        now["audit"]["last_checkpoint"]["seq"].is_u64().then_some(now)
    });
    assert!(st["audit"]["last_checkpoint"]["time"].is_string(), "{st}");
    let text = warden.cli(&["status"]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("tagged cgroups: 1") && text.contains("sessions: 1 live"), "{text}");
    assert!(text.contains("bot: token valid until"), "{text}");

    // The session ends: counted with its outcome; its origin leaves the kernel's map.
    writeln!(holder.stdin.take().unwrap()).unwrap();
    let _ = holder.wait();
    warden.wait_record("session.end", |r| r["event"] == "session.end" && r["session"] == start["session"]);
    let ended = wait_for("the origin to leave the map", Duration::from_secs(10), || {
        let m = scrape(port);
        (m.value("warden_bpf_map_entries", &[("map", "origins")]) == Some(0.0)).then_some(m)
    });
    assert_eq!(ended.value("warden_sessions_total", &db_tcp), Some(1.0));
    assert_eq!(ended.value("warden_sessions_live", &db_tcp), Some(0.0));
    assert_eq!(ended.value("warden_session_duration_seconds_count", &db_tcp), Some(1.0));
    assert_eq!(
        ended.value("warden_session_bytes_total", &[("target", "db"), ("direction", "down")]),
        Some(9.0),
        "the greeting `hello db\\n`"
    );
    assert!(ended.value("warden_audit_records_total", &[]).unwrap() >= 3.0);
    assert!(ended.value("warden_audit_fsync_duration_seconds_count", &[]).unwrap() >= 1.0);

    // A kernel refusal is counted by kind and code.
    let other = Server::start("127.0.0.6", "other");
    let refused = cg.probe(&["connect", "127.0.0.6", &other.addr.port().to_string()]);
    assert_eq!(refused["ok"], false, "{refused}");
    wait_for("the kernel refusal in the metrics", Duration::from_secs(10), || {
        let n = scrape(port).value("warden_refusals_total", &[("kind", "kernel"), ("code", "connect")])?;
        (n >= 1.0).then_some(())
    });

    // The log: every line is JSON; the session's lines carry its span with identity and target.
    let log = warden.log();
    let mut session_lines = 0;
    for line in log.lines().filter(|l| l.starts_with('{')) {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        if v["fields"]["message"] == "session ended" && v["span"]["session"] == start["session"] {
            let span = &v["span"];
            assert_eq!(span["pid"].as_u64(), start["pid"].as_u64(), "{line}");
            assert_eq!(span["cgroup"], cg.rel(), "{line}");
            assert_eq!(span["identity"], "bot", "{line}");
            assert_eq!(span["target"], "db", "{line}");
            session_lines += 1;
        }
    }
    assert_eq!(session_lines, 1, "one `session ended` line for the session:\n{log}");
    let non_json: Vec<&str> = log.lines().filter(|l| !l.starts_with('{')).collect();
    assert!(non_json.is_empty(), "log_format json writes only JSON lines: {non_json:?}");
    // No credential in any line: no JWT (access tokens and client assertions start `eyJ`), no key material.
    assert!(!log.contains("eyJ"), "a JWT was logged:\n{log}");
    assert!(!log.contains("PRIVATE KEY"), "key material was logged:\n{log}");
}
