//! A local cache of images, keyed by a digest of everything that decides their bytes.
//!
//! Store paths never change once they are valid, so the sorted list of a closure's paths,
//! with the options that change the image and the writer's [`FORMAT_VERSION`], names the
//! image exactly. A store modified by hand (or a path deleted and rebuilt differently)
//! breaks that assumption; `--no-cache` bypasses the cache then.
//!
//! The directory holds, per key, `KEY.img` (the image, read-only), `KEY.seal` (what the
//! image looked like when it was written: size, mtime and inode number; its own mtime is
//! the last use, for eviction) and `KEY.lock` (held exclusively while the entry is built
//! or evicted, shared while it is served, so that concurrent runs build it once and
//! eviction never removes an entry in use). An entry is served only if it still matches
//! its seal and its superblock checksum, so an image written to through a hard link to
//! it (a VM that opens its store read-write) is rebuilt instead of served.
//!
//! Nobody else may write to the directory: the key is computed from public inputs, so
//! anyone who could would plant an image with a store of their choosing for the next run
//! to serve. The directory is created mode 0700 and refused when it belongs to another
//! user or is writable by group or others. Every file in it is reached from the
//! directory's descriptor without following symlinks, checked to be a regular file of
//! the caller's, and then read, sealed, served or touched through its own descriptor.
//!
//! [`Cache::serve_or_build`] is one use of the cache, in that order: the check under the
//! shared lock, the check again and the build and seal under the exclusive lock, serving
//! OUTPUT, then the eviction.
//!
//! An image being built is `.KEY.img.*.tmp` until it is sealed, under the key's lock; a
//! run that dies leaves it behind, and the next eviction pass removes it once that lock
//! is free. Until then it counts toward the size limit.

use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use rustix::fs::{AtFlags, FileType, FlockOperation, Mode, OFlags, Stat};
use rustix::io::Errno;
use sha2::{Digest, Sha256};

use crate::erofs::format::{superblock_checksum, SuperBlock, SUPER_OFFSET, SUPER_SIZE};
use crate::output::{copy_image, refuse_device, temp_beside, AtomicOutput, RemoveOnSignal};

mod serve_or_build;

pub use serve_or_build::{CacheError, Served, Step};

/// Version of the image bytes for a given input: bumped whenever the writer's output for
/// the same tree and options changes, so that older entries are never served. The
/// writer's tests pin the digest of images of a fixed tree to this number
/// (`erofs::tests::format_version_pins_the_writers_bytes`).
pub const FORMAT_VERSION: u32 = 3;

/// Builds a cache key from named fields; the order of calls is part of the key.
pub struct KeyBuilder(Sha256);

impl Default for KeyBuilder {
    fn default() -> Self {
        let mut hasher = Sha256::new();
        hasher.update(b"mkimage image cache\0");
        hasher.update(FORMAT_VERSION.to_le_bytes());
        hasher.update(env!("CARGO_PKG_VERSION").as_bytes());
        KeyBuilder(hasher)
    }
}

impl KeyBuilder {
    /// Adds one field; names and values are length-prefixed, so no two different field
    /// lists give the same byte stream.
    pub fn field(&mut self, name: &str, value: impl AsRef<[u8]>) -> &mut Self {
        let value = value.as_ref();
        self.0.update((name.len() as u64).to_le_bytes());
        self.0.update(name.as_bytes());
        self.0.update((value.len() as u64).to_le_bytes());
        self.0.update(value);
        self
    }

    /// The key: the digest in hex.
    pub fn finish(self) -> String {
        self.0
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

/// The digest of `bytes` in hex, for fields too large to hash twice (a registration).
pub fn digest(bytes: &[u8]) -> String {
    let mut key = KeyBuilder(Sha256::new());
    key.0.update(bytes);
    key.finish()
}

/// How OUTPUT was made from a cache entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// A copy-on-write clone: writing to OUTPUT leaves the entry alone.
    Reflink,
    /// A hard link: OUTPUT is the entry, read-only; a write to it is caught by the seal.
    HardLink,
    /// A plain copy (the cache is on another filesystem).
    Copy,
    /// Written in place to the block device OUTPUT names.
    Device,
}

impl Delivery {
    /// A word for the summary line.
    pub fn as_str(self) -> &'static str {
        match self {
            Delivery::Reflink => "reflink",
            Delivery::HardLink => "hard link",
            Delivery::Copy => "copy",
            Delivery::Device => "written to the device",
        }
    }
}

