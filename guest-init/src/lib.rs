//! Mounting the Nix store inside a VM guest (work in progress: see the issue tracker).
