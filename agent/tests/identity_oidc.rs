//! End to end against a real OpenID provider nobody here wrote (npm `oidc-provider`, tests/idp/server.js)
//! set up like an Okta custom authorization server: issuer `http://127.0.0.1:PORT/oauth2/default`, token
//! endpoint `/v1/token`, JWKS `/v1/keys`, JWT access tokens with `cid`, `scp` and a `groups` claim.
//! Records go through the real audit writer and are read back from its files.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};
use tokio_util::sync::CancellationToken;
use warden::audit::{Audit, AuditOptions};
use warden::config::IdentityConfig;
use warden::identity::{Identities, Settings, VerifiedIdentity};

const AUDIENCE: &str = "api://warden";
const DEADLINE: Duration = Duration::from_secs(30);

fn idp_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/idp")
}

/// Why the provider cannot run here, if it cannot.
fn missing() -> Option<String> {
    let node = std::process::Command::new("node").arg("--version").output();
    if !node.is_ok_and(|o| o.status.success()) {
        return Some("node is not installed (scripts/setup.sh installs it)".into());
    }
    let module = idp_dir().join("node_modules/oidc-provider/package.json");
    if !module.exists() {
        return Some(format!(
            "{} is missing; run `npm ci` in tests/idp (scripts/setup.sh does)",
            module.display()
        ));
    }
    None
}

/// The provider process: killed when dropped.
struct Idp {
    child: Child,
    stdout: Lines<BufReader<ChildStdout>>,
    issuer: String,
    admin: String,
    keys: tempfile::TempDir,
}

impl Idp {
    /// Starts the provider on a free loopback port, or says why it cannot (and fails under CI).
    async fn start(args: &[&str]) -> Option<Self> {
        if let Some(reason) = missing() {
            warden_test_support::require("the OpenID provider tests", &[(reason.as_str(), false)]);
            return None;
        }
        let keys = tempfile::tempdir().unwrap();
        let stderr = std::fs::File::create(keys.path().join("stderr.log")).unwrap();
        let mut child = Command::new("node")
            .arg(idp_dir().join("server.js"))
            .args(["--port", "0", "--keys-dir"])
            .arg(keys.path())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .expect("spawn node");
        let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
        let line = tokio::time::timeout(DEADLINE, stdout.next_line())
            .await
            .expect("the provider printed its ready line in time")
            .unwrap()
            .unwrap_or_else(|| {
                panic!(
                    "the provider exited: {}",
                    std::fs::read_to_string(keys.path().join("stderr.log")).unwrap()
                )
            });
        let issuer = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("issuer="))
            .unwrap_or_else(|| panic!("no issuer in {line:?}"))
            .to_owned();
        let admin = issuer.trim_end_matches("/oauth2/default").to_owned();
        Some(Self { child, stdout, issuer, admin, keys })
    }

    fn key(&self, name: &str) -> PathBuf {
        self.keys.path().join(name)
    }

    async fn admin(&self, method: reqwest::Method, path: &str) -> Value {
        let response =
            reqwest::Client::new().request(method, format!("{}{path}", self.admin)).send().await.unwrap();
        assert!(response.status().is_success(), "{path}: {}", response.status());
        serde_json::from_slice(&response.bytes().await.unwrap()).unwrap()
    }

    async fn stats(&self) -> Value {
        self.admin(reqwest::Method::GET, "/admin/stats").await
    }

    fn identity(&self, client: &str) -> IdentityConfig {
        let mut c = IdentityConfig {
            issuer: self.issuer.clone(),
            client_id: client.into(),
            private_key_file: None,
            private_key_alg: None,
            private_key_id: None,
            client_secret_file: None,
            token_endpoint_auth_method: None,
            scopes: vec!["warden.connect".into()],
            audience: AUDIENCE.into(),
            groups_claim: "groups".into(),
            groups: Vec::new(),
        };
        let pem = self.key(&format!("{client}.pem"));
        if pem.exists() {
            c.private_key_file = Some(pem);
        } else {
            c.client_secret_file = Some(self.key(&format!("{client}.secret")));
        }
        c
    }
}

