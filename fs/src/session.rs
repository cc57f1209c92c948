//! What every transport serves a [`View`] with: the state of one client's session.
//!
//! A client (the host kernel over `/dev/fuse`, a guest kernel over virtio-fs) speaks the
//! same FUSE protocol whichever way its requests come. Everything that protocol needs
//! beyond the view itself lives here, once: open-file handles and the size-at-open rule,
//! directory streams with stable offsets and their `.` and `..` entries, the cache policy
//! the client is told, and the answers for what a read-only store has not got (extended
//! attributes, write access). Lookup counts, FORGET and generations are the view's own.
//! Transports only translate these types into their replies.

use std::ffi::OsStr;
use std::fs::File;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use lru::LruCache;
use parking_lot::Mutex;
use rustix::io::Errno;

use crate::gc_roots::RootsGate;
use crate::ratelimit::Limiter;
use crate::view::{Access, Attr, DirEntry, Kind, NodeId, Result, View};
use crate::warn_limited;

/// How long a client may trust entries and attributes: the store is immutable, so as long
/// as it likes. (Kernels clamp what they cannot represent.)
pub const TTL: Duration = Duration::from_secs(365 * 24 * 3600);

/// How a transport's client learns that the served set changed (a live update).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Invalidation {
    /// The transport tells the client's kernel (FUSE notifications on the host mount):
    /// everything may be trusted for [`TTL`], the root included.
    Notified,
    /// Nothing can tell the client (virtio-fs has no notification channel in any guest
    /// kernel). The root's attributes are trusted for [`ROOT_ATTR_TTL`], so that a client
    /// reads its cached root listing again once the root's times moved (a lookup that
    /// failed was never cached, so a path added is found at once); an entry at the root
    /// is trusted for [`ROOT_ENTRY_TTL`], so that a path removed is looked up again, and
    /// not found, at most that long after the update.
    Unannounced,
}

/// How long a client that cannot be told of updates trusts the root's attributes. Not
/// zero: a guest's virtio-fs mount checks permissions itself (`default_permissions`),
/// with the attributes of every directory a path walk crosses, so a zero here costs a
/// GETATTR at every path resolution through the store (measured: the guest bench's warm
/// walk four times slower, its small files a quarter slower). A tenth of a second bounds
/// how long a listing of the root can miss a path just added.
pub const ROOT_ATTR_TTL: Duration = Duration::from_millis(100);

/// How long a client that cannot be told of updates trusts an entry at the root. Zero
/// would cost a request at every path resolution through the store (a cold read of many
/// small files by path: one more request per file); a second bounds how long a removed
/// path stays found, and costs one request per store path per second at most.
pub const ROOT_ENTRY_TTL: Duration = Duration::from_secs(1);

/// How long a client may trust a lookup's answer for a name in `parent`.
pub fn entry_ttl(parent: NodeId, invalidation: Invalidation) -> Duration {
    match invalidation {
        Invalidation::Unannounced if parent == crate::view::ROOT_ID => ROOT_ENTRY_TTL,
        _ => TTL,
    }
}

/// How long a client may trust the attributes of `node`.
pub fn attr_ttl(node: NodeId, invalidation: Invalidation) -> Duration {
    match invalidation {
        Invalidation::Unannounced if node == crate::view::ROOT_ID => ROOT_ATTR_TTL,
        _ => TTL,
    }
}

/// How long a request waits for the roots to be taken again before it fails.
const ROOTS_WAIT: Duration = Duration::from_secs(5);

/// What a client is told to do with the page cache of a file or directory it opens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CachePolicy {
    /// Keep cached pages across opens (FOPEN_KEEP_CACHE): the object cannot change under
    /// the view.
    pub keep_cache: bool,
    /// Cache directory contents too (FOPEN_CACHE_DIR).
    pub cache_dir: bool,
}

/// The policy for regular files served through the daemon.
pub const FILE_CACHE: CachePolicy = CachePolicy {
    keep_cache: true,
    cache_dir: false,
};

