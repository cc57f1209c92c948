//! A guest that plays by no rules, in-process: crafted FUSE requests on descriptor chains
//! in guest memory, served by the real [`Device`] over a real view of a store in a
//! temporary directory. No VMM, no root.
//!
//! Public (behind the `hostile-guest` feature, and in tests) so that the fuzz target
//! drives the same harness.

use std::ffi::OsStr;
use std::mem::size_of;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Address, Bytes, GuestAddress};

use super::device::{Device, Drained, GuestMemory};
use super::VirtioFs;
use crate::closure::Closure;
use crate::session::{Session, SessionLimits};
use crate::view::{View, ViewOptions};

/// FUSE opcodes the harness sends.
#[allow(missing_docs)]
pub mod opcode {
    pub const LOOKUP: u32 = 1;
    pub const FORGET: u32 = 2;
    pub const GETATTR: u32 = 3;
    pub const READLINK: u32 = 5;
    pub const OPEN: u32 = 14;
    pub const READ: u32 = 15;
    pub const STATFS: u32 = 17;
    pub const RELEASE: u32 = 18;
    pub const GETXATTR: u32 = 22;
    pub const LISTXATTR: u32 = 23;
    pub const INIT: u32 = 26;
    pub const OPENDIR: u32 = 27;
    pub const READDIR: u32 = 28;
    pub const RELEASEDIR: u32 = 29;
    pub const ACCESS: u32 = 34;
    pub const DESTROY: u32 = 38;
    pub const BATCH_FORGET: u32 = 42;
    pub const READDIRPLUS: u32 = 44;
}

/// Guest memory: the rings at 0, the request at 64 KiB, the reply from 1 MiB.
const MEMORY: usize = 4 << 20;
const QUEUE_SIZE: u16 = 16;
const REQUEST_AT: u64 = 0x1_0000;
const REPLY_AT: u64 = 0x10_0000;
const VRING_DESC_F_WRITE: u16 = 2;

/// The root's node id.
pub const ROOT: u64 = 1;

/// A store with one closure path (`CLOSURE_PATH`) and one path beside it that is not in
/// the closure (`OUTSIDE_PATH`), and a device serving the closure.
pub struct Harness {
    /// The store directory (removed when the harness is dropped).
    pub store: PathBuf,
    _top: tempfile::TempDir,
    /// The device under test.
    pub device: Device<VirtioFs>,
    /// Its session, for the counters.
    pub session: Arc<Session<()>>,
    mem: GuestMemory,
    unique: u64,
}

/// The closure path's name.
pub const CLOSURE_PATH: &str = "0c6kzph7l0dcbn2zfdv7bvl4i4krx3wr-hello";
/// A path in the store but not in the closure: its bytes must never reach the guest.
pub const OUTSIDE_PATH: &str = "1c6kzph7l0dcbn2zfdv7bvl4i4krx3wr-secret";
/// The secret's bytes.
pub const SECRET: &[u8] = b"SECRET-OUTSIDE-THE-CLOSURE";

/// A reply as the guest sees it.
#[derive(Debug)]
pub struct Reply {
    /// The used length the device reported.
    pub used: u32,
    /// The bytes the device wrote (the used length's worth).
    pub bytes: Vec<u8>,
}

impl Reply {
    /// The reply's error (0 for success); `None` when nothing was written.
    pub fn error(&self) -> Option<i32> {
        (self.bytes.len() >= 16).then(|| -i32::from_le_bytes(self.bytes[4..8].try_into().unwrap()))
    }

    /// The body after the header.
    pub fn body(&self) -> &[u8] {
        self.bytes.get(16..).unwrap_or(&[])
    }

    /// A little-endian u64 of the body at `offset`.
    pub fn u64_at(&self, offset: usize) -> u64 {
        u64::from_le_bytes(self.body()[offset..offset + 8].try_into().unwrap())
    }
}

