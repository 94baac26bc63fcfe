//! The privileged test harness: a real `warden run` with its own bpffs pins, cgroups, control socket,
//! audit directory and proxy port; a real OpenID provider (npm `oidc-provider`); loopback servers; and
//! probes run inside tagged cgroups. Everything a test creates is removed when its guard drops, even
//! when the test fails.

#![allow(dead_code, reason = "each test file uses a different part of the harness")]
#![expect(clippy::unnecessary_debug_formatting, reason = "paths go into TOML as quoted strings")]

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use warden_test_support::{IdentityToml, WardenToml};

pub const WARDEN: &str = env!("CARGO_BIN_EXE_warden");

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("repo root").to_path_buf()
}

/// True when this test can run here; otherwise it fails, saying why, unless `WARDEN_ALLOW_SKIP=1` is set
/// (then it returns false and the test returns early). See `warden_test_support::require`.
pub fn can_run(test: &str, needs: &[(&str, bool)]) -> bool {
    warden_test_support::require(test, needs)
}

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// The standard preconditions of a privileged test.
pub fn privileged(test: &str) -> bool {
    can_run(
        test,
        &[
            ("needs root (BPF, cgroups)", is_root()),
            ("needs the test OpenID provider (run scripts/setup.sh)", Idp::available()),
        ],
    )
}

/// The cgroup2 mount.
pub fn cgroup_root() -> PathBuf {
    warden_test_support::cgroup_root().expect("cgroup2 is mounted")
}

