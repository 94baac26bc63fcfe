//! `cargo xtask bench`: connection set-up latency and bulk throughput, direct, through Warden and through
//! haproxy (TCP mode), in one run; written to BENCHMARKS.md with the machine.
//!
//! Everything runs on loopback. A target server (in this process) listens on 127.0.0.5; the load generator
//! is this same binary re-executed as `bench client ...`, which prints one JSON line. Run untagged it
//! measures the direct path and haproxy; run in a cgroup tagged with `warden tag`, the kernel redirects its
//! connections to 127.0.0.5 through Warden. Each round starts Warden afresh:
//!
//! 1. direct, before Warden's programs are attached (the untagged baseline);
//! 2. direct, untagged, with Warden's programs attached (what every untagged process pays);
//! 3. through Warden (tagged: redirect, origin lookup, identity, policy, grant, durable audit record);
//! 4. through haproxy in TCP mode (untagged, with Warden's programs attached);
//! 5. through Warden relaying opaque TCP through user-space buffers (`tcp_relay = "copy"`; a diagnostic:
//!    what splicing saves);
//! 6. through Warden with its audit record on tmpfs (a diagnostic: what the disk flush costs);
//! 7. direct again, after Warden is uninstalled (the baseline's noise).
//!
//! `cargo xtask bench [--rounds N] [--quick] [--connections N] [--mib N] [--reps N] [--gap-us N] [--no-write]
//! [--warden PATH] [--bpf]`: `--quick` is one short round (other flags still apply), `--warden` uses a
//! prebuilt daemon instead of building it, `--no-write` leaves BENCHMARKS.md alone. `--bpf` measures only
//! what Warden's kernel programs cost untagged connections (kernel BPF statistics, per program, with a
//! tagged cgroup in place so every program is live; 10,000 connections unless `--connections` says
//! otherwise), prints it and writes nothing: load does not change those counts much, so it can run
//! on a busy machine and against any build (`--warden`).

use std::fmt::Write as _;
use std::io::{Read as _, Write as _};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use warden_test_support::{IdentityToml, WardenToml, remove_cgroup_tree};

use crate::bench_setup::{Breakdown, Concurrency, PARALLEL, Parallel, Scrape};
use crate::demo::{run_cmd_output, start_idp, start_warden, stop_child};
use crate::{build_warden, nix_is_root, root};

/// The target's address; the bench's own loopback address, so nothing else is redirected.
const TARGET_IP: &str = "127.0.0.5";
/// The identity the tagged client runs as.
const IDENTITY: &str = "bench";
/// Buffer the load generator writes from and the target reads into.
const IO_BUFFER: usize = 256 * 1024;
/// No socket operation of the load generator may block longer than this.
const IO_TIMEOUT: Duration = Duration::from_secs(60);
const USAGE: &str = "usage: cargo xtask bench [--rounds N] [--quick] [--connections N] [--mib N] [--reps N] \
                     [--gap-us N] [--no-write] [--warden PATH] [--bpf]";
/// Added set-up latency (p50) Warden must stay under.
const LATENCY_GOAL_US: f64 = 200.0;

struct Options {
    rounds: usize,
    connections: usize,
    warmup: usize,
    bytes: u64,
    reps: usize,
    write: bool,
    warden: Option<PathBuf>,
    /// Pause before each timed connection, in µs.
    gap_us: u64,
    /// Only the kernel programs' cost to untagged connections.
    bpf_only: bool,
    /// Untagged connections the programs' cost is measured over.
    bpf_connections: usize,
}

impl Options {
    fn parse(args: &[String]) -> anyhow::Result<Self> {
        let mut o = Self {
            rounds: 2,
            connections: 2000,
            warmup: 200,
            bytes: 1 << 30,
            reps: 3,
            write: true,
            warden: None,
            gap_us: 0,
            bpf_only: false,
            bpf_connections: 2000,
        };
        if args.iter().any(|a| a == "--quick") {
            o.rounds = 1;
            o.connections = 300;
            o.warmup = 50;
            o.bytes = 128 << 20;
            o.reps = 1;
        }
        let mut it = args.iter();
        while let Some(a) = it.next() {
            match a.as_str() {
                "--rounds" => o.rounds = it.next().context("--rounds N")?.parse().context("--rounds N")?,
                "--quick" => {}
                "--bpf" => o.bpf_only = true,
                "--no-write" => o.write = false,
                "--gap-us" => o.gap_us = it.next().context("--gap-us N")?.parse().context("--gap-us N")?,
                "--reps" => o.reps = it.next().context("--reps N")?.parse().context("--reps N")?,
                "--connections" => {
                    o.connections =
                        it.next().context("--connections N")?.parse().context("--connections N")?;
                }
                "--mib" => o.bytes = it.next().context("--mib N")?.parse::<u64>().context("--mib N")? << 20,
                "--warden" => o.warden = Some(it.next().context("--warden PATH")?.into()),
                other => bail!("unknown argument {other}; {USAGE}"),
            }
        }
        if o.bpf_only {
            o.bpf_connections =
                if args.iter().any(|a| a == "--connections") { o.connections } else { 10_000 };
        } else {
            o.bpf_connections = o.connections.min(2000);
        }
        ensure!(
            o.rounds >= 1 && o.connections >= 1 && o.reps >= 1 && o.bytes >= 4,
            "--rounds, --connections, --reps and --mib must be at least 1"
        );
        Ok(o)
    }
}

pub fn run(args: &[String]) -> anyhow::Result<()> {
    if args.first().map(String::as_str) == Some("client") {
        return client(&args[1..]);
    }
    let opts = Options::parse(args)?;
    if !nix_is_root() {
        bail!(
            "the benchmark attaches Warden's kernel programs and creates cgroups: run it as root (sudo -E cargo xtask bench)"
        );
    }
    if opts.bpf_only {
        return bpf_only(&opts);
    }
    let haproxy = which("haproxy")
        .context("haproxy is not installed: run scripts/setup.sh or `apt-get install -y haproxy`")?;
    let Prepared { mut guard, warden, client_exe, dir, tag, keys, issuer, target } = prepare(&opts)?;

    let haproxy_port = free_port()?;
    std::fs::write(dir.join("haproxy.cfg"), haproxy_config(haproxy_port, target.addr))?;
    let ha = Command::new(&haproxy)
        .arg("-f")
        .arg(dir.join("haproxy.cfg"))
        .arg("-db")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("haproxy.log"))?)
        .spawn()
        .context("starting haproxy")?;
    let haproxy_pid = ha.id();
    guard.children.push(ha);
    let haproxy_addr: SocketAddr = ([127, 0, 0, 1], haproxy_port).into();
    wait_listening(haproxy_addr, &dir.join("haproxy.log"))?;
    println!("haproxy (TCP mode, default nbthread) on {haproxy_addr}");

    let proxy_port = free_port()?;
    let metrics_port = free_port()?;
    let ports = (proxy_port, metrics_port);
    let config = dir.join("warden.toml");
    std::fs::write(dir.join("policy.yaml"), policy(target.addr))?;
    std::fs::write(&config, warden_config(&dir, &dir.join("state"), &tag, ports, &issuer, &keys, ""))?;
    // The same daemon with its state (and so its audit record) in memory: how much of the set-up
    // latency is the disk's fdatasync. A diagnostic only: production keeps the record on disk.
    let config_tmpfs = if is_tmpfs(Path::new("/dev/shm")) {
        let state = Path::new("/dev/shm").join(&tag);
        guard.extra_dirs.push(state.clone());
        let c = dir.join("warden-tmpfs.toml");
        std::fs::write(&c, warden_config(&dir, &state, &tag, ports, &issuer, &keys, ""))?;
        Some(c)
    } else {
        None
    };
    // The same daemon relaying opaque TCP through user-space buffers instead of splicing it: the relay
    // path's diagnostic (throughput and CPU per GiB side by side in one round).
    let config_copy = dir.join("warden-copy.toml");
    std::fs::write(
        &config_copy,
        warden_config(&dir, &dir.join("state"), &tag, ports, &issuer, &keys, "tcp_relay = \"copy\"\n"),
    )?;
    for c in std::iter::once(&config).chain(&config_tmpfs).chain(std::iter::once(&config_copy)) {
        let (ok, out) = run_cmd_output(Command::new(&warden).args(["check", "--config"]).arg(c))?;
        ensure!(ok, "warden check refused the bench config:\n{out}");
    }

    let mut machine = Machine::read(&haproxy, &dir);
    if let Some(p) = &opts.warden {
        machine.build = format!("the prebuilt binary {}, not necessarily of that commit", p.display());
    }
    machine.haproxy_threads =
        std::fs::read_dir(format!("/proc/{haproxy_pid}/task")).map_or(0, Iterator::count);
    println!("{}", machine.markdown());
    let bench = Bench {
        opts: &opts,
        warden: &warden,
        config: &config,
        config_tmpfs: config_tmpfs.as_deref(),
        config_copy: &config_copy,
        haproxy_pid,
        tag: tag.clone(),
        dir: &dir,
        client: &client_exe,
        target: target.addr,
        haproxy: haproxy_addr,
        metrics: ([127, 0, 0, 1], metrics_port).into(),
    };
    let mut rounds = Vec::new();
    for n in 1..=opts.rounds {
        println!("\n== round {n} of {}", opts.rounds);
        let round = bench.round()?;
        println!("{}", round.markdown());
        rounds.push(round);
    }
    drop(guard);
    let leftovers = leftovers(&tag);
    let section = section(&machine, &opts, &rounds, &leftovers);
    println!("\n{section}");
    if opts.write {
        write_section(&root().join("BENCHMARKS.md"), &section)?;
        println!("written to BENCHMARKS.md (## Data path)");
    }
    ensure!(leftovers.is_empty(), "the bench left things behind: {leftovers:?}");
    Ok(())
}

