//! Booting a real Linux kernel under qemu (TCG) with an initramfs built here, to test
//! `guest-init` and the store it mounts: nixstorefs shared with virtiofsd, or erofs images
//! as virtio disks or virtio-pmem devices.
//!
//! Every boot is bounded ([`BOOT_TIMEOUT`] unless told otherwise) and owns its processes
//! and files: qemu and virtiofsd are killed and temporary files removed before
//! [`Guest::boot`] returns, and both die with the test thread if the test is killed.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::fs::{symlink, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::harness;
use crate::sample::{base_name, SampleStore};

/// Default hard limit on one boot, after which qemu and virtiofsd are killed.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(90);
/// Guest memory in MiB (and the size of the shared memory backend virtiofs needs).
pub const MEMORY_MIB: u32 = 512;
/// Environment variable naming the guest-init binary to put in initramfs images.
pub const GUEST_INIT_ENV: &str = "GUEST_INIT_BIN";
/// Set to anything to copy every guest's console to stderr as it comes.
pub const ECHO_ENV: &str = "NIXSTOREFS_VM_ECHO";
/// Printed by guest-init when it gives up.
pub const GUEST_INIT_ERROR: &str = "guest-init: error";
/// The Rust target guest-init is built for, statically.
pub const GUEST_INIT_TARGET: &str = "x86_64-unknown-linux-gnu";
/// Modules guest-init needs to mount a store from a virtio disk or virtiofs.
pub const STORE_MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_blk",
    "virtiofs",
    "fuse",
    "erofs",
    "overlay",
];
/// Modules included when the kernel has them: erofs's libcrc32c and its crc32c (modules
/// up to 6.1, library code built in since), crc32c-intel (it needs SSE 4.2 to load), loop
/// (for images attached with losetup), virtio-mmio (microvm-style machines), virtio-pmem
/// and nd_pmem (images mapped with DAX).
pub const OPTIONAL_STORE_MODULES: &[&str] = &[
    "libcrc32c",
    "crc32c_generic",
    "crc32c_intel",
    "loop",
    "virtio_mmio",
    "virtio_pmem",
    "nd_pmem",
];
/// A virtio-pmem device's size must be a multiple of this: qemu's `align=2M` for the
/// memory backend, and the guest's memory hot-plug, which adds memory in such sections.
pub const PMEM_ALIGN: u64 = 2 << 20;
/// Where scripts/install-deps.sh extracts the other guest kernels (`6.12/`, `newest/`);
/// overridden by `NIXSTOREFS_KERNELS`.
pub const KERNELS_DIR: &str = "/var/tmp/nixstorefs-kernels";
/// The `modules.*` files copied unchanged into initramfs images, when the host has them.
pub const MODULE_INDEX_FILES: &[&str] = &[
    "modules.dep",
    "modules.softdep",
    "modules.alias",
    "modules.builtin",
];

/// The first executable called `name` in `$PATH`.
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// qemu-system-x86_64; panics, saying what to install, if it is missing: a VM test
/// without qemu fails, it never passes by doing nothing.
pub fn qemu() -> PathBuf {
    crate::harness::tool("qemu-system-x86_64", "qemu-system-x86")
}

/// The virtiofsd binary: from `$PATH`, `~/.cargo/bin` or Debian's `/usr/libexec`.
/// Panics if there is none.
pub fn virtiofsd() -> PathBuf {
    let mut candidates = Vec::new();
    if let Some(p) = which("virtiofsd") {
        candidates.push(p);
    }
    if let Some(home) = std::env::var_os("HOME") {
        candidates.push(Path::new(&home).join(".cargo/bin/virtiofsd"));
    }
    candidates.push(PathBuf::from("/usr/libexec/virtiofsd"));
    candidates
        .into_iter()
        .find(|p| is_executable(p))
        .unwrap_or_else(|| {
            panic!(
                "virtiofsd not found in PATH, ~/.cargo/bin or /usr/libexec: VM tests with \
                 virtiofs need it (cargo install virtiofsd; {})",
                crate::harness::INSTALL_HINT
            )
        })
}

/// The workspace's target directory, as seen from this test executable.
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("cannot find the test executable");
    let mut dir = exe
        .parent()
        .expect("the test executable has no directory")
        .to_path_buf();
    // target/<profile>/deps/<test>, or target/<profile>/<bin>.
    if dir.file_name() == Some("deps".as_ref()) {
        dir.pop();
    }
    dir.pop();
    dir
}

/// The static guest-init binary: `$GUEST_INIT_BIN`, else
/// `target/x86_64-unknown-linux-gnu/<profile>/guest-init`. Panics, saying how to build it,
/// when it is missing.
pub fn guest_init_bin() -> PathBuf {
    if let Some(p) = std::env::var_os(GUEST_INIT_ENV) {
        let p = PathBuf::from(p);
        assert!(
            p.is_file(),
            "{GUEST_INIT_ENV}={} is not a file",
            p.display()
        );
        return p;
    }
    let exe = std::env::current_exe().expect("cannot find the test executable");
    let profile = exe
        .ancestors()
        .skip(1)
        .find(|d| d.file_name() != Some("deps".as_ref()))
        .and_then(|d| d.file_name())
        .and_then(|n| n.to_str())
        .unwrap_or("debug")
        .to_string();
    let p = target_dir()
        .join(GUEST_INIT_TARGET)
        .join(&profile)
        .join("guest-init");
    if !p.is_file() {
        let release = if profile == "release" {
            " --release"
        } else {
            ""
        };
        panic!(
            "guest-init not found at {}: build it with\n  \
             RUSTFLAGS=\"-C target-feature=+crt-static\" cargo build -p guest-init \
             --target {GUEST_INIT_TARGET}{release}\nor set {GUEST_INIT_ENV}",
            p.display()
        );
    }
    p
}

/// A guest kernel and its modules.
#[derive(Clone, Debug)]
pub struct Kernel {
    /// Its release (`uname -r` in the guest), e.g. `6.1.0-56-amd64`.
    pub version: String,
    /// The bootable image, `/boot/vmlinuz-<version>`.
    pub image: PathBuf,
    /// `/lib/modules/<version>`.
    pub modules_dir: PathBuf,
}

/// Orders kernel releases by their numbers, so that 6.10 comes after 6.9.
fn version_key(v: &str) -> Vec<(u64, String)> {
    let mut key = Vec::new();
    let mut rest = v;
    while !rest.is_empty() {
        let digits = rest.len() - rest.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        let (num, tail) = rest.split_at(digits);
        let text_len = tail.len() - tail.trim_start_matches(|c: char| !c.is_ascii_digit()).len();
        let (text, tail) = tail.split_at(text_len);
        key.push((num.parse().unwrap_or(0), text.to_string()));
        rest = tail;
    }
    key
}

impl Kernel {
    /// The newest `/boot/vmlinuz-*` whose `/lib/modules/<version>` exists.
    pub fn find() -> Kernel {
        Kernel::find_in(Path::new("/boot"), Path::new("/lib/modules")).unwrap_or_else(|e| {
            panic!(
                "no guest kernel: {e}; VM tests need Debian's kernel \
                 (apt-get install linux-image-amd64; {})",
                crate::harness::INSTALL_HINT
            )
        })
    }

    /// Debian's 6.12 kernel with its modules as the package ships them (`.ko.xz`), as
    /// scripts/install-deps.sh extracts it under [`KERNELS_DIR`]. Panics, saying how to get
    /// it, when it is missing.
    pub fn compressed_modules() -> Kernel {
        Kernel::extracted(
            "6.12",
            "Debian's linux-image-6.12 package (bookworm-backports)",
        )
    }

