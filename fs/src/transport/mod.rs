//! The ways a [`crate::session::Session`] reaches its client. Each only translates: the
//! protocol's types in, the session's answers out.
//!
//! * [`fuse`]: the host kernel over `/dev/fuse`, as a mount (with passthrough).
//! * [`virtiofs`]: a guest kernel over a vhost-user virtio-fs device, with no host mount.

pub mod fuse;
mod mapping;
pub mod virtiofs;
