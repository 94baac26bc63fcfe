//! Gives memory freed after a burst back to the kernel. A burst of connection set-ups (SSH key
//! exchanges, TLS handshakes, policy evaluations) allocates far more than the sessions keep, and glibc's
//! malloc keeps what is freed inside its arenas, resident: measured with 100 idle SSH sessions set up at
//! once, the daemon held about 150 KB of resident memory per session, of which about 9 KB was in use
//! (BENCHMARKS.md). So every [`PERIOD`] the daemon looks at its anonymous resident memory and, when it
//! has grown by more than [`SLACK`] since the last look that trimmed, returns the allocator's free pages
//! (`malloc_trim`), on a blocking thread: trimming walks the free lists under each arena's lock and can
//! take milliseconds with a large heap, which a runtime worker must not spend. Memory in use that grew is
//! not returned, and becomes the new baseline, so a steady daemon does not trim again.

use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

/// How often resident memory is looked at.
pub const PERIOD: Duration = Duration::from_secs(10);

/// Growth of anonymous resident memory since the last trim that makes the next one worth it.
const SLACK: u64 = 4 << 20;

/// Until `stop`: every [`PERIOD`], trims the allocator when anonymous resident memory has grown by
/// more than [`SLACK`] since the last trim.
pub async fn trim_periodically(stop: CancellationToken) {
    let mut tick = tokio::time::interval(PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    // Anonymous resident memory right after the last trim (or at start): the baseline.
    let mut floor = anon_resident().unwrap_or(0);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        match tokio::task::spawn_blocking(move || trim_if_grown(floor)).await {
            Ok(Some(after)) => floor = after,
            Ok(None) => {}
            Err(_) => return,
        }
    }
}

/// Trims when anonymous resident memory exceeds `floor` by more than [`SLACK`]; returns the new floor
/// (resident memory after trimming) when it trimmed.
fn trim_if_grown(floor: u64) -> Option<u64> {
    let before = anon_resident()?;
    if before <= floor + SLACK {
        return None;
    }
    let started = Instant::now();
    trim();
    let after = anon_resident()?;
    tracing::debug!(
        rss_anon_before = before,
        rss_anon_after = after,
        took_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
        "returned the allocator's free memory to the kernel"
    );
    Some(after)
}

#[cfg(target_env = "gnu")]
fn trim() {
    // SAFETY: malloc_trim releases free memory at the allocator's discretion; it touches no memory in
    // use and takes no pointers.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(target_env = "gnu"))]
fn trim() {}

/// The process's anonymous resident memory (`RssAnon`), in bytes.
fn anon_resident() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("RssAnon:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_env = "gnu")]
    #[test]
    fn freed_memory_goes_back_to_the_kernel() {
        // 64 MiB in blocks below the mmap threshold (so they live in an arena), written to (resident),
        // then all freed but the last, which keeps the arena from shrinking on its own.
        let mut blocks: Vec<Vec<u8>> = (1..=255u8).cycle().take(4096).map(|b| vec![b; 16 * 1024]).collect();
        let keep = blocks.pop();
        drop(blocks);
        let before = anon_resident().expect("RssAnon readable");
        let after = trim_if_grown(0).expect("a trim once resident memory grew past the slack");
        assert!(
            after + (32 << 20) < before,
            "trimming returned the freed blocks: {before} -> {after} bytes resident"
        );
        drop(keep);
    }
}
