//! `mkimage`: writes a reproducible erofs image of a Nix closure, or of any directory tree.

use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use clap::Parser;
use mkimage::cache::{self, Cache, CacheError, KeyBuilder, Step};
use mkimage::erofs::{self, ImageOptions};
use mkimage::output::AtomicOutput;
use mkimage::snapshot::{self, SnapshotOptions};
use mkimage::uuid::{derived_uuid, parse_uuid};
use nixstorefs::gc_roots::TempRoots;
use nixstorefs::view::{View, ViewOptions, ROOT_ID};
use nixstorefs_cli::{hold_roots, init_logging, load_closure, ClosureOptions, Failure};

const EXAMPLES: &str = "\
Examples:
  # The closure of a system, for a VM that boots from a block device:
  nix-store -qR $(readlink -f ./result) > closure.txt
  mkimage closure.txt store.img

  # A closureInfo output: its registration goes into the image as nix-path-registration:
  mkimage /nix/store/...-closure-info store.img

  # Snapshot a directory tree, for instance a mounted nixstorefs view:
  mkimage --dir /mnt/store store.img

  # Compressed with LZ4HC, as mkfs.erofs -zlz4hc, on all CPUs:
  mkimage -z lz4hc closure.txt store.img

  # For a guest that maps the image over virtio-pmem with DAX:
  mkimage --dax closure.txt store.img

  # In the guest:
  mount -t erofs -o ro /dev/vdb /nix/.ro-store

Exit status: 0 when the image is written; 2 for bad input (a malformed closure, closure
paths missing from the store, bad options); 1 when writing fails, or when the garbage
collector roots asked for (--gc-roots daemon|local) cannot be taken. OUTPUT is replaced
only by a complete image; on failure nothing is left behind. A block device given as
OUTPUT is written in place, if it is large enough and not in use.";

/// Writes a reproducible erofs image of a Nix closure (or of a directory with --dir).
#[derive(Parser, Debug)]
#[command(version, after_help = EXAMPLES)]
struct Args {
    /// CLOSURE OUTPUT, or just OUTPUT with --dir. CLOSURE is a store-paths list, a
    /// closureInfo directory, a registration, or `-` for standard input.
    #[arg(value_name = "CLOSURE|OUTPUT", num_args = 1..=2, required = true)]
    paths: Vec<PathBuf>,

    /// Snapshot this directory tree instead of a closure.
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,

    /// Include what is mounted below the tree (by default a mount point is left out with
    /// everything below it, as another filesystem; a bind mount that loops is an error).
    #[arg(long)]
    cross_mounts: bool,

    #[command(flatten)]
    closure_options: ClosureOptions,

    /// Owner of every file in the image.
    #[arg(long, default_value_t = 0, value_name = "UID")]
    force_uid: u32,

    /// Group of every file in the image.
    #[arg(long, default_value_t = 0, value_name = "GID")]
    force_gid: u32,

    /// Timestamp of the image and of every file in it (seconds since the epoch).
    #[arg(short = 'T', default_value_t = 0, value_name = "SECONDS")]
    timestamp: u64,

    /// Keep the host's modification times instead of -T.
    #[arg(long)]
    preserve_mtime: bool,

    /// Volume label (at most 15 bytes), for mounting by LABEL=.
    #[arg(short = 'L', default_value = "nix-store", value_name = "LABEL")]
    label: String,

    /// Volume UUID. By default it is derived from the closure's store paths: the same
    /// closure always gets the same UUID, different closures get different ones.
    #[arg(short = 'U', value_name = "UUID")]
    uuid: Option<String>,

    /// Keep hard links as one inode (by default they are separate files, so optimised and
    /// unoptimised stores give the same image).
    #[arg(long)]
    preserve_hardlinks: bool,

    /// Write this registration (nix-store --dump-db format) at the image root as
    /// nix-path-registration. A closureInfo or registration input provides its own.
    #[arg(long, value_name = "FILE")]
    registration: Option<PathBuf>,

    /// Do not write nix-path-registration, even when the input provides one.
    #[arg(long, conflicts_with = "registration")]
    no_registration: bool,

    /// Drop the ~nix~case~hack~N suffixes of names from macOS stores.
    #[arg(long)]
    strip_case_hack: bool,

