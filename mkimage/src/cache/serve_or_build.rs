//! One use of the cache, from the check to the eviction: [`Cache::serve_or_build`].

use std::fmt;
use std::io;
use std::path::Path;

use super::{Building, Cache, Delivery, LockKind};

/// Where the image served came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Served<S> {
    /// The entry was there and sound: nothing was built.
    Hit,
    /// A concurrent run built the entry while this one waited for the key's lock.
    HitBuiltConcurrently,
    /// This run built the entry (there was none, or it was damaged): what the build
    /// returned.
    Miss(S),
}

impl<S> Served<S> {
    /// Words for the summary line.
    pub fn as_str(&self) -> &'static str {
        match self {
            Served::Hit => "hit",
            Served::HitBuiltConcurrently => "hit (built by a concurrent run)",
            Served::Miss(_) => "miss, now stored",
        }
    }
}

/// A step of [`Cache::serve_or_build`], reported as it is done: a caller's lines about
/// it come out in the order of the work, also when a later step fails.
#[derive(Debug)]
pub enum Step<'a, S> {
    /// The entry was built and sealed: `image` holds it now.
    Stored {
        /// The entry's image.
        image: &'a Path,
        /// What the build returned.
        built: &'a S,
    },
    /// OUTPUT was made from the entry at `image`.
    Served {
        /// The entry's image.
        image: &'a Path,
        /// Where the entry came from.
        served: &'a Served<S>,
        /// How OUTPUT was made from it.
        delivery: Delivery,
    },
}

/// Why [`Cache::serve_or_build`] failed.
#[derive(Debug)]
pub enum CacheError<E> {
    /// The build failed: its own error. Nothing it wrote is left in the cache.
    Build(E),
    /// The cache failed (a lock, a temporary file, the seal, serving OUTPUT or the
    /// eviction), with a message naming the paths involved.
    Cache(io::Error),
}

impl<E: fmt::Display> fmt::Display for CacheError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CacheError::Build(e) => e.fmt(f),
            CacheError::Cache(e) => e.fmt(f),
        }
    }
}

impl<E: std::error::Error + 'static> std::error::Error for CacheError<E> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            CacheError::Build(e) => Some(e),
            CacheError::Cache(e) => Some(e),
        }
    }
}

/// `e`, its message after `what`.
fn context<E>(what: impl fmt::Display, e: io::Error) -> CacheError<E> {
    CacheError::Cache(io::Error::new(e.kind(), format!("{what}{e}")))
}

