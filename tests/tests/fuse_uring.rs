//! End-to-end tests of FUSE over io_uring: that the rings really serve when the kernel
//! offers them, on the CPU each request came from, with passthrough kept; that the mount
//! falls back to `/dev/fuse` when they cannot serve; and that the queues end with the
//! mount. (Every other mount test runs over both transports: scripts/test.sh.)
//!
//! The ring needs the `fuse` module's `enable_uring` parameter, a global switch: the tests
//! that need it skip, saying so, when it is off (scripts/test.sh turns it on as root). One
//! test turns it off for a moment; .config/nextest.toml runs this file's tests one at a
//! time so that it never does so under another of them.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use nixstorefs_tests::harness::{self, Mount};
use nixstorefs_tests::sample::{self, SampleOptions, SampleStore};
use rustix::process::Signal;

/// A mount served the way `transport` says, logging every request it serves.
fn mount(s: &SampleStore, transport: &str, extra: &[&str]) -> Mount {
    Mount::builder(&s.store_dir, &s.closure_file)
        .args(["-vv", "--fuse-transport", transport])
        .args(extra)
        .start()
}

/// Whether the ring can be tested here; says why not when it cannot.
fn ring_available() -> bool {
    if harness::uring_enabled() {
        return true;
    }
    harness::skip(&format!(
        "FUSE over io_uring is off ({} is not Y; scripts/test.sh sets it as root)",
        harness::ENABLE_URING
    ));
    false
}

/// The trace lines of requests the rings served.
fn ring_requests(log: &str) -> Vec<&str> {
    log.lines().filter(|l| l.contains("ring request")).collect()
}

/// Runs `cmd` with `args` on CPU `cpu` only; panics if it fails.
fn on_cpu(cpu: usize, cmd: &str, args: &[&Path]) -> Vec<u8> {
    let out = harness::run(
        Command::new("taskset")
            .arg("-c")
            .arg(cpu.to_string())
            .arg(cmd)
            .args(args),
        Duration::from_secs(30),
    );
    assert!(
        out.status.success(),
        "taskset -c {cpu} {cmd} {args:?} failed"
    );
    out.stdout
}

#[test]
fn the_rings_serve_when_the_kernel_offers_them() {
    if !ring_available() {
        return;
    }
    let (_d, s) = sample::temp(&SampleOptions::small());
    let m = mount(&s, "auto", &[]);
    for rel in &s.small_files {
        assert_eq!(
            fs::read(m.mountpoint().join(rel)).unwrap(),
            fs::read(s.host(rel)).unwrap(),
            "{}",
            rel.display()
        );
    }
    let log = m.stderr();
    let chosen: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("FUSE transport:"))
        .collect();
    assert_eq!(
        chosen.len(),
        1,
        "one line says which transport serves:\n{log}"
    );
    assert!(
        chosen[0].contains("FUSE transport: io_uring"),
        "{}",
        chosen[0]
    );
    let served = ring_requests(&log);
    assert!(
        served.iter().any(|l| l.contains("ring request LOOKUP ")),
        "no lookup came over the rings:\n{log}"
    );
}

#[test]
fn a_request_is_served_on_the_queue_of_the_cpu_that_sent_it() {
    if !ring_available() {
        return;
    }
    let online = fs::read_to_string("/sys/devices/system/cpu/online").unwrap_or_default();
    if online.trim() == "0" {
        harness::skip("one CPU online");
        return;
    }
    let (_d, s) = sample::temp(&SampleOptions::small());
    let m = mount(&s, "io-uring", &[]);
    // A different closure path from each CPU: each name is looked up once, from there.
    let names = [&s.closure[0], &s.closure[1]];
    for (cpu, name) in names.iter().enumerate() {
        on_cpu(cpu, "stat", &[&m.mountpoint().join(name)]);
    }
    let log = m.stderr();
    for (cpu, name) in names.iter().enumerate() {
        let lookup = ring_requests(&log)
            .into_iter()
            .find(|l| l.contains("ring request LOOKUP ") && l.contains(&format!("name=\"{name}\"")))
            .unwrap_or_else(|| panic!("no ring lookup of {name}:\n{log}"));
        assert!(
            lookup.contains(&format!("queue={cpu} cpu={cpu} ")),
            "sent from CPU {cpu}, served elsewhere: {lookup}"
        );
    }
}

