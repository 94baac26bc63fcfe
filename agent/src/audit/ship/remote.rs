//! The auditor's side: `warden audit verify --s3 s3://bucket/prefix/host` and `warden audit export --s3`,
//! from the bucket alone (the host is not needed), and comparing a local directory with the bucket.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use ed25519_dalek::VerifyingKey;
use time::OffsetDateTime;

use super::s3::{Head, Store, Version};
use super::{ShipError, pubkey_key, s3::Checksums};
use crate::audit::files::{self, Bound, Flow};
use crate::audit::format;
use crate::audit::sign;
use crate::audit::verify::{Chain, Problem, Report};

/// `s3://bucket/prefix/host`: a bucket and a host's key prefix (ending in `/`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub bucket: String,
    pub prefix: String,
}

impl std::str::FromStr for Location {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let rest = s
            .strip_prefix("s3://")
            .ok_or_else(|| format!("`{s}` is not an s3:// URL; write s3://BUCKET/PREFIX/HOST"))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(format!("`{s}` names no bucket; write s3://BUCKET/PREFIX/HOST"));
        }
        let mut prefix = prefix.trim_start_matches('/').to_owned();
        if !prefix.is_empty() && !prefix.ends_with('/') {
            prefix.push('/');
        }
        Ok(Self { bucket: bucket.to_owned(), prefix })
    }
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "s3://{}/{}", self.bucket, self.prefix)
    }
}

/// The version verify trusts for `key`: the oldest that is not a delete marker.
pub fn oldest<'a>(versions: &'a [Version], key: &str) -> Option<&'a Version> {
    // Listings give a key's versions newest first; last_modified breaks nothing when it ties.
    versions
        .iter()
        .enumerate()
        .filter(|(_, v)| v.key == key && !v.delete_marker)
        .min_by_key(|(i, v)| (v.last_modified, std::cmp::Reverse(*i)))
        .map(|(_, v)| v)
}

/// What verify adds to the chain's report for a bucket.
#[derive(Debug, Default)]
pub struct BucketReport {
    pub segments: usize,
    pub bytes: u64,
    /// The earliest retain-until among the objects read.
    pub earliest_retain_until: Option<OffsetDateTime>,
    /// Local files equal to the bucket's copy, and local files not (yet) in the bucket (compare mode).
    pub local_same: usize,
    pub local_unshipped: usize,
    /// Terminal recordings checked against the hash their `ssh.recording` record holds.
    pub recordings: usize,
}

fn problem(loc: &Location, key: &str, seq: Option<u64>, what: String) -> Problem {
    Problem { file: PathBuf::from(format!("s3://{}/{key}", loc.bucket)), line: 0, seq, what }
}

fn segment_keys(loc: &Location, versions: &[Version]) -> Vec<(u64, String)> {
    let dir = format!("{}segments/", loc.prefix);
    let mut keys: Vec<(u64, String)> = versions
        .iter()
        .filter_map(|v| {
            let name = v.key.strip_prefix(&dir)?;
            let digits = name.strip_prefix("audit-")?.strip_suffix(".jsonl")?;
            (digits.len() == 20).then(|| digits.parse().ok().map(|seq| (seq, v.key.clone())))?
        })
        .collect();
    keys.sort();
    keys.dedup();
    keys
}

/// Checks an object's lock: COMPLIANCE, until after `now`.
fn check_lock(head: &Head, now: OffsetDateTime) -> Result<OffsetDateTime, String> {
    if head.lock_mode.as_deref() != Some("COMPLIANCE") {
        return Err(format!(
            "Object Lock is {}, not COMPLIANCE: the object can be deleted or replaced",
            head.lock_mode.as_deref().map_or_else(|| "not set".to_owned(), |m| format!("mode {m}"))
        ));
    }
    match head.retain_until {
        Some(t) if t > now => Ok(t),
        Some(t) => Err(format!(
            "Object Lock retention ended at {}: the object can be deleted now",
            crate::timestamp::format(t)
        )),
        None => Err("Object Lock has no retain-until date".into()),
    }
}

