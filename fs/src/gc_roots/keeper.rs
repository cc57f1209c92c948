//! The roots keeper: a process, forked by the daemon before its sandbox, that holds the
//! closure's roots for it, watches them, and takes them again when they are lost.
//!
//! Roots held through the nix-daemon live as long as the worker serving the connection.
//! A worker can die while the daemon serves (the OOM killer, `kill`, a crash); its roots
//! file is then stale and the next collection deletes the served paths. The sandboxed
//! daemon cannot connect anew or create files, so the keeper does it: it polls the
//! connection, and on hang-up registers the roots again, through a new connection or
//! else a roots file of its own where the state directory is writable, and logs an error
//! when neither works (trying again every [`RETRY`]). With the local protocol it holds its
//! own `temproots/<pid>` and reports a collector older than Nix 2.5 that waits for it.
//!
//! The daemon and the keeper share one anonymous `MAP_SHARED` page, created before the
//! fork, whose state word the request path reads through a [`RootsGate`]: held,
//! re-registering, or lost. The keeper's death, however it dies (SIGKILL and the OOM killer
//! included), is marked in the same page by the kernel: the keeper registers a *robust
//! futex list* whose one entry is a word holding its thread id, and the kernel sets
//! `FUTEX_OWNER_DIED` in that word when the thread exits.
//!
//! The daemon talks to the keeper over a socket pair: it asks it to replace the held set
//! ([`Keeper::replace`]) and to let go ([`Keeper`]'s drop), and waits for each answer. The
//! keeper exits when its end reads end of file: the daemon is gone, however it ended.

use std::ffi::OsStr;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::local::describe;
use super::{
    daemon, hold_in_file, hold_through_daemon, replace_held, writable, GcRootsError, GcRootsMode,
    Holder, LocalRoots, NixDirs,
};

/// Whether the roots are held, as a [`RootsGate`] sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RootsState {
    /// Held (or none were asked for): requests may be served.
    Held,
    /// What held them hung up, and the keeper is taking them again: wait.
    Reregistering,
    /// Neither the nix-daemon nor the roots file takes them (the keeper keeps trying), or
    /// the keeper is gone: a collection may delete the served paths.
    Lost,
}

const HELD: u32 = 1;
const REREGISTERING: u32 = 2;
const LOST: u32 = 3;

/// What holds the roots, in the shared page.
const BY_DAEMON: u32 = 1;
const BY_FILE: u32 = 2;

/// Set by the kernel in a robust futex word whose owner exited (linux/futex.h).
const FUTEX_OWNER_DIED: u32 = 0x4000_0000;

/// How long the keeper waits between attempts while the roots are lost.
pub(super) const RETRY: Duration = Duration::from_secs(1);
/// How often a lasting loss is logged again.
const LOST_REPORT: Duration = Duration::from_secs(60);
/// How often the keeper of a roots file looks for an old collector waiting for its lock.
const WAITER_CHECK: Duration = Duration::from_secs(10);
/// How long a slice of [`RootsGate::wait_held`] sleeps before it looks at the keeper's
/// life again (its death changes another word than the one waited on).
const WAIT_SLICE: Duration = Duration::from_millis(50);
/// How long the daemon waits for the keeper to let go when it is dropped.
const QUIT_TIMEOUT: Duration = Duration::from_secs(10);

/// The page shared by the daemon and its keeper. All zero is a valid value: not held, no
/// owner, an empty robust list.
#[repr(C)]
struct Shared {
    /// `HELD`, `REREGISTERING` or `LOST`.
    state: AtomicU32,
    /// The keeper's thread id; the kernel sets `FUTEX_OWNER_DIED` in it when the keeper
    /// exits, through the robust list below.
    owner: AtomicU32,
    /// `BY_DAEMON` or `BY_FILE`.
    mechanism: AtomicU32,
    _pad: u32,
    /// The robust list's one entry (`struct robust_list`): its `next` points back at the
    /// head. The futex word it stands for is `owner`, at `futex_offset` from it.
    entry: AtomicUsize,
    /// `struct robust_list_head`: `list.next`, `futex_offset`, `list_op_pending`.
    head: [AtomicUsize; 3],
}

/// An anonymous shared mapping holding a [`Shared`], unmapped on drop.
struct Page {
    ptr: *mut Shared,
    len: usize,
}

// SAFETY: the mapping holds atomics only, and stays mapped for the life of the `Page`.
unsafe impl Send for Page {}
// SAFETY: as above: every access goes through atomics.
unsafe impl Sync for Page {}

impl Page {
    fn new() -> io::Result<Page> {
        let len = std::mem::size_of::<Shared>().max(4096);
        // SAFETY: a new anonymous mapping at an address of the kernel's choosing: nothing
        // else refers to that memory.
        let ptr = unsafe {
            rustix::mm::mmap_anonymous(
                std::ptr::null_mut(),
                len,
                rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
                rustix::mm::MapFlags::SHARED,
            )
        }?;
        Ok(Page {
            ptr: ptr.cast(),
            len,
        })
    }

