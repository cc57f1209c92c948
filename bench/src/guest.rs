//! The walk and reads again, inside a VM guest under TCG, over virtiofs: nixstorefs's own
//! vhost-user backend, virtiofsd sharing a nixstorefs mount, and virtiofsd sharing a plain
//! directory of the same closure. Under TCG absolute figures mean little, so only the
//! ratios are reported, with the daemons' descriptors and memory.
//!
//! The VM itself is `nixstorefs_tests::vm`'s; this only supplies the store and the script.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use nixstorefs_tests::sample::base_name;
use nixstorefs_tests::vm::{self, Boot, Guest, GuestProgram, Initramfs, Kernel};
use serde_json::json;

use crate::ids::{GuestStep, GuestVia, Id, Peak};
use crate::mounts::FuseMount;
use crate::stats::{Better, Measurement, Results, Target};
use crate::store::{self, Built};

pub const METHOD: &str = "A VM (qemu TCG, 1 vCPU, 512 MiB, the host's Debian kernel, \
     guest-init mounting `/nix/store` from virtiofs) runs, for each run, after dropping the \
     guest's caches (`echo 3 > /proc/sys/vm/drop_caches`): `find /nix/store` (lstat of every \
     entry, cold in the guest), the same again (warm in the guest), `cat` of every file under \
     64 KiB (cold), and `cat` of the large files (cold). Variants: nixstorefs's own vhost-user \
     backend (`nixstorefs --socket-path`, run as nobody: `native`), virtiofsd (`--cache auto`) \
     sharing a nixstorefs mount of the closure (`nixstorefs`), and virtiofsd sharing a plain \
     directory holding the same closure, hard links to the same files (`plain`). Each variant \
     boots twice, in turn with the others (native, nixstorefs, plain, native, ...), and each \
     boot's first run is a warm-up. Timed in the guest with /proc/uptime (10 ms \
     resolution). Under TCG only the ratios mean anything. The share daemon's descriptors \
     and private resident memory (RssAnon; guest memory it wrote into is shared, not \
     counted) are the largest seen in /proc every 100 ms while the guest ran. \
     Targets: the native backend's cold walk and small-file reads at most 1.0× virtiofsd \
     over the plain directory and at least 1.2× faster than virtiofsd over the mount, its \
     large-file reads at least 0.9× as fast as the plain directory's; both walks through \
     the mount within 1.3× of the plain directory. \
     Footprint: one more boot each over the native backend and over virtiofsd sharing a plain \
     directory reads every file of the store path with --many-files files once (`find | \
     xargs cat`); the daemon's most descriptors and private memory meanwhile are reported, \
     with targets for the native backend: under 1,024 descriptors and under 64 MiB.";

const TAG: &str = "nix-store";
/// Boots per variant, in turn with the other variant's.
const ROUNDS: usize = 2;

/// What each step does, for the report's labels.
fn step_label(step: GuestStep) -> &'static str {
    match step {
        GuestStep::Walk => "find /nix/store, cold",
        GuestStep::WalkWarm => "find /nix/store, warm",
        GuestStep::Small => "read files < 64 KiB, cold",
        GuestStep::Seq => "read the large files, cold",
    }
}

/// Builds guest-init statically (unless told not to), where the VM helpers look for it.
pub(crate) fn guest_init(no_build: bool) -> Result<(), String> {
    if no_build {
        return catch_unwind(vm::guest_init_bin)
            .map(|_| ())
            .map_err(|_| "no static guest-init (see above)".into());
    }
    eprintln!("bench: [guest] building a static guest-init");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args([
        "build",
        "--release",
        "-p",
        "guest-init",
        "--target",
        vm::GUEST_INIT_TARGET,
    ])
    .env("RUSTFLAGS", "-C target-feature=+crt-static")
    .current_dir(crate::workspace())
    .stdin(Stdio::null());
    let st = crate::mounts::status_within(&mut cmd, crate::BUILD_TIMEOUT)?;
    if !st.success() {
        return Err(format!("building guest-init failed: {st}"));
    }
    catch_unwind(vm::guest_init_bin)
        .map(|_| ())
        .map_err(|_| "guest-init is still missing after building it".into())
}

