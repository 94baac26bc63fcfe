//! The daemon's gate: binding → verified identity → policy decision → grant, for each connection; and the
//! control-socket grant commands, which go through the same identity and policy.

use std::sync::Arc;

use serde_json::Value;

use super::State;
use crate::control::{Refused, Request};
use crate::grants::{GrantEnd, GrantKey};
use crate::origin::ConnOrigin;
use crate::policy::{self, Access, Decision, Protocol, Subject};
use crate::proxy::{Admission, Gate, IdentityView, Refusal};

pub struct DaemonGate {
    pub state: Arc<State>,
}

fn refusal(code: &'static str, reason: impl Into<String>) -> Refusal {
    Refusal { code, reason: reason.into(), target: None, identity: None }
}

fn subject(v: &crate::identity::VerifiedIdentity) -> Subject {
    Subject {
        client_id: v.client_id.clone(),
        sub: v.sub.clone(),
        groups: v.groups.clone(),
        scopes: v.scopes.clone(),
    }
}

impl Gate for DaemonGate {
    fn admit<'a>(
        &'a self,
        origin: &'a ConnOrigin,
    ) -> std::pin::Pin<Box<dyn Future<Output = Result<Admission, Refusal>> + Send + 'a>> {
        Box::pin(async move {
            let s = &self.state;
            let binding = s.bindings.by_id(origin.binding).ok_or_else(|| {
                refusal(
                    "unknown_binding",
                    "the process's cgroup is tagged but its binding is unknown to this daemon",
                )
            })?;
            let policy = s.policy.current();
            let target =
                s.targets.name(origin.target).filter(|n| policy.target(n).is_some()).ok_or_else(|| {
                    refusal("unknown_target", format!("{} is no longer a target in the policy", origin.dst))
                })?;
            let verified = s.identities.verified(&binding.identity).await.map_err(|e| Refusal {
                code: "identity",
                reason: format!("{e} ({})", e.reason()),
                target: Some(target.clone()),
                identity: None,
            })?;
            let view = IdentityView {
                name: verified.name.clone(),
                sub: verified.sub.clone(),
                client_id: verified.client_id.clone(),
                groups: verified.groups.clone(),
            };
            let subject = subject(&verified);
            s.subjects.lock().expect("subjects lock").insert(binding.identity.clone(), subject.clone());
            let terms = match policy.decide(&subject, &target, None) {
                Decision::Allow(t) => t,
                Decision::Deny { reason } => {
                    return Err(Refusal {
                        code: "policy",
                        reason,
                        target: Some(target),
                        identity: Some(view),
                    });
                }
            };
            // Only opaque TCP has a handler so far. A postgres or ssh target relayed as opaque bytes would let
            // a `read` grant write and would need the agent to hold the credential: refuse instead.
            let protocol = policy.target(&target).map_or(Protocol::Tcp, policy::Target::protocol);
            if protocol != Protocol::Tcp {
                return Err(Refusal {
                    code: "unsupported_protocol",
                    reason: format!(
                        "target {target} speaks {}, whose protocol handler this warden does not have yet; \
                         only `protocol: tcp` targets are proxied",
                        protocol.as_str()
                    ),
                    target: Some(target),
                    identity: Some(view),
                });
            }
            let key = GrantKey {
                identity: binding.identity.clone(),
                client_id: verified.client_id.clone(),
                cgroup: binding.cgroup.clone(),
                target: target.clone(),
                access: terms.access,
            };
            let mut lease = s.grants.acquire(key, &terms).await.map_err(|e| Refusal {
                code: "grant",
                reason: e.to_string(),
                target: Some(target.clone()),
                identity: Some(view.clone()),
            })?;
            Ok(Admission {
                target,
                protocol: protocol.as_str().to_owned(),
                identity: Some(view),
                grant: Some(lease.grant_id.clone()),
                rule: Some(lease.rule.clone()),
                access: Some(lease.access.as_str().to_owned()),
                until: Some(Box::pin(async move {
                    match lease.ended().await {
                        GrantEnd::Expired => "grant_expired".to_owned(),
                        GrantEnd::Revoked { .. } => "grant_revoked".to_owned(),
                        GrantEnd::PolicyChanged { .. } => "policy_changed".to_owned(),
                    }
                })),
            })
        })
    }
}

/// `warden grants` and `warden grant issue|approve|revoke`.
pub async fn grant_request(state: &State, request: Request) -> Result<Value, Refused> {
    fn to_value<T: serde::Serialize>(v: T) -> Value {
        serde_json::to_value(v).unwrap_or_default()
    }
    match request {
        Request::Grants => Ok(to_value(state.grants.list())),
        Request::GrantApprove { id } => {
            state.grants.approve(&id, "operator").await.map(to_value).map_err(|e| Refused(e.to_string()))
        }
        Request::GrantRevoke { id } => {
            state.grants.revoke(&id, "operator").await.map(to_value).map_err(|e| Refused(e.to_string()))
        }
        Request::GrantIssue { identity, target, cgroup, access } => {
            let access = access
                .map(|a| Access::parse(&a).ok_or_else(|| Refused(format!("unknown access `{a}`"))))
                .transpose()?;
            let path =
                crate::cgroup::resolve(&state.cgroup_root, &cgroup).map_err(|e| Refused(e.to_string()))?;
            let cgroup = crate::cgroup::relative(&state.cgroup_root, &path);
            let verified = state
                .identities
                .verified(&identity)
                .await
                .map_err(|e| Refused(format!("identity `{identity}` could not be verified: {e}")))?;
            let terms = match state.policy.current().decide(&subject(&verified), &target, access) {
                Decision::Allow(t) => t,
                Decision::Deny { reason } => return Err(Refused(reason)),
            };
            let key = GrantKey {
                identity,
                client_id: verified.client_id.clone(),
                cgroup,
                target,
                access: terms.access,
            };
            state
                .grants
                .issue(key, &terms, "operator")
                .await
                .map(to_value)
                .map_err(|e| Refused(e.to_string()))
        }
        _ => Err(Refused("not a grant request".into())),
    }
}
