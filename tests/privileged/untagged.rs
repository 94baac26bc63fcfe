//! What untagged processes pay: only the root programs (connect, sendmsg, bind) run for their sockets; the
//! bookkeeping and refusal programs are attached to each tagged cgroup (issue 13, "Untagged processes"),
//! and a tagged cgroup keeps them across a daemon restart, a cgroup tagged after it gets them, untagging
//! removes them.

use std::collections::HashMap;
use std::path::Path;

use aya::programs::links::{FdLink, PinnedLink};
use serde_json::Value;
use warden_common::names;

use crate::dataplane::{assert_reached, setup};
use crate::harness::{Idp, Server, TestCgroup, Warden, privileged, probe_untagged};

/// The per-cgroup programs pinned for `cg` (from `warden status`).
fn cgroup_programs(w: &Warden, cg: &TestCgroup) -> Vec<String> {
    let out = w.cli(&["status", "--json"]);
    assert!(out.status.success(), "warden status: {}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).expect("status JSON");
    let entry = v["cgroups"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["cgroup"] == cg.rel())
        .unwrap_or_else(|| panic!("{} not in status: {v}", cg.rel()));
    entry["programs"].as_array().into_iter().flatten().filter_map(|p| p.as_str().map(String::from)).collect()
}

/// The program each pinned link under `links` runs, by link name.
fn linked_programs(links: &Path) -> HashMap<String, u32> {
    std::fs::read_dir(links)
        .expect("links dir")
        .filter_map(Result::ok)
        .filter_map(|e| {
            let link = FdLink::from(PinnedLink::from_pin(e.path()).ok()?);
            Some((e.file_name().to_string_lossy().into_owned(), link.info().ok()?.program_id()))
        })
        .collect()
}

/// Run counts of the programs `ids` (the kernel counts only while statistics are on).
fn run_counts(ids: &HashMap<String, u32>) -> HashMap<String, u64> {
    let by_id: HashMap<u32, u64> =
        aya::programs::loaded_programs().filter_map(Result::ok).map(|p| (p.id(), p.run_count())).collect();
    ids.iter().map(|(name, id)| (name.clone(), by_id.get(id).copied().unwrap_or(0))).collect()
}

/// A cgroup's id: its directory's inode number.
fn cgroup_id(path: &Path) -> u64 {
    std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(path).expect("cgroup dir"))
}

fn delta(after: &HashMap<String, u64>, before: &HashMap<String, u64>, name: &str) -> u64 {
    after.get(name).copied().unwrap_or(0) - before.get(name).copied().unwrap_or(0)
}

