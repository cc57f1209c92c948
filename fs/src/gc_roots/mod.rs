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
//!
//! One module per mechanism: `daemon` speaks the worker protocol, `local` the temporary
//! roots file protocol, and `keeper` is the process that holds the roots for a daemon
//! that serves for long: it takes them again when the nix-daemon's worker holding them
//! dies (OOM, `kill`), which would otherwise leave them to the next collection.

mod daemon;
mod keeper;
mod local;

pub use keeper::{RootsGate, RootsState};

use std::fmt;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::store_path::StorePath;
use local::LocalRoots;

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
    /// A collection holds `gc.lock` without listening on its socket for new roots: a
    /// collector older than Nix 2.5, which local mode does not support.
    CollectorWithoutSocket {
        /// `<state>/gc.lock`.
        gc_lock: PathBuf,
        /// `<state>/gc-socket/socket`.
        socket: PathBuf,
        /// The processes holding the lock, as far as `/proc/locks` tells.
        holders: String,
        /// How long the socket was tried.
        waited: std::time::Duration,
    },
    /// The keeper process could not be started, or could not do what it was asked.
    Keeper {
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
            GcRootsError::CollectorWithoutSocket {
                gc_lock,
                socket,
                holders,
                waited,
            } => write!(
                f,
                "cannot take garbage collector roots: a garbage collection ({holders}) has \
                 held {} for {} s without listening on {}: collectors older than Nix 2.5 \
                 take no new temporary roots while they run, and the local roots protocol \
                 needs Nix 2.5 or later; use the nix-daemon (--gc-roots daemon), or start \
                 again once that collection is over",
                gc_lock.display(),
                waited.as_secs_f32(),
                socket.display()
            ),
            GcRootsError::Keeper { message } => {
                write!(f, "garbage collector roots keeper: {message}")
            }
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
///
/// A daemon that serves for long hands them to a keeper process with
/// [`TempRoots::keep_outside`]: it watches the nix-daemon connection and takes the roots
/// again when the worker holding them dies, and [`TempRoots::gate`] tells the request path
/// whether they are held.
pub struct TempRoots {
    holder: Holder,
    /// The paths as Nix prints them: `<Nix store dir>/<base name>`.
    paths: Vec<Vec<u8>>,
    dirs: NixDirs,
    mode: GcRootsMode,
}

/// What holds the roots in this process.
enum Holder {
    Off,
    /// A nix-daemon worker, for as long as the connection is open.
    Daemon {
        socket: PathBuf,
        conn: daemon::Connection,
    },
    Local(LocalRoots),
    /// The keeper process, which holds them one of the two ways above.
    Kept(keeper::Keeper),
}

impl fmt::Debug for TempRoots {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TempRoots")
            .field("held_by", &self.held_by())
            .field("paths", &self.paths.len())
            .finish()
    }
}

/// The paths of `store_dir` as Nix prints them.
fn printed_paths(store_dir: &Path, paths: &[StorePath]) -> Vec<Vec<u8>> {
    let mut printed: Vec<Vec<u8>> = Vec::with_capacity(paths.len());
    for p in paths {
        let mut s = store_dir.as_os_str().as_bytes().to_vec();
        s.push(b'/');
        s.extend_from_slice(p.base_name().as_bytes());
        if !printed.contains(&s) {
            printed.push(s);
        }
    }
    printed
}

/// `paths` through a new connection to the nix-daemon at `socket`.
fn hold_through_daemon(socket: &Path, paths: &[Vec<u8>]) -> Result<Holder, GcRootsError> {
    let mut conn = daemon::connect(socket).map_err(|e| e.at(socket))?;
    conn.add_temp_roots(paths).map_err(|e| e.at(socket))?;
    Ok(Holder::Daemon {
        socket: socket.to_owned(),
        conn,
    })
}

/// `paths` in a roots file of this process under `state_dir`.
fn hold_in_file(state_dir: &Path, paths: &[Vec<u8>]) -> Result<Holder, GcRootsError> {
    let mut local = LocalRoots::create(state_dir)?;
    local.add(paths)?;
    Ok(Holder::Local(local))
}

