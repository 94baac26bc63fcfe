//! Finding the cgroup2 mount and removing a cgroup tree a test, the demo or the bench made, killing
//! whatever is still in it.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The cgroup2 mount point, from /proc/self/mountinfo.
pub fn cgroup_root() -> Option<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    text.lines().find_map(|l| {
        let (pre, post) = l.split_once(" - ")?;
        if post.starts_with("cgroup2 ") { pre.split(' ').nth(4).map(PathBuf::from) } else { None }
    })
}

/// Kills every process in the cgroup tree at `path` (children first) and removes it. A missing tree is
/// already removed.
pub fn remove_cgroup_tree(path: &Path) -> std::io::Result<()> {
    if !path.exists() {
        return Ok(());
    }
    for e in std::fs::read_dir(path)?.filter_map(Result::ok) {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            remove_cgroup_tree(&e.path())?;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let procs = std::fs::read_to_string(path.join("cgroup.procs")).unwrap_or_default();
        if procs.trim().is_empty() || Instant::now() > deadline {
            break;
        }
        let _ = std::fs::write(path.join("cgroup.kill"), "1");
        std::thread::sleep(Duration::from_millis(10));
    }
    std::fs::remove_dir(path)
}
