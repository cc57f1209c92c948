//! Lays out and writes an uncompressed erofs image.
//!
//! The image, from its first byte:
//!
//! | blocks | contents |
//! |---|---|
//! | `0` | 1 KiB of zeros, the superblock, then the first inodes |
//! | `0..meta_end` | the metadata area: inodes, 32-byte aligned, each with its inline tail |
//! | `meta_end..used` | the data blocks of directories, symlinks and files, in walk order |
//! | `used..blocks` | zeros up to a 2 MiB multiple, in DAX images only ([`dax`](super::dax)) |
//!
//! `meta_blkaddr` is 0, so a nid is an inode's byte offset divided by 32; the root is placed
//! first and gets nid 36, as with mkfs.erofs. Inodes are packed into the metadata area by
//! best fit (`MetaPacker`), which loses about as little space to padding as mkfs.erofs.
//!
//! Writing takes three steps:
//!
//! 1. `Walk`: check the tree and fix the order of inodes, breadth-first from the root with
//!    each directory's entries in name order, so a directory's children sit together.
//! 2. `Layout`: decide each inode's form, data layout, nid and data blocks. All of it is
//!    known before any byte is written, since a directory's size depends on its names only.
//! 3. `ImageWriter`: write inodes in walk order into the metadata area, which is held in
//!    memory only as far as the packer may still fill it and written out in large pieces,
//!    and each inode's blocks straight to their place, streaming file contents from their
//!    sources. Block 0, with the checksummed superblock, goes last.

use std::collections::BTreeSet;
use std::fmt;
use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::FileExt;

use rustix::io::Errno;

use super::compress::{
    self, CompressedFile, FEATURE_INCOMPAT_LZ4_0PADDING, FEATURE_INCOMPAT_ZTAILPACKING,
};
use super::dax;
use super::format::{
    i_format, mode, superblock_checksum, DataLayout, Dirent, FileType, InodeCompact, InodeExtended,
    InodeVersion, SuperBlock, DIRENT_SIZE, FEATURE_COMPAT_MTIME, FEATURE_COMPAT_SB_CHKSUM,
    INODE_SLOT_SIZE, NAME_MAX, NULL_ADDR, SUPER_OFFSET, SUPER_SIZE,
};
use super::inline;
use super::source::{read_exact_at, read_source, source_ended, Contents};
use super::tree::{FileSource, ImageOptions, Inode, InodeKind};

/// The only block size the kernel mounts on 4 KiB-page machines without trouble.
const BLOCK_SIZE_BITS: u8 = 12;
/// Padding for a partial last data block.
static ZERO_BLOCK: [u8; 1 << BLOCK_SIZE_BITS] = [0; 1 << BLOCK_SIZE_BITS];
/// Longest symlink target: `PATH_MAX` less the NUL.
const SYMLINK_MAX: usize = 4095;
/// The metadata area is written out once this much of it is final.
const META_FLUSH_BYTES: usize = 4 << 20;
/// Buffer for copying file contents where `copy_file_range` cannot.
const COPY_BUFFER_BYTES: usize = 1 << 20;
/// One `copy_file_range` call moves at most this much; the kernel caps a call near 2 GiB.
const COPY_CALL_BYTES: u64 = 1 << 30;

/// What [`write_image`] wrote.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImageStats {
    /// Inodes, all kinds.
    pub inodes: u64,
    /// Regular files.
    pub files: u64,
    /// Directories, the root included.
    pub directories: u64,
    /// Symbolic links.
    pub symlinks: u64,
    /// Total size of the regular files' contents.
    pub data_bytes: u64,
    /// Size of the image.
    pub image_bytes: u64,
}

/// Why [`write_image`] failed, and on which inode.
#[derive(Debug)]
pub struct WriteError {
    /// Arena index of the inode at fault; `None` for image-wide problems (options, output).
    pub inode: Option<usize>,
    /// The inode's path inside the image as far as the writer got to know it, lossily
    /// decoded (the first entry that reached it); callers may know a better name.
    pub name_hint: Option<String>,
    /// The underlying error.
    pub cause: io::Error,
}

impl fmt::Display for WriteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.inode, &self.name_hint) {
            (Some(inode), Some(name)) => write!(f, "erofs: inode {inode} ({name}): {}", self.cause),
            (Some(inode), None) => write!(f, "erofs: inode {inode}: {}", self.cause),
            (None, _) => write!(f, "erofs: {}", self.cause),
        }
    }
}

impl std::error::Error for WriteError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.cause)
    }
}

/// Writes `tree` (index 0 is the root directory) as an erofs image to `out`, from offset 0.
///
/// The same tree and options always give the same bytes. Every byte of the image is
/// written, so `out` may be a block device; a regular file is also truncated to the image.
pub fn write_image(
    tree: &[Inode],
    options: &ImageOptions,
    out: &File,
) -> Result<ImageStats, WriteError> {
    write_image_with_progress(tree, options, out, &mut |_| {})
}