/// Verifies a host's whole chain from the bucket: every segment present and in order, seq continuous,
/// hashes, canonical form and checkpoint signatures against the host's published key (or `pubkey`),
/// each object's checksum and `audit.shipped` record, Object Lock COMPLIANCE in force on every object, and
/// no record after the last checkpoint (only the host's key can have signed what the bucket holds).
/// With `local`, each local file is also compared with the bucket's copy.
pub async fn verify_bucket(
    store: &Store,
    loc: &Location,
    pubkey: Option<VerifyingKey>,
    local: Option<&Path>,
) -> Result<(Report, BucketReport), ShipError> {
    let now = OffsetDateTime::now_utc();
    let versions = store.versions(&loc.prefix).await?;
    let mut extra = BucketReport::default();
    // The key: the one given, else the bucket's first.
    let key_name = pubkey_key(&loc.prefix);
    let published = match oldest(&versions, &key_name) {
        Some(v) => Some(store.get(&key_name, v.version_id.as_deref()).await?),
        None => None,
    };
    let key = match (pubkey, &published) {
        (Some(k), _) => Some(k),
        (None, Some((bytes, _))) => {
            Some(sign::parse_public(String::from_utf8_lossy(bytes).trim()).map_err(|e| {
                ShipError::Conflict {
                    key: key_name.clone(),
                    reason: format!("the published key is not readable: {e}"),
                }
            })?)
        }
        (None, None) => None,
    };
    let mut chain = Chain::new(key.as_ref());
    if key.is_none() {
        chain.fail(problem(
            loc,
            &key_name,
            None,
            "no public key published here; pass the host's key with --pubkey".into(),
        ));
        return Ok((chain.finish(), extra));
    }
    if let Some((bytes, head)) = &published {
        if let Err(what) = check_lock(head, now) {
            chain.fail(problem(loc, &key_name, None, what));
        }
        if let (Some(given), Ok(held)) = (&pubkey, sign::parse_public(String::from_utf8_lossy(bytes).trim()))
            && given != &held
        {
            chain.note(format!(
                "{key_name}: the bucket's published key differs from --pubkey; verified with --pubkey"
            ));
        }
    }
    let segments = segment_keys(loc, &versions);
    extra.segments = segments.len();
    chain.report_mut().files = segments.len();
    if segments.is_empty() {
        chain.fail(problem(loc, &format!("{}segments/", loc.prefix), None, "no segments here".into()));
    }
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for v in versions.iter().filter(|v| !v.delete_marker) {
        *counts.entry(v.key.as_str()).or_default() += 1;
    }
    for (k, n) in counts.iter().filter(|(_, n)| **n > 1) {
        chain.note(format!(
            "{k}: {n} versions; verify reads the first (the one shipped), later writes are ignored"
        ));
    }
    let mut sha_by_segment: HashMap<String, String> = HashMap::new();
    // (file, sha256, seq) of every ssh.recording record in the bucket's chain.
    let mut recordings: Vec<(String, String, u64)> = Vec::new();
    let mut shipped_records: Vec<(String, String, u64)> = Vec::new();
    for (first_seq, key) in &segments {
        if chain.report().problem.is_some() {
            break;
        }
        if let Some((want, _)) = chain.expected()
            && *first_seq != want
        {
            let what = if *first_seq > want {
                format!(
                    "segment missing: no object holds seq {want}..={} (the next segment starts at {first_seq})",
                    first_seq - 1
                )
            } else {
                format!(
                    "segment starts at seq {first_seq}, inside the previous segment (which ends at {})",
                    want - 1
                )
            };
            chain.fail(problem(loc, key, Some(want), what));
            break;
        }
        let Some(version) = oldest(&versions, key) else {
            chain.fail(problem(
                loc,
                key,
                Some(*first_seq),
                "only delete markers: the segment's object is gone".into(),
            ));
            break;
        };
        let (bytes, head) = store.get(key, version.version_id.as_deref()).await?;
        extra.bytes += bytes.len() as u64;
        match check_lock(&head, now) {
            Ok(t) => {
                extra.earliest_retain_until = Some(extra.earliest_retain_until.map_or(t, |e| e.min(t)));
            }
            Err(what) => {
                chain.fail(problem(loc, key, Some(*first_seq), what));
                break;
            }
        }
        let sums = Checksums::of(&bytes);
        let stored_ok = match (&head.sha256_b64, &head.meta_sha256) {
            (Some(b64), _) => *b64 == sums.sha256_b64(),
            (None, Some(hex)) => *hex == sums.sha256_hex(),
            (None, None) => true,
        };
        if !stored_ok {
            chain.fail(problem(
                loc,
                key,
                Some(*first_seq),
                "the body does not match the checksum stored with it".into(),
            ));
            break;
        }
        if format::peek_seq(&bytes) != Some(*first_seq) {
            chain.fail(problem(
                loc,
                key,
                Some(*first_seq),
                format!("the object's first record is not seq {first_seq}, as its name says"),
            ));
            break;
        }
        let name = key.rsplit('/').next().unwrap_or_default().to_owned();
        let display = PathBuf::from(format!("s3://{}/{key}", loc.bucket));
        if !chain.segment(&display, &bytes, false) {
            break;
        }
        for line in bytes
            .split(|b| *b == b'\n')
            .filter(|l| l.windows(24).any(|w| w == b"\"event\":\"audit.shipped\""))
        {
            if let Ok(parsed) = format::check_line(line)
                && let (Some(seg), Some(sha)) = (parsed.str_field("segment"), parsed.str_field("sha256"))
            {
                shipped_records.push((seg.to_owned(), sha.to_owned(), parsed.seq));
            }
        }
        for line in bytes.split(|b| *b == b'\n').filter(|l| {
            const EVENT: &[u8] = b"\"event\":\"ssh.recording\"";
            l.windows(EVENT.len()).any(|w| w == EVENT)
        }) {
            if let Ok(parsed) = format::check_line(line)
                && let (Some(file), Some(sha)) = (parsed.str_field("file"), parsed.str_field("sha256"))
            {
                recordings.push((file.to_owned(), sha.to_owned(), parsed.seq));
            }
        }
        sha_by_segment.insert(name.clone(), sums.sha256_hex());
        if let Some(dir) = local {
            compare_local(&mut chain, &mut extra, dir, &name, &bytes);
        }
    }
    // Records after the last checkpoint are signed by nobody: anyone able to write to the bucket could
    // have added them. The shipper ends every segment in a checkpoint, so the bucket's chain never has any.
    if chain.report().problem.is_none()
        && chain.report().unsigned_tail > 0
        && let Some((_, key)) = segments.last()
    {
        let what = format!(
            "the last {} records are not covered by a checkpoint signature (a sealed segment always ends in one): \
             they may have been added by someone who can write to the bucket",
            chain.report().unsigned_tail
        );
        chain.fail(problem(loc, key, chain.report().last_seq, what));
    }
    if chain.report().problem.is_none() {
        for (seg, sha, seq) in &shipped_records {
            if let Some(actual) = sha_by_segment.get(seg)
                && actual != sha
            {
                let key = super::segment_key(&loc.prefix, seg);
                chain.fail(problem(
                    loc,
                    &key,
                    None,
                    format!("differs from what the host recorded shipping at seq {seq} (sha256 {sha})"),
                ));
                break;
            }
        }
    }
    if chain.report().problem.is_none() {
        for (file, want, seq) in &recordings {
            let key = super::recording_key(&loc.prefix, file);
            let what = match check_recording(store, &versions, &key, file, want, now).await? {
                Ok(t) => {
                    extra.recordings += 1;
                    extra.earliest_retain_until = Some(extra.earliest_retain_until.map_or(t, |e| e.min(t)));
                    continue;
                }
                Err(what) => what,
            };
            chain.fail(problem(loc, &key, Some(*seq), what));
            break;
        }
    }
    if let Some(dir) = local
        && chain.report().problem.is_none()
        && let Ok(listed) = files::list_writer_files(dir)
    {
        let unshipped = listed.iter().filter(|(_, p)| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| !sha_by_segment.contains_key(n))
        });
        extra.local_unshipped = unshipped.count();
    }
    Ok((chain.finish(), extra))
}

