//! Policy: the targets Warden protects and the rules that grant identities access to them, read from
//! YAML files, and the pure decision function the proxy asks before every session.
//!
//! Default deny: an identity reaches a target only when a rule matches it and names that target.
//!
//! # Deciding
//! Rules are considered in order: files sorted by name, rules top to bottom. A rule *matches* a subject
//! when any of its `match` lists hits: one of the subject's groups is in `groups`, one of its scopes is in
//! `scopes`, or its client id is in `clients`. Among the matching rules' grant entries for the target:
//! - with no access asked for, the strongest access wins (`write` over `read`, `shell` over `exec`;
//!   `connect` is the only tcp access); on a tie the earliest entry wins;
//! - with an access asked for, the earliest entry granting exactly that access wins, else the earliest
//!   entry granting a superset of it. Postgres `write` includes `read`. SSH `shell` includes `exec`
//!   (an interactive shell can run any command), so `exec` granted through a `shell` entry carries no
//!   command allow-list. `exec` never includes `shell`.
//!
//! The terms keep the access asked for (or chosen), so a `read` session granted by a `write` rule is
//! still read-only, with that rule's masks.
//!
//! **Invariant:** `decide` does no I/O; only [`load`] touches the file system (to read the policy files
//! and to check that credential files are readable).

pub mod commands;
mod load;
mod store;
mod targets;
mod yaml;

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

pub use load::load;
pub use store::Store;

/// What a policy protects, as the daemon and the protocol handlers need it: where it is, and what kind of
/// target it is (its protocol, with only that protocol's settings).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub name: String,
    /// An IP literal or a host name, unresolved (the daemon resolves it).
    pub host: String,
    pub port: u16,
    pub kind: TargetKind,
}

impl Target {
    pub fn protocol(&self) -> Protocol {
        self.kind.protocol()
    }
}

/// The closed set of target kinds; each protocol handler reads only its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetKind {
    /// Opaque bytes: Warden records the session but cannot look inside or inject credentials.
    Tcp,
    Postgres(PostgresTarget),
    Ssh(SshTarget),
}

impl TargetKind {
    pub fn protocol(&self) -> Protocol {
        match self {
            Self::Tcp => Protocol::Tcp,
            Self::Postgres(_) => Protocol::Postgres,
            Self::Ssh(_) => Protocol::Ssh,
        }
    }
}

/// A PostgreSQL target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostgresTarget {
    /// The databases agents may open (at least one).
    pub databases: Vec<String>,
    /// Upstream TLS, as libpq's `sslmode` means it.
    pub tls: TlsMode,
    /// PEM roots for `tls: verify-full` (`ca_file`); `None`: the system's roots.
    pub ca_file: Option<PathBuf>,
    /// The login Warden injects upstream, one for every access or one per access.
    pub credentials: PgCredentials,
    /// Record bind parameters in `pg.query` (`record_parameters: true`); redacted by default.
    pub record_parameters: bool,
}

/// Upstream PostgreSQL logins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PgCredentials {
    /// `credentials: { user, password_file }` for every access.
    One(PgLogin),
    /// `credentials: { read: {...}, write: {...} }`: a read grant logs in as a read-only role.
    PerAccess { read: PgLogin, write: PgLogin },
}

impl PgCredentials {
    /// The login for a session granted `access` (`write` for anything but `read`).
    pub fn for_access(&self, access: Access) -> &PgLogin {
        match self {
            Self::One(l) => l,
            Self::PerAccess { read, .. } if access == Access::Read => read,
            Self::PerAccess { write, .. } => write,
        }
    }
}

/// One upstream PostgreSQL login; the password file is read by the handler when it connects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgLogin {
    pub user: String,
    /// `None`: the upstream asks for no password (trust or peer authentication).
    pub password_file: Option<PathBuf>,
}

/// An SSH target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshTarget {
    /// The upstream's host key line (`ssh-ed25519 AAAA...`).
    pub host_key: Option<String>,
    /// A CA key line the upstream's host certificate must be signed by. At least one of the two is set.
    pub host_ca: Option<String>,
    pub credentials: SshLogin,
}

