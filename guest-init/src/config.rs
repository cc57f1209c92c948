//! What to mount, read from the kernel command line or from flags.
//!
//! The keys are the same in both places, so a boot entry and a call from a running system
//! read alike:
//!
//! | key | meaning | default |
//! |---|---|---|
//! | `nixstore=virtiofs:TAG` | the virtiofs share with tag TAG | (required) |
//! | `nixstore=erofs:DEV` | an erofs image on a block device (DEV as for `root=`) | |
//! | `nixstore=pmem`, `nixstore=pmem:DEV` | an erofs image on a virtio-pmem device, mapped with DAX | `/dev/pmem0` |
//! | `nixstore.writable=tmpfs\|none` | a tmpfs overlay on top, or read-only | `none` |
//! | `nixstore.timeout=SECONDS` | how long to wait for the device or tag | `10` |
//! | `nixstore.rescue=PATH` | a shell to start when mounting fails | power off |
//! | `init=PATH` | what to execute once the store is mounted | `/sbin/init` |
//! | `root=DEV`, `rootfstype=`, `rootflags=` | a real root to switch to | the initramfs |
//! | | DEV: `/dev/X`, `LABEL=`, `UUID=`, `PARTUUID=`, `/dev/disk/by-{label,uuid,partuuid}/N` | |
//! | `ro`, `rw` | mount the real root read-only or read-write | `ro`, as the kernel |
//! | `regInfo=PATH` | a registration to load with `nix-store --load-db` | none |
//!
//! Words after `--` are init's: guest-init reads none of them.

use std::fmt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Where the store comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreSource {
    /// A virtiofs share, by tag.
    Virtiofs(String),
    /// An erofs image on a block device.
    Erofs(Device),
    /// An erofs image on a persistent-memory device (virtio-pmem), mounted with
    /// `dax=always` so that its files are mapped, not copied into the page cache. A label
    /// or UUID is looked for on pmem devices only.
    Pmem(Device),
}

/// The device `nixstore=pmem` names: the first persistent-memory namespace.
pub const FIRST_PMEM: &str = "/dev/pmem0";

/// How a block device is named.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Device {
    /// By filesystem label.
    Label(String),
    /// By filesystem UUID.
    Uuid([u8; 16]),
    /// By partition UUID: a GPT partition's GUID, or an MBR disk signature and partition
    /// number (`SSSSSSSS-PP`), lower case, as the kernel spells it.
    PartUuid(String),
    /// By device node.
    Path(PathBuf),
}

impl fmt::Display for StoreSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreSource::Virtiofs(tag) => write!(f, "virtiofs:{tag}"),
            StoreSource::Erofs(dev) => write!(f, "erofs:{dev}"),
            StoreSource::Pmem(dev) => write!(f, "pmem:{dev}"),
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Label(l) => write!(f, "LABEL={l}"),
            Device::Uuid(u) => write!(f, "UUID={}", format_uuid(u)),
            Device::PartUuid(u) => write!(f, "PARTUUID={u}"),
            Device::Path(p) => write!(f, "{}", p.display()),
        }
    }
}

