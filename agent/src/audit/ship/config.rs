//! `[audit.ship]`: where sealed segments go, how long the storage must keep them, and how to reach it.

use std::ops::Range;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::duration::WrittenDays;

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
    pub retention: WrittenDays,
    /// Seal and ship at least this often, e.g. `1m`.
    pub interval: WrittenDays,
    /// AWS shared-credentials file (profile `default`); absent: the AWS environment variables, then
    /// `~/.aws/credentials`, then instance or container credentials.
    pub credentials_file: Option<Spanned<PathBuf>>,
    /// Path-style addressing (`endpoint/bucket/key`), as MinIO and many Ceph setups need; otherwise
    /// virtual-host style (`bucket.endpoint/key`).
    pub force_path_style: bool,
    /// PEM file of the CA(s) that sign the endpoint's certificate; absent: the system's roots.
    pub ca_file: Option<Spanned<PathBuf>>,
}

impl Default for ShipConfig {
    fn default() -> Self {
        Self {
            endpoint: Spanned::new(0..0, String::new()),
            bucket: Spanned::new(0..0, String::new()),
            prefix: Spanned::new(0..0, "hosts/{host}/".into()),
            region: "us-east-1".into(),
            retention: WrittenDays(Duration::from_secs(400 * 86_400)),
            interval: WrittenDays(Duration::from_secs(60)),
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

    /// Object Lock retention.
    pub fn retention(&self) -> Duration {
        self.retention.0
    }

    /// The longest a file waits to be sealed and shipped.
    pub fn interval(&self) -> Duration {
        self.interval.0
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
            ca_file: self.ca_file.as_ref().map(|f| f.get_ref().clone()),
            credentials_file: self.credentials_file.as_ref().map(|f| f.get_ref().clone()),
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
        for (name, file) in [("ca_file", &self.ca_file), ("credentials_file", &self.credentials_file)] {
            if let Some(file) = file
                && let Err(e) = std::fs::File::open(file.get_ref())
            {
                err(file.span(), format!("audit.ship.{name}: cannot open {}: {e}", file.get_ref().display()));
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
        && loopback_authority(rest)
    {
        return Ok(());
    }
    Err(format!("`{endpoint}` must be an https:// URL (plain http only to a loopback address)"))
}

/// True when the authority at the start of `rest` (what follows `http://`) names a loopback host: an IPv4
/// address in 127.0.0.0/8, `[::1]`, or `localhost`, exactly, with an optional port. A name that merely
/// starts like one (`127.0.0.1.example.com`, `localhost.example.com`) is not.
fn loopback_authority(rest: &str) -> bool {
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let (host, port) = match authority.strip_prefix('[') {
        Some(v6) => match v6.split_once(']') {
            Some((ip, "")) => (ip, None),
            Some((ip, port)) => match port.strip_prefix(':') {
                Some(port) => (ip, Some(port)),
                None => return false,
            },
            None => return false,
        },
        None => match authority.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        },
    };
    if port.is_some_and(|p| p.parse::<u16>().is_err()) {
        return false;
    }
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::{Config, ConfigError};

    #[test]
    fn off_by_default_and_prefix_names_the_host() {
        let c = Config::parse(Path::new("w.toml"), "").unwrap();
        assert!(!c.audit.ship.enabled());
        assert_eq!(c.audit.ship.host_prefix("web-1"), "hosts/web-1/");
    }

    #[test]
    fn plain_http_only_to_a_loopback_host() {
        for ok in [
            "http://127.0.0.1:9000",
            "http://127.9.8.7",
            "http://localhost:9000/",
            "http://[::1]:9000",
            "http://[::1]",
            "https://s3.example.com",
        ] {
            assert!(check_endpoint(ok).is_ok(), "{ok}");
        }
        for bad in [
            "http://127.evil.com",
            "http://127.0.0.1.evil.com:9000",
            "http://localhost.evil.com",
            "http://localhostevil.com",
            "http://[::1].evil.com",
            "http://[::1]x:9000",
            "http://127.0.0.1@evil.com",
            "http://user@127.0.0.1",
            "http://127.0.0.1:90x0",
            "http://[::2]:9000",
            "http://s3.example.com",
        ] {
            assert!(check_endpoint(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn every_ship_error_is_located() {
        let text =
            "[audit.ship]\nbucket = \"Bad_Bucket\"\nendpoint = \"http://10.0.0.1:9000\"\nprefix = \"all/\"\n";
        let ConfigError::Invalid(d) = Config::parse(Path::new("w.toml"), text).unwrap_err() else { panic!() };
        let lines: Vec<usize> = d.iter().map(|d| d.line).collect();
        assert_eq!(lines, vec![2, 3, 4], "{d:?}");
        assert!(d[1].message.contains("https"), "{d:?}");
        for (text, line) in [("retention = \"400y\"", 3), ("interval = \"0s\"", 3)] {
            let text = format!("[audit.ship]\nbucket = \"audit\"\n{text}\n");
            let ConfigError::Invalid(d) = Config::parse(Path::new("w.toml"), &text).unwrap_err() else {
                panic!()
            };
            assert_eq!(d[0].line, line, "{d:?}");
            assert!(d[0].message.contains("duration"), "{d:?}");
        }
    }

    #[test]
    fn a_valid_section_parses() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("s3-ca.pem");
        std::fs::write(&ca, "").unwrap();
        let text = format!(
            "[audit.ship]\nbucket = \"audit-trail\"\nendpoint = \"https://minio.example:9000\"\nforce_path_style = true\nca_file = {ca:?}\n"
        );
        let c = Config::parse(Path::new("w.toml"), &text).unwrap();
        assert!(c.audit.ship.enabled());
        assert_eq!(c.audit.ship.retention(), Duration::from_secs(400 * 86_400));
        assert_eq!(c.audit.ship.interval(), Duration::from_secs(60));
        let missing =
            text.replace("s3-ca.pem", "missing.pem") + "credentials_file = \"/nonexistent/creds\"\n";
        let ConfigError::Invalid(d) = Config::parse(Path::new("w.toml"), &missing).unwrap_err() else {
            panic!()
        };
        assert_eq!(d.iter().map(|d| d.line).collect::<Vec<_>>(), vec![5, 6], "{d:?}");
    }
}
