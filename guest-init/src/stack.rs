//! The store's mount stack, as nixpkgs lays it out:
//!
//! * `/nix/.ro-store`: the store itself (virtiofs share or erofs image), read-only;
//! * `/nix/.rw-store`: a tmpfs holding the overlay's upper and work directories, when
//!   writable;
//! * `/nix/store`: an overlay of the two when writable, else a read-only bind mount of
//!   `/nix/.ro-store`.
//!
//! A running system replaces the stack by building the new one at a private temporary
//! mount and moving each piece into place, /nix/store last, so that no process ever sees a
//! missing or half-built store.

use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rustix::fs::CWD;
use rustix::mount::{MountFlags, MountPropagationFlags, MoveMountFlags, UnmountFlags};

use crate::config::{deadline, Config, StoreSource, Writable};
use crate::modules::Modules;
use crate::probe::{self, NotFound};
use crate::say;

/// Relative to a root (`/` or the real root being prepared).
const RO_STORE: &str = "nix/.ro-store";
const RW_STORE: &str = "nix/.rw-store";
const STORE: &str = "nix/store";

/// How often to look again for a device or tag that is not there yet.
const POLL: Duration = Duration::from_millis(50);

fn mkdir_p(path: &Path) -> Result<(), String> {
    std::fs::create_dir_all(path).map_err(|e| format!("cannot create {}: {e}", path.display()))
}

fn mount(
    source: &str,
    target: &Path,
    fstype: &str,
    flags: MountFlags,
    data: Option<&str>,
) -> rustix::io::Result<()> {
    let data = data.map(|d| CString::new(d).expect("mount data has no NUL"));
    rustix::mount::mount(source, target, fstype, flags, data.as_deref())
}

/// Loads what the store's filesystem and device need. Failures are reported by the mount
/// that follows, which names the filesystem; here they are only worth a line.
pub fn load_modules(modules: &mut Modules, source: &StoreSource, writable: Writable) {
    // Virtio devices sit on PCI or, on microvm-style machines, on MMIO.
    let mut wanted = vec!["virtio_pci", "virtio_mmio"];
    match source {
        StoreSource::Virtiofs(_) => wanted.push("virtiofs"),
        // erofs's libcrc32c names its crc32c through a soft dependency, resolved through
        // modules.alias; loop lets an image attached later with losetup be found.
        StoreSource::Erofs(_) => wanted.extend(["virtio_blk", "erofs", "loop"]),
    }
    if writable == Writable::Tmpfs {
        wanted.push("overlay");
    }
    for name in wanted {
        match modules.load(name) {
            Err(e) => say(&e),
            // Neither a file nor built in: the kernel may still have it under another
            // name, and the mount that follows says what is missing.
            Ok(None) if name != "virtio_mmio" && name != "loop" => say(&format!(
                "kernel module {name} is neither in modules.dep nor built in"
            )),
            Ok(_) => {}
        }
    }
}

/// Mounts a virtiofs share, giving up when the device does not answer by `deadline`: the
/// mount call itself blocks until virtiofsd replies, so it runs on a thread of its own.
fn mount_virtiofs(
    tag: &str,
    target: &Path,
    flags: MountFlags,
    deadline: Instant,
) -> Result<rustix::io::Result<()>, String> {
    let (send, receive) = std::sync::mpsc::channel();
    let (t, p) = (tag.to_owned(), target.to_owned());
    std::thread::Builder::new()
        .name("virtiofs-mount".into())
        .spawn(move || {
            let _ = send.send(mount(&t, &p, "virtiofs", flags, None));
        })
        .map_err(|e| format!("cannot start a thread to mount virtiofs: {e}"))?;
    // Even at the deadline the share gets a moment to answer a mount already sent.
    let wait = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_secs(2));
    receive.recv_timeout(wait).map_err(|_| {
        format!(
            "the virtiofs share `{tag}` did not answer the mount within {:.1} s \
             (is virtiofsd running?)",
            wait.as_secs_f64()
        )
    })
}

