//! Turning a closure view into the writer's tree of inodes.
//!
//! The walk goes through [`View`], the same descriptor-relative, identity-checked traversal
//! the FUSE daemon serves from, so an image can never hold a byte the mount would not show.
//! Only metadata is gathered here; file contents are opened through the view again while
//! the image is written, so no descriptor is held per file.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nixstorefs::view::{Attr, Kind, NodeId, View, ROOT_ID};

use crate::erofs::{FileSource, Inode, InodeKind, OpenFile};

/// How the snapshot maps host metadata into the image.
#[derive(Clone, Debug)]
pub struct SnapshotOptions {
    /// Owner of every inode.
    pub uid: u32,
    /// Group of every inode.
    pub gid: u32,
    /// Modification time of every inode; `None` keeps the host's.
    pub mtime: Option<i64>,
    /// Keep hard links as one inode. Off by default so that an optimised store (where
    /// identical files are hard links) and an unoptimised one give the same image.
    pub preserve_hardlinks: bool,
    /// Drop the `~nix~case~hack~N` suffixes macOS stores give names that differ only in case.
    pub strip_case_hack: bool,
    /// Paths (relative to the view's root) where another filesystem is mounted: left out,
    /// with everything below them.
    pub left_out: HashSet<PathBuf>,
    /// Paths (relative to the view's root) where a mount shows one of their own ancestors
    /// (given with each), so that the tree would hold itself: an error when reached.
    pub loops: HashMap<PathBuf, PathBuf>,
    /// Extra regular files at the image root: `(name, contents)`, e.g. the registration.
    pub extra_root_files: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Default for SnapshotOptions {
    fn default() -> Self {
        SnapshotOptions {
            uid: 0,
            gid: 0,
            mtime: Some(0),
            preserve_hardlinks: false,
            strip_case_hack: false,
            left_out: HashSet::new(),
            loops: HashMap::new(),
            extra_root_files: Vec::new(),
        }
    }
}

/// The tree to write, with counts for the summary.
#[derive(Debug)]
pub struct Snapshot {
    /// The inode arena; index 0 is the root.
    pub inodes: Vec<Inode>,
    /// Host path of each inode (relative to the view's root), for error messages.
    pub paths: Vec<PathBuf>,
}

/// A failure while walking the view.
#[derive(Debug)]
pub struct SnapshotError {
    /// The path below the view's root.
    pub path: PathBuf,
    /// What went wrong.
    pub cause: std::io::Error,
}

impl std::fmt::Display for SnapshotError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path.display(), self.cause)
    }
}

impl std::error::Error for SnapshotError {}

/// Opens a regular file through the view when the writer needs its contents.
#[derive(Debug)]
struct ViewFile {
    view: Arc<View>,
    /// The directory it was found in and its name there: the file is opened by that name,
    /// checked to be node `id`.
    parent: NodeId,
    name: std::ffi::OsString,
    id: NodeId,
}

impl OpenFile for ViewFile {
    fn open(&self) -> std::io::Result<OwnedFd> {
        self.view
            .open_entry(self.parent, &self.name, self.id)
            .map(|file| file.fd)
            .map_err(|e| std::io::Error::from_raw_os_error(e.raw_os_error()))
    }
}

/// What Nix appends to names that differ only in case from another in the same directory,
/// on case-insensitive filesystems (followed by a number).
const CASE_HACK: &[u8] = b"~nix~case~hack~";

/// `name` as Nix reads it back with `use-case-hack`: cut at the first `~nix~case~hack~`,
/// whatever follows it.
fn strip_case_hack(name: &[u8]) -> &[u8] {
    match name.windows(CASE_HACK.len()).position(|w| w == CASE_HACK) {
        Some(pos) => &name[..pos],
        None => name,
    }
}

