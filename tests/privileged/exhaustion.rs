//! The daemon under exhaustion (issue 13): the audit writer rides out a full disk and running out of
//! descriptors. While it cannot make a record durable, sessions are refused (fail closed); nothing it
//! acknowledged is lost; once space or descriptors return it resumes on its own, records the gap
//! (`audit.resumed`), the chain verifies, and sessions work again.

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::dataplane::assert_reached;
use crate::harness::{
    IdentitySpec, Idp, Server, TestCgroup, Warden, privileged, probe_script, tcp_policy, wait_for,
};

/// A tmpfs of `size` mounted on a directory of the test's; unmounted and removed on drop.
struct SmallFs {
    dir: tempfile::TempDir,
}

impl SmallFs {
    fn mount(size: &str) -> Self {
        let dir = tempfile::Builder::new().prefix("warden-smallfs-").tempdir().expect("tempdir");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700"), "warden-test"])
            .arg(dir.path())
            .output()
            .expect("run mount");
        assert!(out.status.success(), "mount tmpfs: {}", String::from_utf8_lossy(&out.stderr));
        Self { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn filler(&self) -> PathBuf {
        self.dir.path().join("filler")
    }

    /// Writes zeros beside the audit directory until the file system is full.
    fn fill(&self) {
        let mut f = std::fs::File::create(self.filler()).expect("filler");
        let block = vec![0u8; 4096];
        loop {
            match f.write(&block) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) => {
                    assert_eq!(e.raw_os_error(), Some(nix::libc::ENOSPC), "filling: {e}");
                    break;
                }
            }
        }
    }

    fn free(&self) {
        std::fs::remove_file(self.filler()).expect("remove filler");
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.dir.path()).output();
    }
}

fn reached(v: &Value) -> bool {
    v["ok"] == true && v["data"].as_str().is_some_and(|d| d.starts_with("hello db"))
}

/// A process in `cg` holding `n` connections to `127.0.0.5:port` (each waits up to `wait` s for the
/// greeting) until [`Holder::release`].
struct Holder {
    child: Child,
    lines: std::io::Lines<BufReader<std::process::ChildStdout>>,
    first: Value,
}

