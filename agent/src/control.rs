//! The control socket: a Unix socket (mode 0600, and peers must be uid 0) speaking one JSON request and
//! one JSON response per line; the daemon's side (`serve`) and the CLI's (`request`, `client_cli`).
//! The request and response types are a boundary of their own: changing them changes the CLI contract.

use std::fmt::Write as _;
use std::io::{BufRead as _, BufReader, Write as _};
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _};
use tokio_util::sync::CancellationToken;

use crate::cli::{
    Command, EXIT_FAILED, EXIT_INVALID, EXIT_NOPERM, EXIT_UNAVAILABLE, GrantAction, SessionAction,
};

/// Longest request line accepted.
const MAX_REQUEST: usize = 64 * 1024;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    Status,
    Tag {
        cgroup: String,
        identity: String,
        task: Option<String>,
    },
    Untag {
        cgroup: String,
    },
    Sessions,
    KillSession {
        id: String,
    },
    Grants,
    GrantIssue {
        identity: String,
        target: String,
        cgroup: String,
        access: Option<String>,
    },
    GrantApprove {
        id: String,
    },
    GrantRevoke {
        id: String,
    },
    /// Ask the daemon to exit (used by `warden uninstall`).
    Stop,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default)]
    pub data: Value,
}

/// An error the daemon reports for one request.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

/// What answers requests: the daemon.
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, request: Request) -> impl Future<Output = Result<Value, Refused>> + Send;
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("control socket {path}: {source}")]
    Bind {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Serves the control socket until `shutdown`.
pub async fn serve<H: Handler>(
    path: &Path,
    handler: Arc<H>,
    shutdown: CancellationToken,
) -> Result<(), ControlError> {
    let bind_err = |source| ControlError::Bind { path: path.to_path_buf(), source };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(bind_err)?;
    }
    let _ = std::fs::remove_file(path);
    let listener = tokio::net::UnixListener::bind(path).map_err(bind_err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(bind_err)?;
    loop {
        let stream = tokio::select! {
            () = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "control socket accept failed");
                    continue;
                }
            },
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            if let Err(e) = connection(stream, handler).await {
                tracing::debug!(error = %e, "control connection ended");
            }
        });
    }
    let _ = std::fs::remove_file(path);
    Ok(())
}

async fn connection<H: Handler>(stream: tokio::net::UnixStream, handler: Arc<H>) -> std::io::Result<()> {
    let root = stream.peer_cred().is_ok_and(|c| c.uid() == 0);
    let (r, mut w) = stream.into_split();
    let mut lines = tokio::io::BufReader::new(r.take(MAX_REQUEST as u64)).lines();
    let Some(line) =
        tokio::time::timeout(Duration::from_secs(10), lines.next_line()).await.ok().transpose()?.flatten()
    else {
        return Ok(());
    };
    let response = if root {
        match serde_json::from_str::<Request>(&line) {
            Ok(req) => match handler.handle(req).await {
                Ok(data) => Response { ok: true, error: None, data },
                Err(e) => Response { ok: false, error: Some(e.0), data: Value::Null },
            },
            Err(e) => Response { ok: false, error: Some(format!("bad request: {e}")), data: Value::Null },
        }
    } else {
        Response {
            ok: false,
            error: Some("permission denied: the control socket is for root".into()),
            data: Value::Null,
        }
    };
    let mut out = serde_json::to_vec(&response).unwrap_or_default();
    out.push(b'\n');
    w.write_all(&out).await?;
    w.shutdown().await
}

use tokio::io::AsyncReadExt as _;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("the warden daemon is not reachable at {path} ({source}); is `warden run` up?")]
    Unavailable {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("permission denied on {path}; run as root")]
    Permission { path: std::path::PathBuf },
    #[error("{0}")]
    Refused(String),
    #[error("bad response from the daemon: {0}")]
    Protocol(String),
}

impl ClientError {
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Unavailable { .. } => EXIT_UNAVAILABLE,
            Self::Permission { .. } => EXIT_NOPERM,
            Self::Refused(_) | Self::Protocol(_) => EXIT_FAILED,
        }
    }
}

/// Sends one request and waits for its answer (synchronous: the CLI stays single-threaded, which
/// `warden exec` relies on before it forks).
pub fn request(path: &Path, request: &Request) -> Result<Value, ClientError> {
    let mut stream = std::os::unix::net::UnixStream::connect(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::PermissionDenied {
            ClientError::Permission { path: path.to_path_buf() }
        } else {
            ClientError::Unavailable { path: path.to_path_buf(), source }
        }
    })?;
    let _ = stream.set_read_timeout(Some(Duration::from_secs(120)));
    let mut line = serde_json::to_vec(request).map_err(|e| ClientError::Protocol(e.to_string()))?;
    line.push(b'\n');
    stream.write_all(&line).map_err(|e| ClientError::Protocol(e.to_string()))?;
    let mut answer = String::new();
    BufReader::new(stream).read_line(&mut answer).map_err(|e| ClientError::Protocol(e.to_string()))?;
    let response: Response =
        serde_json::from_str(&answer).map_err(|e| ClientError::Protocol(e.to_string()))?;
    if response.ok {
        Ok(response.data)
    } else {
        let msg = response.error.unwrap_or_default();
        if msg.starts_with("permission denied") {
            return Err(ClientError::Permission { path: path.to_path_buf() });
        }
        Err(ClientError::Refused(msg))
    }
}

