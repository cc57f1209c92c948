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

use super::{HostId, NodeId};

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
pub(super) const SHARDS: usize = 8;

/// The cache, keyed by node number; each entry says which host object it is, since a
/// number can be handed out again once its node is forgotten.
pub(crate) struct DirCache {
    pub(super) shards: Vec<Mutex<LruCache<NodeId, Arc<CachedDir>>>>,
}

impl DirCache {
    /// A cache holding at most `capacity` descriptors (at least one per shard).
    pub(crate) fn new(capacity: usize) -> Self {
        let per_shard = std::num::NonZeroUsize::new(capacity.div_ceil(SHARDS).max(1)).unwrap();
        DirCache {
            shards: (0..SHARDS)
                .map(|_| Mutex::new(LruCache::new(per_shard)))
                .collect(),
        }
    }

    pub(super) fn shard(&self, id: NodeId) -> &Mutex<LruCache<NodeId, Arc<CachedDir>>> {
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

    /// Drops every cached descriptor: the next use of each directory resolves it afresh
    /// from the store, through the served set's checks.
    pub(crate) fn clear(&self) {
        for shard in &self.shards {
            shard.lock().clear();
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustix::fs::{Mode, OFlags};

    fn dir(node: u64) -> Arc<CachedDir> {
        let fd = rustix::fs::open("/", OFlags::PATH | OFlags::CLOEXEC, Mode::empty()).unwrap();
        Arc::new(CachedDir {
            fd,
            host: HostId {
                dev: 1,
                ino: node,
                mnt: 1,
                btime: None,
                handle: 0,
            },
            place: b"/".to_vec(),
        })
    }

    #[test]
    fn holds_at_most_its_capacity() {
        let cache = DirCache::new(16);
        for node in 0..1000 {
            cache.insert(node, dir(node));
        }
        // At least one per shard, at most the capacity rounded up to the shards.
        assert!(cache.len() <= 16, "{} descriptors held", cache.len());
        let kept = (0..1000).filter(|&n| cache.get(n).is_some()).count();
        assert_eq!(kept, cache.len());
    }

    #[test]
    fn entries_are_found_and_removed_by_node() {
        let cache = DirCache::new(64);
        cache.insert(5, dir(5));
        assert_eq!(cache.get(5).unwrap().host.ino, 5);
        cache.remove(5);
        assert!(cache.get(5).is_none());
        assert_eq!(cache.len(), 0);
    }
}