/// `--bpf`: a daemon with one tagged cgroup (whose connection through Warden is checked first, so every
/// program is live), then untagged loopback connections under the kernel's BPF statistics: each program's
/// mean run time and runs per connection, and the sum.
fn bpf_only(opts: &Options) -> anyhow::Result<()> {
    let Prepared { guard, warden, client_exe, dir, tag, keys, issuer, target } = prepare(opts)?;
    let ports = (free_port()?, free_port()?);
    let config = dir.join("warden.toml");
    std::fs::write(dir.join("policy.yaml"), policy(target.addr))?;
    std::fs::write(&config, warden_config(&dir, &dir.join("state"), &tag, ports, &issuer, &keys, ""))?;
    let bench = Bench {
        opts,
        warden: &warden,
        config: &config,
        config_tmpfs: None,
        config_copy: &config,
        haproxy_pid: 0,
        tag: tag.clone(),
        dir: &dir,
        client: &client_exe,
        target: target.addr,
        haproxy: target.addr,
        metrics: ([127, 0, 0, 1], ports.1).into(),
    };
    println!("load average: {}; other Warden instances pinned: {:?}", loadavg(), other_wardens(&tag));
    let child = start_warden(&warden, &config, &dir.join("control.sock"), &dir.join("warden.log"))?;
    let daemon = Daemon { child, warden: &warden, config: &config };
    let agent = bench.tagged_cgroup(&config)?;
    bench.warm(&agent.0)?;
    // The bench's own cgroup, and an untagged sibling of the tagged one (where services sit on a systemd
    // host: at the tags' depth, so the tag-map walk cannot skip their level).
    let sibling = Cgroup(agent.0.with_file_name("untagged"));
    std::fs::create_dir_all(&sibling.0).with_context(|| format!("creating {}", sibling.0.display()))?;
    let here = bench.program_costs()?;
    let beside = bench.program_costs_in(Some(&sibling.0))?;
    drop(sibling);
    drop(agent);
    drop(daemon);
    drop(guard);
    for (costs, client) in
        [(here, "the bench's own cgroup"), (beside, "an untagged sibling of the tagged cgroup")]
    {
        println!(
            "Warden's programs on an untagged loopback connection ({} connections from {client}, both ends on this host):",
            opts.bpf_connections
        );
        println!("| program | mean run time | runs per connection | per connection |\n|---|---:|---:|---:|");
        for p in &costs {
            println!(
                "| `{}` | {:.0} ns | {:.2} | {:.0} ns |",
                p.name,
                p.ns,
                p.per_connection,
                p.ns * p.per_connection
            );
        }
        let total: f64 = costs.iter().map(|p| p.ns * p.per_connection).sum();
        println!("| in all | | | {total:.0} ns |");
    }
    ensure!(leftovers(&tag).is_empty(), "the bench left things behind: {:?}", leftovers(&tag));
    Ok(())
}

/// What the bench started, stopped and removed when it drops, even on error.
/// What every bench run starts from: the binaries, its directory and tag, the cleanup guard (holding the
/// OpenID provider), the target server and the provider's keys and issuer.
struct Prepared {
    // Dropped in this order: the target server stops before the guard cleans up.
    target: Target,
    guard: Guard,
    warden: PathBuf,
    client_exe: PathBuf,
    dir: PathBuf,
    tag: String,
    keys: PathBuf,
    issuer: String,
}

/// Builds (or takes) the Warden binary, makes the run's directory, starts the target server and the test
/// OpenID provider.
fn prepare(opts: &Options) -> anyhow::Result<Prepared> {
    let warden = match &opts.warden {
        Some(p) => p.clone(),
        None => build_warden(true)?,
    };
    let client_exe = std::env::current_exe().context("the xtask binary's path")?;
    let dir = std::env::temp_dir().join(format!("warden-bench-{}", std::process::id()));
    let tag = format!("warden-bench-{}", std::process::id());
    let mut guard = Guard {
        dir: dir.clone(),
        children: vec![],
        extra_dirs: vec![],
        bpffs: PathBuf::from("/sys/fs/bpf").join(&tag),
        cgroup_parent: cgroup2_root()?.join(&tag),
    };
    std::fs::create_dir_all(&dir)?;
    let target = Target::start()?;
    println!("target server on {}", target.addr);
    let keys = dir.join("idp-keys");
    let (idp, issuer) = start_idp(&keys)?;
    guard.children.push(idp);
    println!("test OpenID provider at {issuer}");
    Ok(Prepared { target, guard, warden, client_exe, dir, tag, keys, issuer })
}

struct Guard {
    dir: PathBuf,
    children: Vec<Child>,
    extra_dirs: Vec<PathBuf>,
    bpffs: PathBuf,
    cgroup_parent: PathBuf,
}

impl Drop for Guard {
    fn drop(&mut self) {
        for c in self.children.iter_mut().rev() {
            stop_child(c);
        }
        let _ = remove_cgroup_tree(&self.cgroup_parent);
        // `warden uninstall` removed the pins; this only matters when the bench failed before it could run.
        let _ = std::fs::remove_dir_all(&self.bpffs);
        for d in &self.extra_dirs {
            let _ = std::fs::remove_dir_all(d);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A cgroup the bench made: whatever runs in it is killed, and it is removed, when it drops.
struct Cgroup(PathBuf);

impl Drop for Cgroup {
    fn drop(&mut self) {
        if let Err(e) = remove_cgroup_tree(&self.0) {
            eprintln!("removing cgroup {}: {e}", self.0.display());
        }
    }
}

/// A running `warden run`: stopped, then `warden uninstall`ed, when it drops.
struct Daemon<'a> {
    child: Child,
    warden: &'a Path,
    config: &'a Path,
}

impl Drop for Daemon<'_> {
    fn drop(&mut self) {
        stop_child(&mut self.child);
        match run_cmd_output(Command::new(self.warden).args(["uninstall", "--config"]).arg(self.config)) {
            Ok((true, _)) => {}
            Ok((false, out)) => eprintln!("warden uninstall failed: {out}"),
            Err(e) => eprintln!("warden uninstall: {e:#}"),
        }
    }
}

struct Bench<'a> {
    opts: &'a Options,
    warden: &'a Path,
    config: &'a Path,
    config_tmpfs: Option<&'a Path>,
    /// The same daemon with `tcp_relay = "copy"`.
    config_copy: &'a Path,
    haproxy_pid: u32,
    /// This run's name: its bpffs directory and its cgroup parent.
    tag: String,
    dir: &'a Path,
    client: &'a Path,
    target: SocketAddr,
    haproxy: SocketAddr,
    /// The daemon's `/metrics`.
    metrics: SocketAddr,
}

