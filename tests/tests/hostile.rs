//! A hostile or changing host store under a live mount: nothing from outside the closure is
//! ever served, and the daemon stays up.
//!
//! Needs root and /dev/fuse, like the other end-to-end tests.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{symlink, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nixstorefs_tests::compare::compare_content;
use nixstorefs_tests::harness::{self, Mount};
use nixstorefs_tests::sample::{self, SampleOptions, SampleStore};

fn drop_caches() {
    fs::write("/proc/sys/vm/drop_caches", "2").expect("drop the kernel's dentry cache");
}

/// Every regular file below `dir` (host side), with its bytes.
fn files_below(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let t = e.file_type().unwrap();
            if t.is_dir() {
                stack.push(e.path());
            } else if t.is_file() {
                out.push((e.path(), fs::read(e.path()).unwrap()));
            }
        }
    }
    out
}

/// The daemon must still answer: a file outside the part under attack reads right.
fn assert_alive(s: &SampleStore, m: &Mount) {
    compare_content(
        &s.host(&s.small_files[0]),
        &m.mountpoint().join(&s.small_files[0]),
    )
    .expect("the daemon still serves other paths");
}

/// Reads `rel` below the mount without following any symlink on the way, so that whatever
/// comes back was served by the daemon. (A symlink the daemon returns is followed by the
/// client in its own namespace: in a guest, the guest's /etc; that is not a leak.)
fn read_beneath(root: &File, rel: &Path) -> io::Result<Vec<u8>> {
    use rustix::fs::{Mode, OFlags, ResolveFlags};
    let fd = rustix::fs::openat2(
        root,
        rel,
        OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS,
    )?;
    let mut bytes = Vec::new();
    File::from(fd).read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// A directory inside a closure path, and a whole closure path, swapped on the host for a
/// symlink to /etc (and back) again and again while readers look through the mount, with
/// the kernel's dentry cache dropped all along so that lookups reach the daemon. Every
/// read must give the original bytes or fail; none may give /etc's.
#[test]
fn swapping_directories_for_symlinks_never_leaks() {
    let (_d, s) = sample::temp(&SampleOptions::small());
    let m = Mount::foreground(&s.store_dir, &s.closure_file, &[]);
    let bash = s.path_named("bash-5.2").to_owned();
    let targets: Vec<PathBuf> = vec![s.replaceable_dirs[0].clone(), PathBuf::from(&bash)];
    let originals: Vec<(PathBuf, Vec<u8>)> = targets
        .iter()
        .flat_map(|t| {
            files_below(&s.host(t))
                .into_iter()
                .map(|(p, b)| (p.strip_prefix(&s.store_dir).unwrap().to_owned(), b))
        })
        .collect();
    assert!(!originals.is_empty());
    let etc_passwd = fs::read("/etc/passwd").unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicUsize::new(0));
    let leaks = Arc::new(AtomicUsize::new(0));
    std::thread::scope(|scope| {
        // The attacker: swap, pause, swap back.
        let attacker = {
            let stop = stop.clone();
            let s = &s;
            let targets = &targets;
            scope.spawn(move || {
                let deadline = Instant::now() + Duration::from_secs(6);
                let mut swaps = 0;
                while Instant::now() < deadline {
                    for t in targets {
                        let host = s.host(t);
                        let aside = host.with_extension("aside");
                        fs::rename(&host, &aside).unwrap();
                        symlink("/etc", &host).unwrap();
                        std::thread::sleep(Duration::from_millis(2));
                        fs::remove_file(&host).unwrap();
                        fs::rename(&aside, &host).unwrap();
                        swaps += 1;
                    }
                }
                stop.store(true, Ordering::SeqCst);
                swaps
            })
        };
        scope.spawn(|| {
            while !stop.load(Ordering::SeqCst) {
                drop_caches();
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        for i in 0..4 {
            let (stop, reads, leaks) = (stop.clone(), reads.clone(), leaks.clone());
            let (originals, m, etc_passwd) = (&originals, &m, &etc_passwd);
            let targets = &targets;
            scope.spawn(move || {
                let root = File::open(m.mountpoint()).unwrap();
                let mut k = i;
                while !stop.load(Ordering::SeqCst) {
                    let (rel, bytes) = &originals[k % originals.len()];
                    k += 1;
                    if let Ok(got) = read_beneath(&root, rel) {
                        reads.fetch_add(1, Ordering::Relaxed);
                        if &got != bytes {
                            leaks.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    // What /etc holds must never appear below the swapped names.
                    for t in targets {
                        let through = t.join("passwd");
                        if read_beneath(&root, &through)
                            .map(|b| &b == etc_passwd)
                            .unwrap_or(false)
                        {
                            leaks.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            });
        }
        let swaps = attacker.join().unwrap();
        assert!(swaps > 20, "only {swaps} swaps happened");
        println!(
            "figures: {swaps} swaps, {} reads served, {} leaked",
            reads.load(Ordering::Relaxed),
            leaks.load(Ordering::Relaxed)
        );
    });
    assert_eq!(
        leaks.load(Ordering::Relaxed),
        0,
        "bytes from outside the closure"
    );
    assert!(
        reads.load(Ordering::Relaxed) > 0,
        "no read succeeded at all"
    );
    drop_caches();
    // Swapped back: everything reads as before.
    for (rel, bytes) in &originals {
        assert_eq!(
            &fs::read(m.mountpoint().join(rel)).unwrap(),
            bytes,
            "{rel:?}"
        );
    }
    assert_alive(&s, &m);
}

/// A FIFO in the host store is the client's own pipe on the mount: opening it blocks only
/// the opener, never the daemon. A device node is never opened (and the mount is nodev).
#[test]
fn fifos_and_devices_do_not_reach_the_host() {
    let (_d, s) = sample::temp(&SampleOptions::small());
    let dir = s.host(&s.replaceable_dirs[1]);
    let fifo = dir.join("fifo");
    let dev = dir.join("null-device");
    rustix::fs::mknodat(
        rustix::fs::CWD,
        &fifo,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o666),
        0,
    )
    .unwrap();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        &dev,
        rustix::fs::FileType::CharacterDevice,
        rustix::fs::Mode::from_raw_mode(0o666),
        rustix::fs::makedev(1, 3),
    )
    .unwrap();
    let m = Mount::foreground(&s.store_dir, &s.closure_file, &[]);
    let mfifo = m.mountpoint().join(&s.replaceable_dirs[1]).join("fifo");
    let mdev = m
        .mountpoint()
        .join(&s.replaceable_dirs[1])
        .join("null-device");
    assert!(fs::symlink_metadata(&mfifo).unwrap().file_type().is_fifo());
    assert!(fs::symlink_metadata(&mdev)
        .unwrap()
        .file_type()
        .is_char_device());

    // A reader blocked on the FIFO (no writer) while the daemon keeps serving.
    let opened = Arc::new(AtomicBool::new(false));
    let reader = {
        let (mfifo, opened) = (mfifo.clone(), opened.clone());
        std::thread::spawn(move || {
            let mut f = File::open(&mfifo).unwrap();
            opened.store(true, Ordering::SeqCst);
            let mut got = Vec::new();
            f.read_to_end(&mut got).unwrap();
            got
        })
    };
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        !opened.load(Ordering::SeqCst),
        "a FIFO open blocks until a writer comes"
    );
    assert_alive(&s, &m);
    // The writer end on the same mount meets the reader: a pipe local to the client.
    fs::write(&mfifo, b"through the pipe").unwrap();
    assert_eq!(reader.join().unwrap(), b"through the pipe");
    // Nothing reached the host's FIFO: opening its reading end would block if it had a
    // writer waiting; with O_NONBLOCK it opens, and reads nothing.
    let mut host_end = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&fifo)
        .unwrap();
    let mut buf = [0u8; 16];
    assert!(matches!(host_end.read(&mut buf), Ok(0) | Err(_)));

    let e = File::open(&mdev).unwrap_err();
    assert!(
        matches!(e.raw_os_error(), Some(libc::EACCES) | Some(libc::EPERM)),
        "opening a device node on a nodev mount: {e}"
    );
    assert_alive(&s, &m);
}

/// Garbage collection on the host while mounted: the removed path answers ENOENT (or
/// EIO), files already open keep their bytes, everything else keeps working.
#[test]
fn a_store_path_removed_on_the_host_fails_alone() {
    let (_d, s) = sample::temp(&SampleOptions::small());
    let m = Mount::foreground(&s.store_dir, &s.closure_file, &[]);
    let bash = s.path_named("bash-5.2").to_owned();
    let file = PathBuf::from(&bash).join("bin/bash");
    let expected = fs::read(s.host(&file)).unwrap();
    // Looked up and opened before the removal.
    let mut open_before = File::open(m.mountpoint().join(&file)).unwrap();
    fs::remove_dir_all(s.host(&bash)).unwrap();
    drop_caches();

    match fs::read(m.mountpoint().join(&file)) {
        Err(e) => assert!(
            matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::EIO)),
            "{e}"
        ),
        Ok(b) => panic!("read {} bytes of a removed store path", b.len()),
    }
    let mut got = Vec::new();
    open_before.read_to_end(&mut got).unwrap();
    assert_eq!(got, expected, "an open file keeps its bytes");
    assert_alive(&s, &m);
    // Once nothing pins its cached entry, the removed name no longer resolves.
    drop(open_before);
    drop_caches();
    let e = fs::symlink_metadata(m.mountpoint().join(&bash)).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOENT), "{e}");
}

