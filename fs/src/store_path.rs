//! Nix store paths, validated with Nix's own rules.
//!
//! Everything that reaches the filesystem or an image is checked here first, so a closure
//! input can never name something like `..`, a nested file, or a path outside the store.

use std::ffi::OsStr;
use std::fmt;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// Nix's base-32 alphabet. Nix leaves out `e`, `o`, `u` and `t` so that hashes do not spell
/// words.
pub const NIX_BASE32: &[u8; 32] = b"0123456789abcdfghijklmnpqrsvwxyz";

/// Length of the hash part of a base name: 160 bits in base-32.
pub const HASH_LEN: usize = 32;

/// Longest name (after the hash and the dash) that Nix accepts; longer ones would be rejected
/// by Nix itself.
pub const MAX_NAME_LEN: usize = 211;

/// Characters Nix allows in the name part.
const NAME_CHARS: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+-._?=";

/// Longest hash part quoted in an error; the "hash part" of garbage can be a whole line.
const MAX_QUOTED_HASH: usize = 40;

const fn byte_table(allowed: &[u8]) -> [bool; 256] {
    let mut table = [false; 256];
    let mut i = 0;
    while i < allowed.len() {
        table[allowed[i] as usize] = true;
        i += 1;
    }
    table
}

// Lookup tables keep validation of million-line inputs to one load per byte.
static IS_BASE32: [bool; 256] = byte_table(NIX_BASE32);
static IS_NAME_CHAR: [bool; 256] = byte_table(NAME_CHARS);

/// A validated store path, held as its base name (`<hash>-<name>`) so it is independent of
/// the store directory. Ordered by base name bytes.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StorePath {
    // A boxed str rather than a String: closures can hold a million of these.
    base_name: Box<str>,
}

impl StorePath {
    /// Validates a base name such as `0c7c0xbqkqi3i8a1xndh6h8gwb3sw0nb-hello-2.12`.
    pub fn new(base_name: &str) -> Result<Self, InvalidStorePath> {
        check_base_name(base_name)?;
        Ok(Self::from_validated(base_name))
    }

    /// Validates an absolute path that must be exactly `<store_dir>/<base name>`, with at most
    /// one trailing `/`. Trailing slashes on `store_dir` are ignored.
    pub fn from_absolute(
        path: impl AsRef<OsStr>,
        store_dir: &Path,
    ) -> Result<Self, InvalidStorePath> {
        let base = base_of_absolute(path.as_ref().as_bytes(), trim_store_dir(store_dir))?;
        Ok(Self::from_validated(base))
    }

    /// Wraps a base name that has already passed [`check_base_name`].
    pub(crate) fn from_validated(base_name: &str) -> Self {
        StorePath {
            base_name: base_name.into(),
        }
    }

    /// The base name, `<hash>-<name>`: the entry name in the store directory.
    pub fn base_name(&self) -> &str {
        &self.base_name
    }

    /// The 32-character base-32 hash.
    pub fn hash_part(&self) -> &str {
        &self.base_name[..HASH_LEN]
    }

    /// The name after the hash and the dash.
    pub fn name(&self) -> &str {
        &self.base_name[HASH_LEN + 1..]
    }
}

/// Shows the base name, which is what identifies the path whatever the store directory.
impl fmt::Display for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.base_name)
    }
}

/// Why a string is not a store path. The message is meant to be shown as is, after the
/// offending text.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum InvalidStorePath {
    /// The base name is empty.
    Empty,
    /// The part before the first `-` does not have [`HASH_LEN`] characters.
    HashLength {
        /// The hash part, cut to a readable length.
        hash: String,
        /// Its length in characters.
        chars: usize,
    },
    /// The hash part has a character outside [`NIX_BASE32`].
    HashChar {
        /// The character.
        ch: char,
        /// Its 1-based position in the base name.
        position: usize,
    },
    /// The hash is not followed by `-` and a name.
    MissingName,
    /// Nothing follows the `-`.
    EmptyName,
    /// The name has a `/`, so it would name something inside a store path.
    NameSlash,
    /// The name is `.` or `..`, or its first dash-separated component is: Nix refuses
    /// these (it accepts other names that start with a period since 2.21).
    NameDotComponent {
        /// `.` or `..`.
        component: &'static str,
    },
    /// The name has a character Nix does not allow.
    NameChar {
        /// The character.
        ch: char,
    },
    /// The name is longer than [`MAX_NAME_LEN`].
    NameTooLong {
        /// Its length in characters.
        chars: usize,
    },
    /// The path is not valid UTF-8 (store paths are ASCII).
    NotUtf8 {
        /// The first invalid byte.
        byte: u8,
        /// Its 1-based position in the path.
        position: usize,
    },
    /// The path is not absolute.
    Relative {
        /// The store directory the path was checked against.
        store_dir: PathBuf,
    },
    /// The path is not under the store directory.
    OutsideStore {
        /// The store directory the path was checked against.
        store_dir: PathBuf,
    },
    /// The path is the store directory itself.
    StoreDir {
        /// The store directory the path was checked against.
        store_dir: PathBuf,
    },
    /// The path has an empty component (`//`) after the store directory.
    EmptyComponent {
        /// The store directory the path was checked against.
        store_dir: PathBuf,
    },
    /// The path names something inside a store path.
    InsideStorePath {
        /// The base name of the store path it is in.
        store_path: String,
        /// The store directory the path was checked against.
        store_dir: PathBuf,
    },
}

