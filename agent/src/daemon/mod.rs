//! `warden run` and `warden check`: validates everything, installs (or adopts) the kernel programs,
//! fills their maps from config and policy, starts the audit writer, the proxy listeners, the kernel
//! event reader and the control socket, and keeps the kernel's view in step with bindings and policy.

mod bindings;
mod gate;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use warden_common::event;

use crate::audit::{Audit, Record};
use crate::bpf::{self, Kernel};
use crate::cli::{EXIT_FAILED, EXIT_INTERNAL, EXIT_INVALID, EXIT_NOPERM, fail};
use crate::config::{AllowEntry, Config};
use crate::control::{self, Refused, Request};
use crate::policy::{self, Policy};
use crate::proxy::{Proxy, Sessions};
pub use bindings::{Binding, Bindings};

/// Sessions beyond this are refused (and recorded) rather than queued.
const MAX_SESSIONS: usize = 16_384;
/// How often target host names are re-resolved.
const RESOLVE_EVERY: Duration = Duration::from_secs(30);

/// RFC 3339 UTC with nanoseconds, as in the audit record.
pub fn rfc3339(t: SystemTime) -> String {
    crate::audit::format_ts(time::OffsetDateTime::from(t))
}

pub fn check_cli(config: &Path) -> u8 {
    let config = match Config::load(config) {
        Ok(c) => c,
        Err(e) => return fail(EXIT_INVALID, &e),
    };
    let files = match config.policy_files() {
        Ok(f) => f,
        Err(e) => return fail(EXIT_INVALID, &format!("{}: {e}", config.agent.policies.display())),
    };
    match policy::load(&files) {
        Ok(p) => {
            println!(
                "{}: ok ({} policy files, {} targets, {} rules)",
                config.path.display(),
                files.len(),
                p.targets().count(),
                p.rules().len()
            );
            0
        }
        Err(diags) => {
            for d in &diags {
                eprintln!("{d}");
            }
            EXIT_INVALID
        }
    }
}

/// `warden uninstall`: stops a running daemon, releases the proxy's reserved ports, then detaches and unpins
/// every kernel program and map: the one command that lifts enforcement.
pub fn uninstall_cli(config: &Path) -> u8 {
    let config = match Config::load(config) {
        Ok(c) => c,
        Err(e) => return crate::cli::fail(crate::cli::EXIT_INVALID, &e),
    };
    // A running daemon would keep enforcing through the descriptors it holds: stop it first.
    crate::control::stop_daemon(&config.agent.control_socket);
    let ports: Vec<u16> = config.proxy_listen().iter().map(SocketAddr::port).collect();
    if let Err(e) = reserved_ports::release(&ports) {
        eprintln!("warden: could not release the proxy's reserved ports in {}: {e}", reserved_ports::PATH);
    }
    match bpf::uninstall(&config.agent.bpffs_dir) {
        Ok(removed) => {
            println!(
                "warden: removed {} pinned links and maps under {}",
                removed.len(),
                config.agent.bpffs_dir.display()
            );
            0
        }
        Err(e) => crate::cli::fail(crate::cli::EXIT_FAILED, &e),
    }
}

pub fn run_cli(config_path: &Path) -> u8 {
    let config = match Config::load(config_path) {
        Ok(c) => c,
        Err(e) => return fail(EXIT_INVALID, &e),
    };
    // Every policy error before anything is bound or attached.
    match config.policy_files().map(|f| policy::load(&f)) {
        Ok(Ok(_)) => {}
        Ok(Err(diags)) => {
            for d in &diags {
                eprintln!("{d}");
            }
            return EXIT_INVALID;
        }
        Err(e) => return fail(EXIT_INVALID, &format!("{}: {e}", config.agent.policies.display())),
    }
    if !nix::unistd::geteuid().is_root() {
        return fail(EXIT_NOPERM, &"warden run must run as root (it attaches kernel programs)");
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => return fail(EXIT_INTERNAL, &e),
    };
    match runtime.block_on(run(config)) {
        Ok(()) => 0,
        Err(e) => fail(EXIT_FAILED, &format!("{e:#}")),
    }
}

/// The daemon's shared state.
pub struct State {
    pub config: Config,
    pub cgroup_root: PathBuf,
    pub kernel: Arc<Kernel>,
    pub audit: Audit,
    pub bindings: Bindings,
    pub targets: Targets,
    pub sessions: Arc<Sessions>,
    pub policy: Arc<policy::Store>,
    pub identities: crate::identity::Identities,
    pub grants: crate::grants::Grants,
    /// The subject each identity was last verified as, to re-decide live grants when the policy changes.
    pub subjects: Mutex<HashMap<String, crate::policy::Subject>>,
    pub shutdown: CancellationToken,
}

/// Policy targets by the number the kernel knows them by.
#[derive(Debug, Default)]
pub struct Targets {
    inner: Mutex<TargetIds>,
}