impl Holder {
    fn start(cg: &TestCgroup, port: u16, n: usize, wait: f64) -> Self {
        let script = probe_script();
        let (port, n, wait) = (port.to_string(), n.to_string(), wait.to_string());
        let mut child = cg
            .command(
                "/usr/bin/python3",
                &[script.to_str().unwrap(), "hold-greeted", "127.0.0.5", &port, &n, &wait],
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("holder");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let first: Value = serde_json::from_str(&lines.next().expect("holder output").unwrap()).unwrap();
        Self { child, lines, first }
    }

    fn count(&self, what: &str) -> u64 {
        self.first["counts"][what].as_u64().unwrap_or(0)
    }

    fn pid(&self) -> u64 {
        self.first["pid"].as_u64().expect("holder pid")
    }

    fn release(mut self) {
        writeln!(self.child.stdin.take().unwrap()).unwrap();
        let _ = self.lines.next();
        let _ = self.child.wait();
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn session_starts_of(w: &Warden, pid: u64) -> usize {
    w.records().iter().filter(|r| r["event"] == "session.start" && r["pid"] == pid).count()
}

fn verify(w: &Warden) {
    let out = w.cli(&["audit", "verify", "--dir", w.audit_dir().to_str().unwrap()]);
    assert!(
        out.status.success(),
        "audit verify: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The audit disk fills: sessions are refused from the first record that cannot be made durable and
/// while the disk stays full; a session live across the fault keeps running and its `session.end` is held;
/// when space returns the writer resumes by itself, records `audit.resumed` (the gap in time), writes what it
/// held, every session that reached the server has its `session.start`, and the chain verifies.
#[test]
fn the_audit_writer_rides_out_a_full_disk() {
    if !privileged("the_audit_writer_rides_out_a_full_disk") {
        return;
    }
    let idp = Idp::start();
    let db = Server::start("127.0.0.5", "db");
    let fs = SmallFs::mount("1m");
    let w = Warden::builder("diskfull")
        .policy(&tcp_policy("db", db.addr, "5m"))
        .identity(IdentitySpec::pkjwt(&idp, "bot"), &idp.issuer)
        .audit_dir(&fs.path().join("audit"))
        .start();
    let cg = w.cgroup("agent");
    w.tag(&cg, "bot");
    let port = db.addr.port().to_string();
    let connect = || cg.probe(&["connect", "127.0.0.5", &port]);
    assert_reached(&connect(), "db");
    // A session live across the fault.
    let live = Holder::start(&cg, db.addr.port(), 1, 5.0);
    assert_eq!(live.count("greeted"), 1, "{}", live.first);

    fs.fill();
    let mut reached_pids = Vec::new();
    let mut refused = None;
    for _ in 0..200 {
        let v = connect();
        if reached(&v) {
            reached_pids.push(v["pid"].as_u64().unwrap());
        } else {
            refused = Some(v);
            break;
        }
    }
    let refused = refused.expect("no session was refused on a full audit disk");
    assert_ne!(refused["ok"], true, "a refused session is reset: {refused}");
    // Refused while the disk stays full, not once.
    for _ in 0..3 {
        let v = connect();
        assert!(!reached(&v), "a session got through while the audit disk was full: {v}");
    }
    let status = w.cli(&["status"]);
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(text.contains("AUDIT UNAVAILABLE") && text.contains("No space left"), "{text}");
    // The live session ends during the fault: its end is held.
    let live_pid = live.pid();
    live.release();

    fs.free();
    // Filling the disk may already have faulted and resumed once (a write that failed before the test's
    // sessions): the resumption that ends this fault is the one that counts the refused sessions.
    let resumed =
        w.wait_record("audit.resumed", |r| r["event"] == "audit.resumed" && r["refused"].as_u64() >= Some(1));
    assert!(resumed["reason"].as_str().is_some_and(|r| r.contains("No space left")), "{resumed}");
    assert!(resumed["since"].is_string() && resumed["attempts"].as_u64() >= Some(1), "{resumed}");
    assert_reached(&connect(), "db");
    // Nothing acknowledged is lost: every session that reached the server has its start on disk.
    for pid in &reached_pids {
        assert_eq!(session_starts_of(&w, *pid), 1, "session.start of pid {pid}");
    }
    // The live session's end was held and written after the writer resumed.
    let end =
        w.wait_record("the live session's end", |r| r["event"] == "session.end" && r["pid"] == live_pid);
    assert!(end["seq"].as_u64() > resumed["seq"].as_u64(), "{end} after {resumed}");
    assert!(w.log().contains("audit writer resumed"), "{}", w.log());
    verify(&w);
}

/// The daemon runs out of descriptors (its soft limit lowered under it with prlimit, one agent holding
/// connections) while the audit writer must open its next file: the sessions past that are refused (reset,
/// never greeted by the server) and every session that was greeted has its `session.start`; once
/// descriptors return the writer re-opens its file, records `audit.resumed` with the EMFILE it rode out,
/// sessions work again, and the chain verifies.
#[test]
fn the_audit_writer_rides_out_descriptor_exhaustion() {
    if !privileged("the_audit_writer_rides_out_descriptor_exhaustion") {
        return;
    }
    let idp = Idp::start();
    let db = Server::start("127.0.0.5", "db");
    let w = Warden::builder("nofds")
        .policy(&tcp_policy("db", db.addr, "5m"))
        .identity(IdentitySpec::pkjwt(&idp, "bot"), &idp.issuer)
        .audit_extra("max_file_bytes = 4096")
        .start();
    let cg = w.cgroup("agent");
    w.tag(&cg, "bot");
    let port = db.addr.port().to_string();
    let connect = || cg.probe(&["connect", "127.0.0.5", &port]);
    assert_reached(&connect(), "db");
    let pid = w.pid().expect("daemon pid");
    let open = std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count();
    let (_, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
    let soft = open + 40;
    let lower = |soft: u64| {
        let out = Command::new("prlimit")
            .args(["--pid", &pid.to_string(), &format!("--nofile={soft}:{hard}")])
            .output()
            .expect("prlimit");
        assert!(out.status.success(), "prlimit: {}", String::from_utf8_lossy(&out.stderr));
    };
    lower(soft as u64);
    // Each session takes two descriptors: 40 sessions take them all, and the writer (a small
    // `max_file_bytes`: it opens a new file every few records) finds none when it rotates.
    let holder = Holder::start(&cg, db.addr.port(), 40, 0.5);
    let greeted = holder.count("greeted");
    assert!(greeted > 0 && greeted < 40, "descriptors ran out: {}", holder.first);
    // If the sessions alone did not make a rotation fail, kernel refusals to a non-target keep the record
    // growing until the writer must open its next file.
    wait_for("the audit writer to fail", Duration::from_secs(30), || {
        if w.log().contains("audit writer cannot write") {
            return Some(());
        }
        let _ = cg.probe(&["flood", "127.0.0.6", "9", "20"]);
        None
    });
    let log = w.log();
    assert!(
        log.contains("cannot write; refusing new sessions") && log.contains("Too many open files"),
        "{log}"
    );
    let holder_pid = holder.pid();
    holder.release();

    let resumed = w.wait_record("audit.resumed", |r| r["event"] == "audit.resumed");
    assert!(resumed["reason"].as_str().is_some_and(|r| r.contains("Too many open files")), "{resumed}");
    wait_for("sessions to work again", Duration::from_secs(20), || reached(&connect()).then_some(()));
    // Nothing acknowledged is lost: every held connection that was greeted has its start on disk.
    assert!(session_starts_of(&w, holder_pid) >= usize::try_from(greeted).unwrap(), "{greeted} greeted");
    lower(hard);
    verify(&w);
}

/// The daemon's resident memory, in KiB.
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// How long the storm lasts: 20 s by default (two cores in CI), `WARDEN_STORM_SECS=60` for the minute the
/// issue names.
fn storm_secs() -> u64 {
    std::env::var("WARDEN_STORM_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(20)
}

/// A connect storm from one tagged cgroup (paced at 2,500 connects a second, four fifths to a non-target,
/// the rest to a target, most of those reset at once, one in 25 waiting for the server): the daemon's
/// memory stays bounded, every refusal is enforced (nothing reaches the non-target's listener), every
/// session that reached the target has its `session.start`, an untagged process's connects keep
/// succeeding with sane latency throughout, and the daemon serves sessions afterwards.
#[test]
fn a_connect_storm_keeps_memory_bounded_and_untagged_processes_unaffected() {
    if !privileged("a_connect_storm_keeps_memory_bounded_and_untagged_processes_unaffected") {
        return;
    }
    let idp = Idp::start();
    let db = Server::start("127.0.0.5", "db");
    let other = Server::start("127.0.0.6", "other");
    let plain = Server::start("127.0.0.7", "plain");
    let w = Warden::builder("storm")
        .policy(&tcp_policy("db", db.addr, "5m"))
        .identity(IdentitySpec::pkjwt(&idp, "bot"), &idp.issuer)
        .start();
    let cg = w.cgroup("agent");
    w.tag(&cg, "bot");
    let port = db.addr.port().to_string();
    assert_reached(&cg.probe(&["connect", "127.0.0.5", &port]), "db");
    let pid = w.pid().expect("daemon pid");
    let before = rss_kib(pid).expect("daemon RSS");
    let secs = storm_secs();

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // The daemon's RSS, sampled every 250 ms.
    let sampler = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut samples = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                samples.push(rss_kib(pid).unwrap_or(0));
                std::thread::sleep(Duration::from_millis(250));
            }
            samples
        })
    };
    // An untagged process's connects to a local server, with their latency.
    let untagged = {
        let (stop, addr) = (stop.clone(), plain.addr);
        std::thread::spawn(move || {
            let mut lat = Vec::new();
            let mut failed = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let t = std::time::Instant::now();
                let r =
                    std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)).and_then(|mut s| {
                        s.set_read_timeout(Some(Duration::from_secs(5)))?;
                        let mut b = [0u8; 32];
                        let n = std::io::Read::read(&mut s, &mut b)?;
                        Ok(String::from_utf8_lossy(&b[..n]).into_owned())
                    });
                match r {
                    Ok(g) if g.starts_with("hello plain") => lat.push(t.elapsed()),
                    other => failed.push(format!("{other:?}")),
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            (lat, failed)
        })
    };
    let script = probe_script();
    let storm = cg
        .command(
            "/usr/bin/python3",
            &[
                script.to_str().unwrap(),
                "storm",
                "127.0.0.5",
                &port,
                "127.0.0.6",
                &other.addr.port().to_string(),
                &secs.to_string(),
                "500",
                "2000",
                "25",
            ],
        )
        .output()
        .expect("storm");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let samples = sampler.join().unwrap();
    let (lat, failed) = untagged.join().unwrap();
    let v = crate::harness::parse_probe(&storm);
    eprintln!("storm: {v}");

    // The daemon is alive and serves sessions after the storm.
    assert!(rss_kib(pid).is_some(), "the daemon died in the storm:\n{}", w.log());
    assert_reached(&cg.probe(&["connect", "127.0.0.5", &port]), "db");
    // The generator paces 2,500 connects a second; on a loaded 2-core machine it may reach fewer (it printed
    // its rate above). This only checks the storm happened; the rate is not a timing goal of this test.
    let total = v["target"].as_u64().unwrap() + v["other"].as_u64().unwrap();
    let rate = total * 1000 / v["ms"].as_u64().unwrap().max(1);
    eprintln!("tagged connects: {total} in {} ms, {rate}/s", v["ms"]);
    assert!(total >= secs * 250, "the storm did not happen: {v}");
    // Every refusal enforced: every connect to the non-target refused in the kernel, none reached it.
    let counts = v["counts"].as_object().unwrap();
    assert_eq!(counts.get("n_EPERM").and_then(Value::as_u64), v["other"].as_u64(), "{v}");
    assert_eq!(other.clients(), 0, "a refused connect reached the non-target's listener");
    // Every session that reached the target has its session.start.
    let storm_pid = v["pid"].as_u64().unwrap();
    let greeted = v["greeted"].as_u64().unwrap();
    assert!(greeted * 2 >= v["sampled"].as_u64().unwrap(), "most waiting connects were served: {v}");
    let starts = session_starts_of(&w, storm_pid) as u64;
    assert!(
        starts >= greeted,
        "{starts} session.start records for {greeted} sessions that reached the target"
    );
    // Untagged connects kept working, with sane latency.
    assert!(failed.is_empty(), "untagged connects failed during the storm: {failed:?}");
    let mut lat = lat;
    lat.sort();
    assert!(lat.len() as u64 >= secs * 10, "only {} untagged connects in {secs} s", lat.len());
    let p50 = lat[lat.len() / 2];
    let p99 = lat[lat.len() * 99 / 100];
    eprintln!(
        "untagged connect+greeting: n={} p50={p50:?} p99={p99:?} max={:?}",
        lat.len(),
        lat[lat.len() - 1]
    );
    // Generous bounds: they catch an untagged process stalled behind the storm, not a slow machine.
    assert!(p50 < Duration::from_millis(100) && p99 < Duration::from_secs(1), "p50 {p50:?} p99 {p99:?}");
    // Memory bounded: no more than 64 MiB above the start at any time, and not still growing at the end
    // (the last third's peak within 16 MiB of the first third's).
    let peak = samples.iter().copied().max().unwrap_or(0);
    let third = samples.len() / 3;
    let early = samples[..third.max(1)].iter().copied().max().unwrap_or(0);
    let late = samples[samples.len() - third.max(1)..].iter().copied().max().unwrap_or(0);
    eprintln!("daemon RSS KiB: before {before}, peak {peak}, first third {early}, last third {late}");
    assert!(peak < before + 64 * 1024, "RSS grew from {before} to {peak} KiB");
    assert!(late <= early + 16 * 1024, "RSS still growing: {early} then {late} KiB");
    verify(&w);
}

/// Raises this process's soft open-file limit to the hard one and returns it.
fn raise_nofile() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).expect("raise RLIMIT_NOFILE");
    hard
}

