//! A generator of a small but realistic Nix store, for exercising nixstorefs.
//!
//! The store holds a closure (what the mount must show) and noise next to it (what the
//! mount must hide). Everything is deterministic: the same options give the same names,
//! the same bytes, the same modes and mtimes, so a failing run can be rebuilt and looked at
//! with `make-sample-store`.

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// The characters of Nix's base-32 encoding (no `e`, `o`, `t`, `u`).
pub const NIX_BASE32: &[u8; 32] = b"0123456789abcdfghijklmnpqrsvwxyz";

/// What to put in the sample store.
#[derive(Clone, Debug)]
pub struct SampleOptions {
    /// Size of the big pseudo-random file, in MiB.
    pub big_file_mib: u64,
    /// Number of entries in the wide directory.
    pub wide_dir_entries: usize,
    /// Number of nested directories in the deep store path.
    pub depth: usize,
}

impl Default for SampleOptions {
    fn default() -> Self {
        SampleOptions {
            big_file_mib: 64,
            wide_dir_entries: 5000,
            depth: 40,
        }
    }
}

impl SampleOptions {
    /// Options for tests that need the shape of the store but not its bulk.
    pub fn small() -> Self {
        SampleOptions {
            big_file_mib: 1,
            wide_dir_entries: 300,
            depth: 40,
        }
    }
}

/// A sample store written by [`build`].
///
/// Paths called "relative" are relative to [`SampleStore::store_dir`], so that they can be
/// joined onto a mountpoint as well as onto the host store.
#[derive(Clone, Debug)]
pub struct SampleStore {
    /// The directory given to [`build`].
    pub dir: PathBuf,
    /// The store directory (`<dir>/store`), to pass as `--store-dir`.
    pub store_dir: PathBuf,
    /// A store-paths list of the closure (`<dir>/closure.txt`), with full paths.
    pub closure_file: PathBuf,
    /// Base names of the closure's store paths, sorted.
    pub closure: Vec<String>,
    /// Names present in `store_dir` that the mount must not show.
    pub noise: Vec<String>,
    /// References of each closure path (base names), for registrations.
    pub references: BTreeMap<String, Vec<String>>,
    /// Deriver (full path) of the closure paths that have one.
    pub derivers: BTreeMap<String, PathBuf>,
    /// Relative path of the big pseudo-random file.
    pub big_file: PathBuf,
    /// Relative paths, in two different closure paths, of one hard-linked file.
    pub hard_links: [PathBuf; 2],
    /// Relative path of the `.links` entry that shares the inode of `hard_links`.
    pub links_entry: PathBuf,
    /// Base name of the store path that is a single regular file.
    pub single_file: String,
    /// Base name of the store path that is a symlink to another closure path.
    pub symlink_path: String,
    /// Relative path of the wide directory.
    pub wide_dir: PathBuf,
    /// Relative path of the file at the bottom of the deep nesting.
    pub deep_file: PathBuf,
    /// Relative path of the directory holding the odd names.
    pub odd_dir: PathBuf,
    /// Relative paths of directories that tests may swap for symlinks on the host.
    pub replaceable_dirs: Vec<PathBuf>,
    /// Relative path of the secret file in a non-closure store path.
    pub secret: PathBuf,
    /// Relative paths of assorted small regular files inside the closure.
    pub small_files: Vec<PathBuf>,
}

impl SampleStore {
    /// The host path of a path relative to the store directory.
    pub fn host(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.store_dir.join(rel)
    }

    /// The base name of the closure path whose name (after the hash) is `name`.
    ///
    /// Panics if there is none: tests use it with names they know exist.
    pub fn path_named(&self, name: &str) -> &str {
        self.closure
            .iter()
            .find(|b| &b[33..] == name)
            .unwrap_or_else(|| panic!("the sample closure has no path named {name:?}"))
    }

    /// Full host paths of the closure, sorted.
    pub fn closure_paths(&self) -> Vec<PathBuf> {
        self.closure
            .iter()
            .map(|b| self.store_dir.join(b))
            .collect()
    }

    /// The store-paths list of the closure, as written to `closure_file`.
    pub fn store_paths_text(&self) -> String {
        let mut s = String::new();
        for p in self.closure_paths() {
            s.push_str(p.to_str().expect("sample paths are UTF-8"));
            s.push('\n');
        }
        s
    }