#[derive(Debug, Default)]
struct TargetIds {
    by_name: HashMap<String, u32>,
    by_id: HashMap<u32, String>,
    next: u32,
}

impl Targets {
    fn id(&self, name: &str) -> u32 {
        let mut t = self.inner.lock().expect("targets lock");
        if let Some(id) = t.by_name.get(name) {
            return *id;
        }
        t.next += 1;
        let id = t.next;
        t.by_name.insert(name.to_owned(), id);
        t.by_id.insert(id, name.to_owned());
        id
    }

    pub fn name(&self, id: u32) -> Option<String> {
        self.inner.lock().expect("targets lock").by_id.get(&id).cloned()
    }
}

pub async fn run(config: Config) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let host = config.agent.host.clone().unwrap_or_else(|| {
        nix::unistd::gethostname().map(|h| h.to_string_lossy().into_owned()).unwrap_or_default()
    });
    let cgroup_root = crate::cgroup::root(&config.agent.cgroup_root)?;
    std::fs::create_dir_all(&config.agent.state_dir)?;
    tracing::info!(
        state_dir = %config.agent.state_dir.display(),
        bpffs_dir = %config.agent.bpffs_dir.display(),
        cgroup_root = %cgroup_root.display(),
        proxy_listen = ?config.proxy_listen(),
        policies = %config.agent.policies.display(),
        identities = ?config.identity.keys().collect::<Vec<_>>(),
        "starting warden"
    );

    let writer_stop = CancellationToken::new();
    let (audit, writer) = Audit::start(&config.audit, &config.agent.state_dir, host, writer_stop.clone())?;

    let kernel = Arc::new(bpf::install(&bpf::Settings {
        bpffs_dir: config.agent.bpffs_dir.clone(),
        cgroup_root: cgroup_root.clone(),
        state_dir: config.agent.state_dir.clone(),
    })?);
    tracing::info!(adopted = ?kernel.report.adopted, attached = ?kernel.report.attached, "kernel programs in place");
    for (name, why) in &kernel.report.unavailable {
        tracing::warn!(program = name, error = %why, "optional kernel program not attached: {}", bpf::without(name));
    }
    let unavailable: Vec<&str> = kernel.report.unavailable.iter().map(|(n, _)| *n).collect();
    let _ = audit.append(
        Record::new("bpf.installed")
            .field("adopted", &kernel.report.adopted)
            .field("attached", &kernel.report.attached)
            .field("unavailable", unavailable),
    );

    // Listeners first, so the proxy address the kernel rewrites to is served as soon as it is set.
    let mut listeners = Vec::new();
    for addr in config.proxy_listen() {
        let l = TcpListener::bind(addr)
            .await
            .map_err(|e| anyhow::anyhow!("binding proxy listener {addr}: {e}"))?;
        listeners.push(l);
    }
    kernel.set_proxy(&config.proxy_listen())?;
    // The kernel must never hand the proxy's port to anyone else as an ephemeral port: a tagged process
    // could otherwise listen() on it while the daemon is down (autobind runs no bind hook), receive other
    // processes' redirected connections and keep the daemon from coming back.
    let proxy_ports: Vec<u16> = config.proxy_listen().iter().map(SocketAddr::port).collect();
    if let Err(e) = reserved_ports::reserve(&proxy_ports) {
        tracing::warn!(error = %e, path = reserved_ports::PATH, "could not reserve the proxy's ports; while the daemon is down a tagged process could be handed them by listen() without bind");
    }
    kernel.sync_allow(&allow_list(&config.allow_entries()))?;

    let policy = Arc::new(policy::Store::open(&config, audit.clone()).map_err(|d| {
        anyhow::anyhow!("{}", d.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))
    })?);
    let identities = crate::identity::Identities::new(&identity_configs(&config), audit.clone())?;
    let duration = |d: &toml::Spanned<String>| crate::policy::parse_duration(d.get_ref()).unwrap_or_default();
    let grants = crate::grants::Grants::open_with(
        &config.agent.state_dir,
        audit.clone(),
        Arc::new(crate::grants::SystemClock),
        crate::grants::GrantsOptions {
            approval_wait: duration(&config.grants.approval_wait),
            pending_max: duration(&config.grants.pending_max),
        },
    )?;
    let bindings = Bindings::open(&config.agent.state_dir)?;
    let state = Arc::new(State {
        cgroup_root: cgroup_root.clone(),
        kernel: kernel.clone(),
        audit: audit.clone(),
        bindings,
        targets: Targets::default(),
        sessions: Arc::new(Sessions::default()),
        policy: policy.clone(),
        identities,
        grants,
        subjects: Mutex::new(HashMap::new()),
        shutdown: shutdown.clone(),
        config,
    });
    state.apply_static_bindings();
    state.sync_targets(&policy.current()).await;

    let proxy = Arc::new(Proxy {
        kernel: kernel.clone(),
        cgroup_root,
        audit: audit.clone(),
        sessions: state.sessions.clone(),
        gate: Arc::new(gate::DaemonGate { state: state.clone() }),
        audit_failed: audit.failed(),
        shutdown: shutdown.clone(),
        limit: Arc::new(Semaphore::new(MAX_SESSIONS)),
    });
    let mut tasks = tokio::task::JoinSet::new();
    for l in listeners {
        tasks.spawn(proxy.clone().serve(l));
    }
    if let Some(reader) = kernel.take_events() {
        tasks.spawn(events(state.clone(), reader));
    }
    if let Some(forward) = kernel.take_log_forwarder(shutdown.clone()) {
        tasks.spawn(forward);
    }
    tasks.spawn(policy.clone().watch_files(shutdown.clone().cancelled_owned()));
    tasks.spawn(follow_policy(state.clone()));
    tasks.spawn(resolve_periodically(state.clone()));
    if !state.config.audit.serve.listen.is_empty() {
        let serve = state.config.audit.serve.clone();
        let dir = state.config.audit.dir.clone();
        let stop = shutdown.clone();
        tasks.spawn(async move {
            if let Err(e) = crate::audit::serve::run(&serve, dir, stop).await {
                tracing::error!(error = %e, "audit endpoint stopped");
            }
        });
    }
    {
        let socket = state.config.agent.control_socket.clone();
        let handler = state.clone();
        let stop = shutdown.clone();
        tasks.spawn(async move {
            if let Err(e) = control::serve(&socket, handler, stop).await {
                tracing::error!(error = %e, "control socket stopped");
            }
        });
    }
    sd_notify("READY=1");
    tracing::info!("warden is running");

    signals(&state).await;
    tracing::info!("stopping: sessions end, kernel programs stay attached (fail closed)");
    shutdown.cancel();
    // Give sessions a moment to write their end records, then stop the writer.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !state.sessions.is_empty() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ =
        tokio::time::timeout(Duration::from_secs(5), async { while tasks.join_next().await.is_some() {} })
            .await;
    writer_stop.cancel();
    let _ = writer.await;
    Ok(())
}

