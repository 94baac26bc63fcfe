//! `warden audit ...`: verify, export, show, tail, pubkey.

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use super::{AuditAction, EXIT_FAILED, EXIT_INTERNAL, EXIT_INVALID, fail};
use crate::audit::files::{self, Bound};
use crate::audit::{sign, verify};
use crate::config::Config;

pub fn run(action: AuditAction) -> u8 {
    match action {
        AuditAction::Verify { dir, pubkey, config, s3 } if s3.s3.is_some() => {
            super::audit_s3::verify(&s3, dir.as_deref(), pubkey.as_deref(), &config.config)
        }
        AuditAction::Verify { dir, pubkey, config, .. } => verify_cli(dir, pubkey.as_deref(), &config.config),
        AuditAction::Export { since, until, format, s3, config, mark, recordings, .. } if s3.s3.is_some() => {
            super::audit_s3::export(
                &s3,
                (since.as_deref(), until.as_deref()),
                &format,
                mark,
                recordings.as_deref(),
                &config.config,
            )
        }
        AuditAction::Export { since, until, format, mark, recordings, dir, config, .. } => export_cli(
            since.as_deref(),
            until.as_deref(),
            &format,
            dir,
            &config.config,
            mark,
            recordings.as_deref(),
        ),
        AuditAction::Show { session, dir, json, config } => {
            show_cli(&session, dir, json.json, &config.config)
        }
        AuditAction::Tail { follow, lines, dir, config } => tail_cli(follow, lines, dir, &config.config),
        AuditAction::Pubkey { config } => pubkey_cli(&config.config),
        AuditAction::Replay { session, speed, dir, config } => match audit_dir(dir, &config.config) {
            Ok(dir) => replay_cli(&dir, &session, speed),
            Err(code) => code,
        },
    }
}

/// The audit directory: `--dir`, else the config's `audit.dir`.
fn audit_dir(dir: Option<PathBuf>, config: &Path) -> Result<PathBuf, u8> {
    if let Some(dir) = dir {
        return Ok(dir);
    }
    match Config::load(config) {
        Ok(c) => Ok(c.audit.dir),
        Err(e) => Err(fail(EXIT_INVALID, &format!("{e}; or pass the audit directory with --dir"))),
    }
}

fn verify_cli(dir: Option<PathBuf>, pubkey: Option<&Path>, config: &Path) -> u8 {
    let loaded = Config::load(config).ok();
    let dir = match (dir, &loaded) {
        (Some(d), _) => d,
        (None, Some(c)) => c.audit.dir.clone(),
        (None, None) => return fail(EXIT_INVALID, &format!("cannot read {}; pass --dir", config.display())),
    };
    let key = match pubkey {
        Some(path) => match sign::load_public(path) {
            Ok(k) => Some(k),
            Err(e) => return fail(EXIT_INVALID, &e),
        },
        None => loaded.as_ref().and_then(|c| sign::load(&c.agent.state_dir).ok()).map(|k| k.verifying_key()),
    };
    let report = match verify::verify_dir(&dir, key.as_ref()) {
        Ok(r) => r,
        Err(e) => return fail(EXIT_INTERNAL, &e),
    };
    if let Some(code) = super::print_notes_and_problem(&report) {
        return code;
    }
    let hosts: Vec<&str> = report.hosts.iter().map(String::as_str).collect();
    println!(
        "intact: {} records (seq {}..={}) in {} files, host {}",
        report.records,
        report.first_seq.unwrap_or(0),
        report.last_seq.unwrap_or(0),
        report.files,
        hosts.join(", ")
    );
    match (report.signed_through, report.signatures_checked) {
        (Some(through), true) => println!(
            "signed: {} checkpoints verified; signed through seq {through}; {} records after the last checkpoint are intact but not yet signed",
            report.checkpoints, report.unsigned_tail
        ),
        (Some(through), false) => println!(
            "warning: no public key given, checkpoint signatures NOT checked (pass --pubkey); {} checkpoints, the last covering seq {through}; {} records after it",
            report.checkpoints, report.unsigned_tail
        ),
        (None, _) => println!(
            "warning: no checkpoint yet: none of the {} records is covered by a signature",
            report.unsigned_tail
        ),
    }
    0
}

