//! Live closure updates: how long an update of a 2,500-path closure takes to be seen (by
//! a guest through the native backend, and on the host mount), and what the daemon holds
//! across 100 updates.
//!
//! Each update replaces the served closure (the bench closure, a guest program) with one
//! whose "system" path is new: the previous one retires, as a switched-away system does.
//! The guest waits for each new system to appear, polling every millisecond, and looks
//! into it and lists the store, so that the daemon holds what a guest that uses it would.

use std::collections::BTreeMap;
use std::fs;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nixstorefs_tests::harness;
use nixstorefs_tests::sample::base_name;
use nixstorefs_tests::vm::{self, Guest, Initramfs, Kernel};
use serde_json::json;

use crate::ids::{Id, UpdateStep};
use crate::mounts::FuseMount;
use crate::stats::{Better, Measurement, Results, Target};
use crate::store::Built;

/// Updates per run.
pub const UPDATES: usize = 100;

/// The footprint is compared between after this update and after the last: the first
/// few updates settle the allocator's arenas and the caches' working set (on the mount,
/// 4.2 MiB after the first, 5.4 MiB after the tenth, 5.67 MiB after the 400th).
const WARM: usize = 10;

/// What the section's method note says.
pub const METHOD: &str = "Each update replaces the served closure (the bench closure, \
    2,500 paths, and a small system path) with one whose system path is new, through \
    `nixstorefs update`; the previous system retires. Guest: a 1-vCPU TCG guest served by \
    the native backend polls for each new system every millisecond, then lists the store \
    and looks into the new path; the latency is from the start of the update command on \
    the host to the guest's console saying it saw the path (so it includes starting the \
    command, reading and validating the closure, rooting and swapping). Host: the same \
    updates to a FUSE mount, timed until the command returns (the path is then visible: \
    checked), with every root entry looked up between updates. Footprint: the daemon's \
    private memory (RssAnon) and descriptors after the tenth and the last of the 100 \
    updates (the first ten settle the allocator and the caches).";

/// The store: the bench closure linked in, `UPDATES + 1` system paths, and the closure
/// file of each update.
struct UpdateStore {
    store_dir: PathBuf,
    /// Closure files: index 0 is served at start, index i by update i.
    closures: Vec<PathBuf>,
    /// The system path of each closure.
    systems: Vec<String>,
}

fn build_store(b: &Built, dir: &Path, script: Option<&str>) -> Result<UpdateStore, String> {
    let e = |e: std::io::Error| e.to_string();
    if dir.exists() {
        fs::remove_dir_all(dir).map_err(e)?;
    }
    let store_dir = dir.join("store");
    fs::create_dir_all(&store_dir).map_err(e)?;
    for name in &b.closure {
        crate::store::link_tree(&b.host.store_dir.join(name), &store_dir.join(name)).map_err(e)?;
    }
    let mut fixed: Vec<String> = b.closure.clone();
    if let Some(script) = script {
        let prog = base_name("nixstorefs-bench-update");
        let bin = store_dir.join(&prog).join("bin");
        fs::create_dir_all(&bin).map_err(e)?;
        fs::write(bin.join("run"), script).map_err(e)?;
        fs::set_permissions(
            bin.join("run"),
            std::os::unix::fs::PermissionsExt::from_mode(0o555),
        )
        .map_err(e)?;
        fixed.push(prog);
    }
    let mut closures = Vec::new();
    let mut systems = Vec::new();
    for i in 0..=UPDATES {
        let system = system_name(i);
        let bin = store_dir.join(&system).join("bin");
        fs::create_dir_all(&bin).map_err(e)?;
        fs::write(bin.join("switch"), format!("system {i}\n")).map_err(e)?;
        let mut list = String::new();
        for n in fixed.iter().chain([&system]) {
            list.push_str(&format!("{}\n", store_dir.join(n).display()));
        }
        let closure = dir.join(format!("closure-{i}.txt"));
        fs::write(&closure, list).map_err(e)?;
        closures.push(closure);
        systems.push(system);
    }
    Ok(UpdateStore {
        store_dir,
        closures,
        systems,
    })
}

