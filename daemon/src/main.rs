//! `nixstorefs`: serves exactly one Nix closure of the host store, read-only: as a FUSE
//! mount, or to a guest as a vhost-user virtio-fs device.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use nixstorefs_cli::{hold_roots, init_logging, load_closure, ClosureOptions, Failure};
mod control;
mod daemon;
mod options;

use nixstorefs::gc_roots::TempRoots;
use nixstorefs::sandbox::{self, Profile, SandboxMode, SandboxOptions, SeccompMode};
use nixstorefs::session::SessionLimits;
use nixstorefs::transport::fuse::{FuseOptions, StoreFs};
use nixstorefs::transport::fuse_uring::{self, FuseTransport};
use nixstorefs::transport::virtiofs;
use nixstorefs::view::{Change, Missing, Removal, View, ViewError, ViewOptions};
use options::MountOptions;
use parking_lot::Mutex;

const EXAMPLES: &str = "\
Examples:
  # The closure of the running system, for a guest:
  nix-store -qR $(readlink -f /run/current-system) > closure.txt
  nixstorefs closure.txt /mnt/store

  # A closureInfo output, from a store somewhere else, staying in the foreground:
  nixstorefs -f --store-dir /srv/store/nix/store /nix/store/...-closure-info /mnt/store

  # From standard input, readable by other users (for virtiofsd):
  nix-store -qR ./result | nixstorefs -o allow_other - /mnt/store

  # Unmount:
  fusermount3 -u /mnt/store

  # Straight to a guest, as an ordinary user, with no host mount (qemu connects to the
  # socket: -chardev socket,id=store,path=$XDG_RUNTIME_DIR/store.sock
  #   -device vhost-user-fs-pci,chardev=store,tag=nix-store
  #   -object memory-backend-memfd,id=mem,size=2G,share=on -numa node,memdev=mem):
  nixstorefs --socket-path $XDG_RUNTIME_DIR/store.sock closure.txt

  # /etc/fstab:
  /etc/closure.txt /mnt/store fuse.nixstorefs allow_other,store_dir=/nix/store 0 0

  # A running guest's new system: serve its closure instead (the guest sees it at once;
  # paths it still uses stay until released):
  nix-store -qR $(nix-build -A system) > closure.txt
  nixstorefs update --socket-path $XDG_RUNTIME_DIR/store.sock closure.txt
  # or re-read the closure file given at startup:
  kill -HUP $(cat $XDG_RUNTIME_DIR/store.sock.pid)

