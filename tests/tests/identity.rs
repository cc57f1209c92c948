//! Node identity and the view's boundaries under a live mount: distinct host objects are
//! distinct nodes, hard links survive the loss of a name, mounts and moved directories are
//! not served, forgotten nodes are remembered up to a cap, and no host object but a
//! regular file is ever opened.
//!
//! Needs root and /dev/fuse, like the other end-to-end tests.

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nixstorefs_tests::harness::{self, ImageMount, Mount, Mountpoint};
use nixstorefs_tests::sample::{self, SampleOptions};

const TIMEOUT: Duration = Duration::from_secs(60);

fn drop_caches() {
    fs::write("/proc/sys/vm/drop_caches", "2").expect("drop the kernel's dentry cache");
}

/// Runs `mount ARGS`, which must succeed.
fn mount(args: &[&str], target: &Path) {
    let out = harness::run(Command::new("mount").args(args).arg(target), TIMEOUT);
    assert!(
        out.status.success(),
        "mount {args:?} {}: {}",
        target.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A mount made by the test on a directory it does not own; detached on drop.
struct MountGuard(PathBuf);

impl Drop for MountGuard {
    fn drop(&mut self) {
        let _ = rustix::mount::unmount(&self.0, rustix::mount::UnmountFlags::DETACH);
    }
}

/// A store path name with a valid hash.
fn store_name(seed: u8, name: &str) -> String {
    format!("{}-{name}", sample::nix_base32(&[seed; 20]))
}

fn errno_of<T: std::fmt::Debug>(r: io::Result<T>) -> i32 {
    r.expect_err("must fail").raw_os_error().unwrap_or(0)
}

/// An overlayfs with `xino` over two tmpfs layers numbers the layers' objects with their
/// inode number in the low bits and the layer in the top bits, above 2^56. Two files whose
/// numbers differ only there are two nodes through the mount, and mkimage writes each
/// one's own bytes.
#[test]
fn overlay_inode_numbers_above_2_56_stay_distinct() {
    let dir = tempfile::tempdir().unwrap();
    let (l1, l2, store) = (Mountpoint::new(), Mountpoint::new(), Mountpoint::new());
    for l in [&l1, &l2] {
        mount(&["-t", "tmpfs", "-o", "inode32", "tmpfs"], l.path());
    }
    let (a, b) = (store_name(1, "layer-one"), store_name(2, "layer-two"));
    // Created in the same order on two fresh tmpfs: the same inode numbers on each.
    for (layer, name, bytes) in [
        (&l1, &a, b"one".repeat(1000)),
        (&l2, &b, b"two".repeat(700)),
    ] {
        fs::create_dir_all(layer.path().join(name).join("share")).unwrap();
        fs::write(layer.path().join(name).join("share/file"), bytes).unwrap();
    }
    let lower = format!(
        "lowerdir={}:{},xino=on",
        l1.path().display(),
        l2.path().display()
    );
    mount(&["-t", "overlay", "-o", &lower, "overlay"], store.path());
    let (fa, fb) = (
        store.path().join(&a).join("share/file"),
        store.path().join(&b).join("share/file"),
    );
    let (ia, ib) = (
        fs::metadata(&fa).unwrap().ino(),
        fs::metadata(&fb).unwrap().ino(),
    );
    let low = (1u64 << 56) - 1;
    assert!(
        ia >= 1 << 56 && ib >= 1 << 56 && ia != ib && ia & low == ib & low,
        "the overlay gives numbers that differ only above bit 56: {ia:#x} {ib:#x}"
    );
    let closure = dir.path().join("closure.txt");
    fs::write(
        &closure,
        format!(
            "{}\n{}\n",
            store.path().join(&a).display(),
            store.path().join(&b).display()
        ),
    )
    .unwrap();

    for args in [&[][..], &["--no-passthrough"][..]] {
        let m = Mount::foreground(store.path(), &closure, args);
        let (ma, mb) = (
            m.mountpoint().join(&a).join("share/file"),
            m.mountpoint().join(&b).join("share/file"),
        );
        assert_ne!(
            fs::metadata(&ma).unwrap().ino(),
            fs::metadata(&mb).unwrap().ino(),
            "{args:?}: two host files, one node"
        );
        assert_eq!(fs::read(&ma).unwrap(), fs::read(&fa).unwrap(), "{args:?}");
        assert_eq!(fs::read(&mb).unwrap(), fs::read(&fb).unwrap(), "{args:?}");
    }

    let img = dir.path().join("store.img");
    let out = harness::run(
        Command::new(harness::bin("mkimage"))
            .arg("--store-dir")
            .arg(store.path())
            .arg(&closure)
            .arg(&img),
        TIMEOUT,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let image = ImageMount::new(&img);
    assert_eq!(
        fs::read(image.path().join(&a).join("share/file")).unwrap(),
        fs::read(&fa).unwrap()
    );
    assert_eq!(
        fs::read(image.path().join(&b).join("share/file")).unwrap(),
        fs::read(&fb).unwrap()
    );
}

/// A file hard-linked into two store paths (as `nix-store --optimise` makes them) is one
/// node; once the path it was first found in is deleted, it still reads through the other.
#[test]
fn a_hard_linked_file_reads_after_its_first_path_is_removed() {
    let (_d, s) = sample::temp(&SampleOptions::small());
    let m = Mount::foreground(&s.store_dir, &s.closure_file, &[]);
    let [first, second] = &s.hard_links;
    let (mfirst, msecond) = (m.mountpoint().join(first), m.mountpoint().join(second));
    let ino = fs::metadata(&mfirst).unwrap().ino();
    assert_eq!(
        fs::metadata(&msecond).unwrap().ino(),
        ino,
        "hard links share a node"
    );
    let expected = fs::read(s.host(second)).unwrap();
    let first_path = first.components().next().unwrap();
    fs::remove_dir_all(s.host(first_path)).unwrap();
    // Through the kernel's cached node, then found again by name.
    assert_eq!(fs::read(&msecond).unwrap(), expected);
    drop_caches();
    assert_eq!(fs::read(&msecond).unwrap(), expected);
}

/// Something mounted below a closure path (here a read-only bind of a private host
/// directory) is not served: its name is not found. `--cross-mounts` serves it.
#[test]
fn a_mount_below_a_closure_path_is_not_served() {
    let (d, s) = sample::temp(&SampleOptions::small());
    let private = d.path().join("private");
    fs::create_dir(&private).unwrap();
    fs::write(private.join("secret"), b"host only").unwrap();
    let rel = s.small_files[0].parent().unwrap().join("bound");
    fs::create_dir(s.host(&rel)).unwrap();
    mount(&["--bind", private.to_str().unwrap()], &s.host(&rel));
    let _bound = MountGuard(s.host(&rel));
    // Read-only, so that nothing that walks the sample directory can reach into it.
    mount(&["-o", "remount,bind,ro"], &s.host(&rel));

    let m = Mount::foreground(&s.store_dir, &s.closure_file, &[]);
    assert_eq!(
        errno_of(fs::symlink_metadata(m.mountpoint().join(&rel))),
        libc::ENOENT
    );
    assert!(fs::read(m.mountpoint().join(&rel).join("secret")).is_err());
    drop(m);

    let m = Mount::foreground(&s.store_dir, &s.closure_file, &["--cross-mounts"]);
    assert_eq!(
        fs::read(m.mountpoint().join(&rel).join("secret")).unwrap(),
        b"host only"
    );
}

/// A closure path that is itself a mount point is refused at startup (exit 2), unless
/// `--cross-mounts` is given.
#[test]
fn a_closure_path_that_is_a_mount_point_is_refused() {
    let (_d, s) = sample::temp(&SampleOptions::small());
    let path = s.small_files[0].components().next().unwrap();
    let target = s.host(path);
    mount(&["-t", "tmpfs", "-o", "ro", "tmpfs"], &target);
    let _guard = MountGuard(target.clone());
    let mp = Mountpoint::new();
    let out = harness::run(
        Command::new(harness::bin("nixstorefs"))
            .arg("-f")
            .arg("--store-dir")
            .arg(&s.store_dir)
            .arg(&s.closure_file)
            .arg(mp.path()),
        TIMEOUT,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("mount point") && stderr.contains(&*target.to_string_lossy()),
        "{stderr}"
    );
    assert!(!mp.is_mounted());
    let m = Mount::foreground(&s.store_dir, &s.closure_file, &["--cross-mounts"]);
    assert!(fs::symlink_metadata(m.mountpoint().join(path)).is_ok());
}

/// A directory moved out of the store on the host stops being served at once, new files
/// included, whether it is a directory inside a closure path or the closure path itself.
#[test]
fn a_directory_moved_out_of_the_store_stops_being_served() {
    let (d, s) = sample::temp(&SampleOptions::small());
    let m = Mount::foreground(&s.store_dir, &s.closure_file, &[]);

    // A directory inside a closure path, listed (and so held) through the mount first.
    let rel = &s.replaceable_dirs[0];
    assert!(fs::read_dir(m.mountpoint().join(rel)).unwrap().count() > 0);
    let outside = d.path().join("outside");
    fs::rename(s.host(rel), &outside).unwrap();
    fs::write(outside.join("planted"), b"not in the closure").unwrap();
    let e = errno_of(fs::read(m.mountpoint().join(rel).join("planted")));
    assert!(matches!(e, libc::ENOENT | libc::ESTALE), "errno {e}");

    // A whole closure path, with a subdirectory held through the mount.
    let sub = s.deep_file.parent().unwrap();
    let top = sub.components().next().unwrap();
    assert!(fs::read_dir(m.mountpoint().join(sub)).is_ok());
    let outside_top = d.path().join("outside-top");
    fs::rename(s.host(top), &outside_top).unwrap();
    let moved_sub = outside_top.join(sub.strip_prefix(top).unwrap());
    fs::write(moved_sub.join("planted"), b"not in the closure").unwrap();
    let e = errno_of(fs::read(m.mountpoint().join(sub).join("planted")));
    assert!(matches!(e, libc::ENOENT | libc::ESTALE), "errno {e}");
}

/// A closure path replaced on the host by a symlink before it was ever looked up is
/// refused, not served as the symlink.
#[test]
fn a_store_path_replaced_before_its_first_lookup_is_refused() {
    let (d, s) = sample::temp(&SampleOptions::small());
    let m = Mount::foreground(&s.store_dir, &s.closure_file, &[]);
    let path = s.small_files[1].components().next().unwrap();
    fs::rename(s.host(path), d.path().join("away")).unwrap();
    symlink("/etc", s.host(path)).unwrap();
    assert_eq!(
        errno_of(fs::symlink_metadata(m.mountpoint().join(path))),
        libc::ENOENT
    );
}

/// A regular file swapped on the host for a FIFO after the client looked it up: the open
/// through the mount never opens the host's FIFO (a writer blocked on it stays blocked).
#[test]
fn a_file_swapped_for_a_fifo_is_never_opened_on_the_host() {
    let (_d, s) = sample::temp(&SampleOptions::small());
    let rel = &s.small_files[2];
    for args in [&[][..], &["--no-passthrough"][..]] {
        let m = Mount::foreground(&s.store_dir, &s.closure_file, args);
        let mfile = m.mountpoint().join(rel);
        assert!(fs::metadata(&mfile).unwrap().is_file());
        let host = s.host(rel);
        let saved = fs::read(&host).unwrap();
        fs::remove_file(&host).unwrap();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &host,
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o666),
            0,
        )
        .unwrap();
        // A writer on the host's FIFO waits for a reader to open it.
        let released = Arc::new(AtomicBool::new(false));
        let writer = {
            let (host, released) = (host.clone(), released.clone());
            std::thread::spawn(move || {
                let f = OpenOptions::new().write(true).open(&host);
                released.store(true, Ordering::SeqCst);
                drop(f);
            })
        };
        std::thread::sleep(Duration::from_millis(100));
        // Whatever the open through the mount gives (an error, or the client's own pipe),
        // it must not be the host's FIFO.
        let _ = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&mfile);
        std::thread::sleep(Duration::from_millis(300));
        let leaked = released.load(Ordering::SeqCst);
        // Release the writer ourselves, then restore the file.
        let reader = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&host)
            .unwrap();
        writer.join().unwrap();
        drop(reader);
        assert!(!leaked, "{args:?}: the daemon opened the host's FIFO");
        fs::remove_file(&host).unwrap();
        fs::write(&host, saved).unwrap();
    }
}

