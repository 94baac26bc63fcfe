//! STUB: replaced by the pgsql branch
//!
//! Statement classification for PostgreSQL sessions. This stub lets only a plain single `SELECT` through
//! under `access: read`, anything under `access: write`, and refuses a statement naming a masked column
//! inside a function call; the real module parses with `pg_query`.

use crate::policy;

/// Classifies statements; caches by statement text (in the real module).
#[derive(Debug)]
pub struct Classifier {
    _capacity: usize,
}

/// A statement string that may be forwarded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    pub statements: usize,
    pub tags: Vec<String>,
    pub masks_applied: Vec<String>,
}

/// Why a statement string may not be forwarded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// `25006` a write under read, `42501` a masked column used in a way that would leak it, `42601`
    /// unparsable.
    pub sqlstate: &'static str,
    pub message: String,
}

impl Classifier {
    pub fn new(capacity: usize) -> Self {
        Self { _capacity: capacity }
    }

    pub fn check(&self, sql: &str, access: policy::Access, mask: &[String]) -> Result<Checked, Refused> {
        let text = sql.trim().trim_end_matches(';').trim();
        if text.is_empty() {
            return Ok(Checked { statements: 0, tags: Vec::new(), masks_applied: Vec::new() });
        }
        let lower = text.to_ascii_lowercase();
        let masks_applied: Vec<String> = mask
            .iter()
            .filter(|m| {
                let col = m.rsplit('.').next().unwrap_or(m).to_ascii_lowercase();
                lower.contains(&col)
            })
            .cloned()
            .collect();
        for m in &masks_applied {
            let col = m.rsplit('.').next().unwrap_or(m).to_ascii_lowercase();
            if lower.contains(&format!("({col}")) || lower.contains(&format!("{col}::")) {
                return Err(Refused {
                    sqlstate: "42501",
                    message: format!("the masked column `{m}` may not feed an expression"),
                });
            }
        }
        let statements = text.split(';').filter(|s| !s.trim().is_empty()).count();
        let first = lower.split_whitespace().next().unwrap_or("").to_ascii_uppercase();
        if access == policy::Access::Read {
            let plain = statements == 1
                && first == "SELECT"
                && !["into", "for update", "for share", "nextval", "setval", "set_config", "lo_", "dblink"]
                    .iter()
                    .any(|w| lower.contains(w));
            if !plain {
                return Err(Refused {
                    sqlstate: "25006",
                    message: "only a plain SELECT can be proven read-only".into(),
                });
            }
        }
        Ok(Checked { statements, tags: vec![first], masks_applied })
    }
}
