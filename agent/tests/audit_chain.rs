//! The audit writer and `verify`, in process: chaining, durability acks, checkpoints, rotation, retention,
//! recovery, and every kind of tampering the issue names.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use serde_json::{Map, Value, json};
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;
use warden::audit::format::{self, GENESIS_PREV};
use warden::audit::verify::{Report, verify_dir};
use warden::audit::{Audit, AuditError, AuditOptions, Record, sign};

fn pubkey(root: &Path) -> ed25519_dalek::VerifyingKey {
    sign::load(root).unwrap().verifying_key()
}

fn lines(dir: &Path) -> Vec<(PathBuf, Vec<String>)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| (p.clone(), std::fs::read_to_string(&p).unwrap().lines().map(str::to_owned).collect()))
        .collect()
}

fn all_records(dir: &Path) -> Vec<Map<String, Value>> {
    warden_test_support::audit_records(dir)
        .into_iter()
        .map(|r| if let Value::Object(m) = r { m } else { panic!("a record that is not an object: {r}") })
        .collect()
}

async fn run_writer(opts: AuditOptions, n: u64) -> Vec<u64> {
    let shutdown = CancellationToken::new();
    let (audit, handle) = Audit::start_with(&opts, shutdown.clone()).unwrap();
    let mut tasks = Vec::new();
    for i in 0..n {
        let audit = audit.clone();
        tasks.push(tokio::spawn(async move {
            audit
                .append_durable(
                    Record::new("session.start")
                        .field("session", format!("s-{i}"))
                        .field("n", i)
                        .field("pid", 4000 + i),
                )
                .await
                .unwrap()
        }));
    }
    let mut seqs = Vec::new();
    for t in tasks {
        seqs.push(t.await.unwrap());
    }
    shutdown.cancel();
    handle.await.unwrap();
    seqs
}

#[tokio::test]
async fn acknowledged_records_are_chained_checkpointed_and_verify() {
    let root = tempfile::tempdir().unwrap();
    let mut opts = AuditOptions::in_dir(root.path());
    opts.config.checkpoint_records = 25;
    let seqs = run_writer(opts.clone(), 100).await;

    let records = all_records(&opts.config.dir);
    // Every acknowledged seq is on disk with the record that was acknowledged.
    for (i, seq) in seqs.iter().enumerate() {
        let r = &records[usize::try_from(*seq).unwrap()];
        assert_eq!(r["session"], json!(format!("s-{i}")));
    }
    for (i, r) in records.iter().enumerate() {
        assert_eq!(r["seq"], json!(i));
        assert_eq!(r["host"], json!("test-host"));
    }
    assert_eq!(records[0]["event"], "audit.started");
    assert_eq!(records[0]["prev"], GENESIS_PREV);
    let n = records.len();
    assert_eq!(records[n - 2]["event"], "audit.stopped");
    assert_eq!(records[n - 1]["event"], "checkpoint");
    assert!(records.iter().filter(|r| r["event"] == "checkpoint").count() >= 4);
    let keys: Vec<&String> = records[5].keys().collect();
    assert_eq!(keys[..4], ["seq", "ts", "host", "event"]);
    assert_eq!(keys[keys.len() - 2..], ["prev", "hash"]);
    let ts = records[5]["ts"].as_str().unwrap();
    assert_eq!(ts.len(), "2026-11-23T08:58:37.123456789Z".len(), "{ts}");

    let report = verify_dir(&opts.config.dir, Some(&pubkey(root.path()))).unwrap();
    assert!(report.intact(), "{:?}", report.problem);
    assert_eq!(report.records, n as u64);
    assert_eq!(report.unsigned_tail, 0);
    assert_eq!(report.signed_through, Some(n as u64 - 2));

    // Files are private to root.
    let mode = std::fs::metadata(&lines(&opts.config.dir)[0].0).unwrap();
    assert_eq!(std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777, 0o600);
}