fn system_name(i: usize) -> String {
    base_name(&format!("bench-system-{i:03}"))
}

/// `nixstorefs update --control-socket CONTROL CLOSURE`, checked to succeed.
fn update(bin: &Path, control: &Path, closure: &Path) -> Result<(), String> {
    let o = harness::run_bounded(
        Command::new(bin)
            .arg("update")
            .arg("--control-socket")
            .arg(control)
            .arg(closure)
            .stdin(Stdio::null()),
        Duration::from_secs(60),
    )
    .map_err(|e| format!("nixstorefs update: {e:?}"))?;
    if !o.status.success() {
        return Err(format!(
            "nixstorefs update failed ({}): {}",
            o.status,
            String::from_utf8_lossy(&o.stderr)
        ));
    }
    Ok(())
}

/// The daemon among the processes whose command line names `arg`: the one whose parent
/// is not among them (its helpers are its children, with the same command line).
fn daemon_pid(arg: &Path) -> Result<i32, String> {
    let pids = harness::pids_with_arg(arg.as_os_str());
    pids.iter()
        .copied()
        .find(|&p| harness::parent_of(p).is_none_or(|parent| !pids.contains(&parent)))
        .ok_or_else(|| format!("no daemon with {} on its command line", arg.display()))
}

/// Private memory (MiB) and descriptors of `pid`.
fn held(pid: i32) -> Result<(f64, f64), String> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).map_err(|e| e.to_string())?;
    let anon: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or("no RssAnon")?;
    let fds = fs::read_dir(format!("/proc/{pid}/fd"))
        .map_err(|e| e.to_string())?
        .count();
    Ok((anon / 1024.0, fds as f64))
}

/// The guest's script: for each update, say so, wait for its system, list the store
/// and look into the new path.
fn script(systems: &[String]) -> String {
    let mut s = String::from(
        "#!/bin/busybox sh\nexport PATH=/bin\necho GUEST-START\n\
         busybox ls /nix/store > /dev/null\n",
    );
    for (i, system) in systems.iter().enumerate().skip(1) {
        s.push_str(&format!(
            "echo UPDATE-{i:03}\n\
             while ! busybox test -e /nix/store/{system}/bin/switch; do busybox usleep 1000; done\n\
             echo SEEN-{i:03}\n\
             busybox ls /nix/store > /dev/null\n\
             busybox cat /nix/store/{system}/bin/switch > /dev/null\n"
        ));
    }
    s.push_str("echo GUEST-OK\nbusybox sync\nbusybox poweroff -f\n");
    s
}

/// Runs the section: one guest taking [`UPDATES`] updates, then a host mount taking as
/// many.
pub fn run(b: &Built, dir: &Path, bin: &Path, r: &mut Results) -> Result<(), String> {
    vm::which("qemu-system-x86_64").ok_or("qemu-system-x86_64 is not installed")?;
    let guest_dir = dir.join("update-guest");
    let systems: Vec<String> = (0..=UPDATES).map(system_name).collect();
    let store = build_store(b, &guest_dir, Some(&script(&systems)))?;
    let measured = guest(&store, &guest_dir, bin, r).and_then(|()| {
        let host_dir = dir.join("update-host");
        let host = build_store(b, &host_dir, None)?;
        let measured = host_mount(&host, &host_dir, bin, r);
        let _ = fs::remove_dir_all(&host_dir);
        measured
    });
    let _ = fs::remove_dir_all(&guest_dir);
    measured?;
    r.absolute(
        "update seen by the guest, 2,500-path closure (median)",
        Id::Update(UpdateStep::GuestSeen),
        Target::Below(100.0),
    );
    r.absolute(
        "update done on the host mount, 2,500-path closure (median)",
        Id::Update(UpdateStep::HostDone),
        Target::Below(100.0),
    );
    for (label, last, first) in [
        (
            "guest daemon's private memory, after 99 updates vs after 10",
            UpdateStep::GuestAnonLast,
            UpdateStep::GuestAnonFirst,
        ),
        (
            "guest daemon's descriptors, after 99 updates vs after 10",
            UpdateStep::GuestFdsLast,
            UpdateStep::GuestFdsFirst,
        ),
        (
            "mount daemon's private memory, after 100 updates vs after 10",
            UpdateStep::HostAnonLast,
            UpdateStep::HostAnonFirst,
        ),
        (
            "mount daemon's descriptors, after 100 updates vs after 10",
            UpdateStep::HostFdsLast,
            UpdateStep::HostFdsFirst,
        ),
    ] {
        r.ratio(
            label,
            Id::Update(last),
            Id::Update(first),
            Some(Target::AtMost(1.1)),
        );
    }
    Ok(())
}

