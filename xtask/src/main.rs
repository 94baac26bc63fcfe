//! Project tasks: `cargo xtask test` (what CI runs), `cargo xtask demo` (the main job: a tagged agent
//! reaching a real local PostgreSQL through Warden, allowed, refused and recorded), `cargo xtask bench`,
//! `cargo xtask dist` (the Debian package).

mod bench;
mod bench_pg;
mod bench_setup;
mod bench_ssh;
mod demo;
mod dist;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("test") => test(&args[1..]),
        Some("demo") => demo::run(),
        Some("bench") if args.get(1).map(String::as_str) == Some("postgres") => bench_pg::run(&args[2..]),
        Some("bench") if args.get(1).map(String::as_str) == Some("ssh") => bench_ssh::run(&args[2..]),
        Some("bench") if args.get(1).map(String::as_str) == Some("client") => bench::run(&args[1..]),
        Some("bench") => {
            bench::run(&args[1..])?;
            if args[1..].iter().any(|a| a == "--bpf") {
                return Ok(());
            }
            // Then the SSH section, with the same binary and the same --no-write.
            let mut ssh = Vec::new();
            let mut it = args[1..].iter();
            while let Some(a) = it.next() {
                match a.as_str() {
                    "--warden" => ssh.extend([a.clone(), it.next().cloned().unwrap_or_default()]),
                    "--no-write" => ssh.push(a.clone()),
                    _ => {}
                }
            }
            bench_ssh::run(&ssh)
        }
        Some("dist") => dist::run_task(&args[1..]),
        _ => {
            eprintln!(
                "usage: cargo xtask <task>\n\n  test    formatting, clippy, and every test (privileged ones need root)\n  demo    the end-to-end demo on a real PostgreSQL (root)\n  bench   latency and throughput: direct, through Warden, through haproxy, then ssh (root); `bench ssh`, `bench postgres` alone\n  dist    the Debian package (target/debian/*.deb), with completions and man pages"
            );
            bail!("no task given")
        }
    }
}

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("repo root").to_path_buf()
}

pub fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    c
}

pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    eprintln!("==> {cmd:?}");
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

/// Builds the `warden` binary (with its kernel programs) and returns its path.
pub fn build_warden(release: bool) -> anyhow::Result<PathBuf> {
    let mut c = cargo();
    c.args(["build", "-p", "warden", "--bin", "warden"]);
    if release {
        c.arg("--release");
    }
    run(&mut c)?;
    Ok(root().join("target").join(if release { "release" } else { "debug" }).join("warden"))
}

fn test(extra: &[String]) -> anyhow::Result<()> {
    // The privileged layer (BPF, cgroups, mounts) needs root; a run without it would test nothing there.
    if !nix_is_root() && std::env::var(warden_test_support::ALLOW_SKIP).as_deref() != Ok("1") {
        bail!(
            "the privileged tests need root (BPF, cgroups, network namespaces): run `sudo cargo xtask test`, \
             or set {}=1 to let the tests that cannot run here skip (they say so on stderr)",
            warden_test_support::ALLOW_SKIP
        );
    }
    run(cargo().args(["fmt", "--all", "--", "--check"]))?;
    run(cargo().args(["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"]))?;
    run(cargo().args(["test", "--workspace"]).args(extra))?;
    Ok(())
}

pub fn nix_is_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.starts_with(b"0\n"))
}
