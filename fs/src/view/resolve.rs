//! Reaching host objects: from a descriptor the view holds (the store directory or a
//! cached ancestor), one component at a time with `O_NOFOLLOW`, checking each object found
//! against the identity recorded for it, and never using a cached directory the kernel
//! no longer places where it was found.

use std::ffi::OsStr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;

use rustix::fs::{Mode, OFlags, Statx};
use rustix::io::Errno;

use super::attr::{kind_of, DirEntry, Kind};
use super::dircache::CachedDir;
use super::error::ViewError;
use super::identity::{status_at, status_fd, statx_at, statx_fd, HostId, Status};
use super::numbering::InodeMap;
use super::records::{Known, Version};
use super::{io_err, NodeId, Result, View};
use crate::warn_limited;

/// How deep a chain of directories resolution follows before it takes the chain for a
/// cycle (possible only when the host moves directories around while served).
pub(super) const MAX_DEPTH: usize = 4096;

/// The path of descriptor `fd` below `/proc`.
pub(super) fn fd_path(fd: i32) -> String {
    format!("self/fd/{fd}")
}

/// Where the kernel places the object of `fd`: the target of its `/proc/self/fd` link.
pub(super) fn place_of(proc_fd: &OwnedFd, fd: BorrowedFd<'_>) -> Result<Vec<u8>> {
    let target = rustix::fs::readlinkat(proc_fd, fd_path(fd.as_raw_fd()).as_str(), Vec::new())?;
    Ok(target.into_bytes())
}

