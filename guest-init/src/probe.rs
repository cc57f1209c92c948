//! Finding the block device that holds the store image.
//!
//! There is no blkid or udev in the initramfs, and an erofs superblock is easy to read: the
//! magic at byte 1024, the UUID at 1024+48 and the label at 1024+64. Devices are listed
//! from /sys/class/block and their nodes opened under /dev (a devtmpfs).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use crate::config::{format_uuid, Device};

const SUPERBLOCK: u64 = 1024;
const EROFS_MAGIC: u32 = 0xE0F5_E1E2;

/// What a block device holds, as far as the store is concerned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Probed {
    /// The device node.
    pub node: PathBuf,
    /// The erofs label and UUID, if it is an erofs image.
    pub erofs: Option<(String, [u8; 16])>,
}

impl std::fmt::Display for Probed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.erofs {
            Some((label, uuid)) => write!(
                f,
                "{} (erofs, LABEL={label}, UUID={})",
                self.node.display(),
                format_uuid(uuid)
            ),
            None => write!(f, "{} (not erofs)", self.node.display()),
        }
    }
}

/// Reads the erofs superblock of `node`, if it has one.
pub fn probe(node: PathBuf) -> Probed {
    let mut sb = [0u8; 96];
    let erofs = File::open(&node)
        .and_then(|f| f.read_exact_at(&mut sb, SUPERBLOCK))
        .ok()
        .filter(|_| u32::from_le_bytes(sb[0..4].try_into().unwrap()) == EROFS_MAGIC)
        .map(|_| {
            let name = &sb[64..80];
            let len = name.iter().position(|&b| b == 0).unwrap_or(name.len());
            let label = String::from_utf8_lossy(&name[..len]).into_owned();
            (label, sb[48..64].try_into().unwrap())
        });
    Probed { node, erofs }
}

/// All block devices present now, probed.
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
        // Loop and RAM devices without a backing are noise in an error message.
        .filter(|n| !n.starts_with("loop") && !n.starts_with("ram"))
        .map(|n| probe(PathBuf::from("/dev").join(n)))
        .collect()
}

/// The device matching `device` among those present now; `Err` describes what was found.
pub fn find(device: &Device) -> Result<PathBuf, String> {
    if let Device::Path(path) = device {
        return if path.exists() {
            Ok(path.clone())
        } else {
            Err(format!("{} does not exist", path.display()))
        };
    }
    let found = block_devices();
    for p in &found {
        if let Some((label, uuid)) = &p.erofs {
            let hit = match device {
                Device::Label(want) => label == want,
                Device::Uuid(want) => uuid == want,
                Device::Path(_) => unreachable!("handled above"),
            };
            if hit {
                return Ok(p.node.clone());
            }
        }
    }
    if found.is_empty() {
        Err("no block devices".into())
    } else {
        let list: Vec<String> = found.iter().map(|p| p.to_string()).collect();
        Err(format!("block devices: {}", list.join(", ")))
    }
}
