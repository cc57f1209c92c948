//! Helper processes: small children forked before the sandbox to do, later, what the
//! sandboxed daemon may not (remove its socket, unmount, keep its garbage collector roots).

use std::os::fd::RawFd;

/// Makes a freshly forked child a helper: every signal blocked (a terminal's or a service
/// manager's signal to the process group must not end it before its job), every
/// descriptor closed but `keep`, so that it holds no terminal, no pipe whoever started the
/// daemon waits on, and nothing of the daemon's (`/dev/fuse`, the listening socket, the
/// other helpers' pipes: their ends must close when the daemon dies). Only
/// async-signal-safe calls.
///
/// # Safety
///
/// To be called in the child of a fork, before anything else, and no Rust object of the
/// child may use (or drop) a descriptor closed here afterwards. `keep` must be sorted.
pub unsafe fn become_helper(keep: &[RawFd]) {
    debug_assert!(keep.windows(2).all(|w| w[0] < w[1]));
    // SAFETY: signal-set calls on a local set, and close_range on whole ranges of this
    // process's descriptor table, which the caller promises nothing uses any more.
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_BLOCK, &all, std::ptr::null_mut());
        let mut first = 0u32;
        for &fd in keep {
            let fd = fd as u32;
            if fd > first {
                libc::syscall(libc::SYS_close_range, first, fd - 1, 0u32);
            }
            first = fd + 1;
        }
        libc::syscall(libc::SYS_close_range, first, u32::MAX, 0u32);
    }
}