/// What virtiofs shares the guest has, for an error message: their tags where the kernel
/// shows them (/sys/fs/virtiofs, Linux 6.9), else how many virtio-fs devices there are.
fn virtiofs_shares() -> String {
    let mut tags: Vec<String> = std::fs::read_dir("/sys/fs/virtiofs")
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| std::fs::read_to_string(e.path().join("tag")).ok())
                .map(|t| format!("`{}`", t.trim()))
                .collect()
        })
        .unwrap_or_default();
    if !tags.is_empty() {
        tags.sort();
        return format!("tags {}", tags.join(", "));
    }
    // Virtio device id 26 is virtio-fs.
    let devices = std::fs::read_dir("/sys/bus/virtio/devices")
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter(|e| {
                    std::fs::read_to_string(e.path().join("device"))
                        .map(|id| id.trim() == "0x001a")
                        .unwrap_or(false)
                })
                .count()
        })
        .unwrap_or(0);
    match devices {
        0 => "no virtio-fs device".into(),
        1 => "1 virtio-fs device (this kernel does not show its tag)".into(),
        n => format!("{n} virtio-fs devices (this kernel does not show their tags)"),
    }
}

/// Mounts the store read-only at `target`, waiting up to `timeout` for its device or tag.
/// Returns the mount's source (device node or tag) for the log.
pub fn mount_source(
    source: &StoreSource,
    target: &Path,
    timeout: Duration,
) -> Result<String, String> {
    let deadline = deadline(timeout)?;
    let ro = MountFlags::RDONLY | MountFlags::NOSUID | MountFlags::NODEV;
    loop {
        let why: String = match source {
            StoreSource::Virtiofs(tag) => match mount_virtiofs(tag, target, ro, deadline)? {
                Ok(()) => return Ok(tag.clone()),
                // The device may not have been probed yet: the tag is unknown until then.
                Err(e @ (rustix::io::Errno::INVAL | rustix::io::Errno::NOENT)) => {
                    format!(
                        "no virtiofs share with tag `{tag}` (mount: {e}); found {}",
                        virtiofs_shares()
                    )
                }
                Err(rustix::io::Errno::NODEV) => {
                    return Err("the kernel has no virtiofs filesystem (module missing?)".into())
                }
                Err(e) => return Err(format!("mounting virtiofs tag `{tag}`: {e}")),
            },
            StoreSource::Erofs(device) => match probe::find(device) {
                Err(NotFound::Ambiguous(why)) => return Err(why),
                Ok(found) => {
                    let node = found.node.clone();
                    let node_str = node.to_string_lossy().into_owned();
                    return match mount(&node_str, target, "erofs", ro, None) {
                        Ok(()) => Ok(node_str),
                        Err(rustix::io::Errno::NODEV) => {
                            Err("the kernel has no erofs filesystem (module missing?)".into())
                        }
                        Err(e) => Err(format!(
                            "{} ({device}) does not mount as erofs: {e}; {}",
                            node.display(),
                            probe::probe(node.clone())
                        )),
                    };
                }
                Err(NotFound::Absent(found)) => {
                    format!("no erofs image with {device}; found {found}")
                }
            },
        };
        if Instant::now() >= deadline {
            return Err(format!(
                "expected {source} within {:.1} s: {why}",
                timeout.as_secs_f64()
            ));
        }
        std::thread::sleep(POLL);
    }
}

/// Mounts the whole stack below `root` (which already has the mount points' parents).
pub fn mount_stack(root: &Path, config: &Config) -> Result<String, String> {
    let ro_store = root.join(RO_STORE);
    let store = root.join(STORE);
    mkdir_p(&ro_store)?;
    mkdir_p(&store)?;
    // /nix its own mount: the kernel puts nothing beneath a child of the namespace root,
    // and an initramfs that stays the root is that root. A later `mount-store` can then
    // switch /nix/store with MOVE_MOUNT_BENEATH.
    let nix = root.join("nix");
    rustix::mount::mount_bind(&nix, &nix)
        .map_err(|e| format!("bind-mounting {} on itself: {e}", nix.display()))?;
    let from = mount_source(&config.store, &ro_store, config.timeout)?;
    match config.writable {
        Writable::Tmpfs => {
            let rw = root.join(RW_STORE);
            mkdir_p(&rw)?;
            overlay(&ro_store, &rw, &store)?;
        }
        Writable::None => read_only_bind(&ro_store, &store)?,
    }
    Ok(from)
}

/// The overlay at `target` of `lower` with `upper` and `work`.
/// `extra` options are appended (`,index=off` where another overlay shares the upper
/// layer until it is detached: the index would refuse that).
fn overlay_on(
    lower: &Path,
    upper: &Path,
    work: &Path,
    target: &Path,
    extra: &str,
) -> Result<(), String> {
    let data = format!(
        "lowerdir={},upperdir={},workdir={}{extra}",
        lower.display(),
        upper.display(),
        work.display()
    );
    mount("overlay", target, "overlay", MountFlags::NODEV, Some(&data))
        .map_err(|e| format!("mounting the overlay at {} ({data}): {e}", target.display()))
}

