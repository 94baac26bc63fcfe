//! Loads, attaches and pins the kernel programs; fills their maps; reads their events. Only this module calls aya.

use std::path::Path;

pub fn uninstall_cli(config: &Path) -> u8 {
    let _ = config;
    crate::cli::fail(crate::cli::EXIT_INTERNAL, &"uninstall: not implemented yet")
}
