//! The PostgreSQL handler in process, against a real PostgreSQL 15 cluster made for each test in a temp
//! dir (SCRAM in pg_hba, TLS on with its own certificate), with `psql` and `tokio-postgres` as clients.
//! A small stand-in for the proxy accepts on loopback and drives `hello` → gate → `connect` → `run` the
//! way the daemon does; the test holds each session's `Cut`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde_json::Value;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use warden::audit::{Audit, AuditOptions, Record};
use warden::origin::ConnOrigin;
use warden::policy::{
    Access, Approval, PgCredentials, PgLogin, PostgresTarget, Target, TargetKind, Terms, TlsMode,
};
use warden::protocol::postgres::{Postgres, ca};
use warden::protocol::{Ask, Authorize, Counters, Cut, End, Refusal, RefusalCode, Session};

const DEADLINE: Duration = Duration::from_secs(30);
#[path = "support/pg_cluster.rs"]
mod pg_cluster;
use pg_cluster::{Cluster, PASSWORD};

struct AllowAll;
impl Authorize for AllowAll {
    fn authorize(&self, _: &Session, _: &Ask<'_>) -> Result<(), Refusal> {
        Ok(())
    }
}

/// How one test sets the stand-in up.
#[derive(Clone)]
struct Setup {
    tls: TlsMode,
    access: Access,
    mask: Vec<String>,
    /// Target host as the policy names it (the agent-side certificate's name).
    host: String,
}

impl Default for Setup {
    fn default() -> Self {
        Self { tls: TlsMode::Require, access: Access::Read, mask: vec![], host: "127.0.0.1".into() }
    }
}

/// The stand-in proxy: hello → gate (database check) → connect → run, each session's Cut and End sent
/// to the test.
struct Proxy {
    addr: SocketAddr,
    audit: Audit,
    pg: Postgres,
    state: tempfile::TempDir,
    cuts: mpsc::UnboundedReceiver<Cut>,
    ends: mpsc::UnboundedReceiver<End>,
    /// The tagged cgroup the next connection is said to come from.
    cgroup: Arc<AtomicU64>,
    /// Stops the audit writer (after which every append is refused, as after a failure it cannot ride out).
    audit_stop: CancellationToken,
    _stop: tokio::task::JoinHandle<()>,
}

impl Proxy {
    async fn start(cluster: &Cluster, setup: Setup) -> Self {
        let state = tempfile::tempdir().unwrap();
        let pwfile = state.path().join("pg-password");
        std::fs::write(&pwfile, format!("{PASSWORD}\n")).unwrap();
        let audit_stop = CancellationToken::new();
        let audit = Audit::start_with(&AuditOptions::in_dir(state.path()), audit_stop.clone()).unwrap().0;
        let pg = Postgres::new(state.path(), audit.clone()).unwrap();
        let login = |user: &str| PgLogin { user: user.into(), password_file: Some(pwfile.clone()) };
        let target = Arc::new(Target {
            name: "orders-db".into(),
            host: setup.host.clone(),
            port: cluster.port,
            kind: TargetKind::Postgres(PostgresTarget {
                databases: vec!["orders".into()],
                tls: setup.tls,
                ca_file: Some(cluster.ca_pem.clone()),
                credentials: PgCredentials::PerAccess { read: login("agent_ro"), write: login("agent_rw") },
                record_parameters: false,
            }),
        });
        let terms = Terms {
            rule: "agents read orders".into(),
            target: "orders-db".into(),
            access: setup.access,
            ttl: Duration::from_secs(600),
            mask: setup.mask.clone(),
            approval: Approval::None,
            commands: None,
            forward: false,
            sftp: false,
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (cut_tx, cuts) = mpsc::unbounded_channel();
        let (end_tx, ends) = mpsc::unbounded_channel();
        let cgroup = Arc::new(AtomicU64::new(42));
        let dst = cluster.addr();
        let (pg2, audit2, cg) = (pg.clone(), audit.clone(), cgroup.clone());
        let ids = Arc::new(Mutex::new(0u32));
        let stop = tokio::spawn(async move {
            loop {
                let Ok((sock, peer)) = listener.accept().await else { return };
                let (pg, audit, target, terms, cut_tx, end_tx, ids) = (
                    pg2.clone(),
                    audit2.clone(),
                    target.clone(),
                    terms.clone(),
                    cut_tx.clone(),
                    end_tx.clone(),
                    ids.clone(),
                );
                let origin = ConnOrigin {
                    pid: 1000,
                    tid: 1000,
                    uid: 0,
                    gid: 0,
                    cgroup_id: cg.load(Ordering::SeqCst),
                    cgroup: "/test/agent".into(),
                    tagged_cgroup: cg.load(Ordering::SeqCst),
                    binding: 1,
                    target: 1,
                    dst,
                    at: SystemTime::now(),
                };
                tokio::spawn(async move {
                    let _ = peer;
                    let greeting = match pg.hello(sock, &target, &origin).await {
                        Ok(Some(g)) => g,
                        Ok(None) => return,
                        Err(e) => {
                            let _ =
                                audit.append(Record::new("connect.refused").field("error", e.to_string()));
                            let _ = end_tx.send(End::ProtocolError { detail: e.to_string() });
                            return;
                        }
                    };
                    let TargetKind::Postgres(p) = &target.kind else { unreachable!() };
                    let db = greeting.hello().database.clone().unwrap_or_default();
                    if !p.databases.contains(&db) {
                        let refusal = Refusal::new(
                            RefusalCode::Database,
                            format!("database `{db}` is not in target `orders-db`'s databases (policy)"),
                        );
                        greeting.refuse(&refusal).await;
                        let _ = end_tx.send(End::PolicyChanged { reason: "refused".into() });
                        return;
                    }
                    let mut greeting = greeting;
                    if let Err(end) = greeting.connect(dst, &terms).await {
                        let _ = end_tx.send(end);
                        return;
                    }
                    let id = {
                        let mut n = ids.lock().unwrap();
                        *n += 1;
                        format!("s-{n}")
                    };
                    let cut = Cut::new();
                    let _ = cut_tx.send(cut.clone());
                    let session = Session {
                        id,
                        origin,
                        target: target.clone(),
                        terms,
                        identity: None,
                        grant: None,
                        audit,
                        counters: Arc::new(Counters::default()),
                        cut,
                        authorize: Arc::new(AllowAll),
                    };
                    let end = greeting.run(session).await;
                    let _ = end_tx.send(end);
                });
            }
        });
        Self { addr, audit, pg, state, cuts, ends, cgroup, audit_stop, _stop: stop }
    }

    fn conninfo(&self, db: &str, sslmode: &str) -> String {
        format!("host=127.0.0.1 port={} dbname={db} user=agent sslmode={sslmode}", self.addr.port())
    }

    async fn client(&self) -> tokio_postgres::Client {
        let (client, conn) =
            tokio_postgres::connect(&self.conninfo("orders", "disable"), tokio_postgres::NoTls)
                .await
                .expect("connect through warden");
        tokio::spawn(conn);
        client
    }

    async fn records(&self, event: &str) -> Vec<Value> {
        self.audit.append_durable(Record::new("test.flush")).await.unwrap();
        self.records_on_disk(event)
    }

    /// The records on disk now (without waiting for the writer).
    fn records_on_disk(&self, event: &str) -> Vec<Value> {
        let mut files: Vec<PathBuf> =
            std::fs::read_dir(self.audit.dir()).unwrap().map(|e| e.unwrap().path()).collect();
        files.sort();
        files
            .iter()
            .filter_map(|f| std::fs::read_to_string(f).ok())
            .flat_map(|t| t.lines().filter_map(|l| serde_json::from_str::<Value>(l).ok()).collect::<Vec<_>>())
            .filter(|r| r["event"] == event)
            .collect()
    }

    async fn next_end(&mut self) -> End {
        tokio::time::timeout(DEADLINE, self.ends.recv()).await.expect("a session end").unwrap()
    }

    async fn next_cut(&mut self) -> Cut {
        tokio::time::timeout(DEADLINE, self.cuts.recv()).await.expect("a session").unwrap()
    }
}

/// psql through Warden: (success, stdout, stderr).
fn psql(conninfo: &str, sql: &str, env: &[(&str, &str)]) -> (bool, String, String) {
    let out = Command::new("psql")
        .arg(conninfo)
        .args(["-XAtqw", "-v", "ON_ERROR_STOP=1", "-c", sql])
        .env_remove("PGPASSWORD")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        String::from_utf8_lossy(&out.stderr).trim().to_owned(),
    )
}

