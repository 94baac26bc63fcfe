//! cgroup2: finding the mount, naming, creating, entering and emptying cgroups.

use std::io::Write as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use warden_common::MAX_CGROUP_DEPTH;

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error(
        "cgroup2 is not mounted; mount it (`mount -t cgroup2 none /sys/fs/cgroup`) or set agent.cgroup_root"
    )]
    NotMounted,
    #[error("reading /proc/self/mountinfo: {0}")]
    MountInfo(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cgroup {path} does not exist")]
    Missing { path: PathBuf },
    #[error("cgroup {path} is {depth} levels deep; Warden honours tags up to {MAX_CGROUP_DEPTH} levels")]
    TooDeep { path: PathBuf, depth: usize },
    #[error("cgroup {path} is outside the cgroup2 root {root}")]
    Outside { path: PathBuf, root: PathBuf },
    #[error(
        "cgroup {path} contains the warden daemon itself; tagging it would send Warden's own upstream connections back to Warden"
    )]
    ContainsDaemon { path: PathBuf },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CgroupError {
    let path = path.to_path_buf();
    move |source| CgroupError::Io { path, source }
}

/// The cgroup2 mount point: `configured` unless it is `auto`, else read from /proc/self/mountinfo.
pub fn root(configured: &str) -> Result<PathBuf, CgroupError> {
    if configured != "auto" {
        return Ok(PathBuf::from(configured));
    }
    let me = procfs::process::Process::myself().map_err(|e| CgroupError::MountInfo(e.to_string()))?;
    let mounts = me.mountinfo().map_err(|e| CgroupError::MountInfo(e.to_string()))?;
    mounts.into_iter().find(|m| m.fs_type == "cgroup2").map(|m| m.mount_point).ok_or(CgroupError::NotMounted)
}

/// A cgroup named by an operator: relative to the root, a cgroup path (`/agents/bot`, as in
/// /proc/PID/cgroup), or a filesystem path under the root.
pub fn resolve(root: &Path, name: &str) -> Result<PathBuf, CgroupError> {
    let p = Path::new(name);
    let full = if p.starts_with(root) { p.to_path_buf() } else { root.join(name.trim_start_matches('/')) };
    // Reject `..` tricks: the path must stay under the root.
    if full.components().any(|c| matches!(c, std::path::Component::ParentDir)) {
        return Err(CgroupError::Outside { path: full, root: root.to_path_buf() });
    }
    Ok(full)
}

/// The cgroup's path relative to the root, as `/a/b` (the form /proc/PID/cgroup uses).
pub fn relative(root: &Path, path: &Path) -> String {
    let rel = path.strip_prefix(root).unwrap_or(path);
    format!("/{}", rel.display())
}

/// The kernel's id for a cgroup: its directory's inode number.
pub fn id(path: &Path) -> Result<u64, CgroupError> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => Ok(m.ino()),
        Ok(_) => Err(CgroupError::Missing { path: path.to_path_buf() }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Err(CgroupError::Missing { path: path.to_path_buf() })
        }
        Err(e) => Err(io(path)(e)),
    }
}

/// Checks a cgroup may be tagged: it exists, is under the root, not too deep, and does not contain us.
pub fn check_taggable(root: &Path, path: &Path) -> Result<u64, CgroupError> {
    let id = id(path)?;
    let rel =
        path.strip_prefix(root).map_err(|_| CgroupError::Outside { path: path.into(), root: root.into() })?;
    let depth = rel.components().count();
    if depth > MAX_CGROUP_DEPTH as usize {
        return Err(CgroupError::TooDeep { path: path.to_path_buf(), depth });
    }
    let mine = own_cgroup(root)?;
    if mine.starts_with(path) {
        return Err(CgroupError::ContainsDaemon { path: path.to_path_buf() });
    }
    Ok(id)
}

/// This process's cgroup2 directory.
pub fn own_cgroup(root: &Path) -> Result<PathBuf, CgroupError> {
    process_cgroup(root, std::process::id())
        .ok_or_else(|| CgroupError::Missing { path: "/proc/self/cgroup".into() })
}

/// A process's cgroup2 directory, from /proc/PID/cgroup (the `0::` line).
pub fn process_cgroup(root: &Path, pid: u32) -> Option<PathBuf> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let rel = text.lines().find_map(|l| l.strip_prefix("0::"))?;
    Some(root.join(rel.trim_start_matches('/')))
}

/// Creates a cgroup directory (and its parents).
pub fn create(path: &Path) -> Result<u64, CgroupError> {
    std::fs::create_dir_all(path).map_err(io(path))?;
    id(path)
}

/// Moves a process into a cgroup.
pub fn enter(path: &Path, pid: u32) -> Result<(), CgroupError> {
    let procs = path.join("cgroup.procs");
    let mut f = std::fs::OpenOptions::new().write(true).open(&procs).map_err(io(&procs))?;
    f.write_all(pid.to_string().as_bytes()).map_err(io(&procs))
}

/// Kills every process left in a cgroup and removes it, waiting (bounded) for it to empty.
pub fn kill_and_remove(path: &Path) -> Result<(), CgroupError> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let procs = std::fs::read_to_string(path.join("cgroup.procs")).unwrap_or_default();
        if procs.trim().is_empty() {
            break;
        }
        // cgroup.kill (5.14+) kills the whole subtree at once; fall back to signalling each process.
        if std::fs::write(path.join("cgroup.kill"), "1").is_err() {
            for pid in procs.split_whitespace().filter_map(|p| p.parse::<i32>().ok()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        if std::time::Instant::now() > deadline {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    // Children first.
    if let Ok(entries) = std::fs::read_dir(path) {
        for e in entries.filter_map(Result::ok) {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                kill_and_remove(&e.path())?;
            }
        }
    }
    match std::fs::remove_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io(path)(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_resolve_under_the_root() {
        let root = Path::new("/sys/fs/cgroup");
        assert_eq!(resolve(root, "agents/bot").unwrap(), Path::new("/sys/fs/cgroup/agents/bot"));
        assert_eq!(resolve(root, "/agents/bot").unwrap(), Path::new("/sys/fs/cgroup/agents/bot"));
        assert_eq!(resolve(root, "/sys/fs/cgroup/agents").unwrap(), Path::new("/sys/fs/cgroup/agents"));
        assert!(resolve(root, "../../etc").is_err());
        assert_eq!(relative(root, Path::new("/sys/fs/cgroup/agents/bot")), "/agents/bot");
    }
}
