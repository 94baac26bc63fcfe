//! The log: `tracing` to stderr, plain text or one JSON object per line (`[agent] log_format`, overridden
//! by `WARDEN_LOG_FORMAT`), filtered by `WARDEN_LOG` (default `info`).
//!
//! The subscriber is global and set once, so `warden run` sets it up after reading its config (the
//! config's own errors are printed, not logged); every other command logs plain text. A session's log
//! lines carry its `session` span: session id, pid, cgroup, destination, and identity and target once
//! the gate has named them. Nothing secret is ever a field: tokens, keys and client secrets stay inside
//! `identity`, whose types holding them print as redacted.

use serde_json::{Value, json};

use crate::config::{Config, LogFormat};

/// The environment variable that overrides `agent.log_format`.
pub const FORMAT_ENV: &str = "WARDEN_LOG_FORMAT";

/// The format to use: `WARDEN_LOG_FORMAT` when set to `plain` or `json`, else the config's.
pub fn effective_format(configured: LogFormat) -> LogFormat {
    std::env::var(FORMAT_ENV).ok().and_then(|v| LogFormat::parse(v.trim())).unwrap_or(configured)
}

/// Installs the global subscriber; a second call does nothing (the first one stays).
pub fn init(configured: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("WARDEN_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    // Colour only for a person at a terminal: under systemd stderr is the journal, which would keep the
    // escape codes verbatim.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder =
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    let _ = match effective_format(configured) {
        LogFormat::Plain => builder.try_init(),
        LogFormat::Json => builder.json().with_current_span(true).with_span_list(false).try_init(),
    };
}

/// The effective configuration, for the log line `warden run` starts with. Credentials appear only as the
/// paths of the files that hold them (their contents are read by `identity` alone).
pub fn effective_config(c: &Config) -> Value {
    let identities: serde_json::Map<String, Value> = c
        .identity
        .iter()
        .map(|(name, i)| {
            let i = i.get_ref();
            let auth = match (&i.private_key_file, &i.client_secret_file) {
                (Some(_), _) => "private_key_jwt",
                (None, Some(_)) => i.token_endpoint_auth_method.as_deref().unwrap_or("client_secret_basic"),
                (None, None) => "none",
            };
            let file = i.private_key_file.as_ref().or(i.client_secret_file.as_ref());
            let v = json!({
                "issuer": i.issuer,
                "client_id": i.client_id,
                "auth": auth,
                "credential_file": file.map(|f| f.display().to_string()),
                "scopes": i.scopes,
                "audience": i.audience,
                "groups_claim": i.groups_claim,
                "groups": i.groups,
            });
            (name.clone(), v)
        })
        .collect();
    let a = &c.agent;
    json!({
        "file": c.path.display().to_string(),
        "agent": {
            "state_dir": a.state_dir.display().to_string(),
            "bpffs_dir": a.bpffs_dir.display().to_string(),
            "cgroup_root": a.cgroup_root,
            "exec_parent": a.exec_parent,
            "proxy_listen": c.proxy_listen().iter().map(ToString::to_string).collect::<Vec<_>>(),
            "control_socket": a.control_socket.display().to_string(),
            "policies": a.policies.display().to_string(),
            "allow": a.allow.iter().map(|s| s.get_ref().clone()).collect::<Vec<_>>(),
            "host": a.host,
            "log_format": match effective_format(a.log_format) { LogFormat::Plain => "plain", LogFormat::Json => "json" },
            "tcp_relay": a.tcp_relay.as_str(),
        },
        "bindings": c.binding.iter().map(|b| json!({ "cgroup": b.get_ref().cgroup, "identity": b.get_ref().identity.get_ref() })).collect::<Vec<_>>(),
        "identity": identities,
        "audit": {
            "dir": c.audit.dir.display().to_string(),
            "max_file_bytes": c.audit.max_file_bytes,
            "retain_days": c.audit.retain_days,
            "retain_until_exported": c.audit.retain_until_exported,
            "checkpoint_records": c.audit.checkpoint_records,
            "checkpoint_seconds": c.audit.checkpoint_seconds,
            "queue": c.audit.queue,
            "serve": { "listen": c.audit.serve.listen, "key_file": c.audit.serve.key_file.display().to_string() },
        },
        "metrics": { "listen": c.metrics.listen },
        "grants": { "approval_wait": format!("{}s", c.grants.approval_wait.0.as_secs()), "pending_max": format!("{}s", c.grants.pending_max.0.as_secs()) },
    })
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    use serde_json::Value;

    /// A writer into a shared buffer.
    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// The effective config names where credentials are, never what they are.
    #[test]
    fn the_effective_config_line_holds_no_secret() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("bot.secret");
        std::fs::write(&secret, "s3cr3t-client-secret\n").unwrap();
        let text = format!(
            "[agent]\nlog_format = \"json\"\n[metrics]\nlisten = \"127.0.0.1:9464\"\n[identity.bot]\nissuer = \"https://example.okta.com/oauth2/default\"\nclient_id = \"0oa1\"\nclient_secret_file = {secret:?}\naudience = \"api://warden\"\n"
        );
        let config = crate::config::Config::parse(std::path::Path::new("w.toml"), &text).unwrap();
        let line = super::effective_config(&config).to_string();
        assert!(line.contains(&secret.display().to_string()), "{line}");
        assert!(line.contains("client_secret_basic") && line.contains("127.0.0.1:9464"), "{line}");
        assert!(!line.contains("s3cr3t"), "{line}");
    }

    /// The JSON format as `init` sets it up carries the session span's fields, including those recorded
    /// after the span was made (identity and target, once the gate knows them).
    #[test]
    fn json_lines_carry_the_session_span() {
        let buf = Buffer::default();
        let writer = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!(
                "session",
                session = "s1",
                pid = 42,
                cgroup = "/a",
                identity = tracing::field::Empty,
                target = tracing::field::Empty
            );
            let _g = span.enter();
            span.record("identity", "bot");
            span.record("target", "db");
            tracing::info!(reason = "closed", "session ended");
        });
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let line: Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
        assert_eq!(line["fields"]["message"], "session ended", "{line}");
        let span = &line["span"];
        assert_eq!(span["session"], "s1", "{line}");
        assert_eq!(span["pid"], 42, "{line}");
        assert_eq!(span["cgroup"], "/a", "{line}");
        assert_eq!(span["identity"], "bot", "{line}");
        assert_eq!(span["target"], "db", "{line}");
    }
}
