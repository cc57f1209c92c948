//! Live closure updates: the control socket, the controller process behind it, and the
//! daemon's updater thread.
//!
//! The sandboxed daemon can neither accept connections on a second socket nor read files
//! outside the store, so what an update needs from the wider world is done by the
//! *controller*, a process forked before the sandbox: it listens on the control socket
//! (`nixstorefs update` connects there) and re-reads the closure file on SIGHUP. It hands
//! each update to the daemon over a socket pair made before the fork, as a closure text;
//! the daemon parses it, roots its paths, swaps the served set and answers. The daemon
//! never trusts the controller's bytes more than a closure file's: they are parsed and
//! checked the same way.
//!
//! Every message is a frame: one kind byte, a little-endian `u32` length, that many bytes.

use std::ffi::OsStr;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use nixstorefs::closure::{Closure, MAX_INPUT_BYTES};
use nixstorefs::gc_roots::TempRoots;
use nixstorefs::store_path::StorePath;
use nixstorefs::view::{Change, Missing, Removal, View, ViewError};
use parking_lot::Mutex;

/// The largest frame: a closure text at its cap, and its origin.
const MAX_FRAME: usize = MAX_INPUT_BYTES as usize + 4096;

/// How long the controller waits for a client's request, and a client for the answer.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);

/// How often the updater looks at retiring paths while there are some, to let their
/// roots go once released.
const RELEASE_CHECK: Duration = Duration::from_secs(1);

/// Frame kinds.
mod kind {
    /// Controller to client: the store directory the daemon serves.
    pub const HELLO: u8 = b'S';
    /// Client to controller, controller to daemon: an update.
    pub const UPDATE: u8 = b'U';
    /// The answer: done, with a summary.
    pub const DONE: u8 = b'K';
    /// The answer: refused, with an exit status byte and a message.
    pub const REFUSED: u8 = b'E';
    /// Daemon to controller: SIGHUP came, re-read the closure file.
    pub const RELOAD: u8 = b'H';
}

/// Writes one frame.
fn write_frame(w: &mut impl Write, kind: u8, payload: &[u8]) -> io::Result<()> {
    let mut frame = Vec::with_capacity(5 + payload.len());
    frame.push(kind);
    frame.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    frame.extend_from_slice(payload);
    w.write_all(&frame)
}

/// Reads one frame; `None` at end of file before it starts.
fn read_frame(r: &mut impl Read) -> io::Result<Option<(u8, Vec<u8>)>> {
    let mut head = [0u8; 5];
    match r.read_exact(&mut head[..1]) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    r.read_exact(&mut head[1..])?;
    let len = u32::from_le_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if len > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a message of {len} bytes (at most {MAX_FRAME})"),
        ));
    }
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload)?;
    Ok(Some((head[0], payload)))
}

/// What an update asks for, as sent: how, where the closure came from, and its text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// Add, or replace (and prune or not).
    pub change: Change,
    /// Where the closure came from, for messages.
    pub origin: String,
    /// The closure as a store-paths list.
    pub text: Vec<u8>,
}

impl Request {
    fn encode(&self) -> Vec<u8> {
        let mut out = vec![match self.change {
            Change::Add => b'a',
            Change::Replace(Removal::WhenReleased) => b'r',
            Change::Replace(Removal::Now) => b'p',
        }];
        out.extend_from_slice(&(self.origin.len() as u32).to_le_bytes());
        out.extend_from_slice(self.origin.as_bytes());
        out.extend_from_slice(&self.text);
        out
    }

    fn decode(bytes: &[u8]) -> Result<Request, String> {
        let bad = || "a malformed update request".to_owned();
        let (&how, rest) = bytes.split_first().ok_or_else(bad)?;
        let change = match how {
            b'a' => Change::Add,
            b'r' => Change::Replace(Removal::WhenReleased),
            b'p' => Change::Replace(Removal::Now),
            _ => return Err(bad()),
        };
        if rest.len() < 4 {
            return Err(bad());
        }
        let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        let rest = &rest[4..];
        if rest.len() < len {
            return Err(bad());
        }
        let origin = String::from_utf8_lossy(&rest[..len]).into_owned();
        Ok(Request {
            change,
            origin,
            text: rest[len..].to_vec(),
        })
    }
}

