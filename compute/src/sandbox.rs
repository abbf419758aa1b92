//! Confining the VMM process once the VM is built: a seccomp allowlist (seccompiler)
//! and, when asked, a switch to an unprivileged user.
//!
//! What is done, in order, by [`crate::launch::vmm_main`] for the built-in runner:
//!
//! 1. Everything that needs a path or privilege happens first: `/dev/kvm`, guest
//!    memory, the TAPs (by name: `TUNSETIFF` needs CAP_NET_ADMIN; by fd: nothing), the
//!    disk connections (NBD sockets, files), the console log and socket.
//! 2. [`drop_privileges`] (`--user UID:GID`): `setgroups([])`, `setgid`, `setuid`, so a
//!    VMM that an escaped guest takes over runs as a user that owns nothing.
//! 3. [`apply_seccomp`]: from then on every thread (TSYNC) may make only the system
//!    calls of [`ALLOWED`]; anything else kills the process (`SIGSYS`), which the
//!    supervisor records as a crash. No `execve` or `bind`, `open` fails (EACCES, a
//!    second filter, [`open_filter`]: glibc's `free` may try one), and `socket` only
//!    for unix, IPv4 and IPv6 sockets: a compromised VMM cannot reach new files or
//!    programs. It can `connect`, because an NBD disk reconnects when the daemon
//!    restarts ([`crate::nbd`]); seccomp cannot look at the address, so the user
//!    (`--user`) and the socket's permissions are what limit where to.
//!    `BASALT_VMM_SECCOMP=log` logs violations instead of killing (for finding a
//!    missing call); `=off` disables the filter.
//!
//! The QEMU runner relies on QEMU's own `-sandbox on,...` (QEMU's seccomp filter), and
//! the `basalt vmm` parent that drives it over QMP stays unfiltered (it must spawn and
//! reap QEMU).

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use std::collections::BTreeMap;

/// Why confinement failed.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// Building or installing the filter failed.
    #[error("seccomp: {0}")]
    Seccomp(String),
    /// A set*id call failed.
    #[error("cannot switch to uid {uid} gid {gid}: {source}")]
    Privileges {
        /// Target user.
        uid: u32,
        /// Target group.
        gid: u32,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

/// The system calls a running VMM makes: vCPU and device threads (KVM ioctls, epoll,
/// eventfds, futexes), guest memory (madvise for the balloon), disks (io_uring, NBD
/// sockets already connected), the TAPs, the console socket (accept), new device
/// worker threads when a driver (re)activates a device, and exiting. Plus, for NBD
/// reconnections, `connect` and socket options; `socket` itself is in [`SOCKET_FAMILIES`].
pub const ALLOWED: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_lseek,
    libc::SYS_close,
    libc::SYS_ioctl,
    libc::SYS_fcntl,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_pwait2,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_eventfd2,
    libc::SYS_futex,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_nanosleep,
    libc::SYS_clock_nanosleep,
    libc::SYS_clock_gettime,
    libc::SYS_gettimeofday,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mprotect,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_sigaltstack,
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigtimedwait,
    libc::SYS_tgkill,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_prctl,
    libc::SYS_getrandom,
    libc::SYS_accept4,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_shutdown,
    libc::SYS_connect,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    libc::SYS_getpeername,
    libc::SYS_getsockname,
    // Only to fail with EACCES: see `open_filter`.
    libc::SYS_open,
    libc::SYS_openat,
    libc::SYS_io_uring_enter,
    libc::SYS_restart_syscall,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// The address families `socket` may create (an NBD disk reconnecting over a unix
/// socket or TCP).
pub const SOCKET_FAMILIES: &[i32] = &[libc::AF_UNIX, libc::AF_INET, libc::AF_INET6];

/// The filter as BPF: [`ALLOWED`] allowed, `socket` for [`SOCKET_FAMILIES`], everything
/// else `action`.
pub fn filter(action: SeccompAction) -> Result<BpfProgram, SandboxError> {
    let bad = |e: seccompiler::BackendError| SandboxError::Seccomp(e.to_string());
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        ALLOWED.iter().map(|&s| (s, Vec::new())).collect();
    let mut socket = Vec::new();
    for &family in SOCKET_FAMILIES {
        let cond =
            SeccompCondition::new(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, family as u64)
                .map_err(bad)?;
        socket.push(SeccompRule::new(vec![cond]).map_err(bad)?);
    }
    rules.insert(libc::SYS_socket, socket);
    let f = SeccompFilter::new(rules, action, SeccompAction::Allow, TargetArch::x86_64)
        .map_err(|e| SandboxError::Seccomp(e.to_string()))?;
    f.try_into()
        .map_err(|e: seccompiler::BackendError| SandboxError::Seccomp(e.to_string()))
}

/// The second filter: `open` and `openat` fail with `EACCES`, everything else passes
/// (to [`filter`], which allows them; the kernel takes the stricter answer).
///
/// A VMM opens nothing once confined, but glibc does behind our back: `free` that
/// shrinks a thread's heap arena reads `/proc/sys/vm/overcommit_memory` once (seen
/// after an NBD reconnection freed its replay log), and copes when that fails. Failing
/// the call keeps files out of reach without killing the VM for it.
pub fn open_filter() -> Result<BpfProgram, SandboxError> {
    let rules: BTreeMap<i64, Vec<SeccompRule>> = [libc::SYS_open, libc::SYS_openat]
        .iter()
        .map(|&s| (s, Vec::new()))
        .collect();
    let f = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EACCES as u32),
        TargetArch::x86_64,
    )
    .map_err(|e| SandboxError::Seccomp(e.to_string()))?;
    f.try_into()
        .map_err(|e: seccompiler::BackendError| SandboxError::Seccomp(e.to_string()))
}

/// Installs the filters on every thread of the process (see the module docs for
/// `BASALT_VMM_SECCOMP`). Returns whether a filter was installed.
pub fn apply_seccomp() -> Result<bool, SandboxError> {
    let action = match std::env::var("BASALT_VMM_SECCOMP").as_deref() {
        Ok("off") => return Ok(false),
        Ok("log") => SeccompAction::Log,
        _ => SeccompAction::KillProcess,
    };
    let prog = filter(action)?;
    let opens = open_filter()?;
    // The open filter first: once the allowlist is in, `seccomp` itself is refused.
    seccompiler::apply_filter_all_threads(&opens)
        .map_err(|e| SandboxError::Seccomp(e.to_string()))?;
    seccompiler::apply_filter_all_threads(&prog)
        .map_err(|e| SandboxError::Seccomp(e.to_string()))?;
    Ok(true)
}

/// Switches the whole process to `uid`/`gid` with no supplementary groups.
pub fn drop_privileges(uid: u32, gid: u32) -> Result<(), SandboxError> {
    let err = |source| SandboxError::Privileges { uid, gid, source };
    // SAFETY: plain system calls with valid arguments; libc's set*id wrappers apply the
    // change to every thread of the process.
    unsafe {
        if libc::setgroups(0, std::ptr::null()) != 0 {
            return Err(err(std::io::Error::last_os_error()));
        }
        if libc::setgid(gid) != 0 {
            return Err(err(std::io::Error::last_os_error()));
        }
        if libc::setuid(uid) != 0 {
            return Err(err(std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_builds() {
        let prog = filter(SeccompAction::KillProcess).expect("filter");
        assert!(prog.len() > ALLOWED.len());
        assert!(!open_filter().expect("open filter").is_empty());
    }
}
