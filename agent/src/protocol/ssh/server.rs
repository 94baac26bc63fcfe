//! The agent-side SSH server (one russh handler per connection): takes the agent's first user-auth
//! request (any method; a password is never kept) as its hello, waits for the gate and the upstream login,
//! then answers every channel request in order: forwards what the grant allows to the upstream and
//! waits for its reply, refuses and records the rest.
//!
//! Requests are answered inside the callbacks because russh keeps one "wants reply" flag per channel: a
//! reply sent later from another task could answer the wrong request.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use russh::keys::{Certificate, PrivateKey};
use russh::server::{self, Auth, ChannelOpenHandle, Msg, Session};
use russh::{Channel, ChannelId, ChannelOpenFailure, MethodKind, MethodSet};
use tokio::sync::{mpsc, oneshot};

use super::algorithms::{self, Leg};
use super::channel::{self, ChanState, Kind};
use super::setup::FirstChannel;
use super::{Admitted, Decision};
use crate::policy::Access;
use crate::policy::commands::{command_allowed, words};
use crate::protocol::Ask;

/// How long the upstream has to answer one channel request.
const REPLY_DEADLINE: Duration = Duration::from_secs(30);
/// The exit status the agent sees for a refused command or shell (the shell's "cannot execute").
pub const REFUSED_EXIT: u32 = 126;

/// The agent-side server's settings for one connection: Warden's host key and the certificate for
/// this target; `openssh`: the client's version line names an OpenSSH with AES-GCM.
pub fn config(host_key: PrivateKey, cert: Certificate, openssh: bool) -> server::Config {
    server::Config {
        server_id: russh::SshId::Standard("SSH-2.0-warden".into()),
        methods: MethodSet::from(
            &[MethodKind::None, MethodKind::PublicKey, MethodKind::Password, MethodKind::KeyboardInteractive]
                [..],
        ),
        auth_rejection_time: Duration::from_millis(100),
        auth_rejection_time_initial: Some(Duration::ZERO),
        keys: vec![host_key],
        certificates: vec![cert],
        // The hello deadline bounds the handshake; after that the session lives as long as its grant.
        inactivity_timeout: None,
        keepalive_interval: Some(Duration::from_secs(30)),
        keepalive_max: 3,
        max_auth_attempts: 6,
        nodelay: true,
        window_size: 8 * 1024 * 1024,
        preferred: algorithms::preferred(Leg::Agent { openssh }),
        ..server::Config::default()
    }
}

/// What the first user-auth request told us.
#[derive(Debug)]
pub struct Seen {
    pub user: String,
    pub method: &'static str,
    /// The SHA-256 fingerprint of an offered public key.
    pub key: Option<String>,
}

/// One channel as the handler holds it.
struct Chan {
    state: Arc<ChanState>,
    up: Arc<russh::ChannelWriteHalf<russh::client::Msg>>,
    replies: mpsc::Receiver<bool>,
}

pub struct AgentHandler {
    seen: Option<oneshot::Sender<Seen>>,
    decision: Option<oneshot::Receiver<Decision>>,
    admitted: Option<Arc<Admitted>>,
    offered_key: Option<String>,
    chans: HashMap<ChannelId, Chan>,
    /// The first channel's set-up stamps, until its request is answered and `ssh_setup` logged.
    first: Option<FirstChannel>,
    setup_logged: bool,
}

impl AgentHandler {
    pub fn new(seen: oneshot::Sender<Seen>, decision: oneshot::Receiver<Decision>) -> Self {
        Self {
            seen: Some(seen),
            decision: Some(decision),
            admitted: None,
            offered_key: None,
            chans: HashMap::new(),
            first: None,
            setup_logged: false,
        }
    }

    /// The first user-auth request is the hello: report it, then wait for the gate and the upstream.
    async fn authenticate(&mut self, user: &str, method: &'static str) -> Auth {
        if self.admitted.is_some() {
            return Auth::Accept;
        }
        if let Some(tx) = self.seen.take() {
            let _ = tx.send(Seen { user: user.to_owned(), method, key: self.offered_key.take() });
        }
        let Some(rx) = self.decision.take() else { return Auth::reject() };
        match rx.await {
            Ok(Decision::Admit(ctx)) => {
                self.admitted = Some(ctx);
                Auth::Accept
            }
            // The disconnect naming the reason is already queued behind this answer. A rejection would
            // reach the client first and `ssh` would print only "Permission denied"; a success lets the
            // disconnect arrive and be printed. No channel can open: nothing was admitted.
            Ok(Decision::Refuse) => Auth::Accept,
            Err(_) => Auth::Reject { proceed_with_methods: Some(MethodSet::empty()), partial_success: false },
        }
    }

