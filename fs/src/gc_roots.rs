//! Holding a closure's store paths as Nix temporary roots while they are served.
//!
//! Nothing else roots the paths of a closure file, so a `nix-collect-garbage` running while
//! a mount or an image build is using them could delete them. Nix protects what a process
//! is working on with *temporary roots*, and [`TempRoots`] takes them the ways Nix itself
//! does:
//!
//! * through the nix-daemon (`wopAddTempRoot` of the worker protocol): the daemon's worker
//!   for our connection holds the roots until the connection closes, that is, until this
//!   process exits, however it exits;
//! * or, when the process may write the Nix state directory, with the temporary roots file
//!   protocol of the local store: `temproots/<pid>` under the state directory, appended to
//!   under a shared `flock` of `gc.lock`, held with an exclusive `flock` of its own for the
//!   life of the process (a collector that can take that lock knows the owner is gone and
//!   deletes the file), and, while a collection holds `gc.lock`, announced to the collector
//!   through its `gc-socket/socket`.
//!
//! Roots must be taken before the paths' presence is checked: a collection that starts
//! after a path was found present would otherwise be free to delete it.

use std::ffi::OsString;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustix::fs::FlockOperation;

use crate::store_path::StorePath;

/// How to hold the closure's paths against garbage collection (`--gc-roots`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum GcRootsMode {
    /// The nix-daemon if one answers, else the local protocol if the state directory is
    /// writable, else nothing (with a warning). A store directory that is not the Nix
    /// store gets nothing, silently.
    #[default]
    Auto,
    /// Through the nix-daemon; failing that is an error.
    Daemon,
    /// With the temporary roots file in the state directory; failing that is an error.
    Local,
    /// Hold nothing: a collection may delete the paths being served.
    Off,
}

/// Where Nix keeps its store, its state and its daemon socket, read from the environment
/// as Nix reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NixDirs {
    /// `NIX_STORE_DIR`, else `NIX_STORE`, else `/nix/store`.
    pub store_dir: PathBuf,
    /// `NIX_STATE_DIR`, else `/nix/var/nix`.
    pub state_dir: PathBuf,
    /// `NIX_DAEMON_SOCKET_PATH`, else `<state_dir>/daemon-socket/socket`.
    pub daemon_socket: PathBuf,
}

impl NixDirs {
    /// The directories of the Nix installation the environment points at.
    pub fn from_env() -> NixDirs {
        let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
        // Without doubled or trailing slashes, as Nix prints its store paths.
        let tidy = |p: PathBuf| p.components().collect::<PathBuf>();
        let store_dir = tidy(
            var("NIX_STORE_DIR")
                .or_else(|| var("NIX_STORE"))
                .map_or_else(|| "/nix/store".into(), PathBuf::from),
        );
        let state_dir =
            tidy(var("NIX_STATE_DIR").map_or_else(|| "/nix/var/nix".into(), PathBuf::from));
        let daemon_socket = var("NIX_DAEMON_SOCKET_PATH")
            .map_or_else(|| state_dir.join("daemon-socket/socket"), PathBuf::from);
        NixDirs {
            store_dir,
            state_dir,
            daemon_socket,
        }
    }
}

/// Why roots could not be taken.
#[derive(Debug)]
pub enum GcRootsError {
    /// A file or socket operation failed.
    Io {
        /// What was being done, e.g. "locking".
        action: &'static str,
        /// The file or socket it was done to.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// The nix-daemon refused or spoke an unexpected protocol.
    Daemon {
        /// The daemon's socket.
        socket: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The requested mechanism cannot apply to this store directory.
    NotNixStore {
        /// The directory served.
        store_dir: PathBuf,
        /// Nix's store directory.
        nix_store_dir: PathBuf,
    },
}

impl fmt::Display for GcRootsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GcRootsError::Io {
                action,
                path,
                source,
            } => write!(
                f,
                "cannot take garbage collector roots: {action} {}: {source}",
                path.display()
            ),
            GcRootsError::Daemon { socket, message } => write!(
                f,
                "cannot take garbage collector roots through the nix-daemon at {}: {message}",
                socket.display()
            ),
            GcRootsError::NotNixStore {
                store_dir,
                nix_store_dir,
            } => write!(
                f,
                "cannot take garbage collector roots: {} is not the Nix store {} \
                 (NIX_STORE_DIR); use --gc-roots off",
                store_dir.display(),
                nix_store_dir.display()
            ),
        }
    }
}

impl std::error::Error for GcRootsError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            GcRootsError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

fn io_error<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(io::Error) -> GcRootsError + 'a {
    move |source| GcRootsError::Io {
        action,
        path: path.to_owned(),
        source,
    }
}

/// Store paths held as temporary roots for as long as this value (and so normally the
/// process) lives. The kernel releases them when the process dies, however it dies.
pub struct TempRoots {
    holder: Holder,
    /// The paths as Nix prints them: `<Nix store dir>/<base name>`.
    paths: Vec<Vec<u8>>,
}

enum Holder {
    Off,
    Daemon {
        socket: PathBuf,
        // Never read after registration: the daemon holds the roots while it is open.
        _conn: UnixStream,
    },
    Local(LocalRoots),
}

