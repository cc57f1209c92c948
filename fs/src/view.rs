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

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use lru::LruCache;
use parking_lot::Mutex;
use rustix::fs::{
    AtFlags, FileType, Mode, OFlags, Statx, StatxAttributes, StatxFlags, StatxTimestamp,
};
use rustix::io::Errno;

use crate::closure::Closure;
use crate::fdcache::{CachedDir, FdCache};
use crate::ratelimit::Limiter;
use crate::store_path::StorePath;
use crate::warn_limited;

/// A node number as the kernel sees it; also the inode number the view reports.
pub type NodeId = u64;

/// The node number of the view's root directory.
pub const ROOT_ID: NodeId = 1;

/// Node numbers from here on are allocated, never host inode numbers.
const ALLOCATED_BASE: NodeId = 1 << 63;

/// How deep a chain of directories resolution follows before it takes the chain for a
/// cycle (possible only when the host moves directories around while served).
const MAX_DEPTH: usize = 4096;

/// How many names of one non-directory (hard links) a record remembers.
const MAX_NAMES: usize = 4;

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

/// The full identity of a host object: what tells it from every other object the host
/// shows, now or later.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct HostId {
    /// The device number (btrfs subvolumes have their own).
    pub dev: u64,
    /// The inode number on that device.
    pub ino: u64,
    /// The id of the mount the object was reached through (0 where the kernel does not
    /// report one).
    pub mnt: u64,
    /// The birth time, where the filesystem records one: it tells an object from a later
    /// one that reuses its inode number.
    pub btime: Option<(i64, u32)>,
    /// A digest of the host's file handle for the object (0 where the filesystem gives
    /// none): it holds the inode's generation, which tells an object from a later one
    /// that reuses its inode number on filesystems without birth times.
    pub handle: u64,
}

