//! The temporary roots file protocol of the local store: `temproots/<pid>` under the
//! state directory, appended to under a shared `flock` of `gc.lock`, held with an exclusive
//! `flock` of its own for the life of its owner (a collector that can take that lock knows
//! the owner is gone and deletes the file), and, while a collection holds `gc.lock`,
//! announced to the collector through its `gc-socket/socket`.
//!
//! That socket is what lets a process take new roots while a collection runs. Nix has it
//! from 2.5 on (and Lix, which forked later); the collectors of Nix 2.4 and older have none,
//! and wait instead for every live roots file's owner to let go of its lock. So local mode
//! supports collectors of Nix 2.5 and later. An older one is answered with an error rather
//! than a wait: a collection that holds `gc.lock` without listening on the socket for
//! [`COLLECTOR_PATIENCE`] fails the registration, naming the collector, and a collector
//! waiting for our file's lock is reported by [`LocalRoots::waiting_collectors`].

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustix::fs::FlockOperation;

use super::{io_error, GcRootsError};

/// How long to wait before asking a collector's socket again when it is not listening yet.
const GC_SOCKET_RETRY: Duration = Duration::from_millis(100);
/// How often to say that a collection keeps us waiting.
const SOCKET_WAIT_WARNING: Duration = Duration::from_secs(10);
/// How long a collection may hold `gc.lock` without listening on its socket before it is
/// taken for a collector older than Nix 2.5: one of 2.5 or later listens right after it
/// takes the lock, and closes the socket only just before it lets the lock go.
pub(super) const COLLECTOR_PATIENCE: Duration = Duration::from_secs(10);

/// The local temporary roots protocol.
pub(super) struct LocalRoots {
    pub(super) state_dir: PathBuf,
    /// `<state>/temproots/<pid>`, exclusively locked while open.
    pub(super) file: File,
    pub(super) file_path: PathBuf,
    pub(super) pid: u32,
    /// `<state>/gc.lock`: shared while appending, exclusive while a collection runs.
    pub(super) gc_lock: File,
    pub(super) gc_lock_path: PathBuf,
    /// A live connection to a running collector, when there is one.
    pub(super) gc_socket: Option<UnixStream>,
    /// Set once the file is left to its old owner after a fork: nothing to unlink.
    pub(super) released: bool,
    /// The entries in the file, in order.
    pub(super) held: Vec<Vec<u8>>,
    /// How long to wait for a running collection to listen on its socket.
    pub(super) patience: Duration,
}

pub(super) fn flock(file: &File, op: FlockOperation, path: &Path) -> Result<bool, GcRootsError> {
    loop {
        match rustix::fs::flock(file, op) {
            Ok(()) => return Ok(true),
            Err(rustix::io::Errno::WOULDBLOCK) => return Ok(false),
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(io_error("locking", path)(e.into())),
        }
    }
}

