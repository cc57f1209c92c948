//! Helpers for end-to-end tests of the real binaries: finding them, running them with a
//! time limit, and mounting with a guard that always cleans up.
//!
//! Nothing here may hang a test run: every wait is bounded, and every [`Mount`] has a
//! watchdog that tears the mount down if the test holding it outlives its deadline.

use std::ffi::{OsStr, OsString};
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Condvar, Mutex, Once};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// How long a mount may take to appear.
pub const MOUNT_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a daemon gets to exit after SIGTERM before it is killed.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// Default lifetime of a [`Mount`] before its watchdog tears it down.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(120);
/// Environment variable with extra whitespace-separated arguments for every [`Mount`].
pub const EXTRA_ARGS_ENV: &str = "NIXSTOREFS_TEST_ARGS";

/// Set to `dev-fuse`, `io-uring` or `auto`, every mount the harness starts is served that
/// way (`--fuse-transport`), unless the test chose a transport itself: how the whole mount
/// suite runs over both transports (scripts/test.sh).
pub const FUSE_TRANSPORT_ENV: &str = "NIXSTOREFS_TEST_FUSE_TRANSPORT";

/// The `fuse` module's switch for FUSE over io_uring (Linux 6.14 and later).
pub const ENABLE_URING: &str = "/sys/module/fuse/parameters/enable_uring";

/// Whether the kernel offers FUSE over io_uring to new mounts now.
pub fn uring_enabled() -> bool {
    fs::read_to_string(ENABLE_URING).is_ok_and(|v| v.trim() == "Y")
}

/// Says why a test cannot run on this machine, for a test that then returns. Under CI
/// (`CI=true`, as `.ci/run` runs) it fails instead: CI installs and turns on everything
/// the tests need, so a skip there is a missing setup step, not a pass.
pub fn skip(reason: &str) {
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("cannot run under CI: {reason}");
    }
    eprintln!("skipped: {reason}");
}

/// The transport the run asks every mount for, if any ([`FUSE_TRANSPORT_ENV`]).
pub fn forced_transport() -> Option<String> {
    std::env::var(FUSE_TRANSPORT_ENV)
        .ok()
        .filter(|v| !v.trim().is_empty())
}

/// Path of the workspace binary `name`.
///
/// Taken from `NIXSTOREFS_BIN_DIR` when set, else from the target directory this test
/// executable was built in. Panics if the binary is not there, since a test that cannot
/// run the binary must not pass.
pub fn bin(name: &str) -> PathBuf {
    let dir = match std::env::var_os("NIXSTOREFS_BIN_DIR") {
        Some(d) => PathBuf::from(d),
        None => {
            let exe = std::env::current_exe().expect("cannot find the test executable");
            let parent = exe.parent().expect("the test executable has no directory");
            // Test executables live in target/<profile>/deps, binaries one level up.
            if parent.file_name() == Some(OsStr::new("deps")) {
                parent.parent().unwrap().to_path_buf()
            } else {
                parent.to_path_buf()
            }
        }
    };
    let path = dir.join(name);
    if !path.is_file() {
        panic!(
            "binary {} not found: build it first (`cargo build -p {name}`), \
             or point NIXSTOREFS_BIN_DIR at the directory holding it",
            path.display()
        );
    }
    path
}

/// Panics unless FUSE can be used here: these tests never skip silently.
pub fn require_fuse() {
    use std::os::unix::fs::FileTypeExt;
    match fs::metadata("/dev/fuse") {
        Ok(m) if m.file_type().is_char_device() => {}
        Ok(_) => panic!("/dev/fuse is not a character device: FUSE tests cannot run"),
        Err(e) => panic!(
            "/dev/fuse is missing ({e}): FUSE tests need the fuse module \
             (modprobe fuse) and a /dev/fuse device"
        ),
    }
}

/// Where a missing test tool comes from: one script installs them all.
pub const INSTALL_HINT: &str = "scripts/install-deps.sh installs every tool the tests need";

