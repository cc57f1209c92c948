//! Serving a [`View`] over `/dev/fuse`, to the host's own kernel.
//!
//! The callbacks only translate between fuser's types and the session's: handles, listings
//! and cache policy are the [`Session`]'s, and what is visible is the view's. What is this
//! transport's alone is what only the host kernel offers: passthrough (the kernel reads a
//! registered host file itself) and replies straight from a mapping of the host file.

use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::SystemTime;

use dashmap::DashMap;
use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite,
    Request, SessionACL, TimeOrNow, WriteFlags,
};

use super::fuse_uring::{self, FuseTransport, Rings, UringSlot};
use super::mapping::FileMapping;
use crate::gc_roots::RootsGate;
use crate::protocol::{system_time, Capability, CAPABILITIES};
use crate::session::{CachePolicy, OpenFile, Session, Xattr, DIR_CACHE, FILE_CACHE, TTL};
use crate::view::{self, Attr, Kind, NodeId, View, ROOT_ID};
use crate::warn_limited;

/// Options for serving a view.
#[derive(Clone, Debug)]
pub struct FuseOptions {
    /// Hand regular files to the kernel (FUSE passthrough) so reads bypass the daemon.
    pub passthrough: bool,
    /// Let the kernel answer POSIX ACL queries itself, from what it cached (FUSE_POSIX_ACL).
    /// The kernel then checks permissions itself too, so this goes with
    /// `default_permissions`. Without it every `ls -l` asks the daemon twice per entry.
    pub posix_acl: bool,
    /// Which users' requests are served (the mount's `allow_other`/`allow_root`), as
    /// given to fuser, which applies it to what comes over `/dev/fuse`; the ring applies
    /// the same rule.
    pub acl: SessionACL,
    /// Whether requests come over io_uring or `/dev/fuse` reads.
    pub transport: FuseTransport,
    /// Makes this ring queue refuse to register, as if it could not be set up: for tests
    /// of the fallback to `/dev/fuse`.
    pub refuse_uring_queue: Option<u16>,
}

impl Default for FuseOptions {
    fn default() -> Self {
        FuseOptions {
            passthrough: true,
            posix_acl: true,
            acl: SessionACL::default(),
            transport: FuseTransport::default(),
            refuse_uring_queue: None,
        }
    }
}

/// `FUSE_DEV_IOC_BACKING_OPEN` and `FUSE_DEV_IOC_BACKING_CLOSE` (linux/fuse.h).
const FUSE_DEV_IOC_BACKING_OPEN: libc::c_ulong = 0x4010_e501;
const FUSE_DEV_IOC_BACKING_CLOSE: libc::c_ulong = 0x4004_e502;

/// A host file registered with the kernel for passthrough, closed (unregistered) on drop.
///
/// The daemon's own type rather than fuser's `BackingId`, which can only be made from a
/// fuser reply: the ring transport registers files too, and both transports must share
/// one registration per node (the kernel refuses a second backing file for an inode that
/// is open).
#[derive(Debug)]
pub struct Backing {
    id: u32,
    dev: Arc<OwnedFd>,
}

impl Backing {
    /// Registers `file` through `dev`, a `/dev/fuse` descriptor of the connection.
    fn open(dev: &Arc<OwnedFd>, file: &File) -> std::io::Result<Backing> {
        #[repr(C)]
        struct BackingMap {
            fd: i32,
            flags: u32,
            padding: u64,
        }
        let map = BackingMap {
            fd: file.as_raw_fd(),
            flags: 0,
            padding: 0,
        };
        // SAFETY: the ioctl reads a `struct fuse_backing_map` (16 bytes, laid out as
        // above) from a pointer valid for the call.
        let id = unsafe { libc::ioctl(dev.as_raw_fd(), FUSE_DEV_IOC_BACKING_OPEN, &map) };
        if id < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Backing {
            id: id as u32,
            dev: dev.clone(),
        })
    }

    /// The id the kernel gave it.
    pub fn id(&self) -> u32 {
        self.id
    }
}