impl Bench<'_> {
    fn round(&self) -> anyhow::Result<Round> {
        let load_before = loadavg();
        let others = other_wardens(&self.tag);
        println!("load average: {load_before}; other Warden instances pinned: {others:?}");
        print!("direct, no Warden programs attached ... ");
        let baseline = self.latency(None, self.target)?;
        println!("{}", baseline.summary());

        let child = start_warden(
            self.warden,
            self.config,
            &self.dir.join("control.sock"),
            &self.dir.join("warden.log"),
        )?;
        let daemon = Daemon { child, warden: self.warden, config: self.config };
        let agent = self.tagged_cgroup(self.config)?;
        let flush = flush_latency(&self.dir.join("state"))?;
        println!(
            "fdatasync of a small append in Warden's state directory: p50 {:.0} µs, p99 {:.0} µs",
            flush.0, flush.1
        );

        let mut cases = vec![Case {
            name: "direct, no Warden programs attached",
            latency: baseline,
            tput: None,
            cpu: None,
        }];
        let mut breakdown = None;
        for (name, tagged, addr, proxy) in [
            ("direct, untagged, Warden attached", None, self.target, None),
            ("through Warden (tagged)", Some(agent.0.as_path()), self.target, Some(daemon.child.id())),
            ("through haproxy, TCP mode", None, self.haproxy, Some(self.haproxy_pid)),
        ] {
            print!("{name} ... ");
            // The warm-up's first connection fetches the token and issues the grant: scrape after it.
            let before = tagged.map(|t| self.warm(t)).transpose()?;
            let latency = self.latency(tagged, addr)?;
            if let Some(before) = before {
                let after = Scrape::read(self.metrics)?;
                breakdown = Some(Breakdown::new(&before, &after, latency.mean, flush));
            }
            let (one, cpu) = self.throughput(tagged, addr, 1, proxy)?;
            let (four, _) = self.throughput(tagged, addr, 4, None)?;
            println!("{}, {one:.2} Gbit/s (1 conn), {four:.2} Gbit/s (4 conns)", latency.summary());
            cases.push(Case { name, latency, tput: Some((one, four)), cpu });
        }
        let concurrency = self.concurrency(&agent.0)?;
        print!("Warden's programs on untagged connections (kernel BPF statistics) ... ");
        let programs = match self.program_costs() {
            Ok(p) => {
                println!("{:.0} ns per connection", p.iter().map(|p| p.ns * p.per_connection).sum::<f64>());
                p
            }
            Err(e) => {
                println!("not measured: {e:#}");
                Vec::new()
            }
        };
        drop(agent);
        drop(daemon);
        {
            let name = "through Warden, copying relay (diagnostic)";
            print!("{name} ... ");
            let child = start_warden(
                self.warden,
                self.config_copy,
                &self.dir.join("control.sock"),
                &self.dir.join("warden.log"),
            )?;
            let daemon = Daemon { child, warden: self.warden, config: self.config_copy };
            let agent = self.tagged_cgroup(self.config_copy)?;
            self.warm(&agent.0)?;
            let latency = self.latency(Some(&agent.0), self.target)?;
            let (one, cpu) = self.throughput(Some(&agent.0), self.target, 1, Some(daemon.child.id()))?;
            let (four, _) = self.throughput(Some(&agent.0), self.target, 4, None)?;
            println!("{}, {one:.2} Gbit/s (1 conn), {four:.2} Gbit/s (4 conns)", latency.summary());
            cases.push(Case { name, latency, tput: Some((one, four)), cpu });
            drop(agent);
            drop(daemon);
        }
        if let Some(config) = self.config_tmpfs {
            let name = "through Warden, audit on tmpfs (diagnostic)";
            print!("{name} ... ");
            let child = start_warden(
                self.warden,
                config,
                &self.dir.join("control.sock"),
                &self.dir.join("warden.log"),
            )?;
            let daemon = Daemon { child, warden: self.warden, config };
            let agent = self.tagged_cgroup(config)?;
            let latency = self.latency(Some(&agent.0), self.target)?;
            println!("{}", latency.summary());
            cases.push(Case { name, latency, tput: None, cpu: None });
            drop(agent);
            drop(daemon);
        }
        // The baseline again, with everything of Warden's gone: its distance from the first one is the noise.
        let name = "direct, after Warden uninstalled";
        print!("{name} ... ");
        let latency = self.latency(None, self.target)?;
        println!("{}", latency.summary());
        cases.push(Case { name, latency, tput: None, cpu: None });
        let mut others = others;
        others.extend(other_wardens(&self.tag));
        others.sort();
        others.dedup();
        Ok(Round {
            cases,
            flush,
            programs,
            breakdown,
            concurrency,
            load_before,
            load_after: loadavg(),
            others,
        })
    }

    /// A few tagged connections (the first one obtains the token and issues the grant), then a scrape of the
    /// daemon's metrics.
    fn warm(&self, tagged: &Path) -> anyhow::Result<Scrape> {
        let args = ["latency".to_owned(), self.target.to_string(), "1".into(), "20".into()];
        self.client(Some(tagged), &args)?;
        Scrape::read(self.metrics)
    }

    /// Set-up with 1, 8 and 64 parallel connectors: direct (programs attached), Warden, haproxy.
    fn concurrency(&self, agent: &Path) -> anyhow::Result<Concurrency> {
        let mut rows = Vec::new();
        for p in PARALLEL {
            print!("{p} parallel connector(s): ");
            let direct = self.parallel(None, self.target, p)?;
            let before = Scrape::read(self.metrics)?;
            let warden = self.parallel(Some(agent), self.target, p)?;
            let commits = Scrape::read(self.metrics)?.commits(&before);
            let haproxy = self.parallel(None, self.haproxy, p)?;
            println!(
                "direct {:.0} conn/s, Warden {:.0} conn/s (p50 {:.0} µs; {} records per fdatasync, fdatasync p50 {} µs), \
                 haproxy {:.0} conn/s",
                direct.per_s,
                warden.per_s,
                warden.p50,
                commits.records.map_or("—".into(), |r| format!("{r:.1}")),
                commits.p50.map_or("—".into(), |r| format!("{r:.0}")),
                haproxy.per_s
            );
            rows.push((p, direct, warden, haproxy, commits));
        }
        Ok(Concurrency { rows, connections: self.opts.connections })
    }

    fn parallel(
        &self,
        tagged: Option<&Path>,
        addr: SocketAddr,
        connectors: usize,
    ) -> anyhow::Result<Parallel> {
        let args = [
            "latency".to_owned(),
            addr.to_string(),
            self.opts.connections.to_string(),
            "0".to_owned(),
            "0".to_owned(),
            connectors.to_string(),
        ];
        let j = self.client(tagged, &args)?;
        Ok(Parallel { p50: field(&j, "p50_us")?, p99: field(&j, "p99_us")?, per_s: field(&j, "per_s")? })
    }

    /// A cgroup the running daemon has tagged with the bench identity (`warden tag`). Every tagged client
    /// of a daemon runs in this one cgroup, so they share one grant, as one agent's connections do.
    fn tagged_cgroup(&self, config: &Path) -> anyhow::Result<Cgroup> {
        let path = cgroup2_root()?.join(&self.tag).join("agent");
        std::fs::create_dir_all(&path).with_context(|| format!("creating cgroup {}", path.display()))?;
        let cg = Cgroup(path);
        let (ok, out) = run_cmd_output(
            Command::new(self.warden)
                .arg("tag")
                .arg(&cg.0)
                .args(["--identity", IDENTITY, "--config"])
                .arg(config),
        )?;
        ensure!(ok, "warden tag failed: {out}");
        Ok(cg)
    }

    /// Runs untagged connections with the kernel's BPF run-time statistics on, and returns what each of this
    /// Warden's attached programs cost: the mean run time, and how often it ran per connection (both ends
    /// of the connection are on this host, so the target's side counts too).
    fn program_costs(&self) -> anyhow::Result<Vec<ProgramCost>> {
        self.program_costs_in(None)
    }

    /// [`Self::program_costs`] with the untagged client in `cgroup` (an untagged one) rather than the
    /// bench's own.
    fn program_costs_in(&self, cgroup: Option<&Path>) -> anyhow::Result<Vec<ProgramCost>> {
        let links = Path::new("/sys/fs/bpf").join(&self.tag).join("links");
        let mut progs = Vec::new();
        for e in std::fs::read_dir(&links).with_context(|| format!("reading {}", links.display()))? {
            let path = e?.path();
            let link = output(Command::new("bpftool").args(["-j", "link", "show", "pinned"]).arg(&path));
            if let Ok(id) = field(&link, "prog_id") {
                progs.push((path.file_name().unwrap_or_default().to_string_lossy().into_owned(), id));
            }
        }
        ensure!(
            !progs.is_empty(),
            "no Warden program found under {} (is bpftool installed?)",
            links.display()
        );
        let stats = |id: f64| -> (f64, f64) {
            let j = output(Command::new("bpftool").args(["-j", "prog", "show", "id", &id.to_string()]));
            (field(&j, "run_time_ns").unwrap_or(0.0), field(&j, "run_cnt").unwrap_or(0.0))
        };
        let connections = self.opts.bpf_connections;
        let args = ["latency".to_owned(), self.target.to_string(), connections.to_string(), "0".to_owned()];
        let on = BpfStats::enable()?;
        let before: Vec<_> = progs.iter().map(|(_, id)| stats(*id)).collect();
        self.client(cgroup, &args)?;
        let after: Vec<_> = progs.iter().map(|(_, id)| stats(*id)).collect();
        drop(on);
        #[expect(clippy::cast_precision_loss, reason = "a small count")]
        let n = connections as f64;
        let mut costs: Vec<ProgramCost> = progs
            .into_iter()
            .zip(before.iter().zip(&after))
            .filter_map(|((name, _), (b, a))| {
                let runs = a.1 - b.1;
                (runs > 0.0).then(|| ProgramCost { name, ns: (a.0 - b.0) / runs, per_connection: runs / n })
            })
            .collect();
        costs.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(costs)
    }

    /// One client run, untagged or inside the tagged cgroup `tagged`; its JSON line.
    fn client(&self, tagged: Option<&Path>, args: &[String]) -> anyhow::Result<String> {
        let mut cmd = if let Some(cgroup) = tagged {
            // The shell moves itself into the cgroup, then becomes the client.
            let mut c = Command::new("sh");
            c.arg("-c").arg("echo $$ > \"$0\"/cgroup.procs && exec \"$@\"").arg(cgroup).arg(self.client);
            c
        } else {
            Command::new(self.client)
        };
        cmd.args(["bench", "client"]).args(args);
        let (ok, out) = run_cmd_output(&mut cmd)?;
        let line = out.lines().rev().find(|l| l.starts_with('{'));
        match line {
            Some(l) if ok => Ok(l.to_owned()),
            _ => bail!(
                "the bench client failed ({}):\n{out}\nwarden log:\n{}",
                if tagged.is_some() { "tagged" } else { "untagged" },
                tail(&self.dir.join("warden.log"), 30)
            ),
        }
    }

    fn latency(&self, tagged: Option<&Path>, addr: SocketAddr) -> anyhow::Result<Latency> {
        let args = [
            "latency".to_owned(),
            addr.to_string(),
            self.opts.connections.to_string(),
            self.opts.warmup.to_string(),
            self.opts.gap_us.to_string(),
        ];
        let j = self.client(tagged, &args)?;
        Ok(Latency {
            connect_p50: field(&j, "connect_p50_us")?,
            p50: field(&j, "p50_us")?,
            p99: field(&j, "p99_us")?,
            mean: field(&j, "mean_us")?,
        })
    }

    /// The median of `reps` transfers of `bytes` split over `streams` connections, in Gbit/s; and the
    /// median CPU time the `proxy` process spent per GiB moved (user + system, all its threads).
    fn throughput(
        &self,
        tagged: Option<&Path>,
        addr: SocketAddr,
        streams: usize,
        proxy: Option<u32>,
    ) -> anyhow::Result<(f64, Option<f64>)> {
        let args =
            ["throughput".to_owned(), addr.to_string(), self.opts.bytes.to_string(), streams.to_string()];
        let mut runs = Vec::new();
        let mut cpu = Vec::new();
        for _ in 0..self.opts.reps {
            let before = proxy.and_then(cpu_seconds);
            runs.push(field(&self.client(tagged, &args)?, "gbit_s")?);
            if let (Some(b), Some(a)) = (before, proxy.and_then(cpu_seconds)) {
                #[expect(clippy::cast_precision_loss, reason = "a byte count far below 2^52")]
                let gib = self.opts.bytes as f64 / f64::from(1u32 << 30);
                cpu.push((a - b) / gib);
            }
        }
        Ok((median(&mut runs), (!cpu.is_empty()).then(|| median(&mut cpu))))
    }
}

