//! Bridging one channel between the agent and the upstream: data both ways (counted, and recorded for
//! terminals), EOF and close in order, the upstream's exit status after all its output, request replies
//! handed back to the handler, and the channel's records when it closes (`ssh.exec`, `ssh.recording`,
//! `ssh.subsystem`, `ssh.forward`).

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use russh::{ChannelId, ChannelMsg, ChannelReadHalf, ChannelWriteHalf};
use tokio::sync::mpsc;

use super::record::Recording;
use super::sftp::{self, Sftp};
use super::{Admitted, signal_name};
use crate::protocol::End;

/// How long the upstream has to close its side once the agent has closed.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// What a channel turned out to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// Opened, no shell, exec or subsystem yet.
    Pending,
    Exec {
        command: String,
    },
    Shell,
    Subsystem {
        name: String,
    },
    /// Forwarding under a grant with `forward: true`: `-L`/`-W` (local, to `host:port` from the
    /// upstream), or a connection to a `-R` listener (remote, accepted on the upstream's `host:port`
    /// from `from`, relayed back to the agent).
    Forward {
        remote: bool,
        host: String,
        port: u32,
        from: Option<String>,
    },
    /// Its request was refused (recorded when refused).
    Refused,
}

/// The PTY the agent asked for.
#[derive(Debug, Clone)]
pub struct Pty {
    pub term: String,
    pub cols: u32,
    pub rows: u32,
}

#[derive(Debug)]
struct Inner {
    kind: Kind,
    pty: Option<Pty>,
    recording: Option<Recording>,
    /// The sftp parser of a granted sftp subsystem channel.
    sftp: Option<Box<Sftp>>,
    started: Instant,
    exit_status: Option<u32>,
    exit_signal: Option<String>,
    up: u64,
    down: u64,
}

/// One channel's state, shared by the handler (requests) and the bridge (data).
#[derive(Debug)]
pub struct ChanState {
    pub id: ChannelId,
    inner: Mutex<Inner>,
    /// The handler closed the agent's side itself (a refused request): the bridge must not close it again.
    agent_closed: std::sync::atomic::AtomicBool,
}

impl ChanState {
    pub fn new(id: ChannelId, kind: Kind) -> Arc<Self> {
        Arc::new(Self {
            id,
            inner: Mutex::new(Inner {
                kind,
                pty: None,
                recording: None,
                sftp: None,
                started: Instant::now(),
                exit_status: None,
                exit_signal: None,
                up: 0,
                down: 0,
            }),
            agent_closed: std::sync::atomic::AtomicBool::new(false),
        })
    }

    pub fn mark_agent_closed(&self) {
        self.agent_closed.store(true, Ordering::Release);
    }

    fn agent_closed(&self) -> bool {
        self.agent_closed.load(Ordering::Acquire)
    }