/// The executable `name` from `$PATH`, which Debian's `package` provides. Panics, saying
/// what to install, when it is missing: a test whose tool is missing fails, it never
/// passes by doing nothing.
pub fn tool(name: &str, package: &str) -> PathBuf {
    crate::vm::which(name).unwrap_or_else(|| {
        panic!("{name} is not in PATH: apt-get install {package} ({INSTALL_HINT})")
    })
}

/// Runs `cmd` to completion with stdout and stderr captured, killing it and panicking
/// if it outlives `timeout`.
pub fn run(cmd: &mut Command, timeout: Duration) -> Output {
    match run_bounded(cmd, timeout) {
        Ok(out) => out,
        Err(RunError::Spawn(e)) if e.kind() == io::ErrorKind::NotFound => panic!(
            "cannot run {:?}: it is not installed ({INSTALL_HINT})",
            cmd.get_program()
        ),
        Err(RunError::Spawn(e)) => panic!("cannot run {cmd:?}: {e}"),
        Err(RunError::Timeout(out)) => panic!(
            "{cmd:?} did not finish within {timeout:?} and was killed\nstdout:\n{}\nstderr:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// Why [`run_bounded`] gave up.
#[derive(Debug)]
pub enum RunError {
    /// The command could not be started.
    Spawn(io::Error),
    /// The command was killed at the deadline; what it printed until then.
    Timeout(Output),
}

/// Like [`run`], but reports a timeout instead of panicking (for use in `Drop`).
pub fn run_bounded(cmd: &mut Command, timeout: Duration) -> Result<Output, RunError> {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(RunError::Spawn)?;
    let stdout = collect(child.stdout.take());
    let stderr = collect(child.stderr.take());
    let status = wait_bounded(&mut child, timeout);
    let timed_out = status.is_none();
    let status = status.unwrap_or_else(|| {
        let _ = child.kill();
        child.wait().expect("wait for a killed child")
    });
    // A daemonising child leaves the pipes open in its grandchild: take what is there.
    let out = Output {
        status,
        stdout: stdout.finish(),
        stderr: stderr.finish(),
    };
    if timed_out {
        Err(RunError::Timeout(out))
    } else {
        Ok(out)
    }
}

struct Collector {
    buf: Arc<Mutex<Vec<u8>>>,
    thread: Option<JoinHandle<()>>,
}

impl Collector {
    fn finish(self) -> Vec<u8> {
        if let Some(t) = self.thread {
            let deadline = Instant::now() + Duration::from_secs(1);
            while !t.is_finished() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(5));
            }
        }
        self.buf.lock().unwrap().clone()
    }
}

fn collect<R: Read + Send + 'static>(pipe: Option<R>) -> Collector {
    let buf = Arc::new(Mutex::new(Vec::new()));
    let thread = pipe.map(|mut pipe| {
        let buf = buf.clone();
        thread::spawn(move || {
            let mut chunk = [0u8; 8192];
            while let Ok(n) = pipe.read(&mut chunk) {
                if n == 0 {
                    break;
                }
                buf.lock().unwrap().extend_from_slice(&chunk[..n]);
            }
        })
    });
    Collector { buf, thread }
}

/// Waits for `child` for at most `timeout`; `None` if it is still running.
pub fn wait_bounded(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(s)) => return Some(s),
            Ok(None) => {}
            Err(e) => panic!("waiting for child {}: {e}", child.id()),
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// One line of `/proc/self/mountinfo`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountInfo {
    /// Major number of the mounted filesystem's device.
    pub major: u32,
    /// Minor number; for FUSE, the name of the connection under /sys/fs/fuse/connections.
    pub minor: u32,
    /// Where it is mounted.
    pub mountpoint: PathBuf,
    /// Per-mount options (`ro`, `nosuid`, ...).
    pub mount_options: Vec<String>,
    /// Filesystem type, e.g. `fuse.nixstorefs`.
    pub fstype: String,
    /// Mount source.
    pub source: String,
    /// Superblock options.
    pub super_options: Vec<String>,
}

