//! Serving a [`View`] to a guest as a vhost-user virtio-fs device: no host mount, no
//! `/dev/fuse`, no privileges.
//!
//! The VMM (qemu, cloud-hypervisor, crosvm) connects to a Unix socket and shares the
//! guest's memory; the guest kernel's FUSE requests arrive on virtqueues. virtiofsd's
//! library decodes them ([`Server`]) and drives the vhost-user protocol
//! ([`VhostUserFsBackendBuilder`]); this module is the [`FileSystem`] it calls, and it
//! only translates into the [`Session`]'s calls. Reads go from the held host descriptor
//! straight into guest memory (`preadv2` on the guest's buffers), with no copy in the
//! daemon.
//!
//! Requests are handled on the queue's own thread, one after another (no thread pool and
//! no async executor): a guest's requests are short system calls on the host, and the
//! reply lengths reported to the guest are exactly what was written. The queues
//! themselves are served by [`device`], which trusts nothing the guest puts on them.
//!
//! Everything the guest can make the daemon hold is bounded by the session's
//! [`SessionLimits`]; DESTROY and a device reset give all of it back.

pub mod device;
#[cfg(any(test, feature = "hostile-guest"))]
pub mod hostile;
#[cfg(test)]
mod hostile_tests;

use std::ffi::{CStr, CString, OsStr};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use virtiofsd::filesystem::{
    Context, DirEntry, DirectoryIterator, Entry, Extensions, FileSystem, FsOptions, GetxattrReply,
    ListxattrReply, OpenOptions, SerializableFileSystem, SetattrValid, SetxattrFlags,
    ZeroCopyReader, ZeroCopyWriter,
};
use virtiofsd::fuse;
use virtiofsd::soft_idmap::Id;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use self::device::Device;
use crate::gc_roots::RootsGate;
use crate::protocol::{type_bits, wire_time, Capability, CAPABILITIES};
use crate::session::{
    attr_ttl, entry_ttl, CachePolicy, DirSlot, DirStream, Invalidation, Session, SessionLimits,
    Xattr, DIR_CACHE, FILE_CACHE,
};
use crate::view::{Attr, View};
use crate::warn_limited;

/// The `FileSystem` virtiofsd's server calls: a session on a view.
pub struct VirtioFs {
    session: Arc<Session<()>>,
    /// Set at INIT: the guest reads directories without opening them (it took
    /// FUSE_NO_OPENDIR_SUPPORT), so opendir answers ENOSYS once and never comes again.
    no_opendir: AtomicBool,
}

impl VirtioFs {
    /// Serves `view` to one guest, bounded by `limits`, while `gate` says its paths are
    /// rooted.
    pub fn new(view: Arc<View>, limits: SessionLimits, gate: RootsGate) -> Self {
        VirtioFs {
            session: Arc::new(Session::with_limits(view, limits).gated(gate)),
            no_opendir: AtomicBool::new(false),
        }
    }

    /// The session served, for its counters.
    pub fn session(&self) -> &Arc<Session<()>> {
        &self.session
    }
}

/// How serving a guest ended, when it ended without a fault of the daemon.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ended {
    /// The VMM disconnected after the guest used the device (it powered off, or the VMM
    /// exited).
    Disconnected,
    /// The VMM disconnected before the guest queued any request (during vhost-user setup,
    /// or a guest that never loaded the driver).
    DisconnectedDuringSetup,
}

