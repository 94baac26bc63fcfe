//! The log: `tracing` to stderr, plain text or one JSON object per line (`[agent] log_format`, overridden
//! by `WARDEN_LOG_FORMAT`), filtered by `WARDEN_LOG` (default `info`).
//!
//! The subscriber is global and set once, so `warden run` sets it up after reading its config (the
//! config's own errors are printed, not logged); every other command logs plain text. A session's log
//! lines carry its `session` span: session id, pid, cgroup, destination, and identity and target once
//! the gate has named them. Nothing secret is ever a field: tokens, keys and client secrets stay inside
//! `identity`, whose types holding them print as redacted.

use crate::config::LogFormat;

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
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = match effective_format(configured) {
        LogFormat::Plain => builder.try_init(),
        LogFormat::Json => builder.json().with_current_span(true).with_span_list(false).try_init(),
    };
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
