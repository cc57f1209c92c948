//! The native virtio-fs backend's process lifecycle, on the host, without a guest: bad
//! input creates no socket, the socket appears when the daemon is ready and goes when it
//! exits, a live daemon's socket is never taken while a killed one's is replaced, and
//! inherited sockets and groups work. Every daemon runs as `nobody`, as a VM runner
//! started by an ordinary user would run it. (Real guests: tests/guest.rs.)

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixDatagram, UnixListener};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nixstorefs_tests::harness;
use nixstorefs_tests::sample::{self, SampleOptions, SampleStore};
use nixstorefs_tests::vm::{self, UNPRIVILEGED_UID};

const TIMEOUT: Duration = Duration::from_secs(20);

/// Stops, on drop, every daemon serving `.0` (a detached daemon is not our child).
struct Reaper(PathBuf);

impl Drop for Reaper {
    fn drop(&mut self) {
        let pids = harness::pids_with_arg(self.0.as_os_str());
        if !pids.is_empty() && !harness::stop_pids(&pids, TIMEOUT) {
            for pid in pids {
                if let Some(p) = rustix::process::Pid::from_raw(pid) {
                    let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
                }
            }
        }
    }
}

/// A daemon killed and reaped on drop, whatever the test did.
struct Daemon(Option<Child>);

impl Daemon {
    fn child(&mut self) -> &mut Child {
        self.0.as_mut().unwrap()
    }

    fn signal_and_wait(&mut self, sig: rustix::process::Signal) -> ExitStatus {
        let pid = rustix::process::Pid::from_raw(self.child().id() as i32).unwrap();
        rustix::process::kill_process(pid, sig).expect("signal the daemon");
        harness::wait_bounded(self.child(), TIMEOUT).expect("the daemon did not exit")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A sample store readable by `nobody`, and a directory `nobody` may create sockets in.
struct Setup {
    s: SampleStore,
    sockets: PathBuf,
    _dir: tempfile::TempDir,
}

fn setup() -> Setup {
    let (dir, s) = sample::temp(&SampleOptions::small());
    vm::open_to_others(dir.path());
    let sockets = dir.path().join("sockets");
    fs::create_dir(&sockets).unwrap();
    rustix::fs::chown(
        &sockets,
        Some(rustix::fs::Uid::from_raw(UNPRIVILEGED_UID)),
        Some(rustix::fs::Gid::from_raw(UNPRIVILEGED_UID)),
    )
    .unwrap();
    Setup {
        s,
        sockets,
        _dir: dir,
    }
}

impl Setup {
    /// nixstorefs serving the sample's closure as `nobody`, with `args` before the closure.
    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(harness::bin("nixstorefs"));
        cmd.arg("--store-dir")
            .arg(&self.s.store_dir)
            .args(args)
            .arg(&self.s.closure_file)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        vm::as_unprivileged(&mut cmd);
        cmd
    }

    fn socket(&self, name: &str) -> PathBuf {
        self.sockets.join(name)
    }

    /// Starts `-f --socket-path SOCKET` with `extra`, and waits for READY=1.
    fn start(&self, socket: &Path, extra: &[&str]) -> Daemon {
        let ready = self.sockets.join(format!("notify.{}", std::process::id()));
        let _ = fs::remove_file(&ready);
        let notify = UnixDatagram::bind(&ready).unwrap();
        fs::set_permissions(&ready, fs::Permissions::from_mode(0o777)).unwrap();
        let mut args = vec!["-f", "--socket-path", socket.to_str().unwrap()];
        args.extend_from_slice(extra);
        let mut cmd = self.command(&args);
        cmd.env("NOTIFY_SOCKET", &ready).stdout(Stdio::null());
        let d = Daemon(Some(cmd.spawn().expect("start nixstorefs")));
        wait_ready(&notify, &ready);
        d
    }
}

fn wait_ready(notify: &UnixDatagram, path: &Path) {
    notify.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut buf = [0u8; 64];
    let n = notify
        .recv(&mut buf)
        .expect("no READY=1 from the daemon in time");
    assert_eq!(&buf[..n], b"READY=1");
    let _ = fs::remove_file(path);
}

fn lock_of(socket: &Path) -> PathBuf {
    PathBuf::from(format!("{}.pid", socket.display()))
}

#[test]
fn bad_input_exits_2_and_creates_no_socket() {
    let t = setup();
    let socket = t.socket("bad.sock");
    let bad = t.sockets.join("bad-closure.txt");
    fs::write(&bad, "/not/a/store/path\n").unwrap();
    fs::set_permissions(&bad, fs::Permissions::from_mode(0o644)).unwrap();
    let mut cmd = Command::new(harness::bin("nixstorefs"));
    cmd.arg("--store-dir")
        .arg(&t.s.store_dir)
        .arg("-f")
        .arg("--socket-path")
        .arg(&socket)
        .arg(&bad);
    vm::as_unprivileged(&mut cmd);
    let out = harness::run(&mut cmd, TIMEOUT);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("bad-closure.txt"), "{stderr}");
    assert!(!socket.exists() && !lock_of(&socket).exists());

