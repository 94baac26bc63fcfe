//! Writes the files the Debian package ships that are generated from the command line definition
//! (`warden::cli::Cli`): shell completions (bash, zsh, fish) and one man page per command (`warden.1`,
//! `warden-run.1`, `warden-audit-verify.1`, ...). `cargo xtask dist` runs it; the package test (tests/privileged/package.rs) includes it as a module.
//!
//! usage: dist_assets OUT_DIR      (writes OUT_DIR/completions/* and OUT_DIR/man/*.1)

use std::path::{Path, PathBuf};

use clap::CommandFactory as _;
use clap_complete::Shell;

fn main() -> std::io::Result<()> {
    let Some(out) = std::env::args_os().nth(1).map(PathBuf::from) else {
        eprintln!("usage: dist_assets OUT_DIR");
        std::process::exit(2);
    };
    for path in write(&out)? {
        println!("{}", path.display());
    }
    Ok(())
}

/// Writes `out/completions/*` and `out/man/*.1` (replacing what was there); returns the files written.
pub fn write(out: &Path) -> std::io::Result<Vec<PathBuf>> {
    let completions = out.join("completions");
    let man = out.join("man");
    for dir in [&completions, &man] {
        // Stale pages of a command that no longer exists must not be packaged.
        if dir.exists() {
            std::fs::remove_dir_all(dir)?;
        }
        std::fs::create_dir_all(dir)?;
    }
    let mut written = Vec::new();
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        written.push(clap_complete::generate_to(
            shell,
            &mut warden::cli::Cli::command(),
            "warden",
            &completions,
        )?);
    }
    clap_mangen::generate_to(warden::cli::Cli::command(), &man)?;
    let mut pages: Vec<_> = std::fs::read_dir(&man)?.filter_map(Result::ok).map(|e| e.path()).collect();
    pages.sort();
    written.extend(pages);
    Ok(written)
}
