//! FUSE over io_uring: the host kernel's requests taken from rings, one per CPU, instead
//! of read from `/dev/fuse`.
//!
//! The kernel (Linux 6.14 and later, `CONFIG_FUSE_IO_URING`, and the `fuse` module's
//! `enable_uring` parameter set by root) offers it at INIT. If the daemon accepts, every
//! request but FORGET and INTERRUPT goes to the ring queue of the CPU that sent it, and a
//! thread pinned to that CPU answers it there: no request or reply wakes another CPU.
//! This module only carries requests: it answers them through the same session as the
//! `/dev/fuse` transport ([`super::fuse`]), which keeps INIT, FORGET, INTERRUPT,
//! notifications, and everything when the ring is not used.
//!
//! The order is fixed by the kernel and the sandbox:
//!
//! 1. At INIT ([`negotiate`], on the thread that answers it, before the sandbox): if the
//!    kernel offers the ring and the options allow it, one ring and its buffers per
//!    possible CPU are made, and only if all of them could be made is the ring accepted
//!    (the payload buffers must hold the largest request, so `max_write` is lowered).
//! 2. After the sandbox ([`UringSlot::start`]): one thread per queue, pinned, registers
//!    its entries. Until every queue has, the kernel holds all requests back; a queue
//!    that cannot register sends a registration the kernel must refuse, which makes it
//!    give up on the ring and serve `/dev/fuse` instead.
//! 3. The connection ending completes every entry with `ENOTCONN`, and the threads end.
//!
//! Exactly one INFO line says which transport serves, and why.

pub(crate) mod abi;
mod dispatch;
mod queue;
mod ring;

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use fuser::{InitFlags, KernelConfig};

use self::queue::{Context, Go, Queue, QueueStats};
use super::fuse::Shared;

/// How the host kernel's requests reach the daemon (`--fuse-transport`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum FuseTransport {
    /// io_uring when the kernel offers it and the rings can be set up, else `/dev/fuse`.
    #[default]
    Auto,
    /// io_uring, or fail to start.
    IoUring,
    /// `/dev/fuse` reads, never io_uring.
    DevFuse,
}

/// Entries per queue: requests a CPU can have with the daemon at once. One thread serves
/// them in turn, so more only batch completions; the kernel queues the rest.
pub const DEPTH: usize = 8;

/// The largest write (and so, with read-ahead, the largest request) the daemon accepts
/// when serving over the ring: each entry's payload buffer must hold any request the
/// kernel can send, and fuser's default (16 MiB) would make every entry that large. A
/// read-only filesystem gets no writes; reads through the daemon are this large at most.
pub const MAX_WRITE: u32 = 1 << 20;

/// The smallest payload the kernel accepts (`FUSE_MIN_READ_BUFFER`).
const MIN_PAYLOAD: usize = 8192;

/// What INIT decided about the ring, kept until the queues start.
pub(crate) enum Negotiated {
    /// Not asked for (`--fuse-transport dev-fuse`).
    NotAsked,
    /// The kernel did not offer it.
    NotOffered,
    /// Offered, but the rings could not be made.
    SetupFailed(String),
    /// Accepted: the queues wait for their threads.
    Accepted(Prepared),
}

/// The queues made at INIT.
pub(crate) struct Prepared {
    queues: Vec<Queue>,
    payload: usize,
    stop: OwnedFd,
}

/// Where INIT leaves its decision for [`UringSlot::start`].
#[derive(Default)]
pub(crate) struct UringSlot {
    negotiated: parking_lot::Mutex<Option<Negotiated>>,
}

/// The possible CPUs: the kernel makes one queue per possible CPU and picks a request's
/// queue by the number of the CPU it came from.
pub fn possible_cpus() -> io::Result<usize> {
    let text = std::fs::read_to_string("/sys/devices/system/cpu/possible")?;
    let mut highest = None;
    for part in text.trim().split(',') {
        let last = part.rsplit('-').next().unwrap_or(part);
        let n: usize = last
            .parse()
            .map_err(|_| io::Error::other(format!("bad possible CPU list {text:?}")))?;
        highest = highest.max(Some(n));
    }
    highest
        .map(|h| h + 1)
        .ok_or_else(|| io::Error::other("no possible CPU"))
}

