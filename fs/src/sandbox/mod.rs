//! The daemon's sandbox: what it may still do once it serves a client.
//!
//! Everything that needs the wider world (reading the closure, opening the store directory,
//! registering garbage collector roots, creating and accepting the socket or obtaining
//! `/dev/fuse`, detaching) is done first; then [`enter`] takes the rest away, for good and
//! without privilege:
//!
//! * `PR_SET_NO_NEW_PRIVS`, so nothing the process could still execute gains privileges
//!   (and so that Landlock and seccomp need none);
//! * capabilities: none for the virtio-fs backend, even when started as root; the FUSE
//!   daemon keeps `CAP_SYS_ADMIN` only, which registering a passthrough file needs;
//! * `RLIMIT_NOFILE` lowered (soft and hard) to a bound computed from the daemon's own
//!   caches, so a bug in a cache cannot turn into unbounded descriptors;
//! * Landlock ([`landlock`](self::landlock)): reads beneath the store directory only, no
//!   TCP, no abstract Unix sockets or signals outside the process, on whatever ABI the
//!   running kernel offers (reported at startup);
//! * seccomp ([`seccomp`]): an allow-list of system calls, with argument checks where a
//!   call is harmless only in one form (`openat` read-only, `accept4` on the listener,
//!   `clone` of threads); anything else kills the process.
//!
//! Inherited descriptors are closed before any of this, at startup ([`close_inherited`]):
//! the daemon opens everything it uses itself.
//!
//! Landlock restricts the calling thread and the threads it starts afterwards, so [`enter`]
//! must run while the process has one thread; it refuses otherwise. seccomp's filter is
//! synchronised to every thread regardless.

pub mod helper;
pub mod landlock;
pub mod seccomp;

use std::os::fd::RawFd;
use std::path::PathBuf;

/// How much of the sandbox to enter (`--sandbox`, in virtiofsd's words).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SandboxMode {
    /// No new privileges, capabilities dropped, descriptor limit lowered, and Landlock
    /// confining file access to reads beneath the store directory (as far as the running
    /// kernel's Landlock ABI goes).
    Landlock,
    /// None of it: the daemon runs with every right of the user who started it.
    None,
}

/// What the system call filter does with a call outside its allow-list (`--seccomp`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SeccompMode {
    /// Kill the process.
    Kill,
    /// Allow the call and log it to the kernel's audit log (to find what a new kernel or
    /// library needs).
    Log,
    /// No filter.
    None,
}

/// Which transport the daemon serves: it decides the system calls and capabilities kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Profile {
    /// A guest over vhost-user: no capabilities, no descriptor opened for writing.
    VirtioFs,
    /// A host mount over `/dev/fuse`: `/dev/fuse` clones and passthrough registration.
    Fuse,
}

/// Everything [`enter`] needs to know.
#[derive(Clone, Debug)]
pub struct Plan {
    /// How much of the sandbox.
    pub mode: SandboxMode,
    /// The system call filter's action.
    pub seccomp: SeccompMode,
    /// The transport served.
    pub profile: Profile,
    /// The store directory: the only tree the daemon may read.
    pub store_dir: PathBuf,
    /// The most descriptors the daemon may hold at once.
    pub max_fds: u64,
    /// The listening socket the VMM connects through, the only one `accept4` may take.
    pub listener: Option<RawFd>,
}

/// What was entered, for the startup log line and for tests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entered {
    /// The Landlock ABI in force (0: none, the kernel lacks it or the mode is `none`).
    pub landlock_abi: i32,
    /// Whether every restriction asked of Landlock is enforced by the running kernel.
    pub landlock_complete: bool,
    /// The seccomp action installed.
    pub seccomp: SeccompMode,
    /// The descriptor limit set.
    pub max_fds: Option<u64>,
}

/// A step of the sandbox that failed: the daemon must not serve without it.
#[derive(Debug)]
pub struct SandboxError {
    /// What was being done.
    pub step: &'static str,
    /// The cause.
    pub cause: String,
}

impl std::fmt::Display for SandboxError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "cannot enter the sandbox: {}: {}", self.step, self.cause)
    }
}

impl std::error::Error for SandboxError {}

fn failed(step: &'static str, cause: impl std::fmt::Display) -> SandboxError {
    SandboxError {
        step,
        cause: cause.to_string(),
    }
}

