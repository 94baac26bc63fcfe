//! Idle upstream connections kept for the next session with the same key (target, upstream address,
//! login, database, access, and the client parameters passed upstream). A connection is offered only after
//! a clean session end, and lent out only after a successful reset (`DISCARD ALL`, and under `read` the
//! read-only default re-asserted, both in one round trip); at most [`Pool::max_idle`] per target. Each
//! pooled connection waits in its own task, which first resets it (off the ending session's path), then
//! closes it after the idle timeout or as soon as the upstream says anything (a backend terminated by an
//! administrator). A checkout prefers a connection already reset; one still resetting is waited for
//! (a round trip) rather than a new login (TCP, TLS and SCRAM) opened, which keeps a client that
//! reconnects at once (`pgbench -C`) on one upstream connection.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use postgres_protocol::message::frontend;

use tokio::io::AsyncReadExt as _;
use tokio::sync::oneshot;

use super::upstream::{Upstream, close};
use super::wire;
use crate::policy::Access;

/// What makes two upstream connections interchangeable.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key {
    pub target: String,
    pub dst: SocketAddr,
    pub user: String,
    pub password_file: Option<PathBuf>,
    pub database: String,
    pub access: Access,
    pub client_params: Vec<(String, String)>,
}

/// A pooled connection's task, as the pool sees it: where to ask for the connection, and whether it was
/// reset already.
#[derive(Debug)]
struct Parked {
    ask: oneshot::Sender<oneshot::Sender<Upstream>>,
    ready: Arc<AtomicBool>,
}

#[derive(Debug)]
pub struct Pool {
    idle: Mutex<HashMap<Key, Vec<Parked>>>,
    max_idle: usize,
    idle_timeout: Duration,
}

impl Pool {
    pub fn new(max_idle: usize, idle_timeout: Duration) -> Self {
        Self { idle: Mutex::new(HashMap::new()), max_idle, idle_timeout }
    }

    pub fn max_idle(&self) -> usize {
        self.max_idle
    }

    /// A reset connection for `key`: the newest one already reset, else the newest one still resetting
    /// (waiting for its reset); `None` if none is pooled or every reset failed.
    pub async fn take(&self, key: &Key) -> Option<Upstream> {
        loop {
            let parked = {
                let mut idle = self.idle.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                let list = idle.get_mut(key)?;
                let at = list.iter().rposition(|p| p.ready.load(Ordering::Acquire)).unwrap_or(list.len() - 1);
                let p = list.remove(at);
                if list.is_empty() {
                    idle.remove(key);
                }
                p
            };
            let (tx, rx) = oneshot::channel();
            if parked.ask.send(tx).is_ok()
                && let Ok(up) = rx.await
            {
                return Some(up);
            }
        }
    }

    /// Offers `up` (idle after a clean session end, not yet reset) to the next session with `key`, unless
    /// the target has enough pooled: its task resets it, and closes it if the reset fails.
    pub fn put(&self, key: Key, up: Upstream) {
        let mut idle = self.idle.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for list in idle.values_mut() {
            list.retain(|p| !p.ask.is_closed());
        }
        idle.retain(|_, l| !l.is_empty());
        let same_target: usize =
            idle.iter().filter(|(k, _)| k.target == key.target).map(|(_, l)| l.len()).sum();
        if same_target >= self.max_idle {
            drop(idle);
            tokio::spawn(close(up));
            return;
        }
        let (tx, rx) = oneshot::channel();
        let ready = Arc::new(AtomicBool::new(false));
        let access = key.access;
        idle.entry(key).or_default().push(Parked { ask: tx, ready: ready.clone() });
        tokio::spawn(park(up, access, ready, rx, self.idle_timeout));
    }

    /// Pooled connections now, reset or resetting (for tests and status).
    pub fn idle_count(&self) -> usize {
        let idle = self.idle.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        idle.values().flatten().filter(|p| !p.ask.is_closed()).count()
    }
}

/// How long a reset may take (a checkout waiting for it waits at most this long, then logs in anew).
const RESET_DEADLINE: Duration = Duration::from_secs(5);

/// The reset every pooled connection gets, and what `read` connections get after it.
const RESET: &str = "DISCARD ALL";
const READ_ONLY: &str = "SET SESSION default_transaction_read_only = on";

/// Resets an idle connection for the next session: `DISCARD ALL` (prepared statements, portals, temporary
/// tables, settings, advisory locks, listeners), then under `read` the read-only default re-asserted (the
/// login already set it as a startup parameter, which `RESET ALL` falls back to). Both queries go in one
/// write and are answered in one round trip; any error fails the reset.
pub async fn reset(up: &mut Upstream, access: Access) -> Result<(), String> {
    let mut queries = vec![RESET];
    if access == Access::Read {
        queries.push(READ_ONLY);
    }
    for q in &queries {
        up.conn.send_raw(&wire::encoded(|b| frontend::query(q, b)));
    }
    up.conn.flush().await.map_err(|e| format!("upstream: {e}"))?;
    let mut pending = queries.len();
    let mut error = None;
    while pending > 0 {
        let f = up.conn.next().await.map_err(|e| format!("upstream: {e}"))?.ok_or("upstream closed")?;
        match f.tag {
            b'E' if error.is_none() => {
                let e = wire::parse_error(&f.body);
                error = Some(format!("{}: {}", e.code, e.message));
            }
            b'S' => {
                up.note_parameter_status(&f.body);
            }
            b'Z' => {
                pending -= 1;
                if f.body.first() != Some(&b'I') && error.is_none() {
                    error = Some("the reset left a transaction open".into());
                }
            }
            _ => {}
        }
    }
    error.map_or(Ok(()), Err)
}

async fn park(
    mut up: Upstream,
    access: Access,
    ready: Arc<AtomicBool>,
    rx: oneshot::Receiver<oneshot::Sender<Upstream>>,
    timeout: Duration,
) {
    let outcome = tokio::time::timeout(RESET_DEADLINE, reset(&mut up, access)).await;
    if let Err(e) = outcome.unwrap_or_else(|_| Err("no answer in time".into())) {
        tracing::debug!(error = %e, "a pooled upstream connection failed its reset; closed");
        return close(up).await;
    }
    ready.store(true, Ordering::Release);
    let taken = {
        let mut byte = [0u8; 1];
        let spoke = up.conn.io.read(&mut byte);
        tokio::select! {
            r = rx => r.ok(),
            () = tokio::time::sleep(timeout) => None,
            _ = spoke => None,
        }
    };
    match taken {
        Some(reply) => {
            if let Err(up) = reply.send(up) {
                close(up).await;
            }
        }
        None => close(up).await,
    }
}
