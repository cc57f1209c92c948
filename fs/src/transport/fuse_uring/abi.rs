//! The wire layouts FUSE over io_uring exchanges with the kernel, typed.
//!
//! Everything here is from the kernel's `include/uapi/linux/fuse.h`, protocol 7.42 (the
//! version that added the ring; 7.43 to 7.45 add nothing the ring or a read-only
//! filesystem uses). Each layout is `#[repr(C)]` with its padding spelled out as fields,
//! and its size (and the offsets the kernel depends on) asserted at compile time, so a
//! slip in a field shows up as a build failure rather than as a garbled request.
//!
//! Only plain copies cross between these types and the shared buffers ([`Wire::read`],
//! [`Wire::bytes`]): no reference into memory the kernel writes is ever held as a typed
//! value, and nothing read from it is trusted beyond the lengths checked by the caller.

use std::mem::{offset_of, size_of};

/// A layout that is plain bytes: `#[repr(C)]`, integers and byte arrays only, no implicit
/// padding, every bit pattern valid.
///
/// # Safety
///
/// Implement only for types that meet all of the above (the size asserts below check that
/// no implicit padding crept in).
pub unsafe trait Wire: Copy + Default {
    /// A copy of the value at the start of `bytes`; `None` if `bytes` is too short.
    fn read(bytes: &[u8]) -> Option<Self> {
        if bytes.len() < size_of::<Self>() {
            return None;
        }
        // SAFETY: `bytes` holds at least size_of::<Self>() bytes, the read is unaligned,
        // and every bit pattern is a valid `Self` (the trait's contract).
        Some(unsafe { bytes.as_ptr().cast::<Self>().read_unaligned() })
    }

    /// The value's bytes, as the kernel reads them.
    fn bytes(&self) -> &[u8] {
        // SAFETY: `Self` has no implicit padding (the trait's contract), so all of its
        // size_of bytes are initialised; the slice borrows `self`.
        unsafe { std::slice::from_raw_parts((self as *const Self).cast::<u8>(), size_of::<Self>()) }
    }
}

/// `struct fuse_in_header`: what every request starts with.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct InHeader {
    /// The request's length as /dev/fuse would carry it (header, op struct, payload).
    pub len: u32,
    /// The operation (`FUSE_LOOKUP`, ...).
    pub opcode: u32,
    /// The request's id, which its reply repeats.
    pub unique: u64,
    /// The node the request is about.
    pub nodeid: u64,
    /// The caller's user.
    pub uid: u32,
    /// The caller's group.
    pub gid: u32,
    /// The caller's process.
    pub pid: u32,
    /// Length of extension headers at the end of the payload, in 8-byte units.
    pub total_extlen: u16,
    /// Unused.
    pub padding: u16,
}

/// `struct fuse_out_header`: what every reply starts with.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct OutHeader {
    /// Reply length (ignored on the ring, which takes `payload_sz`).
    pub len: u32,
    /// 0 or a negated errno.
    pub error: i32,
    /// The request's id.
    pub unique: u64,
}

/// `FUSE_URING_IN_OUT_HEADER_SZ`: room for the in or out header in a ring entry.
pub const URING_IN_OUT_HEADER_SZ: usize = 128;
/// `FUSE_URING_OP_IN_OUT_SZ`: room for the operation's own struct in a ring entry.
pub const URING_OP_IN_OUT_SZ: usize = 128;

/// `struct fuse_uring_ent_in_out`: the part of a ring entry's header that says which
/// request it carries and how much of the payload buffer is used.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct UringEntInOut {
    /// Unused (0).
    pub flags: u64,
    /// The request's id to give back with the commit (the `unique` of the request).
    pub commit_id: u64,
    /// Bytes of the payload buffer used: by the request, then by the reply.
    pub payload_sz: u32,
    /// Unused.
    pub padding: u32,
    /// Unused.
    pub reserved: u64,
}

/// `struct fuse_uring_req_header`: the header buffer of a ring entry (the first of the
/// two buffers given at registration).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct UringReqHeader {
    /// The in header of a request; the out header of its reply.
    pub in_out: [u8; URING_IN_OUT_HEADER_SZ],
    /// The operation's struct (`fuse_getattr_in`, ...), when it has one.
    pub op_in: [u8; URING_OP_IN_OUT_SZ],
    /// Which request, and how much payload.
    pub ring_ent_in_out: UringEntInOut,
}

/// Offset of [`UringReqHeader::op_in`].
pub const OP_IN_OFFSET: usize = offset_of!(UringReqHeader, op_in);
/// Offset of [`UringReqHeader::ring_ent_in_out`].
pub const ENT_IN_OUT_OFFSET: usize = offset_of!(UringReqHeader, ring_ent_in_out);

