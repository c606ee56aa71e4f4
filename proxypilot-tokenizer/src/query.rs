//! Go's URL query unescaping, which the engine (userinfo) and sigv4 (the
//! canonical query) both need to match superfly/tokenizer byte for byte.

use zeroize::Zeroizing;

/// Go's url.QueryUnescape: `+` is a space, `%XX` a byte; a bad escape fails.
pub(crate) fn unescape(s: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
    let mut out = Zeroizing::new(Vec::with_capacity(s.len()));
    let mut i = 0;
    while i < s.len() {
        match s[i] {
            b'%' => {
                let hex = s.get(i + 1..i + 3)?;
                let v = u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?;
                if !hex.iter().all(u8::is_ascii_hexdigit) {
                    return None;
                }
                out.push(v);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_escapes_fail_as_in_go() {
        assert_eq!(unescape(b"p%40ss+word").unwrap().as_slice(), b"p@ss word");
        assert!(unescape(b"%zz").is_none());
        assert!(unescape(b"%4").is_none());
        assert!(unescape(b"%+1").is_none());
    }
}
