//! End-to-end tests of `mkimage --cache`: hits and misses, concurrent runs, damaged and
//! planted entries, a cache directory someone else could write to, leftovers of dead runs,
//! and eviction of the least recently used entries. Every served image is the one a run
//! without the cache writes, byte for byte.
//!
//! Needs root (ownership and the kernel's checks of the cache directory), erofs-utils, and
//! the built binaries.

use std::fs;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use nixstorefs_tests::harness;
use nixstorefs_tests::images::{fsck, image_of, mkimage, sha256, TIMEOUT};
use nixstorefs_tests::sample::{self, SampleOptions, SampleStore};
use tempfile::TempDir;

/// The cache's entries (`KEY.img`) under `dir`.
fn entries(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "img"))
        .collect();
    v.sort();
    v
}

struct CacheCase {
    d: TempDir,
    s: SampleStore,
    cache: PathBuf,
    /// The image without the cache, for comparison.
    fresh: Vec<u8>,
}

fn cache_case() -> CacheCase {
    let (d, s) = sample::temp(&SampleOptions::small());
    let cache = d.path().join("cache");
    let fresh = d.path().join("fresh.img");
    image_of(&s, &fresh, &["-z", "lz4"]);
    let fresh = sha256(&fresh);
    CacheCase { d, s, cache, fresh }
}

impl CacheCase {
    fn run(&self, out: &str, extra: &[&str]) -> String {
        let out = self.d.path().join(out);
        let mut args = vec!["-z", "lz4", "--cache", self.cache.to_str().unwrap()];
        args.extend(extra);
        image_of(&self.s, &out, &args)
    }

    fn out(&self, name: &str) -> PathBuf {
        self.d.path().join(name)
    }
}

#[test]
fn cache_miss_then_hit() {
    let c = cache_case();
    let first = c.run("a.img", &[]);
    assert!(first.contains("cache miss"), "{first}");
    assert_eq!(sha256(&c.out("a.img")), c.fresh, "a miss serves the image");
    let second = c.run("b.img", &[]);
    assert!(second.contains("mkimage: cache hit:"), "{second}");
    assert!(!second.contains("wrote"), "a hit writes no image: {second}");
    assert_eq!(
        sha256(&c.out("b.img")),
        c.fresh,
        "a hit serves the same bytes"
    );
    fsck(&c.out("b.img"));
    assert_eq!(entries(&c.cache).len(), 1);

    // Any option that changes the image is part of the key; the thread count is not.
    let third = c.run("c.img", &["-L", "other"]);
    assert!(third.contains("cache miss"), "{third}");
    let fourth = c.run("d.img", &["--threads", "1"]);
    assert!(fourth.contains("cache hit"), "{fourth}");
    assert_eq!(entries(&c.cache).len(), 2);

    // --no-cache bypasses it; NIXSTOREFS_IMAGE_CACHE sets it.
    let o = harness::run(
        Command::new(harness::bin("mkimage"))
            .args(["--store-dir".as_ref(), c.s.store_dir.as_os_str()])
            .args(["-z", "lz4", "--no-cache"])
            .arg(&c.s.closure_file)
            .arg(c.out("e.img"))
            .env("NIXSTOREFS_IMAGE_CACHE", &c.cache),
        TIMEOUT,
    );
    let text = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success() && !text.contains("cache"), "{text}");
    let o = harness::run(
        Command::new(harness::bin("mkimage"))
            .args(["--store-dir".as_ref(), c.s.store_dir.as_os_str()])
            .args(["-z", "lz4"])
            .arg(&c.s.closure_file)
            .arg(c.out("f.img"))
            .env("NIXSTOREFS_IMAGE_CACHE", &c.cache),
        TIMEOUT,
    );
    let text = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success() && text.contains("cache hit"), "{text}");

    // --dir trees are not cached: an explicit --cache is refused.
    let o = mkimage(&[
        "--cache".as_ref(),
        c.cache.as_os_str(),
        "--dir".as_ref(),
        c.s.store_dir.as_os_str(),
        c.out("g.img").as_os_str(),
    ]);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn writing_to_a_served_image_never_changes_a_later_hit() {
    let c = cache_case();
    c.run("a.img", &[]);
    // On this filesystem OUTPUT shares the entry's inode (or is a reflink of it).
    // Whatever a VM writes to it, the next run must not serve those bytes.
    let f = fs::OpenOptions::new()
        .write(true)
        .open(c.out("a.img"))
        .unwrap();
    f.write_all_at(&[0x5a; 4096], 8192).unwrap();
    drop(f);
    let again = c.run("b.img", &[]);
    assert!(
        again.contains("wrote") || again.contains("cache hit"),
        "{again}"
    );
    assert_eq!(
        sha256(&c.out("b.img")),
        c.fresh,
        "the served image is the true one"
    );
    fsck(&c.out("b.img"));
}

