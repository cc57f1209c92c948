//! The erofs on-disk structures this writer emits, as typed structs.
//!
//! Only what this writer emits is described: superblock, compact and extended inodes,
//! and directory entries (the compressed files' map header and indexes are in
//! [`compress`](super::compress)). Every field is little-endian on disk; each struct encodes itself
//! explicitly so the byte layout does not depend on Rust's struct layout.

/// Byte offset of the superblock: the first 1 KiB is left for boot sectors.
pub const SUPER_OFFSET: u64 = 1024;
/// `erofs_super_block.magic`.
pub const SUPER_MAGIC: u32 = 0xE0F5_E1E2;
/// Size of the superblock without extension slots.
pub const SUPER_SIZE: usize = 128;

/// The superblock carries a crc32c of its block.
pub const FEATURE_COMPAT_SB_CHKSUM: u32 = 0x1;
/// Inodes carry their own mtime (extended inodes), not only the build time.
pub const FEATURE_COMPAT_MTIME: u32 = 0x2;

/// Inode slots are addressed in units of 32 bytes: `nid = offset / 32`.
pub const INODE_SLOT_SIZE: u64 = 32;
/// Size of [`InodeCompact`].
pub const COMPACT_INODE_SIZE: usize = 32;
/// Size of [`InodeExtended`].
pub const EXTENDED_INODE_SIZE: usize = 64;
/// Size of [`Dirent`].
pub const DIRENT_SIZE: usize = 12;
/// Longest name a directory entry may hold.
pub const NAME_MAX: usize = 255;
/// Start block of an inode that has no data blocks (mkfs.erofs writes the same).
pub const NULL_ADDR: u32 = u32::MAX;

/// How an inode's data is placed (`i_format` bits 1..=3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataLayout {
    /// All data in consecutive blocks from the start block; the last one may be partial.
    FlatPlain = 0,
    /// Compressed extents in blocks, with one legacy (8-byte) index per logical cluster
    /// after the inode; see [`compress`](super::compress).
    CompressedLegacy = 1,
    /// Whole blocks from the start block, the remainder right after the inode.
    FlatInline = 2,
}

/// The inode format version (`i_format` bit 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InodeVersion {
    /// [`InodeCompact`], 32 bytes.
    Compact = 0,
    /// [`InodeExtended`], 64 bytes.
    Extended = 1,
}

impl InodeVersion {
    /// On-disk size of an inode of this version.
    pub fn size(self) -> usize {
        match self {
            InodeVersion::Compact => COMPACT_INODE_SIZE,
            InodeVersion::Extended => EXTENDED_INODE_SIZE,
        }
    }
}

/// `i_format` of an uncompressed inode without xattrs.
pub fn i_format(version: InodeVersion, layout: DataLayout) -> u16 {
    version as u16 | (layout as u16) << 1
}

/// File type bits of `i_mode`, as in `stat(2)`.
pub mod mode {
    /// Directory.
    pub const S_IFDIR: u16 = 0o040000;
    /// Regular file.
    pub const S_IFREG: u16 = 0o100000;
    /// Symbolic link.
    pub const S_IFLNK: u16 = 0o120000;
    /// Character device.
    pub const S_IFCHR: u16 = 0o020000;
    /// Block device.
    pub const S_IFBLK: u16 = 0o060000;
    /// Named pipe.
    pub const S_IFIFO: u16 = 0o010000;
    /// Unix socket.
    pub const S_IFSOCK: u16 = 0o140000;
    /// Permission bits, including setuid, setgid and sticky.
    pub const PERMISSIONS: u16 = 0o7777;
}

/// `erofs_dirent.file_type` values (the kernel's generic `FT_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileType {
    /// `FT_REG_FILE`.
    Regular = 1,
    /// `FT_DIR`.
    Directory = 2,
    /// `FT_CHRDEV`.
    CharDevice = 3,
    /// `FT_BLKDEV`.
    BlockDevice = 4,
    /// `FT_FIFO`.
    Fifo = 5,
    /// `FT_SOCK`.
    Socket = 6,
    /// `FT_SYMLINK`.
    Symlink = 7,
}

