//! Serving a [`View`] over FUSE.
//!
//! The callbacks are thin: they translate between fuser's types and the view's, keep the
//! table of open file and directory handles, and choose the kernel caching behaviour. All
//! decisions about what is visible live in the view.

use std::ffi::OsStr;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dashmap::DashMap;
use fuser::{
    BackingId, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    InitFlags, KernelConfig, LockOwner, OpenAccMode, OpenFlags, RenameFlags, ReplyAttr,
    ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen,
    ReplyStatfs, ReplyWrite, Request, TimeOrNow, WriteFlags,
};

use crate::mapping::FileMapping;
use crate::ratelimit::Limiter;
use crate::view::{self, Attr, DirEntry, HostFile, Kind, NodeId, View, ROOT_ID};
use crate::warn_limited;

/// How long the kernel may trust entries and attributes: the store is immutable, so as
/// long as it likes. (The kernel clamps what it cannot represent.)
const TTL: Duration = Duration::from_secs(365 * 24 * 3600);

/// Options for serving a view.
#[derive(Clone, Debug)]
pub struct FuseOptions {
    /// Hand regular files to the kernel (FUSE passthrough) so reads bypass the daemon.
    pub passthrough: bool,
    /// Let the kernel answer POSIX ACL queries itself, from what it cached (FUSE_POSIX_ACL).
    /// The kernel then checks permissions itself too, so this goes with
    /// `default_permissions`. Without it every `ls -l` asks the daemon twice per entry.
    pub posix_acl: bool,
}

impl Default for FuseOptions {
    fn default() -> Self {
        FuseOptions {
            passthrough: true,
            posix_acl: true,
        }
    }
}

/// An open regular file.
enum OpenFile {
    /// Reads go to the kernel's backing file; the id keeps it registered until release.
    Passthrough(#[allow(dead_code)] Arc<BackingId>),
    /// Reads come to the daemon.
    Daemon(DaemonFile),
}

/// A file whose reads the daemon serves: small reads with `pread`, large ones from a
/// mapping made at the first of them (see [`FileMapping`]).
struct DaemonFile {
    fd: OwnedFd,
    /// The size at open, which is what the kernel believes. A read that finds less was
    /// shrunk on the host: it fails rather than come back short, because the kernel fills
    /// a short read up to the size it believes with zeros, bytes the file never had.
    size: u64,
    mapping: OnceLock<Option<FileMapping>>,
}

/// Reads at least this large are served from a mapping of the file. Below it, the copy
/// `pread` makes costs less than setting up and tearing down a mapping.
const MAPPED_READ_MIN: u32 = 128 * 1024;

impl DaemonFile {
    /// The mapping of the whole file, made on first use; `None` when the file cannot be
    /// mapped (then reads fall back to `pread`).
    fn mapping(&self) -> Option<&FileMapping> {
        self.mapping
            .get_or_init(|| {
                FileMapping::new(self.fd.as_fd(), self.size)
                    .inspect_err(|e| tracing::debug!("cannot map a file, using pread: {e}"))
                    .ok()
            })
            .as_ref()
    }
}

/// The FUSE filesystem: a view plus its open handles.
pub struct StoreFs {
    view: Arc<View>,
    options: FuseOptions,
    /// Set at INIT: whether the kernel accepted passthrough.
    passthrough: AtomicBool,
    /// Open files by handle; shared so that a read holds no map lock while it replies.
    files: DashMap<u64, Arc<OpenFile>>,
    /// The backing file registered for each node open in passthrough mode. The kernel
    /// refuses a second, different backing file for an inode that is open (EIO), so
    /// concurrent opens of one node share one.
    backings: DashMap<NodeId, Weak<BackingId>>,
    /// Directory listings as they were at opendir, so offsets stay valid for the handle's
    /// whole life whatever other readers do. Unused when the kernel opens directories
    /// without asking (see `no_opendir`).
    dirs: DashMap<u64, Arc<[DirEntry]>>,
    /// Set at INIT: the kernel can open directories without a round trip to the daemon
    /// (FUSE_NO_OPENDIR_SUPPORT), keeping their contents cached. Listings then come from
    /// the view's per-node cache, which never changes while the node is held, so offsets
    /// stay valid all the same.
    no_opendir: AtomicBool,
    next_handle: AtomicU64,
    warnings: Limiter,
}

impl StoreFs {
    /// Serves `view` with `options`.
    pub fn new(view: Arc<View>, options: FuseOptions) -> Self {
        StoreFs {
            view,
            options,
            passthrough: AtomicBool::new(false),
            files: DashMap::new(),
            backings: DashMap::new(),
            dirs: DashMap::new(),
            no_opendir: AtomicBool::new(false),
            next_handle: AtomicU64::new(1),
            warnings: Limiter::default(),
        }
    }

