//! Round trips through the real tools: every image must pass `fsck.erofs --extract`, the
//! kernel must mount it, and the mounted tree must equal the input. Mounting needs root;
//! these tests fail rather than skip without it.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::Write;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use rustix::mount::{MountFlags, UnmountFlags};
use tempfile::TempDir;

use super::format::{superblock_checksum, SuperBlock, SUPER_OFFSET, SUPER_SIZE};
use super::{write_image, FileSource, ImageOptions, ImageStats, Inode, InodeKind};

const BUILD_TIME: u64 = 1_700_000_000;
const UUID: [u8; 16] = [
    0x6b, 0x2f, 0x3a, 0x10, 0x9c, 0x44, 0x4e, 0x0b, 0x8d, 0x1e, 0x52, 0x77, 0xa0, 0x03, 0xee, 0x19,
];
const UUID_TEXT: &str = "6b2f3a10-9c44-4e0b-8d1e-5277a003ee19";

fn options() -> ImageOptions {
    ImageOptions {
        uuid: UUID,
        label: "mkimage-test".to_owned(),
        build_time: BUILD_TIME,
        block_size_bits: 12,
        compression: None,
        threads: 1,
        ztailpacking: false,
        dax: false,
    }
}

/// Builds an inode arena; everything defaults to root-owned with the build time as mtime.
struct Tree {
    inodes: Vec<Inode>,
}

impl Tree {
    fn new() -> Tree {
        Tree {
            inodes: vec![inode(InodeKind::Directory { entries: vec![] }, 0o755)],
        }
    }

    fn add(&mut self, parent: usize, name: impl AsRef<[u8]>, kind: InodeKind) -> usize {
        let mode = match kind {
            InodeKind::Directory { .. } => 0o755,
            InodeKind::Symlink { .. } => 0o777,
            _ => 0o644,
        };
        self.inodes.push(inode(kind, mode));
        let idx = self.inodes.len() - 1;
        self.link(parent, name, idx);
        idx
    }

    fn link(&mut self, parent: usize, name: impl AsRef<[u8]>, target: usize) {
        let InodeKind::Directory { entries } = &mut self.inodes[parent].kind else {
            panic!("inode {parent} is not a directory");
        };
        entries.push((name.as_ref().to_vec(), target));
    }

    fn dir(&mut self, parent: usize, name: impl AsRef<[u8]>) -> usize {
        self.add(parent, name, InodeKind::Directory { entries: vec![] })
    }

    fn file(&mut self, parent: usize, name: impl AsRef<[u8]>, bytes: Vec<u8>) -> usize {
        let size = bytes.len() as u64;
        let source = FileSource::Bytes(bytes);
        self.add(parent, name, InodeKind::RegularFile { size, source })
    }

    fn symlink(&mut self, parent: usize, name: impl AsRef<[u8]>, target: Vec<u8>) -> usize {
        self.add(parent, name, InodeKind::Symlink { target })
    }
}

fn inode(kind: InodeKind, mode: u16) -> Inode {
    Inode {
        kind,
        mode,
        uid: 0,
        gid: 0,
        mtime: BUILD_TIME as i64,
        mtime_nsec: 0,
        nlink_hint: None,
    }
}

/// Deterministic bytes that differ per `seed`, so misplaced blocks show.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// An image written to a temporary directory.
struct Image {
    dir: TempDir,
    stats: ImageStats,
}

impl Image {
    fn path(&self) -> PathBuf {
        self.dir.path().join("image.erofs")
    }

    fn bytes(&self) -> Vec<u8> {
        fs::read(self.path()).unwrap()
    }
}

fn write(tree: &[Inode], options: &ImageOptions) -> Image {
    let dir = tempfile::tempdir().unwrap();
    let out = File::create(dir.path().join("image.erofs")).unwrap();
    let stats = write_image(tree, options, &out).unwrap_or_else(|e| panic!("{e}"));
    drop(out);
    let image = Image { dir, stats };
    let bytes = image.bytes();
    assert_eq!(bytes.len() as u64, image.stats.image_bytes);
    assert_eq!(bytes.len() % 4096, 0);
    let sb_bytes: &[u8; SUPER_SIZE] = bytes[SUPER_OFFSET as usize..][..SUPER_SIZE]
        .try_into()
        .unwrap();
    let sb = SuperBlock::from_bytes(sb_bytes).expect("magic");
    assert_eq!(sb.blocks as usize * 4096, bytes.len());
    assert_eq!(sb.inos, image.stats.inodes);
    assert_eq!(sb.checksum, superblock_checksum(&bytes[..4096]));
    image
}

fn run(command: &mut Command) -> String {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"));
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{command:?} failed:\n{text}");
    text
}

/// `fsck.erofs --extract` reads every inode and all file data, not only the directories.
/// fsck.erofs 1.5 exits 0 even on a bad superblock checksum, so its messages count too.
fn fsck(image: &Path) {
    let text = run(Command::new("fsck.erofs").arg("--extract").arg(image));
    assert!(
        !text.contains("<E>") && !text.contains("<W>"),
        "fsck.erofs complained:\n{text}"
    );
}

