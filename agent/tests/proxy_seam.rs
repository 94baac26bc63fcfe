//! The proxy through its seams, in process and without root: a stand-in origin source and a stand-in gate,
//! the real opaque-TCP handler and audit writer, real loopback sockets. Allowed (bytes relayed, the
//! session recorded), refused (the client sees a reset, `session.refused` with the code), killed
//! mid-session (`killed_by_operator`), cut by a policy change and then killed (the first cause is recorded),
//! and a target kind without a handler (refused at the hello, code `protocol`). Floods of connections with
//! no origin, and of refused sessions from one cgroup, are all refused but recorded only within a budget
//! per second, the rest summed in `events.lost`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde_json::{Map, Value};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use warden::audit::{Audit, AuditOptions};
use warden::origin::{ConnOrigin, Origins};
use warden::policy::{Access, Approval, SshLogin, SshTarget, Target, TargetKind, Terms};
use warden::protocol::tcp::{Pipes, Tcp, pipes::PIPE_SIZE};
use warden::protocol::{Ask, Authorize, End, Handlers, Hello, IdentityView, Refusal, RefusalCode, Session};
use warden::proxy::per_cgroup::PerCgroup;
use warden::proxy::refusals::Refusals;
use warden::proxy::{Admission, Gate, Proxy, Sessions};

/// What the stand-in gate does, chosen by the origin's uid.
const ALLOW: u32 = 1;
const REFUSE: u32 = 2;
/// Redirected for an SSH target, whose handler this build does not have yet.
const SSH: u32 = 3;

/// The rig's budget of refusal records per source and second: small, so a flood far exceeds it.
const PER_SECOND: u32 = 5;

/// Origins the test registers by the client's local address before it connects.
#[derive(Default)]
struct StandInOrigins(Mutex<HashMap<SocketAddr, ConnOrigin>>);

impl Origins for StandInOrigins {
    fn lookup(&self, peer: SocketAddr) -> Option<ConnOrigin> {
        self.0.lock().unwrap().get(&peer).cloned()
    }
}

struct StandInGate {
    upstream: SocketAddr,
}

fn terms() -> Terms {
    Terms {
        rule: "test-rule".into(),
        target: "echo".into(),
        access: Access::Connect,
        ttl: Duration::from_secs(60),
        mask: Vec::new(),
        approval: Approval::None,
        commands: None,
        forward: false,
        sftp: false,
    }
}

impl Authorize for StandInGate {
    fn authorize(&self, _session: &Session, _ask: &Ask<'_>) -> Result<(), Refusal> {
        Err(Refusal::new(RefusalCode::NotGranted, "the stand-in gate grants nothing mid-session"))
    }
}

impl Gate for StandInGate {
    fn target(&self, origin: &ConnOrigin) -> Result<Arc<Target>, Refusal> {
        if origin.dst != self.upstream {
            return Err(Refusal::new(RefusalCode::UnknownTarget, "not the echo target"));
        }
        let kind = if origin.uid == SSH {
            TargetKind::Ssh(SshTarget {
                host_key: Some("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIPlaceholder".into()),
                host_ca: None,
                credentials: SshLogin {
                    user: "deploy".into(),
                    private_key_file: None,
                    certificate_file: None,
                    password_file: None,
                },
            })
        } else {
            TargetKind::Tcp
        };
        Ok(Arc::new(Target {
            name: "echo".into(),
            host: self.upstream.ip().to_string(),
            port: self.upstream.port(),
            kind,
        }))
    }

    fn admit<'a>(
        &'a self,
        origin: &'a ConnOrigin,
        target: &'a Arc<Target>,
        _hello: &'a Hello,
    ) -> Pin<Box<dyn Future<Output = Result<Admission, Refusal>> + Send + 'a>> {
        Box::pin(async move {
            if origin.uid == REFUSE {
                let mut r = Refusal::new(RefusalCode::Policy, "the stand-in gate refuses uid 2");
                r.target = Some(target.name.clone());
                return Err(r);
            }
            Ok(Admission {
                terms: terms(),
                identity: Some(IdentityView {
                    name: "bot".into(),
                    sub: "sub-1".into(),
                    client_id: "client-1".into(),
                    groups: vec!["g".into()],
                }),
                grant: Some("g-test".into()),
                until: None,
            })
        })
    }
}

struct Rig {
    proxy: Arc<Proxy>,
    listen: SocketAddr,
    upstream: SocketAddr,
    origins: Arc<StandInOrigins>,
    writer_stop: CancellationToken,
    writer: tokio::task::JoinHandle<()>,
    dir: tempfile::TempDir,
}

