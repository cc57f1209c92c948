//! Node records: what the view remembers of each node (the host object it is, where it
//! was found, its generation), how records are handed out under node numbers, and how
//! long they are kept: while clients hold the node, then among the forgotten ones in a
//! bounded LRU, for re-exporting servers' file handles.

use std::ffi::{OsStr, OsString};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use dashmap::mapref::entry::Entry;
use parking_lot::Mutex;
use rustix::fs::Statx;

use super::attr::{attr_of, Attr, DirEntry, Kind};
use super::identity::HostId;
use super::{NodeId, View, ROOT_ID};

/// How many names of one non-directory (hard links) a record remembers.
pub(super) const MAX_NAMES: usize = 4;

/// One place a host object was found: its parent's record (`None` for the store
/// directory) and its name there.
#[derive(Clone, Debug)]
pub(super) struct Name {
    pub(super) parent: Option<Arc<Known>>,
    pub(super) name: OsString,
}

impl Name {
    pub(super) fn parent_id(&self) -> NodeId {
        self.parent.as_ref().map_or(ROOT_ID, |p| p.node)
    }
}

/// What the view remembers of a node: the host object it is and where it was found;
/// nothing that costs a descriptor.
///
/// Parents are held by reference, so a record whose parent's record was dropped from the
/// view's tables can still be resolved.
#[derive(Debug)]
pub(super) struct Known {
    pub(super) node: NodeId,
    pub(super) host: HostId,
    pub(super) kind: Kind,
    pub(super) generation: u64,
    /// Every verified name, the one that resolved last first. A directory has one; a
    /// file hard-linked into several places may have a few, so that it still resolves
    /// when the place it was first found is gone.
    pub(super) names: Mutex<Vec<Name>>,
    /// The size and modification time last reported for the object: what the client's
    /// kernel believes. A file found changed at open is refused rather than served in
    /// ways that differ between passthrough and reads through the daemon.
    pub(super) reported: Mutex<Version>,
}

/// What tells one version of a file's contents from another, as far as the status shows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Version {
    pub(super) size: u64,
    pub(super) mtime: (i64, u32),
}

impl Version {
    pub(super) fn of(st: &Statx) -> Version {
        Version {
            size: st.stx_size,
            mtime: (st.stx_mtime.tv_sec, st.stx_mtime.tv_nsec),
        }
    }
}

impl Known {
    /// Returns the attributes of `st` as this node's, remembering what was reported.
    pub(super) fn report(&self, st: &Statx) -> Attr {
        *self.reported.lock() = Version::of(st);
        attr_of(st, self.node, self.generation)
    }

    pub(super) fn primary(&self) -> Name {
        self.names.lock()[0].clone()
    }

    /// Records that the object was found as `name` in `parent`.
    pub(super) fn found_at(&self, parent: Option<&Arc<Known>>, name: &OsStr) {
        let parent_id = parent.map_or(ROOT_ID, |p| p.node);
        let mut names = self.names.lock();
        if names
            .iter()
            .any(|n| n.parent_id() == parent_id && n.name == name)
        {
            return;
        }
        let found = Name {
            parent: parent.cloned(),
            name: name.to_owned(),
        };
        if self.kind == Kind::Directory {
            // A directory is in one place: found elsewhere, it has moved.
            *names = vec![found];
        } else if names.len() < MAX_NAMES {
            names.push(found);
        } else {
            *names.last_mut().expect("a record has a name") = found;
        }
    }

    /// Makes `index` the name tried first.
    pub(super) fn prefer(&self, index: usize) {
        let mut names = self.names.lock();
        if index < names.len() {
            names[..=index].rotate_right(1);
        }
    }
}

/// State that lives only while clients hold references to a node.
#[derive(Debug, Default)]
pub(super) struct Live {
    /// How many times the node was handed out and not yet forgotten.
    pub(super) lookups: u64,
    /// The directory listing, read once: the store is immutable.
    pub(super) listing: Option<Arc<[DirEntry]>>,
}

/// A record to hand out: a new one for an object just found, or one the view has.
/// Whether handing out a record counts a reference the client must FORGET.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Reference {
    /// A lookup: the client holds the node until it forgets it.
    Counted,
    /// A peek (plain listings) or an internal use: nothing to forget.
    Uncounted,
}

/// Where a node number comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Numbering {
    /// The host inode number itself.
    Direct,
    /// A number from the table (see [`super::numbering::InodeMap`]).
    Allocated,
}

pub(super) enum Candidate<'a> {
    Found {
        host: HostId,
        kind: Kind,
        parent: Option<&'a Arc<Known>>,
        name: &'a OsStr,
    },
    Existing(&'a Arc<Known>),
}

impl View {
    /// Hands out a record for `candidate` (counting one reference if asked to), and
    /// returns it. Two different host objects never get the same number.
    pub(super) fn hand_out(&self, candidate: Candidate<'_>, reference: Reference) -> Arc<Known> {
        let (host, kind) = match &candidate {
            Candidate::Found { host, kind, .. } => (*host, *kind),
            Candidate::Existing(r) => (r.host, r.kind),
        };
        if let Some(n) = self.inodes.direct(host.dev, host.mnt, host.ino) {
            if let Some(record) =
                self.claim(n, host, kind, &candidate, reference, Numbering::Direct)
            {
                return record;
            }
        }
        loop {
            let n = self.inodes.allocate(&host);
            if let Some(record) =
                self.claim(n, host, kind, &candidate, reference, Numbering::Allocated)
            {
                return record;
            }
        }
    }