/// [`write_image`], calling `progress` with the counts so far after each inode is written
/// (for a progress bar).
pub fn write_image_with_progress(
    tree: &[Inode],
    options: &ImageOptions,
    out: &File,
    progress: &mut dyn FnMut(&ImageStats),
) -> Result<ImageStats, WriteError> {
    let volume_name = check_options(options).map_err(image_error)?;
    check_output(out).map_err(image_error)?;
    let walk = Walk::new(tree)?;
    let block = 1u64 << options.block_size_bits;
    // Compressed blocks wait in an unnamed temporary file until the layout is fixed.
    let (compressed, spill) = match options.compression {
        Some(compression) => {
            let spill = tempfile::tempfile().map_err(|e| {
                image_error(io::Error::new(
                    e.kind(),
                    format!("cannot create a temporary file for compressed blocks: {e}"),
                ))
            })?;
            let compressed = compress::compress_tree(
                tree,
                &walk.order,
                compression,
                options.threads,
                block,
                &spill,
            )
            .map_err(|(idx, cause)| walk.name(WriteError::at(idx, cause)))?;
            (compressed, Some(spill))
        }
        None => (Vec::new(), None),
    };
    let layout = Layout::new(tree, &walk, options, &compressed).map_err(|e| walk.name(e))?;
    check_room(out, layout.total_blocks << layout.bits).map_err(image_error)?;

    let mut writer = ImageWriter::new(out, tree, &layout, &compressed, spill.as_ref());
    let mut stats = ImageStats {
        inodes: walk.order.len() as u64,
        image_bytes: layout.total_blocks << layout.bits,
        ..Default::default()
    };
    for &idx in &walk.order {
        writer
            .write_inode(idx, &walk.entries[idx])
            .map_err(|cause| walk.name(WriteError::at(idx, cause)))?;
        match &tree[idx].kind {
            InodeKind::Directory { .. } => stats.directories += 1,
            InodeKind::RegularFile { size, .. } => {
                stats.files += 1;
                stats.data_bytes += size;
            }
            InodeKind::Symlink { .. } => stats.symlinks += 1,
            _ => {}
        }
        progress(&stats);
    }

    let superblock = SuperBlock {
        checksum: 0,
        feature_compat: FEATURE_COMPAT_SB_CHKSUM | FEATURE_COMPAT_MTIME,
        blkszbits: layout.bits,
        root_nid: layout.placements[0].nid as u16,
        inos: stats.inodes,
        build_time: options.build_time,
        build_time_nsec: 0,
        blocks: layout.total_blocks as u32,
        meta_blkaddr: 0,
        uuid: options.uuid,
        volume_name,
        feature_incompat: if options.compression.is_some() {
            FEATURE_INCOMPAT_LZ4_0PADDING
        } else {
            0
        } | if layout.placements.iter().any(|p| p.inline_tail > 0) {
            FEATURE_INCOMPAT_ZTAILPACKING
        } else {
            0
        },
    };
    writer
        .finish(superblock, stats.image_bytes)
        .map_err(image_error)?;
    Ok(stats)
}

impl WriteError {
    fn at(inode: usize, cause: io::Error) -> WriteError {
        WriteError {
            inode: Some(inode),
            name_hint: None,
            cause,
        }
    }
}

fn image_error(cause: io::Error) -> WriteError {
    WriteError {
        inode: None,
        name_hint: None,
        cause,
    }
}

fn invalid(message: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, message.into())
}

/// Checks the options and returns the superblock's `volume_name`.
fn check_options(options: &ImageOptions) -> io::Result<[u8; 16]> {
    if options.block_size_bits != BLOCK_SIZE_BITS {
        return Err(invalid(format!(
            "block size bits {} unsupported, only {BLOCK_SIZE_BITS}",
            options.block_size_bits
        )));
    }
    if options.dax && options.compression.is_some() {
        return Err(invalid(
            "a DAX image cannot be compressed: erofs serves only plain files through DAX",
        ));
    }
    let label = options.label.as_bytes();
    if label.len() > 15 || label.contains(&0) {
        return Err(invalid(format!(
            "volume label {:?} must be at most 15 bytes without NUL",
            options.label
        )));
    }
    let mut volume_name = [0u8; 16];
    volume_name[..label.len()].copy_from_slice(label);
    Ok(volume_name)
}

/// Positioned writes land at the end of a file opened for appending (a Linux quirk of
/// `pwrite`), which would scramble the image.
fn check_output(out: &File) -> io::Result<()> {
    if rustix::fs::fcntl_getfl(out)?.contains(rustix::fs::OFlags::APPEND) {
        return Err(invalid("the output is open for appending"));
    }
    Ok(())
}

/// Refuses a block device too small for the image before anything is written to it; on
/// one large enough, clears the superblock's block first: the superblock is written last,
/// and until then the device must not look like an image (or like the one it held).
fn check_room(out: &File, image_bytes: u64) -> io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    if !out.metadata()?.file_type().is_block_device() {
        return Ok(());
    }
    let size = rustix::fs::seek(out, rustix::fs::SeekFrom::End(0))?;
    if size < image_bytes {
        return Err(io::Error::new(
            io::ErrorKind::StorageFull,
            format!("the image needs {image_bytes} bytes, the device has {size}"),
        ));
    }
    out.write_all_at(&[0; 4096], 0)
}

/// One directory entry as written: `.` and `..` included, `target` an arena index.
struct Entry<'a> {
    name: &'a [u8],
    target: usize,
}

/// The checked tree in layout order.
struct Walk<'a> {
    /// Arena indices breadth-first from the root, entries in name order; a hard-linked
    /// inode comes where it is first reached.
    order: Vec<usize>,
    /// Each directory's entries sorted by name bytes, `.` and `..` included; empty for
    /// other inodes.
    entries: Vec<Vec<Entry<'a>>>,
    /// The directory and name by which each inode was first reached.
    first_parent: Vec<Option<(usize, &'a [u8])>>,
    /// Entries pointing at each inode, `.` and `..` not counted.
    links: Vec<u32>,
    /// Subdirectories of each directory.
    subdirs: Vec<u32>,
}

