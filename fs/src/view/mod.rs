//! The closure view: a read-only tree holding exactly the closure's store paths.
//!
//! Everything here is independent of FUSE: the view answers lookups, attribute queries,
//! directory listings, symlink reads and opens with plain Rust types, so it could be served
//! over another transport (or walked directly, as `mkimage` does).
//!
//! # Resolution
//!
//! Nodes never hold a path string. Each node records where it was found (its parent node
//! and its name there) and the full identity of the host object it was found to be (see
//! [`HostId`]). To reach the host object the view starts from a directory descriptor it
//! holds (the store directory, or a cached ancestor) and opens one component at a time
//! with `O_NOFOLLOW`, checking at every step that the object found is the one recorded and
//! that no mount point was crossed. A directory replaced by a symlink fails to open as a
//! directory; an object replaced by another fails the identity check. Either way the
//! request fails (`ESTALE`) instead of following the host somewhere outside the closure.
//!
//! A cached directory descriptor is only used while the kernel still places it where it
//! was found: a directory moved on the host, out of the store or within it, stops being
//! served at once, and its name is resolved afresh from the store.
//!
//! # Node numbers
//!
//! A node's number is the host inode number where that is unambiguous (an object on the
//! store's own mount and device, numbered below 2^63), so it is the same every time the
//! kernel looks the object up again and hard links share it. Any other object (another
//! device, such as a btrfs subvolume; an inode number with the top bit set, as overlayfs
//! gives with `xino`; an inode number reused while the previous object is still in use)
//! gets a number from a table, counted from 2^63, so that two host objects never share one.
//!
//! # Node records
//!
//! Records of nodes the kernel holds live as long as it holds them. Records of nodes it
//! has forgotten are kept in a bounded LRU ([`ViewOptions::max_forgotten_nodes`]): a
//! re-exporting server (virtiofsd, NFS) can hand back a file handle long after the kernel
//! forgot its node, and the view must still know where the node is. Each record carries a
//! generation that a later record for the same number never repeats, so a file handle
//! older than what the LRU remembers gets `ESTALE` instead of reaching another object.

use std::ffi::OsStr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Arc;

use arc_swap::ArcSwap;
use dashmap::DashMap;
use lru::LruCache;
use parking_lot::Mutex;
use rustix::fs::{Mode, OFlags};
use rustix::io::Errno;

mod attr;
mod checked;
mod dircache;
mod error;
mod identity;
mod numbering;
mod records;
mod resolve;
mod served;
#[cfg(test)]
mod tests;

pub use self::attr::{Attr, DirEntry, Kind, Time};
pub use self::error::ViewError;
pub use self::identity::HostId;
pub use self::served::{Change, Missing, Removal, Updated};

use self::attr::{attr_of, kind_of};
use self::dircache::DirCache;
use self::identity::{is_mount_root, status_at, status_fd, Status};
use self::numbering::InodeMap;
use self::records::{Candidate, Known, Live, Reference};
use self::resolve::{open_dir, place_of, read_entries};
use self::served::{closure_root, examine, Served};
use crate::closure::Closure;
use crate::ratelimit::Limiter;
use crate::store_path::StorePath;
use crate::warn_limited;

/// A node number as the kernel sees it; also the inode number the view reports.
pub type NodeId = u64;

/// The node number of the view's root directory.
pub const ROOT_ID: NodeId = 1;

/// The result type of view operations: failures are plain errno values, ready to hand to a
/// transport.
pub type Result<T> = std::result::Result<T, Errno>;

/// Tuning for a [`View`].
#[derive(Clone, Debug)]
pub struct ViewOptions {
    /// How many directory descriptors to keep open at most. Each looked-up directory would
    /// otherwise need one; the cache keeps the hot ones and reopens the rest on demand.
    pub max_cached_dirs: usize,
    /// How many nodes the kernel has forgotten to remember at most, for re-export (file
    /// handles): the least recently forgotten go first, and a handle naming one gets
    /// `ESTALE`. A record costs about 300 bytes; the default stays under 32 MiB.
    pub max_forgotten_nodes: usize,
    /// Follow names into other mounts below the served tree. Off by default: a bind
    /// mount or tmpfs placed inside a store path is not part of the closure.
    pub cross_mounts: bool,
}

