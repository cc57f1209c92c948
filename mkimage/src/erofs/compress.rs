//! Compressed files: erofs's fixed-output ("destSize") layout with legacy lcluster indexes.
//!
//! A compressed file is cut into extents, each stored in exactly one block (a pcluster of
//! one block, so no big-pcluster feature is needed):
//!
//! * a compressed extent is as much input as LZ4 packs into 4096 bytes; it is kept only
//!   when that is more than a block of input, and its bytes go at the end of the block
//!   (`LZ4_0PADDING`: the kernel skips the leading zeros to find where the stream starts);
//! * otherwise a plain extent holds the next `min(4096, rest)` bytes as they are.
//!
//! Every extent but the last therefore crosses an lcluster boundary, so no lcluster holds
//! two extent heads, which the format forbids. The logical clusters (4 KiB of file
//! contents each) get one 8-byte index each, right after the inode and its 8-byte map
//! header and 8 bytes of padding (`Z_EROFS_VLE_LEGACY_INDEX_ALIGN`), which Linux has read
//! since erofs left staging (5.4) and therefore 6.1 reads.
//!
//! A file whose extents would take as many blocks as its plain layout is written plain,
//! as mkfs.erofs does. Files are compressed on several threads before the layout is
//! fixed, into a spill file; each file's result depends on its contents alone, so the
//! image is the same whatever the thread count.

use std::fmt;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use parking_lot::Mutex;

use super::inline::plain_blocks;
use super::source::{read_exact_at, read_source, Contents};
use super::tree::{Inode, InodeKind};

/// Longest input one extent may take. Only runs of a single byte value come near it (LZ4
/// packs at most about 255 bytes per byte of output); it bounds the buffer and the pages
/// the kernel fills for one pcluster.
pub const MAX_EXTENT_INPUT: usize = 128 << 10;
/// Bytes read from a source at a time while compressing it.
const READ_CHUNK: usize = 1 << 20;

/// `EROFS_FEATURE_INCOMPAT_LZ4_0PADDING` (`ZERO_PADDING` in newer kernels).
pub const FEATURE_INCOMPAT_LZ4_0PADDING: u32 = 0x1;
/// Size of the map header and the padding after it, before the first index.
pub const LEGACY_HEADER_BYTES: usize = 16;
/// Size of one `z_erofs_vle_decompressed_index`.
pub const INDEX_BYTES: usize = 8;

/// `EROFS_FEATURE_INCOMPAT_ZTAILPACKING`: some file's last extent follows its indexes.
pub const FEATURE_INCOMPAT_ZTAILPACKING: u32 = 0x10;
/// `Z_EROFS_ADVISE_INLINE_PCLUSTER`.
const ADVISE_INLINE_PCLUSTER: u16 = 0x0008;

/// `Z_EROFS_VLE_CLUSTER_TYPE_PLAIN`.
const CLUSTER_TYPE_PLAIN: u16 = 0;
/// `Z_EROFS_VLE_CLUSTER_TYPE_HEAD` (HEAD1: the first algorithm, LZ4).
const CLUSTER_TYPE_HEAD: u16 = 1;
/// `Z_EROFS_VLE_CLUSTER_TYPE_NONHEAD`.
const CLUSTER_TYPE_NONHEAD: u16 = 2;

/// The LZ4 compressor an image is written with; both write streams any LZ4 decoder reads,
/// so both are erofs's algorithm 0 and the image does not record which one was used.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Compression {
    /// LZ4's fast compressor.
    Lz4,
    /// LZ4HC at `level` (2..=12), slower and smaller.
    Lz4Hc {
        /// Compression level.
        level: i32,
    },
}

/// LZ4HC's default level, as mkfs.erofs uses it.
pub const LZ4HC_DEFAULT_LEVEL: i32 = 9;

