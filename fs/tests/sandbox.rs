//! The sandbox, entered with the function the daemon calls, in child processes that then
//! try to escape it. Each attempt runs in a child of its own, forked from this process
//! while it has one thread (the sandbox must be entered single-threaded, and a child
//! killed by seccomp takes nothing else with it).
//!
//! A plain `main` instead of the test harness: libtest runs tests on threads of its own,
//! and forking a multi-threaded process to run arbitrary code in the child is unsound. It
//! speaks enough of the harness's command line for `cargo test` and `cargo nextest`
//! (`--list --format terse`, `--exact NAME`).

use std::ffi::CString;
use std::io::Write;
use std::net::TcpListener;
use std::path::Path;

use nixstorefs::sandbox::{self, Plan, Profile, SandboxMode, SeccompMode};

/// How a child ended.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// It exited with this status: 0 for success, an errno for a refused call.
    Exited(i32),
    /// A signal killed it (SIGSYS: seccomp).
    Killed(i32),
}

/// Forks; the child enters the sandbox over `store` and exits with `attempt`'s result.
fn in_sandbox(
    store: &Path,
    mode: SandboxMode,
    seccomp: SeccompMode,
    attempt: &dyn Fn() -> i32,
) -> Outcome {
    let plan = Plan {
        mode,
        seccomp,
        profile: Profile::VirtioFs,
        store_dir: store.to_path_buf(),
        max_fds: 256,
        listener: None,
    };
    std::io::stdout().flush().unwrap();
    // SAFETY: this process has a single thread (no test harness), so the child may run
    // arbitrary code.
    match unsafe { libc::fork() } {
        -1 => panic!("fork: {}", std::io::Error::last_os_error()),
        0 => {
            let code = match sandbox::enter(&plan) {
                Ok(_) => attempt(),
                Err(e) => {
                    eprintln!("{e}");
                    200
                }
            };
            // SAFETY: ends the child at once, without running the parent's exit handlers.
            unsafe { libc::_exit(code) }
        }
        child => {
            let mut status = 0;
            // SAFETY: waits for our own child, with a valid out pointer.
            unsafe { libc::waitpid(child, &mut status, 0) };
            if libc::WIFSIGNALED(status) {
                Outcome::Killed(libc::WTERMSIG(status))
            } else {
                Outcome::Exited(libc::WEXITSTATUS(status))
            }
        }
    }
}

/// 0 when `result` succeeded, else its errno.
fn code<T>(result: std::io::Result<T>) -> i32 {
    match result {
        Ok(_) => 0,
        Err(e) => e.raw_os_error().unwrap_or(255),
    }
}

fn exec_true() -> i32 {
    let program = CString::new("/bin/true").unwrap();
    let argv = [program.as_ptr(), std::ptr::null()];
    // SAFETY: a NUL-terminated argument vector of valid C strings; on success the image is
    // replaced (and exits 0), on failure errno says why.
    unsafe { libc::execv(program.as_ptr(), argv.as_ptr()) };
    std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(255)
}

