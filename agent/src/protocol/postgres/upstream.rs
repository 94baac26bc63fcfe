//! The upstream leg: TLS per the target's `tls` mode, the startup message Warden builds (the target's
//! login, the client's harmless parameters, `default_transaction_read_only=on` under `access: read`), and
//! password authentication with the target's credentials: SCRAM-SHA-256 (`-PLUS` with
//! `tls-server-end-point` when the upstream leg is TLS), md5 and cleartext. The password file is read at
//! connect time and never logged.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::BytesMut;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use postgres_protocol::message::frontend;
use rustls::ClientConfig;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use sha2::Digest as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use super::wire::{self, Conn, Frame, Peer, Reader};
use crate::policy::{Access, PgLogin, PostgresTarget, Target, TlsMode};
use crate::protocol::End;

/// An authenticated upstream connection, idle (ReadyForQuery seen).
pub struct Upstream {
    pub conn: Conn,
    /// The latest value of every `ParameterStatus` the upstream reported.
    pub params: Vec<(String, String)>,
    /// The backend's real cancel key.
    pub backend: (i32, i32),
    pub dst: SocketAddr,
    /// The grant's masks as resolved on this connection (the mask list, and its resolution).
    pub masks: Option<(Vec<String>, super::mask::Resolved)>,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("dst", &self.dst)
            .field("backend_pid", &self.backend.0)
            .finish_non_exhaustive()
    }
}

impl Upstream {
    pub fn set_param(&mut self, name: &str, value: &str) {
        if let Some(p) = self.params.iter_mut().find(|(n, _)| n == name) {
            value.clone_into(&mut p.1);
        } else {
            self.params.push((name.to_owned(), value.to_owned()));
        }
    }

    /// Keeps what a `ParameterStatus` ('S') message body reports (a malformed one is ignored).
    pub fn note_parameter_status(&mut self, body: &[u8]) {
        let mut r = super::wire::Reader::new(body);
        if let (Ok(k), Ok(v)) = (r.cstr(), r.cstr()) {
            let (k, v) = (k.to_owned(), v.to_owned());
            self.set_param(&k, &v);
        }
    }
}

fn refused(detail: impl Into<String>) -> End {
    End::UpstreamRefused { detail: detail.into() }
}

fn broken(e: &impl std::fmt::Display) -> End {
    End::UpstreamRefused { detail: format!("upstream protocol: {e}") }
}

/// The client-side TLS configuration for a target.
pub fn tls_config(pg: &PostgresTarget) -> Result<Arc<ClientConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let mut config = if pg.tls == TlsMode::VerifyFull {
        let mut roots = rustls::RootCertStore::empty();
        if let Some(path) = &pg.ca_file {
            let pem =
                std::fs::read(path).map_err(|e| format!("cannot read ca_file {}: {e}", path.display()))?;
            for c in rustls_pki_types::pem::PemObject::pem_slice_iter(&pem) {
                let c = c.map_err(|e| format!("ca_file {}: {e}", path.display()))?;
                roots.add(c).map_err(|e| format!("ca_file {}: {e}", path.display()))?;
            }
        } else {
            for c in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(c);
            }
        }
        builder.with_root_certificates(roots).with_no_client_auth()
    } else {
        // `prefer` and `require` encrypt without checking the name, as libpq's modes do.
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCert(provider)))
            .with_no_client_auth()
    };
    config.alpn_protocols = vec![b"postgresql".to_vec()];
    Ok(Arc::new(config))
}

/// Accepts any certificate (the signature over the handshake is still checked).
#[derive(Debug)]
struct AnyCert(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `tls-server-end-point` (RFC 5929): the certificate's hash with its signature's hash function, SHA-256
/// for MD5 and SHA-1.
pub fn server_end_point(cert: &[u8]) -> Vec<u8> {
    const RSA: [u8; 8] = [0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01];
    const ECDSA: [u8; 7] = [0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03];
    let oid = signature_oid(cert).unwrap_or_default();
    let bits = match oid.split_last() {
        Some((&0x0c, head)) if head == RSA => 384,
        Some((&0x03, head)) if head == ECDSA => 384,
        Some((&0x0d, head)) if head == RSA => 512,
        Some((&0x04, head)) if head == ECDSA => 512,
        _ => 256,
    };
    match bits {
        384 => sha2::Sha384::digest(cert).to_vec(),
        512 => sha2::Sha512::digest(cert).to_vec(),
        _ => sha2::Sha256::digest(cert).to_vec(),
    }
}

/// The OID of a certificate's outer signatureAlgorithm.
fn signature_oid(der: &[u8]) -> Option<&[u8]> {
    fn tlv(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
        let (&tag, b) = b.split_first()?;
        let (&l, b) = b.split_first()?;
        let (len, b) = if l < 0x80 {
            (usize::from(l), b)
        } else {
            let n = usize::from(l & 0x7f);
            if n > 4 || b.len() < n {
                return None;
            }
            (b[..n].iter().fold(0usize, |a, &x| (a << 8) | usize::from(x)), &b[n..])
        };
        (b.len() >= len).then(|| (tag, &b[..len], &b[len..]))
    }
    let (_, cert, _) = tlv(der)?;
    let (_, _tbs, rest) = tlv(cert)?;
    let (_, alg, _) = tlv(rest)?;
    let (tag, oid, _) = tlv(alg)?;
    (tag == 0x06).then_some(oid)
}

/// What a login needs besides the TCP connection.
pub struct LoginSpec<'a> {
    pub target: &'a Target,
    pub pg: &'a PostgresTarget,
    pub tls: Option<Arc<ClientConfig>>,
    pub login: &'a PgLogin,
    pub database: &'a str,
    pub access: Access,
    /// The client's startup parameters Warden passes on (already filtered).
    pub client_params: &'a [(String, String)],
}

