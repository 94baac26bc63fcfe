//! Talking to the identity provider: discovery, the client-credentials grant and the JWKS, over a
//! transport that bounds every call's time and response size. `Issuer` caches what one issuer publishes.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::Value;
use tokio::time::Instant;

use super::Settings;
use super::files::Secret;
use super::verify::{KeySet, Rejected, printable};
use super::{Clock, Rejection};

pub(crate) type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// One HTTP request to the provider. Not `Debug`: a token request carries the client's credentials.
pub(crate) enum Request {
    Get { url: String },
    PostForm { url: String, authorization: Option<Secret>, body: Secret },
}

impl Request {
    pub(crate) fn url(&self) -> &str {
        match self {
            Self::Get { url } | Self::PostForm { url, .. } => url,
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Response {
    pub status: u16,
    pub cache_control: Option<String>,
    pub body: Vec<u8>,
}

/// Sends one request; the error is a description fit for a record (it never includes the request body).
pub(crate) trait Transport: Send + Sync {
    fn send(&self, request: Request, limit: usize) -> BoxFuture<'_, Result<Response, String>>;
}

/// The real transport: reqwest on rustls (ring) with the system's roots, no redirects, no proxies.
pub(crate) struct HttpTransport {
    client: reqwest::Client,
}

impl HttpTransport {
    pub(crate) fn new(settings: &Settings) -> Result<Self, String> {
        let client = reqwest::Client::builder()
            .timeout(settings.http_timeout)
            .connect_timeout(settings.connect_timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("warden/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| chain(&e))?;
        Ok(Self { client })
    }
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

impl Transport for HttpTransport {
    fn send(&self, request: Request, limit: usize) -> BoxFuture<'_, Result<Response, String>> {
        Box::pin(async move {
            let url = request.url().to_owned();
            let builder = match request {
                Request::Get { url } => self.client.get(url),
                Request::PostForm { url: target, authorization, body } => {
                    let mut b = self
                        .client
                        .post(target)
                        .header(reqwest::header::CONTENT_TYPE, "application/x-www-form-urlencoded")
                        .body(body.expose().to_owned());
                    if let Some(auth) = authorization {
                        let mut value = reqwest::header::HeaderValue::from_str(auth.expose())
                            .map_err(|_| format!("{url}: the client credentials do not fit in a header"))?;
                        // Kept out of any debug output of the HTTP stack.
                        value.set_sensitive(true);
                        b = b.header(reqwest::header::AUTHORIZATION, value);
                    }
                    b
                }
            }
            .header(reqwest::header::ACCEPT, "application/json");
            let describe = |e: reqwest::Error| {
                if e.is_timeout() {
                    format!("{url}: timed out")
                } else {
                    format!("{url}: {}", chain(&e.without_url()))
                }
            };
            let mut response = builder.send().await.map_err(describe)?;
            let status = response.status().as_u16();
            let cache_control = response
                .headers()
                .get(reqwest::header::CACHE_CONTROL)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let mut body = Vec::new();
            while let Some(chunk) = response.chunk().await.map_err(describe)? {
                if body.len() + chunk.len() > limit {
                    return Err(format!("{url}: response larger than {limit} bytes"));
                }
                body.extend_from_slice(&chunk);
            }
            Ok(Response { status, cache_control, body })
        })
    }
}

/// Why talking to the provider failed.
#[derive(Debug, Clone)]
pub(crate) enum IdpFailure {
    /// Network, timeout, 5xx or 429: worth retrying.
    Unreachable(String),
    /// The provider answered, but with metadata or keys Warden cannot use.
    BadDiscovery(String),
    /// The token endpoint refused the client (4xx): retrying will not help.
    Refused { status: u16, error: String },
    /// The token endpoint's answer is not a usable bearer token.
    Rejected(Rejected),
}

/// `http` is accepted only for loopback hosts (test providers); everything else must be `https`.
pub(crate) fn check_url(url: &str) -> Result<reqwest::Url, String> {
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("`{}` is not a URL: {e}", printable(url)))?;
    let host = parsed.host_str().unwrap_or("");
    let loopback = host == "localhost"
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    match parsed.scheme() {
        "https" if parsed.host().is_some() => Ok(parsed),
        "http" if loopback => Ok(parsed),
        _ => {
            Err(format!("`{}` must be https (plain http only for a loopback test provider)", printable(url)))
        }
    }
}

/// What discovery tells us about an issuer.
#[derive(Debug, Clone)]
pub(crate) struct Metadata {
    pub token_endpoint: String,
    pub jwks_uri: String,
}

const DISCOVERY_LIMIT: usize = 64 * 1024;
const TOKEN_RESPONSE_LIMIT: usize = 64 * 1024;
pub(crate) const JWKS_LIMIT: usize = 256 * 1024;

fn retryable(status: u16) -> bool {
    status == 429 || status >= 500
}

async fn discover(transport: &dyn Transport, issuer: &str) -> Result<Metadata, IdpFailure> {
    let base = issuer.trim_end_matches('/');
    let mut tried = Vec::new();
    for suffix in ["/.well-known/openid-configuration", "/.well-known/oauth-authorization-server"] {
        let url = format!("{base}{suffix}");
        let response = transport
            .send(Request::Get { url: url.clone() }, DISCOVERY_LIMIT)
            .await
            .map_err(IdpFailure::Unreachable)?;
        match response.status {
            200 => return parse_metadata(issuer, &url, &response.body),
            s if retryable(s) => return Err(IdpFailure::Unreachable(format!("{url} answered HTTP {s}"))),
            s => tried.push(format!("{url} answered HTTP {s}")),
        }
    }
    Err(IdpFailure::BadDiscovery(format!("no discovery document: {}", tried.join("; "))))
}

fn parse_metadata(issuer: &str, url: &str, body: &[u8]) -> Result<Metadata, IdpFailure> {
    let bad = |m: String| IdpFailure::BadDiscovery(format!("{url}: {m}"));
    let doc: Value = serde_json::from_slice(body).map_err(|e| bad(format!("not JSON: {e}")))?;
    let field = |name: &str| doc.get(name).and_then(Value::as_str).ok_or_else(|| bad(format!("no `{name}`")));
    let published = field("issuer")?;
    if published != issuer {
        return Err(bad(format!(
            "it names issuer `{}`, not the configured `{issuer}`; set issuer to exactly what the provider publishes",
            printable(published)
        )));
    }
    let token_endpoint = field("token_endpoint")?;
    let jwks_uri = field("jwks_uri")?;
    check_url(token_endpoint).map_err(|m| bad(format!("token_endpoint {m}")))?;
    check_url(jwks_uri).map_err(|m| bad(format!("jwks_uri {m}")))?;
    Ok(Metadata { token_endpoint: token_endpoint.to_owned(), jwks_uri: jwks_uri.to_owned() })
}

/// How the client proves itself at the token endpoint.
pub(crate) enum ClientAuth {
    PrivateKeyJwt { key: EncodingKey, alg: Algorithm, kid: Option<String> },
    SecretBasic(Secret),
    SecretPost(Secret),
}

impl std::fmt::Debug for ClientAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::PrivateKeyJwt { .. } => "private_key_jwt",
            Self::SecretBasic(_) => "client_secret_basic",
            Self::SecretPost(_) => "client_secret_post",
        })
    }
}

