//! `/proc/self/mountinfo`, read once for the whole workspace.
//!
//! The daemon (to find its mount's device for the read-ahead setting), mkimage (to find
//! mounts below a tree), guest-init (to see what is mounted at `/nix/.ro-store`) and the
//! tests all need the mount table. Each line is `ID PARENT MAJOR:MINOR ROOT POINT OPTIONS
//! [OPTIONAL...] - TYPE SOURCE SUPER_OPTIONS` (proc(5)); the kernel escapes space, tab,
//! newline and backslash in the path fields as `\ooo`. Parsers written four times undid
//! one escape, or none; this one undoes all of them, keeps paths as bytes (a path need
//! not be UTF-8), and skips a line it cannot read rather than failing the table.
//!
//! No dependencies, so that the static guest-init can use it.

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};

/// One mount, as a line of the table describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mount {
    /// The mount's id (unique while it is mounted).
    pub id: u64,
    /// The id of the mount it is mounted on.
    pub parent_id: u64,
    /// The major number of the filesystem's device.
    pub major: u32,
    /// The minor number; for FUSE, the connection's number under
    /// `/sys/fs/fuse/connections`.
    pub minor: u32,
    /// The directory of the filesystem the mount shows (`/` unless it is a bind mount of
    /// a subdirectory).
    pub root: PathBuf,
    /// Where it is mounted.
    pub mount_point: PathBuf,
    /// Per-mount options (`ro`, `nosuid`, ...).
    pub mount_options: Vec<String>,
    /// The filesystem type (`ext4`, `fuse.nixstorefs`, `virtiofs`, ...).
    pub fs_type: String,
    /// The mount source (a device, a tag, a closure file, `none`).
    pub source: OsString,
    /// The filesystem's own options.
    pub super_options: Vec<String>,
}

impl Mount {
    /// The device number as `major:minor`, as `/sys/class/bdi` names it.
    pub fn device(&self) -> String {
        format!("{}:{}", self.major, self.minor)
    }

    /// The source, lossily as text (for messages and comparisons with text).
    pub fn source_lossy(&self) -> String {
        self.source.to_string_lossy().into_owned()
    }
}

/// The mounts of this process's mount namespace, in mount order (a mount stacked on top
/// of another comes after it).
pub fn read() -> std::io::Result<Vec<Mount>> {
    Ok(parse(&std::fs::read("/proc/self/mountinfo")?))
}

/// The mounts described by `table`, the contents of a mountinfo file; lines that cannot be
/// read are left out.
pub fn parse(table: &[u8]) -> Vec<Mount> {
    table.split(|&b| b == b'\n').filter_map(line).collect()
}

/// The topmost mount on exactly `path` in `mounts`.
pub fn top_at<'a>(mounts: &'a [Mount], path: &Path) -> Option<&'a Mount> {
    mounts.iter().rev().find(|m| m.mount_point == path)
}

fn line(line: &[u8]) -> Option<Mount> {
    let fields: Vec<&[u8]> = line.split(|&b| b == b' ').collect();
    // The optional fields end with a lone "-".
    let dash = fields.iter().skip(6).position(|f| *f == b"-")? + 6;
    let text = |b: &[u8]| std::str::from_utf8(b).ok().map(str::to_owned);
    let number = |b: &[u8]| text(b)?.parse().ok();
    let (major, minor) = text(fields.get(2)?)?
        .split_once(':')
        .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)))?;
    let list = |b: Option<&&[u8]>| {
        b.map(|b| {
            String::from_utf8_lossy(b)
                .split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
    };
    Some(Mount {
        id: number(fields.first()?)?,
        parent_id: number(fields.get(1)?)?,
        major,
        minor,
        root: PathBuf::from(unescape(fields.get(3)?)),
        mount_point: PathBuf::from(unescape(fields.get(4)?)),
        mount_options: list(fields.get(5)),
        fs_type: String::from_utf8_lossy(&unescape_bytes(fields.get(dash + 1)?)).into_owned(),
        source: unescape(fields.get(dash + 2).copied().unwrap_or(b"")),
        super_options: list(fields.get(dash + 3)),
    })
}

/// Undoes the kernel's `\ooo` escapes in one field.
pub fn unescape(field: &[u8]) -> OsString {
    OsString::from_vec(unescape_bytes(field))
}

fn unescape_bytes(field: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        let octal = field
            .get(i + 1..i + 4)
            .filter(|d| field[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match octal {
            Some(d) => {
                let v = u32::from(d[0] - b'0') * 64
                    + u32::from(d[1] - b'0') * 8
                    + u32::from(d[2] - b'0');
                match u8::try_from(v) {
                    Ok(v) => out.push(v),
                    // Not an escape the kernel writes (over 0o377): kept as it is.
                    Err(_) => out.extend_from_slice(&field[i..i + 4]),
                }
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

    const TABLE: &[u8] = b"22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw,errors=remount-ro\n\
        90 22 0:52 / /tmp/a\\040b\\011c\\012d\\134e rw,nosuid,nodev master:3 shared:9 - fuse.nixstorefs /etc/closure\\040list.txt ro,user_id=0\n\
        91 90 0:53 /sub/dir /mnt rw - tmpfs none rw\n\
        this line is not one\n\
        92 22 0:54 / /nix/.ro-store ro - virtiofs nix-store rw\n";

    #[test]
    fn every_field_is_read() {
        let m = parse(TABLE);
        assert_eq!(m.len(), 4, "the malformed line is left out");
        assert_eq!(
            (m[0].id, m[0].parent_id, m[0].major, m[0].minor),
            (22, 1, 8, 1)
        );
        assert_eq!(m[0].device(), "8:1");
        assert_eq!(m[0].mount_options, ["rw", "relatime"]);
        assert_eq!(m[0].fs_type, "ext4");
        assert_eq!(m[0].source, "/dev/sda1");
        assert_eq!(m[0].super_options, ["rw", "errors=remount-ro"]);
        assert_eq!(m[2].root, Path::new("/sub/dir"));
        assert_eq!(m[3].fs_type, "virtiofs");
    }

    #[test]
    fn every_escape_is_undone() {
        let m = &parse(TABLE)[1];
        // Space, tab, newline and backslash, with optional fields before the dash.
        assert_eq!(m.mount_point, Path::new("/tmp/a b\tc\nd\\e"));
        assert_eq!(m.source, "/etc/closure list.txt");
        assert_eq!(m.fs_type, "fuse.nixstorefs");
        assert_eq!(unescape(b"\\777x\\"), "\\777x\\");
        assert_eq!(unescape(b"\\04"), "\\04");
    }

    #[test]
    fn the_topmost_mount_wins() {
        let table = b"1 0 8:1 / / rw - ext4 a rw\n2 1 0:1 / /m rw - tmpfs first rw\n3 2 0:2 / /m rw - tmpfs second rw\n";
        let m = parse(table);
        assert_eq!(top_at(&m, Path::new("/m")).unwrap().source, "second");
        assert!(top_at(&m, Path::new("/other")).is_none());
    }

    #[test]
    fn this_process_has_a_root_mount() {
        let mounts = read().unwrap();
        assert!(mounts.iter().any(|m| m.mount_point == Path::new("/")));
    }
}