#[test]
fn damaged_entries_are_rebuilt() {
    let c = cache_case();
    c.run("a.img", &[]);
    let entry = entries(&c.cache).pop().unwrap();
    let sealed = fs::metadata(&entry).unwrap();

    // A flipped byte in the superblock, with the mtime put back: the checksum catches it.
    let f = fs::OpenOptions::new().write(true).open(&entry).unwrap();
    f.write_all_at(&[0xff], 1024 + 64).unwrap();
    f.set_modified(sealed.modified().unwrap()).unwrap();
    drop(f);
    assert_eq!(
        fs::metadata(&entry).unwrap().mtime_nsec(),
        sealed.mtime_nsec()
    );
    let text = c.run("b.img", &[]);
    assert!(
        text.contains("damaged") && text.contains("checksum"),
        "{text}"
    );
    assert_eq!(sha256(&c.out("b.img")), c.fresh);

    // Truncated: the size no longer matches.
    let f = fs::OpenOptions::new().write(true).open(&entry).unwrap();
    f.set_len(8192).unwrap();
    drop(f);
    let text = c.run("c.img", &[]);
    assert!(
        text.contains("damaged") && text.contains("changed"),
        "{text}"
    );
    assert_eq!(sha256(&c.out("c.img")), c.fresh);

    // No seal (a run killed before sealing): rebuilt.
    let seal = entry.with_extension("seal");
    fs::remove_file(&seal).unwrap();
    let text = c.run("d.img", &[]);
    assert!(text.contains("damaged"), "{text}");
    assert!(seal.exists());
    assert_eq!(sha256(&c.out("d.img")), c.fresh);
    let text = c.run("e.img", &[]);
    assert!(text.contains("cache hit"), "{text}");
}

