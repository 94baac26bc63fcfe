//! The live sessions, for `warden sessions` and `warden sessions kill`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::protocol::tcp::Counters;

/// One live session.
#[derive(Debug, Clone)]
pub struct SessionInfo {
    pub session: String,
    pub pid: u32,
    pub uid: u32,
    pub cgroup: String,
    pub identity: Option<String>,
    pub target: String,
    pub dst: SocketAddr,
    pub grant: Option<String>,
    pub started: SystemTime,
    pub counters: Arc<Counters>,
    pub kill: CancellationToken,
}

/// What the control socket shows of a session.
#[derive(Debug, Clone, Serialize)]
pub struct SessionView {
    pub session: String,
    pub pid: u32,
    pub uid: u32,
    pub identity: Option<String>,
    pub target: String,
    pub dst: String,
    pub grant: Option<String>,
    pub started: String,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub cgroup: String,
}

/// The registry. The lock is held only to insert, remove or copy out; never across an await.
#[derive(Debug, Default)]
pub struct Sessions {
    live: Mutex<HashMap<String, SessionInfo>>,
}

impl Sessions {
    pub fn insert(&self, info: SessionInfo) {
        self.live.lock().expect("sessions lock").insert(info.session.clone(), info);
    }

    pub fn remove(&self, id: &str) {
        self.live.lock().expect("sessions lock").remove(id);
    }

    pub fn len(&self) -> usize {
        self.live.lock().expect("sessions lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Ends a session; false if there is no such live session.
    pub fn kill(&self, id: &str) -> bool {
        let live = self.live.lock().expect("sessions lock");
        live.get(id).map(|s| s.kill.cancel()).is_some()
    }

    /// Ends every session matching `pred`; returns how many.
    pub fn kill_where(&self, pred: impl Fn(&SessionInfo) -> bool) -> usize {
        let live = self.live.lock().expect("sessions lock");
        live.values().filter(|s| pred(s)).map(|s| s.kill.cancel()).count()
    }

    pub fn views(&self) -> Vec<SessionView> {
        let live = self.live.lock().expect("sessions lock");
        let mut v: Vec<SessionView> = live
            .values()
            .map(|s| SessionView {
                session: s.session.clone(),
                pid: s.pid,
                uid: s.uid,
                identity: s.identity.clone(),
                target: s.target.clone(),
                dst: s.dst.to_string(),
                grant: s.grant.clone(),
                started: crate::daemon::rfc3339(s.started),
                bytes_up: s.counters.up.load(Ordering::Relaxed),
                bytes_down: s.counters.down.load(Ordering::Relaxed),
                cgroup: s.cgroup.clone(),
            })
            .collect();
        v.sort_by(|a, b| a.started.cmp(&b.started));
        v
    }
}
