//! The one `warden.toml` template the tests, the demo and the bench write: the keys they set differ only in
//! values, so they fill a [`WardenToml`] and render it.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// A `warden.toml` for a throwaway daemon: its own state, bpffs pins, cgroups, proxy port and socket.
#[derive(Debug, Clone)]
pub struct WardenToml {
    /// A comment line written at the top.
    pub comment: String,
    pub state_dir: PathBuf,
    pub bpffs_dir: PathBuf,
    pub exec_parent: String,
    /// Bound on 127.0.0.1 and [::1].
    pub proxy_port: u16,
    pub control_socket: PathBuf,
    pub policies: PathBuf,
    pub allow: Vec<String>,
    pub host: String,
    /// Raw `key = value` lines appended to `[agent]`.
    pub agent_extra: String,
    pub audit_dir: PathBuf,
    /// Extra `key = value` lines for `[audit]` (e.g. `checkpoint_seconds = 1`).
    pub audit_extra: Vec<String>,
    pub identities: Vec<IdentityToml>,
    /// Raw TOML appended at the end (further sections).
    pub extra: String,
}

/// One `[identity.NAME]` section.
#[derive(Debug, Clone)]
pub struct IdentityToml {
    pub name: String,
    pub issuer: String,
    pub client_id: String,
    /// The authentication line, e.g. `private_key_file = "..."` or `client_secret_file = "..."`.
    pub auth: String,
    pub audience: String,
    pub groups: Vec<String>,
}

impl IdentityToml {
    /// An identity that authenticates with `private_key_jwt` using the key at `key`.
    pub fn private_key(name: &str, issuer: &str, client_id: &str, key: &Path, audience: &str) -> Self {
        Self {
            name: name.into(),
            issuer: issuer.into(),
            client_id: client_id.into(),
            auth: format!("private_key_file = {}", quote(&key.to_string_lossy())),
            audience: audience.into(),
            groups: Vec::new(),
        }
    }
}

impl WardenToml {
    /// Every path under `dir`: `dir/state`, `dir/state/audit`, `dir/control.sock`, policies at `policies`.
    pub fn in_dir(
        dir: &Path,
        policies: PathBuf,
        bpffs_dir: PathBuf,
        exec_parent: &str,
        proxy_port: u16,
    ) -> Self {
        Self {
            comment: String::new(),
            state_dir: dir.join("state"),
            bpffs_dir,
            exec_parent: exec_parent.into(),
            proxy_port,
            control_socket: dir.join("control.sock"),
            policies,
            allow: Vec::new(),
            host: "test-host".into(),
            agent_extra: String::new(),
            audit_dir: dir.join("state/audit"),
            audit_extra: Vec::new(),
            identities: Vec::new(),
            extra: String::new(),
        }
    }

    pub fn render(&self) -> String {
        let p = |p: &Path| quote(&p.to_string_lossy());
        let list = |v: &[String]| v.iter().map(|s| quote(s)).collect::<Vec<_>>().join(", ");
        let mut out = String::new();
        if !self.comment.is_empty() {
            let _ = writeln!(out, "# {}", self.comment);
        }
        let port = self.proxy_port;
        let _ = write!(
            out,
            "[agent]\nstate_dir = {}\nbpffs_dir = {}\nexec_parent = {}\nproxy_listen = [\"127.0.0.1:{port}\", \"[::1]:{port}\"]\ncontrol_socket = {}\npolicies = {}\nallow = [{}]\nhost = {}\n{}\n",
            p(&self.state_dir),
            p(&self.bpffs_dir),
            quote(&self.exec_parent),
            p(&self.control_socket),
            p(&self.policies),
            list(&self.allow),
            quote(&self.host),
            self.agent_extra,
        );
        for id in &self.identities {
            let _ = write!(
                out,
                "[identity.{}]\nissuer = {}\nclient_id = {}\n{}\nscopes = [\"warden.connect\"]\naudience = {}\ngroups = [{}]\n\n",
                id.name,
                quote(&id.issuer),
                quote(&id.client_id),
                id.auth,
                quote(&id.audience),
                list(&id.groups),
            );
        }
        let _ = writeln!(out, "[audit]\ndir = {}", p(&self.audit_dir));
        for line in &self.audit_extra {
            let _ = writeln!(out, "{line}");
        }
        out.push('\n');
        out.push_str(&self.extra);
        out
    }
}

/// A TOML basic string (JSON's escapes are TOML's).
pub fn quote(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_section() {
        let mut t = WardenToml::in_dir(
            Path::new("/tmp/w"),
            "/tmp/w/policies".into(),
            "/sys/fs/bpf/w".into(),
            "w/exec",
            15001,
        );
        t.allow = vec!["dns".into()];
        t.audit_extra = vec!["checkpoint_seconds = 1".into()];
        t.identities.push(IdentityToml::private_key(
            "bot",
            "http://127.0.0.1:1/oauth2/default",
            "c1",
            Path::new("/k.pem"),
            "api://warden",
        ));
        let text = t.render();
        assert!(text.contains("proxy_listen = [\"127.0.0.1:15001\", \"[::1]:15001\"]"), "{text}");
        assert!(text.contains("[identity.bot]\nissuer = \"http://127.0.0.1:1/oauth2/default\""), "{text}");
        assert!(text.contains("[audit]\ndir = \"/tmp/w/state/audit\"\ncheckpoint_seconds = 1\n"), "{text}");
        assert!(text.contains("allow = [\"dns\"]"), "{text}");
    }
}