/// Lifetime of a `private_key_jwt` assertion.
const ASSERTION_TTL: Duration = Duration::from_mins(1);

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn random_id() -> Result<String, String> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).map_err(|e| format!("no randomness for the assertion's jti: {e}"))?;
    Ok(hex::encode(bytes))
}

/// The signed client assertion: `iss` = `sub` = client id, `aud` = the token endpoint, short `exp`, unique `jti`.
pub(crate) fn client_assertion(
    client_id: &str,
    token_endpoint: &str,
    key: &EncodingKey,
    alg: Algorithm,
    kid: Option<&str>,
    now: SystemTime,
) -> Result<String, String> {
    let mut header = Header::new(alg);
    header.typ = Some("JWT".into());
    header.kid = kid.map(str::to_owned);
    let iat = unix(now);
    let claims = serde_json::json!({
        "iss": client_id,
        "sub": client_id,
        "aud": token_endpoint,
        "iat": iat,
        "exp": iat + ASSERTION_TTL.as_secs(),
        "jti": random_id()?,
    });
    jsonwebtoken::encode(&header, &claims, key).map_err(|e| format!("cannot sign the client assertion: {e}"))
}

/// The token request: the form body and, for `client_secret_basic`, the Authorization header.
fn token_request(
    token_endpoint: &str,
    client_id: &str,
    auth: &ClientAuth,
    scopes: &[String],
    now: SystemTime,
) -> Result<Request, IdpFailure> {
    let mut form = form_urlencoded::Serializer::new(String::new());
    form.append_pair("grant_type", "client_credentials");
    if !scopes.is_empty() {
        form.append_pair("scope", &scopes.join(" "));
    }
    let mut authorization = None;
    match auth {
        ClientAuth::PrivateKeyJwt { key, alg, kid } => {
            let assertion = client_assertion(client_id, token_endpoint, key, *alg, kid.as_deref(), now)
                .map_err(IdpFailure::BadDiscovery)?;
            form.append_pair("client_id", client_id);
            form.append_pair(
                "client_assertion_type",
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            );
            form.append_pair("client_assertion", &assertion);
        }
        ClientAuth::SecretBasic(secret) => {
            // RFC 6749 2.3.1: both parts form-urlencoded before base64.
            let enc = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
            let pair = format!("{}:{}", enc(client_id), enc(secret.expose()));
            authorization = Some(Secret::new(format!("Basic {}", STANDARD.encode(pair))));
        }
        ClientAuth::SecretPost(secret) => {
            form.append_pair("client_id", client_id);
            form.append_pair("client_secret", secret.expose());
        }
    }
    Ok(Request::PostForm { url: token_endpoint.to_owned(), authorization, body: Secret::new(form.finish()) })
}

