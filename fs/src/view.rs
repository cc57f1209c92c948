//! The closure view: a read-only tree holding exactly the closure's store paths.
//!
//! Everything here is independent of FUSE: the view answers lookups, attribute queries,
//! directory listings, symlink reads and opens with plain Rust types, so it could be served
//! over another transport (or walked directly, as `mkimage` does).
//!
//! # Resolution
//!
//! Nodes never hold a path string. Each node records its parent node, its name in that
//! parent and the host identity (device and inode number) it had when it was looked up. To
//! reach the host object the view starts from a directory descriptor it already holds (the
//! store directory, or a cached ancestor) and opens one component at a time with
//! `O_NOFOLLOW`, checking at every step that the object found is the one recorded. A
//! directory replaced by a symlink fails to open as a directory; a directory replaced by
//! another one fails the identity check. Either way the request fails instead of following
//! the host somewhere outside the closure.
//!
//! # Inode numbers
//!
//! A node's number is derived from its host identity, so it is the same every time the
//! kernel looks the object up again, hard links share it, and nothing has to be remembered
//! about forgotten nodes. See [`InodeMap`].

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use parking_lot::Mutex;
use rustix::fs::{AtFlags, FileType, Mode, OFlags, Stat};
use rustix::io::Errno;

use crate::closure::Closure;
use crate::fdcache::FdCache;
use crate::store_path::StorePath;

/// A node number as the kernel sees it; also the inode number the view reports.
pub type NodeId = u64;

/// The node number of the view's root directory.
pub const ROOT_ID: NodeId = 1;

/// The result type of view operations: failures are plain errno values, ready to hand to a
/// transport.
pub type Result<T> = std::result::Result<T, Errno>;

/// What a view node is, as far as clients are concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A directory.
    Directory,
    /// A regular file.
    RegularFile,
    /// A symbolic link, served verbatim and never followed.
    Symlink,
    /// A named pipe (never opened by the view).
    Fifo,
    /// A Unix domain socket.
    Socket,
    /// A character device (never opened by the view).
    CharDevice,
    /// A block device (never opened by the view).
    BlockDevice,
}

impl Kind {
    fn from_file_type(t: FileType) -> Option<Kind> {
        Some(match t {
            FileType::Directory => Kind::Directory,
            FileType::RegularFile => Kind::RegularFile,
            FileType::Symlink => Kind::Symlink,
            FileType::Fifo => Kind::Fifo,
            FileType::Socket => Kind::Socket,
            FileType::CharacterDevice => Kind::CharDevice,
            FileType::BlockDevice => Kind::BlockDevice,
            FileType::Unknown => return None,
        })
    }
}

/// A timestamp in seconds and nanoseconds since the epoch, as the host reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Time {
    /// Seconds since the epoch (may be negative).
    pub secs: i64,
    /// Nanoseconds within the second.
    pub nsecs: u32,
}

/// The attributes of a node, taken from the host object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attr {
    /// The node number, which is also the reported inode number.
    pub ino: NodeId,
    /// The kind of object.
    pub kind: Kind,
    /// Permission bits, including setuid, setgid and sticky.
    pub perm: u16,
    /// The host's link count.
    pub nlink: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Size in bytes.
    pub size: u64,
    /// Allocated 512-byte blocks.
    pub blocks: u64,
    /// Preferred I/O size.
    pub blksize: u32,
    /// Device number, for device nodes.
    pub rdev: u64,
    /// Last access.
    pub atime: Time,
    /// Last modification.
    pub mtime: Time,
    /// Last status change.
    pub ctime: Time,
}

/// One entry of a directory listing.
#[derive(Clone, Debug)]
pub struct DirEntry {
    /// The entry's name.
    pub name: OsString,
    /// The node number the entry will have once looked up.
    pub ino: NodeId,
    /// Its kind.
    pub kind: Kind,
}

/// Maps host identities (device, inode) onto node numbers without remembering every node.
///
/// Objects on the store's own device keep their host inode number, which makes the mapping
/// a pure function: stable for the life of the mount, shared by hard links, free in memory.
/// Objects on other devices (a store path that is a mount point) get a small per-device
/// index in the top byte. Host inode 1 on the store device is moved out of the way, since
/// number 1 is the view's root.
#[derive(Debug)]
pub struct InodeMap {
    store_dev: u64,
    others: Mutex<HashMap<u64, u64>>,
}

