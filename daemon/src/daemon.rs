//! Process plumbing for the daemon: detaching once the mount or socket is live, telling
//! systemd it is ready, the vhost-user socket with its lock, and the helper processes
//! forked before the sandbox (the clean-up process, the unmounter).

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

/// systemd's readiness notification (`NOTIFY_SOCKET`), connected in advance: the
/// sandbox allows no new sockets, so the socket is made (and connected) before it is
/// entered and only written to afterwards.
pub struct Notifier {
    socket: Option<UnixDatagram>,
}

impl Notifier {
    /// Connects to `NOTIFY_SOCKET` when systemd asked for notification; a socket that
    /// cannot be reached is said once here and readiness is then not sent.
    pub fn from_env() -> Self {
        let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
            return Notifier { socket: None };
        };
        let connected = (|| -> std::io::Result<UnixDatagram> {
            let socket = UnixDatagram::unbound()?;
            let bytes = std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str());
            if let Some(abstract_name) = bytes.strip_prefix(b"@") {
                use std::os::linux::net::SocketAddrExt;
                let addr = std::os::unix::net::SocketAddr::from_abstract_name(abstract_name)?;
                socket.connect_addr(&addr)?;
            } else {
                socket.connect(&path)?;
            }
            Ok(socket)
        })();
        match connected {
            Ok(socket) => Notifier {
                socket: Some(socket),
            },
            Err(e) => {
                tracing::warn!(
                    "cannot notify systemd through {}: {e}",
                    path.to_string_lossy()
                );
                Notifier { socket: None }
            }
        }
    }

    /// Sends `READY=1`, if systemd asked for it.
    pub fn ready(&self) {
        if let Some(socket) = &self.socket {
            if let Err(e) = socket.send(b"READY=1") {
                tracing::warn!("cannot notify systemd: {e}");
            }
        }
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
    /// Whether dropping this removes the files (not once [`SocketFile::leave_removal`]
    /// handed that to a [`Cleanup`]).
    armed: bool,
}

impl SocketFile {
    /// Creates and listens on the socket at `path`: readable and writable by its owner
    /// only, or by `group` too when one is given. Errors name the path and the cause.
    ///
    /// Nothing that may belong to someone else is replaced: a path that is not a socket,
    /// a socket another program still listens on, a socket in a directory that other
    /// users may write to (unless it is sticky and the socket ours), or a socket whose
    /// lock another daemon holds.
    pub fn listen(
        path: &std::path::Path,
        group: Option<&str>,
    ) -> Result<(vhost::vhost_user::Listener, SocketFile), String> {
        let gid = group.map(group_id).transpose()?;
        check_socket_dir(path)?;
        let mut lock_path = path.as_os_str().to_owned();
        lock_path.push(".pid");
        let lock_path = std::path::PathBuf::from(lock_path);
        let mut lock = take_lock(path, &lock_path)?;
        // Only a dead socket is replaced: a regular file named by mistake is never deleted,
        // and a socket some program listens on (one that takes no lock) is left to it.
        let refused = match std::fs::symlink_metadata(path) {
            Ok(m) if !std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()) => Some(format!(
                "{} exists and is not a socket; not replacing it",
                path.display()
            )),
            Ok(_) if socket_is_live(path) => Some(format!(
                "{} is a socket another program listens on; not replacing it",
                path.display()
            )),
            _ => None,
        };
        if let Some(message) = refused {
            // The lock file is ours (we hold it): it goes, the path stays.
            let _ = std::fs::remove_file(&lock_path);
            return Err(message);
        }
        // From here on whatever fails, the lock file and any socket made go with `file`.
        let file = SocketFile {
            path: path.to_path_buf(),
            lock_path,
            _lock: lock
                .try_clone()
                .map_err(|e| format!("cannot keep the lock: {e}"))?,
            armed: true,
        };
        lock.set_len(0)
            .and_then(|()| lock.write_all(format!("{}\n", std::process::id()).as_bytes()))
            .map_err(|e| format!("cannot write {}: {e}", file.lock_path.display()))?;
        // The socket's mode comes from the umask at bind: no moment with wider permissions.
        let mask = if gid.is_some() { 0o117 } else { 0o177 };
        let old = rustix::process::umask(rustix::fs::Mode::from_bits_truncate(mask));
        // A socket file left by a daemon that was killed is replaced (its lock is free and
        // nothing listens on it).
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

/// Takes the exclusive lock of `lock_path`, created if missing, and checks that the file
/// locked is still the one at the path: a daemon that exits unlinks its lock file while
/// holding it, so a lock taken on a file opened just before is a lock on nothing, and is
/// taken again on the file now at the path.
fn take_lock(path: &std::path::Path, lock_path: &std::path::Path) -> Result<std::fs::File, String> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    for _ in 0..100 {
        let mut lock = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
            .open(lock_path)
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
        let held = lock
            .metadata()
            .map_err(|e| format!("{}: {e}", lock_path.display()))?;
        match std::fs::symlink_metadata(lock_path) {
            Ok(now) if now.dev() == held.dev() && now.ino() == held.ino() => return Ok(lock),
            // Unlinked or replaced between our open and our lock: try the new one.
            _ => continue,
        }
    }
    Err(format!(
        "cannot lock {}: it keeps being replaced",
        lock_path.display()
    ))
}

