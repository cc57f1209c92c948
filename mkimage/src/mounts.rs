//! The mount points below a tree, so that a snapshot can stay on the tree's own mount.
//!
//! A mount below the tree (a tmpfs, `/proc` under `--dir /`, a bind mount of an ancestor
//! that would make the walk endless) is not part of it. The mount table names every mount
//! point, whatever the filesystem, and unlike `st_dev` it is not fooled by btrfs
//! subvolumes, which change the device number without being mounts.

use std::collections::HashSet;
use std::ffi::OsString;
use std::io;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};

/// The mount points strictly below `root`, relative to it. `root` is resolved first, as
/// the mount table holds resolved paths.
pub fn mount_points_below(root: &Path) -> io::Result<HashSet<PathBuf>> {
    let root = std::fs::canonicalize(root)?;
    let table = std::fs::read("/proc/self/mountinfo")?;
    Ok(parse_mount_points(&table)
        .into_iter()
        .filter_map(|point| match point.strip_prefix(&root) {
            Ok(rel) if !rel.as_os_str().is_empty() => Some(rel.to_path_buf()),
            _ => None,
        })
        .collect())
}

/// The mount point column (the fifth) of each line of a mountinfo table.
fn parse_mount_points(table: &[u8]) -> Vec<PathBuf> {
    table
        .split(|&b| b == b'\n')
        .filter_map(|line| line.split(|&b| b == b' ').nth(4))
        .map(|field| PathBuf::from(OsString::from_vec(unescape(field))))
        .collect()
}

/// Undoes the kernel's escaping of space, tab, newline and backslash as `\ooo`.
fn unescape(field: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        let octal = field
            .get(i + 1..i + 4)
            .filter(|d| field[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match octal {
            Some(d) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            None => {
                out.push(field[i]);
                i += 1;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_points_are_the_fifth_column_unescaped() {
        let table = b"22 1 0:21 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n\
            30 22 0:25 / /tmp/with\\040space rw shared:2 - tmpfs tmpfs rw\n\
            31 22 0:26 /sub /back\\134slash rw - btrfs /dev/sdb rw\n";
        assert_eq!(
            parse_mount_points(table),
            [
                PathBuf::from("/"),
                PathBuf::from("/tmp/with space"),
                PathBuf::from("/back\\slash"),
            ]
        );
    }

    #[test]
    fn proc_is_below_the_root() {
        let below = mount_points_below(Path::new("/")).unwrap();
        assert!(below.contains(Path::new("proc")), "{below:?}");
        assert!(!below.contains(Path::new("")), "{below:?}");
    }
}