    /// Compress files: lz4, or lz4hc[,LEVEL] (2..=12, default 9), as mkfs.erofs -z spells
    /// them. Linux reads both since 5.4. Files that do not shrink by a block stay plain.
    #[arg(short = 'z', value_name = "COMPRESSOR", value_parser = erofs::Compression::parse)]
    compression: Option<erofs::Compression>,

    /// With -z, put each compressed file's last, partial extent right after its indexes
    /// instead of in a block of its own, as mkfs.erofs -E ztailpacking does: smaller
    /// images that need Linux 5.17 or later.
    #[arg(long, requires = "compression")]
    ztailpacking: bool,

    /// Lay the image out for DAX (a guest mapping it over virtio-pmem, mounted with -o
    /// dax=always): every file of 4 KiB or more in whole blocks of its own with no inline
    /// tail, and the image padded to a multiple of 2 MiB. Not with -z: erofs serves only
    /// uncompressed files through DAX.
    #[arg(long)]
    dax: bool,

    /// Threads compressing files [default: the machine's CPUs]. The image does not depend
    /// on it.
    #[arg(long, value_name = "N")]
    threads: Option<usize>,

    /// Threads reading file contents ahead of the writer (0: none).
    #[arg(long, default_value_t = 4, value_name = "N")]
    read_threads: usize,

    /// Keep images in DIR, keyed by a digest of the closure's paths, their contents'
    /// identities and every option that changes the image: an unchanged closure is then
    /// served from DIR (a reflink or hard link where the filesystem allows) instead of
    /// written again. DIR must be the caller's alone (it is created mode 0700). Without
    /// it, NIXSTOREFS_IMAGE_CACHE names the directory if set (--dir trees are not cached).
    #[arg(long, value_name = "DIR")]
    cache: Option<PathBuf>,

    /// Do not use the cache, even if --cache or NIXSTOREFS_IMAGE_CACHE names one (for a
    /// store that was modified by hand).
    #[arg(long)]
    no_cache: bool,

    /// After each run, remove the least recently used cache entries until the cache holds
    /// at most SIZE bytes (suffixes K, M, G, T: powers of 1024).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    cache_max_size: Option<u64>,

    /// Print nothing but errors.
    #[arg(short, long)]
    quiet: bool,

    /// More logging (-v info, -vv debug); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count)]
    verbose: u8,
}

/// Parses a byte count with an optional binary suffix.
fn parse_size(s: &str) -> Result<u64, String> {
    let (digits, shift) = match s.as_bytes().last() {
        Some(b'K' | b'k') => (&s[..s.len() - 1], 10),
        Some(b'M' | b'm') => (&s[..s.len() - 1], 20),
        Some(b'G' | b'g') => (&s[..s.len() - 1], 30),
        Some(b'T' | b't') => (&s[..s.len() - 1], 40),
        _ => (s, 0),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a size (bytes, or a number with K, M, G or T)"))?;
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("{s:?} is too large"))
}

fn input(message: impl Into<String>) -> Failure {
    Failure::input(message)
}

fn runtime(message: impl Into<String>) -> Failure {
    Failure::runtime(message)
}

/// The view to snapshot, the registration that comes with the input if any, the base
/// names of the closure paths it holds (none for `--dir`), and the garbage collector
/// roots that keep those paths while they are read.
fn open_view(args: &Args, closure: Option<&Path>) -> Result<Opened, Failure> {
    // Every node is needed again when its contents are written, after the walk has let
    // go of it: keep every record.
    let options = ViewOptions {
        max_forgotten_nodes: usize::MAX,
        cross_mounts: args.cross_mounts,
        ..ViewOptions::default()
    };
    if let Some(dir) = &args.dir {
        // Any tree: nothing to root (a mounted view holds its own roots).
        let view = View::whole_directory(dir, options).map_err(|e| input(e.to_string()))?;
        return Ok((view, None, None, None));
    }
    let closure_path = closure.expect("checked by the caller");
    let closure = load_closure(closure_path, &args.closure_options.store_dir)?;
    let store_dir = closure.store_dir.clone();
    let roots = hold_roots(args.closure_options.gc_roots, &closure)?;
    let (view, setup) = View::new(&closure, args.closure_options.allow_missing, options)
        .map_err(|e| input(e.to_string()))?;
    if !setup.missing.is_empty() {
        tracing::warn!(
            "leaving out {} closure path(s) missing from {}",
            setup.missing.len(),
            store_dir.display()
        );
    }
    let paths = closure
        .paths
        .iter()
        .filter(|p| !setup.missing.contains(p))
        .map(|p| p.base_name().to_owned())
        .collect();
    Ok((view, closure.registration, Some(paths), Some(roots)))
}