    /// The newest Linux Debian 13's backports carry (7.3 when this was written), with its
    /// `.ko.xz` modules and virtio-fs built in, as scripts/install-deps.sh extracts it
    /// under [`KERNELS_DIR`]`/newest`. Panics, saying how to get it, when it is missing.
    pub fn newest() -> Kernel {
        Kernel::extracted(
            "newest",
            "the newest linux-binary, linux-modules and linux-base packages of \
             trixie-backports",
        )
    }

    /// A kernel scripts/install-deps.sh extracted into `name` below [`KERNELS_DIR`] from
    /// `packages`.
    fn extracted(name: &str, packages: &str) -> Kernel {
        let base = std::env::var_os("NIXSTOREFS_KERNELS")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(KERNELS_DIR))
            .join(name);
        Kernel::find_in(&base.join("boot"), &base.join("lib/modules")).unwrap_or_else(|e| {
            panic!(
                "no {name} guest kernel: {e}; run scripts/install-deps.sh, which extracts \
                 {packages} there"
            )
        })
    }

    /// Like [`Kernel::find`] with other directories; says what is missing on failure.
    pub fn find_in(boot: &Path, modules: &Path) -> Result<Kernel, String> {
        let entries =
            fs::read_dir(boot).map_err(|e| format!("cannot list {}: {e}", boot.display()))?;
        let mut found = Vec::new();
        for e in entries.flatten() {
            let name = e.file_name();
            let Some(version) = name.to_str().and_then(|n| n.strip_prefix("vmlinuz-")) else {
                continue;
            };
            let modules_dir = modules.join(version);
            if modules_dir.join("modules.dep").is_file() {
                found.push(Kernel {
                    version: version.to_string(),
                    image: e.path(),
                    modules_dir,
                });
            }
        }
        found
            .into_iter()
            .max_by_key(|k| version_key(&k.version))
            .ok_or_else(|| {
                format!(
                    "no {}/vmlinuz-<version> with a {}/<version>/modules.dep",
                    boot.display(),
                    modules.display()
                )
            })
    }

    /// Paths, relative to [`Kernel::modules_dir`], of the module files needed to load
    /// `required` and, if the kernel has them, `optional`, with everything they depend on
    /// (modules.dep) and their soft dependencies (modules.softdep, through modules.alias).
    /// Built-in modules need no file. Fails if a required module is unknown.
    pub fn module_files(&self, required: &[&str], optional: &[&str]) -> io::Result<Vec<String>> {
        ModuleIndex::load(&self.modules_dir)?.resolve(required, optional)
    }
}

/// Module names compare with `-` and `_` alike, as modprobe does.
fn module_name(s: &str) -> String {
    let file = s.rsplit('/').next().unwrap_or(s);
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

struct ModuleIndex {
    /// Module name to its file and the files it depends on.
    deps: HashMap<String, (String, Vec<String>)>,
    builtin: BTreeSet<String>,
    /// Soft dependencies to load before (`pre:`) and after (`post:`) a module.
    softdeps: HashMap<String, (Vec<String>, Vec<String>)>,
    /// Exact (wildcard-free) aliases to module names.
    aliases: HashMap<String, Vec<String>>,
}

impl ModuleIndex {
    fn load(dir: &Path) -> io::Result<ModuleIndex> {
        let read = |name: &str| -> io::Result<String> {
            match fs::read_to_string(dir.join(name)) {
                Err(e) if e.kind() == io::ErrorKind::NotFound && name != "modules.dep" => {
                    Ok(String::new())
                }
                r => r,
            }
        };
        let mut deps = HashMap::new();
        for line in read("modules.dep")?.lines() {
            let Some((file, rest)) = line.split_once(':') else {
                continue;
            };
            let list = rest.split_whitespace().map(str::to_string).collect();
            deps.insert(module_name(file), (file.to_string(), list));
        }
        let builtin = read("modules.builtin")?.lines().map(module_name).collect();
        let mut softdeps: HashMap<String, (Vec<String>, Vec<String>)> = HashMap::new();
        for line in read("modules.softdep")?.lines() {
            let mut words = line.split_whitespace();
            if words.next() != Some("softdep") {
                continue;
            }
            let Some(m) = words.next() else { continue };
            let entry = softdeps.entry(module_name(m)).or_default();
            let mut post = false;
            for w in words {
                match w {
                    "pre:" => post = false,
                    "post:" => post = true,
                    _ if post => entry.1.push(w.to_string()),
                    _ => entry.0.push(w.to_string()),
                }
            }
        }
        let mut aliases: HashMap<String, Vec<String>> = HashMap::new();
        for line in read("modules.alias")?.lines() {
            let mut words = line.split_whitespace();
            if let (Some("alias"), Some(a), Some(m)) = (words.next(), words.next(), words.next()) {
                if !a.contains(['*', '?', '[']) {
                    aliases
                        .entry(module_name(a))
                        .or_default()
                        .push(module_name(m));
                }
            }
        }
        Ok(ModuleIndex {
            deps,
            builtin,
            softdeps,
            aliases,
        })
    }

    /// The files for `required` and `optional`, in an order they can be loaded in.
    fn resolve(&self, required: &[&str], optional: &[&str]) -> io::Result<Vec<String>> {
        let mut files = Vec::new();
        let mut seen = BTreeSet::new();
        for m in required {
            self.visit(&module_name(m), true, &mut seen, &mut files)?;
        }
        for m in optional {
            self.visit(&module_name(m), false, &mut seen, &mut files)?;
        }
        Ok(files)
    }

    fn visit(
        &self,
        name: &str,
        needed: bool,
        seen: &mut BTreeSet<String>,
        files: &mut Vec<String>,
    ) -> io::Result<()> {
        if !seen.insert(name.to_string()) {
            return Ok(());
        }
        if let Some((file, deps)) = self.deps.get(name) {
            let (pre, post) = self.softdeps.get(name).cloned().unwrap_or_default();
            for s in &pre {
                self.visit(&module_name(s), false, seen, files)?;
            }
            // modules.dep lists the deepest dependencies last.
            for d in deps.iter().rev() {
                self.visit(&module_name(d), true, seen, files)?;
            }
            files.push(file.clone());
            for s in &post {
                self.visit(&module_name(s), false, seen, files)?;
            }
        } else if self.builtin.contains(name) {
        } else if let Some(targets) = self.aliases.get(name) {
            // Soft dependencies name aliases too (libcrc32c's "crc32c").
            for t in targets {
                self.visit(t, false, seen, files)?;
            }
        } else if needed {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("kernel module {name} is neither in modules.dep nor built in"),
            ));
        }
        Ok(())
    }
}

/// `guest-init/mkinitramfs.sh`, the script the README gives users.
pub fn mkinitramfs_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../guest-init/mkinitramfs.sh")
}