/// Serves `view` to the one VMM that connects to `listener`, until it disconnects (the
/// guest powered off, or the VMM exited). `tag` is the file system name the device reports
/// to the guest, for VMMs that ask the device for it (qemu otherwise takes it from its own
/// `tag=` option). Another VMM connecting while the first is served is refused, with a
/// log line.
///
/// The daemon is expected to be sandboxed already: this starts threads, and the sandbox
/// must be entered while the process has one.
pub fn serve(
    view: Arc<View>,
    mut listener: Listener,
    tag: Option<String>,
    limits: SessionLimits,
    gate: RootsGate,
) -> io::Result<Ended> {
    let device = Arc::new(Device::new(VirtioFs::new(view, limits, gate), tag)?);
    let mut daemon = VhostUserDaemon::new(
        "nixstorefs".to_string(),
        device.clone(),
        GuestMemoryAtomic::new(GuestMemoryMmap::new()),
    )
    .map_err(|e| io::Error::other(format!("cannot create the vhost-user daemon: {e}")))?;
    tracing::info!("waiting for the VMM to connect");
    daemon
        .start(&mut listener)
        .map_err(|e| io::Error::other(format!("cannot accept the VMM's connection: {e}")))?;
    tracing::info!("VMM connected; serving the guest");
    std::thread::Builder::new()
        .name("refuse-vmm".into())
        .spawn(move || refuse_others(listener))?;
    let result = daemon.wait();
    if device.memory_unshared() {
        return Err(io::Error::other(
            "the VMM shared none of the guest's memory with the daemon, so no request could \
             be served: give qemu -object memory-backend-memfd,id=mem,size=<the -m size>,\
             share=on -numa node,memdev=mem (or a memory-backend-file with share=on)",
        ));
    }
    match result {
        Ok(())
        | Err(vhost_user_backend::Error::HandleRequest(
            vhost::vhost_user::Error::Disconnected | vhost::vhost_user::Error::PartialMessage,
        )) => {
            if device.started() {
                Ok(Ended::Disconnected)
            } else {
                Ok(Ended::DisconnectedDuringSetup)
            }
        }
        Err(e) => Err(io::Error::other(format!("serving the guest failed: {e}"))),
    }
}

/// Accepts and closes every further connection: one daemon serves one guest. A second
/// VMM pointed at the same socket (a copy-pasted command line, a restarted VM while the
/// old one still runs) is told so in the log instead of hanging unanswered.
fn refuse_others(listener: Listener) {
    let warnings = crate::ratelimit::Limiter::default();
    loop {
        match listener.accept() {
            Ok(Some(stream)) => {
                drop(stream);
                warn_limited!(
                    warnings,
                    "another VMM connected while a guest is served; refused: one daemon \
                     serves one guest, so start another with its own --socket-path"
                );
            }
            Ok(None) => continue,
            Err(e) => {
                tracing::debug!("no longer accepting connections: {e}");
                return;
            }
        }
    }
}

/// The largest READ served: what virtiofsd's server announces at INIT (`max_pages` of
/// 1 MiB, and `max_write` of the same).
pub(crate) const MAX_READ: u32 = 1 << 20;

fn error(e: rustix::io::Errno) -> io::Error {
    io::Error::from_raw_os_error(e.raw_os_error())
}

fn read_only<T>() -> io::Result<T> {
    Err(io::Error::from_raw_os_error(libc::EROFS))
}

fn name(c: &CStr) -> &OsStr {
    OsStr::from_bytes(c.to_bytes())
}

fn fuse_attr(a: &Attr) -> fuse::Attr {
    let (atime, atimensec) = wire_time(a.atime);
    let (mtime, mtimensec) = wire_time(a.mtime);
    let (ctime, ctimensec) = wire_time(a.ctime);
    fuse::Attr {
        ino: a.ino,
        size: a.size,
        blocks: a.blocks,
        atime,
        mtime,
        ctime,
        atimensec,
        mtimensec,
        ctimensec,
        mode: type_bits(a.kind) | u32::from(a.perm),
        nlink: a.nlink,
        uid: a.uid.into(),
        gid: a.gid.into(),
        rdev: a.rdev as u32,
        blksize: a.blksize,
        flags: 0,
    }
}

/// The answer to a lookup in `parent`. Over virtio-fs nothing can tell the guest that the
/// served set changed: the root's entries are trusted for no time (see [`Invalidation`]).
fn entry(parent: u64, a: &Attr) -> Entry {
    Entry {
        inode: a.ino,
        generation: a.generation,
        attr: fuse_attr(a),
        attr_timeout: attr_ttl(a.ino, Invalidation::Unannounced),
        entry_timeout: entry_ttl(parent, Invalidation::Unannounced),
    }
}

fn open_options(policy: CachePolicy) -> OpenOptions {
    let mut options = OpenOptions::NOFLUSH;
    if policy.keep_cache {
        options |= OpenOptions::KEEP_CACHE;
    }
    if policy.cache_dir {
        options |= OpenOptions::CACHE_DIR;
    }
    options
}

