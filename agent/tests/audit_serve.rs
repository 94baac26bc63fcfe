//! The auditors' HTTPS endpoint: client certificates from the auditor CA only, the export streamed with
//! `since`, everything else refused. Real TLS on loopback with certificates made here.

use std::path::Path;
use std::sync::Arc;

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use warden::audit::serve::Server;
use warden::audit::{Audit, AuditOptions, Record, read_exported};
use warden::config::AuditServeConfig;

struct Ca {
    cert: Certificate,
    key: KeyPair,
    pem: String,
}

fn ca(name: &str) -> Ca {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages =
        vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let cert = params.self_signed(&key).unwrap();
    Ca { pem: cert.pem(), cert, key }
}

/// A leaf certificate and key (PEM) signed by `ca`.
fn leaf(ca: &Ca, names: &[&str], usage: ExtendedKeyUsagePurpose) -> (String, String) {
    let key = KeyPair::generate().unwrap();
    let mut params =
        CertificateParams::new(names.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>()).unwrap();
    params.distinguished_name.push(DnType::CommonName, names[0]);
    params.extended_key_usages = vec![usage];
    let cert = params.signed_by(&key, &ca.cert, &ca.key).unwrap();
    (cert.pem(), key.serialize_pem())
}

struct Fixture {
    _root: tempfile::TempDir,
    audit_dir: std::path::PathBuf,
    addr: std::net::SocketAddr,
    host_ca: String,
    auditor_ca: Ca,
    shutdown: CancellationToken,
    last_seq: u64,
}

async fn fixture() -> Fixture {
    let root = tempfile::tempdir().unwrap();
    let opts = AuditOptions::in_dir(root.path());
    let shutdown = CancellationToken::new();
    let (audit, writer) = Audit::start_with(&opts, shutdown.clone()).unwrap();
    let mut last_seq = 0;
    for i in 0..20 {
        last_seq = audit
            .append_durable(Record::new("session.start").field("session", format!("s-{i}")))
            .await
            .unwrap();
    }
    drop(audit);
    let host_ca = ca("host CA");
    let auditor_ca = ca("auditors CA");
    let (cert, key) = leaf(&host_ca, &["localhost", "127.0.0.1"], ExtendedKeyUsagePurpose::ServerAuth);
    let write = |name: &str, text: &str| {
        let p = root.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let config = AuditServeConfig {
        listen: "127.0.0.1:0".into(),
        cert_file: write("host.pem", &cert),
        key_file: write("host.key", &key),
        client_ca_file: write("auditors-ca.pem", &auditor_ca.pem),
    };
    let server = Server::bind(&config, opts.config.dir.clone()).await.unwrap();
    let addr = server.local_addr().unwrap();
    let stop = shutdown.clone();
    tokio::spawn(async move { server.run(stop).await.unwrap() });
    // The writer stays up while the endpoint serves, as in the daemon.
    tokio::spawn(async move { writer.await.unwrap() });
    Fixture {
        audit_dir: opts.config.dir,
        _root: root,
        addr,
        host_ca: host_ca.pem,
        auditor_ca,
        shutdown,
        last_seq,
    }
}

/// Sends one raw HTTP/1.1 request over TLS; returns the raw response, or the error the client saw.
async fn request(f: &Fixture, client: Option<(String, String)>, req: &str) -> Result<Vec<u8>, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(f.host_ca.as_bytes()).unwrap()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let config = match client {
        Some((cert, key)) => builder
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()],
                PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(f.addr).await.map_err(|e| e.to_string())?;
    let mut tls = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .map_err(|e| e.to_string())?;
    tls.write_all(req.as_bytes()).await.map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    tokio::time::timeout(std::time::Duration::from_secs(20), tls.read_to_end(&mut out))
        .await
        .map_err(|_| "timed out".to_string())?
        .map_err(|e| e.to_string())?;
    Ok(out)
}

/// Status code and de-chunked body.
fn parse(resp: &[u8]) -> (u16, Vec<u8>) {
    let text = resp;
    let split = text.windows(4).position(|w| w == b"\r\n\r\n").expect("a header block");
    let head = String::from_utf8_lossy(&text[..split]).to_string();
    let status: u16 = head.split(' ').nth(1).unwrap().parse().unwrap();
    let mut body = text[split + 4..].to_vec();
    if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        let mut out = Vec::new();
        let mut rest = body.as_slice();
        loop {
            let eol = rest.windows(2).position(|w| w == b"\r\n").unwrap();
            let size = usize::from_str_radix(std::str::from_utf8(&rest[..eol]).unwrap().trim(), 16).unwrap();
            rest = &rest[eol + 2..];
            if size == 0 {
                break;
            }
            out.extend_from_slice(&rest[..size]);
            rest = &rest[size + 2..];
        }
        body = out;
    }
    (status, body)
}

fn get(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
}

fn on_disk(dir: &Path) -> Vec<u8> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
        .collect();
    files.sort();
    files.iter().flat_map(|p| std::fs::read(p).unwrap()).collect()
}

#[tokio::test]
async fn an_auditor_with_a_ca_certificate_pulls_the_export_incrementally() {
    let f = fixture().await;
    let auditor = leaf(&f.auditor_ca, &["auditor-1"], ExtendedKeyUsagePurpose::ClientAuth);

    let (status, body) = parse(&request(&f, Some(auditor.clone()), &get("/v1/export")).await.unwrap());
    assert_eq!(status, 200);
    assert_eq!(body, on_disk(&f.audit_dir), "the export is the exact bytes on disk");
    assert_eq!(read_exported(&f.audit_dir).unwrap(), None, "nothing confirmed yet");

    let since = f.last_seq - 3;
    let (status, body) =
        parse(&request(&f, Some(auditor.clone()), &get(&format!("/v1/export?since={since}"))).await.unwrap());
    assert_eq!(status, 200);
    let first: serde_json::Value =
        serde_json::from_slice(body.split(|b| *b == b'\n').next().unwrap()).unwrap();
    assert_eq!(first["seq"], since);
    assert_eq!(
        read_exported(&f.audit_dir).unwrap(),
        Some(since - 1),
        "asking for since confirms what came before"
    );

    let (status, _) = parse(&request(&f, Some(auditor.clone()), &get("/v1/other")).await.unwrap());
    assert_eq!(status, 404);
    let post =
        "POST /v1/export HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
    let (status, _) = parse(&request(&f, Some(auditor.clone()), post).await.unwrap());
    assert_eq!(status, 405);
    let (status, _) = parse(&request(&f, Some(auditor), &get("/v1/export?since=abc")).await.unwrap());
    assert_eq!(status, 400);
    f.shutdown.cancel();
}

#[tokio::test]
async fn a_client_without_a_certificate_from_the_auditor_ca_is_refused() {
    let f = fixture().await;
    let outsider_ca = ca("someone else");
    let outsider = leaf(&outsider_ca, &["mallory"], ExtendedKeyUsagePurpose::ClientAuth);
    // TLS 1.3: the client's handshake completes first; the server's verdict arrives as an alert on read.
    let refused = request(&f, None, &get("/v1/export")).await;
    assert_eq!(refused, Err("received fatal alert: CertificateRequired".to_owned()));
    let refused = request(&f, Some(outsider), &get("/v1/export")).await;
    assert_eq!(refused, Err("received fatal alert: UnknownCA".to_owned()));
    f.shutdown.cancel();
}
