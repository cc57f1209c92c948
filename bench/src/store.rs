//! The synthetic host store the benchmark runs on: N top-level store paths, most of them a
//! directory with one small file, and a closure of K paths of a realistic shape.
//!
//! Everything is a function of [`Params`], so a store left by an earlier invocation with the
//! same parameters (its marker file says so) is reused as it is.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{symlink, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

use nixstorefs_tests::sample::{store_hash, PseudoRandom};

/// Bumped whenever the layout changes, so that an old store is not mistaken for a new one.
const LAYOUT_VERSION: u32 = 1;
const MARKER: &str = "complete";
const SALT: &str = "nixstorefs-bench";

/// What to build.
#[derive(Clone, Debug)]
pub struct Params {
    /// Top-level store paths of the big host store.
    pub paths: usize,
    /// Store paths in the closure.
    pub closure: usize,
    pub big_files: usize,
    pub big_mib: u64,
    /// Entries of each of the two wide directories.
    pub wide_entries: usize,
    /// Files in the one store path that makes the footprint closure large.
    pub many_files: usize,
}

impl Params {
    fn key(&self) -> String {
        format!(
            "v{LAYOUT_VERSION}-p{}-c{}-b{}x{}-w{}-m{}",
            self.paths,
            self.closure,
            self.big_files,
            self.big_mib,
            self.wide_entries,
            self.many_files
        )
    }
}

/// One store directory and the closures listed against it.
#[derive(Clone, Debug)]
pub struct Store {
    /// Its top-level store paths.
    pub paths: usize,
    /// The directory to give as `--store-dir`.
    pub store_dir: PathBuf,
    /// Closure files, by number of paths, smallest first.
    pub closures: Vec<(usize, PathBuf)>,
}

/// The stores of one parameter set.
#[derive(Clone, Debug)]
pub struct Built {
    /// The big host store, of [`Params::paths`] paths.
    pub host: Store,
    /// Smaller stores (1k, 10k paths) holding the first closure paths and noise, so that
    /// mount latency can be set against the size of the host store.
    pub smaller: Vec<Store>,
    /// Base names of the closure, in build order.
    pub closure: Vec<String>,
    /// The big files, relative to the store directory.
    pub big_files: Vec<PathBuf>,
    /// The closure plus the store path with [`Params::many_files`] files.
    pub footprint_closure: PathBuf,
    pub footprint_paths: Vec<String>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Big,
    Wide,
    Lib,
    App,
}

fn kind(i: usize, p: &Params) -> Kind {
    if i < p.big_files {
        Kind::Big
    } else if i < p.big_files + 2 {
        Kind::Wide
    } else if i % 8 == 0 {
        Kind::Lib
    } else {
        Kind::App
    }
}

fn closure_name(i: usize, p: &Params) -> String {
    match kind(i, p) {
        Kind::Big => format!("blob{i}-1.0"),
        Kind::Wide => format!("wide{i}-2.0"),
        Kind::Lib => format!("lib{i}-3.{}", i % 10),
        Kind::App => format!("app{i}-{}.{}", i % 7, i % 13),
    }
}

fn base(name: &str) -> String {
    format!("{}-{name}", store_hash(SALT, name))
}

fn noise_base(i: usize) -> String {
    base(&format!("pkg{i}-{}.{}", i % 5, i % 11))
}

const MANY_NAME: &str = "manyfiles-1.0";

/// The stores for `p` under `dir`: reused when complete, else built from scratch.
pub fn prepare(dir: &Path, p: &Params, fresh: bool) -> io::Result<Built> {
    if p.closure + 1 > p.paths {
        return Err(io::Error::other(format!(
            "--closure {} needs at least {} host paths (the closure and one more)",
            p.closure,
            p.closure + 1
        )));
    }
    let root = dir.join(p.key());
    let built = layout(&root, p);
    let marker = root.join(MARKER);
    if !fresh && fs::read_to_string(&marker).ok().as_deref() == Some(&p.key()) {
        eprintln!("bench: reusing the store at {}", root.display());
        return Ok(built);
    }
    if root.exists() {
        eprintln!("bench: removing {}", root.display());
        fs::remove_dir_all(&root)?;
    }
    let t = Instant::now();
    eprintln!(
        "bench: building a host store of {} paths (closure {}, {} × {} MiB) at {}",
        p.paths,
        p.closure,
        p.big_files,
        p.big_mib,
        root.display()
    );
    build(p, &built)?;
    fs::write(&marker, p.key())?;
    eprintln!("bench: store built in {:.1} s", t.elapsed().as_secs_f64());
    Ok(built)
}