/// An answer: what the update did, or why it was refused and the exit status to give.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// Done: a one-line summary.
    Done(String),
    /// Refused (2: bad input; 1: anything else), nothing changed.
    Refused(u8, String),
}

impl Answer {
    fn write(&self, w: &mut impl Write) -> io::Result<()> {
        match self {
            Answer::Done(summary) => write_frame(w, kind::DONE, summary.as_bytes()),
            Answer::Refused(status, message) => {
                let mut payload = vec![*status];
                payload.extend_from_slice(message.as_bytes());
                write_frame(w, kind::REFUSED, &payload)
            }
        }
    }

    fn of_frame(kind: u8, payload: &[u8]) -> Answer {
        match kind {
            kind::DONE => Answer::Done(String::from_utf8_lossy(payload).into_owned()),
            kind::REFUSED if !payload.is_empty() => Answer::Refused(
                payload[0].clamp(1, 2),
                String::from_utf8_lossy(&payload[1..]).into_owned(),
            ),
            _ => Answer::Refused(1, "the daemon answered something unexpected".into()),
        }
    }
}

// ---------------------------------------------------------------------------------------
// The client: `nixstorefs update`.

/// Sends `closure` (a file, a closureInfo directory, or `-`) to the daemon listening on
/// `control` and returns its answer. The closure is read and checked here, against the
/// store directory the daemon names, so errors in it name the file and line as at
/// startup.
pub fn request_update(control: &Path, closure: &Path, change: Change) -> Answer {
    let mut stream = match UnixStream::connect(control) {
        Ok(s) => s,
        Err(e) => {
            return Answer::Refused(
                1,
                format!(
                    "cannot reach the daemon's control socket {}: {e}",
                    control.display()
                ),
            )
        }
    };
    let _ = stream.set_read_timeout(Some(CLIENT_TIMEOUT));
    let _ = stream.set_write_timeout(Some(CLIENT_TIMEOUT));
    let mut talk = || -> Result<Answer, String> {
        let store_dir = match read_frame(&mut stream) {
            Ok(Some((kind::HELLO, dir))) => PathBuf::from(OsStr::from_bytes(&dir)),
            Ok(_) => return Err("the control socket did not greet as a nixstorefs daemon".into()),
            Err(e) => return Err(format!("reading from the daemon: {e}")),
        };
        let parsed = match Closure::load(closure, &store_dir) {
            Ok(c) => c,
            Err(e) => return Ok(Answer::Refused(2, e.to_string())),
        };
        let request = Request {
            change,
            origin: parsed.origin.clone(),
            text: store_paths_text(&parsed),
        };
        write_frame(&mut stream, kind::UPDATE, &request.encode())
            .map_err(|e| format!("sending the update: {e}"))?;
        match read_frame(&mut stream) {
            Ok(Some((kind, payload))) => Ok(Answer::of_frame(kind, &payload)),
            Ok(None) => Err("the daemon closed the connection without answering".into()),
            Err(e) => Err(format!("waiting for the daemon's answer: {e}")),
        }
    };
    talk().unwrap_or_else(|message| Answer::Refused(1, format!("{}: {message}", control.display())))
}

/// A closure as a store-paths list, one absolute path a line.
fn store_paths_text(closure: &Closure) -> Vec<u8> {
    let dir = closure.store_dir.as_os_str().as_bytes();
    let mut text = Vec::with_capacity(closure.paths.len() * (dir.len() + 60));
    for path in &closure.paths {
        text.extend_from_slice(dir);
        text.push(b'/');
        text.extend_from_slice(path.base_name().as_bytes());
        text.push(b'\n');
    }
    text
}

