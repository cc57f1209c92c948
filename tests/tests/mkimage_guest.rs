//! A compressed image read by the guest kernel (Debian's 6.1 under qemu TCG): `mkimage
//! -z lz4`, `-z lz4hc` and `-z lz4hc --ztailpacking` images of a sample closure, found by label by guest-init, must show
//! every closure path and the same bytes as the host for compressible, incompressible and
//! zero-filled files of every awkward size.
//!
//! Needs root, qemu, the guest kernel and the built binaries, including the static
//! guest-init. A missing tool fails the test, saying what to install (scripts/install-deps.sh
//! installs them all); no test passes by returning early.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use nixstorefs_tests::harness;
use nixstorefs_tests::sample::{self, PseudoRandom, SampleOptions};
use nixstorefs_tests::vm::{self, Guest, Initramfs, Kernel};
use sha2::{Digest, Sha256};

const MKIMAGE_TIMEOUT: Duration = Duration::from_secs(120);

/// Files for the store path that exercises compression: name and contents.
fn compressible_files() -> Vec<(String, Vec<u8>)> {
    let mut rng = PseudoRandom::new("mkimage-guest");
    let mut files = Vec::new();
    for size in [0usize, 1, 4095, 4096, 4097, 8193, 65_537, 3 << 20] {
        files.push((format!("text-{size}"), rng.text(size)));
        let mut random = vec![0u8; size];
        rng.fill(&mut random);
        files.push((format!("random-{size}"), random));
        files.push((format!("zeros-{size}"), vec![0u8; size]));
    }
    let mut mixed = rng.text(100_003);
    let mut random = vec![0u8; 40_000];
    rng.fill(&mut random);
    mixed.extend(random);
    mixed.extend(vec![0u8; 1 << 20]);
    mixed.extend(rng.text(4097));
    files.push(("mixed".into(), mixed));
    files.sort();
    files
}

/// What `sha256sum * | sha256sum` prints first in a directory of these files.
fn listing_digest(files: &[(String, Vec<u8>)]) -> String {
    let listing: String = files
        .iter()
        .map(|(name, data)| format!("{}  {name}\n", sample::hex(&Sha256::digest(data))))
        .collect();
    sample::hex(&Sha256::digest(listing.as_bytes()))
}

fn image(store: &Path, closure: &Path, out: &Path, z: &[&str]) {
    let o = harness::run(
        Command::new(harness::bin("mkimage"))
            .arg("--store-dir")
            .arg(store)
            .args(z)
            .arg(closure)
            .arg(out)
            .env_remove("NIXSTOREFS_IMAGE_CACHE")
            .stdin(Stdio::null()),
        MKIMAGE_TIMEOUT,
    );
    assert!(
        o.status.success(),
        "mkimage {z:?} failed ({}): {}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn guest_kernel_reads_compressed_images() {
    vm::qemu();
    let kernel = Kernel::find();
    let dir = tempfile::Builder::new()
        .prefix("nixstorefs-sample.")
        .tempdir_in("/tmp")
        .expect("create a sample directory");
    let mut s = sample::build(dir.path(), &SampleOptions::small()).expect("build the sample");
    let files = compressible_files();
    let borrowed: Vec<(&str, &[u8])> = files
        .iter()
        .map(|(n, d)| (n.as_str(), d.as_slice()))
        .collect();
    let base = vm::add_store_path(&s, "compressible-1.0", &borrowed).unwrap();
    vm::append_to_closure(&mut s, &base).unwrap();
    let script = format!(
        "echo GUEST-START\n\
         echo \"ENTRIES $(ls -A /nix/store | wc -l)\"\n\
         cd /nix/store/{base} && set -- $(sha256sum * | sha256sum) && echo \"LISTING $1\"\n\
         set -- $(sha256sum /nix/store/{big})\n\
         echo \"SHA256 $1\"\n\
         grep ' /nix/store ' /proc/self/mountinfo | sed 's/^/MOUNT /'\n\
         echo \"KERNEL $(uname -r)\"\n\
         echo GUEST-OK\n",
        big = s.big_file.display(),
    );
    let prog = vm::add_guest_program(&mut s, "guest-test", &script).unwrap();
    let initramfs = dir.path().join("initramfs.cpio");
    Initramfs::for_guest_init(&kernel)
        .write(&initramfs)
        .expect("write the initramfs");
    let big = fs::read(s.host(&s.big_file)).unwrap();
    for (name, z) in [
        ("lz4", &["-z", "lz4"][..]),
        ("lz4hc", &["-z", "lz4hc"][..]),
        ("lz4hc-ztailpacking", &["-z", "lz4hc", "--ztailpacking"][..]),
    ] {
        let img: PathBuf = dir.path().join(format!("{name}.img"));
        image(&s.store_dir, &s.closure_file, &img, z);
        let z = name;
        let boot = Guest::new(&kernel, &initramfs)
            .cmdline("loglevel=5")
            .cmdline("nixstore=erofs:LABEL=nix-store")
            .cmdline(&prog.init_arg())
            .disk(&img)
            .boot();
        boot.assert_stopped();
        boot.assert_no_error();
        boot.assert_in_order(&["guest-init: store mounted", "GUEST-START", "GUEST-OK"]);
        assert_eq!(
            boot.expect_value("ENTRIES "),
            s.closure.len().to_string(),
            "-z {z}: entries of /nix/store in the guest"
        );
        assert_eq!(
            boot.expect_value("LISTING "),
            listing_digest(&files),
            "-z {z}: the compressible path's files in the guest"
        );
        assert_eq!(
            boot.expect_value("SHA256 "),
            sample::hex(&Sha256::digest(&big)),
            "-z {z}: the big file in the guest"
        );
        assert!(
            boot.expect_value("MOUNT ").contains(" erofs "),
            "-z {z}: the store is the erofs image"
        );
        println!(
            "-z {z}: read back by guest kernel {}",
            boot.expect_value("KERNEL ")
        );
    }
}
