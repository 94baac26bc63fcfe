//! Cancel keys: each session's client gets a `BackendKeyData` Warden mints (random), never the upstream
//! backend's real key. A `CancelRequest` is forwarded to the upstream backend only when its key was issued
//! to a live session whose connection came from the same tagged cgroup; a forged key, or one issued to
//! another cgroup's session, cancels nothing. Keys are withdrawn when their session ends.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt as _;

/// Where a minted key leads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issued {
    pub session: String,
    pub tagged_cgroup: u64,
    pub upstream: SocketAddr,
    pub backend: (i32, i32),
}

/// Why a cancel request was not forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    /// No live session holds this key.
    UnknownKey,
    /// The key belongs to a session from another tagged cgroup.
    OtherCgroup,
}

impl Denied {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::UnknownKey => "unknown_key",
            Self::OtherCgroup => "other_cgroup",
        }
    }
}

#[derive(Debug, Default)]
pub struct Keys {
    issued: Mutex<HashMap<(i32, i32), Issued>>,
}

fn random_i32() -> i32 {
    let mut b = [0u8; 4];
    // getrandom fails only without an entropy source; a zero key is then still unique-checked below.
    let _ = getrandom::fill(&mut b);
    i32::from_ne_bytes(b)
}

impl Keys {
    /// Mints a fresh key (a positive process id and a random secret) leading to `issued`.
    pub fn mint(&self, issued: Issued) -> (i32, i32) {
        let mut map = self.issued.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        loop {
            let key = (random_i32() & 0x3fff_ffff | 1, random_i32());
            if let std::collections::hash_map::Entry::Vacant(e) = map.entry(key) {
                e.insert(issued);
                return key;
            }
        }
    }

    pub fn withdraw(&self, key: (i32, i32)) {
        self.issued.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&key);
    }

    /// The issued key's destination, if `tagged_cgroup` may use it.
    pub fn resolve(&self, key: (i32, i32), tagged_cgroup: u64) -> Result<Issued, Denied> {
        let map = self.issued.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let issued = map.get(&key).ok_or(Denied::UnknownKey)?;
        if issued.tagged_cgroup != tagged_cgroup {
            return Err(Denied::OtherCgroup);
        }
        Ok(issued.clone())
    }
}

/// Sends a `CancelRequest` for `backend` to `upstream` on a new connection (as libpq does).
pub async fn send(upstream: SocketAddr, backend: (i32, i32)) -> std::io::Result<()> {
    let mut tcp = tokio::net::TcpStream::connect(upstream).await?;
    let mut b = BytesMut::new();
    postgres_protocol::message::frontend::cancel_request(backend.0, backend.1, &mut b);
    tcp.write_all(&b).await?;
    tcp.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_lead_only_from_their_own_cgroup() {
        let keys = Keys::default();
        let issued = Issued {
            session: "s1".into(),
            tagged_cgroup: 7,
            upstream: "127.0.0.1:5432".parse().unwrap(),
            backend: (100, 200),
        };
        let k = keys.mint(issued.clone());
        assert!(k.0 > 0);
        assert_eq!(keys.resolve(k, 7), Ok(issued));
        assert_eq!(keys.resolve(k, 8), Err(Denied::OtherCgroup));
        assert_eq!(keys.resolve((k.0, k.1.wrapping_add(1)), 7), Err(Denied::UnknownKey));
        keys.withdraw(k);
        assert_eq!(keys.resolve(k, 7), Err(Denied::UnknownKey));
    }
}