/// TLS (per mode), startup and authentication on a fresh TCP connection, up to the first ReadyForQuery.
pub async fn login(mut tcp: TcpStream, dst: SocketAddr, spec: &LoginSpec<'_>) -> Result<Upstream, End> {
    let io_err = |e: std::io::Error| End::UpstreamRefused { detail: format!("upstream i/o: {e}") };
    let mut binding = ChannelBinding::unsupported();
    let mut tls_on = false;
    let io: Box<dyn wire::Io> = if spec.pg.tls == TlsMode::Disable {
        Box::new(tcp)
    } else {
        let mut b = BytesMut::new();
        frontend::ssl_request(&mut b);
        tcp.write_all(&b).await.map_err(io_err)?;
        let mut answer = [0u8; 1];
        tcp.read_exact(&mut answer).await.map_err(io_err)?;
        match answer[0] {
            b'S' => {
                let config =
                    spec.tls.clone().ok_or_else(|| refused("no TLS configuration for the upstream"))?;
                let name = ServerName::try_from(spec.target.host.clone())
                    .map_err(|e| refused(format!("`{}` is not a TLS server name: {e}", spec.target.host)))?;
                let tls = tokio_rustls::TlsConnector::from(config)
                    .connect(name, tcp)
                    .await
                    .map_err(|e| refused(format!("upstream TLS: {e}")))?;
                binding = match tls.get_ref().1.peer_certificates().and_then(|c| c.first()) {
                    Some(cert) => ChannelBinding::tls_server_end_point(server_end_point(cert)),
                    None => ChannelBinding::unrequested(),
                };
                tls_on = true;
                Box::new(tls)
            }
            b'N' if spec.pg.tls == TlsMode::Prefer => Box::new(tcp),
            b'N' => {
                return Err(refused(format!(
                    "the upstream refused TLS, which `tls: {:?}` requires",
                    spec.pg.tls
                )));
            }
            other => return Err(refused(format!("unexpected answer {other:#04x} to SSLRequest"))),
        }
    };
    let mut conn = Conn::new(io, Peer::Server);
    let mut params: Vec<(&str, &str)> = vec![("user", &spec.login.user), ("database", spec.database)];
    for (k, v) in spec.client_params {
        params.push((k, v));
    }
    for &(k, v) in super::classify::PINNED_SETTINGS {
        if !spec.client_params.iter().any(|(c, _)| c.eq_ignore_ascii_case(k)) {
            params.push((k, v));
        }
    }
    if spec.access == Access::Read {
        params.push(("default_transaction_read_only", "on"));
    }
    conn.send_raw(&wire::encoded(|b| frontend::startup_message(params.iter().copied(), b)));
    conn.flush().await.map_err(io_err)?;
    let up = authenticate(conn, spec.login, binding, tls_on, dst).await?;
    // What the server reports at login must already be what Warden relies on (a database's own
    // defaults cannot lift the pinned settings: they are set per connection, above those).
    let wrong = up.params.iter().find_map(|(k, v)| {
        super::classify::check_parameter_status(k, v, spec.access, &spec.login.user)
            .err()
            .map(|r| format!("the upstream reports {k} = {v} at login: {}", r.message))
    });
    match wrong {
        Some(detail) => {
            tokio::spawn(close(up));
            Err(refused(detail))
        }
        None => Ok(up),
    }
}

fn password(login: &PgLogin) -> Result<Vec<u8>, End> {
    let Some(path) = &login.password_file else {
        return Err(refused(format!(
            "the upstream asks user `{}` for a password and the target's credentials have no password_file",
            login.user
        )));
    };
    let text = std::fs::read(path)
        .map_err(|e| refused(format!("cannot read the password file {}: {e}", path.display())))?;
    let end = text.iter().rposition(|&c| c != b'\n' && c != b'\r').map_or(0, |i| i + 1);
    Ok(text[..end].to_vec())
}

