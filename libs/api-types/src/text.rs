//! Text that tenants produce (a run's output, log lines, error messages), made
//! storable on every database: NUL, which PostgreSQL's `text` refuses, becomes
//! U+FFFD, the replacement character that invalid UTF-8 also becomes where bytes
//! are turned into text. One tenant's bytes can then never fail another's batch.

use std::borrow::Cow;

/// `s` with every NUL replaced by U+FFFD (borrowed when there is none).
pub fn storable(s: &str) -> Cow<'_, str> {
    if s.contains('\0') {
        Cow::Owned(s.replace('\0', "\u{fffd}"))
    } else {
        Cow::Borrowed(s)
    }
}

/// Bytes as storable text: invalid UTF-8 and NUL become U+FFFD.
pub fn storable_bytes(bytes: &[u8]) -> String {
    storable(&String::from_utf8_lossy(bytes)).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nul_and_invalid_utf8_become_the_replacement_character() {
        assert_eq!(storable("a\0b"), "a\u{fffd}b");
        assert!(matches!(storable("plain"), Cow::Borrowed(_)));
        assert_eq!(storable_bytes(b"x\xff\0y"), "x\u{fffd}\u{fffd}y");
    }
}
