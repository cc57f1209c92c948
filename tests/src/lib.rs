//! Test support for nixstorefs: a generator of sample Nix stores ([`sample`]) and helpers
//! for end-to-end tests that mount the real binary ([`harness`]), tree comparison
//! ([`compare`]), and booting VMs with guest-init under qemu ([`vm`]).

pub mod compare;
pub mod harness;
pub mod images;
pub mod random_tree;
pub mod sample;
pub mod vm;