type Opened = (
    View,
    Option<Vec<u8>>,
    Option<Vec<String>>,
    Option<TempRoots>,
);

fn run(args: &Args) -> Result<(), Failure> {
    let started = Instant::now();
    let (closure, output) = match (&args.dir, args.paths.as_slice()) {
        (Some(_), [output]) => (None, output),
        (None, [closure, output]) => (Some(closure.as_path()), output),
        (Some(_), _) => return Err(input("with --dir, give only OUTPUT")),
        (None, _) => return Err(input("give CLOSURE and OUTPUT (or --dir DIR OUTPUT)")),
    };
    let uuid = match &args.uuid {
        Some(text) => Some(parse_uuid(text).map_err(|e| input(format!("-U {text}: {e}")))?),
        None => None,
    };
    if args.label.len() > 15 {
        return Err(input(format!(
            "-L {:?}: a label has at most 15 bytes, this one has {}",
            args.label,
            args.label.len()
        )));
    }
    if args.dax {
        if let Some(compression) = &args.compression {
            return Err(input(format!(
                "--dax and -z {compression} cannot be combined: erofs serves only \
                 uncompressed files through DAX, a compressed one would be read into the \
                 guest's page cache"
            )));
        }
    }
    if args.dir.is_some() && args.cache.is_some() {
        return Err(input(
            "--cache keys images by their closure; a --dir tree can change, so it is not cached",
        ));
    }
    let registration = match &args.registration {
        Some(path) => Some(
            nixstorefs::closure::read_input_file(path)
                .map_err(|e| input(format!("--registration {e}")))?,
        ),
        None => None,
    };

    // The roots are held until the image is written or served.
    let (view, own_registration, paths, _roots) = open_view(args, closure)?;
    // The input's registration holds each path's narHash: part of the key even when it is
    // not written into the image.
    let input_registration = own_registration.as_deref().map(cache::digest);
    let registration = if args.no_registration {
        None
    } else {
        registration.or(own_registration)
    };
    let mounts = mkimage::mounts::mounts_below(view.store_dir()).map_err(|e| {
        runtime(format!(
            "cannot find the mounts below {}: {e}",
            view.store_dir().display()
        ))
    })?;
    let mount_points = {
        let mut points: Vec<PathBuf> = mounts.points.iter().cloned().collect();
        points.sort();
        points
    };
    let (left_out, loops) = if args.cross_mounts {
        (Default::default(), mounts.loops)
    } else {
        (mounts.points, Default::default())
    };
    let uuid = match uuid {
        Some(uuid) => uuid,
        None => {
            let root = view
                .list(ROOT_ID)
                .map_err(|e| runtime(format!("{}: {e}", view.store_dir().display())))?;
            derived_uuid(root.iter().map(|e| e.name.as_bytes()))
        }
    };
    let image_options = ImageOptions {
        uuid,
        label: args.label.clone(),
        build_time: args.timestamp,
        block_size_bits: 12,
        compression: args.compression,
        threads: args
            .threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
        ztailpacking: args.ztailpacking,
        dax: args.dax,
    };
    let cache_dir = match (&args.cache, args.no_cache, &paths) {
        (_, true, _) | (_, _, None) => None,
        (Some(dir), false, Some(_)) => Some(dir.clone()),
        (None, false, Some(_)) => std::env::var_os(CACHE_ENV)
            .filter(|d| !d.is_empty())
            .map(PathBuf::from),
    };
    let cached = match (cache_dir, paths) {
        (Some(dir), Some(paths)) => {
            let key = cache_key(
                args,
                view.store_dir(),
                &paths,
                &mount_points,
                KeyRegistrations {
                    image: registration.as_deref(),
                    input: input_registration.as_deref(),
                },
                &image_options,
            )
            .map_err(runtime)?;
            let cache = Cache::open(&dir).map_err(|e| runtime(format!("cache: {e}")))?;
            Some((cache, key))
        }
        _ => None,
    };

    let snapshot_options = SnapshotOptions {
        uid: args.force_uid,
        gid: args.force_gid,
        mtime: (!args.preserve_mtime).then_some(args.timestamp as i64),
        preserve_hardlinks: args.preserve_hardlinks,
        strip_case_hack: args.strip_case_hack,
        left_out,
        loops,
        extra_root_files: registration
            .map(|r| vec![(b"nix-path-registration".to_vec(), r)])
            .unwrap_or_default(),
    };
    let view = Arc::new(view);
    let Some((cache, key)) = cached else {
        let stats = write(args, &view, &snapshot_options, &image_options, output)?;
        summary(args, output, &stats, started, "");
        return Ok(());
    };

    let served = cache.serve_or_build(
        &key,
        output,
        args.cache_max_size,
        |building| {
            write_to(
                args,
                &view,
                &snapshot_options,
                &image_options,
                building.file(),
                &building.path(),
            )
        },
        |step| match step {
            Step::Stored { image, built } => summary(args, image, built, started, " (cache miss)"),
            Step::Served {
                image,
                served,
                delivery,
            } => {
                if !args.quiet {
                    eprintln!(
                        "mkimage: cache {}: {} is {} ({}), {:.3} s",
                        served.as_str(),
                        output.display(),
                        image.display(),
                        delivery.as_str(),
                        started.elapsed().as_secs_f64()
                    );
                }
            }
        },
    );
    match served {
        Ok(_) => Ok(()),
        Err(CacheError::Build(failure)) => Err(failure),
        Err(CacheError::Cache(e)) => Err(runtime(e.to_string())),
    }
}

