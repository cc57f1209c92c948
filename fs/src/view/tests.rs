//! The view over a store in a temporary directory: no root, no mount, no FUSE. What the
//! end-to-end tests show through a kernel mount, shown here on the view's own calls.

use std::ffi::OsStr;
use std::fs;
use std::os::unix::fs::symlink;
use std::path::PathBuf;

use rustix::io::Errno;

use super::*;

const HELLO: &str = "0c6kzph7l0dcbn2zfdv7bvl4i4krx3wr-hello";
const LIB: &str = "1c6kzph7l0dcbn2zfdv7bvl4i4krx3wr-lib";
const OUTSIDE: &str = "2c6kzph7l0dcbn2zfdv7bvl4i4krx3wr-outside";

struct Store {
    _top: tempfile::TempDir,
    dir: PathBuf,
}

impl Store {
    /// Two closure paths and one beside them that is not in the closure.
    fn new() -> Store {
        let top = tempfile::tempdir().unwrap();
        let dir = top.path().join("store");
        let hello = dir.join(HELLO);
        fs::create_dir_all(hello.join("bin")).unwrap();
        fs::create_dir_all(hello.join("share/doc")).unwrap();
        fs::write(hello.join("bin/hello"), b"#!/bin/sh\necho hello\n").unwrap();
        fs::write(hello.join("share/doc/README"), b"read me\n").unwrap();
        symlink("../bin/hello", hello.join("share/link")).unwrap();
        fs::create_dir_all(dir.join(LIB)).unwrap();
        fs::write(dir.join(LIB).join("libc.so"), vec![7u8; 10_000]).unwrap();
        // The same file in both paths, as nix-store --optimise leaves it.
        fs::hard_link(dir.join(LIB).join("libc.so"), hello.join("libc.so")).unwrap();
        fs::create_dir_all(dir.join(OUTSIDE)).unwrap();
        fs::write(dir.join(OUTSIDE).join("secret"), b"secret").unwrap();
        Store { _top: top, dir }
    }

    fn view(&self, options: ViewOptions) -> View {
        let text = format!(
            "{}\n{}\n",
            self.dir.join(HELLO).display(),
            self.dir.join(LIB).display()
        );
        let closure = Closure::parse(text.as_bytes(), "test", &self.dir).unwrap();
        View::new(&closure, false, options).unwrap().0
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }
}

fn name(s: &str) -> &OsStr {
    OsStr::new(s)
}

/// Looks up a `/`-separated path from the root, counting a reference at every step.
fn walk(view: &View, path: &str) -> Result<Attr> {
    let mut node = ROOT_ID;
    let mut attr = view.getattr(ROOT_ID)?;
    for part in path.split('/') {
        attr = view.lookup(node, name(part))?;
        node = attr.ino;
    }
    Ok(attr)
}

#[test]
fn the_root_lists_exactly_the_closure() {
    let store = Store::new();
    let view = store.view(ViewOptions::default());
    let names: Vec<_> = view
        .list(ROOT_ID)
        .unwrap()
        .iter()
        .map(|e| e.name.clone())
        .collect();
    assert_eq!(names, [HELLO, LIB]);
    assert_eq!(view.lookup(ROOT_ID, name(OUTSIDE)), Err(Errno::NOENT));
    assert_eq!(view.lookup(ROOT_ID, name(".links")), Err(Errno::NOENT));
    assert_eq!(view.lookup(ROOT_ID, name("..")).unwrap().ino, ROOT_ID);
    let root = view.getattr(ROOT_ID).unwrap();
    assert_eq!((root.kind, root.perm), (Kind::Directory, 0o555));
}

#[test]
fn lookups_count_and_peeks_do_not() {
    let store = Store::new();
    let view = store.view(ViewOptions::default());
    let hello = view.peek(ROOT_ID, name(HELLO)).unwrap();
    assert_eq!(view.stats().live, 0, "a peek holds nothing");
    let looked_up = view.lookup(ROOT_ID, name(HELLO)).unwrap();
    assert_eq!(looked_up.ino, hello.ino);
    view.lookup(ROOT_ID, name(HELLO)).unwrap();
    assert_eq!(view.stats().live, 1);
    view.forget(hello.ino, 1);
    assert_eq!(view.stats().live, 1, "one reference is left");
    view.forget(hello.ino, 1);
    assert_eq!(view.stats().live, 0);
    // The record stays among the forgotten: a file handle of it still resolves.
    assert_eq!(view.lookup(hello.ino, name(".")).unwrap().ino, hello.ino);
}

