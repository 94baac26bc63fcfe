//! `cargo xtask bench postgres`: pgbench side by side, in one run, direct to a PostgreSQL 15 cluster,
//! through Warden (a tagged cgroup; Warden injects SCRAM over TLS upstream and records every statement)
//! and through Debian's pgbouncer in session mode (TLS upstream too): `-S` with 1, 8 and 32 clients,
//! `-S -C` (a new connection per transaction) and the default TPC-B-like mix under `access: write`.
//! Client legs to Warden and pgbouncer are plain; the direct client uses TLS (its only leg).
//!
//! Besides transactions per second, each run reports the CPU time the middle process (Warden's daemon,
//! pgbouncer) spent per transaction (utime + stime from `/proc/PID/stat`, the measure that decides the
//! ratios on a small machine where pgbench, PostgreSQL and the middle share the cores) and the upstream
//! logins it made (`pg_stat_database.sessions`). The connection set-up breakdown comes from the daemon's
//! `pg_setup` debug lines (one per session: agent TLS, startup, gate, pool checkout, durable
//! `session.start` wait, upstream login, greeting) and pgbench's average connection time.
//!
//! First, before any pgbench run (so the allocator has no freed session memory to reuse), the daemon's
//! resident memory per idle session: after one warm-up session, [`IDLE_SESSIONS`] clients in the tagged
//! cgroup finish their startup and stay idle while the daemon's RSS is read before and after.
//!
//! `cargo xtask bench postgres [--seconds N | --transactions N] [--warden PATH] [--no-write] [--only TEXT]
//! [--around CMD]` (`--only`: the cases whose name contains TEXT, e.g. `"-S, 8"`, or `idle` for the idle
//! sessions alone, for profiling one case; the section is then printed, not written. `--transactions`:
//! pgbench `-t N` per client instead of `-T`, for counts that do not depend on time. `--around`: runs
//! `CMD before PID` and `CMD after PID` around every run through Warden, with the daemon's PID, e.g. to
//! zero and dump a `valgrind --tool=callgrind` daemon started by a `--warden` wrapper).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{Context as _, bail, ensure};

use crate::demo::{run_cmd_output, start_idp, start_warden_with, stop_child};
use crate::{build_warden, nix_is_root, root};

const PG_IP: &str = "127.0.0.6";
const PASSWORD: &str = "bench-secret";

struct Guard {
    dir: PathBuf,
    children: Vec<Child>,
    pg_data: Option<PathBuf>,
    cgroup: Option<PathBuf>,
    warden: Option<(PathBuf, PathBuf)>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        for c in self.children.iter_mut().rev() {
            stop_child(c);
        }
        if let Some((warden, config)) = &self.warden {
            let _ = Command::new(warden).args(["uninstall", "--config"]).arg(config).output();
        }
        if let Some(cg) = &self.cgroup {
            let _ = std::fs::remove_dir(cg);
            if let Some(p) = cg.parent() {
                let _ = std::fs::remove_dir(p);
            }
        }
        if let Some(data) = &self.pg_data {
            let _ =
                as_postgres(&pg_bin("pg_ctl")).arg("-D").arg(data).args(["-m", "immediate", "stop"]).output();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn pg_bin(name: &str) -> PathBuf {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| {
            d.filter_map(Result::ok).map(|e| e.path().join("bin").join(name)).filter(|p| p.exists()).collect()
        })
        .unwrap_or_default();
    found.sort();
    found.pop().unwrap_or_else(|| PathBuf::from(name))
}

fn as_postgres(bin: &Path) -> Command {
    let mut c = Command::new("runuser");
    c.args(["-u", "postgres", "--"]).arg(bin);
    c
}

fn sh(cmd: &mut Command) -> anyhow::Result<String> {
    let (ok, out) = run_cmd_output(cmd)?;
    ensure!(ok, "{cmd:?} failed:\n{out}");
    Ok(out)
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

pub fn run(args: &[String]) -> anyhow::Result<()> {
    let mut seconds = 10u32;
    let mut warden = None;
    let mut write = true;
    let mut only = None;
    let mut transactions = None;
    let mut around = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--seconds" => seconds = it.next().context("--seconds N")?.parse()?,
            "--warden" => warden = Some(PathBuf::from(it.next().context("--warden PATH")?)),
            "--no-write" => write = false,
            "--transactions" => {
                transactions = Some(it.next().context("--transactions N")?.parse::<u32>()?);
            }
            "--around" => around = Some(it.next().context("--around CMD")?.clone()),
            "--only" => {
                only = Some(it.next().context("--only TEXT")?.clone());
                write = false;
            }
            other => bail!(
                "unknown argument {other}; usage: cargo xtask bench postgres [--seconds N | --transactions N] [--warden PATH] [--no-write] [--only TEXT] [--around CMD]"
            ),
        }
    }
    ensure!(nix_is_root(), "the benchmark attaches kernel programs and creates cgroups: run it as root");
    let warden = match warden {
        Some(w) => w,
        None => build_warden(true)?,
    };
    let pgbouncer = Path::new("/usr/sbin/pgbouncer");
    ensure!(pgbouncer.exists(), "pgbouncer is not installed: run scripts/setup.sh");
    let tag = format!("warden-bench-pg-{}", std::process::id());
    let dir = std::env::temp_dir().join(&tag);
    std::fs::create_dir_all(&dir)?;
    let mut g = Guard { dir: dir.clone(), children: vec![], pg_data: None, cgroup: None, warden: None };

