//! `warden audit verify|export|show|tail|pubkey` as an operator or auditor runs them: the real binary,
//! its output and its exit codes.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use warden::audit::{Audit, AuditOptions, Record};

struct Host {
    root: tempfile::TempDir,
    config: PathBuf,
    dir: PathBuf,
}

async fn host_with_a_session() -> Host {
    let root = tempfile::tempdir().unwrap();
    let mut opts = AuditOptions::in_dir(root.path());
    opts.config.checkpoint_records = 4;
    let shutdown = CancellationToken::new();
    let (audit, writer) = Audit::start_with(&opts, shutdown.clone()).unwrap();
    let identity = json!({"sub": "0oa1abcd", "client_id": "0oa1abcd", "groups": ["agents-research"]});
    let common = |event: &str| {
        Record::new(event)
            .field("session", "sess-42")
            .field("pid", 4242)
            .field("uid", 1000)
            .field("cgroup", "/sys/fs/cgroup/agents/research-bot")
            .field("target", "orders-db")
            .field("dst", "10.0.0.5:5432")
    };
    audit
        .append_durable(
            common("session.start")
                .field("identity", &identity)
                .field("decision", "allow")
                .field("reason", "rule r1"),
        )
        .await
        .unwrap();
    audit.append_durable(Record::new("session.start").field("session", "other")).await.unwrap();
    audit
        .append_durable(common("pg.query").field("text", "select * from orders").field("rows", 3))
        .await
        .unwrap();
    audit.append_durable(common("ssh.exec").field("command", "uptime")).await.unwrap();
    audit
        .append_durable(
            common("session.end")
                .field("reason", "client closed")
                .field("bytes_up", 120)
                .field("bytes_down", 900),
        )
        .await
        .unwrap();
    shutdown.cancel();
    writer.await.unwrap();
    let config = root.path().join("warden.toml");
    std::fs::write(
        &config,
        format!(
            "[agent]\nstate_dir = {:?}\n\n[audit]\ndir = {:?}\n",
            root.path().display().to_string(),
            opts.config.dir.display().to_string()
        ),
    )
    .unwrap();
    Host { dir: opts.config.dir, root, config }
}

fn warden(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_warden")).args(args).env_remove("WARDEN_CONFIG").output().unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn jsonl_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
        .collect();
    files.sort();
    files
}

#[tokio::test]
async fn verify_reports_intact_then_names_the_first_tampered_record() {
    let h = host_with_a_session().await;
    let out = warden(&["audit", "verify", "--config", p(&h.config)]);
    assert_eq!(out.status.code(), Some(0), "{}{}", stdout(&out), String::from_utf8_lossy(&out.stderr));
    let text = stdout(&out);
    println!("{text}");
    assert!(text.contains("intact: "), "{text}");
    assert!(text.contains("checkpoints verified"), "{text}");
    assert!(text.contains("records after the last checkpoint are intact but not yet signed"), "{text}");

    // An auditor elsewhere: the directory and the public key `warden audit pubkey` printed.
    let key = warden(&["audit", "pubkey", "--config", p(&h.config)]);
    assert_eq!(key.status.code(), Some(0));
    let key_text = stdout(&key);
    assert_eq!(key_text.trim().len(), 64, "{key_text}");
    let key_file = h.root.path().join("host.pub");
    std::fs::write(&key_file, &key_text).unwrap();
    let no_config = h.root.path().join("absent.toml");
    let out =
        warden(&["audit", "verify", "--dir", p(&h.dir), "--pubkey", p(&key_file), "--config", p(&no_config)]);
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));

    // Without any key, the hashes are still checked but the output says signatures were not.
    let out = warden(&["audit", "verify", "--dir", p(&h.dir), "--config", p(&no_config)]);
    assert_eq!(out.status.code(), Some(0));
    assert!(stdout(&out).contains("signatures NOT checked"), "{}", stdout(&out));

    let file = &jsonl_files(&h.dir)[0];
    let text = std::fs::read_to_string(file).unwrap().replace("select * from orders", "select 1");
    std::fs::write(file, text).unwrap();
    let out = warden(&["audit", "verify", "--config", p(&h.config)]);
    assert_eq!(out.status.code(), Some(1));
    let text = stdout(&out);
    println!("{text}");
    assert!(text.contains(&format!("TAMPERED: {}:4 (seq 3): hash mismatch", file.display())), "{text}");
}