impl Drop for Backing {
    fn drop(&mut self) {
        // SAFETY: the ioctl reads a u32 from a pointer valid for the call. Fails
        // harmlessly once the connection is gone (the kernel closed everything then).
        let _ = unsafe { libc::ioctl(self.dev.as_raw_fd(), FUSE_DEV_IOC_BACKING_CLOSE, &self.id) };
    }
}

/// What this transport keeps beside an open regular file.
pub enum FuseFile {
    /// Reads go to the kernel's backing file; the id keeps it registered until release.
    Passthrough(#[allow(dead_code)] Arc<Backing>),
    /// Reads come to the daemon: small ones with `pread`, large ones from a mapping of the
    /// file made at the first of them (see [`FileMapping`]).
    Daemon(OnceLock<Option<FileMapping>>),
}

/// Reads at least this large are served from a mapping of the file. Below it, the copy
/// `pread` makes costs less than setting up and tearing down a mapping.
const MAPPED_READ_MIN: u32 = 128 * 1024;

/// The mapping of the whole of `open`, made on first use; `None` when the file cannot be
/// mapped (then reads fall back to `pread`).
fn mapping<'a>(
    open: &'a OpenFile<FuseFile>,
    file: &File,
    slot: &'a OnceLock<Option<FileMapping>>,
) -> Option<&'a FileMapping> {
    slot.get_or_init(|| {
        FileMapping::new(file.as_fd(), open.size)
            .inspect_err(|e| tracing::debug!("cannot map a file, using pread: {e}"))
            .ok()
    })
    .as_ref()
}

/// The FUSE filesystem: a session on a view, plus what passthrough needs.
pub struct StoreFs {
    shared: Arc<Shared>,
}

/// What both host transports (`/dev/fuse` and the rings) serve from: the session and
/// what the kernel agreed to at INIT.
pub struct Shared {
    pub(crate) session: Session<FuseFile>,
    pub(crate) options: FuseOptions,
    /// The daemon's user, whose requests the access rule always lets through.
    pub(crate) owner: u32,
    /// Set at INIT: whether the kernel accepted passthrough.
    passthrough: AtomicBool,
    /// The backing file registered for each node open in passthrough mode. The kernel
    /// refuses a second, different backing file for an inode that is open (EIO), so
    /// concurrent opens of one node share one.
    backings: DashMap<NodeId, Weak<Backing>>,
    /// Set at INIT: the kernel can open directories without a round trip to the daemon
    /// (FUSE_NO_OPENDIR_SUPPORT), keeping their contents cached; it then reads them with
    /// handle 0 (see [`Session::dir_stream`]).
    no_opendir: AtomicBool,
    /// A `/dev/fuse` descriptor of the connection, once mounted: for passthrough
    /// registrations and the ring commands.
    dev: OnceLock<Arc<OwnedFd>>,
    /// What INIT decided about the rings.
    uring: UringSlot,
}

impl StoreFs {
    /// READDIRPLUS, within one request span of the view.
    fn readdirplus_in_request(
        &self,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let stream = match self.shared.session.dir_stream(ino.0, fh.0) {
            Ok(s) => s,
            Err(e) => return reply.error(errno(e)),
        };
        for slot in stream.from_offset(offset) {
            let attr = match self.shared.session.lookup_slot(&stream, &slot) {
                Some(Ok(attr)) => attr,
                Some(Err(e)) => return reply.error(errno(e)),
                None => continue,
            };
            if reply.add(
                INodeNo(attr.ino),
                slot.next_offset,
                slot.name,
                &TTL,
                &file_attr(&attr),
                Generation(attr.generation),
            ) {
                // Not sent: the reference just counted must not be kept.
                if slot.dot.is_none() {
                    self.shared.session.forget(attr.ino, 1);
                }
                break;
            }
        }
        reply.ok();
    }

