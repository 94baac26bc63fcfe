//! The one rule for a test that cannot run here: it fails, saying why on stderr, unless the person
//! running it opted out explicitly with `WARDEN_ALLOW_SKIP=1` (then it says `skipping: ...` on stderr and
//! returns early). A skipped test must never look like a pass by accident.

/// The environment variable that lets a test that cannot run here skip instead of failing.
pub const ALLOW_SKIP: &str = "WARDEN_ALLOW_SKIP";

/// True when every need is met. Otherwise panics naming the first unmet need, unless `WARDEN_ALLOW_SKIP=1`
/// is set, in which case it prints `skipping: TEST: NEED` to stderr and returns false.
pub fn require(test: &str, needs: &[(&str, bool)]) -> bool {
    let Some((what, _)) = needs.iter().find(|(_, ok)| !ok) else { return true };
    if std::env::var(ALLOW_SKIP).as_deref() == Ok("1") {
        eprintln!("skipping: {test}: {what} ({ALLOW_SKIP}=1)");
        return false;
    }
    panic!("{test} cannot run here: {what}; fix that, or set {ALLOW_SKIP}=1 to skip it on purpose");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn met_needs_run() {
        assert!(require("t", &[("root", true), ("idp", true)]));
        assert!(require("t", &[]));
    }

    #[test]
    fn an_unmet_need_fails_unless_skipping_is_allowed() {
        // The environment is process-wide: this is the only test here that reads ALLOW_SKIP.
        if std::env::var(ALLOW_SKIP).as_deref() == Ok("1") {
            assert!(!require("t", &[("root", false)]));
        } else {
            let failed = std::panic::catch_unwind(|| require("t", &[("root", true), ("the idp", false)]));
            let msg = failed.expect_err("an unmet need must fail the test");
            let msg = msg.downcast_ref::<String>().cloned().unwrap_or_default();
            assert!(msg.contains("the idp") && msg.contains(ALLOW_SKIP), "{msg}");
        }
    }
}
