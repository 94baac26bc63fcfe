//! `warden audit verify --s3 ...` and `warden audit export --s3 ...`: the auditor's commands against a
//! bucket (exit 0 intact, 1 a problem found, 64 bad arguments, 70 storage unreachable or internal).

use std::io::{BufWriter, Write};
use std::path::Path;

use std::path::PathBuf;

use super::{EXIT_INTERNAL, EXIT_INVALID, fail};
use crate::audit::files::Bound;
use crate::audit::ship::remote::{self, Location};
use crate::audit::ship::{Connection, ShipConfig, Store};
use crate::audit::sign;
use crate::config::Config;

/// The flags `audit verify` and `audit export` take to read from a bucket.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct S3Args {
    /// Read the chain from object storage: s3://BUCKET/PREFIX/HOST (e.g. s3://audit/hosts/web-1).
    #[arg(long, value_name = "URL")]
    pub s3: Option<String>,
    /// S3 endpoint URL (MinIO, Ceph); defaults to [audit.ship] endpoint, else AWS.
    #[arg(long, requires = "s3")]
    pub endpoint: Option<String>,
    /// Bucket region; defaults to [audit.ship] region, else AWS_REGION, else us-east-1.
    #[arg(long, requires = "s3")]
    pub region: Option<String>,
    /// Path-style addressing (endpoint/bucket/key), as MinIO and many Ceph setups need.
    #[arg(long, requires = "s3")]
    pub path_style: bool,
    /// PEM CA file for the endpoint's certificate.
    #[arg(long, requires = "s3", value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
    /// AWS shared-credentials file (profile default); else the AWS environment variables and instance
    /// credentials.
    #[arg(long, requires = "s3", value_name = "FILE")]
    pub credentials: Option<PathBuf>,
}

impl S3Args {
    /// The connection: the flags, else the config's `[audit.ship]` when there is one.
    pub fn connection(&self, config: Option<&ShipConfig>) -> Connection {
        let base = config.filter(|c| c.enabled()).map(ShipConfig::connection).unwrap_or_default();
        Connection {
            endpoint: self.endpoint.clone().or(base.endpoint),
            region: self
                .region
                .clone()
                .or_else(|| Some(base.region).filter(|r| !r.is_empty()))
                .or_else(|| std::env::var("AWS_REGION").ok())
                .unwrap_or_else(|| "us-east-1".into()),
            force_path_style: self.path_style || base.force_path_style,
            ca_file: self.ca_file.clone().or(base.ca_file),
            credentials_file: self.credentials.clone().or(base.credentials_file),
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, u8> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| fail(EXIT_INTERNAL, &format!("cannot start the runtime: {e}")))
}

/// The location and a client, from the flags (and `[audit.ship]` when the config is readable).
fn open(args: &S3Args, config: &Path, rt: &tokio::runtime::Runtime) -> Result<(Location, Store), u8> {
    let url = args.s3.as_deref().unwrap_or_default();
    let loc: Location = url.parse().map_err(|e: String| fail(EXIT_INVALID, &e))?;
    let loaded = Config::load(config).ok();
    let ship: Option<&ShipConfig> = loaded.as_ref().map(|c| &c.audit.ship);
    let conn = args.connection(ship);
    if let Some(endpoint) = &conn.endpoint
        && let Err(e) = crate::audit::ship::check_endpoint(endpoint)
    {
        return Err(fail(EXIT_INVALID, &format!("--endpoint: {e}")));
    }
    let store = rt.block_on(Store::connect(&conn, &loc.bucket)).map_err(|e| fail(EXIT_INVALID, &e))?;
    Ok((loc, store))
}

pub fn verify(args: &S3Args, dir: Option<&Path>, pubkey: Option<&Path>, config: &Path) -> u8 {
    let key = match pubkey.map(sign::load_public).transpose() {
        Ok(k) => k,
        Err(e) => return fail(EXIT_INVALID, &e),
    };
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let (loc, store) = match open(args, config, &rt) {
        Ok(x) => x,
        Err(code) => return code,
    };
    let (report, bucket) = match rt.block_on(remote::verify_bucket(&store, &loc, key, dir)) {
        Ok(r) => r,
        Err(e) => return fail(EXIT_INTERNAL, &e),
    };
    if let Some(code) = super::print_notes_and_problem(&report) {
        return code;
    }
    let hosts: Vec<&str> = report.hosts.iter().map(String::as_str).collect();
    println!(
        "intact in {loc}: {} records (seq {}..={}) in {} segments ({} bytes), {} recordings, host {}",
        report.records,
        report.first_seq.unwrap_or(0),
        report.last_seq.unwrap_or(0),
        bucket.segments,
        bucket.bytes,
        bucket.recordings,
        hosts.join(", ")
    );
    println!(
        "signed: {} checkpoints verified; signed through seq {}",
        report.checkpoints,
        report.signed_through.map_or_else(|| "(none)".into(), |s| s.to_string())
    );
    if let Some(t) = bucket.earliest_retain_until {
        println!(
            "locked: every object under Object Lock COMPLIANCE, the earliest until {}",
            crate::timestamp::format(t)
        );
    }
    if let Some(dir) = dir {
        println!(
            "local {}: {} files equal to the bucket's copies, {} not in the bucket yet",
            dir.display(),
            bucket.local_same,
            bucket.local_unshipped
        );
    }
    0
}

/// `warden audit export --s3`: the records from the bucket, and with `recordings` the terminal recordings
/// they name, fetched from the bucket. `mark` is refused: it marks this host's own files as exported.
pub fn export(
    args: &S3Args,
    range: (Option<&str>, Option<&str>),
    format: &str,
    mark: bool,
    recordings: Option<&Path>,
    config: &Path,
) -> u8 {
    let (since, until) = range;
    if format != "jsonl" {
        return fail(EXIT_INVALID, &format!("unknown format {format:?}; the only format is jsonl"));
    }
    if mark {
        return fail(
            EXIT_INVALID,
            &"--mark records that this host's own audit files were exported; it cannot be used with --s3",
        );
    }
    let parse = |s: Option<&str>| s.map(str::parse::<Bound>).transpose();
    let (since, until) = match (parse(since), parse(until)) {
        (Ok(s), Ok(u)) => (s, u),
        (Err(e), _) | (_, Err(e)) => return fail(EXIT_INVALID, &e),
    };
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let (loc, store) = match open(args, config, &rt) {
        Ok(x) => x,
        Err(code) => return code,
    };
    let stdout = std::io::stdout();
    let mut out = BufWriter::with_capacity(256 * 1024, stdout.lock());
    let mut casts = Vec::new();
    let result = rt.block_on(remote::export_bucket(&store, &loc, since.as_ref(), until.as_ref(), |line| {
        if recordings.is_some() {
            casts.extend(crate::protocol::ssh::record::named_in(line));
        }
        out.write_all(line)
    }));
    let flushed = out.flush();
    match (result, flushed) {
        (Err(e), _) => return fail(EXIT_INTERNAL, &e),
        (_, Err(e)) => return fail(EXIT_INTERNAL, &format!("cannot write the export: {e}")),
        (Ok(_), Ok(())) => {}
    }
    let Some(to) = recordings else { return 0 };
    match rt.block_on(remote::fetch_recordings(&store, &loc, &casts, to)) {
        Ok(Ok(_)) => 0,
        Ok(Err(e)) => fail(EXIT_INTERNAL, &e),
        Err(e) => fail(EXIT_INTERNAL, &e),
    }
}
