//! `cargo xtask demo`: a real PostgreSQL on 127.0.0.5 and 127.0.0.6 (SCRAM-SHA-256 only), a real OpenID
//! provider shaped like Okta, and Warden with an embedded default config and policy naming 127.0.0.5 as a
//! `postgres` target with `access: read`. An agent run with `warden exec` and no password reaches the orders
//! database through Warden, which logs in upstream with SCRAM as the read-only role (allowed); its write is
//! refused with SQLSTATE 25006 (refused); the other address is refused with EPERM (refused); every statement
//! is a `pg.query` record in the verified audit trail (recorded). Everything it starts is stopped and
//! removed at the end.

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use warden_test_support::{IdentityToml, WardenToml};

use crate::{build_warden, nix_is_root, root, run as sh};

/// The role Warden logs in as upstream; the agent never sees its password.
const ROLE: &str = "orders_ro";

/// The embedded default policy: research agents may read the orders database for 15 minutes, logging in
/// upstream as the read-only role whose password is in `password_file`.
fn policy(password_file: &Path) -> String {
    format!(
        "# Warden demo policy (embedded in `cargo xtask demo`)
targets:
  orders-db:
    protocol: postgres
    address: 127.0.0.5:5432
    databases: [orders]
    tls: disable
    credentials: {{ user: {ROLE}, password_file: {pw} }}
rules:
  - name: research agents read orders
    match: {{ groups: [agents-research] }}
    grant:
      - target: orders-db
        access: read
        ttl: 15m
",
        pw = password_file.display()
    )
}

fn config(dir: &Path, issuer: &str, key: &Path) -> String {
    let mut t = WardenToml::in_dir(
        dir,
        dir.join("policy.yaml"),
        "/sys/fs/bpf/warden-demo".into(),
        "warden-demo",
        15001,
    );
    t.comment = "Warden demo config (embedded in `cargo xtask demo`)".into();
    t.allow = vec!["dns".into()];
    t.host = "demo-host".into();
    // A signed checkpoint within a second of the last record, so the verification at the end covers the
    // demo's whole trail with a signature (the default is every 60 s, and at shutdown).
    t.audit_extra = vec!["checkpoint_seconds = 1".into()];
    t.identities.push(IdentityToml::private_key(
        "research-bot",
        issuer,
        "agent-pkjwt-rs",
        key,
        "api://warden",
    ));
    t.render()
}

struct Guard {
    dir: PathBuf,
    warden: PathBuf,
    children: Vec<Child>,
    pg_data: Option<PathBuf>,
    pg_ctl: Option<PathBuf>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        let config = self.dir.join("warden.toml");
        for c in self.children.iter_mut().rev() {
            stop_child(c);
        }
        if config.exists() {
            let _ = Command::new(&self.warden).args(["uninstall", "--config"]).arg(&config).status();
        }
        if let (Some(data), Some(pg_ctl)) = (&self.pg_data, &self.pg_ctl) {
            let _ = Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(pg_ctl)
                .args(["stop", "-m", "fast", "-D"])
                .arg(data)
                .stdout(Stdio::null())
                .status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        // The exec parent cgroup `warden exec` created (its per-task children are already gone).
        if let Some(root) = cgroup2_root() {
            let _ = std::fs::remove_dir(root.join("warden-demo"));
        }
    }
}

/// Stops a child: SIGTERM, then SIGKILL after 10 s.
pub fn stop_child(c: &mut Child) {
    let _ = Command::new("kill").arg("-TERM").arg(c.id().to_string()).status();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline && matches!(c.try_wait(), Ok(None)) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = c.kill();
    let _ = c.wait();
}

