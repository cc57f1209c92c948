//! Read-only mappings of host files, for serving large reads without passthrough.
//!
//! A read answered with `pread` copies every byte twice before the client sees it: from the
//! host page cache into the daemon's buffer, then from that buffer into the FUSE page cache.
//! Replying from a shared mapping of the host file lets the kernel copy straight from the
//! host page cache when it takes the reply, which halves the copying.
//!
//! The daemon itself never touches the mapped memory: only the kernel reads it, while
//! copying the reply. So a host file truncated behind the mapping cannot raise `SIGBUS` in
//! the daemon; the kernel fails that reply (`EFAULT` to the daemon) and the client's read
//! fails with `EIO`, which is the truth about such a file.

use std::os::fd::BorrowedFd;
use std::ptr::NonNull;

use rustix::io::Errno;
use rustix::mm::{mmap, munmap, Advice, MapFlags, ProtFlags};

/// A shared, read-only mapping of a whole host file, as long as it was when mapped.
#[derive(Debug)]
pub struct FileMapping {
    base: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is read-only and never written through; the pointer is only handed
// to the kernel as the source of replies, from any thread.
unsafe impl Send for FileMapping {}
// SAFETY: as above; shared references only produce read-only slices.
unsafe impl Sync for FileMapping {}

impl FileMapping {
    /// Maps the `len` first bytes of `fd` (its size when opened). `len` must be non-zero.
    pub fn new(fd: BorrowedFd<'_>, len: u64) -> Result<Self, Errno> {
        let len = usize::try_from(len).map_err(|_| Errno::FBIG)?;
        if len == 0 {
            return Err(Errno::INVAL);
        }
        // SAFETY: a fresh mapping chosen by the kernel: no existing memory is affected.
        let base = unsafe {
            mmap(
                std::ptr::null_mut(),
                len,
                ProtFlags::READ,
                MapFlags::SHARED,
                fd,
                0,
            )?
        };
        let base = NonNull::new(base.cast::<u8>()).ok_or(Errno::NOMEM)?;
        Ok(FileMapping { base, len })
    }

    /// The range of the mapping a read of `size` bytes at `offset` covers: shorter at the
    /// end of the mapping, empty past it.
    fn range(&self, offset: u64, size: usize) -> std::ops::Range<usize> {
        let start = usize::try_from(offset).unwrap_or(usize::MAX).min(self.len);
        let end = start.saturating_add(size).min(self.len);
        start..end
    }

    /// Replies to a read of `size` bytes at `offset` straight from the mapping.
    ///
    /// The only way to the mapped bytes: they go to the kernel as the reply, never to the
    /// daemon's own code, which could not survive reading a page the host truncated (see
    /// the module documentation).
    pub fn reply(&self, offset: u64, size: usize, reply: fuser::ReplyData) {
        let range = self.range(offset, size);
        // Ask for the window's pages to be read in now, in the background, if they are not
        // cached; only a hint, so its failure does not matter.
        if !range.is_empty() {
            let page = rustix::param::page_size();
            let aligned = range.start - range.start % page;
            // SAFETY: the range lies inside this mapping; WILLNEED changes no contents.
            let _ = unsafe {
                rustix::mm::madvise(
                    self.base.as_ptr().add(aligned).cast(),
                    range.end - aligned,
                    Advice::WillNeed,
                )
            };
        }
        // SAFETY: the range lies inside the live mapping, which outlives this call; the
        // slice goes to the kernel only, which copies it while `self` is borrowed.
        let bytes =
            unsafe { std::slice::from_raw_parts(self.base.as_ptr().add(range.start), range.len()) };
        reply.data(bytes);
    }
}

impl Drop for FileMapping {
    fn drop(&mut self) {
        // SAFETY: the mapping was made by `new` with this length and is unmapped only here;
        // no slice of it outlives `self`.
        if let Err(e) = unsafe { munmap(self.base.as_ptr().cast(), self.len) } {
            tracing::warn!("munmap of a file mapping failed: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsFd;

    #[test]
    fn ranges_are_clamped_to_the_mapped_length() {
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&[7u8; 10_000]).unwrap();
        let map = FileMapping::new(file.as_fd(), 10_000).unwrap();
        assert_eq!(map.range(0, 100), 0..100);
        assert_eq!(map.range(9_990, 100), 9_990..10_000);
        assert_eq!(map.range(10_000, 100), 10_000..10_000);
        assert_eq!(map.range(u64::MAX, 100), 10_000..10_000);
        assert_eq!(map.range(5, usize::MAX), 5..10_000);
    }

    #[test]
    fn empty_files_are_not_mapped() {
        let file = tempfile::tempfile().unwrap();
        assert_eq!(FileMapping::new(file.as_fd(), 0).unwrap_err(), Errno::INVAL);
    }
}