impl Compression {
    /// Parses mkfs.erofs's spelling: `lz4`, `lz4hc` or `lz4hc,LEVEL`.
    pub fn parse(s: &str) -> Result<Compression, String> {
        let (name, level) = match s.split_once(',') {
            Some((name, level)) => (name, Some(level)),
            None => (s, None),
        };
        match (name, level) {
            ("lz4", None) => Ok(Compression::Lz4),
            ("lz4", Some(_)) => Err("lz4 takes no level; use lz4hc,LEVEL".into()),
            ("lz4hc", None) => Ok(Compression::Lz4Hc {
                level: LZ4HC_DEFAULT_LEVEL,
            }),
            ("lz4hc", Some(level)) => match level.parse::<i32>() {
                Ok(level @ 2..=12) => Ok(Compression::Lz4Hc { level }),
                _ => Err(format!("lz4hc level {level:?}: must be 2..=12")),
            },
            ("zstd" | "lzma" | "deflate", _) => Err(format!(
                "{name} is not written by this tool: Linux 6.1 reads only LZ4 (and LZMA) \
                 erofs images; use lz4 or lz4hc"
            )),
            _ => Err(format!(
                "unknown compressor {name:?}: use lz4 or lz4hc[,LEVEL]"
            )),
        }
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Compression::Lz4 => write!(f, "lz4"),
            Compression::Lz4Hc { level } => write!(f, "lz4hc,{level}"),
        }
    }
}

/// One extent of a compressed file: it starts at logical byte `start` and fills one block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Extent {
    start: u64,
    /// Stored as it is rather than compressed.
    raw: bool,
    /// Bytes of its block that hold it: at the start of the block when raw, at the end
    /// when compressed.
    stored: u16,
}

/// A file the writer stores compressed: its extents, block `k` of the spill file region
/// holding extent `k`.
#[derive(Debug)]
pub(crate) struct CompressedFile {
    extents: Vec<Extent>,
    /// Byte offset of the blocks in the spill file.
    pub(crate) spill_at: u64,
}

impl CompressedFile {
    /// Blocks the file takes in the image, its last extent included.
    pub(crate) fn blocks(&self) -> u64 {
        self.extents.len() as u64
    }

    /// Bytes of the last extent, which ztailpacking moves after the indexes.
    pub(crate) fn tail_len(&self) -> usize {
        self.extents.last().map_or(0, |e| e.stored as usize)
    }

    /// Where the last extent's bytes lie in its block.
    pub(crate) fn tail_range(&self, block: usize) -> std::ops::Range<usize> {
        match self.extents.last() {
            Some(e) if e.raw => 0..e.stored as usize,
            Some(e) => block - e.stored as usize..block,
            None => 0..0,
        }
    }

    /// Bytes after the inode: the map header, its padding and one index per lcluster.
    pub(crate) fn meta_bytes(size: u64, block: u64) -> usize {
        LEGACY_HEADER_BYTES + INDEX_BYTES * size.div_ceil(block) as usize
    }

    /// The map header and the indexes, for a file of `size` bytes whose first block is
    /// `start_blk`; with `inline_tail`, the last extent is not in a block but follows the
    /// indexes (the caller appends its bytes).
    pub(crate) fn metadata(
        &self,
        size: u64,
        block: u64,
        start_blk: u32,
        inline_tail: bool,
    ) -> Vec<u8> {
        let lclusters = size.div_ceil(block) as usize;
        let mut meta = vec![0u8; CompressedFile::meta_bytes(size, block)];
        // Map header: no fragment offset, h_advise 0 (legacy indexes, one block per
        // pcluster) or INLINE_PCLUSTER with the tail's size, algorithm 0 (LZ4) for both
        // heads, lcluster bits 12 - 12.
        if inline_tail {
            meta[2..4].copy_from_slice(&(self.tail_len() as u16).to_le_bytes());
            meta[4..6].copy_from_slice(&ADVISE_INLINE_PCLUSTER.to_le_bytes());
        }
        let index = |meta: &mut [u8], lcn: usize, advise: u16, clusterofs: u16, u: [u8; 4]| {
            let at = LEGACY_HEADER_BYTES + lcn * INDEX_BYTES;
            meta[at..at + 2].copy_from_slice(&advise.to_le_bytes());
            meta[at + 2..at + 4].copy_from_slice(&clusterofs.to_le_bytes());
            meta[at + 4..at + 8].copy_from_slice(&u);
        };
        // Indexes written so far: each lcluster gets exactly one, in order.
        let mut filled = 0;
        for (k, extent) in self.extents.iter().enumerate() {
            let end = self.extents.get(k + 1).map_or(size, |next| next.start);
            let head = (extent.start / block) as usize;
            let clusterofs = (extent.start % block) as u16;
            let kind = if extent.raw {
                CLUSTER_TYPE_PLAIN
            } else {
                CLUSTER_TYPE_HEAD
            };
            // The inline tail has no block; mkfs.erofs writes 0 there too.
            let blkaddr = if inline_tail && k + 1 == self.extents.len() {
                0
            } else {
                start_blk + k as u32
            };
            debug_assert_eq!(filled, head, "two extents start in one lcluster");
            index(&mut meta, head, kind, clusterofs, blkaddr.to_le_bytes());
            filled = head + 1;
            // The lclusters whose first byte lies inside the extent point back at its head
            // and forward at the lcluster that holds the next head.
            let next_head = (end / block) as usize;
            for lcn in head + 1..next_head.min(lclusters) {
                let back = (lcn - head) as u16;
                let ahead = (next_head - lcn) as u16;
                let mut u = [0u8; 4];
                u[..2].copy_from_slice(&back.to_le_bytes());
                u[2..].copy_from_slice(&ahead.to_le_bytes());
                index(&mut meta, lcn, CLUSTER_TYPE_NONHEAD, clusterofs, u);
                filled = lcn + 1;
            }
        }
        // The lcluster where the file ends mid-way, unless an extent starts in it: a plain
        // index whose offset marks the end of the last extent (as mkfs.erofs writes it).
        if filled + 1 == lclusters {
            let clusterofs = (size % block) as u16;
            index(
                &mut meta,
                lclusters - 1,
                CLUSTER_TYPE_PLAIN,
                clusterofs,
                [0; 4],
            );
            filled = lclusters;
        }
        debug_assert_eq!(filled, lclusters);
        meta
    }
}

