//! A budget of records per source and second: refusals beyond it are still enforced but only counted,
//! so one source hammering refused destinations (or the proxy port) cannot fill the audit queue every
//! session's `session.start` goes through; the counts are summed up in an `events.lost` record.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

/// Refusal records one source (a tagged cgroup, or all connections with no origin) may add per second.
pub const REFUSALS_PER_SECOND: u32 = 200;

/// Per source: the current one-second window and its records, and the events over the budget since
/// they were last accounted for.
#[derive(Debug)]
pub struct Budget<K> {
    per_second: u32,
    windows: HashMap<K, (Instant, u32)>,
    over: HashMap<K, u64>,
}

impl<K> Default for Budget<K> {
    fn default() -> Self {
        Self::new(REFUSALS_PER_SECOND)
    }
}

impl<K> Budget<K> {
    #[must_use]
    pub fn new(per_second: u32) -> Self {
        Self { per_second, windows: HashMap::new(), over: HashMap::new() }
    }

    /// Full records each source may make per second.
    #[must_use]
    pub fn per_second(&self) -> u32 {
        self.per_second
    }

    /// The events over the budget per source, since the last [`Budget::clear_over`].
    #[must_use]
    pub fn over(&self) -> &HashMap<K, u64> {
        &self.over
    }

    /// Forgets the counts once an `events.lost` record holds them.
    pub fn clear_over(&mut self) {
        self.over.clear();
    }

    /// Drops windows that ended, so sources that went quiet hold no memory.
    pub fn prune(&mut self, now: Instant) {
        self.windows.retain(|_, (start, _)| now.duration_since(*start) < Duration::from_secs(2));
    }
}

impl<K: Hash + Eq + Clone> Budget<K> {
    /// True when an event of `source` may be recorded in full; otherwise it is counted.
    pub fn admit(&mut self, source: &K, now: Instant) -> bool {
        let (start, n) = self.windows.entry(source.clone()).or_insert((now, 0));
        if now.duration_since(*start) >= Duration::from_secs(1) {
            (*start, *n) = (now, 0);
        }
        if *n < self.per_second {
            *n += 1;
            return true;
        }
        *self.over.entry(source.clone()).or_default() += 1;
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_source_gets_its_budget_per_second_and_the_rest_is_counted() {
        let mut b = Budget::new(3);
        let t0 = Instant::now();
        let admitted = (0..10).filter(|_| b.admit(&7u64, t0)).count();
        assert_eq!(admitted, 3);
        assert_eq!(b.over()[&7], 7);
        // Another source has its own budget; a new second starts afresh.
        assert!(b.admit(&8, t0));
        assert!(b.admit(&7, t0 + Duration::from_millis(1000)));
        b.clear_over();
        assert!(b.over().is_empty());
        b.prune(t0 + Duration::from_secs(3));
        assert!(b.windows.is_empty());
    }
}
