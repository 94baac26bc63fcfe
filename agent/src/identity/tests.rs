//! `Identities` against a hand-written provider, in virtual time: caching, refresh, single flight,
//! failures recorded once, key rotation, client authentication. (The real provider is in
//! agent/tests/identity_oidc.rs.)

use std::collections::HashSet;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Mutex;

use base64::Engine as _;
use serde_json::{Value, json};
use tokio::task::JoinSet;

use super::idp::{BoxFuture, Request, Response};
use super::verify::tests::{AUDIENCE, ISSUER, jwk, now, rsa_key, sign, testdata, unix};
use super::*;

const SECRET: &str = "s3cret-value";

/// What the fake provider does; tests change it between calls.
struct State {
    up: bool,
    delay: Duration,
    kid: String,
    key: EncodingKey,
    jwks: Vec<Value>,
    ttl: u64,
    disabled: HashSet<String>,
    tamper: Option<fn(&mut Value)>,
    discovery: u32,
    tokens: u32,
    jwks_fetches: u32,
    issued: Vec<String>,
    assertions: Vec<Value>,
}

struct FakeIdp {
    clock: Arc<TestClock>,
    state: Mutex<State>,
}

impl FakeIdp {
    fn new(clock: Arc<TestClock>) -> Arc<Self> {
        Arc::new(Self {
            clock,
            state: Mutex::new(State {
                up: true,
                delay: Duration::from_millis(50),
                kid: "kA".into(),
                key: rsa_key("idp_rsa_a"),
                jwks: vec![jwk("idp_rsa_a", "kA")],
                ttl: 3600,
                disabled: HashSet::new(),
                tamper: None,
                discovery: 0,
                tokens: 0,
                jwks_fetches: 0,
                issued: Vec::new(),
                assertions: Vec::new(),
            }),
        })
    }

    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        f(&mut self.state.lock().unwrap())
    }

    fn json(status: u16, body: &Value) -> Response {
        Response { status, cache_control: None, body: body.to_string().into_bytes() }
    }

    fn token(&self, authorization: Option<&str>, body: &str) -> Response {
        let form: Vec<(String, String)> = form_urlencoded::parse(body.as_bytes()).into_owned().collect();
        let get = |k: &str| form.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        let client = if let Some(basic) = authorization.and_then(|a| a.strip_prefix("Basic ")) {
            let pair =
                String::from_utf8(base64::engine::general_purpose::STANDARD.decode(basic).unwrap()).unwrap();
            let (id, secret) = pair.split_once(':').unwrap();
            (secret == SECRET).then(|| id.to_owned())
        } else if let Some(assertion) = get("client_assertion") {
            let key = jsonwebtoken::DecodingKey::from_rsa_pem(&testdata("client_rsa.pub.pem")).unwrap();
            let mut v = jsonwebtoken::Validation::new(Algorithm::RS256);
            v.validate_exp = false;
            v.set_audience(&[format!("{ISSUER}/v1/token")]);
            jsonwebtoken::decode::<Value>(&assertion, &key, &v).ok().map(|d| {
                self.with(|s| s.assertions.push(d.claims.clone()));
                d.claims["iss"].as_str().unwrap().to_owned()
            })
        } else {
            (get("client_secret").as_deref() == Some(SECRET)).then(|| get("client_id").unwrap())
        };
        let Some(client) = client.filter(|c| !self.with(|s| s.disabled.contains(c))) else {
            return Self::json(
                401,
                &json!({ "error": "invalid_client", "error_description": "client authentication failed" }),
            );
        };
        let now = unix(self.clock.now());
        self.with(|s| {
            let mut claims = json!({
                "ver": 1, "jti": format!("AT.{}", s.tokens), "iss": ISSUER, "aud": AUDIENCE, "iat": now,
                "exp": now + s.ttl, "cid": client, "sub": client, "scp": get("scope").unwrap_or_default().split(' ').collect::<Vec<_>>(),
                "groups": ["agents-research"],
            });
            if let Some(tamper) = s.tamper {
                tamper(&mut claims);
            }
            let token = sign(Algorithm::RS256, &s.kid, &claims, &s.key);
            s.issued.push(token.clone());
            Self::json(200, &json!({ "access_token": token, "token_type": "Bearer", "expires_in": s.ttl }))
        })
    }
}

