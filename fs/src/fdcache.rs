//! A bounded cache of directory descriptors.
//!
//! A passthrough server that keeps one descriptor per known inode runs out of descriptors
//! on a large store. The view only needs descriptors of directories (as the base of the
//! next `openat`), and only of the ones in use; this cache keeps the most recently used
//! ones, up to a fixed number, and lets the rest be reopened from their parent on demand.

use std::os::fd::OwnedFd;
use std::sync::Arc;

use lru::LruCache;
use parking_lot::Mutex;

use crate::view::{HostId, NodeId};

/// A cached directory: its `O_PATH` descriptor, the object it was verified to be, and
/// where the kernel placed it then (its `/proc/self/fd` link), so that a directory moved
/// since can be told.
#[derive(Debug)]
pub(crate) struct CachedDir {
    pub(crate) fd: OwnedFd,
    pub(crate) host: HostId,
    pub(crate) place: Vec<u8>,
}

/// Shards keep concurrent requests from queueing on one lock.
const SHARDS: usize = 8;

/// The cache, keyed by node number; each entry says which host object it is, since a
/// number can be handed out again once its node is forgotten.
pub(crate) struct FdCache {
    shards: Vec<Mutex<LruCache<NodeId, Arc<CachedDir>>>>,
}

impl FdCache {
    /// A cache holding at most `capacity` descriptors (at least one per shard).
    pub(crate) fn new(capacity: usize) -> Self {
        let per_shard = std::num::NonZeroUsize::new(capacity.div_ceil(SHARDS).max(1)).unwrap();
        FdCache {
            shards: (0..SHARDS)
                .map(|_| Mutex::new(LruCache::new(per_shard)))
                .collect(),
        }
    }

    fn shard(&self, id: NodeId) -> &Mutex<LruCache<NodeId, Arc<CachedDir>>> {
        // Node numbers are mostly host inode numbers: consecutive ones are common, so
        // mixing the bits matters more than a good hash.
        let mixed = id.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 59;
        &self.shards[mixed as usize % SHARDS]
    }

    pub(crate) fn get(&self, id: NodeId) -> Option<Arc<CachedDir>> {
        self.shard(id).lock().get(&id).cloned()
    }

    pub(crate) fn insert(&self, id: NodeId, fd: Arc<CachedDir>) {
        self.shard(id).lock().put(id, fd);
    }

    pub(crate) fn remove(&self, id: NodeId) {
        self.shard(id).lock().pop(&id);
    }

    pub(crate) fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().len()).sum()
    }
}
