//! cgroup2: finding the mount, creating and removing cgroups, `warden exec`.

use std::path::Path;

pub fn exec_cli(
    config: &Path,
    identity: &str,
    task: Option<&str>,
    user: Option<&str>,
    command: &[String],
) -> u8 {
    let _ = (config, identity, task, user, command);
    crate::cli::fail(crate::cli::EXIT_INTERNAL, &"exec: not implemented yet")
}
