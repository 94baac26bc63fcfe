//! The enforced data path: a tagged cgroup's TCP goes through Warden or nowhere.

use serde_json::Value;

use crate::harness::{
    IdentitySpec, Idp, Server, Warden, privileged, probe_untagged, tcp_policy, uring_probe,
};

pub const EPERM: i64 = 1;
const ECONNREFUSED: i64 = 111;

pub fn errno(v: &Value) -> Option<i64> {
    v["errno"].as_i64()
}

pub fn assert_reached(v: &Value, server: &str) {
    assert_eq!(v["ok"], true, "expected a connection: {v}");
    let greeting = format!("hello {server}\n");
    assert!(
        v["data"].as_str().unwrap_or_default().starts_with(&greeting),
        "expected {greeting:?} first: {v}"
    );
}

/// A daemon whose policy has one target (`db` at 127.0.0.5) reachable by the IdP's agents-research group.
pub fn setup(name: &str, idp: &Idp, target: &Server, extra_allow: &[&str]) -> Warden {
    let mut b = Warden::builder(name)
        .policy(&tcp_policy("db", target.addr, "5m"))
        .identity(IdentitySpec::pkjwt(idp, "bot"), &idp.issuer);
    for a in extra_allow {
        b = b.allow(a);
    }
    b.start()
}

#[test]
fn tagged_process_reaches_a_target_only_through_the_proxy() {
    if !privileged("tagged_process_reaches_a_target_only_through_the_proxy") {
        return;
    }
    let idp = Idp::start();
    let db = Server::start("127.0.0.5", "db");
    let w = setup("through", &idp, &db, &[]);
    let cg = w.cgroup("agent");
    w.tag(&cg, "bot");

    let v = cg.probe(&["connect", "127.0.0.5", &db.addr.port().to_string()]);
    assert_reached(&v, "db");
    // The process sees the real peer, not the proxy.
    assert_eq!(v["peer"], serde_json::json!(["127.0.0.5", db.addr.port()]), "getpeername: {v}");
    let pid = v["pid"].as_u64().unwrap();

    let start = w.wait_record("session.start", |r| r["event"] == "session.start");
    assert_eq!(start["pid"].as_u64(), Some(pid), "{start}");
    assert_eq!(start["cgroup"], cg.rel(), "{start}");
    assert_eq!(start["dst"], db.addr.to_string(), "{start}");
    assert_eq!(start["target"], "db", "{start}");
    assert_eq!(start["identity"]["client_id"], "agent-pkjwt-rs", "{start}");
    let end =
        w.wait_record("session.end", |r| r["event"] == "session.end" && r["session"] == start["session"]);
    assert_eq!(end["bytes_down"].as_u64(), Some("hello db\n".len() as u64), "{end}");
    assert!(end["duration_ms"].is_u64() && end["reason"].is_string(), "{end}");
    // The upstream saw the connection come from Warden, once.
    assert_eq!(db.clients(), 1);

    // An AF_INET6 socket to the IPv4-mapped form is the same target, through the same proxy.
    let v = cg.probe(&["connect", "::ffff:127.0.0.5", &db.addr.port().to_string(), "v6"]);
    assert_reached(&v, "db");
    assert_eq!(v["peer"][0], "::ffff:127.0.0.5", "{v}");
    assert_eq!(db.clients(), 2);

    // Threads and forked children inherit the tag.
    for op in ["thread", "child"] {
        let v = cg.probe(&[op, "127.0.0.5", &db.addr.port().to_string()]);
        assert_reached(&v, "db");
    }
    assert_eq!(db.clients(), 4);
    let starts = w.records().into_iter().filter(|r| r["event"] == "session.start").count();
    assert!(starts >= 4, "every connection has a session record");

    // Origins are forgotten when the sockets close: nothing leaks in the kernel's maps.
    crate::harness::wait_for("the origin index to drain", std::time::Duration::from_secs(10), || {
        let out = w.cli(&["status", "--json"]);
        let status: Value = serde_json::from_slice(&out.stdout).ok()?;
        (status["live_origins"] == 0).then_some(())
    });

    // An untagged process is untouched: it reaches the server directly, and no session is recorded.
    let v = probe_untagged(&["connect", "127.0.0.5", &db.addr.port().to_string()]);
    assert_reached(&v, "db");
    let after = w.records().into_iter().filter(|r| r["event"] == "session.start").count();
    assert_eq!(after, starts, "an untagged connection must not pass through Warden");
}

#[test]
fn ipv6_targets_go_through_the_proxy() {
    if !privileged("ipv6_targets_go_through_the_proxy") {
        return;
    }
    let idp = Idp::start();
    let db = Server::start("::1", "db6");
    let w = setup("v6", &idp, &db, &[]);
    let cg = w.cgroup("agent");
    w.tag(&cg, "bot");
    let v = cg.probe(&["connect", "::1", &db.addr.port().to_string()]);
    assert_reached(&v, "db6");
    assert_eq!(v["peer"][0], "::1", "{v}");
    let start = w.wait_record("session.start", |r| r["event"] == "session.start");
    assert_eq!(start["dst"], db.addr.to_string());
}