    // PostgreSQL with SCRAM and TLS.
    let data = dir.join("data");
    std::fs::write(dir.join("pw"), "admin\n")?;
    sh(Command::new("chown").arg("-R").arg("postgres:postgres").arg(&dir))?;
    sh(as_postgres(&pg_bin("initdb"))
        .args(["-A", "scram-sha-256", "--auth-local=trust", "-U", "postgres", "--pwfile"])
        .arg(dir.join("pw"))
        .arg("-D")
        .arg(&data))?;
    sh(Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
        ])
        .args(["-subj", "/CN=localhost", "-keyout"])
        .arg(data.join("server.key"))
        .arg("-out")
        .arg(data.join("server.crt")))?;
    std::fs::write(
        data.join("pg_hba.conf"),
        "local all all trust\nhost all all 127.0.0.0/8 scram-sha-256\n",
    )?;
    sh(Command::new("chown").arg("-R").arg("postgres:postgres").arg(&data))?;
    sh(Command::new("chmod").arg("0600").arg(data.join("server.key")))?;
    let pg_port = free_port()?;
    sh(as_postgres(&pg_bin("pg_ctl"))
        .arg("-D")
        .arg(&data)
        .args(["-w", "-l"])
        .arg(dir.join("pg.log"))
        .arg("-o")
        .arg(format!(
            "-p {pg_port} -k {} -c listen_addresses={PG_IP} -c ssl=on -c max_connections=200 -c fsync=off",
            dir.display()
        ))
        .arg("start"))?;
    g.pg_data = Some(data.clone());
    let admin = |sql: &str| -> anyhow::Result<String> {
        sh(Command::new("psql").arg("-h").arg(&dir).args([
            "-p",
            &pg_port.to_string(),
            "-U",
            "postgres",
            "-XAtqc",
            sql,
        ]))
    };
    admin(&format!("CREATE ROLE bench LOGIN PASSWORD '{PASSWORD}'"))?;
    admin("CREATE DATABASE bench OWNER bench")?;
    sh(Command::new(pg_bin("pgbench")).arg("-h").arg(&dir).args([
        "-p",
        &pg_port.to_string(),
        "-U",
        "bench",
        "-i",
        "-q",
        "-s",
        "4",
        "bench",
    ]))?;

    // pgbouncer, session mode, TLS upstream; clients need no password (as with Warden).
    let bouncer_port = free_port()?;
    std::fs::write(dir.join("users.txt"), "\"bench\" \"unused\"\n")?;
    std::fs::write(
        dir.join("pgbouncer.ini"),
        format!(
            "[databases]\nbench = host={PG_IP} port={pg_port} dbname=bench user=bench password={PASSWORD}\n\n[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {bouncer_port}\nunix_socket_dir =\nauth_type = trust\nauth_file = {}\npool_mode = session\nmax_client_conn = 500\ndefault_pool_size = 40\nserver_tls_sslmode = require\nlogfile = {}\npidfile = {}\n",
            dir.join("users.txt").display(),
            dir.join("pgbouncer.log").display(),
            dir.join("pgbouncer.pid").display()
        ),
    )?;
    sh(Command::new("chown").arg("-R").arg("postgres:postgres").arg(&dir))?;
    let bouncer = as_postgres(pgbouncer)
        .arg(dir.join("pgbouncer.ini"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    g.children.push(bouncer);

    // Warden with a postgres target under `access: write`.
    let keys = dir.join("idp-keys");
    let (idp, issuer) = start_idp(&keys)?;
    g.children.push(idp);
    let state = dir.join("state");
    std::fs::create_dir_all(&state)?;
    let pw = dir.join("bench-password");
    std::fs::write(&pw, format!("{PASSWORD}\n"))?;
    std::fs::write(
        dir.join("policy.yaml"),
        format!(
            "targets:\n  bench-db:\n    protocol: postgres\n    address: \"{PG_IP}:{pg_port}\"\n    databases: [bench]\n    tls: require\n    credentials: {{ user: bench, password_file: \"{}\" }}\nrules:\n  - name: bench writes\n    match: {{ groups: [agents-research] }}\n    grant:\n      - target: bench-db\n        access: write\n        ttl: 60m\n",
            pw.display()
        ),
    )?;
    let proxy_port = free_port()?;
    let config = dir.join("warden.toml");
    std::fs::write(
        &config,
        format!(
            "[agent]\nstate_dir = \"{state}\"\nbpffs_dir = \"/sys/fs/bpf/{tag}\"\nexec_parent = \"{tag}\"\nproxy_listen = [\"127.0.0.1:{proxy_port}\", \"[::1]:{proxy_port}\"]\ncontrol_socket = \"{dir}/control.sock\"\npolicies = \"{dir}/policy.yaml\"\nallow = []\nhost = \"bench-host\"\n\n[identity.bench]\nissuer = \"{issuer}\"\nclient_id = \"agent-pkjwt-rs\"\nprivate_key_file = \"{key}\"\nscopes = [\"warden.connect\"]\naudience = \"api://warden\"\n\n[audit]\ndir = \"{state}/audit\"\n",
            state = state.display(),
            dir = dir.display(),
            key = keys.join("agent-pkjwt-rs.pem").display()
        ),
    )?;
    let daemon = start_warden_with(
        &warden,
        &config,
        &dir.join("control.sock"),
        &dir.join("warden.log"),
        &[("WARDEN_LOG", "info,pg_setup=debug"), ("WARDEN_LOG_FORMAT", "plain"), ("NO_COLOR", "1")],
    )?;
    let daemon_pid = daemon.id();
    g.children.push(daemon);
    let bouncer_pid = read_pid(&dir.join("pgbouncer.pid"))?;
    g.warden = Some((warden.clone(), config.clone()));
    let cg = crate::bench::cgroup_root()?.join(&tag).join("agent");
    std::fs::create_dir_all(&cg)?;
    g.cgroup = Some(cg.clone());
    sh(Command::new(&warden).arg("tag").arg(&cg).args(["--identity", "bench", "--config"]).arg(&config))?;

    let pg_addr: SocketAddr = format!("{PG_IP}:{pg_port}").parse()?;
    let peers: [(&str, String, Option<&Path>); 3] = [
        (
            "direct",
            format!(
                "host={PG_IP} port={pg_port} dbname=bench user=bench sslmode=require password={PASSWORD}"
            ),
            None,
        ),
        (
            "warden",
            format!("host={PG_IP} port={pg_port} dbname=bench user=agent sslmode=disable"),
            Some(cg.as_path()),
        ),
        (
            "pgbouncer",
            format!("host=127.0.0.1 port={bouncer_port} dbname=bench user=bench sslmode=disable"),
            None,
        ),
    ];
    let cases: [(&str, &[&str]); 5] = [
        ("-S, 1 client", &["-S", "-c", "1", "-j", "1"]),
        ("-S, 8 clients", &["-S", "-c", "8", "-j", "2"]),
        ("-S, 32 clients", &["-S", "-c", "32", "-j", "2"]),
        ("-S -C, 8 clients (a connection per transaction)", &["-S", "-C", "-c", "8", "-j", "2"]),
        ("TPC-B-like, 8 clients", &["-c", "8", "-j", "2"]),
    ];
    let sessions = || -> anyhow::Result<u64> {
        let out = admin("SELECT sessions FROM pg_stat_database WHERE datname = 'bench'")?;
        out.trim().parse().with_context(|| format!("pg_stat_database.sessions: {out:?}"))
    };
    let middle = [None, Some(daemon_pid), Some(bouncer_pid)];
    let load_before = loadavg();
    // Cold: before any pgbench session has come and gone (see the module docs).
    let idle = if only.as_deref().is_none_or(|o| "idle sessions".contains(o)) {
        let (_, _, tagged) = &peers[1];
        idle_memory(daemon_pid, tagged.context("the Warden peer is tagged")?, pg_addr)?
    } else {
        String::new()
    };
    let length = match transactions {
        Some(n) => ["-t".to_owned(), n.to_string()],
        None => ["-T".to_owned(), seconds.to_string()],
    };
    let hook = |when: &str, pid: u32| -> anyhow::Result<()> {
        if let Some(cmd) = &around {
            sh(Command::new("sh").arg("-c").arg(format!("{cmd} {when} {pid}")))?;
        }
        Ok(())
    };
    let mut table = String::new();
    table.push_str("| case | direct tps | Warden tps | pgbouncer tps | Warden / direct | Warden / pgbouncer | CPU µs per transaction, Warden / pgbouncer | upstream logins, Warden / pgbouncer |\n|---|---|---|---|---|---|---|---|\n");
    let mut connection_ms = Vec::new();
    for (name, flags) in cases {
        if only.as_deref().is_some_and(|o| !name.contains(o)) {
            continue;
        }
        let mut tps = Vec::new();
        let mut cpu = Vec::new();
        let mut logins = Vec::new();
        for ((peer, conninfo, tagged), pid) in peers.iter().zip(middle) {
            let cpu_before = pid.map(cpu_ticks).transpose()?;
            let sessions_before = sessions()?;
            let mut cmd = match tagged {
                Some(cg) => {
                    let mut c = Command::new("sh");
                    c.arg("-c")
                        .arg("echo $$ > \"$0\"/cgroup.procs && exec \"$@\"")
                        .arg(cg)
                        .arg(pg_bin("pgbench"));
                    c
                }
                None => Command::new(pg_bin("pgbench")),
            };
            cmd.args(flags).arg("-n").args(&length).arg(conninfo).env_remove("PGPASSWORD");
            if *peer == "warden" {
                hook("before", daemon_pid)?;
            }
            // pgbench's exit status is non-zero when a client aborted; the tps line says how far it got.
            let (_, out) = run_cmd_output(&mut cmd).with_context(|| format!("pgbench {name} via {peer}"))?;
            if *peer == "warden" {
                hook("after", daemon_pid)?;
            }
            let t = out
                .lines()
                .find(|l| l.starts_with("tps = "))
                .and_then(|l| l.split_whitespace().nth(2))
                .and_then(|v| v.parse::<f64>().ok())
                .with_context(|| {
                    let log = std::fs::read_to_string(dir.join("warden.log")).unwrap_or_default();
                    let tail: Vec<&str> = log.lines().rev().take(30).collect();
                    format!(
                        "no tps in pgbench's output via {peer}:\n{out}\nwarden log (newest first):\n{}",
                        tail.join("\n")
                    )
                })?;
            let opened = sessions()?.saturating_sub(sessions_before);
            let transactions = out
                .lines()
                .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
                .and_then(|v| v.split('/').next())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(0);
            let per_tx = match (pid, cpu_before) {
                (Some(pid), Some(before)) if transactions > 0 => {
                    let ticks = cpu_ticks(pid)?.saturating_sub(before);
                    Some(ratio(ticks, transactions) * 1e6 / clock_ticks())
                }
                _ => None,
            };
            if let Some(ms) = out
                .lines()
                .find_map(|l| l.strip_prefix("average connection time = "))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse::<f64>().ok())
            {
                connection_ms.push((format!("{name} via {peer}"), ms));
            }
            let cpu_text = per_tx.map_or(String::new(), |c| format!(", {c:.0} µs CPU per transaction"));
            println!("{name} via {peer}: {t:.0} tps{cpu_text}, {opened} upstream logins");
            tps.push(t);
            cpu.push(per_tx);
            logins.push(opened);
        }
        let us = |c: Option<f64>| c.map_or("-".to_owned(), |c| format!("{c:.0}"));
        let _ = writeln!(
            table,
            "| {name} | {:.0} | {:.0} | {:.0} | {:.2} | {:.2} | {} / {} | {} / {} |",
            tps[0],
            tps[1],
            tps[2],
            tps[1] / tps[0],
            tps[1] / tps[2],
            us(cpu[1]),
            us(cpu[2]),
            logins[1],
            logins[2]
        );
    }
    // The agent leg with TLS, for the set-up breakdown: one client, a connection per transaction.
    if only.is_none() {
        let (_, conninfo, tagged) = &peers[1];
        let conninfo = conninfo.replace("sslmode=disable", "sslmode=require");
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg("echo $$ > \"$0\"/cgroup.procs && exec \"$@\"")
            .arg((*tagged).context("the Warden peer is tagged")?)
            .arg(pg_bin("pgbench"))
            .args(["-S", "-C", "-c", "1", "-j", "1", "-n", "-T", &seconds.to_string(), &conninfo])
            .env_remove("PGPASSWORD");
        let (_, out) = run_cmd_output(&mut cmd).context("pgbench -C with TLS via warden")?;
        if let Some(ms) = out
            .lines()
            .find_map(|l| l.strip_prefix("average connection time = "))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<f64>().ok())
        {
            connection_ms.push(("-S -C, 1 client, TLS to Warden, via warden".into(), ms));
        }
    }
    let load_after = loadavg();
    let breakdown = setup_breakdown(&std::fs::read_to_string(dir.join("warden.log")).unwrap_or_default());
    let mut connections = String::from("| run | average connection time (pgbench) |\n|---|---|\n");
    for (run, ms) in &connection_ms {
        let _ = writeln!(connections, "| {run} | {ms:.3} ms |");
    }
    let queries = std::fs::read_dir(state.join("audit")).map_or(0, |d| {
        d.filter_map(Result::ok)
            .filter_map(|e| std::fs::read_to_string(e.path()).ok())
            .map(|t| t.matches("\"event\":\"pg.query\"").count())
            .sum::<usize>()
    });
    let pg_version = sh(Command::new(pg_bin("postgres")).arg("--version")).unwrap_or_default();
    let bouncer_version = sh(Command::new(pgbouncer).arg("--version")).unwrap_or_default();
    let section = format!(
        "## PostgreSQL\n\n`cargo xtask bench postgres` ({per_run} per run; {cpus} CPUs; load average {load_before} before, {load_after} after; {pg}; {bouncer}; upstream TLS and SCRAM for Warden and pgbouncer; Warden recorded {queries} `pg.query` records; target {pg_addr}).\n\n{table}\n### Connection set-up\n\npgbench's average connection time (client side: connect to first ReadyForQuery):\n\n{connections}\nInside the daemon, per session (median and 90th percentile in µs, from the `pg_setup` debug lines; `start` is when the handler got the connection, after the proxy's accept and origin lookup):\n\n{breakdown}\n### Idle sessions\n\n{idle}",
        per_run = transactions.map_or(format!("{seconds} s"), |n| format!("{n} transactions per client")),
        cpus = std::thread::available_parallelism().map_or(0, std::num::NonZero::get),
        pg = pg_version.trim(),
        bouncer = bouncer_version.lines().next().unwrap_or("pgbouncer").trim(),
    );
    println!("\n{section}");
    drop(g);
    if write {
        crate::bench::write_named_section(&root().join("BENCHMARKS.md"), "## PostgreSQL", &section)?;
    }
    Ok(())
}

