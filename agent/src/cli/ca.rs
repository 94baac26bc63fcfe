//! `warden ca ...`: Warden's local certificate authorities, printed for agents to trust.

use std::path::Path;

use super::{EXIT_FAILED, EXIT_INTERNAL, EXIT_INVALID, fail};
use crate::config::Config;

/// `warden ca tls`: the CA certificate (PEM) that issues the certificates PostgreSQL clients see, for
/// `sslrootcert` with `sslmode=verify-full`.
pub fn tls(config: &Path) -> u8 {
    let config = match Config::load(config) {
        Ok(c) => c,
        Err(e) => return fail(EXIT_INVALID, &e),
    };
    match crate::protocol::postgres::ca::certificate_pem(&config.agent.state_dir) {
        Ok(pem) => {
            print!("{pem}");
            0
        }
        Err(e) => fail(EXIT_FAILED, &e),
    }
}

/// `warden ca ssh`: the `@cert-authority * ssh-ed25519 ...` line for an agent's `known_hosts` (the CA is
/// made in `state_dir` on first use). Exit 0; 64 for a bad config; 70 when the CA cannot be read or made.
pub fn ssh(config: &Path) -> u8 {
    let config = match Config::load(config) {
        Ok(c) => c,
        Err(e) => return fail(EXIT_INVALID, &e),
    };
    match crate::protocol::ssh::ca::known_hosts_line(&config.agent.state_dir) {
        Ok(line) => {
            println!("{line}");
            0
        }
        Err(e) => fail(EXIT_INTERNAL, &e),
    }
}
