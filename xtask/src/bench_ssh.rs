//! `cargo xtask bench ssh`: OpenSSH side by side, in one run, direct to a Debian `sshd` on a loopback
//! address and through Warden (a tagged cgroup; Warden terminates SSH with its host certificate, logs in
//! upstream with a key the client never sees, and records every command): `ssh host true` with a new
//! connection each time (latency), and 256 MiB over `cat > /dev/null` (throughput). Each side negotiates
//! its default ciphers (the client's default direct; Warden's choice on its legs, see
//! `agent/src/protocol/ssh/algorithms.rs`); the machine's load average is printed with the results,
//! which are ratios within one run.
//!
//! Besides the wall time, each transfer reports the CPU seconds per GiB of every process on the path
//! (the `ssh` client and `head`, Warden's daemon, the `sshd` session), the measure that decides the ratio
//! on a small machine where all of them share the cores. The set-up breakdown comes from the daemon's
//! `ssh_setup` debug lines (one per connection: agent handshake, gate, upstream TCP, durable
//! `session.start` wait, upstream login, channel open, exec). Last, N idle sessions (`ssh host sleep`)
//! through Warden give the daemon's resident memory per idle SSH session.
//!
//! `cargo xtask bench ssh [--runs N] [--mib N] [--transfers N] [--cipher NAME] [--idle N] [--warden PATH] [--no-write]`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};

use crate::demo::{start_idp, start_warden_with, stop_child};
use crate::{build_warden, nix_is_root, root};

const SSH_IP: &str = "127.0.0.7";

struct Guard {
    dir: PathBuf,
    children: Vec<Child>,
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
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn sh(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    ensure!(out.status.success(), "{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn keygen(path: &Path) -> anyhow::Result<String> {
    sh(Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-C", "bench", "-f"]).arg(path))?;
    Ok(std::fs::read_to_string(path.with_extension("pub"))?.trim().to_owned())
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind(format!("{SSH_IP}:0"))?.local_addr()?.port())
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// One way to reach the server: extra `ssh` options and, for Warden, the tagged cgroup to run in.
struct Peer<'a> {
    name: &'static str,
    options: Vec<String>,
    cgroup: Option<&'a Path>,
}

impl Peer<'_> {
    /// `sh -c SCRIPT` with `$SSH` set to the ssh command line, in the peer's cgroup; its wall time and
    /// standard output.
    fn time(&self, script: &str) -> anyhow::Result<(Duration, String)> {
        let ssh = format!("ssh {}", self.options.join(" "));
        let mut c = Command::new("sh");
        match self.cgroup {
            Some(cg) => c.arg("-c").arg(format!("echo $$ > {}/cgroup.procs && {script}", cg.display())),
            None => c.arg("-c").arg(script),
        };
        c.env("SSH", ssh).stdin(Stdio::null());
        let start = Instant::now();
        let out = c.output()?;
        let took = start.elapsed();
        ensure!(
            out.status.success(),
            "{} via {}: {}",
            script,
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
        Ok((took, String::from_utf8_lossy(&out.stdout).into_owned()))
    }

    /// `sh -c SCRIPT` in the background, in the peer's cgroup.
    fn spawn(&self, script: &str) -> anyhow::Result<Child> {
        let ssh = format!("ssh {}", self.options.join(" "));
        let script = match self.cgroup {
            Some(cg) => format!("echo $$ > {}/cgroup.procs && exec {script}", cg.display()),
            None => format!("exec {script}"),
        };
        Ok(Command::new("sh")
            .arg("-c")
            .arg(script)
            .env("SSH", ssh)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?)
    }
}

/// One transfer: MiB/s and the CPU seconds each process on the path spent on it.
struct Transfer {
    rate: f64,
    client: f64,
    daemon: f64,
    sshd: f64,
}

/// utime + stime of a process (all its threads), with `children`: plus those of the children it reaped.
fn cpu_ticks(pid: u32, children: bool) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name may hold spaces: fields are counted after its closing parenthesis.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).context("/proc/PID/stat without a command")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| -> anyhow::Result<u64> { Ok(f.get(i).context("short /proc/PID/stat")?.parse()?) };
    // Fields 14 to 17 of stat(5) (utime, stime, cutime, cstime); `rest` starts at field 3.
    let own = field(11)? + field(12)?;
    Ok(if children { own + field(13)? + field(14)? } else { own })
}