/// An LZ4 compressor with its state, one per thread.
struct Lz4 {
    compression: Compression,
    /// LZ4HC's state, 8-byte aligned as liblz4 asks.
    hc_state: Vec<u64>,
}

extern "C" {
    // Both are in the liblz4 that lz4-sys builds and links; lz4-sys does not declare them.
    fn LZ4_compress_destSize(
        src: *const std::ffi::c_char,
        dst: *mut std::ffi::c_char,
        src_size: *mut std::ffi::c_int,
        target_dst_size: std::ffi::c_int,
    ) -> std::ffi::c_int;
    fn LZ4_sizeofStateHC() -> std::ffi::c_int;
    fn LZ4_compress_HC_destSize(
        state: *mut std::ffi::c_void,
        src: *const std::ffi::c_char,
        dst: *mut std::ffi::c_char,
        src_size: *mut std::ffi::c_int,
        target_dst_size: std::ffi::c_int,
        level: std::ffi::c_int,
    ) -> std::ffi::c_int;
}

// Makes sure lz4-sys's library is linked in even though none of its own items is used.
use lz4_sys as _;

impl Lz4 {
    fn new(compression: Compression) -> Lz4 {
        let hc_state = match compression {
            Compression::Lz4 => Vec::new(),
            // SAFETY: a pure function of liblz4's build.
            Compression::Lz4Hc { .. } => {
                vec![0u64; unsafe { LZ4_sizeofStateHC() } as usize / 8 + 1]
            }
        };
        Lz4 {
            compression,
            hc_state,
        }
    }

    /// Compresses as much of `src` as fits into `dst`; returns (bytes written, bytes read).
    fn dest_size(&mut self, src: &[u8], dst: &mut [u8]) -> (usize, usize) {
        let fast = self.raw_dest_size(Compression::Lz4, src, dst);
        let Compression::Lz4Hc { .. } = self.compression else {
            return fast;
        };
        // LZ4HC scans all of its input for matches before it notices that the output is
        // full when there are no matches (incompressible data): 32 times the work on a
        // 128 KiB window. So it first gets twice what the fast compressor consumed, and
        // the whole window only if it used all of that.
        let window = (fast.1 * 2).max(2 * dst.len()).min(src.len());
        let mut hc = self.raw_dest_size(self.compression, &src[..window], dst);
        if hc.1 == window && window < src.len() {
            hc = self.raw_dest_size(self.compression, src, dst);
        }
        if hc.1 >= fast.1 {
            return hc;
        }
        // Rarely the fast compressor packs more input; its output is in `dst` again.
        self.raw_dest_size(Compression::Lz4, src, dst)
    }