impl fmt::Display for InvalidStorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Empty => f.write_str("base name is empty"),
            Self::HashLength { hash, chars } => {
                let cut = if *chars > hash.chars().count() {
                    "..."
                } else {
                    ""
                };
                write!(
                    f,
                    "hash part `{}{cut}` is {chars} characters, expected {HASH_LEN}",
                    hash.escape_debug()
                )
            }
            Self::HashChar { ch, position } => {
                write!(
                    f,
                    "character `{}` at position {position} is not in Nix base-32",
                    ch.escape_debug()
                )?;
                if matches!(ch, 'e' | 'o' | 'u' | 't') {
                    f.write_str(" (which has no e, o, u or t)")?;
                }
                Ok(())
            }
            Self::MissingName => write!(
                f,
                "no `-` and name after the {HASH_LEN}-character hash part"
            ),
            Self::EmptyName => f.write_str("name is empty"),
            Self::NameSlash => f.write_str("name contains `/`"),
            Self::NameDotComponent { component } => write!(
                f,
                "name or its first dash-separated component is `{component}`, which Nix refuses"
            ),
            Self::NameChar { ch } => write!(
                f,
                "character `{}` in name is not allowed (only letters, digits and + - . _ ? =)",
                ch.escape_debug()
            ),
            Self::NameTooLong { chars } => write!(
                f,
                "name is {chars} characters, at most {MAX_NAME_LEN} allowed"
            ),
            Self::NotUtf8 { byte, position } => {
                write!(f, "byte 0x{byte:02x} at position {position} is not UTF-8")
            }
            Self::Relative { store_dir } => write!(
                f,
                "relative path, expected one directly under the store directory {}",
                store_dir.display()
            ),
            Self::OutsideStore { store_dir } => {
                write!(f, "not under the store directory {}", store_dir.display())
            }
            Self::StoreDir { store_dir } => write!(
                f,
                "the store directory {} itself, not a store path in it",
                store_dir.display()
            ),
            Self::EmptyComponent { store_dir } => write!(
                f,
                "empty path component (`//`) under the store directory {}",
                store_dir.display()
            ),
            Self::InsideStorePath {
                store_path,
                store_dir,
            } => write!(
                f,
                "inside the store path `{store_path}`, not directly under the store directory {}",
                store_dir.display()
            ),
        }
    }
}

impl std::error::Error for InvalidStorePath {}

/// The store directory as bytes without trailing slashes; empty for `/`, so that
/// `<dir>/<base>` is still the right shape.
pub(crate) fn trim_store_dir(store_dir: &Path) -> &[u8] {
    let bytes = store_dir.as_os_str().as_bytes();
    let end = bytes.iter().rposition(|&b| b != b'/').map_or(0, |i| i + 1);
    &bytes[..end]
}

/// The store directory for messages and for [`crate::closure::Closure`]; the inverse of
/// [`trim_store_dir`].
pub(crate) fn store_dir_path(trimmed: &[u8]) -> PathBuf {
    if trimmed.is_empty() {
        PathBuf::from("/")
    } else {
        PathBuf::from(OsStr::from_bytes(trimmed))
    }
}