/// Idle sessions held open through Warden for the memory measure (each has its own upstream connection:
/// below the cluster's `max_connections` with pgbouncer's pool beside them).
const IDLE_SESSIONS: usize = 100;

/// A client of `IDLE_SESSIONS` sessions: each sends a startup message and waits for `ReadyForQuery`; then
/// it says `ready` and holds them until its stdin closes.
const IDLE_CLIENT: &str = r"
import socket, struct, sys
n, host, port = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
body = struct.pack('!i', 196608) + b'user\0agent\0database\0bench\0\0'
socks = []
for _ in range(n):
    s = socket.create_connection((host, port))
    s.sendall(struct.pack('!i', len(body) + 4) + body)
    seen = b''
    while b'Z\0\0\0\x05' not in seen:
        chunk = s.recv(65536)
        if not chunk:
            sys.exit('closed during startup')
        seen += chunk
    socks.append(s)
print('ready', flush=True)
sys.stdin.read()
";

/// `n` sessions of the tagged cgroup, each through its startup, held open until the returned client's
/// stdin closes.
fn idle_client(n: usize, cg: &Path, pg: SocketAddr) -> anyhow::Result<Child> {
    use std::io::BufRead as _;
    let mut child = Command::new("sh")
        .arg("-c")
        .arg("echo $$ > \"$0\"/cgroup.procs && exec \"$@\"")
        .arg(cg)
        .args(["python3", "-c", IDLE_CLIENT, &n.to_string(), &pg.ip().to_string()])
        .arg(pg.port().to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("python3 (the idle sessions' client)")?;
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().context("the client's stdout")?).read_line(&mut line)?;
    if line.trim() != "ready" {
        stop_child(&mut child);
        bail!("the idle sessions' client failed: {line:?}");
    }
    Ok(child)
}