fn export_cli(
    since: Option<&str>,
    until: Option<&str>,
    format: &str,
    dir: Option<PathBuf>,
    config: &Path,
    mark: bool,
    recordings: Option<&Path>,
) -> u8 {
    if format != "jsonl" {
        return fail(EXIT_INVALID, &format!("unknown format {format:?}; the only format is jsonl"));
    }
    let parse = |s: Option<&str>| s.map(str::parse::<Bound>).transpose();
    let (since, until) = match (parse(since), parse(until)) {
        (Ok(s), Ok(u)) => (s, u),
        (Err(e), _) | (_, Err(e)) => return fail(EXIT_INVALID, &e),
    };
    let dir = match audit_dir(dir, config) {
        Ok(d) => d,
        Err(code) => return code,
    };
    let stdout = std::io::stdout();
    let mut out = BufWriter::with_capacity(256 * 1024, stdout.lock());
    let mut casts = Vec::new();
    let last = files::export_lines(&dir, since.as_ref(), until.as_ref(), |line| {
        if recordings.is_some() {
            casts.extend(crate::protocol::ssh::record::named_in(line));
        }
        out.write_all(line)
    });
    let flushed = out.flush();
    if let (Some(to), Ok(_)) = (recordings, &last)
        && let Err(e) = crate::protocol::ssh::record::copy_recordings(&dir, &casts, to)
    {
        return fail(EXIT_INTERNAL, &e);
    }
    match (last, flushed) {
        (Err(e), _) => fail(EXIT_INTERNAL, &e),
        (_, Err(e)) => fail(EXIT_INTERNAL, &format!("cannot write the export: {e}")),
        (Ok(last), Ok(())) => {
            if mark
                && let Some(last) = last
                && let Err(e) = files::mark_exported(&dir, last)
            {
                return fail(EXIT_INTERNAL, &e);
            }
            0
        }
    }
}

/// Every record (parsed) of the writer's files, in order.
fn all_records(dir: &Path, mut f: impl FnMut(Map<String, Value>)) -> Result<(), crate::audit::AuditError> {
    files::export_lines(dir, None, None, |line| {
        if let Ok(obj) = serde_json::from_slice::<Map<String, Value>>(line) {
            f(obj);
        }
        Ok(())
    })
    .map(|_| ())
}

fn show_cli(session: &str, dir: Option<PathBuf>, json: bool, config: &Path) -> u8 {
    let dir = match audit_dir(dir, config) {
        Ok(d) => d,
        Err(code) => return code,
    };
    let mut records = Vec::new();
    if let Err(e) = all_records(&dir, |obj| {
        if obj.get("session").and_then(Value::as_str) == Some(session) {
            records.push(obj);
        }
    }) {
        return fail(EXIT_INTERNAL, &e);
    }
    if records.is_empty() {
        return fail(EXIT_FAILED, &format!("no records for session {session:?} in {}", dir.display()));
    }
    let mut out = std::io::stdout().lock();
    let text = if json {
        let mut t = String::new();
        for r in &records {
            t.push_str(&Value::Object(r.clone()).to_string());
            t.push('\n');
        }
        t
    } else {
        render_session(session, &records)
    };
    match out.write_all(text.as_bytes()) {
        Ok(()) => 0,
        Err(e) => fail(EXIT_INTERNAL, &format!("cannot write: {e}")),
    }
}

fn s<'a>(r: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    r.get(key).filter(|v| !v.is_null())
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Keys every record has, or that the session header already showed.
const SHOWN: [&str; 13] = [
    "seq", "ts", "host", "event", "prev", "hash", "session", "identity", "pid", "uid", "cgroup", "target",
    "dst",
];

