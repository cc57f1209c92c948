//! Loading the kernel modules the store needs, without modprobe.
//!
//! An initramfs with guest-init as /init has no modprobe, and the kernel's own
//! request_module calls out to one. So guest-init reads the module index as depmod wrote
//! it (`modules.dep`, `modules.softdep`, `modules.alias`, `modules.builtin`) and loads each
//! module after its dependencies, as modprobe does.
//!
//! Modules are loaded as the kernel package ships them: `.ko`, or compressed as `.ko.xz`,
//! `.ko.zst` or `.ko.gz`. A compressed module goes to `finit_module` with
//! `MODULE_INIT_COMPRESSED_FILE` first, so that a kernel built with `MODULE_DECOMPRESS`
//! decompresses it itself; a kernel that refuses (older than 5.17, or built without that
//! format) gets it decompressed here and loaded with `init_module`.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use rustix::io::Errno;

/// `finit_module` flag: the file is compressed and the kernel is to decompress it.
const MODULE_INIT_COMPRESSED_FILE: i32 = 4;

/// Decompressed modules larger than this are refused: no module comes near it, and a
/// corrupt file must not exhaust the initramfs's memory.
const MAX_MODULE_SIZE: u64 = 256 << 20;

/// A module name as the kernel knows it (`-` and `_` are the same).
fn normalise(name: &str) -> String {
    name.replace('-', "_")
}

/// The module name of a `.ko` path.
fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split(".ko").next().unwrap_or(file);
    normalise(stem)
}

/// How a module file is compressed, by its name as depmod lists it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Compression {
    None,
    Xz,
    Zstd,
    Gzip,
}

impl Compression {
    fn of(path: &str) -> Result<Compression, String> {
        if path.ends_with(".ko") {
            Ok(Compression::None)
        } else if path.ends_with(".ko.xz") {
            Ok(Compression::Xz)
        } else if path.ends_with(".ko.zst") {
            Ok(Compression::Zstd)
        } else if path.ends_with(".ko.gz") {
            Ok(Compression::Gzip)
        } else {
            Err(format!(
                "module {path}: expected .ko, .ko.xz, .ko.zst or .ko.gz"
            ))
        }
    }
}

/// Decompresses a module file into memory.
fn decompress(file: File, compression: Compression, path: &Path) -> Result<Vec<u8>, String> {
    let mut input = BufReader::new(file);
    let mut out = Vec::new();
    let bad = |e: String| format!("decompressing module {}: {e}", path.display());
    match compression {
        Compression::None => {
            input
                .take(MAX_MODULE_SIZE + 1)
                .read_to_end(&mut out)
                .map_err(|e| bad(e.to_string()))?;
        }
        Compression::Xz => {
            let mut limited = LimitedWriter {
                out: &mut out,
                left: MAX_MODULE_SIZE + 1,
            };
            lzma_rs::xz_decompress(&mut input, &mut limited).map_err(|e| bad(format!("{e:?}")))?;
        }
        Compression::Zstd => {
            let decoder = ruzstd::decoding::StreamingDecoder::new(&mut input)
                .map_err(|e| bad(e.to_string()))?;
            decoder
                .take(MAX_MODULE_SIZE + 1)
                .read_to_end(&mut out)
                .map_err(|e| bad(e.to_string()))?;
        }
        Compression::Gzip => {
            flate2::bufread::MultiGzDecoder::new(input)
                .take(MAX_MODULE_SIZE + 1)
                .read_to_end(&mut out)
                .map_err(|e| bad(e.to_string()))?;
        }
    }
    if out.len() as u64 > MAX_MODULE_SIZE {
        return Err(bad(format!(
            "more than {} MiB decompressed",
            MAX_MODULE_SIZE >> 20
        )));
    }
    Ok(out)
}

/// A writer that fails once `left` bytes have been written: bounds what a decoder without
/// a reader interface may produce.
struct LimitedWriter<'a> {
    out: &'a mut Vec<u8>,
    left: u64,
}

impl std::io::Write for LimitedWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if buf.len() as u64 > self.left {
            return Err(std::io::Error::other("module too large"));
        }
        self.left -= buf.len() as u64;
        self.out.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// How a module came to be loaded, for the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Loaded {
    /// It was loaded before (by an earlier call, or before guest-init ran).
    Already,
    /// It is part of the kernel image (`modules.builtin`).
    BuiltIn,
    /// Loaded from its file now.
    Now,
}

/// The module database of the running kernel.
#[derive(Debug, Default)]
pub struct Modules {
    dir: PathBuf,
    /// Module -> (path relative to `dir`, hard dependencies).
    deps: HashMap<String, (String, Vec<String>)>,
    /// Module -> soft dependencies to load before it, and after it.
    soft: HashMap<String, (Vec<String>, Vec<String>)>,
    /// Wildcard-free alias -> the modules that provide it.
    aliases: HashMap<String, Vec<String>>,
    builtin: HashSet<String>,
    loaded: HashSet<String>,
}

