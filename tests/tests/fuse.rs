//! End-to-end tests: real nixstorefs mounts of a generated sample store.
//!
//! Each test builds its own sample under /tmp and mounts it through the harness guard, so
//! tests can run in parallel and a failing one leaves no mount behind. They need root,
//! /dev/fuse and a built `nixstorefs` binary (`cargo build -p nixstorefs-daemon`), and fail, not
//! skip, without them.

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use nixstorefs_tests::compare::{compare_content, root_names, sorted_names, TreeCheck};
use nixstorefs_tests::harness::{self, Mount};
use nixstorefs_tests::sample::{self, PseudoRandom, SampleOptions, SampleStore};
use rustix::fs::{Mode, OFlags, ResolveFlags};
use rustix::process::Signal;

const EROFS: i32 = libc::EROFS;
const ENOENT: i32 = libc::ENOENT;

fn mount(s: &SampleStore, extra: &[&str]) -> Mount {
    Mount::foreground(&s.store_dir, &s.closure_file, extra)
}

/// The root lists the closure exactly and every closure path matches the host.
fn assert_same_tree(s: &SampleStore, mnt: &Path) {
    assert_eq!(root_names(mnt), s.closure, "root listing");
    let mut check = TreeCheck::new();
    for base in &s.closure {
        check.walk(&s.host(base), &mnt.join(base));
    }
    check.assert_clean("tree");
}

fn errno(r: io::Result<impl Sized>) -> Option<i32> {
    match r {
        Ok(_) => None,
        Err(e) => Some(e.raw_os_error().unwrap_or(-1)),
    }
}

fn drop_caches() {
    fs::write("/proc/sys/vm/drop_caches", b"3").expect("write /proc/sys/vm/drop_caches");
}

#[test]
fn root_lists_exactly_the_closure() {
    let (_d, s) = sample::temp(&SampleOptions::small());
    let m = mount(&s, &[]);
    let names = root_names(m.mountpoint());
    assert_eq!(names, s.closure);
    for n in &s.noise {
        assert!(!names.contains(n), "{n} listed");
    }
    let root = fs::symlink_metadata(m.mountpoint()).unwrap();
    assert!(root.is_dir());
}

/// The mount's daemon serves from inside its sandbox: no new privileges, a seccomp filter,
/// no capability but CAP_SYS_ADMIN (which passthrough needs), and no way back.
#[test]
fn the_mount_daemon_is_sandboxed() {
    let (_d, s) = sample::temp(&SampleOptions::small());
    let m = mount(&s, &[]);
    assert_same_tree(&s, m.mountpoint());
    let pid = m.pid().expect("a foreground daemon");
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_owned())
            .unwrap_or_default()
    };
    assert_eq!(field("NoNewPrivs:"), "1");
    assert_eq!(field("Seccomp:"), "2");
    let cap_eff = u64::from_str_radix(&field("CapEff:"), 16).unwrap();
    assert_eq!(
        cap_eff & !(1 << 21),
        0,
        "capabilities beyond CAP_SYS_ADMIN: {cap_eff:x}"
    );
    let limit = fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let open_files = limit
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("a descriptor limit");
    let hard: u64 = open_files
        .split_whitespace()
        .nth(4)
        .unwrap()
        .parse()
        .unwrap();
    assert!(hard < 4096, "descriptor limit not lowered: {open_files}");
    // Still serves, and unmounts cleanly through its unmounter on SIGTERM.
    drop(m);
}