/// Waits for `f` to give a value, up to `deadline`.
pub fn wait_for<T>(what: &str, deadline: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + deadline;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < end, "timed out after {deadline:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A free TCP port on loopback (both families are then bound by the daemon).
pub fn free_port() -> u16 {
    loop {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = l.local_addr().expect("addr").port();
        drop(l);
        if TcpListener::bind(("::1", port)).is_ok() {
            return port;
        }
    }
}

/// The real OpenID provider, shaped like an Okta custom authorization server.
pub struct Idp {
    child: Child,
    pub issuer: String,
    pub port: u16,
    pub keys: tempfile::TempDir,
}

impl Idp {
    pub fn available() -> bool {
        repo().join("tests/idp/node_modules/oidc-provider").exists()
            && Command::new("node").arg("--version").output().is_ok_and(|o| o.status.success())
    }

    pub fn start() -> Self {
        let keys = tempfile::tempdir().expect("tempdir");
        let mut child = Command::new("node")
            .arg(repo().join("tests/idp/server.js"))
            .arg("--keys-dir")
            .arg(keys.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start node");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.starts_with("warden-test-idp ready") {
                    let _ = tx.send(line);
                }
            }
        });
        let line =
            rx.recv_timeout(Duration::from_secs(30)).expect("the test IdP did not become ready in 30s");
        let field =
            |k: &str| line.split_whitespace().find_map(|w| w.strip_prefix(k)).expect("ready line").to_owned();
        let issuer = field("issuer=");
        let port = field("port=").parse().expect("port");
        Self { child, issuer, port, keys }
    }

    pub fn key_file(&self, client: &str) -> PathBuf {
        self.keys.path().join(format!("{client}.pem"))
    }

    pub fn secret_file(&self, client: &str) -> PathBuf {
        self.keys.path().join(format!("{client}.secret"))
    }

    pub fn admin(&self, path: &str) {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).expect("idp admin");
        write!(
            s,
            "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        assert!(out.starts_with("HTTP/1.1 200"), "idp admin {path}: {out}");
    }

    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Idp {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One identity in the daemon's config.
pub struct IdentitySpec {
    pub name: String,
    pub client_id: String,
    /// `private_key_file = ...` or `client_secret_file = ...` plus anything else.
    pub auth: String,
    pub audience: String,
    pub groups: Vec<String>,
}

impl IdentitySpec {
    /// An identity using the provider's RS256 private_key_jwt client (groups: agents-research).
    pub fn pkjwt(idp: &Idp, name: &str) -> Self {
        Self {
            name: name.into(),
            client_id: "agent-pkjwt-rs".into(),
            auth: format!("private_key_file = {:?}", idp.key_file("agent-pkjwt-rs")),
            audience: "api://warden".into(),
            groups: vec![],
        }
    }

    pub fn secret(idp: &Idp, name: &str, client: &str) -> Self {
        Self {
            name: name.into(),
            client_id: client.into(),
            auth: format!("client_secret_file = {:?}", idp.secret_file(client)),
            audience: "api://warden".into(),
            groups: vec![],
        }
    }
}

/// A running (or stopped) `warden run` with everything of its own.
pub struct Warden {
    pub name: String,
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub bpffs: PathBuf,
    pub proxy_port: u16,
    pub cgroup_parent: PathBuf,
    audit_dir: PathBuf,
    child: Option<Child>,
    log: PathBuf,
    /// A command `warden run` is started under (e.g. `setpriv ...`), empty for none.
    wrapper: Vec<String>,
}

pub struct WardenBuilder {
    name: String,
    policy: String,
    allow: Vec<String>,
    identities: Vec<(IdentitySpec, String)>,
    extra: String,
    agent_extra: String,
    wrapper: Vec<String>,
    audit_dir: Option<PathBuf>,
    audit_extra: Vec<String>,
}

impl Warden {
    pub fn builder(name: &str) -> WardenBuilder {
        WardenBuilder {
            name: name.into(),
            policy: String::new(),
            allow: vec![],
            identities: vec![],
            extra: String::new(),
            agent_extra: String::new(),
            wrapper: vec![],
            audit_dir: None,
            audit_extra: vec![],
        }
    }
}

impl WardenBuilder {
    pub fn policy(mut self, yaml: &str) -> Self {
        self.policy = yaml.into();
        self
    }

    pub fn allow(mut self, entry: &str) -> Self {
        self.allow.push(entry.into());
        self
    }

    pub fn identity(mut self, spec: IdentitySpec, issuer: &str) -> Self {
        self.identities.push((spec, issuer.into()));
        self
    }

    /// Lines added to the `[agent]` section (e.g. `log_format = "json"`).
    pub fn agent_extra(mut self, toml: &str) -> Self {
        self.agent_extra.push_str(toml);
        self
    }

    pub fn config_extra(mut self, toml: &str) -> Self {
        self.extra.push_str(toml);
        self
    }

    /// The audit directory (default `<test dir>/state/audit`), e.g. on a small file system of the test's.
    pub fn audit_dir(mut self, dir: &Path) -> Self {
        self.audit_dir = Some(dir.to_path_buf());
        self
    }

    /// A `key = value` line added to `[audit]` (e.g. `max_file_bytes = 4096`).
    pub fn audit_extra(mut self, line: &str) -> Self {
        self.audit_extra.push(line.into());
        self
    }

    /// Starts `warden run` as the last arguments of this command (e.g. `setpriv --bounding-set ... --`).
    pub fn wrapper(mut self, argv: &[&str]) -> Self {
        self.wrapper = argv.iter().map(ToString::to_string).collect();
        self
    }

    /// Writes the config and policy and starts the daemon.
    pub fn start(self) -> Warden {
        let dir =
            tempfile::Builder::new().prefix(&format!("warden-{}-", self.name)).tempdir().expect("tempdir");
        let port = free_port();
        let bpffs = PathBuf::from(format!("/sys/fs/bpf/warden-test-{}-{}", self.name, std::process::id()));
        let cgroup_parent_rel = format!("warden-test/{}-{}", self.name, std::process::id());
        let cgroup_parent = cgroup_root().join(&cgroup_parent_rel);
        std::fs::create_dir_all(&cgroup_parent).expect("cgroup parent");
        std::fs::create_dir_all(dir.path().join("policies")).unwrap();
        std::fs::write(dir.path().join("policies/policy.yaml"), &self.policy).unwrap();
        let mut toml = WardenToml::in_dir(
            dir.path(),
            dir.path().join("policies"),
            bpffs.clone(),
            &format!("{cgroup_parent_rel}/exec"),
            port,
        );
        toml.allow.clone_from(&self.allow);
        toml.agent_extra.clone_from(&self.agent_extra);
        toml.host = format!("test-{}", self.name);
        toml.audit_extra.push("checkpoint_seconds = 1".into());
        toml.audit_extra.extend(self.audit_extra.iter().cloned());
        if let Some(d) = &self.audit_dir {
            toml.audit_dir.clone_from(d);
        }
        let audit_dir = toml.audit_dir.clone();
        toml.identities = self
            .identities
            .iter()
            .map(|(id, issuer)| IdentityToml {
                name: id.name.clone(),
                issuer: issuer.clone(),
                client_id: id.client_id.clone(),
                auth: id.auth.clone(),
                audience: id.audience.clone(),
                groups: id.groups.clone(),
            })
            .collect();
        toml.extra.clone_from(&self.extra);
        let config = toml.render();
        let config_path = dir.path().join("warden.toml");
        std::fs::write(&config_path, config).unwrap();
        let log = dir.path().join("daemon.log");
        let mut w = Warden {
            name: self.name,
            config: config_path,
            bpffs,
            proxy_port: port,
            cgroup_parent,
            audit_dir,
            child: None,
            log,
            dir,
            wrapper: self.wrapper,
        };
        w.spawn();
        w
    }
}

impl Warden {
    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).expect("log");
        let mut cmd = match self.wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(WARDEN);
                c
            }
            None => Command::new(WARDEN),
        };
        let child = cmd
            .args(["run", "--config"])
            .arg(&self.config)
            .env("WARDEN_LOG", "info,warden=debug")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn warden");
        self.child = Some(child);
        let sock = self.dir.path().join("control.sock");
        wait_for("the daemon's control socket", Duration::from_secs(30), || {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                panic!("warden exited early ({status}):\n{}", self.log());
            }
            let ok = std::os::unix::net::UnixStream::connect(&sock).is_ok();
            ok.then_some(())
        });
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL, no cleanup: what a crash looks like.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(i32::try_from(c.id()).expect("pid")),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(15);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Runs a `warden` CLI command against this daemon's config.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(WARDEN).args(args).arg("--config").arg(&self.config).output().expect("run warden cli")
    }

    /// `warden exec --config CONFIG ARGS...`.
    pub fn cli_exec(&self, args: &[&str]) -> Output {
        Command::new(WARDEN)
            .arg("exec")
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .output()
            .expect("run warden exec")
    }

    pub fn policy_path(&self) -> PathBuf {
        self.dir.path().join("policies/policy.yaml")
    }

    pub fn audit_dir(&self) -> PathBuf {
        self.audit_dir.clone()
    }

    /// Every audit record so far, in order.
    pub fn records(&self) -> Vec<Value> {
        warden_test_support::audit_records(&self.audit_dir())
    }

    /// Waits for a record matching `pred`.
    pub fn wait_record(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        wait_for(what, Duration::from_secs(20), || self.records().into_iter().find(|r| pred(r)))
    }

    /// A fresh cgroup under this test's parent; removed on drop.
    pub fn cgroup(&self, name: &str) -> TestCgroup {
        let path = self.cgroup_parent.join(name);
        std::fs::create_dir_all(&path).expect("create cgroup");
        TestCgroup { path, root: cgroup_root(), owned: true }
    }

    /// `warden tag` for a test cgroup.
    pub fn tag(&self, cg: &TestCgroup, identity: &str) {
        let out = self.cli(&["tag", cg.path.to_str().unwrap(), "--identity", identity]);
        assert!(out.status.success(), "warden tag: {}", String::from_utf8_lossy(&out.stderr));
    }
}

