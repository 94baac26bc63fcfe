//! The set-up side of `cargo xtask bench`: where an admitted connection's set-up time goes (the daemon's
//! `warden_setup_step_seconds` histograms, scraped before and after the sequential run through Warden),
//! and how set-up scales with parallel connectors (group commit), Warden vs haproxy vs direct.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::Context as _;

/// The parallel connector counts the concurrency table measures.
pub const PARALLEL: [usize; 3] = [1, 8, 64];

/// The steps the daemon times, in the order they happen, with what each covers.
const STEPS: [(&str, &str); 12] = [
    ("accept", "kernel `connect()` → the proxy's connection task runs (redirect, handshake, accept, spawn)"),
    ("origin", "origin lookup: the kernel map read and the cgroup path"),
    ("hello", "target and hello (opaque TCP reads nothing)"),
    ("identity", "binding and verified identity (the cached token)"),
    ("policy", "policy decision"),
    ("grant", "the live grant"),
    ("record", "building the `session.start` record"),
    ("queue", "`session.start` queued → the writer takes its batch"),
    ("batch", "the writer's batch: serialise, hash, write, fdatasync"),
    ("durable", "`session.start` appended → durable (queue + batch + hand-off back)"),
    ("connect", "upstream connect (overlaps `durable`)"),
    ("total", "kernel `connect()` → the handler starts relaying"),
];

/// Sums and counts of the histograms the breakdown reads, from one scrape.
#[derive(Default, Clone)]
pub struct Scrape {
    /// Histogram name (with its labels) → (sum, count).
    hist: BTreeMap<String, (f64, f64)>,
}

impl Scrape {
    /// Reads the daemon's `/metrics` (plain HTTP/1.1 on loopback).
    pub fn read(addr: SocketAddr) -> anyhow::Result<Self> {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .with_context(|| format!("connecting to the metrics endpoint {addr}"))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(s, "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
        let mut text = String::new();
        s.read_to_string(&mut text).context("reading /metrics")?;
        let mut hist = BTreeMap::new();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let Some((name, value)) = line.rsplit_once(' ') else { continue };
            let Ok(v) = value.parse::<f64>() else { continue };
            for (suffix, sum) in [("_sum", true), ("_count", false)] {
                let base = name.split_once('{').unwrap_or((name, ""));
                if let Some(stem) = base.0.strip_suffix(suffix) {
                    let key = format!("{stem}{{{}", base.1);
                    let e: &mut (f64, f64) = hist.entry(key).or_default();
                    if sum {
                        e.0 = v;
                    } else {
                        e.1 = v;
                    }
                }
            }
        }
        Ok(Self { hist })
    }

    /// The mean of `key` over the observations between `before` and `self`, and how many there were.
    fn mean_since(&self, before: &Scrape, key: &str) -> Option<(f64, f64)> {
        let (s1, c1) = self.hist.get(key)?;
        let (s0, c0) = before.hist.get(key).copied().unwrap_or_default();
        let n = c1 - c0;
        (n > 0.0).then(|| ((s1 - s0) / n, n))
    }

    fn step(&self, before: &Scrape, step: &str) -> Option<(f64, f64)> {
        self.mean_since(before, &format!("warden_setup_step_seconds{{step=\"{step}\"}}"))
            .map(|(m, n)| (m * 1e6, n))
    }

    /// Records made durable per fdatasync, and the mean fdatasync in µs, between `before` and `self`.
    pub fn commits(&self, before: &Scrape) -> (Option<f64>, Option<f64>) {
        (
            self.mean_since(before, "warden_audit_batch_records{").map(|m| m.0),
            self.mean_since(before, "warden_audit_fsync_duration_seconds{").map(|m| m.0 * 1e6),
        )
    }
}

/// A step, what it covers, and its mean (µs) and observations, if it was observed.
type Step = (&'static str, &'static str, Option<(f64, f64)>);

/// Where the sequential run's set-up went, step by step (means, µs).
pub struct Breakdown {
    steps: Vec<Step>,
    /// The client's mean set-up (connect → first byte back), µs.
    client_mean: f64,
    /// Records per fdatasync and the mean fdatasync (µs) during the run.
    commits: (Option<f64>, Option<f64>),
}

impl Breakdown {
    pub fn new(before: &Scrape, after: &Scrape, client_mean: f64) -> Self {
        let steps = STEPS.iter().map(|(s, what)| (*s, *what, after.step(before, s))).collect();
        Self { steps, client_mean, commits: after.commits(before) }
    }

