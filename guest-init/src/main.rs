//! `guest-init`: mounts the Nix store inside a VM guest before the system's init runs.
//!
//! As PID 1 (the /init of an initramfs) it reads its configuration from the kernel command
//! line (see [`config`]), mounts the store and executes the configured init. From a
//! running system, `guest-init mount-store` establishes the same stack, or replaces the
//! one in place atomically (soft-reboot, switching closures).

mod config;
mod modules;
mod probe;
mod stack;

use std::os::fd::BorrowedFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Duration;

use clap::{Parser, Subcommand};
use rustix::mount::MountFlags;

use config::{Config, Device, StoreSource, Writable};

const HELP: &str = "\
As PID 1 (the /init of an initramfs), guest-init reads the kernel command line:
  nixstore=virtiofs:TAG | erofs:LABEL=L | erofs:UUID=U | erofs:/dev/X   (required)
  nixstore.writable=tmpfs|none    a tmpfs overlay on /nix/store, or read-only (default)
  nixstore.timeout=SECONDS        wait for the device or tag (default 10)
  nixstore.rescue=PATH            a shell to start if mounting fails (else power off)
  init=PATH                       what to execute next (default /sbin/init)
  root=/dev/X rootfstype= rootflags=   a real root to switch to (default: stay in the initramfs)
  regInfo=PATH                    a registration for nix-store --load-db

The store is mounted read-only at /nix/.ro-store; /nix/store is an overlay with a tmpfs
at /nix/.rw-store (writable=tmpfs) or a read-only bind mount of it.";

/// Mounts the Nix store in a VM guest (virtiofs share or erofs image).
#[derive(Parser, Debug)]
#[command(version, after_help = HELP)]
struct Cli {
    #[command(subcommand)]
    command: Commands,
}

#[derive(Subcommand, Debug)]
enum Commands {
    /// Mount the store on a running system, or switch it atomically to another source.
    /// A second run with the same options changes nothing.
    MountStore {
        /// The store: virtiofs:TAG, erofs:LABEL=L, erofs:UUID=U or erofs:/dev/X.
        #[arg(long, value_name = "SPEC")]
        store: StoreSource,
        /// tmpfs: a writable overlay on /nix/store; none: read-only.
        #[arg(long, default_value = "none", value_name = "tmpfs|none")]
        writable: Writable,
        /// Seconds to wait for the device or tag.
        #[arg(long, default_value_t = 10.0, value_name = "SECONDS")]
        timeout: f64,
    },
}

fn say(message: &str) {
    println!("guest-init: {message}");
}

/// PID 1 starts with whatever the kernel gave it: without /dev/console in the initramfs,
/// no standard descriptors at all. Mount the API filesystems and get a console.
fn prepare_pid1() {
    let mounts: [(&str, &str, &str, MountFlags); 4] = [
        (
            "proc",
            "/proc",
            "proc",
            MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC,
        ),
        (
            "sysfs",
            "/sys",
            "sysfs",
            MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC,
        ),
        ("devtmpfs", "/dev", "devtmpfs", MountFlags::NOSUID),
        (
            "tmpfs",
            "/run",
            "tmpfs",
            MountFlags::NOSUID | MountFlags::NODEV,
        ),
    ];
    for (source, target, fstype, flags) in mounts {
        let _ = std::fs::create_dir_all(target);
        // EBUSY: already mounted (by the kernel, for devtmpfs with DEVTMPFS_MOUNT).
        let _ = rustix::mount::mount(source, target, fstype, flags, None);
    }
    // SAFETY: descriptor 1 is only inspected, never closed through this borrow.
    let stdout = unsafe { BorrowedFd::borrow_raw(1) };
    if rustix::io::fcntl_getfd(stdout).is_err() {
        if let Ok(console) = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/console")
        {
            let _ = rustix::stdio::dup2_stdin(&console);
            let _ = rustix::stdio::dup2_stdout(&console);
            let _ = rustix::stdio::dup2_stderr(&console);
        }
    }
}

/// The value of `key=` on the kernel command line, read leniently (for the failure path,
/// when the full configuration may not parse).
fn cmdline_value(cmdline: &str, key: &str) -> Option<String> {
    cmdline
        .split_whitespace()
        .filter_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .next_back()
        .map(str::to_owned)
}