/// `struct erofs_super_block` (128 bytes at [`SUPER_OFFSET`]), the fields this writer sets.
///
/// Everything not listed (xattrs, compression, extra devices, packed inode) stays zero.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SuperBlock {
    /// crc32c of the superblock's block, see [`superblock_checksum`].
    pub checksum: u32,
    /// `EROFS_FEATURE_COMPAT_*` bits.
    pub feature_compat: u32,
    /// log2 of the block size.
    pub blkszbits: u8,
    /// nid of the root directory; 16 bits, so the root must come early in the metadata.
    pub root_nid: u16,
    /// Number of inodes.
    pub inos: u64,
    /// mtime of every compact inode, seconds (newer kernels call it `epoch`).
    pub build_time: u64,
    /// Nanoseconds of the compact inodes' mtime.
    pub build_time_nsec: u32,
    /// Image size in blocks.
    pub blocks: u32,
    /// Block where nid 0 lives.
    pub meta_blkaddr: u32,
    /// Volume UUID.
    pub uuid: [u8; 16],
    /// Volume label, NUL-padded.
    pub volume_name: [u8; 16],
    /// `EROFS_FEATURE_INCOMPAT_*` bits: a kernel that lacks one refuses the image.
    pub feature_incompat: u32,
}

impl SuperBlock {
    /// The on-disk bytes.
    pub fn to_bytes(&self) -> [u8; SUPER_SIZE] {
        let mut b = [0u8; SUPER_SIZE];
        put_u32(&mut b, 0, SUPER_MAGIC);
        put_u32(&mut b, 4, self.checksum);
        put_u32(&mut b, 8, self.feature_compat);
        b[12] = self.blkszbits;
        // b[13]: sb_extslots, none
        put_u16(&mut b, 14, self.root_nid);
        put_u64(&mut b, 16, self.inos);
        put_u64(&mut b, 24, self.build_time);
        put_u32(&mut b, 32, self.build_time_nsec);
        put_u32(&mut b, 36, self.blocks);
        put_u32(&mut b, 40, self.meta_blkaddr);
        // 44: xattr_blkaddr, no shared xattrs
        b[48..64].copy_from_slice(&self.uuid);
        b[64..80].copy_from_slice(&self.volume_name);
        put_u32(&mut b, 80, self.feature_incompat);
        // 84..: lz4_max_distance (0: LZ4's 64 KiB window) and the device and xattr
        // fields, all unused
        b
    }

    /// Parses the bytes written by [`SuperBlock::to_bytes`]; `None` without the magic.
    pub fn from_bytes(b: &[u8; SUPER_SIZE]) -> Option<SuperBlock> {
        if get_u32(b, 0) != SUPER_MAGIC {
            return None;
        }
        Some(SuperBlock {
            checksum: get_u32(b, 4),
            feature_compat: get_u32(b, 8),
            blkszbits: b[12],
            root_nid: get_u16(b, 14),
            inos: get_u64(b, 16),
            build_time: get_u64(b, 24),
            build_time_nsec: get_u32(b, 32),
            blocks: get_u32(b, 36),
            meta_blkaddr: get_u32(b, 40),
            uuid: b[48..64].try_into().unwrap(),
            volume_name: b[64..80].try_into().unwrap(),
            feature_incompat: get_u32(b, 80),
        })
    }
}

/// The superblock checksum as the kernel verifies it: crc32c seeded with `!0` and without
/// the final inversion, over the superblock's block from [`SUPER_OFFSET`] to its end, with
/// the checksum field zeroed.
///
/// `block` is the whole first block of the image.
pub fn superblock_checksum(block: &[u8]) -> u32 {
    let start = SUPER_OFFSET as usize;
    let mut crc = crc32c_update(!0, &block[start..start + 4]);
    crc = crc32c_update(crc, &[0; 4]);
    crc32c_update(crc, &block[start + 8..])
}

/// Raw crc32c (Castagnoli, reflected) register update, without pre- or post-inversion,
/// matching the kernel's `crc32c(seed, data, len)`.
pub fn crc32c_update(mut crc: u32, data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = crc32c_table();
    for &byte in data {
        crc = TABLE[((crc ^ byte as u32) & 0xff) as usize] ^ (crc >> 8);
    }
    crc
}

const fn crc32c_table() -> [u32; 256] {
    const POLY: u32 = 0x82F6_3B78;
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = i as u32;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ POLY
            } else {
                crc >> 1
            };
            bit += 1;
        }
        table[i] = crc;
        i += 1;
    }
    table
}

/// `struct erofs_inode_compact`: 32 bytes, mtime taken from the superblock.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InodeCompact {
    /// See [`i_format`].
    pub format: u16,
    /// Type and permission bits.
    pub mode: u16,
    /// Link count.
    pub nlink: u16,
    /// Size in bytes.
    pub size: u32,
    /// Start block (files, directories, symlinks) or device number (devices).
    pub u: u32,
    /// Inode number for 32-bit `stat`.
    pub ino: u32,
    /// Owner.
    pub uid: u16,
    /// Group.
    pub gid: u16,
}

