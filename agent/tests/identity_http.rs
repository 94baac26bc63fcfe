//! The identity module's HTTP bounds against misbehaving providers on loopback: a provider that accepts
//! and never answers is given up on within the timeout, and oversized answers are refused unread.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use warden::audit::Record;
use warden::config::IdentityConfig;
use warden::identity::{Identities, Settings};

/// Answers each request by path with `route`; `None` means accept, read, and never answer.
async fn serve(route: fn(&str, &str) -> Option<String>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let issuer = format!("http://{addr}/oauth2/default");
    let base = issuer.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { return };
            let base = base.clone();
            tokio::spawn(async move { answer(stream, &base, route).await });
        }
    });
    issuer
}

async fn answer(mut stream: TcpStream, issuer: &str, route: fn(&str, &str) -> Option<String>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        let Ok(n) = stream.read(&mut chunk).await else { return };
        if n == 0 {
            return;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let length = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap_or(0))
        })
        .unwrap_or(0usize);
    while buf.len() < head_end + length {
        let Ok(n) = stream.read(&mut chunk).await else { return };
        if n == 0 {
            return;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let path = head.split_whitespace().nth(1).unwrap_or("/").to_owned();
    let Some(body) = route(issuer, &path) else {
        // Hold the connection open without answering until the client gives up.
        let _ = stream.read(&mut chunk).await;
        return;
    };
    let response = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
}

fn discovery(issuer: &str) -> String {
    serde_json::json!({
        "issuer": issuer, "token_endpoint": format!("{issuer}/v1/token"), "jwks_uri": format!("{issuer}/v1/keys"),
    })
    .to_string()
}

/// An unsigned-looking token of about `size` bytes (its signature is never checked in these tests).
fn token(size: usize) -> String {
    let header = URL_SAFE_NO_PAD.encode(r#"{"alg":"RS256","kid":"k1"}"#);
    let payload = URL_SAFE_NO_PAD.encode(format!(r#"{{"pad":"{}"}}"#, "x".repeat(size)));
    format!("{header}.{payload}.c2ln")
}

struct Fixture {
    identities: Identities,
    records: Arc<Mutex<Vec<Record>>>,
    _dir: tempfile::TempDir,
}

fn fixture(issuer: &str) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "s3cret\n").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let config = IdentityConfig {
        issuer: issuer.into(),
        client_id: "0oa-bot".into(),
        private_key_file: None,
        private_key_alg: None,
        private_key_id: None,
        client_secret_file: Some(secret),
        token_endpoint_auth_method: None,
        scopes: vec!["warden.connect".into()],
        audience: "api://warden".into(),
        groups_claim: "groups".into(),
        groups: Vec::new(),
    };
    let configs = BTreeMap::from([("bot".to_owned(), config)]);
    let records = Arc::new(Mutex::new(Vec::new()));
    let sink = records.clone();
    let settings = Settings {
        http_timeout: Duration::from_millis(500),
        connect_timeout: Duration::from_millis(500),
        tries: 2,
        retry_backoff: Duration::from_millis(10),
        ..Settings::default()
    };
    let identities = Identities::builder(&configs)
        .settings(settings)
        .record_sink(Arc::new(move |r| sink.lock().unwrap().push(r)))
        .build()
        .unwrap();
    Fixture { identities, records, _dir: dir }
}

#[tokio::test]
async fn a_provider_that_never_answers_is_given_up_on_within_the_timeout() {
    let issuer = serve(|_, _| None).await;
    let f = fixture(&issuer);
    let started = tokio::time::Instant::now();
    let err = f.identities.verified("bot").await.unwrap_err();
    assert_eq!(err.reason(), "idp_unreachable");
    assert!(err.to_string().contains("timed out"), "{err}");
    // Two tries of 500 ms each and a 10 ms pause.
    assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
    let records = f.records.lock().unwrap();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].event, "idp.unreachable");
}

#[tokio::test]
async fn an_oversized_token_is_refused_unparsed() {
    let issuer = serve(|issuer, path| {
        Some(if path.ends_with("/openid-configuration") {
            discovery(issuer)
        } else {
            serde_json::json!({ "access_token": token(20 * 1024), "token_type": "Bearer" }).to_string()
        })
    })
    .await;
    let f = fixture(&issuer);
    let err = f.identities.verified("bot").await.unwrap_err();
    assert_eq!(err.reason(), "too_large");
    let records = f.records.lock().unwrap();
    assert_eq!(records[0].event, "token.rejected");
    assert_eq!(records[0].fields["reason"], "too_large");
}

#[tokio::test]
async fn an_oversized_jwks_is_refused() {
    let issuer = serve(|issuer, path| {
        Some(if path.ends_with("/openid-configuration") {
            discovery(issuer)
        } else if path.ends_with("/v1/token") {
            serde_json::json!({ "access_token": token(10), "token_type": "Bearer" }).to_string()
        } else {
            format!(r#"{{"keys":[],"pad":"{}"}}"#, "x".repeat(300 * 1024))
        })
    })
    .await;
    let f = fixture(&issuer);
    let err = f.identities.verified("bot").await.unwrap_err();
    assert_eq!(err.reason(), "idp_unreachable");
    assert!(err.to_string().contains("response larger than 262144 bytes"), "{err}");
}