/// A readable account of one session: who, what, when, each statement or command, how it ended.
pub fn render_session(session: &str, records: &[Map<String, Value>]) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    let first = &records[0];
    let start = records
        .iter()
        .find(|r| r.get("event").and_then(Value::as_str) == Some("session.start"))
        .unwrap_or(first);
    let _ = writeln!(o, "session {session} on {}", s(start, "host").map(text).unwrap_or_default());
    if let Some(Value::Object(id)) = s(start, "identity") {
        let groups = id.get("groups").map_or_else(|| "[]".into(), text);
        let _ = writeln!(
            o,
            "  who:     {} (client_id {}, groups {groups})",
            id.get("sub").map_or_else(|| "?".into(), text),
            id.get("client_id").map_or_else(|| "?".into(), text)
        );
    }
    let mut proc = Vec::new();
    for key in ["pid", "uid", "cgroup"] {
        if let Some(v) = s(start, key) {
            proc.push(format!("{key} {}", text(v)));
        }
    }
    if !proc.is_empty() {
        let _ = writeln!(o, "  process: {}", proc.join(", "));
    }
    let target = [s(start, "target").map(text), s(start, "dst").map(|d| format!("({})", text(d)))]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join(" ");
    if !target.is_empty() {
        let _ = writeln!(o, "  target:  {target}");
    }
    if let Some(d) = s(start, "decision") {
        let reason = s(start, "reason").map(|r| format!(": {}", text(r))).unwrap_or_default();
        let _ = writeln!(o, "  decision: {}{reason}", text(d));
    }
    let _ = writeln!(
        o,
        "  started: {} (seq {})",
        s(start, "ts").map(text).unwrap_or_default(),
        s(start, "seq").map(text).unwrap_or_default()
    );
    let mut ended = false;
    for r in records {
        let event = r.get("event").and_then(Value::as_str).unwrap_or("?");
        let ts = s(r, "ts").map(text).unwrap_or_default();
        let rest = |skip: &[&str]| -> String {
            r.iter()
                .filter(|(k, v)| !SHOWN.contains(&k.as_str()) && !skip.contains(&k.as_str()) && !v.is_null())
                .map(|(k, v)| format!("{k}={}", text(v)))
                .collect::<Vec<_>>()
                .join(" ")
        };
        match event {
            "session.start" => {}
            "pg.query" => {
                let _ = writeln!(o, "  {ts}  query: {}", s(r, "text").map(text).unwrap_or_default());
                let more = rest(&["text"]);
                if !more.is_empty() {
                    let _ = writeln!(o, "  {:30}    {more}", "");
                }
            }
            "ssh.exec" => {
                let _ = writeln!(o, "  {ts}  exec: {}", s(r, "command").map(text).unwrap_or_default());
                let more = rest(&["command"]);
                if !more.is_empty() {
                    let _ = writeln!(o, "  {:30}    {more}", "");
                }
            }
            "session.end" => {
                ended = true;
                // Who and where are in the header already; show what the end adds.
                let shown = [
                    "pid",
                    "uid",
                    "gid",
                    "cgroup",
                    "cgroup_id",
                    "dst",
                    "identity",
                    "target",
                    "grant",
                    "decision",
                ];
                let _ = writeln!(o, "  ended:   {ts}  {}", rest(&shown));
            }
            other => {
                let _ = writeln!(o, "  {ts}  {other}: {}", rest(&[]));
            }
        }
    }
    if !ended {
        let _ = writeln!(
            o,
            "  ended:   not recorded (still running, or the daemon stopped before the session ended)"
        );
    }
    o
}

fn tail_cli(follow: bool, lines: usize, dir: Option<PathBuf>, config: &Path) -> u8 {
    let dir = match audit_dir(dir, config) {
        Ok(d) => d,
        Err(code) => return code,
    };
    let mut last: std::collections::VecDeque<Vec<u8>> = std::collections::VecDeque::with_capacity(lines + 1);
    let result = files::export_lines(&dir, None, None, |line| {
        if lines > 0 {
            last.push_back(line.to_vec());
            if last.len() > lines {
                last.pop_front();
            }
        }
        Ok(())
    });
    let next = match result {
        Ok(seq) => seq.map_or(0, |s| s + 1),
        Err(e) => return fail(EXIT_INTERNAL, &e),
    };
    let mut out = std::io::stdout().lock();
    for line in &last {
        if out.write_all(line).is_err() {
            return 0;
        }
    }
    if out.flush().is_err() || !follow {
        return 0;
    }
    match follow_from(&dir, next, &mut out) {
        Ok(()) => 0,
        Err(e) => fail(EXIT_INTERNAL, &e),
    }
}

