//! What the view reports of a node: its kind, attributes and directory entries, in plain
//! Rust types that every transport translates.

use std::ffi::OsString;

use rustix::fs::{FileType, Statx, StatxTimestamp};

use super::NodeId;

/// What a view node is, as far as clients are concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A directory.
    Directory,
    /// A regular file.
    RegularFile,
    /// A symbolic link, served verbatim and never followed.
    Symlink,
    /// A named pipe (never opened by the view).
    Fifo,
    /// A Unix domain socket.
    Socket,
    /// A character device (never opened by the view).
    CharDevice,
    /// A block device (never opened by the view).
    BlockDevice,
}

impl Kind {
    pub(super) fn from_file_type(t: FileType) -> Option<Kind> {
        Some(match t {
            FileType::Directory => Kind::Directory,
            FileType::RegularFile => Kind::RegularFile,
            FileType::Symlink => Kind::Symlink,
            FileType::Fifo => Kind::Fifo,
            FileType::Socket => Kind::Socket,
            FileType::CharacterDevice => Kind::CharDevice,
            FileType::BlockDevice => Kind::BlockDevice,
            FileType::Unknown => return None,
        })
    }
}

/// A timestamp in seconds and nanoseconds since the epoch, as the host reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Time {
    /// Seconds since the epoch (may be negative).
    pub secs: i64,
    /// Nanoseconds within the second.
    pub nsecs: u32,
}

/// The attributes of a node, taken from the host object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attr {
    /// The node number, which is also the reported inode number.
    pub ino: NodeId,
    /// The node's generation: a node number handed out again for another object comes
    /// with another generation, so that file handles of the old one fail.
    pub generation: u64,
    /// The kind of object.
    pub kind: Kind,
    /// Permission bits, including setuid, setgid and sticky.
    pub perm: u16,
    /// The host's link count.
    pub nlink: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Size in bytes.
    pub size: u64,
    /// Allocated 512-byte blocks.
    pub blocks: u64,
    /// Preferred I/O size.
    pub blksize: u32,
    /// Device number, for device nodes.
    pub rdev: u64,
    /// Last access.
    pub atime: Time,
    /// Last modification.
    pub mtime: Time,
    /// Last status change.
    pub ctime: Time,
}

/// One entry of a directory listing.
///
/// Transports that report node numbers with entries take them from [`View::peek`].
#[derive(Clone, Debug)]
pub struct DirEntry {
    /// The entry's name.
    pub name: OsString,
    /// The entry's node number where the listing alone can tell it, 0 otherwise.
    pub ino: NodeId,
    /// Its kind.
    pub kind: Kind,
}

pub(super) fn kind_of(st: &Statx) -> Kind {
    Kind::from_file_type(FileType::from_raw_mode(st.stx_mode.into())).unwrap_or(Kind::RegularFile)
}

/// The attributes of the host object `st`, reported as node `ino`.
pub(super) fn attr_of(st: &Statx, ino: NodeId, generation: u64) -> Attr {
    let t = |ts: StatxTimestamp| Time {
        secs: ts.tv_sec,
        nsecs: ts.tv_nsec,
    };
    Attr {
        ino,
        generation,
        kind: kind_of(st),
        perm: st.stx_mode & 0o7777,
        nlink: st.stx_nlink,
        uid: st.stx_uid,
        gid: st.stx_gid,
        size: st.stx_size,
        blocks: st.stx_blocks,
        blksize: st.stx_blksize,
        rdev: rustix::fs::makedev(st.stx_rdev_major, st.stx_rdev_minor),
        atime: t(st.stx_atime),
        mtime: t(st.stx_mtime),
        ctime: t(st.stx_ctime),
    }
}
