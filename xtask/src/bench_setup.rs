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
    /// Histogram name (with its labels but `le`) → its cumulative buckets (upper bound, count), in order.
    buckets: BTreeMap<String, Vec<(f64, f64)>>,
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
        let mut buckets: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let Some((name, value)) = line.rsplit_once(' ') else { continue };
            let Ok(v) = value.parse::<f64>() else { continue };
            if let Some((stem, labels)) = name.split_once("_bucket{") {
                // `le` is the last label the exposition writes: `a="x",le="0.1"}` or `le="0.1"}`.
                let labels = labels.trim_end_matches('}');
                let (rest, le) = labels.rsplit_once("le=\"").unwrap_or(("", labels));
                let le = le.trim_end_matches('"');
                let le = if le == "+Inf" { f64::INFINITY } else { le.parse().unwrap_or(f64::NAN) };
                let key = format!("{stem}{{{}", rest.trim_end_matches(','));
                buckets.entry(key).or_default().push((le, v));
                continue;
            }
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
        Ok(Self { hist, buckets })
    }

    /// The median of `key`'s observations between `before` and `self`, from the histogram's buckets
    /// (linear within the bucket that holds it), and how many there were.
    fn p50_since(&self, before: &Scrape, key: &str) -> Option<f64> {
        let now = self.buckets.get(key)?;
        let then = before.buckets.get(key);
        let counts: Vec<(f64, f64)> = now
            .iter()
            .enumerate()
            .map(|(i, (le, c))| (*le, c - then.and_then(|t| t.get(i)).map_or(0.0, |b| b.1)))
            .collect();
        let total = counts.last()?.1;
        if total <= 0.0 {
            return None;
        }
        let half = total / 2.0;
        let mut lower = (0.0, 0.0);
        for (le, c) in counts {
            if c >= half {
                if !le.is_finite() {
                    return Some(lower.0);
                }
                let within = if c > lower.1 { (half - lower.1) / (c - lower.1) } else { 1.0 };
                return Some(lower.0 + (le - lower.0) * within);
            }
            lower = (le, c);
        }
        None
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

    /// The writer's batches and fdatasyncs between `before` and `self`.
    pub fn commits(&self, before: &Scrape) -> Commits {
        let fsync = "warden_audit_fsync_duration_seconds{";
        Commits {
            records: self.mean_since(before, "warden_audit_batch_records{").map(|m| m.0),
            mean: self.mean_since(before, fsync).map(|m| m.0 * 1e6),
            p50: self.p50_since(before, fsync).map(|m| m * 1e6),
            syncs: self.mean_since(before, fsync).map_or(0.0, |m| m.1),
        }
    }
}

/// What the audit writer's commits did over a run.
#[derive(Clone, Copy, Default)]
pub struct Commits {
    /// Records made durable per fdatasync'd batch (mean).
    pub records: Option<f64>,
    /// One fdatasync of the writer: mean and p50, µs.
    pub mean: Option<f64>,
    pub p50: Option<f64>,
    /// How many fdatasyncs.
    pub syncs: f64,
}

impl Commits {
    /// fdatasyncs per connection, over `connections`.
    pub fn per_connection(&self, connections: usize) -> Option<f64> {
        #[expect(clippy::cast_precision_loss, reason = "a small count")]
        let n = connections as f64;
        (connections > 0).then(|| self.syncs / n)
    }
}

/// A step, what it covers, and its mean (µs) and observations, if it was observed.
type Step = (&'static str, &'static str, Option<(f64, f64)>);

/// Where the sequential run's set-up went, step by step (means, µs).
pub struct Breakdown {
    steps: Vec<Step>,
    /// The client's mean set-up (connect → first byte back), µs.
    client_mean: f64,
    /// The writer's commits during the run.
    commits: Commits,
    /// A bare fdatasync of a small append on the same disk: p50 and p99, µs.
    bare: (f64, f64),
}

impl Breakdown {
    pub fn new(before: &Scrape, after: &Scrape, client_mean: f64, bare: (f64, f64)) -> Self {
        let steps = STEPS.iter().map(|(s, what)| (*s, *what, after.step(before, s))).collect();
        Self { steps, client_mean, commits: after.commits(before), bare }
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
        let c = self.commits;
        if let (Some(r), Some(mean), Some(p50)) = (c.records, c.mean, c.p50) {
            let _ = writeln!(
                s,
                "\nDuring the run: {r:.2} records per fdatasync; the writer's fdatasync p50 {p50:.0} µs (mean \
                 {mean:.0} µs) beside a bare fdatasync of a small append on the same disk, p50 {:.0} µs (p99 \
                 {:.0} µs).",
                self.bare.0, self.bare.1
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
    /// (connectors, direct, Warden, haproxy, Warden's commits during its run).
    pub rows: Vec<(usize, Parallel, Parallel, Parallel, Commits)>,
    /// Connections each run made.
    pub connections: usize,
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
             wall time (1/rate − 1/direct rate), with Warden's group commit: records made durable per fdatasync, \
             fdatasyncs per connection (a connection's records: `session.start`, `session.end`), and the \
             writer's fdatasync p50:\n\n\
             | connectors | direct p50 / p99 | Warden p50 / p99 | haproxy p50 / p99 | direct conn/s | Warden conn/s | \
             haproxy conn/s | Warden adds per connection | haproxy adds | records per fdatasync | fdatasyncs per \
             connection | fdatasync p50 |\n\
             |---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        );
        for (p, d, w, h, c) in &self.rows {
            let _ = writeln!(
                s,
                "| {p} | {:.0} / {:.0} µs | {:.0} / {:.0} µs | {:.0} / {:.0} µs | {:.0} | {:.0} | {:.0} | {:.0} µs | \
                 {:.0} µs | {} | {} | {} |",
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
                c.records.map_or("—".into(), |r| format!("{r:.1}")),
                c.per_connection(self.connections).map_or("—".into(), |r| format!("{r:.2}")),
                c.p50.map_or("—".into(), |r| format!("{r:.0} µs")),
            );
        }
        s
    }
}