/// Follows the writer's files from `next` on: reads only new bytes of the current file, moves to the next
/// file when one appears, prints complete lines. Returns when stdout closes.
fn follow_from(dir: &Path, next: u64, out: &mut impl Write) -> Result<(), crate::audit::AuditError> {
    use std::io::{Read, Seek, SeekFrom};
    let mut current: Option<(PathBuf, u64)> = None;
    let mut partial = Vec::new();
    loop {
        let listed = files::list_writer_files(dir)?;
        if current.is_none() {
            // Start in the file holding `next`, skipping the lines already printed.
            let Some((_, path)) = listed.iter().rev().find(|(first, _)| *first <= next).or(listed.first())
            else {
                std::thread::sleep(std::time::Duration::from_millis(250));
                continue;
            };
            let mut offset = 0;
            let text =
                std::fs::read(path).map_err(|source| crate::audit::AuditError::io("read", path, source))?;
            for line in text.split_inclusive(|b| *b == b'\n') {
                if line.last() != Some(&b'\n')
                    || crate::audit::format::peek_seq(line).is_some_and(|s| s >= next)
                {
                    break;
                }
                offset += line.len() as u64;
            }
            current = Some((path.clone(), offset));
        }
        let Some((path, offset)) = current.as_mut() else { continue };
        let mut file = std::fs::File::open(&*path)
            .map_err(|source| crate::audit::AuditError::io("open", path, source))?;
        file.seek(SeekFrom::Start(*offset))
            .map_err(|source| crate::audit::AuditError::io("seek", path, source))?;
        let mut fresh = Vec::new();
        file.read_to_end(&mut fresh).map_err(|source| crate::audit::AuditError::io("read", path, source))?;
        *offset += fresh.len() as u64;
        partial.extend_from_slice(&fresh);
        if let Some(end) = partial.iter().rposition(|b| *b == b'\n') {
            let complete: Vec<u8> = partial.drain(..=end).collect();
            if out.write_all(&complete).and_then(|()| out.flush()).is_err() {
                return Ok(());
            }
        }
        let newer = listed.iter().find(|(_, p)| p > path).map(|(_, p)| p.clone());
        match newer {
            // The writer moved on: this file is complete once read to its end.
            Some(next_path) if fresh.is_empty() && partial.is_empty() => current = Some((next_path, 0)),
            _ => std::thread::sleep(std::time::Duration::from_millis(250)),
        }
    }
}

fn pubkey_cli(config: &Path) -> u8 {
    let config = match Config::load(config) {
        Ok(c) => c,
        Err(e) => return fail(EXIT_INVALID, &e),
    };
    match sign::load(&config.agent.state_dir) {
        Ok(key) => {
            println!("{}", sign::pubkey_hex(&key.verifying_key()));
            0
        }
        Err(e) => fail(EXIT_FAILED, &format!("{e}; the key is created when the daemon first starts")),
    }
}

/// `warden audit replay`: exit 0 played; 1 no recording, or an altered one; 64 a bad `--speed`.
fn replay_cli(audit_dir: &Path, session: &str, speed: f64) -> u8 {
    if !speed.is_finite() || speed < 0.0 {
        return fail(EXIT_INVALID, &"--speed must be 0 (at once) or a positive factor");
    }
    let mut out = std::io::stdout().lock();
    match crate::protocol::ssh::record::replay(audit_dir, session, speed, &mut out) {
        Ok(()) => 0,
        Err(e) => fail(EXIT_FAILED, &e),
    }
}
