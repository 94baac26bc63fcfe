//! Okta non-human identities: obtains a client-credentials access token per configured identity, verifies
//! it against the issuer's JWKS, and hands the proxy the verified claims, never the token.
//!
//! The daemon builds one [`Identities`] from the `[identity.*]` sections and asks it, per session, for
//! [`Identities::verified`]. Tokens are cached per identity and refreshed in the background before they
//! expire, so no session waits on the provider while a valid token exists; concurrent sessions without one
//! share one token request (single flight), and a failed attempt is shared by the sessions that
//! waited on it, so it is recorded once (`token.rejected` or `idp.unreachable`). Nothing unverified is
//! ever returned, and the token itself never leaves this module: not in a return value, an error, a log
//! line or an audit record.
//!
//! Submodules: `verify` (pure token checks), `idp` (discovery, the token request, the JWKS cache, over a
//! bounded HTTP transport), `files` (reading keys and secrets, mode-checked), `clock`, `error`.

mod error;
mod files;
mod idp;
mod verify;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use jsonwebtoken::{Algorithm, EncodingKey};
use tokio::time::Instant;

#[cfg(test)]
pub use crate::clock::TestClock;
pub use crate::clock::{Clock, SystemClock};
pub use error::{IdentityError, Rejection};

use crate::audit::{Audit, Record};
use crate::config::IdentityConfig;
use idp::{ClientAuth, IdpFailure, Issuer, Transport};

/// Where this module's audit records go: `Audit::append` in the daemon, a collector in tests.
pub type RecordSink = Arc<dyn Fn(Record) + Send + Sync>;

/// An identity whose token Warden obtained and verified itself. What policy and the session records read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedIdentity {
    /// The config's identity name (`[identity.NAME]`).
    pub name: String,
    pub sub: String,
    pub client_id: String,
    pub scopes: Vec<String>,
    /// The token's groups claim, then the config's local `groups`, without duplicates.
    pub groups: Vec<String>,
    /// The token's `exp`: after this the identity is not handed out again without a fresh token.
    pub expires_at: SystemTime,
}

/// Timeouts, retries and cache bounds. The defaults suit Okta; tests shorten them.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Whole request, body included.
    pub http_timeout: Duration,
    pub connect_timeout: Duration,
    /// Tries per attempt when the provider is unreachable (network, timeout, 5xx, 429).
    pub tries: u32,
    /// Wait before the second try; doubles for each further one.
    pub retry_backoff: Duration,
    /// Clock skew allowed for `exp`, `nbf` and `iat`.
    pub leeway: Duration,
    /// At most one JWKS re-fetch for an unknown `kid` in this interval.
    pub jwks_refetch_interval: Duration,
    /// How long keys are kept when the JWKS response has no Cache-Control max-age.
    pub jwks_default_max_age: Duration,
    pub metadata_max_age: Duration,
    /// After a failed attempt, sessions get that failure without a new request for this long (doubling
    /// with each consecutive failure up to `failure_holdoff_max`), so a dead provider is not hammered.
    pub failure_holdoff: Duration,
    pub failure_holdoff_max: Duration,
    /// Refresh a token when a fifth of its lifetime remains, but no earlier than this before `exp`.
    pub refresh_margin_max: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            http_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            tries: 3,
            retry_backoff: Duration::from_millis(250),
            leeway: Duration::from_secs(30),
            jwks_refetch_interval: Duration::from_secs(10),
            jwks_default_max_age: Duration::from_hours(1),
            metadata_max_age: Duration::from_hours(1),
            failure_holdoff: Duration::from_secs(1),
            failure_holdoff_max: Duration::from_secs(30),
            refresh_margin_max: Duration::from_mins(5),
        }
    }
}

/// Every configured identity; cheap to clone (one shared state).
#[derive(Clone)]
pub struct Identities {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Identities {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identities").field("names", &self.inner.slots.keys().collect::<Vec<_>>()).finish()
    }
}

struct Inner {
    slots: BTreeMap<String, Slot>,
    clock: Arc<dyn Clock>,
    settings: Settings,
    sink: RecordSink,
    metrics: Arc<crate::metrics::Metrics>,
}

/// One identity's token as `warden status` shows it: never the token, only when it is good until.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenState {
    pub name: String,
    pub client_id: String,
    /// The cached verified token's `exp`; `None` before the first token.
    pub valid_until: Option<SystemTime>,
    /// The last failed attempt: when, and why (the error's message, which never holds a credential).
    pub last_error: Option<(SystemTime, String)>,
}