/// Checks that `path` is `<store_dir>/<base>` (with at most one trailing `/`) and returns the
/// validated base, borrowed so callers that only check need not allocate. `store_dir` must be
/// trimmed with [`trim_store_dir`].
pub(crate) fn base_of_absolute<'a>(
    path: &'a [u8],
    store_dir: &[u8],
) -> Result<&'a str, InvalidStorePath> {
    let dir = || store_dir_path(store_dir);
    let path = std::str::from_utf8(path).map_err(|e| InvalidStorePath::NotUtf8 {
        byte: path[e.valid_up_to()],
        position: e.valid_up_to() + 1,
    })?;
    if !path.starts_with('/') {
        return Err(InvalidStorePath::Relative { store_dir: dir() });
    }
    let Some(rest) = path.as_bytes().strip_prefix(store_dir) else {
        return Err(InvalidStorePath::OutsideStore { store_dir: dir() });
    };
    let rest = match rest {
        [] => return Err(InvalidStorePath::StoreDir { store_dir: dir() }),
        [b'/', rest @ ..] => rest,
        // A sibling sharing the prefix, like `/nix/store2`.
        _ => return Err(InvalidStorePath::OutsideStore { store_dir: dir() }),
    };
    // Slicing by byte counts is safe: the prefix ended at an ASCII `/`.
    let rest = &path[path.len() - rest.len()..];
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.is_empty() {
        return Err(InvalidStorePath::StoreDir { store_dir: dir() });
    }
    if rest.starts_with('/') {
        return Err(InvalidStorePath::EmptyComponent { store_dir: dir() });
    }
    match rest.split_once('/') {
        None => {
            check_base_name(rest)?;
            Ok(rest)
        }
        Some((base, _)) => {
            check_base_name(base)?;
            Err(InvalidStorePath::InsideStorePath {
                store_path: base.to_owned(),
                store_dir: dir(),
            })
        }
    }
}

/// Validates a base name with Nix's rules; the fast path is a table lookup per byte, the
/// precise diagnosis only runs on failure.
pub(crate) fn check_base_name(base: &str) -> Result<(), InvalidStorePath> {
    let bytes = base.as_bytes();
    let fast_ok = bytes.len() > HASH_LEN + 1
        && bytes.len() <= HASH_LEN + 1 + MAX_NAME_LEN
        && bytes[HASH_LEN] == b'-'
        && (bytes[HASH_LEN + 1] != b'.' || dot_component(&bytes[HASH_LEN + 1..]).is_none())
        && bytes[..HASH_LEN].iter().all(|&b| IS_BASE32[usize::from(b)])
        && bytes[HASH_LEN + 1..]
            .iter()
            .all(|&b| IS_NAME_CHAR[usize::from(b)]);
    if fast_ok {
        Ok(())
    } else {
        Err(diagnose_base_name(base))
    }
}

/// `.` or `..` when that is the name's first dash-separated component: the names Nix's
/// `checkName` refuses among those that start with a period. A name like `.hidden`,
/// `...` or `..a-b` is valid.
fn dot_component(name: &[u8]) -> Option<&'static str> {
    let first = name.split(|&b| b == b'-').next().unwrap_or_default();
    match first {
        b"." => Some("."),
        b".." => Some(".."),
        _ => None,
    }
}