/// A device number as the image stores it: erofs has 32 bits for it, which hold Linux's
/// 12-bit major and 20-bit minor in the encoding `stat` uses for them.
fn image_rdev(rdev: u64) -> Result<u32, std::io::Error> {
    u32::try_from(rdev).map_err(|_| {
        let (major, minor) = (rustix::fs::major(rdev), rustix::fs::minor(rdev));
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "device number {major}:{minor} does not fit an erofs image (majors up to \
                 4095, minors up to 1048575)"
            ),
        )
    })
}

/// Walks `view` from its root and returns the inode tree for the writer.
pub fn snapshot(view: &Arc<View>, options: &SnapshotOptions) -> Result<Snapshot, SnapshotError> {
    let mut snap = Snapshot {
        inodes: Vec::new(),
        paths: Vec::new(),
    };
    let root_attr = view.getattr(ROOT_ID).map_err(|e| SnapshotError {
        path: PathBuf::from("."),
        cause: e.into(),
    })?;
    snap.push(
        dir_inode(&root_attr, options, root_attr.perm),
        PathBuf::new(),
    );
    // Host node -> arena index, for hard links (only filled when they are preserved).
    let mut linked: HashMap<NodeId, usize> = HashMap::new();
    // Directory node -> arena index. Directories have no hard links and a node is one
    // host object on one mount, so a node reached twice means a filesystem reporting one
    // identity for two directories; written as found, the tree could be endless.
    let mut entered: HashMap<NodeId, usize> = HashMap::from([(ROOT_ID, 0)]);
    // Directories still to list: (arena index, view node).
    let mut pending = vec![(0usize, ROOT_ID)];
    while let Some((index, id)) = pending.pop() {
        let dir_path = snap.paths[index].clone();
        let fail = |path: &Path, e: rustix::io::Errno| SnapshotError {
            path: path.to_owned(),
            cause: e.into(),
        };
        let listing = view.list(id).map_err(|e| fail(&dir_path, e))?;
        let mut entries: Vec<(Vec<u8>, usize)> = Vec::with_capacity(listing.len());
        for entry in listing.iter() {
            let path = dir_path.join(&entry.name);
            if let Some(ancestor) = options.loops.get(&path) {
                let ancestor = match ancestor.as_os_str() {
                    a if a.is_empty() => Path::new("."),
                    a => Path::new(a),
                };
                return Err(SnapshotError {
                    cause: std::io::Error::other(format!(
                        "a mount here shows {} again, an ancestor in the tree (which would \
                         hold itself); without --cross-mounts it is left out",
                        ancestor.display()
                    )),
                    path,
                });
            }
            if options.left_out.contains(&path) {
                tracing::warn!(
                    "leaving out {}: another filesystem is mounted there (--cross-mounts \
                     includes it)",
                    path.display()
                );
                continue;
            }
            let attr = view.lookup(id, &entry.name).map_err(|e| fail(&path, e))?;
            // The walk holds no references: what it needs later is reachable by number.
            view.forget(attr.ino, 1);
            let mut name = entry.name.as_bytes();
            if options.strip_case_hack {
                name = strip_case_hack(name);
                if name.is_empty() {
                    return Err(SnapshotError {
                        path,
                        cause: std::io::Error::new(
                            std::io::ErrorKind::InvalidData,
                            "nothing is left of this name without its case-hack suffix",
                        ),
                    });
                }
            }
            let child = match (attr.kind, linked.get(&attr.ino)) {
                (Kind::Directory, _) => {
                    if let Some(&first) = entered.get(&attr.ino) {
                        let first = match snap.paths[first].as_os_str() {
                            f if f.is_empty() => Path::new("."),
                            f => Path::new(f),
                        };
                        return Err(SnapshotError {
                            cause: std::io::Error::other(format!(
                                "this directory has the identity of {}, entered before (the \
                                 walk could go on forever)",
                                first.display()
                            )),
                            path,
                        });
                    }
                    let child = snap.push(dir_inode(&attr, options, attr.perm), path);
                    entered.insert(attr.ino, child);
                    pending.push((child, attr.ino));
                    child
                }
                (_, Some(&existing)) => existing,
                (kind, None) => {
                    let inode_kind = match kind {
                        Kind::RegularFile => InodeKind::RegularFile {
                            size: attr.size,
                            source: FileSource::Open(Arc::new(ViewFile {
                                view: view.clone(),
                                parent: id,
                                name: entry.name.clone(),
                                id: attr.ino,
                            })),
                        },
                        Kind::Symlink => InodeKind::Symlink {
                            target: view.readlink(attr.ino).map_err(|e| fail(&path, e))?,
                        },
                        Kind::CharDevice => InodeKind::CharDevice {
                            rdev: image_rdev(attr.rdev).map_err(|cause| SnapshotError {
                                path: path.clone(),
                                cause,
                            })?,
                        },
                        Kind::BlockDevice => InodeKind::BlockDevice {
                            rdev: image_rdev(attr.rdev).map_err(|cause| SnapshotError {
                                path: path.clone(),
                                cause,
                            })?,
                        },
                        Kind::Fifo => InodeKind::Fifo,
                        Kind::Socket => InodeKind::Socket,
                        Kind::Directory => unreachable!("handled above"),
                    };
                    let child = snap.push(leaf_inode(&attr, options, inode_kind), path);
                    if options.preserve_hardlinks && attr.nlink > 1 {
                        linked.insert(attr.ino, child);
                    }
                    child
                }
            };
            entries.push((name.to_vec(), child));
        }
        if index == 0 {
            for (name, contents) in &options.extra_root_files {
                let file = Inode {
                    kind: InodeKind::RegularFile {
                        size: contents.len() as u64,
                        source: FileSource::Bytes(contents.clone()),
                    },
                    mode: 0o444,
                    uid: options.uid,
                    gid: options.gid,
                    mtime: options.mtime.unwrap_or(1),
                    mtime_nsec: 0,
                    nlink_hint: None,
                };
                let child = snap.push(file, PathBuf::from(OsStr::from_bytes(name)));
                entries.push((name.clone(), child));
            }
        }
        check_unique(&mut entries, &snap.paths)?;
        snap.inodes[index].kind = InodeKind::Directory { entries };
    }
    Ok(snap)
}

