//! Many guests, one store: three guests at once read every file of the guest section's
//! closure from an erofs image, once over virtio-blk (each guest caches what it reads in its
//! own RAM, which is host memory of that qemu's own) and once over virtio-pmem with DAX
//! (each guest maps the host's page cache of the image, one copy for all). What each guest
//! costs the host is read from its qemu's /proc status before and after the reads.
//!
//! The VMs are `nixstorefs_tests::vm`'s, the store and the guest program the guest
//! section's; this adds the images, the script and the figures.

use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nixstorefs_tests::vm::{self, Boot, Guest, GuestProgram, Kernel};
use serde_json::json;

use crate::guest::{boot_to_end, guest_init, guest_store, kernel_and_initramfs, tail};
use crate::ids::{DaxFigure, DaxVia, Id, Section};
use crate::mounts::status_within;
use crate::stats::{Better, Measurement, Results, Target};
use crate::store::Built;

pub const METHOD: &str = "Three VMs at once (qemu TCG, 1 vCPU, 512 MiB each, the host's \
     Debian kernel, guest-init mounting `/nix/store`) each read every file of the guest \
     section's closure once, cold in the guest (`sync; echo 3 > /proc/sys/vm/drop_caches`, \
     then `find /nix/store -type f | xargs cat > /dev/null`, timed in the guest with \
     /proc/uptime). The three boot together over virtio-blk (a `mkimage` image on a \
     read-only virtio-blk drive, `nixstore=erofs:/dev/vda`, the same image file for all \
     three), and when all three are gone, together over virtio-pmem with DAX (a \
     `mkimage --dax` image as the README's recipe maps it: `memory-backend-file` with \
     `share=on,readonly=on,align=2M`, `nixstore=pmem`, which mounts it with `dax=always`; \
     the section fails unless guest-init reports DAX on in every guest). Both images are \
     read whole on the host first, so the host's page cache is warm for both. Per guest: \
     the read time; the guest's `Cached:` from /proc/meminfo after the reads, and its \
     growth across them; its qemu's private resident memory (RssAnon in \
     /proc/PID/status on the host: guest RAM the guest has touched, which no other process \
     shares) after the reads, its growth across them, and qemu's resident file pages \
     (RssFile: for virtio-pmem, the image's pages the guest mapped, which are the host's \
     page cache of the image, one copy shared by all three qemus). qemu is sampled when \
     the guest prints a marker right before and right after the reads, the guest waiting \
     a second after each. Medians over the three guests. **The memory for the store** is \
     the growth of qemu's RssAnon across the reads: host memory that one guest's reading \
     of its store takes and that no other guest can share. Targets: over virtio-pmem it is \
     under 10% of virtio-blk's, and the read time within 1.5× of virtio-blk's.";

/// How many guests read at once.
const GUESTS: usize = 3;
/// One boot's limit: three guests reading the closure at once on two CPUs under TCG.
const TIMEOUT: Duration = Duration::from_secs(1800);
/// What the guest prints right before and right after its reads.
const BEFORE: &str = "DAX-READS-START";
const AFTER: &str = "DAX-READS-DONE";
/// What guest-init prints when the pmem store is really mapped.
const DAX_ON: &str = "guest-init: DAX on for /dev/pmem";

/// The guest's script: the reads between two markers, each followed by a second's pause
/// so that the host samples qemu while the guest holds still.
fn script() -> String {
    let uptime = "$(busybox cut -d' ' -f1 /proc/uptime)";
    let cached = |what: &str| {
        format!("set -- $(busybox grep '^Cached:' /proc/meminfo)\necho \"CACHED-{what} $2\"\n")
    };
    format!(
        "#!/bin/busybox sh\nexport PATH=/bin\necho GUEST-START\n\
         busybox grep ' erofs ' /proc/self/mountinfo | busybox sed 's/^/STORE-MOUNT /'\n\
         busybox sync\necho 3 > /proc/sys/vm/drop_caches\n\
         {before}\
         echo {BEFORE}\nbusybox sleep 1\n\
         echo \"MARK start {uptime}\"\n\
         busybox find /nix/store -type f | busybox xargs busybox cat > /dev/null\n\
         echo \"MARK end {uptime}\"\n\
         {after}\
         echo {AFTER}\nbusybox sleep 1\n\
         echo \"FILES $(busybox find /nix/store -type f | busybox wc -l)\"\n\
         echo GUEST-OK\nbusybox sync\nbusybox poweroff -f\n",
        before = cached("BEFORE"),
        after = cached("AFTER"),
    )
}