/// The guest's script: marks with /proc/uptime around each step, `runs + 1` times.
fn script(runs: usize, big: &[PathBuf]) -> String {
    let bigs: Vec<String> = big
        .iter()
        .map(|p| format!("/nix/store/{}", p.display()))
        .collect();
    let mark =
        |what: &str| format!("echo \"MARK {what} $i $(busybox cut -d' ' -f1 /proc/uptime)\"");
    let drop = "busybox sync; echo 3 > /proc/sys/vm/drop_caches";
    let mut s = String::new();
    s.push_str("#!/bin/busybox sh\nexport PATH=/bin\necho GUEST-START\n");
    s.push_str("busybox find /nix/store -type f -size -64k > /tmp/small\n");
    s.push_str(&format!("for i in $(busybox seq 0 {runs}); do\n"));
    for &step in GuestStep::ALL {
        let cmd = match step {
            GuestStep::Walk | GuestStep::WalkWarm => "busybox find /nix/store > /dev/null".into(),
            GuestStep::Small => "busybox xargs busybox cat < /tmp/small > /dev/null".into(),
            GuestStep::Seq => format!("busybox cat {} > /dev/null", bigs.join(" ")),
        };
        if step != GuestStep::WalkWarm {
            s.push_str(&format!("  {drop}\n"));
        }
        s.push_str(&format!(
            "  {}\n  {cmd}\n  {}\n",
            mark(&format!("{step}-start")),
            mark(&format!("{step}-end"))
        ));
    }
    s.push_str("done\necho GUEST-OK\nbusybox sync\nbusybox poweroff -f\n");
    s
}

/// A store directory under `dir` with closure paths `names` (hard links) and a guest program
/// `program` running `script`, and a closure file listing all of it.
pub(crate) fn guest_store(
    b: &Built,
    names: &[String],
    dir: &Path,
    program: &str,
    script: &str,
) -> Result<(PathBuf, PathBuf, GuestProgram), String> {
    let e = |e: std::io::Error| e.to_string();
    if dir.exists() {
        fs::remove_dir_all(dir).map_err(e)?;
    }
    let store_dir = dir.join("store");
    fs::create_dir_all(&store_dir).map_err(e)?;
    for name in names {
        store::link_tree(&b.host.store_dir.join(name), &store_dir.join(name)).map_err(e)?;
    }
    let prog = GuestProgram {
        base: base_name(program),
    };
    let bin = store_dir.join(&prog.base).join("bin");
    fs::create_dir_all(&bin).map_err(e)?;
    fs::write(bin.join("run"), script).map_err(e)?;
    fs::set_permissions(bin.join("run"), fs::Permissions::from_mode(0o555)).map_err(e)?;
    let mut list = String::new();
    for n in names.iter().chain([&prog.base]) {
        list.push_str(&format!("{}\n", store_dir.join(n).display()));
    }
    let closure = dir.join("closure.txt");
    fs::write(&closure, list).map_err(e)?;
    Ok((store_dir, closure, prog))
}

