//! Writing OUTPUT so that it is either the complete image or untouched.
//!
//! The image is written to a temporary file beside OUTPUT and renamed over it only once it
//! is complete and on disk. Any failure drops the temporary file; SIGINT and SIGTERM remove
//! it before the process exits, since a signal would otherwise skip every destructor.
//!
//! A block device is the exception: it is written in place (a rename would replace the
//! device node with a file), opened exclusively so that a mounted device is refused, and
//! the writer checks its size before writing.

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt, PermissionsExt};
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
        let dir = parent_dir(target);
        let name = target
            .file_name()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "OUTPUT names no file"))?;
        let mut prefix = std::ffi::OsString::from(".");
        prefix.push(name);
        prefix.push(".");
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
        // Still watched during the rename: a signal before it removes the temporary file, a
        // signal after it finds that name gone.
        temp.persist(&target).map_err(|e| e.error)?;
        drop(watched);
        // The rename is only durable once the directory holding it is on disk too.
        File::open(parent_dir(&target))?.sync_all()
    }
}

/// The directory `target` is in.
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
        let signals = nixstorefs::daemon::block_signals();
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