/// The mounts of this process's namespace, in mount order.
pub fn mounts() -> Vec<MountInfo> {
    mountinfo::read()
        .expect("read /proc/self/mountinfo")
        .into_iter()
        .map(|m| MountInfo {
            major: m.major,
            minor: m.minor,
            source: m.source_lossy(),
            mountpoint: m.mount_point,
            mount_options: m.mount_options,
            fstype: m.fs_type,
            super_options: m.super_options,
        })
        .collect()
}

/// The topmost mount at exactly `path`, if any.
pub fn mount_at(path: &Path) -> Option<MountInfo> {
    mounts().into_iter().rev().find(|m| m.mountpoint == path)
}

/// Whether something is mounted at exactly `path`.
pub fn is_mounted(path: &Path) -> bool {
    mount_at(path).is_some()
}

const FUSECTL: &str = "/sys/fs/fuse/connections";

/// Mounts fusectl if it is not, so that the watchdog can abort hung connections.
fn ensure_fusectl() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if !mounts().iter().any(|m| m.fstype == "fusectl") {
            let _ = rustix::mount::mount(
                "fusectl",
                FUSECTL,
                "fusectl",
                rustix::mount::MountFlags::empty(),
                None,
            );
        }
    });
}

/// Aborts the FUSE connection with minor number `minor`: every pending and future request
/// fails with ENOTCONN, which unsticks anything blocked on the daemon.
pub fn abort_connection(minor: u32) -> io::Result<()> {
    fs::write(format!("{FUSECTL}/{minor}/abort"), b"1")
}

/// Unmounts whatever is at `path`, lazily, trying `fusermount3 -u -z`, then `umount -l`,
/// then umount2(MNT_DETACH). Never blocks for long; returns whether it is gone.
pub fn force_unmount(path: &Path) -> bool {
    if !is_mounted(path) {
        return true;
    }
    let short = Duration::from_secs(5);
    let _ = run_bounded(
        Command::new("fusermount3")
            .arg("-u")
            .arg("-z")
            .arg(path)
            .stdin(Stdio::null()),
        short,
    );
    if is_mounted(path) {
        let _ = run_bounded(
            Command::new("umount")
                .arg("-l")
                .arg(path)
                .stdin(Stdio::null()),
            short,
        );
    }
    while is_mounted(path) {
        if rustix::mount::unmount(path, rustix::mount::UnmountFlags::DETACH).is_err() {
            break;
        }
    }
    !is_mounted(path)
}

/// A fresh empty directory under the temp dir to mount on; on drop, anything still mounted
/// there is aborted and lazily unmounted, and the directory removed.
#[derive(Debug)]
pub struct Mountpoint {
    path: PathBuf,
}

