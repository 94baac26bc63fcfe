//! Pure token verification: a compact JWS, the issuer's keys, what is expected, and the time in; the
//! claims policy needs, or precisely why not, out. No I/O, so every forged token is a unit test.
//!
//! Order: size, structure, header (`alg` on the allow-list), payload JSON, key by `kid`, `alg` against
//! the key, signature, then claims. The signature is never copied into a detail.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};
use serde_json::{Map, Value};

use super::Rejection;

/// Tokens above this size are refused before any parsing.
pub(crate) const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// The only algorithms a token may be signed with: asymmetric ones.
const ALLOWED: &[(&str, Algorithm)] = &[
    ("RS256", Algorithm::RS256),
    ("RS384", Algorithm::RS384),
    ("RS512", Algorithm::RS512),
    ("PS256", Algorithm::PS256),
    ("PS384", Algorithm::PS384),
    ("PS512", Algorithm::PS512),
    ("ES256", Algorithm::ES256),
    ("ES384", Algorithm::ES384),
    ("EdDSA", Algorithm::EdDSA),
];

fn alg_name(alg: Algorithm) -> &'static str {
    ALLOWED.iter().find(|(_, a)| *a == alg).map_or("?", |(n, _)| n)
}

/// A refusal with its reason and a detail for the record (never a token's secret parts).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Rejected {
    pub reason: Rejection,
    pub detail: String,
}

fn reject<T>(reason: Rejection, detail: impl Into<String>) -> Result<T, Rejected> {
    Err(Rejected { reason, detail: detail.into() })
}

/// One verification key from a JWKS, with the algorithms it may verify (from its `alg`, else its type).
#[derive(Clone)]
pub(crate) struct VerifyKey {
    kid: Option<String>,
    algs: Vec<Algorithm>,
    key: DecodingKey,
}

/// The issuer's signing keys.
#[derive(Clone, Default)]
pub(crate) struct KeySet {
    keys: Vec<VerifyKey>,
}

impl KeySet {
    /// Parses a JWKS document. Keys Warden cannot use for signatures (symmetric, encryption, unknown
    /// types or curves) are skipped and counted; a document that is not a JWKS is an error.
    pub(crate) fn from_jwks(bytes: &[u8]) -> Result<(Self, usize), String> {
        let doc: Value = serde_json::from_slice(bytes).map_err(|e| format!("JWKS is not JSON: {e}"))?;
        let keys = doc.get("keys").and_then(Value::as_array).ok_or("JWKS has no `keys` array")?;
        let mut set = Self::default();
        let mut skipped = 0;
        for key in keys {
            match serde_json::from_value::<Jwk>(key.clone()).ok().and_then(|jwk| Self::usable(&jwk)) {
                Some(k) => set.keys.push(k),
                None => skipped += 1,
            }
        }
        Ok((set, skipped))
    }

    fn usable(jwk: &Jwk) -> Option<VerifyKey> {
        if matches!(jwk.common.public_key_use, Some(ref u) if *u != PublicKeyUse::Signature) {
            return None;
        }
        let by_type: Vec<Algorithm> = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => vec![
                Algorithm::RS256,
                Algorithm::RS384,
                Algorithm::RS512,
                Algorithm::PS256,
                Algorithm::PS384,
                Algorithm::PS512,
            ],
            AlgorithmParameters::EllipticCurve(p) => match p.curve {
                EllipticCurve::P256 => vec![Algorithm::ES256],
                EllipticCurve::P384 => vec![Algorithm::ES384],
                _ => return None,
            },
            AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => {
                vec![Algorithm::EdDSA]
            }
            _ => return None,
        };
        let algs = match jwk.common.key_algorithm {
            None => by_type,
            Some(declared) => {
                let declared = key_alg(declared)?;
                // A key that declares an algorithm its type cannot do is unusable, not widened.
                if !by_type.contains(&declared) {
                    return None;
                }
                vec![declared]
            }
        };
        let key = DecodingKey::from_jwk(jwk).ok()?;
        Some(VerifyKey { kid: jwk.common.key_id.clone(), algs, key })
    }

    pub(crate) fn has_kid(&self, kid: &str) -> bool {
        self.keys.iter().any(|k| k.kid.as_deref() == Some(kid))
    }

    pub(crate) fn len(&self) -> usize {
        self.keys.len()
    }
}

