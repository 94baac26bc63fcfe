//! The metrics endpoint in-process: the real registry, the real audit writer counting into it, the
//! proxy's and gate's per-event calls, scraped over loopback HTTP and read back as the Prometheus text
//! format (and OpenMetrics text when asked for).

#[path = "support/prometheus_text.rs"]
mod prometheus_text;

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use warden::audit::{Audit, AuditOptions, Record};
use warden::metrics::{Metrics, RefusalKind, serve::Server};

async fn scrape(client: &reqwest::Client, url: &str, accept: Option<&str>) -> (u16, String, String) {
    let mut req = client.get(url);
    if let Some(a) = accept {
        req = req.header("accept", a);
    }
    let resp = req.send().await.expect("scrape");
    let status = resp.status().as_u16();
    let ctype = resp.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    (status, ctype, resp.text().await.expect("body"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_endpoint_serves_what_the_subsystems_counted() {
    let metrics = Arc::new(Metrics::new());
    let dir = tempfile::tempdir().unwrap();
    let stop = CancellationToken::new();
    let opts = AuditOptions::in_dir(dir.path()).with_metrics(metrics.clone());
    let (audit, _writer): (Audit, _) = Audit::start_with(&opts, CancellationToken::new()).unwrap();
    for i in 0..3 {
        audit.append_durable(Record::new("test.record").field("n", i)).await.unwrap();
    }

    // What the proxy and the kernel event loop report, one call per event.
    metrics.session_started("orders-db", "tcp");
    metrics.session_started("orders-db", "tcp");
    metrics.session_ended("orders-db", "tcp", "client_closed", Duration::from_millis(250), 100, 2000);
    metrics.refused(RefusalKind::Gate, "policy");
    metrics.refused(RefusalKind::Kernel, "connect");
    metrics.refused(RefusalKind::Kernel, "connect");
    metrics.token_fetched("research-bot", "ok", Duration::from_millis(40));
    metrics.token_fetched("research-bot", "idp_unreachable", Duration::from_secs(2));
    metrics.token_verified("research-bot", "ok");
    metrics.events_lost("rate_limited", 5);
    // And what the daemon samples at each scrape.
    metrics.set_sampler(Box::new(|m: &Metrics| {
        m.bpf_map("tags", 3);
        m.bpf_map("origins", 1);
        m.grants_live.set(2);
    }));

    let server = Server::bind("127.0.0.1:0", metrics.clone()).await.unwrap();
    let addr = server.local_addr().unwrap();
    tokio::spawn(server.run(stop.clone()));
    let client = reqwest::Client::new();
    let url = format!("http://{addr}/metrics");

    let (status, ctype, text) = scrape(&client, &url, None).await;
    assert_eq!(status, 200);
    assert!(ctype.starts_with("text/plain; version=0.0.4"), "{ctype}");
    let exp = prometheus_text::parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    let v = |name: &str, labels: &[(&str, &str)]| exp.value(name, labels);
    let session = [("target", "orders-db"), ("protocol", "tcp")];
    assert_eq!(
        v("warden_sessions_total", &[session[0], session[1], ("outcome", "client_closed")]),
        Some(1.0)
    );
    assert_eq!(v("warden_sessions_live", &session), Some(1.0));
    assert_eq!(v("warden_session_duration_seconds_count", &session), Some(1.0));
    assert_eq!(v("warden_session_duration_seconds_sum", &session), Some(0.25));
    assert_eq!(v("warden_session_bytes_total", &[("direction", "down")]), Some(2000.0));
    assert_eq!(v("warden_refusals_total", &[("kind", "kernel"), ("code", "connect")]), Some(2.0));
    assert_eq!(v("warden_refusals_total", &[("kind", "gate"), ("code", "policy")]), Some(1.0));
    assert_eq!(v("warden_token_fetches_total", &[("identity", "research-bot")]), Some(2.0));
    assert_eq!(v("warden_token_fetches_total", &[("outcome", "idp_unreachable")]), Some(1.0));
    assert_eq!(v("warden_token_fetch_duration_seconds_count", &[("identity", "research-bot")]), Some(2.0));
    assert_eq!(v("warden_token_verifications_total", &[("outcome", "ok")]), Some(1.0));
    assert_eq!(v("warden_events_lost_total", &[("cause", "rate_limited")]), Some(5.0));
    assert_eq!(v("warden_bpf_map_entries", &[("map", "tags")]), Some(3.0));
    assert_eq!(v("warden_grants_live", &[]), Some(2.0));
    // The real audit writer: audit.started plus three records at least, each batch fdatasync'd.
    assert!(v("warden_audit_records_total", &[]).unwrap() >= 3.0, "{text}");
    assert!(v("warden_audit_written_bytes_total", &[]).unwrap() > 0.0, "{text}");
    assert!(v("warden_audit_fsync_duration_seconds_count", &[]).unwrap() >= 3.0, "{text}");
    assert_eq!(exp.types["warden_sessions_total"], "counter");
    assert_eq!(exp.types["warden_session_duration_seconds"], "histogram");
    assert_eq!(exp.types["warden_bpf_map_entries"], "gauge");

    // A scraper asking for OpenMetrics gets it, complete with its end marker.
    let (status, ctype, text) =
        scrape(&client, &url, Some("application/openmetrics-text;version=1.0.0")).await;
    assert_eq!(status, 200);
    assert!(ctype.starts_with("application/openmetrics-text"), "{ctype}");
    let om = prometheus_text::parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert!(om.eof, "{text}");
    assert_eq!(om.value("warden_sessions_total", &[("outcome", "client_closed")]), Some(1.0));

    // Nothing else is served.
    let (status, _, _) = scrape(&client, &format!("http://{addr}/"), None).await;
    assert_eq!(status, 404);
    let resp = client.post(&url).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 405);
    stop.cancel();
}

#[tokio::test]
async fn a_bad_listen_address_names_the_key() {
    let err = Server::bind("localhost", Arc::new(Metrics::new())).await.err().unwrap();
    assert!(err.to_string().contains("metrics.listen"), "{err}");
}