/// A directory stream read from an offset, one entry at a time.
pub struct DirIter {
    session: Arc<Session<()>>,
    stream: DirStream,
    offset: u64,
    name: CString,
}

impl DirectoryIterator for DirIter {
    fn next(&mut self) -> Option<DirEntry<'_>> {
        loop {
            let (slot_name, next_offset, attr) = {
                let slot: DirSlot<'_> = self.stream.from_offset(self.offset).next()?;
                // The number a lookup gives; an entry that vanished since is left out.
                let attr = self.session.peek(&self.stream, &slot);
                (slot.name.as_bytes().to_vec(), slot.next_offset, attr)
            };
            self.offset = next_offset;
            let Some(attr) = attr else { continue };
            // Store names never hold NUL (the view only lists what the host's getdents
            // returned); one that did could not be sent, and is left out.
            let Ok(name) = CString::new(slot_name) else {
                continue;
            };
            self.name = name;
            return Some(DirEntry {
                ino: attr.ino,
                offset: next_offset,
                type_: type_bits(attr.kind) >> 12,
                name: &self.name,
            });
        }
    }
}

impl FileSystem for VirtioFs {
    type Inode = u64;
    type Handle = u64;
    type DirIter = DirIter;

    fn init(&self, capable: FsOptions) -> io::Result<FsOptions> {
        let mut want = FsOptions::empty();
        for capability in CAPABILITIES {
            want |= match capability {
                Capability::AsyncRead => FsOptions::ASYNC_READ,
                Capability::ParallelDirops => FsOptions::PARALLEL_DIROPS,
                Capability::ReaddirplusAlways => FsOptions::DO_READDIRPLUS,
                Capability::CacheSymlinks => FsOptions::CACHE_SYMLINKS,
                Capability::ExportSupport => FsOptions::EXPORT_SUPPORT,
                Capability::PosixAcl => FsOptions::POSIX_ACL,
                Capability::NoOpendir => FsOptions::ZERO_MESSAGE_OPENDIR,
                Capability::AutoInvalData => FsOptions::AUTO_INVAL_DATA,
            };
        }
        self.no_opendir.store(
            capable.contains(FsOptions::ZERO_MESSAGE_OPENDIR),
            Ordering::Relaxed,
        );
        tracing::debug!(?capable, "guest connected");
        Ok(want & capable)
    }

    fn destroy(&self) {
        // The guest's driver went away (unmount, reboot): it holds nothing any more.
        self.session.reset();
    }

    fn lookup(&self, _ctx: Context, parent: u64, name: &CStr) -> io::Result<Entry> {
        match self.session.lookup(parent, self::name(name)) {
            Ok(attr) => Ok(entry(parent, &attr)),
            Err(e) => {
                tracing::debug!(parent, ?name, "lookup: {e}");
                Err(error(e))
            }
        }
    }

    fn forget(&self, _ctx: Context, inode: u64, count: u64) {
        self.session.forget(inode, count);
    }

    fn getattr(
        &self,
        _ctx: Context,
        inode: u64,
        _handle: Option<u64>,
    ) -> io::Result<(fuse::Attr, Duration)> {
        let attr = self.session.getattr(inode).map_err(error)?;
        Ok((fuse_attr(&attr), attr_ttl(inode, Invalidation::Unannounced)))
    }

    fn readlink(&self, _ctx: Context, inode: u64) -> io::Result<Vec<u8>> {
        self.session.readlink(inode).map_err(error)
    }

    fn open(
        &self,
        _ctx: Context,
        inode: u64,
        _kill_priv: bool,
        flags: u32,
    ) -> io::Result<(Option<u64>, OpenOptions)> {
        let (fh, _) = self
            .session
            .open(inode, flags as i32, |_| ())
            .map_err(error)?;
        Ok((Some(fh), open_options(FILE_CACHE)))
    }

