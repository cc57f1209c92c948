//! `guest-init`: mounts the Nix store inside a VM guest before the system's init runs.
//!
//! As PID 1 (the /init of an initramfs) it reads its configuration from the kernel command
//! line (see [`config`]), mounts the store and executes the configured init. From a
//! running system, `guest-init mount-store` establishes the same stack, or replaces the
//! one in place atomically (soft-reboot, switching closures).

mod config;
mod dax;
mod modules;
mod overlay;
mod probe;
mod stack;

use std::ffi::{CStr, CString};
use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use rustix::mount::MountFlags;

use config::{Config, StoreSource, Writable};

const HELP: &str = "\
As PID 1 (the /init of an initramfs), guest-init reads the kernel command line:
  nixstore=virtiofs:TAG | erofs:LABEL=L | erofs:UUID=U | erofs:/dev/X   (required)
                                  (erofs: takes every device form root= takes)
           | pmem | pmem:DEV      an erofs image on a virtio-pmem device (/dev/pmem0, or DEV
                                  as for erofs:, looked for among pmem devices), mounted with
                                  dax=always; the console says whether DAX is really on
  nixstore.writable=tmpfs|none    a tmpfs overlay on /nix/store, or read-only (default)
  nixstore.timeout=SECONDS        wait for the device or tag (default 10)
  nixstore.rescue=PATH            a shell to start if mounting fails (else power off)
  init=PATH                       what to execute next (default /sbin/init)
  root=/dev/X | LABEL=L | UUID=U | PARTUUID=P | /dev/disk/by-{label,uuid,partuuid}/N
                                  a real root to switch to (default: stay in the initramfs)
  rootfstype= rootflags= ro|rw    its type (default: read from it), options, ro (default) or rw
                                  (a read-only root lacking /nix/store or /nix/.ro-store gets
                                  them on a read-only tmpfs at its /nix, which must exist)
  regInfo=PATH                    a registration for nix-store --load-db
  other words (single, what follows --) are passed on to init

The store is mounted read-only at /nix/.ro-store; /nix/store is an overlay with a tmpfs
at /nix/.rw-store (writable=tmpfs) or a read-only bind mount of it.";

/// Mounts the Nix store in a VM guest (virtiofs share, or erofs image on a disk or a
/// virtio-pmem device).
#[derive(Parser, Debug)]
#[command(version, after_help = HELP)]
struct Cli {
    #[command(subcommand)]
    command: Commands,
}

#[derive(Subcommand, Debug)]
enum Commands {
    /// Exits 0 if this kernel can put a mount beneath another (run by mount-store, in a
    /// mount namespace of its own).
    #[command(hide = true)]
    ProbeBeneath,
    /// Mount the store on a running system, or switch it atomically to another source.
    /// A second run with the same options changes nothing.
    MountStore {
        /// The store: virtiofs:TAG, erofs:LABEL=L, erofs:UUID=U, erofs:/dev/X, pmem
        /// (/dev/pmem0, with DAX) or pmem:LABEL=L, pmem:UUID=U, pmem:/dev/X.
        #[arg(long, value_name = "SPEC")]
        store: StoreSource,
        /// tmpfs: a writable overlay on /nix/store; none: read-only.
        #[arg(long, default_value = "none", value_name = "tmpfs|none")]
        writable: Writable,
        /// With --writable tmpfs: start from an empty upper layer instead of keeping what
        /// was written to the store before.
        #[arg(long)]
        discard_writes: bool,
        /// Seconds to wait for the device or tag.
        #[arg(long, default_value = "10", value_name = "SECONDS", value_parser = config::parse_timeout)]
        timeout: Duration,
    },
}

/// Writes a line to stdout. PID 1 may have no console at all: a failed write is dropped,
/// never a panic (`println!` panics, and a panicking PID 1 is a kernel panic).
pub fn say(message: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stdout().lock(), "guest-init: {message}");
}