    fn handle(&self) -> u64 {
        self.next_handle.fetch_add(1, Ordering::Relaxed)
    }

    /// The backing id for node `id`, shared with its other open handles or registered from
    /// `fd`. A failure that will not go away (no CAP_SYS_ADMIN, a backing filesystem the
    /// kernel refuses) turns passthrough off for good, said once; a passing one (out of
    /// descriptors or memory) only serves this open through the daemon.
    fn backing(&self, reply: &ReplyOpen, id: NodeId, fd: &OwnedFd) -> Option<Arc<BackingId>> {
        if !self.passthrough.load(Ordering::Relaxed) {
            return None;
        }
        // The entry stays locked while registering, so two opens cannot both register.
        let mut slot = self.backings.entry(id).or_default();
        if let Some(backing) = slot.upgrade() {
            return Some(backing);
        }
        match reply.open_backing(fd) {
            Ok(backing) => {
                let backing = Arc::new(backing);
                *slot = Arc::downgrade(&backing);
                Some(backing)
            }
            Err(e) => {
                drop(slot);
                self.backings.remove(&id);
                if is_transient(&e) {
                    warn_limited!(
                        self.warnings,
                        node = id,
                        "cannot register a passthrough file now, reading it through the daemon: {e}"
                    );
                } else if self.passthrough.swap(false, Ordering::Relaxed) {
                    tracing::warn!("FUSE passthrough unavailable, reading through the daemon: {e}");
                }
                None
            }
        }
    }
}

/// Whether a failure to register a backing file may succeed on a later try.
fn is_transient(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOMEM | libc::EAGAIN | libc::EINTR)
    )
}

impl StoreFs {
    /// The listing a readdir reads from: the handle's snapshot, or the node's own when
    /// directories are opened without the daemon (handle 0).
    fn listing(&self, ino: INodeNo, fh: FileHandle) -> Result<Arc<[DirEntry]>, Errno> {
        if fh.0 == 0 {
            return self.view.list(ino.0).map_err(errno);
        }
        self.dirs.get(&fh.0).map(|l| l.clone()).ok_or(Errno::EBADF)
    }
}

/// Read-ahead for the mount, in KiB: four of the largest requests the kernel sends (256
/// pages each), so that several are in flight and the request threads copy in parallel
/// (sequential reads without passthrough: 2.9 GB/s at 1 MiB, 3.2 GB/s at 4 MiB, medians of
/// 9 with scripts/ab-read.sh).
const READ_AHEAD_KIB: u32 = 4096;

/// Raises the mount's read-ahead window from the kernel's default (128 KiB) to
/// [`READ_AHEAD_KIB`], so that reads through the daemon come as large requests, several at
/// a time, instead of many small ones one after the other. Passthrough reads use the host
/// file's own read-ahead and do not need it. Needs root; otherwise the default stays,
/// which is only slower.
///
/// `mountpoint` must be canonical, resolved before mounting: the device number comes
/// from /proc/self/mountinfo, since touching the mount could ask the daemon, which may not
/// be serving yet.
pub fn tune_read_ahead(mountpoint: &Path) {
    let result = (|| -> std::io::Result<()> {
        let target = mountpoint.to_string_lossy();
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
        // Field 5 is the mount point (spaces escaped as \040), field 3 major:minor; the
        // last match is the mount on top.
        let device = mountinfo
            .lines()
            .rev()
            .find_map(|l| {
                let f: Vec<&str> = l.split(' ').collect();
                (f.len() > 4 && f[4].replace("\\040", " ") == *target).then(|| f[2].to_owned())
            })
            .ok_or_else(|| std::io::Error::other("the mount is not in mountinfo"))?;
        std::fs::write(
            format!("/sys/class/bdi/{device}/read_ahead_kb"),
            READ_AHEAD_KIB.to_string(),
        )
    })();
    if let Err(e) = result {
        tracing::debug!("keeping the default read-ahead: {e}");
    }
}