/// What the section needs from the bench.
pub struct Inputs<'a> {
    pub built: &'a Built,
    /// The first this many closure paths are the guests' closure.
    pub paths: usize,
    pub mkimage: &'a Path,
    pub no_build: bool,
}

/// One guest's figures.
#[derive(Debug)]
struct Figures {
    read_s: f64,
    cached_before_kib: u64,
    cached_after_kib: u64,
    anon_before_kib: u64,
    anon_after_kib: u64,
    file_after_kib: u64,
    /// When the host saw the markers around the reads.
    reading: (Instant, Instant),
    files: String,
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// The number after `prefix` on the console.
fn number<T: std::str::FromStr>(boot: &Boot, prefix: &str) -> Result<T, String> {
    boot.value(prefix)
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("the guest did not print {prefix:?} with a number"))
}

/// The figures of one finished boot over `via`.
fn figures(boot: &Boot, via: DaxVia) -> Result<Figures, String> {
    if via == DaxVia::Pmem {
        // Without DAX the guest reads the image into its page cache like a disk, and the
        // figures would say nothing about DAX.
        let line = boot
            .line_with(DAX_ON)
            .ok_or_else(|| format!("guest-init did not say {DAX_ON:?}"))?;
        if !line.contains("is mapped from the device") {
            return Err(format!("guest-init said: {line}"));
        }
    }
    let sample = |marker: &str| {
        boot.qemu_samples
            .iter()
            .find(|s| s.marker == marker)
            .ok_or_else(|| format!("qemu was not sampled at {marker}"))
    };
    let (before, after) = (sample(BEFORE)?, sample(AFTER)?);
    let start: f64 = number(boot, "MARK start ")?;
    let end: f64 = number(boot, "MARK end ")?;
    Ok(Figures {
        read_s: end - start,
        cached_before_kib: number(boot, "CACHED-BEFORE ")?,
        cached_after_kib: number(boot, "CACHED-AFTER ")?,
        anon_before_kib: before.anon_kib,
        anon_after_kib: after.anon_kib,
        file_after_kib: after.file_kib,
        reading: (before.at, after.at),
        files: boot.value("FILES ").unwrap_or("?").to_string(),
    })
}

/// Boots [`GUESTS`] guests at once with the store from `image` over `via`, and takes each
/// one's figures once all are gone. Every boot ends (qemu killed and reaped at the latest
/// at its timeout) before this returns, whatever happened to the others.
fn boot_together(
    kernel: &Kernel,
    initramfs: &Path,
    prog: &GuestProgram,
    via: DaxVia,
    image: &Path,
) -> Result<Vec<Figures>, String> {
    let boots: Vec<Result<Boot, String>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..GUESTS)
            .map(|_| {
                scope.spawn(move || {
                    boot_to_end(|| {
                        let g = Guest::new(kernel, initramfs)
                            .cmdline("loglevel=4")
                            .cmdline(&prog.init_arg())
                            .timeout(TIMEOUT)
                            .sample_qemu_on(BEFORE)
                            .sample_qemu_on(AFTER);
                        match via {
                            DaxVia::Blk => g.cmdline("nixstore=erofs:/dev/vda").disk(image),
                            DaxVia::Pmem => g.cmdline("nixstore=pmem").pmem(image),
                        }
                    })
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("a guest's thread panicked".into()))
            })
            .collect()
    });
    boots
        .iter()
        .enumerate()
        .map(|(i, boot)| {
            let boot = boot
                .as_ref()
                .map_err(|e| format!("guest {i} over {via}: {e}"))?;
            figures(boot, via).map_err(|e| {
                format!(
                    "guest {i} over {via}: {e}; console tail:\n{}",
                    tail(&boot.console, 30)
                )
            })
        })
        .collect()
}