impl Mountpoint {
    /// Creates a new mountpoint directory.
    pub fn new() -> Mountpoint {
        let dir = tempfile::Builder::new()
            .prefix("nixstorefs-mnt.")
            .tempdir()
            .expect("create a mountpoint directory");
        // Removed by hand: remove_dir_all on a live mount could walk into it.
        let kept = dir.keep();
        // mountinfo shows resolved paths; a symlinked TMPDIR must still compare equal.
        let path = kept.canonicalize().unwrap_or(kept);
        Mountpoint { path }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether something is mounted on it.
    pub fn is_mounted(&self) -> bool {
        is_mounted(&self.path)
    }

    /// Aborts the FUSE connection mounted here (if it is one) and unmounts lazily.
    pub fn tear_down(&self) -> bool {
        if let Some(m) = mount_at(&self.path) {
            if m.fstype.starts_with("fuse") && m.major == 0 {
                let _ = abort_connection(m.minor);
            }
        }
        force_unmount(&self.path)
    }
}

impl Default for Mountpoint {
    fn default() -> Self {
        Mountpoint::new()
    }
}

impl Drop for Mountpoint {
    fn drop(&mut self) {
        if self.is_mounted() {
            eprintln!(
                "harness: {} was still mounted; tearing it down",
                self.path.display()
            );
            self.tear_down();
        }
        let _ = fs::remove_dir(&self.path);
    }
}

/// Pids of processes (other than this one) with `arg` among their command-line arguments,
/// leaving out the children of such a process: a sandboxed daemon forks helpers (its
/// unmounter, its clean-up process) that share its command line and end with it.
pub fn pids_with_arg(arg: &OsStr) -> Vec<i32> {
    let me = std::process::id() as i32;
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let found: Vec<(i32, i32)> = dir
        .filter_map(|e| {
            let e = e.ok()?;
            let pid: i32 = e.file_name().to_str()?.parse().ok()?;
            if pid == me {
                return None;
            }
            let cmdline = fs::read(e.path().join("cmdline")).ok()?;
            cmdline
                .split(|&b| b == 0)
                .any(|a| a == arg.as_bytes())
                .then(|| (pid, parent_of(pid).unwrap_or(0)))
        })
        .collect();
    found
        .iter()
        .filter(|(_, parent)| !found.iter().any(|(p, _)| p == parent))
        .map(|(pid, _)| *pid)
        .collect()
}

/// The parent of `pid`, from /proc.
pub fn parent_of(pid: i32) -> Option<i32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the parenthesised command name: state, then the parent's pid.
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// Bytes process `pid` has read with read-like system calls so far (`rchar`), to tell
/// whether file data went through the daemon's own reads.
pub fn rchar(pid: Option<i32>) -> Option<u64> {
    let text = fs::read_to_string(format!("/proc/{}/io", pid?)).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("rchar:"))
        .and_then(|v| v.trim().parse().ok())
}

/// Whether `pid` exists and is not a zombie.
pub fn process_alive(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name, which may itself hold ')'.
        Ok(stat) => stat
            .rsplit_once(')')
            .map(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X']))
            .unwrap_or(false),
        Err(_) => false,
    }
}

fn signal(pid: i32, sig: rustix::process::Signal) {
    if let Some(p) = rustix::process::Pid::from_raw(pid) {
        let _ = rustix::process::kill_process(p, sig);
    }
}

/// Sends SIGTERM to `pids` (not children of ours), waits up to `timeout` for them to go,
/// then SIGKILLs the rest. Returns whether all went away after SIGTERM alone.
pub fn stop_pids(pids: &[i32], timeout: Duration) -> bool {
    use rustix::process::Signal;
    for &p in pids {
        signal(p, Signal::TERM);
    }
    let deadline = Instant::now() + timeout;
    while pids.iter().any(|&p| process_alive(p)) {
        if Instant::now() >= deadline {
            for &p in pids {
                signal(p, Signal::KILL);
            }
            return false;
        }
        thread::sleep(Duration::from_millis(10));
    }
    true
}