/// One program's cost to an untagged connection.
struct ProgramCost {
    name: String,
    /// Mean run time, in ns.
    ns: f64,
    /// Runs per connection.
    per_connection: f64,
}

/// `kernel.bpf_stats_enabled` on for as long as this lives; the previous value is put back on drop.
struct BpfStats {
    old: String,
}

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

impl BpfStats {
    fn enable() -> anyhow::Result<Self> {
        let old = std::fs::read_to_string(BPF_STATS).context("reading kernel.bpf_stats_enabled")?;
        std::fs::write(BPF_STATS, "1").context("enabling kernel.bpf_stats_enabled")?;
        Ok(Self { old: old.trim().to_owned() })
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = std::fs::write(BPF_STATS, &self.old);
    }
}

struct Latency {
    connect_p50: f64,
    p50: f64,
    p99: f64,
    mean: f64,
}

impl Latency {
    fn summary(&self) -> String {
        format!("set-up p50 {:.0} µs, p99 {:.0} µs", self.p50, self.p99)
    }
}

struct Case {
    name: &'static str,
    latency: Latency,
    /// Gbit/s over 1 and over 4 connections.
    tput: Option<(f64, f64)>,
    /// CPU seconds the proxy spent per GiB relayed over 1 connection.
    cpu: Option<f64>,
}

struct Round {
    cases: Vec<Case>,
    /// p50 and p99 of an fdatasync'd small append on the audit record's disk, in µs.
    flush: (f64, f64),
    /// What each of Warden's programs costs an untagged connection.
    programs: Vec<ProgramCost>,
    /// Where the sequential run's set-up through Warden went.
    breakdown: Option<Breakdown>,
    concurrency: Concurrency,
    load_before: String,
    load_after: String,
    /// Other Warden instances (tests, demos) with programs pinned at the start or end of the round: their
    /// programs run on every connect() too.
    others: Vec<String>,
}

impl Round {
    fn find(&self, prefix: &str) -> Option<&Case> {
        self.cases.iter().find(|c| c.name.starts_with(prefix))
    }

    fn case(&self, prefix: &str) -> &Case {
        self.cases.iter().find(|c| c.name.starts_with(prefix)).expect("every round measures every case")
    }

    fn markdown(&self) -> String {
        let mut s = String::from(
            "| case | connect() p50 | set-up p50 | set-up p99 | set-up mean | 1 conn | 4 conns | proxy CPU per GiB |\n|---|---:|---:|---:|---:|---:|---:|---:|\n",
        );
        for c in &self.cases {
            let (one, four) = c.tput.map_or(("—".into(), "—".into()), |(a, b)| {
                (format!("{a:.2} Gbit/s"), format!("{b:.2} Gbit/s"))
            });
            let cpu = c.cpu.map_or("—".into(), |v| format!("{v:.2} s"));
            let _ = writeln!(
                s,
                "| {} | {:.0} µs | {:.0} µs | {:.0} µs | {:.0} µs | {one} | {four} | {cpu} |",
                c.name, c.latency.connect_p50, c.latency.p50, c.latency.p99, c.latency.mean
            );
        }
        let _ = write!(
            s,
            "\nLoad average before: {}; after: {}. A small append + fdatasync on the audit record's disk, \
             measured during the round: p50 {:.0} µs, p99 {:.0} µs.\n",
            self.load_before, self.load_after, self.flush.0, self.flush.1
        );
        if !self.programs.is_empty() {
            let total: f64 = self.programs.iter().map(|p| p.ns * p.per_connection).sum();
            let each: Vec<String> = self
                .programs
                .iter()
                .map(|p| format!("`{}` {:.0} ns × {:.1}", p.name, p.ns, p.per_connection))
                .collect();
            let _ = writeln!(
                s,
                "Warden's programs on an untagged loopback connection (kernel BPF statistics, mean run time × \
                 runs per connection, both ends on this host): {}; {total:.0} ns per connection in all.",
                each.join(", ")
            );
        }
        if let Some(b) = &self.breakdown {
            let _ = write!(s, "\n{}", b.markdown());
        }
        let _ = write!(s, "\n{}", self.concurrency.markdown());
        if self.others.is_empty() {
            s.push_str("No other Warden instance was attached.\n");
        } else {
            let _ = writeln!(
                s,
                "Other Warden instances attached during the round (their programs also ran on every connect()): {}.",
                self.others.join(", ")
            );
        }
        s
    }

