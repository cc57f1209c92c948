//! End-to-end tests of what the mount promises its users beyond the tree itself: mode bits
//! checked against the caller, no device nodes, extended attributes answered as by a
//! filesystem that has none, closure names as Nix accepts them, bounded options, and a
//! detached daemon that holds no directory.
//!
//! Real mounts of generated sample stores, through the harness guard; they need root,
//! /dev/fuse, erofs-utils and the built binaries.

use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use nixstorefs_tests::compare::{root_names, Expect, Links, TreeCheck};
use nixstorefs_tests::harness::{self, ImageMount, Mount, Mountpoint};
use nixstorefs_tests::sample::{self, SampleOptions, SampleStore};

const TIMEOUT: Duration = Duration::from_secs(60);

/// A user and group that own nothing here (`nobody` on Debian).
const OTHER_UID: u32 = 65534;

/// Adds a store path `base` holding `files` (`(name, contents, mode)`) to the sample's host
/// store and returns a closure list of the sample plus it.
fn add_store_path(s: &SampleStore, base: &str, files: &[(&str, &[u8], u32)]) -> PathBuf {
    let dir = s.store_dir.join(base);
    fs::create_dir(&dir).unwrap();
    for (name, contents, mode) in files {
        let path = dir.join(name);
        fs::write(&path, contents).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(*mode)).unwrap();
    }
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o555)).unwrap();
    let list = s.dir.join(format!("closure-with-{base}.txt"));
    let text = format!("{}{}\n", s.store_paths_text(), dir.display());
    fs::write(&list, text).unwrap();
    list
}

/// `cat path` as [`OTHER_UID`], with no supplementary groups.
fn cat_as_other(path: &Path) -> Output {
    harness::run(
        Command::new("cat")
            .arg(path)
            .uid(OTHER_UID)
            .gid(OTHER_UID)
            .stdin(Stdio::null()),
        TIMEOUT,
    )
}

/// Runs nixstorefs with `args` before the closure and a fresh mountpoint; it must exit 2,
/// say `fragment` on stderr, and leave nothing mounted.
fn expect_refused(s: &SampleStore, args: &[&str], fragment: &str) {
    harness::require_fuse();
    let mp = Mountpoint::new();
    let out = match harness::run_bounded(
        Command::new(harness::bin("nixstorefs"))
            .arg("-f")
            .arg("--store-dir")
            .arg(&s.store_dir)
            .args(args)
            .arg(&s.closure_file)
            .arg(mp.path())
            .stdin(Stdio::null()),
        Duration::from_secs(20),
    ) {
        Ok(out) => out,
        Err(e) => panic!(
            "nixstorefs {args:?} did not exit (mounted: {}): {e:?}",
            mp.is_mounted()
        ),
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!mp.is_mounted(), "{args:?} left a mount; stderr:\n{stderr}");
    assert_eq!(out.status.code(), Some(2), "{args:?}; stderr:\n{stderr}");
    assert!(
        stderr.contains(fragment),
        "{args:?}: stderr lacks {fragment:?}:\n{stderr}"
    );
}

#[test]
fn mode_bits_hold_for_other_users_of_an_allow_other_mount() {
    let (_d, s) = sample::temp(&SampleOptions::small());
    let base = sample::base_name("private-1.0");
    let list = add_store_path(
        &s,
        &base,
        &[
            ("secret", b"only for root\n", 0o400),
            ("public", b"for everyone\n", 0o444),
        ],
    );
    let m = Mount::foreground(&s.store_dir, &list, &["-o", "allow_other"]);
    let info = m.info().unwrap();
    assert!(
        info.super_options
            .iter()
            .any(|o| o == "default_permissions"),
        "default_permissions is not on by default: {info:?}"
    );
    let dir = m.mountpoint().join(&base);

    // The other user reaches the mount: a readable file reads.
    let out = cat_as_other(&dir.join("public"));
    assert!(out.status.success(), "public file: {out:?}");
    assert_eq!(out.stdout, b"for everyone\n");
    // But not a file whose mode keeps it from them.
    let out = cat_as_other(&dir.join("secret"));
    assert!(
        !out.status.success(),
        "a mode-0400 file was readable: {out:?}"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Permission denied"),
        "{out:?}"
    );
    assert!(out.stdout.is_empty());
    // Root still reads it, as on the host.
    assert_eq!(fs::read(dir.join("secret")).unwrap(), b"only for root\n");
    drop(m);

    // Turned off on request: then the daemon's access is everyone's, as documented.
    let m = Mount::foreground(
        &s.store_dir,
        &list,
        &["-o", "allow_other,no_default_permissions"],
    );
    let info = m.info().unwrap();
    assert!(
        !info
            .super_options
            .iter()
            .any(|o| o == "default_permissions"),
        "{info:?}"
    );
    let out = cat_as_other(&m.mountpoint().join(&base).join("secret"));
    assert!(out.status.success(), "no_default_permissions: {out:?}");
    assert_eq!(out.stdout, b"only for root\n");
}

