//! The vhost-user virtio-fs device: the queues and the loop that serves them.
//!
//! virtiofsd's library decodes FUSE requests ([`Server`]) and drives the vhost-user
//! protocol, but its own queue loop trusts the guest: a malformed ring makes it spin, a
//! request without room for a reply panics the queue thread, and a request it cannot
//! decode exits the process. This device owns the loop instead, and treats every byte of
//! the rings as hostile:
//!
//! * a ring the queue cannot be read from (an available index too far ahead, a bad
//!   descriptor table) marks the queue broken: it is logged once and never touched again
//!   until the VMM resets the device;
//! * a chain whose buffers cannot be mapped, or whose writable part has no room for a
//!   reply header, is returned to the guest with nothing written;
//! * a request that fails to decode gets an `EINVAL` reply, not an exit;
//! * a panic while serving one request is caught, logged (rate-limited) and answered with
//!   `EIO`; the device goes on serving.
//!
//! The core, [`Device::drain`], works on a [`Queue`] and guest memory directly, so the
//! hostile-guest tests drive it with crafted rings and no VMM.

use std::io::{self, Write};
use std::mem::size_of;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::RwLock;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::Backend;
use vhost_user_backend::bitmap::BitmapMmapRegion;
use vhost_user_backend::{VhostUserBackend, VringMutex, VringState, VringT};
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use virtiofsd::descriptor_utils::{Reader, Writer};
use virtiofsd::filesystem::FileSystem;
use virtiofsd::fuse::{InHeader, OutHeader, ReadIn};
use virtiofsd::server::Server;
use vm_memory::{ByteValued, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap, Le32};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::ratelimit::Limiter;
use crate::warn_limited;

/// Guest memory as the vhost-user library maps it (the bitmap is for dirty logging, which
/// this device does not offer, but the request decoder is written for it).
pub type GuestMemory = GuestMemoryMmap<BitmapMmapRegion>;
type GuestMemoryShared = GuestMemoryAtomic<GuestMemory>;

/// The high-priority queue (FORGET, INTERRUPT) and one request queue.
pub const NUM_QUEUES: usize = 2;
/// The largest queue a VMM may set up. Each in-flight chain is served before the next
/// is read, so this bounds nothing the daemon holds.
const MAX_QUEUE_SIZE: usize = 1024;
/// The tag's field in the device's configuration space (virtio spec 5.11.4).
pub const MAX_TAG_LEN: usize = 36;

/// FUSE opcodes: READ, and those that are never answered.
const FUSE_FORGET: u32 = 2;
const FUSE_READ: u32 = 15;
const FUSE_INTERRUPT: u32 = 36;
const FUSE_DESTROY: u32 = 38;
const FUSE_BATCH_FORGET: u32 = 42;

/// What happened to a queue in one pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Drained {
    /// Every available chain was served; `notify` says whether the guest must be told.
    Served {
        /// Chains returned to the guest.
        used: usize,
        /// Whether the guest asked to be notified of them.
        notify: bool,
    },
    /// The ring is malformed: the queue is left alone until the device is reset.
    Broken,
}

/// A filesystem served by the device, and the view its requests resolve in: each request
/// is served as one span of that view (`View::request`), so that what one request proved
/// (a directory where it belongs) is not proved again for every entry of a listing.
pub trait Served {
    /// The view requests resolve in, if any.
    fn view(&self) -> Option<Arc<crate::view::View>>;
}

/// The virtio-fs device: a FUSE server over the rings of one guest.
pub struct Device<F: FileSystem + Sync> {
    server: Arc<Server<F>>,
    /// The view of the filesystem served, whose request spans mark each request.
    view: Option<Arc<crate::view::View>>,
    memory: RwLock<Option<GuestMemoryShared>>,
    event_idx: AtomicBool,
    broken: [AtomicBool; NUM_QUEUES],
    regions: AtomicUsize,
    started: AtomicBool,
    /// Set when the guest queued requests while no guest memory was shared: the VMM runs
    /// the guest with memory the daemon cannot map.
    unshared: AtomicBool,
    /// Set when the VMM acknowledged the guest driver's features: the device was started.
    features_acked: AtomicBool,
    /// Kicks that found an empty ring before any request was ever served.
    empty_kicks: AtomicUsize,
    tag: Option<String>,
    warnings: Limiter,
}