/// One identity: its resolved config, its cached verified identity and its single-flight state.
struct Slot {
    name: String,
    client_id: String,
    issuer: Arc<Issuer>,
    auth: ClientAuth,
    scopes: Vec<String>,
    audience: String,
    groups_claim: String,
    local_groups: Vec<String>,
    current: Mutex<Option<Cached>>,
    /// Attempts completed so far; a waiter compares it to tell "failed while I waited" from "failed long ago".
    completed: AtomicU64,
    /// A background refresh is running.
    refreshing: AtomicBool,
    /// The last failed attempt, for `warden status`.
    last_error: Mutex<Option<(SystemTime, String)>>,
    flight: tokio::sync::Mutex<Flight>,
}

#[derive(Clone)]
struct Cached {
    identity: Arc<VerifiedIdentity>,
    refresh_at: SystemTime,
}

#[derive(Default)]
struct Flight {
    failure: Option<Failure>,
}

struct Failure {
    error: IdentityError,
    attempt: u64,
    until: Instant,
    consecutive: u32,
}

impl Slot {
    fn cached(&self) -> Option<Cached> {
        self.current.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }
}

/// Builds [`Identities`]; `Identities::new` is the daemon's shortcut.
pub struct Builder {
    configs: Vec<(String, IdentityConfig)>,
    sink: Option<RecordSink>,
    clock: Arc<dyn Clock>,
    settings: Settings,
    transport: Option<Arc<dyn Transport>>,
    metrics: Option<Arc<crate::metrics::Metrics>>,
}

impl Builder {
    /// Records go to the audit writer (`Audit::append`; a full queue is logged).
    #[must_use]
    pub fn audit(mut self, audit: Audit) -> Self {
        self.sink = Some(Arc::new(move |record: Record| {
            if let Err(e) = audit.append(record) {
                tracing::error!(error = %e, "cannot write an identity audit record");
            }
        }));
        self
    }

    /// Records go to `sink` instead (tests).
    #[must_use]
    pub fn record_sink(mut self, sink: RecordSink) -> Self {
        self.sink = Some(sink);
        self
    }