impl fmt::Debug for TempRoots {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TempRoots")
            .field("held_by", &self.held_by())
            .field("paths", &self.paths.len())
            .finish()
    }
}

impl TempRoots {
    /// Holds `paths` of `store_dir` as temporary roots as `mode` says, with the Nix
    /// directories of the environment.
    pub fn hold(
        mode: GcRootsMode,
        store_dir: &Path,
        paths: &[StorePath],
    ) -> Result<TempRoots, GcRootsError> {
        Self::hold_with(mode, &NixDirs::from_env(), store_dir, paths)
    }

    /// Holds `paths` of `store_dir` as temporary roots of the Nix installation `dirs`.
    pub fn hold_with(
        mode: GcRootsMode,
        dirs: &NixDirs,
        store_dir: &Path,
        paths: &[StorePath],
    ) -> Result<TempRoots, GcRootsError> {
        let off = TempRoots {
            holder: Holder::Off,
            paths: Vec::new(),
        };
        if mode == GcRootsMode::Off {
            tracing::info!("garbage collector roots: off (--gc-roots off)");
            return Ok(off);
        }
        if !same_directory(store_dir, &dirs.store_dir) {
            if mode == GcRootsMode::Auto {
                tracing::debug!(
                    "garbage collector roots: off ({} is not the Nix store {})",
                    store_dir.display(),
                    dirs.store_dir.display()
                );
                return Ok(off);
            }
            return Err(GcRootsError::NotNixStore {
                store_dir: store_dir.to_owned(),
                nix_store_dir: dirs.store_dir.clone(),
            });
        }
        let printed: Vec<Vec<u8>> = paths
            .iter()
            .map(|p| {
                let mut s = dirs.store_dir.as_os_str().as_bytes().to_vec();
                s.push(b'/');
                s.extend_from_slice(p.base_name().as_bytes());
                s
            })
            .collect();

        let use_daemon = match mode {
            GcRootsMode::Daemon => true,
            GcRootsMode::Local => false,
            _ => dirs.daemon_socket.exists(),
        };
        if use_daemon {
            match daemon::connect(&dirs.daemon_socket) {
                Ok(mut conn) => {
                    conn.add_temp_roots(&printed)
                        .map_err(|e| e.at(&dirs.daemon_socket))?;
                    tracing::info!(
                        paths = printed.len(),
                        "garbage collector roots held by the nix-daemon at {}",
                        dirs.daemon_socket.display()
                    );
                    return Ok(TempRoots {
                        holder: Holder::Daemon {
                            socket: dirs.daemon_socket.clone(),
                            _conn: conn.into_stream(),
                        },
                        paths: printed,
                    });
                }
                Err(e) if mode == GcRootsMode::Daemon => return Err(e.at(&dirs.daemon_socket)),
                // A socket nobody listens on: a daemon that is not running.
                Err(e) => tracing::debug!(
                    "no nix-daemon at {}: {}",
                    dirs.daemon_socket.display(),
                    e.message
                ),
            }
        }
        if mode == GcRootsMode::Auto && !writable(&dirs.state_dir) {
            tracing::warn!(
                "garbage collector roots: off (no nix-daemon at {} and {} is not writable): \
                 a garbage collection may delete the paths being served",
                dirs.daemon_socket.display(),
                dirs.state_dir.display()
            );
            return Ok(off);
        }
        let mut local = LocalRoots::create(&dirs.state_dir)?;
        local.add(&printed)?;
        tracing::info!(
            paths = printed.len(),
            "garbage collector roots held in {}",
            local.file_path.display()
        );
        Ok(TempRoots {
            holder: Holder::Local(local),
            paths: printed,
        })
    }

    /// What holds the roots: `"daemon"`, `"local"`, or `None` when nothing does.
    pub fn held_by(&self) -> Option<&'static str> {
        match self.holder {
            Holder::Off => None,
            Holder::Daemon { .. } => Some("daemon"),
            Holder::Local(_) => Some("local"),
        }
    }

    /// The roots file, when the local protocol holds them.
    pub fn roots_file(&self) -> Option<&Path> {
        match &self.holder {
            Holder::Local(l) => Some(&l.file_path),
            _ => None,
        }
    }

    /// Leaves the removal of the roots file to someone else (a process that outlives this
    /// one, when this one may not unlink files): returns the file and its lock's
    /// descriptor, which must stay open until the file is gone. `None` unless the local
    /// protocol holds the roots.
    pub fn leave_removal(&mut self) -> Option<(PathBuf, std::os::fd::RawFd)> {
        use std::os::fd::AsRawFd;
        match &mut self.holder {
            Holder::Local(l) => {
                l.released = true;
                Some((l.file_path.clone(), l.file.as_raw_fd()))
            }
            _ => None,
        }
    }

    /// To be called in the child after a `fork`: the roots file is named after the process
    /// that owns it, and Nix deletes a file whose name is its own pid as stale, so the child
    /// takes the roots again under its own pid before the parent exits. A daemon connection
    /// is inherited as it is.
    pub fn after_fork(&mut self) -> Result<(), GcRootsError> {
        let Holder::Local(old) = &self.holder else {
            return Ok(());
        };
        if old.pid == std::process::id() {
            return Ok(());
        }
        let mut new = LocalRoots::create(&old.state_dir)?;
        new.add(&self.paths)?;
        if let Holder::Local(mut old) = std::mem::replace(&mut self.holder, Holder::Local(new)) {
            // The parent's file: its roots are now in ours, and it is still the parent's
            // (alive until we report), so nobody else can own that name yet.
            old.release_for_fork();
        }
        if let Some(path) = self.roots_file() {
            tracing::debug!("garbage collector roots moved to {}", path.display());
        }
        Ok(())
    }
}