#[test]
fn passthrough_keeps_reads_away_from_the_daemon_over_the_rings() {
    if !ring_available() {
        return;
    }
    let (_d, s) = sample::temp(&SampleOptions::small());
    let m = mount(&s, "io-uring", &[]);
    let big = fs::read(m.mountpoint().join(&s.big_file)).unwrap();
    assert_eq!(big, fs::read(s.host(&s.big_file)).unwrap());
    let log = m.stderr();
    let served = ring_requests(&log);
    assert!(
        served.iter().any(|l| l.contains("ring request OPEN ")),
        "the open did not come over the rings:\n{log}"
    );
    assert!(
        !served.iter().any(|l| l.contains("ring request READ ")),
        "a read reached the daemon:\n{log}"
    );

    // Without passthrough the same reads come over the rings, from the payload buffers.
    let m = mount(&s, "io-uring", &["--no-passthrough"]);
    let big = fs::read(m.mountpoint().join(&s.big_file)).unwrap();
    assert_eq!(big, fs::read(s.host(&s.big_file)).unwrap());
    let log = m.stderr();
    assert!(
        ring_requests(&log)
            .iter()
            .any(|l| l.contains("ring request READ ")),
        "no read over the rings without passthrough:\n{log}"
    );
}

#[test]
fn a_queue_that_cannot_register_makes_the_mount_fall_back_to_dev_fuse() {
    if !ring_available() {
        return;
    }
    let (_d, s) = sample::temp(&SampleOptions::small());
    let last = nixstorefs_possible_cpus() - 1;
    let m = mount(
        &s,
        "auto",
        &["--test-uring-refuse-queue", &last.to_string()],
    );
    for rel in &s.small_files {
        assert_eq!(
            fs::read(m.mountpoint().join(rel)).unwrap(),
            fs::read(s.host(rel)).unwrap()
        );
    }
    let log = m.stderr();
    let chosen: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("FUSE transport:"))
        .collect();
    assert_eq!(chosen.len(), 1, "{log}");
    assert!(
        chosen[0].contains("FUSE transport: /dev/fuse") && chosen[0].contains("refused"),
        "{}",
        chosen[0]
    );
    assert!(ring_requests(&log).is_empty(), "the rings served:\n{log}");
}

/// The possible CPUs, as the kernel counts its queues.
fn nixstorefs_possible_cpus() -> usize {
    let text = fs::read_to_string("/sys/devices/system/cpu/possible").unwrap();
    let last = text.trim().rsplit([',', '-']).next().unwrap();
    last.parse::<usize>().unwrap() + 1
}

/// Sets `enable_uring` and puts the old value back when dropped.
struct EnableUring(String);

impl EnableUring {
    fn set(value: &str) -> EnableUring {
        let old = fs::read_to_string(harness::ENABLE_URING).unwrap();
        fs::write(harness::ENABLE_URING, value).unwrap();
        EnableUring(old.trim().to_string())
    }
}

impl Drop for EnableUring {
    fn drop(&mut self) {
        let _ = fs::write(harness::ENABLE_URING, &self.0);
    }
}

#[test]
fn without_enable_uring_the_mount_is_served_over_dev_fuse() {
    if !Path::new(harness::ENABLE_URING).exists() {
        harness::skip("this kernel has no FUSE over io_uring");
        return;
    }
    let (_d, s) = sample::temp(&SampleOptions::small());
    let m = {
        // Off only while the kernel mounts and negotiates: it decides at INIT.
        let _off = EnableUring::set("N");
        mount(&s, "auto", &[])
    };
    for rel in &s.small_files {
        assert_eq!(
            fs::read(m.mountpoint().join(rel)).unwrap(),
            fs::read(s.host(rel)).unwrap()
        );
    }
    let log = m.stderr();
    assert!(
        log.contains("FUSE transport: /dev/fuse (the kernel does not offer"),
        "{log}"
    );
    assert!(ring_requests(&log).is_empty(), "{log}");

    // Required, it refuses to start rather than serve otherwise, and leaves no mount.
    let mp = harness::Mountpoint::new();
    let out = {
        let _off = EnableUring::set("N");
        harness::run(
            Command::new(harness::bin("nixstorefs"))
                .args(["-f", "--fuse-transport", "io-uring", "--store-dir"])
                .arg(&s.store_dir)
                .arg(&s.closure_file)
                .arg(mp.path()),
            Duration::from_secs(30),
        )
    };
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--fuse-transport io-uring"), "{stderr}");
    assert!(!mp.is_mounted());
}

#[test]
fn unmounting_ends_the_queue_threads() {
    if !ring_available() {
        return;
    }
    let (_d, s) = sample::temp(&SampleOptions::small());
    let mut m = mount(&s, "io-uring", &[]);
    let pid = m.pid().unwrap();
    fs::read(m.mountpoint().join(&s.small_files[0])).unwrap();
    let threads = fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|comm| comm.starts_with("fuse-ring-"))
        .count();
    assert_eq!(threads, nixstorefs_possible_cpus(), "one thread per queue");
    let status = m.signal_and_wait(Signal::TERM);
    assert!(status.success(), "{status}\n{}", m.stderr());
    assert!(!m.is_mounted());
    let log = m.stderr();
    let stopped = log
        .lines()
        .filter(|l| l.contains("ring queue stopped"))
        .count();
    assert_eq!(stopped, nixstorefs_possible_cpus(), "{log}");
    assert!(!log.contains(" ERROR "), "{log}");
}