    fn shared(&self) -> &Shared {
        // SAFETY: mapped, page-aligned, zero-filled (a valid `Shared`) for the life of
        // `self`, and only accessed through atomics.
        unsafe { &*self.ptr }
    }
}

impl Drop for Page {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `Page::new`, with its length; no reference into it
        // outlives `self`.
        let _ = unsafe { rustix::mm::munmap(self.ptr.cast(), self.len) };
    }
}

/// Whether the served paths may be served now: cheap enough to ask before every request
/// (two atomic loads). Cloned into every thread that serves; see
/// [`TempRoots::gate`](super::TempRoots::gate).
#[derive(Clone)]
pub struct RootsGate {
    /// `None`: no keeper, and nothing to wait for.
    page: Option<Arc<Page>>,
}

impl std::fmt::Debug for RootsGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RootsGate")
            .field("state", &self.state())
            .finish()
    }
}

impl RootsGate {
    /// A gate that is always open: the roots are held by this process for its life, or
    /// none were asked for.
    pub fn open() -> RootsGate {
        RootsGate { page: None }
    }

    /// Whether the roots are held now.
    #[inline]
    pub fn is_held(&self) -> bool {
        self.state() == RootsState::Held
    }

    /// The roots' state now.
    pub fn state(&self) -> RootsState {
        let Some(page) = &self.page else {
            return RootsState::Held;
        };
        let shared = page.shared();
        if shared.owner.load(Ordering::Acquire) & FUTEX_OWNER_DIED != 0 {
            return RootsState::Lost;
        }
        match shared.state.load(Ordering::Acquire) {
            HELD => RootsState::Held,
            REREGISTERING => RootsState::Reregistering,
            _ => RootsState::Lost,
        }
    }

    /// Waits until the roots are held, for at most `timeout`; whether they are. Returns at
    /// once when they are, and early when the keeper is gone (they cannot come back).
    pub fn wait_held(&self, timeout: Duration) -> bool {
        let Some(page) = &self.page else {
            return true;
        };
        let shared = page.shared();
        let deadline = Instant::now() + timeout;
        loop {
            let seen = shared.state.load(Ordering::Acquire);
            if shared.owner.load(Ordering::Acquire) & FUTEX_OWNER_DIED != 0 {
                return false;
            }
            if seen == HELD {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            let slice = (deadline - now).min(WAIT_SLICE);
            let timeout = rustix::thread::futex::Timespec {
                tv_sec: slice.as_secs() as i64,
                tv_nsec: i64::from(slice.subsec_nanos()),
            };
            // Not private: the keeper, another process, wakes it. A changed word (EAGAIN),
            // a timeout and a signal all just mean looking again.
            let _ = rustix::thread::futex::wait(
                &shared.state,
                rustix::thread::futex::Flags::empty(),
                seen,
                Some(&timeout),
            );
        }
    }

    /// What holds the roots while they are held.
    pub(super) fn held_by(&self) -> Option<&'static str> {
        let page = self.page.as_ref()?;
        if !self.is_held() {
            return None;
        }
        match page.shared().mechanism.load(Ordering::Acquire) {
            BY_DAEMON => Some("daemon"),
            BY_FILE => Some("local"),
            _ => None,
        }
    }
}

