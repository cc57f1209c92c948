//! The erofs writer on trees decoded from arbitrary bytes, plain and compressed: every
//! image it writes must pass fsck.erofs (which decompresses every file), and the kernel must mount it and show exactly the tree (names, kinds,
//! modes, sizes, contents, symlink targets). Needs root (the kernel mounts each image).
#![no_main]

use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use libfuzzer_sys::fuzz_target;
use mkimage::erofs::{write_image, Compression, FileSource, ImageOptions, Inode, InodeKind};

/// Reads the fuzzer's bytes as a little program that builds a tree.
struct Decoder<'a> {
    data: &'a [u8],
}

impl Decoder<'_> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.data.split_first()?;
        self.data = rest;
        Some(b)
    }

    fn take(&mut self, n: usize) -> &[u8] {
        let n = n.min(self.data.len());
        let (head, rest) = self.data.split_at(n);
        self.data = rest;
        head
    }

    /// A name: 1..=255 bytes without `/` or NUL, not `.` or `..`, unique in `taken`.
    fn name(&mut self, taken: &[(Vec<u8>, usize)]) -> Vec<u8> {
        let len = 1 + self.byte().unwrap_or(0) as usize % 255;
        let mut name: Vec<u8> = self
            .take(len)
            .iter()
            .map(|&b| if b == b'/' || b == 0 { b'x' } else { b })
            .collect();
        if name.is_empty() || name == b"." || name == b".." {
            name = b"n".to_vec();
        }
        while taken.iter().any(|(n, _)| *n == name) {
            name.push(b'_');
            name.truncate(255);
            if name.len() == 255 {
                name[0] = name[0].wrapping_add(1).max(1);
                if name[0] == b'/' {
                    name[0] = b'y';
                }
            }
        }
        name
    }
}

fn inode(kind: InodeKind, mode: u16) -> Inode {
    Inode {
        kind,
        mode,
        uid: 0,
        gid: 0,
        mtime: 0,
        mtime_nsec: 0,
        nlink_hint: None,
    }
}

fn decode(data: &[u8]) -> Vec<Inode> {
    let mut d = Decoder { data };
    let mut tree = vec![inode(InodeKind::Directory { entries: vec![] }, 0o755)];
    let mut stack = vec![0usize];
    let mut files: Vec<usize> = Vec::new();
    while let Some(op) = d.byte() {
        if tree.len() > 200 {
            break;
        }
        let dir = *stack.last().unwrap();
        let taken = match &tree[dir].kind {
            InodeKind::Directory { entries } => entries.clone(),
            _ => unreachable!("the stack holds directories"),
        };
        let (child, is_dir) = match op % 6 {
            0 | 1 => {
                // Sizes around block edges are the interesting ones.
                let hi = d.byte().unwrap_or(0) as usize;
                let lo = d.byte().unwrap_or(0) as usize;
                let size = match op % 3 {
                    0 => hi * 4096 + lo % 3,
                    1 => hi * 256 + lo,
                    _ => 4096 - (lo % 5),
                };
                let fill = d.byte().unwrap_or(7);
                // A repeating ramp (compressible), or for one fill in four pseudo-random
                // bytes (not), so compressed images get both kinds of extent.
                let bytes: Vec<u8> = if fill % 4 == 0 {
                    let mut state = (fill as u64 + 1)
                        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
                        .wrapping_add(size as u64);
                    (0..size)
                        .map(|_| {
                            state ^= state << 13;
                            state ^= state >> 7;
                            state ^= state << 17;
                            state as u8
                        })
                        .collect()
                } else {
                    (0..size).map(|i| fill.wrapping_add(i as u8)).collect()
                };
                let mode = [0o444, 0o555, 0o644, 0o4755][hi % 4];
                tree.push(inode(
                    InodeKind::RegularFile {
                        size: size as u64,
                        source: FileSource::Bytes(bytes),
                    },
                    mode,
                ));
                files.push(tree.len() - 1);
                (tree.len() - 1, false)
            }
            2 => {
                tree.push(inode(InodeKind::Directory { entries: vec![] }, 0o555));
                (tree.len() - 1, true)
            }
            3 => {
                let len = 1
                    + (d.byte().unwrap_or(0) as usize * 16 + d.byte().unwrap_or(1) as usize) % 4095;
                let target: Vec<u8> = (0..len).map(|i| b'a' + (i % 26) as u8).collect();
                tree.push(inode(InodeKind::Symlink { target }, 0o777));
                (tree.len() - 1, false)
            }
            4 if !files.is_empty() => {
                // A hard link to an earlier file.
                let f = files[d.byte().unwrap_or(0) as usize % files.len()];
                (f, false)
            }
            _ => {
                if stack.len() > 1 {
                    stack.pop();
                }
                continue;
            }
        };
        let name = d.name(&taken);
        if let InodeKind::Directory { entries } = &mut tree[dir].kind {
            entries.push((name, child));
        }
        if is_dir && stack.len() < 60 {
            stack.push(child);
        }
    }
    tree
}