/// Environment variable naming the default cache directory.
const CACHE_ENV: &str = "NIXSTOREFS_IMAGE_CACHE";

/// The registrations a cache key holds.
struct KeyRegistrations<'a> {
    /// The one written into the image, if any.
    image: Option<&'a [u8]>,
    /// The digest of the input's own, if it has one: its narHashes name the paths'
    /// contents, whether or not it is written into the image.
    input: Option<&'a str>,
}

/// Everything that decides the image's bytes; not the thread counts, nor logging.
///
/// Store paths are named by their contents only while they stay valid: a path collected
/// and built again by a build that is not reproducible, or a `--store-dir` over a tree
/// that changes, keeps its name. So each path also enters the key with a cheap identity
/// of what is there now: the device, inode number and ctime of its top-level entry (a
/// path deleted and written again gets another inode, or at least another ctime), and the
/// input registration's narHashes where it has one. So does each mount point below the
/// closure's paths, left out or (with `--cross-mounts`) followed, with the identity of
/// the root of what a followed one shows.
fn cache_key(
    args: &Args,
    store_dir: &Path,
    paths: &[String],
    mount_points: &[PathBuf],
    registrations: KeyRegistrations<'_>,
    options: &ImageOptions,
) -> Result<String, String> {
    let identity = |path: &Path, follow: bool| -> Result<String, String> {
        let flags = if follow {
            rustix::fs::AtFlags::empty()
        } else {
            rustix::fs::AtFlags::SYMLINK_NOFOLLOW
        };
        let st = rustix::fs::statat(rustix::fs::CWD, path, flags)
            .map_err(|e| format!("cache key: {}: {e}", path.display()))?;
        Ok(format!(
            "{}:{} {} {}.{:09}",
            st.st_dev, st.st_ino, st.st_mode, st.st_ctime, st.st_ctime_nsec
        ))
    };
    let mut key = KeyBuilder::default();
    key.field("store-dir", store_dir.as_os_str().as_bytes());
    key.field("paths", paths.len().to_string());
    for path in paths {
        key.field("path", path);
        key.field("path-identity", identity(&store_dir.join(path), false)?);
    }
    let compression = options
        .compression
        .map_or("none".to_owned(), |c| c.to_string());
    key.field("force-uid", args.force_uid.to_string())
        .field("force-gid", args.force_gid.to_string())
        .field("timestamp", args.timestamp.to_string())
        .field("preserve-mtime", args.preserve_mtime.to_string())
        .field("label", &args.label)
        .field("uuid", options.uuid)
        .field("preserve-hardlinks", args.preserve_hardlinks.to_string())
        .field("strip-case-hack", args.strip_case_hack.to_string())
        .field("block-size-bits", options.block_size_bits.to_string())
        .field("compression", compression)
        .field("ztailpacking", options.ztailpacking.to_string());
    // Only when set, so the keys of other images, and the entries cached under them, stay
    // as they were.
    if options.dax {
        key.field("dax", "true");
    }
    key.field("cross-mounts", args.cross_mounts.to_string())
        .field(
            "registration",
            registrations.image.map_or("none".to_owned(), cache::digest),
        )
        .field("input-registration", registrations.input.unwrap_or("none"));
    // Mounts below paths outside the closure change nothing.
    let in_closure = |point: &Path| {
        point
            .components()
            .next()
            .and_then(|c| c.as_os_str().to_str())
            .is_some_and(|first| paths.iter().any(|p| p == first))
    };
    for point in mount_points.iter().filter(|p| in_closure(p)) {
        key.field("mount", point.as_os_str().as_bytes());
        if args.cross_mounts {
            key.field("mount-identity", identity(&store_dir.join(point), true)?);
        }
    }
    Ok(key.finish())
}