#[test]
fn forgotten_records_are_bounded_and_then_stale() {
    let store = Store::new();
    let view = store.view(ViewOptions {
        max_forgotten_nodes: 2,
        ..ViewOptions::default()
    });
    let mut nodes = Vec::new();
    for path in [
        format!("{HELLO}/bin"),
        format!("{HELLO}/bin/hello"),
        format!("{HELLO}/share"),
        format!("{HELLO}/share/doc"),
    ] {
        nodes.push(walk(&view, &path).unwrap().ino);
    }
    view.forget_all();
    assert_eq!(view.stats().live, 0);
    assert!(view.stats().records <= 2 + 1, "{:?}", view.stats());
    // The least recently forgotten are gone: their handles are stale, not another object.
    let stale = nodes
        .iter()
        .filter(|&&n| view.lookup(n, name(".")) == Err(Errno::STALE))
        .count();
    assert!(stale >= 2, "{stale} of {} handles went stale", nodes.len());
}

#[test]
fn generations_tell_records_apart() {
    let store = Store::new();
    let view = store.view(ViewOptions::default());
    let a = walk(&view, &format!("{HELLO}/bin")).unwrap();
    let b = walk(&view, &format!("{HELLO}/share")).unwrap();
    assert_ne!(a.generation, b.generation);
    // Looked up again while held: the same record, the same generation.
    assert_eq!(
        walk(&view, &format!("{HELLO}/bin")).unwrap().generation,
        a.generation
    );
}

#[test]
fn hard_links_are_one_node_and_outlive_their_first_name() {
    let store = Store::new();
    let view = store.view(ViewOptions::default());
    let via_lib = walk(&view, &format!("{LIB}/libc.so")).unwrap();
    let via_hello = walk(&view, &format!("{HELLO}/libc.so")).unwrap();
    assert_eq!(via_lib.ino, via_hello.ino);
    fs::remove_file(store.path(&format!("{LIB}/libc.so"))).unwrap();
    // Found again through the name that is left.
    let file = view.open(via_lib.ino, Access::Read).unwrap();
    assert_eq!(file.size, 10_000);
}

#[test]
fn opens_read_only_regular_files() {
    let store = Store::new();
    let view = store.view(ViewOptions::default());
    let file = walk(&view, &format!("{HELLO}/bin/hello")).unwrap();
    assert_eq!(view.open(file.ino, Access::Write).unwrap_err(), Errno::ROFS);
    let opened = view.open(file.ino, Access::Read).unwrap();
    let mut text = String::new();
    std::io::Read::read_to_string(&mut fs::File::from(opened.fd), &mut text).unwrap();
    assert_eq!(text, "#!/bin/sh\necho hello\n");
    let dir = walk(&view, &format!("{HELLO}/bin")).unwrap();
    assert_eq!(view.open(dir.ino, Access::Read).unwrap_err(), Errno::ISDIR);
    let link = walk(&view, &format!("{HELLO}/share/link")).unwrap();
    assert_eq!(view.readlink(link.ino).unwrap(), b"../bin/hello");
    assert_eq!(
        view.open(link.ino, Access::Read).unwrap_err(),
        Errno::ACCESS
    );
    assert_eq!(Access::of_flags(libc::O_RDONLY), Access::Read);
    assert_eq!(Access::of_flags(libc::O_RDWR), Access::Write);
    assert_eq!(
        Access::of_flags(libc::O_RDONLY | libc::O_TRUNC),
        Access::Write
    );
}

#[test]
fn a_file_changed_since_it_was_reported_is_refused() {
    let store = Store::new();
    let view = store.view(ViewOptions::default());
    let file = walk(&view, &format!("{HELLO}/share/doc/README")).unwrap();
    // Changed in place: the same inode, another size.
    fs::write(
        store.path(&format!("{HELLO}/share/doc/README")),
        b"longer than before\n",
    )
    .unwrap();
    assert_eq!(view.open(file.ino, Access::Read).unwrap_err(), Errno::IO);
    // Reported again (a fresh lookup), it opens.
    walk(&view, &format!("{HELLO}/share/doc/README")).unwrap();
    assert!(view.open(file.ino, Access::Read).is_ok());
}

