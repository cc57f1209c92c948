//! The served set: which store paths the root lists, and how a live update changes it.
//!
//! The set is one immutable value ([`Served`]) behind an [`ArcSwap`]: a request reads
//! whichever set is current with one atomic load, and an update builds the next set in
//! full (every path examined, nothing missing) before it swaps it in, so no request ever
//! sees half of an update.
//!
//! # What a replacement does with the paths it leaves out
//!
//! A path the new closure lacks is no longer listed, and a lookup of its name at the root
//! fails (`ENOENT`) from the moment of the swap. The client may still hold it, though: a
//! program of the old system running, a file open, a directory being listed. While a
//! client holds the path's top-level node, the path *retires*: what the client holds keeps
//! resolving (nothing it has open or looked up fails), and the path stays among
//! [`View::served_paths`] so that its garbage collector roots stay. Once the client
//! forgets that node (the kernel forgets a directory only after everything below it), the
//! path is gone: resolution through it fails (`ESTALE`) and its roots may go
//! ([`View::take_released`]). With [`Removal::Now`] that happens at once for every path
//! left out, held or not.
//!
//! Every resolution that starts at the store directory checks that the top-level name it
//! starts from is served (listed or retiring); descriptors cached below a path that left
//! are dropped when it leaves.

use std::collections::BTreeSet;
use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, BorrowedFd};
use std::path::Path;
use std::sync::atomic::Ordering;

use rustix::fs::{AtFlags, FileType};
use rustix::io::Errno;

use super::attr::{Attr, DirEntry, Kind, Time};
use super::error::ViewError;
use super::identity::HostId;
use super::numbering::InodeMap;
use super::{io_err, View, ROOT_ID};
use crate::closure::Closure;
use crate::store_path::StorePath;

/// One served set: the root's listing, what each entry was found to be, the root's
/// attributes, and the paths retiring.
#[derive(Debug)]
pub(super) struct Served {
    /// The listed store paths, sorted by name so that root lookups are a binary search.
    pub(super) listing: std::sync::Arc<[DirEntry]>,
    /// The device and inode number of each listed path when it was examined, in the
    /// listing's order: a store path replaced on the host since is refused. (Only these:
    /// the full identity costs a second system call per path, and startup is on the
    /// critical path of every VM start; the record made at the first lookup holds the
    /// full identity.)
    pub(super) hosts: Box<[(u64, u64)]>,
    /// The root directory's attributes; its times count updates, so a client that cached
    /// the root's listing by its modification time reads it again.
    pub(super) attr: Attr,
    /// Paths a replacement left out while a client held them: not listed, not found by
    /// lookup, still resolved for what the client holds until it lets go.
    pub(super) retiring: BTreeSet<OsString>,
}

impl Served {
    pub(super) fn new(
        listing: Vec<DirEntry>,
        hosts: Vec<(u64, u64)>,
        attr: Attr,
        retiring: BTreeSet<OsString>,
    ) -> Served {
        debug_assert!(listing.windows(2).all(|w| w[0].name < w[1].name));
        debug_assert_eq!(listing.len(), hosts.len());
        Served {
            listing: listing.into(),
            hosts: hosts.into(),
            attr,
            retiring,
        }
    }

    /// The index of `name` in the listing.
    pub(super) fn index(&self, name: &OsStr) -> Option<usize> {
        self.listing
            .binary_search_by(|e| e.name.as_os_str().cmp(name))
            .ok()
    }

    /// Whether resolution may start from top-level name `name`: listed or retiring.
    pub(super) fn holds(&self, name: &OsStr) -> bool {
        self.index(name).is_some() || self.retiring.contains(name)
    }
}