#[tokio::test]
async fn export_streams_the_exact_lines_in_range_and_can_mark_them() {
    let h = host_with_a_session().await;
    let all: String = jsonl_files(&h.dir).iter().map(|f| std::fs::read_to_string(f).unwrap()).collect();
    let out = warden(&["audit", "export", "--config", p(&h.config)]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(stdout(&out), all);

    let out = warden(&["audit", "export", "--since", "2", "--until", "4", "--config", p(&h.config)]);
    let seqs: Vec<u64> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, [2, 3, 4]);

    let out = warden(&["audit", "export", "--since", "2000-01-01T00:00:00Z", "--config", p(&h.config)]);
    assert_eq!(stdout(&out), all);
    let out = warden(&["audit", "export", "--since", "2999-01-01T00:00:00Z", "--config", p(&h.config)]);
    assert_eq!(stdout(&out), "");

    let out = warden(&["audit", "export", "--since", "yesterday", "--config", p(&h.config)]);
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("neither a sequence number nor an RFC 3339 time"));

    assert_eq!(warden::audit::read_exported(&h.dir).unwrap(), None);
    let out = warden(&["audit", "export", "--mark", "--config", p(&h.config)]);
    assert_eq!(out.status.code(), Some(0));
    let last = all.lines().count() as u64 - 1;
    assert_eq!(warden::audit::read_exported(&h.dir).unwrap(), Some(last));
}

#[tokio::test]
async fn show_tells_the_story_of_one_session() {
    let h = host_with_a_session().await;
    let out = warden(&["audit", "show", "sess-42", "--config", p(&h.config)]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let text = stdout(&out);
    println!("{text}");
    for expect in [
        "session sess-42 on test-host",
        "who:     0oa1abcd (client_id 0oa1abcd, groups [\"agents-research\"])",
        "process: pid 4242, uid 1000, cgroup /sys/fs/cgroup/agents/research-bot",
        "target:  orders-db (10.0.0.5:5432)",
        "decision: allow: rule r1",
        "query: select * from orders",
        "rows=3",
        "exec: uptime",
        "ended:",
        "reason=client closed",
    ] {
        assert!(text.contains(expect), "missing {expect:?} in\n{text}");
    }
    assert!(!text.contains("other"), "only this session's records:\n{text}");

    let out = warden(&["audit", "show", "sess-42", "--json", "--config", p(&h.config)]);
    let events: Vec<String> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["event"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(events, ["session.start", "pg.query", "ssh.exec", "session.end"]);

    let out = warden(&["audit", "show", "nope", "--config", p(&h.config)]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no records for session \"nope\""));
}

#[tokio::test]
async fn tail_prints_the_last_records() {
    let h = host_with_a_session().await;
    let out = warden(&["audit", "tail", "-n", "2", "--config", p(&h.config)]);
    assert_eq!(out.status.code(), Some(0));
    let events: Vec<String> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["event"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(events, ["audit.stopped", "checkpoint"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_follow_prints_new_records_across_rotations() {
    use std::io::BufRead;
    let root = tempfile::tempdir().unwrap();
    let mut opts = AuditOptions::in_dir(root.path());
    opts.config.max_file_bytes = 2048;
    let shutdown = CancellationToken::new();
    let (audit, writer) = Audit::start_with(&opts, shutdown.clone()).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_warden"))
        .args(["audit", "tail", "-f", "-n", "1", "--dir", p(&opts.config.dir)])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in lines {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // The first line printed is the last existing record (`audit.started`, seq 0).
    let first = rx.recv_timeout(std::time::Duration::from_secs(20)).unwrap();
    assert_eq!(serde_json::from_str::<Value>(&first).unwrap()["seq"], 0);
    let mut last = 0;
    for i in 0..60 {
        last = audit
            .append_durable(Record::new("session.start").field("session", format!("t-{i}")))
            .await
            .unwrap();
    }
    assert!(jsonl_files(&opts.config.dir).len() > 3, "the test needs rotations");
    let mut seen = vec![0];
    while *seen.last().unwrap() < last {
        let line =
            rx.recv_timeout(std::time::Duration::from_secs(20)).expect("tail -f printed the next record");
        seen.push(serde_json::from_str::<Value>(&line).unwrap()["seq"].as_u64().unwrap());
    }
    assert_eq!(seen, (0..=last).collect::<Vec<_>>(), "every record once, in order");
    child.kill().unwrap();
    let _ = child.wait();
    shutdown.cancel();
    writer.await.unwrap();
}