/// Durations (s) per step, one per run, warm-up dropped.
fn parse(console: &str, runs: usize) -> Result<BTreeMap<GuestStep, Vec<f64>>, String> {
    let mut at: BTreeMap<(String, usize), f64> = BTreeMap::new();
    for l in console.lines() {
        let l = l.trim_end_matches('\r');
        let Some(rest) = l.strip_prefix("MARK ") else {
            continue;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        if let [what, i, t] = f[..] {
            if let (Ok(i), Ok(t)) = (i.parse(), t.parse()) {
                at.insert((what.to_string(), i), t);
            }
        }
    }
    let mut out = BTreeMap::new();
    for &step in GuestStep::ALL {
        let mut v = Vec::new();
        for i in 1..=runs {
            let s = at.get(&(format!("{step}-start"), i));
            let e = at.get(&(format!("{step}-end"), i));
            match (s, e) {
                (Some(s), Some(e)) => v.push(e - s),
                _ => return Err(format!("the guest did not report {step} of run {i}")),
            }
        }
        out.insert(step, v);
    }
    Ok(out)
}

/// Boots a guest over each variant with the first `paths` closure paths and records the
/// timings of its steps.
pub fn run(
    b: &Built,
    paths: usize,
    bin: &Path,
    runs: usize,
    no_build: bool,
    r: &mut Results,
) -> Result<(), String> {
    vm::which("qemu-system-x86_64").ok_or("qemu-system-x86_64 is not installed")?;
    guest_init(no_build)?;
    let dir = b
        .host
        .store_dir
        .parent()
        .and_then(Path::parent)
        .ok_or("no scratch directory")?
        .join("guest");
    // Each variant boots ROUNDS times, alternating with the other, so that a slow spell of
    // the machine does not land on one variant only.
    let per_boot = runs.div_ceil(ROUNDS);
    let (store_dir, closure, prog) = guest_store(
        b,
        &b.closure[..paths],
        &dir,
        "nixstorefs-bench-guest",
        &script(per_boot, &b.big_files),
    )?;
    let initramfs = dir.join("initramfs.cpio");
    let kernel = kernel_and_initramfs(&initramfs)?;
    let mut results: BTreeMap<GuestVia, BTreeMap<GuestStep, Vec<f64>>> = BTreeMap::new();
    vm::open_to_others(&dir);
    let mut daemons: BTreeMap<GuestVia, (Vec<f64>, Vec<f64>)> = BTreeMap::new();
    for (round, variant) in (0..ROUNDS).flat_map(|i| GuestVia::ALL.iter().map(move |&v| (i, v))) {
        let mount = match variant {
            GuestVia::Nixstorefs => Some(FuseMount::nixstorefs(bin, &store_dir, &closure, &[])?.0),
            GuestVia::Native | GuestVia::Plain => None,
        };
        let shared = mount
            .as_ref()
            .map_or(store_dir.clone(), |m| m.path().to_path_buf());
        eprintln!(
            "bench: [guest] booting with virtiofs over {variant} ({} of {ROUNDS})",
            round + 1
        );
        let share = match variant {
            GuestVia::Native => Share::Native {
                store_dir: &store_dir,
                closure: &closure,
            },
            GuestVia::Nixstorefs | GuestVia::Plain => Share::Virtiofsd(&shared),
        };
        let boot = boot_guest(&kernel, &initramfs, &prog, share, Duration::from_secs(900));
        if let Some(m) = mount {
            m.unmount()?;
        }
        let boot = boot.map_err(|e| format!("the guest over {variant}: {e}"))?;
        if let Some(d) = boot.backends.first() {
            let entry = daemons.entry(variant).or_default();
            entry.0.push(d.max_fds as f64);
            entry.1.push(d.max_anon_kib as f64 / 1024.0);
        }
        let steps = results.entry(variant).or_default();
        for (step, times) in parse(&boot.console, per_boot)? {
            steps.entry(step).or_default().extend(times);
        }
    }
    for (&variant, steps) in &results {
        for &step in GuestStep::ALL {
            r.add(Measurement {
                id: Id::GuestStep(variant, step),
                label: format!("{}, virtiofs over {variant}", step_label(step)),
                unit: "s",
                better: Better::Lower,
                samples: steps[&step].clone(),
                params: json!({"variant": variant.as_str()}),
            });
        }
    }
    for (&variant, (fds, anon)) in &daemons {
        let daemon = daemon_name(variant);
        for (peak, label, unit, samples) in [
            (Peak::Fds, "descriptors held at most by", "fds", fds),
            (Peak::Anon, "private memory at most of", "MiB", anon),
        ] {
            r.add(Measurement {
                id: Id::GuestDaemon(variant, peak),
                label: format!("{label} {daemon}, virtiofs over {variant}"),
                unit,
                better: Better::Lower,
                samples: samples.clone(),
                params: json!({"variant": variant.as_str()}),
            });
        }
    }
    for &step in GuestStep::ALL {
        let label = step_label(step);
        let (vs_plain, vs_mount) = match step {
            GuestStep::Walk | GuestStep::Small => {
                (Some(Target::AtMost(1.0)), Some(Target::AtMost(1.0 / 1.2)))
            }
            GuestStep::Seq => (Some(Target::AtMost(1.0 / 0.9)), None),
            GuestStep::WalkWarm => (None, None),
        };
        let id = |via| Id::GuestStep(via, step);
        r.ratio(
            format!("{label}: native backend vs virtiofsd over the plain directory"),
            id(GuestVia::Native),
            id(GuestVia::Plain),
            vs_plain,
        );
        r.ratio(
            format!("{label}: native backend vs virtiofsd over the mount"),
            id(GuestVia::Native),
            id(GuestVia::Nixstorefs),
            vs_mount,
        );
        let walk = matches!(step, GuestStep::Walk | GuestStep::WalkWarm);
        r.ratio(
            format!("{label}: virtiofsd over the mount vs over the plain directory"),
            id(GuestVia::Nixstorefs),
            id(GuestVia::Plain),
            walk.then_some(Target::AtMost(1.3)),
        );
    }
    let footprint_dir = dir.with_file_name("guest-footprint");
    let _ = fs::remove_dir_all(&footprint_dir);
    let measured = footprint(b, &kernel, &initramfs, &footprint_dir, r);
    let _ = fs::remove_dir_all(&footprint_dir);
    let _ = fs::remove_dir_all(&dir);
    measured
}

/// The guest's script for the footprint boots: read every file once, count them.
const FOOTPRINT_SCRIPT: &str = "#!/bin/busybox sh\nexport PATH=/bin\necho GUEST-START\n\
     busybox find /nix/store -type f | busybox xargs busybox cat > /dev/null\n\
     echo \"FILES $(busybox find /nix/store -type f | busybox wc -l)\"\n\
     echo GUEST-OK\nbusybox sync\nbusybox poweroff -f\n";

/// Boots a guest that walks and reads every file of the store path with
/// [`store::Params::many_files`] files, once over the native backend and once over
/// virtiofsd sharing a plain directory, and records the most descriptors and private
/// memory each daemon held meanwhile.
fn footprint(
    b: &Built,
    kernel: &Kernel,
    initramfs: &Path,
    dir: &Path,
    r: &mut Results,
) -> Result<(), String> {
    let many = b
        .footprint_paths
        .last()
        .ok_or("no footprint store path")?
        .clone();
    let (store_dir, closure, prog) = guest_store(
        b,
        std::slice::from_ref(&many),
        dir,
        "nixstorefs-bench-footprint",
        FOOTPRINT_SCRIPT,
    )?;
    vm::open_to_others(dir);
    for variant in [GuestVia::Native, GuestVia::Plain] {
        eprintln!("bench: [guest] reading every file of {many} over {variant}");
        let share = match variant {
            GuestVia::Native => Share::Native {
                store_dir: &store_dir,
                closure: &closure,
            },
            GuestVia::Nixstorefs | GuestVia::Plain => Share::Virtiofsd(&store_dir),
        };
        let boot = boot_guest(kernel, initramfs, &prog, share, Duration::from_secs(1800))
            .map_err(|e| format!("the footprint guest over {variant}: {e}"))?;
        let files = boot.value("FILES ").unwrap_or("?").to_string();
        let d = boot.backends.first().ok_or("no share daemon was sampled")?;
        let daemon = daemon_name(variant);
        for (peak, label, unit, value) in [
            (
                Peak::Fds,
                "descriptors held at most by",
                "fds",
                d.max_fds as f64,
            ),
            (
                Peak::Anon,
                "private memory at most of",
                "MiB",
                d.max_anon_kib as f64 / 1024.0,
            ),
        ] {
            r.add(Measurement {
                id: Id::GuestFootprint(variant, peak),
                label: format!("{label} {daemon} while a guest reads {files} files"),
                unit,
                better: Better::Lower,
                samples: vec![value],
                params: json!({"variant": variant.as_str(), "files": files}),
            });
        }
    }
    r.absolute(
        "native backend's descriptors after a guest read every file",
        Id::GuestFootprint(GuestVia::Native, Peak::Fds),
        Target::Below(1024.0),
    );
    r.absolute(
        "native backend's private memory after a guest read every file",
        Id::GuestFootprint(GuestVia::Native, Peak::Anon),
        Target::Below(64.0),
    );
    Ok(())
}

/// The daemon that serves a guest's store over `variant`, for labels.
fn daemon_name(variant: GuestVia) -> &'static str {
    match variant {
        GuestVia::Native => "nixstorefs --socket-path",
        GuestVia::Nixstorefs | GuestVia::Plain => "virtiofsd",
    }
}