pub(super) fn open_lock_file(path: &Path) -> Result<File, GcRootsError> {
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
    pub(super) fn create(state_dir: &Path) -> Result<LocalRoots, GcRootsError> {
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
            held: Vec::new(),
            patience: COLLECTOR_PATIENCE,
        })
    }

    /// Appends `entries` to the file, and to what it is known to hold.
    fn append(&mut self, entries: &[Vec<u8>]) -> Result<(), GcRootsError> {
        let mut record = Vec::new();
        for p in entries {
            record.extend_from_slice(p);
            record.push(0);
        }
        self.file
            .write_all(&record)
            .map_err(io_error("writing", &self.file_path))?;
        self.held.extend(entries.iter().cloned());
        Ok(())
    }

    /// Records `paths` as roots: a collection that has not started yet will read them from
    /// the file, one that is running is told through its socket first.
    pub(super) fn add(&mut self, paths: &[Vec<u8>]) -> Result<(), GcRootsError> {
        // Paths in the file, and paths no collection may delete any more.
        let mut filed = 0;
        let mut done = 0;
        let mut waiting_logged = false;
        let mut next_warning = std::time::Instant::now() + SOCKET_WAIT_WARNING;
        // Since when the lock has been held with nobody listening on the socket.
        let mut unanswered_since: Option<std::time::Instant> = None;
        while done < paths.len() {
            if flock(
                &self.gc_lock,
                FlockOperation::NonBlockingLockShared,
                &self.gc_lock_path,
            )? {
                // No collection runs, and none can start until the lock is dropped: the file
                // is complete before any collector reads it.
                let written = self.append(&paths[filed..]);
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
                    Ok(s) => {
                        unanswered_since = None;
                        self.gc_socket = Some(s);
                    }
                    // Not listening yet, or already gone: look at the lock again.
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::ConnectionRefused | io::ErrorKind::NotFound
                        ) =>
                    {
                        // A collector of 2.5 or later listens within moments of taking the
                        // lock: one that does not is older, and would hold us up until it
                        // is done (and then wait for our lock itself).
                        let now = std::time::Instant::now();
                        let since = *unanswered_since.get_or_insert(now);
                        if now.duration_since(since) >= self.patience {
                            return Err(GcRootsError::CollectorWithoutSocket {
                                gc_lock: self.gc_lock_path.clone(),
                                socket: socket_path,
                                holders: describe(&lock_holders(&self.gc_lock, false)),
                                waited: self.patience,
                            });
                        }
                        if now >= next_warning {
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
            while done < paths.len() {
                let p = &paths[done];
                // Into the file first, for the collections after this one: one that starts
                // as soon as this one ends must not miss a path it was never told about.
                if filed == done {
                    self.append(std::slice::from_ref(p))?;
                    filed += 1;
                }
                let socket = self.gc_socket.as_mut().expect("connected above");
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

    /// Makes the file hold exactly `keep`, which must be among the entries it holds: for
    /// dropping roots once their paths are no longer used (paths to add go through
    /// [`LocalRoots::add`], before anything uses them).
    ///
    /// A collector reads roots files only while it holds `gc.lock` exclusively, so the file
    /// is rewritten in place under a shared hold of that lock: no collector ever sees it
    /// without an entry of `keep`. A collection running when this is asked already counts
    /// every entry; the rewrite waits until it is over. A rewrite that fails halfway is
    /// undone (the old entries written back) before the lock is let go; if even that fails,
    /// the error says the file may be incomplete.
    pub(super) fn retain(&mut self, keep: &[Vec<u8>]) -> Result<(), GcRootsError> {
        if let Some(p) = keep.iter().find(|p| !self.held.contains(p)) {
            return Err(io_error("rewriting", &self.file_path)(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{} is not held yet: add it first",
                    String::from_utf8_lossy(p)
                ),
            )));
        }
        let mut next_warning = std::time::Instant::now() + SOCKET_WAIT_WARNING;
        while !flock(
            &self.gc_lock,
            FlockOperation::NonBlockingLockShared,
            &self.gc_lock_path,
        )? {
            if std::time::Instant::now() >= next_warning {
                tracing::info!(
                    "dropping garbage collector roots waits for the collection holding {}",
                    self.gc_lock_path.display()
                );
                next_warning += SOCKET_WAIT_WARNING;
            }
            std::thread::sleep(GC_SOCKET_RETRY);
        }
        let result = self.rewrite(keep);
        flock(&self.gc_lock, FlockOperation::Unlock, &self.gc_lock_path)?;
        result
    }

    /// Replaces the file's contents with `entries`; the caller holds `gc.lock`.
    fn rewrite(&mut self, entries: &[Vec<u8>]) -> Result<(), GcRootsError> {
        use std::io::Seek;
        use std::os::unix::fs::FileExt;
        let encode = |entries: &[Vec<u8>]| {
            let mut bytes = Vec::new();
            for p in entries {
                bytes.extend_from_slice(p);
                bytes.push(0);
            }
            bytes
        };
        let write = |file: &mut File, bytes: &[u8]| -> io::Result<()> {
            file.write_all_at(bytes, 0)?;
            file.set_len(bytes.len() as u64)?;
            // Appends go after the last entry: a hole would read as empty entries.
            file.seek(io::SeekFrom::End(0)).map(|_| ())
        };
        match write(&mut self.file, &encode(entries)) {
            Ok(()) => {
                self.held = entries.to_vec();
                Ok(())
            }
            Err(e) => {
                let old = encode(&self.held);
                match write(&mut self.file, &old) {
                    Ok(()) => Err(io_error("rewriting", &self.file_path)(e)),
                    Err(again) => Err(io_error("rewriting", &self.file_path)(io::Error::new(
                        e.kind(),
                        format!(
                            "{e}, and writing the old entries back failed too ({again}): \
                             the file may lack roots"
                        ),
                    ))),
                }
            }
        }
    }

    /// Processes waiting for this file's lock, as `(pid, command name)`. Only collectors
    /// older than Nix 2.5 wait for it (newer ones only try it): such a collection stalls
    /// until the file's owner exits.
    pub(super) fn waiting_collectors(&self) -> Vec<(u32, String)> {
        lock_holders(&self.file, true)
    }

    /// Gives up the parent's file after a fork without touching its lock (shared with the
    /// parent until it exits): the name is unlinked so that no stale file is left over.
    pub(super) fn release_for_fork(&mut self) {
        self.released = true;
        if let Err(e) = std::fs::remove_file(&self.file_path) {
            tracing::debug!("cannot remove {}: {e}", self.file_path.display());
        }
    }
}

/// Processes holding (or, with `waiting`, waiting for) a `flock` of `file`, as listed in
/// `/proc/locks`: `(pid, command name)`. Empty when that cannot be read.
pub(super) fn lock_holders(file: &File, waiting: bool) -> Vec<(u32, String)> {
    use std::os::unix::fs::MetadataExt;
    let (Ok(meta), Ok(table)) = (file.metadata(), std::fs::read_to_string("/proc/locks")) else {
        return Vec::new();
    };
    // The kernel prints the device as `%02x:%02x` (major, minor) and the inode in decimal.
    let id = format!(
        "{:02x}:{:02x}:{}",
        rustix::fs::major(meta.dev()),
        rustix::fs::minor(meta.dev()),
        meta.ino()
    );
    let mut found = Vec::new();
    for line in table.lines() {
        // `N: [->] FLOCK ADVISORY WRITE PID MAJ:MIN:INO START END`; `->` marks a waiter.
        let fields: Vec<&str> = line.split_whitespace().skip(1).collect();
        let (is_waiter, fields) = match fields.split_first() {
            Some((&"->", rest)) => (true, rest),
            _ => (false, &fields[..]),
        };
        if is_waiter != waiting || fields.len() < 5 || fields[0] != "FLOCK" || fields[4] != id {
            continue;
        }
        if let Ok(pid) = fields[3].parse::<u32>() {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .map(|c| c.trim_end().to_owned())
                .unwrap_or_default();
            if !found.iter().any(|(p, _)| *p == pid) {
                found.push((pid, comm));
            }
        }
    }
    found
}

/// `pid 12 (nix-store), pid 34 (nix)`, or `unknown` when no process was found.
pub(super) fn describe(processes: &[(u32, String)]) -> String {
    if processes.is_empty() {
        return "unknown".to_owned();
    }
    processes
        .iter()
        .map(|(pid, comm)| format!("pid {pid} ({comm})"))
        .collect::<Vec<_>>()
        .join(", ")
}

impl Drop for LocalRoots {
    fn drop(&mut self) {
        // As Nix does at exit; the lock goes with the descriptor. Only the owner unlinks.
        if !self.released && self.pid == std::process::id() {
            let _ = std::fs::remove_file(&self.file_path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::super::{GcRootsMode, TempRoots};
    use super::*;
    use std::os::unix::net::UnixListener;
    use std::sync::mpsc;

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

    fn bytes(paths: &[String]) -> Vec<Vec<u8>> {
        paths.iter().map(|p| p.clone().into_bytes()).collect()
    }

    /// Holds gc.lock exclusively, as a collection does, until dropped.
    fn hold_gc_lock(f: &Fixture) -> File {
        let gc_lock = open_lock_file(&f.dirs.state_dir.join("gc.lock")).unwrap();
        assert!(flock(
            &gc_lock,
            FlockOperation::NonBlockingLockExclusive,
            Path::new("")
        )
        .unwrap());
        gc_lock
    }

    #[test]
    fn a_collector_without_a_socket_is_an_error_not_a_wait() {
        // A collector of Nix 2.4 or older: gc.lock held, no socket ever.
        let f = fixture();
        let gc_lock = hold_gc_lock(&f);
        let mut local = LocalRoots::create(&f.dirs.state_dir).unwrap();
        local.patience = Duration::from_millis(300);
        let started = std::time::Instant::now();
        let e = local.add(&bytes(&printed(&f))).unwrap_err();
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "waited {:?}",
            started.elapsed()
        );
        assert!(
            matches!(e, GcRootsError::CollectorWithoutSocket { .. }),
            "{e}"
        );
        let text = e.to_string();
        for needle in [
            "gc.lock",
            "gc-socket/socket",
            "Nix 2.5",
            "--gc-roots daemon",
        ] {
            assert!(text.contains(needle), "{needle} missing: {text}");
        }
        // The holder is named: this process, here.
        assert!(
            text.contains(&format!("pid {}", std::process::id())),
            "{text}"
        );
        drop(gc_lock);
    }

    #[test]
    fn retain_drops_entries_and_appends_after_the_rest() {
        let f = fixture();
        let all = printed(&f);
        let mut local = LocalRoots::create(&f.dirs.state_dir).unwrap();
        local.add(&bytes(&all)).unwrap();
        let keep = vec![all[0].clone(), all[2].clone()];
        local.retain(&bytes(&keep)).unwrap();
        assert_eq!(entries(&local.file_path), keep);
        // The file is still ours, locked, and later entries follow the kept ones directly.
        assert!(locked_by_someone_else(&local.file_path));
        local.add(&bytes(&all[1..2])).unwrap();
        assert_eq!(
            entries(&local.file_path),
            vec![all[0].clone(), all[2].clone(), all[1].clone()]
        );
        let text = std::fs::read(&local.file_path).unwrap();
        assert!(
            !text.windows(2).any(|w| w == [0, 0]),
            "an empty entry: {text:?}"
        );
        // Nothing kept: an empty file, still locked.
        local.retain(&[]).unwrap();
        assert_eq!(std::fs::metadata(&local.file_path).unwrap().len(), 0);
        assert!(locked_by_someone_else(&local.file_path));
    }

    #[test]
    fn retain_refuses_paths_not_held() {
        let f = fixture();
        let all = printed(&f);
        let mut local = LocalRoots::create(&f.dirs.state_dir).unwrap();
        local.add(&bytes(&all[..1])).unwrap();
        let e = local.retain(&bytes(&all[..2])).unwrap_err().to_string();
        assert!(e.contains(&all[1]) && e.contains("add it first"), "{e}");
        assert_eq!(entries(&local.file_path), all[..1]);
    }

    #[test]
    fn retain_waits_for_a_running_collection() {
        // A running collection has read every entry; the file must not change under it.
        let f = fixture();
        let all = printed(&f);
        let mut local = LocalRoots::create(&f.dirs.state_dir).unwrap();
        local.add(&bytes(&all)).unwrap();
        let path = local.file_path.clone();
        let gc_lock = hold_gc_lock(&f);
        let keep = bytes(&all[..1]);
        let thread = std::thread::spawn(move || {
            local.retain(&keep).unwrap();
            local
        });
        std::thread::sleep(Duration::from_millis(400));
        assert!(
            !thread.is_finished(),
            "rewritten under a running collection"
        );
        assert_eq!(entries(&path), all);
        drop(gc_lock);
        let local = thread.join().unwrap();
        assert_eq!(entries(&local.file_path), all[..1]);
    }

    #[test]
    fn a_collector_waiting_for_the_files_lock_is_reported() {
        // Collectors of Nix 2.4 and older wait for a shared lock of every live roots file.
        let f = fixture();
        let mut local = LocalRoots::create(&f.dirs.state_dir).unwrap();
        local.add(&bytes(&printed(&f))).unwrap();
        assert_eq!(local.waiting_collectors(), Vec::new());
        let path = local.file_path.clone();
        let waiter = std::thread::spawn(move || {
            let file = File::open(&path).unwrap();
            flock(&file, FlockOperation::LockShared, &path).unwrap();
        });
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let found = loop {
            let found = local.waiting_collectors();
            if !found.is_empty() || std::time::Instant::now() > deadline {
                break found;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].0, std::process::id());
        assert!(describe(&found).starts_with(&format!("pid {} (", std::process::id())));
        // The owner going lets the waiter through.
        drop(local);
        waiter.join().unwrap();
    }
}