/// The daemon's resident memory per idle PostgreSQL session, cold: after one warm-up session (the first
/// session's one-time costs: TLS configuration, the classifier, the pool's task), RSS before and while
/// `IDLE_SESSIONS` clients of the tagged cgroup sit idle after their startup. Run before any other session.
fn idle_memory(daemon: u32, cg: &Path, pg: SocketAddr) -> anyhow::Result<String> {
    let mut warm = idle_client(1, cg, pg)?;
    drop(warm.stdin.take());
    let _ = warm.wait();
    std::thread::sleep(std::time::Duration::from_millis(500));
    let before = rss_kib(daemon)?;
    let mut child = idle_client(IDLE_SESSIONS, cg, pg)?;
    std::thread::sleep(std::time::Duration::from_secs(1));
    let during = rss_kib(daemon)?;
    drop(child.stdin.take());
    let _ = child.wait();
    let per = ratio(during.saturating_sub(before) * 1024, IDLE_SESSIONS as u64);
    println!("{IDLE_SESSIONS} idle sessions: daemon RSS {before} KiB before, {during} KiB with them");
    Ok(format!(
        "{IDLE_SESSIONS} idle sessions through Warden, measured cold (before any pgbench run, after one warm-up session; plain agent leg; TLS and SCRAM upstream, each but the first a fresh upstream login): the daemon's RSS went from {before} KiB to {during} KiB, {per:.0} bytes per idle session.\n"
    ))
}

fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmRSS in /proc/PID/status")
}

fn read_pid(file: &Path) -> anyhow::Result<u32> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        if let Ok(t) = std::fs::read_to_string(file)
            && let Ok(pid) = t.trim().parse()
        {
            return Ok(pid);
        }
        ensure!(std::time::Instant::now() < deadline, "no pid in {}", file.display());
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// utime + stime of a process (all its threads), in clock ticks.
fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name may hold spaces: fields are counted after its closing parenthesis.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).context("/proc/PID/stat without a command")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| -> anyhow::Result<u64> { Ok(f.get(i).context("short /proc/PID/stat")?.parse()?) };
    // Fields 14 and 15 of stat(5); `rest` starts at field 3.
    Ok(field(11)? + field(12)?)
}

/// `a / b` as a float (counts far below 2^52, so exact enough).
#[allow(clippy::cast_precision_loss)]
fn ratio(a: u64, b: u64) -> f64 {
    a as f64 / b as f64
}

fn clock_ticks() -> f64 {
    let out = Command::new("getconf").arg("CLK_TCK").output().ok();
    out.and_then(|o| String::from_utf8(o.stdout).ok()).and_then(|s| s.trim().parse().ok()).unwrap_or(100.0)
}

fn loadavg() -> String {
    let l = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    l.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}

