//! The audit record under crashes: `kill -9` of the daemon during a load of sessions, repeated.

use std::collections::HashSet;

use serde_json::Value;

use crate::dataplane::setup;
use crate::harness::{Idp, Server, privileged};

#[test]
fn kill9_under_load_loses_no_session_a_client_saw_start() {
    if !privileged("kill9_under_load_loses_no_session_a_client_saw_start") {
        return;
    }
    let idp = Idp::start();
    let db = Server::start("127.0.0.5", "db");
    let mut w = setup("auditcrash", &idp, &db, &[]);
    let cg = w.cgroup("agent");
    w.tag(&cg, "bot");
    let port = db.addr.port().to_string();
    let starts =
        |w: &crate::harness::Warden| w.records().iter().filter(|r| r["event"] == "session.start").count();
    let mut seen: Vec<u64> = Vec::new();
    for round in 0..3 {
        // 24 agents connect at once; the daemon is killed while they do.
        let probes: Vec<_> = (0..24)
            .map(|_| {
                let c = crate::harness::TestCgroup::adopt(cg.path.clone());
                let p = port.clone();
                std::thread::spawn(move || c.probe(&["connect", "127.0.0.5", &p]))
            })
            .collect();
        // Kill it once some of this round's sessions have started, while the rest are in flight.
        let before = starts(&w);
        crate::harness::wait_for("sessions under way", std::time::Duration::from_secs(20), || {
            (starts(&w) >= before + 4 + 3 * round).then_some(())
        });
        w.kill9();
        for p in probes {
            let v: Value = p.join().unwrap();
            // A client that got the server's greeting saw its session start: session.start was durable
            // before the first byte went upstream.
            // (A connection the dying proxy merely closed reads an empty stream: it saw nothing start.)
            if v["ok"] == true && v["data"].as_str().is_some_and(|d| d.starts_with("hello db")) {
                seen.push(v["pid"].as_u64().unwrap());
            }
        }
        w.spawn();
        let out = w.cli(&["audit", "verify", "--dir", w.audit_dir().to_str().unwrap()]);
        assert!(
            out.status.success(),
            "round {round}: the chain must verify after kill -9: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let recorded: HashSet<u64> = w
        .records()
        .into_iter()
        .filter(|r| r["event"] == "session.start")
        .filter_map(|r| r["pid"].as_u64())
        .collect();
    assert!(!seen.is_empty(), "some sessions must have started under load");
    for pid in &seen {
        assert!(
            recorded.contains(pid),
            "process {pid} saw its session start but no session.start names it (recorded: {recorded:?})"
        );
    }
    assert!(w.records().iter().any(|r| r["event"] == "recovered"), "each restart records what it recovered");
}