impl Modules {
    /// Reads `/lib/modules/$(uname -r)`. A missing database gives an empty one: every
    /// module is then unknown, and what the store needs must be built in.
    pub fn open() -> Modules {
        let release = rustix::system::uname()
            .release()
            .to_string_lossy()
            .into_owned();
        Self::open_dir(&Path::new("/lib/modules").join(release))
    }

    fn open_dir(dir: &Path) -> Modules {
        let mut m = Modules {
            dir: dir.to_owned(),
            ..Modules::default()
        };
        let read = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap_or_default();
        for line in read("modules.dep").lines() {
            let Some((path, deps)) = line.split_once(':') else {
                continue;
            };
            let deps = deps.split_whitespace().map(module_name).collect();
            m.deps.insert(module_name(path), (path.to_owned(), deps));
        }
        for line in read("modules.softdep").lines() {
            let mut words = line.split_whitespace();
            if words.next() != Some("softdep") {
                continue;
            }
            let Some(module) = words.next() else { continue };
            let entry = m.soft.entry(normalise(module)).or_default();
            let mut post = false;
            for w in words {
                match w {
                    "pre:" => post = false,
                    "post:" => post = true,
                    name if post => entry.1.push(normalise(name)),
                    name => entry.0.push(normalise(name)),
                }
            }
        }
        for line in read("modules.alias").lines() {
            let mut words = line.split_whitespace();
            if let (Some("alias"), Some(alias), Some(module)) =
                (words.next(), words.next(), words.next())
            {
                // Device aliases carry wildcards; soft dependencies name plain ones
                // (`crc32c`, `crypto-crc32c`).
                if !alias.contains(['*', '?', '[']) {
                    m.aliases
                        .entry(normalise(alias))
                        .or_default()
                        .push(normalise(module));
                }
            }
        }
        m.builtin
            .extend(read("modules.builtin").lines().map(module_name));
        if let Ok(text) = std::fs::read_to_string("/proc/modules") {
            m.loaded.extend(
                text.lines()
                    .filter_map(|l| l.split(' ').next())
                    .map(normalise),
            );
        }
        m
    }

    /// Loads `name` (a module or an alias) and what it depends on. `Ok(None)` when the
    /// kernel knows no such module; errors name the module file and the cause.
    pub fn load(&mut self, name: &str) -> Result<Option<Loaded>, String> {
        self.load_inner(&normalise(name), 0)
    }

    fn load_inner(&mut self, name: &str, depth: usize) -> Result<Option<Loaded>, String> {
        if self.loaded.contains(name) {
            return Ok(Some(Loaded::Already));
        }
        if self.builtin.contains(name) {
            return Ok(Some(Loaded::BuiltIn));
        }
        if depth > 32 {
            return Err(format!("module dependencies of {name} loop"));
        }
        let Some((path, deps)) = self.deps.get(name).cloned() else {
            // An alias: modprobe loads every module that provides it.
            let Some(targets) = self.aliases.get(name).cloned() else {
                return Ok(None);
            };
            let mut result = Ok(None);
            for t in targets {
                match self.load_inner(&t, depth + 1) {
                    Ok(Some(l)) => result = Ok(Some(l)),
                    Err(e) if !matches!(result, Ok(Some(_))) => result = Err(e),
                    _ => {}
                }
            }
            return result;
        };
        let (pre, post) = self.soft.get(name).cloned().unwrap_or_default();
        // Soft dependencies are best effort, as for modprobe: a missing or failing one
        // (crc32c-intel without SSE 4.2) is not an error.
        for s in &pre {
            let _ = self.load_inner(s, depth + 1);
        }
        // modules.dep lists the deepest dependency last.
        for dep in deps.iter().rev() {
            self.load_inner(dep, depth + 1)?;
        }
        self.load_file(&path)?;
        self.loaded.insert(name.to_owned());
        for s in &post {
            let _ = self.load_inner(s, depth + 1);
        }
        Ok(Some(Loaded::Now))
    }