    /// Writes a registration (`nix-store --dump-db` format) of the closure to `out`.
    ///
    /// NAR hashes and sizes are computed from the store's current content; with
    /// `sha256_prefix` the hashes are written as `sha256:<hex>`, as closureInfo does.
    pub fn write_registration(&self, out: &Path, sha256_prefix: bool) -> io::Result<()> {
        let mut w = BufWriter::new(File::create(out)?);
        for base in &self.closure {
            let full = self.store_dir.join(base);
            let (hash, size) = nar_hash(&full)?;
            writeln!(w, "{}", full.display())?;
            let prefix = if sha256_prefix { "sha256:" } else { "" };
            writeln!(w, "{prefix}{}", hex(&hash))?;
            writeln!(w, "{size}")?;
            match self.derivers.get(base) {
                Some(d) => writeln!(w, "{}", d.display())?,
                None => writeln!(w)?,
            }
            let refs = self.references.get(base).map(Vec::as_slice).unwrap_or(&[]);
            writeln!(w, "{}", refs.len())?;
            for r in refs {
                writeln!(w, "{}", self.store_dir.join(r).display())?;
            }
        }
        w.into_inner().map_err(|e| e.into_error())?.sync_all()
    }

    /// Writes a closureInfo directory (`store-paths`, `registration`, `total-nar-size`)
    /// at `dir`, which must not exist yet.
    pub fn write_closure_info(&self, dir: &Path) -> io::Result<()> {
        fs::create_dir(dir)?;
        fs::write(dir.join("store-paths"), self.store_paths_text())?;
        self.write_registration(&dir.join("registration"), true)?;
        let mut total = 0;
        for p in self.closure_paths() {
            total += nar_hash(&p)?.1;
        }
        fs::write(dir.join("total-nar-size"), format!("{total}\n"))
    }
}

/// Encodes bytes the way Nix prints hashes in store paths and `.links` names.
pub fn nix_base32(bytes: &[u8]) -> String {
    if bytes.is_empty() {
        return String::new();
    }
    let len = (bytes.len() * 8 - 1) / 5 + 1;
    let mut out = String::with_capacity(len);
    // Nix writes the most significant 5-bit group first, reading bits from the end.
    for n in (0..len).rev() {
        let b = n * 5;
        let (i, j) = (b / 8, b % 8);
        let lo = bytes[i] >> j;
        let hi = if i + 1 < bytes.len() && j > 0 {
            bytes[i + 1] << (8 - j)
        } else {
            0
        };
        out.push(NIX_BASE32[((lo | hi) & 0x1f) as usize] as char);
    }
    out
}

/// The 32-character store hash the sample uses for `name` (salted with `salt`).
pub fn store_hash(salt: &str, name: &str) -> String {
    let digest = Sha256::digest(format!("nixstorefs-sample:{salt}:{name}").as_bytes());
    // Nix folds its digests to 160 bits for store paths; do the same for realism.
    let mut folded = [0u8; 20];
    for (i, b) in digest.iter().enumerate() {
        folded[i % 20] ^= b;
    }
    nix_base32(&folded)
}