    fn ctx(&self) -> Result<Arc<Admitted>, russh::Error> {
        self.admitted.clone().ok_or(russh::Error::Inconsistent)
    }

    /// Records a refused request (`ssh.refused`).
    fn refused(&self, request: &str, detail: &str, reason: &str) {
        if let Some(ctx) = &self.admitted {
            ctx.refused(request, detail, reason);
        }
    }

    /// Waits for the upstream's reply to the request just forwarded on `channel`.
    async fn upstream_reply(&mut self, channel: ChannelId) -> bool {
        let Some(c) = self.chans.get_mut(&channel) else { return false };
        matches!(tokio::time::timeout(REPLY_DEADLINE, c.replies.recv()).await, Ok(Some(true)))
    }

    fn reply(session: &mut Session, channel: ChannelId, ok: bool) -> Result<(), russh::Error> {
        if ok { session.channel_success(channel) } else { session.channel_failure(channel) }
    }

    /// Logs the connection's set-up (`ssh_setup`) once, when the first channel's request was answered.
    fn setup_done(&mut self, request: Instant, what: &'static str) {
        if self.setup_logged {
            return;
        }
        self.setup_logged = true;
        if let (Some(ctx), Some(first)) = (&self.admitted, self.first.take()) {
            ctx.setup.log(first.open, first.opened, request, what);
        }
    }

    /// Refuses a command or shell the way a shell would: the reason on stderr, exit status 126, and the
    /// channel closed (the upstream side never ran anything).
    async fn refuse_run(
        &mut self,
        channel: ChannelId,
        message: &str,
        session: &mut Session,
    ) -> Result<(), russh::Error> {
        let Some(c) = self.chans.get(&channel) else { return session.channel_failure(channel) };
        c.state.set_kind(Kind::Refused);
        let up = c.up.clone();
        session.channel_success(channel)?;
        session.extended_data(channel, 1, format!("warden: {message}\r\n").into_bytes())?;
        session.exit_status_request(channel, REFUSED_EXIT)?;
        session.eof(channel)?;
        session.close(channel)?;
        c.state.mark_agent_closed();
        // The upstream channel closes unused.
        let _ = up.close().await;
        Ok(())
    }

    /// Whether a command is a file transfer (legacy `scp -t`/`-f`, or a direct sftp-server), which needs
    /// `sftp: true` like the sftp subsystem.
    fn is_transfer(command: &str) -> bool {
        let Ok(w) = words(command) else {
            return command.contains("scp") || command.contains("sftp-server");
        };
        let program = w[0].rsplit('/').next().unwrap_or(w[0]);
        program == "scp" || program == "sftp-server" || program == "rsync" && w.contains(&"--server")
    }

    /// Checks an exec request against the grant: access, file-transfer rule, allow-list, then the gate.
    fn exec_decision(ctx: &Admitted, command: &str) -> Result<(), String> {
        let terms = ctx.terms();
        if !terms.access.includes(Access::Exec) {
            return Err(format!("this grant ({}) does not allow commands", terms.access));
        }
        if Self::is_transfer(command) && !terms.sftp {
            return Err("file transfer (scp, sftp) is not granted (the grant needs sftp: true)".into());
        }
        if let Some(patterns) = &terms.commands {
            command_allowed(command, patterns)?;
        }
        ctx.session.ask(&Ask::Exec { command }).map_err(|r| r.reason)
    }
}

impl server::Handler for AgentHandler {
    type Error = russh::Error;

    async fn auth_none(&mut self, user: &str) -> Result<Auth, Self::Error> {
        Ok(self.authenticate(user, "none").await)
    }

    async fn auth_password(&mut self, user: &str, _password: &str) -> Result<Auth, Self::Error> {
        // The password is neither checked nor kept.
        Ok(self.authenticate(user, "password").await)
    }

    async fn auth_publickey_offered(
        &mut self,
        _user: &str,
        offer: server::PublicKeyOffer<'_>,
    ) -> Result<Auth, Self::Error> {
        self.offered_key = Some(offer.public_key.fingerprint(russh::keys::HashAlg::Sha256).to_string());
        Ok(Auth::Accept)
    }

    async fn auth_publickey(
        &mut self,
        user: &str,
        key: server::VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        self.offered_key = Some(key.public_key.fingerprint(russh::keys::HashAlg::Sha256).to_string());
        Ok(self.authenticate(user, "publickey").await)
    }

