//! The control socket: a root-only Unix socket speaking JSON lines, and its client side.

use crate::cli::Command;

pub fn client_cli(command: Command) -> u8 {
    crate::cli::fail(crate::cli::EXIT_INTERNAL, &format!("{command:?}: not implemented yet"))
}