/// The usual 8-4-4-4-12 form.
pub fn format_uuid(u: &[u8; 16]) -> String {
    let hex: String = u.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

fn parse_uuid(text: &str) -> Result<[u8; 16], String> {
    let digits: Vec<u8> = text.bytes().filter(|&b| b != b'-').collect();
    if digits.len() != 32 || !digits.iter().all(u8::is_ascii_hexdigit) {
        return Err(format!("`{text}` is not a UUID"));
    }
    let mut uuid = [0u8; 16];
    for (i, pair) in digits.chunks(2).enumerate() {
        let pair = std::str::from_utf8(pair).expect("hex digits are ASCII");
        uuid[i] = u8::from_str_radix(pair, 16).expect("checked hex digits");
    }
    Ok(uuid)
}

/// A partition UUID as the kernel prints it: a GUID, or an MBR `SSSSSSSS-PP`.
fn parse_part_uuid(text: &str) -> Result<String, String> {
    let t = text.to_ascii_lowercase();
    let mbr = t.len() == 11
        && t.as_bytes()[8] == b'-'
        && t.bytes()
            .enumerate()
            .all(|(i, b)| i == 8 || b.is_ascii_hexdigit());
    if mbr {
        return Ok(t);
    }
    parse_uuid(&t)
        .map(|u| format_uuid(&u))
        .map_err(|_| format!("`{text}` is not a partition UUID (a GUID, or SSSSSSSS-PP)"))
}

/// Undoes udev's `\xHH` escapes in a /dev/disk/by-* name.
fn unescape_udev(name: &str) -> String {
    let b = name.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && b.get(i + 1) == Some(&b'x') && i + 4 <= b.len() {
            if let Ok(v) = u8::from_str_radix(&name[i + 2..i + 4], 16) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl std::str::FromStr for Device {
    type Err = String;

    /// `LABEL=`, `UUID=`, `PARTUUID=`, `/dev/disk/by-{label,uuid,partuuid}/NAME` (read
    /// from the filesystems themselves: an initramfs has no udev to make those links) or
    /// a device node `/dev/X`.
    fn from_str(dev: &str) -> Result<Self, String> {
        let by = |kind: &str| {
            dev.strip_prefix("/dev/disk/")
                .and_then(|r| r.strip_prefix(kind))
        };
        if let Some(label) = dev.strip_prefix("LABEL=") {
            Ok(Device::Label(label.into()))
        } else if let Some(uuid) = dev.strip_prefix("UUID=") {
            Ok(Device::Uuid(parse_uuid(uuid)?))
        } else if let Some(uuid) = dev.strip_prefix("PARTUUID=") {
            Ok(Device::PartUuid(parse_part_uuid(uuid)?))
        } else if let Some(label) = by("by-label/") {
            Ok(Device::Label(unescape_udev(label)))
        } else if let Some(uuid) = by("by-uuid/") {
            Ok(Device::Uuid(parse_uuid(&unescape_udev(uuid))?))
        } else if let Some(uuid) = by("by-partuuid/") {
            Ok(Device::PartUuid(parse_part_uuid(&unescape_udev(uuid))?))
        } else if dev.starts_with("/dev/disk/") {
            Err(format!(
                "`{dev}`: of /dev/disk/ only by-label, by-uuid and by-partuuid are known"
            ))
        } else if dev.starts_with("/dev/") && dev.len() > 5 && dev != "/dev/nfs" {
            Ok(Device::Path(dev.into()))
        } else {
            Err(format!(
                "`{dev}`: expected /dev/X, LABEL=..., UUID=..., PARTUUID=... or \
                 /dev/disk/by-{{label,uuid,partuuid}}/..."
            ))
        }
    }
}

impl std::str::FromStr for StoreSource {
    type Err = String;

    fn from_str(spec: &str) -> Result<Self, String> {
        if let Some(tag) = spec.strip_prefix("virtiofs:") {
            if tag.is_empty() {
                return Err("`virtiofs:` needs a tag".into());
            }
            return Ok(StoreSource::Virtiofs(tag.into()));
        }
        if let Some(dev) = spec.strip_prefix("erofs:") {
            return Ok(StoreSource::Erofs(dev.parse()?));
        }
        if spec == "pmem" {
            return Ok(StoreSource::Pmem(Device::Path(FIRST_PMEM.into())));
        }
        if let Some(dev) = spec.strip_prefix("pmem:") {
            return Ok(StoreSource::Pmem(dev.parse()?));
        }
        Err(format!(
            "`{spec}`: expected virtiofs:TAG, erofs:LABEL=.../UUID=.../DEVICE, pmem or \
             pmem:LABEL=.../UUID=.../DEVICE"
        ))
    }
}

/// Whether the store gets a writable layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Writable {
    /// Read-only: /nix/store is a read-only bind of /nix/.ro-store.
    None,
    /// A tmpfs at /nix/.rw-store and an overlay at /nix/store: writes stay in memory.
    Tmpfs,
}

impl std::str::FromStr for Writable {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(Writable::None),
            "tmpfs" => Ok(Writable::Tmpfs),
            _ => Err(format!("`{s}`: expected tmpfs or none")),
        }
    }
}

