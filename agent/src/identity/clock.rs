//! The wall clock token expiry is checked against, injectable so tests run in virtual time.

use std::time::SystemTime;

/// Tells the time used for `exp`, `nbf` and `iat` and for deciding when to refresh a token.
pub trait Clock: Send + Sync + std::fmt::Debug {
    fn now(&self) -> SystemTime;
}

/// The system's wall clock: what the daemon uses.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// A wall clock that advances with tokio's clock, so `tokio::time::pause()` and `advance()` move it.
#[derive(Debug, Clone, Copy)]
pub struct TokioClock {
    wall: SystemTime,
    start: tokio::time::Instant,
}

impl TokioClock {
    /// Reads `wall` now, and from then on advances with `tokio::time::Instant`.
    pub fn starting_at(wall: SystemTime) -> Self {
        Self { wall, start: tokio::time::Instant::now() }
    }
}

impl Clock for TokioClock {
    fn now(&self) -> SystemTime {
        self.wall + self.start.elapsed()
    }
}
