//! `-o` mount options, in the conventions of FUSE filesystems.
//!
//! The same strings arrive from the command line, from `mount -t fuse.nixstorefs` (through
//! `mount.fuse3`), from /etc/fstab and from systemd mount units, so options that only mean
//! something to mount(8) or systemd are accepted and ignored rather than refused.

use std::path::PathBuf;

use fuser::{MountOption, SessionACL};

use nixstorefs::gc_roots::GcRootsMode;
use nixstorefs::transport::fuse_uring::FuseTransport;

/// Mount options after parsing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountOptions {
    /// Options for the kernel mount, starting from `ro,nosuid,nodev,default_permissions`.
    pub mount: Vec<MountOption>,
    /// Who may use the mount.
    pub acl: SessionACL,
    /// `store_dir=DIR`: the store directory, as `--store-dir`.
    pub store_dir: Option<PathBuf>,
    /// `allow_missing`: as `--allow-missing`.
    pub allow_missing: bool,
    /// `no_passthrough`: as `--no-passthrough`.
    pub no_passthrough: bool,
    /// `gc_roots=MODE`: as `--gc-roots MODE`.
    pub gc_roots: Option<GcRootsMode>,
    /// `fuse_transport=MODE`: as `--fuse-transport MODE`.
    pub fuse_transport: Option<FuseTransport>,
}

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions {
            mount: vec![
                MountOption::RO,
                MountOption::NoSuid,
                MountOption::NoDev,
                // The daemon reads every host file it may, as root usually: without this,
                // any user who can reach the mount (`allow_other`) could read a file whatever
                // its mode. With it, the kernel checks the mode bits against the caller.
                MountOption::DefaultPermissions,
                // As a kernel option, so the mount table says `fuse.nixstorefs` however the
                // mount is made (fuser passes its own Subtype only to fusermount3).
                MountOption::CUSTOM("subtype=nixstorefs".into()),
            ],
            acl: SessionACL::Owner,
            store_dir: None,
            allow_missing: false,
            no_passthrough: false,
            gc_roots: None,
            fuse_transport: None,
        }
    }
}

/// Options that belong to mount(8), fstab or systemd, not to the filesystem.
fn is_foreign(opt: &str) -> bool {
    matches!(
        opt,
        "defaults"
            | "auto"
            | "noauto"
            | "user"
            | "nouser"
            | "users"
            | "owner"
            | "group"
            | "_netdev"
            | "nofail"
            | "relatime"
            | "norelatime"
            | "strictatime"
            | "nostrictatime"
            | "lazytime"
            | "nolazytime"
            | "nodiratime"
            | "diratime"
            | "silent"
            | "loud"
    ) || opt.starts_with("x-")
        || opt.starts_with("comment=")
        || opt.starts_with("helper=")
}

impl MountOptions {
    /// Adds the options of one `-o` argument (comma-separated). Later options win over
    /// earlier ones, as with mount(8).
    pub fn add(&mut self, list: &str) -> Result<(), String> {
        for opt in list.split(',').map(str::trim).filter(|o| !o.is_empty()) {
            self.add_one(opt)?;
        }
        Ok(())
    }

    fn replace(&mut self, remove: &[MountOption], add: MountOption) {
        self.mount.retain(|o| !remove.contains(o) && *o != add);
        self.mount.push(add);
    }

    fn add_one(&mut self, opt: &str) -> Result<(), String> {
        use MountOption as M;
        match opt {
            "ro" => self.replace(&[M::RW], M::RO),
            // The view cannot be written: a mount(8) default of `rw` is accepted and
            // changes nothing; writes fail with EROFS either way.
            "rw" => tracing::debug!("ignoring `rw`: the view is read-only"),
            "nosuid" => self.replace(&[M::Suid], M::NoSuid),
            "suid" => self.replace(&[M::NoSuid], M::Suid),
            "nodev" => self.replace(&[], M::NoDev),
            // Nix cannot put a device node in the store (a NAR has none), so one in a closure
            // path was placed there behind its back; with `dev` it would open the host
            // device for anyone who can reach the mount.
            "dev" => {
                return Err(
                    "mount option `dev` is refused: a device node in a closure path \
                            would open the host device; the mount is always `nodev`"
                        .into(),
                )
            }
            "exec" => self.replace(&[M::NoExec], M::Exec),
            "noexec" => self.replace(&[M::Exec], M::NoExec),
            "atime" => self.replace(&[M::NoAtime], M::Atime),
            "noatime" => self.replace(&[M::Atime], M::NoAtime),
            "sync" => self.replace(&[M::Async], M::Sync),
            "async" => self.replace(&[M::Sync], M::Async),
            "dirsync" => self.replace(&[], M::DirSync),
            "default_permissions" => self.replace(&[], M::DefaultPermissions),
            "no_default_permissions" => self.mount.retain(|o| *o != M::DefaultPermissions),
            "auto_unmount" => self.replace(&[], M::AutoUnmount),
            "allow_other" => self.acl = SessionACL::All,
            "allow_root" => self.acl = SessionACL::RootAndOwner,
            "allow_missing" => self.allow_missing = true,
            "no_passthrough" => self.no_passthrough = true,
            "passthrough" => self.no_passthrough = false,
            _ => {
                if let Some(name) = opt.strip_prefix("fsname=") {
                    self.mount.retain(|o| !matches!(o, M::FSName(_)));
                    self.mount.push(M::FSName(name.into()));
                } else if opt.starts_with("subtype=") {
                    self.mount
                        .retain(|o| !matches!(o, M::CUSTOM(c) if c.starts_with("subtype=")));
                    self.mount.push(M::CUSTOM(opt.into()));
                } else if let Some(dir) = opt.strip_prefix("store_dir=") {
                    self.store_dir = Some(dir.into());
                } else if let Some(mode) = opt.strip_prefix("gc_roots=") {
                    use clap::ValueEnum;
                    self.gc_roots =
                        Some(GcRootsMode::from_str(mode, false).map_err(|_| {
                            format!("`{opt}`: expected auto, daemon, local or off")
                        })?);
                } else if let Some(mode) = opt.strip_prefix("fuse_transport=") {
                    use clap::ValueEnum;
                    self.fuse_transport =
                        Some(FuseTransport::from_str(mode, false).map_err(|_| {
                            format!("`{opt}`: expected auto, io-uring or dev-fuse")
                        })?);
                } else if is_foreign(opt) {
                    tracing::debug!("ignoring mount option `{opt}`");
                } else {
                    return Err(format!("unknown mount option `{opt}`"));
                }
            }
        }
        Ok(())
    }