Exit status: 0 once the mount or socket is live (detached), or when the guest disconnects
or a signal ends the daemon (-f); 2 for bad input (a malformed closure, closure paths
missing from the store, bad options); 1 when mounting, listening or serving fails (a socket
path that is someone else's, guest memory not shared with the daemon), when the sandbox
cannot be entered, or when the garbage collector roots asked for (--gc-roots daemon|local)
cannot be taken.";

/// Presents exactly one Nix closure of the host's store, read-only: as a FUSE mount, or
/// to one guest as a vhost-user virtio-fs device (--socket-path, --fd).
#[derive(Parser, Debug)]
#[command(version, after_help = EXAMPLES)]
#[command(group(clap::ArgGroup::new("guest").args(["socket_path", "fd"])))]
#[command(subcommand_negates_reqs = true, args_conflicts_with_subcommands = true)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,

    /// The closure: a store-paths list (`nix-store -qR`), a closureInfo output directory, a
    /// registration (`nix-store --dump-db`), or `-` for standard input. (A file named
    /// `update` is given as `./update`.) SIGHUP makes the daemon read it again and serve
    /// it instead, as `nixstorefs update` does.
    #[arg(required = true)]
    closure: Option<PathBuf>,

    /// The closure file made absolute at startup, before the daemon moves to `/`: what
    /// SIGHUP reads again (`None` for standard input).
    #[arg(skip)]
    reload_from: Option<PathBuf>,

    /// Where to mount the view (not with --socket-path or --fd).
    mountpoint: Option<PathBuf>,

    /// Serve the view to a guest as a vhost-user virtio-fs device on this Unix socket,
    /// instead of mounting it: no FUSE, no privileges. The socket exists once the daemon
    /// is ready, and is removed when it exits; the guest disconnecting ends the daemon.
    #[arg(long, value_name = "SOCKET", conflicts_with = "mountpoint")]
    socket_path: Option<PathBuf>,

    /// Like --socket-path, on a listening Unix socket inherited as descriptor N.
    #[arg(long, value_name = "N", conflicts_with_all = ["mountpoint", "socket_path"])]
    fd: Option<i32>,

    /// Listen for `nixstorefs update` on this Unix socket (owner only). With
    /// --socket-path S it defaults to S.control; a mount has none unless given.
    #[arg(long, value_name = "SOCKET")]
    control_socket: Option<PathBuf>,

    /// Make the socket readable and writable by this group too (name or number); without
    /// it only the daemon's user may connect.
    #[arg(long, value_name = "GROUP", requires = "socket_path")]
    socket_group: Option<String>,

    /// The file system name the device reports to guests, for VMMs that ask the device for
    /// it (qemu's vhost-user-fs-pci takes its own tag= instead).
    #[arg(long, value_name = "TAG", requires = "guest")]
    tag: Option<String>,

    #[command(flatten)]
    closure_options: ClosureOptions,

    #[command(flatten)]
    sandbox: SandboxOptions,

    /// Stay in the foreground instead of detaching once the mount or socket is live.
    #[arg(short, long)]
    foreground: bool,

    /// Mount options, comma-separated: allow_other, allow_root, auto_unmount, fsname=NAME,
    /// ro, nosuid, suid, exec, noexec, noatime, no_default_permissions (default_permissions,
    /// the kernel checking modes, is on by default; dev is refused), and store_dir=DIR,
    /// allow_missing, no_passthrough, gc_roots=MODE, fuse_transport=MODE (the flags of the
    /// same name).
    #[arg(short = 'o', value_name = "OPT[,OPT...]")]
    options: Vec<String>,

    /// Serve reads through the daemon instead of handing files to the kernel (FUSE
    /// passthrough, used by default when the kernel offers it and the daemon may use it).
    #[arg(long)]
    no_passthrough: bool,

    /// How the kernel's requests reach the daemon: `io-uring` takes them from one ring
    /// per CPU, each served by a thread on that CPU (Linux 6.14 or later, with FUSE over
    /// io_uring enabled by root: echo Y > /sys/module/fuse/parameters/enable_uring);
    /// `dev-fuse` reads them from /dev/fuse; `auto` uses io_uring when the kernel offers
    /// it and /dev/fuse otherwise. `io-uring` fails to start without it.
    #[arg(long, value_enum, default_value_t = FuseTransport::Auto, value_name = "TRANSPORT")]
    fuse_transport: FuseTransport,

    /// For tests: ring queue N refuses to register, as if it could not be set up.
    #[arg(long, hide = true, value_name = "N")]
    test_uring_refuse_queue: Option<u16>,

    /// Request threads reading /dev/fuse.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=256))]
    threads: u16,

    /// Directory descriptors to keep open at most (1 to 65536: each is a descriptor the
    /// daemon holds).
    #[arg(long, default_value_t = 512, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..=65536))]
    max_cached_dirs: u32,

    /// Nodes the kernel has forgotten to remember at most, so that file handles of a
    /// re-exporting server (virtiofsd, NFS) keep working; older handles get ESTALE. About
    /// 300 bytes each.
    #[arg(long, default_value_t = ViewOptions::default().max_forgotten_nodes, value_name = "N")]
    max_forgotten_nodes: usize,

    /// Serve what is mounted below closure paths (a bind mount, a tmpfs). Off by default:
    /// such mounts are not part of the closure, and a name that is a mount point is not
    /// found.
    #[arg(long)]
    cross_mounts: bool,

    /// Append logs to this file (a detached daemon otherwise has nowhere to log).
    #[arg(long, value_name = "FILE")]
    log_file: Option<PathBuf>,

    /// More logging (-v info, -vv debug, -vvv trace); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count)]
    verbose: u8,
}

/// Commands aimed at a running daemon.
#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Changes what a running daemon serves, without a restart: the closure's paths
    /// replace the served ones (or join them, --add). The closure is read and checked in
    /// full first; a bad one is refused and nothing changes. Paths the new closure lacks
    /// leave the root at once, and stay usable (and rooted) for what the guest still holds
    /// until it lets go, or go at once with --prune.
    Update(UpdateArgs),
}

/// `nixstorefs update`.
#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("daemon").args(["socket_path", "control_socket"]).required(true)))]
struct UpdateArgs {
    /// The closure to serve: the same forms as at startup, `-` included.
    closure: PathBuf,

