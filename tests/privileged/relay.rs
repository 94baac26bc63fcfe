//! The opaque relay through the real daemon: bulk bytes spliced through kernel pipes (or copied, with
//! `agent.tcp_relay = "copy"`), counted exactly in `session.end` with the path they took, half-close passed
//! on each way, a reset on one side passed on as a reset of the other, and a bulk session cut at once by
//! `warden sessions kill`, by its grant's expiry and by the daemon stopping (with its `session.end`).

use std::io::{ErrorKind, Read as _, Write as _};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, SystemTime};

use serde_json::Value;

use crate::harness::{IdentitySpec, Idp, TestCgroup, Warden, privileged, tcp_policy, wait_for};

const UP: u64 = 48 << 20;
const DOWN: u64 = 8 << 20;

/// A loopback server running `each` on every connection it accepts (in its own thread); what `each`
/// returns is sent on the channel.
fn serve<T: Send + 'static>(
    each: impl Fn(TcpStream) -> T + Send + Sync + Clone + 'static,
) -> (SocketAddr, mpsc::Receiver<T>) {
    let l = TcpListener::bind("127.0.0.5:0").expect("bind test server");
    let addr = l.local_addr().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for s in l.incoming().map_while(Result::ok) {
            let (each, tx) = (each.clone(), tx.clone());
            std::thread::spawn(move || {
                s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                let _ = tx.send(each(s));
            });
        }
    });
    (addr, rx)
}

/// Reads to end of stream, checking byte i is i % 251: how many arrived, and whether all were right.
fn read_pattern(s: &mut TcpStream) -> std::io::Result<(u64, bool)> {
    let mut buf = vec![0u8; 1 << 20];
    let (mut got, mut intact) = (0u64, true);
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            return Ok((got, intact));
        }
        intact &= buf[..n].iter().enumerate().all(|(i, b)| u64::from(*b) == (got + i as u64) % 251);
        got += n as u64;
    }
}

/// Writes `n` bytes, byte i being i % 241.
fn write_pattern(s: &mut TcpStream, n: u64) -> std::io::Result<()> {
    let block: Vec<u8> = (0..241u32 * 4096).map(|i| (i % 241) as u8).collect();
    let mut left = n;
    while left > 0 {
        let k = usize::try_from(left).unwrap_or(usize::MAX).min(block.len());
        s.write_all(&block[..k])?;
        left -= k as u64;
    }
    Ok(())
}

fn daemon(name: &str, idp: &Idp, addr: SocketAddr, ttl: &str, agent_extra: &str) -> Warden {
    Warden::builder(name)
        .policy(&tcp_policy("db", addr, ttl))
        .identity(IdentitySpec::pkjwt(idp, "bot"), &idp.issuer)
        .agent_extra(agent_extra)
        .start()
}

fn session_end(w: &Warden, reason: &str) -> Value {
    w.wait_record(&format!("session.end ({reason})"), |r| {
        r["event"] == "session.end" && r["reason"] == reason
    })
}

/// A server for two bulk sessions: on the first connection it reads the client's upload to end of stream,
/// then sends `DOWN` bytes and half-closes; on the second it sends first, half-closes, then reads. It
/// reports what it read: how many bytes, and whether every one was right.
fn bulk_server() -> (SocketAddr, mpsc::Receiver<(u64, bool)>) {
    let n = Arc::new(AtomicUsize::new(0));
    serve(move |mut s| {
        if n.fetch_add(1, Ordering::Relaxed).is_multiple_of(2) {
            let r = read_pattern(&mut s).unwrap();
            write_pattern(&mut s, DOWN).unwrap();
            s.shutdown(Shutdown::Write).unwrap();
            r
        } else {
            write_pattern(&mut s, DOWN).unwrap();
            s.shutdown(Shutdown::Write).unwrap();
            read_pattern(&mut s).unwrap()
        }
    })
}

