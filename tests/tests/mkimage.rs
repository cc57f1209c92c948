//! End-to-end tests of `mkimage`: images of the sample store, checked by `fsck.erofs` and
//! mounted by the kernel, compared byte for byte with the host tree.
//!
//! Needs root (the kernel mounts the images), erofs-utils, and the built binaries
//! (`cargo build --workspace`).

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use nixstorefs_tests::compare::{root_names, Expect, Links, TreeCheck};
use nixstorefs_tests::harness::{self, ImageMount, Mount, Mountpoint};
use nixstorefs_tests::sample::{self, SampleOptions, SampleStore};
use sha2::{Digest, Sha256};
use tempfile::TempDir;

const TIMEOUT: Duration = Duration::from_secs(120);

/// Runs mkimage with `args`; returns its output (not checked).
fn mkimage(args: &[&std::ffi::OsStr]) -> Output {
    harness::run(
        Command::new(harness::bin("mkimage"))
            .args(args)
            .stdin(Stdio::null()),
        TIMEOUT,
    )
}

/// mkimage of the sample's closure into `out`, with `extra` options; must succeed.
fn image_of(s: &SampleStore, out: &Path, extra: &[&str]) {
    let mut args: Vec<&std::ffi::OsStr> = vec!["--store-dir".as_ref(), s.store_dir.as_os_str()];
    args.extend(extra.iter().map(std::ffi::OsStr::new));
    args.push(s.closure_file.as_os_str());
    args.push(out.as_os_str());
    let o = mkimage(&args);
    assert!(
        o.status.success(),
        "mkimage {args:?} failed ({}): {}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
}

fn fsck(image: &Path) {
    let o = harness::run(Command::new("fsck.erofs").arg(image), TIMEOUT);
    assert!(
        o.status.success(),
        "fsck.erofs {}: {}{}",
        image.display(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

fn sha256(path: &Path) -> Vec<u8> {
    Sha256::digest(fs::read(path).unwrap()).to_vec()
}

/// The files in `dir` whose names start with a dot: where mkimage's temporary files go.
fn leftovers(dir: &Path) -> Vec<PathBuf> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with('.'))
        .collect()
}

fn check_tree(s: &SampleStore, root: &Path, expect: Expect) {
    assert_eq!(root_names(root), s.closure, "image root");
    let mut check = TreeCheck::with(expect);
    for base in &s.closure {
        check.walk(&s.host(base), &root.join(base));
    }
    check.assert_clean("image");
}

#[test]
fn image_of_the_sample_mounts_as_the_host_tree() {
    let (d, s) = sample::temp(&SampleOptions::default());
    let img = d.path().join("store.img");
    image_of(&s, &img, &[]);
    fsck(&img);
    let m = ImageMount::new(&img);
    // Defaults: every mtime is -T (0), hard links are separate files, owner root.
    check_tree(
        &s,
        m.path(),
        Expect {
            mtime: Some((0, 0)),
            links: Links::Separate,
            dir_sizes: false,
        },
    );
    let root = fs::symlink_metadata(m.path()).unwrap();
    assert_eq!((root.uid(), root.gid()), (0, 0));
    assert!(
        !m.path().join("nix-path-registration").exists(),
        "a store-paths list carries no registration"
    );
}

#[test]
fn preserved_hard_links_and_mtimes() {
    let (d, s) = sample::temp(&SampleOptions::small());
    let img = d.path().join("store.img");
    image_of(&s, &img, &["--preserve-hardlinks", "--preserve-mtime"]);
    fsck(&img);
    let m = ImageMount::new(&img);
    check_tree(
        &s,
        m.path(),
        Expect {
            mtime: None,
            links: Links::Shared,
            dir_sizes: false,
        },
    );
    let a = fs::symlink_metadata(m.path().join(&s.hard_links[0])).unwrap();
    let b = fs::symlink_metadata(m.path().join(&s.hard_links[1])).unwrap();
    assert_eq!(
        a.ino(),
        b.ino(),
        "hard links across store paths share an inode"
    );
    // Two entries in the image: .links, which shares the inode on the host, is not in it.
    assert_eq!(a.nlink(), 2);
}

#[test]
fn images_are_reproducible_whatever_the_hard_link_layout() {
    let (d, s) = sample::temp(&SampleOptions::small());
    let first = d.path().join("a.img");
    let second = d.path().join("b.img");
    image_of(&s, &first, &[]);
    image_of(&s, &second, &[]);
    assert_eq!(sha256(&first), sha256(&second), "two runs, same bytes");

    // Undo the "optimisation": the second link becomes a copy of its own, with the same
    // content, mode and mtime. The default image must not change.
    let linked = s.host(&s.hard_links[1]);
    let meta = fs::symlink_metadata(&linked).unwrap();
    let content = fs::read(&linked).unwrap();
    fs::remove_file(&linked).unwrap();
    fs::write(&linked, content).unwrap();
    fs::set_permissions(&linked, meta.permissions()).unwrap();
    let third = d.path().join("c.img");
    image_of(&s, &third, &[]);
    assert_eq!(
        sha256(&first),
        sha256(&third),
        "optimised and unoptimised stores give the same image"
    );
}

#[test]
fn uuid_label_and_registration() {
    let (d, s) = sample::temp(&SampleOptions::small());
    let info = d.path().join("closure-info");
    s.write_closure_info(&info).unwrap();
    let img = d.path().join("store.img");
    let uuid = "0123abcd-4567-89ef-0123-456789abcdef";
    let o = mkimage(&[
        "--store-dir".as_ref(),
        s.store_dir.as_os_str(),
        "-U".as_ref(),
        uuid.as_ref(),
        "-L".as_ref(),
        "test-label".as_ref(),
        info.as_os_str(),
        img.as_os_str(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    fsck(&img);
    let dump = harness::run(Command::new("dump.erofs").arg("-s").arg(&img), TIMEOUT);
    let dump = String::from_utf8_lossy(&dump.stdout);
    let line = dump
        .lines()
        .find(|l| l.starts_with("Filesystem UUID:"))
        .unwrap_or_else(|| panic!("no UUID in dump.erofs output:\n{dump}"));
    assert!(line.ends_with(uuid), "{line}");
    // blkid is what finds the image for `mount LABEL=...` and udev's by-label links.
    let blkid = harness::run(
        Command::new("blkid").args(["-p", "-o", "export"]).arg(&img),
        TIMEOUT,
    );
    let blkid = String::from_utf8_lossy(&blkid.stdout);
    assert!(blkid.lines().any(|l| l == "LABEL=test-label"), "{blkid}");
    assert!(
        blkid.lines().any(|l| l == format!("UUID={uuid}")),
        "{blkid}"
    );
    assert!(blkid.lines().any(|l| l == "TYPE=erofs"), "{blkid}");

    // A closureInfo input puts its registration at the image root, for nix-store --load-db.
    let m = ImageMount::new(&img);
    let registration = fs::read(m.path().join("nix-path-registration")).unwrap();
    assert_eq!(registration, fs::read(info.join("registration")).unwrap());
    let mut names = root_names(m.path());
    names.retain(|n| n != "nix-path-registration");
    assert_eq!(names, s.closure);
}

#[test]
fn snapshot_of_a_mounted_view_equals_the_image_of_the_closure() {
    let (d, s) = sample::temp(&SampleOptions::small());
    let direct = d.path().join("direct.img");
    image_of(&s, &direct, &[]);
    let view = Mount::foreground(&s.store_dir, &s.closure_file, &[]);
    let through = d.path().join("through.img");
    let o = mkimage(&[
        "--dir".as_ref(),
        view.mountpoint().as_os_str(),
        through.as_os_str(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        sha256(&direct),
        sha256(&through),
        "mkimage --dir over the mount gives the image mkimage writes from the closure"
    );
}

#[test]
fn bad_input_writes_nothing() {
    let (d, s) = sample::temp(&SampleOptions::small());
    let bad = d.path().join("bad.txt");
    fs::write(
        &bad,
        format!("{}/not-a-store-path\n", s.store_dir.display()),
    )
    .unwrap();
    let out_dir = d.path().join("out");
    fs::create_dir(&out_dir).unwrap();
    let img = out_dir.join("store.img");
    let o = mkimage(&[
        "--store-dir".as_ref(),
        s.store_dir.as_os_str(),
        bad.as_os_str(),
        img.as_os_str(),
    ]);
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(stderr.contains("bad.txt:1"), "{stderr}");
    assert!(!img.exists());
    assert!(leftovers(&out_dir).is_empty(), "{:?}", leftovers(&out_dir));

    // A registration file is read with the closure's cap: an endless one is refused.
    let o = mkimage(&[
        "--store-dir".as_ref(),
        s.store_dir.as_os_str(),
        "--registration".as_ref(),
        "/dev/zero".as_ref(),
        s.closure_file.as_os_str(),
        img.as_os_str(),
    ]);
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stderr.contains("--registration /dev/zero: input is larger than 256 MiB"),
        "{stderr}"
    );
    assert!(!img.exists());
}

#[test]
fn full_disk_leaves_the_old_output_alone_and_no_temporary_file() {
    let (d, s) = sample::temp(&SampleOptions::default());
    let small = Mountpoint::new();
    let o = harness::run(
        Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=8m", "tmpfs"])
            .arg(small.path()),
        TIMEOUT,
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let img = small.path().join("store.img");
    fs::write(&img, b"the previous image").unwrap();
    let mut args: Vec<&std::ffi::OsStr> = vec!["--store-dir".as_ref(), s.store_dir.as_os_str()];
    args.push(s.closure_file.as_os_str());
    args.push(img.as_os_str());
    let o = mkimage(&args);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stderr.contains("store.img") && stderr.contains("No space left on device"),
        "the message names the output and the cause: {stderr}"
    );
    assert_eq!(fs::read(&img).unwrap(), b"the previous image");
    assert!(
        leftovers(small.path()).is_empty(),
        "{:?}",
        leftovers(small.path())
    );
    drop(d);
}

#[test]
fn interrupted_run_leaves_no_temporary_file() {
    let (d, s) = sample::temp(&SampleOptions::default());
    let out_dir = d.path().join("out");
    fs::create_dir(&out_dir).unwrap();
    let img = out_dir.join("store.img");
    let mut child = Command::new(harness::bin("mkimage"))
        .arg("--store-dir")
        .arg(&s.store_dir)
        .arg(&s.closure_file)
        .arg(&img)
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until the temporary file exists, then interrupt.
    let deadline = std::time::Instant::now() + TIMEOUT;
    while leftovers(&out_dir).is_empty() && !img.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "mkimage never started writing"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    rustix::process::kill_process(
        rustix::process::Pid::from_child(&child),
        rustix::process::Signal::INT,
    )
    .unwrap();
    let status = harness::wait_bounded(&mut child, TIMEOUT).expect("mkimage ends on SIGINT");
    assert!(leftovers(&out_dir).is_empty(), "{:?}", leftovers(&out_dir));
    if status.success() {
        // It finished before the signal arrived: then the image must be whole.
        fsck(&img);
    } else {
        assert_eq!(status.code(), Some(130), "{status:?}");
        assert!(!img.exists(), "no partial image at OUTPUT");
    }
}

/// `mkimage --dir` of a random tree, with everything kept, mounted back.
fn round_trip(
    seed: &str,
    opts: &nixstorefs_tests::random_tree::TreeOptions,
    extra: &[&str],
) -> (TempDir, PathBuf) {
    let d = tempfile::Builder::new()
        .prefix("nixstorefs-random.")
        .tempdir_in("/tmp")
        .unwrap();
    let tree = d.path().join("tree");
    nixstorefs_tests::random_tree::build(&tree, seed, opts).unwrap();
    let img = d.path().join("tree.img");
    let mut args: Vec<&std::ffi::OsStr> = vec!["--preserve-hardlinks".as_ref()];
    args.extend(extra.iter().map(std::ffi::OsStr::new));
    args.extend(["--dir".as_ref(), tree.as_os_str(), img.as_os_str()]);
    let o = mkimage(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    fsck(&img);
    (d, img)
}

#[test]
fn random_trees_round_trip() {
    for seed in ["one", "two", "three"] {
        let (d, img) = round_trip(seed, &Default::default(), &["--preserve-mtime"]);
        let m = ImageMount::new(&img);
        let mut check = TreeCheck::with(Expect {
            mtime: None,
            links: Links::Shared,
            dir_sizes: false,
        });
        for entry in fs::read_dir(d.path().join("tree")).unwrap() {
            let name = entry.unwrap().file_name();
            check.walk(&d.path().join("tree").join(&name), &m.path().join(&name));
        }
        check.assert_clean(&format!("random tree {seed:?}"));
    }
}

/// erofs-utils writes the same tree (where it can: version 1.5 fails on 255-byte names);
/// both images must mount to the same tree. The sizes are printed for the record.
#[test]
fn same_tree_as_mkfs_erofs() {
    let opts = nixstorefs_tests::random_tree::TreeOptions {
        long_names: false,
        ..Default::default()
    };
    // Both with every mtime 0 (mkfs.erofs -T0 sets them all).
    let (d, img) = round_trip("mkfs", &opts, &[]);
    let tree = d.path().join("tree");
    let theirs = d.path().join("mkfs.img");
    let o = harness::run(
        Command::new("mkfs.erofs")
            .arg("-T0")
            .arg(&theirs)
            .arg(&tree),
        TIMEOUT,
    );
    assert!(
        o.status.success(),
        "mkfs.erofs: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let ours_mounted = ImageMount::new(&img);
    let theirs_mounted = ImageMount::new(&theirs);
    let mut check = TreeCheck::with(Expect {
        mtime: None,
        links: Links::Shared,
        dir_sizes: false,
    });
    check.walk(theirs_mounted.path(), ours_mounted.path());
    check.assert_clean("mkimage against mkfs.erofs");
    let ours = fs::metadata(&img).unwrap().len();
    let theirs = fs::metadata(&theirs).unwrap().len();
    println!(
        "image sizes: mkimage {ours} bytes, mkfs.erofs {theirs} bytes ({:+.2}%)",
        (ours as f64 / theirs as f64 - 1.0) * 100.0
    );
}

/// Something mounted at a path for the length of a test; unmounted (lazily, if need be) on
/// drop, whatever happened. Declared after the directory it is in, so it goes first.
struct MountedAt(PathBuf);

impl MountedAt {
    fn new(args: &[&str], source: &Path, at: &Path) -> MountedAt {
        fs::create_dir_all(at).unwrap();
        let o = harness::run(
            Command::new("mount").args(args).arg(source).arg(at),
            TIMEOUT,
        );
        assert!(
            o.status.success(),
            "mount {args:?} {source:?} {at:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        MountedAt(at.to_owned())
    }
}

impl Drop for MountedAt {
    fn drop(&mut self) {
        harness::force_unmount(&self.0);
    }
}

/// A loop device over a file of `bytes` bytes in `dir`; detached on drop.
struct LoopDevice(PathBuf);

impl LoopDevice {
    fn new(dir: &Path, name: &str, bytes: u64) -> LoopDevice {
        let backing = dir.join(name);
        fs::File::create(&backing).unwrap().set_len(bytes).unwrap();
        let o = harness::run(
            Command::new("losetup")
                .args(["--find", "--show"])
                .arg(&backing),
            TIMEOUT,
        );
        assert!(
            o.status.success(),
            "losetup: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        LoopDevice(PathBuf::from(String::from_utf8(o.stdout).unwrap().trim()))
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = harness::run_bounded(
            Command::new("losetup").arg("-d").arg(&self.0),
            Duration::from_secs(20),
        );
    }
}

fn is_block_device(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    fs::symlink_metadata(path)
        .map(|m| m.file_type().is_block_device())
        .unwrap_or(false)
}

/// `mkimage --dir` over a tree holding a bind mount of its own ancestor and a tmpfs: by
/// default both are left out; with --cross-mounts the tmpfs is in, and the loop is an
/// error naming the path, within seconds.
#[test]
fn dir_snapshot_stays_on_its_mount_and_refuses_loops() {
    let d = tempfile::tempdir().unwrap();
    let tree = d.path().join("tree");
    fs::create_dir_all(tree.join("a/b")).unwrap();
    fs::write(tree.join("a/b/file"), b"in the tree\n").unwrap();
    let img = d.path().join("tree.img");
    // A tmpfs holding a file, and (after it) a bind mount of the tree's root two levels
    // down: a walk that follows it never ends.
    let tmpfs = MountedAt::new(&["-t", "tmpfs"], Path::new("none"), &tree.join("scratch"));
    fs::write(tree.join("scratch/other-fs"), b"on a tmpfs\n").unwrap();
    let bind = MountedAt::new(&["--bind"], &tree, &tree.join("a/b/loop"));
    let run = |extra: &[&str]| {
        let started = std::time::Instant::now();
        let mut args: Vec<&std::ffi::OsStr> = extra.iter().map(|a| a.as_ref()).collect();
        args.extend(["--dir".as_ref(), tree.as_os_str(), img.as_os_str()]);
        let o = mkimage(&args);
        (o, started.elapsed())
    };

    let (o, _) = run(&[]);
    assert!(
        o.status.success(),
        "default: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    fsck(&img);
    {
        let m = ImageMount::new(&img);
        assert_eq!(
            fs::read(m.path().join("a/b/file")).unwrap(),
            b"in the tree\n"
        );
        assert!(
            !m.path().join("a/b/loop").exists(),
            "the bind mount is in the image"
        );
        assert!(
            !m.path().join("scratch").exists(),
            "the tmpfs is in the image"
        );
    }

    let (o, took) = run(&["--cross-mounts"]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(
        o.status.code(),
        Some(1),
        "--cross-mounts over a loop: {stderr}"
    );
    assert!(
        stderr.contains(&format!(
            "{}/a/b/loop: a mount here shows . again",
            tree.display()
        )),
        "the error names the path: {stderr}"
    );
    assert!(took < Duration::from_secs(10), "took {took:?}");
    assert!(leftovers(d.path()).is_empty(), "{:?}", leftovers(d.path()));

    // Without the loop, --cross-mounts takes in the other filesystem.
    drop(bind);
    let (o, _) = run(&["--cross-mounts"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let m = ImageMount::new(&img);
    assert_eq!(
        fs::read(m.path().join("scratch/other-fs")).unwrap(),
        b"on a tmpfs\n"
    );
    drop(m);
    drop(tmpfs);
}

/// A block device as OUTPUT is written in place, not replaced by a file; one too small is
/// refused before anything is written; a character device is refused outright.
#[test]
fn block_device_output_is_written_in_place() {
    let (d, s) = sample::temp(&SampleOptions::small());
    let file_img = d.path().join("file.img");
    image_of(&s, &file_img, &[]);
    let image_len = fs::metadata(&file_img).unwrap().len();

    let dev = LoopDevice::new(d.path(), "disk", image_len + (1 << 20));
    image_of(&s, &dev.0, &[]);
    assert!(is_block_device(&dev.0), "{:?} was replaced", dev.0);
    // The device holds exactly the image a file gets.
    let written = {
        use std::io::Read;
        let mut buf = vec![0u8; image_len as usize];
        fs::File::open(&dev.0)
            .unwrap()
            .read_exact(&mut buf)
            .unwrap();
        buf
    };
    assert!(
        written == fs::read(&file_img).unwrap(),
        "device and file images differ"
    );
    fsck(&dev.0);
    {
        let m = ImageMount::new(&dev.0);
        // While it is mounted, the device is not written to.
        let o = mkimage(&[
            "--store-dir".as_ref(),
            s.store_dir.as_os_str(),
            s.closure_file.as_os_str(),
            dev.0.as_os_str(),
        ]);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{stderr}");
        assert!(
            stderr.contains("the device is in use (mounted?)"),
            "{stderr}"
        );
        check_tree(
            &s,
            m.path(),
            Expect {
                mtime: Some((0, 0)),
                links: Links::Separate,
                dir_sizes: false,
            },
        );
    }

    // Too small: refused with both sizes, and the device left as it was.
    let small = LoopDevice::new(d.path(), "small", 1 << 20);
    fs::write(&small.0, b"old contents").unwrap();
    let o = mkimage(&[
        "--store-dir".as_ref(),
        s.store_dir.as_os_str(),
        s.closure_file.as_os_str(),
        small.0.as_os_str(),
    ]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(&small.0.display().to_string()), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "the image needs {image_len} bytes, the device has 1048576"
        )),
        "{stderr}"
    );
    assert!(is_block_device(&small.0));
    let mut head = [0u8; 12];
    use std::io::Read;
    fs::File::open(&small.0)
        .unwrap()
        .read_exact(&mut head)
        .unwrap();
    assert_eq!(&head, b"old contents", "a refused device was written to");

    // A character device is never replaced.
    let o = mkimage(&[
        "--store-dir".as_ref(),
        s.store_dir.as_os_str(),
        s.closure_file.as_os_str(),
        "/dev/null".as_ref(),
    ]);
    assert_eq!(
        o.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    use std::os::unix::fs::FileTypeExt;
    assert!(fs::metadata("/dev/null")
        .unwrap()
        .file_type()
        .is_char_device());
}

fn uuid_of(image: &Path) -> String {
    let o = harness::run(
        Command::new("blkid")
            .args(["-p", "-o", "value", "-s", "UUID"])
            .arg(image),
        TIMEOUT,
    );
    let uuid = String::from_utf8_lossy(&o.stdout).trim().to_owned();
    assert_eq!(uuid.len(), 36, "blkid {image:?}: {o:?}");
    uuid
}

/// Without -U, the UUID comes from the closure: the same closure gets the same one (the
/// images are reproducible), a different closure another.
#[test]
fn default_uuid_is_derived_from_the_closure() {
    let (d, s) = sample::temp(&SampleOptions::small());
    let (a, b, c) = (
        d.path().join("a.img"),
        d.path().join("b.img"),
        d.path().join("c.img"),
    );
    image_of(&s, &a, &[]);
    image_of(&s, &b, &[]);
    assert_eq!(uuid_of(&a), uuid_of(&b));
    assert_eq!(sha256(&a), sha256(&b));

    let fewer = d.path().join("fewer.txt");
    let paths = s.closure_paths();
    let text: String = paths[1..]
        .iter()
        .map(|p| format!("{}\n", p.display()))
        .collect();
    fs::write(&fewer, text).unwrap();
    let o = mkimage(&[
        "--store-dir".as_ref(),
        s.store_dir.as_os_str(),
        fewer.as_os_str(),
        c.as_os_str(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_ne!(uuid_of(&a), uuid_of(&c), "two closures share a UUID");
}

/// After renaming the image into place, mkimage syncs the directory holding it: without
/// that, the rename itself may not survive a crash. Seen with strace, in order.
#[test]
fn output_directory_is_synced_after_the_rename() {
    let (d, s) = sample::temp(&SampleOptions::small());
    let out_dir = d.path().join("out");
    fs::create_dir(&out_dir).unwrap();
    let out_dir = out_dir.canonicalize().unwrap();
    let img = out_dir.join("store.img");
    let log = d.path().join("strace.log");
    let o = harness::run(
        Command::new("strace")
            .args([
                "-f",
                "-y",
                "-e",
                "trace=rename,renameat,renameat2,fsync,fdatasync",
            ])
            .arg("-o")
            .arg(&log)
            .arg(harness::bin("mkimage"))
            .arg("--store-dir")
            .arg(&s.store_dir)
            .arg(&s.closure_file)
            .arg(&img)
            .stdin(Stdio::null()),
        TIMEOUT,
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let trace = fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = trace.lines().collect();
    let renamed = lines
        .iter()
        .position(|l| l.contains("rename") && l.contains(&format!("\"{}\"", img.display())))
        .unwrap_or_else(|| panic!("no rename onto {img:?}:\n{trace}"));
    let dir_fd = format!("<{}>)", out_dir.display());
    assert!(
        lines[renamed..]
            .iter()
            .any(|l| l.contains("fsync(") && l.contains(&dir_fd) && l.ends_with("= 0")),
        "no fsync of {out_dir:?} after the rename:\n{trace}"
    );
}

/// The first `len` bytes of `path`.
fn head_of(path: &Path, len: usize) -> Vec<u8> {
    use std::io::Read;
    let mut buf = vec![0u8; len];
    fs::File::open(path).unwrap().read_exact(&mut buf).unwrap();
    buf
}

/// Served from the cache, a block device OUTPUT, or a symlink to one, is written in
/// place: never replaced by a hard link to the entry (which left the device unwritten
/// while the run reported success), its size checked before a byte is written, and its
/// superblock written last.
#[test]
fn cache_hits_write_block_devices_in_place_superblock_last() {
    let (d, s) = sample::temp(&SampleOptions::small());
    let cache = d.path().join("cache");
    let cache_arg = cache.to_str().unwrap();
    let file_img = d.path().join("file.img");
    image_of(&s, &file_img, &["--cache", cache_arg]);
    let image = fs::read(&file_img).unwrap();

    // Too small: refused with both sizes, and not a byte written.
    let small = LoopDevice::new(d.path(), "small", 1 << 20);
    fs::write(&small.0, b"old contents").unwrap();
    let o = mkimage(&[
        "--store-dir".as_ref(),
        s.store_dir.as_os_str(),
        "--cache".as_ref(),
        cache.as_os_str(),
        s.closure_file.as_os_str(),
        small.0.as_os_str(),
    ]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "the image needs {} bytes, the device has 1048576",
            image.len()
        )),
        "{stderr}"
    );
    assert_eq!(
        head_of(&small.0, 12),
        b"old contents",
        "a refused device was written to"
    );

    // A symlink to a device beside the cache (same filesystem, where a hard link is
    // possible): the device gets the image, the symlink stays.
    let dev = LoopDevice::new(d.path(), "disk", image.len() as u64 + (1 << 20));
    let link = d.path().join("store-disk");
    std::os::unix::fs::symlink(&dev.0, &link).unwrap();
    let log = d.path().join("strace.log");
    let o = harness::run(
        Command::new("strace")
            .args(["-f", "-y", "-e", "trace=write,pwrite64,pwritev,pwritev2"])
            .arg("-o")
            .arg(&log)
            .arg(harness::bin("mkimage"))
            .arg("--store-dir")
            .arg(&s.store_dir)
            .arg("--cache")
            .arg(&cache)
            .arg(&s.closure_file)
            .arg(&link)
            .env_remove("NIXSTOREFS_IMAGE_CACHE")
            .stdin(Stdio::null()),
        TIMEOUT,
    );
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(stderr.contains("cache hit"), "{stderr}");
    assert!(
        fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink(),
        "the symlink to the device was replaced"
    );
    assert!(
        head_of(&dev.0, image.len()) == image,
        "the device does not hold the cached image"
    );
    fsck(&dev.0);
    // The last write to the device is block 0, with the superblock.
    let trace = fs::read_to_string(&log).unwrap();
    let dev_name = format!("<{}>", dev.0.display());
    let writes: Vec<&str> = trace
        .lines()
        .filter(|l| l.contains(&dev_name) && l.contains("write"))
        .collect();
    let last = writes
        .last()
        .unwrap_or_else(|| panic!("no write to {dev_name}:\n{trace}"));
    assert!(
        last.contains("pwrite64(") && last.contains(", 4096, 0) = 4096"),
        "the last write to the device is not block 0: {last}"
    );
    let m = ImageMount::new(&dev.0);
    check_tree(
        &s,
        m.path(),
        Expect {
            mtime: Some((0, 0)),
            links: Links::Separate,
            dir_sizes: false,
        },
    );
}

/// Deletes the store path `base` and writes it again under its name with one file more,
/// `marker`, as a build that is not reproducible does after a garbage collection.
fn rebuild(s: &SampleStore, base: &str, marker: &str) {
    let path = s.host(base);
    let copy = s.store_dir.join(format!(".rebuilding-{marker}"));
    let o = harness::run(Command::new("cp").arg("-a").arg(&path).arg(&copy), TIMEOUT);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    fs::write(copy.join(marker), marker).unwrap();
    fs::remove_dir_all(&path).unwrap();
    fs::rename(&copy, &path).unwrap();
}

/// The cache key holds what changes the image beyond the closure's names: --cross-mounts,
/// the mounts below the closure's paths and what a followed one holds, and the contents
/// of each store path (a path written again under its name), also through a closureInfo
/// with --no-registration. Before, each of these runs was a hit serving the old image.
#[test]
fn cache_key_follows_mounts_and_store_path_contents() {
    let (d, s) = sample::temp(&SampleOptions::small());
    let cache = d.path().join("cache");
    let run = |input: &Path, out: &str, extra: &[&str]| -> (String, ImageMount) {
        let out = d.path().join(out);
        let mut args: Vec<&std::ffi::OsStr> = vec!["--store-dir".as_ref(), s.store_dir.as_os_str()];
        args.extend(["--cache".as_ref(), cache.as_os_str()]);
        args.extend(extra.iter().map(std::ffi::OsStr::new));
        args.extend([input.as_os_str(), out.as_os_str()]);
        let o = mkimage(&args);
        let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(o.status.success(), "mkimage {args:?}: {stderr}");
        fsck(&out);
        (stderr, ImageMount::new(&out))
    };
    let list = s.closure_file.clone();
    let dirs: Vec<&String> = s
        .closure
        .iter()
        .filter(|b| fs::symlink_metadata(s.host(b)).unwrap().is_dir())
        .collect();
    let (first, second) = (dirs[0], dirs[1]);

    // A tmpfs below a closure path: left out, then followed.
    let inside = s.host(first).join("mounted");
    let tmpfs = MountedAt::new(&["-t", "tmpfs"], Path::new("none"), &inside);
    fs::write(inside.join("on-tmpfs"), b"on a tmpfs\n").unwrap();
    let (text, m) = run(&list, "a.img", &[]);
    assert!(text.contains("cache miss"), "{text}");
    assert!(!m.path().join(first).join("mounted").exists());
    drop(m);
    let (text, m) = run(&list, "b.img", &["--cross-mounts"]);
    assert!(text.contains("cache miss"), "--cross-mounts: {text}");
    assert_eq!(
        fs::read(m.path().join(first).join("mounted/on-tmpfs")).unwrap(),
        b"on a tmpfs\n"
    );
    drop(m);
    // What the followed mount holds changed.
    fs::write(inside.join("more"), b"more\n").unwrap();
    let (text, m) = run(&list, "c.img", &["--cross-mounts"]);
    assert!(
        text.contains("cache miss"),
        "a followed mount changed: {text}"
    );
    assert!(m.path().join(first).join("mounted/more").exists());
    drop(m);
    let (text, m) = run(&list, "c2.img", &["--cross-mounts"]);
    assert!(text.contains("cache hit"), "{text}");
    drop(m);
    // Unmounted: the mount point is now an empty directory of the path, in the image.
    drop(tmpfs);
    let (text, m) = run(&list, "d.img", &[]);
    assert!(text.contains("cache miss"), "a mount went: {text}");
    assert!(m.path().join(first).join("mounted").is_dir());
    drop(m);

    // A store path written again with other contents.
    rebuild(&s, second, "rebuilt-once");
    let (text, m) = run(&list, "e.img", &[]);
    assert!(text.contains("cache miss"), "a rebuilt path: {text}");
    assert!(m.path().join(second).join("rebuilt-once").exists());
    drop(m);

    // The same through a closureInfo whose registration is left out of the image.
    let info = d.path().join("info");
    s.write_closure_info(&info).unwrap();
    let (text, m) = run(&info, "f.img", &["--no-registration"]);
    assert!(text.contains("cache miss"), "{text}");
    drop(m);
    rebuild(&s, second, "rebuilt-twice");
    fs::remove_dir_all(&info).unwrap();
    s.write_closure_info(&info).unwrap();
    let (text, m) = run(&info, "g.img", &["--no-registration"]);
    assert!(
        text.contains("cache miss"),
        "a rebuilt path, --no-registration: {text}"
    );
    assert!(m.path().join(second).join("rebuilt-twice").exists());
    drop(m);
    let (text, m) = run(&info, "g2.img", &["--no-registration"]);
    assert!(text.contains("cache hit"), "{text}");
    drop(m);
}

/// mkimage's threshold for DAX: regular files of at least this many bytes are plain.
const DAX_MIN_FILE_SIZE: u64 = 4096;
/// A DAX image's size is a multiple of this.
const DAX_IMAGE_ALIGN: u64 = 2 << 20;

/// The data layout dump.erofs shows for `path` inside `image` (its `i_format` bits 1..=3:
/// 0 plain, 1 compressed, 2 plain with an inline tail). `path` is any bytes, as in the
/// image.
fn data_layout(image: &Path, path: &[u8]) -> u64 {
    use std::os::unix::ffi::OsStringExt;
    let arg = std::ffi::OsString::from_vec([b"--path=/", path].concat());
    let o = harness::run(Command::new("dump.erofs").arg(arg).arg(image), TIMEOUT);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "dump.erofs {}: {text}{}",
        String::from_utf8_lossy(path),
        String::from_utf8_lossy(&o.stderr)
    );
    let at = text
        .find("Layout: ")
        .unwrap_or_else(|| panic!("no layout:\n{text}"))
        + 8;
    text[at..]
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// The regular files below `root`, as paths relative to it and sizes.
fn regular_files(root: &Path) -> Vec<(Vec<u8>, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let mut found = Vec::new();
    let mut pending = vec![PathBuf::new()];
    while let Some(rel) = pending.pop() {
        for entry in fs::read_dir(root.join(&rel)).unwrap() {
            let entry = entry.unwrap();
            let path = rel.join(entry.file_name());
            let meta = entry.metadata().unwrap();
            if meta.is_dir() {
                pending.push(path);
            } else if meta.is_file() {
                found.push((path.as_os_str().as_bytes().to_vec(), meta.len()));
            }
        }
    }
    found.sort();
    found
}

/// `--dax`: fsck.erofs passes, the image is a whole number of 2 MiB, two runs give the
/// same bytes, the kernel mounts it and reads the tree back, and every regular file of a
/// page or more is plain (no inline tail), while smaller ones keep theirs.
#[test]
fn dax_image_of_a_generated_tree() {
    let opts = nixstorefs_tests::random_tree::TreeOptions {
        wide_entries: 300,
        depth: 10,
        random_entries: 400,
        long_names: true,
    };
    let (d, img) = round_trip("dax", &opts, &["--dax"]);
    let tree = d.path().join("tree");
    let size = fs::metadata(&img).unwrap().len();
    assert!(
        size > 0 && size % DAX_IMAGE_ALIGN == 0,
        "{size} bytes: not a multiple of 2 MiB"
    );

    let again = d.path().join("again.img");
    let o = mkimage(&[
        "--preserve-hardlinks".as_ref(),
        "--dax".as_ref(),
        "--dir".as_ref(),
        tree.as_os_str(),
        again.as_os_str(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(sha256(&img), sha256(&again), "two runs, same bytes");

    let m = ImageMount::new(&img);
    let mut check = TreeCheck::with(Expect {
        mtime: Some((0, 0)),
        links: Links::Shared,
        dir_sizes: false,
    });
    for entry in fs::read_dir(&tree).unwrap() {
        let name = entry.unwrap().file_name();
        check.walk(&tree.join(&name), &m.path().join(&name));
    }
    check.assert_clean("--dax image of a random tree");
    drop(m);

    let files = regular_files(&tree);
    let large: Vec<_> = files
        .iter()
        .filter(|(_, size)| *size >= DAX_MIN_FILE_SIZE)
        .collect();
    assert!(large.len() > 50, "only {} files to check", large.len());
    for (path, size) in large {
        assert_eq!(
            data_layout(&img, path),
            0,
            "{} ({size} bytes) is not plain",
            String::from_utf8_lossy(path)
        );
    }
    // Below the threshold nothing changes: a 1-byte file stays inline.
    assert_eq!(data_layout(&img, b"edges/size-1"), 2);
    // Without --dax, the same files of a page or more keep their inline tails.
    let plain = d.path().join("plain.img");
    let o = mkimage(&[
        "--preserve-hardlinks".as_ref(),
        "--dir".as_ref(),
        tree.as_os_str(),
        plain.as_os_str(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(data_layout(&plain, b"edges/size-4097"), 2);
    assert_eq!(data_layout(&img, b"edges/size-4097"), 0);
}

/// erofs does not serve compressed files through DAX: `--dax` with `-z` is bad input,
/// refused before anything is written.
#[test]
fn dax_refuses_compression() {
    let (d, s) = sample::temp(&SampleOptions::small());
    let out_dir = d.path().join("out");
    fs::create_dir(&out_dir).unwrap();
    let img = out_dir.join("store.img");
    for z in ["lz4", "lz4hc,12"] {
        let o = mkimage(&[
            "--store-dir".as_ref(),
            s.store_dir.as_os_str(),
            "--dax".as_ref(),
            "-z".as_ref(),
            z.as_ref(),
            s.closure_file.as_os_str(),
            img.as_os_str(),
        ]);
        assert_eq!(o.status.code(), Some(2), "{o:?}");
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(
            stderr.contains("--dax") && stderr.contains(&format!("-z {z}")),
            "{stderr}"
        );
        assert!(!img.exists());
        assert!(leftovers(&out_dir).is_empty(), "{:?}", leftovers(&out_dir));
    }
}

/// `--dax` is part of the cache key: a cached plain image is not served for it, nor a
/// DAX one for a plain run.
#[test]
fn dax_changes_the_cache_key() {
    let (d, s) = sample::temp(&SampleOptions::small());
    let cache = d.path().join("cache");
    let run = |out: &str, extra: &[&str]| -> (String, PathBuf) {
        let out = d.path().join(out);
        let mut args: Vec<&std::ffi::OsStr> = vec!["--store-dir".as_ref(), s.store_dir.as_os_str()];
        args.extend(["--cache".as_ref(), cache.as_os_str()]);
        args.extend(extra.iter().map(std::ffi::OsStr::new));
        args.extend([s.closure_file.as_os_str(), out.as_os_str()]);
        let o = mkimage(&args);
        let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(o.status.success(), "mkimage {args:?}: {stderr}");
        (stderr, out)
    };
    let (text, plain) = run("plain.img", &[]);
    assert!(text.contains("cache miss"), "{text}");
    let (text, dax) = run("dax.img", &["--dax"]);
    assert!(
        text.contains("cache miss"),
        "--dax after a plain image: {text}"
    );
    assert_eq!(fs::metadata(&dax).unwrap().len() % DAX_IMAGE_ALIGN, 0);
    assert_ne!(sha256(&plain), sha256(&dax));
    fsck(&dax);
    let (text, dax_again) = run("dax-again.img", &["--dax"]);
    assert!(text.contains("cache hit"), "{text}");
    assert_eq!(sha256(&dax), sha256(&dax_again));
    let (text, plain_again) = run("plain-again.img", &[]);
    assert!(text.contains("cache hit"), "{text}");
    assert_eq!(sha256(&plain), sha256(&plain_again));
}

/// On a block device, a DAX image's padding is written as zeros over whatever the device
/// held: the device reads exactly as the image a file gets.
#[test]
fn dax_image_on_a_block_device_is_padded_with_zeros() {
    let (d, s) = sample::temp(&SampleOptions::small());
    let file_img = d.path().join("file.img");
    image_of(&s, &file_img, &["--dax"]);
    let image_len = fs::metadata(&file_img).unwrap().len();
    assert_eq!(image_len % DAX_IMAGE_ALIGN, 0);

    let dev = LoopDevice::new(d.path(), "disk", image_len + (1 << 20));
    fs::write(&dev.0, vec![0xa5; (image_len + (1 << 20)) as usize]).unwrap();
    image_of(&s, &dev.0, &["--dax"]);
    assert!(is_block_device(&dev.0), "{:?} was replaced", dev.0);
    let written = {
        use std::io::Read;
        let mut buf = vec![0u8; image_len as usize];
        fs::File::open(&dev.0)
            .unwrap()
            .read_exact(&mut buf)
            .unwrap();
        buf
    };
    assert!(
        written == fs::read(&file_img).unwrap(),
        "device and file images differ"
    );
    fsck(&dev.0);
}
