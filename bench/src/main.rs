//! `bench`: measures nixstorefs against its baselines on a synthetic host store and writes
//! docs/benchmarks.md, docs/benchmarks.json and docs/benchmarks-latency.png.
//!
//! `cargo run --release -p nixstorefs-bench --bin bench -- --help` for the options. Needs
//! root, /dev/fuse and bindfs; the guest section also needs qemu, virtiofsd and a static
//! guest-init, the dax section qemu and a static guest-init.

mod dax;
mod guest;
mod ids;
mod image;
mod mounts;
mod report;
mod stats;
mod store;
mod update;
mod workload;

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Parser;
use nixstorefs_tests::harness;
use serde_json::json;

use ids::{FootprintPoint, Held, Id, Mounter, ReadPattern, ReadVia, Section, SmallVia, Walk};
use mounts::FuseMount;
use report::{Chapter, Header, Series};
use stats::{Better, Measurement, Results, Target};
use store::{Built, Params};

/// Benchmarks nixstorefs against a bind-mount farm, bindfs and the host filesystem.
#[derive(Parser, Debug, Clone)]
struct Args {
    /// Host store size, in top-level store paths [default: 140000; --quick: 2000].
    #[arg(long)]
    paths: Option<usize>,
    /// Closure size, in store paths [default: 2500; --quick: 200].
    #[arg(long)]
    closure: Option<usize>,
    /// Repetitions of every measurement.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    runs: u64,
    /// Small sizes for a fast smoke run.
    #[arg(long)]
    quick: bool,
    /// Where to write benchmarks.{md,json} and benchmarks-latency.png [default: docs/ of
    /// the workspace].
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Scratch directory for the synthetic stores; must be on a real disk.
    #[arg(long, value_name = "DIR", default_value = "/var/tmp/nixstorefs-bench")]
    dir: PathBuf,
    /// Rebuild the synthetic store even if one with the same sizes exists.
    #[arg(long)]
    fresh: bool,
    /// Leave out the sections that boot VM guests (guest, dax).
    #[arg(long)]
    skip_guest: bool,
    /// Only these sections (comma-separated); the report then holds only them.
    #[arg(long, value_delimiter = ',', value_enum)]
    sections: Option<Vec<Section>>,
    /// Number of large files [default: 2; --quick: 1].
    #[arg(long)]
    big_files: Option<usize>,
    /// Size of each large file in MiB [default: 256; --quick: 32].
    #[arg(long)]
    big_mib: Option<u64>,
    /// Files in the store path that makes the footprint closure large [default: 100000;
    /// --quick: 10000].
    #[arg(long)]
    many_files: Option<usize>,
    /// Random 4 KiB reads per run.
    #[arg(long, default_value_t = 20_000)]
    random_reads: usize,
    /// Closure paths the guest walks and reads (the first ones, which hold the large files
    /// and the wide directories): a walk under TCG costs about a millisecond an entry.
    #[arg(long, default_value_t = 250)]
    guest_closure: usize,
    /// In the image section, also time mkfs.erofs over the whole host store with nixpkgs'
    /// old exclusion regex (slow: it reads every top-level entry of the store).
    #[arg(long)]
    image_regex: bool,
    /// Use target/release/nixstorefs as it is instead of building it first.
    #[arg(long)]
    no_build: bool,
}

/// Everything a section needs.
struct Ctx {
    args: Args,
    runs: usize,
    params: Params,
    built: Built,
    bin: PathBuf,
    workspace: PathBuf,
}

/// Generous: a first release build of the workspace on two cores.
const BUILD_TIMEOUT: Duration = Duration::from_secs(1200);

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("bench/ is inside the workspace")
        .to_path_buf()
}

fn main() -> ExitCode {
    // First, so that a usage error (exit 2) leaves nothing behind.
    let args = Args::parse();
    mounts::redirect_tmpdir();
    mounts::install_signal_thread();
    let outcome = std::panic::catch_unwind(|| run(args));
    mounts::cleanup_all();
    match outcome {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) => {
            eprintln!("bench: {e}");
            ExitCode::FAILURE
        }
        Err(_) => {
            eprintln!("bench: panicked; every mount was cleaned up");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<(), String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("needs root (mount namespaces, FUSE passthrough, bindfs)".into());
    }
    if !Path::new("/dev/fuse").exists() {
        return Err("/dev/fuse is missing (modprobe fuse)".into());
    }
    let quick = args.quick;
    let params = Params {
        paths: args.paths.unwrap_or(if quick { 2_000 } else { 140_000 }),
        closure: args.closure.unwrap_or(if quick { 200 } else { 2_500 }),
        big_files: args.big_files.unwrap_or(if quick { 1 } else { 2 }),
        big_mib: args.big_mib.unwrap_or(if quick { 32 } else { 256 }),
        wide_entries: if quick { 300 } else { 2_000 },
        many_files: args
            .many_files
            .unwrap_or(if quick { 10_000 } else { 100_000 }),
    };
    if params.closure < params.big_files + 3 {
        return Err(format!(
            "--closure must be at least {}",
            params.big_files + 3
        ));
    }
    let workspace = workspace();
    let bin = daemon_binary(&workspace, args.no_build)?;
    fs::create_dir_all(&args.dir).map_err(|e| format!("{}: {e}", args.dir.display()))?;
    if fs_type(&args.dir) == "tmpfs" {
        eprintln!(
            "bench: warning: {} is on tmpfs; the store should be on a real disk (--dir)",
            args.dir.display()
        );
    }
    let built = store::prepare(&args.dir, &params, args.fresh)
        .map_err(|e| format!("building the store: {e}"))?;
    let ctx = Ctx {
        runs: args.runs as usize,
        args: args.clone(),
        params,
        built,
        bin,
        workspace,
    };
    let load_start = loadavg();
    let mut r = Results::default();
    let mut chapters = Vec::new();
    let mut failed = Vec::new();
    warm_host(&ctx)?;
    for section in wanted(ctx.args.sections.as_deref()) {
        chapters.push(Chapter {
            section,
            method: method(section, &ctx),
        });
        if matches!(section, Section::Guest | Section::Update | Section::Dax) && ctx.args.skip_guest
        {
            r.note(section, "Left out of this run (`--skip-guest`).");
            continue;
        }
        eprintln!("bench: === {} ===", section.title());
        if let Err(e) = run_section(section, &ctx, &mut r) {
            eprintln!("bench: [{section}] failed: {e}");
            r.note(section, format!("**This section failed:** {e}"));
            failed.push(section);
        }
    }
    write_outputs(&ctx, &chapters, &r, &load_start)?;
    verdict(&failed, &r)
}