impl Cache {
    /// Makes `output` the image of `key`: served from the entry if it is there and sound,
    /// else built by `build` into the entry (a temporary file, sealed once `build`
    /// returns) and served from it. Then evicts, with `max_bytes`, the least recently
    /// used other entries (see [`Cache::evict`]); leftovers of runs that died are removed
    /// even without it.
    ///
    /// Concurrent runs for one key build it once: the entry is checked under the key's
    /// shared lock (hits go together), then, if it is missing or damaged, checked again
    /// under its exclusive lock, where a run that waited finds what another built. A
    /// damaged entry is rebuilt, with a warning naming what is wrong. A block device
    /// `output` is written in place (see [`Cache::serve`]). A failing build leaves
    /// nothing in the cache and `output` untouched. `report` hears of each step as it is
    /// done.
    pub fn serve_or_build<S, E>(
        &self,
        key: &str,
        output: &Path,
        max_bytes: Option<u64>,
        build: impl FnOnce(&Building<'_>) -> Result<S, E>,
        mut report: impl FnMut(Step<'_, S>),
    ) -> Result<Served<S>, CacheError<E>> {
        let take_lock = |kind| self.lock(key, kind).map_err(|e| context("cache: ", e));
        let image = self.image_path(key);
        let (entry, lock, served) = 'found: {
            {
                // Shared: concurrent hits go together, but not alongside a build or an
                // eviction. What is wrong with a damaged entry is told under the
                // exclusive lock, once.
                let shared = take_lock(LockKind::Shared)?;
                if let Ok(Some(entry)) = self.check(key) {
                    break 'found (entry, shared, Served::Hit);
                }
            }
            // A miss or a damaged entry: build it under the exclusive lock, unless a
            // concurrent run built it meanwhile.
            let exclusive = take_lock(LockKind::Exclusive)?;
            match self.check(key) {
                Ok(Some(entry)) => break 'found (entry, exclusive, Served::HitBuiltConcurrently),
                Ok(None) => {}
                Err(damage) => tracing::warn!("rebuilding a damaged cache entry: {damage}"),
            }
            let building = self.build(key).map_err(|e| context("cache: ", e))?;
            // On failure `building` is dropped, which removes the temporary file.
            let built = build(&building).map_err(CacheError::Build)?;
            let entry = self
                .seal(key, building)
                .map_err(|e| context(format_args!("cache: sealing {}: ", image.display()), e))?;
            report(Step::Stored {
                image: &image,
                built: &built,
            });
            (entry, exclusive, Served::Miss(built))
        };
        let delivery = self.serve(key, &entry, output).map_err(|e| {
            let what = format!(
                "cannot make {} from {}: ",
                output.display(),
                image.display()
            );
            context(what, e)
        })?;
        self.touch(key);
        report(Step::Served {
            image: &image,
            served: &served,
            delivery,
        });
        drop(lock);
        // After every use of the cache, so that leftovers of runs that died are removed
        // even without a size limit; it takes the lock of each entry it removes, and
        // leaves this one alone.
        let done = self
            .evict(max_bytes, key)
            .map_err(|e| context("cache eviction: ", e))?;
        tracing::debug!("cache after eviction: {done:?}");
        Ok(served)
    }
}

#[cfg(test)]
mod tests {
    use std::fs::{self, File};
    use std::os::unix::fs::PermissionsExt;
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Barrier, Mutex};
    use std::time::Duration;

    use super::*;
    use crate::cache::KeyBuilder;
    use crate::erofs::{self, ImageOptions, Inode, InodeKind};

    /// A cache directory with room for outputs beside it.
    struct Setup {
        dir: tempfile::TempDir,
        cache: Cache,
    }

    impl Setup {
        fn new() -> Setup {
            let dir = tempfile::tempdir().unwrap();
            let cache = Cache::open(&dir.path().join("cache")).unwrap();
            Setup { dir, cache }
        }

        fn output(&self, name: &str) -> PathBuf {
            self.dir.path().join(name)
        }

        /// The names in the cache directory, sorted.
        fn files(&self) -> Vec<String> {
            let mut names: Vec<String> = fs::read_dir(self.dir.path().join("cache"))
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            names.sort();
            names
        }
    }

    fn key(name: &str) -> String {
        let mut key = KeyBuilder::default();
        key.field("test", name);
        key.finish()
    }

    /// Writes a small valid image labelled `label` into the entry being built.
    fn write_image(building: &Building<'_>, label: &str) -> io::Result<u64> {
        let root = Inode {
            kind: InodeKind::Directory {
                entries: Vec::new(),
            },
            mode: 0o755,
            uid: 0,
            gid: 0,
            mtime: 0,
            mtime_nsec: 0,
            nlink_hint: None,
        };
        let options = ImageOptions {
            uuid: [7; 16],
            label: label.into(),
            build_time: 0,
            block_size_bits: 12,
            compression: None,
            threads: 1,
            ztailpacking: false,
            dax: false,
        };
        erofs::write_image(&[root], &options, building.file())
            .map(|stats| stats.image_bytes)
            .map_err(|e| e.cause)
    }