/// A recording in the bucket: its oldest version must exist, be locked and hash to what its record says.
/// `Ok(Err(what))` is a problem with it; `Err` a failed request.
async fn check_recording(
    store: &Store,
    versions: &[Version],
    key: &str,
    file: &str,
    want: &str,
    now: OffsetDateTime,
) -> Result<Result<OffsetDateTime, String>, ShipError> {
    if !files::recording_path_ok(file) {
        return Ok(Err(format!("an ssh.recording record names {file:?}, outside recordings/")));
    }
    let Some(version) = oldest(versions, key) else {
        return Ok(Err(format!(
            "recording missing: the ssh.recording record names {file} but the bucket has no such object"
        )));
    };
    let (bytes, head) = store.get(key, version.version_id.as_deref()).await?;
    let locked = match check_lock(&head, now) {
        Ok(t) => t,
        Err(what) => return Ok(Err(what)),
    };
    let got = Checksums::of(&bytes).sha256_hex();
    if got != want {
        return Ok(Err(format!(
            "the recording does not match its ssh.recording record (sha256 {got}, the record says {want}): it was altered"
        )));
    }
    Ok(Ok(locked))
}

/// Compare mode: a local file of the same name must hold the bucket's bytes.
fn compare_local(chain: &mut Chain<'_>, extra: &mut BucketReport, dir: &Path, name: &str, remote: &[u8]) {
    let path = dir.join(name);
    let Ok(local) = std::fs::read(&path) else {
        return; // deleted locally (retention, or otherwise): the bucket's copy stands
    };
    if local == remote {
        extra.local_same += 1;
        return;
    }
    let at = local.iter().zip(remote).position(|(a, b)| a != b).unwrap_or(local.len().min(remote.len()));
    // 1-based number of the line holding the first differing byte.
    let line = local[..at].split(|b| *b == b'\n').count();
    chain.fail(Problem {
        file: path,
        line,
        seq: None,
        what: format!("differs from the bucket's copy {name} from line {line}: the local file was changed after it was shipped"),
    });
}

