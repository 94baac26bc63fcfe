//! SSH: Warden terminates the agent's SSH connection with a host certificate for the target's name
//! (signed by Warden's host CA, `warden ca ssh`), accepts the agent without a key (its cgroup and Okta
//! identity are who it is), logs in upstream with the target's key, and bridges channel by channel:
//! every `exec` is checked and recorded (`ssh.exec`), terminals are recorded as asciicast v2
//! (`ssh.recording`, hash in the chain), and forwarding, agent forwarding, X11 and sftp are refused
//! unless the grant allows them.
//!
//! Files: [`ca`] (host CA, host certificates), [`server`] (the agent-side server, one per connection),
//! [`upstream`] (the client to the real server, host key checks), [`channel`] (bridging one channel), [`sftp`] (file operations
//! on a granted sftp channel, pure),
//! [`record`] (asciicast recording and replay), [`setup`] (where a connection's set-up time goes, the
//! `ssh_setup` debug line), [`algorithms`] (the ciphers, MACs and key exchanges both legs offer).
//!
//! The path of one connection, in the seam's terms: [`Ssh::hello`] runs the SSH transport and waits for
//! the agent's first user-auth request, so a refusal can be an SSH disconnect message `ssh` prints;
//! [`Greeting::connect`] opens only the upstream TCP connection; [`Greeting::run`] logs in upstream,
//! then answers the agent's user-auth with success and bridges until either side ends or the session is
//! cut (then the agent sees a disconnect naming the cause).

pub mod algorithms;
pub mod ca;
pub mod channel;
pub mod record;
pub mod server;
pub mod setup;
pub mod sftp;
pub mod upstream;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use russh::server::RunningSession;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio_util::task::TaskTracker;

use crate::audit::budget::Budget;
use crate::audit::{Audit, Record};
use crate::origin::ConnOrigin;
use crate::policy::{Target, TargetKind, Terms};
use crate::protocol::{End, Hello, Refusal, RefusalCode, Session};

/// How long the agent has from TCP accept to its first user-auth request.
/// (Just under the proxy's own hello deadline, so the agent is told and the record says why.)
pub const HELLO_DEADLINE: Duration = Duration::from_secs(9);
/// How long the upstream has for TCP connect, and then for the SSH handshake and login.
pub const UPSTREAM_DEADLINE: Duration = Duration::from_secs(15);
/// How long channels have to write their records once the session is over.
const DRAIN_DEADLINE: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum SshError {
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("ssh key {}: {reason}", path.display())]
    Key { path: PathBuf, reason: String },
    #[error("cannot make an ssh host certificate: {reason}")]
    Certificate { reason: String },
    #[error("cannot read random bytes: {reason}")]
    Random { reason: String },
}

impl SshError {
    pub(crate) fn io(action: &'static str, path: &Path, source: std::io::Error) -> Self {
        Self::Io { action, path: path.to_path_buf(), source }
    }
}

/// Why the agent's hello could not be read; recorded by the proxy with code `protocol`.
#[derive(Debug, thiserror::Error)]
pub enum HelloError {
    #[error("the ssh client did not reach user authentication within {}s", deadline.as_secs())]
    Timeout { deadline: Duration },
    #[error("ssh handshake failed: {detail}")]
    Protocol { detail: String },
    #[error("this target is not an ssh target")]
    NotSsh,
    #[error("{0}")]
    Setup(#[from] SshError),
}

impl HelloError {
    pub fn code(&self) -> RefusalCode {
        RefusalCode::Protocol
    }
}

/// Shared by every SSH session: the host CA and where recordings go.
#[derive(Debug)]
pub struct Ssh {
    ca: ca::HostCa,
    audit: Audit,
    hello_deadline: Duration,
}

impl Ssh {
    /// Loads (or makes) the host CA and host key in `state_dir`. Recordings go under the audit directory.
    pub fn new(state_dir: &Path, audit: Audit) -> Result<Self, SshError> {
        Ok(Self { ca: ca::HostCa::load_or_create(state_dir)?, audit, hello_deadline: HELLO_DEADLINE })
    }

    /// Changes the hello deadline (default [`HELLO_DEADLINE`]).
    pub fn set_hello_deadline(&mut self, deadline: Duration) {
        self.hello_deadline = deadline;
    }