/// Bulk both ways, the client half-closing first, then the server first; every byte counted.
fn bulk_both_orders(
    w: &Warden,
    cg: &TestCgroup,
    addr: SocketAddr,
    done: &mpsc::Receiver<(u64, bool)>,
    relay: &str,
) {
    let port = addr.port().to_string();
    let v = cg.probe(&["bulk", "127.0.0.5", &port, &UP.to_string(), &DOWN.to_string(), "client"]);
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!((v["received"].as_u64(), v["intact"].as_bool()), (Some(DOWN), Some(true)), "{v}");
    let (got, intact) = done.recv_timeout(Duration::from_secs(30)).unwrap();
    assert!(got == UP && intact, "the server got {got} bytes of {UP}, intact: {intact}");
    let end = session_end(w, "client_closed");
    assert_eq!((end["bytes_up"].as_u64(), end["bytes_down"].as_u64()), (Some(UP), Some(DOWN)), "{end}");
    assert_eq!(end["relay"], relay, "{end}");

    // The server sends everything and half-closes; the client answers only after end of stream.
    let v = cg.probe(&["bulk", "127.0.0.5", &port, &UP.to_string(), &DOWN.to_string(), "server"]);
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!((v["received"].as_u64(), v["intact"].as_bool()), (Some(DOWN), Some(true)), "{v}");
    let (got, intact) = done.recv_timeout(Duration::from_secs(30)).unwrap();
    assert!(got == UP && intact, "the server got {got} bytes of {UP} after its half-close, intact: {intact}");
    let end = session_end(w, "upstream_closed");
    assert_eq!((end["bytes_up"].as_u64(), end["bytes_down"].as_u64()), (Some(UP), Some(DOWN)), "{end}");
    assert_eq!(end["relay"], relay, "{end}");
}

#[test]
fn spliced_sessions_count_every_byte_and_pass_half_close_each_way() {
    if !privileged("spliced_sessions_count_every_byte_and_pass_half_close_each_way") {
        return;
    }
    let idp = Idp::start();
    let (addr, done) = bulk_server();
    let w = daemon("splice-bulk", &idp, addr, "10m", "");
    let cg = w.cgroup("agent");
    w.tag(&cg, "bot");
    bulk_both_orders(&w, &cg, addr, &done, "splice");
}

#[test]
fn the_copying_relay_counts_the_same() {
    if !privileged("the_copying_relay_counts_the_same") {
        return;
    }
    let idp = Idp::start();
    let (addr, done) = bulk_server();
    let w = daemon("copy-bulk", &idp, addr, "10m", "tcp_relay = \"copy\"\n");
    let cg = w.cgroup("agent");
    w.tag(&cg, "bot");
    bulk_both_orders(&w, &cg, addr, &done, "copy");
}

#[test]
fn a_reset_on_either_side_is_passed_on_as_a_reset() {
    if !privileged("a_reset_on_either_side_is_passed_on_as_a_reset") {
        return;
    }
    let idp = Idp::start();
    // First connection: the server reads the client's line, then resets. Second: it reads until its read
    // fails, and reports how many bytes it got and how the read failed.
    let n = Arc::new(AtomicUsize::new(0));
    let (addr, got) = serve(move |mut s| {
        let mut buf = vec![0u8; 1 << 16];
        if n.fetch_add(1, Ordering::Relaxed) == 0 {
            let _ = s.read_exact(&mut buf[..6]);
            let linger = libc::linger { l_onoff: 1, l_linger: 0 };
            nix::sys::socket::setsockopt(&s, nix::sys::socket::sockopt::Linger, &linger).unwrap();
            return (6, None);
        }
        let mut n = 0;
        loop {
            match s.read(&mut buf) {
                Ok(0) => return (n, None),
                Ok(k) => n += k,
                Err(e) => return (n, Some(e.kind())),
            }
        }
    });
    let w = daemon("reset", &idp, addr, "10m", "");
    let cg = w.cgroup("agent");
    w.tag(&cg, "bot");
    let port = addr.port().to_string();
    let v = cg.probe(&["recv-until", "127.0.0.5", &port]);
    assert_eq!((v["ended"].as_str(), v["errno"].as_i64()), (Some("error"), Some(104)), "ECONNRESET: {v}");
    let _ = got.recv_timeout(Duration::from_secs(5));
    let end = session_end(&w, "upstream_error");
    assert_eq!(end["bytes_up"], 6, "{end}");

    // The client sends, then resets: the server's read fails with ECONNRESET.
    let v = cg.probe(&["reset", "127.0.0.5", &port, "100000"]);
    assert_eq!(v["ok"], true, "{v}");
    let (n, error) = got.recv_timeout(Duration::from_secs(20)).unwrap();
    assert_eq!(error, Some(ErrorKind::ConnectionReset), "the server saw {n} bytes, then {error:?}");
    assert_eq!(n, 100_000);
    let end = session_end(&w, "client_error");
    assert_eq!(end["bytes_up"], 100_000, "{end}");
}