/// The device's configuration space: the tag and the number of request queues.
#[repr(C)]
#[derive(Clone, Copy)]
struct VirtioFsConfig {
    tag: [u8; MAX_TAG_LEN],
    num_request_queues: Le32,
}

impl Default for VirtioFsConfig {
    fn default() -> Self {
        VirtioFsConfig {
            tag: [0; MAX_TAG_LEN],
            num_request_queues: Le32::default(),
        }
    }
}

// SAFETY: plain bytes and a little-endian integer, no padding (36 + 4 bytes).
unsafe impl ByteValued for VirtioFsConfig {}

impl<F: FileSystem + Sync + Served> Device<F> {
    /// A device serving `fs`, reporting `tag` to VMMs that read the configuration space.
    pub fn new(fs: F, tag: Option<String>) -> io::Result<Self> {
        if let Some(t) = &tag {
            if t.is_empty() || t.len() > MAX_TAG_LEN {
                return Err(io::Error::other(format!(
                    "--tag {t:?}: a tag has 1 to {MAX_TAG_LEN} bytes"
                )));
            }
        }
        Ok(Device {
            view: fs.view(),
            server: Arc::new(Server::new(fs)),
            memory: RwLock::new(None),
            event_idx: AtomicBool::new(false),
            broken: [AtomicBool::new(false), AtomicBool::new(false)],
            regions: AtomicUsize::new(0),
            started: AtomicBool::new(false),
            unshared: AtomicBool::new(false),
            features_acked: AtomicBool::new(false),
            empty_kicks: AtomicUsize::new(0),
            tag,
            warnings: Limiter::default(),
        })
    }

    /// How many guest memory regions the VMM shared: 0 means the guest's memory is not
    /// shared with the daemon (qemu without `share=on`), and no request can be served.
    pub fn memory_regions(&self) -> usize {
        self.regions.load(Ordering::Relaxed)
    }

    /// Whether the guest's driver started the device (the VMM acknowledged its features)
    /// or queued requests while the VMM shared none of the guest's memory (qemu without
    /// `share=on`: it leaves memory without a descriptor out of the table, and the rings
    /// cannot even be found): nothing can be served.
    pub fn memory_unshared(&self) -> bool {
        self.unshared.load(Ordering::Relaxed)
            || (self.features_acked.load(Ordering::Relaxed) && self.memory_regions() == 0)
    }

    /// Whether the guest ever queued a request: a VMM disconnecting before that left
    /// during setup.
    pub fn started(&self) -> bool {
        self.started.load(Ordering::Relaxed)
    }

    /// Whether queue `index` was found broken.
    pub fn is_broken(&self, index: usize) -> bool {
        self.broken
            .get(index)
            .is_some_and(|b| b.load(Ordering::Relaxed))
    }

    /// Serves every chain available on `queue` (queue `index`), returning each to the
    /// guest. With `event_idx`, passes repeat until the guest adds nothing more while
    /// notifications are off. A malformed ring marks the queue broken instead.
    pub fn drain(
        &self,
        index: usize,
        queue: &mut Queue,
        mem: &GuestMemory,
        event_idx: bool,
    ) -> Drained {
        if self.is_broken(index) {
            return Drained::Broken;
        }
        let mut used = 0;
        let mut notify = false;
        loop {
            if event_idx && queue.disable_notification(mem).is_err() {
                return self.broke(index, "cannot disable notifications");
            }
            // Collected first: serving needs the queue again to return each chain. The
            // iterator refuses an available index more than a queue ahead, so this holds
            // at most one queue's worth.
            let chains: Vec<DescriptorChain<&GuestMemory>> = match queue.iter(mem) {
                Ok(iter) => iter.collect(),
                Err(e) => return self.broke(index, &format!("bad available ring: {e:?}")),
            };
            for chain in chains {
                self.started.store(true, Ordering::Relaxed);
                let head = chain.head_index();
                let len = self.serve(mem, chain);
                if queue.add_used(mem, head, len).is_err() {
                    return self.broke(index, "cannot return a chain to the used ring");
                }
                used += 1;
                // When unsure whether the guest wants to hear, tell it.
                notify |= !event_idx || queue.needs_notification(mem).unwrap_or(true);
            }
            if !event_idx {
                break;
            }
            match queue.enable_notification(mem) {
                Ok(true) => continue,
                Ok(false) => break,
                Err(_) => return self.broke(index, "cannot enable notifications"),
            }
        }
        Drained::Served { used, notify }
    }