fn sandbox_refuses_escapes() {
    let top = tempfile::tempdir().unwrap();
    let store = top.path().join("store");
    let path = store.join("aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-hello");
    std::fs::create_dir_all(&path).unwrap();
    std::fs::write(path.join("greeting"), "hello\n").unwrap();
    let outside = top.path().join("secret");
    std::fs::write(&outside, "not in the store\n").unwrap();
    let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = tcp.local_addr().unwrap().port();

    let read_inside = || code(std::fs::read(path.join("greeting")));
    let list_inside = || code(std::fs::read_dir(&path));
    let read_outside = || code(std::fs::read(&outside));
    let write_inside = || {
        code(
            std::fs::OpenOptions::new()
                .write(true)
                .open(path.join("greeting")),
        )
    };
    let create_inside = || code(std::fs::File::create(path.join("planted")));
    let connect = || code(std::net::TcpStream::connect(("127.0.0.1", port)));
    let new_socket = || {
        // SAFETY: socket(2) with integer arguments; the descriptor is closed at exit.
        let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
        if fd < 0 {
            std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(255)
        } else {
            0
        }
    };
    let status = || {
        let text = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let nnp = text.contains("NoNewPrivs:\t1");
        let filtered = text.contains("Seccomp:\t2");
        i32::from(nnp) | i32::from(filtered) << 1
    };

    let sigsys = Outcome::Killed(libc::SIGSYS);
    let full = |attempt: &dyn Fn() -> i32| {
        in_sandbox(&store, SandboxMode::Landlock, SeccompMode::Kill, attempt)
    };
    let landlock_only = |attempt: &dyn Fn() -> i32| {
        in_sandbox(&store, SandboxMode::Landlock, SeccompMode::None, attempt)
    };
    let seccomp_only = |attempt: &dyn Fn() -> i32| {
        in_sandbox(&store, SandboxMode::None, SeccompMode::Kill, attempt)
    };

    // What the daemon does keeps working: threads (clone3 refused, clone of a thread
    // allowed), reading and listing the store.
    let thread = || {
        let spawned = std::thread::spawn(|| 7).join();
        i32::from(spawned.ok() != Some(7))
    };
    assert_eq!(full(&thread), Outcome::Exited(0), "starting a thread");
    assert_eq!(full(&read_inside), Outcome::Exited(0), "reading the store");
    assert_eq!(full(&list_inside), Outcome::Exited(0), "listing the store");
    // /proc/self/status is outside the store: read it under seccomp alone for the flags.
    assert_eq!(
        seccomp_only(&status),
        Outcome::Exited(3),
        "NoNewPrivs: 1 and Seccomp: 2 (without Landlock, to read /proc)"
    );

    // Every escape is refused, by both layers on their own.
    assert_eq!(
        full(&read_outside),
        Outcome::Exited(libc::EACCES),
        "a file outside"
    );
    assert_eq!(landlock_only(&read_outside), Outcome::Exited(libc::EACCES));
    assert_eq!(full(&write_inside), sigsys, "opening for writing");
    assert_eq!(landlock_only(&write_inside), Outcome::Exited(libc::EACCES));
    assert_eq!(full(&create_inside), sigsys, "creating a file");
    assert_eq!(landlock_only(&create_inside), Outcome::Exited(libc::EACCES));
    assert_eq!(full(&connect), sigsys, "a TCP connection");
    assert_eq!(full(&new_socket), sigsys, "a new socket");
    assert_eq!(full(&exec_true), sigsys, "exec");
    assert_eq!(landlock_only(&exec_true), Outcome::Exited(libc::EACCES));
    if landlock_abi() >= 4 {
        assert_eq!(landlock_only(&connect), Outcome::Exited(libc::EACCES));
    }
    // Nothing was written.
    assert!(!path.join("planted").exists());
    assert_eq!(std::fs::read(path.join("greeting")).unwrap(), b"hello\n");

    // Log mode kills nothing: the call goes through (to the audit log), Landlock still
    // refuses what it covers.
    assert_eq!(
        in_sandbox(
            &store,
            SandboxMode::Landlock,
            SeccompMode::Log,
            &write_inside
        ),
        Outcome::Exited(libc::EACCES)
    );
    drop(tcp);
}

fn capabilities_are_dropped() {
    let top = tempfile::tempdir().unwrap();
    let store = top.path().join("store");
    std::fs::create_dir_all(&store).unwrap();
    let caps = || {
        let mut header = libc_cap_header();
        let mut data = [[0u32; 3]; 2];
        // SAFETY: capget with a valid version-3 header and room for two data words.
        let rc = unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) };
        if rc != 0 {
            return 255;
        }
        i32::from(data[0][0] == 0 && data[1][0] == 0 && data[0][1] == 0 && data[1][1] == 0)
    };
    assert_eq!(
        // capget is not on the daemon's allow-list: looked at without the filter.
        in_sandbox(&store, SandboxMode::Landlock, SeccompMode::None, &caps),
        Outcome::Exited(1),
        "no effective or permitted capability left"
    );
}

/// A capget header for version 3 (two 32-bit words per set), this process.
fn libc_cap_header() -> [u32; 2] {
    [0x2008_0522, 0]
}

fn landlock_abi() -> i32 {
    // SAFETY: landlock_create_ruleset with LANDLOCK_CREATE_RULESET_VERSION asks for the
    // ABI version and creates nothing.
    let abi = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<u8>(),
            0usize,
            1u32,
        )
    };
    abi.max(0) as i32
}

const TESTS: &[(&str, fn())] = &[
    ("sandbox_refuses_escapes", sandbox_refuses_escapes),
    ("capabilities_are_dropped", capabilities_are_dropped),
];

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--list") {
        if !args.iter().any(|a| a == "--ignored") {
            for (name, _) in TESTS {
                println!("{name}: test");
            }
        }
        return;
    }
    let filters: Vec<&String> = args.iter().filter(|a| !a.starts_with('-')).collect();
    let exact = args.iter().any(|a| a == "--exact");
    let mut passed = 0;
    for (name, test) in TESTS {
        let selected = filters.is_empty()
            || filters.iter().any(|f| {
                if exact {
                    f.as_str() == *name
                } else {
                    name.contains(f.as_str())
                }
            });
        if selected {
            println!("test {name} ...");
            test();
            println!("test {name} ... ok");
            passed += 1;
        }
    }
    println!("{passed} passed, 0 failed");
}