/// The sections to run, in report order: those asked for, or all.
fn wanted(asked: Option<&[Section]>) -> Vec<Section> {
    // In report order, each once, whatever order they were given in.
    Section::all()
        .iter()
        .copied()
        .filter(|s| asked.is_none_or(|a| a.contains(s)))
        .collect()
}

/// Measures one section into `r`.
fn run_section(section: Section, ctx: &Ctx, r: &mut Results) -> Result<(), String> {
    match section {
        Section::Latency => latency(ctx, r),
        Section::Metadata => metadata(ctx, r),
        Section::Reads => reads(ctx, r),
        Section::Small => small_files(ctx, r),
        Section::Footprint => footprint(ctx, r),
        Section::Image => image_section(ctx, r),
        Section::Guest => {
            let n = guest_paths(ctx);
            guest::run(&ctx.built, n, &ctx.bin, ctx.runs, ctx.args.no_build, r)
        }
        Section::Update => {
            let scratch = ctx
                .built
                .host
                .store_dir
                .parent()
                .and_then(Path::parent)
                .ok_or("no scratch directory")?
                .to_path_buf();
            guest::guest_init(ctx.args.no_build)?;
            update::run(&ctx.built, &scratch, &ctx.bin, r)
        }
        Section::Dax => dax_section(ctx, r),
    }
}

/// The run's outcome once the report is written: a failed section, or a check whose
/// measurement was never taken, fails it, by name, so a report with a hole in it is never
/// taken for a complete one.
fn verdict(failed: &[Section], r: &Results) -> Result<(), String> {
    let mut faults: Vec<String> = failed
        .iter()
        .map(|s| format!("section {s} failed (see above)"))
        .collect();
    faults.extend(r.missing.iter().map(ToString::to_string));
    if faults.is_empty() {
        Ok(())
    } else {
        Err(faults.join("\n  "))
    }
}

/// Builds the daemon (release) so the numbers are for the current sources, then finds it
/// next to this binary.
fn daemon_binary(workspace: &Path, no_build: bool) -> Result<PathBuf, String> {
    release_binary(workspace, "nixstorefs-daemon", "nixstorefs", no_build)
}

/// Builds `bin` of `package` (release), then finds it next to this binary.
fn release_binary(
    workspace: &Path,
    package: &str,
    name: &str,
    no_build: bool,
) -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let bin = exe.with_file_name(name);
    if !no_build {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        eprintln!("bench: building {name} (release)");
        let mut st = Command::new(cargo);
        st.args(["build", "--release", "-p", package, "--bin", name])
            .current_dir(workspace)
            .stdin(Stdio::null());
        match mounts::status_within(&mut st, BUILD_TIMEOUT) {
            Ok(s) if s.success() => {}
            other => {
                if bin.is_file() {
                    eprintln!(
                        "bench: building {name} failed ({other:?}); using the existing binary"
                    );
                } else {
                    return Err(format!("cannot build {name}: {other:?}"));
                }
            }
        }
    }
    if !bin.is_file() {
        return Err(format!(
            "{} is missing: cargo build --release -p {package}",
            bin.display()
        ));
    }
    Ok(bin)
}

/// Puts the closure's metadata and data in the host caches: every comparison is against a
/// warm native store.
fn warm_host(ctx: &Ctx) -> Result<(), String> {
    let store = &ctx.built.host.store_dir;
    eprintln!("bench: warming the host caches");
    workload::walk(store, &ctx.built.footprint_paths).map_err(|e| format!("walk: {e}"))?;
    workload::read_sequential(store, &ctx.built.big_files).map_err(|e| format!("read: {e}"))?;
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Collects the samples of one measurement across interleaved runs.
struct Samples {
    m: Measurement,
}

impl Samples {
    fn new(id: Id, label: String, unit: &'static str, better: Better) -> Self {
        Samples {
            m: Measurement {
                id,
                label,
                unit,
                better,
                samples: Vec::new(),
                params: json!({}),
            },
        }
    }

    fn params(mut self, p: serde_json::Value) -> Self {
        self.m.params = p;
        self
    }
}

fn read_closure(file: &Path) -> Result<Vec<PathBuf>, String> {
    let text = fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))?;
    Ok(text
        .lines()
        .filter(|l| !l.is_empty())
        .map(PathBuf::from)
        .collect())
}

fn mount(ctx: &Ctx, closure: &Path, extra: &[&str]) -> Result<FuseMount, String> {
    FuseMount::nixstorefs(&ctx.bin, &ctx.built.host.store_dir, closure, extra).map(|(m, _)| m)
}

fn host_closure_file(ctx: &Ctx) -> &Path {
    &ctx.built
        .host
        .closures
        .last()
        .expect("the host store has a closure")
        .1
}

// ---------------------------------------------------------------------------------------

