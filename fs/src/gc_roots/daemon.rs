//! The client side of the nix-daemon worker protocol, as far as temporary roots need it:
//! the handshake and `wopAddTempRoot`. The daemon's worker for a connection holds the
//! roots added through it until the connection closes.

use std::ffi::OsString;
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use super::GcRootsError;

const WORKER_MAGIC_1: u64 = 0x6e69_7863;
const WORKER_MAGIC_2: u64 = 0x6478_696f;
/// Protocol 1.35: daemons negotiate down to the older of the two versions, so Nix 2.8
/// (1.34) speaks its own; current Nix accepts clients from 1.18 on, Lix from 1.35.
const CLIENT_VERSION: u64 = (1 << 8) | 35;
const OP_ADD_TEMP_ROOT: u64 = 11;

const STDERR_NEXT: u64 = 0x6f6c_6d67;
const STDERR_READ: u64 = 0x6461_7461;
const STDERR_WRITE: u64 = 0x6461_7416;
const STDERR_LAST: u64 = 0x616c_7473;
const STDERR_ERROR: u64 = 0x6378_7470;
const STDERR_START_ACTIVITY: u64 = 0x5354_5254;
const STDERR_STOP_ACTIVITY: u64 = 0x5354_4f50;
const STDERR_RESULT: u64 = 0x5253_4c54;

/// Requests sent before their answers are read: enough to hide the round trips, few
/// enough that neither side's socket buffer fills while the other is not reading.
const PIPELINE: usize = 256;
/// A daemon that does not answer for this long is taken to be stuck.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(120);
/// Strings longer than this from the daemon are a protocol error, not an allocation.
const MAX_STRING: u64 = 1 << 20;

/// A daemon failure, placed at its socket by [`DaemonFailure::at`].
#[derive(Debug)]
pub(super) struct DaemonFailure {
    pub(super) message: String,
}

impl DaemonFailure {
    pub(super) fn at(self, socket: &Path) -> GcRootsError {
        GcRootsError::Daemon {
            socket: socket.to_owned(),
            message: self.message,
        }
    }
}

impl From<io::Error> for DaemonFailure {
    fn from(e: io::Error) -> Self {
        let message = match e.kind() {
            io::ErrorKind::UnexpectedEof => "the daemon closed the connection".to_owned(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                format!("no answer within {} s", ANSWER_TIMEOUT.as_secs())
            }
            _ => e.to_string(),
        };
        DaemonFailure { message }
    }
}

fn fail(message: impl Into<String>) -> DaemonFailure {
    DaemonFailure {
        message: message.into(),
    }
}

pub(super) struct Connection {
    stream: io::BufReader<UnixStream>,
    /// The protocol minor version both sides speak.
    minor: u64,
}

/// Connects and shakes hands.
pub(super) fn connect(socket: &Path) -> Result<Connection, DaemonFailure> {
    let stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(ANSWER_TIMEOUT))?;
    stream.set_write_timeout(Some(ANSWER_TIMEOUT))?;
    let mut conn = Connection {
        stream: io::BufReader::new(stream),
        minor: 0,
    };
    let mut hello = Vec::new();
    put_u64(&mut hello, WORKER_MAGIC_1);
    put_u64(&mut hello, CLIENT_VERSION);
    conn.send(&hello)?;
    if conn.u64()? != WORKER_MAGIC_2 {
        return Err(fail("not a nix-daemon (protocol mismatch)"));
    }
    let daemon_version = conn.u64()?;
    if daemon_version >> 8 != 1 || daemon_version & 0xff < 10 {
        return Err(fail(format!(
            "unsupported daemon protocol version {}.{}",
            daemon_version >> 8,
            daemon_version & 0xff
        )));
    }
    conn.minor = (daemon_version & 0xff).min(CLIENT_VERSION & 0xff);
    let mut rest = Vec::new();
    if conn.minor >= 14 {
        put_u64(&mut rest, 0); // no CPU affinity (obsolete)
    }
    if conn.minor >= 11 {
        put_u64(&mut rest, 0); // reserveSpace (obsolete)
    }
    conn.send(&rest)?;
    if conn.minor >= 33 {
        let version = conn.string()?;
        tracing::debug!("nix-daemon {}", String::from_utf8_lossy(&version));
    }
    if conn.minor >= 35 {
        let _trusted = conn.u64()?;
    }
    // The daemon's startup messages, if any.
    conn.stderr()?;
    Ok(conn)
}

fn put_u64(buf: &mut Vec<u8>, n: u64) {
    buf.extend_from_slice(&n.to_le_bytes());
}

fn put_bytes(buf: &mut Vec<u8>, s: &[u8]) {
    put_u64(buf, s.len() as u64);
    buf.extend_from_slice(s);
    buf.resize(buf.len() + (8 - s.len() % 8) % 8, 0);
}