    /// Serves `view` with `options`, while `gate` says its paths are rooted.
    pub fn new(view: Arc<View>, options: FuseOptions, gate: RootsGate) -> Self {
        StoreFs {
            shared: Arc::new(Shared {
                session: Session::new(view).gated(gate),
                options,
                owner: rustix::process::geteuid().as_raw(),
                passthrough: AtomicBool::new(false),
                backings: DashMap::new(),
                no_opendir: AtomicBool::new(false),
                dev: OnceLock::new(),
                uring: UringSlot::default(),
            }),
        }
    }

    /// A handle on what this filesystem serves from, to start the rings with once fuser
    /// has mounted it (fuser owns the filesystem from then on).
    pub fn handle(&self) -> FuseHandle {
        FuseHandle {
            shared: self.shared.clone(),
        }
    }
}

/// Kept by the daemon beside fuser's session: see [`StoreFs::handle`].
pub struct FuseHandle {
    shared: Arc<Shared>,
}

impl FuseHandle {
    /// Takes a descriptor of the mounted connection (fuser's, duplicated): passthrough
    /// registrations and ring commands go through it. Before the sandbox, and before any
    /// request is served.
    pub fn attach(&self, dev: BorrowedFd<'_>) -> std::io::Result<()> {
        let dev = dev.try_clone_to_owned()?;
        let _ = self.shared.dev.set(Arc::new(dev));
        Ok(())
    }

    /// Fails if io_uring is required (`--fuse-transport io-uring`) and INIT did not
    /// accept it: checked before the sandbox, while the mount can still be undone.
    pub fn check_required(&self) -> Result<(), String> {
        if self.shared.options.transport != FuseTransport::IoUring {
            return Ok(());
        }
        self.shared
            .uring
            .accepted()
            .map_err(|reason| format!("--fuse-transport io-uring: {reason}"))
    }

    /// Starts the rings if INIT accepted them (after the sandbox: their threads must be
    /// confined too), and logs which transport serves. An error only when io_uring was
    /// required and does not serve.
    pub fn start(&self) -> Result<Rings, String> {
        let dev = self
            .shared
            .dev
            .get()
            .ok_or("the /dev/fuse descriptor was not attached")?;
        let options = &self.shared.options;
        self.shared.uring.start(
            &self.shared,
            dev,
            options.transport == FuseTransport::IoUring,
            options.refuse_uring_queue,
        )
    }
}