/// The server's message (tokio-postgres's `Display` says only "db error").
fn msg(e: &tokio_postgres::Error) -> String {
    e.as_db_error().map_or_else(|| e.to_string(), |d| d.message().to_owned())
}

fn code(e: &tokio_postgres::Error) -> String {
    e.code().map_or_else(|| format!("no sqlstate: {e}"), |c| c.code().to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_are_injected_with_scram_over_tls_and_statements_recorded() {
    let cluster = Cluster::start();
    let proxy = Proxy::start(&cluster, Setup::default()).await;
    let client = proxy.client().await;
    let row = client
        .query_one("SELECT current_user::text, ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()", &[])
        .await;
    let row = row.unwrap();
    assert_eq!(row.get::<_, String>(0), "agent_ro");
    assert!(row.get::<_, bool>(1), "the upstream leg is TLS");
    // SCRAM-SHA-256-PLUS: the server logged a channel-bound authentication.
    let mech = client.query_one("SELECT name FROM users WHERE id = $1", &[&1i32]).await.unwrap();
    assert_eq!(mech.get::<_, String>(0), "ann");
    drop(client);
    let queries = proxy.records("pg.query").await;
    assert!(queries.iter().any(|q| q["text"].as_str().unwrap().contains("pg_stat_ssl")), "{queries:?}");
    let ext = queries
        .iter()
        .find(|q| q["text"] == "SELECT name FROM users WHERE id = $1")
        .expect("extended recorded");
    assert_eq!(ext["protocol"], "extended");
    assert_eq!(ext["parameters"]["redacted"], true, "parameters redacted by default");
    assert_eq!(ext["target"], "orders-db");
    let results = proxy.records("pg.result").await;
    assert!(results.iter().any(|r| r["n"] == ext["n"] && r["rows"] == 1), "{results:?}");
    // The password never reached the record.
    let all = std::fs::read_dir(proxy.audit.dir())
        .unwrap()
        .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap_or_default())
        .collect::<String>();
    assert!(!all.contains(PASSWORD));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_binding_is_used_when_the_upstream_leg_is_tls() {
    let cluster = Cluster::start();
    // Only SCRAM-SHA-256-PLUS is acceptable when the server demands it through hostssl + scram: the server
    // offers -PLUS over TLS; Warden must pick it. Check from the server's view.
    let proxy = Proxy::start(
        &cluster,
        Setup { tls: TlsMode::VerifyFull, host: "localhost".into(), ..Setup::default() },
    )
    .await;
    let client = proxy.client().await;
    let row =
        client.query_one("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()", &[]).await.unwrap();
    assert!(row.get::<_, bool>(0));
    let log = std::fs::read_to_string(cluster.dir.path().join("log")).unwrap_or_default();
    assert!(!log.contains("channel binding"), "no channel binding failure: {log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn databases_outside_the_target_are_refused_with_3d000() {
    let cluster = Cluster::start();
    let mut proxy = Proxy::start(&cluster, Setup::default()).await;
    let err = tokio_postgres::connect(&proxy.conninfo("postgres", "disable"), tokio_postgres::NoTls)
        .await
        .err()
        .expect("refused");
    assert_eq!(code(&err), "3D000");
    assert!(msg(&err).contains("policy"), "{err}");
    proxy.next_end().await;
    let (ok, _, stderr) = psql(&proxy.conninfo("template1", "disable"), "select 1", &[]);
    assert!(!ok && stderr.contains("orders-db"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_works_with_sslmode_require_and_verify_full_against_the_warden_ca() {
    let cluster = Cluster::start();
    let proxy = Proxy::start(&cluster, Setup::default()).await;
    let (ok, out, err) = psql(&proxy.conninfo("orders", "require"), "select count(*) from users", &[]);
    assert!(ok, "{err}");
    assert_eq!(out, "2");
    // `warden ca tls` prints the CA the handler issues from.
    let config = proxy.state.path().join("warden.toml");
    std::fs::write(&config, format!("[agent]\nstate_dir = {:?}\n", proxy.state.path())).unwrap();
    let out =
        Command::new(env!("CARGO_BIN_EXE_warden")).args(["ca", "tls", "-c"]).arg(&config).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let ca_file = proxy.state.path().join("warden-ca.pem");
    std::fs::write(&ca_file, &out.stdout).unwrap();
    assert_eq!(ca::certificate_pem(proxy.state.path()).unwrap(), proxy.pg.ca_pem());
    let info = format!("{} sslrootcert={}", proxy.conninfo("orders", "verify-full"), ca_file.display());
    let (ok, out, err) = psql(&info, "select name from users order by id limit 1", &[]);
    assert!(ok, "{err}");
    assert_eq!(out, "ann");
    // A CA the client does not trust fails verification.
    let info =
        format!("{} sslrootcert={}", proxy.conninfo("orders", "verify-full"), cluster.ca_pem.display());
    let (ok, _, err) = psql(&info, "select 1", &[]);
    assert!(!ok && err.contains("certificate"), "{err}");
    // The client was never asked for a password (psql -w would have failed).
    let starts = proxy.records("pg.query").await;
    assert!(starts.len() >= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_under_read_are_refused_and_the_database_is_unchanged() {
    let cluster = Cluster::start();
    let proxy = Proxy::start(&cluster, Setup::default()).await;
    let before = cluster.sql("orders", "SELECT string_agg(id || name || email, ',' ORDER BY id) FROM users");
    let client = proxy.client().await;
    for sql in [
        "INSERT INTO users VALUES (3, 'eve', 'eve@example.com')",
        "UPDATE users SET name = 'x'",
        "DELETE FROM users",
        "SELECT 1; DELETE FROM users",
        "SET default_transaction_read_only = off",
        "CREATE TABLE t (x int)",
    ] {
        let e = client.simple_query(sql).await.expect_err(sql);
        assert_eq!(code(&e), "25006", "{sql}: {e}");
        assert!(msg(&e).contains("agents read orders"), "names the policy: {e}");
        // Extended protocol too.
        let e = client.prepare(sql).await.expect_err(sql);
        // A Parse holds one statement: several may be refused as unparsable instead.
        let expected: &[&str] = if sql.contains(';') { &["25006", "42601"] } else { &["25006"] };
        assert!(expected.contains(&code(&e).as_str()), "{sql}: {e}");
    }
    // The session goes on after refusals, in both protocols.
    assert_eq!(client.query_one("SELECT count(*) FROM users", &[]).await.unwrap().get::<_, i64>(0), 2);
    let rows = client.simple_query("SELECT name FROM users ORDER BY id").await.unwrap();
    let rows = rows.iter().filter(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(_))).count();
    assert_eq!(rows, 2);
    // psql prints the refusal.
    let (ok, _, err) = psql(&proxy.conninfo("orders", "require"), "DROP TABLE users", &[]);
    assert!(!ok && err.contains("warden"), "{err}");
    // Even a RESET ALL falls back to read-only upstream (defence in depth under the classifier).
    assert_eq!(
        client
            .query_one("SELECT current_setting('default_transaction_read_only')", &[])
            .await
            .unwrap()
            .get::<_, String>(0),
        "on"
    );
    let after = cluster.sql("orders", "SELECT string_agg(id || name || email, ',' ORDER BY id) FROM users");
    assert_eq!(before, after);
    let refused: Vec<Value> =
        proxy.records("pg.query").await.into_iter().filter(|q| q["decision"] == "refused").collect();
    assert!(refused.len() >= 12, "{refused:?}");
    assert!(refused.iter().all(|q| q["sqlstate"] == "25006"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_refusal_skips_to_sync_and_earlier_results_arrive() {
    let cluster = Cluster::start();
    let proxy = Proxy::start(&cluster, Setup::default()).await;
    let client = proxy.client().await;
    // tokio-postgres pipelines these: each is Parse/Bind/Execute/Sync, sent together.
    let a = client.query_one("SELECT 1::int4", &[]);
    let b = client.prepare("INSERT INTO users VALUES (9, 'x', 'y')");
    let c = client.query_one("SELECT 3::int4", &[]);
    let (a, b, c) = tokio::join!(a, b, c);
    assert_eq!(a.unwrap().get::<_, i32>(0), 1);
    assert_eq!(code(&b.err().unwrap()), "25006");
    assert_eq!(c.unwrap().get::<_, i32>(0), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn masked_columns_are_replaced_in_text_and_binary_results() {
    let cluster = Cluster::start();
    let proxy = Proxy::start(&cluster, Setup { mask: vec!["users.email".into()], ..Setup::default() }).await;
    let client = proxy.client().await;
    // Binary (tokio-postgres asks for binary results in the extended protocol).
    let rows = client.query("SELECT id, name, email FROM users ORDER BY id", &[]).await.unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0].get::<_, String>(1), "ann");
    assert_eq!(rows[0].get::<_, String>(2), "[masked]");
    // An alias still carries the column's origin.
    let rows = client.query("SELECT email AS contact FROM users", &[]).await.unwrap();
    assert!(rows.iter().all(|r| r.get::<_, String>(0) == "[masked]"));
    // Text, simple protocol.
    let rows = client.simple_query("SELECT id, email FROM users ORDER BY id").await.unwrap();
    let values: Vec<String> = rows
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(r.get(1).unwrap().to_owned()),
            _ => None,
        })
        .collect();
    assert_eq!(values, ["[masked]", "[masked]"]);
    // psql (text).
    let (ok, out, err) = psql(&proxy.conninfo("orders", "require"), "SELECT email FROM users", &[]);
    assert!(ok, "{err}");
    assert!(!out.contains("example.com"), "{out}");
    // An error that would quote an input value has its message withheld.
    let e = client.simple_query("SELECT 'not-a-number'::int").await.unwrap_err();
    assert_eq!(code(&e), "22P02");
    assert!(!msg(&e).contains("not-a-number") && msg(&e).contains("withheld"), "{e}");
    let q = proxy.records("pg.query").await;
    assert!(q.iter().any(|r| r["masks"] == serde_json::json!(["users.email"])), "{q:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_reaches_the_backend_only_from_the_same_cgroup() {
    let cluster = Cluster::start();
    let proxy = Proxy::start(&cluster, Setup::default()).await;
    let client = proxy.client().await;
    let token = client.cancel_token();
    // A cancel from another tagged cgroup cancels nothing.
    proxy.cgroup.store(99, Ordering::SeqCst);
    token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    let denied = wait_for(&proxy, "pg.cancel", |r| r["denied"] == "other_cgroup").await;
    assert_eq!(denied["forwarded"], false);
    proxy.cgroup.store(42, Ordering::SeqCst);
    // A forged key cancels nothing either.
    forged_cancel(proxy.addr).await;
    wait_for(&proxy, "pg.cancel", |r| r["denied"] == "unknown_key").await;
    // The same cgroup's cancel stops the running query.
    let sleeping = tokio::spawn(async move {
        let r = client.simple_query("SELECT pg_sleep(60)").await;
        (client, r)
    });
    wait_until_running(&cluster, "pg_sleep(60)").await;
    token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    let (client, r) = tokio::time::timeout(DEADLINE, sleeping).await.unwrap().unwrap();
    assert_eq!(code(&r.err().unwrap()), "57014");
    wait_for(&proxy, "pg.cancel", |r| r["forwarded"] == true).await;
    // The session is usable afterwards.
    assert_eq!(client.query_one("SELECT 1::int4", &[]).await.unwrap().get::<_, i32>(0), 1);
}

async fn forged_cancel(addr: SocketAddr) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut b = Vec::new();
    b.extend_from_slice(&16i32.to_be_bytes());
    b.extend_from_slice(&80_877_102i32.to_be_bytes());
    b.extend_from_slice(&12345i32.to_be_bytes());
    b.extend_from_slice(&678i32.to_be_bytes());
    s.write_all(&b).await.unwrap();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest).await;
}

async fn wait_for(proxy: &Proxy, event: &str, f: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        if let Some(r) = proxy.records(event).await.into_iter().find(|r| f(r)) {
            return r;
        }
        assert!(tokio::time::Instant::now() < deadline, "no matching {event}");
        tokio::task::yield_now().await;
    }
}

async fn wait_until_running(cluster: &Cluster, text: &str) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let sql = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query LIKE '%{text}%' AND pid <> pg_backend_pid()"
    );
    while cluster.admin(&sql) != "1" {
        assert!(tokio::time::Instant::now() < deadline, "the query never ran");
        tokio::task::yield_now().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_mid_query_ends_the_session_with_fatal() {
    let cluster = Cluster::start();
    let mut proxy = Proxy::start(&cluster, Setup::default()).await;
    let client = proxy.client().await;
    let cut = proxy.next_cut().await;
    let sleeping = tokio::spawn(async move { client.simple_query("SELECT pg_sleep(60)").await });
    wait_until_running(&cluster, "pg_sleep(60)").await;
    cut.cut(End::GrantExpired);
    let err = tokio::time::timeout(DEADLINE, sleeping).await.unwrap().unwrap().err().unwrap();
    assert_eq!(code(&err), "57P01");
    assert!(msg(&err).contains("grant expired"), "{err}");
    assert_eq!(proxy.next_end().await, End::GrantExpired);
    // The upstream query was cancelled too.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while cluster.admin(
        "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%pg_sleep(60)%' AND pid <> pg_backend_pid()",
    ) != "0"
    {
        assert!(tokio::time::Instant::now() < deadline, "upstream query still running");
        tokio::task::yield_now().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_truncated_messages_end_only_that_session() {
    let cluster = Cluster::start();
    let mut proxy = Proxy::start(&cluster, Setup::default()).await;
    // Garbage instead of a startup packet.
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut back = Vec::new();
    let _ = s.read_to_end(&mut back).await;
    assert!(matches!(proxy.next_end().await, End::ProtocolError { .. }));
    // A truncated startup packet.
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(&[0, 0, 0, 40, 0, 3, 0, 0, b'u']).await.unwrap();
    s.shutdown().await.unwrap();
    let _ = s.read_to_end(&mut back).await;
    assert!(matches!(proxy.next_end().await, End::ProtocolError { .. }));
    // A good startup, then an oversized and a malformed message mid-session.
    for bad in [vec![b'Q', 0x7f, 0xff, 0xff, 0xff], vec![b'Z', 0, 0, 0, 1], vec![b'B', 0, 0, 0, 6, 1, 2]] {
        let mut s = startup(proxy.addr).await;
        s.write_all(&bad).await.unwrap();
        let mut back = Vec::new();
        let _ = tokio::time::timeout(DEADLINE, s.read_to_end(&mut back)).await.unwrap();
        assert!(String::from_utf8_lossy(&back).contains("08P01"), "the client is told");
        let end = proxy.next_end().await;
        assert!(matches!(end, End::ProtocolError { .. }), "{end:?}");
    }
    // A message cut off mid-way: the client closes after part of a Query.
    let mut s = startup(proxy.addr).await;
    s.write_all(&[b'Q', 0, 0, 0, 100, b'S', b'E', b'L']).await.unwrap();
    s.shutdown().await.unwrap();
    let mut back = Vec::new();
    let _ = tokio::time::timeout(DEADLINE, s.read_to_end(&mut back)).await.unwrap();
    match proxy.next_end().await {
        End::ProtocolError { detail } => assert!(detail.contains("mid-message"), "{detail}"),
        other => panic!("{other:?}"),
    }
    // The handler still serves.
    let client = proxy.client().await;
    assert_eq!(client.query_one("SELECT 2::int4", &[]).await.unwrap().get::<_, i32>(0), 2);
}

/// A plain connection past startup (up to the first ReadyForQuery).
async fn startup(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut body = 196_608i32.to_be_bytes().to_vec();
    body.extend_from_slice(b"user\0agent\0database\0orders\0\0");
    let mut p = (i32::try_from(body.len()).unwrap() + 4).to_be_bytes().to_vec();
    p.extend_from_slice(&body);
    s.write_all(&p).await.unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !seen.windows(6).any(|w| w == [b'Z', 0, 0, 0, 5, b'I']) {
        let n = tokio::time::timeout(DEADLINE, s.read(&mut buf)).await.unwrap().unwrap();
        assert!(n > 0, "closed during startup");
        seen.extend_from_slice(&buf[..n]);
    }
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_connections_are_pooled_and_reset_between_sessions() {
    let cluster = Cluster::start();
    let mut proxy = Proxy::start(&cluster, Setup::default()).await;
    let client = proxy.client().await;
    let pid: i32 = client.query_one("SELECT pg_backend_pid()", &[]).await.unwrap().get(0);
    drop(client);
    assert_eq!(proxy.next_end().await, End::ClientClosed);
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while proxy.pg.pooled() == 0 {
        assert!(tokio::time::Instant::now() < deadline, "never pooled");
        tokio::task::yield_now().await;
    }
    let client = proxy.client().await;
    let again: i32 = client.query_one("SELECT pg_backend_pid()", &[]).await.unwrap().get(0);
    assert_eq!(pid, again, "the second session reused the upstream connection");
    assert_eq!(
        client
            .query_one("SELECT current_setting('default_transaction_read_only')", &[])
            .await
            .unwrap()
            .get::<_, String>(0),
        "on"
    );
}

/// The first value of a simple query's first row.
async fn simple_value(client: &tokio_postgres::Client, sql: &str) -> String {
    let rows = client.simple_query(sql).await.unwrap_or_else(|e| panic!("{sql}: {}", msg(&e)));
    rows.iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
            _ => None,
        })
        .unwrap_or_else(|| panic!("{sql}: no row"))
}

/// What a session leaves on its upstream connection (settings, temporary tables, prepared statements,
/// advisory locks, cursors) is gone when the next session gets it; and a session that starts right after
/// another ended takes the connection the pool is still resetting (waiting for the reset) rather than
/// logging in anew.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_connection_keeps_nothing_of_the_previous_session() {
    let cluster = Cluster::start();
    let mut proxy = Proxy::start(&cluster, Setup { access: Access::Write, ..Setup::default() }).await;
    let client = proxy.client().await;
    let pid = simple_value(&client, "SELECT pg_backend_pid()").await;
    client
        .batch_execute(
            "SET statement_timeout = '4321s'; SET application_name = 'leaky'; \
             CREATE TEMP TABLE leak (x int); PREPARE leaky AS SELECT 1; SELECT pg_advisory_lock(42); \
             BEGIN; DECLARE c CURSOR WITH HOLD FOR SELECT 1; COMMIT",
        )
        .await
        .unwrap();
    drop(client);
    assert_eq!(proxy.next_end().await, End::ClientClosed);
    // No wait for the reset: the next session's checkout waits for it.
    let client = proxy.client().await;
    assert_eq!(simple_value(&client, "SELECT pg_backend_pid()").await, pid, "the connection was reused");
    assert_eq!(simple_value(&client, "SHOW statement_timeout").await, "0");
    assert_ne!(simple_value(&client, "SHOW application_name").await, "leaky");
    assert_eq!(simple_value(&client, "SELECT to_regclass('pg_temp.leak') IS NULL").await, "t");
    assert_eq!(simple_value(&client, "SELECT count(*) FROM pg_prepared_statements").await, "0");
    assert_eq!(simple_value(&client, "SELECT count(*) FROM pg_cursors").await, "0");
    assert_eq!(simple_value(&client, "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'").await, "0");
    // The name is free again: preparing it does not fail.
    client.batch_execute("PREPARE leaky AS SELECT 2; DEALLOCATE leaky").await.unwrap();
    let logins = simple_value(
        &client,
        "SELECT count(*) FROM pg_stat_activity WHERE usename = 'agent_rw' AND backend_type = 'client backend'",
    )
    .await;
    assert_eq!(logins, "1", "one upstream connection for both sessions");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_work_under_write_with_copy_both_ways() {
    let cluster = Cluster::start();
    let proxy =
        Proxy::start(&cluster, Setup { access: Access::Write, tls: TlsMode::Disable, ..Setup::default() })
            .await;
    let client = proxy.client().await;
    assert_eq!(
        client.query_one("SELECT current_user::text", &[]).await.unwrap().get::<_, String>(0),
        "agent_rw"
    );
    let n = client.execute("INSERT INTO users VALUES ($1, 'cy', 'cy@example.com')", &[&3i32]).await.unwrap();
    assert_eq!(n, 1);
    let (ok, out, err) = psql(&proxy.conninfo("orders", "disable"), "COPY users TO STDOUT", &[]);
    assert!(ok, "{err}");
    assert_eq!(out.lines().count(), 3);
    let mut child = Command::new("psql")
        .arg(proxy.conninfo("orders", "disable"))
        .args(["-XAtqw", "-v", "ON_ERROR_STOP=1", "-c", "COPY users FROM STDIN"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all_sync(b"4\tdee\tdee@example.com\n");
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(cluster.sql("orders", "SELECT count(*) FROM users"), "4");
    let results = proxy.records("pg.result").await;
    assert!(results.iter().any(|r| r["commands"] == serde_json::json!(["COPY 1"])), "{results:?}");
}

trait WriteAllSync {
    fn write_all_sync(self, b: &[u8]);
}
impl WriteAllSync for std::process::ChildStdin {
    fn write_all_sync(mut self, b: &[u8]) {
        std::io::Write::write_all(&mut self, b).unwrap();
    }
}

/// Reads backend messages until `ReadyForQuery`, returning their type bytes and bodies.
async fn until_ready<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    loop {
        let mut head = [0u8; 5];
        tokio::time::timeout(DEADLINE, s.read_exact(&mut head)).await.unwrap().unwrap();
        let len = usize::try_from(i32::from_be_bytes([head[1], head[2], head[3], head[4]])).unwrap() - 4;
        let mut body = vec![0u8; len];
        s.read_exact(&mut body).await.unwrap();
        let done = head[0] == b'Z';
        out.push((head[0], body));
        if done {
            return out;
        }
    }
}

fn startup_packet(version: i32, extra: &[u8]) -> Vec<u8> {
    let mut body = version.to_be_bytes().to_vec();
    body.extend_from_slice(b"user\0agent\0database\0orders\0");
    body.extend_from_slice(extra);
    body.push(0);
    let mut p = (i32::try_from(body.len()).unwrap() + 4).to_be_bytes().to_vec();
    p.extend_from_slice(&body);
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gssenc_is_declined_newer_minors_negotiated_and_direct_tls_needs_alpn() {
    let cluster = Cluster::start();
    let proxy = Proxy::start(&cluster, Setup::default()).await;
    // GSSENCRequest → 'N', then a 3.2 startup with an unknown protocol option.
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x30]).await.unwrap();
    let mut answer = [0u8; 1];
    s.read_exact(&mut answer).await.unwrap();
    assert_eq!(&answer, b"N");
    s.write_all(&startup_packet(0x0003_0002, b"_pq_.frobnicate\0on\0")).await.unwrap();
    let msgs = until_ready(&mut s).await;
    let (tag, body) = &msgs[0];
    assert_eq!(*tag, b'v', "NegotiateProtocolVersion first: {msgs:?}");
    assert_eq!(&body[..8], &[0, 3, 0, 0, 0, 0, 0, 1]);
    assert_eq!(&body[8..], b"_pq_.frobnicate\0");
    assert!(
        msgs.iter().any(|(t, b)| *t == b'R' && b == &[0, 0, 0, 0]),
        "AuthenticationOk, no password asked"
    );
    assert!(msgs.iter().any(|(t, _)| *t == b'K'), "a cancel key");

    // PostgreSQL 17's direct TLS: a ClientHello first, ALPN `postgresql`, the Warden CA's certificate.
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::pem::PemObject::pem_slice_iter(proxy.pg.ca_pem().as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = |alpn: bool| {
        let mut c = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots.clone())
            .with_no_client_auth();
        if alpn {
            c.alpn_protocols = vec![b"postgresql".to_vec()];
        }
        Arc::new(c)
    };
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let tcp = TcpStream::connect(proxy.addr).await.unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(config(true)).connect(name.clone(), tcp).await.unwrap();
    tls.write_all(&startup_packet(0x0003_0000, b"")).await.unwrap();
    let msgs = until_ready(&mut tls).await;
    assert!(msgs.iter().any(|(t, _)| *t == b'R'), "{msgs:?}");
    // Without ALPN the connection is refused.
    let tcp = TcpStream::connect(proxy.addr).await.unwrap();
    let refused = match tokio_rustls::TlsConnector::from(config(false)).connect(name, tcp).await {
        Err(_) => true,
        Ok(mut tls) => {
            let _ = tls.write_all(&startup_packet(0x0003_0000, b"")).await;
            let mut buf = Vec::new();
            let _ = tokio::time::timeout(DEADLINE, tls.read_to_end(&mut buf)).await.unwrap();
            !buf.windows(6).any(|w| w == [b'Z', 0, 0, 0, 5, b'I'])
        }
    };
    assert!(refused, "direct TLS without ALPN must not get a session");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn md5_and_cleartext_upstream_logins_work() {
    let cluster = Cluster::start();
    let setup = Setup { access: Access::Write, tls: TlsMode::Disable, ..Setup::default() };
    cluster.hba_first("host all agent_rw 127.0.0.0/8 password");
    let proxy = Proxy::start(&cluster, setup.clone()).await;
    let client = proxy.client().await;
    assert_eq!(
        client.query_one("SELECT current_user::text", &[]).await.unwrap().get::<_, String>(0),
        "agent_rw"
    );
    drop(client);
    cluster.admin(&format!("SET password_encryption = 'md5'; ALTER ROLE agent_rw PASSWORD '{PASSWORD}'"));
    cluster.hba_first("host all agent_rw 127.0.0.0/8 md5");
    let proxy = Proxy::start(&cluster, setup).await;
    let client = proxy.client().await;
    assert_eq!(
        client.query_one("SELECT current_user::text", &[]).await.unwrap().get::<_, String>(0),
        "agent_rw"
    );
}

/// Frontend messages, encoded by postgres-protocol.
fn fe(f: impl FnOnce(&mut bytes::BytesMut) -> std::io::Result<()>) -> Vec<u8> {
    let mut b = bytes::BytesMut::new();
    f(&mut b).unwrap();
    b.to_vec()
}

fn simple_query(sql: &str) -> Vec<u8> {
    fe(|b| postgres_protocol::message::frontend::query(sql, b))
}

/// The extended protocol's Parse/Bind/Execute of one unnamed statement, without Sync.
fn extended(sql: &str) -> Vec<u8> {
    use postgres_protocol::message::frontend;
    fe(|b| {
        frontend::parse("", sql, std::iter::empty(), b)?;
        frontend::bind(
            "",
            "",
            std::iter::empty::<i16>(),
            std::iter::empty::<Option<()>>(),
            |_, _| unreachable!(),
            Some(0),
            b,
        )
        .map_err(|_| std::io::Error::other("bind"))?;
        frontend::execute("", 0, b)
    })
}

fn status_of(msgs: &[(u8, Vec<u8>)]) -> u8 {
    let (tag, body) = msgs.last().unwrap();
    assert_eq!(*tag, b'Z');
    body[0]
}

fn sqlstates(msgs: &[(u8, Vec<u8>)]) -> Vec<String> {
    msgs.iter()
        .filter(|(t, _)| *t == b'E')
        .map(|(_, b)| {
            let s = String::from_utf8_lossy(b);
            s.split('\0').find_map(|f| f.strip_prefix('C')).unwrap_or_default().to_owned()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_inside_a_transaction_aborts_it_on_both_sides() {
    let cluster = Cluster::start();
    let proxy = Proxy::start(
        &cluster,
        Setup {
            access: Access::Write,
            tls: TlsMode::Disable,
            mask: vec!["users.email".into()],
            ..Setup::default()
        },
    )
    .await;
    cluster.sql("orders", "CREATE TABLE notes (id int, body text); ALTER TABLE notes OWNER TO agent_rw");
    let refused = "SELECT upper(email) FROM users";
    // Simple protocol, on the wire: the refusal's ReadyForQuery says `E`, as a server's own error would,
    // and the COMMIT that follows rolls back.
    let mut s = startup(proxy.addr).await;
    s.write_all(&simple_query("BEGIN")).await.unwrap();
    assert_eq!(status_of(&until_ready(&mut s).await), b'T');
    s.write_all(&simple_query("INSERT INTO notes (id, body) VALUES (3, 'cy')")).await.unwrap();
    let m = until_ready(&mut s).await;
    assert_eq!(status_of(&m), b'T', "{m:?}");
    s.write_all(&simple_query(refused)).await.unwrap();
    let m = until_ready(&mut s).await;
    assert_eq!(sqlstates(&m), ["42501"], "one error, Warden's: the upstream's own is swallowed");
    assert_eq!(status_of(&m), b'E', "the client is told the transaction failed");
    s.write_all(&simple_query("SELECT 1")).await.unwrap();
    let m = until_ready(&mut s).await;
    assert_eq!(sqlstates(&m), ["25P02"], "the upstream transaction really is aborted");
    s.write_all(&simple_query("COMMIT")).await.unwrap();
    let m = until_ready(&mut s).await;
    assert!(m.iter().any(|(t, b)| *t == b'C' && b.starts_with(b"ROLLBACK")), "{m:?}");
    assert_eq!(status_of(&m), b'I');
    assert_eq!(cluster.sql("orders", "SELECT count(*) FROM notes"), "0", "the INSERT was not committed");
    // Extended protocol, one pipeline up to Sync (an implicit transaction): the INSERT before the refused
    // Parse is rolled back with it, the messages after it are skipped, and the session goes on.
    let mut pipeline = extended("INSERT INTO notes (id, body) VALUES (4, 'dee')");
    pipeline.extend(extended(refused));
    pipeline.extend(extended("INSERT INTO notes (id, body) VALUES (5, 'eve')"));
    pipeline.extend(fe(|b| {
        postgres_protocol::message::frontend::sync(b);
        Ok(())
    }));
    s.write_all(&pipeline).await.unwrap();
    let m = until_ready(&mut s).await;
    assert_eq!(sqlstates(&m), ["42501"], "{m:?}");
    assert_eq!(status_of(&m), b'I');
    assert_eq!(cluster.sql("orders", "SELECT count(*) FROM notes"), "0", "nothing of the pipeline committed");
    s.write_all(&simple_query("SELECT 7")).await.unwrap();
    assert!(sqlstates(&until_ready(&mut s).await).is_empty());
    drop(s);

    // tokio-postgres: an explicit transaction, a refused statement in it, then COMMIT.
    let mut client = proxy.client().await;
    let txn = client.transaction().await.unwrap();
    txn.execute("INSERT INTO notes (id, body) VALUES (6, 'fay')", &[]).await.unwrap();
    let e = txn.query(refused, &[]).await.unwrap_err();
    assert_eq!(code(&e), "42501", "{e}");
    let e = txn.query("SELECT 1::int4", &[]).await.unwrap_err();
    assert_eq!(code(&e), "25P02", "the upstream transaction is aborted: {e}");
    txn.commit().await.unwrap();
    assert_eq!(client.query_one("SELECT count(*) FROM notes", &[]).await.unwrap().get::<_, i64>(0), 0);

    // psql: the same, one command at a time; COMMIT answers ROLLBACK.
    let out = Command::new("psql")
        .arg(proxy.conninfo("orders", "disable"))
        .args(["-XAtw", "-c", "BEGIN", "-c", "INSERT INTO notes (id, body) VALUES (7, 'gus')"])
        .args(["-c", refused, "-c", "COMMIT"])
        .env_remove("PGPASSWORD")
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(stderr.contains("warden"), "{stderr}");
    assert_eq!(stdout.lines().last(), Some("ROLLBACK"), "{stdout}{stderr}");
    assert_eq!(cluster.sql("orders", "SELECT count(*) FROM notes"), "0");
}

/// Builds `support/pqfn.c` (libpq's `PQfn`, a fastpath FunctionCall client) into `dir`.
fn pqfn(dir: &std::path::Path) -> Option<PathBuf> {
    let header = std::path::Path::new("/usr/include/postgresql/libpq-fe.h").exists();
    let cc = Command::new("cc").arg("--version").stdout(Stdio::null()).status().is_ok_and(|s| s.success());
    let needs = [
        ("cc (scripts/setup.sh installs gcc)", cc),
        ("libpq-fe.h (scripts/setup.sh installs libpq-dev)", header),
    ];
    if !warden_test_support::require("pqfn", &needs) {
        return None;
    }
    let bin = dir.join("pqfn");
    let out = Command::new("cc")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/pqfn.c"))
        .args(["-I/usr/include/postgresql", "-lpq", "-o"])
        .arg(&bin)
        .output()
        .unwrap();
    assert!(out.status.success(), "cc pqfn.c: {}", String::from_utf8_lossy(&out.stderr));
    Some(bin)
}

/// Runs `pqfn CONNINFO OID [ARG]`: (success, stdout, stderr).
fn call_pqfn(bin: &std::path::Path, conninfo: &str, oid: &str, arg: Option<&str>) -> (bool, String, String) {
    let out = Command::new(bin).arg(conninfo).arg(oid).args(arg).env_remove("PGPASSWORD").output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        String::from_utf8_lossy(&out.stderr).trim().to_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fastpath_function_calls_are_recorded_and_held_to_the_allow_list_under_read() {
    let cluster = Cluster::start();
    let proxy = Proxy::start(&cluster, Setup::default()).await;
    let Some(bin) = pqfn(proxy.state.path()) else { return };
    let conninfo = proxy.conninfo("orders", "require");
    let oid = |f: &str| cluster.sql("orders", &format!("SELECT '{f}'::regprocedure::oid"));
    // A built-in on the allow-list runs.
    let (ok, out, err) = call_pqfn(&bin, &conninfo, &oid("pg_catalog.reverse(text)"), Some("hello"));
    assert!(ok, "{err}");
    assert_eq!(out, "olleh");
    // A writer is refused with 25006, and psql says so.
    let (ok, _, err) = call_pqfn(&bin, &conninfo, &oid("pg_catalog.nextval(regclass)"), Some("s"));
    assert!(!ok && err.contains("warden") && err.contains("nextval"), "{err}");
    // So is a user-defined function, and an OID that names nothing.
    cluster.sql("orders", "CREATE FUNCTION public.bump(text) RETURNS text LANGUAGE sql AS 'SELECT $1'");
    let (ok, _, err) = call_pqfn(&bin, &conninfo, &oid("public.bump(text)"), Some("x"));
    assert!(!ok && err.contains("public.bump"), "{err}");
    let (ok, _, err) = call_pqfn(&bin, &conninfo, "4000000000", None);
    assert!(!ok && err.contains("warden"), "{err}");
    // psql's large-object commands use fastpath (lo_creat, lo_open, lowrite): refused, and psql says so.
    let file = proxy.state.path().join("blob");
    std::fs::write(&file, b"payload").unwrap();
    let (ok, _, err) = psql(&conninfo, &format!("\\lo_import {}", file.display()), &[]);
    assert!(!ok && err.contains("warden"), "{err}");
    assert_eq!(cluster.sql("orders", "SELECT count(*) FROM pg_largeobject_metadata"), "0");
    // The trail: every call, by name, its arguments redacted.
    let q = proxy.records("pg.query").await;
    let calls: Vec<&Value> = q.iter().filter(|r| r["protocol"] == "function").collect();
    let reverse =
        calls.iter().find(|r| r["text"].as_str().unwrap().contains("pg_catalog.reverse(text)")).unwrap();
    assert_eq!(reverse["parameters"], serde_json::json!({ "count": 1, "redacted": true }), "{reverse}");
    assert!(reverse.get("decision").is_none(), "{reverse}");
    for f in ["nextval(regclass)", "public.bump(text)", "oid 4000000000", "lo_"] {
        let r = calls
            .iter()
            .find(|r| r["text"].as_str().unwrap().contains(f))
            .unwrap_or_else(|| panic!("{f}: {calls:?}"));
        assert_eq!(r["decision"], "refused", "{r}");
        assert_eq!(r["sqlstate"], "25006", "{r}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fastpath_function_calls_run_under_write_and_masks_still_hold() {
    let cluster = Cluster::start();
    let proxy =
        Proxy::start(&cluster, Setup { access: Access::Write, tls: TlsMode::Disable, ..Setup::default() })
            .await;
    let conninfo = proxy.conninfo("orders", "disable");
    // psql's \lo_import and \lo_export: fastpath calls, recorded, and they work.
    let file = proxy.state.path().join("blob");
    std::fs::write(&file, b"payload").unwrap();
    let (ok, _, err) = psql(&conninfo, &format!("\\lo_import {}", file.display()), &[]);
    assert!(ok, "{err}");
    let lo = cluster.sql("orders", "SELECT oid FROM pg_largeobject_metadata");
    let back = proxy.state.path().join("back");
    let (ok, _, err) = psql(&conninfo, &format!("\\lo_export {lo} {}", back.display()), &[]);
    assert!(ok, "{err}");
    assert_eq!(std::fs::read(&back).unwrap(), b"payload");
    let q = proxy.records("pg.query").await;
    for f in ["lo_open(oid, integer)", "lowrite(integer, bytea)", "loread(integer, integer)"] {
        assert!(
            q.iter().any(|r| r["protocol"] == "function" && r["text"].as_str().unwrap().contains(f)),
            "{f}: {q:?}"
        );
    }
    // set_config by fastpath would bypass the SET rules (SET ROLE is refused even under write).
    let Some(bin) = pqfn(proxy.state.path()) else { return };
    let set_config =
        cluster.sql("orders", "SELECT 'pg_catalog.set_config(text,text,boolean)'::regprocedure::oid");
    let (ok, _, err) = call_pqfn(&bin, &conninfo, &set_config, None);
    assert!(!ok && err.contains("set_config"), "{err}");
    // Under masks, only the allow-list runs by fastpath.
    let masked = Proxy::start(
        &cluster,
        Setup {
            access: Access::Write,
            tls: TlsMode::Disable,
            mask: vec!["users.email".into()],
            ..Setup::default()
        },
    )
    .await;
    let (ok, _, err) =
        psql(&masked.conninfo("orders", "disable"), &format!("\\lo_export {lo} {}", back.display()), &[]);
    assert!(!ok && err.contains("warden"), "{err}");
    let refused: Vec<Value> =
        masked.records("pg.query").await.into_iter().filter(|r| r["decision"] == "refused").collect();
    assert!(refused.iter().any(|r| r["sqlstate"] == "42501" && r["protocol"] == "function"), "{refused:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_startup_parameters_are_relayed_unless_they_lift_the_grant() {
    let cluster = Cluster::start();
    let mut proxy = Proxy::start(&cluster, Setup::default()).await;
    let show = "SELECT current_setting('application_name') || '|' || current_setting('DateStyle') || '|' || \
                current_setting('TimeZone') || '|' || current_setting('extra_float_digits') || '|' || \
                current_setting('search_path') || '|' || current_setting('statement_timeout')";
    // psql: application_name, and the rest through PGOPTIONS / PGDATESTYLE / PGTZ.
    let (ok, out, err) = psql(
        &format!("{} application_name=reporting", proxy.conninfo("orders", "require")),
        show,
        &[
            ("PGOPTIONS", "-c search_path=public -c statement_timeout=5s -c extra_float_digits=2"),
            ("PGDATESTYLE", "German"),
            ("PGTZ", "Europe/Paris"),
        ],
    );
    assert!(ok, "{err}");
    assert_eq!(out, "reporting|German, DMY|Europe/Paris|2|public|5s");
    // tokio-postgres: application_name and options.
    let mut config: tokio_postgres::Config = proxy.conninfo("orders", "disable").parse().unwrap();
    config.application_name("tokio-agent").options("-c TimeZone=UTC");
    let (client, conn) = config.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    let row = client
        .query_one("SELECT current_setting('application_name'), current_setting('TimeZone')", &[])
        .await
        .unwrap();
    assert_eq!((row.get::<_, String>(0).as_str(), row.get::<_, String>(1).as_str()), ("tokio-agent", "UTC"));
    drop(client);
    for _ in 0..2 {
        assert_eq!(proxy.next_end().await, End::ClientClosed);
    }
    // Parameters that would lift the grant: refused with FATAL, and the session ends with the reason.
    for (env, value) in [
        ("PGOPTIONS", "-c default_transaction_read_only=off"),
        ("PGOPTIONS", "-c role=agent_rw"),
        ("PGOPTIONS", "--session_authorization=agent_rw"),
        ("PGOPTIONS", "-c standard_conforming_strings=off"),
        ("PGOPTIONS", "-c search_path=pg_temp,public"),
        ("PGCLIENTENCODING", "SJIS"),
    ] {
        let (ok, _, err) = psql(&proxy.conninfo("orders", "disable"), "SELECT 1", &[(env, value)]);
        assert!(!ok && err.contains("FATAL") && err.contains("startup parameter"), "{value}: {err}");
        match proxy.next_end().await {
            End::PolicyChanged { reason } => assert!(reason.contains("agents read orders"), "{reason}"),
            other => panic!("{value}: {other:?}"),
        }
    }
}

#[allow(dead_code, reason = "this test uses the fixture and the writes only")]
mod battery {
    include!(concat!(env!("CARGO_MANIFEST_DIR"), "/src/protocol/postgres/classify/battery.rs"));
}

/// A digest of what a write could change: relations (kind, owner, privileges), functions (source),
/// schemas, roles and their settings, per-database settings, sequences, every user table's rows and the
/// large objects.
fn fingerprint(cluster: &Cluster) -> String {
    let tables = cluster.sql(
        "orders",
        "SELECT string_agg(CASE WHEN c.relkind = 'S' \
             THEN format('SELECT %L || last_value || is_called FROM %s', c.oid::regclass::text, c.oid::regclass) \
             ELSE format('SELECT %L || md5(coalesce(string_agg(t::text, %L ORDER BY t::text), %L)) FROM %s t', \
                         c.oid::regclass::text, ',', '', c.oid::regclass) END, \
           ' UNION ALL ' ORDER BY c.oid::regclass::text) \
         FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE c.relkind IN ('r', 'S', 'm') AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast')",
    );
    let catalog = "SELECT concat_ws(' ', 'rel', c.oid::regclass, c.relkind::text, c.relowner::regrole, c.relacl) \
                     FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                     WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast') \
                   UNION ALL SELECT concat_ws(' ', 'fn', p.oid::regprocedure, md5(p.prosrc), p.proacl) \
                     FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace \
                     WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') \
                   UNION ALL SELECT concat_ws(' ', 'ns', nspname, nspacl) FROM pg_namespace \
                   UNION ALL SELECT concat_ws(' ', 'role', rolname, rolsuper, rolcanlogin, rolconfig) \
                     FROM pg_roles \
                   UNION ALL SELECT concat_ws(' ', 'setting', setdatabase, setrole, setconfig) FROM pg_db_role_setting \
                   UNION ALL SELECT concat_ws(' ', 'lo', count(*)) FROM pg_largeobject_metadata";
    cluster.sql(
        "orders",
        &format!("SELECT md5(string_agg(x, '|' ORDER BY x)) FROM ({catalog} UNION ALL {tables}) f(x)"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_write_battery_through_the_handler_leaves_the_database_unchanged() {
    let cluster = Cluster::start();
    cluster.sql("orders", battery::FIXTURE);
    // The read role may write as far as the database is concerned: only Warden stands in the way.
    cluster.sql(
        "orders",
        "GRANT ALL ON ALL TABLES IN SCHEMA public TO agent_ro; \
         GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO agent_ro; GRANT CREATE ON SCHEMA public TO agent_ro",
    );
    let proxy = Proxy::start(&cluster, Setup::default()).await;
    let before = fingerprint(&cluster);
    let client = proxy.client().await;
    for sql in battery::WRITES {
        let e = client.simple_query(sql).await.expect_err(sql);
        assert!(msg(&e).contains("warden"), "{sql}: refused by the upstream, not by Warden: {e}");
        let e = client.prepare(sql).await.expect_err(sql);
        assert!(msg(&e).contains("warden"), "{sql} (extended): {e}");
        // Whatever state a refusal left, the next statement runs.
        client.batch_execute("ROLLBACK").await.unwrap();
    }
    assert_eq!(fingerprint(&cluster), before, "a write got through");
    // The fingerprint sees a write (so the comparison above could fail).
    cluster.sql("orders", "SELECT nextval('s')");
    assert_ne!(fingerprint(&cluster), before);
}

/// If the audit writer fails, the session ends: the client is told why, and the statement whose record
/// could not be queued never reaches the database. (The writer is stopped, as it stops after a failure it
/// cannot ride out; while it rides one out appends are refused the same way.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_audit_writer_ends_the_session_before_the_next_statement() {
    let cluster = Cluster::start();
    let mut proxy = Proxy::start(&cluster, Setup { access: Access::Write, ..Setup::default() }).await;
    let client = proxy.client().await;
    client.batch_execute("INSERT INTO users VALUES (3, 'cy', 'cy@example.com')").await.unwrap();
    proxy.audit_stop.cancel();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while proxy.audit.stopped_reason().is_none() {
        assert!(tokio::time::Instant::now() < deadline, "the writer never stopped");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let err =
        client.batch_execute("INSERT INTO users VALUES (4, 'dee', 'dee@example.com')").await.unwrap_err();
    // A cut like any other (`57P01`), naming the audit record.
    assert_eq!(code(&err), "57P01", "{}", msg(&err));
    assert!(msg(&err).contains("audit record cannot be written"), "{}", msg(&err));
    assert_eq!(proxy.next_end().await, End::AuditUnavailable);
    assert!(client.is_closed() || client.simple_query("SELECT 1").await.is_err(), "the session goes on");
    assert_eq!(cluster.sql("orders", "SELECT string_agg(id::text, ',' ORDER BY id) FROM users"), "1,2,3");
    // What was recorded before the writer stopped is on disk; the refused statement is not.
    let queries = proxy.records_on_disk("pg.query");
    assert!(queries.iter().any(|q| q["text"].as_str().unwrap().contains("'cy'")), "{queries:?}");
    assert!(!queries.iter().any(|q| q["text"].as_str().unwrap().contains("'dee'")), "{queries:?}");
}

/// A setting Warden relies on, changed where no statement Warden read says so, ends the session with a
/// `FATAL` the client reads and a `pg.setting` record: a view over a function lifting the read-only default
/// under `read` (a read Warden lets through; the database's read-only default is what stood behind it),
/// and a function turning `standard_conforming_strings` off under `write` (Warden would then read string
/// literals otherwise than the server).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_setting_changed_behind_a_statement_ends_the_session() {
    let cluster = Cluster::start();
    cluster.sql(
        "orders",
        "CREATE FUNCTION public.lift() RETURNS text LANGUAGE sql \
           AS $$ SELECT set_config('default_transaction_read_only', 'off', false) $$; \
         CREATE VIEW public.lifted AS SELECT public.lift() AS v; \
         GRANT SELECT ON public.lifted TO agent_ro; \
         CREATE FUNCTION public.scs_off() RETURNS text LANGUAGE sql \
           AS $$ SELECT set_config('standard_conforming_strings', 'off', false) $$",
    );
    let mut proxy = Proxy::start(&cluster, Setup::default()).await;
    let client = proxy.client().await;
    assert_eq!(simple_value(&client, "SELECT 1").await, "1");
    let err = client.simple_query("SELECT v FROM public.lifted").await.unwrap_err();
    assert_eq!(code(&err), "25006", "{}", msg(&err));
    assert!(msg(&err).contains("default_transaction_read_only"), "{}", msg(&err));
    assert!(matches!(proxy.next_end().await, End::UpstreamRefused { .. }));
    let settings = proxy.records("pg.setting").await;
    assert_eq!(settings.len(), 1, "{settings:?}");
    assert_eq!(settings[0]["name"], "default_transaction_read_only");
    assert_eq!(settings[0]["value"], "off");
    assert_eq!(settings[0]["decision"], "ended");
    assert_eq!(proxy.pg.pooled(), 0, "the spoiled connection is not pooled");

    let mut proxy = Proxy::start(&cluster, Setup { access: Access::Write, ..Setup::default() }).await;
    let client = proxy.client().await;
    let err = client.simple_query("SELECT public.scs_off()").await.unwrap_err();
    assert_eq!(code(&err), "42501", "{}", msg(&err));
    assert!(msg(&err).contains("standard_conforming_strings"), "{}", msg(&err));
    assert!(matches!(proxy.next_end().await, End::UpstreamRefused { .. }));
    let settings = proxy.records("pg.setting").await;
    assert_eq!(settings[0]["name"], "standard_conforming_strings", "{settings:?}");
}