#[test]
fn concurrent_runs_build_once() {
    let c = cache_case();
    let children: Vec<_> = (0..4)
        .map(|i| {
            Command::new(harness::bin("mkimage"))
                .args(["--store-dir".as_ref(), c.s.store_dir.as_os_str()])
                .args(["-z", "lz4", "--cache"])
                .arg(&c.cache)
                .arg(&c.s.closure_file)
                .arg(c.out(&format!("out{i}.img")))
                .env_remove("NIXSTOREFS_IMAGE_CACHE")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut built = 0;
    for mut child in children {
        let status = harness::wait_bounded(&mut child, TIMEOUT).expect("mkimage finishes");
        let mut text = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut text).unwrap();
        assert!(status.success(), "{text}");
        if text.contains("(cache miss)") {
            built += 1;
        }
    }
    assert_eq!(built, 1, "one run builds, the others wait and hit");
    for i in 0..4 {
        assert_eq!(sha256(&c.out(&format!("out{i}.img"))), c.fresh);
    }
    assert_eq!(entries(&c.cache).len(), 1);
}

#[test]
fn least_recently_used_entries_are_evicted() {
    let c = cache_case();
    let size = fs::metadata(c.out("fresh.img")).unwrap().len();
    // Room for two entries of about this size (labels do not change the size).
    let max = (2 * size + size / 2).to_string();
    let run = |out: &str, label: &str| {
        // Seal times must differ even on filesystems with coarse timestamps.
        std::thread::sleep(Duration::from_millis(30));
        c.run(out, &["-L", label, "--cache-max-size", &max])
    };
    run("a.img", "a");
    run("b.img", "b");
    assert_eq!(entries(&c.cache).len(), 2);
    // a is used again, so b is now the least recently used one.
    assert!(run("a2.img", "a").contains("cache hit"));
    run("c.img", "c");
    assert_eq!(entries(&c.cache).len(), 2);
    assert!(run("a3.img", "a").contains("cache hit"), "a was kept");
    assert!(run("c2.img", "c").contains("cache hit"), "c was kept");
    assert!(run("b2.img", "b").contains("cache miss"), "b was evicted");
    // Evicting an entry leaves the images already served alone.
    fsck(&c.out("b.img"));
}

// ---------------------------------------------------------------------------------------
// A cache nobody else can plant images in

/// mkimage with the sample's closure and `--cache`, output and status unchecked.
fn cache_run(c: &CacheCase, out: &str, extra: &[&str]) -> Output {
    let out = c.out(out);
    let mut args: Vec<&std::ffi::OsStr> = vec!["--store-dir".as_ref(), c.s.store_dir.as_os_str()];
    args.extend(["-z", "lz4", "--cache"].map(std::ffi::OsStr::new));
    args.push(c.cache.as_os_str());
    args.extend(extra.iter().map(std::ffi::OsStr::new));
    args.push(c.s.closure_file.as_os_str());
    args.push(out.as_os_str());
    mkimage(&args)
}

fn chown(path: &Path, uid: u32) {
    std::os::unix::fs::lchown(path, Some(uid), Some(uid)).unwrap();
}

fn mode(path: &Path) -> u32 {
    fs::symlink_metadata(path).unwrap().mode() & 0o7777
}

/// The key of the cache's only entry.
fn only_key(dir: &Path) -> String {
    let entries = entries(dir);
    assert_eq!(entries.len(), 1, "{entries:?}");
    entries[0].file_stem().unwrap().to_str().unwrap().to_owned()
}

#[test]
fn cache_directory_must_be_the_callers_alone() {
    let c = cache_case();
    // Created by mkimage: for its user only.
    c.run("a.img", &[]);
    assert_eq!(mode(&c.cache), 0o700, "a new cache directory is mode 0700");

    // Writable by others: refused, naming the path, the owner and the mode; nothing served.
    fs::set_permissions(&c.cache, fs::Permissions::from_mode(0o777)).unwrap();
    let o = cache_run(&c, "b.img", &[]);
    let text = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{text}");
    assert!(
        text.contains(&c.cache.display().to_string())
            && text.contains("uid 0")
            && text.contains("0777"),
        "{text}"
    );
    assert!(!c.out("b.img").exists());
    // Writable by the group only: refused too.
    fs::set_permissions(&c.cache, fs::Permissions::from_mode(0o770)).unwrap();
    let o = cache_run(&c, "b.img", &[]);
    assert_eq!(o.status.code(), Some(1), "{o:?}");

    // Owned by another user, however private: refused.
    fs::set_permissions(&c.cache, fs::Permissions::from_mode(0o700)).unwrap();
    chown(&c.cache, 65534);
    let o = cache_run(&c, "b.img", &[]);
    let text = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{text}");
    assert!(
        text.contains("uid 65534") && text.contains("0700"),
        "{text}"
    );
    assert!(!c.out("b.img").exists());

    // A symlink is not followed, even to a directory of the caller's.
    chown(&c.cache, 0);
    let link = c.d.path().join("cache-link");
    std::os::unix::fs::symlink(&c.cache, &link).unwrap();
    let o = mkimage(&[
        "--store-dir".as_ref(),
        c.s.store_dir.as_os_str(),
        "--cache".as_ref(),
        link.as_os_str(),
        c.s.closure_file.as_os_str(),
        c.out("b.img").as_os_str(),
    ]);
    let text = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{text}");
    assert!(text.contains("symlink"), "{text}");

    // Back as it should be: served.
    assert!(c.run("b.img", &[]).contains("cache hit"));
}

/// An image planted under an entry's name by another user, with a seal that matches it,
/// is never served: the entry is rebuilt, and the rebuilt one is the caller's.
#[test]
fn a_planted_entry_is_never_served() {
    let c = cache_case();
    c.run("a.img", &[]);
    let key = only_key(&c.cache);
    // The trojan: a valid image of another tree (here: another label), with its seal.
    let trojan = c.out("trojan.img");
    image_of(&c.s, &trojan, &["-z", "lz4", "-L", "trojan"]);
    let planted = c.cache.join(format!("{key}.img"));
    let seal = c.cache.join(format!("{key}.seal"));
    fs::remove_file(&planted).unwrap();
    fs::copy(&trojan, &planted).unwrap();
    fs::set_permissions(&planted, fs::Permissions::from_mode(0o444)).unwrap();
    chown(&planted, 65534);
    let meta = fs::metadata(&planted).unwrap();
    fs::write(
        &seal,
        format!(
            "mkimage-cache-seal 1 size={} mtime={}.{:09} ino={}\n",
            meta.len(),
            meta.mtime(),
            meta.mtime_nsec(),
            meta.ino()
        ),
    )
    .unwrap();
    chown(&seal, 65534);

    let text = c.run("b.img", &[]);
    assert!(
        text.contains("damaged") && text.contains("uid 65534"),
        "the planted entry is refused, saying why: {text}"
    );
    assert_ne!(
        sha256(&c.out("b.img")),
        sha256(&trojan),
        "the trojan was served"
    );
    assert_eq!(sha256(&c.out("b.img")), c.fresh);
    let rebuilt = fs::metadata(&planted).unwrap();
    assert_eq!((rebuilt.uid(), rebuilt.mode() & 0o777), (0, 0o444));
    assert!(c.run("c.img", &[]).contains("cache hit"));
}

/// A seal swapped for a symlink to another file with the same text: the hit does not
/// follow it (before, the touch after a hit set the other file's mtime).
#[test]
fn cache_files_swapped_for_symlinks_are_not_followed() {
    let c = cache_case();
    c.run("a.img", &[]);
    let key = only_key(&c.cache);
    let seal = c.cache.join(format!("{key}.seal"));
    let victim = c.d.path().join("victim");
    fs::rename(&seal, &victim).unwrap();
    std::os::unix::fs::symlink(&victim, &seal).unwrap();
    let old = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
    fs::File::options()
        .write(true)
        .open(&victim)
        .unwrap()
        .set_modified(old)
        .unwrap();
    let text = c.run("b.img", &[]);
    assert!(
        text.contains("damaged") && text.contains("symlink"),
        "{text}"
    );
    assert_eq!(fs::metadata(&victim).unwrap().modified().unwrap(), old);
    assert_eq!(sha256(&c.out("b.img")), c.fresh);
    assert!(
        fs::symlink_metadata(&seal).unwrap().is_file(),
        "the seal is rewritten"
    );

    // A lock swapped for a symlink to a file that does not exist: not created.
    let lock = c.cache.join(format!("{key}.lock"));
    let created = c.d.path().join("created-by-mkimage");
    fs::remove_file(&lock).unwrap();
    std::os::unix::fs::symlink(&created, &lock).unwrap();
    let o = cache_run(&c, "c.img", &[]);
    let text = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{text}");
    assert!(
        text.contains(&format!("{key}.lock: is a symlink")),
        "{text}"
    );
    assert!(!created.exists(), "mkimage created the symlink's target");
}

/// Traced: every file of the cache is opened without following symlinks, and no mode is
/// changed through a path (a path could be swapped for a symlink between the write and
/// the chmod; the descriptor cannot).
#[test]
fn cache_files_are_opened_nofollow_and_sealed_through_their_descriptor() {
    let c = cache_case();
    fs::create_dir(&c.cache).unwrap();
    let cache = c.cache.canonicalize().unwrap();
    let log = c.d.path().join("strace.log");
    let o = harness::run(
        Command::new("strace")
            .args([
                "-f",
                "-e",
                "trace=open,openat,openat2,creat,chmod,fchmodat,utimensat",
            ])
            .arg("-o")
            .arg(&log)
            .arg(harness::bin("mkimage"))
            .args(["--store-dir".as_ref(), c.s.store_dir.as_os_str()])
            .args(["-z", "lz4", "--cache"])
            .arg(&cache)
            .arg(&c.s.closure_file)
            .arg(c.out("a.img"))
            .env_remove("NIXSTOREFS_IMAGE_CACHE")
            .stdin(Stdio::null()),
        TIMEOUT,
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let trace = fs::read_to_string(&log).unwrap();
    let cache_path = format!("\"{}", cache.display());
    let mut opened = 0;
    for line in trace.lines() {
        // The directory's files, by a path in it or by a name relative to its descriptor
        // (every other relative open names no key).
        let by_path = line.contains(&cache_path);
        let by_name = line.contains("openat(")
            && !line.contains("AT_FDCWD")
            && [".lock\"", ".img\"", ".seal\"", ".tmp\""]
                .iter()
                .any(|n| line.contains(n));
        if (line.contains("open(") || line.contains("openat(")) && (by_path || by_name) {
            opened += 1;
            assert!(line.contains("O_NOFOLLOW"), "followed: {line}");
        }
        if (line.contains("chmod(") || line.contains("fchmodat")) && by_path {
            panic!("a mode changed through a path: {line}");
        }
        if line.contains("utimensat(") && by_path {
            panic!("a time changed through a path: {line}");
        }
    }
    assert!(opened >= 4, "the cache's files were not seen:\n{trace}");
}

/// A file the size of `bytes` left in the cache by a run that died while building `key`.
fn leftover(dir: &Path, key: &str, bytes: u64) -> PathBuf {
    let path = dir.join(format!(".{key}.img.4242-0-0.tmp"));
    let f = fs::File::create(&path).unwrap();
    f.write_all_at(&vec![0x11; bytes as usize], 0).unwrap();
    path
}

/// Holds `key`'s lock as a run building or serving it does.
fn hold_lock(dir: &Path, key: &str) -> fs::File {
    let f = fs::File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(dir.join(format!("{key}.lock")))
        .unwrap();
    rustix::fs::flock(&f, rustix::fs::FlockOperation::LockShared).unwrap();
    f
}

#[test]
fn leftovers_of_dead_runs_are_removed_once_unlocked_and_counted_meanwhile() {
    let c = cache_case();
    let size = fs::metadata(c.out("fresh.img")).unwrap().len();
    c.run("a.img", &["-L", "a"]);
    std::thread::sleep(Duration::from_millis(30));
    c.run("b.img", &["-L", "b"]);
    assert_eq!(entries(&c.cache).len(), 2);

    // A dead run's image, its lock still held (say the run is only stopped): kept, and
    // counted, so the two entries and it exceed the limit and the older entry goes.
    let busy_key = "ab".repeat(32);
    let busy = leftover(&c.cache, &busy_key, 3 * size);
    let held = hold_lock(&c.cache, &busy_key);
    let max = (4 * size + size / 2).to_string();
    let text = c.run("b2.img", &["-L", "b", "--cache-max-size", &max]);
    assert!(text.contains("cache hit"), "{text}");
    assert!(
        busy.exists(),
        "a temporary file whose lock is held was removed"
    );
    assert_eq!(entries(&c.cache).len(), 1, "the leftover is not counted");
    assert!(
        c.run("a2.img", &["-L", "a"]).contains("cache miss"),
        "a was evicted"
    );

    // Its lock free: removed by the next run, with or without a size limit.
    drop(held);
    let dead = leftover(&c.cache, &"cd".repeat(32), 4096);
    c.run("b3.img", &["-L", "b"]);
    assert!(
        !busy.exists() && !dead.exists(),
        "leftovers of dead runs stay"
    );
    assert!(
        !c.cache.join(format!("{busy_key}.lock")).exists(),
        "the lock of a key without an image stays"
    );
    // Files that are not the cache's are never removed.
    let other = c.cache.join("mine.img");
    fs::write(&other, b"not an entry").unwrap();
    c.run("b4.img", &["-L", "b", "--cache-max-size", "1"]);
    assert!(other.exists());
}

#[test]
fn eviction_skips_entries_in_use() {
    let c = cache_case();
    c.run("a.img", &["-L", "a"]);
    let a = only_key(&c.cache);
    std::thread::sleep(Duration::from_millis(30));
    c.run("b.img", &["-L", "b"]);
    // a is the least recently used, but being served (or built) by another run.
    let held = hold_lock(&c.cache, &a);
    c.run("c.img", &["-L", "c", "--cache-max-size", "1"]);
    assert!(
        c.cache.join(format!("{a}.img")).exists(),
        "an entry in use was evicted"
    );
    assert_eq!(entries(&c.cache).len(), 2, "b was evicted, c kept");
    drop(held);
    c.run("c2.img", &["-L", "c", "--cache-max-size", "1"]);
    assert_eq!(entries(&c.cache).len(), 1);
    fsck(&c.out("a.img"));
}