/// How many idle sessions the idle-memory test opens: 10,000, or as many as the open-file limit lets the
/// daemon hold (two descriptors a session, 256 kept in reserve, some margin); `WARDEN_IDLE_SESSIONS`
/// to choose.
fn idle_sessions(hard: u64) -> usize {
    let fit = usize::try_from(hard.saturating_sub(1024) / 2).unwrap_or(usize::MAX);
    std::env::var("WARDEN_IDLE_SESSIONS").ok().and_then(|s| s.parse().ok()).unwrap_or(fit.min(10_000))
}

/// 10,000 idle opaque TCP sessions (connected, recorded, no bytes yet) fit in 500 MiB of the daemon's
/// resident memory (measured with as many as the open-file limit allows, up to 10,000, and extrapolated);
/// the bytes per idle session are printed for BENCHMARKS.md.
#[test]
fn ten_thousand_idle_sessions_fit_in_500_mib() {
    if !privileged("ten_thousand_idle_sessions_fit_in_500_mib") {
        return;
    }
    let hard = raise_nofile();
    let n = idle_sessions(hard);
    // An upstream that accepts and holds every connection, sending nothing.
    let sink = TcpListener::bind("127.0.0.5:0").expect("sink");
    let addr = sink.local_addr().unwrap();
    let held = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    {
        let held = held.clone();
        std::thread::spawn(move || {
            for s in sink.incoming().map_while(Result::ok) {
                held.lock().unwrap().push(s);
            }
        });
    }
    let idp = Idp::start();
    let w = Warden::builder("idle")
        .policy(&tcp_policy("db", addr, "30m"))
        .identity(IdentitySpec::pkjwt(&idp, "bot"), &idp.issuer)
        .agent_extra(&format!("max_sessions_per_cgroup = {}\n", n + 100))
        .start();
    crate::holes::set_origin_share(&w, u32::try_from(n + 100).unwrap());
    let cg = w.cgroup("agent");
    w.tag(&cg, "bot");
    let pid = w.pid().expect("daemon pid");
    let live = || -> Option<u64> {
        let out = w.cli(&["status", "--json"]);
        let v: Value = serde_json::from_slice(&out.stdout).ok()?;
        v["sessions"]["live"].as_u64()
    };
    // Warm up: one session, so the runtime, identity cache and grant exist before the baseline.
    let mut one = Holder::start(&cg, addr.port(), 1, 0.2);
    wait_for("one live session", Duration::from_secs(20), || (live()? == 1).then_some(()));
    let before = rss_kib(pid).unwrap();
    let script = probe_script();
    let count = n.to_string();
    let port = addr.port().to_string();
    let mut holder = cg
        .command(
            "prlimit",
            &[
                &format!("--nofile={hard}:{hard}"),
                "/usr/bin/python3",
                script.to_str().unwrap(),
                "hold-many",
                "127.0.0.5",
                &port,
                &count,
            ],
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("holder");
    let mut lines = BufReader::new(holder.stdout.take().unwrap()).lines();
    let opened: Value = serde_json::from_str(&lines.next().expect("holder output").unwrap()).unwrap();
    assert_eq!(opened["counts"]["ok"].as_u64(), Some(n as u64), "{opened}");
    let want = n as u64 + 1;
    wait_for("every session live", Duration::from_secs(180), || (live()? >= want).then_some(()));
    std::thread::sleep(Duration::from_secs(2));
    let after = rss_kib(pid).unwrap();
    let per = (after.saturating_sub(before)) * 1024 / n as u64;
    eprintln!(
        "idle sessions: {n}; daemon RSS {before} KiB -> {after} KiB; {per} bytes per idle session (RSS delta / sessions)"
    );
    writeln!(holder.stdin.take().unwrap()).unwrap();
    let _ = lines.next();
    let _ = holder.wait();
    one.child.kill().ok();
    // At 10,000 sessions (extrapolated when the descriptors allowed fewer).
    let at_10k = before + per * 10_000 / 1024;
    eprintln!("at 10,000 idle sessions: {at_10k} KiB");
    assert!(at_10k < 500 * 1024, "{n} idle sessions take {after} KiB: {at_10k} KiB at 10,000");
    drop(held);
}

/// One agent holding more sessions than `agent.max_sessions_per_cgroup` gets the rest refused (reset,
/// `session.refused` code `overloaded`), another agent's sessions still get through, and the first gets
/// its share back when its sessions end.
#[test]
fn one_cgroup_over_its_session_cap_is_refused_and_others_are_not() {
    if !privileged("one_cgroup_over_its_session_cap_is_refused_and_others_are_not") {
        return;
    }
    let idp = Idp::start();
    let db = Server::start("127.0.0.5", "db");
    let w = Warden::builder("sesscap")
        .policy(&tcp_policy("db", db.addr, "5m"))
        .identity(IdentitySpec::pkjwt(&idp, "bot"), &idp.issuer)
        .agent_extra("max_sessions_per_cgroup = 8\n")
        .start();
    let (a, b) = (w.cgroup("a"), w.cgroup("b"));
    w.tag(&a, "bot");
    w.tag(&b, "bot");
    let port = db.addr.port().to_string();
    let holder = Holder::start(&a, db.addr.port(), 12, 2.0);
    assert_eq!(holder.count("greeted"), 8, "only its share is served: {}", holder.first);
    assert_reached(&b.probe(&["connect", "127.0.0.5", &port]), "db");
    let refused = w.wait_record("an overloaded refusal", |r| {
        r["event"] == "session.refused" && r["code"] == "overloaded"
    });
    assert_eq!(refused["pid"].as_u64(), Some(holder.pid()), "{refused}");
    holder.release();
    wait_for("the share back", Duration::from_secs(10), || {
        reached(&a.probe(&["connect", "127.0.0.5", &port])).then_some(())
    });
}

/// An agent reconnecting in a loop to a target its identity may not reach: every connection is refused,
/// but only a budget of refusals per second per cgroup becomes a `session.refused` record; the rest are
/// summed in `events.lost` (source `proxy`), and the daemon keeps serving.
#[test]
fn an_agent_refused_in_a_loop_is_recorded_within_a_budget() {
    if !privileged("an_agent_refused_in_a_loop_is_recorded_within_a_budget") {
        return;
    }
    let idp = Idp::start();
    let db = Server::start("127.0.0.5", "db");
    let policy = format!(
        "targets:\n  db:\n    protocol: tcp\n    address: \"{}\"\nrules:\n  - name: only others reach db\n    match: {{ groups: [agents-elsewhere] }}\n    grant:\n      - target: db\n        access: connect\n        ttl: 5m\n",
        db.addr
    );
    let w = Warden::builder("refloop")
        .policy(&policy)
        .identity(IdentitySpec::pkjwt(&idp, "bot"), &idp.issuer)
        .start();
    let cg = w.cgroup("agent");
    w.tag(&cg, "bot");
    let started = std::time::Instant::now();
    let holder = Holder::start(&cg, db.addr.port(), 1500, 0.5);
    let elapsed = started.elapsed();
    assert_eq!(holder.count("greeted"), 0, "{}", holder.first);
    holder.release();
    let (recorded, counted) = wait_for("every refusal recorded or counted", Duration::from_secs(20), || {
        let records = w.records();
        let recorded = records.iter().filter(|r| r["event"] == "session.refused").count() as u64;
        let counted: u64 = records
            .iter()
            .filter(|r| r["event"] == "events.lost")
            .filter_map(|r| r["rate_limited"].as_array())
            .flatten()
            .filter(|e| e["source"] == "proxy")
            .map(|e| e["events"].as_u64().unwrap_or(0))
            .sum();
        (recorded + counted >= 1500).then_some((recorded, counted))
    });
    eprintln!("{recorded} recorded, {counted} counted in {elapsed:?}");
    assert_eq!(recorded + counted, 1500, "every refusal is recorded or counted");
    assert!(recorded <= (elapsed.as_secs() + 2) * 200, "{recorded} full records in {elapsed:?}");
    assert!(counted > 0, "the loop stayed under the budget: {recorded} in {elapsed:?}");
    assert_eq!(db.clients(), 0, "a refused session reached the target");
}