    // A socket in a directory that does not exist is bad input too, said before serving.
    let nowhere = t.sockets.join("missing/dir/s.sock");
    let out = harness::run(
        &mut t.command(&["-f", "--socket-path", nowhere.to_str().unwrap()]),
        TIMEOUT,
    );
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing/dir"));

    // A path that is there and not a socket is never replaced (nor deleted).
    let file = t.sockets.join("not-a-socket");
    fs::write(&file, "keep me\n").unwrap();
    rustix::fs::chown(
        &file,
        Some(rustix::fs::Uid::from_raw(UNPRIVILEGED_UID)),
        None,
    )
    .unwrap();
    let out = harness::run(
        &mut t.command(&["-f", "--socket-path", file.to_str().unwrap()]),
        TIMEOUT,
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not a socket"));
    assert_eq!(fs::read_to_string(&file).unwrap(), "keep me\n");
    assert!(!lock_of(&file).exists(), "no lock left behind");

    // --tag means nothing to a mount.
    let mnt = t.sockets.join("mnt");
    fs::create_dir(&mnt).unwrap();
    let mut cmd = Command::new(harness::bin("nixstorefs"));
    cmd.args(["--tag", "x"]).arg(&t.s.closure_file).arg(&mnt);
    let out = harness::run(&mut cmd, TIMEOUT);
    assert_eq!(out.status.code(), Some(2), "{out:?}");

    // Neither a mountpoint nor a socket.
    let mut cmd = Command::new(harness::bin("nixstorefs"));
    cmd.arg(&t.s.closure_file);
    let out = harness::run(&mut cmd, TIMEOUT);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}

#[test]
fn socket_lives_exactly_as_long_as_the_daemon() {
    let t = setup();
    let socket = t.socket("store.sock");
    let mut d = t.start(&socket, &[]);
    let meta = fs::symlink_metadata(&socket).expect("the socket exists once ready");
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.mode() & 0o777, 0o600, "only its owner may connect");
    assert_eq!(meta.uid(), UNPRIVILEGED_UID);
    assert_eq!(
        fs::read_to_string(lock_of(&socket)).unwrap().trim(),
        d.child().id().to_string()
    );

    // A second daemon for the same socket fails, and leaves the first one's alone.
    let out = harness::run(
        &mut t.command(&["-f", "--socket-path", socket.to_str().unwrap()]),
        TIMEOUT,
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("served by another daemon"), "{stderr}");
    assert!(stderr.contains(&d.child().id().to_string()), "{stderr}");
    assert!(socket.exists());

    let status = d.signal_and_wait(rustix::process::Signal::TERM);
    assert!(
        status.success(),
        "SIGTERM ends the daemon cleanly: {status}"
    );
    assert!(!socket.exists(), "the socket is removed at exit");
    assert!(!lock_of(&socket).exists(), "the lock is removed at exit");

    let mut d = t.start(&socket, &[]);
    let status = d.signal_and_wait(rustix::process::Signal::INT);
    assert!(status.success(), "SIGINT ends the daemon cleanly: {status}");
}

