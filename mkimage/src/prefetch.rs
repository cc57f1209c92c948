//! Reading ahead of the writer, in parallel.
//!
//! The writer copies file contents one file at a time, in image order, which is right for
//! the output (large sequential writes) but leaves a cold store waiting on one read at a
//! time. A few threads open the files ahead of it and ask the kernel to read them into
//! the page cache (`POSIX_FADV_WILLNEED`), so that by the time the writer copies a file,
//! its pages are there, fetched concurrently.

use std::num::NonZeroU64;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::erofs::{FileSource, Inode, InodeKind, OpenFile};

/// How far ahead of the writer the read-ahead may run: enough to keep several reads in
/// flight, little enough that the pages are still cached when the writer gets there.
const AHEAD_BYTES: u64 = 512 << 20;

/// Read-ahead threads; they stop when dropped.
pub struct Prefetch {
    stop: Arc<AtomicBool>,
    written: Arc<AtomicU64>,
    threads: Vec<JoinHandle<()>>,
}

impl Prefetch {
    /// Starts `threads` threads reading ahead the regular files of `inodes`, in order.
    pub fn start(inodes: &[Inode], threads: usize) -> Prefetch {
        let files: Arc<Vec<(Arc<dyn OpenFile>, u64)>> = Arc::new(
            inodes
                .iter()
                .filter_map(|i| match &i.kind {
                    InodeKind::RegularFile {
                        size,
                        source: FileSource::Open(opener),
                    } if *size > 0 => Some((opener.clone(), *size)),
                    _ => None,
                })
                .collect(),
        );
        let stop = Arc::new(AtomicBool::new(false));
        let written = Arc::new(AtomicU64::new(0));
        let next = Arc::new(AtomicUsize::new(0));
        let requested = Arc::new(AtomicU64::new(0));
        let threads = (0..threads)
            .map(|_| {
                let (files, stop, written, next, requested) = (
                    files.clone(),
                    stop.clone(),
                    written.clone(),
                    next.clone(),
                    requested.clone(),
                );
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        if requested.load(Ordering::Relaxed)
                            > written.load(Ordering::Relaxed) + AHEAD_BYTES
                        {
                            std::thread::sleep(Duration::from_millis(5));
                            continue;
                        }
                        let Some((opener, size)) = files.get(next.fetch_add(1, Ordering::Relaxed))
                        else {
                            return;
                        };
                        requested.fetch_add(*size, Ordering::Relaxed);
                        // Only a hint: a file that cannot be opened now fails later, in the
                        // writer, with its name.
                        if let Ok(fd) = opener.open() {
                            let _ = rustix::fs::fadvise(
                                &fd,
                                0,
                                NonZeroU64::new(*size),
                                rustix::fs::Advice::WillNeed,
                            );
                        }
                    }
                })
            })
            .collect();
        Prefetch {
            stop,
            written,
            threads,
        }
    }

    /// Tells the read-ahead how far the writer has got (bytes of file data).
    pub fn written(&self, bytes: u64) {
        self.written.store(bytes, Ordering::Relaxed);
    }
}

impl Drop for Prefetch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
