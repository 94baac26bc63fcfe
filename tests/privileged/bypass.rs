//! Bypass attempts by an unprivileged agent (uid `nobody`, as `warden exec --user` leaves it) in a tagged
//! cgroup. Each attack asserts what the agent sees AND that the server it aimed at saw no connection.

use std::io::{BufRead as _, BufReader, Write as _};

use serde_json::Value;

use crate::dataplane::{EPERM, assert_reached, errno, setup};
use crate::harness::{Idp, Server, Warden, privileged, probe_script, probe_untagged};

const EACCES: i64 = 13;
const ECONNREFUSED: i64 = 111;

/// The agent got nowhere: an error, no greeting.
pub fn assert_refused(v: &Value, what: &str) {
    assert_eq!(v["ok"], false, "{what}: the agent must not get through: {v}");
    assert!(v["data"].is_null(), "{what}: no bytes from any server: {v}");
}

/// Waits until every connection `server` accepted before now has been counted, by making one more
/// (untagged) and waiting for its greeting: the accept queue is FIFO.
fn settle(server: &Server, name: &str) -> usize {
    let v = probe_untagged(&["connect", &server.addr.ip().to_string(), &server.addr.port().to_string()]);
    assert_reached(&v, name);
    server.clients() - 1
}

#[test]
fn target_aliases_and_socket_tricks_do_not_get_around_the_proxy() {
    if !privileged("target_aliases_and_socket_tricks_do_not_get_around_the_proxy") {
        return;
    }
    let idp = Idp::start();
    let db = Server::start("127.0.0.5", "db");
    let other = Server::start("127.0.0.6", "other");
    let allowed = Server::start("127.0.0.7", "allowed");
    let ap = allowed.addr.port().to_string();
    let w = setup("alias", &idp, &db, &[&format!("127.0.0.7/32:{ap}")]);
    let cg = w.cgroup("agent");
    w.tag(&cg, "bot");
    let dp = db.addr.port().to_string();
    let op = other.addr.port().to_string();
    let pp = w.proxy_port.to_string();

    // The legitimate path works for nobody, and is recorded as nobody's.
    let v = cg.probe_as_nobody(&["connect", "127.0.0.5", &dp]);
    assert_reached(&v, "db");
    let start = w.wait_record("session.start", |r| r["event"] == "session.start");
    assert_eq!(start["uid"], 65534, "{start}");
    let mut through_proxy = 1;

    // Other spellings of the target's address: not the target, not allowed, so refused.
    for host in [
        "0.0.0.0",
        "127.0.0.1",
        "127.255.255.254",
        "::",
        "::1",
        "::ffff:0.0.0.0",
        "::ffff:127.0.0.1",
        "::127.0.0.5",        // IPv4-compatible
        "64:ff9b::7f00:5",    // NAT64
        "2002:7f00:5::1",     // 6to4
        "::ffff:0:127.0.0.5", // IPv4-translated (SIIT)
        "fe80::1%lo",         // link-local on loopback
    ] {
        let v = cg.probe_as_nobody(&["connect", host, &dp, "v6"]);
        assert_refused(&v, host);
    }
    for host in ["0.0.0.0", "127.0.0.1", "127.0.0.2"] {
        let v = cg.probe_as_nobody(&["connect", host, &dp]);
        assert_eq!(errno(&v), Some(EPERM), "{host}: {v}");
    }
    // connect(0.0.0.0) from a socket bound to the target's address goes to that address: still refused.
    let v = cg.probe_as_nobody(&["from", "127.0.0.5", "0", "0.0.0.0", &dp]);
    assert_eq!(errno(&v), Some(EPERM), "bound to the target, connect 0.0.0.0: {v}");
    let v = cg.probe_as_nobody(&["from", "::ffff:127.0.0.5", "0", "::", &dp]);
    assert_refused(&v, "bound to the mapped target, connect ::");

    // TCP Fast Open on an AF_INET6 socket: a mapped non-target is refused, a mapped target is proxied.
    let v = cg.probe_as_nobody(&["tfo6", "::ffff:127.0.0.6", &op]);
    assert_eq!(errno(&v), Some(EPERM), "{v}");
    let v = cg.probe_as_nobody(&["tfo6", "::ffff:127.0.0.5", &dp]);
    assert_reached(&v, "db");
    through_proxy += 1;

    // connect(AF_UNSPEC) on a connected socket, then reconnecting it elsewhere: the hook runs again.
    let v = cg.probe_as_nobody(&["unspec", "127.0.0.7", &ap, "127.0.0.6", &op]);
    assert_eq!(v["stage"], "reconnect", "{v}");
    assert_eq!(errno(&v), Some(EPERM), "{v}");
    // ... also after a redirected connection to the target.
    let v = cg.probe_as_nobody(&["unspec", "127.0.0.5", &dp, "127.0.0.6", &op]);
    assert_eq!(v["stage"], "reconnect", "{v}");
    assert_eq!(errno(&v), Some(EPERM), "{v}");
    through_proxy += 1;

    // UDP: connected to an allowed address, then sendto elsewhere; sendmmsg; the mapped form.
    let v = cg.probe_as_nobody(&["udp-redirect", "127.0.0.7", &ap, "127.0.0.6", &op]);
    assert_eq!(v["stage"], "sendto", "{v}");
    assert_eq!(errno(&v), Some(EPERM), "{v}");
    for host in ["127.0.0.6", "::ffff:127.0.0.6", "127.0.0.5"] {
        let v = cg.probe_as_nobody(&["sendmmsg", host, &op]);
        assert_eq!(errno(&v), Some(EPERM), "sendmmsg to {host}: {v}");
        let v = cg.probe_as_nobody(&["udp", host, &dp]);
        assert_eq!(errno(&v), Some(EPERM), "sendto {host}: {v}");
    }

    // The proxy's port, on every address and family: neither connect nor bind.
    for host in ["127.0.0.1", "::1", "::ffff:127.0.0.1", "0.0.0.0", "::", "127.0.0.2"] {
        let v = cg.probe_as_nobody(&["connect", host, &pp, "v6"]);
        assert_eq!(errno(&v), Some(EPERM), "connect {host} proxy port: {v}");
        let v = cg.probe_as_nobody(&["reuse-listen", host, &pp]);
        assert_eq!(errno(&v), Some(EPERM), "listen on {host}:{pp}: {v}");
    }
    // The target's own port (to intercept Warden's upstream connection): refused on any of this host's
    // addresses.
    for host in ["127.0.0.5", "0.0.0.0", "::", "127.0.0.9"] {
        let v = cg.probe_as_nobody(&["reuse-listen", host, &dp]);
        assert_eq!(errno(&v), Some(EPERM), "listen on {host}:{dp}: {v}");
    }

    // io_uring and threads/children are covered in dataplane.rs; here: nothing else got through.
    assert_eq!(settle(&other, "other"), 0, "nothing reached the non-target");
    assert_eq!(settle(&db, "db"), through_proxy, "the target saw only the proxy's connections");
    assert!(
        w.records().iter().filter(|r| r["event"] == "session.start").count() >= through_proxy,
        "every connection that reached the target has a session"
    );
}

