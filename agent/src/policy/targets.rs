//! Reads one `targets:` entry into a [`Target`]: the keys every target has (`protocol`, `address`), then
//! the kind's own keys, each kind with its own loader and validation. A key that belongs to another kind is
//! reported as such ("`databases` applies to postgres targets only").

use std::path::PathBuf;

use super::load::{Fields, FileCtx, parse_address, ssh_key_line};
use super::yaml::{Node, Pos, Value};
use super::{
    PgCredentials, PgLogin, PostgresTarget, Protocol, SshLogin, SshTarget, Target, TargetKind, TlsMode,
};

/// Keys each kind accepts besides `protocol` and `address`.
const POSTGRES_KEYS: &[&str] = &["databases", "tls", "ca_file", "credentials", "record_parameters"];
const SSH_KEYS: &[&str] = &["host_key", "host_ca", "credentials"];
const TCP_KEYS: &[&str] = &[];

impl FileCtx<'_> {
    pub(super) fn target(&mut self, name: &str, at: Pos, node: &Node) -> Option<Target> {
        let what = format!("target `{name}`");
        let mut all: Vec<&str> = vec!["protocol", "address"];
        for k in POSTGRES_KEYS.iter().chain(SSH_KEYS).chain(TCP_KEYS) {
            if !all.contains(k) {
                all.push(k);
            }
        }
        let fields = self.fields(node, &what, &all);
        if !matches!(node.value, Value::Map(_)) {
            return None;
        }
        let protocol = self.required(&fields, "protocol", at, &what).and_then(|n| {
            let s = self.string(n, "protocol")?;
            match s.as_str() {
                "postgres" => Some(Protocol::Postgres),
                "ssh" => Some(Protocol::Ssh),
                "tcp" => Some(Protocol::Tcp),
                other => {
                    self.err(n.pos, format!("protocol `{other}` is not postgres, ssh or tcp"));
                    None
                }
            }
        });
        let address = self.required(&fields, "address", at, &what).and_then(|n| {
            let s = self.string(n, "address")?;
            parse_address(&s).map_err(|m| self.err(n.pos, format!("address: {m}"))).ok()
        });
        let protocol = protocol?;
        let own = match protocol {
            Protocol::Postgres => POSTGRES_KEYS,
            Protocol::Ssh => SSH_KEYS,
            Protocol::Tcp => TCP_KEYS,
        };
        for (key, (pos, _)) in &fields {
            if *key == "protocol" || *key == "address" || own.contains(key) {
                continue;
            }
            let msg = if *key == "credentials" {
                "tcp targets carry opaque bytes; Warden cannot inject credentials (remove `credentials`)"
                    .to_owned()
            } else {
                let kinds: Vec<&str> = [("postgres", POSTGRES_KEYS), ("ssh", SSH_KEYS)]
                    .iter()
                    .filter(|(_, keys)| keys.contains(key))
                    .map(|(k, _)| *k)
                    .collect();
                format!("`{key}` applies to {} targets only; `{name}` is {protocol}", kinds.join(" and "))
            };
            self.err(*pos, msg);
        }
        let kind = match protocol {
            Protocol::Postgres => TargetKind::Postgres(self.postgres_target(&what, at, node, &fields)?),
            Protocol::Ssh => TargetKind::Ssh(self.ssh_target(&what, node, &fields)?),
            Protocol::Tcp => TargetKind::Tcp,
        };
        let (host, port) = address?;
        Some(Target { name: name.to_owned(), host, port, kind })
    }

    fn postgres_target(
        &mut self,
        what: &str,
        at: Pos,
        node: &Node,
        fields: &Fields<'_>,
    ) -> Option<PostgresTarget> {
        let databases = self.required(fields, "databases", at, what).map(|n| {
            let list = self.strings(n, "databases").unwrap_or_default();
            if list.is_empty() {
                self.err(n.pos, "`databases` is empty; list the databases agents may open".into());
            }
            list
        });
        let tls = match fields.get("tls") {
            None => TlsMode::Prefer,
            Some((_, n)) => match self.string(n, "tls").as_deref() {
                Some("disable") => TlsMode::Disable,
                Some("prefer") | None => TlsMode::Prefer,
                Some("require") => TlsMode::Require,
                Some("verify-full") => TlsMode::VerifyFull,
                Some(other) => {
                    self.err(n.pos, format!("tls `{other}` is not disable, prefer, require or verify-full"));
                    TlsMode::Prefer
                }
            },
        };
        let ca_file = fields.get("ca_file").and_then(|(_, n)| self.readable_file(n, "ca_file"));
        if let Some((pos, _)) = fields.get("ca_file")
            && tls != TlsMode::VerifyFull
        {
            self.err(*pos, "`ca_file` is used with `tls: verify-full` only".into());
        }
        let record_parameters =
            fields.get("record_parameters").and_then(|(_, n)| self.boolean(n, "record_parameters"));
        let credentials = self.credentials_node(what, node, fields).and_then(|n| self.pg_credentials(n));
        Some(PostgresTarget {
            databases: databases?,
            tls,
            ca_file,
            credentials: credentials?,
            record_parameters: record_parameters.unwrap_or(false),
        })
    }

    /// `{ user, password_file }`, or `{ read: {...}, write: {...} }`.
    fn pg_credentials(&mut self, node: &Node) -> Option<PgCredentials> {
        let per_access = matches!(&node.value, Value::Map(m) if m.iter().any(|(k, _)| {
            matches!(&k.value, Value::Scalar { text, .. } if text == "read" || text == "write")
        }));
        if !per_access {
            return self.pg_login(node, "`credentials`").map(PgCredentials::One);
        }
        let fields = self.fields(node, "`credentials`", &["read", "write"]);
        let read = self
            .required(&fields, "read", node.pos, "per-access `credentials`")
            .and_then(|n| self.pg_login(n, "`credentials.read`"));
        let write = self
            .required(&fields, "write", node.pos, "per-access `credentials`")
            .and_then(|n| self.pg_login(n, "`credentials.write`"));
        Some(PgCredentials::PerAccess { read: read?, write: write? })
    }

    fn pg_login(&mut self, node: &Node, what: &str) -> Option<PgLogin> {
        let fields = self.fields(node, what, &["user", "password_file", "private_key_file"]);
        if !matches!(node.value, Value::Map(_)) {
            return None;
        }
        if let Some((pos, _)) = fields.get("private_key_file") {
            self.err(*pos, "postgres credentials take `password_file`, not `private_key_file`".into());
        }
        let user = self.required(&fields, "user", node.pos, what).and_then(|n| self.string(n, "user"));
        let password_file =
            fields.get("password_file").and_then(|(_, n)| self.readable_file(n, "password_file"));
        Some(PgLogin { user: user?, password_file })
    }

    fn ssh_target(&mut self, what: &str, node: &Node, fields: &Fields<'_>) -> Option<SshTarget> {
        let mut host_key = None;
        let mut host_ca = None;
        for (key, slot) in [("host_key", &mut host_key), ("host_ca", &mut host_ca)] {
            if let Some((_, n)) = fields.get(key)
                && let Some(line) = self.string(n, key)
            {
                if ssh_key_line(&line) {
                    *slot = Some(line);
                } else {
                    self.err(
                        n.pos,
                        format!("{key} must be an OpenSSH public key line such as `ssh-ed25519 AAAA...`"),
                    );
                }
            }
        }
        if !fields.contains_key("host_key") && !fields.contains_key("host_ca") {
            self.err(
                node.pos,
                format!("ssh {what} needs host_key or host_ca so Warden can verify the upstream"),
            );
        }
        let credentials = self.credentials_node(what, node, fields).and_then(|n| self.ssh_login(n));
        Some(SshTarget { host_key, host_ca, credentials: credentials? })
    }

    fn ssh_login(&mut self, node: &Node) -> Option<SshLogin> {
        let fields = self.fields(
            node,
            "`credentials`",
            &["user", "private_key_file", "certificate_file", "password_file"],
        );
        if !matches!(node.value, Value::Map(_)) {
            return None;
        }
        let user =
            self.required(&fields, "user", node.pos, "`credentials`").and_then(|n| self.string(n, "user"));
        let mut file = |key: &str| fields.get(key).and_then(|(_, n)| self.readable_file(n, key));
        let private_key_file = file("private_key_file");
        let certificate_file = file("certificate_file");
        let password_file = file("password_file");
        if !fields.contains_key("private_key_file") && !fields.contains_key("password_file") {
            self.err(node.pos, "ssh credentials need `private_key_file` (or `password_file`)".into());
        }
        if fields.contains_key("certificate_file") && !fields.contains_key("private_key_file") {
            self.err(node.pos, "`certificate_file` needs the `private_key_file` it certifies".into());
        }
        Some(SshLogin { user: user?, private_key_file, certificate_file, password_file })
    }

    /// The `credentials` node, or an error saying the kind needs one.
    fn credentials_node<'n>(&mut self, what: &str, node: &Node, fields: &Fields<'n>) -> Option<&'n Node> {
        let found = fields.get("credentials").map(|(_, n)| *n);
        if found.is_none() {
            self.err(
                node.pos,
                format!("{what} needs `credentials` (agents never hold them; Warden injects them)"),
            );
        }
        found
    }

    /// A path (relative to the policy file's directory) the daemon must be able to open as a regular file.
    fn readable_file(&mut self, node: &Node, key: &str) -> Option<PathBuf> {
        let raw = self.string(node, key)?;
        let path = self.dir.join(&raw);
        match std::fs::File::open(&path).and_then(|f| f.metadata()) {
            Ok(m) if m.is_file() => {}
            Ok(_) => self.err(node.pos, format!("{key} {} is not a regular file", path.display())),
            Err(e) => self.err(
                node.pos,
                format!("cannot read {key} {}: {e}; the daemon must be able to read it", path.display()),
            ),
        }
        Some(path)
    }
}
