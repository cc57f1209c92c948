//! Reading a regular file's contents, wherever [`FileSource`] says they are.
//!
//! The plain writer and the compressor read files in different ways (the writer copies
//! blocks inside the kernel, the compressor reads them in chunks), but which descriptor or
//! buffer holds the bytes, how it is opened, how its size is checked before and after and
//! how its errors are named is decided here once, by [`read_source`].

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::Path;

use rustix::io::Errno;

use super::tree::FileSource;

/// A regular file's contents, open and checked to have the inode's size.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Contents<'a> {
    /// Held in memory, exactly the inode's size.
    Bytes(&'a [u8]),
    /// A regular file of the inode's size, read with positioned reads (its file offset is
    /// neither used nor moved).
    Fd(BorrowedFd<'a>),
}

/// Opens `source`, whose contents must have exactly `size` bytes, and hands them to
/// `read`. A file is checked to be a regular file of `size` bytes before it is read and
/// again after: one that changed size meanwhile would give an image of neither version.
/// Errors of a source reached by path (opening it or reading it) name the path.
pub(crate) fn read_source<T>(
    source: &FileSource,
    size: u64,
    read: impl FnOnce(Contents<'_>) -> io::Result<T>,
) -> io::Result<T> {
    match source {
        FileSource::Bytes(bytes) => {
            if bytes.len() as u64 != size {
                return Err(invalid(format!(
                    "size is {size} but the contents have {} bytes",
                    bytes.len()
                )));
            }
            read(Contents::Bytes(bytes))
        }
        FileSource::Fd(fd) => read_fd(fd.as_fd(), size, read),
        FileSource::Path(path) => {
            let file = File::open(path).map_err(|e| with_path(path, e))?;
            read_fd(file.as_fd(), size, read).map_err(|e| with_path(path, e))
        }
        FileSource::Open(opener) => {
            let fd = opener.open()?;
            read_fd(fd.as_fd(), size, read)
        }
    }
}

fn read_fd<T>(
    fd: BorrowedFd<'_>,
    size: u64,
    read: impl FnOnce(Contents<'_>) -> io::Result<T>,
) -> io::Result<T> {
    check_source_size(fd, size, "")?;
    let done = read(Contents::Fd(fd))?;
    check_source_size(fd, size, " after it was read")?;
    Ok(done)
}

/// Fails unless `src` is a regular file of `size` bytes; `when` ends the message.
fn check_source_size(src: BorrowedFd<'_>, size: u64, when: &str) -> io::Result<()> {
    let stat = rustix::fs::fstat(src)?;
    if rustix::fs::FileType::from_raw_mode(stat.st_mode) != rustix::fs::FileType::RegularFile {
        return Err(invalid("the source is not a regular file"));
    }
    if stat.st_size as u64 != size {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "the source has {} bytes{when}, but the inode's size is {size}",
                stat.st_size
            ),
        ));
    }
    Ok(())
}

/// The error of a source that has fewer bytes than its inode's size says.
pub(crate) fn source_ended(at: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        format!("the source ended at byte {at}, before the inode's size"),
    )
}

/// Fills `buffer` from `src` at `at`, failing if the source ends first.
pub(crate) fn read_exact_at(
    src: BorrowedFd<'_>,
    mut buffer: &mut [u8],
    mut at: u64,
) -> io::Result<()> {
    while !buffer.is_empty() {
        match rustix::io::pread(src, &mut *buffer, at) {
            Ok(0) => return Err(source_ended(at)),
            Ok(n) => {
                buffer = &mut buffer[n..];
                at += n as u64;
            }
            Err(Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

fn invalid(message: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, message.into())
}

fn with_path(path: &Path, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::fd::OwnedFd;
    use std::sync::Arc;

    use super::*;
    use crate::erofs::OpenFile;

    /// What `read_source` handed over: the bytes, read back through the descriptor.
    fn contents(contents: Contents<'_>, size: u64) -> io::Result<(bool, Vec<u8>)> {
        match contents {
            Contents::Bytes(bytes) => Ok((false, bytes.to_vec())),
            Contents::Fd(fd) => {
                let mut buffer = vec![0; size as usize];
                read_exact_at(fd, &mut buffer, 0)?;
                Ok((true, buffer))
            }
        }
    }

    fn temp_file(bytes: &[u8]) -> tempfile::NamedTempFile {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(bytes).unwrap();
        file
    }

    #[derive(Debug)]
    struct Opener(std::path::PathBuf);

    impl OpenFile for Opener {
        fn open(&self) -> io::Result<OwnedFd> {
            Ok(File::open(&self.0)?.into())
        }
    }

    #[test]
    fn every_source_gives_its_bytes() {
        let file = temp_file(b"hello");
        let fd: OwnedFd = File::open(file.path()).unwrap().into();
        let sources = [
            (FileSource::Bytes(b"hello".to_vec()), false),
            (FileSource::Fd(Arc::new(fd)), true),
            (FileSource::Path(file.path().to_owned()), true),
            (
                FileSource::Open(Arc::new(Opener(file.path().to_owned()))),
                true,
            ),
        ];
        for (source, by_fd) in sources {
            let got = read_source(&source, 5, |c| contents(c, 5)).unwrap();
            assert_eq!(got, (by_fd, b"hello".to_vec()), "{source:?}");
        }
    }

    #[test]
    fn a_size_that_does_not_match_is_refused_before_reading() {
        let file = temp_file(b"hello");
        for source in [
            FileSource::Bytes(b"hello".to_vec()),
            FileSource::Path(file.path().to_owned()),
        ] {
            let mut called = false;
            let e = read_source(&source, 6, |_| {
                called = true;
                Ok(())
            })
            .unwrap_err();
            assert!(!called, "{source:?}");
            assert!(e.to_string().contains("6"), "{e}");
        }
    }

    /// A file that grows while it is read is an error after the read, named by its path.
    #[test]
    fn a_file_that_changes_while_read_is_an_error_naming_it() {
        let file = temp_file(b"hello");
        let source = FileSource::Path(file.path().to_owned());
        let e = read_source(&source, 5, |_| {
            std::fs::OpenOptions::new()
                .append(true)
                .open(file.path())?
                .write_all(b"!")
        })
        .unwrap_err();
        let message = e.to_string();
        assert!(message.contains("after it was read"), "{message}");
        assert!(
            message.starts_with(&file.path().display().to_string()),
            "{message}"
        );
    }

    #[test]
    fn a_path_that_cannot_be_opened_is_named() {
        let source = FileSource::Path("/nonexistent/file".into());
        let e = read_source(&source, 0, |_| Ok(())).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        assert!(e.to_string().starts_with("/nonexistent/file: "), "{e}");
    }

    #[test]
    fn not_a_regular_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let source = FileSource::Path(dir.path().to_owned());
        let e = read_source(&source, 0, |_| Ok(())).unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
    }

    #[test]
    fn a_short_source_ends_early() {
        let file = temp_file(b"abc");
        let fd = File::open(file.path()).unwrap();
        let mut buffer = [0u8; 5];
        let e = read_exact_at(fd.as_fd(), &mut buffer, 0).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        assert!(e.to_string().contains("byte 3"), "{e}");
    }
}