fn add(r: &mut Results, step: UpdateStep, label: &str, unit: &'static str, samples: Vec<f64>) {
    r.add(Measurement {
        id: Id::Update(step),
        label: label.to_string(),
        unit,
        better: Better::Lower,
        samples,
        params: json!({"updates": UPDATES}),
    });
}

/// Which daemon a footprint is of.
#[derive(Clone, Copy)]
enum Daemon {
    /// The native backend serving the guest.
    Guest,
    /// The FUSE mount's.
    Mount,
}

/// The four footprint rows of `daemon`: private memory and descriptors after update
/// `first.0` and after update `last.0`.
fn footprint_rows(
    r: &mut Results,
    daemon: Daemon,
    first: (usize, (f64, f64)),
    last: (usize, (f64, f64)),
) {
    use UpdateStep::*;
    let (daemon, steps) = match daemon {
        Daemon::Guest => (
            "guest",
            [GuestAnonFirst, GuestFdsFirst, GuestAnonLast, GuestFdsLast],
        ),
        Daemon::Mount => (
            "mount",
            [HostAnonFirst, HostFdsFirst, HostAnonLast, HostFdsLast],
        ),
    };
    for (i, (after, (anon, fds))) in [first, last].into_iter().enumerate() {
        add(
            r,
            steps[2 * i],
            &format!("{daemon} daemon's private memory after update {after}"),
            "MiB",
            vec![anon],
        );
        add(
            r,
            steps[2 * i + 1],
            &format!("{daemon} daemon's descriptors after update {after}"),
            "fds",
            vec![fds],
        );
    }
}

