//! Secret masking of output, line by line. Output is cut into lines before it is
//! masked, so a secret split across two reads is still found; a line longer than
//! [`MAX_LINE`] is emitted in pieces, keeping enough of its tail to catch a secret
//! that straddles the cut.

/// Longest piece of output emitted at once.
pub const MAX_LINE: usize = 8 * 1024;
/// Secrets shorter than this are not masked: masking every "ab" would mangle output
/// and a 2-character value protects nothing.
pub const MIN_SECRET_LEN: usize = 3;
pub const MASK: &str = "***";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    pub fn as_str(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

pub struct Masker {
    secrets: Vec<String>,
    keep: usize,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
}

impl Masker {
    pub fn new(secrets: impl IntoIterator<Item = String>) -> Masker {
        let mut secrets: Vec<String> = secrets
            .into_iter()
            .filter(|s| s.len() >= MIN_SECRET_LEN)
            .collect();
        // Longest first, so a secret containing another is masked whole.
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        secrets.dedup();
        let keep = secrets
            .iter()
            .map(String::len)
            .max()
            .unwrap_or(1)
            .saturating_sub(1);
        Masker {
            secrets,
            keep,
            stdout: Vec::new(),
            stderr: Vec::new(),
        }
    }

    /// Masks every secret in `text` (and makes it storable: no NUL).
    pub fn mask(&self, text: &str) -> String {
        let mut out = vm0_api_types::text::storable(text).into_owned();
        for s in &self.secrets {
            if out.contains(s.as_str()) {
                out = out.replace(s.as_str(), MASK);
            }
        }
        out
    }

    /// Adds output; returns the complete (masked) lines it finished.
    pub fn push(&mut self, stream: Stream, bytes: &[u8]) -> Vec<String> {
        let keep = self.keep;
        let buf = match stream {
            Stream::Stdout => &mut self.stdout,
            Stream::Stderr => &mut self.stderr,
        };
        buf.extend_from_slice(bytes);
        let mut pieces = Vec::new();
        while let Some(nl) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=nl).collect();
            pieces.push(line);
        }
        if buf.len() > MAX_LINE {
            let cut = buf.len() - keep;
            let head: Vec<u8> = buf.drain(..cut).collect();
            pieces.push(head);
        }
        pieces
            .into_iter()
            .map(|p| self.mask(&vm0_api_types::text::storable_bytes(&p)))
            .collect()
    }

    /// What is left in the buffers (output that did not end with a newline).
    pub fn flush(&mut self) -> Vec<(Stream, String)> {
        let mut out = Vec::new();
        for stream in [Stream::Stdout, Stream::Stderr] {
            let buf = match stream {
                Stream::Stdout => std::mem::take(&mut self.stdout),
                Stream::Stderr => std::mem::take(&mut self.stderr),
            };
            if !buf.is_empty() {
                out.push((
                    stream,
                    self.mask(&vm0_api_types::text::storable_bytes(&buf)),
                ));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_secrets_split_across_reads() {
        let mut m = Masker::new(["hunter2".to_owned(), "x".to_owned()]);
        assert!(m.push(Stream::Stdout, b"key=hun").is_empty());
        assert_eq!(
            m.push(Stream::Stdout, b"ter2 x\nnext"),
            vec!["key=*** x\n".to_owned()]
        );
        assert_eq!(m.flush(), vec![(Stream::Stdout, "next".to_owned())]);
    }

    #[test]
    fn long_lines_keep_a_tail_for_straddling_secrets() {
        let mut m = Masker::new(["supersecret".to_owned()]);
        let mut data = vec![b'a'; MAX_LINE - 3];
        data.extend_from_slice(b"super");
        let first = m.push(Stream::Stderr, &data);
        assert_eq!(first.len(), 1);
        let second = m.push(Stream::Stderr, b"secret\n");
        assert!(second[0].contains("***"), "{second:?}");
        assert!(!first[0].contains("super") || !second[0].contains("secret"));
    }

    #[test]
    fn output_is_made_storable() {
        let mut m = Masker::new([]);
        assert_eq!(
            m.push(Stream::Stdout, b"a\0b\xff\n"),
            vec!["a\u{fffd}b\u{fffd}\n".to_owned()]
        );
        assert_eq!(m.mask("x\0"), "x\u{fffd}");
    }

    #[test]
    fn longer_secrets_win() {
        let m = Masker::new(["abc".to_owned(), "abcdef".to_owned()]);
        assert_eq!(m.mask("abcdef abc"), "*** ***");
    }
}