#[tokio::test]
async fn the_chain_continues_across_restarts() {
    let root = tempfile::tempdir().unwrap();
    let opts = AuditOptions::in_dir(root.path());
    run_writer(opts.clone(), 5).await;
    let before = all_records(&opts.config.dir).len();
    let seqs = run_writer(opts.clone(), 5).await;
    assert!(seqs.iter().all(|s| usize::try_from(*s).unwrap() > before));
    let records = all_records(&opts.config.dir);
    assert_eq!(records[before]["event"], "audit.started");
    assert!(records.iter().all(|r| r["event"] != "recovered"), "a clean stop is not a recovery");
    let report = verify_dir(&opts.config.dir, Some(&pubkey(root.path()))).unwrap();
    assert!(report.intact(), "{:?}", report.problem);
}

#[tokio::test]
async fn a_full_queue_refuses_at_once_and_bad_records_do_not_stop_the_writer() {
    let root = tempfile::tempdir().unwrap();
    let mut opts = AuditOptions::in_dir(root.path());
    opts.config.queue = 2;
    let shutdown = CancellationToken::new();
    let (audit, handle) = Audit::start_with(&opts, shutdown.clone()).unwrap();
    // The writer cannot run until this task yields (current-thread runtime), so the queue fills.
    audit.append(Record::new("a")).unwrap();
    audit.append(Record::new("b")).unwrap();
    assert!(matches!(audit.append(Record::new("c")), Err(AuditError::QueueFull)));
    let err = audit.append_durable(Record::new("d")).await.unwrap_err();
    assert_eq!(err.to_string(), "audit queue is full; refusing new work until the writer catches up");

    // Once the writer has drained the queue, work is accepted again.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let err = loop {
        match audit.append_durable(Record::new("x").field("hash", "forged")).await {
            Err(AuditError::QueueFull) if std::time::Instant::now() < deadline => {
                tokio::task::yield_now().await;
            }
            other => break other.unwrap_err(),
        }
    };
    assert!(matches!(err, AuditError::ReservedField { .. }), "{err}");
    let seq = audit.append_durable(Record::new("after").field("f", f64::NAN).field("g", 0.1)).await.unwrap();
    assert!(seq > 0);
    shutdown.cancel();
    handle.await.unwrap();
    assert!(matches!(audit.append(Record::new("late")), Err(AuditError::Stopped { .. })));
    let report = verify_dir(&opts.config.dir, None).unwrap();
    assert!(report.intact(), "{:?}", report.problem);
}

#[tokio::test(start_paused = true)]
async fn a_checkpoint_is_written_every_checkpoint_seconds() {
    let root = tempfile::tempdir().unwrap();
    let mut opts = AuditOptions::in_dir(root.path());
    opts.config.checkpoint_records = 0;
    opts.config.checkpoint_seconds = 30;
    let shutdown = CancellationToken::new();
    let (audit, handle) = Audit::start_with(&opts, shutdown.clone()).unwrap();
    audit.append_durable(Record::new("one")).await.unwrap();
    tokio::time::advance(Duration::from_secs(20)).await;
    audit.append_durable(Record::new("two")).await.unwrap();
    let checkpoints = |dir: &Path| all_records(dir).iter().filter(|r| r["event"] == "checkpoint").count();
    let before = checkpoints(&opts.config.dir);
    tokio::time::advance(Duration::from_secs(11)).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while checkpoints(&opts.config.dir) == before {
        assert!(std::time::Instant::now() < deadline, "no checkpoint after checkpoint_seconds");
        tokio::task::yield_now().await;
    }
    // The control: before checkpoint_seconds had passed since the writer started, none was due.
    assert_eq!(before, 0, "a checkpoint was written before checkpoint_seconds passed");
    shutdown.cancel();
    handle.await.unwrap();
}

/// A wall clock the test moves.
fn test_clock(start: OffsetDateTime) -> (Arc<AtomicI64>, warden::audit::Clock) {
    let secs = Arc::new(AtomicI64::new(start.unix_timestamp()));
    let s = secs.clone();
    let clock: warden::audit::Clock =
        Arc::new(move || OffsetDateTime::from_unix_timestamp(s.load(Ordering::SeqCst)).unwrap());
    (secs, clock)
}

