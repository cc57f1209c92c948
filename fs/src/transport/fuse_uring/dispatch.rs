//! Requests taken from a ring entry, answered through the same [`Shared`] state (session,
//! passthrough backings) as the `/dev/fuse` transport, and replies written back into the
//! entry.
//!
//! On the ring a request is split over the entry's two buffers: the in header and the
//! operation's struct in the header buffer, everything variable (a name) in the payload
//! buffer. A reply goes the same way: the out header in the header buffer, the reply's
//! struct and data contiguously in the payload buffer, its length in `payload_sz`. So
//! replies are encoded straight into the payload buffer, with no copy on the way.
//!
//! Nothing the kernel wrote is trusted further than it was checked: lengths are clamped
//! to the buffers, structs are copied out, names end at their NUL or the payload's end.

use std::ffi::OsStr;
use std::mem::size_of;
use std::os::unix::ffi::OsStrExt;

use fuser::SessionACL;
use rustix::io::Errno;

use super::abi::{self, op, InHeader, OutHeader, UringEntInOut, Wire};
use crate::protocol::{type_bits, wire_time};
use crate::session::{Xattr, DIR_CACHE, TTL};
use crate::transport::fuse::{fopen_flags, FuseFile, Shared};
use crate::view::{self, Attr};

/// The outcome of one request: `Ok(n)` with `n` reply bytes in the payload buffer, or an
/// errno.
type Answer = Result<usize, Errno>;

/// What a served request needs committed: its id (0 for garbage the kernel never sent).
pub struct Served {
    /// The `commit_id` to send back.
    pub commit_id: u64,
}

/// Serves the request in `header` and `payload` (one entry's buffers) and writes the
/// reply into them. Always returns the commit id: every delivered request must be
/// committed, or its entry is lost to the queue.
pub fn serve(shared: &Shared, qid: u16, header: &mut [u8], payload: &mut [u8]) -> Served {
    let ent = UringEntInOut::read(&header[abi::ENT_IN_OUT_OFFSET..]).unwrap_or_default();
    let Some(inh) = InHeader::read(header) else {
        return Served {
            commit_id: ent.commit_id,
        };
    };
    let op_in = &header[abi::OP_IN_OFFSET..abi::ENT_IN_OUT_OFFSET];
    let op_in: [u8; abi::URING_OP_IN_OUT_SZ] = op_in.try_into().expect("fixed size");
    let in_len = (ent.payload_sz as usize).min(payload.len());
    // Extension headers (8-byte units) sit at the end of the payload; names come before.
    let ext = usize::from(inh.total_extlen) * 8;
    let in_len = in_len.saturating_sub(ext);
    if tracing::enabled!(tracing::Level::DEBUG) {
        trace_request(qid, &inh, &payload[..in_len]);
    }
    let answer = if !allowed(shared, &inh) {
        Err(Errno::ACCESS)
    } else {
        // One request span of the view: a listing proves its directory once.
        shared
            .session
            .request(|| answer(shared, &inh, &op_in, in_len, payload))
    };
    let (error, len) = match answer {
        Ok(len) => (0, len.min(payload.len())),
        Err(e) => (-e.raw_os_error(), 0),
    };
    let out = OutHeader {
        len: (size_of::<OutHeader>() + len) as u32,
        error,
        unique: inh.unique,
    };
    header[..size_of::<OutHeader>()].copy_from_slice(out.bytes());
    let ent_out = UringEntInOut {
        payload_sz: len as u32,
        ..ent
    };
    header[abi::ENT_IN_OUT_OFFSET..abi::ENT_IN_OUT_OFFSET + size_of::<UringEntInOut>()]
        .copy_from_slice(ent_out.bytes());
    Served {
        commit_id: ent.commit_id,
    }
}

fn trace_request(qid: u16, inh: &InHeader, payload: &[u8]) {
    let name = match inh.opcode {
        op::LOOKUP | op::GETXATTR => String::from_utf8_lossy(until_nul(payload)).into_owned(),
        _ => String::new(),
    };
    // SAFETY: sched_getcpu has no preconditions.
    let cpu = unsafe { libc::sched_getcpu() };
    // At debug, like the /dev/fuse transport's library logs each request it reads: the
    // operation's name in the message, so that one search finds it over either.
    tracing::debug!(
        queue = qid,
        cpu,
        opcode = inh.opcode,
        node = inh.nodeid,
        pid = inh.pid,
        name,
        "ring request {} ",
        op::name(inh.opcode)
    );
}

/// The bytes of `payload` up to its first NUL (all of it if none).
fn until_nul(payload: &[u8]) -> &[u8] {
    payload.split(|&b| b == 0).next().unwrap_or(&[])
}

