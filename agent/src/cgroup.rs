//! cgroup2: finding the mount, naming and creating cgroups, and `warden exec` (run a command in a fresh
//! cgroup bound to an identity, removed when the command exits).

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

/// How many levels below the root a cgroup is (the root is level 0), as the kernel's ancestor helpers
/// count them.
pub fn level(root: &Path, path: &Path) -> u32 {
    let depth = path.strip_prefix(root).map_or(0, |rel| rel.components().count());
    u32::try_from(depth).unwrap_or(u32::MAX)
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

/// `warden exec`: a fresh cgroup under `agent.exec_parent`, bound to IDENTITY through the daemon; the
/// command runs in it as USER; when it exits, anything it left is killed, the binding is removed, the
/// cgroup deleted, and its exit status returned.
pub fn exec_cli(
    config: &Path,
    identity: &str,
    task: Option<&str>,
    user: Option<&str>,
    command: &[String],
) -> u8 {
    use crate::cli::{EXIT_FAILED, EXIT_INVALID, EXIT_NOPERM, fail};
    let config = match crate::config::Config::load(config) {
        Ok(c) => c,
        Err(e) => return fail(EXIT_INVALID, &e),
    };
    if !nix::unistd::geteuid().is_root() {
        return fail(EXIT_NOPERM, &"warden exec must run as root (it creates cgroups and drops to --user)");
    }
    let user = match user.map(lookup_user).transpose() {
        Ok(u) => u,
        Err(e) => return fail(EXIT_INVALID, &e),
    };
    let root = match root(&config.agent.cgroup_root) {
        Ok(r) => r,
        Err(e) => return fail(EXIT_FAILED, &e),
    };
    let name = format!("exec-{}-{}", std::process::id(), task.unwrap_or("task").replace(['/', '.'], "_"));
    let path = root.join(config.agent.exec_parent.trim_start_matches('/')).join(name);
    if let Err(e) = create(&path) {
        return fail(EXIT_FAILED, &e);
    }
    let cgroup = path.display().to_string();
    let tagged = crate::control::request(
        &config.agent.control_socket,
        &crate::control::Request::Tag {
            cgroup: cgroup.clone(),
            identity: identity.to_owned(),
            task: task.map(str::to_owned),
        },
    );
    let code = match tagged {
        Ok(_) => run_in(&path, user.as_ref(), command),
        Err(e) => {
            let _ = std::fs::remove_dir(&path);
            return fail(e.exit_code(), &e);
        }
    };
    // Kill what the command left behind BEFORE lifting the tag: a leftover must never run untagged, not
    // even between the untag and the kill. If the cgroup cannot be emptied, the tag stays (fail closed).
    match kill_and_remove(&path) {
        Ok(()) => {
            let _ = crate::control::request(
                &config.agent.control_socket,
                &crate::control::Request::Untag { cgroup },
            );
        }
        Err(e) => eprintln!("warden: {e}; the cgroup stays tagged"),
    }
    code
}

fn lookup_user(spec: &str) -> Result<nix::unistd::User, String> {
    let found = match spec.parse::<u32>() {
        Ok(uid) => nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)),
        Err(_) => nix::unistd::User::from_name(spec),
    };
    found.ok().flatten().ok_or_else(|| format!("no such user `{spec}`"))
}