fn identity_configs(config: &Config) -> std::collections::BTreeMap<String, crate::config::IdentityConfig> {
    config.identity.iter().map(|(k, v)| (k.clone(), v.get_ref().clone())).collect()
}

/// Waits for SIGTERM/SIGINT (stop) or a `stop` request; SIGHUP reloads the policy.
async fn signals(state: &State) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) =
        (signal(SignalKind::terminate()), signal(SignalKind::interrupt()), signal(SignalKind::hangup()))
    else {
        state.shutdown.cancelled().await;
        return;
    };
    loop {
        tokio::select! {
            _ = term.recv() => return,
            _ = int.recv() => return,
            () = state.shutdown.cancelled() => return,
            _ = hup.recv() => {
                tracing::info!("SIGHUP: reloading policy");
                if let Err(diags) = state.policy.reload() {
                    for d in diags {
                        tracing::error!("{d}");
                    }
                }
            }
        }
    }
}

/// Tells systemd (Type=notify) we are ready, when run under it.
fn sd_notify(msg: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else { return };
    let Ok(sock) = std::os::unix::net::UnixDatagram::unbound() else { return };
    let path = path.to_string_lossy().into_owned();
    let _ = if let Some(abstract_name) = path.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt as _;
        std::os::unix::net::SocketAddr::from_abstract_name(abstract_name.as_bytes())
            .and_then(|a| sock.send_to_addr(msg.as_bytes(), &a))
    } else {
        sock.send_to(msg.as_bytes(), &path)
    };
}

/// The allow list in kernel terms; `dns` becomes the resolvers of /etc/resolv.conf on port 53.
fn allow_list(entries: &[AllowEntry]) -> Vec<(ipnet::IpNet, u16)> {
    let mut out = Vec::new();
    for e in entries {
        match e {
            AllowEntry::Net { net, port } => out.push((*net, *port)),
            AllowEntry::Dns => {
                let text = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
                for ns in text.lines().filter_map(|l| l.trim().strip_prefix("nameserver")) {
                    if let Ok(ip) =
                        ns.trim().split('%').next().unwrap_or_default().parse::<std::net::IpAddr>()
                    {
                        out.push((ipnet::IpNet::from(ip), 53));
                    }
                }
            }
        }
    }
    out
}

/// `net.ipv4.ip_local_reserved_ports` (IPv4 and IPv6): ports the kernel never picks as ephemeral ports.
pub mod reserved_ports {
    pub const PATH: &str = "/proc/sys/net/ipv4/ip_local_reserved_ports";

