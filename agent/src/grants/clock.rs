//! Wall-clock time for grant expiry, behind a trait so tests run in virtual time.

use std::sync::Mutex;
use std::time::{Duration, SystemTime};

/// Where grants read the wall-clock time. Waiting always goes through `tokio::time`, so a test that
/// pauses tokio's clock and uses [`TestClock`] moves both together.
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> SystemTime;
}

/// The host's clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// A clock that follows tokio's (pausable) clock from a fixed start, plus any [`TestClock::jump`]s.
///
/// With `tokio::time::pause()`, `tokio::time::advance(d)` (or an auto-advancing sleep) moves this clock
/// by `d` and fires the timers that were waiting for it: expiry tests need no real waiting.
#[derive(Debug)]
pub struct TestClock {
    start: SystemTime,
    origin: tokio::time::Instant,
    jumped: Mutex<Duration>,
}

impl TestClock {
    pub fn new(start: SystemTime) -> Self {
        Self { start, origin: tokio::time::Instant::now(), jumped: Mutex::new(Duration::ZERO) }
    }

    /// Moves the wall clock forward without moving tokio's timers, as when the host slept or the daemon
    /// was down: whoever next looks at the clock sees the time passed.
    pub fn jump(&self, by: Duration) {
        *self.jumped.lock().unwrap_or_else(std::sync::PoisonError::into_inner) += by;
    }
}

impl Clock for TestClock {
    fn now(&self) -> SystemTime {
        let jumped = *self.jumped.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        self.start + self.origin.elapsed() + jumped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn test_clock_follows_paused_tokio_time() {
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let clock = TestClock::new(start);
        assert_eq!(clock.now(), start);
        tokio::time::advance(Duration::from_secs(90)).await;
        assert_eq!(clock.now(), start + Duration::from_secs(90));
        clock.jump(Duration::from_secs(10));
        assert_eq!(clock.now(), start + Duration::from_secs(100));
    }
}
