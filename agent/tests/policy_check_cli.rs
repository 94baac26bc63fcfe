//! `warden check --config FILE` on policies: the shipped examples pass (exit 0); broken files print every
//! error as `file:line:col: message` and exit 64.

use std::path::Path;
use std::process::Command;

fn check(config: &Path) -> (i32, String, String) {
    let out =
        Command::new(env!("CARGO_BIN_EXE_warden")).arg("check").arg("--config").arg(config).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn config(dir: &Path, policies: &Path) -> std::path::PathBuf {
    let path = dir.join("warden.toml");
    std::fs::write(&path, format!("[agent]\npolicies = \"{}\"\n", policies.display())).unwrap();
    path
}

#[test]
fn the_example_policies_pass_warden_check() {
    let dir = tempfile::tempdir().unwrap();
    let policies = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
    let (code, stdout, stderr) = check(&config(dir.path(), &policies));
    assert_eq!(code, 0, "stdout: {stdout}\nstderr: {stderr}");
    assert!(stdout.contains("ok (3 policy files"), "{stdout}");
}

#[test]
fn broken_policies_print_every_error_located_and_exit_64() {
    let dir = tempfile::tempdir().unwrap();
    let policies = dir.path().join("policies");
    std::fs::create_dir(&policies).unwrap();
    std::fs::write(
        policies.join("a.yaml"),
        "targets:\n  db:\n    protocol: tcp\n    address: 127.0.0.1:99999\n    colour: blue\n",
    )
    .unwrap();
    std::fs::write(
        policies.join("b.yml"),
        "rules:\n  - name: r\n    match: { groups: [g] }\n    grant: [{ target: dbb, access: connect, ttl: 10x }]\n",
    )
    .unwrap();
    std::fs::write(policies.join("notes.txt"), "not a policy: ignored\n").unwrap();
    let (code, stdout, stderr) = check(&config(dir.path(), &policies));
    assert_eq!(code, 64, "stdout: {stdout}\nstderr: {stderr}");
    let a = policies.join("a.yaml").display().to_string();
    let b = policies.join("b.yml").display().to_string();
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(
        lines,
        [
            format!("{a}:4:14: address: `99999` is not a port (1-65535)"),
            format!(
                "{a}:5:5: unknown key `colour` in target `db`; expected one of: protocol, address, databases, tls, ca_file, credentials, record_parameters, host_key, host_ca"
            ),
            format!("{b}:4:23: unknown target `dbb`; did you mean `db`?"),
            format!(
                "{b}:4:50: ttl: `10x` is not a duration; write a number and a unit: s, m or h (e.g. 90s, 15m, 2h)"
            ),
        ],
        "\n{stderr}"
    );
}

/// A `commands` pattern the exec rule would never match (a glob it does not know, a character it refuses,
/// a first word no command may have) fails `warden check` at the pattern's line, and `warden run` refuses
/// the same policy before it binds anything.
#[test]
fn bad_command_patterns_fail_check_and_run_at_their_line() {
    let dir = tempfile::tempdir().unwrap();
    let policies = dir.path().join("policies");
    std::fs::create_dir(&policies).unwrap();
    std::fs::write(policies.join("key"), "unused\n").unwrap();
    let p = policies.join("ssh.yaml");
    std::fs::write(
        &p,
        "targets:\n  host:\n    protocol: ssh\n    address: 127.0.0.1:22\n    host_key: ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDajeLNKrCK4WbYCSERXTzhC8q90ush9i9QvamBWbBXV\n    credentials: { user: u, private_key_file: key }\nrules:\n  - name: r\n    match: { groups: [g] }\n    grant:\n      - target: host\n        access: exec\n        ttl: 5m\n        commands:\n          - uptime\n          - \"ls ?\"\n          - \"uptime; id\"\n          - \"-c *\"\n          - \"LD_PRELOAD=* ls\"\n          - \"systemctl status *\"\n",
    )
    .unwrap();
    let config = config(dir.path(), &policies);
    let (code, stdout, stderr) = check(&config);
    assert_eq!(code, 64, "stdout: {stdout}\nstderr: {stderr}");
    let f = p.display().to_string();
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 4, "{stderr}");
    for (line, (at, what)) in lines.iter().zip([
        ("16:13", "`ls ?`: pattern contains `?` at byte 3, a glob the rule does not know"),
        ("17:13", "`uptime; id`: pattern contains `;` at byte 6"),
        ("18:13", "`-c *`: pattern starts with `-`"),
        ("19:13", "`LD_PRELOAD=* ls`: pattern's first word `LD_PRELOAD=` contains `=`"),
    ]) {
        assert!(line.starts_with(&format!("{f}:{at}: commands: {what}")), "{line}\n\n{stderr}");
    }

    let out =
        Command::new(env!("CARGO_BIN_EXE_warden")).arg("run").arg("--config").arg(&config).output().unwrap();
    let run_err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{run_err}");
    assert_eq!(run_err.lines().filter(|l| l.contains(": commands: `")).count(), 4, "{run_err}");
}