#[test]
fn dev_option_is_refused() {
    let (_d, s) = sample::temp(&SampleOptions::small());
    expect_refused(&s, &["-o", "ro,dev"], "mount option `dev` is refused");
}

#[test]
fn max_cached_dirs_is_bounded() {
    let (_d, s) = sample::temp(&SampleOptions::small());
    for bad in ["0", "65537", "18446744073709551616"] {
        expect_refused(&s, &["--max-cached-dirs", bad], "--max-cached-dirs");
    }
    let m = Mount::foreground(&s.store_dir, &s.closure_file, &["--max-cached-dirs", "1"]);
    assert_eq!(root_names(m.mountpoint()), s.closure);
}

#[test]
fn detached_daemon_works_from_the_root_directory() {
    let (_d, s) = sample::temp(&SampleOptions::small());
    let m = Mount::daemon(&s.store_dir, &s.closure_file, &[]);
    let pids = m.daemon_pids();
    assert!(!pids.is_empty(), "no detached daemon process found");
    let here = std::env::current_dir().unwrap();
    assert_ne!(
        here,
        Path::new("/"),
        "the test must start the daemon elsewhere"
    );
    for pid in pids {
        let cwd = fs::read_link(format!("/proc/{pid}/cwd")).unwrap();
        assert_eq!(cwd, Path::new("/"), "daemon {pid} works in {cwd:?}");
    }
    assert_eq!(root_names(m.mountpoint()), s.closure);
}