    fn mean(&self, step: &str) -> Option<f64> {
        self.steps.iter().find(|s| s.0 == step).and_then(|s| s.2).map(|m| m.0)
    }

    /// The per-step table.
    pub fn markdown(&self) -> String {
        let mut s = String::from(
            "Where the sequential run's set-up goes through Warden (the daemon's `warden_setup_step_seconds`, \
             means over the timed connections):\n\n| step | mean | what |\n|---|---:|---|\n",
        );
        for (step, what, m) in &self.steps {
            let v = m.map_or("—".into(), |(mean, _)| format!("{mean:.1} µs"));
            let _ = writeln!(s, "| {step} | {v} | {what} |");
        }
        let (queue, batch, durable) = (self.mean("queue"), self.mean("batch"), self.mean("durable"));
        if let (Some(q), Some(b), Some(d)) = (queue, batch, durable) {
            let _ = writeln!(
                s,
                "| (hand-off back) | {:.1} µs | `durable` − `queue` − `batch`: the writer's wake-ups handing the \
                 acknowledgement to the session |",
                d - q - b
            );
        }
        if let Some(total) = self.mean("total") {
            let _ = writeln!(
                s,
                "| (first byte) | {:.1} µs | the client's mean set-up − `total`: the byte relayed up, the target's \
                 answer relayed back |",
                self.client_mean - total
            );
        }
        let (records, sync) = self.commits;
        if let (Some(r), Some(f)) = (records, sync) {
            let _ = writeln!(
                s,
                "\nDuring the run: {r:.2} records per fdatasync, each fdatasync {f:.0} µs on average."
            );
        }
        s
    }
}

/// One cell of the concurrency table.
#[derive(Clone, Copy, Default)]
pub struct Parallel {
    pub p50: f64,
    pub p99: f64,
    /// Connections per second over the timed part.
    pub per_s: f64,
}

/// Set-up with 1, 8 and 64 parallel connectors: direct (Warden attached), through Warden, through haproxy.
pub struct Concurrency {
    /// (connectors, direct, Warden, haproxy, Warden's records per fdatasync).
    pub rows: Vec<(usize, Parallel, Parallel, Parallel, Option<f64>)>,
}

impl Concurrency {
    /// What one connection adds to the wall time through Warden, beyond direct: 1/rate − 1/direct rate, µs.
    fn added_per_connection(direct: Parallel, warden: Parallel) -> f64 {
        if direct.per_s > 0.0 && warden.per_s > 0.0 { 1e6 / warden.per_s - 1e6 / direct.per_s } else { 0.0 }
    }

    /// The cost per connection falls (does not rise) from 1 connector to 8 and to 64.
    pub fn falls(&self) -> Option<bool> {
        let one = self.rows.iter().find(|r| r.0 == 1)?;
        let base = Self::added_per_connection(one.1, one.2);
        Some(self.rows.iter().filter(|r| r.0 > 1).all(|r| Self::added_per_connection(r.1, r.2) <= base))
    }

    pub fn markdown(&self) -> String {
        let mut s = String::from(
            "Parallel connectors (each one sequential connections; direct with Warden's programs attached): set-up \
             p50 and p99 per connection, connections per second, and what a connection through Warden adds to the \
             wall time (1/rate − 1/direct rate), with the records Warden made durable per fdatasync:\n\n\
             | connectors | direct p50 / p99 | Warden p50 / p99 | haproxy p50 / p99 | direct conn/s | Warden conn/s | \
             haproxy conn/s | Warden adds per connection | haproxy adds | records per fdatasync |\n\
             |---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        );
        for (p, d, w, h, records) in &self.rows {
            let _ = writeln!(
                s,
                "| {p} | {:.0} / {:.0} µs | {:.0} / {:.0} µs | {:.0} / {:.0} µs | {:.0} | {:.0} | {:.0} | {:.0} µs | \
                 {:.0} µs | {} |",
                d.p50,
                d.p99,
                w.p50,
                w.p99,
                h.p50,
                h.p99,
                d.per_s,
                w.per_s,
                h.per_s,
                Self::added_per_connection(*d, *w),
                Self::added_per_connection(*d, *h),
                records.map_or("—".into(), |r| format!("{r:.1}")),
            );
        }
        s
    }
}