impl Drop for TempRoots {
    fn drop(&mut self) {
        if let Holder::Daemon { socket, .. } = &self.holder {
            tracing::debug!(
                "releasing garbage collector roots held by {}",
                socket.display()
            );
        }
    }
}

/// Whether `a` and `b` name the same directory: the same inode when both exist, the same
/// text otherwise.
fn same_directory(a: &Path, b: &Path) -> bool {
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => a.components().eq(b.components()),
    }
}

/// Whether this process may create files in `dir`, as Nix decides whether it may use the
/// local store directly.
fn writable(dir: &Path) -> bool {
    rustix::fs::access(
        dir,
        rustix::fs::Access::READ_OK | rustix::fs::Access::WRITE_OK,
    )
    .is_ok()
}

/// How long to wait before asking a collector's socket again when it is not listening yet.
const GC_SOCKET_RETRY: Duration = Duration::from_millis(100);
/// How often to say that a collection keeps us waiting.
const SOCKET_WAIT_WARNING: Duration = Duration::from_secs(10);

/// The local temporary roots protocol.
struct LocalRoots {
    state_dir: PathBuf,
    /// `<state>/temproots/<pid>`, exclusively locked while open.
    file: File,
    file_path: PathBuf,
    pid: u32,
    /// `<state>/gc.lock`: shared while appending, exclusive while a collection runs.
    gc_lock: File,
    gc_lock_path: PathBuf,
    /// A live connection to a running collector, when there is one.
    gc_socket: Option<UnixStream>,
    /// Set once the file is left to its old owner after a fork: nothing to unlink.
    released: bool,
}

fn flock(file: &File, op: FlockOperation, path: &Path) -> Result<bool, GcRootsError> {
    loop {
        match rustix::fs::flock(file, op) {
            Ok(()) => return Ok(true),
            Err(rustix::io::Errno::WOULDBLOCK) => return Ok(false),
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(io_error("locking", path)(e.into())),
        }
    }
}

fn open_lock_file(path: &Path) -> Result<File, GcRootsError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map_err(io_error("opening", path))
}