/// Makes `holder` (the daemon or the local protocol) hold `new` instead of `old`, never
/// without the paths in both: paths are added first; dropping some takes a new daemon
/// connection holding `new` before the old one closes, or a rewrite of the roots file that
/// no collector can see halfway.
fn replace_held(holder: &mut Holder, old: &[Vec<u8>], new: &[Vec<u8>]) -> Result<(), GcRootsError> {
    let added: Vec<Vec<u8>> = new.iter().filter(|p| !old.contains(p)).cloned().collect();
    let dropping = old.iter().any(|p| !new.contains(p));
    match holder {
        Holder::Off | Holder::Kept(_) => Ok(()),
        Holder::Daemon { socket, conn } => {
            if !dropping {
                return conn.add_temp_roots(&added).map_err(|e| e.at(socket));
            }
            // The worker keeps a connection's roots until it closes: a new one holds the
            // new set before the old one goes.
            let replacement = hold_through_daemon(&socket.clone(), new)?;
            *holder = replacement;
            Ok(())
        }
        Holder::Local(local) => {
            local.add(&added)?;
            if dropping {
                local.retain(new)?;
            }
            Ok(())
        }
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
            dirs: dirs.clone(),
            mode: GcRootsMode::Off,
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
        let printed = printed_paths(&dirs.store_dir, paths);
        let held = |holder| TempRoots {
            holder,
            paths: printed.clone(),
            dirs: dirs.clone(),
            mode,
        };

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
                    return Ok(held(Holder::Daemon {
                        socket: dirs.daemon_socket.clone(),
                        conn,
                    }));
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
        let holder = hold_in_file(&dirs.state_dir, &printed)?;
        if let Holder::Local(local) = &holder {
            tracing::info!(
                paths = printed.len(),
                "garbage collector roots held in {}",
                local.file_path.display()
            );
        }
        Ok(held(holder))
    }

    /// What holds the roots: `"daemon"`, `"local"`, or `None` when nothing does (off, or
    /// a keeper that has lost them).
    pub fn held_by(&self) -> Option<&'static str> {
        match &self.holder {
            Holder::Off => None,
            Holder::Daemon { .. } => Some("daemon"),
            Holder::Local(_) => Some("local"),
            Holder::Kept(keeper) => keeper.gate().held_by(),
        }
    }

    /// The roots file, when the local protocol holds them in this process.
    pub fn roots_file(&self) -> Option<&Path> {
        match &self.holder {
            Holder::Local(l) => Some(&l.file_path),
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

    /// Hands the roots to a keeper process, forked here, for the rest of this value's life:
    /// it holds them (the same daemon connection, or a roots file under its own pid, this
    /// process's file removed once the keeper's is written), watches the nix-daemon
    /// connection and takes the roots again when it hangs up (a worker killed or out of
    /// memory), through a new connection or else the roots file where the state directory
    /// is writable. [`TempRoots::gate`] says whether they are held meanwhile.
    ///
    /// For a daemon that is about to give up what a keeper needs (connecting, creating
    /// files: the sandbox). Must be called while the process has one thread. The keeper
    /// logs as this process does: it keeps standard error when `keep_stderr` (a daemon in
    /// the foreground), and the log file's descriptor `log_fd`; it closes every other
    /// descriptor, and exits once this value is dropped or this process dies. Nothing to
    /// do when no roots are held, or a keeper holds them already.
    pub fn keep_outside(
        &mut self,
        keep_stderr: bool,
        log_fd: Option<std::os::fd::RawFd>,
    ) -> Result<(), GcRootsError> {
        let start = match std::mem::replace(&mut self.holder, Holder::Off) {
            Holder::Daemon { socket, conn } => keeper::Start::Daemon { socket, conn },
            Holder::Local(local) => keeper::Start::Local(local),
            other => {
                self.holder = other;
                return Ok(());
            }
        };
        let options = keeper::Options {
            dirs: self.dirs.clone(),
            mode: self.mode,
            keep_stderr,
            keep_fds: log_fd.into_iter().collect(),
        };
        match keeper::Keeper::spawn(start, &self.paths, options) {
            Ok(keeper) => {
                self.holder = Holder::Kept(keeper);
                Ok(())
            }
            Err(failed) => {
                let (e, start) = *failed;
                self.holder = match start {
                    keeper::Start::Daemon { socket, conn } => Holder::Daemon { socket, conn },
                    keeper::Start::Local(local) => Holder::Local(local),
                };
                Err(e)
            }
        }
    }

    /// What the request path asks before serving: whether the roots are held right now.
    /// With a keeper, it follows the keeper (taken again, being taken again, lost, the
    /// keeper gone); without one, the roots are held by this process for its life (or none
    /// were asked for) and the gate is always open.
    pub fn gate(&self) -> RootsGate {
        match &self.holder {
            Holder::Kept(keeper) => keeper.gate(),
            _ => RootsGate::open(),
        }
    }

    /// Makes the roots hold exactly `paths` (of the store directory they were taken for),
    /// and returns once they do: for changing what is served while serving. Paths to add
    /// must be added before anything makes them visible, and paths to drop dropped only
    /// after nothing serves them any more, so a change takes two calls: the union first,
    /// then the new set. No collector sees the roots without a path that both sets hold:
    /// the nix-daemon gets a new connection holding the new set before the old one closes,
    /// and a roots file is rewritten under the shared `gc.lock` (see the `local` module).
    /// On error the old set is still held, and any path to add may not be.
    pub fn replace(&mut self, paths: &[StorePath]) -> Result<(), GcRootsError> {
        if matches!(self.holder, Holder::Off) {
            return Ok(());
        }
        let new = printed_paths(&self.dirs.store_dir, paths);
        match &mut self.holder {
            Holder::Kept(keeper) => keeper.replace(&new)?,
            holder => replace_held(holder, &self.paths, &new)?,
        }
        self.paths = new;
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

#[cfg(test)]
pub(crate) mod testing {
    use super::local::flock;
    use super::*;
    use rustix::fs::FlockOperation;
    use std::fs::File;

    pub(crate) const NAMES: [&str; 3] = [
        "0c7c0xbqkqi3i8a1xndh6h8gwb3sw0nb-hello-2.12",
        "1b7c0xbqkqi3i8a1xndh6h8gwb3sw0nb-glibc-2.40",
        "2a7c0xbqkqi3i8a1xndh6h8gwb3sw0nb-bash-5.2",
    ];

    pub(crate) struct Fixture {
        pub(crate) _tmp: tempfile::TempDir,
        pub(crate) dirs: NixDirs,
        pub(crate) paths: Vec<StorePath>,
    }

    pub(crate) fn fixture() -> Fixture {
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

    pub(crate) fn printed(f: &Fixture) -> Vec<String> {
        NAMES
            .iter()
            .map(|n| format!("{}/{n}", f.dirs.store_dir.display()))
            .collect()
    }

    /// The roots file's entries, as the collector parses them.
    pub(crate) fn entries(path: &Path) -> Vec<String> {
        let text = std::fs::read(path).unwrap();
        assert_eq!(text.last(), Some(&0), "entries end with NUL");
        text.split(|b| *b == 0)
            .filter(|s| !s.is_empty())
            .map(|s| String::from_utf8(s.to_vec()).unwrap())
            .collect()
    }

    pub(crate) fn locked_by_someone_else(path: &Path) -> bool {
        let other = File::options().read(true).write(true).open(path).unwrap();
        !flock(&other, FlockOperation::NonBlockingLockExclusive, path).unwrap()
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;
    use local::{flock, open_lock_file};
    use rustix::fs::FlockOperation;

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

    #[test]
    fn off_holds_nothing() {
        let f = fixture();
        let roots =
            TempRoots::hold_with(GcRootsMode::Off, &f.dirs, &f.dirs.store_dir, &f.paths).unwrap();
        assert_eq!(roots.held_by(), None);
        assert!(!f.dirs.state_dir.join("temproots").exists());
    }

    #[test]
    fn replace_without_a_keeper_adds_then_drops() {
        let f = fixture();
        let extra = StorePath::new("3a7c0xbqkqi3i8a1xndh6h8gwb3sw0nb-extra").unwrap();
        let extra_printed = format!("{}/{}", f.dirs.store_dir.display(), extra.base_name());
        let mut union = f.paths.clone();
        union.push(extra.clone());
        let new = vec![f.paths[0].clone(), extra];

        let mut local =
            TempRoots::hold_with(GcRootsMode::Local, &f.dirs, &f.dirs.store_dir, &f.paths).unwrap();
        local.replace(&union).unwrap();
        let mut expected = printed(&f);
        expected.push(extra_printed.clone());
        assert_eq!(entries(local.roots_file().unwrap()), expected);
        local.replace(&new).unwrap();
        assert_eq!(
            entries(local.roots_file().unwrap()),
            vec![printed(&f)[0].clone(), extra_printed.clone()]
        );
        drop(local);

        let daemon = super::daemon::fake::FakeDaemon::start(&f.dirs.daemon_socket);
        let mut held =
            TempRoots::hold_with(GcRootsMode::Daemon, &f.dirs, &f.dirs.store_dir, &f.paths)
                .unwrap();
        held.replace(&new).unwrap();
        assert_eq!(daemon.roots(1), vec![printed(&f)[0].clone(), extra_printed]);
        daemon.wait_for("the first connection closed", |e| {
            e.contains(&super::daemon::fake::Event::Closed(0))
        });
        assert_eq!(daemon.open(), vec![1]);
        // Without a keeper, the gate is always open.
        assert!(held.gate().is_held());
        drop(held);

        let mut off =
            TempRoots::hold_with(GcRootsMode::Off, &f.dirs, &f.dirs.store_dir, &f.paths).unwrap();
        off.replace(&new).unwrap();
        assert_eq!(off.held_by(), None);
    }
}