impl Drop for Warden {
    fn drop(&mut self) {
        self.stop();
        let out = self.cli(&["uninstall"]);
        if !out.status.success() {
            eprintln!("warden uninstall: {}", String::from_utf8_lossy(&out.stderr));
        }
        let _ = kill_tree(&self.cgroup_parent);
        // The shared parent goes when the last test leaves it.
        if let Some(parent) = self.cgroup_parent.parent() {
            let _ = std::fs::remove_dir(parent);
        }
        if std::thread::panicking() {
            eprintln!("---- daemon log of {} ----\n{}", self.name, self.log());
        }
    }
}

/// Kills every process in a cgroup tree and removes it.
pub fn kill_tree(path: &Path) -> std::io::Result<()> {
    warden_test_support::remove_cgroup_tree(path)
}

/// A cgroup a test made; killed and removed on drop.
pub struct TestCgroup {
    pub path: PathBuf,
    root: PathBuf,
    owned: bool,
}

impl TestCgroup {
    /// A second handle on a cgroup another guard owns (for background probes); it removes nothing.
    pub fn adopt(path: PathBuf) -> Self {
        Self { path, root: cgroup_root(), owned: false }
    }

    /// `/a/b`, as the audit record names it.
    pub fn rel(&self) -> String {
        format!("/{}", self.path.strip_prefix(&self.root).unwrap().display())
    }

    /// Runs a command inside this cgroup (the shell moves itself in, then execs).
    pub fn command(&self, program: &str, args: &[&str]) -> Command {
        let mut c = Command::new("sh");
        c.arg("-c")
            .arg("echo $$ > \"$0\"/cgroup.procs && exec \"$@\"")
            .arg(&self.path)
            .arg(program)
            .args(args);
        c
    }