/// Waits (bounded) until `path` is gone.
fn gone(path: &Path) -> bool {
    let deadline = Instant::now() + TIMEOUT;
    while fs::symlink_metadata(path).is_ok() {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}

#[test]
fn a_killed_daemons_socket_is_removed() {
    let t = setup();
    let socket = t.socket("store.sock");
    let mut d = t.start(&socket, &[]);
    let status = d.signal_and_wait(rustix::process::Signal::KILL);
    assert!(!status.success());
    // The sandboxed daemon's clean-up process removes both, kill -9 or not.
    assert!(gone(&socket), "the socket was left behind");
    assert!(gone(&lock_of(&socket)), "the lock was left behind");
    let mut d = t.start(&socket, &[]);
    assert!(d.signal_and_wait(rustix::process::Signal::TERM).success());
}

#[test]
fn a_killed_daemons_socket_is_replaced() {
    let t = setup();
    let socket = t.socket("store.sock");
    // Without the sandbox there is no clean-up process: the files stay, and are replaced.
    let mut d = t.start(&socket, &["--sandbox", "none", "--seccomp", "none"]);
    let status = d.signal_and_wait(rustix::process::Signal::KILL);
    assert!(!status.success());
    assert!(socket.exists() && lock_of(&socket).exists(), "left behind");
    let mut d = t.start(&socket, &[]);
    assert!(fs::symlink_metadata(&socket)
        .unwrap()
        .file_type()
        .is_socket());
    assert!(d.signal_and_wait(rustix::process::Signal::TERM).success());
}

#[test]
fn detaches_once_the_socket_exists() {
    let t = setup();
    let socket = t.socket("store.sock");
    // Whatever happens below, no detached daemon outlives the test.
    let _reaper = Reaper(socket.clone());
    let out = harness::run(
        &mut t.command(&["--socket-path", socket.to_str().unwrap()]),
        TIMEOUT,
    );
    assert!(out.status.success(), "{out:?}");
    // The parent returned: the socket is there already, served by the detached child.
    assert!(fs::symlink_metadata(&socket)
        .unwrap()
        .file_type()
        .is_socket());
    let pid: i32 = fs::read_to_string(lock_of(&socket))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(harness::process_alive(pid));
    assert!(
        harness::stop_pids(&[pid], TIMEOUT),
        "the daemon did not stop"
    );
    let deadline = Instant::now() + TIMEOUT;
    while socket.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        !socket.exists(),
        "the detached daemon removes its socket at exit"
    );
}