impl Harness {
    /// A store in a temporary directory with `files` regular files of `size` bytes in the
    /// closure path's `dir` directory, served with `limits`.
    pub fn new(limits: SessionLimits, files: usize, size: usize) -> Harness {
        let top = tempfile::tempdir().expect("a temporary directory");
        let store = top.path().join("store");
        let path = store.join(CLOSURE_PATH);
        std::fs::create_dir_all(path.join("dir")).unwrap();
        std::fs::write(path.join("file"), b"hello, guest\n").unwrap();
        std::fs::write(path.join("big"), vec![b'x'; 3 << 20]).unwrap();
        std::os::unix::fs::symlink("file", path.join("link")).unwrap();
        for i in 0..files {
            std::fs::write(path.join("dir").join(format!("f{i:05}")), vec![b'a'; size]).unwrap();
        }
        std::fs::create_dir_all(store.join(OUTSIDE_PATH)).unwrap();
        std::fs::write(store.join(OUTSIDE_PATH).join("file"), SECRET).unwrap();
        let text = format!("{}\n", path.display());
        let closure = Closure::parse(text.as_bytes(), "test", &store).expect("a closure");
        let (view, _) = View::new(&closure, false, ViewOptions::default()).expect("a view");
        let fs = VirtioFs::new(Arc::new(view), limits, crate::gc_roots::RootsGate::open());
        let session = fs.session().clone();
        let device = Device::new(fs, None).unwrap();
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), MEMORY)]).unwrap();
        Harness {
            store,
            _top: top,
            device,
            session,
            mem,
            unique: 0,
        }
    }

    /// The store path's directory on the host.
    pub fn closure_path(&self) -> PathBuf {
        self.store.join(CLOSURE_PATH)
    }

    /// A request: the header for `opcode` on `node`, then `body`.
    pub fn request(&mut self, opcode: u32, node: u64, body: &[u8]) -> Vec<u8> {
        self.unique += 1;
        let mut r = Vec::with_capacity(40 + body.len());
        r.extend_from_slice(&((40 + body.len()) as u32).to_le_bytes());
        r.extend_from_slice(&opcode.to_le_bytes());
        r.extend_from_slice(&self.unique.to_le_bytes());
        r.extend_from_slice(&node.to_le_bytes());
        r.extend_from_slice(&0u32.to_le_bytes()); // uid
        r.extend_from_slice(&0u32.to_le_bytes()); // gid
        r.extend_from_slice(&1u32.to_le_bytes()); // pid
        r.extend_from_slice(&0u32.to_le_bytes()); // total_extlen, padding
        r.extend_from_slice(body);
        r
    }

    /// Sends `opcode` on `node` with `body`, with `reply_len` bytes of writable buffers.
    pub fn call(&mut self, opcode: u32, node: u64, body: &[u8], reply_len: u32) -> Reply {
        let request = self.request(opcode, node, body);
        self.send(&request, reply_len)
    }

    /// Places raw `request` bytes on a fresh ring with `reply_len` writable bytes behind
    /// them, serves the ring and returns what came back. Checks the protocol's invariant:
    /// a reply's header length is its used length.
    pub fn send(&mut self, request: &[u8], reply_len: u32) -> Reply {
        let mut descriptors = vec![(REQUEST_AT, request.len() as u32, 0)];
        if reply_len > 0 {
            descriptors.push((REPLY_AT, reply_len, VRING_DESC_F_WRITE));
        }
        self.mem
            .write_slice(request, GuestAddress(REQUEST_AT))
            .expect("the request fits guest memory");
        self.send_chain(&descriptors)
    }

    /// Serves one chain of `(address, length, flags)` descriptors.
    pub fn send_chain(&mut self, descriptors: &[(u64, u32, u16)]) -> Reply {
        // A fresh ring each time: zeroed indexes, the chain at the start of the table.
        self.mem
            .write_slice(&[0u8; 0x1000], GuestAddress(0))
            .unwrap();
        let reply_len = descriptors
            .iter()
            .filter(|d| d.2 & VRING_DESC_F_WRITE != 0)
            .map(|d| d.1 as usize)
            .sum::<usize>()
            .min(MEMORY - REPLY_AT as usize);
        // Poison the reply area, so that what the device did not write is not mistaken
        // for a reply.
        self.mem
            .write_slice(&vec![0xa5u8; reply_len], GuestAddress(REPLY_AT))
            .unwrap();
        let mock = MockSplitQueue::create(&self.mem, GuestAddress(0), QUEUE_SIZE);
        let raw: Vec<RawDescriptor> = descriptors
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, flags))| {
                let last = i + 1 == descriptors.len();
                let next_flag = if last { 0 } else { 1 };
                RawDescriptor::from(SplitDescriptor::new(
                    addr,
                    len,
                    flags | next_flag,
                    if last { 0 } else { i as u16 + 1 },
                ))
            })
            .collect();
        mock.add_desc_chains(&raw, 0).expect("a chain");
        let mut queue: Queue = mock.create_queue().expect("a queue");
        let drained = self.device.drain(1, &mut queue, &self.mem, false);
        assert!(
            matches!(drained, Drained::Served { used: 1, .. }),
            "the chain was not served: {drained:?}"
        );
        let used_addr = mock.used_addr();
        let used: u32 = self.mem.read_obj(used_addr.unchecked_add(8)).unwrap();
        let mut bytes = vec![0u8; used as usize];
        self.mem
            .read_slice(&mut bytes, GuestAddress(REPLY_AT))
            .expect("the used length is within the reply buffer");
        let reply = Reply { used, bytes };
        if used >= 16 {
            let header_len = u32::from_le_bytes(reply.bytes[0..4].try_into().unwrap());
            assert_eq!(
                header_len, used,
                "a reply's header length is its used length"
            );
        }
        reply
    }

    /// The queue with its available index `ahead` entries past what the device has read.
    pub fn ring_with_avail_ahead(&mut self, ahead: u16) -> Drained {
        self.mem
            .write_slice(&[0u8; 0x1000], GuestAddress(0))
            .unwrap();
        let mock = MockSplitQueue::create(&self.mem, GuestAddress(0), QUEUE_SIZE);
        self.mem
            .write_obj(ahead.to_le(), mock.avail_addr().unchecked_add(2))
            .unwrap();
        let mut queue: Queue = mock.create_queue().expect("a queue");
        self.device.drain(1, &mut queue, &self.mem, true)
    }

    /// LOOKUP of `name` in `parent`: the node id, or the error.
    pub fn lookup(&mut self, parent: u64, name: &str) -> Result<u64, i32> {
        let mut body = name.as_bytes().to_vec();
        body.push(0);
        let reply = self.call(opcode::LOOKUP, parent, &body, 16 + 128);
        match reply.error() {
            Some(0) => Ok(reply.u64_at(0)),
            Some(e) => Err(e),
            None => Err(-1),
        }
    }

    /// OPEN (or OPENDIR) of `node` read-only: the handle, or the error.
    pub fn open(&mut self, op: u32, node: u64) -> Result<u64, i32> {
        let reply = self.call(op, node, &[0u8; 8], 16 + 16);
        match reply.error() {
            Some(0) => Ok(reply.u64_at(0)),
            Some(e) => Err(e),
            None => Err(-1),
        }
    }

    /// A READ (or READDIR) body.
    pub fn read_in(fh: u64, offset: u64, size: u32) -> Vec<u8> {
        let mut b = Vec::with_capacity(40);
        b.extend_from_slice(&fh.to_le_bytes());
        b.extend_from_slice(&offset.to_le_bytes());
        b.extend_from_slice(&size.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes()); // read_flags
        b.extend_from_slice(&0u64.to_le_bytes()); // lock_owner
        b.extend_from_slice(&0u32.to_le_bytes()); // flags
        b.extend_from_slice(&0u32.to_le_bytes()); // padding
        b
    }

    /// A RELEASE (or RELEASEDIR) body.
    pub fn release_in(fh: u64) -> Vec<u8> {
        let mut b = fh.to_le_bytes().to_vec();
        b.extend_from_slice(&[0u8; 16]);
        b
    }

    /// The descriptors this process holds on this harness's store now (so that tests
    /// running beside it in the same process do not count).
    pub fn open_descriptors(&self) -> usize {
        let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
            return 0;
        };
        dir.flatten()
            .filter(|e| std::fs::read_link(e.path()).is_ok_and(|t| t.starts_with(&self.store)))
            .count()
    }

    /// Whether `path` is below the store (for checks on what a reply names).
    pub fn in_store(&self, path: &Path) -> bool {
        path.starts_with(&self.store)
    }

    /// Whether `bytes` hold the secret of the path outside the closure.
    pub fn leaks(bytes: &[u8]) -> bool {
        bytes.windows(SECRET.len()).any(|w| w == SECRET)
    }

    /// The view's live nodes.
    pub fn live_nodes(&self) -> usize {
        self.session.view().stats().live
    }

    /// A name as the view wants it.
    pub fn name(s: &str) -> &OsStr {
        OsStr::new(s)
    }
}

/// The size of a FUSE request header.
pub const IN_HEADER: usize = 40;
const _: () = assert!(size_of::<virtiofsd::fuse::InHeader>() == IN_HEADER);