/// Snapshots the view and writes its image to `output`, which appears only complete.
fn write(
    args: &Args,
    view: &Arc<View>,
    snapshot_options: &SnapshotOptions,
    image_options: &ImageOptions,
    output: &Path,
) -> Result<erofs::ImageStats, Failure> {
    let out = AtomicOutput::create(output).map_err(|e| {
        if e.kind() == std::io::ErrorKind::InvalidInput {
            input(format!("OUTPUT {}: {e}", output.display()))
        } else if e.raw_os_error() == Some(rustix::io::Errno::BUSY.raw_os_error()) {
            runtime(format!(
                "cannot write {}: the device is in use (mounted?)",
                output.display()
            ))
        } else {
            runtime(format!("cannot write {}: {e}", output.display()))
        }
    })?;
    let stats = write_to(
        args,
        view,
        snapshot_options,
        image_options,
        out.file(),
        output,
    )?;
    out.commit()
        .map_err(|e| runtime(format!("cannot finish {}: {e}", output.display())))?;
    Ok(stats)
}

/// Snapshots the view and writes its image into `file` (`shown` in messages).
fn write_to(
    args: &Args,
    view: &Arc<View>,
    snapshot_options: &SnapshotOptions,
    image_options: &ImageOptions,
    file: &std::fs::File,
    shown: &Path,
) -> Result<erofs::ImageStats, Failure> {
    let snap = snapshot::snapshot(view, snapshot_options)
        .map_err(|e| runtime(format!("{}/{e}", view.store_dir().display())))?;
    let bar = progress_bar(args.quiet, &snap);
    // Compression reads every file it compresses on its own threads first.
    let read_threads = if args.compression.is_some() {
        0
    } else {
        args.read_threads
    };
    let prefetch = mkimage::prefetch::Prefetch::start(&snap.inodes, read_threads);
    let mut on_progress = |stats: &erofs::ImageStats| {
        prefetch.written(stats.data_bytes);
        if let Some(bar) = &bar {
            bar.set_position(stats.data_bytes);
        }
    };
    let written =
        erofs::write_image_with_progress(&snap.inodes, image_options, file, &mut on_progress);
    drop(prefetch);
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    written.map_err(|e| match e.inode.and_then(|i| snap.paths.get(i)) {
        Some(path) => runtime(format!(
            "writing {} failed at {}: {}",
            shown.display(),
            view.store_dir().join(path).display(),
            e.cause
        )),
        None => runtime(format!("writing {} failed: {e}", shown.display())),
    })
}

fn summary(args: &Args, output: &Path, stats: &erofs::ImageStats, started: Instant, note: &str) {
    if !args.quiet {
        eprintln!(
            "mkimage: wrote {}{note}: {} files, {} directories, {} symlinks, {} data bytes, image {} bytes, {:.2} s",
            output.display(),
            stats.files,
            stats.directories,
            stats.symlinks,
            stats.data_bytes,
            stats.image_bytes,
            started.elapsed().as_secs_f64()
        );
    }
}

/// A progress bar over the file bytes to write, on a terminal only (quiet otherwise).
fn progress_bar(quiet: bool, snap: &snapshot::Snapshot) -> Option<indicatif::ProgressBar> {
    use std::io::IsTerminal;
    if quiet || !std::io::stderr().is_terminal() {
        return None;
    }
    let total: u64 = snap
        .inodes
        .iter()
        .map(|i| match &i.kind {
            erofs::InodeKind::RegularFile { size, .. } => *size,
            _ => 0,
        })
        .sum();
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:40} {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} eta {eta}",
        )
        .expect("a valid template"),
    );
    Some(bar)
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Err(f) = init_logging(args.verbose, None) {
        eprintln!("mkimage: {}", f.message);
        return ExitCode::from(f.status);
    }
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("mkimage: {}", f.message);
            ExitCode::from(f.status)
        }
    }
}