    /// The daemon serving a guest on this vhost-user socket (its control socket is
    /// SOCKET.control).
    #[arg(long, value_name = "SOCKET")]
    socket_path: Option<PathBuf>,

    /// The daemon listening on this control socket (--control-socket at its start).
    #[arg(long, value_name = "SOCKET")]
    control_socket: Option<PathBuf>,

    /// Add the closure's paths to the served ones instead of replacing them.
    #[arg(long, conflicts_with = "prune")]
    add: bool,

    /// Paths the new closure lacks go at once, even those the guest still uses (its open
    /// files stay readable until closed).
    #[arg(long)]
    prune: bool,
}

/// The control socket of the daemon serving `socket`.
fn control_socket_of(socket: &Path) -> PathBuf {
    let mut path = socket.as_os_str().to_owned();
    path.push(".control");
    PathBuf::from(path)
}

/// `nixstorefs update`: exit status 0 once the daemon serves the closure, 2 when it is
/// refused as bad input (nothing changed), 1 when the daemon cannot be reached.
fn update(args: &UpdateArgs) -> ExitCode {
    let control = match (&args.control_socket, &args.socket_path) {
        (Some(control), _) => control.clone(),
        (None, Some(socket)) => control_socket_of(socket),
        (None, None) => unreachable!("clap requires one of them"),
    };
    let change = match (args.add, args.prune) {
        (true, _) => Change::Add,
        (false, false) => Change::Replace(Removal::WhenReleased),
        (false, true) => Change::Replace(Removal::Now),
    };
    match control::request_update(&control, &args.closure, change) {
        control::Answer::Done(summary) => {
            println!("{summary}");
            ExitCode::SUCCESS
        }
        control::Answer::Refused(status, message) => {
            eprintln!("nixstorefs: {message}");
            ExitCode::from(status)
        }
    }
}

/// Everything that can be checked before mounting: bad input fails here, with nothing
/// mounted. The closure's paths are held as garbage collector roots from before their
/// presence is checked until the returned roots are dropped.
fn prepare(
    args: &Args,
    mode: &Mode,
    opts: &mut MountOptions,
) -> Result<(View, TempRoots), Failure> {
    let store_dir = opts
        .store_dir
        .clone()
        .unwrap_or_else(|| args.closure_options.store_dir.clone());
    let closure = load_closure(closure_arg(args), &store_dir)?;
    let store_dir = closure.store_dir.clone();
    match mode {
        Mode::Mount(mountpoint) => {
            let meta = std::fs::metadata(mountpoint)
                .map_err(|e| Failure::input(format!("mountpoint {}: {e}", mountpoint.display())))?;
            if !meta.is_dir() {
                return Err(Failure::input(format!(
                    "mountpoint {} is not a directory",
                    mountpoint.display()
                )));
            }
        }
        Mode::Socket(socket) => check_socket_dir(socket)?,
        Mode::Fd(_) => {}
    }
    let allow_missing = args.closure_options.allow_missing || opts.allow_missing;
    let roots = hold_roots(
        opts.gc_roots.unwrap_or(args.closure_options.gc_roots),
        &closure,
    )?;
    let (view, setup) = View::new(
        &closure,
        allow_missing,
        ViewOptions {
            max_cached_dirs: args.max_cached_dirs as usize,
            max_forgotten_nodes: args.max_forgotten_nodes,
            cross_mounts: args.cross_mounts,
        },
    )
    .map_err(|e| match e {
        ViewError::Stat { .. } | ViewError::Proc { .. } => Failure::runtime(e.to_string()),
        _ => Failure::input(e.to_string()),
    })?;
    if !setup.missing.is_empty() {
        let names: Vec<&str> = setup
            .missing
            .iter()
            .take(5)
            .map(|p| p.base_name())
            .collect();
        tracing::warn!(
            "leaving out {} closure path(s) missing from {}: {}{}",
            setup.missing.len(),
            store_dir.display(),
            names.join(", "),
            if setup.missing.len() > 5 { ", ..." } else { "" }
        );
    }
    // The source column of the mount table: the closure file, when it fits an option.
    let origin = closure.origin.as_str();
    let fsname = if origin.contains([',', ' ', '\t', '\n', '\\']) || origin.is_empty() {
        "nixstorefs"
    } else {
        origin
    };
    opts.finish(fsname);
    tracing::info!(
        paths = view.path_count(),
        store = %store_dir.display(),
        "closure loaded from {}",
        closure.origin
    );
    Ok((view, roots))
}