impl<'a> Walk<'a> {
    fn new(tree: &'a [Inode]) -> Result<Walk<'a>, WriteError> {
        let count = tree.len();
        if !matches!(
            tree.first(),
            Some(Inode {
                kind: InodeKind::Directory { .. },
                ..
            })
        ) {
            return Err(image_error(invalid("inode 0 must be the root directory")));
        }
        let mut walk = Walk {
            order: vec![0],
            entries: (0..count).map(|_| Vec::new()).collect(),
            first_parent: vec![None; count],
            links: vec![0; count],
            subdirs: vec![0; count],
        };
        let mut seen = vec![false; count];
        seen[0] = true;
        let mut next = 0;
        while let Some(&dir) = walk.order.get(next) {
            next += 1;
            let InodeKind::Directory { entries } = &tree[dir].kind else {
                continue;
            };
            let mut list = Vec::with_capacity(entries.len() + 2);
            for (name, child) in entries {
                let fail = |walk: &Walk, cause| {
                    let mut e = walk.name(WriteError::at(dir, cause));
                    let name = String::from_utf8_lossy(name);
                    e.name_hint = Some(match e.name_hint {
                        Some(dir) if dir != "/" => format!("{dir}/{name}"),
                        _ => format!("/{name}"),
                    });
                    e
                };
                check_name(name).map_err(|c| fail(&walk, c))?;
                if *child >= count {
                    let msg = format!("entry points at inode {child}, the tree has {count}");
                    return Err(fail(&walk, invalid(msg)));
                }
                if *child == 0 {
                    return Err(fail(&walk, invalid("entry points at the root directory")));
                }
                list.push(Entry {
                    name,
                    target: *child,
                });
            }
            list.sort_unstable_by(|a, b| a.name.cmp(b.name));
            if let Some(pair) = list.windows(2).find(|p| p[0].name == p[1].name) {
                let name = String::from_utf8_lossy(pair[0].name);
                let msg = format!("two entries are named {name:?}");
                return Err(walk.name(WriteError::at(dir, invalid(msg))));
            }
            for entry in &list {
                let child = entry.target;
                walk.links[child] = walk.links[child].saturating_add(1);
                if matches!(tree[child].kind, InodeKind::Directory { .. }) {
                    walk.subdirs[dir] += 1;
                    if seen[child] {
                        let msg = format!(
                            "directory inode {child} is reached a second time by {:?}; \
                             directories cannot be hard links",
                            String::from_utf8_lossy(entry.name)
                        );
                        return Err(walk.name(WriteError::at(dir, invalid(msg))));
                    }
                }
                if !seen[child] {
                    seen[child] = true;
                    walk.first_parent[child] = Some((dir, entry.name));
                    walk.order.push(child);
                }
            }
            let parent = walk.first_parent[dir].map_or(dir, |(parent, _)| parent);
            for (name, target) in [(&b"."[..], dir), (&b".."[..], parent)] {
                let at = list.partition_point(|e| e.name < name);
                list.insert(at, Entry { name, target });
            }
            walk.entries[dir] = list;
        }
        if let Some(lost) = seen.iter().position(|seen| !seen) {
            let cause = invalid("inode is not reachable from the root directory");
            return Err(WriteError::at(lost, cause));
        }
        Ok(walk)
    }

    /// Fills in the error's `name_hint` with the inode's path in the image.
    fn name(&self, mut error: WriteError) -> WriteError {
        if let (Some(inode), None) = (error.inode, &error.name_hint) {
            error.name_hint = self.path_of(inode);
        }
        error
    }

    fn path_of(&self, inode: usize) -> Option<String> {
        if inode == 0 {
            return Some("/".to_owned());
        }
        let mut names = Vec::new();
        let mut at = inode;
        while let Some((parent, name)) = self.first_parent.get(at).copied().flatten() {
            names.push(String::from_utf8_lossy(name));
            at = parent;
        }
        if at != 0 {
            return None;
        }
        names.reverse();
        Some(
            names
                .iter()
                .fold(String::new(), |path, name| path + "/" + name),
        )
    }
}

fn check_name(name: &[u8]) -> io::Result<()> {
    if name.is_empty() || name.len() > NAME_MAX {
        return Err(invalid(format!(
            "entry name of {} bytes, must be 1..={NAME_MAX}",
            name.len()
        )));
    }
    if name == b"." || name == b".." || name.contains(&b'/') || name.contains(&0) {
        return Err(invalid("entry name is `.`, `..`, or holds `/` or NUL"));
    }
    Ok(())
}

/// Where one inode and its data go.
#[derive(Clone, Debug)]
struct Placement {
    nid: u64,
    version: InodeVersion,
    layout: DataLayout,
    /// `i_size`.
    size: u64,
    /// Bytes of data right after the inode (the tail of a [`DataLayout::FlatInline`] inode).
    inline_len: usize,
    /// Bytes of metadata right after the inode (a compressed file's header and indexes,
    /// and its inline tail).
    extra_meta: usize,
    /// Bytes of a compressed file's last extent kept after its indexes; 0 for none.
    inline_tail: usize,
    /// Data blocks from `start_blk`; the last one is partial when the size ends inside it.
    blocks: u64,
    start_blk: u32,
    nlink: u32,
    ino: u32,
}

impl Placement {
    const UNPLACED: Placement = Placement {
        nid: 0,
        version: InodeVersion::Compact,
        layout: DataLayout::FlatPlain,
        size: 0,
        inline_len: 0,
        extra_meta: 0,
        inline_tail: 0,
        blocks: 0,
        start_blk: 0,
        nlink: 0,
        ino: 0,
    };

    /// Bytes of data in blocks, the inline tail excluded (of a plain layout).
    fn block_bytes(&self) -> u64 {
        self.size - self.inline_len as u64
    }