/// PID 1 starts with whatever the kernel gave it: without /dev/console in the initramfs,
/// no standard descriptors at all. Mount the API filesystems and get a console.
fn prepare_pid1() {
    let mounts: [(&str, &str, &str, MountFlags, Option<&CStr>); 4] = [
        (
            "proc",
            "/proc",
            "proc",
            MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC,
            None,
        ),
        (
            "sysfs",
            "/sys",
            "sysfs",
            MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC,
            None,
        ),
        ("devtmpfs", "/dev", "devtmpfs", MountFlags::NOSUID, None),
        (
            "tmpfs",
            "/run",
            "tmpfs",
            MountFlags::NOSUID | MountFlags::NODEV,
            // Not world-writable (systemd keeps /run as it finds it), and bounded as
            // systemd bounds its own.
            Some(c"mode=0755,size=20%,nr_inodes=800k"),
        ),
    ];
    for (source, target, fstype, flags, data) in mounts {
        let _ = std::fs::create_dir_all(target);
        // EBUSY: already mounted (by the kernel, for devtmpfs with DEVTMPFS_MOUNT).
        let _ = rustix::mount::mount(source, target, fstype, flags, data);
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

/// The rescue shell for the failure path, known before anything can fail (or panic).
static RESCUE: OnceLock<Option<PathBuf>> = OnceLock::new();

/// Mounts a real root at /sysroot, waiting up to `timeout` for its device.
fn mount_root(
    root: &config::Root,
    modules: &mut modules::Modules,
    timeout: Duration,
) -> Result<PathBuf, String> {
    let deadline = config::deadline(timeout)?;
    let found = loop {
        let why = match probe::find(&root.device) {
            Ok(found) => break found,
            Err(probe::NotFound::Ambiguous(why)) => return Err(format!("root: {why}")),
            Err(probe::NotFound::Absent(why)) => why,
        };
        if Instant::now() >= deadline {
            return Err(format!(
                "expected the root device {} within {:.1} s; found {why}",
                root.device,
                timeout.as_secs_f64()
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    // rootfstype= wins; else what the superblock says.
    let fstype = root
        .fstype
        .clone()
        .or_else(|| found.fs.as_ref().map(|fs| fs.fstype.to_owned()));
    if let Some(fstype) = &fstype {
        // The root's filesystem may be a module (ext4 is, in Debian's kernel).
        if let Err(e) = modules.load(fstype) {
            say(&e);
        }
    }
    mount_root_node(&found, fstype, root)
}

fn mount_root_node(
    found: &probe::Probed,
    fstype: Option<String>,
    root: &config::Root,
) -> Result<PathBuf, String> {
    let node = &found.node;
    let target = PathBuf::from("/sysroot");
    std::fs::create_dir_all(&target).map_err(|e| format!("cannot create /sysroot: {e}"))?;
    let types: Vec<String> = match fstype {
        Some(t) => vec![t],
        // An unknown superblock: try the block-device filesystems the kernel knows.
        None => std::fs::read_to_string("/proc/filesystems")
            .unwrap_or_default()
            .lines()
            .filter(|l| !l.starts_with("nodev"))
            .map(|l| l.trim().to_owned())
            .collect(),
    };
    let data = match root.flags.as_deref().map(CString::new) {
        Some(Ok(d)) => Some(d),
        Some(Err(_)) => return Err("rootflags= holds a NUL byte".into()),
        None => None,
    };
    let flags = if root.read_only {
        MountFlags::RDONLY
    } else {
        MountFlags::empty()
    };
    let mut errors = Vec::new();
    for fstype in &types {
        match rustix::mount::mount(node, &target, fstype.as_str(), flags, data.as_deref()) {
            Ok(()) => {
                say(&format!(
                    "root {} mounted at /sysroot ({fstype}, {})",
                    found,
                    if root.read_only { "ro" } else { "rw" }
                ));
                return Ok(target);
            }
            Err(e) => errors.push(format!("{fstype}: {e}")),
        }
    }
    Err(format!(
        "root {} does not mount ({})",
        node.display(),
        errors.join(", ")
    ))
}

/// tmpfs and ramfs, the filesystems an initramfs is unpacked into.
const TMPFS_MAGIC: u64 = 0x0102_1994;
const RAMFS_MAGIC: u64 = 0x8584_58f6;

/// Removes everything below `dir` that lives on device `dev`, not crossing into other
/// mounts: the initramfs's files, once nothing can reach them by path any more.
fn remove_tree(dir: &OwnedFd, dev: u64, removed: &mut u64) {
    use rustix::fs::{AtFlags, FileType, Mode, OFlags};
    let Ok(entries) = rustix::fs::Dir::read_from(dir) else {
        return;
    };
    let names: Vec<(CString, FileType)> = entries
        .filter_map(Result::ok)
        .filter(|e| e.file_name() != c"." && e.file_name() != c"..")
        .map(|e| (e.file_name().to_owned(), e.file_type()))
        .collect();
    for (name, file_type) in names {
        let is_dir = match file_type {
            FileType::Directory => true,
            FileType::Unknown => rustix::fs::statat(dir, &name, AtFlags::SYMLINK_NOFOLLOW)
                .is_ok_and(|st| FileType::from_raw_mode(st.st_mode) == FileType::Directory),
            _ => false,
        };
        if is_dir {
            let Ok(sub) = rustix::fs::openat(
                dir,
                &name,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            ) else {
                continue;
            };
            // A mount point (the moved /dev, /proc, ... or /sysroot) is another device.
            if rustix::fs::fstat(&sub).is_ok_and(|st| st.st_dev == dev) {
                remove_tree(&sub, dev, removed);
                if rustix::fs::unlinkat(dir, &name, AtFlags::REMOVEDIR).is_ok() {
                    *removed += 1;
                }
            }
        } else if rustix::fs::unlinkat(dir, &name, AtFlags::empty()).is_ok() {
            *removed += 1;
        }
    }
}

/// Makes `new_root` the root, as util-linux's switch_root does: the API filesystems move
/// along (a failure there is reported, not fatal), the new root is moved onto /, and the
/// initramfs's files are freed.
fn switch_root(new_root: &Path) -> Result<(), String> {
    for api in ["/dev", "/proc", "/sys", "/run"] {
        let target = new_root.join(&api[1..]);
        let _ = std::fs::create_dir_all(&target);
        if let Err(e) = rustix::mount::mount_move(api, &target) {
            say(&format!(
                "warning: cannot move {api} into {}: {e}; the system finds it unmounted",
                new_root.display()
            ));
        }
    }
    // Held across the switch: the only way left to reach the initramfs afterwards.
    let old_root = rustix::fs::open(
        "/",
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .map_err(|e| format!("opening the initramfs root: {e}"))?;
    std::env::set_current_dir(new_root)
        .map_err(|e| format!("entering {}: {e}", new_root.display()))?;
    rustix::mount::mount_move(".", "/")
        .map_err(|e| format!("moving {} to /: {e}", new_root.display()))?;
    rustix::process::chroot(".").map_err(|e| format!("chroot into the new root: {e}"))?;
    std::env::set_current_dir("/").map_err(|e| format!("entering the new root: {e}"))?;
    // Only a RAM-backed initramfs: never delete from a disk that was the root.
    let ram = rustix::fs::fstatfs(&old_root)
        .is_ok_and(|st| matches!(st.f_type as u64, TMPFS_MAGIC | RAMFS_MAGIC));
    match rustix::fs::fstat(&old_root) {
        Ok(st) if ram => {
            let mut removed = 0;
            remove_tree(&old_root, st.st_dev, &mut removed);
            say(&format!("freed the initramfs ({removed} entries)"));
        }
        Ok(_) => say("the old root is not in RAM: left as it is"),
        Err(e) => say(&format!("warning: cannot free the initramfs: {e}")),
    }
    Ok(())
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
fn fail(message: &str) -> ! {
    say(&format!("error: {message}"));
    if let Some(Some(shell)) = RESCUE.get() {
        say(&format!("starting the rescue shell {}", shell.display()));
        match Command::new(shell).status() {
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
    // Any panic, on any thread, takes the failure path: a PID 1 that unwound and exited
    // would be "attempted to kill init", a kernel panic.
    std::panic::set_hook(Box::new(|info| {
        fail(&format!("guest-init panicked: {info}"))
    }));
    prepare_pid1();
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let _ = RESCUE.set(cmdline_value(&cmdline, "nixstore.rescue").map(PathBuf::from));
    let config = match Config::from_cmdline(&cmdline) {
        Ok(c) => c,
        Err(e) => fail(&e),
    };
    let result = (|| -> Result<(), String> {
        let mut modules = modules::Modules::open();
        stack::load_modules(&mut modules, &config.store, config.writable);
        let root = match &config.root {
            Some(root) => mount_root(root, &mut modules, config.timeout)?,
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
        fail(&e);
    }
    // The words the kernel passed to init (`single`, `emergency`, what follows `--`) are
    // the system init's, not ours.
    let err = Command::new(&config.init)
        .args(std::env::args_os().skip(1))
        .exec();
    fail(&format!(
        "expected an init at {}; executing it failed: {err}",
        config.init.display()
    ))
}

fn main() -> ExitCode {
    if std::process::id() == 1 {
        stage1();
    }
    let cli = Cli::parse();
    match cli.command {
        Commands::ProbeBeneath => {
            if stack::probe_beneath() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Commands::MountStore {
            store,
            writable,
            discard_writes,
            timeout,
        } => {
            let config = Config {
                store,
                writable,
                timeout,
                rescue: None,
                init: PathBuf::new(),
                root: None,
                reg_info: None,
            };
            match stack::mount_store(&config, discard_writes) {
                Ok(done) => {
                    say(&done);
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    use std::io::Write;
                    let _ = writeln!(std::io::stderr().lock(), "guest-init: error: {e}");
                    ExitCode::from(1)
                }
            }
        }
    }
}