/// The closure argument (required unless a command is given).
fn closure_arg(args: &Args) -> &Path {
    args.closure.as_deref().expect("clap requires the closure")
}

/// Fails early, before anything is served, when the socket's directory is missing.
fn check_socket_dir(socket: &Path) -> Result<(), Failure> {
    let dir = match socket.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(Failure::input(format!(
            "socket {}: {} is not a directory",
            socket.display(),
            dir.display()
        ))),
        Err(e) => Err(Failure::input(format!(
            "socket {}: directory {}: {e}",
            socket.display(),
            dir.display()
        ))),
    }
}

/// What a guest's session may hold, from the options.
fn session_limits() -> SessionLimits {
    SessionLimits::default()
}

/// The most descriptors the daemon needs at once: the caches' bounds, the vhost-user
/// connection's guest memory regions and queue eventfds, the FUSE request threads' queues,
/// and a margin for what one request opens for a moment (an `O_PATH` descriptor, a
/// directory being listed) and for logging, the store, `/proc` and the socket.
fn fd_budget(args: &Args, mode: &Mode) -> u64 {
    const MARGIN: u64 = 64;
    // vhost-user-backend accepts up to 509 memory slots; 3 eventfds per queue, 2 queues.
    const VHOST_USER: u64 = 509 + 3 * 2 + 2;
    let caches = u64::from(args.max_cached_dirs) + session_limits().max_cached_files as u64;
    let transport = if mode.is_mount() {
        // A cloned /dev/fuse per thread, and passthrough files while being registered;
        // a ring per possible CPU, its stop eventfd and its /dev/fuse descriptor.
        2 * u64::from(args.threads) + fuse_uring::possible_cpus().unwrap_or(1) as u64 + 2
    } else {
        VHOST_USER
    };
    MARGIN + caches + transport
}

/// Sets the soft descriptor limit to what the daemon needs (never to the hard maximum,
/// which is often 524,288 or more): past it, an open fails with EMFILE rather than the
/// daemon holding descriptors without bound. The sandbox lowers the hard limit too.
fn set_fd_limit(budget: u64) {
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    let soft = limit.maximum.map_or(budget, |max| max.min(budget));
    let wanted = rustix::process::Rlimit {
        current: Some(soft),
        maximum: limit.maximum,
    };
    if let Err(e) = rustix::process::setrlimit(rustix::process::Resource::Nofile, wanted) {
        tracing::debug!("cannot set the descriptor limit: {e}");
    }
}

/// Whether any part of the sandbox is asked for.
fn sandboxed(args: &Args) -> bool {
    args.sandbox.sandbox != SandboxMode::None || args.sandbox.seccomp != SeccompMode::None
}

/// Enters the sandbox for `profile`: once, with the process single-threaded.
fn enter_sandbox(
    args: &Args,
    mode: &Mode,
    view: &View,
    listener: Option<i32>,
) -> Result<(), Failure> {
    let plan = sandbox::Plan {
        mode: args.sandbox.sandbox,
        seccomp: args.sandbox.seccomp,
        profile: if mode.is_mount() {
            Profile::Fuse
        } else {
            Profile::VirtioFs
        },
        store_dir: view.store_dir().to_path_buf(),
        max_fds: fd_budget(args, mode),
        listener,
    };
    let entered = sandbox::enter(&plan).map_err(|e| Failure::runtime(e.to_string()))?;
    if plan.mode == SandboxMode::Landlock && entered.landlock_abi == 0 {
        tracing::warn!("this kernel has no Landlock: file access is not confined");
    }
    tracing::info!(
        landlock_abi = entered.landlock_abi,
        landlock_complete = entered.landlock_complete,
        seccomp = ?entered.seccomp,
        max_fds = entered.max_fds,
        "sandbox entered"
    );
    Ok(())
}

/// The control socket this daemon listens on, if any: `--control-socket`, else
/// `SOCKET.control` beside a `--socket-path` socket.
fn control_socket(args: &Args, mode: &Mode) -> Result<Option<PathBuf>, Failure> {
    let path = match (&args.control_socket, mode) {
        (Some(path), _) => path.clone(),
        (None, Mode::Socket(socket)) => control_socket_of(socket),
        (None, _) => return Ok(None),
    };
    std::path::absolute(&path)
        .map(Some)
        .map_err(|e| Failure::input(format!("control socket {}: {e}", path.display())))
}