/// `struct file_handle` with room for any handle the kernel makes.
#[repr(C)]
struct FileHandle {
    handle_bytes: u32,
    handle_type: i32,
    f_handle: [u8; 128],
}

fn name_to_handle(path: &Path) -> FileHandle {
    let c = CString::new(path.as_os_str().as_bytes()).unwrap();
    let mut fh = FileHandle {
        handle_bytes: 128,
        handle_type: 0,
        f_handle: [0; 128],
    };
    let mut mount_id: libc::c_int = 0;
    // SAFETY: valid pointers to a handle buffer of the size it says and an int.
    let r = unsafe {
        libc::syscall(
            libc::SYS_name_to_handle_at,
            libc::AT_FDCWD,
            c.as_ptr(),
            &mut fh as *mut FileHandle,
            &mut mount_id as *mut libc::c_int,
            0,
        )
    };
    assert_eq!(r, 0, "name_to_handle_at: {}", io::Error::last_os_error());
    fh
}

fn open_by_handle(mount: &File, fh: &mut FileHandle) -> io::Result<File> {
    use std::os::fd::{AsRawFd, FromRawFd};
    // SAFETY: a handle filled by name_to_handle_at; the result is a new descriptor.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_open_by_handle_at,
            mount.as_raw_fd(),
            fh as *mut FileHandle,
            libc::O_RDONLY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor to us.
    Ok(unsafe { File::from_raw_fd(fd as i32) })
}

