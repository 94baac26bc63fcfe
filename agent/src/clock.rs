//! Wall-clock time, behind a trait so time-dependent logic (token expiry, grant TTLs) runs in virtual
//! time in tests ([`TestClock`], compiled for unit tests only). Waiting always goes through `tokio::time`.

#[cfg(test)]
use std::sync::Mutex;
#[cfg(test)]
use std::time::Duration;
use std::time::SystemTime;

/// Where the daemon reads the wall-clock time (token `exp`/`nbf`/`iat`, grant expiry). A test that pauses
/// tokio's clock and uses [`TestClock`] moves both together.
pub trait Clock: Send + Sync + std::fmt::Debug + 'static {
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
#[cfg(test)]
#[derive(Debug)]
pub struct TestClock {
    start: SystemTime,
    origin: tokio::time::Instant,
    jumped: Mutex<Duration>,
}

#[cfg(test)]
impl TestClock {
    pub fn new(start: SystemTime) -> Self {
        Self { start, origin: tokio::time::Instant::now(), jumped: Mutex::new(Duration::ZERO) }
    }

    /// Reads `wall` now, and from then on advances with tokio's clock.
    pub fn starting_at(wall: SystemTime) -> Self {
        Self::new(wall)
    }

    /// Moves the wall clock forward without moving tokio's timers, as when the host slept or the daemon
    /// was down: whoever next looks at the clock sees the time passed.
    pub fn jump(&self, by: Duration) {
        *self.jumped.lock().unwrap_or_else(std::sync::PoisonError::into_inner) += by;
    }
}

#[cfg(test)]
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