/// Asks a running daemon to exit and waits (bounded) for its socket to go away.
pub fn stop_daemon(path: &Path) {
    if request(path, &Request::Stop).is_ok() {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::os::unix::net::UnixStream::connect(path).is_ok() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The CLI commands that talk to the daemon.
pub fn client_cli(command: Command) -> u8 {
    let (config, req, json, render): (_, _, bool, fn(&Value) -> String) = match command {
        Command::Tag { cgroup, identity, config } => {
            (config, Request::Tag { cgroup, identity, task: None }, false, |_| "tagged".into())
        }
        Command::Untag { cgroup, config } => {
            (config, Request::Untag { cgroup }, false, |_| "untagged".into())
        }
        Command::Sessions { action: Some(SessionAction::Kill { id, config }), .. } => {
            (config, Request::KillSession { id }, false, |_| "killed".into())
        }
        Command::Sessions { action: None, json, config } => {
            (config, Request::Sessions, json.json, sessions_table)
        }
        Command::Grants { json, config } => (config, Request::Grants, json.json, grants_table),
        Command::Grant { action } => match action {
            GrantAction::Issue { identity, target, cgroup, access, json, config } => {
                (config, Request::GrantIssue { identity, target, cgroup, access }, json.json, json_record)
            }
            GrantAction::Approve { id, config } => (config, Request::GrantApprove { id }, false, json_record),
            GrantAction::Revoke { id, config } => (config, Request::GrantRevoke { id }, false, json_record),
        },
        Command::Status { json, config } => (config, Request::Status, json.json, status_text),
        other => {
            return crate::cli::fail(EXIT_INVALID, &format!("{other:?} does not use the control socket"));
        }
    };
    let socket = match crate::config::Config::load(&config.config) {
        Ok(c) => c.agent.control_socket,
        Err(e) => return crate::cli::fail(EXIT_INVALID, &e),
    };
    match request(&socket, &req) {
        Ok(data) => {
            if json {
                println!("{}", serde_json::to_string_pretty(&data).unwrap_or_default());
            } else {
                println!("{}", render(&data));
            }
            0
        }
        Err(e) => crate::cli::fail(e.exit_code(), &e),
    }
}

fn sessions_table(data: &Value) -> String {
    let rows = data.as_array().cloned().unwrap_or_default();
    let mut out = format!(
        "{:<34} {:<8} {:<20} {:<16} {:<22} {:>10} {:>10}  {}\n",
        "SESSION", "PID", "IDENTITY", "TARGET", "DST", "UP", "DOWN", "CGROUP"
    );
    for r in &rows {
        let s = |k: &str| {
            r.get(k).map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_owned)).unwrap_or_default()
        };
        let _ = writeln!(
            out,
            "{:<34} {:<8} {:<20} {:<16} {:<22} {:>10} {:>10}  {}",
            s("session"),
            s("pid"),
            s("identity"),
            s("target"),
            s("dst"),
            s("bytes_up"),
            s("bytes_down"),
            s("cgroup")
        );
    }
    if rows.is_empty() {
        out.push_str("(no live sessions)\n");
    }
    out.trim_end().to_owned()
}

fn status_text(data: &Value) -> String {
    crate::daemon::status::render(data)
}

fn grants_table(data: &Value) -> String {
    match serde_json::from_value::<Vec<crate::grants::GrantView>>(data.clone()) {
        Ok(views) => crate::grants::table(&views).trim_end().to_owned(),
        Err(_) => json_table(data),
    }
}

/// A table of an array of flat JSON objects; columns are the first object's keys.
fn json_table(data: &Value) -> String {
    let rows = data.as_array().cloned().unwrap_or_default();
    let Some(Value::Object(first)) = rows.first() else { return "(none)".into() };
    let cols: Vec<String> = first.keys().cloned().collect();
    let cell = |r: &Value, c: &str| match r.get(c) {
        None | Some(Value::Null) => "-".to_owned(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_owned))
            .collect::<Vec<_>>()
            .join(","),
        Some(v) => v.to_string(),
    };
    let widths: Vec<usize> = cols
        .iter()
        .map(|c| rows.iter().map(|r| cell(r, c).len()).chain([c.len()]).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    let line = |vals: Vec<String>| {
        vals.iter()
            .zip(&widths)
            .map(|(v, w)| format!("{v:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_owned()
    };
    out.push_str(&line(cols.iter().map(|c| c.to_uppercase()).collect()));
    for r in &rows {
        out.push('\n');
        out.push_str(&line(cols.iter().map(|c| cell(r, c)).collect()));
    }
    out
}

/// One JSON object as `key: value` lines.
fn json_record(data: &Value) -> String {
    match data {
        Value::Object(m) => m
            .iter()
            .map(|(k, v)| format!("{k}: {}", v.as_str().map_or_else(|| v.to_string(), str::to_owned)))
            .collect::<Vec<_>>()
            .join("\n"),
        other => other.to_string(),
    }
}