/// Opens directory `path` (`O_PATH`) as the base every resolution starts from.
pub(super) fn open_dir(path: &Path) -> std::result::Result<(OwnedFd, Status), ViewError> {
    let err = |e: Errno| ViewError::StoreDir {
        path: path.to_owned(),
        source: io_err(e),
    };
    let fd = rustix::fs::open(
        path,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(err)?;
    let status = status_fd(fd.as_fd()).map_err(err)?;
    Ok((fd, status))
}

/// The entries of the directory `dir` (an `O_PATH` descriptor of the object `host`),
/// without `.` and `..`. An entry that vanishes while listed is left out.
pub(super) fn read_entries(
    dir: BorrowedFd<'_>,
    host: &HostId,
    inodes: &InodeMap,
) -> Result<Vec<DirEntry>> {
    // Reading entries needs a real open of the directory, reached through the verified
    // descriptor so that it is the same one.
    let fd = rustix::fs::openat(
        dir,
        ".",
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let mut entries = Vec::new();
    let mut reader = rustix::fs::Dir::new(fd)?;
    while let Some(entry) = reader.read() {
        let entry = entry?;
        let name = entry.file_name().to_bytes();
        if name == b"." || name == b".." {
            continue;
        }
        let name = OsStr::from_bytes(name);
        let kind = match Kind::from_file_type(entry.file_type()) {
            Some(kind) => kind,
            None => match statx_at(dir, name) {
                Ok(st) => kind_of(&st),
                Err(Errno::NOENT) => continue,
                Err(e) => return Err(e),
            },
        };
        entries.push(DirEntry {
            name: name.to_owned(),
            ino: inodes.direct(host.dev, host.mnt, entry.ino()).unwrap_or(0),
            kind,
        });
    }
    Ok(entries)
}

impl View {
    pub(super) fn known(&self, id: NodeId) -> Result<Arc<Known>> {
        self.known.get(&id).map(|k| k.clone()).ok_or(Errno::STALE)
    }

    /// A verified `O_PATH` descriptor of directory `node`, from the cache or opened one
    /// component at a time from the nearest cached ancestor (or the store).
    pub(super) fn dir_fd(&self, node: &Arc<Known>) -> Result<Arc<CachedDir>> {
        if node.kind != Kind::Directory {
            return Err(Errno::NOTDIR);
        }
        if let Some(dir) = self.cached_dir(node) {
            return Ok(dir);
        }
        // The uncached chain up to the store or a cached ancestor, walked iteratively so
        // no request recurses on the host's depth.
        let mut chain = vec![(node.clone(), node.primary())];
        let mut base: Option<Arc<CachedDir>> = None;
        while let Some(parent) = chain.last().and_then(|(_, n)| n.parent.clone()) {
            if let Some(dir) = self.cached_dir(&parent) {
                base = Some(dir);
                break;
            }
            if chain.len() >= MAX_DEPTH {
                warn_limited!(self.warnings, store = %self.store_dir.display(), "directories on the host form a cycle; refusing them");
                return Err(Errno::LOOP);
            }
            let name = parent.primary();
            chain.push((parent, name));
        }
        for (node, name) in chain.iter().rev() {
            let (base_fd, base_place) = match &base {
                Some(dir) => (dir.fd.as_fd(), dir.place.as_slice()),
                None => {
                    self.check_served(&name.name)?;
                    (self.store.as_fd(), self.store_place.as_slice())
                }
            };
            let fd = rustix::fs::openat(
                base_fd,
                name.name.as_os_str(),
                OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| self.gone(e, node))?;
            let status = status_fd(fd.as_fd())?;
            self.check_identity(&status, node)?;
            let mut place = Vec::with_capacity(base_place.len() + 1 + name.name.len());
            place.extend_from_slice(base_place);
            place.push(b'/');
            place.extend_from_slice(name.name.as_bytes());
            let dir = Arc::new(CachedDir {
                fd,
                host: node.host,
                place,
            });
            self.dirs.insert(node.node, dir.clone());
            // Opened by name from a directory proved where it belongs: as good as checked,
            // for the rest of this request.
            self.mark_checked(node.node, &dir);
            base = Some(dir);
        }
        Ok(base.expect("the chain has at least one directory"))
    }

    /// The cached descriptor of directory `node`, if there is one for its object and the
    /// kernel still places that directory where it was found.
    pub(super) fn cached_dir(&self, node: &Known) -> Option<Arc<CachedDir>> {
        let dir = self.dirs.get(node.node)?;
        if dir.host == node.host {
            // Proved where it belongs earlier in this request (see `checked.rs`).
            if self.checked_in_request(node.node, &dir) {
                return Some(dir);
            }
            if place_of(&self.proc_fd, dir.fd.as_fd()).ok()? == dir.place {
                self.mark_checked(node.node, &dir);
                return Some(dir);
            }
        }
        // Moved (or another object under the same number): resolve it afresh.
        self.dirs.remove(node.node);
        None
    }

    /// Checks that `st` is the host object recorded as `node`.
    pub(super) fn check_identity(&self, status: &Status, node: &Known) -> Result<()> {
        if status.host != node.host || kind_of(&status.st) != node.kind {
            warn_limited!(self.warnings, node = node.node, store = %self.store_dir.display(), "host object replaced while served; refusing it");
            return Err(Errno::STALE);
        }
        Ok(())
    }

    /// Maps a failure to reach `node` on the host to what the client sees: the node is
    /// stale (the kernel then looks its name up again).
    pub(super) fn gone(&self, e: Errno, node: &Known) -> Errno {
        match e {
            Errno::NOENT | Errno::NOTDIR | Errno::LOOP => {
                tracing::debug!(node = node.node, store = %self.store_dir.display(), "host object gone or replaced: {e}");
                Errno::STALE
            }
            other => other,
        }
    }

    /// Runs `f` on `node` found by name: with the descriptor of the directory holding it
    /// and its name there. Each recorded name is tried in turn (hard links), the first that
    /// works is tried first from then on.
    pub(super) fn resolve<T>(
        &self,
        node: &Arc<Known>,
        f: impl Fn(BorrowedFd<'_>, &OsStr) -> Result<T>,
    ) -> Result<T> {
        let names = node.names.lock().clone();
        let mut first_err = Errno::STALE;
        for (i, name) in names.iter().enumerate() {
            let result = match &name.parent {
                None => self
                    .check_served(&name.name)
                    .and_then(|()| f(self.store.as_fd(), &name.name)),
                Some(parent) => self
                    .dir_fd(parent)
                    .and_then(|dir| f(dir.fd.as_fd(), &name.name)),
            };
            match result {
                Ok(v) => {
                    if i > 0 {
                        node.prefer(i);
                    }
                    return Ok(v);
                }
                Err(e) if i == 0 => first_err = e,
                Err(_) => {}
            }
        }
        Err(first_err)
    }

    /// The host's current status of `node`, checked to still be the same object.
    pub(super) fn stat_node(&self, node: &Arc<Known>) -> Result<Statx> {
        // A directory whose descriptor is cached (and still where it was found) is that
        // very object, checked in full when it was opened: its status is all it takes,
        // with no file handle to take again.
        if node.kind == Kind::Directory {
            if let Some(dir) = self.cached_dir(node) {
                return statx_fd(dir.fd.as_fd());
            }
        }
        self.resolve(node, |dir, name| {
            let status = status_at(dir, name).map_err(|e| self.gone(e, node))?;
            self.check_identity(&status, node)?;
            Ok(status.st)
        })
    }

    /// An `O_PATH` descriptor of `node`, checked to be its object.
    pub(super) fn path_fd(&self, node: &Arc<Known>) -> Result<(OwnedFd, Statx)> {
        self.resolve(node, |dir, name| {
            let fd = rustix::fs::openat(
                dir,
                name,
                OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| self.gone(e, node))?;
            let status = status_fd(fd.as_fd())?;
            self.check_identity(&status, node)?;
            Ok((fd, status.st))
        })
    }

    /// Refuses (`EIO`) to open a file whose size or modification time changed on the host
    /// since they were reported: the client's kernel would clip or zero-fill its reads
    /// by the size it believes, and differently with and without passthrough.
    pub(super) fn check_unchanged(&self, node: &Known, st: &Statx) -> Result<()> {
        if *node.reported.lock() != Version::of(st) {
            warn_limited!(self.warnings, node = node.node, store = %self.store_dir.display(), "a file changed on the host since it was looked up; refusing to open it");
            return Err(Errno::IO);
        }
        Ok(())
    }

    /// Opens the object of a verified `O_PATH` descriptor for reading.
    pub(super) fn reopen(&self, path: &OwnedFd) -> Result<OwnedFd> {
        rustix::fs::openat(
            &self.proc_fd,
            fd_path(path.as_raw_fd()).as_str(),
            OFlags::RDONLY | OFlags::NOCTTY | OFlags::CLOEXEC,
            Mode::empty(),
        )
    }
}