    /// The numbers the goals are decided on.
    fn goals(&self) -> Goals {
        let (base, after, attached, warden, ha) = (
            self.case("direct, no"),
            self.case("direct, after"),
            self.case("direct, untagged"),
            self.case("through Warden (tagged)"),
            self.case("through haproxy"),
        );
        // Against the fastest direct run of the round: scheduling noise on a shared machine only ever adds
        // latency, so this errs against Warden rather than for it.
        let direct = base.latency.p50.min(attached.latency.p50).min(after.latency.p50);
        let (w1, w4) = warden.tput.unwrap_or_default();
        let (h1, h4) = ha.tput.unwrap_or_default();
        let (d1, d4) = attached.tput.unwrap_or_default();
        let copying = self.find("through Warden, copying relay");
        let connect_delta = attached.latency.connect_p50 - base.latency.connect_p50;
        // How far two untagged runs without any Warden program drift apart on this machine right now.
        let connect_noise = (after.latency.connect_p50 - base.latency.connect_p50).abs();
        Goals {
            direct,
            warden_p50: warden.latency.p50,
            warden_p99: warden.latency.p99,
            concurrency_falls: self.concurrency.falls(),
            added: warden.latency.p50 - direct,
            tmpfs_added: self.find("through Warden, audit on tmpfs").map(|t| t.latency.p50 - direct),
            w1,
            w4,
            h1,
            h4,
            d1,
            d4,
            copy: copying.and_then(|c| c.tput),
            copy_cpu: copying.and_then(|c| c.cpu),
            warden_cpu: warden.cpu,
            cpu: warden.cpu.zip(ha.cpu),
            connect: (attached.latency.connect_p50, base.latency.connect_p50),
            connect_delta,
            connect_noise,
            setup_delta: attached.latency.p50 - base.latency.p50,
            setup_noise: (after.latency.p50 - base.latency.p50).abs(),
            bpf_ns: self.programs.iter().map(|p| p.ns * p.per_connection).sum(),
        }
    }

    /// The goals, each with the numbers that decide it.
    fn verdict(&self) -> String {
        let g = self.goals();
        let cpu = g.cpu.map_or(String::new(), |(w, h)| {
            format!(
                "- CPU per GiB relayed (1 conn, load-independent): Warden {w:.2} s, haproxy {h:.2} s ({:+.0} %).\n",
                pct(w, h)
            )
        });
        let wire = format!(
            "- Throughput at least 0.9x direct: 1 conn {:.2} vs {:.2} Gbit/s ({:.2}x), 4 conns {:.2} vs {:.2} Gbit/s ({:.2}x): {}.\n",
            g.w1,
            g.d1,
            g.w1 / g.d1,
            g.w4,
            g.d4,
            g.w4 / g.d4,
            met(g.wire_met()),
        );
        let path = g.copy.map_or(String::new(), |(c1, c4)| {
            let cpu = |v: Option<f64>| v.map_or("—".into(), |v| format!("{v:.2} s"));
            format!(
                "- Relay path: spliced (the default) 1 conn {:.2} Gbit/s, 4 conns {:.2} Gbit/s, CPU per GiB {}; copying relay (`tcp_relay = \"copy\"`) {c1:.2} / {c4:.2} Gbit/s, CPU per GiB {}.\n",
                g.w1,
                g.w4,
                cpu(g.warden_cpu),
                cpu(g.copy_cpu),
            )
        });
        let disk = g.tmpfs_added.map_or(String::new(), |t| {
            format!(
                "- Where the added latency goes: with the audit record on tmpfs (no disk flush) Warden adds \
                 {t:.0} µs at p50, so the durable `session.start` record accounts for about {:.0} µs of the \
                 {:.0} µs (one bare fdatasync on this disk: p50 {:.0} µs).\n",
                g.added - t,
                g.added,
                self.flush.0,
            )
        });
        format!(
            "- Throughput at least haproxy's: 1 conn {:.2} vs {:.2} Gbit/s ({:+.0} %), 4 conns {:.2} vs {:.2} Gbit/s ({:+.0} %): {}.\n\
             - Added set-up latency p50 under {LATENCY_GOAL_US:.0} µs: {:.0} µs (Warden {:.0} µs − the fastest direct run's {:.0} µs): {}.\n\
             - Set-up p99 under 2× p50 through Warden: p99 {:.0} µs, p50 {:.0} µs: {}.\n\
             - With 8 and 64 parallel connectors what a connection adds through Warden falls, not rises: {}.\n\
             - Untagged processes' connect() unchanged: connect() p50 {:.0} µs with Warden's programs attached vs {:.0} µs without ({:+.0} µs; the two runs without differ by {:.0} µs); set-up p50 {:+.0} µs (runs without differ by {:.0} µs): {}.\n",
            g.w1,
            g.h1,
            pct(g.w1, g.h1),
            g.w4,
            g.h4,
            pct(g.w4, g.h4),
            met(g.throughput_met()),
            g.added,
            g.warden_p50,
            g.direct,
            met(g.latency_met()),
            g.warden_p99,
            g.warden_p50,
            met(g.tail_met()),
            met(g.concurrency_met()),
            g.connect.0,
            g.connect.1,
            g.connect_delta,
            g.connect_noise,
            g.setup_delta,
            g.setup_noise,
            met(g.untagged_met()),
        ) + &wire
            + &path
            + &cpu
            + &disk
    }
}

fn met(b: bool) -> &'static str {
    if b { "**met**" } else { "**not met**" }
}

/// One round's numbers, as the goals judge them (µs, Gbit/s, s).
struct Goals {
    direct: f64,
    warden_p50: f64,
    warden_p99: f64,
    /// Whether what a connection adds through Warden falls with 8 and 64 parallel connectors.
    concurrency_falls: Option<bool>,
    added: f64,
    tmpfs_added: Option<f64>,
    w1: f64,
    w4: f64,
    h1: f64,
    h4: f64,
    /// Direct (untagged, Warden attached), 1 and 4 connections.
    d1: f64,
    d4: f64,
    /// Through Warden with the copying relay (`tcp_relay = "copy"`): Gbit/s over 1 and 4, CPU per GiB.
    copy: Option<(f64, f64)>,
    copy_cpu: Option<f64>,
    warden_cpu: Option<f64>,
    /// CPU per GiB: Warden, haproxy.
    cpu: Option<(f64, f64)>,
    /// connect() p50: with Warden's programs attached, without.
    connect: (f64, f64),
    connect_delta: f64,
    connect_noise: f64,
    setup_delta: f64,
    setup_noise: f64,
    /// BPF run time per untagged connection, in ns.
    bpf_ns: f64,
}

impl Goals {
    fn throughput_met(&self) -> bool {
        self.w1 >= self.h1 && self.w4 >= self.h4
    }

    /// Bulk throughput at least 0.9x direct over 1 connection and over 4.
    fn wire_met(&self) -> bool {
        self.w1 >= 0.9 * self.d1 && self.w4 >= 0.9 * self.d4
    }

    fn latency_met(&self) -> bool {
        self.added < LATENCY_GOAL_US
    }

    fn tail_met(&self) -> bool {
        self.warden_p99 < 2.0 * self.warden_p50
    }

    fn concurrency_met(&self) -> bool {
        self.concurrency_falls == Some(true)
    }

    /// Unchanged: no more above the baseline than two runs without differ, give or take 2 µs.
    fn untagged_met(&self) -> bool {
        self.connect_delta <= self.connect_noise + 2.0
    }
}