    /// Bytes in the metadata area: the inode and what follows it.
    fn meta_len(&self) -> usize {
        self.version.size() + self.inline_len + self.extra_meta
    }
}

/// Every inode's place in the image.
struct Layout {
    bits: u8,
    /// By arena index.
    placements: Vec<Placement>,
    /// Image offset where the metadata area ends, block-aligned.
    meta_end: u64,
    /// Blocks up to the end of the last inode's data.
    used_blocks: u64,
    /// Blocks of the image: `used_blocks`, and in a DAX image zeros up to 2 MiB.
    total_blocks: u64,
}

impl Layout {
    fn new(
        tree: &[Inode],
        walk: &Walk,
        options: &ImageOptions,
        compressed: &[Option<CompressedFile>],
    ) -> Result<Layout, WriteError> {
        let bits = options.block_size_bits;
        let block = 1u64 << bits;
        let mut placements = vec![Placement::UNPLACED; tree.len()];
        let mut packer = MetaPacker::new(block);
        for (seq, &idx) in walk.order.iter().enumerate() {
            let inode = &tree[idx];
            check_inode(inode).map_err(|cause| WriteError::at(idx, cause))?;
            let size = match &inode.kind {
                InodeKind::Directory { .. } => {
                    let blocks = dir_blocks(&walk.entries[idx], block as usize);
                    let last = blocks.last().expect("a directory has `.` and `..`");
                    (blocks.len() as u64 - 1) * block + last.1 as u64
                }
                InodeKind::RegularFile { size, .. } => *size,
                InodeKind::Symlink { target } => target.len() as u64,
                _ => 0,
            };
            let nlink = inode.nlink_hint.unwrap_or(match inode.kind {
                InodeKind::Directory { .. } => walk.subdirs[idx].saturating_add(2),
                _ => walk.links[idx],
            });
            let version = if size > u32::MAX as u64
                || inode.uid > u16::MAX as u32
                || inode.gid > u16::MAX as u32
                || nlink > u16::MAX as u32
                || i64::try_from(options.build_time) != Ok(inode.mtime)
                || inode.mtime_nsec != 0
            {
                InodeVersion::Extended
            } else {
                InodeVersion::Compact
            };

            let isize = version.size() as u64;
            let ino = u32::try_from(seq + 1)
                .map_err(|_| WriteError::at(idx, invalid("more than 2^32 inodes")))?;
            if let Some(Some(file)) = compressed.get(idx) {
                let indexes = CompressedFile::meta_bytes(size, block);
                let tail = file.tail_len();
                let inline_tail = if options.ztailpacking
                    && inline::tail_fits(isize + indexes as u64, tail as u64, block)
                {
                    tail
                } else {
                    0
                };
                let extra_meta = indexes + inline_tail;
                let offset = packer.place(isize + extra_meta as u64);
                placements[idx] = Placement {
                    nid: offset / INODE_SLOT_SIZE,
                    version,
                    layout: DataLayout::CompressedLegacy,
                    size,
                    inline_len: 0,
                    extra_meta,
                    inline_tail,
                    blocks: file.blocks() - (inline_tail > 0) as u64,
                    start_blk: 0,
                    nlink,
                    ino,
                };
                continue;
            }
            let inline_len = match inode.kind {
                // DAX maps only files whose data is all in blocks.
                InodeKind::RegularFile { .. } if options.dax && dax::laid_out_plain(size) => 0,
                _ => inline::plain_inline_len(size, block, isize),
            };
            let offset = packer.place(isize + inline_len);
            placements[idx] = Placement {
                nid: offset / INODE_SLOT_SIZE,
                version,
                layout: if inline_len > 0 {
                    DataLayout::FlatInline
                } else {
                    DataLayout::FlatPlain
                },
                size,
                inline_len: inline_len as usize,
                extra_meta: 0,
                inline_tail: 0,
                blocks: (size - inline_len).div_ceil(block),
                start_blk: 0,
                nlink,
                ino,
            };
        }
        debug_assert_eq!(placements[0].nid, 36);

        let mut meta_end = packer.end();
        // erofs-utils 1.5's fsck reads 12 bytes past every inode (an xattr header it then
        // ignores) and calls the image corrupt when they lie past the end of the image.
        // That can only happen when no data blocks follow the metadata: then an empty
        // block goes after an inode that ends too close to the end.
        let last_inode_end = placements
            .iter()
            .map(|p| p.nid * INODE_SLOT_SIZE + p.version.size() as u64)
            .max()
            .unwrap_or(0);
        if placements.iter().all(|p| p.blocks == 0) && last_inode_end + 12 > meta_end {
            meta_end += block;
        }
        let mut next_blk = meta_end >> bits;
        for &idx in &walk.order {
            let placement = &mut placements[idx];
            if placement.blocks > 0 {
                placement.start_blk = u32::try_from(next_blk)
                    .map_err(|_| WriteError::at(idx, invalid("image exceeds 2^32 blocks")))?;
                next_blk += placement.blocks;
            }
        }
        let total_blocks = if options.dax {
            dax::padded_blocks(next_blk, block)
        } else {
            next_blk
        };
        if u32::try_from(total_blocks).is_err() {
            return Err(image_error(invalid("image exceeds 2^32 blocks")));
        }
        Ok(Layout {
            bits,
            placements,
            meta_end,
            used_blocks: next_blk,
            total_blocks,
        })
    }
}

/// Packs inodes, each with its inline tail, into metadata blocks by best fit: a unit goes
/// to the fullest block that still has room for it, among the last [`OPEN_BLOCKS`] blocks,
/// else to a new block. Units never cross a block boundary.
///
/// Blocks older than that window are never touched again, so the writer can write them out
/// while later inodes are still being placed.
struct MetaPacker {
    block: u64,
    /// `open[n]`: blocks with `n` free 32-byte slots at their end.
    open: Vec<BTreeSet<u64>>,
    /// The last block opened.
    newest: u64,
}

/// How many of the latest metadata blocks stay open for more inodes.
const OPEN_BLOCKS: u64 = 1024;

impl MetaPacker {
    fn new(block: u64) -> MetaPacker {
        let slots = (block / INODE_SLOT_SIZE) as usize;
        let mut open = vec![BTreeSet::new(); slots + 1];
        // Block 0 holds the superblock first.
        let used = (SUPER_OFFSET + SUPER_SIZE as u64).next_multiple_of(INODE_SLOT_SIZE);
        open[((block - used) / INODE_SLOT_SIZE) as usize].insert(0);
        MetaPacker {
            block,
            open,
            newest: 0,
        }
    }

    /// Reserves `len` bytes and returns their image offset. A unit larger than a block
    /// (a compressed file's indexes) starts a run of new blocks; the free end of its last
    /// block stays open for smaller units.
    fn place(&mut self, len: u64) -> u64 {
        let slots = self.open.len() - 1;
        if len > self.block {
            let start = self.newest + 1;
            let whole = len / self.block;
            let rest = len % self.block;
            self.newest = start + whole - 1;
            if rest == 0 {
                return start * self.block;
            }
            self.newest += 1;
            let used = rest.div_ceil(INODE_SLOT_SIZE) as usize;
            if used < slots {
                self.open[slots - used].insert(self.newest);
            }
            return start * self.block;
        }
        let need = len.div_ceil(INODE_SLOT_SIZE) as usize;
        for free in need..=slots {
            while let Some(blk) = self.open[free].pop_first() {
                if blk + OPEN_BLOCKS < self.newest {
                    continue; // out of the window: closed for good
                }
                return self.take(blk, free, need);
            }
        }
        self.newest += 1;
        self.take(self.newest, slots, need)
    }

