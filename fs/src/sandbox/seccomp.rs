//! The seccomp part of the sandbox: an allow-list of system calls.
//!
//! The list is what serving needs and nothing more: reading the store through held
//! descriptors, the vhost-user socket and its eventfds (or `/dev/fuse`), memory, threads,
//! signals and time. Calls that are harmless only in one form are checked by argument:
//! `openat` may not ask for writing, creating or truncating (except for the FUSE daemon,
//! whose request threads reopen `/dev/fuse` read-write; Landlock confines that to the
//! device), `accept4` only takes from the VMM's listening socket, `clone` only makes
//! threads, `prctl` only names them (or reads the auxiliary vector), `ioctl` only speaks
//! to `/dev/fuse` and asks whether a descriptor is non-blocking. Notably absent: `execve`, `socket`, `connect`, `bind`,
//! `ptrace`, `mount`, `umount2`, `unlink*`, `rename*`, `mkdir*`, `pwrite*`, `ftruncate`,
//! `chmod`/`chown` of any kind, `openat2`. (The FUSE daemon's `umount2` is answered
//! `EINVAL` rather than allowed: its FUSE library unmounts again when its session ends,
//! after the unmounter process has; Landlock would refuse it anyway.)
//!
//! The FUSE daemon may also enter its io_uring rings (`io_uring_enter`) and pin its own
//! threads (`sched_setaffinity` of itself); the rings exist before the filter and accept
//! only FUSE commands (see `transport::fuse_uring`).
//!
//! `clone3` cannot be checked by argument (its flags are in memory), so it fails with
//! `ENOSYS` (a second, allowing filter that only answers that call), and the C library
//! falls back to `clone`, whose flags are checked.
//!
//! The filter is compiled by `seccompiler`, rust-vmm's pure-Rust BPF compiler (no
//! libseccomp to link), and synchronised to every thread of the process.

use std::collections::BTreeMap;
use std::os::fd::RawFd;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use super::{Profile, SeccompMode};

#[cfg(target_arch = "x86_64")]
const ARCH: TargetArch = TargetArch::x86_64;
#[cfg(target_arch = "aarch64")]
const ARCH: TargetArch = TargetArch::aarch64;
#[cfg(target_arch = "riscv64")]
const ARCH: TargetArch = TargetArch::riscv64;

/// `openat` flags that would write, create or truncate (`O_TMPFILE` is `__O_TMPFILE |
/// O_DIRECTORY`; its own bit is enough).
const WRITE_FLAGS: u64 =
    (libc::O_WRONLY | libc::O_RDWR | libc::O_CREAT | libc::O_TRUNC | libc::O_APPEND) as u64
        | 0o20000000;

/// `/dev/fuse` ioctls (linux/fuse.h): clone a queue, open and close a passthrough backing
/// file.
const FUSE_DEV_IOC_CLONE: u64 = 0x8004_e500;
const FUSE_DEV_IOC_BACKING_OPEN: u64 = 0x4010_e501;
const FUSE_DEV_IOC_BACKING_CLOSE: u64 = 0x4004_e502;

/// `prctl(PR_GET_AUXV)` (linux/prctl.h, Linux 6.4).
const PR_GET_AUXV: u64 = 0x4155_5856;

/// System calls allowed with any arguments, for both transports.
const ALWAYS: &[libc::c_long] = &[
    // Reading the store through held descriptors.
    libc::SYS_read,
    libc::SYS_readv,
    libc::SYS_pread64,
    libc::SYS_preadv,
    libc::SYS_preadv2,
    libc::SYS_lseek,
    libc::SYS_getdents64,
    libc::SYS_statx,
    libc::SYS_newfstatat,
    libc::SYS_fstat,
    libc::SYS_fstatfs,
    libc::SYS_readlinkat,
    libc::SYS_name_to_handle_at,
    libc::SYS_fcntl,
    libc::SYS_close,
    libc::SYS_dup,
    // Replies, logs and eventfds (Landlock and the read-only opens keep these off files).
    libc::SYS_write,
    libc::SYS_writev,
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_shutdown,
    libc::SYS_getsockopt,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_eventfd2,
    libc::SYS_poll,
    libc::SYS_ppoll,
    // Memory: guest memory regions, thread stacks, the allocator, file mappings.
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_brk,
    // Threads, synchronisation and signals.
    libc::SYS_futex,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_sched_getaffinity,
    libc::SYS_sched_yield,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_getuid,
    libc::SYS_geteuid,
    libc::SYS_getgid,
    libc::SYS_getegid,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigtimedwait,
    libc::SYS_sigaltstack,
    // A panic's abort signals the process itself; Landlock scopes signals to it.
    libc::SYS_tgkill,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_restart_syscall,
    // Time and randomness (hash maps' seeds).
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_getrandom,
];