#[test]
fn everything_else_is_refused_and_recorded() {
    if !privileged("everything_else_is_refused_and_recorded") {
        return;
    }
    let idp = Idp::start();
    let db = Server::start("127.0.0.5", "db");
    let other = Server::start("127.0.0.6", "other");
    let allowed = Server::start("127.0.0.7", "allowed");
    let w = setup("refused", &idp, &db, &[&format!("127.0.0.7/32:{}", allowed.addr.port())]);
    let cg = w.cgroup("agent");
    w.tag(&cg, "bot");
    let other_port = other.addr.port().to_string();

    // Neither a target nor allowed: EPERM, and a record naming the process and destination.
    let v = cg.probe(&["connect", "127.0.0.6", &other_port]);
    assert_eq!(errno(&v), Some(EPERM), "{v}");
    let rec = w.wait_record("connect.refused", |r| {
        r["event"] == "connect.refused" && r["dst"] == other.addr.to_string()
    });
    assert_eq!(rec["pid"].as_u64(), v["pid"].as_u64(), "{rec}");
    assert_eq!(rec["cgroup"], cg.rel(), "{rec}");
    assert_eq!(rec["identity"], "bot", "{rec}");
    assert_eq!(rec["decision"], "deny");
    // The same through an AF_INET6 socket and the IPv4-mapped address.
    let v = cg.probe(&["connect", "::ffff:127.0.0.6", &other_port, "v6"]);
    assert_eq!(errno(&v), Some(EPERM), "{v}");
    // TCP Fast Open does not get around connect().
    let v = cg.probe(&["tfo", "127.0.0.6", &other_port]);
    assert_eq!(errno(&v), Some(EPERM), "{v}");
    // Unconnected and connected UDP to a destination not on the allow list.
    let v = cg.probe(&["udp", "127.0.0.6", "9999"]);
    assert_eq!(errno(&v), Some(EPERM), "{v}");
    w.wait_record("sendmsg refusal", |r| r["event"] == "connect.refused" && r["via"] == "sendmsg");
    let v = cg.probe(&["udp-connect", "127.0.0.6", "9999"]);
    assert_eq!(errno(&v), Some(EPERM), "{v}");
    assert_eq!(other.clients(), 0, "nothing reached the non-target");

    // The allow list passes directly (no session through the proxy).
    let v = cg.probe(&["connect", "127.0.0.7", &allowed.addr.port().to_string()]);
    assert_reached(&v, "allowed");
    assert!(w.records().iter().all(|r| r["event"] != "session.start"), "allowed traffic bypasses the proxy");

    // io_uring's connect runs the same hooks: refused for a non-target, redirected for a target.
    let v = uring_probe(&cg, "127.0.0.6", other.addr.port());
    assert_eq!(errno(&v), Some(EPERM), "io_uring connect: {v}");
    let v = uring_probe(&cg, "127.0.0.5", db.addr.port());
    assert_reached(&v, "db");
    assert_eq!(v["peer"], serde_json::json!(["127.0.0.5", db.addr.port()]), "{v}");
    // TCP Fast Open to a target is redirected like connect().
    let v = cg.probe(&["tfo", "127.0.0.5", &db.addr.port().to_string()]);
    assert_reached(&v, "db");

    // Straight to the proxy port, from a tagged process: refused in the kernel.
    let port = w.proxy_port.to_string();
    let v = cg.probe(&["connect", "127.0.0.1", &port]);
    assert_eq!(errno(&v), Some(EPERM), "{v}");
    // From an untagged process: accepted, but it has no origin, so it is closed and recorded.
    let v = probe_untagged(&["connect", "127.0.0.1", &port]);
    assert_eq!(v["ok"], false, "a connection without origin must not get a greeting: {v}");
    w.wait_record("no-origin record", |r| r["event"] == "connect.refused" && r["peer"].is_string());

    // Binding the proxy's port from a tagged cgroup (to impersonate the proxy): refused.
    let v = cg.probe(&["bind", "127.0.0.2", &port]);
    assert_eq!(errno(&v), Some(EPERM), "{v}");
    w.wait_record("bind.refused", |r| r["event"] == "bind.refused");

    // Raw, ICMP, MPTCP and UDP-Lite sockets would carry traffic around the connect hooks. (Let every group open
    // ICMP sockets for the moment, so it is Warden that refuses it, not the kernel's ping_group_range.)
    let _ping = Sysctl::set("/proc/sys/net/ipv4/ping_group_range", "0 2147483647");
    for kind in ["raw", "icmp", "mptcp", "udplite"] {
        let v = cg.probe(&[kind]);
        assert_eq!(errno(&v), Some(EPERM), "{kind}: {v}");
    }
    // Packet and vsock sockets are refused by the BPF LSM program, where the kernel lets it load.
    let installed = w.wait_record("bpf.installed", |r| r["event"] == "bpf.installed");
    let lsm =
        !installed["unavailable"].as_array().is_some_and(|u| u.iter().any(|n| n == "warden_socket_create"));
    if lsm {
        for kind in ["packet", "vsock"] {
            let v = cg.probe(&[kind]);
            assert_eq!(errno(&v), Some(EPERM), "{kind}: {v}");
        }
    } else {
        // Where the kernel refuses the LSM program (ARCHITECTURE.md, "Kernel hooks and what they close"), the operator is
        // told, and a packet socket still needs CAP_NET_RAW, which an agent run as another user lacks.
        let status = w.cli(&["status"]);
        let text = String::from_utf8_lossy(&status.stdout);
        assert!(
            text.contains("unavailable: warden_socket_create"),
            "status must name the missing hook: {text}"
        );
        let v = cg.probe_as_nobody(&["packet"]);
        assert_eq!(errno(&v), Some(EPERM), "packet socket as nobody: {v}");
    }
    w.wait_record("socket.refused", |r| r["event"] == "socket.refused");

    // Untagged processes can still reach everything.
    let v = probe_untagged(&["connect", "127.0.0.6", &other_port]);
    assert_reached(&v, "other");
}

