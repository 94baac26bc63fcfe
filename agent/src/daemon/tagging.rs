//! Tagging: binding a cgroup to an identity (in the bindings file and the kernel's tag map), removing a
//! binding, and re-applying every binding when the daemon starts.

use std::path::Path;

use super::{Binding, State};
use crate::audit::Record;

/// Why a cgroup could not be tagged or untagged.
#[derive(Debug, thiserror::Error)]
pub enum TagError {
    #[error("unknown identity `{0}`; add an [identity.{0}] section to the config")]
    UnknownIdentity(String),
    #[error(transparent)]
    Cgroup(#[from] crate::cgroup::CgroupError),
    #[error("saving the bindings: {0}")]
    Save(#[source] std::io::Error),
    #[error(transparent)]
    Kernel(#[from] crate::bpf::BpfError),
    #[error("cgroup {0} is not tagged")]
    NotTagged(String),
}

impl State {
    /// Re-applies bindings from the config (creating their cgroups) and every runtime binding to the
    /// kernel's tag map.
    pub(super) fn apply_static_bindings(&self) {
        for b in &self.config.binding {
            let b = b.get_ref();
            let path = match crate::cgroup::resolve(&self.cgroup_root, &b.cgroup) {
                Ok(p) => p,
                Err(e) => {
                    tracing::error!(cgroup = %b.cgroup, error = %e, "static binding skipped");
                    continue;
                }
            };
            if let Err(e) = crate::cgroup::create(&path) {
                tracing::error!(cgroup = %b.cgroup, error = %e, "static binding skipped");
                continue;
            }
            if let Err(e) = self.tag(&path, b.identity.get_ref(), None, true) {
                tracing::error!(cgroup = %b.cgroup, error = %e, "static binding skipped");
            }
        }
        for b in self.bindings.all() {
            let path = self.cgroup_root.join(b.cgroup.trim_start_matches('/'));
            match crate::cgroup::id(&path) {
                Ok(id) => {
                    if let Err(e) = self.kernel.set_tag(id, b.id) {
                        tracing::error!(cgroup = %b.cgroup, error = %e, "restoring a tag failed");
                    }
                }
                Err(_) => {
                    // The cgroup is gone (e.g. a `warden exec` that ended while we were down).
                    let _ = self.bindings.remove(&b.cgroup);
                }
            }
        }
    }

    pub(super) fn tag(
        &self,
        path: &Path,
        identity: &str,
        task: Option<String>,
        from_config: bool,
    ) -> Result<Binding, TagError> {
        if !self.config.identity.contains_key(identity) {
            return Err(TagError::UnknownIdentity(identity.to_owned()));
        }
        let cgroup_id = crate::cgroup::check_taggable(&self.cgroup_root, path)?;
        let rel = crate::cgroup::relative(&self.cgroup_root, path);
        let binding =
            self.bindings.add(&rel, cgroup_id, identity, task, from_config).map_err(TagError::Save)?;
        self.kernel.set_tag(cgroup_id, binding.id)?;
        let _ = self.audit.append(
            Record::new("binding.added")
                .field("cgroup", &rel)
                .field("cgroup_id", cgroup_id)
                .field("identity", identity)
                .field("task", &binding.task)
                .field("source", if from_config { "config" } else { "control" }),
        );
        Ok(binding)
    }

    pub(super) fn untag(&self, cgroup: &str) -> Result<Binding, TagError> {
        let path = crate::cgroup::resolve(&self.cgroup_root, cgroup)?;
        let rel = crate::cgroup::relative(&self.cgroup_root, &path);
        let removed = self.bindings.remove(&rel).map_err(TagError::Save)?;
        let Some(b) = removed else { return Err(TagError::NotTagged(rel)) };
        self.kernel.remove_tag(b.cgroup_id)?;
        // A new task in a cgroup of the same name starts afresh (its grants are not inherited).
        if let Err(e) = self.grants.forget_cgroup(&rel) {
            tracing::warn!(cgroup = %rel, error = %e, "could not forget the cgroup's spent grants");
        }
        let _ = self
            .audit
            .append(Record::new("binding.removed").field("cgroup", &rel).field("identity", &b.identity));
        Ok(b)
    }
}
