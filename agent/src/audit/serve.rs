//! The HTTPS pull endpoint for auditors (`[audit.serve]`): TLS with a client certificate REQUIRED and
//! verified against the auditor CA; `GET /v1/export?since=SEQ` streams the same JSON lines as
//! `warden audit export --since SEQ`. Anything else: 404 (unknown path) or 405 (another method).
//!
//! Asking for `since=N` confirms the auditor holds every record before N, so the export mark is raised to
//! `N - 1` (see the module docs of `audit`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use super::AuditError;
use super::files::{self, Bound};
use crate::config::AuditServeConfig;

/// At most this many auditor connections at once; more wait in the accept queue.
const MAX_CONNECTIONS: usize = 16;
/// A TLS handshake that takes longer than this is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A request's headers (the first, or the next on a kept-alive connection) must arrive within this.
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);

type Body = BoxBody<Bytes, std::io::Error>;

/// Serves until `shutdown`. Returns at once when `listen` is empty (the endpoint is off).
pub async fn run(
    config: &AuditServeConfig,
    audit_dir: PathBuf,
    shutdown: CancellationToken,
) -> Result<(), AuditError> {
    if config.listen.is_empty() {
        return Ok(());
    }
    Server::bind(config, audit_dir).await?.run(shutdown).await
}

/// A bound endpoint (so tests can learn the port before serving).
pub struct Server {
    listener: TcpListener,
    acceptor: TlsAcceptor,
    dir: Arc<PathBuf>,
}

impl Server {
    pub async fn bind(config: &AuditServeConfig, audit_dir: PathBuf) -> Result<Server, AuditError> {
        let addr: SocketAddr = config.listen.parse().map_err(|_| AuditError::Serve {
            reason: format!("audit.serve.listen `{}` is not an ip:port", config.listen),
        })?;
        let tls = tls_config(config)?;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| AuditError::Serve { reason: format!("cannot listen on {addr}: {e}") })?;
        Ok(Server { listener, acceptor: TlsAcceptor::from(Arc::new(tls)), dir: Arc::new(audit_dir) })
    }

    pub fn local_addr(&self) -> Result<SocketAddr, AuditError> {
        self.listener.local_addr().map_err(|e| AuditError::Serve { reason: e.to_string() })
    }

    pub async fn run(self, shutdown: CancellationToken) -> Result<(), AuditError> {
        let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        tracing::info!(addr = ?self.listener.local_addr().ok(), "audit endpoint listening");
        loop {
            let permit = tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                p = limit.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => return Ok(()),
                },
            };
            let (tcp, peer) = tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                accepted = self.listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "audit endpoint accept failed");
                        continue;
                    }
                },
            };
            let acceptor = self.acceptor.clone();
            let dir = self.dir.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        tracing::warn!(%peer, error = %e, "audit endpoint refused a TLS client");
                        return;
                    }
                    Err(_) => {
                        tracing::warn!(%peer, "audit endpoint TLS handshake timed out");
                        return;
                    }
                };
                let service = hyper::service::service_fn(move |req| {
                    let dir = dir.clone();
                    async move { Ok::<_, std::convert::Infallible>(handle(&req, &dir, peer)) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .serve_connection(TokioIo::new(tls), service);
                tokio::select! {
                    () = shutdown.cancelled() => {}
                    r = conn => if let Err(e) = r {
                        tracing::debug!(%peer, error = %e, "audit endpoint connection ended");
                    },
                }
            });
        }
    }
}

/// rustls server config: the host certificate, and client certificates required from the auditor CA.
pub fn tls_config(config: &AuditServeConfig) -> Result<rustls::ServerConfig, AuditError> {
    let bad = |path: &Path, what: &str, e: &dyn std::fmt::Display| AuditError::Serve {
        reason: format!("{}: {what}: {e}", path.display()),
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&config.cert_file)
        .and_then(Iterator::collect)
        .map_err(|e| bad(&config.cert_file, "cannot read the host certificate (PEM)", &e))?;
    if certs.is_empty() {
        return Err(bad(&config.cert_file, "no certificate", &"expected PEM CERTIFICATE blocks"));
    }
    let key = PrivateKeyDer::from_pem_file(&config.key_file)
        .map_err(|e| bad(&config.key_file, "cannot read the host private key (PEM)", &e))?;
    let mut roots = RootCertStore::empty();
    let cas: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&config.client_ca_file)
        .and_then(Iterator::collect)
        .map_err(|e| bad(&config.client_ca_file, "cannot read the auditor CA (PEM)", &e))?;
    for ca in cas {
        roots.add(ca).map_err(|e| bad(&config.client_ca_file, "not a usable CA certificate", &e))?;
    }
    if roots.is_empty() {
        return Err(bad(&config.client_ca_file, "no CA certificate", &"expected PEM CERTIFICATE blocks"));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| bad(&config.client_ca_file, "cannot build the client verifier", &e))?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| AuditError::Serve { reason: e.to_string() })?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(|e| bad(&config.cert_file, "the certificate and key do not form a usable pair", &e))?;
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tls)
}

fn plain(status: StatusCode, text: &str) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(format!("{text}\n"))).map_err(|e| match e {}).boxed());
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, header::HeaderValue::from_static("text/plain; charset=utf-8"));
    r
}

fn handle(req: &Request<Incoming>, dir: &Arc<PathBuf>, peer: SocketAddr) -> Response<Body> {
    if req.uri().path() != "/v1/export" {
        return plain(StatusCode::NOT_FOUND, "not found; the only resource is GET /v1/export?since=SEQ");
    }
    if req.method() != Method::GET {
        let mut r = plain(StatusCode::METHOD_NOT_ALLOWED, "only GET is allowed");
        r.headers_mut().insert(header::ALLOW, header::HeaderValue::from_static("GET"));
        return r;
    }
    let mut since = None;
    for pair in req.uri().query().unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("since", v)) => match v.parse::<u64>() {
                Ok(n) => since = Some(n),
                Err(_) => return plain(StatusCode::BAD_REQUEST, "since must be a sequence number"),
            },
            _ => {
                return plain(StatusCode::BAD_REQUEST, "unknown query parameter; only since=SEQ is accepted");
            }
        }
    }
    if let Some(n) = since
        && n > 0
        && let Err(e) = files::mark_exported(dir, n - 1)
    {
        tracing::warn!(error = %e, "cannot raise the audit export mark");
    }
    tracing::info!(%peer, since = since.unwrap_or(0), "auditor export");
    let (mut tx, body) = http_body_util::channel::Channel::<Bytes, std::io::Error>::new(4);
    let dir = dir.clone();
    let rt = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || {
        let bound = Bound::Seq(since.unwrap_or(0));
        let mut chunk = Vec::with_capacity(64 * 1024);
        let result = files::export_lines(&dir, Some(&bound), None, |line| {
            chunk.extend_from_slice(line);
            if chunk.len() >= 60 * 1024 {
                let data = Bytes::from(std::mem::take(&mut chunk));
                rt.block_on(tx.send_data(data))
                    .map_err(|_| std::io::Error::other("the auditor went away"))?;
            }
            Ok(())
        });
        match result {
            Ok(_) => {
                if !chunk.is_empty() {
                    let _ = rt.block_on(tx.send_data(Bytes::from(chunk)));
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "audit export stopped");
                tx.abort(std::io::Error::other(e.to_string()));
            }
        }
    });
    let mut r = Response::new(body.boxed());
    r.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/jsonl"));
    r
}