    /// Token fetches and verifications are counted here.
    #[must_use]
    pub fn metrics(mut self, metrics: Arc<crate::metrics::Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    #[must_use]
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    #[must_use]
    pub fn settings(mut self, settings: Settings) -> Self {
        self.settings = settings;
        self
    }

    #[cfg(test)]
    fn transport(mut self, transport: Arc<dyn Transport>) -> Self {
        self.transport = Some(transport);
        self
    }

    /// Reads and checks every key and secret file and resolves each identity's settings. Nothing is
    /// fetched yet: the first `verified` call discovers the issuer and obtains the first token.
    pub fn build(self) -> Result<Identities, IdentityError> {
        // jsonwebtoken picks its crypto backend per process; name ours, so no other crate's choice can
        // leave it undecided. An Err means one is installed already, which is fine.
        let _ = jsonwebtoken::crypto::rust_crypto::DEFAULT_PROVIDER.install_default();
        let transport: Arc<dyn Transport> = match self.transport {
            Some(t) => t,
            None => {
                Arc::new(idp::HttpTransport::new(&self.settings).map_err(|detail| IdentityError::Config {
                    identity: String::new(),
                    detail: format!("cannot build the HTTP client: {detail}"),
                })?)
            }
        };
        let mut issuers: BTreeMap<String, Arc<Issuer>> = BTreeMap::new();
        let mut slots = BTreeMap::new();
        for (name, config) in self.configs {
            let config_error = |detail: String| IdentityError::Config { identity: name.clone(), detail };
            idp::check_url(&config.issuer).map_err(|m| config_error(format!("issuer {m}")))?;
            if config.client_id.is_empty() {
                return Err(config_error("client_id is empty".into()));
            }
            if config.audience.is_empty() {
                return Err(config_error(
                    "audience is empty; set it to the authorization server's audience".into(),
                ));
            }
            let auth = client_auth(&name, &config)?;
            let issuer = issuers
                .entry(config.issuer.clone())
                .or_insert_with(|| {
                    Arc::new(Issuer::new(config.issuer.clone(), transport.clone(), self.settings.clone()))
                })
                .clone();
            let slot = Slot {
                name: name.clone(),
                client_id: config.client_id,
                issuer,
                auth,
                scopes: config.scopes,
                audience: config.audience,
                groups_claim: config.groups_claim,
                local_groups: config.groups,
                current: Mutex::new(None),
                completed: AtomicU64::new(0),
                refreshing: AtomicBool::new(false),
                last_error: Mutex::new(None),
                flight: tokio::sync::Mutex::new(Flight::default()),
            };
            slots.insert(name, slot);
        }
        let sink = self.sink.unwrap_or_else(|| Arc::new(|_| {}));
        let metrics = self.metrics.unwrap_or_else(crate::metrics::unserved);
        Ok(Identities {
            inner: Arc::new(Inner { slots, clock: self.clock, settings: self.settings, sink, metrics }),
        })
    }
}

fn client_auth(name: &str, config: &IdentityConfig) -> Result<ClientAuth, IdentityError> {
    let config_error = |detail: String| IdentityError::Config { identity: name.to_owned(), detail };
    let method = config.token_endpoint_auth_method.as_deref();
    match (&config.private_key_file, &config.client_secret_file) {
        (Some(path), None) => {
            if !matches!(method, None | Some("private_key_jwt")) {
                return Err(config_error(format!(
                    "token_endpoint_auth_method `{}` does not go with private_key_file; use private_key_jwt or a client_secret_file",
                    method.unwrap_or_default()
                )));
            }
            let pem = files::read_credential(name, path)?;
            let (alg, parsed) = match config.private_key_alg.as_deref() {
                None | Some("RS256") => {
                    ("RS256", EncodingKey::from_rsa_pem(&pem).map(|k| (Algorithm::RS256, k)))
                }
                Some("ES256") => ("ES256", EncodingKey::from_ec_pem(&pem).map(|k| (Algorithm::ES256, k))),
                Some(other) => {
                    return Err(config_error(format!(
                        "private_key_alg `{other}` is not supported; use RS256 or ES256"
                    )));
                }
            };
            let (alg_value, key) = parsed.map_err(|e| IdentityError::BadPrivateKey {
                identity: name.to_owned(),
                path: path.clone(),
                alg,
                detail: if pem.windows(20).any(|w| w == b"BEGIN EC PRIVATE KEY") {
                    "a SEC1 EC key; convert it with `openssl pkcs8 -topk8 -nocrypt`".into()
                } else {
                    e.to_string()
                },
            })?;
            Ok(ClientAuth::PrivateKeyJwt { key, alg: alg_value, kid: config.private_key_id.clone() })
        }
        (None, Some(path)) => {
            let secret = files::read_client_secret(name, path)?;
            match method {
                None | Some("client_secret_basic") => Ok(ClientAuth::SecretBasic(secret)),
                Some("client_secret_post") => Ok(ClientAuth::SecretPost(secret)),
                Some(other) => Err(config_error(format!(
                    "token_endpoint_auth_method `{other}` does not go with client_secret_file; use client_secret_basic or client_secret_post"
                ))),
            }
        }
        (None, None) => Err(config_error("set private_key_file or client_secret_file".into())),
        (Some(_), Some(_)) => {
            Err(config_error("set only one of private_key_file and client_secret_file".into()))
        }
    }
}

impl Identities {
    /// The daemon's constructor: `Identities::new(&identities, audit)` with a `BTreeMap<String,
    /// IdentityConfig>`, or `config.identity.iter().map(|(n, c)| (n, c.get_ref()))`.
    pub fn new<'a>(
        identities: impl IntoIterator<Item = (&'a String, &'a IdentityConfig)>,
        audit: Audit,
    ) -> Result<Self, IdentityError> {
        Self::builder(identities).audit(audit).build()
    }