    /// The `known_hosts` line for agents (`warden ca ssh`).
    pub fn known_hosts_line(&self) -> Result<String, SshError> {
        self.ca.known_hosts_line()
    }

    /// Step 3: the SSH transport with the agent, up to its first user-auth request, under
    /// [`HELLO_DEADLINE`].
    pub async fn hello(
        &self,
        client: TcpStream,
        target: &Arc<Target>,
        origin: &ConnOrigin,
    ) -> Result<Option<Greeting>, HelloError> {
        if !matches!(target.kind, TargetKind::Ssh(_)) {
            return Err(HelloError::NotSsh);
        }
        let mut setup = setup::Setup::new();
        let _ = client.set_nodelay(true);
        let principals = vec![target.host.clone(), origin.dst.ip().to_string(), target.name.clone()];
        let cert = self.ca.certificate(&principals)?;
        let openssh = algorithms::openssh_with_gcm(&peek_version(&client).await);
        let config = Arc::new(server::config(self.ca.host_key().clone(), cert, openssh));
        let version = Arc::new(Mutex::new(Vec::new()));
        let tap = Tap { inner: client, line: version.clone(), done: false };
        let (seen_tx, seen_rx) = oneshot::channel();
        let (decision_tx, decision_rx) = oneshot::channel();
        let handler = server::AgentHandler::new(seen_tx, decision_rx);
        let deadline = tokio::time::Instant::now() + self.hello_deadline;
        let timeout = || HelloError::Timeout { deadline: self.hello_deadline };
        let mut running = tokio::time::timeout_at(deadline, russh::server::run_stream(config, tap, handler))
            .await
            .map_err(|_| timeout())?
            .map_err(|e| HelloError::Protocol { detail: describe(&e) })?;
        let seen = tokio::select! {
            seen = seen_rx => seen.map_err(|_| HelloError::Protocol { detail: "the client went away".into() })?,
            ended = &mut running => {
                let detail = match ended {
                    Ok(()) => "the client closed the connection before authenticating".into(),
                    Err(e) => describe(&e),
                };
                return Err(HelloError::Protocol { detail });
            }
            () = tokio::time::sleep_until(deadline) => {
                running.handle().disconnect(russh::Disconnect::ByApplication, "warden: authentication timed out".into(), String::new()).await.ok();
                return Err(timeout());
            }
        };
        setup.hello_done();
        let mut hello = Hello { user: Some(seen.user.clone()), ..Hello::default() };
        let version =
            version.lock().map(|v| String::from_utf8_lossy(&v).trim_end().to_owned()).unwrap_or_default();
        if !version.is_empty() {
            hello.details.insert("client_version".into(), version.into());
        }
        hello.details.insert("auth_method".into(), seen.method.into());
        if let Some(key) = seen.key {
            hello.details.insert("auth_key".into(), key.into());
        }
        Ok(Some(Greeting {
            hello,
            running,
            decision: Some(decision_tx),
            upstream: None,
            target: target.clone(),
            audit_dir: self.audit.dir().to_path_buf(),
            setup,
        }))
    }
}

/// Russh's errors, in one line.
fn describe(e: &russh::Error) -> String {
    match e {
        russh::Error::Version => "not an ssh client (no SSH-2.0 version line)".into(),
        other => other.to_string(),
    }
}

/// What the agent-side server task is told once the gate and the upstream login have decided.
pub enum Decision {
    Admit(Arc<Admitted>),
    Refuse,
}

/// An admitted session as the agent-side handler and the channel bridges share it.
pub struct Admitted {
    pub session: Arc<Session>,
    pub upstream: Arc<russh::client::Handle<upstream::UpstreamHandler>>,
    pub tracker: TaskTracker,
    pub audit_dir: PathBuf,
    /// The set-up steps so far, logged with the first channel's (`ssh_setup`).
    pub setup: setup::Setup,
    /// The remote (`-R`) listeners the agent asked for and the upstream granted.
    listeners: tokio::sync::watch::Sender<Listeners>,
    /// This session's refusal records per second; the rest are enforced, counted, and written as one
    /// `events.lost` (so an agent refused in a loop cannot flood the trail).
    refusals: Mutex<Budget<()>>,
}

/// Full `ssh.refused` records one session may write per second.
pub const REFUSALS_PER_SECOND: u32 = 20;

/// The agent's remote listeners: granted ones as (address, port), and how many requests are still
/// waiting for the upstream (whose first connection may arrive before its reply is handled).
#[derive(Debug, Default)]
pub struct Listeners {
    granted: Vec<(String, u32)>,
    pending: usize,
}

impl Admitted {
    /// Records a refused request (`ssh.refused`) within the session's budget of records per second; past
    /// it the refusal (already enforced) is only counted, for [`Admitted::flush_lost_refusals`].
    pub fn refused(&self, request: &str, detail: &str, reason: &str) {
        let admitted = self.refusals.lock().is_ok_and(|mut b| b.admit(&(), std::time::Instant::now()));
        if !admitted {
            return;
        }
        self.flush_lost_refusals();
        self.record(
            self.session
                .record("ssh.refused")
                .field("request", request)
                .field("detail", detail)
                .field("reason", reason),
        );
    }

