//! The image section: mkimage against what it replaces, on the host store's closure.
//!
//! Every variant ends with the image (or copy) on disk: each timed command is followed by
//! a `syncfs` of the scratch filesystem inside the timing, since mkimage syncs its output
//! and the others do not. Variants run interleaved, once each per run.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{symlink, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nixstorefs_tests::sample::PseudoRandom;

use crate::ids::{Id, ImageOutput, ImageRun, Section};
use crate::mounts::{status_within, FuseMount};
use crate::stats::{Better, Measurement, Results, Target};
use crate::store::Built;

/// One command may take this long (the regex variant reads the whole store).
const TIMEOUT: Duration = Duration::from_secs(3600);
/// The label and UUID mkimage and mkfs.erofs both get, so the images differ only in layout.
const UUID: &str = "eb176051-bd15-49b7-9e6b-462e0b467019";

pub const METHOD: &str = "Writing an erofs image of the closure, wall time of each variant \
    including a final `syncfs` of the scratch filesystem (mkimage syncs its output, the \
    others do not), host caches warm, the variants interleaved: (a) `cp -a` of the closure's \
    store paths to a scratch directory, then `mkfs.erofs -T0 --ignore-mtime --all-root -x-1` \
    of it (`-x-1`: no xattrs, which mkimage does not write either, and without which \
    erofs-utils 1.5 stops at the mount's `llistxattr` answer EOPNOTSUPP); (b) the same mkfs.erofs over a live `nixstorefs` mount of the closure, mount and \
    unmount included; (c) `mkimage --store-dir STORE CLOSURE OUT`; (d) the `cp -a` alone, \
    the floor of any tool that reads every file and writes its bytes; (e) with \
    `--image-regex` only, the same mkfs.erofs over the whole host store with nixpkgs' old \
    exclusion regex (every top-level name whose first 10 characters are not a closure \
    path's, built as nixpkgs' includes-to-excludes.py does, given as several \
    `--exclude-regex` since it exceeds one argument's 128 KiB; the image is checked once to \
    hold exactly the closure); (f) `mkimage -z lz4hc` \
    against (a) with `mkfs.erofs -zlz4hc`, on a compressible copy of the closure (same \
    tree, sizes and modes; three files in four hold text-like bytes, the rest \
    pseudo-random, as a mix of text, binaries and already-compressed files), with both \
    image sizes; (g) `mkimage --cache DIR` when DIR already holds the image (a hard link \
    on this filesystem). mkimage runs on all CPUs (`--threads` default). erofs-utils 1.5. \
    Targets: (c) at least 2× faster than (a) and within 1.3× of (d), over 100× faster \
    than (e); (f) at least 1.5× faster than mkfs.erofs with an image at most 1.05× its \
    size; (g) under 50 ms.";

/// What the section needs from the bench.
pub struct Inputs<'a> {
    pub built: &'a Built,
    pub closure_file: &'a Path,
    pub daemon: &'a Path,
    pub mkimage: &'a Path,
    pub scratch: &'a Path,
    pub runs: usize,
    pub regex: bool,
}