/// Refuses a socket directory that other users could use to plant or swap the socket:
/// one writable by group or others, unless it is sticky (as /tmp is: only owners remove
/// entries) and whatever is at the path already is ours; or one owned by another user.
fn check_socket_dir(path: &std::path::Path) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => std::path::Path::new("."),
    };
    let meta = std::fs::metadata(dir).map_err(|e| {
        format!(
            "socket {}: directory {}: {e}",
            path.display(),
            dir.display()
        )
    })?;
    let me = rustix::process::geteuid().as_raw();
    if meta.uid() != me && meta.uid() != 0 {
        return Err(format!(
            "socket directory {} belongs to uid {}, who could replace the socket; use a \
             directory of your own, such as $XDG_RUNTIME_DIR",
            dir.display(),
            meta.uid()
        ));
    }
    if meta.mode() & 0o022 != 0 {
        let sticky = meta.mode() & libc::S_ISVTX != 0;
        let ours = match std::fs::symlink_metadata(path) {
            Ok(m) => m.uid() == me,
            Err(_) => true,
        };
        if !sticky || !ours {
            return Err(format!(
                "socket directory {} (mode {:o}) is writable by other users{}; use a \
                 directory of your own, such as $XDG_RUNTIME_DIR",
                dir.display(),
                meta.mode() & 0o7777,
                if sticky {
                    format!(", and {} is not ours", path.display())
                } else {
                    String::new()
                }
            ));
        }
    }
    Ok(())
}

/// Whether a program listens on the socket at `path`. The kernel's table of Unix sockets
/// is read first, which disturbs no one: a probe connection would be taken by a server
/// that serves one connection (virtiofsd, another nixstorefs) as its VMM, and end it.
/// A socket absent from the table (bound in another network namespace) is probed with
/// `connect()`; only a refused connection proves it dead.
fn socket_is_live(path: &std::path::Path) -> bool {
    let wanted = std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str());
    if let Ok(table) = std::fs::read("/proc/net/unix") {
        // Columns: Num RefCount Protocol Flags Type St Inode Path; flag 0x10000 is
        // __SO_ACCEPTCON, a listening socket.
        for line in table.split(|&b| b == b'\n').skip(1) {
            let fields: Vec<&[u8]> = line
                .split(|&b| b == b' ')
                .filter(|f| !f.is_empty())
                .collect();
            if fields.len() >= 8 && fields[7] == wanted {
                let flags = std::str::from_utf8(fields[3])
                    .ok()
                    .and_then(|f| u32::from_str_radix(f, 16).ok())
                    .unwrap_or(0);
                if flags & 0x10000 != 0 {
                    return true;
                }
            }
        }
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => true,
        Err(e) => {
            e.raw_os_error() != Some(libc::ECONNREFUSED) && e.raw_os_error() != Some(libc::ENOENT)
        }
    }
}

impl SocketFile {
    /// Leaves the removal of the socket and its lock file to someone else (a
    /// [`Cleanup`]): returns their paths, and the lock's descriptor, which must be held
    /// until they are gone.
    pub fn leave_removal(&mut self) -> (Vec<std::path::PathBuf>, std::os::fd::RawFd) {
        use std::os::fd::AsRawFd;
        self.armed = false;
        (
            vec![self.path.clone(), self.lock_path.clone()],
            self._lock.as_raw_fd(),
        )
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if self.armed {
            // The socket first, then the lock file, while still holding the lock: a
            // daemon waiting on this lock file finds it unlinked once it has it, and
            // takes the new one (see `take_lock`).
            let _ = std::fs::remove_file(&self.path);
            let _ = std::fs::remove_file(&self.lock_path);
        }
    }
}

