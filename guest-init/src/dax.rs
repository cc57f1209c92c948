//! Whether a store mounted with `dax=always` really maps its files from the device.
//!
//! erofs takes `dax=always` on any block device and, when the device cannot do DAX (a
//! virtio disk, a loop device, a pmem namespace without page structures), turns it off
//! with only a line in the kernel log: the guest then works, but every file it reads is
//! copied into its own page cache, which is what DAX was meant to save. Two facts say
//! whether it stayed on: the mount's options (erofs shows `dax=always` only while it is
//! in effect) and `STATX_ATTR_DAX` on a file, which the kernel sets on each inode it
//! serves through DAX. erofs serves a file that way only when its data is plain blocks,
//! as `mkimage --dax` lays out every file of [`MIN_FILE_SIZE`] or more; a file checked
//! here also tells an image written without `--dax` apart.

use std::collections::VecDeque;
use std::ffi::{CString, OsStr};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, StatxAttributes, StatxFlags};

use crate::say;

/// Files of this size or more are laid out plain in a DAX image (mkimage's threshold), so
/// any one of them shows whether the image's files are mapped.
pub const MIN_FILE_SIZE: u64 = 4096;

/// How many directory entries to look through for such a file before giving up: the check
/// runs at every boot and must stay cheap on a store of any size.
const SEARCH_BUDGET: usize = 20_000;

/// What the check found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Dax {
    /// Files are mapped from the device; why we know.
    On(String),
    /// They are read into the page cache; why.
    Off(String),
    /// The kernel shows neither fact.
    Unknown(String),
}

/// A regular file of the store and what the kernel says of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sample {
    /// Relative to the store's root.
    pub path: PathBuf,
    /// Its size in bytes.
    pub size: u64,
    /// Whether the kernel reports `STATX_ATTR_DAX` at all (Linux 5.8 and later).
    pub attribute_known: bool,
    /// Whether the file is served through DAX.
    pub dax: bool,
}

/// The verdict from the mount's options (`Some(true)`: `dax=always` shown; `None`: the
/// mount was not found) and a sampled file, if one was found.
pub fn verdict(option: Option<bool>, sample: Option<&Sample>) -> Dax {
    if option == Some(false) {
        return Dax::Off(
            "the kernel turned dax=always off: the device cannot do DAX (its log says why)".into(),
        );
    }
    let shown = |s: &Sample| format!("{} ({} bytes)", s.path.display(), s.size);
    match (option, sample) {
        (_, Some(s)) if s.attribute_known && s.dax => {
            Dax::On(format!("{} is mapped from the device", shown(s)))
        }
        (_, Some(s)) if s.attribute_known => Dax::Off(format!(
            "{} is not mapped from the device although dax=always is in effect: its data is \
             not plain blocks (an image not written with mkimage --dax?)",
            shown(s)
        )),
        (Some(true), Some(_)) => {
            Dax::On("dax=always is in effect (this kernel does not show DAX per file)".into())
        }
        (Some(true), None) => Dax::On(format!(
            "dax=always is in effect (found no file of {MIN_FILE_SIZE} bytes or more to check)"
        )),
        (_, _) => Dax::Unknown(
            "the mount is not listed and no file shows whether it is served through DAX".into(),
        ),
    }
}

/// Whether the mount holding `store` shows `dax=always`; `None` when it is not in
/// /proc/self/mountinfo (or the kernel gives no mount id).
fn mount_option(store: BorrowedFd<'_>) -> Option<bool> {
    let st = rustix::fs::statx(store, "", AtFlags::EMPTY_PATH, StatxFlags::MNT_ID).ok()?;
    if !StatxFlags::from_bits_retain(st.stx_mask).contains(StatxFlags::MNT_ID) {
        return None;
    }
    let mounts = mountinfo::read().ok()?;
    let mount = mounts.iter().find(|m| m.id == st.stx_mnt_id)?;
    Some(
        mount
            .super_options
            .iter()
            .any(|o| o == "dax=always" || o == "dax"),
    )
}