/// Forks the controller (the control socket, SIGHUP's re-read of the closure file) and
/// starts the updater thread that applies what it hands over. Must be called while the
/// process has one thread, before the sandbox; the updater thread starts after it.
fn start_updates(
    args: &Args,
    mode: &Mode,
    view: &Arc<View>,
    keep_stderr: bool,
) -> Result<control::ControllerLink, Failure> {
    let listener = match control_socket(args, mode)? {
        Some(path) => {
            let listener = control::bind_control_socket(&path).map_err(Failure::runtime)?;
            tracing::info!(control = %path.display(), "listening for updates");
            Some((listener, path))
        }
        None => None,
    };
    control::spawn_controller(control::ControllerOptions {
        listener,
        closure_file: args.reload_from.clone(),
        store_dir: view.store_dir().to_path_buf(),
        keep_fds: nixstorefs_cli::log_fd().into_iter().collect(),
        keep_stderr,
    })
    .map_err(|e| Failure::runtime(format!("cannot start the controller process: {e}")))
}

/// How an update treats closure paths missing from the store: as at startup.
fn missing_policy(args: &Args, opts_allow_missing: bool) -> Missing {
    if args.closure_options.allow_missing || opts_allow_missing {
        Missing::LeaveOut
    } else {
        Missing::Refuse
    }
}

/// Hands the roots to the keeper process (forked here, before the sandbox) and returns
/// the gate requests are served through. `foreground`: the keeper keeps standard error.
fn keep_roots_outside(
    roots: &Mutex<Option<TempRoots>>,
    foreground: bool,
) -> Result<nixstorefs::gc_roots::RootsGate, Failure> {
    let mut roots = roots.lock();
    let roots = roots.as_mut().expect("roots are held while serving");
    roots
        .keep_outside(foreground, nixstorefs_cli::log_fd())
        .map_err(|e| Failure::runtime(e.to_string()))?;
    Ok(roots.gate())
}

/// How the signal thread unmounts: itself (no sandbox), or through the unmounter process
/// forked before the sandbox (a confined process may not unmount).
enum Unmount {
    Session(fuser::SessionUnmounter),
    Helper(daemon::Unmounter),
}

impl Unmount {
    /// Unmounts `target`, or detaches it lazily when it is busy (open files keep working
    /// until closed). False, with the error logged, when neither works.
    fn unmount(mut self, target: &Path) -> bool {
        match &mut self {
            Unmount::Session(unmounter) => match unmounter.unmount() {
                Ok(()) => true,
                Err(e) => {
                    tracing::warn!(
                        "unmount of {} failed ({e}); detaching it lazily",
                        target.display()
                    );
                    match daemon::detach_mount(target) {
                        Ok(()) => true,
                        Err(e) => {
                            tracing::error!("cannot detach {}: {e}", target.display());
                            false
                        }
                    }
                }
            },
            Unmount::Helper(helper) => match helper.unmount() {
                daemon::UnmountOutcome::Unmounted => true,
                daemon::UnmountOutcome::Detached => {
                    tracing::warn!("{} was busy; detached it lazily", target.display());
                    true
                }
                daemon::UnmountOutcome::Failed => {
                    tracing::error!("cannot unmount or detach {}", target.display());
                    false
                }
            },
        }
    }
}