fn key_alg(alg: KeyAlgorithm) -> Option<Algorithm> {
    Some(match alg {
        KeyAlgorithm::RS256 => Algorithm::RS256,
        KeyAlgorithm::RS384 => Algorithm::RS384,
        KeyAlgorithm::RS512 => Algorithm::RS512,
        KeyAlgorithm::PS256 => Algorithm::PS256,
        KeyAlgorithm::PS384 => Algorithm::PS384,
        KeyAlgorithm::PS512 => Algorithm::PS512,
        KeyAlgorithm::ES256 => Algorithm::ES256,
        KeyAlgorithm::ES384 => Algorithm::ES384,
        KeyAlgorithm::EdDSA => Algorithm::EdDSA,
        _ => return None,
    })
}

/// A token split and decoded, its signature not yet checked.
pub(crate) struct Parsed<'t> {
    alg: Algorithm,
    pub kid: Option<String>,
    claims: Map<String, Value>,
    signing_input: &'t str,
    signature: &'t str,
}

fn b64_json(part: &str, what: &str) -> Result<Map<String, Value>, Rejected> {
    let Ok(bytes) = URL_SAFE_NO_PAD.decode(part) else {
        return reject(Rejection::Malformed, format!("the {what} is not base64url"));
    };
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => reject(Rejection::Malformed, format!("the {what} is not a JSON object")),
        Err(e) => reject(Rejection::Malformed, format!("the {what} is not JSON ({})", e.classify_name())),
    }
}

trait ClassifyName {
    fn classify_name(&self) -> &'static str;
}

impl ClassifyName for serde_json::Error {
    fn classify_name(&self) -> &'static str {
        match self.classify() {
            serde_json::error::Category::Io => "io",
            serde_json::error::Category::Syntax => "syntax error",
            serde_json::error::Category::Data => "unexpected data",
            serde_json::error::Category::Eof => "truncated",
        }
    }
}

/// Splits and decodes a token; refuses oversized, malformed and non-allow-listed ones.
pub(crate) fn parse(token: &str) -> Result<Parsed<'_>, Rejected> {
    if token.len() > MAX_TOKEN_BYTES {
        return reject(
            Rejection::TooLarge,
            format!("token is {} bytes; the limit is {MAX_TOKEN_BYTES}", token.len()),
        );
    }
    let parts: Vec<&str> = token.split('.').collect();
    if parts.len() != 3 {
        return reject(
            Rejection::Malformed,
            format!("a signed JWT has 3 dot-separated parts; this token has {}", parts.len()),
        );
    }
    let header = b64_json(parts[0], "header")?;
    let alg = match header.get("alg") {
        Some(Value::String(name)) => {
            if let Some((_, alg)) = ALLOWED.iter().find(|(n, _)| n == name) {
                *alg
            } else {
                let allowed: Vec<&str> = ALLOWED.iter().map(|(n, _)| *n).collect();
                return reject(
                    Rejection::AlgNotAllowed,
                    format!("alg `{}` is not allowed; only {}", printable(name), allowed.join(", ")),
                );
            }
        }
        _ => return reject(Rejection::Malformed, "the header has no string `alg`"),
    };
    if header.contains_key("crit") {
        return reject(Rejection::Malformed, "the header has `crit` extensions Warden does not understand");
    }
    let kid = match header.get("kid") {
        None => None,
        Some(Value::String(kid)) => Some(kid.clone()),
        Some(_) => return reject(Rejection::Malformed, "the header's `kid` is not a string"),
    };
    let claims = b64_json(parts[1], "payload")?;
    if parts[2].is_empty() {
        return reject(Rejection::Malformed, "the token has no signature");
    }
    let signing_input = &token[..parts[0].len() + 1 + parts[1].len()];
    Ok(Parsed { alg, kid, claims, signing_input, signature: parts[2] })
}

/// What a token must say to stand for one identity.
pub(crate) struct Expected<'a> {
    pub issuer: &'a str,
    pub audience: &'a str,
    pub client_id: &'a str,
    pub groups_claim: &'a str,
    pub leeway: Duration,
}

/// The verified claims policy reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Claims {
    pub sub: String,
    pub client_id: String,
    pub scopes: Vec<String>,
    pub groups: Vec<String>,
    pub expires_at: SystemTime,
    pub issued_at: Option<SystemTime>,
}