// ---------------------------------------------------------------------------------------
// The controller process.

/// What the controller needs: where to listen, what to re-read on SIGHUP.
pub struct ControllerOptions {
    /// The control socket, bound already (before the fork, so errors reach the user).
    pub listener: Option<(UnixListener, PathBuf)>,
    /// The closure file given at startup (absolute), or `None` for standard input.
    pub closure_file: Option<PathBuf>,
    /// The store directory served.
    pub store_dir: PathBuf,
    /// Descriptors to keep open (the log file).
    pub keep_fds: Vec<RawFd>,
    /// Keep standard error (a daemon in the foreground) rather than /dev/null.
    pub keep_stderr: bool,
}

/// The daemon's end of the controller's socket pair.
pub struct ControllerLink {
    stream: UnixStream,
}

/// Forks the controller. Must be called while the process has one thread.
pub fn spawn_controller(options: ControllerOptions) -> io::Result<ControllerLink> {
    let (ours, theirs) = UnixStream::pair()?;
    // The standard descriptors of whoever started the daemon are not the controller's to
    // hold (a pipe someone waits on would never close).
    let dev_null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")?;
    let mut keep = vec![0, 1, 2, theirs.as_raw_fd(), dev_null.as_raw_fd()];
    if let Some((listener, _)) = &options.listener {
        keep.push(listener.as_raw_fd());
    }
    keep.extend_from_slice(&options.keep_fds);
    keep.sort_unstable();
    keep.dedup();
    // SAFETY: called while the process has one thread (the caller's contract), so the
    // child may run ordinary Rust code.
    match unsafe { libc::fork() } {
        -1 => Err(io::Error::last_os_error()),
        0 => {
            let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
                // SAFETY: in the child of the fork, first thing; `keep` is sorted, and the
                // one object owning a descriptor closed here (`ours`) is forgotten.
                unsafe { nixstorefs::sandbox::helper::become_helper(&keep) };
                std::mem::forget(ours);
                let targets: &[RawFd] = if options.keep_stderr {
                    &[0, 1]
                } else {
                    &[0, 1, 2]
                };
                for &fd in targets {
                    // SAFETY: dup2 of a descriptor this process owns onto a standard one.
                    unsafe { libc::dup2(dev_null.as_raw_fd(), fd) };
                }
                drop(dev_null);
                controller(theirs, options);
            }));
            // SAFETY: ends the controller without running the daemon's exit handlers.
            unsafe { libc::_exit(if ran.is_ok() { 0 } else { 101 }) }
        }
        _child => {
            drop(theirs);
            drop(dev_null);
            if let Some((listener, _)) = options.listener {
                // The controller's now; the daemon keeps no descriptor of it.
                drop(listener);
            }
            Ok(ControllerLink { stream: ours })
        }
    }
}

/// The controller's loop: clients on the control socket, reload requests from the daemon.
/// Ends (removing the control socket) when the daemon's end closes.
fn controller(mut daemon: UnixStream, options: ControllerOptions) {
    let listener_fd = options.listener.as_ref().map(|(l, _)| l.as_raw_fd());
    loop {
        let mut fds = vec![libc::pollfd {
            fd: daemon.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        if let Some(fd) = listener_fd {
            fds.push(libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            });
        }
        // SAFETY: `fds` is a valid array of pollfd of the length given.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if ready < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            break;
        }
        if fds[0].revents != 0 {
            match read_frame(&mut daemon) {
                Ok(Some((kind::RELOAD, _))) => {
                    if !reload(&mut daemon, &options) {
                        break;
                    }
                }
                Ok(Some((other, _))) => {
                    tracing::warn!("the daemon sent an unexpected message {other:#04x}");
                }
                // The daemon is gone, however it ended.
                Ok(None) | Err(_) => break,
            }
        }
        if fds.get(1).is_some_and(|f| f.revents != 0) {
            if let Some((listener, _)) = &options.listener {
                if let Ok((client, _)) = listener.accept() {
                    if !serve_client(client, &mut daemon, &options.store_dir) {
                        break;
                    }
                }
            }
        }
    }
    if let Some((_, path)) = &options.listener {
        let _ = std::fs::remove_file(path);
    }
}