/// The first regular file of [`MIN_FILE_SIZE`] or more below `store`, breadth first,
/// within [`SEARCH_BUDGET`] entries.
fn sample(store: BorrowedFd<'_>) -> Option<Sample> {
    let mut queue = VecDeque::from([PathBuf::new()]);
    let mut budget = SEARCH_BUDGET;
    while let Some(rel) = queue.pop_front() {
        let at = if rel.as_os_str().is_empty() {
            Path::new(".")
        } else {
            &rel
        };
        let Ok(dir) = rustix::fs::openat(
            store,
            at,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        ) else {
            continue;
        };
        let Ok(entries) = rustix::fs::Dir::read_from(&dir) else {
            continue;
        };
        for entry in entries.filter_map(Result::ok) {
            let name: CString = entry.file_name().to_owned();
            if name.as_bytes() == b"." || name.as_bytes() == b".." {
                continue;
            }
            if budget == 0 {
                return None;
            }
            budget -= 1;
            let path = rel.join(OsStr::from_bytes(name.as_bytes()));
            match entry.file_type() {
                FileType::Directory => queue.push_back(path),
                FileType::RegularFile | FileType::Unknown => {
                    let Ok(st) = rustix::fs::statx(
                        dir.as_fd(),
                        &name,
                        AtFlags::SYMLINK_NOFOLLOW,
                        StatxFlags::TYPE | StatxFlags::SIZE,
                    ) else {
                        continue;
                    };
                    let file_type = FileType::from_raw_mode(u32::from(st.stx_mode));
                    if file_type == FileType::Directory {
                        queue.push_back(path);
                    } else if file_type == FileType::RegularFile && st.stx_size >= MIN_FILE_SIZE {
                        return Some(Sample {
                            path,
                            size: st.stx_size,
                            attribute_known: st.stx_attributes_mask.contains(StatxAttributes::DAX),
                            dax: st.stx_attributes.contains(StatxAttributes::DAX),
                        });
                    }
                }
                _ => {}
            }
        }
    }
    None
}

/// Checks the store whose root is `store` (a mount made with `dax=always`).
pub fn check(store: BorrowedFd<'_>) -> Dax {
    verdict(mount_option(store), sample(store).as_ref())
}

/// Checks the store and says on the console, either way, whether its files are mapped
/// from `node`.
pub fn report(store: BorrowedFd<'_>, node: &str) -> Dax {
    let dax = check(store);
    match &dax {
        Dax::On(why) => say(&format!(
            "DAX on for {node}: {why}; the store's files are mapped from the host, not \
             copied into this guest's memory"
        )),
        Dax::Off(why) => say(&format!(
            "warning: DAX off for {node}: {why}; every file read from the store is copied \
             into this guest's page cache"
        )),
        Dax::Unknown(why) => say(&format!(
            "warning: cannot tell whether DAX is on for {node}: {why}"
        )),
    }
    dax
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(known: bool, dax: bool) -> Sample {
        Sample {
            path: "x-hello/bin/hello".into(),
            size: 8192,
            attribute_known: known,
            dax,
        }
    }

    #[test]
    fn the_mount_option_turned_off_wins() {
        for s in [None, Some(file(true, true)), Some(file(false, false))] {
            assert!(
                matches!(verdict(Some(false), s.as_ref()), Dax::Off(ref w) if w.contains("turned dax=always off")),
                "{s:?}"
            );
        }
    }

    #[test]
    fn a_mapped_file_is_on_and_names_it() {
        for option in [Some(true), None] {
            let Dax::On(why) = verdict(option, Some(&file(true, true))) else {
                panic!("{option:?}")
            };
            assert!(why.contains("x-hello/bin/hello (8192 bytes)"), "{why}");
        }
    }

    #[test]
    fn an_unmapped_file_is_off_and_suggests_mkimage_dax() {
        for option in [Some(true), None] {
            let Dax::Off(why) = verdict(option, Some(&file(true, false))) else {
                panic!("{option:?}")
            };
            assert!(why.contains("mkimage --dax"), "{why}");
        }
    }

    #[test]
    fn without_per_file_attributes_the_option_decides() {
        assert!(matches!(
            verdict(Some(true), Some(&file(false, false))),
            Dax::On(_)
        ));
        assert!(matches!(verdict(Some(true), None), Dax::On(_)));
        assert!(matches!(
            verdict(None, Some(&file(false, false))),
            Dax::Unknown(_)
        ));
        assert!(matches!(verdict(None, None), Dax::Unknown(_)));
    }

    /// On the host's own filesystems (no DAX): the search finds the big file, not the
    /// small one or what is behind a symbolic link, and the verdict is never "on".
    #[test]
    fn finds_a_file_of_the_threshold_and_sees_no_dax_on_a_plain_filesystem() {
        let dir = std::env::temp_dir().join(format!("guest-init-dax-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("a-small")).unwrap();
        std::fs::create_dir_all(dir.join("b-big/lib")).unwrap();
        std::fs::write(dir.join("a-small/f"), vec![1u8; 4095]).unwrap();
        std::os::unix::fs::symlink("/etc", dir.join("a-link")).unwrap();
        std::fs::write(dir.join("b-big/lib/libc.so"), vec![2u8; 4096]).unwrap();
        let fd = rustix::fs::open(
            &dir,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .unwrap();
        let found = sample(fd.as_fd());
        let dax = check(fd.as_fd());
        std::fs::remove_dir_all(&dir).unwrap();
        let found = found.expect("a file of 4096 bytes");
        assert_eq!(found.path, Path::new("b-big/lib/libc.so"));
        assert_eq!(found.size, 4096);
        assert!(!found.dax);
        assert!(!matches!(dax, Dax::On(_)), "{dax:?}");
    }
}