/// Writes to `out` the initramfs for `kernel` that `guest-init/mkinitramfs.sh` builds
/// with this guest-init and the store's modules plus `extra`, as the README tells users
/// to. Panics with the script's output if it fails.
pub fn mkinitramfs(kernel: &Kernel, extra: &[&str], out: &Path) {
    let script = mkinitramfs_script();
    let o = harness::run(
        Command::new("bash")
            .arg(&script)
            .arg(guest_init_bin())
            .arg(&kernel.modules_dir)
            .arg(out)
            .args(extra)
            .stdin(Stdio::null()),
        Duration::from_secs(120),
    );
    assert!(
        o.status.success(),
        "{} failed ({}):\n{}{}",
        script.display(),
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

enum Source {
    Bytes(Vec<u8>),
    Host(PathBuf),
}

enum Node {
    Dir,
    File { mode: u32, source: Source },
    Symlink(String),
    CharDev { mode: u32, major: u32, minor: u32 },
}

/// An initramfs: an uncompressed newc cpio archive, built in memory (host files are only
/// read when it is written).
pub struct Initramfs {
    nodes: BTreeMap<String, Node>,
}

impl Default for Initramfs {
    fn default() -> Self {
        Initramfs::new()
    }
}

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

fn archive_name(path: &str) -> String {
    path.trim_matches('/').to_string()
}

impl Initramfs {
    /// The skeleton: `/proc /sys /dev /run /nix /tmp /etc`, and `/dev/console`, which the
    /// kernel opens for init's stdio before anything can mount devtmpfs.
    pub fn new() -> Initramfs {
        let mut i = Initramfs {
            nodes: BTreeMap::new(),
        };
        for d in ["/proc", "/sys", "/dev", "/run", "/nix", "/tmp", "/etc"] {
            i.dir(d);
        }
        i.char_device("/dev/console", 0o600, 5, 1);
        i
    }

    /// What guest-init needs as `/init`: the skeleton, guest-init, the store modules of
    /// `kernel` with the module index, and busybox at `/bin` (for debugging and rescue).
    pub fn for_guest_init(kernel: &Kernel) -> Initramfs {
        let mut i = Initramfs::new();
        i.copy("/init", guest_init_bin(), 0o755);
        i.modules(kernel, STORE_MODULES, OPTIONAL_STORE_MODULES)
            .unwrap_or_else(|e| panic!("kernel {}: {e}", kernel.version));
        i.busybox();
        i
    }

    fn parents(&mut self, name: &str) {
        let mut at = 0;
        while let Some(i) = name[at..].find('/') {
            let parent = &name[..at + i];
            self.nodes.entry(parent.to_string()).or_insert(Node::Dir);
            at += i + 1;
        }
    }

    fn put(&mut self, path: &str, node: Node) -> &mut Self {
        let name = archive_name(path);
        assert!(!name.is_empty(), "the root is implicit");
        self.parents(&name);
        self.nodes.insert(name, node);
        self
    }

    /// A directory (parents are added as needed for every entry).
    pub fn dir(&mut self, path: &str) -> &mut Self {
        self.put(path, Node::Dir)
    }

    /// A file with `data`.
    pub fn file(&mut self, path: &str, data: impl Into<Vec<u8>>, mode: u32) -> &mut Self {
        self.put(
            path,
            Node::File {
                mode,
                source: Source::Bytes(data.into()),
            },
        )
    }

    /// A file copied from `host` when the archive is written.
    pub fn copy(&mut self, path: &str, host: impl Into<PathBuf>, mode: u32) -> &mut Self {
        self.put(
            path,
            Node::File {
                mode,
                source: Source::Host(host.into()),
            },
        )
    }

    /// A symbolic link to `target`.
    pub fn symlink(&mut self, path: &str, target: &str) -> &mut Self {
        self.put(path, Node::Symlink(target.to_string()))
    }

    /// A character device node.
    pub fn char_device(&mut self, path: &str, mode: u32, major: u32, minor: u32) -> &mut Self {
        self.put(path, Node::CharDev { mode, major, minor })
    }

    /// Static busybox (the host's `/bin/busybox`) at `/bin/busybox`, with `/bin/sh` and a
    /// few other applets linked to it. Panics if the host has none.
    pub fn busybox(&mut self) -> &mut Self {
        let bb = host_busybox();
        self.copy("/bin/busybox", bb, 0o755);
        for applet in ["sh", "ls", "cat", "mount", "umount", "dmesg", "poweroff"] {
            self.symlink(&format!("/bin/{applet}"), "busybox");
        }
        self
    }

    /// The module files of `kernel` for `required` and `optional` modules (see
    /// [`Kernel::module_files`]) under `/lib/modules/<version>/`, and the module index
    /// files ([`MODULE_INDEX_FILES`]) unchanged. Returns the module files added.
    pub fn modules(
        &mut self,
        kernel: &Kernel,
        required: &[&str],
        optional: &[&str],
    ) -> io::Result<Vec<String>> {
        let files = kernel.module_files(required, optional)?;
        let base = format!("/lib/modules/{}", kernel.version);
        for f in &files {
            self.copy(&format!("{base}/{f}"), kernel.modules_dir.join(f), 0o644);
        }
        for index in MODULE_INDEX_FILES {
            let host = kernel.modules_dir.join(index);
            if host.is_file() {
                self.copy(&format!("{base}/{index}"), host, 0o644);
            }
        }
        Ok(files)
    }

    /// Whether the archive has an entry at `path`.
    pub fn contains(&self, path: &str) -> bool {
        self.nodes.contains_key(&archive_name(path))
    }

    /// Writes the archive to `out`.
    pub fn write(&self, out: &Path) -> io::Result<()> {
        let mut w = BufWriter::new(File::create(out)?);
        // Sorted names put every directory before what it holds, as the kernel needs.
        for (ino, (name, node)) in self.nodes.iter().enumerate() {
            let ino = ino as u32 + 1;
            match node {
                Node::Dir => cpio_entry(&mut w, ino, S_IFDIR | 0o755, 2, (0, 0), name, &[])?,
                Node::Symlink(t) => {
                    cpio_entry(&mut w, ino, S_IFLNK | 0o777, 1, (0, 0), name, t.as_bytes())?
                }
                Node::CharDev { mode, major, minor } => {
                    cpio_entry(&mut w, ino, S_IFCHR | mode, 1, (*major, *minor), name, &[])?
                }
                Node::File { mode, source } => {
                    let data = match source {
                        Source::Bytes(b) => std::borrow::Cow::Borrowed(b),
                        Source::Host(p) => std::borrow::Cow::Owned(fs::read(p).map_err(|e| {
                            io::Error::new(e.kind(), format!("{}: {e}", p.display()))
                        })?),
                    };
                    cpio_entry(&mut w, ino, S_IFREG | mode, 1, (0, 0), name, &data)?
                }
            }
        }
        cpio_entry(&mut w, 0, 0, 1, (0, 0), "TRAILER!!!", &[])?;
        w.into_inner().map_err(|e| e.into_error())?.sync_all()
    }
}

/// One newc record: the 110-byte ASCII header, the name, the data, each padded to 4 bytes.
fn cpio_entry(
    w: &mut impl Write,
    ino: u32,
    mode: u32,
    nlink: u32,
    rdev: (u32, u32),
    name: &str,
    data: &[u8],
) -> io::Result<()> {
    let size = u32::try_from(data.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "file too big for cpio"))?;
    let namesize = name.len() as u32 + 1;
    // ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor rdevminor namesize check
    let header = format!(
        "070701{ino:08x}{mode:08x}{:08x}{:08x}{nlink:08x}{:08x}{size:08x}{:08x}{:08x}{:08x}{:08x}{namesize:08x}{:08x}",
        0, 0, 0, 0, 0, rdev.0, rdev.1, 0
    );
    w.write_all(header.as_bytes())?;
    w.write_all(name.as_bytes())?;
    w.write_all(&[0])?;
    let pad = |n: usize| (4 - n % 4) % 4;
    w.write_all(&[0; 4][..pad(header.len() + namesize as usize)])?;
    w.write_all(data)?;
    w.write_all(&[0; 4][..pad(data.len())])?;
    Ok(())
}

/// The host's static busybox; panics if there is none.
pub fn host_busybox() -> PathBuf {
    ["/bin/busybox", "/usr/bin/busybox"]
        .iter()
        .map(PathBuf::from)
        .find(|p| is_executable(p))
        .unwrap_or_else(|| {
            panic!(
                "no /bin/busybox: VM tests need a static busybox \
                 (apt-get install busybox-static; {})",
                crate::harness::INSTALL_HINT
            )
        })
}

/// A program for a guest to run, living in a store path of a sample store.
#[derive(Clone, Debug)]
pub struct GuestProgram {
    /// Base name of its store path.
    pub base: String,
}

impl GuestProgram {
    /// The script's path inside the guest, whose store is always at `/nix/store`.
    pub fn run_path(&self) -> String {
        format!("/nix/store/{}/bin/run", self.base)
    }

    /// The kernel command-line word that makes guest-init run it.
    pub fn init_arg(&self) -> String {
        format!("init={}", self.run_path())
    }
}

/// Adds a store path `<hash>-<name>` to `s` holding `bin/busybox` (a copy of the host's
/// static busybox), a link to it for each of its applets, and `bin/run`: a busybox shell
/// script with `body`, with `PATH` set to that `bin`, that ends by powering the VM off.
/// The path is appended to the closure file and to `s.closure`.
pub fn add_guest_program(s: &mut SampleStore, name: &str, body: &str) -> io::Result<GuestProgram> {
    let base = base_name(name);
    let root = s.store_dir.join(&base);
    let bin = root.join("bin");
    fs::create_dir_all(&bin)?;
    let bb = host_busybox();
    fs::copy(&bb, bin.join("busybox"))?;
    let list = harness::run(
        Command::new(&bb).arg("--list").stdin(Stdio::null()),
        Duration::from_secs(10),
    );
    for applet in String::from_utf8_lossy(&list.stdout).split_whitespace() {
        if applet != "busybox" && !applet.contains('/') && applet != "run" {
            symlink("busybox", bin.join(applet))?;
        }
    }
    let dir = format!("/nix/store/{base}/bin");
    let script = format!(
        "#!{dir}/busybox sh\n\
         # Guest test program written by nixstorefs_tests::vm.\n\
         export PATH={dir}\n\
         {body}\n\
         sync\n\
         busybox poweroff -f\n"
    );
    fs::write(bin.join("run"), script)?;
    fs::set_permissions(bin.join("run"), fs::Permissions::from_mode(0o555))?;
    fs::set_permissions(bin.join("busybox"), fs::Permissions::from_mode(0o555))?;
    fs::set_permissions(&bin, fs::Permissions::from_mode(0o555))?;
    fs::set_permissions(&root, fs::Permissions::from_mode(0o555))?;
    append_to_closure(s, &base)?;
    Ok(GuestProgram { base })
}

/// Writes a store path `<hash>-<name>` into `s`'s store directory with `files` (relative
/// path, content) in it, without adding it to any closure; returns its base name.
pub fn add_store_path(s: &SampleStore, name: &str, files: &[(&str, &[u8])]) -> io::Result<String> {
    let base = base_name(name);
    let root = s.store_dir.join(&base);
    fs::create_dir(&root)?;
    for (rel, data) in files {
        let p = root.join(rel);
        if let Some(parent) = p.parent() {
            fs::create_dir_all(parent)?;
        }
        fs::write(&p, data)?;
        fs::set_permissions(&p, fs::Permissions::from_mode(0o444))?;
    }
    Ok(base)
}

/// Appends `<store_dir>/<base>` to `s`'s closure file and adds `base` to `s.closure`.
pub fn append_to_closure(s: &mut SampleStore, base: &str) -> io::Result<()> {
    let mut f = fs::OpenOptions::new().append(true).open(&s.closure_file)?;
    writeln!(f, "{}", s.store_dir.join(base).display())?;
    s.closure.push(base.to_string());
    s.closure.sort();
    Ok(())
}

/// Escapes a value for a qemu `-opt key=value,...` list.
fn qemu_value(p: &Path) -> String {
    p.display().to_string().replace(',', ",,")
}

/// Makes a child die with the thread that started it, so that a test killed by its runner
/// leaves no qemu or virtiofsd behind.
fn die_with_parent(cmd: &mut Command) -> &mut Command {
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

/// A child killed and reaped on drop.
struct Reaped {
    child: Option<Child>,
}

impl Reaped {
    fn child(&mut self) -> &mut Child {
        self.child.as_mut().unwrap()
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Reads a pipe to the end in a thread, optionally echoing it to stderr.
struct Capture {
    buf: Arc<Mutex<Vec<u8>>>,
    thread: Option<JoinHandle<()>>,
}

impl Capture {
    fn start<R: Read + Send + 'static>(pipe: Option<R>, echo: bool) -> Capture {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let b = buf.clone();
        let thread = pipe.map(|mut pipe| {
            thread::spawn(move || {
                let mut chunk = [0u8; 4096];
                while let Ok(n) = pipe.read(&mut chunk) {
                    if n == 0 {
                        break;
                    }
                    if echo {
                        let _ = io::stderr().write_all(&chunk[..n]);
                    }
                    b.lock().unwrap().extend_from_slice(&chunk[..n]);
                }
            })
        });
        Capture { buf, thread }
    }

    /// What has been read so far.
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.buf.lock().unwrap()).into_owned()
    }

    /// What was read; waits (briefly) for the reader to see the end of the pipe.
    fn finish(mut self) -> String {
        if let Some(t) = self.thread.take() {
            let deadline = Instant::now() + Duration::from_secs(2);
            while !t.is_finished() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(5));
            }
        }
        let b = self.buf.lock().unwrap();
        String::from_utf8_lossy(&b).into_owned()
    }
}