#[test]
fn inherited_socket_and_socket_group() {
    let t = setup();
    // --fd: a listening socket made by a launcher, as descriptor 3.
    let path = t.socket("inherited.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let fd = std::os::fd::AsRawFd::as_raw_fd(&listener);
    let ready = t.sockets.join("notify.fd");
    let notify = UnixDatagram::bind(&ready).unwrap();
    fs::set_permissions(&ready, fs::Permissions::from_mode(0o777)).unwrap();
    let mut cmd = t.command(&["-f", "--fd", "3"]);
    cmd.env("NOTIFY_SOCKET", &ready);
    // SAFETY: dup2 and fcntl are async-signal-safe; they only make the listener
    // descriptor 3, open across exec (dup2 onto itself would keep its close-on-exec flag).
    unsafe {
        cmd.pre_exec(move || {
            let ok = if fd == 3 {
                libc::fcntl(3, libc::F_SETFD, 0) == 0
            } else {
                libc::dup2(fd, 3) == 3
            };
            if !ok {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut d = Daemon(Some(cmd.spawn().unwrap()));
    wait_ready(&notify, &ready);
    assert!(d.signal_and_wait(rustix::process::Signal::TERM).success());
    assert!(
        path.exists(),
        "an inherited socket is the launcher's to remove"
    );

    // --fd on something that is not a listening socket is refused.
    let out = harness::run(&mut t.command(&["-f", "--fd", "0"]), TIMEOUT);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a listening Unix socket"));

    // --socket-group: the group may connect too.
    let socket = t.socket("group.sock");
    let mut d = t.start(&socket, &["--socket-group", "65534"]);
    let meta = fs::metadata(&socket).unwrap();
    assert_eq!(meta.mode() & 0o777, 0o660);
    assert_eq!(meta.gid(), 65534);
    assert!(d.signal_and_wait(rustix::process::Signal::TERM).success());
}

/// A socket another program listens on (one that takes no lock file, as virtiofsd or a
/// VMM's own socket) is never replaced: the daemon exits 1 naming the path, and the other
/// program's socket still answers.
#[test]
fn a_live_foreign_socket_is_never_replaced() {
    let t = setup();
    let socket = t.socket("foreign.sock");
    let foreign = UnixListener::bind(&socket).unwrap();
    let out = harness::run(
        &mut t.command(&["-f", "--socket-path", socket.to_str().unwrap()]),
        TIMEOUT,
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("another program listens on"), "{stderr}");
    assert!(stderr.contains("foreign.sock"), "{stderr}");
    assert!(!lock_of(&socket).exists(), "no lock left behind");
    // Still the foreign program's, still listening, and never connected to by the probe.
    foreign.set_nonblocking(true).unwrap();
    assert!(
        foreign.accept().is_err(),
        "the daemon's probe connected to the foreign socket"
    );
    std::os::unix::net::UnixStream::connect(&socket).expect("the foreign socket answers");
}

/// A socket directory other users may write to would let them plant or swap the socket:
/// refused unless sticky (and then only when the path is free or the daemon's own).
#[test]
fn socket_directory_writable_by_others_is_refused() {
    let t = setup();
    let open_dir = t.sockets.join("world-writable");
    fs::create_dir(&open_dir).unwrap();
    fs::set_permissions(&open_dir, fs::Permissions::from_mode(0o777)).unwrap();
    let socket = open_dir.join("s.sock");
    let out = harness::run(
        &mut t.command(&["-f", "--socket-path", socket.to_str().unwrap()]),
        TIMEOUT,
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("writable by other users"), "{stderr}");
    assert!(stderr.contains("XDG_RUNTIME_DIR"), "{stderr}");
    assert!(!socket.exists() && !lock_of(&socket).exists());

    // Sticky, like /tmp: allowed while the path is free...
    let sticky = t.sockets.join("sticky");
    fs::create_dir(&sticky).unwrap();
    fs::set_permissions(&sticky, fs::Permissions::from_mode(0o1777)).unwrap();
    let socket = sticky.join("s.sock");
    let mut d = t.start(&socket, &[]);
    assert!(d.signal_and_wait(rustix::process::Signal::TERM).success());
    // ...but not over something another user put there first.
    let planted = UnixListener::bind(&socket).unwrap();
    drop(planted); // a dead socket, owned by root: still not the daemon's to replace
    let out = harness::run(
        &mut t.command(&["-f", "--socket-path", socket.to_str().unwrap()]),
        TIMEOUT,
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not ours"));
}

/// One daemon serves one guest: a second VMM connecting while the first is connected is
/// accepted and closed at once, with a log line, instead of waiting unanswered.
#[test]
fn a_second_vmm_is_refused() {
    let t = setup();
    let socket = t.socket("store.sock");
    let log = t.sockets.join("daemon.log");
    fs::write(&log, "").unwrap();
    rustix::fs::chown(
        &log,
        Some(rustix::fs::Uid::from_raw(UNPRIVILEGED_UID)),
        None,
    )
    .unwrap();
    let mut d = t.start(&socket, &["--log-file", log.to_str().unwrap()]);
    let _first = std::os::unix::net::UnixStream::connect(&socket).expect("the first VMM");
    let mut second = std::os::unix::net::UnixStream::connect(&socket).expect("the second VMM");
    second.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut buf = [0u8; 16];
    let n = std::io::Read::read(&mut second, &mut buf).expect("closed, not left hanging");
    assert_eq!(n, 0, "the second VMM is disconnected");
    let deadline = Instant::now() + TIMEOUT;
    while !fs::read_to_string(&log)
        .unwrap()
        .contains("another VMM connected")
    {
        assert!(Instant::now() < deadline, "no log line for the second VMM");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The first VMM leaving ends the daemon cleanly.
    drop(_first);
    let status = harness::wait_bounded(d.child(), TIMEOUT).expect("the daemon exits");
    assert!(status.success(), "{status}");
}