/// The root of a closure view: a directory of its own, read-only like the store paths in
/// it, owned like the store directory. Its times are `1 + version` seconds: fixed while
/// the served set is, moved on by every update.
pub(super) fn closure_root(uid: u32, gid: u32, listing: &[DirEntry], version: u64) -> Attr {
    let time = Time {
        secs: 1 + version as i64,
        nsecs: 0,
    };
    Attr {
        ino: ROOT_ID,
        generation: 0,
        kind: Kind::Directory,
        perm: 0o555,
        nlink: 2 + listing.iter().filter(|e| e.kind == Kind::Directory).count() as u32,
        uid,
        gid,
        size: 0,
        blocks: 0,
        blksize: 4096,
        rdev: 0,
        atime: time,
        mtime: time,
        ctime: time,
    }
}

/// What examining a closure's paths in the store found.
pub(super) struct Examined {
    /// Each path present, in the closure's order (sorted by name).
    pub(super) listing: Vec<DirEntry>,
    /// The device and inode number of each, in the same order.
    pub(super) hosts: Vec<(u64, u64)>,
    /// The paths absent from the store.
    pub(super) missing: Vec<StorePath>,
}

/// Examines each of `paths` in the store `store` (the object `store_host` at `store_dir`):
/// one `statx` per path, nothing below it.
pub(super) fn examine(
    store: BorrowedFd<'_>,
    store_dir: &Path,
    store_host: &HostId,
    inodes: &InodeMap,
    cross_mounts: bool,
    paths: &[StorePath],
) -> Result<Examined, ViewError> {
    let mut found = Examined {
        listing: Vec::with_capacity(paths.len()),
        hosts: Vec::with_capacity(paths.len()),
        missing: Vec::new(),
    };
    for path in paths {
        let name = OsStr::new(path.base_name());
        match rustix::fs::statat(store, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => {
                // Another device is another mount; a bind mount from the same device is
                // found (and refused) at lookup, by its mount id.
                if !cross_mounts && st.st_dev != store_host.dev {
                    return Err(ViewError::MountPoint {
                        path: store_dir.join(name),
                    });
                }
                found.listing.push(DirEntry {
                    name: name.to_owned(),
                    ino: inodes
                        .direct(st.st_dev, store_host.mnt, st.st_ino)
                        .unwrap_or(0),
                    kind: Kind::from_file_type(FileType::from_raw_mode(st.st_mode))
                        .unwrap_or(Kind::RegularFile),
                });
                found.hosts.push((st.st_dev, st.st_ino));
            }
            Err(Errno::NOENT) | Err(Errno::NOTDIR) => found.missing.push(path.clone()),
            Err(e) => {
                return Err(ViewError::Stat {
                    path: store_dir.join(name),
                    source: io_err(e),
                })
            }
        }
    }
    Ok(found)
}

/// How an update changes the served set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    /// The closure's paths join the served ones.
    Add,
    /// The closure's paths become the served set; what happens to the paths it lacks.
    Replace(Removal),
}

/// What becomes of the paths a replacement leaves out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Removal {
    /// Gone from the root at once; still resolved for what clients hold until they let
    /// go of it (see the module documentation).
    WhenReleased,
    /// Gone at once, held or not (`--prune`): every resolution through them fails.
    /// Files clients already opened stay readable until closed: an open file cannot be
    /// taken back from a client's kernel (with passthrough it reads the file itself).
    Now,
}

/// Whether closure paths absent from the store refuse an update or are left out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Missing {
    /// The update is refused, and nothing changes.
    Refuse,
    /// They are left out (`--allow-missing`).
    LeaveOut,
}

/// What an update did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Updated {
    /// Paths newly listed.
    pub added: Vec<OsString>,
    /// Paths no longer listed and no longer resolved.
    pub removed: Vec<OsString>,
    /// Paths no longer listed, still resolved for what clients hold.
    pub retiring: Vec<OsString>,
    /// How many paths the root lists now.
    pub listed: usize,
    /// Closure paths left out as missing (with [`Missing::LeaveOut`]).
    pub missing: Vec<StorePath>,
}