fn errno(e: rustix::io::Errno) -> Errno {
    Errno::from_i32(e.raw_os_error())
}

fn system_time(t: view::Time) -> SystemTime {
    if t.secs >= 0 {
        UNIX_EPOCH + Duration::new(t.secs as u64, t.nsecs)
    } else {
        UNIX_EPOCH - Duration::from_secs(t.secs.unsigned_abs())
            + Duration::from_nanos(t.nsecs.into())
    }
}

fn file_type(kind: Kind) -> FileType {
    match kind {
        Kind::Directory => FileType::Directory,
        Kind::RegularFile => FileType::RegularFile,
        Kind::Symlink => FileType::Symlink,
        Kind::Fifo => FileType::NamedPipe,
        Kind::Socket => FileType::Socket,
        Kind::CharDevice => FileType::CharDevice,
        Kind::BlockDevice => FileType::BlockDevice,
    }
}

fn file_attr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.blocks,
        atime: system_time(a.atime),
        mtime: system_time(a.mtime),
        ctime: system_time(a.ctime),
        crtime: system_time(a.mtime),
        kind: file_type(a.kind),
        perm: a.perm,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev as u32,
        blksize: a.blksize,
        flags: 0,
    }
}

impl Filesystem for StoreFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Each capability is optional: an older kernel just serves without it.
        //
        // READDIRPLUS always, not FUSE_READDIRPLUS_AUTO: the automatic mode lists all but
        // the first chunk of a directory without attributes, and each entry then stat'ed
        // costs a LOOKUP round trip. Attributes here never change, so handing them out with
        // every listing is never wasted for long (a cold `find` of 32k entries: 2,338
        // LOOKUPs fewer and 12% faster).
        for flag in [
            InitFlags::FUSE_EXPORT_SUPPORT,
            InitFlags::FUSE_CACHE_SYMLINKS,
            InitFlags::FUSE_PARALLEL_DIROPS,
            InitFlags::FUSE_DO_READDIRPLUS,
            InitFlags::FUSE_ASYNC_READ,
        ] {
            if config.add_capabilities(flag).is_err() {
                tracing::debug!("kernel lacks {flag:?}");
            }
        }
        if self.options.posix_acl && config.add_capabilities(InitFlags::FUSE_POSIX_ACL).is_err() {
            tracing::debug!("kernel lacks FUSE_POSIX_ACL");
        }
        // A warm walk of a directory tree then costs no request at all: without it, every
        // opendir and releasedir is a round trip even when the contents are cached.
        if config
            .add_capabilities(InitFlags::FUSE_NO_OPENDIR_SUPPORT)
            .is_ok()
        {
            self.no_opendir.store(true, Ordering::Relaxed);
        }
        if self.options.passthrough {
            // Depth 1: the backing files may not be on a stacked filesystem, and the mount
            // can itself still be the lower layer of an overlay.
            if config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
                && config.set_max_stack_depth(1).is_ok()
            {
                self.passthrough.store(true, Ordering::Relaxed);
            } else {
                tracing::info!(
                    "kernel does not offer FUSE passthrough; reading through the daemon"
                );
            }
        }
        let _ = config
            .set_max_readahead(u32::MAX)
            .or_else(|max| config.set_max_readahead(max));
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.view.lookup(parent.0, name) {
            Ok(attr) => reply.entry(&TTL, &file_attr(&attr), Generation(attr.generation)),
            Err(e) => {
                tracing::debug!(parent = parent.0, ?name, "lookup: {e}");
                reply.error(errno(e))
            }
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.view.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.view.getattr(ino.0) {
            Ok(attr) => reply.attr(&TTL, &file_attr(&attr)),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.view.readlink(ino.0) {
            Ok(target) => reply.data(&target),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let write = flags.acc_mode() != OpenAccMode::O_RDONLY || flags.0 & libc::O_TRUNC != 0;
        let HostFile { fd, size } = match self.view.open(ino.0, write) {
            Ok(file) => file,
            Err(e) => return reply.error(errno(e)),
        };
        let fh = self.handle();
        match self.backing(&reply, ino.0, &fd) {
            Some(id) => {
                // Registered before the reply: the RELEASE may come as soon as it is sent.
                // The kernel holds the file through the backing id; our descriptor can go.
                self.files
                    .insert(fh, Arc::new(OpenFile::Passthrough(id.clone())));
                // No FOPEN_KEEP_CACHE here: the page cache is the backing file's own, and
                // the kernel refuses a passthrough open that asks for caching (EIO).
                reply.opened_passthrough(FileHandle(fh), FopenFlags::FOPEN_NOFLUSH, &id);
            }
            None => {
                self.files.insert(
                    fh,
                    Arc::new(OpenFile::Daemon(DaemonFile {
                        fd,
                        size,
                        mapping: OnceLock::new(),
                    })),
                );
                // Keep the page cache across opens: the file cannot change under the view.
                reply.opened(
                    FileHandle(fh),
                    FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_NOFLUSH,
                );
            }
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let Some(file) = self.files.get(&fh.0).map(|f| Arc::clone(&f)) else {
            return reply.error(Errno::EBADF);
        };
        let OpenFile::Daemon(open) = &*file else {
            // The kernel reads passthrough files itself; a read here would be its bug.
            return reply.error(Errno::EIO);
        };
        // Short only at the end of the file, as the kernel expects.
        let want = open.size.saturating_sub(offset).min(u64::from(size)) as usize;
        if want >= MAPPED_READ_MIN as usize {
            if let Some(mapping) = open.mapping() {
                // A file that the host has truncated since fails in the kernel's copy of
                // the reply: the client gets EIO.
                return mapping.reply(offset, want, reply);
            }
        }
        let fd = &open.fd;
        thread_local! {
            static BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        BUF.with_borrow_mut(|buf| {
            buf.resize(want, 0);
            let mut filled = 0;
            // Short reads from the host are retried: the file ends where it ended at open.
            while filled < buf.len() {
                match rustix::io::pread(fd, &mut buf[filled..], offset + filled as u64) {
                    Ok(0) => {
                        warn_limited!(
                            self.warnings,
                            node = ino.0,
                            "a file shrank on the host while open; failing the read"
                        );
                        return reply.error(Errno::EIO);
                    }
                    Ok(n) => filled += n,
                    Err(rustix::io::Errno::INTR) => continue,
                    Err(e) => return reply.error(errno(e)),
                }
            }
            reply.data(buf);
        });
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        if let Some((_, file)) = self.files.remove(&fh.0) {
            drop(file);
            // The last handle of the node closes the backing id (on drop); forget the slot.
            self.backings
                .remove_if(&ino.0, |_, weak| weak.strong_count() == 0);
        }
        reply.ok();
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        if self.no_opendir.load(Ordering::Relaxed) {
            // The kernel takes ENOSYS as "never ask again" and caches directories itself.
            return reply.error(Errno::ENOSYS);
        }
        match self.view.list(ino.0) {
            Ok(listing) => {
                let fh = self.handle();
                self.dirs.insert(fh, listing);
                reply.opened(
                    FileHandle(fh),
                    FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_CACHE_DIR,
                );
            }
            Err(e) => reply.error(errno(e)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let listing = match self.listing(ino, fh) {
            Ok(l) => l,
            Err(e) => return reply.error(e),
        };
        // Offsets: 0 is the start, n means "after the n-th entry" counting `.` and `..`.
        let parent = match self.view.parent_of(ino.0) {
            Ok(p) => p,
            Err(e) => return reply.error(errno(e)),
        };
        let dots = [(ino.0, "."), (parent, "..")];
        let mut index = offset as usize;
        while index < listing.len() + 2 {
            let full = if index < 2 {
                reply.add(
                    INodeNo(dots[index].0),
                    index as u64 + 1,
                    FileType::Directory,
                    dots[index].1,
                )
            } else {
                let e = &listing[index - 2];
                // The number a lookup gives, which the listing alone cannot always tell;
                // an entry that vanished from the host since the listing is left out.
                match self.view.peek(ino.0, &e.name) {
                    Ok(attr) => reply.add(
                        INodeNo(attr.ino),
                        index as u64 + 1,
                        file_type(attr.kind),
                        &e.name,
                    ),
                    Err(_) => false,
                }
            };
            if full {
                break;
            }
            index += 1;
        }
        reply.ok();
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let listing = match self.listing(ino, fh) {
            Ok(l) => l,
            Err(e) => return reply.error(e),
        };
        let mut index = offset as usize;
        while index < listing.len() + 2 {
            if index < 2 {
                // The kernel takes no reference for `.` and `..`: no lookup is counted.
                let id = if index == 0 {
                    Ok(ino.0)
                } else {
                    self.view.parent_of(ino.0)
                };
                let attr = match id.and_then(|id| self.view.getattr(id)) {
                    Ok(a) => a,
                    Err(e) => return reply.error(errno(e)),
                };
                let name = if index == 0 { "." } else { ".." };
                if reply.add(
                    INodeNo(attr.ino),
                    index as u64 + 1,
                    name,
                    &TTL,
                    &file_attr(&attr),
                    Generation(attr.generation),
                ) {
                    break;
                }
            } else {
                let entry = &listing[index - 2];
                // An entry that vanished from the host since the listing is left out.
                if let Ok(attr) = self.view.lookup(ino.0, &entry.name) {
                    if reply.add(
                        INodeNo(attr.ino),
                        index as u64 + 1,
                        &entry.name,
                        &TTL,
                        &file_attr(&attr),
                        Generation(attr.generation),
                    ) {
                        // Not sent: the reference just counted must not be kept.
                        self.view.forget(attr.ino, 1);
                        break;
                    }
                }
            }
            index += 1;
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.dirs.remove(&fh.0);
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match self.view.statfs() {
            Ok(s) => reply.statfs(
                s.f_blocks,
                0,
                0,
                s.f_files,
                0,
                s.f_bsize as u32,
                s.f_namemax as u32,
                s.f_frsize as u32,
            ),
            Err(e) => reply.error(errno(e)),
        }
    }

    // Everything below modifies the store: the view is read-only.

    fn setattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        _size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        reply.error(Errno::EROFS);
    }

    fn mknod(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EROFS);
    }

    fn mkdir(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EROFS);
    }

    fn unlink(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn rmdir(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn symlink(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _link_name: &OsStr,
        _target: &Path,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EROFS);
    }

    fn rename(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _newparent: INodeNo,
        _newname: &OsStr,
        _flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EROFS);
    }

    fn link(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _newparent: INodeNo,
        _newname: &OsStr,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EROFS);
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        reply.error(Errno::EROFS);
    }

    fn create(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        reply.error(Errno::EROFS);
    }

    fn setxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EROFS);
    }

    fn removexattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    // Store files carry no extended attributes (a NAR has none), so the view answers as a
    // filesystem without any: an empty list and ENODATA. ENOTSUP instead would make tools
    // that copy attributes (mkfs.erofs, `cp -a`, `rsync -X`) give up on the whole tree.
    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: fuser::ReplyXattr,
    ) {
        reply.error(Errno::ENODATA);
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, size: u32, reply: fuser::ReplyXattr) {
        // A size of 0 asks how large a buffer the list needs; otherwise the list itself.
        if size == 0 {
            reply.size(0);
        } else {
            reply.data(&[]);
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _length: u64,
        _mode: i32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EROFS);
    }
}

/// Whether `ROOT_ID` matches fuser's idea of the root node (checked at compile time).
const _: () = assert!(ROOT_ID == 1);