/// A mounted image, detached (`umount -l`) when dropped, panics included. Mount points are
/// named like the workspace's other test mounts, which `scripts/test.sh` sweeps up.
struct Mounted {
    target: TempDir,
}

impl Mounted {
    fn new(image: &Path) -> Mounted {
        assert!(
            rustix::process::geteuid().is_root(),
            "the erofs tests mount images with the kernel: run them as root"
        );
        let target = tempfile::Builder::new()
            .prefix("nixstorefs-mnt.")
            .tempdir()
            .unwrap();
        // A file-backed mount (Linux ≥ 6.12) needs no loop device.
        if let Err(e) =
            rustix::mount::mount(image, target.path(), "erofs", MountFlags::RDONLY, None)
        {
            eprintln!("file-backed mount failed ({e}), using a loop device");
            run(Command::new("mount")
                .args(["-t", "erofs", "-o", "ro,loop"])
                .arg(image)
                .arg(target.path()));
        }
        Mounted { target }
    }

    fn path(&self) -> &Path {
        self.target.path()
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Err(e) = rustix::mount::unmount(self.target.path(), UnmountFlags::DETACH) {
            eprintln!("unmounting {}: {e}", self.target.path().display());
        }
    }
}

/// Writes the tree, checks it with fsck.erofs, mounts it and compares; returns the image.
fn round_trip(tree: &[Inode]) -> Image {
    let image = write(tree, &options());
    fsck(&image.path());
    let mounted = Mounted::new(&image.path());
    assert_tree_eq(tree, mounted.path());
    image
}

fn expected_contents(size: u64, source: &FileSource) -> Vec<u8> {
    match source {
        FileSource::Bytes(bytes) => bytes.clone(),
        FileSource::Path(path) => fs::read(path).unwrap(),
        FileSource::Fd(fd) => {
            let file = File::from(fd.try_clone().unwrap());
            let mut bytes = vec![0; size as usize];
            file.read_exact_at(&mut bytes, 0).unwrap();
            bytes
        }
        FileSource::Open(opener) => {
            let file = File::from(opener.open().unwrap());
            let mut bytes = vec![0; size as usize];
            file.read_exact_at(&mut bytes, 0).unwrap();
            bytes
        }
    }
}

/// Compares the mounted tree under `root` with the input, inode by inode.
fn assert_tree_eq(tree: &[Inode], root: &Path) {
    let mut links = vec![0u32; tree.len()];
    let mut subdirs = vec![0u32; tree.len()];
    for (idx, inode) in tree.iter().enumerate() {
        if let InodeKind::Directory { entries } = &inode.kind {
            for &(_, child) in entries {
                links[child] += 1;
                if matches!(tree[child].kind, InodeKind::Directory { .. }) {
                    subdirs[idx] += 1;
                }
            }
        }
    }
    let mut inos: HashMap<u64, usize> = HashMap::new();
    let mut pending = vec![(0usize, root.to_path_buf())];
    let mut checked = 0;
    while let Some((idx, path)) = pending.pop() {
        checked += 1;
        let inode = &tree[idx];
        let meta = fs::symlink_metadata(&path).unwrap();
        let what = format!("{} (inode {idx})", path.display());
        let same_ino = *inos.entry(meta.ino()).or_insert(idx);
        assert_eq!(
            same_ino, idx,
            "{what}: inode number shared with another inode"
        );
        assert_eq!(meta.mode() & 0o7777, inode.mode as u32, "{what}: mode");
        assert_eq!(meta.uid(), inode.uid, "{what}: uid");
        assert_eq!(meta.gid(), inode.gid, "{what}: gid");
        assert_eq!(meta.mtime(), inode.mtime, "{what}: mtime");
        assert_eq!(
            meta.mtime_nsec(),
            inode.mtime_nsec as i64,
            "{what}: mtime_nsec"
        );
        let nlink = inode.nlink_hint.unwrap_or(match inode.kind {
            InodeKind::Directory { .. } => 2 + subdirs[idx],
            _ => links[idx],
        });
        assert_eq!(meta.nlink(), nlink as u64, "{what}: nlink");
        let file_type = meta.mode() & 0o170000;
        match &inode.kind {
            InodeKind::Directory { entries } => {
                assert_eq!(file_type, 0o040000, "{what}: type");
                let mut found: Vec<Vec<u8>> = fs::read_dir(&path)
                    .unwrap()
                    .map(|e| e.unwrap().file_name().as_bytes().to_vec())
                    .collect();
                found.sort();
                let mut expected: Vec<Vec<u8>> = entries.iter().map(|e| e.0.clone()).collect();
                expected.sort();
                assert!(found == expected, "{what}: directory listing differs");
                for (name, child) in entries {
                    let child_path = path.join(std::ffi::OsStr::from_bytes(name));
                    // Lookups by name, not only listing, must find each entry.
                    assert!(fs::symlink_metadata(&child_path).is_ok(), "{what}: lookup");
                    pending.push((*child, child_path));
                }
            }
            InodeKind::RegularFile { size, source } => {
                assert_eq!(file_type, 0o100000, "{what}: type");
                assert_eq!(meta.size(), *size, "{what}: size");
                let found = fs::read(&path).unwrap();
                assert!(
                    found == expected_contents(*size, source),
                    "{what}: contents differ"
                );
            }
            InodeKind::Symlink { target } => {
                assert_eq!(file_type, 0o120000, "{what}: type");
                let found = fs::read_link(&path).unwrap();
                assert_eq!(found.as_os_str().as_bytes(), &target[..], "{what}: target");
            }
            InodeKind::CharDevice { rdev } => {
                assert_eq!(file_type, 0o020000, "{what}: type");
                assert_eq!(meta.rdev(), *rdev as u64, "{what}: rdev");
            }
            InodeKind::BlockDevice { rdev } => {
                assert_eq!(file_type, 0o060000, "{what}: type");
                assert_eq!(meta.rdev(), *rdev as u64, "{what}: rdev");
            }
            InodeKind::Fifo => assert_eq!(file_type, 0o010000, "{what}: type"),
            InodeKind::Socket => assert_eq!(file_type, 0o140000, "{what}: type"),
        }
    }
    assert!(
        checked >= tree.len(),
        "every inode is reached at least once"
    );
}