/// Where everything goes, without touching the disk.
fn layout(root: &Path, p: &Params) -> Built {
    let closure: Vec<String> = (0..p.closure).map(|i| base(&closure_name(i, p))).collect();
    let big_files = closure[..p.big_files]
        .iter()
        .map(|b| Path::new(b).join("share/data/blob.bin"))
        .collect();
    let host_dir = root.join("host");
    let mut closures = vec![(p.closure, host_dir.join("closure.txt"))];
    if p.closure > 100 {
        closures.insert(0, (100, host_dir.join("closure-100.txt")));
    }
    let host = Store {
        paths: p.paths,
        store_dir: host_dir.join("store"),
        closures,
    };
    let smaller = [1_000, 10_000]
        .into_iter()
        .filter(|&n| n < p.paths)
        .map(|n| {
            let d = root.join(format!("host-{n}"));
            let k = p.closure.min(n);
            let mut closures = vec![(k, d.join("closure.txt"))];
            if k > 100 {
                closures.insert(0, (100, d.join("closure-100.txt")));
            }
            Store {
                paths: n,
                store_dir: d.join("store"),
                closures,
            }
        })
        .collect();
    let mut footprint_paths = closure.clone();
    footprint_paths.push(base(MANY_NAME));
    Built {
        host,
        smaller,
        closure,
        big_files,
        footprint_closure: host_dir.join("closure-footprint.txt"),
        footprint_paths,
    }
}

fn write_list(file: &Path, store_dir: &Path, bases: &[String]) -> io::Result<()> {
    let mut sorted: Vec<&String> = bases.iter().collect();
    sorted.sort();
    let mut text = String::new();
    for b in sorted {
        text.push_str(&store_dir.join(b).to_string_lossy());
        text.push('\n');
    }
    fs::write(file, text)
}

fn build(p: &Params, b: &Built) -> io::Result<()> {
    let store = &b.host.store_dir;
    fs::create_dir_all(store)?;
    let noise = p.paths - p.closure - 1;
    std::thread::scope(|s| -> io::Result<()> {
        // Noise on two threads while this one writes the closure: all of it is syscalls.
        let half = noise / 2;
        let timed = move |range: std::ops::Range<usize>| {
            let t = Instant::now();
            let n = range.len();
            write_noise(store, range)?;
            eprintln!(
                "bench: {n} small store paths written in {:.1} s",
                t.elapsed().as_secs_f64()
            );
            Ok::<_, io::Error>(())
        };
        let a = s.spawn(move || timed(0..half));
        let c = s.spawn(move || timed(half..noise));
        let t = Instant::now();
        let mut w = Writer::new("closure");
        for i in 0..p.closure {
            write_closure_path(&mut w, store, i, p, &b.closure)?;
        }
        eprintln!(
            "bench: closure written in {:.1} s",
            t.elapsed().as_secs_f64()
        );
        let t = Instant::now();
        write_many(&mut w, &store.join(base(MANY_NAME)), p.many_files)?;
        eprintln!(
            "bench: {} files of the footprint path written in {:.1} s",
            p.many_files,
            t.elapsed().as_secs_f64()
        );
        a.join().expect("noise writer panicked")?;
        c.join().expect("noise writer panicked")
    })?;
    for (n, file) in &b.host.closures {
        write_list(file, store, &b.closure[..*n])?;
    }
    write_list(&b.footprint_closure, store, &b.footprint_paths)?;
    for small in &b.smaller {
        fs::create_dir_all(&small.store_dir)?;
        let k = p.closure.min(small.paths);
        for name in &b.closure[..k] {
            link_tree(&store.join(name), &small.store_dir.join(name))?;
        }
        write_noise(&small.store_dir, 0..small.paths - k)?;
        for (n, file) in &small.closures {
            write_list(file, &small.store_dir, &b.closure[..*n])?;
        }
    }
    Ok(())
}

fn write_noise(store: &Path, range: std::ops::Range<usize>) -> io::Result<()> {
    use rustix::fs::{mkdirat, openat, Mode, OFlags, CWD};
    let mut w = Writer::new("noise");
    // Relative to the store's descriptor: resolving the full path each time costs a third.
    let dirfd = openat(
        CWD,
        store,
        OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    for i in range {
        let base = noise_base(i);
        mkdirat(&dirfd, base.as_str(), Mode::from_raw_mode(0o755))?;
        let len = 20 + w.rng.below(200) as usize;
        w.buf.resize(len, 0);
        w.rng.fill(&mut w.buf);
        let fd = openat(
            &dirfd,
            format!("{base}/propagated-build-inputs").as_str(),
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o444),
        )?;
        fs::File::from(fd).write_all(&w.buf)?;
    }
    Ok(())
}

/// Writes pseudo-random files, so that nothing compresses or deduplicates.
struct Writer {
    rng: PseudoRandom,
    buf: Vec<u8>,
}

impl Writer {
    fn new(seed: &str) -> Writer {
        Writer {
            rng: PseudoRandom::new(seed),
            buf: Vec::new(),
        }
    }

    fn file(&mut self, path: &Path, len: usize, mode: u32) -> io::Result<()> {
        self.buf.resize(len, 0);
        self.rng.fill(&mut self.buf);
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(path)?;
        f.write_all(&self.buf)
    }