/// Re-reads the closure file for SIGHUP and hands it to the daemon; false when the daemon
/// is gone.
fn reload(daemon: &mut UnixStream, options: &ControllerOptions) -> bool {
    let Some(file) = &options.closure_file else {
        tracing::error!(
            "SIGHUP: the closure came from standard input and cannot be read again; \
             use `nixstorefs update` to change it"
        );
        return true;
    };
    let closure = match Closure::load(file, &options.store_dir) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("SIGHUP: {e}; still serving the closure as it was");
            return true;
        }
    };
    let request = Request {
        change: Change::Replace(Removal::WhenReleased),
        origin: closure.origin.clone(),
        text: store_paths_text(&closure),
    };
    match forward(daemon, &request) {
        Some(Answer::Done(summary)) => {
            tracing::info!("SIGHUP: {summary}");
            true
        }
        Some(Answer::Refused(_, message)) => {
            tracing::error!("SIGHUP: {message}; still serving the closure as it was");
            true
        }
        None => false,
    }
}

/// Sends `request` to the daemon and waits for its answer; `None` when the daemon is gone.
fn forward(daemon: &mut UnixStream, request: &Request) -> Option<Answer> {
    write_frame(daemon, kind::UPDATE, &request.encode()).ok()?;
    loop {
        match read_frame(daemon) {
            // A SIGHUP meanwhile is a request for what this one is about to do anyway.
            Ok(Some((kind::RELOAD, _))) => continue,
            Ok(Some((kind, payload))) => return Some(Answer::of_frame(kind, &payload)),
            Ok(None) | Err(_) => return None,
        }
    }
}

/// Serves one client of the control socket; false when the daemon is gone.
fn serve_client(mut client: UnixStream, daemon: &mut UnixStream, store_dir: &Path) -> bool {
    let _ = client.set_read_timeout(Some(CLIENT_TIMEOUT));
    let _ = client.set_write_timeout(Some(CLIENT_TIMEOUT));
    if write_frame(&mut client, kind::HELLO, store_dir.as_os_str().as_bytes()).is_err() {
        return true;
    }
    let request = match read_frame(&mut client) {
        Ok(Some((kind::UPDATE, payload))) => Request::decode(&payload),
        // Gone, or asked for nothing (a probe): nothing to do.
        Ok(None) => return true,
        Ok(Some(_)) => Err("an unexpected message".to_owned()),
        Err(e) => Err(format!("reading the request: {e}")),
    };
    let answer = match request {
        Ok(request) => match forward(daemon, &request) {
            Some(answer) => answer,
            None => {
                let _ = Answer::Refused(1, "the daemon is gone".into()).write(&mut client);
                return false;
            }
        },
        Err(message) => Answer::Refused(1, message),
    };
    match &answer {
        Answer::Done(summary) => tracing::info!("update: {summary}"),
        Answer::Refused(_, message) => tracing::warn!("update refused: {message}"),
    }
    let _ = answer.write(&mut client);
    true
}

/// Binds the control socket at `path`, readable and writable by the daemon's user only.
/// A socket left there by a daemon that was killed is replaced; anything else is not.
pub fn bind_control_socket(path: &Path) -> Result<UnixListener, String> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if !std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()) => {
            return Err(format!(
                "control socket {} exists and is not a socket; not replacing it",
                path.display()
            ))
        }
        Ok(_) => match UnixStream::connect(path) {
            Ok(_) => {
                return Err(format!(
                    "control socket {} is in use by another daemon",
                    path.display()
                ))
            }
            Err(_) => {
                std::fs::remove_file(path)
                    .map_err(|e| format!("cannot replace {}: {e}", path.display()))?;
            }
        },
        Err(_) => {}
    }
    let old = rustix::process::umask(rustix::fs::Mode::from_bits_truncate(0o177));
    let listener = UnixListener::bind(path);
    rustix::process::umask(old);
    listener.map_err(|e| {
        format!(
            "cannot listen on the control socket {}: {e}",
            path.display()
        )
    })
}