fn latency(ctx: &Ctx, r: &mut Results) -> Result<(), String> {
    let b = &ctx.built;
    let stores: Vec<&store::Store> = b.smaller.iter().chain([&b.host]).collect();
    struct Variant<'a> {
        store: &'a store::Store,
        file: &'a Path,
        sources: Vec<PathBuf>,
        nix: Samples,
        farm: Samples,
    }
    let mut vs = Vec::new();
    for s in &stores {
        for (k, file) in &s.closures {
            let sources = read_closure(file)?;
            let p = json!({"host_paths": s.paths, "closure_paths": k});
            vs.push(Variant {
                store: s,
                file,
                sources,
                nix: Samples::new(
                    Id::Latency {
                        by: Mounter::Nixstorefs,
                        host: s.paths,
                        closure: *k,
                    },
                    format!("nixstorefs, host {} paths, closure {k}", s.paths),
                    "ms",
                    Better::Lower,
                )
                .params(p.clone()),
                farm: Samples::new(
                    Id::Latency {
                        by: Mounter::BindFarm,
                        host: s.paths,
                        closure: *k,
                    },
                    format!("bind farm, host {} paths, closure {k}", s.paths),
                    "ms",
                    Better::Lower,
                )
                .params(p),
            });
        }
    }
    // The part of every mount that is only starting and ending a process: the same binary,
    // printing its version.
    let mut start = Samples::new(
        Id::ProcessStart,
        "nixstorefs --version (process start and exit only)".to_string(),
        "ms",
        Better::Lower,
    );
    // Mounts are cheap and this machine is noisy: six times the runs, for steadier medians.
    let runs = ctx.runs * 6;
    // Run 0 warms the host's dentries for each store and is not counted.
    let n = vs.len();
    for run in 0..=runs {
        let t = Instant::now();
        let status = Command::new(&ctx.bin)
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .map_err(|e| format!("{}: {e}", ctx.bin.display()))?;
        if !status.success() {
            return Err(format!("{} --version: {status}", ctx.bin.display()));
        }
        if run > 0 {
            start.m.samples.push(ms(t.elapsed()));
        }
        // Each run starts at another variant, so none always follows the same one (a big
        // farm's namespace is still being torn down when the next mount starts).
        for j in 0..n {
            let v = &mut vs[(run + j) % n];
            let (m, took) = FuseMount::nixstorefs(&ctx.bin, &v.store.store_dir, v.file, &[])?;
            m.unmount()?;
            let farm = mounts::bind_farm(&v.sources)?;
            if run > 0 {
                v.nix.m.samples.push(ms(took));
                v.farm.m.samples.push(ms(farm));
            }
        }
        if run % 5 == 0 {
            eprintln!("bench: [latency] run {run}/{runs} done");
        }
    }
    // What each further closure path costs, from the medians at the smallest and largest
    // closure of the big store: the fixed cost of starting a process is left out.
    let slope = |v: &[Variant], farm: bool| -> Option<f64> {
        let of = |x: &Variant| {
            let m = if farm { &x.farm.m } else { &x.nix.m };
            m.summary().median
        };
        let on_host: Vec<(usize, f64)> = v
            .iter()
            .filter(|x| std::ptr::eq(x.store, &b.host))
            .map(|x| (x.sources.len(), of(x)))
            .collect();
        let (&(k0, t0), &(k1, t1)) = (on_host.first()?, on_host.last()?);
        (k1 > k0).then(|| (t1 - t0) * 1000.0 / (k1 - k0) as f64)
    };
    if let (Some(nix), Some(farm)) = (slope(&vs, false), slope(&vs, true)) {
        r.note(
            Section::Latency,
            format!(
                "Each further closure path costs nixstorefs {} µs and the bind farm {} µs \
                 ({}× less), from the medians at the smallest and largest closure of the \
                 {}-path store; the rest of nixstorefs' time is fixed, most of it starting \
                 a process (see `nixstorefs --version`).",
                stats::fmt_num(nix),
                stats::fmt_num(farm),
                stats::fmt_num(farm / nix),
                b.host.paths
            ),
        );
    }
    r.add(start.m);
    for v in vs {
        r.add(v.nix.m);
        r.add(v.farm.m);
    }
    let host = &b.host;
    for (k, _) in &host.closures {
        // Flatness: against the smallest store holding the same closure.
        if let Some(small) = b
            .smaller
            .iter()
            .find(|s| s.closures.iter().any(|(c, _)| c == k))
        {
            let at = |by, store: &store::Store| Id::Latency {
                by,
                host: store.paths,
                closure: *k,
            };
            r.ratio(
                format!(
                    "flat: closure {k}, host {} paths vs {} paths",
                    host.paths, small.paths
                ),
                at(Mounter::Nixstorefs, host),
                at(Mounter::Nixstorefs, small),
                Some(Target::AtMost(1.1)),
            );
            // The same growth in the baseline is the host's own per-name lookup cost.
            r.ratio(
                format!(
                    "bind farm for reference: closure {k}, host {} paths vs {} paths",
                    host.paths, small.paths
                ),
                at(Mounter::BindFarm, host),
                at(Mounter::BindFarm, small),
                None,
            );
        }
    }
    let kk = ctx.params.closure;
    r.absolute(
        format!("closure {kk}, host {} paths", host.paths),
        Id::Latency {
            by: Mounter::Nixstorefs,
            host: host.paths,
            closure: kk,
        },
        Target::Below(20.0),
    );
    for s in &stores {
        for (k, _) in &s.closures {
            let by = |by| Id::Latency {
                by,
                host: s.paths,
                closure: *k,
            };
            r.ratio(
                format!(
                    "speed-up over the bind farm, host {} paths, closure {k}",
                    s.paths
                ),
                by(Mounter::BindFarm),
                by(Mounter::Nixstorefs),
                (*k == kk && s.paths == host.paths).then_some(Target::AtLeast(3.0)),
            );
        }
    }
    for s in &b.smaller {
        if s.closures.last().is_some_and(|(k, _)| *k < kk) {
            r.note(
                Section::Latency,
                format!(
                    "The {}-path store holds only {} closure paths, so its larger closure is \
                     capped at that.",
                    s.paths,
                    s.closures.last().unwrap().0
                ),
            );
        }
    }
    Ok(())
}

/// The mount's transport options, for rows that compare them.
const DEV_FUSE: &[&str] = &["--fuse-transport", "dev-fuse"];
const IO_URING: &[&str] = &["--fuse-transport", "io-uring"];

/// Why the io_uring rows are missing.
const URING_OFF: &str = "No io_uring rows: FUSE over io_uring is off on this host \
    (as root: echo Y > /sys/module/fuse/parameters/enable_uring).";

/// Whether mounts can be served over io_uring here.
fn uring_enabled() -> bool {
    std::fs::read_to_string("/sys/module/fuse/parameters/enable_uring")
        .is_ok_and(|v| v.trim() == "Y")
}

