//! `warden run` and `warden check`: wiring every subsystem together.

use std::path::Path;

pub fn run_cli(config: &Path) -> u8 {
    let _ = config;
    crate::cli::fail(crate::cli::EXIT_INTERNAL, &"run: not implemented yet")
}

pub fn check_cli(config: &Path) -> u8 {
    match crate::config::Config::load(config) {
        Ok(_) => 0,
        Err(e) => crate::cli::fail(crate::cli::EXIT_INVALID, &e),
    }
}