const DEV_SHIFT: u32 = 56;
const INO_MASK: u64 = (1 << DEV_SHIFT) - 1;
/// The device index reserved for host inode numbers that cannot be used as they are.
const SPILL_INDEX: u64 = 0xff;

impl InodeMap {
    fn new(store_dev: u64) -> Self {
        InodeMap {
            store_dev,
            others: Mutex::new(HashMap::new()),
        }
    }

    /// The node number of the host object `(dev, ino)`.
    pub fn node_id(&self, dev: u64, ino: u64) -> NodeId {
        if dev == self.store_dev {
            if ino > ROOT_ID && ino <= INO_MASK {
                return ino;
            }
            return (SPILL_INDEX << DEV_SHIFT) | (ino & INO_MASK);
        }
        let mut others = self.others.lock();
        let next = others.len() as u64 + 1;
        let index = *others.entry(dev).or_insert(next);
        if index >= SPILL_INDEX {
            // More than 254 foreign devices: numbers may collide, but only between objects
            // on such devices; reported, not fatal.
            tracing::warn!(
                dev,
                "too many devices below the store for distinct inode numbers"
            );
        }
        ((index % SPILL_INDEX) << DEV_SHIFT) | (ino & INO_MASK)
    }
}

/// What the view remembers of every object it has handed out: enough to find it again from
/// the store directory, and nothing that costs a descriptor.
///
/// This outlives FORGET on purpose. A re-exporting server (virtiofsd with file handles,
/// NFS) may hand the kernel a node number long after the kernel forgot the node; the kernel
/// then asks for `.` in that node, and the view must still know where it is. The cost is a
/// few dozen bytes per object ever looked up.
#[derive(Debug)]
struct Known {
    /// [`ROOT_ID`] for a store path: its host parent is the store directory.
    parent: NodeId,
    name: OsString,
    kind: Kind,
}

/// State that lives only while clients hold references to a node.
#[derive(Debug, Default)]
struct Live {
    /// How many times the node was handed out and not yet forgotten.
    lookups: u64,
    /// The directory listing, read once: the store is immutable.
    listing: Option<Arc<[DirEntry]>>,
}

/// Tuning for a [`View`].
#[derive(Clone, Debug)]
pub struct ViewOptions {
    /// How many directory descriptors to keep open at most. Each looked-up directory would
    /// otherwise need one; the cache keeps the hot ones and reopens the rest on demand.
    pub max_cached_dirs: usize,
    /// How many nodes the kernel has forgotten to remember at most, for re-export (file
    /// handles): the least recently forgotten go first, and a handle naming one gets
    /// `ESTALE`.
    pub max_forgotten_nodes: usize,
    /// Follow names into other mounts below the served tree. Off by default: a bind
    /// mount or tmpfs placed inside a store path is not part of the closure.
    pub cross_mounts: bool,
}

impl Default for ViewOptions {
    fn default() -> Self {
        ViewOptions {
            max_cached_dirs: 512,
            max_forgotten_nodes: 131_072,
            cross_mounts: false,
        }
    }
}

/// An error found while setting up the view.
#[derive(Debug)]
pub enum ViewError {
    /// The store directory cannot be opened.
    StoreDir {
        /// The store directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Closure paths absent from the host store.
    Missing {
        /// Where the closure came from (file name or `<stdin>`).
        origin: String,
        /// The store directory.
        store_dir: PathBuf,
        /// The missing paths (all of them).
        paths: Vec<StorePath>,
    },
    /// A closure path exists but cannot be examined.
    Stat {
        /// The path.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

impl std::fmt::Display for ViewError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ViewError::StoreDir { path, source } => {
                write!(f, "cannot open directory {}: {source}", path.display())
            }
            ViewError::Missing {
                origin,
                store_dir,
                paths,
            } => {
                const SHOWN: usize = 5;
                write!(
                    f,
                    "{origin}: {} closure path{} missing from {}: ",
                    paths.len(),
                    if paths.len() == 1 { " is" } else { "s are" },
                    store_dir.display()
                )?;
                for (i, p) in paths.iter().take(SHOWN).enumerate() {
                    if i > 0 {
                        write!(f, ", ")?;
                    }
                    write!(f, "{}", p.base_name())?;
                }
                if paths.len() > SHOWN {
                    write!(f, " and {} more", paths.len() - SHOWN)?;
                }
                write!(f, " (--allow-missing leaves them out)")
            }
            ViewError::Stat { path, source } => {
                write!(f, "cannot examine {}: {source}", path.display())
            }
        }
    }
}