    /// The ports in a list such as `8080,9000-9010`.
    fn parse(text: &str) -> Vec<(u16, u16)> {
        text.trim()
            .split(',')
            .filter_map(|r| {
                let r = r.trim();
                let (a, b) = r.split_once('-').unwrap_or((r, r));
                Some((a.trim().parse().ok()?, b.trim().parse().ok()?))
            })
            .collect()
    }

    fn render(ranges: &[(u16, u16)]) -> String {
        let parts: Vec<String> =
            ranges.iter().map(|(a, b)| if a == b { a.to_string() } else { format!("{a}-{b}") }).collect();
        parts.join(",")
    }

    /// `ranges` with `ports` added (`add`) or removed (only where they stand alone, as `reserve` adds them).
    pub fn edit(text: &str, ports: &[u16], add: bool) -> String {
        let mut ranges = parse(text);
        for &p in ports {
            let covered = ranges.iter().any(|&(a, b)| (a..=b).contains(&p));
            if add && !covered {
                ranges.push((p, p));
            } else if !add {
                ranges.retain(|&r| r != (p, p));
            }
        }
        render(&ranges)
    }

    /// Read, edit, write back under an exclusive lock, so two wardens starting at once lose no port.
    fn update(ports: &[u16], add: bool) -> std::io::Result<()> {
        use std::io::{Read as _, Seek as _, Write as _};
        let file = std::fs::OpenOptions::new().read(true).write(true).open(PATH)?;
        let mut file = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| std::io::Error::from(e))?;
        let mut text = String::new();
        file.read_to_string(&mut text)?;
        file.rewind()?;
        // With the newline: an empty write leaves the list as it was, "\n" empties it.
        file.write_all(format!("{}\n", edit(&text, ports, add)).as_bytes())
    }

    pub fn reserve(ports: &[u16]) -> std::io::Result<()> {
        update(ports, true)
    }

    pub fn release(ports: &[u16]) -> std::io::Result<()> {
        update(ports, false)
    }
}