    fn with<R>(&self, f: impl FnOnce(&mut Inner) -> R) -> R {
        let mut g = self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut g)
    }

    pub fn kind(&self) -> Kind {
        self.with(|i| i.kind.clone())
    }

    /// Once set to a shell, exec, subsystem or refusal, a channel keeps it (one per channel).
    pub fn set_kind(&self, kind: Kind) {
        self.with(|i| {
            i.kind = kind;
            i.started = Instant::now();
        });
    }

    pub fn set_pty(&self, pty: Pty) {
        self.with(|i| i.pty = Some(pty));
    }

    pub fn pty(&self) -> Option<Pty> {
        self.with(|i| i.pty.clone())
    }

    /// Starts recording this channel's sftp file operations (`ssh.sftp`).
    pub fn start_sftp(&self) {
        self.with(|i| i.sftp = Some(Box::default()));
    }

    /// Feeds relayed sftp bytes to the parser, if any, and records the file operations completed.
    fn sftp(&self, ctx: &Admitted, dir: sftp::Dir, data: &[u8]) {
        let mut ops = Vec::new();
        self.with(|i| {
            if let Some(s) = i.sftp.as_mut() {
                s.feed(dir, data, &mut ops);
            }
        });
        self.record_sftp(ctx, ops);
    }

    fn record_sftp(&self, ctx: &Admitted, ops: Vec<sftp::Op>) {
        for op in ops {
            ctx.record(
                ctx.session
                    .record("ssh.sftp")
                    .field("channel", u32::from(self.id))
                    .field("op", op.op)
                    .field("path", &op.path)
                    .field("to", &op.to)
                    .field("mode", &op.mode)
                    .field("bytes_read", op.bytes_read)
                    .field("bytes_written", op.bytes_written)
                    .field("status", &op.status)
                    .field("duration_ms", op.duration_ms),
            );
        }
    }

    /// Starts the terminal recording for this channel.
    pub fn start_recording(&self, ctx: &Admitted, title: &str) -> std::io::Result<()> {
        let pty = self.pty();
        let size = pty.as_ref().map_or((80, 24), |p| (p.cols, p.rows));
        let rec = Recording::create(
            &ctx.audit_dir,
            &ctx.session.id,
            self.id.into(),
            size,
            pty.as_ref().map(|p| p.term.as_str()),
            title,
        )?;
        self.with(|i| i.recording = Some(rec));
        Ok(())
    }

    /// Runs `f` on the recording, if any; a failed write cuts the session (nothing goes unrecorded).
    fn record_io(&self, ctx: &Admitted, f: impl FnOnce(&mut Recording) -> std::io::Result<()>) {
        let failed = self.with(|i| match i.recording.as_mut() {
            Some(r) => f(r).err(),
            None => None,
        });
        if let Some(e) = failed {
            tracing::error!(session = %ctx.session.id, error = %e, "cannot write the terminal recording; ending the session");
            ctx.session.cut.cut(End::AuditUnavailable);
        }
    }

    pub fn resize(&self, ctx: &Admitted, cols: u32, rows: u32) {
        self.with(|i| {
            if let Some(p) = i.pty.as_mut() {
                p.cols = cols;
                p.rows = rows;
            }
        });
        self.record_io(ctx, |r| r.resize(cols, rows));
    }

    fn input(&self, ctx: &Admitted, data: &[u8]) {
        self.with(|i| i.up += data.len() as u64);
        ctx.session.counters.up.fetch_add(data.len() as u64, Ordering::Relaxed);
        self.record_io(ctx, |r| r.input(data));
    }

    fn output(&self, ctx: &Admitted, data: &[u8]) {
        self.with(|i| i.down += data.len() as u64);
        ctx.session.counters.down.fetch_add(data.len() as u64, Ordering::Relaxed);
        self.record_io(ctx, |r| r.output(data));
    }

    /// Writes this channel's closing records.
    fn finish(&self, ctx: &Admitted) {
        let mut ops = Vec::new();
        let sftp_state = self.with(|i| {
            i.sftp.take().map(|mut s| {
                s.finish(&mut ops);
                (s.unparsed, s.lost())
            })
        });
        self.record_sftp(ctx, ops);
        let (kind, recording, started, status, signal, up, down, pty) = self.with(|i| {
            (
                i.kind.clone(),
                i.recording.take(),
                i.started,
                i.exit_status,
                i.exit_signal.clone(),
                i.up,
                i.down,
                i.pty.is_some(),
            )
        });
        let duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let channel = u32::from(self.id);
        let s = &ctx.session;
        let exit = |r: crate::audit::Record| match (&status, &signal) {
            (Some(code), _) => r.field("exit_status", code),
            (None, Some(sig)) => r.field("exit_signal", sig),
            (None, None) => r.field("exit_status", Option::<u32>::None),
        };
        match &kind {
            Kind::Exec { command } => {
                let r = s
                    .record("ssh.exec")
                    .field("channel", channel)
                    .field("command", command)
                    .field("decision", "allowed")
                    .field("pty", pty);
                let r =
                    exit(r).field("bytes_up", up).field("bytes_down", down).field("duration_ms", duration_ms);
                ctx.record(r);
            }
            Kind::Subsystem { name } => {
                let mut r = s
                    .record("ssh.subsystem")
                    .field("channel", channel)
                    .field("name", name)
                    .field("bytes_up", up)
                    .field("bytes_down", down)
                    .field("duration_ms", duration_ms);
                if let Some((unparsed, lost)) = sftp_state {
                    r = r.field("sftp_unparsed", unparsed).field("sftp_lost", lost);
                }
                ctx.record(r);
            }
            Kind::Forward { remote, host, port, from } => {
                ctx.record(
                    s.record("ssh.forward")
                        .field("channel", channel)
                        .field("direction", if *remote { "remote" } else { "local" })
                        .field("to_host", host)
                        .field("to_port", port)
                        .field("from", from)
                        .field("bytes_up", up)
                        .field("bytes_down", down)
                        .field("duration_ms", duration_ms),
                );
            }
            Kind::Shell | Kind::Pending | Kind::Refused => {}
        }
        if let Some(rec) = recording {
            match rec.close() {
                Ok(c) => {
                    let mut r = s
                        .record("ssh.recording")
                        .field("channel", channel)
                        .field("kind", if matches!(kind, Kind::Shell) { "shell" } else { "exec" });
                    if let Kind::Exec { command } = &kind {
                        r = r.field("command", command);
                    }
                    let r = exit(r)
                        .field("file", &c.file)
                        .field("sha256", &c.sha256)
                        .field("bytes", c.bytes)
                        .field("duration_ms", c.duration_ms);
                    ctx.record(r);
                }
                Err(e) => {
                    tracing::error!(session = %s.id, error = %e, "cannot close the terminal recording");
                    s.cut.cut(End::AuditUnavailable);
                }
            }
        }
    }
}