/// `enum fuse_uring_cmd`: the `cmd_op` of a ring command.
pub const URING_CMD_REGISTER: u32 = 1;
/// Commit the reply of the entry's request and wait for the next request.
pub const URING_CMD_COMMIT_AND_FETCH: u32 = 2;

/// `struct fuse_uring_cmd_req`: the command, in the SQE's command area.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct UringCmdReq {
    /// Unused (0).
    pub flags: u64,
    /// With a commit: the request's id (from [`UringEntInOut::commit_id`]).
    pub commit_id: u64,
    /// The queue (the CPU) of the entry.
    pub qid: u16,
    /// Unused.
    pub padding: [u8; 6],
}

/// `struct fuse_attr`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Attr {
    /// Node number.
    pub ino: u64,
    /// Size in bytes.
    pub size: u64,
    /// 512-byte blocks allocated.
    pub blocks: u64,
    /// Access time, seconds.
    pub atime: u64,
    /// Modification time, seconds.
    pub mtime: u64,
    /// Status change time, seconds.
    pub ctime: u64,
    /// Access time, nanoseconds.
    pub atimensec: u32,
    /// Modification time, nanoseconds.
    pub mtimensec: u32,
    /// Status change time, nanoseconds.
    pub ctimensec: u32,
    /// File type and permission bits.
    pub mode: u32,
    /// Hard links.
    pub nlink: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Device number of a device node.
    pub rdev: u32,
    /// Preferred I/O size.
    pub blksize: u32,
    /// `FUSE_ATTR_*` flags (none set).
    pub flags: u32,
}

/// `struct fuse_attr_out`: the reply to GETATTR.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct AttrOut {
    /// How long the attributes may be trusted, seconds.
    pub attr_valid: u64,
    /// How long the attributes may be trusted, nanoseconds.
    pub attr_valid_nsec: u32,
    /// Unused.
    pub dummy: u32,
    /// The attributes.
    pub attr: Attr,
}

/// `struct fuse_entry_out`: the reply to LOOKUP, and each entry of READDIRPLUS.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct EntryOut {
    /// The node found.
    pub nodeid: u64,
    /// Its generation: a later node under the same number has another.
    pub generation: u64,
    /// How long the name may be trusted, seconds.
    pub entry_valid: u64,
    /// How long the attributes may be trusted, seconds.
    pub attr_valid: u64,
    /// How long the name may be trusted, nanoseconds.
    pub entry_valid_nsec: u32,
    /// How long the attributes may be trusted, nanoseconds.
    pub attr_valid_nsec: u32,
    /// The attributes.
    pub attr: Attr,
}

/// `struct fuse_getattr_in`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct GetattrIn {
    /// `FUSE_GETATTR_FH` when `fh` is set.
    pub getattr_flags: u32,
    /// Unused.
    pub dummy: u32,
    /// The handle the attributes are asked through, if any.
    pub fh: u64,
}

/// `struct fuse_open_in`: OPEN and OPENDIR.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct OpenIn {
    /// The open(2) flags.
    pub flags: u32,
    /// `FUSE_OPEN_*` flags.
    pub open_flags: u32,
}

/// `struct fuse_open_out`, with the backing id of passthrough (7.40) in what was padding.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct OpenOut {
    /// The handle of the open file or directory.
    pub fh: u64,
    /// `FOPEN_*` flags (cache policy, passthrough).
    pub open_flags: u32,
    /// The passthrough backing id, with `FOPEN_PASSTHROUGH`.
    pub backing_id: i32,
}

/// `struct fuse_read_in`: READ, READDIR and READDIRPLUS.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ReadIn {
    /// The handle read through.
    pub fh: u64,
    /// Where to start: a byte offset, or a directory stream position.
    pub offset: u64,
    /// The most bytes the reply may carry.
    pub size: u32,
    /// `FUSE_READ_*` flags.
    pub read_flags: u32,
    /// The lock owner, with `FUSE_READ_LOCKOWNER`.
    pub lock_owner: u64,
    /// The open(2) flags of the file.
    pub flags: u32,
    /// Unused.
    pub padding: u32,
}

/// `struct fuse_release_in`: RELEASE and RELEASEDIR.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ReleaseIn {
    /// The handle released.
    pub fh: u64,
    /// The open(2) flags it was opened with.
    pub flags: u32,
    /// `FUSE_RELEASE_*` flags.
    pub release_flags: u32,
    /// The lock owner, for flock release.
    pub lock_owner: u64,
}

/// `struct fuse_getxattr_in`: GETXATTR and LISTXATTR.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct GetxattrIn {
    /// The buffer size: 0 asks for the size only.
    pub size: u32,
    /// Unused.
    pub padding: u32,
}

