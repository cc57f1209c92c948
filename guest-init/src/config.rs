//! What to mount, read from the kernel command line or from flags.
//!
//! The keys are the same in both places, so a boot entry and a call from a running system
//! read alike:
//!
//! | key | meaning | default |
//! |---|---|---|
//! | `nixstore=virtiofs:TAG` | the virtiofs share with tag TAG | (required) |
//! | `nixstore=erofs:LABEL=L`, `erofs:UUID=U`, `erofs:/dev/X` | an erofs image on a block device | |
//! | `nixstore.writable=tmpfs\|none` | a tmpfs overlay on top, or read-only | `none` |
//! | `nixstore.timeout=SECONDS` | how long to wait for the device or tag | `10` |
//! | `nixstore.rescue=PATH` | a shell to start when mounting fails | power off |
//! | `init=PATH` | what to execute once the store is mounted | `/sbin/init` |
//! | `root=DEV`, `rootfstype=`, `rootflags=` | a real root to switch to | the initramfs |
//! | `regInfo=PATH` | a registration to load with `nix-store --load-db` | none |

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

/// Where the store comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreSource {
    /// A virtiofs share, by tag.
    Virtiofs(String),
    /// An erofs image on a block device.
    Erofs(Device),
}

/// How a block device is named.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Device {
    /// By filesystem label.
    Label(String),
    /// By filesystem UUID.
    Uuid([u8; 16]),
    /// By device node.
    Path(PathBuf),
}

impl fmt::Display for StoreSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreSource::Virtiofs(tag) => write!(f, "virtiofs:{tag}"),
            StoreSource::Erofs(dev) => write!(f, "erofs:{dev}"),
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Label(l) => write!(f, "LABEL={l}"),
            Device::Uuid(u) => write!(f, "UUID={}", format_uuid(u)),
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
            let device = if let Some(label) = dev.strip_prefix("LABEL=") {
                Device::Label(label.into())
            } else if let Some(uuid) = dev.strip_prefix("UUID=") {
                Device::Uuid(parse_uuid(uuid)?)
            } else if dev.starts_with('/') {
                Device::Path(dev.into())
            } else {
                return Err(format!(
                    "`{spec}`: expected erofs:LABEL=..., erofs:UUID=... or erofs:/dev/..."
                ));
            };
            return Ok(StoreSource::Erofs(device));
        }
        Err(format!(
            "`{spec}`: expected virtiofs:TAG or erofs:LABEL=.../UUID=.../DEVICE"
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
        for word in words(cmdline) {
            let Some((key, value)) = word.split_once('=') else {
                continue;
            };
            let bad = |e: String| format!("kernel command line `{word}`: {e}");
            match key {
                "nixstore" => store = Some(value.parse().map_err(bad)?),
                "nixstore.writable" => writable = value.parse().map_err(bad)?,
                "nixstore.timeout" => {
                    let secs: f64 = value
                        .parse()
                        .ok()
                        .filter(|s: &f64| s.is_finite() && *s >= 0.0)
                        .ok_or_else(|| bad("expected a number of seconds".into()))?;
                    timeout = Duration::from_secs_f64(secs);
                }
                "nixstore.rescue" => rescue = Some(PathBuf::from(value)),
                "init" => init = PathBuf::from(value),
                "root" => {
                    root_device = Some(
                        match format!("erofs:{value}")
                            .parse::<StoreSource>()
                            .map_err(bad)?
                        {
                            StoreSource::Erofs(d) => d,
                            StoreSource::Virtiofs(_) => unreachable!("parsed as erofs"),
                        },
                    )
                }
                "rootfstype" => fstype = Some(value.to_owned()),
                "rootflags" => flags = Some(value.to_owned()),
                "regInfo" => reg_info = Some(PathBuf::from(value)),
                _ => {}
            }
        }
        let store = store.ok_or_else(|| {
            "the kernel command line has no nixstore= (e.g. nixstore=virtiofs:nix-store or \
             nixstore=erofs:LABEL=nix-store)"
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
        for bad in ["virtiofs:", "erofs:vdb", "nfs:x", "erofs:UUID=123"] {
            assert!(bad.parse::<StoreSource>().is_err(), "{bad}");
        }
    }

    #[test]
    fn missing_store_and_bad_values_are_errors() {
        let e = Config::from_cmdline("console=ttyS0").unwrap_err();
        assert!(e.contains("nixstore="), "{e}");
        let e = Config::from_cmdline("nixstore=virtiofs:a nixstore.writable=yes").unwrap_err();
        assert!(e.contains("nixstore.writable=yes"), "{e}");
        let e = Config::from_cmdline("nixstore=virtiofs:a nixstore.timeout=-1").unwrap_err();
        assert!(e.contains("timeout"), "{e}");
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