    /// A use of the cache with a build that counts its calls; the steps reported, in order.
    fn use_cache(
        cache: &Cache,
        key: &str,
        output: &Path,
        builds: &AtomicUsize,
    ) -> (Result<Served<u64>, CacheError<io::Error>>, Vec<String>) {
        let mut steps = Vec::new();
        let served = cache.serve_or_build(
            key,
            output,
            None,
            |building| {
                builds.fetch_add(1, Ordering::SeqCst);
                write_image(building, "test")
            },
            |step| {
                steps.push(match step {
                    Step::Stored { .. } => "stored".to_owned(),
                    Step::Served { served, .. } => format!("served: {}", served.as_str()),
                })
            },
        );
        (served, steps)
    }

    #[test]
    fn a_miss_builds_and_a_hit_serves() {
        let setup = Setup::new();
        let key = key("a");
        let builds = AtomicUsize::new(0);
        let first = setup.output("first.img");
        let (served, steps) = use_cache(&setup.cache, &key, &first, &builds);
        let Served::Miss(bytes) = served.unwrap() else {
            panic!("not a miss")
        };
        assert_eq!(steps, ["stored", "served: miss, now stored"]);
        assert_eq!(fs::metadata(&first).unwrap().len(), bytes);

        let second = setup.output("second.img");
        let (served, steps) = use_cache(&setup.cache, &key, &second, &builds);
        assert_eq!(served.unwrap(), Served::Hit);
        assert_eq!(steps, ["served: hit"]);
        assert_eq!(builds.load(Ordering::SeqCst), 1);
        assert_eq!(fs::read(&first).unwrap(), fs::read(&second).unwrap());
        assert_eq!(
            fs::read(setup.cache.image_path(&key)).unwrap(),
            fs::read(&second).unwrap()
        );
    }

    /// An entry written to after it was sealed (through a hard link, by a VM that opened
    /// its store read-write) is built again, not served.
    #[test]
    fn a_damaged_entry_is_rebuilt() {
        let setup = Setup::new();
        let key = key("a");
        let builds = AtomicUsize::new(0);
        let (served, _) = use_cache(&setup.cache, &key, &setup.output("1.img"), &builds);
        assert!(matches!(served.unwrap(), Served::Miss(_)));
        let image = setup.cache.image_path(&key);
        let sound = fs::read(&image).unwrap();
        fs::set_permissions(&image, fs::Permissions::from_mode(0o644)).unwrap();
        let mut damaged = sound.clone();
        damaged[2000] ^= 1;
        // A write an instant later, so the mtime surely moves.
        std::thread::sleep(Duration::from_millis(10));
        fs::write(&image, &damaged).unwrap();
        fs::set_permissions(&image, fs::Permissions::from_mode(0o444)).unwrap();
        assert!(setup.cache.check(&key).is_err());

        let output = setup.output("2.img");
        let (served, steps) = use_cache(&setup.cache, &key, &output, &builds);
        assert!(matches!(served.unwrap(), Served::Miss(_)));
        assert_eq!(steps, ["stored", "served: miss, now stored"]);
        assert_eq!(builds.load(Ordering::SeqCst), 2);
        assert_eq!(fs::read(&output).unwrap(), sound);
        assert!(setup.cache.check(&key).unwrap().is_some());
    }

    /// Two runs for one key at once: one builds, the other waits and serves what it built.
    #[test]
    fn concurrent_callers_build_once() {
        let setup = Setup::new();
        let key = key("a");
        let builds = AtomicUsize::new(0);
        let start = Barrier::new(2);
        let results = Mutex::new(Vec::new());
        std::thread::scope(|scope| {
            for n in 0..2 {
                let (setup, key, builds, start, results) =
                    (&setup, &key, &builds, &start, &results);
                scope.spawn(move || {
                    // A cache of its own, as another process would open it: each takes
                    // its locks through descriptors of its own.
                    let cache = Cache::open(&setup.dir.path().join("cache")).unwrap();
                    let output = setup.output(&format!("{n}.img"));
                    start.wait();
                    let served = cache.serve_or_build(
                        key,
                        &output,
                        None,
                        |building| {
                            builds.fetch_add(1, Ordering::SeqCst);
                            // Long enough for the other run to wait on the lock.
                            std::thread::sleep(Duration::from_millis(300));
                            write_image(building, "test")
                        },
                        |_| {},
                    );
                    results.lock().unwrap().push((served.unwrap(), output));
                });
            }
        });
        assert_eq!(builds.load(Ordering::SeqCst), 1);
        let results = results.into_inner().unwrap();
        let misses = results
            .iter()
            .filter(|(served, _)| matches!(served, Served::Miss(_)))
            .count();
        assert_eq!(misses, 1, "{results:?}");
        assert_eq!(
            fs::read(&results[0].1).unwrap(),
            fs::read(&results[1].1).unwrap()
        );
    }