/// A client streaming bulk data (64 KiB writes) to a server that reads and discards it, in the background;
/// the handle yields the probe's answer.
fn stream(cg: &TestCgroup, addr: SocketAddr, secs: u32) -> std::thread::JoinHandle<Value> {
    let cg = TestCgroup::adopt(cg.path.clone());
    let (port, secs) = (addr.port().to_string(), secs.to_string());
    std::thread::spawn(move || cg.probe(&["stream", "127.0.0.5", &port, &secs]))
}

fn drain_forever() -> (SocketAddr, mpsc::Receiver<()>) {
    serve(|mut s| {
        let mut buf = vec![0u8; 1 << 20];
        while s.read(&mut buf).is_ok_and(|n| n > 0) {}
    })
}

/// Waits until a live session has moved more than 16 MiB up (so it is in bulk) and returns its id.
fn bulk_session(w: &Warden) -> String {
    wait_for("a live session in bulk", Duration::from_secs(20), || {
        let out = w.cli(&["sessions", "--json"]);
        let list: Value = serde_json::from_slice(&out.stdout).ok()?;
        let s = list.as_array()?.first()?;
        (s["bytes_up"].as_u64()? > 16 << 20).then(|| s["session"].as_str().unwrap().to_owned())
    })
}

fn now() -> f64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs_f64()
}

/// The client's stream ended (an error, the connection cut) within `within` of `since`.
fn cut_at_once(v: &Value, since: f64, within: f64) {
    assert_eq!(v["ok"], true, "{v}");
    assert_ne!(v["ended"], "still open", "the session must be cut: {v}");
    let at = v["ended_at"].as_f64().unwrap();
    assert!(at - since < within, "cut {:.2} s after the cause, not at once: {v}", at - since);
}

#[test]
fn kill_and_daemon_stop_cut_a_bulk_spliced_session_at_once_with_its_record() {
    if !privileged("kill_and_daemon_stop_cut_a_bulk_spliced_session_at_once_with_its_record") {
        return;
    }
    let idp = Idp::start();
    let (addr, _) = drain_forever();
    let mut w = daemon("splice-cut", &idp, addr, "10m", "");
    let cg = w.cgroup("agent");
    w.tag(&cg, "bot");

    let h = stream(&cg, addr, 60);
    let id = bulk_session(&w);
    let since = now();
    let out = w.cli(&["sessions", "kill", &id]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    cut_at_once(&h.join().unwrap(), since, 3.0);
    let end = session_end(&w, "killed_by_operator");
    assert_eq!(end["session"], id.as_str(), "{end}");
    assert!(end["bytes_up"].as_u64().unwrap() > 16 << 20, "{end}");
    assert_eq!(end["relay"], "splice", "{end}");

    // The daemon stopping (SIGTERM, as a restart does) ends a live bulk session with its record.
    let h = stream(&cg, addr, 60);
    let id = bulk_session(&w);
    let since = now();
    w.stop();
    cut_at_once(&h.join().unwrap(), since, 10.0);
    let end = session_end(&w, "daemon_shutdown");
    assert_eq!(end["session"], id.as_str(), "{end}");
    assert!(end["bytes_up"].as_u64().unwrap() > 16 << 20, "{end}");
    // Back up, it relays again.
    w.spawn();
    let h = stream(&cg, addr, 1);
    let v = h.join().unwrap();
    assert_eq!((v["ok"].as_bool(), v["ended"].as_str()), (Some(true), Some("still open")), "{v}");
    let out = w.cli(&["audit", "verify", "--dir", w.audit_dir().to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
}

#[test]
fn grant_expiry_cuts_a_bulk_spliced_session_at_once() {
    if !privileged("grant_expiry_cuts_a_bulk_spliced_session_at_once") {
        return;
    }
    let idp = Idp::start();
    let (addr, _) = drain_forever();
    let w = daemon("splice-expiry", &idp, addr, "4s", "");
    let cg = w.cgroup("agent");
    w.tag(&cg, "bot");
    let h = stream(&cg, addr, 30);
    bulk_session(&w);
    let v = h.join().unwrap();
    let expired = w.wait_record("grant.expired", |r| r["event"] == "grant.expired");
    let since = expired["ts"].as_str().map(ts_secs).unwrap();
    cut_at_once(&v, since, 2.0);
    let end = session_end(&w, "grant_expired");
    assert!(end["bytes_up"].as_u64().unwrap() > 16 << 20, "{end}");
    assert_eq!(end["relay"], "splice", "{end}");
}

/// A record's `ts` in seconds since the epoch.
fn ts_secs(ts: &str) -> f64 {
    let t = warden::timestamp::parse(ts).unwrap_or_else(|| panic!("not a timestamp: {ts}"));
    t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs_f64()
}