/// A numeric field of `dump.erofs --path=PATH`, such as "Inode size" or "Layout".
fn dumped(image: &Path, path: &str, field: &str) -> u64 {
    let text = run(Command::new("dump.erofs")
        .arg(format!("--path={path}"))
        .arg(image));
    let label = format!("{field}: ");
    let at = text
        .find(&label)
        .unwrap_or_else(|| panic!("no {field}:\n{text}"))
        + label.len();
    text[at..]
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn file_sizes_and_sources() {
    let sources = tempfile::tempdir().unwrap();
    let mut tree = Tree::new();
    for size in [0, 1, 4095, 4096, 4097, 3 * 4096 + 1, 4064, 4032, 4000, 8192] {
        tree.file(0, format!("size-{size}"), pattern(size as u64, size));
    }
    // Sizes that push inline tails against block ends in every way.
    let mixed = tree.dir(0, "mixed");
    for i in 0..150u64 {
        let size = (i * 1231 + i * i * 7) % 10_000;
        tree.file(mixed, format!("f{i:03}"), pattern(1000 + i, size as usize));
    }

    // 8 MiB by path, streamed with copy_file_range from the same filesystem.
    let big_path = sources.path().join("big");
    fs::write(&big_path, pattern(8, 8 << 20)).unwrap();
    tree.add(
        0,
        "big-by-path",
        InodeKind::RegularFile {
            size: 8 << 20,
            source: FileSource::Path(big_path),
        },
    );
    // A memfd is on another filesystem: copy_file_range refuses and the writer reads.
    let memfd = rustix::fs::memfd_create("erofs-test", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
    let mut mem = File::from(memfd);
    mem.write_all(&pattern(9, 3 * 4096 + 100)).unwrap();
    let fd: Arc<OwnedFd> = Arc::new(mem.into());
    tree.add(
        0,
        "by-fd",
        InodeKind::RegularFile {
            size: 3 * 4096 + 100,
            source: FileSource::Fd(fd),
        },
    );

    let image = round_trip(&tree.inodes);
    assert_eq!(image.stats.files, 162);
    assert_eq!(image.stats.directories, 2);
    assert_eq!(image.stats.inodes, tree.inodes.len() as u64);

    // Tails go inline after the inode (layout 2) when they fit, else into a block (0).
    let path = image.path();
    for (name, layout) in [
        ("/size-0", 0),
        ("/size-1", 2),
        ("/size-4095", 0),
        ("/size-4096", 0),
        ("/size-4097", 2),
        ("/size-4064", 2),
    ] {
        assert_eq!(dumped(&path, name, "Layout"), layout, "{name}");
    }

    // fsck.erofs's own reader extracts the same contents.
    let extracted = image.dir.path().join("extracted");
    run(Command::new("fsck.erofs")
        .arg(format!("--extract={}", extracted.display()))
        .arg(image.path()));
    assert_eq!(
        fs::read(extracted.join("size-4097")).unwrap(),
        pattern(4097, 4097)
    );
    assert_eq!(
        fs::read(extracted.join("big-by-path")).unwrap(),
        pattern(8, 8 << 20)
    );
}

#[test]
fn ten_thousand_entries() {
    let mut tree = Tree::new();
    let big = tree.dir(0, "big");
    for i in 0..10_000u32 {
        // Varying name lengths move the dirent block boundaries around.
        let name = format!("entry-{i:05}-{}", "x".repeat((i % 37) as usize));
        if i % 1000 == 0 {
            tree.dir(big, name);
        } else {
            tree.file(big, &name, name.as_bytes().to_vec());
        }
    }
    tree.file(0, "after", b"after the big directory".to_vec());
    round_trip(&tree.inodes);
}

#[test]
fn names_and_deep_nesting() {
    let mut tree = Tree::new();
    let names: Vec<Vec<u8>> = vec![
        vec![b'n'; 255],
        "héllo wörld ☃ 日本語".into(),
        b"with space".to_vec(),
        b"new\nline".to_vec(),
        b" leading space".to_vec(),
        b"!sorts before dot".to_vec(),
        b"-dash".to_vec(),
        b"\x01control".to_vec(),
        b"\xff not utf-8".to_vec(),
        b".hidden".to_vec(),
        b"...".to_vec(),
    ];
    for (i, name) in names.iter().enumerate() {
        tree.file(0, name, pattern(i as u64, i * 100));
    }
    let long_dir = tree.dir(0, vec![b'd'; 255]);
    // Forty 255-byte names take three dirent blocks.
    for i in 0..40u8 {
        let mut name = vec![b'a' + i % 26; 254];
        name.push(b'0' + i / 26);
        tree.file(long_dir, name, vec![i]);
    }
    let mut dir = 0;
    for depth in 0..40 {
        dir = tree.dir(dir, format!("level-{depth}"));
        tree.file(dir, "file", format!("depth {depth}").into_bytes());
    }
    round_trip(&tree.inodes);
}

#[test]
fn symlinks() {
    let mut tree = Tree::new();
    for len in [1usize, 60, 4000, 4064, 4065, 4095] {
        let target: Vec<u8> = (0..len).map(|i| b"abc/def./"[i % 9]).collect();
        tree.symlink(0, format!("link-{len}"), target);
    }
    tree.symlink(0, "dangling", b"/does/not/exist".to_vec());
    tree.file(0, "target", b"data".to_vec());
    tree.symlink(0, "to-target", b"target".to_vec());
    let image = round_trip(&tree.inodes);
    assert_eq!(image.stats.symlinks, 8);
    let mounted = Mounted::new(&image.path());
    assert_eq!(fs::read(mounted.path().join("to-target")).unwrap(), b"data");
}

#[test]
fn hard_links_and_special_files() {
    let mut tree = Tree::new();
    let a = tree.dir(0, "a");
    let b = tree.dir(a, "b");
    let shared = tree.file(0, "shared", pattern(5, 5000));
    tree.link(a, "shared-too", shared);
    tree.link(b, "shared-again", shared);
    let hinted = tree.file(0, "hinted", b"x".to_vec());
    tree.inodes[hinted].nlink_hint = Some(7);
    let link = tree.symlink(0, "symlink", b"shared".to_vec());
    tree.link(b, "symlink-too", link);

    tree.add(0, "fifo", InodeKind::Fifo);
    tree.add(0, "socket", InodeKind::Socket);
    tree.add(0, "null", InodeKind::CharDevice { rdev: 0x103 });
    tree.add(0, "sda1", InodeKind::BlockDevice { rdev: 0x801 });
    // Major 259, minor 300: the minor's high bits sit above the major.
    let rdev = (300 & 0xff) | (259 << 8) | ((300 & !0xff) << 12);
    tree.add(0, "nvme", InodeKind::BlockDevice { rdev });
    round_trip(&tree.inodes);
}

#[test]
fn extended_inodes_where_needed() {
    let mut tree = Tree::new();
    let owned = tree.file(0, "big-uid", b"owned".to_vec());
    tree.inodes[owned].uid = 70_000;
    tree.inodes[owned].gid = 70_001;
    let old = tree.file(0, "old", pattern(1, 5000));
    tree.inodes[old].mtime = 1;
    let precise = tree.dir(0, "precise");
    tree.inodes[precise].mtime = BUILD_TIME as i64 + 5;
    tree.inodes[precise].mtime_nsec = 123_456_789;
    tree.file(precise, "inside", b"compact".to_vec());
    let many = tree.file(0, "many-links", Vec::new());
    tree.inodes[many].nlink_hint = Some(70_000);
    let modes = tree.file(0, "setuid", Vec::new());
    tree.inodes[modes].mode = 0o4755;
    let sticky = tree.dir(0, "sticky");
    tree.inodes[sticky].mode = 0o1777;

    let image = round_trip(&tree.inodes);
    let path = image.path();
    for extended in ["/big-uid", "/old", "/precise", "/many-links"] {
        assert_eq!(dumped(&path, extended, "Inode size"), 64, "{extended}");
    }
    for compact in ["/", "/precise/inside", "/setuid", "/sticky"] {
        assert_eq!(dumped(&path, compact, "Inode size"), 32, "{compact}");
    }
}

#[test]
fn same_input_same_bytes() {
    let sources = tempfile::tempdir().unwrap();
    let source = sources.path().join("source");
    fs::write(&source, pattern(3, 20_000)).unwrap();
    let build = || {
        let mut tree = Tree::new();
        let dir = tree.dir(0, "dir");
        for i in 0..50 {
            tree.file(dir, format!("file-{i}"), pattern(i, (i * 997) as usize));
        }
        tree.add(
            dir,
            "from-path",
            InodeKind::RegularFile {
                size: 20_000,
                source: FileSource::Path(source.clone()),
            },
        );
        tree.symlink(0, "link", b"dir/file-1".to_vec());
        tree.inodes
    };
    let first = write(&build(), &options());

    // A stale, longer file in the way must not leave a trace.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("image.erofs");
    fs::write(&path, vec![0xa5; first.bytes().len() + 3 * 4096 + 7]).unwrap();
    let out = fs::OpenOptions::new().write(true).open(&path).unwrap();
    let stats = write_image(&build(), &options(), &out).unwrap();
    assert_eq!(stats, first.stats);
    assert!(fs::read(&path).unwrap() == first.bytes(), "images differ");
    fsck(&path);
}

#[test]
fn superblock_uuid_label_and_checksum() {
    let mut tree = Tree::new();
    tree.file(0, "file", b"contents".to_vec());
    let image = write(&tree.inodes, &options());
    let text = run(Command::new("dump.erofs").arg("-s").arg(image.path()));
    let uuid_line = text.lines().find(|l| l.starts_with("Filesystem UUID:"));
    assert_eq!(
        uuid_line.map(|l| l.split_whitespace().last().unwrap()),
        Some(UUID_TEXT),
        "{text}"
    );
    assert!(text.contains("sb_csum"), "{text}");
    let bytes = image.bytes();
    assert_eq!(&bytes[1024 + 64..][..16], b"mkimage-test\0\0\0\0");
    assert_eq!(
        u64::from_le_bytes(bytes[1024 + 24..][..8].try_into().unwrap()),
        BUILD_TIME
    );
}

/// The checksum function agrees with mkfs.erofs on an image it made.
#[test]
fn checksum_matches_mkfs() {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("source");
    fs::create_dir(&source).unwrap();
    fs::write(source.join("file"), pattern(1, 3000)).unwrap();
    let image = dir.path().join("mkfs.erofs");
    run(Command::new("mkfs.erofs")
        .arg("--quiet")
        .arg("-T1700000000")
        .arg(&image)
        .arg(&source));
    let bytes = fs::read(&image).unwrap();
    let stored = u32::from_le_bytes(bytes[1028..1032].try_into().unwrap());
    assert_eq!(superblock_checksum(&bytes[..4096]), stored);
}

#[test]
fn source_size_changes_are_errors() {
    let sources = tempfile::tempdir().unwrap();
    let path = sources.path().join("grown");
    fs::write(&path, pattern(1, 5000)).unwrap();
    let mut tree = Tree::new();
    let dir = tree.dir(0, "dir");
    let grown = tree.add(
        dir,
        "grown",
        InodeKind::RegularFile {
            size: 4000,
            source: FileSource::Path(path.clone()),
        },
    );
    let out = tempfile::tempfile().unwrap();
    let error = write_image(&tree.inodes, &options(), &out).unwrap_err();
    assert_eq!(error.inode, Some(grown));
    assert_eq!(error.name_hint.as_deref(), Some("/dir/grown"));
    let message = error.to_string();
    assert!(
        message.contains("5000 bytes") && message.contains("4000"),
        "{message}"
    );
    assert!(message.contains(&*path.to_string_lossy()), "{message}");

    let mut tree = Tree::new();
    let missing = tree.add(
        0,
        "missing",
        InodeKind::RegularFile {
            size: 1,
            source: FileSource::Path(sources.path().join("nope")),
        },
    );
    let error = write_image(&tree.inodes, &options(), &out).unwrap_err();
    assert_eq!(error.inode, Some(missing));
    assert_eq!(error.cause.kind(), std::io::ErrorKind::NotFound);
}

#[test]
fn invalid_trees_are_rejected() {
    let out = tempfile::tempfile().unwrap();
    let check = |tree: &Tree, inode: Option<usize>, words: &str| {
        let error = write_image(&tree.inodes, &options(), &out).unwrap_err();
        assert_eq!(error.inode, inode, "{error}");
        assert!(error.to_string().contains(words), "{error}");
    };

    let mut tree = Tree::new();
    tree.file(0, "twice", vec![]);
    tree.file(0, "twice", vec![]);
    check(&tree, Some(0), "two entries");

    let mut tree = Tree::new();
    let dir = tree.dir(0, "dir");
    tree.file(dir, "a/b", vec![]);
    check(&tree, Some(dir), "`/`");

    let mut tree = Tree::new();
    tree.file(0, vec![b'x'; 256], vec![]);
    check(&tree, Some(0), "256 bytes");

    let mut tree = Tree::new();
    let dir = tree.dir(0, "dir");
    tree.link(0, "again", dir);
    check(&tree, Some(0), "hard links");

    let mut tree = Tree::new();
    tree.link(0, "loop", 0);
    check(&tree, Some(0), "root directory");

    let mut tree = Tree::new();
    tree.link(0, "nowhere", 5);
    check(&tree, Some(0), "inode 5");

    let mut tree = Tree::new();
    tree.inodes.push(inode(InodeKind::Fifo, 0o644));
    check(&tree, Some(1), "not reachable");

    let mut tree = Tree::new();
    let file = tree.file(0, "typed", vec![]);
    tree.inodes[file].mode = 0o100644;
    check(&tree, Some(file), "0o7777");

    let mut tree = Tree::new();
    let link = tree.symlink(0, "empty", vec![]);
    check(&tree, Some(link), "symlink target");

    let mut tree = Tree::new();
    let file = tree.add(
        0,
        "short",
        InodeKind::RegularFile {
            size: 10,
            source: FileSource::Bytes(vec![1, 2, 3]),
        },
    );
    check(&tree, Some(file), "3 bytes");

    let tree = Tree::new();
    let mut long_label = options();
    long_label.label = "sixteen-bytes-xx".to_owned();
    let error = write_image(&tree.inodes, &long_label, &out).unwrap_err();
    assert_eq!(error.inode, None);
    assert!(error.to_string().contains("label"), "{error}");
}

#[test]
fn empty_root() {
    let tree = Tree::new();
    let image = round_trip(&tree.inodes);
    assert_eq!(image.stats.image_bytes, 4096);
}

/// More metadata than the writer keeps in memory: inodes with large inline tails, so the
/// metadata area is written out in pieces while inodes are still being placed.
#[test]
fn metadata_area_written_in_pieces() {
    let mut tree = Tree::new();
    let mut dir = 0;
    for i in 0..4000u64 {
        if i % 400 == 0 {
            dir = tree.dir(0, format!("dir-{i}"));
        }
        let size = 2500 + (i * 389) % 1500;
        tree.file(dir, format!("file-{i}"), pattern(i, size as usize));
    }
    let image = round_trip(&tree.inodes);
    assert!(image.stats.image_bytes > 12 << 20);
}

/// The comparison itself notices a difference, so a passing round trip means something.
#[test]
fn comparison_notices_differences() {
    let mut tree = Tree::new();
    let file = tree.file(0, "file", b"right".to_vec());
    let image = write(&tree.inodes, &options());
    let mounted = Mounted::new(&image.path());
    assert_tree_eq(&tree.inodes, mounted.path());

    let differs = |change: &dyn Fn(&mut Tree)| {
        let mut other = Tree::new();
        other.file(0, "file", b"right".to_vec());
        change(&mut other);
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            assert_tree_eq(&other.inodes, mounted.path())
        }));
        assert!(result.is_err());
    };
    differs(&|t| {
        t.inodes[file].kind = InodeKind::RegularFile {
            size: 5,
            source: FileSource::Bytes(b"wrong".to_vec()),
        }
    });
    differs(&|t| t.inodes[file].mode = 0o600);
    differs(&|t| t.inodes[file].mtime += 1);
    differs(&|t| t.inodes[file].nlink_hint = Some(2));
    differs(&|t| {
        t.file(0, "extra", vec![]);
    });
}