/// Files that change size on the host while read: reads end where the host file ends,
/// the daemon stays up.
#[test]
fn files_growing_and_shrinking_under_readers() {
    let (_d, s) = sample::temp(&SampleOptions::small());
    for args in [&[][..], &["--no-passthrough"][..]] {
        let m = Mount::foreground(&s.store_dir, &s.closure_file, args);
        let rel = &s.small_files[3];
        let host = s.host(rel);
        let original = fs::read(&host).unwrap();
        let mut f = File::open(m.mountpoint().join(rel)).unwrap();
        // Shrink to 10 bytes: a read gets at most what the host has now.
        fs::write(&host, &original[..10]).unwrap();
        let mut got = Vec::new();
        let _ = f.read_to_end(&mut got);
        assert!(
            got.len() <= original.len(),
            "{args:?}: read past the old end"
        );
        assert!(original.starts_with(&got[..got.len().min(10)]));
        // Grow it again, larger than before.
        let mut bigger = original.clone();
        bigger.extend_from_slice(&original);
        fs::write(&host, &bigger).unwrap();
        let _ = File::open(m.mountpoint().join(rel)).and_then(|mut f| {
            let mut v = Vec::new();
            f.read_to_end(&mut v).map(|_| v)
        });
        fs::write(&host, &original).unwrap();
        assert_alive(&s, &m);
    }
}

