//! The upstream side: a russh client over the TCP connection the proxy opened, the upstream's host key
//! checked against the target's `host_key` or `host_ca`, and Warden's login with the target's
//! credentials (a private key, optionally with its certificate, or a password), none of which the agent
//! ever sees.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use russh::client;
use russh::keys::ssh_key::{self, HashAlg, PublicKey, certificate::CertType};
use russh::keys::{PrivateKeyWithHashAlg, PublicKeyOrCertificate};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::algorithms::{self, Leg};
use crate::policy::{SshTarget, Target};
use crate::protocol::End;

/// The russh client handler: checks the host key, reports the connection's end, hands the upstream's
/// forwarded-tcpip channels (connections to a `-R` listener) to the session.
pub struct UpstreamHandler {
    expect: Expect,
    /// Why the host key was refused, for the message the agent sees.
    mismatch: Arc<Mutex<Option<String>>>,
    closed: CancellationToken,
    forwarded: mpsc::Sender<Forwarded>,
}

/// How many forwarded connections may wait for the agent to accept them; more are refused.
const FORWARDED_QUEUE: usize = 16;

/// A connection the upstream accepted on a remote (`-R`) listener, not yet answered: the session relays
/// it to the agent as a forwarded-tcpip channel, then accepts or rejects it (dropping `reply` rejects).
pub struct Forwarded {
    pub channel: russh::Channel<client::Msg>,
    pub reply: russh::client::ChannelOpenHandle,
    pub connected_address: String,
    pub connected_port: u32,
    pub originator_address: String,
    pub originator_port: u32,
}

impl Drop for UpstreamHandler {
    fn drop(&mut self) {
        self.closed.cancel();
    }
}

/// What the upstream must present.
#[derive(Debug, Clone)]
pub struct Expect {
    pub target: String,
    /// Names the upstream's host certificate may be for (the target's host and address).
    pub principals: Vec<String>,
    pub host_key: Option<PublicKey>,
    pub host_ca: Option<PublicKey>,
}

impl Expect {
    pub fn from_target(
        target: &Target,
        ssh: &SshTarget,
        addr: Option<std::net::IpAddr>,
    ) -> Result<Self, String> {
        let parse = |what: &str, line: &Option<String>| -> Result<Option<PublicKey>, String> {
            line.as_deref()
                .map(|l| {
                    PublicKey::from_openssh(l.trim())
                        .map_err(|e| format!("the target's {what} is not an OpenSSH public key line: {e}"))
                })
                .transpose()
        };
        let mut principals = vec![target.host.clone()];
        if let Some(a) = addr {
            principals.push(a.to_string());
        }
        Ok(Self {
            target: target.name.clone(),
            principals,
            host_key: parse("host_key", &ssh.host_key)?,
            host_ca: parse("host_ca", &ssh.host_ca)?,
        })
    }

    /// Whether the upstream's key (or certificate) is the one expected; `Err` says why not.
    pub fn check(&self, presented: &PublicKeyOrCertificate, now: u64) -> Result<(), String> {
        let fp = |k: &ssh_key::public::KeyData| k.fingerprint(HashAlg::Sha256).to_string();
        let key = presented.public_key();
        if let Some(want) = &self.host_key
            && key.key_data() == want.key_data()
        {
            return Ok(());
        }
        if let Some(ca) = &self.host_ca {
            let Some(cert) = presented.certificate() else {
                return Err(format!(
                    "the upstream presented a plain host key ({}) but {} expects a host certificate signed by {}",
                    fp(key.key_data()),
                    self.target,
                    fp(ca.key_data())
                ));
            };
            if cert.cert_type() != CertType::Host {
                return Err("the upstream presented a user certificate as its host key".into());
            }
            let ca_fp = ca.key_data().fingerprint(HashAlg::Sha256);
            cert.validate_at(now, [&ca_fp]).map_err(|_| {
                format!(
                    "the upstream's host certificate is not signed by the target's host_ca ({ca_fp}) or is not valid now"
                )
            })?;
            if !cert.critical_options().is_empty() {
                return Err(
                    "the upstream's host certificate has critical options warden does not know".into()
                );
            }
            let names = cert.valid_principals();
            if !names.is_empty() && !self.principals.iter().any(|p| names.contains(p)) {
                return Err(format!(
                    "the upstream's host certificate is for {names:?}, not for {:?}",
                    self.principals
                ));
            }
            return Ok(());
        }
        match &self.host_key {
            Some(want) => Err(format!(
                "host key mismatch: the upstream presented {} but {}'s host_key is {}; \
                 if the server's key really changed, update host_key in the policy",
                fp(key.key_data()),
                self.target,
                fp(want.key_data())
            )),
            None => Err("the target has neither host_key nor host_ca".into()),
        }
    }
}

