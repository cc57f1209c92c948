//! End-to-end tests of guest-init: real boots under qemu (TCG), with guest-init as the
//! initramfs's /init mounting a sample closure from a virtiofs share of a nixstorefs mount,
//! or from erofs images written by mkimage.
//!
//! Every case boots three kernels: Debian 12's 6.1, whose modules are plain `.ko` files;
//! Debian's 6.12 ([`Kernel::compressed_modules`]), whose modules are `.ko.xz` as the
//! package ships them and which has MOVE_MOUNT_BENEATH; and the newest Linux Debian 13's
//! backports carry ([`Kernel::newest`], 7.3 when this was written), `.ko.xz` too, with
//! virtio-fs and fuse built in and crc32c library code instead of modules.
//!
//! The guest's init is a busybox script in the sample store ([`vm::add_guest_program`]);
//! it prints markers on the serial console and powers the VM off. Needs root, qemu, virtiofsd,
//! the guest kernel and the built binaries, including the static guest-init
//! (`RUSTFLAGS="-C target-feature=+crt-static" cargo build -p guest-init --target
//! x86_64-unknown-linux-gnu`). A missing tool fails the test, saying what to install
//! (scripts/install-deps.sh installs them all); no test passes by returning early.

use std::fs::{self, File};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nixstorefs_tests::harness::{self, Mount};
use nixstorefs_tests::sample::{self, PseudoRandom, SampleOptions, SampleStore};
use nixstorefs_tests::vm::{self, Boot, Guest, GuestProgram, Initramfs, Kernel};
use sha2::{Digest, Sha256};
use tempfile::TempDir;

/// Warnings and errors only: info messages printed while the script runs could split its
/// marker lines on the shared serial console.
const KERNEL_LOGLEVEL: &str = "loglevel=5";
const TAG: &str = "nix-store";
const MKIMAGE_TIMEOUT: Duration = Duration::from_secs(60);

/// A sample store with a guest program in its closure, and an initramfs to boot it with.
/// Fields drop in order: the sample directory goes last.
struct Setup {
    s: SampleStore,
    prog: GuestProgram,
    kernel: Kernel,
    initramfs: PathBuf,
    dir: TempDir,
}

/// How a virtiofs test shares the closure with its guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Share {
    /// virtiofsd sharing a host FUSE mount of nixstorefs: two daemons, two hops.
    VirtiofsdOverMount,
    /// nixstorefs's own vhost-user backend, run unprivileged: no host mount.
    Native,
}

/// Declares `mod $name` with one test per guest kernel, each calling `fn $name(kernel)`.
macro_rules! on_every_kernel {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[test]
            fn linux_6_1() {
                super::$name(nixstorefs_tests::vm::Kernel::find());
            }

            #[test]
            fn linux_6_12() {
                super::$name(nixstorefs_tests::vm::Kernel::compressed_modules());
            }

            #[test]
            fn linux_newest() {
                super::$name(nixstorefs_tests::vm::Kernel::newest());
            }
        }
    )*};
}

on_every_kernel!(
    virtiofs_share_of_a_nixstorefs_mount,
    native_backend_share,
    native_backend_wrong_tag_fails_and_powers_off,
    erofs_image_found_by_label,
    erofs_image_found_by_uuid,
    real_root_is_switched_into,
    real_root_by_label_read_only,
    real_root_read_only_with_empty_nix,
    real_root_read_only_keeps_what_nix_held,
    real_root_read_only_without_nix_says_what_to_add,
    writable_overlay_keeps_image_and_host_store_unchanged,
    mount_store_twice_changes_nothing,
    mount_store_switches_closures_atomically,
    wrong_virtiofs_tag_fails_and_powers_off,
    absurd_timeout_fails_cleanly,
    one_label_on_two_images_is_refused,
    modules_in_every_format,
    mount_store_keeps_writes_and_detaches_the_old_store,
    mount_store_finds_an_image_attached_with_losetup,
    real_root_on_btrfs_by_partuuid,
    real_root_on_xfs_by_uuid,
    erofs_image_on_a_virtio_mmio_machine,
    pmem_store_is_the_closure_byte_for_byte_and_stays_out_of_the_page_cache,
    pmem_writes_never_reach_the_image,
    mount_store_switches_to_a_pmem_image,
    two_guests_share_one_pmem_image,
    native_backend_takes_a_new_closure_without_a_restart,
);

/// The erofs UUID the test images get (mkimage derives one from the closure otherwise).
const DEFAULT_UUID: &str = "8f1b6c3e-2a4d-4e5f-9a7b-0c1d2e3f4a5b";

impl Setup {
    /// Panics, saying what to install, when qemu is missing.
    fn new(kernel: Kernel, body: impl FnOnce(&SampleStore) -> String) -> Setup {
        vm::qemu();
        let dir = tempfile::Builder::new()
            .prefix("nixstorefs-sample.")
            .tempdir_in("/tmp")
            .expect("create a sample directory");
        let mut s = sample::build(dir.path(), &SampleOptions::small()).expect("build the sample");
        let script = body(&s);
        let prog = vm::add_guest_program(&mut s, "guest-test", &script)
            .expect("add the guest program to the sample");
        // Built as the README says, with guest-init/mkinitramfs.sh.
        let initramfs = dir.path().join("initramfs.cpio");
        vm::mkinitramfs(&kernel, &[], &initramfs);
        Setup {
            s,
            prog,
            kernel,
            initramfs,
            dir,
        }
    }

    /// A guest running the program as init, with `store` (words for the command line).
    fn guest(&self, store: &str) -> Guest {
        Guest::new(&self.kernel, &self.initramfs)
            .cmdline(KERNEL_LOGLEVEL)
            .cmdline(store)
            .cmdline(&self.prog.init_arg())
    }

    /// An erofs image of the closure listed in `closure_file`, with `extra` mkimage options
    /// (UUID [`DEFAULT_UUID`] unless they give one).
    fn image(&self, closure_file: &Path, name: &str, extra: &[&str]) -> PathBuf {
        let out = self.dir.path().join(name);
        let uuid: &[&str] = if extra.contains(&"-U") {
            &[]
        } else {
            &["-U", DEFAULT_UUID]
        };
        let o = harness::run(
            Command::new(harness::bin("mkimage"))
                .arg("--store-dir")
                .arg(&self.s.store_dir)
                .args(uuid)
                .args(extra)
                .arg(closure_file)
                .arg(&out)
                .stdin(Stdio::null()),
            MKIMAGE_TIMEOUT,
        );
        assert!(
            o.status.success(),
            "mkimage failed ({}): {}",
            o.status,
            String::from_utf8_lossy(&o.stderr)
        );
        out
    }

    /// A nixstorefs mount of the closure, to share with virtiofsd.
    fn mount(&self) -> Mount {
        Mount::foreground(&self.s.store_dir, &self.s.closure_file, &[])
    }

    /// `g` with the closure shared under [`TAG`] as `how` says, and the host mount that
    /// must outlive the boot, if there is one.
    fn shared(&self, g: Guest, how: Share) -> (Guest, Option<Mount>) {
        match how {
            Share::VirtiofsdOverMount => {
                let m = self.mount();
                (g.virtiofs(TAG, m.mountpoint()), Some(m))
            }
            Share::Native => {
                vm::open_to_others(self.dir.path());
                let g = g.nixstorefs(TAG, &self.s.store_dir, &self.s.closure_file, &[]);
                (g, None)
            }
        }
    }
}

fn sha256_hex(path: &Path) -> String {
    sample::hex(&Sha256::digest(
        fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display())),
    ))
}

