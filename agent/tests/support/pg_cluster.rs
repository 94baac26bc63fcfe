//! A throwaway PostgreSQL 15 cluster for tests: made in a temp dir on a loopback address and a free port,
//! SCRAM in pg_hba, TLS on with a certificate from a CA of its own, roles `agent_ro` (SELECT only) and
//! `agent_rw`, database `orders` with a `users` table; stopped and removed on drop. Shared by the
//! in-process handler tests and the privileged end-to-end test.

#![allow(dead_code, reason = "each test crate uses a different part")]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

pub const PASSWORD: &str = "s3cret-upstream";

pub fn pg_bin(name: &str) -> PathBuf {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL server binaries not found under /usr/lib/postgresql; run scripts/setup.sh")
        .map(|e| e.unwrap().path().join("bin").join(name))
        .filter(|p| p.exists())
        .collect();
    found.sort();
    found.pop().expect("no PostgreSQL server binary; run scripts/setup.sh")
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Runs a PostgreSQL tool, as the `postgres` user when we are root (initdb refuses root).
fn as_pg(bin: &Path) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin);
        c
    } else {
        Command::new(bin)
    }
}

fn ok(c: &mut Command) {
    let out = c.stdout(Stdio::piped()).stderr(Stdio::piped()).output().unwrap();
    assert!(
        out.status.success(),
        "{c:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A throwaway PostgreSQL cluster on a loopback port; stopped and removed on drop.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub ip: std::net::Ipv4Addr,
    pub port: u16,
    /// The CA that issued the server's certificate (for `tls: verify-full`).
    pub ca_pem: PathBuf,
}

impl Cluster {
    pub fn start() -> Self {
        Self::start_on(std::net::Ipv4Addr::LOCALHOST)
    }

    pub fn start_on(ip: std::net::Ipv4Addr) -> Self {
        let dir = tempfile::Builder::new().prefix("warden-pg-").tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        let pwfile = dir.path().join("pw");
        std::fs::write(&pwfile, "postgres-admin\n").unwrap();
        if is_root() {
            ok(Command::new("chown").arg("-R").arg("postgres:postgres").arg(dir.path()));
        }
        ok(as_pg(&pg_bin("initdb"))
            .args(["-A", "scram-sha-256", "--auth-local=trust", "-U", "postgres", "--pwfile"])
            .arg(&pwfile)
            .arg("-D")
            .arg(&data));
        // A server certificate for upstream TLS, from a CA of the test's own.
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(rcgen::DnType::CommonName, "test upstream CA");
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert =
            rcgen::CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into(), ip.to_string()])
                .unwrap()
                .signed_by(&key, &ca, &ca_key)
                .unwrap();
        std::fs::write(data.join("server.crt"), cert.pem()).unwrap();
        std::fs::write(data.join("server.key"), key.serialize_pem()).unwrap();
        let ca_pem = dir.path().join("upstream-ca.pem");
        std::fs::write(&ca_pem, ca.pem()).unwrap();
        std::fs::write(
            data.join("pg_hba.conf"),
            "local all all trust\nhost all all 127.0.0.0/8 scram-sha-256\n",
        )
        .unwrap();
        if is_root() {
            ok(Command::new("chown").arg("-R").arg("postgres:postgres").arg(&data));
        }
        ok(Command::new("chmod").arg("0600").arg(data.join("server.key")));
        let port = free_port();
        ok(as_pg(&pg_bin("pg_ctl"))
            .arg("-D")
            .arg(&data)
            .args(["-w", "-l"])
            .arg(dir.path().join("log"))
            .arg("-o")
            .arg(format!(
                "-p {port} -k {} -c listen_addresses={ip} -c ssl=on -c password_encryption=scram-sha-256",
                dir.path().display()
            ))
            .arg("start"));
        let c = Self { dir, ip, port, ca_pem };
        c.admin(&format!(
            "CREATE ROLE agent_ro LOGIN PASSWORD '{PASSWORD}'; CREATE ROLE agent_rw LOGIN PASSWORD '{PASSWORD}'"
        ));
        c.admin("CREATE DATABASE orders OWNER agent_rw");
        c.sql(
            "orders",
            "CREATE TABLE users (id int PRIMARY KEY, name text, email text); \
             INSERT INTO users VALUES (1, 'ann', 'ann@example.com'), (2, 'bob', 'bob@example.com'); \
             ALTER TABLE users OWNER TO agent_rw; GRANT SELECT ON users TO agent_ro;",
        );
        c
    }

    fn psql_admin(&self, db: &str, sql: &str) -> String {
        let out = Command::new("psql")
            .arg("-h")
            .arg(self.dir.path())
            .args(["-p", &self.port.to_string(), "-U", "postgres", "-d", db, "-XAtqc", sql])
            .output()
            .unwrap();
        assert!(out.status.success(), "admin psql failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    }

    pub fn admin(&self, sql: &str) -> String {
        self.psql_admin("postgres", sql)
    }

    pub fn sql(&self, db: &str, sql: &str) -> String {
        self.psql_admin(db, sql)
    }

    /// Puts `line` first in pg_hba.conf and reloads.
    pub fn hba_first(&self, line: &str) {
        let path = self.dir.path().join("data/pg_hba.conf");
        let old = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, format!("{line}\n{old}")).unwrap();
        assert_eq!(self.admin("SELECT pg_reload_conf()"), "t");
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((self.ip, self.port))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = as_pg(&pg_bin("pg_ctl"))
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-m", "immediate", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}
