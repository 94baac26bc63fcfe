//! Target resolution: the numbers the kernel knows policy targets by, resolving their host names into the
//! kernel's target map (and again every `RESOLVE_EVERY`), and the guard entries for targets on this host.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::State;
use crate::policy::Policy;

/// How often target host names are re-resolved.
const RESOLVE_EVERY: Duration = Duration::from_secs(30);

/// Policy targets by the number the kernel knows them by.
#[derive(Debug, Default)]
pub struct Targets {
    inner: Mutex<TargetIds>,
}

#[derive(Debug, Default)]
struct TargetIds {
    by_name: HashMap<String, u32>,
    by_id: HashMap<u32, String>,
    next: u32,
}

impl Targets {
    pub(super) fn id(&self, name: &str) -> u32 {
        let mut t = self.inner.lock().expect("targets lock");
        if let Some(id) = t.by_name.get(name) {
            return *id;
        }
        t.next += 1;
        let id = t.next;
        t.by_name.insert(name.to_owned(), id);
        t.by_id.insert(id, name.to_owned());
        id
    }

    pub fn name(&self, id: u32) -> Option<String> {
        self.inner.lock().expect("targets lock").by_id.get(&id).cloned()
    }
}

pub(super) async fn resolve_periodically(state: Arc<State>) {
    loop {
        tokio::select! {
            () = state.shutdown.cancelled() => return,
            () = tokio::time::sleep(RESOLVE_EVERY) => {}
        }
        let policy = state.policy.current();
        state.sync_targets(&policy).await;
    }
}

impl State {
    /// Resolves every target and makes the kernel's target map exactly those endpoints.
    pub(super) async fn sync_targets(&self, policy: &Policy) {
        let mut entries: Vec<(SocketAddr, u32)> = Vec::new();
        for t in policy.targets() {
            let id = self.targets.id(&t.name);
            match tokio::net::lookup_host((t.host.as_str(), t.port)).await {
                Ok(addrs) => entries.extend(addrs.map(|a| (a, id))),
                Err(e) => {
                    tracing::warn!(target = %t.name, host = %t.host, error = %e, "cannot resolve target; it is unreachable until it resolves");
                }
            }
        }
        let entries = with_guards(entries, &host_addresses());
        if let Err(e) = self.kernel.sync_targets(&entries) {
            tracing::error!(error = %e, "updating the kernel target map failed");
        }
    }
}

