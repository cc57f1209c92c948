//! The store's mount stack, as nixpkgs lays it out:
//!
//! * `/nix/.ro-store`: the store itself (virtiofs share or erofs image), read-only;
//! * `/nix/.rw-store`: a tmpfs holding the overlay's upper and work directories, when
//!   writable;
//! * `/nix/store`: an overlay of the two when writable, else a read-only bind mount of
//!   `/nix/.ro-store`.
//!
//! A running system replaces the stack by building the new one as detached mounts and
//! putting it beneath the old one, which is then detached (see [`mount_store`]), so that
//! no process ever sees a missing or half-built store.

use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::process::Command;

use rustix::fs::CWD;
use rustix::mount::{
    FsMountFlags, FsOpenFlags, MountAttrFlags, MountFlags, MountPropagationFlags, MoveMountFlags,
    OpenTreeFlags, UnmountFlags,
};

use crate::config::{deadline, Config, Device, StoreSource, Writable};
use crate::dax;
use crate::modules::Modules;
use crate::overlay::{self, OverlayOptions};
use crate::probe::{self, NotFound};
use crate::say;

/// Relative to a root (`/` or the real root being prepared).
const RO_STORE: &str = "nix/.ro-store";
const RW_STORE: &str = "nix/.rw-store";
const STORE: &str = "nix/store";

/// How often to look again for a device or tag that is not there yet.
const POLL: Duration = Duration::from_millis(50);

fn mkdir_p(path: &Path) -> Result<(), String> {
    std::fs::create_dir_all(path).map_err(|e| {
        let hint = if e.raw_os_error() == Some(rustix::io::Errno::ROFS.raw_os_error()) {
            "; add that directory to the read-only filesystem, or make it writable"
        } else {
            ""
        };
        format!("cannot create {}: {e}{hint}", path.display())
    })
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
        // virtio_pmem registers the device's memory as an nvdimm region (with libnvdimm and
        // nd_virtio, its dependencies); nd_pmem makes a block device of it that can do DAX.
        StoreSource::Pmem(_) => wanted.extend(["virtio_pmem", "nd_pmem", "erofs"]),
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

/// Runs `f` on a thread of its own and waits for it until `deadline` (and at least 2 s):
/// a virtiofs mount blocks until virtiofsd replies, and one that never answers must not
/// hang PID 1. `None` when it did not finish in time (the thread is left blocked).
fn bounded<T: Send + 'static>(
    deadline: Instant,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<Option<T>, String> {
    let (send, receive) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("virtiofs-mount".into())
        .spawn(move || {
            let _ = send.send(f());
        })
        .map_err(|e| format!("cannot start a thread to mount virtiofs: {e}"))?;
    // Even at the deadline the share gets a moment to answer a mount already sent.
    let wait = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_secs(2));
    Ok(receive.recv_timeout(wait).ok())
}

fn no_answer(tag: &str) -> String {
    format!("the virtiofs share `{tag}` did not answer the mount in time (is virtiofsd running?)")
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
    let at = target.to_owned();
    let ro = MountFlags::RDONLY | MountFlags::NOSUID | MountFlags::NODEV;
    let ((), from) = mount_read_only(source, timeout, move |fstype, from, options| {
        let data = options
            .iter()
            .map(|(key, value)| match value {
                Some(value) => format!("{key}={value}"),
                None => (*key).to_owned(),
            })
            .collect::<Vec<_>>()
            .join(",");
        let data = (!data.is_empty()).then_some(data);
        mount(from, &at, fstype, ro, data.as_deref())?;
        // A virtiofs mount returns before virtiofsd has answered FUSE_INIT; statfs waits
        // for it.
        rustix::fs::statfs(&at).map(|_| ())
    })?;
    if let StoreSource::Pmem(_) = source {
        match rustix::fs::open(
            target,
            rustix::fs::OFlags::PATH | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        ) {
            Ok(store) => {
                dax::report(std::os::fd::AsFd::as_fd(&store), &from);
            }
            Err(e) => say(&format!(
                "warning: cannot tell whether DAX is on for {from}: opening {}: {e}",
                target.display()
            )),
        }
    }
    Ok(from)
}

