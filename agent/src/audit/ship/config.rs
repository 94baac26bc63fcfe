//! `[audit.ship]`: where sealed segments go, how long the storage must keep them, and how to reach it.

use std::ops::Range;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

/// `[audit.ship]`; off unless `bucket` is set.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShipConfig {
    /// Empty: AWS's regional endpoint. Otherwise an http(s) URL (MinIO, Ceph RGW, a VPC endpoint).
    pub endpoint: Spanned<String>,
    /// A bucket created with Object Lock enabled.
    pub bucket: Spanned<String>,
    /// Key prefix for this host's objects; `{host}` is replaced with the host name.
    pub prefix: Spanned<String>,
    pub region: String,
    /// Object Lock COMPLIANCE retention set on every object, e.g. `400d`.
    pub retention: Spanned<String>,
    /// Seal and ship at least this often, e.g. `1m`.
    pub interval: Spanned<String>,
    /// AWS shared-credentials file (profile `default`); absent: the AWS environment variables, then
    /// `~/.aws/credentials`, then instance or container credentials.
    pub credentials_file: Option<PathBuf>,
    /// Path-style addressing (`endpoint/bucket/key`), as MinIO and many Ceph setups need; otherwise
    /// virtual-host style (`bucket.endpoint/key`).
    pub force_path_style: bool,
    /// PEM file of the CA(s) that sign the endpoint's certificate; absent: the system's roots.
    pub ca_file: Option<PathBuf>,
}

impl Default for ShipConfig {
    fn default() -> Self {
        Self {
            endpoint: Spanned::new(0..0, String::new()),
            bucket: Spanned::new(0..0, String::new()),
            prefix: Spanned::new(0..0, "hosts/{host}/".into()),
            region: "us-east-1".into(),
            retention: Spanned::new(0..0, "400d".into()),
            interval: Spanned::new(0..0, "1m".into()),
            credentials_file: None,
            force_path_style: false,
            ca_file: None,
        }
    }
}

impl ShipConfig {
    pub fn enabled(&self) -> bool {
        !self.bucket.get_ref().is_empty()
    }

    /// Object Lock retention (validated by [`ShipConfig::validate`]; a day if unparsable).
    pub fn retention(&self) -> Duration {
        parse_span(self.retention.get_ref()).unwrap_or(Duration::from_secs(86_400))
    }

    /// The longest a file waits to be sealed and shipped.
    pub fn interval(&self) -> Duration {
        parse_span(self.interval.get_ref()).unwrap_or(Duration::from_secs(60))
    }

    /// This host's key prefix, ending in `/`.
    pub fn host_prefix(&self, host: &str) -> String {
        let mut p = self.prefix.get_ref().replace("{host}", host);
        if !p.is_empty() && !p.ends_with('/') {
            p.push('/');
        }
        p
    }

    /// How to reach the storage.
    pub fn connection(&self) -> super::Connection {
        super::Connection {
            endpoint: Some(self.endpoint.get_ref().clone()).filter(|e| !e.is_empty()),
            region: self.region.clone(),
            force_path_style: self.force_path_style,
            ca_file: self.ca_file.clone(),
            credentials_file: self.credentials_file.clone(),
        }
    }

    /// Reports every problem through `err(span, message)`, as the rest of the config does.
    pub fn validate(&self, err: &mut impl FnMut(Range<usize>, String)) {
        if !self.enabled() {
            return;
        }
        let bucket = self.bucket.get_ref();
        if bucket.len() < 3
            || bucket.len() > 63
            || !bucket.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        {
            err(
                self.bucket.span(),
                format!("audit.ship.bucket: `{bucket}` is not a bucket name (3-63 of a-z, 0-9, `-`, `.`)"),
            );
        }
        if let Err(msg) = check_endpoint(self.endpoint.get_ref()) {
            err(self.endpoint.span(), format!("audit.ship.endpoint: {msg}"));
        }
        if self.prefix.get_ref().starts_with('/') {
            err(
                self.prefix.span(),
                "audit.ship.prefix: must not start with `/`; write e.g. `hosts/{host}/`".into(),
            );
        }
        if !self.prefix.get_ref().contains("{host}") {
            err(
                self.prefix.span(),
                "audit.ship.prefix: must contain `{host}` so hosts sharing a bucket do not share a chain"
                    .into(),
            );
        }
        for (name, value) in [("retention", &self.retention), ("interval", &self.interval)] {
            if let Err(msg) = parse_span(value.get_ref()) {
                err(value.span(), format!("audit.ship.{name}: {msg}"));
            }
        }
        if self.region.is_empty() {
            err(
                0..0,
                "audit.ship.region is empty; set the bucket's region (MinIO and Ceph accept us-east-1)"
                    .into(),
            );
        }
    }
}