/// Checks the mounted directory `at` against inode `idx`.
fn check(tree: &[Inode], idx: usize, at: &Path, links: &[u32]) {
    let meta = fs::symlink_metadata(at).unwrap();
    let node = &tree[idx];
    assert_eq!(
        meta.permissions().mode() & 0o7777,
        u32::from(node.mode),
        "{at:?}"
    );
    match &node.kind {
        InodeKind::Directory { entries } => {
            assert!(meta.is_dir(), "{at:?}");
            let mut names: Vec<Vec<u8>> = fs::read_dir(at)
                .unwrap()
                .map(|e| e.unwrap().file_name().as_bytes().to_vec())
                .collect();
            names.sort();
            let mut want: Vec<Vec<u8>> = entries.iter().map(|(n, _)| n.clone()).collect();
            want.sort();
            assert_eq!(names, want, "{at:?}");
            for (name, child) in entries {
                check(
                    tree,
                    *child,
                    &at.join(std::ffi::OsStr::from_bytes(name)),
                    links,
                );
            }
        }
        InodeKind::RegularFile { size, source } => {
            assert!(meta.is_file(), "{at:?}");
            assert_eq!(meta.len(), *size, "{at:?}");
            assert_eq!(meta.nlink(), u64::from(links[idx]), "{at:?}");
            let FileSource::Bytes(bytes) = source else {
                unreachable!()
            };
            assert_eq!(&fs::read(at).unwrap(), bytes, "{at:?}");
        }
        InodeKind::Symlink { target } => {
            assert_eq!(
                fs::read_link(at).unwrap().as_os_str().as_bytes(),
                &target[..],
                "{at:?}"
            );
        }
        _ => unreachable!("not generated"),
    }
}

fuzz_target!(|data: &[u8]| {
    let tree = decode(data);
    let mut links = vec![0u32; tree.len()];
    for inode in &tree {
        if let InodeKind::Directory { entries } = &inode.kind {
            for (_, child) in entries {
                links[*child] += 1;
            }
        }
    }
    let dir = tempfile::Builder::new()
        .prefix("nixstorefs-fuzz.")
        .tempdir()
        .unwrap();
    let image = dir.path().join("image");
    let out = fs::File::create(&image).unwrap();
    // The input's length picks plain, LZ4 or LZ4HC images (without taking a byte, so
    // the regression inputs still decode to the same trees).
    let compression = match data.len() % 3 {
        0 => None,
        1 => Some(Compression::Lz4),
        _ => Some(Compression::Lz4Hc { level: 9 }),
    };
    let options = ImageOptions {
        uuid: [7; 16],
        label: "fuzz".into(),
        build_time: 0,
        block_size_bits: 12,
        compression,
        threads: 1 + data.len() % 2,
        ztailpacking: data.len() / 3 % 2 == 1,
        // DAX layouts only for plain images (the writer refuses compression with them).
        dax: compression.is_none() && data.len() / 6 % 2 == 1,
    };
    write_image(&tree, &options, &out).expect("a valid tree is written");
    drop(out);
    // --extract decompresses every file.
    let fsck = Command::new("fsck.erofs")
        .arg("--extract")
        .arg(&image)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&fsck.stderr).into_owned() + &String::from_utf8_lossy(&fsck.stdout);
    assert!(
        fsck.status.success() && !text.contains("<E>"),
        "fsck.erofs: {text}"
    );

    let mnt = dir.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    rustix::mount::mount(
        &image,
        &mnt,
        "erofs",
        rustix::mount::MountFlags::RDONLY,
        None,
    )
    .expect("the kernel mounts the image (file-backed erofs, Linux 6.12+)");
    // Unmounted even when a check fails (the panic is the fuzzer's finding).
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = rustix::mount::unmount(self.0, rustix::mount::UnmountFlags::DETACH);
        }
    }
    let _guard = Unmount(&mnt);
    check(&tree, 0, &mnt, &links);
});
