//! Seeded random directory trees, for testing image writers on shapes nobody thought of.
//!
//! Every tree has the cases that break block-based writers (files of 0, 1, 4095, 4096 and
//! 4097 bytes, names of 255 bytes, symlinks of 4095 bytes, a 10,000-entry directory, deep
//! nesting, hard links) plus random files, names and links around them. The same seed
//! gives the same tree.

use std::ffi::OsString;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::sample::PseudoRandom;

/// Shape of a random tree.
#[derive(Clone, Debug)]
pub struct TreeOptions {
    /// Entries of the one wide directory.
    pub wide_entries: usize,
    /// Depth of the one deep chain of directories.
    pub depth: usize,
    /// Random entries spread over the tree.
    pub random_entries: usize,
    /// Allow 255-byte names (erofs-utils 1.5 cannot write them).
    pub long_names: bool,
}

impl Default for TreeOptions {
    fn default() -> Self {
        TreeOptions {
            wide_entries: 10_000,
            depth: 40,
            random_entries: 2_000,
            long_names: true,
        }
    }
}

/// A random name: 1..=max bytes, anything but `/` and NUL, never `.` or `..`.
fn random_name(rng: &mut PseudoRandom, max: usize) -> OsString {
    loop {
        let len = 1 + rng.below(max as u64) as usize;
        let name: Vec<u8> = (0..len)
            .map(|_| match rng.below(4) {
                // Mostly printable, sometimes any byte: spaces, newlines, UTF-8 fragments.
                0 => 1 + rng.below(255) as u8,
                _ => b'a' + rng.below(26) as u8,
            })
            .map(|b| if b == b'/' { b'_' } else { b })
            .collect();
        if name != b"." && name != b".." {
            return OsString::from_vec(name);
        }
    }
}

fn write_file(path: &Path, rng: &mut PseudoRandom, size: usize, mode: u32) -> io::Result<()> {
    let mut data = vec![0u8; size];
    rng.fill(&mut data);
    fs::write(path, data)?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
}

/// Builds a random tree below `root` (which must not exist) from `seed`.
pub fn build(root: &Path, seed: &str, opts: &TreeOptions) -> io::Result<()> {
    let mut rng = PseudoRandom::new(seed);
    fs::create_dir(root)?;
    let mut dirs: Vec<PathBuf> = vec![root.to_owned()];
    let mut files: Vec<PathBuf> = Vec::new();

    // The edge cases, always there.
    let edges = root.join("edges");
    fs::create_dir(&edges)?;
    for size in [0usize, 1, 4095, 4096, 4097, 3 * 4096 + 1, 65536] {
        let p = edges.join(format!("size-{size}"));
        write_file(&p, &mut rng, size, 0o444)?;
        files.push(p);
    }
    if opts.long_names {
        let long = "n".repeat(255);
        write_file(&edges.join(&long), &mut rng, 10, 0o644)?;
        fs::create_dir(edges.join(format!("d{}", &long[1..])))?;
    }
    for len in [1usize, 59, 60, 61, 4095] {
        let target: String = (0..len).map(|i| (b'a' + (i % 26) as u8) as char).collect();
        symlink(&target, edges.join(format!("link-{len}")))?;
    }
    let wide = root.join("wide");
    fs::create_dir(&wide)?;
    for i in 0..opts.wide_entries {
        fs::write(wide.join(format!("e{i:05}")), b"")?;
    }
    let mut deep = root.join("deep");
    fs::create_dir(&deep)?;
    for i in 0..opts.depth {
        deep = deep.join(format!("{i}"));
        fs::create_dir(&deep)?;
    }
    write_file(&deep.join("bottom"), &mut rng, 100, 0o444)?;
    dirs.push(edges);

    let max_name = if opts.long_names { 255 } else { 200 };
    for _ in 0..opts.random_entries {
        let parent = dirs[rng.below(dirs.len() as u64) as usize].clone();
        let limit = if rng.below(8) == 0 { max_name } else { 16 };
        let path = parent.join(random_name(&mut rng, limit));
        if fs::symlink_metadata(&path).is_ok() {
            continue;
        }
        match rng.below(10) {
            0..=1 => {
                fs::create_dir(&path)?;
                dirs.push(path);
            }
            2 => {
                let len = 1 + rng.below(4095) as usize;
                let target: Vec<u8> = (0..len).map(|_| b'!' + rng.below(90) as u8).collect();
                symlink(OsString::from_vec(target), &path)?;
            }
            3 if !files.is_empty() => {
                let original = &files[rng.below(files.len() as u64) as usize];
                fs::hard_link(original, &path)?;
            }
            _ => {
                let size = match rng.below(4) {
                    0 => rng.below(64) as usize,
                    1 => rng.below(8192) as usize,
                    2 => 4096 * (1 + rng.below(4) as usize) + rng.below(3) as usize - 1,
                    _ => rng.below(200_000) as usize,
                };
                let mode = [0o444, 0o555, 0o644, 0o755, 0o600][rng.below(5) as usize];
                write_file(&path, &mut rng, size, mode)?;
                files.push(path);
            }
        }
    }
    // Directories become read-only like a store's, deepest first so the walk can finish.
    for dir in dirs.iter().rev() {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o555))?;
    }
    Ok(())
}