/// Untagged connections (with getpeername and a socket option each) run none of a tagged cgroup's
/// programs, only the root ones; tagged connections run them; the cgroup keeps them across a restart, a
/// cgroup tagged after the restart gets them (and works), untagging removes them.
#[test]
fn untagged_sockets_run_only_the_root_programs() {
    if !privileged("untagged_sockets_run_only_the_root_programs") {
        return;
    }
    let idp = Idp::start();
    let db = Server::start("127.0.0.5", "db");
    let other = Server::start("127.0.0.6", "other");
    let mut w = setup("untagged", &idp, &db, &[]);
    let cg = w.cgroup("agent");
    w.tag(&cg, "bot");
    let dp = db.addr.port().to_string();
    let op = other.addr.port().to_string();
    let links = w.bpffs.join("links");

    let id = cgroup_id(&cg.path);
    let attached = cgroup_programs(&w, &cg);
    for p in names::PER_CGROUP {
        if *p != "warden_setsockopt" {
            assert!(attached.iter().any(|a| a == p), "{p} is attached to the tagged cgroup: {attached:?}");
        }
    }
    let programs = linked_programs(&links);
    for p in names::PROGRAMS {
        assert!(
            !programs.contains_key(&format!("{p}_cgroup_{id}")),
            "{p} is a root program, not a per-cgroup one"
        );
    }
    assert!(
        !programs.contains_key("warden_sock_ops"),
        "sock_ops is no longer attached at the root: {programs:?}"
    );

    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime).expect("BPF run-time statistics");
    // Untagged: a listener (not a target) on this host, 200 connections, each with getpeername and a
    // socket option on both ends.
    let before = run_counts(&programs);
    let n = 200;
    let v = probe_untagged(&["untagged-loop", "127.0.0.6", &op, &n.to_string()]);
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["connected"], n, "{v}");
    let after = run_counts(&programs);
    for p in names::PER_CGROUP {
        let name = format!("{p}_cgroup_{id}");
        if programs.contains_key(&name) {
            assert_eq!(delta(&after, &before, &name), 0, "{p} ran for untagged sockets");
        }
    }
    assert!(delta(&after, &before, "warden_connect4") >= n, "the root connect hook ran for each connect");

    // Tagged: through the proxy, running the cgroup's bookkeeping (sock_ops, getpeername).
    let before = run_counts(&programs);
    let v = cg.probe(&["connect", "127.0.0.5", &dp]);
    assert_reached(&v, "db");
    assert_eq!(v["peer"], serde_json::json!(["127.0.0.5", db.addr.port()]), "getpeername: {v}");
    let after = run_counts(&programs);
    assert!(delta(&after, &before, &format!("warden_sock_ops_cgroup_{id}")) > 0, "sock_ops ran");
    assert!(delta(&after, &before, &format!("warden_getpeername4_cgroup_{id}")) > 0, "getpeername4 ran");
    w.wait_record("session.start", |r| r["event"] == "session.start" && r["cgroup"] == cg.rel());

    // A restart adopts the cgroup's links (the same programs keep running), and a cgroup tagged after it
    // gets this daemon's programs before its tag takes effect.
    w.kill9();
    w.spawn();
    let adopted = linked_programs(&links);
    for p in names::PER_CGROUP {
        let name = format!("{p}_cgroup_{id}");
        assert_eq!(adopted.get(&name), programs.get(&name), "{name} was kept across the restart");
    }
    assert_eq!(cgroup_programs(&w, &cg), attached);
    assert_reached(&cg.probe(&["connect", "127.0.0.5", &dp]), "db");
    let late = w.cgroup("late");
    w.tag(&late, "bot");
    let late_id = cgroup_id(&late.path);
    assert_eq!(cgroup_programs(&w, &late), attached, "the cgroup tagged after the restart");
    let v = late.probe(&["connect", "127.0.0.5", &dp]);
    assert_reached(&v, "db");
    assert_eq!(v["peer"], serde_json::json!(["127.0.0.5", db.addr.port()]), "getpeername: {v}");
    w.wait_record("session.start in the cgroup tagged after the restart", |r| {
        r["event"] == "session.start" && r["cgroup"] == late.rel()
    });
    // Its refusals are in place too: a raw socket is refused by its cgroup's sock_create, a non-target by
    // the root connect hook.
    let v = late.probe(&["raw"]);
    assert_eq!(crate::dataplane::errno(&v), Some(crate::dataplane::EPERM), "raw socket: {v}");
    let v = late.probe(&["connect", "127.0.0.6", &op]);
    assert_eq!(crate::dataplane::errno(&v), Some(crate::dataplane::EPERM), "{v}");
    let programs = linked_programs(&links);
    let before = run_counts(&programs);
    let v = probe_untagged(&["untagged-loop", "127.0.0.6", &op, &n.to_string()]);
    assert_eq!(v["connected"], n, "{v}");
    let after = run_counts(&programs);
    for cgroup in [id, late_id] {
        for p in names::PER_CGROUP {
            let name = format!("{p}_cgroup_{cgroup}");
            if programs.contains_key(&name) {
                assert_eq!(delta(&after, &before, &name), 0, "{name} ran for untagged sockets");
            }
        }
    }

    // Untagging removes the cgroup's links (and the origins its sockets left); the cgroup is untouched
    // from then on.
    let out = w.cli(&["untag", late.path.to_str().unwrap()]);
    assert!(out.status.success(), "untag: {}", String::from_utf8_lossy(&out.stderr));
    let left: Vec<String> =
        linked_programs(&links).into_keys().filter(|k| k.ends_with(&format!("_cgroup_{late_id}"))).collect();
    assert!(left.is_empty(), "links left after untag: {left:?}");
    assert_reached(&late.probe(&["connect", "127.0.0.6", &op]), "other");
    assert_eq!(db.clients(), 3, "the target saw the proxy's three sessions only");
}
