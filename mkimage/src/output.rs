//! Writing OUTPUT so that it is either the complete image or untouched.
//!
//! The image is written to a temporary file beside OUTPUT and renamed over it only once it
//! is complete and on disk. Any failure drops the temporary file; SIGINT and SIGTERM remove
//! it before the process exits, since a signal would otherwise skip every destructor.
//!
//! A block device is the exception: it is written in place (a rename would replace the
//! device node with a file, or a symlink to it, and leave the device unwritten), opened
//! exclusively so that a mounted device is refused; its size is checked before a byte is
//! written, and its first block, which holds the superblock, is written last.

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use parking_lot::Mutex;
use tempfile::NamedTempFile;

/// The temporary file to remove if a signal ends the process.
static PENDING: Mutex<Option<PathBuf>> = Mutex::new(None);

/// A temporary file that becomes OUTPUT on [`AtomicOutput::commit`], or the block device
/// OUTPUT names.
pub struct AtomicOutput {
    target: Target,
}

enum Target {
    Temp {
        temp: NamedTempFile,
        path: PathBuf,
        _watched: Watched,
    },
    Device(File),
}

/// Registers a temporary file for removal on a signal while it exists.
struct Watched(PathBuf);

/// A temporary file that SIGINT or SIGTERM removes before the process exits, from
/// [`RemoveOnSignal::new`] until dropped. Only one is watched at a time: a later one
/// replaces an earlier one.
pub struct RemoveOnSignal(#[allow(dead_code)] Watched);

impl RemoveOnSignal {
    /// Watches `path`; call before the file is created, so that no signal arrives between
    /// its creation and its registration.
    pub fn new(path: &Path) -> RemoveOnSignal {
        watch_signals();
        *PENDING.lock() = Some(path.to_owned());
        RemoveOnSignal(Watched(path.to_owned()))
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        // The NamedTempFile removes itself (unless persisted); stop watching its name.
        let mut pending = PENDING.lock();
        if pending.as_deref() == Some(self.0.as_path()) {
            *pending = None;
        }
    }
}

impl AtomicOutput {
    /// Opens a block device `target` for writing in place; otherwise creates the temporary
    /// file beside `target` (same filesystem, so the final rename is atomic) and arranges
    /// for signals to remove it. Any other kind of existing file (a character device, a
    /// FIFO, a directory) is refused with [`io::ErrorKind::InvalidInput`] rather than
    /// replaced.
    pub fn create(target: &Path) -> io::Result<Self> {
        match std::fs::metadata(target) {
            Ok(meta) if meta.file_type().is_block_device() => {
                // O_EXCL on a block device: fails with EBUSY while it is mounted or held.
                let device = std::fs::OpenOptions::new()
                    .write(true)
                    .custom_flags(rustix::fs::OFlags::EXCL.bits() as i32)
                    .open(target)?;
                return Ok(AtomicOutput {
                    target: Target::Device(device),
                });
            }
            Ok(meta) if !meta.is_file() => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "exists and is neither a regular file nor a block device",
                ));
            }
            _ => {}
        }
        let (dir, prefix) = temp_beside(target)?;
        // Signals are taken before the file exists: one arriving right after it is created
        // must find it registered, not end the process with the file left behind.
        watch_signals();
        let mut pending = PENDING.lock();
        let temp = tempfile::Builder::new()
            .prefix(&prefix)
            .suffix(".tmp")
            .tempfile_in(dir)?;
        *pending = Some(temp.path().to_owned());
        drop(pending);
        Ok(AtomicOutput {
            target: Target::Temp {
                _watched: Watched(temp.path().to_owned()),
                temp,
                path: target.to_owned(),
            },
        })
    }

    /// Whether OUTPUT is a block device, written in place.
    pub fn is_device(&self) -> bool {
        matches!(self.target, Target::Device(_))
    }

    /// The file to write the image into.
    pub fn file(&self) -> &File {
        match &self.target {
            Target::Temp { temp, .. } => temp.as_file(),
            Target::Device(device) => device,
        }
    }

    /// Flushes the image to disk and renames it to OUTPUT (a block device: flushes it).
    pub fn commit(self) -> io::Result<()> {
        let (temp, target, watched) = match self.target {
            Target::Device(device) => return device.sync_all(),
            Target::Temp {
                temp,
                path,
                _watched,
            } => (temp, path, _watched),
        };
        let file = temp.as_file();
        // Readable like any other output of a tool run with the usual umask.
        file.set_permissions(std::fs::Permissions::from_mode(0o644))?;
        file.sync_all()?;
        refuse_device(&target)?;
        // Still watched during the rename: a signal before it removes the temporary file, a
        // signal after it finds that name gone.
        temp.persist(&target).map_err(|e| e.error)?;
        drop(watched);
        // The rename is only durable once the directory holding it is on disk too.
        File::open(parent_dir(&target))?.sync_all()
    }
}