#[test]
fn a_tagged_user_cannot_leave_its_cgroup_or_use_a_namespace_to_get_around_it() {
    if !privileged("a_tagged_user_cannot_leave_its_cgroup_or_use_a_namespace_to_get_around_it") {
        return;
    }
    let idp = Idp::start();
    let db = Server::start("127.0.0.5", "db");
    let other = Server::start("127.0.0.6", "other");
    let w = setup("escape", &idp, &db, &[]);
    let cg = w.cgroup("agent");
    let sibling = w.cgroup("sibling");
    w.tag(&cg, "bot");
    let dp = db.addr.port().to_string();
    let op = other.addr.port().to_string();

    // Moving itself to the parent, the root or an untagged sibling, or making a child: all refused.
    let root = crate::harness::cgroup_root();
    let dirs = [
        root.to_str().unwrap().to_owned(),
        w.cgroup_parent.to_str().unwrap().to_owned(),
        sibling.path.to_str().unwrap().to_owned(),
        cg.path.to_str().unwrap().to_owned(),
    ];
    let mut args = vec!["cgroup-escape"];
    args.extend(dirs.iter().map(String::as_str));
    let v = cg.probe_as_nobody(&args);
    for r in v["results"].as_array().unwrap() {
        assert_eq!(r["ok"], false, "{r}");
        assert_eq!(r["errno"], EACCES, "{r}");
    }
    assert_eq!(v["cgroup"], format!("0::{}", cg.rel()), "{v}");

    // A new user + network namespace (loopback up): the hooks follow the cgroup, not the namespace. The
    // target is redirected to a proxy address nobody serves there; anything else is refused.
    let probe = probe_script();
    let probe = probe.to_str().unwrap();
    let in_netns = |args: &[&str]| -> Value {
        let mut all =
            vec!["-Urn", "sh", "-c", "ip link set lo up && exec /usr/bin/python3 \"$@\"", "sh", probe];
        all.extend_from_slice(args);
        let out = cg.command_as_nobody("unshare", &all).output().expect("unshare");
        crate::harness::parse_probe(&out)
    };
    let v = in_netns(&["connect", "127.0.0.5", &dp]);
    assert_eq!(errno(&v), Some(ECONNREFUSED), "target from a new netns: {v}");
    let v = in_netns(&["connect", "127.0.0.6", &op]);
    assert_eq!(errno(&v), Some(EPERM), "non-target from a new netns: {v}");
    // Root of a user namespace has CAP_NET_RAW there: Warden still refuses raw sockets (ICMP sockets are
    // also off by default in a new netns: EACCES from ping_group_range).
    let v = in_netns(&["raw"]);
    assert_eq!(errno(&v), Some(EPERM), "raw socket as root of a user namespace: {v}");
    let v = in_netns(&["icmp"]);
    assert!(matches!(errno(&v), Some(EPERM | EACCES)), "icmp socket as root of a user namespace: {v}");
    // A cgroup namespace and its own cgroup2 mount: still no way out of the tagged cgroup.
    let out = cg
        .command_as_nobody(
            "unshare",
            &[
                "-Urm",
                "--cgroup",
                "sh",
                "-c",
                "mount -t cgroup2 none /mnt && exec /usr/bin/python3 \"$@\" /mnt /mnt/..",
                "sh",
                probe,
                "cgroup-escape",
            ],
        )
        .output()
        .expect("unshare");
    let v = crate::harness::parse_probe(&out);
    assert!(v["results"].as_array().unwrap().iter().all(|r| r["ok"] == false || r["what"] == "mkdir"), "{v}");
    assert_eq!(v["cgroup"], "0::/", "the namespace's root is the tagged cgroup: {v}");
    let v = cg.probe_as_nobody(&["connect", "127.0.0.6", &op]);
    assert_eq!(errno(&v), Some(EPERM), "{v}");

    assert_eq!(settle(&other, "other"), 0, "nothing reached the non-target");
    assert_eq!(settle(&db, "db"), 0, "nothing reached the target directly");
}