fn metadata(ctx: &Ctx, r: &mut Results) -> Result<(), String> {
    let store = &ctx.built.host.store_dir;
    let names = &ctx.built.closure;
    let closure = host_closure_file(ctx);
    let (expect, _) = workload::walk(store, names).map_err(|e| e.to_string())?;
    let mk = |walk: Walk, label: &str| {
        Samples::new(Id::Walk(walk), label.to_string(), "ms", Better::Lower)
            .params(json!({"entries": expect.entries}))
    };
    let mut native = mk(Walk::Native, "native store, warm");
    let mut cold = mk(Walk::Cold, "nixstorefs over /dev/fuse, fresh mount (cold)");
    let mut warm = mk(Walk::Warm, "nixstorefs over /dev/fuse, second pass (warm)");
    let mut one_cpu = mk(
        Walk::ColdOneCpu,
        "nixstorefs over /dev/fuse, fresh mount (cold), walker and daemon on CPU 0",
    );
    let uring = uring_enabled();
    let mut cold_uring = mk(
        Walk::ColdUring,
        "nixstorefs over io_uring, fresh mount (cold)",
    );
    let mut one_cpu_uring = mk(
        Walk::ColdOneCpuUring,
        "nixstorefs over io_uring, fresh mount (cold), walker and daemon on CPU 0",
    );
    // Both transports side by side, each run: a cold walk unpinned, then pinned.
    let mut transports = vec![(DEV_FUSE, &mut cold, &mut one_cpu)];
    if uring {
        transports.push((IO_URING, &mut cold_uring, &mut one_cpu_uring));
    }
    for run in 1..=ctx.runs {
        let (t, d) = workload::walk(store, names).map_err(|e| e.to_string())?;
        native.m.samples.push(ms(d));
        for (i, (transport, cold, one_cpu)) in transports.iter_mut().enumerate() {
            let m = mount(ctx, closure, transport)?;
            let (t1, d1) = workload::walk(m.path(), names).map_err(|e| e.to_string())?;
            let (t2, d2) = workload::walk(m.path(), names).map_err(|e| e.to_string())?;
            m.unmount()?;
            // The same cold walk with no request crossing CPUs: the daemon inherits the
            // affinity of the thread that starts it.
            let (t3, d3) = on_cpu0(|| {
                let m = mount(ctx, closure, transport)?;
                let walked = workload::walk(m.path(), names).map_err(|e| e.to_string());
                m.unmount()?;
                walked
            })?;
            if t != expect || t1 != expect || t2 != expect || t3 != expect {
                return Err(format!(
                    "walks disagree: native {expect:?}, mounted {t1:?} / {t2:?} / {t3:?}"
                ));
            }
            cold.m.samples.push(ms(d1));
            if i == 0 {
                warm.m.samples.push(ms(d2));
            }
            one_cpu.m.samples.push(ms(d3));
        }
        eprintln!("bench: [metadata] run {run}/{} done", ctx.runs);
    }
    drop(transports);
    for s in [native, cold, warm, one_cpu] {
        r.add(s.m);
    }
    if uring {
        r.add(cold_uring.m);
        r.add(one_cpu_uring.m);
        r.ratio(
            "cold walk over io_uring vs native",
            Id::Walk(Walk::ColdUring),
            Id::Walk(Walk::Native),
            Some(Target::AtMost(4.0)),
        );
        r.ratio(
            "cold walk over io_uring on one CPU vs native",
            Id::Walk(Walk::ColdOneCpuUring),
            Id::Walk(Walk::Native),
            None,
        );
    } else {
        r.note(Section::Metadata, URING_OFF.to_string());
    }
    r.ratio(
        "warm walk vs native",
        Id::Walk(Walk::Warm),
        Id::Walk(Walk::Native),
        Some(Target::AtMost(1.2)),
    );
    r.ratio(
        "cold walk vs native",
        Id::Walk(Walk::Cold),
        Id::Walk(Walk::Native),
        Some(Target::AtMost(3.0)),
    );
    r.ratio(
        "cold walk on one CPU vs native",
        Id::Walk(Walk::ColdOneCpu),
        Id::Walk(Walk::Native),
        None,
    );
    r.note(
        Section::Metadata,
        format!(
            "Each walk visits {} entries ({} directories, {} regular files, the rest symlinks) \
             of the {} closure paths.",
            expect.entries,
            expect.dirs,
            expect.files,
            names.len()
        ),
    );
    Ok(())
}

/// Runs `f` on a thread pinned to CPU 0; processes it starts inherit that affinity.
fn on_cpu0<T: Send>(f: impl FnOnce() -> Result<T, String> + Send) -> Result<T, String> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                // SAFETY: a zeroed cpu_set_t is a valid empty set, then CPU 0 is added.
                let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
                // SAFETY: CPU 0 is within the set's capacity.
                unsafe { libc::CPU_SET(0, &mut set) };
                let size = std::mem::size_of::<libc::cpu_set_t>();
                // SAFETY: `set` is a valid cpu_set_t of `size` bytes; 0 is this thread.
                if unsafe { libc::sched_setaffinity(0, size, &set) } != 0 {
                    return Err(format!("sched_setaffinity: {}", io::Error::last_os_error()));
                }
                f()
            })
            .join()
            .map_err(|_| "the pinned thread panicked".to_string())?
    })
}

