//! SSH: the handler is being built (its own issue). Until it lands this module holds only the allow-list
//! check the gate calls for `exec` requests.

/// Whether `command` is within a grant's `commands` allow-list (globs, DESIGN.md).
///
/// PLACEHOLDER until the SSH handler lands with the real matcher: it refuses every command when an
/// allow-list is set, so nothing runs that the list might not allow.
pub fn command_allowed(allowed: &[String], command: &str) -> bool {
    let _ = (allowed, command);
    false
}