/// `warden exec`: what the command leaves behind must never run untagged, not even for the moment between
/// the command's exit and the cleanup.
#[test]
fn exec_leftovers_never_run_untagged() {
    if !privileged("exec_leftovers_never_run_untagged") {
        return;
    }
    let idp = Idp::start();
    let db = Server::start("127.0.0.5", "db");
    let other = Server::start("127.0.0.6", "other");
    let w = setup("leftover", &idp, &db, &[]);
    let op = other.addr.port().to_string();
    let probe = probe_script();
    for round in 0..3 {
        let out = w.cli_exec(&[
            "--identity",
            "bot",
            "--user",
            "nobody",
            "--",
            "python3",
            probe.to_str().unwrap(),
            "spin",
            "127.0.0.6",
            &op,
            "10",
            "2",
        ]);
        assert!(out.status.success(), "warden exec: {}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(settle(&other, "other"), 0, "round {round}: a leftover of the command escaped");
        other.accepted.lock().unwrap().clear();
    }
    // The command cannot regain privileges through setuid binaries or file capabilities.
    let out = w.cli_exec(&[
        "--identity",
        "bot",
        "--user",
        "nobody",
        "--",
        "grep",
        "NoNewPrivs",
        "/proc/self/status",
    ]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).split_whitespace().nth(1), Some("1"), "{out:?}");
    // The leftovers are gone with their cgroup.
    let exec_parent = w.cgroup_parent.join("exec");
    let left: Vec<_> = std::fs::read_dir(&exec_parent)
        .map(|d| d.filter_map(Result::ok).filter(|e| e.path().is_dir()).map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "exec cgroups left behind: {left:?}");
}