/// Starts the Okta-shaped test OpenID provider (its client keys go to `keys`); returns it and its issuer.
pub fn start_idp(keys: &Path) -> anyhow::Result<(Child, String)> {
    let mut idp = Command::new("node")
        .arg(root().join("tests/idp/server.js"))
        .arg("--keys-dir")
        .arg(keys)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("starting node (run scripts/setup.sh)")?;
    let mut out = BufReader::new(idp.stdout.take().context("idp stdout")?);
    let mut line = String::new();
    out.read_line(&mut line)?;
    // Keep draining, so the provider never writes into a closed pipe.
    std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
    let Some(issuer) = line.split_whitespace().find_map(|w| w.strip_prefix("issuer=")) else {
        stop_child(&mut idp);
        bail!("the test IdP did not print its issuer: {line:?}");
    };
    Ok((idp, issuer.to_owned()))
}

/// Starts `warden run --config CONFIG` (output to `log`) and waits up to 30 s for its control socket.
pub fn start_warden(warden: &Path, config: &Path, socket: &Path, log: &Path) -> anyhow::Result<Child> {
    start_warden_with(warden, config, socket, log, &[])
}

/// [`start_warden`] with extra environment variables (e.g. `WARDEN_LOG`).
pub fn start_warden_with(
    warden: &Path,
    config: &Path,
    socket: &Path,
    log: &Path,
    env: &[(&str, &str)],
) -> anyhow::Result<Child> {
    let file = std::fs::File::create(log)?;
    let mut daemon = Command::new(warden)
        .args(["run", "--config"])
        .arg(config)
        .envs(env.iter().copied())
        .stdout(file.try_clone()?)
        .stderr(file)
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::os::unix::net::UnixStream::connect(socket).is_err() {
        if Instant::now() > deadline || !matches!(daemon.try_wait(), Ok(None)) {
            stop_child(&mut daemon);
            bail!("warden did not start:\n{}", std::fs::read_to_string(log).unwrap_or_default());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(daemon)
}

fn pg_bin(name: &str) -> anyhow::Result<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .map(|e| e.path().join("bin").join(name))
        .filter(|p| p.exists())
        .collect();
    found.sort();
    found
        .pop()
        .context("PostgreSQL server binaries not found under /usr/lib/postgresql; run scripts/setup.sh")
}

fn step(msg: &str) {
    println!("\n\x1b[1m== {msg}\x1b[0m");
}

pub fn run_cmd_output(cmd: &mut Command) -> anyhow::Result<(bool, String)> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    Ok((out.status.success(), text))
}