struct Share {
    tag: String,
    source: ShareSource,
}

/// What serves a virtiofs share.
enum ShareSource {
    /// virtiofsd, sharing a host directory.
    Virtiofsd { dir: PathBuf, readonly: bool },
    /// nixstorefs's own vhost-user backend (`--socket-path`), serving a closure, run as
    /// [`UNPRIVILEGED_UID`].
    Native {
        store_dir: PathBuf,
        closure: PathBuf,
        args: Vec<String>,
    },
}

/// The user (and group) the native backend runs as in guest tests: `nobody`, with no
/// capabilities and no access to /dev/fuse.
pub const UNPRIVILEGED_UID: u32 = 65534;

/// Runs on the harness thread when a marker first appears on the guest's console.
type ConsoleHook = (String, Box<dyn FnOnce() + Send>);

/// What the harness saw of a share's daemon (virtiofsd, or the native backend) while the
/// guest ran, and how it ended.
#[derive(Clone, Debug, Default)]
pub struct BackendReport {
    /// The share's tag.
    pub tag: String,
    /// Whether it is nixstorefs's own backend (else virtiofsd).
    pub native: bool,
    /// A native backend's exit status, if it exited by itself within
    /// [`BACKEND_EXIT_TIMEOUT`] of qemu's exit; `None` if it had to be killed (virtiofsd is
    /// always killed).
    pub status: Option<ExitStatus>,
    /// Samples of /proc taken while the guest ran (every 100 ms).
    pub samples: usize,
    /// The largest number of descriptors the daemon held.
    pub max_fds: usize,
    /// The largest private resident memory (RssAnon) seen, in KiB.
    pub max_anon_kib: u64,
    /// The largest resident memory (VmRSS) seen, in KiB, guest memory the daemon touched
    /// included.
    pub max_rss_kib: u64,
    /// The daemon's real, effective and saved user ids (first sample).
    pub uids: Vec<u32>,
    /// Its effective capabilities (hex, first sample).
    pub cap_eff: String,
    /// Whether it ever had /dev/fuse open.
    pub had_dev_fuse: bool,
    /// `NoNewPrivs` in the last sample (the sandbox is entered after startup).
    pub no_new_privs: bool,
    /// `Seccomp` in the last sample: 2 is a filter.
    pub seccomp: u32,
}

