//! Loading the kernel modules the store needs, without modprobe.
//!
//! An initramfs with guest-init as /init has no modprobe, and the kernel's own
//! request_module calls out to one. So guest-init reads `modules.dep` (and the `pre:`
//! soft dependencies of `modules.softdep`) and loads each module after its dependencies
//! with `finit_module`. A module that is not listed is taken to be built in.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};

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

/// The module database of the running kernel.
#[derive(Debug, Default)]
pub struct Modules {
    dir: PathBuf,
    /// Module -> (path relative to `dir`, hard dependencies).
    deps: HashMap<String, (String, Vec<String>)>,
    /// Module -> modules to load before it.
    pre: HashMap<String, Vec<String>>,
    loaded: HashSet<String>,
}

impl Modules {
    /// Reads `/lib/modules/$(uname -r)`. A missing database gives an empty one: every
    /// module is then assumed built in.
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
        if let Ok(text) = std::fs::read_to_string(dir.join("modules.dep")) {
            for line in text.lines() {
                let Some((path, deps)) = line.split_once(':') else {
                    continue;
                };
                let deps = deps.split_whitespace().map(module_name).collect();
                m.deps.insert(module_name(path), (path.to_owned(), deps));
            }
        }
        if let Ok(text) = std::fs::read_to_string(dir.join("modules.softdep")) {
            for line in text.lines() {
                let mut words = line.split_whitespace();
                if words.next() != Some("softdep") {
                    continue;
                }
                let Some(module) = words.next() else { continue };
                let mut pre = Vec::new();
                let mut in_pre = false;
                for w in words {
                    match w {
                        "pre:" => in_pre = true,
                        "post:" => in_pre = false,
                        name if in_pre => pre.push(normalise(name)),
                        _ => {}
                    }
                }
                m.pre.insert(normalise(module), pre);
            }
        }
        if let Ok(text) = std::fs::read_to_string("/proc/modules") {
            m.loaded.extend(
                text.lines()
                    .filter_map(|l| l.split(' ').next())
                    .map(normalise),
            );
        }
        m
    }

    /// Loads `name` and what it depends on. Returns false when the module is unknown (built
    /// in, or absent); errors name the module file.
    pub fn load(&mut self, name: &str) -> Result<bool, String> {
        self.load_inner(&normalise(name), 0)
    }

    fn load_inner(&mut self, name: &str, depth: usize) -> Result<bool, String> {
        if self.loaded.contains(name) {
            return Ok(true);
        }
        if depth > 32 {
            return Err(format!("module dependencies of {name} loop"));
        }
        let Some((path, deps)) = self.deps.get(name).cloned() else {
            return Ok(false);
        };
        // Soft dependencies are best effort: their absence is not an error.
        for pre in self.pre.get(name).cloned().unwrap_or_default() {
            let _ = self.load_inner(&pre, depth + 1);
        }
        // modules.dep lists the deepest dependency last.
        for dep in deps.iter().rev() {
            self.load_inner(dep, depth + 1)?;
        }
        let file = self.dir.join(&path);
        let fd = File::open(&file).map_err(|e| format!("module {}: {e}", file.display()))?;
        match rustix::system::finit_module(&fd, c"", 0) {
            Ok(()) | Err(rustix::io::Errno::EXIST) => {}
            Err(e) => return Err(format!("loading module {}: {e}", file.display())),
        }
        self.loaded.insert(name.to_owned());
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_dependencies_and_soft_dependencies() {
        let dir = std::env::temp_dir().join(format!("guest-init-modules-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("modules.dep"),
            "kernel/fs/erofs/erofs.ko: kernel/lib/libcrc32c.ko\n\
             kernel/lib/libcrc32c.ko:\n\
             kernel/fs/fuse/virtiofs.ko: kernel/fs/fuse/fuse.ko kernel/drivers/virtio/virtio.ko\n",
        )
        .unwrap();
        std::fs::write(
            dir.join("modules.softdep"),
            "# comment\nsoftdep libcrc32c pre: crc32c post: foo\n",
        )
        .unwrap();
        let m = Modules::open_dir(&dir);
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(
            m.deps["virtiofs"],
            (
                "kernel/fs/fuse/virtiofs.ko".to_string(),
                vec!["fuse".to_string(), "virtio".to_string()]
            )
        );
        assert_eq!(m.pre["libcrc32c"], vec!["crc32c".to_string()]);
        assert_eq!(
            module_name("kernel/crypto/crc32c-intel.ko.xz"),
            "crc32c_intel"
        );
    }
}