    /// Runs a command inside this cgroup as `nobody`: the shell joins as root, then drops (no PAM, no
    /// new session), as `warden exec --user` leaves an agent.
    pub fn command_as_nobody(&self, program: &str, args: &[&str]) -> Command {
        let mut c = Command::new("sh");
        c.arg("-c")
            .arg(
                "echo $$ > \"$0\"/cgroup.procs && exec setpriv --reuid=65534 --regid=65534 --clear-groups -- \"$@\"",
            )
            .arg(&self.path)
            .arg(program)
            .args(args)
            .current_dir("/");
        c
    }

    /// Runs the probe inside this cgroup as `nobody` and parses its JSON answer.
    pub fn probe_as_nobody(&self, args: &[&str]) -> Value {
        let script = repo().join("tests/privileged/probe.py");
        let mut all = vec![script.to_str().unwrap()];
        all.extend_from_slice(args);
        let out = self.command_as_nobody("/usr/bin/python3", &all).output().expect("run probe");
        parse_probe(&out)
    }

    /// Runs the probe inside this cgroup and parses its JSON answer.
    pub fn probe(&self, args: &[&str]) -> Value {
        let script = repo().join("tests/privileged/probe.py");
        let mut all = vec![script.to_str().unwrap()];
        all.extend_from_slice(args);
        let out = self.command("python3", &all).output().expect("run probe");
        parse_probe(&out)
    }
}

/// Runs the io_uring connect probe (agent/examples/uring_connect.rs) inside a cgroup.
pub fn uring_probe(cg: &TestCgroup, ip: &str, port: u16) -> Value {
    let exe = std::env::current_exe().expect("test exe");
    let bin = exe.parent().and_then(Path::parent).expect("target dir").join("examples/uring_connect");
    assert!(bin.exists(), "{} is built by `cargo test` (an example of the warden package)", bin.display());
    let out = cg.command(bin.to_str().unwrap(), &[ip, &port.to_string()]).output().expect("run uring probe");
    parse_probe(&out)
}

/// The probe script's path.
pub fn probe_script() -> PathBuf {
    repo().join("tests/privileged/probe.py")
}

/// Runs the probe outside any tagged cgroup.
pub fn probe_untagged(args: &[&str]) -> Value {
    let script = repo().join("tests/privileged/probe.py");
    let out = Command::new("python3").arg(script).args(args).output().expect("run probe");
    parse_probe(&out)
}

pub fn parse_probe(out: &Output) -> Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.lines().last().unwrap_or("")).unwrap_or_else(|_| {
        panic!("probe printed no JSON: stdout={stdout} stderr={}", String::from_utf8_lossy(&out.stderr))
    })
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        if !self.owned {
            return;
        }
        let _ = kill_tree(&self.path);
    }
}

/// A loopback TCP server that greets each client with `hello <name>` and then echoes; counts clients.
pub struct Server {
    pub addr: SocketAddr,
    pub accepted: Arc<Mutex<Vec<SocketAddr>>>,
    stop: Arc<AtomicBool>,
}

impl Server {
    pub fn start(ip: &str, name: &str) -> Self {
        let listener = TcpListener::bind((ip, 0)).expect("bind test server");
        let addr = listener.local_addr().unwrap();
        listener.set_nonblocking(true).unwrap();
        let accepted = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (acc, st, greeting) = (accepted.clone(), stop.clone(), format!("hello {name}\n"));
        std::thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut s, peer)) => {
                        acc.lock().unwrap().push(peer);
                        let g = greeting.clone();
                        std::thread::spawn(move || {
                            let _ = s.set_nonblocking(false);
                            let _ = s.write_all(g.as_bytes());
                            let mut buf = [0u8; 16384];
                            while let Ok(n) = s.read(&mut buf) {
                                if n == 0 || s.write_all(&buf[..n]).is_err() {
                                    break;
                                }
                            }
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Self { addr, accepted, stop }
    }

    pub fn clients(&self) -> usize {
        self.accepted.lock().unwrap().len()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A policy with one opaque TCP target reachable by the provider's agents-research group.
pub fn tcp_policy(target: &str, addr: SocketAddr, ttl: &str) -> String {
    format!(
        "targets:\n  {target}:\n    protocol: tcp\n    address: \"{addr}\"\nrules:\n  - name: research reaches {target}\n    match: {{ groups: [agents-research] }}\n    grant:\n      - target: {target}\n        access: connect\n        ttl: {ttl}\n"
    )
}
