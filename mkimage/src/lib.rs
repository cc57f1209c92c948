//! Reproducible erofs images of a Nix closure, written natively.
//!
//! * [`snapshot`] walks a [`nixstorefs::view::View`] (a closure, or a whole directory) into
//!   a tree of inodes, with the same safe traversal the FUSE daemon uses.
//! * [`erofs`] lays that tree out as an uncompressed erofs image.
//! * [`prefetch`] reads ahead of the writer in parallel.
//! * [`output`] makes OUTPUT appear only when the image is complete.
//! * [`mounts`] finds the mount points a snapshot leaves out.
//! * [`cache`] keeps images by a digest of their inputs, so an unchanged closure is
//!   served without being written again.

pub mod cache;
pub mod erofs;
pub mod mounts;
pub mod output;
pub mod prefetch;
pub mod snapshot;
pub mod uuid;