/// Identities wired to a real audit writer in a temporary state directory.
struct Fixture {
    identities: Identities,
    shutdown: CancellationToken,
    writer: tokio::task::JoinHandle<()>,
    state: tempfile::TempDir,
}

fn fixture(configs: &BTreeMap<String, IdentityConfig>, settings: Settings) -> Fixture {
    let state = tempfile::tempdir().unwrap();
    let shutdown = CancellationToken::new();
    let (audit, writer) = Audit::start_with(&AuditOptions::in_dir(state.path()), shutdown.clone()).unwrap();
    let identities = Identities::builder(configs).audit(audit).settings(settings).build().unwrap();
    Fixture { identities, shutdown, writer, state }
}

impl Fixture {
    /// Stops the writer and returns every record it wrote.
    async fn records(self) -> Vec<Value> {
        self.shutdown.cancel();
        self.writer.await.unwrap();
        warden_test_support::audit_records(&self.state.path().join("audit"))
    }
}

fn named(configs: Vec<(&str, IdentityConfig)>) -> BTreeMap<String, IdentityConfig> {
    configs.into_iter().map(|(n, c)| (n.to_owned(), c)).collect()
}

fn assert_fresh(id: &VerifiedIdentity) {
    assert!(id.expires_at > SystemTime::now(), "an expired identity was handed out: {id:?}");
}

#[tokio::test]
async fn private_key_jwt_and_client_secrets_yield_verified_identities() {
    let Some(idp) = Idp::start(&[]).await else { return };
    let configs = named(vec![
        ("research-rs", idp.identity("agent-pkjwt-rs")),
        (
            "build-es",
            IdentityConfig { private_key_alg: Some("ES256".into()), ..idp.identity("agent-pkjwt-es") },
        ),
        (
            "ops-basic",
            IdentityConfig { groups: vec!["ops-local".into()], ..idp.identity("agent-secret-basic") },
        ),
        (
            "plain-post",
            IdentityConfig {
                token_endpoint_auth_method: Some("client_secret_post".into()),
                scopes: vec!["warden.connect".into(), "warden.read".into()],
                groups: vec!["service-accounts".into()],
                ..idp.identity("agent-secret-post")
            },
        ),
    ]);
    let f = fixture(&configs, Settings::default());

    let rs = f.identities.verified("research-rs").await.unwrap();
    assert_eq!(
        (rs.name.as_str(), rs.sub.as_str(), rs.client_id.as_str()),
        ("research-rs", "agent-pkjwt-rs", "agent-pkjwt-rs")
    );
    assert_eq!(rs.scopes, ["warden.connect"]);
    assert_eq!(rs.groups, ["agents-research"]);
    assert_fresh(&rs);
    let lifetime = rs.expires_at.duration_since(SystemTime::now()).unwrap();
    assert!(lifetime > Duration::from_secs(3500) && lifetime <= Duration::from_secs(3600), "{lifetime:?}");

    let es = f.identities.verified("build-es").await.unwrap();
    assert_eq!(es.groups, ["agents-build", "agents-research"]);

    // The provider's groups claim is a plain string for this client; local groups are added.
    let basic = f.identities.verified("ops-basic").await.unwrap();
    assert_eq!(basic.groups, ["agents-ops", "ops-local"]);

    // No groups claim at all: only the operator's local groups.
    let post = f.identities.verified("plain-post").await.unwrap();
    assert_eq!(post.scopes, ["warden.connect", "warden.read"]);
    assert_eq!(post.groups, ["service-accounts"]);

    // Cached: asking again costs no token request.
    let before = idp.stats().await["token"].as_u64().unwrap();
    assert!(Arc::ptr_eq(&rs, &f.identities.verified("research-rs").await.unwrap()));
    assert_eq!(idp.stats().await["token"].as_u64().unwrap(), before);
    assert_eq!(before, 4);

    let records = f.records().await;
    assert!(
        records.iter().all(|r| r["event"] != "token.rejected" && r["event"] != "idp.unreachable"),
        "{records:?}"
    );
}