struct Watchdog {
    state: Arc<(Mutex<bool>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

/// What the watchdog needs to tear a mount down from its own thread.
#[derive(Default)]
struct Target {
    pids: Vec<i32>,
    minor: Option<u32>,
}

impl Watchdog {
    fn start(deadline: Duration, mnt: PathBuf, target: Arc<Mutex<Target>>) -> Watchdog {
        let state = Arc::new((Mutex::new(false), Condvar::new()));
        let st = state.clone();
        let thread = thread::spawn(move || {
            let (lock, cv) = &*st;
            let done = lock.lock().unwrap();
            let (done, res) = cv
                .wait_timeout_while(done, deadline, |done| !*done)
                .unwrap();
            if *done || !res.timed_out() {
                return;
            }
            drop(done);
            eprintln!(
                "harness: watchdog: the mount at {} outlived its {deadline:?} deadline; \
                 aborting the connection, killing the daemon, unmounting",
                mnt.display()
            );
            let t = target.lock().unwrap();
            if let Some(minor) = t.minor {
                let _ = abort_connection(minor);
            }
            for &p in &t.pids {
                signal(p, rustix::process::Signal::KILL);
            }
            force_unmount(&mnt);
        });
        Watchdog {
            state,
            thread: Some(thread),
        }
    }

    fn cancel(&mut self) {
        let (lock, cv) = &*self.state;
        *lock.lock().unwrap() = true;
        cv.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// How to start a [`Mount`]; see [`Mount::builder`].
#[derive(Debug)]
pub struct MountBuilder {
    store: PathBuf,
    closure: OsString,
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    nofile: Option<u64>,
    stdin: Option<Vec<u8>>,
    foreground: bool,
    deadline: Duration,
}

impl MountBuilder {
    /// An environment variable for the daemon.
    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.env
            .push((key.as_ref().to_os_string(), value.as_ref().to_os_string()));
        self
    }

    /// Extra command-line arguments, placed before the closure and mountpoint.
    pub fn args<I: IntoIterator<Item = S>, S: AsRef<OsStr>>(mut self, args: I) -> Self {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_os_string()));
        self
    }

    /// Caps the daemon's descriptors (soft and hard RLIMIT_NOFILE) at `n`.
    pub fn limit_descriptors(mut self, n: u64) -> Self {
        self.nofile = Some(n);
        self
    }

    /// Bytes to feed on the daemon's stdin (for the closure `-`).
    pub fn stdin(mut self, data: impl Into<Vec<u8>>) -> Self {
        self.stdin = Some(data.into());
        self
    }

    /// Runs without `-f`: the command must detach and exit 0 with the mount live.
    pub fn daemon(mut self) -> Self {
        self.foreground = false;
        self
    }

    /// Sets how long the mount may live before the watchdog tears it down.
    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.deadline = deadline;
        self
    }

    /// Starts nixstorefs and waits until the mount is live; panics, with the daemon's
    /// stderr, if it does not come up.
    pub fn start(self) -> Mount {
        require_fuse();
        ensure_fusectl();
        let exe = bin("nixstorefs");
        let mp = Mountpoint::new();
        let log = tempfile::Builder::new()
            .prefix("nixstorefs-log.")
            .tempfile()
            .expect("create the daemon's log file");
        let stdin = match &self.stdin {
            Some(data) => {
                let mut f = tempfile::tempfile().expect("create a stdin file");
                f.write_all(data).expect("write the stdin file");
                use std::io::Seek;
                f.rewind().expect("rewind the stdin file");
                Stdio::from(f)
            }
            None => Stdio::null(),
        };
        let mut cmd = Command::new(&exe);
        if self.foreground {
            cmd.arg("-f");
        }
        cmd.arg("--store-dir")
            .arg(&self.store)
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        // Lets a whole run use e.g. `-vv` or `--no-passthrough` without editing tests.
        if let Some(extra) = std::env::var_os(EXTRA_ARGS_ENV) {
            cmd.args(extra.to_string_lossy().split_whitespace());
        }
        let chosen = self
            .args
            .iter()
            .any(|a| a.to_string_lossy().starts_with("--fuse-transport"));
        if let (Some(transport), false) = (forced_transport(), chosen) {
            cmd.arg("--fuse-transport").arg(transport.trim());
        }
        cmd.arg(&self.closure)
            .arg(mp.path())
            .stdin(stdin)
            .stdout(log.reopen().expect("reopen the log"))
            .stderr(log.reopen().expect("reopen the log"));
        if let Some(n) = self.nofile {
            use std::os::unix::process::CommandExt;
            let limit = rustix::process::Rlimit {
                current: Some(n),
                maximum: Some(n),
            };
            // SAFETY: setrlimit is async-signal-safe; nothing else runs in the child.
            unsafe {
                cmd.pre_exec(move || {
                    rustix::process::setrlimit(rustix::process::Resource::Nofile, limit)
                        .map_err(io::Error::from)
                });
            }
        }
        let command = format!("{cmd:?}");
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", exe.display()));
        let target = Arc::new(Mutex::new(Target {
            pids: vec![child.id() as i32],
            minor: None,
        }));
        let watchdog = Watchdog::start(self.deadline, mp.path().to_path_buf(), target.clone());
        let mut mount = Mount {
            child: Some(child),
            watchdog,
            target,
            log,
            command,
            foreground: self.foreground,
            mp,
        };
        if self.foreground {
            mount.wait_foreground();
        } else {
            mount.wait_daemon();
        }
        let info = mount_at(mount.mountpoint()).expect("the mount vanished");
        mount.target.lock().unwrap().minor = Some(info.minor);
        mount
    }
}