/// A cache directory, held open: every entry is reached from this descriptor.
pub struct Cache {
    dir: PathBuf,
    fd: OwnedFd,
    uid: u32,
}

/// A lock on one key (exclusive or shared), held until dropped.
pub struct Lock {
    _file: File,
}

/// A checked entry, open: what is served is what was checked.
pub struct Entry {
    file: File,
    size: u64,
    dev: u64,
    ino: u64,
}

impl Entry {
    /// The image's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }
}

/// An entry's image being written: a temporary file in the cache directory, removed
/// unless [`Cache::seal`] makes it the entry.
pub struct Building<'a> {
    cache: &'a Cache,
    file: Option<File>,
    name: String,
    _signal: RemoveOnSignal,
}

impl Building<'_> {
    /// The file to write the image into.
    pub fn file(&self) -> &File {
        self.file.as_ref().expect("present until sealed")
    }

    /// Where it is, for messages.
    pub fn path(&self) -> PathBuf {
        self.cache.dir.join(&self.name)
    }
}

impl Drop for Building<'_> {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = rustix::fs::unlinkat(&self.cache.fd, self.name.as_str(), AtFlags::empty());
        }
    }
}

/// What one eviction pass did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Evicted {
    /// Entries removed to get under the size limit.
    pub entries: usize,
    /// Temporary files of dead runs removed.
    pub leftovers: usize,
    /// Bytes the cache holds afterwards (images and temporary files).
    pub bytes: u64,
}

/// How a lock is taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockKind {
    /// To build or remove the entry: one holder.
    Exclusive,
    /// To check and serve it: any number of holders, none exclusive.
    Shared,
}

/// What a seal records about the image it was written for.
#[derive(Debug, PartialEq, Eq)]
struct Seal {
    size: u64,
    mtime: (i64, i64),
    ino: u64,
}

impl Seal {
    fn of(stat: &Stat) -> Seal {
        Seal {
            size: stat.st_size as u64,
            mtime: (stat.st_mtime, stat.st_mtime_nsec as i64),
            ino: stat.st_ino,
        }
    }

    fn to_text(&self) -> String {
        format!(
            "mkimage-cache-seal 1 size={} mtime={}.{:09} ino={}\n",
            self.size, self.mtime.0, self.mtime.1, self.ino
        )
    }

    fn parse(text: &str) -> Option<Seal> {
        let mut words = text.split_whitespace();
        if (words.next(), words.next()) != (Some("mkimage-cache-seal"), Some("1")) {
            return None;
        }
        let size = words.next()?.strip_prefix("size=")?.parse().ok()?;
        let (sec, nsec) = words.next()?.strip_prefix("mtime=")?.split_once('.')?;
        let ino = words.next()?.strip_prefix("ino=")?.parse().ok()?;
        Some(Seal {
            size,
            mtime: (sec.parse().ok()?, nsec.parse().ok()?),
            ino,
        })
    }
}

