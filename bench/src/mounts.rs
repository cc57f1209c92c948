//! The mounts the benchmark makes (nixstorefs, bindfs, bind-mount farms), timed where that
//! is the point, and the guarantee that none outlives it: guards unmount on drop, and a
//! signal thread tears everything down on Ctrl-C.

use std::ffi::CString;
use std::fs::{self, File};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use nixstorefs_tests::harness;

/// How long any one mount may take to come up.
pub const MOUNT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a daemon gets to exit once unmounted.
const EXIT_TIMEOUT: Duration = Duration::from_secs(10);

/// Mountpoints that may hold a mount, and children to kill, for the signal thread.
#[derive(Default)]
struct Registry {
    stopping: bool,
    mountpoints: Vec<PathBuf>,
    children: Vec<i32>,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry {
    stopping: false,
    mountpoints: Vec::new(),
    children: Vec::new(),
});

fn registry() -> std::sync::MutexGuard<'static, Registry> {
    // A panic while holding it must not stop the cleanup.
    REGISTRY.lock().unwrap_or_else(|e| e.into_inner())
}

/// The directory holding this run's mountpoints and temporary files.
fn run_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("nixstorefs-bench.{}", std::process::id()));
        fs::create_dir_all(d.join("tmp")).expect("create the directory for mountpoints");
        d
    })
}

/// Points TMPDIR into the run directory, so that what helpers (the VM's sockets and logs)
/// leave behind when Ctrl-C cuts them short goes with it. Call before any thread starts.
pub fn redirect_tmpdir() {
    let tmp = run_dir().join("tmp");
    std::env::set_var("TMPDIR", tmp);
}

/// A fresh, registered, empty directory to mount on.
pub fn new_mountpoint() -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let p = run_dir().join(format!("m{}", NEXT.fetch_add(1, Ordering::Relaxed)));
    loop {
        let mut r = registry();
        if !r.stopping {
            fs::create_dir(&p).expect("create a mountpoint");
            r.mountpoints.push(p.clone());
            break;
        }
        drop(r);
        // The signal thread is tearing down and will exit the process; do not race it.
        std::thread::sleep(Duration::from_secs(1));
    }
    p
}

fn release_mountpoint(p: &Path) {
    let _ = fs::remove_dir(p);
    registry().mountpoints.retain(|m| m != p);
}

/// Aborts, kills and detaches whatever is at `mp`: for error paths and Ctrl-C, where a
/// clean unmount may hang.
fn tear_down(mp: &Path) {
    let pids = harness::pids_with_arg(mp.as_os_str());
    if let Some(m) = harness::mount_at(mp) {
        if m.fstype.starts_with("fuse") && m.major == 0 {
            let _ = harness::abort_connection(m.minor);
        }
    }
    for p in &pids {
        // SAFETY: kill has no memory effects.
        unsafe { libc::kill(*p, libc::SIGKILL) };
    }
    harness::force_unmount(mp);
}

/// Unmounts and removes everything still registered; safe to call more than once.
pub fn cleanup_all() {
    let (mps, kids) = {
        let mut r = registry();
        (
            std::mem::take(&mut r.mountpoints),
            std::mem::take(&mut r.children),
        )
    };
    for k in kids {
        // SAFETY: as above.
        unsafe { libc::kill(k, libc::SIGKILL) };
    }
    for mp in mps {
        if harness::is_mounted(&mp) {
            eprintln!("bench: cleaning up the mount at {}", mp.display());
        }
        tear_down(&mp);
        let _ = fs::remove_dir(&mp);
        let _ = fs::remove_file(mp.with_extension("log"));
    }
    let tmp = run_dir().join("tmp");
    // Only when nothing is mounted below it: a recursive removal must not enter a mount.
    if !harness::mounts()
        .iter()
        .any(|m| m.mountpoint.starts_with(run_dir()))
    {
        let _ = fs::remove_dir_all(&tmp);
    }
    let _ = fs::remove_dir(run_dir());
}

/// Blocks SIGINT, SIGTERM and SIGHUP in this thread and every thread started after, and
/// starts a thread that, on any of them, cleans up and exits. Call first thing in main.
pub fn install_signal_thread() {
    // SAFETY: plain signal-set manipulation on local storage.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };
    std::thread::spawn(move || {
        let mut sig = 0;
        // SAFETY: `set` is a valid signal set; sigwait only writes `sig`.
        unsafe { libc::sigwait(&set, &mut sig) };
        eprintln!("\nbench: signal {sig}: unmounting everything and exiting");
        registry().stopping = true;
        cleanup_all();
        std::process::exit(130);
    });
}

fn pidfd_open(pid: i32) -> Option<i32> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    (fd >= 0).then_some(fd as i32)
}