/// Writes the image of `closure` of `store` to `out` with mkimage and `extra` options.
fn mkimage(
    inp: &Inputs,
    store: &Path,
    closure: &Path,
    out: &Path,
    extra: &[&str],
) -> Result<u64, String> {
    let mut cmd = Command::new(inp.mkimage);
    cmd.arg("--store-dir")
        .arg(store)
        .arg("-q")
        .args(extra)
        .arg(closure)
        .arg(out)
        .env_remove("NIXSTOREFS_IMAGE_CACHE")
        .stdin(Stdio::null());
    let shown = format!("{cmd:?}");
    let st = status_within(&mut cmd, Duration::from_secs(600))?;
    if !st.success() {
        return Err(format!("{shown}: {st}"));
    }
    fs::metadata(out)
        .map(|m| m.len())
        .map_err(|e| format!("{}: {e}", out.display()))
}

/// Reads `path` whole, so that its pages are in the host's page cache.
fn warm(path: &Path) -> io::Result<()> {
    let mut f = File::open(path)?;
    let mut buf = vec![0u8; 1 << 20];
    while f.read(&mut buf)? > 0 {}
    Ok(())
}

/// Runs the section into `r`.
pub fn run(inp: &Inputs, r: &mut Results) -> Result<(), String> {
    vm::which("qemu-system-x86_64").ok_or("qemu-system-x86_64 is not installed")?;
    guest_init(inp.no_build)?;
    let b = inp.built;
    let dir = b
        .host
        .store_dir
        .parent()
        .and_then(Path::parent)
        .ok_or("no scratch directory")?
        .join("dax");
    let names = &b.closure[..inp.paths];
    let (store_dir, closure, prog) =
        guest_store(b, names, &dir, "nixstorefs-bench-dax", &script())?;
    let measured = measure(inp, &dir, &store_dir, &closure, &prog, r);
    let _ = fs::remove_dir_all(&dir);
    measured
}

