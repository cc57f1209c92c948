//! Live closure updates on the host: `nixstorefs update` and SIGHUP change what a running
//! mount serves without a restart; a bad closure is refused and changes nothing; paths
//! left out stay usable for what still holds them and go once released, or at once with
//! `--prune`; the guest daemon's control socket lives and dies with it. (A guest taking a
//! new closure: tests/guest.rs; roots following the served set: tests/gc.rs.)

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use nixstorefs_tests::compare::root_names;
use nixstorefs_tests::harness::{self, Mount};
use nixstorefs_tests::sample::{self, SampleOptions, SampleStore};
use nixstorefs_tests::vm;

const TIMEOUT: Duration = Duration::from_secs(30);

/// A sample store with a second closure beside the first: `B` is the sample's closure
/// without one path (`dropped`) and with a new one (`added`).
struct Setup {
    s: SampleStore,
    dir: tempfile::TempDir,
    control: PathBuf,
    closure_b: PathBuf,
    dropped: String,
    added: String,
}

fn setup() -> Setup {
    let (dir, s) = sample::temp(&SampleOptions::small());
    let added = vm::add_store_path(&s, "update-b", &[("bin/b", b"system b\n")]).unwrap();
    // A directory path only the first closure has, and nothing else refers to.
    let dropped = s.path_named("hello-2.12").to_string();
    let mut b: Vec<String> = s
        .closure
        .iter()
        .filter(|p| **p != dropped)
        .cloned()
        .collect();
    b.push(added.clone());
    let closure_b = dir.path().join("closure-b.txt");
    let text: String = b
        .iter()
        .map(|p| format!("{}\n", s.store_dir.join(p).display()))
        .collect();
    fs::write(&closure_b, text).unwrap();
    let control = dir.path().join("control.sock");
    Setup {
        s,
        dir,
        control,
        closure_b,
        dropped,
        added,
    }
}

impl Setup {
    /// A foreground mount of the first closure listening for updates.
    fn mount(&self) -> Mount {
        let control = self.control.to_str().unwrap();
        Mount::foreground(
            &self.s.store_dir,
            &self.s.closure_file,
            &["--control-socket", control, "-v"],
        )
    }

    /// `nixstorefs update --control-socket C ARGS...`.
    fn update(&self, args: &[&str]) -> Output {
        harness::run(
            Command::new(harness::bin("nixstorefs"))
                .arg("update")
                .arg("--control-socket")
                .arg(&self.control)
                .args(args)
                .stdin(Stdio::null()),
            TIMEOUT,
        )
    }
}