/// File handles (what virtiofsd and NFS hand out) keep working after the kernel forgets
/// the node, as long as the view remembers it; once more nodes than the cap have been
/// forgotten since, the handle gets ESTALE instead of reaching anything else.
#[test]
fn file_handles_outlive_forget_up_to_the_cap() {
    let (_d, s) = sample::temp(&SampleOptions::small());
    let m = Mount::foreground(
        &s.store_dir,
        &s.closure_file,
        &["--max-forgotten-nodes", "32"],
    );
    let rel = &s.small_files[0];
    let expected = fs::read(s.host(rel)).unwrap();
    let mut fh = name_to_handle(&m.mountpoint().join(rel));
    let root = File::open(m.mountpoint()).unwrap();
    drop_caches();
    let mut got = Vec::new();
    open_by_handle(&root, &mut fh)
        .expect("a handle of a forgotten node that the view remembers")
        .read_to_end(&mut got)
        .unwrap();
    assert_eq!(got, expected);

    // Forgotten again, then many other nodes forgotten after it: the handle's node is the
    // oldest forgotten one and falls out of the record.
    drop_caches();
    let wide = m.mountpoint().join(&s.wide_dir);
    for e in fs::read_dir(&wide).unwrap().take(200) {
        let _ = fs::symlink_metadata(e.unwrap().path());
    }
    drop_caches();
    let e = open_by_handle(&root, &mut fh).map(|_| ());
    assert_eq!(errno_of(e), libc::ESTALE);
}

