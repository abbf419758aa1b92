//! Text key=value lists (RFC 7143 6): parsing with bounds, encoding.

/// Most keys accepted in one text or login exchange.
pub const MAX_KEYS: usize = 256;
/// Longest accepted accumulated text (login and text continuation).
pub const MAX_TEXT: usize = 64 * 1024;

/// Parses NUL-separated `key=value` pairs. Malformed entries (no `=`, non-UTF-8) are
/// returned with an empty key so the caller can reject them.
pub fn parse(data: &[u8]) -> Vec<(String, String)> {
    data.split(|&b| b == 0)
        .filter(|s| !s.is_empty())
        .take(MAX_KEYS)
        .map(|s| {
            let s = String::from_utf8_lossy(s);
            match s.split_once('=') {
                Some((k, v)) => (k.to_string(), v.to_string()),
                None => (String::new(), s.to_string()),
            }
        })
        .collect()
}

/// Encodes pairs as `key=value\0...`.
pub fn encode(pairs: &[(String, String)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in pairs {
        out.extend_from_slice(k.as_bytes());
        out.push(b'=');
        out.extend_from_slice(v.as_bytes());
        out.push(0);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip() {
        let p = vec![
            ("A".to_string(), "1".to_string()),
            ("B".into(), "x=y".into()),
        ];
        assert_eq!(parse(&encode(&p)), p);
        assert_eq!(parse(b"junk\0"), vec![(String::new(), "junk".into())]);
    }
}