    #[test]
    fn a_failed_build_leaves_nothing_behind() {
        let setup = Setup::new();
        let key = key("a");
        let output = setup.output("out.img");
        let mut steps = 0;
        let failed = setup.cache.serve_or_build(
            &key,
            &output,
            None,
            |building| -> Result<(), &str> {
                // Half an image, then a failure.
                building.file().set_len(8192).unwrap();
                assert!(building.path().exists());
                Err("the tree changed")
            },
            |_| steps += 1,
        );
        assert!(matches!(failed, Err(CacheError::Build("the tree changed"))));
        assert_eq!(steps, 0);
        assert!(!output.exists());
        // The key's lock file stays until an eviction finds it without an image.
        assert_eq!(setup.files(), [format!("{key}.lock")]);
        assert_eq!(setup.cache.check(&key).unwrap().map(|e| e.size()), None);

        // The next run builds it.
        let builds = AtomicUsize::new(0);
        let (served, _) = use_cache(&setup.cache, &key, &output, &builds);
        assert!(matches!(served.unwrap(), Served::Miss(_)));
        assert_eq!(builds.load(Ordering::SeqCst), 1);
    }

    /// Each use evicts the other entries over the limit, never its own.
    #[test]
    fn eviction_follows_each_use() {
        let setup = Setup::new();
        let builds = AtomicUsize::new(0);
        let (a, b) = (key("a"), key("b"));
        use_cache(&setup.cache, &a, &setup.output("a.img"), &builds)
            .0
            .unwrap();
        let served = setup.cache.serve_or_build(
            &b,
            &setup.output("b.img"),
            Some(0),
            |building| write_image(building, "b"),
            |_| {},
        );
        assert!(matches!(served, Ok(Served::Miss(_))));
        assert!(!setup.cache.image_path(&a).exists());
        assert!(setup.cache.image_path(&b).exists());
        // A leftover of a run that died goes at the next use, limit or not.
        let leftover = setup.dir.path().join(format!("cache/.{a}.img.1-0-0.tmp"));
        File::create(&leftover).unwrap();
        let served = setup.cache.serve_or_build(
            &b,
            &setup.output("b2.img"),
            None,
            |_| -> io::Result<u64> { unreachable!("a hit") },
            |_| {},
        );
        assert!(matches!(served, Ok(Served::Hit)));
        assert!(!leftover.exists());
    }

    #[test]
    fn errors_name_the_paths() {
        let setup = Setup::new();
        let key = key("a");
        let output = setup.output("missing-dir/out.img");
        let builds = AtomicUsize::new(0);
        let (served, steps) = use_cache(&setup.cache, &key, &output, &builds);
        let Err(CacheError::Cache(e)) = served else {
            panic!("served into a missing directory")
        };
        let message = e.to_string();
        assert!(message.contains(&output.display().to_string()), "{message}");
        let image = setup.cache.image_path(&key);
        assert!(message.contains(&image.display().to_string()), "{message}");
        // Built and stored before serving failed: the entry stays for the next run.
        assert_eq!(steps, ["stored"]);
        assert!(setup.cache.check(&key).unwrap().is_some());
    }
}