/// An echo server on loopback.
async fn echo() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

async fn rig() -> Rig {
    rig_with(1024).await
}

/// A rig whose proxy lets one cgroup hold at most `per_cgroup` connections.
async fn rig_with(per_cgroup: usize) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let writer_stop = CancellationToken::new();
    let (audit, writer) = Audit::start_with(&AuditOptions::in_dir(dir.path()), writer_stop.clone()).unwrap();
    let upstream = echo().await;
    let origins = Arc::new(StandInOrigins::default());
    let proxy = Arc::new(Proxy {
        origins: origins.clone(),
        protocols: Handlers::new(dir.path(), &audit, Tcp::splicing(Pipes::new(16, PIPE_SIZE))).unwrap(),
        audit_failed: audit.failed(),
        audit,
        sessions: Arc::new(Sessions::default()),
        gate: Arc::new(StandInGate { upstream }),
        shutdown: CancellationToken::new(),
        limit: Arc::new(Semaphore::new(16)),
        tasks: TaskTracker::new(),
        metrics: warden::metrics::unserved(),
        refusals: Arc::new(Refusals::new(PER_SECOND)),
        per_cgroup: Arc::new(PerCgroup::new(per_cgroup)),
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let listen = listener.local_addr().unwrap();
    tokio::spawn(proxy.clone().serve(listener));
    Rig { proxy, listen, upstream, origins, writer_stop, writer, dir }
}

impl Rig {
    /// Connects to the proxy as a process with `uid`, its origin registered first.
    async fn connect(&self, uid: u32) -> TcpStream {
        self.try_connect(uid).await.unwrap()
    }

    /// Like [`Rig::connect`], but a refusal may reset the connection before `connect` returns.
    async fn try_connect(&self, uid: u32) -> std::io::Result<TcpStream> {
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let local = socket.local_addr().unwrap();
        let origin = ConnOrigin {
            pid: 4000 + uid,
            tid: 4000 + uid,
            uid,
            gid: uid,
            cgroup_id: 7,
            cgroup: "/warden/test".into(),
            tagged_cgroup: 7,
            binding: 1,
            target: 1,
            dst: self.upstream,
            at: SystemTime::now(),
        };
        self.origins.0.lock().unwrap().insert(local, origin);
        socket.connect(self.listen).await
    }

    /// Stops the proxy once every session has recorded its end, stops the writer, reads the record.
    async fn records(self) -> Vec<Map<String, Value>> {
        self.proxy.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.proxy.drained()).await.expect("sessions end");
        self.writer_stop.cancel();
        self.writer.await.unwrap();
        read_records(&self.dir.path().join("audit"))
    }
}

fn read_records(dir: &Path) -> Vec<Map<String, Value>> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
        .collect();
    files.sort();
    files
        .iter()
        .flat_map(|p| std::fs::read_to_string(p).unwrap().lines().map(str::to_owned).collect::<Vec<_>>())
        .map(|l| serde_json::from_str(&l).unwrap())
        .collect()
}

fn find<'a>(records: &'a [Map<String, Value>], event: &str, uid: u32) -> Vec<&'a Map<String, Value>> {
    records.iter().filter(|r| r["event"] == event && r["uid"] == uid).collect()
}

/// Sends `line` and reads it back through the relay.
async fn echo_through(client: &mut TcpStream, line: &[u8]) {
    client.write_all(line).await.unwrap();
    let mut back = vec![0; line.len()];
    client.read_exact(&mut back).await.unwrap();
    assert_eq!(back, line);
}

/// The id of the one live session of `uid` (live once bytes went through it).
fn live_session(proxy: &Proxy, uid: u32) -> String {
    let views = proxy.sessions.views();
    let mine: Vec<_> = views.iter().filter(|v| v.uid == uid).collect();
    assert_eq!(mine.len(), 1, "{views:?}");
    mine[0].session.clone()
}

#[tokio::test]
async fn an_allowed_session_is_relayed_and_recorded() {
    let rig = rig().await;
    let mut client = rig.connect(ALLOW).await;
    echo_through(&mut client, b"ping").await;
    client.shutdown().await.unwrap();
    let mut rest = Vec::new();
    client.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty());
    drop(client);

    let records = rig.records().await;
    let start = find(&records, "session.start", ALLOW);
    assert_eq!(start.len(), 1, "{records:?}");
    assert_eq!(start[0]["target"], "echo");
    assert_eq!(start[0]["protocol"], "tcp");
    assert_eq!(start[0]["decision"], "allow");
    assert_eq!(start[0]["grant"], "g-test");
    assert_eq!(start[0]["identity"]["name"], "bot");
    let end = find(&records, "session.end", ALLOW);
    assert_eq!(end.len(), 1, "{records:?}");
    assert_eq!(end[0]["session"], start[0]["session"]);
    assert_eq!(end[0]["reason"], "client_closed");
    assert_eq!(end[0]["bytes_up"], 4);
    assert_eq!(end[0]["bytes_down"], 4);
    assert!(end[0].get("detail").is_none(), "{:?}", end[0]);
}

