//! `cargo xtask dist`: the Debian package. Writes the shell completions and man pages generated from the
//! CLI definition (`agent/examples/dist_assets.rs`) to `target/release/dist/`, then runs `cargo deb`, which
//! builds the release binary (with its kernel programs: run `scripts/setup.sh` first) and writes
//! `target/debian/warden_VERSION-1_ARCH.deb`. Extra arguments go to `cargo deb` (e.g. `--fast`).
//! `cargo xtask dist --assets DIR` only writes the generated files, to DIR.

use std::path::PathBuf;

use anyhow::{Context as _, bail};

use crate::{cargo, root, run};

/// The target directory cargo uses (`CARGO_TARGET_DIR`, else `target/` at the root).
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root().join("target"), PathBuf::from)
}

/// Writes completions and man pages to `out` with the `dist_assets` example.
pub fn assets(out: &std::path::Path) -> anyhow::Result<()> {
    run(cargo().args(["run", "--quiet", "-p", "warden", "--example", "dist_assets", "--"]).arg(out))
}

pub fn run_task(args: &[String]) -> anyhow::Result<()> {
    if let Some(pos) = args.iter().position(|a| a == "--assets") {
        let out = args.get(pos + 1).context("--assets needs a directory")?;
        return assets(std::path::Path::new(out));
    }
    let deb_ok = std::process::Command::new("cargo")
        .args(["deb", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !deb_ok {
        bail!("cargo-deb is not installed: run `sudo scripts/setup.sh` (installs it with `cargo install`)");
    }
    assets(&target_dir().join("release/dist"))?;
    run(cargo().args(["deb", "-p", "warden", "--locked"]).args(args))?;
    let debs = std::fs::read_dir(target_dir().join("debian"))
        .map(|d| {
            d.filter_map(Result::ok).map(|e| e.path()).filter(|p| p.extension().is_some_and(|e| e == "deb"))
        })
        .into_iter()
        .flatten()
        .collect::<Vec<_>>();
    for deb in debs {
        println!("{}", deb.display());
    }
    Ok(())
}