/// At INIT: accepts the ring if the kernel offers it, `transport` allows it and every
/// queue can be made. `readahead` is the read-ahead already agreed (requests can be that
/// large too).
pub(crate) fn negotiate(
    config: &mut KernelConfig,
    transport: FuseTransport,
    readahead: u32,
) -> Negotiated {
    if transport == FuseTransport::DevFuse {
        return Negotiated::NotAsked;
    }
    if !config
        .capabilities()
        .contains(InitFlags::FUSE_OVER_IO_URING)
    {
        return Negotiated::NotOffered;
    }
    let page = rustix::param::page_size();
    // The kernel sizes its largest request from max_write and the pages asked for, which
    // fuser derives from the larger of max_write and the read-ahead.
    let _ = config.set_max_write(MAX_WRITE);
    let payload = (MAX_WRITE.max(readahead) as usize)
        .next_multiple_of(page)
        .max(MIN_PAYLOAD);
    let prepared = (|| -> io::Result<Prepared> {
        let cpus = possible_cpus()?;
        let qids = u16::try_from(cpus).map_err(|_| io::Error::other("too many CPUs"))?;
        let queues = (0..qids)
            .map(|qid| Queue::new(qid, DEPTH, payload))
            .collect::<io::Result<Vec<_>>>()?;
        // SAFETY: eventfd has no memory-safety preconditions; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by eventfd and is owned by nothing else.
        let stop = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Prepared {
            queues,
            payload,
            stop,
        })
    })();
    match prepared {
        Ok(prepared) => {
            if config
                .add_capabilities(InitFlags::FUSE_OVER_IO_URING)
                .is_err()
            {
                return Negotiated::NotOffered;
            }
            Negotiated::Accepted(prepared)
        }
        Err(e) => Negotiated::SetupFailed(e.to_string()),
    }
}

impl UringSlot {
    /// Keeps INIT's decision.
    pub(crate) fn set(&self, negotiated: Negotiated) {
        *self.negotiated.lock() = Some(negotiated);
    }

    /// Whether INIT accepted the ring; if not, why.
    pub(crate) fn accepted(&self) -> Result<(), String> {
        match &*self.negotiated.lock() {
            Some(Negotiated::Accepted(_)) => Ok(()),
            other => Err(not_served(other)),
        }
    }

    /// Starts the queues' threads, if INIT accepted the ring, and waits until each has
    /// registered or failed to; then logs which transport serves. `forced` (the ring or
    /// nothing) turns not serving over the ring into an error.
    pub(crate) fn start(
        &self,
        shared: &Arc<Shared>,
        dev: &Arc<OwnedFd>,
        forced: bool,
        refuse_queue: Option<u16>,
    ) -> Result<Rings, String> {
        let negotiated = self.negotiated.lock().take();
        let prepared = match negotiated {
            Some(Negotiated::Accepted(prepared)) => prepared,
            other => return fallback(forced, &not_served(&other)),
        };
        let Prepared {
            queues,
            payload,
            stop,
        } = prepared;
        let stop = Arc::new(stop);
        let count = queues.len();
        let (tx, rx) = mpsc::channel();
        let mut threads = Vec::with_capacity(count);
        let mut stats = Vec::with_capacity(count);
        let mut gos = Vec::with_capacity(count);
        let mut failure = None;
        for (qid, queue) in queues.into_iter().enumerate() {
            let queue_stats = Arc::new(QueueStats::default());
            let (go_tx, go) = mpsc::channel();
            let ctx = Context {
                shared: shared.clone(),
                dev: dev.clone(),
                stop: stop.clone(),
                stats: queue_stats.clone(),
                go,
            };
            let tx = tx.clone();
            match std::thread::Builder::new()
                .name(format!("fuse-ring-{qid}"))
                .spawn(move || queue::run(queue, ctx, tx))
            {
                Ok(t) => {
                    threads.push(t);
                    stats.push(queue_stats);
                    gos.push(go_tx);
                }
                Err(e) => {
                    failure = Some(format!("cannot start a queue thread: {e}"));
                    break;
                }
            }
        }
        drop(tx);
        // Nothing has registered yet: either every queue registers, or one sends the
        // registration the kernel refuses (and so gives up on the ring) and the others
        // do not register at all.
        let mut expected = count;
        if failure.is_some() {
            if let Some(first) = gos.first() {
                let _ = first.send(Go::Refuse(failure.clone().unwrap_or_default()));
            }
            for go in gos.iter().skip(1) {
                let _ = go.send(Go::Quit);
            }
            expected = gos.len().min(1);
        } else {
            for (qid, go) in gos.iter().enumerate() {
                let order = if refuse_queue == Some(qid as u16) {
                    Go::Refuse("refused on request (a test of the fallback)".to_string())
                } else {
                    Go::Register
                };
                let _ = go.send(order);
            }
        }
        drop(gos);
        let rings = Rings {
            threads,
            stop: Some(stop),
            stats,
        };
        // Registration is quick (a system call per queue); a queue that has not
        // reported in this long is stuck, and the connection with it.
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut reports = 0;
        while reports < expected {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok((_, Ok(()))) => reports += 1,
                Ok((qid, Err(reason))) => {
                    reports += 1;
                    failure.get_or_insert(format!("queue {qid}: {reason}"));
                }
                Err(_) => {
                    failure.get_or_insert("a queue did not register in time".to_string());
                    break;
                }
            }
        }
        if let Some(reason) = failure {
            return fallback(forced, &reason).map(|_| rings);
        }
        tracing::info!(
            queues = count,
            depth = DEPTH,
            payload_kib = payload / 1024,
            "FUSE transport: io_uring, one queue per possible CPU, each served on its CPU"
        );
        Ok(rings)
    }
}

