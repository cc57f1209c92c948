//! Comparing a copy of a tree (a mount, an image) with the host tree it came from.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// What a copy keeps of the host's metadata; content, type, mode, size and symlink targets
/// must always be equal.
#[derive(Clone, Copy, Debug)]
pub struct Expect {
    /// `None`: the host's mtime; `Some(t)`: every entry has mtime `t` (seconds, nanoseconds).
    pub mtime: Option<(i64, i64)>,
    /// What becomes of hard links.
    pub links: Links,
    /// Directories have the host's size (a mount); an image's directories have the size
    /// of their own entries.
    pub dir_sizes: bool,
}

/// What a copy does with hard links.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Links {
    /// They share an inode and keep the host's link count (a mount).
    AsHost,
    /// They share an inode; the link count is the copy's own (an image of part of a store:
    /// links from outside it are gone). Files without links keep a count of 1.
    Shared,
    /// Every entry is a file of its own, with one link.
    Separate,
}

impl Default for Expect {
    fn default() -> Self {
        Expect {
            mtime: None,
            links: Links::AsHost,
            dir_sizes: true,
        }
    }
}

impl Default for TreeCheck {
    fn default() -> Self {
        Self::new()
    }
}

pub fn sorted_names(dir: &Path) -> io::Result<Vec<OsString>> {
    let mut v: Vec<OsString> = fs::read_dir(dir)?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<io::Result<_>>()?;
    v.sort();
    Ok(v)
}

pub fn root_names(mnt: &Path) -> Vec<String> {
    sorted_names(mnt)
        .unwrap_or_else(|e| panic!("readdir of the mount root: {e}"))
        .into_iter()
        .map(|n| n.into_string().expect("root names are UTF-8"))
        .collect()
}

/// Compares two files' bytes in chunks, without hashing (hashing 64 MiB is slow in debug).
pub fn compare_content(host: &Path, mnt: &Path) -> Result<(), String> {
    let mut a = File::open(host).map_err(|e| format!("open host {host:?}: {e}"))?;
    let mut b = File::open(mnt).map_err(|e| format!("open {mnt:?}: {e}"))?;
    let mut ba = vec![0u8; 1 << 20];
    let mut bb = vec![0u8; 1 << 20];
    let mut offset = 0u64;
    loop {
        let na = read_full(&mut a, &mut ba).map_err(|e| format!("read host {host:?}: {e}"))?;
        let nb = read_full(&mut b, &mut bb).map_err(|e| format!("read {mnt:?}: {e}"))?;
        if ba[..na] != bb[..nb] {
            let first = ba[..na]
                .iter()
                .zip(&bb[..nb])
                .position(|(x, y)| x != y)
                .unwrap_or(na.min(nb));
            return Err(format!(
                "{mnt:?}: content differs from the host at byte {} (host chunk {na} bytes, mount {nb})",
                offset + first as u64
            ));
        }
        if na == 0 {
            return Ok(());
        }
        offset += na as u64;
    }
}