impl InodeCompact {
    /// The on-disk bytes.
    pub fn to_bytes(&self) -> [u8; COMPACT_INODE_SIZE] {
        let mut b = [0u8; COMPACT_INODE_SIZE];
        put_u16(&mut b, 0, self.format);
        // 2: i_xattr_icount, no xattrs
        put_u16(&mut b, 4, self.mode);
        put_u16(&mut b, 6, self.nlink);
        put_u32(&mut b, 8, self.size);
        // 12: mtime offset from build_time on newer kernels; 0 keeps older readers exact
        put_u32(&mut b, 16, self.u);
        put_u32(&mut b, 20, self.ino);
        put_u16(&mut b, 24, self.uid);
        put_u16(&mut b, 26, self.gid);
        b
    }
}

/// `struct erofs_inode_extended`: 64 bytes, with 64-bit size, 32-bit ids and its own mtime.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InodeExtended {
    /// See [`i_format`].
    pub format: u16,
    /// Type and permission bits.
    pub mode: u16,
    /// Size in bytes.
    pub size: u64,
    /// Start block (files, directories, symlinks) or device number (devices).
    pub u: u32,
    /// Inode number for 32-bit `stat`.
    pub ino: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modification time, seconds since the epoch.
    pub mtime: i64,
    /// Nanoseconds of the modification time.
    pub mtime_nsec: u32,
    /// Link count.
    pub nlink: u32,
}

impl InodeExtended {
    /// The on-disk bytes.
    pub fn to_bytes(&self) -> [u8; EXTENDED_INODE_SIZE] {
        let mut b = [0u8; EXTENDED_INODE_SIZE];
        put_u16(&mut b, 0, self.format);
        put_u16(&mut b, 4, self.mode);
        put_u64(&mut b, 8, self.size);
        put_u32(&mut b, 16, self.u);
        put_u32(&mut b, 20, self.ino);
        put_u32(&mut b, 24, self.uid);
        put_u32(&mut b, 28, self.gid);
        put_u64(&mut b, 32, self.mtime as u64);
        put_u32(&mut b, 40, self.mtime_nsec);
        put_u32(&mut b, 44, self.nlink);
        b
    }
}

/// `struct erofs_dirent`: one entry of a directory block; its name lives at `nameoff`
/// in the same block and ends where the next entry's name starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dirent {
    /// nid of the target inode.
    pub nid: u64,
    /// Offset of the name within the directory block.
    pub nameoff: u16,
    /// Type of the target.
    pub file_type: FileType,
}

impl Dirent {
    /// The on-disk bytes.
    pub fn to_bytes(&self) -> [u8; DIRENT_SIZE] {
        let mut b = [0u8; DIRENT_SIZE];
        put_u64(&mut b, 0, self.nid);
        put_u16(&mut b, 8, self.nameoff);
        b[10] = self.file_type as u8;
        b
    }
}

fn put_u16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_le_bytes());
}

fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

fn get_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(b[at..at + 2].try_into().unwrap())
}

fn get_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn get_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_check_value() {
        // The catalogued CRC-32C check value of "123456789", after the final inversion.
        assert_eq!(!crc32c_update(!0, b"123456789"), 0xE306_9283);
    }

    #[test]
    fn struct_sizes_and_offsets() {
        let sb = SuperBlock {
            root_nid: 0x1234,
            blocks: 7,
            uuid: [9; 16],
            ..Default::default()
        };
        let bytes = sb.to_bytes();
        assert_eq!(&bytes[0..4], &SUPER_MAGIC.to_le_bytes());
        assert_eq!(SuperBlock::from_bytes(&bytes), Some(sb));

        let ext = InodeExtended {
            format: i_format(InodeVersion::Extended, DataLayout::FlatInline),
            mode: 0o100644,
            size: 1 << 33,
            u: 5,
            ino: 6,
            uid: 70000,
            gid: 80000,
            mtime: -1,
            mtime_nsec: 7,
            nlink: 3,
        };
        let b = ext.to_bytes();
        assert_eq!(b[0], 5);
        assert_eq!(&b[8..16], &(1u64 << 33).to_le_bytes());
        assert_eq!(&b[32..40], &[0xff; 8]);
        assert_eq!(&b[44..48], &3u32.to_le_bytes());

        let de = Dirent {
            nid: 36,
            nameoff: 24,
            file_type: FileType::Directory,
        };
        assert_eq!(de.to_bytes(), [36, 0, 0, 0, 0, 0, 0, 0, 24, 0, 2, 0]);
    }
}