/// Mount options (`fsconfig` keys and values) for the store's filesystem from `source`:
/// `dax=always` for a pmem device, so that files are mapped rather than copied.
fn store_options(source: &StoreSource) -> &'static [(&'static str, Option<&'static str>)] {
    match source {
        StoreSource::Pmem(_) => &[("dax", Some("always"))],
        _ => &[],
    }
}

/// Finds the device `device` of `source` names, among pmem devices only for a pmem store.
fn find_device(source: &StoreSource, device: &Device) -> Result<probe::Probed, NotFound> {
    match source {
        StoreSource::Pmem(_) => probe::find_pmem(device),
        _ => probe::find(device),
    }
}

/// What is missing when no device matches, for the error message.
fn not_found(source: &StoreSource, device: &Device, found: &str) -> String {
    match source {
        StoreSource::Pmem(_) => format!(
            "no pmem device with {device}; found {found} (the VM needs a virtio-pmem device, \
             e.g. qemu's -device virtio-pmem-pci, and the guest the virtio_pmem and nd_pmem \
             modules)"
        ),
        _ => format!("no erofs image with {device}; found {found}"),
    }
}

/// Mounts the store read-only with `mount`, given the filesystem type and the device node
/// or tag, by whichever mount API `mount` uses; waits up to `timeout` for the device or
/// tag, and gives up on a virtiofs share that does not answer. Returns what `mount`
/// returned, and the mount's source (device node or tag) for the log.
fn mount_read_only<M: Send + 'static>(
    source: &StoreSource,
    timeout: Duration,
    mount: impl Fn(&str, &str, &[(&str, Option<&str>)]) -> rustix::io::Result<M>
        + Clone
        + Send
        + 'static,
) -> Result<(M, String), String> {
    let deadline = deadline(timeout)?;
    let no_filesystem = |fstype| format!("the kernel has no {fstype} filesystem (module missing?)");
    loop {
        let why: String = match source {
            StoreSource::Virtiofs(tag) => {
                let (t, m) = (tag.clone(), mount.clone());
                let mounted = bounded(deadline, move || m("virtiofs", &t, &[]))?
                    .ok_or_else(|| no_answer(tag))?;
                match mounted {
                    Ok(mounted) => return Ok((mounted, tag.clone())),
                    // The device may not have been probed yet: the tag is unknown until then.
                    Err(e @ (rustix::io::Errno::INVAL | rustix::io::Errno::NOENT)) => format!(
                        "no virtiofs share with tag `{tag}` (mount: {e}); found {}",
                        virtiofs_shares()
                    ),
                    Err(rustix::io::Errno::NODEV) => return Err(no_filesystem("virtiofs")),
                    Err(e) => return Err(format!("mounting virtiofs tag `{tag}`: {e}")),
                }
            }
            StoreSource::Erofs(device) | StoreSource::Pmem(device) => {
                match find_device(source, device) {
                    Err(NotFound::Ambiguous(why)) => return Err(why),
                    Ok(found) => {
                        let node = found.node.to_string_lossy().into_owned();
                        let options = store_options(source);
                        let mut mounted = mount("erofs", &node, options);
                        if matches!(mounted, Err(rustix::io::Errno::INVAL)) && !options.is_empty() {
                            // A kernel without filesystem DAX refuses the option outright
                            // (where one that has it turns it off by itself): the store
                            // still works without it, and the check that follows says so.
                            mounted = mount("erofs", &node, &[]);
                            if mounted.is_ok() {
                                say(&format!(
                                    "warning: erofs refused dax=always for {node} (a kernel \
                                     without FS_DAX?): mounted without it"
                                ));
                            }
                        }
                        return match mounted {
                            Ok(mounted) => Ok((mounted, node)),
                            Err(rustix::io::Errno::NODEV) => Err(no_filesystem("erofs")),
                            Err(e) => Err(format!(
                                "{node} ({device}) does not mount as erofs: {e}; {found}"
                            )),
                        };
                    }
                    Err(NotFound::Absent(found)) => not_found(source, device, &found),
                }
            }
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

/// The directories below `/nix` the stack mounts on, for `writable`.
fn mount_points(writable: Writable) -> &'static [&'static str] {
    match writable {
        Writable::Tmpfs => &["store", ".ro-store", ".rw-store"],
        Writable::None => &["store", ".ro-store"],
    }
}

/// Every directory below `/nix` the stack may mount on, whichever `writable` a later
/// `mount-store` asks for.
const ALL_MOUNT_POINTS: [&str; 3] = ["store", ".ro-store", ".rw-store"];

/// Gives a read-only root's `/nix` the stack's mount points without writing to the root.
///
/// The rule: mount points that exist are used as they are, and a writable root gets the
/// missing ones created. A read-only root is never written to: if it has a `/nix`
/// directory, a small read-only tmpfs is mounted on it holding the mount points, with each
/// entry the root's `/nix` held (`var`, say) bound back into it, so that it stays visible
/// and, once the root is remounted read-write, writable on the root as before. What is
/// made later at `/nix`'s top level would be on that tmpfs, so it stays read-only. A
/// read-only root without a `/nix` directory is an error naming what to add.
///
/// Returns whether `/nix` is now that tmpfs (a mount of its own).
fn nix_on_read_only_root(root: &Path, writable: Writable) -> Result<bool, String> {
    let nix = root.join("nix");
    let missing: Vec<&str> = mount_points(writable)
        .iter()
        .copied()
        .filter(|p| !nix.join(p).is_dir())
        .collect();
    if missing.is_empty() {
        return Ok(false);
    }
    // /nix's own filesystem where it exists: it may be a mount of its own.
    let at = if nix.is_dir() { &nix } else { root };
    let read_only = rustix::fs::statvfs(at)
        .map_err(|e| format!("cannot statvfs {}: {e}", at.display()))?
        .f_flag
        .contains(rustix::fs::StatVfsMountFlags::RDONLY);
    if !read_only {
        return Ok(false);
    }
    let list = missing
        .iter()
        .map(|p| format!("/nix/{p}"))
        .collect::<Vec<_>>()
        .join(", ");
    match std::fs::symlink_metadata(&nix) {
        Ok(m) if m.is_dir() => {}
        found => {
            let what = match found {
                Ok(_) => "whose /nix is not a directory",
                Err(_) => "without a /nix directory",
            };
            return Err(format!(
                "the root is mounted read-only (no `rw` on the kernel command line), {what}: \
                 add an empty directory /nix to the root's filesystem (or {list}), or boot \
                 with `rw`"
            ));
        }
    }
    let kept = nix_tmpfs(&nix)?;
    say(&format!(
        "the read-only root has no {list}: a read-only tmpfs at /nix holds the mount \
         points{}",
        match kept {
            0 => String::new(),
            1 => ", with the one entry of the root's /nix bound into it".into(),
            n => format!(", with the {n} entries of the root's /nix bound into it"),
        }
    ));
    Ok(true)
}

/// An entry of the root's `/nix` carried onto the tmpfs that covers it.
enum Kept {
    /// A directory or file, as a detached clone of its mount, and whether a directory.
    Tree(OwnedFd, bool),
    /// A symbolic link, recreated with its target.
    Link(CString),
}

/// Mounts a tmpfs on `nix` (the root's `/nix`, a directory on a read-only root) holding
/// every mount point of the stack and, bound in, what `nix` held; then makes it
/// read-only. Returns how many entries were carried over.
fn nix_tmpfs(nix: &Path) -> Result<usize, String> {
    use rustix::fs::{AtFlags, FileType, Mode, OFlags};
    let failed = |what: &str, e: rustix::io::Errno| format!("{what} {}: {e}", nix.display());
    // Held open: once the tmpfs covers it, the root's /nix is reached only through this.
    let dir = rustix::fs::open(
        nix,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| failed("cannot open", e))?;
    let st = rustix::fs::fstat(&dir).map_err(|e| failed("cannot stat", e))?;
    let names: Vec<CString> = rustix::fs::Dir::read_from(&dir)
        .map_err(|e| failed("cannot list", e))?
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_owned())
        .filter(|n| n.as_bytes() != b"." && n.as_bytes() != b"..")
        // A mount point the stack covers anyway starts empty on the tmpfs.
        .filter(|n| {
            !ALL_MOUNT_POINTS
                .iter()
                .any(|p| p.as_bytes() == n.as_bytes())
        })
        .collect();
    // Cloned before the tmpfs hides them.
    let mut kept = Vec::new();
    for name in names {
        let shown = name.to_string_lossy().into_owned();
        let entry = rustix::fs::statat(&dir, &name, AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| failed(&format!("cannot stat {shown} in"), e))?;
        let carried = match FileType::from_raw_mode(entry.st_mode) {
            t @ (FileType::Directory | FileType::RegularFile) => rustix::mount::open_tree(
                &dir,
                &name,
                OpenTreeFlags::OPEN_TREE_CLONE
                    | OpenTreeFlags::OPEN_TREE_CLOEXEC
                    | OpenTreeFlags::AT_RECURSIVE
                    | OpenTreeFlags::AT_SYMLINK_NOFOLLOW,
            )
            .map(|fd| Kept::Tree(fd, t == FileType::Directory)),
            FileType::Symlink => rustix::fs::readlinkat(&dir, &name, Vec::new()).map(Kept::Link),
            _ => {
                say(&format!(
                    "not carrying {shown} of the root's /nix onto its tmpfs: neither a \
                     directory, a file nor a symbolic link"
                ));
                continue;
            }
        }
        .map_err(|e| failed(&format!("cannot carry {shown} of"), e))?;
        kept.push((name, carried));
    }
    // Owned and mode as the root's /nix. Small: only mount points and their parents live
    // in it.
    let options = format!(
        "mode={:o},uid={},gid={},size=1m,nr_inodes=4k",
        st.st_mode & 0o7777,
        st.st_uid,
        st.st_gid
    );
    mount(
        "tmpfs",
        nix,
        "tmpfs",
        MountFlags::NOSUID | MountFlags::NODEV,
        Some(&options),
    )
    .map_err(|e| failed("cannot mount a tmpfs at", e))?;
    for p in ALL_MOUNT_POINTS {
        mkdir_p(&nix.join(p))?;
    }
    let count = kept.len();
    for (name, carried) in kept {
        let at = nix.join(std::ffi::OsStr::from_bytes(name.as_bytes()));
        match carried {
            Kept::Link(target) => {
                std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(target.as_bytes()), &at)
                    .map_err(|e| format!("cannot recreate the link {}: {e}", at.display()))?;
            }
            Kept::Tree(fd, is_dir) => {
                if is_dir {
                    mkdir_p(&at)?;
                } else {
                    std::fs::File::create(&at)
                        .map_err(|e| format!("cannot create {}: {e}", at.display()))?;
                }
                rustix::mount::move_mount(
                    &fd,
                    "",
                    CWD,
                    &at,
                    MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
                )
                .map_err(|e| format!("cannot bind the root's {} there: {e}", at.display()))?;
            }
        }
    }
    // As read-only as the root it stands in for: nothing written to /nix's top level is
    // silently lost with the tmpfs.
    rustix::mount::mount_remount(
        nix,
        MountFlags::BIND | MountFlags::RDONLY | MountFlags::NOSUID | MountFlags::NODEV,
        "",
    )
    .map_err(|e| failed("cannot make read-only the tmpfs at", e))?;
    Ok(count)
}