/// The upstream SSH login Warden uses; the agent never sees the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshLogin {
    pub user: String,
    /// An OpenSSH private key; read by the handler when it connects.
    pub private_key_file: Option<PathBuf>,
    /// An OpenSSH user certificate for that key (`certificate_file`), if the upstream trusts a user CA.
    pub certificate_file: Option<PathBuf>,
    pub password_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Postgres,
    Ssh,
    Tcp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Postgres => "postgres",
            Self::Ssh => "ssh",
            Self::Tcp => "tcp",
        }
    }

    /// The accesses that apply to this protocol, weakest first.
    pub fn accesses(self) -> &'static [Access] {
        match self {
            Self::Postgres => &[Access::Read, Access::Write],
            Self::Ssh => &[Access::Exec, Access::Shell],
            Self::Tcp => &[Access::Connect],
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Upstream TLS for postgres targets, as libpq's `sslmode` means it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    Disable,
    Prefer,
    Require,
    VerifyFull,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Access {
    /// Postgres, read-only transactions.
    Read,
    /// Postgres, reads and writes; includes `Read`.
    Write,
    /// SSH, an interactive shell; includes `Exec`.
    Shell,
    /// SSH, single commands (optionally limited by `commands`).
    Exec,
    /// TCP, an opaque byte stream.
    Connect,
}

impl Access {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Write => "write",
            Self::Shell => "shell",
            Self::Exec => "exec",
            Self::Connect => "connect",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "read" => Self::Read,
            "write" => Self::Write,
            "shell" => Self::Shell,
            "exec" => Self::Exec,
            "connect" => Self::Connect,
            _ => return None,
        })
    }

    pub fn protocol(self) -> Protocol {
        match self {
            Self::Read | Self::Write => Protocol::Postgres,
            Self::Shell | Self::Exec => Protocol::Ssh,
            Self::Connect => Protocol::Tcp,
        }
    }

    /// Rank within its protocol: higher includes lower.
    fn strength(self) -> u8 {
        match self {
            Self::Read | Self::Exec | Self::Connect => 1,
            Self::Write | Self::Shell => 2,
        }
    }

    /// Whether a grant of `self` also permits `other`.
    pub fn includes(self, other: Access) -> bool {
        self.protocol() == other.protocol() && self.strength() >= other.strength()
    }
}

impl fmt::Display for Access {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Approval {
    #[default]
    None,
    Required,
}

impl Approval {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Required => "required",
        }
    }
}

/// One rule: who it matches and what it grants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub name: String,
    /// The file the rule came from, for messages.
    pub file: PathBuf,
    pub matcher: Match,
    pub grants: Vec<GrantSpec>,
}

/// A rule matches when any list hits (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Match {
    pub groups: Vec<String>,
    pub scopes: Vec<String>,
    pub clients: Vec<String>,
}

impl Match {
    pub fn matches(&self, subject: &Subject) -> bool {
        self.groups.iter().any(|g| subject.groups.contains(g))
            || self.scopes.iter().any(|s| subject.scopes.contains(s))
            || self.clients.contains(&subject.client_id)
    }
}

/// One entry of a rule's `grant` list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantSpec {
    pub target: String,
    pub access: Access,
    pub ttl: Duration,
    pub mask: Vec<String>,
    pub approval: Approval,
    /// SSH exec allow-list (globs); `None` = any command.
    pub commands: Option<Vec<String>>,
    /// SSH: port forwarding (local, remote, `-W`) and agent forwarding allowed (`forward: true`).
    pub forward: bool,
    /// SSH: the `sftp` subsystem (and scp over it) allowed (`sftp: true`).
    pub sftp: bool,
}

/// Who is asking, as read from a verified token. The policy does not depend on the identity module.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Subject {
    pub client_id: String,
    pub sub: String,
    pub groups: Vec<String>,
    pub scopes: Vec<String>,
}

impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "client {} (groups: ", self.client_id)?;
        if self.groups.is_empty() {
            f.write_str("none")?;
        } else {
            f.write_str(&self.groups.join(", "))?;
        }
        if !self.scopes.is_empty() {
            write!(f, "; scopes: {}", self.scopes.join(", "))?;
        }
        f.write_str(")")
    }
}

/// What an allowed session may do, and for how long its grant lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Terms {
    pub rule: String,
    pub target: String,
    pub access: Access,
    pub ttl: Duration,
    pub mask: Vec<String>,
    pub approval: Approval,
    pub commands: Option<Vec<String>>,
    pub forward: bool,
    pub sftp: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow(Terms),
    Deny { reason: String },
}