    /// Fills in what the options imply. `auto_unmount` goes through fusermount3, which
    /// insists on `allow_root` or `allow_other`; `allow_root` adds nothing for a root
    /// daemon and only admits root otherwise, so it is implied.
    pub fn finish(&mut self, fsname: &str) {
        if self.mount.contains(&MountOption::AutoUnmount) && self.acl == SessionACL::Owner {
            self.acl = SessionACL::RootAndOwner;
        }
        if !self
            .mount
            .iter()
            .any(|o| matches!(o, MountOption::FSName(_)))
        {
            self.mount.push(MountOption::FSName(fsname.into()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use MountOption as M;

    fn parse(lists: &[&str]) -> Result<MountOptions, String> {
        let mut o = MountOptions::default();
        for l in lists {
            o.add(l)?;
        }
        Ok(o)
    }

    #[test]
    fn defaults_are_ro_nosuid_nodev_default_permissions() {
        let o = parse(&[]).unwrap();
        assert!(o.mount.contains(&M::RO));
        assert!(o.mount.contains(&M::NoSuid));
        assert!(o.mount.contains(&M::NoDev));
        assert!(o.mount.contains(&M::DefaultPermissions));
        assert_eq!(o.acl, SessionACL::Owner);
    }

    #[test]
    fn later_options_override_defaults() {
        let o = parse(&["suid,nodev", "exec"]).unwrap();
        assert!(o.mount.contains(&M::Suid) && !o.mount.contains(&M::NoSuid));
        assert!(o.mount.contains(&M::NoDev));
        assert!(o.mount.contains(&M::Exec));
    }

    #[test]
    fn default_permissions_can_be_turned_off_and_on() {
        let o = parse(&["no_default_permissions"]).unwrap();
        assert!(!o.mount.contains(&M::DefaultPermissions));
        let o = parse(&["no_default_permissions", "default_permissions"]).unwrap();
        assert_eq!(
            o.mount
                .iter()
                .filter(|m| **m == M::DefaultPermissions)
                .count(),
            1
        );
    }

    #[test]
    fn dev_is_refused() {
        let e = parse(&["ro,dev"]).unwrap_err();
        assert!(e.starts_with("mount option `dev` is refused"), "{e}");
        assert!(!parse(&["nodev"]).unwrap().mount.contains(&M::Dev));
    }

    #[test]
    fn acl_and_own_options() {
        let o = parse(&["allow_other,store_dir=/s,allow_missing,no_passthrough"]).unwrap();
        assert_eq!(o.acl, SessionACL::All);
        assert_eq!(o.store_dir, Some(PathBuf::from("/s")));
        assert!(o.allow_missing && o.no_passthrough);
    }

    #[test]
    fn gc_roots_option() {
        let o = parse(&["gc_roots=off"]).unwrap();
        assert_eq!(o.gc_roots, Some(GcRootsMode::Off));
        let e = parse(&["gc_roots=sometimes"]).unwrap_err();
        assert!(e.contains("gc_roots=sometimes"), "{e}");
    }

    #[test]
    fn fstab_and_systemd_options_are_ignored() {
        let o = parse(&["rw,defaults,_netdev,nofail,x-systemd.automount,noauto"]).unwrap();
        assert_eq!(o, MountOptions::default());
    }

    #[test]
    fn unknown_option_is_an_error() {
        let e = parse(&["ro,frobnicate"]).unwrap_err();
        assert!(e.contains("frobnicate"), "{e}");
    }

    #[test]
    fn auto_unmount_implies_allow_root() {
        let mut o = parse(&["auto_unmount"]).unwrap();
        o.finish("x");
        assert_eq!(o.acl, SessionACL::RootAndOwner);
        assert!(o.mount.contains(&M::FSName("x".into())));
    }
}