/// qemu's own memory when a console marker first showed (see [`Guest::sample_qemu_on`]).
#[derive(Clone, Debug)]
pub struct QemuSample {
    /// The marker.
    pub marker: String,
    /// When the host saw it.
    pub at: Instant,
    /// Private resident memory (RssAnon), KiB: the guest's RAM it has touched, among
    /// others, unless that RAM is a shared memory object.
    pub anon_kib: u64,
    /// Resident memory (VmRSS), KiB.
    pub rss_kib: u64,
    /// Resident pages of mapped files (RssFile), KiB: a virtio-pmem image's pages the
    /// guest has touched are counted here, as the host's page cache of the image.
    pub file_kib: u64,
    /// Resident shared memory (RssShmem), KiB.
    pub shmem_kib: u64,
}

/// How long a native backend may take to exit after qemu did.
pub const BACKEND_EXIT_TIMEOUT: Duration = Duration::from_secs(10);

/// One sample of a process's descriptors and memory from /proc.
struct ProcSample {
    fds: usize,
    dev_fuse: bool,
    anon_kib: u64,
    rss_kib: u64,
    file_kib: u64,
    shmem_kib: u64,
    uids: Vec<u32>,
    cap_eff: String,
    no_new_privs: bool,
    seccomp: u32,
}

/// Samples `pid`; `links` also reads where each descriptor points (to see /dev/fuse),
/// which takes the daemon's descriptor table lock once per descriptor, so it is done
/// seldom: a daemon serving FUSE holds /dev/fuse all along.
fn sample_process(pid: u32, links: bool) -> Option<ProcSample> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_string())
    };
    let kib = |name: &str| {
        field(name)
            .and_then(|v| v.split_whitespace().next().and_then(|n| n.parse().ok()))
            .unwrap_or(0)
    };
    let mut fds = 0;
    let mut dev_fuse = false;
    for e in fs::read_dir(format!("/proc/{pid}/fd")).ok()?.flatten() {
        fds += 1;
        if links && fs::read_link(e.path()).is_ok_and(|t| t == Path::new("/dev/fuse")) {
            dev_fuse = true;
        }
    }
    Some(ProcSample {
        fds,
        dev_fuse,
        anon_kib: kib("RssAnon:"),
        rss_kib: kib("VmRSS:"),
        file_kib: kib("RssFile:"),
        shmem_kib: kib("RssShmem:"),
        uids: field("Uid:")
            .unwrap_or_default()
            .split_whitespace()
            .take(3)
            .filter_map(|u| u.parse().ok())
            .collect(),
        cap_eff: field("CapEff:").unwrap_or_default(),
        no_new_privs: field("NoNewPrivs:").as_deref() == Some("1"),
        seccomp: field("Seccomp:").and_then(|v| v.parse().ok()).unwrap_or(0),
    })
}

impl BackendReport {
    fn add(&mut self, s: ProcSample) {
        if self.samples == 0 {
            self.uids = s.uids;
            self.cap_eff = s.cap_eff;
        }
        self.samples += 1;
        self.max_fds = self.max_fds.max(s.fds);
        self.max_anon_kib = self.max_anon_kib.max(s.anon_kib);
        self.max_rss_kib = self.max_rss_kib.max(s.rss_kib);
        self.had_dev_fuse |= s.dev_fuse;
        self.no_new_privs = s.no_new_privs;
        self.seccomp = s.seccomp;
    }

    /// Asserts that the daemon ran unprivileged, without /dev/fuse, and exited 0 by
    /// itself once the guest was gone.
    pub fn assert_unprivileged_and_clean_exit(&self) {
        assert!(self.native, "the share {} is not served natively", self.tag);
        assert!(
            self.samples > 0,
            "the backend of {} was never sampled",
            self.tag
        );
        assert_eq!(
            self.uids,
            vec![UNPRIVILEGED_UID; 3],
            "user ids of the backend of {}",
            self.tag
        );
        assert_eq!(
            u64::from_str_radix(&self.cap_eff, 16).ok(),
            Some(0),
            "effective capabilities of the backend of {}",
            self.tag
        );
        assert!(
            !self.had_dev_fuse,
            "the backend of {} opened /dev/fuse",
            self.tag
        );
        assert!(
            self.no_new_privs && self.seccomp == 2,
            "the backend of {} is not sandboxed: NoNewPrivs {}, Seccomp {}",
            self.tag,
            self.no_new_privs,
            self.seccomp
        );
        match self.status {
            Some(s) => assert!(s.success(), "the backend of {} exited {s}", self.tag),
            None => panic!(
                "the backend of {} did not exit within {BACKEND_EXIT_TIMEOUT:?} of the guest",
                self.tag
            ),
        }
    }
}

struct Disk {
    image: PathBuf,
    readonly: bool,
}

/// An image file mapped into the guest as a virtio-pmem device.
struct Pmem {
    image: PathBuf,
    /// Its size, a multiple of [`PMEM_ALIGN`].
    size: u64,
    readonly: bool,
}

/// A VM to boot: kernel, initramfs, command line, virtiofs shares and virtio disks.
pub struct Guest {
    kernel: PathBuf,
    initramfs: PathBuf,
    cmdline: Vec<String>,
    shares: Vec<Share>,
    disks: Vec<Disk>,
    pmems: Vec<Pmem>,
    timeout: Duration,
    mmio: bool,
    unshared_memory: bool,
    hooks: Mutex<Vec<ConsoleHook>>,
    qemu_markers: Vec<String>,
}

impl Guest {
    /// A guest booting `kernel` with `initramfs` (written by [`Initramfs::write`]).
    pub fn new(kernel: &Kernel, initramfs: impl Into<PathBuf>) -> Guest {
        Guest {
            kernel: kernel.image.clone(),
            initramfs: initramfs.into(),
            cmdline: Vec::new(),
            shares: Vec::new(),
            disks: Vec::new(),
            pmems: Vec::new(),
            timeout: BOOT_TIMEOUT,
            mmio: false,
            unshared_memory: false,
            hooks: Mutex::new(Vec::new()),
            qemu_markers: Vec::new(),
        }
    }

    /// Gives the guest memory the share daemons cannot map (`share=off`): the mistake
    /// vhost-user users make most.
    pub fn unshared_memory(mut self) -> Guest {
        self.unshared_memory = true;
        self
    }

    /// Adds words to the kernel command line (after `console=ttyS0 panic=-1`).
    pub fn cmdline(mut self, words: &str) -> Guest {
        self.cmdline
            .extend(words.split_whitespace().map(str::to_string));
        self
    }

    /// Shares `dir` read-only through virtiofsd under `tag`.
    pub fn virtiofs(mut self, tag: &str, dir: impl Into<PathBuf>) -> Guest {
        self.shares.push(Share {
            tag: tag.to_string(),
            source: ShareSource::Virtiofsd {
                dir: dir.into(),
                readonly: true,
            },
        });
        self
    }

    /// Shares `dir` writable through virtiofsd under `tag`.
    pub fn virtiofs_writable(mut self, tag: &str, dir: impl Into<PathBuf>) -> Guest {
        self.shares.push(Share {
            tag: tag.to_string(),
            source: ShareSource::Virtiofsd {
                dir: dir.into(),
                readonly: false,
            },
        });
        self
    }