fn guest(store: &UpdateStore, dir: &Path, bin: &Path, r: &mut Results) -> Result<(), String> {
    let initramfs = dir.join("initramfs.cpio");
    let kernel = catch_unwind(|| {
        let k = Kernel::find();
        Initramfs::for_guest_init(&k).write(&initramfs).map(|_| k)
    })
    .map_err(|_| "no guest kernel or initramfs (see above)".to_string())?
    .map_err(|e| format!("initramfs: {e}"))?;
    vm::open_to_others(dir);
    let control_dir = dir.join("control");
    fs::create_dir_all(&control_dir).map_err(|e| e.to_string())?;
    rustix::fs::chown(
        &control_dir,
        Some(rustix::fs::Uid::from_raw(vm::UNPRIVILEGED_UID)),
        None,
    )
    .map_err(|e| e.to_string())?;
    let control = control_dir.join("store.control");
    // Per update: when its command started, when the guest said it saw it; and the
    // daemon's footprint after the tenth and the last.
    let started: Arc<Mutex<BTreeMap<usize, Instant>>> = Arc::default();
    let seen: Arc<Mutex<BTreeMap<usize, Instant>>> = Arc::default();
    let footprints: Arc<Mutex<BTreeMap<usize, (f64, f64)>>> = Arc::default();
    let failures: Arc<Mutex<Vec<String>>> = Arc::default();
    let prog = vm::GuestProgram {
        base: base_name("nixstorefs-bench-update"),
    };
    let mut g = Guest::new(&kernel, &initramfs)
        .cmdline("loglevel=4")
        .cmdline("nixstore=virtiofs:nix-store")
        .cmdline(&prog.init_arg())
        .timeout(Duration::from_secs(900))
        .nixstorefs(
            "nix-store",
            &store.store_dir,
            &store.closures[0],
            &["--control-socket", control.to_str().ok_or("a UTF-8 path")?],
        );
    for i in 1..=UPDATES {
        let (started, failures, footprints) =
            (started.clone(), failures.clone(), footprints.clone());
        let (bin, control, closure) = (
            bin.to_path_buf(),
            control.clone(),
            store.closures[i].clone(),
        );
        g = g.on_console(&format!("UPDATE-{i:03}"), move || {
            // The footprint after the previous update, before this one starts.
            if i == WARM + 1 || i == UPDATES {
                match daemon_pid(&control).and_then(held) {
                    Ok(f) => {
                        footprints.lock().unwrap().insert(i - 1, f);
                    }
                    Err(e) => failures.lock().unwrap().push(e),
                }
            }
            started.lock().unwrap().insert(i, Instant::now());
            if let Err(e) = update(&bin, &control, &closure) {
                failures.lock().unwrap().push(e);
            }
        });
        let seen = seen.clone();
        g = g.on_console(&format!("SEEN-{i:03}"), move || {
            seen.lock().unwrap().insert(i, Instant::now());
        });
    }
    // The last footprint, once the last update is seen and looked into.
    eprintln!("bench: [update] booting a guest for {UPDATES} updates");
    let boot = catch_unwind(AssertUnwindSafe(|| g.boot()))
        .map_err(|_| "booting failed (see above)".to_string())?;
    if !boot.console.contains("GUEST-OK") {
        return Err(format!(
            "the update guest did not finish ({})",
            boot.status_text()
        ));
    }
    if let Some(e) = failures.lock().unwrap().first() {
        return Err(e.clone());
    }
    let (started, seen) = (started.lock().unwrap(), seen.lock().unwrap());
    let latencies: Vec<f64> = (1..=UPDATES)
        .map(|i| match (started.get(&i), seen.get(&i)) {
            (Some(a), Some(b)) => Ok(b.duration_since(*a).as_secs_f64() * 1000.0),
            _ => Err(format!("update {i} was not timed")),
        })
        .collect::<Result<_, _>>()?;
    add(
        r,
        UpdateStep::GuestSeen,
        "update command to the guest seeing the new path",
        "ms",
        latencies,
    );
    let footprints = footprints.lock().unwrap();
    let (first, last) = match (footprints.get(&WARM), footprints.get(&(UPDATES - 1))) {
        (Some(f), Some(l)) => (*f, *l),
        _ => return Err("the guest daemon's footprint was not sampled".into()),
    };
    footprint_rows(r, Daemon::Guest, (WARM, first), (UPDATES - 1, last));
    Ok(())
}

fn host_mount(store: &UpdateStore, dir: &Path, bin: &Path, r: &mut Results) -> Result<(), String> {
    let control = dir.join("store.control");
    let control_arg = control.to_str().ok_or("a UTF-8 path")?;
    let (mount, _) = FuseMount::nixstorefs(
        bin,
        &store.store_dir,
        &store.closures[0],
        &["--control-socket", control_arg],
    )?;
    let measured = (|| -> Result<(), String> {
        let pid = daemon_pid(&control)?;
        let mut times = Vec::new();
        let mut first = None;
        for i in 1..=UPDATES {
            // Every root entry looked up, as a walk of the store would.
            for entry in fs::read_dir(mount.path()).map_err(|e| e.to_string())? {
                let _ = fs::symlink_metadata(entry.map_err(|e| e.to_string())?.path());
            }
            let t = Instant::now();
            update(bin, &control, &store.closures[i])?;
            times.push(t.elapsed().as_secs_f64() * 1000.0);
            let new = mount.path().join(&store.systems[i]).join("bin/switch");
            if !new.exists() {
                return Err(format!("update {i}: {} is not there", new.display()));
            }
            if i == WARM {
                first = Some(held(pid)?);
            }
        }
        let last = held(pid)?;
        let first = first.ok_or("no first footprint")?;
        add(
            r,
            UpdateStep::HostDone,
            "update command on the host mount, until it returns",
            "ms",
            times,
        );
        footprint_rows(r, Daemon::Mount, (WARM, first), (UPDATES, last));
        Ok(())
    })();
    mount.unmount()?;
    measured
}