/// `struct fuse_getxattr_out`: the size a value needs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct GetxattrOut {
    /// The size of the value (or the name list).
    pub size: u32,
    /// Unused.
    pub padding: u32,
}

/// `struct fuse_access_in`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct AccessIn {
    /// The access(2) mode asked for.
    pub mask: u32,
    /// Unused.
    pub padding: u32,
}

/// `struct fuse_kstatfs`, which is all of `struct fuse_statfs_out`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct StatfsOut {
    /// Blocks in all.
    pub blocks: u64,
    /// Free blocks.
    pub bfree: u64,
    /// Free blocks for unprivileged users.
    pub bavail: u64,
    /// Inodes in all.
    pub files: u64,
    /// Free inodes.
    pub ffree: u64,
    /// Block size.
    pub bsize: u32,
    /// Longest name.
    pub namelen: u32,
    /// Fragment size.
    pub frsize: u32,
    /// Unused.
    pub padding: u32,
    /// Unused.
    pub spare: [u32; 6],
}

/// `struct fuse_lseek_in`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct LseekIn {
    /// The handle.
    pub fh: u64,
    /// The offset to seek from.
    pub offset: u64,
    /// `SEEK_DATA` or `SEEK_HOLE` (the others are the kernel's).
    pub whence: u32,
    /// Unused.
    pub padding: u32,
}

/// `struct fuse_lseek_out`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct LseekOut {
    /// The offset found.
    pub offset: u64,
}

/// `struct fuse_dirent` without its name, which follows, padded to 8 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Dirent {
    /// The entry's node number.
    pub ino: u64,
    /// The stream position after this entry.
    pub off: u64,
    /// The name's length.
    pub namelen: u32,
    /// The file type, as in `d_type`.
    pub typ: u32,
}

/// `struct fuse_direntplus` without its name.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Direntplus {
    /// The entry's lookup answer.
    pub entry_out: EntryOut,
    /// The entry itself.
    pub dirent: Dirent,
}

// SAFETY (all below): #[repr(C)], integer and byte-array fields only, and no implicit
// padding (checked by the size asserts that follow).
unsafe impl Wire for InHeader {}
unsafe impl Wire for OutHeader {}
unsafe impl Wire for UringEntInOut {}
unsafe impl Wire for UringCmdReq {}
unsafe impl Wire for Attr {}
unsafe impl Wire for AttrOut {}
unsafe impl Wire for EntryOut {}
unsafe impl Wire for GetattrIn {}
unsafe impl Wire for OpenIn {}
unsafe impl Wire for OpenOut {}
unsafe impl Wire for ReadIn {}
unsafe impl Wire for ReleaseIn {}
unsafe impl Wire for GetxattrIn {}
unsafe impl Wire for GetxattrOut {}
unsafe impl Wire for AccessIn {}
unsafe impl Wire for StatfsOut {}
unsafe impl Wire for LseekIn {}
unsafe impl Wire for LseekOut {}
unsafe impl Wire for Dirent {}
unsafe impl Wire for Direntplus {}

const _: () = {
    assert!(size_of::<InHeader>() == 40);
    assert!(size_of::<OutHeader>() == 16);
    assert!(size_of::<UringEntInOut>() == 32);
    assert!(size_of::<UringReqHeader>() == 288);
    assert!(OP_IN_OFFSET == 128);
    assert!(ENT_IN_OUT_OFFSET == 256);
    assert!(offset_of!(UringEntInOut, commit_id) == 8);
    assert!(offset_of!(UringEntInOut, payload_sz) == 16);
    assert!(size_of::<UringCmdReq>() == 24);
    assert!(offset_of!(UringCmdReq, qid) == 16);
    assert!(size_of::<Attr>() == 88);
    assert!(size_of::<AttrOut>() == 104);
    assert!(size_of::<EntryOut>() == 128);
    assert!(size_of::<GetattrIn>() == 16);
    assert!(size_of::<OpenIn>() == 8);
    assert!(size_of::<OpenOut>() == 16);
    assert!(offset_of!(OpenOut, backing_id) == 12);
    assert!(size_of::<ReadIn>() == 40);
    assert!(size_of::<ReleaseIn>() == 24);
    assert!(size_of::<GetxattrIn>() == 8);
    assert!(size_of::<GetxattrOut>() == 8);
    assert!(size_of::<AccessIn>() == 8);
    assert!(size_of::<StatfsOut>() == 80);
    assert!(size_of::<LseekIn>() == 24);
    assert!(size_of::<LseekOut>() == 8);
    assert!(size_of::<Dirent>() == 24);
    assert!(size_of::<Direntplus>() == 152);
};

