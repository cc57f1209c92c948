//! End-to-end tests of `mkimage -z`: compressed images of the sample store and of random
//! trees, and a sparse file over 4 GiB, checked by `fsck.erofs --extract` (which
//! decompresses every file), mounted by the kernel and compared byte for byte. The cache's
//! tests are in `mkimage_cache.rs`.
//!
//! Needs root (the kernel mounts the images), erofs-utils, and the built binaries.

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::Path;

use nixstorefs_tests::compare::{root_names, Expect, Links, TreeCheck};
use nixstorefs_tests::harness::ImageMount;
use nixstorefs_tests::images::{fsck, image_of, mkimage, sha256};
use nixstorefs_tests::sample::{self, PseudoRandom, SampleOptions, SampleStore};

fn check_sample(s: &SampleStore, image: &Path) {
    let m = ImageMount::new(image);
    assert_eq!(root_names(m.path()), s.closure, "image root");
    let mut check = TreeCheck::with(Expect {
        mtime: Some((0, 0)),
        links: Links::Separate,
        dir_sizes: false,
    });
    for base in &s.closure {
        check.walk(&s.host(base), &m.path().join(base));
    }
    check.assert_clean(&format!("{}", image.display()));
}

/// Compressible, incompressible and zero-filled files of the awkward sizes, and files
/// mixing them with long runs of zeros, under `dir`.
fn add_compressible_files(dir: &Path, seed: &str) {
    let mut rng = PseudoRandom::new(seed);
    fs::create_dir(dir).unwrap();
    for size in [0usize, 1, 4095, 4096, 4097, 8193, 65_537, 3 << 20] {
        fs::write(dir.join(format!("text-{size}")), rng.text(size)).unwrap();
        let mut random = vec![0u8; size];
        rng.fill(&mut random);
        fs::write(dir.join(format!("random-{size}")), random).unwrap();
        fs::write(dir.join(format!("zeros-{size}")), vec![0u8; size]).unwrap();
    }
    let mut mixed = rng.text(123_457);
    let mut random = vec![0u8; 50_001];
    rng.fill(&mut random);
    mixed.extend(random);
    mixed.extend(vec![0u8; (2 << 20) + 3]);
    mixed.extend(rng.text(4097));
    fs::write(dir.join("mixed"), mixed).unwrap();
}

#[test]
fn compressed_images_of_the_sample_store() {
    let (d, s) = sample::temp(&SampleOptions::default());
    let plain = d.path().join("plain.img");
    image_of(&s, &plain, &[]);
    for (z, extra) in [
        ("lz4", None),
        ("lz4hc", None),
        ("lz4hc,12", None),
        ("lz4hc", Some("--ztailpacking")),
    ] {
        let img = d.path().join(format!("{z}{}.img", extra.unwrap_or("")));
        let mut args = vec!["-z", z];
        args.extend(extra);
        image_of(&s, &img, &args);
        fsck(&img);
        check_sample(&s, &img);
        println!(
            "-z {z} {extra:?}: {} bytes, plain {} bytes",
            fs::metadata(&img).unwrap().len(),
            fs::metadata(&plain).unwrap().len()
        );
    }
}

#[test]
fn compressed_images_of_random_trees() {
    for (seed, z) in [("one", "lz4"), ("two", "lz4hc")] {
        let d = tempfile::Builder::new()
            .prefix("nixstorefs-random.")
            .tempdir_in("/tmp")
            .unwrap();
        let tree = d.path().join("tree");
        nixstorefs_tests::random_tree::build(&tree, seed, &Default::default()).unwrap();
        add_compressible_files(&tree.join("compressible"), seed);
        {
            let img = d.path().join(format!("{z}.img"));
            let o = mkimage(&[
                "--preserve-hardlinks".as_ref(),
                "--preserve-mtime".as_ref(),
                "-z".as_ref(),
                z.as_ref(),
                "--dir".as_ref(),
                tree.as_os_str(),
                img.as_os_str(),
            ]);
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            fsck(&img);
            let m = ImageMount::new(&img);
            let mut check = TreeCheck::with(Expect {
                mtime: None,
                links: Links::Shared,
                dir_sizes: false,
            });
            for entry in fs::read_dir(&tree).unwrap() {
                let name = entry.unwrap().file_name();
                check.walk(&tree.join(&name), &m.path().join(&name));
            }
            check.assert_clean(&format!("random tree {seed:?}, -z {z}"));
        }
    }
}