impl View {
    /// Changes the served set to the closure's paths as `change` says, or refuses the
    /// closure and changes nothing. The closure's paths are examined first, all of them
    /// (present, on the store's mount); the new set is then swapped in whole.
    ///
    /// Roots must be taken for the closure's paths before this is called, and the paths
    /// that left ([`Updated::removed`]) may lose theirs after it returns.
    pub fn update(
        &self,
        closure: &Closure,
        change: Change,
        missing: Missing,
    ) -> Result<Updated, ViewError> {
        if closure.store_dir != self.store_dir {
            return Err(ViewError::OtherStore {
                origin: closure.origin.clone(),
                closure_store: closure.store_dir.clone(),
                served_store: self.store_dir.clone(),
            });
        }
        let _writer = self.updating.lock();
        let mut found = examine(
            self.store.as_fd(),
            &self.store_dir,
            &self.store_host,
            &self.inodes,
            self.cross_mounts,
            &closure.paths,
        )?;
        if !found.missing.is_empty() && missing == Missing::Refuse {
            return Err(ViewError::Missing {
                origin: closure.origin.clone(),
                store_dir: self.store_dir.clone(),
                paths: found.missing,
            });
        }
        let old = self.served.load_full();
        let is_new: BTreeSet<OsString> = found.listing.iter().map(|e| e.name.clone()).collect();
        let mut updated = Updated {
            added: found
                .listing
                .iter()
                .filter(|e| old.index(&e.name).is_none())
                .map(|e| e.name.clone())
                .collect(),
            missing: std::mem::take(&mut found.missing),
            ..Updated::default()
        };
        let (listing, hosts, retiring) = match change {
            Change::Add => {
                // The old entries the closure does not name, beside the closure's own
                // (examined just now: what the store holds under those names today).
                let mut merged: Vec<(DirEntry, (u64, u64))> = old
                    .listing
                    .iter()
                    .zip(old.hosts.iter())
                    .filter(|(e, _)| !is_new.contains(&e.name))
                    .map(|(e, h)| (e.clone(), *h))
                    .chain(found.listing.into_iter().zip(found.hosts))
                    .collect();
                merged.sort_by(|a, b| a.0.name.cmp(&b.0.name));
                let (listing, hosts) = merged.into_iter().unzip();
                let retiring = old
                    .retiring
                    .iter()
                    .filter(|n| !is_new.contains(*n))
                    .cloned()
                    .collect();
                (listing, hosts, retiring)
            }
            Change::Replace(removal) => {
                let leaving = old
                    .listing
                    .iter()
                    .map(|e| &e.name)
                    .chain(old.retiring.iter())
                    .filter(|n| !is_new.contains(*n));
                let held = match removal {
                    Removal::WhenReleased => self.held_top_level(),
                    Removal::Now => BTreeSet::new(),
                };
                let mut retiring = BTreeSet::new();
                for name in leaving {
                    if held.contains(name) {
                        retiring.insert(name.clone());
                    } else {
                        updated.removed.push(name.clone());
                    }
                }
                (found.listing, found.hosts, retiring)
            }
        };
        updated.retiring = retiring
            .iter()
            .filter(|n| !old.retiring.contains(*n))
            .cloned()
            .collect();
        let version = self.versions.fetch_add(1, Ordering::Relaxed) + 1;
        let attr = closure_root(old.attr.uid, old.attr.gid, &listing, version);
        let next = Served::new(listing, hosts, attr, retiring);
        updated.listed = next.listing.len();
        self.served.store(std::sync::Arc::new(next));
        if !updated.removed.is_empty() || !updated.retiring.is_empty() {
            // Descriptors cached below paths that left (gone or retiring) are not kept
            // open for a client that may never come back to them: what it does use is
            // reopened, through the served set's checks.
            self.withdraw(change == Change::Replace(Removal::Now));
        }
        Ok(updated)
    }

    /// The paths served now, listed or retiring: what must stay rooted.
    pub fn served_paths(&self) -> Vec<OsString> {
        let served = self.served.load();
        let mut paths: Vec<OsString> = served.listing.iter().map(|e| e.name.clone()).collect();
        paths.extend(served.retiring.iter().cloned());
        paths
    }