    /// Takes node number `n` for the object `host`; `None` when `n` is another object's
    /// that clients still hold (or, for an allocated number, was released meanwhile).
    pub(super) fn claim(
        &self,
        n: NodeId,
        host: HostId,
        kind: Kind,
        candidate: &Candidate<'_>,
        reference: Reference,
        numbering: Numbering,
    ) -> Option<Arc<Known>> {
        let mut evicted = None;
        let record = {
            // The live entry's lock serialises everything that changes node `n`'s record.
            let live = self.live.entry(n);
            if numbering == Numbering::Allocated && self.inodes.allocated(&host) != Some(n) {
                return None;
            }
            let held = matches!(live, Entry::Occupied(_));
            let existing = self.known.get(&n).map(|r| r.clone());
            let record = match existing {
                Some(r) if r.host == host && r.kind == kind => {
                    if let Candidate::Found { parent, name, .. } = candidate {
                        r.found_at(*parent, name);
                    }
                    r
                }
                Some(_) if held => return None,
                // A forgotten record, or none: (re)create it. A record the view no longer
                // has, but a child still refers to, comes back as it was.
                other => {
                    if let Some(old) = other {
                        self.inodes.release(n, &old.host);
                        self.dirs.remove(n);
                    }
                    let record = match candidate {
                        Candidate::Existing(r) if r.node == n => Arc::clone(r),
                        Candidate::Existing(r) => Arc::new(Known {
                            node: n,
                            host,
                            kind,
                            generation: self.generations.fetch_add(1, Ordering::Relaxed),
                            names: Mutex::new(r.names.lock().clone()),
                            reported: Mutex::new(*r.reported.lock()),
                        }),
                        Candidate::Found { parent, name, .. } => Arc::new(Known {
                            node: n,
                            host,
                            kind,
                            generation: self.generations.fetch_add(1, Ordering::Relaxed),
                            names: Mutex::new(vec![Name {
                                parent: parent.cloned(),
                                name: name.to_os_string(),
                            }]),
                            reported: Mutex::new(Version::default()),
                        }),
                    };
                    self.known.insert(n, record.clone());
                    record
                }
            };
            match live {
                Entry::Occupied(mut e) if reference == Reference::Counted => {
                    e.get_mut().lookups += 1
                }
                Entry::Occupied(_) => {}
                Entry::Vacant(v) if reference == Reference::Counted => {
                    v.insert(Live {
                        lookups: 1,
                        listing: None,
                    });
                    self.forgotten.lock().pop(&n);
                }
                Entry::Vacant(v) => {
                    drop(v);
                    evicted = self.remember_forgotten(n);
                }
            }
            record
        };
        if let Some(old) = evicted {
            self.evict(old);
        }
        Some(record)
    }

    /// Puts `n` among the forgotten nodes; returns the node that falls out, if any.
    pub(super) fn remember_forgotten(&self, n: NodeId) -> Option<NodeId> {
        let mut forgotten = self.forgotten.lock();
        forgotten.put(n, ());
        if forgotten.len() > self.max_forgotten {
            forgotten.pop_lru().map(|(old, ())| old)
        } else {
            None
        }
    }

    /// Drops the record of forgotten node `n`, unless clients hold it again.
    pub(super) fn evict(&self, n: NodeId) {
        let live = self.live.entry(n);
        if let Entry::Vacant(_) = live {
            if let Some((_, record)) = self.known.remove(&n) {
                // Top-level paths keep their numbers: the root listing reports them.
                if record.names.lock().iter().all(|name| name.parent.is_some()) {
                    self.inodes.release(n, &record.host);
                }
                self.dirs.remove(n);
            }
        }
    }

    /// Releases `count` references to node `id`; the node's state goes once none are left
    /// (its record stays among the forgotten ones, up to the cap).
    pub fn forget(&self, id: NodeId, count: u64) {
        if id == ROOT_ID {
            return;
        }
        let mut evicted = None;
        let mut released = false;
        if let Entry::Occupied(mut e) = self.live.entry(id) {
            if e.get().lookups <= count {
                e.remove();
                self.dirs.remove(id);
                evicted = self.remember_forgotten(id);
                released = true;
            } else {
                e.get_mut().lookups -= count;
            }
        }
        if released && self.retiring_count() > 0 {
            // A retiring path's top-level node let go of: the path may leave.
            let top_level: Vec<OsString> = self
                .known
                .get(&id)
                .map(|r| {
                    r.names
                        .lock()
                        .iter()
                        .filter(|n| n.parent.is_none())
                        .map(|n| n.name.clone())
                        .collect()
                })
                .unwrap_or_default();
            self.release_if_retiring(&top_level);
        }
        if let Some(old) = evicted {
            self.evict(old);
        }
    }

    /// Releases every reference clients hold, as a FORGET of each live node would: for a
    /// client that went away (DESTROY, a device reset) without forgetting what it held.
    pub fn forget_all(&self) {
        let live: Vec<NodeId> = self.live.iter().map(|e| *e.key()).collect();
        for id in live {
            self.forget(id, u64::MAX);
        }
    }
}