/// A tmpfs at `rw` holding upper and work directories, and the overlay at `target`.
fn overlay(lower: &Path, rw: &Path, target: &Path) -> Result<(), String> {
    mount(
        "tmpfs",
        rw,
        "tmpfs",
        MountFlags::NOSUID | MountFlags::NODEV,
        Some("mode=0755"),
    )
    .map_err(|e| format!("mounting a tmpfs at {}: {e}", rw.display()))?;
    let upper = rw.join("store");
    let work = rw.join("work");
    mkdir_p(&upper)?;
    mkdir_p(&work)?;
    overlay_on(lower, &upper, &work, target, "")
}

fn read_only_bind(from: &Path, to: &Path) -> Result<(), String> {
    rustix::mount::mount_bind(from, to)
        .map_err(|e| format!("bind-mounting {} at {}: {e}", from.display(), to.display()))?;
    // A bind mount starts writable whatever its source: make this one read-only too.
    rustix::mount::mount_remount(
        to,
        MountFlags::BIND | MountFlags::RDONLY | MountFlags::NOSUID | MountFlags::NODEV,
        "",
    )
    .map_err(|e| format!("making {} read-only: {e}", to.display()))
}

/// One line of /proc/self/mountinfo, as far as needed here.
#[derive(Debug, Clone, PartialEq, Eq)]
struct MountEntry {
    mount_point: PathBuf,
    fstype: String,
    source: String,
}

/// Undoes mountinfo's octal escapes (`\040` for a space, ...).
fn unescape(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn mountinfo() -> Vec<MountEntry> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let dash = fields.iter().position(|f| *f == "-")?;
            Some(MountEntry {
                mount_point: PathBuf::from(unescape(fields.get(4)?)),
                fstype: fields.get(dash + 1)?.to_string(),
                source: unescape(fields.get(dash + 2)?),
            })
        })
        .collect()
}

/// The top-most mount at `path` (mounts stacked on one point are listed in order).
fn top_mount(mounts: &[MountEntry], path: &Path) -> Option<MountEntry> {
    mounts.iter().rev().find(|m| m.mount_point == path).cloned()
}

/// The device a block device node stands for, compared by number: the same device
/// however its path was spelled (a symlink, another node).
fn device_number(node: &str) -> Option<u64> {
    let st = rustix::fs::stat(node).ok()?;
    (st.st_mode & 0o170000 == 0o060000).then_some(st.st_rdev)
}

/// Whether the filesystem mounted at `path` lives on the block device `node`.
fn mounted_from(path: &Path, node: &str) -> bool {
    match (rustix::fs::stat(path), device_number(node)) {
        (Ok(st), Some(rdev)) => st.st_dev == rdev,
        _ => false,
    }
}

/// Whether `/nix` already holds the stack `config` asks for.
fn already_mounted(config: &Config, source: &str) -> bool {
    let mounts = mountinfo();
    let ro_path = Path::new("/nix/.ro-store");
    let Some(ro) = top_mount(&mounts, ro_path) else {
        return false;
    };
    let same = match config.store {
        StoreSource::Virtiofs(_) => ro.fstype == "virtiofs" && ro.source == source,
        StoreSource::Erofs(_) => ro.fstype == "erofs" && mounted_from(ro_path, source),
    };
    if !same {
        return false;
    }
    match (config.writable, top_mount(&mounts, Path::new("/nix/store"))) {
        (Writable::Tmpfs, Some(store)) => store.fstype == "overlay",
        (Writable::None, Some(store)) => {
            store.fstype == ro.fstype && mounted_from(Path::new("/nix/store"), source)
                || store.fstype == "virtiofs" && store.source == source
        }
        (_, None) => false,
    }
}

/// Resolves the store's source to what mountinfo will show for it.
fn resolved_source(source: &StoreSource, timeout: Duration) -> Result<String, String> {
    match source {
        StoreSource::Virtiofs(tag) => Ok(tag.clone()),
        StoreSource::Erofs(device) => {
            let deadline = deadline(timeout)?;
            loop {
                match probe::find(device) {
                    Ok(found) => return Ok(found.node.to_string_lossy().into_owned()),
                    Err(NotFound::Ambiguous(why)) => return Err(why),
                    Err(found) if Instant::now() >= deadline => {
                        return Err(format!(
                            "expected an erofs image with {device} within {:.1} s; found {found}",
                            timeout.as_secs_f64()
                        ))
                    }
                    Err(_) => std::thread::sleep(POLL),
                }
            }
        }
    }
}

