//! A corpus of malformed closure inputs, fed to both binaries: each must end with exit
//! status 2 and a message naming the input (and the line, where there is one), with
//! nothing mounted and no image written. Then what only the daemon can refuse: a path
//! missing from the host store, and a bad line on standard input. What the parser refuses,
//! and how it says so, is tested beside it (`fs/src/closure.rs`).

use std::ffi::OsString;
use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use nixstorefs_tests::harness::{self, Mountpoint};
use nixstorefs_tests::sample::{self, SampleOptions, SampleStore};

/// One malformed input: its name, its bytes (or a directory), and the line the error must
/// name (None where the input has no line to blame).
struct Case {
    name: &'static str,
    input: Input,
    line: Option<usize>,
}

enum Input {
    File(Vec<u8>),
    /// A directory holding these files.
    Dir(Vec<(&'static str, Vec<u8>)>),
    /// A symlink to this path (a device, say).
    Symlink(&'static str),
}

fn corpus(s: &SampleStore) -> Vec<Case> {
    let store = s.store_dir.to_string_lossy().into_owned();
    let good: Vec<String> = s.closure.iter().map(|b| format!("{store}/{b}")).collect();
    let g0 = &good[0];
    let hash = &s.closure[0][..32];
    let list = |lines: &[&str]| lines.join("\n").into_bytes();
    let with_good = |bad: &str| format!("{g0}\n{bad}\n").into_bytes();
    let mut garbage = vec![0u8; 4096];
    sample::PseudoRandom::new("garbage").fill(&mut garbage);
    // A million valid-looking lines whose last one is bad: the error must still say which.
    let mut million = String::with_capacity(60 * 1_000_000);
    for _ in 0..999_999 {
        million.push_str(g0);
        million.push('\n');
    }
    million.push_str("relative/path\n");
    let record = |path: &str, count: &str, refs: &[&str]| {
        let mut r = format!("{path}\n{}\n1234\n\n{count}\n", "0".repeat(64));
        for x in refs {
            r.push_str(x);
            r.push('\n');
        }
        r
    };
    let c = |name, input, line| Case { name, input, line };
    use Input::{Dir, File, Symlink};
    vec![
        c("empty", File(vec![]), None),
        c("only-blank-lines", File(b"\n  \n\t\n".to_vec()), None),
        c("binary-garbage", File(garbage), Some(1)),
        c("nul-byte", File(format!("{g0}\0\n").into_bytes()), Some(1)),
        c(
            "nul-in-second-line",
            File(with_good("/nix\0/store")),
            Some(2),
        ),
        c("crlf", File(format!("{g0}\r\n").into_bytes()), Some(1)),
        c(
            "crlf-second-line",
            File(format!("{g0}\n{g0}\r\n").into_bytes()),
            Some(2),
        ),
        c("relative", File(with_good("nix/store/x")), Some(2)),
        c("leading-space", File(with_good(&format!(" {g0}"))), Some(2)),
        c("outside-store", File(with_good("/etc/passwd")), Some(2)),
        c("store-dir-itself", File(with_good(&store)), Some(2)),
        c(
            "inside-store-path",
            File(with_good(&format!("{g0}/bin/sh"))),
            Some(2),
        ),
        c(
            "dotdot-component",
            File(with_good(&format!("{store}/../etc"))),
            Some(2),
        ),
        c(
            "double-slash",
            File(with_good(&format!("{store}//{}", s.closure[0]))),
            Some(2),
        ),
        c(
            "hash-too-short",
            File(with_good(&format!("{store}/{}-x", &hash[..31]))),
            Some(2),
        ),
        c(
            "hash-too-long",
            File(with_good(&format!("{store}/{hash}a-x"))),
            Some(2),
        ),
        c(
            "hash-letter-e",
            File(with_good(&format!("{store}/{}e-x", &hash[..31]))),
            Some(2),
        ),
        c(
            "hash-uppercase",
            File(with_good(&format!("{store}/{}-x", hash.to_uppercase()))),
            Some(2),
        ),
        c(
            "no-name",
            File(with_good(&format!("{store}/{hash}"))),
            Some(2),
        ),
        c(
            "empty-name",
            File(with_good(&format!("{store}/{hash}-"))),
            Some(2),
        ),
        c(
            "name-dot-component",
            File(with_good(&format!("{store}/{hash}-.-hidden"))),
            Some(2),
        ),
        c(
            "name-dotdot",
            File(with_good(&format!("{store}/{hash}-.."))),
            Some(2),
        ),
        c(
            "name-space",
            File(with_good(&format!("{store}/{hash}-a b"))),
            Some(2),
        ),
        c(
            "name-percent",
            File(with_good(&format!("{store}/{hash}-a%b"))),
            Some(2),
        ),
        c(
            "name-too-long",
            File(with_good(&format!("{store}/{hash}-{}", "a".repeat(212)))),
            Some(2),
        ),
        c(
            "name-utf8",
            File(with_good(&format!("{store}/{hash}-ünï"))),
            Some(2),
        ),
        c(
            "latin1-byte",
            File([g0.as_bytes(), b"\n", store.as_bytes(), b"/\xe9\n"].concat()),
            Some(2),
        ),
        c(
            "no-final-newline-bad-last",
            File(list(&[g0, "bad"])),
            Some(2),
        ),
        c(
            "million-lines-last-bad",
            File(million.into_bytes()),
            Some(1_000_000),
        ),
        c(
            "missing-path",
            File(with_good(&format!("{store}/{hash}-not-there"))),
            None,
        ),
        c(
            "registration-count-past-end",
            File(record(g0, "3", &[g0]).into_bytes()),
            None,
        ),
        c(
            "registration-bad-count",
            File(record(g0, "many", &[]).into_bytes()),
            Some(5),
        ),
        c(
            "registration-bad-size",
            File(format!("{g0}\n{}\nbig\n\n0\n", "0".repeat(64)).into_bytes()),
            Some(3),
        ),
        c(
            "registration-bad-reference",
            File(record(g0, "1", &["/etc"]).into_bytes()),
            Some(6),
        ),
        c(
            "registration-duplicate-record",
            File(
                [
                    record(g0, "0", &[]),
                    record(&good[1], "0", &[]),
                    record(g0, "0", &[]),
                ]
                .concat()
                .into_bytes(),
            ),
            Some(11),
        ),
        c("endless-device", Symlink("/dev/zero"), None),
        c(
            "directory-without-store-paths",
            Dir(vec![("registration", vec![])]),
            None,
        ),
        c(
            "directory-with-bad-store-paths",
            Dir(vec![("store-paths", with_good("x"))]),
            Some(2),
        ),
    ]
}

fn run(bin: &str, args: &[OsString]) -> std::process::Output {
    harness::run(
        Command::new(harness::bin(bin))
            .args(args)
            .stdin(Stdio::null()),
        Duration::from_secs(60),
    )
}

#[test]
fn every_malformed_input_is_refused_by_both_binaries() {
    let dir = tempfile::Builder::new()
        .prefix("nixstorefs-bad.")
        .tempdir_in("/tmp")
        .unwrap();
    let s = sample::build(&dir.path().join("sample"), &SampleOptions::small()).unwrap();
    let cases = corpus(&s);
    assert!(cases.len() >= 30, "{} cases", cases.len());
    let out_dir = dir.path().join("out");
    fs::create_dir(&out_dir).unwrap();
    let mut failures = Vec::new();
    for case in &cases {
        let path = dir.path().join(case.name);
        match &case.input {
            Input::File(bytes) => fs::write(&path, bytes).unwrap(),
            Input::Symlink(target) => std::os::unix::fs::symlink(target, &path).unwrap(),
            Input::Dir(files) => {
                fs::create_dir(&path).unwrap();
                for (name, bytes) in files {
                    fs::write(path.join(name), bytes).unwrap();
                }
            }
        }
        let mnt = Mountpoint::new();
        let img = out_dir.join(format!("{}.img", case.name));
        let store = ["--store-dir".into(), s.store_dir.clone().into_os_string()];
        let runs = [
            (
                "nixstorefs",
                run(
                    "nixstorefs",
                    &[
                        &store[..],
                        &["-f".into(), path.clone().into(), mnt.path().into()],
                    ]
                    .concat(),
                ),
            ),
            (
                "mkimage",
                run(
                    "mkimage",
                    &[&store[..], &[path.clone().into(), img.clone().into()]].concat(),
                ),
            ),
        ];
        for (bin, out) in runs {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let mut problems = Vec::new();
            if out.status.code() != Some(2) {
                problems.push(format!("exit status {:?}", out.status.code()));
            }
            if !stderr.contains(case.name) {
                problems.push("message does not name the input".to_string());
            }
            if let Some(line) = case.line {
                if !stderr.contains(&format!(":{line}:")) {
                    problems.push(format!("message does not name line {line}"));
                }
            }
            if mnt.is_mounted() {
                problems.push("something is mounted".to_string());
            }
            if !problems.is_empty() {
                failures.push(format!(
                    "{bin} {}: {} -- {}",
                    case.name,
                    problems.join(", "),
                    stderr.trim()
                ));
            }
        }
        assert!(!img.exists(), "{}: an image was written", case.name);
    }
    let leftovers: Vec<_> = fs::read_dir(&out_dir).unwrap().collect();
    assert!(leftovers.is_empty(), "files left behind: {leftovers:?}");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    println!(
        "figures: {} malformed inputs x 2 binaries, all refused with exit 2",
        cases.len()
    );
}

/// Runs `nixstorefs` on `closure` (its standard input from `stdin`, if given) and checks
/// that it exits 2, names each of `fragments` on stderr, and mounts nothing.
fn expect_rejected(s: &SampleStore, closure: &Path, stdin: Option<&Path>, fragments: &[&str]) {
    let mnt = Mountpoint::new();
    let mut cmd = Command::new(harness::bin("nixstorefs"));
    cmd.arg("--store-dir")
        .arg(&s.store_dir)
        .arg("-f")
        .arg(closure)
        .arg(mnt.path());
    match stdin {
        Some(file) => cmd.stdin(fs::File::open(file).unwrap()),
        None => cmd.stdin(Stdio::null()),
    };
    let out = harness::run(&mut cmd, Duration::from_secs(60));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !mnt.is_mounted(),
        "a bad closure was mounted; stderr:\n{stderr}"
    );
    assert_eq!(out.status.code(), Some(2), "stderr:\n{stderr}");
    for f in fragments {
        assert!(stderr.contains(f), "stderr lacks {f:?}:\n{stderr}");
    }
}

/// A closure path the host store lacks is refused by its name: the store is asked, not
/// the parser, so this is the daemon's check.
#[test]
fn a_store_path_missing_from_the_host_is_named() {
    let (_d, s) = sample::temp(&SampleOptions::small());
    let missing = sample::base_name("missing-1.0");
    let path = s.dir.join("with-missing.txt");
    let text = format!(
        "{}{}/{missing}\n",
        s.store_paths_text(),
        s.store_dir.display()
    );
    fs::write(&path, text).unwrap();
    expect_rejected(&s, &path, None, &[&missing]);
}

/// A bad line on standard input (`-`) is named by its line.
#[test]
fn a_bad_line_on_stdin_is_named_by_line() {
    let (_d, s) = sample::temp(&SampleOptions::small());
    let input = s.dir.join("stdin.txt");
    fs::write(&input, format!("{}relative/path\n", s.store_paths_text())).unwrap();
    let line = format!("<stdin>:{}", s.closure.len() + 1);
    expect_rejected(&s, Path::new("-"), Some(&input), &[&line]);
}