/// Registers the keeper's robust futex list, so that the kernel marks its death in the
/// shared page. Called by the thread that keeps the roots, once.
fn mark_death(page: &Page) -> io::Result<()> {
    let shared = page.shared();
    let head = shared.head.as_ptr() as usize;
    let entry = &shared.entry as *const AtomicUsize as usize;
    let owner = &shared.owner as *const AtomicU32 as usize;
    shared.entry.store(head, Ordering::Relaxed);
    shared.head[0].store(entry, Ordering::Relaxed);
    // `futex_offset` is a signed long: the owner word comes before the entry.
    shared.head[1].store(owner.wrapping_sub(entry), Ordering::Relaxed);
    shared.head[2].store(0, Ordering::Relaxed);
    shared.owner.store(
        rustix::thread::gettid().as_raw_nonzero().get() as u32,
        Ordering::Release,
    );
    // SAFETY: the head is a valid `struct robust_list_head` (three words) in memory that
    // stays mapped until this thread exits: the keeper process never unmaps it, and a
    // keeper thread (in tests) is joined before its page is dropped. No C library robust
    // mutex is used by this thread, so replacing the C library's list loses nothing.
    let r = unsafe {
        libc::syscall(
            libc::SYS_set_robust_list,
            head,
            3 * std::mem::size_of::<usize>(),
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// How the keeper starts out, given by [`super::TempRoots::keep_outside`].
pub(super) enum Start {
    /// With this connection to the nix-daemon, inherited across the fork.
    Daemon {
        socket: PathBuf,
        conn: daemon::Connection,
    },
    /// With a roots file: the keeper writes one under its own pid, and this one (the
    /// daemon's) goes once that is done.
    Local(LocalRoots),
}

/// What the keeper takes over in its own process.
enum Initial {
    /// The daemon's holder, as it is.
    Inherit(Holder),
    /// Its own roots file.
    Register,
}

/// How the keeper runs.
pub(super) struct Options {
    /// The Nix installation the roots are for.
    pub(super) dirs: NixDirs,
    /// `--gc-roots`: `local` never tries the daemon when taking the roots again.
    pub(super) mode: GcRootsMode,
    /// Keep standard error (a daemon in the foreground) rather than /dev/null.
    pub(super) keep_stderr: bool,
    /// Descriptors to keep open besides (the log file).
    pub(super) keep_fds: Vec<RawFd>,
}

/// The daemon's handle on its keeper. Dropping it asks the keeper to let go of the roots
/// and waits (a bounded time) until it has.
pub(super) struct Keeper {
    ctl: UnixStream,
    gate: RootsGate,
    /// The keeper, when it is a thread of this process (tests).
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Keeper {
    /// Forks the keeper, which takes over `start` holding `paths`, and waits until it holds
    /// them. Must be called while the process has one thread. On failure, `start` is given
    /// back with the error, still holding the roots.
    pub(super) fn spawn(
        start: Start,
        paths: &[Vec<u8>],
        options: Options,
    ) -> Result<Keeper, Box<(GcRootsError, Start)>> {
        let failed = |what: &str, e: io::Error| GcRootsError::Keeper {
            message: format!("{what}: {e}"),
        };
        let prepared = (|| -> Result<_, GcRootsError> {
            let page = Arc::new(Page::new().map_err(|e| failed("mapping its shared page", e))?);
            let (ours, theirs) =
                UnixStream::pair().map_err(|e| failed("creating its socket pair", e))?;
            let dev_null = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/null")
                .map_err(|e| failed("opening /dev/null", e))?;
            // It works from `/`, keeping no directory busy: every path absolute first.
            let absolute = |p: &PathBuf| std::path::absolute(p).unwrap_or_else(|_| p.clone());
            let dirs = NixDirs {
                store_dir: absolute(&options.dirs.store_dir),
                state_dir: absolute(&options.dirs.state_dir),
                daemon_socket: absolute(&options.dirs.daemon_socket),
            };
            Ok((page, ours, theirs, dev_null, dirs))
        })();
        let (page, ours, theirs, dev_null, dirs) = match prepared {
            Ok(p) => p,
            Err(e) => return Err(Box::new((e, start))),
        };
        let shared = page.shared();
        shared.state.store(HELD, Ordering::Release);
        let by = match &start {
            Start::Daemon { .. } => BY_DAEMON,
            Start::Local(_) => BY_FILE,
        };
        shared.mechanism.store(by, Ordering::Release);
        let mut keep = vec![0, 1, 2, theirs.as_raw_fd()];
        if let Start::Daemon { conn, .. } = &start {
            keep.push(conn.socket().as_raw_fd());
        }
        keep.extend_from_slice(&options.keep_fds);
        keep.sort_unstable();
        keep.dedup();
        let mode = options.mode;
        let keep_stderr = options.keep_stderr;
        let paths = paths.to_vec();
        // SAFETY: called while the process has one thread (the caller's contract), so the
        // child may run ordinary Rust code: no lock is held by a thread that is not there.
        match unsafe { libc::fork() } {
            -1 => Err(Box::new((
                failed("forking", io::Error::last_os_error()),
                start,
            ))),
            0 => {
                // The child never returns into the daemon's code, not even by a panic.
                let kept = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
                    detach_from_daemon(&dev_null, keep_stderr, &keep);
                    // Closed above with everything else not kept: never dropped, so never
                    // closed again.
                    std::mem::forget(ours);
                    std::mem::forget(dev_null);
                    let initial = match start {
                        Start::Daemon { socket, conn } => {
                            Initial::Inherit(Holder::Daemon { socket, conn })
                        }
                        Start::Local(local) => {
                            std::mem::forget(local);
                            Initial::Register
                        }
                    };
                    run(theirs, page, initial, paths, dirs, mode);
                }));
                // SAFETY: ends the keeper without running the daemon's exit handlers or
                // destructors, which are the daemon's.
                unsafe { libc::_exit(if kept.is_ok() { 0 } else { 101 }) }
            }
            child => {
                drop(theirs);
                drop(dev_null);
                let mut keeper = Keeper {
                    ctl: ours,
                    gate: RootsGate { page: Some(page) },
                    thread: None,
                };
                match keeper.answer() {
                    // The keeper holds them: the daemon's own connection or file goes.
                    Ok(()) => {
                        drop(start);
                        tracing::debug!(pid = child, "garbage collector roots kept by pid {child}");
                        Ok(keeper)
                    }
                    Err(e) => {
                        // It has exited (or is about to): reap it.
                        let mut status = 0;
                        // SAFETY: waits for our own child, with a valid status pointer.
                        unsafe { libc::waitpid(child, &mut status, 0) };
                        Err(Box::new((e, start)))
                    }
                }
            }
        }
    }

    /// The keeper as a thread of this process, taking over `initial`: the same code as the
    /// forked keeper, for tests.
    #[cfg(test)]
    fn spawn_thread(
        initial: Initial,
        paths: &[Vec<u8>],
        dirs: NixDirs,
        mode: GcRootsMode,
    ) -> Keeper {
        let page = Arc::new(Page::new().unwrap());
        page.shared().state.store(HELD, Ordering::Release);
        let (ours, theirs) = UnixStream::pair().unwrap();
        let paths = paths.to_vec();
        let keeper_page = page.clone();
        let thread =
            std::thread::spawn(move || run(theirs, keeper_page, initial, paths, dirs, mode));
        let mut keeper = Keeper {
            ctl: ours,
            gate: RootsGate { page: Some(page) },
            thread: Some(thread),
        };
        keeper.answer().unwrap();
        keeper
    }

    /// The gate the request path asks.
    pub(super) fn gate(&self) -> RootsGate {
        self.gate.clone()
    }

    /// Asks the keeper to hold exactly `paths` and waits for its answer (see
    /// [`super::TempRoots::replace`]).
    pub(super) fn replace(&mut self, paths: &[Vec<u8>]) -> Result<(), GcRootsError> {
        let mut request = vec![b'R'];
        request.extend_from_slice(&(paths.len() as u32).to_le_bytes());
        for p in paths {
            request.extend_from_slice(&(p.len() as u32).to_le_bytes());
            request.extend_from_slice(p);
        }
        self.ctl.write_all(&request).map_err(gone)?;
        self.answer()
    }

    /// Reads the keeper's answer to the last request (or to its start).
    fn answer(&mut self) -> Result<(), GcRootsError> {
        let mut kind = [0u8; 1];
        self.ctl.read_exact(&mut kind).map_err(gone)?;
        match kind[0] {
            b'K' => Ok(()),
            b'E' => {
                let message = read_bytes(&mut self.ctl).map_err(gone)?;
                Err(GcRootsError::Keeper {
                    message: String::from_utf8_lossy(&message).into_owned(),
                })
            }
            other => Err(GcRootsError::Keeper {
                message: format!("unexpected answer {other:#04x}"),
            }),
        }
    }
}

fn gone(e: io::Error) -> GcRootsError {
    GcRootsError::Keeper {
        message: format!("the keeper process is gone ({e})"),
    }
}

impl Drop for Keeper {
    fn drop(&mut self) {
        // Let go, and wait (bounded: a keeper stuck in a nix-daemon request must not keep
        // the daemon from exiting) until the roots are released.
        if self.ctl.write_all(b"Q").is_ok() {
            let mut fds = [libc::pollfd {
                fd: self.ctl.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            }];
            // SAFETY: one valid pollfd.
            let ready = unsafe { libc::poll(fds.as_mut_ptr(), 1, QUIT_TIMEOUT.as_millis() as i32) };
            if ready > 0 {
                let _ = self.answer();
            }
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Reads a little-endian `u32` length and that many bytes (at most 1 MiB).
fn read_bytes(r: &mut impl Read) -> io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len) as usize;
    if len > 1 << 20 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "message too long",
        ));
    }
    let mut bytes = vec![0u8; len];
    r.read_exact(&mut bytes)?;
    Ok(bytes)
}