async fn next(conn: &mut Conn) -> Result<Frame, End> {
    match conn.next().await {
        Ok(Some(f)) => Ok(f),
        Ok(None) => Err(refused("the upstream closed the connection during login")),
        Err(e) => Err(broken(&e)),
    }
}

async fn authenticate(
    mut conn: Conn,
    login: &PgLogin,
    binding: ChannelBinding,
    tls: bool,
    dst: SocketAddr,
) -> Result<Upstream, End> {
    let io_err = |e: std::io::Error| End::UpstreamRefused { detail: format!("upstream i/o: {e}") };
    let mut binding = Some(binding);
    let mut scram: Option<ScramSha256> = None;
    let mut params = Vec::new();
    let mut backend = (0, 0);
    loop {
        let f = next(&mut conn).await?;
        match f.tag {
            b'R' => {
                let mut r = Reader::new(&f.body);
                let kind = r.i32().map_err(|e| broken(&e))?;
                match kind {
                    0 => {}
                    3 => {
                        let mut pw = password(login)?;
                        conn.send_raw(&wire::encoded(|b| frontend::password_message(&pw, b)));
                        pw.fill(0);
                    }
                    5 => {
                        let salt = r.bytes(4).map_err(|e| broken(&e))?;
                        let mut pw = password(login)?;
                        let hash = postgres_protocol::authentication::md5_hash(
                            login.user.as_bytes(),
                            &pw,
                            [salt[0], salt[1], salt[2], salt[3]],
                        );
                        pw.fill(0);
                        conn.send_raw(&wire::encoded(|b| frontend::password_message(hash.as_bytes(), b)));
                    }
                    10 => {
                        let mut mechs = Vec::new();
                        loop {
                            let m = r.cstr().map_err(|e| broken(&e))?;
                            if m.is_empty() {
                                break;
                            }
                            mechs.push(m.to_owned());
                        }
                        let cb = binding.take().unwrap_or_else(ChannelBinding::unsupported);
                        let plus = mechs.iter().any(|m| m == "SCRAM-SHA-256-PLUS");
                        let (mech, cb) = if plus && tls {
                            ("SCRAM-SHA-256-PLUS", cb)
                        } else if mechs.iter().any(|m| m == "SCRAM-SHA-256") {
                            ("SCRAM-SHA-256", if tls { ChannelBinding::unrequested() } else { cb })
                        } else {
                            return Err(refused(format!(
                                "no SASL mechanism in common: {}",
                                mechs.join(", ")
                            )));
                        };
                        let mut pw = password(login)?;
                        let s = ScramSha256::new(&pw, cb);
                        pw.fill(0);
                        conn.send_raw(&wire::encoded(|b| {
                            frontend::sasl_initial_response(mech, s.message(), b)
                        }));
                        scram = Some(s);
                    }
                    11 => {
                        let s = scram.as_mut().ok_or_else(|| refused("SASL continue before SASL start"))?;
                        s.update(r.rest()).map_err(|e| refused(format!("SCRAM: {e}")))?;
                        conn.send_raw(&wire::encoded(|b| frontend::sasl_response(s.message(), b)));
                    }
                    12 => {
                        let s = scram.as_mut().ok_or_else(|| refused("SASL final before SASL start"))?;
                        s.finish(r.rest())
                            .map_err(|e| refused(format!("SCRAM: the server's proof failed: {e}")))?;
                    }
                    other => {
                        return Err(refused(format!("unsupported upstream authentication method {other}")));
                    }
                }
                conn.flush().await.map_err(io_err)?;
            }
            b'S' => {
                let mut r = Reader::new(&f.body);
                let (k, v) = (r.cstr().map_err(|e| broken(&e))?, r.cstr().map_err(|e| broken(&e))?);
                params.push((k.to_owned(), v.to_owned()));
            }
            b'K' => {
                let mut r = Reader::new(&f.body);
                backend = (r.i32().map_err(|e| broken(&e))?, r.i32().map_err(|e| broken(&e))?);
            }
            b'E' => {
                let e = wire::parse_error(&f.body);
                return Err(refused(format!("{} {}: {}", e.severity, e.code, e.message)));
            }
            b'Z' => {
                return Ok(Upstream { conn, params, backend, dst, masks: None });
            }
            // NoticeResponse, NegotiateProtocolVersion (we ask for 3.0): nothing to do.
            _ => {}
        }
    }
}

/// Ends an upstream connection politely (`Terminate`).
pub async fn close(mut up: Upstream) {
    let _ = up.conn.io.write_all(&[b'X', 0, 0, 0, 4]).await;
    let _ = up.conn.io.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn end_point_hash_follows_the_signature_algorithm() {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["x".to_owned()]).unwrap().self_signed(&key).unwrap();
        assert_eq!(server_end_point(cert.der()).len(), 48);
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["x".to_owned()]).unwrap().self_signed(&key).unwrap();
        assert_eq!(server_end_point(cert.der()).len(), 32);
    }
}
