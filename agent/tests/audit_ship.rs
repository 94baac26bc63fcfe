//! Shipping audit segments to a real S3-compatible server with Object Lock (moto in server mode, on
//! loopback), and verifying a host's chain from the bucket alone: under load, with the storage down for a
//! while, after a crash between an upload and its record, against overwrites and deletes, with a local
//! file deleted or changed, and with an object's lock missing or cut short.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use time::OffsetDateTime;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use warden::audit::ship::remote::{Location, verify_bucket};
use warden::audit::ship::s3::{Checksums, Put};
use warden::audit::ship::{Connection, ShipOptions, Shipping, Stats, Store, segment_key};
use warden::audit::verify::{Report, verify_dir};
use warden::audit::{Audit, AuditOptions, Record, read_shipped, sign};

/// One moto server for the whole test binary; it dies with the process (PR_SET_PDEATHSIG from a thread
/// that lives as long as the process).
fn moto() -> u16 {
    static PORT: OnceLock<u16> = OnceLock::new();
    *PORT.get_or_init(|| {
        let port = free_port();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut cmd = Command::new("moto_server");
            cmd.args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            // SAFETY: prctl is async-signal-safe and touches only this (child) process.
            unsafe {
                std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
            let child: std::io::Result<Child> = cmd.spawn();
            match child {
                Ok(mut c) => {
                    tx.send(Ok(())).ok();
                    let _ = c.wait();
                }
                Err(e) => {
                    tx.send(Err(e)).ok();
                }
            }
        });
        rx.recv().unwrap().expect("moto_server must be installed (scripts/setup.sh installs moto[server])");
        let end = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < end, "moto_server did not listen on {port} within 30s");
            std::thread::sleep(Duration::from_millis(50));
        }
        port
    })
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// A TCP forwarder in front of the storage that can be switched off: new connections are dropped at
/// once and live ones are cut, as when the storage is unreachable.
struct Switch {
    port: u16,
    up: Arc<AtomicBool>,
    cut: Arc<std::sync::Mutex<CancellationToken>>,
    task: JoinHandle<()>,
}

