//! Finding a block device by what it holds, without blkid or udev.
//!
//! An initramfs has neither, so guest-init reads the superblocks itself: the filesystems a
//! store or a root lives on (erofs, ext4, xfs, btrfs) keep their magic, UUID and label at
//! fixed offsets. Partition UUIDs come from the disk's GPT or MBR, as the kernel reads
//! them. Devices are listed from /sys/class/block (loop devices with a backing file
//! included) and their nodes opened under /dev (a devtmpfs).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::config::{format_uuid, Device};

/// A filesystem found on a device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Filesystem {
    /// Its type, as `mount -t` names it.
    pub fstype: &'static str,
    /// Its label (may be empty).
    pub label: String,
    /// Its UUID.
    pub uuid: [u8; 16],
}

/// What a block device holds, as far as finding it goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Probed {
    /// The device node.
    pub node: PathBuf,
    /// The filesystem on it, if guest-init knows its kind.
    pub fs: Option<Filesystem>,
    /// Its partition UUID, if it is a partition of a GPT or MBR disk.
    pub part_uuid: Option<String>,
}

impl std::fmt::Display for Probed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.node.display())?;
        match &self.fs {
            Some(fs) => write!(
                f,
                " ({}, LABEL={}, UUID={}",
                fs.fstype,
                fs.label,
                format_uuid(&fs.uuid)
            )?,
            None => write!(f, " (no known filesystem")?,
        }
        if let Some(p) = &self.part_uuid {
            write!(f, ", PARTUUID={p}")?;
        }
        write!(f, ")")
    }
}

fn read_at(file: &File, offset: u64, len: usize) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; len];
    file.read_exact_at(&mut buf, offset).ok()?;
    Some(buf)
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// A NUL-padded label field.
fn label(field: &[u8]) -> String {
    let len = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    String::from_utf8_lossy(&field[..len]).into_owned()
}

fn uuid_at(b: &[u8], at: usize) -> [u8; 16] {
    b[at..at + 16].try_into().expect("16 bytes")
}

/// Reads the superblock of a filesystem guest-init knows, if `file` holds one.
pub fn filesystem(file: &File) -> Option<Filesystem> {
    // erofs and ext4 both keep their superblock at 1024.
    if let Some(sb) = read_at(file, 1024, 256) {
        if le32(&sb, 0) == 0xE0F5_E1E2 {
            return Some(Filesystem {
                fstype: "erofs",
                label: label(&sb[64..80]),
                uuid: uuid_at(&sb, 48),
            });
        }
        if le16(&sb, 0x38) == 0xEF53 {
            return Some(Filesystem {
                fstype: "ext4",
                label: label(&sb[0x78..0x88]),
                uuid: uuid_at(&sb, 0x68),
            });
        }
    }
    if let Some(sb) = read_at(file, 0, 128) {
        if &sb[0..4] == b"XFSB" {
            return Some(Filesystem {
                fstype: "xfs",
                label: label(&sb[108..120]),
                uuid: uuid_at(&sb, 32),
            });
        }
    }
    if let Some(sb) = read_at(file, 0x10000, 0x22b) {
        if &sb[0x40..0x48] == b"_BHRfS_M" {
            return Some(Filesystem {
                fstype: "btrfs",
                label: label(&sb[0x12b..0x22b]),
                uuid: uuid_at(&sb, 0x20),
            });
        }
    }
    None
}

/// A GPT GUID as text: its first three fields are stored little-endian.
fn guid_text(g: &[u8]) -> String {
    let mut u = [0u8; 16];
    u[..4].copy_from_slice(&[g[3], g[2], g[1], g[0]]);
    u[4..6].copy_from_slice(&[g[5], g[4]]);
    u[6..8].copy_from_slice(&[g[7], g[6]]);
    u[8..].copy_from_slice(&g[8..16]);
    format_uuid(&u)
}

/// The partition UUID of partition `number` of `disk`, as the kernel spells it: the
/// entry's GUID on a GPT disk, `SSSSSSSS-PP` (disk signature, number) on an MBR one.
pub fn partition_uuid(disk: &File, number: u32, sector: u64) -> Option<String> {
    if number == 0 {
        return None;
    }
    let header = read_at(disk, sector, 92)?;
    if &header[0..8] == b"EFI PART" {
        let entries = le64(&header, 72);
        let count = le32(&header, 80);
        let size = u64::from(le32(&header, 84));
        if number > count || size < 128 {
            return None;
        }
        let at = entries
            .checked_mul(sector)?
            .checked_add(u64::from(number - 1).checked_mul(size)?)?;
        let entry = read_at(disk, at, 128)?;
        if entry[0..16].iter().all(|&b| b == 0) {
            return None;
        }
        return Some(guid_text(&entry[16..32]));
    }
    let mbr = read_at(disk, 0, 512)?;
    if mbr[510] == 0x55 && mbr[511] == 0xAA {
        return Some(format!("{:08x}-{number:02x}", le32(&mbr, 440)));
    }
    None
}