/// This host's interface addresses (IPv4-mapped addresses as IPv4).
fn host_addresses() -> Vec<std::net::IpAddr> {
    let Ok(ifaddrs) = nix::ifaddrs::getifaddrs() else { return Vec::new() };
    let mut out: Vec<std::net::IpAddr> = ifaddrs
        .filter_map(|i| {
            let a = i.address?;
            a.as_sockaddr_in()
                .map(|v4| std::net::IpAddr::V4(v4.ip()))
                .or_else(|| a.as_sockaddr_in6().map(|v6| std::net::IpAddr::V6(v6.ip()).to_canonical()))
        })
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// Targets plus guard entries for those that live on this host: a connect to any other address of this
/// host on that port would reach the same listener (when it is bound to a wildcard, or to the address a
/// connecting socket is bound to), so the kernel refuses those instead of letting the allow list pass them.
/// Real targets come last, so a guard never shadows a target.
fn with_guards(targets: Vec<(SocketAddr, u32)>, host: &[std::net::IpAddr]) -> Vec<(SocketAddr, u32)> {
    let mut out = Vec::new();
    for (addr, _) in &targets {
        let ip = addr.ip().to_canonical();
        if let std::net::IpAddr::V4(v4) = ip {
            // IPv6 spellings that a translator on the path (NAT64's well-known prefix, SIIT) or an old
            // stack (IPv4-compatible) turns back into this IPv4 address.
            let tail = v4.octets();
            let mut nat64 = [0u8; 16];
            nat64[..4].copy_from_slice(&[0, 0x64, 0xff, 0x9b]);
            nat64[12..].copy_from_slice(&tail);
            let mut siit = [0u8; 16];
            siit[8..10].copy_from_slice(&[0xff, 0xff]);
            siit[12..].copy_from_slice(&tail);
            let mut compat = [0u8; 16];
            compat[12..].copy_from_slice(&tail);
            for form in [nat64, siit, compat] {
                let v6 = std::net::Ipv6Addr::from(form);
                out.push((SocketAddr::new(v6.into(), addr.port()), warden_common::GUARD));
            }
        }
        if ip.is_loopback() || ip.is_unspecified() || host.contains(&ip) {
            let all_ones = std::net::Ipv6Addr::from([0xff; 16]);
            out.push((SocketAddr::new(all_ones.into(), addr.port()), warden_common::GUARD));
            out.extend(host.iter().map(|h| (SocketAddr::new(*h, addr.port()), warden_common::GUARD)));
        }
    }
    out.extend(targets);
    out
}

/// Keeps the kernel's target map and live sessions in step with each applied policy.
async fn follow_policy(state: Arc<State>) {
    let mut rx = state.policy.subscribe();
    loop {
        tokio::select! {
            () = state.shutdown.cancelled() => return,
            changed = rx.changed() => if changed.is_err() { return },
        }
        let policy = rx.borrow_and_update().clone();
        state.sync_targets(&policy).await;
        state.end_disallowed_sessions(&policy);
    }
}

async fn resolve_periodically(state: Arc<State>) {
    loop {
        tokio::select! {
            () = state.shutdown.cancelled() => return,
            () = tokio::time::sleep(RESOLVE_EVERY) => {}
        }
        let policy = state.policy.current();
        state.sync_targets(&policy).await;
    }
}

impl State {
    /// Resolves every target and makes the kernel's target map exactly those endpoints.
    async fn sync_targets(&self, policy: &Policy) {
        let mut entries: Vec<(SocketAddr, u32)> = Vec::new();
        for t in policy.targets() {
            let id = self.targets.id(&t.name);
            match tokio::net::lookup_host((t.host.as_str(), t.port)).await {
                Ok(addrs) => entries.extend(addrs.map(|a| (a, id))),
                Err(e) => {
                    tracing::warn!(target = %t.name, host = %t.host, error = %e, "cannot resolve target; it is unreachable until it resolves");
                }
            }
        }
        let entries = with_guards(entries, &host_addresses());
        if let Err(e) = self.kernel.sync_targets(&entries) {
            tracing::error!(error = %e, "updating the kernel target map failed");
        }
    }

    /// Ends what a newly applied policy no longer allows: grants it would not issue now (their sessions are
    /// cut through their leases) and sessions whose target is gone.
    fn end_disallowed_sessions(&self, policy: &Policy) {
        let subjects = self.subjects.lock().expect("subjects lock").clone();
        let ended = self.grants.revalidate(policy, |g| subjects.get(&g.identity).cloned());
        let n = self.sessions.kill_where(|s| policy.target(&s.target).is_none());
        if !ended.is_empty() || n > 0 {
            tracing::info!(grants = ended.len(), sessions = n, "ended what the new policy no longer allows");
        }
    }

    /// Re-applies bindings from the config (creating their cgroups) and every runtime binding to the
    /// kernel's tag map.
    fn apply_static_bindings(&self) {
        for b in &self.config.binding {
            let b = b.get_ref();
            let path = match crate::cgroup::resolve(&self.cgroup_root, &b.cgroup) {
                Ok(p) => p,
                Err(e) => {
                    tracing::error!(cgroup = %b.cgroup, error = %e, "static binding skipped");
                    continue;
                }
            };
            if let Err(e) = crate::cgroup::create(&path) {
                tracing::error!(cgroup = %b.cgroup, error = %e, "static binding skipped");
                continue;
            }
            if let Err(e) = self.tag(&path, b.identity.get_ref(), None, true) {
                tracing::error!(cgroup = %b.cgroup, error = %e.0, "static binding skipped");
            }
        }
        for b in self.bindings.all() {
            let path = self.cgroup_root.join(b.cgroup.trim_start_matches('/'));
            if let Ok(id) = crate::cgroup::id(&path) {
                if let Err(e) = self.kernel.set_tag(&path, id, b.id) {
                    tracing::error!(cgroup = %b.cgroup, error = %e, "restoring a tag failed");
                }
            } else {
                // The cgroup is gone (e.g. a `warden exec` that ended while we were down).
                let _ = self.bindings.remove(&b.cgroup);
                let _ = self.kernel.remove_tag(b.cgroup_id);
            }
        }
    }

    fn tag(
        &self,
        path: &Path,
        identity: &str,
        task: Option<String>,
        from_config: bool,
    ) -> Result<Binding, Refused> {
        if !self.config.identity.contains_key(identity) {
            return Err(Refused(format!(
                "unknown identity `{identity}`; add an [identity.{identity}] section to the config"
            )));
        }
        let cgroup_id =
            crate::cgroup::check_taggable(&self.cgroup_root, path).map_err(|e| Refused(e.to_string()))?;
        let rel = crate::cgroup::relative(&self.cgroup_root, path);
        let binding = self
            .bindings
            .add(&rel, cgroup_id, identity, task, from_config)
            .map_err(|e| Refused(format!("saving the binding: {e}")))?;
        let was_tagged = self.kernel.tags().iter().any(|(id, _)| *id == cgroup_id);
        self.kernel.set_tag(path, cgroup_id, binding.id).map_err(|e| Refused(e.to_string()))?;
        // Connections made before the tag would keep talking ungoverned: end them (not those to the proxy).
        let ended = if was_tagged {
            crate::sockdiag::Ended::default()
        } else {
            let listen = self.config.proxy_listen();
            let to_proxy = |peer: SocketAddr| {
                listen.iter().any(|l| {
                    l.port() == peer.port() && (peer.ip().is_loopback() || l.ip().to_canonical() == peer.ip())
                })
            };
            match crate::sockdiag::end_connected(path, to_proxy) {
                Ok(n) => n,
                Err(e) => {
                    let _ = self.kernel.remove_tag(cgroup_id);
                    let _ = self.bindings.remove(&rel);
                    return Err(Refused(format!("not tagged: {e}")));
                }
            }
        };
        let _ = self.audit.append(
            Record::new("binding.added")
                .field("cgroup", &rel)
                .field("cgroup_id", cgroup_id)
                .field("identity", identity)
                .field("task", &binding.task)
                .field("source", if from_config { "config" } else { "control" })
                .field("sockets_ended", json!({ "tcp": ended.tcp, "udp": ended.udp })),
        );
        Ok(binding)
    }

    fn untag(&self, cgroup: &str) -> Result<Value, Refused> {
        let path = crate::cgroup::resolve(&self.cgroup_root, cgroup).map_err(|e| Refused(e.to_string()))?;
        let rel = crate::cgroup::relative(&self.cgroup_root, &path);
        let removed = self.bindings.remove(&rel).map_err(|e| Refused(format!("saving bindings: {e}")))?;
        let Some(b) = removed else { return Err(Refused(format!("cgroup {rel} is not tagged"))) };
        self.kernel.remove_tag(b.cgroup_id).map_err(|e| Refused(e.to_string()))?;
        // A new task in a cgroup of the same name starts afresh (its grants are not inherited).
        if let Err(e) = self.grants.forget_cgroup(&rel) {
            tracing::warn!(cgroup = %rel, error = %e, "could not forget the cgroup's spent grants");
        }
        let _ = self
            .audit
            .append(Record::new("binding.removed").field("cgroup", &rel).field("identity", &b.identity));
        Ok(json!({ "cgroup": rel, "identity": b.identity }))
    }

    fn status(&self) -> Value {
        json!({
            "pid": std::process::id(),
            "links": bpf::pinned_links(&self.config.agent.bpffs_dir),
            "adopted": self.kernel.report.adopted,
            "attached": self.kernel.report.attached,
            "bindings": self.bindings.all(),
            "kernel_tags": self.kernel.tags().len(),
            "live_origins": self.kernel.live_origins(),
            "sessions": self.sessions.len(),
            "targets": self.policy.current().targets().map(|t| t.name.clone()).collect::<Vec<_>>(),
            "proxy_listen": self.config.proxy_listen().iter().map(ToString::to_string).collect::<Vec<_>>(),
        })
    }
}

impl control::Handler for State {
    async fn handle(&self, request: Request) -> Result<Value, Refused> {
        match request {
            Request::Status => Ok(self.status()),
            Request::Tag { cgroup, identity, task } => {
                let path =
                    crate::cgroup::resolve(&self.cgroup_root, &cgroup).map_err(|e| Refused(e.to_string()))?;
                let b = self.tag(&path, &identity, task, false)?;
                Ok(serde_json::to_value(b).unwrap_or_default())
            }
            Request::Untag { cgroup } => self.untag(&cgroup),
            Request::Sessions => Ok(serde_json::to_value(self.sessions.views()).unwrap_or_default()),
            Request::KillSession { id } => {
                if self.sessions.kill(&id) {
                    let _ = self
                        .audit
                        .append(Record::new("session.killed").field("session", &id).field("by", "operator"));
                    Ok(json!({ "session": id, "killed": true }))
                } else {
                    Err(Refused(format!("no live session `{id}`")))
                }
            }
            Request::Grants
            | Request::GrantIssue { .. }
            | Request::GrantApprove { .. }
            | Request::GrantRevoke { .. } => gate::grant_request(self, request).await,
            Request::Stop => {
                self.shutdown.cancel();
                Ok(json!({ "stopping": true }))
            }
        }
    }
}

/// Reads the kernel's refusal events and records them.
async fn events(state: Arc<State>, mut reader: bpf::EventReader) {
    let mut unrecorded = Unrecorded { kernel_seen: state.kernel.events_lost(), ..Unrecorded::default() };
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut batch = Vec::new();
    loop {
        tokio::select! {
            () = state.shutdown.cancelled() => {
                unrecorded.record(&state);
                return;
            }
            _ = tick.tick() => {
                unrecorded.record(&state);
                continue;
            }
            r = reader.read(&mut batch) => if r.is_err() { return },
        }
        for ev in batch.drain(..) {
            if !unrecorded.admit(ev.tagged_cgroup, std::time::Instant::now()) {
                continue;
            }
            if !state.record_event(&ev) {
                unrecorded.queue_full += 1;
            }
        }
    }
}

/// Refusal records one tagged cgroup may add to the audit record per second; the rest are counted and
/// summed up in an `events.lost` record, so one agent hammering refused destinations cannot fill the audit
/// queue that every session's `session.start` goes through.
const REFUSALS_PER_SECOND: u32 = 200;

/// Kernel events that did not become records of their own, until an `events.lost` record accounts for them.
#[derive(Default)]
struct Unrecorded {
    /// The kernel's count of events that found the ring buffer full, as of the last record.
    kernel_seen: u64,
    /// Events the audit queue had no room for.
    queue_full: u64,
    /// Per tagged cgroup: the current one-second window, its records, and those over the budget.
    windows: HashMap<u64, (std::time::Instant, u32)>,
    rate_limited: HashMap<u64, u64>,
}

impl Unrecorded {
    /// True when an event of this tagged cgroup may be recorded in full.
    fn admit(&mut self, tagged_cgroup: u64, now: std::time::Instant) -> bool {
        let (start, n) = self.windows.entry(tagged_cgroup).or_insert((now, 0));
        if now.duration_since(*start) >= Duration::from_secs(1) {
            (*start, *n) = (now, 0);
        }
        if *n < REFUSALS_PER_SECOND {
            *n += 1;
            return true;
        }
        *self.rate_limited.entry(tagged_cgroup).or_default() += 1;
        false
    }

    /// Appends `events.lost` when anything went unrecorded since the last one (kept for the next try if
    /// the record cannot be queued either).
    fn record(&mut self, state: &State) {
        let now = std::time::Instant::now();
        self.windows.retain(|_, (start, _)| now.duration_since(*start) < Duration::from_secs(2));
        let kernel = state.kernel.events_lost();
        let ring_full = kernel.saturating_sub(self.kernel_seen);
        if ring_full == 0 && self.queue_full == 0 && self.rate_limited.is_empty() {
            return;
        }
        let limited: Vec<Value> = self
            .rate_limited
            .iter()
            .map(|(id, n)| {
                let binding = state.bindings.all().into_iter().find(|b| b.cgroup_id == *id);
                json!({
                    "cgroup_id": id,
                    "cgroup": binding.as_ref().map(|b| b.cgroup.clone()),
                    "identity": binding.map(|b| b.identity),
                    "events": n,
                })
            })
            .collect();
        let rec = Record::new("events.lost")
            .field("ring_full", ring_full)
            .field("queue_full", self.queue_full)
            .field("rate_limited", limited)
            .field("per_second", REFUSALS_PER_SECOND)
            .field("decision", "deny")
            .field(
                "reason",
                "kernel refusals that were enforced but not recorded one by one (counted here instead)",
            );
        match state.audit.append(rec) {
            Ok(()) => {
                tracing::warn!(
                    ring_full,
                    queue_full = self.queue_full,
                    "kernel refusals not recorded one by one"
                );
                self.kernel_seen = kernel;
                self.queue_full = 0;
                self.rate_limited.clear();
            }
            Err(e) => tracing::error!(error = %e, "could not record lost kernel events; will retry"),
        }
    }
}

impl State {
    /// Records one kernel refusal; false when the audit record could not take it.
    fn record_event(&self, ev: &warden_common::Event) -> bool {
        let (name, via, reason) = match ev.kind {
            event::CONNECT_REFUSED => {
                ("connect.refused", "connect", "destination is neither a target nor allowed")
            }
            event::SENDMSG_REFUSED => ("connect.refused", "sendmsg", "UDP destination is not allowed"),
            event::PROXY_REFUSED => ("connect.refused", "connect", "direct connection to the proxy port"),
            event::ORIGIN_FULL => ("connect.refused", "connect", "origin map full; refused to fail closed"),
            event::SOCKET_REFUSED => {
                ("socket.refused", "socket", "socket family, type or protocol not allowed")
            }
            event::BIND_REFUSED => ("bind.refused", "bind", "binding the proxy's port"),
            event::ORIGIN_QUOTA => {
                ("connect.refused", "connect", "the cgroup has its share of in-flight redirected connections")
            }
            event::SOCKOPT_REFUSED => (
                "socket.refused",
                "setsockopt",
                "socket option that routes packets elsewhere (IPv6 extension header, IPv4 options)",
            ),
            event::PACKET_REFUSED => (
                "connect.refused",
                "packet",
                "packet with an IPv6 routing/options header or IPv4 options, dropped",
            ),
            _ => ("kernel.event", "unknown", "unknown kernel event"),
        };
        let binding = self.bindings.by_id(ev.binding);
        let cgroup = crate::cgroup::process_cgroup(&self.cgroup_root, ev.tgid).map_or_else(
            || binding.as_ref().map(|b| b.cgroup.clone()).unwrap_or_default(),
            |p| crate::cgroup::relative(&self.cgroup_root, &p),
        );
        let mut rec = Record::new(name)
            .field("pid", ev.tgid)
            .field("tid", ev.pid)
            .field("uid", ev.uid)
            .field("gid", ev.gid)
            .field("cgroup", cgroup)
            .field("cgroup_id", ev.cgroup)
            .field("identity", binding.as_ref().map(|b| b.identity.clone()))
            .field("via", via);
        if ev.kind == event::SOCKET_REFUSED {
            rec = rec.field("family", ev.family).field("type", ev.sock_type).field("protocol", ev.protocol);
        } else if ev.kind == event::SOCKOPT_REFUSED {
            rec = rec.field("family", ev.family).field("level", ev.protocol).field("option", ev.sock_type);
        } else {
            let proto = match ev.sock_type {
                1 => "tcp",
                2 => "udp",
                _ => "other",
            };
            rec = rec.field("dst", bpf::socket_addr(&ev.dst).to_string()).field("proto", proto);
        }
        rec = rec
            .field("decision", "deny")
            .field("reason", reason)
            .field("at", rfc3339(crate::origin::monotonic_to_wall(ev.ktime_ns)));
        if let Err(e) = self.audit.append(rec) {
            tracing::debug!(error = %e, "could not record a kernel refusal");
            return false;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_on_this_host_get_guards_and_win_over_them() {
        let host: Vec<std::net::IpAddr> = vec!["127.0.0.1".parse().unwrap(), "10.1.2.3".parse().unwrap()];
        let local: SocketAddr = "127.0.0.5:5432".parse().unwrap();
        let own: SocketAddr = "10.1.2.3:22".parse().unwrap();
        let remote: SocketAddr = "192.0.2.9:443".parse().unwrap();
        let out = with_guards(vec![(local, 1), (own, 2), (remote, 3)], &host);
        let kernel: HashMap<_, _> = out.iter().map(|(a, id)| (bpf::endpoint(*a), *id)).collect();
        // The targets themselves, last, so they override any guard on the same endpoint.
        assert_eq!(kernel[&bpf::endpoint(local)], 1);
        assert_eq!(kernel[&bpf::endpoint(own)], 2);
        assert_eq!(kernel[&bpf::endpoint(remote)], 3);
        // Guards: the port mark, and every host address on each local target's port.
        assert_eq!(kernel[&warden_common::Endpoint::local_port_guard(5432)], warden_common::GUARD);
        assert_eq!(kernel[&warden_common::Endpoint::local_port_guard(22)], warden_common::GUARD);
        assert_eq!(kernel[&bpf::endpoint("10.1.2.3:5432".parse().unwrap())], warden_common::GUARD);
        assert_eq!(kernel[&bpf::endpoint("127.0.0.1:22".parse().unwrap())], warden_common::GUARD);
        // A target elsewhere gets none.
        assert!(!kernel.contains_key(&warden_common::Endpoint::local_port_guard(443)));
        // IPv6 spellings of IPv4 targets: NAT64, SIIT, IPv4-compatible.
        for s in ["[64:ff9b::192.0.2.9]:443", "[::ffff:0:192.0.2.9]:443", "[::192.0.2.9]:443"] {
            assert_eq!(kernel[&bpf::endpoint(s.parse().unwrap())], warden_common::GUARD, "{s}");
        }
        // 3 targets; 2 marks; 127.0.0.1 and 10.1.2.3 on 5432, 127.0.0.1 on 22 (10.1.2.3:22 is the target);
        // 3 IPv6 spellings of each of the 3 IPv4 targets.
        assert_eq!(kernel.len(), 3 + 2 + 3 + 9);
    }

    #[test]
    fn refusals_are_recorded_up_to_a_budget_per_cgroup_and_second_then_counted() {
        let mut u = Unrecorded::default();
        let t0 = std::time::Instant::now();
        let admitted = (0..REFUSALS_PER_SECOND + 50).filter(|_| u.admit(7, t0)).count();
        assert_eq!(admitted, REFUSALS_PER_SECOND as usize);
        assert_eq!(u.rate_limited[&7], 50);
        // Another cgroup has its own budget; a new second starts afresh.
        assert!(u.admit(8, t0));
        assert!(u.admit(7, t0 + Duration::from_millis(1000)));
    }

    #[test]
    fn reserved_port_lists_are_edited_in_place() {
        use reserved_ports::edit;
        assert_eq!(edit("", &[15001], true), "15001");
        assert_eq!(edit("\n", &[15001, 15001], true), "15001");
        assert_eq!(edit("8080,9000-9010\n", &[9005, 40000], true), "8080,9000-9010,40000");
        assert_eq!(edit("8080,9000-9010,40000", &[40000, 9005], false), "8080,9000-9010");
        assert_eq!(edit("15001", &[15001], false), "");
    }

    #[test]
    fn this_host_spellings() {
        for s in ["0.0.0.0:1", "127.0.0.1:1", "127.9.9.9:1", "[::]:1", "[::1]:1", "[::ffff:127.0.0.2]:1"] {
            assert!(bpf::endpoint(s.parse().unwrap()).is_this_host(), "{s}");
        }
        for s in ["10.0.0.1:1", "[::2]:1", "[::127.0.0.1]:1", "[2001:db8::1]:1", "128.0.0.1:1"] {
            assert!(!bpf::endpoint(s.parse().unwrap()).is_this_host(), "{s}");
        }
    }
}