/// One client-credentials request. The access token comes back wrapped, so it cannot be printed by accident.
pub(crate) async fn request_token(
    transport: &dyn Transport,
    token_endpoint: &str,
    client_id: &str,
    auth: &ClientAuth,
    scopes: &[String],
    now: SystemTime,
) -> Result<Secret, IdpFailure> {
    let request = token_request(token_endpoint, client_id, auth, scopes, now)?;
    let response = transport.send(request, TOKEN_RESPONSE_LIMIT).await.map_err(IdpFailure::Unreachable)?;
    let doc: Option<Value> = serde_json::from_slice(&response.body).ok();
    match response.status {
        200 => {}
        s if retryable(s) => {
            return Err(IdpFailure::Unreachable(format!("{token_endpoint} answered HTTP {s}")));
        }
        s => {
            let text =
                |name: &str| doc.as_ref().and_then(|d| d.get(name)).and_then(Value::as_str).map(printable);
            let error = match (text("error"), text("error_description")) {
                (Some(e), Some(d)) => format!("{e}: {d}"),
                (Some(e), None) => e,
                _ => String::new(),
            };
            return Err(IdpFailure::Refused { status: s, error });
        }
    }
    let malformed = |detail: &str| {
        IdpFailure::Rejected(Rejected {
            reason: Rejection::Malformed,
            detail: format!("token response {detail}"),
        })
    };
    let doc = doc.ok_or_else(|| malformed("is not JSON"))?;
    let token_type = doc.get("token_type").and_then(Value::as_str).unwrap_or("");
    if !token_type.eq_ignore_ascii_case("bearer") {
        return Err(malformed(&format!("has token_type `{}`, not Bearer", printable(token_type))));
    }
    match doc.get("access_token") {
        Some(Value::String(token)) => Ok(Secret::new(token.clone())),
        _ => Err(malformed("has no access_token")),
    }
}

/// Cache-Control `max-age`, clamped to [1 minute, 1 day]; `no-store`/`no-cache` mean the minimum.
pub(crate) fn max_age(cache_control: Option<&str>, default: Duration) -> Duration {
    const MIN: Duration = Duration::from_mins(1);
    const MAX: Duration = Duration::from_hours(24);
    let Some(cc) = cache_control else { return default };
    let mut age = None;
    for directive in cc.split(',').map(str::trim) {
        let lower = directive.to_ascii_lowercase();
        if lower == "no-store" || lower == "no-cache" {
            return MIN;
        }
        if let Some(v) = lower.strip_prefix("max-age=") {
            age = v.trim_matches('"').parse::<u64>().ok().map(Duration::from_secs);
        }
    }
    age.map_or(default, |a| a.clamp(MIN, MAX))
}

