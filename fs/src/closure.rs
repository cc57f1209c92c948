//! Closure inputs: the set of store paths to present, read from a store-path list, a
//! registration (`nix-store --dump-db` format) or a closureInfo directory.
//!
//! Inputs are checked strictly, line by line, because a closure that silently lost or gained
//! a path would give a guest a store that is not the one it was built for. Errors point at
//! the line and show it escaped, since the usual culprits (CRLF line endings, stray
//! whitespace, a path inside a store path) are invisible otherwise.

use std::fmt::{self, Write as _};
use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use crate::store_path::{self, StorePath, NIX_BASE32};

/// Longest part of an offending line quoted in a [`ClosureError`], in characters.
const MAX_QUOTED: usize = 120;

/// Largest closure input read, in bytes. Generous (a store-path list of three million
/// paths fits), but bounded, so that a device or an endless pipe given by mistake is
/// refused instead of filling memory.
pub const MAX_INPUT_BYTES: u64 = 256 << 20;

/// Why an input could not be read.
#[derive(Debug)]
enum ReadError {
    Io(io::Error),
    TooLarge,
}

impl ReadError {
    fn at(self, origin: &str) -> ClosureError {
        match self {
            ReadError::Io(e) => ClosureError::io(origin, &e),
            ReadError::TooLarge => ClosureError::new(
                origin,
                format!(
                    "input is larger than {} MiB, the most a closure input may be (a device \
                     or an endless stream?)",
                    MAX_INPUT_BYTES >> 20
                ),
            ),
        }
    }
}

/// Reads all of `reader`, refusing more than [`MAX_INPUT_BYTES`].
fn read_capped(reader: impl Read) -> Result<Vec<u8>, ReadError> {
    read_at_most(reader, MAX_INPUT_BYTES)
}

/// Reads all of `reader`, refusing more than `cap` bytes.
fn read_at_most(reader: impl Read, cap: u64) -> Result<Vec<u8>, ReadError> {
    let mut text = Vec::new();
    reader
        .take(cap + 1)
        .read_to_end(&mut text)
        .map_err(ReadError::Io)?;
    if text.len() as u64 > cap {
        return Err(ReadError::TooLarge);
    }
    Ok(text)
}

/// Reads the file at `path` as closure inputs are read: at most [`MAX_INPUT_BYTES`], a
/// device or an endless pipe refused; the error names the file.
pub fn read_input_file(path: &Path) -> Result<Vec<u8>, ClosureError> {
    read_file_capped(path).map_err(|e| e.at(&path.display().to_string()))
}

/// Reads the file at `path` with [`read_capped`]; a regular file that is too large is
/// refused by its size, before anything is read.
fn read_file_capped(path: &Path) -> Result<Vec<u8>, ReadError> {
    let file = fs::File::open(path).map_err(ReadError::Io)?;
    let meta = file.metadata().map_err(ReadError::Io)?;
    if meta.is_file() && meta.len() > MAX_INPUT_BYTES {
        return Err(ReadError::TooLarge);
    }
    read_capped(file)
}

/// A validated closure input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Closure {
    /// Store directory the paths were validated against (absolute, no trailing slash).
    pub store_dir: PathBuf,
    /// The store paths, sorted by base name, duplicates collapsed.
    pub paths: Vec<StorePath>,
    /// The registration text (`nix-store --dump-db` format) when the input carried one (a
    /// registration file, or a closureInfo directory's `registration`), for
    /// `nix-store --load-db`. It always ends with a newline.
    pub registration: Option<Vec<u8>>,
    /// Human-readable origin, e.g. the file name or `<stdin>`.
    pub origin: String,
}

/// The text formats a closure file can have.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// One absolute store path per line, as `nix-store -qR` and closureInfo's `store-paths`
    /// write.
    StorePaths,
    /// `nix-store --dump-db` records, as in closureInfo's `registration`.
    Registration,
}

impl Format {
    /// Guesses the format from the first non-blank line and the line right after it: a path
    /// followed by a hash can only be the start of a registration record.
    pub fn detect(text: &[u8]) -> Format {
        let mut lines = Lines::new(text).skip_while(|&(_, line)| is_blank(line));
        match (lines.next(), lines.next()) {
            (Some((_, first)), Some((_, second)))
                if first.starts_with(b"/") && looks_like_hash(second) =>
            {
                Format::Registration
            }
            _ => Format::StorePaths,
        }
    }
}

/// Why a closure input was rejected.
///
/// Displays as `origin:line: reason: text`, leaving out the parts that are `None`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClosureError {
    /// Where the input came from: the path as given, or `<stdin>`.
    pub origin: String,
    /// 1-based line of the problem, when it is on one line.
    pub line: Option<usize>,
    /// The offending text, quoted and escaped like `{:?}` so that control characters and
    /// invalid UTF-8 are visible; cut after 120 characters and then followed by `...`.
    pub text: Option<String>,
    /// What is wrong.
    pub reason: String,
}

impl ClosureError {
    fn new(origin: &str, reason: impl Into<String>) -> Self {
        ClosureError {
            origin: origin.to_owned(),
            line: None,
            text: None,
            reason: reason.into(),
        }
    }

    fn at(origin: &str, line: usize, text: &[u8], reason: impl Into<String>) -> Self {
        ClosureError {
            origin: origin.to_owned(),
            line: Some(line),
            text: Some(quote(text)),
            reason: reason.into(),
        }
    }

    fn io(origin: &str, error: &io::Error) -> Self {
        Self::new(origin, format!("cannot read: {error}"))
    }
}