    /// Writes one `events.lost` for the refusals counted but not recorded since the last one.
    pub fn flush_lost_refusals(&self) {
        let lost = self.refusals.lock().map_or(0, |mut b| {
            let n = b.over().get(&()).copied().unwrap_or(0);
            b.clear_over();
            n
        });
        if lost == 0 {
            return;
        }
        let record = self
            .session
            .record("events.lost")
            .field("ring_full", 0)
            .field("queue_full", 0)
            .field(
                "rate_limited",
                serde_json::json!([{"source": "ssh", "session": &self.session.id, "events": lost}]),
            )
            .field("per_second", REFUSALS_PER_SECOND)
            .field("decision", "deny")
            .field("reason", "SSH requests refused beyond the session's budget of records per second");
        let _ = self.session.audit.append_or_hold(record);
    }

    /// Appends one of this session's records; when the record cannot be written the session is cut
    /// (nothing unrecorded happens) and false is returned.
    pub fn record(&self, record: Record) -> bool {
        if self.session.audit.append(record).is_ok() {
            return true;
        }
        self.session.cut.cut(End::AuditUnavailable);
        false
    }

    pub fn terms(&self) -> &Terms {
        &self.session.terms
    }

    /// A remote listener request is on its way to the upstream.
    pub fn listen_pending(&self) {
        self.listeners.send_modify(|l| l.pending += 1);
    }

    /// The upstream answered a listener request: `Some(port)` if it now listens for the agent.
    pub fn listen_done(&self, address: &str, granted: Option<u32>) {
        self.listeners.send_modify(|l| {
            l.pending = l.pending.saturating_sub(1);
            if let Some(port) = granted {
                l.granted.push((address.to_owned(), port));
            }
        });
    }

    /// Forgets a remote listener; false if the agent never had it.
    pub fn unlisten(&self, address: &str, port: u32) -> bool {
        let mut found = false;
        self.listeners.send_modify(|l| {
            let before = l.granted.len();
            l.granted.retain(|(a, p)| !(a == address && *p == port));
            found = l.granted.len() != before;
        });
        found
    }

    /// Whether the upstream may forward a connection accepted on `port`: one of the agent's listeners
    /// (waiting for requests still in flight); anything else from the upstream is refused.
    async fn listening(&self, port: u32) -> bool {
        let mut rx = self.listeners.subscribe();
        let decided = rx.wait_for(|l| l.granted.iter().any(|(_, p)| *p == port) || l.pending == 0);
        match tokio::time::timeout(UPSTREAM_DEADLINE, decided).await {
            Ok(Ok(l)) => l.granted.iter().any(|(_, p)| *p == port),
            _ => false,
        }
    }