    fn raw_dest_size(
        &mut self,
        compression: Compression,
        src: &[u8],
        dst: &mut [u8],
    ) -> (usize, usize) {
        let mut read = src.len().min(i32::MAX as usize) as std::ffi::c_int;
        // SAFETY: the pointers and lengths describe live buffers; liblz4 reads at most
        // `read` bytes of `src` and writes at most `dst.len()` bytes of `dst`; the HC state
        // has LZ4_sizeofStateHC() bytes, 8-byte aligned.
        let written = unsafe {
            match compression {
                Compression::Lz4 => LZ4_compress_destSize(
                    src.as_ptr().cast(),
                    dst.as_mut_ptr().cast(),
                    &mut read,
                    dst.len() as std::ffi::c_int,
                ),
                Compression::Lz4Hc { level } => LZ4_compress_HC_destSize(
                    self.hc_state.as_mut_ptr().cast(),
                    src.as_ptr().cast(),
                    dst.as_mut_ptr().cast(),
                    &mut read,
                    dst.len() as std::ffi::c_int,
                    level,
                ),
            }
        };
        (written.max(0) as usize, read.max(0) as usize)
    }
}

/// Reads a source's contents in order, a chunk at a time.
struct Reader<'a> {
    contents: Contents<'a>,
    size: u64,
    /// Bytes `[base, base + buffer.len())` of the file.
    buffer: Vec<u8>,
    base: u64,
}

impl<'a> Reader<'a> {
    fn new(contents: Contents<'a>, size: u64) -> Reader<'a> {
        Reader {
            contents,
            size,
            buffer: Vec::new(),
            base: 0,
        }
    }

    /// At least `min(want, size - at)` bytes from `at` on (`at` never moves back).
    fn at(&mut self, at: u64, want: usize) -> io::Result<&[u8]> {
        let end = (at + want as u64).min(self.size);
        match self.contents {
            Contents::Bytes(bytes) => Ok(&bytes[at as usize..end as usize]),
            Contents::Fd(fd) => {
                if self.base + (self.buffer.len() as u64) < end {
                    self.buffer.drain(..(at - self.base) as usize);
                    self.base = at;
                    let have = self.buffer.len();
                    let more = (READ_CHUNK.max(want) as u64).min(self.size - at - have as u64);
                    self.buffer.resize(have + more as usize, 0);
                    read_exact_at(fd, &mut self.buffer[have..], at + have as u64)?;
                }
                let from = (at - self.base) as usize;
                Ok(&self.buffer[from..from + (end - at) as usize])
            }
        }
    }
}

/// Where one file's blocks go in the spill file: a range reserved for as many blocks as
/// the file could need, filled a few MiB at a time so that a worker never holds a whole
/// large file's blocks.
struct Sink<'a> {
    spill: &'a File,
    at: u64,
    written: u64,
}

/// Blocks a worker collects before writing them to the spill file.
const SPILL_CHUNK: usize = 4 << 20;

impl Sink<'_> {
    fn flush(&mut self, blocks: &mut Vec<u8>) -> io::Result<()> {
        self.spill.write_all_at(blocks, self.at + self.written)?;
        self.written += blocks.len() as u64;
        blocks.clear();
        Ok(())
    }

    /// Gives the space back when the file is written plain after all; a filesystem that
    /// cannot punch holes keeps it until the spill file goes.
    fn discard(&self) {
        let _ = rustix::fs::fallocate(
            self.spill,
            rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE,
            self.at,
            self.written,
        );
    }
}

/// Cuts a file of `size` bytes into extents, its blocks going to `sink` through `blocks`.
fn compress_file(
    lz4: &mut Lz4,
    reader: &mut Reader,
    size: u64,
    block: usize,
    blocks: &mut Vec<u8>,
    sink: &mut Sink,
) -> io::Result<Vec<Extent>> {
    let mut extents = Vec::new();
    let mut dst = vec![0u8; block];
    let mut pos = 0u64;
    while pos < size {
        let input = reader.at(pos, MAX_EXTENT_INPUT)?;
        let (written, read) = if input.len() > block {
            lz4.dest_size(input, &mut dst)
        } else {
            (0, 0)
        };
        if written > 0 && read > block {
            // Zero padding in front: the stream ends at the end of the block.
            let at = blocks.len();
            blocks.resize(at + block, 0);
            blocks[at + block - written..].copy_from_slice(&dst[..written]);
            extents.push(Extent {
                start: pos,
                raw: false,
                stored: written as u16,
            });
            pos += read as u64;
        } else {
            let take = input.len().min(block);
            let at = blocks.len();
            blocks.resize(at + block, 0);
            blocks[at..at + take].copy_from_slice(&input[..take]);
            extents.push(Extent {
                start: pos,
                raw: true,
                stored: take as u16,
            });
            pos += take as u64;
        }
        if blocks.len() >= SPILL_CHUNK {
            sink.flush(blocks)?;
        }
    }
    sink.flush(blocks)?;
    Ok(extents)
}

