//! A native writer of erofs images, plain or LZ4-compressed.
//!
//! The caller describes the tree as an arena of [`Inode`]s (index 0 is the root directory)
//! and [`write_image`] lays it out deterministically: the same tree and options give the
//! same bytes. [`format`](mod@format) holds the on-disk structures, [`writer`] the layout and writing,
//! [`compress`] the compressed files, [`dax`] what changes in images meant for DAX. Both
//! the writer and the compressor read a file's contents through `source` and decide which
//! tails go inline by the rule in `inline`.

#![warn(missing_docs)]

pub mod compress;
pub mod dax;
pub mod format;
mod inline;
mod source;
mod tree;
pub mod writer;

#[cfg(test)]
mod tests;

pub use compress::Compression;
pub use tree::{FileSource, ImageOptions, Inode, InodeKind, OpenFile};
pub use writer::{write_image, write_image_with_progress, ImageStats, WriteError};