/// Operation codes (`enum fuse_opcode`) the ring can carry to a read-only filesystem.
pub mod op {
    pub const LOOKUP: u32 = 1;
    pub const FORGET: u32 = 2;
    pub const GETATTR: u32 = 3;
    pub const SETATTR: u32 = 4;
    pub const READLINK: u32 = 5;
    pub const SYMLINK: u32 = 6;
    pub const MKNOD: u32 = 8;
    pub const MKDIR: u32 = 9;
    pub const UNLINK: u32 = 10;
    pub const RMDIR: u32 = 11;
    pub const RENAME: u32 = 12;
    pub const LINK: u32 = 13;
    pub const OPEN: u32 = 14;
    pub const READ: u32 = 15;
    pub const WRITE: u32 = 16;
    pub const STATFS: u32 = 17;
    pub const RELEASE: u32 = 18;
    pub const FSYNC: u32 = 20;
    pub const SETXATTR: u32 = 21;
    pub const GETXATTR: u32 = 22;
    pub const LISTXATTR: u32 = 23;
    pub const REMOVEXATTR: u32 = 24;
    pub const FLUSH: u32 = 25;
    pub const INIT: u32 = 26;
    pub const OPENDIR: u32 = 27;
    pub const READDIR: u32 = 28;
    pub const RELEASEDIR: u32 = 29;
    pub const FSYNCDIR: u32 = 30;
    pub const ACCESS: u32 = 34;
    pub const CREATE: u32 = 35;
    pub const DESTROY: u32 = 38;
    pub const BATCH_FORGET: u32 = 42;
    pub const FALLOCATE: u32 = 43;
    pub const READDIRPLUS: u32 = 44;
    pub const RENAME2: u32 = 45;
    pub const LSEEK: u32 = 46;
    pub const STATX: u32 = 52;

    /// The operation's name, for logs.
    pub fn name(opcode: u32) -> &'static str {
        match opcode {
            LOOKUP => "LOOKUP",
            FORGET => "FORGET",
            GETATTR => "GETATTR",
            SETATTR => "SETATTR",
            READLINK => "READLINK",
            SYMLINK => "SYMLINK",
            MKNOD => "MKNOD",
            MKDIR => "MKDIR",
            UNLINK => "UNLINK",
            RMDIR => "RMDIR",
            RENAME => "RENAME",
            RENAME2 => "RENAME2",
            LINK => "LINK",
            CREATE => "CREATE",
            SETXATTR => "SETXATTR",
            REMOVEXATTR => "REMOVEXATTR",
            FALLOCATE => "FALLOCATE",
            FSYNC => "FSYNC",
            FSYNCDIR => "FSYNCDIR",
            OPEN => "OPEN",
            READ => "READ",
            WRITE => "WRITE",
            STATFS => "STATFS",
            RELEASE => "RELEASE",
            GETXATTR => "GETXATTR",
            LISTXATTR => "LISTXATTR",
            FLUSH => "FLUSH",
            OPENDIR => "OPENDIR",
            READDIR => "READDIR",
            RELEASEDIR => "RELEASEDIR",
            ACCESS => "ACCESS",
            DESTROY => "DESTROY",
            READDIRPLUS => "READDIRPLUS",
            LSEEK => "LSEEK",
            STATX => "STATX",
            _ => "other",
        }
    }
}

/// Rounds a dirent's length up to the 8 bytes entries are aligned to (`FUSE_DIRENT_ALIGN`).
pub const fn dirent_align(len: usize) -> usize {
    (len + 7) & !7
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_round_trip_through_bytes() {
        let h = InHeader {
            len: 57,
            opcode: op::GETXATTR,
            unique: 0x1122_3344_5566_7788,
            nodeid: 9,
            uid: 1000,
            gid: 100,
            pid: 4242,
            total_extlen: 0,
            padding: 0,
        };
        let back = InHeader::read(h.bytes()).unwrap();
        assert_eq!(
            (back.len, back.opcode, back.unique, back.pid),
            (57, 22, h.unique, 4242)
        );
        assert!(InHeader::read(&h.bytes()[..39]).is_none());
        let ent = UringEntInOut {
            commit_id: 7,
            payload_sz: 17,
            ..Default::default()
        };
        let bytes = ent.bytes();
        assert_eq!(&bytes[8..16], &7u64.to_ne_bytes());
        assert_eq!(&bytes[16..20], &17u32.to_ne_bytes());
    }

    #[test]
    fn dirents_are_padded_to_eight_bytes() {
        assert_eq!(dirent_align(size_of::<Dirent>() + 1), 32);
        assert_eq!(dirent_align(size_of::<Dirent>() + 8), 32);
        assert_eq!(dirent_align(size_of::<Direntplus>() + 9), 168);
    }
}
