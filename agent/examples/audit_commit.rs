//! Measures the audit writer's commit path alone, as the daemon drives it (the multi-threaded runtime,
//! one worker per CPU): CONNECTORS tasks each make ROUNDS "connections", a durable `session.start`
//! (waited on) then a `session.end` nobody waits on. Prints one JSON line: the durable wait's p50 and p99,
//! the writer's fdatasyncs and records per fdatasync (from its metrics), and the process's context
//! switches, all per connection. Run it under `strace -f -c -e trace=fdatasync,futex` to count those.
//!
//! usage: audit_commit DIR CONNECTORS ROUNDS

use std::sync::Arc;
use std::time::Instant;

use tokio_util::sync::CancellationToken;
use warden::audit::{Audit, AuditOptions, Record};

#[allow(clippy::cast_precision_loss, clippy::cast_possible_truncation, clippy::cast_sign_loss)]
fn main() {
    let args: Vec<String> = std::env::args().collect();
    let dir = std::path::PathBuf::from(&args[1]);
    let connectors: usize = args[2].parse().expect("CONNECTORS");
    let rounds: usize = args[3].parse().expect("ROUNDS");
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    let metrics = Arc::new(warden::metrics::Metrics::new());
    let (waits, elapsed, switches) = rt.block_on(async {
        let opts = AuditOptions::in_dir(&dir).with_metrics(metrics.clone());
        let shutdown = CancellationToken::new();
        let (audit, handle) = Audit::start_with(&opts, shutdown.clone()).expect("audit");
        // Warm up, then count from here.
        audit.append_durable(Record::new("bench.warm")).await.expect("warm");
        let before = (scrape(&metrics), switches());
        let started = Instant::now();
        let tasks: Vec<_> = (0..connectors)
            .map(|c| {
                let audit = audit.clone();
                tokio::spawn(async move {
                    let mut waits = Vec::with_capacity(rounds);
                    for r in 0..rounds {
                        let t = Instant::now();
                        let start = Record::new("session.start").field("c", c).field("r", r);
                        audit.append_durable(start).await.expect("durable");
                        waits.push(t.elapsed().as_secs_f64() * 1e6);
                        audit
                            .append_or_hold(Record::new("session.end").field("c", c).field("r", r))
                            .expect("end");
                        tokio::task::yield_now().await;
                    }
                    waits
                })
            })
            .collect();
        let mut waits = Vec::new();
        for t in tasks {
            waits.extend(t.await.expect("task"));
        }
        let elapsed = started.elapsed();
        let after = (scrape(&metrics), switches());
        shutdown.cancel();
        handle.await.expect("writer");
        let d = |i: usize| after.0[i] - before.0[i];
        (waits, elapsed, [d(0), d(1), d(2), after.1.0 - before.1.0, after.1.1 - before.1.1])
    });
    let mut waits = waits;
    waits.sort_by(f64::total_cmp);
    let pct = |p: f64| waits[((waits.len() as f64 * p) as usize).min(waits.len() - 1)];
    let n = (connectors * rounds) as f64;
    println!(
        r#"{{"connectors":{connectors},"connections":{n},"durable_p50_us":{:.0},"durable_p99_us":{:.0},"per_s":{:.0},"fsyncs_per_conn":{:.3},"records_per_fsync":{:.2},"fsync_mean_us":{:.0},"vol_cs_per_conn":{:.2},"invol_cs_per_conn":{:.2}}}"#,
        pct(0.5),
        pct(0.99),
        n / elapsed.as_secs_f64(),
        switches[0] / n,
        switches[1] / switches[0].max(1.0),
        switches[2] / switches[0].max(1.0) * 1e6,
        switches[3] / n,
        switches[4] / n,
    );
}

/// (fdatasyncs, records in fdatasync'd batches, seconds spent in fdatasync) so far.
fn scrape(metrics: &warden::metrics::Metrics) -> [f64; 3] {
    let text = metrics.encode(false);
    let v = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|r| r.trim().parse::<f64>().ok()))
            .unwrap_or(0.0)
    };
    [
        v("warden_audit_fsync_duration_seconds_count"),
        v("warden_audit_batch_records_sum"),
        v("warden_audit_fsync_duration_seconds_sum"),
    ]
}

/// Voluntary and involuntary context switches of every thread of this process so far.
fn switches() -> (f64, f64) {
    let mut total = (0.0, 0.0);
    for e in std::fs::read_dir("/proc/self/task").expect("/proc/self/task").flatten() {
        let Ok(status) = std::fs::read_to_string(e.path().join("status")) else { continue };
        for l in status.lines() {
            let num =
                |l: &str| l.split_whitespace().nth(1).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
            if l.starts_with("voluntary_ctxt_switches") {
                total.0 += num(l);
            } else if l.starts_with("nonvoluntary_ctxt_switches") {
                total.1 += num(l);
            }
        }
    }
    total
}
