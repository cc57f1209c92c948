//! A native writer of uncompressed erofs images.
//!
//! The caller describes the tree as an arena of [`Inode`]s (index 0 is the root directory)
//! and [`write_image`] lays it out deterministically: the same tree and options give the
//! same bytes. [`format`](mod@format) holds the on-disk structures, [`writer`] the layout and writing.

#![warn(missing_docs)]

pub mod format;
mod tree;
pub mod writer;

#[cfg(test)]
mod tests;

pub use tree::{FileSource, ImageOptions, Inode, InodeKind, OpenFile};
pub use writer::{write_image, write_image_with_progress, ImageStats, WriteError};