impl Shared {
    /// The backing id for node `id`, shared with its other open handles or registered from
    /// `file`. A failure that will not go away (no CAP_SYS_ADMIN, a backing filesystem the
    /// kernel refuses) turns passthrough off for good, said once; a passing one (out of
    /// descriptors or memory) only serves this open through the daemon.
    fn backing(&self, id: NodeId, file: &File) -> Option<Arc<Backing>> {
        if !self.passthrough.load(Ordering::Relaxed) {
            return None;
        }
        let dev = self.dev.get()?;
        // The entry stays locked while registering, so two opens cannot both register.
        let mut slot = self.backings.entry(id).or_default();
        if let Some(backing) = slot.upgrade() {
            return Some(backing);
        }
        match Backing::open(dev, file) {
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
                        self.session.warnings,
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

    /// Opens regular file `id` with open(2) `flags`: its handle, the FOPEN flags of the
    /// reply, and the backing id (0 when read through the daemon). The handle is
    /// registered before the reply: the RELEASE may come as soon as it is sent.
    pub(crate) fn open(&self, id: NodeId, flags: i32) -> view::Result<(u64, u32, i32)> {
        let (fh, open) = self
            .session
            .open(id, flags, |file| match self.backing(id, file) {
                Some(backing) => FuseFile::Passthrough(backing),
                None => FuseFile::Daemon(OnceLock::new()),
            })?;
        Ok(match &open.transport {
            // No FOPEN_KEEP_CACHE here: the page cache is the backing file's own, and
            // the kernel refuses a passthrough open that asks for caching (EIO).
            FuseFile::Passthrough(backing) => (
                fh,
                (FopenFlags::FOPEN_NOFLUSH | FopenFlags::FOPEN_PASSTHROUGH).bits(),
                backing.id() as i32,
            ),
            FuseFile::Daemon(_) => (fh, fopen_flags(FILE_CACHE).bits(), 0),
        })
    }

    /// Closes handle `fh` of node `ino`; the node's last handle closes its backing id.
    pub(crate) fn release(&self, ino: NodeId, fh: u64) {
        if let Some(file) = self.session.release(fh) {
            drop(file);
            // The last handle of the node closed the backing id (on drop); forget the slot.
            self.backings
                .remove_if(&ino, |_, weak| weak.strong_count() == 0);
        }
    }

    /// Whether the kernel opens directories without asking.
    pub(crate) fn no_opendir(&self) -> bool {
        self.no_opendir.load(Ordering::Relaxed)
    }
}

/// Whether a failure to register a backing file may succeed on a later try.
fn is_transient(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOMEM | libc::EAGAIN | libc::EINTR)
    )
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
        let mounts = mountinfo::read()?;
        // The mount on top at the mount point is ours.
        let mount = mountinfo::top_at(&mounts, mountpoint)
            .ok_or_else(|| std::io::Error::other("the mount is not in mountinfo"))?;
        std::fs::write(
            format!("/sys/class/bdi/{}/read_ahead_kb", mount.device()),
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

fn xattr_reply(answer: view::Result<Xattr>, reply: fuser::ReplyXattr) {
    match answer {
        Ok(Xattr::Size(n)) => reply.size(n),
        Ok(Xattr::Data(value)) => reply.data(&value),
        Err(e) => reply.error(errno(e)),
    }
}

/// The FOPEN flags telling the kernel to cache as `policy` says.
pub(crate) fn fopen_flags(policy: CachePolicy) -> FopenFlags {
    let mut flags = FopenFlags::FOPEN_NOFLUSH;
    if policy.keep_cache {
        flags |= FopenFlags::FOPEN_KEEP_CACHE;
    }
    if policy.cache_dir {
        flags |= FopenFlags::FOPEN_CACHE_DIR;
    }
    flags
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
        let shared = &*self.shared;
        // Each capability is optional: an older kernel just serves without it.
        for capability in CAPABILITIES {
            let flag = match capability {
                Capability::AsyncRead => InitFlags::FUSE_ASYNC_READ,
                Capability::ParallelDirops => InitFlags::FUSE_PARALLEL_DIROPS,
                Capability::ReaddirplusAlways => InitFlags::FUSE_DO_READDIRPLUS,
                Capability::CacheSymlinks => InitFlags::FUSE_CACHE_SYMLINKS,
                Capability::ExportSupport => InitFlags::FUSE_EXPORT_SUPPORT,
                // Only with default_permissions: otherwise nobody would check the modes.
                Capability::PosixAcl if !shared.options.posix_acl => continue,
                Capability::PosixAcl => InitFlags::FUSE_POSIX_ACL,
                Capability::NoOpendir => InitFlags::FUSE_NO_OPENDIR_SUPPORT,
                Capability::AutoInvalData => InitFlags::FUSE_AUTO_INVAL_DATA,
            };
            if config.add_capabilities(flag).is_err() {
                tracing::debug!("kernel lacks {flag:?}");
            } else if capability == Capability::NoOpendir {
                shared.no_opendir.store(true, Ordering::Relaxed);
            }
        }
        if shared.options.passthrough {
            // Depth 1: the backing files may not be on a stacked filesystem, and the mount
            // can itself still be the lower layer of an overlay.
            if config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
                && config.set_max_stack_depth(1).is_ok()
            {
                shared.passthrough.store(true, Ordering::Relaxed);
            } else {
                tracing::info!(
                    "kernel does not offer FUSE passthrough; reading through the daemon"
                );
            }
        }
        let readahead = match config.set_max_readahead(u32::MAX) {
            Ok(_) => u32::MAX,
            Err(max) => {
                let _ = config.set_max_readahead(max);
                max
            }
        };
        // Last: the rings' buffers are sized from what was agreed above.
        shared.uring.set(fuse_uring::negotiate(
            config,
            shared.options.transport,
            readahead,
        ));
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.shared.session.lookup(parent.0, name) {
            Ok(attr) => reply.entry(&TTL, &file_attr(&attr), Generation(attr.generation)),
            Err(e) => {
                tracing::debug!(parent = parent.0, ?name, "lookup: {e}");
                reply.error(errno(e))
            }
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.shared.session.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.shared.session.getattr(ino.0) {
            Ok(attr) => reply.attr(&TTL, &file_attr(&attr)),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.shared.session.readlink(ino.0) {
            Ok(target) => reply.data(&target),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        match self.shared.open(ino.0, flags.0) {
            Ok((fh, open_flags, backing_id)) if backing_id != 0 => {
                // fuser only sends a backing id it wraps itself; the registration stays
                // the shared `Backing`'s (taken back with `into_raw`, never closed here).
                // SAFETY: the id is open, belongs to this connection, and stays open
                // while the handle is (its `Backing` lives in the handle's record).
                let wrapped = unsafe { reply.wrap_backing(backing_id as u32) };
                let flags = FopenFlags::from_bits_retain(open_flags);
                reply.opened_passthrough(FileHandle(fh), flags, &wrapped);
                let _ = wrapped.into_raw();
            }
            Ok((fh, open_flags, _)) => {
                reply.opened(FileHandle(fh), FopenFlags::from_bits_retain(open_flags))
            }
            Err(e) => reply.error(errno(e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let open = match self.shared.session.file(fh.0) {
            Ok(f) => f,
            Err(e) => return reply.error(errno(e)),
        };
        let FuseFile::Daemon(slot) = &open.transport else {
            // The kernel reads passthrough files itself; a read here would be its bug.
            return reply.error(Errno::EIO);
        };
        let want = open.span(offset, size);
        let file = match self.shared.session.host_file(&open) {
            Ok(f) => f,
            Err(e) => return reply.error(errno(e)),
        };
        if want >= MAPPED_READ_MIN as usize {
            if let Some(mapping) = mapping(&open, &file, slot) {
                // A file that the host has truncated since fails in the kernel's copy of
                // the reply: the client gets EIO.
                return mapping.reply(offset, want, reply);
            }
        }
        thread_local! {
            static BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        BUF.with_borrow_mut(|buf| {
            buf.resize(want, 0);
            let read = open.read_exact(
                &file,
                offset,
                want,
                &self.shared.session.warnings,
                |file, at, len| {
                    let start = (at - offset) as usize;
                    rustix::io::pread(file, &mut buf[start..start + len], at).map_err(Into::into)
                },
            );
            match read {
                Ok(_) => reply.data(buf),
                Err(e) => reply.error(errno(e)),
            }
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
        self.shared.release(ino.0, fh.0);
        reply.ok();
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        if self.shared.no_opendir() {
            // The kernel takes ENOSYS as "never ask again" and caches directories itself.
            return reply.error(Errno::ENOSYS);
        }
        match self.shared.session.opendir(ino.0) {
            Ok(fh) => reply.opened(FileHandle(fh), fopen_flags(DIR_CACHE)),
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
        let stream = match self.shared.session.dir_stream(ino.0, fh.0) {
            Ok(s) => s,
            Err(e) => return reply.error(errno(e)),
        };
        for slot in stream.from_offset(offset) {
            // The number a lookup gives, which the listing alone cannot always tell.
            let Some(attr) = self.shared.session.peek(&stream, &slot) else {
                continue;
            };
            if reply.add(
                INodeNo(attr.ino),
                slot.next_offset,
                file_type(attr.kind),
                slot.name,
            ) {
                break;
            }
        }
        reply.ok();
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        reply: ReplyDirectoryPlus,
    ) {
        // One request: the directory proved where it belongs once, not for every entry.
        self.shared
            .session
            .request(|| self.readdirplus_in_request(ino, fh, offset, reply))
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.shared.session.releasedir(fh.0);
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match self.shared.session.statfs() {
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

    fn getxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        size: u32,
        reply: fuser::ReplyXattr,
    ) {
        xattr_reply(self.shared.session.getxattr(ino.0, name, size), reply);
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: fuser::ReplyXattr) {
        xattr_reply(self.shared.session.listxattr(ino.0, size), reply);
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
        reply.error(errno(self.shared.session.read_only()));
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
        reply.error(errno(self.shared.session.read_only()));
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
        reply.error(errno(self.shared.session.read_only()));
    }

    fn unlink(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(errno(self.shared.session.read_only()));
    }

    fn rmdir(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(errno(self.shared.session.read_only()));
    }

    fn symlink(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _link_name: &OsStr,
        _target: &Path,
        reply: ReplyEntry,
    ) {
        reply.error(errno(self.shared.session.read_only()));
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
        reply.error(errno(self.shared.session.read_only()));
    }

    fn link(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _newparent: INodeNo,
        _newname: &OsStr,
        reply: ReplyEntry,
    ) {
        reply.error(errno(self.shared.session.read_only()));
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
        reply.error(errno(self.shared.session.read_only()));
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
        reply.error(errno(self.shared.session.read_only()));
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
        reply.error(errno(self.shared.session.read_only()));
    }

    fn removexattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(errno(self.shared.session.read_only()));
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
        reply.error(errno(self.shared.session.read_only()));
    }
}

/// Whether `ROOT_ID` matches fuser's idea of the root node (checked at compile time).
const _: () = assert!(ROOT_ID == 1);

/// The kernel of the mount, told of live updates through FUSE notifications.
pub struct KernelNotifier(pub fuser::Notifier);

impl KernelNotifier {
    /// Tells the kernel that an update changed the served set: the root's cached
    /// attributes and listing go, and so do the entries of the paths that left it
    /// (removed or retiring), so that their next lookup fails; an entry still in use
    /// stays usable by what holds it. Added paths need nothing: a failed lookup was never
    /// cached.
    pub fn announce(&self, updated: &crate::view::Updated) {
        let root = crate::view::ROOT_ID;
        for name in updated.removed.iter().chain(&updated.retiring) {
            self.drop_entry(root, name);
        }
        if let Err(e) = self.0.inval_inode(INodeNo(root), 0, 0) {
            if e.raw_os_error() != Some(libc::ENOENT) {
                tracing::warn!("cannot invalidate the root's cached listing: {e}");
            }
        }
    }

    /// Asks the kernel to drop the entries `held` (directory, name), deepest first: those
    /// nothing uses go, and with them the kernel's references, so that a retiring path
    /// is released once its last user is done. The kernel otherwise keeps unused entries
    /// until it is short of memory.
    pub fn let_go(&self, held: &[(crate::view::NodeId, std::ffi::OsString)]) {
        for (parent, name) in held {
            self.drop_entry(*parent, name);
        }
    }

    fn drop_entry(&self, parent: crate::view::NodeId, name: &OsStr) {
        match self.0.inval_entry(INodeNo(parent), name) {
            Ok(()) => {}
            // Never looked up, or already gone from the kernel's cache.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => tracing::debug!(parent, ?name, "cannot invalidate an entry: {e}"),
        }
    }
}
