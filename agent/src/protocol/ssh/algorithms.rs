//! The algorithms Warden's two SSH legs offer: an allow-list of strong ones (russh's safe key exchanges,
//! host key types and SHA-2 MACs; AEAD ciphers first, CTR with an SHA-2 MAC last), with AES-GCM first
//! where the CPU has AES and carry-less multiply instructions, where it costs a fraction of
//! chacha20-poly1305's CPU per byte (ring picks its hardware code at run time).
//!
//! The SSH client's order decides (RFC 4253, 7.1): Warden decides on the upstream leg, where it is the
//! client. On the agent leg OpenSSH's `ssh` lists chacha20-poly1305 first and AES-CTR before AES-GCM, so a
//! server can steer it only by offering AES-GCM alone. Warden does that, with the instructions present,
//! for a client whose version line names OpenSSH 6.2 or later (every one of them has AES-GCM; OpenSSH
//! itself keys such compatibility choices on the peer's version line); any other client is offered the
//! whole allow-list, chacha20-poly1305 and CTR included.

use std::borrow::Cow;

use russh::{Preferred, cipher};

/// Ciphers with AES in hardware: AES-GCM first.
const WITH_AES: &[cipher::Name] = &[
    cipher::AES_128_GCM,
    cipher::AES_256_GCM,
    cipher::CHACHA20_POLY1305,
    cipher::AES_256_CTR,
    cipher::AES_192_CTR,
    cipher::AES_128_CTR,
];

/// The agent-side server's ciphers for an OpenSSH client with AES in hardware: AES-GCM alone, as
/// OpenSSH's client would pick chacha20-poly1305 or AES-CTR first out of anything more.
const GCM_ONLY: &[cipher::Name] = &[cipher::AES_128_GCM, cipher::AES_256_GCM];

/// Ciphers without AES in hardware: chacha20-poly1305 first (constant-time and fast in software).
const WITHOUT_AES: &[cipher::Name] = &[
    cipher::CHACHA20_POLY1305,
    cipher::AES_256_GCM,
    cipher::AES_128_GCM,
    cipher::AES_256_CTR,
    cipher::AES_192_CTR,
    cipher::AES_128_CTR,
];

/// Whether this CPU runs AES-GCM in hardware (AES rounds and carry-less multiplication for GHASH).
pub fn aes_in_hardware() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("aes") && std::arch::is_x86_feature_detected!("pclmulqdq")
    }
    #[cfg(target_arch = "aarch64")]
    {
        std::arch::is_aarch64_feature_detected!("aes") && std::arch::is_aarch64_feature_detected!("pmull")
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        false
    }
}

/// Which side of Warden a connection is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leg {
    /// Warden's server, toward the agent (the agent's client chooses); `openssh`: its version line
    /// names OpenSSH 6.2 or later.
    Agent { openssh: bool },
    /// Warden's client, toward the target's server (Warden chooses).
    Upstream,
}

/// The ciphers a leg offers, most preferred first.
pub fn ciphers(leg: Leg, aes: bool) -> &'static [cipher::Name] {
    match (leg, aes) {
        (Leg::Agent { openssh: true }, true) => GCM_ONLY,
        (_, true) => WITH_AES,
        (_, false) => WITHOUT_AES,
    }
}

/// The algorithms a leg offers: russh's defaults (key exchanges, host keys, SHA-2 MACs; no compression,
/// as Warden builds russh without zlib) with the ciphers above.
pub fn preferred(leg: Leg) -> Preferred {
    Preferred { cipher: Cow::Borrowed(ciphers(leg, aes_in_hardware())), ..Preferred::default() }
}

/// Whether an SSH version line (`SSH-2.0-OpenSSH_9.2p1 Debian-2`) names OpenSSH 6.2 or later, the first
/// with AES-GCM.
pub fn openssh_with_gcm(version: &[u8]) -> bool {
    let Some(rest) = version.strip_prefix(b"SSH-2.0-OpenSSH_") else { return false };
    let digits = |s: &[u8]| -> Option<u32> {
        let end = s.iter().position(|b| !b.is_ascii_digit()).unwrap_or(s.len());
        std::str::from_utf8(&s[..end]).ok()?.parse().ok()
    };
    let Some(major) = digits(rest) else { return false };
    let minor = rest.iter().position(|&b| b == b'.').and_then(|i| digits(&rest[i + 1..])).unwrap_or(0);
    major > 6 || major == 6 && minor >= 2
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_list_is_aead_first_and_has_no_weak_cipher() {
        let weak =
            [cipher::NONE, cipher::CLEAR, cipher::AES_128_CBC, cipher::AES_192_CBC, cipher::AES_256_CBC];
        for leg in [Leg::Agent { openssh: true }, Leg::Agent { openssh: false }, Leg::Upstream] {
            for aes in [true, false] {
                let list = ciphers(leg, aes);
                assert!(list.iter().all(|c| !weak.contains(c)), "{leg:?} {aes}: {list:?}");
                assert!(
                    list[..2].iter().all(|c| c.as_ref().contains("gcm") || c.as_ref().contains("poly1305"))
                );
                assert!(list.contains(&cipher::AES_128_GCM), "{leg:?} {aes}: {list:?}");
            }
        }
    }

    #[test]
    fn aes_gcm_leads_with_aes_in_hardware_and_chacha_without() {
        let openssh = Leg::Agent { openssh: true };
        let other = Leg::Agent { openssh: false };
        assert_eq!(ciphers(Leg::Upstream, true)[0], cipher::AES_128_GCM);
        assert_eq!(ciphers(openssh, true), GCM_ONLY);
        assert_eq!(ciphers(other, true)[0], cipher::AES_128_GCM);
        for leg in [other, Leg::Upstream] {
            assert!(ciphers(leg, true).contains(&cipher::CHACHA20_POLY1305));
            assert!(ciphers(leg, true).contains(&cipher::AES_128_CTR));
        }
        for leg in [openssh, other, Leg::Upstream] {
            assert_eq!(ciphers(leg, false)[0], cipher::CHACHA20_POLY1305);
        }
    }

    #[test]
    fn openssh_from_6_2_is_known_to_have_aes_gcm() {
        assert!(openssh_with_gcm(b"SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u10"));
        assert!(openssh_with_gcm(b"SSH-2.0-OpenSSH_6.2"));
        assert!(openssh_with_gcm(b"SSH-2.0-OpenSSH_10.0"));
        assert!(!openssh_with_gcm(b"SSH-2.0-OpenSSH_6.1p1"));
        assert!(!openssh_with_gcm(b"SSH-2.0-OpenSSH_5.9"));
        assert!(!openssh_with_gcm(b"SSH-2.0-paramiko_3.4.0"));
        assert!(!openssh_with_gcm(b"SSH-2.0-OpenSSH_"));
        assert!(!openssh_with_gcm(b"SSH-1.99-OpenSSH_9.2"));
    }
}
