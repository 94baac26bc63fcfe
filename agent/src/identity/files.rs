//! Reads an identity's private key or client secret, refusing files that anyone but root could read.

use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Arc;

use super::IdentityError;

/// A secret held in memory: never printed, not even by `Debug`.
#[derive(Clone)]
pub(crate) struct Secret(String);

impl Secret {
    pub(crate) fn new(secret: String) -> Self {
        Self(secret)
    }

    pub(crate) fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// Reads `path` after checking it is a regular file owned by root (or by the user the daemon runs as,
/// which is root in production) and not readable, writable or executable by group or others.
pub(crate) fn read_credential(identity: &str, path: &Path) -> Result<Vec<u8>, IdentityError> {
    let unreadable = |source: std::io::Error| IdentityError::CredentialUnreadable {
        identity: identity.to_owned(),
        path: path.to_path_buf(),
        source: Arc::new(source),
    };
    // Non-blocking, so a FIFO planted at the path cannot hang the daemon's start.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(unreadable)?;
    // Checked on the open file, so a rename between the check and the read changes nothing.
    let meta = file.metadata().map_err(unreadable)?;
    if !meta.is_file() {
        return Err(unreadable(std::io::Error::other("not a regular file")));
    }
    let euid = nix::unistd::geteuid().as_raw();
    if meta.uid() != 0 && meta.uid() != euid {
        return Err(IdentityError::CredentialOwner {
            identity: identity.to_owned(),
            path: path.to_path_buf(),
            uid: meta.uid(),
        });
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(IdentityError::CredentialReadable {
            identity: identity.to_owned(),
            path: path.to_path_buf(),
            mode,
        });
    }
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut std::io::Read::take(&file, 1024 * 1024), &mut bytes)
        .map_err(unreadable)?;
    Ok(bytes)
}

/// A client secret file: its first line, without the line ending; it must not be empty.
pub(crate) fn read_client_secret(identity: &str, path: &Path) -> Result<Secret, IdentityError> {
    let bytes = read_credential(identity, path)?;
    let text = String::from_utf8(bytes).map_err(|_| IdentityError::Config {
        identity: identity.to_owned(),
        detail: format!("client secret file {} is not UTF-8 text", path.display()),
    })?;
    let secret = text.lines().next().unwrap_or("").trim_end_matches('\r');
    if secret.is_empty() {
        return Err(IdentityError::Config {
            identity: identity.to_owned(),
            detail: format!(
                "client secret file {} is empty; write the Okta client secret into it",
                path.display()
            ),
        });
    }
    Ok(Secret::new(secret.to_owned()))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn write(dir: &Path, name: &str, contents: &str, mode: u32) -> std::path::PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, contents).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    #[test]
    fn a_private_secret_is_read_without_its_line_ending() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "s", "s3cret\n", 0o600);
        assert_eq!(read_client_secret("bot", &path).unwrap().expose(), "s3cret");
        assert_eq!(format!("{:?}", read_client_secret("bot", &path).unwrap()), "Secret(<redacted>)");
    }

    #[test]
    fn a_world_readable_secret_is_refused_naming_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "s", "s3cret\n", 0o644);
        let err = read_client_secret("bot", &path).unwrap_err();
        assert_eq!(err.reason(), "credential_insecure");
        let msg = err.to_string();
        assert!(msg.contains("mode 0644") && msg.contains(&format!("chmod 600 {}", path.display())), "{msg}");
        assert!(!msg.contains("s3cret"), "{msg}");
    }

    #[test]
    fn a_group_readable_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "k.pem", "-----BEGIN PRIVATE KEY-----\n", 0o640);
        assert!(matches!(
            read_credential("bot", &path),
            Err(IdentityError::CredentialReadable { mode: 0o640, .. })
        ));
    }

    #[test]
    fn a_fifo_is_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fifo");
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let err = read_credential("bot", &path).unwrap_err();
        assert!(err.to_string().contains("not a regular file"), "{err}");
    }

    #[test]
    fn missing_and_empty_files_say_so() {
        let dir = tempfile::tempdir().unwrap();
        let err = read_client_secret("bot", &dir.path().join("nope")).unwrap_err();
        assert_eq!(err.reason(), "credential_unreadable");
        assert!(err.to_string().contains("nope"), "{err}");
        let path = write(dir.path(), "empty", "\n", 0o600);
        let err = read_client_secret("bot", &path).unwrap_err();
        assert!(err.to_string().contains("is empty"), "{err}");
    }
}