impl Snapshot {
    fn push(&mut self, inode: Inode, path: PathBuf) -> usize {
        self.inodes.push(inode);
        self.paths.push(path);
        self.inodes.len() - 1
    }
}

/// Refuses two entries of one directory with the same name (possible once case-hack
/// suffixes are stripped, or with an extra root file), naming both.
fn check_unique(entries: &mut [(Vec<u8>, usize)], paths: &[PathBuf]) -> Result<(), SnapshotError> {
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    if let Some(w) = entries.windows(2).find(|w| w[0].0 == w[1].0) {
        return Err(SnapshotError {
            path: paths[w[1].1].clone(),
            cause: std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!(
                    "has the same name in the image as {}",
                    paths[w[0].1].display()
                ),
            ),
        });
    }
    Ok(())
}

fn mtime(attr: &Attr, options: &SnapshotOptions) -> (i64, u32) {
    match options.mtime {
        Some(t) => (t, 0),
        None => (attr.mtime.secs, attr.mtime.nsecs),
    }
}

fn dir_inode(attr: &Attr, options: &SnapshotOptions, mode: u16) -> Inode {
    let (mtime, mtime_nsec) = mtime(attr, options);
    Inode {
        kind: InodeKind::Directory {
            entries: Vec::new(),
        },
        mode,
        uid: options.uid,
        gid: options.gid,
        mtime,
        mtime_nsec,
        nlink_hint: None,
    }
}

