//! nixstorefs: a read-only view of exactly one Nix closure of the host's store.
//!
//! The crate is split so that the filesystem logic does not depend on how it is served:
//!
//! * [`store_path`] and [`closure`] read and validate closure inputs (store-path lists,
//!   closureInfo directories, registrations); `mkimage` reuses them.
//! * [`view`] is the closure view itself: inodes, descriptors, directory listings, reads,
//!   all resolved relative to descriptors it holds.
//! * [`fuse`] serves a [`view::View`] over FUSE; the callbacks are thin.
//! * [`gc_roots`] holds the closure's paths as Nix temporary roots while they are served.

pub mod cli;
pub mod closure;
pub mod fuse;
pub mod gc_roots;
pub mod store_path;
pub mod view;

pub mod daemon;
mod fdcache;
mod mapping;
pub mod options;
mod ratelimit;