    fn broke(&self, index: usize, why: &str) -> Drained {
        if let Some(flag) = self.broken.get(index) {
            if !flag.swap(true, Ordering::Relaxed) {
                tracing::error!(
                    queue = index,
                    "the guest's virtqueue is malformed ({why}); it is not served until \
                     the device is reset"
                );
            }
        }
        Drained::Broken
    }

    /// Serves one request chain and returns the number of bytes written for the guest.
    fn serve(&self, mem: &GuestMemory, chain: DescriptorChain<&GuestMemory>) -> u32 {
        let reader = match Reader::new(mem, chain.clone()) {
            Ok(r) => r,
            Err(e) => {
                warn_limited!(
                    self.warnings,
                    "a request's buffers are outside guest memory: {e}"
                );
                return 0;
            }
        };
        let writer = match Writer::new(mem, chain) {
            Ok(w) => w,
            Err(e) => {
                warn_limited!(
                    self.warnings,
                    "a reply's buffers are outside guest memory: {e}"
                );
                return 0;
            }
        };
        // The header, read from a copy of the reader: the server reads it again.
        let mut peek = reader.clone();
        let header: Option<InHeader> = peek.read_obj().ok();
        let Some(header) = header else {
            warn_limited!(self.warnings, "a request shorter than its header");
            return 0;
        };
        let mut writer = writer;
        if header.opcode == FUSE_READ {
            // The library's writer hands a read whole guest buffers, however much smaller
            // the READ is; a buffer larger than the READ would take more of the file than
            // the reply reports. So the writer is cut to the header and the READ's size
            // (at most what was negotiated).
            if let Ok(read_in) = peek.read_obj::<ReadIn>() {
                let size = read_in.size.min(super::MAX_READ) as usize;
                let reply = size_of::<OutHeader>() + size;
                if writer.available_bytes() > reply {
                    let _beyond = writer.split_at(reply);
                }
            }
        }
        let replies = !matches!(
            header.opcode,
            FUSE_FORGET | FUSE_BATCH_FORGET | FUSE_INTERRUPT | FUSE_DESTROY
        );
        if replies && writer.available_bytes() < size_of::<OutHeader>() {
            warn_limited!(
                self.warnings,
                opcode = header.opcode,
                "a request with no room for a reply; returned unanswered"
            );
            return 0;
        }
        let spare = writer.clone();
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
            let serve = || {
                self.server
                    .handle_message(reader, writer, None::<&mut Backend>)
            };
            match &self.view {
                Some(view) => view.request(serve),
                None => serve(),
            }
        }));
        let errno = match outcome {
            Ok(Ok(len)) => return u32::try_from(len).unwrap_or(0),
            Ok(Err(e)) => {
                warn_limited!(self.warnings, opcode = header.opcode, "a bad request: {e}");
                libc::EINVAL
            }
            Err(_) => {
                warn_limited!(
                    self.warnings,
                    opcode = header.opcode,
                    "serving a request panicked; answering EIO"
                );
                libc::EIO
            }
        };
        if !replies {
            return 0;
        }
        reply_error(spare, header.unique, errno)
    }

    /// A kick that found nothing on a ring that never had anything: a guest only kicks
    /// after queueing a request, so a few of these mean the daemon does not see what the
    /// guest writes: the VMM mapped the guest's memory privately (qemu's
    /// `memory-backend-memfd` without `share=on` still passes the memfd, whose private
    /// copy-on-write pages the daemon never sees).
    fn empty_kick(&self) {
        const EMPTY_KICKS: usize = 3;
        if self.empty_kicks.fetch_add(1, Ordering::Relaxed) + 1 >= EMPTY_KICKS
            && !self.unshared.swap(true, Ordering::Relaxed)
        {
            tracing::error!(
                "the guest's requests never reach the daemon: its VMM does not share the \
                 guest's memory (give qemu -object memory-backend-memfd,...,share=on)"
            );
        }
    }

    /// The guest's memory now, if the VMM has shared it.
    fn memory(&self) -> Option<GuestMemoryShared> {
        self.memory.read().clone()
    }

    fn queue_event(&self, index: usize, vring: &VringMutex<GuestMemoryShared>) -> io::Result<()> {
        let Some(memory) = self.memory() else {
            warn_limited!(
                self.warnings,
                "the guest queued requests before sharing its memory"
            );
            return Ok(());
        };
        let mem = memory.memory();
        let event_idx = self.event_idx.load(Ordering::Relaxed);
        let mut state = vring.get_mut();
        let drained = self.drain(index, state.get_queue_mut(), &mem, event_idx);
        if let Drained::Served { used, notify } = drained {
            if used > 0 && notify {
                signal(&state)?;
            }
            if used == 0 && !self.started() {
                self.empty_kick();
            }
        }
        Ok(())
    }
}