/// Clock ticks in seconds (USER_HZ is 100 on every Linux this runs on).
#[allow(clippy::cast_precision_loss)]
fn ticks_seconds(ticks: u64) -> f64 {
    ticks as f64 / 100.0
}

/// The children's user + system seconds from the shell's `times` (its second line, `0m1.23s 0m0.45s`).
fn children_seconds(out: &str) -> Option<f64> {
    let line = out.lines().filter(|l| l.contains('m') && l.ends_with('s')).nth(1)?;
    line.split_whitespace()
        .map(|t| {
            let (m, s) = t.trim_end_matches('s').split_once('m')?;
            Some(m.parse::<f64>().ok()? * 60.0 + s.parse::<f64>().ok()?)
        })
        .sum()
}

/// Waits (up to 5 s) until `pid` has no children left: the session processes it forked were reaped.
fn wait_reaped(pid: u32) {
    let deadline = Instant::now() + Duration::from_secs(5);
    let children = format!("/proc/{pid}/task/{pid}/children");
    while Instant::now() < deadline && std::fs::read_to_string(&children).is_ok_and(|c| !c.trim().is_empty())
    {
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).context("no VmRSS")?;
    Ok(line.split_whitespace().nth(1).context("no VmRSS value")?.parse()?)
}

/// The sessions `warden status` counts as live.
fn live_sessions(warden: &Path, config: &Path) -> Option<u64> {
    let out = Command::new(warden).args(["status", "--config"]).arg(config).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().find(|l| l.starts_with("sessions: "))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The daemon's resident memory per idle SSH session: `n` clients through Warden running `sleep`, the
/// daemon's RSS before, once all are live, and after they have ended and the daemon has had time to give
/// the freed memory back (`daemon/memory.rs` looks every 10 s).
fn idle_memory(
    peer: &Peer<'_>,
    target: &str,
    n: u32,
    warden: &Path,
    config: &Path,
    daemon: u32,
) -> anyhow::Result<String> {
    let before = rss_kib(daemon)?;
    let mut clients = Vec::new();
    let live = (|| {
        for _ in 0..n {
            clients.push(peer.spawn(&format!("$SSH {target} 'sleep 600'"))?);
        }
        let deadline = Instant::now() + Duration::from_secs(120);
        while live_sessions(warden, config).unwrap_or(0) < u64::from(n) {
            ensure!(Instant::now() < deadline, "{n} idle ssh sessions did not all go live within 120 s");
            std::thread::sleep(Duration::from_millis(200));
        }
        // Let the set-up's transient buffers go before measuring.
        std::thread::sleep(Duration::from_secs(2));
        rss_kib(daemon)
    })();
    for c in &mut clients {
        let _ = c.kill();
        let _ = c.wait();
    }
    let live = live?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while live_sessions(warden, config).unwrap_or(0) > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(11));
    let ended = rss_kib(daemon)?;
    let per = live.saturating_sub(before) * 1024 / u64::from(n);
    println!(
        "idle ssh sessions: {n}; daemon RSS {before} KiB -> {live} KiB; {per} bytes per session; {ended} KiB 11 s after they ended"
    );
    Ok(format!(
        "Idle sessions: {n} `ssh host 'sleep 600'` through Warden took the daemon's resident memory from {before} KiB to {live} KiB, **{per} bytes per idle SSH session** (RSS delta / sessions; each holds an agent-side russh server, an upstream russh client and a channel bridge); 11 s after they had ended it was {ended} KiB (the daemon gives freed memory back every 10 s)."
    ))
}

