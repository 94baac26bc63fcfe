//! The SSH handler in process, between the real OpenSSH client and a real OpenSSH server: Debian's `sshd`
//! on a loopback port with its own host key, trusting only a key that Warden holds. The test drives the
//! seam itself (hello → connect → run) on a loopback listener, with a real audit writer.
//!
//! Needs root (sshd logs in as the user it runs as only when it is root) and `openssh-server`,
//! `openssh-client` installed (scripts/setup.sh does both).

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde_json::{Map, Value};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use warden::audit::{Audit, AuditOptions, Record};
use warden::origin::ConnOrigin;
use warden::policy::{Access, Approval, SshLogin, SshTarget, Target, TargetKind, Terms};
use warden::protocol::ssh::Ssh;
use warden::protocol::{Ask, Authorize, Counters, Cut, End, IdentityView, Refusal, RefusalCode, Session};

const DEADLINE: Duration = Duration::from_secs(60);

fn run(cmd: &str, args: &[&str]) {
    let out = std::process::Command::new(cmd).args(args).output().unwrap();
    assert!(out.status.success(), "{cmd} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn keygen(path: &Path) -> String {
    run("ssh-keygen", &["-q", "-t", "ed25519", "-N", "", "-C", "test", "-f", path.to_str().unwrap()]);
    std::fs::read_to_string(path.with_extension("pub")).unwrap().trim().to_owned()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Debian's sshd in a temp dir, killed on drop.
struct Sshd {
    child: tokio::process::Child,
    addr: SocketAddr,
    host_pub: String,
    warden_key: PathBuf,
    user: String,
    /// Its log lines after start-up (at `LogLevel DEBUG1` with `debug`).
    log: Arc<std::sync::Mutex<Vec<String>>>,
    _dir: tempfile::TempDir,
}

impl Sshd {
    async fn start(debug: bool) -> Self {
        assert!(nix::unistd::geteuid().is_root(), "this test runs sshd and must run as root");
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let host_pub = keygen(&d.join("host_key"));
        let warden_pub = keygen(&d.join("warden_key"));
        std::fs::write(d.join("authorized_keys"), format!("{warden_pub}\n")).unwrap();
        std::fs::create_dir_all("/run/sshd").unwrap();
        let port = free_port();
        let config = format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/host_key\nPidFile {d}/sshd.pid\n\
             AuthorizedKeysFile {d}/authorized_keys\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n\
             PubkeyAuthentication yes\nPermitRootLogin prohibit-password\nUsePAM no\nStrictModes no\n\
             AllowTcpForwarding yes\nX11Forwarding no\nSubsystem sftp /usr/lib/openssh/sftp-server\nLogLevel {level}\n",
            d = d.display(),
            level = if debug { "DEBUG1" } else { "INFO" }
        );
        std::fs::write(d.join("sshd_config"), config).unwrap();
        let mut child = tokio::process::Command::new("/usr/sbin/sshd")
            .args(["-D", "-e", "-f"])
            .arg(d.join("sshd_config"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("run /usr/sbin/sshd (install openssh-server)");
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let ready = tokio::time::timeout(DEADLINE, async {
            while let Some(line) = lines.next_line().await.unwrap() {
                if line.contains("Server listening on 127.0.0.1") {
                    return true;
                }
                eprintln!("sshd: {line}");
            }
            false
        })
        .await;
        assert!(matches!(ready, Ok(true)), "sshd did not start");
        // Keep draining its log so it never blocks on a full pipe.
        let log = Arc::new(std::sync::Mutex::new(Vec::new()));
        let kept = log.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                if debug {
                    kept.lock().unwrap().push(line);
                }
            }
        });
        let user = nix::unistd::User::from_uid(nix::unistd::geteuid()).unwrap().unwrap().name;
        Self {
            child,
            addr: format!("127.0.0.1:{port}").parse().unwrap(),
            host_pub,
            warden_key: d.join("warden_key"),
            user,
            log,
            _dir: dir,
        }
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

struct AllowAll;
impl Authorize for AllowAll {
    fn authorize(&self, _session: &Session, _ask: &Ask<'_>) -> Result<(), Refusal> {
        Ok(())
    }
}

#[derive(Clone)]
struct Opts {
    access: Access,
    commands: Option<Vec<String>>,
    forward: bool,
    sftp: bool,
    host_key: Option<String>,
    refuse: Option<String>,
    /// sshd at `LogLevel DEBUG1`, its lines kept (`Sshd::log`).
    sshd_debug: bool,
}

impl Opts {
    fn exec(commands: &[&str]) -> Self {
        Self {
            access: Access::Exec,
            commands: Some(commands.iter().map(|s| (*s).to_owned()).collect()),
            forward: false,
            sftp: false,
            host_key: None,
            refuse: None,
            sshd_debug: false,
        }
    }
    fn shell() -> Self {
        Self { access: Access::Shell, commands: None, ..Self::exec(&[]) }
    }
}

struct Fixture {
    root: tempfile::TempDir,
    sshd: Sshd,
    audit: Audit,
    audit_task: Option<tokio::task::JoinHandle<()>>,
    shutdown: CancellationToken,
    addr: SocketAddr,
    known_hosts: PathBuf,
    ends: mpsc::UnboundedReceiver<(String, End)>,
    cuts: mpsc::UnboundedReceiver<(String, Cut)>,
    hello_errors: mpsc::UnboundedReceiver<String>,
}

impl Fixture {
    async fn start(opts: Opts) -> Self {
        Self::start_with(opts, Duration::from_secs(10)).await
    }

    async fn start_with(opts: Opts, hello_deadline: Duration) -> Self {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_env("WARDEN_LOG"))
            .with_test_writer()
            .try_init();
        let sshd = Sshd::start(opts.sshd_debug).await;
        let root = tempfile::tempdir().unwrap();
        let shutdown = CancellationToken::new();
        let (audit, audit_task) =
            Audit::start_with(&AuditOptions::in_dir(root.path()), shutdown.clone()).unwrap();
        let mut ssh = Ssh::new(root.path(), audit.clone()).unwrap();
        ssh.set_hello_deadline(hello_deadline);
        let ssh = Arc::new(ssh);
        let known_hosts = root.path().join("known_hosts");
        let line = warden::protocol::ssh::ca::known_hosts_line(root.path()).unwrap();
        assert_eq!(line, ssh.known_hosts_line().unwrap());
        std::fs::write(&known_hosts, format!("{line}\n")).unwrap();
        let target = Arc::new(Target {
            name: "build-host".into(),
            host: "127.0.0.1".into(),
            port: sshd.addr.port(),
            kind: TargetKind::Ssh(SshTarget {
                host_key: Some(opts.host_key.clone().unwrap_or_else(|| sshd.host_pub.clone())),
                host_ca: None,
                credentials: SshLogin {
                    user: sshd.user.clone(),
                    private_key_file: Some(sshd.warden_key.clone()),
                    certificate_file: None,
                    password_file: None,
                },
            }),
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (end_tx, ends) = mpsc::unbounded_channel();
        let (cut_tx, cuts) = mpsc::unbounded_channel();
        let (err_tx, hello_errors) = mpsc::unbounded_channel();
        let upstream = sshd.addr;
        let audit2 = audit.clone();
        tokio::spawn(async move {
            let mut n = 0;
            while let Ok((stream, _)) = listener.accept().await {
                n += 1;
                let id = format!("s-{n}");
                let (ssh, target, opts, audit) = (ssh.clone(), target.clone(), opts.clone(), audit2.clone());
                let (end_tx, cut_tx, err_tx) = (end_tx.clone(), cut_tx.clone(), err_tx.clone());
                tokio::spawn(async move {
                    let origin = ConnOrigin {
                        pid: std::process::id(),
                        tid: 0,
                        uid: 0,
                        gid: 0,
                        cgroup_id: 1,
                        cgroup: "/test".into(),
                        tagged_cgroup: 1,
                        binding: 0,
                        target: 0,
                        dst: upstream,
                        at: SystemTime::now(),
                    };
                    let mut greeting = match ssh.hello(stream, &target, &origin).await {
                        Ok(Some(g)) => g,
                        Ok(None) => return,
                        Err(e) => {
                            let _ = err_tx.send(e.to_string());
                            return;
                        }
                    };
                    assert_eq!(greeting.hello().user.as_deref(), Some("agent"));
                    assert_eq!(greeting.hello().details["auth_method"], "none");
                    assert!(
                        greeting.hello().details["client_version"]
                            .as_str()
                            .unwrap()
                            .starts_with("SSH-2.0-OpenSSH")
                    );
                    if let Some(reason) = &opts.refuse {
                        greeting.refuse(&Refusal::new(RefusalCode::Policy, reason.clone())).await;
                        let _ = end_tx.send((id, End::KilledByOperator));
                        return;
                    }
                    let terms = Terms {
                        rule: "test".into(),
                        target: target.name.clone(),
                        access: opts.access,
                        ttl: Duration::from_secs(600),
                        mask: Vec::new(),
                        approval: Approval::None,
                        commands: opts.commands.clone(),
                        forward: opts.forward,
                        sftp: opts.sftp,
                    };
                    if let Err(end) = greeting.connect(upstream, &terms).await {
                        let _ = end_tx.send((id, end));
                        return;
                    }
                    let session = Session {
                        id: id.clone(),
                        origin,
                        target: target.clone(),
                        terms,
                        identity: Some(IdentityView {
                            name: "research".into(),
                            sub: "sub-1".into(),
                            client_id: "client-1".into(),
                            groups: vec!["agents".into()],
                        }),
                        grant: Some("g-1".into()),
                        audit: audit.clone(),
                        counters: Arc::new(Counters::default()),
                        cut: Cut::new(),
                        authorize: Arc::new(AllowAll),
                    };
                    let _ = cut_tx.send((id.clone(), session.cut.clone()));
                    let end = greeting.run(session).await;
                    let _ = end_tx.send((id, end));
                });
            }
        });
        Self {
            root,
            sshd,
            audit,
            audit_task: Some(audit_task),
            shutdown,
            addr,
            known_hosts,
            ends,
            cuts,
            hello_errors,
        }
    }

    fn ssh(&self) -> tokio::process::Command {
        let mut c = tokio::process::Command::new("ssh");
        c.args([
            "-F",
            "/dev/null",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "GlobalKnownHostsFile=/dev/null",
        ])
        .arg("-o")
        .arg(format!("UserKnownHostsFile={}", self.known_hosts.display()))
        .args(["-o", "BatchMode=yes", "-o", "IdentityAgent=none", "-o", "ConnectTimeout=20"])
        .args(["-p", &self.addr.port().to_string()])
        .stdin(Stdio::null())
        .kill_on_drop(true);
        c
    }

    /// `ssh agent@127.0.0.1 COMMAND` (plus `extra` options); its exit code, stdout, stderr.
    async fn exec(&self, extra: &[&str], command: &str) -> (i32, String, String) {
        let mut c = self.ssh();
        c.args(extra).arg("agent@127.0.0.1");
        if !command.is_empty() {
            c.arg(command);
        }
        let out = tokio::time::timeout(DEADLINE, c.output()).await.expect("ssh timed out").unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    async fn next_end(&mut self) -> (String, End) {
        tokio::time::timeout(DEADLINE, self.ends.recv()).await.expect("no session ended").unwrap()
    }

    /// Every record written so far (a durable marker first, so everything queued before is on disk).
    async fn records(&self) -> Vec<Map<String, Value>> {
        self.audit.append_durable(Record::new("test.mark")).await.unwrap();
        let mut files: Vec<PathBuf> = std::fs::read_dir(self.audit.dir())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
            .collect();
        files.sort();
        files
            .iter()
            .flat_map(|f| std::fs::read_to_string(f).unwrap().lines().map(str::to_owned).collect::<Vec<_>>())
            .map(|l| serde_json::from_str(&l).unwrap())
            .collect()
    }

    async fn events(&self, event: &str) -> Vec<Map<String, Value>> {
        self.records().await.into_iter().filter(|r| r["event"] == event).collect()
    }

    fn audit_dir(&self) -> &Path {
        self.audit.dir()
    }

    fn warden(args: &[&str]) -> (i32, String, String) {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_warden")).args(args).output().unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(t) = self.audit_task.take() {
            t.abort();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allowed_command_runs_with_strict_host_key_checking_and_is_recorded() {
    let mut f = Fixture::start(Opts::exec(&["echo *", "false", "seq *"])).await;
    let (code, out, err) = f.exec(&[], "echo hello from   upstream").await;
    assert_eq!((code, out.as_str()), (0, "hello from upstream\n"), "{err}");
    f.next_end().await;
    let (code, _, err) = f.exec(&[], "false").await;
    assert_eq!(code, 1, "{err}");
    f.next_end().await;
    // A long output arrives whole, and the exit status after it.
    let (code, out, err) = f.exec(&[], "seq 1 200000").await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.lines().count(), 200_000);
    assert_eq!(out.lines().last(), Some("200000"));
    let (_, end) = f.next_end().await;
    assert_eq!(end, End::ClientClosed);
    let execs = f.events("ssh.exec").await;
    assert_eq!(execs.len(), 3, "{execs:?}");
    assert_eq!(execs[0]["command"], "echo hello from   upstream");
    assert_eq!(execs[0]["decision"], "allowed");
    assert_eq!(execs[0]["exit_status"], 0);
    assert_eq!(execs[0]["bytes_down"], 20);
    assert_eq!(execs[0]["session"], "s-1");
    assert_eq!(execs[0]["target"], "build-host");
    assert_eq!(execs[1]["exit_status"], 1);
    assert_eq!(execs[2]["bytes_down"], out.len() as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_outside_the_list_and_shell_tricks_are_refused_and_nothing_runs() {
    let mut f = Fixture::start(Opts::exec(&["echo *"])).await;
    let marker = f.root.path().join("marker");
    let m = marker.display().to_string();
    let tricks = [
        format!("touch {m}"),
        format!("echo hi; touch {m}"),
        format!("echo hi && touch {m}"),
        format!("echo hi || touch {m}"),
        format!("echo hi | touch {m}"),
        format!("echo hi & touch {m}"),
        format!("echo hi > {m}"),
        format!("echo $(touch {m})"),
        format!("echo `touch {m}`"),
        format!("echo hi\ntouch {m}"),
        format!("echo ${{IFS}}; touch {m}"),
        format!("echo '; touch {m}'"),
        format!("echo \\; touch {m}"),
        format!("echo {m}*"),
        format!("echo ~; touch {m}"),
        format!("echo {{a,b}} # ; touch {m}"),
    ];
    for t in &tricks {
        let (code, out, err) = f.exec(&[], t).await;
        assert_eq!(code, 126, "{t:?} must be refused: out {out:?} err {err:?}");
        assert!(err.contains("warden: "), "{t:?}: the client prints why: {err:?}");
        f.next_end().await;
    }
    assert!(!marker.exists(), "a refused command ran");
    let refused: Vec<_> =
        f.events("ssh.exec").await.into_iter().filter(|r| r["decision"] == "refused").collect();
    assert_eq!(refused.len(), tricks.len());
    assert!(refused[0]["reason"].as_str().unwrap().contains("allow-list"));
    assert!(refused[1]["reason"].as_str().unwrap().contains("`;`"));
    // And an allowed one still works in the same grant.
    let (code, out, _) = f.exec(&[], "echo fine").await;
    assert_eq!((code, out.as_str()), (0, "fine\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pty_shell_is_recorded_replayed_and_an_edit_fails_verify() {
    let mut f = Fixture::start(Opts::shell()).await;
    let mut c = f.ssh();
    c.args(["-tt", "agent@127.0.0.1"]).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"echo typed-$((6*7))\nexit\n").await.unwrap();
    let out = tokio::time::timeout(DEADLINE, child.wait_with_output()).await.unwrap().unwrap();
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(printed.contains("typed-42"), "{printed:?} / {}", String::from_utf8_lossy(&out.stderr));
    let (id, _) = f.next_end().await;
    let recs = f.events("ssh.recording").await;
    assert_eq!(recs.len(), 1, "{recs:?}");
    assert_eq!(recs[0]["kind"], "shell");
    let file = f.audit_dir().join(recs[0]["file"].as_str().unwrap());
    assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(text.lines().any(|l| l.contains("\"i\"") && l.contains("typed-$((6*7))")), "{text}");

    let dir = f.audit_dir().display().to_string();
    let (code, replayed, err) = Fixture::warden(&["audit", "replay", &id, "--speed", "0", "--dir", &dir]);
    assert_eq!(code, 0, "{err}");
    assert!(replayed.contains("echo typed-$((6*7))"), "what was typed (echoed): {replayed:?}");
    assert!(replayed.contains("typed-42"), "what was printed: {replayed:?}");

    let (code, out, err) = Fixture::warden(&["audit", "verify", "--dir", &dir]);
    assert_eq!(code, 0, "{out}{err}");
    // An export can carry the recordings: the exported chain verifies with them beside it.
    let export = tempfile::tempdir().unwrap();
    let (code, jsonl, err) =
        Fixture::warden(&["audit", "export", "--dir", &dir, "--recordings", export.path().to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    std::fs::write(export.path().join("audit-00000000000000000000.jsonl"), jsonl).unwrap();
    assert_eq!(
        std::fs::read(export.path().join(recs[0]["file"].as_str().unwrap())).unwrap(),
        text.as_bytes()
    );
    let (code, out, err) = Fixture::warden(&["audit", "verify", "--dir", export.path().to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    let edited = text.replace("typed-42", "typed-43");
    std::fs::write(&file, edited).unwrap();
    let (code, out, _) = Fixture::warden(&["audit", "verify", "--dir", &dir]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("TAMPERED") && out.contains("recording"), "{out}");
    let (code, _, err) = Fixture::warden(&["audit", "replay", &id, "--speed", "0", "--dir", &dir]);
    assert_eq!(code, 1);
    assert!(err.contains("altered"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exec_grant_refuses_a_shell() {
    let mut f = Fixture::start(Opts::exec(&["echo *"])).await;
    let mut c = f.ssh();
    c.args(["-tt", "agent@127.0.0.1"]).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let out = tokio::time::timeout(DEADLINE, c.output()).await.unwrap().unwrap();
    assert_eq!(out.status.code(), Some(126));
    let all = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(all.contains("does not allow an interactive shell"), "{all}");
    f.next_end().await;
    assert_eq!(f.events("ssh.refused").await[0]["request"], "shell");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_host_key_mismatch_is_refused_with_a_message() {
    let other = tempfile::tempdir().unwrap();
    let wrong = keygen(&other.path().join("k"));
    let mut f = Fixture::start(Opts { host_key: Some(wrong), ..Opts::exec(&["echo *"]) }).await;
    let (code, out, err) = f.exec(&[], "echo never").await;
    assert_eq!(code, 255, "{out}{err}");
    assert!(err.contains("host key mismatch"), "{err}");
    let (_, end) = f.next_end().await;
    assert!(
        matches!(&end, End::UpstreamRefused { detail } if detail.contains("host key mismatch")),
        "{end:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gate_refusal_is_a_disconnect_the_client_prints() {
    let mut f =
        Fixture::start(Opts { refuse: Some("no rule grants research build-host".into()), ..Opts::shell() })
            .await;
    let (code, _, err) = f.exec(&[], "true").await;
    assert_eq!(code, 255);
    assert!(err.contains("access to build-host refused: no rule grants research build-host"), "{err}");
    f.next_end().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_is_refused_without_forward_and_recorded() {
    let mut f = Fixture::start(Opts::shell()).await;
    let target = f.sshd.addr.to_string();
    // -W is a direct-tcpip channel.
    let (code, _, err) = f.exec(&["-W", &target], "").await;
    assert_ne!(code, 0);
    assert!(err.contains("port forwarding is not granted"), "{err}");
    f.next_end().await;
    // -R is a tcpip-forward request.
    let _ = f.exec(&["-o", "ExitOnForwardFailure=yes", "-R", "0:127.0.0.1:9"], "echo x").await;
    f.next_end().await;
    // -L: the listener is local to ssh; the channel it opens per connection is refused.
    let lport = free_port();
    let mut c = f.ssh();
    c.args(["-N", "-L", &format!("{lport}:{target}"), "agent@127.0.0.1"]).stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    let stream = tokio::time::timeout(DEADLINE, async {
        loop {
            if let Ok(s) = TcpStream::connect(("127.0.0.1", lport)).await {
                return s;
            }
            // Polls for ssh's local listener (it prints nothing when it is up).
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap();
    let mut stream = stream;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(DEADLINE, stream.read_to_end(&mut buf)).await.unwrap();
    assert!(!String::from_utf8_lossy(&buf).contains("SSH-2.0"), "the forward reached the server");
    child.start_kill().unwrap();
    let _ = child.wait().await;
    f.next_end().await;
    let refused = f.events("ssh.refused").await;
    let requests: Vec<&str> = refused.iter().map(|r| r["request"].as_str().unwrap()).collect();
    assert_eq!(requests, ["direct-tcpip", "tcpip-forward", "direct-tcpip"], "{refused:?}");
    assert_eq!(refused[0]["detail"], target);
}

/// An agent refused in a loop (here: 200 `-L` connections, each a refused direct-tcpip channel) writes at
/// most its session's budget of `ssh.refused` records a second; every other refusal is still enforced and
/// counted in `events.lost`, so the trail cannot be flooded from inside one session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_in_a_loop_are_recorded_within_a_budget() {
    const TRIES: usize = 200;
    let mut f = Fixture::start(Opts::shell()).await;
    let target = f.sshd.addr.to_string();
    let lport = free_port();
    let mut c = f.ssh();
    c.args(["-N", "-L", &format!("{lport}:{target}"), "agent@127.0.0.1"]).stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    tokio::time::timeout(DEADLINE, async {
        while TcpStream::connect(("127.0.0.1", lport)).await.is_err() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap();
    let started = std::time::Instant::now();
    // The probe above was the first refused channel.
    let tries: Vec<_> = (1..TRIES)
        .map(|_| {
            tokio::spawn(async move {
                let mut s = TcpStream::connect(("127.0.0.1", lport)).await.unwrap();
                let mut buf = Vec::new();
                let _ = tokio::time::timeout(DEADLINE, s.read_to_end(&mut buf)).await;
                buf
            })
        })
        .collect();
    for t in tries {
        let buf = t.await.unwrap();
        assert!(!String::from_utf8_lossy(&buf).contains("SSH-2.0"), "a forward reached the server");
    }
    let elapsed = started.elapsed().as_secs() + 1;
    child.start_kill().unwrap();
    let _ = child.wait().await;
    f.next_end().await;
    let recorded = f.events("ssh.refused").await.len();
    let lost: u64 = f
        .events("events.lost")
        .await
        .iter()
        .flat_map(|r| r["rate_limited"].as_array().unwrap().clone())
        .inspect(|l| assert_eq!(l["source"], "ssh", "{l}"))
        .map(|l| l["events"].as_u64().unwrap())
        .sum();
    assert!(recorded >= 20, "the budget's records are written: {recorded}");
    let budget = 20 * usize::try_from(elapsed + 1).unwrap();
    assert!(recorded <= budget, "{recorded} ssh.refused records in about {elapsed} s");
    assert_eq!(recorded + usize::try_from(lost).unwrap(), TRIES, "every refusal is recorded or counted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_ends_an_interactive_session_with_a_message() {
    let mut f = Fixture::start(Opts::shell()).await;
    let mut c = f.ssh();
    c.args(["-tt", "agent@127.0.0.1"]).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"echo ready-$((6*7))\n").await.unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let (_, cut) = tokio::time::timeout(DEADLINE, f.cuts.recv()).await.unwrap().unwrap();
    tokio::time::timeout(DEADLINE, async {
        let mut line = String::new();
        loop {
            line.clear();
            assert!(stdout.read_line(&mut line).await.unwrap() > 0, "ssh ended early");
            if line.contains("ready-42") {
                break;
            }
        }
    })
    .await
    .expect("the shell did not answer");
    assert!(cut.cut(End::GrantExpired));
    let out = tokio::time::timeout(DEADLINE, child.wait_with_output()).await.unwrap().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(255), "{err}");
    assert!(err.contains("warden: session ended: the grant expired"), "{err}");
    let (_, end) = f.next_end().await;
    assert_eq!(end, End::GrantExpired);
    // The recording was closed and chained.
    assert_eq!(f.events("ssh.recording").await.len(), 1);
    drop(stdin);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_ends_that_connection_only() {
    let mut f = Fixture::start_with(Opts::exec(&["echo *"]), Duration::from_secs(2)).await;
    // Not SSH at all.
    let mut s = TcpStream::connect(f.addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let e = tokio::time::timeout(DEADLINE, f.hello_errors.recv()).await.unwrap().unwrap();
    assert!(e.contains("ssh"), "{e}");
    // A version line, then an absurd packet length.
    let mut s2 = TcpStream::connect(f.addr).await.unwrap();
    s2.write_all(b"SSH-2.0-evil\r\n\xff\xff\xff\xf0garbagegarbage").await.unwrap();
    let e = tokio::time::timeout(DEADLINE, f.hello_errors.recv()).await.unwrap().unwrap();
    assert!(e.contains("handshake"), "{e}");
    // A client that never authenticates hits the deadline.
    let _s3 = TcpStream::connect(f.addr).await.unwrap();
    let e = tokio::time::timeout(DEADLINE, f.hello_errors.recv()).await.unwrap().unwrap();
    assert!(e.contains("within 2s"), "{e}");
    drop((s, s2));
    // The listener still serves.
    let (code, out, err) = f.exec(&[], "echo still here").await;
    assert_eq!((code, out.as_str()), (0, "still here\n"), "{err}");
    f.next_end().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forward_grant_relays_w_and_records_it() {
    let mut f = Fixture::start(Opts { forward: true, ..Opts::shell() }).await;
    let target = f.sshd.addr.to_string();
    let (_, out, err) = f.exec(&["-W", &target], "").await;
    assert!(out.starts_with("SSH-2.0-OpenSSH"), "the forward reached the server: {out:?} {err}");
    f.next_end().await;
    let fw = f.events("ssh.forward").await;
    assert_eq!(fw.len(), 1, "{:?}", f.records().await);
    assert_eq!(fw[0]["to_host"], "127.0.0.1");
    assert_eq!(fw[0]["direction"], "local");
    assert_eq!(fw[0]["to_port"], f.sshd.addr.port());
    assert!(fw[0]["bytes_down"].as_u64().unwrap() > 0);
}

/// `ssh -R` under `forward: true`: the upstream sshd listens on a loopback port, each connection to it
/// comes back through Warden as a forwarded-tcpip channel to the client, which connects it to a
/// listener on the agent's side; recorded as `ssh.forward` with direction `remote`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forward_grant_relays_r_and_records_it() {
    let mut f = Fixture::start(Opts { forward: true, ..Opts::shell() }).await;
    let local = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let lport = local.local_addr().unwrap().port();
    let served = tokio::spawn(async move {
        let (mut s, _) = local.accept().await.unwrap();
        let mut got = [0u8; 5];
        s.read_exact(&mut got).await.unwrap();
        s.write_all(b"agent side got ").await.unwrap();
        s.write_all(&got).await.unwrap();
        s.shutdown().await.unwrap();
    });
    let rport = free_port();
    let mut c = f.ssh();
    c.args(["-N", "-o", "ExitOnForwardFailure=yes", "-R", &format!("{rport}:127.0.0.1:{lport}")])
        .arg("agent@127.0.0.1")
        .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    // Polls for the upstream's listener (ssh prints nothing when it is up).
    let mut stream = tokio::time::timeout(DEADLINE, async {
        loop {
            if let Ok(s) = TcpStream::connect(("127.0.0.1", rport)).await {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the upstream never listened for -R");
    stream.write_all(b"hello").await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(DEADLINE, stream.read_to_end(&mut buf)).await.unwrap().unwrap();
    assert_eq!(String::from_utf8_lossy(&buf), "agent side got hello");
    served.await.unwrap();
    child.start_kill().unwrap();
    let _ = child.wait().await;
    f.next_end().await;
    let fw = f.events("ssh.forward").await;
    assert_eq!(fw.len(), 1, "{:?}", f.records().await);
    assert_eq!(fw[0]["direction"], "remote");
    assert_eq!(fw[0]["to_port"], rport);
    assert!(fw[0]["from"].as_str().unwrap().starts_with("127.0.0.1:"), "{fw:?}");
    assert_eq!((fw[0]["bytes_up"].as_u64(), fw[0]["bytes_down"].as_u64()), (Some(20), Some(5)), "{fw:?}");
    assert!(f.events("ssh.refused").await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sftp_and_scp_need_an_sftp_grant() {
    let mut f = Fixture::start(Opts::shell()).await;
    let files = tempfile::tempdir().unwrap();
    let src = files.path().join("src.txt");
    std::fs::write(&src, "payload\n").unwrap();
    let dst = files.path().join("dst.txt");
    let batch = files.path().join("batch");
    std::fs::write(&batch, format!("put {} {}\n", src.display(), dst.display())).unwrap();
    let sftp = |f: &Fixture| {
        let mut c = tokio::process::Command::new("sftp");
        c.args([
            "-F",
            "/dev/null",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "GlobalKnownHostsFile=/dev/null",
        ])
        .arg("-o")
        .arg(format!("UserKnownHostsFile={}", f.known_hosts.display()))
        .args(["-o", "BatchMode=yes", "-o", "IdentityAgent=none", "-P", &f.addr.port().to_string(), "-b"])
        .arg(&batch)
        .arg("agent@127.0.0.1")
        .stdin(Stdio::null())
        .kill_on_drop(true);
        c
    };
    let out = tokio::time::timeout(DEADLINE, sftp(&f).output()).await.unwrap().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("sftp is not granted"), "{out:?}");
    f.next_end().await;
    // Legacy scp (-O) is an exec of `scp -t`: a transfer too.
    let mut scp = tokio::process::Command::new("scp");
    scp.args([
        "-O",
        "-F",
        "/dev/null",
        "-o",
        "StrictHostKeyChecking=yes",
        "-o",
        "GlobalKnownHostsFile=/dev/null",
    ])
    .arg("-o")
    .arg(format!("UserKnownHostsFile={}", f.known_hosts.display()))
    .args(["-o", "BatchMode=yes", "-P", &f.addr.port().to_string()])
    .arg(&src)
    .arg(format!("agent@127.0.0.1:{}", dst.display()))
    .stdin(Stdio::null());
    let out = tokio::time::timeout(DEADLINE, scp.output()).await.unwrap().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("file transfer"), "{out:?}");
    f.next_end().await;
    assert!(!dst.exists());
    let refused = f.events("ssh.refused").await;
    assert_eq!(refused[0]["request"], "subsystem");
    assert_eq!(refused[0]["detail"], "sftp");
    let execs = f.events("ssh.exec").await;
    assert_eq!(execs[0]["decision"], "refused");
    assert!(execs[0]["command"].as_str().unwrap().starts_with("scp -t"));
    drop(f);

    // With sftp granted the subsystem is relayed and recorded, file by file.
    let mut f = Fixture::start(Opts { sftp: true, ..Opts::shell() }).await;
    let moved = files.path().join("moved.txt");
    std::fs::write(
        &batch,
        format!(
            "put {src} {dst}\nget {dst} {back}\nrename {dst} {moved}\nmkdir {dir}\nrm {moved}\n-rm {gone}\n",
            src = src.display(),
            dst = dst.display(),
            back = files.path().join("back.txt").display(),
            moved = moved.display(),
            dir = files.path().join("newdir").display(),
            gone = files.path().join("never-there").display(),
        ),
    )
    .unwrap();
    let out = tokio::time::timeout(DEADLINE, sftp(&f).output()).await.unwrap().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(std::fs::read_to_string(files.path().join("back.txt")).unwrap(), "payload\n");
    assert!(!moved.exists() && files.path().join("newdir").is_dir());
    f.next_end().await;
    let sub = f.events("ssh.subsystem").await;
    assert_eq!(sub.len(), 1, "{sub:?}");
    assert_eq!(sub[0]["name"], "sftp");
    assert!(sub[0]["bytes_up"].as_u64().unwrap() > 8);
    assert_eq!((sub[0]["sftp_unparsed"].as_u64(), sub[0]["sftp_lost"].as_bool()), (Some(0), Some(false)));
    let ops = f.events("ssh.sftp").await;
    let summary: Vec<(String, String, u64, u64, String)> = ops
        .iter()
        .map(|o| {
            (
                o["op"].as_str().unwrap().to_owned(),
                o["path"].as_str().unwrap().replace(&files.path().display().to_string(), ""),
                o["bytes_read"].as_u64().unwrap(),
                o["bytes_written"].as_u64().unwrap(),
                o["status"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let s = |op: &str, path: &str, r: u64, w: u64, status: &str| {
        (op.to_owned(), path.to_owned(), r, w, status.to_owned())
    };
    assert_eq!(
        summary,
        [
            s("file", "/dst.txt", 0, 8, "ok"),
            s("file", "/dst.txt", 8, 0, "ok"),
            s("rename", "/dst.txt", 0, 0, "ok"),
            s("mkdir", "/newdir", 0, 0, "ok"),
            s("remove", "/moved.txt", 0, 0, "ok"),
            s("remove", "/never-there", 0, 0, "no such file: No such file"),
        ],
        "{ops:?}"
    );
    assert_eq!(ops[0]["mode"], "write,create,truncate");
    assert_eq!(ops[1]["mode"], "read");
    assert_eq!(ops[2]["to"], moved.display().to_string());

    // scp in OpenSSH >= 9 is sftp too: recorded the same way.
    let copy = files.path().join("copy.txt");
    let mut scp = tokio::process::Command::new("scp");
    scp.args(["-F", "/dev/null", "-o", "StrictHostKeyChecking=yes", "-o", "GlobalKnownHostsFile=/dev/null"])
        .arg("-o")
        .arg(format!("UserKnownHostsFile={}", f.known_hosts.display()))
        .args(["-o", "BatchMode=yes", "-P", &f.addr.port().to_string()])
        .arg(&src)
        .arg(format!("agent@127.0.0.1:{}", copy.display()))
        .stdin(Stdio::null());
    let out = tokio::time::timeout(DEADLINE, scp.output()).await.unwrap().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(std::fs::read_to_string(&copy).unwrap(), "payload\n");
    f.next_end().await;
    let ops = f.events("ssh.sftp").await;
    let last = ops.last().unwrap();
    assert_eq!((last["op"].as_str(), last["path"].as_str()), (Some("file"), copy.to_str()), "{ops:?}");
    assert_eq!((last["bytes_written"].as_u64(), last["status"].as_str()), (Some(8), Some("ok")));
}

#[test]
fn warden_ca_ssh_prints_the_known_hosts_line() {
    let root = tempfile::tempdir().unwrap();
    let config = root.path().join("warden.toml");
    std::fs::write(&config, format!("[agent]\nstate_dir = \"{}\"\n", root.path().display())).unwrap();
    let (code, out, err) = Fixture::warden(&["ca", "ssh", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), warden::protocol::ssh::ca::known_hosts_line(root.path()).unwrap());
    assert!(out.starts_with("@cert-authority * ssh-ed25519 AAAA"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_killed_by_a_signal_is_recorded_with_it() {
    let mut f = Fixture::start(Opts::shell()).await;
    let (code, _, err) = f.exec(&[], "kill -TERM $$").await;
    assert_ne!(code, 0, "{err}");
    f.next_end().await;
    let execs = f.events("ssh.exec").await;
    assert_eq!(execs[0]["exit_signal"], "TERM", "{execs:?}");
}

/// The line OpenSSH logs at debug level 1 for the cipher negotiated in one direction
/// (`kex: client->server cipher: aes128-gcm@openssh.com MAC: <implicit> compression: none`).
fn negotiated(log: &str, direction: &str) -> Option<String> {
    let line = log.lines().find(|l| l.contains(&format!("kex: {direction} cipher: ")))?;
    line.split("cipher: ").nth(1)?.split_whitespace().next().map(str::to_owned)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_legs_negotiate_aes_gcm_where_the_cpu_has_it_and_other_clients_fall_back() {
    let mut f = Fixture::start(Opts { sshd_debug: true, ..Opts::exec(&["echo *"]) }).await;
    let aes = warden::protocol::ssh::algorithms::aes_in_hardware();
    let want = if aes { "aes128-gcm@openssh.com" } else { "chacha20-poly1305@openssh.com" };
    // The agent leg: OpenSSH's default order, as the client prints it.
    let (code, out, err) = f.exec(&["-v"], "echo agent leg").await;
    assert_eq!((code, out.as_str()), (0, "agent leg\n"), "{err}");
    assert_eq!(negotiated(&err, "client->server").as_deref(), Some(want), "{err}");
    assert_eq!(negotiated(&err, "server->client").as_deref(), Some(want), "{err}");
    f.next_end().await;
    // The upstream leg: Warden is the client, sshd logs what it chose.
    let log = f.sshd.log.lock().unwrap().join("\n");
    assert_eq!(negotiated(&log, "client->server").as_deref(), Some(want), "{log}");
    assert_eq!(negotiated(&log, "server->client").as_deref(), Some(want), "{log}");
    // OpenSSH is offered AES-GCM alone (it would pick chacha20-poly1305 or CTR out of more), so one
    // restricted to CTR is refused before anything is decided.
    if aes {
        let (code, _, err) = f.exec(&["-c", "aes256-ctr"], "echo ctr").await;
        assert_ne!(code, 0, "{err}");
        assert!(err.contains("no matching cipher"), "{err}");
    }
    // A weak cipher is refused.
    let (code, _, err) = f.exec(&["-c", "aes128-cbc"], "echo cbc").await;
    assert_ne!(code, 0, "{err}");
    assert!(err.contains("no matching cipher"), "{err}");
    // Another client (by its version line) is offered the whole allow-list: chacha20-poly1305 and CTR too.
    let other = server_ciphers(f.addr, "SSH-2.0-paramiko_3.4.0").await;
    for c in ["aes128-gcm@openssh.com", "chacha20-poly1305@openssh.com", "aes128-ctr"] {
        assert!(other.contains(&c.to_owned()), "{other:?}");
    }
    assert!(!other.iter().any(|c| c.contains("cbc") || c == "none"), "{other:?}");
    let openssh = server_ciphers(f.addr, "SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u10").await;
    if aes {
        assert_eq!(openssh, ["aes128-gcm@openssh.com", "aes256-gcm@openssh.com"]);
    } else {
        assert_eq!(openssh, other);
    }
}

/// The client-to-server ciphers Warden's server offers a client with this version line: its version
/// line and KEXINIT (sent in the clear) read off a raw connection.
async fn server_ciphers(addr: SocketAddr, version: &str) -> Vec<String> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("{version}\r\n").as_bytes()).await.unwrap();
    let mut r = BufReader::new(s);
    let mut line = String::new();
    tokio::time::timeout(DEADLINE, r.read_line(&mut line)).await.unwrap().unwrap();
    assert!(line.starts_with("SSH-2.0-warden"), "{line}");
    let len = tokio::time::timeout(DEADLINE, r.read_u32()).await.unwrap().unwrap() as usize;
    let mut packet = vec![0; len];
    r.read_exact(&mut packet).await.unwrap();
    // padding length, SSH_MSG_KEXINIT, 16 bytes of cookie, then name-lists: kex, host key, ciphers.
    assert_eq!(packet[1], 20);
    let mut at = 18;
    let mut list = || {
        let n = u32::from_be_bytes(packet[at..at + 4].try_into().unwrap()) as usize;
        let names = String::from_utf8(packet[at + 4..at + 4 + n].to_vec()).unwrap();
        at += 4 + n;
        names
    };
    let (_kex, _host_keys, ciphers) = (list(), list(), list());
    ciphers.split(',').map(str::to_owned).collect()
}