impl LocalRoots {
    /// Creates this process's roots file and takes its lock, as Nix does for its own.
    fn create(state_dir: &Path) -> Result<LocalRoots, GcRootsError> {
        let dir = state_dir.join("temproots");
        std::fs::create_dir_all(&dir).map_err(io_error("creating", &dir))?;
        let pid = std::process::id();
        let file_path = dir.join(pid.to_string());
        let file = loop {
            // A file with our pid in its name is stale: its owner was a process that is gone.
            match std::fs::remove_file(&file_path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_error("removing stale", &file_path)(e)),
            }
            let file = open_lock_file(&file_path)?;
            flock(&file, FlockOperation::LockExclusive, &file_path)?;
            // A collector that opened the file before we locked it found it unowned, deleted
            // it and marked it with a byte: start again with a fresh one.
            let len = file
                .metadata()
                .map_err(io_error("reading the size of", &file_path))?
                .len();
            if len == 0 {
                break file;
            }
        };
        let gc_lock_path = state_dir.join("gc.lock");
        let gc_lock = open_lock_file(&gc_lock_path)?;
        Ok(LocalRoots {
            state_dir: state_dir.to_owned(),
            file,
            file_path,
            pid,
            gc_lock,
            gc_lock_path,
            gc_socket: None,
            released: false,
        })
    }

    /// Records `paths` as roots: a collection that has not started yet will read them from
    /// the file, one that is running is told through its socket first.
    fn add(&mut self, paths: &[Vec<u8>]) -> Result<(), GcRootsError> {
        // Paths in the file, and paths no collection may delete any more.
        let mut filed = 0;
        let mut done = 0;
        let mut waiting_logged = false;
        let mut next_warning = std::time::Instant::now() + SOCKET_WAIT_WARNING;
        while done < paths.len() {
            if flock(
                &self.gc_lock,
                FlockOperation::NonBlockingLockShared,
                &self.gc_lock_path,
            )? {
                // No collection runs, and none can start until the lock is dropped: the file
                // is complete before any collector reads it.
                let mut record = Vec::new();
                for p in &paths[filed..] {
                    record.extend_from_slice(p);
                    record.push(0);
                }
                let written = self
                    .file
                    .write_all(&record)
                    .map_err(io_error("writing", &self.file_path));
                flock(&self.gc_lock, FlockOperation::Unlock, &self.gc_lock_path)?;
                written?;
                return Ok(());
            }
            // A collection holds the lock: it has read, or is reading, the roots files, and
            // takes new roots through its socket only.
            if !waiting_logged {
                tracing::info!("a garbage collection is running; telling it about the roots");
                waiting_logged = true;
            }
            let socket_path = self.state_dir.join("gc-socket/socket");
            if self.gc_socket.is_none() {
                match UnixStream::connect(&socket_path) {
                    Ok(s) => self.gc_socket = Some(s),
                    // Not listening yet, or already gone: look at the lock again.
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::ConnectionRefused | io::ErrorKind::NotFound
                        ) =>
                    {
                        // A collector that never listens holds us up until it is done, as
                        // it holds Nix up; say so now and then.
                        if std::time::Instant::now() >= next_warning {
                            tracing::warn!(
                                "still waiting for the garbage collection holding {} \
                                 to listen on {}",
                                self.gc_lock_path.display(),
                                socket_path.display()
                            );
                            next_warning += SOCKET_WAIT_WARNING;
                        }
                        std::thread::sleep(GC_SOCKET_RETRY);
                        continue;
                    }
                    Err(e) => return Err(io_error("connecting to", &socket_path)(e)),
                }
            }
            let socket = self.gc_socket.as_mut().expect("connected above");
            while done < paths.len() {
                let p = &paths[done];
                // Into the file first, for the collections after this one: one that starts
                // as soon as this one ends must not miss a path it was never told about.
                if filed == done {
                    let mut record = p.clone();
                    record.push(0);
                    self.file
                        .write_all(&record)
                        .map_err(io_error("writing", &self.file_path))?;
                    filed += 1;
                }
                let mut line = p.clone();
                line.push(b'\n');
                let mut ack = [0u8; 1];
                // The collector acknowledges once the path is safe: if it was deleting it,
                // only when that deletion is over (the presence check comes after).
                let sent = socket
                    .write_all(&line)
                    .and_then(|()| socket.read_exact(&mut ack));
                match sent {
                    Ok(()) if ack[0] == b'1' => done += 1,
                    Ok(()) => {
                        return Err(io_error(
                            "reading the collector's answer from",
                            &socket_path,
                        )(io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!("unexpected byte {:#04x}", ack[0]),
                        )))
                    }
                    // The collection ended: whatever is left goes to the file.
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::BrokenPipe
                                | io::ErrorKind::ConnectionReset
                                | io::ErrorKind::UnexpectedEof
                        ) =>
                    {
                        self.gc_socket = None;
                        break;
                    }
                    Err(e) => return Err(io_error("talking to", &socket_path)(e)),
                }
            }
        }
        Ok(())
    }

    /// Gives up the parent's file after a fork without touching its lock (shared with the
    /// parent until it exits): the name is unlinked so that no stale file is left over.
    fn release_for_fork(&mut self) {
        self.released = true;
        if let Err(e) = std::fs::remove_file(&self.file_path) {
            tracing::debug!("cannot remove {}: {e}", self.file_path.display());
        }
    }
}

impl Drop for LocalRoots {
    fn drop(&mut self) {
        // As Nix does at exit; the lock goes with the descriptor. Only the owner unlinks.
        if !self.released && self.pid == std::process::id() {
            let _ = std::fs::remove_file(&self.file_path);
        }
    }
}

/// The client side of the nix-daemon worker protocol, as far as temporary roots need it.
mod daemon {
    use super::*;

    const WORKER_MAGIC_1: u64 = 0x6e69_7863;
    const WORKER_MAGIC_2: u64 = 0x6478_696f;
    /// Protocol 1.35: daemons negotiate down to the older of the two versions, so Nix 2.8
    /// (1.34) speaks its own; current Nix accepts clients from 1.18 on, Lix from 1.35.
    const CLIENT_VERSION: u64 = (1 << 8) | 35;
    const OP_ADD_TEMP_ROOT: u64 = 11;

    const STDERR_NEXT: u64 = 0x6f6c_6d67;
    const STDERR_READ: u64 = 0x6461_7461;
    const STDERR_WRITE: u64 = 0x6461_7416;
    const STDERR_LAST: u64 = 0x616c_7473;
    const STDERR_ERROR: u64 = 0x6378_7470;
    const STDERR_START_ACTIVITY: u64 = 0x5354_5254;
    const STDERR_STOP_ACTIVITY: u64 = 0x5354_4f50;
    const STDERR_RESULT: u64 = 0x5253_4c54;

    /// Requests sent before their answers are read: enough to hide the round trips, few
    /// enough that neither side's socket buffer fills while the other is not reading.
    const PIPELINE: usize = 256;
    /// A daemon that does not answer for this long is taken to be stuck.
    const ANSWER_TIMEOUT: Duration = Duration::from_secs(120);
    /// Strings longer than this from the daemon are a protocol error, not an allocation.
    const MAX_STRING: u64 = 1 << 20;