/// A large file truncated on the host while the daemon serves it from a mapping (reads of
/// 128 KiB and more without passthrough): the client gets EIO or the old bytes, never other
/// bytes, and the daemon, which never touches the mapping itself, survives (no SIGBUS).
#[test]
fn large_file_truncated_under_a_mapped_reader() {
    let (_d, s) = sample::temp(&SampleOptions::small());
    let rel = s.small_files[0].with_file_name("large.bin");
    let original: Vec<u8> = (0..8u32 << 20).map(|i| (i * 7 % 251) as u8).collect();
    fs::write(s.host(&rel), &original).unwrap();
    let m = Mount::foreground(&s.store_dir, &s.closure_file, &["-v", "--no-passthrough"]);
    let mut f = File::open(m.mountpoint().join(&rel)).unwrap();
    let mut head = vec![0; 1 << 20];
    let rchar_before = harness::rchar(m.pid()).expect("the daemon's /proc/PID/io");
    f.read_exact(&mut head).unwrap();
    let rchar_after = harness::rchar(m.pid()).unwrap();
    // Over io_uring the daemon reads into the ring's buffer itself (copying from a
    // mapping there could fault); only /dev/fuse replies from the mapping.
    let mapped = !m.stderr().contains("FUSE transport: io_uring");
    assert_eq!(head, original[..1 << 20], "the mapped read serves the file");
    // Served from the mapping, the data never passes through the daemon's own reads.
    assert!(
        !mapped || rchar_after - rchar_before < (1 << 18),
        "the daemon read {} bytes itself for a 1 MiB read",
        rchar_after - rchar_before
    );

    // Truncated in place: the daemon's mapping now extends past the file's end.
    OpenOptions::new()
        .write(true)
        .open(s.host(&rel))
        .unwrap()
        .set_len(4096)
        .unwrap();
    let mut rest = Vec::new();
    let result = f.read_to_end(&mut rest);
    assert!(
        original[1 << 20..].starts_with(&rest),
        "read after truncation returned bytes the file never had"
    );
    if let Err(e) = result {
        assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    }
    assert_alive(&s, &m);
}