    /// Serves `closure` of `store_dir` under `tag` with nixstorefs's own vhost-user
    /// backend (`nixstorefs --socket-path`), run as [`UNPRIVILEGED_UID`] with `args`
    /// added. Both must be readable by that user (see [`open_to_others`]).
    pub fn nixstorefs(
        mut self,
        tag: &str,
        store_dir: impl Into<PathBuf>,
        closure: impl Into<PathBuf>,
        args: &[&str],
    ) -> Guest {
        self.shares.push(Share {
            tag: tag.to_string(),
            source: ShareSource::Native {
                store_dir: store_dir.into(),
                closure: closure.into(),
                args: args.iter().map(|a| a.to_string()).collect(),
            },
        });
        self
    }

    /// Runs `f` on the harness thread as soon as `marker` appears on the console, while
    /// the guest goes on: for changing the host under a running guest.
    pub fn on_console(self, marker: &str, f: impl FnOnce() + Send + 'static) -> Guest {
        self.hooks
            .lock()
            .unwrap()
            .push((marker.to_string(), Box::new(f)));
        self
    }

    /// Samples qemu's own memory from /proc as soon as `marker` appears on the console, into
    /// [`Boot::qemu_samples`]: for what a guest costs the host at a point of its choosing.
    /// The console is watched every 20 ms, so the guest should hold still for a moment
    /// after printing the marker (a `sleep 1`) if what it does next would change the figure.
    pub fn sample_qemu_on(mut self, marker: &str) -> Guest {
        self.qemu_markers.push(marker.to_string());
        self
    }

    /// Attaches a raw image as a read-only virtio disk (`/dev/vda`, then `vdb`, ...).
    pub fn disk(mut self, image: impl Into<PathBuf>) -> Guest {
        self.disks.push(Disk {
            image: image.into(),
            readonly: true,
        });
        self
    }

    /// Attaches a raw image as a writable virtio disk.
    pub fn writable_disk(mut self, image: impl Into<PathBuf>) -> Guest {
        self.disks.push(Disk {
            image: image.into(),
            readonly: false,
        });
        self
    }

    /// Maps a raw image into the guest as a read-only virtio-pmem device (`/dev/pmem0`,
    /// then `pmem1`, ...), as the README's recipe does: a file-backed memory object shared
    /// with the host's page cache (`share=on`) that no guest write reaches
    /// (`readonly=on`), aligned to 2 MiB. Panics unless the image's size is a non-zero
    /// multiple of [`PMEM_ALIGN`] (`mkimage --dax` pads to it): qemu refuses others.
    pub fn pmem(self, image: impl Into<PathBuf>) -> Guest {
        self.add_pmem(image.into(), true)
    }

    /// Maps a file into the guest as a writable virtio-pmem device: what the guest writes
    /// to it lands in the file (`share=on`), for the host to read once the guest is gone.
    /// The same size rule as for [`Guest::pmem`].
    pub fn writable_pmem(self, image: impl Into<PathBuf>) -> Guest {
        self.add_pmem(image.into(), false)
    }

    fn add_pmem(mut self, image: PathBuf, readonly: bool) -> Guest {
        let size = fs::metadata(&image)
            .unwrap_or_else(|e| panic!("pmem image {}: {e}", image.display()))
            .len();
        assert!(
            size > 0 && size % PMEM_ALIGN == 0,
            "pmem image {} is {size} bytes, not a multiple of 2 MiB (mkimage --dax pads it)",
            image.display()
        );
        self.pmems.push(Pmem {
            image,
            size,
            readonly,
        });
        self
    }

    /// Boots a qemu `microvm` machine: no PCI, its virtio devices on MMIO (described by
    /// ACPI), as minimal VMMs provide them.
    pub fn virtio_mmio(mut self) -> Guest {
        self.mmio = true;
        self
    }

    /// Sets the hard limit on the boot.
    pub fn timeout(mut self, timeout: Duration) -> Guest {
        self.timeout = timeout;
        self
    }

    /// The full kernel command line.
    pub fn kernel_cmdline(&self) -> String {
        let mut words = vec!["console=ttyS0".to_string(), "panic=-1".to_string()];
        if self.mmio {
            // microvm's PIT under TCG makes the kernel's clock calibration hang now and
            // then: give it the TSC rate and the delay loop instead.
            words.extend([
                "tsc_early_khz=2000000".to_string(),
                "lpj=4000000".to_string(),
            ]);
        }
        words.extend(self.cmdline.iter().cloned());
        words.join(" ")
    }

