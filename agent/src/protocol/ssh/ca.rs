//! Warden's SSH host CA and host key, kept in `state_dir`, and the short-lived host certificates the
//! agent-side server presents for a target's name and address.
//!
//! `state_dir/ssh_host_ca` (the CA) and `state_dir/ssh_host_key` (the key the certificates certify) are
//! OpenSSH private keys (ed25519), mode 0600, made on first use and kept across restarts, so the one
//! `@cert-authority` line an operator puts in an agent's `known_hosts` stays valid.

use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use russh::keys::ssh_key::{self, LineEnding, certificate};
use russh::keys::{Certificate, PrivateKey};

use super::SshError;

pub const CA_FILE: &str = "ssh_host_ca";
pub const HOST_KEY_FILE: &str = "ssh_host_key";

/// How long a host certificate is valid; a new one is made for every connection.
const CERT_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// Clock skew allowed between Warden and the agent.
const CERT_BACKDATE: Duration = Duration::from_secs(300);

/// The CA and the host key.
pub struct HostCa {
    ca: PrivateKey,
    host: PrivateKey,
}

impl std::fmt::Debug for HostCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostCa")
            .field("ca", &self.ca.public_key().fingerprint(ssh_key::HashAlg::Sha256))
            .finish_non_exhaustive()
    }
}

impl HostCa {
    /// Loads both keys from `state_dir`, making each that is missing.
    pub fn load_or_create(state_dir: &Path) -> Result<Self, SshError> {
        Ok(Self {
            ca: load_or_create_key(&state_dir.join(CA_FILE), "warden ssh host ca")?,
            host: load_or_create_key(&state_dir.join(HOST_KEY_FILE), "warden ssh host key")?,
        })
    }

    pub fn host_key(&self) -> &PrivateKey {
        &self.host
    }

    /// The `known_hosts` line that trusts every certificate this CA signs.
    pub fn known_hosts_line(&self) -> Result<String, SshError> {
        let public = self.ca.public_key().to_openssh().map_err(|e| SshError::Key {
            path: PathBuf::from(CA_FILE),
            reason: format!("cannot encode the public key: {e}"),
        })?;
        // The comment is dropped: the line is exactly `@cert-authority * ssh-ed25519 AAAA...`.
        let mut parts = public.split_whitespace();
        let (Some(alg), Some(b64)) = (parts.next(), parts.next()) else {
            return Err(SshError::Key {
                path: PathBuf::from(CA_FILE),
                reason: "malformed public key".into(),
            });
        };
        Ok(format!("@cert-authority * {alg} {b64}"))
    }

    /// A host certificate for the host key, valid for `principals` (the names and addresses the agent may
    /// have typed) from a little before now for a day.
    pub fn certificate(&self, principals: &[String]) -> Result<Certificate, SshError> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        let after = now.saturating_sub(CERT_BACKDATE).as_secs();
        let before = (now + CERT_LIFETIME).as_secs();
        let mut nonce = [0u8; 32];
        getrandom::fill(&mut nonce).map_err(|e| SshError::Random { reason: e.to_string() })?;
        let cert_err = |e: ssh_key::Error| SshError::Certificate { reason: e.to_string() };
        let mut b = certificate::Builder::new(
            nonce.to_vec(),
            self.host.public_key().key_data().clone(),
            after,
            before,
        )
        .map_err(cert_err)?;
        b.cert_type(certificate::CertType::Host).map_err(cert_err)?;
        b.key_id("warden").map_err(cert_err)?;
        let mut serial = [0u8; 8];
        getrandom::fill(&mut serial).map_err(|e| SshError::Random { reason: e.to_string() })?;
        b.serial(u64::from_be_bytes(serial)).map_err(cert_err)?;
        let mut seen = Vec::new();
        for p in principals {
            if !p.is_empty() && !seen.contains(p) {
                b.valid_principal(p.clone()).map_err(cert_err)?;
                seen.push(p.clone());
            }
        }
        if seen.is_empty() {
            return Err(SshError::Certificate {
                reason: "a host certificate needs at least one name".into(),
            });
        }
        b.sign(&self.ca).map_err(cert_err)
    }
}

/// `warden ca ssh`: the `@cert-authority * ssh-ed25519 ...` line for an agent's `known_hosts` (made on
/// first use).
pub fn known_hosts_line(state_dir: &Path) -> Result<String, SshError> {
    HostCa::load_or_create(state_dir)?.known_hosts_line()
}

fn load_or_create_key(path: &Path, comment: &str) -> Result<PrivateKey, SshError> {
    match std::fs::read_to_string(path) {
        Ok(text) => parse_key(path, &text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(|source| SshError::io("create", dir, source))?;
            }
            let mut seed = [0u8; 32];
            getrandom::fill(&mut seed).map_err(|e| SshError::Random { reason: e.to_string() })?;
            let mut key = PrivateKey::from(ssh_key::private::Ed25519Keypair::from_seed(&seed));
            key.set_comment(comment);
            let text = key.to_openssh(LineEnding::LF).map_err(|e| SshError::Key {
                path: path.to_path_buf(),
                reason: format!("cannot encode: {e}"),
            })?;
            let created = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path);
            match created {
                Ok(mut f) => {
                    f.write_all(text.as_bytes())
                        .and_then(|()| f.sync_all())
                        .map_err(|source| SshError::io("write", path, source))?;
                    Ok(key)
                }
                // Someone else made it first: theirs wins.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let text =
                        std::fs::read_to_string(path).map_err(|source| SshError::io("read", path, source))?;
                    parse_key(path, &text)
                }
                Err(source) => Err(SshError::io("create", path, source)),
            }
        }
        Err(source) => Err(SshError::io("read", path, source)),
    }
}

fn parse_key(path: &Path, text: &str) -> Result<PrivateKey, SshError> {
    if let Ok(meta) = std::fs::metadata(path)
        && meta.permissions().mode() & 0o077 != 0
    {
        return Err(SshError::Key {
            path: path.to_path_buf(),
            reason: "is readable by group or others; chmod 600 it".into(),
        });
    }
    PrivateKey::from_openssh(text).map_err(|e| SshError::Key {
        path: path.to_path_buf(),
        reason: format!("not an OpenSSH private key ({e}); remove it to make a new one"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ca_is_made_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let line = known_hosts_line(dir.path()).unwrap();
        assert!(line.starts_with("@cert-authority * ssh-ed25519 AAAA"), "{line}");
        assert_eq!(line.split(' ').count(), 4);
        assert_eq!(known_hosts_line(dir.path()).unwrap(), line);
        let mode = std::fs::metadata(dir.path().join(CA_FILE)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn certificates_name_the_target_and_verify_under_the_ca() {
        let dir = tempfile::tempdir().unwrap();
        let ca = HostCa::load_or_create(dir.path()).unwrap();
        let cert = ca.certificate(&["build-host".into(), "10.0.0.9".into(), "10.0.0.9".into()]).unwrap();
        assert_eq!(cert.cert_type(), certificate::CertType::Host);
        assert_eq!(cert.valid_principals(), ["build-host", "10.0.0.9"]);
        let fp = ca.ca.public_key().fingerprint(ssh_key::HashAlg::Sha256);
        cert.validate([&fp]).unwrap();
        assert_eq!(cert.public_key(), ca.host_key().public_key().key_data());
    }

    #[test]
    fn a_world_readable_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        known_hosts_line(dir.path()).unwrap();
        let path = dir.path().join(CA_FILE);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(known_hosts_line(dir.path()).unwrap_err().to_string().contains("chmod 600"));
    }
}