/// Checks the signature against `keys` and the claims against `expected` at `now`.
pub(crate) fn verify(
    parsed: &Parsed<'_>,
    keys: &KeySet,
    expected: &Expected<'_>,
    now: SystemTime,
) -> Result<Claims, Rejected> {
    let Some(kid) = parsed.kid.as_deref() else {
        return reject(Rejection::UnknownKid, "the header has no `kid`; the issuer's tokens name their key");
    };
    let Some(key) = keys.keys.iter().find(|k| k.kid.as_deref() == Some(kid)) else {
        return reject(
            Rejection::UnknownKid,
            format!("no key `{}` in the issuer's JWKS ({} keys)", printable(kid), keys.len()),
        );
    };
    if !key.algs.contains(&parsed.alg) {
        let can: Vec<&str> = key.algs.iter().map(|a| alg_name(*a)).collect();
        return reject(
            Rejection::AlgMismatch,
            format!(
                "alg {} does not match key `{}`, which is for {}",
                alg_name(parsed.alg),
                printable(kid),
                can.join("/")
            ),
        );
    }
    match jsonwebtoken::crypto::verify(
        parsed.signature,
        parsed.signing_input.as_bytes(),
        &key.key,
        parsed.alg,
    ) {
        Ok(true) => {}
        Ok(false) => {
            return reject(
                Rejection::BadSignature,
                format!("the signature does not verify with key `{}`", printable(kid)),
            );
        }
        Err(e) => {
            let reason = if matches!(e.kind(), jsonwebtoken::errors::ErrorKind::Base64(_)) {
                Rejection::Malformed
            } else {
                Rejection::BadSignature
            };
            return reject(
                reason,
                format!("the signature cannot be checked with key `{}`: {e}", printable(kid)),
            );
        }
    }
    check_claims(&parsed.claims, expected, now)
}

fn check_claims(
    claims: &Map<String, Value>,
    expected: &Expected<'_>,
    now: SystemTime,
) -> Result<Claims, Rejected> {
    match claims.get("iss") {
        Some(Value::String(iss)) if iss == expected.issuer => {}
        Some(Value::String(iss)) => {
            return reject(
                Rejection::WrongIssuer,
                format!("iss `{}` is not the configured issuer `{}`", printable(iss), expected.issuer),
            );
        }
        _ => return reject(Rejection::WrongIssuer, "the token has no string `iss`"),
    }
    let audiences: Vec<&str> = match claims.get("aud") {
        Some(Value::String(aud)) => vec![aud.as_str()],
        Some(Value::Array(auds)) => auds.iter().filter_map(Value::as_str).collect(),
        _ => return reject(Rejection::WrongAudience, "the token has no `aud`"),
    };
    if !audiences.contains(&expected.audience) {
        let shown: Vec<String> = audiences.iter().map(|a| printable(a)).collect();
        return reject(
            Rejection::WrongAudience,
            format!(
                "aud [{}] does not include the configured audience `{}`",
                shown.join(", "),
                expected.audience
            ),
        );
    }
    let leeway = expected.leeway;
    let Some(exp) = numeric_date(claims, "exp")? else {
        return reject(
            Rejection::InvalidClaim,
            "the token has no `exp`; Warden only accepts tokens that expire",
        );
    };
    if now > exp + leeway {
        return reject(Rejection::Expired, format!("expired {}s ago", secs(now.duration_since(exp))));
    }
    if let Some(nbf) = numeric_date(claims, "nbf")?
        && nbf > now + leeway
    {
        return reject(
            Rejection::NotYetValid,
            format!("not valid for another {}s (nbf)", secs(nbf.duration_since(now))),
        );
    }
    let issued_at = numeric_date(claims, "iat")?;
    if let Some(iat) = issued_at
        && iat > now + leeway
    {
        return reject(
            Rejection::NotYetValid,
            format!("issued {}s in the future (iat)", secs(iat.duration_since(now))),
        );
    }
    let sub = match claims.get("sub") {
        Some(Value::String(sub)) if !sub.is_empty() => sub.clone(),
        _ => return reject(Rejection::InvalidClaim, "the token has no string `sub`"),
    };
    let client_id = match claims.get("cid") {
        Some(Value::String(cid)) => cid.clone(),
        Some(_) => return reject(Rejection::InvalidClaim, "`cid` is not a string"),
        None => sub.clone(),
    };
    if client_id != expected.client_id {
        return reject(
            Rejection::WrongClient,
            format!(
                "the token is for client `{}`, not this identity's `{}`",
                printable(&client_id),
                expected.client_id
            ),
        );
    }
    let scopes = match (claims.get("scp"), claims.get("scope")) {
        (Some(scp), _) => strings(scp, "scp")?,
        (None, Some(Value::String(scope))) => scope.split_whitespace().map(str::to_owned).collect(),
        (None, Some(_)) => return reject(Rejection::InvalidClaim, "`scope` is not a string"),
        (None, None) => Vec::new(),
    };
    // Okta service apps carry no groups: a missing claim is no groups, not an error. A single string is
    // one group (what an Okta claim expression yields for one value). Anything else is refused, since
    // policy matches on groups and a claim Warden cannot read must not be guessed at.
    let groups = match claims.get(expected.groups_claim) {
        None | Some(Value::Null) => Vec::new(),
        Some(value) => strings(value, expected.groups_claim)?,
    };
    Ok(Claims { sub, client_id, scopes, groups, expires_at: exp, issued_at })
}

