//! Per-host cost of audit shipping as hosts are added: many in-process hosts (each its own audit writer
//! and shipper, as on a real host) write records at a steady rate and ship to one local S3-compatible
//! server with Object Lock (moto in server mode, started here unless `--endpoint` is given).
//!
//! `cargo run -p warden --example ship_bench -- [HOSTS,...] [SECONDS] [INTERVAL_MS] [RECORDS_PER_INTERVAL]`
//!
//! Defaults: hosts `1,10,50,100`, 20 s per run, a 1000 ms interval standing for the default one minute,
//! 20 records (~330 bytes each) per host per interval. Prints, per run, each host's requests and bytes per
//! interval (mean and max over hosts) and what that is per hour at a one-minute interval, and how long
//! the last seal took to reach the bucket (whether the server kept up).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use warden::audit::ship::{Connection, ShipOptions, Stats, Store};
use warden::audit::{Audit, AuditOptions, Record, read_shipped, sign};

struct Moto(Child);

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_moto() -> anyhow::Result<(Moto, u16)> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let child = Command::new("moto_server")
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| anyhow::anyhow!("moto_server: {e}; scripts/setup.sh installs moto[server]"))?;
    let moto = Moto(child);
    let end = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        anyhow::ensure!(Instant::now() < end, "moto_server did not listen within 30 s");
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok((moto, port))
}

struct Host {
    _root: tempfile::TempDir,
    dir: PathBuf,
    audit: Audit,
    writer: tokio::task::JoinHandle<()>,
    stop_writer: CancellationToken,
    shipper: tokio::task::JoinHandle<()>,
    stop_shipper: CancellationToken,
    stats: Arc<Stats>,
}

