//! Running one command for `warden exec`: fork; the child joins the cgroup, drops to the user (with
//! no_new_privs and the socket filter of `seccomp.rs`) and execs; the parent waits for it, forwarding
//! SIGINT, SIGTERM and SIGHUP. Everything the child needs is prepared before the fork, so the child only
//! makes system calls (no allocation, no lock) between fork and exec.

mod seccomp;

use std::ffi::{CString, OsStr};
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Path, PathBuf};

/// Who the command runs as, resolved before the fork.
#[derive(Debug, Clone)]
pub struct RunAs {
    pub user: nix::unistd::User,
}

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("no such user `{0}`")]
    NoSuchUser(String),
    #[error("{what} contains a NUL byte")]
    NulByte { what: &'static str },
    #[error("cannot run {0}: not found or not executable")]
    NotFound(String),
    #[error("the supplementary groups of `{user}`: {source}")]
    Groups {
        user: String,
        #[source]
        source: nix::Error,
    },
    #[error("warden exec must fork from a single-threaded process (it has {0} threads)")]
    Threaded(usize),
    #[error("fork: {0}")]
    Fork(#[source] nix::Error),
    #[error("waiting for the command: {0}")]
    Wait(#[source] nix::Error),
}

/// Looks a user up by name or uid.
pub fn lookup_user(spec: &str) -> Result<RunAs, ExecError> {
    let found = match spec.parse::<u32>() {
        Ok(uid) => nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)),
        Err(_) => nix::unistd::User::from_name(spec),
    };
    found.ok().flatten().map(|user| RunAs { user }).ok_or_else(|| ExecError::NoSuchUser(spec.to_owned()))
}

/// What the child does between fork and exec, all of it allocated before the fork.
struct Prepared {
    procs: CString,
    /// Where the program may be, in PATH order; the child tries each as execvp would (the user it runs as
    /// may not reach the first one root sees).
    candidates: Vec<CString>,
    /// Owns what `argv_ptrs` points at.
    _argv: Vec<CString>,
    argv_ptrs: Vec<*const libc::c_char>,
    /// Owns what `env_ptrs` points at.
    _env: Vec<CString>,
    env_ptrs: Vec<*const libc::c_char>,
    drop_to: Option<Credentials>,
    filter: seccomp::Filter,
    not_found: Vec<u8>,
}

struct Credentials {
    groups: Vec<libc::gid_t>,
    uid: libc::uid_t,
    gid: libc::gid_t,
}

fn cstring(what: &'static str, bytes: &[u8]) -> Result<CString, ExecError> {
    CString::new(bytes).map_err(|_| ExecError::NulByte { what })
}