impl fmt::Display for ClosureError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.origin)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        write!(f, ": {}", self.reason)?;
        if let Some(text) = &self.text {
            write!(f, ": {text}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ClosureError {}

impl Closure {
    /// Reads `input`: `-` means standard input; a directory is a closureInfo output (its
    /// `store-paths` file is used, its `registration` file, if present, must list the same
    /// paths and is kept); a file is autodetected with [`Format::detect`].
    pub fn load(input: &Path, store_dir: &Path) -> Result<Closure, ClosureError> {
        if input.as_os_str() == "-" {
            let origin = "<stdin>";
            let text = read_capped(io::stdin().lock()).map_err(|e| e.at(origin))?;
            return Self::parse(&text, origin, store_dir);
        }
        let origin = input.display().to_string();
        let metadata = fs::metadata(input).map_err(|e| ClosureError::io(&origin, &e))?;
        if metadata.is_dir() {
            return Self::load_closure_info(input, origin, store_dir);
        }
        let text = read_file_capped(input).map_err(|e| e.at(&origin))?;
        Self::parse(&text, &origin, store_dir)
    }

    /// Parses text already read, detecting its format; `origin` names it in errors.
    pub fn parse(text: &[u8], origin: &str, store_dir: &Path) -> Result<Closure, ClosureError> {
        Self::parse_as(text, Format::detect(text), origin, store_dir)
    }

    /// Parses text already read in a known format; `origin` names it in errors.
    pub fn parse_as(
        text: &[u8],
        format: Format,
        origin: &str,
        store_dir: &Path,
    ) -> Result<Closure, ClosureError> {
        if !store_dir.is_absolute() {
            return Err(ClosureError::new(
                origin,
                format!("store directory {} is not absolute", store_dir.display()),
            ));
        }
        let parser = Parser {
            origin,
            store_dir: store_path::trim_store_dir(store_dir),
        };
        let (paths, registration) = match format {
            Format::StorePaths => (parser.store_paths(text)?, None),
            Format::Registration => {
                let paths = parser.registration(text)?;
                let mut registration = text.to_vec();
                // `nix-store --load-db` fails with "missing input" when the last record has
                // no final newline.
                if !registration.ends_with(b"\n") {
                    registration.push(b'\n');
                }
                (paths, Some(registration))
            }
        };
        Ok(Closure {
            store_dir: store_path::store_dir_path(parser.store_dir),
            paths,
            registration,
            origin: origin.to_owned(),
        })
    }

    fn load_closure_info(
        dir: &Path,
        origin: String,
        store_dir: &Path,
    ) -> Result<Closure, ClosureError> {
        let list_path = dir.join("store-paths");
        let list_origin = list_path.display().to_string();
        let list = match read_file_capped(&list_path) {
            Ok(text) => text,
            Err(ReadError::Io(e)) if e.kind() == io::ErrorKind::NotFound => {
                return Err(ClosureError::new(
                    &origin,
                    "is a directory without a `store-paths` file (expected a closureInfo output)",
                ));
            }
            Err(e) => return Err(e.at(&list_origin)),
        };
        let mut closure = Self::parse_as(&list, Format::StorePaths, &list_origin, store_dir)?;

        let registration_path = dir.join("registration");
        let registration_origin = registration_path.display().to_string();
        match read_file_capped(&registration_path) {
            Ok(text) => {
                // Validated too: it is handed to `nix-store --load-db`, which must register
                // exactly the paths that are presented.
                let registered =
                    Self::parse_as(&text, Format::Registration, &registration_origin, store_dir)?;
                if let Some((path, in_list)) = first_difference(&closure.paths, &registered.paths) {
                    let (only, not) = if in_list {
                        ("store-paths", "registration")
                    } else {
                        ("registration", "store-paths")
                    };
                    return Err(ClosureError::new(
                        &origin,
                        format!("`{only}` lists {path}, but `{not}` does not"),
                    ));
                }
                closure.registration = registered.registration;
            }
            Err(ReadError::Io(e)) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.at(&registration_origin)),
        }
        closure.origin = origin;
        Ok(closure)
    }
}

/// The first path in only one of two sorted lists, and whether it is in the first one.
fn first_difference<'a>(a: &'a [StorePath], b: &'a [StorePath]) -> Option<(&'a StorePath, bool)> {
    let (mut i, mut j) = (0, 0);
    loop {
        match (a.get(i), b.get(j)) {
            (None, None) => return None,
            (Some(x), None) => return Some((x, true)),
            (None, Some(y)) => return Some((y, false)),
            (Some(x), Some(y)) => match x.cmp(y) {
                std::cmp::Ordering::Less => return Some((x, true)),
                std::cmp::Ordering::Greater => return Some((y, false)),
                std::cmp::Ordering::Equal => {
                    i += 1;
                    j += 1;
                }
            },
        }
    }
}

/// The lines of a text with their 1-based numbers, without the `\n`. Unlike splitting on
/// `\n`, a final newline does not produce an extra empty line.
struct Lines<'a> {
    rest: &'a [u8],
    number: usize,
}

impl<'a> Lines<'a> {
    fn new(text: &'a [u8]) -> Self {
        Lines {
            rest: text,
            number: 0,
        }
    }
}

impl<'a> Iterator for Lines<'a> {
    type Item = (usize, &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        self.number += 1;
        let line = match self.rest.iter().position(|&b| b == b'\n') {
            Some(end) => {
                let line = &self.rest[..end];
                self.rest = &self.rest[end + 1..];
                line
            }
            None => std::mem::take(&mut self.rest),
        };
        Some((self.number, line))
    }
}

fn is_blank(line: &[u8]) -> bool {
    line.iter().all(|&b| b == b' ' || b == b'\t')
}

fn trim_end_blank(line: &[u8]) -> &[u8] {
    let end = line
        .iter()
        .rposition(|&b| b != b' ' && b != b'\t')
        .map_or(0, |i| i + 1);
    &line[..end]
}

/// Whether a line has the shape of a NAR hash; a trailing `\r` is ignored so that a
/// registration with CRLF line endings is still recognised and gets the CRLF error.
fn looks_like_hash(line: &[u8]) -> bool {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    line.starts_with(b"sha256:")
        || (line.len() == 64 && line.iter().all(u8::is_ascii_hexdigit))
        || (line.len() == 52 && line.iter().all(|b| NIX_BASE32.contains(b)))
}

