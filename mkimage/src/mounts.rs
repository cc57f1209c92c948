//! The mount points below a tree, so that a snapshot can stay on the tree's own mount, and
//! knows the bind mounts that would make the tree hold itself.
//!
//! A mount below the tree (a tmpfs, `/proc` under `--dir /`, a bind mount of an ancestor)
//! is not part of it. The mount table names every mount point, whatever the filesystem,
//! and unlike `st_dev` it is not fooled by btrfs subvolumes, which change the device
//! number without being mounts. It also says which directory of which filesystem each
//! mount shows, so a bind mount of one of its own ancestors is recognised as such (node
//! identities cannot: the same directory on another mount is another node).

use std::collections::{HashMap, HashSet};
use std::io;
use std::path::{Path, PathBuf};

/// What is mounted below a tree, by path relative to it.
#[derive(Debug, Default)]
pub struct MountsBelow {
    /// Every mount point strictly below the tree.
    pub points: HashSet<PathBuf>,
    /// The mount points that show a directory holding one of their own ancestors in the
    /// tree (a bind mount of it, or of something above it), so that the tree would hold
    /// itself; with that ancestor (`""` for the tree's root).
    pub loops: HashMap<PathBuf, PathBuf>,
}

/// One line of the mount table.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Mount {
    /// `major:minor` of the filesystem.
    dev: String,
    /// The directory of that filesystem the mount shows.
    root: PathBuf,
    /// Where it is mounted.
    point: PathBuf,
}

/// The mounts below `root`. `root` is resolved first, as the mount table holds resolved
/// paths.
pub fn mounts_below(root: &Path) -> io::Result<MountsBelow> {
    let root = std::fs::canonicalize(root)?;
    let table = std::fs::read("/proc/self/mountinfo")?;
    Ok(below(&parse(&table), &root))
}

fn below(table: &[Mount], root: &Path) -> MountsBelow {
    let mut found = MountsBelow::default();
    for (i, m) in table.iter().enumerate() {
        let Ok(rel) = m.point.strip_prefix(root) else {
            continue;
        };
        if rel.as_os_str().is_empty() {
            continue;
        }
        found.points.insert(rel.to_path_buf());
        // The ancestors of the mount point inside the tree, each as its filesystem and
        // directory there, as seen before this mount was made: if the mount shows that
        // directory or one above it, the tree holds itself there. Named: the ancestor the
        // mount shows exactly, else the topmost one it holds.
        let earlier = &table[..i];
        let mut held = None;
        let mut ancestor = m.point.parent();
        while let Some(a) = ancestor.filter(|a| a.starts_with(root)) {
            if let Some((dev, dir)) = shown_at(earlier, a) {
                if dev == m.dev && dir.starts_with(&m.root) {
                    held = Some(a);
                    if dir == m.root {
                        break;
                    }
                }
            }
            ancestor = a.parent();
        }
        if let Some(a) = held {
            let within = a.strip_prefix(root).unwrap_or(Path::new(""));
            found.loops.insert(rel.to_path_buf(), within.to_path_buf());
        }
    }
    found
}

/// The filesystem and its directory that `path` shows, given the mounts in `table`: the
/// last (topmost) mount on the longest mount point above or at `path`.
fn shown_at<'a>(table: &'a [Mount], path: &Path) -> Option<(&'a str, PathBuf)> {
    let m = table
        .iter()
        .filter(|m| path.starts_with(&m.point))
        .max_by_key(|m| m.point.components().count())?;
    // Among mounts on that same point, the one listed last is on top.
    let top = table.iter().rev().find(|t| t.point == m.point)?;
    let rest = path.strip_prefix(&top.point).ok()?;
    Some((&top.dev, top.root.join(rest)))
}

/// The lines of a mountinfo table.
fn parse(table: &[u8]) -> Vec<Mount> {
    mountinfo::parse(table)
        .into_iter()
        .map(|m| Mount {
            dev: m.device(),
            root: m.root,
            point: m.mount_point,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: &[u8] = b"22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n\
        30 22 0:25 / /tmp/with\\040space rw shared:2 - tmpfs tmpfs rw\n\
        31 22 0:26 /sub /back\\134slash rw - btrfs /dev/sdb rw\n\
        40 22 8:1 /srv/tree /srv/tree/a/b/loop rw - ext4 /dev/sda1 rw\n\
        41 22 8:1 /srv/tree/a /srv/tree/c rw - ext4 /dev/sda1 rw\n\
        42 22 8:1 /srv/other /srv/tree/d rw - ext4 /dev/sda1 rw\n\
        43 22 0:25 / /srv/tree/e rw - tmpfs tmpfs rw\n";

    #[test]
    fn the_table_is_parsed_and_unescaped() {
        let table = parse(TABLE);
        assert_eq!(table.len(), 7);
        assert_eq!(
            table[1],
            Mount {
                dev: "0:25".into(),
                root: "/".into(),
                point: "/tmp/with space".into(),
            }
        );
        assert_eq!(table[2].root, Path::new("/sub"));
        assert_eq!(table[2].point, Path::new("/back\\slash"));
    }

    #[test]
    fn binds_of_ancestors_are_loops_and_other_mounts_are_not() {
        let found = below(&parse(TABLE), Path::new("/srv/tree"));
        let points: HashSet<PathBuf> = ["a/b/loop", "c", "d", "e"]
            .iter()
            .map(PathBuf::from)
            .collect();
        assert_eq!(found.points, points);
        // The tree's root mounted two levels down; `a` mounted beside it is no loop, nor
        // is another directory of the same filesystem, nor a tmpfs.
        assert_eq!(
            found.loops,
            HashMap::from([(PathBuf::from("a/b/loop"), PathBuf::from(""))])
        );
        // From `a`, the mount shows a directory above the tree: a loop all the same.
        let from_a = below(&parse(TABLE), Path::new("/srv/tree/a"));
        assert_eq!(
            from_a.loops,
            HashMap::from([(PathBuf::from("b/loop"), PathBuf::from(""))])
        );
        // The whole filesystem mounted inside the tree holds the tree too.
        let whole = parse(
            [
                &b"22 1 8:1 / / rw - ext4 /dev/sda1 rw\n"[..],
                b"50 22 8:1 / /srv/tree/a/all rw - ext4 /dev/sda1 rw\n",
            ]
            .concat()
            .as_slice(),
        );
        assert_eq!(
            below(&whole, Path::new("/srv/tree")).loops,
            HashMap::from([(PathBuf::from("a/all"), PathBuf::from(""))])
        );
    }

    #[test]
    fn proc_is_below_the_root() {
        let below = mounts_below(Path::new("/")).unwrap();
        assert!(below.points.contains(Path::new("proc")), "{below:?}");
        assert!(!below.points.contains(Path::new("")), "{below:?}");
    }
}