#[tokio::test]
async fn files_rotate_by_size_and_by_day_and_the_chain_spans_them() {
    let root = tempfile::tempdir().unwrap();
    let mut opts = AuditOptions::in_dir(root.path());
    opts.config.max_file_bytes = 4096;
    let (secs, clock) = test_clock(OffsetDateTime::now_utc());
    opts.clock = clock;
    run_writer(opts.clone(), 40).await;
    let by_size = lines(&opts.config.dir).len();
    assert!(by_size >= 3, "{by_size} files");
    secs.fetch_add(86_400, Ordering::SeqCst);
    opts.config.max_file_bytes = 0;
    run_writer(opts.clone(), 2).await;
    let files = lines(&opts.config.dir);
    assert_eq!(files.len(), by_size + 1, "a new day starts a new file");
    // Each file's first record links to the last record of the file before.
    for pair in files.windows(2) {
        let last: Map<String, Value> = serde_json::from_str(pair[0].1.last().unwrap()).unwrap();
        let first: Map<String, Value> = serde_json::from_str(&pair[1].1[0]).unwrap();
        assert_eq!(first["prev"], last["hash"]);
        let name = pair[1].0.file_name().unwrap().to_string_lossy().into_owned();
        assert_eq!(name, format!("audit-{:020}.jsonl", first["seq"].as_u64().unwrap()));
    }
    let report = verify_dir(&opts.config.dir, Some(&pubkey(root.path()))).unwrap();
    assert!(report.intact(), "{:?}", report.problem);
}

#[tokio::test]
async fn retention_deletes_only_what_was_exported_and_says_so() {
    let root = tempfile::tempdir().unwrap();
    let mut opts = AuditOptions::in_dir(root.path());
    opts.config.max_file_bytes = 4096;
    opts.config.retain_days = 1;
    opts.config.retain_until_exported = true;
    let (secs, clock) = test_clock(OffsetDateTime::now_utc());
    opts.clock = clock;
    run_writer(opts.clone(), 40).await;
    let files = lines(&opts.config.dir);
    assert!(files.len() >= 3);
    secs.fetch_add(3 * 86_400, Ordering::SeqCst);
    run_writer(opts.clone(), 1).await;
    assert_eq!(lines(&opts.config.dir)[0].0, files[0].0, "nothing exported: nothing deleted");

    // Export the first two files, then restart: exactly those go.
    let second_last: Map<String, Value> = serde_json::from_str(files[1].1.last().unwrap()).unwrap();
    warden::audit::mark_exported(&opts.config.dir, second_last["seq"].as_u64().unwrap()).unwrap();
    run_writer(opts.clone(), 1).await;
    let after = lines(&opts.config.dir);
    assert_eq!(after[0].0, files[2].0);
    let records = all_records(&opts.config.dir);
    let ret = records.iter().find(|r| r["event"] == "retention.deleted").expect("a retention record");
    assert_eq!(ret["through_seq"], second_last["seq"]);
    assert_eq!(ret["through_hash"], second_last["hash"]);
    let report = verify_dir(&opts.config.dir, Some(&pubkey(root.path()))).unwrap();
    assert!(report.intact(), "{:?}", report.problem);
    assert!(report.notes.iter().any(|n| n.contains("deleted by retention")), "{:?}", report.notes);
}

#[tokio::test]
async fn a_torn_last_line_is_cut_saved_and_recorded() {
    let root = tempfile::tempdir().unwrap();
    let opts = AuditOptions::in_dir(root.path());
    run_writer(opts.clone(), 3).await;
    let (path, before) = lines(&opts.config.dir).pop().unwrap();
    let torn = r#"{"seq":99,"ts":"2026-11-23T0"#;
    std::fs::write(&path, format!("{}\n{torn}", before.join("\n"))).unwrap();
    run_writer(opts.clone(), 1).await;
    let records = all_records(&opts.config.dir);
    let rec = records.iter().find(|r| r["event"] == "recovered").expect("a recovered record");
    assert_eq!(rec["cut_bytes"], json!(torn.len()));
    assert_eq!(rec["unclean"], json!(false));
    let saved = PathBuf::from(rec["saved_to"].as_str().unwrap());
    assert_eq!(std::fs::read_to_string(saved).unwrap(), torn);
    let report = verify_dir(&opts.config.dir, Some(&pubkey(root.path()))).unwrap();
    assert!(report.intact(), "{:?}", report.problem);
}