    /// A daemon failure, placed at its socket by [`DaemonFailure::at`].
    #[derive(Debug)]
    pub(super) struct DaemonFailure {
        pub(super) message: String,
    }

    impl DaemonFailure {
        pub(super) fn at(self, socket: &Path) -> GcRootsError {
            GcRootsError::Daemon {
                socket: socket.to_owned(),
                message: self.message,
            }
        }
    }

    impl From<io::Error> for DaemonFailure {
        fn from(e: io::Error) -> Self {
            let message = match e.kind() {
                io::ErrorKind::UnexpectedEof => "the daemon closed the connection".to_owned(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                    format!("no answer within {} s", ANSWER_TIMEOUT.as_secs())
                }
                _ => e.to_string(),
            };
            DaemonFailure { message }
        }
    }

    fn fail(message: impl Into<String>) -> DaemonFailure {
        DaemonFailure {
            message: message.into(),
        }
    }

    pub(super) struct Connection {
        stream: io::BufReader<UnixStream>,
        /// The protocol minor version both sides speak.
        minor: u64,
    }

    /// Connects and shakes hands.
    pub(super) fn connect(socket: &Path) -> Result<Connection, DaemonFailure> {
        let stream = UnixStream::connect(socket)?;
        stream.set_read_timeout(Some(ANSWER_TIMEOUT))?;
        stream.set_write_timeout(Some(ANSWER_TIMEOUT))?;
        let mut conn = Connection {
            stream: io::BufReader::new(stream),
            minor: 0,
        };
        let mut hello = Vec::new();
        put_u64(&mut hello, WORKER_MAGIC_1);
        put_u64(&mut hello, CLIENT_VERSION);
        conn.send(&hello)?;
        if conn.u64()? != WORKER_MAGIC_2 {
            return Err(fail("not a nix-daemon (protocol mismatch)"));
        }
        let daemon_version = conn.u64()?;
        if daemon_version >> 8 != 1 || daemon_version & 0xff < 10 {
            return Err(fail(format!(
                "unsupported daemon protocol version {}.{}",
                daemon_version >> 8,
                daemon_version & 0xff
            )));
        }
        conn.minor = (daemon_version & 0xff).min(CLIENT_VERSION & 0xff);
        let mut rest = Vec::new();
        if conn.minor >= 14 {
            put_u64(&mut rest, 0); // no CPU affinity (obsolete)
        }
        if conn.minor >= 11 {
            put_u64(&mut rest, 0); // reserveSpace (obsolete)
        }
        conn.send(&rest)?;
        if conn.minor >= 33 {
            let version = conn.string()?;
            tracing::debug!("nix-daemon {}", String::from_utf8_lossy(&version));
        }
        if conn.minor >= 35 {
            let _trusted = conn.u64()?;
        }
        // The daemon's startup messages, if any.
        conn.stderr()?;
        Ok(conn)
    }

    fn put_u64(buf: &mut Vec<u8>, n: u64) {
        buf.extend_from_slice(&n.to_le_bytes());
    }

    fn put_bytes(buf: &mut Vec<u8>, s: &[u8]) {
        put_u64(buf, s.len() as u64);
        buf.extend_from_slice(s);
        buf.resize(buf.len() + (8 - s.len() % 8) % 8, 0);
    }

    impl Connection {
        fn send(&mut self, bytes: &[u8]) -> Result<(), DaemonFailure> {
            self.stream.get_mut().write_all(bytes)?;
            Ok(())
        }

        fn u64(&mut self) -> Result<u64, DaemonFailure> {
            let mut b = [0u8; 8];
            self.stream.read_exact(&mut b)?;
            Ok(u64::from_le_bytes(b))
        }

        fn string(&mut self) -> Result<Vec<u8>, DaemonFailure> {
            let len = self.u64()?;
            if len > MAX_STRING {
                return Err(fail(format!("a {len}-byte string from the daemon")));
            }
            let padded = len.div_ceil(8) * 8;
            let mut b = vec![0u8; padded as usize];
            self.stream.read_exact(&mut b)?;
            b.truncate(len as usize);
            Ok(b)
        }

        /// Skips the fields of an activity message.
        fn fields(&mut self) -> Result<(), DaemonFailure> {
            let n = self.u64()?;
            for _ in 0..n {
                match self.u64()? {
                    0 => {
                        self.u64()?;
                    }
                    1 => {
                        self.string()?;
                    }
                    t => return Err(fail(format!("unknown log field type {t}"))),
                }
            }
            Ok(())
        }

