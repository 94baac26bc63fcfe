//! Why an identity could not be verified: one error type for the daemon, with a machine-readable reason.

use std::path::PathBuf;
use std::sync::Arc;

/// Why a token was refused. `as_str` is the `reason` written in `token.rejected` records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// Larger than the size bound; not parsed at all.
    TooLarge,
    /// Not three base64url parts, or a part is not the JSON object it must be.
    Malformed,
    /// The header's `alg` is not one of the asymmetric algorithms Warden accepts (`none`, `HS256`, ...).
    AlgNotAllowed,
    /// No key in the issuer's JWKS has the header's `kid`, even after re-fetching it.
    UnknownKid,
    /// The header's `alg` is not what the key with that `kid` is for.
    AlgMismatch,
    /// The signature does not verify with the issuer's key.
    BadSignature,
    WrongIssuer,
    WrongAudience,
    Expired,
    /// `nbf` or `iat` lies in the future (beyond the leeway).
    NotYetValid,
    /// `cid` (or, without `cid`, `sub`) is another client than the identity's.
    WrongClient,
    /// A claim Warden reads has the wrong type or is missing (`exp`, `sub`, `scp`, the groups claim).
    InvalidClaim,
}

impl Rejection {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::TooLarge => "too_large",
            Self::Malformed => "malformed",
            Self::AlgNotAllowed => "alg_not_allowed",
            Self::UnknownKid => "unknown_kid",
            Self::AlgMismatch => "alg_mismatch",
            Self::BadSignature => "bad_signature",
            Self::WrongIssuer => "wrong_issuer",
            Self::WrongAudience => "wrong_audience",
            Self::Expired => "expired",
            Self::NotYetValid => "not_yet_valid",
            Self::WrongClient => "wrong_client",
            Self::InvalidClaim => "invalid_claim",
        }
    }
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Everything that stops an identity from being verified. Cheap to clone: one failed attempt is handed
/// to every session that waited on it. No variant carries a token, a secret or a signature.
#[derive(Debug, Clone, thiserror::Error)]
pub enum IdentityError {
    #[error("no identity `{name}` is configured; add an [identity.{name}] section to the config")]
    UnknownIdentity { name: String },

    #[error("identity `{identity}`: {detail}")]
    Config { identity: String, detail: String },

    #[error(
        "identity `{identity}`: cannot read {}: {source}; check the path and that the daemon runs as root",
        path.display()
    )]
    CredentialUnreadable {
        identity: String,
        path: PathBuf,
        #[source]
        source: Arc<std::io::Error>,
    },

    #[error(
        "identity `{identity}`: {} is readable by group or others (mode {mode:04o}); run `chmod 600 {}`",
        path.display(),
        path.display()
    )]
    CredentialReadable { identity: String, path: PathBuf, mode: u32 },

    #[error(
        "identity `{identity}`: {} is owned by uid {uid}, not root; run `chown root:root {}`",
        path.display(),
        path.display()
    )]
    CredentialOwner { identity: String, path: PathBuf, uid: u32 },

    #[error(
        "identity `{identity}`: {} holds no usable {alg} private key ({detail}); write the key as PEM \
         (PKCS#8) or set private_key_alg to match it",
        path.display()
    )]
    BadPrivateKey { identity: String, path: PathBuf, alg: &'static str, detail: String },

    #[error("identity `{identity}`: cannot reach the identity provider {issuer}: {detail}")]
    IdpUnreachable { identity: String, issuer: String, detail: String },

    #[error("identity `{identity}`: the identity provider {issuer} publishes unusable metadata: {detail}")]
    BadDiscovery { identity: String, issuer: String, detail: String },

    #[error(
        "identity `{identity}`: the token endpoint refused the client-credentials request (HTTP {status}{}{}); \
         check client_id, its key or secret, that the app is active and may use the requested scopes",
        if error.is_empty() { "" } else { ": " },
        error
    )]
    TokenRequestRefused { identity: String, status: u16, error: String },

    #[error("identity `{identity}`: token rejected ({reason}): {detail}")]
    TokenRejected { identity: String, reason: Rejection, detail: String },
}

impl IdentityError {
    /// A stable, machine-readable reason for audit records, metrics and the session's closing record.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::UnknownIdentity { .. } => "unknown_identity",
            Self::Config { .. } => "config",
            Self::CredentialUnreadable { .. } => "credential_unreadable",
            Self::CredentialReadable { .. } | Self::CredentialOwner { .. } => "credential_insecure",
            Self::BadPrivateKey { .. } => "bad_private_key",
            Self::IdpUnreachable { .. } => "idp_unreachable",
            Self::BadDiscovery { .. } => "bad_discovery",
            Self::TokenRequestRefused { .. } => "token_request_refused",
            Self::TokenRejected { reason, .. } => reason.as_str(),
        }
    }
}