// ---------------------------------------------------------------------------------------
// The daemon's updater thread.

/// The client's kernel, where a transport can tell it of changes (the FUSE mount, through
/// `nixstorefs::transport::fuse::KernelNotifier`); virtio-fs has no such channel.
pub type Kernel = Option<nixstorefs::transport::fuse::KernelNotifier>;

/// The daemon's side: applies updates, keeps the roots following the served set.
pub struct Updater {
    view: Arc<View>,
    roots: Arc<Mutex<Option<TempRoots>>>,
    missing: Missing,
    kernel: Kernel,
}

impl Updater {
    /// An updater of `view`, whose paths `roots` hold.
    pub fn new(
        view: Arc<View>,
        roots: Arc<Mutex<Option<TempRoots>>>,
        missing: Missing,
        kernel: Kernel,
    ) -> Updater {
        Updater {
            view,
            roots,
            missing,
            kernel,
        }
    }

    /// Starts the updater thread on `link`; returns what the signal thread uses to ask
    /// the controller to re-read the closure (SIGHUP).
    pub fn start(self, link: ControllerLink) -> io::Result<Reloader> {
        let writer = Arc::new(Mutex::new(link.stream.try_clone()?));
        let reloader = Reloader {
            writer: writer.clone(),
        };
        std::thread::Builder::new()
            .name("updates".into())
            .spawn(move || self.run(link.stream, writer))?;
        Ok(reloader)
    }

    fn run(self, mut reader: UnixStream, writer: Arc<Mutex<UnixStream>>) {
        loop {
            // While paths retire, look now and then whether they were released.
            let timeout = if self.view.retiring_count() > 0 {
                RELEASE_CHECK.as_millis() as i32
            } else {
                -1
            };
            let mut fds = [libc::pollfd {
                fd: reader.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            }];
            // SAFETY: one valid pollfd.
            let ready = unsafe { libc::poll(fds.as_mut_ptr(), 1, timeout) };
            if let Some(kernel) = &self.kernel {
                // What the kernel no longer uses below retiring paths, let go.
                kernel.let_go(&self.view.held_below_retiring());
            }
            if self.view.take_released() {
                tracing::info!(
                    retiring = self.view.retiring_count(),
                    "retiring paths released by the client; their roots go"
                );
                self.root_served();
            }
            if ready <= 0 {
                continue;
            }
            let answer = match read_frame(&mut reader) {
                Ok(Some((kind::UPDATE, payload))) => match Request::decode(&payload) {
                    Ok(request) => self.apply(&request),
                    Err(message) => Answer::Refused(1, message),
                },
                Ok(Some(_)) => Answer::Refused(1, "an unexpected message".into()),
                // The controller is gone: no more updates, serving goes on.
                Ok(None) | Err(_) => {
                    tracing::warn!("the controller process is gone: no more updates");
                    return;
                }
            };
            if answer.write(&mut *writer.lock()).is_err() {
                return;
            }
        }
    }