/// Compresses every regular file of `tree` that can save a block, on `threads` threads,
/// writing their blocks to `spill`. Returns each inode's result by arena index, `None`
/// for inodes written plain; on failure, the inode and the cause.
pub(crate) fn compress_tree(
    tree: &[Inode],
    order: &[usize],
    compression: Compression,
    threads: usize,
    block: u64,
    spill: &File,
) -> Result<Vec<Option<CompressedFile>>, (usize, io::Error)> {
    let candidates: Vec<usize> = order
        .iter()
        .copied()
        .filter(|&idx| match &tree[idx].kind {
            // A file that fits in one block with its inode cannot get smaller.
            InodeKind::RegularFile { size, .. } => plain_blocks(*size, block, 64) >= 2,
            _ => false,
        })
        .collect();
    let results: Mutex<Vec<Option<CompressedFile>>> =
        Mutex::new((0..tree.len()).map(|_| None).collect());
    let failure: Mutex<Option<(usize, io::Error)>> = Mutex::new(None);
    let next = AtomicUsize::new(0);
    let spill_end = AtomicU64::new(0);
    let failed = AtomicBool::new(false);
    let worker = || {
        let mut lz4 = Lz4::new(compression);
        let mut blocks = Vec::new();
        loop {
            if failed.load(Ordering::Relaxed) {
                return;
            }
            let Some(&idx) = candidates.get(next.fetch_add(1, Ordering::Relaxed)) else {
                return;
            };
            blocks.clear();
            let InodeKind::RegularFile { size, .. } = &tree[idx].kind else {
                continue;
            };
            // Every extent takes at least a block of input, or the rest of the file.
            let most = size.div_ceil(block) * block;
            let mut sink = Sink {
                spill,
                at: spill_end.fetch_add(most, Ordering::Relaxed),
                written: 0,
            };
            match compress_one(&tree[idx], &mut lz4, block, &mut blocks, &mut sink) {
                Ok(Some(extents)) => {
                    results.lock()[idx] = Some(CompressedFile {
                        extents,
                        spill_at: sink.at,
                    });
                }
                Ok(None) => sink.discard(),
                Err(e) => {
                    failed.store(true, Ordering::Relaxed);
                    let mut failure = failure.lock();
                    // The first file in walk order among those that failed, whatever the
                    // timing.
                    if failure.as_ref().is_none_or(|(other, _)| idx < *other) {
                        *failure = Some((idx, e));
                    }
                    return;
                }
            }
        }
    };
    std::thread::scope(|scope| {
        for _ in 1..threads.max(1) {
            scope.spawn(worker);
        }
        worker();
    });
    if let Some(failure) = failure.into_inner() {
        return Err(failure);
    }
    Ok(results.into_inner())
}

/// Compresses one regular file; `None` when it would not take fewer blocks than plain.
fn compress_one(
    inode: &Inode,
    lz4: &mut Lz4,
    block: u64,
    blocks: &mut Vec<u8>,
    sink: &mut Sink,
) -> io::Result<Option<Vec<Extent>>> {
    let InodeKind::RegularFile { size, source } = &inode.kind else {
        return Ok(None);
    };
    let size = *size;
    let extents = read_source(source, size, |contents| {
        let mut reader = Reader::new(contents, size);
        compress_file(lz4, &mut reader, size, block as usize, blocks, sink)
    })?;
    Ok(worth_it(extents, size, block))
}

/// Keeps the extents only if they save a block over the plain layout (reckoned with the
/// larger inode beside an inline tail, so the choice does not depend on the inode's form).
fn worth_it(extents: Vec<Extent>, size: u64, block: u64) -> Option<Vec<Extent>> {
    ((extents.len() as u64) < plain_blocks(size, block, 64)).then_some(extents)
}