/// A string (split on whitespace) or an array of strings.
fn strings(value: &Value, name: &str) -> Result<Vec<String>, Rejected> {
    match value {
        Value::String(s) => Ok(s.split_whitespace().map(str::to_owned).collect()),
        Value::Array(items) => items
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.clone()),
                other => reject(
                    Rejection::InvalidClaim,
                    format!(
                        "`{}` must be an array of strings; it holds {}",
                        printable(name),
                        type_name(other)
                    ),
                ),
            })
            .collect(),
        other => reject(
            Rejection::InvalidClaim,
            format!(
                "`{}` must be an array of strings or a string; it is {}",
                printable(name),
                type_name(other)
            ),
        ),
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn numeric_date(claims: &Map<String, Value>, name: &str) -> Result<Option<SystemTime>, Rejected> {
    let Some(value) = claims.get(name) else { return Ok(None) };
    let secs = value.as_f64().filter(|s| s.is_finite() && *s >= 0.0 && *s < 1e11);
    match secs {
        Some(s) => Ok(Some(UNIX_EPOCH + Duration::from_secs_f64(s))),
        None => reject(Rejection::InvalidClaim, format!("`{name}` is not a NumericDate")),
    }
}

fn secs(d: Result<Duration, std::time::SystemTimeError>) -> u64 {
    d.map_or(0, |d| d.as_secs())
}