struct JwksState {
    keys: Option<Arc<KeySet>>,
    fetched_at: Option<Instant>,
    max_age: Duration,
    /// When an unknown `kid` last caused a re-fetch: at most one per `jwks_refetch_interval`.
    kid_refetch_at: Option<Instant>,
}

/// What one issuer publishes, cached and shared by every identity of that issuer. Each cache is behind an
/// async mutex, so concurrent callers cause one fetch.
pub(crate) struct Issuer {
    /// The issuer identifier, exactly as configured and as `iss` must say.
    pub id: String,
    transport: Arc<dyn Transport>,
    settings: Settings,
    metadata: tokio::sync::Mutex<Option<(Metadata, Instant)>>,
    jwks: tokio::sync::Mutex<JwksState>,
}

impl Issuer {
    pub(crate) fn new(issuer: String, transport: Arc<dyn Transport>, settings: Settings) -> Self {
        Self {
            id: issuer,
            transport,
            settings,
            metadata: tokio::sync::Mutex::new(None),
            jwks: tokio::sync::Mutex::new(JwksState {
                keys: None,
                fetched_at: None,
                max_age: Duration::ZERO,
                kid_refetch_at: None,
            }),
        }
    }

    pub(crate) async fn metadata(&self) -> Result<Metadata, IdpFailure> {
        let mut cached = self.metadata.lock().await;
        if let Some((meta, at)) = cached.as_ref()
            && at.elapsed() < self.settings.metadata_max_age
        {
            return Ok(meta.clone());
        }
        let meta = discover(self.transport.as_ref(), &self.id).await?;
        *cached = Some((meta.clone(), Instant::now()));
        Ok(meta)
    }

    /// Forgets the discovery document, so the next attempt discovers again (after a failure).
    pub(crate) async fn forget_metadata(&self) {
        *self.metadata.lock().await = None;
    }

    pub(crate) async fn request_token(
        &self,
        client_id: &str,
        auth: &ClientAuth,
        scopes: &[String],
        clock: &dyn Clock,
    ) -> Result<Secret, IdpFailure> {
        let meta = self.metadata().await?;
        request_token(self.transport.as_ref(), &meta.token_endpoint, client_id, auth, scopes, clock.now())
            .await
    }

    /// The issuer's keys, fresh per Cache-Control; re-fetched once when `kid` is not among them, unless a
    /// re-fetch for an unknown kid happened within the last `jwks_refetch_interval`.
    pub(crate) async fn keys(&self, kid: Option<&str>) -> Result<Arc<KeySet>, IdpFailure> {
        let mut state = self.jwks.lock().await;
        let stale = match (state.fetched_at, &state.keys) {
            (Some(at), Some(_)) => at.elapsed() >= state.max_age,
            _ => true,
        };
        let mut fetched_now = false;
        if stale {
            match self.fetch_jwks().await {
                Ok((keys, max_age)) => {
                    state.keys = Some(Arc::new(keys));
                    state.fetched_at = Some(Instant::now());
                    state.max_age = max_age;
                    fetched_now = true;
                }
                // Keys we already hold stay usable while the provider is briefly unreachable.
                Err(e) if state.keys.is_none() => return Err(e),
                Err(e) => {
                    tracing::warn!(issuer = %self.id, error = ?e, "cannot refresh the JWKS; keeping the cached keys");
                }
            }
        }
        let keys = state.keys.clone().unwrap_or_default();
        let Some(kid) = kid else { return Ok(keys) };
        if keys.has_kid(kid) || fetched_now {
            return Ok(keys);
        }
        if state.kid_refetch_at.is_some_and(|at| at.elapsed() < self.settings.jwks_refetch_interval) {
            return Ok(keys);
        }
        state.kid_refetch_at = Some(Instant::now());
        tracing::info!(issuer = %self.id, kid = %printable(kid), "unknown kid; re-fetching the JWKS");
        let (fresh, max_age) = self.fetch_jwks().await?;
        let fresh = Arc::new(fresh);
        state.keys = Some(fresh.clone());
        state.fetched_at = Some(Instant::now());
        state.max_age = max_age;
        Ok(fresh)
    }