fn sample(id: Id, label: &str, unit: &'static str) -> Measurement {
    Measurement {
        id,
        label: label.to_string(),
        unit,
        better: Better::Lower,
        samples: Vec::new(),
        params: serde_json::json!({}),
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Runs `cmd` to success within the time limit, its output discarded.
fn run_ok(cmd: &mut Command) -> Result<(), String> {
    cmd.stdin(Stdio::null()).stdout(Stdio::null());
    let shown = format!("{cmd:?}");
    match status_within(cmd, TIMEOUT)? {
        s if s.success() => Ok(()),
        s => Err(format!("{shown}: {s}")),
    }
}

fn syncfs(dir: &Path) -> Result<(), String> {
    let d = fs::File::open(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    rustix::fs::syncfs(&d).map_err(|e| format!("syncfs {}: {e}", dir.display()))
}

fn fresh_dir(dir: &Path) -> Result<(), String> {
    if dir.exists() {
        fs::remove_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))
}

fn remove(path: &Path) {
    let _ = fs::remove_file(path);
}

/// `cp -a` of the closure's store paths into `dest`.
fn copy_closure(paths: &[PathBuf], dest: &Path) -> Result<(), String> {
    fresh_dir(dest)?;
    run_ok(Command::new("cp").arg("-a").args(paths).arg(dest))
}

fn mkfs(source: &Path, out: &Path, extra: &[&str]) -> Result<(), String> {
    run_ok(
        Command::new("mkfs.erofs")
            .args([
                "-T0",
                "--ignore-mtime",
                "--all-root",
                "-x-1",
                "-U",
                UUID,
                "--quiet",
            ])
            .args(extra)
            .arg(out)
            .arg(source),
    )
}

fn mkimage(
    inp: &Inputs,
    store: &Path,
    closure: &Path,
    out: &Path,
    extra: &[&str],
) -> Result<(), String> {
    run_ok(
        Command::new(inp.mkimage)
            .arg("--store-dir")
            .arg(store)
            .args(["-q", "-U", UUID])
            .args(extra)
            .arg(closure)
            .arg(out)
            .env_remove("NIXSTOREFS_IMAGE_CACHE"),
    )
}

fn read_closure(file: &Path) -> Result<Vec<PathBuf>, String> {
    let text = fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))?;
    Ok(text
        .lines()
        .filter(|l| !l.is_empty())
        .map(PathBuf::from)
        .collect())
}

