//! The control socket: a Unix socket (mode 0600, and peers must be uid 0) speaking one JSON request and
//! one JSON response per line; the daemon's side (`serve`) and the client's (`request`, `stop_daemon`).
//! The request and response types are a boundary of their own: changing them changes the CLI contract.

use std::io::{BufRead as _, BufReader, Write as _};
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _};
use tokio_util::sync::CancellationToken;

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