    async fn auth_openssh_certificate(
        &mut self,
        user: &str,
        _cert: &Certificate,
    ) -> Result<Auth, Self::Error> {
        Ok(self.authenticate(user, "publickey-cert").await)
    }

    async fn auth_keyboard_interactive<'a>(
        &'a mut self,
        user: &str,
        _submethods: &str,
        _response: Option<server::Response<'a>>,
    ) -> Result<Auth, Self::Error> {
        Ok(self.authenticate(user, "keyboard-interactive").await)
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: ChannelOpenHandle,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let Ok(ctx) = self.ctx() else {
            reply.reject(ChannelOpenFailure::AdministrativelyProhibited).await;
            return Ok(());
        };
        let open = Instant::now();
        let up = match ctx.upstream.channel_open_session().await {
            Ok(up) => up,
            Err(e) => {
                reply
                    .reject(ChannelOpenFailure::Other {
                        code: 2,
                        reason: format!("warden: the upstream refused: {e}"),
                    })
                    .await;
                return Ok(());
            }
        };
        reply.accept().await;
        if !self.setup_logged && self.first.is_none() {
            self.first = Some(FirstChannel { open, opened: Instant::now() });
        }
        let id = channel.id();
        let state = ChanState::new(id, Kind::Pending);
        self.open_bridge(&ctx, channel, up, state, session);
        Ok(())
    }

    async fn channel_open_direct_tcpip(
        &mut self,
        channel: Channel<Msg>,
        host: &str,
        port: u32,
        originator: &str,
        originator_port: u32,
        reply: ChannelOpenHandle,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let Ok(ctx) = self.ctx() else {
            reply.reject(ChannelOpenFailure::AdministrativelyProhibited).await;
            return Ok(());
        };
        let what = format!("{host}:{port}");
        let allowed = if ctx.terms().forward {
            ctx.session.ask(&Ask::Forward { what: "direct-tcpip" }).map_err(|r| r.reason)
        } else {
            Err("port forwarding is not granted (the grant needs forward: true)".to_owned())
        };
        if let Err(reason) = allowed {
            self.refused("direct-tcpip", &what, &reason);
            reply.reject(ChannelOpenFailure::Other { code: 1, reason: format!("warden: {reason}") }).await;
            return Ok(());
        }
        match ctx.upstream.channel_open_direct_tcpip(host, port, originator, originator_port).await {
            Ok(up) => {
                reply.accept().await;
                let kind = Kind::Forward { remote: false, host: host.to_owned(), port, from: None };
                let state = ChanState::new(channel.id(), kind);
                self.open_bridge(&ctx, channel, up, state, session);
            }
            Err(e) => {
                reply
                    .reject(ChannelOpenFailure::Other {
                        code: 2,
                        reason: format!("warden: the upstream refused: {e}"),
                    })
                    .await;
            }
        }
        Ok(())
    }

    async fn channel_open_direct_streamlocal(
        &mut self,
        _channel: Channel<Msg>,
        socket_path: &str,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let reason = "unix socket forwarding is not supported through warden";
        self.refused("direct-streamlocal", socket_path, reason);
        reply.reject(ChannelOpenFailure::Other { code: 1, reason: format!("warden: {reason}") }).await;
        Ok(())
    }

    async fn channel_open_x11(
        &mut self,
        _channel: Channel<Msg>,
        originator: &str,
        _port: u32,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let reason = "X11 forwarding is not supported through warden";
        self.refused("x11", originator, reason);
        reply.reject(ChannelOpenFailure::Other { code: 1, reason: format!("warden: {reason}") }).await;
        Ok(())
    }

    async fn channel_open_forwarded_tcpip(
        &mut self,
        _channel: Channel<Msg>,
        host: &str,
        port: u32,
        _originator: &str,
        _originator_port: u32,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let reason = "a client cannot open forwarded-tcpip channels";
        self.refused("forwarded-tcpip", &format!("{host}:{port}"), reason);
        reply.reject(ChannelOpenFailure::AdministrativelyProhibited).await;
        Ok(())
    }

    async fn pty_request(
        &mut self,
        channel: ChannelId,
        term: &str,
        cols: u32,
        rows: u32,
        pix_width: u32,
        pix_height: u32,
        modes: &[(russh::Pty, u32)],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let Some(c) = self.chans.get(&channel) else { return session.channel_failure(channel) };
        if c.state.kind() != Kind::Pending {
            return session.channel_failure(channel);
        }
        c.state.set_pty(channel::Pty { term: term.to_owned(), cols, rows });
        let up = c.up.clone();
        let sent = up.request_pty(true, term, cols, rows, pix_width, pix_height, modes).await.is_ok();
        let ok = sent && self.upstream_reply(channel).await;
        Self::reply(session, channel, ok)
    }

    async fn env_request(
        &mut self,
        channel: ChannelId,
        name: &str,
        value: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        // Only the locale passes: other variables could change what an allowed command does.
        let locale = name == "LANG" || name.starts_with("LC_");
        match self.chans.get(&channel) {
            Some(c) if locale && c.state.kind() == Kind::Pending => {
                let _ = c.up.set_env(false, name, value).await;
                session.channel_success(channel)
            }
            _ => session.channel_failure(channel),
        }
    }

    async fn shell_request(&mut self, channel: ChannelId, session: &mut Session) -> Result<(), Self::Error> {
        let request = Instant::now();
        let ctx = self.ctx()?;
        let Some(c) = self.chans.get(&channel) else { return session.channel_failure(channel) };
        if c.state.kind() != Kind::Pending {
            return session.channel_failure(channel);
        }
        let allowed = if ctx.terms().access.includes(Access::Shell) {
            ctx.session.ask(&Ask::Shell).map_err(|r| r.reason)
        } else {
            Err(format!(
                "this grant ({}) does not allow an interactive shell; run a command instead",
                ctx.terms().access
            ))
        };
        if let Err(reason) = allowed {
            self.refused("shell", "", &reason);
            return self.refuse_run(channel, &reason, session).await;
        }
        let state = c.state.clone();
        let up = c.up.clone();
        state.set_kind(Kind::Shell);
        if let Err(e) = state.start_recording(&ctx, "shell") {
            tracing::error!(session = %ctx.session.id, error = %e, "cannot create the terminal recording");
            let reason = "warden cannot record this terminal, so it is not opened";
            state.set_kind(Kind::Refused);
            return self.refuse_run(channel, reason, session).await;
        }
        let ok = up.request_shell(true).await.is_ok() && self.upstream_reply(channel).await;
        self.setup_done(request, "shell");
        Self::reply(session, channel, ok)
    }

    async fn exec_request(
        &mut self,
        channel: ChannelId,
        data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let request = Instant::now();
        let ctx = self.ctx()?;
        let Some(c) = self.chans.get(&channel) else { return session.channel_failure(channel) };
        if c.state.kind() != Kind::Pending {
            return session.channel_failure(channel);
        }
        let state = c.state.clone();
        let up = c.up.clone();
        let command = String::from_utf8_lossy(data).into_owned();
        let decided = if std::str::from_utf8(data).is_err() {
            Err("the command is not UTF-8".to_owned())
        } else {
            Self::exec_decision(&ctx, &command)
        };
        if let Err(reason) = decided {
            ctx.record(
                ctx.session
                    .record("ssh.exec")
                    .field("channel", u32::from(channel))
                    .field("command", &command)
                    .field("decision", "refused")
                    .field("reason", &reason),
            );
            return self.refuse_run(channel, &reason, session).await;
        }
        state.set_kind(Kind::Exec { command: command.clone() });
        // A command with a terminal is interactive: record it like a shell.
        if state.pty().is_some()
            && let Err(e) = state.start_recording(&ctx, &command)
        {
            tracing::error!(session = %ctx.session.id, error = %e, "cannot create the terminal recording");
            state.set_kind(Kind::Refused);
            return self
                .refuse_run(channel, "warden cannot record this terminal, so it is not opened", session)
                .await;
        }
        let ok = up.exec(true, command.into_bytes()).await.is_ok() && self.upstream_reply(channel).await;
        self.setup_done(request, "exec");
        Self::reply(session, channel, ok)
    }

    async fn subsystem_request(
        &mut self,
        channel: ChannelId,
        name: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let request = Instant::now();
        let ctx = self.ctx()?;
        let Some(c) = self.chans.get(&channel) else { return session.channel_failure(channel) };
        if c.state.kind() != Kind::Pending {
            return session.channel_failure(channel);
        }
        let allowed = if name != "sftp" {
            Err(format!("subsystem {name:?} is not supported through warden"))
        } else if !ctx.terms().sftp {
            Err("sftp is not granted (the grant needs sftp: true)".to_owned())
        } else {
            ctx.session.ask(&Ask::Subsystem { name }).map_err(|r| r.reason)
        };
        if let Err(reason) = allowed {
            self.refused("subsystem", name, &reason);
            return self.refuse_run(channel, &reason, session).await;
        }
        let state = c.state.clone();
        let up = c.up.clone();
        state.set_kind(Kind::Subsystem { name: name.to_owned() });
        state.start_sftp();
        let ok = up.request_subsystem(true, name).await.is_ok() && self.upstream_reply(channel).await;
        self.setup_done(request, "subsystem");
        Self::reply(session, channel, ok)
    }

    async fn x11_request(
        &mut self,
        channel: ChannelId,
        _single: bool,
        _protocol: &str,
        _cookie: &str,
        _screen: u32,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.refused("x11-req", "", "X11 forwarding is not supported through warden");
        session.channel_failure(channel)
    }

    async fn agent_request(
        &mut self,
        _channel: ChannelId,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        // Russh replies failure for us.
        self.refused("auth-agent-req", "", "agent forwarding is not supported through warden");
        Ok(false)
    }

    async fn window_change_request(
        &mut self,
        channel: ChannelId,
        cols: u32,
        rows: u32,
        pix_width: u32,
        pix_height: u32,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if let (Some(c), Ok(ctx)) = (self.chans.get(&channel), self.ctx()) {
            c.state.resize(&ctx, cols, rows);
            let _ = c.up.window_change(cols, rows, pix_width, pix_height).await;
        }
        Ok(())
    }

    async fn signal(
        &mut self,
        channel: ChannelId,
        signal: russh::Sig,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if let Some(c) = self.chans.get(&channel) {
            let _ = c.up.signal(signal).await;
        }
        Ok(())
    }

    async fn tcpip_forward(
        &mut self,
        address: &str,
        port: &mut u32,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        let what = format!("{address}:{port}");
        let Ok(ctx) = self.ctx() else { return Ok(false) };
        let allowed = if ctx.terms().forward {
            ctx.session.ask(&Ask::Forward { what: "tcpip-forward" }).map_err(|r| r.reason)
        } else {
            Err("port forwarding is not granted (the grant needs forward: true)".to_owned())
        };
        if let Err(reason) = allowed {
            self.refused("tcpip-forward", &what, &reason);
            return Ok(false);
        }
        // The upstream listens; its connections come back as forwarded-tcpip channels (mod.rs relays
        // those for listeners asked for here only).
        ctx.listen_pending();
        let asked = tokio::time::timeout(REPLY_DEADLINE, ctx.upstream.tcpip_forward(address, *port)).await;
        let refusal = match asked {
            Ok(Ok(bound)) => {
                if *port == 0 {
                    *port = bound;
                }
                ctx.listen_done(address, Some(*port));
                return Ok(true);
            }
            Ok(Err(e)) => format!("the upstream refused: {e}"),
            Err(_) => "the upstream did not answer".to_owned(),
        };
        ctx.listen_done(address, None);
        self.refused("tcpip-forward", &what, &refusal);
        Ok(false)
    }

    async fn cancel_tcpip_forward(
        &mut self,
        address: &str,
        port: u32,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        let Ok(ctx) = self.ctx() else { return Ok(false) };
        if !ctx.unlisten(address, port) {
            return Ok(false);
        }
        let cancelled = ctx.upstream.cancel_tcpip_forward(address, port);
        Ok(matches!(tokio::time::timeout(REPLY_DEADLINE, cancelled).await, Ok(Ok(()))))
    }

    async fn streamlocal_forward(
        &mut self,
        socket_path: &str,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        self.refused(
            "streamlocal-forward",
            socket_path,
            "unix socket forwarding is not supported through warden",
        );
        Ok(false)
    }

    async fn channel_close(&mut self, channel: ChannelId, _session: &mut Session) -> Result<(), Self::Error> {
        self.chans.remove(&channel);
        Ok(())
    }
}

impl AgentHandler {
    /// Starts the bridge task for a newly opened channel and keeps the handler's side of it.
    fn open_bridge(
        &mut self,
        ctx: &Arc<Admitted>,
        channel: Channel<Msg>,
        up: Channel<russh::client::Msg>,
        state: Arc<ChanState>,
        session: &mut Session,
    ) {
        let id = channel.id();
        let (agent_read, agent_write) = channel.split();
        let (up_read, up_write) = up.split();
        let up_write = Arc::new(up_write);
        let (replies_tx, replies_rx) = mpsc::channel(8);
        self.chans.insert(id, Chan { state: state.clone(), up: up_write.clone(), replies: replies_rx });
        let ends = channel::Ends {
            agent_read,
            agent_write,
            agent_handle: session.handle(),
            up_read,
            up_write,
            replies: replies_tx,
        };
        ctx.tracker.spawn(channel::bridge(ctx.clone(), state, ends));
    }
}