/// Mounts and serves until unmounted. `detached` is the pipe to a waiting parent: taken and
/// told once the mount is live, left in place when mounting fails.
fn serve(
    args: &Args,
    mountpoint: &Path,
    opts: MountOptions,
    view: View,
    roots: &Arc<Mutex<Option<TempRoots>>>,
    detached: &mut Option<daemon::Detached>,
) -> Result<(), Failure> {
    let signals = nixstorefs_cli::block_signals();
    let view = Arc::new(view);
    // The roots keeper first: requests are served only while it says the paths are rooted.
    let gate = keep_roots_outside(roots, detached.is_none())?;
    let fs = StoreFs::new(
        view.clone(),
        FuseOptions {
            passthrough: !(args.no_passthrough || opts.no_passthrough),
            posix_acl: opts.mount.contains(&fuser::MountOption::DefaultPermissions),
            acl: opts.acl,
            transport: opts.fuse_transport.unwrap_or(args.fuse_transport),
            refuse_uring_queue: args.test_uring_refuse_queue,
        },
        gate,
    );
    // fuser takes the filesystem; the rings serve from the same state through this.
    let fuse = fs.handle();
    let mut config = fuser::Config::default();
    config.mount_options = opts.mount.clone();
    config.acl = opts.acl;
    config.n_threads = Some(args.threads.into());
    config.clone_fd = true;

    let canonical = std::fs::canonicalize(mountpoint)
        .map_err(|e| Failure::input(format!("mountpoint {}: {e}", mountpoint.display())))?;
    let mut session = fuser::Session::new(fs, mountpoint, &config)
        .map_err(|e| Failure::runtime(format!("cannot mount on {}: {e}", mountpoint.display())))?;
    tracing::info!(mountpoint = %mountpoint.display(), "mounted");
    use std::os::fd::AsFd;
    fuse.attach(session.as_fd())
        .map_err(|e| Failure::runtime(format!("cannot duplicate the /dev/fuse descriptor: {e}")))?;
    // Still outside the sandbox, where fuser can unmount: the ring, if required, must
    // have been accepted at INIT.
    fuse.check_required().map_err(Failure::runtime)?;

    // Everything that needs the wider world happens before the sandbox: the unmounter and
    // the clean-up process, /dev/null for the standard descriptors, systemd's socket, the
    // read-ahead setting.
    let cleanup = clean_up_outside(args, None)?;
    let mode = Mode::Mount(mountpoint.to_path_buf());
    let link = start_updates(args, &mode, &view, detached.is_none())?;
    let unmounter = if sandboxed(args) {
        let unmounter = daemon::Unmounter::spawn(&canonical)
            .map_err(|e| Failure::runtime(format!("cannot start the unmounter: {e}")))?;
        Unmount::Helper(unmounter)
    } else {
        Unmount::Session(session.unmount_callable())
    };
    if detached.is_some() {
        if let Err(e) = daemon::close_stdio(args.log_file.is_some()) {
            tracing::warn!("cannot detach from the terminal: {e}");
        }
    }
    let notifier = daemon::Notifier::from_env();
    nixstorefs::transport::fuse::tune_read_ahead(&canonical);
    enter_sandbox(args, &mode, &view, None)?;

    // Updates tell the kernel what left the served set, through the session's channel.
    let kernel = nixstorefs::transport::fuse::KernelNotifier(session.notifier());
    let reloader = control::Updater::new(
        view.clone(),
        roots.clone(),
        missing_policy(args, opts.allow_missing),
        Some(kernel),
    )
    .start(link)
    .map_err(|e| Failure::runtime(format!("cannot start the updater thread: {e}")))?;

    // The queues' threads start confined, like every thread started from here on.
    let rings = match fuse.start() {
        Ok(rings) => rings,
        Err(e) => {
            unmounter.unmount(mountpoint);
            return Err(Failure::runtime(e));
        }
    };

    let target = mountpoint.to_path_buf();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            let sig = signals.wait();
            if sig == libc::SIGHUP {
                reloader.reload();
                continue;
            }
            tracing::info!(signal = sig, "unmounting");
            if !unmounter.unmount(&target) {
                std::process::exit(1);
            }
            return;
        })
        .map_err(|e| Failure::runtime(format!("cannot start the signal thread: {e}")))?;

    if let Some(detached) = detached.take() {
        detached.ready();
    }
    notifier.ready();
    session
        .run()
        .map_err(|e| Failure::runtime(format!("serving {} failed: {e}", mountpoint.display())))?;
    rings.stop();
    log_stats(&view, "unmounted; exiting");
    drop(cleanup);
    Ok(())
}

/// When sandboxed, forks the process that removes the socket and its lock once the
/// daemon ends (the sandbox allows no unlink; a local roots file is the roots keeper's to
/// remove). Must be called while the process has one thread.
fn clean_up_outside(
    args: &Args,
    socket: Option<&mut daemon::SocketFile>,
) -> Result<Option<daemon::Cleanup>, Failure> {
    if !sandboxed(args) {
        return Ok(None);
    }
    let mut paths = Vec::new();
    let mut hold = Vec::new();
    if let Some(socket) = socket {
        let (files, lock) = socket.leave_removal();
        paths.extend(files);
        hold.push(lock);
    }
    if paths.is_empty() {
        return Ok(None);
    }
    daemon::Cleanup::spawn(&paths, &hold)
        .map(Some)
        .map_err(|e| Failure::runtime(format!("cannot start the clean-up process: {e}")))
}

fn log_stats(view: &View, message: &str) {
    let stats = view.stats();
    tracing::info!(
        live = stats.live,
        records = stats.records,
        allocated = stats.allocated,
        cached_dirs = stats.cached_dirs,
        "{message}"
    );
}