/// The policy for directories.
pub const DIR_CACHE: CachePolicy = CachePolicy {
    keep_cache: true,
    cache_dir: true,
};

/// A regular file a client has open, with what its transport keeps beside it (`X`).
///
/// A handle is a small record: it holds no host descriptor. The descriptor it reads
/// through is the node's, shared by every handle of the node and kept in a bounded cache
/// ([`Session::host_file`]), so a client holding many handles holds no more of the host's
/// descriptors than the cache's size.
#[derive(Debug)]
pub struct OpenFile<X> {
    /// The node it was opened as.
    pub node: NodeId,
    /// The size at open, which is what the client believes. A read that finds less was
    /// shrunk on the host: it fails rather than come back short, because a kernel fills a
    /// short read up to the size it believes with zeros, bytes the file never had.
    pub size: u64,
    /// The transport's own state for the handle (a passthrough id, a mapping).
    pub transport: X,
}

impl<X> OpenFile<X> {
    /// How many bytes a read of `len` at `offset` returns: short only at the end of the
    /// file, as it was at open.
    pub fn span(&self, offset: u64, len: u32) -> usize {
        self.size.saturating_sub(offset).min(u64::from(len)) as usize
    }

    /// Reads exactly `want` bytes at `offset` of `file` (this handle's host file, from
    /// [`Session::host_file`]) through `read_at(file, offset, len)`, which moves up to
    /// `len` bytes to the client and says how many it moved. Short host reads are
    /// retried; a host file that ends early fails the read with `EIO`. Returns `want`.
    pub fn read_exact(
        &self,
        file: &File,
        offset: u64,
        want: usize,
        warnings: &Limiter,
        mut read_at: impl FnMut(&File, u64, usize) -> std::io::Result<usize>,
    ) -> Result<usize> {
        let mut done = 0;
        while done < want {
            match read_at(file, offset + done as u64, want - done) {
                Ok(0) => {
                    warn_limited!(
                        warnings,
                        node = self.node,
                        "a file shrank on the host while open; failing the read"
                    );
                    return Err(Errno::IO);
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(io_errno(&e)),
            }
        }
        Ok(want)
    }
}

/// What a listing costs in memory, roughly: its entries and their names.
fn listing_bytes(listing: &[DirEntry]) -> usize {
    listing
        .iter()
        .map(|e| std::mem::size_of::<DirEntry>() + e.name.len())
        .sum()
}

/// The errno of an I/O error (`EIO` when it carries none).
pub fn io_errno(e: &std::io::Error) -> Errno {
    Errno::from_raw_os_error(e.raw_os_error().unwrap_or(libc::EIO))
}

/// An open directory: its listing as it was at opendir, so that offsets stay valid for the
/// handle's whole life whatever other readers do.
#[derive(Clone, Debug)]
pub struct DirStream {
    node: NodeId,
    parent: NodeId,
    listing: Arc<[DirEntry]>,
}

/// One entry of a [`DirStream`], at a stable offset.
#[derive(Clone, Copy, Debug)]
pub struct DirSlot<'a> {
    /// The entry's name (`.` and `..` included).
    pub name: &'a OsStr,
    /// The offset that resumes the stream after this entry.
    pub next_offset: u64,
    /// For `.` and `..`, the node they name (clients take no reference on them).
    pub dot: Option<NodeId>,
}

impl DirStream {
    /// The entries from `offset` on. Offsets: 0 is the start, n means "after the n-th
    /// entry", counting `.` and `..` first.
    pub fn from_offset(&self, offset: u64) -> impl Iterator<Item = DirSlot<'_>> {
        let dots = [(self.node, "."), (self.parent, "..")];
        let total = self.listing.len() as u64 + 2;
        (offset.min(total)..total).map(move |i| {
            if i < 2 {
                DirSlot {
                    name: OsStr::new(dots[i as usize].1),
                    next_offset: i + 1,
                    dot: Some(dots[i as usize].0),
                }
            } else {
                DirSlot {
                    name: &self.listing[(i - 2) as usize].name,
                    next_offset: i + 1,
                    dot: None,
                }
            }
        })
    }

    /// The directory's node.
    pub fn node(&self) -> NodeId {
        self.node
    }
}

