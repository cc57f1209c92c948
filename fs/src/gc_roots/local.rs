//! The temporary roots file protocol of the local store: `temproots/<pid>` under the
//! state directory, appended to under a shared `flock` of `gc.lock`, held with an exclusive
//! `flock` of its own for the life of its owner (a collector that can take that lock knows
//! the owner is gone and deletes the file), and, while a collection holds `gc.lock`,
//! announced to the collector through its `gc-socket/socket`.

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
        })
    }

    /// Records `paths` as roots: a collection that has not started yet will read them from
    /// the file, one that is running is told through its socket first.
    pub(super) fn add(&mut self, paths: &[Vec<u8>]) -> Result<(), GcRootsError> {
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
    pub(super) fn release_for_fork(&mut self) {
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
}