/// Waits until `pid` exits, for at most `timeout`; true if it did. Exact, unlike polling,
/// so it can end a timed interval.
fn wait_pid_exit(pid: i32, timeout: Duration) -> bool {
    let Some(fd) = pidfd_open(pid) else {
        // Already gone (ESRCH), or no pidfd: fall back to polling.
        let end = Instant::now() + timeout;
        while harness::process_alive(pid) {
            if Instant::now() >= end {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        return true;
    };
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let end = Instant::now() + timeout;
    let ready = loop {
        let left = end.saturating_duration_since(Instant::now());
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, left.as_millis().min(i32::MAX as u128) as i32) };
        if n > 0 {
            break true;
        }
        if n == 0 || io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            break false;
        }
    };
    // SAFETY: fd is ours.
    unsafe { libc::close(fd) };
    ready
}

/// Waits for our child for at most `timeout`; kills it past that.
pub fn wait_child(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    if wait_pid_exit(child.id() as i32, timeout) {
        child.wait().ok()
    } else {
        let _ = child.kill();
        let _ = child.wait();
        None
    }
}

/// Runs `cmd` (output inherited) to completion, killing it past `timeout`.
pub fn status_within(cmd: &mut Command, timeout: Duration) -> Result<ExitStatus, String> {
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    wait_child(&mut child, timeout)
        .ok_or_else(|| format!("{cmd:?} did not finish within {timeout:?} and was killed"))
}

/// A FUSE mount whose daemon detached; unmounted (forcibly if need be) on drop.
pub struct FuseMount {
    path: PathBuf,
    pids: Vec<i32>,
    what: &'static str,
    log: PathBuf,
    done: bool,
}

impl FuseMount {
    /// Runs `nixstorefs [extra] --store-dir STORE CLOSURE MNT` and returns once it exits 0
    /// with the mount live, with the time that took.
    pub fn nixstorefs(
        bin: &Path,
        store: &Path,
        closure: &Path,
        extra: &[&str],
    ) -> Result<(FuseMount, Duration), String> {
        let mut cmd = Command::new(bin);
        cmd.args(extra).arg("--store-dir").arg(store).arg(closure);
        FuseMount::start("nixstorefs", cmd)
    }

    /// Mounts `src` read-only with bindfs, in its default (single-threaded) mode.
    pub fn bindfs(src: &Path) -> Result<FuseMount, String> {
        let mut cmd = Command::new("bindfs");
        cmd.args(["-r", "--no-allow-other"]).arg(src);
        FuseMount::start("bindfs", cmd).map(|(m, _)| m)
    }

    fn start(what: &'static str, mut cmd: Command) -> Result<(FuseMount, Duration), String> {
        let path = new_mountpoint();
        let log = path.with_extension("log");
        let out = File::create(&log).map_err(|e| format!("create {}: {e}", log.display()))?;
        let err = out.try_clone().map_err(|e| e.to_string())?;
        cmd.arg(&path).stdin(Stdio::null()).stdout(out).stderr(err);
        let mut m = FuseMount {
            path,
            pids: Vec::new(),
            what,
            log,
            done: false,
        };
        let t = Instant::now();
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {what}: {e}"))?;
        let status = wait_child(&mut child, MOUNT_TIMEOUT);
        let took = t.elapsed();
        m.pids = harness::pids_with_arg(m.path.as_os_str());
        match status {
            Some(s) if s.success() => {}
            Some(s) => return Err(format!("{what} failed ({s}): {}", m.log_text())),
            None => {
                return Err(format!(
                    "{what} did not return within {MOUNT_TIMEOUT:?}: {}",
                    m.log_text()
                ))
            }
        }
        if !harness::is_mounted(&m.path) {
            return Err(format!("{what} exited 0 but nothing is mounted"));
        }
        Ok((m, took))
    }

    fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The serving process (the detached daemon).
    pub fn pid(&self) -> Option<i32> {
        self.pids.first().copied()
    }