/// The mount's access rule, as the `/dev/fuse` transport's library applies it: with
/// `allow_root`, or without `allow_other`, the kernel lets every user's requests through
/// and the daemon refuses those not allowed, except for the operations the kernel sends
/// on behalf of no particular user (reads and releases of files already open, forgets).
fn allowed(shared: &Shared, inh: &InHeader) -> bool {
    let owner = shared.owner;
    let user_ok = match shared.options.acl {
        SessionACL::All => true,
        SessionACL::RootAndOwner => inh.uid == owner || inh.uid == 0,
        SessionACL::Owner => inh.uid == owner,
    };
    user_ok
        || matches!(
            inh.opcode,
            op::INIT
                | op::DESTROY
                | op::READ
                | op::READDIR
                | op::READDIRPLUS
                | op::BATCH_FORGET
                | op::FORGET
                | op::WRITE
                | op::FSYNC
                | op::FSYNCDIR
                | op::RELEASE
                | op::RELEASEDIR
        )
}

/// Copies `value` to the start of `payload`; its length.
fn put<T: Wire>(payload: &mut [u8], value: &T) -> Answer {
    let bytes = value.bytes();
    let dst = payload.get_mut(..bytes.len()).ok_or(Errno::IO)?;
    dst.copy_from_slice(bytes);
    Ok(bytes.len())
}

/// The operation's struct, if the kernel sent one that large.
fn arg<T: Wire>(op_in: &[u8]) -> Result<T, Errno> {
    T::read(op_in).ok_or(Errno::INVAL)
}

fn answer(
    shared: &Shared,
    inh: &InHeader,
    op_in: &[u8],
    in_len: usize,
    payload: &mut [u8],
) -> Answer {
    let session = &shared.session;
    let node = inh.nodeid;
    match inh.opcode {
        op::LOOKUP => {
            let attr = {
                let name = OsStr::from_bytes(until_nul(&payload[..in_len]));
                session.lookup(node, name).inspect_err(|e| {
                    tracing::debug!(parent = node, ?name, "lookup: {e}");
                })?
            };
            put(payload, &entry_out(&attr))
        }
        op::GETATTR => {
            let attr = session.getattr(node)?;
            put(
                payload,
                &abi::AttrOut {
                    attr_valid: TTL.as_secs(),
                    attr_valid_nsec: TTL.subsec_nanos(),
                    dummy: 0,
                    attr: fuse_attr(&attr),
                },
            )
        }
        op::READLINK => {
            let target = session.readlink(node)?;
            let dst = payload.get_mut(..target.len()).ok_or(Errno::NAMETOOLONG)?;
            dst.copy_from_slice(&target);
            Ok(target.len())
        }
        op::OPEN => {
            let open_in: abi::OpenIn = arg(op_in)?;
            let (fh, flags, backing_id) = shared.open(node, open_in.flags as i32)?;
            put(
                payload,
                &abi::OpenOut {
                    fh,
                    open_flags: flags,
                    backing_id,
                },
            )
        }
        op::READ => {
            let read_in: abi::ReadIn = arg(op_in)?;
            read(shared, &read_in, payload)
        }
        op::RELEASE => {
            let release: abi::ReleaseIn = arg(op_in)?;
            shared.release(node, release.fh);
            Ok(0)
        }
        op::OPENDIR => {
            if shared.no_opendir() {
                // The kernel takes ENOSYS as "never ask again" and caches directories.
                return Err(Errno::NOSYS);
            }
            let fh = session.opendir(node)?;
            put(
                payload,
                &abi::OpenOut {
                    fh,
                    open_flags: fopen_flags(DIR_CACHE).bits(),
                    backing_id: 0,
                },
            )
        }
        op::READDIR => {
            let read_in: abi::ReadIn = arg(op_in)?;
            readdir(shared, node, &read_in, payload, false)
        }
        op::READDIRPLUS => {
            let read_in: abi::ReadIn = arg(op_in)?;
            readdir(shared, node, &read_in, payload, true)
        }
        op::RELEASEDIR => {
            let release: abi::ReleaseIn = arg(op_in)?;
            session.releasedir(release.fh);
            Ok(0)
        }
        op::STATFS => {
            let s = session.statfs()?;
            put(
                payload,
                &abi::StatfsOut {
                    blocks: s.f_blocks,
                    files: s.f_files,
                    bsize: s.f_bsize as u32,
                    namelen: s.f_namemax as u32,
                    frsize: s.f_frsize as u32,
                    ..Default::default()
                },
            )
        }
        op::GETXATTR => {
            let xattr_in: abi::GetxattrIn = arg(op_in)?;
            let answer = {
                let name = OsStr::from_bytes(until_nul(&payload[..in_len]));
                session.getxattr(node, name, xattr_in.size)
            };
            xattr(answer, payload)
        }
        op::LISTXATTR => {
            let xattr_in: abi::GetxattrIn = arg(op_in)?;
            xattr(session.listxattr(node, xattr_in.size), payload)
        }
        // The kernel sends DESTROY only for block-device mounts; nothing to do.
        op::DESTROY => Ok(0),
        // Whatever would modify the store, as the /dev/fuse transport answers it.
        op::SETATTR
        | op::MKNOD
        | op::MKDIR
        | op::UNLINK
        | op::RMDIR
        | op::SYMLINK
        | op::RENAME
        | op::RENAME2
        | op::LINK
        | op::WRITE
        | op::CREATE
        | op::SETXATTR
        | op::REMOVEXATTR
        | op::FALLOCATE => Err(session.read_only()),
        // FLUSH, ACCESS, LSEEK, FSYNC, STATX ...: not implemented over /dev/fuse either
        // (ENOSYS, which the kernel remembers), and FORGET and INTERRUPT never come here.
        _ => Err(Errno::NOSYS),
    }
}