impl std::error::Error for ViewError {}

/// A regular file opened by [`View::open`].
#[derive(Debug)]
pub struct HostFile {
    /// The host file, read-only.
    pub fd: OwnedFd,
    /// Its size when opened, from the same `fstat` that checked its identity.
    pub size: u64,
}

/// The read-only view of one closure of a host store.
pub struct View {
    store_dir: PathBuf,
    store: Arc<OwnedFd>,
    inodes: InodeMap,
    /// The root listing: the closure's store paths present at startup, sorted by name so
    /// that root lookups are a binary search (no second copy of 100k names to build).
    root_listing: Arc<[DirEntry]>,
    root_attr: Attr,
    known: DashMap<NodeId, Arc<Known>>,
    live: DashMap<NodeId, Live>,
    dirs: FdCache,
}

impl std::fmt::Debug for View {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("View")
            .field("store_dir", &self.store_dir)
            .field("paths", &self.root_listing.len())
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

fn kind_of(st: &Stat) -> Kind {
    Kind::from_file_type(FileType::from_raw_mode(st.st_mode)).unwrap_or(Kind::RegularFile)
}

impl View {
    /// Opens the store directory and checks that every closure path is there.
    ///
    /// Only the closure's top-level paths are examined: the store is never listed and the
    /// trees below the paths are never walked, so this costs one `fstatat` per closure path
    /// whatever the size of the host store.
    pub fn new(
        closure: &Closure,
        allow_missing: bool,
        options: ViewOptions,
    ) -> std::result::Result<(View, Setup), ViewError> {
        let store_dir = closure.store_dir.clone();
        let (store, store_stat) = open_dir(&store_dir)?;
        let inodes = InodeMap::new(store_stat.st_dev);
        let mut root_listing = Vec::with_capacity(closure.paths.len());
        let mut setup = Setup::default();
        for path in &closure.paths {
            let name = OsStr::new(path.base_name());
            match rustix::fs::statat(&store, name, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st) => root_listing.push(DirEntry {
                    name: name.to_owned(),
                    ino: inodes.node_id(st.st_dev, st.st_ino),
                    kind: kind_of(&st),
                }),
                Err(Errno::NOENT) | Err(Errno::NOTDIR) => setup.missing.push(path.clone()),
                Err(e) => {
                    return Err(ViewError::Stat {
                        path: store_dir.join(name),
                        source: io_err(e),
                    })
                }
            }
        }
        if !setup.missing.is_empty() && !allow_missing {
            return Err(ViewError::Missing {
                origin: closure.origin.clone(),
                store_dir,
                paths: setup.missing,
            });
        }
        let root_attr = View::closure_root(&store_stat, &root_listing);
        let view = View::assemble(store_dir, store, root_attr, inodes, root_listing, options);
        Ok((view, setup))
    }

    /// A view of everything in directory `dir`: its root lists all of `dir`'s entries. For
    /// trees that are already what should be served, such as a mounted view.
    pub fn whole_directory(
        dir: &Path,
        options: ViewOptions,
    ) -> std::result::Result<View, ViewError> {
        let (fd, st) = open_dir(dir)?;
        let inodes = InodeMap::new(st.st_dev);
        let mut root_listing =
            read_entries(fd.as_fd(), &inodes).map_err(|e| ViewError::StoreDir {
                path: dir.to_owned(),
                source: io_err(e),
            })?;
        root_listing.sort_by(|a, b| a.name.cmp(&b.name));
        // The directory's own attributes: the snapshot of a tree keeps its root as it is.
        let root_attr = attr_of(&st, ROOT_ID);
        Ok(View::assemble(
            dir.to_owned(),
            fd,
            root_attr,
            inodes,
            root_listing,
            options,
        ))
    }

    /// The root of a closure view: a directory of its own, read-only and timeless like the
    /// store paths in it, owned like the store directory.
    fn closure_root(store_stat: &Stat, root_listing: &[DirEntry]) -> Attr {
        Attr {
            ino: ROOT_ID,
            kind: Kind::Directory,
            perm: 0o555,
            nlink: 2 + root_listing
                .iter()
                .filter(|e| e.kind == Kind::Directory)
                .count() as u32,
            uid: store_stat.st_uid,
            gid: store_stat.st_gid,
            size: 0,
            blocks: 0,
            blksize: 4096,
            rdev: 0,
            // Fixed, like the store paths below it: the view does not change while mounted.
            atime: Time { secs: 1, nsecs: 0 },
            mtime: Time { secs: 1, nsecs: 0 },
            ctime: Time { secs: 1, nsecs: 0 },
        }
    }