/// This host's interface addresses (IPv4-mapped addresses as IPv4).
fn host_addresses() -> Vec<std::net::IpAddr> {
    let Ok(ifaddrs) = nix::ifaddrs::getifaddrs() else { return Vec::new() };
    let mut out: Vec<std::net::IpAddr> = ifaddrs
        .filter_map(|i| {
            let a = i.address?;
            a.as_sockaddr_in()
                .map(|v4| std::net::IpAddr::V4(v4.ip()))
                .or_else(|| a.as_sockaddr_in6().map(|v6| std::net::IpAddr::V6(v6.ip()).to_canonical()))
        })
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// Targets plus guard entries for those that live on this host: a connect to any other address of this
/// host on that port would reach the same listener (when it is bound to a wildcard, or to the address a
/// connecting socket is bound to), so the kernel refuses those instead of letting the allow list pass them.
/// Real targets come last, so a guard never shadows a target.
fn with_guards(targets: Vec<(SocketAddr, u32)>, host: &[std::net::IpAddr]) -> Vec<(SocketAddr, u32)> {
    let mut out = Vec::new();
    for (addr, _) in &targets {
        let ip = addr.ip().to_canonical();
        if let std::net::IpAddr::V4(v4) = ip {
            // IPv6 spellings that a translator on the path (NAT64's well-known prefix, SIIT) or an old
            // stack (IPv4-compatible) turns back into this IPv4 address.
            let tail = v4.octets();
            let mut nat64 = [0u8; 16];
            nat64[..4].copy_from_slice(&[0, 0x64, 0xff, 0x9b]);
            nat64[12..].copy_from_slice(&tail);
            let mut siit = [0u8; 16];
            siit[8..10].copy_from_slice(&[0xff, 0xff]);
            siit[12..].copy_from_slice(&tail);
            let mut compat = [0u8; 16];
            compat[12..].copy_from_slice(&tail);
            for form in [nat64, siit, compat] {
                let v6 = std::net::Ipv6Addr::from(form);
                out.push((SocketAddr::new(v6.into(), addr.port()), warden_common::GUARD));
            }
        }
        if ip.is_loopback() || ip.is_unspecified() || host.contains(&ip) {
            let all_ones = std::net::Ipv6Addr::from([0xff; 16]);
            out.push((SocketAddr::new(all_ones.into(), addr.port()), warden_common::GUARD));
            out.extend(host.iter().map(|h| (SocketAddr::new(*h, addr.port()), warden_common::GUARD)));
        }
    }
    out.extend(targets);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bpf;

    #[test]
    fn targets_on_this_host_get_guards_and_win_over_them() {
        let host: Vec<std::net::IpAddr> = vec!["127.0.0.1".parse().unwrap(), "10.1.2.3".parse().unwrap()];
        let local: SocketAddr = "127.0.0.5:5432".parse().unwrap();
        let own: SocketAddr = "10.1.2.3:22".parse().unwrap();
        let remote: SocketAddr = "192.0.2.9:443".parse().unwrap();
        let out = with_guards(vec![(local, 1), (own, 2), (remote, 3)], &host);
        let kernel: HashMap<_, _> = out.iter().map(|(a, id)| (bpf::endpoint(*a), *id)).collect();
        // The targets themselves, last, so they override any guard on the same endpoint.
        assert_eq!(kernel[&bpf::endpoint(local)], 1);
        assert_eq!(kernel[&bpf::endpoint(own)], 2);
        assert_eq!(kernel[&bpf::endpoint(remote)], 3);
        // Guards: the port mark, and every host address on each local target's port.
        assert_eq!(kernel[&warden_common::Endpoint::local_port_guard(5432)], warden_common::GUARD);
        assert_eq!(kernel[&warden_common::Endpoint::local_port_guard(22)], warden_common::GUARD);
        assert_eq!(kernel[&bpf::endpoint("10.1.2.3:5432".parse().unwrap())], warden_common::GUARD);
        assert_eq!(kernel[&bpf::endpoint("127.0.0.1:22".parse().unwrap())], warden_common::GUARD);
        // A target elsewhere gets none.
        assert!(!kernel.contains_key(&warden_common::Endpoint::local_port_guard(443)));
        // IPv6 spellings of IPv4 targets: NAT64, SIIT, IPv4-compatible.
        for s in ["[64:ff9b::192.0.2.9]:443", "[::ffff:0:192.0.2.9]:443", "[::192.0.2.9]:443"] {
            assert_eq!(kernel[&bpf::endpoint(s.parse().unwrap())], warden_common::GUARD, "{s}");
        }
        // 3 targets; 2 marks; 127.0.0.1 and 10.1.2.3 on 5432, 127.0.0.1 on 22 (10.1.2.3:22 is the target);
        // 3 IPv6 spellings of each of the 3 IPv4 targets.
        assert_eq!(kernel.len(), 3 + 2 + 3 + 9);
    }

    #[test]
    fn this_host_spellings() {
        for s in ["0.0.0.0:1", "127.0.0.1:1", "127.9.9.9:1", "[::]:1", "[::1]:1", "[::ffff:127.0.0.2]:1"] {
            assert!(bpf::endpoint(s.parse().unwrap()).is_this_host(), "{s}");
        }
        for s in ["10.0.0.1:1", "[::2]:1", "[::127.0.0.1]:1", "[2001:db8::1]:1", "128.0.0.1:1"] {
            assert!(!bpf::endpoint(s.parse().unwrap()).is_this_host(), "{s}");
        }
    }
}
