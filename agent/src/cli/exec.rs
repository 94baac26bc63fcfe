//! `warden exec`: a fresh cgroup under `agent.exec_parent`, bound to IDENTITY through the daemon; the
//! command runs in it as USER (`crate::exec`); when it exits, anything it left is killed, the binding is
//! removed, the cgroup deleted, and its exit status returned.

use std::path::Path;

use super::{EXIT_FAILED, EXIT_INVALID, EXIT_NOPERM, client_exit, fail};
use crate::cgroup;
use crate::control::{self, Request};
use crate::exec::{self, ExecError};

/// The exit code for a command that could not be started (as a shell reports a command it cannot run).
const EXIT_CANNOT_RUN: u8 = 126;

fn exec_exit(e: &ExecError) -> u8 {
    match e {
        ExecError::NoSuchUser(_) | ExecError::NulByte { .. } => EXIT_INVALID,
        ExecError::NotFound(_) => EXIT_CANNOT_RUN,
        ExecError::Groups { .. } | ExecError::Threaded(_) | ExecError::Fork(_) | ExecError::Wait(_) => {
            EXIT_FAILED
        }
    }
}

pub fn exec(config: &Path, identity: &str, task: Option<&str>, user: Option<&str>, command: &[String]) -> u8 {
    let config = match crate::config::Config::load(config) {
        Ok(c) => c,
        Err(e) => return fail(EXIT_INVALID, &e),
    };
    if !nix::unistd::geteuid().is_root() {
        return fail(EXIT_NOPERM, &"warden exec must run as root (it creates cgroups and drops to --user)");
    }
    let user = match user.map(exec::lookup_user).transpose() {
        Ok(u) => u,
        Err(e) => return fail(exec_exit(&e), &e),
    };
    let root = match cgroup::root(&config.agent.cgroup_root) {
        Ok(r) => r,
        Err(e) => return fail(EXIT_FAILED, &e),
    };
    let name = format!("exec-{}-{}", std::process::id(), task.unwrap_or("task").replace(['/', '.'], "_"));
    let path = root.join(config.agent.exec_parent.trim_start_matches('/')).join(name);
    if let Err(e) = cgroup::create(&path) {
        return fail(EXIT_FAILED, &e);
    }
    let cgroup = path.display().to_string();
    let tagged = control::request(
        &config.agent.control_socket,
        &Request::Tag {
            cgroup: cgroup.clone(),
            identity: identity.to_owned(),
            task: task.map(str::to_owned),
        },
    );
    let code = match tagged {
        Ok(_) => match exec::run(&path, user.as_ref(), command) {
            Ok(code) => code,
            Err(e) => fail(exec_exit(&e), &e),
        },
        Err(e) => {
            let _ = std::fs::remove_dir(&path);
            return fail(client_exit(&e), &e);
        }
    };
    // Kill what the command left behind BEFORE lifting the tag: a leftover must never run untagged, not
    // even between the untag and the kill. If the cgroup cannot be emptied, the tag stays (fail closed).
    match cgroup::kill_and_remove(&path) {
        Ok(()) => {
            let _ = control::request(&config.agent.control_socket, &Request::Untag { cgroup });
        }
        Err(e) => eprintln!("warden: {e}; the cgroup stays tagged"),
    }
    code
}