/// More for the FUSE daemon: its request threads' `/dev/fuse` queues.
const FUSE_ONLY: &[libc::c_long] = &[libc::SYS_splice, libc::SYS_pipe2];

fn cond(arg: u8, op: SeccompCmpOp, value: u64) -> Result<SeccompCondition, String> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Qword, op, value).map_err(|e| e.to_string())
}

fn rule(conditions: Vec<SeccompCondition>) -> Result<SeccompRule, String> {
    SeccompRule::new(conditions).map_err(|e| e.to_string())
}

/// The allow-list of `profile`, as seccompiler rules: an empty rule list allows the call
/// whatever its arguments; otherwise any one matching rule does.
fn rules(
    profile: Profile,
    listener: Option<RawFd>,
) -> Result<BTreeMap<i64, Vec<SeccompRule>>, String> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for &call in ALWAYS {
        rules.insert(call, Vec::new());
    }
    // openat: read-only, unless the FUSE daemon opens /dev/fuse (Landlock allows no other
    // file to be opened for writing).
    let openat = match profile {
        Profile::VirtioFs => vec![rule(vec![cond(
            2,
            SeccompCmpOp::MaskedEq(WRITE_FLAGS),
            0,
        )?])?],
        Profile::Fuse => Vec::new(),
    };
    rules.insert(libc::SYS_openat, openat);
    // Threads only: a clone that makes a process (fork) is refused.
    rules.insert(
        libc::SYS_clone,
        vec![rule(vec![cond(
            0,
            SeccompCmpOp::MaskedEq(libc::CLONE_THREAD as u64),
            libc::CLONE_THREAD as u64,
        )?])?],
    );
    // Allowed here, but the first filter answers it ENOSYS (an errno outranks an allow
    // among stacked filters); without this entry the allow-list's kill would outrank both.
    rules.insert(libc::SYS_clone3, Vec::new());
    if profile == Profile::Fuse {
        // Likewise answered EINVAL by a filter of its own (see `compile`).
        rules.insert(libc::SYS_umount2, Vec::new());
    }
    // Naming threads, and reading the auxiliary vector (rustix asks for the page size
    // that way).
    rules.insert(
        libc::SYS_prctl,
        vec![
            rule(vec![cond(0, SeccompCmpOp::Eq, libc::PR_SET_NAME as u64)?])?,
            rule(vec![cond(0, SeccompCmpOp::Eq, libc::PR_GET_NAME as u64)?])?,
            rule(vec![cond(0, SeccompCmpOp::Eq, PR_GET_AUXV)?])?,
        ],
    );
    // ioctl: FIONBIO (vhost-user sets its socket non-blocking), and /dev/fuse's own.
    let mut ioctls = vec![rule(vec![cond(1, SeccompCmpOp::Eq, libc::FIONBIO)?])?];
    if profile == Profile::Fuse {
        for request in [
            FUSE_DEV_IOC_CLONE,
            FUSE_DEV_IOC_BACKING_OPEN,
            FUSE_DEV_IOC_BACKING_CLOSE,
        ] {
            ioctls.push(rule(vec![cond(1, SeccompCmpOp::Eq, request)?])?);
        }
        for &call in FUSE_ONLY {
            rules.insert(call, Vec::new());
        }
        // FUSE over io_uring: each ring queue's thread waits for requests and commits
        // replies with io_uring_enter. The rings are made before the sandbox, restricted
        // to the FUSE command and a poll (seccomp cannot see what a ring carries, so the
        // ring itself refuses anything else); io_uring_setup and io_uring_register stay
        // forbidden, so no other ring can appear and these cannot change.
        rules.insert(libc::SYS_io_uring_enter, Vec::new());
        // And pins itself to its CPU: only the calling thread (pid 0), never another
        // process.
        rules.insert(
            libc::SYS_sched_setaffinity,
            vec![rule(vec![cond(0, SeccompCmpOp::Eq, 0)?])?],
        );
    }
    rules.insert(libc::SYS_ioctl, ioctls);
    // The VMM's connection is taken from the listening socket only.
    if let Some(fd) = listener {
        rules.insert(
            libc::SYS_accept4,
            vec![rule(vec![cond(0, SeccompCmpOp::Eq, fd as u64)?])?],
        );
    }
    Ok(rules)
}