pub fn run(inp: &Inputs, r: &mut Results) -> Result<(), String> {
    let store = &inp.built.host.store_dir;
    let paths = read_closure(inp.closure_file)?;
    let work = inp.scratch.join("image-work");
    fresh_dir(&work)?;
    let (zstore, zclosure) = compressible_copy(inp.scratch, &paths)
        .map_err(|e| format!("the compressible copy of the closure: {e}"))?;
    let zpaths = read_closure(&zclosure)?;
    let regex = if inp.regex {
        Some(exclusion_regex(&paths))
    } else {
        None
    };
    let cache = work.join("cache");
    let img = work.join("out.img");
    let copy = work.join("copy");
    // The cache entry for (g), written once before the runs.
    mkimage(
        inp,
        store,
        inp.closure_file,
        &img,
        &["--cache", cache.to_str().unwrap()],
    )?;
    remove(&img);

    let mut m_a = sample(
        Id::ImageTime(ImageRun::CopyMkfs),
        "cp -a + mkfs.erofs",
        "ms",
    );
    let mut m_b = sample(
        Id::ImageTime(ImageRun::MkfsMount),
        "mkfs.erofs over a nixstorefs mount",
        "ms",
    );
    let mut m_c = sample(Id::ImageTime(ImageRun::Mkimage), "mkimage", "ms");
    let mut m_d = sample(Id::ImageTime(ImageRun::Copy), "cp -a (floor)", "ms");
    let mut m_e = sample(
        Id::ImageTime(ImageRun::MkfsRegex),
        "mkfs.erofs of the whole store, exclusion regex",
        "ms",
    );
    let mut m_fz = sample(
        Id::ImageTime(ImageRun::MkimageLz4hc),
        "mkimage -z lz4hc",
        "ms",
    );
    let mut m_fm = sample(
        Id::ImageTime(ImageRun::CopyMkfsLz4hc),
        "cp -a + mkfs.erofs -zlz4hc",
        "ms",
    );
    let mut s_fz = sample(
        Id::ImageSize(ImageOutput::MkimageLz4hc),
        "image size, mkimage -z lz4hc",
        "MiB",
    );
    let mut s_fm = sample(
        Id::ImageSize(ImageOutput::MkfsLz4hc),
        "image size, mkfs.erofs -zlz4hc",
        "MiB",
    );
    let mut s_c = sample(
        Id::ImageSize(ImageOutput::Mkimage),
        "image size, mkimage",
        "MiB",
    );
    let mut s_a = sample(
        Id::ImageSize(ImageOutput::Mkfs),
        "image size, mkfs.erofs",
        "MiB",
    );
    let mut m_g = sample(
        Id::ImageTime(ImageRun::CacheHit),
        "mkimage --cache, a hit",
        "ms",
    );
    let size = |p: &Path| -> Result<f64, String> {
        Ok(fs::metadata(p)
            .map_err(|e| format!("{}: {e}", p.display()))?
            .len() as f64
            / f64::from(1 << 20))
    };
    let timed = |f: &mut dyn FnMut() -> Result<(), String>| -> Result<f64, String> {
        let t = Instant::now();
        f()?;
        syncfs(&work)?;
        Ok(ms(t.elapsed()))
    };
    let settle = |p: &[&Path]| -> Result<(), String> {
        for p in p {
            if p.is_dir() {
                fs::remove_dir_all(p).map_err(|e| format!("{}: {e}", p.display()))?;
            } else {
                remove(p);
            }
        }
        syncfs(&work)
    };
    for run in 1..=inp.runs {
        m_d.samples
            .push(timed(&mut || copy_closure(&paths, &copy))?);
        settle(&[&copy])?;

        m_a.samples.push(timed(&mut || {
            copy_closure(&paths, &copy)?;
            mkfs(&copy, &img, &[])
        })?);
        s_a.samples.push(size(&img)?);
        settle(&[&copy, &img])?;

        m_b.samples.push(timed(&mut || {
            let (m, _) = FuseMount::nixstorefs(inp.daemon, store, inp.closure_file, &[])?;
            let made = mkfs(m.path(), &img, &[]);
            m.unmount()?;
            made
        })?);
        settle(&[&img])?;

        m_c.samples.push(timed(&mut || {
            mkimage(inp, store, inp.closure_file, &img, &[])
        })?);
        s_c.samples.push(size(&img)?);
        settle(&[&img])?;

        if let Some(regex) = &regex {
            let args: Vec<String> = regex
                .iter()
                .map(|r| format!("--exclude-regex={r}"))
                .collect();
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            m_e.samples.push(timed(&mut || mkfs(store, &img, &args))?);
            if run == 1 {
                let m = nixstorefs_tests::harness::ImageMount::new(&img);
                let names = nixstorefs_tests::compare::root_names(m.path());
                let want: Vec<String> = paths
                    .iter()
                    .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
                    .collect();
                let mut want = want;
                want.sort();
                if names != want {
                    return Err(format!(
                        "the exclusion regex kept {} top-level entries, the closure has {}",
                        names.len(),
                        want.len()
                    ));
                }
            }
            settle(&[&img])?;
        }

        m_fm.samples.push(timed(&mut || {
            copy_closure(&zpaths, &copy)?;
            mkfs(&copy, &img, &["-zlz4hc"])
        })?);
        s_fm.samples.push(size(&img)?);
        settle(&[&copy, &img])?;

        m_fz.samples.push(timed(&mut || {
            mkimage(inp, &zstore, &zclosure, &img, &["-z", "lz4hc"])
        })?);
        s_fz.samples.push(size(&img)?);
        settle(&[&img])?;

        m_g.samples.push(timed(&mut || {
            mkimage(
                inp,
                store,
                inp.closure_file,
                &img,
                &["--cache", cache.to_str().unwrap()],
            )
        })?);
        settle(&[&img])?;
        eprintln!("bench: [image] run {run}/{} done", inp.runs);
    }
    for m in [m_a, m_b, m_c, m_d, m_fm, m_fz, s_a, s_c, s_fm, s_fz, m_g] {
        r.add(m);
    }
    if inp.regex {
        r.add(m_e);
    }
    r.ratio(
        "(a) cp + mkfs.erofs / mkimage",
        Id::ImageTime(ImageRun::CopyMkfs),
        Id::ImageTime(ImageRun::Mkimage),
        Some(Target::AtLeast(2.0)),
    );
    r.ratio(
        "(b) mkfs.erofs over a mount / mkimage",
        Id::ImageTime(ImageRun::MkfsMount),
        Id::ImageTime(ImageRun::Mkimage),
        None,
    );
    r.ratio(
        "(c) mkimage / (d) cp -a",
        Id::ImageTime(ImageRun::Mkimage),
        Id::ImageTime(ImageRun::Copy),
        Some(Target::AtMost(1.3)),
    );
    // (e) is measured only when asked for; without it there is nothing to check.
    if inp.regex {
        r.ratio(
            "(e) regex mkfs.erofs / mkimage",
            Id::ImageTime(ImageRun::MkfsRegex),
            Id::ImageTime(ImageRun::Mkimage),
            Some(Target::AtLeast(100.0)),
        );
    }
    r.ratio(
        "(f) cp + mkfs.erofs -zlz4hc / mkimage -z lz4hc",
        Id::ImageTime(ImageRun::CopyMkfsLz4hc),
        Id::ImageTime(ImageRun::MkimageLz4hc),
        Some(Target::AtLeast(1.5)),
    );
    r.ratio(
        "(f) image size, mkimage -z lz4hc / mkfs.erofs -zlz4hc",
        Id::ImageSize(ImageOutput::MkimageLz4hc),
        Id::ImageSize(ImageOutput::MkfsLz4hc),
        Some(Target::AtMost(1.05)),
    );
    r.ratio(
        "image size, mkimage / mkfs.erofs",
        Id::ImageSize(ImageOutput::Mkimage),
        Id::ImageSize(ImageOutput::Mkfs),
        None,
    );
    r.absolute(
        "(g) a cache hit",
        Id::ImageTime(ImageRun::CacheHit),
        Target::Below(50.0),
    );
    if !inp.regex {
        r.note(
            Section::Image,
            "(e) was left out of this run (`--image-regex`).",
        );
    }
    let _ = fs::remove_dir_all(&work);
    Ok(())
}

