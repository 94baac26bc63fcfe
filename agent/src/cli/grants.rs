//! `warden grants`, `warden grant issue|approve|revoke` and `warden sessions [kill]`, through the daemon,
//! with their tables.

use std::fmt::Write as _;
use std::path::Path;

use serde_json::Value;

use super::{GrantAction, SessionAction, ask_daemon};
use crate::control::Request;

pub fn list(config: &Path, json: bool) -> u8 {
    ask_daemon(config, &Request::Grants, json, grants_table)
}

pub fn grant(action: GrantAction) -> u8 {
    match action {
        GrantAction::Issue { identity, target, cgroup, access, json, config } => ask_daemon(
            &config.config,
            &Request::GrantIssue { identity, target, cgroup, access },
            json.json,
            json_record,
        ),
        GrantAction::Approve { id, config } => {
            ask_daemon(&config.config, &Request::GrantApprove { id }, false, json_record)
        }
        GrantAction::Revoke { id, config } => {
            ask_daemon(&config.config, &Request::GrantRevoke { id }, false, json_record)
        }
    }
}

pub fn sessions(action: Option<SessionAction>, json: bool, config: &Path) -> u8 {
    match action {
        Some(SessionAction::Kill { id, config }) => {
            ask_daemon(&config.config, &Request::KillSession { id }, false, |_| "killed".into())
        }
        None => ask_daemon(config, &Request::Sessions, json, sessions_table),
    }
}

fn sessions_table(data: &Value) -> String {
    let rows = data.as_array().cloned().unwrap_or_default();
    let mut out = format!(
        "{:<34} {:<8} {:<20} {:<16} {:<22} {:>10} {:>10}  {}\n",
        "SESSION", "PID", "IDENTITY", "TARGET", "DST", "UP", "DOWN", "CGROUP"
    );
    for r in &rows {
        let s = |k: &str| {
            r.get(k).map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_owned)).unwrap_or_default()
        };
        let _ = writeln!(
            out,
            "{:<34} {:<8} {:<20} {:<16} {:<22} {:>10} {:>10}  {}",
            s("session"),
            s("pid"),
            s("identity"),
            s("target"),
            s("dst"),
            s("bytes_up"),
            s("bytes_down"),
            s("cgroup")
        );
    }
    if rows.is_empty() {
        out.push_str("(no live sessions)\n");
    }
    out.trim_end().to_owned()
}

fn grants_table(data: &Value) -> String {
    match serde_json::from_value::<Vec<crate::grants::GrantView>>(data.clone()) {
        Ok(views) => crate::grants::table(&views).trim_end().to_owned(),
        Err(_) => json_table(data),
    }
}

/// A table of an array of flat JSON objects; columns are the first object's keys.
fn json_table(data: &Value) -> String {
    let rows = data.as_array().cloned().unwrap_or_default();
    let Some(Value::Object(first)) = rows.first() else { return "(none)".into() };
    let cols: Vec<String> = first.keys().cloned().collect();
    let cell = |r: &Value, c: &str| match r.get(c) {
        None | Some(Value::Null) => "-".to_owned(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_owned))
            .collect::<Vec<_>>()
            .join(","),
        Some(v) => v.to_string(),
    };
    let widths: Vec<usize> = cols
        .iter()
        .map(|c| rows.iter().map(|r| cell(r, c).len()).chain([c.len()]).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    let line = |vals: Vec<String>| {
        vals.iter()
            .zip(&widths)
            .map(|(v, w)| format!("{v:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_owned()
    };
    out.push_str(&line(cols.iter().map(|c| c.to_uppercase()).collect()));
    for r in &rows {
        out.push('\n');
        out.push_str(&line(cols.iter().map(|c| cell(r, c)).collect()));
    }
    out
}

/// One JSON object as `key: value` lines.
fn json_record(data: &Value) -> String {
    match data {
        Value::Object(m) => m
            .iter()
            .map(|(k, v)| format!("{k}: {}", v.as_str().map_or_else(|| v.to_string(), str::to_owned)))
            .collect::<Vec<_>>()
            .join("\n"),
        other => other.to_string(),
    }
}