fn measure(
    inp: &Inputs,
    dir: &Path,
    store_dir: &Path,
    closure: &Path,
    prog: &GuestProgram,
    r: &mut Results,
) -> Result<(), String> {
    let mut names = inp.built.closure[..inp.paths].to_vec();
    names.push(prog.base.clone());
    let files = crate::workload::files(store_dir, &names).map_err(|e| e.to_string())?;
    let bytes: u64 = files.iter().map(|(_, n)| n).sum();
    let images: Vec<(DaxVia, PathBuf, u64)> =
        [(DaxVia::Blk, &[][..]), (DaxVia::Pmem, &["--dax"][..])]
            .into_iter()
            .map(|(via, extra)| {
                let img = dir.join(format!("{via}.img"));
                eprintln!("bench: [dax] writing the {via} image");
                let size = mkimage(inp, store_dir, closure, &img, extra)?;
                warm(&img).map_err(|e| format!("{}: {e}", img.display()))?;
                Ok((via, img, size))
            })
            .collect::<Result<_, String>>()?;
    let initramfs = dir.join("initramfs.cpio");
    let kernel = kernel_and_initramfs(&initramfs)?;
    for (via, img, _) in &images {
        eprintln!("bench: [dax] booting {GUESTS} guests at once over {via}");
        let figs = boot_together(&kernel, &initramfs, prog, *via, img)?;
        let starts = figs.iter().map(|f| f.reading.0).max();
        let ends = figs.iter().map(|f| f.reading.1).min();
        if let (Some(s), Some(e)) = (starts, ends) {
            r.note(
                Section::Dax,
                format!(
                    "Over {via}, all {GUESTS} guests were reading at once for {:.1} s, as \
                     the host saw it: from the last guest's marker before its reads to the \
                     first guest's marker after them (the one-second pause after the first \
                     marker included). The guests counted {} files.",
                    e.saturating_duration_since(s).as_secs_f64(),
                    figs.iter()
                        .map(|f| f.files.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            );
        }
        add(r, *via, &figs);
    }
    let size = |via: DaxVia| {
        images
            .iter()
            .find(|(v, _, _)| *v == via)
            .map_or(0, |(_, _, s)| *s)
    };
    r.note(
        Section::Dax,
        format!(
            "The guests' closure: {} store paths (the guest program's included), {} files, \
             {:.0} MiB. Images: {:.0} MiB (virtio-blk), {:.0} MiB (`--dax`, padded to 2 MiB).",
            names.len(),
            files.len(),
            bytes as f64 / f64::from(1 << 20),
            size(DaxVia::Blk) as f64 / f64::from(1 << 20),
            size(DaxVia::Pmem) as f64 / f64::from(1 << 20),
        ),
    );
    let id = |via, figure| Id::Dax(via, figure);
    r.ratio(
        "memory for the store (qemu's RssAnon growth across the reads), pmem vs blk",
        id(DaxVia::Pmem, DaxFigure::QemuAnonGrowth),
        id(DaxVia::Blk, DaxFigure::QemuAnonGrowth),
        Some(Target::Below(0.1)),
    );
    r.ratio(
        "read time, pmem vs blk",
        id(DaxVia::Pmem, DaxFigure::Read),
        id(DaxVia::Blk, DaxFigure::Read),
        Some(Target::AtMost(1.5)),
    );
    r.ratio(
        "guest's Cached growth across the reads, pmem vs blk",
        id(DaxVia::Pmem, DaxFigure::CachedGrowth),
        id(DaxVia::Blk, DaxFigure::CachedGrowth),
        None,
    );
    r.ratio(
        "qemu's RssAnon after the reads, pmem vs blk",
        id(DaxVia::Pmem, DaxFigure::QemuAnon),
        id(DaxVia::Blk, DaxFigure::QemuAnon),
        None,
    );
    Ok(())
}

/// Adds one measurement per figure over `via`, a sample per guest.
fn add(r: &mut Results, via: DaxVia, figs: &[Figures]) {
    let how = match via {
        DaxVia::Blk => "virtio-blk",
        DaxVia::Pmem => "virtio-pmem, DAX",
    };
    for &figure in DaxFigure::ALL {
        let (label, unit) = match figure {
            DaxFigure::Read => ("read every file, cold", "s"),
            DaxFigure::QemuAnon => ("qemu's RssAnon after the reads", "MiB"),
            DaxFigure::QemuAnonGrowth => ("qemu's RssAnon growth across the reads", "MiB"),
            DaxFigure::QemuFile => ("qemu's RssFile after the reads", "MiB"),
            DaxFigure::Cached => ("guest's Cached after the reads", "MiB"),
            DaxFigure::CachedGrowth => ("guest's Cached growth across the reads", "MiB"),
        };
        let samples = figs
            .iter()
            .map(|f| match figure {
                DaxFigure::Read => f.read_s,
                DaxFigure::QemuAnon => mib(f.anon_after_kib),
                DaxFigure::QemuAnonGrowth => mib(f.anon_after_kib) - mib(f.anon_before_kib),
                DaxFigure::QemuFile => mib(f.file_after_kib),
                DaxFigure::Cached => mib(f.cached_after_kib),
                DaxFigure::CachedGrowth => mib(f.cached_after_kib) - mib(f.cached_before_kib),
            })
            .collect();
        r.add(Measurement {
            id: Id::Dax(via, figure),
            label: format!("{label}, {how}"),
            unit,
            better: Better::Lower,
            samples,
            params: json!({"via": via.as_str(), "guests": GUESTS}),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_script_marks_the_reads_and_pauses_after_each_marker() {
        let s = script();
        let at = |needle: &str| s.find(needle).unwrap_or_else(|| panic!("{needle}: {s}"));
        assert!(at("drop_caches") < at(BEFORE));
        assert!(at(BEFORE) < at("MARK start") && at("MARK start") < at("xargs busybox cat"));
        assert!(at("xargs busybox cat") < at("MARK end") && at("MARK end") < at(AFTER));
        assert!(at("CACHED-BEFORE") < at(BEFORE) && at("CACHED-AFTER") < at(AFTER));
        for marker in [BEFORE, AFTER] {
            assert!(
                s.contains(&format!("echo {marker}\nbusybox sleep 1\n")),
                "{s}"
            );
        }
    }
}
