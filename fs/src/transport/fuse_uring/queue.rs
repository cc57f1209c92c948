//! One queue per possible CPU, each served by a thread of its own pinned to that CPU.
//!
//! The kernel hands a request to the queue of the CPU its sender runs on, and completes
//! the entry there; a thread pinned to the same CPU takes it without any other CPU waking
//! up, and its reply goes back the same way. That is what this transport is for: over
//! `/dev/fuse` a request wakes a daemon thread on whichever CPU, and its reply wakes the
//! sender again, two cross-CPU wake-ups per request.
//!
//! A queue's thread is the only one to submit to its ring. It registers its entries,
//! then loops: wait for completions, serve each delivered request, and commit its reply,
//! which also gives the entry back for the next request (one system call for a whole
//! batch of replies and the wait for the next requests).

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;

use super::abi::{self, InHeader, OutHeader, UringEntInOut, Wire};
use super::dispatch;
use super::ring::{self, Buffers, Ring, STOP_TOKEN};
use crate::transport::fuse::Shared;
use crate::warn_limited;

/// A queue made at INIT, not yet serving: its ring and its entries' buffers.
pub struct Queue {
    qid: u16,
    // Dropped before the buffers: closing the ring ends the commands that point at them.
    ring: Ring,
    buffers: Buffers,
}

impl Queue {
    /// Makes queue `qid` with `depth` entries of `payload` bytes.
    pub fn new(qid: u16, depth: usize, payload: usize) -> io::Result<Queue> {
        Ok(Queue {
            qid,
            ring: ring::new_ring(depth as u32)?,
            buffers: Buffers::new(depth, payload)?,
        })
    }
}

/// What a queue's thread counts, readable from elsewhere.
#[derive(Debug, Default)]
pub struct QueueStats {
    /// Requests served.
    pub requests: AtomicU64,
}

/// What a queue's thread says once its registration is in, or why it is not.
pub type Report = (u16, Result<(), String>);

/// Everything a queue's thread needs besides its queue.
pub struct Context {
    /// The served state, shared with the `/dev/fuse` transport.
    pub shared: Arc<Shared>,
    /// A `/dev/fuse` descriptor of the connection, which the ring commands name.
    pub dev: Arc<OwnedFd>,
    /// Readable once the queues are to stop.
    pub stop: Arc<OwnedFd>,
    /// Counters.
    pub stats: Arc<QueueStats>,
    /// Whether to register, once every queue's thread runs.
    pub go: Receiver<Go>,
}

/// What a queue's thread is told once every queue's thread runs.
#[derive(Clone, Debug)]
pub enum Go {
    /// Register the entries and serve.
    Register,
    /// Make the kernel give up on the ring (for this reason), then end.
    Refuse(String),
    /// End without registering: another queue refuses.
    Quit,
}

/// The last command submitted for an entry, to submit again if the kernel asks for that
/// (`EAGAIN`, `EINTR`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Last {
    Register,
    Commit(u64),
    /// The kernel no longer holds the entry and will not again.
    Gone,
}

/// Serves `queue` on this thread until the connection ends or `ctx.stop` is readable.
/// `report` gets the registration's outcome first.
pub fn run(mut queue: Queue, ctx: Context, report: Sender<Report>) {
    let qid = queue.qid;
    pin(qid);
    let dev = ctx.dev.as_raw_fd();
    match ctx.go.recv() {
        Ok(Go::Register) => {}
        Ok(Go::Refuse(why)) => {
            let outcome = refuse(&mut queue, dev, &why);
            let _ = report.send((qid, Err(outcome)));
            return;
        }
        Ok(Go::Quit) | Err(_) => return,
    }
    let depth = queue.buffers.depth();
    let mut last = vec![Last::Register; depth];
    let pushed = (|| -> io::Result<()> {
        let mut sq = queue.ring.submission();
        // SAFETY: the stop descriptor outlives the ring (the context is held until the
        // thread ends, after the ring is dropped).
        unsafe { sq.push(&ring::stop_poll(ctx.stop.as_fd())) }.map_err(io::Error::other)?;
        for i in 0..depth {
            // SAFETY: the iovecs and the buffers they point to live in `queue.buffers`,
            // which outlives the ring (dropped after it).
            unsafe { sq.push(&ring::register(dev, qid, &queue.buffers, i)) }
                .map_err(io::Error::other)?;
        }
        Ok(())
    })();
    if let Err(e) = pushed.and_then(|()| queue.ring.submit().map(drop)) {
        let outcome = refuse(
            &mut queue,
            dev,
            &format!("cannot submit the registration: {e}"),
        );
        let _ = report.send((qid, Err(outcome)));
        return;
    }
    // A refused registration completes at once, within the submission; one that went in
    // completes only with a request.
    let mut first: Vec<(u64, i32)> = queue
        .ring
        .completion()
        .map(|c| (c.user_data(), c.result()))
        .collect();
    let refused = first
        .iter()
        .find(|&&(token, res)| {
            token != STOP_TOKEN && res < 0 && res != -libc::EAGAIN && res != -libc::EINTR
        })
        .map(|&(_, res)| io::Error::from_raw_os_error(-res));
    let _ = report.send((
        qid,
        match &refused {
            Some(e) => Err(format!("the kernel refused the ring registration: {e}")),
            None => Ok(()),
        },
    ));
    drop(report);
    let mut stopping = false;
    loop {
        for (token, res) in first.drain(..) {
            if token == STOP_TOKEN {
                stopping = true;
                continue;
            }
            complete(&mut queue, &ctx, &mut last, token as usize, res, dev);
        }
        if stopping || last.iter().all(|&l| l == Last::Gone) {
            break;
        }
        match queue.ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
            Err(e) => {
                tracing::error!(queue = qid, "io_uring_enter failed; the queue stops: {e}");
                break;
            }
        }
        first.extend(queue.ring.completion().map(|c| (c.user_data(), c.result())));
    }
    tracing::debug!(
        queue = qid,
        requests = ctx.stats.requests.load(Ordering::Relaxed),
        "ring queue stopped"
    );
}