#[test]
fn a_replaced_object_is_stale_never_followed() {
    let store = Store::new();
    let view = store.view(ViewOptions::default());
    let doc = walk(&view, &format!("{HELLO}/share/doc")).unwrap();
    let readme = walk(&view, &format!("{HELLO}/share/doc/README")).unwrap();
    // The directory swapped for a symlink to the path outside the closure.
    let doc_path = store.path(&format!("{HELLO}/share/doc"));
    fs::rename(&doc_path, store.path(&format!("{HELLO}/share/old-doc"))).unwrap();
    symlink(store.path(OUTSIDE), &doc_path).unwrap();
    assert_eq!(view.getattr(doc.ino).unwrap_err(), Errno::STALE);
    assert!(view.open(readme.ino, Access::Read).is_err());
    assert_eq!(
        view.lookup(doc.ino, name("secret")).unwrap_err(),
        Errno::NOENT
    );
    let listed = view.list(doc.ino);
    assert!(listed.is_err() || listed.unwrap().iter().all(|e| e.name != "secret"));
    // A file replaced by another one under the same name.
    let hello = walk(&view, &format!("{HELLO}/bin/hello")).unwrap();
    let path = store.path(&format!("{HELLO}/bin/hello"));
    fs::remove_file(&path).unwrap();
    fs::write(&path, b"another file").unwrap();
    assert_eq!(view.getattr(hello.ino).unwrap_err(), Errno::STALE);
}

#[test]
fn a_moved_directory_stops_being_served_from_its_cached_descriptor() {
    let store = Store::new();
    let view = store.view(ViewOptions::default());
    let bin = walk(&view, &format!("{HELLO}/bin")).unwrap();
    view.list(bin.ino).unwrap();
    // Moved out of the closure, where it is no longer the closure's.
    fs::rename(
        store.path(&format!("{HELLO}/bin")),
        store.path(&format!("{OUTSIDE}/bin")),
    )
    .unwrap();
    assert!(view.lookup(bin.ino, name("hello")).is_err());
    assert!(view.getattr(bin.ino).is_err());
}

#[test]
fn a_store_path_replaced_since_startup_is_refused() {
    let store = Store::new();
    let view = store.view(ViewOptions::default());
    fs::rename(store.path(LIB), store.path("old-lib")).unwrap();
    fs::create_dir(store.path(LIB)).unwrap();
    assert_eq!(view.lookup(ROOT_ID, name(LIB)).unwrap_err(), Errno::NOENT);
}

#[test]
fn missing_paths_are_refused_or_left_out() {
    let store = Store::new();
    let text = format!(
        "{}\n{}\n",
        store.path(HELLO).display(),
        store
            .path("3c6kzph7l0dcbn2zfdv7bvl4i4krx3wr-gone")
            .display()
    );
    let closure = Closure::parse(text.as_bytes(), "closure.txt", &store.dir).unwrap();
    let err = View::new(&closure, false, ViewOptions::default()).unwrap_err();
    assert!(
        err.to_string()
            .contains("closure.txt: 1 closure path is missing"),
        "{err}"
    );
    let (view, setup) = View::new(&closure, true, ViewOptions::default()).unwrap();
    assert_eq!(setup.missing.len(), 1);
    assert_eq!(view.path_count(), 1);
}

#[test]
fn directory_descriptors_stay_within_the_cache() {
    let store = Store::new();
    for i in 0..50 {
        fs::create_dir_all(store.path(&format!("{HELLO}/many/d{i:02}/inner"))).unwrap();
    }
    let view = store.view(ViewOptions {
        max_cached_dirs: 8,
        ..ViewOptions::default()
    });
    for i in 0..50 {
        walk(&view, &format!("{HELLO}/many/d{i:02}/inner")).unwrap();
    }
    assert!(
        view.cached_dir_count() <= 8,
        "{} cached",
        view.cached_dir_count()
    );
    // Everything still resolves, reopened from the store.
    for i in 0..50 {
        let d = walk(&view, &format!("{HELLO}/many/d{i:02}")).unwrap();
        assert!(view.list(d.ino).unwrap().iter().any(|e| e.name == "inner"));
    }
}

/// The closure of `paths` of `store`, for updates.
fn closure_of(store: &Store, paths: &[&str]) -> Closure {
    let text: String = paths
        .iter()
        .map(|p| format!("{}\n", store.path(p).display()))
        .collect();
    Closure::parse(text.as_bytes(), "update", &store.dir).unwrap()
}

fn listed(view: &View) -> Vec<String> {
    view.list(ROOT_ID)
        .unwrap()
        .iter()
        .map(|e| e.name.to_string_lossy().into_owned())
        .collect()
}