#[test]
fn compressed_images_do_not_depend_on_the_thread_count() {
    let (d, s) = sample::temp(&SampleOptions::small());
    add_compressible_files(&s.host(&s.closure[0]).join("compressible"), "threads");
    for z in ["lz4", "lz4hc"] {
        let one = d.path().join(format!("{z}-1.img"));
        image_of(&s, &one, &["-z", z, "--threads", "1"]);
        for threads in ["2", "5"] {
            let other = d.path().join(format!("{z}-{threads}.img"));
            image_of(&s, &other, &["-z", z, "--threads", threads]);
            assert_eq!(
                sha256(&one),
                sha256(&other),
                "-z {z}: 1 and {threads} threads"
            );
        }
    }
}

#[test]
fn bad_compressors_are_refused() {
    let (d, s) = sample::temp(&SampleOptions::small());
    let img = d.path().join("x.img");
    for z in ["zstd", "lz4hc,13", "gzip"] {
        let o = mkimage(&[
            "--store-dir".as_ref(),
            s.store_dir.as_os_str(),
            "-z".as_ref(),
            z.as_ref(),
            s.closure_file.as_os_str(),
            img.as_os_str(),
        ]);
        assert_eq!(o.status.code(), Some(2), "-z {z}");
        assert!(!img.exists());
    }
}

// ---------------------------------------------------------------------------------------
// Files over 4 GiB

/// A sparse file of 4 GiB and more (runs of zeros with a few marked places, one across
/// the 4 GiB boundary) compressed: `fsck.erofs --extract` decompresses it whole, and the
/// kernel reads it back byte for byte.
#[test]
fn a_sparse_file_over_4_gib_compressed_reads_back() {
    use std::io::Read;
    let d = tempfile::Builder::new()
        .prefix("nixstorefs-large.")
        .tempdir_in("/tmp")
        .unwrap();
    let tree = d.path().join("tree");
    fs::create_dir(&tree).unwrap();
    let big = tree.join("big");
    let size: u64 = (4 << 30) + 12_345;
    let f = fs::File::create(&big).unwrap();
    f.set_len(size).unwrap();
    let marks: [(u64, &[u8]); 4] = [
        (0, b"the start"),
        (1 << 31, b"2 GiB"),
        ((4 << 30) - 5, b"across 4 GiB"),
        (size - 7, b"the end"),
    ];
    for (at, bytes) in marks {
        f.write_all_at(bytes, at).unwrap();
    }
    drop(f);
    let img = d.path().join("big.img");
    // With inline tails, the last extent follows 8 MiB of indexes.
    for z in ["lz4", "lz4hc --ztailpacking"] {
        let mut args: Vec<&std::ffi::OsStr> = vec!["-z".as_ref()];
        args.extend(z.split(' ').map(std::ffi::OsStr::new));
        args.extend(["--dir".as_ref(), tree.as_os_str(), img.as_os_str()]);
        let o = mkimage(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let image_bytes = fs::metadata(&img).unwrap().len();
        assert!(
            image_bytes < 512 << 20,
            "-z {z}: {image_bytes} bytes: not compressed"
        );
        fsck(&img);
        let m = ImageMount::new(&img);
        let mounted = m.path().join("big");
        assert_eq!(fs::metadata(&mounted).unwrap().len(), size);
        // Compared a MiB at a time, all 4 GiB of it.
        let (mut ours, mut theirs) = (
            fs::File::open(&mounted).unwrap(),
            fs::File::open(&big).unwrap(),
        );
        let (mut a, mut b) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
        let mut at = 0u64;
        while at < size {
            let n = (size - at).min(1 << 20) as usize;
            ours.read_exact(&mut a[..n]).unwrap();
            theirs.read_exact(&mut b[..n]).unwrap();
            assert!(a[..n] == b[..n], "-z {z}: the MiB at {at} differs");
            at += n as u64;
        }
        assert_eq!(
            ours.read(&mut a).unwrap(),
            0,
            "-z {z}: more than {size} bytes"
        );
        for (at, bytes) in marks {
            let mut got = vec![0u8; bytes.len()];
            ours.read_exact_at(&mut got, at).unwrap();
            assert_eq!(got, bytes, "-z {z}: at {at}");
        }
        println!("-z {z}: a {size}-byte sparse file in a {image_bytes}-byte image");
    }
}