fn vm_rss_kib(pid: i32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/PID/status")
}

/// 120k files created, looked up through the mount, deleted and forgotten: the records
/// the daemon keeps stay within the default cap (65,536), and its memory within 32 MiB
/// more than it started with. The store is on a tmpfs, whose inode numbers are never
/// reused, so every file is a new object.
#[test]
fn node_records_stay_under_their_cap_through_churn() {
    let tmpfs = Mountpoint::new();
    mount(&["-t", "tmpfs", "tmpfs"], tmpfs.path());
    let s = sample::build(tmpfs.path(), &SampleOptions::small()).unwrap();
    let mut m = Mount::foreground(&s.store_dir, &s.closure_file, &["-v"]);
    let pid = m.pid().expect("a foreground daemon");
    let rel = &s.replaceable_dirs[1];
    let (host, through) = (s.host(rel), m.mountpoint().join(rel));
    fs::metadata(&through).unwrap();
    let before = vm_rss_kib(pid);
    // Batches of 10k between cache drops: dropping the kernel's caches is what makes it
    // forget the nodes, and each drop is slow.
    for batch in 0..12 {
        let names: Vec<String> = (0..10_000).map(|i| format!("churn-{batch}-{i}")).collect();
        for n in &names {
            File::create(host.join(n)).unwrap();
            fs::symlink_metadata(through.join(n)).unwrap();
        }
        for n in &names {
            fs::remove_file(host.join(n)).unwrap();
        }
        drop_caches();
    }
    let after = vm_rss_kib(pid);
    let status = m.signal_and_wait(rustix::process::Signal::INT);
    assert_eq!(status.code(), Some(0));
    let log = m.stderr();
    let records: usize = log
        .split("records=")
        .nth(1)
        .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no record count in the log:\n{log}"));
    let live: usize = log
        .split("live=")
        .nth(1)
        .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap();
    eprintln!("records {records}, live {live}, RSS {before} -> {after} KiB");
    // Over io_uring the daemon also has a pinned queue thread per CPU and, per ring entry,
    // a payload buffer whose touched pages stay resident (measured: 28-33 MiB of growth,
    // against 28 over /dev/fuse). The bound still tells a capped daemon from one that is
    // not: 120k records, at about 300 bytes each, would take 36 MiB by themselves.
    let rss_bound_kib = match nixstorefs_tests::harness::forced_transport().as_deref() {
        Some("io-uring") => 40 * 1024,
        _ => 32 * 1024,
    };
    assert!(records <= 65_536 + live, "{records} records, {live} live");
    assert!(records >= 60_000, "the churn reached the daemon: {records}");
    assert!(
        after.saturating_sub(before) < rss_bound_kib,
        "RSS grew from {before} KiB to {after} KiB"
    );
}

/// A file that changed on the host after the client learnt its size fails to open with
/// EIO, the same with passthrough and without, instead of reads clipped or zero-filled to
/// the size the client's kernel believes.
#[test]
fn a_file_changed_before_it_is_opened_fails_alike_in_both_modes() {
    let (_d, s) = sample::temp(&SampleOptions::small());
    for (i, args) in [&[][..], &["--no-passthrough"][..]].iter().enumerate() {
        let m = Mount::foreground(&s.store_dir, &s.closure_file, args);
        let rel = &s.small_files[2 + i];
        let host = s.host(rel);
        let original = fs::read(&host).unwrap();
        assert_eq!(fs::read(m.mountpoint().join(rel)).unwrap(), original);
        let mut grown = original.clone();
        grown.extend_from_slice(b"appended on the host");
        fs::write(&host, &grown).unwrap();
        assert_eq!(
            errno_of(File::open(m.mountpoint().join(rel))),
            libc::EIO,
            "{args:?}"
        );
        // Looked up afresh, the new contents are served whole.
        drop_caches();
        assert_eq!(
            fs::read(m.mountpoint().join(rel)).unwrap(),
            grown,
            "{args:?}"
        );
    }
}