/// `listxattr` with a buffer of `size` bytes (0: the size probe).
fn listxattr(path: &Path, size: usize, follow: bool) -> std::io::Result<usize> {
    let c = CString::new(path.as_os_str().as_bytes()).unwrap();
    let mut buf = vec![0u8; size.max(1)];
    let ptr = if size == 0 {
        std::ptr::null_mut()
    } else {
        buf.as_mut_ptr().cast()
    };
    // SAFETY: a NUL-terminated path and a buffer of `size` bytes (or none for the probe).
    let n = unsafe {
        if follow {
            libc::listxattr(c.as_ptr(), ptr, size)
        } else {
            libc::llistxattr(c.as_ptr(), ptr, size)
        }
    };
    if n < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

fn getxattr(path: &Path, name: &str) -> std::io::Result<usize> {
    let c = CString::new(path.as_os_str().as_bytes()).unwrap();
    let n = CString::new(name).unwrap();
    let mut buf = [0u8; 256];
    // SAFETY: NUL-terminated path and name, and a buffer of the size given.
    let r = unsafe { libc::lgetxattr(c.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

#[test]
fn extended_attributes_are_answered_as_by_a_filesystem_without_any() {
    let (d, s) = sample::temp(&SampleOptions::small());
    let m = Mount::foreground(&s.store_dir, &s.closure_file, &[]);
    let hello = s.path_named("hello-2.12");
    let root = m.mountpoint();
    let paths = [
        root.to_path_buf(),
        root.join(hello),
        root.join(hello).join("bin/hello"),
        root.join(hello).join("bin/greet"),
    ];
    for path in &paths {
        let follow = !path.ends_with("greet");
        assert_eq!(
            listxattr(path, 0, follow).unwrap(),
            0,
            "{path:?}: size probe"
        );
        assert_eq!(listxattr(path, 4096, follow).unwrap(), 0, "{path:?}: list");
        for name in [
            "user.test",
            "security.capability",
            "system.posix_acl_access",
        ] {
            // The kernel itself refuses ACLs on symlinks (EOPNOTSUPP), whatever the
            // filesystem.
            if !follow && name.starts_with("system.posix_acl") {
                continue;
            }
            let e = getxattr(path, name).unwrap_err();
            assert_eq!(
                e.raw_os_error(),
                Some(libc::ENODATA),
                "{path:?} {name}: {e}"
            );
        }
    }

    // Tools that copy attributes copy the tree without complaint.
    let src = root.join(hello);
    let copy = d.path().join("copy");
    let out = harness::run(Command::new("cp").arg("-a").arg(&src).arg(&copy), TIMEOUT);
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "cp -a: {out:?}"
    );
    let mut check = TreeCheck::new();
    check.walk(&s.host(hello), &copy);
    check.assert_clean("cp -a of the mount");

    let tar = d.path().join("hello.tar");
    let out = harness::run(
        Command::new("tar")
            .args(["--xattrs", "--xattrs-include=*", "-cf"])
            .arg(&tar)
            .arg("-C")
            .arg(root)
            .arg(hello),
        TIMEOUT,
    );
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "tar --xattrs: {out:?}"
    );

    // mkfs.erofs reads every file's attributes; with "not supported" it refused the tree.
    let img = d.path().join("hello.img");
    let out = harness::run(
        Command::new("mkfs.erofs").arg("-T0").arg(&img).arg(&src),
        TIMEOUT,
    );
    assert!(out.status.success(), "mkfs.erofs over the mount: {out:?}");
    let mounted = ImageMount::new(&img);
    let mut check = TreeCheck::with(Expect {
        mtime: Some((0, 0)),
        links: Links::Shared,
        dir_sizes: false,
    });
    check.walk(&s.host(hello), mounted.path());
    check.assert_clean("mkfs.erofs image of the mount");
}

#[test]
fn leading_period_store_paths_mount() {
    let (_d, s) = sample::temp(&SampleOptions::small());
    // Valid since Nix 2.21: a name starting with a period whose first dash-separated
    // component is not `.` or `..`.
    let base = format!("{}-.dotfiles-1.0", sample::store_hash("", ".dotfiles-1.0"));
    let list = add_store_path(&s, &base, &[("bashrc", b"set -o vi\n", 0o444)]);
    let m = Mount::foreground(&s.store_dir, &list, &[]);
    let names = root_names(m.mountpoint());
    assert!(names.contains(&base), "{base} not listed: {names:?}");
    assert_eq!(names.len(), s.closure.len() + 1);
    assert_eq!(
        fs::read(m.mountpoint().join(&base).join("bashrc")).unwrap(),
        b"set -o vi\n"
    );
}

#[test]
fn dot_and_dotdot_first_components_are_refused() {
    let (_d, s) = sample::temp(&SampleOptions::small());
    for name in [".", "..", ".-x", "..-x"] {
        let bad = format!(
            "{}/{}-{name}",
            s.store_dir.display(),
            sample::store_hash("", name)
        );
        let list = s.dir.join("dot.txt");
        fs::write(&list, format!("{}{bad}\n", s.store_paths_text())).unwrap();
        let mp = Mountpoint::new();
        let out = harness::run(
            Command::new(harness::bin("nixstorefs"))
                .arg("-f")
                .arg("--store-dir")
                .arg(&s.store_dir)
                .arg(&list)
                .arg(mp.path())
                .stdin(Stdio::null()),
            Duration::from_secs(20),
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!mp.is_mounted(), "{name}: mounted");
        assert_eq!(out.status.code(), Some(2), "{name}: {stderr}");
        let line = format!("dot.txt:{}:", s.closure.len() + 1);
        assert!(stderr.contains(&line), "{name}: {stderr}");
        assert!(stderr.contains("which Nix refuses"), "{name}: {stderr}");
    }
}