impl client::Handler for UpstreamHandler {
    type Error = russh::Error;

    async fn check_server_key(&mut self, key: &PublicKeyOrCertificate) -> Result<bool, Self::Error> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or_default();
        match self.expect.check(key, now) {
            Ok(()) => Ok(true),
            Err(why) => {
                if let Ok(mut m) = self.mismatch.lock() {
                    *m = Some(why);
                }
                Ok(false)
            }
        }
    }

    async fn server_channel_open_forwarded_tcpip(
        &mut self,
        channel: russh::Channel<client::Msg>,
        connected_address: &str,
        connected_port: u32,
        originator_address: &str,
        originator_port: u32,
        reply: russh::client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        // Never waits here (that would stall the upstream connection): a full queue refuses.
        let _ = self.forwarded.try_send(Forwarded {
            channel,
            reply,
            connected_address: connected_address.to_owned(),
            connected_port,
            originator_address: originator_address.to_owned(),
            originator_port,
        });
        Ok(())
    }
}

fn client_config(expect: &Expect) -> client::Config {
    let mut preferred = algorithms::preferred(Leg::Upstream);
    if expect.host_ca.is_some() {
        preferred.host_key_certificates = std::borrow::Cow::Owned(preferred.key.to_vec());
    }
    client::Config {
        inactivity_timeout: None,
        keepalive_interval: Some(Duration::from_secs(30)),
        keepalive_max: 3,
        nodelay: true,
        window_size: 8 * 1024 * 1024,
        preferred,
        ..client::Config::default()
    }
}

fn read_secret(path: &std::path::Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    Ok(text.trim_end_matches(['\n', '\r']).to_owned())
}

/// A logged-in upstream connection.
pub struct Connected {
    pub handle: client::Handle<UpstreamHandler>,
    /// Fires when the upstream connection ends.
    pub closed: CancellationToken,
    /// Connections the upstream forwards back (remote forwarding).
    pub forwarded: mpsc::Receiver<Forwarded>,
}