/// The rounds side by side, with how many met each goal.
fn summary(rounds: &[Round]) -> String {
    let mut s = String::from(
        "| round | Warden vs haproxy, 1 conn | 4 conns | added set-up p50 | of it, without the disk flush | untagged connect() p50 Δ (noise) | BPF per untagged connection |\n|---|---:|---:|---:|---:|---:|---:|\n",
    );
    let (mut tput, mut lat, mut untagged, mut tail, mut conc) = (0, 0, 0, 0, 0);
    let (mut deltas, mut bpf) = (Vec::new(), Vec::new());
    for (i, r) in rounds.iter().enumerate() {
        let g = r.goals();
        tput += usize::from(g.throughput_met());
        lat += usize::from(g.latency_met());
        tail += usize::from(g.tail_met());
        conc += usize::from(g.concurrency_met());
        untagged += usize::from(g.untagged_met());
        deltas.push(g.connect_delta);
        if g.bpf_ns > 0.0 {
            bpf.push(g.bpf_ns);
        }
        let _ = writeln!(
            s,
            "| {} | {:+.0} % | {:+.0} % | {:.0} µs | {} | {:+.0} µs ({:.0} µs) | {:.1} µs |",
            i + 1,
            pct(g.w1, g.h1),
            pct(g.w4, g.h4),
            g.added,
            g.tmpfs_added.map_or("—".into(), |t| format!("{t:.0} µs")),
            g.connect_delta,
            g.connect_noise,
            g.bpf_ns / 1000.0,
        );
    }
    let _ = writeln!(
        s,
        "\nRounds meeting each goal, of {}: throughput at least haproxy's {tput}; added set-up latency p50 under \
         {LATENCY_GOAL_US:.0} µs {lat}; set-up p99 under 2× p50 {tail}; cost per connection falling with parallel \
         connectors {conc}; untagged connect() unchanged (within the round's noise) {untagged}.",
        rounds.len()
    );
    if !bpf.is_empty() {
        let _ = writeln!(
            s,
            "Across the rounds the untagged connect() p50 moved by a median of {:+.0} µs, and Warden's programs \
             ran for a median of {:.1} µs per untagged connection: inside one round's noise, but not nothing.",
            median(&mut deltas),
            median(&mut bpf) / 1000.0
        );
    }
    s
}

/// What a durable append costs on the disk under `dir`: 200 appends of a record-sized line, each followed
/// by fdatasync; p50 and p99 in µs.
fn flush_latency(dir: &Path) -> anyhow::Result<(f64, f64)> {
    let path = dir.join("bench-flush-probe");
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&path)?;
    let line = [b'x'; 400];
    let mut t = Vec::with_capacity(200);
    for _ in 0..200 {
        f.write_all(&line)?;
        let started = Instant::now();
        f.sync_data()?;
        t.push(started.elapsed().as_secs_f64() * 1e6);
    }
    drop(f);
    std::fs::remove_file(&path)?;
    t.sort_by(f64::total_cmp);
    Ok((percentile(&t, 0.5), percentile(&t, 0.99)))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// User + system CPU time of a process (all its threads), from /proc.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<u32>().ok()? + fields.get(12)?.parse::<u32>().ok()?;
    // USER_HZ is 100 on every Linux this runs on.
    Some(f64::from(ticks) / 100.0)
}

fn pct(a: f64, b: f64) -> f64 {
    if b > 0.0 { (a / b - 1.0) * 100.0 } else { 0.0 }
}

/// The machine and the conditions, as written next to the numbers.
struct Machine {
    cpus: usize,
    cpu: String,
    kernel: String,
    haproxy: String,
    commit: String,
    date: String,
    state_fs: String,
    haproxy_threads: usize,
    build: String,
}

impl Machine {
    fn read(haproxy: &Path, dir: &Path) -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name").and_then(|r| r.split_once(':')).map(|(_, v)| v.trim()))
            .unwrap_or("unknown")
            .to_owned();
        let kernel =
            std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_owned();
        let haproxy = output(Command::new(haproxy).arg("-v")).lines().next().unwrap_or_default().to_owned();
        let mut commit =
            output(Command::new("git").arg("-C").arg(root()).args(["rev-parse", "--short", "HEAD"]));
        let dirty = !Command::new("git")
            .arg("-C")
            .arg(root())
            .args(["diff", "--quiet", "HEAD", "--", "agent", "ebpf"])
            .status()
            .is_ok_and(|s| s.success());
        if dirty {
            commit.push_str(" (with uncommitted changes under agent/ or ebpf/)");
        }
        let date = output(Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"]));
        let state_fs = output(Command::new("df").args(["--output=fstype,source"]).arg(dir))
            .lines()
            .nth(1)
            .unwrap_or("")
            .to_owned();
        Self {
            cpus: std::thread::available_parallelism().map_or(0, usize::from),
            cpu,
            kernel,
            haproxy,
            commit,
            date,
            state_fs: state_fs.split_whitespace().collect::<Vec<_>>().join(" on "),
            haproxy_threads: 0,
            build: "release build".into(),
        }
    }

    fn markdown(&self) -> String {
        format!(
            "Machine: {} CPUs ({}), kernel {}; {}; Warden {} ({}); {}. Warden's state and audit \
             directory on {}.",
            self.cpus, self.cpu, self.kernel, self.haproxy, self.commit, self.build, self.date, self.state_fs
        )
    }
}

/// One-off experiments this command does not repeat (they needed other daemon builds, or strace).
const RELAY_NOTE: &str = "\n### Relay path (one-off experiment; the spliced and copying rows are repeated by this command)\n\n\
On 2026-12-07 (18:09-18:13 UTC, load average 5.6-7.1: other helpers were building and benchmarking), \
`cargo xtask bench --quick --mib 512 --reps 3` with a daemon build whose pipe size was set by an environment \
variable, each line one run (direct, spliced, copying relay and haproxy side by side), Gbit/s over 1 / 4 \
connections and proxy CPU per GiB over 1:\n\n\
| pipe size | direct | spliced (`tcp_relay = \"splice\"`) | copying (`tcp_relay = \"copy\"`) |\n\
|---:|---:|---:|---:|\n\
| 64 KiB | 18.27 / 19.56 | 8.38 / 8.50, 0.36 s | 3.45 / 5.22, 0.96 s |\n\
| 256 KiB | 12.84 / 15.64 | 6.92 / 10.62, 0.32 s | 4.91 / 7.43, 0.84 s |\n\
| 1 MiB | 15.26 / 13.08 | 9.64 / 8.10, 0.26 s | 4.02 / 6.30, 0.94 s |\n\n\
haproxy in the 1 MiB run: 4.03 / 4.44 Gbit/s, 1.02 s per GiB. Splicing takes a third to a quarter of the \
copying relay's CPU per GiB (the bytes are passed on by page reference; what is left is the system calls and \
the second TCP stack), and 1 MiB pipes the least of the three sizes, so `agent/src/protocol/tcp/pipes.rs` \
asks for 1 MiB (the kernel's default `fs.pipe-max-size`). The lead's quiet reference run (17:48 UTC, load \
0.5-1.2, 1 GiB × 3, main's copying relay) had direct 13.13 / 39.89, Warden 7.97 / 10.06 at 0.92 s per GiB \
and haproxy 6.11 / 7.20 at 1.32 s. The sockmap splice (`agent/src/protocol/splice.rs`, a verdict program \
redirecting between the two sockets; not wired) was not re-measured: an earlier run had it at 1.87 / 2.61 \
Gbit/s against 5.34 / 3.55 direct, below the copying relay, because the kernel's psock worker backs off a \
jiffy whenever the peer's send buffer is full. On this 2-CPU machine the client, the target and the proxy \
share two cores, so a relay's throughput against direct is bounded by what its CPU takes from the two \
peers; the 0.9x-direct goal is not met (0.46-0.68x in these runs). Two runs of the final build (18:27 and 18:30 UTC, load 4.3 and 5.7; the first is Round 1 above): \
spliced 9.52 / 9.30 Gbit/s at 0.28 s per GiB and 9.59 / 9.25 at 0.20 s, copying 8.12 / 12.66 at 0.98 s and \
6.70 / 8.31 at 0.80 s, direct 25.72 / 27.41 and 8.82 / 14.25. The spliced relay's Gbit/s stayed between 6.9 and \
10.6 in every run while the daemon used a quarter to a third of a CPU, so the daemon alone is not what \
limits it. Suspects, not yet tested: each direction fills its pipe, then drains it, and does not read while \
the destination's send buffer is full (overlapping the two is the next thing to try); and the two peers and \
the daemon share two cores with the other work on the machine.\n\n\
### Relay buffer (one-off experiment, not repeated by this command)\n\n\
On 2026-11-23, with the load average at 4–7, 512 MiB × 3 per point, daemon builds whose relay was chosen by \
an environment variable: proxy CPU per GiB over 1 connection was 0.68 s and 0.68 s with the 32 KiB \
per-direction buffers, 0.62 s and 0.44 s with 128 KiB, 0.48 s with 256 KiB, and 0.62 s with tokio's \
`copy_bidirectional_with_sizes` at 128 KiB; haproxy took 0.76–1.10 s in the same runs, and Warden's Gbit/s \
was above haproxy's in every one of them. Larger buffers may save some CPU, but the runs scatter as much as \
the differences and each session would hold 4–8 times the memory, so `agent/src/protocol/tcp/relay.rs` keeps \
32 KiB (it is now the `tcp_relay = \"copy\"` path and the fallback).\n\n\
### Where a Warden connection's set-up went before the step histograms (one-off, not repeated by this command)\n\n\
`strace -f -c` on the daemon for 8 s of the sequential latency loop (647 connections), on an earlier build: \
two `fdatasync` calls per connection (the `session.start` record, and the `session.end` record's own flush; \
since then a record nobody waits on is made durable with the next durable batch or within 50 ms, so a \
sequential connection pays one). Pausing 3 ms before each timed connection (`--gap-us 3000`) did not make \
the durable record cheaper, so waiting behind the previous flush was not why it cost 2–3 times a bare \
`fdatasync`. Each round above now says where the time goes, step by step, from the daemon's own \
`warden_setup_step_seconds` histograms: the `durable` row against `batch` (the write and fdatasync \
themselves) is the hand-off cost. Per connection the daemon made one `bpf()` call (the origin lookup), one \
`openat` + `read` of `/proc/PID/cgroup` and one upstream `connect`; the procfs read is now made once per \
cgroup (a `statx` checks the cached path still names that cgroup), and the session whose record finds the \
writer idle writes and fdatasyncs its batch itself (`block_in_place`) instead of handing it to a writer task \
and back (see \"Group commit led by the appends\").\n";