#[tokio::test]
async fn a_refused_session_is_reset_and_recorded_with_its_code() {
    let rig = rig().await;
    let mut client = rig.connect(REFUSE).await;
    let mut buf = [0u8; 16];
    let err = client.read(&mut buf).await.expect_err("a refused client sees a reset, not a clean end");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");
    drop(client);

    let records = rig.records().await;
    let refused = find(&records, "session.refused", REFUSE);
    assert_eq!(refused.len(), 1, "{records:?}");
    assert_eq!(refused[0]["code"], "policy");
    assert_eq!(refused[0]["decision"], "deny");
    assert_eq!(refused[0]["target"], "echo");
    assert!(find(&records, "session.start", REFUSE).is_empty(), "{records:?}");
}

#[tokio::test]
async fn garbage_at_the_hello_is_refused_with_code_protocol() {
    let rig = rig().await;
    let mut client = rig.connect(SSH).await;
    // Not an SSH version line: the SSH handler's hello fails and the connection ends, before any decision.
    client.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut sink = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(15), client.read_to_end(&mut sink)).await;
    assert!(ended.is_ok(), "the connection must end, not hang");
    drop(client);

    let records = rig.records().await;
    let refused = find(&records, "session.refused", SSH);
    assert_eq!(refused.len(), 1, "{records:?}");
    assert_eq!(refused[0]["code"], "protocol");
    assert!(find(&records, "session.start", SSH).is_empty(), "{records:?}");
}

#[tokio::test]
async fn a_connection_without_an_origin_is_reset_and_recorded() {
    let rig = rig().await;
    let mut client = TcpStream::connect(rig.listen).await.unwrap();
    let mut buf = [0u8; 16];
    let err = client.read(&mut buf).await.expect_err("no origin: a reset");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");
    let records = rig.records().await;
    assert!(records.iter().any(|r| r["event"] == "connect.refused"), "{records:?}");
}

#[tokio::test]
async fn a_session_killed_mid_way_records_killed_by_operator() {
    let rig = rig().await;
    let mut client = rig.connect(ALLOW).await;
    echo_through(&mut client, b"hello").await;
    let id = live_session(&rig.proxy, ALLOW);
    assert!(rig.proxy.sessions.kill(&id));
    // The relay stops: the client's next read ends (EOF or reset), it never hangs.
    let mut buf = [0u8; 16];
    let ended = tokio::time::timeout(Duration::from_secs(10), client.read(&mut buf)).await.expect("ends");
    assert!(matches!(ended, Ok(0) | Err(_)), "{ended:?}");
    drop(client);

    let records = rig.records().await;
    let end = find(&records, "session.end", ALLOW);
    assert_eq!(end.len(), 1, "{records:?}");
    assert_eq!(end[0]["session"], id.as_str());
    assert_eq!(end[0]["reason"], "killed_by_operator");
    assert_eq!(end[0]["bytes_up"], 5);
}

#[tokio::test]
async fn a_policy_change_then_a_kill_records_the_policy_change() {
    let rig = rig().await;
    let mut client = rig.connect(ALLOW).await;
    echo_through(&mut client, b"x").await;
    let id = live_session(&rig.proxy, ALLOW);
    // The daemon's "end disallowed sessions" path, then an operator's kill racing it.
    let why = End::PolicyChanged { reason: "its target was removed from the policy".into() };
    assert_eq!(rig.proxy.sessions.kill_where(|s| s.target == "echo", &why), 1);
    rig.proxy.sessions.kill(&id);
    let mut buf = [0u8; 16];
    let ended = tokio::time::timeout(Duration::from_secs(10), client.read(&mut buf)).await.expect("ends");
    assert!(matches!(ended, Ok(0) | Err(_)), "{ended:?}");
    drop(client);

    let records = rig.records().await;
    let end = find(&records, "session.end", ALLOW);
    assert_eq!(end.len(), 1, "{records:?}");
    assert_eq!(end[0]["reason"], "policy_changed");
    assert_eq!(end[0]["detail"], "its target was removed from the policy");
}