#[tokio::test]
async fn discovery_falls_back_to_the_oauth_authorization_server_document() {
    let Some(idp) = Idp::start(&["--discovery", "oauth"]).await else { return };
    let f = fixture(&named(vec![("bot", idp.identity("agent-secret-basic"))]), Settings::default());
    assert_eq!(f.identities.verified("bot").await.unwrap().client_id, "agent-secret-basic");
}

#[tokio::test]
async fn a_disabled_client_and_a_wrong_audience_are_refused_and_recorded() {
    let Some(idp) = Idp::start(&[]).await else { return };
    let configs = named(vec![
        ("disabled", idp.identity("agent-secret-post")),
        ("wrong-aud", IdentityConfig { audience: "api://payments".into(), ..idp.identity("agent-pkjwt-rs") }),
    ]);
    let configs = {
        let mut c = configs;
        c.get_mut("disabled").unwrap().token_endpoint_auth_method = Some("client_secret_post".into());
        c
    };
    let f = fixture(&configs, Settings::default());
    idp.admin(reqwest::Method::POST, "/admin/disable?client=agent-secret-post").await;

    let err = f.identities.verified("disabled").await.unwrap_err();
    assert_eq!(err.reason(), "token_request_refused");
    assert!(err.to_string().contains("HTTP 401: invalid_client"), "{err}");

    let err = f.identities.verified("wrong-aud").await.unwrap_err();
    assert_eq!(err.reason(), "wrong_audience");
    assert!(
        err.to_string()
            .contains("aud [api://warden] does not include the configured audience `api://payments`"),
        "{err}"
    );

    let records = f.records().await;
    let rejected: Vec<&Value> = records.iter().filter(|r| r["event"] == "token.rejected").collect();
    assert_eq!(rejected.len(), 2, "{records:?}");
    assert_eq!(rejected[0]["identity"], "disabled");
    assert_eq!(rejected[0]["client_id"], "agent-secret-post");
    assert_eq!(rejected[0]["reason"], "token_request_refused");
    assert_eq!(rejected[1]["identity"], "wrong-aud");
    assert_eq!(rejected[1]["reason"], "wrong_audience");
    // No token (every JWT starts with a base64url `{"`) and no secret reaches the record.
    let text = serde_json::to_string(&records).unwrap();
    assert!(!text.contains("eyJ"), "{text}");
    let secret = std::fs::read_to_string(idp.key("agent-secret-post.secret")).unwrap();
    assert!(!text.contains(secret.trim()), "{text}");
}

