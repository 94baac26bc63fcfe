//! Gives memory freed when sessions end back to the kernel. glibc's malloc keeps freed memory inside
//! its arenas, resident, and the per-thread arenas the runtime's workers allocate from seldom shrink on
//! their own: measured with 100 idle SSH sessions (about 150 KB each, in use), the daemon's anonymous
//! resident memory stayed at the peak after they ended until trimmed (19.5 MB, then 5.0 MB after one
//! trim of 12 ms; BENCHMARKS.md, "SSH"). So every [`PERIOD`] the daemon compares its anonymous resident memory with what the
//! allocator has in use and, when the difference has grown by more than [`SLACK`] since the last trim
//! (memory was freed, or resident memory grew, and neither was given back), returns the free pages
//! (`malloc_trim`), on a blocking thread: trimming walks the free lists under each arena's lock and can
//! take milliseconds with a large heap, which a runtime worker must not spend. Trimmed pages stay in the
//! allocator's free lists (its "free bytes" do not fall), and resident memory outside the allocator
//! (stacks, mappings) is not its to return, so the difference right after a trim is the baseline for the
//! next, and a steady daemon does not trim again.

use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

/// How often resident memory is looked at.
pub const PERIOD: Duration = Duration::from_secs(10);

/// Growth of resident memory not in use since the last trim that makes the next one worth it.
const SLACK: u64 = 1 << 20;

/// Until `stop`: every [`PERIOD`], trims the allocator when resident memory not in use has grown by
/// more than [`SLACK`] since the last trim.
pub async fn trim_periodically(stop: CancellationToken) {
    let mut tick = tokio::time::interval(PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    let mut floor = 0;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        match tokio::task::spawn_blocking(move || trim_if_worth_it(floor)).await {
            Ok(Some(after)) => floor = after,
            Ok(None) => {}
            Err(_) => return,
        }
    }
}

/// Trims when resident memory not in use exceeds `floor` by more than [`SLACK`]; returns the new floor
/// (resident memory not in use right after trimming) when it trimmed.
fn trim_if_worth_it(floor: u64) -> Option<u64> {
    let before = not_in_use()?;
    if before <= floor + SLACK {
        return None;
    }
    let started = Instant::now();
    trim();
    let after = not_in_use()?;
    tracing::debug!(
        not_in_use_before = before,
        not_in_use_after = after,
        took_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
        "returned the allocator's free memory to the kernel"
    );
    Some(after)
}

/// Anonymous resident memory minus what the allocator has handed out (bytes): what the allocator holds
/// resident but unused, plus resident memory outside it; `None` where either cannot be read.
fn not_in_use() -> Option<u64> {
    Some(anon_resident()?.saturating_sub(in_use()?))
}

/// Bytes the allocator has handed out and not had back (in its arenas and its own mappings).
#[cfg(target_env = "gnu")]
#[allow(clippy::unnecessary_wraps, reason = "other allocators cannot say (None)")]
fn in_use() -> Option<u64> {
    // SAFETY: mallinfo2 only reads the allocator's own statistics; it takes no pointers.
    let info = unsafe { libc::mallinfo2() };
    Some((info.uordblks + info.hblkhd) as u64)
}

#[cfg(not(target_env = "gnu"))]
fn in_use() -> Option<u64> {
    None
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
        let before = not_in_use().expect("RssAnon and mallinfo2 readable");
        let after = trim_if_worth_it(0).expect("64 MiB freed is worth a trim");
        assert!(
            after + (32 << 20) < before,
            "trimming returned the freed blocks: {before} -> {after} bytes resident and not in use"
        );
        drop(keep);
    }
}