/// Streams the lines of a host's segments within `since..=until` from the bucket, oldest first.
/// Returns the seq of the last line passed to `out`.
pub async fn export_bucket(
    store: &Store,
    loc: &Location,
    since: Option<&Bound>,
    until: Option<&Bound>,
    mut out: impl FnMut(&[u8]) -> std::io::Result<()>,
) -> Result<Option<u64>, ShipError> {
    let versions = store.versions(&format!("{}segments/", loc.prefix)).await?;
    let segments = segment_keys(loc, &versions);
    let mut last = None;
    for (i, (first, key)) in segments.iter().enumerate() {
        if let (Some(Bound::Seq(s)), Some((next, _))) = (since, segments.get(i + 1))
            && *next <= *s
        {
            continue;
        }
        if let Some(Bound::Seq(u)) = until
            && *first > *u
        {
            break;
        }
        let Some(version) = oldest(&versions, key) else { continue };
        let (bytes, _) = store.get(key, version.version_id.as_deref()).await?;
        let name = PathBuf::from(format!("s3://{}/{key}", loc.bucket));
        if let Flow::Stop = files::filter_lines(bytes.as_slice(), &name, since, until, &mut out, &mut last)? {
            break;
        }
    }
    Ok(last)
}

/// Downloads the recordings `files` names (as their `ssh.recording` records do, `recordings/...`) from the
/// bucket, each the first version written, to the same relative paths under `to` (0600). A name outside
/// `recordings/` or one the bucket does not hold is an error naming it.
pub async fn fetch_recordings(
    store: &Store,
    loc: &Location,
    files: &[String],
    to: &Path,
) -> Result<Result<usize, String>, ShipError> {
    if files.is_empty() {
        return Ok(Ok(0));
    }
    let versions = store.versions(&format!("{}recordings/", loc.prefix)).await?;
    for file in files {
        if !files::recording_path_ok(file) {
            return Ok(Err(format!("an ssh.recording record names {file:?}, outside recordings/")));
        }
        let key = super::recording_key(&loc.prefix, file);
        let Some(version) = oldest(&versions, &key) else {
            return Ok(Err(format!("recording missing: s3://{}/{key} is not in the bucket", loc.bucket)));
        };
        let (bytes, _) = store.get(&key, version.version_id.as_deref()).await?;
        if let Err(e) = files::write_private(&to.join(file), &bytes) {
            return Ok(Err(e));
        }
    }
    Ok(Ok(files.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_parse() {
        let l: Location = "s3://audit/hosts/web-1".parse().unwrap();
        assert_eq!(l, Location { bucket: "audit".into(), prefix: "hosts/web-1/".into() });
        let l: Location = "s3://audit".parse().unwrap();
        assert_eq!(l.prefix, "");
        assert!("https://audit/x".parse::<Location>().is_err());
        assert!("s3:///x".parse::<Location>().is_err());
    }

    #[test]
    fn the_oldest_version_wins() {
        let t = |s| Some(OffsetDateTime::from_unix_timestamp(s).unwrap());
        let v = |id: &str, at, dm| Version {
            key: "k".into(),
            version_id: Some(id.into()),
            last_modified: t(at),
            delete_marker: dm,
        };
        let versions = vec![v("3", 30, true), v("2", 20, false), v("1", 10, false)];
        assert_eq!(oldest(&versions, "k").unwrap().version_id.as_deref(), Some("1"));
        assert!(oldest(&versions, "other").is_none());
    }
}