/// In the forked keeper: blocks every signal (a terminal's or a service manager's SIGTERM
/// to the process group must not end it before the daemon), points standard input and
/// output (and error unless `keep_stderr`) at /dev/null, closes every other descriptor
/// but `keep` (the FUSE device, the listening socket, the pipes of whoever started the
/// daemon, the other helpers' pipes: their ends must close when the daemon dies), and
/// moves to `/` (keeping no directory busy).
fn detach_from_daemon(dev_null: &std::fs::File, keep_stderr: bool, keep: &[RawFd]) {
    // SAFETY: plain system calls on descriptors this process owns; nothing else runs in
    // the keeper, and the descriptors closed are never used (nor dropped) again.
    unsafe {
        libc::dup2(dev_null.as_raw_fd(), 0);
        libc::dup2(dev_null.as_raw_fd(), 1);
        if !keep_stderr {
            libc::dup2(dev_null.as_raw_fd(), 2);
        }
        crate::sandbox::helper::become_helper(keep);
    }
    let _ = std::env::set_current_dir("/");
}

/// A request from the daemon.
enum Request {
    Replace(Vec<Vec<u8>>),
    Quit,
}

/// The keeper's state.
struct Keeping {
    ctl: UnixStream,
    page: Arc<Page>,
    holder: Holder,
    paths: Vec<Vec<u8>>,
    dirs: NixDirs,
    mode: GcRootsMode,
    /// When a lasting loss is logged next.
    next_report: Option<Instant>,
    /// Old collectors already reported.
    reported: Vec<u32>,
}

