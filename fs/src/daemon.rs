//! Process plumbing for the daemon: detaching once the mount or socket is live, telling
//! systemd it is ready, turning SIGINT/SIGTERM into a clean exit, and the vhost-user socket
//! with its lock.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixDatagram;

/// The end of the startup pipe the detached child reports through.
pub struct Detached {
    pipe: std::fs::File,
}

impl Detached {
    /// Tells the waiting parent that the mount or socket is live; it exits 0.
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
                    eprintln!("nixstorefs: the daemon exited before it was ready");
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

/// The vhost-user socket a VMM connects to, created by the daemon, and the lock that says
/// which daemon serves it. Both files are removed when this is dropped.
///
/// The lock is `SOCKET.pid`, holding the daemon's process id under an exclusive `flock`:
/// a second daemon asked for the same socket fails instead of taking it from a running one,
/// while a socket file left by a killed daemon (whose lock died with it) is replaced.
pub struct SocketFile {
    path: std::path::PathBuf,
    lock_path: std::path::PathBuf,
    _lock: std::fs::File,
}

impl SocketFile {
    /// Creates and listens on the socket at `path`: readable and writable by its owner
    /// only, or by `group` too when one is given. Errors name the path and the cause.
    pub fn listen(
        path: &std::path::Path,
        group: Option<&str>,
    ) -> Result<(vhost::vhost_user::Listener, SocketFile), String> {
        use std::os::unix::fs::OpenOptionsExt;
        let gid = group.map(group_id).transpose()?;
        // Only a socket is replaced: a regular file named by mistake is never deleted.
        match std::fs::symlink_metadata(path) {
            Ok(m) if !std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()) => {
                return Err(format!(
                    "{} exists and is not a socket; not replacing it",
                    path.display()
                ));
            }
            _ => {}
        }

        let mut lock_path = path.as_os_str().to_owned();
        lock_path.push(".pid");
        let lock_path = std::path::PathBuf::from(lock_path);
        let mut lock = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
            .open(&lock_path)
            .map_err(|e| format!("cannot create the lock file {}: {e}", lock_path.display()))?;
        if let Err(e) =
            rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive)
        {
            let mut pid = String::new();
            let _ = lock.read_to_string(&mut pid);
            return Err(if e == rustix::io::Errno::WOULDBLOCK {
                format!(
                    "socket {} is served by another daemon (pid {}, lock {})",
                    path.display(),
                    pid.trim(),
                    lock_path.display()
                )
            } else {
                format!("cannot lock {}: {e}", lock_path.display())
            });
        }
        // From here on the lock is ours: whatever fails, the lock file and any socket made
        // go with `file`.
        let file = SocketFile {
            path: path.to_path_buf(),
            lock_path,
            _lock: lock
                .try_clone()
                .map_err(|e| format!("cannot keep the lock: {e}"))?,
        };
        lock.set_len(0)
            .and_then(|()| lock.write_all(format!("{}\n", std::process::id()).as_bytes()))
            .map_err(|e| format!("cannot write {}: {e}", file.lock_path.display()))?;
        // The socket's mode comes from the umask at bind: no moment with wider permissions.
        let mask = if gid.is_some() { 0o117 } else { 0o177 };
        let old = rustix::process::umask(rustix::fs::Mode::from_bits_truncate(mask));
        // A socket file left by a daemon that was killed is replaced (its lock is free).
        let listener = vhost::vhost_user::Listener::new(path, true);
        rustix::process::umask(old);
        let listener = listener.map_err(|e| format!("cannot listen on {}: {e}", path.display()))?;
        if let Some(gid) = gid {
            rustix::fs::chown(path, None, Some(rustix::fs::Gid::from_raw(gid))).map_err(|e| {
                format!(
                    "cannot give socket {} to group {}: {e}",
                    path.display(),
                    group.unwrap_or_default()
                )
            })?;
        }
        Ok((listener, file))
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        let _ = std::fs::remove_file(&self.lock_path);
    }
}

/// The id of group `name` (or a number).
fn group_id(name: &str) -> Result<u32, String> {
    if let Ok(gid) = name.parse::<u32>() {
        return Ok(gid);
    }
    let c = std::ffi::CString::new(name).map_err(|_| format!("bad group name {name:?}"))?;
    // SAFETY: getgrnam returns a pointer to static storage or null; read at once. No other
    // thread calls it (startup is single-threaded).
    let group = unsafe { libc::getgrnam(c.as_ptr()) };
    if group.is_null() {
        return Err(format!("--socket-group: no group named {name:?}"));
    }
    // SAFETY: non-null, pointing at a valid struct group.
    Ok(unsafe { (*group).gr_gid })
}

/// A listening Unix socket inherited as descriptor `fd` (`--fd`), checked to be one.
pub fn inherited_listener(fd: i32) -> Result<vhost::vhost_user::Listener, String> {
    use std::os::fd::{BorrowedFd, FromRawFd};
    if fd < 0 {
        return Err(format!("--fd {fd}: not a descriptor"));
    }
    // SAFETY: only borrowed for the checks; fcntl fails cleanly on a closed descriptor.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    rustix::io::fcntl_getfd(borrowed).map_err(|e| format!("--fd {fd}: {e}"))?;
    let unix = rustix::net::sockopt::socket_domain(borrowed)
        .map(|d| d == rustix::net::AddressFamily::UNIX)
        .unwrap_or(false);
    let listening = rustix::net::sockopt::socket_acceptconn(borrowed).unwrap_or(false);
    if !unix || !listening {
        return Err(format!("--fd {fd}: not a listening Unix socket"));
    }
    // Not inherited further: the daemon starts no programs, but keep it that way.
    let _ = rustix::io::fcntl_setfd(borrowed, rustix::io::FdFlags::CLOEXEC);
    // SAFETY: the descriptor is open, a listening Unix socket, and ours from here on.
    Ok(unsafe { vhost::vhost_user::Listener::from_raw_fd(fd) })
}
