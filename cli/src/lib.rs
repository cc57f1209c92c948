//! What the command-line tools built on the closure view share: the closure options, exit
//! statuses, logging and signal handling, so that `nixstorefs` and `mkimage` take and
//! report alike. Process plumbing lives here, not in the `nixstorefs` library: the
//! library is the view, the session and the transports, for any program to serve.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use nixstorefs::closure::Closure;
use nixstorefs::gc_roots::{GcRootsMode, TempRoots};

/// A failure and the exit status it maps to: 2 for bad input, 1 for the rest.
#[derive(Debug)]
pub struct Failure {
    /// The process's exit status.
    pub status: u8,
    /// What to print.
    pub message: String,
}

impl Failure {
    /// Bad input (malformed closure, missing paths, bad options): exit status 2.
    pub fn input(message: impl Into<String>) -> Self {
        Failure {
            status: 2,
            message: message.into(),
        }
    }

    /// Anything else that went wrong: exit status 1.
    pub fn runtime(message: impl Into<String>) -> Self {
        Failure {
            status: 1,
            message: message.into(),
        }
    }
}

/// Where the closure's store paths live, for both tools.
#[derive(clap::Args, Debug, Clone)]
pub struct ClosureOptions {
    /// The host store directory; the closure's paths must be directly below it.
    #[arg(
        long,
        env = "NIX_STORE_DIR",
        default_value = "/nix/store",
        value_name = "DIR"
    )]
    pub store_dir: PathBuf,

    /// Leave out closure paths that are missing from the store, with a warning, instead of
    /// refusing them.
    #[arg(long)]
    pub allow_missing: bool,

    /// Hold the closure's paths as Nix temporary roots while they are in use, so that a
    /// garbage collection cannot delete them: through the nix-daemon, or with the
    /// temporary roots file in the Nix state directory (NIX_STATE_DIR). `auto` takes the
    /// daemon if one answers, else the state directory if it is writable, else nothing.
    #[arg(long, value_enum, default_value_t = GcRootsMode::Auto, value_name = "MODE")]
    pub gc_roots: GcRootsMode,
}

/// Reads and validates the closure `input` against `store_dir` (made absolute).
pub fn load_closure(input: &Path, store_dir: &Path) -> Result<Closure, Failure> {
    let store_dir = std::path::absolute(store_dir)
        .map_err(|e| Failure::input(format!("store directory {}: {e}", store_dir.display())))?;
    Closure::load(input, &store_dir).map_err(|e| Failure::input(e.to_string()))
}

/// Holds the closure's paths as temporary roots as `mode` says. To be called before the
/// paths' presence is checked; failing is a runtime failure (exit status 1).
pub fn hold_roots(mode: GcRootsMode, closure: &Closure) -> Result<TempRoots, Failure> {
    TempRoots::hold(mode, &closure.store_dir, &closure.paths)
        .map_err(|e| Failure::runtime(e.to_string()))
}

/// The log file's descriptor, once [`init_logging`] opened one.
static LOG_FD: std::sync::OnceLock<std::os::fd::RawFd> = std::sync::OnceLock::new();

/// The descriptor of the log file [`init_logging`] opened, if any: a process forked to
/// work beside the daemon (the roots keeper) keeps it open to log there too.
pub fn log_fd() -> Option<std::os::fd::RawFd> {
    LOG_FD.get().copied()
}

/// Logs through tracing to stderr, or appended to `log_file`: `-v` info, `-vv` debug,
/// `-vvv` trace, warnings otherwise; RUST_LOG overrides.
pub fn init_logging(verbose: u8, log_file: Option<&Path>) -> Result<(), Failure> {
    use tracing_subscriber::EnvFilter;
    let default = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match log_file {
        Some(path) => {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| {
                    Failure::input(format!("cannot open log file {}: {e}", path.display()))
                })?;
            let _ = LOG_FD.set(std::os::fd::AsRawFd::as_raw_fd(&file));
            builder.with_ansi(false).with_writer(Arc::new(file)).init();
        }
        // Colours only for a terminal: logs captured to a file or a journal stay plain.
        None => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_writer(std::io::stderr)
            .init(),
    }
    Ok(())
}

/// Blocks SIGINT, SIGTERM and SIGHUP in the calling thread and every thread it starts after
/// this, and returns a waiter for them: the signals are taken by one thread with `sigwait`
/// instead of interrupting request threads.
pub fn block_signals() -> SignalWaiter {
    // SAFETY: plain sigset manipulation on a local set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, sig);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        SignalWaiter { set }
    }
}

/// Waits for the signals blocked by [`block_signals`].
pub struct SignalWaiter {
    set: libc::sigset_t,
}

// SAFETY: a sigset_t is plain data.
unsafe impl Send for SignalWaiter {}

impl SignalWaiter {
    /// Waits for the next blocked signal and returns its number.
    pub fn wait(&self) -> i32 {
        let mut sig = 0;
        // SAFETY: `set` is a valid signal set and `sig` a valid out pointer.
        unsafe { libc::sigwait(&self.set, &mut sig) };
        sig
    }
}
