//! What ships beside the binary, checked by the tools that read it: the systemd unit
//! (`systemd-analyze verify`), the Debian maintainer scripts (`sh -n`), the Vagrant VM (`vagrant validate`,
//! which needs no provider) and its scripts (`bash -n`). The tools come from scripts/setup.sh; where one is
//! missing the test fails (set WARDEN_ALLOW_SKIP=1 to skip instead).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("repo root").to_path_buf()
}

/// True when `tool` runs; otherwise fails the test, or skips it under WARDEN_ALLOW_SKIP=1.
fn have(tool: &str, test: &str) -> bool {
    let runs = Command::new(tool).arg("--version").output().is_ok_and(|o| o.status.success());
    let need = format!("needs `{tool}` (run `sudo scripts/setup.sh`)");
    warden_test_support::require(test, &[(need.as_str(), runs)])
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

#[test]
fn the_systemd_unit_verifies() {
    if !have("systemd-analyze", "the_systemd_unit_verifies") {
        return;
    }
    // The unit names /usr/bin/warden, which only the package installs (the package test verifies the
    // installed unit as it is); here the binary this build made stands in for it.
    let unit = std::fs::read_to_string(repo().join("dist/warden.service")).unwrap();
    let ours = format!("{} ", env!("CARGO_BIN_EXE_warden"));
    let mut replaced = 0;
    let copied: String = unit
        .lines()
        .map(|l| {
            if l.starts_with("Exec") && l.contains("/usr/bin/warden ") {
                replaced += 1;
                l.replace("/usr/bin/warden ", &ours)
            } else {
                l.to_owned()
            }
        })
        .fold(String::new(), |acc, l| acc + &l + "\n");
    assert_eq!(replaced, 2, "ExecStartPre= and ExecStart= run /usr/bin/warden");
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("warden.service");
    std::fs::write(&copy, copied).unwrap();
    let out = Command::new("systemd-analyze").args(["verify", "--man=no"]).arg(&copy).output().unwrap();
    assert!(out.status.success(), "systemd-analyze verify:\n{}", text(&out));
    assert!(text(&out).trim().is_empty(), "systemd-analyze verify warns:\n{}", text(&out));
}

#[test]
fn the_unit_keeps_what_bpf_and_cgroups_need() {
    let unit = std::fs::read_to_string(repo().join("dist/warden.service")).unwrap();
    let set = |key: &str| unit.lines().find_map(|l| l.strip_prefix(&format!("{key}="))).map(str::to_owned);
    assert_eq!(set("Type").as_deref(), Some("notify"));
    assert_eq!(set("Restart").as_deref(), Some("always"));
    assert_eq!(set("ProtectSystem").as_deref(), Some("strict"));
    assert_eq!(set("NoNewPrivileges").as_deref(), Some("yes"));
    assert_eq!(set("SystemCallArchitectures").as_deref(), Some("native"));
    assert_eq!(set("StateDirectoryMode").as_deref(), Some("0700"));
    // These would make /proc/sys (ip_local_reserved_ports), /sys/fs/bpf and /sys/fs/cgroup read-only.
    for key in ["ProtectKernelTunables", "ProtectControlGroups"] {
        assert!(set(key).is_none_or(|v| v == "no"), "{key}= breaks the daemon");
    }
    // Stopping must never detach: no ExecStop= running `warden uninstall`.
    assert!(!unit.contains("uninstall\n") && set("ExecStop").is_none(), "the unit must not lift enforcement");
}

#[test]
fn the_maintainer_scripts_parse() {
    for script in ["postinst", "prerm", "postrm"] {
        let path = repo().join("dist/debian").join(script);
        let out = Command::new("sh").arg("-n").arg(&path).output().unwrap();
        assert!(out.status.success(), "sh -n {}: {}", path.display(), text(&out));
        let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&path).unwrap().permissions());
        assert_eq!(mode & 0o111, 0o111, "{} must be executable", path.display());
    }
}

#[test]
fn the_vagrant_vm_validates() {
    if !have("vagrant", "the_vagrant_vm_validates") {
        return;
    }
    // Vagrant keeps state in ~/.vagrant.d and in .vagrant/ beside the Vagrantfile: both go to a temp dir.
    let state = tempfile::tempdir().unwrap();
    let out = Command::new("vagrant")
        .args(["validate", "--ignore-provider"])
        .current_dir(repo().join("vagrant"))
        .env("VAGRANT_CWD", repo().join("vagrant"))
        .env("VAGRANT_HOME", state.path().join("home"))
        .env("VAGRANT_DOTFILE_PATH", state.path().join("dotfile"))
        .env("VAGRANT_CHECKPOINT_DISABLE", "1")
        .output()
        .unwrap();
    assert!(out.status.success(), "vagrant validate:\n{}", text(&out));
    assert!(text(&out).contains("validated successfully"), "{}", text(&out));
    for script in ["provision.sh", "demo.sh", "build-box.sh"] {
        let path = repo().join("vagrant").join(script);
        let out = Command::new("bash").arg("-n").arg(&path).output().unwrap();
        assert!(out.status.success(), "bash -n {}: {}", path.display(), text(&out));
    }
}
