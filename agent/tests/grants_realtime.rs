//! Grants with the real clock, seen from a client over loopback TCP: a small stand-in for the proxy
//! holds each connection under a lease, the way the daemon does, and tells the client why it ends.
//! (The full path through eBPF, the proxy and the `warden` CLI is covered by the daemon's tests.)

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::net::tcp::OwnedReadHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use warden::audit::{Audit, AuditOptions, Record};
use warden::grants::{GrantKey, Grants, GrantsOptions, SystemClock};
use warden::policy::{Access, Approval, Terms};

const DEADLINE: Duration = Duration::from_secs(20);

/// The one place these tests build an audit handle: a real writer under `root/audit`.
fn audit(root: &Path) -> Audit {
    Audit::start_with(&AuditOptions::in_dir(root), CancellationToken::new()).unwrap().0
}

async fn records(audit: &Audit, event: &str) -> Vec<Value> {
    audit.append_durable(Record::new("test.flush")).await.unwrap();
    let mut files: Vec<PathBuf> =
        std::fs::read_dir(audit.dir()).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    files
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .flat_map(|t| t.lines().filter_map(|l| serde_json::from_str::<Value>(l).ok()).collect::<Vec<_>>())
        .filter(|r| r["event"] == event)
        .collect()
}

fn terms(ttl: Duration, approval: Approval) -> Terms {
    Terms {
        rule: "research reads orders".into(),
        target: "orders-db".into(),
        access: Access::Read,
        ttl,
        mask: vec![],
        approval,
        commands: None,
        forward: false,
        sftp: false,
    }
}

fn key(cgroup: &str) -> GrantKey {
    GrantKey {
        identity: "research-bot".into(),
        client_id: "0oa1".into(),
        cgroup: cgroup.into(),
        target: "orders-db".into(),
        access: Access::Read,
    }
}

/// Stand-in proxy: the first line a client sends names its cgroup; the session echoes lines under a
/// lease and is cut with a message when the grant ends.
async fn serve(listener: TcpListener, grants: Grants, terms: Terms) {
    while let Ok((sock, _)) = listener.accept().await {
        let (grants, terms) = (grants.clone(), terms.clone());
        tokio::spawn(async move {
            let (r, mut w) = sock.into_split();
            let mut lines = BufReader::new(r).lines();
            let Ok(Some(cgroup)) = lines.next_line().await else { return };
            let mut lease = match grants.acquire(key(&cgroup), &terms).await {
                Ok(lease) => lease,
                Err(refusal) => {
                    let _ = w.write_all(format!("refused: {refusal}\n").as_bytes()).await;
                    return;
                }
            };
            let _ = w.write_all(format!("ok {}\n", lease.grant_id).as_bytes()).await;
            loop {
                tokio::select! {
                    end = lease.ended() => {
                        let _ = w.write_all(format!("closed: {end}\n").as_bytes()).await;
                        return;
                    }
                    line = lines.next_line() => match line {
                        Ok(Some(l)) => { let _ = w.write_all(format!("{l}\n").as_bytes()).await; }
                        _ => return,
                    },
                }
            }
        });
    }
}

struct Harness {
    _dir: tempfile::TempDir,
    audit: Audit,
    grants: Grants,
    addr: std::net::SocketAddr,
}

async fn harness(terms: Terms, options: GrantsOptions) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let audit = audit(dir.path());
    let grants = Grants::open_with(dir.path(), audit.clone(), Arc::new(SystemClock), options).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(serve(listener, grants.clone(), terms));
    Harness { _dir: dir, audit, grants, addr }
}

struct Client {
    lines: Lines<BufReader<OwnedReadHalf>>,
    w: tokio::net::tcp::OwnedWriteHalf,
}

impl Client {
    async fn connect(addr: std::net::SocketAddr, cgroup: &str) -> Self {
        let (r, mut w) = TcpStream::connect(addr).await.unwrap().into_split();
        w.write_all(format!("{cgroup}\n").as_bytes()).await.unwrap();
        Self { lines: BufReader::new(r).lines(), w }
    }

