//! `warden run`, `warden check` and `warden uninstall`.

use std::net::SocketAddr;
use std::path::Path;

use super::{EXIT_FAILED, EXIT_INTERNAL, EXIT_INVALID, EXIT_NOPERM, fail};
use crate::bpf;
use crate::config::Config;
use crate::policy;

/// `warden check`: the config and every policy file, each error as file:line:col.
pub fn check(config: &Path) -> u8 {
    let config = match Config::load(config) {
        Ok(c) => c,
        Err(e) => return fail(EXIT_INVALID, &e),
    };
    let files = match config.policy_files() {
        Ok(f) => f,
        Err(e) => return fail(EXIT_INVALID, &format!("{}: {e}", config.agent.policies.display())),
    };
    match policy::load(&files) {
        Ok(p) => {
            println!(
                "{}: ok ({} policy files, {} targets, {} rules)",
                config.path.display(),
                files.len(),
                p.targets().count(),
                p.rules().len()
            );
            0
        }
        Err(diags) => {
            for d in &diags {
                eprintln!("{d}");
            }
            EXIT_INVALID
        }
    }
}

/// `warden uninstall`: stops a running daemon, releases the proxy's reserved ports, then detaches and unpins
/// every kernel program and map: the one command that lifts enforcement.
pub fn uninstall(config: &Path) -> u8 {
    let config = match Config::load(config) {
        Ok(c) => c,
        Err(e) => return fail(EXIT_INVALID, &e),
    };
    // A running daemon would keep enforcing through the descriptors it holds: stop it first.
    crate::control::stop_daemon(&config.agent.control_socket);
    let ports: Vec<u16> = config.proxy_listen().iter().map(SocketAddr::port).collect();
    if let Err(e) = crate::daemon::reserved_ports::release(&ports) {
        eprintln!(
            "warden: could not release the proxy's reserved ports in {}: {e}",
            crate::daemon::reserved_ports::PATH
        );
    }
    match bpf::uninstall(&config.agent.bpffs_dir) {
        Ok(removed) => {
            println!(
                "warden: removed {} pinned links and maps under {}",
                removed.len(),
                config.agent.bpffs_dir.display()
            );
            0
        }
        Err(e) => fail(EXIT_FAILED, &e),
    }
}

/// `warden run`: validates everything before binding or attaching anything, then runs the daemon.
pub fn run(config_path: &Path) -> u8 {
    let config = match Config::load(config_path) {
        Ok(c) => c,
        Err(e) => return fail(EXIT_INVALID, &e),
    };
    // Every policy error before anything is bound or attached.
    match config.policy_files().map(|f| policy::load(&f)) {
        Ok(Ok(_)) => {}
        Ok(Err(diags)) => {
            for d in &diags {
                eprintln!("{d}");
            }
            return EXIT_INVALID;
        }
        Err(e) => return fail(EXIT_INVALID, &format!("{}: {e}", config.agent.policies.display())),
    }
    if !nix::unistd::geteuid().is_root() {
        return fail(EXIT_NOPERM, &"warden run must run as root (it attaches kernel programs)");
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => return fail(EXIT_INTERNAL, &e),
    };
    match runtime.block_on(crate::daemon::run(config)) {
        Ok(()) => 0,
        Err(e) => fail(EXIT_FAILED, &format!("{e:#}")),
    }
}
