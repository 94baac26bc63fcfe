//! The daemon's wiring (`run`): installs (or adopts) the kernel programs, fills their maps from config and
//! policy, starts the audit writer, the proxy listeners, the kernel event reader and the control socket,
//! keeps the kernel's view and the live sessions in step with the policy, and stops. Its jobs, one file
//! each: the gate (`gate.rs`), target resolution and guards (`targets.rs`), reserved proxy ports
//! (`reserved_ports.rs`), kernel events and their rate limit (`events.rs`), the control handler
//! (`handler.rs`), tagging (`tagging.rs`), the bindings file (`bindings.rs`) and giving freed memory
//! back to the kernel (`memory.rs`).

mod bindings;
mod events;
mod gate;
mod handler;
mod limits;
mod memory;
pub mod reserved_ports;
pub mod status;
mod tagging;
mod targets;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::audit::{Audit, Record};
use crate::bpf::{self, Kernel};
use crate::config::{AllowEntry, Config};

use crate::policy::{self, Policy};
use crate::proxy::{Proxy, Sessions};
pub use bindings::{Binding, Bindings};
pub use targets::Targets;

/// Sessions beyond this (or beyond what the open-file limit leaves room for) are refused (and recorded)
/// rather than queued.
const MAX_SESSIONS: usize = 16_384;

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
    pub metrics: Arc<crate::metrics::Metrics>,
    /// The audit shipper's view, when `[audit.ship]` is on.
    pub shipping: Option<crate::audit::ship::Shipping>,
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
        config = %crate::logging::effective_config(&config),
        "starting warden"
    );
    let room = limits::raise_nofile(MAX_SESSIONS);

    let writer_stop = CancellationToken::new();
    let metrics = crate::metrics::unserved();
    let audit_options = crate::audit::AuditOptions::new(&config.audit, &config.agent.state_dir, host.clone());
    let (audit, writer) =
        Audit::start_with(&audit_options.with_metrics(metrics.clone()), writer_stop.clone())?;
    let shipper = crate::audit::ship::spawn(
        &config.audit.ship,
        &audit,
        &config.agent.state_dir,
        &host,
        shutdown.clone(),
    )
    .await?;
    let shipping = shipper.as_ref().map(|(_, view)| view.clone());

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
            .field("per_cgroup", &kernel.report.per_cgroup)
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
    let identities = crate::identity::Identities::builder(&identity_configs(&config))
        .audit(audit.clone())
        .metrics(metrics.clone())
        .build()?;
    let grants = crate::grants::Grants::open_with(
        &config.agent.state_dir,
        audit.clone(),
        Arc::new(crate::grants::SystemClock),
        crate::grants::GrantsOptions {
            approval_wait: config.grants.approval_wait.0,
            pending_max: config.grants.pending_max.0,
            metrics: metrics.clone(),
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
        metrics: metrics.clone(),
        shipping,
        config,
    });
    state.apply_static_bindings();
    state.sync_targets(&policy.current()).await;

    let tcp = match state.config.agent.tcp_relay {
        crate::config::TcpRelay::Splice => crate::protocol::tcp::Tcp::splicing(
            crate::protocol::tcp::Pipes::new(room.pipes, crate::protocol::tcp::pipes::PIPE_SIZE),
        ),
        crate::config::TcpRelay::Copy => crate::protocol::tcp::Tcp::copying(),
    };
    let protocols = crate::protocol::Handlers::new(&state.config.agent.state_dir, &audit, tcp)?;
    let proxy = Arc::new(Proxy {
        origins: Arc::new(crate::origin::KernelOrigins::new(kernel.clone(), cgroup_root)),
        protocols,
        audit: audit.clone(),
        sessions: state.sessions.clone(),
        gate: Arc::new(gate::DaemonGate { state: state.clone() }),
        audit_failed: audit.failed(),
        shutdown: shutdown.clone(),
        limit: Arc::new(Semaphore::new(room.sessions)),
        tasks: tokio_util::task::TaskTracker::new(),
        metrics: metrics.clone(),
        refusals: Arc::default(),
        per_cgroup: Arc::new(crate::proxy::per_cgroup::PerCgroup::new(
            state.config.agent.max_sessions_per_cgroup,
        )),
    });
    let mut tasks = tokio::task::JoinSet::new();
    for l in listeners {
        tasks.spawn(proxy.clone().serve(l));
    }
    if let Some(reader) = kernel.take_events() {
        tasks.spawn(events::events(state.clone(), reader));
    }
    if let Some(forward) = kernel.take_log_forwarder(shutdown.clone()) {
        tasks.spawn(forward);
    }
    tasks.spawn(policy.clone().watch_files(shutdown.clone().cancelled_owned()));
    tasks.spawn(follow_policy(state.clone()));
    tasks.spawn(targets::resolve_periodically(state.clone()));
    tasks.spawn(memory::trim_periodically(shutdown.clone()));
    if !state.config.metrics.listen.is_empty() {
        let weak = Arc::downgrade(&state);
        metrics.set_sampler(Box::new(move |m| {
            if let Some(state) = weak.upgrade() {
                status::sample(&state, m);
            }
        }));
        tasks.spawn(crate::metrics::serve::run(
            state.config.metrics.listen.clone(),
            metrics.clone(),
            shutdown.clone(),
        ));
    }
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
            if let Err(e) = crate::control::serve(&socket, handler, stop).await {
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
    let _ = tokio::time::timeout(Duration::from_secs(5), proxy.drained()).await;
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

impl State {
    /// cut through their leases) and sessions whose target is gone.
    fn end_disallowed_sessions(&self, policy: &Policy) {
        let subjects = self.subjects.lock().expect("subjects lock").clone();
        let ended = self.grants.revalidate(policy, |g| subjects.get(&g.identity).cloned());
        let gone =
            crate::protocol::End::PolicyChanged { reason: "its target was removed from the policy".into() };
        let n = self.sessions.kill_where(|s| policy.target(&s.target).is_none(), &gone);
        if !ended.is_empty() || n > 0 {
            tracing::info!(grants = ended.len(), sessions = n, "ended what the new policy no longer allows");
        }
    }
}