fn reads(ctx: &Ctx, r: &mut Results) -> Result<(), String> {
    let store = &ctx.built.host.store_dir;
    let closure = host_closure_file(ctx);
    let rels = &ctx.built.big_files;
    let sizes: Vec<u64> = rels
        .iter()
        .map(|p| fs::metadata(store.join(p)).map(|m| m.len()))
        .collect::<io::Result<_>>()
        .map_err(|e| e.to_string())?;
    let total: u64 = sizes.iter().sum();
    let offsets =
        workload::random_offsets(&sizes, ctx.args.random_reads, "nixstorefs-bench-random");
    let label = |via| match via {
        ReadVia::Native => "native",
        ReadVia::Passthrough => "nixstorefs (passthrough)",
        ReadVia::NoPassthrough => "nixstorefs --no-passthrough",
        ReadVia::Bindfs => "bindfs -r",
    };
    let mut seq: Vec<Samples> = ReadVia::ALL
        .iter()
        .map(|&via| {
            Samples::new(
                Id::Read(ReadPattern::Sequential, via),
                format!("sequential, {}", label(via)),
                "MiB/s",
                Better::Higher,
            )
            .params(json!({"bytes": total, "chunk": 1 << 20}))
        })
        .collect();
    let mut rnd: Vec<Samples> = ReadVia::ALL
        .iter()
        .map(|&via| {
            Samples::new(
                Id::Read(ReadPattern::Random, via),
                format!("random 4 KiB, {}", label(via)),
                "k reads/s",
                Better::Higher,
            )
            .params(json!({"reads": offsets.len()}))
        })
        .collect();
    let mut engaged = Vec::new();
    for run in 1..=ctx.runs {
        for (i, &id) in ReadVia::ALL.iter().enumerate() {
            // A fresh mount for each pass, so no pass finds the FUSE page cache warm.
            let fresh = |what: &str| -> Result<Option<FuseMount>, String> {
                match id {
                    ReadVia::Native => Ok(None),
                    ReadVia::Passthrough => mount(ctx, closure, &[]).map(Some),
                    ReadVia::NoPassthrough => mount(ctx, closure, &["--no-passthrough"]).map(Some),
                    ReadVia::Bindfs => FuseMount::bindfs(store).map(Some),
                }
                .map_err(|e| format!("{what}: {e}"))
            };
            let m = fresh("sequential")?;
            let root = m.as_ref().map_or(store.as_path(), |m| m.path());
            let before = harness::rchar(m.as_ref().and_then(FuseMount::pid));
            let (n, d) = workload::read_sequential(root, rels).map_err(|e| format!("{id}: {e}"))?;
            if n != total {
                return Err(format!("{id}: read {n} bytes of {total}"));
            }
            if id == ReadVia::Passthrough {
                let after = harness::rchar(m.as_ref().and_then(FuseMount::pid));
                if let (Some(a), Some(b)) = (before, after) {
                    engaged.push(a.saturating_sub(b) < total / 4);
                }
            }
            if let Some(m) = m {
                m.unmount()?;
            }
            seq[i]
                .m
                .samples
                .push(n as f64 / (1 << 20) as f64 / d.as_secs_f64());
            let m = fresh("random")?;
            let root = m.as_ref().map_or(store.as_path(), |m| m.path());
            let d =
                workload::read_random(root, rels, &offsets).map_err(|e| format!("{id}: {e}"))?;
            if let Some(m) = m {
                m.unmount()?;
            }
            rnd[i]
                .m
                .samples
                .push(offsets.len() as f64 / 1e3 / d.as_secs_f64());
        }
        eprintln!("bench: [reads] run {run}/{} done", ctx.runs);
    }
    for s in seq.into_iter().chain(rnd) {
        r.add(s.m);
    }
    r.ratio(
        "sequential, passthrough vs native",
        Id::Read(ReadPattern::Sequential, ReadVia::Passthrough),
        Id::Read(ReadPattern::Sequential, ReadVia::Native),
        Some(Target::AtLeast(0.9)),
    );
    r.ratio(
        "sequential, no passthrough vs bindfs",
        Id::Read(ReadPattern::Sequential, ReadVia::NoPassthrough),
        Id::Read(ReadPattern::Sequential, ReadVia::Bindfs),
        Some(Target::AtLeast(2.0)),
    );
    r.ratio(
        "sequential, no passthrough vs native",
        Id::Read(ReadPattern::Sequential, ReadVia::NoPassthrough),
        Id::Read(ReadPattern::Sequential, ReadVia::Native),
        None,
    );
    r.ratio(
        "random 4 KiB, passthrough vs native",
        Id::Read(ReadPattern::Random, ReadVia::Passthrough),
        Id::Read(ReadPattern::Random, ReadVia::Native),
        Some(Target::AtLeast(0.8)),
    );
    r.ratio(
        "random 4 KiB, no passthrough vs native",
        Id::Read(ReadPattern::Random, ReadVia::NoPassthrough),
        Id::Read(ReadPattern::Random, ReadVia::Native),
        None,
    );
    r.ratio(
        "random 4 KiB, no passthrough vs bindfs",
        Id::Read(ReadPattern::Random, ReadVia::NoPassthrough),
        Id::Read(ReadPattern::Random, ReadVia::Bindfs),
        None,
    );
    let on = engaged.iter().filter(|e| **e).count();
    r.note(
        Section::Reads,
        format!(
            "Passthrough engaged in {on} of {} runs (the daemon's own read count, rchar, grew \
             by less than a quarter of the bytes read).",
            engaged.len()
        ),
    );
    Ok(())
}

fn small_files(ctx: &Ctx, r: &mut Results) -> Result<(), String> {
    let store = &ctx.built.host.store_dir;
    let closure = host_closure_file(ctx);
    let files = workload::files(store, &ctx.built.closure).map_err(|e| e.to_string())?;
    let rels: Vec<PathBuf> = files
        .iter()
        .filter(|(_, len)| *len < 64 << 10)
        .map(|(p, _)| p.clone())
        .collect();
    let bytes: u64 = files
        .iter()
        .filter(|(_, l)| *l < 64 << 10)
        .map(|(_, l)| l)
        .sum();
    workload::read_small(store, &rels).map_err(|e| e.to_string())?;
    let uring = uring_enabled();
    let mut variants = vec![
        (SmallVia::Native, "native store, warm", None, false),
        (
            SmallVia::Passthrough,
            "nixstorefs (passthrough) over /dev/fuse, fresh mount",
            Some(DEV_FUSE),
            false,
        ),
        (
            SmallVia::NoPassthrough,
            "nixstorefs --no-passthrough over /dev/fuse, fresh mount",
            Some(&["--no-passthrough", "--fuse-transport", "dev-fuse"][..]),
            false,
        ),
        (
            SmallVia::PassthroughOneCpu,
            "nixstorefs (passthrough) over /dev/fuse, fresh mount, reader and daemon on CPU 0",
            Some(DEV_FUSE),
            true,
        ),
    ];
    if uring {
        variants.push((
            SmallVia::PassthroughUring,
            "nixstorefs (passthrough) over io_uring, fresh mount",
            Some(IO_URING),
            false,
        ));
        variants.push((
            SmallVia::PassthroughUringOneCpu,
            "nixstorefs (passthrough) over io_uring, fresh mount, reader and daemon on CPU 0",
            Some(IO_URING),
            true,
        ));
    }
    let mut ss: Vec<Samples> = variants
        .iter()
        .map(|&(via, l, _, _)| {
            Samples::new(Id::Small(via), l.to_string(), "ms", Better::Lower)
                .params(json!({"files": rels.len(), "bytes": bytes}))
        })
        .collect();
    for run in 1..=ctx.runs {
        for (i, &(_, _, extra, pinned)) in variants.iter().enumerate() {
            let once = || -> Result<Duration, String> {
                let m = match extra {
                    None => None,
                    Some(x) => Some(mount(ctx, closure, x)?),
                };
                let root = m.as_ref().map_or(store.as_path(), |m| m.path());
                let (n, d) = workload::read_small(root, &rels).map_err(|e| e.to_string())?;
                if n != bytes {
                    return Err(format!("read {n} bytes of {bytes}"));
                }
                if let Some(m) = m {
                    m.unmount()?;
                }
                Ok(d)
            };
            let d = if pinned { on_cpu0(once)? } else { once()? };
            ss[i].m.samples.push(ms(d));
        }
        eprintln!("bench: [small] run {run}/{} done", ctx.runs);
    }
    for s in ss {
        r.add(s.m);
    }
    r.ratio(
        "passthrough vs native",
        Id::Small(SmallVia::Passthrough),
        Id::Small(SmallVia::Native),
        None,
    );
    r.ratio(
        "no passthrough vs native",
        Id::Small(SmallVia::NoPassthrough),
        Id::Small(SmallVia::Native),
        None,
    );
    r.ratio(
        "passthrough on one CPU vs native",
        Id::Small(SmallVia::PassthroughOneCpu),
        Id::Small(SmallVia::Native),
        None,
    );
    if uring {
        r.ratio(
            "passthrough over io_uring vs native",
            Id::Small(SmallVia::PassthroughUring),
            Id::Small(SmallVia::Native),
            Some(Target::AtMost(6.0)),
        );
        r.ratio(
            "passthrough over io_uring on one CPU vs native",
            Id::Small(SmallVia::PassthroughUringOneCpu),
            Id::Small(SmallVia::Native),
            None,
        );
    } else {
        r.note(Section::Small, URING_OFF.to_string());
    }
    r.note(
        Section::Small,
        format!(
            "{} files under 64 KiB, {:.1} MiB in all; each is opened, read whole and closed.",
            rels.len(),
            bytes as f64 / (1 << 20) as f64
        ),
    );
    Ok(())
}

