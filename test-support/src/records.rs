//! Reads an audit directory's records the way an auditor's script would: every `*.jsonl` file in name
//! order, one JSON object per line. Lines that do not parse (a torn tail) are left out.

use std::path::{Path, PathBuf};

use serde_json::Value;

/// Every record in `dir`, in order; empty when the directory does not exist yet.
pub fn audit_records(dir: &Path) -> Vec<Value> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
        .iter()
        .flat_map(|f| {
            std::fs::read_to_string(f).unwrap_or_default().lines().map(str::to_owned).collect::<Vec<_>>()
        })
        .filter_map(|l| serde_json::from_str::<Value>(&l).ok())
        .filter(|r| r.get("event").is_some())
        .collect()
}

/// The records of one event.
pub fn events<'a>(records: &'a [Value], event: &str) -> Vec<&'a Value> {
    records.iter().filter(|r| r["event"] == event).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_files_in_order_and_skips_torn_lines() {
        let dir = std::env::temp_dir().join(format!("warden-test-support-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("00000000000000000002.jsonl"), "{\"event\":\"b\",\"seq\":2}\n{\"ev").unwrap();
        std::fs::write(dir.join("00000000000000000000.jsonl"), "{\"event\":\"a\",\"seq\":0}\n").unwrap();
        std::fs::write(dir.join("checkpoints.json"), "{\"event\":\"not a segment\"}\n").unwrap();
        let r = audit_records(&dir);
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(r.iter().map(|r| r["seq"].as_u64().unwrap()).collect::<Vec<_>>(), [0, 2]);
        assert_eq!(events(&r, "b").len(), 1);
        assert!(audit_records(Path::new("/nonexistent/warden")).is_empty());
    }
}
