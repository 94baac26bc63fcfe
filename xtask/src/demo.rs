//! `cargo xtask demo`: a real PostgreSQL on 127.0.0.5 and 127.0.0.6, a real OpenID provider shaped like
//! Okta, and Warden with an embedded default config and policy. An agent run with `warden exec` reaches the
//! orders database through Warden (allowed), is refused the other address (refused), and both show up
//! in the verified audit record (recorded). Everything it starts is stopped and removed at the end.

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use warden_test_support::{IdentityToml, WardenToml};

use crate::{build_warden, nix_is_root, root, run as sh};

/// The embedded default policy: research agents may reach the orders database for 15 minutes.
const POLICY: &str = r"# Warden demo policy (embedded in `cargo xtask demo`)
targets:
  orders-db:
    protocol: tcp
    address: 127.0.0.5:5432
rules:
  - name: research agents reach orders-db
    match: { groups: [agents-research] }
    grant:
      - target: orders-db
        access: connect
        ttl: 15m
";

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

    step("PostgreSQL: a real server on 127.0.0.5:5432 and 127.0.0.6:5432");
    let (initdb, pg_ctl) = (pg_bin("initdb")?, pg_bin("pg_ctl")?);
    let data = dir.join("pg");
    std::fs::create_dir_all(&data)?;
    sh(Command::new("chown").arg("-R").arg("postgres:postgres").arg(&dir))?;
    sh(Command::new("chmod").arg("755").arg(&dir))?;
    sh(Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .arg(&initdb)
        .args(["-A", "trust", "-U", "postgres", "-D"])
        .arg(&data)
        .stdout(Stdio::null()))?;
    g.pg_data = Some(data.clone());
    g.pg_ctl = Some(pg_ctl.clone());
    let opts = format!(
        "-c listen_addresses=127.0.0.5,127.0.0.6 -c port=5432 -c unix_socket_directories={}",
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
    let sql = "CREATE DATABASE orders;";
    sh(Command::new("psql").args(["-h", "127.0.0.5", "-U", "postgres", "-qc", sql]).stdout(Stdio::null()))?;
    sh(Command::new("psql")
        .args(["-h", "127.0.0.5", "-U", "postgres", "-d", "orders", "-qc"])
        .arg("CREATE TABLE orders (id int, item text); INSERT INTO orders VALUES (1, 'keyboard'), (2, 'monitor');")
        .stdout(Stdio::null()))?;
    sh(Command::new("chmod").arg("700").arg(&data))?;

    step("OpenID provider: npm oidc-provider shaped like an Okta custom authorization server");
    let keys = dir.join("idp-keys");
    let (idp, issuer) = start_idp(&keys)?;
    g.children.push(idp);
    println!("issuer {issuer}");

    step("Warden: embedded default config and policy");
    std::fs::write(dir.join("policy.yaml"), POLICY)?;
    let config = dir.join("warden.toml");
    std::fs::write(&config, config_text(&dir, &issuer, &keys))?;
    println!("{POLICY}");
    sh(Command::new(&warden).args(["check", "--config"]).arg(&config))?;
    g.children.push(start_warden(&warden, &config, &dir.join("control.sock"), &dir.join("warden.log"))?);
    println!("warden is running (log: {})", dir.join("warden.log").display());

    let exec = |host: &str| {
        let mut c = Command::new(&warden);
        c.args(["exec", "--identity", "research-bot", "--task", "demo", "--user", "nobody", "--config"])
            .arg(&config)
            .args([
                "--",
                "psql",
                "-h",
                host,
                "-U",
                "postgres",
                "-d",
                "orders",
                "-c",
                "SELECT id, item FROM orders ORDER BY id",
            ]);
        c
    };
    step("Allowed: the agent (uid nobody, in a tagged cgroup) queries orders-db at 127.0.0.5 through Warden");
    let (ok, out) = run_cmd_output(&mut exec("127.0.0.5"))?;
    println!("{out}");
    if !ok {
        bail!("the allowed query failed");
    }

    step("Refused: the same agent tries the same server at 127.0.0.6, which no policy names");
    let (ok, out) = run_cmd_output(&mut exec("127.0.0.6"))?;
    println!("{out}");
    if ok {
        bail!("the refused connection went through");
    }

    step("Recorded: the audit trail (hash-chained, signed checkpoints)");
    std::thread::sleep(Duration::from_millis(300));
    let audit_dir = dir.join("state/audit");
    let (_, tail) = run_cmd_output(
        Command::new(&warden)
            .args(["audit", "tail", "-n", "12", "--dir"])
            .arg(&audit_dir)
            .arg("--config")
            .arg(&config),
    )?;
    println!("{tail}");
    let session =
        tail.lines().filter(|l| l.contains("\"session.start\"")).find_map(serde_session).unwrap_or_default();
    if !session.is_empty() {
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