/// The two ends of one bridged channel.
pub struct Ends {
    pub agent_read: ChannelReadHalf,
    pub agent_write: ChannelWriteHalf<russh::server::Msg>,
    pub agent_handle: russh::server::Handle,
    pub up_read: ChannelReadHalf,
    pub up_write: Arc<ChannelWriteHalf<russh::client::Msg>>,
    /// The upstream's replies to channel requests, for the handler waiting on them.
    pub replies: mpsc::Sender<bool>,
}

/// Bridges one channel until both sides have closed it (or the session ends), then writes its records.
pub async fn bridge(ctx: Arc<Admitted>, state: Arc<ChanState>, ends: Ends) {
    let Ends { mut agent_read, agent_write, agent_handle, mut up_read, up_write, replies } = ends;
    let id = state.id;
    let mut agent_open = true;
    let mut close_by: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            msg = agent_read.wait(), if agent_open => match msg {
                Some(ChannelMsg::Data { data }) => {
                    state.input(&ctx, &data);
                    state.sftp(&ctx, sftp::Dir::Up, &data);
                    if up_write.data_bytes(data).await.is_err() {
                        break;
                    }
                }
                Some(ChannelMsg::ExtendedData { data, ext }) => {
                    state.input(&ctx, &data);
                    if up_write.extended_data_bytes(ext, data).await.is_err() {
                        break;
                    }
                }
                Some(ChannelMsg::Eof) => {
                    let _ = up_write.eof().await;
                }
                Some(ChannelMsg::Close) | None => {
                    agent_open = false;
                    let _ = up_write.close().await;
                    // Russh drops the upstream's answering close once we closed: wait a little for a
                    // trailing exit status of a command that ran, not at all for one that never did.
                    if matches!(state.kind(), Kind::Pending | Kind::Refused) {
                        break;
                    }
                    close_by = Some(tokio::time::Instant::now() + CLOSE_WAIT);
                }
                // Requests are the handler's (it replies to them in order).
                Some(_) => {}
            },
            msg = up_read.wait() => {
                agent_open = agent_open && !state.agent_closed();
                match msg {
                Some(ChannelMsg::Data { data }) => {
                    state.output(&ctx, &data);
                    state.sftp(&ctx, sftp::Dir::Down, &data);
                    if agent_open && agent_write.data_bytes(data).await.is_err() {
                        agent_open = false;
                    }
                }
                Some(ChannelMsg::ExtendedData { data, ext }) => {
                    state.output(&ctx, &data);
                    if agent_open && agent_write.extended_data_bytes(ext, data).await.is_err() {
                        agent_open = false;
                    }
                }
                Some(ChannelMsg::ExitStatus { exit_status }) => {
                    state.with(|i| i.exit_status = Some(exit_status));
                    if agent_open {
                        let _ = agent_write.exit_status(exit_status).await;
                    }
                }
                Some(ChannelMsg::ExitSignal { signal_name: sig, core_dumped, error_message, lang_tag }) => {
                    state.with(|i| i.exit_signal = Some(signal_name(&sig)));
                    if agent_open {
                        let _ = agent_handle.exit_signal_request(id, sig, core_dumped, error_message, lang_tag).await;
                    }
                }
                Some(ChannelMsg::Eof) => {
                    if agent_open {
                        let _ = agent_write.eof().await;
                    }
                }
                Some(ChannelMsg::Close) | None => {
                    if agent_open {
                        let _ = agent_write.close().await;
                    }
                    break;
                }
                Some(ChannelMsg::Success) => {
                    let _ = replies.try_send(true);
                }
                Some(ChannelMsg::Failure) => {
                    let _ = replies.try_send(false);
                }
                Some(_) => {}
            }},
            () = async {
                match close_by {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            } => break,
        }
    }
    state.finish(&ctx);
}