fn text(o: &Output) -> String {
    format!(
        "status {}, stdout {:?}, stderr {:?}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Waits (bounded) until `f` holds.
fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + TIMEOUT;
    while !f() {
        assert!(Instant::now() < deadline, "never: {what}");
        thread::sleep(Duration::from_millis(20));
    }
}

fn sorted(mut names: Vec<String>) -> Vec<String> {
    names.sort();
    names
}

#[test]
fn an_update_replaces_the_closure_without_a_restart() {
    harness::require_fuse();
    let t = setup();
    let mount = t.mount();
    let mnt = mount.mountpoint();
    assert_eq!(root_names(mnt), t.s.closure);
    // Looked up and listed before: nothing cached may hide the change.
    let new = mnt.join(&t.added).join("bin/b");
    assert!(fs::metadata(&new).is_err());
    let hello = mnt.join(&t.dropped);
    assert!(hello.is_dir());

    let o = t.update(&[t.closure_b.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    let summary = String::from_utf8_lossy(&o.stdout);
    assert!(summary.contains("1 added"), "{summary}");

    // At once: listed, found, read; the dropped path is neither listed nor found.
    assert_eq!(fs::read(&new).unwrap(), b"system b\n");
    let mut expected: Vec<String> = fs::read_to_string(&t.closure_b)
        .unwrap()
        .lines()
        .map(|l| {
            Path::new(l)
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    expected = sorted(expected);
    assert_eq!(root_names(mnt), expected);
    assert_eq!(
        fs::metadata(&hello).map_err(|e| e.raw_os_error()).err(),
        Some(Some(libc::ENOENT)),
        "the dropped path is still found"
    );
    // The same daemon served all of it.
    assert!(mount.is_mounted());
}

#[test]
fn a_path_in_use_stays_readable_until_released() {
    harness::require_fuse();
    let t = setup();
    let mount = t.mount();
    let mnt = mount.mountpoint();
    let held = t.s.small_files.iter().find(|f| f.starts_with(&t.dropped));
    let held = held.expect("a small file in the dropped path").clone();
    let mut file = fs::File::open(mnt.join(&held)).unwrap();

    let o = t.update(&[t.closure_b.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    let summary = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(summary.contains("1 retiring"), "{summary}");
    assert!(fs::metadata(mnt.join(&t.dropped)).is_err(), "still found");
    let mut read = Vec::new();
    file.read_to_end(&mut read).unwrap();
    assert_eq!(read, fs::read(t.s.host(&held)).unwrap());

    // Released once closed: the daemon asks the kernel to drop the entries nothing uses
    // any more below the retiring path, the kernel forgets it, and so does the daemon.
    drop(file);
    eventually("the retiring path is released", || {
        let o = t.update(&[t.closure_b.to_str().unwrap()]);
        o.status.success()
            && String::from_utf8_lossy(&o.stdout).contains("0 retiring paths still held")
    });
}

#[test]
fn prune_takes_paths_away_at_once() {
    harness::require_fuse();
    let t = setup();
    let mount = t.mount();
    let mnt = mount.mountpoint();
    let dir = mnt.join(&t.dropped);
    let listing = fs::read_dir(&dir).unwrap();
    let o = t.update(&["--prune", t.closure_b.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("1 removed"));
    drop(listing);
    // Nothing below the pruned path resolves any more, even through what was held.
    for rel in t.s.small_files.iter().filter(|f| f.starts_with(&t.dropped)) {
        assert!(
            fs::read(mnt.join(rel)).is_err(),
            "{} still readable",
            rel.display()
        );
    }
}

#[test]
fn a_bad_update_is_refused_and_changes_nothing() {
    harness::require_fuse();
    let t = setup();
    let mount = t.mount();
    let mnt = mount.mountpoint();
    let before = root_names(mnt);

    let missing = t.dir.path().join("missing.txt");
    let absent = sample::base_name("never-built");
    fs::write(
        &missing,
        format!(
            "{}\n{}\n",
            t.s.store_dir.join(&t.added).display(),
            t.s.store_dir.join(&absent).display()
        ),
    )
    .unwrap();
    let o = t.update(&[missing.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains(&absent),
        "{}",
        text(&o)
    );

    let malformed = t.dir.path().join("malformed.txt");
    fs::write(&malformed, "/nix/store/not-a-store-path\n").unwrap();
    let o = t.update(&[malformed.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("malformed.txt"),
        "the error names the file: {}",
        text(&o)
    );
    assert_eq!(root_names(mnt), before, "a refused update changed the view");
    assert!(fs::metadata(mnt.join(&t.added)).is_err());

    // No daemon there: status 1, the socket named.
    let o = harness::run(
        Command::new(harness::bin("nixstorefs"))
            .args(["update", "--control-socket"])
            .arg(t.dir.path().join("nobody.sock"))
            .arg(&t.closure_b)
            .stdin(Stdio::null()),
        TIMEOUT,
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("nobody.sock"));
}

#[test]
fn sighup_reads_the_closure_file_again() {
    harness::require_fuse();
    let t = setup();
    let closure = t.dir.path().join("served.txt");
    fs::copy(&t.s.closure_file, &closure).unwrap();
    let mut mount = Mount::foreground(&t.s.store_dir, &closure, &["-v"]);
    let mnt = mount.mountpoint().to_path_buf();
    assert_eq!(root_names(&mnt), t.s.closure);
    // Replaced the way editors and `nix-store -qR > f.tmp && mv` do: a new file.
    let tmp = t.dir.path().join("served.txt.tmp");
    fs::copy(&t.closure_b, &tmp).unwrap();
    fs::rename(&tmp, &closure).unwrap();
    let pid = rustix::process::Pid::from_raw(mount.pid().unwrap()).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::HUP).unwrap();
    eventually("the new closure is served", || {
        mount.stderr().contains("SIGHUP: ")
    });
    assert!(mnt.join(&t.added).join("bin/b").exists());
    assert!(!root_names(&mnt).contains(&t.dropped));
    // A bad file on SIGHUP is refused, logged, and the daemon serves on.
    fs::write(&closure, "garbage\n").unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::HUP).unwrap();
    eventually("the refusal is logged", || {
        mount
            .stderr()
            .contains("still serving the closure as it was")
    });
    assert!(mount.is_mounted());
    assert!(mnt.join(&t.added).join("bin/b").exists());
    let status = mount.signal_and_wait(rustix::process::Signal::TERM);
    assert!(status.success(), "{status}");
}

#[test]
fn the_guest_daemon_takes_updates_on_its_control_socket() {
    let t = setup();
    vm::open_to_others(t.dir.path());
    // A directory of the daemon's user, as $XDG_RUNTIME_DIR would be.
    let sockets = t.dir.path().join("sockets");
    fs::create_dir(&sockets).unwrap();
    let nobody = Some(rustix::fs::Uid::from_raw(vm::UNPRIVILEGED_UID));
    rustix::fs::chown(&sockets, nobody, None).unwrap();
    let socket = sockets.join("guest.sock");
    let control = sockets.join("guest.sock.control");
    let mut cmd = Command::new(harness::bin("nixstorefs"));
    cmd.arg("--store-dir")
        .arg(&t.s.store_dir)
        .arg("--socket-path")
        .arg(&socket)
        .arg(&t.s.closure_file)
        .stdin(Stdio::null());
    vm::as_unprivileged(&mut cmd);
    // Detached: it exits 0 once the socket is live.
    let o = harness::run(&mut cmd, TIMEOUT);
    assert!(o.status.success(), "{}", text(&o));
    let pids = harness::pids_with_arg(socket.as_os_str());
    let _reaper = Reaper(pids.clone());
    assert!(
        control.exists(),
        "no control socket beside {}",
        socket.display()
    );
    let mode = fs::metadata(&control).unwrap().permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o600
    );
    let o = harness::run(
        Command::new(harness::bin("nixstorefs"))
            .arg("update")
            .arg("--socket-path")
            .arg(&socket)
            .arg(&t.closure_b)
            .stdin(Stdio::null()),
        TIMEOUT,
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("1 added, 1 removed"));
    // Ended by a signal: the control socket goes with the daemon.
    assert!(
        harness::stop_pids(&pids, TIMEOUT),
        "the daemon did not stop"
    );
    eventually("the control socket is removed", || !control.exists());
    assert!(!socket.exists());
}

/// Kills what is left of the daemon, whatever the test did.
struct Reaper(Vec<i32>);

impl Drop for Reaper {
    fn drop(&mut self) {
        for &pid in &self.0 {
            if let Some(p) = rustix::process::Pid::from_raw(pid) {
                let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
            }
        }
    }
}