    /// How many paths are retiring: left out by a replacement, still held by a client.
    pub fn retiring_count(&self) -> usize {
        self.served.load().retiring.len()
    }

    /// Whether retiring paths were released (their clients let go) since the last call:
    /// their roots may then go (see [`View::served_paths`]).
    pub fn take_released(&self) -> bool {
        self.released.swap(false, Ordering::AcqRel)
    }

    /// What clients hold below retiring paths, as (directory, name) entries, deepest
    /// first: for a transport that can ask the client's kernel to drop the entries it no
    /// longer uses, so that a retiring path is released once nothing uses it rather than
    /// once the kernel is short of memory.
    pub fn held_below_retiring(&self) -> Vec<(super::NodeId, OsString)> {
        let served = self.served.load();
        if served.retiring.is_empty() {
            return Vec::new();
        }
        let mut held: Vec<(usize, super::NodeId, OsString)> = Vec::new();
        for entry in self.live.iter() {
            let Some(record) = self.known.get(entry.key()).map(|r| r.clone()) else {
                continue;
            };
            let name = record.primary();
            // Up to the top: its name says whether the node is below a retiring path.
            let mut depth = 0;
            let mut top = name.clone();
            while let Some(parent) = top.parent.clone() {
                top = parent.primary();
                depth += 1;
                if depth > super::resolve::MAX_DEPTH {
                    break;
                }
            }
            if served.retiring.contains(&top.name) {
                held.push((depth, name.parent_id(), name.name));
            }
        }
        held.sort_by_key(|h| std::cmp::Reverse(h.0));
        held.into_iter()
            .map(|(_, parent, name)| (parent, name))
            .collect()
    }

    /// Checks that resolution may start from top-level name `name`: a path that left the
    /// served set is stale for whatever still refers to it.
    pub(super) fn check_served(&self, name: &OsStr) -> super::Result<()> {
        if self.served.load().holds(name) {
            Ok(())
        } else {
            Err(Errno::STALE)
        }
    }

    /// The top-level names of the nodes clients hold.
    fn held_top_level(&self) -> BTreeSet<OsString> {
        let mut held = BTreeSet::new();
        for entry in self.live.iter() {
            if let Some(record) = self.known.get(entry.key()) {
                for name in record.names.lock().iter() {
                    if name.parent.is_none() {
                        held.insert(name.name.clone());
                    }
                }
            }
        }
        held
    }

    /// Called when a node with the top-level names `top_level` is no longer held: a
    /// retiring path among them is released, unless another held node has its name.
    pub(super) fn release_if_retiring(&self, top_level: &[OsString]) {
        if top_level.is_empty() || self.served.load().retiring.is_empty() {
            return;
        }
        let _writer = self.updating.lock();
        let old = self.served.load_full();
        if !top_level.iter().any(|n| old.retiring.contains(n)) {
            return;
        }
        // Another node may hold the same name (a path replaced on the host and looked up
        // again): released only once none does.
        let held = self.held_top_level();
        let retiring: BTreeSet<OsString> = old
            .retiring
            .iter()
            .filter(|n| !top_level.contains(n) || held.contains(*n))
            .cloned()
            .collect();
        if retiring.len() == old.retiring.len() {
            return;
        }
        let next = Served {
            listing: old.listing.clone(),
            hosts: old.hosts.clone(),
            attr: old.attr,
            retiring,
        };
        self.served.store(std::sync::Arc::new(next));
        self.withdraw(false);
        self.released.store(true, Ordering::Release);
    }

    /// Drops what was cached below paths that left the served set: directory descriptors
    /// (every one: they are reopened, through [`View::check_served`], on their next use)
    /// and, when `listings`, the listings held nodes keep.
    fn withdraw(&self, listings: bool) {
        self.dirs.clear();
        if listings {
            for mut live in self.live.iter_mut() {
                live.listing = None;
            }
        }
    }
}