/// Mounts the whole stack below `root` (which already has the mount points' parents, or
/// at least `/nix`: see [`nix_on_read_only_root`]).
pub fn mount_stack(root: &Path, config: &Config) -> Result<String, String> {
    let ro_store = root.join(RO_STORE);
    let store = root.join(STORE);
    let nix = root.join("nix");
    if !nix_on_read_only_root(root, config.writable)? {
        mkdir_p(&ro_store)?;
        mkdir_p(&store)?;
        // /nix its own mount: the kernel puts nothing beneath a child of the namespace
        // root, and an initramfs that stays the root is that root. A later `mount-store`
        // can then switch /nix/store with MOVE_MOUNT_BENEATH. (A tmpfs at /nix is already
        // a mount of its own.)
        rustix::mount::mount_bind(&nix, &nix)
            .map_err(|e| format!("bind-mounting {} on itself: {e}", nix.display()))?;
    }
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

/// Mounts the overlay `options` describe at `target`.
fn overlay_on(options: &OverlayOptions, target: &Path) -> Result<(), String> {
    let data = options.data();
    mount(
        "overlay",
        target,
        "overlay",
        overlay::MOUNT_FLAGS,
        Some(&data),
    )
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
    overlay_on(&OverlayOptions::new(lower, &upper, &work)?, target)
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
    /// The filesystem's own options (erofs shows `dax=always` while it is in effect).
    super_options: Vec<String>,
}

/// The mount table, as far as deciding whether the store is mounted needs it.
fn mountinfo() -> Vec<MountEntry> {
    mountinfo::read()
        .unwrap_or_default()
        .into_iter()
        .map(|m| MountEntry {
            source: m.source_lossy(),
            mount_point: m.mount_point,
            fstype: m.fs_type,
            super_options: m.super_options,
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
        // The same device mounted without DAX (as erofs:) is not the store asked for.
        StoreSource::Pmem(_) => {
            ro.fstype == "erofs"
                && mounted_from(ro_path, source)
                && ro.super_options.iter().any(|o| o == "dax=always")
        }
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
        StoreSource::Erofs(device) | StoreSource::Pmem(device) => {
            let deadline = deadline(timeout)?;
            loop {
                match find_device(source, device) {
                    Ok(found) => return Ok(found.node.to_string_lossy().into_owned()),
                    Err(NotFound::Ambiguous(why)) => return Err(why),
                    Err(NotFound::Absent(found)) if Instant::now() >= deadline => {
                        return Err(format!(
                            "expected {source} within {:.1} s: {}",
                            timeout.as_secs_f64(),
                            not_found(source, device, &found)
                        ))
                    }
                    Err(_) => std::thread::sleep(POLL),
                }
            }
        }
    }
}

/// Whether this kernel can put a mount beneath another (MOVE_MOUNT_BENEATH, Linux 6.5),
/// found by trying it, not by reading an error of the real switch. `guest-init
/// probe-beneath` runs [`probe_beneath`] in a mount namespace of its own, so that the trial
/// mounts are seen nowhere.
fn beneath_supported() -> bool {
    match Command::new("/proc/self/exe")
        .arg("probe-beneath")
        .stdin(std::process::Stdio::null())
        .status()
    {
        Ok(s) => s.success(),
        Err(e) => {
            say(&format!("cannot probe for MOVE_MOUNT_BENEATH: {e}"));
            false
        }
    }
}

/// `guest-init probe-beneath`: in a private mount namespace, puts a tmpfs beneath another
/// on a scratch tmpfs (not the namespace root's child, which the kernel refuses).
pub fn probe_beneath() -> bool {
    use rustix::thread::UnshareFlags;
    // SAFETY: this process is single-threaded here and shares no file system state with
    // another thread.
    if unsafe { rustix::thread::unshare_unsafe(UnshareFlags::NEWNS) }.is_err() {
        return false;
    }
    if rustix::mount::mount_change(
        "/",
        MountPropagationFlags::PRIVATE | MountPropagationFlags::REC,
    )
    .is_err()
    {
        return false;
    }
    let scratch = PathBuf::from(format!("/run/guest-init.probe.{}", std::process::id()));
    let tmpfs = |at: &Path| mount("tmpfs", at, "tmpfs", MountFlags::empty(), Some("size=4k"));
    let (top, new) = (scratch.join("top"), scratch.join("new"));
    let ok = mkdir_p(&scratch).is_ok()
        && tmpfs(&scratch).is_ok()
        && mkdir_p(&top).is_ok()
        && mkdir_p(&new).is_ok()
        && tmpfs(&top).is_ok()
        && tmpfs(&new).is_ok()
        && rustix::mount::move_mount(CWD, &new, CWD, &top, MoveMountFlags::MOVE_MOUNT_BENEATH)
            .is_ok();
    let _ = rustix::mount::unmount(&scratch, UnmountFlags::DETACH);
    let _ = std::fs::remove_dir(&scratch);
    ok
}

/// A new mount of `fstype` from `source`, detached: seen nowhere until attached.
fn fs_mount(
    fstype: &str,
    source: Option<&str>,
    options: &[(&str, Option<&str>)],
    attrs: MountAttrFlags,
) -> rustix::io::Result<OwnedFd> {
    let fs = rustix::mount::fsopen(fstype, FsOpenFlags::FSOPEN_CLOEXEC)?;
    if let Some(source) = source {
        rustix::mount::fsconfig_set_string(&fs, "source", source)?;
    }
    for (key, value) in options {
        match value {
            Some(v) => rustix::mount::fsconfig_set_string(&fs, *key, *v)?,
            None => rustix::mount::fsconfig_set_flag(&fs, *key)?,
        }
    }
    rustix::mount::fsconfig_create(&fs)?;
    rustix::mount::fsmount(&fs, FsMountFlags::FSMOUNT_CLOEXEC, attrs)
}

const RO_ATTRS: MountAttrFlags = MountAttrFlags::MOUNT_ATTR_RDONLY
    .union(MountAttrFlags::MOUNT_ATTR_NOSUID)
    .union(MountAttrFlags::MOUNT_ATTR_NODEV);

/// The store as a detached read-only mount, waiting up to `timeout` for its device or tag.
/// Returns it with its source (device node or tag) for the log.
fn detached_source(source: &StoreSource, timeout: Duration) -> Result<(OwnedFd, String), String> {
    mount_read_only(source, timeout, |fstype, from, options| {
        let options: Vec<(&str, Option<&str>)> = [("ro", None)]
            .into_iter()
            .chain(options.iter().copied())
            .collect();
        let fd = fs_mount(fstype, Some(from), &options, RO_ATTRS)?;
        // fstatfs waits for virtiofsd's answer to FUSE_INIT, as in stage 1.
        rustix::fs::fstatfs(&fd).map(|_| fd)
    })
}

/// The path through which a mount held by descriptor is reached, for options (overlay's
/// layers) that take paths.
fn fd_path(fd: &OwnedFd) -> PathBuf {
    use std::os::fd::AsRawFd;
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// Attaches the detached mount `fd` at `to`: beneath what is there (`beneath`; what was
/// there stays on top until [`detach_top`]), or on top of it.
fn attach(fd: &OwnedFd, to: &Path, occupied: bool, beneath: bool) -> Result<(), String> {
    let mut flags = MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH;
    if occupied && beneath {
        flags |= MoveMountFlags::MOVE_MOUNT_BENEATH;
    }
    rustix::mount::move_mount(fd, "", CWD, to, flags).map_err(|e| {
        format!(
            "attaching the new mount {}at {}: {e}",
            if flags.contains(MoveMountFlags::MOVE_MOUNT_BENEATH) {
                "beneath the one "
            } else {
                ""
            },
            to.display()
        )
    })
}

/// Detaches the top mount at `at` (the old one, once the new one is beneath it).
fn detach_top(at: &Path) -> Result<(), String> {
    rustix::mount::unmount(at, UnmountFlags::DETACH)
        .map_err(|e| format!("detaching the previous mount at {}: {e}", at.display()))
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

/// The mounts below /nix/store (paths relative to it, outermost only: a recursive clone
/// brings what is below them), to carry over to the new store as NixOS carries the mounts
/// below /etc over when it switches /etc.
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
/// The new store is built as detached mounts (fsmount, open_tree), seen nowhere until
/// attached; the mounts below /nix/store are cloned into it; then it goes beneath
/// /nix/store and the old one is detached: that is the switch, and until it the old stack
/// is what every process sees. With a writable store the new overlay takes over the
/// existing upper layer (nothing written before the switch is lost) unless
/// `discard_writes`. Kernels without MOVE_MOUNT_BENEATH get the new mounts on top.
/// A failure before the switch leaves the old stack in place (the new read-only layer may
/// then stay attached, unseen, beneath /nix/.ro-store).
pub fn mount_store(config: &Config, discard_writes: bool) -> Result<String, String> {
    let _lock = lock()?;
    let mut modules = Modules::open();
    load_modules(&mut modules, &config.store, config.writable);
    let source = resolved_source(&config.store, config.timeout)?;
    if already_mounted(config, &source) {
        return Ok(format!("already mounted ({} from {source})", config.store));
    }
    let (ro_path, store_path, rw_path) = (
        Path::new("/nix/.ro-store"),
        Path::new("/nix/store"),
        Path::new("/nix/.rw-store"),
    );
    for dir in [ro_path, store_path] {
        mkdir_p(dir)?;
    }
    let before = mountinfo();
    let occupied = |p: &Path| top_mount(&before, p).is_some();
    let keep_upper = config.writable == Writable::Tmpfs
        && !discard_writes
        && top_mount(&before, store_path).is_some_and(|m| m.fstype == "overlay")
        && rw_path.join("store").is_dir();
    let beneath = beneath_supported();
    if !beneath {
        say(
            "this kernel cannot put a mount beneath another (Linux 6.5): the previous \
             store stays mounted, hidden, until reboot",
        );
    }

    let (ro, from) = detached_source(&config.store, config.timeout)?;
    // Before Linux 6.15 neither open_tree nor overlay takes a detached mount: the new
    // read-only store (and a new upper tmpfs) go beneath the old ones first, where nobody
    // sees them yet.
    attach(&ro, ro_path, occupied(ro_path), beneath)?;
    if let StoreSource::Pmem(_) = config.store {
        // Attached, the new mount is listed in mountinfo with its options.
        dax::report(std::os::fd::AsFd::as_fd(&ro), &from);
    }
    let mut replaced = vec![ro_path];
    let store = match config.writable {
        Writable::None => rustix::mount::open_tree(
            &ro,
            "",
            OpenTreeFlags::OPEN_TREE_CLONE
                | OpenTreeFlags::OPEN_TREE_CLOEXEC
                | OpenTreeFlags::AT_EMPTY_PATH,
        )
        .map_err(|e| format!("cloning the new store's mount: {e}"))?,
        Writable::Tmpfs => {
            let lower = fd_path(&ro);
            // A new writable layer is named through its descriptor, held until the
            // overlay has taken its directories.
            let (options, _rw) = if keep_upper {
                // A fresh work directory: the old overlay holds its own until detached.
                let work = rw_path.join(format!("work.{}", std::process::id()));
                mkdir_p(&work)?;
                let upper = rw_path.join("store");
                (
                    OverlayOptions::new(&lower, &upper, &work)?.without_index(),
                    None,
                )
            } else {
                mkdir_p(rw_path)?;
                let rw = fs_mount(
                    "tmpfs",
                    Some("tmpfs"),
                    &[("mode", Some("0755"))],
                    MountAttrFlags::MOUNT_ATTR_NOSUID | MountAttrFlags::MOUNT_ATTR_NODEV,
                )
                .map_err(|e| format!("mounting a tmpfs for the writable layer: {e}"))?;
                for d in ["store", "work"] {
                    rustix::fs::mkdirat(&rw, d, rustix::fs::Mode::from_raw_mode(0o755))
                        .map_err(|e| format!("creating {d} in the new writable layer: {e}"))?;
                }
                attach(&rw, rw_path, occupied(rw_path), beneath)?;
                replaced.push(rw_path);
                let dirs = fd_path(&rw);
                let options = OverlayOptions::new(&lower, &dirs.join("store"), &dirs.join("work"))?;
                (options, Some(rw))
            };
            fs_mount("overlay", None, &options.fsconfig(), overlay::MOUNT_ATTRS).map_err(|e| {
                let hint = match e {
                    rustix::io::Errno::NODEV => " (the kernel has no overlay filesystem)",
                    _ => "",
                };
                format!("mounting the overlay ({}): {e}{hint}", options.data())
            })?
        }
    };
    // The mounts below the old store, cloned while it is still the one at /nix/store.
    let mut carried = Vec::new();
    for rel in submounts(&before) {
        let old = store_path.join(&rel);
        let clone = rustix::mount::open_tree(
            CWD,
            &old,
            OpenTreeFlags::OPEN_TREE_CLONE
                | OpenTreeFlags::OPEN_TREE_CLOEXEC
                | OpenTreeFlags::AT_RECURSIVE,
        )
        .map_err(|e| format!("cloning {} to carry it over: {e}", old.display()))?;
        carried.push((rel, clone));
    }
    attach(&store, store_path, occupied(store_path), beneath)?;
    // Beneath the old store the new one is reached only through its descriptor: the
    // clones go into it before it shows.
    for (rel, clone) in carried {
        if let Err(e) = rustix::mount::move_mount(
            &clone,
            "",
            &store,
            &rel,
            MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
        ) {
            say(&format!(
                "not carrying {} over: {e}",
                store_path.join(&rel).display()
            ));
        }
    }
    if beneath {
        if occupied(store_path) {
            // The switch.
            detach_top(store_path)?;
        }
        for p in replaced {
            if occupied(p) {
                detach_top(p)?;
            }
        }
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_mount_is_the_last_listed() {
        let m = |p: &str, fs: &str, src: &str| MountEntry {
            mount_point: p.into(),
            fstype: fs.into(),
            source: src.into(),
            super_options: vec!["ro".into()],
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