/// The paths `command[0]` may be at, as execvp would try them: itself when it has a slash, else each
/// PATH directory joined with it.
fn candidates(name: &str) -> Vec<PathBuf> {
    if name.contains('/') {
        return vec![PathBuf::from(name)];
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/bin:/usr/bin".into());
    std::env::split_paths(&path).filter(|d| !d.as_os_str().is_empty()).map(|d| d.join(name)).collect()
}

impl Prepared {
    fn new(cgroup: &Path, run_as: Option<&RunAs>, command: &[String]) -> Result<Self, ExecError> {
        let first = command.first().ok_or_else(|| ExecError::NotFound(String::new()))?;
        let candidates = candidates(first)
            .iter()
            .map(|p| cstring("the program path", p.as_os_str().as_bytes()))
            .collect::<Result<Vec<_>, _>>()?;
        if candidates.is_empty() {
            return Err(ExecError::NotFound(first.clone()));
        }
        let argv =
            command.iter().map(|a| cstring("the command", a.as_bytes())).collect::<Result<Vec<_>, _>>()?;
        let mut vars: Vec<(Vec<u8>, Vec<u8>)> =
            std::env::vars_os().map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec())).collect();
        let drop_to = match run_as {
            Some(RunAs { user }) => {
                let name = cstring("the user name", user.name.as_bytes())?;
                let groups = nix::unistd::getgrouplist(&name, user.gid)
                    .map_err(|source| ExecError::Groups { user: user.name.clone(), source })?;
                for (k, v) in [
                    ("HOME", user.dir.as_os_str()),
                    ("USER", OsStr::new(&user.name)),
                    ("LOGNAME", OsStr::new(&user.name)),
                ] {
                    vars.retain(|(key, _)| key != k.as_bytes());
                    vars.push((k.as_bytes().to_vec(), v.as_bytes().to_vec()));
                }
                Some(Credentials {
                    groups: groups.iter().map(|g| g.as_raw()).collect(),
                    uid: user.uid.as_raw(),
                    gid: user.gid.as_raw(),
                })
            }
            None => None,
        };
        let env = vars
            .into_iter()
            .map(|(mut k, v)| {
                k.push(b'=');
                k.extend(v);
                cstring("the environment", &k)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let ptrs = |v: &[CString]| v.iter().map(|c| c.as_ptr()).chain([std::ptr::null()]).collect();
        Ok(Self {
            procs: cstring("the cgroup path", cgroup.join("cgroup.procs").as_os_str().as_bytes())?,
            candidates,
            argv_ptrs: ptrs(&argv),
            _argv: argv,
            env_ptrs: ptrs(&env),
            _env: env,
            drop_to,
            filter: seccomp::Filter::new(),
            not_found: format!("warden exec: cannot run {first}: not found or not executable\n").into_bytes(),
        })
    }

    /// The child's side: system calls only, on data prepared before the fork. Never returns.
    fn child(&self) -> ! {
        fn fail(msg: &[u8]) -> ! {
            // SAFETY: write(2) and _exit(2) are async-signal-safe; `msg` is valid for its length.
            unsafe {
                libc::write(2, msg.as_ptr().cast(), msg.len());
                libc::_exit(126)
            }
        }
        // Writing 0 to cgroup.procs moves the writing process: the child joins the cgroup before it execs.
        // SAFETY: `procs` is a NUL-terminated path that outlives the calls; the buffer is one valid byte.
        let joined = unsafe {
            let fd = libc::open(self.procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            let ok = fd >= 0 && libc::write(fd, b"0".as_ptr().cast(), 1) == 1;
            if fd >= 0 {
                libc::close(fd);
            }
            ok
        };
        if !joined {
            fail(b"warden exec: cannot enter the cgroup\n");
        }
        if let Some(d) = &self.drop_to {
            // SAFETY: setgroups/setgid/setuid are async-signal-safe system calls; `groups` is a valid slice.
            let dropped = unsafe {
                libc::setgroups(d.groups.len(), d.groups.as_ptr()) == 0
                    && libc::setgid(d.gid) == 0
                    && libc::setuid(d.uid) == 0
            };
            if !dropped {
                fail(b"warden exec: cannot drop privileges\n");
            }
            // No way back up: setuid/setgid binaries and file capabilities (crontab, at, su, ...) could
            // otherwise regain privileges and leave the tagged cgroup or hand work to untagged daemons.
            // SAFETY: prctl(PR_SET_NO_NEW_PRIVS) takes no pointers.
            if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
                fail(b"warden exec: cannot set no_new_privs\n");
            }
            if self.filter.install().is_err() {
                fail(b"warden exec: cannot install the socket filter\n");
            }
        }
        for program in &self.candidates {
            // SAFETY: `program` and the NULL-terminated `argv_ptrs`/`env_ptrs` point into CStrings owned by
            // `self`, alive until exec replaces the process image. On failure execve returns and the next
            // candidate is tried.
            unsafe { libc::execve(program.as_ptr(), self.argv_ptrs.as_ptr(), self.env_ptrs.as_ptr()) };
        }
        fail(&self.not_found)
    }
}

/// Runs `command` in `cgroup` (as `run_as`, when given) and returns its exit status (128 + the signal when
/// it was killed by one). Must be called from a single-threaded process: the child of a fork must not take
/// a lock another thread held, and it allocates nothing.
pub fn run(cgroup: &Path, run_as: Option<&RunAs>, command: &[String]) -> Result<u8, ExecError> {
    use nix::sys::wait::{WaitStatus, waitpid};
    use nix::unistd::{ForkResult, fork};
    let prepared = Prepared::new(cgroup, run_as, command)?;
    let threads = std::fs::read_dir("/proc/self/task").map_or(1, Iterator::count);
    if threads != 1 {
        return Err(ExecError::Threaded(threads));
    }
    // SAFETY: the process is single-threaded (checked just above), and the child only makes system calls
    // on memory prepared before the fork (`Prepared::child`): no allocation, no lock, then exec or _exit.
    match unsafe { fork() } {
        Ok(ForkResult::Child) => prepared.child(),
        Ok(ForkResult::Parent { child }) => {
            forward_signals(child);
            loop {
                match waitpid(child, None) {
                    Ok(WaitStatus::Exited(_, code)) => return Ok(u8::try_from(code).unwrap_or(1)),
                    Ok(WaitStatus::Signaled(_, sig, _)) => return Ok(128u8.wrapping_add(sig as u8)),
                    Ok(_) | Err(nix::Error::EINTR) => {}
                    Err(e) => return Err(ExecError::Wait(e)),
                }
            }
        }
        Err(e) => Err(ExecError::Fork(e)),
    }
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
    fn program_paths_are_listed_before_the_fork() {
        assert_eq!(candidates("/bin/sh"), vec![PathBuf::from("/bin/sh")]);
        assert_eq!(candidates("./run"), vec![PathBuf::from("./run")]);
        let all = candidates("sh");
        assert!(!all.is_empty() && all.iter().all(|p| p.ends_with("sh")), "{all:?}");
    }
}