/// A live nixstorefs mount; dropping it stops the daemon and unmounts, whatever happened.
pub struct Mount {
    child: Option<Child>,
    watchdog: Watchdog,
    target: Arc<Mutex<Target>>,
    log: tempfile::NamedTempFile,
    command: String,
    foreground: bool,
    mp: Mountpoint,
}

impl Mount {
    /// A builder for `nixstorefs --store-dir STORE ... CLOSURE <fresh mountpoint>`,
    /// in the foreground (`-f`) unless told otherwise.
    pub fn builder(store: &Path, closure: impl AsRef<OsStr>) -> MountBuilder {
        MountBuilder {
            store: store.to_path_buf(),
            closure: closure.as_ref().to_os_string(),
            args: Vec::new(),
            env: Vec::new(),
            nofile: None,
            stdin: None,
            foreground: true,
            deadline: DEFAULT_DEADLINE,
        }
    }

    /// Mounts `closure` of `store` with `nixstorefs -f` and waits for the mount.
    pub fn foreground(store: &Path, closure: impl AsRef<OsStr>, extra_args: &[&str]) -> Mount {
        Mount::builder(store, closure).args(extra_args).start()
    }

    /// Mounts with `nixstorefs` in daemon mode: it must exit 0 with the mount live.
    pub fn daemon(store: &Path, closure: impl AsRef<OsStr>, extra_args: &[&str]) -> Mount {
        Mount::builder(store, closure)
            .args(extra_args)
            .daemon()
            .start()
    }