/// Removes the daemon's files (its socket and lock, a temporary roots file) when it ends,
/// from a process forked before the sandbox: the sandboxed daemon may not unlink files,
/// and this way they go even when it is killed. Dropping this asks for the removal and
/// waits until it is done.
pub struct Cleanup {
    cleaner: Cleaner,
}

impl Cleanup {
    /// Forks the cleaner for `paths`, keeping the descriptors `hold` (locks that must
    /// outlive the files) open in it. Must be called while the process has one thread.
    pub fn spawn(
        paths: &[std::path::PathBuf],
        hold: &[std::os::fd::RawFd],
    ) -> std::io::Result<Cleanup> {
        Ok(Cleanup {
            cleaner: Cleaner::spawn(paths, hold)?,
        })
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        self.cleaner.finish();
    }
}

/// A process that removes files when the daemon ends, however it ends: asked to (and
/// the daemon waits until it is done), or when the daemon dies (its end of a pipe closes).
/// It keeps the daemon's locks open (a `flock` belongs to the open file, shared across
/// the fork), so no other daemon takes the socket, and no collector the roots file's
/// name, before the old files are gone.
struct Cleaner {
    request: std::os::fd::OwnedFd,
    done: std::os::fd::OwnedFd,
}

impl Cleaner {
    fn spawn(
        paths: &[std::path::PathBuf],
        hold: &[std::os::fd::RawFd],
    ) -> std::io::Result<Cleaner> {
        use std::os::fd::AsRawFd;
        use std::os::unix::ffi::OsStrExt;
        let paths: Vec<std::ffi::CString> = paths
            .iter()
            .map(|p| std::ffi::CString::new(p.as_os_str().as_bytes()))
            .collect::<Result<_, _>>()
            .map_err(std::io::Error::other)?;
        let (request_read, request) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
        let (done_read, done_write) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
        let mut keep = vec![request_read.as_raw_fd(), done_write.as_raw_fd()];
        keep.extend_from_slice(hold);
        keep.sort_unstable();
        // SAFETY: called while the process has one thread (the caller's contract); the
        // child only makes async-signal-safe calls (sigprocmask, close, read, unlink,
        // write, _exit) on data prepared before the fork.
        match unsafe { libc::fork() } {
            -1 => Err(std::io::Error::last_os_error()),
            0 => unsafe {
                // Its pipes and the locks only: not the listening socket.
                nixstorefs::sandbox::helper::become_helper(&keep);
                // A byte (asked) or end of file (the daemon died): either way, clean up.
                let mut byte = 0u8;
                read_byte(request_read.as_raw_fd(), &mut byte);
                for path in &paths {
                    libc::unlink(path.as_ptr());
                }
                libc::write(done_write.as_raw_fd(), (&byte as *const u8).cast(), 1);
                libc::_exit(0)
            },
            _child => {
                drop(request_read);
                drop(done_write);
                Ok(Cleaner {
                    request,
                    done: done_read,
                })
            }
        }
    }

