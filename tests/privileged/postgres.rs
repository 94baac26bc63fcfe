//! PostgreSQL through the whole data path: a tagged cgroup's `psql` against the database's real address,
//! through the kernel redirect, the Okta-shaped identity, the policy and the PostgreSQL handler, to a real
//! PostgreSQL 15 with SCRAM and TLS. The agent holds no password; its statements are in the trail; a write
//! under `read` is refused and the database is unchanged; a masked column never shows.

use std::process::Output;

use crate::harness::{IdentitySpec, Idp, Warden, privileged};

#[path = "../../agent/tests/support/pg_cluster.rs"]
mod pg_cluster;
use pg_cluster::{Cluster, PASSWORD};

fn policy(cluster: &Cluster, password_file: &std::path::Path) -> String {
    format!(
        "targets:
  orders-db:
    protocol: postgres
    address: \"{addr}\"
    databases: [orders]
    tls: require
    credentials:
      read: {{ user: agent_ro, password_file: \"{pw}\" }}
      write: {{ user: agent_rw, password_file: \"{pw}\" }}
rules:
  - name: research reads orders
    match: {{ groups: [agents-research] }}
    grant:
      - target: orders-db
        access: read
        ttl: 5m
        mask: [users.email]
",
        addr = cluster.addr(),
        pw = password_file.display(),
    )
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        String::from_utf8_lossy(&out.stderr).trim().to_owned(),
    )
}

#[test]
fn a_tagged_psql_gets_injected_credentials_read_only_and_masked() {
    if !privileged("a_tagged_psql_gets_injected_credentials_read_only_and_masked") {
        return;
    }
    let cluster = Cluster::start_on("127.0.0.6".parse().unwrap());
    let idp = Idp::start();
    let secrets = tempfile::tempdir().unwrap();
    let pw = secrets.path().join("orders-db");
    std::fs::write(&pw, format!("{PASSWORD}\n")).unwrap();
    let w = Warden::builder("pg")
        .policy(&policy(&cluster, &pw))
        .identity(IdentitySpec::pkjwt(&idp, "bot"), &idp.issuer)
        .start();
    let cg = w.cgroup("agent");
    w.tag(&cg, "bot");
    let conninfo =
        format!("host={} port={} dbname=orders user=agent sslmode=require", cluster.ip, cluster.port);
    let psql = |sql: &str| {
        let out = cg
            .command(
                "psql",
                &[&conninfo, "-XAtqw", "-v", "ON_ERROR_STOP=1", "-v", "VERBOSITY=verbose", "-c", sql],
            )
            .env_remove("PGPASSWORD")
            .output()
            .unwrap();
        (out.status.success(), text(&out))
    };
    // Credentials injected: the agent gave no password and is the read role upstream.
    let (ok, (out, err)) = psql("SELECT current_user, count(*) FROM users GROUP BY 1");
    assert!(ok, "{err}");
    assert_eq!(out, "agent_ro|2");
    // Masked.
    let (ok, (out, err)) = psql("SELECT email FROM users ORDER BY id");
    assert!(ok, "{err}");
    assert!(!out.contains("example.com"), "{out}");
    // A write under read: refused with 25006, and the database unchanged.
    let (ok, (_, err)) = psql("DELETE FROM users");
    assert!(!ok && err.contains("25006"), "{err}");
    assert_eq!(cluster.sql("orders", "SELECT count(*) FROM users"), "2");
    // Another database: refused.
    let other = conninfo.replace("dbname=orders", "dbname=postgres");
    let out = cg.command("psql", &[&other, "-XAtqw", "-c", "select 1"]).output().unwrap();
    assert!(!out.status.success());
    // The trail: who ran what, from which cgroup.
    let q = w.wait_record("pg.query", |r| {
        r["event"] == "pg.query" && r["text"].as_str().is_some_and(|t| t.contains("current_user"))
    });
    assert_eq!(q["cgroup"], cg.rel(), "{q}");
    assert_eq!(q["identity"]["client_id"], "agent-pkjwt-rs", "{q}");
    // The user and database the client asked for are recorded with the session (never trusted: the
    // upstream login is the grant's).
    let start =
        w.wait_record("session.start", |r| r["event"] == "session.start" && r["session"] == q["session"]);
    assert_eq!(start["hello"]["user"], "agent", "{start}");
    assert_eq!(start["hello"]["database"], "orders", "{start}");
    let refused =
        w.wait_record("refused pg.query", |r| r["event"] == "pg.query" && r["decision"] == "refused");
    assert_eq!(refused["text"], "DELETE FROM users");
    let masked = w.wait_record("masked pg.query", |r| r["event"] == "pg.query" && r["masks"].is_array());
    assert_eq!(masked["masks"][0], "users.email");
    let audit = std::fs::read_dir(w.audit_dir())
        .unwrap()
        .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap_or_default())
        .collect::<String>();
    assert!(!audit.contains(PASSWORD), "the password is never recorded");
}

#[test]
fn a_grant_expiring_mid_query_ends_the_postgres_session() {
    if !privileged("a_grant_expiring_mid_query_ends_the_postgres_session") {
        return;
    }
    let cluster = Cluster::start_on("127.0.0.6".parse().unwrap());
    let idp = Idp::start();
    let secrets = tempfile::tempdir().unwrap();
    let pw = secrets.path().join("orders-db");
    std::fs::write(&pw, format!("{PASSWORD}\n")).unwrap();
    let w = Warden::builder("pgexp")
        .policy(&policy(&cluster, &pw).replace("ttl: 5m", "ttl: 4s"))
        .identity(IdentitySpec::pkjwt(&idp, "bot"), &idp.issuer)
        .start();
    let cg = w.cgroup("agent");
    w.tag(&cg, "bot");
    let conninfo =
        format!("host={} port={} dbname=orders user=agent sslmode=require", cluster.ip, cluster.port);
    let began = std::time::Instant::now();
    let out = cg
        .command("psql", &[&conninfo, "-XAtqw", "-c", "SELECT pg_sleep(60)"])
        .env_remove("PGPASSWORD")
        .output()
        .unwrap();
    let (_, err) = text(&out);
    assert!(!out.status.success(), "the query outlived its grant");
    assert!(began.elapsed() < std::time::Duration::from_secs(30), "cut at expiry, not after the query");
    assert!(err.contains("grant expired"), "psql is told why: {err}");
    let end = w.wait_record("session.end", |r| r["event"] == "session.end");
    assert_eq!(end["reason"], "grant_expired", "{end}");
    // The upstream query does not run on.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while cluster.admin("SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(60)'") != "0" {
        assert!(std::time::Instant::now() < deadline, "the upstream query still runs");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}