/// The `ssh_setup` lines of the daemon's log as a table: the median and 90th percentile of each phase.
fn setup_breakdown(log: &str) -> String {
    const PHASES: [&str; 10] = [
        "hello_us",
        "gate_us",
        "upstream_tcp_us",
        "durable_wait_us",
        "upstream_login_us",
        "agent_open_us",
        "upstream_open_us",
        "agent_request_us",
        "upstream_request_us",
        "total_us",
    ];
    let rows: Vec<Vec<(String, u64)>> = log
        .lines()
        .filter(|l| l.contains("ssh connection set-up"))
        .map(|line| {
            line.split_whitespace()
                .filter_map(|t| {
                    let (k, v) = t.split_once('=')?;
                    Some((k.to_owned(), v.parse().ok()?))
                })
                .collect()
        })
        .collect();
    if rows.is_empty() {
        return "(no `ssh_setup` lines: a Warden without them)\n".into();
    }
    let mut t = String::from("| connections |");
    for p in &PHASES {
        let _ = write!(t, " {} |", p.trim_end_matches("_us"));
    }
    t.push_str("\n|---|");
    t.push_str(&"---|".repeat(PHASES.len()));
    let _ = write!(t, "\n| {} |", rows.len());
    for p in &PHASES {
        let mut v: Vec<u64> =
            rows.iter().filter_map(|r| r.iter().find(|(k, _)| k == p).map(|(_, v)| *v)).collect();
        v.sort_unstable();
        if v.is_empty() {
            t.push_str(" - |");
        } else {
            let _ = write!(t, " {} / {} |", v[(v.len() - 1) / 2], v[(v.len() - 1) * 9 / 10]);
        }
    }
    t.push('\n');
    t
}