fn image_section(ctx: &Ctx, r: &mut Results) -> Result<(), String> {
    let mkimage = release_binary(&ctx.workspace, "mkimage", "mkimage", ctx.args.no_build)?;
    image::run(
        &image::Inputs {
            built: &ctx.built,
            closure_file: host_closure_file(ctx),
            daemon: &ctx.bin,
            mkimage: &mkimage,
            scratch: &ctx.args.dir,
            runs: ctx.runs,
            regex: ctx.args.image_regex,
        },
        r,
    )
}

fn dax_section(ctx: &Ctx, r: &mut Results) -> Result<(), String> {
    let mkimage = release_binary(&ctx.workspace, "mkimage", "mkimage", ctx.args.no_build)?;
    dax::run(
        &dax::Inputs {
            built: &ctx.built,
            paths: guest_paths(ctx),
            mkimage: &mkimage,
            no_build: ctx.args.no_build,
        },
        r,
    )
}

/// How many closure paths the guests of the guest and dax sections read.
fn guest_paths(ctx: &Ctx) -> usize {
    ctx.args.guest_closure.min(ctx.params.closure)
}

fn footprint(ctx: &Ctx, r: &mut Results) -> Result<(), String> {
    let store = &ctx.built.host.store_dir;
    let b = &ctx.built;
    let many = b
        .footprint_paths
        .last()
        .expect("the footprint closure has its big path");
    let many_files: Vec<PathBuf> = workload::files(store, std::slice::from_ref(many))
        .map_err(|e| e.to_string())?
        .into_iter()
        .map(|(p, _)| p)
        .collect();
    let (fp_totals, _) = workload::walk(store, &b.footprint_paths).map_err(|e| e.to_string())?;
    let points = [
        (
            FootprintPoint::Walk,
            format!("after a walk of the {}-path closure", b.closure.len()),
        ),
        (
            FootprintPoint::BigWalk,
            format!(
                "after a walk of {} entries ({} files)",
                fp_totals.entries, fp_totals.files
            ),
        ),
        (
            FootprintPoint::BigRead,
            format!("after that and reading {} files", many_files.len()),
        ),
    ];
    let mut rss: Vec<Samples> = points
        .iter()
        .map(|&(point, ref l)| {
            Samples::new(
                Id::Footprint(Held::Rss, point),
                format!("RSS {l}"),
                "MiB",
                Better::Lower,
            )
        })
        .collect();
    let mut fds: Vec<Samples> = points
        .iter()
        .map(|&(point, ref l)| {
            Samples::new(
                Id::Footprint(Held::Fds, point),
                format!("descriptors {l}"),
                "fds",
                Better::Lower,
            )
        })
        .collect();
    let sample = |m: &FuseMount,
                  i: usize,
                  rss: &mut Vec<Samples>,
                  fds: &mut Vec<Samples>|
     -> Result<(), String> {
        let pid = m.pid().ok_or("no daemon pid")?;
        let (kib, n) = workload::footprint(pid).map_err(|e| e.to_string())?;
        rss[i].m.samples.push(kib as f64 / 1024.0);
        fds[i].m.samples.push(n as f64);
        Ok(())
    };
    for run in 1..=ctx.runs {
        let m = mount(ctx, host_closure_file(ctx), &[])?;
        workload::walk(m.path(), &b.closure).map_err(|e| e.to_string())?;
        sample(&m, 0, &mut rss, &mut fds)?;
        m.unmount()?;
        let m = mount(ctx, &b.footprint_closure, &[])?;
        workload::walk(m.path(), &b.footprint_paths).map_err(|e| e.to_string())?;
        sample(&m, 1, &mut rss, &mut fds)?;
        workload::read_small(m.path(), &many_files).map_err(|e| e.to_string())?;
        sample(&m, 2, &mut rss, &mut fds)?;
        m.unmount()?;
        eprintln!("bench: [footprint] run {run}/{} done", ctx.runs);
    }
    for s in rss.into_iter().chain(fds) {
        r.add(s.m);
    }
    for point in [FootprintPoint::BigWalk, FootprintPoint::BigRead] {
        r.absolute(
            format!("RSS, {point}"),
            Id::Footprint(Held::Rss, point),
            Target::Below(64.0),
        );
        r.absolute(
            format!("descriptors, {point}"),
            Id::Footprint(Held::Fds, point),
            Target::Below(1024.0),
        );
    }
    if fp_totals.files < 100_000 {
        r.note(
            Section::Footprint,
            format!(
                "This run's large closure has {} files, fewer than the 100,000 the targets are \
                 about (`--many-files`).",
                fp_totals.files
            ),
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------

/// What `section` measures and how, for its chapter of the report.
fn method(section: Section, ctx: &Ctx) -> String {
    let p = &ctx.params;
    match section {
        Section::Latency => format!(
            "Time from starting `nixstorefs --store-dir STORE CLOSURE MNT` (daemon mode) until \
             it exits 0 with the mount live, then unmounted; against a bind-mount farm of the \
             same closure: a forked child unshares its mount namespace, makes `/` private, \
             mounts a tmpfs and makes a directory and a plain `MS_BIND` mount per store path \
             (not remounted read-only, which would cost one more mount call each), timing \
             itself with CLOCK_MONOTONIC; its namespace dies with it. Host stores of {} \
             paths; closures of 100 and {} paths (capped by the store's size). Targets: \
             latency flat in the host-store size (≤ 1.1×), under 20 ms for {} paths, and at \
             least 3× faster than the bind farm.",
            ctx.built
                .smaller
                .iter()
                .map(|s| s.paths.to_string())
                .chain([p.paths.to_string()])
                .collect::<Vec<_>>()
                .join(", "),
            p.closure,
            p.closure
        ),
        Section::Metadata => {
            "A depth-first walk of every closure path with getdents and an lstat of \
             every entry (what `find` does), single-threaded. Native: the same walk of the \
             host store paths, warm. Cold: the first walk of a fresh mount (host caches warm); \
             warm: a second walk of the same mount. The cold walk is also run with the walker \
             and the daemon pinned to CPU 0, so that no request or reply wakes the other CPU: \
             the difference is the cost of cross-CPU wake-ups. Targets: warm ≤ 1.2× native, \
             cold ≤ 3× native."
                .to_string()
        }
        Section::Reads => format!(
            "The {} large file(s) of {} MiB of pseudo-random data: read whole in 1 MiB chunks \
             (sequential), and {} preads of 4 KiB at seeded random aligned offsets, the same \
             for every variant (random). Each pass of a FUSE variant runs on a fresh mount so \
             the FUSE page cache is cold; the host page cache is warm for all. bindfs is \
             `bindfs -r --no-allow-other` of the whole store directory in its default \
             single-threaded mode. Targets: sequential with passthrough ≥ 0.9× native, \
             without passthrough ≥ 2× bindfs; random with passthrough ≥ 0.8× native.",
            p.big_files, p.big_mib, ctx.args.random_reads
        ),
        Section::Small => {
            "Every regular file under 64 KiB in the closure is opened, read whole and \
             closed, on a fresh mount, against the same on the warm native store. No target: \
             the ratio shows the per-file cost of going through FUSE."
                .to_string()
        }
        Section::Footprint => format!(
            "Resident memory (VmRSS) and open descriptors of the daemon, from /proc: after a \
             walk of the closure, and on a fresh mount of the closure plus one store path of \
             {} small files, after a walk of it and after reading each of those files. \
             Targets: under 64 MiB and 1,024 descriptors.",
            p.many_files
        ),
        Section::Image => format!(
            "{} The closure: {} store paths of the {}-path host store.",
            image::METHOD,
            p.closure,
            p.paths
        ),
        Section::Update => update::METHOD.to_string(),
        Section::Guest => format!(
            "{} The guest's closure is the first {} of the {} closure paths (with the large \
             files and the wide directories).",
            guest::METHOD,
            guest_paths(ctx),
            p.closure
        ),
        Section::Dax => format!(
            "{} The guests' closure is the guest section's: the first {} of the {} closure \
             paths (with the large files and the wide directories).",
            dax::METHOD,
            guest_paths(ctx),
            p.closure
        ),
    }
}

/// The daemon's digest and build time, since other work may rebuild it between runs.
fn binary_id(bin: &Path) -> String {
    use sha2::{Digest, Sha256};
    let digest = fs::read(bin)
        .map(|b| nixstorefs_tests::sample::hex(&Sha256::digest(&b))[..16].to_string())
        .unwrap_or_default();
    let built = fs::metadata(bin)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| utc(d.as_secs()))
        .unwrap_or_default();
    format!("sha256 {digest}…, built {built}")
}

/// The type of the filesystem holding `dir` (the innermost mount above it).
fn fs_type(dir: &Path) -> String {
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    harness::mounts()
        .into_iter()
        .filter(|m| dir.starts_with(&m.mountpoint))
        .max_by_key(|m| m.mountpoint.as_os_str().len())
        .map(|m| m.fstype)
        .unwrap_or_default()
}

fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// `YYYY-MM-DD HH:MM UTC` for a Unix time (Howard Hinnant's days-to-civil).
fn utc(secs: u64) -> String {
    let days = (secs / 86400) as i64;
    let rem = secs % 86400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60
    )
}

fn shell_quote(a: &str) -> String {
    if !a.is_empty()
        && a.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=,:".contains(c))
    {
        a.to_string()
    } else {
        format!("'{}'", a.replace('\'', r"'\''"))
    }
}

fn git(ws: &Path, args: &[&str]) -> String {
    let mut cmd = Command::new("git");
    cmd.args(args).current_dir(ws).stdin(Stdio::null());
    harness::run_bounded(&mut cmd, Duration::from_secs(20))
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn write_outputs(
    ctx: &Ctx,
    chapters: &[Chapter],
    r: &Results,
    load_start: &str,
) -> Result<(), String> {
    let out = ctx
        .args
        .out
        .clone()
        .unwrap_or_else(|| ctx.workspace.join("docs"));
    worth_writing(r, &out)?;
    fs::create_dir_all(&out).map_err(|e| format!("{}: {e}", out.display()))?;
    let args: Vec<String> = std::env::args().skip(1).map(|a| shell_quote(&a)).collect();
    let mut command = "cargo run --release -p nixstorefs-bench --bin bench".to_string();
    if !args.is_empty() {
        command.push_str(" -- ");
        command.push_str(&args.join(" "));
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
            })
        })
        .unwrap_or_default();
    let mem = fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                let kib: f64 = l
                    .strip_prefix("MemTotal:")?
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse()
                    .ok()?;
                Some(format!("{:.1} GiB", kib / f64::from(1 << 20)))
            })
        })
        .unwrap_or_default();
    let dirty = !git(&ctx.workspace, &["status", "--porcelain", "--", "fs"]).is_empty();
    let commit = format!(
        "{}{}",
        git(&ctx.workspace, &["rev-parse", "--short", "HEAD"]),
        if dirty {
            " (fs/ has uncommitted changes)"
        } else {
            ""
        }
    );
    let machine = vec![
        (
            "kernel".into(),
            fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_string(),
        ),
        (
            "CPU".into(),
            format!(
                "{cpu}, {} cores",
                std::thread::available_parallelism().map_or(0, |n| n.get())
            ),
        ),
        ("memory".into(), mem),
        ("nixstorefs binary".into(), binary_id(&ctx.bin)),
        (
            "load average (1, 5, 15 min) at start / end".into(),
            format!("{load_start} / {}", loadavg()),
        ),
        ("commit".into(), commit),
        (
            "scratch store".into(),
            format!("{} ({})", ctx.args.dir.display(), fs_type(&ctx.args.dir)),
        ),
    ];
    let p = &ctx.params;
    let config = vec![
        ("host store paths".into(), p.paths.to_string()),
        ("closure paths".into(), p.closure.to_string()),
        (
            "large files".into(),
            format!("{} × {} MiB", p.big_files, p.big_mib),
        ),
        (
            "wide directories".into(),
            format!("2 × {} entries", p.wide_entries),
        ),
        (
            "footprint closure".into(),
            format!("closure + 1 path of {} files", p.many_files),
        ),
        ("runs".into(), ctx.runs.to_string()),
    ];
    let h = Header {
        command,
        date: utc(now),
        machine,
        config,
        runs: ctx.runs,
    };
    let png = out.join("benchmarks-latency.png");
    let plot = match latency_series(ctx, r) {
        Some(series) => match report::latency_png(
            &png,
            &series,
            &format!(
                "Mount-ready latency (median, min–max), closure {} and 100",
                p.closure
            ),
        ) {
            Ok(()) => Some("benchmarks-latency.png"),
            Err(e) => {
                eprintln!("bench: cannot draw {}: {e}", png.display());
                None
            }
        },
        None => None,
    };
    let md = report::markdown(&h, chapters, r, plot);
    let js = report::json(&h, r);
    let write = |name: &str, data: &[u8]| -> Result<(), String> {
        let p = out.join(name);
        fs::write(&p, data).map_err(|e| format!("{}: {e}", p.display()))?;
        eprintln!("bench: wrote {}", p.display());
        Ok(())
    };
    write("benchmarks.md", md.as_bytes())?;
    write(
        "benchmarks.json",
        serde_json::to_string_pretty(&js).unwrap().as_bytes(),
    )?;
    Ok(())
}