        /// Reads the daemon's log messages up to the end of the current operation; an
        /// error it reports becomes ours.
        fn stderr(&mut self) -> Result<(), DaemonFailure> {
            loop {
                match self.u64()? {
                    STDERR_LAST => return Ok(()),
                    STDERR_NEXT => {
                        let s = self.string()?;
                        tracing::debug!("nix-daemon: {}", String::from_utf8_lossy(&s).trim_end());
                    }
                    STDERR_ERROR => {
                        let message = if self.minor >= 26 {
                            let _type = self.string()?;
                            let _level = self.u64()?;
                            let _name = self.string()?;
                            let msg = self.string()?;
                            let _have_pos = self.u64()?;
                            let traces = self.u64()?;
                            for _ in 0..traces {
                                let _have_pos = self.u64()?;
                                self.string()?;
                            }
                            msg
                        } else {
                            let msg = self.string()?;
                            let _status = self.u64()?;
                            msg
                        };
                        return Err(fail(String::from_utf8_lossy(&message).trim().to_owned()));
                    }
                    STDERR_START_ACTIVITY => {
                        let _id = self.u64()?;
                        let _level = self.u64()?;
                        let _type = self.u64()?;
                        let _text = self.string()?;
                        self.fields()?;
                        let _parent = self.u64()?;
                    }
                    STDERR_STOP_ACTIVITY => {
                        let _id = self.u64()?;
                    }
                    STDERR_RESULT => {
                        let _id = self.u64()?;
                        let _type = self.u64()?;
                        self.fields()?;
                    }
                    STDERR_READ | STDERR_WRITE => {
                        return Err(fail("the daemon asked for data it was never offered"))
                    }
                    other => return Err(fail(format!("unknown message {other:#x}"))),
                }
            }
        }

        /// `wopAddTempRoot` for every path; the daemon's worker holds them until the
        /// connection closes.
        pub(super) fn add_temp_roots(&mut self, paths: &[Vec<u8>]) -> Result<(), DaemonFailure> {
            for chunk in paths.chunks(PIPELINE) {
                let mut requests = Vec::new();
                for p in chunk {
                    put_u64(&mut requests, OP_ADD_TEMP_ROOT);
                    put_bytes(&mut requests, p);
                }
                self.send(&requests)?;
                for p in chunk {
                    let answer = self.stderr().and_then(|()| self.u64());
                    match answer {
                        Ok(1) => {}
                        Ok(n) => {
                            return Err(fail(format!(
                                "unexpected answer {n} to adding {}",
                                OsString::from(std::ffi::OsStr::from_bytes(p)).to_string_lossy()
                            )))
                        }
                        Err(e) => {
                            return Err(fail(format!(
                                "adding {}: {}",
                                std::ffi::OsStr::from_bytes(p).to_string_lossy(),
                                e.message
                            )))
                        }
                    }
                }
            }
            Ok(())
        }