fn leaf_inode(attr: &Attr, options: &SnapshotOptions, kind: InodeKind) -> Inode {
    let (mtime, mtime_nsec) = mtime(attr, options);
    Inode {
        kind,
        mode: attr.perm,
        uid: options.uid,
        gid: options.gid,
        mtime,
        mtime_nsec,
        nlink_hint: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn case_hack_suffix_is_stripped_as_nix_does() {
        assert_eq!(strip_case_hack(b"Makefile~nix~case~hack~1"), b"Makefile");
        assert_eq!(strip_case_hack(b"a~nix~case~hack~12"), b"a");
        // Nix cuts at the first suffix, whatever follows it.
        assert_eq!(strip_case_hack(b"a~nix~case~hack~"), b"a");
        assert_eq!(strip_case_hack(b"a~nix~case~hack~1x"), b"a");
        assert_eq!(strip_case_hack(b"a~nix~case~hack~1~nix~case~hack~2"), b"a");
        assert_eq!(strip_case_hack(b"~nix~case~hack~1"), b"");
        assert_eq!(strip_case_hack(b"a~nix~case~hac"), b"a~nix~case~hac");
        assert_eq!(strip_case_hack(b"plain"), b"plain");
    }

    #[test]
    fn device_numbers_must_fit_the_image() {
        let fits = rustix::fs::makedev(4095, 1_048_575);
        assert_eq!(image_rdev(fits).unwrap() as u64, fits);
        assert_eq!(image_rdev(rustix::fs::makedev(8, 1)).unwrap(), 0x801);
        let e = image_rdev(rustix::fs::makedev(4096, 0)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "device number 4096:0 does not fit an erofs image (majors up to 4095, minors up \
             to 1048575)"
        );
        assert!(image_rdev(rustix::fs::makedev(1, 1_048_576)).is_err());
    }

    /// Snapshots a directory tree through a whole-directory view.
    fn snapshot_of(dir: &Path, options: &SnapshotOptions) -> Result<Snapshot, SnapshotError> {
        let view = View::whole_directory(dir, nixstorefs::view::ViewOptions::default()).unwrap();
        snapshot(&Arc::new(view), options)
    }

    fn root_names(snap: &Snapshot) -> Vec<String> {
        match &snap.inodes[0].kind {
            InodeKind::Directory { entries } => entries
                .iter()
                .map(|(n, _)| String::from_utf8(n.clone()).unwrap())
                .collect(),
            _ => panic!("the root is not a directory"),
        }
    }

    #[test]
    fn case_hack_names_in_a_tree() {
        let tmp = tempfile::tempdir().unwrap();
        for name in ["Makefile", "makefile~nix~case~hack~1", "x~nix~case~hack~1x"] {
            std::fs::write(tmp.path().join(name), name).unwrap();
        }
        let options = SnapshotOptions {
            strip_case_hack: true,
            ..SnapshotOptions::default()
        };
        let snap = snapshot_of(tmp.path(), &options).unwrap();
        assert_eq!(root_names(&snap), ["Makefile", "makefile", "x"]);
        let plain = snapshot_of(tmp.path(), &SnapshotOptions::default()).unwrap();
        assert_eq!(
            root_names(&plain),
            ["Makefile", "makefile~nix~case~hack~1", "x~nix~case~hack~1x"]
        );

        // A true collision, as Nix reports one, names both entries.
        std::fs::write(tmp.path().join("Makefile~nix~case~hack~2"), "").unwrap();
        let e = snapshot_of(tmp.path(), &options).unwrap_err();
        let cause = e.cause.to_string();
        let other = cause
            .strip_prefix("has the same name in the image as ")
            .unwrap_or_else(|| panic!("{e}"));
        let mut both = [e.path.to_str().unwrap(), other];
        both.sort();
        assert_eq!(both, ["Makefile", "Makefile~nix~case~hack~2"], "{e}");
        std::fs::remove_file(tmp.path().join("Makefile~nix~case~hack~2")).unwrap();

        std::fs::write(tmp.path().join("~nix~case~hack~1"), "").unwrap();
        let e = snapshot_of(tmp.path(), &options).unwrap_err();
        assert_eq!(e.path, Path::new("~nix~case~hack~1"));
    }
}