/// What serves `/nix/store` to a bench guest.
enum Share<'a> {
    /// nixstorefs's own backend, serving a closure of a store directory.
    Native {
        store_dir: &'a Path,
        closure: &'a Path,
    },
    /// virtiofsd, sharing a directory.
    Virtiofsd(&'a Path),
}

/// The host's guest kernel, and an initramfs for it with guest-init written to `initramfs`.
pub(crate) fn kernel_and_initramfs(initramfs: &Path) -> Result<Kernel, String> {
    catch_unwind(|| {
        let k = Kernel::find();
        Initramfs::for_guest_init(&k).write(initramfs).map(|_| k)
    })
    .map_err(|_| "no guest kernel or initramfs (see above)".to_string())?
    .map_err(|e| format!("initramfs: {e}"))
}

/// Boots a guest running `prog` with the store shared as `share`, and checks that the
/// program finished.
fn boot_guest(
    kernel: &Kernel,
    initramfs: &Path,
    prog: &GuestProgram,
    share: Share<'_>,
    timeout: Duration,
) -> Result<Boot, String> {
    boot_to_end(|| {
        let g = Guest::new(kernel, initramfs)
            .cmdline("loglevel=4")
            .cmdline(&format!("nixstore=virtiofs:{TAG}"))
            .cmdline(&prog.init_arg())
            .timeout(timeout);
        match share {
            Share::Native { store_dir, closure } => g.nixstorefs(TAG, store_dir, closure, &[]),
            Share::Virtiofsd(dir) => g.virtiofs(TAG, dir),
        }
    })
}

/// Boots the guest `guest` describes and checks that its program finished (said
/// `GUEST-OK`). The VM helpers panic on a broken setup, after stopping everything they
/// started: that becomes an error here, with what they printed above it.
pub(crate) fn boot_to_end(guest: impl FnOnce() -> Guest) -> Result<Boot, String> {
    let boot = catch_unwind(AssertUnwindSafe(|| guest().boot()))
        .map_err(|_| "booting failed (see above)".to_string())?;
    if !boot.console.contains("GUEST-OK") {
        return Err(format!(
            "did not finish ({}); console tail:\n{}",
            boot.status_text(),
            tail(&boot.console, 30)
        ));
    }
    Ok(boot)
}

pub(crate) fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