        /// The bare connection, kept open to keep the roots, no longer read.
        pub(super) fn into_stream(self) -> UnixStream {
            let stream = self.stream.into_inner();
            let _ = stream.set_read_timeout(None);
            stream
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;
    use std::sync::mpsc;

    const NAMES: [&str; 3] = [
        "0c7c0xbqkqi3i8a1xndh6h8gwb3sw0nb-hello-2.12",
        "1b7c0xbqkqi3i8a1xndh6h8gwb3sw0nb-glibc-2.40",
        "2a7c0xbqkqi3i8a1xndh6h8gwb3sw0nb-bash-5.2",
    ];

    struct Fixture {
        _tmp: tempfile::TempDir,
        dirs: NixDirs,
        paths: Vec<StorePath>,
    }

    fn fixture() -> Fixture {
        let tmp = tempfile::tempdir().unwrap();
        let store_dir = tmp.path().join("store");
        let state_dir = tmp.path().join("state");
        std::fs::create_dir(&store_dir).unwrap();
        std::fs::create_dir(&state_dir).unwrap();
        Fixture {
            dirs: NixDirs {
                daemon_socket: state_dir.join("daemon-socket/socket"),
                store_dir,
                state_dir,
            },
            _tmp: tmp,
            paths: NAMES.iter().map(|n| StorePath::new(n).unwrap()).collect(),
        }
    }

    fn printed(f: &Fixture) -> Vec<String> {
        NAMES
            .iter()
            .map(|n| format!("{}/{n}", f.dirs.store_dir.display()))
            .collect()
    }

    /// The roots file's entries, as the collector parses them.
    fn entries(path: &Path) -> Vec<String> {
        let text = std::fs::read(path).unwrap();
        assert_eq!(text.last(), Some(&0), "entries end with NUL");
        text.split(|b| *b == 0)
            .filter(|s| !s.is_empty())
            .map(|s| String::from_utf8(s.to_vec()).unwrap())
            .collect()
    }

    fn locked_by_someone_else(path: &Path) -> bool {
        let other = File::options().read(true).write(true).open(path).unwrap();
        !flock(&other, FlockOperation::NonBlockingLockExclusive, path).unwrap()
    }

    #[test]
    fn local_roots_file_is_named_locked_and_removed() {
        let f = fixture();
        let roots =
            TempRoots::hold_with(GcRootsMode::Auto, &f.dirs, &f.dirs.store_dir, &f.paths).unwrap();
        assert_eq!(roots.held_by(), Some("local"));
        let file = f
            .dirs
            .state_dir
            .join("temproots")
            .join(std::process::id().to_string());
        assert_eq!(roots.roots_file(), Some(file.as_path()));
        assert_eq!(entries(&file), printed(&f));
        // A collector's non-blocking exclusive lock fails: the owner is alive.
        assert!(locked_by_someone_else(&file));
        // gc.lock is free again: registering does not keep collections out.
        let gc_lock = open_lock_file(&f.dirs.state_dir.join("gc.lock")).unwrap();
        assert!(flock(
            &gc_lock,
            FlockOperation::NonBlockingLockExclusive,
            Path::new("")
        )
        .unwrap());
        drop(gc_lock);
        drop(roots);
        assert!(!file.exists(), "the roots file outlived its owner");
    }

    #[test]
    fn stale_file_with_our_pid_is_replaced() {
        let f = fixture();
        let dir = f.dirs.state_dir.join("temproots");
        std::fs::create_dir(&dir).unwrap();
        let file = dir.join(std::process::id().to_string());
        std::fs::write(&file, b"/elsewhere/old\0d").unwrap();
        let roots =
            TempRoots::hold_with(GcRootsMode::Local, &f.dirs, &f.dirs.store_dir, &f.paths).unwrap();
        assert_eq!(entries(&file), printed(&f));
        drop(roots);
    }

    /// A stand-in for a running collector: holds gc.lock exclusively, starts listening on
    /// its socket after `delay`, acknowledges `serve` roots and then, if `then_stop`, closes
    /// the connection and the lock as a collection that ends does.
    fn collector(
        f: &Fixture,
        delay: Duration,
        serve: usize,
    ) -> (mpsc::Receiver<Vec<String>>, std::thread::JoinHandle<()>) {
        let gc_lock = open_lock_file(&f.dirs.state_dir.join("gc.lock")).unwrap();
        assert!(flock(
            &gc_lock,
            FlockOperation::NonBlockingLockExclusive,
            Path::new("")
        )
        .unwrap());
        let socket = f.dirs.state_dir.join("gc-socket/socket");
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::spawn(move || {
            std::thread::sleep(delay);
            std::fs::create_dir_all(socket.parent().unwrap()).unwrap();
            let listener = UnixListener::bind(&socket).unwrap();
            let (conn, _) = listener.accept().unwrap();
            let mut reader = io::BufReader::new(conn.try_clone().unwrap());
            let mut writer = conn;
            let mut got = Vec::new();
            while got.len() < serve {
                let mut line = String::new();
                if io::BufRead::read_line(&mut reader, &mut line).unwrap() == 0 {
                    break;
                }
                got.push(line.trim_end().to_owned());
                writer.write_all(b"1").unwrap();
            }
            // The collection ends: socket closed, lock released.
            drop(listener);
            let _ = std::fs::remove_file(&socket);
            drop(writer);
            drop(reader);
            drop(gc_lock);
            tx.send(got).unwrap();
        });
        (rx, thread)
    }

    #[test]
    fn running_collection_is_told_through_its_socket() {
        let f = fixture();
        // Not listening at first: the client must retry, as Nix does.
        let (rx, thread) = collector(&f, Duration::from_millis(300), NAMES.len());
        let roots =
            TempRoots::hold_with(GcRootsMode::Local, &f.dirs, &f.dirs.store_dir, &f.paths).unwrap();
        thread.join().unwrap();
        assert_eq!(rx.recv().unwrap(), printed(&f));
        // And for the collections after it, the file.
        assert_eq!(entries(roots.roots_file().unwrap()), printed(&f));
    }

    #[test]
    fn collection_ending_midway_leaves_the_rest_to_the_file() {
        let f = fixture();
        let (rx, thread) = collector(&f, Duration::ZERO, 1);
        let roots =
            TempRoots::hold_with(GcRootsMode::Local, &f.dirs, &f.dirs.store_dir, &f.paths).unwrap();
        thread.join().unwrap();
        assert_eq!(rx.recv().unwrap(), printed(&f)[..1]);
        assert_eq!(entries(roots.roots_file().unwrap()), printed(&f));
    }

    #[test]
    fn other_store_directories_are_not_rooted() {
        let f = fixture();
        let other = f._tmp.path().join("other-store");
        std::fs::create_dir(&other).unwrap();
        let roots = TempRoots::hold_with(GcRootsMode::Auto, &f.dirs, &other, &f.paths).unwrap();
        assert_eq!(roots.held_by(), None);
        assert!(!f.dirs.state_dir.join("temproots").exists());
        let e = TempRoots::hold_with(GcRootsMode::Local, &f.dirs, &other, &f.paths).unwrap_err();
        assert!(matches!(e, GcRootsError::NotNixStore { .. }), "{e}");
        assert!(e.to_string().contains(&other.display().to_string()), "{e}");
    }

    #[test]
    fn explicit_daemon_without_one_is_an_error() {
        let f = fixture();
        let e = TempRoots::hold_with(GcRootsMode::Daemon, &f.dirs, &f.dirs.store_dir, &f.paths)
            .unwrap_err();
        let text = e.to_string();
        assert!(text.contains("daemon-socket/socket"), "{text}");
        // Auto falls back to the state directory instead.
        let roots =
            TempRoots::hold_with(GcRootsMode::Auto, &f.dirs, &f.dirs.store_dir, &f.paths).unwrap();
        assert_eq!(roots.held_by(), Some("local"));
    }

    /// A scripted nix-daemon speaking protocol 1.38: it logs an activity and a line for
    /// each root, refuses paths ending in `-bad` as current Nix reports errors, and returns
    /// the roots it was given once the client hangs up.
    fn fake_daemon(socket: &Path) -> std::thread::JoinHandle<Vec<String>> {
        std::fs::create_dir_all(socket.parent().unwrap()).unwrap();
        let listener = UnixListener::bind(socket).unwrap();
        std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let u64_in = |c: &mut UnixStream| -> Option<u64> {
                let mut b = [0u8; 8];
                c.read_exact(&mut b).ok().map(|()| u64::from_le_bytes(b))
            };
            let put = |out: &mut Vec<u8>, n: u64| out.extend_from_slice(&n.to_le_bytes());
            let put_str = |out: &mut Vec<u8>, s: &[u8]| {
                out.extend_from_slice(&(s.len() as u64).to_le_bytes());
                out.extend_from_slice(s);
                out.resize(out.len() + (8 - s.len() % 8) % 8, 0);
            };
            assert_eq!(u64_in(&mut conn), Some(0x6e69_7863));
            assert_eq!(u64_in(&mut conn), Some((1 << 8) | 35));
            let mut out = Vec::new();
            put(&mut out, 0x6478_696f);
            put(&mut out, (1 << 8) | 38);
            conn.write_all(&out).unwrap();
            assert_eq!(u64_in(&mut conn), Some(0), "CPU affinity");
            assert_eq!(u64_in(&mut conn), Some(0), "reserveSpace");
            let mut out = Vec::new();
            put_str(&mut out, b"2.30.0");
            put(&mut out, 1); // trusted
            put(&mut out, 0x616c_7473);
            conn.write_all(&out).unwrap();
            let mut roots = Vec::new();
            while let Some(op) = u64_in(&mut conn) {
                assert_eq!(op, 11, "wopAddTempRoot");
                let len = u64_in(&mut conn).unwrap() as usize;
                let mut path = vec![0u8; len.div_ceil(8) * 8];
                conn.read_exact(&mut path).unwrap();
                path.truncate(len);
                let path = String::from_utf8(path).unwrap();
                let mut out = Vec::new();
                if path.ends_with("-bad") {
                    put(&mut out, 0x6378_7470);
                    put_str(&mut out, b"Error");
                    put(&mut out, 0);
                    put_str(&mut out, b"Error");
                    put_str(&mut out, format!("path '{path}' is not valid").as_bytes());
                    put(&mut out, 0);
                    put(&mut out, 1);
                    put(&mut out, 0);
                    put_str(&mut out, b"while adding a root");
                } else {
                    put(&mut out, 0x5354_5254);
                    put(&mut out, 7);
                    put(&mut out, 3);
                    put(&mut out, 0);
                    put_str(&mut out, b"adding a root");
                    put(&mut out, 2);
                    put(&mut out, 0);
                    put(&mut out, 42);
                    put(&mut out, 1);
                    put_str(&mut out, path.as_bytes());
                    put(&mut out, 0);
                    put(&mut out, 0x5354_4f50);
                    put(&mut out, 7);
                    put(&mut out, 0x6f6c_6d67);
                    put_str(&mut out, b"a log line\n");
                    put(&mut out, 0x616c_7473);
                    put(&mut out, 1);
                    roots.push(path);
                }
                conn.write_all(&out).unwrap();
            }
            roots
        })
    }