impl Transport for FakeIdp {
    fn send(&self, request: Request, _limit: usize) -> BoxFuture<'_, Result<Response, String>> {
        Box::pin(async move {
            let delay = self.with(|s| s.delay);
            tokio::time::sleep(delay).await;
            if !self.with(|s| s.up) {
                return Err(format!("{}: connection refused", request.url()));
            }
            match request {
                Request::Get { url } if url == format!("{ISSUER}/.well-known/openid-configuration") => {
                    self.with(|s| s.discovery += 1);
                    Ok(Self::json(
                        200,
                        &json!({
                            "issuer": ISSUER, "token_endpoint": format!("{ISSUER}/v1/token"),
                            "jwks_uri": format!("{ISSUER}/v1/keys"),
                        }),
                    ))
                }
                Request::Get { url } if url == format!("{ISSUER}/v1/keys") => {
                    let keys = self.with(|s| {
                        s.jwks_fetches += 1;
                        s.jwks.clone()
                    });
                    Ok(Self::json(200, &json!({ "keys": keys })))
                }
                Request::PostForm { url, authorization, body } if url == format!("{ISSUER}/v1/token") => {
                    self.with(|s| s.tokens += 1);
                    Ok(self.token(authorization.as_ref().map(files::Secret::expose), body.expose()))
                }
                other => Ok(Self::json(404, &json!({ "error": format!("no route {}", other.url()) }))),
            }
        })
    }
}

struct Harness {
    idp: Arc<FakeIdp>,
    identities: Identities,
    records: Arc<Mutex<Vec<Record>>>,
    _dir: tempfile::TempDir,
}

fn private(dir: &Path, name: &str, contents: &[u8]) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

fn config(client_id: &str, audience: &str) -> IdentityConfig {
    IdentityConfig {
        issuer: ISSUER.into(),
        client_id: client_id.into(),
        private_key_file: None,
        private_key_alg: None,
        private_key_id: None,
        client_secret_file: None,
        token_endpoint_auth_method: None,
        scopes: vec!["warden.connect".into()],
        audience: audience.into(),
        groups_claim: "groups".into(),
        groups: vec!["ops".into(), "agents-research".into()],
    }
}

/// Identities `bot` (secret, basic), `post` (secret, post), `jwt` (private_key_jwt), `other-aud`.
fn harness() -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let secret = private(dir.path(), "secret", format!("{SECRET}\n").as_bytes());
    let key = private(dir.path(), "client.pem", &testdata("client_rsa.pem"));
    let mut configs = BTreeMap::new();
    configs.insert(
        "bot".to_owned(),
        IdentityConfig { client_secret_file: Some(secret.clone()), ..config("0oa-bot", AUDIENCE) },
    );
    configs.insert(
        "post".to_owned(),
        IdentityConfig {
            client_secret_file: Some(secret.clone()),
            token_endpoint_auth_method: Some("client_secret_post".into()),
            ..config("0oa-post", AUDIENCE)
        },
    );
    configs.insert(
        "jwt".to_owned(),
        IdentityConfig {
            private_key_file: Some(key),
            private_key_id: Some("ck1".into()),
            ..config("0oa-jwt", AUDIENCE)
        },
    );
    configs.insert(
        "other-aud".to_owned(),
        IdentityConfig { client_secret_file: Some(secret), ..config("0oa-bot", "api://other") },
    );
    let clock = Arc::new(TestClock::starting_at(now()));
    let idp = FakeIdp::new(clock.clone());
    let records = Arc::new(Mutex::new(Vec::new()));
    let sink = records.clone();
    let identities = Identities::builder(&configs)
        .clock(clock)
        .record_sink(Arc::new(move |r| sink.lock().unwrap().push(r)))
        .transport(idp.clone())
        .build()
        .unwrap();
    Harness { idp, identities, records, _dir: dir }
}

/// Waits (in virtual time, as sessions keep arriving) until `done` holds; fails after a virtual minute.
async fn until(done: impl Fn() -> bool) {
    for _ in 0..6000 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("not done within a virtual minute");
}

impl Harness {
    fn records(&self) -> Vec<(String, Value)> {
        self.records
            .lock()
            .unwrap()
            .iter()
            .map(|r| (r.event.clone(), Value::Object(r.fields.clone())))
            .collect()
    }
}

