//! A local cache of images, keyed by a digest of everything that decides their bytes.
//!
//! Store paths never change once they are valid, so the sorted list of a closure's paths,
//! with the options that change the image and the writer's [`FORMAT_VERSION`], names the
//! image exactly. A store modified by hand (or a path deleted and rebuilt differently)
//! breaks that assumption; `--no-cache` bypasses the cache then.
//!
//! The directory holds, per key, `KEY.img` (the image, read-only), `KEY.seal` (what the
//! image looked like when it was written: size, mtime and inode number; its own mtime is
//! the last use, for eviction) and `KEY.lock` (taken while the entry is built, so that
//! concurrent runs build it once). An entry is served only if it still matches its seal
//! and its superblock checksum, so an image written to through a hard link to it
//! (a VM that opens its store read-write) is rebuilt instead of served.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use rustix::io::Errno;
use sha2::{Digest, Sha256};

use crate::erofs::format::{superblock_checksum, SuperBlock, SUPER_OFFSET, SUPER_SIZE};
use crate::output::AtomicOutput;

/// Version of the image bytes for a given input: bumped whenever the writer's output for
/// the same tree and options changes, so that older entries are never served.
pub const FORMAT_VERSION: u32 = 2;

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
pub enum Served {
    /// A copy-on-write clone: writing to OUTPUT leaves the entry alone.
    Reflink,
    /// A hard link: OUTPUT is the entry, read-only; a write to it is caught by the seal.
    HardLink,
    /// A plain copy (the cache is on another filesystem).
    Copy,
}

impl Served {
    /// A word for the summary line.
    pub fn as_str(self) -> &'static str {
        match self {
            Served::Reflink => "reflink",
            Served::HardLink => "hard link",
            Served::Copy => "copy",
        }
    }
}

/// A cache directory.
pub struct Cache {
    dir: PathBuf,
}

/// An exclusive lock on one key, held until dropped.
pub struct Lock {
    _file: File,
}

/// What a seal records about the image it was written for.
#[derive(Debug, PartialEq, Eq)]
struct Seal {
    size: u64,
    mtime: (i64, i64),
    ino: u64,
}