/// nixpkgs' old way to image one closure: mkfs.erofs over the whole store, with a regex
/// that excludes every top-level name not starting with the first 10 characters of a
/// closure path's name. POSIX regexes have no negation, so the regex walks a trie of
/// those prefixes: at each node, a name goes if its next character is none of the
/// node's children (store names are longer than 10 characters, so none ends inside).
///
/// For 2,500 paths that is about 200 KB, more than one argument may hold (128 KiB), so
/// it comes as several regexes of at most [`REGEX_CHUNK`] bytes, one `--exclude-regex`
/// each, which mkfs.erofs applies all.
pub fn exclusion_regex(paths: &[PathBuf]) -> Vec<String> {
    use std::collections::BTreeMap;
    #[derive(Default)]
    struct Node(BTreeMap<u8, Node>);
    let mut root = Node::default();
    for p in paths {
        let name = p
            .file_name()
            .map(|n| n.as_encoded_bytes())
            .unwrap_or_default();
        let mut node = &mut root;
        for &c in name.iter().take(10) {
            node = node.0.entry(c).or_default();
        }
    }
    fn walk(node: &Node, prefix: &mut Vec<u8>, out: &mut Vec<String>) {
        if node.0.is_empty() {
            return;
        }
        let set: String = node.0.keys().map(|&c| c as char).collect();
        let prefix_text = String::from_utf8_lossy(prefix).into_owned();
        out.push(format!("{prefix_text}[^{set}]"));
        for (&c, child) in &node.0 {
            prefix.push(c);
            walk(child, prefix, out);
            prefix.pop();
        }
    }
    let mut alternatives = Vec::new();
    walk(&root, &mut Vec::new(), &mut alternatives);
    let mut regexes = Vec::new();
    let mut current: Vec<String> = Vec::new();
    let mut len = 0;
    for alt in alternatives {
        if len + alt.len() + 1 > REGEX_CHUNK && !current.is_empty() {
            regexes.push(format!("^({})", current.join("|")));
            current.clear();
            len = 0;
        }
        len += alt.len() + 1;
        current.push(alt);
    }
    if !current.is_empty() {
        regexes.push(format!("^({})", current.join("|")));
    }
    regexes
}

/// Longest regex given in one argument.
const REGEX_CHUNK: usize = 100_000;

