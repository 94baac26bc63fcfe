//! The HTTPS pull endpoint for auditors (`[audit.serve]`): TLS with a required client certificate from the
//! auditor CA; `GET /v1/export?since=SEQ` streams the same JSON lines as `warden audit export`.

use std::path::PathBuf;

use tokio_util::sync::CancellationToken;

use super::AuditError;
use crate::config::AuditServeConfig;

#[expect(clippy::unused_async, reason = "placeholder until the endpoint lands")]
pub async fn run(
    config: &AuditServeConfig,
    audit_dir: PathBuf,
    shutdown: CancellationToken,
) -> Result<(), AuditError> {
    let _ = (config, audit_dir, shutdown);
    Err(AuditError::Serve { reason: "not implemented yet".into() })
}
