//! Audit shipping from a running daemon: `[audit.ship]` in `warden.toml`, a session through the proxy, a
//! `kill -9` and a restart, then `warden audit verify --s3` from the bucket alone (moto in server mode on
//! loopback, with Object Lock).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::dataplane::assert_reached;
use crate::harness::{
    IdentitySpec, Idp, Server, Warden, can_run, free_port, privileged, tcp_policy, wait_for,
};

struct Moto {
    child: Child,
    port: u16,
}

impl Moto {
    fn available() -> bool {
        Command::new("moto_server").arg("--help").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok()
    }

    fn start() -> Self {
        let port = free_port();
        let child = Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("moto_server");
        let moto = Moto { child, port };
        let end = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < end, "moto_server did not listen on {port}");
            std::thread::sleep(Duration::from_millis(50));
        }
        moto
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn connection(port: u16, creds: &Path) -> warden::audit::ship::Connection {
    warden::audit::ship::Connection {
        endpoint: Some(format!("http://127.0.0.1:{port}")),
        region: "us-east-1".into(),
        force_path_style: true,
        ca_file: None,
        credentials_file: Some(creds.to_path_buf()),
    }
}

#[test]
fn the_daemon_ships_its_sessions_and_a_kill9_ships_nothing_twice() {
    let name = "the_daemon_ships_its_sessions_and_a_kill9_ships_nothing_twice";
    if !privileged(name) || !can_run(name, &[("needs moto_server (run scripts/setup.sh)", Moto::available())])
    {
        return;
    }
    let moto = Moto::start();
    let tmp = tempfile::tempdir().unwrap();
    let creds = tmp.path().join("s3-credentials");
    std::fs::write(
        &creds,
        "[default]\naws_access_key_id = warden-test\naws_secret_access_key = warden-test-secret\n",
    )
    .unwrap();
    let bucket = format!("warden-priv-{}", std::process::id());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let store = rt.block_on(async {
        let store =
            warden::audit::ship::Store::connect(&connection(moto.port, &creds), &bucket).await.unwrap();
        store.create_locked_bucket().await.unwrap();
        store
    });

    let idp = Idp::start();
    let db = Server::start("127.0.0.5", "db");
    let mut w = Warden::builder("ship")
        .policy(&tcp_policy("db", db.addr, "5m"))
        .identity(IdentitySpec::pkjwt(&idp, "bot"), &idp.issuer)
        .config_extra(&format!(
            "[audit.ship]\nendpoint = \"http://127.0.0.1:{}\"\nbucket = {bucket:?}\nforce_path_style = true\ninterval = \"1s\"\nretention = \"2d\"\ncredentials_file = {creds:?}\n",
            moto.port
        ))
        .start();
    let cg = w.cgroup("agent");
    w.tag(&cg, "bot");
    let port = db.addr.port().to_string();
    let shipped_past = |w: &Warden, seq: u64| {
        w.wait_record("an audit.shipped record covering the session", |r| {
            r["event"] == "audit.shipped" && r["last_seq"].as_u64().is_some_and(|l| l >= seq)
        })
    };
    assert_reached(&cg.probe(&["connect", "127.0.0.5", &port]), "db");
    let end = w.wait_record("session.end", |r| r["event"] == "session.end");
    shipped_past(&w, end["seq"].as_u64().unwrap());

    // A crash, a restart, another session: shipped too, nothing shipped twice.
    w.kill9();
    w.spawn();
    assert_reached(&cg.probe(&["connect", "127.0.0.5", &port]), "db");
    let ends = wait_for("the second session.end", Duration::from_secs(20), || {
        let ends: Vec<_> = w.records().into_iter().filter(|r| r["event"] == "session.end").collect();
        (ends.len() >= 2).then_some(ends)
    });
    shipped_past(&w, ends[1]["seq"].as_u64().unwrap());
    w.stop();

    let versions = rt.block_on(store.versions("hosts/test-ship/")).unwrap();
    let mut keys: Vec<&str> = versions.iter().map(|v| v.key.as_str()).collect();
    let n = keys.len();
    keys.sort_unstable();
    keys.dedup();
    assert_eq!(keys.len(), n, "a key with two versions: {versions:?}");
    assert!(keys.contains(&"hosts/test-ship/pubkey"), "{keys:?}");

    // The auditor's view, from the bucket alone, and compared with the host's files.
    let out = Command::new(crate::harness::WARDEN)
        .args(["audit", "verify", "--s3", &format!("s3://{bucket}/hosts/test-ship"), "--dir"])
        .arg(w.audit_dir())
        .args(["--endpoint", &format!("http://127.0.0.1:{}", moto.port), "--path-style", "--credentials"])
        .arg(&creds)
        .env("WARDEN_CONFIG", tmp.path().join("none.toml"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("intact in s3://") && stdout.contains("COMPLIANCE"), "{stdout}");
}