    fn assemble(
        store_dir: PathBuf,
        store: OwnedFd,
        root_attr: Attr,
        inodes: InodeMap,
        root_listing: Vec<DirEntry>,
        options: ViewOptions,
    ) -> View {
        debug_assert!(root_listing.windows(2).all(|w| w[0].name < w[1].name));
        View {
            store_dir,
            store: Arc::new(store),
            inodes,
            root_listing: root_listing.into(),
            root_attr,
            known: DashMap::new(),
            live: DashMap::new(),
            dirs: FdCache::new(options.max_cached_dirs),
        }
    }

    /// The host directory the view serves from.
    pub fn store_dir(&self) -> &Path {
        &self.store_dir
    }

    /// The number of closure paths the root lists.
    pub fn path_count(&self) -> usize {
        self.root_listing.len()
    }

    /// How many nodes are currently referenced by clients.
    pub fn node_count(&self) -> usize {
        self.live.len()
    }

    /// How many directory descriptors are cached.
    pub fn cached_dir_count(&self) -> usize {
        self.dirs.len()
    }

    fn known(&self, id: NodeId) -> Result<Arc<Known>> {
        self.known.get(&id).map(|k| k.clone()).ok_or(Errno::STALE)
    }

    fn attr_from_stat(&self, st: &Stat) -> Attr {
        attr_of(st, self.inodes.node_id(st.st_dev, st.st_ino))
    }