    /// A size spread evenly over orders of magnitude in `lo..hi`, as file sizes are.
    fn size(&mut self, lo: usize, hi: usize) -> usize {
        let u = self.rng.below(1 << 20) as f64 / (1u64 << 20) as f64;
        ((lo as f64) * ((hi as f64) / (lo as f64)).powf(u)) as usize
    }

    fn big(&mut self, path: &Path, mib: u64) -> io::Result<()> {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o444)
            .open(path)?;
        self.buf.resize(1 << 20, 0);
        for _ in 0..mib {
            self.rng.fill(&mut self.buf);
            f.write_all(&self.buf)?;
        }
        Ok(())
    }
}

fn write_closure_path(
    w: &mut Writer,
    store: &Path,
    i: usize,
    p: &Params,
    closure: &[String],
) -> io::Result<()> {
    let root = store.join(&closure[i]);
    let name = closure_name(i, p);
    let short = name.split('-').next().unwrap_or(&name).to_string();
    let mkdir = |rel: &str| fs::create_dir_all(root.join(rel));
    fs::create_dir(&root)?;
    mkdir("nix-support")?;
    // Two references each, as text, like propagated-build-inputs.
    let refs = format!(
        "{} {}\n",
        store.join(&closure[(i * 7 + 1) % closure.len()]).display(),
        store.join(&closure[(i * 13 + 5) % closure.len()]).display()
    );
    fs::write(root.join("nix-support/propagated-build-inputs"), refs)?;
    match kind(i, p) {
        Kind::Big => {
            mkdir("share/data")?;
            w.big(&root.join("share/data/blob.bin"), p.big_mib)?;
        }
        Kind::Wide => {
            let dir = root.join("share/man/man3");
            fs::create_dir_all(&dir)?;
            for j in 0..p.wide_entries {
                let len = w.size(100, 4000);
                w.file(&dir.join(format!("fn{j}.3")), len, 0o444)?;
            }
        }
        Kind::Lib => {
            mkdir("lib/pkgconfig")?;
            let so = format!("lib{short}.so.1.0.0");
            let len = w.size(4096, 60 << 10);
            w.file(&root.join("lib").join(&so), len, 0o555)?;
            symlink(&so, root.join(format!("lib/lib{short}.so.1")))?;
            symlink(
                format!("lib{short}.so.1"),
                root.join(format!("lib/lib{short}.so")),
            )?;
            let len = w.size(150, 400);
            w.file(&root.join(format!("lib/pkgconfig/{short}.pc")), len, 0o444)?;
            let inc = format!("include/{short}/detail/impl/v1");
            mkdir(&inc)?;
            for j in 0..6 {
                let len = w.size(200, 20 << 10);
                w.file(&root.join(&inc).join(format!("header{j}.h")), len, 0o444)?;
            }
            let doc = format!("share/doc/{short}");
            mkdir(&doc)?;
            let len = w.size(500, 30 << 10);
            w.file(&root.join(doc).join("README"), len, 0o444)?;
            mkdir("bin")?;
            let len = w.size(300, 3000);
            w.file(&root.join(format!("bin/{short}-config")), len, 0o555)?;
        }
        Kind::App => {
            mkdir("bin")?;
            let len = w.size(64, 60 << 10);
            w.file(&root.join(format!("bin/{short}")), len, 0o555)?;
            let doc = format!("share/doc/{short}");
            mkdir(&doc)?;
            let len = w.size(200, 2000);
            w.file(&root.join(doc).join("copyright"), len, 0o444)?;
            if i % 3 == 0 {
                // An absolute link into another closure path, as wrappers have.
                let lib = (i / 8) * 8;
                if lib >= p.big_files + 2 && lib < closure.len() {
                    symlink(
                        store.join(&closure[lib]).join("lib"),
                        root.join(format!("share/doc/{short}/lib")),
                    )?;
                }
            }
        }
    }
    Ok(())
}

fn write_many(w: &mut Writer, root: &Path, files: usize) -> io::Result<()> {
    fs::create_dir(root)?;
    for d in 0..files.div_ceil(1000) {
        let dir = root.join(format!("share/d{d}"));
        fs::create_dir_all(&dir)?;
        for j in 0..(files - d * 1000).min(1000) {
            let len = w.size(16, 512);
            w.file(&dir.join(format!("f{j}")), len, 0o444)?;
        }
    }
    Ok(())
}

/// Recreates the tree at `from` under `to` with hard links, so the smaller stores cost no
/// data.
pub fn link_tree(from: &Path, to: &Path) -> io::Result<()> {
    let meta = fs::symlink_metadata(from)?;
    if meta.is_dir() {
        fs::create_dir(to)?;
        for e in fs::read_dir(from)? {
            let e = e?;
            link_tree(&e.path(), &to.join(e.file_name()))?;
        }
        Ok(())
    } else if meta.file_type().is_symlink() {
        symlink(fs::read_link(from)?, to)
    } else {
        fs::hard_link(from, to)
    }
}