/// Forks; the child enters the cgroup, drops to the user and execs; the parent waits, forwarding
/// SIGINT and SIGTERM.
fn run_in(path: &Path, user: Option<&nix::unistd::User>, command: &[String]) -> u8 {
    use nix::sys::wait::{WaitStatus, waitpid};
    use nix::unistd::{ForkResult, fork};
    let Ok(argv) =
        command.iter().map(|a| std::ffi::CString::new(a.as_bytes())).collect::<Result<Vec<_>, _>>()
    else {
        return crate::cli::fail(crate::cli::EXIT_INVALID, &"command contains a NUL byte");
    };
    // SAFETY: the child only calls async-signal-safe functions (write to cgroup.procs via open/write,
    // setgroups/setgid/setuid, execvp) before exec or _exit; no allocation-dependent locks are taken
    // after fork beyond what std's fs calls do, and the parent is single-threaded here.
    match unsafe { fork() } {
        Ok(ForkResult::Child) => {
            let fail = |msg: &str| -> ! {
                let _ = std::io::stderr().write_all(msg.as_bytes());
                // SAFETY: _exit is async-signal-safe and skips destructors shared with the parent.
                unsafe { libc::_exit(126) }
            };
            if enter(path, std::process::id()).is_err() {
                fail("warden exec: cannot enter the cgroup\n");
            }
            if let Some(u) = user {
                let groups = nix::unistd::getgrouplist(
                    &std::ffi::CString::new(u.name.as_bytes()).unwrap_or_default(),
                    u.gid,
                )
                .unwrap_or_else(|_| vec![u.gid]);
                if nix::unistd::setgroups(&groups).is_err()
                    || nix::unistd::setgid(u.gid).is_err()
                    || nix::unistd::setuid(u.uid).is_err()
                {
                    fail("warden exec: cannot drop privileges\n");
                }
                // No way back up: setuid/setgid binaries and file capabilities (crontab, at, su, ...) could
                // otherwise regain privileges and leave the tagged cgroup or hand work to untagged daemons.
                if nix::sys::prctl::set_no_new_privs().is_err() {
                    fail("warden exec: cannot set no_new_privs\n");
                }
                if restrict_sockets().is_err() {
                    fail("warden exec: cannot install the socket filter\n");
                }
                // SAFETY: single-threaded child before exec.
                unsafe {
                    std::env::set_var("HOME", &u.dir);
                    std::env::set_var("USER", &u.name);
                    std::env::set_var("LOGNAME", &u.name);
                }
            }
            let _ = nix::unistd::execvp(&argv[0], &argv);
            fail(&format!("warden exec: cannot run {}: not found or not executable\n", command[0]));
        }
        Ok(ForkResult::Parent { child }) => {
            forward_signals(child);
            loop {
                match waitpid(child, None) {
                    Ok(WaitStatus::Exited(_, code)) => return u8::try_from(code).unwrap_or(1),
                    Ok(WaitStatus::Signaled(_, sig, _)) => return 128u8.wrapping_add(sig as u8),
                    Ok(_) | Err(nix::Error::EINTR) => {}
                    Err(_) => return 1,
                }
            }
        }
        Err(e) => crate::cli::fail(crate::cli::EXIT_FAILED, &format!("fork: {e}")),
    }
}