/// Checks a NAR hash line: 64 lowercase hex or 52 Nix base-32 characters, optionally after
/// `sha256:`, as `nix-store --dump-db` and closureInfo write them.
fn check_nar_hash(line: &[u8]) -> Result<(), String> {
    let (offset, body) = match line.strip_prefix(b"sha256:") {
        Some(body) => (7, body),
        None => (0, line),
    };
    // Invalid UTF-8 is reported by the caller's line diagnosis.
    let body = std::str::from_utf8(body).map_err(|_| "NAR hash is not UTF-8".to_owned())?;
    let bad_char = |allowed: fn(char) -> bool| body.char_indices().find(|&(_, c)| !allowed(c));
    match body.chars().count() {
        0 => Err("NAR hash is empty".to_owned()),
        64 => match bad_char(|c| matches!(c, '0'..='9' | 'a'..='f')) {
            Some((i, c)) => Err(format!(
                "character `{}` at column {} is not a lowercase hexadecimal digit",
                c.escape_debug(),
                offset + i + 1
            )),
            None => Ok(()),
        },
        52 => match bad_char(|c| c.is_ascii() && NIX_BASE32.contains(&(c as u8))) {
            Some((i, c)) => Err(format!(
                "character `{}` at column {} is not in Nix base-32",
                c.escape_debug(),
                offset + i + 1
            )),
            // 52 base-32 digits hold 260 bits; the first digit carries only the top bit of
            // the 256, and Nix rejects hashes whose extra bits are set.
            None if !matches!(body.as_bytes()[0], b'0' | b'1') => Err(format!(
                "a 52-character base-32 SHA-256 hash starts with `0` or `1`, not `{}`",
                char::from(body.as_bytes()[0])
            )),
            None => Ok(()),
        },
        n => Err(format!(
            "NAR hash is {n} characters, expected 64 (hexadecimal) or 52 (Nix base-32), \
             optionally after `sha256:`"
        )),
    }
}

/// Parses a decimal number without sign; the error completes a sentence about the field.
fn parse_decimal(s: &[u8]) -> Result<u64, &'static str> {
    if s.is_empty() {
        return Err("is empty");
    }
    s.iter().try_fold(0u64, |value, &b| {
        if !b.is_ascii_digit() {
            return Err("is not a decimal number");
        }
        value
            .checked_mul(10)
            .and_then(|v| v.checked_add(u64::from(b - b'0')))
            .ok_or("does not fit in 64 bits")
    })
}

/// Quotes bytes for a message: `{:?}`-style escapes for valid UTF-8, `\xNN` for the rest.
fn quote(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().min(MAX_QUOTED) + 5);
    out.push('"');
    let mut left = MAX_QUOTED;
    let mut truncated = false;
    'chunks: for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            if left == 0 {
                truncated = true;
                break 'chunks;
            }
            left -= 1;
            // `{:?}` of a string leaves single quotes alone, so do the same.
            if c == '\'' {
                out.push(c);
            } else {
                out.extend(c.escape_debug());
            }
        }
        for &b in chunk.invalid() {
            if left == 0 {
                truncated = true;
                break 'chunks;
            }
            left -= 1;
            let _ = write!(out, "\\x{b:02x}");
        }
    }
    out.push('"');
    if truncated {
        out.push_str("...");
    }
    out
}

/// Shared state of one parse: what errors need to name, and the store directory already
/// trimmed for [`store_path::base_of_absolute`].
struct Parser<'a> {
    origin: &'a str,
    store_dir: &'a [u8],
}