    /// Runs `f` with the directory that holds `node` on the host.
    fn with_parent_fd<T>(
        &self,
        node: &Known,
        f: impl FnOnce(BorrowedFd<'_>) -> Result<T>,
    ) -> Result<T> {
        if node.parent == ROOT_ID {
            f(self.store.as_fd())
        } else {
            let fd = self.dir_fd(node.parent)?;
            f(fd.as_fd())
        }
    }

    /// A verified `O_PATH` descriptor of directory `id`, from the cache or opened one
    /// component at a time from the nearest cached ancestor.
    fn dir_fd(&self, id: NodeId) -> Result<Arc<OwnedFd>> {
        if let Some(fd) = self.dirs.get(id) {
            return Ok(fd);
        }
        // Collect the uncached chain up to the store directory or a cached ancestor; deep
        // trees are walked iteratively so no request recurses on the host's depth.
        let mut chain = vec![(id, self.known(id)?)];
        let mut base = self.store.clone();
        loop {
            let parent = chain.last().map_or(ROOT_ID, |(_, k)| k.parent);
            if parent == ROOT_ID {
                break;
            }
            if let Some(fd) = self.dirs.get(parent) {
                base = fd;
                break;
            }
            chain.push((parent, self.known(parent)?));
        }
        for (id, node) in chain.iter().rev() {
            if node.kind != Kind::Directory {
                return Err(Errno::NOTDIR);
            }
            let fd = rustix::fs::openat(
                base.as_fd(),
                node.name.as_os_str(),
                OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| gone(e, node, &self.store_dir))?;
            self.check_identity(&fd, *id, node)?;
            let fd = Arc::new(fd);
            self.dirs.insert(*id, fd.clone());
            base = fd;
        }
        Ok(base)
    }

    /// Checks that `fd` is the host object recorded as node `id`; returns its status.
    fn check_identity(&self, fd: &OwnedFd, id: NodeId, node: &Known) -> Result<Stat> {
        let st = rustix::fs::fstat(fd)?;
        if self.inodes.node_id(st.st_dev, st.st_ino) != id || kind_of(&st) != node.kind {
            return Err(replaced(node, &self.store_dir));
        }
        Ok(st)
    }

    /// Registers one more reference to the host object `st`, found as `name` in `parent`.
    fn hand_out(&self, parent: NodeId, name: &OsStr, st: &Stat) -> Attr {
        let attr = self.attr_from_stat(st);
        if !self.known.contains_key(&attr.ino) {
            // A hard link keeps the first name it was found under: any will do.
            self.known.entry(attr.ino).or_insert_with(|| {
                Arc::new(Known {
                    parent,
                    name: name.to_owned(),
                    kind: attr.kind,
                })
            });
        }
        self.live.entry(attr.ino).or_default().lookups += 1;
        attr
    }

    /// Looks `name` up in directory `parent` and, on success, counts one reference to the
    /// node returned (to be released with [`View::forget`]).
    pub fn lookup(&self, parent: NodeId, name: &OsStr) -> Result<Attr> {
        if parent == ROOT_ID {
            if name == "." || name == ".." {
                return Ok(self.root_attr);
            }
            if self
                .root_listing
                .binary_search_by(|e| e.name.as_os_str().cmp(name))
                .is_err()
            {
                return Err(Errno::NOENT);
            }
            let st = rustix::fs::statat(self.store.as_fd(), name, AtFlags::SYMLINK_NOFOLLOW)
                .map_err(|e| {
                    tracing::warn!(path = %self.store_dir.join(name).display(), "store path vanished: {e}");
                    Errno::NOENT
                })?;
            return Ok(self.hand_out(ROOT_ID, name, &st));
        }
        let dir = self.known(parent)?;
        if name == "." {
            // How the kernel finds a node it has forgotten, from a file handle: `parent` is
            // then the node itself, of any kind.
            let st = self.stat_node(parent, &dir)?;
            return Ok(self.hand_out(dir.parent, &dir.name, &st));
        }
        if dir.kind != Kind::Directory {
            return Err(Errno::NOTDIR);
        }
        if name == ".." {
            // Needed for re-export (FUSE_EXPORT_SUPPORT): the kernel asks for a
            // directory's parent when it reconnects a file handle.
            if dir.parent == ROOT_ID {
                return Ok(self.root_attr);
            }
            let grandparent = self.known(dir.parent)?;
            let st = self.stat_node(dir.parent, &grandparent)?;
            return Ok(self.hand_out(grandparent.parent, &grandparent.name, &st));
        }
        if name.as_bytes().contains(&b'/') {
            return Err(Errno::INVAL);
        }
        let fd = self.dir_fd(parent)?;
        let st = rustix::fs::statat(fd.as_fd(), name, AtFlags::SYMLINK_NOFOLLOW)?;
        Ok(self.hand_out(parent, name, &st))
    }

    /// Releases `count` references to node `id`; the node's state goes once none are left.
    pub fn forget(&self, id: NodeId, count: u64) {
        if id == ROOT_ID {
            return;
        }
        // Increments happen under the same shard lock (in `hand_out`), so the count read
        // here cannot change before the entry is removed.
        if let Entry::Occupied(mut e) = self.live.entry(id) {
            if e.get().lookups <= count {
                e.remove();
                self.dirs.remove(id);
            } else {
                e.get_mut().lookups -= count;
            }
        }
    }

    /// The node number of the directory holding `id` (the root holds itself).
    pub fn parent_of(&self, id: NodeId) -> Result<NodeId> {
        if id == ROOT_ID {
            return Ok(ROOT_ID);
        }
        Ok(self.known(id)?.parent)
    }

    /// The host's current `stat` of node `id`, checked to still be the same object.
    fn stat_node(&self, id: NodeId, node: &Known) -> Result<Stat> {
        let st = self.with_parent_fd(node, |dir| {
            rustix::fs::statat(dir, node.name.as_os_str(), AtFlags::SYMLINK_NOFOLLOW)
                .map_err(|e| gone(e, node, &self.store_dir))
        })?;
        if self.inodes.node_id(st.st_dev, st.st_ino) != id || kind_of(&st) != node.kind {
            return Err(replaced(node, &self.store_dir));
        }
        Ok(st)
    }

    /// The attributes of node `id`.
    pub fn getattr(&self, id: NodeId) -> Result<Attr> {
        if id == ROOT_ID {
            return Ok(self.root_attr);
        }
        let node = self.known(id)?;
        Ok(self.attr_from_stat(&self.stat_node(id, &node)?))
    }

    /// The target of symlink `id`, verbatim.
    pub fn readlink(&self, id: NodeId) -> Result<Vec<u8>> {
        let node = self.known(id)?;
        if node.kind != Kind::Symlink {
            return Err(Errno::INVAL);
        }
        // Open the link itself, then read it through that descriptor, so that the target
        // read is the one of the object whose identity was checked.
        let fd = self.with_parent_fd(&node, |dir| {
            rustix::fs::openat(
                dir,
                node.name.as_os_str(),
                OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| gone(e, &node, &self.store_dir))
        })?;
        self.check_identity(&fd, id, &node)?;
        let target = rustix::fs::readlinkat(&fd, "", Vec::new())?;
        Ok(target.into_bytes())
    }

    /// Opens regular file `id` for reading. Any request to write is refused with `EROFS`.
    ///
    /// The descriptor returned is the host file itself, checked to be the node's object: a
    /// transport may read from it or hand it to the kernel for passthrough.
    pub fn open(&self, id: NodeId, write: bool) -> Result<HostFile> {
        if write {
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
        let fd = self.with_parent_fd(&node, |dir| {
            // O_NONBLOCK: should the name have become a FIFO, the open must not block.
            rustix::fs::openat(
                dir,
                node.name.as_os_str(),
                OFlags::RDONLY
                    | OFlags::NOFOLLOW
                    | OFlags::NONBLOCK
                    | OFlags::NOCTTY
                    | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| gone(e, &node, &self.store_dir))
        })?;
        let st = self.check_identity(&fd, id, &node)?;
        Ok(HostFile {
            fd,
            size: u64::try_from(st.st_size).unwrap_or(0),
        })
    }

    /// The entries of directory `id` (without `.` and `..`), read from the host once.
    pub fn list(&self, id: NodeId) -> Result<Arc<[DirEntry]>> {
        if id == ROOT_ID {
            return Ok(self.root_listing.clone());
        }
        let node = self.known(id)?;
        if node.kind != Kind::Directory {
            return Err(Errno::NOTDIR);
        }
        if let Some(listing) = self.live.get(&id).and_then(|l| l.listing.clone()) {
            return Ok(listing);
        }
        let listing = self.read_listing(id)?;
        // Kept while the node is live; a node nobody holds is not worth the memory.
        if let Some(mut live) = self.live.get_mut(&id) {
            live.listing.get_or_insert_with(|| listing.clone());
        }
        Ok(listing)
    }

    fn read_listing(&self, id: NodeId) -> Result<Arc<[DirEntry]>> {
        Ok(read_entries(self.dir_fd(id)?.as_fd(), &self.inodes)?.into())
    }

    /// Statistics of the host filesystem holding the store.
    pub fn statfs(&self) -> Result<rustix::fs::StatVfs> {
        rustix::fs::fstatvfs(self.store.as_fd())
    }
}

/// The attributes of the host object `st`, reported as node `ino`.
fn attr_of(st: &Stat, ino: NodeId) -> Attr {
    let t = |secs: i64, nsecs: u64| Time {
        secs,
        nsecs: nsecs as u32,
    };
    Attr {
        ino,
        kind: kind_of(st),
        perm: (st.st_mode & 0o7777) as u16,
        nlink: st.st_nlink as u32,
        uid: st.st_uid,
        gid: st.st_gid,
        size: st.st_size as u64,
        blocks: st.st_blocks as u64,
        blksize: st.st_blksize as u32,
        rdev: st.st_rdev,
        atime: t(st.st_atime, st.st_atime_nsec),
        mtime: t(st.st_mtime, st.st_mtime_nsec),
        ctime: t(st.st_ctime, st.st_ctime_nsec),
    }
}

/// Opens directory `path` (`O_PATH`) as the base every resolution starts from.
fn open_dir(path: &Path) -> std::result::Result<(OwnedFd, Stat), ViewError> {
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
    let st = rustix::fs::fstat(&fd).map_err(err)?;
    Ok((fd, st))
}

/// The entries of the directory `dir` (an `O_PATH` descriptor), without `.` and `..`.
fn read_entries(dir: BorrowedFd<'_>, inodes: &InodeMap) -> Result<Vec<DirEntry>> {
    let dev = rustix::fs::fstat(dir)?.st_dev;
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
            None => kind_of(&rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)?),
        };
        entries.push(DirEntry {
            name: name.to_owned(),
            ino: inodes.node_id(dev, entry.ino()),
            kind,
        });
    }
    Ok(entries)
}

/// Maps a failure to reach `node` on the host to what the client sees: the object is gone.
fn gone(e: Errno, node: &Known, store_dir: &Path) -> Errno {
    match e {
        Errno::NOENT | Errno::NOTDIR | Errno::LOOP => {
            tracing::debug!(name = ?node.name, store = %store_dir.display(), "host object gone or replaced: {e}");
            Errno::NOENT
        }
        other => other,
    }
}

fn replaced(node: &Known, store_dir: &Path) -> Errno {
    tracing::warn!(name = ?node.name, store = %store_dir.display(), "host object replaced while mounted; refusing it");
    Errno::NOENT
}