impl HostId {
    fn of(st: &Statx, handle: u64) -> HostId {
        let mask = StatxFlags::from_bits_retain(st.stx_mask);
        HostId {
            dev: rustix::fs::makedev(st.stx_dev_major, st.stx_dev_minor),
            ino: st.stx_ino,
            mnt: if mask.contains(StatxFlags::MNT_ID) {
                st.stx_mnt_id
            } else {
                0
            },
            btime: mask
                .contains(StatxFlags::BTIME)
                .then_some((st.stx_btime.tv_sec, st.stx_btime.tv_nsec)),
            handle,
        }
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
    /// The node's generation: a node number handed out again for another object comes
    /// with another generation, so that file handles of the old one fail.
    pub generation: u64,
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
///
/// Transports that report node numbers with entries take them from [`View::peek`].
#[derive(Clone, Debug)]
pub struct DirEntry {
    /// The entry's name.
    pub name: OsString,
    /// The entry's node number where the listing alone can tell it, 0 otherwise.
    pub ino: NodeId,
    /// Its kind.
    pub kind: Kind,
}

/// Maps host identities onto node numbers, so that two host objects never share one.
///
/// Objects on the store's own mount and device keep their host inode number (below
/// 2^63), which needs no memory. Every other identity gets the next number from 2^63 on,
/// remembered in both directions: here by identity, and in the view's records by number.
#[derive(Debug)]
struct InodeMap {
    store_dev: u64,
    store_mnt: u64,
    allocated: Mutex<Allocated>,
}

#[derive(Debug)]
struct Allocated {
    by_host: HashMap<HostId, NodeId>,
    next: NodeId,
}

impl InodeMap {
    fn new(store: &HostId) -> Self {
        InodeMap {
            store_dev: store.dev,
            store_mnt: store.mnt,
            allocated: Mutex::new(Allocated {
                by_host: HashMap::new(),
                next: ALLOCATED_BASE,
            }),
        }
    }

    /// The host inode number itself, when it can serve as the node number.
    fn direct(&self, dev: u64, mnt: u64, ino: u64) -> Option<NodeId> {
        (dev == self.store_dev && mnt == self.store_mnt && ino > ROOT_ID && ino < ALLOCATED_BASE)
            .then_some(ino)
    }

    /// The allocated number of `host`, allocated now if it has none.
    fn allocate(&self, host: &HostId) -> NodeId {
        let mut a = self.allocated.lock();
        if let Some(&n) = a.by_host.get(host) {
            return n;
        }
        let n = a.next;
        a.next += 1;
        a.by_host.insert(*host, n);
        n
    }

    /// The allocated number of `host`, if it has one.
    fn allocated(&self, host: &HostId) -> Option<NodeId> {
        self.allocated.lock().by_host.get(host).copied()
    }

    /// Forgets the allocation of `n` to `host` (a number is never allocated twice).
    fn release(&self, n: NodeId, host: &HostId) {
        if n >= ALLOCATED_BASE {
            let mut a = self.allocated.lock();
            if a.by_host.get(host) == Some(&n) {
                a.by_host.remove(host);
            }
        }
    }

    fn allocated_count(&self) -> usize {
        self.allocated.lock().by_host.len()
    }
}

/// One place a host object was found: its parent's record (`None` for the store
/// directory) and its name there.
#[derive(Clone, Debug)]
struct Name {
    parent: Option<Arc<Known>>,
    name: OsString,
}

impl Name {
    fn parent_id(&self) -> NodeId {
        self.parent.as_ref().map_or(ROOT_ID, |p| p.node)
    }
}

/// What the view remembers of a node: the host object it is and where it was found;
/// nothing that costs a descriptor.
///
/// Parents are held by reference, so a record whose parent's record was dropped from the
/// view's tables can still be resolved.
#[derive(Debug)]
struct Known {
    node: NodeId,
    host: HostId,
    kind: Kind,
    generation: u64,
    /// Every verified name, the one that resolved last first. A directory has one; a
    /// file hard-linked into several places may have a few, so that it still resolves
    /// when the place it was first found is gone.
    names: Mutex<Vec<Name>>,
    /// The size and modification time last reported for the object: what the client's
    /// kernel believes. A file found changed at open is refused rather than served in
    /// ways that differ between passthrough and reads through the daemon.
    reported: Mutex<Version>,
}

/// What tells one version of a file's contents from another, as far as the status shows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Version {
    size: u64,
    mtime: (i64, u32),
}

impl Version {
    fn of(st: &Statx) -> Version {
        Version {
            size: st.stx_size,
            mtime: (st.stx_mtime.tv_sec, st.stx_mtime.tv_nsec),
        }
    }
}

impl Known {
    /// Returns the attributes of `st` as this node's, remembering what was reported.
    fn report(&self, st: &Statx) -> Attr {
        *self.reported.lock() = Version::of(st);
        attr_of(st, self.node, self.generation)
    }

    fn primary(&self) -> Name {
        self.names.lock()[0].clone()
    }

    /// Records that the object was found as `name` in `parent`.
    fn found_at(&self, parent: Option<&Arc<Known>>, name: &OsStr) {
        let parent_id = parent.map_or(ROOT_ID, |p| p.node);
        let mut names = self.names.lock();
        if names
            .iter()
            .any(|n| n.parent_id() == parent_id && n.name == name)
        {
            return;
        }
        let found = Name {
            parent: parent.cloned(),
            name: name.to_owned(),
        };
        if self.kind == Kind::Directory {
            // A directory is in one place: found elsewhere, it has moved.
            *names = vec![found];
        } else if names.len() < MAX_NAMES {
            names.push(found);
        } else {
            *names.last_mut().expect("a record has a name") = found;
        }
    }