    fn take(&mut self, blk: u64, free: usize, need: usize) -> u64 {
        let slots = self.open.len() - 1;
        if free > need {
            self.open[free - need].insert(blk);
        }
        blk * self.block + (slots - free) as u64 * INODE_SLOT_SIZE
    }

    /// Image offset where the metadata area ends.
    fn end(&self) -> u64 {
        (self.newest + 1) * self.block
    }
}

fn check_inode(inode: &Inode) -> io::Result<()> {
    if inode.mode & !mode::PERMISSIONS != 0 {
        return Err(invalid(format!(
            "mode {:o} has bits beyond 0o7777; the file type comes from the kind",
            inode.mode
        )));
    }
    if inode.mtime_nsec >= 1_000_000_000 {
        return Err(invalid(format!("mtime_nsec {} ≥ 1e9", inode.mtime_nsec)));
    }
    if inode.nlink_hint == Some(0) {
        return Err(invalid("a link count of 0"));
    }
    match &inode.kind {
        InodeKind::Symlink { target }
            if target.is_empty() || target.len() > SYMLINK_MAX || target.contains(&0) =>
        {
            return Err(invalid(format!(
                "symlink target of {} bytes, must be 1..={SYMLINK_MAX} without NUL",
                target.len()
            )));
        }
        InodeKind::RegularFile {
            size,
            source: FileSource::Bytes(bytes),
        } if bytes.len() as u64 != *size => {
            return Err(invalid(format!(
                "size is {size} but the contents have {} bytes",
                bytes.len()
            )));
        }
        _ => {}
    }
    Ok(())
}

/// Splits sorted entries into directory blocks as mkfs.erofs does: each block takes as
/// many whole entries (dirent and name) as fit, so a block holds its own names. Returns
/// each block's entries and the bytes they use.
fn dir_blocks(entries: &[Entry], block: usize) -> Vec<(Range<usize>, usize)> {
    let mut blocks = Vec::new();
    let (mut start, mut used) = (0, 0);
    for (i, entry) in entries.iter().enumerate() {
        let need = DIRENT_SIZE + entry.name.len();
        if used + need > block {
            blocks.push((start..i, used));
            (start, used) = (i, 0);
        }
        used += need;
    }
    blocks.push((start..entries.len(), used));
    blocks
}

/// A directory's contents, every block padded to full size (the last block's padding lies
/// beyond `i_size`).
fn dir_contents(
    entries: &[Entry],
    block: usize,
    target: impl Fn(usize) -> (u64, FileType),
) -> Vec<u8> {
    let blocks = dir_blocks(entries, block);
    let mut bytes = vec![0u8; blocks.len() * block];
    for (chunk, (range, _)) in bytes.chunks_mut(block).zip(blocks) {
        let entries = &entries[range];
        let mut nameoff = entries.len() * DIRENT_SIZE;
        for (i, entry) in entries.iter().enumerate() {
            let (nid, file_type) = target(entry.target);
            let dirent = Dirent {
                nid,
                nameoff: nameoff as u16,
                file_type,
            };
            chunk[i * DIRENT_SIZE..][..DIRENT_SIZE].copy_from_slice(&dirent.to_bytes());
            chunk[nameoff..][..entry.name.len()].copy_from_slice(entry.name);
            nameoff += entry.name.len();
        }
    }
    bytes
}

fn type_of(kind: &InodeKind) -> (u16, FileType) {
    match kind {
        InodeKind::Directory { .. } => (mode::S_IFDIR, FileType::Directory),
        InodeKind::RegularFile { .. } => (mode::S_IFREG, FileType::Regular),
        InodeKind::Symlink { .. } => (mode::S_IFLNK, FileType::Symlink),
        InodeKind::CharDevice { .. } => (mode::S_IFCHR, FileType::CharDevice),
        InodeKind::BlockDevice { .. } => (mode::S_IFBLK, FileType::BlockDevice),
        InodeKind::Fifo => (mode::S_IFIFO, FileType::Fifo),
        InodeKind::Socket => (mode::S_IFSOCK, FileType::Socket),
    }
}

/// Writes inodes in walk order, their data blocks in place, and finally the superblock.
struct ImageWriter<'a> {
    out: &'a File,
    tree: &'a [Inode],
    layout: &'a Layout,
    /// By arena index, the files written compressed.
    compressed: &'a [Option<CompressedFile>],
    /// Where their blocks wait.
    spill: Option<&'a File>,
    meta: MetaArea,
    /// The highest metadata block written to so far.
    newest_meta_block: u64,
    /// For copies `copy_file_range` refuses; allocated on first use.
    copy_buffer: Vec<u8>,
}