/// A claim value fit for a log line: bounded, without control characters.
pub(crate) fn printable(s: &str) -> String {
    let mut out: String = s.chars().take(128).map(|c| if c.is_control() { '?' } else { c }).collect();
    if s.chars().count() > 128 {
        out.push('…');
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use jsonwebtoken::{EncodingKey, Header};
    use serde_json::json;

    use super::*;

    pub(crate) const ISSUER: &str = "http://127.0.0.1:9/oauth2/default";
    pub(crate) const AUDIENCE: &str = "api://warden";
    pub(crate) const CLIENT: &str = "0oa-research-bot";

    pub(crate) fn testdata(name: &str) -> Vec<u8> {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/identity/testdata").join(name);
        std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    /// A public JWK from testdata with the given `kid`.
    pub(crate) fn jwk(name: &str, kid: &str) -> Value {
        let mut jwk: Value = serde_json::from_slice(&testdata(&format!("{name}.jwk.json"))).unwrap();
        jwk["kid"] = json!(kid);
        jwk
    }

    pub(crate) fn rsa_key(name: &str) -> EncodingKey {
        EncodingKey::from_rsa_pem(&testdata(&format!("{name}.pem"))).unwrap()
    }

    pub(crate) fn now() -> SystemTime {
        UNIX_EPOCH + Duration::from_hours(500_000)
    }

    pub(crate) fn unix(t: SystemTime) -> u64 {
        t.duration_since(UNIX_EPOCH).unwrap().as_secs()
    }

    /// Claims as the Okta-shaped provider issues them, valid at `now()` for an hour.
    pub(crate) fn good_claims() -> Value {
        let now = unix(now());
        json!({
            "ver": 1, "jti": "AT.x", "iss": ISSUER, "aud": AUDIENCE, "iat": now, "exp": now + 3600,
            "cid": CLIENT, "sub": CLIENT, "scp": ["warden.connect"], "groups": ["agents-research"],
        })
    }

    pub(crate) fn sign(alg: Algorithm, kid: &str, claims: &Value, key: &EncodingKey) -> String {
        let mut header = Header::new(alg);
        header.kid = Some(kid.to_owned());
        jsonwebtoken::encode(&header, claims, key).unwrap()
    }

    fn keys() -> KeySet {
        let jwks = json!({ "keys": [jwk("idp_rsa_a", "kA"), jwk("idp_ec", "kE")] });
        let (set, skipped) = KeySet::from_jwks(jwks.to_string().as_bytes()).unwrap();
        assert_eq!((set.len(), skipped), (2, 0));
        set
    }

    fn expected() -> Expected<'static> {
        Expected {
            issuer: ISSUER,
            audience: AUDIENCE,
            client_id: CLIENT,
            groups_claim: "groups",
            leeway: Duration::from_secs(30),
        }
    }

    fn check(token: &str) -> Result<Claims, Rejected> {
        let parsed = parse(token)?;
        verify(&parsed, &keys(), &expected(), now())
    }

    fn reason(token: &str) -> Rejection {
        match check(token) {
            Ok(c) => panic!("accepted: {c:?}"),
            Err(r) => {
                let signature = token.rsplit('.').next().unwrap_or("");
                assert!(signature.len() < 8 || !r.detail.contains(signature), "{r:?}");
                r.reason
            }
        }
    }

    fn b64(v: &Value) -> String {
        URL_SAFE_NO_PAD.encode(v.to_string())
    }

    fn with(claims: impl FnOnce(&mut Value)) -> String {
        let mut c = good_claims();
        claims(&mut c);
        sign(Algorithm::RS256, "kA", &c, &rsa_key("idp_rsa_a"))
    }

    #[test]
    fn a_good_token_yields_its_claims() {
        let claims = check(&with(|_| {})).unwrap();
        assert_eq!(claims.sub, CLIENT);
        assert_eq!(claims.client_id, CLIENT);
        assert_eq!(claims.scopes, ["warden.connect"]);
        assert_eq!(claims.groups, ["agents-research"]);
        assert_eq!(unix(claims.expires_at), unix(now()) + 3600);
    }

    #[test]
    fn an_es256_token_verifies_with_the_ec_key() {
        let key = EncodingKey::from_ec_pem(&testdata("idp_ec.pem")).unwrap();
        let token = sign(Algorithm::ES256, "kE", &good_claims(), &key);
        assert_eq!(check(&token).unwrap().sub, CLIENT);
    }

    #[test]
    fn alg_none_is_refused() {
        let header = json!({ "alg": "none", "kid": "kA" });
        let token = format!("{}.{}.", b64(&header), b64(&good_claims()));
        assert_eq!(reason(&token), Rejection::AlgNotAllowed);
        let token = format!("{}.{}.c2ln", b64(&json!({ "alg": "None", "kid": "kA" })), b64(&good_claims()));
        assert_eq!(reason(&token), Rejection::AlgNotAllowed);
    }

    #[test]
    fn hs256_signed_with_the_public_key_is_refused() {
        let forged = EncodingKey::from_secret(&testdata("idp_rsa_a.pub.pem"));
        let token = sign(Algorithm::HS256, "kA", &good_claims(), &forged);
        assert_eq!(reason(&token), Rejection::AlgNotAllowed);
        let jwk_secret = EncodingKey::from_secret(jwk("idp_rsa_a", "kA").to_string().as_bytes());
        assert_eq!(
            reason(&sign(Algorithm::HS512, "kA", &good_claims(), &jwk_secret)),
            Rejection::AlgNotAllowed
        );
    }

    #[test]
    fn the_wrong_key_with_the_right_kid_is_a_bad_signature() {
        let token = sign(Algorithm::RS256, "kA", &good_claims(), &rsa_key("other_rsa"));
        assert_eq!(reason(&token), Rejection::BadSignature);
    }

    #[test]
    fn an_alg_that_does_not_match_the_key_is_refused() {
        // ES256 claimed for the RSA key's kid, and RS256 for the EC key's.
        let ec = EncodingKey::from_ec_pem(&testdata("idp_ec.pem")).unwrap();
        assert_eq!(reason(&sign(Algorithm::ES256, "kA", &good_claims(), &ec)), Rejection::AlgMismatch);
        assert_eq!(
            reason(&sign(Algorithm::RS256, "kE", &good_claims(), &rsa_key("idp_rsa_a"))),
            Rejection::AlgMismatch
        );
        // PS256 with a key the JWKS declares RS256-only.
        assert_eq!(
            reason(&sign(Algorithm::PS256, "kA", &good_claims(), &rsa_key("idp_rsa_a"))),
            Rejection::AlgMismatch
        );
    }

    #[test]
    fn unknown_and_missing_kids_are_refused() {
        assert_eq!(
            reason(&sign(Algorithm::RS256, "nope", &good_claims(), &rsa_key("idp_rsa_a"))),
            Rejection::UnknownKid
        );
        let token =
            jsonwebtoken::encode(&Header::new(Algorithm::RS256), &good_claims(), &rsa_key("idp_rsa_a"))
                .unwrap();
        assert_eq!(reason(&token), Rejection::UnknownKid);
    }

    #[test]
    fn time_claims_are_checked_with_leeway() {
        let t = unix(now());
        assert_eq!(reason(&with(|c| c["exp"] = json!(t - 31))), Rejection::Expired);
        assert!(check(&with(|c| c["exp"] = json!(t - 29))).is_ok(), "within leeway");
        assert_eq!(reason(&with(|c| c["nbf"] = json!(t + 31))), Rejection::NotYetValid);
        assert!(check(&with(|c| c["nbf"] = json!(t + 29))).is_ok(), "within leeway");
        assert_eq!(reason(&with(|c| c["iat"] = json!(t + 600))), Rejection::NotYetValid);
        assert_eq!(
            reason(&with(|c| c.as_object_mut().unwrap().remove("exp").map(drop).unwrap())),
            Rejection::InvalidClaim
        );
        assert_eq!(reason(&with(|c| c["exp"] = json!("tomorrow"))), Rejection::InvalidClaim);
        assert!(check(&with(|c| c["exp"] = json!(1_800_000_010.5))).is_ok(), "fractional NumericDate");
    }

    #[test]
    fn issuer_audience_and_client_are_exact() {
        assert_eq!(
            reason(&with(|c| c["iss"] = json!("http://127.0.0.1:9/oauth2/other"))),
            Rejection::WrongIssuer
        );
        assert_eq!(reason(&with(|c| c["iss"] = json!(format!("{ISSUER}/")))), Rejection::WrongIssuer);
        assert_eq!(reason(&with(|c| c["aud"] = json!("api://other"))), Rejection::WrongAudience);
        assert!(check(&with(|c| c["aud"] = json!(["api://other", AUDIENCE]))).is_ok());
        assert_eq!(reason(&with(|c| c["aud"] = json!(["api://other"]))), Rejection::WrongAudience);
        // A valid token for another client: refused even though everything else is right.
        assert_eq!(reason(&with(|c| c["cid"] = json!("0oa-other"))), Rejection::WrongClient);
        // Without `cid`, `sub` must be the client.
        let no_cid = |c: &mut Value| {
            c.as_object_mut().unwrap().remove("cid");
            c["sub"] = json!("0oa-other");
        };
        assert_eq!(reason(&with(no_cid)), Rejection::WrongClient);
        let err = check(&with(|c| c["aud"] = json!("api://other"))).unwrap_err();
        assert_eq!(err.detail, "aud [api://other] does not include the configured audience `api://warden`");
    }

    #[test]
    fn a_tampered_payload_is_a_bad_signature() {
        let token = with(|_| {});
        let parts: Vec<&str> = token.split('.').collect();
        let mut claims = good_claims();
        claims["groups"] = json!(["admins"]);
        let tampered = format!("{}.{}.{}", parts[0], b64(&claims), parts[2]);
        assert_eq!(reason(&tampered), Rejection::BadSignature);
        // One character in the middle of the signature changed.
        let mut sig: Vec<char> = parts[2].chars().collect();
        sig[100] = if sig[100] == 'A' { 'B' } else { 'A' };
        let sig: String = sig.into_iter().collect();
        assert_eq!(reason(&format!("{}.{}.{sig}", parts[0], parts[1])), Rejection::BadSignature);
    }

    #[test]
    fn truncated_oversized_and_malformed_tokens_are_refused() {
        let token = with(|_| {});
        let (head, _) = token.rsplit_once('.').unwrap();
        assert_eq!(reason(head), Rejection::Malformed);
        assert_eq!(reason(&format!("{head}.")), Rejection::Malformed);
        assert_eq!(reason(&token[..token.len() - 21]), Rejection::Malformed, "a signature cut short");
        assert_eq!(reason(""), Rejection::Malformed);
        assert_eq!(reason(&format!("{token}.x")), Rejection::Malformed);
        let huge = with(|c| c["pad"] = json!("x".repeat(MAX_TOKEN_BYTES)));
        assert_eq!(reason(&huge), Rejection::TooLarge);
        let parts: Vec<&str> = token.split('.').collect();
        assert_eq!(reason(&format!("!!.{}.{}", parts[1], parts[2])), Rejection::Malformed);
        assert_eq!(reason(&format!("{}.%%%.{}", parts[0], parts[2])), Rejection::Malformed);
        assert_eq!(
            reason(&format!("{}.{}.{}", URL_SAFE_NO_PAD.encode("{\"alg\":"), parts[1], parts[2])),
            Rejection::Malformed
        );
        assert_eq!(
            reason(&format!("{}.{}.{}", parts[0], URL_SAFE_NO_PAD.encode("[1,2]"), parts[2])),
            Rejection::Malformed
        );
        assert_eq!(reason(&format!("{}.{}.{}", parts[0], parts[1], "*+/")), Rejection::Malformed);
        let crit = json!({ "alg": "RS256", "kid": "kA", "crit": ["exp"] });
        assert_eq!(reason(&format!("{}.{}.{}", b64(&crit), parts[1], parts[2])), Rejection::Malformed);
    }

    #[test]
    fn no_single_character_change_anywhere_is_accepted() {
        let token = sign(
            Algorithm::ES256,
            "kE",
            &good_claims(),
            &EncodingKey::from_ec_pem(&testdata("idp_ec.pem")).unwrap(),
        );
        assert!(check(&token).is_ok());
        for (i, c) in token.char_indices() {
            for replacement in ['A', 'x', '.', '-', '=', '\u{e9}'] {
                if replacement == c {
                    continue;
                }
                let mut mutated = token.clone();
                mutated.replace_range(i..=i, &replacement.to_string());
                assert!(check(&mutated).is_err(), "accepted with {replacement:?} at {i}");
            }
        }
    }

    #[test]
    fn groups_and_scopes_are_read_deliberately() {
        assert_eq!(check(&with(|c| c["groups"] = json!("agents-ops"))).unwrap().groups, ["agents-ops"]);
        assert!(
            check(&with(|c| drop(c.as_object_mut().unwrap().remove("groups")))).unwrap().groups.is_empty()
        );
        assert!(check(&with(|c| c["groups"] = json!(null))).unwrap().groups.is_empty());
        assert_eq!(reason(&with(|c| c["groups"] = json!(42))), Rejection::InvalidClaim);
        assert_eq!(reason(&with(|c| c["groups"] = json!({ "a": 1 }))), Rejection::InvalidClaim);
        assert_eq!(reason(&with(|c| c["groups"] = json!(["ok", 7]))), Rejection::InvalidClaim);
        let err = check(&with(|c| c["groups"] = json!(42))).unwrap_err();
        assert_eq!(err.detail, "`groups` must be an array of strings or a string; it is a number");
        let scope_string = |c: &mut Value| {
            c.as_object_mut().unwrap().remove("scp");
            c["scope"] = json!("warden.connect warden.read");
        };
        assert_eq!(check(&with(scope_string)).unwrap().scopes, ["warden.connect", "warden.read"]);
        assert_eq!(reason(&with(|c| c["scp"] = json!([1]))), Rejection::InvalidClaim);
    }

    #[test]
    fn unusable_jwks_entries_are_skipped() {
        let jwks = json!({ "keys": [
            { "kty": "oct", "k": "c2VjcmV0", "kid": "hmac" },
            { "kty": "RSA", "use": "enc", "kid": "enc", "n": jwk("idp_rsa_a", "x")["n"], "e": "AQAB" },
            { "kty": "EC", "crv": "P-256", "alg": "RS256", "kid": "confused", "x": jwk("idp_ec", "x")["x"], "y": jwk("idp_ec", "x")["y"] },
            { "kty": "weird" },
            jwk("idp_rsa_a", "kA"),
        ]});
        let (set, skipped) = KeySet::from_jwks(jwks.to_string().as_bytes()).unwrap();
        assert_eq!((set.len(), skipped), (1, 4));
        assert!(set.has_kid("kA") && !set.has_kid("hmac"));
        assert!(KeySet::from_jwks(b"[]").is_err());
        assert!(KeySet::from_jwks(b"nope").is_err());
    }
}