/// With an allow list that covers the target's port everywhere (as the default `0.0.0.0/0:443` does for a
/// target on 443), other spellings of a target on this host must not reach its listener, and the agent
/// must not be able to stand in for the target by listening on its port.
#[test]
fn allow_listed_spellings_of_a_local_target_are_refused() {
    if !privileged("allow_listed_spellings_of_a_local_target_are_refused") {
        return;
    }
    let idp = Idp::start();
    let db = Server::start("127.0.0.5", "db");
    let dp = db.addr.port().to_string();
    let w = setup("spelling", &idp, &db, &[&format!("0.0.0.0/0:{dp}"), &format!("[::]/0:{dp}")]);
    let cg = w.cgroup("agent");
    w.tag(&cg, "bot");

    // connect(0.0.0.0) from a socket bound to 127.0.0.5 goes to 127.0.0.5: the target, around the proxy.
    let v = cg.probe_as_nobody(&["from", "127.0.0.5", "0", "0.0.0.0", &dp]);
    assert_eq!(errno(&v), Some(EPERM), "bound to the target, connect 0.0.0.0: {v}");
    let v = cg.probe_as_nobody(&["from", "::ffff:127.0.0.5", "0", "::ffff:0.0.0.0", &dp]);
    assert_eq!(errno(&v), Some(EPERM), "bound to the mapped target, connect ::ffff:0.0.0.0: {v}");
    for host in [
        "0.0.0.0",
        "127.0.0.1",
        "127.0.0.9",
        "::",
        "::1",
        "::ffff:127.0.0.1",
        "::ffff:0.0.0.0",
        "::127.0.0.5",        // IPv4-compatible
        "64:ff9b::127.0.0.5", // NAT64 well-known prefix
        "::ffff:0:127.0.0.5", // SIIT
    ] {
        let v = cg.probe_as_nobody(&["connect", host, &dp, "v6"]);
        assert_eq!(errno(&v), Some(EPERM), "{host}: {v}");
    }
    // Standing in for the target (it could be down, or Warden's upstream connect could race to us).
    for host in ["127.0.0.5", "127.0.0.9", "0.0.0.0", "::", "::1"] {
        let v = cg.probe_as_nobody(&["reuse-listen", host, &dp]);
        assert_eq!(errno(&v), Some(EPERM), "listen on {host}:{dp}: {v}");
    }
    // The target's own address (also covered by the allow list) still goes through the proxy; an untagged
    // process is untouched.
    assert_reached(&cg.probe_as_nobody(&["connect", "127.0.0.5", &dp]), "db");
    let start = w.wait_record("session.start", |r| r["event"] == "session.start");
    assert_eq!(start["dst"], db.addr.to_string(), "{start}");
    let v = probe_untagged(&["from", "127.0.0.5", "0", "0.0.0.0", &dp]);
    assert_reached(&v, "db");
    assert_eq!(settle(&db, "db"), 2, "the target saw the proxy's connection and the untagged one only");
    w.wait_record("refusal of a spelling", |r| {
        r["event"] == "connect.refused" && r["dst"] == format!("0.0.0.0:{dp}")
    });
}

/// Removes every entry of the pinned origin map, as LRU eviction under a flood of connects would.
fn evict_all_origins(w: &Warden) -> usize {
    let data = aya::maps::MapData::from_pin(w.bpffs.join("maps/WARDEN_ORIGINS")).expect("pinned origin map");
    let mut map: aya::maps::HashMap<_, u64, warden_common::Origin> =
        aya::maps::HashMap::try_from(aya::maps::Map::LruHashMap(data)).expect("origin map type");
    let keys: Vec<u64> = map.keys().filter_map(Result::ok).collect();
    for k in &keys {
        map.remove(k).expect("remove origin");
    }
    keys.len()
}