    /// Unmounts and waits for the daemon to exit.
    pub fn unmount(mut self) -> Result<(), String> {
        self.done = true;
        let mut tries = 0;
        let res = loop {
            match rustix::mount::unmount(&self.path, rustix::mount::UnmountFlags::empty()) {
                Ok(()) => break Ok(()),
                // Something (a walk's last close) may still be finishing.
                Err(rustix::io::Errno::BUSY) if tries < 50 => {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => {
                    break Err(format!(
                        "unmount {} ({}): {e}",
                        self.path.display(),
                        self.what
                    ))
                }
            }
        };
        if res.is_err() {
            tear_down(&self.path);
        }
        for &p in &self.pids {
            if !wait_pid_exit(p, EXIT_TIMEOUT) {
                // SAFETY: as above.
                unsafe { libc::kill(p, libc::SIGKILL) };
                return Err(format!("{} did not exit after unmount; killed", self.what));
            }
        }
        res
    }
}

impl Drop for FuseMount {
    fn drop(&mut self) {
        if !self.done {
            tear_down(&self.path);
        }
        release_mountpoint(&self.path);
        let _ = fs::remove_file(&self.log);
    }
}

fn cstring(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("paths have no NUL")
}

/// Builds a farm of bind mounts, one per source, in a private mount namespace of a forked
/// child, and returns how long that took, as timed by the child; the namespace, and with it
/// every mount, dies with the child.
pub fn bind_farm(sources: &[PathBuf]) -> Result<Duration, String> {
    let root = new_mountpoint();
    let res = bind_farm_at(&root, sources);
    release_mountpoint(&root);
    res
}

fn bind_farm_at(root: &Path, sources: &[PathBuf]) -> Result<Duration, String> {
    // Everything the child touches is allocated before the fork: after it only syscalls.
    let root_c = cstring(root);
    let pairs: Vec<(CString, CString)> = sources
        .iter()
        .map(|s| {
            (
                cstring(s),
                cstring(&root.join(s.file_name().expect("a store path"))),
            )
        })
        .collect();
    let mut fds = [0; 2];
    // SAFETY: fds has room for two descriptors.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(format!("pipe: {}", io::Error::last_os_error()));
    }
    let (rd, wr) = (fds[0], fds[1]);
    // SAFETY: the child only makes async-signal-safe calls on memory prepared above and
    // leaves with _exit.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        unsafe { farm_child(wr, &root_c, &pairs) }
    }
    // SAFETY: closing our copy of the write end.
    unsafe { libc::close(wr) };
    if pid < 0 {
        unsafe { libc::close(rd) };
        return Err(format!("fork: {}", io::Error::last_os_error()));
    }
    registry().children.push(pid);
    let mut report = [0u8; 13];
    let got = read_report(rd, &mut report, MOUNT_TIMEOUT);
    // SAFETY: rd is ours.
    unsafe { libc::close(rd) };
    if !wait_pid_exit(pid, MOUNT_TIMEOUT) {
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    let mut status = 0;
    // SAFETY: reaping our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    registry().children.retain(|&c| c != pid);
    if got != report.len() {
        return Err("the bind-farm child died without reporting".into());
    }
    let nanos = u64::from_le_bytes(report[1..9].try_into().unwrap());
    let errno = i32::from_le_bytes(report[9..13].try_into().unwrap());
    match report[0] {
        0 => Ok(Duration::from_nanos(nanos)),
        step => Err(format!(
            "bind farm failed at step {step}: {}",
            io::Error::from_raw_os_error(errno)
        )),
    }
}

/// The forked child: time the farm, report `[step, nanos, errno]`, exit.
unsafe fn farm_child(wr: i32, root: &CString, pairs: &[(CString, CString)]) -> ! {
    let mut t0: libc::timespec = std::mem::zeroed();
    let mut t1: libc::timespec = std::mem::zeroed();
    libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t0);
    let null: *const libc::c_char = std::ptr::null();
    let no_data: *const libc::c_void = std::ptr::null();
    let mut step = 0u8;
    if libc::unshare(libc::CLONE_NEWNS) != 0 {
        step = 1;
    } else if libc::mount(
        null,
        c"/".as_ptr(),
        null,
        libc::MS_REC | libc::MS_PRIVATE,
        no_data,
    ) != 0
    {
        step = 2;
    } else if libc::mount(
        c"tmpfs".as_ptr(),
        root.as_ptr(),
        c"tmpfs".as_ptr(),
        0,
        no_data,
    ) != 0
    {
        step = 3;
    } else {
        for (src, dst) in pairs {
            if libc::mkdir(dst.as_ptr(), 0o755) != 0 {
                step = 4;
                break;
            }
            if libc::mount(src.as_ptr(), dst.as_ptr(), null, libc::MS_BIND, no_data) != 0 {
                step = 5;
                break;
            }
        }
    }
    let errno = if step == 0 {
        0
    } else {
        *libc::__errno_location()
    };
    libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t1);
    let nanos = (t1.tv_sec - t0.tv_sec) as i64 * 1_000_000_000 + (t1.tv_nsec - t0.tv_nsec) as i64;
    let mut report = [0u8; 13];
    report[0] = step;
    report[1..9].copy_from_slice(&(nanos as u64).to_le_bytes());
    report[9..13].copy_from_slice(&errno.to_le_bytes());
    libc::write(wr, report.as_ptr().cast(), report.len());
    libc::_exit(0)
}

/// Reads up to `buf.len()` bytes from `fd` within `timeout`; how many arrived.
fn read_report(fd: i32, buf: &mut [u8], timeout: Duration) -> usize {
    let end = Instant::now() + timeout;
    let mut got = 0;
    while got < buf.len() {
        let left = end.saturating_duration_since(Instant::now());
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd; reads into the unfilled part of buf.
        let n = unsafe { libc::poll(&mut pfd, 1, left.as_millis() as i32) };
        if n <= 0 {
            if n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            break;
        }
        let r = unsafe { libc::read(fd, buf[got..].as_mut_ptr().cast(), buf.len() - got) };
        if r <= 0 {
            break;
        }
        got += r as usize;
    }
    got
}
