//! The kernel pipes the spliced relay (`spliced.rs`) moves bytes through: created on demand, lent to a
//! direction only while it moves data, taken back empty, and bounded, so idle sessions hold none and the
//! relay can never take the descriptors the audit writer keeps in reserve.

use std::os::fd::OwnedFd;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use nix::fcntl::{FcntlArg, OFlag, fcntl};

/// The pipe size asked for (`F_SETPIPE_SZ`): how much one splice moves per system call. Measured in
/// BENCHMARKS.md ("Relay path"); the kernel may give less (`fs.pipe-max-size`, the user's pipe quota).
pub const PIPE_SIZE: usize = 1 << 20;

/// Empty pipes kept open for the next burst; more than this are closed when given back.
const KEEP_IDLE: usize = 32;

/// One pipe: bytes spliced into `write` are spliced out of `read`.
#[derive(Debug)]
pub struct Pipe {
    pub read: OwnedFd,
    pub write: OwnedFd,
    /// Its capacity in bytes, as the kernel set it.
    pub size: usize,
}

/// Why no pipe could be lent: the relay copies this burst in user space instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoPipe {
    /// `max` pipes are lent already.
    Exhausted,
    /// `pipe2` failed (out of descriptors or kernel memory).
    Failed(nix::errno::Errno),
}

/// The daemon's pipes: at most `max` open at once (two descriptors each).
#[derive(Debug)]
pub struct Pipes {
    idle: Mutex<Vec<Pipe>>,
    /// Pipes open: lent plus idle.
    open: AtomicUsize,
    max: usize,
    size: usize,
}

impl Pipes {
    /// At most `max` pipes of `size` bytes (asked for; the kernel may give less).
    pub fn new(max: usize, size: usize) -> Self {
        Self { idle: Mutex::new(Vec::new()), open: AtomicUsize::new(0), max, size }
    }

    /// Pipes open now (lent or idle).
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Lends an empty pipe: an idle one, or a new one while fewer than `max` are open.
    pub fn lend(&self) -> Result<Lease<'_>, NoPipe> {
        if let Some(pipe) = self.idle.lock().unwrap_or_else(std::sync::PoisonError::into_inner).pop() {
            return Ok(Lease { pipe: Some(pipe), pipes: self, queued: 0 });
        }
        if self.open.fetch_add(1, Ordering::Relaxed) >= self.max {
            self.open.fetch_sub(1, Ordering::Relaxed);
            return Err(NoPipe::Exhausted);
        }
        match make(self.size) {
            Ok(pipe) => Ok(Lease { pipe: Some(pipe), pipes: self, queued: 0 }),
            Err(e) => {
                self.open.fetch_sub(1, Ordering::Relaxed);
                Err(NoPipe::Failed(e))
            }
        }
    }

    fn take_back(&self, pipe: Pipe) {
        let mut idle = self.idle.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if idle.len() < KEEP_IDLE {
            idle.push(pipe);
        } else {
            drop(idle);
            drop(pipe);
            self.open.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// A pipe lent to one direction. Given back when it drops empty; closed when it drops holding bytes (a
/// session cut mid-burst), so no pipe is ever lent with someone else's bytes in it.
#[derive(Debug)]
pub struct Lease<'a> {
    pipe: Option<Pipe>,
    pipes: &'a Pipes,
    /// Bytes spliced in and not yet out.
    pub(super) queued: usize,
}

impl Lease<'_> {
    pub(super) fn pipe(&self) -> &Pipe {
        self.pipe.as_ref().expect("a lease holds its pipe until it drops")
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        let Some(pipe) = self.pipe.take() else { return };
        if self.queued == 0 {
            self.pipes.take_back(pipe);
        } else {
            drop(pipe);
            self.pipes.open.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// A non-blocking, close-on-exec pipe of (up to) `size` bytes.
fn make(size: usize) -> Result<Pipe, nix::errno::Errno> {
    let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)?;
    let asked = i32::try_from(size).unwrap_or(i32::MAX);
    // Refused beyond `fs.pipe-max-size` or the user's pipe quota: keep the size the kernel gave.
    let got = fcntl(&write, FcntlArg::F_SETPIPE_SZ(asked))
        .or_else(|_| fcntl(&write, FcntlArg::F_GETPIPE_SZ))
        .unwrap_or(4096);
    Ok(Pipe { read, write, size: usize::try_from(got).unwrap_or(4096) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pipes_are_bounded_reused_and_closed_when_dirty() {
        let pipes = Pipes::new(2, 64 * 1024);
        let a = pipes.lend().unwrap();
        assert!(a.pipe().size >= 4096);
        let mut b = pipes.lend().unwrap();
        assert_eq!(pipes.lend().unwrap_err(), NoPipe::Exhausted);
        assert_eq!(pipes.open(), 2);
        drop(a);
        // The empty one comes back and is lent again, without a new pipe.
        let c = pipes.lend().unwrap();
        assert_eq!(pipes.open(), 2);
        // One dropped holding bytes is closed, not lent again.
        b.queued = 10;
        drop(b);
        assert_eq!(pipes.open(), 1);
        drop(c);
        assert_eq!(pipes.open(), 1);
    }
}
