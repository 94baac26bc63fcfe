//! The Prometheus endpoint (`[metrics] listen`, off by default): plain HTTP/1.1, `GET /metrics` answers the
//! Prometheus text format (0.0.4), or OpenMetrics text when the scraper asks for it in `Accept`. Anything
//! else: 404 (unknown path) or 405 (another method). Bind it to loopback or a management network: it
//! carries no secret, but target and identity names.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::Metrics;

/// At most this many scrapers at once; more wait in the accept queue.
const MAX_CONNECTIONS: usize = 8;
/// A request's headers must arrive within this.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

const PROMETHEUS_TEXT: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;
const OPENMETRICS_TEXT: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("metrics.listen `{listen}` is not an ip:port (e.g. 127.0.0.1:9464)")]
    BadAddress { listen: String },
    #[error("cannot listen on {addr} for metrics: {source}; choose a free port in [metrics] listen")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// A bound endpoint (so tests can learn the port before serving).
pub struct Server {
    listener: TcpListener,
    metrics: Arc<Metrics>,
}

impl Server {
    pub async fn bind(listen: &str, metrics: Arc<Metrics>) -> Result<Self, MetricsError> {
        let addr: SocketAddr =
            listen.parse().map_err(|_| MetricsError::BadAddress { listen: listen.to_owned() })?;
        let listener = TcpListener::bind(addr).await.map_err(|source| MetricsError::Bind { addr, source })?;
        Ok(Self { listener, metrics })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        tracing::info!(addr = ?self.listener.local_addr().ok(), "metrics endpoint listening");
        loop {
            let permit = tokio::select! {
                () = shutdown.cancelled() => return,
                p = limit.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => return,
                },
            };
            let (tcp, peer) = tokio::select! {
                () = shutdown.cancelled() => return,
                accepted = self.listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "metrics endpoint accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let metrics = self.metrics.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let service = hyper::service::service_fn(move |req| {
                    let metrics = metrics.clone();
                    async move { Ok::<_, std::convert::Infallible>(handle(&req, metrics).await) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .serve_connection(TokioIo::new(tcp), service);
                tokio::select! {
                    () = shutdown.cancelled() => {}
                    r = conn => if let Err(e) = r {
                        tracing::debug!(%peer, error = %e, "metrics connection ended");
                    },
                }
            });
        }
    }
}

/// Serves `metrics` on `listen` until `shutdown`; logs why when it cannot.
pub async fn run(listen: String, metrics: Arc<Metrics>, shutdown: CancellationToken) {
    match Server::bind(&listen, metrics).await {
        Ok(server) => server.run(shutdown).await,
        Err(e) => tracing::error!(error = %e, "metrics endpoint not started"),
    }
}

fn respond(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static(content_type));
    r
}

async fn handle<B>(req: &Request<B>, metrics: Arc<Metrics>) -> Response<Full<Bytes>> {
    const PLAIN: &str = "text/plain; charset=utf-8";
    if req.uri().path() != "/metrics" {
        return respond(StatusCode::NOT_FOUND, PLAIN, "not found; metrics are at GET /metrics\n".into());
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = respond(StatusCode::METHOD_NOT_ALLOWED, PLAIN, "only GET is allowed\n".into());
        r.headers_mut().insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    let openmetrics = req
        .headers()
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("application/openmetrics-text"));
    // The sampler reads kernel maps (system calls): off the async workers.
    match tokio::task::spawn_blocking(move || metrics.encode(openmetrics)).await {
        Ok(text) => {
            respond(StatusCode::OK, if openmetrics { OPENMETRICS_TEXT } else { PROMETHEUS_TEXT }, text)
        }
        Err(e) => respond(StatusCode::INTERNAL_SERVER_ERROR, PLAIN, format!("cannot encode metrics: {e}\n")),
    }
}