fn section(machine: &Machine, opts: &Options, rounds: &[Round], leftovers: &[String]) -> String {
    let mut s = String::from("## Data path\n\n");
    s.push_str("Measured by `cargo xtask bench` (xtask/src/bench.rs). ");
    s.push_str(&machine.markdown());
    let _ = write!(
        s,
        "\n\nEverything on loopback: a target server on {TARGET_IP} (threads, in the xtask process); the load \
         generator is the xtask binary itself, run untagged (direct, haproxy) or in a cgroup tagged with \
         `warden tag` (through Warden: its connects to {TARGET_IP} are redirected by the kernel to Warden's \
         proxy). haproxy runs `mode tcp` with its defaults ({} threads, i.e. one per CPU; 16 KiB buffers, no \
         splicing). Warden runs with its defaults (a tokio worker per CPU; opaque TCP spliced through kernel \
         pipes of up to 1 MiB, lent to a direction only while it moves data), and every session's `session.start` record is made durable (written and fdatasync'd) before the \
         first byte goes upstream.\n\n\
         - **Set-up latency**: {} sequential connections after {} warm-up ones (the first one obtains the \
         token and issues the grant), each timed from `connect()` to the first byte of the target's answer \
         (connect, write 1 byte, read 1 byte, close). **connect()** is the syscall alone: for a tagged process \
         it completes against Warden's listener, before Warden has done anything.\n\
         - **Throughput**: {} MiB sent one way (client to target, then half-close, then the target's byte \
         count back), over 1 connection and split over 4 parallel ones; median of {} transfers. **Proxy CPU \
         per GiB** is the user + system time the proxy process (all threads) spent per GiB over 1 connection, \
         from /proc/PID/stat (10 ms ticks): unlike Gbit/s on a shared 2-CPU machine it hardly depends on \
         what else runs.\n\
         - Each round starts Warden afresh and measures, in order: the untagged baseline before Warden's \
         programs are attached; untagged with them attached; through Warden; through haproxy; through a \
         second Warden whose opaque relay copies through user-space buffers (`tcp_relay = \"copy\"`, the \
         relay path's diagnostic: throughput and CPU per GiB); through a third Warden whose state and audit directory is on tmpfs (a diagnostic of what the disk flush \
         costs; production keeps the record on disk); and the untagged baseline again once Warden is \
         uninstalled (its distance from the first baseline is the noise). {} round(s), one after the other.\n",
        machine.haproxy_threads,
        opts.connections,
        opts.warmup,
        opts.bytes >> 20,
        opts.reps,
        rounds.len()
    );
    let _ = write!(s, "\n### Summary\n\n{}", summary(rounds));
    for (i, r) in rounds.iter().enumerate() {
        let _ = write!(s, "\n### Round {}\n\n{}\n{}", i + 1, r.markdown(), r.verdict());
    }
    s.push_str(RELAY_NOTE);
    if !leftovers.is_empty() {
        let _ = write!(s, "\nLeft behind after the run (a bug): {leftovers:?}\n");
    }
    s
}

/// Replaces the `## Data path` section of `file` (up to the next `## ` heading), or appends it.
fn write_section(file: &Path, section: &str) -> anyhow::Result<()> {
    write_named_section(file, "## Data path", section)
}

/// Replaces (or appends) the section under `heading` in `file`.
pub fn write_named_section(file: &Path, heading: &str, section: &str) -> anyhow::Result<()> {
    let old = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => "# Benchmarks\n".to_owned(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", file.display())),
    };
    let mut out = String::new();
    let mut lines = old.lines().peekable();
    let mut written = false;
    while let Some(l) = lines.next() {
        if l.trim_end() == heading {
            while lines.peek().is_some_and(|n| !n.starts_with("## ")) {
                lines.next();
            }
            out.push_str(section);
            out.push('\n');
            written = true;
        } else {
            out.push_str(l);
            out.push('\n');
        }
    }
    if !written {
        out.push('\n');
        out.push_str(section);
    }
    std::fs::write(file, out).with_context(|| format!("writing {}", file.display()))
}

fn policy(target: SocketAddr) -> String {
    format!(
        "# Warden bench policy (written by `cargo xtask bench`)\ntargets:\n  bench-target:\n    protocol: tcp\n    address: \"{target}\"\nrules:\n  - name: research agents reach the bench target\n    match: {{ groups: [agents-research] }}\n    grant:\n      - target: bench-target\n        access: connect\n        ttl: 60m\n"
    )
}

fn warden_config(
    dir: &Path,
    state: &Path,
    tag: &str,
    (port, metrics): (u16, u16),
    issuer: &str,
    keys: &Path,
    agent_extra: &str,
) -> String {
    let mut t = WardenToml::in_dir(
        dir,
        dir.join("policy.yaml"),
        PathBuf::from(format!("/sys/fs/bpf/{tag}")),
        tag,
        port,
    );
    t.comment = "Warden bench config (written by `cargo xtask bench`)".into();
    t.state_dir = state.to_path_buf();
    t.audit_dir = state.join("audit");
    t.host = "bench-host".into();
    agent_extra.clone_into(&mut t.agent_extra);
    // The set-up breakdown is read from the daemon's own step histograms.
    t.extra = format!("[metrics]\nlisten = \"127.0.0.1:{metrics}\"\n");
    t.identities.push(IdentityToml::private_key(
        IDENTITY,
        issuer,
        "agent-pkjwt-rs",
        &keys.join("agent-pkjwt-rs.pem"),
        "api://warden",
    ));
    t.render()
}

fn haproxy_config(port: u16, target: SocketAddr) -> String {
    format!(
        "# haproxy for `cargo xtask bench`: plain TCP relay, default nbthread\nglobal\n    maxconn 4096\n\ndefaults\n    mode tcp\n    timeout connect 5s\n    timeout client 60s\n    timeout server 60s\n\nfrontend bench\n    bind 127.0.0.1:{port}\n    default_backend target\n\nbackend target\n    server target {target}\n"
    )
}

/// The loopback target: `p` answers one byte; `u` counts bytes until EOF and answers the count.
struct Target {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
}

impl Target {
    fn start() -> anyhow::Result<Self> {
        let listener = TcpListener::bind((TARGET_IP, 0)).with_context(|| format!("binding {TARGET_IP}"))?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let st = stop.clone();
        std::thread::spawn(move || {
            for s in listener.incoming() {
                if st.load(Ordering::Relaxed) {
                    return;
                }
                if let Ok(s) = s {
                    std::thread::spawn(move || serve(s));
                }
            }
        });
        Ok(Self { addr, stop })
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
    }
}