#[tokio::test]
async fn a_stop_without_shutdown_is_recorded_as_unclean() {
    let root = tempfile::tempdir().unwrap();
    let opts = AuditOptions::in_dir(root.path());
    let (audit, handle) = Audit::start_with(&opts, CancellationToken::new()).unwrap();
    audit.append_durable(Record::new("session.start").field("session", "s")).await.unwrap();
    handle.abort();
    let _ = handle.await;
    drop(audit);
    run_writer(opts.clone(), 1).await;
    let records = all_records(&opts.config.dir);
    let rec = records.iter().find(|r| r["event"] == "recovered").expect("a recovered record");
    assert_eq!(rec["unclean"], json!(true));
    assert!(verify_dir(&opts.config.dir, None).unwrap().intact());
}

// ---- tampering ----

/// A log of several files with checkpoints, and the pubkey that signed it.
async fn sample_log() -> (tempfile::TempDir, PathBuf, ed25519_dalek::VerifyingKey) {
    let root = tempfile::tempdir().unwrap();
    let mut opts = AuditOptions::in_dir(root.path());
    opts.config.max_file_bytes = 6000;
    opts.config.checkpoint_records = 10;
    run_writer(opts.clone(), 60).await;
    let key = pubkey(root.path());
    (root, opts.config.dir, key)
}

fn problem(report: &Report) -> String {
    report.problem.as_ref().map(ToString::to_string).unwrap_or_default()
}

fn rewrite(path: &Path, f: impl FnOnce(&mut Vec<String>)) {
    let mut l: Vec<String> = std::fs::read_to_string(path).unwrap().lines().map(str::to_owned).collect();
    f(&mut l);
    std::fs::write(path, l.iter().map(|x| x.clone() + "\n").collect::<String>()).unwrap();
}