#[tokio::test(start_paused = true)]
async fn many_sessions_at_once_cause_one_token_request() {
    let h = harness();
    let mut set = JoinSet::new();
    for _ in 0..50 {
        let ids = h.identities.clone();
        set.spawn(async move { ids.verified("bot").await });
    }
    let all: Vec<_> = set.join_all().await.into_iter().map(Result::unwrap).collect();
    assert!(all.iter().all(|i| Arc::ptr_eq(i, &all[0])));
    let id = &all[0];
    assert_eq!((id.name.as_str(), id.sub.as_str(), id.client_id.as_str()), ("bot", "0oa-bot", "0oa-bot"));
    assert_eq!(id.scopes, ["warden.connect"]);
    assert_eq!(id.groups, ["agents-research", "ops"], "token groups, then local ones, deduped");
    assert_eq!(unix(id.expires_at), unix(now()) + 3600);
    assert_eq!(h.idp.with(|s| (s.discovery, s.tokens, s.jwks_fetches)), (1, 1, 1));
    assert!(h.records().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_token_is_refreshed_before_it_expires() {
    let h = harness();
    h.idp.with(|s| s.ttl = 300);
    let first = h.identities.verified("bot").await.unwrap();
    tokio::time::advance(Duration::from_secs(200)).await;
    assert!(Arc::ptr_eq(&first, &h.identities.verified("bot").await.unwrap()), "cached while fresh");
    assert_eq!(h.idp.with(|s| s.tokens), 1);
    // A fifth of the lifetime (60 s) before exp, a call starts a background refresh and gets the
    // still-valid identity at once.
    tokio::time::advance(Duration::from_secs(45)).await;
    let started = tokio::time::Instant::now();
    assert!(Arc::ptr_eq(&first, &h.identities.verified("bot").await.unwrap()));
    assert_eq!(started.elapsed(), Duration::ZERO, "no session waits for the refresh");
    until(|| h.idp.with(|s| s.tokens) == 2).await;
    let second = h.identities.verified("bot").await.unwrap();
    assert!(second.expires_at > first.expires_at);
    assert_eq!(h.idp.with(|s| s.discovery), 1, "discovery is cached");
}

#[tokio::test(start_paused = true)]
async fn while_the_provider_is_down_a_valid_token_serves_and_an_expired_one_never_does() {
    let h = harness();
    h.idp.with(|s| s.ttl = 300);
    let first = h.identities.verified("bot").await.unwrap();
    h.idp.with(|s| s.up = false);
    tokio::time::advance(Duration::from_secs(250)).await;
    // Due for refresh, the refresh fails, the still-valid identity is used.
    assert!(Arc::ptr_eq(&first, &h.identities.verified("bot").await.unwrap()));
    until(|| !h.records().is_empty()).await;
    assert!(Arc::ptr_eq(&first, &h.identities.verified("bot").await.unwrap()));
    let records = h.records();
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0].0, "idp.unreachable");
    assert_eq!(records[0].1["identity"], "bot");
    assert_eq!(records[0].1["issuer"], ISSUER);
    assert!(records[0].1["detail"].as_str().unwrap().contains("connection refused"), "{records:?}");
    tokio::time::advance(Duration::from_mins(1)).await;
    let err = h.identities.verified("bot").await.unwrap_err();
    assert_eq!(err.reason(), "idp_unreachable");
    assert!(
        err.to_string()
            .starts_with(&format!("identity `bot`: cannot reach the identity provider {ISSUER}: ")),
        "{err}"
    );
    // Back up: the next attempt after the hold-off succeeds.
    h.idp.with(|s| s.up = true);
    tokio::time::advance(Duration::from_mins(1)).await;
    let back = h.identities.verified("bot").await.unwrap();
    assert!(back.expires_at > h.idp.clock.now());
}