/// The store path base name (`<hash>-<name>`) the sample uses for `name`.
pub fn base_name(name: &str) -> String {
    format!("{}-{name}", store_hash("", name))
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A fast deterministic byte generator (xorshift64*), for file contents.
#[derive(Clone, Debug)]
pub struct PseudoRandom(u64);

impl PseudoRandom {
    /// A generator seeded from `seed`; every seed gives a usable, distinct sequence.
    pub fn new(seed: &str) -> Self {
        let d = Sha256::digest(seed.as_bytes());
        let s = u64::from_le_bytes(d[..8].try_into().unwrap());
        PseudoRandom(s | 1)
    }

    /// Fills `buf` with the next bytes of the sequence.
    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut chunks = buf.chunks_exact_mut(8);
        for c in &mut chunks {
            c.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        let rest = chunks.into_remainder();
        if !rest.is_empty() {
            let v = self.next_u64().to_le_bytes();
            rest.copy_from_slice(&v[..rest.len()]);
        }
    }

    /// `len` text-like bytes (words of a small vocabulary), which LZ4 shrinks as it does
    /// real files.
    pub fn text(&mut self, len: usize) -> Vec<u8> {
        const WORDS: [&[u8]; 8] = [
            b"store ",
            b"closure ",
            b"/nix/",
            b"erofs\n",
            b"lib",
            b"0123",
            b"\t",
            b"path ",
        ];
        let mut out = Vec::with_capacity(len + 8);
        while out.len() < len {
            out.extend_from_slice(WORDS[self.below(8) as usize]);
        }
        out.truncate(len);
        out
    }

    /// The next 64 bits of the sequence.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number in `0..n` (n > 0); slightly biased, which does not matter for test data.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// `len` bytes of the sequence seeded from `seed`.
    pub fn bytes(seed: &str, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        PseudoRandom::new(seed).fill(&mut v);
        v
    }
}

/// A sample store in a fresh temporary directory under /tmp, removed when the returned
/// guard drops (declare it first, so the store outlives what uses it).
pub fn temp(opts: &SampleOptions) -> (tempfile::TempDir, SampleStore) {
    let dir = tempfile::Builder::new()
        .prefix("nixstorefs-sample.")
        .tempdir_in("/tmp")
        .expect("create a sample directory");
    let s = build(dir.path(), opts).expect("build the sample store");
    (dir, s)
}

/// The SHA-256 of the NAR serialisation of `path`, and the NAR's size.
pub fn nar_hash(path: &Path) -> io::Result<([u8; 32], u64)> {
    let mut nar = NarWriter {
        hasher: Sha256::new(),
        size: 0,
    };
    nar.str(b"nix-archive-1");
    nar.dump(path)?;
    Ok((nar.hasher.finalize().into(), nar.size))
}

struct NarWriter {
    hasher: Sha256,
    size: u64,
}

impl NarWriter {
    fn raw(&mut self, b: &[u8]) {
        self.hasher.update(b);
        self.size += b.len() as u64;
    }

    fn pad(&mut self, len: u64) {
        let pad = (8 - len % 8) % 8;
        self.raw(&[0u8; 8][..pad as usize]);
    }

    fn str(&mut self, s: &[u8]) {
        self.raw(&(s.len() as u64).to_le_bytes());
        self.raw(s);
        self.pad(s.len() as u64);
    }

    fn dump(&mut self, path: &Path) -> io::Result<()> {
        let meta = fs::symlink_metadata(path)?;
        self.str(b"(");
        self.str(b"type");
        let ft = meta.file_type();
        if ft.is_symlink() {
            self.str(b"symlink");
            self.str(b"target");
            self.str(fs::read_link(path)?.as_os_str().as_bytes());
        } else if ft.is_dir() {
            self.str(b"directory");
            let mut names: Vec<OsString> = fs::read_dir(path)?
                .map(|e| e.map(|e| e.file_name()))
                .collect::<io::Result<_>>()?;
            names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
            for name in names {
                self.str(b"entry");
                self.str(b"(");
                self.str(b"name");
                self.str(name.as_bytes());
                self.str(b"node");
                self.dump(&path.join(&name))?;
                self.str(b")");
            }
        } else if ft.is_file() {
            self.str(b"regular");
            if meta.permissions().mode() & 0o100 != 0 {
                self.str(b"executable");
                self.str(b"");
            }
            self.str(b"contents");
            self.raw(&meta.len().to_le_bytes());
            let mut f = File::open(path)?;
            let mut buf = vec![0u8; 1 << 20];
            let mut total = 0u64;
            loop {
                let n = f.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                self.raw(&buf[..n]);
                total += n as u64;
            }
            if total != meta.len() {
                return Err(io::Error::other(format!(
                    "{} changed size while being hashed",
                    path.display()
                )));
            }
            self.pad(total);
        } else {
            return Err(io::Error::other(format!(
                "{} is neither a file, a directory nor a symlink",
                path.display()
            )));
        }
        self.str(b")");
        Ok(())
    }
}

/// Writes files with Nix's canonical modes and remembers nothing else: modes of
/// directories and all mtimes are fixed in one pass at the end.
struct Writer {
    store: PathBuf,
}

impl Writer {
    fn path(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.store.join(rel)
    }

    fn dir(&self, rel: impl AsRef<Path>) -> io::Result<PathBuf> {
        let p = self.path(rel);
        fs::create_dir_all(&p)?;
        Ok(p)
    }

    fn file(&self, rel: impl AsRef<Path>, contents: &[u8], exec: bool) -> io::Result<PathBuf> {
        let p = self.path(rel);
        if let Some(parent) = p.parent() {
            fs::create_dir_all(parent)?;
        }
        fs::write(&p, contents)?;
        let mode = if exec { 0o555 } else { 0o444 };
        fs::set_permissions(&p, fs::Permissions::from_mode(mode))?;
        Ok(p)
    }

    fn link(&self, target: impl AsRef<OsStr>, rel: impl AsRef<Path>) -> io::Result<PathBuf> {
        let p = self.path(rel);
        if let Some(parent) = p.parent() {
            fs::create_dir_all(parent)?;
        }
        symlink(Path::new(target.as_ref()), &p)?;
        Ok(p)
    }

    fn big(&self, rel: impl AsRef<Path>, mib: u64) -> io::Result<PathBuf> {
        let p = self.path(rel);
        let mut f = File::create(&p)?;
        let mut rng = PseudoRandom::new("big-file");
        let mut buf = vec![0u8; 1 << 20];
        for _ in 0..mib {
            rng.fill(&mut buf);
            f.write_all(&buf)?;
        }
        drop(f);
        fs::set_permissions(&p, fs::Permissions::from_mode(0o444))?;
        Ok(p)
    }
}

/// Makes directories 0555 and sets every mtime (and atime) to 1, children before parents
/// so that filling a directory does not bump its mtime afterwards.
fn canonicalise(path: &Path) -> io::Result<()> {
    let meta = fs::symlink_metadata(path)?;
    if meta.is_dir() {
        for e in fs::read_dir(path)? {
            canonicalise(&e?.path())?;
        }
        fs::set_permissions(path, fs::Permissions::from_mode(0o555))?;
    }
    let one = rustix::fs::Timespec {
        tv_sec: 1,
        tv_nsec: 0,
    };
    rustix::fs::utimensat(
        rustix::fs::CWD,
        path,
        &rustix::fs::Timestamps {
            last_access: one,
            last_modification: one,
        },
        rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
    )?;
    Ok(())
}

/// Builds the sample store in `dir` (created if missing; `dir/store` and
/// `dir/closure.txt` must not exist yet).
pub fn build(dir: &Path, opts: &SampleOptions) -> io::Result<SampleStore> {
    fs::create_dir_all(dir)?;
    let dir = dir.canonicalize()?;
    let store_dir = dir.join("store");
    fs::create_dir(&store_dir)?;
    let closure_file = dir.join("closure.txt");
    if closure_file.symlink_metadata().is_ok() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} already exists", closure_file.display()),
        ));
    }
    let w = Writer {
        store: store_dir.clone(),
    };
    let sd = store_dir.to_str().ok_or_else(|| {
        io::Error::new(io::ErrorKind::InvalidInput, "the sample dir must be UTF-8")
    })?;

    let glibc = base_name("glibc-2.40");
    let bash = base_name("bash-5.2");
    let hello = base_name("hello-2.12");
    let odd = base_name("odd-names");
    let deep = base_name("deep");
    let single = base_name("builder.sh");
    let link_path = base_name("hello-link");
    let empty = base_name("empty");
    let hidden = base_name("hidden-target");
    let secret_path = base_name("secret-keys");
    let hello_drv = base_name("hello-2.12.drv");

    // glibc: shared objects, the big locale archive, headers, an empty directory.
    w.file(
        format!("{glibc}/lib/libc.so.6"),
        &PseudoRandom::bytes("libc", 200_003),
        true,
    )?;
    w.file(
        format!("{glibc}/lib/libm.so.6"),
        &PseudoRandom::bytes("libm", 51_200),
        true,
    )?;
    w.file(
        format!("{glibc}/lib/ld-linux-x86-64.so.2"),
        &PseudoRandom::bytes("ld", 20_480),
        true,
    )?;
    w.link("libc.so.6", format!("{glibc}/lib/libc.so"))?;
    w.link("libm.so.6", format!("{glibc}/lib/libm.so"))?;
    w.dir(format!("{glibc}/lib/locale"))?;
    let big_rel = PathBuf::from(format!("{glibc}/lib/locale/locale-archive"));
    w.big(&big_rel, opts.big_file_mib)?;
    w.file(
        format!("{glibc}/include/sys/stat.h"),
        b"#ifndef _SYS_STAT_H\n#define _SYS_STAT_H 1\n#endif\n",
        false,
    )?;
    w.file(
        format!("{glibc}/include/bits/types/struct_timespec.h"),
        b"struct timespec { long tv_sec; long tv_nsec; };\n",
        false,
    )?;
    w.file(
        format!("{glibc}/share/i18n/charmaps/UTF-8.gz"),
        &PseudoRandom::bytes("charmap", 4_099),
        false,
    )?;
    w.file(
        format!("{glibc}/bin/ldd"),
        b"#!/bin/sh\n# print shared object dependencies\nexec true\n",
        true,
    )?;
    w.dir(format!("{glibc}/etc"))?;

    // bash: executables, a relative and an absolute symlink into another closure path.
    w.file(
        format!("{bash}/bin/bash"),
        &PseudoRandom::bytes("bash", 100_001),
        true,
    )?;
    w.link("bash", format!("{bash}/bin/sh"))?;
    w.link(format!("{sd}/{glibc}/lib"), format!("{bash}/lib"))?;
    w.link("/etc/profile", format!("{bash}/etc/profile"))?;
    w.file(
        format!("{bash}/share/man/man1/bash.1.gz"),
        &PseudoRandom::bytes("bash.1", 9_000),
        false,
    )?;

    // The same file in glibc and bash, hard-linked as `nix-store --optimise` leaves it.
    let copying = b"GNU GENERAL PUBLIC LICENSE\nVersion 3, 29 June 2007\n".repeat(40);
    let hard_a = PathBuf::from(format!("{glibc}/share/doc/glibc/COPYING"));
    let hard_b = PathBuf::from(format!("{bash}/share/doc/bash/COPYING"));
    w.file(&hard_a, &copying, false)?;
    w.dir(format!("{bash}/share/doc/bash"))?;
    fs::hard_link(w.path(&hard_a), w.path(&hard_b))?;
    w.dir(".links")?;
    let links_entry = PathBuf::from(format!(".links/{}", nix_base32(&Sha256::digest(&copying))));
    fs::hard_link(w.path(&hard_a), w.path(&links_entry))?;

    // hello: the usual layout, symlinks of every kind, and the wide directory.
    // A real program (a script for the host's /bin/sh), so the demo can run it from the mount.
    w.file(
        format!("{hello}/bin/hello"),
        b"#!/bin/sh\necho 'Hello, world!'\n",
        true,
    )?;
    w.link("hello", format!("{hello}/bin/greet"))?;
    w.file(
        format!("{hello}/share/man/man1/hello.1.gz"),
        &PseudoRandom::bytes("hello.1", 1_234),
        false,
    )?;
    w.file(
        format!("{hello}/share/info/hello.info"),
        b"This is hello.info, produced by makeinfo.\n",
        false,
    )?;
    for lang in ["de", "fr", "ja", "pt_BR", "zh_CN"] {
        w.file(
            format!("{hello}/share/locale/{lang}/LC_MESSAGES/hello.mo"),
            &PseudoRandom::bytes(lang, 700),
            false,
        )?;
    }
    w.file(
        format!("{hello}/share/doc/hello/README"),
        b"GNU Hello prints a friendly greeting.\n",
        false,
    )?;
    w.file(
        format!("{hello}/share/doc/hello/NEWS"),
        b"* Noteworthy changes in release 2.12\n",
        false,
    )?;
    w.file(
        format!("{hello}/share/emacs/site-lisp/hello.el"),
        b"(provide 'hello)\n",
        false,
    )?;
    w.file(
        format!("{hello}/nix-support/propagated-build-inputs"),
        format!("{sd}/{glibc}\n").as_bytes(),
        false,
    )?;
    w.link("/etc/passwd", format!("{hello}/passwd"))?;
    w.link("/", format!("{hello}/root"))?;
    w.link(
        format!("{sd}/{glibc}/lib/libc.so.6"),
        format!("{hello}/libc"),
    )?;
    w.link("../does-not-exist", format!("{hello}/dangling"))?;
    w.link("../../../../../../etc/shadow", format!("{hello}/escape"))?;
    w.link(".", format!("{hello}/self"))?;
    let wide_rel = PathBuf::from(format!("{hello}/share/wide"));
    w.dir(&wide_rel)?;
    for i in 0..opts.wide_dir_entries {
        let p = w.path(wide_rel.join(format!("entry-{i:05}")));
        // Mostly empty files, with a few of other kinds so that readdir types matter.
        match i % 97 {
            1 => fs::create_dir(&p)?,
            2 => symlink(format!("entry-{:05}", i - 2), &p)?,
            3 => {
                fs::write(&p, format!("{i}\n"))?;
                fs::set_permissions(&p, fs::Permissions::from_mode(0o444))?;
            }
            _ => {
                File::create(&p)?;
                fs::set_permissions(&p, fs::Permissions::from_mode(0o444))?;
            }
        }
    }

    // odd-names: names that break careless encoders, parsers and buffers.
    let odd_names: Vec<OsString> = vec![
        "with space".into(),
        "  leading spaces".into(),
        "trailing space ".into(),
        "ünïcødé ☃".into(),
        "new\nline".into(),
        "tab\there".into(),
        "back\\slash".into(),
        "quote\"s'".into(),
        "glob*?[x]".into(),
        "#hash%percent&amp".into(),
        "-dash-first".into(),
        ".hidden".into(),
        "..dotdot".into(),
        "...".into(),
        OsString::from_vec(b"latin1-\xe9t\xe9".to_vec()),
        "x".repeat(255).into(),
        format!("{}x", "é".repeat(127)).into(),
    ];
    for (i, name) in odd_names.iter().enumerate() {
        let rel = Path::new(&odd).join(name);
        w.file(rel, format!("odd file {i}\n").as_bytes(), i % 3 == 0)?;
    }
    w.file(format!("{odd}/empty"), b"", false)?;
    w.file(format!("{odd}/empty-executable"), b"", true)?;
    w.dir(format!("{odd}/empty-dir"))?;
    w.file(
        format!("{odd}/a b/c d/e f.txt"),
        b"spaces all the way down\n",
        false,
    )?;
    w.link(format!("{sd}/{hidden}/data"), format!("{odd}/to-hidden"))?;
    w.link("ünïcødé ☃", format!("{odd}/link to ☃"))?;
    w.link(
        OsStr::from_bytes(b"latin1-\xe9t\xe9"),
        format!("{odd}/link-to-latin1"),
    )?;

    // deep: one chain of directories, a file and a symlink back up at the bottom.
    let mut deep_rel = PathBuf::from(&deep);
    for level in 0..opts.depth {
        deep_rel.push(format!("level-{level:02}"));
    }
    w.dir(&deep_rel)?;
    w.link("../".repeat(opts.depth.min(8)), deep_rel.join("up"))?;
    let deep_file = deep_rel.join("bottom.txt");
    w.file(&deep_file, b"you are at the bottom\n", false)?;

    // Store paths that are not directories, and an empty one.
    w.file(&single, b"source $stdenv/setup\ngenericBuild\n", false)?;
    w.link(format!("{sd}/{hello}"), &link_path)?;
    w.dir(&empty)?;

    // Noise: everything below must stay invisible through the mount.
    for base in [&hello, &glibc, &bash] {
        w.file(format!("{base}.lock"), b"", false)?;
        fs::set_permissions(
            w.path(format!("{base}.lock")),
            fs::Permissions::from_mode(0o600),
        )?;
    }
    w.file(".lock", b"", false)?;
    let other_hash = format!("{}-hello-2.12", store_hash("other", "hello-2.12"));
    w.file(format!("{other_hash}/bin/hello"), b"impostor\n", true)?;
    let hello_hash = &hello[..32];
    let last = hello_hash.as_bytes()[31];
    let swapped = if last == b'0' { '1' } else { '0' };
    let near_hash = format!("{}{swapped}-hello-2.12", &hello_hash[..31]);
    w.file(format!("{near_hash}/bin/hello"), b"near miss\n", true)?;
    let shorter_name = format!("{hello_hash}-hello-2.1");
    w.file(format!("{shorter_name}/bin/hello"), b"shorter name\n", true)?;
    let longer_name = format!("{hello_hash}-hello-2.12-doc");
    w.file(
        format!("{longer_name}/share/doc/hello.txt"),
        b"longer name\n",
        false,
    )?;
    let secret_rel = PathBuf::from(format!("{secret_path}/secret"));
    w.file(
        &secret_rel,
        b"TOP SECRET: the mount must never show this\n",
        false,
    )?;
    w.file(
        format!("{hidden}/data"),
        b"hidden target: not in the closure\n",
        false,
    )?;
    w.file(
        &hello_drv,
        format!("Derive([(\"out\",\"{sd}/{hello}\",\"\",\"\")])").as_bytes(),
        false,
    )?;

    let mut closure = vec![
        glibc.clone(),
        bash.clone(),
        hello.clone(),
        odd.clone(),
        deep.clone(),
        single.clone(),
        link_path.clone(),
        empty.clone(),
    ];
    closure.sort();
    let mut noise = vec![
        ".links".to_string(),
        ".lock".to_string(),
        format!("{hello}.lock"),
        format!("{glibc}.lock"),
        format!("{bash}.lock"),
        other_hash,
        near_hash,
        shorter_name,
        longer_name,
        secret_path,
        hidden,
        hello_drv.clone(),
    ];
    noise.sort();

    for e in fs::read_dir(&store_dir)? {
        canonicalise(&e?.path())?;
    }

    let references: BTreeMap<String, Vec<String>> = [
        (&glibc, vec![glibc.clone()]),
        (&bash, vec![bash.clone(), glibc.clone()]),
        (&hello, vec![glibc.clone(), hello.clone()]),
        (&odd, vec![]),
        (&deep, vec![]),
        (&single, vec![]),
        (&link_path, vec![hello.clone()]),
        (&empty, vec![]),
    ]
    .into_iter()
    .map(|(k, mut v)| {
        v.sort();
        (k.clone(), v)
    })
    .collect();
    let derivers = [(hello.clone(), store_dir.join(&hello_drv))]
        .into_iter()
        .collect();

    let store = SampleStore {
        dir: dir.clone(),
        store_dir: store_dir.clone(),
        closure_file,
        closure,
        noise,
        references,
        derivers,
        big_file: big_rel,
        hard_links: [hard_a, hard_b],
        links_entry,
        single_file: single.clone(),
        symlink_path: link_path,
        wide_dir: wide_rel,
        deep_file,
        odd_dir: PathBuf::from(&odd),
        replaceable_dirs: vec![
            PathBuf::from(format!("{hello}/share/doc/hello")),
            PathBuf::from(format!("{hello}/share/emacs/site-lisp")),
        ],
        secret: secret_rel,
        small_files: vec![
            PathBuf::from(format!("{glibc}/lib/libc.so.6")),
            PathBuf::from(format!("{bash}/bin/bash")),
            PathBuf::from(format!("{hello}/bin/hello")),
            PathBuf::from(format!("{hello}/share/info/hello.info")),
            PathBuf::from(&single),
        ],
    };
    fs::write(&store.closure_file, store.store_paths_text())?;
    Ok(store)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base32_matches_nix() {
        // Reference value from `nix hash convert --to nix32` of sha256("").
        let empty = Sha256::digest(b"");
        assert_eq!(
            nix_base32(&empty),
            "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73"
        );
    }

    #[test]
    fn names_are_valid_store_names() {
        let b = base_name("hello-2.12");
        assert_eq!(b.len(), 32 + 1 + "hello-2.12".len());
        assert!(b[..32].bytes().all(|c| NIX_BASE32.contains(&c)));
        assert_eq!(b, base_name("hello-2.12"));
        assert_ne!(
            store_hash("other", "hello-2.12"),
            store_hash("", "hello-2.12")
        );
    }

    #[test]
    fn builds_a_small_sample() {
        let tmp = tempfile::tempdir().unwrap();
        let s = build(tmp.path(), &SampleOptions::small()).unwrap();
        assert_eq!(s.closure.len(), 8);
        for b in &s.closure {
            assert!(s.store_dir.join(b).symlink_metadata().is_ok(), "{b}");
        }
        for n in &s.noise {
            assert!(s.store_dir.join(n).symlink_metadata().is_ok(), "{n}");
        }
        let a = s.host(&s.hard_links[0]).symlink_metadata().unwrap();
        let b = s.host(&s.hard_links[1]).symlink_metadata().unwrap();
        let l = s.host(&s.links_entry).symlink_metadata().unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_eq!((a.ino(), a.nlink()), (b.ino(), 3));
        assert_eq!(a.ino(), l.ino());
        assert_eq!(a.mtime(), 1);
        let root = s.host(&s.closure[0]).symlink_metadata().unwrap();
        assert_eq!(root.mtime(), 1);
        assert_eq!(s.host(&s.big_file).metadata().unwrap().len(), 1 << 20);
        s.write_closure_info(&tmp.path().join("ci")).unwrap();
        let reg = fs::read_to_string(tmp.path().join("ci/registration")).unwrap();
        assert_eq!(reg.lines().filter(|l| l.starts_with("sha256:")).count(), 8);
    }
}
