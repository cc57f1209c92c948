//! What both transports negotiate with their client and how they report a node, decided
//! once: the FUSE capabilities asked for at INIT, the file type bits, and the conversion of
//! times. The transports map these onto their own libraries' types with exhaustive
//! matches, so a capability added here must be handled by both, and a host mount and a
//! guest never see the same store differently.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::view::{Kind, Time};

/// A FUSE capability a session asks of its client at INIT. Each is optional: a client
/// that lacks one is served without it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Capability {
    /// Reads may be sent in parallel and out of order.
    AsyncRead,
    /// Lookups and listings in one directory may run in parallel.
    ParallelDirops,
    /// Attributes with every listing entry, always: they never change, so handing them
    /// out is never wasted for long, while the automatic mode lists all but a directory's
    /// first chunk without them and each entry stat'ed then costs a LOOKUP (a cold `find`
    /// of 32k entries: 2,338 LOOKUPs fewer and 12% faster).
    ReaddirplusAlways,
    /// Symlink targets cached by the client.
    CacheSymlinks,
    /// Node numbers usable as file handles, and lookups of `.` and `..` (re-export).
    ExportSupport,
    /// The client checks permissions itself from the modes and the (absent) ACLs it
    /// caches, instead of asking.
    PosixAcl,
    /// Directories opened and released without a round trip, their contents cached: a warm
    /// walk then costs no request at all.
    NoOpendir,
    /// The client checks a directory's modification time before it reads its cached
    /// listing from the start, and reads it again when it moved: how a root listing
    /// cached before a live update is refreshed where nothing can invalidate it.
    AutoInvalData,
}

/// Every capability asked for, in the order asked.
pub const CAPABILITIES: [Capability; 8] = [
    Capability::AsyncRead,
    Capability::ParallelDirops,
    Capability::ReaddirplusAlways,
    Capability::CacheSymlinks,
    Capability::ExportSupport,
    Capability::PosixAcl,
    Capability::NoOpendir,
    Capability::AutoInvalData,
];

/// The file type bits of `kind` in a mode (`S_IFDIR`, ...).
pub fn type_bits(kind: Kind) -> u32 {
    match kind {
        Kind::Directory => libc::S_IFDIR,
        Kind::RegularFile => libc::S_IFREG,
        Kind::Symlink => libc::S_IFLNK,
        Kind::Fifo => libc::S_IFIFO,
        Kind::Socket => libc::S_IFSOCK,
        Kind::CharDevice => libc::S_IFCHR,
        Kind::BlockDevice => libc::S_IFBLK,
    }
}

/// A time as the FUSE wire format carries it: seconds as a 64-bit two's complement (the
/// kernel reads them as signed, so a time before 1970 stays one), and nanoseconds.
pub fn wire_time(t: Time) -> (u64, u32) {
    (t.secs as u64, t.nsecs)
}

/// A time as a `SystemTime`, for libraries that take one; the same instant as
/// [`wire_time`], before 1970 too.
pub fn system_time(t: Time) -> SystemTime {
    let nanos = Duration::from_nanos(t.nsecs.into());
    if t.secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(t.secs as u64) + nanos
    } else {
        UNIX_EPOCH - Duration::from_secs(t.secs.unsigned_abs()) + nanos
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_before_1970_are_kept_by_both_conversions() {
        for (secs, nsecs) in [
            (0, 0),
            (1, 0),
            (1_700_000_000, 999_999_999),
            (-1, 5),
            (-86_400, 500),
        ] {
            let t = Time { secs, nsecs };
            let (wire_secs, wire_nsecs) = wire_time(t);
            assert_eq!((wire_secs as i64, wire_nsecs), (secs, nsecs));
            let back = match system_time(t).duration_since(UNIX_EPOCH) {
                Ok(d) => d.as_nanos() as i128,
                Err(e) => -(e.duration().as_nanos() as i128),
            };
            assert_eq!(back, i128::from(secs) * 1_000_000_000 + i128::from(nsecs));
        }
    }

    #[test]
    fn every_kind_has_its_type_bits() {
        assert_eq!(type_bits(Kind::Directory), libc::S_IFDIR);
        assert_eq!(type_bits(Kind::Symlink) & libc::S_IFMT, libc::S_IFLNK);
        let all = [
            Kind::Directory,
            Kind::RegularFile,
            Kind::Symlink,
            Kind::Fifo,
            Kind::Socket,
            Kind::CharDevice,
            Kind::BlockDevice,
        ];
        let mut bits: Vec<u32> = all.iter().map(|&k| type_bits(k)).collect();
        bits.dedup();
        assert_eq!(bits.len(), all.len());
    }
}