impl Parser<'_> {
    /// Builds the error for a line that failed its check. Problems that make any line
    /// unreadable (and are invisible when printed) are reported instead of `reason`, which
    /// is only computed when none applies.
    fn line_error(
        &self,
        number: usize,
        line: &[u8],
        trailing_blank_allowed: bool,
        reason: impl FnOnce() -> String,
    ) -> ClosureError {
        let column = |b: u8| line.iter().position(|&x| x == b).map(|i| i + 1);
        let reason = if let Some(col) = column(b'\r') {
            format!(
                "carriage return at column {col}; the file seems to have CRLF (DOS) line \
                 endings, convert them to LF (e.g. with dos2unix)"
            )
        } else if let Some(col) = column(0) {
            format!("NUL byte at column {col}")
        } else if let Err(e) = std::str::from_utf8(line) {
            let at = e.valid_up_to();
            format!(
                "invalid UTF-8: byte 0x{:02x} at column {}",
                line[at],
                at + 1
            )
        } else if line.starts_with(b" ") || line.starts_with(b"\t") {
            "leading whitespace".to_owned()
        } else if !trailing_blank_allowed && (line.ends_with(b" ") || line.ends_with(b"\t")) {
            "trailing whitespace (not allowed in a registration)".to_owned()
        } else {
            reason()
        };
        ClosureError::at(self.origin, number, line, reason)
    }

    /// Parses a store-path list.
    fn store_paths(&self, text: &[u8]) -> Result<Vec<StorePath>, ClosureError> {
        let mut paths = Vec::new();
        for (number, line) in Lines::new(text) {
            let trimmed = trim_end_blank(line);
            if trimmed.is_empty() {
                continue;
            }
            match store_path::base_of_absolute(trimmed, self.store_dir) {
                Ok(base) => paths.push(StorePath::from_validated(base)),
                Err(e) => return Err(self.line_error(number, line, true, || e.to_string())),
            }
        }
        if paths.is_empty() {
            return Err(ClosureError::new(self.origin, "no store paths"));
        }
        // Sorting once at the end is much cheaper than keeping a set while reading.
        paths.sort_unstable();
        paths.dedup();
        Ok(paths)
    }

    /// Parses a registration and returns the paths of its records.
    fn registration(&self, text: &[u8]) -> Result<Vec<StorePath>, ClosureError> {
        let mut lines = Lines::new(text);
        let mut paths = Vec::new();
        // Checked against the closure at the end, when all records are known.
        let mut references: Vec<(usize, &str)> = Vec::new();
        // A wrong reference count only shows up in a later record; its start line is the hint.
        let mut previous: Option<usize> = None;
        let count_hint = |previous: Option<usize>| {
            previous.map_or_else(String::new, |p| {
                format!(
                    " (does the reference count of the record starting at line {p} match its \
                     references?)"
                )
            })
        };

        while let Some((start, path_line)) = lines.next() {
            let base = store_path::base_of_absolute(path_line, self.store_dir).map_err(|e| {
                self.line_error(start, path_line, false, || {
                    if path_line.is_empty() {
                        "blank line where a record's store path was expected \
                         (`nix-store --load-db` rejects it)"
                            .to_owned()
                    } else if looks_like_hash(path_line) {
                        format!(
                            "expected a record's store path, found a NAR hash{}",
                            count_hint(previous)
                        )
                    } else {
                        e.to_string()
                    }
                })
            })?;
            paths.push((StorePath::from_validated(base), start));

            let mut field = |what: &str| {
                lines.next().ok_or_else(|| {
                    ClosureError::at(
                        self.origin,
                        start,
                        path_line,
                        format!(
                            "record cut short: the file ends before its {what}{}",
                            count_hint(previous)
                        ),
                    )
                })
            };

            let (number, hash) = field("NAR hash")?;
            check_nar_hash(hash).map_err(|reason| {
                self.line_error(number, hash, false, || {
                    if hash.starts_with(b"/") {
                        format!("expected a NAR hash, found a path{}", count_hint(previous))
                    } else {
                        reason
                    }
                })
            })?;

            let (number, size) = field("NAR size")?;
            parse_decimal(size).map_err(|reason| {
                self.line_error(number, size, false, || format!("NAR size {reason}"))
            })?;

            let (number, deriver) = field("deriver")?;
            if !deriver.is_empty() {
                store_path::base_of_absolute(deriver, self.store_dir).map_err(|e| {
                    self.line_error(number, deriver, false, || format!("deriver: {e}"))
                })?;
            }

            let (count_line, count_text) = field("reference count")?;
            let count = parse_decimal(count_text).map_err(|reason| {
                self.line_error(count_line, count_text, false, || {
                    format!("reference count {reason}")
                })
            })?;
            for index in 1..=count {
                let Some((number, reference)) = lines.next() else {
                    return Err(ClosureError::at(
                        self.origin,
                        count_line,
                        count_text,
                        format!(
                            "the record starting at line {start} claims {count} references, \
                             but the file ends after {}",
                            index - 1
                        ),
                    ));
                };
                let base =
                    store_path::base_of_absolute(reference, self.store_dir).map_err(|e| {
                        self.line_error(number, reference, false, || {
                            let which = format!(
                                "reference {index} of {count} of the record starting at line \
                                 {start}"
                            );
                            if reference.is_empty() {
                                format!("blank line where {which} was expected")
                            } else if looks_like_hash(reference) {
                                format!(
                                    "{which} is a NAR hash, not a store path (is the reference \
                                     count right?)"
                                )
                            } else {
                                format!("{which}: {e}")
                            }
                        })
                    })?;
                references.push((number, base));
            }
            previous = Some(start);
        }

        if paths.is_empty() {
            return Err(ClosureError::new(self.origin, "no store paths"));
        }
        // Stable, so that of two records of one path the first comes first.
        paths.sort_by(|a, b| a.0.cmp(&b.0));
        // Two records of one path disagree or repeat each other; either way the input was
        // not written by Nix, and which one `nix-store --load-db` keeps is not for us to say.
        if let Some(pair) = paths.windows(2).find(|w| w[0].0 == w[1].0) {
            let (first, second) = (pair[0].1, pair[1].1);
            let line = Lines::new(text)
                .nth(second - 1)
                .map_or(&[][..], |(_, line)| line);
            return Err(ClosureError::at(
                self.origin,
                second,
                line,
                format!("a second record of this store path (the first starts at line {first})"),
            ));
        }
        let paths: Vec<StorePath> = paths.into_iter().map(|(path, _)| path).collect();
        // `nix-store --load-db` refuses references to paths it does not know, and a
        // closure that is not closed would leave the guest with dangling references.
        for (number, base) in references {
            if paths.binary_search_by(|p| p.base_name().cmp(base)).is_err() {
                let line = Lines::new(text)
                    .nth(number - 1)
                    .map_or(&[][..], |(_, line)| line);
                return Err(ClosureError::at(
                    self.origin,
                    number,
                    line,
                    "reference to a path that has no record, so the closure is incomplete",
                ));
            }
        }
        Ok(paths)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const H1: &str = "0c7c0xbqkqi3i8a1xndh6h8gwb3sw0nb";
    const H2: &str = "1b0ssf1c2gzvm7hbqkl3a43wf4gnmgh3";
    const H3: &str = "9x2ngm2ypvkch0lnj3mnwyv0ifmsk4rc";
    const H4: &str = "ww5rkfxsv9kyjg1hk7jq7lbxb3wdlqdm";
    const HEX: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
    const B32: &str = "1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s";

    fn nix() -> &'static Path {
        Path::new("/nix/store")
    }

    fn sp(hash: &str, name: &str) -> String {
        format!("/nix/store/{hash}-{name}")
    }

    fn bases(closure: &Closure) -> Vec<&str> {
        closure.paths.iter().map(StorePath::base_name).collect()
    }

    fn parse(text: &str) -> Result<Closure, ClosureError> {
        Closure::parse(text.as_bytes(), "closure.txt", nix())
    }

    fn parse_err(text: impl AsRef<[u8]>) -> ClosureError {
        Closure::parse(text.as_ref(), "closure.txt", nix()).unwrap_err()
    }

    /// A registration record; `deriver` may be empty.
    fn record(path: &str, hash: &str, deriver: &str, references: &[&str]) -> String {
        let mut s = format!("{path}\n{hash}\n1234\n{deriver}\n{}\n", references.len());
        for r in references {
            s.push_str(r);
            s.push('\n');
        }
        s
    }

    #[test]
    fn test_hashes_are_valid() {
        for h in [H1, H2, H3, H4] {
            StorePath::new(&format!("{h}-x")).unwrap();
        }
        assert_eq!(HEX.len(), 64);
        assert_eq!(B32.len(), 52);
        check_nar_hash(HEX.as_bytes()).unwrap();
        check_nar_hash(B32.as_bytes()).unwrap();
    }

    #[test]
    fn store_paths_list() {
        let text = format!(
            "{}\n\n   \n{} \t\n\t\n{}\n{}",
            sp(H2, "glibc-2.39"),
            sp(H1, "hello-2.12"),
            sp(H2, "glibc-2.39"),
            sp(H3, "bash-5.2")
        );
        let closure = parse(&text).unwrap();
        assert_eq!(
            bases(&closure),
            [
                format!("{H1}-hello-2.12"),
                format!("{H2}-glibc-2.39"),
                format!("{H3}-bash-5.2")
            ]
        );
        assert_eq!(closure.registration, None);
        assert_eq!(closure.origin, "closure.txt");
        assert_eq!(closure.store_dir, nix());
    }

    #[test]
    fn no_store_paths() {
        for text in ["", "\n", "  \n\t\n", " "] {
            let e = parse_err(text);
            assert_eq!(e.to_string(), "closure.txt: no store paths");
            assert_eq!(e.line, None);
        }
    }

    #[test]
    fn crlf() {
        let e = parse_err(format!("{}\r\n{}\r\n", sp(H1, "a"), sp(H2, "b")));
        assert_eq!(e.line, Some(1));
        assert!(e.reason.contains("CRLF"), "{e}");
        assert_eq!(
            e.text.as_deref(),
            Some(format!("\"{}\\r\"", sp(H1, "a")).as_str())
        );
        // A lone carriage return on a blank line is not blank.
        let e = parse_err(format!("{}\n\r\n", sp(H1, "a")));
        assert_eq!(e.line, Some(2));
        assert!(e.reason.contains("CRLF"), "{e}");
    }

    #[test]
    fn nul_and_invalid_utf8() {
        let e = parse_err(format!("{}\n/nix/st\0re\n", sp(H1, "a")));
        assert_eq!(e.line, Some(2));
        assert_eq!(e.reason, "NUL byte at column 8");
        assert_eq!(e.text.as_deref(), Some("\"/nix/st\\0re\""));

        let mut text = format!("{}\n", sp(H1, "a")).into_bytes();
        text.extend_from_slice(format!("/nix/store/{H2}-caf").as_bytes());
        text.push(0xe9);
        let e = parse_err(&text);
        assert_eq!(e.line, Some(2));
        assert_eq!(e.reason, "invalid UTF-8: byte 0xe9 at column 48");
        assert_eq!(
            e.text.as_deref(),
            Some(format!("\"/nix/store/{H2}-caf\\xe9\"").as_str())
        );
    }

    #[test]
    fn leading_whitespace() {
        let e = parse_err(format!("{}\n  {}\n", sp(H1, "a"), sp(H2, "b")));
        assert_eq!(e.line, Some(2));
        assert_eq!(e.reason, "leading whitespace");
    }

    #[test]
    fn not_store_paths() {
        let e = parse_err(format!("{}\nhello\n", sp(H1, "a")));
        assert_eq!(
            e.to_string(),
            "closure.txt:2: relative path, expected one directly under the store directory \
             /nix/store: \"hello\""
        );
        let e = parse_err(format!("/gnu/store/{H1}-a\n"));
        assert_eq!(
            e.to_string(),
            format!(
                "closure.txt:1: not under the store directory /nix/store: \"/gnu/store/{H1}-a\""
            )
        );
        let e = parse_err(format!(
            "{}\n{}\n{}/bin\n",
            sp(H1, "a"),
            sp(H2, "b"),
            sp(H3, "foo")
        ));
        assert_eq!(
            e.to_string(),
            format!(
                "closure.txt:3: inside the store path `{H3}-foo`, not directly under the \
                 store directory /nix/store: \"/nix/store/{H3}-foo/bin\""
            )
        );
        let e = parse_err(format!("/nix/store/{}-a\n", &H1[..31]));
        assert_eq!(
            e.reason,
            "hash part `0c7c0xbqkqi3i8a1xndh6h8gwb3sw0n` is 31 characters, expected 32"
        );
        let e = parse_err(format!("/nix/store/{H1}-a b\n"));
        assert!(e.reason.starts_with("character ` ` in name"), "{e}");
    }

    /// Whatever is wrong with a line of a store-paths list, the error names the input, the
    /// line and the offending text, as the daemon and mkimage print it.
    #[test]
    fn a_bad_line_is_refused_by_input_line_and_text() {
        let good = [
            sp(H1, "hello-2.12"),
            sp(H2, "glibc-2.40"),
            sp(H3, "bash-5.2"),
        ];
        let hello = &good[0];
        let mut nul = hello.clone().into_bytes();
        nul.insert(hello.len() - 3, 0);
        // `e`, `o`, `t` and `u` are not in Nix's base-32 alphabet.
        let mut off_alphabet = H4.to_owned();
        off_alphabet.replace_range(5..6, "u");
        let cases: [(&str, Vec<u8>, &str); 8] = [
            (
                "relative",
                format!("{H4}-relative-1.0").into(),
                "relative path",
            ),
            (
                "outside the store directory",
                format!("/elsewhere/store/{H4}-outside-1.0").into(),
                "not under the store directory /nix/store",
            ),
            (
                "inside a store path",
                format!("{hello}/bin/hello").into(),
                "inside the store path",
            ),
            (
                "a hash outside Nix's alphabet",
                sp(&off_alphabet, "x").into(),
                "not in Nix base-32",
            ),
            (
                "a short hash",
                format!("/nix/store/{}-x", &H4[1..]).into(),
                "is 31 characters, expected 32",
            ),
            (
                "`..` as the name's first component",
                sp(H4, "..-hidden").into(),
                "`..`, which Nix refuses",
            ),
            ("a CRLF line end", format!("{hello}\r").into(), "CRLF"),
            ("a NUL byte", nul, "NUL byte"),
        ];
        for (what, bad, reason) in cases {
            let mut text = format!("{}\n{}\n", good[0], good[1]).into_bytes();
            text.extend_from_slice(&bad);
            text.extend_from_slice(format!("\n{}\n", good[2]).as_bytes());
            let e = parse_err(&text);
            assert_eq!(e.line, Some(3), "{what}: {e}");
            assert!(e.reason.contains(reason), "{what}: {e}");
            assert_eq!(e.text, Some(quote(&bad)), "{what}: {e}");
            assert!(e.to_string().starts_with("closure.txt:3: "), "{what}: {e}");
        }
    }

    #[test]
    fn an_empty_file_is_refused_by_name() {
        let tmp = tempfile::tempdir().unwrap();
        let empty = tmp.path().join("empty.txt");
        fs::write(&empty, b"").unwrap();
        let e = Closure::load(&empty, nix()).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("{}: no store paths", empty.display())
        );
    }

    #[test]
    fn custom_store_dir() {
        let dir = Path::new("/tmp/x/store/");
        let text = format!("/tmp/x/store/{H1}-a\n/tmp/x/store/{H2}-b/\n");
        let closure = Closure::parse(text.as_bytes(), "c", dir).unwrap();
        assert_eq!(closure.store_dir, Path::new("/tmp/x/store"));
        assert_eq!(bases(&closure), [format!("{H1}-a"), format!("{H2}-b")]);

        let e = Closure::parse(sp(H1, "a").as_bytes(), "c", dir).unwrap_err();
        assert_eq!(e.reason, "not under the store directory /tmp/x/store");

        let e = Closure::parse(b"x", "c", Path::new("nix/store")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "c: store directory nix/store is not absolute"
        );
    }

    #[test]
    fn registration_formats() {
        let a = sp(H1, "hello-2.12");
        let b = sp(H2, "glibc-2.39");
        let drv = sp(H4, "hello-2.12.drv");
        for hash in [
            format!("sha256:{B32}"),
            B32.to_owned(),
            format!("sha256:{HEX}"),
            HEX.to_owned(),
        ] {
            let text = record(&a, &hash, &drv, &[&a, &b]) + &record(&b, &hash, "", &[]);
            assert_eq!(Format::detect(text.as_bytes()), Format::Registration);
            let closure = parse(&text).unwrap();
            assert_eq!(
                bases(&closure),
                [format!("{H1}-hello-2.12"), format!("{H2}-glibc-2.39")]
            );
            assert_eq!(closure.registration.as_deref(), Some(text.as_bytes()));
        }

        // The kept text gains the final newline `nix-store --load-db` needs.
        let text = record(&a, HEX, "", &[]);
        let closure = parse(text.trim_end()).unwrap();
        assert_eq!(closure.registration.as_deref(), Some(text.as_bytes()));
    }

    #[test]
    fn registration_field_errors() {
        let a = sp(H1, "a");
        let err = |text: String| parse_err(text).to_string();

        let bad_hex = HEX.replace('9', "g");
        assert_eq!(
            err(record(&a, &format!("sha256:{bad_hex}"), "", &[])),
            format!(
                "closure.txt:2: character `g` at column 8 is not a lowercase hexadecimal \
                 digit: \"sha256:{bad_hex}\""
            )
        );
        let upper = HEX.to_uppercase();
        assert!(err(record(&a, &upper, "", &[])).contains("`F` at column 2 is not a lowercase"));
        let high = B32.replacen('1', "z", 1);
        assert!(err(record(&a, &high, "", &[]))
            .contains("a 52-character base-32 SHA-256 hash starts with `0` or `1`, not `z`"));
        let short = format!("sha256:{}", &B32[..51]);
        let text = format!("{a}\n{short}\n1\n\n0\n");
        assert!(err(text).contains("closure.txt:2: NAR hash is 51 characters, expected 64"));

        let text = format!("{a}\n{HEX}\n12k\n\n0\n");
        assert_eq!(
            err(text),
            "closure.txt:3: NAR size is not a decimal number: \"12k\""
        );
        let text = format!("{a}\n{HEX}\n99999999999999999999\n\n0\n");
        assert!(err(text).contains("closure.txt:3: NAR size does not fit in 64 bits"));
        let text = format!("{a}\n{HEX}\n\n\n0\n");
        assert!(err(text).contains("closure.txt:3: NAR size is empty"));

        let text = format!("{a}\n{HEX}\n1\n/nix/store/{H4}-x.drv/\0\n0\n");
        assert!(err(text).contains("closure.txt:4: NUL byte at column 51"));
        let text = format!("{a}\n{HEX}\n1\n{H4}-x.drv\n0\n");
        assert!(err(text).contains("closure.txt:4: deriver: relative path"));

        let text = format!("{a}\n{HEX}\n1\n\nmany\n");
        assert!(err(text).contains("closure.txt:5: reference count is not a decimal number"));

        let text = format!("{a}\n{HEX}\n1\n\n1\n{a}/bin\n");
        assert!(err(text).contains(&format!(
            "closure.txt:6: reference 1 of 1 of the record starting at line 1: inside the \
             store path `{H1}-a`"
        )));

        let text = format!("{a}\n{HEX}\n1\n\n1 \n{a}\n");
        assert!(err(text).contains("closure.txt:5: trailing whitespace"));

        let text = format!("{a}\n{HEX}\r\n1\n\n0\n");
        assert!(err(text)
            .contains("closure.txt:2: carriage return at column 65; the file seems to have CRLF"));

        let text = format!("{a}\n{HEX}\n1\n");
        assert_eq!(
            err(text),
            format!("closure.txt:1: record cut short: the file ends before its deriver: \"{a}\"")
        );
    }

    #[test]
    fn registration_structure_errors() {
        let a = sp(H1, "a");
        let b = sp(H2, "b");

        let text = record(&a, HEX, "", &[]) + "\n" + &record(&b, HEX, "", &[]);
        let e = parse_err(text);
        assert_eq!(e.line, Some(6));
        assert!(
            e.reason
                .starts_with("blank line where a record's store path"),
            "{e}"
        );

        // A trailing blank line breaks `nix-store --load-db` just the same.
        let e = parse_err(record(&a, HEX, "", &[]) + "\n");
        assert_eq!(e.line, Some(6));

        let e = parse_err(format!("\n{}", record(&a, HEX, "", &[])));
        assert_eq!(e.line, Some(1));

        let text = record(&a, HEX, "", &[&b]);
        let e = parse_err(text);
        assert_eq!(
            e.to_string(),
            format!(
                "closure.txt:6: reference to a path that has no record, so the closure is \
                 incomplete: \"{b}\""
            )
        );
    }

    #[test]
    fn registration_wrong_reference_count() {
        let a = sp(H1, "a");
        let b = sp(H2, "b");
        let c = sp(H3, "c");

        // Too many claimed in the last record: runs past the end of the file.
        let text = record(&a, HEX, "", &[]) + &format!("{b}\n{HEX}\n1\n\n3\n{a}\n{b}\n");
        let e = parse_err(text);
        assert_eq!(e.line, Some(10));
        assert_eq!(
            e.reason,
            "the record starting at line 6 claims 3 references, but the file ends after 2"
        );

        // One too many: the next record's path is taken as a reference, its hash as a path.
        let text = format!("{a}\n{HEX}\n1\n\n2\n{a}\n") + &record(&b, HEX, "", &[]);
        let e = parse_err(text);
        assert_eq!(e.line, Some(8));
        assert_eq!(
            e.reason,
            "expected a record's store path, found a NAR hash (does the reference count of \
             the record starting at line 1 match its references?)"
        );

        // Two too many: the next record's hash is taken as a reference.
        let text = format!("{a}\n{HEX}\n1\n\n3\n{a}\n") + &record(&b, HEX, "", &[]);
        let e = parse_err(text);
        assert_eq!(e.line, Some(8));
        assert_eq!(
            e.reason,
            "reference 3 of 3 of the record starting at line 1 is a NAR hash, not a store \
             path (is the reference count right?)"
        );

        // Too few: the extra reference is taken as a record, the next path as its hash.
        let text = format!("{a}\n{HEX}\n1\n\n1\n{a}\n{c}\n") + &record(&b, HEX, "", &[]);
        let e = parse_err(text);
        assert_eq!(e.line, Some(8));
        assert_eq!(
            e.reason,
            "expected a NAR hash, found a path (does the reference count of the record \
             starting at line 1 match its references?)"
        );

        // Too few in the last record.
        let text = format!("{a}\n{HEX}\n1\n\n0\n{a}\n");
        let e = parse_err(text);
        assert_eq!(e.line, Some(6));
        assert_eq!(
            e.reason,
            "record cut short: the file ends before its NAR hash (does the reference count of \
             the record starting at line 1 match its references?)"
        );
    }

    #[test]
    fn registration_duplicate_record() {
        let a = sp(H1, "a");
        let b = sp(H2, "b");
        let text = record(&a, HEX, "", &[]) + &record(&b, HEX, "", &[]) + &record(&a, HEX, "", &[]);
        assert_eq!(
            parse_err(text).to_string(),
            format!(
                "closure.txt:11: a second record of this store path (the first starts at line \
                 1): \"{a}\""
            )
        );
        // In a store-path list, a repeated path is harmless and collapsed.
        let closure = parse(&format!("{a}\n{b}\n{a}\n")).unwrap();
        assert_eq!(bases(&closure), [format!("{H1}-a"), format!("{H2}-b")]);
    }

    #[test]
    fn leading_period_names() {
        let text = format!("{}\n{}\n", sp(H1, ".hidden"), sp(H2, "..a-b"));
        let closure = parse(&text).unwrap();
        assert_eq!(
            bases(&closure),
            [format!("{H1}-.hidden"), format!("{H2}-..a-b")]
        );
        let e = parse_err(format!("{}\n{}\n", sp(H1, "a"), sp(H2, "..-b")));
        assert_eq!(e.line, Some(2));
        assert_eq!(
            e.reason,
            "name or its first dash-separated component is `..`, which Nix refuses"
        );
    }

    #[test]
    fn oversized_inputs_are_refused() {
        let expected = format!(
            "input is larger than {} MiB, the most a closure input may be (a device or an \
             endless stream?)",
            MAX_INPUT_BYTES >> 20
        );
        // An endless device: read up to the cap, then refused.
        let e = Closure::load(Path::new("/dev/zero"), nix()).unwrap_err();
        assert_eq!(e.to_string(), format!("/dev/zero: {expected}"));

        // A regular file that is too large is refused by its size, unread.
        let tmp = tempfile::tempdir().unwrap();
        let big = tmp.path().join("big.txt");
        let file = fs::File::create(&big).unwrap();
        file.set_len(MAX_INPUT_BYTES + 1).unwrap();
        let e = Closure::load(&big, nix()).unwrap_err();
        assert_eq!(e.origin, big.display().to_string());
        assert_eq!(e.reason, expected);

        // Exactly the cap is still read; one byte more is not.
        assert_eq!(read_at_most(&b"abcd"[..], 4).unwrap(), b"abcd");
        assert!(matches!(
            read_at_most(&b"abcde"[..], 4),
            Err(ReadError::TooLarge)
        ));

        // A closureInfo directory's files have the same cap.
        let dir = tmp.path().join("info");
        fs::create_dir(&dir).unwrap();
        std::os::unix::fs::symlink("/dev/zero", dir.join("store-paths")).unwrap();
        let e = Closure::load(&dir, nix()).unwrap_err();
        assert_eq!(e.origin, dir.join("store-paths").display().to_string());
        assert_eq!(e.reason, expected);
    }

    #[test]
    fn detection() {
        let a = sp(H1, "a");
        assert_eq!(Format::detect(b""), Format::StorePaths);
        assert_eq!(Format::detect(a.as_bytes()), Format::StorePaths);
        let list = format!("\n  \n{a}\n{}\n", sp(H2, "b"));
        assert_eq!(Format::detect(list.as_bytes()), Format::StorePaths);
        let reg = format!("\n{a}\nsha256:{B32}\n");
        assert_eq!(Format::detect(reg.as_bytes()), Format::Registration);
        let reg = format!("{a}\r\n{HEX}\r\n");
        assert_eq!(Format::detect(reg.as_bytes()), Format::Registration);
        // Not absolute: a store-path list, whose first line is then the error.
        let e = parse_err(format!("hello\n{HEX}\n"));
        assert_eq!(e.line, Some(1));
        assert!(e.reason.starts_with("relative path"), "{e}");
        // A hash in the middle of a list is not a registration.
        let e = parse_err(format!("{a}\n{}\n{HEX}\n", sp(H2, "b")));
        assert_eq!(e.line, Some(3));
    }

    #[test]
    fn closure_info_directory() {
        let a = sp(H1, "a");
        let b = sp(H2, "b");
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("closure-info");
        fs::create_dir(&dir).unwrap();

        let e = Closure::load(&dir, nix()).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "{}: is a directory without a `store-paths` file (expected a closureInfo \
                 output)",
                dir.display()
            )
        );

        fs::write(dir.join("store-paths"), format!("{a}\n{b}\n")).unwrap();
        let closure = Closure::load(&dir, nix()).unwrap();
        assert_eq!(bases(&closure), [format!("{H1}-a"), format!("{H2}-b")]);
        assert_eq!(closure.registration, None);
        assert_eq!(closure.origin, dir.display().to_string());

        let registration = record(&a, &format!("sha256:{B32}"), "", &[&b])
            + &record(&b, &format!("sha256:{B32}"), "", &[]);
        fs::write(dir.join("registration"), &registration).unwrap();
        let closure = Closure::load(&dir, nix()).unwrap();
        assert_eq!(bases(&closure), [format!("{H1}-a"), format!("{H2}-b")]);
        assert_eq!(
            closure.registration.as_deref(),
            Some(registration.as_bytes())
        );

        // Errors in the files name the file.
        fs::write(dir.join("registration"), format!("{a}\n{HEX}\nbig\n")).unwrap();
        let e = Closure::load(&dir, nix()).unwrap_err();
        assert_eq!(e.origin, dir.join("registration").display().to_string());
        assert_eq!(e.line, Some(3));

        fs::write(dir.join("registration"), record(&a, HEX, "", &[])).unwrap();
        let e = Closure::load(&dir, nix()).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "{}: `store-paths` lists {H2}-b, but `registration` does not",
                dir.display()
            )
        );

        // The list is never taken for a registration, even if it looks like one.
        fs::remove_file(dir.join("registration")).unwrap();
        fs::write(dir.join("store-paths"), format!("{a}\n{HEX}\n")).unwrap();
        let e = Closure::load(&dir, nix()).unwrap_err();
        assert_eq!(e.origin, dir.join("store-paths").display().to_string());
        assert_eq!(e.line, Some(2));
    }

    #[test]
    fn load_files() {
        let a = sp(H1, "a");
        let tmp = tempfile::tempdir().unwrap();

        let missing = tmp.path().join("missing.txt");
        let e = Closure::load(&missing, nix()).unwrap_err();
        assert_eq!(e.origin, missing.display().to_string());
        assert!(e.reason.starts_with("cannot read: "), "{e}");
        assert!(e.reason.contains("os error 2"), "{e}");

        let list = tmp.path().join("list.txt");
        fs::write(&list, format!("{a}\n")).unwrap();
        let closure = Closure::load(&list, nix()).unwrap();
        assert_eq!(closure.origin, list.display().to_string());
        assert_eq!(closure.registration, None);

        let reg = tmp.path().join("reg");
        fs::write(&reg, record(&a, HEX, "", &[&a])).unwrap();
        let closure = Closure::load(&reg, nix()).unwrap();
        assert_eq!(bases(&closure), [format!("{H1}-a")]);
        assert!(closure.registration.is_some());
    }

    #[test]
    fn error_display() {
        let e = ClosureError {
            origin: "<stdin>".to_owned(),
            line: None,
            text: None,
            reason: "no store paths".to_owned(),
        };
        assert_eq!(e.to_string(), "<stdin>: no store paths");
        let e = ClosureError::at("x", 7, b"a\tb\"c'\x01\xff", "bad");
        assert_eq!(e.to_string(), "x:7: bad: \"a\\tb\\\"c'\\u{1}\\xff\"");

        let long = "é".repeat(200);
        let quoted = quote(long.as_bytes());
        assert_eq!(quoted, format!("\"{}\"...", "é".repeat(MAX_QUOTED)));
        assert_eq!(
            quote(&[b'a'; MAX_QUOTED]),
            format!("\"{}\"", "a".repeat(MAX_QUOTED))
        );
    }

    /// A million lines, as a large closure list: all kept, in order, nothing lost.
    #[test]
    fn million_lines() {
        let mut text = String::new();
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        for i in 0..1_000_000 {
            text.push_str("/nix/store/");
            for _ in 0..32 {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                text.push(char::from(NIX_BASE32[(state % 32) as usize]));
            }
            let _ = writeln!(text, "-package-{i}-1.0");
        }
        let closure = parse(&text).unwrap();
        assert_eq!(closure.paths.len(), 1_000_000);
        assert!(closure.paths.windows(2).all(|w| w[0] < w[1]));
    }
}