    /// The next line, or `None` at end of stream; panics after the deadline.
    async fn line(&mut self) -> Option<String> {
        tokio::time::timeout(DEADLINE, self.lines.next_line())
            .await
            .expect("the server answered in time")
            .unwrap()
    }

    async fn send(&mut self, s: &str) {
        self.w.write_all(format!("{s}\n").as_bytes()).await.unwrap();
    }
}

#[tokio::test]
async fn a_three_second_grant_keeps_its_session_three_seconds_then_cuts_it_and_refuses_reconnects() {
    let h = harness(terms(Duration::from_secs(3), Approval::None), GrantsOptions::default()).await;
    let started = Instant::now();
    let mut c = Client::connect(h.addr, "task-1").await;
    let ok = c.line().await.unwrap();
    let id = ok.strip_prefix("ok ").expect(&ok).to_owned();
    c.send("select 1").await;
    assert_eq!(c.line().await.as_deref(), Some("select 1"));

    assert_eq!(c.line().await.as_deref(), Some("closed: grant expired"));
    let held = started.elapsed();
    assert!(held >= Duration::from_millis(2900) && held < Duration::from_secs(6), "held {held:?}");
    assert_eq!(c.line().await, None, "the connection ends");

    let mut again = Client::connect(h.addr, "task-1").await;
    let refused = again.line().await.unwrap();
    assert!(refused.starts_with(&format!("refused: grant {id} for orders-db expired at ")), "{refused}");
    assert!(refused.contains("a task's grant does not renew itself"), "{refused}");
    assert!(h.grants.list().is_empty());

    let expired = records(&h.audit, "grant.expired").await;
    assert_eq!(expired.len(), 1, "{expired:?}");
    assert_eq!((expired[0]["grant"].as_str(), expired[0]["sessions"].as_u64()), (Some(id.as_str()), Some(1)));
}

#[tokio::test]
async fn approval_holds_the_connection_until_an_operator_approves() {
    let options = GrantsOptions { approval_wait: DEADLINE, ..GrantsOptions::default() };
    let h = harness(terms(Duration::from_secs(60), Approval::Required), options).await;
    let mut c = Client::connect(h.addr, "task-1").await;
    let started = Instant::now();
    let pending = loop {
        if let Some(v) = h.grants.list().pop() {
            break v;
        }
        assert!(started.elapsed() < DEADLINE, "no pending grant appeared");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(pending.status, "pending");
    h.grants.approve(&pending.id, "alice").await.unwrap();
    assert_eq!(c.line().await, Some(format!("ok {}", pending.id)));
    assert_eq!(h.grants.list()[0].sessions, 1);
}

#[tokio::test]
async fn an_unapproved_connection_is_refused_with_the_command_to_run() {
    let options = GrantsOptions { approval_wait: Duration::from_secs(1), ..GrantsOptions::default() };
    let h = harness(terms(Duration::from_secs(60), Approval::Required), options).await;
    let mut c = Client::connect(h.addr, "task-1").await;
    let refused = c.line().await.unwrap();
    let id = &h.grants.list()[0].id;
    assert_eq!(refused, format!("refused: pending approval (grant {id}); run `warden grant approve {id}`"));
}

#[tokio::test]
async fn revocation_ends_a_live_session_at_once() {
    let h = harness(terms(Duration::from_secs(600), Approval::None), GrantsOptions::default()).await;
    let mut c = Client::connect(h.addr, "task-1").await;
    let id = c.line().await.unwrap().strip_prefix("ok ").unwrap().to_owned();
    let started = Instant::now();
    h.grants.revoke(&id, "alice").await.unwrap();
    assert_eq!(c.line().await.as_deref(), Some("closed: grant revoked by alice"));
    assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
    let mut again = Client::connect(h.addr, "task-1").await;
    let refused = again.line().await.unwrap();
    assert!(refused.contains(&format!("grant {id} for orders-db was revoked by alice")), "{refused}");
    let revoked = records(&h.audit, "grant.revoked").await;
    assert_eq!(revoked[0]["by"], "alice");
}
