//! The daemon's gate: the target a connection was redirected for, then binding → verified identity →
//! policy decision → grant; mid-session questions (SSH channels and commands) re-decided against the
//! current policy; and the control-socket grant commands, which go through the same identity and policy.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use super::State;
use crate::grants::{GrantEnd, GrantKey};
use crate::metrics::SetupStep;
use crate::origin::ConnOrigin;
use crate::policy::{Decision, Subject, Target, TargetKind};
use crate::protocol::{Ask, Authorize, End, Hello, IdentityView, Refusal, RefusalCode, Session};
use crate::proxy::{Admission, Gate};

pub struct DaemonGate {
    pub state: Arc<State>,
}

pub(super) fn subject(v: &crate::identity::VerifiedIdentity) -> Subject {
    Subject {
        client_id: v.client_id.clone(),
        sub: v.sub.clone(),
        groups: v.groups.clone(),
        scopes: v.scopes.clone(),
    }
}

fn refusal(
    code: RefusalCode,
    reason: impl Into<String>,
    target: &str,
    identity: Option<&Arc<IdentityView>>,
) -> Refusal {
    Refusal { code, reason: reason.into(), target: Some(target.to_owned()), identity: identity.cloned() }
}

impl Gate for DaemonGate {
    fn target(&self, origin: &ConnOrigin) -> Result<Arc<Target>, Refusal> {
        let policy = self.state.policy.current();
        self.state
            .targets
            .name(origin.target)
            .and_then(|n| policy.target(&n).cloned())
            .map(Arc::new)
            .ok_or_else(|| {
                Refusal::new(
                    RefusalCode::UnknownTarget,
                    format!("{} is no longer a target in the policy", origin.dst),
                )
            })
    }

    fn admit<'a>(
        &'a self,
        origin: &'a ConnOrigin,
        target: &'a Arc<Target>,
        hello: &'a Hello,
    ) -> Pin<Box<dyn Future<Output = Result<Admission, Refusal>> + Send + 'a>> {
        Box::pin(async move {
            let s = &self.state;
            let name = target.name.as_str();
            let binding = s.bindings.by_id(origin.binding).ok_or_else(|| {
                Refusal::new(
                    RefusalCode::UnknownBinding,
                    "the process's cgroup is tagged but its binding is unknown to this daemon",
                )
            })?;
            let policy = s.policy.current();
            let started = Instant::now();
            let verified =
                s.identities.verified(&binding.identity).await.map_err(|e| {
                    refusal(RefusalCode::Identity, format!("{e} ({})", e.reason()), name, None)
                })?;
            let verified_at = Instant::now();
            s.metrics.setup_step(SetupStep::Identity, verified_at - started);
            let view = IdentityView {
                name: verified.name.clone(),
                sub: verified.sub.clone(),
                client_id: verified.client_id.clone(),
                groups: verified.groups.clone(),
            };
            let shared = Arc::new(view.clone());
            let subject = subject(&verified);
            s.subjects.lock().expect("subjects lock").insert(binding.identity.clone(), subject.clone());
            let terms = match policy.decide(&subject, name, None) {
                Decision::Allow(t) => t,
                Decision::Deny { reason } => {
                    return Err(refusal(RefusalCode::Policy, reason, name, Some(&shared)));
                }
            };
            database_allowed(target, hello)
                .map_err(|reason| refusal(RefusalCode::Database, reason, name, Some(&shared)))?;
            let decided = Instant::now();
            s.metrics.setup_step(SetupStep::Policy, decided - verified_at);
            let key = GrantKey {
                identity: binding.identity.clone(),
                client_id: verified.client_id.clone(),
                cgroup: binding.cgroup.clone(),
                target: name.to_owned(),
                access: terms.access,
            };
            let mut lease = s
                .grants
                .acquire(key, &terms)
                .await
                .map_err(|e| refusal(RefusalCode::Grant, e.to_string(), name, Some(&shared)))?;
            s.metrics.setup_step(SetupStep::Grant, decided.elapsed());
            Ok(Admission {
                terms,
                identity: Some(view),
                grant: Some(lease.grant_id.clone()),
                until: Some(Box::pin(async move {
                    match lease.ended().await {
                        GrantEnd::Expired => End::GrantExpired,
                        GrantEnd::Revoked { by } => End::GrantRevoked { by },
                        GrantEnd::PolicyChanged { reason } => End::PolicyChanged { reason },
                    }
                })),
            })
        })
    }
}

