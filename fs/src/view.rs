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

use std::collections::{HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

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

/// A node the kernel (or another client) holds a reference to.
#[derive(Debug)]
struct Node {
    id: NodeId,
    /// `None` for a store path: its parent is the store directory itself.
    parent: Option<Arc<Node>>,
    name: OsString,
    kind: Kind,
    dev: u64,
    ino: u64,
    /// How many times this node was handed out and not yet forgotten.
    lookups: AtomicU64,
    /// The directory listing, read once: the store is immutable.
    listing: OnceLock<Arc<[DirEntry]>>,
}

/// Tuning for a [`View`].
#[derive(Clone, Debug)]
pub struct ViewOptions {
    /// How many directory descriptors to keep open at most. Each looked-up directory would
    /// otherwise need one; the cache keeps the hot ones and reopens the rest on demand.
    pub max_cached_dirs: usize,
}

impl Default for ViewOptions {
    fn default() -> Self {
        ViewOptions {
            max_cached_dirs: 512,
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
                write!(
                    f,
                    "cannot open store directory {}: {source}",
                    path.display()
                )
            }
            ViewError::Missing { store_dir, paths } => {
                const SHOWN: usize = 5;
                write!(
                    f,
                    "{} closure path{} missing from {}: ",
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

/// The read-only view of one closure of a host store.
pub struct View {
    store_dir: PathBuf,
    store: Arc<OwnedFd>,
    inodes: InodeMap,
    /// The closure's store paths present at startup, by base name.
    top: HashSet<OsString>,
    /// The root listing, in the closure's (sorted) order.
    root_listing: Arc<[DirEntry]>,
    root_attr: Attr,
    nodes: DashMap<NodeId, Arc<Node>>,
    dirs: FdCache,
}

impl std::fmt::Debug for View {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("View")
            .field("store_dir", &self.store_dir)
            .field("paths", &self.top.len())
            .field("nodes", &self.nodes.len())
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
        let store = rustix::fs::open(
            &store_dir,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| ViewError::StoreDir {
            path: store_dir.clone(),
            source: io_err(e),
        })?;
        let store_stat = rustix::fs::fstat(&store).map_err(|e| ViewError::StoreDir {
            path: store_dir.clone(),
            source: io_err(e),
        })?;
        let inodes = InodeMap::new(store_stat.st_dev);

        let mut top = HashSet::with_capacity(closure.paths.len());
        let mut root_listing = Vec::with_capacity(closure.paths.len());
        let mut setup = Setup::default();
        for path in &closure.paths {
            let name = OsStr::new(path.base_name());
            match rustix::fs::statat(&store, name, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st) => {
                    let kind = kind_of(&st);
                    let ino = inodes.node_id(st.st_dev, st.st_ino);
                    top.insert(name.to_owned());
                    root_listing.push(DirEntry {
                        name: name.to_owned(),
                        ino,
                        kind,
                    });
                }
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
                store_dir,
                paths: setup.missing,
            });
        }

        let root_attr = Attr {
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
        };

        let view = View {
            store_dir,
            store: Arc::new(store),
            inodes,
            top,
            root_listing: root_listing.into(),
            root_attr,
            nodes: DashMap::new(),
            dirs: FdCache::new(options.max_cached_dirs),
        };
        Ok((view, setup))
    }

    /// The host directory the view serves from.
    pub fn store_dir(&self) -> &Path {
        &self.store_dir
    }

    /// The number of closure paths the root lists.
    pub fn path_count(&self) -> usize {
        self.top.len()
    }

    /// How many nodes are currently referenced by clients.
    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    /// How many directory descriptors are cached.
    pub fn cached_dir_count(&self) -> usize {
        self.dirs.len()
    }

    fn node(&self, id: NodeId) -> Result<Arc<Node>> {
        self.nodes.get(&id).map(|n| n.clone()).ok_or(Errno::STALE)
    }

    fn attr_from_stat(&self, st: &Stat) -> Attr {
        let t = |secs: i64, nsecs: u64| Time {
            secs,
            nsecs: nsecs as u32,
        };
        Attr {
            ino: self.inodes.node_id(st.st_dev, st.st_ino),
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

    /// Runs `f` with the directory that holds `node` on the host.
    fn with_parent_fd<T>(
        &self,
        node: &Node,
        f: impl FnOnce(BorrowedFd<'_>) -> Result<T>,
    ) -> Result<T> {
        match &node.parent {
            None => f(self.store.as_fd()),
            Some(parent) => {
                let fd = self.dir_fd(parent)?;
                f(fd.as_fd())
            }
        }
    }

    /// A verified `O_PATH` descriptor of directory `node`, from the cache or opened one
    /// component at a time from the nearest cached ancestor.
    fn dir_fd(&self, node: &Arc<Node>) -> Result<Arc<OwnedFd>> {
        if let Some(fd) = self.dirs.get(node.id) {
            return Ok(fd);
        }
        // Collect the uncached chain up to the store directory or a cached ancestor; deep
        // trees are walked iteratively so no request recurses on the host's depth.
        let mut chain = vec![node.clone()];
        let mut base = self.store.clone();
        while let Some(parent) = chain.last().and_then(|n| n.parent.clone()) {
            if let Some(fd) = self.dirs.get(parent.id) {
                base = fd;
                break;
            }
            chain.push(parent);
        }
        for n in chain.iter().rev() {
            if n.kind != Kind::Directory {
                return Err(Errno::NOTDIR);
            }
            let fd = rustix::fs::openat(
                base.as_fd(),
                n.name.as_os_str(),
                OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| gone(e, n, &self.store_dir))?;
            check_identity(&fd, n, &self.store_dir)?;
            let fd = Arc::new(fd);
            self.dirs.insert(n.id, fd.clone());
            base = fd;
        }
        Ok(base)
    }

    /// Registers one more reference to the host object `st`, found as `name` in `parent`.
    fn hand_out(&self, parent: Option<&Arc<Node>>, name: &OsStr, st: &Stat) -> Attr {
        let attr = self.attr_from_stat(st);
        match self.nodes.entry(attr.ino) {
            Entry::Occupied(e) => {
                e.get().lookups.fetch_add(1, Ordering::Relaxed);
            }
            Entry::Vacant(e) => {
                e.insert(Arc::new(Node {
                    id: attr.ino,
                    parent: parent.cloned(),
                    name: name.to_owned(),
                    kind: attr.kind,
                    dev: st.st_dev,
                    ino: st.st_ino,
                    lookups: AtomicU64::new(1),
                    listing: OnceLock::new(),
                }));
            }
        }
        attr
    }

    /// Looks `name` up in directory `parent` and, on success, counts one reference to the
    /// node returned (to be released with [`View::forget`]).
    pub fn lookup(&self, parent: NodeId, name: &OsStr) -> Result<Attr> {
        if parent == ROOT_ID {
            if name == "." || name == ".." {
                return Ok(self.root_attr);
            }
            if !self.top.contains(name) {
                return Err(Errno::NOENT);
            }
            let st = rustix::fs::statat(self.store.as_fd(), name, AtFlags::SYMLINK_NOFOLLOW)
                .map_err(|e| {
                    tracing::warn!(path = %self.store_dir.join(name).display(), "store path vanished: {e}");
                    Errno::NOENT
                })?;
            return Ok(self.hand_out(None, name, &st));
        }
        let dir = self.node(parent)?;
        if dir.kind != Kind::Directory {
            return Err(Errno::NOTDIR);
        }
        if name == "." {
            let st = self.stat_node(&dir)?;
            return Ok(self.hand_out(dir.parent.as_ref(), &dir.name, &st));
        }
        if name == ".." {
            // Needed for re-export (FUSE_EXPORT_SUPPORT): the kernel asks for a
            // directory's parent when it reconnects a file handle.
            return match &dir.parent {
                None => Ok(self.root_attr),
                Some(p) => {
                    let st = self.stat_node(p)?;
                    Ok(self.hand_out(p.parent.as_ref(), &p.name, &st))
                }
            };
        }
        if name.as_bytes().contains(&b'/') {
            return Err(Errno::INVAL);
        }
        let fd = self.dir_fd(&dir)?;
        let st = rustix::fs::statat(fd.as_fd(), name, AtFlags::SYMLINK_NOFOLLOW)?;
        Ok(self.hand_out(Some(&dir), name, &st))
    }

    /// Releases `count` references to node `id`; the node's state goes once none are left.
    pub fn forget(&self, id: NodeId, count: u64) {
        if id == ROOT_ID {
            return;
        }
        // Increments happen under the same shard lock (in `hand_out`), so the count read
        // here cannot change before the node is removed.
        if let Entry::Occupied(e) = self.nodes.entry(id) {
            let left = e.get().lookups.load(Ordering::Relaxed);
            if left <= count {
                e.remove();
                self.dirs.remove(id);
            } else {
                e.get().lookups.store(left - count, Ordering::Relaxed);
            }
        }
    }

    /// The node number of the directory holding `id` (the root holds itself).
    pub fn parent_of(&self, id: NodeId) -> Result<NodeId> {
        if id == ROOT_ID {
            return Ok(ROOT_ID);
        }
        Ok(self.node(id)?.parent.as_ref().map_or(ROOT_ID, |p| p.id))
    }

    /// The host's current `stat` of `node`, checked to still be the same object.
    fn stat_node(&self, node: &Node) -> Result<Stat> {
        let st = self.with_parent_fd(node, |dir| {
            rustix::fs::statat(dir, node.name.as_os_str(), AtFlags::SYMLINK_NOFOLLOW)
                .map_err(|e| gone(e, node, &self.store_dir))
        })?;
        if st.st_dev != node.dev || st.st_ino != node.ino {
            return Err(replaced(node, &self.store_dir));
        }
        Ok(st)
    }

    /// The attributes of node `id`.
    pub fn getattr(&self, id: NodeId) -> Result<Attr> {
        if id == ROOT_ID {
            return Ok(self.root_attr);
        }
        let node = self.node(id)?;
        Ok(self.attr_from_stat(&self.stat_node(&node)?))
    }

    /// The target of symlink `id`, verbatim.
    pub fn readlink(&self, id: NodeId) -> Result<Vec<u8>> {
        let node = self.node(id)?;
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
        check_identity(&fd, &node, &self.store_dir)?;
        let target = rustix::fs::readlinkat(&fd, "", Vec::new())?;
        Ok(target.into_bytes())
    }

    /// Opens regular file `id` for reading. Any request to write is refused with `EROFS`.
    ///
    /// The descriptor returned is the host file itself, checked to be the node's object: a
    /// transport may read from it or hand it to the kernel for passthrough.
    pub fn open(&self, id: NodeId, write: bool) -> Result<OwnedFd> {
        if write {
            return Err(Errno::ROFS);
        }
        let node = self.node(id)?;
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
        check_identity(&fd, &node, &self.store_dir)?;
        Ok(fd)
    }

    /// The entries of directory `id` (without `.` and `..`), read from the host once.
    pub fn list(&self, id: NodeId) -> Result<Arc<[DirEntry]>> {
        if id == ROOT_ID {
            return Ok(self.root_listing.clone());
        }
        let node = self.node(id)?;
        if node.kind != Kind::Directory {
            return Err(Errno::NOTDIR);
        }
        if let Some(listing) = node.listing.get() {
            return Ok(listing.clone());
        }
        let listing = self.read_listing(&node)?;
        Ok(node.listing.get_or_init(|| listing).clone())
    }

    fn read_listing(&self, node: &Arc<Node>) -> Result<Arc<[DirEntry]>> {
        let dir = self.dir_fd(node)?;
        // The cached descriptor is O_PATH; reading entries needs a real open of the same
        // directory, reached through it so that it is the verified one.
        let fd = rustix::fs::openat(
            dir.as_fd(),
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
                None => kind_of(&rustix::fs::statat(
                    dir.as_fd(),
                    name,
                    AtFlags::SYMLINK_NOFOLLOW,
                )?),
            };
            entries.push(DirEntry {
                name: name.to_owned(),
                ino: self.inodes.node_id(node.dev, entry.ino()),
                kind,
            });
        }
        Ok(entries.into())
    }

    /// Statistics of the host filesystem holding the store.
    pub fn statfs(&self) -> Result<rustix::fs::StatVfs> {
        rustix::fs::fstatvfs(self.store.as_fd())
    }
}

/// Maps a failure to reach `node` on the host to what the client sees: the object is gone.
fn gone(e: Errno, node: &Node, store_dir: &Path) -> Errno {
    match e {
        Errno::NOENT | Errno::NOTDIR | Errno::LOOP => {
            tracing::debug!(name = ?node.name, store = %store_dir.display(), "host object gone or replaced: {e}");
            Errno::NOENT
        }
        other => other,
    }
}

fn replaced(node: &Node, store_dir: &Path) -> Errno {
    tracing::warn!(name = ?node.name, store = %store_dir.display(), "host object replaced while mounted; refusing it");
    Errno::NOENT
}

fn check_identity(fd: &OwnedFd, node: &Node, store_dir: &Path) -> Result<()> {
    let st = rustix::fs::fstat(fd)?;
    if st.st_dev != node.dev || st.st_ino != node.ino || kind_of(&st) != node.kind {
        return Err(replaced(node, store_dir));
    }
    Ok(())
}
