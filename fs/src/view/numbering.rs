//! Node numbers: the host's inode numbers where they are unambiguous, numbers from a
//! table where they are not, so that two host objects never share a node number.

use std::collections::HashMap;

use parking_lot::Mutex;

use super::identity::HostId;
use super::{NodeId, ROOT_ID};

/// Node numbers from here on are allocated, never host inode numbers.
pub(super) const ALLOCATED_BASE: NodeId = 1 << 63;

/// Maps host identities onto node numbers, so that two host objects never share one.
///
/// Objects on the store's own mount and device keep their host inode number (below
/// 2^63), which needs no memory. Every other identity gets the next number from 2^63 on,
/// remembered in both directions: here by identity, and in the view's records by number.
#[derive(Debug)]
pub(super) struct InodeMap {
    store_dev: u64,
    store_mnt: u64,
    allocated: Mutex<Allocated>,
}

/// The allocated numbers, by identity, and the next one to give.
#[derive(Debug)]
struct Allocated {
    by_host: HashMap<HostId, NodeId>,
    next: NodeId,
}

impl InodeMap {
    /// A map for a view whose store directory is `store`.
    pub(super) fn new(store: &HostId) -> Self {
        InodeMap {
            store_dev: store.dev,
            store_mnt: store.mnt,
            allocated: Mutex::new(Allocated {
                by_host: HashMap::new(),
                next: ALLOCATED_BASE,
            }),
        }
    }

    /// The host inode number itself, when it can serve as the node number.
    pub(super) fn direct(&self, dev: u64, mnt: u64, ino: u64) -> Option<NodeId> {
        (dev == self.store_dev && mnt == self.store_mnt && ino > ROOT_ID && ino < ALLOCATED_BASE)
            .then_some(ino)
    }

    /// The allocated number of `host`, allocated now if it has none.
    pub(super) fn allocate(&self, host: &HostId) -> NodeId {
        let mut a = self.allocated.lock();
        if let Some(&n) = a.by_host.get(host) {
            return n;
        }
        let n = a.next;
        a.next += 1;
        a.by_host.insert(*host, n);
        n
    }

    /// The allocated number of `host`, if it has one.
    pub(super) fn allocated(&self, host: &HostId) -> Option<NodeId> {
        self.allocated.lock().by_host.get(host).copied()
    }

    /// Forgets the allocation of `n` to `host` (a number is never allocated twice).
    pub(super) fn release(&self, n: NodeId, host: &HostId) {
        if n >= ALLOCATED_BASE {
            let mut a = self.allocated.lock();
            if a.by_host.get(host) == Some(&n) {
                a.by_host.remove(host);
            }
        }
    }

    /// How many allocated numbers are held.
    pub(super) fn allocated_count(&self) -> usize {
        self.allocated.lock().by_host.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(dev: u64, mnt: u64, ino: u64, handle: u64) -> HostId {
        HostId {
            dev,
            ino,
            mnt,
            btime: None,
            handle,
        }
    }

    #[test]
    fn store_objects_keep_their_inode_numbers() {
        let map = InodeMap::new(&host(8, 30, 2, 0));
        assert_eq!(map.direct(8, 30, 1234), Some(1234));
        // Hard links share the number: it is the inode's.
        assert_eq!(map.direct(8, 30, 1234), Some(1234));
        assert_eq!(map.allocated_count(), 0, "direct numbers cost nothing");
    }

    #[test]
    fn other_objects_get_numbers_of_their_own() {
        let map = InodeMap::new(&host(8, 30, 2, 0));
        // Another device (a btrfs subvolume), another mount (a bind mount), the root's
        // own number, an inode number with the top bit set (overlayfs xino).
        assert_eq!(map.direct(9, 30, 1234), None);
        assert_eq!(map.direct(8, 31, 1234), None);
        assert_eq!(map.direct(8, 30, ROOT_ID), None);
        assert_eq!(map.direct(8, 30, 1 << 63 | 5), None);
        let a = map.allocate(&host(9, 30, 1234, 7));
        let b = map.allocate(&host(9, 30, 1235, 7));
        assert!(a >= ALLOCATED_BASE && b >= ALLOCATED_BASE && a != b);
        // The same identity gets the same number again; one differing only in its file
        // handle (a reused inode number) gets another.
        assert_eq!(map.allocate(&host(9, 30, 1234, 7)), a);
        assert_ne!(map.allocate(&host(9, 30, 1234, 8)), a);
        assert_eq!(map.allocated(&host(9, 30, 1234, 7)), Some(a));
    }

    #[test]
    fn a_released_number_is_never_given_again() {
        let map = InodeMap::new(&host(8, 30, 2, 0));
        let h = host(9, 30, 1234, 7);
        let a = map.allocate(&h);
        map.release(a, &h);
        assert_eq!(map.allocated(&h), None);
        assert_eq!(map.allocated_count(), 0);
        let again = map.allocate(&h);
        assert!(again > a, "numbers only grow");
        // Releasing a number the identity no longer has changes nothing.
        map.release(a, &h);
        assert_eq!(map.allocated(&h), Some(again));
    }
}
