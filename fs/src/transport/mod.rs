//! The ways a [`crate::session::Session`] reaches its client. Each only translates: the
//! protocol's types in, the session's answers out.
//!
//! * [`fuse`]: the host kernel over `/dev/fuse`, as a mount (with passthrough).
//! * [`fuse_uring`]: the same mount's requests over io_uring, one ring per CPU, when the
//!   kernel offers it; [`fuse`] keeps INIT, FORGET and the fallback.
//! * [`virtiofs`]: a guest kernel over a vhost-user virtio-fs device, with no host mount.

pub mod fuse;
pub mod fuse_uring;
mod mapping;
pub mod virtiofs;