/// Enters the sandbox `plan` describes. Must be called while the process has a single
/// thread (Landlock restricts the calling thread and those it starts later).
pub fn enter(plan: &Plan) -> Result<Entered, SandboxError> {
    let mut entered = Entered {
        landlock_abi: 0,
        landlock_complete: false,
        seccomp: SeccompMode::None,
        max_fds: None,
    };
    if plan.mode == SandboxMode::None && plan.seccomp == SeccompMode::None {
        return Ok(entered);
    }
    let threads = thread_count().map_err(|e| failed("counting threads", e))?;
    if threads != 1 {
        return Err(failed(
            "checking the process",
            format!("it has {threads} threads; the sandbox must be entered with one"),
        ));
    }
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(failed(
            "PR_SET_NO_NEW_PRIVS",
            std::io::Error::last_os_error(),
        ));
    }
    if plan.mode == SandboxMode::Landlock {
        drop_capabilities(plan.profile).map_err(|e| failed("dropping capabilities", e))?;
        set_fd_limit(plan.max_fds).map_err(|e| failed("lowering RLIMIT_NOFILE", e))?;
        entered.max_fds = Some(plan.max_fds);
        let status =
            landlock::restrict(&plan.store_dir, plan.profile).map_err(|e| failed("Landlock", e))?;
        entered.landlock_abi = status.abi;
        entered.landlock_complete = status.complete;
    }
    if plan.seccomp != SeccompMode::None {
        seccomp::install(plan.profile, plan.seccomp, plan.listener)
            .map_err(|e| failed("seccomp", e))?;
        entered.seccomp = plan.seccomp;
    }
    Ok(entered)
}

/// Closes every descriptor above standard error except `keep`: the daemon opens what it
/// uses itself, and a descriptor inherited by accident (a terminal, another program's
/// socket or lock) must not stay reachable from a compromised daemon. Called at startup,
/// before anything is opened.
pub fn close_inherited(keep: &[RawFd]) -> std::io::Result<()> {
    let mut open = Vec::new();
    for entry in std::fs::read_dir("/proc/self/fd")? {
        let name = entry?.file_name();
        if let Some(fd) = name.to_str().and_then(|s| s.parse::<RawFd>().ok()) {
            open.push(fd);
        }
    }
    // The listing's own descriptor is closed by now, and is not in `open` any more as an
    // open descriptor; closing its number again fails harmlessly with EBADF.
    for fd in open {
        if fd > 2 && !keep.contains(&fd) {
            // SAFETY: closing a descriptor number this process owns and no Rust object
            // refers to: nothing has been opened by the daemon yet.
            unsafe { libc::close(fd) };
        }
    }
    Ok(())
}

/// The number of threads of this process.
fn thread_count() -> std::io::Result<usize> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| std::io::Error::other("no Threads: line in /proc/self/status"))
}

/// Lowers the descriptor limit, soft and hard, to `max` (never raises it).
fn set_fd_limit(max: u64) -> std::io::Result<()> {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let current = getrlimit(Resource::Nofile);
    let bound = |v: Option<u64>| Some(v.map_or(max, |v| v.min(max)));
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: bound(current.current),
            maximum: bound(current.maximum),
        },
    )
    .map_err(Into::into)
}

/// `CAP_SYS_ADMIN`'s number (linux/capability.h).
const CAP_SYS_ADMIN: libc::c_int = 21;

/// Drops every capability (the virtio-fs backend), or all but `CAP_SYS_ADMIN` (the FUSE
/// daemon, for passthrough): from the bounding set where the process may change it, then
/// from the effective, permitted, inheritable and ambient sets.
fn drop_capabilities(profile: Profile) -> std::io::Result<()> {
    use rustix::thread::{
        capabilities, clear_ambient_capability_set, set_capabilities, CapabilitySet, CapabilitySets,
    };
    let (keep, keep_number) = match profile {
        Profile::VirtioFs => (CapabilitySet::empty(), None),
        Profile::Fuse => (CapabilitySet::SYS_ADMIN, Some(CAP_SYS_ADMIN)),
    };
    let now = capabilities(None)?;
    if now.effective.contains(CapabilitySet::SETPCAP) {
        // Capability numbers up to the kernel's last one; past it the call fails with
        // EINVAL, which ends the loop.
        for cap in 0..64 {
            if Some(cap) == keep_number {
                continue;
            }
            // SAFETY: prctl with integer arguments only.
            if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) } != 0 {
                break;
            }
        }
    }
    clear_ambient_capability_set()?;
    set_capabilities(
        None,
        CapabilitySets {
            effective: now.effective & keep,
            permitted: now.permitted & keep,
            inheritable: CapabilitySet::empty(),
        },
    )?;
    Ok(())
}

/// The `--sandbox` and `--seccomp` options.
#[derive(clap::Args, Debug, Clone)]
pub struct SandboxOptions {
    /// Confine the daemon once it serves: `landlock` (no new privileges, no capabilities,
    /// a bounded descriptor limit, reads beneath the store directory only, no TCP) or
    /// `none`. Needs no privilege.
    #[arg(long, value_enum, default_value_t = SandboxMode::Landlock, value_name = "MODE")]
    pub sandbox: SandboxMode,

    /// The system call filter: `kill` the daemon on any call outside its allow-list, only
    /// `log` such calls to the audit log, or `none`.
    #[arg(long, value_enum, default_value_t = SeccompMode::Kill, value_name = "ACTION")]
    pub seccomp: SeccompMode,
}