#[expect(clippy::cast_precision_loss, reason = "rates for display")]
fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1).peekable();
    let mut endpoint = None;
    if args.peek().is_some_and(|a| a == "--endpoint") {
        args.next();
        endpoint = args.next();
    }
    let hosts: Vec<usize> = args
        .next()
        .unwrap_or_else(|| "1,10,50,100".into())
        .split(',')
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    let seconds: u64 = args.next().map_or(Ok(20), |s| s.parse())?;
    let interval = Duration::from_millis(args.next().map_or(Ok(1000), |s| s.parse())?);
    let per_interval: u64 = args.next().map_or(Ok(20), |s| s.parse())?;
    let (_moto, endpoint) = if let Some(e) = endpoint {
        (None, e)
    } else {
        let (m, port) = start_moto()?;
        (Some(m), format!("http://127.0.0.1:{port}"))
    };
    let creds_dir = tempfile::tempdir()?;
    let creds = creds_dir.path().join("credentials");
    std::fs::write(&creds, "[default]\naws_access_key_id = bench\naws_secret_access_key = bench-secret\n")?;
    let conn = Connection {
        endpoint: Some(endpoint.clone()),
        region: "us-east-1".into(),
        force_path_style: true,
        ca_file: None,
        credentials_file: Some(creds),
    };
    println!(
        "endpoint {endpoint}; {seconds} s per run, interval {interval:?} (stands for 1 min), {per_interval} records/host/interval"
    );
    println!(
        "| hosts | intervals | requests/host/interval (mean, max) | bytes/host/interval | requests/host/hour at 1 min | MB/host/hour | objects | last seal shipped after |"
    );
    println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    for (run, n) in hosts.iter().copied().enumerate() {
        rt.block_on(async {
            let store = Store::connect(&conn, &format!("bench-{}-{run}", std::process::id())).await?;
            store.create_locked_bucket().await?;
            let mut fleet = Vec::new();
            for h in 0..n {
                let root = tempfile::tempdir()?;
                let mut opts = AuditOptions::in_dir(root.path());
                opts.host = format!("host-{h}");
                opts.config.ship.bucket = toml::Spanned::new(0..0, "bench".into());
                let stop_writer = CancellationToken::new();
                let (audit, writer) = Audit::start_with(&opts, stop_writer.clone())?;
                let stats = Arc::new(Stats::default());
                let ship = ShipOptions {
                    store: store.clone(),
                    prefix: format!("hosts/host-{h}/"),
                    audit_dir: opts.config.dir.clone(),
                    pubkey: sign::load(root.path())?.verifying_key(),
                    retention: Duration::from_secs(86_400),
                    interval,
                    stats: stats.clone(),
                };
                let stop_shipper = CancellationToken::new();
                let shipper = tokio::spawn(warden::audit::ship::run(ship, audit.clone(), stop_shipper.clone()));
                fleet.push(Host {
                    dir: opts.config.dir.clone(),
                    _root: root,
                    audit,
                    writer,
                    stop_writer,
                    shipper,
                    stop_shipper,
                    stats,
                });
            }
            // Steady load: each host writes its records spread over every interval.
            let began = Instant::now();
            let end = began + Duration::from_secs(seconds);
            let mut load = Vec::new();
            for (h, host) in fleet.iter().enumerate() {
                let audit = host.audit.clone();
                let every = interval / u32::try_from(per_interval.max(1)).unwrap_or(u32::MAX);
                load.push(tokio::spawn(async move {
                    let mut tick = tokio::time::interval(every);
                    let mut i = 0u64;
                    while Instant::now() < end {
                        tick.tick().await;
                        let r = Record::new("pg.query")
                            .field("session", format!("h{h}-s{}", i / 10))
                            .field("text", "select id, total from orders where customer_id = $1 and placed_at > $2 order by placed_at desc limit 50")
                            .field("rows", i % 50);
                        let _ = audit.append(r);
                        i += 1;
                    }
                }));
            }
            for l in load {
                l.await?;
            }
            // Everything written so far sealed, then: how long until every host's last seal is in the bucket.
            let sealed_at = Instant::now();
            let mut wants = Vec::new();
            for host in &fleet {
                host.audit.seal().await?;
                wants.push(last_sealed(&host.dir));
            }
            let drain_end = Instant::now() + Duration::from_secs(300);
            for (host, want) in fleet.iter().zip(&wants) {
                while read_shipped(&host.dir)?.is_none_or(|m| Some(m) < *want) {
                    anyhow::ensure!(Instant::now() < drain_end, "shipping did not catch up within 300 s");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            let lag = sealed_at.elapsed();
            let elapsed = began.elapsed();
            let intervals = elapsed.as_secs_f64() / interval.as_secs_f64();
            let mut requests = Vec::new();
            let mut bytes = Vec::new();
            let mut objects = 0;
            for host in fleet {
                host.stop_shipper.cancel();
                host.shipper.await?;
                requests.push(host.stats.requests.load(Ordering::Relaxed) as f64);
                bytes.push(host.stats.bytes.load(Ordering::Relaxed) as f64);
                objects += host.stats.segments.load(Ordering::Relaxed) + 1;
                host.stop_writer.cancel();
                host.writer.await?;
            }
            let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
            let max = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
            let (rq, rq_max, b) = (mean(&requests) / intervals, max(&requests) / intervals, mean(&bytes) / intervals);
            println!(
                "| {n} | {intervals:.1} | {rq:.2}, {rq_max:.2} | {b:.0} | {:.0} | {:.2} | {objects} | {:.2} s |",
                rq * 60.0,
                b * 60.0 / 1e6,
                lag.as_secs_f64()
            );
            anyhow::Ok(())
        })?;
    }
    Ok(())
}

/// The last seq of the newest sealed file in `dir` (every file but the newest is sealed).
fn last_sealed(dir: &std::path::Path) -> Option<u64> {
    let mut firsts: Vec<u64> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            name.strip_prefix("audit-")?.strip_suffix(".jsonl")?.parse().ok()
        })
        .collect();
    firsts.sort_unstable();
    (firsts.len() > 1).then(|| firsts.last().map(|l| l - 1)).flatten()
}
