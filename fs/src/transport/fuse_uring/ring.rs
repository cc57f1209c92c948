//! One queue's ring: the io_uring instance, the entries' buffers, and the commands.
//!
//! A ring is made at INIT, before the sandbox, by the thread that answers INIT; it is
//! then handed to the queue's own thread, which is the only one to submit to it. The ring
//! is created disabled, restricted to the two operations a queue uses (`URING_CMD` for the
//! FUSE commands, `POLL_ADD` on the stop eventfd), and only then enabled: seccomp sees
//! `io_uring_enter` but not the operations in the submission queue, so an unrestricted
//! ring would be a way around the system call allow-list (an `openat` or a `connect` as a
//! submission). Restrictions can only be set on a disabled ring, and once enabled they
//! cannot be changed, so what this module sets up is what the ring can ever do.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::ptr::NonNull;

use io_uring::register::Restriction;
use io_uring::{cqueue, opcode, squeue, types, IoUring};

use super::abi::{self, UringCmdReq, Wire};

/// The ring type: 128-byte submissions (`IORING_SETUP_SQE128`), which FUSE requires for
/// its command area.
pub type Ring = IoUring<squeue::Entry128, cqueue::Entry>;

/// The size of an entry's header buffer: the kernel's 288-byte header, in a page of its
/// own so that entries do not share cache lines.
const HEADER_BUF: usize = 4096;

/// `user_data` of the stop poll (entries use their index).
pub const STOP_TOKEN: u64 = u64::MAX;

/// Makes a queue's ring with room for `depth` entries: disabled, restricted, enabled.
pub fn new_ring(depth: u32) -> io::Result<Ring> {
    let ring: Ring = IoUring::builder()
        // Every entry can complete at once, and the stop poll beside them.
        .setup_cqsize(2 * (depth + 1))
        .setup_r_disabled()
        .build(depth + 1)?;
    ring.submitter().register_restrictions(&mut [
        Restriction::sqe_op(opcode::UringCmd80::CODE),
        Restriction::sqe_op(opcode::PollAdd::CODE),
    ])?;
    ring.submitter().register_enable_rings()?;
    Ok(ring)
}

/// The buffers of one queue's entries: per entry a header buffer and a payload buffer,
/// in one anonymous mapping. Pages are only backed once touched, so a large payload
/// costs address space, not memory, until a request fills it.
pub struct Buffers {
    base: NonNull<u8>,
    len: usize,
    depth: usize,
    /// The two-buffer iovec each entry registers with, kept here so that its address
    /// stays valid until the kernel has read it (at the REGISTER's submission).
    iovecs: Box<[[libc::iovec; 2]]>,
}

// SAFETY: the mapping is owned by this value alone; it moves with the queue to its thread,
// which is the only one touching it afterwards (with the kernel, through the ring).
unsafe impl Send for Buffers {}

impl Buffers {
    /// Maps buffers for `depth` entries of `payload` bytes each.
    pub fn new(depth: usize, payload: usize) -> io::Result<Buffers> {
        let payload = payload.next_multiple_of(HEADER_BUF);
        let stride = HEADER_BUF + payload;
        let len = stride
            .checked_mul(depth)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOMEM))?;
        // SAFETY: a fresh private anonymous mapping chosen by the kernel: no existing
        // memory is affected. Not inherited by the helper processes forked later.
        let base = unsafe {
            rustix::mm::mmap_anonymous(
                std::ptr::null_mut(),
                len,
                rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
                rustix::mm::MapFlags::PRIVATE,
            )
        }?;
        let base = NonNull::new(base.cast::<u8>()).expect("mmap never returns null");
        // SAFETY: the range is the mapping just made. Best effort: a helper process
        // inheriting a copy of the buffers would only waste memory.
        let _ = unsafe {
            rustix::mm::madvise(base.as_ptr().cast(), len, rustix::mm::Advice::LinuxDontFork)
        };
        let iovecs = (0..depth)
            .map(|i| {
                // SAFETY: i < depth, so both pointers stay inside the mapping.
                let header = unsafe { base.as_ptr().add(i * stride) };
                let data = unsafe { header.add(HEADER_BUF) };
                [
                    libc::iovec {
                        iov_base: header.cast(),
                        iov_len: std::mem::size_of::<abi::UringReqHeader>(),
                    },
                    libc::iovec {
                        iov_base: data.cast(),
                        iov_len: payload,
                    },
                ]
            })
            .collect();
        Ok(Buffers {
            base,
            len,
            depth,
            iovecs,
        })
    }

    /// How many entries.
    pub fn depth(&self) -> usize {
        self.depth
    }

    /// Entry `i`'s header and payload buffers. Only to be used while the entry is the
    /// daemon's: between the completion that delivered a request and the commit of its
    /// reply (the kernel writes them at other times).
    pub fn entry(&mut self, i: usize) -> (&mut [u8], &mut [u8]) {
        let [header, payload] = &self.iovecs[i];
        // SAFETY: both ranges lie inside the mapping, do not overlap, and `&mut self`
        // makes them the only references; the caller's contract keeps the kernel out.
        unsafe {
            (
                std::slice::from_raw_parts_mut(header.iov_base.cast(), header.iov_len),
                std::slice::from_raw_parts_mut(payload.iov_base.cast(), payload.iov_len),
            )
        }
    }

    fn iovec_ptr(&self, i: usize) -> *const libc::iovec {
        self.iovecs[i].as_ptr()
    }
}

