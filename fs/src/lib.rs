//! nixstorefs: a read-only view of exactly one Nix closure of the host's store.
//!
//! The crate is split so that the filesystem logic does not depend on how it is served:
//!
//! * [`store_path`] and [`closure`] read and validate closure inputs (store-path lists,
//!   closureInfo directories, registrations); `mkimage` reuses them.
//! * [`view`] is the closure view itself: inodes, descriptors, directory listings, reads,
//!   all resolved relative to descriptors it holds.
//! * [`session`] is what every transport serves a view with: open files, directory
//!   streams, cache policy.
//! * [`protocol`] is what both transports negotiate and report, decided once.
//! * [`transport`] holds the thin translations: [`transport::fuse`] for a host mount,
//!   [`transport::virtiofs`] for a guest over vhost-user.
//! * [`sandbox`] confines the daemon once it serves: Landlock, seccomp, no privileges.
//! * [`gc_roots`] holds the closure's paths as Nix temporary roots while they are served.

pub mod closure;
pub mod gc_roots;
pub mod session;
pub mod store_path;
pub mod transport;
pub mod view;

pub mod protocol;
mod ratelimit;
pub mod sandbox;