    /// Boots the guest and waits until qemu exits or the timeout kills it. Everything
    /// started here is stopped, and its temporary files removed, before it returns.
    pub fn boot(&self) -> Boot {
        let qemu = qemu();
        let tmp = tempfile::Builder::new()
            .prefix("nixstorefs-vm.")
            .tempdir()
            .expect("create the VM's temporary directory");
        let echo = std::env::var_os(ECHO_ENV).is_some();
        let started = Instant::now();

        let mut daemons = Vec::new();
        let mut daemon_logs = Vec::new();
        let mut cmd = Command::new(&qemu);
        if self.mmio {
            // TCG needs the legacy timer and interrupt controller to calibrate its clocks.
            cmd.args(["-M", "microvm,pit=on,pic=on,rtc=on"]);
        }
        // virtio-pmem devices live in the machine's device memory, which exists only when
        // the maximum memory exceeds the RAM (and qemu wants slots with it): room for them
        // all, as the README's recipe gives it.
        assert!(
            !self.mmio || self.pmems.is_empty(),
            "virtio-pmem-pci needs PCI, which a microvm machine has not"
        );
        let pmem_mib: u64 = self.pmems.iter().map(|p| p.size >> 20).sum();
        let memory = if self.pmems.is_empty() {
            MEMORY_MIB.to_string()
        } else {
            format!(
                "{MEMORY_MIB}M,slots=2,maxmem={}M",
                u64::from(MEMORY_MIB) + pmem_mib
            )
        };
        cmd.args(["-accel", "tcg", "-m", &memory, "-smp", "1"])
            .args([
                "-nographic",
                "-no-reboot",
                "-nodefaults",
                "-serial",
                "stdio",
            ])
            .arg("-kernel")
            .arg(&self.kernel)
            .arg("-initrd")
            .arg(&self.initramfs)
            .arg("-append")
            .arg(self.kernel_cmdline());
        if !self.shares.is_empty() {
            // vhost-user needs guest memory the daemon can map.
            cmd.arg("-object")
                .arg(format!(
                    "memory-backend-memfd,id=mem,size={MEMORY_MIB}M,share={}",
                    if self.unshared_memory { "off" } else { "on" }
                ))
                .args(["-numa", "node,memdev=mem"]);
            for (i, share) in self.shares.iter().enumerate() {
                let log = tmp.path().join(format!("daemon{i}.log"));
                let out = File::create(&log).expect("create the share daemon's log");
                let err = out.try_clone().expect("duplicate the share daemon's log");
                let (mut v, sock, native) = match &share.source {
                    ShareSource::Virtiofsd { dir, readonly } => {
                        let sock = tmp.path().join(format!("vfs{i}.sock"));
                        let mut v = Command::new(virtiofsd());
                        v.arg("--socket-path")
                            .arg(&sock)
                            .arg("--shared-dir")
                            .arg(dir)
                            .args(["--sandbox", "none", "--cache", "auto"]);
                        if *readonly {
                            v.arg("--readonly");
                        }
                        (v, sock, false)
                    }
                    ShareSource::Native {
                        store_dir,
                        closure,
                        args,
                    } => {
                        // A directory the unprivileged daemon may create its socket in.
                        let dir = tmp.path().join(format!("native{i}"));
                        fs::create_dir(&dir).expect("create the socket directory");
                        rustix::fs::chown(
                            &dir,
                            Some(rustix::fs::Uid::from_raw(UNPRIVILEGED_UID)),
                            Some(rustix::fs::Gid::from_raw(UNPRIVILEGED_UID)),
                        )
                        .expect("give the socket directory to the unprivileged user");
                        fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o755))
                            .expect("open the VM directory");
                        let sock = dir.join("store.sock");
                        let mut v = Command::new(harness::bin("nixstorefs"));
                        v.args(["-f", "-v", "--socket-path"])
                            .arg(&sock)
                            .arg("--store-dir")
                            .arg(store_dir)
                            .args(args)
                            .arg(closure)
                            .env("RUST_LOG", "info");
                        as_unprivileged(&mut v);
                        (v, sock, true)
                    }
                };
                v.stdin(Stdio::null()).stdout(out).stderr(err);
                let child = die_with_parent(&mut v)
                    .spawn()
                    .unwrap_or_else(|e| panic!("cannot start {:?}: {e}", v.get_program()));
                let mut d = Reaped { child: Some(child) };
                wait_for_socket(&mut d, &sock, &log);
                daemons.push((d, native, share.tag.clone()));
                daemon_logs.push((share.tag.clone(), log));
                cmd.arg("-chardev")
                    .arg(format!("socket,id=vfs{i},path={}", qemu_value(&sock)))
                    .arg("-device")
                    .arg(format!(
                        "vhost-user-fs-pci,chardev=vfs{i},tag={},queue-size=1024",
                        share.tag
                    ));
            }
        }
        for (i, disk) in self.disks.iter().enumerate() {
            let ro = if disk.readonly { ",readonly=on" } else { "" };
            if self.mmio {
                cmd.arg("-drive")
                    .arg(format!(
                        "id=disk{i},file={},format=raw,if=none{ro}",
                        qemu_value(&disk.image)
                    ))
                    .arg("-device")
                    .arg(format!("virtio-blk-device,drive=disk{i}"));
            } else {
                cmd.arg("-drive").arg(format!(
                    "file={},format=raw,if=virtio{ro}",
                    qemu_value(&disk.image)
                ));
            }
        }
        for (i, pmem) in self.pmems.iter().enumerate() {
            cmd.arg("-object")
                .arg(format!(
                    "memory-backend-file,id=pmem{i},mem-path={},size={},share=on,readonly={},\
                     align=2M",
                    qemu_value(&pmem.image),
                    pmem.size,
                    if pmem.readonly { "on" } else { "off" }
                ))
                .arg("-device")
                .arg(format!("virtio-pmem-pci,memdev=pmem{i},id=pmemdev{i}"));
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let command = format!("{cmd:?}");
        let child = die_with_parent(&mut cmd)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", qemu.display()));
        let mut q = Reaped { child: Some(child) };
        let console = Capture::start(q.child().stdout.take(), echo);
        let stderr = Capture::start(q.child().stderr.take(), false);
        let mut backends: Vec<BackendReport> = daemons
            .iter()
            .map(|(_, native, tag)| BackendReport {
                tag: tag.clone(),
                native: *native,
                ..Default::default()
            })
            .collect();
        let mut hooks = std::mem::take(&mut *self.hooks.lock().unwrap());
        let mut qemu_markers = self.qemu_markers.clone();
        let mut qemu_samples = Vec::new();
        // Waits for qemu, sampling the native backends and running console hooks.
        let deadline = Instant::now() + self.timeout;
        let mut tick: u64 = 0;
        let status = loop {
            if let Some(s) = q.child().try_wait().expect("wait for qemu") {
                break Some(s);
            }
            if Instant::now() >= deadline {
                break None;
            }
            // Every 100 ms, links every second: sampling must not slow the daemon down.
            if tick % 5 == 0 {
                let links = tick % 50 == 0;
                for ((d, _, _), report) in daemons.iter_mut().zip(backends.iter_mut()) {
                    if let Some(sample) = sample_process(d.child().id(), links) {
                        report.add(sample);
                    }
                }
            }
            tick += 1;
            if !hooks.is_empty() || !qemu_markers.is_empty() {
                let text = console.text();
                let (due, rest): (Vec<_>, Vec<_>) = hooks
                    .into_iter()
                    .partition(|(m, _)| text.contains(m.as_str()));
                hooks = rest;
                for (_, f) in due {
                    f();
                }
                let (due, rest): (Vec<_>, Vec<_>) = qemu_markers
                    .into_iter()
                    .partition(|m| text.contains(m.as_str()));
                qemu_markers = rest;
                let pid = q.child().id();
                for marker in due {
                    if let Some(s) = sample_process(pid, false) {
                        qemu_samples.push(QemuSample {
                            marker,
                            at: Instant::now(),
                            anon_kib: s.anon_kib,
                            rss_kib: s.rss_kib,
                            file_kib: s.file_kib,
                            shmem_kib: s.shmem_kib,
                        });
                    }
                }
            }
            thread::sleep(Duration::from_millis(20));
        };
        let timed_out = status.is_none();
        drop(q);
        let elapsed = started.elapsed();
        // A native backend ends by itself when the guest is gone.
        for ((d, native, _), report) in daemons.iter_mut().zip(backends.iter_mut()) {
            if *native {
                report.status = harness::wait_bounded(d.child(), BACKEND_EXIT_TIMEOUT);
            }
        }
        drop(daemons);
        let mut virtiofsd_log = String::new();
        for (tag, log) in daemon_logs {
            let text = fs::read_to_string(&log).unwrap_or_default();
            virtiofsd_log.push_str(&format!("--- share daemon for tag {tag}:\n{text}"));
        }
        let boot = Boot {
            console: console.finish(),
            qemu_stderr: stderr.finish(),
            virtiofsd_log,
            backends,
            qemu_samples,
            status,
            timed_out,
            elapsed,
            command,
        };
        println!(
            "vm: qemu ran {:.1} s ({})",
            elapsed.as_secs_f64(),
            boot.status_text()
        );
        boot
    }
}