impl Default for ViewOptions {
    fn default() -> Self {
        ViewOptions {
            max_cached_dirs: 512,
            max_forgotten_nodes: 65_536,
            cross_mounts: false,
        }
    }
}

/// What an open asks for: the view only ever reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Reading.
    Read,
    /// Writing, truncating or appending: refused with `EROFS`.
    Write,
}

impl Access {
    /// The access open(2) `flags` ask for.
    pub fn of_flags(flags: i32) -> Access {
        if flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0 {
            Access::Write
        } else {
            Access::Read
        }
    }
}

/// A regular file opened by [`View::open`].
#[derive(Debug)]
pub struct HostFile {
    /// The host file, read-only.
    pub fd: OwnedFd,
    /// Its size when opened, from the same status that checked its identity.
    pub size: u64,
}

/// Counts of what the view holds, for logs and tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ViewStats {
    /// Nodes the kernel holds.
    pub live: usize,
    /// Node records kept, live or forgotten.
    pub records: usize,
    /// Allocated node numbers kept.
    pub allocated: usize,
    /// Cached directory descriptors.
    pub cached_dirs: usize,
}

/// The read-only view of one closure of a host store.
pub struct View {
    store_dir: PathBuf,
    store: Arc<OwnedFd>,
    store_host: HostId,
    /// Where the kernel places the store directory, as `/proc/self/fd` shows it: the
    /// start of every cached directory's expected place.
    store_place: Vec<u8>,
    /// `/proc`, for checking where cached directories are and for reopening verified
    /// `O_PATH` descriptors (through `self/fd/N`).
    proc_fd: OwnedFd,
    inodes: InodeMap,
    /// The served set: the root's listing and attributes, swapped whole by an update.
    served: ArcSwap<Served>,
    /// Serialises what changes the served set (updates, releases of retiring paths).
    updating: Mutex<()>,
    /// How many updates were made: the root's times.
    versions: AtomicU64,
    /// Set when a retiring path is released, until [`View::take_released`].
    released: AtomicBool,
    known: DashMap<NodeId, Arc<Known>>,
    live: DashMap<NodeId, Live>,
    /// Forgotten nodes whose records are kept, least recently forgotten first out.
    forgotten: Mutex<LruCache<NodeId, ()>>,
    max_forgotten: usize,
    generations: AtomicU64,
    dirs: DirCache,
    cross_mounts: bool,
    warnings: Limiter,
}

impl std::fmt::Debug for View {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("View")
            .field("store_dir", &self.store_dir)
            .field("paths", &self.served.load().listing.len())
            .field("live", &self.live.len())
            .finish()
    }
}

/// How a view was set up: which closure paths it left out.
#[derive(Debug, Default)]
pub struct Setup {
    /// Closure paths absent from the host store, left out under `allow_missing`.
    pub missing: Vec<StorePath>,
}

fn io_err(e: Errno) -> std::io::Error {
    std::io::Error::from_raw_os_error(e.raw_os_error())
}

impl View {
    /// Opens the store directory and checks that every closure path is there.
    ///
    /// Only the closure's top-level paths are examined: the store is never listed and the
    /// trees below the paths are never walked, so this costs one `statx` per closure path
    /// whatever the size of the host store.
    pub fn new(
        closure: &Closure,
        allow_missing: bool,
        options: ViewOptions,
    ) -> std::result::Result<(View, Setup), ViewError> {
        let store_dir = closure.store_dir.clone();
        let (
            store,
            Status {
                st: store_stat,
                host: store_host,
            },
        ) = open_dir(&store_dir)?;
        let inodes = InodeMap::new(&store_host);
        let found = examine(
            store.as_fd(),
            &store_dir,
            &store_host,
            &inodes,
            options.cross_mounts,
            &closure.paths,
        )?;
        let setup = Setup {
            missing: found.missing,
        };
        if !setup.missing.is_empty() && !allow_missing {
            return Err(ViewError::Missing {
                origin: closure.origin.clone(),
                store_dir,
                paths: setup.missing,
            });
        }
        let root_attr = closure_root(store_stat.stx_uid, store_stat.stx_gid, &found.listing, 0);
        let (root_listing, root_hosts) = (found.listing, found.hosts);
        let view = View::assemble(
            store_dir,
            store,
            store_host,
            root_attr,
            inodes,
            root_listing,
            root_hosts,
            options,
        )?;
        Ok((view, setup))
    }

