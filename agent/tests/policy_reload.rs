//! Policy reloads as an operator lives them: a typo is rejected whole and the old policy keeps working;
//! a valid edit replaces it atomically and subscribers see it; the file watcher notices edits by itself.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio_util::sync::CancellationToken;
use warden::audit::{Audit, AuditOptions, Record};
use warden::config::Config;
use warden::policy::{Decision, Store, Subject};

const DEADLINE: Duration = Duration::from_secs(20);

/// The one place these tests build an audit handle: a real writer under `root/audit`.
fn audit(root: &Path) -> Audit {
    Audit::start_with(&AuditOptions::in_dir(root), CancellationToken::new()).unwrap().0
}

async fn records(audit: &Audit, event: &str) -> Vec<Value> {
    audit.append_durable(Record::new("test.flush")).await.unwrap();
    warden_test_support::audit_records(audit.dir()).into_iter().filter(|r| r["event"] == event).collect()
}

const VALID: &str = "\
targets:
  orders-db:
    protocol: tcp
    address: 127.0.0.1:5432
rules:
  - name: research reads orders
    match: { groups: [research] }
    grant:
      - { target: orders-db, access: connect, ttl: 15m }
";

const TYPO: &str = "\
targets:
  orders-db:
    protocol: tcp
    adress: 127.0.0.1:5432
rules:
  - name: research reads orders
    match: { groups: [research] }
    grant:
      - { target: orders-db, access: connect, ttl: 15 }
";

const ADDED: &str = "\
targets:
  orders-db:
    protocol: tcp
    address: 127.0.0.1:5432
  metrics:
    protocol: tcp
    address: 127.0.0.1:9000
rules:
  - name: research reads orders
    match: { groups: [research] }
    grant:
      - { target: orders-db, access: connect, ttl: 15m }
      - { target: metrics, access: connect, ttl: 5m }
";

struct Setup {
    _dir: tempfile::TempDir,
    file: PathBuf,
    audit: Audit,
    store: Arc<Store>,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let policies = dir.path().join("policies");
    std::fs::create_dir(&policies).unwrap();
    let file = policies.join("orders.yaml");
    std::fs::write(&file, VALID).unwrap();
    let config_path = dir.path().join("warden.toml");
    let config =
        Config::parse(&config_path, &format!("[agent]\npolicies = \"{}\"\n", policies.display())).unwrap();
    let audit = audit(dir.path());
    let store = Arc::new(Store::open(&config, audit.clone()).unwrap());
    Setup { _dir: dir, file, audit, store }
}

fn research() -> Subject {
    Subject { client_id: "0oa1".into(), sub: "0oa1".into(), groups: vec!["research".into()], scopes: vec![] }
}

#[tokio::test]
async fn a_typo_is_rejected_and_the_old_policy_keeps_working() {
    let s = setup();
    let mut rx = s.store.subscribe();
    std::fs::write(&s.file, TYPO).unwrap();
    let diags = s.store.reload().unwrap_err();
    let shown: Vec<String> = diags.iter().map(ToString::to_string).collect();
    let file = s.file.display().to_string();
    assert_eq!(
        shown,
        [
            format!("{file}:2:3: target `orders-db` needs `address`"),
            format!("{file}:4:5: unknown key `adress` in target `orders-db`; did you mean `address`?"),
            format!(
                "{file}:9:52: ttl: `15` is not a duration; write a number and a unit: s, m or h (e.g. 90s, 15m, 2h)"
            ),
        ],
    );
    // The old policy stays in force and nobody was told of a change.
    assert!(matches!(s.store.current().decide(&research(), "orders-db", None), Decision::Allow(_)));
    assert!(!rx.has_changed().unwrap());
    let rec = &records(&s.audit, "policy.reloaded").await[0];
    assert_eq!(rec["outcome"], "rejected");
    assert_eq!(rec["errors"].as_array().unwrap().len(), 3);
    assert!(rec["errors"][1].as_str().unwrap().contains("unknown key `adress`"), "{rec}");
    assert_eq!(rec["files"][0], file.as_str());

    // Fixing the file applies it, and subscribers see the new policy.
    std::fs::write(&s.file, ADDED).unwrap();
    s.store.reload().unwrap();
    assert!(rx.has_changed().unwrap());
    let policy = rx.borrow_and_update().clone();
    assert_eq!(policy.targets().map(|t| t.name.as_str()).collect::<Vec<_>>(), ["metrics", "orders-db"]);
    let recs = records(&s.audit, "policy.reloaded").await;
    let applied = &recs[1];
    assert_eq!(applied["outcome"], "applied");
    assert_eq!(applied["targets_added"], serde_json::json!(["metrics"]));
    assert_eq!(applied["targets_removed"], serde_json::json!([]));

    // A reload that changes nothing tells no subscriber.
    s.store.reload().unwrap();
    assert!(!rx.has_changed().unwrap());
}

#[tokio::test]
async fn the_watcher_reloads_edits_by_itself() {
    let s = setup();
    let mut rx = s.store.subscribe();
    let shutdown = CancellationToken::new();
    let watcher = tokio::spawn(s.store.clone().watch_files(shutdown.clone().cancelled_owned()));

    // The watcher looked at the files when it was made: this edit is a change.
    std::fs::write(&s.file, ADDED).unwrap();
    tokio::time::timeout(DEADLINE, rx.changed()).await.expect("the watcher applied the edit").unwrap();
    assert!(rx.borrow_and_update().target("metrics").is_some());

    // A typo saved later is rejected by the watcher too, and the policy stays.
    std::fs::write(&s.file, TYPO).unwrap();
    let start = std::time::Instant::now();
    loop {
        let recs = records(&s.audit, "policy.reloaded").await;
        if recs.iter().any(|r| r["outcome"] == "rejected") {
            break;
        }
        assert!(start.elapsed() < DEADLINE, "no rejected reload recorded: {recs:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(s.store.current().target("metrics").is_some());
    assert!(!rx.has_changed().unwrap());

    // Removing a target is seen as such.
    std::fs::write(&s.file, VALID).unwrap();
    tokio::time::timeout(DEADLINE, rx.changed()).await.expect("the watcher applied the edit").unwrap();
    let recs = records(&s.audit, "policy.reloaded").await;
    let last = recs.last().unwrap();
    assert_eq!(
        (last["outcome"].as_str(), &last["targets_removed"]),
        (Some("applied"), &serde_json::json!(["metrics"]))
    );

    shutdown.cancel();
    tokio::time::timeout(DEADLINE, watcher).await.expect("the watcher stops on shutdown").unwrap();
}