/// Handles the completion `res` of entry `i`.
fn complete(queue: &mut Queue, ctx: &Context, last: &mut [Last], i: usize, res: i32, dev: RawFd) {
    let qid = queue.qid;
    if i >= last.len() {
        return;
    }
    let next = match res {
        0 => {
            let (header, payload) = queue.buffers.entry(i);
            let served = std::panic::catch_unwind(AssertUnwindSafe(|| {
                dispatch::serve(&ctx.shared, qid, header, payload)
            }));
            let commit_id = match served {
                Ok(served) => served.commit_id,
                Err(_) => {
                    tracing::error!(queue = qid, "a request's handler panicked; answering EIO");
                    fail(header, libc::EIO)
                }
            };
            ctx.stats.requests.fetch_add(1, Ordering::Relaxed);
            Last::Commit(commit_id)
        }
        // The connection ended (unmount, abort) or this queue was stopped.
        r if r == -libc::ENOTCONN => Last::Gone,
        r if r == -libc::EAGAIN || r == -libc::EINTR => last[i],
        r => {
            let e = io::Error::from_raw_os_error(-r);
            match last[i] {
                Last::Commit(_) => {
                    // The kernel dropped the entry with the failed commit: give it a new
                    // registration so the queue keeps its depth.
                    warn_limited!(
                        ctx.shared.session.warnings,
                        queue = qid,
                        "a ring commit failed ({e}); registering the entry again"
                    );
                    Last::Register
                }
                _ => {
                    warn_limited!(
                        ctx.shared.session.warnings,
                        queue = qid,
                        "a ring registration failed ({e}); the queue has one entry less"
                    );
                    Last::Gone
                }
            }
        }
    };
    last[i] = next;
    let sqe = match next {
        Last::Register => ring::register(dev, qid, &queue.buffers, i),
        Last::Commit(id) => ring::commit(dev, qid, i, id),
        Last::Gone => return,
    };
    // SAFETY: as at the first registration: the buffers outlive the ring.
    while unsafe { queue.ring.submission().push(&sqe) }.is_err() {
        // Full: send what is queued first (it never is, with one slot per entry).
        if queue.ring.submit().is_err() {
            last[i] = Last::Gone;
            return;
        }
    }
}

/// Writes an error reply into an entry's header for the request it holds; its commit id.
fn fail(header: &mut [u8], errno: i32) -> u64 {
    let unique = InHeader::read(header).map_or(0, |h| h.unique);
    let ent = UringEntInOut::read(&header[abi::ENT_IN_OUT_OFFSET..]).unwrap_or_default();
    let out = OutHeader {
        len: std::mem::size_of::<OutHeader>() as u32,
        error: -errno,
        unique,
    };
    header[..std::mem::size_of::<OutHeader>()].copy_from_slice(out.bytes());
    let ent_out = UringEntInOut {
        payload_sz: 0,
        ..ent
    };
    header[abi::ENT_IN_OUT_OFFSET..abi::ENT_IN_OUT_OFFSET + std::mem::size_of::<UringEntInOut>()]
        .copy_from_slice(ent_out.bytes());
    ent.commit_id
}

/// Sends the registration no kernel accepts, so that the kernel gives up on the ring and
/// serves the connection over `/dev/fuse` (otherwise every request from this queue's CPU
/// would wait for an entry forever). `why` is the reason; the result says what happened.
fn refuse(queue: &mut Queue, dev: RawFd, why: &str) -> String {
    let sqe = ring::register_refused(dev, &queue.buffers);
    // SAFETY: as for any registration: the buffers outlive the ring.
    let pushed = unsafe { queue.ring.submission().push(&sqe) }.is_ok();
    if pushed && queue.ring.submit_and_wait(1).is_ok() {
        let _ = queue.ring.completion().count();
        why.to_string()
    } else {
        tracing::error!(
            queue = queue.qid,
            "cannot make the kernel give up on the ring: requests from CPU {} may hang \
             until the mount ends",
            queue.qid
        );
        why.to_string()
    }
}

/// Pins this thread to CPU `cpu`, so that it runs where the queue's requests come from.
/// Best effort: a CPU that is offline, or outside the daemon's cpuset, keeps the thread
/// unpinned; its queue still registers (every possible CPU's queue must, or requests
/// block) and still serves whatever comes from there.
fn pin(cpu: u16) {
    let mut set = rustix::thread::CpuSet::new();
    set.set(usize::from(cpu));
    if let Err(e) = rustix::thread::sched_setaffinity(None, &set) {
        tracing::debug!(queue = cpu, "cannot pin the queue's thread to its CPU: {e}");
    }
}