/// Mounts a real root at /sysroot, waiting for its device.
fn mount_root(root: &config::Root, timeout: Duration) -> Result<PathBuf, String> {
    let Device::Path(device) = &root.device else {
        // Labels of arbitrary filesystems would need a full blkid; an erofs root can still
        // be named by label through nixstore-style probing.
        let node = probe::find(&root.device)
            .map_err(|found| format!("expected root {} ; found {found}", root.device))?;
        return mount_root_node(&node, root);
    };
    let deadline = std::time::Instant::now() + timeout;
    while !device.exists() {
        if std::time::Instant::now() >= deadline {
            return Err(format!(
                "expected root device {} within {:.1} s; found {}",
                device.display(),
                timeout.as_secs_f64(),
                probe::block_devices()
                    .iter()
                    .map(|p| p.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    mount_root_node(device, root)
}

fn mount_root_node(node: &Path, root: &config::Root) -> Result<PathBuf, String> {
    let target = PathBuf::from("/sysroot");
    std::fs::create_dir_all(&target).map_err(|e| format!("cannot create /sysroot: {e}"))?;
    let types: Vec<String> = match &root.fstype {
        Some(t) => vec![t.clone()],
        // No blkid here: try the block-device filesystems the kernel knows.
        None => std::fs::read_to_string("/proc/filesystems")
            .unwrap_or_default()
            .lines()
            .filter(|l| !l.starts_with("nodev"))
            .map(|l| l.trim().to_owned())
            .collect(),
    };
    let data = root
        .flags
        .as_deref()
        .map(|f| std::ffi::CString::new(f).expect("no NUL on a command line"));
    let mut errors = Vec::new();
    for fstype in &types {
        match rustix::mount::mount(
            node,
            &target,
            fstype.as_str(),
            MountFlags::empty(),
            data.as_deref(),
        ) {
            Ok(()) => return Ok(target),
            Err(e) => errors.push(format!("{fstype}: {e}")),
        }
    }
    Err(format!(
        "root {} does not mount ({})",
        node.display(),
        errors.join(", ")
    ))
}

/// Makes `new_root` the root: the API filesystems move along, then the root itself.
fn switch_root(new_root: &Path) -> Result<(), String> {
    for api in ["/dev", "/proc", "/sys", "/run"] {
        let target = new_root.join(&api[1..]);
        let _ = std::fs::create_dir_all(&target);
        rustix::mount::mount_move(api, &target)
            .map_err(|e| format!("moving {api} into {}: {e}", new_root.display()))?;
    }
    std::env::set_current_dir(new_root)
        .map_err(|e| format!("entering {}: {e}", new_root.display()))?;
    rustix::mount::mount_move(".", "/")
        .map_err(|e| format!("moving {} to /: {e}", new_root.display()))?;
    rustix::process::chroot(".").map_err(|e| format!("chroot into the new root: {e}"))?;
    std::env::set_current_dir("/").map_err(|e| format!("entering the new root: {e}"))
}

/// Loads the registration with the closure's own nix-store, or says why not.
fn load_registration(reg_info: Option<&Path>) {
    let Some(reg) = reg_info else {
        say("no regInfo= given: not loading a registration into the Nix database");
        return;
    };
    let nix_store = std::fs::read_dir("/nix/store").ok().and_then(|rd| {
        rd.filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains("-nix-"))
            .map(|e| e.path().join("bin/nix-store"))
            .find(|p| p.exists())
    });
    let Some(nix_store) = nix_store else {
        say(&format!(
            "regInfo={} given but the store has no bin/nix-store: skipping the registration",
            reg.display()
        ));
        return;
    };
    let status = std::fs::File::open(reg).and_then(|input| {
        Command::new(&nix_store)
            .arg("--load-db")
            .stdin(input)
            .status()
    });
    match status {
        Ok(s) if s.success() => say(&format!("loaded the registration {}", reg.display())),
        Ok(s) => say(&format!("{} --load-db failed: {s}", nix_store.display())),
        Err(e) => say(&format!(
            "cannot run {} --load-db: {e}",
            nix_store.display()
        )),
    }
}

/// The failure path of PID 1: say what happened, start the rescue shell if there is one,
/// then power off. PID 1 must never exit (the kernel would panic).
fn fail(message: &str, rescue: Option<PathBuf>) -> ! {
    say(&format!("error: {message}"));
    if let Some(shell) = rescue {
        say(&format!("starting the rescue shell {}", shell.display()));
        match Command::new(&shell).status() {
            Ok(_) => {}
            Err(e) => say(&format!("cannot start {}: {e}", shell.display())),
        }
    }
    say("failed, powering off");
    rustix::fs::sync();
    let _ = rustix::system::reboot(rustix::system::RebootCommand::PowerOff);
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

fn stage1() -> ! {
    prepare_pid1();
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let rescue = cmdline_value(&cmdline, "nixstore.rescue").map(PathBuf::from);
    let config = match Config::from_cmdline(&cmdline) {
        Ok(c) => c,
        Err(e) => fail(&e, rescue),
    };
    let result = (|| -> Result<(), String> {
        let mut modules = modules::Modules::open();
        stack::load_modules(&mut modules, &config.store, config.writable);
        let root = match &config.root {
            Some(root) => {
                // The root's filesystem may be a module too (ext4 is, in Debian's kernel).
                if let Some(fstype) = &root.fstype {
                    if let Err(e) = modules.load(fstype) {
                        say(&e);
                    }
                }
                mount_root(root, config.timeout)?
            }
            None => PathBuf::from("/"),
        };
        let from = stack::mount_stack(&root, &config)?;
        say(&format!(
            "store mounted: {} from {from} at /nix/store ({})",
            config.store,
            match config.writable {
                Writable::Tmpfs => "writable, tmpfs overlay",
                Writable::None => "read-only",
            }
        ));
        if root != Path::new("/") {
            switch_root(&root)?;
        }
        load_registration(config.reg_info.as_deref());
        Ok(())
    })();
    if let Err(e) = result {
        fail(&e, config.rescue);
    }
    let err = Command::new(&config.init).exec();
    fail(
        &format!(
            "expected an init at {}; executing it failed: {err}",
            config.init.display()
        ),
        config.rescue,
    )
}

fn main() -> ExitCode {
    if std::process::id() == 1 {
        stage1();
    }
    let cli = Cli::parse();
    match cli.command {
        Commands::MountStore {
            store,
            writable,
            timeout,
        } => {
            if !timeout.is_finite() || timeout < 0.0 {
                eprintln!("guest-init: --timeout {timeout}: expected a number of seconds");
                return ExitCode::from(2);
            }
            let config = Config {
                store,
                writable,
                timeout: Duration::from_secs_f64(timeout),
                rescue: None,
                init: PathBuf::new(),
                root: None,
                reg_info: None,
            };
            match stack::mount_store(&config) {
                Ok(done) => {
                    say(&done);
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("guest-init: error: {e}");
                    ExitCode::from(1)
                }
            }
        }
    }
}
