//! `warden audit ...`: verify, export, show, tail, pubkey.

use crate::cli::AuditAction;

pub fn run(action: AuditAction) -> u8 {
    crate::cli::fail(crate::cli::EXIT_INTERNAL, &format!("audit {action:?}: not implemented yet"))
}