/// A copy of the closure with the same tree, sizes and modes, whose files are text-like
/// (three in four) or pseudo-random, under `scratch/image-compressible-DIGEST` (of the
/// closure); reused when complete. Returns its store directory and closure file.
fn compressible_copy(scratch: &Path, paths: &[PathBuf]) -> io::Result<(PathBuf, PathBuf)> {
    use sha2::{Digest, Sha256};
    let names: String = paths.iter().map(|p| format!("{}\n", p.display())).collect();
    let digest = nixstorefs_tests::sample::hex(&Sha256::digest(names.as_bytes()));
    let root = scratch.join(format!("image-compressible-{}", &digest[..16]));
    let zstore = root.join("store");
    let zclosure = root.join("closure.txt");
    let marker = root.join("complete");
    let listing: String = paths
        .iter()
        .map(|p| format!("{}\n", zstore.join(p.file_name().unwrap()).display()))
        .collect();
    if fs::read_to_string(&marker).ok().as_deref() == Some(listing.as_str()) {
        return Ok((zstore, zclosure));
    }
    if root.exists() {
        fs::remove_dir_all(&root)?;
    }
    fs::create_dir_all(&zstore)?;
    eprintln!("bench: [image] writing a compressible copy of the closure");
    let mut rng = PseudoRandom::new("image-compressible");
    let text = text_pool(&mut rng);
    let mut count = 0u64;
    for p in paths {
        let dest = zstore.join(p.file_name().unwrap());
        copy_tree(p, &dest, &mut rng, &text, &mut count)?;
    }
    fs::write(&zclosure, &listing)?;
    fs::write(&marker, &listing)?;
    Ok((zstore, zclosure))
}

/// 4 MiB of text-like bytes: lines of words from a vocabulary of a few thousand, which
/// LZ4 compresses about as much as source code or documentation.
fn text_pool(rng: &mut PseudoRandom) -> Vec<u8> {
    let letters = b"etaoinshrdlucmfwypvbgkjqxz_/.-0123456789";
    let words: Vec<Vec<u8>> = (0..4000)
        .map(|_| {
            let len = 2 + rng.below(9) as usize;
            (0..len)
                .map(|_| letters[(rng.below(20) + rng.below(20)) as usize % letters.len()])
                .collect()
        })
        .collect();
    let mut out = Vec::with_capacity(4 << 20);
    while out.len() < 4 << 20 {
        // Zipf-like: frequent words are short ones near the start.
        let i = (rng.below(64) * rng.below(64)) as usize % words.len();
        out.extend_from_slice(&words[i]);
        out.push(if rng.below(12) == 0 { b'\n' } else { b' ' });
    }
    out
}

fn copy_tree(
    src: &Path,
    dest: &Path,
    rng: &mut PseudoRandom,
    text: &[u8],
    count: &mut u64,
) -> io::Result<()> {
    let meta = fs::symlink_metadata(src)?;
    let ft = meta.file_type();
    if ft.is_symlink() {
        symlink(fs::read_link(src)?, dest)?;
    } else if ft.is_dir() {
        fs::create_dir(dest)?;
        let mut names: Vec<_> = fs::read_dir(src)?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<io::Result<_>>()?;
        names.sort();
        for name in names {
            copy_tree(&src.join(&name), &dest.join(&name), rng, text, count)?;
        }
        fs::set_permissions(dest, fs::Permissions::from_mode(meta.mode() & 0o7777))?;
    } else if ft.is_file() {
        *count += 1;
        let len = meta.len() as usize;
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(meta.mode() & 0o7777)
            .open(dest)?;
        let mut left = len;
        let mut buf = vec![0u8; 1 << 20];
        let random = *count % 4 == 3;
        while left > 0 {
            let n = left.min(buf.len());
            if random {
                rng.fill(&mut buf[..n]);
            } else {
                let at = rng.below((text.len() - n) as u64) as usize;
                buf[..n].copy_from_slice(&text[at..at + n]);
            }
            f.write_all(&buf[..n])?;
            left -= n;
        }
    }
    Ok(())
}