fn store_listing(s: &SampleStore) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(&s.store_dir)
        .expect("list the store")
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Shell words quoted for the guest script; store names have no single quotes.
fn quoted(names: &[String]) -> String {
    names
        .iter()
        .map(|n| format!("'{n}'"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Script lines checking the store seen by the guest: every path of `s`'s closure there, no
/// noise, how many entries, the big file's digest, and whether /nix/store takes writes.
fn store_checks(s: &SampleStore) -> String {
    format!(
        "echo GUEST-START\n\
         for p in {noise}; do\n\
           if [ -e \"/nix/store/$p\" ] || [ -L \"/nix/store/$p\" ]; then echo \"PRESENT $p\"; fi\n\
         done\n\
         for p in {closure}; do\n\
           if [ ! -e \"/nix/store/$p\" ] && [ ! -L \"/nix/store/$p\" ]; then echo \"ABSENT $p\"; fi\n\
         done\n\
         echo \"ENTRIES $(ls -A /nix/store | wc -l)\"\n\
         set -- $(sha256sum /nix/store/{big})\n\
         echo \"SHA256 $1\"\n\
         if touch /nix/store/probe 2>/dev/null; then echo STORE-WRITABLE; else echo STORE-READ-ONLY; fi\n\
         grep ' /nix/store ' /proc/self/mountinfo | sed 's/^/MOUNT /'\n",
        noise = quoted(&s.noise),
        closure = quoted(&s.closure),
        big = s.big_file.display(),
    )
}

/// Asserts that no module failed to load and that the kernel did not panic.
fn assert_modules_and_no_panic(boot: &Boot) {
    boot.assert_no_marker("loading module");
    boot.assert_no_marker("is neither in modules.dep nor built in");
    boot.assert_no_marker("decompressing module");
    boot.assert_no_marker("Kernel panic");
}

/// The console checks matching [`store_checks`], for a read-only store of `s`'s closure,
/// which by now includes the program.
fn assert_store_seen(boot: &Boot, s: &SampleStore) {
    boot.assert_no_marker("PRESENT ");
    boot.assert_no_marker("ABSENT ");
    assert_eq!(
        boot.expect_value("ENTRIES "),
        s.closure.len().to_string(),
        "entries of /nix/store in the guest"
    );
    assert_eq!(
        boot.expect_value("SHA256 "),
        sha256_hex(&s.host(&s.big_file)),
        "digest of the big file in the guest"
    );
    boot.assert_marker("STORE-READ-ONLY");
}

fn assert_booted_ok(boot: &Boot) {
    boot.assert_stopped();
    boot.assert_no_error();
    assert_modules_and_no_panic(boot);
    boot.assert_in_order(&["guest-init: store mounted", "GUEST-START", "GUEST-OK"]);
}

/// Also checks what PID 1 hands on: /run not world-writable, and the words the kernel
/// passed to init (`single`, what follows `--`) given to the system's init.
fn virtiofs_share_of_a_nixstorefs_mount(kernel: Kernel) {
    share_of_the_closure(kernel, Share::VirtiofsdOverMount);
}

fn native_backend_share(kernel: Kernel) {
    share_of_the_closure(kernel, Share::Native);
}

fn share_of_the_closure(kernel: Kernel, how: Share) {
    let t = Setup::new(kernel, |s| {
        // Before store_checks, whose `set --` replaces the arguments.
        format!(
            "echo \"INIT-ARGS $*\"\n{}\
             echo \"RUN-MODE $(stat -c %a /run)\"\n\
             echo \"RUN-SIZE $(df -k /run | awk 'NR == 2 {{print $2}}')\"\n\
             echo GUEST-OK\n",
            store_checks(s)
        )
    });
    let guest = t
        .guest(&format!("nixstore=virtiofs:{TAG}"))
        .cmdline("single -- --log-target=console");
    let (guest, _mount) = t.shared(guest, how);
    let boot = guest.boot();
    assert_booted_ok(&boot);
    assert_store_seen(&boot, &t.s);
    if how == Share::Native {
        // Unprivileged, no /dev/fuse, and gone with status 0 once the guest powered off.
        boot.backends[0].assert_unprivileged_and_clean_exit();
    }
    assert_eq!(boot.expect_value("RUN-MODE "), "755", "mode of /run");
    // 20% of the guest's memory, not tmpfs's default of half of it.
    let run_kib: u64 = boot
        .expect_value("RUN-SIZE ")
        .parse()
        .expect("a size in KiB");
    assert!(
        run_kib <= u64::from(vm::MEMORY_MIB) * 1024 / 4,
        "/run holds {run_kib} KiB"
    );
    assert_eq!(
        boot.expect_value("INIT-ARGS "),
        "single --log-target=console",
        "the arguments init received"
    );
}

fn erofs_image_found_by_label(kernel: Kernel) {
    let t = Setup::new(kernel, |s| format!("{}echo GUEST-OK\n", store_checks(s)));
    let img = t.image(&t.s.closure_file, "store.img", &[]);
    let boot = t.guest("nixstore=erofs:LABEL=nix-store").disk(&img).boot();
    assert_booted_ok(&boot);
    assert_store_seen(&boot, &t.s);
}

/// By UUID, spelt in capitals: the image is on the second disk, behind one without a
/// filesystem guest-init knows.
fn erofs_image_found_by_uuid(kernel: Kernel) {
    let t = Setup::new(kernel, |s| format!("{}echo GUEST-OK\n", store_checks(s)));
    let img = t.image(&t.s.closure_file, "store.img", &[]);
    let blank = t.dir.path().join("blank.img");
    fs::write(&blank, vec![0u8; 1 << 20]).unwrap();
    let boot = t
        .guest(&format!(
            "nixstore=erofs:UUID={}",
            DEFAULT_UUID.to_uppercase()
        ))
        .disk(&blank)
        .disk(&img)
        .boot();
    assert_booted_ok(&boot);
    assert_store_seen(&boot, &t.s);
    boot.assert_marker("from /dev/vdb");
}

/// The script run in a real root: what / is, whether it takes writes, the store below it.
fn real_root_script(s: &SampleStore) -> String {
    format!(
        "echo GUEST-START\n\
         echo \"ROOTFS $(awk '$2 == \"/\" {{print $3}}' /proc/mounts | tail -n 1)\"\n\
         echo \"MARKER $(cat /root-marker)\"\n\
         if touch /root-probe 2>/dev/null; then echo ROOT-WRITABLE; else echo ROOT-READ-ONLY; fi\n\
         if [ -e /init ]; then echo INITRAMFS-VISIBLE; fi\n\
         [ -e /nix/store/{hello} ] && echo STORE-OK\n\
         echo GUEST-OK\n",
        hello = s.path_named("hello-2.12")
    )
}

/// An ext4 root filesystem labelled `root`, with a marker file and `dirs` below it.
fn ext4_root(t: &Setup, dirs: &[&str]) -> PathBuf {
    let tree = t.dir.path().join("root-tree");
    for d in dirs {
        fs::create_dir_all(tree.join(d)).unwrap();
    }
    fs::write(tree.join("root-marker"), "the real root\n").unwrap();
    let root_img = t.dir.path().join("root.img");
    let o = harness::run(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-L", "root", "-d"])
            .arg(&tree)
            .arg(&root_img)
            .arg("32M"),
        MKIMAGE_TIMEOUT,
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    root_img
}

/// The initramfs with ext4 added: a module in Debian's kernels, needed for these roots.
fn initramfs_with_ext4(t: &Setup) -> PathBuf {
    let initramfs = t.dir.path().join("initramfs-ext4.cpio");
    vm::mkinitramfs(&t.kernel, &["ext4"], &initramfs);
    initramfs
}

/// With a real root (`root=/dev/X rw`), guest-init mounts it, puts the store below it and
/// switches into it before executing init: the script sees the root disk's own files at /,
/// with the store at /nix/store, and the initramfs is gone.
fn real_root_is_switched_into(kernel: Kernel) {
    let t = Setup::new(kernel, real_root_script);
    let img = t.image(&t.s.closure_file, "store.img", &[]);
    // Only /nix: guest-init makes the mount points on a writable root.
    let root_img = ext4_root(&t, &["nix"]);
    let boot = Guest::new(&t.kernel, initramfs_with_ext4(&t))
        .cmdline(KERNEL_LOGLEVEL)
        .cmdline("nixstore=erofs:LABEL=nix-store root=/dev/vdb rootfstype=ext4 rw")
        .cmdline(&t.prog.init_arg())
        .disk(&img)
        .writable_disk(&root_img)
        .boot();
    assert_booted_ok(&boot);
    boot.assert_marker("ROOTFS ext4");
    boot.assert_marker("MARKER the real root");
    boot.assert_marker("ROOT-WRITABLE");
    boot.assert_marker("STORE-OK");
    boot.assert_marker("guest-init: freed the initramfs");
    boot.assert_no_marker("INITRAMFS-VISIBLE");
}

/// `root=LABEL=` with no rootfstype: the ext4 superblock names the filesystem, the module
/// is loaded for it, and without `rw` the root is mounted read-only, as the kernel would.
fn real_root_by_label_read_only(kernel: Kernel) {
    let t = Setup::new(kernel, real_root_script);
    let img = t.image(&t.s.closure_file, "store.img", &[]);
    // A read-only root must bring its mount points.
    let root_img = ext4_root(
        &t,
        &["nix/store", "nix/.ro-store", "dev", "proc", "sys", "run"],
    );
    let boot = Guest::new(&t.kernel, initramfs_with_ext4(&t))
        .cmdline(KERNEL_LOGLEVEL)
        .cmdline("nixstore=erofs:LABEL=nix-store root=LABEL=root")
        .cmdline(&t.prog.init_arg())
        .disk(&img)
        .writable_disk(&root_img)
        .boot();
    assert_booted_ok(&boot);
    let line = boot.assert_marker("guest-init: root /dev/vdb (ext4, LABEL=root");
    assert!(line.contains("ro)"), "{line}");
    boot.assert_marker("ROOTFS ext4");
    boot.assert_marker("MARKER the real root");
    boot.assert_marker("ROOT-READ-ONLY");
    boot.assert_marker("STORE-OK");
    boot.assert_no_marker("cannot move");
}

/// A read-only root (no `rw`) whose `/nix` is empty, as a freshly made root image has
/// it: guest-init writes nothing to it, puts the mount points on a read-only tmpfs at
/// `/nix`, and the store is mounted there.
fn real_root_read_only_with_empty_nix(kernel: Kernel) {
    let boot = read_only_root_boot(kernel, &[]);
    assert_booted_ok(&boot);
    boot.assert_marker("guest-init: the read-only root has no /nix/store, /nix/.ro-store");
    boot.assert_marker("ROOT-READ-ONLY");
    boot.assert_marker("STORE-OK");
    boot.assert_marker("NIXFS tmpfs");
    boot.assert_marker("NIX-READ-ONLY");
}

/// The same with a `/nix` that holds something (`var`, a file, a link): it stays visible
/// on the tmpfs, bound from the root, still read-only.
fn real_root_read_only_keeps_what_nix_held(kernel: Kernel) {
    let boot = read_only_root_boot(
        kernel,
        &[
            ("nix/var/nix/kept", "kept on the root\n"),
            ("nix/note", "a file\n"),
        ],
    );
    assert_booted_ok(&boot);
    boot.assert_marker("with the 3 entries of the root's /nix bound into it");
    boot.assert_marker("STORE-OK");
    boot.assert_marker("NIXFS tmpfs");
    boot.assert_marker("NIX-READ-ONLY");
    boot.assert_marker("KEPT kept on the root");
    boot.assert_marker("NOTE a file");
    boot.assert_marker("LINK var/nix");
    boot.assert_marker("VAR-READ-ONLY");
}

/// Boots an ext4 root mounted read-only by label, with an empty `/nix` and the API
/// filesystems' mount points, plus `files` (path below the root, content) and a symbolic
/// link `nix/link` to `var/nix` when there are any.
fn read_only_root_boot(kernel: Kernel, files: &[(&str, &str)]) -> Boot {
    let t = Setup::new(kernel, |s| {
        format!(
            "{}\
             echo \"NIXFS $(awk '$2 == \"/nix\" {{print $3}}' /proc/mounts | tail -n 1)\"\n\
             if mkdir /nix/probe 2>/dev/null; then echo NIX-WRITABLE; else echo NIX-READ-ONLY; fi\n\
             [ -e /nix/var/nix/kept ] && echo \"KEPT $(cat /nix/var/nix/kept)\"\n\
             [ -e /nix/note ] && echo \"NOTE $(cat /nix/note)\"\n\
             [ -L /nix/link ] && echo \"LINK $(readlink /nix/link)\"\n\
             if [ -d /nix/var ]; then\n\
               if touch /nix/var/probe 2>/dev/null; then echo VAR-WRITABLE; else echo VAR-READ-ONLY; fi\n\
             fi\n",
            real_root_script(s).replace("echo GUEST-OK\n", "")
        ) + "echo GUEST-OK\n"
    });
    let img = t.image(&t.s.closure_file, "store.img", &[]);
    let tree = t.dir.path().join("root-tree");
    for (path, content) in files {
        let p = tree.join(path);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, content).unwrap();
    }
    if !files.is_empty() {
        std::os::unix::fs::symlink("var/nix", tree.join("nix/link")).unwrap();
    }
    let root_img = ext4_root(&t, &["nix", "dev", "proc", "sys", "run"]);
    Guest::new(&t.kernel, initramfs_with_ext4(&t))
        .cmdline(KERNEL_LOGLEVEL)
        .cmdline("nixstore=erofs:LABEL=nix-store root=LABEL=root")
        .cmdline(&t.prog.init_arg())
        .disk(&img)
        .writable_disk(&root_img)
        .boot()
}

/// A read-only root without `/nix` cannot take the store without being written to:
/// guest-init says what to add and powers off.
fn real_root_read_only_without_nix_says_what_to_add(kernel: Kernel) {
    let t = Setup::new(kernel, real_root_script);
    let img = t.image(&t.s.closure_file, "store.img", &[]);
    let root_img = ext4_root(&t, &["dev", "proc", "sys", "run"]);
    let boot = Guest::new(&t.kernel, initramfs_with_ext4(&t))
        .cmdline(KERNEL_LOGLEVEL)
        .cmdline("nixstore=erofs:LABEL=nix-store root=LABEL=root")
        .cmdline(&t.prog.init_arg())
        .disk(&img)
        .writable_disk(&root_img)
        .boot();
    boot.assert_stopped();
    boot.assert_error(&[
        "the root is mounted read-only",
        "without a /nix directory",
        "add an empty directory /nix",
        "boot with `rw`",
    ]);
    boot.assert_no_marker("GUEST-START");
}

fn writable_overlay_keeps_image_and_host_store_unchanged(kernel: Kernel) {
    let mut readme = PathBuf::new();
    let made = sample::base_name("made-in-guest");
    let t = Setup::new(kernel, |s| {
        readme = PathBuf::from(format!(
            "{}/share/doc/hello/README",
            s.path_named("hello-2.12")
        ));
        format!(
            "echo GUEST-START\n\
             echo written-in-guest > /nix/store/new-file && echo \"READBACK $(cat /nix/store/new-file)\"\n\
             echo appended-in-guest >> /nix/store/{readme} && echo \"COPYUP $(tail -n 1 /nix/store/{readme})\"\n\
             mkdir /nix/store/{made} && echo made > /nix/store/{made}/f && echo \"NEWPATH $(cat /nix/store/{made}/f)\"\n\
             set -- $(sha256sum /nix/store/{big})\n\
             echo \"SHA256 $1\"\n\
             grep ' /nix/store ' /proc/self/mountinfo | sed 's/^/MOUNT /'\n\
             echo GUEST-OK\n",
            readme = readme.display(),
            big = s.big_file.display(),
        )
    });
    let img = t.image(&t.s.closure_file, "store.img", &[]);
    let image_before = sha256_hex(&img);
    let store_before = store_listing(&t.s);
    let readme_before = fs::read(t.s.host(&readme)).unwrap();
    // Writable at the qemu level, so that only guest-init's read-only mount protects it.
    let boot = t
        .guest("nixstore=erofs:LABEL=nix-store nixstore.writable=tmpfs")
        .writable_disk(&img)
        .boot();
    assert_booted_ok(&boot);
    assert_eq!(boot.expect_value("READBACK "), "written-in-guest");
    assert_eq!(boot.expect_value("COPYUP "), "appended-in-guest");
    assert_eq!(boot.expect_value("NEWPATH "), "made");
    assert_eq!(
        boot.expect_value("SHA256 "),
        sha256_hex(&t.s.host(&t.s.big_file))
    );
    assert_eq!(sha256_hex(&img), image_before, "the image changed");
    assert_eq!(store_listing(&t.s), store_before, "the host store changed");
    assert_eq!(
        fs::read(t.s.host(&readme)).unwrap(),
        readme_before,
        "a host file changed"
    );
}

/// A second run changes nothing, however the same source is spelt.
fn mount_store_twice_changes_nothing(kernel: Kernel) {
    let t = Setup::new(kernel, |_| {
        "echo GUEST-START\n\
         /init mount-store --store erofs:LABEL=nix-store >/tmp/first.out 2>&1\n\
         echo \"FIRST-STATUS $?\"\n\
         sed 's/^/FIRST: /' /tmp/first.out\n\
         cat /proc/self/mountinfo > /tmp/mountinfo.before\n\
         /init mount-store --store erofs:LABEL=nix-store >/tmp/second.out 2>&1\n\
         echo \"SECOND-STATUS $?\"\n\
         sed 's/^/SECOND: /' /tmp/second.out\n\
         for spec in erofs:UUID=8F1B6C3E-2A4D-4E5F-9A7B-0C1D2E3F4A5B erofs:/dev/vda \
           erofs:/dev/disk/by-label/nix-store; do\n\
           /init mount-store --store $spec >/tmp/other.out 2>&1\n\
           echo \"RESPELT-STATUS $? $(cat /tmp/other.out)\"\n\
         done\n\
         cat /proc/self/mountinfo > /tmp/mountinfo.after\n\
         echo \"LINES-BEFORE $(wc -l < /tmp/mountinfo.before)\"\n\
         echo \"LINES-AFTER $(wc -l < /tmp/mountinfo.after)\"\n\
         if cmp -s /tmp/mountinfo.before /tmp/mountinfo.after; then echo MOUNTINFO-SAME; \
         else echo MOUNTINFO-CHANGED; diff /tmp/mountinfo.before /tmp/mountinfo.after; fi\n\
         echo GUEST-OK\n"
            .to_string()
    });
    let img = t.image(&t.s.closure_file, "store.img", &[]);
    let boot = t.guest("nixstore=erofs:LABEL=nix-store").disk(&img).boot();
    assert_booted_ok(&boot);
    assert_eq!(boot.expect_value("FIRST-STATUS "), "0");
    assert_eq!(boot.expect_value("SECOND-STATUS "), "0");
    let second = boot.assert_marker("SECOND: ");
    assert!(
        boot.lines()
            .any(|l| l.starts_with("SECOND: ") && l.contains("already mounted")),
        "the second mount-store did not say it was already mounted: {second:?}"
    );
    // The same image by UUID, by device node, by a by-label path: the same source.
    let respelt: Vec<&str> = boot
        .lines()
        .filter(|l| l.starts_with("RESPELT-STATUS "))
        .collect();
    assert_eq!(respelt.len(), 3, "{respelt:?}");
    for l in &respelt {
        assert!(
            l.starts_with("RESPELT-STATUS 0 ") && l.contains("already mounted"),
            "{l}"
        );
    }
    assert_eq!(
        boot.expect_value("LINES-BEFORE "),
        boot.expect_value("LINES-AFTER "),
        "mountinfo line count"
    );
    boot.assert_marker("MOUNTINFO-SAME");
}

fn mount_store_switches_closures_atomically(kernel: Kernel) {
    let mut both = String::new();
    let extra = sample::base_name("only-in-second");
    let t = Setup::new(kernel, |s| {
        both = format!("{}/lib/libc.so.6", s.path_named("glibc-2.40"));
        format!(
            "echo GUEST-START\n\
             if [ -e /nix/store/{extra} ]; then echo EXTRA-TOO-EARLY; fi\n\
             while true; do\n\
               [ -e /nix/store/{both} ] || echo MISSING\n\
               [ -e /tmp/loop-alive ] || : > /tmp/loop-alive\n\
             done &\n\
             loop=$!\n\
             while [ ! -e /tmp/loop-alive ]; do sleep 0.05; done\n\
             echo LOOP-STARTED\n\
             /init mount-store --store erofs:LABEL=second >/tmp/switch.out 2>&1\n\
             echo \"SWITCH-STATUS $?\"\n\
             rm /tmp/loop-alive\n\
             n=0\n\
             while [ ! -e /tmp/loop-alive ] && [ $n -lt 200 ]; do sleep 0.05; n=$((n + 1)); done\n\
             if [ -e /tmp/loop-alive ]; then echo LOOP-SURVIVED; fi\n\
             kill $loop\n\
             wait $loop 2>/dev/null\n\
             sed 's/^/SWITCH: /' /tmp/switch.out\n\
             echo \"EXTRA $(cat /nix/store/{extra}/data)\"\n\
             grep ' /nix/store ' /proc/self/mountinfo | sed 's/^/MOUNT /'\n\
             echo GUEST-OK\n"
        )
    });
    let first = t.image(&t.s.closure_file, "first.img", &[]);
    let added = vm::add_store_path(&t.s, "only-in-second", &[("data", b"second closure\n")])
        .expect("add the extra store path");
    assert_eq!(added, extra);
    let closure2 = t.dir.path().join("closure2.txt");
    fs::copy(&t.s.closure_file, &closure2).unwrap();
    let mut s2 = t.s.clone();
    s2.closure_file = closure2.clone();
    vm::append_to_closure(&mut s2, &extra).unwrap();
    let second = t.image(&closure2, "second.img", &["-L", "second"]);
    let boot = t
        .guest("nixstore=erofs:LABEL=nix-store")
        .disk(&first)
        .disk(&second)
        .boot();
    assert_booted_ok(&boot);
    boot.assert_no_marker("EXTRA-TOO-EARLY");
    // The reader ran before and after the switch, so it raced it.
    boot.assert_in_order(&["LOOP-STARTED", "SWITCH-STATUS ", "LOOP-SURVIVED"]);
    assert_eq!(boot.expect_value("SWITCH-STATUS "), "0");
    assert_eq!(boot.expect_value("EXTRA "), "second closure");
    boot.assert_no_marker("MISSING");
}

fn wrong_virtiofs_tag_fails_and_powers_off(kernel: Kernel) {
    wrong_tag(kernel, Share::VirtiofsdOverMount);
}

fn native_backend_wrong_tag_fails_and_powers_off(kernel: Kernel) {
    wrong_tag(kernel, Share::Native);
}

fn wrong_tag(kernel: Kernel, how: Share) {
    let t = Setup::new(kernel, |_| "echo GUEST-START\necho GUEST-OK\n".to_string());
    let guest = t.guest("nixstore=virtiofs:wrong-tag nixstore.timeout=3");
    let (guest, _mount) = t.shared(guest, how);
    let boot = guest.boot();
    boot.assert_stopped();
    if how == Share::Native {
        boot.backends[0].assert_unprivileged_and_clean_exit();
    }
    // What was expected, and what was found: the one share there is (6.1 does not show
    // its tag; 6.9 and later do).
    let found = if t.kernel.version.starts_with("6.1.") {
        "found 1 virtio-fs device".to_string()
    } else {
        format!("found tags `{TAG}`")
    };
    let line = boot.assert_error(&["wrong-tag", &found]);
    println!("guest-init said: {line}");
    boot.assert_in_order(&[vm::GUEST_INIT_ERROR, "powering off"]);
    boot.assert_no_marker("GUEST-START");
    assert_modules_and_no_panic(&boot);
}

/// A timeout no clock can count is refused with a message, and the guest powers off: no
/// panic of PID 1, so no kernel panic.
fn absurd_timeout_fails_cleanly(kernel: Kernel) {
    let t = Setup::new(kernel, |_| "echo GUEST-START\necho GUEST-OK\n".to_string());
    let img = t.image(&t.s.closure_file, "store.img", &[]);
    for absurd in ["1e300", "18446744073709551615"] {
        let boot = t
            .guest(&format!(
                "nixstore=erofs:LABEL=nix-store nixstore.timeout={absurd}"
            ))
            .disk(&img)
            .boot();
        boot.assert_stopped();
        boot.assert_error(&[&format!("nixstore.timeout={absurd}"), "too long"]);
        boot.assert_in_order(&[vm::GUEST_INIT_ERROR, "powering off"]);
        boot.assert_no_marker("GUEST-START");
        boot.assert_no_marker("Kernel panic");
        boot.assert_no_marker("panicked");
    }
}

/// Two images with the store's label: guest-init names both rather than pick one by
/// device order.
fn one_label_on_two_images_is_refused(kernel: Kernel) {
    let t = Setup::new(kernel, |_| "echo GUEST-START\necho GUEST-OK\n".to_string());
    let img = t.image(&t.s.closure_file, "store.img", &[]);
    let twin = t.image(
        &t.s.closure_file,
        "twin.img",
        &["-U", "00000000-0000-4000-8000-000000000001"],
    );
    let boot = t
        .guest("nixstore=erofs:LABEL=nix-store nixstore.timeout=5")
        .disk(&img)
        .disk(&twin)
        .boot();
    boot.assert_stopped();
    boot.assert_error(&["LABEL=nix-store", "more than one", "/dev/vda", "/dev/vdb"]);
    boot.assert_in_order(&[vm::GUEST_INIT_ERROR, "powering off"]);
    boot.assert_no_marker("GUEST-START");
    assert_modules_and_no_panic(&boot);
}

/// `path` (relative to the kernel's module directory) as plain ELF: decompressed with the
/// tool for its suffix.
fn plain_module(kernel: &Kernel, rel: &str) -> Vec<u8> {
    let host = kernel.modules_dir.join(rel);
    let tool = match rel.rsplit('.').next() {
        Some("ko") => return fs::read(&host).unwrap(),
        Some("xz") => "xz",
        Some("zst") => "zstd",
        Some("gz") => "gzip",
        other => panic!("{rel}: unknown module suffix {other:?}"),
    };
    let o = harness::run(
        Command::new(tool)
            .arg("-dc")
            .arg(&host)
            .stdin(Stdio::null()),
        MKIMAGE_TIMEOUT,
    );
    assert!(
        o.status.success(),
        "{tool} -dc {}: {}",
        host.display(),
        o.status
    );
    o.stdout
}

/// `data` compressed by `tool` (xz, zstd or gzip).
fn compressed(tool: &str, data: &[u8], dir: &Path) -> Vec<u8> {
    let input = dir.join("module.plain");
    fs::write(&input, data).unwrap();
    let mut cmd = Command::new(tool);
    if tool == "xz" {
        // What the kernel's own decompressor accepts: CRC32 check, no BCJ filter.
        cmd.arg("--check=crc32");
    }
    let o = harness::run(
        cmd.arg("-c").arg(&input).stdin(Stdio::null()),
        MKIMAGE_TIMEOUT,
    );
    assert!(o.status.success(), "{tool}: {}", o.status);
    o.stdout
}

/// The store's modules recompressed in turn as `.ko.zst`, `.ko.gz`, `.ko.xz` and `.ko`,
/// with modules.dep to match: whatever a kernel cannot decompress itself (6.1 nothing, this
/// 6.12 only xz), guest-init decompresses, and the store still mounts, writable.
fn modules_in_every_format(kernel: Kernel) {
    let t = Setup::new(kernel, |s| format!("{}echo GUEST-OK\n", store_checks(s)));
    let img = t.image(&t.s.closure_file, "store.img", &[]);
    let mut i = Initramfs::for_guest_init(&t.kernel);
    let files = t
        .kernel
        .module_files(vm::STORE_MODULES, vm::OPTIONAL_STORE_MODULES)
        .unwrap();
    let stem = |rel: &str| rel[..rel.find(".ko").expect("a .ko path") + 3].to_string();
    let formats = [("zstd", ".zst"), ("gzip", ".gz"), ("xz", ".xz"), ("", "")];
    let mut renamed = std::collections::HashMap::new();
    let base = format!("/lib/modules/{}", t.kernel.version);
    let mut used = std::collections::BTreeSet::new();
    for (n, rel) in files.iter().enumerate() {
        let (tool, suffix) = formats[n % formats.len()];
        let plain = plain_module(&t.kernel, rel);
        let data = if tool.is_empty() {
            plain
        } else {
            compressed(tool, &plain, t.dir.path())
        };
        let new = format!("{}{suffix}", stem(rel));
        i.file(&format!("{base}/{new}"), data, 0o644);
        used.insert(if suffix.is_empty() { ".ko" } else { suffix });
        renamed.insert(rel.clone(), new);
    }
    assert_eq!(used.len(), 4, "every format is used: {used:?} of {files:?}");
    let dep = fs::read_to_string(t.kernel.modules_dir.join("modules.dep")).unwrap();
    let dep: String = dep
        .lines()
        .map(|line| {
            let words: Vec<String> = line
                .split_whitespace()
                .map(|w| {
                    let (path, colon) = match w.strip_suffix(':') {
                        Some(p) => (p, ":"),
                        None => (w, ""),
                    };
                    format!("{}{colon}", renamed.get(path).map_or(path, |s| s.as_str()))
                })
                .collect();
            words.join(" ") + "\n"
        })
        .collect();
    i.file(&format!("{base}/modules.dep"), dep, 0o644);
    let initramfs = t.dir.path().join("initramfs-formats.cpio");
    // The original files stay in the archive under their old names; only modules.dep
    // says which to load.
    i.write(&initramfs).unwrap();
    let boot = Guest::new(&t.kernel, &initramfs)
        .cmdline(KERNEL_LOGLEVEL)
        .cmdline("nixstore=erofs:LABEL=nix-store nixstore.writable=tmpfs")
        .cmdline(&t.prog.init_arg())
        .disk(&img)
        .boot();
    assert_booted_ok(&boot);
    boot.assert_marker("STORE-WRITABLE");
    println!("module files: {renamed:?}");
}

/// The second closure of the switch tests: the sample's closure and one more path, as an
/// image labelled `second`. Returns the image and the extra path's base name.
fn second_image(t: &Setup) -> (PathBuf, String) {
    let extra = vm::add_store_path(&t.s, "only-in-second", &[("data", b"second closure\n")])
        .expect("add the extra store path");
    let closure2 = t.dir.path().join("closure2.txt");
    fs::copy(&t.s.closure_file, &closure2).unwrap();
    let mut s2 = t.s.clone();
    s2.closure_file = closure2.clone();
    vm::append_to_closure(&mut s2, &extra).unwrap();
    (t.image(&closure2, "second.img", &["-L", "second"]), extra)
}

/// A writable store switched to a second image: what was written before the switch is
/// still there, and on a kernel with MOVE_MOUNT_BENEATH (6.12) the first image's device
/// is no longer mounted anywhere. A mount below /nix/store is carried over. Two more runs
/// at once are serialised and change nothing.
fn mount_store_keeps_writes_and_detaches_the_old_store(kernel: Kernel) {
    let extra = sample::base_name("only-in-second");
    let t = Setup::new(kernel, |s| {
        let hello = s.path_named("hello-2.12");
        format!(
            "echo GUEST-START\n\
             echo before-switch > /nix/store/written-before\n\
             mount -t tmpfs -o size=64k sub /nix/store/{hello}/share && echo carried > /nix/store/{hello}/share/marker\n\
             /init mount-store --store erofs:LABEL=second --writable tmpfs >/tmp/switch.out 2>&1\n\
             echo \"SWITCH-STATUS $?\"\n\
             sed 's/^/SWITCH: /' /tmp/switch.out\n\
             echo \"WRITTEN $(cat /nix/store/written-before)\"\n\
             echo \"SUBMOUNT $(cat /nix/store/{hello}/share/marker)\"\n\
             echo \"EXTRA $(cat /nix/store/{extra}/data)\"\n\
             if grep -q '^/dev/vda ' /proc/mounts; then echo OLD-DEVICE-MOUNTED; else echo OLD-DEVICE-GONE; fi\n\
             echo \"STORE-MOUNTS $(grep -c ' /nix/store ' /proc/self/mountinfo)\"\n\
             /init mount-store --store erofs:LABEL=second --writable tmpfs >/tmp/a.out 2>&1 &\n\
             a=$!\n\
             /init mount-store --store erofs:LABEL=second --writable tmpfs >/tmp/b.out 2>&1\n\
             echo \"B-STATUS $?\"\n\
             wait $a\n\
             echo \"A-STATUS $?\"\n\
             cat /tmp/a.out /tmp/b.out | sed 's/^/AGAIN: /'\n\
             echo \"STORE-MOUNTS-AFTER $(grep -c ' /nix/store ' /proc/self/mountinfo)\"\n\
             grep /nix /proc/self/mountinfo | sed 's/^/MOUNT /'\n\
             echo GUEST-OK\n"
        )
    });
    let first = t.image(&t.s.closure_file, "first.img", &[]);
    let (second, added) = second_image(&t);
    assert_eq!(added, extra);
    let boot = t
        .guest("nixstore=erofs:LABEL=nix-store nixstore.writable=tmpfs")
        .disk(&first)
        .disk(&second)
        .boot();
    assert_booted_ok(&boot);
    assert_eq!(boot.expect_value("SWITCH-STATUS "), "0");
    assert_eq!(boot.expect_value("WRITTEN "), "before-switch");
    assert_eq!(boot.expect_value("SUBMOUNT "), "carried");
    assert_eq!(boot.expect_value("EXTRA "), "second closure");
    assert_eq!(boot.expect_value("A-STATUS "), "0");
    assert_eq!(boot.expect_value("B-STATUS "), "0");
    assert!(
        boot.lines()
            .filter(|l| l.starts_with("AGAIN: "))
            .all(|l| l.contains("already mounted")),
        "a repeated switch did something"
    );
    assert_eq!(
        boot.expect_value("STORE-MOUNTS "),
        boot.expect_value("STORE-MOUNTS-AFTER ")
    );
    if t.kernel.version.starts_with("6.1.") {
        // No MOVE_MOUNT_BENEATH: the old stack stays mounted underneath, and says so.
        boot.assert_marker("cannot put a mount beneath another");
        boot.assert_marker("OLD-DEVICE-MOUNTED");
    } else {
        boot.assert_no_marker("cannot put a mount beneath another");
        boot.assert_marker("OLD-DEVICE-GONE");
        assert_eq!(boot.expect_value("STORE-MOUNTS "), "1");
    }
}

/// An image attached with losetup on the running system is found by its label.
fn mount_store_finds_an_image_attached_with_losetup(kernel: Kernel) {
    let extra = sample::base_name("only-in-second");
    let mut t = Setup::new(kernel, |_| String::new());
    let (second, added) = second_image(&t);
    assert_eq!(added, extra);
    // The second image travels inside the first store, as a file.
    let data = fs::read(&second).unwrap();
    let made = vm::add_store_path(&t.s, "second-image", &[("second.img", &data)]).unwrap();
    vm::append_to_closure(&mut t.s, &made).unwrap();
    let img_path = format!("/nix/store/{made}/second.img");
    let prog = vm::add_guest_program(
        &mut t.s,
        "losetup-test",
        &format!(
            "echo GUEST-START\n\
             losetup /dev/loop0 {img_path} && echo LOOP-ATTACHED\n\
             /init mount-store --store erofs:LABEL=second >/tmp/switch.out 2>&1\n\
             echo \"SWITCH-STATUS $?\"\n\
             sed 's/^/SWITCH: /' /tmp/switch.out\n\
             echo \"EXTRA $(cat /nix/store/{extra}/data)\"\n\
             echo GUEST-OK\n"
        ),
    )
    .unwrap();
    let first = t.image(&t.s.closure_file, "first.img", &[]);
    let boot = Guest::new(&t.kernel, &t.initramfs)
        .cmdline(KERNEL_LOGLEVEL)
        .cmdline("nixstore=erofs:LABEL=nix-store")
        .cmdline(&prog.init_arg())
        .disk(&first)
        .boot();
    assert_booted_ok(&boot);
    boot.assert_marker("LOOP-ATTACHED");
    assert_eq!(boot.expect_value("SWITCH-STATUS "), "0");
    assert!(
        boot.lines()
            .any(|l| l.starts_with("SWITCH: ") && l.contains("from /dev/loop0")),
        "mount-store did not mount the loop device"
    );
    assert_eq!(boot.expect_value("EXTRA "), "second closure");
}

/// Runs a mkfs, panicking with its output if it fails.
fn mkfs(cmd: &mut Command) {
    let o = harness::run(cmd.stdin(Stdio::null()), MKIMAGE_TIMEOUT);
    assert!(
        o.status.success(),
        "{cmd:?} failed ({}): {}{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// A disk with an MBR (disk signature `signature`) whose one partition, from 1 MiB, holds
/// the filesystem image `fs`: the kernel names it PARTUUID=<signature>-01.
fn mbr_disk(fs: &Path, signature: u32, out: &Path) {
    let data = fs::read(fs).unwrap();
    let start: u32 = 2048;
    let sectors = u32::try_from(data.len().div_ceil(512)).unwrap();
    let mut disk = vec![0u8; start as usize * 512];
    disk[440..444].copy_from_slice(&signature.to_le_bytes());
    let entry = &mut disk[446..462];
    entry[1..4].copy_from_slice(&[0xfe, 0xff, 0xff]);
    entry[4] = 0x83; // Linux
    entry[5..8].copy_from_slice(&[0xfe, 0xff, 0xff]);
    entry[8..12].copy_from_slice(&start.to_le_bytes());
    entry[12..16].copy_from_slice(&sectors.to_le_bytes());
    disk[510] = 0x55;
    disk[511] = 0xaa;
    disk.extend_from_slice(&data);
    disk.resize(disk.len().div_ceil(512) * 512, 0);
    fs::write(out, disk).unwrap();
}

/// A btrfs root on the first partition of an MBR disk, named by `root=PARTUUID=`: the
/// partition table read by guest-init, the btrfs module (with raid6_pq and xor) loaded
/// for what the superblock says.
fn real_root_on_btrfs_by_partuuid(kernel: Kernel) {
    let t = Setup::new(kernel, real_root_script);
    let img = t.image(&t.s.closure_file, "store.img", &[]);
    let tree = t.dir.path().join("btrfs-tree");
    fs::create_dir_all(tree.join("nix")).unwrap();
    fs::write(tree.join("root-marker"), "the real root\n").unwrap();
    let fs_img = t.dir.path().join("btrfs.img");
    File::create(&fs_img)
        .and_then(|f| f.set_len(128 << 20))
        .unwrap();
    mkfs(
        Command::new("mkfs.btrfs")
            .args(["-q", "-L", "broot", "--rootdir"])
            .arg(&tree)
            .arg(&fs_img),
    );
    let disk = t.dir.path().join("btrfs-disk.img");
    mbr_disk(&fs_img, 0x1234_abcd, &disk);
    let initramfs = t.dir.path().join("initramfs-btrfs.cpio");
    vm::mkinitramfs(&t.kernel, &["btrfs"], &initramfs);
    let boot = Guest::new(&t.kernel, initramfs)
        .cmdline(KERNEL_LOGLEVEL)
        .cmdline("nixstore=erofs:LABEL=nix-store root=PARTUUID=1234ABCD-01 rw")
        .cmdline(&t.prog.init_arg())
        .disk(&img)
        .writable_disk(&disk)
        .boot();
    assert_booted_ok(&boot);
    let line = boot.assert_marker("guest-init: root /dev/vdb1 (btrfs, LABEL=broot");
    assert!(line.contains("PARTUUID=1234abcd-01"), "{line}");
    boot.assert_marker("ROOTFS btrfs");
    boot.assert_marker("MARKER the real root");
    boot.assert_marker("ROOT-WRITABLE");
    boot.assert_marker("STORE-OK");
}

/// An xfs root named by `/dev/disk/by-uuid/` (a link no udev makes in an initramfs:
/// guest-init reads the UUID from the superblock).
fn real_root_on_xfs_by_uuid(kernel: Kernel) {
    let t = Setup::new(kernel, real_root_script);
    let img = t.image(&t.s.closure_file, "store.img", &[]);
    let uuid = "5d3c2b1a-0f9e-4d8c-b7a6-112233445566";
    let fs_img = t.dir.path().join("xfs.img");
    // The smallest xfs that mkfs.xfs makes; sparse, so it costs little.
    File::create(&fs_img)
        .and_then(|f| f.set_len(300 << 20))
        .unwrap();
    mkfs(
        Command::new("mkfs.xfs")
            .args(["-q", "-L", "xroot", "-m"])
            .arg(format!("uuid={uuid}"))
            .arg(&fs_img),
    );
    let initramfs = t.dir.path().join("initramfs-xfs.cpio");
    vm::mkinitramfs(&t.kernel, &["xfs"], &initramfs);
    let boot = Guest::new(&t.kernel, initramfs)
        .cmdline(KERNEL_LOGLEVEL)
        .cmdline(&format!(
            "nixstore=erofs:LABEL=nix-store root=/dev/disk/by-uuid/{uuid} rw"
        ))
        .cmdline(&t.prog.init_arg())
        .disk(&img)
        .writable_disk(&fs_img)
        .boot();
    assert_booted_ok(&boot);
    let line = boot.assert_marker("guest-init: root /dev/vdb (xfs, LABEL=xroot");
    assert!(line.contains(uuid), "{line}");
    boot.assert_marker("ROOTFS xfs");
    boot.assert_marker("ROOT-WRITABLE");
    boot.assert_marker("STORE-OK");
}

/// A microvm machine has no PCI: the disk is a virtio-mmio device, which guest-init's
/// virtio_mmio module finds.
fn erofs_image_on_a_virtio_mmio_machine(kernel: Kernel) {
    let t = Setup::new(kernel, |s| format!("{}echo GUEST-OK\n", store_checks(s)));
    let img = t.image(&t.s.closure_file, "store.img", &[]);
    let boot = t
        .guest("nixstore=erofs:LABEL=nix-store")
        .virtio_mmio()
        .disk(&img)
        .boot();
    assert_booted_ok(&boot);
    assert_store_seen(&boot, &t.s);
}

/// A guest walks the whole closure and reads every file, then drops its caches and does it
/// again, three times, over the native backend with tiny caches (16 forgotten nodes, 8
/// directory descriptors): every node is forgotten and evicted and looked up again. No
/// ESTALE or other error, the same listing, bytes and inode numbers (`ls -lAiR`) each time,
/// and a descriptor and a working directory held across the drops keep working. The daemon
/// stays within its descriptor bound.
/// qemu without `share=on` on the guest's memory, the commonest vhost-user mistake: the
/// daemon says which qemu options to add, and exits 1 with its socket removed.
#[test]
fn native_backend_names_unshared_guest_memory() {
    let kernel = Kernel::compressed_modules();
    let t = Setup::new(kernel, |_| "echo GUEST-START\necho GUEST-OK\n".into());
    vm::open_to_others(t.dir.path());
    let boot = t
        .guest(&format!("nixstore=virtiofs:{TAG}"))
        .nixstorefs(TAG, &t.s.store_dir, &t.s.closure_file, &["-vvv"])
        .unshared_memory()
        .timeout(Duration::from_secs(120))
        .boot();
    let backend = &boot.backends[0];
    let status = backend.status.expect("the daemon exits by itself");
    assert_eq!(
        status.code(),
        Some(1),
        "{}\nqemu: {}\nconsole: {}",
        boot.virtiofsd_log,
        boot.qemu_stderr,
        boot.console
    );
    assert!(
        boot.virtiofsd_log.contains("share=on"),
        "the daemon's message names the option to add:\n{}",
        boot.virtiofsd_log
    );
}

/// A static C program that opens one file N times and holds every descriptor, then reads
/// another file while holding them: a guest process that never closes what it opens.
const HOLD_OPEN_C: &str = r#"
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <unistd.h>
int main(int argc, char **argv) {
    int n = atoi(argv[2]);
    struct rlimit r = { n + 64, n + 64 };
    if (setrlimit(RLIMIT_NOFILE, &r) != 0) { perror("setrlimit"); return 1; }
    int held = 0, error = 0;
    for (int i = 0; i < n; i++) {
        if (open(argv[1], O_RDONLY) < 0) { error = errno; break; }
        held++;
    }
    printf("HELD %d\n", held);
    if (error) printf("OPEN-ERROR %d\n", error);
    char buf[64];
    int fd = open(argv[3], O_RDONLY);
    ssize_t got = fd < 0 ? -errno : read(fd, buf, sizeof buf);
    printf("OTHER-READ %zd\n", got);
    fflush(stdout);
    sleep(2);
    return 0;
}
"#;

/// A guest process holding tens of thousands of opens of one store file: the daemon's
/// descriptors stay within its caches (one host descriptor for the node, not one per
/// open), and the guest keeps working meanwhile.
#[test]
fn native_backend_many_opens_stay_bounded() {
    const OPENS: usize = 30_000;
    let kernel = Kernel::compressed_modules();
    let t = Setup::new(kernel, |s| {
        format!(
            "echo GUEST-START\n\
             holdopen=$(dirname $0)/holdopen\n\
             $holdopen /nix/store/{big} {OPENS} /nix/store/{deep}\n\
             echo \"AFTER $(cat /nix/store/{deep} | wc -c)\"\n\
             echo GUEST-OK\n",
            big = s.big_file.display(),
            deep = s.deep_file.display(),
        )
    });
    // The program, built static, beside the guest's script in its store path.
    let bin = t.s.store_dir.join(&t.prog.base).join("bin");
    let source = t.dir.path().join("holdopen.c");
    fs::write(&source, HOLD_OPEN_C).unwrap();
    fs::set_permissions(&bin, fs::Permissions::from_mode(0o755)).unwrap();
    let out = harness::run(
        Command::new("gcc")
            .args(["-static", "-O2", "-o"])
            .arg(bin.join("holdopen"))
            .arg(&source),
        Duration::from_secs(120),
    );
    assert!(
        out.status.success(),
        "gcc -static (libc6-dev) failed: {out:?}"
    );
    fs::set_permissions(&bin, fs::Permissions::from_mode(0o555)).unwrap();
    vm::open_to_others(t.dir.path());
    let boot = t
        .guest(&format!("nixstore=virtiofs:{TAG}"))
        .nixstorefs(
            TAG,
            &t.s.store_dir,
            &t.s.closure_file,
            &["--max-cached-dirs", "8"],
        )
        .timeout(Duration::from_secs(300))
        .boot();
    assert_booted_ok(&boot);
    boot.assert_no_marker("OPEN-ERROR");
    assert_eq!(boot.expect_value("HELD "), OPENS.to_string());
    let deep_len = fs::metadata(t.s.host(&t.s.deep_file)).unwrap().len();
    let expected_read = deep_len.min(64).to_string();
    assert_eq!(
        boot.expect_value("OTHER-READ "),
        expected_read,
        "reading while holding"
    );
    assert_eq!(boot.expect_value("AFTER "), deep_len.to_string());
    let backend = &boot.backends[0];
    backend.assert_unprivileged_and_clean_exit();
    // One host descriptor for the held file, whatever the guest holds.
    assert!(
        backend.max_fds < 48,
        "{OPENS} guest opens made the daemon hold up to {} descriptors",
        backend.max_fds
    );
    println!(
        "native backend under {OPENS} held opens: at most {} descriptors, {} KiB private memory",
        backend.max_fds, backend.max_anon_kib
    );
}

#[test]
fn native_backend_walk_survives_drop_caches() {
    let kernel = Kernel::compressed_modules();
    let t = Setup::new(kernel, |s| {
        let deep_dir = s.deep_file.parent().unwrap().display().to_string();
        format!(
            "echo GUEST-START\n\
             walk() {{\n\
               find /nix/store 2>/tmp/err.$1 | sort > /tmp/walk.$1\n\
               find /nix/store -type f -exec cat {{}} \\; 2>>/tmp/err.$1 | sha256sum > /tmp/sum.$1\n\
               ls -lAiR /nix/store > /tmp/ls.$1 2>>/tmp/err.$1\n\
             }}\n\
             walk 0\n\
             exec 3< /nix/store/{big}\n\
             cd /nix/store/{deep_dir}\n\
             for i in 1 2 3; do\n\
               echo 3 > /proc/sys/vm/drop_caches\n\
               walk $i\n\
               cmp -s /tmp/walk.0 /tmp/walk.$i || echo \"WALK-DIFF $i\"\n\
               cmp -s /tmp/sum.0 /tmp/sum.$i || echo \"SUM-DIFF $i\"\n\
               cmp -s /tmp/ls.0 /tmp/ls.$i || echo \"INODES-DIFF $i\"\n\
               ls . > /dev/null || echo \"CWD-FAILED $i\"\n\
             done\n\
             cat /tmp/err.* | sed 's/^/WALK-ERROR /'\n\
             set -- $(sha256sum <&3)\n\
             echo \"HELD-SHA256 $1\"\n\
             echo \"WALKED $(wc -l < /tmp/walk.0)\"\n\
             echo GUEST-OK\n",
            big = s.big_file.display(),
        )
    });
    vm::open_to_others(t.dir.path());
    let boot = t
        .guest(&format!("nixstore=virtiofs:{TAG}"))
        .nixstorefs(
            TAG,
            &t.s.store_dir,
            &t.s.closure_file,
            &["--max-forgotten-nodes", "16", "--max-cached-dirs", "8"],
        )
        .timeout(Duration::from_secs(180))
        .boot();
    assert_booted_ok(&boot);
    for marker in [
        "WALK-DIFF",
        "SUM-DIFF",
        "INODES-DIFF",
        "CWD-FAILED",
        "WALK-ERROR",
        "Stale",
    ] {
        boot.assert_no_marker(marker);
    }
    assert_eq!(
        boot.expect_value("HELD-SHA256 "),
        sha256_hex(&t.s.host(&t.s.big_file)),
        "a descriptor held across the cache drops"
    );
    // Everything below the closure's paths, and /nix/store itself.
    let expected =
        t.s.closure
            .iter()
            .map(|p| walk_count(&t.s.store_dir.join(p)))
            .sum::<usize>()
            + 1;
    assert_eq!(boot.expect_value("WALKED "), expected.to_string());
    let backend = &boot.backends[0];
    backend.assert_unprivileged_and_clean_exit();
    // 8 directory descriptors, a few open files, and the daemon's own (stdio, the
    // socket, /proc, the store, epoll and event descriptors).
    assert!(
        backend.max_fds < 48,
        "the daemon held up to {} descriptors",
        backend.max_fds
    );
    println!(
        "native backend: at most {} descriptors, {} KiB private memory",
        backend.max_fds, backend.max_anon_kib
    );
}

/// How many lines `find` prints for `path`: itself and everything below it, without
/// following symlinks (a name with a newline in it takes two lines).
fn walk_count(path: &Path) -> usize {
    let lines = 1 + path.file_name().map_or(0, |n| {
        n.as_encoded_bytes().iter().filter(|&&b| b == b'\n').count()
    });
    if !fs::symlink_metadata(path).unwrap().is_dir() {
        return lines;
    }
    lines
        + fs::read_dir(path)
            .unwrap()
            .map(|e| walk_count(&e.unwrap().path()))
            .sum::<usize>()
}

/// While a guest reads a directory of the closure over and over, dropping its caches each
/// time, the host swaps that directory for a symlink to a store path outside the closure.
/// The guest sees the swap (a symlink, served verbatim, whose target it cannot reach) and
/// never a byte of the secret.
#[test]
fn native_backend_dir_swapped_for_a_symlink_leaks_nothing() {
    let kernel = Kernel::compressed_modules();
    let t = Setup::new(kernel, |s| {
        let dir = s.replaceable_dirs[0].display().to_string();
        format!(
            "echo GUEST-START\n\
             ls /nix/store/{dir} > /dev/null || echo NOT-READABLE\n\
             echo SWAP-NOW\n\
             i=0\n\
             while [ $i -lt 60 ]; do\n\
               echo 3 > /proc/sys/vm/drop_caches\n\
               if [ -L /nix/store/{dir} ]; then echo SWAP-SEEN; fi\n\
               ls -la /nix/store/{dir}/ 2>&1\n\
               cat /nix/store/{dir}/* /nix/store/{dir}/secret 2>&1\n\
               i=$((i+1))\n\
             done > /tmp/seen\n\
             grep -m1 SWAP-SEEN /tmp/seen\n\
             echo \"LEAKS $(grep -c 'TOP SECRET' /tmp/seen)\"\n\
             echo GUEST-OK\n"
        )
    });
    vm::open_to_others(t.dir.path());
    let host_dir = t.s.host(&t.s.replaceable_dirs[0]);
    let depth = t.s.replaceable_dirs[0].components().count() - 1;
    let secret_path = t.s.secret.parent().unwrap().to_path_buf();
    let target = Path::new(&"../".repeat(depth)).join(&secret_path);
    assert!(
        host_dir
            .parent()
            .unwrap()
            .join(&target)
            .join("secret")
            .is_file(),
        "the symlink must reach the secret on the host"
    );
    let boot = t
        .guest(&format!("nixstore=virtiofs:{TAG}"))
        .nixstorefs(TAG, &t.s.store_dir, &t.s.closure_file, &[])
        .on_console("SWAP-NOW", move || {
            let aside = host_dir.with_extension("aside");
            fs::rename(&host_dir, &aside).expect("move the directory aside");
            std::os::unix::fs::symlink(&target, &host_dir).expect("put the symlink in place");
        })
        .timeout(Duration::from_secs(180))
        .boot();
    assert_booted_ok(&boot);
    boot.assert_no_marker("NOT-READABLE");
    boot.assert_marker("SWAP-SEEN");
    assert_eq!(boot.expect_value("LEAKS "), "0");
    assert!(
        !boot.console.contains("TOP SECRET"),
        "the secret reached the guest"
    );
    boot.backends[0].assert_unprivileged_and_clean_exit();
}

/// Every kind of modification a guest can send reaches the native backend (the guest
/// remounts the share read-write first, so its own kernel does not refuse them) and fails
/// with EROFS; the host store is unchanged afterwards.
#[test]
fn native_backend_refuses_every_modification() {
    let kernel = Kernel::compressed_modules();
    let t = Setup::new(kernel, |s| {
        let f = format!("/nix/store/{}", s.small_files[3].display());
        let d = format!(
            "/nix/store/{}",
            s.small_files[3].parent().unwrap().display()
        );
        let empty = format!("/nix/store/{}/empty-dir", s.odd_dir.display());
        let ops = [
            ("append", format!("echo x >> {f}")),
            ("truncate-open", format!("echo x > {f}")),
            ("create", format!("touch {d}/new")),
            ("create-at-root", "touch /nix/store/new".to_string()),
            ("mkdir", format!("mkdir {d}/newdir")),
            ("rmdir", format!("rmdir {empty}")),
            ("unlink", format!("rm -f {f}")),
            ("rename", format!("mv {f} {d}/renamed")),
            ("symlink", format!("ln -s x {d}/link")),
            ("link", format!("ln {f} {d}/hardlink")),
            ("chmod", format!("chmod 777 {f}")),
            ("chown", format!("chown 1:1 {f}")),
            ("utimes", format!("touch -d 2000-01-01 {f}")),
            ("truncate", format!("truncate -s 0 {f}")),
            ("mknod", format!("mknod {d}/fifo p")),
        ];
        let mut script = String::from(
            "echo GUEST-START\n\
             mount -o remount,rw /nix/store; echo \"REMOUNT $?\"\n\
             grep ' /nix/store ' /proc/self/mountinfo | sed 's/^/MOUNT /'\n",
        );
        for (name, cmd) in ops {
            script.push_str(&format!(
                "if ( {cmd} ) 2>/tmp/err; then echo \"MODIFIED {name}\"; \
                 else echo \"REFUSED {name}: $(cat /tmp/err)\"; fi\n"
            ));
        }
        script.push_str("echo \"OPS 15\"\necho GUEST-OK\n");
        script
    });
    vm::open_to_others(t.dir.path());
    let before = files_digest(&t.s.store_dir);
    let boot = t
        .guest(&format!("nixstore=virtiofs:{TAG}"))
        .nixstorefs(TAG, &t.s.store_dir, &t.s.closure_file, &[])
        .boot();
    assert_booted_ok(&boot);
    assert_eq!(
        boot.expect_value("REMOUNT "),
        "0",
        "the guest could not remount rw"
    );
    // So the guest's kernel passed the requests on: the daemon refused them.
    let mount = boot.expect_value("MOUNT ");
    assert!(
        mount.contains(" /nix/store rw"),
        "not remounted rw: {mount}"
    );
    boot.assert_no_marker("MODIFIED ");
    let refused: Vec<&str> = boot.lines().filter(|l| l.starts_with("REFUSED ")).collect();
    assert_eq!(refused.len().to_string(), boot.expect_value("OPS "));
    for line in &refused {
        assert!(line.contains("Read-only file system"), "{line}");
    }
    assert_eq!(
        files_digest(&t.s.store_dir),
        before,
        "the host store changed"
    );
    boot.backends[0].assert_unprivileged_and_clean_exit();
}

/// Every path below `dir` with its mode and, for files, its bytes, in one digest.
fn files_digest(dir: &Path) -> String {
    fn walk(p: &Path, h: &mut Sha256) {
        let meta = fs::symlink_metadata(p).unwrap();
        h.update(p.as_os_str().as_encoded_bytes());
        h.update(format!(
            "{:o}",
            std::os::unix::fs::PermissionsExt::mode(&meta.permissions())
        ));
        if meta.is_file() {
            h.update(fs::read(p).unwrap());
        } else if meta.is_dir() {
            let mut names: Vec<_> = fs::read_dir(p)
                .unwrap()
                .map(|e| e.unwrap().path())
                .collect();
            names.sort();
            for n in names {
                walk(&n, h);
            }
        }
    }
    let mut h = Sha256::new();
    walk(dir, &mut h);
    sample::hex(&h.finalize())
}

/// mkimage's DAX threshold: regular files of this many bytes or more are laid out plain in
/// a `--dax` image, and mapped by a guest that mounts it with `dax=always`.
const DAX_MIN_FILE_SIZE: u64 = 4096;
/// The most the guest's `Cached:` may grow while it reads every file at or above the
/// threshold from a DAX store: metadata is read before the first figure, so what is left
/// is the kernel's own noise. Reading them through the page cache grows it by their size,
/// over 33 MiB (the control, in the same boot, shows it for the largest).
const DAX_CACHE_GROWTH_LIMIT_KIB: u64 = 4 << 10;
/// The size of the largest file [`add_dax_data`] adds, which the control reads through
/// the page cache.
const CONTROL_READ_BYTES: usize = 24 << 20;
/// Size of the device a guest writes a tar of its store to.
const SCRATCH_MIB: u64 = 96;

/// Adds to `t`'s closure a store path of files at and around the DAX threshold and large
/// ones, so that the page cache test reads enough to see a difference.
fn add_dax_data(t: &mut Setup) -> String {
    let sizes = [
        4096usize,
        4097,
        8191,
        65_537,
        (1 << 20) + 3,
        8 << 20,
        CONTROL_READ_BYTES,
    ];
    let data: Vec<(String, Vec<u8>)> = sizes
        .iter()
        .map(|&n| {
            let name = format!("data-{n}");
            let bytes = PseudoRandom::bytes(&name, n);
            (name, bytes)
        })
        .collect();
    let files: Vec<(&str, &[u8])> = data
        .iter()
        .map(|(n, d)| (n.as_str(), d.as_slice()))
        .collect();
    let base = vm::add_store_path(&t.s, "dax-data", &files).expect("add the DAX data path");
    vm::append_to_closure(&mut t.s, &base).expect("add it to the closure");
    base
}

/// A zero-filled (sparse) file of [`SCRATCH_MIB`] for a guest to write to through a
/// writable pmem device.
fn scratch_file(t: &Setup, name: &str) -> PathBuf {
    let path = t.dir.path().join(name);
    File::create(&path)
        .and_then(|f| f.set_len(SCRATCH_MIB << 20))
        .unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    path
}

/// Script lines writing a tar of the guest's /nix/store to the pmem device that does not
/// hold the store (`TAR-OK DEVICE`, or `TAR-FAILED`).
const TAR_TO_SCRATCH: &str = "scratch=\n\
     for d in /dev/pmem*; do grep -q \"^$d \" /proc/mounts || scratch=$d; done\n\
     if [ -n \"$scratch\" ] && tar -c -f \"$scratch\" -C /nix/store .; then \
     echo \"TAR-OK $scratch\"; else echo \"TAR-FAILED ($scratch)\"; fi\n\
     sync\n";

/// Every regular file of `s`'s closure of [`DAX_MIN_FILE_SIZE`] bytes or more as the
/// guest's `sha256sum` prints it (`HASH  /nix/store/PATH`), sorted, and their total size.
fn big_file_sums(s: &SampleStore) -> (Vec<String>, u64) {
    fn walk(host: &Path, guest: &str, out: &mut Vec<String>, total: &mut u64) {
        let meta = fs::symlink_metadata(host).unwrap();
        if meta.is_file() && meta.len() >= DAX_MIN_FILE_SIZE {
            out.push(format!("{}  {guest}", sha256_hex(host)));
            *total += meta.len();
        } else if meta.is_dir() {
            for e in fs::read_dir(host).unwrap() {
                let e = e.unwrap();
                let name = e.file_name().to_string_lossy().into_owned();
                walk(&e.path(), &format!("{guest}/{name}"), out, total);
            }
        }
    }
    let (mut out, mut total) = (Vec::new(), 0);
    for base in &s.closure {
        walk(
            &s.store_dir.join(base),
            &format!("/nix/store/{base}"),
            &mut out,
            &mut total,
        );
    }
    out.sort();
    (out, total)
}

/// The `BIG ` lines a guest printed, sorted.
fn big_lines(boot: &Boot) -> Vec<String> {
    let mut lines: Vec<String> = boot
        .lines()
        .filter_map(|l| l.strip_prefix("BIG "))
        .map(str::to_owned)
        .collect();
    lines.sort();
    lines
}

/// A `NAME KIB` figure the guest printed.
fn kib(boot: &Boot, prefix: &str) -> u64 {
    boot.expect_value(prefix)
        .parse()
        .unwrap_or_else(|e| panic!("{prefix}: not a number of KiB: {e}"))
}

/// Differences between the trees `want` and `got` (types, permissions, bytes, link
/// targets, entries), appended to `diffs` with their path below the tree.
fn tree_diffs(want: &Path, got: &Path, rel: &Path, diffs: &mut Vec<String>) {
    use std::os::unix::fs::PermissionsExt;
    let (w, g) = match (fs::symlink_metadata(want), fs::symlink_metadata(got)) {
        (Ok(w), Ok(g)) => (w, g),
        (Ok(_), Err(_)) => return diffs.push(format!("{}: missing", rel.display())),
        (Err(_), _) => return diffs.push(format!("{}: not in the closure", rel.display())),
    };
    let kind = |m: &fs::Metadata| m.file_type();
    if kind(&w).is_symlink() || kind(&g).is_symlink() {
        if fs::read_link(want).ok() != fs::read_link(got).ok() {
            diffs.push(format!(
                "{}: link {:?}, guest saw {:?}",
                rel.display(),
                fs::read_link(want).ok(),
                fs::read_link(got).ok()
            ));
        }
        return;
    }
    if w.permissions().mode() & 0o7777 != g.permissions().mode() & 0o7777 {
        diffs.push(format!(
            "{}: mode {:o}, guest saw {:o}",
            rel.display(),
            w.permissions().mode() & 0o7777,
            g.permissions().mode() & 0o7777
        ));
    }
    if w.is_file() && g.is_file() {
        if fs::read(want).unwrap() != fs::read(got).unwrap() {
            diffs.push(format!("{}: different bytes", rel.display()));
        }
    } else if w.is_dir() && g.is_dir() {
        let names = |d: &Path| -> std::collections::BTreeSet<std::ffi::OsString> {
            fs::read_dir(d)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect()
        };
        let (wn, gn) = (names(want), names(got));
        for n in wn.union(&gn) {
            tree_diffs(&want.join(n), &got.join(n), &rel.join(n), diffs);
        }
    } else {
        diffs.push(format!(
            "{}: {:?}, guest saw {:?}",
            rel.display(),
            w.file_type(),
            g.file_type()
        ));
    }
}

/// Extracts the tar a guest wrote to `scratch` and asserts that it is exactly `s`'s
/// closure: the same store paths, and below them the same names, types, permissions,
/// bytes and link targets.
fn assert_tar_is_the_closure(scratch: &Path, s: &SampleStore, out: &Path) {
    fs::create_dir(out).unwrap();
    let o = harness::run(
        Command::new("tar")
            .arg("-x")
            .arg("-f")
            .arg(scratch)
            .arg("-C")
            .arg(out)
            .stdin(Stdio::null()),
        Duration::from_secs(120),
    );
    assert!(
        o.status.success(),
        "extracting the guest's tar failed ({}): {}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    let mut seen: Vec<String> = fs::read_dir(out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    seen.sort();
    assert_eq!(seen, s.closure, "the store paths the guest saw");
    let mut diffs = Vec::new();
    for base in &s.closure {
        tree_diffs(
            &s.store_dir.join(base),
            &out.join(base),
            Path::new(base),
            &mut diffs,
        );
    }
    assert!(
        diffs.is_empty(),
        "the guest's store differs from the closure in {} places: {:#?}",
        diffs.len(),
        &diffs[..diffs.len().min(30)]
    );
}

/// Asserts that guest-init said DAX is on for a pmem device, and that the read-only store
/// is mounted with `dax=always` (the `RO-MOUNT` line of the guest's mountinfo).
fn assert_dax_on(boot: &Boot) {
    let line = boot.assert_marker("guest-init: DAX on for /dev/pmem");
    assert!(line.contains("is mapped from the device"), "{line}");
    boot.assert_no_marker("DAX off");
    boot.assert_no_marker("cannot tell whether DAX is on");
    let mount = boot.expect_value("RO-MOUNT ");
    assert!(
        mount.contains(" erofs /dev/pmem") && mount.contains("dax=always"),
        "the read-only store's mount: {mount}"
    );
}

/// Script lines printing the read-only store's mountinfo line (`RO-MOUNT ...`).
const RO_MOUNT: &str = "grep ' /nix/.ro-store ' /proc/self/mountinfo | sed 's/^/RO-MOUNT /'\n";

/// A DAX image over virtio-pmem, found by label among pmem devices: the guest sees exactly
/// the closure (a tar of its /nix/store, written to a writable pmem device, compared with
/// the host's store paths) and DAX is on. While it reads every file at or above the
/// threshold, its page cache (`Cached:`) does not grow. The control, in the same boot: a
/// copy of the image on another pmem device, mounted with `dax=never`, whose largest file
/// read through the page cache does grow it.
fn pmem_store_is_the_closure_byte_for_byte_and_stays_out_of_the_page_cache(kernel: Kernel) {
    let data = sample::base_name("dax-data");
    let mut t = Setup::new(kernel, |_| {
        format!(
            "echo GUEST-START\n{RO_MOUNT}\
             sync\n\
             echo 3 > /proc/sys/vm/drop_caches\n\
             find /nix/store -type f -size +{below}c > /tmp/big-files\n\
             set -- $(grep '^Cached:' /proc/meminfo)\n\
             echo \"CACHED-BEFORE $2\"\n\
             while read -r f; do sha256sum \"$f\"; done < /tmp/big-files | sed 's/^/BIG /'\n\
             set -- $(grep '^Cached:' /proc/meminfo)\n\
             echo \"CACHED-AFTER $2\"\n\
             mkdir /tmp/control\n\
             for d in /dev/pmem*; do\n\
               grep -q \"^$d \" /proc/mounts || \
             {{ mount -t erofs -o ro,dax=never $d /tmp/control 2>/dev/null && break; }}\n\
             done\n\
             grep ' /tmp/control ' /proc/self/mountinfo | sed 's/^/CONTROL-MOUNT /'\n\
             cat /tmp/control/{data}/data-{CONTROL_READ_BYTES} > /dev/null\n\
             set -- $(grep '^Cached:' /proc/meminfo)\n\
             echo \"CACHED-CONTROL $2\"\n\
             {TAR_TO_SCRATCH}\
             echo GUEST-OK\n",
            below = DAX_MIN_FILE_SIZE - 1,
        )
    });
    assert_eq!(add_dax_data(&mut t), data);
    let img = t.image(&t.s.closure_file, "store.img", &["--dax"]);
    let control_img = t.image(
        &t.s.closure_file,
        "control.img",
        &["--dax", "-L", "control"],
    );
    let scratch = scratch_file(&t, "scratch.img");
    let (sums, total) = big_file_sums(&t.s);
    assert!(
        total >= 32 << 20,
        "the closure's big files hold only {total} bytes"
    );
    let boot = t
        .guest("nixstore=pmem:LABEL=nix-store")
        .pmem(&img)
        .pmem(&control_img)
        .writable_pmem(&scratch)
        .timeout(Duration::from_secs(240))
        .boot();
    assert_booted_ok(&boot);
    assert_dax_on(&boot);
    assert_eq!(
        big_lines(&boot),
        sums,
        "digests of the files at or above the threshold"
    );
    let (before, after, control) = (
        kib(&boot, "CACHED-BEFORE "),
        kib(&boot, "CACHED-AFTER "),
        kib(&boot, "CACHED-CONTROL "),
    );
    let control_kib = (CONTROL_READ_BYTES >> 10) as u64;
    println!(
        "Cached: {before} KiB before reading {} files ({} KiB) over DAX, {after} KiB after; \
         {control} KiB after the control read of {control_kib} KiB through the page cache",
        sums.len(),
        total >> 10
    );
    assert!(
        after < before + DAX_CACHE_GROWTH_LIMIT_KIB,
        "the page cache grew from {before} to {after} KiB while reading {} KiB over DAX",
        total >> 10
    );
    let control_mount = boot.expect_value("CONTROL-MOUNT ");
    assert!(
        control_mount.contains(" erofs /dev/pmem") && !control_mount.contains("dax=always"),
        "the control's mount: {control_mount}"
    );
    assert!(
        control >= after + control_kib * 3 / 4,
        "the control read of {control_kib} KiB through the page cache grew it only from \
         {after} to {control} KiB: the figures cannot tell DAX apart"
    );
    boot.assert_marker("TAR-OK /dev/pmem");
    assert_tar_is_the_closure(&scratch, &t.s, &t.dir.path().join("seen"));
}

/// Writes through the device never change the image on the host: a remount read-write of
/// the store, then `dd` to /dev/pmem0 (file data, then the superblock and metadata), with
/// a writable overlay that takes the guest's own writes. The store the guest reads after
/// dropping its caches is intact too. The remount and its probe come first, and nothing is
/// looked up between the writes and the cache drop: until then the guest's cache of the
/// device holds what it wrote.
fn pmem_writes_never_reach_the_image(kernel: Kernel) {
    let t = Setup::new(kernel, |s| {
        format!(
            "echo GUEST-START\n{RO_MOUNT}\
             echo written-in-guest > /nix/store/new-file && echo \"READBACK $(cat /nix/store/new-file)\"\n\
             touch /tmp/probe && echo TOUCH-WORKS\n\
             mount -o remount,rw /nix/.ro-store 2>/dev/null\n\
             echo \"REMOUNT-STATUS $?\"\n\
             if touch /nix/.ro-store/probe 2>/dev/null; then echo RO-STORE-WRITABLE; else echo RO-STORE-READ-ONLY; fi\n\
             dd if=/dev/urandom of=/dev/pmem0 bs=4k count=16 seek=256 conv=fsync 2>/dev/null\n\
             data=$?\n\
             dd if=/dev/zero of=/dev/pmem0 bs=64k count=64 conv=fsync 2>/dev/null\n\
             head=$?\n\
             echo 3 > /proc/sys/vm/drop_caches\n\
             echo \"DD-STATUS $data $head\"\n\
             set -- $(sha256sum /nix/.ro-store/{big})\n\
             echo \"SHA256-AFTER $1\"\n\
             echo GUEST-OK\n",
            big = s.big_file.display(),
        )
    });
    let img = t.image(&t.s.closure_file, "store.img", &["--dax"]);
    let before = sha256_hex(&img);
    let modified = fs::metadata(&img).unwrap().modified().unwrap();
    let boot = t
        .guest("nixstore=pmem nixstore.writable=tmpfs")
        .pmem(&img)
        .boot();
    assert_booted_ok(&boot);
    assert_dax_on(&boot);
    assert_eq!(boot.expect_value("READBACK "), "written-in-guest");
    println!(
        "guest: remount read-write exited {}",
        boot.expect_value("REMOUNT-STATUS ")
    );
    boot.assert_marker("TOUCH-WORKS");
    boot.assert_marker("RO-STORE-READ-ONLY");
    // Both writes went through the device as far as the guest can tell: they reached qemu.
    assert_eq!(
        boot.expect_value("DD-STATUS "),
        "0 0",
        "dd to /dev/pmem0 (file data, then the first 4 MiB)"
    );
    assert_eq!(sha256_hex(&img), before, "the image changed on the host");
    assert_eq!(
        fs::metadata(&img).unwrap().modified().unwrap(),
        modified,
        "the image's mtime changed"
    );
    assert_eq!(
        boot.expect_value("SHA256-AFTER "),
        sha256_hex(&t.s.host(&t.s.big_file)),
        "the guest's store after the writes"
    );
}

/// A running system switches from an image on a virtio disk to a DAX image of a second
/// closure over virtio-pmem, found by label among pmem devices (the disk's image has the
/// same UUID), read-only, then writable; the same source spelt as a device node changes
/// nothing.
fn mount_store_switches_to_a_pmem_image(kernel: Kernel) {
    let extra = sample::base_name("only-in-second");
    let t = Setup::new(kernel, |_| {
        format!(
            "echo GUEST-START\n\
             /init mount-store --store pmem:LABEL=second >/tmp/switch.out 2>&1\n\
             echo \"SWITCH-STATUS $?\"\n\
             sed 's/^/SWITCH: /' /tmp/switch.out\n\
             echo \"EXTRA $(cat /nix/store/{extra}/data)\"\n\
             /init mount-store --store pmem:/dev/pmem0 >/tmp/again.out 2>&1\n\
             echo \"AGAIN-STATUS $?\"\n\
             sed 's/^/AGAIN: /' /tmp/again.out\n\
             /init mount-store --store pmem:LABEL=second --writable tmpfs >/tmp/w.out 2>&1\n\
             echo \"WRITABLE-STATUS $?\"\n\
             sed 's/^/WRITABLE: /' /tmp/w.out\n\
             echo written > /nix/store/new-file && echo \"WRITTEN $(cat /nix/store/new-file)\"\n\
             echo \"EXTRA-AFTER $(cat /nix/store/{extra}/data)\"\n\
             grep ' /nix/.ro-store ' /proc/self/mountinfo | tail -n 1 | sed 's/^/RO-MOUNT /'\n\
             grep /nix /proc/self/mountinfo | sed 's/^/MOUNT /'\n\
             echo GUEST-OK\n"
        )
    });
    let first = t.image(&t.s.closure_file, "first.img", &[]);
    let added = vm::add_store_path(&t.s, "only-in-second", &[("data", b"second closure\n")])
        .expect("add the extra store path");
    assert_eq!(added, extra);
    let closure2 = t.dir.path().join("closure2.txt");
    fs::copy(&t.s.closure_file, &closure2).unwrap();
    let mut s2 = t.s.clone();
    s2.closure_file = closure2.clone();
    vm::append_to_closure(&mut s2, &extra).unwrap();
    let second = t.image(&closure2, "second.img", &["-L", "second", "--dax"]);
    let boot = t
        .guest("nixstore=erofs:LABEL=nix-store")
        .disk(&first)
        .pmem(&second)
        .boot();
    assert_booted_ok(&boot);
    assert_eq!(boot.expect_value("SWITCH-STATUS "), "0");
    assert!(
        boot.lines()
            .any(|l| l.starts_with("SWITCH: ") && l.contains("DAX on for /dev/pmem0")),
        "mount-store did not say DAX is on"
    );
    assert_eq!(boot.expect_value("EXTRA "), "second closure");
    assert_eq!(boot.expect_value("AGAIN-STATUS "), "0");
    assert!(
        boot.lines()
            .any(|l| l.starts_with("AGAIN: ") && l.contains("already mounted")),
        "the same pmem source spelt as a node was mounted again"
    );
    assert_eq!(boot.expect_value("WRITABLE-STATUS "), "0");
    assert_eq!(boot.expect_value("WRITTEN "), "written");
    assert_eq!(boot.expect_value("EXTRA-AFTER "), "second closure");
    let mount = boot.expect_value("RO-MOUNT ");
    assert!(
        mount.contains(" erofs /dev/pmem0") && mount.contains("dax=always"),
        "{mount}"
    );
}

/// When a console marker first showed, seen from the host.
type Seen = Arc<Mutex<Option<Instant>>>;

/// Two qemu processes map one image file at the same time: each guest reads the whole
/// store over DAX (a tar of it to a scratch device of its own, compared with the closure,
/// then more reads for 20 s), and their reading overlaps. The image is unchanged.
fn two_guests_share_one_pmem_image(kernel: Kernel) {
    let t = Setup::new(kernel, |_| {
        format!(
            "echo GUEST-START\n{RO_MOUNT}\
             echo READ-START\n\
             start=$(date +%s)\n\
             {TAR_TO_SCRATCH}\
             reads=1\n\
             while [ $(( $(date +%s) - start )) -lt 20 ]; do\n\
               echo \"READ-BYTES $(tar -c -f - -C /nix/store . | wc -c)\"\n\
               reads=$((reads + 1))\n\
             done\n\
             echo \"READS $reads\"\n\
             echo READ-DONE\n\
             echo GUEST-OK\n"
        )
    });
    let img = t.image(&t.s.closure_file, "store.img", &["--dax"]);
    let before = sha256_hex(&img);
    let runs: Vec<(Boot, PathBuf, Option<Instant>, Option<Instant>)> =
        std::thread::scope(|scope| {
            let handles: Vec<_> = (0..2)
                .map(|i| {
                    let scratch = scratch_file(&t, &format!("scratch{i}.img"));
                    let (t, img) = (&t, &img);
                    scope.spawn(move || {
                        let (start, done): (Seen, Seen) = Default::default();
                        let mark = |seen: &Seen| {
                            let seen = seen.clone();
                            move || *seen.lock().unwrap() = Some(Instant::now())
                        };
                        let boot = t
                            .guest("nixstore=pmem")
                            .pmem(img)
                            .writable_pmem(&scratch)
                            .timeout(Duration::from_secs(300))
                            .on_console("READ-START", mark(&start))
                            .on_console("READ-DONE", mark(&done))
                            .boot();
                        let (start, done) = (*start.lock().unwrap(), *done.lock().unwrap());
                        (boot, scratch, start, done)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("a guest's thread panicked"))
                .collect()
        });
    for (i, (boot, scratch, _, _)) in runs.iter().enumerate() {
        assert_booted_ok(boot);
        assert_dax_on(boot);
        boot.assert_marker("TAR-OK /dev/pmem");
        println!(
            "guest {i}: {} reads of the whole store",
            boot.expect_value("READS ")
        );
        assert_tar_is_the_closure(scratch, &t.s, &t.dir.path().join(format!("seen{i}")));
    }
    let instants = |i: usize| {
        let (_, _, start, done) = &runs[i];
        (
            start.unwrap_or_else(|| panic!("guest {i} never said READ-START")),
            done.unwrap_or_else(|| panic!("guest {i} never said READ-DONE")),
        )
    };
    let ((s0, d0), (s1, d1)) = (instants(0), instants(1));
    println!(
        "the guests read the store at the same time for {:.1} s",
        d0.min(d1)
            .saturating_duration_since(s0.max(s1))
            .as_secs_f64()
    );
    assert!(
        s0.max(s1) < d0.min(d1),
        "the guests did not read at the same time: guest 1 started {:.1} s after guest 0 \
         and guest 0 read for {:.1} s, guest 1 for {:.1} s",
        s1.duration_since(s0.min(s1)).as_secs_f64() - s0.duration_since(s0.min(s1)).as_secs_f64(),
        d0.duration_since(s0).as_secs_f64(),
        d1.duration_since(s1).as_secs_f64()
    );
    assert_eq!(sha256_hex(&img), before, "the image changed on the host");
}

/// The update workflow with a running guest: it boots on closure A and runs A's program,
/// which waits; the host updates the daemon to closure B (A's program left out, B's
/// added); the guest, which listed and looked up the store before, finds and runs B's
/// program at once, while A's program goes on running from the path that left; a second
/// update prunes A's path once the guest let go of it. All the while another guest
/// process reads a store file in a loop, and no read fails.
fn native_backend_takes_a_new_closure_without_a_restart(kernel: Kernel) {
    let a_prog = sample::base_name("system-a");
    let b_prog = sample::base_name("system-b");
    let shell = format!(
        "/nix/store/{}/bin/busybox sh",
        sample::base_name("guest-test")
    );
    let mut t = Setup::new(kernel, |s| {
        let small = s.small_files[0].display().to_string();
        format!(
            "echo GUEST-START\n\
             sh /nix/store/{a_prog}/bin/a &\n\
             A=$!\n\
             ( n=0; while [ ! -e /tmp/stop ]; do \
                 cat /nix/store/{small} > /dev/null || echo READ-FAILED; n=$((n+1)); \
               done; echo \"READS $n\" ) &\n\
             R=$!\n\
             ls /nix/store > /dev/null\n\
             [ -e /nix/store/{b_prog} ] && echo B-TOO-EARLY\n\
             sleep 1\n\
             echo UPDATE-NOW\n\
             i=0; while [ ! -e /nix/store/{b_prog}/bin/b ] && [ $i -lt 600 ]; do \
               i=$((i+1)); sleep 0.1; done\n\
             sh /nix/store/{b_prog}/bin/b\n\
             sleep 0.2\n\
             ls /nix/store | grep -q {b_prog} && echo B-LISTED\n\
             ls /nix/store | grep -q {a_prog} || echo A-UNLISTED\n\
             sleep 1\n\
             [ -e /nix/store/{a_prog} ] || echo A-NOT-FOUND\n\
             kill -0 $A && echo A-STILL-RUNNING\n\
             kill $A; wait $A\n\
             echo 2 > /proc/sys/vm/drop_caches\n\
             echo PRUNE-NOW\n\
             sleep 2\n\
             ls /nix/store/{b_prog}/bin/b > /dev/null && echo B-AFTER-PRUNE\n\
             touch /tmp/stop; wait $R\n\
             echo GUEST-OK\n"
        )
    });
    let a = vm::add_store_path(
        &t.s,
        "system-a",
        &[(
            "bin/a",
            format!("#!{shell}\necho A-RUNNING\nwhile :; do sleep 1; done\n").as_bytes(),
        )],
    )
    .expect("write system A");
    vm::append_to_closure(&mut t.s, &a).expect("add system A to the closure");
    let b = vm::add_store_path(
        &t.s,
        "system-b",
        &[("bin/b", format!("#!{shell}\necho B-RAN\n").as_bytes())],
    )
    .expect("write system B");
    let closure_b = t.dir.path().join("closure-b.txt");
    let text: String =
        t.s.closure
            .iter()
            .filter(|p| **p != a)
            .chain(std::iter::once(&b))
            .map(|p| format!("{}\n", t.s.store_dir.join(p).display()))
            .collect();
    fs::write(&closure_b, text).unwrap();
    vm::open_to_others(t.dir.path());
    let control_dir = t.dir.path().join("control");
    fs::create_dir(&control_dir).unwrap();
    rustix::fs::chown(
        &control_dir,
        Some(rustix::fs::Uid::from_raw(vm::UNPRIVILEGED_UID)),
        None,
    )
    .unwrap();
    let control = control_dir.join("store.control");
    let answers: Arc<Mutex<Vec<String>>> = Arc::default();
    let update = |args: Vec<std::ffi::OsString>| {
        let control = control.clone();
        let answers = answers.clone();
        move || {
            let o = harness::run(
                Command::new(harness::bin("nixstorefs"))
                    .arg("update")
                    .arg("--control-socket")
                    .arg(&control)
                    .args(&args)
                    .stdin(Stdio::null()),
                Duration::from_secs(30),
            );
            answers.lock().unwrap().push(format!(
                "{} {}{}",
                o.status,
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ));
        }
    };
    let boot = t
        .guest(&format!("nixstore=virtiofs:{TAG}"))
        .nixstorefs(
            TAG,
            &t.s.store_dir,
            &t.s.closure_file,
            &["--control-socket", control.to_str().unwrap()],
        )
        .on_console("UPDATE-NOW", update(vec![closure_b.clone().into()]))
        .on_console(
            "PRUNE-NOW",
            update(vec!["--prune".into(), closure_b.clone().into()]),
        )
        .timeout(Duration::from_secs(240))
        .boot();
    assert_booted_ok(&boot);
    boot.assert_marker("A-RUNNING");
    boot.assert_no_marker("B-TOO-EARLY");
    boot.assert_in_order(&[
        "UPDATE-NOW",
        "B-RAN",
        "B-LISTED",
        "A-UNLISTED",
        "A-NOT-FOUND",
    ]);
    boot.assert_marker("A-STILL-RUNNING");
    boot.assert_marker("B-AFTER-PRUNE");
    boot.assert_no_marker("READ-FAILED");
    let reads: u64 = boot.expect_value("READS ").parse().unwrap();
    assert!(reads > 0, "the reader never read");
    let answers = answers.lock().unwrap();
    assert_eq!(answers.len(), 2, "{answers:?}");
    assert!(
        answers[0].contains("1 added, 1 removed")
            || answers[0].contains("1 added, 0 removed, 1 retiring"),
        "{answers:?}"
    );
    assert!(answers[1].contains("serving"), "{answers:?}");
    boot.backends[0].assert_unprivileged_and_clean_exit();
}
