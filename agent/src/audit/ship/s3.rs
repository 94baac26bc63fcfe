//! The object store: an `aws-sdk-s3` client on rustls (ring), with a custom endpoint, path- or
//! virtual-host-style addressing and an optional CA file, and the few operations shipping and verifying
//! need (write once with a COMPLIANCE lock, read a version with its lock, list versions).

use std::path::PathBuf;
use std::time::Duration;

use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::{ByteStream, DateTime};
use aws_sdk_s3::types::{ChecksumAlgorithm, ChecksumMode, ObjectLockMode, ObjectLockRetention};
use aws_smithy_http_client::tls;
use base64::Engine as _;
use time::OffsetDateTime;

use super::ShipError;

/// How to reach the storage; from `[audit.ship]` or the auditor's command line.
#[derive(Debug, Clone, Default)]
pub struct Connection {
    /// `None`: AWS's regional endpoint.
    pub endpoint: Option<String>,
    pub region: String,
    pub force_path_style: bool,
    pub ca_file: Option<PathBuf>,
    /// AWS shared-credentials file (profile `default`); `None`: the SDK's default chain.
    pub credentials_file: Option<PathBuf>,
}

/// One bucket, through one client.
#[derive(Clone, Debug)]
pub struct Store {
    client: aws_sdk_s3::Client,
    bucket: String,
}

/// What the storage holds for one version of a key.
#[derive(Debug, Clone)]
pub struct Head {
    pub version_id: Option<String>,
    /// Base64 SHA-256 the storage recorded for the object (`x-amz-checksum-sha256`), if it keeps one.
    pub sha256_b64: Option<String>,
    /// Hex SHA-256 the shipper put in the object's metadata (`x-amz-meta-sha256`).
    pub meta_sha256: Option<String>,
    pub lock_mode: Option<String>,
    pub retain_until: Option<OffsetDateTime>,
}

/// One entry of a version listing (objects and delete markers).
#[derive(Debug, Clone)]
pub struct Version {
    pub key: String,
    pub version_id: Option<String>,
    pub last_modified: Option<OffsetDateTime>,
    pub delete_marker: bool,
}

/// The outcome of a write-once put.
#[derive(Debug, Clone)]
pub enum Put {
    Created {
        version_id: Option<String>,
    },
    /// The key already holds an object (`If-None-Match: *` refused the write).
    Exists,
}

/// The checksums an upload carries; the storage verifies them against the bytes it receives.
pub struct Checksums {
    pub sha256: [u8; 32],
    pub md5: [u8; 16],
}

impl Checksums {
    pub fn of(bytes: &[u8]) -> Self {
        use md5::Digest as _;
        use sha2::Digest as _;
        Self { sha256: sha2::Sha256::digest(bytes).into(), md5: md5::Md5::digest(bytes).into() }
    }

    pub fn sha256_hex(&self) -> String {
        hex::encode(self.sha256)
    }

    pub fn sha256_b64(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(self.sha256)
    }
}

fn sdk_error<E: ProvideErrorMetadata + std::error::Error + 'static, R: std::fmt::Debug>(
    op: &'static str,
    key: &str,
    e: &SdkError<E, R>,
) -> ShipError {
    ShipError::Request { op, key: key.to_owned(), reason: DisplayErrorContext(e).to_string() }
}

fn status<E>(e: &SdkError<E, aws_sdk_s3::config::http::HttpResponse>) -> Option<u16> {
    e.raw_response().map(|r| r.status().as_u16())
}

fn to_time(t: &DateTime) -> Option<OffsetDateTime> {
    OffsetDateTime::from_unix_timestamp_nanos(
        i128::from(t.secs()) * 1_000_000_000 + i128::from(t.subsec_nanos()),
    )
    .ok()
}