impl Authorize for DaemonGate {
    /// Re-decides the session against the current policy, with the subject its identity was last verified
    /// as, then checks the ask against those terms.
    fn authorize(&self, session: &Session, ask: &Ask<'_>) -> Result<(), Refusal> {
        let target = session.target.name.as_str();
        let identity = session.identity.as_ref().map(|i| Arc::new(i.clone()));
        // Refused mid-session: counted as the protocol's refusal (the handler answers in its own terms).
        let no = |code: RefusalCode, reason: String| {
            self.state.metrics.refused(crate::metrics::RefusalKind::Protocol, code.as_str());
            refusal(code, reason, target, identity.as_ref())
        };
        let Some(name) = session.identity.as_ref().map(|i| i.name.as_str()) else {
            return Err(no(RefusalCode::Identity, "the session has no verified identity".into()));
        };
        let subject = self.state.subjects.lock().expect("subjects lock").get(name).cloned();
        let Some(subject) = subject else {
            return Err(no(RefusalCode::Identity, format!("identity `{name}` has not been verified")));
        };
        let terms = match self.state.policy.current().decide(&subject, target, Some(session.terms.access)) {
            Decision::Allow(t) => t,
            Decision::Deny { reason } => return Err(no(RefusalCode::Policy, reason)),
        };
        within(&terms, ask).map_err(|reason| no(RefusalCode::NotGranted, reason))
    }
}

/// PostgreSQL: the database the client asked for must be one of the target's `databases`.
fn database_allowed(target: &Target, hello: &Hello) -> Result<(), String> {
    let TargetKind::Postgres(pg) = &target.kind else { return Ok(()) };
    match hello.database.as_deref() {
        Some(db) if pg.databases.iter().any(|d| d == db) => Ok(()),
        Some(db) => Err(format!(
            "database `{db}` is not one of target {}'s databases ({})",
            target.name,
            pg.databases.join(", ")
        )),
        None => Err(format!(
            "the client named no database; target {} serves {}",
            target.name,
            pg.databases.join(", ")
        )),
    }
}

/// Whether `ask` is within `terms`: the `commands` allow-list, `forward`, `sftp`.
fn within(terms: &crate::policy::Terms, ask: &Ask<'_>) -> Result<(), String> {
    let rule = &terms.rule;
    match ask {
        Ask::Exec { command } => match &terms.commands {
            Some(list) => crate::policy::commands::command_allowed(command, list)
                .map_err(|why| format!("rule `{rule}`: {why}")),
            None => Ok(()),
        },
        Ask::Shell if terms.commands.is_some() => {
            Err(format!("rule `{rule}` allows only listed commands, not an interactive shell"))
        }
        Ask::Forward { what } if !terms.forward => {
            Err(format!("rule `{rule}` does not allow forwarding ({what}); it needs `forward: true`"))
        }
        Ask::Subsystem { name } if *name != "sftp" => Err(format!("the subsystem `{name}` is not allowed")),
        Ask::Subsystem { .. } if !terms.sftp => {
            Err(format!("rule `{rule}` does not allow sftp; it needs `sftp: true`"))
        }
        Ask::Shell | Ask::Forward { .. } | Ask::Subsystem { .. } => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::policy::{Access, Approval, Terms};

    fn terms(commands: Option<Vec<String>>, forward: bool, sftp: bool) -> Terms {
        Terms {
            rule: "ops".into(),
            target: "build-host".into(),
            access: Access::Exec,
            ttl: Duration::from_secs(60),
            mask: Vec::new(),
            approval: Approval::None,
            commands,
            forward,
            sftp,
        }
    }

    #[test]
    fn a_postgres_session_must_name_one_of_the_targets_databases() {
        use crate::policy::{PgCredentials, PgLogin, PostgresTarget, TlsMode};
        let pg = Target {
            name: "orders-db".into(),
            host: "127.0.0.1".into(),
            port: 5432,
            kind: TargetKind::Postgres(PostgresTarget {
                databases: vec!["orders".into()],
                tls: TlsMode::Require,
                ca_file: None,
                credentials: PgCredentials::One(PgLogin { user: "app".into(), password_file: None }),
                record_parameters: false,
            }),
        };
        let asks = |db: Option<&str>| Hello { database: db.map(str::to_owned), ..Hello::default() };
        assert!(database_allowed(&pg, &asks(Some("orders"))).is_ok());
        assert!(database_allowed(&pg, &asks(Some("postgres"))).unwrap_err().contains("`postgres`"));
        assert!(database_allowed(&pg, &asks(None)).is_err());
        let tcp = Target { kind: TargetKind::Tcp, ..pg.clone() };
        assert!(database_allowed(&tcp, &asks(None)).is_ok());
    }

    #[test]
    fn asks_are_checked_against_the_terms() {
        let open = terms(None, false, false);
        assert!(within(&open, &Ask::Exec { command: "uptime" }).is_ok());
        assert!(within(&open, &Ask::Shell).is_ok());
        assert!(within(&open, &Ask::Forward { what: "direct-tcpip" }).unwrap_err().contains("forward: true"));
        assert!(within(&open, &Ask::Subsystem { name: "sftp" }).unwrap_err().contains("sftp: true"));
        assert!(within(&open, &Ask::Subsystem { name: "other" }).is_err());

        let wide = terms(None, true, true);
        assert!(within(&wide, &Ask::Forward { what: "direct-tcpip" }).is_ok());
        assert!(within(&wide, &Ask::Subsystem { name: "sftp" }).is_ok());

        // With an allow-list no shell runs; commands go through policy::commands::command_allowed.
        let listed = terms(Some(vec!["uptime".into()]), false, false);
        assert!(within(&listed, &Ask::Shell).is_err());
        assert!(within(&listed, &Ask::Exec { command: "rm -rf /" }).is_err());
    }
}