#[tokio::test(start_paused = true)]
async fn one_failed_attempt_is_one_record_however_many_sessions_wait() {
    let h = harness();
    h.idp.with(|s| s.up = false);
    let mut set = JoinSet::new();
    for _ in 0..20 {
        let ids = h.identities.clone();
        set.spawn(async move { ids.verified("bot").await });
    }
    for result in set.join_all().await {
        assert_eq!(result.unwrap_err().reason(), "idp_unreachable");
    }
    assert_eq!(h.records().len(), 1, "{:?}", h.records());
    // Within the hold-off, further sessions get the same answer without a request.
    let started = tokio::time::Instant::now();
    assert_eq!(h.identities.verified("bot").await.unwrap_err().reason(), "idp_unreachable");
    assert_eq!(started.elapsed(), Duration::ZERO);
    assert_eq!(h.records().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_wrong_audience_is_rejected_and_recorded_without_the_token() {
    let h = harness();
    let err = h.identities.verified("other-aud").await.unwrap_err();
    assert_eq!(err.reason(), "wrong_audience");
    assert_eq!(
        err.to_string(),
        "identity `other-aud`: token rejected (wrong_audience): aud [api://warden] does not include the configured audience `api://other`"
    );
    let records = h.records();
    assert_eq!(records.len(), 1);
    let (event, fields) = &records[0];
    assert_eq!(event, "token.rejected");
    assert_eq!(fields["identity"], "other-aud");
    assert_eq!(fields["client_id"], "0oa-bot");
    assert_eq!(fields["reason"], "wrong_audience");
    let issued = h.idp.with(|s| s.issued.clone());
    assert_eq!(issued.len(), 1);
    let text = format!("{records:?} {err:?} {err}");
    for part in issued[0].split('.') {
        assert!(!text.contains(part), "a token part leaked: {text}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_disabled_client_is_refused() {
    let h = harness();
    h.idp.with(|s| s.disabled.insert("0oa-bot".into()));
    let err = h.identities.verified("bot").await.unwrap_err();
    assert_eq!(err.reason(), "token_request_refused");
    assert!(err.to_string().contains("HTTP 401: invalid_client: client authentication failed"), "{err}");
    let records = h.records();
    assert_eq!(records[0].0, "token.rejected");
    assert_eq!(records[0].1["reason"], "token_request_refused");
    assert_eq!(h.idp.with(|s| s.tokens), 1, "a refusal is not retried");
}

#[tokio::test(start_paused = true)]
async fn every_client_authentication_method_works() {
    let h = harness();
    assert_eq!(h.identities.verified("post").await.unwrap().client_id, "0oa-post");
    let jwt = h.identities.verified("jwt").await.unwrap();
    assert_eq!(jwt.sub, "0oa-jwt");
    // A second assertion (after expiry) carries a fresh jti.
    tokio::time::advance(Duration::from_secs(3601)).await;
    h.identities.verified("jwt").await.unwrap();
    let assertions = h.idp.with(|s| s.assertions.clone());
    assert_eq!(assertions.len(), 2);
    assert_eq!(assertions[0]["sub"], "0oa-jwt");
    assert_ne!(assertions[0]["jti"], assertions[1]["jti"]);
}

#[tokio::test(start_paused = true)]
async fn rotated_keys_are_picked_up_without_a_restart() {
    let h = harness();
    h.identities.verified("bot").await.unwrap();
    h.idp.with(|s| {
        s.kid = "kB".into();
        s.key = rsa_key("idp_rsa_b");
        s.jwks = vec![jwk("idp_rsa_b", "kB"), jwk("idp_rsa_a", "kA")];
    });
    let post = h.identities.verified("post").await.unwrap();
    assert_eq!(post.client_id, "0oa-post");
    assert_eq!(h.idp.with(|s| s.jwks_fetches), 2, "the unknown kid caused one re-fetch");
}

#[tokio::test(start_paused = true)]
async fn unknown_kids_cannot_make_the_jwks_be_fetched_more_than_once_per_interval() {
    let h = harness();
    h.idp.with(|s| s.kid = "ghost".into());
    for _ in 0..20 {
        let err = h.identities.verified("bot").await.unwrap_err();
        assert_eq!(err.reason(), "unknown_kid");
        tokio::time::advance(Duration::from_millis(500)).await;
    }
    // The first fetch, and one re-fetch for the unknown kid in 10 seconds of attempts.
    assert_eq!(h.idp.with(|s| s.jwks_fetches), 2);
    assert!(h.records().iter().all(|(e, f)| e == "token.rejected" && f["reason"] == "unknown_kid"));
}

#[tokio::test(start_paused = true)]
async fn a_token_signed_by_another_key_or_for_another_client_is_refused() {
    let h = harness();
    h.idp.with(|s| s.key = rsa_key("other_rsa"));
    assert_eq!(h.identities.verified("bot").await.unwrap_err().reason(), "bad_signature");
    h.idp.with(|s| {
        s.key = rsa_key("idp_rsa_a");
        s.tamper = Some(|c| c["cid"] = json!("0oa-someone-else"));
    });
    assert_eq!(h.identities.verified("post").await.unwrap_err().reason(), "wrong_client");
    h.idp.with(|s| s.tamper = Some(|c| c["groups"] = json!(7)));
    assert_eq!(h.identities.verified("jwt").await.unwrap_err().reason(), "invalid_claim");
}

#[tokio::test(start_paused = true)]
async fn warm_up_obtains_every_identity_at_once() {
    let h = harness();
    h.identities.warm_up().await;
    assert_eq!(h.idp.with(|s| s.tokens), 4);
    let rejected: Vec<_> = h.records().into_iter().map(|(_, f)| f["identity"].clone()).collect();
    assert_eq!(rejected, ["other-aud"]);
    h.identities.verified("bot").await.unwrap();
    assert_eq!(h.idp.with(|s| s.tokens), 4, "served from the cache");
}

#[tokio::test(start_paused = true)]
async fn an_unknown_identity_is_named() {
    let h = harness();
    let err = h.identities.verified("ghost").await.unwrap_err();
    assert_eq!(err.reason(), "unknown_identity");
    assert_eq!(
        err.to_string(),
        "no identity `ghost` is configured; add an [identity.ghost] section to the config"
    );
    assert!(h.identities.contains("bot") && !h.identities.contains("ghost"));
}

#[test]
fn insecure_or_unusable_credentials_stop_the_build() {
    let dir = tempfile::tempdir().unwrap();
    let secret = private(dir.path(), "secret", b"x\n");
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o604)).unwrap();
    let mut configs = BTreeMap::new();
    configs.insert(
        "bot".to_owned(),
        IdentityConfig { client_secret_file: Some(secret.clone()), ..config("0oa", AUDIENCE) },
    );
    let err = Identities::builder(&configs).build().unwrap_err();
    assert_eq!(err.reason(), "credential_insecure");
    assert!(err.to_string().contains(&format!("run `chmod 600 {}`", secret.display())), "{err}");

    let key = private(dir.path(), "k.pem", b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n");
    configs
        .insert("bot".to_owned(), IdentityConfig { private_key_file: Some(key), ..config("0oa", AUDIENCE) });
    let err = Identities::builder(&configs).build().unwrap_err();
    assert_eq!(err.reason(), "bad_private_key");

    let ec = private(dir.path(), "ec.pem", &testdata("client_ec.pem"));
    let es = IdentityConfig {
        private_key_file: Some(ec),
        private_key_alg: Some("ES256".into()),
        ..config("0oa", AUDIENCE)
    };
    configs.insert("bot".to_owned(), es.clone());
    assert!(Identities::builder(&configs).build().is_ok());
    configs.insert("bot".to_owned(), IdentityConfig { private_key_alg: Some("HS256".into()), ..es });
    assert!(Identities::builder(&configs).build().unwrap_err().to_string().contains("use RS256 or ES256"));

    let insecure = IdentityConfig {
        issuer: "http://example.okta.com/oauth2/default".into(),
        client_secret_file: Some(secret),
        ..config("0oa", AUDIENCE)
    };
    configs.insert("bot".to_owned(), insecure);
    assert_eq!(Identities::builder(&configs).build().unwrap_err().reason(), "config");
}

/// A writer into a shared buffer, for capturing log lines.
#[derive(Clone, Default)]
struct LogBuffer(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(start_paused = true)]
async fn no_credential_reaches_a_log_line_the_status_or_a_debug_print() {
    let log = LogBuffer::default();
    let writer = log.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .json()
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let h = harness();
    for name in ["bot", "post", "jwt"] {
        h.identities.verified(name).await.unwrap();
    }
    h.idp.with(|s| s.up = false);
    tokio::time::advance(Duration::from_secs(3600)).await;
    assert!(h.identities.verified("bot").await.is_err());
    let states = h.identities.states();
    assert!(states.iter().filter(|s| s.name != "other-aud").all(|s| s.valid_until.is_some()), "{states:?}");
    assert!(states.iter().any(|s| s.name == "bot" && s.last_error.is_some()), "{states:?}");

    let issued = h.idp.with(|s| s.issued.clone());
    assert!(!issued.is_empty());
    let log = String::from_utf8(log.0.lock().unwrap().clone()).unwrap();
    assert!(log.contains("identity verified"), "the log was captured: {log}");
    let printed = [log, format!("{:?}", h.identities), format!("{states:?}")];
    let pem = String::from_utf8(testdata("client_rsa.pem")).unwrap();
    let key_body = pem.lines().nth(1).unwrap().to_owned();
    for text in &printed {
        assert!(!text.contains(SECRET), "the client secret was printed: {text}");
        assert!(!text.contains(&key_body), "the private key was printed: {text}");
        for token in &issued {
            assert!(!text.contains(token.as_str()), "an access token was printed: {text}");
        }
        assert!(!text.contains("eyJ"), "a JWT (token or client assertion) was printed: {text}");
    }
}
