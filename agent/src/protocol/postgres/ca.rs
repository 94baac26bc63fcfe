//! Warden's local TLS CA for the agent side of PostgreSQL sessions: an ECDSA P-256 key and certificate in
//! `state_dir` (made on first use, key 0600, kept across restarts), and server certificates for each
//! target's name issued by it, so `sslmode=verify-full` works once the agent trusts the CA
//! (`warden ca tls` prints it). ECDSA-with-SHA-256 keeps `tls-server-end-point` channel binding working.

use std::collections::HashMap;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rcgen::{BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyPair, KeyUsagePurpose};
use rustls::ServerConfig;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

const KEY_FILE: &str = "pg-ca.key";
const CERT_FILE: &str = "pg-ca.pem";
const CA_NAME: &str = "Warden local PostgreSQL CA";

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("cannot read or write the TLS CA in {path}: {source} (check state_dir's permissions)")]
    Io { path: PathBuf, source: std::io::Error },
    #[error(
        "the TLS CA key in {path} is unusable: {detail} (remove it and its certificate to make a new CA)"
    )]
    BadKey { path: PathBuf, detail: String },
    #[error("cannot issue a certificate for `{name}`: {detail}")]
    Issue { name: String, detail: String },
}

/// The CA, and the server TLS configurations issued so far (one per target host name).
pub struct Ca {
    key: KeyPair,
    cert: rcgen::Certificate,
    pem: String,
    issued: Mutex<HashMap<String, Arc<ServerConfig>>>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca").finish_non_exhaustive()
    }
}

fn ca_params() -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_NAME);
    dn.push(DnType::OrganizationName, "Warden");
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages =
        vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    p.not_before = rcgen::date_time_ymd(2025, 1, 1);
    p.not_after = rcgen::date_time_ymd(2045, 1, 1);
    p
}

impl Ca {
    /// Loads the CA from `state_dir`, making it on first use.
    pub fn load_or_create(state_dir: &Path) -> Result<Self, CaError> {
        let key_path = state_dir.join(KEY_FILE);
        let cert_path = state_dir.join(CERT_FILE);
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| CaError::Io { path, source }
        };
        let (key, pem) = if key_path.exists() {
            let text = std::fs::read_to_string(&key_path).map_err(io(&key_path))?;
            let key = KeyPair::from_pem(&text)
                .map_err(|e| CaError::BadKey { path: key_path.clone(), detail: e.to_string() })?;
            let pem = std::fs::read_to_string(&cert_path).map_err(io(&cert_path))?;
            (key, pem)
        } else {
            std::fs::create_dir_all(state_dir).map_err(io(state_dir))?;
            let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
                .map_err(|e| CaError::BadKey { path: key_path.clone(), detail: e.to_string() })?;
            let cert = ca_params()
                .self_signed(&key)
                .map_err(|e| CaError::BadKey { path: key_path.clone(), detail: e.to_string() })?;
            write_new(&cert_path, cert.pem().as_bytes(), 0o644).map_err(io(&cert_path))?;
            write_new(&key_path, key.serialize_pem().as_bytes(), 0o600).map_err(io(&key_path))?;
            (key, cert.pem())
        };
        // The issuer object rcgen signs with: same name and key as the stored certificate, so leaves chain
        // to the stored PEM (signatures and key identifiers depend only on those).
        let cert = ca_params()
            .self_signed(&key)
            .map_err(|e| CaError::BadKey { path: key_path, detail: e.to_string() })?;
        Ok(Self { key, cert, pem, issued: Mutex::new(HashMap::new()) })
    }

    /// The CA certificate, PEM.
    pub fn pem(&self) -> &str {
        &self.pem
    }

    /// A server configuration presenting a certificate for `host` (a DNS name, or an IP address as an IP
    /// SAN), ALPN `postgresql` offered. Issued once per name.
    pub fn server_config(&self, host: &str) -> Result<Arc<ServerConfig>, CaError> {
        let mut issued = self.issued.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(c) = issued.get(host) {
            return Ok(c.clone());
        }
        let err = |detail: String| CaError::Issue { name: host.to_owned(), detail };
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| err(e.to_string()))?;
        let mut params = CertificateParams::new(vec![host.to_owned()]).map_err(|e| err(e.to_string()))?;
        params.distinguished_name.push(DnType::CommonName, host);
        params.not_before = rcgen::date_time_ymd(2025, 1, 1);
        params.not_after = rcgen::date_time_ymd(2045, 1, 1);
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.cert, &self.key).map_err(|e| err(e.to_string()))?;
        let chain = vec![cert.der().clone(), self.cert.der().clone()];
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| err(e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(chain, der)
            .map_err(|e| err(e.to_string()))?;
        config.alpn_protocols = vec![b"postgresql".to_vec()];
        let config = Arc::new(config);
        issued.insert(host.to_owned(), config.clone());
        Ok(config)
    }

    pub fn certificate_der(&self) -> CertificateDer<'static> {
        self.cert.der().clone()
    }
}

fn write_new(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// `warden ca tls`: the CA certificate's PEM (the CA is made if it does not exist yet).
pub fn certificate_pem(state_dir: &Path) -> Result<String, CaError> {
    Ok(Ca::load_or_create(state_dir)?.pem)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn the_ca_survives_a_restart_and_its_key_is_private() {
        let dir = tempfile::tempdir().unwrap();
        let first = certificate_pem(dir.path()).unwrap();
        assert!(first.starts_with("-----BEGIN CERTIFICATE-----"));
        assert_eq!(certificate_pem(dir.path()).unwrap(), first);
        let mode = std::fs::metadata(dir.path().join(KEY_FILE)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn issued_certificates_chain_to_the_stored_ca() {
        let dir = tempfile::tempdir().unwrap();
        drop(Ca::load_or_create(dir.path()).unwrap());
        // A restarted CA still issues certificates a client trusting the stored PEM accepts.
        let ca = Ca::load_or_create(dir.path()).unwrap();
        let config = ca.server_config("db.example.test").unwrap();
        assert!(Arc::ptr_eq(&config, &ca.server_config("db.example.test").unwrap()));
        let stored = std::fs::read(dir.path().join(CERT_FILE)).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls_pki_types::pem::PemObject::pem_slice_iter(&stored) {
            roots.add(c.unwrap()).unwrap();
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .unwrap();
        // A leaf as server_config issues it, checked against the stored PEM.
        let leaf = {
            let k = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
            let mut p = CertificateParams::new(vec!["db.example.test".to_owned()]).unwrap();
            p.use_authority_key_identifier_extension = true;
            p.signed_by(&k, &ca.cert, &ca.key).unwrap()
        };
        let name = rustls_pki_types::ServerName::try_from("db.example.test").unwrap();
        rustls::client::danger::ServerCertVerifier::verify_server_cert(
            verifier.as_ref(),
            leaf.der(),
            &[],
            &name,
            &[],
            rustls_pki_types::UnixTime::now(),
        )
        .unwrap();
    }
}
