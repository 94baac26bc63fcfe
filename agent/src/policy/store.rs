//! The policy in force: loaded at start, replaced whole on reload (SIGHUP or a changed file) only after
//! the new one validates completely; subscribers see every applied change.

use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::watch;

use super::{Policy, load};
use crate::audit::{Audit, Record};
use crate::config::{Config, Diagnostic};

/// How often [`Store::watch_files`] looks at the policy files.
const POLL: Duration = Duration::from_secs(1);

pub struct Store {
    config: Config,
    audit: Audit,
    tx: watch::Sender<Arc<Policy>>,
    /// Serialises reloads from SIGHUP and the file watcher.
    reloading: Mutex<()>,
}

impl Store {
    /// Loads the policy named by `agent.policies`; the daemon refuses to start (exit 64) on errors.
    pub fn open(config: &Config, audit: Audit) -> Result<Self, Vec<Diagnostic>> {
        let files = list(config)?;
        let policy = load(&files)?;
        let record = Record::new("policy.loaded")
            .field("files", paths(&files))
            .field("targets", policy.targets().map(|t| t.name.clone()).collect::<Vec<_>>());
        if let Err(e) = audit.append(record) {
            tracing::warn!(error = %e, "could not record policy.loaded");
        }
        let (tx, _) = watch::channel(Arc::new(policy));
        Ok(Self { config: config.clone(), audit, tx, reloading: Mutex::new(()) })
    }

    /// The policy in force now.
    pub fn current(&self) -> Arc<Policy> {
        self.tx.borrow().clone()
    }

    /// Sees every applied policy (not rejected edits, not reloads that changed nothing).
    pub fn subscribe(&self) -> watch::Receiver<Arc<Policy>> {
        self.tx.subscribe()
    }

    /// Re-reads every policy file. A policy with any error is rejected whole and the old one stays;
    /// either way every error is logged and `policy.reloaded` is recorded with the outcome.
    pub fn reload(&self) -> Result<(), Vec<Diagnostic>> {
        let _one_at_a_time = self.reloading.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let files = match list(&self.config) {
            Ok(f) => f,
            Err(diags) => {
                self.rejected(&[], &diags);
                return Err(diags);
            }
        };
        let new = match load(&files) {
            Ok(p) => p,
            Err(diags) => {
                self.rejected(&files, &diags);
                return Err(diags);
            }
        };
        let old = self.current();
        let added: Vec<String> =
            new.targets().filter(|t| old.target(&t.name).is_none()).map(|t| t.name.clone()).collect();
        let removed: Vec<String> =
            old.targets().filter(|t| new.target(&t.name).is_none()).map(|t| t.name.clone()).collect();
        let changed: Vec<String> = new
            .targets()
            .filter(|t| old.target(&t.name).is_some_and(|o| o != *t))
            .map(|t| t.name.clone())
            .collect();
        let record = Record::new("policy.reloaded")
            .field("outcome", "applied")
            .field("files", paths(&files))
            .field("errors", Vec::<String>::new())
            .field("targets_added", &added)
            .field("targets_removed", &removed)
            .field("targets_changed", &changed);
        if let Err(e) = self.audit.append(record) {
            tracing::warn!(error = %e, "could not record policy.reloaded");
        }
        tracing::info!(files = files.len(), ?added, ?removed, ?changed, "policy reloaded");
        self.tx.send_if_modified(|current| {
            if **current == new {
                return false;
            }
            *current = Arc::new(new);
            true
        });
        Ok(())
    }

    fn rejected(&self, files: &[PathBuf], diags: &[Diagnostic]) {
        for d in diags {
            tracing::error!("{d}");
        }
        tracing::error!(errors = diags.len(), "policy reload rejected; the previous policy stays in force");
        let record = Record::new("policy.reloaded")
            .field("outcome", "rejected")
            .field("files", paths(files))
            .field("errors", diags.iter().map(ToString::to_string).collect::<Vec<_>>())
            .field("targets_added", Vec::<String>::new())
            .field("targets_removed", Vec::<String>::new());
        if let Err(e) = self.audit.append(record) {
            tracing::warn!(error = %e, "could not record policy.reloaded");
        }
    }

    /// Reloads whenever a policy file (or the directory's list of them) changes after this call,
    /// until `shutdown`. Polls name, size, mtime, ctime and inode every second (no inotify; editors
    /// that replace files by rename are seen) and reloads once a change has held for one poll.
    pub fn watch_files(
        self: Arc<Self>,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> impl Future<Output = ()> + Send + 'static {
        let mut last = fingerprint(&self.config);
        let mut settling: Option<Fingerprint> = None;
        async move {
            tokio::pin!(shutdown);
            let mut tick = tokio::time::interval(POLL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = &mut shutdown => return,
                    _ = tick.tick() => {}
                }
                let now = fingerprint(&self.config);
                if now == last {
                    settling = None;
                    continue;
                }
                // Reload only once a change has held still for a poll, so a file caught half
                // written by an editor that writes in place is not applied (an empty file is a
                // valid policy with no targets).
                if settling.as_ref() == Some(&now) {
                    last = now;
                    settling = None;
                    tracing::info!("a policy file changed; reloading");
                    let _ = self.reload();
                } else {
                    settling = Some(now);
                }
            }
        }
    }
}

fn list(config: &Config) -> Result<Vec<PathBuf>, Vec<Diagnostic>> {
    config.policy_files().map_err(|e| {
        let dir = &config.agent.policies;
        vec![Diagnostic {
            file: dir.clone(),
            line: 1,
            col: 1,
            message: format!("cannot list policy files: {e}"),
        }]
    })
}

fn paths(files: &[PathBuf]) -> Vec<String> {
    files.iter().map(|f| f.display().to_string()).collect()
}

type Fingerprint = Vec<(PathBuf, Option<(u64, u64, SystemTime, i64)>)>;

fn fingerprint(config: &Config) -> Fingerprint {
    use std::os::unix::fs::MetadataExt;
    let files = config.policy_files().unwrap_or_default();
    files
        .into_iter()
        .map(|f| {
            let meta = std::fs::metadata(&f)
                .ok()
                .map(|m| (m.ino(), m.len(), m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.ctime_nsec()));
            (f, meta)
        })
        .collect()
}