pub fn read_full(f: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Walks `host` and `mnt` side by side and records every difference in `problems`.
/// `inodes` maps host (dev, ino) to mount ino and back, so that hard links and distinct
/// files can be checked across the whole walk.
pub struct TreeCheck {
    /// Which host properties the copy must have.
    pub expect: Expect,
    problems: Vec<String>,
    host_to_mnt: HashMap<(u64, u64), u64>,
    mnt_to_host: HashMap<u64, (u64, u64)>,
    entries: usize,
}

impl TreeCheck {
    /// A check of a copy that must keep everything, as a mount does.
    pub fn new() -> Self {
        Self::with(Expect::default())
    }

    /// A check of a copy that keeps what `expect` says.
    pub fn with(expect: Expect) -> Self {
        TreeCheck {
            expect,
            problems: Vec::new(),
            host_to_mnt: HashMap::new(),
            mnt_to_host: HashMap::new(),
            entries: 0,
        }
    }

    /// Compares `host` and its copy `mnt`, recursively.
    pub fn walk(&mut self, host: &Path, mnt: &Path) {
        self.entries += 1;
        let h = match fs::symlink_metadata(host) {
            Ok(m) => m,
            Err(e) => return self.problems.push(format!("host lstat {host:?}: {e}")),
        };
        let m = match fs::symlink_metadata(mnt) {
            Ok(m) => m,
            Err(e) => return self.problems.push(format!("lstat {mnt:?}: {e}")),
        };
        let p = &mut self.problems;
        if h.file_type() != m.file_type() {
            p.push(format!(
                "{mnt:?}: type {:?}, host has {:?}",
                m.file_type(),
                h.file_type()
            ));
            return;
        }
        if h.mode() & 0o7777 != m.mode() & 0o7777 {
            p.push(format!(
                "{mnt:?}: mode {:o}, host has {:o}",
                m.mode() & 0o7777,
                h.mode() & 0o7777
            ));
        }
        if h.size() != m.size() && (self.expect.dir_sizes || !h.is_dir()) {
            p.push(format!("{mnt:?}: size {}, host has {}", m.size(), h.size()));
        }
        let mtime = self.expect.mtime.unwrap_or((h.mtime(), h.mtime_nsec()));
        if mtime != (m.mtime(), m.mtime_nsec()) {
            p.push(format!(
                "{mnt:?}: mtime {}.{:09}, host has {}.{:09}",
                m.mtime(),
                m.mtime_nsec(),
                mtime.0,
                mtime.1
            ));
        }
        let own_count = self.expect.links == Links::Separate
            || (self.expect.links == Links::Shared && h.nlink() == 1);
        if own_count && !h.is_dir() && m.nlink() != 1 {
            p.push(format!("{mnt:?}: nlink {}, expected 1", m.nlink()));
        } else if (self.expect.links == Links::AsHost || h.is_dir()) && h.nlink() != m.nlink() {
            p.push(format!(
                "{mnt:?}: nlink {}, host has {}",
                m.nlink(),
                h.nlink()
            ));
        }
        let key = (h.dev(), h.ino());
        if self.expect.links == Links::Separate {
            self.walk_content(host, mnt, &h);
            return;
        }
        match self.host_to_mnt.get(&key) {
            Some(&ino) if ino != m.ino() => p.push(format!(
                "{mnt:?}: inode {} but a hard link of it showed inode {ino}",
                m.ino()
            )),
            _ => {}
        }
        match self.mnt_to_host.get(&m.ino()) {
            Some(&other) if other != key => p.push(format!(
                "{mnt:?}: inode {} is shared with a different host file",
                m.ino()
            )),
            _ => {}
        }
        self.host_to_mnt.insert(key, m.ino());
        self.mnt_to_host.insert(m.ino(), key);
        self.walk_content(host, mnt, &h);
    }

    fn walk_content(&mut self, host: &Path, mnt: &Path, h: &fs::Metadata) {
        let ft = h.file_type();
        if ft.is_file() {
            if let Err(e) = compare_content(host, mnt) {
                self.problems.push(e);
            }
        } else if ft.is_symlink() {
            match (fs::read_link(host), fs::read_link(mnt)) {
                (Ok(a), Ok(b)) if a == b => {}
                (a, b) => self
                    .problems
                    .push(format!("{mnt:?}: readlink {b:?}, host has {a:?}")),
            }
        } else if ft.is_dir() {
            self.walk_dir(host, mnt);
        }
    }

    fn walk_dir(&mut self, host: &Path, mnt: &Path) {
        let hn = match sorted_names(host) {
            Ok(v) => v,
            Err(e) => return self.problems.push(format!("host readdir {host:?}: {e}")),
        };
        // Read the mount's entries raw, keeping duplicates and readdir's types.
        let entries: Vec<(OsString, io::Result<fs::FileType>)> = match fs::read_dir(mnt) {
            Ok(rd) => match rd.collect::<io::Result<Vec<_>>>() {
                Ok(v) => v
                    .into_iter()
                    .map(|e| (e.file_name(), e.file_type()))
                    .collect(),
                Err(e) => return self.problems.push(format!("readdir {mnt:?}: {e}")),
            },
            Err(e) => return self.problems.push(format!("opendir {mnt:?}: {e}")),
        };
        let mut mn: Vec<OsString> = entries.iter().map(|(n, _)| n.clone()).collect();
        mn.sort();
        if hn != mn {
            let extra: Vec<_> = mn.iter().filter(|n| !hn.contains(n)).take(5).collect();
            let missing: Vec<_> = hn.iter().filter(|n| !mn.contains(n)).take(5).collect();
            self.problems.push(format!(
                "{mnt:?}: readdir gives {} names, host has {}; extra (or duplicated) {extra:?}, missing {missing:?}",
                mn.len(),
                hn.len()
            ));
        }
        for (name, ty) in &entries {
            let Ok(h) = fs::symlink_metadata(host.join(name)) else {
                continue;
            };
            match ty {
                Ok(t) if *t == h.file_type() => {}
                other => self.problems.push(format!(
                    "{:?}: readdir type {other:?}, host has {:?}",
                    mnt.join(name),
                    h.file_type()
                )),
            }
        }
        for name in hn {
            if mn.contains(&name) {
                self.walk(&host.join(&name), &mnt.join(&name));
            }
        }
    }

    /// Panics with the differences found, if any.
    pub fn assert_clean(&self, what: &str) {
        if !self.problems.is_empty() {
            let shown: Vec<&str> = self.problems.iter().take(40).map(String::as_str).collect();
            panic!(
                "{what}: {} differences from the host (in {} entries), first ones:\n{}",
                self.problems.len(),
                self.entries,
                shown.join("\n")
            );
        }
    }
}