    async fn fetch_jwks(&self) -> Result<(KeySet, Duration), IdpFailure> {
        let meta = self.metadata().await?;
        let response = self
            .transport
            .send(Request::Get { url: meta.jwks_uri.clone() }, JWKS_LIMIT)
            .await
            .map_err(IdpFailure::Unreachable)?;
        match response.status {
            200 => {}
            s if retryable(s) => {
                return Err(IdpFailure::Unreachable(format!("{} answered HTTP {s}", meta.jwks_uri)));
            }
            s => return Err(IdpFailure::BadDiscovery(format!("{} answered HTTP {s}", meta.jwks_uri))),
        }
        let (keys, skipped) = KeySet::from_jwks(&response.body)
            .map_err(|e| IdpFailure::BadDiscovery(format!("{}: {e}", meta.jwks_uri)))?;
        if skipped > 0 {
            tracing::debug!(issuer = %self.id, skipped, "JWKS keys Warden cannot verify with were skipped");
        }
        Ok((keys, max_age(response.cache_control.as_deref(), self.settings.jwks_default_max_age)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_control_is_read_and_clamped() {
        let d = Duration::from_hours(1);
        assert_eq!(max_age(None, d), d);
        assert_eq!(max_age(Some("public, max-age=7200"), d), Duration::from_hours(2));
        assert_eq!(max_age(Some("max-age=1"), d), Duration::from_mins(1));
        assert_eq!(max_age(Some("max-age=99999999"), d), Duration::from_hours(24));
        assert_eq!(max_age(Some("no-cache"), d), Duration::from_mins(1));
        assert_eq!(max_age(Some("private"), d), d);
    }

    #[test]
    fn only_https_or_loopback_http_endpoints() {
        assert!(check_url("https://example.okta.com/oauth2/default/v1/token").is_ok());
        assert!(check_url("http://127.0.0.1:8080/oauth2/default/v1/keys").is_ok());
        assert!(check_url("http://[::1]:8080/x").is_ok());
        assert!(check_url("http://example.okta.com/oauth2/default/v1/token").is_err());
        assert!(check_url("ftp://127.0.0.1/x").is_err());
        assert!(check_url("not a url").is_err());
    }

    #[test]
    fn discovery_must_name_the_configured_issuer() {
        let doc = serde_json::json!({
            "issuer": "https://evil.example/oauth2/default",
            "token_endpoint": "https://evil.example/oauth2/default/v1/token",
            "jwks_uri": "https://evil.example/oauth2/default/v1/keys",
        });
        let err = parse_metadata("https://example.okta.com/oauth2/default", "u", doc.to_string().as_bytes())
            .unwrap_err();
        assert!(matches!(&err, IdpFailure::BadDiscovery(m) if m.contains("not the configured")), "{err:?}");
    }

    #[test]
    fn the_assertion_names_the_client_and_the_token_endpoint() {
        let pem = super::super::verify::tests::testdata("client_rsa.pem");
        let key = EncodingKey::from_rsa_pem(&pem).unwrap();
        let now = UNIX_EPOCH + Duration::from_hours(500_000);
        let a = client_assertion(
            "0oa1",
            "https://o.example/oauth2/default/v1/token",
            &key,
            Algorithm::RS256,
            None,
            now,
        )
        .unwrap();
        let b = client_assertion(
            "0oa1",
            "https://o.example/oauth2/default/v1/token",
            &key,
            Algorithm::RS256,
            None,
            now,
        )
        .unwrap();
        let decoding = jsonwebtoken::DecodingKey::from_rsa_pem(&super::super::verify::tests::testdata(
            "client_rsa.pub.pem",
        ))
        .unwrap();
        let mut v = jsonwebtoken::Validation::new(Algorithm::RS256);
        v.validate_exp = false;
        v.set_audience(&["https://o.example/oauth2/default/v1/token"]);
        let ca: Value = jsonwebtoken::decode(&a, &decoding, &v).unwrap().claims;
        let cb: Value = jsonwebtoken::decode(&b, &decoding, &v).unwrap().claims;
        assert_eq!(ca["iss"], "0oa1");
        assert_eq!(ca["sub"], "0oa1");
        assert_eq!(ca["exp"].as_u64().unwrap() - ca["iat"].as_u64().unwrap(), 60);
        assert_ne!(ca["jti"], cb["jti"], "jti is unique");
    }
}
