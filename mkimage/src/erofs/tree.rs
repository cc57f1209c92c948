//! The input of the writer: a tree of inodes held in an arena, and the image options.

use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;

/// One inode of the tree to write.
///
/// Inodes live in an arena (`Vec<Inode>`) and refer to each other by index; index 0 is the
/// root directory. An index that appears in several directories is a hard link: it is
/// written once and every entry points at it.
#[derive(Debug)]
pub struct Inode {
    /// What the inode is, with its contents.
    pub kind: InodeKind,
    /// Permission bits, setuid, setgid and sticky included; no file type bits.
    pub mode: u16,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modification time, seconds since the epoch.
    pub mtime: i64,
    /// Nanoseconds of the modification time (below 1e9).
    pub mtime_nsec: u32,
    /// Link count to record; `None` lets the writer count it: 2 plus the subdirectories for
    /// a directory, the number of entries pointing at it for anything else.
    pub nlink_hint: Option<u32>,
}

/// The kind of an [`Inode`] and what it holds.
#[derive(Debug)]
pub enum InodeKind {
    /// A directory: names and the arena indices they point at, in any order. Names are
    /// 1..=255 bytes without `/` or NUL, and not `.` or `..`: the writer adds those.
    Directory {
        /// `(name, child inode index)` pairs.
        entries: Vec<(Vec<u8>, usize)>,
    },
    /// A regular file of `size` bytes read from `source` while the image is written.
    RegularFile {
        /// Size in bytes; the source must have exactly this size when it is read.
        size: u64,
        /// Where the contents come from.
        source: FileSource,
    },
    /// A symbolic link to `target` (1..=4095 bytes, no NUL).
    Symlink {
        /// The link's contents.
        target: Vec<u8>,
    },
    /// A character device; `rdev` is the device number as `stat` reports it (Linux's
    /// encoding: minor low byte, major in bits 8..20, the rest of the minor above).
    CharDevice {
        /// Device number.
        rdev: u32,
    },
    /// A block device; `rdev` as for [`InodeKind::CharDevice`].
    BlockDevice {
        /// Device number.
        rdev: u32,
    },
    /// A named pipe.
    Fifo,
    /// A Unix domain socket.
    Socket,
}

/// Where a regular file's contents come from.
#[derive(Debug)]
pub enum FileSource {
    /// The contents themselves.
    Bytes(Vec<u8>),
    /// An open regular file; bytes `[0, size)` are read with positioned reads, so the
    /// descriptor's file offset is neither used nor moved.
    Fd(Arc<OwnedFd>),
    /// A regular file opened when its contents are written.
    Path(PathBuf),
    /// A regular file opened by the caller's code when its contents are written: a source
    /// that must be reached some other way than by path, such as through a closure view.
    Open(Arc<dyn OpenFile>),
}

/// Opens a regular file's contents for [`FileSource::Open`]; called once, while writing.
pub trait OpenFile: std::fmt::Debug + Send + Sync {
    /// A descriptor readable with positioned reads from offset 0.
    fn open(&self) -> std::io::Result<OwnedFd>;
}

/// Image-wide settings.
#[derive(Clone, Debug)]
pub struct ImageOptions {
    /// Volume UUID.
    pub uuid: [u8; 16],
    /// Volume label, at most 15 bytes (the superblock keeps a NUL after it).
    pub label: String,
    /// The superblock's build time: compact inodes carry no mtime and take this one, so
    /// inodes with another mtime get the larger extended form (what `mkfs.erofs -T` sets).
    pub build_time: u64,
    /// log2 of the block size; only 12 (4 KiB, the page size the kernel needs) is accepted.
    pub block_size_bits: u8,
    /// Compress regular files with this compressor; `None` writes every file plain.
    pub compression: Option<super::Compression>,
    /// Threads compressing files (1 compresses on the calling thread only).
    pub threads: usize,
    /// Put each compressed file's last extent right after its indexes instead of in a
    /// block of its own, where it does not cross a block (`ztailpacking`, Linux 5.17+).
    pub ztailpacking: bool,
    /// Lay the image out for DAX (see [`dax`](super::dax)): every regular file of
    /// [`DAX_MIN_FILE_SIZE`](super::dax::DAX_MIN_FILE_SIZE) bytes or more in plain blocks
    /// without an inline tail, and the image padded to a multiple of
    /// [`DAX_IMAGE_ALIGN`](super::dax::DAX_IMAGE_ALIGN). Needs 4 KiB blocks; refused with
    /// `compression`, since erofs does not serve compressed files through DAX.
    pub dax: bool,
}