#[tokio::test]
async fn keys_rotated_at_the_provider_are_picked_up_without_a_restart() {
    let Some(mut idp) = Idp::start(&[]).await else { return };
    let configs = named(vec![
        ("first", idp.identity("agent-pkjwt-rs")),
        ("second", idp.identity("agent-secret-basic")),
        ("third", idp.identity("agent-pkjwt-es")),
    ]);
    let configs = {
        let mut c = configs;
        c.get_mut("third").unwrap().private_key_alg = Some("ES256".into());
        c
    };
    // No interval between unknown-kid re-fetches, so two rotations in a row are both seen at once.
    let settings = Settings { jwks_refetch_interval: Duration::ZERO, ..Settings::default() };
    let f = fixture(&configs, settings);
    let first = f.identities.verified("first").await.unwrap();
    assert_eq!(idp.stats().await["jwks"], 1);

    let rotated = idp.admin(reqwest::Method::POST, "/admin/rotate").await;
    assert_eq!(rotated["kids"].as_array().unwrap().len(), 2, "the old key stays published");
    let second = f.identities.verified("second").await.unwrap();
    assert_eq!(second.client_id, "agent-secret-basic");
    assert_eq!(idp.stats().await["jwks"], 2, "the new kid caused one re-fetch");
    assert!(Arc::ptr_eq(&first, &f.identities.verified("first").await.unwrap()), "the old token stays valid");

    // SIGHUP rotates too; the provider says so on stdout.
    let pid = nix::unistd::Pid::from_raw(i32::try_from(idp.child.id().unwrap()).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
    let rotated = async {
        while let Some(line) = idp.stdout.next_line().await.unwrap() {
            if line.starts_with("warden-test-idp rotated kid=") {
                return;
            }
        }
        panic!("the provider exited");
    };
    tokio::time::timeout(DEADLINE, rotated).await.expect("the provider rotated its key in time");
    let third = f.identities.verified("third").await.unwrap();
    assert_eq!(third.client_id, "agent-pkjwt-es");
    assert_eq!(idp.stats().await["jwks"], 3);
}

#[tokio::test]
async fn a_short_lived_token_is_refreshed_before_it_expires_on_the_real_clock() {
    let Some(idp) = Idp::start(&[]).await else { return };
    let f = fixture(&named(vec![("short", idp.identity("agent-short"))]), Settings::default());
    let first = f.identities.verified("short").await.unwrap();
    let lifetime = first.expires_at.duration_since(SystemTime::now()).unwrap();
    assert!(lifetime <= Duration::from_secs(5), "{lifetime:?}");
    // Sessions keep asking; the identity they get is always unexpired, and a fresh one replaces the
    // first before it expires.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let refreshed = loop {
        let id = f.identities.verified("short").await.unwrap();
        assert_fresh(&id);
        if id.expires_at > first.expires_at {
            break id;
        }
        assert!(tokio::time::Instant::now() < deadline, "no refresh within 20 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(SystemTime::now() < first.expires_at, "refreshed before the first token expired");
    assert_eq!(refreshed.sub, "agent-short");
    assert_eq!(idp.stats().await["token"], 2);
}

#[tokio::test]
async fn the_provider_being_down_refuses_new_sessions_cleanly() {
    let Some(mut idp) = Idp::start(&[]).await else { return };
    let configs =
        named(vec![("up", idp.identity("agent-secret-basic")), ("down", idp.identity("agent-pkjwt-rs"))]);
    let settings = Settings { retry_backoff: Duration::from_millis(50), ..Settings::default() };
    let f = fixture(&configs, settings);
    let up = f.identities.verified("up").await.unwrap();
    idp.child.kill().await.unwrap();

    let started = tokio::time::Instant::now();
    let err = f.identities.verified("down").await.unwrap_err();
    assert_eq!(err.reason(), "idp_unreachable");
    assert!(
        err.to_string()
            .starts_with(&format!("identity `down`: cannot reach the identity provider {}", idp.issuer)),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(5), "refused promptly: {:?}", started.elapsed());
    // Many sessions asking now get the same answer, without another attempt or record.
    for _ in 0..10 {
        assert_eq!(f.identities.verified("down").await.unwrap_err().reason(), "idp_unreachable");
    }
    // An identity verified before the outage stays usable until its token expires.
    assert!(Arc::ptr_eq(&up, &f.identities.verified("up").await.unwrap()));

    let records = f.records().await;
    let down: Vec<&Value> = records.iter().filter(|r| r["event"] == "idp.unreachable").collect();
    assert_eq!(down.len(), 1, "{records:?}");
    assert_eq!(down[0]["identity"], "down");
    assert_eq!(down[0]["issuer"], Value::String(idp.issuer.clone()));
    assert!(down[0]["detail"].as_str().unwrap().contains("127.0.0.1"), "{:?}", down[0]);
}
