//! Process limits raised at start: the open-file limit, so one agent holding many connections cannot
//! starve the audit writer of descriptors (the unit sets it too; this covers a daemon started by hand),
//! and what that limit leaves room for, with descriptors kept in reserve: the pipes opaque TCP splices
//! through, and the concurrent sessions.

use nix::sys::resource::{Resource, getrlimit, setrlimit};

/// The soft open-file limit to set, given the current soft and hard limits: the hard limit, or `None`
/// when the soft one is already there.
fn nofile_target(soft: u64, hard: u64) -> Option<u64> {
    (soft < hard).then_some(hard)
}

/// Descriptors kept out of the sessions' reach: the audit writer's files and rotations, the control
/// socket, the kernel's maps and programs, the identity providers' connections.
const RESERVED_FDS: u64 = 256;

/// Pipes the spliced relay may hold open at most (one per direction moving data; two descriptors each).
const MAX_PIPES: u64 = 256;

/// What the open-file limit leaves room for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Room {
    /// Concurrent sessions.
    pub sessions: usize,
    /// Pipes open at once for the spliced relay (beyond them a burst is copied in user space).
    pub pipes: usize,
}

/// What an open-file limit of `nofile` leaves room for after the reserve: pipes (at most `MAX_PIPES`, and
/// no more than an eighth of the room), then sessions with two descriptors each (client and upstream),
/// at most `max`, at least one.
fn room(nofile: u64, max: usize) -> Room {
    let left = nofile.saturating_sub(RESERVED_FDS);
    let pipes = (left / 8).min(MAX_PIPES);
    let sessions = usize::try_from((left - 2 * pipes) / 2).unwrap_or(usize::MAX).clamp(1, max);
    Room { sessions, pipes: usize::try_from(pipes).unwrap_or(0) }
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit and logs the old and new values; returns what the
/// resulting limit leaves room for (at most `max` sessions).
pub(super) fn raise_nofile(max: usize) -> Room {
    let (soft, hard) = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(error = %e, "could not read the open-file limit");
            return Room { sessions: max, pipes: 16 };
        }
    };
    let limit = match nofile_target(soft, hard) {
        None => {
            tracing::info!(soft, hard, "open-file limit already at the hard limit");
            soft
        }
        Some(new) => match setrlimit(Resource::RLIMIT_NOFILE, new, hard) {
            Ok(()) => {
                tracing::info!(old = soft, new, hard, "raised the open-file limit to the hard limit");
                new
            }
            Err(e) => {
                tracing::warn!(
                    error = %e, soft, hard,
                    "could not raise the open-file limit; set LimitNOFILE= in the unit"
                );
                soft
            }
        },
    };
    let room = room(limit, max);
    if room.sessions < max {
        tracing::warn!(
            sessions = room.sessions,
            pipes = room.pipes,
            open_files = limit,
            reserved = RESERVED_FDS,
            "the open-file limit caps concurrent sessions; raise LimitNOFILE= for more"
        );
    }
    room
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_soft_limit_is_raised_to_the_hard_one_only_when_below_it() {
        assert_eq!(nofile_target(1024, 524_288), Some(524_288));
        assert_eq!(nofile_target(524_288, 524_288), None);
        assert_eq!(nofile_target(1024, u64::MAX), Some(u64::MAX));
    }

    #[test]
    fn pipes_then_sessions_get_two_descriptors_each_after_the_reserve() {
        assert_eq!(room(1024, 16_384), Room { sessions: 288, pipes: 96 });
        assert_eq!(room(20_000, 16_384), Room { sessions: 9_616, pipes: 256 });
        assert_eq!(room(1_048_576, 16_384), Room { sessions: 16_384, pipes: 256 });
        assert_eq!(room(100, 16_384), Room { sessions: 1, pipes: 0 });
    }

    #[test]
    fn raising_the_limit_leaves_the_soft_limit_at_the_hard_one() {
        assert!(raise_nofile(16_384).sessions >= 1);
        let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        // Any process may raise its soft limit up to its hard one.
        assert_eq!(soft, hard);
    }
}
