//! The layout of images meant for DAX: a guest maps the image as persistent memory
//! (qemu's virtio-pmem over the image file) and mounts it with `-o dax=always`, so that
//! file reads and mappings go straight to the host's page cache, shared by every guest.
//!
//! erofs serves a file through DAX only when its data is plain blocks
//! ([`DataLayout::FlatPlain`](super::format::DataLayout::FlatPlain), or chunk-based, which
//! this writer does not emit): a file with an inline tail, or a compressed one, is read
//! through the guest's own page cache instead. And qemu maps the image into the guest as
//! a memory device, which memory hot-plug wants in whole 2 MiB sections
//! (`memory-backend-file ... align=2M`).

/// A DAX image's size is a multiple of this: qemu's `align=2M` for the memory backend,
/// and the section size the guest's memory hot-plug adds memory in.
pub const DAX_IMAGE_ALIGN: u64 = 2 << 20;

/// Regular files of at least this many bytes are laid out plain in a DAX image: all
/// their data in whole blocks, none inline after the inode.
///
/// One page, which is also the block size. Laid out plain, a smaller file would take a
/// whole block of the image where inline it shares a metadata block with its inode and
/// its neighbours'; a closure holds tens of thousands of such files (scripts, headers,
/// `.pc` files), so the image, which is stored, copied and mapped whole into every guest,
/// would grow by up to a block for each, to save at most a page of guest cache for each
/// one a guest reads. From a page on, the last block's padding is smaller than the file,
/// and such files are the ones worth mapping from the host: libraries and executables.
pub const DAX_MIN_FILE_SIZE: u64 = 4096;

/// Whether a regular file of `size` bytes keeps its partial last block out of the
/// metadata area in a DAX image: every file of [`DAX_MIN_FILE_SIZE`] bytes or more does.
pub(crate) fn laid_out_plain(size: u64) -> bool {
    size >= DAX_MIN_FILE_SIZE
}

/// The blocks of a DAX image whose contents take `used` blocks of `block` bytes: padded
/// up to a multiple of [`DAX_IMAGE_ALIGN`].
pub(crate) fn padded_blocks(used: u64, block: u64) -> u64 {
    debug_assert_eq!(DAX_IMAGE_ALIGN % block, 0);
    used.next_multiple_of(DAX_IMAGE_ALIGN / block)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_of_a_page_or_more_are_plain() {
        for size in [0, 1, 100, 4064, 4095] {
            assert!(!laid_out_plain(size), "{size}");
        }
        for size in [4096, 4097, 8191, 8192, 3 * 4096 + 1, 5 << 30] {
            assert!(laid_out_plain(size), "{size}");
        }
    }

    #[test]
    fn images_are_padded_to_2_mib() {
        const BLOCK: u64 = 4096;
        // 512 blocks of 4 KiB in 2 MiB.
        let cases = [
            (1, 512),
            (2, 512),
            (511, 512),
            (512, 512),
            (513, 1024),
            (1537, 2048),
        ];
        for (used, padded) in cases {
            assert_eq!(padded_blocks(used, BLOCK), padded, "{used} blocks");
            assert_eq!(padded_blocks(used, BLOCK) * BLOCK % DAX_IMAGE_ALIGN, 0);
        }
    }
}