impl Switch {
    async fn new(target: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let up = Arc::new(AtomicBool::new(true));
        let cut = Arc::new(std::sync::Mutex::new(CancellationToken::new()));
        let (up2, cut2) = (up.clone(), cut.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else { return };
                if !up2.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let token = cut2.lock().unwrap().clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(("127.0.0.1", target)).await else { return };
                    tokio::select! {
                        () = token.cancelled() => {}
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                    }
                });
            }
        });
        Self { port, up, cut, task }
    }

    fn down(&self) {
        self.up.store(false, Ordering::SeqCst);
        let mut cut = self.cut.lock().unwrap();
        cut.cancel();
        *cut = CancellationToken::new();
    }

    fn up(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

impl Drop for Switch {
    fn drop(&mut self) {
        self.task.abort();
        self.cut.lock().unwrap().cancel();
    }
}

fn credentials(dir: &Path) -> PathBuf {
    let path = dir.join("s3-credentials");
    std::fs::write(
        &path,
        "[default]\naws_access_key_id = warden-test\naws_secret_access_key = warden-test-secret\n",
    )
    .unwrap();
    path
}

fn connection(port: u16, creds: &Path) -> Connection {
    Connection {
        endpoint: Some(format!("http://127.0.0.1:{port}")),
        region: "us-east-1".into(),
        force_path_style: true,
        ca_file: None,
        credentials_file: Some(creds.to_path_buf()),
    }
}

static BUCKETS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// A fresh Object Lock bucket on the moto server.
async fn bucket(creds: &Path) -> Store {
    let name = format!("audit-{}-{}", std::process::id(), BUCKETS.fetch_add(1, Ordering::SeqCst));
    let store = Store::connect(&connection(moto(), creds), &name).await.unwrap();
    store.create_locked_bucket().await.unwrap();
    store
}

/// A host: an audit writer in `root` with shipping on, and (once started) its shipper.
struct Host {
    root: tempfile::TempDir,
    audit: Audit,
    writer: Option<JoinHandle<()>>,
    stop_writer: CancellationToken,
    shipper: Option<(JoinHandle<()>, CancellationToken)>,
    stats: Arc<Stats>,
}

const PREFIX: &str = "hosts/test-host/";

impl Host {
    fn start(root: tempfile::TempDir, max_file_bytes: u64) -> Self {
        Self::start_with(root, max_file_bytes, |_| {})
    }

    fn start_with(root: tempfile::TempDir, max_file_bytes: u64, f: impl FnOnce(&mut AuditOptions)) -> Self {
        let mut opts = AuditOptions::in_dir(root.path());
        opts.config.max_file_bytes = max_file_bytes;
        opts.config.checkpoint_records = 100;
        opts.config.retain_days = 0;
        opts.config.ship.bucket = toml::Spanned::new(0..0, "on".into());
        f(&mut opts);
        let stop_writer = CancellationToken::new();
        let (audit, writer) = Audit::start_with(&opts, stop_writer.clone()).unwrap();
        Self { root, audit, writer: Some(writer), stop_writer, shipper: None, stats: Arc::default() }
    }

    fn dir(&self) -> PathBuf {
        self.root.path().join("audit")
    }

    fn ship(&mut self, store: &Store, interval: Duration) {
        let opts = ShipOptions {
            store: store.clone(),
            prefix: PREFIX.into(),
            audit_dir: self.dir(),
            pubkey: sign::load(self.root.path()).unwrap().verifying_key(),
            retention: Duration::from_secs(3 * 86_400),
            interval,
            stats: self.stats.clone(),
        };
        let stop = CancellationToken::new();
        let task = tokio::spawn(warden::audit::ship::run(opts, self.audit.clone(), stop.clone()));
        self.shipper = Some((task, stop));
    }

    async fn stop_shipper(&mut self) {
        if let Some((task, stop)) = self.shipper.take() {
            stop.cancel();
            task.await.unwrap();
        }
    }

    /// Stops shipper and writer; returns the root.
    async fn stop(mut self) -> tempfile::TempDir {
        self.stop_shipper().await;
        self.stop_writer.cancel();
        if let Some(w) = self.writer.take() {
            w.await.unwrap();
        }
        self.root
    }

    async fn sessions(&self, from: u64, n: u64) {
        for i in from..from + n {
            self.audit
                .append_durable(
                    Record::new("session.start")
                        .field("session", format!("s-{i}"))
                        .field("target", "orders-db")
                        .field("text", "x".repeat(200)),
                )
                .await
                .unwrap();
        }
    }

    /// The last seq of the newest sealed file (every file but the newest is sealed).
    fn last_sealed(&self) -> Option<u64> {
        let mut firsts: Vec<u64> = std::fs::read_dir(self.dir())
            .unwrap()
            .filter_map(|e| {
                let name = e.unwrap().file_name().into_string().unwrap();
                name.strip_prefix("audit-")?.strip_suffix(".jsonl")?.parse().ok()
            })
            .collect();
        firsts.sort_unstable();
        firsts.last().and_then(|newest| newest.checked_sub(1)).filter(|_| firsts.len() > 1)
    }

    /// Seals now and waits until everything sealed is shipped.
    async fn seal_and_wait(&self) -> u64 {
        assert!(self.audit.seal().await.unwrap(), "nothing to seal");
        let want = self.last_sealed().unwrap();
        wait_until("the sealed segments to be shipped", Duration::from_secs(60), || {
            read_shipped(&self.dir()).unwrap().is_some_and(|m| m >= want)
        })
        .await;
        want
    }
}

async fn wait_until(what: &str, deadline: Duration, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + deadline;
    while !f() {
        assert!(Instant::now() < end, "timed out after {deadline:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn loc(store: &Store) -> Location {
    Location { bucket: store.bucket().into(), prefix: PREFIX.into() }
}

fn records(dir: &Path, event: &str) -> Vec<serde_json::Map<String, serde_json::Value>> {
    let mut out = Vec::new();
    warden::audit::export_lines(dir, None, None, |line| {
        let obj: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(line).unwrap();
        if obj["event"] == event {
            out.push(obj);
        }
        Ok(())
    })
    .unwrap();
    out
}

fn assert_intact(r: &Report) {
    assert!(r.problem.is_none(), "{:?}\nnotes: {:?}", r.problem, r.notes);
    assert!(r.signatures_checked && r.checkpoints > 0, "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ships_under_load_and_the_bucket_alone_verifies() {
    let root = tempfile::tempdir().unwrap();
    let creds = credentials(root.path());
    let store = bucket(&creds).await;
    let mut host = Host::start(root, 32 * 1024);
    host.ship(&store, Duration::from_millis(200));
    // Load: many writers at once while files rotate every 32 KiB and the shipper uploads behind them.
    let mut tasks = Vec::new();
    for w in 0..8 {
        let audit = host.audit.clone();
        tasks.push(tokio::spawn(async move {
            let mut last = 0;
            for i in 0..250 {
                last = audit
                    .append_durable(
                        Record::new("pg.query")
                            .field("session", format!("w{w}"))
                            .field("n", i)
                            .field("text", "select 1 ".repeat(20)),
                    )
                    .await
                    .unwrap();
            }
            last
        }));
    }
    let mut written = 0;
    for t in tasks {
        written = written.max(t.await.unwrap());
    }
    // The last file may have just rotated (then there is nothing left to seal): either way, after this
    // the file holding the last record is sealed.
    host.audit.seal().await.unwrap();
    wait_until("every record written to be shipped", Duration::from_secs(60), || {
        read_shipped(&host.dir()).unwrap().is_some_and(|m| m >= written)
    })
    .await;
    let shipped = read_shipped(&host.dir()).unwrap().unwrap();
    assert!(shipped >= 2000, "{shipped}");
    let stats = host.stats.clone();
    let dir = host.dir();
    let root = host.stop().await;
    let key = sign::load(root.path()).unwrap().verifying_key();

    // Every upload is in the chain, once per segment, and the local chain is intact.
    let shipped_records = records(&dir, "audit.shipped");
    let mut segments: Vec<&str> = shipped_records.iter().map(|r| r["segment"].as_str().unwrap()).collect();
    let count = segments.len();
    segments.dedup();
    assert_eq!(segments.len(), count, "a segment recorded twice");
    assert!(count >= 10, "only {count} segments for ~250 KiB in 32 KiB files");
    assert_eq!(stats.segments.load(Ordering::Relaxed), count as u64);
    assert_intact(&verify_dir(&dir, Some(&key)).unwrap());

    // From the bucket alone, with the key the bucket published.
    let (report, bucket_report) = verify_bucket(&store, &loc(&store), None, None).await.unwrap();
    assert_intact(&report);
    assert_eq!(bucket_report.segments, count);
    assert!(report.last_seq.unwrap() >= shipped);
    assert!(
        bucket_report.earliest_retain_until.unwrap()
            > OffsetDateTime::now_utc() + Duration::from_secs(2 * 86_400)
    );
    // Each segment ended in a signed checkpoint: the bucket is signed through its last record.
    assert_eq!(report.signed_through, report.last_seq.map(|s| s - 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_down_for_a_while_then_back_loses_nothing_and_ships_each_segment_once() {
    let root = tempfile::tempdir().unwrap();
    let creds = credentials(root.path());
    let store = bucket(&creds).await;
    let switch = Switch::new(moto()).await;
    let via_switch = Store::connect(&connection(switch.port, &creds), store.bucket()).await.unwrap();
    let mut host = Host::start(root, 0);
    host.ship(&via_switch, Duration::from_secs(3600));
    host.sessions(0, 20).await;
    host.seal_and_wait().await;

    switch.down();
    for round in 0..4 {
        host.sessions(100 + round * 10, 10).await;
        assert!(host.audit.seal().await.unwrap());
    }
    let sealed = host.last_sealed().unwrap();
    wait_until("a failed upload while the storage is down", Duration::from_secs(60), || {
        host.stats.failures.load(Ordering::Relaxed) >= 1
    })
    .await;
    let before = read_shipped(&host.dir()).unwrap().unwrap();
    assert!(before < sealed, "shipped through {before} while the storage was down");
    // Nothing was deleted locally while unshipped.
    let files = std::fs::read_dir(host.dir())
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "jsonl"))
        .count();
    assert!(files >= 6, "{files}");

    switch.up();
    // The shipper retries on its own (backoff from 1 s); nudge nothing.
    wait_until("the backlog to ship once the storage is back", Duration::from_secs(60), || {
        read_shipped(&host.dir()).unwrap().is_some_and(|m| m >= sealed)
    })
    .await;
    let dir = host.dir();
    let _root = host.stop().await;

    let versions = store.versions(PREFIX).await.unwrap();
    let mut keys: Vec<&str> = versions.iter().map(|v| v.key.as_str()).collect();
    let n = keys.len();
    keys.sort_unstable();
    keys.dedup();
    assert_eq!(keys.len(), n, "some key has two versions: {versions:?}");
    let (report, _) = verify_bucket(&store, &loc(&store), None, Some(&dir)).await.unwrap();
    assert_intact(&report);
    assert!(report.last_seq.unwrap() >= sealed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_upload_and_record_does_not_ship_a_second_object() {
    let root = tempfile::tempdir().unwrap();
    let creds = credentials(root.path());
    let store = bucket(&creds).await;
    let host = Host::start(root, 0);
    host.sessions(0, 30).await;
    assert!(host.audit.seal().await.unwrap());
    let dir = host.dir();
    let root = host.stop().await;
    // The upload went through, then the daemon died before recording it.
    let name = "audit-00000000000000000000.jsonl";
    let bytes = std::fs::read(dir.join(name)).unwrap();
    let sums = Checksums::of(&bytes);
    let until = OffsetDateTime::now_utc() + Duration::from_secs(86_400);
    let key = segment_key(PREFIX, name);
    assert!(matches!(
        store.put_locked(&key, bytes.clone(), &sums, until, &[]).await.unwrap(),
        Put::Created { .. }
    ));

    let mut host = Host::start(root, 0);
    host.ship(&store, Duration::from_secs(3600));
    host.sessions(30, 5).await;
    host.seal_and_wait().await;
    let dir = host.dir();
    let _root = host.stop().await;
    let versions: Vec<_> = store.versions(&key).await.unwrap();
    assert_eq!(versions.len(), 1, "{versions:?}");
    // The storage keeps the SHA-256 the upload carried, and the COMPLIANCE lock.
    let head = store.head(&key, None).await.unwrap().unwrap();
    assert_eq!(head.sha256_b64, Some(sums.sha256_b64()));
    assert_eq!(head.lock_mode.as_deref(), Some("COMPLIANCE"));
    let shipped = records(&dir, "audit.shipped");
    assert_eq!(shipped.iter().filter(|r| r["segment"] == name).count(), 1);
    assert_eq!(shipped[0]["sha256"], sums.sha256_hex());
    let (report, _) = verify_bucket(&store, &loc(&store), None, Some(&dir)).await.unwrap();
    assert_intact(&report);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_storage_refuses_deleting_a_shipped_object_and_an_overwrite_never_replaces_it() {
    let root = tempfile::tempdir().unwrap();
    let creds = credentials(root.path());
    let store = bucket(&creds).await;
    let mut host = Host::start(root, 0);
    host.ship(&store, Duration::from_secs(3600));
    host.sessions(0, 10).await;
    host.seal_and_wait().await;
    let dir = host.dir();
    let _root = host.stop().await;
    let key = segment_key(PREFIX, "audit-00000000000000000000.jsonl");
    let original = std::fs::read(dir.join("audit-00000000000000000000.jsonl")).unwrap();
    let version = store.head(&key, None).await.unwrap().unwrap().version_id;

    // Deleting the locked version is refused.
    let err = store.delete_version(&key, version.as_deref()).await.unwrap_err().to_string();
    assert!(err.contains("AccessDenied"), "{err}");
    // A write-once put is refused outright.
    let forged = String::from_utf8(original.clone()).unwrap().replace("s-3", "s-X").into_bytes();
    let sums = Checksums::of(&forged);
    let until = OffsetDateTime::now_utc() + Duration::from_secs(86_400);
    assert!(matches!(store.put_locked(&key, forged.clone(), &sums, until, &[]).await.unwrap(), Put::Exists));
    // A plain put (and a delete marker) only add versions; the shipped one stays, and verify reads it.
    store.put_plain(&key, forged).await.unwrap();
    store.delete_version(&key, None).await.unwrap();
    let (held, _) = store.get(&key, version.as_deref()).await.unwrap();
    assert_eq!(held, original);
    let (report, _) = verify_bucket(&store, &loc(&store), None, None).await.unwrap();
    assert_intact(&report);
    assert!(report.notes.iter().any(|n| n.contains("2 versions")), "{:?}", report.notes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_local_file_verifies_from_the_bucket_and_a_changed_one_is_caught() {
    let root = tempfile::tempdir().unwrap();
    let creds = credentials(root.path());
    let store = bucket(&creds).await;
    let mut host = Host::start(root, 0);
    host.ship(&store, Duration::from_secs(3600));
    for round in 0..3 {
        host.sessions(round * 10, 10).await;
        host.seal_and_wait().await;
    }
    let dir = host.dir();
    let root = host.stop().await;
    let key = sign::load(root.path()).unwrap().verifying_key();
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "jsonl"))
        .collect();
    files.sort();

    std::fs::remove_file(&files[0]).unwrap();
    assert!(verify_dir(&dir, Some(&key)).unwrap().problem.is_some(), "locally the start is gone");
    let (report, extra) = verify_bucket(&store, &loc(&store), None, Some(&dir)).await.unwrap();
    assert_intact(&report);
    assert_eq!(report.first_seq, Some(0));
    assert!(extra.local_same >= 2, "{extra:?}");

    // Change one byte of a shipped record in a local file, keeping the line's own hash consistent is not
    // possible without the chain breaking; a careful attacker rewrites the whole tail. Either way the
    // comparison with the bucket names the file and the line.
    let text = std::fs::read_to_string(&files[1]).unwrap();
    let edited = text.replacen("s-1", "s-9", 1);
    assert_ne!(text, edited);
    std::fs::write(&files[1], edited).unwrap();
    let (report, _) = verify_bucket(&store, &loc(&store), Some(key), Some(&dir)).await.unwrap();
    let problem = report.problem.expect("the changed local file must be caught");
    assert_eq!(problem.file, files[1]);
    assert!(problem.what.contains("differs from the bucket"), "{problem}");
    assert!(problem.line >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_segment_or_lock_fails_verify() {
    let root = tempfile::tempdir().unwrap();
    let creds = credentials(root.path());
    let host = Host::start(root, 0);
    for round in 0..3 {
        host.sessions(round * 10, 10).await;
        assert!(host.audit.seal().await.unwrap());
    }
    let dir = host.dir();
    let root = host.stop().await;
    let pubkey = sign::load(root.path()).unwrap().verifying_key();
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "jsonl"))
        .collect();
    files.sort();
    let until = OffsetDateTime::now_utc() + Duration::from_secs(86_400);
    let put = |store: Store, path: PathBuf, locked: bool| async move {
        let bytes = std::fs::read(&path).unwrap();
        let key = segment_key(PREFIX, path.file_name().unwrap().to_str().unwrap());
        if locked {
            store.put_locked(&key, bytes.clone(), &Checksums::of(&bytes), until, &[]).await.unwrap();
        } else {
            store.put_plain(&key, bytes).await.unwrap();
        }
        key
    };

    // A gap: segments 0 and 2 shipped, 1 not.
    let store = bucket(&creds).await;
    put(store.clone(), files[0].clone(), true).await;
    let third = put(store.clone(), files[2].clone(), true).await;
    let (report, _) = verify_bucket(&store, &loc(&store), Some(pubkey), None).await.unwrap();
    let problem = report.problem.expect("a missing segment must fail");
    assert!(problem.what.contains("segment missing"), "{problem}");
    assert!(problem.file.to_string_lossy().ends_with(&third), "{problem}");

    // No lock on one object.
    let store = bucket(&creds).await;
    put(store.clone(), files[0].clone(), true).await;
    let unlocked = put(store.clone(), files[1].clone(), false).await;
    let (report, _) = verify_bucket(&store, &loc(&store), Some(pubkey), None).await.unwrap();
    let problem = report.problem.expect("an unlocked object must fail");
    assert!(problem.what.contains("not COMPLIANCE"), "{problem}");
    assert!(problem.file.to_string_lossy().ends_with(&unlocked), "{problem}");

    // Retention cut short (moto allows it; real S3 refuses): verify checks the date itself.
    let store = bucket(&creds).await;
    let first = put(store.clone(), files[0].clone(), true).await;
    let version = store.head(&first, None).await.unwrap().unwrap().version_id;
    store
        .extend_retention(&first, version.as_deref(), OffsetDateTime::now_utc() - Duration::from_secs(60))
        .await
        .unwrap();
    let (report, _) = verify_bucket(&store, &loc(&store), Some(pubkey), None).await.unwrap();
    let problem = report.problem.expect("an expired lock must fail");
    assert!(problem.what.contains("retention ended"), "{problem}");

    // A tail signed by nobody (what someone with only bucket access could append): refused.
    let store = bucket(&creds).await;
    put(store.clone(), files[0].clone(), true).await;
    let second = std::fs::read_to_string(&files[1]).unwrap();
    let lines: Vec<&str> = second.lines().collect();
    assert!(lines.last().unwrap().contains("\"event\":\"checkpoint\""));
    let unsigned = format!("{}\n", lines[..lines.len() - 1].join("\n")).into_bytes();
    let key = segment_key(PREFIX, files[1].file_name().unwrap().to_str().unwrap());
    store.put_locked(&key, unsigned.clone(), &Checksums::of(&unsigned), until, &[]).await.unwrap();
    let (report, _) = verify_bucket(&store, &loc(&store), Some(pubkey), None).await.unwrap();
    let problem = report.problem.expect("an unsigned tail must fail");
    assert!(problem.what.contains("not covered by a checkpoint signature"), "{problem}");

    // No published key and none given.
    let (report, _) = verify_bucket(&store, &loc(&store), None, None).await.unwrap();
    assert!(report.problem.unwrap().what.contains("--pubkey"));
}

/// `warden audit ARGS` against moto with the test's credentials: exit code, stdout, stderr.
fn audit_cli(root: &Path, creds: &Path, args: &[&str]) -> (Option<i32>, String, String) {
    let endpoint = format!("http://127.0.0.1:{}", moto());
    let out = Command::new(env!("CARGO_BIN_EXE_warden"))
        .args(["audit"])
        .args(args)
        .args(["--endpoint", &endpoint, "--path-style", "--credentials"])
        .arg(creds)
        .env("WARDEN_CONFIG", root.join("no-such.toml"))
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warden_audit_verify_and_export_read_the_bucket() {
    let root = tempfile::tempdir().unwrap();
    let creds = credentials(root.path());
    let store = bucket(&creds).await;
    let mut host = Host::start(root, 0);
    host.ship(&store, Duration::from_secs(3600));
    host.sessions(0, 20).await;
    host.seal_and_wait().await;
    let dir = host.dir();
    let root = host.stop().await;
    let url = format!("s3://{}/{}", store.bucket(), PREFIX.trim_end_matches('/'));
    let warden = |args: &[&str]| audit_cli(root.path(), &creds, args);
    let (code, out, err) = warden(&["verify", "--s3", &url]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("intact in s3://"), "{out}");
    assert!(out.contains("Object Lock COMPLIANCE"), "{out}");

    let (code, out, err) = warden(&["export", "--s3", &url, "--since", "5", "--until", "9"]);
    assert_eq!(code, Some(0), "{err}");
    let seqs: Vec<u64> = out
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, vec![5, 6, 7, 8, 9]);

    // A local file changed after shipping: the comparison fails and names it.
    let first = dir.join("audit-00000000000000000000.jsonl");
    let text = std::fs::read_to_string(&first).unwrap();
    std::fs::write(&first, text.replacen("orders-db", "orders-dX", 1)).unwrap();
    let (code, out, _) = warden(&["verify", "--s3", &url, "--dir", dir.to_str().unwrap()]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("TAMPERED") && out.contains("audit-00000000000000000000.jsonl"), "{out}");
}

/// haproxy terminating TLS in front of moto, with a certificate from a CA made here.
struct TlsFront {
    child: Child,
    port: u16,
}

impl Drop for TlsFront {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn ca(name: &str) -> (rcgen::Certificate, rcgen::KeyPair) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.distinguished_name.push(rcgen::DnType::CommonName, name);
    params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::DigitalSignature];
    (params.self_signed(&key).unwrap(), key)
}

fn tls_front(dir: &Path, ca: &(rcgen::Certificate, rcgen::KeyPair)) -> TlsFront {
    let key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap();
    let cert = params.signed_by(&key, &ca.0, &ca.1).unwrap();
    let pem = dir.join("front.pem");
    std::fs::write(&pem, format!("{}{}", cert.pem(), key.serialize_pem())).unwrap();
    let port = free_port();
    let cfg = dir.join("haproxy.cfg");
    std::fs::write(
        &cfg,
        format!(
            "global\n  maxconn 100\ndefaults\n  mode http\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n\
             frontend s3\n  bind 127.0.0.1:{port} ssl crt {}\n  default_backend moto\n\
             backend moto\n  server moto 127.0.0.1:{}\n",
            pem.display(),
            moto()
        ),
    )
    .unwrap();
    let child = Command::new("haproxy")
        .arg("-db")
        .arg("-f")
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("haproxy (scripts/setup.sh installs it)");
    let front = TlsFront { child, port };
    let end = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < end, "haproxy did not listen on {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
    front
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_endpoints_are_trusted_through_the_ca_file_only() {
    let root = tempfile::tempdir().unwrap();
    let creds = credentials(root.path());
    let ours = ca("storage CA");
    let front = tls_front(root.path(), &ours);
    let ca_file = root.path().join("ca.pem");
    std::fs::write(&ca_file, ours.0.pem()).unwrap();
    let other_file = root.path().join("other.pem");
    std::fs::write(&other_file, ca("someone else").0.pem()).unwrap();
    let conn = |ca: Option<&Path>| Connection {
        endpoint: Some(format!("https://127.0.0.1:{}", front.port)),
        ca_file: ca.map(Path::to_path_buf),
        ..connection(0, &creds)
    };
    let name = format!("audit-tls-{}", std::process::id());
    let store = Store::connect(&conn(Some(&ca_file)), &name).await.unwrap();
    store.create_locked_bucket().await.unwrap();
    let body = b"over tls\n".to_vec();
    let until = OffsetDateTime::now_utc() + Duration::from_secs(3600);
    assert!(matches!(
        store.put_locked("k", body.clone(), &Checksums::of(&body), until, &[]).await.unwrap(),
        Put::Created { .. }
    ));
    assert_eq!(store.get("k", None).await.unwrap().0, body);

    for ca in [Some(other_file.as_path()), None] {
        let store = Store::connect(&conn(ca), &name).await.unwrap();
        let err = store.head("k", None).await.unwrap_err().to_string();
        assert!(err.to_lowercase().contains("certificate"), "{ca:?}: {err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_host_does_not_ship_its_own_bookkeeping() {
    let root = tempfile::tempdir().unwrap();
    let creds = credentials(root.path());
    let store = bucket(&creds).await;
    let mut host = Host::start(root, 0);
    host.ship(&store, Duration::from_secs(3600));
    host.sessions(0, 10).await;
    host.seal_and_wait().await;
    // The key's publication record may have landed after that seal; ship it too.
    if host.audit.seal().await.unwrap() {
        let want = host.last_sealed().unwrap();
        wait_until("the second seal to ship", Duration::from_secs(60), || {
            read_shipped(&host.dir()).unwrap().is_some_and(|m| m >= want)
        })
        .await;
    }
    // Only audit.shipped records and checkpoints are new now: nothing to seal, nothing to put.
    let requests = host.stats.requests.load(Ordering::Relaxed);
    for _ in 0..3 {
        assert!(!host.audit.seal().await.unwrap(), "sealed a file of bookkeeping only");
    }
    assert_eq!(host.stats.requests.load(Ordering::Relaxed), requests);
    let _root = host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_never_deletes_an_unshipped_file() {
    let root = tempfile::tempdir().unwrap();
    let creds = credentials(root.path());
    let store = bucket(&creds).await;
    // A wall clock the test moves two days past the files' mtimes, so retention (1 day) finds them due.
    let ahead = Arc::new(std::sync::atomic::AtomicI64::new(0));
    let ahead2 = ahead.clone();
    let mut host = Host::start_with(root, 0, move |o| {
        o.config.retain_days = 1;
        o.clock = Arc::new(move || {
            OffsetDateTime::now_utc() + time::Duration::seconds(ahead2.load(Ordering::SeqCst))
        });
    });
    for round in 0..3 {
        host.sessions(round * 10, 10).await;
        assert!(host.audit.seal().await.unwrap());
    }
    let jsonl = |dir: &Path| {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| Path::new(n).extension().is_some_and(|x| x == "jsonl"))
            .collect();
        v.sort();
        v
    };
    let before = jsonl(&host.dir());
    ahead.store(2 * 86_400, Ordering::SeqCst);
    host.sessions(100, 1).await;
    assert!(host.audit.seal().await.unwrap(), "a rotation, which runs retention");
    let kept = jsonl(&host.dir());
    assert!(
        before.iter().all(|f| kept.contains(f)),
        "retention deleted an unshipped file: {before:?} -> {kept:?}"
    );
    assert!(records(&host.dir(), "retention.deleted").is_empty());

    // Once shipped, the next rotation deletes them (shipped counts as exported).
    host.ship(&store, Duration::from_secs(3600));
    let want = host.last_sealed().unwrap();
    wait_until("the backlog to ship", Duration::from_secs(60), || {
        read_shipped(&host.dir()).unwrap().is_some_and(|m| m >= want)
    })
    .await;
    host.sessions(200, 1).await;
    assert!(host.audit.seal().await.unwrap());
    let deleted = records(&host.dir(), "retention.deleted");
    assert!(!deleted.is_empty());
    assert!(
        deleted
            .iter()
            .all(|d| d["through_seq"].as_u64().unwrap() <= read_shipped(&host.dir()).unwrap().unwrap())
    );
    host.sessions(300, 1).await;
    let shipped = host.seal_and_wait().await;
    let dir = host.dir();
    let _root = host.stop().await;
    // Deleted locally, still whole in the bucket; compare mode agrees with what is left.
    let (report, _) = verify_bucket(&store, &loc(&store), None, Some(&dir)).await.unwrap();
    assert_intact(&report);
    assert_eq!(report.first_seq, Some(0));
    assert!(report.last_seq.unwrap() >= shipped);
}

/// `warden status`'s shipping view follows the shipper: what it shipped last, what waits while the storage
/// is down, the error and the retry, and the backlog draining once it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_view_shows_the_last_segment_the_backlog_the_error_and_the_retry() {
    let root = tempfile::tempdir().unwrap();
    let creds = credentials(root.path());
    let store = bucket(&creds).await;
    let switch = Switch::new(moto()).await;
    let via_switch = Store::connect(&connection(switch.port, &creds), store.bucket()).await.unwrap();
    let mut host = Host::start(root, 0);
    host.ship(&via_switch, Duration::from_secs(3600));
    let shipping = Shipping {
        bucket: store.bucket().into(),
        prefix: PREFIX.into(),
        audit_dir: host.dir(),
        stats: host.stats.clone(),
    };
    let json = || serde_json::to_value(shipping.status()).unwrap();
    wait_until("the shipper to plan its first attempt", Duration::from_secs(30), || {
        json()["next_attempt"].is_string()
    })
    .await;
    let first = json();
    assert_eq!(first["enabled"], true);
    assert_eq!(first["bucket"], store.bucket());
    assert_eq!(first["prefix"], PREFIX);
    assert!(first["shipped_through"].is_null() && first["last_shipped"].is_null(), "{first}");

    host.sessions(0, 20).await;
    let through = host.seal_and_wait().await;
    // The shipper raises `audit.dir/shipped` first, then its progress: wait for the view to follow.
    wait_until("the status view to show the upload", Duration::from_secs(30), || {
        json()["last_shipped"]["last_seq"] == through
    })
    .await;
    let s = json();
    assert_eq!(s["shipped_through"], through, "{s}");
    assert_eq!(s["last_shipped"]["last_seq"], through, "{s}");
    assert_eq!(s["last_shipped"]["first_seq"], 0, "{s}");
    assert_eq!(s["last_shipped"]["segment"], "audit-00000000000000000000.jsonl", "{s}");
    assert_eq!(s["last_shipped"]["key"], format!("{PREFIX}segments/audit-00000000000000000000.jsonl"));
    assert_eq!(s["pending"]["segments"], 0, "{s}");
    assert!(s["last_error"].is_null() && s["stopped"].is_null(), "{s}");

    switch.down();
    for round in 0..2 {
        host.sessions(100 + round * 10, 10).await;
        assert!(host.audit.seal().await.unwrap());
    }
    wait_until("a failed upload while the storage is down", Duration::from_secs(60), || {
        host.stats.failures.load(Ordering::Relaxed) >= 1
    })
    .await;
    let down = json();
    assert!(down["pending"]["segments"].as_u64().unwrap() >= 2, "{down}");
    assert!(down["pending"]["bytes"].as_u64().unwrap() > 0, "{down}");
    assert_eq!(down["pending"]["oldest"], format!("audit-{:020}.jsonl", through + 1), "{down}");
    assert!(down["last_error"]["error"].as_str().unwrap().contains("cannot"), "{down}");
    let failed_at = warden::timestamp::parse(down["last_error"]["at"].as_str().unwrap()).unwrap();
    let retry_at = warden::timestamp::parse(down["next_attempt"].as_str().unwrap()).unwrap();
    assert!(retry_at > failed_at && retry_at < failed_at + Duration::from_secs(301), "{down}");
    assert_eq!(down["shipped_through"], through, "{down}");
    let text = warden::daemon::status::render(&serde_json::json!({ "shipping": down }));
    for want in [
        format!("shipping: s3://{}/{PREFIX}; shipped through seq {through}", store.bucket()),
        format!("{} pending (", down["pending"]["segments"]),
        format!("  last error at {}: ", down["last_error"]["at"].as_str().unwrap()),
    ] {
        assert!(text.contains(&want), "missing {want:?} in\n{text}");
    }

    switch.up();
    let sealed = host.last_sealed().unwrap();
    // The shipper marks a segment shipped on disk, then notes it as the last shipped: wait for both.
    wait_until("the backlog to ship once the storage is back", Duration::from_secs(60), || {
        let s = json();
        s["pending"]["segments"] == 0 && s["last_shipped"]["last_seq"] == s["shipped_through"]
    })
    .await;
    let back = json();
    assert!(back["shipped_through"].as_u64().unwrap() >= sealed, "{back}");
    assert_eq!(back["last_shipped"]["last_seq"], back["shipped_through"], "{back}");
    assert!(!back["last_error"].is_null(), "the last error stays visible after recovery: {back}");
    assert!(back["segments_shipped"].as_u64().unwrap() >= 3, "{back}");
    let _root = host.stop().await;
}

/// Writes a terminal recording at `name` (under `recordings/` in `dir`) and returns the `ssh.recording`
/// record that names it with its hash, as the SSH handler writes one when a recording closes.
fn recording(dir: &Path, name: &str, body: &str) -> Record {
    std::fs::create_dir_all(dir.join("recordings")).unwrap();
    std::fs::write(dir.join(name), body).unwrap();
    let (sha256, bytes) = warden::audit::files::hash_file(&dir.join(name)).unwrap();
    Record::new("ssh.recording").field("file", name).field("sha256", sha256).field("bytes", bytes)
}

/// Terminal recordings go to the bucket with the segment that names them (write-once, locked,
/// checksummed), before it, and `verify --s3` checks each against the hash in the chain: a recording
/// changed before it was shipped, or one missing from the bucket, fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recordings_are_shipped_with_their_segment_and_verified_against_the_chain() {
    let root = tempfile::tempdir().unwrap();
    let creds = credentials(root.path());
    let store = bucket(&creds).await;
    let mut host = Host::start(root, 0);
    host.ship(&store, Duration::from_secs(3600));
    let dir = host.dir();
    let record = |name: &str, body: &str| recording(&dir, name, body);
    for (i, body) in ["{\"version\": 2}\n[0.1, \"o\", \"hi\"]\n", "{\"version\": 2}\n"].iter().enumerate() {
        let r = record(&format!("recordings/s-{i}-0.cast"), body);
        host.audit.append_durable(r).await.unwrap();
    }
    host.sessions(0, 3).await;
    host.seal_and_wait().await;
    let shipped = records(&dir, "audit.shipped");
    let keys: Vec<&str> = shipped
        .iter()
        .flat_map(|r| r["recordings"].as_array().unwrap())
        .map(|k| k.as_str().unwrap())
        .collect();
    assert_eq!(keys, [format!("{PREFIX}recordings/s-0-0.cast"), format!("{PREFIX}recordings/s-1-0.cast")]);
    let (held, head) = store.get(keys[0], None).await.unwrap();
    assert_eq!(held, std::fs::read(dir.join("recordings/s-0-0.cast")).unwrap());
    assert!(head.retain_until.is_some(), "the recording is under Object Lock");
    let (report, extra) = verify_bucket(&store, &loc(&store), None, None).await.unwrap();
    assert_intact(&report);
    assert_eq!(extra.recordings, 2, "{extra:?}");

    // A recording edited after its record was written (before shipping) is caught from the bucket.
    let r = record("recordings/s-2-0.cast", "{\"version\": 2}\n[0.1, \"o\", \"rm -rf /\"]\n");
    host.audit.append_durable(r).await.unwrap();
    std::fs::write(dir.join("recordings/s-2-0.cast"), "{\"version\": 2}\n[0.1, \"o\", \"ls\"]\n").unwrap();
    host.sessions(3, 3).await;
    host.seal_and_wait().await;
    let (report, _) = verify_bucket(&store, &loc(&store), None, None).await.unwrap();
    let problem = report.problem.expect("an edited recording must fail");
    assert!(problem.what.contains("does not match its ssh.recording record"), "{problem}");
    assert!(problem.file.to_string_lossy().ends_with("recordings/s-2-0.cast"), "{problem}");
    drop(host.stop().await);
}

/// `export --s3 --recordings DIR` fetches the recordings the exported records name from the bucket, at
/// their recorded paths; `--mark` (this host's own files) is refused with `--s3`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_from_the_bucket_fetches_recordings_and_refuses_mark() {
    let root = tempfile::tempdir().unwrap();
    let creds = credentials(root.path());
    let store = bucket(&creds).await;
    let mut host = Host::start(root, 0);
    host.ship(&store, Duration::from_secs(3600));
    let dir = host.dir();
    let body = "{\"version\": 2}\n[0.1, \"o\", \"uptime\"]\n";
    host.audit.append_durable(recording(&dir, "recordings/s-9-0.cast", body)).await.unwrap();
    host.sessions(0, 2).await;
    host.seal_and_wait().await;
    let root = host.stop().await;
    let url = format!("s3://{}/{}", store.bucket(), PREFIX.trim_end_matches('/'));
    let to = root.path().join("fetched");
    let (code, out, err) =
        audit_cli(root.path(), &creds, &["export", "--s3", &url, "--recordings", to.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("\"event\":\"ssh.recording\""), "{out}");
    assert_eq!(std::fs::read_to_string(to.join("recordings/s-9-0.cast")).unwrap(), body);
    let (code, _, err) = audit_cli(root.path(), &creds, &["export", "--s3", &url, "--mark"]);
    assert_eq!(code, Some(64), "{err}");
    assert!(err.contains("--mark") && err.contains("--s3"), "{err}");
}

/// A recording that never reached the bucket fails `verify --s3`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recording_missing_from_the_bucket_fails_verify() {
    let root = tempfile::tempdir().unwrap();
    let creds = credentials(root.path());
    let store = bucket(&creds).await;
    let mut host = Host::start(root, 0);
    host.ship(&store, Duration::from_secs(3600));
    let r = Record::new("ssh.recording")
        .field("file", "recordings/gone.cast")
        .field("sha256", "00")
        .field("bytes", 0);
    host.audit.append_durable(r).await.unwrap();
    host.sessions(0, 2).await;
    host.seal_and_wait().await;
    let (report, _) = verify_bucket(&store, &loc(&store), None, None).await.unwrap();
    let problem = report.problem.expect("a missing recording must fail");
    assert!(problem.what.contains("recording missing"), "{problem}");
    drop(host.stop().await);
}