/// The origin index is keyed by the client's local endpoint. If a redirected socket's origin is evicted
/// (the LRU map under a flood of connects) while it is open, its index entry must still go when it closes,
/// so a later connection from the same local endpoint cannot borrow another process's identity and target.
#[test]
fn an_origin_never_outlives_its_socket() {
    if !privileged("an_origin_never_outlives_its_socket") {
        return;
    }
    let idp = Idp::start();
    let db = Server::start("127.0.0.5", "db");
    let dp = db.addr.port().to_string();
    let w = setup("stale", &idp, &db, &[]);
    let cg = w.cgroup("agent");
    w.tag(&cg, "bot");
    let local_port = crate::harness::free_port().to_string();

    let script = probe_script();
    let mut holder = cg
        .command_as_nobody(
            "/usr/bin/python3",
            &[script.to_str().unwrap(), "from-hold", "127.0.0.1", &local_port, "127.0.0.5", &dp],
        )
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("holder");
    let mut lines = BufReader::new(holder.stdout.take().unwrap()).lines();
    let first: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert_reached(&first, "db");
    let start = w.wait_record("session.start", |r| r["event"] == "session.start");
    assert_eq!(start["cgroup"], cg.rel(), "{start}");

    // Eviction while the connection is open, then it closes.
    assert!(evict_all_origins(&w) >= 1, "the open connection had an origin");
    writeln!(holder.stdin.take().unwrap()).unwrap();
    let _ = lines.next();
    let _ = holder.wait();
    w.wait_record("session.end", |r| r["event"] == "session.end" && r["session"] == start["session"]);

    // Another process (here an untagged one, the only kind that can connect to the proxy port) connects to
    // the proxy from the same local endpoint: it must not be taken for the agent.
    let pp = w.proxy_port.to_string();
    let v = probe_untagged(&["from", "127.0.0.1", &local_port, "127.0.0.1", &pp]);
    assert_refused(&v, "a connection from a dead socket's endpoint");
    w.wait_record("no-origin refusal", |r| {
        r["event"] == "connect.refused" && r["peer"] == format!("127.0.0.1:{local_port}")
    });
    let starts = w.records().into_iter().filter(|r| r["event"] == "session.start").count();
    assert_eq!(starts, 1, "only the agent's own connection was a session");
    assert_eq!(settle(&db, "db"), 1, "the target saw the agent's session only");
}

/// While the daemon is down nothing serves the proxy's port. An agent must not get it either, not even
/// by letting the kernel pick it (listen() on an unbound socket autobinds without a bind hook): it would
/// receive every tagged process's redirected connections, and keep the daemon from coming back.
#[test]
fn the_proxy_port_cannot_be_taken_while_the_daemon_is_down() {
    if !privileged("the_proxy_port_cannot_be_taken_while_the_daemon_is_down") {
        return;
    }
    let idp = Idp::start();
    let db = Server::start("127.0.0.5", "db");
    let mut w = setup("autobind", &idp, &db, &[]);
    let cg = w.cgroup("agent");
    w.tag(&cg, "bot");
    let pp = w.proxy_port.to_string();
    let (lo, hi) = {
        let r = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap();
        let mut it = r.split_whitespace().map(|p| p.parse::<u16>().unwrap());
        (it.next().unwrap(), it.next().unwrap())
    };
    w.kill9();
    let v = cg.probe_as_nobody(&["bind", "0.0.0.0", &pp]);
    assert_eq!(errno(&v), Some(EPERM), "explicit bind: {v}");
    // The harness's ports come from binding port 0, i.e. from the ephemeral range: one outside it would
    // leave the autobind half of this test checking nothing.
    assert!(
        (lo..=hi).contains(&w.proxy_port),
        "proxy port {pp} is outside the ephemeral range {lo}-{hi}: autobind could not pick it"
    );
    // Thousands of tries cover the ephemeral range many times over.
    let v = cg.probe_as_nobody(&["autobind", &pp, "4"]);
    assert_eq!(v["ok"], false, "the kernel handed the agent the proxy's port: {v}");
    assert!(v["tries"].as_u64().unwrap_or(0) > 20_000, "{v}");
    w.spawn();
    assert_reached(&cg.probe_as_nobody(&["connect", "127.0.0.5", &db.addr.port().to_string()]), "db");
}