/// A real root filesystem to switch to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Root {
    /// The device (a path, `LABEL=` or `UUID=`).
    pub device: Device,
    /// Its filesystem type (`rootfstype=`); the kernel's guess is not available here.
    pub fstype: Option<String>,
    /// Mount options (`rootflags=`).
    pub flags: Option<String>,
    /// Read-only (`ro`, the default, as for the kernel) or read-write (`rw`).
    pub read_only: bool,
}

/// Everything guest-init needs to know.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// Where the store comes from.
    pub store: StoreSource,
    /// Whether it is writable.
    pub writable: Writable,
    /// How long to wait for the device or tag.
    pub timeout: Duration,
    /// A shell to start when mounting fails.
    pub rescue: Option<PathBuf>,
    /// What to execute once the store is mounted.
    pub init: PathBuf,
    /// A real root to switch to, if any.
    pub root: Option<Root>,
    /// A registration to load.
    pub reg_info: Option<PathBuf>,
}

/// The instant `timeout` from now; an error (not a panic) when the clock cannot count
/// that far.
pub fn deadline(timeout: Duration) -> Result<Instant, String> {
    Instant::now().checked_add(timeout).ok_or_else(|| {
        format!(
            "a timeout of {} s is beyond what the clock can count",
            timeout.as_secs()
        )
    })
}

/// Parses a number of seconds: finite, not negative, and within what the clock counts.
pub fn parse_timeout(text: &str) -> Result<Duration, String> {
    let secs: f64 = text
        .parse()
        .map_err(|_| format!("`{text}`: expected a number of seconds"))?;
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("`{text}`: expected a number of seconds"));
    }
    let d = Duration::try_from_secs_f64(secs)
        .map_err(|_| format!("`{text}` seconds is too long a timeout"))?;
    deadline(d).map_err(|_| format!("`{text}` seconds is too long a timeout"))?;
    Ok(d)
}

/// The default wait for the store's device or tag.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Splits a kernel command line into words, honouring double quotes as the kernel does.
fn words(cmdline: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut word = String::new();
    let mut quoted = false;
    for c in cmdline.chars() {
        match c {
            '"' => quoted = !quoted,
            c if c.is_whitespace() && !quoted => {
                if !word.is_empty() {
                    out.push(std::mem::take(&mut word));
                }
            }
            c => word.push(c),
        }
    }
    if !word.is_empty() {
        out.push(word);
    }
    out
}