/// The keeper: takes over `initial`, says so on `ctl`, and keeps the roots until the
/// daemon asks it to let go or is gone.
fn run(
    ctl: UnixStream,
    page: Arc<Page>,
    initial: Initial,
    paths: Vec<Vec<u8>>,
    dirs: NixDirs,
    mode: GcRootsMode,
) {
    let mut k = Keeping {
        ctl,
        page,
        holder: Holder::Off,
        paths,
        dirs,
        mode,
        next_report: None,
        reported: Vec::new(),
    };
    let taken = match initial {
        Initial::Inherit(holder) => Ok(holder),
        Initial::Register => hold_in_file(&k.dirs.state_dir, &k.paths),
    };
    match taken {
        Ok(holder) => k.holder = holder,
        Err(e) => {
            k.reply(Err(e.to_string()));
            return;
        }
    }
    if let Err(e) = mark_death(&k.page) {
        // The gate then learns of the keeper's death only when it lets go in order.
        tracing::debug!("cannot register the keeper's robust futex list: {e}");
    }
    k.held();
    if let Holder::Local(local) = &k.holder {
        tracing::debug!(
            "garbage collector roots kept in {}",
            local.file_path.display()
        );
    }
    k.reply(Ok(()));
    k.keep();
}

impl Keeping {
    fn shared(&self) -> &Shared {
        self.page.shared()
    }

    fn set_state(&self, state: u32) {
        let word = &self.shared().state;
        word.store(state, Ordering::Release);
        let _ = rustix::thread::futex::wake(word, rustix::thread::futex::Flags::empty(), u32::MAX);
    }

    /// Marks the roots held, by whatever holds them now.
    fn held(&self) {
        let by = match self.holder {
            Holder::Daemon { .. } => BY_DAEMON,
            _ => BY_FILE,
        };
        self.shared().mechanism.store(by, Ordering::Release);
        self.set_state(HELD);
    }

    fn reply(&mut self, result: Result<(), String>) {
        let answer = match result {
            Ok(()) => vec![b'K'],
            Err(message) => {
                let mut a = vec![b'E'];
                a.extend_from_slice(&(message.len() as u32).to_le_bytes());
                a.extend_from_slice(message.as_bytes());
                a
            }
        };
        let _ = self.ctl.write_all(&answer);
    }

