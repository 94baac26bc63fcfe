//! Writes the files the Debian package ships that are generated from the command line definition
//! (`warden::cli::Cli`): shell completions (bash, zsh, fish) and one man page per command (`warden.1`,
//! `warden-run.1`, `warden-audit-verify.1`, ...). `cargo xtask dist` runs it; the package test (tests/privileged/package.rs) includes it as a module.
//!
//! usage: dist_assets OUT_DIR      (writes OUT_DIR/completions/* and OUT_DIR/man/*.1.gz)

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

/// Writes `out/completions/*` and `out/man/*.1.gz` (replacing what was there); returns the files written.
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
    append_to_top_page(&man.join("warden.1"))?;
    let mut pages: Vec<_> = std::fs::read_dir(&man)?.filter_map(Result::ok).map(|e| e.path()).collect();
    pages.sort();
    // Debian ships man pages compressed; -n keeps the output the same from build to build.
    let status = std::process::Command::new("gzip").args(["-9nf"]).args(&pages).status()?;
    if !status.success() {
        return Err(std::io::Error::other(format!("gzip of the man pages failed: {status}")));
    }
    written.extend(pages.iter().map(|p| p.with_extension("1.gz")));
    Ok(written)
}

/// What the top page adds to clap's sections: exit status (from `warden::cli`'s codes), environment, files.
fn append_to_top_page(page: &Path) -> std::io::Result<()> {
    use std::io::Write as _;
    use warden::cli::{EXIT_FAILED, EXIT_INTERNAL, EXIT_INVALID, EXIT_NOPERM, EXIT_UNAVAILABLE};
    let codes = [
        (0, "success"),
        (
            EXIT_FAILED,
            "a check failed (e.g. `audit verify` found tampering) or the daemon refused the request",
        ),
        (EXIT_INVALID, "invalid configuration or policy"),
        (EXIT_UNAVAILABLE, "the daemon is not reachable"),
        (EXIT_INTERNAL, "internal error"),
        (EXIT_NOPERM, "not permitted (run as root)"),
    ];
    let mut f = std::fs::OpenOptions::new().append(true).open(page)?;
    writeln!(f, ".SH \"EXIT STATUS\"")?;
    for (code, what) in codes {
        writeln!(f, ".TP\n\\fB{code}\\fR\n{}", what.replace('`', ""))?;
    }
    writeln!(
        f,
        ".SH ENVIRONMENT\n.TP\n\\fBWARDEN_CONFIG\\fR\nthe configuration file (default {})",
        warden::cli::DEFAULT_CONFIG
    )?;
    writeln!(f, ".TP\n\\fBWARDEN_LOG\\fR\nlog filter (tracing env-filter syntax, default info)")?;
    writeln!(
        f,
        ".SH FILES\n.TP\n{}\nthe configuration\n.TP\n/etc/warden/policies/\npolicy files (*.yaml)\n.TP\n/var/lib/warden/\n\
         grants, the audit trail and the signing key (root only)\n.TP\n/usr/lib/systemd/system/warden.service\nthe unit",
        warden::cli::DEFAULT_CONFIG
    )?;
    Ok(())
}