    fn read<W: ZeroCopyWriter>(
        &self,
        _ctx: Context,
        _inode: u64,
        handle: u64,
        mut w: W,
        size: u32,
        offset: u64,
        _lock_owner: Option<u64>,
        _flags: u32,
    ) -> io::Result<usize> {
        let open = self.session.file(handle).map_err(error)?;
        // Never more than was negotiated at INIT, whatever the request says.
        let want = open.span(offset, size.min(MAX_READ));
        let file = self.session.host_file(&open).map_err(error)?;
        // Straight from the host file into the guest's buffers.
        open.read_exact(
            &file,
            offset,
            want,
            &self.session.warnings,
            |file, at, len| {
                match w.read_from_file_at(file, len, at, None)? {
                    // Nothing moved: the file ended early (it shrank on the host), or the
                    // guest's buffers are smaller than the size it asked for.
                    0 if file.metadata()?.len() >= at + len as u64 => {
                        Err(io::Error::from_raw_os_error(libc::EINVAL))
                    }
                    n => Ok(n),
                }
            },
        )
        .map_err(error)
    }

    fn release(
        &self,
        _ctx: Context,
        _inode: u64,
        _flags: u32,
        handle: u64,
        _flush: bool,
        _flock_release: bool,
        _lock_owner: Option<u64>,
    ) -> io::Result<()> {
        self.session.release(handle);
        Ok(())
    }

    fn opendir(
        &self,
        _ctx: Context,
        inode: u64,
        _flags: u32,
    ) -> io::Result<(Option<u64>, OpenOptions)> {
        if self.no_opendir.load(Ordering::Relaxed) {
            // The guest takes ENOSYS as "never ask again" and reads with handle 0.
            self.session.getattr(inode).map_err(error)?;
            return Err(io::Error::from_raw_os_error(libc::ENOSYS));
        }
        let fh = self.session.opendir(inode).map_err(error)?;
        Ok((Some(fh), open_options(DIR_CACHE)))
    }

    fn readdir(
        &self,
        _ctx: Context,
        inode: u64,
        handle: u64,
        _size: u32,
        offset: u64,
    ) -> io::Result<DirIter> {
        let stream = self.session.dir_stream(inode, handle).map_err(error)?;
        Ok(DirIter {
            session: self.session.clone(),
            stream,
            offset,
            name: CString::default(),
        })
    }

    fn releasedir(&self, _ctx: Context, _inode: u64, _flags: u32, handle: u64) -> io::Result<()> {
        self.session.releasedir(handle);
        Ok(())
    }

    fn statfs(&self, _ctx: Context, _inode: u64) -> io::Result<libc::statvfs64> {
        let s = self.session.statfs().map_err(error)?;
        // SAFETY: statvfs64 is plain integers, for which all zeros is a valid value.
        let mut out: libc::statvfs64 = unsafe { std::mem::zeroed() };
        out.f_bsize = s.f_bsize;
        out.f_frsize = s.f_frsize;
        out.f_blocks = s.f_blocks;
        out.f_files = s.f_files;
        out.f_namemax = s.f_namemax;
        // Nothing is free: the view is read-only.
        out.f_flag = libc::ST_RDONLY;
        Ok(out)
    }

    fn getxattr(
        &self,
        _ctx: Context,
        inode: u64,
        name: &CStr,
        size: u32,
    ) -> io::Result<GetxattrReply> {
        match self.session.getxattr(inode, self::name(name), size) {
            Ok(Xattr::Size(n)) => Ok(GetxattrReply::Count(n)),
            Ok(Xattr::Data(value)) => Ok(GetxattrReply::Value(value)),
            Err(e) => Err(error(e)),
        }
    }

    fn listxattr(&self, _ctx: Context, inode: u64, size: u32) -> io::Result<ListxattrReply> {
        match self.session.listxattr(inode, size) {
            Ok(Xattr::Size(n)) => Ok(ListxattrReply::Count(n)),
            Ok(Xattr::Data(list)) => Ok(ListxattrReply::Names(list)),
            Err(e) => Err(error(e)),
        }
    }

    fn access(&self, ctx: Context, inode: u64, mask: u32) -> io::Result<()> {
        self.session
            .access(inode, ctx.uid.into_inner(), ctx.gid.into_inner(), mask)
            .map_err(error)
    }

    // Nothing is ever written, so there is nothing to flush or sync.

    fn flush(&self, _ctx: Context, _inode: u64, _handle: u64, _lock_owner: u64) -> io::Result<()> {
        Ok(())
    }

    fn fsync(&self, _ctx: Context, _inode: u64, _datasync: bool, _handle: u64) -> io::Result<()> {
        Ok(())
    }

    fn fsyncdir(
        &self,
        _ctx: Context,
        _inode: u64,
        _datasync: bool,
        _handle: u64,
    ) -> io::Result<()> {
        Ok(())
    }