/// Re-encodes lines from `from` on with fresh seq/prev/hash, as a forger without the key would.
fn rechain(all: &mut [String], from: usize) {
    let mut prev: String = if from == 0 {
        GENESIS_PREV.into()
    } else {
        serde_json::from_str::<Map<String, Value>>(&all[from - 1]).unwrap()["hash"].as_str().unwrap().into()
    };
    for line in &mut all[from..] {
        let obj: Map<String, Value> = serde_json::from_str(line).unwrap();
        let fields: Map<String, Value> = obj
            .iter()
            .filter(|(k, _)| !format::RESERVED.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let (bytes, hash) = format::encode(
            obj["seq"].as_u64().unwrap(),
            obj["ts"].as_str().unwrap(),
            obj["host"].as_str().unwrap(),
            obj["event"].as_str().unwrap(),
            &fields,
            &prev,
        )
        .unwrap();
        *line = String::from_utf8(bytes).unwrap();
        prev = hash;
    }
}

/// Edits a record in the middle file and recomputes every hash after it, across files: all a forger
/// without the signing key can do. Only the checkpoints can catch it.
fn edit_and_rechain_everything(dir: &Path) {
    let files = lines(dir);
    let mut all: Vec<String> = files.iter().flat_map(|(_, l)| l.clone()).collect();
    let k = files[0].1.len() + 3;
    all[k] = all[k].replacen("\"pid\":", "\"pid\":1", 1);
    rechain(&mut all, k);
    let mut rest = all.as_slice();
    for (path, l) in &files {
        let (mine, tail) = rest.split_at(l.len());
        std::fs::write(path, mine.iter().map(|x| x.clone() + "\n").collect::<String>()).unwrap();
        rest = tail;
    }
}

fn middle_file(dir: &Path) -> PathBuf {
    let files = lines(dir);
    assert!(files.len() >= 3, "the sample needs at least three files");
    files[1].0.clone()
}

#[tokio::test]
async fn tampering_is_detected_and_named() {
    type Tamper = fn(&Path);
    let cases: Vec<(&str, Tamper, &str)> = vec![
        (
            "edited field",
            |d| rewrite(&middle_file(d), |l| l[3] = l[3].replacen("\"pid\":", "\"pid\":1", 1)),
            "hash mismatch",
        ),
        (
            "deleted record",
            |d| {
                rewrite(&middle_file(d), |l| {
                    l.remove(3);
                });
            },
            "are missing",
        ),
        (
            "duplicated record",
            |d| {
                rewrite(&middle_file(d), |l| {
                    let x = l[3].clone();
                    l.insert(3, x);
                });
            },
            "duplicated or reordered",
        ),
        ("reordered records", |d| rewrite(&middle_file(d), |l| l.swap(3, 4)), "was expected"),
        (
            "inserted record",
            |d| {
                rewrite(&middle_file(d), |l| {
                    // A well-formed record with the next seq and a correct hash, linked to the one before.
                    let mut x: Map<String, Value> = serde_json::from_str(&l[3]).unwrap();
                    x.insert("seq".into(), json!(x["seq"].as_u64().unwrap() + 1));
                    l.insert(4, serde_json::to_string(&x).unwrap());
                    rechain(&mut l[..5], 4);
                });
            },
            "was expected: a duplicated or reordered record",
        ),
        ("removed middle file", |d| std::fs::remove_file(middle_file(d)).unwrap(), "are missing"),
        ("edited and rechained (no key)", edit_and_rechain_everything, "checkpoint"),
        (
            "forged checkpoint",
            |d| {
                let path = middle_file(d);
                rewrite(&path, |l| {
                    let i = l
                        .iter()
                        .position(|x| x.contains("\"event\":\"checkpoint\""))
                        .expect("a checkpoint in the middle file");
                    let mut obj: Map<String, Value> = serde_json::from_str(&l[i]).unwrap();
                    obj.insert("sig".into(), json!("00".repeat(64)));
                    l[i] = serde_json::to_string(&obj).unwrap();
                    rechain(&mut l[..=i], i);
                });
            },
            "signature does not verify",
        ),
        (
            "first file removed without a retention record",
            |d| std::fs::remove_file(&lines(d)[0].0).unwrap(),
            "no retention.deleted record",
        ),
    ];
    for (name, tamper, expect) in cases {
        let (_root, dir, key) = sample_log().await;
        assert!(verify_dir(&dir, Some(&key)).unwrap().intact());
        tamper(&dir);
        let report = verify_dir(&dir, Some(&key)).unwrap();
        let p = problem(&report);
        assert!(!report.intact(), "{name}: not detected");
        assert!(p.contains(expect), "{name}: {p}");
        assert!(p.contains(".jsonl:"), "{name}: names the file and line: {p}");
    }
}

#[tokio::test]
async fn checkpoints_signed_by_another_key_are_refused() {
    let (_root, dir, _) = sample_log().await;
    let other = tempfile::tempdir().unwrap();
    let other_key = sign::load_or_create(other.path()).unwrap().verifying_key();
    let report = verify_dir(&dir, Some(&other_key)).unwrap();
    assert!(problem(&report).contains("signed by key"), "{}", problem(&report));
}

#[tokio::test]
async fn a_second_writer_on_the_same_directory_is_refused() {
    let root = tempfile::tempdir().unwrap();
    let opts = AuditOptions::in_dir(root.path());
    let shutdown = CancellationToken::new();
    let (_audit, writer) = Audit::start_with(&opts, shutdown.clone()).unwrap();
    let err = Audit::start_with(&opts, CancellationToken::new()).unwrap_err();
    assert!(err.to_string().contains("another warden daemon is writing this audit directory"), "{err}");
    shutdown.cancel();
    writer.await.unwrap();
    let (_again, writer) = Audit::start_with(&opts, shutdown.clone()).unwrap();
    writer.await.unwrap();
}

#[tokio::test]
async fn a_newest_file_with_nothing_valid_is_removed_and_the_chain_resumes_before_it() {
    let root = tempfile::tempdir().unwrap();
    let opts = AuditOptions::in_dir(root.path());
    run_writer(opts.clone(), 3).await;
    let next = all_records(&opts.config.dir).len();
    // A crash right after rotation: the new file holds only half a line.
    let torn = opts.config.dir.join(format!("audit-{next:020}.jsonl"));
    std::fs::write(&torn, r#"{"seq":"#).unwrap();
    run_writer(opts.clone(), 1).await;
    assert!(!torn.exists() || all_records(&opts.config.dir)[next]["event"] == "audit.started");
    let records = all_records(&opts.config.dir);
    let rec = records.iter().find(|r| r["event"] == "recovered").expect("a recovered record");
    assert_eq!(rec["cut_bytes"], json!(7));
    let report = verify_dir(&opts.config.dir, Some(&pubkey(root.path()))).unwrap();
    assert!(report.intact(), "{:?}", report.problem);
}

/// Terminal recordings follow the trail: one is deleted only with the file whose `ssh.recording` record
/// holds its hash, and `retention.deleted` names it; the recordings of kept files stay and still verify.
#[tokio::test]
async fn retention_deletes_recordings_with_the_file_that_holds_their_hash() {
    let root = tempfile::tempdir().unwrap();
    let mut opts = AuditOptions::in_dir(root.path());
    opts.config.max_file_bytes = 2048;
    opts.config.retain_days = 1;
    opts.config.retain_until_exported = true;
    let (secs, clock) = test_clock(OffsetDateTime::now_utc());
    opts.clock = clock;
    let dir = opts.config.dir.clone();
    std::fs::create_dir_all(dir.join("recordings")).unwrap();
    // Six recordings, one record each, with filler so they spread over several files.
    let shutdown = CancellationToken::new();
    let (audit, handle) = Audit::start_with(&opts, shutdown.clone()).unwrap();
    for i in 0..6 {
        let name = format!("recordings/s-{i}-0.cast");
        std::fs::write(dir.join(&name), format!("cast {i}\n")).unwrap();
        let (sha256, bytes) = warden::audit::files::hash_file(&dir.join(&name)).unwrap();
        audit
            .append_durable(
                Record::new("ssh.recording")
                    .field("file", &name)
                    .field("sha256", sha256)
                    .field("bytes", bytes),
            )
            .await
            .unwrap();
        for n in 0..8 {
            audit
                .append_durable(Record::new("session.start").field("n", n).field("pad", "x".repeat(40)))
                .await
                .unwrap();
        }
    }
    // A name outside recordings/ is never deleted.
    std::fs::write(dir.join("keep.txt"), "x").unwrap();
    audit
        .append_durable(Record::new("ssh.recording").field("file", "keep.txt").field("sha256", "0"))
        .await
        .unwrap();
    shutdown.cancel();
    handle.await.unwrap();
    let files = lines(&dir);
    assert!(files.len() >= 4, "{}", files.len());
    let holder = |name: &str| files.iter().position(|(_, l)| l.iter().any(|l| l.contains(name))).unwrap();
    secs.fetch_add(3 * 86_400, Ordering::SeqCst);

    // Not exported: nothing goes, recordings included.
    run_writer(opts.clone(), 1).await;
    assert!((0..6).all(|i| dir.join(format!("recordings/s-{i}-0.cast")).exists()));

    // Export the first two files: their recordings go, the others stay.
    let second_last: Map<String, Value> = serde_json::from_str(files[1].1.last().unwrap()).unwrap();
    warden::audit::mark_exported(&dir, second_last["seq"].as_u64().unwrap()).unwrap();
    run_writer(opts.clone(), 1).await;
    let mut gone = Vec::new();
    for i in 0..6 {
        let name = format!("recordings/s-{i}-0.cast");
        let deleted = holder(&name) < 2;
        assert_eq!(!dir.join(&name).exists(), deleted, "{name} held by file {}", holder(&name));
        if deleted {
            gone.push(name);
        }
    }
    assert!(!gone.is_empty() && gone.len() < 6, "{gone:?}");
    assert!(dir.join("keep.txt").exists());
    let records = all_records(&dir);
    let ret = records.iter().find(|r| r["event"] == "retention.deleted").expect("a retention record");
    assert_eq!(ret["recordings"], json!(gone));
    let report = verify_dir(&dir, Some(&pubkey(root.path()))).unwrap();
    // Only the planted `keep.txt` record fails (its hash is made up); every kept recording checks.
    assert!(
        report.problem.as_ref().is_some_and(|p| p.to_string().contains("keep.txt")),
        "{:?}",
        report.problem
    );
}