/// An http(s) URL; plain http only to a loopback address (tests, a local gateway).
pub fn check_endpoint(endpoint: &str) -> Result<(), String> {
    if endpoint.is_empty() || endpoint.starts_with("https://") {
        return Ok(());
    }
    if let Some(rest) = endpoint.strip_prefix("http://")
        && (rest.starts_with("127.") || rest.starts_with("[::1]") || rest.starts_with("localhost"))
    {
        return Ok(());
    }
    Err(format!("`{endpoint}` must be an https:// URL (plain http only to a loopback address)"))
}

/// A duration with units s, m, h or d (`400d`, `1m`, `90s`, `1h30m`).
pub fn parse_span(s: &str) -> Result<Duration, String> {
    let hint = "write a number and a unit: s, m, h or d (e.g. 90s, 1m, 400d)";
    let mut total: u64 = 0;
    let mut digits = String::new();
    for c in s.trim().chars() {
        if c.is_ascii_digit() {
            digits.push(c);
            continue;
        }
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86_400,
            _ => return Err(format!("`{s}` is not a duration; {hint}")),
        };
        let n: u64 = digits.parse().map_err(|_| format!("`{s}` is not a duration; {hint}"))?;
        total = n
            .checked_mul(unit)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(|| format!("`{s}` is too long"))?;
        digits.clear();
    }
    if !digits.is_empty() || s.trim().is_empty() {
        return Err(format!("`{s}` is not a duration; {hint}"));
    }
    if total == 0 {
        return Err(format!("`{s}` is zero; give a positive duration"));
    }
    Ok(Duration::from_secs(total))
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::{Config, ConfigError};

    #[test]
    fn spans_parse_with_days() {
        assert_eq!(parse_span("400d"), Ok(Duration::from_secs(400 * 86_400)));
        assert_eq!(parse_span("1m"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_span("1h30m"), Ok(Duration::from_secs(5400)));
        assert!(parse_span("0s").is_err());
        assert!(parse_span("10").is_err());
        assert!(parse_span("1y").is_err());
    }

    #[test]
    fn off_by_default_and_prefix_names_the_host() {
        let c = Config::parse(Path::new("w.toml"), "").unwrap();
        assert!(!c.audit.ship.enabled());
        assert_eq!(c.audit.ship.host_prefix("web-1"), "hosts/web-1/");
    }

    #[test]
    fn every_ship_error_is_located() {
        let text = "[audit.ship]\nbucket = \"Bad_Bucket\"\nendpoint = \"http://10.0.0.1:9000\"\nprefix = \"all/\"\nretention = \"400y\"\ninterval = \"0s\"\n";
        let ConfigError::Invalid(d) = Config::parse(Path::new("w.toml"), text).unwrap_err() else { panic!() };
        let lines: Vec<usize> = d.iter().map(|d| d.line).collect();
        assert_eq!(lines, vec![2, 3, 4, 5, 6], "{d:?}");
        assert!(d[1].message.contains("https"), "{d:?}");
    }

    #[test]
    fn a_valid_section_parses() {
        let text = "[audit.ship]\nbucket = \"audit-trail\"\nendpoint = \"https://minio.example:9000\"\nforce_path_style = true\nca_file = \"/etc/warden/s3-ca.pem\"\n";
        let c = Config::parse(Path::new("w.toml"), text).unwrap();
        assert!(c.audit.ship.enabled());
        assert_eq!(c.audit.ship.retention(), Duration::from_secs(400 * 86_400));
        assert_eq!(c.audit.ship.interval(), Duration::from_secs(60));
    }
}
