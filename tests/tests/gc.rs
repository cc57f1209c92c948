//! End-to-end tests of the garbage collector roots: a real Nix (Debian's nix-bin) with a
//! private store and state directory, a tiny closure built offline from a static busybox,
//! and real collections (`nix-store --gc`) while nixstorefs serves the closure or mkimage
//! reads it.
//!
//! Needs root, FUSE, nix-bin (nix-build, nix-store, nix-daemon), busybox-static and
//! erofs-utils, and the built binaries (`cargo build --workspace`).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use nixstorefs_tests::compare::{root_names, Expect, Links, TreeCheck};
use nixstorefs_tests::harness::{self, ImageMount, Mount, MountBuilder};
use rustix::process::Signal;
use tempfile::TempDir;

const TIMEOUT: Duration = Duration::from_secs(60);

/// The closure: `gc-top` refers to `gc-leaf`, both to the busybox they were built with.
/// `gc-other` is garbage, built to see a collection delete something.
const EXPRESSION: &str = r#"
let
  bb = builtins.path { path = ./busybox; name = "busybox-static"; };
  busybox = "${bb}/bin/busybox";
  mk = name: script: derivation {
    inherit name;
    system = builtins.currentSystem;
    builder = busybox;
    args = [ "sh" "-c" script ];
  };
  leaf = mk "gc-leaf" ''
    $builder mkdir -p $out/share/doc
    echo leaf-data > $out/share/data
    $builder seq 1 20000 > $out/share/doc/numbers
  '';
  top = mk "gc-top" ''
    $builder mkdir -p $out/bin
    $builder ln -s ${leaf}/share/data $out/data
    printf '#!%s sh\necho hello\n' ${busybox} > $out/bin/hello
    $builder chmod +x $out/bin/hello
    echo ${leaf} > $out/refs
  '';
in { inherit top; other = mk "gc-other" "echo other > $out"; }
"#;

/// A Nix store and state directory of the test's own, so that collections touch nothing
/// else, and a closure built into it that nothing roots.
struct NixStore {
    dir: TempDir,
    store: PathBuf,
    state: PathBuf,
    /// The closure's store paths (`nix-store -qR` of `gc-top`).
    closure: Vec<PathBuf>,
    /// The closure file.
    closure_file: PathBuf,
    /// A copy of the closure's trees, to compare images with after the closure is gone.
    reference: PathBuf,
}

fn require_tool(name: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "{name} is missing: the garbage collection tests need Nix (apt-get install nix-bin; \
         scripts/install-deps.sh installs it)"
    );
}