pub fn run() -> anyhow::Result<()> {
    if !nix_is_root() {
        bail!("the demo attaches kernel programs and creates cgroups: run it as root");
    }
    let warden = build_warden(false)?;
    let dir = std::env::temp_dir().join(format!("warden-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut g =
        Guard { dir: dir.clone(), warden: warden.clone(), children: vec![], pg_data: None, pg_ctl: None };

    step("PostgreSQL: a real server on 127.0.0.5:5432 and 127.0.0.6:5432, SCRAM-SHA-256 only");
    let (initdb, pg_ctl) = (pg_bin("initdb")?, pg_bin("pg_ctl")?);
    let data = dir.join("pg");
    std::fs::create_dir_all(&data)?;
    // The superuser's password is never used (it administers over the Unix socket), but initdb wants one
    // for a SCRAM default.
    std::fs::write(dir.join("pg-admin-password"), format!("{}\n", secret()?))?;
    sh(Command::new("chown").arg("-R").arg("postgres:postgres").arg(&dir))?;
    sh(Command::new("chmod").arg("755").arg(&dir))?;
    sh(Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .arg(&initdb)
        .args(["--auth-local=trust", "--auth-host=scram-sha-256", "-U", "postgres", "--pwfile"])
        .arg(dir.join("pg-admin-password"))
        .arg("-D")
        .arg(&data)
        .stdout(Stdio::null()))?;
    g.pg_data = Some(data.clone());
    g.pg_ctl = Some(pg_ctl.clone());
    // Over TCP only the role Warden injects may log in, and only with SCRAM (no md5, no trust).
    std::fs::write(
        data.join("pg_hba.conf"),
        format!("local all postgres trust\nhost orders {ROLE} 127.0.0.0/8 scram-sha-256\n"),
    )?;
    sh(Command::new("chown").arg("postgres:postgres").arg(data.join("pg_hba.conf")))?;
    let opts = format!(
        "-c listen_addresses=127.0.0.5,127.0.0.6 -c port=5432 -c unix_socket_directories={} \
         -c password_encryption=scram-sha-256",
        data.display()
    );
    sh(Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .arg(&pg_ctl)
        .args(["start", "-w", "-o", &opts, "-l"])
        .arg(data.join("log"))
        .arg("-D")
        .arg(&data)
        .stdout(Stdio::null()))?;
    let password = secret()?;
    let admin = |db: &str, sql: &str| {
        sh(Command::new("psql")
            .arg("-h")
            .arg(&data)
            .args(["-p", "5432", "-U", "postgres", "-d", db, "-Xqc", sql])
            .stdout(Stdio::null()))
    };
    admin("postgres", "CREATE DATABASE orders")?;
    admin("postgres", &format!("CREATE ROLE {ROLE} LOGIN PASSWORD '{password}'"))?;
    admin(
        "orders",
        &format!(
            "CREATE TABLE orders (id int, item text); \
             INSERT INTO orders VALUES (1, 'keyboard'), (2, 'monitor'); GRANT SELECT ON orders TO {ROLE}"
        ),
    )?;
    // Warden's copy of the role's password: root-only, like /etc/warden/secrets.
    let secrets = dir.join("secrets");
    std::fs::create_dir_all(&secrets)?;
    sh(Command::new("chmod").arg("700").arg(&secrets))?;
    let password_file = secrets.join("orders-db");
    std::fs::write(&password_file, format!("{password}\n"))?;
    sh(Command::new("chmod").arg("700").arg(&data))?;
    println!(
        "role {ROLE} (SELECT on orders), SCRAM-SHA-256 only; its password is in {}",
        password_file.display()
    );

    step("OpenID provider: npm oidc-provider shaped like an Okta custom authorization server");
    let keys = dir.join("idp-keys");
    let (idp, issuer) = start_idp(&keys)?;
    g.children.push(idp);
    println!("issuer {issuer}");

    step("Warden: embedded default config and policy");
    let policy = policy(&password_file);
    std::fs::write(dir.join("policy.yaml"), &policy)?;
    let config = dir.join("warden.toml");
    std::fs::write(&config, config_text(&dir, &issuer, &keys))?;
    println!("{policy}");
    sh(Command::new(&warden).args(["check", "--config"]).arg(&config))?;
    g.children.push(start_warden(&warden, &config, &dir.join("control.sock"), &dir.join("warden.log"))?);
    println!("warden is running (log: {})", dir.join("warden.log").display());

    // The agent holds no password: none in the environment, no .pgpass, and psql never prompts (`-w`).
    let exec = |host: &str, sql: &str| {
        let mut c = Command::new(&warden);
        c.args(["exec", "--identity", "research-bot", "--task", "demo", "--user", "nobody", "--config"])
            .arg(&config)
            .args(["--", "psql", "-w", "-X", "-h", host, "-U", "research-bot", "-d", "orders"])
            .args(["-v", "VERBOSITY=verbose", "-c", sql])
            .env_remove("PGPASSWORD")
            .env("PGPASSFILE", dir.join("no-such-pgpass"));
        c
    };
    step("Allowed: the agent (uid nobody, in a tagged cgroup, no password) reads orders-db at 127.0.0.5");
    println!("Warden logs in upstream as {ROLE} with SCRAM-SHA-256; the agent never sees the password");
    let (ok, out) =
        run_cmd_output(&mut exec("127.0.0.5", "SELECT current_user, id, item FROM orders ORDER BY id"))?;
    println!("{out}");
    if !ok || !out.contains(ROLE) {
        bail!("the allowed query failed");
    }

    step("Refused: a write under `access: read` (SQLSTATE 25006, before it reaches the database)");
    let (ok, out) = run_cmd_output(&mut exec("127.0.0.5", "INSERT INTO orders VALUES (3, 'stolen')"))?;
    println!("{out}");
    if ok || !out.contains("warden") {
        bail!("the write under read was not refused by Warden");
    }

    step("Refused: the same agent tries the same server at 127.0.0.6, which no policy names (EPERM)");
    let (ok, out) = run_cmd_output(&mut exec("127.0.0.6", "SELECT 1"))?;
    println!("{out}");
    if ok {
        bail!("the refused connection went through");
    }

    step("Recorded: the audit trail (hash-chained, signed checkpoints)");
    // Past the next checkpoint (checkpoint_seconds = 1), so every record shown is under a signature.
    std::thread::sleep(Duration::from_millis(1500));
    let audit_dir = dir.join("state/audit");
    let (_, tail) = run_cmd_output(
        Command::new(&warden)
            .args(["audit", "tail", "-n", "40", "--dir"])
            .arg(&audit_dir)
            .arg("--config")
            .arg(&config),
    )?;
    let queries: Vec<&str> = tail.lines().filter(|l| l.contains("\"event\":\"pg.query\"")).collect();
    println!("The agent's statements, as pg.query records:");
    for q in &queries {
        println!("{q}");
    }
    let refused: Vec<&str> = tail.lines().filter(|l| l.contains("\"event\":\"connect.refused\"")).collect();
    println!("\nThe refused connection to 127.0.0.6:");
    for r in &refused {
        println!("{r}");
    }
    if !queries.iter().any(|q| q.contains("current_user"))
        || !queries.iter().any(|q| q.contains("\"refused\"") && q.contains("25006"))
    {
        bail!("the trail lacks the agent's statements:\n{tail}");
    }
    if refused.is_empty() {
        bail!("the trail lacks the refused connection:\n{tail}");
    }
    let session =
        tail.lines().filter(|l| l.contains("\"session.start\"")).find_map(serde_session).unwrap_or_default();
    if !session.is_empty() {
        println!("\nOne session, whole (`warden audit show {session}`):");
        let (_, show) = run_cmd_output(
            Command::new(&warden)
                .args(["audit", "show", &session, "--dir"])
                .arg(&audit_dir)
                .arg("--config")
                .arg(&config),
        )?;
        println!("{show}");
    }
    let (ok, verify) = run_cmd_output(
        Command::new(&warden).args(["audit", "verify", "--dir"]).arg(&audit_dir).arg("--config").arg(&config),
    )?;
    println!("{verify}");
    if !ok {
        bail!("audit verify failed");
    }
    step("Done: stopping Warden, removing its kernel programs, PostgreSQL and the provider");
    drop(g);
    Ok(())
}

/// A random password (32 hex digits) from the kernel's generator.
fn secret() -> anyhow::Result<String> {
    use std::io::Read as _;
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
    Ok(b.iter().fold(String::with_capacity(32), |mut s, x| {
        use std::fmt::Write as _;
        let _ = write!(s, "{x:02x}");
        s
    }))
}

fn config_text(dir: &Path, issuer: &str, keys: &Path) -> String {
    config(dir, issuer, &keys.join("agent-pkjwt-rs.pem"))
}

/// The `session` field of a JSON line, without a JSON parser.
fn serde_session(line: &str) -> Option<String> {
    let rest = &line[line.find("\"session\":\"")? + 11..];
    Some(rest[..rest.find('"')?].to_owned())
}

/// The cgroup2 mount point, from /proc/self/mountinfo.
fn cgroup2_root() -> Option<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    text.lines().find_map(|l| {
        let (pre, post) = l.split_once(" - ")?;
        if post.starts_with("cgroup2 ") { pre.split(' ').nth(4).map(PathBuf::from) } else { None }
    })
}
