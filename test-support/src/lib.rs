//! What Warden's tests, the demo and the bench share, so each exists once: the rule for a test that
//! cannot run here ([`require`]), the audit-record reader ([`audit_records`]), the `warden.toml` template
//! ([`WardenToml`]) and cgroup-tree cleanup ([`remove_cgroup_tree`]). Not part of the `warden` binary.

mod cgroup;
mod config;
mod records;
mod skip;

pub use cgroup::{cgroup_root, remove_cgroup_tree};
pub use config::{IdentityToml, WardenToml};
pub use records::{audit_records, events};
pub use skip::{ALLOW_SKIP, require};