    /// Relays one connection the upstream accepted on a remote listener to the agent as a
    /// forwarded-tcpip channel, then bridges it (an `ssh.forward` record with direction `remote`).
    async fn relay_forwarded(self: Arc<Self>, agent: russh::server::Handle, f: upstream::Forwarded) {
        let from = format!("{}:{}", f.originator_address, f.originator_port);
        if !self.listening(f.connected_port).await {
            self.refused(
                "forwarded-tcpip",
                &format!("{}:{}", f.connected_address, f.connected_port),
                "the upstream forwarded a connection for a port the agent did not ask for",
            );
            return;
        }
        let opened = agent.channel_open_forwarded_tcpip(
            f.connected_address.clone(),
            f.connected_port,
            f.originator_address.clone(),
            f.originator_port,
        );
        let agent_channel = match tokio::time::timeout(UPSTREAM_DEADLINE, opened).await {
            Ok(Ok(c)) => c,
            // Dropping the reply rejects the upstream's channel.
            Ok(Err(e)) => {
                tracing::debug!(session = %self.session.id, error = %e, "the client refused a forwarded connection");
                return;
            }
            Err(_) => {
                tracing::debug!(session = %self.session.id, "the client did not answer a forwarded connection");
                return;
            }
        };
        f.reply.accept().await;
        let kind = channel::Kind::Forward {
            remote: true,
            host: f.connected_address,
            port: f.connected_port,
            from: Some(from),
        };
        let state = channel::ChanState::new(agent_channel.id(), kind);
        let (agent_read, agent_write) = agent_channel.split();
        let (up_read, up_write) = f.channel.split();
        let (replies, _) = tokio::sync::mpsc::channel(1);
        let ends = channel::Ends {
            agent_read,
            agent_write,
            agent_handle: agent,
            up_read,
            up_write: Arc::new(up_write),
            replies,
        };
        channel::bridge(self, state, ends).await;
    }
}

/// One agent connection between hello and the end of its session.
pub struct Greeting {
    hello: Hello,
    running: RunningSession<server::AgentHandler>,
    decision: Option<oneshot::Sender<Decision>>,
    upstream: Option<TcpStream>,
    target: Arc<Target>,
    audit_dir: PathBuf,
    setup: setup::Setup,
}

impl std::fmt::Debug for Greeting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ssh::Greeting")
            .field("target", &self.target.name)
            .field("hello", &self.hello)
            .finish_non_exhaustive()
    }
}

impl Greeting {
    pub fn hello(&self) -> &Hello {
        &self.hello
    }

    /// Tells the agent why it is turned away (a disconnect message `ssh` prints) and ends the connection.
    async fn turn_away(&mut self, message: String) {
        let handle = self.running.handle();
        let _ = handle.disconnect(russh::Disconnect::ByApplication, message.clone(), String::new()).await;
        if let Some(tx) = self.decision.take() {
            let _ = tx.send(Decision::Refuse);
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), &mut self.running).await;
    }

    /// Step 4's refusal: an SSH disconnect naming the policy's reason.
    pub async fn refuse(mut self, refusal: &Refusal) {
        self.turn_away(format!("warden: access to {} refused: {}", self.target.name, refusal.reason)).await;
    }

    /// Step 5: the upstream TCP connection only.
    pub async fn connect(&mut self, dst: SocketAddr, _terms: &Terms) -> Result<(), End> {
        self.setup.connect_started();
        let connected = tokio::time::timeout(UPSTREAM_DEADLINE, TcpStream::connect(dst)).await;
        self.setup.connect_done();
        let end = match connected {
            Ok(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                self.upstream = Some(stream);
                return Ok(());
            }
            Ok(Err(e)) => End::UpstreamUnreachable { detail: format!("{dst}: {e}") },
            Err(_) => End::UpstreamTimeout,
        };
        self.turn_away(format!("warden: {}: {end}", self.target.name)).await;
        Err(end)
    }

    /// Step 6: upstream login, then the bridged session until it ends or is cut.
    pub async fn run(mut self, session: Session) -> End {
        let TargetKind::Ssh(ssh) = &self.target.kind else {
            return End::ProtocolError { detail: "not ssh".into() };
        };
        let Some(stream) = self.upstream.take() else {
            return End::UpstreamUnreachable { detail: "connect was not called".into() };
        };
        let session = Arc::new(session);
        self.setup.run_started();
        let login = tokio::select! {
            r = tokio::time::timeout(UPSTREAM_DEADLINE, upstream::connect(stream, &self.target, ssh)) => match r {
                Ok(r) => r,
                Err(_) => Err(End::UpstreamTimeout),
            },
            end = session.cut.cut_with() => Err(end),
        };
        let upstream::Connected { handle: upstream, closed: upstream_closed, mut forwarded } = match login {
            Ok(c) => c,
            Err(end) => {
                self.turn_away(format!("warden: {}: {end}", self.target.name)).await;
                return end;
            }
        };
        self.setup.login_done();
        let admitted = Arc::new(Admitted {
            session: session.clone(),
            upstream: Arc::new(upstream),
            tracker: TaskTracker::new(),
            audit_dir: self.audit_dir.clone(),
            setup: self.setup,
            listeners: tokio::sync::watch::Sender::new(Listeners::default()),
            refusals: Mutex::new(Budget::new(REFUSALS_PER_SECOND)),
        });
        if let Some(tx) = self.decision.take()
            && tx.send(Decision::Admit(admitted.clone())).is_err()
        {
            return End::ClientClosed;
        }
        let client = self.running.handle();
        let mut client_done = false;
        let end = loop {
            tokio::select! {
                ended = &mut self.running => match ended {
                    Ok(()) => {
                        client_done = true;
                        break End::ClientClosed;
                    }
                    Err(e) => {
                        client_done = true;
                        tracing::debug!(session = %session.id, error = %e, "ssh client connection failed");
                        break End::ClientError;
                    }
                },
                () = upstream_closed.cancelled() => {
                    let _ = client.disconnect(russh::Disconnect::ByApplication, "warden: the upstream closed the connection".into(), String::new()).await;
                    break End::UpstreamClosed;
                }
                end = session.cut.cut_with() => {
                    let message = format!("warden: session ended: {end}");
                    let _ = client.disconnect(russh::Disconnect::ByApplication, message, String::new()).await;
                    break end;
                }
                Some(f) = forwarded.recv() => {
                    admitted.tracker.spawn(admitted.clone().relay_forwarded(client.clone(), f));
                }
            }
        };
        let _ = admitted.upstream.disconnect(russh::Disconnect::ByApplication, "session ended", "").await;
        // Channels finish their records (exit statuses, recordings) before session.end.
        admitted.tracker.close();
        let _ = tokio::time::timeout(DRAIN_DEADLINE, admitted.tracker.wait()).await;
        admitted.flush_lost_refusals();
        if !client_done {
            let _ = tokio::time::timeout(Duration::from_secs(2), &mut self.running).await;
        }
        end
    }
}

