//! `warden ca tls`: prints the local CA certificate agents trust for PostgreSQL `sslmode=verify-full`.

use std::path::Path;

use super::{EXIT_FAILED, EXIT_INVALID, fail};
use crate::config::Config;
use crate::protocol::postgres::ca;

pub fn tls(config: &Path) -> u8 {
    let config = match Config::load(config) {
        Ok(c) => c,
        Err(e) => return fail(EXIT_INVALID, &e),
    };
    match ca::certificate_pem(&config.agent.state_dir) {
        Ok(pem) => {
            print!("{pem}");
            0
        }
        Err(e) => fail(EXIT_FAILED, &e),
    }
}
