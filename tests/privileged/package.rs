//! The Debian package and the systemd unit, for real.
//!
//! The package test installs a .deb with `dpkg -i` into this machine, checks its files, modes, conffiles,
//! the installed unit (`systemd-analyze verify`) and `warden check` of the shipped config, runs the
//! installed daemon, removes the package (enforcement must stay, and the operator be told) and purges it
//! (enforcement lifted, /var/lib/warden gone). The .deb is `$WARDEN_DEB`, else the one `cargo xtask dist`
//! built if it is newer than this test build, else one packaged here from this build's own binary with
//! `cargo deb --no-build` (same metadata and maintainer scripts; a release build would take many minutes on
//! CI's two cores). Whatever happens, the package is purged and the daemon's pins removed at the end.
//!
//! The unit test runs `warden run` under the unit's capability bounding set, no_new_privs and descriptor
//! limit (read from dist/warden.service), and checks that the kernel programs still enforce and the proxy
//! still serves.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, SystemTime};

use crate::dataplane::{EPERM, assert_reached, errno};
use crate::harness::{
    IdentitySpec, Idp, Server, WARDEN, Warden, can_run, free_port, is_root, privileged, tcp_policy, wait_for,
};

#[path = "../../agent/examples/dist_assets.rs"]
#[expect(dead_code, reason = "the example's main is not called here, only its write()")]
mod dist_assets;

const UNIT: &str = "/usr/lib/systemd/system/warden.service";
const CONFIG: &str = "/etc/warden/warden.toml";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("repo root").to_path_buf()
}

fn ok(cmd: &mut Command) -> bool {
    cmd.stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("running {cmd:?}: {e}"))
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// dpkg's status of the warden package (`install ok installed`, `deinstall ok config-files`), if any.
fn dpkg_status() -> Option<String> {
    let out = Command::new("dpkg-query").args(["-W", "-f=${Status}", "warden"]).output().ok()?;
    let s = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    (out.status.success() && !s.is_empty() && !s.contains("not-installed")).then_some(s)
}

/// The cargo that runs this test (cargo-deb is its subcommand).
fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

fn mtime(p: &Path) -> Option<SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

/// The .deb to install: `$WARDEN_DEB`, a fresh one from `cargo xtask dist`, or one packaged here.
fn the_deb(scratch: &Path) -> PathBuf {
    if let Some(deb) = std::env::var_os("WARDEN_DEB") {
        return PathBuf::from(deb);
    }
    let target = Path::new(WARDEN).parent().and_then(Path::parent).expect("target dir");
    let ours = mtime(Path::new(WARDEN)).expect("test binary");
    let built = std::fs::read_dir(target.join("debian"))
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("warden_")))
        .filter(|p| p.extension().is_some_and(|e| e == "deb"))
        .filter(|p| mtime(p).is_some_and(|t| t >= ours))
        .max_by_key(|p| mtime(p));
    if let Some(deb) = built {
        println!("installing {} (from `cargo xtask dist`)", deb.display());
        return deb;
    }
    // cargo-deb's `target/release/` is $CARGO_TARGET_DIR/release: stage this build's binary and the
    // generated completions and man pages there.
    let stage = scratch.join("target");
    std::fs::create_dir_all(stage.join("release")).unwrap();
    std::fs::copy(WARDEN, stage.join("release/warden")).unwrap();
    dist_assets::write(&stage.join("release/dist")).expect("completions and man pages");
    let deb = scratch.join("warden-test.deb");
    let out = run(cargo()
        .args(["deb", "-p", "warden", "--no-build", "--fast", "--output"])
        .arg(&deb)
        .env("CARGO_TARGET_DIR", &stage)
        .current_dir(repo()));
    assert!(out.status.success(), "cargo deb --no-build:\n{}", text(&out));
    println!("installing {} (packaged from this test build)", deb.display());
    deb
}

/// Undoes everything the package test did, even when it failed half way.
struct Installed {
    daemon: Option<Child>,
    /// A copy of the edited config, for unpinning with this build's binary if the package's is gone.
    config_copy: PathBuf,
    bpffs: PathBuf,
}

impl Drop for Installed {
    fn drop(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            let _ = d.kill();
            let _ = d.wait();
        }
        if self.config_copy.exists() && self.bpffs.exists() {
            let _ = Command::new(WARDEN).args(["uninstall", "--config"]).arg(&self.config_copy).status();
        }
        if dpkg_status().is_some() {
            let out = Command::new("dpkg").args(["--purge", "warden"]).output();
            if let Ok(out) = out
                && !out.status.success()
            {
                eprintln!("dpkg --purge warden:\n{}", text(&out));
            }
        }
    }
}

fn mode(p: &str) -> u32 {
    std::fs::metadata(p).unwrap_or_else(|e| panic!("{p}: {e}")).permissions().mode() & 0o7777
}