/// How long the agent's version line is waited for before choosing the ciphers to offer (clients send
/// it at once on connecting; one that waits for the server's first is offered the whole allow-list).
const VERSION_PEEK: Duration = Duration::from_millis(200);

/// The start of the agent's version line, peeked (left in the socket for russh), up to [`VERSION_PEEK`].
async fn peek_version(client: &TcpStream) -> Vec<u8> {
    let mut buf = [0u8; 64];
    let peeked = async {
        loop {
            match client.peek(&mut buf).await {
                // A whole line or a full buffer: enough to name the software.
                Ok(n) if n == buf.len() || buf[..n].contains(&b'\n') => return n,
                Ok(0) | Err(_) => return 0,
                // Part of a line so far.
                Ok(_) => tokio::time::sleep(Duration::from_millis(2)).await,
            }
        }
    };
    let n = tokio::time::timeout(VERSION_PEEK, peeked).await.unwrap_or(0);
    buf[..n].to_vec()
}

/// Passes a stream through, keeping the first line the client sent (its SSH version string).
struct Tap {
    inner: TcpStream,
    line: Arc<Mutex<Vec<u8>>>,
    done: bool,
}

impl AsyncRead for Tap {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if !self.done
            && let Poll::Ready(Ok(())) = &polled
        {
            let fresh = &buf.filled()[before..];
            let end = fresh.iter().position(|&b| b == b'\n');
            let take = &fresh[..end.map_or(fresh.len(), |e| e + 1)];
            if let Ok(mut line) = self.line.lock() {
                let room = 255usize.saturating_sub(line.len());
                line.extend_from_slice(&take[..take.len().min(room)]);
            }
            self.done = end.is_some() || fresh.is_empty();
        }
        polled
    }
}

impl AsyncWrite for Tap {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// A signal's SSH name (`TERM`, `KILL`, ...), as recorded.
pub(crate) fn signal_name(sig: &russh::Sig) -> String {
    match sig {
        russh::Sig::Custom(s) => s.clone(),
        other => format!("{other:?}"),
    }
}