    /// Applies one update: its paths rooted first, the served set swapped, then the roots
    /// of what left let go.
    fn apply(&self, request: &Request) -> Answer {
        let store_dir = self.view.store_dir().to_path_buf();
        let closure = match Closure::parse(&request.text, &request.origin, &store_dir) {
            Ok(c) => c,
            Err(e) => return Answer::Refused(2, e.to_string()),
        };
        let mut roots = self.roots.lock();
        let Some(roots) = roots.as_mut() else {
            return Answer::Refused(1, "the daemon is shutting down".into());
        };
        // Rooted before anything can make them visible: the served paths and the new ones.
        let mut union = store_paths(&self.view.served_paths());
        union.extend(closure.paths.iter().cloned());
        if let Err(e) = roots.replace(&union) {
            return Answer::Refused(1, format!("cannot root the new paths: {e}"));
        }
        let updated = match self.view.update(&closure, request.change, self.missing) {
            Ok(u) => u,
            Err(e) => {
                let status = match e {
                    ViewError::Stat { .. } | ViewError::Proc { .. } => 1,
                    _ => 2,
                };
                // Back to what is served.
                if let Err(e) = roots.replace(&store_paths(&self.view.served_paths())) {
                    tracing::warn!("cannot let go of the refused paths' roots: {e}");
                }
                return Answer::Refused(status, e.to_string());
            }
        };
        if let Some(kernel) = &self.kernel {
            kernel.announce(&updated);
        }
        // Only now may the roots of what left go.
        if let Err(e) = roots.replace(&store_paths(&self.view.served_paths())) {
            tracing::warn!("cannot let go of the roots of paths no longer served: {e}");
        }
        if !updated.missing.is_empty() {
            tracing::warn!(
                "update: left out {} closure path(s) missing from {}",
                updated.missing.len(),
                store_dir.display()
            );
        }
        // What this update did, then what is held from it and earlier ones now (a path
        // retiring here may be released before this answer: the client let go at once).
        Answer::Done(format!(
            "{}: serving {} paths ({} added, {} removed, {} retiring until released); {} retiring paths still held",
            request.origin,
            updated.listed,
            updated.added.len(),
            updated.removed.len(),
            updated.retiring.len(),
            self.view.retiring_count(),
        ))
    }

    /// Makes the roots hold exactly the served paths (after retiring paths were released).
    fn root_served(&self) {
        if let Some(roots) = self.roots.lock().as_mut() {
            if let Err(e) = roots.replace(&store_paths(&self.view.served_paths())) {
                tracing::warn!("cannot let go of the roots of released paths: {e}");
            }
        }
    }
}

/// Names of the view's top level as store paths (the invalid never come from a closure).
fn store_paths(names: &[std::ffi::OsString]) -> Vec<StorePath> {
    names
        .iter()
        .filter_map(|n| n.to_str().and_then(|n| StorePath::new(n).ok()))
        .collect()
}

/// Asks the controller to re-read the closure file: what SIGHUP does.
pub struct Reloader {
    writer: Arc<Mutex<UnixStream>>,
}

impl Reloader {
    /// Sends the request; the controller logs the outcome.
    pub fn reload(&self) {
        if let Err(e) = write_frame(&mut *self.writer.lock(), kind::RELOAD, &[]) {
            tracing::warn!("SIGHUP: cannot reach the controller process: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_survive_encoding() {
        for change in [
            Change::Add,
            Change::Replace(Removal::WhenReleased),
            Change::Replace(Removal::Now),
        ] {
            let request = Request {
                change,
                origin: "closure.txt".into(),
                text: b"/nix/store/x\n".to_vec(),
            };
            assert_eq!(Request::decode(&request.encode()).unwrap(), request);
        }
        assert!(Request::decode(b"").is_err());
        assert!(Request::decode(b"z\0\0\0\0").is_err());
        assert!(Request::decode(b"a\xff\0\0\0abc").is_err());
    }

    #[test]
    fn frames_are_bounded() {
        let mut bytes = vec![kind::UPDATE];
        bytes.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(read_frame(&mut &bytes[..]).is_err());
        let mut ok = Vec::new();
        write_frame(&mut ok, kind::DONE, b"fine").unwrap();
        assert_eq!(
            read_frame(&mut &ok[..]).unwrap(),
            Some((kind::DONE, b"fine".to_vec()))
        );
        assert_eq!(read_frame(&mut &b""[..]).unwrap(), None);
    }
}