/// Whether `name` is a key: 64 lowercase hex digits. Nothing else in the directory is
/// ever removed.
fn is_key(name: &str) -> bool {
    name.len() == 64 && name.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// The key a file of the cache belongs to, and whether it is a temporary file.
fn key_of(name: &str) -> Option<(&str, bool)> {
    if let Some(rest) = name.strip_prefix('.') {
        let key = rest.get(..64)?;
        return (is_key(key) && rest[64..].starts_with('.') && rest.ends_with(".tmp"))
            .then_some((key, true));
    }
    let (key, ext) = name.split_once('.')?;
    (is_key(key) && matches!(ext, "img" | "seal" | "lock")).then_some((key, false))
}

fn mode_of(stat: &Stat) -> u32 {
    stat.st_mode & 0o7777
}

impl Cache {
    /// Opens the cache directory `dir`, creating it (mode 0700, its parents as usual) if
    /// needed. Refuses a symlink, and a directory that belongs to another user or that
    /// group or others may write to, naming its owner and mode.
    pub fn open(dir: &Path) -> io::Result<Cache> {
        // Without a trailing slash, which would make the kernel follow a final symlink.
        let dir: &Path = &dir.components().collect::<PathBuf>();
        let named = |e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", dir.display()));
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            fs::create_dir_all(parent).map_err(named)?;
        }
        match rustix::fs::mkdirat(rustix::fs::CWD, dir, Mode::from_raw_mode(0o700)) {
            Ok(()) | Err(Errno::EXIST) => {}
            Err(e) => return Err(named(e.into())),
        }
        let fd = rustix::fs::openat(
            rustix::fs::CWD,
            dir,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| match e {
            Errno::LOOP | Errno::NOTDIR => io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{}: not a directory (a symlink is not followed: give the directory itself)",
                    dir.display()
                ),
            ),
            e => named(e.into()),
        })?;
        let stat = rustix::fs::fstat(&fd).map_err(|e| named(e.into()))?;
        let uid = rustix::process::geteuid().as_raw();
        if stat.st_uid != uid || mode_of(&stat) & 0o022 != 0 {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "{}: refusing a cache directory owned by uid {} with mode {:04o}: it must \
                     belong to uid {uid} (who runs mkimage) and not be writable by group or \
                     others, since whoever can write there chooses the images served",
                    dir.display(),
                    stat.st_uid,
                    mode_of(&stat)
                ),
            ));
        }
        Ok(Cache {
            dir: dir.to_owned(),
            fd,
            uid,
        })
    }

    /// Where the image of `key` lives.
    pub fn image_path(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{key}.img"))
    }

    /// Opens `name` in the directory without following a symlink or blocking on a FIFO,
    /// and checks that it is a regular file of the caller's.
    fn open_file(&self, name: &str, flags: OFlags) -> io::Result<(File, Stat)> {
        let fd = rustix::fs::openat(
            &self.fd,
            name,
            flags | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC | OFlags::NOCTTY,
            Mode::from_raw_mode(0o600),
        )
        .map_err(|e| match e {
            Errno::LOOP => io::Error::new(io::ErrorKind::InvalidData, "is a symlink"),
            e => e.into(),
        })?;
        let stat = rustix::fs::fstat(&fd)?;
        if FileType::from_raw_mode(stat.st_mode) != FileType::RegularFile {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "is not a regular file",
            ));
        }
        if stat.st_uid != self.uid {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("belongs to uid {}, not to uid {}", stat.st_uid, self.uid),
            ));
        }
        Ok((File::from(fd), stat))
    }

    fn named(&self, name: &str, e: io::Error) -> io::Error {
        io::Error::new(e.kind(), format!("{}: {e}", self.dir.join(name).display()))
    }

    /// Waits for and takes the lock of `key`.
    pub fn lock(&self, key: &str, kind: LockKind) -> io::Result<Lock> {
        let op = match kind {
            LockKind::Exclusive => FlockOperation::LockExclusive,
            LockKind::Shared => FlockOperation::LockShared,
        };
        Ok(self.take_lock(key, op)?.expect("a blocking lock is taken"))
    }

    /// Takes the exclusive lock of `key` if it is free.
    fn try_lock(&self, key: &str) -> io::Result<Option<Lock>> {
        self.take_lock(key, FlockOperation::NonBlockingLockExclusive)
    }

    fn take_lock(&self, key: &str, op: FlockOperation) -> io::Result<Option<Lock>> {
        let name = format!("{key}.lock");
        loop {
            let (file, stat) = self
                .open_file(&name, OFlags::RDWR | OFlags::CREATE)
                .map_err(|e| self.named(&name, e))?;
            match rustix::fs::flock(&file, op) {
                Ok(()) => {}
                Err(Errno::WOULDBLOCK) => return Ok(None),
                Err(e) => return Err(self.named(&name, e.into())),
            }
            // Eviction removes a lock file while holding it: a lock taken on a file that
            // is no longer the one at its name locks nothing. Take the new one.
            match rustix::fs::statat(&self.fd, name.as_str(), AtFlags::SYMLINK_NOFOLLOW) {
                Ok(now) if (now.st_dev, now.st_ino) == (stat.st_dev, stat.st_ino) => {
                    return Ok(Some(Lock { _file: file }));
                }
                Ok(_) | Err(Errno::NOENT) => continue,
                Err(e) => return Err(self.named(&name, e.into())),
            }
        }
    }

    /// Checks the entry of `key`: `Ok(None)` if there is none, `Err` with the reason if it
    /// is there but damaged or not the caller's, `Ok(Some(entry))`, open, if it can be
    /// served. Call with the key's lock held.
    pub fn check(&self, key: &str) -> Result<Option<Entry>, String> {
        let name = format!("{key}.img");
        let image = self.image_path(key);
        let (file, stat) = match self.open_file(&name, OFlags::RDONLY) {
            Ok(opened) => opened,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("{}: {e}", image.display())),
        };
        if mode_of(&stat) & 0o222 != 0 {
            return Err(format!(
                "{} is writable (mode {:04o}); entries are sealed read-only",
                image.display(),
                mode_of(&stat)
            ));
        }
        let seal_name = format!("{key}.seal");
        let seal_path = self.dir.join(&seal_name);
        let mut text = String::new();
        self.open_file(&seal_name, OFlags::RDONLY)
            .and_then(|(f, _)| f.take(4096).read_to_string(&mut text))
            .map_err(|e| format!("{}: {e}", seal_path.display()))?;
        let seal =
            Seal::parse(&text).ok_or_else(|| format!("{}: not a seal", seal_path.display()))?;
        let now = Seal::of(&stat);
        if now != seal {
            return Err(format!(
                "{} changed since it was written: now {}, sealed {}",
                image.display(),
                now.to_text().trim_end(),
                seal.to_text().trim_end()
            ));
        }
        let size = stat.st_size as u64;
        check_superblock(&file, size).map_err(|e| format!("{}: {e}", image.display()))?;
        Ok(Some(Entry {
            file,
            size,
            dev: stat.st_dev,
            ino: stat.st_ino,
        }))
    }

    /// Starts writing the image of `key`: call with the key's exclusive lock held.
    pub fn build(&self, key: &str) -> io::Result<Building<'_>> {
        let (file, name, signal) = self.create_temp(key, "img")?;
        Ok(Building {
            cache: self,
            file: Some(file),
            name,
            _signal: signal,
        })
    }

    /// Creates `.KEY.WHAT.*.tmp`, new, for the caller only, removed by a signal.
    fn create_temp(&self, key: &str, what: &str) -> io::Result<(File, String, RemoveOnSignal)> {
        static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        loop {
            let nanos = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos());
            let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let name = format!(".{key}.{what}.{}-{n}-{nanos}.tmp", std::process::id());
            let signal = RemoveOnSignal::new(&self.dir.join(&name));
            match rustix::fs::openat(
                &self.fd,
                name.as_str(),
                OFlags::RDWR | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::from_raw_mode(0o600),
            ) {
                Ok(fd) => return Ok((File::from(fd), name, signal)),
                Err(Errno::EXIST) => continue,
                Err(e) => return Err(self.named(&name, e.into())),
            }
        }
    }

    /// Makes the complete image `building` the entry of `key`, read-only, and records it
    /// in its seal. Everything is done through the descriptor it was written through, so
    /// nothing put at its name meanwhile is changed.
    pub fn seal(&self, key: &str, mut building: Building<'_>) -> io::Result<Entry> {
        let file = building.file.take().expect("present until sealed");
        let temp = building.name.clone();
        let result = (|| {
            // Read-only, so that a hard link to it is not writable by mistake.
            rustix::fs::fchmod(&file, Mode::from_raw_mode(0o444))?;
            file.sync_all()?;
            let stat = rustix::fs::fstat(&file)?;
            let name = format!("{key}.img");
            rustix::fs::renameat(&self.fd, temp.as_str(), &self.fd, name.as_str())?;
            self.write_seal(key, &Seal::of(&stat))?;
            rustix::fs::fsync(&self.fd)?;
            Ok(Entry {
                size: stat.st_size as u64,
                dev: stat.st_dev,
                ino: stat.st_ino,
                file,
            })
        })();
        if result.is_err() {
            let _ = rustix::fs::unlinkat(&self.fd, temp.as_str(), AtFlags::empty());
        }
        result
    }

    fn write_seal(&self, key: &str, seal: &Seal) -> io::Result<()> {
        let (mut file, temp, _signal) = self.create_temp(key, "seal")?;
        let written = file
            .write_all(seal.to_text().as_bytes())
            .and_then(|()| file.sync_all())
            .and_then(|()| {
                let name = format!("{key}.seal");
                rustix::fs::renameat(&self.fd, temp.as_str(), &self.fd, name.as_str())
                    .map_err(io::Error::from)
            });
        if written.is_err() {
            let _ = rustix::fs::unlinkat(&self.fd, temp.as_str(), AtFlags::empty());
        }
        written
    }

    /// Marks the entry of `key` as just used, for eviction.
    pub fn touch(&self, key: &str) {
        let name = format!("{key}.seal");
        let now = fs::FileTimes::new().set_modified(SystemTime::now());
        if let Err(e) = self
            .open_file(&name, OFlags::WRONLY)
            .and_then(|(f, _)| f.set_times(now))
        {
            tracing::warn!(
                "cannot mark {} as used: {e}",
                self.dir.join(&name).display()
            );
        }
    }

    /// Makes `output` the image of the checked `entry` of `key`. A block device (or a
    /// symlink to one) is written in place, its size checked first and its superblock
    /// last. Anything else is replaced atomically: by a reflink where the filesystem has
    /// them, else a hard link where the cache shares the filesystem, else a copy.
    pub fn serve(&self, key: &str, entry: &Entry, output: &Path) -> io::Result<Delivery> {
        let out = AtomicOutput::create(output)?;
        if out.is_device() {
            copy_image(&entry.file, entry.size, out.file())?;
            out.commit()?;
            return Ok(Delivery::Device);
        }
        match rustix::fs::ioctl_ficlone(out.file(), &entry.file) {
            Ok(()) => {
                out.commit()?;
                return Ok(Delivery::Reflink);
            }
            Err(e) => tracing::debug!("no reflink from {}: {e}", self.image_path(key).display()),
        }
        if let Some(linked) = self.hard_link_beside(key, entry, output)? {
            drop(out);
            refuse_device(output)?;
            linked.persist(output).map_err(|e| e.error)?;
            return Ok(Delivery::HardLink);
        }
        copy_image(&entry.file, entry.size, out.file())?;
        out.commit()?;
        Ok(Delivery::Copy)
    }

    /// A hard link to the entry under a temporary name beside `output`; `None` if the two
    /// are on different filesystems (or the filesystem has no hard links). The link is
    /// made from the entry's name without following a symlink, then checked to be the
    /// very file that was checked.
    fn hard_link_beside(
        &self,
        key: &str,
        entry: &Entry,
        output: &Path,
    ) -> io::Result<Option<tempfile::TempPath>> {
        let (dir, prefix) = temp_beside(output)?;
        let image = format!("{key}.img");
        let made = tempfile::Builder::new()
            .prefix(&prefix)
            .suffix(".tmp")
            .make_in(dir, |path| {
                rustix::fs::linkat(
                    &self.fd,
                    image.as_str(),
                    rustix::fs::CWD,
                    path,
                    AtFlags::empty(),
                )
                .map_err(io::Error::from)
            });
        let temp = match made {
            Ok(temp) => temp.into_temp_path(),
            // Another filesystem, one without hard links, or too many links already.
            Err(e)
                if matches!(
                    Errno::from_io_error(&e),
                    Some(Errno::XDEV | Errno::PERM | Errno::MLINK | Errno::OPNOTSUPP)
                ) =>
            {
                return Ok(None)
            }
            Err(e) => return Err(e),
        };
        let linked = rustix::fs::statat(rustix::fs::CWD, &*temp, AtFlags::SYMLINK_NOFOLLOW)?;
        if (linked.st_dev, linked.st_ino) != (entry.dev, entry.ino) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{} was replaced while it was served",
                    self.image_path(key).display()
                ),
            ));
        }
        Ok(Some(temp))
    }

    /// Removes the temporary files of runs that died (once their key's lock is free),
    /// then, with `max_bytes`, the least recently used entries other than `keep`, each
    /// under its exclusive lock, until images and temporary files take at most
    /// `max_bytes`. Entries being built or served are left alone, and still counted.
    pub fn evict(&self, max_bytes: Option<u64>, keep: &str) -> io::Result<Evicted> {
        #[derive(Default)]
        struct Files {
            image: Option<u64>,
            temps: Vec<(String, u64)>,
            used: Option<SystemTime>,
        }
        let mut keys: std::collections::BTreeMap<String, Files> = Default::default();
        let dir = rustix::fs::Dir::read_from(&self.fd).map_err(|e| self.named("", e.into()))?;
        for entry in dir {
            let entry = entry.map_err(|e| self.named("", e.into()))?;
            let name = OsStr::from_bytes(entry.file_name().to_bytes());
            let Some(name) = name.to_str() else { continue };
            let Some((key, temp)) = key_of(name) else {
                continue;
            };
            let stat = match rustix::fs::statat(&self.fd, name, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(stat) => stat,
                Err(Errno::NOENT) => continue,
                Err(e) => return Err(self.named(name, e.into())),
            };
            if FileType::from_raw_mode(stat.st_mode) != FileType::RegularFile {
                continue;
            }
            let files = keys.entry(key.to_owned()).or_default();
            let size = stat.st_size as u64;
            if temp {
                files.temps.push((name.to_owned(), size));
            } else if name.ends_with(".img") {
                files.image = Some(size);
            } else if name.ends_with(".seal") {
                files.used = Some(
                    SystemTime::UNIX_EPOCH
                        + std::time::Duration::new(
                            stat.st_mtime.max(0) as u64,
                            stat.st_mtime_nsec as u32,
                        ),
                );
            }
        }
        let mut done = Evicted {
            bytes: keys
                .values()
                .map(|f| f.image.unwrap_or(0) + f.temps.iter().map(|t| t.1).sum::<u64>())
                .sum(),
            ..Evicted::default()
        };
        let remove = |name: &str| match rustix::fs::unlinkat(&self.fd, name, AtFlags::empty()) {
            Ok(()) | Err(Errno::NOENT) => Ok(()),
            Err(e) => Err(self.named(name, e.into())),
        };
        // Temporary files, and the lock and seal of a key without an image: what runs
        // that died or failed left behind, once nobody holds the key.
        let mut gone = Vec::new();
        for (key, files) in keys
            .iter_mut()
            .filter(|(_, f)| !f.temps.is_empty() || f.image.is_none())
        {
            let Some(_lock) = self.try_lock(key)? else {
                continue;
            };
            for (name, size) in files.temps.drain(..) {
                remove(&name)?;
                tracing::info!("removed {name} ({size} bytes), left by a run that died");
                done.bytes -= size;
                done.leftovers += 1;
            }
            // Under the lock, and only if no run sealed an image since the listing.
            let image = format!("{key}.img");
            let no_image = matches!(
                rustix::fs::statat(&self.fd, image.as_str(), AtFlags::SYMLINK_NOFOLLOW),
                Err(Errno::NOENT)
            );
            if files.image.is_none() && no_image {
                remove(&format!("{key}.seal"))?;
                remove(&format!("{key}.lock"))?;
                gone.push(key.clone());
            }
        }
        for key in gone {
            keys.remove(&key);
        }
        let Some(max_bytes) = max_bytes else {
            return Ok(done);
        };
        // Entries without a seal are unused (a build that never finished): oldest.
        let mut order: Vec<_> = keys
            .iter()
            .filter(|(key, _)| *key != keep)
            .map(|(key, f)| (f.used.unwrap_or(SystemTime::UNIX_EPOCH), key))
            .collect();
        order.sort();
        for (_, key) in order {
            if done.bytes <= max_bytes {
                break;
            }
            // Held or being built: leave it.
            let Some(_lock) = self.try_lock(key)? else {
                continue;
            };
            let files = &keys[key];
            // The seal goes first: an image without one is never served.
            for name in [format!("{key}.seal"), format!("{key}.img")]
                .into_iter()
                .chain(files.temps.iter().map(|t| t.0.clone()))
                .chain([format!("{key}.lock")])
            {
                remove(&name)?;
            }
            let size = files.image.unwrap_or(0) + files.temps.iter().map(|t| t.1).sum::<u64>();
            tracing::info!("evicted {key}.img ({size} bytes) from the cache");
            done.bytes -= size;
            done.entries += 1;
        }
        Ok(done)
    }
}