/// Finds the first problem in a base name that failed the fast check.
fn diagnose_base_name(base: &str) -> InvalidStorePath {
    if base.is_empty() {
        return InvalidStorePath::Empty;
    }
    let (hash, name) = match base.split_once('-') {
        Some((hash, name)) => (hash, Some(name)),
        None => (base, None),
    };
    let chars = hash.chars().count();
    if chars != HASH_LEN {
        return InvalidStorePath::HashLength {
            hash: hash.chars().take(MAX_QUOTED_HASH).collect(),
            chars,
        };
    }
    if let Some((i, ch)) = hash
        .chars()
        .enumerate()
        .find(|&(_, c)| !c.is_ascii() || !IS_BASE32[c as usize])
    {
        return InvalidStorePath::HashChar {
            ch,
            position: i + 1,
        };
    }
    let Some(name) = name else {
        return InvalidStorePath::MissingName;
    };
    if name.is_empty() {
        return InvalidStorePath::EmptyName;
    }
    if name.contains('/') {
        return InvalidStorePath::NameSlash;
    }
    if let Some(component) = dot_component(name.as_bytes()) {
        return InvalidStorePath::NameDotComponent { component };
    }
    if let Some(ch) = name
        .chars()
        .find(|&c| !c.is_ascii() || !IS_NAME_CHAR[c as usize])
    {
        return InvalidStorePath::NameChar { ch };
    }
    // Only ASCII is left, so bytes are characters.
    InvalidStorePath::NameTooLong { chars: name.len() }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: &str = "0c7c0xbqkqi3i8a1xndh6h8gwb3sw0nb";

    fn err(base: &str) -> String {
        StorePath::new(base).unwrap_err().to_string()
    }

    fn abs_err(path: &str, store_dir: &str) -> String {
        StorePath::from_absolute(path, Path::new(store_dir))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn alphabet_excludes_e_o_u_t() {
        assert_eq!(NIX_BASE32.len(), 32);
        for c in b"eout" {
            assert!(!NIX_BASE32.contains(c));
        }
        assert!(NIX_BASE32.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn valid_base_names() {
        let p = StorePath::new(&format!("{HASH}-hello-2.12")).unwrap();
        assert_eq!(p.base_name(), format!("{HASH}-hello-2.12"));
        assert_eq!(p.hash_part(), HASH);
        assert_eq!(p.name(), "hello-2.12");
        assert_eq!(p.to_string(), p.base_name());

        // Names that start with a period are valid unless their first dash-separated
        // component is `.` or `..` (Nix 2.21 and later).
        for name in [
            "a",
            "A+b-c.d_e?f=g",
            "source",
            "x..y",
            "-dash-first",
            "1",
            ".hidden",
            "...",
            "...-x",
            "..a",
            "..a-b",
            ".a-.",
            ".x-..",
            "._",
        ] {
            let p = StorePath::new(&format!("{HASH}-{name}")).unwrap();
            assert_eq!(p.name(), name);
        }
        let longest = "n".repeat(MAX_NAME_LEN);
        assert_eq!(
            StorePath::new(&format!("{HASH}-{longest}")).unwrap().name(),
            longest
        );
    }

    #[test]
    fn ordering_is_by_base_name_bytes() {
        let a = StorePath::new(&format!("{HASH}-b")).unwrap();
        let b = StorePath::new("1b0ssf1c2gzvm7hbqkl3a43wf4gnmgh3-a").unwrap();
        let c = StorePath::new(&format!("{HASH}-B")).unwrap();
        let mut v = vec![b.clone(), a.clone(), c.clone()];
        v.sort();
        assert_eq!(v, [c, a, b]);
    }

    #[test]
    fn hash_length() {
        assert_eq!(err(""), "base name is empty");
        assert_eq!(
            err("xyz-foo"),
            "hash part `xyz` is 3 characters, expected 32"
        );
        assert_eq!(
            err(&format!("{HASH}b-foo")),
            format!("hash part `{HASH}b` is 33 characters, expected 32")
        );
        assert_eq!(
            err(&HASH[..31]),
            format!("hash part `{}` is 31 characters, expected 32", &HASH[..31])
        );
        assert_eq!(
            err(HASH),
            "no `-` and name after the 32-character hash part"
        );
        // Garbage without a dash is quoted only in part.
        let long = "z".repeat(300);
        assert_eq!(
            err(&long),
            format!(
                "hash part `{}...` is 300 characters, expected 32",
                &long[..MAX_QUOTED_HASH]
            )
        );
        // Control characters are made visible.
        assert_eq!(
            err("a\tb-foo"),
            "hash part `a\\tb` is 3 characters, expected 32"
        );
    }

    #[test]
    fn hash_alphabet() {
        for bad in ['e', 'o', 'u', 't'] {
            let mut hash = HASH.to_owned();
            hash.replace_range(4..5, &bad.to_string());
            assert_eq!(
                err(&format!("{hash}-foo")),
                format!(
                    "character `{bad}` at position 5 is not in Nix base-32 \
                     (which has no e, o, u or t)"
                )
            );
        }
        let upper = HASH.to_uppercase();
        assert_eq!(
            err(&format!("{upper}-foo")),
            "character `C` at position 2 is not in Nix base-32"
        );
        let mut hash = HASH.to_owned();
        hash.replace_range(31..32, "é");
        assert_eq!(
            err(&format!("{hash}-foo")),
            "character `é` at position 32 is not in Nix base-32"
        );
    }

    #[test]
    fn bad_names() {
        let name_err = |name: &str| err(&format!("{HASH}-{name}"));
        assert_eq!(name_err(""), "name is empty");
        assert_eq!(name_err("foo/bar"), "name contains `/`");
        assert_eq!(name_err("../etc"), "name contains `/`");
        let dot = |c: &str| {
            format!("name or its first dash-separated component is `{c}`, which Nix refuses")
        };
        assert_eq!(name_err("."), dot("."));
        assert_eq!(name_err(".."), dot(".."));
        assert_eq!(name_err(".-foo"), dot("."));
        assert_eq!(name_err("..-foo"), dot(".."));
        assert_eq!(name_err("..-"), dot(".."));
        assert_eq!(
            name_err("foo%bar"),
            "character `%` in name is not allowed (only letters, digits and + - . _ ? =)"
        );
        assert!(name_err("hello world").starts_with("character ` ` in name"));
        assert!(name_err("a\nb").starts_with("character `\\n` in name"));
        assert!(name_err("ünicode").starts_with("character `ü` in name"));
        assert_eq!(
            name_err(&"n".repeat(MAX_NAME_LEN + 1)),
            "name is 212 characters, at most 211 allowed"
        );
        assert_eq!(
            name_err(&"n".repeat(230)),
            "name is 230 characters, at most 211 allowed"
        );
    }

    #[test]
    fn absolute_paths() {
        let nix = Path::new("/nix/store");
        let p = StorePath::from_absolute(format!("/nix/store/{HASH}-hello"), nix).unwrap();
        assert_eq!(p.base_name(), format!("{HASH}-hello"));
        // One trailing slash is tolerated, on the path and on the store directory.
        let q = StorePath::from_absolute(format!("/nix/store/{HASH}-hello/"), nix).unwrap();
        assert_eq!(p, q);
        let r = StorePath::from_absolute(
            Path::new(&format!("/nix/store/{HASH}-hello")),
            Path::new("/nix/store//"),
        )
        .unwrap();
        assert_eq!(p, r);
        let custom = StorePath::from_absolute(
            format!("/tmp/x/store/{HASH}-hello"),
            Path::new("/tmp/x/store"),
        )
        .unwrap();
        assert_eq!(p, custom);
        let root = StorePath::from_absolute(format!("/{HASH}-hello"), Path::new("/")).unwrap();
        assert_eq!(p, root);
    }

    #[test]
    fn absolute_path_errors() {
        let dir = "/nix/store";
        assert_eq!(
            abs_err(&format!("/nix/store/{HASH}-hello/bin/sh"), dir),
            format!(
                "inside the store path `{HASH}-hello`, not directly under the store \
                 directory /nix/store"
            )
        );
        assert_eq!(
            abs_err(&format!("/nix/store/{HASH}-hello//"), dir),
            format!(
                "inside the store path `{HASH}-hello`, not directly under the store \
                 directory /nix/store"
            )
        );
        assert_eq!(
            abs_err(&format!("/gnu/store/{HASH}-hello"), dir),
            "not under the store directory /nix/store"
        );
        assert_eq!(
            abs_err(&format!("/nix/store2/{HASH}-hello"), dir),
            "not under the store directory /nix/store"
        );
        assert_eq!(
            abs_err(&format!("/nix/store/{HASH}-hello"), "/tmp/x/store/"),
            "not under the store directory /tmp/x/store"
        );
        assert_eq!(
            abs_err(&format!("nix/store/{HASH}-hello"), dir),
            "relative path, expected one directly under the store directory /nix/store"
        );
        for path in ["/nix/store", "/nix/store/", "/nix/store//"] {
            assert_eq!(
                abs_err(path, dir),
                "the store directory /nix/store itself, not a store path in it"
            );
        }
        assert_eq!(
            abs_err(&format!("/nix/store//{HASH}-hello"), dir),
            "empty path component (`//`) under the store directory /nix/store"
        );
        assert_eq!(
            abs_err("/nix/store/..", dir),
            "hash part `..` is 2 characters, expected 32"
        );
        assert_eq!(
            abs_err(&format!("/nix/store/{HASH}-.."), dir),
            "name or its first dash-separated component is `..`, which Nix refuses"
        );
        // The base name is checked before complaining about what follows it.
        assert_eq!(
            abs_err("/nix/store/.links/abc", dir),
            "hash part `.links` is 6 characters, expected 32"
        );

        let bytes = [b"/nix/store/".as_slice(), HASH.as_bytes(), b"-h\xffllo"].concat();
        assert_eq!(
            StorePath::from_absolute(OsStr::from_bytes(&bytes), Path::new(dir))
                .unwrap_err()
                .to_string(),
            "byte 0xff at position 46 is not UTF-8"
        );
    }
}
