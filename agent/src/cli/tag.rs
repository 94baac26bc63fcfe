//! `warden tag` and `warden untag`: run-time bindings, through the daemon.

use std::path::Path;

use super::ask_daemon;
use crate::control::Request;

pub fn tag(config: &Path, cgroup: String, identity: String) -> u8 {
    ask_daemon(config, &Request::Tag { cgroup, identity, task: None }, false, |_| "tagged".into())
}

pub fn untag(config: &Path, cgroup: String) -> u8 {
    ask_daemon(config, &Request::Untag { cgroup }, false, |_| "untagged".into())
}
