//! Which tails are inlined: the one rule for plain files (their partial last block after
//! the inode) and compressed ones (their last extent after the indexes, `ztailpacking`).

/// Whether a tail of `tail` bytes may follow `before` bytes of metadata (an inode, and a
/// compressed file's map header and indexes) in the metadata area.
///
/// The kernel reads an inline tail from one block, so it must not cross a block boundary.
/// A unit of metadata that fits a block never does (the packer keeps it inside one); a
/// larger one starts a block, so what follows it lies `before % block` bytes into its last
/// block. As mkfs.erofs does, only a tail shorter than a block is inlined: a whole block
/// stays a block, even where the metadata ends exactly on a block boundary and it would
/// fit after it.
pub(crate) fn tail_fits(before: u64, tail: u64, block: u64) -> bool {
    tail > 0 && tail < block && (before + tail <= block || before % block + tail <= block)
}

/// Bytes of a plain file of `size` bytes kept right after its inode of `inode_size`
/// bytes: its partial last block when that fits, else none.
pub(crate) fn plain_inline_len(size: u64, block: u64, inode_size: u64) -> u64 {
    let tail = size % block;
    if tail_fits(inode_size, tail, block) {
        tail
    } else {
        0
    }
}

/// Blocks a plain file of `size` bytes takes, its tail inlined where it fits beside an
/// inode of `inode_size` bytes.
pub(crate) fn plain_blocks(size: u64, block: u64, inode_size: u64) -> u64 {
    (size - plain_inline_len(size, block, inode_size)).div_ceil(block)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BLOCK: u64 = 4096;

    #[test]
    fn plain_tails_are_inlined_when_they_fit_beside_the_inode() {
        // (size, inode size) -> (inline bytes, blocks)
        let cases = [
            ((0, 32), (0, 0)),
            ((1, 32), (1, 0)),
            // A 32-byte inode and 4064 bytes fill a block exactly.
            ((4064, 32), (4064, 0)),
            ((4065, 32), (0, 1)),
            ((4032, 64), (4032, 0)),
            ((4033, 64), (0, 1)),
            ((4096, 32), (0, 1)),
            ((4097, 32), (1, 1)),
            ((3 * 4096 + 1, 64), (1, 3)),
            ((3 * 4096 + 4064, 32), (4064, 3)),
            ((3 * 4096 + 4065, 32), (0, 4)),
        ];
        for ((size, inode), expected) in cases {
            let got = (
                plain_inline_len(size, BLOCK, inode),
                plain_blocks(size, BLOCK, inode),
            );
            assert_eq!(got, expected, "size {size}, inode {inode}");
        }
    }

    /// A compact inode (32 bytes), the 16-byte map header and 506 indexes end exactly on
    /// a block boundary: a 4096-byte tail would fit after them, but is not inlined.
    #[test]
    fn only_tails_shorter_than_a_block_are_inlined() {
        let before = 32 + 16 + 8 * 506;
        assert_eq!(before % BLOCK, 0);
        assert!(!tail_fits(before, 4096, BLOCK));
        assert!(tail_fits(before, 4095, BLOCK));
        assert!(tail_fits(before, 1, BLOCK));
        assert!(!tail_fits(before, 0, BLOCK));
    }

    #[test]
    fn a_tail_never_crosses_a_block() {
        // Metadata within a block: the tail must fit in what is left of it.
        assert!(tail_fits(32 + 16 + 8 * 3, 4000, BLOCK));
        assert!(!tail_fits(32 + 16 + 8 * 3, 4096 - 72 + 1, BLOCK));
        // Metadata over a block: it starts a block, the tail follows in its last block.
        let before = BLOCK + 100;
        assert!(tail_fits(before, BLOCK - 100, BLOCK));
        assert!(!tail_fits(before, BLOCK - 99, BLOCK));
    }
}
