//! Process plumbing for the daemon: detaching once the mount is live, telling systemd it is
//! ready, and turning SIGINT/SIGTERM into a clean unmount.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixDatagram;

/// The end of the startup pipe the detached child reports through.
pub struct Detached {
    pipe: std::fs::File,
}

impl Detached {
    /// Tells the waiting parent that the mount is live; it exits 0.
    pub fn ready(mut self) {
        let _ = self.pipe.write_all(&[0]);
    }

    /// Tells the waiting parent that startup failed; it prints `message` and exits `status`.
    pub fn failed(mut self, status: u8, message: &str) {
        let _ = self.pipe.write_all(&[status]);
        let _ = self.pipe.write_all(message.as_bytes());
    }
}

/// Forks. The parent waits until the child reports through [`Detached`] and exits with the
/// child's verdict; only the child returns, in a session of its own and in `/`. Must be
/// called before any thread is started.
pub fn detach() -> std::io::Result<Detached> {
    let (read, write) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
    // SAFETY: called while the process is single-threaded (checked by the caller's design:
    // nothing before mounting starts a thread), so the child may run arbitrary code.
    match unsafe { libc::fork() } {
        -1 => Err(std::io::Error::last_os_error()),
        0 => {
            drop(read);
            // A session of its own: the daemon must not die with the shell that started it.
            let _ = rustix::process::setsid();
            // Nor keep the directory it was started in busy: that filesystem could not be
            // unmounted while the daemon runs.
            std::env::set_current_dir("/")?;
            Ok(Detached {
                pipe: std::fs::File::from(write),
            })
        }
        _child => {
            drop(write);
            let mut report = Vec::new();
            let _ = std::fs::File::from(read).read_to_end(&mut report);
            match report.split_first() {
                Some((0, _)) => std::process::exit(0),
                Some((status, message)) => {
                    eprintln!("nixstorefs: {}", String::from_utf8_lossy(message));
                    std::process::exit(i32::from(*status));
                }
                None => {
                    eprintln!("nixstorefs: the daemon exited before the mount was ready");
                    std::process::exit(1);
                }
            }
        }
    }
}

/// Points standard input and output (and error, unless `keep_stderr`) at /dev/null, so a
/// detached daemon holds no terminal or pipe of the process that started it.
pub fn close_stdio(keep_stderr: bool) -> std::io::Result<()> {
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")?;
    let mut targets = vec![0, 1];
    if !keep_stderr {
        targets.push(2);
    }
    for fd in targets {
        // SAFETY: dup2 onto the standard descriptors, which stay open for the process's life.
        if unsafe { libc::dup2(null.as_raw_fd(), fd) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Sends `READY=1` to systemd when it asked for notification (`NOTIFY_SOCKET`).
pub fn notify_ready() {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let result = (|| -> std::io::Result<()> {
        let socket = UnixDatagram::unbound()?;
        let bytes = std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str());
        if let Some(abstract_name) = bytes.strip_prefix(b"@") {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(abstract_name)?;
            socket.send_to_addr(b"READY=1", &addr)?;
        } else {
            socket.send_to(b"READY=1", &path)?;
        }
        Ok(())
    })();
    if let Err(e) = result {
        tracing::warn!(
            "cannot notify systemd through {}: {e}",
            path.to_string_lossy()
        );
    }
}

/// Blocks SIGINT, SIGTERM and SIGHUP in the calling thread and every thread it starts after
/// this, and returns a waiter for them: the signals are taken by one thread with `sigwait`
/// instead of interrupting request threads.
pub fn block_signals() -> SignalWaiter {
    // SAFETY: plain sigset manipulation on a local set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, sig);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        SignalWaiter { set }
    }
}

/// Waits for the signals blocked by [`block_signals`].
pub struct SignalWaiter {
    set: libc::sigset_t,
}

// SAFETY: a sigset_t is plain data.
unsafe impl Send for SignalWaiter {}

impl SignalWaiter {
    /// Waits for the next blocked signal and returns its number.
    pub fn wait(&self) -> i32 {
        let mut sig = 0;
        // SAFETY: `set` is a valid signal set and `sig` a valid out pointer.
        unsafe { libc::sigwait(&self.set, &mut sig) };
        sig
    }
}

/// Lazily detaches the mount at `path`, for when a plain unmount fails because it is busy.
pub fn detach_mount(path: &std::path::Path) -> std::io::Result<()> {
    rustix::mount::unmount(path, rustix::mount::UnmountFlags::DETACH).map_err(Into::into)
}