/// Makes `cmd` run as [`UNPRIVILEGED_UID`], with no supplementary groups (registered
/// before [`die_with_parent`]: a change of user clears the parent-death signal).
pub fn as_unprivileged(cmd: &mut Command) -> &mut Command {
    // SAFETY: setgroups, setgid and setuid are async-signal-safe and touch no memory of
    // the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(UNPRIVILEGED_UID) != 0
                || libc::setuid(UNPRIVILEGED_UID) != 0
            {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

/// Makes `dir` and every directory above it up to `/tmp` searchable, and everything in it
/// readable, by other users: for a store the unprivileged backend serves.
pub fn open_to_others(dir: &Path) {
    let status = Command::new("chmod")
        .args(["-R", "go+rX"])
        .arg(dir)
        .status()
        .expect("run chmod");
    assert!(status.success(), "chmod -R go+rX {} failed", dir.display());
    let mut p = dir.parent();
    while let Some(d) = p {
        if d == Path::new("/tmp") || d == Path::new("/") {
            break;
        }
        let mode = fs::metadata(d).expect("stat a parent").permissions().mode();
        fs::set_permissions(d, fs::Permissions::from_mode(mode | 0o055)).expect("chmod a parent");
        p = d.parent();
    }
}

/// Waits (at most 10 s) for a share daemon to listen on `sock`; panics with its log if it
/// dies.
fn wait_for_socket(d: &mut Reaped, sock: &Path, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        let exited = d.child().try_wait().expect("wait for the share daemon");
        if exited.is_some() || Instant::now() >= deadline {
            let why = match exited {
                Some(s) => format!("exited ({s})"),
                None => "did not create its socket within 10 s".to_string(),
            };
            panic!(
                "the share daemon {why}:\n{}",
                fs::read_to_string(log).unwrap_or_default()
            );
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// What a boot printed and how it ended. When a test panics while holding it, the console
/// and the logs are printed.
pub struct Boot {
    /// The serial console (kernel and guest output), as received.
    pub console: String,
    /// qemu's own stderr.
    pub qemu_stderr: String,
    /// The share daemons' logs (virtiofsd, nixstorefs), one section per share.
    pub virtiofsd_log: String,
    /// What was seen of each share's daemon, in the order the shares were added.
    pub backends: Vec<BackendReport>,
    /// qemu's memory at each marker given to [`Guest::sample_qemu_on`] that showed, in the
    /// order they showed.
    pub qemu_samples: Vec<QemuSample>,
    /// qemu's exit status; `None` if it was killed at the timeout.
    pub status: Option<ExitStatus>,
    /// Whether the timeout killed qemu.
    pub timed_out: bool,
    /// How long qemu ran.
    pub elapsed: Duration,
    /// The qemu command line.
    pub command: String,
}

impl Boot {
    /// Console lines, without the serial line's carriage returns.
    pub fn lines(&self) -> impl Iterator<Item = &str> {
        self.console.lines().map(|l| l.trim_end_matches('\r'))
    }

    /// The first line containing `needle`.
    pub fn line_with(&self, needle: &str) -> Option<&str> {
        self.lines().find(|l| l.contains(needle))
    }

    /// What follows `prefix` on the first line that starts with it, trimmed.
    pub fn value(&self, prefix: &str) -> Option<&str> {
        self.lines()
            .find_map(|l| l.strip_prefix(prefix))
            .map(str::trim)
    }

    /// Like [`Boot::value`]; panics if no line starts with `prefix`.
    pub fn expect_value(&self, prefix: &str) -> &str {
        self.value(prefix)
            .unwrap_or_else(|| panic!("no console line starts with {prefix:?}"))
    }

    /// Panics unless the guest stopped by itself (powered off, or panicked with
    /// `panic=-1` and `-no-reboot`) with qemu exiting 0.
    pub fn assert_stopped(&self) {
        assert!(
            !self.timed_out,
            "the guest was still running after {:.0} s and was killed",
            self.elapsed.as_secs_f64()
        );
        let s = self.status.expect("qemu has an exit status");
        assert!(s.success(), "qemu failed: {s}");
    }

    /// Panics unless a console line contains `marker`; returns the line.
    pub fn assert_marker(&self, marker: &str) -> &str {
        self.line_with(marker)
            .unwrap_or_else(|| panic!("no console line contains {marker:?}"))
    }

    /// Panics if a console line contains `marker`.
    pub fn assert_no_marker(&self, marker: &str) {
        if let Some(l) = self.line_with(marker) {
            panic!("unexpected console line: {l:?}");
        }
    }

    /// Panics unless the markers appear in this order, each on a line after the previous.
    pub fn assert_in_order(&self, markers: &[&str]) {
        let mut lines = self.lines();
        for m in markers {
            assert!(
                lines.any(|l| l.contains(m)),
                "{m:?} does not appear on the console after {markers:?}'s earlier markers"
            );
        }
    }

    /// Panics if guest-init reported an error.
    pub fn assert_no_error(&self) {
        self.assert_no_marker(GUEST_INIT_ERROR);
    }

    /// Panics unless guest-init reported an error whose line contains each of `needles`;
    /// returns that line.
    pub fn assert_error(&self, needles: &[&str]) -> &str {
        let line = self.assert_marker(GUEST_INIT_ERROR);
        for n in needles {
            assert!(
                line.contains(n),
                "guest-init's error does not name {n:?}: {line:?}"
            );
        }
        line
    }

    /// How qemu ended, in words.
    pub fn status_text(&self) -> String {
        match self.status {
            Some(s) => s.to_string(),
            None => "killed at the timeout".to_string(),
        }
    }

    /// Everything about the boot, for a failure report.
    pub fn report(&self) -> String {
        format!(
            "qemu command: {}\nstatus: {}\nran for: {:.1} s\n\
             ===== console =====\n{}\n===== qemu stderr =====\n{}\n{}",
            self.command,
            self.status_text(),
            self.elapsed.as_secs_f64(),
            self.console.replace('\r', ""),
            self.qemu_stderr,
            self.virtiofsd_log
        )
    }
}

impl Drop for Boot {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!("vm: the test failed; the boot was:\n{}", self.report());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_versions_sort_numerically() {
        assert!(version_key("6.10.0-1-amd64") > version_key("6.9.0-1-amd64"));
        assert!(version_key("6.1.0-56-amd64") > version_key("6.1.0-9-amd64"));
    }

    #[test]
    fn module_names_normalise() {
        assert_eq!(
            module_name("kernel/arch/x86/crypto/crc32c-intel.ko"),
            "crc32c_intel"
        );
        assert_eq!(module_name("kernel/fs/erofs/erofs.ko.xz"), "erofs");
    }

    #[test]
    fn resolves_dependencies_softdeps_and_aliases() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(
            dir.path().join("modules.dep"),
            "kernel/a.ko: kernel/b.ko kernel/c.ko\nkernel/b.ko: kernel/c.ko\nkernel/c.ko:\n\
             kernel/d-gen.ko:\nkernel/e.ko:\n",
        )
        .unwrap();
        fs::write(
            dir.path().join("modules.softdep"),
            "softdep c pre: dalias post: e\n",
        )
        .unwrap();
        fs::write(
            dir.path().join("modules.alias"),
            "alias dalias d_gen\nalias pci:v*d* e\n",
        )
        .unwrap();
        fs::write(dir.path().join("modules.builtin"), "kernel/x.ko\n").unwrap();
        let idx = ModuleIndex::load(dir.path()).unwrap();
        let files = idx.resolve(&["a", "x"], &["nope"]).unwrap();
        assert_eq!(
            files,
            [
                "kernel/d-gen.ko",
                "kernel/c.ko",
                "kernel/e.ko",
                "kernel/b.ko",
                "kernel/a.ko"
            ]
        );
        assert!(idx.resolve(&["nope"], &[]).is_err());
    }

    #[test]
    fn cpio_records_are_aligned() {
        let mut out = Vec::new();
        cpio_entry(&mut out, 1, S_IFREG | 0o644, 1, (0, 0), "init", b"hello").unwrap();
        assert_eq!(out.len() % 4, 0);
        assert!(out.starts_with(b"070701"));
        // 110-byte header, "init\0" padded to 116, then 5 bytes of data padded to 8.
        assert_eq!(out.len(), 116 + 8);
        assert_eq!(&out[116..121], b"hello");
    }

    #[test]
    fn initramfs_lists_parents_first() {
        let mut i = Initramfs::new();
        i.file("/lib/modules/v/kernel/fs/x.ko", b"x".to_vec(), 0o644);
        let names: Vec<&String> = i.nodes.keys().collect();
        let pos = |n: &str| names.iter().position(|k| *k == n).unwrap();
        assert!(pos("lib") < pos("lib/modules"));
        assert!(pos("lib/modules/v/kernel/fs") < pos("lib/modules/v/kernel/fs/x.ko"));
        assert!(i.contains("/dev/console"));
    }
}