impl Connection {
    fn send(&mut self, bytes: &[u8]) -> Result<(), DaemonFailure> {
        self.stream.get_mut().write_all(bytes)?;
        Ok(())
    }

    fn u64(&mut self) -> Result<u64, DaemonFailure> {
        let mut b = [0u8; 8];
        self.stream.read_exact(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    fn string(&mut self) -> Result<Vec<u8>, DaemonFailure> {
        let len = self.u64()?;
        if len > MAX_STRING {
            return Err(fail(format!("a {len}-byte string from the daemon")));
        }
        let padded = len.div_ceil(8) * 8;
        let mut b = vec![0u8; padded as usize];
        self.stream.read_exact(&mut b)?;
        b.truncate(len as usize);
        Ok(b)
    }

    /// Skips the fields of an activity message.
    fn fields(&mut self) -> Result<(), DaemonFailure> {
        let n = self.u64()?;
        for _ in 0..n {
            match self.u64()? {
                0 => {
                    self.u64()?;
                }
                1 => {
                    self.string()?;
                }
                t => return Err(fail(format!("unknown log field type {t}"))),
            }
        }
        Ok(())
    }

    /// Reads the daemon's log messages up to the end of the current operation; an
    /// error it reports becomes ours.
    fn stderr(&mut self) -> Result<(), DaemonFailure> {
        loop {
            match self.u64()? {
                STDERR_LAST => return Ok(()),
                STDERR_NEXT => {
                    let s = self.string()?;
                    tracing::debug!("nix-daemon: {}", String::from_utf8_lossy(&s).trim_end());
                }
                STDERR_ERROR => {
                    let message = if self.minor >= 26 {
                        let _type = self.string()?;
                        let _level = self.u64()?;
                        let _name = self.string()?;
                        let msg = self.string()?;
                        let _have_pos = self.u64()?;
                        let traces = self.u64()?;
                        for _ in 0..traces {
                            let _have_pos = self.u64()?;
                            self.string()?;
                        }
                        msg
                    } else {
                        let msg = self.string()?;
                        let _status = self.u64()?;
                        msg
                    };
                    return Err(fail(String::from_utf8_lossy(&message).trim().to_owned()));
                }
                STDERR_START_ACTIVITY => {
                    let _id = self.u64()?;
                    let _level = self.u64()?;
                    let _type = self.u64()?;
                    let _text = self.string()?;
                    self.fields()?;
                    let _parent = self.u64()?;
                }
                STDERR_STOP_ACTIVITY => {
                    let _id = self.u64()?;
                }
                STDERR_RESULT => {
                    let _id = self.u64()?;
                    let _type = self.u64()?;
                    self.fields()?;
                }
                STDERR_READ | STDERR_WRITE => {
                    return Err(fail("the daemon asked for data it was never offered"))
                }
                other => return Err(fail(format!("unknown message {other:#x}"))),
            }
        }
    }

    /// `wopAddTempRoot` for every path; the daemon's worker holds them until the
    /// connection closes.
    pub(super) fn add_temp_roots(&mut self, paths: &[Vec<u8>]) -> Result<(), DaemonFailure> {
        for chunk in paths.chunks(PIPELINE) {
            let mut requests = Vec::new();
            for p in chunk {
                put_u64(&mut requests, OP_ADD_TEMP_ROOT);
                put_bytes(&mut requests, p);
            }
            self.send(&requests)?;
            for p in chunk {
                let answer = self.stderr().and_then(|()| self.u64());
                match answer {
                    Ok(1) => {}
                    Ok(n) => {
                        return Err(fail(format!(
                            "unexpected answer {n} to adding {}",
                            OsString::from(std::ffi::OsStr::from_bytes(p)).to_string_lossy()
                        )))
                    }
                    Err(e) => {
                        return Err(fail(format!(
                            "adding {}: {}",
                            std::ffi::OsStr::from_bytes(p).to_string_lossy(),
                            e.message
                        )))
                    }
                }
            }
        }
        Ok(())
    }

    /// The connection's socket, for watching it.
    pub(super) fn socket(&self) -> &UnixStream {
        self.stream.get_ref()
    }

    /// Whether the worker has hung up, without blocking: the daemon sends nothing between
    /// operations, so end of file, an error, or bytes it had no reason to send all mean the
    /// connection no longer holds the roots (or cannot be trusted to).
    pub(super) fn hung_up(&self) -> bool {
        use rustix::net::RecvFlags;
        if !self.stream.buffer().is_empty() {
            return true;
        }
        let mut byte = [0u8; 1];
        match rustix::net::recv(
            self.socket(),
            &mut byte,
            RecvFlags::DONTWAIT | RecvFlags::PEEK,
        ) {
            Ok(_) => true,
            Err(rustix::io::Errno::WOULDBLOCK) | Err(rustix::io::Errno::INTR) => false,
            Err(_) => true,
        }
    }
}

#[cfg(test)]
pub(super) mod fake {
    use std::io::{Read, Write};
    use std::os::unix::net::{UnixListener, UnixStream};
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    /// A scripted nix-daemon speaking protocol 1.38: it logs an activity and a line for
    /// each root, refuses paths ending in `-bad` as current Nix reports errors, and returns
    /// the roots it was given once the client hangs up.
    pub(crate) fn fake_daemon(socket: &Path) -> std::thread::JoinHandle<Vec<String>> {
        std::fs::create_dir_all(socket.parent().unwrap()).unwrap();
        let listener = UnixListener::bind(socket).unwrap();
        std::thread::spawn(move || {
            let (conn, _) = listener.accept().unwrap();
            let mut roots = Vec::new();
            serve(conn, |root| roots.push(root));
            roots
        })
    }

    /// Serves one connection as [`fake_daemon`] does, telling `on_root` each root taken.
    fn serve(mut conn: UnixStream, mut on_root: impl FnMut(String)) {
        {
            let u64_in = |c: &mut UnixStream| -> Option<u64> {
                let mut b = [0u8; 8];
                c.read_exact(&mut b).ok().map(|()| u64::from_le_bytes(b))
            };
            let put = |out: &mut Vec<u8>, n: u64| out.extend_from_slice(&n.to_le_bytes());
            let put_str = |out: &mut Vec<u8>, s: &[u8]| {
                out.extend_from_slice(&(s.len() as u64).to_le_bytes());
                out.extend_from_slice(s);
                out.resize(out.len() + (8 - s.len() % 8) % 8, 0);
            };
            assert_eq!(u64_in(&mut conn), Some(0x6e69_7863));
            assert_eq!(u64_in(&mut conn), Some((1 << 8) | 35));
            let mut out = Vec::new();
            put(&mut out, 0x6478_696f);
            put(&mut out, (1 << 8) | 38);
            conn.write_all(&out).unwrap();
            assert_eq!(u64_in(&mut conn), Some(0), "CPU affinity");
            assert_eq!(u64_in(&mut conn), Some(0), "reserveSpace");
            let mut out = Vec::new();
            put_str(&mut out, b"2.30.0");
            put(&mut out, 1); // trusted
            put(&mut out, 0x616c_7473);
            conn.write_all(&out).unwrap();
            while let Some(op) = u64_in(&mut conn) {
                assert_eq!(op, 11, "wopAddTempRoot");
                let len = u64_in(&mut conn).unwrap() as usize;
                let mut path = vec![0u8; len.div_ceil(8) * 8];
                conn.read_exact(&mut path).unwrap();
                path.truncate(len);
                let path = String::from_utf8(path).unwrap();
                let mut out = Vec::new();
                if path.ends_with("-bad") {
                    put(&mut out, 0x6378_7470);
                    put_str(&mut out, b"Error");
                    put(&mut out, 0);
                    put_str(&mut out, b"Error");
                    put_str(&mut out, format!("path '{path}' is not valid").as_bytes());
                    put(&mut out, 0);
                    put(&mut out, 1);
                    put(&mut out, 0);
                    put_str(&mut out, b"while adding a root");
                } else {
                    put(&mut out, 0x5354_5254);
                    put(&mut out, 7);
                    put(&mut out, 3);
                    put(&mut out, 0);
                    put_str(&mut out, b"adding a root");
                    put(&mut out, 2);
                    put(&mut out, 0);
                    put(&mut out, 42);
                    put(&mut out, 1);
                    put_str(&mut out, path.as_bytes());
                    put(&mut out, 0);
                    put(&mut out, 0x5354_4f50);
                    put(&mut out, 7);
                    put(&mut out, 0x6f6c_6d67);
                    put_str(&mut out, b"a log line\n");
                    put(&mut out, 0x616c_7473);
                    put(&mut out, 1);
                    on_root(path);
                }
                if conn.write_all(&out).is_err() {
                    break;
                }
            }
        }
    }

    /// What a [`FakeDaemon`] saw, in order.
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub(crate) enum Event {
        /// Connection N was accepted.
        Opened(usize),
        /// Connection N took a root.
        Root(usize, String),
        /// Connection N ended: the client closed it, or it was killed.
        Closed(usize),
    }

    /// A scripted nix-daemon that serves any number of connections, each with a worker
    /// of its own (a thread), and whose workers a test can kill.
    pub(crate) struct FakeDaemon {
        socket: PathBuf,
        events: Arc<Mutex<Vec<Event>>>,
        streams: Arc<Mutex<Vec<UnixStream>>>,
        stop: Arc<AtomicBool>,
        acceptor: Option<std::thread::JoinHandle<()>>,
    }

    impl FakeDaemon {
        /// Listens on `socket`.
        pub(crate) fn start(socket: &Path) -> FakeDaemon {
            std::fs::create_dir_all(socket.parent().unwrap()).unwrap();
            let listener = UnixListener::bind(socket).unwrap();
            listener.set_nonblocking(true).unwrap();
            let events = Arc::new(Mutex::new(Vec::new()));
            let streams = Arc::new(Mutex::new(Vec::<UnixStream>::new()));
            let stop = Arc::new(AtomicBool::new(false));
            let (e, s, st) = (events.clone(), streams.clone(), stop.clone());
            let acceptor = std::thread::spawn(move || {
                while !st.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((conn, _)) => {
                            conn.set_nonblocking(false).unwrap();
                            let mut streams = s.lock().unwrap();
                            let id = streams.len();
                            streams.push(conn.try_clone().unwrap());
                            e.lock().unwrap().push(Event::Opened(id));
                            let e = e.clone();
                            std::thread::spawn(move || {
                                let roots = e.clone();
                                serve(conn, |root| {
                                    roots.lock().unwrap().push(Event::Root(id, root))
                                });
                                e.lock().unwrap().push(Event::Closed(id));
                            });
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
            });
            FakeDaemon {
                socket: socket.to_owned(),
                events,
                streams,
                stop,
                acceptor: Some(acceptor),
            }
        }

        /// Everything seen so far.
        pub(crate) fn events(&self) -> Vec<Event> {
            self.events.lock().unwrap().clone()
        }

        /// The roots connection `id` took.
        pub(crate) fn roots(&self, id: usize) -> Vec<String> {
            self.events()
                .into_iter()
                .filter_map(|e| match e {
                    Event::Root(i, r) if i == id => Some(r),
                    _ => None,
                })
                .collect()
        }

        /// The connections accepted and not ended.
        pub(crate) fn open(&self) -> Vec<usize> {
            let events = self.events();
            events
                .iter()
                .filter_map(|e| match e {
                    Event::Opened(i) if !events.contains(&Event::Closed(*i)) => Some(*i),
                    _ => None,
                })
                .collect()
        }

        /// Kills the worker of connection `id`: the client reads end of file.
        pub(crate) fn kill(&self, id: usize) {
            let _ = self.streams.lock().unwrap()[id].shutdown(std::net::Shutdown::Both);
        }

        /// Waits (at most 10 s) until `done` holds for the events; panics otherwise.
        pub(crate) fn wait_for(&self, what: &str, done: impl Fn(&[Event]) -> bool) {
            let deadline = Instant::now() + Duration::from_secs(10);
            while !done(&self.events()) {
                assert!(Instant::now() < deadline, "{what}: {:?}", self.events());
                std::thread::sleep(Duration::from_millis(5));
            }
        }

        /// Stops listening (the socket goes), as a daemon that is stopped does; the
        /// workers of open connections stay.
        pub(crate) fn stop_listening(&mut self) {
            self.stop.store(true, Ordering::Relaxed);
            if let Some(t) = self.acceptor.take() {
                t.join().unwrap();
            }
            let _ = std::fs::remove_file(&self.socket);
        }
    }

    impl Drop for FakeDaemon {
        fn drop(&mut self) {
            self.stop_listening();
            for s in self.streams.lock().unwrap().iter() {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::super::{GcRootsMode, TempRoots};
    use super::fake::fake_daemon;
    use crate::store_path::StorePath;

    #[test]
    fn daemon_protocol_holds_roots_until_the_connection_closes() {
        let f = fixture();
        let daemon = fake_daemon(&f.dirs.daemon_socket);
        let roots =
            TempRoots::hold_with(GcRootsMode::Auto, &f.dirs, &f.dirs.store_dir, &f.paths).unwrap();
        assert_eq!(roots.held_by(), Some("daemon"));
        assert!(!f.dirs.state_dir.join("temproots").exists());
        drop(roots);
        // The daemon sees the connection close only now: it held the roots until here.
        assert_eq!(daemon.join().unwrap(), printed(&f));
    }

    #[test]
    fn daemon_errors_name_the_path_and_the_daemon() {
        let f = fixture();
        let daemon = fake_daemon(&f.dirs.daemon_socket);
        let mut paths = f.paths.clone();
        paths.push(StorePath::new("3a7c0xbqkqi3i8a1xndh6h8gwb3sw0nb-bad").unwrap());
        let e = TempRoots::hold_with(GcRootsMode::Daemon, &f.dirs, &f.dirs.store_dir, &paths)
            .unwrap_err()
            .to_string();
        assert!(e.contains("-bad' is not valid"), "{e}");
        assert!(e.contains("daemon-socket/socket"), "{e}");
        daemon.join().unwrap();
    }
}