pub fn run(args: &[String]) -> anyhow::Result<()> {
    let mut runs = 20u32;
    let mut mib = 256u32;
    let mut idle = 50u32;
    let mut transfer_runs = 3u32;
    let mut cipher: Option<String> = None;
    let mut warden = None;
    let mut write = true;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--runs" => runs = it.next().context("--runs N")?.parse()?,
            "--mib" => mib = it.next().context("--mib N")?.parse()?,
            "--idle" => idle = it.next().context("--idle N")?.parse()?,
            "--transfers" => transfer_runs = it.next().context("--transfers N")?.parse()?,
            "--cipher" => cipher = Some(it.next().context("--cipher NAME")?.clone()),
            "--warden" => warden = Some(PathBuf::from(it.next().context("--warden PATH")?)),
            "--no-write" => write = false,
            other => bail!(
                "unknown argument {other}; usage: cargo xtask bench ssh [--runs N] [--mib N] [--transfers N] [--cipher NAME] [--idle N] [--warden PATH] [--no-write]"
            ),
        }
    }
    ensure!(nix_is_root(), "the benchmark attaches kernel programs and creates cgroups: run it as root");
    ensure!(Path::new("/usr/sbin/sshd").exists(), "openssh-server is not installed: run scripts/setup.sh");
    let warden = match warden {
        Some(w) => w,
        None => build_warden(true)?,
    };
    let tag = format!("warden-bench-ssh-{}", std::process::id());
    let dir = std::env::temp_dir().join(&tag);
    std::fs::create_dir_all(&dir)?;
    let mut g = Guard { dir: dir.clone(), children: vec![], cgroup: None, warden: None };

    // sshd on a loopback address: its own host key, trusting Warden's key and the direct client's.
    let host_pub = keygen(&dir.join("host_key"))?;
    let warden_pub = keygen(&dir.join("warden_key"))?;
    let client_pub = keygen(&dir.join("client_key"))?;
    std::fs::write(dir.join("authorized_keys"), format!("{warden_pub}\n{client_pub}\n"))?;
    std::fs::create_dir_all("/run/sshd")?;
    let port = free_port()?;
    std::fs::write(
        dir.join("sshd_config"),
        format!(
            "Port {port}\nListenAddress {SSH_IP}\nHostKey {d}/host_key\nPidFile {d}/sshd.pid\nAuthorizedKeysFile {d}/authorized_keys\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nPubkeyAuthentication yes\nPermitRootLogin prohibit-password\nUsePAM no\nStrictModes no\nMaxStartups 100\nLogLevel ERROR\n",
            d = dir.display()
        ),
    )?;
    let sshd = Command::new("/usr/sbin/sshd")
        .args(["-D", "-e", "-f"])
        .arg(dir.join("sshd_config"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("sshd.log"))?)
        .spawn()?;
    let sshd_pid = sshd.id();
    g.children.push(sshd);
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect((SSH_IP, port)).is_err() {
        ensure!(
            Instant::now() < deadline,
            "sshd did not start: {}",
            std::fs::read_to_string(dir.join("sshd.log"))?
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // Warden with an ssh target under `access: exec`.
    let keys = dir.join("idp-keys");
    let (idp, issuer) = start_idp(&keys)?;
    g.children.push(idp);
    let state = dir.join("state");
    std::fs::create_dir_all(&state)?;
    std::fs::write(
        dir.join("policy.yaml"),
        format!(
            "targets:\n  bench-host:\n    protocol: ssh\n    address: \"{SSH_IP}:{port}\"\n    host_key: \"{host_pub}\"\n    credentials: {{ user: root, private_key_file: \"{}\" }}\nrules:\n  - name: bench commands\n    match: {{ groups: [agents-research] }}\n    grant:\n      - target: bench-host\n        access: exec\n        ttl: 60m\n",
            dir.join("warden_key").display()
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
    let log = dir.join("warden.log");
    // `WARDEN_BENCH_LOG` adds log directives (e.g. `russh=debug` for the negotiated algorithms).
    let filter = match std::env::var("WARDEN_BENCH_LOG") {
        Ok(extra) => format!("info,ssh_setup=debug,{extra}"),
        Err(_) => "info,ssh_setup=debug".to_owned(),
    };
    let daemon = start_warden_with(
        &warden,
        &config,
        &dir.join("control.sock"),
        &log,
        &[("WARDEN_LOG", filter.as_str()), ("WARDEN_LOG_FORMAT", "plain"), ("NO_COLOR", "1")],
    )?;
    let daemon_pid = daemon.id();
    g.children.push(daemon);
    g.warden = Some((warden.clone(), config.clone()));
    let ca_line = sh(Command::new(&warden).args(["ca", "ssh", "--config"]).arg(&config))?;
    std::fs::write(dir.join("known_hosts_warden"), ca_line)?;
    std::fs::write(dir.join("known_hosts_direct"), format!("[{SSH_IP}]:{port} {host_pub}\n"))?;
    let cg = crate::bench::cgroup_root()?.join(&tag).join("agent");
    std::fs::create_dir_all(&cg)?;
    g.cgroup = Some(cg.clone());
    sh(Command::new(&warden).arg("tag").arg(&cg).args(["--identity", "bench", "--config"]).arg(&config))?;

    let common = |known: &str| -> Vec<String> {
        [
            "-F",
            "/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "GlobalKnownHostsFile=/dev/null",
            "-o",
            "IdentityAgent=none",
            "-p",
            &port.to_string(),
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .chain([format!("-o UserKnownHostsFile={}", dir.join(known).display())])
        .collect()
    };
    let mut direct = common("known_hosts_direct");
    direct.extend([
        "-i".into(),
        dir.join("client_key").display().to_string(),
        "-o IdentitiesOnly=yes".into(),
    ]);
    let mut through = common("known_hosts_warden");
    through.push("-o PubkeyAuthentication=no".into());
    // `--cipher`: the client's cipher on its leg (direct, and the agent leg through Warden).
    if let Some(c) = &cipher {
        for o in [&mut direct, &mut through] {
            o.extend(["-c".to_owned(), c.clone()]);
        }
    }
    let peers = [
        Peer { name: "direct", options: direct, cgroup: None },
        Peer { name: "warden", options: through, cgroup: Some(cg.as_path()) },
    ];
    let target = format!("root@{SSH_IP}");
    // Warm up both paths (the identity token, the first handshake).
    for p in &peers {
        p.time(&format!("$SSH {target} true"))?;
    }
    // Idle memory first, before transfers grow the allocator's free lists (which later sessions reuse).
    let memory = if idle > 0 {
        Some(idle_memory(&peers[1], &target, idle, &warden, &config, daemon_pid)?)
    } else {
        None
    };
    let load_before = load_average();
    // The set-up lines from here on: the `ssh host true` connections, one at a time.
    let log_start = std::fs::metadata(&log).map_or(0, |m| m.len());
    let mut latency = Vec::new();
    for p in &peers {
        let mut times: Vec<Duration> = (0..runs)
            .map(|_| p.time(&format!("$SSH {target} true")).map(|(t, _)| t))
            .collect::<anyhow::Result<_>>()?;
        times.sort();
        let median = times[times.len() / 2];
        let mean = times.iter().sum::<Duration>() / runs.max(1);
        println!("ssh host true via {}: median {median:?}, mean {mean:?}", p.name);
        latency.push((median, mean));
    }
    let log_text = std::fs::read(&log).unwrap_or_default();
    let from = usize::try_from(log_start).unwrap_or(0).min(log_text.len());
    let setup = setup_breakdown(&String::from_utf8_lossy(&log_text[from..]));
    // Transfers alternate between the peers, so both see the same share of a changing load.
    let bytes = u64::from(mib) * 1024 * 1024;
    let mut all: [Vec<Transfer>; 2] = [Vec::new(), Vec::new()];
    for _ in 0..transfer_runs.max(1) {
        for (p, done) in peers.iter().zip(all.iter_mut()) {
            let (daemon_before, sshd_before) = (cpu_ticks(daemon_pid, false)?, cpu_ticks(sshd_pid, true)?);
            let (took, out) =
                p.time(&format!("head -c {bytes} /dev/zero | $SSH {target} 'cat > /dev/null' && times"))?;
            // The sshd session's processes are counted in the listener once it has reaped them.
            wait_reaped(sshd_pid);
            let t = Transfer {
                rate: f64::from(mib) / took.as_secs_f64(),
                client: children_seconds(&out).context("no `times` output from the client's shell")?,
                daemon: ticks_seconds(cpu_ticks(daemon_pid, false)? - daemon_before),
                sshd: ticks_seconds(cpu_ticks(sshd_pid, true)? - sshd_before),
            };
            println!(
                "{mib} MiB via {}: {took:?} ({:.0} MiB/s); CPU s: client {:.2}, warden {:.2}, sshd {:.2}",
                p.name, t.rate, t.client, t.daemon, t.sshd
            );
            done.push(t);
        }
    }
    // The median transfer of each peer (by rate).
    let transfers: Vec<Transfer> = all
        .into_iter()
        .map(|mut v| {
            v.sort_by(|a, b| a.rate.total_cmp(&b.rate));
            v.swap_remove(v.len() / 2)
        })
        .collect();
    let load_after = load_average();
    let mut table = String::new();
    table.push_str("| case | direct | Warden | Warden / direct |\n|---|---|---|---|\n");
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let _ = writeln!(
        table,
        "| `ssh host true`, a new connection each, median of {runs} | {:.1} ms | {:.1} ms | {:.2} |",
        ms(latency[0].0),
        ms(latency[1].0),
        ms(latency[1].0) / ms(latency[0].0)
    );
    let _ = writeln!(
        table,
        "| {mib} MiB over `cat > /dev/null`, median of {transfer_runs} | {:.0} MiB/s | {:.0} MiB/s | {:.2} |",
        transfers[0].rate,
        transfers[1].rate,
        transfers[1].rate / transfers[0].rate
    );
    let gib = f64::from(mib) / 1024.0;
    let mut cpu = String::from(
        "| CPU seconds per GiB | client (`ssh`, `head`) | Warden's daemon | `sshd` | all |\n|---|---|---|---|---|\n",
    );
    for (p, t) in peers.iter().zip(&transfers) {
        let _ = writeln!(
            cpu,
            "| {} | {:.2} | {:.2} | {:.2} | {:.2} |",
            p.name,
            t.client / gib,
            t.daemon / gib,
            t.sshd / gib,
            (t.client + t.daemon + t.sshd) / gib
        );
    }
    let openssh =
        Command::new("ssh").arg("-V").output().map(|o| String::from_utf8_lossy(&o.stderr).trim().to_owned());
    let memory = memory.map_or_else(String::new, |m| format!("\n{m}\n"));
    let section = format!(
        "## SSH\n\n`cargo xtask bench ssh` ({cpus} CPUs; {openssh}; load average {load_before} before, {load_after} after; {ciphers}; Warden records an `ssh.exec` per command).\n\n{table}\n{cpu}\nSet-up through Warden, from the daemon's `ssh_setup` lines (µs, median / 90th percentile; the phases follow one another):\n\n{setup}{memory}",
        cpus = std::thread::available_parallelism().map_or(0, std::num::NonZero::get),
        openssh = openssh.unwrap_or_default(),
        ciphers = cipher.map_or_else(|| "default ciphers".to_owned(), |c| format!("the client's cipher {c}")),
    );
    println!("\n{section}");
    drop(g);
    if write {
        crate::bench::write_named_section(&root().join("BENCHMARKS.md"), "## SSH", &section)?;
    }
    Ok(())
}