/// A validated policy: every target and rule from every file.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Policy {
    targets: BTreeMap<String, Target>,
    rules: Vec<Rule>,
    files: Vec<PathBuf>,
}

impl Policy {
    /// Targets in name order.
    pub fn targets(&self) -> impl Iterator<Item = &Target> {
        self.targets.values()
    }

    pub fn target(&self, name: &str) -> Option<&Target> {
        self.targets.get(name)
    }

    /// Rules in the order they are considered.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// The files this policy was read from.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    /// Decides whether `subject` may reach `target` with `access` (or the strongest access a rule grants
    /// when `access` is `None`). Pure: same inputs, same answer.
    pub fn decide(&self, subject: &Subject, target: &str, access: Option<Access>) -> Decision {
        let deny = |reason: String| Decision::Deny { reason };
        let Some(t) = self.targets.get(target) else {
            return deny(format!("no target named `{target}` in the policy"));
        };
        if let Some(a) = access
            && a.protocol() != t.protocol()
        {
            return deny(format!(
                "access `{a}` does not apply to {} target `{target}` (it takes {})",
                t.protocol(),
                names(t.protocol().accesses().iter().map(|a| a.as_str()))
            ));
        }
        let candidates: Vec<(&Rule, &GrantSpec)> = self
            .rules
            .iter()
            .filter(|r| r.matcher.matches(subject))
            .flat_map(|r| r.grants.iter().filter(|g| g.target == target).map(move |g| (r, g)))
            .collect();
        if candidates.is_empty() {
            return deny(format!("no rule grants {subject} access to {target}"));
        }
        let chosen = match access {
            None => candidates
                .iter()
                .copied()
                .reduce(|best, c| if c.1.access.strength() > best.1.access.strength() { c } else { best }),
            Some(a) => candidates
                .iter()
                .copied()
                .find(|(_, g)| g.access == a)
                .or_else(|| candidates.iter().copied().find(|(_, g)| g.access.includes(a))),
        };
        let Some((rule, spec)) = chosen else {
            let granted = candidates
                .iter()
                .map(|(r, g)| format!("rule `{}` grants {}", r.name, g.access))
                .collect::<Vec<_>>()
                .join("; ");
            let asked = access.map_or("", Access::as_str);
            return deny(format!("{granted} on {target}, not {asked}, to {subject}"));
        };
        let access = access.unwrap_or(spec.access);
        Decision::Allow(Terms {
            rule: rule.name.clone(),
            target: target.to_owned(),
            access,
            ttl: spec.ttl,
            mask: spec.mask.clone(),
            approval: spec.approval,
            // exec through a shell entry: a shell can run anything, so no allow-list applies
            commands: if spec.access == access { spec.commands.clone() } else { None },
            forward: spec.forward,
            sftp: spec.sftp,
        })
    }
}

impl Policy {
    /// What the rule named `rule` now gives for `access` on `target`, without a subject at hand: for
    /// re-checking a live grant after a reload when the caller cannot say who holds it. Denies when the
    /// target or the rule is gone or the rule no longer grants that access there. Pure.
    pub fn rule_grants(&self, rule: &str, target: &str, access: Access) -> Decision {
        let deny = |reason: String| Decision::Deny { reason };
        if !self.targets.contains_key(target) {
            return deny(format!("no target named `{target}` in the policy"));
        }
        let Some(r) = self.rules.iter().find(|r| r.name == rule) else {
            return deny(format!("rule `{rule}` is no longer in the policy"));
        };
        let specs = || r.grants.iter().filter(|g| g.target == target);
        let Some(spec) =
            specs().find(|g| g.access == access).or_else(|| specs().find(|g| g.access.includes(access)))
        else {
            return deny(format!("rule `{rule}` no longer grants {access} on {target}"));
        };
        Decision::Allow(Terms {
            rule: r.name.clone(),
            target: target.to_owned(),
            access,
            ttl: spec.ttl,
            mask: spec.mask.clone(),
            approval: spec.approval,
            commands: if spec.access == access { spec.commands.clone() } else { None },
            forward: spec.forward,
            sftp: spec.sftp,
        })
    }
}

