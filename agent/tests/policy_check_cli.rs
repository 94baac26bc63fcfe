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