/// A seccomp filter for `warden exec --user` commands: socket() only for the families the kernel programs
/// govern (Unix, IPv4, IPv6, netlink), so vsock (the hypervisor), packet, XDP, Bluetooth... are refused even
/// where BPF LSM is unavailable; io_uring_setup is refused since IORING_OP_SOCKET would not pass this
/// filter; 32-bit and x32 system calls (another way to call socket) are refused. ptrace, process_vm_writev
/// and pidfd_getfd are refused too: they would let the command take a connected socket from, or inject
/// code into, an untagged process of the same user (writing /proc/PID/mem still can: run each agent as its
/// own user). setsockopt of the options that route packets elsewhere (IPv6 routing, destination-options
/// and hop-by-hop headers, IPv4 options) is refused too (their ancillary forms are dropped by the kernel's
/// egress program). Everything else is allowed.
/// Inherited by every child and kept across exec. Builds no heap data (runs between fork and exec).
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
#[expect(
    clippy::cast_possible_truncation,
    reason = "classic BPF opcodes, system call numbers and address families are small positive constants"
)]
fn restrict_sockets() -> Result<(), ()> {
    #[cfg(target_arch = "x86_64")]
    const ARCH: u32 = 0xc000_003e; // AUDIT_ARCH_X86_64
    #[cfg(target_arch = "aarch64")]
    const ARCH: u32 = 0xc000_00b7; // AUDIT_ARCH_AARCH64
    const X32_BIT: u32 = 0x4000_0000;
    const LD: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
    const JEQ: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
    const JGE: u16 = (libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K) as u16;
    const RET: u16 = (libc::BPF_RET | libc::BPF_K) as u16;
    const ALLOW: u32 = libc::SECCOMP_RET_ALLOW;
    const EPERM: u32 = libc::SECCOMP_RET_ERRNO | libc::EPERM as u32;
    // struct seccomp_data: nr at 0, arch at 4, args[0] at 16 (its low 32 bits on little-endian).
    let stmt = |code: u16, k: u32| libc::sock_filter { code, jt: 0, jf: 0, k };
    let jump = |code: u16, k: u32, jt: u8, jf: u8| libc::sock_filter { code, jt, jf, k };
    let filter = [
        stmt(LD, 4),
        jump(JEQ, ARCH, 1, 0),
        stmt(RET, EPERM), // another ABI
        stmt(LD, 0),
        jump(JGE, X32_BIT, 0, 1),
        stmt(RET, EPERM), // x32
        jump(JEQ, libc::SYS_io_uring_setup as u32, 3, 0),
        jump(JEQ, libc::SYS_ptrace as u32, 2, 0),
        jump(JEQ, libc::SYS_process_vm_writev as u32, 1, 0),
        jump(JEQ, libc::SYS_pidfd_getfd as u32, 0, 1),
        stmt(RET, EPERM),
        // setsockopt(fd, level, optname, ...): options that route packets past the kernel hooks' judgement
        // (IPv6 routing/destination/hop-by-hop headers, old and new spellings; IPv4 options).
        jump(JEQ, libc::SYS_setsockopt as u32, 0, 17),
        stmt(LD, 24), // level
        jump(JEQ, libc::IPPROTO_IPV6 as u32, 0, 10),
        stmt(LD, 32),        // optname
        jump(JEQ, 3, 11, 0), // IPV6_2292HOPOPTS
        jump(JEQ, 4, 10, 0), // IPV6_2292DSTOPTS
        jump(JEQ, 5, 9, 0),  // IPV6_2292RTHDR
        jump(JEQ, 6, 8, 0),  // IPV6_2292PKTOPTIONS
        jump(JEQ, 54, 7, 0), // IPV6_HOPOPTS
        jump(JEQ, 55, 6, 0), // IPV6_RTHDRDSTOPTS
        jump(JEQ, 57, 5, 0), // IPV6_RTHDR
        jump(JEQ, 59, 4, 0), // IPV6_DSTOPTS
        stmt(RET, ALLOW),
        jump(JEQ, libc::IPPROTO_IP as u32, 0, 3),
        stmt(LD, 32),
        jump(JEQ, libc::IP_OPTIONS as u32, 0, 1),
        stmt(RET, EPERM),
        stmt(RET, ALLOW),
        jump(JEQ, libc::SYS_socket as u32, 1, 0),
        stmt(RET, ALLOW),
        stmt(LD, 16),
        jump(JEQ, libc::AF_UNIX as u32, 3, 0),
        jump(JEQ, libc::AF_INET as u32, 2, 0),
        jump(JEQ, libc::AF_INET6 as u32, 1, 0),
        jump(JEQ, libc::AF_NETLINK as u32, 0, 1),
        stmt(RET, ALLOW),
        stmt(RET, EPERM),
    ];
    let prog = libc::sock_fprog {
        len: u16::try_from(filter.len()).map_err(|_| ())?,
        filter: filter.as_ptr().cast_mut(),
    };
    // SAFETY: `prog` points at a valid filter that outlives the call; the kernel copies it.
    let rc = unsafe { libc::prctl(libc::PR_SET_SECCOMP, libc::SECCOMP_MODE_FILTER, &raw const prog, 0, 0) };
    if rc == 0 { Ok(()) } else { Err(()) }
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
fn restrict_sockets() -> Result<(), ()> {
    Ok(())
}

static CHILD: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

extern "C" fn forward(sig: libc::c_int) {
    let child = CHILD.load(std::sync::atomic::Ordering::Relaxed);
    if child > 0 {
        // SAFETY: kill is async-signal-safe.
        unsafe { libc::kill(child, sig) };
    }
}

fn forward_signals(child: nix::unistd::Pid) {
    use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
    CHILD.store(child.as_raw(), std::sync::atomic::Ordering::Relaxed);
    let action = SigAction::new(SigHandler::Handler(forward), SaFlags::SA_RESTART, SigSet::empty());
    for sig in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        // SAFETY: the handler only reads an atomic and calls kill.
        let _ = unsafe { sigaction(sig, &action) };
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