#[test]
fn kill9_fails_closed_and_a_restart_adopts_the_pinned_programs() {
    if !privileged("kill9_fails_closed_and_a_restart_adopts_the_pinned_programs") {
        return;
    }
    let idp = Idp::start();
    let db = Server::start("127.0.0.5", "db");
    let other = Server::start("127.0.0.6", "other");
    let allowed = Server::start("127.0.0.7", "allowed");
    let mut w = setup("kill9", &idp, &db, &[&format!("127.0.0.7/32:{}", allowed.addr.port())]);
    let cg = w.cgroup("agent");
    w.tag(&cg, "bot");
    let db_port = db.addr.port().to_string();
    assert_reached(&cg.probe(&["connect", "127.0.0.5", &db_port]), "db");
    assert_eq!(db.clients(), 1);

    w.kill9();
    // Daemon down: the target is unreachable (nobody serves the proxy address), nothing else opens up.
    let v = cg.probe(&["connect", "127.0.0.5", &db_port]);
    assert_eq!(errno(&v), Some(ECONNREFUSED), "{v}");
    assert_eq!(db.clients(), 1, "the target was not reached around Warden");
    let v = cg.probe(&["connect", "127.0.0.6", &other.addr.port().to_string()]);
    assert_eq!(errno(&v), Some(EPERM), "{v}");
    assert_eq!(other.clients(), 0);
    // The allow list still works, and untagged processes are untouched.
    assert_reached(&cg.probe(&["connect", "127.0.0.7", &allowed.addr.port().to_string()]), "allowed");
    assert_reached(&probe_untagged(&["connect", "127.0.0.5", &db_port]), "db");

    w.spawn();
    // It adopted every pinned link instead of attaching again.
    let installed = w.wait_record("second bpf.installed", |r| {
        r["event"] == "bpf.installed" && r["attached"].as_array().is_some_and(Vec::is_empty)
    });
    let first = w.records().into_iter().find(|r| r["event"] == "bpf.installed").unwrap();
    assert_eq!(
        installed["adopted"], first["attached"],
        "every program attached at first start was adopted: {installed}"
    );
    assert_eq!(
        installed["adopted"].as_array().map(Vec::len),
        Some(
            warden_common::names::PROGRAMS
                .iter()
                .filter(|p| !first["unavailable"].as_array().is_some_and(|u| u.iter().any(|n| n == **p)))
                .count()
        )
    );
    // The runtime binding survived (the tag map is pinned, the binding stored) and the target works again.
    assert_reached(&cg.probe(&["connect", "127.0.0.5", &db_port]), "db");
    assert_eq!(db.clients(), 3);
    // A clean stop (SIGTERM) leaves the programs attached too: still fail closed.
    w.stop();
    let v = cg.probe(&["connect", "127.0.0.5", &db_port]);
    assert_eq!(errno(&v), Some(ECONNREFUSED), "after a clean stop: {v}");
    let v = cg.probe(&["connect", "127.0.0.6", &other.addr.port().to_string()]);
    assert_eq!(errno(&v), Some(EPERM), "after a clean stop: {v}");
    w.spawn();
    assert_reached(&cg.probe(&["connect", "127.0.0.5", &db_port]), "db");
    // The chain survived the crash.
    let out = w.cli(&["audit", "verify", "--dir", w.audit_dir().to_str().unwrap()]);
    assert!(
        out.status.success(),
        "audit verify after kill -9: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // `warden uninstall` is the one command that lifts enforcement.
    w.stop();
    let out = w.cli(&["uninstall"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!w.bpffs.exists(), "every pin removed");
    assert_reached(&cg.probe(&["connect", "127.0.0.6", &other.addr.port().to_string()]), "other");
}

/// A sysctl set for the length of a test, restored on drop.
struct Sysctl {
    path: &'static str,
    old: String,
}

impl Sysctl {
    fn set(path: &'static str, value: &str) -> Self {
        let old = std::fs::read_to_string(path).unwrap_or_default();
        std::fs::write(path, value).expect("set sysctl");
        Self { path, old }
    }
}

impl Drop for Sysctl {
    fn drop(&mut self) {
        let _ = std::fs::write(self.path, self.old.trim());
    }
}