#[test]
fn deb_installs_for_real_remove_keeps_enforcement_and_purge_lifts_it() {
    let tools = ["dpkg", "dpkg-query", "systemd-analyze", "man"]
        .iter()
        .all(|t| ok(Command::new("sh").args(["-c", &format!("command -v {t}")])));
    let cargo_deb = ok(cargo().args(["deb", "--version"]));
    if !can_run(
        "deb_installs_for_real_remove_keeps_enforcement_and_purge_lifts_it",
        &[
            ("needs root (dpkg -i)", is_root()),
            ("needs dpkg, systemd-analyze and man (run scripts/setup.sh)", tools),
            ("needs cargo-deb (run scripts/setup.sh)", cargo_deb),
        ],
    ) {
        return;
    }
    assert!(
        dpkg_status().is_none(),
        "a warden package is already on this machine ({:?}); this test installs and purges its own: \
         run `dpkg --purge warden` first",
        dpkg_status()
    );
    for p in ["/usr/bin/warden", CONFIG, "/var/lib/warden"] {
        assert!(!Path::new(p).exists(), "{p} exists but no warden package is installed: remove it first");
    }
    let scratch = tempfile::Builder::new().prefix("warden-package-").tempdir().unwrap();
    let deb = the_deb(scratch.path());
    let bpffs = PathBuf::from(format!("/sys/fs/bpf/warden-test-package-{}", std::process::id()));
    let mut g =
        Installed { daemon: None, config_copy: scratch.path().join("warden.toml"), bpffs: bpffs.clone() };

    // Install, for real.
    let out = run(Command::new("dpkg").arg("-i").arg(&deb).env("DEBIAN_FRONTEND", "noninteractive"));
    assert!(out.status.success(), "dpkg -i:\n{}", text(&out));
    assert_eq!(dpkg_status().as_deref(), Some("install ok installed"));
    // Enabled on the first install, as dh_installsystemd does (here without systemd running, the
    // symlink deb-systemd-helper makes is the whole of it).
    let wants = Path::new("/etc/systemd/system/multi-user.target.wants/warden.service");
    let link =
        std::fs::read_link(wants).unwrap_or_else(|e| panic!("warden.service not enabled: {wants:?}: {e}"));
    assert!(link.ends_with("systemd/system/warden.service") && wants.exists(), "{wants:?} -> {link:?}");
    let version = run(Command::new("/usr/bin/warden").arg("--version"));
    assert!(text(&version).starts_with("warden "), "{}", text(&version));

    // Files and modes.
    assert_eq!(mode("/usr/bin/warden"), 0o755);
    assert_eq!(mode("/var/lib/warden"), 0o700, "/var/lib/warden must be root-only");
    assert!(std::fs::metadata("/var/lib/warden").unwrap().is_dir());
    for f in [
        UNIT,
        CONFIG,
        "/etc/warden/policies/local.yaml",
        "/etc/warden/policies/examples/orders-db.yaml",
        "/usr/share/bash-completion/completions/warden",
        "/usr/share/zsh/vendor-completions/_warden",
        "/usr/share/fish/vendor_completions.d/warden.fish",
        "/usr/share/man/man1/warden.1.gz",
        "/usr/share/man/man1/warden-run.1.gz",
        "/usr/share/man/man1/warden-audit-verify.1.gz",
        "/usr/share/doc/warden/README.md",
    ] {
        assert_eq!(mode(f), 0o644, "{f}");
    }
    assert_eq!(mode("/etc/warden/policies/examples/secrets/orders-db"), 0o600);
    let conffiles = text(&run(Command::new("dpkg-query").args(["-W", "-f=${Conffiles}", "warden"])));
    for f in [CONFIG, "/etc/warden/policies/local.yaml", "/etc/warden/policies/examples/orders-db.yaml"] {
        assert!(conffiles.lines().any(|l| l.trim_start().starts_with(&format!("{f} "))), "{f}: {conffiles}");
    }
    let man = run(Command::new("man").args(["-P", "cat", "warden-run"]).env("MANWIDTH", "100"));
    assert!(text(&man).contains("Run the daemon in the foreground"), "{}", text(&man));

    // The installed unit, with its binary and man pages in place.
    let verify = run(Command::new("systemd-analyze").args(["verify", UNIT]));
    assert!(
        verify.status.success() && text(&verify).trim().is_empty(),
        "systemd-analyze verify:\n{}",
        text(&verify)
    );

    // The shipped config and policies pass `warden check`, and so do the shipped examples.
    let check = run(Command::new("/usr/bin/warden").args(["check", "--config", CONFIG]));
    assert!(check.status.success(), "warden check of the shipped config:\n{}", text(&check));
    let shipped = std::fs::read_to_string(CONFIG).unwrap();
    let examples = scratch.path().join("examples.toml");
    std::fs::write(
        &examples,
        shipped
            .replace("policies = \"/etc/warden/policies\"", "policies = \"/etc/warden/policies/examples\""),
    )
    .unwrap();
    let check = run(Command::new("/usr/bin/warden").arg("check").arg("--config").arg(&examples));
    assert!(check.status.success(), "warden check of the examples:\n{}", text(&check));
    assert!(text(&check).contains("3 policy files"), "{}", text(&check));

    // Run the installed daemon on its shipped config, edited as an operator would (a conffile) so that it
    // shares nothing with other tests: its own proxy port, pins and control socket.
    let port = free_port();
    let edited = shipped
        .replace(
            "proxy_listen = [\"127.0.0.1:15001\", \"[::1]:15001\"]",
            &format!("proxy_listen = [\"127.0.0.1:{port}\", \"[::1]:{port}\"]"),
        )
        .replace(
            "bpffs_dir = \"/sys/fs/bpf/warden\"",
            &format!("bpffs_dir = {:?}", bpffs.display().to_string()),
        )
        .replace(
            "control_socket = \"/run/warden/control.sock\"",
            &format!("control_socket = {:?}", scratch.path().join("control.sock").display().to_string()),
        );
    assert_eq!(edited.matches(&port.to_string()).count(), 2, "the shipped config's proxy_listen changed");
    assert!(edited.contains(&bpffs.display().to_string()) && edited.contains("control.sock\""), "{edited}");
    std::fs::write(CONFIG, &edited).unwrap();
    std::fs::write(&g.config_copy, &edited).unwrap();
    let log = std::fs::File::create(scratch.path().join("daemon.log")).unwrap();
    g.daemon = Some(
        Command::new("/usr/bin/warden")
            .args(["run", "--config", CONFIG])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let links = bpffs.join("links");
    let daemon_log = || std::fs::read_to_string(scratch.path().join("daemon.log")).unwrap_or_default();
    wait_for("the installed daemon's control socket", Duration::from_secs(30), || {
        if let Some(Ok(Some(status))) = g.daemon.as_mut().map(Child::try_wait) {
            panic!("the installed warden exited ({status}):\n{}", daemon_log());
        }
        std::os::unix::net::UnixStream::connect(scratch.path().join("control.sock")).is_ok().then_some(())
    });
    let pinned = std::fs::read_dir(&links).map_or(0, Iterator::count);
    assert!(pinned > 0, "no pinned links under {}:\n{}", links.display(), daemon_log());

    // Upgrade (the same version again: dpkg runs the upgrade paths of prerm and postinst): the operator's
    // config stays, and so do the daemon and its pins.
    let out = run(Command::new("dpkg").arg("-i").arg(&deb).env("DEBIAN_FRONTEND", "noninteractive"));
    assert!(out.status.success(), "dpkg -i again:\n{}", text(&out));
    assert_eq!(std::fs::read_to_string(CONFIG).unwrap(), edited, "the upgrade replaced an edited conffile");
    assert!(
        matches!(g.daemon.as_mut().map(Child::try_wait), Some(Ok(None))),
        "the upgrade stopped the daemon"
    );
    assert_eq!(std::fs::read_dir(&links).map_or(0, Iterator::count), pinned, "the upgrade unpinned programs");
    assert_eq!(mode("/var/lib/warden"), 0o700);

    // remove: enforcement stays, and the operator is told how to lift it.
    let out = run(Command::new("dpkg").args(["-r", "warden"]));
    assert!(out.status.success(), "dpkg -r:\n{}", text(&out));
    assert_eq!(dpkg_status().as_deref(), Some("deinstall ok config-files"));
    assert!(!Path::new("/usr/bin/warden").exists());
    assert!(text(&out).contains("warden uninstall --config /etc/warden/warden.toml"), "{}", text(&out));
    assert_eq!(std::fs::read_dir(&links).map_or(0, Iterator::count), pinned, "remove unpinned programs");
    assert!(Path::new(CONFIG).exists(), "remove must keep the conffiles");

    // purge: `warden uninstall` (stops the daemon, unpins everything), then /var/lib/warden goes.
    let out = run(Command::new("dpkg").args(["--purge", "warden"]));
    assert!(out.status.success(), "dpkg --purge:\n{}", text(&out));
    assert!(dpkg_status().is_none(), "{:?}", dpkg_status());
    assert!(text(&out).contains("removed"), "{}", text(&out));
    assert!(!bpffs.exists(), "purge left pins under {}: {}", bpffs.display(), text(&out));
    assert!(!Path::new("/var/lib/warden").exists(), "purge left /var/lib/warden");
    assert!(!Path::new(CONFIG).exists(), "purge left {CONFIG}");
    let daemon = g.daemon.as_mut().unwrap();
    wait_for("the daemon to stop (purge runs warden uninstall)", Duration::from_secs(20), || {
        daemon.try_wait().ok().flatten()
    });
}

/// This process's hard limit on open files.
fn hard_nofile() -> u64 {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap();
    let line = limits.lines().find(|l| l.starts_with("Max open files")).expect("Max open files");
    let hard = line.split_whitespace().nth(4).expect("hard limit");
    if hard == "unlimited" { u64::MAX } else { hard.parse().expect("a number") }
}

/// `KEY=value` lines of the unit's [Service] section.
fn unit_values(key: &str) -> Vec<String> {
    let unit = std::fs::read_to_string(repo().join("dist/warden.service")).unwrap();
    unit.lines().filter_map(|l| l.strip_prefix(&format!("{key}="))).map(str::to_owned).collect()
}

#[test]
fn the_units_capabilities_and_limits_are_enough_to_enforce() {
    if !privileged("the_units_capabilities_and_limits_are_enough_to_enforce") {
        return;
    }
    let caps = unit_values("CapabilityBoundingSet");
    assert_eq!(caps.len(), 1, "one CapabilityBoundingSet= line: {caps:?}");
    let caps: Vec<&str> = caps[0].split_whitespace().collect();
    assert_eq!(caps, ["CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN", "CAP_SYS_ADMIN"]);
    enforces_under("unitcaps", &caps);
    // The drop-in the unit's comments offer: without CAP_SYS_ADMIN only the programs' log goes.
    enforces_under("unitnosysadmin", &caps[..3]);
}

/// Starts `warden run` with only `caps` in its bounding set (and the unit's no_new_privs and descriptor
/// limit), and checks it enforces: a tagged process reaches the target through the proxy, is refused
/// anything else, and both are recorded.
fn enforces_under(name: &str, caps: &[&str]) {
    let bounding = std::iter::once("-all".to_owned())
        .chain(caps.iter().map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase())))
        .collect::<Vec<_>>()
        .join(",");
    assert_eq!(unit_values("NoNewPrivileges"), ["yes"]);
    let nofile = unit_values("LimitNOFILE");
    assert_eq!(nofile.len(), 1);
    // systemd sets the unit's limit; here it can only be lowered to it (raising a hard limit needs
    // CAP_SYS_RESOURCE, which this machine's root may lack), so the daemon gets the smaller of the two.
    let nofile = nofile[0].parse::<u64>().expect("LimitNOFILE= is a number").min(hard_nofile());
    let nofile_arg = format!("--nofile={nofile}:{nofile}");
    let idp = Idp::start();
    let db = Server::start("127.0.0.5", "db");
    let w = Warden::builder(name)
        .policy(&tcp_policy("db", db.addr, "5m"))
        .identity(IdentitySpec::pkjwt(&idp, "bot"), &idp.issuer)
        .wrapper(&[
            "prlimit",
            &nofile_arg,
            "--",
            "setpriv",
            "--bounding-set",
            &bounding,
            "--inh-caps=-all",
            "--no-new-privs",
            "--",
        ])
        .start();
    let pid = w.pid().expect("daemon pid");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status.lines().find_map(|l| l.strip_prefix(name)).map(str::trim).unwrap_or_default().to_owned()
    };
    let number = |cap: &str| match cap {
        "CAP_NET_ADMIN" => 12,
        "CAP_SYS_ADMIN" => 21,
        "CAP_PERFMON" => 38,
        "CAP_BPF" => 39,
        other => panic!("no number for {other}"),
    };
    let want = caps.iter().fold(0u64, |m, c| m | (1 << number(c)));
    assert_eq!(u64::from_str_radix(&field("CapBnd:"), 16).unwrap(), want, "{status}");
    assert_eq!(u64::from_str_radix(&field("CapEff:"), 16).unwrap(), want, "{status}");
    assert_eq!(field("NoNewPrivs:"), "1", "{status}");
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    assert!(
        limits.lines().any(|l| l.starts_with("Max open files") && l.contains(&format!(" {nofile} "))),
        "{limits}"
    );

    let cg = w.cgroup("agent");
    w.tag(&cg, "bot");
    let v = cg.probe(&["connect", "127.0.0.5", &db.addr.port().to_string()]);
    assert_reached(&v, "db");
    w.wait_record("session.start", |r| r["event"] == "session.start");
    let v = cg.probe(&["connect", "127.0.0.6", &db.addr.port().to_string()]);
    assert_eq!(errno(&v), Some(EPERM), "{v}");
    w.wait_record("connect.refused", |r| {
        r["event"] == "connect.refused" && r["dst"].as_str().is_some_and(|d| d.starts_with("127.0.0.6:"))
    });
    assert!(!w.log().contains("could not reserve"), "the proxy's ports were not reserved:\n{}", w.log());
}