    fn wait_foreground(&mut self) {
        let deadline = Instant::now() + MOUNT_TIMEOUT;
        loop {
            if self.is_mounted() {
                return;
            }
            let child = self.child.as_mut().unwrap();
            if let Some(status) = child.try_wait().expect("wait for nixstorefs") {
                panic!(
                    "nixstorefs exited ({status}) before mounting\ncommand: {}\nstderr:\n{}",
                    self.command,
                    self.stderr()
                );
            }
            if Instant::now() >= deadline {
                panic!(
                    "nixstorefs did not mount within {MOUNT_TIMEOUT:?}\ncommand: {}\nstderr:\n{}",
                    self.command,
                    self.stderr()
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    fn wait_daemon(&mut self) {
        let child = self.child.as_mut().unwrap();
        let status = wait_bounded(child, MOUNT_TIMEOUT);
        // Whatever happens next, the detached daemon must be found to be cleaned up.
        let pids = pids_with_arg(self.mp.path().as_os_str());
        self.target.lock().unwrap().pids = pids;
        match status {
            None => panic!(
                "nixstorefs (daemon mode) did not exit within {MOUNT_TIMEOUT:?}\n\
                 command: {}\nstderr:\n{}",
                self.command,
                self.stderr()
            ),
            Some(s) if !s.success() => panic!(
                "nixstorefs (daemon mode) failed: {s}\ncommand: {}\nstderr:\n{}",
                self.command,
                self.stderr()
            ),
            Some(_) => {}
        }
        self.child = None;
        if !self.is_mounted() {
            panic!(
                "nixstorefs (daemon mode) exited 0 but {} is not mounted\ncommand: {}\nstderr:\n{}",
                self.mp.path().display(),
                self.command,
                self.stderr()
            );
        }
    }

    /// The mountpoint.
    pub fn mountpoint(&self) -> &Path {
        self.mp.path()
    }

    /// Whether the mount is (still) live.
    pub fn is_mounted(&self) -> bool {
        self.mp.is_mounted()
    }

    /// The mount's line in mountinfo, if it is live.
    pub fn info(&self) -> Option<MountInfo> {
        mount_at(self.mp.path())
    }

    /// Everything the daemon wrote to stdout and stderr so far.
    pub fn stderr(&self) -> String {
        fs::read(self.log.path())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Pid of the foreground child.
    pub fn pid(&self) -> Option<i32> {
        self.child.as_ref().map(|c| c.id() as i32)
    }

    /// Pids of the detached daemon (daemon mode), found by its mountpoint argument.
    pub fn daemon_pids(&self) -> Vec<i32> {
        if self.foreground {
            Vec::new()
        } else {
            self.target.lock().unwrap().pids.clone()
        }
    }

    /// Sends `sig` to the foreground daemon and waits (bounded) for its exit status.
    /// Panics, after killing it, if it does not exit within [`STOP_TIMEOUT`] times two.
    pub fn signal_and_wait(&mut self, sig: rustix::process::Signal) -> ExitStatus {
        let child = self
            .child
            .as_mut()
            .expect("signal_and_wait needs a foreground daemon that is still ours");
        signal(child.id() as i32, sig);
        match wait_bounded(child, STOP_TIMEOUT * 2) {
            Some(s) => {
                self.child = None;
                s
            }
            None => {
                let _ = child.kill();
                let _ = child.wait();
                self.child = None;
                panic!(
                    "nixstorefs did not exit within {:?} of {sig:?}\nstderr:\n{}",
                    STOP_TIMEOUT * 2,
                    self.stderr()
                );
            }
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        self.watchdog.cancel();
        if let Some(mut child) = self.child.take() {
            signal(child.id() as i32, rustix::process::Signal::TERM);
            if wait_bounded(&mut child, STOP_TIMEOUT).is_none() {
                eprintln!("harness: nixstorefs ignored SIGTERM for {STOP_TIMEOUT:?}; killing it");
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        if !self.foreground {
            let pids: Vec<i32> = self
                .target
                .lock()
                .unwrap()
                .pids
                .iter()
                .copied()
                .filter(|&p| process_alive(p))
                .collect();
            if !pids.is_empty() && !stop_pids(&pids, STOP_TIMEOUT) {
                eprintln!("harness: the nixstorefs daemon ignored SIGTERM; killed it");
            }
        }
        if self.mp.is_mounted() {
            self.mp.tear_down();
        }
        if thread::panicking() {
            eprintln!(
                "harness: nixstorefs output ({}):\n{}",
                self.command,
                self.stderr()
            );
        }
    }
}

/// An erofs image mounted read-only by the kernel, unmounted (lazily, if need be) on drop.
#[derive(Debug)]
pub struct ImageMount {
    mountpoint: Mountpoint,
}

impl ImageMount {
    /// Mounts `image`: file-backed where the kernel can (6.12 and later), else through a
    /// loop device. Panics with mount's message when neither works.
    pub fn new(image: &Path) -> ImageMount {
        let mountpoint = Mountpoint::new();
        let mut errors = Vec::new();
        for options in ["ro", "ro,loop"] {
            let out = run(
                Command::new("mount")
                    .args(["-t", "erofs", "-o", options])
                    .arg(image)
                    .arg(mountpoint.path()),
                Duration::from_secs(30),
            );
            if out.status.success() {
                return ImageMount { mountpoint };
            }
            errors.push(format!(
                "-o {options}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        panic!(
            "the kernel does not mount {} as erofs: {}",
            image.display(),
            errors.join("; ")
        );
    }

    /// Where the image is mounted.
    pub fn path(&self) -> &Path {
        self.mountpoint.path()
    }
}

impl Drop for ImageMount {
    fn drop(&mut self) {
        let _ = run_bounded(
            Command::new("umount").arg(self.mountpoint.path()),
            Duration::from_secs(30),
        );
        // Mountpoint's own drop detaches whatever is still there.
    }
}