fn check(o: Output, what: &str) -> Output {
    assert!(
        o.status.success(),
        "{what} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

impl NixStore {
    fn new() -> NixStore {
        for tool in ["nix-build", "nix-store", "nix-daemon"] {
            require_tool(tool);
        }
        let dir = tempfile::Builder::new()
            .prefix("nixstorefs-gc.")
            .tempdir()
            .expect("create a temporary directory");
        let store = dir.path().join("store");
        let state = dir.path().join("state");
        fs::create_dir_all(dir.path().join("etc")).unwrap();
        // Offline, as root, without build users or a sandbox: nix-bin's defaults want
        // a nixbld group and a binary cache.
        fs::write(
            dir.path().join("etc/nix.conf"),
            "build-users-group =\nsandbox = false\nsubstituters =\n",
        )
        .unwrap();
        fs::create_dir_all(dir.path().join("busybox/bin")).unwrap();
        fs::copy(
            nixstorefs_tests::vm::host_busybox(),
            dir.path().join("busybox/bin/busybox"),
        )
        .expect("copy busybox");
        fs::write(dir.path().join("closure.nix"), EXPRESSION).unwrap();
        let mut s = NixStore {
            dir,
            store,
            state,
            closure: Vec::new(),
            closure_file: PathBuf::new(),
            reference: PathBuf::new(),
        };
        let top = s.build("top");
        let o = check(
            harness::run(s.nix("nix-store").arg("-qR").arg(&top), TIMEOUT),
            "nix-store -qR",
        );
        let text = String::from_utf8(o.stdout).unwrap();
        s.closure = text.lines().map(PathBuf::from).collect();
        assert_eq!(s.closure.len(), 3, "the closure: {text}");
        s.closure_file = s.dir.path().join("closure.txt");
        fs::write(&s.closure_file, text).unwrap();
        // The builds are deterministic: a rebuild after a collection gives these again.
        s.reference = s.dir.path().join("reference");
        fs::create_dir(&s.reference).unwrap();
        check(
            harness::run(
                Command::new("cp")
                    .arg("-a")
                    .args(&s.closure)
                    .arg(&s.reference),
                TIMEOUT,
            ),
            "cp -a",
        );
        s
    }

    /// The environment that points Nix (and nixstorefs) at this store.
    fn env(&self) -> Vec<(&'static str, PathBuf)> {
        vec![
            ("NIX_STORE_DIR", self.store.clone()),
            ("NIX_STATE_DIR", self.state.clone()),
            ("NIX_LOG_DIR", self.dir.path().join("log")),
            ("NIX_CONF_DIR", self.dir.path().join("etc")),
            // Not the user's nix.conf either.
            ("NIX_USER_CONF_FILES", self.dir.path().join("etc/nix.conf")),
            ("NIX_DAEMON_SOCKET_PATH", self.daemon_socket()),
        ]
    }

    fn daemon_socket(&self) -> PathBuf {
        self.state.join("daemon-socket/socket")
    }

    fn nix(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        cmd.env_remove("NIX_REMOTE")
            .env_remove("NIX_PATH")
            .env_remove("NIX_CONFIG")
            .envs(self.env())
            .stdin(Stdio::null());
        cmd
    }

    /// Builds attribute `attr` of the expression, leaving it unrooted.
    fn build(&self, attr: &str) -> PathBuf {
        let o = check(self.try_build(attr), "nix-build");
        PathBuf::from(String::from_utf8(o.stdout).unwrap().trim())
    }

    fn try_build(&self, attr: &str) -> Output {
        harness::run(
            self.nix("nix-build")
                .arg("--no-out-link")
                .arg(self.dir.path().join("closure.nix"))
                .args(["-A", attr]),
            TIMEOUT,
        )
    }

    /// Runs a collection (through the daemon with `via_daemon`); returns its output.
    fn gc(&self, via_daemon: bool) -> String {
        let mut cmd = self.nix("nix-store");
        if via_daemon {
            cmd.env("NIX_REMOTE", "daemon");
        }
        let o = check(harness::run(cmd.arg("--gc"), TIMEOUT), "nix-store --gc");
        String::from_utf8_lossy(&o.stderr).into_owned()
    }

    fn missing(&self) -> Vec<&PathBuf> {
        self.closure.iter().filter(|p| !p.exists()).collect()
    }

    /// Mounts the closure with the environment of this store.
    fn mount(&self, extra: &[&str]) -> MountBuilder {
        let mut b = Mount::builder(&self.store, &self.closure_file).args(extra);
        for (k, v) in self.env() {
            b = b.env(k, v);
        }
        b
    }
}

/// `root` lists exactly the closure, and each path is as in `host`, as `expect` says.
fn assert_tree(nix: &NixStore, host: &Path, root: &Path, expect: Expect, what: &str) {
    let mut names: Vec<String> = nix
        .closure
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(root_names(root), names, "{what}: root");
    let mut check = TreeCheck::with(expect);
    for p in &nix.closure {
        let name = p.file_name().unwrap();
        check.walk(&host.join(name), &root.join(name));
    }
    check.assert_clean(what);
}

/// Every closure path is in the store and served, byte for byte, by the mount.
fn assert_served(nix: &NixStore, mount: &Mount) {
    assert_eq!(
        nix.missing(),
        Vec::<&PathBuf>::new(),
        "closure paths deleted"
    );
    assert_tree(
        nix,
        &nix.store,
        mount.mountpoint(),
        Expect::default(),
        "the mount",
    );
    let top = nix
        .closure
        .iter()
        .find(|p| p.to_string_lossy().ends_with("-gc-top"))
        .unwrap();
    let data = mount
        .mountpoint()
        .join(top.file_name().unwrap())
        .join("data");
    assert_eq!(fs::read_to_string(&data).unwrap(), "leaf-data\n");
}

fn roots_files(nix: &NixStore) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(nix.state.join("temproots"))
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// The pid of the one roots file, checked to be a live child of `daemon`: the roots keeper,
/// which holds the roots under its own pid for the daemon. Waits (bounded) for the daemon's
/// own file to go: a foreground mount is live before the keeper has taken over.
fn keeper_roots_file(nix: &NixStore, daemon: i32) -> i32 {
    let deadline = Instant::now() + Duration::from_secs(10);
    let files = loop {
        let files = roots_files(nix);
        if files.len() == 1 || Instant::now() >= deadline {
            break files;
        }
        thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(files.len(), 1, "roots files: {files:?}");
    let pid: i32 = files[0].parse().unwrap();
    assert!(
        harness::process_alive(pid),
        "roots file of a dead process: {files:?}"
    );
    assert_eq!(
        harness::parent_of(pid),
        Some(daemon),
        "the roots file {pid} is not the daemon's keeper"
    );
    pid
}

#[test]
fn collection_while_mounted_keeps_the_closure_and_unmounting_releases_it() {
    let nix = NixStore::new();
    let other = nix.build("other");
    let mount = nix.mount(&["-v"]).start();
    assert!(
        mount.stderr().contains("garbage collector roots held in"),
        "no local roots: {}",
        mount.stderr()
    );
    let pid = mount.pid().unwrap();
    keeper_roots_file(&nix, pid);

    let log = nix.gc(false);
    assert!(!other.exists(), "the garbage was kept: {log}");
    assert_served(&nix, &mount);
    // A second collection, after reads through the mount, changes nothing either.
    nix.gc(false);
    assert_served(&nix, &mount);

    drop(mount);
    assert_eq!(
        roots_files(&nix),
        Vec::<String>::new(),
        "roots file left behind"
    );
    let log = nix.gc(false);
    assert_eq!(
        nix.missing().len(),
        nix.closure.len(),
        "paths survived the unmount: {log}"
    );
}

#[test]
fn without_roots_the_collection_deletes_the_served_paths() {
    // The control: what keeps the paths above is the roots, not the mount.
    let nix = NixStore::new();
    let mount = nix.mount(&["--gc-roots", "off"]).start();
    assert_eq!(roots_files(&nix), Vec::<String>::new());
    nix.gc(false);
    assert_eq!(nix.missing().len(), nix.closure.len());
    drop(mount);
}

#[test]
fn kill_9_releases_the_roots() {
    let nix = NixStore::new();
    let mut mount = nix.mount(&["--gc-roots", "local"]).start();
    nix.gc(false);
    assert_served(&nix, &mount);
    let status = mount.signal_and_wait(Signal::KILL);
    assert!(!status.success());
    // The file stays until a collector finds its lock free.
    let log = nix.gc(false);
    assert_eq!(
        nix.missing().len(),
        nix.closure.len(),
        "paths outlived the killed daemon: {log}"
    );
    assert_eq!(roots_files(&nix), Vec::<String>::new(), "{log}");
    drop(mount);
}

#[test]
fn detached_daemon_holds_the_roots_under_its_own_pid() {
    let nix = NixStore::new();
    let mount = nix.mount(&[]).daemon().start();
    let pids = mount.daemon_pids();
    assert_eq!(pids.len(), 1, "daemon pids {pids:?}");
    // The parent that started it has exited: a file under its pid would be deleted as
    // stale by the next Nix process to get that pid. The daemon's keeper holds them.
    keeper_roots_file(&nix, pids[0]);
    nix.gc(false);
    assert_served(&nix, &mount);
    drop(mount);
    nix.gc(false);
    assert_eq!(nix.missing().len(), nix.closure.len());
}

/// A nix-daemon of the test's store, stopped (with its workers) on drop.
struct NixDaemon {
    child: Child,
    log: PathBuf,
    /// The state directory, by which its workers are found.
    state: PathBuf,
}

/// The live `nix-daemon` processes (the daemon and its workers) of the state directory
/// `state`, found by their environment: the workers start sessions of their own.
fn nix_daemons_of(state: &Path) -> Vec<i32> {
    let wanted = format!("NIX_STATE_DIR={}", state.display()).into_bytes();
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|pid: &i32| {
            let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            let env = fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
            comm.trim_end() == "nix-daemon" && env.split(|&b| b == 0).any(|v| v == wanted)
        })
        .collect()
}

impl NixDaemon {
    fn start(nix: &NixStore) -> NixDaemon {
        let log = nix.dir.path().join("nix-daemon.log");
        let out = fs::File::create(&log).unwrap();
        let child = nix
            .nix("nix-daemon")
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("start nix-daemon");
        let d = NixDaemon {
            child,
            log,
            state: nix.state.clone(),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(nix.daemon_socket()).is_err() {
            assert!(
                Instant::now() < deadline,
                "nix-daemon did not listen on {} within 20 s: {}",
                nix.daemon_socket().display(),
                fs::read_to_string(&d.log).unwrap_or_default()
            );
            thread::sleep(Duration::from_millis(20));
        }
        d
    }
}

impl Drop for NixDaemon {
    fn drop(&mut self) {
        // SIGKILL: a daemon told to stop with SIGTERM still accepts a connection waiting
        // for it, and forks a worker for it on its way out. Then every worker goes too:
        // they look at SIGTERM only between requests, so an idle one (holding a client's
        // roots) would outlive the test.
        let _ = self.child.kill();
        let _ = self.child.wait();
        for worker in nix_daemons_of(&self.state) {
            if let Some(pid) = rustix::process::Pid::from_raw(worker) {
                let _ = rustix::process::kill_process(pid, Signal::KILL);
            }
        }
        if thread::panicking() {
            eprintln!(
                "nix-daemon log:\n{}",
                fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
    }
}

#[test]
fn the_daemon_holds_the_roots_while_mounted_and_releases_them_on_exit() {
    let nix = NixStore::new();
    let _daemon = NixDaemon::start(&nix);
    let other = nix.build("other");
    // auto takes the daemon when one answers; detached, the connection goes with the child.
    let mount = nix.mount(&["-v"]).daemon().start();
    assert!(
        mount.stderr().contains("held by the nix-daemon"),
        "not through the daemon: {}",
        mount.stderr()
    );
    // The roots file is the daemon worker's, not one of the mount's.
    let files = roots_files(&nix);
    let pids = mount.daemon_pids();
    assert_eq!(files.len(), 1, "{files:?}");
    assert!(
        !pids.iter().any(|p| files.contains(&p.to_string())),
        "{files:?}"
    );
    let log = nix.gc(true);
    assert!(!other.exists(), "the garbage was kept: {log}");
    assert_served(&nix, &mount);
    drop(mount);
    nix.gc(true);
    assert_eq!(nix.missing().len(), nix.closure.len());
}

#[test]
fn the_daemon_releases_the_roots_of_a_killed_mount() {
    let nix = NixStore::new();
    let _daemon = NixDaemon::start(&nix);
    let mut mount = nix.mount(&["--gc-roots", "daemon"]).start();
    nix.gc(true);
    assert_served(&nix, &mount);
    mount.signal_and_wait(Signal::KILL);
    // The worker notices the closed connection and exits; its roots go with it.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let log = nix.gc(true);
        if nix.missing().len() == nix.closure.len() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "paths outlived the killed mount by 20 s: {log}"
        );
        thread::sleep(Duration::from_millis(200));
    }
    drop(mount);
}

/// The pids whose temporary roots file lists every closure path, with the file's entries.
fn holders_of_the_closure(nix: &NixStore) -> Vec<i32> {
    let mut holders = Vec::new();
    for name in roots_files(nix) {
        let Ok(text) = fs::read(nix.state.join("temproots").join(&name)) else {
            continue;
        };
        let entries: Vec<PathBuf> = text
            .split(|b| *b == 0)
            .filter(|e| !e.is_empty())
            .map(|e| PathBuf::from(String::from_utf8_lossy(e).into_owned()))
            .collect();
        if nix.closure.iter().all(|p| entries.contains(p)) {
            if let Ok(pid) = name.parse() {
                if harness::process_alive(pid) {
                    holders.push(pid);
                }
            }
        }
    }
    holders
}

/// The nix-daemon worker holding the closure's roots for our connection: the live child of
/// the test's nix-daemon whose roots file lists the closure.
fn worker_holding_the_closure(nix: &NixStore, daemon: &NixDaemon) -> i32 {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let workers: Vec<i32> = holders_of_the_closure(nix)
            .into_iter()
            .filter(|&pid| harness::parent_of(pid) == Some(daemon.child.id() as i32))
            .collect();
        match workers[..] {
            [worker] => return worker,
            _ if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
            _ => panic!(
                "no single nix-daemon worker holds the closure: {workers:?}, roots files {:?}",
                roots_files(nix)
            ),
        }
    }
}

/// Kills `worker` as the OOM killer would, and waits (bounded) until another live process
/// holds the closure's roots; returns it, or `None` when nobody took them again.
fn kill_worker_and_wait_for_new_roots(nix: &NixStore, worker: i32) -> Option<i32> {
    let pid = rustix::process::Pid::from_raw(worker).unwrap();
    rustix::process::kill_process(pid, Signal::KILL).expect("kill the worker");
    let deadline = Instant::now() + Duration::from_secs(10);
    while harness::process_alive(worker) {
        assert!(
            Instant::now() < deadline,
            "the worker {worker} survived SIGKILL"
        );
        thread::sleep(Duration::from_millis(10));
    }
    loop {
        let holders: Vec<i32> = holders_of_the_closure(nix)
            .into_iter()
            .filter(|&p| p != worker)
            .collect();
        if let Some(&holder) = holders.first() {
            return Some(holder);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_killed_nix_daemon_worker_is_replaced_while_mounted() {
    let nix = NixStore::new();
    let daemon = NixDaemon::start(&nix);
    let other = nix.build("other");
    let mount = nix.mount(&["-v", "--gc-roots", "daemon"]).start();
    let worker = worker_holding_the_closure(&nix, &daemon);
    let again = kill_worker_and_wait_for_new_roots(&nix, worker);
    // The killed worker's file is stale now: the collection removes it, and deletes
    // whatever only it held.
    let log = nix.gc(true);
    assert!(!other.exists(), "the garbage was kept: {log}");
    assert_served(&nix, &mount);
    let again = again.unwrap_or_else(|| {
        panic!(
            "nobody took the roots again after the worker died:\n{}",
            mount.stderr()
        )
    });
    assert_eq!(
        harness::parent_of(again),
        Some(daemon.child.id() as i32),
        "the roots are held again, by a new nix-daemon worker"
    );
    assert!(
        mount.stderr().contains("taking them again"),
        "{}",
        mount.stderr()
    );
    // And again: the new worker dies too.
    let again_again = kill_worker_and_wait_for_new_roots(&nix, again);
    nix.gc(true);
    assert_served(&nix, &mount);
    assert!(again_again.is_some(), "{}", mount.stderr());
    drop(mount);
    nix.gc(true);
    assert_eq!(
        nix.missing().len(),
        nix.closure.len(),
        "the roots outlived the mount"
    );
}

#[test]
fn a_killed_nix_daemon_worker_is_replaced_while_serving_virtio_fs() {
    use std::os::unix::net::UnixDatagram;
    // No guest: the daemon takes its roots at start, before a VMM connects.
    let nix = NixStore::new();
    let daemon = NixDaemon::start(&nix);
    let socket = nix.dir.path().join("store.sock");
    let ready = nix.dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&ready).unwrap();
    notify.set_read_timeout(Some(TIMEOUT)).unwrap();
    let log = nix.dir.path().join("nixstorefs.log");
    let mut served = ChildGuard(
        nix.nix(harness::bin("nixstorefs").to_str().unwrap())
            .args(["-f", "-v", "--gc-roots", "daemon", "--store-dir"])
            .arg(&nix.store)
            .arg("--socket-path")
            .arg(&socket)
            .arg(&nix.closure_file)
            .env("NOTIFY_SOCKET", &ready)
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .expect("start nixstorefs"),
    );
    let mut buf = [0u8; 64];
    let n = notify.recv(&mut buf).unwrap_or_else(|e| {
        panic!(
            "no READY=1 ({e}):\n{}",
            fs::read_to_string(&log).unwrap_or_default()
        )
    });
    assert_eq!(&buf[..n], b"READY=1");
    let stderr = || fs::read_to_string(&log).unwrap_or_default();

    let worker = worker_holding_the_closure(&nix, &daemon);
    let again = kill_worker_and_wait_for_new_roots(&nix, worker);
    nix.gc(true);
    assert_eq!(
        nix.missing(),
        Vec::<&PathBuf>::new(),
        "closure paths deleted under the virtio-fs daemon:\n{}",
        stderr()
    );
    // Still serving: alive, its socket there for a VMM.
    assert!(
        served.0.try_wait().unwrap().is_none(),
        "the daemon exited:\n{}",
        stderr()
    );
    assert!(socket.exists());
    assert!(again.is_some(), "{}", stderr());
    assert!(stderr().contains("taking them again"), "{}", stderr());

    signal(&served.0, Signal::TERM);
    let status = harness::wait_bounded(&mut served.0, TIMEOUT).expect("nixstorefs hung");
    assert!(status.success(), "{status}: {}", stderr());
    nix.gc(true);
    assert_eq!(
        nix.missing().len(),
        nix.closure.len(),
        "the roots outlived the daemon"
    );
}

#[test]
fn without_the_nix_daemon_the_roots_go_to_a_file() {
    let nix = NixStore::new();
    let daemon = NixDaemon::start(&nix);
    let mount = nix.mount(&["-v"]).start();
    assert!(
        mount.stderr().contains("held by the nix-daemon"),
        "{}",
        mount.stderr()
    );
    // The whole nix-daemon goes (a stop or an upgrade), its workers with it: no new
    // connection can be had, and the state directory is writable.
    drop(daemon);
    let keeper = |p: &i32| harness::parent_of(*p) == Some(mount.pid().unwrap());
    let deadline = Instant::now() + Duration::from_secs(10);
    let holder = loop {
        if let Some(holder) = holders_of_the_closure(&nix).into_iter().find(keeper) {
            break Some(holder);
        }
        if Instant::now() >= deadline {
            break None;
        }
        thread::sleep(Duration::from_millis(20));
    };
    nix.gc(false);
    assert_served(&nix, &mount);
    let holder = holder.unwrap_or_else(|| panic!("no roots file:\n{}", mount.stderr()));
    // The keeper's own file, and no other.
    assert_eq!(keeper_roots_file(&nix, mount.pid().unwrap()), holder);
    assert!(
        mount.stderr().contains("held again in"),
        "{}",
        mount.stderr()
    );
    drop(mount);
    nix.gc(false);
    assert_eq!(
        nix.missing().len(),
        nix.closure.len(),
        "the roots outlived the mount"
    );
}

#[test]
fn explicit_roots_that_cannot_be_taken_fail_with_nothing_mounted() {
    let nix = NixStore::new();
    // No daemon runs.
    let mp = harness::Mountpoint::new();
    let o = harness::run(
        Command::new(harness::bin("nixstorefs"))
            .args(["-f", "--gc-roots", "daemon", "--store-dir"])
            .arg(&nix.store)
            .arg(&nix.closure_file)
            .arg(mp.path())
            .envs(nix.env())
            .stdin(Stdio::null()),
        TIMEOUT,
    );
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&nix.daemon_socket().display().to_string()),
        "{stderr}"
    );
    assert!(!mp.is_mounted());

    let image = nix.dir.path().join("store.img");
    let o = harness::run(
        Command::new(harness::bin("mkimage"))
            .args(["--gc-roots", "daemon", "--store-dir"])
            .arg(&nix.store)
            .arg(&nix.closure_file)
            .arg(&image)
            .envs(nix.env())
            .stdin(Stdio::null()),
        TIMEOUT,
    );
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    assert!(!image.exists());
}

/// Runs `nix-store --gc` back to back until dropped.
struct CollectionLoop {
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<(usize, Vec<String>)>>,
}

impl CollectionLoop {
    fn start(nix: &NixStore) -> CollectionLoop {
        let stop = Arc::new(AtomicBool::new(false));
        let env = nix.env();
        let flag = stop.clone();
        let thread = thread::spawn(move || {
            let (mut runs, mut failures) = (0, Vec::new());
            while !flag.load(Ordering::Relaxed) {
                let mut cmd = Command::new("nix-store");
                cmd.env_remove("NIX_REMOTE")
                    .env_remove("NIX_CONFIG")
                    .envs(env.clone())
                    .arg("--gc");
                let o = harness::run(&mut cmd, TIMEOUT);
                if o.status.success() {
                    runs += 1;
                } else {
                    failures.push(String::from_utf8_lossy(&o.stderr).into_owned());
                }
            }
            (runs, failures)
        });
        CollectionLoop {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops the loop; returns how many collections completed. Collections that failed
    /// are shown: Nix 2.8 fails some that race with its own builds.
    fn finish(mut self) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        let (runs, failures) = self.thread.take().unwrap().join().expect("collection loop");
        for f in &failures {
            eprintln!("a collection failed: {}", f.trim_end());
        }
        runs
    }
}

impl Drop for CollectionLoop {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn mkimage(nix: &NixStore, image: &Path, extra: &[&str]) -> Output {
    harness::run(
        Command::new(harness::bin("mkimage"))
            .args(extra)
            .arg("--store-dir")
            .arg(&nix.store)
            .arg(&nix.closure_file)
            .arg(image)
            .envs(nix.env())
            .stdin(Stdio::null()),
        TIMEOUT,
    )
}

/// A complete image: fsck.erofs passes and the kernel's mount has every path as the host.
fn assert_complete_image(nix: &NixStore, image: &Path) {
    check(
        harness::run(Command::new("fsck.erofs").arg(image), TIMEOUT),
        "fsck.erofs",
    );
    let mounted = ImageMount::new(image);
    let expect = Expect {
        mtime: Some((0, 0)),
        links: Links::Separate,
        dir_sizes: false,
    };
    assert_tree(nix, &nix.reference, mounted.path(), expect, "the image");
}

/// A child process killed (if still running) on drop.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn signal(child: &Child, sig: Signal) {
    let pid = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
    rustix::process::kill_process(pid, sig).unwrap();
}

#[test]
fn mkimage_holds_its_roots_from_before_its_presence_check() {
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixListener;
    let nix = NixStore::new();
    let other = nix.build("other");
    // Until mkimage has taken its roots, a permanent root keeps the closure.
    let top = nix
        .closure
        .iter()
        .find(|p| p.to_string_lossy().ends_with("-gc-top"))
        .unwrap();
    let hold = nix.state.join("gcroots/test-hold");
    std::os::unix::fs::symlink(top, &hold).unwrap();

    // Stand in for a collection in progress: gc.lock held, new roots taken on its socket.
    let gc_lock = fs::File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(nix.state.join("gc.lock"))
        .unwrap();
    rustix::fs::flock(&gc_lock, rustix::fs::FlockOperation::LockExclusive).unwrap();
    let socket = nix.state.join("gc-socket/socket");
    fs::create_dir_all(socket.parent().unwrap()).unwrap();
    let _ = fs::remove_file(&socket);
    let listener = UnixListener::bind(&socket).unwrap();
    listener.set_nonblocking(true).unwrap();

    let image = nix.dir.path().join("store.img");
    let mut mkimage = ChildGuard(
        Command::new(harness::bin("mkimage"))
            .args(["-q", "--gc-roots", "local", "--store-dir"])
            .arg(&nix.store)
            .arg(&nix.closure_file)
            .arg(&image)
            .envs(nix.env())
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start mkimage"),
    );
    let deadline = Instant::now() + TIMEOUT;
    let conn = loop {
        match listener.accept() {
            Ok((conn, _)) => break conn,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(
                    Instant::now() < deadline,
                    "mkimage never announced its roots"
                );
                thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("accept: {e}"),
        }
    };
    conn.set_nonblocking(false).unwrap();
    conn.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut writer = conn;
    let mut announced = Vec::new();
    for i in 0..nix.closure.len() {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        announced.push(PathBuf::from(line.trim_end()));
        if i + 1 == nix.closure.len() {
            // Stopped while it waits for the last answer: its presence check is still to
            // come, and its roots are all it has to keep the closure.
            signal(&mkimage.0, Signal::STOP);
        }
        writer.write_all(b"1").unwrap();
    }
    announced.sort();
    let mut expected = nix.closure.clone();
    expected.sort();
    assert_eq!(announced, expected);
    // The stand-in collection ends; a real one runs with only mkimage's roots in the way.
    drop((reader, writer, listener));
    let _ = fs::remove_file(&socket);
    drop(gc_lock);
    fs::remove_file(&hold).unwrap();
    let log = nix.gc(false);
    assert!(!other.exists(), "the garbage was kept: {log}");
    assert_eq!(
        nix.missing(),
        Vec::<&PathBuf>::new(),
        "deleted under mkimage: {log}"
    );

    signal(&mkimage.0, Signal::CONT);
    let status = harness::wait_bounded(&mut mkimage.0, TIMEOUT).expect("mkimage hung");
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut mkimage.0.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(status.success(), "mkimage failed ({status}): {stderr}");
    assert_complete_image(&nix, &image);
    // mkimage is gone, and its roots with it.
    nix.gc(false);
    assert_eq!(nix.missing().len(), nix.closure.len());
}

#[test]
fn mkimage_during_collections_writes_whole_images_or_fails_cleanly() {
    // As on a host where the closure is not otherwise rooted and a collection can start
    // at any time: each attempt builds the closure afresh and must give a whole image, or
    // fail naming what is missing with nothing written.
    let nix = NixStore::new();
    let collections = CollectionLoop::start(&nix);
    let (mut whole, mut failed) = (0, 0);
    for i in 0..8 {
        // Nix 2.8's own builds can lose their derivations to a concurrent collection
        // ("is not a valid store path"); that is Nix's race, not ours: try again.
        let built = (0..5).any(|_| nix.try_build("top").status.success());
        assert!(built, "nix-build failed 5 times during collections");
        let image = nix.dir.path().join(format!("store-{i}.img"));
        let o = mkimage(&nix, &image, &["-q"]);
        if o.status.success() {
            assert_complete_image(&nix, &image);
            whole += 1;
        } else {
            let stderr = String::from_utf8_lossy(&o.stderr);
            assert_eq!(o.status.code(), Some(2), "{stderr}");
            assert!(stderr.contains("missing from"), "{stderr}");
            assert!(!image.exists(), "a failed mkimage left {}", image.display());
            failed += 1;
        }
    }
    let runs = collections.finish();
    eprintln!("{whole} whole images, {failed} clean failures, {runs} collections");
    assert!(runs > 0);
}

#[test]
fn mkimage_without_roots_during_collections_never_leaves_a_partial_image() {
    let nix = NixStore::new();
    let collections = CollectionLoop::start(&nix);
    let image = nix.dir.path().join("store.img");
    let mut failures = 0;
    let mut runs = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    // Until the collector has deleted the unrooted paths under mkimage at least once.
    while runs < 5 || (failures == 0 && Instant::now() < deadline) {
        runs += 1;
        let o = mkimage(&nix, &image, &["-q", "--gc-roots", "off"]);
        if o.status.success() {
            assert_complete_image(&nix, &image);
            fs::remove_file(&image).unwrap();
        } else {
            failures += 1;
            let stderr = String::from_utf8_lossy(&o.stderr);
            assert!(
                stderr.contains(&nix.store.display().to_string()),
                "an error that names nothing: {stderr}"
            );
            assert!(!image.exists(), "a failed mkimage left {}", image.display());
        }
    }
    let collected = collections.finish();
    eprintln!("{runs} runs without roots, {failures} clean failures, {collected} collections");
    // Once the collector has run, the unrooted paths are gone: the later runs fail.
    assert!(
        failures > 0,
        "{runs} runs and no collection ever deleted the closure"
    );
}

#[test]
fn sample_store_is_not_rooted() {
    // A store directory that is not Nix's gets no roots, silently, even with a Nix
    // installation in the environment.
    let nix = NixStore::new();
    let (_dir, sample) =
        nixstorefs_tests::sample::temp(&nixstorefs_tests::sample::SampleOptions::small());
    let mut b = Mount::builder(&sample.store_dir, &sample.closure_file);
    for (k, v) in nix.env() {
        b = b.env(k, v);
    }
    let mount = b.start();
    assert_eq!(roots_files(&nix), Vec::<String>::new());
    assert!(
        !mount.stderr().contains("WARN"),
        "a warning for a non-Nix store: {}",
        mount.stderr()
    );
}

/// The roots follow the served set: a closure added by `nixstorefs update` is rooted
/// while served (a collection keeps it), and once replaced away and released its roots go
/// (the next collection deletes it) while the new closure's stay.
#[test]
fn roots_follow_live_updates() {
    let nix = NixStore::new();
    let other = nix.build("other");
    let control = nix.dir.path().join("control.sock");
    let mount = nix
        .mount(&["--control-socket", control.to_str().unwrap(), "-v"])
        .start();
    keeper_roots_file(&nix, mount.pid().unwrap());
    let other_closure = nix.dir.path().join("other.txt");
    fs::write(&other_closure, format!("{}\n", other.display())).unwrap();
    let update = |args: &[&std::ffi::OsStr]| {
        let o = harness::run(
            Command::new(harness::bin("nixstorefs"))
                .arg("update")
                .arg("--control-socket")
                .arg(&control)
                .args(args)
                .envs(nix.env())
                .stdin(Stdio::null()),
            TIMEOUT,
        );
        check(o, "nixstorefs update")
    };
    update(&["--add".as_ref(), other_closure.as_os_str()]);
    let log = nix.gc(false);
    assert!(other.exists(), "an added path was collected: {log}");
    assert_eq!(
        nix.missing(),
        Vec::<&PathBuf>::new(),
        "closure paths deleted"
    );
    assert_eq!(
        fs::read_to_string(mount.mountpoint().join(other.file_name().unwrap())).unwrap(),
        "other\n"
    );
    // Replaced away: the kernel's cached entry of it retires it until the daemon had the
    // kernel drop it (nothing uses it); then it leaves, and its root with it.
    let o = update(&[nix.closure_file.as_os_str()]);
    let summary = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(summary.contains("1 retiring"), "{summary}");
    let deadline = Instant::now() + TIMEOUT;
    while !String::from_utf8_lossy(&update(&[nix.closure_file.as_os_str()]).stdout)
        .contains("0 retiring paths still held")
    {
        assert!(
            Instant::now() < deadline,
            "the retiring path was never released"
        );
        thread::sleep(Duration::from_millis(100));
    }
    let log = nix.gc(false);
    assert!(
        !other.exists(),
        "a path no longer served kept its root: {log}"
    );
    assert_served(&nix, &mount);
}
