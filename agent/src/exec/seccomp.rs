//! A seccomp filter for `warden exec --user` commands: socket() only for the families the kernel programs
//! govern (Unix, IPv4, IPv6, netlink), so vsock (the hypervisor), packet, XDP, Bluetooth... are refused even
//! where BPF LSM is unavailable; io_uring_setup is refused since IORING_OP_SOCKET would not pass this
//! filter; 32-bit and x32 system calls (another way to call socket) are refused. ptrace, process_vm_writev
//! and pidfd_getfd are refused too: they would let the command take a connected socket from, or inject
//! code into, an untagged process of the same user (writing /proc/PID/mem still can: run each agent as its
//! own user). Everything else is allowed.
//! Inherited by every child and kept across exec. Built before the fork; installing it allocates nothing.

/// The filter's instructions, held inline (no heap).
pub struct Filter {
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    program: [libc::sock_filter; 20],
}

#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
impl Filter {
    #[expect(
        clippy::cast_possible_truncation,
        reason = "classic BPF opcodes, system call numbers and address families are small positive constants"
    )]
    pub fn new() -> Self {
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
        let program = [
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
        Self { program }
    }

    /// Installs the filter on the calling thread (between fork and exec: a system call, no allocation).
    pub fn install(&self) -> Result<(), ()> {
        #[expect(clippy::cast_possible_truncation, reason = "the program has 20 instructions")]
        let prog =
            libc::sock_fprog { len: self.program.len() as u16, filter: self.program.as_ptr().cast_mut() };
        // SAFETY: `prog` points at a valid filter that outlives the call; the kernel copies it.
        let rc =
            unsafe { libc::prctl(libc::PR_SET_SECCOMP, libc::SECCOMP_MODE_FILTER, &raw const prog, 0, 0) };
        if rc == 0 { Ok(()) } else { Err(()) }
    }
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
impl Filter {
    pub fn new() -> Self {
        Self {}
    }

    pub fn install(&self) -> Result<(), ()> {
        Ok(())
    }
}
