//! The daemon's configuration (`warden.toml`): its types, defaults, and whole-file validation.
//!
//! Every error is reported with `file:line:col` so `warden check` can list them all at once.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::duration::Written;

/// One problem found in a configuration or policy file, located for the operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub file: PathBuf,
    pub line: usize,
    pub col: usize,
    pub message: String,
}

impl std::fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}:{}: {}", self.file.display(), self.line, self.col, self.message)
    }
}

impl Diagnostic {
    /// Locates a byte offset range of `text` as 1-based line and column.
    pub fn at(file: &Path, text: &str, span: Option<Range<usize>>, message: impl Into<String>) -> Self {
        let (line, col) = span.map_or((1, 1), |s| line_col(text, s.start));
        Self { file: file.to_path_buf(), line, col, message: message.into() }
    }
}

/// 1-based line and column (in characters) of a byte offset.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<Diagnostic>),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub agent: AgentConfig,
    #[serde(default)]
    pub binding: Vec<Spanned<BindingConfig>>,
    #[serde(default)]
    pub identity: BTreeMap<String, Spanned<IdentityConfig>>,
    #[serde(default)]
    pub audit: AuditConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    #[serde(default)]
    pub grants: GrantsConfig,
    /// Where this config was read from (not a TOML key).
    #[serde(skip)]
    pub path: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    pub state_dir: PathBuf,
    pub bpffs_dir: PathBuf,
    /// `auto`: the cgroup2 mount read from /proc/self/mountinfo.
    pub cgroup_root: String,
    pub exec_parent: String,
    pub proxy_listen: Vec<Spanned<String>>,
    pub control_socket: PathBuf,
    pub policies: PathBuf,
    /// Egress a tagged process may make without the proxy: `CIDR:PORT` (port 0 or `*` = any) or `dns`.
    pub allow: Vec<Spanned<String>>,
    /// Host name written in every audit record; defaults to the machine's host name.
    pub host: Option<String>,
    /// `plain` (default) or `json` (one JSON object per line); `WARDEN_LOG_FORMAT` overrides it.
    pub log_format: LogFormat,
    /// Connections one tagged cgroup may hold in the proxy at once (hello, pending approval, live).
    pub max_sessions_per_cgroup: usize,
    /// How opaque TCP sessions move their bytes: `splice` (default) or `copy`.
    pub tcp_relay: TcpRelay,
}

/// `agent.tcp_relay`: how opaque TCP sessions move their bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TcpRelay {
    /// `splice(2)` through kernel pipes: the bytes never enter the daemon's memory.
    #[default]
    Splice,
    /// Read into and written from user-space buffers.
    Copy,
}

impl TcpRelay {
    /// `splice` or `copy`, as in the config.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Splice => "splice",
            Self::Copy => "copy",
        }
    }
}

/// `agent.log_format`: how `warden run` writes its log.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Plain,
    Json,
}