/// The answer to an extended attribute request, by the protocol's rule: a buffer size of
/// 0 asks how large a buffer the value needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Xattr {
    /// The size the value needs.
    Size(u32),
    /// The value itself.
    Data(Vec<u8>),
}

impl Xattr {
    /// `value` for a buffer of `size` bytes: its size, the value, or `ERANGE`.
    pub fn fit(value: Vec<u8>, size: u32) -> Result<Xattr> {
        if size == 0 {
            Ok(Xattr::Size(value.len() as u32))
        } else if value.len() > size as usize {
            Err(Errno::RANGE)
        } else {
            Ok(Xattr::Data(value))
        }
    }
}

/// What one client may make the daemon hold, whatever it sends. Past a bound the client
/// gets `EMFILE` (handles) or `ENFILE` (directory snapshot bytes), never the host's memory
/// or descriptors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SessionLimits {
    /// Open file handles at once.
    pub max_open_files: usize,
    /// Open directory handles at once.
    pub max_open_dirs: usize,
    /// Bytes of directory listings held by open directory handles, counted per handle
    /// (listings are shared, so this overstates what is held).
    pub max_dir_bytes: usize,
    /// Host descriptors of open files kept at once, shared by all handles of a node.
    pub max_cached_files: usize,
}

impl Default for SessionLimits {
    fn default() -> Self {
        SessionLimits {
            // A handle record is under 100 bytes: 6.5 MiB at most.
            max_open_files: 65_536,
            max_open_dirs: 4_096,
            max_dir_bytes: 64 << 20,
            max_cached_files: 256,
        }
    }
}

/// An open directory handle and what it counts against the limits.
struct OpenDir {
    stream: DirStream,
    bytes: usize,
}

/// One client's session on a view: handles, directory streams and policy, shared by every
/// transport; `X` is what the transport keeps per open file.
pub struct Session<X> {
    view: Arc<View>,
    limits: SessionLimits,
    files: DashMap<u64, Arc<OpenFile<X>>>,
    dirs: DashMap<u64, OpenDir>,
    /// Handles and bytes held, checked against `limits` before each open.
    open_files: AtomicUsize,
    open_dirs: AtomicUsize,
    dir_bytes: AtomicUsize,
    /// The host descriptor of each node with open handles, least recently used out first;
    /// an evicted node is reopened (and its identity checked again) at its next read.
    host_files: Mutex<LruCache<NodeId, Arc<File>>>,
    /// Open handles per node: a node's descriptor leaves the cache with its last handle,
    /// so closed files hold no descriptor.
    node_handles: DashMap<NodeId, usize>,
    next_handle: AtomicU64,
    /// Whether the served paths are rooted against garbage collection now: nothing is
    /// served while they are not (the roots keeper is taking them again).
    gate: RootsGate,
    /// Rate limits per-request warnings of the transports and the session.
    pub warnings: Limiter,
}

impl<X> Session<X> {
    /// A session on `view` with no handles open and the default limits.
    pub fn new(view: Arc<View>) -> Self {
        Session::with_limits(view, SessionLimits::default())
    }

    /// A session on `view` bounded by `limits`.
    pub fn with_limits(view: Arc<View>, limits: SessionLimits) -> Self {
        let cached = NonZeroUsize::new(limits.max_cached_files.max(1)).expect("at least one");
        Session {
            view,
            limits,
            files: DashMap::new(),
            dirs: DashMap::new(),
            open_files: AtomicUsize::new(0),
            open_dirs: AtomicUsize::new(0),
            dir_bytes: AtomicUsize::new(0),
            host_files: Mutex::new(LruCache::new(cached)),
            node_handles: DashMap::new(),
            next_handle: AtomicU64::new(1),
            gate: RootsGate::open(),
            warnings: Limiter::default(),
        }
    }

    /// This session, serving only while `gate` says the served paths are rooted.
    pub fn gated(mut self, gate: RootsGate) -> Self {
        self.gate = gate;
        self
    }