/// What this daemon serves, decided once from the command line; every path absolute,
/// since a detached daemon works from `/`.
#[derive(Clone, Debug)]
enum Mode {
    /// A FUSE mount at this directory.
    Mount(PathBuf),
    /// A guest, whose VMM connects to this socket, created by the daemon.
    Socket(PathBuf),
    /// A guest, whose VMM connects to this inherited listening socket.
    Fd(i32),
}

impl Mode {
    /// The mode the arguments ask for: exactly one of a mountpoint, `--socket-path` and
    /// `--fd` (clap refuses two of them).
    fn of(args: &Args) -> Result<Mode, Failure> {
        let absolute = |what: &str, p: &Path| {
            std::path::absolute(p)
                .map_err(|e| Failure::input(format!("{what} {}: {e}", p.display())))
        };
        match (&args.mountpoint, &args.socket_path, args.fd) {
            (Some(mountpoint), _, _) => Ok(Mode::Mount(absolute("mountpoint", mountpoint)?)),
            (None, Some(socket), _) => Ok(Mode::Socket(absolute("socket", socket)?)),
            (None, None, Some(fd)) => Ok(Mode::Fd(fd)),
            (None, None, None) => Err(Failure::input(
                "give a mountpoint, or --socket-path or --fd to serve a guest",
            )),
        }
    }

    /// Whether this is the FUSE mount (else a guest).
    fn is_mount(&self) -> bool {
        matches!(self, Mode::Mount(_))
    }
}

/// Serves one guest over vhost-user until it disconnects or a signal comes; either ends
/// the daemon cleanly (status 0), with the socket and its lock removed.
fn serve_guest(
    args: &Args,
    mode: &Mode,
    view: View,
    allow_missing: bool,
    roots: &Arc<Mutex<Option<TempRoots>>>,
    detached: &mut Option<daemon::Detached>,
) -> Result<(), Failure> {
    let signals = nixstorefs_cli::block_signals();
    let (listener, socket) = match mode {
        Mode::Mount(_) => unreachable!("a mount is served by serve()"),
        Mode::Socket(path) => {
            let (listener, file) = daemon::SocketFile::listen(path, args.socket_group.as_deref())
                .map_err(Failure::runtime)?;
            tracing::info!(socket = %path.display(), "listening");
            (listener, Some(file))
        }
        Mode::Fd(fd) => (
            daemon::inherited_listener(*fd).map_err(Failure::input)?,
            None,
        ),
    };
    // Everything that needs the wider world happens before the sandbox: the roots keeper,
    // the clean-up process, /dev/null for the standard descriptors, systemd's socket.
    let mut socket = socket;
    let gate = keep_roots_outside(roots, detached.is_none())?;
    let cleanup = clean_up_outside(args, socket.as_mut())?;
    let view = Arc::new(view);
    let link = start_updates(args, mode, &view, detached.is_none())?;
    if detached.is_some() {
        if let Err(e) = daemon::close_stdio(args.log_file.is_some()) {
            tracing::warn!("cannot detach from the terminal: {e}");
        }
    }
    let notifier = daemon::Notifier::from_env();
    let listener_fd = std::os::fd::AsRawFd::as_raw_fd(&listener);
    enter_sandbox(args, mode, &view, Some(listener_fd))?;

    let reloader = control::Updater::new(
        view.clone(),
        roots.clone(),
        missing_policy(args, allow_missing),
        None,
    )
    .start(link)
    .map_err(|e| Failure::runtime(format!("cannot start the updater thread: {e}")))?;
    enum Event {
        Ended(std::io::Result<virtiofs::Ended>),
        Signal(i32),
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let served = tx.clone();
    let guest_view = view.clone();
    let tag = args.tag.clone();
    let limits = session_limits();
    std::thread::Builder::new()
        .name("vhost-user".into())
        .spawn(move || {
            let _ = served.send(Event::Ended(virtiofs::serve(
                guest_view, listener, tag, limits, gate,
            )));
        })
        .map_err(|e| Failure::runtime(format!("cannot start the serving thread: {e}")))?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            let sig = signals.wait();
            if sig == libc::SIGHUP {
                reloader.reload();
                continue;
            }
            let _ = tx.send(Event::Signal(sig));
            return;
        })
        .map_err(|e| Failure::runtime(format!("cannot start the signal thread: {e}")))?;

    if let Some(detached) = detached.take() {
        detached.ready();
    }
    notifier.ready();
    let result = match rx.recv() {
        Ok(Event::Ended(Ok(virtiofs::Ended::Disconnected))) => {
            log_stats(&view, "the guest disconnected; exiting");
            Ok(())
        }
        Ok(Event::Ended(Ok(virtiofs::Ended::DisconnectedDuringSetup))) => {
            tracing::warn!(
                "the VMM disconnected before the guest used the device: check the VMM's own \
                 log (a guest without the virtiofs driver, or a VMM that failed to start)"
            );
            Ok(())
        }
        Ok(Event::Ended(Err(e))) => Err(Failure::runtime(e.to_string())),
        Ok(Event::Signal(sig)) => {
            log_stats(&view, &format!("signal {sig}; exiting"));
            Ok(())
        }
        Err(_) => Err(Failure::runtime("the serving thread vanished")),
    };
    // The socket and its lock go before the exit status is known to whoever waits.
    drop(socket);
    drop(cleanup);
    result
}

