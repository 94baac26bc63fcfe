//! SSH through the real daemon: Debian's sshd on a loopback target address, trusting only a key Warden
//! holds; the real `ssh` client run as `nobody` in a tagged cgroup, with strict host key checking against
//! `warden ca ssh`.

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::harness::{IdentitySpec, Idp, Warden, free_port, privileged, wait_for};

struct Sshd {
    child: Child,
    port: u16,
    host_pub: String,
    dir: tempfile::TempDir,
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn keygen(path: &Path) -> String {
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "test", "-f"])
        .arg(path)
        .output()
        .expect("ssh-keygen");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    std::fs::read_to_string(path.with_extension("pub")).unwrap().trim().to_owned()
}

fn sshd(ip: &str) -> Sshd {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let host_pub = keygen(&d.join("host_key"));
    let warden_pub = keygen(&d.join("warden_key"));
    std::fs::write(d.join("authorized_keys"), format!("{warden_pub}\n")).unwrap();
    std::fs::create_dir_all("/run/sshd").unwrap();
    let port = free_port();
    std::fs::write(
        d.join("sshd_config"),
        format!(
            "Port {port}\nListenAddress {ip}\nHostKey {d}/host_key\nPidFile {d}/sshd.pid\n\
             AuthorizedKeysFile {d}/authorized_keys\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n\
             PermitRootLogin prohibit-password\nUsePAM no\nStrictModes no\nLogLevel INFO\n",
            d = d.display()
        ),
    )
    .unwrap();
    let mut child = Command::new("/usr/sbin/sshd")
        .args(["-D", "-e", "-f"])
        .arg(d.join("sshd_config"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("run /usr/sbin/sshd (install openssh-server)");
    wait_for("sshd listening", Duration::from_secs(10), || {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("sshd exited: {status}");
        }
        std::net::TcpStream::connect((ip, port)).ok()
    });
    Sshd { child, port, host_pub, dir }
}

#[test]
fn ssh_through_warden_runs_allowed_commands_only_and_the_agent_holds_no_key() {
    if !privileged("ssh_through_warden_runs_allowed_commands_only_and_the_agent_holds_no_key") {
        return;
    }
    let ip = "127.0.0.6";
    let server = sshd(ip);
    let idp = Idp::start();
    let policy = format!(
        "targets:\n  build-host:\n    protocol: ssh\n    address: \"{ip}:{port}\"\n    host_key: \"{key}\"\n    \
         credentials: {{ user: root, private_key_file: {file:?} }}\nrules:\n  - name: research runs echo\n    \
         match: {{ groups: [agents-research] }}\n    grant:\n      - target: build-host\n        access: exec\n        \
         ttl: 5m\n        commands: [\"echo *\"]\n",
        port = server.port,
        key = server.host_pub,
        file = server.dir.path().join("warden_key"),
    );
    let w = Warden::builder("ssh")
        .policy(&policy)
        .identity(IdentitySpec::pkjwt(&idp, "bot"), &idp.issuer)
        .start();
    let cg = w.cgroup("agent");
    w.tag(&cg, "bot");

    // The agent's known_hosts holds only Warden's CA line.
    let out = w.cli(&["ca", "ssh"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let line = String::from_utf8(out.stdout).unwrap();
    assert!(line.starts_with("@cert-authority * ssh-ed25519 "), "{line}");
    let agent_dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(agent_dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let kh = agent_dir.path().join("known_hosts");
    std::fs::write(&kh, &line).unwrap();
    std::fs::set_permissions(&kh, std::fs::Permissions::from_mode(0o644)).unwrap();
    let marker = agent_dir.path().join("marker");
    let port = server.port.to_string();
    let kh_opt = format!("UserKnownHostsFile={}", kh.display());
    let ssh = |command: &str| {
        cg.command_as_nobody(
            "ssh",
            &[
                "-F",
                "/dev/null",
                "-o",
                "StrictHostKeyChecking=yes",
                "-o",
                &kh_opt,
                "-o",
                "GlobalKnownHostsFile=/dev/null",
                "-o",
                "BatchMode=yes",
                "-p",
                &port,
                &format!("agent@{ip}"),
                command,
            ],
        )
        .output()
        .expect("run ssh")
    };

    // With only Warden's CA trusted and strict checking on, this succeeds only through Warden: the kernel
    // redirected the connect to 127.0.0.6, and the cgroup has no other way to the server.
    let out = ssh("echo through warden");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "through warden\n");
    let exec = w.wait_record("ssh.exec", |r| r["event"] == "ssh.exec");
    assert_eq!(exec["command"], "echo through warden");
    assert_eq!(exec["exit_status"], 0);
    assert_eq!(exec["target"], "build-host");

    let trick = format!("echo hi; touch {}", marker.display());
    let out = ssh(&trick);
    assert_eq!(out.status.code(), Some(126), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("warden: "));
    assert!(!marker.exists());
    w.wait_record("refused ssh.exec", |r| r["event"] == "ssh.exec" && r["decision"] == "refused");

    // Outside Warden, nobody has no key the server accepts.
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--", "ssh", "-F", "/dev/null"])
        .args(["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes"])
        .args(["-p", &port, &format!("root@{ip}"), "true"])
        .current_dir("/")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("Permission denied"), "{out:?}");
}

#[test]
fn an_expiring_grant_cuts_an_interactive_ssh_session_with_a_message() {
    if !privileged("an_expiring_grant_cuts_an_interactive_ssh_session_with_a_message") {
        return;
    }
    let ip = "127.0.0.6";
    let server = sshd(ip);
    let idp = Idp::start();
    let policy = format!(
        "targets:\n  build-host:\n    protocol: ssh\n    address: \"{ip}:{port}\"\n    host_key: \"{key}\"\n    \
         credentials: {{ user: root, private_key_file: {file:?} }}\nrules:\n  - name: research gets a shell\n    \
         match: {{ groups: [agents-research] }}\n    grant:\n      - target: build-host\n        access: shell\n        \
         ttl: 4s\n",
        port = server.port,
        key = server.host_pub,
        file = server.dir.path().join("warden_key"),
    );
    let w = Warden::builder("sshcut")
        .policy(&policy)
        .identity(IdentitySpec::pkjwt(&idp, "bot"), &idp.issuer)
        .start();
    let cg = w.cgroup("agent");
    w.tag(&cg, "bot");
    let out = w.cli(&["ca", "ssh"]);
    let agent_dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(agent_dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let kh = agent_dir.path().join("known_hosts");
    std::fs::write(&kh, &out.stdout).unwrap();
    std::fs::set_permissions(&kh, std::fs::Permissions::from_mode(0o644)).unwrap();
    let kh_opt = format!("UserKnownHostsFile={}", kh.display());
    let port = server.port.to_string();
    let mut child = cg
        .command_as_nobody(
            "ssh",
            &[
                "-tt",
                "-F",
                "/dev/null",
                "-o",
                "StrictHostKeyChecking=yes",
                "-o",
                &kh_opt,
                "-o",
                "GlobalKnownHostsFile=/dev/null",
                "-o",
                "BatchMode=yes",
                "-p",
                &port,
                &format!("agent@{ip}"),
            ],
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    std::io::Write::write_all(&mut stdin, b"sleep 120\n").unwrap();
    let status = wait_for("ssh cut at expiry", Duration::from_secs(30), || child.try_wait().unwrap());
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(255), "{err}");
    assert!(err.contains("warden: session ended: the grant expired"), "{err}");
    let end = w.wait_record("session.end", |r| r["event"] == "session.end");
    assert_eq!(end["reason"], "grant_expired", "{end}");
    w.wait_record("ssh.recording", |r| r["event"] == "ssh.recording");
    drop(stdin);
}