    /// Asks for the clean-up and waits until it is done (the files are gone).
    fn finish(&self) {
        let _ = rustix::io::write(&self.request, &[1]);
        let mut ack = [0u8; 1];
        let _ = rustix::io::read(&self.done, &mut ack);
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

/// Reads one byte from `fd`, retrying on EINTR; returns what read(2) returned.
fn read_byte(fd: std::os::fd::RawFd, byte: &mut u8) -> isize {
    loop {
        // SAFETY: a one-byte read into a valid byte.
        let n = unsafe { libc::read(fd, (byte as *mut u8).cast(), 1) };
        // SAFETY: errno of this thread.
        if n >= 0 || unsafe { *libc::__errno_location() } != libc::EINTR {
            return n;
        }
    }
}

/// How an unmount asked of the [`Unmounter`] went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnmountOutcome {
    /// The mount is gone.
    Unmounted,
    /// It was busy, and is detached instead: gone from the tree, open files still work.
    Detached,
    /// Neither worked.
    Failed,
}

/// A process that unmounts the FUSE mount when the sandboxed daemon asks: Landlock
/// forbids a confined process to unmount anything, and seccomp allows neither `umount2`
/// nor running `fusermount3`. It is forked before the sandbox is entered, holds nothing
/// but its two pipes, and exits once it has unmounted or once the daemon is gone.
pub struct Unmounter {
    request: std::os::fd::OwnedFd,
    done: std::os::fd::OwnedFd,
}

impl Unmounter {
    /// Forks the unmounter for `mountpoint`: with `umount2` when the daemon runs as root,
    /// else with `fusermount3 -u` (`-z` when busy). Must be called while the process has
    /// one thread.
    pub fn spawn(mountpoint: &std::path::Path) -> std::io::Result<Unmounter> {
        use std::ffi::CString;
        use std::os::fd::AsRawFd;
        use std::os::unix::ffi::OsStrExt;
        let target =
            CString::new(mountpoint.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
        let root = rustix::process::geteuid().is_root();
        let fusermount = CString::new(fusermount_path().as_os_str().as_bytes())
            .map_err(std::io::Error::other)?;
        let dev_null = CString::new("/dev/null").expect("no NUL");
        let (name, unmount, lazy) = (
            CString::new("fusermount3").expect("no NUL"),
            CString::new("-u").expect("no NUL"),
            CString::new("-uz").expect("no NUL"),
        );
        let (request_read, request) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
        let (done_read, done_write) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
        let mut keep = [request_read.as_raw_fd(), done_write.as_raw_fd()];
        keep.sort_unstable();
        // Runs `fusermount3 FLAG TARGET` and says whether it exited 0; async-signal-safe.
        let run = |flag: &CString| -> bool {
            // SAFETY: fork/exec/waitpid in the single-threaded unmounter, with argument
            // vectors prepared before it was forked.
            unsafe {
                match libc::fork() {
                    -1 => false,
                    0 => {
                        let null = libc::open(dev_null.as_ptr(), libc::O_RDWR);
                        for fd in 0..=2 {
                            libc::dup2(null, fd);
                        }
                        let argv = [
                            name.as_ptr(),
                            flag.as_ptr(),
                            target.as_ptr(),
                            std::ptr::null(),
                        ];
                        libc::execv(fusermount.as_ptr(), argv.as_ptr());
                        libc::_exit(127)
                    }
                    child => {
                        let mut status = 0;
                        while libc::waitpid(child, &mut status, 0) < 0
                            && *libc::__errno_location() == libc::EINTR
                        {}
                        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0
                    }
                }
            }
        };
        // SAFETY: called while the process has one thread (the caller's contract); the
        // child only makes async-signal-safe calls on data prepared before the fork.
        match unsafe { libc::fork() } {
            -1 => Err(std::io::Error::last_os_error()),
            0 => unsafe {
                // Its pipes only: not /dev/fuse (the connection must end with the daemon).
                nixstorefs::sandbox::helper::become_helper(&keep);
                let mut byte = 0u8;
                let got = read_byte(request_read.as_raw_fd(), &mut byte);
                if got != 1 {
                    // The daemon is gone without asking: leave the mount as it is.
                    libc::_exit(0);
                }
                let outcome = if root {
                    if libc::umount2(target.as_ptr(), 0) == 0 {
                        UnmountOutcome::Unmounted
                    } else if libc::umount2(target.as_ptr(), libc::MNT_DETACH) == 0 {
                        UnmountOutcome::Detached
                    } else {
                        UnmountOutcome::Failed
                    }
                } else if run(&unmount) {
                    UnmountOutcome::Unmounted
                } else if run(&lazy) {
                    UnmountOutcome::Detached
                } else {
                    UnmountOutcome::Failed
                };
                let answer = outcome as u8;
                libc::write(done_write.as_raw_fd(), (&answer as *const u8).cast(), 1);
                libc::_exit(0)
            },
            _child => {
                drop(request_read);
                drop(done_write);
                Ok(Unmounter {
                    request,
                    done: done_read,
                })
            }
        }
    }

    /// Asks for the unmount and waits for the answer.
    pub fn unmount(&self) -> UnmountOutcome {
        if rustix::io::write(&self.request, &[1]).is_err() {
            return UnmountOutcome::Failed;
        }
        let mut answer = [0u8; 1];
        match rustix::io::read(&self.done, &mut answer) {
            Ok(1) if answer[0] == UnmountOutcome::Unmounted as u8 => UnmountOutcome::Unmounted,
            Ok(1) if answer[0] == UnmountOutcome::Detached as u8 => UnmountOutcome::Detached,
            _ => UnmountOutcome::Failed,
        }
    }
}

/// Where `fusermount3` is (`FUSERMOUNT_PATH`, else the first on `PATH`, else `fusermount`),
/// looked up before the unmounter is forked.
fn fusermount_path() -> std::path::PathBuf {
    if let Some(p) = std::env::var_os("FUSERMOUNT_PATH") {
        return p.into();
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into());
    for name in ["fusermount3", "fusermount"] {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    "/bin/fusermount3".into()
}