impl Drop for Buffers {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once; the queue drops its ring (which
        // ends every command that could still write here) before its buffers.
        let _ = unsafe { rustix::mm::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

/// The command area of a submission for `qid`, committing `commit_id` (0 to register).
fn command(qid: u16, commit_id: u64) -> [u8; 80] {
    let req = UringCmdReq {
        commit_id,
        qid,
        ..Default::default()
    };
    let mut cmd = [0u8; 80];
    cmd[..std::mem::size_of::<UringCmdReq>()].copy_from_slice(req.bytes());
    cmd
}

/// The byte offset of `len` in a submission entry (`struct io_uring_sqe`).
const SQE_LEN_OFFSET: usize = 24;

/// REGISTER of entry `i` of `buffers` on queue `qid`, through the connection's `/dev/fuse`
/// descriptor `dev`. The kernel reads the iovec array while handling the submission, so
/// `buffers` must outlive the submit call (the queue owns both).
pub fn register(dev: RawFd, qid: u16, buffers: &Buffers, i: usize) -> squeue::Entry128 {
    let mut sqe = opcode::UringCmd80::new(types::Fd(dev), abi::URING_CMD_REGISTER)
        .cmd(command(qid, 0))
        .addr(Some(buffers.iovec_ptr(i) as u64))
        .build()
        .user_data(i as u64);
    // The kernel insists on `len == 2` (the two iovecs), and the crate has no setter for
    // it on this operation: set the field in place.
    // SAFETY: `Entry128` is `#[repr(C)]` and starts with the 64-byte `io_uring_sqe`,
    // whose `len` (a u32) is at byte 24; the write stays inside `sqe`.
    unsafe {
        let p = (&mut sqe as *mut squeue::Entry128).cast::<u8>();
        p.add(SQE_LEN_OFFSET).cast::<u32>().write_unaligned(2);
    }
    sqe
}

/// REGISTER with a queue number no kernel has: it fails, and the kernel, on that
/// failure, gives up on the ring for this connection and serves it over `/dev/fuse`.
/// The way out for a queue that cannot serve after INIT promised the ring.
pub fn register_refused(dev: RawFd, buffers: &Buffers) -> squeue::Entry128 {
    let mut sqe = register(dev, u16::MAX, buffers, 0);
    sqe = sqe.user_data(STOP_TOKEN - 1);
    sqe
}

/// COMMIT_AND_FETCH of entry `i` on queue `qid`: sends the reply in its buffers and gives
/// the entry back for the next request.
pub fn commit(dev: RawFd, qid: u16, i: usize, commit_id: u64) -> squeue::Entry128 {
    opcode::UringCmd80::new(types::Fd(dev), abi::URING_CMD_COMMIT_AND_FETCH)
        .cmd(command(qid, commit_id))
        .build()
        .user_data(i as u64)
}

/// A one-shot poll for `stop` becoming readable.
pub fn stop_poll(stop: BorrowedFd<'_>) -> squeue::Entry128 {
    opcode::PollAdd::new(types::Fd(stop.as_raw_fd()), libc::POLLIN as u32)
        .build()
        .user_data(STOP_TOKEN)
        .into()
}