fn serve(mut s: TcpStream) -> std::io::Result<()> {
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    let mut mode = [0u8; 1];
    s.read_exact(&mut mode)?;
    match mode[0] {
        b'p' => {
            s.write_all(b"!")?;
            // Wait for the client's close, so the server never closes first.
            let _ = s.read(&mut mode);
        }
        b'u' => {
            let mut buf = vec![0u8; IO_BUFFER];
            let mut n = 0u64;
            loop {
                match s.read(&mut buf)? {
                    0 => break,
                    k => n += k as u64,
                }
            }
            s.write_all(&n.to_be_bytes())?;
        }
        _ => {}
    }
    Ok(())
}

/// `bench client latency ADDR N WARMUP [GAP_US [PARALLEL]]` (a pause before each timed connection; N split
/// over PARALLEL connector threads) | `bench client throughput ADDR BYTES STREAMS`: one JSON line.
fn client(args: &[String]) -> anyhow::Result<()> {
    match args {
        [mode, addr, n, warmup, rest @ ..] if mode == "latency" && rest.len() <= 2 => {
            let addr: SocketAddr = addr.parse().context("ADDR")?;
            let (n, warmup): (usize, usize) = (n.parse().context("N")?, warmup.parse().context("WARMUP")?);
            let gap = Duration::from_micros(rest.first().map_or(Ok(0), |g| g.parse()).context("GAP_US")?);
            let connectors: usize = rest.get(1).map_or(Ok(1), |p| p.parse()).context("PARALLEL")?;
            ensure!(connectors >= 1, "PARALLEL must be at least 1");
            for _ in 0..warmup {
                ping(addr)?;
            }
            // Each connector makes its share of the N connections one after the other.
            let each = n.div_ceil(connectors);
            let started = Instant::now();
            let workers: Vec<_> = (0..connectors)
                .map(|_| {
                    std::thread::spawn(move || -> anyhow::Result<Vec<(f64, f64)>> {
                        (0..each)
                            .map(|_| {
                                std::thread::sleep(gap);
                                ping(addr)
                            })
                            .collect()
                    })
                })
                .collect();
            let mut times = Vec::with_capacity(each * connectors);
            for w in workers {
                times.extend(w.join().map_err(|_| anyhow::anyhow!("a connector thread panicked"))??);
            }
            let secs = started.elapsed().as_secs_f64();
            let (mut connect, mut total): (Vec<f64>, Vec<f64>) = times.into_iter().unzip();
            connect.sort_by(f64::total_cmp);
            total.sort_by(f64::total_cmp);
            let done = f64::from(u32::try_from(total.len()).unwrap_or(u32::MAX));
            let mean = total.iter().sum::<f64>() / done;
            println!(
                r#"{{"n":{},"connect_p50_us":{:.1},"connect_p99_us":{:.1},"p50_us":{:.1},"p99_us":{:.1},"mean_us":{mean:.1},"per_s":{:.1}}}"#,
                total.len(),
                percentile(&connect, 0.50),
                percentile(&connect, 0.99),
                percentile(&total, 0.50),
                percentile(&total, 0.99),
                done / secs,
            );
            Ok(())
        }
        [mode, addr, bytes, streams] if mode == "throughput" => {
            let addr: SocketAddr = addr.parse().context("ADDR")?;
            let (bytes, streams): (u64, u64) =
                (bytes.parse().context("BYTES")?, streams.parse().context("STREAMS")?);
            ensure!(streams >= 1, "STREAMS must be at least 1");
            let per = bytes / streams;
            let started = Instant::now();
            let workers: Vec<_> =
                (0..streams).map(|_| std::thread::spawn(move || upload(addr, per))).collect();
            for w in workers {
                w.join().map_err(|_| anyhow::anyhow!("an upload thread panicked"))??;
            }
            let secs = started.elapsed().as_secs_f64();
            let sent = per * streams;
            #[expect(clippy::cast_precision_loss, reason = "a byte count far below 2^52")]
            let bits = sent as f64 * 8.0;
            println!(
                r#"{{"bytes":{sent},"streams":{streams},"secs":{secs:.4},"gbit_s":{:.3}}}"#,
                bits / secs / 1e9
            );
            Ok(())
        }
        _ => bail!(
            "usage: bench client latency ADDR N WARMUP [GAP_US [PARALLEL]] | bench client throughput ADDR BYTES STREAMS"
        ),
    }
}

/// One connection: connect, write a byte, read the answer, close. Microseconds to connect and to the answer.
fn ping(addr: SocketAddr) -> anyhow::Result<(f64, f64)> {
    let started = Instant::now();
    let mut s =
        TcpStream::connect_timeout(&addr, IO_TIMEOUT).with_context(|| format!("connecting to {addr}"))?;
    let connected = started.elapsed();
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.write_all(b"p")?;
    let mut b = [0u8; 1];
    s.read_exact(&mut b).with_context(|| format!("no answer from {addr}"))?;
    let answered = started.elapsed();
    Ok((connected.as_secs_f64() * 1e6, answered.as_secs_f64() * 1e6))
}

fn upload(addr: SocketAddr, n: u64) -> anyhow::Result<()> {
    let mut s =
        TcpStream::connect_timeout(&addr, IO_TIMEOUT).with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    s.write_all(b"u")?;
    let buf = vec![0x5au8; IO_BUFFER];
    let mut left = n;
    while left > 0 {
        let k = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
        s.write_all(&buf[..k])?;
        left -= k as u64;
    }
    s.shutdown(Shutdown::Write)?;
    let mut got = [0u8; 8];
    s.read_exact(&mut got).context("the target did not confirm the upload")?;
    let got = u64::from_be_bytes(got);
    ensure!(got == n, "the target received {got} bytes of {n}");
    Ok(())
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss,
        reason = "an index into a short, non-empty sample"
    )]
    let i = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

/// A numeric field of a flat JSON object.
fn field(json: &str, key: &str) -> anyhow::Result<f64> {
    let pat = format!("\"{key}\":");
    let rest = &json[json.find(&pat).with_context(|| format!("no {key} in {json}"))? + pat.len()..];
    let end = rest.find([',', '}']).unwrap_or(rest.len());
    rest[..end].trim().parse().with_context(|| format!("{key} in {json}"))
}

fn output(cmd: &mut Command) -> String {
    cmd.output().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned()).unwrap_or_default()
}

fn loadavg() -> String {
    let l = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    l.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}

fn tail(file: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(file).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .chain(["/usr/sbin", "/sbin"])
        .map(|d| Path::new(d).join(program))
        .find(|p| p.is_file())
}

fn free_port() -> anyhow::Result<u16> {
    loop {
        let l = TcpListener::bind("127.0.0.1:0")?;
        let port = l.local_addr()?.port();
        drop(l);
        if TcpListener::bind(("::1", port)).is_ok() {
            return Ok(port);
        }
    }
}

/// Waits up to 10 s for something to accept on `addr`.
fn wait_listening(addr: SocketAddr, log: &Path) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        if Instant::now() > deadline {
            bail!("nothing listens on {addr}:\n{}", tail(log, 20));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

fn is_tmpfs(path: &Path) -> bool {
    output(Command::new("df").args(["--output=fstype"]).arg(path)).lines().nth(1) == Some("tmpfs")
}

/// The cgroup2 mount point.
pub fn cgroup_root() -> anyhow::Result<PathBuf> {
    cgroup2_root()
}

fn cgroup2_root() -> anyhow::Result<PathBuf> {
    warden_test_support::cgroup_root().context("cgroup2 is not mounted")
}

/// The bpffs directories of other Warden instances on this machine (tests, the demo).
fn other_wardens(tag: &str) -> Vec<String> {
    std::fs::read_dir("/sys/fs/bpf")
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("warden") && n != tag)
                .collect()
        })
        .unwrap_or_default()
}

/// Anything of this run still pinned in bpffs or left in the cgroup tree.
fn leftovers(tag: &str) -> Vec<String> {
    let mut left = Vec::new();
    if Path::new("/sys/fs/bpf").join(tag).exists() {
        left.push(format!("/sys/fs/bpf/{tag}"));
    }
    if let Ok(root) = cgroup2_root()
        && root.join(tag).exists()
    {
        left.push(root.join(tag).display().to_string());
    }
    left
}
