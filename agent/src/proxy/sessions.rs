//! The live sessions, for `warden sessions` and `warden sessions kill`: each with its byte counters and
//! the [`Cut`] that ends it with a cause.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use serde::Serialize;

use crate::protocol::{Counters, Cut, End};

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
    /// Ends the session with a cause (the first cause given wins).
    pub cut: Cut,
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

    /// An operator ends a session (`killed_by_operator`); false if there is no such live session.
    pub fn kill(&self, id: &str) -> bool {
        let live = self.live.lock().expect("sessions lock");
        live.get(id).map(|s| s.cut.cut(End::KilledByOperator)).is_some()
    }

    /// Ends every session matching `pred` with `end` (unless it was already cut for another cause);
    /// returns how many matched.
    pub fn kill_where(&self, pred: impl Fn(&SessionInfo) -> bool, end: &End) -> usize {
        let live = self.live.lock().expect("sessions lock");
        let mut n = 0;
        for s in live.values().filter(|s| pred(s)) {
            s.cut.cut(end.clone());
            n += 1;
        }
        n
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
                started: crate::timestamp::format_system(s.started),
                bytes_up: s.counters.up.load(Ordering::Relaxed),
                bytes_down: s.counters.down.load(Ordering::Relaxed),
                cgroup: s.cgroup.clone(),
            })
            .collect();
        v.sort_by(|a, b| a.started.cmp(&b.started));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(id: &str, target: &str) -> SessionInfo {
        SessionInfo {
            session: id.into(),
            pid: 1,
            uid: 0,
            cgroup: "/a".into(),
            identity: None,
            target: target.into(),
            dst: "127.0.0.1:1".parse().unwrap(),
            grant: None,
            started: SystemTime::now(),
            counters: Arc::default(),
            cut: Cut::new(),
        }
    }

    #[tokio::test]
    async fn a_policy_change_then_a_kill_records_the_policy_change() {
        let sessions = Sessions::default();
        let a = info("s1", "gone");
        let b = info("s2", "kept");
        let (cut_a, cut_b) = (a.cut.clone(), b.cut.clone());
        sessions.insert(a);
        sessions.insert(b);
        let end = End::PolicyChanged { reason: "target `gone` was removed".into() };
        assert_eq!(sessions.kill_where(|s| s.target == "gone", &end), 1);
        assert!(sessions.kill("s1"), "the session is still live until its task ends");
        assert_eq!(cut_a.cut_with().await, end);
        assert!(cut_b.cause().is_none());
        assert!(sessions.kill("s2"));
        assert_eq!(cut_b.cut_with().await, End::KilledByOperator);
        assert!(!sessions.kill("nope"));
    }
}