/// Text-like bytes: words of a small vocabulary, so LZ4 finds matches as in real files.
fn compressible(seed: u64, len: usize) -> Vec<u8> {
    let noise = pattern(seed, len / 5 + 16);
    let words: [&[u8]; 8] = [
        b"store ",
        b"closure ",
        b"/nix/",
        b"erofs\n",
        b"lib",
        b"0123",
        b"\t",
        b"path ",
    ];
    let mut out = Vec::with_capacity(len + 16);
    let mut i = 0;
    while out.len() < len {
        out.extend_from_slice(words[(noise[i % noise.len()] % 8) as usize]);
        i += 1;
    }
    out.truncate(len);
    out
}

/// Files of every awkward size, compressible, incompressible and zeros, plus mixtures
/// with long runs of zeros; by bytes, by path and by descriptor.
fn compression_tree(sources: &Path) -> Tree {
    let mut tree = Tree::new();
    let kinds = tree.dir(0, "kinds");
    for size in [
        0usize, 1, 4095, 4096, 4097, 8191, 8192, 8193, 12289, 100_000,
    ] {
        tree.file(
            kinds,
            format!("text-{size}"),
            compressible(size as u64, size),
        );
        tree.file(kinds, format!("random-{size}"), pattern(size as u64, size));
        tree.file(kinds, format!("zeros-{size}"), vec![0; size]);
    }
    let mut mixed = compressible(1, 70_000);
    mixed.extend(pattern(2, 30_001));
    mixed.extend(vec![0; 3 << 20]);
    mixed.extend(compressible(3, 9_999));
    mixed.extend(pattern(4, 4097));
    tree.file(0, "mixed", mixed);
    let big = sources.join("big-text");
    fs::write(&big, compressible(5, (5 << 20) + 7)).unwrap();
    tree.add(
        0,
        "big-by-path",
        InodeKind::RegularFile {
            size: (5 << 20) + 7,
            source: FileSource::Path(big),
        },
    );
    let memfd = rustix::fs::memfd_create("erofs-test", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
    let mut mem = File::from(memfd);
    mem.write_all(&compressible(6, 3 * 4096 + 100)).unwrap();
    let fd: Arc<OwnedFd> = Arc::new(mem.into());
    tree.add(
        0,
        "by-fd",
        InodeKind::RegularFile {
            size: 3 * 4096 + 100,
            source: FileSource::Fd(fd),
        },
    );
    // Many small compressible files, so that indexes share metadata blocks.
    let many = tree.dir(0, "many");
    for i in 0..300u64 {
        let size = 4097 + (i * 7919) % 60_000;
        tree.file(
            many,
            format!("f{i:03}"),
            compressible(100 + i, size as usize),
        );
    }
    tree
}

fn compressed(compression: super::Compression, threads: usize) -> ImageOptions {
    ImageOptions {
        compression: Some(compression),
        threads,
        ..options()
    }
}

#[test]
fn compressed_images_round_trip() {
    use super::Compression;
    let sources = tempfile::tempdir().unwrap();
    let tree = compression_tree(sources.path());
    let plain = write(&tree.inodes, &options());
    for compression in [Compression::Lz4, Compression::Lz4Hc { level: 9 }] {
        let image = write(&tree.inodes, &compressed(compression, 3));
        // fsck.erofs --extract decompresses every file and checks it against its size.
        fsck(&image.path());
        let mounted = Mounted::new(&image.path());
        assert_tree_eq(&tree.inodes, mounted.path());
        drop(mounted);

        let path = image.path();
        // Layout 1: compressed with legacy indexes; 2 and 0: plain, as without -z.
        for (name, layout) in [
            ("/kinds/text-4096", 0),
            ("/kinds/text-4097", 2),
            ("/kinds/text-12289", 1),
            ("/kinds/text-100000", 1),
            ("/kinds/zeros-8193", 1),
            ("/kinds/random-100000", 2),
            ("/kinds/random-8193", 2),
            ("/mixed", 1),
            ("/big-by-path", 1),
        ] {
            assert_eq!(
                dumped(&path, name, "Layout"),
                layout,
                "{compression} {name}"
            );
        }
        let (ours, theirs) = (image.stats.image_bytes, plain.stats.image_bytes);
        assert!(
            ours * 2 < theirs,
            "{compression}: {ours} bytes, plain {theirs}"
        );
        println!("{compression}: {ours} bytes, plain {theirs}");
    }
}

/// ztailpacking: each compressed file's last extent follows its indexes where it fits in
/// a block; the superblock says so, and the image shrinks.
#[test]
fn compressed_images_with_inline_tails_round_trip() {
    use super::compress::FEATURE_INCOMPAT_ZTAILPACKING;
    use super::Compression;
    let sources = tempfile::tempdir().unwrap();
    let tree = compression_tree(sources.path());
    for compression in [Compression::Lz4, Compression::Lz4Hc { level: 9 }] {
        let blocks = write(&tree.inodes, &compressed(compression, 2));
        let inline = write(
            &tree.inodes,
            &ImageOptions {
                ztailpacking: true,
                ..compressed(compression, 2)
            },
        );
        fsck(&inline.path());
        let mounted = Mounted::new(&inline.path());
        assert_tree_eq(&tree.inodes, mounted.path());
        drop(mounted);
        let bytes = inline.bytes();
        let sb = SuperBlock::from_bytes(bytes[1024..1024 + 128].try_into().unwrap()).unwrap();
        assert_ne!(sb.feature_incompat & FEATURE_INCOMPAT_ZTAILPACKING, 0);
        let (with, without) = (inline.stats.image_bytes, blocks.stats.image_bytes);
        // Tails that fit beside their indexes give back what their block did not hold.
        assert!(
            with + 30 * 4096 < without,
            "{compression}: {with} bytes with inline tails, {without} without"
        );
        println!("{compression}: {with} bytes with inline tails, {without} without");
    }
}

#[test]
fn compressed_images_do_not_depend_on_the_thread_count() {
    use super::Compression;
    let sources = tempfile::tempdir().unwrap();
    let tree = compression_tree(sources.path());
    for compression in [Compression::Lz4, Compression::Lz4Hc { level: 12 }] {
        for ztailpacking in [false, true] {
            let options = |threads| ImageOptions {
                ztailpacking,
                ..compressed(compression, threads)
            };
            let one = write(&tree.inodes, &options(1)).bytes();
            for threads in [2, 5] {
                let other = write(&tree.inodes, &options(threads)).bytes();
                assert!(
                    one == other,
                    "{compression}: 1 and {threads} threads differ"
                );
            }
        }
    }
}

#[test]
fn compression_names() {
    use super::Compression;
    assert_eq!(Compression::parse("lz4"), Ok(Compression::Lz4));
    assert_eq!(
        Compression::parse("lz4hc"),
        Ok(Compression::Lz4Hc { level: 9 })
    );
    assert_eq!(
        Compression::parse("lz4hc,12"),
        Ok(Compression::Lz4Hc { level: 12 })
    );
    for bad in [
        "lz4hc,13", "lz4hc,1", "lz4hc,x", "lz4,3", "zstd", "zstd,3", "gzip", "",
    ] {
        assert!(Compression::parse(bad).is_err(), "{bad:?}");
    }
}

/// DAX images: every file of a page or more plain (dump.erofs's layout 0) with its data
/// in whole blocks, smaller ones as in any image; the image padded to 2 MiB, checked by
/// fsck.erofs, mounted and read back, and the same bytes every time.
#[test]
fn dax_images_round_trip() {
    use super::dax::{DAX_IMAGE_ALIGN, DAX_MIN_FILE_SIZE};
    let tree = pinned_tree();
    let dax = ImageOptions {
        dax: true,
        ..options()
    };
    let image = write(&tree.inodes, &dax);
    assert_eq!(image.stats.image_bytes % DAX_IMAGE_ALIGN, 0);
    fsck(&image.path());
    let mounted = Mounted::new(&image.path());
    assert_tree_eq(&tree.inodes, mounted.path());
    drop(mounted);
    let plain = write(&tree.inodes, &options());
    for size in [0u64, 1, 100, 4095, 4096, 4097, 8193, 65_537, 300_001] {
        // Without --dax, a tail that fits beside its (compact, 32-byte) inode is inline.
        let inline = size % 4096 != 0 && size % 4096 + 32 <= 4096;
        let expected = if inline && size < DAX_MIN_FILE_SIZE {
            2
        } else {
            0
        };
        for kind in ["text", "random", "zeros"] {
            let name = format!("/files/{kind}-{size}");
            assert_eq!(dumped(&image.path(), &name, "Layout"), expected, "{name}");
            let without = if inline { 2 } else { 0 };
            assert_eq!(dumped(&plain.path(), &name, "Layout"), without, "{name}");
        }
    }
    assert_eq!(dumped(&image.path(), "/mixed", "Layout"), 0);
    assert!(write(&tree.inodes, &dax).bytes() == image.bytes());
}

/// A fixed tree with a little of everything the writer lays out: directories of many
/// entries, files of awkward sizes (compressible, incompressible, zeros), symlinks, hard
/// links and special files, so that a change to any layout shows in its images.
fn pinned_tree() -> Tree {
    let mut tree = Tree::new();
    let files = tree.dir(0, "files");
    for size in [0usize, 1, 100, 4095, 4096, 4097, 8193, 65_537, 300_001] {
        tree.file(
            files,
            format!("text-{size}"),
            compressible(size as u64, size),
        );
        tree.file(files, format!("random-{size}"), pattern(size as u64, size));
        tree.file(files, format!("zeros-{size}"), vec![0; size]);
    }
    let mut mixed = compressible(7, 50_000);
    mixed.extend(pattern(8, 20_001));
    mixed.extend(vec![0; 200_000]);
    mixed.extend(compressible(9, 4_097));
    tree.file(0, "mixed", mixed);
    let many = tree.dir(0, "many");
    for i in 0..200u64 {
        tree.file(
            many,
            format!("entry-{i:03}"),
            compressible(i, (i * 37) as usize),
        );
    }
    tree.symlink(0, "relative", b"files/text-100".to_vec());
    tree.symlink(0, "absolute", b"/nix/store/some-path/bin/sh".to_vec());
    let linked = tree.file(0, "linked", compressible(10, 5_000));
    tree.link(many, "linked-too", linked);
    tree.add(0, "fifo", InodeKind::Fifo);
    tree
}

/// Each FORMAT_VERSION, with the SHA-256 of the images its writer makes of
/// [`pinned_tree`]: plain, `-z lz4`, `-z lz4hc` and `-z lz4hc --ztailpacking`. A change
/// to the writer's bytes must raise `cache::FORMAT_VERSION` (or cached images of the old
/// writer would be served as the new one's) and add a line here.
const PINNED: &[(u32, [&str; 4])] = &[(
    3,
    [
        "7217d3ba37a57c127ff5692688a031353aff1e46b035991cd2184dbfcbee05b8",
        "602f939519931b559582fa0ff19076154967fe85c92e6ed963fa32dac65379c7",
        "e8bbf0c5fd27a822b0f004246b9ff7d77c309b65a3c007600d5908494a3eb472",
        "aa9baec397d622c283e267900c3d237c246242c484c7516938f9102104a9cb8a",
    ],
)];

#[test]
fn format_version_pins_the_writers_bytes() {
    use super::Compression;
    use sha2::{Digest, Sha256};
    let tree = pinned_tree();
    let hc = Compression::Lz4Hc { level: 9 };
    let digests: Vec<String> = [
        options(),
        compressed(Compression::Lz4, 2),
        compressed(hc, 2),
        ImageOptions {
            ztailpacking: true,
            ..compressed(hc, 2)
        },
    ]
    .iter()
    .map(|o| {
        let image = write(&tree.inodes, o);
        fsck(&image.path());
        Sha256::digest(image.bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    })
    .collect();
    for pair in PINNED.windows(2) {
        assert!(pair[0].0 < pair[1].0, "versions must rise: {pair:?}");
        assert_ne!(pair[0].1, pair[1].1, "version {} pins no change", pair[1].0);
    }
    let (version, pinned) = PINNED.last().expect("one version at least");
    assert!(
        digests == pinned.to_vec(),
        "the writer's bytes changed: raise cache::FORMAT_VERSION to {} and pin \
         ({}, {digests:?}) after ({version}, {pinned:?}) in PINNED",
        version + 1,
        version + 1
    );
    assert_eq!(
        crate::cache::FORMAT_VERSION,
        *version,
        "FORMAT_VERSION changed without a new line in PINNED"
    );
}