/// Opens `n` connections, `parallel` at a time, each made by `open`, and waits until each is reset.
async fn flood<F, Fut>(n: usize, open: F) -> Duration
where
    F: Fn() -> Fut,
    Fut: Future<Output = std::io::Result<TcpStream>> + Send + 'static,
{
    let started = std::time::Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for i in 0..n {
        if i >= 64 {
            set.join_next().await.unwrap().unwrap();
        }
        let conn = open();
        set.spawn(async move {
            // A reset may come before `connect` returns.
            let mut client = match conn.await {
                Ok(c) => c,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return,
                Err(e) => panic!("connect: {e}"),
            };
            let mut buf = [0u8; 16];
            let r = tokio::time::timeout(Duration::from_secs(10), client.read(&mut buf)).await;
            assert!(matches!(r, Ok(Err(_) | Ok(0))), "refused: {r:?}");
        });
    }
    while let Some(r) = set.join_next().await {
        r.unwrap();
    }
    started.elapsed()
}

/// The events summed in `events.lost` records' `rate_limited` entries of this `source`.
fn lost(records: &[Map<String, Value>], source: &str) -> u64 {
    records
        .iter()
        .filter(|r| r["event"] == "events.lost")
        .flat_map(|r| r["rate_limited"].as_array().unwrap().iter())
        .filter(|e| e["source"] == source)
        .map(|e| e["events"].as_u64().unwrap())
        .sum()
}

/// At most the budget per started second of the flood (and the second it was flushed in).
fn bound(elapsed: Duration) -> usize {
    (usize::try_from(elapsed.as_secs()).unwrap() + 2) * PER_SECOND as usize
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_connections_without_an_origin_is_refused_and_recorded_within_a_budget() {
    const N: usize = 2000;
    let rig = rig().await;
    let listen = rig.listen;
    let elapsed = flood(N, move || TcpStream::connect(listen)).await;

    let records = rig.records().await;
    let refused = records.iter().filter(|r| r["event"] == "connect.refused").count();
    assert!(refused >= 1 && refused <= bound(elapsed), "{refused} records in {elapsed:?}");
    let lost = lost(&records, "no_origin");
    assert_eq!(refused as u64 + lost, N as u64, "every refusal is recorded or counted");
    let summary = records.iter().find(|r| r["event"] == "events.lost").expect("an events.lost record");
    assert_eq!(summary["per_second"], PER_SECOND);
    assert_eq!(summary["decision"], "deny");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_refused_sessions_from_one_cgroup_is_recorded_within_a_budget() {
    const N: usize = 2000;
    let rig = Arc::new(rig().await);
    let r = rig.clone();
    let elapsed = flood(N, move || {
        let r = r.clone();
        async move { r.try_connect(REFUSE).await }
    })
    .await;

    let rig = Arc::into_inner(rig).expect("the flood is over");
    let records = rig.records().await;
    let refused = find(&records, "session.refused", REFUSE).len();
    assert!(refused >= 1 && refused <= bound(elapsed), "{refused} records in {elapsed:?}");
    let entries: Vec<&Value> = records
        .iter()
        .filter(|r| r["event"] == "events.lost")
        .flat_map(|r| r["rate_limited"].as_array().unwrap().iter())
        .collect();
    assert!(
        entries
            .iter()
            .all(|e| e["source"] == "proxy" && e["cgroup_id"] == 7 && e["cgroup"] == "/warden/test")
    );
    assert_eq!(refused as u64 + lost(&records, "proxy"), N as u64, "every refusal is recorded or counted");
}

#[tokio::test]
async fn a_cgroup_over_its_share_of_sessions_is_refused_as_overloaded() {
    let rig = rig_with(2).await;
    let mut a = rig.connect(ALLOW).await;
    let mut b = rig.connect(ALLOW).await;
    echo_through(&mut a, b"a").await;
    echo_through(&mut b, b"b").await;
    // Both are live: the third from the same cgroup is reset.
    let mut c = rig.connect(ALLOW).await;
    let mut buf = [0u8; 16];
    let err = c.read(&mut buf).await.expect_err("over its share: a reset");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");
    assert_eq!(rig.proxy.per_cgroup.held(7), 2);
    drop((a, b, c));

    let records = rig.records().await;
    let refused = find(&records, "session.refused", ALLOW);
    assert_eq!(refused.len(), 1, "{records:?}");
    assert_eq!(refused[0]["code"], "overloaded");
    assert!(refused[0]["reason"].as_str().unwrap().contains("max_sessions_per_cgroup"), "{:?}", refused[0]);
    assert_eq!(find(&records, "session.start", ALLOW).len(), 2, "{records:?}");
}