/// Whether this kernel can put a mount beneath another (MOVE_MOUNT_BENEATH, Linux 6.5),
/// found by trying it inside `scratch` (a private tmpfs of ours, whose mounts are not the
/// namespace root's children), not by reading an error of the real switch.
fn beneath_supported(scratch: &Path) -> bool {
    let top = scratch.join("probe-top");
    let new = scratch.join("probe-new");
    if mkdir_p(&top).is_err() || mkdir_p(&new).is_err() {
        return false;
    }
    let tmpfs = |at: &Path| mount("tmpfs", at, "tmpfs", MountFlags::empty(), Some("size=4k"));
    if tmpfs(&top).is_err() || tmpfs(&new).is_err() {
        let _ = rustix::mount::unmount(&top, UnmountFlags::DETACH);
        let _ = rustix::mount::unmount(&new, UnmountFlags::DETACH);
        return false;
    }
    let ok =
        rustix::mount::move_mount(CWD, &new, CWD, &top, MoveMountFlags::MOVE_MOUNT_BENEATH).is_ok();
    // Two mounts either way: stacked at `top`, or one at each.
    let _ = rustix::mount::unmount(&top, UnmountFlags::DETACH);
    let second = if ok { &top } else { &new };
    let _ = rustix::mount::unmount(second, UnmountFlags::DETACH);
    let _ = std::fs::remove_dir(&top);
    let _ = std::fs::remove_dir(&new);
    ok
}

/// Puts the mount at `from` in place at `to`: beneath what is there, which is then
/// detached (`beneath`), or on top of it on kernels without MOVE_MOUNT_BENEATH. Either
/// way one path lookup sees the old mount and the next the new one.
fn replace_mount(from: &Path, to: &Path, occupied: bool, beneath: bool) -> Result<(), String> {
    if occupied && beneath {
        rustix::mount::move_mount(CWD, from, CWD, to, MoveMountFlags::MOVE_MOUNT_BENEATH)
            .map_err(|e| format!("moving {} beneath {}: {e}", from.display(), to.display()))?;
        return rustix::mount::unmount(to, UnmountFlags::DETACH)
            .map_err(|e| format!("detaching the previous mount at {}: {e}", to.display()));
    }
    rustix::mount::mount_move(from, to)
        .map_err(|e| format!("moving {} to {}: {e}", from.display(), to.display()))
}

/// Serialises `mount-store` runs: two switches interleaving their moves would leave a
/// stack made of both.
fn lock() -> Result<std::fs::File, String> {
    let path = Path::new("/run/guest-init.mount-store.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(|e| format!("cannot open the lock {}: {e}", path.display()))?;
    rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive)
        .map_err(|e| format!("cannot lock {}: {e}", path.display()))?;
    Ok(file)
}

/// The mounts directly below /nix/store (paths relative to it), to carry over to the new
/// store as NixOS carries the mounts below /etc over when it switches /etc.
fn submounts(mounts: &[MountEntry]) -> Vec<PathBuf> {
    let store = Path::new("/nix/store");
    let mut subs: Vec<PathBuf> = mounts
        .iter()
        .filter_map(|m| m.mount_point.strip_prefix(store).ok())
        .filter(|rel| !rel.as_os_str().is_empty())
        .map(Path::to_path_buf)
        .collect();
    subs.sort();
    subs.dedup();
    // Only the outermost: a recursive bind brings what is below them.
    let mut outer: Vec<PathBuf> = Vec::new();
    for s in subs {
        if !outer.iter().any(|o| s.starts_with(o)) {
            outer.push(s);
        }
    }
    outer
}

