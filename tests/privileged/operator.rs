//! The operator's side of the data path: `warden exec`, `warden tag`/`untag`, the control socket.

use std::os::unix::fs::PermissionsExt as _;
use std::process::Command;

use crate::dataplane::{EPERM, assert_reached, errno, setup};
use crate::harness::{Idp, Server, WARDEN, privileged, probe_script};

#[test]
fn exec_runs_a_command_in_a_fresh_bound_cgroup_and_removes_it() {
    if !privileged("exec_runs_a_command_in_a_fresh_bound_cgroup_and_removes_it") {
        return;
    }
    let idp = Idp::start();
    let db = Server::start("127.0.0.5", "db");
    let w = setup("exec", &idp, &db, &[]);
    // The probe must be readable by `nobody`.
    let script = w.dir.path().join("probe.py");
    std::fs::copy(probe_script(), &script).unwrap();
    std::fs::set_permissions(w.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();

    let port = db.addr.port().to_string();
    let out = w.cli_exec(&[
        "--identity",
        "bot",
        "--task",
        "t1",
        "--user",
        "nobody",
        "--",
        "python3",
        script.to_str().unwrap(),
        "connect",
        "127.0.0.5",
        &port,
    ]);
    assert!(out.status.success(), "warden exec: {}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(out.stdout.trim_ascii()).expect("probe json");
    assert_reached(&v, "db");

    let start = w.wait_record("session.start", |r| r["event"] == "session.start");
    assert_eq!(start["uid"], 65534, "the command ran as nobody: {start}");
    let cgroup = start["cgroup"].as_str().unwrap().to_owned();
    assert!(cgroup.contains("/exec/exec-"), "a fresh cgroup under agent.exec_parent: {cgroup}");
    let added = w.wait_record("binding.added", |r| r["event"] == "binding.added" && r["cgroup"] == cgroup);
    assert_eq!(added["task"], "t1");
    w.wait_record("binding.removed", |r| r["event"] == "binding.removed" && r["cgroup"] == cgroup);
    let path = crate::harness::cgroup_root().join(cgroup.trim_start_matches('/'));
    assert!(!path.exists(), "the cgroup is removed when the command exits: {}", path.display());

    // The command's refusals are its own: EPERM, and the exit status comes back.
    let out = w.cli_exec(&[
        "--identity",
        "bot",
        "--",
        "python3",
        script.to_str().unwrap(),
        "connect",
        "127.0.0.6",
        &port,
    ]);
    let v: serde_json::Value = serde_json::from_slice(out.stdout.trim_ascii()).expect("probe json");
    assert_eq!(errno(&v), Some(EPERM), "{v}");
    let out = w.cli_exec(&["--identity", "bot", "--", "sh", "-c", "exit 7"]);
    assert_eq!(out.status.code(), Some(7));

    // An identity the config does not name is refused before anything runs.
    let out = w.cli_exec(&["--identity", "ghost", "--", "true"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("unknown identity `ghost`"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn untag_releases_a_cgroup_and_tag_refuses_what_it_must() {
    if !privileged("untag_releases_a_cgroup_and_tag_refuses_what_it_must") {
        return;
    }
    let idp = Idp::start();
    let db = Server::start("127.0.0.5", "db");
    let other = Server::start("127.0.0.6", "other");
    let w = setup("untag", &idp, &db, &[]);
    let cg = w.cgroup("agent");
    w.tag(&cg, "bot");
    let port = other.addr.port().to_string();
    assert_eq!(errno(&cg.probe(&["connect", "127.0.0.6", &port])), Some(EPERM));

    let out = w.cli(&["untag", cg.path.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_reached(&cg.probe(&["connect", "127.0.0.6", &port]), "other");
    w.wait_record("binding.removed", |r| r["event"] == "binding.removed");

    // Unknown identities, missing cgroups, and a cgroup holding the daemon itself are refused.
    let out = w.cli(&["tag", cg.path.to_str().unwrap(), "--identity", "ghost"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("unknown identity"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = w.cli(&["tag", "/no/such/cgroup", "--identity", "bot"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("does not exist"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = w.cli(&["tag", "/", "--identity", "bot"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("contains the warden daemon"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_control_socket_is_for_root_only() {
    if !privileged("the_control_socket_is_for_root_only") {
        return;
    }
    let idp = Idp::start();
    let db = Server::start("127.0.0.5", "db");
    let w = setup("control", &idp, &db, &[]);
    std::fs::set_permissions(w.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&w.config, std::fs::Permissions::from_mode(0o644)).unwrap();
    let sock = w.dir.path().join("control.sock");
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "control socket mode");
    let out = Command::new("runuser")
        .args(["-u", "nobody", "--", WARDEN, "status", "--config"])
        .arg(&w.config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(77), "{}", String::from_utf8_lossy(&out.stderr));
    let out = w.cli(&["status", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // The root programs are pinned; the per-cgroup ones are loaded, for the cgroups it will tag.
    let listed = |v: &serde_json::Value, p: &str| v.as_array().is_some_and(|l| l.iter().any(|n| n == p));
    for p in [
        "warden_connect4",
        "warden_connect6",
        "warden_sendmsg4",
        "warden_sendmsg6",
        "warden_bind4",
        "warden_bind6",
    ] {
        assert!(listed(&status["links"], p), "{p} pinned: {status}");
    }
    for p in [
        "warden_sock_ops",
        "warden_sock_release",
        "warden_getpeername4",
        "warden_getpeername6",
        "warden_sock_create",
        "warden_egress",
    ] {
        assert!(listed(&status["programs"]["per_cgroup"], p), "{p} loaded: {status}");
    }
}

#[test]
fn programs_pinned_by_another_build_are_not_adopted_and_keep_enforcing() {
    if !privileged("programs_pinned_by_another_build_are_not_adopted_and_keep_enforcing") {
        return;
    }
    let idp = Idp::start();
    let db = Server::start("127.0.0.5", "db");
    let other = Server::start("127.0.0.6", "other");
    let mut w = setup("otherbuild", &idp, &db, &[]);
    let cg = w.cgroup("agent");
    w.tag(&cg, "bot");
    w.stop();
    // As if the pinned programs came from an older warden.
    std::fs::write(w.dir.path().join("state/bpf-object.sha256"), "0".repeat(64)).unwrap();
    let out = Command::new(WARDEN).args(["run", "--config"]).arg(&w.config).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("another warden build") && stderr.contains("warden uninstall"), "{stderr}");
    // The old programs still enforce.
    assert_eq!(errno(&cg.probe(&["connect", "127.0.0.6", &other.addr.port().to_string()])), Some(EPERM));
}