/// A report that measured nothing replaces one that did with an empty one: refused, so that
/// the last real report stays where it is.
fn worth_writing(r: &Results, out: &Path) -> Result<(), String> {
    if r.measurements.is_empty() {
        return Err(format!(
            "nothing was measured; the report in {} is left as it was",
            out.display()
        ));
    }
    Ok(())
}

fn latency_series(ctx: &Ctx, r: &Results) -> Option<Vec<Series>> {
    use plotters::style::RGBColor;
    let b = &ctx.built;
    let stores: Vec<&store::Store> = b.smaller.iter().chain([&b.host]).collect();
    let kk = ctx.params.closure;
    let mut out = Vec::new();
    for (variant, name, colors) in [
        (
            Mounter::Nixstorefs,
            "nixstorefs",
            [RGBColor(0, 90, 200), RGBColor(90, 170, 255)],
        ),
        (
            Mounter::BindFarm,
            "bind farm",
            [RGBColor(200, 40, 30), RGBColor(255, 140, 110)],
        ),
    ] {
        for (j, closure) in [kk, 100].into_iter().enumerate() {
            let points: Vec<(f64, Vec<f64>)> = stores
                .iter()
                .filter_map(|s| {
                    // A small store's capped closure is a different closure: left out.
                    let m = r.get(Id::Latency {
                        by: variant,
                        host: s.paths,
                        closure,
                    })?;
                    Some((s.paths as f64, m.samples.clone()))
                })
                .collect();
            if !points.is_empty() {
                out.push(Series {
                    label: format!("{name}, closure {closure}"),
                    points,
                    color: colors[j],
                    dashed: j == 1,
                });
            }
        }
    }
    (!out.is_empty()).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::error::ErrorKind;

    #[test]
    fn an_unknown_section_is_a_usage_error_naming_the_valid_ones() {
        let e = Args::try_parse_from(["bench", "--sections", "latency,read"]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidValue);
        assert_eq!(e.exit_code(), 2);
        let text = e.to_string();
        assert!(text.contains("'read'"), "{text}");
        for s in Section::all() {
            assert!(text.contains(s.key()), "{s} not offered: {text}");
        }
    }

    #[test]
    fn sections_run_in_report_order_each_once() {
        let args = Args::try_parse_from(["bench", "--sections", "guest,latency,guest"]).unwrap();
        assert_eq!(
            wanted(args.sections.as_deref()),
            [Section::Latency, Section::Guest]
        );
        let args = Args::try_parse_from(["bench"]).unwrap();
        assert_eq!(wanted(args.sections.as_deref()), Section::all());
    }

    #[test]
    fn a_run_that_measured_nothing_leaves_the_report_alone() {
        let dir = Path::new("/nonexistent/report");
        let e = worth_writing(&Results::default(), dir).unwrap_err();
        assert!(e.contains("nothing was measured"), "{e}");
        let mut r = Results::default();
        r.add(Measurement {
            id: Id::ProcessStart,
            label: "start".into(),
            unit: "ms",
            better: Better::Lower,
            samples: vec![1.0],
            params: json!({}),
        });
        assert_eq!(worth_writing(&r, dir), Ok(()));
    }

    #[test]
    fn a_target_without_its_measurement_fails_the_run_by_name() {
        let mut r = Results::default();
        r.add(Measurement {
            id: Id::Walk(Walk::Native),
            label: "native".into(),
            unit: "ms",
            better: Better::Lower,
            samples: vec![1.0, 2.0],
            params: json!({}),
        });
        assert_eq!(verdict(&[], &r), Ok(()));
        r.ratio(
            "warm walk vs native",
            Id::Walk(Walk::Warm),
            Id::Walk(Walk::Native),
            Some(Target::AtMost(1.2)),
        );
        let e = verdict(&[], &r).unwrap_err();
        assert!(e.contains("warm walk vs native"), "{e}");
        assert!(e.contains("metadata/warm"), "{e}");
        // The report says so too, in the section's notes.
        assert!(r
            .notes
            .iter()
            .any(|(s, n)| *s == Section::Metadata && n.contains("metadata/warm")));
        assert!(r.checks.is_empty());
    }

    #[test]
    fn a_failed_section_fails_the_run() {
        let e = verdict(&[Section::Image], &Results::default()).unwrap_err();
        assert!(e.contains("section image failed"), "{e}");
    }
}