/// Reads what `node` holds; `sys` is its directory under /sys/class/block.
fn probe_at(node: PathBuf, sys: &Path) -> Probed {
    let fs = File::open(&node).ok().and_then(|f| filesystem(&f));
    let part_uuid = std::fs::read_to_string(sys.join("partition"))
        .ok()
        .and_then(|n| n.trim().parse::<u32>().ok())
        .and_then(|number| {
            // The disk is the partition's parent in sysfs.
            let disk_sys = sys.canonicalize().ok()?.parent()?.to_path_buf();
            let disk_name = disk_sys.file_name()?.to_owned();
            let sector = std::fs::read_to_string(disk_sys.join("queue/logical_block_size"))
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(512);
            let disk = File::open(Path::new("/dev").join(disk_name)).ok()?;
            partition_uuid(&disk, number, sector)
        });
    Probed {
        node,
        fs,
        part_uuid,
    }
}

/// Reads what the device node `node` holds.
pub fn probe(node: PathBuf) -> Probed {
    let sys = node
        .file_name()
        .map(|n| Path::new("/sys/class/block").join(n))
        .unwrap_or_default();
    probe_at(node, &sys)
}

/// All block devices present now, probed. Loop devices count once something is attached
/// (an image set up with losetup on a running system); empty ones and RAM disks are noise.
pub fn block_devices() -> Vec<Probed> {
    let mut names: Vec<String> = std::fs::read_dir("/sys/class/block")
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
        .into_iter()
        .filter(|n| !n.starts_with("ram"))
        .filter(|n| {
            !n.starts_with("loop")
                || Path::new("/sys/class/block")
                    .join(n)
                    .join("loop/backing_file")
                    .exists()
        })
        .map(|n| {
            probe_at(
                PathBuf::from("/dev").join(&n),
                &Path::new("/sys/class/block").join(&n),
            )
        })
        .collect()
}

/// Whether `p` is what `device` names (a label, a UUID or a partition UUID).
fn matches(p: &Probed, device: &Device) -> bool {
    match device {
        Device::Label(want) => p.fs.as_ref().is_some_and(|fs| &fs.label == want),
        Device::Uuid(want) => p.fs.as_ref().is_some_and(|fs| &fs.uuid == want),
        Device::PartUuid(want) => p.part_uuid.as_ref() == Some(want),
        Device::Path(path) => &p.node == path,
    }
}

/// Why a device could not be chosen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NotFound {
    /// Nothing matches yet (it may still appear): what there is.
    Absent(String),
    /// More than one device matches: guessing could boot the wrong system.
    Ambiguous(String),
}

impl std::fmt::Display for NotFound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NotFound::Absent(s) | NotFound::Ambiguous(s) => f.write_str(s),
        }
    }
}

/// The one device matching `device` among those present now.
pub fn find(device: &Device) -> Result<Probed, NotFound> {
    if let Device::Path(path) = device {
        return if path.exists() {
            Ok(probe(path.clone()))
        } else {
            Err(NotFound::Absent(format!(
                "{} does not exist",
                path.display()
            )))
        };
    }
    let found = block_devices();
    choose(device, found)
}

/// Whether `node` is a persistent-memory block device (`/dev/pmem0`, `/dev/pmem1s`, ...).
pub fn is_pmem(node: &Path) -> bool {
    node.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with("pmem"))
}

/// Like [`find`], among persistent-memory devices only: a label or UUID that a virtio disk
/// carries too (the same image attached both ways) names the pmem device. A device node is
/// taken as given.
pub fn find_pmem(device: &Device) -> Result<Probed, NotFound> {
    if let Device::Path(_) = device {
        return find(device);
    }
    let all = block_devices();
    if !all.iter().any(|p| is_pmem(&p.node)) {
        let others: Vec<String> = all.iter().map(|p| p.to_string()).collect();
        return Err(NotFound::Absent(format!(
            "no pmem device yet (other block devices: {})",
            if others.is_empty() {
                "none".to_string()
            } else {
                others.join(", ")
            }
        )));
    }
    choose(
        device,
        all.into_iter().filter(|p| is_pmem(&p.node)).collect(),
    )
}

