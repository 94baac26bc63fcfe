//! `cargo xtask bench ssh`: OpenSSH side by side, in one run, direct to a Debian `sshd` on a loopback
//! address and through Warden (a tagged cgroup; Warden terminates SSH with its host certificate, logs in
//! upstream with a key the client never sees, and records every command): `ssh host true` with a new
//! connection each time (latency), and 256 MiB over `cat > /dev/null` (throughput). The client's default
//! cipher is used on both legs (and on Warden's upstream leg); the machine's load average is printed
//! with the results, which are ratios within one run.
//!
//! `cargo xtask bench ssh [--runs N] [--mib N] [--warden PATH] [--no-write]`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};

use crate::demo::{start_idp, start_warden, stop_child};
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
    /// `sh -c SCRIPT` with `$SSH` set to the ssh command line, in the peer's cgroup; its wall time.
    fn time(&self, script: &str) -> anyhow::Result<Duration> {
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
        Ok(took)
    }
}

pub fn run(args: &[String]) -> anyhow::Result<()> {
    let mut runs = 20u32;
    let mut mib = 256u32;
    let mut warden = None;
    let mut write = true;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--runs" => runs = it.next().context("--runs N")?.parse()?,
            "--mib" => mib = it.next().context("--mib N")?.parse()?,
            "--warden" => warden = Some(PathBuf::from(it.next().context("--warden PATH")?)),
            "--no-write" => write = false,
            other => bail!(
                "unknown argument {other}; usage: cargo xtask bench ssh [--runs N] [--mib N] [--warden PATH] [--no-write]"
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
    let daemon = start_warden(&warden, &config, &dir.join("control.sock"), &dir.join("warden.log"))?;
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
    let peers = [
        Peer { name: "direct", options: direct, cgroup: None },
        Peer { name: "warden", options: through, cgroup: Some(cg.as_path()) },
    ];
    let target = format!("root@{SSH_IP}");
    // Warm up both paths (the identity token, the first handshake).
    for p in &peers {
        p.time(&format!("$SSH {target} true"))?;
    }
    let load_before = load_average();
    let mut latency = Vec::new();
    let mut throughput = Vec::new();
    for p in &peers {
        let mut times: Vec<Duration> =
            (0..runs).map(|_| p.time(&format!("$SSH {target} true"))).collect::<anyhow::Result<_>>()?;
        times.sort();
        let median = times[times.len() / 2];
        let mean = times.iter().sum::<Duration>() / runs.max(1);
        println!("ssh host true via {}: median {median:?}, mean {mean:?}", p.name);
        latency.push((median, mean));
        let took = p.time(&format!(
            "head -c {} /dev/zero | $SSH {target} 'cat > /dev/null'",
            u64::from(mib) * 1024 * 1024
        ))?;
        let rate = f64::from(mib) / took.as_secs_f64();
        println!("{mib} MiB via {}: {took:?} ({rate:.0} MiB/s)", p.name);
        throughput.push(rate);
    }
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
        "| {mib} MiB over `cat > /dev/null` | {:.0} MiB/s | {:.0} MiB/s | {:.2} |",
        throughput[0],
        throughput[1],
        throughput[1] / throughput[0]
    );
    let openssh =
        Command::new("ssh").arg("-V").output().map(|o| String::from_utf8_lossy(&o.stderr).trim().to_owned());
    let section = format!(
        "## SSH\n\n`cargo xtask bench ssh` ({cpus} CPUs; {openssh}; load average {load_before} before, {load_after} after; default ciphers; Warden records an `ssh.exec` per command).\n\n{table}",
        cpus = std::thread::available_parallelism().map_or(0, std::num::NonZero::get),
        openssh = openssh.unwrap_or_default(),
    );
    println!("\n{section}");
    drop(g);
    if write {
        crate::bench::write_named_section(&root().join("BENCHMARKS.md"), "## SSH", &section)?;
    }
    Ok(())
}