impl Seal {
    fn of(meta: &fs::Metadata) -> Seal {
        Seal {
            size: meta.len(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ino: meta.ino(),
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

impl Cache {
    /// Opens (creating it if needed) the cache directory `dir`.
    pub fn open(dir: &Path) -> io::Result<Cache> {
        fs::create_dir_all(dir)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", dir.display())))?;
        Ok(Cache {
            dir: dir.to_owned(),
        })
    }

    /// Where the image of `key` lives.
    pub fn image_path(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{key}.img"))
    }

    fn seal_path(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{key}.seal"))
    }

    fn lock_path(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{key}.lock"))
    }

    /// Waits for and takes the build lock of `key`.
    pub fn lock(&self, key: &str) -> io::Result<Lock> {
        let path = self.lock_path(key);
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive)?;
        Ok(Lock { _file: file })
    }

    /// Checks the entry of `key`: `Ok(None)` if there is none, `Err` with the reason if it
    /// is there but damaged, `Ok(Some(size))` if it can be served.
    pub fn check(&self, key: &str) -> Result<Option<u64>, String> {
        let image = self.image_path(key);
        let meta = match fs::symlink_metadata(&image) {
            Ok(meta) => meta,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("{}: {e}", image.display())),
        };
        let seal_path = self.seal_path(key);
        let seal =
            fs::read_to_string(&seal_path).map_err(|e| format!("{}: {e}", seal_path.display()))?;
        let seal =
            Seal::parse(&seal).ok_or_else(|| format!("{}: not a seal", seal_path.display()))?;
        if !meta.file_type().is_file() {
            return Err(format!("{} is not a regular file", image.display()));
        }
        let now = Seal::of(&meta);
        if now != seal {
            return Err(format!(
                "{} changed since it was written: now {}, sealed {}",
                image.display(),
                now.to_text().trim_end(),
                seal.to_text().trim_end()
            ));
        }
        check_superblock(&image, meta.len()).map_err(|e| format!("{}: {e}", image.display()))?;
        Ok(Some(meta.len()))
    }

    /// Records the entry of `key` as it is now: call once its image is complete. The image
    /// is made read-only first, so that a hard link to it is not writable by mistake.
    pub fn seal(&self, key: &str) -> io::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let image = self.image_path(key);
        fs::set_permissions(&image, fs::Permissions::from_mode(0o444))?;
        let meta = fs::symlink_metadata(&image)?;
        let path = self.seal_path(key);
        let mut temp = tempfile::Builder::new()
            .prefix(&format!(".{key}.seal."))
            .tempfile_in(&self.dir)?;
        temp.write_all(Seal::of(&meta).to_text().as_bytes())?;
        temp.as_file().sync_all()?;
        temp.persist(&path).map_err(|e| e.error)?;
        Ok(())
    }

    /// Marks the entry of `key` as just used, for eviction.
    pub fn touch(&self, key: &str) {
        let path = self.seal_path(key);
        let now = fs::FileTimes::new().set_modified(SystemTime::now());
        if let Err(e) = File::options()
            .write(true)
            .open(&path)
            .and_then(|f| f.set_times(now))
        {
            tracing::warn!("cannot mark {} as used: {e}", path.display());
        }
    }

    /// Makes `output` the image of `key`, replacing it atomically: a reflink where the
    /// filesystem has them, else a hard link where the cache shares the filesystem, else
    /// a copy.
    pub fn serve(&self, key: &str, output: &Path) -> io::Result<Served> {
        let image_path = self.image_path(key);
        let image = File::open(&image_path)?;
        let out = AtomicOutput::create(output)?;
        match rustix::fs::ioctl_ficlone(out.file(), &image) {
            Ok(()) => {
                out.commit()?;
                return Ok(Served::Reflink);
            }
            Err(e) => tracing::debug!("no reflink from {}: {e}", image_path.display()),
        }
        if let Some(linked) = hard_link_beside(&image_path, output)? {
            drop(out);
            linked.persist(output).map_err(|e| e.error)?;
            return Ok(Served::HardLink);
        }
        let mut image = image;
        io::copy(&mut image, &mut out.file())?;
        out.commit()?;
        Ok(Served::Copy)
    }

    /// Removes the least recently used entries, other than `keep`, until the images take
    /// at most `max_bytes`. Returns how many were removed.
    pub fn evict(&self, max_bytes: u64, keep: &str) -> io::Result<usize> {
        let mut entries = Vec::new();
        let mut total = 0u64;
        for entry in fs::read_dir(&self.dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let Some(key) = name.to_str().and_then(|n| n.strip_suffix(".img")) else {
                continue;
            };
            if key.starts_with('.') {
                continue;
            }
            let size = entry.metadata()?.len();
            total += size;
            // Entries without a seal are unused (a build that never finished): oldest.
            let used = fs::metadata(self.seal_path(key))
                .and_then(|m| m.modified())
                .unwrap_or(SystemTime::UNIX_EPOCH);
            entries.push((used, key.to_owned(), size));
        }
        entries.sort();
        let mut removed = 0;
        for (_, key, size) in entries {
            if total <= max_bytes {
                break;
            }
            if key == keep {
                continue;
            }
            // The seal goes first: an image without one is never served.
            for path in [
                self.seal_path(&key),
                self.image_path(&key),
                self.lock_path(&key),
            ] {
                if let Err(e) = fs::remove_file(&path) {
                    if e.kind() != io::ErrorKind::NotFound {
                        return Err(io::Error::new(e.kind(), format!("{}: {e}", path.display())));
                    }
                }
            }
            tracing::info!("evicted {key}.img ({size} bytes) from the cache");
            total -= size;
            removed += 1;
        }
        Ok(removed)
    }
}

/// A hard link to `image` under a temporary name beside `output`; `None` if the two are
/// on different filesystems (or the filesystem has no hard links).
fn hard_link_beside(image: &Path, output: &Path) -> io::Result<Option<tempfile::TempPath>> {
    let dir = match output.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let name = output
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "OUTPUT names no file"))?;
    let mut prefix = std::ffi::OsString::from(".");
    prefix.push(name);
    prefix.push(".");
    let made = tempfile::Builder::new()
        .prefix(&prefix)
        .suffix(".tmp")
        .make_in(dir, |path| fs::hard_link(image, path));
    match made {
        Ok(temp) => Ok(Some(temp.into_temp_path())),
        // Another filesystem, one without hard links, or too many links already.
        Err(e)
            if matches!(
                rustix::io::Errno::from_io_error(&e),
                Some(Errno::XDEV | Errno::PERM | Errno::MLINK | Errno::OPNOTSUPP)
            ) =>
        {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// Fails unless `image` starts with an erofs superblock whose checksum holds and whose
/// block count matches `size`.
fn check_superblock(image: &Path, size: u64) -> Result<(), String> {
    let mut block = vec![0u8; 4096];
    File::open(image)
        .and_then(|mut f| f.read_exact(&mut block))
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