/// The `pg_setup` lines of the daemon's log as a table: per kind of session (pooled or a fresh upstream
/// login; agent leg plain or TLS), the median and 90th percentile of each phase.
fn setup_breakdown(log: &str) -> String {
    const PHASES: [&str; 8] = [
        "tls_us",
        "hello_us",
        "gate_us",
        "checkout_us",
        "durable_wait_us",
        "login_us",
        "greeting_us",
        "total_us",
    ];
    let mut groups: std::collections::BTreeMap<String, Vec<std::collections::HashMap<String, u64>>> =
        std::collections::BTreeMap::new();
    for line in log.lines().filter(|l| l.contains("postgres connection set-up")) {
        let mut fields = std::collections::HashMap::new();
        let mut pooled = false;
        for token in line.split_whitespace() {
            let Some((k, v)) = token.split_once('=') else { continue };
            if k == "pooled" {
                pooled = v == "true";
            } else if k.ends_with("_us")
                && let Ok(v) = v.parse::<u64>()
            {
                fields.insert(k.to_owned(), v);
            }
        }
        let kind = format!(
            "{}, agent leg {}",
            if pooled { "pool checkout" } else { "fresh upstream login (TCP, TLS, SCRAM)" },
            if fields.contains_key("tls_us") { "TLS" } else { "plain" }
        );
        groups.entry(kind).or_default().push(fields);
    }
    let mut t = String::from("| sessions |");
    for p in &PHASES {
        let _ = write!(t, " {} |", p.trim_end_matches("_us"));
    }
    t.push_str("\n|---|");
    t.push_str(&"---|".repeat(PHASES.len()));
    t.push('\n');
    for (kind, rows) in &groups {
        let _ = write!(t, "| {kind} ({} sessions) |", rows.len());
        for p in &PHASES {
            let mut v: Vec<u64> = rows.iter().filter_map(|r| r.get(*p).copied()).collect();
            v.sort_unstable();
            if v.is_empty() {
                t.push_str(" - |");
            } else {
                // The median and the 90th percentile, by rank.
                let (median, p90) = (v[(v.len() - 1) / 2], v[(v.len() - 1) * 9 / 10]);
                let _ = write!(t, " {median} / {p90} |");
            }
        }
        t.push('\n');
    }
    t
}
