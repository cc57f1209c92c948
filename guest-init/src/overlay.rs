//! The writable store's overlay options, kept as a typed value and rendered for each
//! mount API: the `mount(2)` data string of stage 1 and the `fsconfig` calls of
//! `mount-store`.

use std::path::Path;

use rustix::mount::{MountAttrFlags, MountFlags};

/// An overlay of one read-only lower layer with an upper and a work directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OverlayOptions {
    lowerdir: String,
    upperdir: String,
    workdir: String,
    /// `index=off`: needed where another overlay shares the upper layer until it is
    /// detached (a store replaced on a running system), which the index would refuse.
    index_off: bool,
}

/// Characters overlay gives a meaning inside its options: `,` ends an option in the
/// `mount(2)` data string, `:` separates lower layers and `\` escapes either.
const SPECIAL: [char; 3] = [',', ':', '\\'];

/// The mount flags of the overlay for `mount(2)`: no device nodes through it, as the
/// other store mounts.
pub const MOUNT_FLAGS: MountFlags = MountFlags::NODEV;
/// The same as mount attributes, for `fsmount`.
pub const MOUNT_ATTRS: MountAttrFlags = MountAttrFlags::MOUNT_ATTR_NODEV;

impl OverlayOptions {
    /// The overlay of `lower` with `upper` and `work`. Paths holding `,`, `:` or `\`
    /// (which the layers here never do) are refused rather than escaped, since no
    /// escaping works for every kernel and API: through `mount(2)` a comma needs `\,`;
    /// Linux 6.1 passes `fsconfig` values on in that same data string but refuses a
    /// value with a comma, escaped or not; 6.5 and later take commas in `fsconfig`
    /// values as they are.
    pub fn new(lower: &Path, upper: &Path, work: &Path) -> Result<OverlayOptions, String> {
        let checked = |option: &str, path: &Path| -> Result<String, String> {
            let text = path
                .to_str()
                .ok_or_else(|| format!("overlay {option} {path:?}: not UTF-8"))?;
            if text.contains(SPECIAL) {
                return Err(format!(
                    "overlay {option} {text:?}: a layer's path may not hold `,`, `:` or `\\`, \
                     which overlay reads as separators"
                ));
            }
            if text.is_empty() {
                return Err(format!("overlay {option}: an empty path"));
            }
            Ok(text.to_owned())
        };
        Ok(OverlayOptions {
            lowerdir: checked("lowerdir", lower)?,
            upperdir: checked("upperdir", upper)?,
            workdir: checked("workdir", work)?,
            index_off: false,
        })
    }

    /// The same overlay with its index off (see the field).
    pub fn without_index(self) -> OverlayOptions {
        OverlayOptions {
            index_off: true,
            ..self
        }
    }

    /// The options as `fsconfig` takes them, in order: each a key and its string value,
    /// or a key alone for a flag.
    pub fn fsconfig(&self) -> Vec<(&'static str, Option<&str>)> {
        let mut options = vec![
            ("lowerdir", Some(self.lowerdir.as_str())),
            ("upperdir", Some(self.upperdir.as_str())),
            ("workdir", Some(self.workdir.as_str())),
        ];
        if self.index_off {
            options.push(("index", Some("off")));
        }
        options
    }

    /// The options as the `mount(2)` data string: `key=value` or `key`, joined by commas.
    pub fn data(&self) -> String {
        let options: Vec<String> = self
            .fsconfig()
            .into_iter()
            .map(|(key, value)| match value {
                Some(value) => format!("{key}={value}"),
                None => key.to_owned(),
            })
            .collect();
        options.join(",")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options() -> OverlayOptions {
        OverlayOptions::new(
            Path::new("/nix/.ro-store"),
            Path::new("/nix/.rw-store/store"),
            Path::new("/nix/.rw-store/work"),
        )
        .unwrap()
    }

    #[test]
    fn rendered_for_mount_2() {
        assert_eq!(
            options().data(),
            "lowerdir=/nix/.ro-store,upperdir=/nix/.rw-store/store,workdir=/nix/.rw-store/work"
        );
        assert_eq!(
            options().without_index().data(),
            "lowerdir=/nix/.ro-store,upperdir=/nix/.rw-store/store,\
             workdir=/nix/.rw-store/work,index=off"
        );
    }

    #[test]
    fn rendered_for_fsconfig() {
        assert_eq!(
            options().fsconfig(),
            [
                ("lowerdir", Some("/nix/.ro-store")),
                ("upperdir", Some("/nix/.rw-store/store")),
                ("workdir", Some("/nix/.rw-store/work")),
            ]
        );
        assert_eq!(
            options().without_index().fsconfig().last(),
            Some(&("index", Some("off")))
        );
    }

    /// Layers reached through a held descriptor, as `mount-store` gives them.
    #[test]
    fn descriptor_paths_are_fine() {
        let o = OverlayOptions::new(
            Path::new("/proc/self/fd/3"),
            Path::new("/proc/self/fd/4/store"),
            Path::new("/nix/.rw-store/work.123"),
        )
        .unwrap();
        assert!(o.data().starts_with("lowerdir=/proc/self/fd/3,"));
    }

    #[test]
    fn separators_in_paths_are_refused_naming_the_option() {
        let ok = Path::new("/a");
        for (bad, which) in [("/a,b", 0), ("/a:b", 1), ("/a\\,b", 2), ("", 1)] {
            let mut paths = [ok, ok, ok];
            paths[which] = Path::new(bad);
            let e = OverlayOptions::new(paths[0], paths[1], paths[2]).unwrap_err();
            let option = ["lowerdir", "upperdir", "workdir"][which];
            assert!(e.starts_with(&format!("overlay {option}")), "{e}");
        }
    }

    #[test]
    fn paths_that_are_not_utf8_are_refused() {
        use std::os::unix::ffi::OsStrExt;
        let bad = Path::new(std::ffi::OsStr::from_bytes(b"/a\xff"));
        let e = OverlayOptions::new(Path::new("/a"), bad, Path::new("/w")).unwrap_err();
        assert!(e.contains("upperdir") && e.contains("not UTF-8"), "{e}");
    }
}
