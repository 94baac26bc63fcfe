//! The audit record: one writer task owns the hash-chained JSON-lines files; everyone else hands it
//! records through a bounded queue. (Stub: the full writer lands with issue 5.)

pub mod cli;

use serde::Serialize;
use serde_json::{Map, Value};

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit queue is full; refusing new work until the writer catches up")]
    QueueFull,
    #[error("audit writer has stopped: {reason}")]
    Stopped { reason: String },
}

/// One record before the writer gives it `seq`, `ts`, `host`, `prev` and `hash`.
#[derive(Debug, Clone)]
pub struct Record {
    pub event: String,
    pub fields: Map<String, Value>,
}

impl Record {
    pub fn new(event: &str) -> Self {
        Self { event: event.to_owned(), fields: Map::new() }
    }

    #[must_use]
    pub fn field(mut self, key: &str, value: impl Serialize) -> Self {
        self.fields.insert(key.to_owned(), serde_json::to_value(value).unwrap_or(Value::Null));
        self
    }
}

/// A handle to the writer; cheap to clone.
#[derive(Debug, Clone)]
pub struct Audit {}

impl Audit {
    /// Appends a record and waits until it is durable (fsync'd). Returns its `seq`.
    pub async fn append_durable(&self, record: Record) -> Result<u64, AuditError> {
        let _ = record;
        Ok(0)
    }

    /// Queues a record without waiting for the disk; fails at once when the queue is full.
    pub fn append(&self, record: Record) -> Result<(), AuditError> {
        let _ = record;
        Ok(())
    }
}
