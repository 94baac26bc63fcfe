//! The control-socket handler: each request to the subsystem that answers it, and their typed errors
//! mapped to the control protocol's `Refused` here, at the edge; `warden status`'s view of the daemon.

use serde_json::{Value, json};

use super::State;
use super::gate::subject;
use crate::audit::Record;
use crate::bpf;
use crate::control::{self, Refused, Request};
use crate::grants::GrantKey;
use crate::policy::{Access, Decision};

/// A subsystem's error as the control protocol reports it.
fn refused(e: impl std::fmt::Display) -> Refused {
    Refused(e.to_string())
}

impl State {
    fn status(&self) -> Value {
        json!({
            "pid": std::process::id(),
            "links": bpf::pinned_links(&self.config.agent.bpffs_dir),
            "adopted": self.kernel.report.adopted,
            "attached": self.kernel.report.attached,
            "bindings": self.bindings.all(),
            "kernel_tags": self.kernel.tags().len(),
            "live_origins": self.kernel.live_origins(),
            "sessions": self.sessions.len(),
            "targets": self.policy.current().targets().map(|t| t.name.clone()).collect::<Vec<_>>(),
            "proxy_listen": self.config.proxy_listen().iter().map(ToString::to_string).collect::<Vec<_>>(),
        })
    }
}

impl control::Handler for State {
    async fn handle(&self, request: Request) -> Result<Value, Refused> {
        match request {
            Request::Status => Ok(self.status()),
            Request::Tag { cgroup, identity, task } => {
                let path = crate::cgroup::resolve(&self.cgroup_root, &cgroup).map_err(refused)?;
                let b = self.tag(&path, &identity, task, false).map_err(refused)?;
                Ok(serde_json::to_value(b).unwrap_or_default())
            }
            Request::Untag { cgroup } => {
                let b = self.untag(&cgroup).map_err(refused)?;
                Ok(json!({ "cgroup": b.cgroup, "identity": b.identity }))
            }
            Request::Sessions => Ok(serde_json::to_value(self.sessions.views()).unwrap_or_default()),
            Request::KillSession { id } => {
                if self.sessions.kill(&id) {
                    let _ = self
                        .audit
                        .append(Record::new("session.killed").field("session", &id).field("by", "operator"));
                    Ok(json!({ "session": id, "killed": true }))
                } else {
                    Err(Refused(format!("no live session `{id}`")))
                }
            }
            Request::Grants
            | Request::GrantIssue { .. }
            | Request::GrantApprove { .. }
            | Request::GrantRevoke { .. } => grant_request(self, request).await,
            Request::Stop => {
                self.shutdown.cancel();
                Ok(json!({ "stopping": true }))
            }
        }
    }
}

/// `warden grants` and `warden grant issue|approve|revoke`.
async fn grant_request(state: &State, request: Request) -> Result<Value, Refused> {
    fn to_value<T: serde::Serialize>(v: T) -> Value {
        serde_json::to_value(v).unwrap_or_default()
    }
    match request {
        Request::Grants => Ok(to_value(state.grants.list())),
        Request::GrantApprove { id } => {
            state.grants.approve(&id, "operator").await.map(to_value).map_err(refused)
        }
        Request::GrantRevoke { id } => {
            state.grants.revoke(&id, "operator").await.map(to_value).map_err(refused)
        }
        Request::GrantIssue { identity, target, cgroup, access } => {
            let access = access
                .map(|a| Access::parse(&a).ok_or_else(|| Refused(format!("unknown access `{a}`"))))
                .transpose()?;
            let path = crate::cgroup::resolve(&state.cgroup_root, &cgroup).map_err(refused)?;
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
            state.grants.issue(key, &terms, "operator").await.map(to_value).map_err(refused)
        }
        _ => Err(Refused("not a grant request".into())),
    }
}
