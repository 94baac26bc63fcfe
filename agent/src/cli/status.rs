//! `warden status`: what the daemon and the kernel programs are doing.

use std::path::Path;

use serde_json::Value;

use super::ask_daemon;
use crate::control::Request;

pub fn status(config: &Path, json: bool) -> u8 {
    ask_daemon(config, &Request::Status, json, status_text)
}

fn status_text(data: &Value) -> String {
    serde_json::to_string_pretty(data).unwrap_or_default()
}