/// `guest-init mount-store`: establishes the stack on a running system, or replaces the
/// one there. Returns what it did, for the log.
///
/// The new stack is built at a private scratch mount, then moved into place, /nix/store
/// first: that one move is the switch. Until it, a failure leaves the old stack as it was.
/// With a writable store the new overlay takes over the existing upper layer (so nothing
/// written before the switch is lost) unless `discard_writes`.
pub fn mount_store(config: &Config, discard_writes: bool) -> Result<String, String> {
    let _lock = lock()?;
    let mut modules = Modules::open();
    load_modules(&mut modules, &config.store, config.writable);
    let source = resolved_source(&config.store, config.timeout)?;
    if already_mounted(config, &source) {
        return Ok(format!("already mounted ({} from {source})", config.store));
    }
    for dir in ["/nix/.ro-store", "/nix/store"] {
        mkdir_p(Path::new(dir))?;
    }
    let before = mountinfo();
    let occupied = |p: &str| top_mount(&before, Path::new(p)).is_some();
    // The existing upper layer, when there is one to keep.
    let keep_upper = config.writable == Writable::Tmpfs
        && !discard_writes
        && top_mount(&before, Path::new("/nix/store")).is_some_and(|m| m.fstype == "overlay")
        && Path::new("/nix/.rw-store/store").is_dir();
    if config.writable == Writable::Tmpfs {
        mkdir_p(Path::new("/nix/.rw-store"))?;
    }

    // A private scratch mount: nothing built here propagates anywhere before it is moved.
    let scratch = PathBuf::from(format!("/run/guest-init.{}", std::process::id()));
    mkdir_p(&scratch)?;
    let result = (|| {
        mount(
            "tmpfs",
            &scratch,
            "tmpfs",
            MountFlags::empty(),
            Some("mode=0700"),
        )
        .map_err(|e| format!("mounting a scratch tmpfs at {}: {e}", scratch.display()))?;
        rustix::mount::mount_change(&scratch, MountPropagationFlags::PRIVATE)
            .map_err(|e| format!("making {} private: {e}", scratch.display()))?;
        let beneath = beneath_supported(&scratch);
        if !beneath {
            say(
                "this kernel cannot put a mount beneath another (Linux 6.5): the previous \
                 store stays mounted, hidden, until reboot",
            );
        }
        let ro = scratch.join(RO_STORE);
        let store = scratch.join(STORE);
        mkdir_p(&ro)?;
        mkdir_p(&store)?;
        let from = mount_source(&config.store, &ro, config.timeout)?;
        match config.writable {
            Writable::Tmpfs if keep_upper => {
                // A fresh work directory: the old overlay still holds its own until it
                // is detached.
                let work = Path::new("/nix/.rw-store").join(format!("work.{}", std::process::id()));
                mkdir_p(&work)?;
                overlay_on(
                    &ro,
                    Path::new("/nix/.rw-store/store"),
                    &work,
                    &store,
                    ",index=off",
                )?;
            }
            Writable::Tmpfs => overlay(&ro, &scratch.join(RW_STORE), &store)?,
            Writable::None => read_only_bind(&ro, &store)?,
        }
        for rel in submounts(&before) {
            let (old, new) = (Path::new("/nix/store").join(&rel), store.join(&rel));
            if !new.is_dir() {
                say(&format!(
                    "not carrying {} over: the new store has no such directory",
                    old.display()
                ));
                continue;
            }
            rustix::mount::mount_bind_recursive(&old, &new)
                .map_err(|e| format!("carrying {} over: {e}", old.display()))?;
        }
        // The switch.
        replace_mount(
            &store,
            Path::new("/nix/store"),
            occupied("/nix/store"),
            beneath,
        )?;
        replace_mount(
            &ro,
            Path::new("/nix/.ro-store"),
            occupied("/nix/.ro-store"),
            beneath,
        )?;
        if config.writable == Writable::Tmpfs && !keep_upper {
            replace_mount(
                &scratch.join(RW_STORE),
                Path::new("/nix/.rw-store"),
                occupied("/nix/.rw-store"),
                beneath,
            )?;
        }
        Ok(format!(
            "mounted {} from {from} at /nix/store{}",
            config.store,
            if keep_upper {
                " (keeping what was written to the store)"
            } else {
                ""
            }
        ))
    })();
    let _ = rustix::mount::unmount(&scratch, UnmountFlags::DETACH);
    let _ = std::fs::remove_dir(&scratch);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape(r"/mnt/a\040b"), "/mnt/a b");
        assert_eq!(unescape(r"plain"), "plain");
        assert_eq!(unescape(r"tail\"), r"tail\");
    }

    #[test]
    fn top_mount_is_the_last_listed() {
        let m = |p: &str, fs: &str, src: &str| MountEntry {
            mount_point: p.into(),
            fstype: fs.into(),
            source: src.into(),
        };
        let mounts = vec![
            m("/nix/store", "erofs", "/dev/vdb"),
            m("/nix/.ro-store", "erofs", "/dev/vdb"),
            m("/nix/store", "erofs", "/dev/vdc"),
        ];
        assert_eq!(
            top_mount(&mounts, Path::new("/nix/store")).unwrap().source,
            "/dev/vdc"
        );
        assert!(top_mount(&mounts, Path::new("/nix")).is_none());
    }
}
