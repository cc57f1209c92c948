//! Parsing the volume UUID given with `-U`.

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
    fn rejects_bad_uuids() {
        assert!(parse_uuid("8f1b").is_err());
        assert!(parse_uuid("zz1b6c3e-2a4d-4e5f-9a7b-0c1d2e3f4a5b").is_err());
        assert!(parse_uuid("8f1b6c3e2-a4d-4e5f-9a7b-0c1d2e3f4a5b").is_err());
    }
}