impl<'a> ImageWriter<'a> {
    fn new(
        out: &'a File,
        tree: &'a [Inode],
        layout: &'a Layout,
        compressed: &'a [Option<CompressedFile>],
        spill: Option<&'a File>,
    ) -> ImageWriter<'a> {
        ImageWriter {
            out,
            tree,
            layout,
            compressed,
            spill,
            meta: MetaArea::new(1 << layout.bits),
            newest_meta_block: 0,
            copy_buffer: Vec::new(),
        }
    }

    /// Writes the inode at `idx`: its blocks first, then the inode and its inline tail.
    fn write_inode(&mut self, idx: usize, entries: &[Entry]) -> io::Result<()> {
        let inode = &self.tree[idx];
        let place = &self.layout.placements[idx];
        let bits = self.layout.bits;
        // The packer no longer fills blocks that far behind the newest one used so far.
        let done = self.newest_meta_block.saturating_sub(OPEN_BLOCKS) << bits;
        self.meta.flush_below(self.out, done)?;
        let meta_block = (place.nid * INODE_SLOT_SIZE) >> bits;
        self.newest_meta_block = self.newest_meta_block.max(meta_block);
        let data_at = (place.start_blk as u64) << bits;
        let (type_bits, _) = type_of(&inode.kind);
        let u = match inode.kind {
            InodeKind::CharDevice { rdev } | InodeKind::BlockDevice { rdev } => rdev,
            // A compressed inode records its block count (for `stat`'s blocks); the
            // indexes hold the addresses.
            _ if place.layout == DataLayout::CompressedLegacy => place.blocks as u32,
            _ if place.blocks > 0 => place.start_blk,
            // Nothing in blocks: mkfs.erofs marks inline-only inodes with the null address.
            _ if place.layout == DataLayout::FlatInline => NULL_ADDR,
            _ => 0,
        };
        let format = i_format(place.version, place.layout);
        let mode = type_bits | inode.mode;
        let raw = match place.version {
            InodeVersion::Compact => InodeCompact {
                format,
                mode,
                nlink: place.nlink as u16,
                size: place.size as u32,
                u,
                ino: place.ino,
                uid: inode.uid as u16,
                gid: inode.gid as u16,
            }
            .to_bytes()
            .to_vec(),
            InodeVersion::Extended => InodeExtended {
                format,
                mode,
                size: place.size,
                u,
                ino: place.ino,
                uid: inode.uid,
                gid: inode.gid,
                mtime: inode.mtime,
                mtime_nsec: inode.mtime_nsec,
                nlink: place.nlink,
            }
            .to_bytes()
            .to_vec(),
        };

        if let Some(Some(file)) = self.compressed.get(idx) {
            let spill = self
                .spill
                .expect("compressed files come with their spill file");
            let len = place.blocks << bits;
            self.copy_range(spill.as_fd(), file.spill_at, data_at, len)?;
            let block = 1usize << bits;
            let inline = place.inline_tail > 0;
            let mut meta = file.metadata(place.size, block as u64, place.start_blk, inline);
            if inline {
                // The tail's bytes, from the last block in the spill file.
                let range = file.tail_range(block);
                let mut tail = vec![0u8; range.len()];
                let at = file.spill_at + len + range.start as u64;
                read_exact_at(spill.as_fd(), &mut tail, at)?;
                meta.extend_from_slice(&tail);
            }
            self.put_inode(place, &raw).copy_from_slice(&meta);
            return Ok(());
        }
        match &inode.kind {
            InodeKind::Directory { .. } => {
                let block = 1usize << bits;
                let placements = &self.layout.placements;
                let contents = dir_contents(entries, block, |target| {
                    (placements[target].nid, type_of(&self.tree[target].kind).1)
                });
                let in_blocks = (place.blocks as usize) << bits;
                self.out.write_all_at(&contents[..in_blocks], data_at)?;
                let tail = &contents[in_blocks..][..place.inline_len];
                self.put_inode(place, &raw).copy_from_slice(tail);
            }
            InodeKind::Symlink { target } => self.put_bytes(place, &raw, target)?,
            InodeKind::RegularFile { size, source } => {
                read_source(source, *size, |contents| match contents {
                    Contents::Bytes(bytes) => self.put_bytes(place, &raw, bytes),
                    Contents::Fd(fd) => self.put_file(place, &raw, fd),
                })?
            }
            _ => {
                self.put_inode(place, &raw);
            }
        }
        Ok(())
    }

    /// Places the inode bytes in the metadata area and returns what follows it (its
    /// inline tail or its indexes), zeroed.
    fn put_inode(&mut self, place: &Placement, raw: &[u8]) -> &mut [u8] {
        let offset = place.nid * INODE_SLOT_SIZE;
        let slot = self.meta.slot(offset, place.meta_len());
        slot[..raw.len()].copy_from_slice(raw);
        &mut slot[raw.len()..]
    }

    /// Writes data held in memory: blocks, then the inode with its tail.
    fn put_bytes(&mut self, place: &Placement, raw: &[u8], data: &[u8]) -> io::Result<()> {
        let (in_blocks, tail) = data.split_at(place.block_bytes() as usize);
        self.write_blocks(place, in_blocks)?;
        self.put_inode(place, raw).copy_from_slice(tail);
        Ok(())
    }

    /// Writes `data` at the inode's first block and zero-fills the rest of its last block.
    fn write_blocks(&mut self, place: &Placement, data: &[u8]) -> io::Result<()> {
        let at = (place.start_blk as u64) << self.layout.bits;
        self.out.write_all_at(data, at)?;
        self.pad_blocks(place)
    }

    /// Zero-fills the inode's last block past its data, so no stale bytes of `out` remain.
    fn pad_blocks(&mut self, place: &Placement) -> io::Result<()> {
        let start = (place.start_blk as u64) << self.layout.bits;
        let end = start + (place.blocks << self.layout.bits);
        let data_end = start + place.block_bytes();
        if data_end < end {
            // Less than a block: only the last block can be partial.
            let zeros = &ZERO_BLOCK[..(end - data_end) as usize];
            self.out.write_all_at(zeros, data_end)?;
        }
        Ok(())
    }

    /// Streams a regular file from `src` (checked to have the inode's size): blocks by
    /// `copy_file_range`, tail into the metadata area.
    fn put_file(&mut self, place: &Placement, raw: &[u8], src: BorrowedFd<'_>) -> io::Result<()> {
        let in_blocks = place.block_bytes();
        let at = (place.start_blk as u64) << self.layout.bits;
        self.copy_range(src, 0, at, in_blocks)?;
        self.pad_blocks(place)?;
        let tail = self.put_inode(place, raw);
        read_exact_at(src, tail, in_blocks)
    }

    /// Copies `len` bytes from `src` at `src_at` to the image at `out_at`, inside the kernel
    /// where it can, by reading and writing where the filesystems do not allow that.
    fn copy_range(
        &mut self,
        src: BorrowedFd<'_>,
        mut src_at: u64,
        mut out_at: u64,
        len: u64,
    ) -> io::Result<()> {
        let end = src_at + len;
        while src_at < end {
            let chunk = (end - src_at).min(COPY_CALL_BYTES) as usize;
            // The kernel advances both offsets by what it copied.
            match rustix::fs::copy_file_range(
                src,
                Some(&mut src_at),
                self.out,
                Some(&mut out_at),
                chunk,
            ) {
                Ok(0) => return Err(source_ended(src_at)),
                Ok(_) | Err(Errno::INTR) => {}
                Err(Errno::XDEV | Errno::INVAL | Errno::NOSYS | Errno::OPNOTSUPP) => {
                    return self.copy_by_reading(src, src_at, out_at, end - src_at);
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    fn copy_by_reading(
        &mut self,
        src: BorrowedFd<'_>,
        mut src_at: u64,
        mut out_at: u64,
        len: u64,
    ) -> io::Result<()> {
        let end = src_at + len;
        if self.copy_buffer.is_empty() {
            self.copy_buffer = vec![0; COPY_BUFFER_BYTES];
        }
        while src_at < end {
            let want = (end - src_at).min(COPY_BUFFER_BYTES as u64) as usize;
            let buffer = &mut self.copy_buffer[..want];
            read_exact_at(src, buffer, src_at)?;
            self.out.write_all_at(buffer, out_at)?;
            src_at += want as u64;
            out_at += want as u64;
        }
        Ok(())
    }

    /// Writes the rest of the metadata and the superblock, and trims a regular file `out`
    /// to the image (which leaves a DAX image's padding a hole that reads as zeros).
    fn finish(self, superblock: SuperBlock, image_bytes: u64) -> io::Result<()> {
        let is_file = self.out.metadata()?.file_type().is_file();
        if !is_file {
            // A device keeps what it held: the padding is written, before the superblock
            // as everything else.
            let mut at = self.layout.used_blocks << self.layout.bits;
            while at < image_bytes {
                let len = (image_bytes - at).min(ZERO_BLOCK.len() as u64) as usize;
                self.out.write_all_at(&ZERO_BLOCK[..len], at)?;
                at += len as u64;
            }
        }
        self.meta
            .finish(self.out, self.layout.meta_end, superblock)?;
        if is_file {
            self.out.set_len(image_bytes)?;
        }
        Ok(())
    }
}

/// The metadata blocks, assembled in memory and written out in large pieces. Block 0
/// stays in memory to the end: the superblock's checksum covers the inodes that share it.
struct MetaArea {
    head: Vec<u8>,
    /// Bytes from image offset `base` on.
    buffer: Vec<u8>,
    base: u64,
}

impl MetaArea {
    fn new(block: usize) -> MetaArea {
        MetaArea {
            head: vec![0; block],
            buffer: Vec::new(),
            base: block as u64,
        }
    }

    /// The `len` bytes at image `offset`, zeroed until written, at or after what was
    /// flushed; a slot in block 0 lies within it.
    fn slot(&mut self, offset: u64, len: usize) -> &mut [u8] {
        if offset < self.head.len() as u64 {
            let at = offset as usize;
            return &mut self.head[at..at + len];
        }
        assert!(
            offset >= self.base,
            "metadata at {offset} was already written out"
        );
        let at = (offset - self.base) as usize;
        if self.buffer.len() < at + len {
            self.buffer.resize(at + len, 0);
        }
        &mut self.buffer[at..at + len]
    }

    /// Writes out the bytes below image offset `limit`, which are final, once there are
    /// enough of them to be worth a write.
    fn flush_below(&mut self, out: &File, limit: u64) -> io::Result<()> {
        if limit < self.base + META_FLUSH_BYTES as u64 {
            return Ok(());
        }
        let len = (limit - self.base) as usize;
        if self.buffer.len() < len {
            self.buffer.resize(len, 0);
        }
        out.write_all_at(&self.buffer[..len], self.base)?;
        self.buffer.drain(..len);
        self.base = limit;
        Ok(())
    }

    /// Writes what remains up to `end`, then block 0 with `superblock` and its checksum.
    fn finish(mut self, out: &File, end: u64, mut superblock: SuperBlock) -> io::Result<()> {
        if end > self.base {
            self.buffer.resize((end - self.base) as usize, 0);
            out.write_all_at(&self.buffer, self.base)?;
        }
        let sb = SUPER_OFFSET as usize..SUPER_OFFSET as usize + SUPER_SIZE;
        self.head[sb.clone()].copy_from_slice(&superblock.to_bytes());
        superblock.checksum = superblock_checksum(&self.head);
        self.head[sb].copy_from_slice(&superblock.to_bytes());
        out.write_all_at(&self.head, 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(size: u64) -> Inode {
        Inode {
            kind: InodeKind::RegularFile {
                size,
                // Planning never opens sources.
                source: FileSource::Path("/nonexistent".into()),
            },
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime: 0,
            mtime_nsec: 0,
            nlink_hint: None,
        }
    }

    fn root(children: usize) -> Inode {
        let entries = (1..=children)
            .map(|i| (format!("{i:05}").into_bytes(), i))
            .collect();
        Inode {
            kind: InodeKind::Directory { entries },
            ..file(0)
        }
    }

    fn options() -> ImageOptions {
        ImageOptions {
            uuid: [0; 16],
            label: String::new(),
            build_time: 0,
            block_size_bits: 12,
            compression: None,
            threads: 1,
            ztailpacking: false,
            dax: false,
        }
    }

    fn plan(tree: &[Inode]) -> Layout {
        plan_with(tree, &options())
    }

    fn plan_with(tree: &[Inode], options: &ImageOptions) -> Layout {
        let walk = Walk::new(tree).unwrap();
        Layout::new(tree, &walk, options, &[]).unwrap()
    }

    fn dax() -> ImageOptions {
        ImageOptions {
            dax: true,
            ..options()
        }
    }

    #[test]
    fn data_layout_by_size() {
        let sizes = [0, 1, 4064, 4065, 4095, 4096, 4097, 3 * 4096 + 1];
        let mut tree = vec![root(sizes.len())];
        tree.extend(sizes.iter().map(|&size| file(size)));
        let layout = plan(&tree);
        let got: Vec<_> = (1..tree.len())
            .map(|i| {
                let p = &layout.placements[i];
                (p.layout, p.inline_len, p.blocks)
            })
            .collect();
        use DataLayout::{FlatInline as I, FlatPlain as P};
        assert_eq!(
            got,
            [
                (P, 0, 0),
                (I, 1, 0),
                // A 32-byte inode and 4064 bytes fill a block exactly.
                (I, 4064, 0),
                (P, 0, 1),
                (P, 0, 1),
                (P, 0, 1),
                (I, 1, 1),
                (I, 1, 3),
            ]
        );
        assert_eq!(layout.placements[0].nid, 36);
    }

    /// For DAX, files of a page or more keep no tail inline; smaller ones, directories
    /// and symlinks are laid out as in any image.
    #[test]
    fn dax_data_layout_by_size() {
        let sizes = [0, 1, 4064, 4065, 4095, 4096, 4097, 8192, 3 * 4096 + 1];
        let mut tree = vec![root(sizes.len() + 2)];
        tree.extend(sizes.iter().map(|&size| file(size)));
        tree.push(Inode {
            kind: InodeKind::Symlink {
                target: b"00001".to_vec(),
            },
            ..file(0)
        });
        tree.push(Inode {
            kind: InodeKind::Directory { entries: vec![] },
            ..file(0)
        });
        let layout = plan_with(&tree, &dax());
        let got: Vec<_> = (0..tree.len())
            .map(|i| {
                let p = &layout.placements[i];
                (p.layout, p.inline_len, p.blocks)
            })
            .collect();
        use DataLayout::{FlatInline as I, FlatPlain as P};
        let root_len = layout.placements[0].size as usize;
        assert_eq!(
            got,
            [
                (I, root_len, 0),
                (P, 0, 0),
                (I, 1, 0),
                (I, 4064, 0),
                (P, 0, 1),
                (P, 0, 1),
                (P, 0, 1),
                (P, 0, 2),
                (P, 0, 2),
                (P, 0, 4),
                (I, 5, 0),
                (I, 27, 0),
            ]
        );
        // Files of a page or more: all their bytes in blocks of their own.
        for p in &layout.placements[1..=sizes.len()] {
            if p.size >= 4096 {
                assert_eq!(p.block_bytes(), p.size);
                assert_eq!(p.blocks, p.size.div_ceil(4096));
            }
        }
    }

    /// A DAX image ends on a 2 MiB boundary; the padding comes after every inode's data.
    #[test]
    fn dax_images_are_padded_to_2_mib() {
        for sizes in [&[][..], &[1], &[4097, 100_000], &[(2 << 20) - 4096 * 3]] {
            let mut tree = vec![root(sizes.len())];
            tree.extend(sizes.iter().map(|&size| file(size)));
            let plain = plan(&tree);
            assert_eq!(plain.used_blocks, plain.total_blocks);
            let layout = plan_with(&tree, &dax());
            assert_eq!(layout.total_blocks % 512, 0, "{sizes:?}");
            assert!(layout.total_blocks > 0);
            assert!(layout.total_blocks - layout.used_blocks < 512, "{sizes:?}");
            let end = layout
                .placements
                .iter()
                .map(|p| p.start_blk as u64 + p.blocks)
                .max()
                .unwrap();
            assert!(end <= layout.used_blocks, "{sizes:?}");
        }
        // Exactly 2 MiB of contents gets no padding: metadata, then data to the boundary.
        let mut tree = vec![root(1), file(0)];
        let meta_blocks = plan_with(&tree, &dax()).used_blocks;
        tree[1] = file((512 - meta_blocks) * 4096);
        let layout = plan_with(&tree, &dax());
        assert_eq!((layout.used_blocks, layout.total_blocks), (512, 512));
    }

    #[test]
    fn dax_images_are_not_compressed() {
        let options = ImageOptions {
            compression: Some(crate::erofs::Compression::Lz4),
            ..dax()
        };
        let e = check_options(&options).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        assert!(e.to_string().contains("DAX"), "{e}");
    }

    #[test]
    fn huge_file_needs_extended_inode() {
        let size = (5 << 30) + 100;
        let layout = plan(&[root(1), file(size)]);
        let p = &layout.placements[1];
        assert_eq!(p.version, InodeVersion::Extended);
        assert_eq!((p.layout, p.inline_len), (DataLayout::FlatInline, 100));
        assert_eq!(p.blocks, 5 << 18);
        assert_eq!(layout.total_blocks, p.start_blk as u64 + p.blocks);
    }

    /// Inodes with their tails never overlap nor cross a block boundary, data extents never
    /// overlap, and the metadata area ends before the data.
    #[test]
    fn placements_are_disjoint() {
        let count = 3000;
        let mut tree = vec![root(count)];
        tree.extend((0..count as u64).map(|i| file((i * 7919 + i * i * 13) % 30_000)));
        for (i, inode) in tree.iter_mut().enumerate().skip(1) {
            if i % 7 == 0 {
                inode.uid = 100_000; // extended
            }
        }
        let layout = plan(&tree);
        let block = 4096;
        let mut units: Vec<(u64, u64)> = layout
            .placements
            .iter()
            .map(|p| {
                let start = p.nid * INODE_SLOT_SIZE;
                let len = (p.version.size() + p.inline_len) as u64;
                assert!(start % block + len <= block, "unit crosses a block: {p:?}");
                (start, start + len)
            })
            .collect();
        units.sort();
        assert!(units[0].0 >= SUPER_OFFSET + SUPER_SIZE as u64);
        assert!(units.windows(2).all(|w| w[0].1 <= w[1].0), "units overlap");
        assert!(units.last().unwrap().1 <= layout.meta_end);

        let mut extents: Vec<(u64, u64)> = layout
            .placements
            .iter()
            .filter(|p| p.blocks > 0)
            .map(|p| (p.start_blk as u64, p.start_blk as u64 + p.blocks))
            .collect();
        extents.sort();
        assert!(extents[0].0 * block >= layout.meta_end);
        assert!(
            extents.windows(2).all(|w| w[0].1 == w[1].0),
            "extents overlap or gap"
        );
        assert_eq!(extents.last().unwrap().1, layout.total_blocks);

        // Best fit keeps the padding small: well under 100 bytes per inode here.
        let used: u64 = units.iter().map(|u| u.1 - u.0).sum();
        let waste = layout.meta_end - used - SUPER_OFFSET - SUPER_SIZE as u64;
        assert!(waste < 100 * count as u64, "{waste} bytes of padding");
    }
}
