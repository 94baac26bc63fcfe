//! Idle upstream connections kept for the next session with the same key (target, upstream address,
//! login, database, access, and the client parameters passed upstream). A connection is pooled only after a
//! clean session end and a successful reset (`DISCARD ALL`, read-only re-asserted under `read`); at most
//! [`Pool::max_idle`] per target; each idle connection waits in its own task, which closes it after the
//! idle timeout or as soon as the upstream says anything (a backend terminated by an administrator).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::oneshot;

use super::upstream::Upstream;
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

type Parked = oneshot::Sender<oneshot::Sender<Upstream>>;

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

    /// An idle connection for `key`, newest first.
    pub async fn take(&self, key: &Key) -> Option<Upstream> {
        loop {
            let parked = {
                let mut idle = self.idle.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                let list = idle.get_mut(key)?;
                let p = list.pop();
                if list.is_empty() {
                    idle.remove(key);
                }
                p?
            };
            let (tx, rx) = oneshot::channel();
            if parked.send(tx).is_ok()
                && let Ok(up) = rx.await
            {
                return Some(up);
            }
        }
    }

    /// Keeps `up` (already reset) for the next session with `key`, unless the target has enough idle.
    pub fn put(&self, key: Key, up: Upstream) {
        let mut idle = self.idle.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for list in idle.values_mut() {
            list.retain(|p| !p.is_closed());
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
        idle.entry(key).or_default().push(tx);
        tokio::spawn(park(up, rx, self.idle_timeout));
    }

    /// Idle connections kept now (for tests and status).
    pub fn idle_count(&self) -> usize {
        let idle = self.idle.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        idle.values().flatten().filter(|p| !p.is_closed()).count()
    }
}

async fn park(mut up: Upstream, rx: oneshot::Receiver<oneshot::Sender<Upstream>>, timeout: Duration) {
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

/// Ends an upstream connection politely (`Terminate`).
pub async fn close(mut up: Upstream) {
    let _ = up.conn.io.write_all(&[b'X', 0, 0, 0, 4]).await;
    let _ = up.conn.io.shutdown().await;
}