fn names<'a>(items: impl Iterator<Item = &'a str>) -> String {
    items.collect::<Vec<_>>().join(" or ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    fn target(name: &str, protocol: Protocol) -> Target {
        let kind = match protocol {
            Protocol::Tcp => TargetKind::Tcp,
            Protocol::Postgres => TargetKind::Postgres(PostgresTarget {
                databases: vec!["db".into()],
                tls: TlsMode::Disable,
                ca_file: None,
                credentials: PgCredentials::One(PgLogin { user: "u".into(), password_file: None }),
                record_parameters: false,
            }),
            Protocol::Ssh => TargetKind::Ssh(SshTarget {
                host_key: Some("ssh-ed25519 AAAA".into()),
                host_ca: None,
                credentials: SshLogin {
                    user: "u".into(),
                    private_key_file: None,
                    certificate_file: None,
                    password_file: None,
                },
            }),
        };
        Target { name: name.into(), host: "127.0.0.1".into(), port: 1, kind }
    }

    fn spec(target: &str, access: Access, ttl: u64) -> GrantSpec {
        GrantSpec {
            target: target.into(),
            access,
            ttl: secs(ttl),
            mask: vec![],
            approval: Approval::None,
            commands: None,
            forward: false,
            sftp: false,
        }
    }

    fn rule(name: &str, matcher: Match, grants: Vec<GrantSpec>) -> Rule {
        Rule { name: name.into(), file: "p.yaml".into(), matcher, grants }
    }

    fn groups(g: &[&str]) -> Match {
        Match { groups: g.iter().map(|s| (*s).to_owned()).collect(), ..Match::default() }
    }

    fn policy() -> Policy {
        let mut masked = spec("orders-db", Access::Read, 900);
        masked.mask = vec!["email".into()];
        let mut exec = spec("build-host", Access::Exec, 600);
        exec.commands = Some(vec!["uptime".into()]);
        let mut approved = spec("orders-db", Access::Write, 300);
        approved.approval = Approval::Required;
        Policy {
            targets: [
                ("orders-db", Protocol::Postgres),
                ("build-host", Protocol::Ssh),
                ("metrics", Protocol::Tcp),
            ]
            .into_iter()
            .map(|(n, p)| (n.to_owned(), target(n, p)))
            .collect(),
            rules: vec![
                rule("research reads orders", groups(&["research"]), vec![masked, exec]),
                rule(
                    "ops writes orders",
                    groups(&["ops"]),
                    vec![approved, spec("build-host", Access::Shell, 60)],
                ),
                rule(
                    "metrics by scope",
                    Match { scopes: vec!["metrics.read".into()], ..Match::default() },
                    vec![spec("metrics", Access::Connect, 90)],
                ),
                rule(
                    "one client",
                    Match { clients: vec!["0oaSPECIAL".into()], ..Match::default() },
                    vec![spec("metrics", Access::Connect, 30)],
                ),
            ],
            files: vec![],
        }
    }

    fn subject(groups: &[&str], scopes: &[&str]) -> Subject {
        Subject {
            client_id: "0oa1".into(),
            sub: "0oa1".into(),
            groups: groups.iter().map(|s| (*s).to_owned()).collect(),
            scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
        }
    }

    /// groups, scopes, target, access asked, and the rule + access granted or a fragment of the reason.
    type Case = (
        &'static [&'static str],
        &'static [&'static str],
        &'static str,
        Option<Access>,
        Result<(&'static str, Access), &'static str>,
    );

    #[test]
    fn decide_table() {
        use Access::{Connect, Exec, Read, Shell, Write};
        let p = policy();
        let cases: &[Case] = &[
            // default deny
            (
                &[],
                &[],
                "orders-db",
                None,
                Err("no rule grants client 0oa1 (groups: none) access to orders-db"),
            ),
            (
                &["a", "b"],
                &[],
                "orders-db",
                None,
                Err("no rule grants client 0oa1 (groups: a, b) access to orders-db"),
            ),
            (&["research"], &[], "nowhere", None, Err("no target named `nowhere` in the policy")),
            // a matching rule, strongest access
            (&["research"], &[], "orders-db", None, Ok(("research reads orders", Read))),
            (&["research"], &[], "orders-db", Some(Read), Ok(("research reads orders", Read))),
            (
                &["research"],
                &[],
                "orders-db",
                Some(Write),
                Err("rule `research reads orders` grants read on orders-db, not write"),
            ),
            // two rules match: strongest wins without an access, exact match wins with one
            (&["research", "ops"], &[], "orders-db", None, Ok(("ops writes orders", Write))),
            (&["research", "ops"], &[], "orders-db", Some(Read), Ok(("research reads orders", Read))),
            // write includes read
            (&["ops"], &[], "orders-db", Some(Read), Ok(("ops writes orders", Read))),
            // ssh: shell includes exec, exec does not include shell
            (&["ops"], &[], "build-host", Some(Exec), Ok(("ops writes orders", Exec))),
            (&["research"], &[], "build-host", None, Ok(("research reads orders", Exec))),
            (&["research"], &[], "build-host", Some(Shell), Err("grants exec on build-host, not shell")),
            // wrong access for the protocol
            (&["research"], &[], "build-host", Some(Read), Err("access `read` does not apply to ssh target")),
            // scopes and client ids
            (&[], &["metrics.read"], "metrics", None, Ok(("metrics by scope", Connect))),
            (
                &[],
                &["other"],
                "metrics",
                Some(Connect),
                Err("no rule grants client 0oa1 (groups: none; scopes: other)"),
            ),
        ];
        for (i, (g, s, target, access, want)) in cases.iter().enumerate() {
            let got = p.decide(&subject(g, s), target, *access);
            match (want, &got) {
                (Ok((rule, access)), Decision::Allow(t)) => {
                    assert_eq!((t.rule.as_str(), t.access), (*rule, *access), "case {i}: {got:?}");
                    assert_eq!(t.target, *target, "case {i}");
                }
                (Err(fragment), Decision::Deny { reason }) => {
                    assert!(reason.contains(fragment), "case {i}: `{reason}` lacks `{fragment}`");
                }
                _ => panic!("case {i}: expected {want:?}, got {got:?}"),
            }
        }
    }

    #[test]
    fn terms_carry_the_rule_details() {
        let p = policy();
        let Decision::Allow(t) = p.decide(&subject(&["research"], &[]), "orders-db", None) else { panic!() };
        assert_eq!(
            (t.ttl, t.mask.as_slice(), t.approval),
            (secs(900), &["email".to_owned()][..], Approval::None)
        );
        let Decision::Allow(t) = p.decide(&subject(&["research"], &[]), "build-host", None) else { panic!() };
        assert_eq!(t.commands, Some(vec!["uptime".to_owned()]));
        // exec through a shell rule carries no allow-list
        let Decision::Allow(t) = p.decide(&subject(&["ops"], &[]), "build-host", Some(Access::Exec)) else {
            panic!()
        };
        assert_eq!(t.commands, None);
        let Decision::Allow(t) = p.decide(&subject(&["ops"], &[]), "orders-db", None) else { panic!() };
        assert_eq!(t.approval, Approval::Required);
    }

    #[test]
    fn clients_match_on_client_id() {
        let p = policy();
        let mut s = subject(&[], &[]);
        s.client_id = "0oaSPECIAL".into();
        let Decision::Allow(t) = p.decide(&s, "metrics", None) else { panic!() };
        assert_eq!((t.rule.as_str(), t.ttl), ("one client", secs(30)));
    }

    #[test]
    fn rule_grants_rechecks_without_a_subject() {
        let p = policy();
        let Decision::Allow(t) = p.rule_grants("ops writes orders", "build-host", Access::Exec) else {
            panic!()
        };
        assert_eq!((t.access, t.ttl, t.commands), (Access::Exec, secs(60), None));
        let deny = |d: Decision| match d {
            Decision::Deny { reason } => reason,
            Decision::Allow(t) => panic!("{t:?}"),
        };
        assert_eq!(
            deny(p.rule_grants("gone", "orders-db", Access::Read)),
            "rule `gone` is no longer in the policy"
        );
        assert_eq!(
            deny(p.rule_grants("research reads orders", "orders-db", Access::Write)),
            "rule `research reads orders` no longer grants write on orders-db"
        );
        assert_eq!(
            deny(p.rule_grants("research reads orders", "x", Access::Read)),
            "no target named `x` in the policy"
        );
    }

    #[test]
    fn access_inclusion() {
        assert!(Access::Write.includes(Access::Read));
        assert!(!Access::Read.includes(Access::Write));
        assert!(Access::Shell.includes(Access::Exec));
        assert!(!Access::Exec.includes(Access::Shell));
        assert!(!Access::Write.includes(Access::Exec));
        assert!(Access::Connect.includes(Access::Connect));
    }
}