    pub fn builder<'a>(identities: impl IntoIterator<Item = (&'a String, &'a IdentityConfig)>) -> Builder {
        Builder {
            configs: identities.into_iter().map(|(n, c)| (n.clone(), c.clone())).collect(),
            sink: None,
            clock: Arc::new(SystemClock),
            settings: Settings::default(),
            transport: None,
            metrics: None,
        }
    }

    /// Every identity's token state, by name.
    pub fn states(&self) -> Vec<TokenState> {
        self.inner
            .slots
            .values()
            .map(|slot| TokenState {
                name: slot.name.clone(),
                client_id: slot.client_id.clone(),
                valid_until: slot.cached().map(|c| c.identity.expires_at),
                last_error: slot.last_error.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone(),
            })
            .collect()
    }

    /// Whether an identity of this name is configured.
    pub fn contains(&self, name: &str) -> bool {
        self.inner.slots.contains_key(name)
    }

    /// Obtains every identity's first token at once, so the first sessions do not wait for the provider.
    /// Failures are recorded and logged as usual; the daemon may spawn this at start.
    pub async fn warm_up(&self) {
        let mut set = tokio::task::JoinSet::new();
        for name in self.inner.slots.keys() {
            let this = self.clone();
            let name = name.clone();
            set.spawn(async move { drop(this.verified(&name).await) });
        }
        while set.join_next().await.is_some() {}
    }

    /// The verified identity `name` stands for now: cached while its token is fresh, otherwise obtained
    /// and verified (one request however many sessions ask at once). Refused with the reason when no
    /// valid, verified token can be had.
    pub async fn verified(&self, name: &str) -> Result<Arc<VerifiedIdentity>, IdentityError> {
        let slot = self
            .inner
            .slots
            .get(name)
            .ok_or_else(|| IdentityError::UnknownIdentity { name: name.to_owned() })?;
        let clock = self.inner.clock.as_ref();
        let seen = slot.completed.load(Ordering::Acquire);
        if let Some(cached) = slot.cached() {
            let now = clock.now();
            if now < cached.refresh_at {
                return Ok(cached.identity);
            }
            if now < cached.identity.expires_at {
                // Due for refresh but still valid: refresh in the background; no session waits for it.
                self.refresh_in_background(slot);
                return Ok(cached.identity);
            }
        }
        let mut flight = slot.flight.lock().await;
        if let Some(cached) = slot.cached()
            && clock.now() < cached.identity.expires_at
        {
            return Ok(cached.identity);
        }
        if let Some(failure) = &flight.failure
            && (failure.attempt > seen || Instant::now() < failure.until)
        {
            return Err(failure.error.clone());
        }
        self.attempt(slot, &mut flight).await
    }

    /// Starts one background refresh for `slot` unless one is running. It takes the flight lock, so a
    /// session whose identity has expired meanwhile waits for it rather than starting another request.
    fn refresh_in_background(&self, slot: &Slot) {
        if slot.refreshing.swap(true, Ordering::AcqRel) {
            return;
        }
        let this = self.clone();
        let name = slot.name.clone();
        tokio::spawn(async move {
            let Some(slot) = this.inner.slots.get(&name) else { return };
            {
                let mut flight = slot.flight.lock().await;
                let due = slot.cached().is_none_or(|c| this.inner.clock.now() >= c.refresh_at);
                let held_off = flight.failure.as_ref().is_some_and(|f| Instant::now() < f.until);
                if due && !held_off {
                    // The outcome is cached or recorded by `attempt`; sessions read it from there.
                    let _ = this.attempt(slot, &mut flight).await;
                }
            }
            slot.refreshing.store(false, Ordering::Release);
        });
    }

    /// One attempt (with its tries): obtain, verify, cache, or record why not.
    async fn attempt(
        &self,
        slot: &Slot,
        flight: &mut Flight,
    ) -> Result<Arc<VerifiedIdentity>, IdentityError> {
        let started = Instant::now();
        let result = self.obtain(slot).await;
        let attempt = slot.completed.fetch_add(1, Ordering::AcqRel) + 1;
        let outcome = match &result {
            Ok(_) => "ok",
            Err(IdpFailure::Unreachable(_)) => "idp_unreachable",
            Err(IdpFailure::BadDiscovery(_)) => "bad_discovery",
            Err(IdpFailure::Refused { .. }) => "token_request_refused",
            Err(IdpFailure::Rejected(_)) => "token_rejected",
        };
        self.inner.metrics.token_fetched(&slot.name, outcome, started.elapsed());
        match result {
            Ok(cached) => {
                tracing::info!(
                    identity = %slot.name,
                    sub = %cached.identity.sub,
                    client_id = %cached.identity.client_id,
                    groups = ?cached.identity.groups,
                    "identity verified"
                );
                flight.failure = None;
                let identity = cached.identity.clone();
                *slot.current.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(cached);
                Ok(identity)
            }
            Err(failure) => {
                let error = Self::error_for(slot, failure);
                self.record(slot, &error);
                *slot.last_error.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
                    Some((self.inner.clock.now(), error.to_string()));
                let consecutive = flight.failure.as_ref().map_or(0, |f| f.consecutive) + 1;
                let settings = &self.inner.settings;
                let holdoff = settings
                    .failure_holdoff
                    .saturating_mul(1 << (consecutive - 1).min(16))
                    .min(settings.failure_holdoff_max);
                flight.failure = Some(Failure {
                    error: error.clone(),
                    attempt,
                    until: Instant::now() + holdoff,
                    consecutive,
                });
                Err(error)
            }
        }
    }

    /// Obtains and verifies a token, retrying while the provider is unreachable.
    async fn obtain(&self, slot: &Slot) -> Result<Cached, IdpFailure> {
        let settings = &self.inner.settings;
        let mut backoff = settings.retry_backoff;
        let mut tries = 1;
        loop {
            match self.obtain_once(slot).await {
                Err(IdpFailure::Unreachable(detail)) if tries < settings.tries.max(1) => {
                    tracing::debug!(identity = %slot.name, try_ = tries, %detail, "identity provider unreachable; retrying");
                    slot.issuer.forget_metadata().await;
                    tokio::time::sleep(backoff).await;
                    backoff = backoff.saturating_mul(2);
                    tries += 1;
                }
                other => return other,
            }
        }
    }

    async fn obtain_once(&self, slot: &Slot) -> Result<Cached, IdpFailure> {
        let clock = self.inner.clock.as_ref();
        let token = slot.issuer.request_token(&slot.client_id, &slot.auth, &slot.scopes, clock).await?;
        let metrics = &self.inner.metrics;
        let parsed = verify::parse(token.expose()).map_err(|r| {
            metrics.token_verified(&slot.name, r.reason.as_str());
            IdpFailure::Rejected(r)
        })?;
        let keys = slot.issuer.keys(parsed.kid.as_deref()).await?;
        let expected = verify::Expected {
            issuer: &slot.issuer.id,
            audience: &slot.audience,
            client_id: &slot.client_id,
            groups_claim: &slot.groups_claim,
            leeway: self.inner.settings.leeway,
        };
        let now = clock.now();
        let claims = verify::verify(&parsed, &keys, &expected, now).map_err(|r| {
            metrics.token_verified(&slot.name, r.reason.as_str());
            IdpFailure::Rejected(r)
        })?;
        metrics.token_verified(&slot.name, "ok");
        let mut groups: Vec<String> = Vec::with_capacity(claims.groups.len() + slot.local_groups.len());
        for g in claims.groups.into_iter().chain(slot.local_groups.iter().cloned()) {
            if !groups.contains(&g) {
                groups.push(g);
            }
        }
        let lifetime = claims.expires_at.duration_since(now).unwrap_or_default();
        let margin = (lifetime / 5).min(self.inner.settings.refresh_margin_max);
        let identity = VerifiedIdentity {
            name: slot.name.clone(),
            sub: claims.sub,
            client_id: claims.client_id,
            scopes: claims.scopes,
            groups,
            expires_at: claims.expires_at,
        };
        Ok(Cached { identity: Arc::new(identity), refresh_at: claims.expires_at - margin })
    }

    fn error_for(slot: &Slot, failure: IdpFailure) -> IdentityError {
        let identity = slot.name.clone();
        let issuer = slot.issuer.id.clone();
        match failure {
            IdpFailure::Unreachable(detail) => IdentityError::IdpUnreachable { identity, issuer, detail },
            IdpFailure::BadDiscovery(detail) => IdentityError::BadDiscovery { identity, issuer, detail },
            IdpFailure::Refused { status, error } => {
                IdentityError::TokenRequestRefused { identity, status, error }
            }
            IdpFailure::Rejected(r) => {
                IdentityError::TokenRejected { identity, reason: r.reason, detail: r.detail }
            }
        }
    }

    /// One record per failed attempt: `idp.unreachable` when the provider cannot be used, otherwise
    /// `token.rejected` with the reason.
    fn record(&self, slot: &Slot, error: &IdentityError) {
        tracing::warn!(identity = %slot.name, reason = error.reason(), "{error}");
        let record = match error {
            IdentityError::IdpUnreachable { detail, .. } | IdentityError::BadDiscovery { detail, .. } => {
                Record::new("idp.unreachable")
                    .field("identity", &slot.name)
                    .field("issuer", &slot.issuer.id)
                    .field("reason", error.reason())
                    .field("detail", detail)
            }
            other => {
                let detail = match other {
                    IdentityError::TokenRejected { detail, .. } => detail.clone(),
                    IdentityError::TokenRequestRefused { status, error, .. } => {
                        format!("the token endpoint answered HTTP {status}: {error}")
                    }
                    other => other.to_string(),
                };
                Record::new("token.rejected")
                    .field("identity", &slot.name)
                    .field("client_id", &slot.client_id)
                    .field("reason", other.reason())
                    .field("detail", detail)
            }
        };
        (self.inner.sink)(record);
    }
}

#[cfg(test)]
mod tests;