fn xattr(answer: view::Result<Xattr>, payload: &mut [u8]) -> Answer {
    match answer? {
        Xattr::Size(size) => put(payload, &abi::GetxattrOut { size, padding: 0 }),
        Xattr::Data(value) => {
            let dst = payload.get_mut(..value.len()).ok_or(Errno::RANGE)?;
            dst.copy_from_slice(&value);
            Ok(value.len())
        }
    }
}

/// A read of a file served through the daemon, with `pread` straight into the payload.
/// (The `/dev/fuse` transport answers large reads from a mapping of the file, which only
/// the kernel touches; here the daemon would have to copy from the mapping itself, where
/// a file truncated on the host raises SIGBUS, so every read is a `pread`.)
fn read(shared: &Shared, read_in: &abi::ReadIn, payload: &mut [u8]) -> Answer {
    let session = &shared.session;
    let open = session.file(read_in.fh)?;
    let FuseFile::Daemon(_) = &open.transport else {
        // The kernel reads passthrough files itself; a read here would be its bug.
        return Err(Errno::IO);
    };
    let want = open.span(read_in.offset, read_in.size).min(payload.len());
    let file = session.host_file(&open)?;
    let offset = read_in.offset;
    open.read_exact(&file, offset, want, &session.warnings, |file, at, len| {
        let start = (at - offset) as usize;
        rustix::io::pread(file, &mut payload[start..start + len], at).map_err(Into::into)
    })
}

/// A listing from `read_in.offset`, as many entries as fit in `read_in.size` bytes.
fn readdir(
    shared: &Shared,
    node: u64,
    read_in: &abi::ReadIn,
    payload: &mut [u8],
    plus: bool,
) -> Answer {
    let session = &shared.session;
    let stream = session.dir_stream(node, read_in.fh)?;
    let room = (read_in.size as usize).min(payload.len());
    let mut used = 0;
    for slot in stream.from_offset(read_in.offset) {
        let name = slot.name.as_bytes();
        let fixed = if plus {
            size_of::<abi::Direntplus>()
        } else {
            size_of::<abi::Dirent>()
        };
        let len = abi::dirent_align(fixed + name.len());
        if !plus {
            let Some(attr) = session.peek(&stream, &slot) else {
                continue;
            };
            if used + len > room {
                break;
            }
            let dirent = abi::Dirent {
                ino: attr.ino,
                off: slot.next_offset,
                namelen: name.len() as u32,
                typ: type_bits(attr.kind) >> 12,
            };
            write_dirent(&mut payload[used..used + len], dirent.bytes(), name);
        } else {
            if used + len > room {
                break;
            }
            let attr = match session.lookup_slot(&stream, &slot) {
                Some(Ok(attr)) => attr,
                Some(Err(e)) => return Err(e),
                None => continue,
            };
            let entry = abi::Direntplus {
                entry_out: entry_out(&attr),
                dirent: abi::Dirent {
                    ino: attr.ino,
                    off: slot.next_offset,
                    namelen: name.len() as u32,
                    typ: type_bits(attr.kind) >> 12,
                },
            };
            write_dirent(&mut payload[used..used + len], entry.bytes(), name);
        }
        used += len;
    }
    Ok(used)
}

/// One dirent: the fixed part, the name, zeros up to the alignment.
fn write_dirent(dst: &mut [u8], fixed: &[u8], name: &[u8]) {
    dst[..fixed.len()].copy_from_slice(fixed);
    dst[fixed.len()..fixed.len() + name.len()].copy_from_slice(name);
    dst[fixed.len() + name.len()..].fill(0);
}

fn fuse_attr(a: &Attr) -> abi::Attr {
    let (atime, atimensec) = wire_time(a.atime);
    let (mtime, mtimensec) = wire_time(a.mtime);
    let (ctime, ctimensec) = wire_time(a.ctime);
    abi::Attr {
        ino: a.ino,
        size: a.size,
        blocks: a.blocks,
        atime,
        mtime,
        ctime,
        atimensec,
        mtimensec,
        ctimensec,
        mode: type_bits(a.kind) | u32::from(a.perm),
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev as u32,
        blksize: a.blksize,
        flags: 0,
    }
}

/// The answer to a lookup: the host mount is told of updates, so everything is trusted
/// for [`TTL`], as over `/dev/fuse`.
fn entry_out(a: &Attr) -> abi::EntryOut {
    abi::EntryOut {
        nodeid: a.ino,
        generation: a.generation,
        entry_valid: TTL.as_secs(),
        attr_valid: TTL.as_secs(),
        entry_valid_nsec: TTL.subsec_nanos(),
        attr_valid_nsec: TTL.subsec_nanos(),
        attr: fuse_attr(a),
    }
}