#[test]
fn noise_and_other_names_are_enoent() {
    let (_d, s) = sample::temp(&SampleOptions::small());
    let m = mount(&s, &[]);
    let mnt = m.mountpoint();
    let hello = s.path_named("hello-2.12").to_string();
    let mut names: Vec<PathBuf> = s.noise.iter().map(PathBuf::from).collect();
    names.extend(
        [
            "nonexistent".to_string(),
            hello[..32].to_string(),
            format!("{}-", &hello[..32]),
            hello[..20].to_string(),
            sample::base_name("never-built-1.0"),
            format!("{hello}.drv"),
            format!("{hello}~"),
            format!("{hello} "),
            hello.to_uppercase(),
            ".links/".to_string(),
            "...".to_string(),
        ]
        .map(PathBuf::from),
    );
    names.push(s.secret.clone());
    names.push(s.links_entry.clone());
    // `..` is resolved by the kernel inside the mount, back to the root.
    names.push(Path::new(&hello).join("..").join(&s.secret));
    let mut problems = Vec::new();
    for n in &names {
        let p = mnt.join(n);
        match fs::symlink_metadata(&p) {
            Ok(md) => problems.push(format!("{p:?} exists ({:?})", md.file_type())),
            Err(e) if e.raw_os_error() == Some(ENOENT) => {}
            Err(e) => problems.push(format!("{p:?}: {e}, expected ENOENT")),
        }
        // A direct open must not find it either (no lookup shortcuts).
        if let Ok(f) = File::open(&p) {
            problems.push(format!("{p:?} opens ({:?})", f.metadata().map(|m| m.len())));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn tree_matches_host() {
    let (_d, s) = sample::temp(&SampleOptions::default());
    let m = mount(&s, &[]);
    assert_same_tree(&s, m.mountpoint());
}

#[test]
fn hard_links_share_an_inode() {
    let (_d, s) = sample::temp(&SampleOptions::small());
    let m = mount(&s, &[]);
    let mnt = m.mountpoint();
    let a = fs::symlink_metadata(mnt.join(&s.hard_links[0])).unwrap();
    let b = fs::symlink_metadata(mnt.join(&s.hard_links[1])).unwrap();
    assert_eq!(a.ino(), b.ino(), "hard links across store paths");
    assert_eq!(
        a.nlink(),
        3,
        "nlink as on the host (two store paths and .links)"
    );
    assert_eq!(b.nlink(), 3);
    let other = fs::symlink_metadata(mnt.join(&s.small_files[0])).unwrap();
    assert_ne!(a.ino(), other.ino());
    compare_content(&s.host(&s.hard_links[0]), &mnt.join(&s.hard_links[1])).unwrap();
    // Same answer after the kernel forgot both.
    drop_caches();
    let b2 = fs::symlink_metadata(mnt.join(&s.hard_links[1])).unwrap();
    let a2 = fs::symlink_metadata(mnt.join(&s.hard_links[0])).unwrap();
    assert_eq!(a2.ino(), b2.ino(), "after drop_caches");
}

#[test]
fn single_file_and_symlink_store_paths() {
    let (_d, s) = sample::temp(&SampleOptions::small());
    let m = mount(&s, &[]);
    let mnt = m.mountpoint();

    let f = fs::symlink_metadata(mnt.join(&s.single_file)).unwrap();
    let hf = fs::symlink_metadata(s.host(&s.single_file)).unwrap();
    assert!(f.is_file(), "{:?}", f.file_type());
    assert_eq!(f.mode() & 0o7777, 0o444);
    assert_eq!(f.len(), hf.len());
    assert_eq!(f.mtime(), 1);
    compare_content(&s.host(&s.single_file), &mnt.join(&s.single_file)).unwrap();

    let l = fs::symlink_metadata(mnt.join(&s.symlink_path)).unwrap();
    assert!(l.file_type().is_symlink(), "{:?}", l.file_type());
    assert_eq!(l.mtime(), 1);
    let target = fs::read_link(mnt.join(&s.symlink_path)).unwrap();
    assert_eq!(target, fs::read_link(s.host(&s.symlink_path)).unwrap());
    assert_eq!(target, s.store_dir.join(s.path_named("hello-2.12")));
    assert_eq!(l.len(), target.as_os_str().len() as u64);
}

/// Every modification reaches the daemon and is refused there with EROFS. The mount is
/// read-only, so the kernel would refuse them all itself before asking the daemon: it is
/// remounted read-write first, as the guest test over virtio-fs does, so what is checked
/// is the daemon's answer.
#[test]
fn modifications_fail_with_erofs() {
    let (_d, s) = sample::temp(&SampleOptions::small());
    let m = mount(&s, &["-vv"]);
    let mnt = m.mountpoint();
    rustix::mount::mount_remount(
        mnt,
        rustix::mount::MountFlags::NOSUID | rustix::mount::MountFlags::NODEV,
        "",
    )
    .expect("remount the FUSE mount read-write");
    let info = m.info().unwrap();
    assert!(
        info.mount_options.iter().any(|o| o == "rw"),
        "not remounted read-write: {info:?}"
    );
    let file = mnt.join(&s.small_files[3]);
    let dir = file.parent().unwrap().to_path_buf();
    let hello = mnt.join(s.path_named("hello-2.12"));
    let empty_dir = mnt.join(&s.odd_dir).join("empty-dir");
    let cpath = |p: &Path| CString::new(p.as_os_str().as_bytes()).unwrap();

    type Op<'a> = (&'a str, Box<dyn Fn() -> io::Result<()> + 'a>);
    let ops: Vec<Op> = vec![
        (
            "open O_WRONLY",
            Box::new(|| OpenOptions::new().write(true).open(&file).map(drop)),
        ),
        (
            "open O_RDWR",
            Box::new(|| {
                OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&file)
                    .map(drop)
            }),
        ),
        (
            "open O_APPEND",
            Box::new(|| OpenOptions::new().append(true).open(&file).map(drop)),
        ),
        (
            "open O_TRUNC",
            Box::new(|| {
                OpenOptions::new()
                    .write(true)
                    .truncate(true)
                    .open(&file)
                    .map(drop)
            }),
        ),
        (
            "create in a store path",
            Box::new(|| {
                OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(dir.join("new"))
                    .map(drop)
            }),
        ),
        (
            "create at the root",
            Box::new(|| {
                OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(mnt.join("new"))
                    .map(drop)
            }),
        ),
        (
            "mkdir in a store path",
            Box::new(|| fs::create_dir(hello.join("newdir"))),
        ),
        (
            "mkdir at the root",
            Box::new(|| fs::create_dir(mnt.join("newdir"))),
        ),
        ("unlink", Box::new(|| fs::remove_file(&file))),
        (
            "unlink a store path",
            Box::new(|| fs::remove_file(mnt.join(&s.single_file))),
        ),
        ("rmdir", Box::new(|| fs::remove_dir(&empty_dir))),
        (
            "rename",
            Box::new(|| fs::rename(&file, dir.join("renamed"))),
        ),
        (
            "rename a store path",
            Box::new(|| fs::rename(&hello, mnt.join("renamed"))),
        ),
        (
            "chmod",
            Box::new(|| fs::set_permissions(&file, fs::Permissions::from_mode(0o644))),
        ),
        (
            "chmod the root",
            Box::new(|| fs::set_permissions(mnt, fs::Permissions::from_mode(0o755))),
        ),
        (
            "chown",
            Box::new(|| std::os::unix::fs::lchown(&file, Some(1), Some(1))),
        ),
        (
            "symlink",
            Box::new(|| std::os::unix::fs::symlink("x", dir.join("newlink"))),
        ),
        (
            "link",
            Box::new(|| fs::hard_link(&file, dir.join("newhardlink"))),
        ),
        (
            "truncate",
            Box::new(|| {
                let c = cpath(&file);
                // SAFETY: c is a valid NUL-terminated path.
                if unsafe { libc::truncate(c.as_ptr(), 0) } == 0 {
                    Ok(())
                } else {
                    Err(io::Error::last_os_error())
                }
            }),
        ),
        (
            "utimensat",
            Box::new(|| {
                let t = rustix::fs::Timespec {
                    tv_sec: 2,
                    tv_nsec: 0,
                };
                let ts = rustix::fs::Timestamps {
                    last_access: t,
                    last_modification: t,
                };
                rustix::fs::utimensat(rustix::fs::CWD, &file, &ts, rustix::fs::AtFlags::empty())
                    .map_err(io::Error::from)
            }),
        ),
        (
            "setxattr",
            Box::new(|| {
                rustix::fs::setxattr(&file, "user.test", b"x", rustix::fs::XattrFlags::empty())
                    .map_err(io::Error::from)
            }),
        ),
        (
            "mkfifo",
            Box::new(|| {
                rustix::fs::mknodat(
                    rustix::fs::CWD,
                    dir.join("fifo"),
                    rustix::fs::FileType::Fifo,
                    Mode::from_raw_mode(0o644),
                    0,
                )
                .map_err(io::Error::from)
            }),
        ),
    ];
    let mut problems = Vec::new();
    for (name, op) in &ops {
        match errno(op()) {
            Some(EROFS) => {}
            None => problems.push(format!("{name}: succeeded")),
            Some(e) => problems.push(format!(
                "{name}: {}, expected EROFS",
                io::Error::from_raw_os_error(e)
            )),
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    // The daemon was asked, each kind of request: its debug log names them.
    let log = m.stderr();
    let asked = |kind: &str| {
        log.lines().any(|l| {
            (l.contains("fuser::request") || l.contains("ring request"))
                && l.contains(&format!(" {kind} "))
        })
    };
    let unasked: Vec<&str> = [
        "OPEN", "CREATE", "MKDIR", "UNLINK", "RMDIR", "RENAME", "SETATTR", "SYMLINK", "LINK",
        "SETXATTR", "MKNOD",
    ]
    .into_iter()
    .filter(|k| !asked(k))
    .collect();
    assert!(
        unasked.is_empty(),
        "never reached the daemon: {unasked:?}; log:\n{log}"
    );
    // Nothing leaked through to the host either.
    let after = fs::symlink_metadata(s.host(&s.small_files[3])).unwrap();
    assert_eq!((after.mode() & 0o7777, after.mtime()), (0o444, 1));
    assert!(!s.host(&s.small_files[3]).with_file_name("new").exists());
}

#[test]
fn concurrent_readers_agree() {
    let (_d, s) = sample::temp(&SampleOptions::default());
    let m = mount(&s, &[]);
    let mut files = vec![s.big_file.clone(), s.hard_links[1].clone()];
    files.extend(s.small_files.iter().cloned());
    let expected: Arc<Vec<(PathBuf, Vec<u8>)>> = Arc::new(
        files
            .iter()
            .map(|f| (m.mountpoint().join(f), fs::read(s.host(f)).unwrap()))
            .collect(),
    );
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let expected = expected.clone();
            std::thread::spawn(move || -> Result<(), String> {
                let n = expected.len();
                let mut rng = PseudoRandom::new(&format!("reader-{t}"));
                for i in 0..n {
                    let (path, want) = &expected[(i + t) % n];
                    let got =
                        fs::read(path).map_err(|e| format!("thread {t}: read {path:?}: {e}"))?;
                    if got != *want {
                        return Err(format!(
                            "thread {t}: {path:?}: {} bytes differ from the host's {}",
                            got.len(),
                            want.len()
                        ));
                    }
                    // Random positioned reads too, since sequential ones get readahead.
                    let f =
                        File::open(path).map_err(|e| format!("thread {t}: open {path:?}: {e}"))?;
                    let mut r = [0u8; 8];
                    for _ in 0..16 {
                        rng.fill(&mut r);
                        let v = u64::from_le_bytes(r);
                        let off = (v % (want.len() as u64 + 1)) as usize;
                        let len = ((v >> 40) % (256 * 1024)) as usize;
                        let mut buf = vec![0u8; len];
                        let got = f
                            .read_at(&mut buf, off as u64)
                            .map_err(|e| format!("thread {t}: pread {path:?}@{off}: {e}"))?;
                        let end = (off + len).min(want.len());
                        if buf[..got] != want[off..end] {
                            return Err(format!(
                                "thread {t}: pread {path:?}@{off}+{len}: wrong bytes"
                            ));
                        }
                    }
                }
                Ok(())
            })
        })
        .collect();
    let errors: Vec<String> = threads
        .into_iter()
        .filter_map(|t| t.join().expect("reader thread panicked").err())
        .collect();
    assert!(errors.is_empty(), "{}", errors.join("\n"));
}

#[test]
fn allow_missing_mounts_without_the_missing_paths() {
    let (_d, s) = sample::temp(&SampleOptions::small());
    let missing = [
        sample::base_name("missing-1.0"),
        sample::base_name("gone-2.0"),
    ];
    let path = s.dir.join("with-missing.txt");
    let mut text = s.store_paths_text();
    for m in &missing {
        text.push_str(&format!("{}/{m}\n", s.store_dir.display()));
    }
    fs::write(&path, text).unwrap();
    let m = Mount::foreground(&s.store_dir, &path, &["--allow-missing"]);
    assert_same_tree(&s, m.mountpoint());
    for n in &missing {
        assert_eq!(
            errno(fs::symlink_metadata(m.mountpoint().join(n))),
            Some(ENOENT)
        );
    }
    let log = m.stderr();
    assert!(
        log.contains("missing-1.0"),
        "no warning naming the missing path:\n{log}"
    );
}

#[test]
fn stdin_closure_mounts_the_same_tree() {
    let (_d, s) = sample::temp(&SampleOptions::small());
    let m = Mount::builder(&s.store_dir, "-")
        .stdin(s.store_paths_text())
        .start();
    assert_same_tree(&s, m.mountpoint());
}

#[test]
fn closure_info_directory_mounts_the_same_tree() {
    let (_d, s) = sample::temp(&SampleOptions::small());
    let ci = s.dir.join("closure-info");
    s.write_closure_info(&ci).unwrap();
    let m = Mount::foreground(&s.store_dir, &ci, &[]);
    assert_same_tree(&s, m.mountpoint());
}

#[test]
fn registration_mounts_the_same_tree() {
    let (_d, s) = sample::temp(&SampleOptions::small());
    let reg = s.dir.join("registration");
    s.write_registration(&reg, false).unwrap();
    let m = Mount::foreground(&s.store_dir, &reg, &[]);
    assert_same_tree(&s, m.mountpoint());
}

#[test]
fn registration_with_sha256_prefix_mounts_the_same_tree() {
    let (_d, s) = sample::temp(&SampleOptions::small());
    let reg = s.dir.join("registration");
    s.write_registration(&reg, true).unwrap();
    let m = Mount::builder(&s.store_dir, "-")
        .stdin(fs::read(&reg).unwrap())
        .start();
    assert_same_tree(&s, m.mountpoint());
}

#[test]
fn sigterm_unmounts_and_exits_0() {
    let (_d, s) = sample::temp(&SampleOptions::small());
    let mut m = mount(&s, &[]);
    fs::read(m.mountpoint().join(&s.small_files[0])).unwrap();
    let status = m.signal_and_wait(Signal::TERM);
    assert_eq!(status.code(), Some(0), "stderr:\n{}", m.stderr());
    assert!(!m.is_mounted(), "still mounted after SIGTERM");
}

#[test]
fn sigint_unmounts_and_exits_0() {
    let (_d, s) = sample::temp(&SampleOptions::small());
    let mut m = mount(&s, &[]);
    let status = m.signal_and_wait(Signal::INT);
    assert_eq!(status.code(), Some(0), "stderr:\n{}", m.stderr());
    assert!(!m.is_mounted(), "still mounted after SIGINT");
}

#[test]
fn daemon_mode_detaches_and_fusermount_ends_it() {
    let (_d, s) = sample::temp(&SampleOptions::small());
    let m = Mount::daemon(&s.store_dir, &s.closure_file, &[]);
    assert!(m.is_mounted());
    let pids = m.daemon_pids();
    assert!(!pids.is_empty(), "no detached daemon process found");
    assert!(pids.iter().all(|&p| harness::process_alive(p)));
    assert_eq!(root_names(m.mountpoint()), s.closure);
    compare_content(
        &s.host(&s.small_files[2]),
        &m.mountpoint().join(&s.small_files[2]),
    )
    .unwrap();

    let out = harness::run(
        Command::new("fusermount3").arg("-u").arg(m.mountpoint()),
        Duration::from_secs(20),
    );
    assert!(out.status.success(), "fusermount3 -u: {out:?}");
    assert!(!m.is_mounted(), "still mounted after fusermount3 -u");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while pids.iter().any(|&p| harness::process_alive(p)) {
        assert!(
            std::time::Instant::now() < deadline,
            "the daemon outlived its mount by 10 s; log:\n{}",
            m.stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether a mount serves reads through FUSE passthrough.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Passthrough {
    On,
    Off,
}

/// Reads the big file through a mount, whole and through mmap, and checks both against the
/// host; then checks, from the daemon's debug log, that the reads took the path asked for:
/// with passthrough not one READ reached the daemon, without it they all did.
fn check_big_file(passthrough: Passthrough) {
    let (_d, s) = sample::temp(&SampleOptions::default());
    let args: &[&str] = match passthrough {
        Passthrough::On => &["-vv"],
        Passthrough::Off => &["-vv", "--no-passthrough"],
    };
    let m = mount(&s, args);
    let path = m.mountpoint().join(&s.big_file);
    compare_content(&s.host(&s.big_file), &path).unwrap();
    // The same through mmap, which passthrough serves differently from read(2).
    let want = fs::read(s.host(&s.big_file)).unwrap();
    let f = File::open(&path).unwrap();
    let len = want.len();
    // SAFETY: a fresh private read-only mapping of a file we keep open; unmapped below.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_PRIVATE,
            f.as_raw_fd(),
            0,
        )
    };
    assert_ne!(
        ptr,
        libc::MAP_FAILED,
        "mmap: {}",
        io::Error::last_os_error()
    );
    // SAFETY: the mapping is `len` readable bytes and lives until munmap.
    let mapped = unsafe { std::slice::from_raw_parts(ptr as *const u8, len) };
    let same = mapped == want.as_slice();
    // SAFETY: ptr/len are the mapping made above.
    unsafe { libc::munmap(ptr, len) };
    assert!(same, "mmap of {path:?} differs from the host");
    let log = m.stderr();
    assert!(
        log.contains("OPEN"),
        "the log shows requests at -vv:\n{log}"
    );
    let reads = log.lines().filter(|l| l.contains(" READ ")).count();
    match passthrough {
        Passthrough::On => assert_eq!(
            reads, 0,
            "passthrough was not used: {reads} READ requests reached the daemon"
        ),
        Passthrough::Off => assert!(reads > 0, "no READ reached the daemon without passthrough"),
    }
}

#[test]
fn big_file_reads_right_with_passthrough() {
    check_big_file(Passthrough::On);
}

#[test]
fn big_file_reads_right_without_passthrough() {
    check_big_file(Passthrough::Off);
}

#[test]
fn default_mount_is_ro_nosuid_nodev() {
    let (_d, s) = sample::temp(&SampleOptions::small());
    let m = mount(&s, &[]);
    let info = m.info().unwrap();
    assert!(info.fstype.starts_with("fuse"), "{info:?}");
    for opt in ["ro", "nosuid", "nodev"] {
        assert!(
            info.mount_options.iter().any(|o| o == opt),
            "{opt} missing: {info:?}"
        );
    }
}

#[test]
fn fsname_option_sets_the_source() {
    let (_d, s) = sample::temp(&SampleOptions::small());
    let m = mount(&s, &["-o", "fsname=sample-closure"]);
    let info = m.info().unwrap();
    assert_eq!(info.source, "sample-closure", "{info:?}");
    assert!(info.mount_options.iter().any(|o| o == "ro"), "{info:?}");
}

/// Checks that `rel` through the mount shows nothing of /etc: no `passwd` entry, and no
/// way to read /etc/passwd without following a symlink.
fn assert_no_etc(mnt: &Path, rel: &Path, etc_passwd: &[u8], problems: &mut Vec<String>) {
    let p = mnt.join(rel);
    let root = File::open(mnt).unwrap();
    match fs::symlink_metadata(&p) {
        Ok(md) if md.file_type().is_symlink() => match fs::read_link(&p) {
            Ok(t) if t == Path::new("/etc") => {}
            other => problems.push(format!(
                "{p:?}: symlink to {other:?}, expected /etc verbatim"
            )),
        },
        Ok(md) if md.is_dir() => {
            if let Ok(names) = sorted_names(&p) {
                if names.iter().any(|n| n == "passwd") {
                    problems.push(format!(
                        "{p:?} lists passwd: /etc leaks through ({names:?})"
                    ));
                }
            }
        }
        Ok(md) => problems.push(format!("{p:?}: unexpected type {:?}", md.file_type())),
        Err(_) => {}
    }
    // Resolution inside the mount without symlinks: any content must not be /etc's.
    let passwd = rel.join("passwd");
    let how = ResolveFlags::NO_SYMLINKS | ResolveFlags::BENEATH | ResolveFlags::NO_XDEV;
    if let Ok(fd) = rustix::fs::openat2(&root, &passwd, OFlags::RDONLY, Mode::empty(), how) {
        let mut v = Vec::new();
        let _ = File::from(fd).read_to_end(&mut v);
        if v == etc_passwd || v.starts_with(b"root:") {
            problems.push(format!("{:?} reads as /etc/passwd", mnt.join(&passwd)));
        } else {
            problems.push(format!(
                "{:?} exists ({} bytes)",
                mnt.join(&passwd),
                v.len()
            ));
        }
    }
}

#[test]
fn host_swapping_a_directory_for_a_symlink_does_not_leak() {
    let (_d, s) = sample::temp(&SampleOptions::small());
    let etc_passwd = fs::read("/etc/passwd").expect("this test needs a host /etc/passwd");
    let m = mount(&s, &[]);
    let mnt = m.mountpoint();
    let [seen, unseen] = [&s.replaceable_dirs[0], &s.replaceable_dirs[1]];
    let file = &s.small_files[3];

    // Let the kernel and the daemon know `seen` and `file` before the host changes.
    assert!(fs::symlink_metadata(mnt.join(seen)).unwrap().is_dir());
    assert!(!sorted_names(&mnt.join(seen)).unwrap().is_empty());
    assert!(fs::symlink_metadata(mnt.join(file)).unwrap().is_file());

    for rel in [seen, unseen] {
        let host = s.host(rel);
        fs::rename(&host, host.with_extension("moved")).unwrap();
        std::os::unix::fs::symlink("/etc", &host).unwrap();
    }
    let host_file = s.host(file);
    fs::rename(&host_file, host_file.with_extension("moved")).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", &host_file).unwrap();

    let mut problems = Vec::new();
    for round in ["cached", "after drop_caches"] {
        if round != "cached" {
            drop_caches();
        }
        for rel in [seen, unseen] {
            let before = problems.len();
            assert_no_etc(mnt, rel, &etc_passwd, &mut problems);
            for p in &mut problems[before..] {
                *p = format!("{round}: {p}");
            }
        }
        // The file's cached attributes say "regular file": opening it must not follow the
        // host's new symlink.
        let p = mnt.join(file);
        if let Ok(f) = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&p)
        {
            let mut v = Vec::new();
            let _ = (&f).read_to_end(&mut v);
            if v == etc_passwd {
                problems.push(format!("{round}: {p:?} reads as /etc/passwd"));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    // Errors above are fine, but only if the rest of the mount still works.
    compare_content(&s.host(&s.small_files[2]), &mnt.join(&s.small_files[2])).unwrap();
    assert_eq!(root_names(mnt), s.closure);
}

#[test]
fn watchdog_tears_down_an_overdue_mount() {
    let (_d, s) = sample::temp(&SampleOptions::small());
    let m = Mount::builder(&s.store_dir, &s.closure_file)
        .deadline(Duration::from_secs(2))
        .start();
    let pid = m.pid().unwrap();
    assert!(m.is_mounted());
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while m.is_mounted() || harness::process_alive(pid) {
        assert!(
            std::time::Instant::now() < deadline,
            "the watchdog did not unmount and kill the daemon"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn watchdog_rescues_a_request_stuck_on_a_stopped_daemon() {
    let (_d, s) = sample::temp(&SampleOptions::small());
    let m = Mount::builder(&s.store_dir, &s.closure_file)
        .deadline(Duration::from_secs(3))
        .start();
    let pid = rustix::process::Pid::from_raw(m.pid().unwrap()).unwrap();
    rustix::process::kill_process(pid, Signal::STOP).unwrap();
    // Nothing has looked this up yet, so it must reach the (stopped) daemon and block.
    let r = fs::symlink_metadata(m.mountpoint().join(&s.deep_file));
    assert!(r.is_err(), "a stopped daemon answered: {r:?}");
    // The abort unblocks us before the watchdog has finished unmounting.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while m.is_mounted() {
        assert!(
            std::time::Instant::now() < deadline,
            "the watchdog left the mount"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[repr(C)]
struct FileHandle {
    handle_bytes: u32,
    handle_type: i32,
    f_handle: [u8; 128],
}

fn name_to_handle(path: &Path) -> io::Result<FileHandle> {
    let c = CString::new(path.as_os_str().as_bytes()).unwrap();
    let mut h = FileHandle {
        handle_bytes: 128,
        handle_type: 0,
        f_handle: [0; 128],
    };
    let mut mount_id = 0;
    // SAFETY: FileHandle has libc::file_handle's layout with 128 bytes of room, as
    // handle_bytes says; c is NUL-terminated.
    let r = unsafe {
        libc::name_to_handle_at(
            libc::AT_FDCWD,
            c.as_ptr(),
            &mut h as *mut FileHandle as *mut libc::file_handle,
            &mut mount_id,
            0,
        )
    };
    if r == 0 {
        Ok(h)
    } else {
        Err(io::Error::last_os_error())
    }
}

fn open_by_handle(mount_fd: &File, h: &mut FileHandle, flags: i32) -> io::Result<File> {
    // SAFETY: h came from name_to_handle_at; the returned fd is ours to own.
    let fd = unsafe {
        libc::open_by_handle_at(
            mount_fd.as_raw_fd(),
            h as *mut FileHandle as *mut libc::file_handle,
            flags,
        )
    };
    if fd < 0 {
        Err(io::Error::last_os_error())
    } else {
        // SAFETY: fd is a fresh descriptor nobody else owns.
        Ok(unsafe { File::from_raw_fd(fd) })
    }
}

#[test]
fn file_handles_survive_dropped_caches() {
    let (_d, s) = sample::temp(&SampleOptions::small());
    let m = mount(&s, &[]);
    let mnt = m.mountpoint();
    let files = [
        s.small_files[2].clone(),
        s.hard_links[1].clone(),
        s.deep_file.clone(),
        // 100 % 97 == 3: a regular file with content (see the sample generator).
        s.wide_dir.join("entry-00100"),
    ];
    let deep_dir = s.deep_file.parent().unwrap().to_path_buf();
    let mut handles: Vec<FileHandle> = files
        .iter()
        .map(|f| {
            name_to_handle(&mnt.join(f)).unwrap_or_else(|e| panic!("name_to_handle_at {f:?}: {e}"))
        })
        .collect();
    let mut dir_handle = name_to_handle(&mnt.join(&deep_dir))
        .unwrap_or_else(|e| panic!("name_to_handle_at {deep_dir:?}: {e}"));
    drop_caches();

    let mount_fd = File::open(mnt).unwrap();
    for (f, h) in files.iter().zip(&mut handles) {
        let mut got = Vec::new();
        open_by_handle(&mount_fd, h, libc::O_RDONLY)
            .and_then(|mut fd| fd.read_to_end(&mut got))
            .unwrap_or_else(|e| panic!("open_by_handle_at {f:?} after drop_caches: {e}"));
        assert_eq!(got, fs::read(s.host(f)).unwrap(), "{f:?} via its handle");
    }
    // A directory handle must also lead back into the tree below it.
    let dir = open_by_handle(
        &mount_fd,
        &mut dir_handle,
        libc::O_RDONLY | libc::O_DIRECTORY,
    )
    .unwrap_or_else(|e| panic!("open_by_handle_at {deep_dir:?}: {e}"));
    let fd = rustix::fs::openat(&dir, "bottom.txt", OFlags::RDONLY, Mode::empty())
        .expect("openat below a directory opened by handle");
    let mut got = Vec::new();
    File::from(fd).read_to_end(&mut got).unwrap();
    assert_eq!(got, fs::read(s.host(&s.deep_file)).unwrap());
    let mut got_write = open_by_handle(&mount_fd, &mut handles[0], libc::O_WRONLY);
    if let Ok(f) = &mut got_write {
        let _ = f.write_all(b"x");
    }
    assert_eq!(
        errno(got_write),
        Some(EROFS),
        "open_by_handle_at for writing"
    );
}

#[test]
fn foreground_daemon_tells_systemd_it_is_ready() {
    let (d, s) = sample::temp(&SampleOptions::small());
    let socket_path = d.path().join("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let m = Mount::builder(&s.store_dir, &s.closure_file)
        .env("NOTIFY_SOCKET", &socket_path)
        .start();
    let mut buf = [0u8; 256];
    let n = socket.recv(&mut buf).expect("a notification within 20 s");
    assert_eq!(&buf[..n], b"READY=1");
    // Sent once the mount is live, not before.
    assert!(m.is_mounted());
}

/// With passthrough the kernel reads the host file itself: no READ reaches the daemon.
/// Without, every read does. The daemon's debug log shows the requests it gets.
#[test]
fn passthrough_keeps_reads_away_from_the_daemon() {
    let (_d, s) = sample::temp(&SampleOptions::small());
    for (args, reads_expected) in [
        (&["-vv"][..], false),
        (&["-vv", "--no-passthrough"][..], true),
    ] {
        let m = mount(&s, args);
        compare_content(&s.host(&s.big_file), &m.mountpoint().join(&s.big_file)).unwrap();
        let log = m.stderr();
        let reads = log.lines().filter(|l| l.contains(" READ ")).count();
        assert_eq!(
            reads > 0,
            reads_expected,
            "{args:?}: {reads} READ requests reached the daemon"
        );
        assert!(log.contains("OPEN"), "the log shows requests at -vv");
    }
}

/// Directory offsets come from a listing taken at opendir, so readers that interleave
/// their readdir calls on one large directory each see every entry exactly once.
#[test]
fn concurrent_directory_readers_see_every_entry_once() {
    let (_d, s) = sample::temp(&SampleOptions::default());
    let m = mount(&s, &[]);
    let dir = m.mountpoint().join(&s.wide_dir);
    let expected = sorted_names(&s.host(&s.wide_dir)).unwrap();
    let results: Vec<Vec<std::ffi::OsString>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..8)
            .map(|_| {
                scope.spawn(|| {
                    let mut names: Vec<_> = fs::read_dir(&dir)
                        .unwrap()
                        .map(|e| e.unwrap().file_name())
                        .collect();
                    names.sort();
                    names
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for names in results {
        assert_eq!(names, expected);
    }
}