    /// A view of everything in directory `dir`: its root lists all of `dir`'s entries. For
    /// trees that are already what should be served, such as a mounted view.
    pub fn whole_directory(
        dir: &Path,
        options: ViewOptions,
    ) -> std::result::Result<View, ViewError> {
        let (fd, Status { st, host }) = open_dir(dir)?;
        let inodes = InodeMap::new(&host);
        let err = |e: Errno| ViewError::StoreDir {
            path: dir.to_owned(),
            source: io_err(e),
        };
        let mut entries = Vec::new();
        for entry in read_entries(fd.as_fd(), &host, &inodes).map_err(err)? {
            // Each entry's identity, as for the store paths of a closure.
            match status_at(fd.as_fd(), &entry.name) {
                Ok(Status { st, host: h }) => {
                    if !options.cross_mounts && (h.mnt != host.mnt || is_mount_root(&st)) {
                        tracing::warn!(path = %dir.join(&entry.name).display(), "a mount point; leaving it out");
                        continue;
                    }
                    let ino = inodes
                        .direct(h.dev, h.mnt, h.ino)
                        .unwrap_or_else(|| inodes.allocate(&h));
                    entries.push((
                        DirEntry {
                            name: entry.name,
                            ino,
                            kind: kind_of(&st),
                        },
                        h,
                    ));
                }
                Err(Errno::NOENT) => continue,
                Err(e) => return Err(err(e)),
            }
        }
        entries.sort_by(|a, b| a.0.name.cmp(&b.0.name));
        let (root_listing, root_hosts) = entries
            .into_iter()
            .map(|(e, h)| (e, (h.dev, h.ino)))
            .unzip();
        // The directory's own attributes: the snapshot of a tree keeps its root as it is.
        let root_attr = attr_of(&st, ROOT_ID, 0);
        View::assemble(
            dir.to_owned(),
            fd,
            host,
            root_attr,
            inodes,
            root_listing,
            root_hosts,
            options,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn assemble(
        store_dir: PathBuf,
        store: OwnedFd,
        store_host: HostId,
        root_attr: Attr,
        inodes: InodeMap,
        root_listing: Vec<DirEntry>,
        root_hosts: Vec<(u64, u64)>,
        options: ViewOptions,
    ) -> std::result::Result<View, ViewError> {
        // `/proc` itself, not `/proc/self/fd`: `self` is resolved at each use, so the
        // view keeps working in a daemon that forked after it was made.
        let proc_fd = rustix::fs::open(
            "/proc",
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| ViewError::Proc { source: io_err(e) })?;
        // Only the kernel's procfs may say where descriptors are.
        const PROC_SUPER_MAGIC: i64 = 0x9fa0;
        let magic = rustix::fs::fstatfs(&proc_fd)
            .map_err(|e| ViewError::Proc { source: io_err(e) })?
            .f_type as i64;
        if magic != PROC_SUPER_MAGIC {
            return Err(ViewError::Proc {
                source: std::io::Error::other("/proc is not procfs"),
            });
        }
        let store_place =
            place_of(&proc_fd, store.as_fd()).map_err(|e| ViewError::Proc { source: io_err(e) })?;
        let max_forgotten = options.max_forgotten_nodes;
        Ok(View {
            store_dir,
            store: Arc::new(store),
            store_host,
            store_place,
            proc_fd,
            inodes,
            served: ArcSwap::from_pointee(Served::new(
                root_listing,
                root_hosts,
                root_attr,
                Default::default(),
            )),
            updating: Mutex::new(()),
            versions: AtomicU64::new(0),
            released: AtomicBool::new(false),
            known: DashMap::new(),
            live: DashMap::new(),
            forgotten: Mutex::new(LruCache::unbounded()),
            max_forgotten,
            generations: AtomicU64::new(1),
            dirs: DirCache::new(options.max_cached_dirs),
            cross_mounts: options.cross_mounts,
            warnings: Limiter::default(),
        })
    }

    /// The host directory the view serves from.
    pub fn store_dir(&self) -> &Path {
        &self.store_dir
    }

    /// The number of closure paths the root lists.
    pub fn path_count(&self) -> usize {
        self.served.load().listing.len()
    }

    /// How many nodes are currently referenced by clients.
    pub fn node_count(&self) -> usize {
        self.live.len()
    }

    /// How many directory descriptors are cached.
    pub fn cached_dir_count(&self) -> usize {
        self.dirs.len()
    }

    /// What the view holds now.
    pub fn stats(&self) -> ViewStats {
        ViewStats {
            live: self.live.len(),
            records: self.known.len(),
            allocated: self.inodes.allocated_count(),
            cached_dirs: self.dirs.len(),
        }
    }

    /// Looks `name` up in directory `parent` and, on success, counts one reference to the
    /// node returned (to be released with [`View::forget`]).
    pub fn lookup(&self, parent: NodeId, name: &OsStr) -> Result<Attr> {
        self.find(parent, name, Reference::Counted)
    }

    /// What a lookup of `name` in `parent` would return, without counting a reference:
    /// for transports that report node numbers in plain listings.
    pub fn peek(&self, parent: NodeId, name: &OsStr) -> Result<Attr> {
        self.find(parent, name, Reference::Uncounted)
    }

    fn find(&self, parent: NodeId, name: &OsStr, reference: Reference) -> Result<Attr> {
        if parent == ROOT_ID {
            let served = self.served.load();
            if name == "." || name == ".." {
                return Ok(served.attr);
            }
            let Some(index) = served.index(name) else {
                return Err(Errno::NOENT);
            };
            let Status { st, host } = status_at(self.store.as_fd(), name).map_err(|e| {
                warn_limited!(self.warnings, path = %self.store_dir.join(name).display(), "store path vanished: {e}");
                Errno::NOENT
            })?;
            let kind = kind_of(&st);
            if (host.dev, host.ino) != served.hosts[index] || kind != served.listing[index].kind {
                warn_limited!(self.warnings, path = %self.store_dir.join(name).display(), "store path replaced on the host since startup; refusing it");
                return Err(Errno::NOENT);
            }
            if !self.cross_mounts && (host.mnt != self.store_host.mnt || is_mount_root(&st)) {
                warn_limited!(self.warnings, path = %self.store_dir.join(name).display(), "store path is a mount point; not serving it");
                return Err(Errno::NOENT);
            }
            let record = self.hand_out(
                Candidate::Found {
                    host,
                    kind,
                    parent: None,
                    name,
                },
                reference,
            );
            return Ok(record.report(&st));
        }
        let dir = self.known(parent)?;
        if name == "." {
            // How the kernel finds a node it has forgotten, from a file handle: `parent` is
            // then the node itself, of any kind.
            let st = self.stat_node(&dir)?;
            let record = self.hand_out(Candidate::Existing(&dir), reference);
            return Ok(record.report(&st));
        }
        if dir.kind != Kind::Directory {
            return Err(Errno::NOTDIR);
        }
        if name == ".." {
            // Needed for re-export (FUSE_EXPORT_SUPPORT): the kernel asks for a
            // directory's parent when it reconnects a file handle.
            let Some(grandparent) = dir.primary().parent else {
                return Ok(self.served.load().attr);
            };
            let st = self.stat_node(&grandparent)?;
            let record = self.hand_out(Candidate::Existing(&grandparent), reference);
            return Ok(record.report(&st));
        }
        if name.as_bytes().contains(&b'/') {
            return Err(Errno::INVAL);
        }
        // A name in a directory that is gone or was replaced on the host is not there.
        let fd = self.dir_fd(&dir).map_err(|e| match e {
            Errno::STALE => Errno::NOENT,
            e => e,
        })?;
        let Status { st, host } = status_at(fd.fd.as_fd(), name)?;
        if !self.cross_mounts && (host.mnt != dir.host.mnt || is_mount_root(&st)) {
            warn_limited!(self.warnings, node = parent, name = ?name, store = %self.store_dir.display(), "a mount point below a closure path; not serving it");
            return Err(Errno::NOENT);
        }
        let record = self.hand_out(
            Candidate::Found {
                host,
                kind: kind_of(&st),
                parent: Some(&dir),
                name,
            },
            reference,
        );
        Ok(record.report(&st))
    }

    /// The node number of the directory holding `id` (the root holds itself).
    pub fn parent_of(&self, id: NodeId) -> Result<NodeId> {
        if id == ROOT_ID {
            return Ok(ROOT_ID);
        }
        Ok(self.known(id)?.primary().parent_id())
    }

    /// The attributes of node `id`.
    pub fn getattr(&self, id: NodeId) -> Result<Attr> {
        if id == ROOT_ID {
            return Ok(self.served.load().attr);
        }
        let node = self.known(id)?;
        Ok(node.report(&self.stat_node(&node)?))
    }

    /// The target of symlink `id`, verbatim.
    pub fn readlink(&self, id: NodeId) -> Result<Vec<u8>> {
        let node = self.known(id)?;
        if node.kind != Kind::Symlink {
            return Err(Errno::INVAL);
        }
        // Read through the descriptor whose identity was checked.
        let (fd, _) = self.path_fd(&node)?;
        let target = rustix::fs::readlinkat(&fd, "", Vec::new())?;
        Ok(target.into_bytes())
    }

    /// Opens regular file `id` for reading. Any request to write is refused with `EROFS`.
    ///
    /// The file is reached as `O_PATH` first and checked to be the node's object and a
    /// regular file; only then is it opened for reading (through `/proc/self/fd`), so no
    /// other kind of host object is ever opened. The descriptor returned is the host file
    /// itself: a transport may read from it or hand it to the kernel for passthrough.
    pub fn open(&self, id: NodeId, access: Access) -> Result<HostFile> {
        if access == Access::Write {
            return Err(Errno::ROFS);
        }
        let node = self.known(id)?;
        match node.kind {
            Kind::RegularFile => {}
            Kind::Directory => return Err(Errno::ISDIR),
            // Devices, pipes and sockets are handled by the client's kernel, never by
            // opening the host's objects.
            _ => return Err(Errno::ACCESS),
        }
        let (path, st) = self.path_fd(&node)?;
        self.check_unchanged(&node, &st)?;
        let fd = self.reopen(&path)?;
        Ok(HostFile {
            fd,
            size: st.stx_size,
        })
    }

    /// Opens regular file `name` in directory `parent` for reading, checked to be node
    /// `id`: for walkers that open each file by the name they found it under.
    pub fn open_entry(&self, parent: NodeId, name: &OsStr, id: NodeId) -> Result<HostFile> {
        let node = self.known(id)?;
        if node.kind != Kind::RegularFile {
            return Err(Errno::ACCESS);
        }
        let dir_ref;
        let dir_fd;
        let dir: BorrowedFd<'_> = if parent == ROOT_ID {
            self.check_served(name)?;
            self.store.as_fd()
        } else {
            dir_ref = self.known(parent)?;
            dir_fd = self.dir_fd(&dir_ref)?;
            dir_fd.fd.as_fd()
        };
        let path = rustix::fs::openat(
            dir,
            name,
            OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| self.gone(e, &node))?;
        let status = status_fd(path.as_fd())?;
        self.check_identity(&status, &node)?;
        self.check_unchanged(&node, &status.st)?;
        let fd = self.reopen(&path)?;
        Ok(HostFile {
            fd,
            size: status.st.stx_size,
        })
    }

    /// The entries of directory `id` (without `.` and `..`), read from the host once.
    pub fn list(&self, id: NodeId) -> Result<Arc<[DirEntry]>> {
        if id == ROOT_ID {
            return Ok(self.served.load().listing.clone());
        }
        let node = self.known(id)?;
        if node.kind != Kind::Directory {
            return Err(Errno::NOTDIR);
        }
        if let Some(listing) = self.live.get(&id).and_then(|l| l.listing.clone()) {
            return Ok(listing);
        }
        let dir = self.dir_fd(&node)?;
        let listing: Arc<[DirEntry]> =
            read_entries(dir.fd.as_fd(), &node.host, &self.inodes)?.into();
        // Kept while the node is live; a node nobody holds is not worth the memory.
        if let Some(mut live) = self.live.get_mut(&id) {
            live.listing.get_or_insert_with(|| listing.clone());
        }
        Ok(listing)
    }

    /// Statistics of the host filesystem holding the store.
    pub fn statfs(&self) -> Result<rustix::fs::StatVfs> {
        rustix::fs::fstatvfs(self.store.as_fd())
    }

    /// The identity of the store directory itself.
    pub fn store_host(&self) -> HostId {
        self.store_host
    }
}
