//! The closure parser on arbitrary bytes: it must return a closure or an error naming the
//! input, never panic; every path it accepts is a valid store path below the store dir.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use nixstorefs::closure::Closure;
use nixstorefs::store_path::StorePath;

fuzz_target!(|data: &[u8]| {
    let store = Path::new("/nix/store");
    match Closure::parse(data, "fuzz", store) {
        Ok(closure) => {
            assert!(!closure.paths.is_empty());
            assert!(closure.paths.windows(2).all(|w| w[0] < w[1]));
            for p in &closure.paths {
                assert_eq!(StorePath::new(p.base_name()).as_ref(), Ok(p));
            }
        }
        Err(e) => assert!(e.to_string().starts_with("fuzz")),
    }
});