    fn syncfs(&self, _ctx: Context, _inode: u64) -> io::Result<()> {
        Ok(())
    }

    // Everything below modifies the store: the view is read-only.

    fn setattr(
        &self,
        _ctx: Context,
        _inode: u64,
        _attr: fuse::SetattrIn,
        _handle: Option<u64>,
        _valid: SetattrValid,
    ) -> io::Result<(fuse::Attr, Duration)> {
        read_only()
    }

    fn symlink(
        &self,
        _ctx: Context,
        _linkname: &CStr,
        _parent: u64,
        _name: &CStr,
        _extensions: Extensions,
    ) -> io::Result<Entry> {
        read_only()
    }

    fn mknod(
        &self,
        _ctx: Context,
        _inode: u64,
        _name: &CStr,
        _mode: u32,
        _rdev: u32,
        _umask: u32,
        _extensions: Extensions,
    ) -> io::Result<Entry> {
        read_only()
    }

    fn mkdir(
        &self,
        _ctx: Context,
        _parent: u64,
        _name: &CStr,
        _mode: u32,
        _umask: u32,
        _extensions: Extensions,
    ) -> io::Result<Entry> {
        read_only()
    }

    fn unlink(&self, _ctx: Context, _parent: u64, _name: &CStr) -> io::Result<()> {
        read_only()
    }

    fn rmdir(&self, _ctx: Context, _parent: u64, _name: &CStr) -> io::Result<()> {
        read_only()
    }

    fn rename(
        &self,
        _ctx: Context,
        _olddir: u64,
        _oldname: &CStr,
        _newdir: u64,
        _newname: &CStr,
        _flags: u32,
    ) -> io::Result<()> {
        read_only()
    }

    fn link(
        &self,
        _ctx: Context,
        _inode: u64,
        _newparent: u64,
        _newname: &CStr,
    ) -> io::Result<Entry> {
        read_only()
    }

    fn create(
        &self,
        _ctx: Context,
        _parent: u64,
        _name: &CStr,
        _mode: u32,
        _kill_priv: bool,
        _flags: u32,
        _umask: u32,
        _extensions: Extensions,
    ) -> io::Result<(Entry, Option<u64>, OpenOptions)> {
        read_only()
    }

    fn write<R: ZeroCopyReader>(
        &self,
        _ctx: Context,
        _inode: u64,
        _handle: u64,
        _r: R,
        _size: u32,
        _offset: u64,
        _lock_owner: Option<u64>,
        _delayed_write: bool,
        _kill_priv: bool,
        _flags: u32,
    ) -> io::Result<usize> {
        read_only()
    }

    fn fallocate(
        &self,
        _ctx: Context,
        _inode: u64,
        _handle: u64,
        _mode: u32,
        _offset: u64,
        _length: u64,
    ) -> io::Result<()> {
        read_only()
    }

    fn setxattr(
        &self,
        _ctx: Context,
        _inode: u64,
        _name: &CStr,
        _value: &[u8],
        _flags: u32,
        _extra_flags: SetxattrFlags,
    ) -> io::Result<()> {
        read_only()
    }

    fn removexattr(&self, _ctx: Context, _inode: u64, _name: &CStr) -> io::Result<()> {
        read_only()
    }

    fn copyfilerange(
        &self,
        _ctx: Context,
        _inode_in: u64,
        _handle_in: u64,
        _offset_in: u64,
        _inode_out: u64,
        _handle_out: u64,
        _offset_out: u64,
        _len: u64,
        _flags: u64,
    ) -> io::Result<usize> {
        read_only()
    }

    fn tmpfile(&self) -> io::Result<(Entry, Option<u64>, OpenOptions)> {
        read_only()
    }
}

/// Migration of the device's state is not offered: a guest moved to another host would
/// need the same store there anyway, so the VMM is told it is unsupported.
impl SerializableFileSystem for VirtioFs {}

impl device::Served for VirtioFs {
    fn view(&self) -> Option<Arc<View>> {
        Some(self.session.view().clone())
    }
}

/// Node numbers are the view's own, root included.
const _: () = assert!(virtiofsd::filesystem::ROOT_ID == crate::view::ROOT_ID);
