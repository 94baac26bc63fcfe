//! Process limits raised at start: the open-file limit, so one agent holding many connections cannot
//! starve the audit writer of descriptors (the unit sets it too; this covers a daemon started by hand).

use nix::sys::resource::{Resource, getrlimit, setrlimit};

/// The soft open-file limit to set, given the current soft and hard limits: the hard limit, or `None`
/// when the soft one is already there.
fn nofile_target(soft: u64, hard: u64) -> Option<u64> {
    (soft < hard).then_some(hard)
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit and logs the old and new values.
pub(super) fn raise_nofile() {
    let (soft, hard) = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok(l) => l,
        Err(e) => return tracing::warn!(error = %e, "could not read the open-file limit"),
    };
    let Some(new) = nofile_target(soft, hard) else {
        return tracing::info!(soft, hard, "open-file limit already at the hard limit");
    };
    match setrlimit(Resource::RLIMIT_NOFILE, new, hard) {
        Ok(()) => tracing::info!(old = soft, new, hard, "raised the open-file limit to the hard limit"),
        Err(e) => tracing::warn!(
            error = %e, soft, hard,
            "could not raise the open-file limit; set LimitNOFILE= in the unit"
        ),
    }
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
    fn raising_the_limit_leaves_the_soft_limit_at_the_hard_one() {
        raise_nofile();
        let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        // Any process may raise its soft limit up to its hard one.
        assert_eq!(soft, hard);
    }
}