/// Fails unless `image` starts with an erofs superblock whose checksum holds and whose
/// block count matches `size`.
fn check_superblock(image: &File, size: u64) -> Result<(), String> {
    let mut block = vec![0u8; 4096];
    image
        .read_exact_at(&mut block, 0)
        .map_err(|e| format!("cannot read the superblock: {e}"))?;
    let raw: &[u8; SUPER_SIZE] = block[SUPER_OFFSET as usize..][..SUPER_SIZE]
        .try_into()
        .expect("the superblock lies in the first block");
    let sb = SuperBlock::from_bytes(raw).ok_or("no erofs superblock")?;
    let blocks = (sb.blocks as u64) << sb.blkszbits;
    if blocks != size {
        return Err(format!("{size} bytes, but the superblock says {blocks}"));
    }
    if superblock_checksum(&block) != sb.checksum {
        return Err("the superblock checksum does not match".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_names_of_entries_are_keys() {
        let key = "0123456789abcdef".repeat(4);
        assert_eq!(key_of(&format!("{key}.img")), Some((key.as_str(), false)));
        assert_eq!(key_of(&format!("{key}.lock")), Some((key.as_str(), false)));
        assert_eq!(
            key_of(&format!(".{key}.img.12-0-5.tmp")),
            Some((key.as_str(), true))
        );
        for other in [
            "disk.img".to_owned(),
            format!("{key}.img.bak"),
            format!("{}.img", key.to_uppercase()),
            format!(".{key}.img"),
            format!(".{key}x.tmp"),
            format!("{key}0.img"),
        ] {
            assert_eq!(key_of(&other), None, "{other}");
        }
    }
}