/// Compiles the allow-list of `profile` with `mode`'s action for anything else.
pub fn compile(
    profile: Profile,
    mode: SeccompMode,
    listener: Option<RawFd>,
) -> Result<Vec<BpfProgram>, String> {
    let otherwise = match mode {
        SeccompMode::Kill => SeccompAction::KillProcess,
        SeccompMode::Log => SeccompAction::Log,
        SeccompMode::None => return Ok(Vec::new()),
    };
    let allow_list = SeccompFilter::new(
        rules(profile, listener)?,
        otherwise,
        SeccompAction::Allow,
        ARCH,
    )
    .map_err(|e| e.to_string())?;
    // clone3 answers ENOSYS, so that thread creation falls back to the checkable clone;
    // everything else passes this filter (the allow-list above still applies).
    let no_clone3 = SeccompFilter::new(
        BTreeMap::from([(libc::SYS_clone3, Vec::new())]),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        ARCH,
    )
    .map_err(|e| e.to_string())?;
    let mut filters = vec![no_clone3];
    if profile == Profile::Fuse {
        // The FUSE library unmounts when its session ends, after the unmounter process
        // already has; umount2 answers EINVAL ("not mounted") instead of killing, so that
        // it does not go on to run fusermount3.
        filters.push(
            SeccompFilter::new(
                BTreeMap::from([(libc::SYS_umount2, Vec::new())]),
                SeccompAction::Allow,
                SeccompAction::Errno(libc::EINVAL as u32),
                ARCH,
            )
            .map_err(|e| e.to_string())?,
        );
    }
    // In this order: installing a filter takes prctl and seccomp calls, which the
    // allow-list does not allow, so it goes last.
    filters.push(allow_list);
    let mut programs = Vec::new();
    for filter in filters {
        programs.push(BpfProgram::try_from(filter).map_err(|e| e.to_string())?);
    }
    Ok(programs)
}

/// Installs the filters on every thread of the process.
pub fn install(profile: Profile, mode: SeccompMode, listener: Option<RawFd>) -> Result<(), String> {
    for program in compile(profile, mode, listener)? {
        seccompiler::apply_filter_all_threads(&program).map_err(|e| e.to_string())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_profiles_compile() {
        for profile in [Profile::VirtioFs, Profile::Fuse] {
            for mode in [SeccompMode::Kill, SeccompMode::Log] {
                let programs = compile(profile, mode, Some(5)).unwrap();
                assert!(programs.len() >= 2);
                assert!(programs.iter().all(|p| !p.is_empty()));
            }
        }
        assert!(compile(Profile::VirtioFs, SeccompMode::None, None)
            .unwrap()
            .is_empty());
    }

    #[test]
    fn rings_cannot_be_made_or_changed_once_confined() {
        for profile in [Profile::VirtioFs, Profile::Fuse] {
            let allowed = rules(profile, Some(3)).unwrap();
            assert!(!allowed.contains_key(&libc::SYS_io_uring_setup));
            assert!(!allowed.contains_key(&libc::SYS_io_uring_register));
        }
        let fuse = rules(Profile::Fuse, None).unwrap();
        assert!(fuse.contains_key(&libc::SYS_io_uring_enter));
        // Only with an argument check: the calling thread's own affinity.
        assert_eq!(fuse[&libc::SYS_sched_setaffinity].len(), 1);
        let guest = rules(Profile::VirtioFs, Some(3)).unwrap();
        assert!(!guest.contains_key(&libc::SYS_io_uring_enter));
        assert!(!guest.contains_key(&libc::SYS_sched_setaffinity));
    }

    #[test]
    fn nothing_dangerous_is_allowed() {
        let allowed = rules(Profile::VirtioFs, Some(3)).unwrap();
        for call in [
            libc::SYS_execve,
            libc::SYS_execveat,
            libc::SYS_socket,
            libc::SYS_connect,
            libc::SYS_bind,
            libc::SYS_ptrace,
            libc::SYS_mount,
            libc::SYS_umount2,
            libc::SYS_unlinkat,
            libc::SYS_renameat2,
            libc::SYS_pwrite64,
            libc::SYS_ftruncate,
            libc::SYS_fchmod,
            libc::SYS_openat2,
        ] {
            assert!(
                !allowed.contains_key(&call),
                "system call {call} is allowed"
            );
        }
    }
}