    /// Makes `index` the name tried first.
    fn prefer(&self, index: usize) {
        let mut names = self.names.lock();
        if index < names.len() {
            names[..=index].rotate_right(1);
        }
    }
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
    /// A closure path is a mount point, and crossing mounts was not asked for.
    MountPoint {
        /// The path.
        path: PathBuf,
    },
    /// `/proc` cannot be used: the view needs `/proc/self/fd` to check where cached
    /// directories are and to reopen files it has verified.
    Proc {
        /// The cause.
        source: std::io::Error,
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
            ViewError::MountPoint { path } => write!(
                f,
                "closure path {} is a mount point; --cross-mounts serves it",
                path.display()
            ),
            ViewError::Proc { source } => write!(
                f,
                "cannot use /proc/self/fd ({source}): nixstorefs needs procfs at /proc"
            ),
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
    /// The root listing: the closure's store paths present at startup, sorted by name so
    /// that root lookups are a binary search (no second copy of 100k names to build).
    root_listing: Arc<[DirEntry]>,
    /// The device and inode number of each root entry at startup, in the listing's order:
    /// a store path replaced on the host since is refused. (Only these: the full identity
    /// costs a second system call per path, and startup is on the critical path of every
    /// VM start; the record made at the first lookup holds the full identity.)
    root_hosts: Box<[(u64, u64)]>,
    root_attr: Attr,
    known: DashMap<NodeId, Arc<Known>>,
    live: DashMap<NodeId, Live>,
    /// Forgotten nodes whose records are kept, least recently forgotten first out.
    forgotten: Mutex<LruCache<NodeId, ()>>,
    max_forgotten: usize,
    generations: AtomicU64,
    dirs: FdCache,
    cross_mounts: bool,
    warnings: Limiter,
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

fn kind_of(st: &Statx) -> Kind {
    Kind::from_file_type(FileType::from_raw_mode(st.stx_mode.into())).unwrap_or(Kind::RegularFile)
}

const STATX_MASK: StatxFlags = StatxFlags::BASIC_STATS
    .union(StatxFlags::BTIME)
    .union(StatxFlags::MNT_ID);

/// A host object's status and its identity, read together.
struct Status {
    st: Statx,
    host: HostId,
}

/// The status and identity of `name` in `dir`, never following a symlink. (Two calls: an
/// object swapped between them gives an identity that matches nothing, so it is refused
/// later rather than served.)
fn status_at(dir: BorrowedFd<'_>, name: &OsStr) -> Result<Status> {
    let st = statx_at(dir, name)?;
    let host = HostId::of(&st, handle_digest(dir, name));
    Ok(Status { st, host })
}

/// The status and identity of the object `fd` refers to.
fn status_fd(fd: BorrowedFd<'_>) -> Result<Status> {
    let st = statx_fd(fd)?;
    let host = HostId::of(&st, handle_digest(fd, OsStr::new("")));
    Ok(Status { st, host })
}

/// A digest of the host's file handle of `name` in `dir` (`dir` itself for an empty
/// name), or 0 where the filesystem gives none.
fn handle_digest(dir: BorrowedFd<'_>, name: &OsStr) -> u64 {
    #[repr(C)]
    struct Handle {
        bytes: u32,
        kind: i32,
        data: [u8; 128],
    }
    // Names come from the kernel or the client's kernel: at most 255 bytes, no NUL.
    let mut cname = [0u8; 256];
    let bytes = name.as_bytes();
    if bytes.len() >= cname.len() || bytes.contains(&0) {
        return 0;
    }
    cname[..bytes.len()].copy_from_slice(bytes);
    let mut handle = Handle {
        bytes: 128,
        kind: 0,
        data: [0; 128],
    };
    let mut mount_id: libc::c_int = 0;
    let flags = if bytes.is_empty() {
        libc::AT_EMPTY_PATH
    } else {
        0
    };
    // SAFETY: a NUL-terminated name, a handle buffer as large as it says, an int.
    let r = unsafe {
        libc::name_to_handle_at(
            dir.as_raw_fd(),
            cname.as_ptr().cast(),
            (&mut handle as *mut Handle).cast(),
            &mut mount_id,
            flags,
        )
    };
    if r != 0 {
        return 0;
    }
    // FNV-1a: a digest, not a security boundary (the device, inode and mount are compared
    // in full beside it).
    let len = (handle.bytes as usize).min(handle.data.len());
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in handle.kind.to_le_bytes().iter().chain(&handle.data[..len]) {
        h = (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
    }
    h | 1
}

/// The status of `name` in `dir`, never following a symlink.
fn statx_at(dir: BorrowedFd<'_>, name: &OsStr) -> Result<Statx> {
    rustix::fs::statx(dir, name, AtFlags::SYMLINK_NOFOLLOW, STATX_MASK)
}

/// The status of the object `fd` refers to.
fn statx_fd(fd: BorrowedFd<'_>) -> Result<Statx> {
    rustix::fs::statx(fd, "", AtFlags::EMPTY_PATH, STATX_MASK)
}

fn is_mount_root(st: &Statx) -> bool {
    st.stx_attributes_mask.contains(StatxAttributes::MOUNT_ROOT)
        && st.stx_attributes.contains(StatxAttributes::MOUNT_ROOT)
}

/// A record to hand out: a new one for an object just found, or one the view has.
enum Candidate<'a> {
    Found {
        host: HostId,
        kind: Kind,
        parent: Option<&'a Arc<Known>>,
        name: &'a OsStr,
    },
    Existing(&'a Arc<Known>),
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
        let mut root_listing = Vec::with_capacity(closure.paths.len());
        let mut root_hosts = Vec::with_capacity(closure.paths.len());
        let mut setup = Setup::default();
        for path in &closure.paths {
            let name = OsStr::new(path.base_name());
            match rustix::fs::statat(store.as_fd(), name, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st) => {
                    // Another device is another mount; a bind mount from the same device
                    // is found (and refused) at lookup, by its mount id.
                    if !options.cross_mounts && st.st_dev != store_host.dev {
                        return Err(ViewError::MountPoint {
                            path: store_dir.join(name),
                        });
                    }
                    root_listing.push(DirEntry {
                        name: name.to_owned(),
                        ino: inodes
                            .direct(st.st_dev, store_host.mnt, st.st_ino)
                            .unwrap_or(0),
                        kind: Kind::from_file_type(FileType::from_raw_mode(st.st_mode))
                            .unwrap_or(Kind::RegularFile),
                    });
                    root_hosts.push((st.st_dev, st.st_ino));
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
                origin: closure.origin.clone(),
                store_dir,
                paths: setup.missing,
            });
        }
        let root_attr = View::closure_root(&store_stat, &root_listing);
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

    /// The root of a closure view: a directory of its own, read-only and timeless like the
    /// store paths in it, owned like the store directory.
    fn closure_root(store_stat: &Statx, root_listing: &[DirEntry]) -> Attr {
        Attr {
            ino: ROOT_ID,
            generation: 0,
            kind: Kind::Directory,
            perm: 0o555,
            nlink: 2 + root_listing
                .iter()
                .filter(|e| e.kind == Kind::Directory)
                .count() as u32,
            uid: store_stat.stx_uid,
            gid: store_stat.stx_gid,
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
        debug_assert!(root_listing.windows(2).all(|w| w[0].name < w[1].name));
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
            root_listing: root_listing.into(),
            root_hosts: root_hosts.into(),
            root_attr,
            known: DashMap::new(),
            live: DashMap::new(),
            forgotten: Mutex::new(LruCache::unbounded()),
            max_forgotten,
            generations: AtomicU64::new(1),
            dirs: FdCache::new(options.max_cached_dirs),
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

    /// What the view holds now.
    pub fn stats(&self) -> ViewStats {
        ViewStats {
            live: self.live.len(),
            records: self.known.len(),
            allocated: self.inodes.allocated_count(),
            cached_dirs: self.dirs.len(),
        }
    }

    fn known(&self, id: NodeId) -> Result<Arc<Known>> {
        self.known.get(&id).map(|k| k.clone()).ok_or(Errno::STALE)
    }

    /// A verified `O_PATH` descriptor of directory `node`, from the cache or opened one
    /// component at a time from the nearest cached ancestor (or the store).
    fn dir_fd(&self, node: &Arc<Known>) -> Result<Arc<CachedDir>> {
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
                None => (self.store.as_fd(), self.store_place.as_slice()),
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
            base = Some(dir);
        }
        Ok(base.expect("the chain has at least one directory"))
    }

    /// The cached descriptor of directory `node`, if there is one for its object and the
    /// kernel still places that directory where it was found.
    fn cached_dir(&self, node: &Known) -> Option<Arc<CachedDir>> {
        let dir = self.dirs.get(node.node)?;
        if dir.host == node.host && place_of(&self.proc_fd, dir.fd.as_fd()).ok()? == dir.place {
            return Some(dir);
        }
        // Moved (or another object under the same number): resolve it afresh.
        self.dirs.remove(node.node);
        None
    }

    /// Checks that `st` is the host object recorded as `node`.
    fn check_identity(&self, status: &Status, node: &Known) -> Result<()> {
        if status.host != node.host || kind_of(&status.st) != node.kind {
            warn_limited!(self.warnings, node = node.node, store = %self.store_dir.display(), "host object replaced while served; refusing it");
            return Err(Errno::STALE);
        }
        Ok(())
    }

    /// Maps a failure to reach `node` on the host to what the client sees: the node is
    /// stale (the kernel then looks its name up again).
    fn gone(&self, e: Errno, node: &Known) -> Errno {
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
    fn resolve<T>(
        &self,
        node: &Arc<Known>,
        f: impl Fn(BorrowedFd<'_>, &OsStr) -> Result<T>,
    ) -> Result<T> {
        let names = node.names.lock().clone();
        let mut first_err = Errno::STALE;
        for (i, name) in names.iter().enumerate() {
            let result = match &name.parent {
                None => f(self.store.as_fd(), &name.name),
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
    fn stat_node(&self, node: &Arc<Known>) -> Result<Statx> {
        self.resolve(node, |dir, name| {
            let status = status_at(dir, name).map_err(|e| self.gone(e, node))?;
            self.check_identity(&status, node)?;
            Ok(status.st)
        })
    }

    /// An `O_PATH` descriptor of `node`, checked to be its object.
    fn path_fd(&self, node: &Arc<Known>) -> Result<(OwnedFd, Statx)> {
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

    /// Hands out a record for `candidate` (counting one reference when `count`), and
    /// returns it. Two different host objects never get the same number.
    fn hand_out(&self, candidate: Candidate<'_>, count: bool) -> Arc<Known> {
        let (host, kind) = match &candidate {
            Candidate::Found { host, kind, .. } => (*host, *kind),
            Candidate::Existing(r) => (r.host, r.kind),
        };
        if let Some(n) = self.inodes.direct(host.dev, host.mnt, host.ino) {
            if let Some(record) = self.claim(n, host, kind, &candidate, count, false) {
                return record;
            }
        }
        loop {
            let n = self.inodes.allocate(&host);
            if let Some(record) = self.claim(n, host, kind, &candidate, count, true) {
                return record;
            }
        }
    }

    /// Takes node number `n` for the object `host`; `None` when `n` is another object's
    /// that clients still hold (or, for an allocated number, was released meanwhile).
    fn claim(
        &self,
        n: NodeId,
        host: HostId,
        kind: Kind,
        candidate: &Candidate<'_>,
        count: bool,
        allocated: bool,
    ) -> Option<Arc<Known>> {
        let mut evicted = None;
        let record = {
            // The live entry's lock serialises everything that changes node `n`'s record.
            let live = self.live.entry(n);
            if allocated && self.inodes.allocated(&host) != Some(n) {
                return None;
            }
            let held = matches!(live, Entry::Occupied(_));
            let existing = self.known.get(&n).map(|r| r.clone());
            let record = match existing {
                Some(r) if r.host == host && r.kind == kind => {
                    if let Candidate::Found { parent, name, .. } = candidate {
                        r.found_at(*parent, name);
                    }
                    r
                }
                Some(_) if held => return None,
                // A forgotten record, or none: (re)create it. A record the view no longer
                // has, but a child still refers to, comes back as it was.
                other => {
                    if let Some(old) = other {
                        self.inodes.release(n, &old.host);
                        self.dirs.remove(n);
                    }
                    let record = match candidate {
                        Candidate::Existing(r) if r.node == n => Arc::clone(r),
                        Candidate::Existing(r) => Arc::new(Known {
                            node: n,
                            host,
                            kind,
                            generation: self.generations.fetch_add(1, Ordering::Relaxed),
                            names: Mutex::new(r.names.lock().clone()),
                            reported: Mutex::new(*r.reported.lock()),
                        }),
                        Candidate::Found { parent, name, .. } => Arc::new(Known {
                            node: n,
                            host,
                            kind,
                            generation: self.generations.fetch_add(1, Ordering::Relaxed),
                            names: Mutex::new(vec![Name {
                                parent: parent.cloned(),
                                name: name.to_os_string(),
                            }]),
                            reported: Mutex::new(Version::default()),
                        }),
                    };
                    self.known.insert(n, record.clone());
                    record
                }
            };
            match live {
                Entry::Occupied(mut e) if count => e.get_mut().lookups += 1,
                Entry::Occupied(_) => {}
                Entry::Vacant(v) if count => {
                    v.insert(Live {
                        lookups: 1,
                        listing: None,
                    });
                    self.forgotten.lock().pop(&n);
                }
                Entry::Vacant(v) => {
                    drop(v);
                    evicted = self.remember_forgotten(n);
                }
            }
            record
        };
        if let Some(old) = evicted {
            self.evict(old);
        }
        Some(record)
    }

    /// Puts `n` among the forgotten nodes; returns the node that falls out, if any.
    fn remember_forgotten(&self, n: NodeId) -> Option<NodeId> {
        let mut forgotten = self.forgotten.lock();
        forgotten.put(n, ());
        if forgotten.len() > self.max_forgotten {
            forgotten.pop_lru().map(|(old, ())| old)
        } else {
            None
        }
    }

    /// Drops the record of forgotten node `n`, unless clients hold it again.
    fn evict(&self, n: NodeId) {
        let live = self.live.entry(n);
        if let Entry::Vacant(_) = live {
            if let Some((_, record)) = self.known.remove(&n) {
                // Top-level paths keep their numbers: the root listing reports them.
                if record.names.lock().iter().all(|name| name.parent.is_some()) {
                    self.inodes.release(n, &record.host);
                }
                self.dirs.remove(n);
            }
        }
    }

    /// Looks `name` up in directory `parent` and, on success, counts one reference to the
    /// node returned (to be released with [`View::forget`]).
    pub fn lookup(&self, parent: NodeId, name: &OsStr) -> Result<Attr> {
        self.find(parent, name, true)
    }

    /// What a lookup of `name` in `parent` would return, without counting a reference:
    /// for transports that report node numbers in plain listings.
    pub fn peek(&self, parent: NodeId, name: &OsStr) -> Result<Attr> {
        self.find(parent, name, false)
    }

    fn find(&self, parent: NodeId, name: &OsStr, count: bool) -> Result<Attr> {
        if parent == ROOT_ID {
            if name == "." || name == ".." {
                return Ok(self.root_attr);
            }
            let Ok(index) = self
                .root_listing
                .binary_search_by(|e| e.name.as_os_str().cmp(name))
            else {
                return Err(Errno::NOENT);
            };
            let Status { st, host } = status_at(self.store.as_fd(), name).map_err(|e| {
                warn_limited!(self.warnings, path = %self.store_dir.join(name).display(), "store path vanished: {e}");
                Errno::NOENT
            })?;
            let kind = kind_of(&st);
            if (host.dev, host.ino) != self.root_hosts[index]
                || kind != self.root_listing[index].kind
            {
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
                count,
            );
            return Ok(record.report(&st));
        }
        let dir = self.known(parent)?;
        if name == "." {
            // How the kernel finds a node it has forgotten, from a file handle: `parent` is
            // then the node itself, of any kind.
            let st = self.stat_node(&dir)?;
            let record = self.hand_out(Candidate::Existing(&dir), count);
            return Ok(record.report(&st));
        }
        if dir.kind != Kind::Directory {
            return Err(Errno::NOTDIR);
        }
        if name == ".." {
            // Needed for re-export (FUSE_EXPORT_SUPPORT): the kernel asks for a
            // directory's parent when it reconnects a file handle.
            let Some(grandparent) = dir.primary().parent else {
                return Ok(self.root_attr);
            };
            let st = self.stat_node(&grandparent)?;
            let record = self.hand_out(Candidate::Existing(&grandparent), count);
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
            count,
        );
        Ok(record.report(&st))
    }

    /// Releases `count` references to node `id`; the node's state goes once none are left
    /// (its record stays among the forgotten ones, up to the cap).
    pub fn forget(&self, id: NodeId, count: u64) {
        if id == ROOT_ID {
            return;
        }
        let mut evicted = None;
        if let Entry::Occupied(mut e) = self.live.entry(id) {
            if e.get().lookups <= count {
                e.remove();
                self.dirs.remove(id);
                evicted = self.remember_forgotten(id);
            } else {
                e.get_mut().lookups -= count;
            }
        }
        if let Some(old) = evicted {
            self.evict(old);
        }
    }

    /// Releases every reference clients hold, as a FORGET of each live node would: for a
    /// client that went away (DESTROY, a device reset) without forgetting what it held.
    pub fn forget_all(&self) {
        let live: Vec<NodeId> = self.live.iter().map(|e| *e.key()).collect();
        for id in live {
            self.forget(id, u64::MAX);
        }
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
            return Ok(self.root_attr);
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

    /// Refuses (`EIO`) to open a file whose size or modification time changed on the host
    /// since they were reported: the client's kernel would clip or zero-fill its reads
    /// by the size it believes, and differently with and without passthrough.
    fn check_unchanged(&self, node: &Known, st: &Statx) -> Result<()> {
        if *node.reported.lock() != Version::of(st) {
            warn_limited!(self.warnings, node = node.node, store = %self.store_dir.display(), "a file changed on the host since it was looked up; refusing to open it");
            return Err(Errno::IO);
        }
        Ok(())
    }

    /// Opens the object of a verified `O_PATH` descriptor for reading.
    fn reopen(&self, path: &OwnedFd) -> Result<OwnedFd> {
        rustix::fs::openat(
            &self.proc_fd,
            fd_path(path.as_raw_fd()).as_str(),
            OFlags::RDONLY | OFlags::NOCTTY | OFlags::CLOEXEC,
            Mode::empty(),
        )
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

/// The path of descriptor `fd` below `/proc`.
fn fd_path(fd: i32) -> String {
    format!("self/fd/{fd}")
}

/// Where the kernel places the object of `fd`: the target of its `/proc/self/fd` link.
fn place_of(proc_fd: &OwnedFd, fd: BorrowedFd<'_>) -> Result<Vec<u8>> {
    let target = rustix::fs::readlinkat(proc_fd, fd_path(fd.as_raw_fd()).as_str(), Vec::new())?;
    Ok(target.into_bytes())
}

/// The attributes of the host object `st`, reported as node `ino`.
fn attr_of(st: &Statx, ino: NodeId, generation: u64) -> Attr {
    let t = |ts: StatxTimestamp| Time {
        secs: ts.tv_sec,
        nsecs: ts.tv_nsec,
    };
    Attr {
        ino,
        generation,
        kind: kind_of(st),
        perm: st.stx_mode & 0o7777,
        nlink: st.stx_nlink,
        uid: st.stx_uid,
        gid: st.stx_gid,
        size: st.stx_size,
        blocks: st.stx_blocks,
        blksize: st.stx_blksize,
        rdev: rustix::fs::makedev(st.stx_rdev_major, st.stx_rdev_minor),
        atime: t(st.stx_atime),
        mtime: t(st.stx_mtime),
        ctime: t(st.stx_ctime),
    }
}

/// Opens directory `path` (`O_PATH`) as the base every resolution starts from.
fn open_dir(path: &Path) -> std::result::Result<(OwnedFd, Status), ViewError> {
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
fn read_entries(dir: BorrowedFd<'_>, host: &HostId, inodes: &InodeMap) -> Result<Vec<DirEntry>> {
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
