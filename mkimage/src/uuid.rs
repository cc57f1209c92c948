//! The volume UUID: given with `-U`, or derived from the closure.

use sha2::{Digest, Sha256};

/// A UUID derived from the names at the root of the tree (for a closure, its store paths,
/// whose hashes stand for their contents): an image of the same closure always gets the
/// same UUID, images of different closures get different ones, so two of them attached to
/// one machine are still told apart. Version 8 (RFC 9562: derived by the application), from
/// SHA-256 of the sorted names.
pub fn derived_uuid<'a>(names: impl IntoIterator<Item = &'a [u8]>) -> [u8; 16] {
    let mut names: Vec<&[u8]> = names.into_iter().collect();
    names.sort_unstable();
    let mut hash = Sha256::new();
    hash.update(b"mkimage volume uuid of root names\0");
    for name in names {
        hash.update(name);
        // Names hold no NUL, so this keeps ["ab"] and ["a", "b"] apart.
        hash.update(b"\0");
    }
    let digest = hash.finalize();
    let mut uuid = [0u8; 16];
    uuid.copy_from_slice(&digest[..16]);
    uuid[6] = (uuid[6] & 0x0f) | 0x80;
    uuid[8] = (uuid[8] & 0x3f) | 0x80;
    uuid
}

/// Parses a UUID written as 32 hex digits, with or without the usual dashes.
pub fn parse_uuid(text: &str) -> Result<[u8; 16], String> {
    let digits: Vec<u8> = text.bytes().filter(|&b| b != b'-').collect();
    if digits.len() != 32 {
        return Err(format!(
            "a UUID has 32 hexadecimal digits, this has {}",
            digits.len()
        ));
    }
    let dashes: Vec<usize> = text.match_indices('-').map(|(i, _)| i).collect();
    if !dashes.is_empty() && dashes != [8, 13, 18, 23] {
        return Err("dashes go at the usual places (8-4-4-4-12)".into());
    }
    let mut uuid = [0u8; 16];
    for (i, pair) in digits.chunks(2).enumerate() {
        let pair = std::str::from_utf8(pair).map_err(|_| "not hexadecimal".to_string())?;
        uuid[i] =
            u8::from_str_radix(pair, 16).map_err(|_| format!("`{pair}` is not hexadecimal"))?;
    }
    Ok(uuid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_dashed_and_plain() {
        let a = parse_uuid("8f1b6c3e-2a4d-4e5f-9a7b-0c1d2e3f4a5b").unwrap();
        let b = parse_uuid("8f1b6c3e2a4d4e5f9a7b0c1d2e3f4a5b").unwrap();
        assert_eq!(a, b);
        assert_eq!(a[0], 0x8f);
        assert_eq!(a[15], 0x5b);
    }

    #[test]
    fn derived_uuids_follow_the_names() {
        let a = derived_uuid([b"aaa-x".as_slice(), b"bbb-y".as_slice()]);
        assert_eq!(a, derived_uuid([b"bbb-y".as_slice(), b"aaa-x".as_slice()]));
        assert_ne!(a, derived_uuid([b"aaa-x".as_slice()]));
        assert_ne!(
            derived_uuid([b"ab".as_slice()]),
            derived_uuid([b"a".as_slice(), b"b".as_slice()])
        );
        // Version 8, RFC variant.
        assert_eq!(a[6] >> 4, 8);
        assert_eq!(a[8] >> 6, 0b10);
    }

    #[test]
    fn rejects_bad_uuids() {
        assert!(parse_uuid("8f1b").is_err());
        assert!(parse_uuid("zz1b6c3e-2a4d-4e5f-9a7b-0c1d2e3f4a5b").is_err());
        assert!(parse_uuid("8f1b6c3e2-a4d-4e5f-9a7b-0c1d2e3f4a5b").is_err());
    }
}