/// Why INIT did not accept the ring.
fn not_served(negotiated: &Option<Negotiated>) -> String {
    match negotiated {
        Some(Negotiated::NotAsked) => "io_uring not asked for (--fuse-transport dev-fuse)".into(),
        Some(Negotiated::SetupFailed(e)) => format!("io_uring setup failed: {e}"),
        Some(Negotiated::Accepted(_)) => "io_uring accepted".into(),
        Some(Negotiated::NotOffered) | None => {
            "the kernel does not offer FUSE over io_uring (it needs Linux 6.14 or later, and \
             as root: echo Y > /sys/module/fuse/parameters/enable_uring)"
                .into()
        }
    }
}

/// Logs the fallback to `/dev/fuse` (or fails, if the ring was required).
fn fallback(forced: bool, reason: &str) -> Result<Rings, String> {
    if forced {
        return Err(format!("--fuse-transport io-uring: {reason}"));
    }
    tracing::info!("FUSE transport: /dev/fuse ({reason})");
    Ok(Rings::none())
}

/// The running queues; dropping this stops them (and waits for their threads).
pub struct Rings {
    threads: Vec<JoinHandle<()>>,
    stop: Option<Arc<OwnedFd>>,
    stats: Vec<Arc<QueueStats>>,
}

impl Rings {
    fn none() -> Rings {
        Rings {
            threads: Vec::new(),
            stop: None,
            stats: Vec::new(),
        }
    }

    /// Whether requests are served over the rings.
    pub fn active(&self) -> bool {
        !self.threads.is_empty()
    }

    /// Requests served by each queue so far.
    pub fn requests(&self) -> Vec<u64> {
        self.stats
            .iter()
            .map(|s| s.requests.load(Ordering::Relaxed))
            .collect()
    }

    /// Stops the queues and waits for their threads.
    pub fn stop(mut self) {
        self.stop_threads();
    }

    fn stop_threads(&mut self) {
        let Some(stop) = self.stop.take() else {
            return;
        };
        // SAFETY: an 8-byte write of a live u64 to the eventfd this value owns.
        let one = 1u64;
        let _ = unsafe {
            libc::write(
                stop.as_raw_fd(),
                (&one as *const u64).cast(),
                std::mem::size_of::<u64>(),
            )
        };
        let requests = self.requests();
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                tracing::error!("a ring queue's thread panicked");
            }
        }
        tracing::debug!(?requests, "ring queues stopped");
    }
}

impl Drop for Rings {
    fn drop(&mut self) {
        self.stop_threads();
    }
}
