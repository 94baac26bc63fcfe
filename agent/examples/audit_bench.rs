//! Records per second through the audit writer with group commit (one fdatasync per batch).
//!
//! `cargo run --release -p warden --example audit_bench -- [RECORDS] [CONCURRENCY] [DIR]`
//!
//! Two runs: `durable` (CONCURRENCY sessions, each awaiting `append_durable`, as `session.start` does) and
//! `queued` (`append` without waiting, as in-session records do, then one durable record as a barrier).
//! The audit directory is a fresh temporary directory under DIR (default: the system temp dir).

use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use warden::audit::{Audit, AuditError, AuditOptions, Record};

#[expect(clippy::cast_precision_loss, reason = "a rate for display")]
fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let records: u64 = args.next().map_or(Ok(200_000), |s| s.parse())?;
    let concurrency: u64 = args.next().map_or(Ok(64), |s| s.parse())?;
    let base = args.next().map_or_else(std::env::temp_dir, Into::into);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async {
        let root = tempfile::tempdir_in(&base)?;
        let mut opts = AuditOptions::in_dir(root.path());
        opts.config.queue = 65_536;
        let shutdown = CancellationToken::new();
        let (audit, writer) = Audit::start_with(&opts, shutdown.clone())?;
        println!("audit dir: {}", opts.config.dir.display());

        let start = Instant::now();
        let per_task = records / concurrency;
        let mut tasks = Vec::new();
        for t in 0..concurrency {
            let audit = audit.clone();
            tasks.push(tokio::spawn(async move {
                let mut worst = Duration::ZERO;
                for i in 0..per_task {
                    let began = Instant::now();
                    audit.append_durable(record(t, i)).await?;
                    worst = worst.max(began.elapsed());
                }
                Ok::<_, AuditError>(worst)
            }));
        }
        let mut worst = Duration::ZERO;
        for t in tasks {
            worst = worst.max(t.await??);
        }
        let elapsed = start.elapsed();
        let n = per_task * concurrency;
        println!(
            "durable: {n} records, {concurrency} concurrent sessions, {:.2} s, {:.0} records/s, worst ack {:.1} ms",
            elapsed.as_secs_f64(),
            n as f64 / elapsed.as_secs_f64(),
            worst.as_secs_f64() * 1000.0
        );

        let start = Instant::now();
        let mut sent = 0u64;
        while sent < records {
            match audit.append(record(0, sent)) {
                Ok(()) => sent += 1,
                Err(AuditError::QueueFull) => tokio::task::yield_now().await,
                Err(e) => return Err(e.into()),
            }
        }
        audit.append_durable(Record::new("bench.barrier")).await?;
        let elapsed = start.elapsed();
        println!(
            "queued:  {records} records, {:.2} s, {:.0} records/s",
            elapsed.as_secs_f64(),
            records as f64 / elapsed.as_secs_f64()
        );
        shutdown.cancel();
        writer.await?;
        Ok(())
    })
}

fn record(task: u64, i: u64) -> Record {
    Record::new("pg.query")
        .field("session", format!("bench-{task}"))
        .field("pid", 4000 + task)
        .field("text", "select id, total from orders where customer_id = $1")
        .field("rows", i % 17)
        .field("duration_ms", 1.25)
}
