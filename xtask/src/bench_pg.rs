//! `cargo xtask bench postgres`: pgbench side by side, in one run, direct to a PostgreSQL 15 cluster,
//! through Warden (a tagged cgroup; Warden injects SCRAM over TLS upstream and records every statement)
//! and through Debian's pgbouncer in session mode (TLS upstream too): `-S` with 1, 8 and 32 clients,
//! `-S -C` (a new connection per transaction) and the default TPC-B-like mix under `access: write`.
//! Client legs to Warden and pgbouncer are plain; the direct client uses TLS (its only leg).
//!
//! `cargo xtask bench postgres [--seconds N] [--warden PATH] [--no-write]`.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{Context as _, bail, ensure};

use crate::demo::{run_cmd_output, start_idp, start_warden, stop_child};
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
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--seconds" => seconds = it.next().context("--seconds N")?.parse()?,
            "--warden" => warden = Some(PathBuf::from(it.next().context("--warden PATH")?)),
            "--no-write" => write = false,
            other => bail!(
                "unknown argument {other}; usage: cargo xtask bench postgres [--seconds N] [--warden PATH] [--no-write]"
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
            "[databases]\nbench = host={PG_IP} port={pg_port} dbname=bench user=bench password={PASSWORD}\n\n[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {bouncer_port}\nunix_socket_dir =\nauth_type = trust\nauth_file = {}\npool_mode = session\nmax_client_conn = 500\ndefault_pool_size = 40\nserver_tls_sslmode = require\nlogfile = {}\n",
            dir.join("users.txt").display(),
            dir.join("pgbouncer.log").display()
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
    let daemon = start_warden(&warden, &config, &dir.join("control.sock"), &dir.join("warden.log"))?;
    g.children.push(daemon);
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
    let mut table = String::new();
    table.push_str("| case | direct tps | Warden tps | pgbouncer tps | Warden / direct | Warden / pgbouncer |\n|---|---|---|---|---|---|\n");
    for (name, flags) in cases {
        let mut tps = Vec::new();
        for (peer, conninfo, tagged) in &peers {
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
            cmd.args(flags).args(["-n", "-T", &seconds.to_string(), conninfo]).env_remove("PGPASSWORD");
            // pgbench's exit status is non-zero when a client aborted; the tps line says how far it got.
            let (_, out) = run_cmd_output(&mut cmd).with_context(|| format!("pgbench {name} via {peer}"))?;
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
            println!("{name} via {peer}: {t:.0} tps");
            tps.push(t);
        }
        let _ = writeln!(
            table,
            "| {name} | {:.0} | {:.0} | {:.0} | {:.2} | {:.2} |",
            tps[0],
            tps[1],
            tps[2],
            tps[1] / tps[0],
            tps[1] / tps[2]
        );
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
        "## PostgreSQL\n\n`cargo xtask bench postgres` ({seconds} s per run; {cpus} CPUs; {pg}; {bouncer}; upstream TLS and SCRAM for Warden and pgbouncer; Warden recorded {queries} `pg.query` records; target {pg_addr}).\n\n{table}",
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