/// Writes an error reply into `w`; the used length is the header's.
fn reply_error(mut w: Writer<'_>, unique: u64, errno: i32) -> u32 {
    let header = OutHeader {
        len: size_of::<OutHeader>() as u32,
        error: -errno,
        unique,
    };
    match w.write_all(header.as_slice()) {
        Ok(()) => header.len,
        Err(_) => 0,
    }
}

fn signal(state: &VringState<GuestMemoryShared>) -> io::Result<()> {
    state.signal_used_queue()
}

impl<F: FileSystem + Send + Sync + Served + 'static> VhostUserBackend for Device<F> {
    type Bitmap = BitmapMmapRegion;
    type Vring = VringMutex<GuestMemoryShared>;

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
        use virtio_bindings::bindings::virtio_ring::{
            VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
        };
        (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        // No migration (no dirty logging, no device state), no shared memory windows.
        let mut features = VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::RESET_DEVICE;
        if self.tag.is_some() {
            features |= VhostUserProtocolFeatures::CONFIG;
        }
        features
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let mut config = VirtioFsConfig {
            num_request_queues: Le32::from(1),
            ..Default::default()
        };
        if let Some(tag) = &self.tag {
            config.tag[..tag.len()].copy_from_slice(tag.as_bytes());
        }
        let mut out: Vec<u8> = config
            .as_slice()
            .iter()
            .skip(offset as usize)
            .take(size as usize)
            .copied()
            .collect();
        out.resize(size as usize, 0);
        out
    }

    fn acked_features(&self, _features: u64) {
        self.features_acked.store(true, Ordering::Relaxed);
    }

    fn reset_device(&self) {
        // Everything the previous driver held goes: handles and lookup counts.
        self.server.destroy();
        for flag in &self.broken {
            flag.store(false, Ordering::Relaxed);
        }
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn update_memory(&self, mem: GuestMemoryShared) -> io::Result<()> {
        use vm_memory::GuestMemory as _;
        self.regions
            .store(mem.memory().num_regions(), Ordering::Relaxed);
        *self.memory.write() = Some(mem);
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Self::Vring],
        _thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Ok(());
        }
        let index = usize::from(device_event);
        match vrings.get(index) {
            Some(vring) => self.queue_event(index, vring),
            // An event the device did not register: nothing to serve.
            None => Ok(()),
        }
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK).ok()
    }
}