/// Fails if `target` resolves to a block device (through symlinks too): a rename or a hard
/// link there would replace the device's name and leave the device unwritten. Checked
/// once more right before a rename, for a device that appeared since OUTPUT was opened.
pub fn refuse_device(target: &Path) -> io::Result<()> {
    match std::fs::metadata(target) {
        Ok(meta) if meta.file_type().is_block_device() => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "became a block device while the image was written; not replacing it",
        )),
        _ => Ok(()),
    }
}

/// Copies the image of `size` bytes in `src` to `out` from offset 0, in the order a block
/// device needs: its size checked before a byte is written, then block 0 cleared (so
/// that until the end the device does not look like an image, nor like the one it held),
/// the rest, and block 0, with the superblock, last.
pub fn copy_image(src: &File, size: u64, out: &File) -> io::Result<()> {
    const HEAD: u64 = 4096;
    if out.metadata()?.file_type().is_block_device() {
        let room = rustix::fs::seek(out, rustix::fs::SeekFrom::End(0))?;
        if room < size {
            return Err(io::Error::new(
                io::ErrorKind::StorageFull,
                format!("the image needs {size} bytes, the device has {room}"),
            ));
        }
    }
    let head_len = size.min(HEAD) as usize;
    out.write_all_at(&vec![0u8; head_len], 0)?;
    let mut buffer = vec![0u8; 1 << 20];
    let mut at = head_len as u64;
    while at < size {
        let n = buffer.len().min((size - at) as usize);
        src.read_exact_at(&mut buffer[..n], at)
            .map_err(|e| io::Error::new(e.kind(), format!("reading the image at {at}: {e}")))?;
        out.write_all_at(&buffer[..n], at)?;
        at += n as u64;
    }
    let mut head = vec![0u8; head_len];
    src.read_exact_at(&mut head, 0)
        .map_err(|e| io::Error::new(e.kind(), format!("reading the image's first block: {e}")))?;
    out.write_all_at(&head, 0)?;
    if out.metadata()?.file_type().is_file() {
        out.set_len(size)?;
    }
    Ok(())
}

/// The directory `target` is in.
/// Where a temporary file for `target` goes: its directory (the same filesystem, so
/// that a rename or link into place is atomic), and the name prefix `.NAME.` that shows
/// whose it is.
pub(crate) fn temp_beside(target: &Path) -> io::Result<(&Path, std::ffi::OsString)> {
    let name = target
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "OUTPUT names no file"))?;
    let mut prefix = std::ffi::OsString::from(".");
    prefix.push(name);
    prefix.push(".");
    Ok((parent_dir(target), prefix))
}

fn parent_dir(target: &Path) -> &Path {
    match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Starts, once, a thread that takes SIGINT and SIGTERM: it removes the pending temporary
/// file and exits with the conventional status (128 + signal).
fn watch_signals() {
    static STARTED: std::sync::Once = std::sync::Once::new();
    STARTED.call_once(|| {
        let signals = nixstorefs_cli::block_signals();
        let spawned = std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                let sig = signals.wait();
                if let Some(path) = PENDING.lock().take() {
                    let _ = std::fs::remove_file(&path);
                    eprintln!(
                        "mkimage: interrupted; removed the partial image {}",
                        path.display()
                    );
                }
                std::process::exit(128 + sig);
            });
        if let Err(e) = spawned {
            tracing::warn!("cannot watch for signals: {e}");
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temporary_files_go_beside_their_target() {
        let (dir, prefix) = temp_beside(Path::new("/srv/vm/store.img")).unwrap();
        assert_eq!(
            (dir, prefix.as_os_str()),
            (Path::new("/srv/vm"), ".store.img.".as_ref())
        );
        let (dir, prefix) = temp_beside(Path::new("store.img")).unwrap();
        assert_eq!(
            (dir, prefix.as_os_str()),
            (Path::new("."), ".store.img.".as_ref())
        );
        let e = temp_beside(Path::new("/")).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    }
}
