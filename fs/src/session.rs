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
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use rustix::io::Errno;

use crate::ratelimit::Limiter;
use crate::view::{Attr, DirEntry, Kind, NodeId, Result, View};
use crate::warn_limited;

/// How long a client may trust entries and attributes: the store is immutable, so as long
/// as it likes. (Kernels clamp what they cannot represent.)
pub const TTL: Duration = Duration::from_secs(365 * 24 * 3600);

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
#[derive(Debug)]
pub struct OpenFile<X> {
    /// The node it was opened as.
    pub node: NodeId,
    /// The host file, read-only, checked to be the node's object.
    pub file: File,
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

    /// Reads exactly `want` bytes at `offset` through `read_at(file, offset, len)`, which
    /// moves up to `len` bytes to the client and says how many it moved. Short host reads
    /// are retried; a host file that ends early fails the read with `EIO`. Returns `want`.
    pub fn read_exact(
        &self,
        offset: u64,
        want: usize,
        warnings: &Limiter,
        mut read_at: impl FnMut(&File, u64, usize) -> std::io::Result<usize>,
    ) -> Result<usize> {
        let mut done = 0;
        while done < want {
            match read_at(&self.file, offset + done as u64, want - done) {
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

/// One client's session on a view: handles, directory streams and policy, shared by every
/// transport; `X` is what the transport keeps per open file.
pub struct Session<X> {
    view: Arc<View>,
    files: DashMap<u64, Arc<OpenFile<X>>>,
    dirs: DashMap<u64, DirStream>,
    next_handle: AtomicU64,
    /// Rate limits per-request warnings of the transports and the session.
    pub warnings: Limiter,
}

impl<X> Session<X> {
    /// A session on `view` with no handles open.
    pub fn new(view: Arc<View>) -> Self {
        Session {
            view,
            files: DashMap::new(),
            dirs: DashMap::new(),
            next_handle: AtomicU64::new(1),
            warnings: Limiter::default(),
        }
    }

    /// The view served.
    pub fn view(&self) -> &Arc<View> {
        &self.view
    }

    fn handle(&self) -> u64 {
        self.next_handle.fetch_add(1, Ordering::Relaxed)
    }

    /// Looks `name` up in `parent`, counting one reference the client must FORGET.
    pub fn lookup(&self, parent: NodeId, name: &OsStr) -> Result<Attr> {
        self.view.lookup(parent, name)
    }

    /// Releases `count` references to `id`.
    pub fn forget(&self, id: NodeId, count: u64) {
        self.view.forget(id, count)
    }

    /// The attributes of `id`.
    pub fn getattr(&self, id: NodeId) -> Result<Attr> {
        self.view.getattr(id)
    }

    /// The target of symlink `id`.
    pub fn readlink(&self, id: NodeId) -> Result<Vec<u8>> {
        self.view.readlink(id)
    }

    /// Opens regular file `id` with open(2) `flags`: anything that could modify it is
    /// refused with `EROFS`. `attach` makes the transport's state for the handle from the
    /// host file; the file is registered before the handle is returned, so that a release
    /// sent as soon as the client has the reply finds it.
    pub fn open(
        &self,
        id: NodeId,
        flags: i32,
        attach: impl FnOnce(&File) -> X,
    ) -> Result<(u64, Arc<OpenFile<X>>)> {
        let write = flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0;
        let host = self.view.open(id, write)?;
        let file = File::from(host.fd);
        let transport = attach(&file);
        let open = Arc::new(OpenFile {
            node: id,
            file,
            size: host.size,
            transport,
        });
        let fh = self.handle();
        self.files.insert(fh, open.clone());
        Ok((fh, open))
    }

    /// The open file of handle `fh`, shared so that no table lock is held while replying.
    pub fn file(&self, fh: u64) -> Result<Arc<OpenFile<X>>> {
        self.files
            .get(&fh)
            .map(|f| Arc::clone(&f))
            .ok_or(Errno::BADF)
    }

    /// Closes handle `fh`, giving back its file (the descriptor closes when the last
    /// reader lets go of it).
    pub fn release(&self, fh: u64) -> Option<Arc<OpenFile<X>>> {
        self.files.remove(&fh).map(|(_, f)| f)
    }

    /// Opens directory `id` as a stream with stable offsets.
    pub fn opendir(&self, id: NodeId) -> Result<u64> {
        let stream = self.stream(id)?;
        let fh = self.handle();
        self.dirs.insert(fh, stream);
        Ok(fh)
    }

    /// The stream of handle `fh` on `id`; handle 0 is the node's own listing, for clients
    /// that read directories without opening them (it never changes while the node is
    /// held, so offsets stay valid all the same).
    pub fn dir_stream(&self, id: NodeId, fh: u64) -> Result<DirStream> {
        if fh == 0 {
            return self.stream(id);
        }
        match self.dirs.get(&fh) {
            Some(s) if s.node == id => Ok(s.clone()),
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
        self.dirs.remove(&fh);
    }

    /// The attributes of a slot without counting a reference: what a plain readdir
    /// reports. `None` for an entry that vanished from the host since the listing (it is
    /// left out).
    pub fn peek(&self, stream: &DirStream, slot: &DirSlot<'_>) -> Option<Attr> {
        match slot.dot {
            Some(id) => self.view.getattr(id).ok(),
            None => self.view.peek(stream.node, slot.name).ok(),
        }
    }

    /// The attributes of a slot for readdirplus: entries count a reference (hand it back
    /// with [`Session::forget`] if the entry is not sent), `.` and `..` do not. `None` for
    /// an entry that vanished since the listing; an error only for `.` and `..`.
    pub fn lookup_slot(&self, stream: &DirStream, slot: &DirSlot<'_>) -> Option<Result<Attr>> {
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
        self.view.getattr(id)?;
        Err(Errno::NODATA)
    }

    /// The list of a store object's extended attribute names (empty), for a buffer of
    /// `size` bytes.
    pub fn listxattr(&self, id: NodeId, size: u32) -> Result<Xattr> {
        self.view.getattr(id)?;
        Xattr::fit(Vec::new(), size)
    }

    /// Whether a client with `uid` and `gid` may access `id` with `mask` (access(2)'s
    /// R_OK, W_OK, X_OK): never for writing; otherwise by the mode bits, as the kernel
    /// would check them.
    pub fn access(&self, id: NodeId, uid: u32, gid: u32, mask: u32) -> Result<()> {
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
        self.view.statfs()
    }
}
