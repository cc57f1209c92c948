//! The full identity of a host object, and the status calls that read it.
//!
//! A device and inode number are not enough to tell one host object from another over
//! time: inode numbers are reused, bind mounts show one device twice. The identity adds
//! the mount id, the birth time and a digest of the host's file handle (which carries the
//! inode's generation), read together with the status.

use std::ffi::OsStr;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;

use rustix::fs::{AtFlags, Statx, StatxAttributes, StatxFlags};

use super::Result;

/// The full identity of a host object: what tells it from every other object the host
/// shows, now or later.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct HostId {
    /// The device number (btrfs subvolumes have their own).
    pub dev: u64,
    /// The inode number on that device.
    pub ino: u64,
    /// The id of the mount the object was reached through (0 where the kernel does not
    /// report one).
    pub mnt: u64,
    /// The birth time, where the filesystem records one: it tells an object from a later
    /// one that reuses its inode number.
    pub btime: Option<(i64, u32)>,
    /// A digest of the host's file handle for the object (0 where the filesystem gives
    /// none): it holds the inode's generation, which tells an object from a later one
    /// that reuses its inode number on filesystems without birth times.
    pub handle: u64,
}

impl HostId {
    pub(super) fn of(st: &Statx, handle: u64) -> HostId {
        let mask = StatxFlags::from_bits_retain(st.stx_mask);
        HostId {
            dev: rustix::fs::makedev(st.stx_dev_major, st.stx_dev_minor),
            ino: st.stx_ino,
            mnt: if mask.contains(StatxFlags::MNT_ID) {
                st.stx_mnt_id
            } else {
                0
            },
            btime: mask
                .contains(StatxFlags::BTIME)
                .then_some((st.stx_btime.tv_sec, st.stx_btime.tv_nsec)),
            handle,
        }
    }
}

pub(super) const STATX_MASK: StatxFlags = StatxFlags::BASIC_STATS
    .union(StatxFlags::BTIME)
    .union(StatxFlags::MNT_ID);

/// A host object's status and its identity, read together.
pub(super) struct Status {
    pub(super) st: Statx,
    pub(super) host: HostId,
}

/// The status and identity of `name` in `dir`, never following a symlink. (Two calls: an
/// object swapped between them gives an identity that matches nothing, so it is refused
/// later rather than served.)
pub(super) fn status_at(dir: BorrowedFd<'_>, name: &OsStr) -> Result<Status> {
    let st = statx_at(dir, name)?;
    let host = HostId::of(&st, handle_digest(dir, name));
    Ok(Status { st, host })
}

/// The status and identity of the object `fd` refers to.
pub(super) fn status_fd(fd: BorrowedFd<'_>) -> Result<Status> {
    let st = statx_fd(fd)?;
    let host = HostId::of(&st, handle_digest(fd, OsStr::new("")));
    Ok(Status { st, host })
}

/// A digest of the host's file handle of `name` in `dir` (`dir` itself for an empty
/// name), or 0 where the filesystem gives none.
pub(super) fn handle_digest(dir: BorrowedFd<'_>, name: &OsStr) -> u64 {
    #[repr(C)]
    struct Handle {
        bytes: u32,
        kind: i32,
        data: [u8; 128],
    }
    // Names come from the kernel or the client's kernel: at most 255 bytes, no NUL.
    let mut cname = [0u8; 256];
    let bytes = name.as_bytes();
    if bytes.len() >= cname.len() || bytes.contains(&0) {
        return 0;
    }
    cname[..bytes.len()].copy_from_slice(bytes);
    let mut handle = Handle {
        bytes: 128,
        kind: 0,
        data: [0; 128],
    };
    let mut mount_id: libc::c_int = 0;
    let flags = if bytes.is_empty() {
        libc::AT_EMPTY_PATH
    } else {
        0
    };
    // SAFETY: a NUL-terminated name, a handle buffer as large as it says, an int.
    let r = unsafe {
        libc::name_to_handle_at(
            dir.as_raw_fd(),
            cname.as_ptr().cast(),
            (&mut handle as *mut Handle).cast(),
            &mut mount_id,
            flags,
        )
    };
    if r != 0 {
        return 0;
    }
    // FNV-1a: a digest, not a security boundary (the device, inode and mount are compared
    // in full beside it).
    let len = (handle.bytes as usize).min(handle.data.len());
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in handle.kind.to_le_bytes().iter().chain(&handle.data[..len]) {
        h = (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
    }
    h | 1
}

/// The status of `name` in `dir`, never following a symlink.
pub(super) fn statx_at(dir: BorrowedFd<'_>, name: &OsStr) -> Result<Statx> {
    rustix::fs::statx(dir, name, AtFlags::SYMLINK_NOFOLLOW, STATX_MASK)
}

/// The status of the object `fd` refers to.
pub(super) fn statx_fd(fd: BorrowedFd<'_>) -> Result<Statx> {
    rustix::fs::statx(fd, "", AtFlags::EMPTY_PATH, STATX_MASK)
}

pub(super) fn is_mount_root(st: &Statx) -> bool {
    st.stx_attributes_mask.contains(StatxAttributes::MOUNT_ROOT)
        && st.stx_attributes.contains(StatxAttributes::MOUNT_ROOT)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    fn open(path: &std::path::Path) -> std::os::fd::OwnedFd {
        rustix::fs::open(
            path,
            rustix::fs::OFlags::PATH | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
        .unwrap()
    }

    #[test]
    fn the_same_object_has_one_identity_by_name_and_by_descriptor() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f"), b"x").unwrap();
        let d = open(dir.path());
        let by_name = status_at(d.as_fd(), OsStr::new("f")).unwrap();
        let f = open(&dir.path().join("f"));
        let by_fd = status_fd(f.as_fd()).unwrap();
        assert_eq!(by_name.host, by_fd.host);
        assert_ne!(by_name.host.mnt, 0, "this kernel reports mount ids");
    }

    #[test]
    fn a_replaced_object_has_another_identity() {
        let dir = tempfile::tempdir().unwrap();
        let d = open(dir.path());
        let mut seen = Vec::new();
        // Inode numbers are reused at once on most filesystems: birth time and file
        // handle still tell the objects apart.
        for i in 0..20 {
            let path = dir.path().join("f");
            std::fs::write(&path, format!("{i}")).unwrap();
            seen.push(status_at(d.as_fd(), OsStr::new("f")).unwrap().host);
            std::fs::remove_file(&path).unwrap();
        }
        for (i, a) in seen.iter().enumerate() {
            for b in &seen[i + 1..] {
                assert_ne!(a, b, "two objects with one identity");
            }
        }
    }

    #[test]
    fn symlinks_are_never_followed() {
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink("/etc/hostname", dir.path().join("l")).unwrap();
        let d = open(dir.path());
        let st = statx_at(d.as_fd(), OsStr::new("l")).unwrap();
        assert_eq!(
            rustix::fs::FileType::from_raw_mode(st.stx_mode.into()),
            rustix::fs::FileType::Symlink
        );
    }
}