/// A flood of refused connects: every refusal is still enforced, and each is either recorded or counted
/// in an `events.lost` record (one agent cannot fill the audit queue that sessions need, nor hide
/// refusals without a trace); the agent's own sessions still work afterwards.
#[test]
fn a_flood_of_refusals_is_enforced_and_accounted_for() {
    if !privileged("a_flood_of_refusals_is_enforced_and_accounted_for") {
        return;
    }
    let idp = Idp::start();
    let db = Server::start("127.0.0.5", "db");
    let other = Server::start("127.0.0.6", "other");
    let w = setup("flood", &idp, &db, &[]);
    let cg = w.cgroup("agent");
    w.tag(&cg, "bot");
    let total: u64 = 20_000;
    let v = cg.probe_as_nobody(&["flood", "127.0.0.6", &other.addr.port().to_string(), &total.to_string()]);
    assert_eq!(v["counts"]["EPERM"].as_u64(), Some(total), "every connect refused: {v}");
    let cgroup = cg.rel();
    let accounted = || {
        let records = w.records();
        let recorded = records
            .iter()
            .filter(|r| r["event"] == "connect.refused" && r["cgroup"] == cgroup.as_str())
            .count() as u64;
        let counted: u64 = records
            .iter()
            .filter(|r| r["event"] == "events.lost")
            .map(|r| {
                r["ring_full"].as_u64().unwrap_or(0)
                    + r["queue_full"].as_u64().unwrap_or(0)
                    + r["rate_limited"]
                        .as_array()
                        .map_or(0, |l| l.iter().map(|e| e["events"].as_u64().unwrap_or(0)).sum())
            })
            .sum();
        (recorded, counted)
    };
    let (recorded, counted) = crate::harness::wait_for(
        "every refusal recorded or counted",
        std::time::Duration::from_secs(20),
        || {
            let (r, c) = accounted();
            (r + c >= total).then_some((r, c))
        },
    );
    assert_eq!(recorded + counted, total, "recorded {recorded} + counted {counted}");
    assert!(recorded >= 200, "the first refusals are recorded in full: {recorded}");
    let lost = w.wait_record("events.lost", |r| r["event"] == "events.lost");
    assert!(
        lost["rate_limited"]
            .as_array()
            .is_some_and(|l| l.iter().any(|e| e["cgroup"] == cgroup.as_str() && e["identity"] == "bot")),
        "{lost}"
    );
    assert_reached(&cg.probe_as_nobody(&["connect", "127.0.0.5", &db.addr.port().to_string()]), "db");
    assert_eq!(settle(&other, "other"), 0);
    let out = w.cli(&["audit", "verify", "--dir", w.audit_dir().to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
}

/// `warden exec --user`: the command cannot open sockets the kernel programs do not govern (vsock to the
/// hypervisor, packet, ...) even where BPF LSM is unavailable, nor use io_uring to open them, nor leave its
/// cgroup; TCP through Warden still works.
#[test]
fn exec_agents_cannot_open_other_socket_families_or_leave_their_cgroup() {
    if !privileged("exec_agents_cannot_open_other_socket_families_or_leave_their_cgroup") {
        return;
    }
    let idp = Idp::start();
    let db = Server::start("127.0.0.5", "db");
    let w = setup("execsock", &idp, &db, &[]);
    let probe = probe_script();
    let exec = |args: &[&str]| -> Value {
        let mut all = vec!["--identity", "bot", "--user", "nobody", "--"];
        all.extend_from_slice(args);
        let out = w.cli_exec(&all);
        crate::harness::parse_probe(&out)
    };
    let py = |args: &[&str]| -> Value {
        let mut all = vec!["/usr/bin/python3", probe.to_str().unwrap()];
        all.extend_from_slice(args);
        exec(&all)
    };
    for kind in ["vsock", "packet", "raw", "mptcp"] {
        let v = py(&[kind]);
        assert_eq!(errno(&v), Some(EPERM), "{kind}: {v}");
    }
    let uring = std::env::current_exe()
        .unwrap()
        .parent()
        .and_then(std::path::Path::parent)
        .unwrap()
        .join("examples/uring_connect");
    if !uring.exists() {
        // `cargo test --test privileged` does not build examples; build the probe rather than skip the check.
        let built = std::process::Command::new(env!("CARGO"))
            .args(["build", "-p", "warden", "--example", "uring_connect"])
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            built && uring.exists(),
            "cannot build {} (agent/examples/uring_connect.rs)",
            uring.display()
        );
    }
    let v = exec(&[uring.to_str().unwrap(), "127.0.0.6", "9"]);
    assert_eq!(errno(&v), Some(EPERM), "io_uring: {v}");
    let exec_parent = w.cgroup_parent.join("exec");
    let root = crate::harness::cgroup_root();
    let v = py(&["cgroup-escape", exec_parent.to_str().unwrap(), root.to_str().unwrap()]);
    assert_eq!(v["ok"], false, "{v}");
    assert!(v["cgroup"].as_str().is_some_and(|c| c.contains("/exec/exec-")), "{v}");
    assert_reached(&py(&["connect", "127.0.0.5", &db.addr.port().to_string()]), "db");
    assert_eq!(settle(&db, "db"), 1);
}

/// A socket made before its process was tagged is judged when it connects, by the process that connects.
/// Made outside every tagged cgroup, it runs none of their programs (no sock_ops indexes its origin): the
/// proxy finds its origin by the client socket's cookie instead.
#[test]
fn a_socket_made_before_tagging_is_judged_at_connect() {
    if !privileged("a_socket_made_before_tagging_is_judged_at_connect") {
        return;
    }
    let idp = Idp::start();
    let db = Server::start("127.0.0.5", "db");
    let other = Server::start("127.0.0.6", "other");
    let w = setup("late", &idp, &db, &[]);
    let cg = w.cgroup("agent");
    w.tag(&cg, "bot");
    let script = probe_script();
    for (server, expect_reached) in [(&other, false), (&db, true)] {
        let port = server.addr.port().to_string();
        let mut p = std::process::Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--", "/usr/bin/python3"])
            .arg(&script)
            .args(["late", &server.addr.ip().to_string(), &port])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("late probe");
        let mut lines = BufReader::new(p.stdout.take().unwrap()).lines();
        let ready: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
        assert_eq!(ready["ready"], true);
        std::fs::write(cg.path.join("cgroup.procs"), p.id().to_string())
            .expect("move into the tagged cgroup");
        writeln!(p.stdin.take().unwrap()).unwrap();
        let v: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
        let _ = p.wait();
        if expect_reached {
            assert_reached(&v, "db");
        } else {
            assert_eq!(errno(&v), Some(EPERM), "{v}");
        }
    }
    assert_eq!(settle(&other, "other"), 0);
    assert_eq!(settle(&db, "db"), 1);
    w.wait_record("session.start", |r| r["event"] == "session.start" && r["uid"] == 65534);
}

/// `warden exec --user`: the command cannot take a connected socket from, or attach to, an untagged process
/// that runs as the same user (pidfd_getfd, ptrace, process_vm_writev).
#[test]
fn exec_agents_cannot_take_sockets_from_or_attach_to_same_user_processes() {
    if !privileged("exec_agents_cannot_take_sockets_from_or_attach_to_same_user_processes") {
        return;
    }
    let idp = Idp::start();
    let db = Server::start("127.0.0.5", "db");
    let other = Server::start("127.0.0.6", "other");
    let w = setup("steal", &idp, &db, &[]);
    let script = probe_script();
    let mut holder = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--", "/usr/bin/python3"])
        .arg(&script)
        .args(["holder", "127.0.0.6", &other.addr.port().to_string()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("holder");
    let mut lines = BufReader::new(holder.stdout.take().unwrap()).lines();
    let held: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    let (pid, fd) = (holder.id().to_string(), held["fd"].to_string());
    let out = w.cli_exec(&[
        "--identity",
        "bot",
        "--user",
        "nobody",
        "--",
        "/usr/bin/python3",
        script.to_str().unwrap(),
        "steal",
        &pid,
        &fd,
    ]);
    let v = crate::harness::parse_probe(&out);
    writeln!(holder.stdin.take().unwrap()).unwrap();
    let _ = holder.wait();
    assert_eq!(v["ok"], false, "{v}");
    assert_eq!(v["pidfd_getfd_errno"], EPERM, "{v}");
    assert_eq!(v["ptrace_errno"], EPERM, "{v}");
    assert!(v["echo"].is_null(), "{v}");
}
