//! Builds Warden's kernel programs (ebpf/programs) with the pinned nightly and bpf-linker, and leaves the
//! object in OUT_DIR for `bpf` to embed. Without that toolchain it embeds an empty object and warns:
//! `cargo build`/`clippy` of the userspace crates never need the nightly, and the daemon refuses to start
//! with a message naming the command that installs it. Under CI=true a missing toolchain is an error.
//! The kernel crate's own `[lints]` (it is outside the workspace) are checked here too: clippy with the
//! same nightly runs first, and a warning fails the build (skipped, with a cargo warning, when that
//! nightly has no clippy).

use std::path::{Path, PathBuf};
use std::process::Command;

const TOOLCHAIN: &str = "nightly-2026-05-20";
const INSTALL: &str =
    "run `sudo scripts/setup.sh` (installs the pinned nightly with rust-src and bpf-linker), then rebuild";

fn main() -> anyhow::Result<()> {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let root = manifest.parent().expect("agent/ has a parent").to_path_buf();
    let programs = root.join("ebpf/programs");
    let out = PathBuf::from(std::env::var("OUT_DIR")?).join("warden-ebpf.o");
    for p in [
        "ebpf/programs/src",
        "ebpf/programs/Cargo.toml",
        "ebpf/programs/rust-toolchain.toml",
        "ebpf/common/src",
    ] {
        println!("cargo:rerun-if-changed={}", root.join(p).display());
    }
    println!("cargo:rerun-if-env-changed=WARDEN_EBPF_OBJECT");
    println!("cargo:rerun-if-env-changed=CI");

    if let Ok(obj) = std::env::var("WARDEN_EBPF_OBJECT") {
        std::fs::copy(&obj, &out)?;
        return Ok(());
    }
    if let Some(missing) = missing_toolchain() {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            anyhow::bail!("cannot build the kernel programs: {missing}; {INSTALL}");
        }
        println!("cargo:warning=building warden WITHOUT its kernel programs: {missing}; {INSTALL}");
        std::fs::write(&out, [])?;
        return Ok(());
    }
    let target_dir =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from).join("ebpf");
    if nightly_has_clippy() {
        cargo(&programs, &target_dir, "clippy", &["--", "-D", "warnings"])?;
    } else {
        println!(
            "cargo:warning=the kernel programs' lints are not checked: {TOOLCHAIN} has no clippy; {INSTALL}"
        );
    }
    cargo(&programs, &target_dir, "build", &[])?;
    std::fs::copy(target_dir.join("bpfel-unknown-none/release/warden-ebpf"), &out)?;
    Ok(())
}

fn missing_toolchain() -> Option<String> {
    let ok = |cmd: &mut Command| cmd.output().is_ok_and(|o| o.status.success());
    if !ok(Command::new("rustup")
        .args(["run", TOOLCHAIN, "rustc", "--version"])
        .env_remove("RUSTUP_TOOLCHAIN"))
    {
        return Some(format!("toolchain {TOOLCHAIN} is not installed"));
    }
    if !ok(Command::new("bpf-linker").arg("--version")) {
        return Some("bpf-linker is not installed".into());
    }
    None
}

fn nightly_has_clippy() -> bool {
    Command::new("rustup")
        .args(["run", TOOLCHAIN, "cargo", "clippy", "--version"])
        .env_remove("RUSTUP_TOOLCHAIN")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// `cargo <subcommand>` of the kernel programs with the pinned nightly, for the BPF target.
fn cargo(programs: &Path, target_dir: &Path, subcommand: &str, extra: &[&str]) -> anyhow::Result<()> {
    let mut cmd = Command::new("rustup");
    cmd.args([
        "run",
        TOOLCHAIN,
        "cargo",
        subcommand,
        "--release",
        "--target",
        "bpfel-unknown-none",
        "-Z",
        "build-std=core",
    ])
    .arg("--target-dir")
    .arg(target_dir)
    .args(extra)
    .current_dir(programs);
    // The outer cargo's settings (its rustc, clippy's wrapper, flags) must not leak into the nested build.
    for (key, _) in std::env::vars_os() {
        let k = key.to_string_lossy();
        if k.starts_with("CARGO")
            || k.starts_with("RUSTC")
            || k == "RUSTFLAGS"
            || k == "RUSTUP_TOOLCHAIN"
            || k == "RUSTDOC"
        {
            cmd.env_remove(&key);
        }
    }
    cmd.env("CARGO_ENCODED_RUSTFLAGS", "-Cdebuginfo=2\x1f-Clink-arg=--btf");
    let output = cmd.output()?;
    if !output.status.success() {
        anyhow::bail!(
            "`cargo {subcommand}` of the kernel programs failed:\n{}\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}
