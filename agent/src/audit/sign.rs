//! The host's audit signing key (Ed25519) and the checkpoint signature.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};

use super::AuditError;

/// The private key file in `state_dir`: the 32-byte Ed25519 seed in hex, one line, mode 0600.
pub const KEY_FILE: &str = "audit-signing.key";
/// The public key, hex, written beside it for operators (0644); `warden audit pubkey` prints the same.
pub const PUB_FILE: &str = "audit-signing.pub";

/// The bytes a checkpoint signature covers.
///
/// `warden-audit-checkpoint-v1\n<host as a JSON string>\n<covers_seq>\n<covers_hash>\n<time>`
pub fn checkpoint_message(host: &str, covers_seq: u64, covers_hash: &str, time: &str) -> Vec<u8> {
    let host = serde_json::to_string(host).unwrap_or_default();
    format!("warden-audit-checkpoint-v1\n{host}\n{covers_seq}\n{covers_hash}\n{time}").into_bytes()
}

/// A short id of a public key: the first 16 hex digits of its SHA-256.
pub fn key_id(key: &VerifyingKey) -> String {
    super::format::sha256_hex(key.as_bytes())[..16].to_owned()
}

pub fn pubkey_hex(key: &VerifyingKey) -> String {
    hex::encode(key.as_bytes())
}

pub fn sign(key: &SigningKey, message: &[u8]) -> String {
    hex::encode(key.sign(message).to_bytes())
}

pub fn verify(key: &VerifyingKey, message: &[u8], sig_hex: &str) -> bool {
    let Ok(bytes) = hex::decode(sig_hex) else { return false };
    let Ok(bytes) = <[u8; 64]>::try_from(bytes.as_slice()) else { return false };
    key.verify(message, &Signature::from_bytes(&bytes)).is_ok()
}

/// Loads the signing key from `state_dir`, generating it (and the public key file) on first start.
pub fn load_or_create(state_dir: &Path) -> Result<SigningKey, AuditError> {
    let path = state_dir.join(KEY_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => parse_seed(&path, &text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(state_dir)
                .map_err(|source| AuditError::io("create", state_dir, source))?;
            let mut seed = [0u8; 32];
            getrandom::fill(&mut seed).map_err(|e| AuditError::Key {
                path: path.clone(),
                reason: format!("cannot read random bytes: {e}"),
            })?;
            let key = SigningKey::from_bytes(&seed);
            write_new(&path, 0o600, format!("{}\n", hex::encode(seed)).as_bytes())?;
            let public = state_dir.join(PUB_FILE);
            let _ = std::fs::remove_file(&public);
            write_new(&public, 0o644, format!("{}\n", pubkey_hex(&key.verifying_key())).as_bytes())?;
            Ok(key)
        }
        Err(source) => Err(AuditError::io("read", &path, source)),
    }
}

/// Loads the signing key from `state_dir` without creating it.
pub fn load(state_dir: &Path) -> Result<SigningKey, AuditError> {
    let path = state_dir.join(KEY_FILE);
    let text = std::fs::read_to_string(&path).map_err(|source| AuditError::io("read", &path, source))?;
    parse_seed(&path, &text)
}

fn parse_seed(path: &Path, text: &str) -> Result<SigningKey, AuditError> {
    let bad = |reason: &str| AuditError::Key { path: path.to_path_buf(), reason: reason.to_owned() };
    let bytes = hex::decode(text.trim()).map_err(|_| bad("not hex; expected a 64-digit hex Ed25519 seed"))?;
    let seed =
        <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| bad("expected 32 bytes (64 hex digits)"))?;
    Ok(SigningKey::from_bytes(&seed))
}

/// Reads a public key file as printed by `warden audit pubkey` (64 hex digits).
pub fn load_public(path: &Path) -> Result<VerifyingKey, AuditError> {
    let text = std::fs::read_to_string(path).map_err(|source| AuditError::io("read", path, source))?;
    parse_public(text.trim()).map_err(|reason| AuditError::Key { path: path.to_path_buf(), reason })
}

pub fn parse_public(text: &str) -> Result<VerifyingKey, String> {
    let bytes =
        hex::decode(text).map_err(|_| "not hex; expected the 64 hex digits `warden audit pubkey` prints")?;
    let bytes = <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| "expected 32 bytes (64 hex digits)")?;
    VerifyingKey::from_bytes(&bytes).map_err(|e| format!("not an Ed25519 public key: {e}"))
}

fn write_new(path: &PathBuf, mode: u32, bytes: &[u8]) -> Result<(), AuditError> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|source| AuditError::io("create", path, source))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(|source| AuditError::io("write", path, source))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_is_created_once_and_signs_checkpoints() {
        let dir = tempfile::tempdir().unwrap();
        let key = load_or_create(dir.path()).unwrap();
        let again = load_or_create(dir.path()).unwrap();
        assert_eq!(key.to_bytes(), again.to_bytes());
        let mode = std::fs::metadata(dir.path().join(KEY_FILE)).unwrap();
        assert_eq!(std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777, 0o600);
        let public = load_public(&dir.path().join(PUB_FILE)).unwrap();
        let msg = checkpoint_message("h", 9, &"a".repeat(64), "2026-11-23T00:00:00.000000000Z");
        let sig = sign(&key, &msg);
        assert!(verify(&public, &msg, &sig));
        let other = checkpoint_message("h", 10, &"a".repeat(64), "2026-11-23T00:00:00.000000000Z");
        assert!(!verify(&public, &other, &sig));
    }
}