    /// Waits (bounded) while the roots are being taken again; `EIO` if they do not come
    /// back, rather than serve paths a collection may be deleting.
    #[inline]
    fn rooted(&self) -> Result<()> {
        if self.gate.is_held() || self.gate.wait_held(ROOTS_WAIT) {
            return Ok(());
        }
        warn_limited!(
            self.warnings,
            "the served paths are not rooted against garbage collection; refusing requests"
        );
        Err(Errno::IO)
    }

    /// The view served.
    /// Runs `f` as one request of this session's client (see `View::request`).
    pub fn request<T>(&self, f: impl FnOnce() -> T) -> T {
        self.view.request(f)
    }

    /// The view served.
    pub fn view(&self) -> &Arc<View> {
        &self.view
    }

    /// The limits the session enforces.
    pub fn limits(&self) -> SessionLimits {
        self.limits
    }

    /// How many file and directory handles are open now.
    pub fn open_handles(&self) -> (usize, usize) {
        (
            self.open_files.load(Ordering::Relaxed),
            self.open_dirs.load(Ordering::Relaxed),
        )
    }

    fn handle(&self) -> u64 {
        self.next_handle.fetch_add(1, Ordering::Relaxed)
    }

    /// Takes `amount` of `counter` if that stays within `max`.
    fn take(counter: &AtomicUsize, amount: usize, max: usize) -> bool {
        counter
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                n.checked_add(amount).filter(|&m| m <= max)
            })
            .is_ok()
    }

    /// Ends the client's session: every handle is closed and every reference the client
    /// held on nodes is released, as if it had sent RELEASE and FORGET for each (FUSE's
    /// DESTROY, a virtio device reset). The view is left as it was at startup.
    pub fn reset(&self) {
        self.files.clear();
        self.dirs.clear();
        self.open_files.store(0, Ordering::Relaxed);
        self.open_dirs.store(0, Ordering::Relaxed);
        self.dir_bytes.store(0, Ordering::Relaxed);
        self.host_files.lock().clear();
        self.node_handles.clear();
        self.view.forget_all();
    }

    /// Looks `name` up in `parent`, counting one reference the client must FORGET.
    pub fn lookup(&self, parent: NodeId, name: &OsStr) -> Result<Attr> {
        self.rooted()?;
        self.view.lookup(parent, name)
    }

    /// Releases `count` references to `id`.
    pub fn forget(&self, id: NodeId, count: u64) {
        self.view.forget(id, count)
    }

    /// The attributes of `id`.
    pub fn getattr(&self, id: NodeId) -> Result<Attr> {
        self.rooted()?;
        self.view.getattr(id)
    }

    /// The target of symlink `id`.
    pub fn readlink(&self, id: NodeId) -> Result<Vec<u8>> {
        self.rooted()?;
        self.view.readlink(id)
    }

    /// Opens regular file `id` with open(2) `flags`: anything that could modify it is
    /// refused with `EROFS`, a handle past the session's limit with `EMFILE`. `attach`
    /// makes the transport's state for the handle from the host file; the file is
    /// registered before the handle is returned, so that a release sent as soon as the
    /// client has the reply finds it.
    pub fn open(
        &self,
        id: NodeId,
        flags: i32,
        attach: impl FnOnce(&File) -> X,
    ) -> Result<(u64, Arc<OpenFile<X>>)> {
        if Access::of_flags(flags) == Access::Write {
            return Err(Errno::ROFS);
        }
        self.rooted()?;
        if !Self::take(&self.open_files, 1, self.limits.max_open_files) {
            warn_limited!(
                self.warnings,
                limit = self.limits.max_open_files,
                "the client holds as many open files as it may; refusing more (EMFILE)"
            );
            return Err(Errno::MFILE);
        }
        let opened = self.open_host(id).map(|(file, size)| {
            let open = Arc::new(OpenFile {
                node: id,
                size,
                transport: attach(&file),
            });
            let fh = self.handle();
            *self.node_handles.entry(id).or_insert(0) += 1;
            self.files.insert(fh, open.clone());
            (fh, open)
        });
        if opened.is_err() {
            self.open_files.fetch_sub(1, Ordering::Relaxed);
        }
        opened
    }

    /// The node's host file and its size, from the cache or opened (and checked) anew.
    fn open_host(&self, id: NodeId) -> Result<(Arc<File>, u64)> {
        let host = self.view.open(id, Access::Read)?;
        let file = Arc::new(File::from(host.fd));
        self.host_files.lock().put(id, file.clone());
        Ok((file, host.size))
    }

    /// The host file `open` reads from: the node's cached descriptor, or the node opened
    /// again through the view, which checks that it is still the same object.
    pub fn host_file(&self, open: &OpenFile<X>) -> Result<Arc<File>> {
        self.rooted()?;
        if let Some(file) = self.host_files.lock().get(&open.node) {
            return Ok(file.clone());
        }
        let (file, size) = self.open_host(open.node)?;
        if size != open.size {
            // The view refuses files changed since they were reported; this is a file
            // changed between two opens, which the same rule covers.
            return Err(Errno::IO);
        }
        Ok(file)
    }

    /// The open file of handle `fh`, shared so that no table lock is held while replying.
    pub fn file(&self, fh: u64) -> Result<Arc<OpenFile<X>>> {
        self.rooted()?;
        self.files
            .get(&fh)
            .map(|f| Arc::clone(&f))
            .ok_or(Errno::BADF)
    }

    /// Closes handle `fh`, giving back its record.
    pub fn release(&self, fh: u64) -> Option<Arc<OpenFile<X>>> {
        let released = self.files.remove(&fh).map(|(_, f)| f);
        if let Some(open) = &released {
            self.open_files.fetch_sub(1, Ordering::Relaxed);
            let last = match self.node_handles.get_mut(&open.node) {
                Some(mut n) => {
                    *n -= 1;
                    *n == 0
                }
                None => false,
            };
            if last {
                // Removed only if still unused: an open may have raced in since.
                if self
                    .node_handles
                    .remove_if(&open.node, |_, n| *n == 0)
                    .is_some()
                {
                    self.host_files.lock().pop(&open.node);
                }
            }
        }
        released
    }

    /// Opens directory `id` as a stream with stable offsets: a snapshot of its listing,
    /// counted against the session's limits (`EMFILE` past the handle count, `ENFILE`
    /// past the listing bytes).
    pub fn opendir(&self, id: NodeId) -> Result<u64> {
        self.rooted()?;
        let stream = self.stream(id)?;
        let bytes = listing_bytes(&stream.listing);
        if !Self::take(&self.open_dirs, 1, self.limits.max_open_dirs) {
            warn_limited!(
                self.warnings,
                limit = self.limits.max_open_dirs,
                "the client holds as many open directories as it may; refusing more (EMFILE)"
            );
            return Err(Errno::MFILE);
        }
        if !Self::take(&self.dir_bytes, bytes, self.limits.max_dir_bytes) {
            self.open_dirs.fetch_sub(1, Ordering::Relaxed);
            warn_limited!(
                self.warnings,
                limit = self.limits.max_dir_bytes,
                "the client's open directories hold as many listing bytes as they may (ENFILE)"
            );
            return Err(Errno::NFILE);
        }
        let fh = self.handle();
        self.dirs.insert(fh, OpenDir { stream, bytes });
        Ok(fh)
    }

    /// The stream of handle `fh` on `id`; handle 0 is the node's own listing, for clients
    /// that read directories without opening them (it never changes while the node is
    /// held, so offsets stay valid all the same).
    pub fn dir_stream(&self, id: NodeId, fh: u64) -> Result<DirStream> {
        self.rooted()?;
        if fh == 0 {
            return self.stream(id);
        }
        match self.dirs.get(&fh) {
            Some(d) if d.stream.node == id => Ok(d.stream.clone()),
            _ => Err(Errno::BADF),
        }
    }

    fn stream(&self, id: NodeId) -> Result<DirStream> {
        let listing = self.view.list(id)?;
        let parent = self.view.parent_of(id)?;
        Ok(DirStream {
            node: id,
            parent,
            listing,
        })
    }

    /// Closes directory handle `fh`.
    pub fn releasedir(&self, fh: u64) {
        if let Some((_, dir)) = self.dirs.remove(&fh) {
            self.open_dirs.fetch_sub(1, Ordering::Relaxed);
            self.dir_bytes.fetch_sub(dir.bytes, Ordering::Relaxed);
        }
    }

    /// The attributes of a slot without counting a reference: what a plain readdir
    /// reports. `None` for an entry that vanished from the host since the listing (it is
    /// left out).
    pub fn peek(&self, stream: &DirStream, slot: &DirSlot<'_>) -> Option<Attr> {
        self.rooted().ok()?;
        match slot.dot {
            Some(id) => self.view.getattr(id).ok(),
            None => self.view.peek(stream.node, slot.name).ok(),
        }
    }

    /// The attributes of a slot for readdirplus: entries count a reference (hand it back
    /// with [`Session::forget`] if the entry is not sent), `.` and `..` do not. `None` for
    /// an entry that vanished since the listing; an error only for `.` and `..`.
    pub fn lookup_slot(&self, stream: &DirStream, slot: &DirSlot<'_>) -> Option<Result<Attr>> {
        if let Err(e) = self.rooted() {
            return Some(Err(e));
        }
        match slot.dot {
            Some(id) => Some(self.view.getattr(id)),
            None => self.view.lookup(stream.node, slot.name).ok().map(Ok),
        }
    }

    /// `EROFS`: the answer to every request that would modify the store.
    pub fn read_only(&self) -> Errno {
        Errno::ROFS
    }

    /// A store object's extended attribute `name`, for a buffer of `size` bytes: there are
    /// none (a NAR has none), so `ENODATA`, which tools that copy attributes take as
    /// "nothing to copy". `ENOTSUP` would make them give up on the whole tree.
    pub fn getxattr(&self, id: NodeId, _name: &OsStr, _size: u32) -> Result<Xattr> {
        self.rooted()?;
        self.view.getattr(id)?;
        Err(Errno::NODATA)
    }

    /// The list of a store object's extended attribute names (empty), for a buffer of
    /// `size` bytes.
    pub fn listxattr(&self, id: NodeId, size: u32) -> Result<Xattr> {
        self.rooted()?;
        self.view.getattr(id)?;
        Xattr::fit(Vec::new(), size)
    }

    /// Whether a client with `uid` and `gid` may access `id` with `mask` (access(2)'s
    /// R_OK, W_OK, X_OK): never for writing; otherwise by the mode bits, as the kernel
    /// would check them.
    pub fn access(&self, id: NodeId, uid: u32, gid: u32, mask: u32) -> Result<()> {
        self.rooted()?;
        let attr = self.view.getattr(id)?;
        let mask = mask as i32;
        if mask & libc::W_OK != 0 {
            return Err(Errno::ROFS);
        }
        let wanted = (mask & (libc::R_OK | libc::X_OK)) as u16;
        if wanted == 0 {
            return Ok(());
        }
        let perm = attr.perm;
        let granted = if uid == 0 {
            // Root reads anything, and executes what anyone may execute (or any directory).
            let any_x = perm & 0o111 != 0 || attr.kind == Kind::Directory;
            4 | if any_x { 1 } else { 0 }
        } else if uid == attr.uid {
            (perm >> 6) & 7
        } else if gid == attr.gid {
            (perm >> 3) & 7
        } else {
            perm & 7
        };
        if granted & wanted == wanted {
            Ok(())
        } else {
            Err(Errno::ACCESS)
        }
    }

    /// Statistics of the host filesystem holding the store.
    pub fn statfs(&self) -> Result<rustix::fs::StatVfs> {
        self.rooted()?;
        self.view.statfs()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsString;

    fn open_file(size: u64) -> OpenFile<()> {
        OpenFile {
            node: 5,
            size,
            transport: (),
        }
    }

    #[test]
    fn reads_are_short_only_at_the_size_at_open() {
        let f = open_file(10_000);
        assert_eq!(f.span(0, 4096), 4096);
        assert_eq!(f.span(8192, 4096), 10_000 - 8192);
        assert_eq!(f.span(10_000, 4096), 0);
        assert_eq!(f.span(u64::MAX, u32::MAX), 0);
        assert_eq!(open_file(u64::MAX).span(0, u32::MAX), u32::MAX as usize);
    }

    #[test]
    fn a_file_that_ends_early_fails_the_read() {
        let host = tempfile::tempfile().unwrap();
        let f = open_file(100);
        let limiter = Limiter::default();
        // Moves at most 10 bytes a call: retried until done.
        let mut calls = 0;
        let done = f.read_exact(&host, 0, 100, &limiter, |_, _, len| {
            calls += 1;
            Ok(len.min(10))
        });
        assert_eq!((done, calls), (Ok(100), 10));
        // Ends at 50 bytes: never a short success, which the client would pad with zeros.
        let mut moved = 0;
        let short = f.read_exact(&host, 0, 100, &limiter, |_, _, len| {
            let n = len.min(50usize.saturating_sub(moved));
            moved += n;
            Ok(n)
        });
        assert_eq!(short, Err(Errno::IO));
        // Interrupted calls are retried; other errors are the read's.
        let mut first = true;
        let interrupted = f.read_exact(&host, 0, 10, &limiter, |_, _, len| {
            if std::mem::take(&mut first) {
                Err(std::io::Error::from(std::io::ErrorKind::Interrupted))
            } else {
                Ok(len)
            }
        });
        assert_eq!(interrupted, Ok(10));
        let failed = f.read_exact(&host, 0, 10, &limiter, |_, _, _| {
            Err(std::io::Error::from_raw_os_error(libc::ESTALE))
        });
        assert_eq!(failed, Err(Errno::STALE));
    }

    fn stream(names: &[&str]) -> DirStream {
        DirStream {
            node: 7,
            parent: 3,
            listing: names
                .iter()
                .map(|n| DirEntry {
                    name: OsString::from(n),
                    ino: 0,
                    kind: Kind::RegularFile,
                })
                .collect(),
        }
    }

    #[test]
    fn directory_offsets_are_stable_with_dots_first() {
        let s = stream(&["a", "b", "c"]);
        let all: Vec<_> = s
            .from_offset(0)
            .map(|e| (e.name.to_owned(), e.next_offset, e.dot))
            .collect();
        assert_eq!(
            all,
            [
                (".".into(), 1, Some(7)),
                ("..".into(), 2, Some(3)),
                ("a".into(), 3, None),
                ("b".into(), 4, None),
                ("c".into(), 5, None),
            ]
        );
        // Resuming after any entry gives the rest; past the end, nothing.
        let rest: Vec<_> = s.from_offset(3).map(|e| e.name.to_owned()).collect();
        assert_eq!(rest, ["b", "c"]);
        assert_eq!(s.from_offset(5).count(), 0);
        assert_eq!(s.from_offset(u64::MAX).count(), 0);
    }

    #[test]
    fn extended_attribute_sizes_follow_the_protocol() {
        assert_eq!(Xattr::fit(b"abc".to_vec(), 0), Ok(Xattr::Size(3)));
        assert_eq!(
            Xattr::fit(b"abc".to_vec(), 3),
            Ok(Xattr::Data(b"abc".to_vec()))
        );
        assert_eq!(Xattr::fit(b"abc".to_vec(), 2), Err(Errno::RANGE));
        assert_eq!(Xattr::fit(Vec::new(), 0), Ok(Xattr::Size(0)));
    }

    #[test]
    fn listing_bytes_count_names_and_entries() {
        let s = stream(&["a", "bbbb"]);
        let bytes = listing_bytes(&s.listing);
        assert_eq!(bytes, 2 * std::mem::size_of::<DirEntry>() + 5);
    }
}