#[test]
fn an_added_closure_is_listed_and_found_at_once() {
    let store = Store::new();
    let view = store.view(ViewOptions::default());
    let before = view.getattr(ROOT_ID).unwrap();
    assert_eq!(view.lookup(ROOT_ID, name(OUTSIDE)), Err(Errno::NOENT));
    let updated = view
        .update(
            &closure_of(&store, &[OUTSIDE]),
            Change::Add,
            Missing::Refuse,
        )
        .unwrap();
    assert_eq!(updated.added, [OUTSIDE]);
    assert!(updated.removed.is_empty() && updated.retiring.is_empty());
    assert_eq!(updated.listed, 3);
    assert_eq!(listed(&view), [HELLO, LIB, OUTSIDE]);
    let secret = walk(&view, &format!("{OUTSIDE}/secret")).unwrap();
    assert_eq!(secret.size, 6);
    // The root's times move on, so a client that cached its listing reads it again.
    let after = view.getattr(ROOT_ID).unwrap();
    assert!(after.mtime.secs > before.mtime.secs);
    assert_eq!(after.nlink, before.nlink + 1);
    let mut served = view.served_paths();
    served.sort();
    assert_eq!(served, [HELLO, LIB, OUTSIDE]);
}

#[test]
fn a_replaced_path_nobody_holds_is_gone_at_once() {
    let store = Store::new();
    let view = store.view(ViewOptions::default());
    // Looked up and forgotten: its record is kept for file handles, but nobody holds it.
    let lib = walk(&view, &format!("{LIB}/libc.so")).unwrap().ino;
    view.forget_all();
    let updated = view
        .update(
            &closure_of(&store, &[HELLO, OUTSIDE]),
            Change::Replace(Removal::WhenReleased),
            Missing::Refuse,
        )
        .unwrap();
    assert_eq!(updated.removed, [LIB]);
    assert!(updated.retiring.is_empty());
    assert_eq!(listed(&view), [HELLO, OUTSIDE]);
    assert_eq!(view.lookup(ROOT_ID, name(LIB)), Err(Errno::NOENT));
    // A file handle naming a node below the path that left is stale, not served.
    assert_eq!(view.lookup(lib, name(".")), Err(Errno::STALE));
    assert_eq!(view.served_paths().len(), 2);
}

#[test]
fn a_held_path_retires_until_released() {
    let store = Store::new();
    let view = store.view(ViewOptions::default());
    let bin = walk(&view, &format!("{HELLO}/bin")).unwrap().ino;
    let updated = view
        .update(
            &closure_of(&store, &[LIB]),
            Change::Replace(Removal::WhenReleased),
            Missing::Refuse,
        )
        .unwrap();
    assert_eq!(updated.retiring, [HELLO]);
    assert!(updated.removed.is_empty());
    // Gone from the root: not listed, not found by a new lookup...
    assert_eq!(listed(&view), [LIB]);
    assert_eq!(view.lookup(ROOT_ID, name(HELLO)), Err(Errno::NOENT));
    // ... but what the client holds keeps working, below it too.
    assert_eq!(view.lookup(bin, name("hello")).unwrap().size, 21);
    let file = view.lookup(bin, name("hello")).unwrap().ino;
    assert_eq!(view.open(file, Access::Read).unwrap().size, 21);
    // Still rooted while held.
    let mut served = view.served_paths();
    served.sort();
    assert_eq!(served, [HELLO, LIB]);
    assert!(!view.take_released());
    view.forget_all();
    assert!(
        view.take_released(),
        "letting go releases the retiring path"
    );
    assert_eq!(view.served_paths(), [LIB]);
    assert_eq!(view.retiring_count(), 0);
    assert_eq!(view.lookup(bin, name(".")), Err(Errno::STALE));
}

#[test]
fn a_pruned_path_is_gone_even_while_held() {
    let store = Store::new();
    let view = store.view(ViewOptions::default());
    let hello = walk(&view, HELLO).unwrap().ino;
    let doc = walk(&view, &format!("{HELLO}/share/doc")).unwrap().ino;
    view.list(doc).unwrap();
    let updated = view
        .update(
            &closure_of(&store, &[LIB]),
            Change::Replace(Removal::Now),
            Missing::Refuse,
        )
        .unwrap();
    assert_eq!(updated.removed, [HELLO]);
    assert_eq!(view.served_paths(), [LIB]);
    for (node, what) in [(hello, "bin"), (doc, "README")] {
        assert_eq!(view.lookup(node, name(what)), Err(Errno::NOENT), "{what}");
    }
    assert_eq!(view.getattr(doc), Err(Errno::STALE));
    assert_eq!(
        view.list(doc).err(),
        Some(Errno::STALE),
        "no listing kept from before"
    );
}