    fn load_file(&self, rel: &str) -> Result<(), String> {
        let path = self.dir.join(rel);
        let compression = Compression::of(rel)?;
        let open =
            || File::open(&path).map_err(|e| format!("loading module {}: {e}", path.display()));
        let file = open()?;
        let flags = match compression {
            Compression::None => 0,
            _ => MODULE_INIT_COMPRESSED_FILE,
        };
        let failed = |e: Errno| format!("loading module {}: {e}", path.display());
        match rustix::system::finit_module(&file, c"", flags) {
            Ok(()) | Err(Errno::EXIST) => return Ok(()),
            // The kernel cannot decompress this file: older than 5.17 (an unknown flag),
            // built without MODULE_DECOMPRESS, or for another format.
            Err(Errno::INVAL | Errno::OPNOTSUPP | Errno::NOSYS) if flags != 0 => {}
            Err(e) => return Err(failed(e)),
        }
        let image = decompress(open()?, compression, &path)?;
        match rustix::system::init_module(&image, c"") {
            Ok(()) | Err(Errno::EXIST) => Ok(()),
            Err(e) => Err(failed(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn reads_dependencies_soft_dependencies_aliases_and_builtins() {
        let dir = std::env::temp_dir().join(format!("guest-init-modules-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("modules.dep"),
            "kernel/fs/erofs/erofs.ko.xz: kernel/lib/libcrc32c.ko.xz\n\
             kernel/lib/libcrc32c.ko.xz:\n\
             kernel/fs/fuse/virtiofs.ko: kernel/fs/fuse/fuse.ko kernel/drivers/virtio/virtio.ko\n",
        )
        .unwrap();
        std::fs::write(
            dir.join("modules.softdep"),
            "# comment\nsoftdep libcrc32c pre: crc32c post: foo\n",
        )
        .unwrap();
        std::fs::write(
            dir.join("modules.alias"),
            "alias crypto-crc32c crc32c_generic\nalias crc32c crc32c_intel\n\
             alias crc32c crc32c_generic\nalias pci:v00001AF4d* virtio_pci\n",
        )
        .unwrap();
        std::fs::write(
            dir.join("modules.builtin"),
            "kernel/fs/overlayfs/overlay.ko\n",
        )
        .unwrap();
        let mut m = Modules::open_dir(&dir);
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(
            m.deps["virtiofs"],
            (
                "kernel/fs/fuse/virtiofs.ko".to_string(),
                vec!["fuse".to_string(), "virtio".to_string()]
            )
        );
        assert_eq!(
            m.soft["libcrc32c"],
            (vec!["crc32c".to_string()], vec!["foo".to_string()])
        );
        assert_eq!(m.aliases["crc32c"], ["crc32c_intel", "crc32c_generic"]);
        assert_eq!(m.aliases["crypto_crc32c"], ["crc32c_generic"]);
        assert!(!m.aliases.contains_key("pci:v00001AF4d*"));
        assert_eq!(m.load("overlay"), Ok(Some(Loaded::BuiltIn)));
        assert_eq!(m.load("no-such-module"), Ok(None));
        assert_eq!(
            module_name("kernel/crypto/crc32c-intel.ko.xz"),
            "crc32c_intel"
        );
    }

    #[test]
    fn compression_by_name() {
        assert_eq!(Compression::of("a/b.ko"), Ok(Compression::None));
        assert_eq!(Compression::of("a/b.ko.xz"), Ok(Compression::Xz));
        assert_eq!(Compression::of("a/b.ko.zst"), Ok(Compression::Zstd));
        assert_eq!(Compression::of("a/b.ko.gz"), Ok(Compression::Gzip));
        let e = Compression::of("a/b.ko.bz2").unwrap_err();
        assert!(e.contains("a/b.ko.bz2"), "{e}");
    }

    /// Each format decompresses to the module's ELF image; real modules, where the host
    /// has them in that format, else data compressed here.
    #[test]
    fn decompresses_every_format() {
        let dir = tempfile_dir("decompress");
        let payload: Vec<u8> = (0..200_000u32)
            .flat_map(|i| (i % 251).to_le_bytes())
            .collect();
        let gz = dir.join("m.ko.gz");
        let mut enc = flate2::write::GzEncoder::new(
            File::create(&gz).unwrap(),
            flate2::Compression::default(),
        );
        enc.write_all(&payload).unwrap();
        enc.finish().unwrap();
        let out = decompress(File::open(&gz).unwrap(), Compression::Gzip, &gz).unwrap();
        assert_eq!(out, payload);

        let xz = dir.join("m.ko.xz");
        let mut compressed = Vec::new();
        lzma_rs::xz_compress(&mut &payload[..], &mut compressed).unwrap();
        std::fs::write(&xz, &compressed).unwrap();
        let out = decompress(File::open(&xz).unwrap(), Compression::Xz, &xz).unwrap();
        assert_eq!(out, payload);

        let zst = dir.join("m.ko.zst");
        let compressed = ruzstd::encoding::compress_to_vec(
            &payload[..],
            ruzstd::encoding::CompressionLevel::Fastest,
        );
        std::fs::write(&zst, &compressed).unwrap();
        let out = decompress(File::open(&zst).unwrap(), Compression::Zstd, &zst).unwrap();
        assert_eq!(out, payload);

        // Garbage is an error naming the file, not a panic.
        let bad = dir.join("bad.ko.xz");
        std::fs::write(&bad, b"not xz at all").unwrap();
        let e = decompress(File::open(&bad).unwrap(), Compression::Xz, &bad).unwrap_err();
        assert!(e.contains("bad.ko.xz"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn tempfile_dir(what: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "guest-init-{what}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