fn choose(device: &Device, found: Vec<Probed>) -> Result<Probed, NotFound> {
    let mut hits: Vec<Probed> = found
        .iter()
        .filter(|p| matches(p, device))
        .cloned()
        .collect();
    match hits.len() {
        1 => Ok(hits.remove(0)),
        0 if found.is_empty() => Err(NotFound::Absent("no block devices".into())),
        0 => {
            let list: Vec<String> = found.iter().map(|p| p.to_string()).collect();
            Err(NotFound::Absent(format!(
                "block devices: {}",
                list.join(", ")
            )))
        }
        _ => {
            let list: Vec<String> = hits.iter().map(|p| p.to_string()).collect();
            Err(NotFound::Ambiguous(format!(
                "{device} matches more than one device: {}",
                list.join(", ")
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn image(name: &str, writes: &[(u64, &[u8])], len: u64) -> (PathBuf, File) {
        let path =
            std::env::temp_dir().join(format!("guest-init-probe-{}-{name}", std::process::id()));
        let mut f = File::create(&path).unwrap();
        f.set_len(len).unwrap();
        for (at, data) in writes {
            f.write_all_at(data, *at).unwrap();
        }
        f.flush().unwrap();
        let f = File::open(&path).unwrap();
        (path, f)
    }

    const UUID: [u8; 16] = [
        0x8f, 0x1b, 0x6c, 0x3e, 0x2a, 0x4d, 0x4e, 0x5f, 0x9a, 0x7b, 0x0c, 0x1d, 0x2e, 0x3f, 0x4a,
        0x5b,
    ];

    #[test]
    fn reads_each_superblock() {
        type Writes<'a> = Vec<(u64, &'a [u8])>;
        let cases: [(&str, Writes); 4] = [
            (
                "erofs",
                vec![
                    (1024, &[0xE2, 0xE1, 0xF5, 0xE0]),
                    (1024 + 48, &UUID),
                    (1024 + 64, b"store"),
                ],
            ),
            (
                "ext4",
                vec![
                    (1024 + 0x38, &[0x53, 0xEF]),
                    (1024 + 0x68, &UUID),
                    (1024 + 0x78, b"root"),
                ],
            ),
            ("xfs", vec![(0, b"XFSB"), (32, &UUID), (108, b"data")]),
            (
                "btrfs",
                vec![
                    (0x10000 + 0x40, b"_BHRfS_M"),
                    (0x10000 + 0x20, &UUID),
                    (0x10000 + 0x12b, b"pool"),
                ],
            ),
        ];
        for (fstype, writes) in cases {
            let (path, f) = image(fstype, &writes, 1 << 20);
            let fs = filesystem(&f).unwrap_or_else(|| panic!("{fstype} not recognised"));
            std::fs::remove_file(&path).unwrap();
            assert_eq!(fs.fstype, fstype);
            assert_eq!(fs.uuid, UUID, "{fstype}");
            assert!(!fs.label.is_empty(), "{fstype}");
        }
        let (path, f) = image("none", &[], 1 << 20);
        assert_eq!(filesystem(&f), None);
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn partition_uuids_of_gpt_and_mbr() {
        // GPT: header at LBA 1, entries at LBA 2, 128 bytes each; partition 2 is entry 1.
        let mut header = [0u8; 92];
        header[..8].copy_from_slice(b"EFI PART");
        header[72..80].copy_from_slice(&2u64.to_le_bytes());
        header[80..84].copy_from_slice(&128u32.to_le_bytes());
        header[84..88].copy_from_slice(&128u32.to_le_bytes());
        let guid = [
            0x3e, 0x6c, 0x1b, 0x8f, 0x4d, 0x2a, 0x5f, 0x4e, 0x9a, 0x7b, 0x0c, 0x1d, 0x2e, 0x3f,
            0x4a, 0x5b,
        ];
        let (path, f) = image(
            "gpt",
            &[
                (512, &header),
                (1024 + 128, &[1u8; 16]),
                (1024 + 128 + 16, &guid),
            ],
            1 << 20,
        );
        assert_eq!(
            partition_uuid(&f, 2, 512).as_deref(),
            Some("8f1b6c3e-2a4d-4e5f-9a7b-0c1d2e3f4a5b")
        );
        assert_eq!(partition_uuid(&f, 1, 512), None, "an unused entry");
        std::fs::remove_file(&path).unwrap();
        let (path, f) = image(
            "mbr",
            &[(440, &0x1234_abcdu32.to_le_bytes()), (510, &[0x55, 0xAA])],
            1 << 20,
        );
        assert_eq!(partition_uuid(&f, 3, 512).as_deref(), Some("1234abcd-03"));
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn one_label_on_two_devices_is_an_error_naming_both() {
        let dev = |node: &str, label: &str| Probed {
            node: node.into(),
            fs: Some(Filesystem {
                fstype: "erofs",
                label: label.into(),
                uuid: UUID,
            }),
            part_uuid: None,
        };
        let found = vec![
            dev("/dev/vda", "nix-store"),
            dev("/dev/vdb", "nix-store"),
            dev("/dev/vdc", "x"),
        ];
        let e = choose(&Device::Label("nix-store".into()), found.clone()).unwrap_err();
        let NotFound::Ambiguous(text) = &e else {
            panic!("{e:?}")
        };
        assert!(
            text.contains("/dev/vda") && text.contains("/dev/vdb"),
            "{text}"
        );
        assert_eq!(
            choose(&Device::Label("x".into()), found.clone())
                .unwrap()
                .node,
            PathBuf::from("/dev/vdc")
        );
        assert!(matches!(
            choose(&Device::Label("y".into()), found),
            Err(NotFound::Absent(_))
        ));
    }

    #[test]
    fn pmem_nodes() {
        for yes in ["/dev/pmem0", "/dev/pmem12", "/dev/pmem0p1", "/dev/pmem1s"] {
            assert!(is_pmem(Path::new(yes)), "{yes}");
        }
        for no in [
            "/dev/vda",
            "/dev/loop0",
            "/dev/",
            "/dev/nvme0n1",
            "/dev/dax0.0",
        ] {
            assert!(!is_pmem(Path::new(no)), "{no}");
        }
    }
}