    #[test]
    fn daemon_protocol_holds_roots_until_the_connection_closes() {
        let f = fixture();
        let daemon = fake_daemon(&f.dirs.daemon_socket);
        let roots =
            TempRoots::hold_with(GcRootsMode::Auto, &f.dirs, &f.dirs.store_dir, &f.paths).unwrap();
        assert_eq!(roots.held_by(), Some("daemon"));
        assert!(!f.dirs.state_dir.join("temproots").exists());
        drop(roots);
        // The daemon sees the connection close only now: it held the roots until here.
        assert_eq!(daemon.join().unwrap(), printed(&f));
    }

    #[test]
    fn daemon_errors_name_the_path_and_the_daemon() {
        let f = fixture();
        let daemon = fake_daemon(&f.dirs.daemon_socket);
        let mut paths = f.paths.clone();
        paths.push(StorePath::new("3a7c0xbqkqi3i8a1xndh6h8gwb3sw0nb-bad").unwrap());
        let e = TempRoots::hold_with(GcRootsMode::Daemon, &f.dirs, &f.dirs.store_dir, &paths)
            .unwrap_err()
            .to_string();
        assert!(e.contains("-bad' is not valid"), "{e}");
        assert!(e.contains("daemon-socket/socket"), "{e}");
        daemon.join().unwrap();
    }

    #[test]
    fn off_holds_nothing() {
        let f = fixture();
        let roots =
            TempRoots::hold_with(GcRootsMode::Off, &f.dirs, &f.dirs.store_dir, &f.paths).unwrap();
        assert_eq!(roots.held_by(), None);
        assert!(!f.dirs.state_dir.join("temproots").exists());
    }
}