#[test]
fn a_bad_update_changes_nothing() {
    let store = Store::new();
    let view = store.view(ViewOptions::default());
    let before = view.getattr(ROOT_ID).unwrap();
    let absent = "3c6kzph7l0dcbn2zfdv7bvl4i4krx3wr-absent";
    let err = view
        .update(
            &closure_of(&store, &[OUTSIDE, absent]),
            Change::Replace(Removal::Now),
            Missing::Refuse,
        )
        .unwrap_err();
    assert!(matches!(err, ViewError::Missing { .. }), "{err}");
    assert!(err.to_string().contains(absent), "{err}");
    let other = Closure::parse(
        b"/elsewhere/store/0c6kzph7l0dcbn2zfdv7bvl4i4krx3wr-hello\n",
        "other",
        Path::new("/elsewhere/store"),
    )
    .unwrap();
    let err = view
        .update(&other, Change::Add, Missing::Refuse)
        .unwrap_err();
    assert!(matches!(err, ViewError::OtherStore { .. }), "{err}");
    assert_eq!(listed(&view), [HELLO, LIB]);
    assert_eq!(view.getattr(ROOT_ID).unwrap(), before);
    assert!(walk(&view, &format!("{HELLO}/bin/hello")).is_ok());
    // Left out when asked, as at startup.
    let updated = view
        .update(
            &closure_of(&store, &[OUTSIDE, absent]),
            Change::Add,
            Missing::LeaveOut,
        )
        .unwrap();
    assert_eq!(updated.missing.len(), 1);
    assert_eq!(listed(&view), [HELLO, LIB, OUTSIDE]);
}

#[test]
fn a_retiring_path_added_again_is_served_again() {
    let store = Store::new();
    let view = store.view(ViewOptions::default());
    walk(&view, HELLO).unwrap();
    view.update(
        &closure_of(&store, &[LIB]),
        Change::Replace(Removal::WhenReleased),
        Missing::Refuse,
    )
    .unwrap();
    assert_eq!(view.retiring_count(), 1);
    view.update(&closure_of(&store, &[HELLO]), Change::Add, Missing::Refuse)
        .unwrap();
    assert_eq!(view.retiring_count(), 0);
    assert_eq!(listed(&view), [HELLO, LIB]);
    view.forget_all();
    assert!(!view.take_released(), "a listed path is not released");
    assert!(walk(&view, &format!("{HELLO}/bin/hello")).is_ok());
}

#[test]
fn what_is_held_below_a_retiring_path_is_listed_deepest_first() {
    let store = Store::new();
    let view = store.view(ViewOptions::default());
    let hello = walk(&view, HELLO).unwrap().ino;
    let bin = walk(&view, &format!("{HELLO}/bin")).unwrap().ino;
    walk(&view, &format!("{HELLO}/bin/hello")).unwrap();
    walk(&view, &format!("{LIB}/libc.so")).unwrap();
    assert!(view.held_below_retiring().is_empty(), "nothing retires yet");
    view.update(
        &closure_of(&store, &[LIB]),
        Change::Replace(Removal::WhenReleased),
        Missing::Refuse,
    )
    .unwrap();
    let held = view.held_below_retiring();
    assert_eq!(
        held,
        [
            (bin, OsStr::new("hello").to_owned()),
            (hello, OsStr::new("bin").to_owned()),
            (ROOT_ID, OsStr::new(HELLO).to_owned()),
        ]
    );
}

#[test]
fn a_request_proves_a_directory_once_and_the_next_request_again() {
    let store = Store::new();
    let view = store.view(ViewOptions::default());
    let doc = walk(&view, &format!("{HELLO}/share/doc")).unwrap().ino;
    // A listing's entries, all within one request: served from the directory proved once.
    view.request(|| {
        for _ in 0..3 {
            assert_eq!(view.lookup(doc, name("README")).unwrap().size, 8);
        }
        assert!(view.getattr(doc).is_ok());
    });
    // Moved out between requests: the next request proves it again, and refuses it.
    let doc_path = store.path(&format!("{HELLO}/share/doc"));
    fs::rename(&doc_path, store.dir.join("moved-doc")).unwrap();
    fs::write(store.dir.join("moved-doc/planted"), b"planted").unwrap();
    let planted = view.request(|| view.lookup(doc, name("planted")));
    assert!(
        matches!(planted, Err(Errno::NOENT) | Err(Errno::STALE)),
        "{planted:?}"
    );
    assert_eq!(view.request(|| view.getattr(doc)), Err(Errno::STALE));
}
