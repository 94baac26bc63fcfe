//! Process limits raised at start: the open-file limit, so one agent holding many connections cannot
//! starve the audit writer of descriptors (the unit sets it too; this covers a daemon started by hand),
//! and the concurrent sessions that limit leaves room for, with descriptors kept in reserve.

use nix::sys::resource::{Resource, getrlimit, setrlimit};

/// The soft open-file limit to set, given the current soft and hard limits: the hard limit, or `None`
/// when the soft one is already there.
fn nofile_target(soft: u64, hard: u64) -> Option<u64> {
    (soft < hard).then_some(hard)
}

/// Descriptors kept out of the sessions' reach: the audit writer's files and rotations, the control
/// socket, the kernel's maps and programs, the identity providers' connections.
const RESERVED_FDS: u64 = 256;

/// Concurrent sessions an open-file limit of `nofile` leaves room for: two descriptors each (client and
/// upstream) after the reserve, at most `max`, at least one.
fn session_cap(nofile: u64, max: usize) -> usize {
    let room = usize::try_from(nofile.saturating_sub(RESERVED_FDS) / 2).unwrap_or(usize::MAX);
    room.clamp(1, max)
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit and logs the old and new values; returns the
/// concurrent sessions (at most `max`) the resulting limit leaves room for.
pub(super) fn raise_nofile(max: usize) -> usize {
    let (soft, hard) = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(error = %e, "could not read the open-file limit");
            return max;
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
    let cap = session_cap(limit, max);
    if cap < max {
        tracing::warn!(
            sessions = cap,
            open_files = limit,
            reserved = RESERVED_FDS,
            "the open-file limit caps concurrent sessions; raise LimitNOFILE= for more"
        );
    }
    cap
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
    fn sessions_get_two_descriptors_each_after_the_reserve() {
        assert_eq!(session_cap(1024, 16_384), 384);
        assert_eq!(session_cap(1_048_576, 16_384), 16_384);
        assert_eq!(session_cap(100, 16_384), 1);
    }

    #[test]
    fn raising_the_limit_leaves_the_soft_limit_at_the_hard_one() {
        assert!(raise_nofile(16_384) >= 1);
        let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        // Any process may raise its soft limit up to its hard one.
        assert_eq!(soft, hard);
    }
}
