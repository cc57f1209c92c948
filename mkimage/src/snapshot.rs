//! Turning a closure view into the writer's tree of inodes.
//!
//! The walk goes through [`View`], the same descriptor-relative, identity-checked traversal
//! the FUSE daemon serves from, so an image can never hold a byte the mount would not show.
//! Only metadata is gathered here; file contents are opened through the view again while
//! the image is written, so no descriptor is held per file.

use std::collections::HashMap;
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

const CASE_HACK: &[u8] = b"~nix~case~hack~";

/// `name` without a trailing `~nix~case~hack~N`, if it has one.
fn strip_case_hack(name: &[u8]) -> &[u8] {
    if let Some(pos) = name.windows(CASE_HACK.len()).rposition(|w| w == CASE_HACK) {
        let digits = &name[pos + CASE_HACK.len()..];
        if !digits.is_empty() && digits.iter().all(u8::is_ascii_digit) {
            return &name[..pos];
        }
    }
    name
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
            let attr = view.lookup(id, &entry.name).map_err(|e| fail(&path, e))?;
            // The walk holds no references: what it needs later is reachable by number.
            view.forget(attr.ino, 1);
            let mut name = entry.name.as_bytes();
            if options.strip_case_hack {
                name = strip_case_hack(name);
            }
            let child = match (attr.kind, linked.get(&attr.ino)) {
                (Kind::Directory, _) => {
                    let child = snap.push(dir_inode(&attr, options, attr.perm), path);
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
                            rdev: attr.rdev as u32,
                        },
                        Kind::BlockDevice => InodeKind::BlockDevice {
                            rdev: attr.rdev as u32,
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
        check_unique(&mut entries, &dir_path)?;
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
/// suffixes are stripped, or with an extra root file).
fn check_unique(entries: &mut [(Vec<u8>, usize)], dir: &Path) -> Result<(), SnapshotError> {
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    if let Some(w) = entries.windows(2).find(|w| w[0].0 == w[1].0) {
        return Err(SnapshotError {
            path: dir.join(OsStr::from_bytes(&w[0].0)),
            cause: std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "two entries of this directory have this name in the image",
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
    fn case_hack_suffix_is_stripped() {
        assert_eq!(strip_case_hack(b"Makefile~nix~case~hack~1"), b"Makefile");
        assert_eq!(strip_case_hack(b"a~nix~case~hack~12"), b"a");
        assert_eq!(strip_case_hack(b"a~nix~case~hack~"), b"a~nix~case~hack~");
        assert_eq!(
            strip_case_hack(b"a~nix~case~hack~1x"),
            b"a~nix~case~hack~1x"
        );
        assert_eq!(strip_case_hack(b"plain"), b"plain");
    }
}