impl LogFormat {
    /// `plain` or `json`, as in the config.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "plain" => Some(Self::Plain),
            "json" => Some(Self::Json),
            _ => None,
        }
    }
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            state_dir: "/var/lib/warden".into(),
            bpffs_dir: "/sys/fs/bpf/warden".into(),
            cgroup_root: "auto".into(),
            exec_parent: "warden".into(),
            proxy_listen: vec![
                Spanned::new(0..0, "127.0.0.1:15001".into()),
                Spanned::new(0..0, "[::1]:15001".into()),
            ],
            control_socket: "/run/warden/control.sock".into(),
            policies: "/etc/warden/policies".into(),
            allow: vec![Spanned::new(0..0, "0.0.0.0/0:443".into()), Spanned::new(0..0, "dns".into())],
            host: None,
            log_format: LogFormat::Plain,
            max_sessions_per_cgroup: 1024,
            tcp_relay: TcpRelay::Splice,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BindingConfig {
    /// Relative to the cgroup2 root, or absolute.
    pub cgroup: String,
    pub identity: Spanned<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityConfig {
    pub issuer: String,
    pub client_id: String,
    pub private_key_file: Option<PathBuf>,
    /// `RS256` (default) or `ES256`, for `private_key_jwt`.
    pub private_key_alg: Option<String>,
    /// `kid` put in the client assertion's header (Okta needs it when the app has several keys).
    pub private_key_id: Option<String>,
    pub client_secret_file: Option<PathBuf>,
    /// `client_secret_basic` (default with a secret) or `client_secret_post`.
    pub token_endpoint_auth_method: Option<String>,
    #[serde(default)]
    pub scopes: Vec<String>,
    pub audience: String,
    #[serde(default = "default_groups_claim")]
    pub groups_claim: String,
    #[serde(default)]
    pub groups: Vec<String>,
}

fn default_groups_claim() -> String {
    "groups".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    pub dir: PathBuf,
    /// Rotate the current file when it reaches this many bytes.
    pub max_file_bytes: u64,
    /// Delete rotated files older than this many days (0 = keep forever).
    pub retain_days: u32,
    /// Never delete a file that has not been exported.
    pub retain_until_exported: bool,
    /// Write a signed checkpoint every this many records...
    pub checkpoint_records: u64,
    /// ...and at least every this many seconds.
    pub checkpoint_seconds: u64,
    /// Records waiting for the writer before new sessions are refused.
    pub queue: usize,
    pub serve: AuditServeConfig,
    pub ship: crate::audit::ship::ShipConfig,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            dir: "/var/lib/warden/audit".into(),
            max_file_bytes: 64 * 1024 * 1024,
            retain_days: 0,
            retain_until_exported: true,
            checkpoint_records: 1000,
            checkpoint_seconds: 60,
            queue: 8192,
            serve: AuditServeConfig::default(),
            ship: crate::audit::ship::ShipConfig::default(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditServeConfig {
    /// Empty: off.
    pub listen: String,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub client_ca_file: PathBuf,
}

impl Default for AuditServeConfig {
    fn default() -> Self {
        Self {
            listen: String::new(),
            cert_file: "/etc/warden/tls/host.pem".into(),
            key_file: "/etc/warden/tls/host.key".into(),
            client_ca_file: "/etc/warden/tls/auditors-ca.pem".into(),
        }
    }
}

/// `[grants]`: how long approvals may take.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GrantsConfig {
    /// How long a connection is held waiting for `warden grant approve` before it is refused.
    pub approval_wait: Written,
    /// How long a pending grant waits for approval before it lapses.
    pub pending_max: Written,
}

impl Default for GrantsConfig {
    fn default() -> Self {
        Self {
            approval_wait: Written(Duration::from_secs(60)),
            pending_max: Written(Duration::from_secs(3600)),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Where `/metrics` is served (Prometheus); empty: off.
    pub listen: String,
}

impl Config {
    /// Reads and validates a config file; every problem is reported, not just the first.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        Self::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let mut config: Config = toml::from_str(text).map_err(|e| {
            ConfigError::Invalid(vec![Diagnostic::at(path, text, e.span(), e.message().trim())])
        })?;
        config.path = path.to_path_buf();
        let diags = config.validate(text);
        if diags.is_empty() { Ok(config) } else { Err(ConfigError::Invalid(diags)) }
    }

    fn validate(&self, text: &str) -> Vec<Diagnostic> {
        let path = &self.path;
        let mut diags = Vec::new();
        let mut err = |span: Range<usize>, msg: String| {
            diags.push(Diagnostic::at(path, text, (span.end > 0).then_some(span), msg));
        };
        for listen in &self.agent.proxy_listen {
            if listen.get_ref().parse::<SocketAddr>().is_err() {
                err(listen.span(), format!("proxy_listen: `{}` is not an ip:port", listen.get_ref()));
            }
        }
        if self.agent.max_sessions_per_cgroup == 0 {
            err(0..0, "agent.max_sessions_per_cgroup is 0; set it to at least 1".into());
        }
        if self.agent.proxy_listen.is_empty() {
            err(0..0, "agent.proxy_listen is empty; Warden needs at least one listener".into());
        }
        for allow in &self.agent.allow {
            if let Err(msg) = AllowEntry::parse(allow.get_ref()) {
                err(allow.span(), format!("allow: {msg}"));
            }
        }
        for b in &self.binding {
            let ident = &b.get_ref().identity;
            if !self.identity.contains_key(ident.get_ref()) {
                err(
                    ident.span(),
                    format!(
                        "binding names identity `{}`, which has no [identity.{}] section",
                        ident.get_ref(),
                        ident.get_ref()
                    ),
                );
            }
        }
        for (name, ident) in &self.identity {
            let i = ident.get_ref();
            match (&i.private_key_file, &i.client_secret_file) {
                (None, None) => err(
                    ident.span(),
                    format!("identity `{name}` needs private_key_file or client_secret_file"),
                ),
                (Some(_), Some(_)) => err(
                    ident.span(),
                    format!(
                        "identity `{name}` sets both private_key_file and client_secret_file; choose one"
                    ),
                ),
                _ => {}
            }
            if !i.issuer.starts_with("https://")
                && !i.issuer.starts_with("http://127.")
                && !i.issuer.starts_with("http://[::1]")
                && !i.issuer.starts_with("http://localhost")
            {
                err(
                    ident.span(),
                    format!(
                        "identity `{name}`: issuer must be https (plain http only for loopback test providers)"
                    ),
                );
            }
        }
        if !self.metrics.listen.is_empty() && self.metrics.listen.parse::<SocketAddr>().is_err() {
            err(
                0..0,
                format!("metrics.listen: `{}` is not an ip:port (e.g. 127.0.0.1:9464)", self.metrics.listen),
            );
        }
        if !self.audit.serve.listen.is_empty() && self.audit.serve.listen.parse::<SocketAddr>().is_err() {
            err(0..0, format!("audit.serve.listen: `{}` is not an ip:port", self.audit.serve.listen));
        }
        self.audit.ship.validate(&mut err);
        diags
    }

    pub fn proxy_listen(&self) -> Vec<SocketAddr> {
        self.agent.proxy_listen.iter().filter_map(|s| s.get_ref().parse().ok()).collect()
    }

    pub fn allow_entries(&self) -> Vec<AllowEntry> {
        self.agent.allow.iter().filter_map(|s| AllowEntry::parse(s.get_ref()).ok()).collect()
    }

    /// Policy files named by `agent.policies`: the file itself, or the `*.yaml`/`*.yml` in a directory, sorted.
    pub fn policy_files(&self) -> std::io::Result<Vec<PathBuf>> {
        let p = &self.agent.policies;
        if p.is_dir() {
            let mut files: Vec<PathBuf> = std::fs::read_dir(p)?
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|f| f.extension().is_some_and(|e| e == "yaml" || e == "yml"))
                .collect();
            files.sort();
            Ok(files)
        } else {
            Ok(vec![p.clone()])
        }
    }
}