/// Runs the SSH handshake over `stream` and logs in.
pub async fn connect(stream: TcpStream, target: &Target, ssh: &SshTarget) -> Result<Connected, End> {
    let refused = |detail: String| End::UpstreamRefused { detail };
    let addr = stream.peer_addr().ok().map(|a| a.ip());
    let expect = Expect::from_target(target, ssh, addr).map_err(refused)?;
    let config = Arc::new(client_config(&expect));
    let mismatch = Arc::new(Mutex::new(None));
    let closed = CancellationToken::new();
    let (forwarded_tx, forwarded) = mpsc::channel(FORWARDED_QUEUE);
    let handler = UpstreamHandler {
        expect,
        mismatch: mismatch.clone(),
        closed: closed.clone(),
        forwarded: forwarded_tx,
    };
    let mut handle = match client::connect_stream(config, stream, handler).await {
        Ok(h) => h,
        Err(e) => {
            let why = mismatch.lock().ok().and_then(|m| m.clone());
            return Err(refused(why.unwrap_or_else(|| format!("ssh handshake failed: {e}"))));
        }
    };
    let login = &ssh.credentials;
    let user = login.user.clone();
    let mut tried = Vec::new();
    if let Some(path) = &login.private_key_file {
        let key = russh::keys::load_secret_key(path, None)
            .map_err(|e| refused(format!("cannot load the private key {}: {e}", path.display())))?;
        let key = Arc::new(key);
        let result = if let Some(cert_path) = &login.certificate_file {
            let cert = russh::keys::load_openssh_certificate(cert_path)
                .map_err(|e| refused(format!("cannot load the certificate {}: {e}", cert_path.display())))?;
            handle.authenticate_openssh_cert(user.clone(), key, cert).await
        } else {
            let hash = handle.best_supported_rsa_hash().await.ok().flatten().flatten();
            handle.authenticate_publickey(user.clone(), PrivateKeyWithHashAlg::new(key, hash)).await
        };
        match result {
            Ok(r) if r.success() => return Ok(Connected { handle, closed, forwarded }),
            Ok(_) => tried.push("publickey"),
            Err(e) => return Err(refused(format!("login failed: {e}"))),
        }
    }
    if let Some(path) = &login.password_file {
        let password = read_secret(path).map_err(refused)?;
        match handle.authenticate_password(user.clone(), password).await {
            Ok(r) if r.success() => return Ok(Connected { handle, closed, forwarded }),
            Ok(_) => tried.push("password"),
            Err(e) => return Err(refused(format!("login failed: {e}"))),
        }
    }
    Err(refused(format!(
        "the upstream refused warden's login as {user} ({}); check the target's credentials",
        if tried.is_empty() { "no credentials configured".to_owned() } else { tried.join(", ") }
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use russh::keys::PrivateKey;

    fn key(seed: u8) -> PrivateKey {
        PrivateKey::from(ssh_key::private::Ed25519Keypair::from_seed(&[seed; 32]))
    }

    fn expect(host_key: Option<&PrivateKey>, host_ca: Option<&PrivateKey>) -> Expect {
        Expect {
            target: "build-host".into(),
            principals: vec!["build-host".into(), "127.0.0.1".into()],
            host_key: host_key.map(|k| k.public_key().clone()),
            host_ca: host_ca.map(|k| k.public_key().clone()),
        }
    }

    fn cert(ca: &PrivateKey, subject: &PrivateKey, names: &[&str], kind: CertType) -> ssh_key::Certificate {
        let mut b = ssh_key::certificate::Builder::new(
            vec![7; 16],
            subject.public_key().key_data().clone(),
            100,
            200,
        )
        .unwrap();
        b.cert_type(kind).unwrap();
        for n in names {
            b.valid_principal(*n).unwrap();
        }
        b.sign(ca).unwrap()
    }

    #[test]
    fn host_keys_match_exactly() {
        let (server, other) = (key(1), key(2));
        let e = expect(Some(&server), None);
        assert!(e.check(&PublicKeyOrCertificate::from(server.public_key().clone()), 150).is_ok());
        let err = e.check(&PublicKeyOrCertificate::from(other.public_key().clone()), 150).unwrap_err();
        assert!(err.contains("host key mismatch") && err.contains("build-host"), "{err}");
    }

    #[test]
    fn host_certificates_must_be_from_the_ca_for_the_name_and_current() {
        let (ca, server, rogue) = (key(3), key(4), key(5));
        let e = expect(None, Some(&ca));
        let good = cert(&ca, &server, &["build-host"], CertType::Host);
        assert!(e.check(&PublicKeyOrCertificate::Certificate(good.clone()), 150).is_ok());
        assert!(e.check(&PublicKeyOrCertificate::Certificate(good), 250).is_err(), "expired");
        let wrong_ca = cert(&rogue, &server, &["build-host"], CertType::Host);
        assert!(e.check(&PublicKeyOrCertificate::Certificate(wrong_ca), 150).is_err());
        let wrong_name = cert(&ca, &server, &["other-host"], CertType::Host);
        assert!(e.check(&PublicKeyOrCertificate::Certificate(wrong_name), 150).is_err());
        let user_cert = cert(&ca, &server, &["build-host"], CertType::User);
        assert!(e.check(&PublicKeyOrCertificate::Certificate(user_cert), 150).is_err());
        assert!(
            e.check(&PublicKeyOrCertificate::from(server.public_key().clone()), 150).is_err(),
            "plain key"
        );
    }
}