/// kill -9: the mount is left dead (ENOTCONN), `fusermount3 -u` clears it, and a new
/// daemon mounts again on the same mountpoint.
#[test]
fn killed_daemon_leaves_a_mount_fusermount_clears() {
    let (_d, s) = sample::temp(&SampleOptions::small());
    let mut m = Mount::foreground(&s.store_dir, &s.closure_file, &[]);
    let mountpoint = m.mountpoint().to_owned();
    m.signal_and_wait(rustix::process::Signal::KILL);
    // ENOTCONN. Over io_uring the dead daemon's rings hold its /dev/fuse open until the
    // kernel has torn them down, which it does after the process is gone: requests made
    // meanwhile are cancelled (ECANCELED), and the connection is aborted a moment later.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let e = loop {
        let e = fs::read_dir(&mountpoint).unwrap_err();
        if e.raw_os_error() != Some(libc::ECANCELED) || std::time::Instant::now() > deadline {
            break e;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    assert_eq!(e.raw_os_error(), Some(libc::ENOTCONN), "{e}");
    let o = std::process::Command::new("fusermount3")
        .arg("-u")
        .arg(&mountpoint)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(!nixstorefs_tests::harness::is_mounted(&mountpoint));
    drop(m);
    let again = Mount::foreground(&s.store_dir, &s.closure_file, &[]);
    assert_alive(&s, &again);
}

/// With a descriptor limit far below what the tree needs, the bounded cache evicts instead
/// of failing: a full walk and read of the tree succeeds.
#[test]
fn few_descriptors_are_enough() {
    let (_d, s) = sample::temp(&SampleOptions::small());
    // The daemon raises its soft limit to the hard one: lower the hard limit for it.
    let m = Mount::builder(&s.store_dir, &s.closure_file)
        .args(["--max-cached-dirs", "8"])
        .limit_descriptors(64)
        .start();
    let mut files = 0;
    let mut stack: Vec<PathBuf> = s.closure.iter().map(PathBuf::from).collect();
    while let Some(rel) = stack.pop() {
        let meta = fs::symlink_metadata(m.mountpoint().join(&rel)).unwrap();
        if meta.is_dir() {
            for e in fs::read_dir(m.mountpoint().join(&rel)).unwrap() {
                stack.push(rel.join(e.unwrap().file_name()));
            }
        } else if meta.is_file() {
            compare_content(&s.host(&rel), &m.mountpoint().join(&rel)).unwrap();
            files += 1;
        }
    }
    assert!(files > 100, "walked {files} files");
    let fds = fs::read_dir(format!("/proc/{}/fd", m.pid().unwrap()))
        .unwrap()
        .count();
    assert!(fds <= 64, "the daemon holds {fds} descriptors");
    println!(
        "figures: {files} files read with a 64-descriptor limit; {fds} descriptors open after"
    );
}

/// 16 threads of mixed lookups, stats, directory reads and reads at random offsets,
/// checked against the host: no error, no mismatch, and the daemon's memory flat across
/// rounds.
#[test]
fn mixed_load_no_errors_no_growth() {
    let (_d, s) = sample::temp(&SampleOptions::small());
    let m = Mount::foreground(&s.store_dir, &s.closure_file, &[]);
    let files: Vec<(PathBuf, Vec<u8>)> = s
        .closure
        .iter()
        .flat_map(|p| {
            let host = s.host(p);
            if host.is_dir() {
                files_below(&host)
            } else {
                vec![]
            }
        })
        .map(|(p, b)| (p.strip_prefix(&s.store_dir).unwrap().to_owned(), b))
        .collect();
    let pid = m.pid().unwrap();
    let rss = || -> u64 {
        let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
            .unwrap()
    };
    let mut rss_after = Vec::new();
    for round in 0..3 {
        let errors = AtomicUsize::new(0);
        let mismatches = AtomicUsize::new(0);
        std::thread::scope(|scope| {
            for t in 0..16u64 {
                let (files, m, errors, mismatches) = (&files, &m, &errors, &mismatches);
                scope.spawn(move || {
                    let mut rng = sample::PseudoRandom::new(&format!("load-{round}-{t}"));
                    for _ in 0..400 {
                        let (rel, bytes) = &files[rng.below(files.len() as u64) as usize];
                        let path = m.mountpoint().join(rel);
                        let ok = match rng.below(4) {
                            0 => {
                                fs::symlink_metadata(&path).map(|md| md.len() == bytes.len() as u64)
                            }
                            1 => fs::read_dir(path.parent().unwrap()).map(|rd| rd.count() > 0),
                            2 => fs::read(&path).map(|b| &b == bytes),
                            _ => {
                                use std::os::unix::fs::FileExt;
                                let off = rng.below(bytes.len() as u64 + 1);
                                let mut buf = vec![0u8; 4096];
                                // A regular file's pread returns all it asked for up to
                                // the end of the file: a short or empty read is wrong,
                                // and only a read at the end may be empty.
                                let want = &bytes[off as usize..];
                                let want = &want[..want.len().min(buf.len())];
                                File::open(&path)
                                    .and_then(|f| f.read_at(&mut buf, off))
                                    .map(|n| buf[..n] == *want)
                            }
                        };
                        match ok {
                            Ok(true) => {}
                            Ok(false) => {
                                mismatches.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(_) => {
                                errors.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                });
            }
        });
        assert_eq!(errors.into_inner(), 0, "round {round}: errors");
        assert_eq!(mismatches.into_inner(), 0, "round {round}: mismatches");
        drop_caches();
        rss_after.push(rss());
    }
    println!(
        "figures: 3 rounds x 16 threads x 400 operations, 0 errors, 0 mismatches, VmRSS after each round {rss_after:?} kB"
    );
    // The first round warms caches and allocators; later rounds must not keep growing.
    assert!(
        rss_after[2] <= rss_after[1] + rss_after[1] / 10 + 1024,
        "resident memory kept growing: {rss_after:?} kB"
    );
}
