//! `kill -9` of a process writing the audit record under a load of many sessions, repeated: after each
//! restart the chain verifies and every record a client saw acknowledged is there.
//!
//! The writer runs in a child process: this test binary re-executed with `WARDEN_AUDIT_CRASH_CHILD` set,
//! which runs the same test function in child mode (sessions appending and printing `ACK <seq> <session>`
//! for each durable record) until the parent kills it with SIGKILL.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Map, Value};
use tokio_util::sync::CancellationToken;
use warden::audit::verify::verify_dir;
use warden::audit::{Audit, AuditOptions, Record, sign};

const CHILD_ENV: &str = "WARDEN_AUDIT_CRASH_CHILD";
const TEST_NAME: &str = "kill_9_during_load_loses_no_acknowledged_record";
const ROUNDS: usize = 5;
const SESSIONS: usize = 32;
const ACKS_BEFORE_KILL: usize = 400;

fn child(root: &Path, round: &str) -> ! {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let mut opts = AuditOptions::in_dir(root);
        opts.config.checkpoint_records = 50;
        opts.config.max_file_bytes = 64 * 1024;
        let (audit, _writer) = Audit::start_with(&opts, CancellationToken::new()).unwrap();
        for s in 0..SESSIONS {
            let audit = audit.clone();
            let round = round.to_owned();
            tokio::spawn(async move {
                for i in 0u64.. {
                    let session = format!("r{round}-s{s}-{i}");
                    let start =
                        Record::new("session.start").field("session", &session).field("pid", 1000 + s);
                    match audit.append_durable(start).await {
                        Ok(seq) => {
                            let mut out = std::io::stdout().lock();
                            let _ = writeln!(out, "ACK {seq} {session}");
                            let _ = out.flush();
                        }
                        Err(e) => panic!("append refused: {e}"),
                    }
                    let _ = audit.append(
                        Record::new("session.end").field("session", &session).field("reason", "closed"),
                    );
                }
            });
        }
        std::future::pending::<()>().await;
    });
    unreachable!("the child runs until it is killed")
}

#[test]
fn kill_9_during_load_loses_no_acknowledged_record() {
    if let Ok(dir) = std::env::var(CHILD_ENV) {
        let round = std::env::var("WARDEN_AUDIT_CRASH_ROUND").unwrap_or_default();
        child(Path::new(&dir), &round);
    }
    let root = tempfile::tempdir().unwrap();
    let mut acked: BTreeMap<u64, String> = BTreeMap::new();
    for round in 0..ROUNDS {
        let mut proc = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", TEST_NAME, "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, root.path())
            .env("WARDEN_AUDIT_CRASH_ROUND", round.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = BufReader::new(proc.stdout.take().unwrap());
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut this_round = 0;
        let mut killed = false;
        for line in stdout.lines() {
            let line = line.unwrap();
            let Some(rest) = line.strip_prefix("ACK ") else { continue };
            let (seq, session) = rest.split_once(' ').unwrap();
            let seq: u64 = seq.parse().unwrap();
            assert!(acked.insert(seq, session.to_owned()).is_none(), "seq {seq} acknowledged twice");
            this_round += 1;
            if !killed && this_round >= ACKS_BEFORE_KILL {
                proc.kill().unwrap(); // SIGKILL
                killed = true;
            }
            assert!(
                Instant::now() < deadline,
                "round {round}: the child did not reach {ACKS_BEFORE_KILL} acks in time"
            );
        }
        let status = proc.wait().unwrap();
        assert!(killed, "round {round}: the child exited by itself: {status}");
    }

    // Recover once more in process, shut down cleanly, and check everything.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let shutdown = CancellationToken::new();
        let (_audit, writer) =
            Audit::start_with(&AuditOptions::in_dir(root.path()), shutdown.clone()).unwrap();
        shutdown.cancel();
        writer.await.unwrap();
    });
    let dir = root.path().join("audit");
    let key = sign::load(root.path()).unwrap().verifying_key();
    let report = verify_dir(&dir, Some(&key)).unwrap();
    assert!(report.intact(), "{}", report.problem.unwrap());

    let mut on_disk: BTreeMap<u64, Map<String, Value>> = BTreeMap::new();
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
        .collect();
    files.sort();
    for f in files {
        for line in std::fs::read_to_string(f).unwrap().lines() {
            let obj: Map<String, Value> = serde_json::from_str(line).unwrap();
            on_disk.insert(obj["seq"].as_u64().unwrap(), obj);
        }
    }
    assert!(acked.len() >= ROUNDS * ACKS_BEFORE_KILL);
    for (seq, session) in &acked {
        let r = on_disk.get(seq).unwrap_or_else(|| panic!("acknowledged seq {seq} ({session}) is missing"));
        assert_eq!(r["event"], "session.start");
        assert_eq!(r["session"], Value::from(session.as_str()));
    }
    let recovered =
        on_disk.values().filter(|r| r["event"] == "recovered" && r["unclean"] == Value::Bool(true)).count();
    assert_eq!(recovered, ROUNDS, "each kill is reported by a recovered record on the next start");
}