impl Store {
    /// Builds the client. Credentials are read when the first request is signed, never logged.
    pub async fn connect(c: &Connection, bucket: &str) -> Result<Self, ShipError> {
        let mut trust = tls::TrustStore::default();
        if let Some(ca) = &c.ca_file {
            let pem = std::fs::read(ca).map_err(|e| ShipError::Config {
                reason: format!("cannot read the CA file {}: {e}", ca.display()),
            })?;
            if !String::from_utf8_lossy(&pem).contains("-----BEGIN CERTIFICATE-----") {
                return Err(ShipError::Config {
                    reason: format!(
                        "{}: no PEM certificate in it; give the CA that signs the endpoint",
                        ca.display()
                    ),
                });
            }
            trust = tls::TrustStore::empty().with_native_roots(false).with_pem_certificate(pem);
        }
        let context = tls::TlsContext::builder()
            .with_trust_store(trust)
            .build()
            .map_err(|e| ShipError::Config { reason: format!("TLS setup: {e}") })?;
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(tls::Provider::Rustls(tls::rustls_provider::CryptoMode::Ring))
            .tls_context(context)
            .build_https();
        let region = aws_sdk_s3::config::Region::new(c.region.clone());
        let provider_config = aws_config::provider_config::ProviderConfig::default()
            .with_http_client(http.clone())
            .with_region(Some(region.clone()));
        let credentials = match &c.credentials_file {
            Some(path) => {
                std::fs::metadata(path).map_err(|e| ShipError::Config {
                    reason: format!(
                        "cannot read the credentials file {}: {e}; write an AWS shared-credentials file with a [default] profile",
                        path.display()
                    ),
                })?;
                let files = aws_runtime::env_config::file::EnvConfigFiles::builder()
                    .include_default_config_file(false)
                    .include_default_credentials_file(false)
                    .with_file(aws_runtime::env_config::file::EnvConfigFileKind::Credentials, path)
                    .build();
                aws_sdk_s3::config::SharedCredentialsProvider::new(
                    aws_config::profile::ProfileFileCredentialsProvider::builder()
                        .configure(&provider_config)
                        .profile_files(files)
                        .profile_name("default")
                        .build(),
                )
            }
            None => aws_sdk_s3::config::SharedCredentialsProvider::new(
                aws_config::default_provider::credentials::DefaultCredentialsChain::builder()
                    .configure(provider_config)
                    .build()
                    .await,
            ),
        };
        let timeouts = aws_sdk_s3::config::timeout::TimeoutConfig::builder()
            .connect_timeout(Duration::from_secs(5))
            .operation_attempt_timeout(Duration::from_secs(60))
            .build();
        let mut conf = aws_sdk_s3::Config::builder()
            .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
            .region(region)
            .credentials_provider(credentials)
            .http_client(http)
            .force_path_style(c.force_path_style)
            .timeout_config(timeouts)
            .retry_config(aws_sdk_s3::config::retry::RetryConfig::standard().with_max_attempts(2))
            // The checksums are computed here and sent as plain headers: no aws-chunked trailers, which
            // older MinIO and Ceph releases do not accept.
            .request_checksum_calculation(aws_sdk_s3::config::RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(aws_sdk_s3::config::ResponseChecksumValidation::WhenRequired);
        if let Some(endpoint) = &c.endpoint {
            conf = conf.endpoint_url(endpoint);
        }
        Ok(Self { client: aws_sdk_s3::Client::from_conf(conf.build()), bucket: bucket.to_owned() })
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// Writes `body` at `key` unless the key already holds an object, with Object Lock COMPLIANCE until
    /// `retain_until` and SHA-256 and MD5 checksums the storage checks.
    pub async fn put_locked(
        &self,
        key: &str,
        body: Vec<u8>,
        sums: &Checksums,
        retain_until: OffsetDateTime,
        metadata: &[(&str, String)],
    ) -> Result<Put, ShipError> {
        let mut req = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .if_none_match("*")
            .content_md5(base64::engine::general_purpose::STANDARD.encode(sums.md5))
            .checksum_algorithm(ChecksumAlgorithm::Sha256)
            .checksum_sha256(sums.sha256_b64())
            .object_lock_mode(ObjectLockMode::Compliance)
            .object_lock_retain_until_date(DateTime::from_secs(retain_until.unix_timestamp()))
            .metadata("sha256", sums.sha256_hex())
            .body(ByteStream::from(body));
        for (k, v) in metadata {
            req = req.metadata(*k, v);
        }
        match req.send().await {
            Ok(out) => Ok(Put::Created { version_id: out.version_id().map(str::to_owned) }),
            Err(e) if status(&e) == Some(412) || e.code() == Some("ConditionalRequestConflict") => {
                Ok(Put::Exists)
            }
            Err(e) => Err(sdk_error("put", key, &e)),
        }
    }

    /// The newest version of `key` (or `version`), or `None` when there is none.
    pub async fn head(&self, key: &str, version: Option<&str>) -> Result<Option<Head>, ShipError> {
        let out = self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(key)
            .set_version_id(version.map(str::to_owned))
            .checksum_mode(ChecksumMode::Enabled)
            .send()
            .await;
        match out {
            Ok(o) => Ok(Some(Head {
                version_id: o.version_id().map(str::to_owned),
                sha256_b64: o.checksum_sha256().map(str::to_owned),
                meta_sha256: o.metadata().and_then(|m| m.get("sha256")).cloned(),
                lock_mode: o.object_lock_mode().map(|m| m.as_str().to_owned()),
                retain_until: o.object_lock_retain_until_date().and_then(to_time),
            })),
            Err(e) if status(&e) == Some(404) => Ok(None),
            Err(e) => Err(sdk_error("head", key, &e)),
        }
    }

    /// One version's bytes and what the storage says about it.
    pub async fn get(&self, key: &str, version: Option<&str>) -> Result<(Vec<u8>, Head), ShipError> {
        let out = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .set_version_id(version.map(str::to_owned))
            .checksum_mode(ChecksumMode::Enabled)
            .send()
            .await
            .map_err(|e| sdk_error("get", key, &e))?;
        let head = Head {
            version_id: out.version_id().map(str::to_owned),
            sha256_b64: out.checksum_sha256().map(str::to_owned),
            meta_sha256: out.metadata().and_then(|m| m.get("sha256")).cloned(),
            lock_mode: out.object_lock_mode().map(|m| m.as_str().to_owned()),
            retain_until: out.object_lock_retain_until_date().and_then(to_time),
        };
        let body = out.body.collect().await.map_err(|e| ShipError::Request {
            op: "get",
            key: key.to_owned(),
            reason: e.to_string(),
        })?;
        Ok((body.into_bytes().to_vec(), head))
    }

    /// Every version and delete marker under `prefix`, in the storage's order (by key, newest first).
    pub async fn versions(&self, prefix: &str) -> Result<Vec<Version>, ShipError> {
        let mut out = Vec::new();
        let mut key_marker: Option<String> = None;
        let mut version_marker: Option<String> = None;
        loop {
            let page = self
                .client
                .list_object_versions()
                .bucket(&self.bucket)
                .prefix(prefix)
                .set_key_marker(key_marker.take())
                .set_version_id_marker(version_marker.take())
                .send()
                .await
                .map_err(|e| sdk_error("list versions", prefix, &e))?;
            for v in page.versions() {
                out.push(Version {
                    key: v.key().unwrap_or_default().to_owned(),
                    version_id: v.version_id().map(str::to_owned),
                    last_modified: v.last_modified().and_then(to_time),
                    delete_marker: false,
                });
            }
            for d in page.delete_markers() {
                out.push(Version {
                    key: d.key().unwrap_or_default().to_owned(),
                    version_id: d.version_id().map(str::to_owned),
                    last_modified: d.last_modified().and_then(to_time),
                    delete_marker: true,
                });
            }
            if page.is_truncated() != Some(true) {
                break;
            }
            key_marker = page.next_key_marker().map(str::to_owned);
            version_marker = page.next_version_id_marker().map(str::to_owned);
            if key_marker.is_none() {
                break;
            }
        }
        Ok(out)
    }

    /// Extends (COMPLIANCE retention can only be extended) one version's lock to `until`.
    pub async fn extend_retention(
        &self,
        key: &str,
        version: Option<&str>,
        until: OffsetDateTime,
    ) -> Result<(), ShipError> {
        self.client
            .put_object_retention()
            .bucket(&self.bucket)
            .key(key)
            .set_version_id(version.map(str::to_owned))
            .retention(
                ObjectLockRetention::builder()
                    .mode(aws_sdk_s3::types::ObjectLockRetentionMode::Compliance)
                    .retain_until_date(DateTime::from_secs(until.unix_timestamp()))
                    .build(),
            )
            .checksum_algorithm(ChecksumAlgorithm::Sha256)
            .send()
            .await
            .map_err(|e| sdk_error("extend retention of", key, &e))?;
        Ok(())
    }

    /// Deletes one version (the storage refuses while it is locked); for tests and operators' checks.
    pub async fn delete_version(&self, key: &str, version: Option<&str>) -> Result<(), ShipError> {
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(key)
            .set_version_id(version.map(str::to_owned))
            .send()
            .await
            .map_err(|e| sdk_error("delete", key, &e))?;
        Ok(())
    }

    /// Writes an object without conditions or lock (tests: an attacker's overwrite).
    pub async fn put_plain(&self, key: &str, body: Vec<u8>) -> Result<Option<String>, ShipError> {
        let sums = Checksums::of(&body);
        let out = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .content_md5(base64::engine::general_purpose::STANDARD.encode(sums.md5))
            .body(ByteStream::from(body))
            .send()
            .await
            .map_err(|e| sdk_error("put", key, &e))?;
        Ok(out.version_id().map(str::to_owned))
    }

    /// Creates the bucket with Object Lock enabled (tests, and setting up a local MinIO).
    pub async fn create_locked_bucket(&self) -> Result<(), ShipError> {
        self.client
            .create_bucket()
            .bucket(&self.bucket)
            .object_lock_enabled_for_bucket(true)
            .send()
            .await
            .map_err(|e| sdk_error("create bucket", &self.bucket, &e))?;
        Ok(())
    }
}