fn main() -> ExitCode {
    // Two malloc arenas, not one per thread: request threads (and io_uring queues, one
    // per CPU) all make and free the same small records, and memory freed in one arena is
    // not reused by another, so per-thread arenas held several MiB more for nothing.
    // SAFETY: mallopt before any thread exists, with a valid parameter.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 2) };
    let mut args = Args::parse();
    if let Some(Command::Update(update_args)) = &args.command {
        return update(update_args);
    }
    args.reload_from = match closure_arg(&args) {
        stdin if stdin.as_os_str() == "-" => None,
        file => Some(std::path::absolute(file).unwrap_or_else(|_| file.to_path_buf())),
    };
    let mode = match Mode::of(&args) {
        Ok(mode) => mode,
        Err(f) => {
            eprintln!("nixstorefs: {}", f.message);
            return ExitCode::from(f.status);
        }
    };
    if sandboxed(&args) {
        // Before anything is opened: what the daemon holds, it opened itself.
        let keep: Vec<i32> = match mode {
            Mode::Fd(fd) => vec![fd],
            _ => Vec::new(),
        };
        if let Err(e) = sandbox::close_inherited(&keep) {
            eprintln!("nixstorefs: cannot close inherited descriptors: {e}");
            return ExitCode::from(1);
        }
    }
    if let Err(f) = init_logging(args.verbose, args.log_file.as_deref()) {
        eprintln!("nixstorefs: {}", f.message);
        return ExitCode::from(f.status);
    }
    let mut opts = MountOptions::default();
    for list in &args.options {
        if let Err(e) = opts.add(list) {
            eprintln!("nixstorefs: {e}");
            return ExitCode::from(2);
        }
    }
    set_fd_limit(fd_budget(&args, &mode));
    let (view, roots) = match prepare(&args, &mode, &mut opts) {
        Ok(prepared) => prepared,
        Err(f) => {
            eprintln!("nixstorefs: {}", f.message);
            return ExitCode::from(f.status);
        }
    };
    let mut detached = if args.foreground {
        None
    } else {
        match daemon::detach() {
            Ok(d) => Some(d),
            Err(e) => {
                eprintln!("nixstorefs: cannot detach: {e}");
                return ExitCode::from(1);
            }
        }
    };
    // The detached child is a new process: the roots must be its own before the parent exits.
    let mut roots = roots;
    let after_fork = roots.after_fork();
    // Shared with the updater thread, which changes them with the served set.
    let roots = Arc::new(Mutex::new(Some(roots)));
    let allow_missing = opts.allow_missing;
    let served = match after_fork {
        Ok(()) => match &mode {
            Mode::Mount(mountpoint) => serve(&args, mountpoint, opts, view, &roots, &mut detached),
            Mode::Socket(_) | Mode::Fd(_) => {
                serve_guest(&args, &mode, view, allow_missing, &roots, &mut detached)
            }
        },
        Err(e) => Err(Failure::runtime(e.to_string())),
    };
    let status = match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            tracing::error!("{}", f.message);
            match detached {
                // Still attached to the parent: it prints the message and exits with it.
                Some(d) => d.failed(f.status, &f.message),
                None => eprintln!("nixstorefs: {}", f.message),
            }
            ExitCode::from(f.status)
        }
    };
    // Held until the mount or the guest is gone (taken from the updater, which stops).
    drop(roots.lock().take());
    status
}