/// One `agent.allow` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AllowEntry {
    /// A CIDR and a port; port 0 means any port.
    Net { net: ipnet::IpNet, port: u16 },
    /// The resolvers of /etc/resolv.conf, port 53.
    Dns,
}

impl AllowEntry {
    pub fn parse(s: &str) -> Result<Self, String> {
        if s == "dns" {
            return Ok(Self::Dns);
        }
        let (net, port) = s
            .rsplit_once(':')
            .filter(|(n, _)| !n.is_empty())
            .ok_or_else(|| format!("`{s}` is not CIDR:PORT or `dns` (e.g. 0.0.0.0/0:443, [::]/0:443)"))?;
        // IPv6 may be bracketed as `[::1]/128` or `[::1/128]`.
        let net = net.replace(['[', ']'], "");
        let net = net.as_str();
        let net: ipnet::IpNet = net
            .parse()
            .or_else(|_| net.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
            .map_err(|_| format!("`{net}` is not an address or CIDR"))?;
        let port = if port == "*" {
            0
        } else {
            port.parse::<u16>().map_err(|_| format!("`{port}` is not a port"))?
        };
        Ok(Self::Net { net, port })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_apply_to_an_empty_file() {
        let c = Config::parse(Path::new("w.toml"), "").unwrap();
        assert_eq!(c.agent.control_socket, PathBuf::from("/run/warden/control.sock"));
        assert_eq!(c.proxy_listen().len(), 2);
        assert_eq!(c.allow_entries().len(), 2);
    }

    #[test]
    fn grant_durations_are_parsed_as_the_file_loads() {
        let c = Config::parse(Path::new("w.toml"), "[grants]\napproval_wait = \"90s\"\n").unwrap();
        assert_eq!(c.grants.approval_wait.0, Duration::from_secs(90));
        assert_eq!(c.grants.pending_max.0, Duration::from_secs(3600));
        let err = Config::parse(Path::new("w.toml"), "[grants]\npending_max = \"5x\"\n").unwrap_err();
        let ConfigError::Invalid(d) = err else { panic!("{err}") };
        assert_eq!(d[0].line, 2, "{d:?}");
        assert!(d[0].message.contains("`5x` is not a duration"), "{d:?}");
    }

    #[test]
    fn the_per_cgroup_session_cap_defaults_and_must_be_at_least_one() {
        assert_eq!(Config::parse(Path::new("w.toml"), "").unwrap().agent.max_sessions_per_cgroup, 1024);
        let c = Config::parse(Path::new("w.toml"), "[agent]\nmax_sessions_per_cgroup = 8\n").unwrap();
        assert_eq!(c.agent.max_sessions_per_cgroup, 8);
        let err = Config::parse(Path::new("w.toml"), "[agent]\nmax_sessions_per_cgroup = 0\n").unwrap_err();
        let ConfigError::Invalid(d) = err else { panic!("{err}") };
        assert!(d[0].message.contains("at least 1"), "{d:?}");
    }

    #[test]
    fn the_tcp_relay_defaults_to_splice_and_takes_copy() {
        assert_eq!(Config::parse(Path::new("w.toml"), "").unwrap().agent.tcp_relay, TcpRelay::Splice);
        let c = Config::parse(Path::new("w.toml"), "[agent]\ntcp_relay = \"copy\"\n").unwrap();
        assert_eq!(c.agent.tcp_relay, TcpRelay::Copy);
        let ConfigError::Invalid(d) =
            Config::parse(Path::new("w.toml"), "[agent]\ntcp_relay = \"sockmap\"\n").unwrap_err()
        else {
            panic!()
        };
        assert!(d[0].message.contains("splice") && d[0].message.contains("copy"), "{d:?}");
    }

    #[test]
    fn unknown_key_is_located() {
        let err = Config::parse(Path::new("w.toml"), "[agent]\nstate_dri = \"/x\"\n").unwrap_err();
        let ConfigError::Invalid(d) = err else { panic!("{err}") };
        assert_eq!((d[0].line, d[0].col), (2, 1), "{d:?}");
        assert!(d[0].message.contains("state_dri"), "{d:?}");
    }

    #[test]
    fn every_semantic_error_is_reported() {
        let text = "[agent]\nproxy_listen = [\"nope\"]\nallow = [\"10.0.0.0/8\"]\n[[binding]]\ncgroup = \"a\"\nidentity = \"ghost\"\n";
        let ConfigError::Invalid(d) = Config::parse(Path::new("w.toml"), text).unwrap_err() else { panic!() };
        assert_eq!(d.len(), 3, "{d:?}");
        assert_eq!(d[0].line, 2);
        assert_eq!(d[2].line, 6);
    }

    #[test]
    fn log_format_and_metrics_listen_are_checked() {
        let c = Config::parse(Path::new("w.toml"), "[agent]\nlog_format = \"json\"\n").unwrap();
        assert_eq!(c.agent.log_format, LogFormat::Json);
        assert_eq!(Config::parse(Path::new("w.toml"), "").unwrap().agent.log_format, LogFormat::Plain);
        let ConfigError::Invalid(d) =
            Config::parse(Path::new("w.toml"), "[agent]\nlog_format = \"xml\"\n").unwrap_err()
        else {
            panic!()
        };
        assert_eq!(d[0].line, 2, "{d:?}");
        assert!(d[0].message.contains("plain") && d[0].message.contains("json"), "{d:?}");
        let ConfigError::Invalid(d) =
            Config::parse(Path::new("w.toml"), "[metrics]\nlisten = \"9464\"\n").unwrap_err()
        else {
            panic!()
        };
        assert!(d[0].message.contains("metrics.listen"), "{d:?}");
    }

    #[test]
    fn allow_entries_parse() {
        assert_eq!(AllowEntry::parse("dns"), Ok(AllowEntry::Dns));
        assert!(matches!(AllowEntry::parse("0.0.0.0/0:443"), Ok(AllowEntry::Net { port: 443, .. })));
        assert!(matches!(AllowEntry::parse("[::1]/128:*"), Ok(AllowEntry::Net { port: 0, .. })));
        assert!(matches!(AllowEntry::parse("127.0.0.9:53"), Ok(AllowEntry::Net { port: 53, .. })));
        assert!(AllowEntry::parse("443").is_err());
    }
}