impl Config {
    /// Reads the configuration from a kernel command line. Unknown keys belong to the
    /// kernel or to the system and are ignored; the last occurrence of a key wins.
    pub fn from_cmdline(cmdline: &str) -> Result<Config, String> {
        let mut store = None;
        let mut writable = Writable::None;
        let mut timeout = DEFAULT_TIMEOUT;
        let mut rescue = None;
        let mut init = PathBuf::from("/sbin/init");
        let mut root_device = None;
        let mut fstype = None;
        let mut flags = None;
        let mut reg_info = None;
        let mut read_only = true;
        for word in words(cmdline) {
            // What follows `--` is the kernel's word for init, not for guest-init.
            if word == "--" {
                break;
            }
            match word.as_str() {
                "ro" => read_only = true,
                "rw" => read_only = false,
                _ => {}
            }
            let Some((key, value)) = word.split_once('=') else {
                continue;
            };
            let bad = |e: String| format!("kernel command line `{word}`: {e}");
            match key {
                "nixstore" => store = Some(value.parse().map_err(bad)?),
                "nixstore.writable" => writable = value.parse().map_err(bad)?,
                "nixstore.timeout" => timeout = parse_timeout(value).map_err(bad)?,
                "nixstore.rescue" => rescue = Some(PathBuf::from(value)),
                "init" => init = PathBuf::from(value),
                "root" => {
                    root_device = Some(value.parse::<Device>().map_err(|e| {
                        bad(format!(
                            "{e}; guest-init cannot serve this form of root= (no network, \
                             no PARTLABEL=, no device numbers)"
                        ))
                    })?)
                }
                "rootfstype" => fstype = Some(value.to_owned()),
                "rootflags" => flags = Some(value.to_owned()),
                "regInfo" => reg_info = Some(PathBuf::from(value)),
                _ => {}
            }
        }
        let store = store.ok_or_else(|| {
            "the kernel command line has no nixstore= (e.g. nixstore=virtiofs:nix-store, \
             nixstore=erofs:LABEL=nix-store or nixstore=pmem)"
                .to_string()
        })?;
        Ok(Config {
            store,
            writable,
            timeout,
            rescue,
            init,
            root: root_device.map(|device| Root {
                device,
                fstype,
                flags,
                read_only,
            }),
            reg_info,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_documented_keys() {
        let c = Config::from_cmdline(
            "console=ttyS0 quiet nixstore=erofs:LABEL=nix-store nixstore.writable=tmpfs \
             nixstore.timeout=2.5 init=/nix/store/x-system/init regInfo=/nix/store/y-reg",
        )
        .unwrap();
        assert_eq!(
            c.store,
            StoreSource::Erofs(Device::Label("nix-store".into()))
        );
        assert_eq!(c.writable, Writable::Tmpfs);
        assert_eq!(c.timeout, Duration::from_millis(2500));
        assert_eq!(c.init, PathBuf::from("/nix/store/x-system/init"));
        assert_eq!(c.reg_info, Some(PathBuf::from("/nix/store/y-reg")));
        assert_eq!(c.root, None);
    }

    #[test]
    fn store_specs() {
        assert_eq!(
            "virtiofs:nix-store".parse::<StoreSource>().unwrap(),
            StoreSource::Virtiofs("nix-store".into())
        );
        assert_eq!(
            "erofs:/dev/vdb".parse::<StoreSource>().unwrap(),
            StoreSource::Erofs(Device::Path("/dev/vdb".into()))
        );
        let u = "erofs:UUID=8f1b6c3e-2a4d-4e5f-9a7b-0c1d2e3f4a5b";
        match u.parse::<StoreSource>().unwrap() {
            StoreSource::Erofs(Device::Uuid(bytes)) => {
                assert_eq!(format_uuid(&bytes), "8f1b6c3e-2a4d-4e5f-9a7b-0c1d2e3f4a5b")
            }
            other => panic!("{other:?}"),
        }
        for bad in [
            "virtiofs:",
            "erofs:vdb",
            "nfs:x",
            "erofs:UUID=123",
            "erofs:PARTLABEL=x",
            "erofs:/dev/disk/by-path/pci-0",
        ] {
            assert!(bad.parse::<StoreSource>().is_err(), "{bad}");
        }
    }

    /// `pmem` alone is the first pmem device; `pmem:` takes every device form `erofs:`
    /// takes, and nothing else.
    #[test]
    fn pmem_specs() {
        assert_eq!(
            "pmem".parse::<StoreSource>().unwrap(),
            StoreSource::Pmem(Device::Path("/dev/pmem0".into()))
        );
        assert_eq!(
            "pmem:/dev/pmem1".parse::<StoreSource>().unwrap(),
            StoreSource::Pmem(Device::Path("/dev/pmem1".into()))
        );
        assert_eq!(
            "pmem:LABEL=nix-store".parse::<StoreSource>().unwrap(),
            StoreSource::Pmem(Device::Label("nix-store".into()))
        );
        assert_eq!(
            "pmem:/dev/disk/by-uuid/8F1B6C3E-2A4D-4E5F-9A7B-0C1D2E3F4A5B"
                .parse::<StoreSource>()
                .unwrap(),
            StoreSource::Pmem(Device::Uuid(
                parse_uuid("8f1b6c3e-2a4d-4e5f-9a7b-0c1d2e3f4a5b").unwrap()
            ))
        );
        // Printed as it is read back, so that mount-store's messages can be pasted.
        for spec in ["pmem:/dev/pmem0", "pmem:LABEL=nix-store", "erofs:/dev/vda"] {
            let parsed: StoreSource = spec.parse().unwrap();
            assert_eq!(parsed.to_string(), spec);
            assert_eq!(parsed.to_string().parse::<StoreSource>().unwrap(), parsed);
        }
        for bad in [
            "pmem:",
            "pmem0",
            "pmem:pmem0",
            "pmem:/dev/",
            "pmem:PARTLABEL=x",
            "pmem:UUID=xyz",
            "PMEM",
            "pmem=1",
        ] {
            let e = bad.parse::<StoreSource>().unwrap_err();
            assert!(e.contains('`'), "{bad}: {e}");
        }
        let c = Config::from_cmdline("nixstore=pmem nixstore.writable=tmpfs").unwrap();
        assert_eq!(c.store, StoreSource::Pmem(Device::Path(FIRST_PMEM.into())));
        assert_eq!(c.writable, Writable::Tmpfs);
        let e = Config::from_cmdline("nixstore=pmem:vda").unwrap_err();
        assert!(e.contains("nixstore=pmem:vda"), "{e}");
    }

    #[test]
    fn missing_store_and_bad_values_are_errors() {
        let e = Config::from_cmdline("console=ttyS0").unwrap_err();
        assert!(e.contains("nixstore="), "{e}");
        let e = Config::from_cmdline("nixstore=virtiofs:a nixstore.writable=yes").unwrap_err();
        assert!(e.contains("nixstore.writable=yes"), "{e}");
        let e = Config::from_cmdline("nixstore=virtiofs:a nixstore.timeout=-1").unwrap_err();
        assert!(e.contains("timeout"), "{e}");
        // Values that would overflow a Duration or the clock are errors, not panics.
        for absurd in ["1e300", "1e19", "18446744073709551616", "inf", "NaN"] {
            let e = Config::from_cmdline(&format!("nixstore=virtiofs:a nixstore.timeout={absurd}"))
                .unwrap_err();
            assert!(e.contains("nixstore.timeout"), "{absurd}: {e}");
        }
        assert!(deadline(Duration::MAX).is_err());
    }

    #[test]
    fn every_root_form() {
        let root = |words: &str| {
            Config::from_cmdline(&format!("nixstore=virtiofs:s {words}"))
                .map(|c| c.root.expect("a root"))
        };
        let u = "8f1b6c3e-2a4d-4e5f-9a7b-0c1d2e3f4a5b";
        let uuid = parse_uuid(u).unwrap();
        assert_eq!(
            root("root=/dev/vda").unwrap().device,
            Device::Path("/dev/vda".into())
        );
        assert_eq!(
            root("root=LABEL=nixos").unwrap().device,
            Device::Label("nixos".into())
        );
        assert_eq!(
            root("root=/dev/disk/by-label/my\\x2fdisk").unwrap().device,
            Device::Label("my/disk".into())
        );
        assert_eq!(
            root(&format!("root=UUID={u}")).unwrap().device,
            Device::Uuid(uuid)
        );
        assert_eq!(
            root(&format!("root=/dev/disk/by-uuid/{}", u.to_uppercase()))
                .unwrap()
                .device,
            Device::Uuid(uuid)
        );
        assert_eq!(
            root(&format!("root=PARTUUID={}", u.to_uppercase()))
                .unwrap()
                .device,
            Device::PartUuid(u.into())
        );
        assert_eq!(
            root("root=/dev/disk/by-partuuid/1234ABCD-02")
                .unwrap()
                .device,
            Device::PartUuid("1234abcd-02".into())
        );
        for refused in [
            "root=/dev/nfs",
            "root=PARTLABEL=root",
            "root=fe01",
            "root=8:1",
            "root=PARTUUID=1234abcd-02/PARTNROFF=1",
            "root=/dev/disk/by-id/virtio-x",
        ] {
            let e = root(refused).unwrap_err();
            assert!(
                e.contains(refused) && e.contains("cannot serve"),
                "{refused}: {e}"
            );
        }
        assert!(root("root=/dev/vda").unwrap().read_only);
        assert!(!root("ro root=/dev/vda rw").unwrap().read_only);
        assert!(root("rw root=/dev/vda ro").unwrap().read_only);
        assert!(
            !root("rw root=/dev/vda -- ro").unwrap().read_only,
            "after --"
        );
    }

    #[test]
    fn quotes_and_real_root() {
        let c = Config::from_cmdline(
            "nixstore=virtiofs:s root=LABEL=nixos rootfstype=ext4 rootflags=\"ro,noatime\"",
        )
        .unwrap();
        let root = c.root.unwrap();
        assert_eq!(root.device, Device::Label("nixos".into()));
        assert_eq!(root.fstype.as_deref(), Some("ext4"));
        assert_eq!(root.flags.as_deref(), Some("ro,noatime"));
    }
}