    fn request(&mut self) -> io::Result<Request> {
        let mut kind = [0u8; 1];
        self.ctl.read_exact(&mut kind)?;
        match kind[0] {
            b'Q' => Ok(Request::Quit),
            b'R' => {
                let mut count = [0u8; 4];
                self.ctl.read_exact(&mut count)?;
                let mut paths = Vec::new();
                for _ in 0..u32::from_le_bytes(count) {
                    paths.push(read_bytes(&mut self.ctl)?);
                }
                Ok(Request::Replace(paths))
            }
            other => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("unknown request {other:#04x}"),
            )),
        }
    }

    /// Lets go of the roots: the gate closes first, then the connection or file goes.
    fn release(&mut self) {
        self.set_state(LOST);
        self.holder = Holder::Off;
    }

    /// Serves the daemon's requests and watches the holder until told to stop.
    fn keep(mut self) {
        loop {
            let conn = match &self.holder {
                Holder::Daemon { conn, .. } => conn.socket().as_raw_fd(),
                _ => -1,
            };
            let timeout = match self.holder {
                Holder::Off => RETRY,
                Holder::Local(_) => WAITER_CHECK,
                _ => Duration::MAX,
            };
            let mut fds = [
                libc::pollfd {
                    fd: self.ctl.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                // A negative descriptor is ignored.
                libc::pollfd {
                    fd: conn,
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            let millis = if timeout == Duration::MAX {
                -1
            } else {
                timeout.as_millis() as i32
            };
            // SAFETY: two valid pollfds.
            let ready = unsafe { libc::poll(fds.as_mut_ptr(), 2, millis) };
            if ready < 0 {
                continue;
            }
            if fds[0].revents != 0 {
                match self.request() {
                    Ok(Request::Replace(paths)) => {
                        let result = self.replace(paths).map_err(|e| e.to_string());
                        self.reply(result);
                    }
                    Ok(Request::Quit) => {
                        self.release();
                        self.reply(Ok(()));
                        return;
                    }
                    // The daemon is gone, however it ended.
                    Err(_) => {
                        self.release();
                        return;
                    }
                }
                continue;
            }
            if fds[1].revents != 0 {
                if let Holder::Daemon { socket, conn } = &self.holder {
                    if conn.hung_up() {
                        tracing::warn!(
                            "the nix-daemon connection at {} holding the garbage collector \
                             roots hung up (its worker exited or was killed); taking them again",
                            socket.display()
                        );
                        self.set_state(REREGISTERING);
                        self.holder = Holder::Off;
                        self.register_again();
                    }
                }
                continue;
            }
            if ready == 0 {
                match &self.holder {
                    Holder::Off => self.register_again(),
                    Holder::Local(local) => self.report_old_collectors(local.waiting_collectors()),
                    _ => {}
                }
            }
        }
    }

    /// Takes the roots again after they were lost: through a new nix-daemon connection
    /// (unless `--gc-roots local`), else in a roots file where the state directory is
    /// writable. Logs an error when neither works; the caller tries again later.
    fn register_again(&mut self) {
        let mut why = Vec::new();
        if self.mode != GcRootsMode::Local {
            match hold_through_daemon(&self.dirs.daemon_socket, &self.paths) {
                Ok(holder) => return self.taken_again(holder),
                Err(e) => why.push(e.to_string()),
            }
        }
        if writable(&self.dirs.state_dir) {
            match hold_in_file(&self.dirs.state_dir, &self.paths) {
                Ok(holder) => return self.taken_again(holder),
                Err(e) => why.push(e.to_string()),
            }
        } else {
            why.push(format!(
                "{} is not writable for a roots file",
                self.dirs.state_dir.display()
            ));
        }
        self.set_state(LOST);
        let now = Instant::now();
        if self.next_report.is_none_or(|at| now >= at) {
            tracing::error!(
                "garbage collector roots lost: {}; a garbage collection may delete the {} \
                 store paths being served (trying again every {} s)",
                why.join("; "),
                self.paths.len(),
                RETRY.as_secs()
            );
            self.next_report = Some(now + LOST_REPORT);
        }
    }

    fn taken_again(&mut self, holder: Holder) {
        self.holder = holder;
        self.next_report = None;
        self.held();
        match &self.holder {
            Holder::Daemon { socket, .. } => tracing::warn!(
                paths = self.paths.len(),
                "garbage collector roots held again by the nix-daemon at {}",
                socket.display()
            ),
            Holder::Local(local) => tracing::warn!(
                paths = self.paths.len(),
                "garbage collector roots held again in {}",
                local.file_path.display()
            ),
            _ => {}
        }
        // Held from here on; what a collection deleted while they were not is gone.
        let missing: Vec<String> = self
            .paths
            .iter()
            .filter(|p| std::fs::symlink_metadata(OsStr::from_bytes(p)).is_err())
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .collect();
        if !missing.is_empty() {
            tracing::error!(
                "{} served store path(s) were deleted while their garbage collector roots \
                 were not held: {}",
                missing.len(),
                missing.join(", ")
            );
        }
    }

    /// Makes the roots hold `paths` (see [`super::TempRoots::replace`]).
    fn replace(&mut self, paths: Vec<Vec<u8>>) -> Result<(), GcRootsError> {
        if let Holder::Off = self.holder {
            // Lost: whatever is taken next is the new set.
            self.paths = paths;
            self.register_again();
            return match self.holder {
                Holder::Off => Err(GcRootsError::Keeper {
                    message: "the roots are lost, and taking them again failed (see the log)"
                        .to_owned(),
                }),
                _ => Ok(()),
            };
        }
        replace_held(&mut self.holder, &self.paths, &paths)?;
        self.paths = paths;
        // A new connection or file may have replaced the old one.
        self.held();
        Ok(())
    }

    fn report_old_collectors(&mut self, waiting: Vec<(u32, String)>) {
        let new: Vec<(u32, String)> = waiting
            .into_iter()
            .filter(|(pid, _)| !self.reported.contains(pid))
            .collect();
        if new.is_empty() {
            return;
        }
        self.reported.extend(new.iter().map(|(pid, _)| *pid));
        let file = match &self.holder {
            Holder::Local(local) => local.file_path.display().to_string(),
            _ => String::new(),
        };
        tracing::error!(
            "{} waits for the lock of {file}: a garbage collector older than Nix 2.5, which \
             waits for the owner of every live temporary roots file to exit, so it waits as \
             long as this daemon serves; the local roots protocol needs Nix 2.5 or later (use \
             the nix-daemon: --gc-roots daemon)",
            describe(&new)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::super::daemon::fake::{Event, FakeDaemon};
    use super::super::testing::*;
    use super::*;

    fn bytes(paths: &[String]) -> Vec<Vec<u8>> {
        paths.iter().map(|p| p.clone().into_bytes()).collect()
    }

    /// A keeper thread holding the fixture's paths through a fake nix-daemon.
    fn through_daemon(f: &Fixture, mode: GcRootsMode) -> (FakeDaemon, Keeper) {
        let daemon = FakeDaemon::start(&f.dirs.daemon_socket);
        let paths = bytes(&printed(f));
        let holder = hold_through_daemon(&f.dirs.daemon_socket, &paths).unwrap();
        let keeper = Keeper::spawn_thread(Initial::Inherit(holder), &paths, f.dirs.clone(), mode);
        (daemon, keeper)
    }

    /// Waits (at most 10 s) until the gate says `state`.
    fn wait_state(gate: &RootsGate, state: RootsState) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while gate.state() != state {
            assert!(
                Instant::now() < deadline,
                "still {:?}, not {state:?}",
                gate.state()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn a_gate_without_a_keeper_is_open() {
        let gate = RootsGate::open();
        assert!(gate.is_held());
        assert_eq!(gate.state(), RootsState::Held);
        assert!(gate.wait_held(Duration::ZERO));
    }

    #[test]
    fn a_worker_that_dies_is_replaced_by_a_new_connection() {
        let f = fixture();
        let (daemon, keeper) = through_daemon(&f, GcRootsMode::Auto);
        let gate = keeper.gate();
        assert!(gate.is_held());
        assert_eq!(gate.held_by(), Some("daemon"));
        assert_eq!(daemon.roots(0), printed(&f));
        daemon.kill(0);
        daemon.wait_for("a second connection holding the roots", |e| {
            e.iter().filter(|e| matches!(e, Event::Root(1, _))).count() == NAMES.len()
        });
        assert!(gate.wait_held(Duration::from_secs(10)));
        assert_eq!(gate.held_by(), Some("daemon"));
        assert_eq!(daemon.roots(1), printed(&f));
        assert_eq!(daemon.open(), vec![1]);
        // Letting go closes it.
        drop(keeper);
        daemon.wait_for("the connection closed", |e| e.contains(&Event::Closed(1)));
        assert!(!gate.is_held());
    }

    #[test]
    fn without_a_daemon_the_roots_go_to_a_file() {
        let f = fixture();
        let (mut daemon, keeper) = through_daemon(&f, GcRootsMode::Daemon);
        let gate = keeper.gate();
        daemon.stop_listening();
        daemon.kill(0);
        wait_state(&gate, RootsState::Held);
        assert!(gate.wait_held(Duration::from_secs(10)));
        let deadline = Instant::now() + Duration::from_secs(10);
        while gate.held_by() != Some("local") {
            assert!(Instant::now() < deadline, "{:?}", gate.held_by());
            std::thread::sleep(Duration::from_millis(5));
        }
        let file = f
            .dirs
            .state_dir
            .join("temproots")
            .join(std::process::id().to_string());
        assert_eq!(entries(&file), printed(&f));
        assert!(locked_by_someone_else(&file));
        drop(keeper);
        assert!(!file.exists(), "the keeper's roots file outlived it");
    }

    #[test]
    fn roots_lost_both_ways_close_the_gate_until_taken_again() {
        let f = fixture();
        let mut dirs = f.dirs.clone();
        // No state directory to fall back on.
        dirs.state_dir = f._tmp.path().join("no-such-state");
        let daemon = FakeDaemon::start(&dirs.daemon_socket);
        let paths = bytes(&printed(&f));
        let holder = hold_through_daemon(&dirs.daemon_socket, &paths).unwrap();
        let keeper = Keeper::spawn_thread(
            Initial::Inherit(holder),
            &paths,
            dirs.clone(),
            GcRootsMode::Auto,
        );
        let gate = keeper.gate();
        let mut daemon = daemon;
        daemon.stop_listening();
        daemon.kill(0);
        wait_state(&gate, RootsState::Lost);
        assert!(!gate.is_held());
        assert!(!gate.wait_held(Duration::from_millis(200)));
        // The daemon comes back: the next attempt (every RETRY) takes them.
        let again = FakeDaemon::start(&dirs.daemon_socket);
        let started = Instant::now();
        assert!(
            gate.wait_held(RETRY * 10),
            "not taken again: {:?}",
            gate.state()
        );
        assert!(started.elapsed() <= RETRY * 3, "{:?}", started.elapsed());
        assert_eq!(again.roots(0), printed(&f));
        drop(keeper);
    }

    #[test]
    fn replace_through_the_daemon_adds_in_place_and_drops_through_a_new_connection() {
        let f = fixture();
        let (daemon, mut keeper) = through_daemon(&f, GcRootsMode::Auto);
        let old = printed(&f);
        let extra = format!(
            "{}/3a7c0xbqkqi3i8a1xndh6h8gwb3sw0nb-extra",
            f.dirs.store_dir.display()
        );
        let mut union = old.clone();
        union.push(extra.clone());
        // Adding only: the same connection takes the new path.
        keeper.replace(&bytes(&union)).unwrap();
        assert_eq!(daemon.roots(0), union);
        assert_eq!(daemon.open(), vec![0]);
        // Dropping: a new connection holds the new set before the old one closes.
        let new = vec![old[1].clone(), extra.clone()];
        keeper.replace(&bytes(&new)).unwrap();
        daemon.wait_for("the old connection closed", |e| {
            e.contains(&Event::Closed(0))
        });
        assert_eq!(daemon.roots(1), new);
        let events = daemon.events();
        let closed = events.iter().position(|e| *e == Event::Closed(0)).unwrap();
        let last_root = events
            .iter()
            .rposition(|e| matches!(e, Event::Root(1, _)))
            .unwrap();
        assert!(
            last_root < closed,
            "closed before the new set was held: {events:?}"
        );
        assert_eq!(daemon.open(), vec![1]);
        assert!(keeper.gate().is_held());
    }

    #[test]
    fn replace_in_a_file_never_drops_the_paths_that_stay() {
        let f = fixture();
        let old = printed(&f);
        let keeper_paths = bytes(&old);
        let mut keeper = Keeper::spawn_thread(
            Initial::Register,
            &keeper_paths,
            f.dirs.clone(),
            GcRootsMode::Local,
        );
        assert_eq!(keeper.gate().held_by(), Some("local"));
        let file = f
            .dirs
            .state_dir
            .join("temproots")
            .join(std::process::id().to_string());
        assert_eq!(entries(&file), old);
        let extra = format!(
            "{}/3a7c0xbqkqi3i8a1xndh6h8gwb3sw0nb-extra",
            f.dirs.store_dir.display()
        );
        let mut union = old.clone();
        union.push(extra.clone());
        keeper.replace(&bytes(&union)).unwrap();
        assert_eq!(entries(&file), union);
        // Dropping while a collection runs waits for it, the file untouched meanwhile.
        let gc_lock =
            super::super::local::open_lock_file(&f.dirs.state_dir.join("gc.lock")).unwrap();
        rustix::fs::flock(&gc_lock, rustix::fs::FlockOperation::LockExclusive).unwrap();
        let new = vec![old[2].clone(), extra.clone()];
        let request = bytes(&new);
        let replacing = std::thread::spawn(move || {
            keeper.replace(&request).unwrap();
            keeper
        });
        std::thread::sleep(Duration::from_millis(300));
        assert!(!replacing.is_finished());
        assert_eq!(entries(&file), union);
        drop(gc_lock);
        let keeper = replacing.join().unwrap();
        assert_eq!(entries(&file), new);
        assert!(locked_by_someone_else(&file));
        drop(keeper);
        assert!(!file.exists());
    }

    #[test]
    fn the_gate_sees_the_keeper_die() {
        // However the keeper ends, even without a word (SIGKILL, the OOM killer), the
        // kernel marks its death in the page.
        let page = Arc::new(Page::new().unwrap());
        page.shared().state.store(HELD, Ordering::Release);
        let gate = RootsGate {
            page: Some(page.clone()),
        };
        let thread_page = page.clone();
        std::thread::spawn(move || {
            mark_death(&thread_page).unwrap();
            assert!(RootsGate {
                page: Some(thread_page.clone())
            }
            .is_held());
        })
        .join()
        .unwrap();
        assert_eq!(page.shared().state.load(Ordering::Acquire), HELD);
        assert_eq!(gate.state(), RootsState::Lost);
        assert!(!gate.wait_held(Duration::from_secs(5)));
    }

    #[test]
    fn wait_held_returns_as_soon_as_they_are_taken_again() {
        let page = Arc::new(Page::new().unwrap());
        page.shared().state.store(REREGISTERING, Ordering::Release);
        let gate = RootsGate {
            page: Some(page.clone()),
        };
        assert_eq!(gate.state(), RootsState::Reregistering);
        assert!(!gate.wait_held(Duration::from_millis(50)));
        let setter = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            let word = &page.shared().state;
            word.store(HELD, Ordering::Release);
            rustix::thread::futex::wake(word, rustix::thread::futex::Flags::empty(), u32::MAX)
                .unwrap();
        });
        let started = Instant::now();
        assert!(gate.wait_held(Duration::from_secs(10)));
        assert!(started.elapsed() < Duration::from_secs(5));
        setter.join().unwrap();
    }

    #[test]
    fn a_daemon_that_goes_away_releases_the_roots() {
        // The daemon's end closing without a word (it was killed) ends the keeper.
        let f = fixture();
        let (daemon, keeper) = through_daemon(&f, GcRootsMode::Auto);
        let gate = keeper.gate();
        let mut keeper = std::mem::ManuallyDrop::new(keeper);
        let thread = keeper.thread.take();
        // SAFETY: moved out of a value that is never dropped; its gate goes with it.
        let (ctl, _gate) = unsafe { (std::ptr::read(&keeper.ctl), std::ptr::read(&keeper.gate)) };
        drop(ctl);
        thread.unwrap().join().unwrap();
        daemon.wait_for("the connection closed", |e| e.contains(&Event::Closed(0)));
        assert!(!gate.is_held());
    }
}
