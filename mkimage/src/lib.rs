//! Reproducible erofs images of a Nix closure (work in progress: see the issue tracker).
