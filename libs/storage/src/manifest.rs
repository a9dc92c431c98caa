//! A version's manifest and its id.
//!
//! The id is the lowercase hex SHA-256 of the files in byte order of their
//! paths, each written as `path NUL size NUL sha256-hex LF` (size in decimal).
//! A symbolic link is a file whose content is its target, written with the
//! target after one more NUL: `path NUL size NUL sha256-hex NUL target LF`.
//! Paths and targets hold no control characters ([`crate::paths`]), so the
//! encoding is unambiguous: two manifests have the same id exactly when they
//! list the same files with the same sizes and contents (and links).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::paths::{self, PathError};

/// One file of a version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub path: String,
    pub size: u64,
    /// SHA-256 of the content, lowercase hex.
    pub sha256: String,
    /// A symbolic link's target (its content, as `size` and `sha256` say),
    /// stored as it is and never followed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link: Option<String>,
}

impl FileEntry {
    /// The entry of a symbolic link to `target`.
    pub fn symlink(path: impl Into<String>, target: &str) -> FileEntry {
        FileEntry {
            path: path.into(),
            size: target.len() as u64,
            sha256: hex::encode(Sha256::digest(target.as_bytes())),
            link: Some(target.to_owned()),
        }
    }
}

/// Whether `s` is a SHA-256 as manifests write it: 64 lowercase hex.
pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// What one version may hold (each configurable by the operator).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_file_bytes: u64,
    pub max_total_bytes: u64,
    pub max_files: usize,
    /// Longest path, in bytes (at most [`paths::MAX_PATH_BYTES`]).
    pub max_path_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_file_bytes: 5 << 30,
            max_total_bytes: 20 << 30,
            max_files: 100_000,
            max_path_bytes: paths::MAX_PATH_BYTES,
        }
    }
}

/// Why a list of files is not a version.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    #[error("file {index} ({path:?}): {why}")]
    Path {
        index: usize,
        path: String,
        why: PathError,
    },
    #[error("file {path:?} is listed twice")]
    Duplicate { path: String },
    #[error("{path:?} is both a file and the directory of {under:?}")]
    FileAndDirectory { path: String, under: String },
    #[error("file {path:?}: sha256 must be 64 lowercase hex characters")]
    BadDigest { index: usize, path: String },
    #[error(
        "link {path:?}: its target is empty, has a control character, or is not what size and sha256 say"
    )]
    BadLink { index: usize, path: String },
    #[error("file {index}: its path is {len} bytes long, more than {max}")]
    PathTooLong {
        index: usize,
        len: usize,
        max: usize,
    },
    #[error("{count} files, more than {max}")]
    TooManyFiles { count: usize, max: usize },
    #[error("file {path:?} is {size} bytes, more than {max}")]
    FileTooLarge {
        /// Its place in the list given (or the order found).
        index: usize,
        path: String,
        size: u64,
        max: u64,
    },
    #[error("the files add up to {size} bytes, more than {max}")]
    TotalTooLarge { size: u64, max: u64 },
}

impl ManifestError {
    /// The file the error is about, by its place in the list (none when it is
    /// about the list as a whole: duplicates, a file that is a directory, totals).
    pub fn index(&self) -> Option<usize> {
        match self {
            ManifestError::Path { index, .. }
            | ManifestError::PathTooLong { index, .. }
            | ManifestError::BadDigest { index, .. }
            | ManifestError::BadLink { index, .. }
            | ManifestError::FileTooLarge { index, .. } => Some(*index),
            _ => None,
        }
    }

    /// Whether the error is a size past a limit (`413` rather than `400`).
    pub fn is_too_large(&self) -> bool {
        matches!(
            self,
            ManifestError::TooManyFiles { .. }
                | ManifestError::FileTooLarge { .. }
                | ManifestError::TotalTooLarge { .. }
        )
    }
}

/// The files of a version, checked and in path order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Manifest {
    files: Vec<FileEntry>,
}

impl Manifest {
    /// Checks every path, digest and limit; refuses duplicates and a path that
    /// is a file and a directory at once.
    pub fn new(files: Vec<FileEntry>, limits: &Limits) -> Result<Manifest, ManifestError> {
        if files.len() > limits.max_files {
            return Err(ManifestError::TooManyFiles {
                count: files.len(),
                max: limits.max_files,
            });
        }
        let mut total: u64 = 0;
        let mut by_path: BTreeMap<String, FileEntry> = BTreeMap::new();
        for (index, f) in files.into_iter().enumerate() {
            paths::check(&f.path).map_err(|why| ManifestError::Path {
                index,
                path: f.path.clone(),
                why,
            })?;
            if f.path.len() > limits.max_path_bytes {
                return Err(ManifestError::PathTooLong {
                    index,
                    len: f.path.len(),
                    max: limits.max_path_bytes,
                });
            }
            if !is_sha256_hex(&f.sha256) {
                return Err(ManifestError::BadDigest {
                    index,
                    path: f.path,
                });
            }
            if let Some(target) = &f.link
                && (target.is_empty()
                    || target.contains(char::is_control)
                    || FileEntry::symlink(&f.path, target) != f)
            {
                return Err(ManifestError::BadLink {
                    index,
                    path: f.path,
                });
            }
            if f.size > limits.max_file_bytes {
                return Err(ManifestError::FileTooLarge {
                    index,
                    path: f.path,
                    size: f.size,
                    max: limits.max_file_bytes,
                });
            }
            total = total.saturating_add(f.size);
            if total > limits.max_total_bytes {
                return Err(ManifestError::TotalTooLarge {
                    size: total,
                    max: limits.max_total_bytes,
                });
            }
            if by_path.contains_key(&f.path) {
                return Err(ManifestError::Duplicate { path: f.path });
            }
            by_path.insert(f.path.clone(), f);
        }
        // In byte order, a file's descendants (`a/...`) would follow it at
        // once but for names such as `a.b` or `a-b` (`.` and `-` sort before
        // `/`): look up each file's directories instead.
        for path in by_path.keys() {
            let mut dir = path.as_str();
            while let Some((parent, _)) = dir.rsplit_once('/') {
                if by_path.contains_key(parent) {
                    return Err(ManifestError::FileAndDirectory {
                        path: parent.to_owned(),
                        under: path.clone(),
                    });
                }
                dir = parent;
            }
        }
        Ok(Manifest {
            files: by_path.into_values().collect(),
        })
    }

    pub fn files(&self) -> &[FileEntry] {
        &self.files
    }

    pub fn total_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }

    /// The version's id: see the module doc.
    pub fn version_id(&self) -> VersionId {
        let mut h = Sha256::new();
        for f in &self.files {
            h.update(f.path.as_bytes());
            h.update([0]);
            h.update(f.size.to_string().as_bytes());
            h.update([0]);
            h.update(f.sha256.as_bytes());
            if let Some(target) = &f.link {
                h.update([0]);
                h.update(target.as_bytes());
            }
            h.update([b'\n']);
        }
        VersionId(hex::encode(h.finalize()))
    }
}

/// A version's id: 64 lowercase hex characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct VersionId(String);

impl VersionId {
    pub fn parse(s: &str) -> Option<VersionId> {
        (s.len() == 64 && is_lower_hex(s)).then(|| VersionId(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn starts_with(&self, prefix: &VersionPrefix) -> bool {
        self.0.starts_with(prefix.as_str())
    }
}

impl std::fmt::Display for VersionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for VersionId {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        VersionId::parse(&s).ok_or_else(|| "a version id is 64 lowercase hex characters".into())
    }
}

impl From<VersionId> for String {
    fn from(v: VersionId) -> String {
        v.0
    }
}

/// How a client names a version: its id or a prefix of at least 8 of its
/// characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionPrefix(String);

impl VersionPrefix {
    pub const MIN_LEN: usize = 8;

    pub fn parse(s: &str) -> Option<VersionPrefix> {
        ((Self::MIN_LEN..=64).contains(&s.len()) && is_lower_hex(s))
            .then(|| VersionPrefix(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn is_lower_hex(s: &str) -> bool {
    s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha(content: &[u8]) -> String {
        hex::encode(Sha256::digest(content))
    }

    fn file(path: &str, content: &[u8]) -> FileEntry {
        FileEntry {
            path: path.into(),
            size: content.len() as u64,
            sha256: sha(content),
            link: None,
        }
    }

    #[test]
    fn the_id_is_the_documented_hash() {
        let m = Manifest::new(
            vec![file("b/c.txt", b"hello\n"), file("a", b"")],
            &Limits::default(),
        )
        .unwrap();
        // Written out by hand as the module doc says, in path order.
        let text = format!(
            "a\x000\x00{}\nb/c.txt\x006\x00{}\n",
            sha(b""),
            sha(b"hello\n")
        );
        assert_eq!(m.version_id().as_str(), sha(text.as_bytes()));
        // Also against a constant, computed with printf 'a\x000\x00<sha>\n...' | sha256sum.
        assert_eq!(
            m.version_id().as_str(),
            "85ade63054c6f93c3caf49e7a907e0b3580a3deaf65bfce177a674d9f7c79fe0"
        );
    }

    #[test]
    fn same_files_same_id_whatever_their_order() {
        let a = Manifest::new(vec![file("x", b"1"), file("y", b"2")], &Limits::default());
        let b = Manifest::new(vec![file("y", b"2"), file("x", b"1")], &Limits::default());
        assert_eq!(a.unwrap().version_id(), b.unwrap().version_id());
        let renamed = Manifest::new(vec![file("x", b"1"), file("z", b"2")], &Limits::default());
        let changed = Manifest::new(vec![file("x", b"1"), file("y", b"3")], &Limits::default());
        let first = Manifest::new(vec![file("x", b"1"), file("y", b"2")], &Limits::default())
            .unwrap()
            .version_id();
        assert_ne!(renamed.unwrap().version_id(), first);
        assert_ne!(changed.unwrap().version_id(), first);
        let empty = Manifest::new(vec![], &Limits::default()).unwrap();
        assert_eq!(empty.version_id().as_str(), sha(b""));
    }

    #[test]
    fn hostile_lists_are_refused() {
        let l = Limits::default();
        let err = |files: Vec<FileEntry>| Manifest::new(files, &l).unwrap_err();
        assert!(matches!(
            err(vec![file("ok", b""), file("../x", b"")]),
            ManifestError::Path { index: 1, .. }
        ));
        assert_eq!(
            err(vec![file("a", b"1"), file("a", b"2")]),
            ManifestError::Duplicate { path: "a".into() }
        );
        for (f, under) in [("a", "a/b"), ("a/b", "a/b/c/d")] {
            assert_eq!(
                err(vec![file(under, b""), file("a.b", b""), file(f, b"")]),
                ManifestError::FileAndDirectory {
                    path: f.into(),
                    under: under.into()
                },
                "{f} {under}"
            );
        }
        let mut bad = file("a", b"");
        bad.sha256 = bad.sha256.to_uppercase();
        assert!(matches!(err(vec![bad]), ManifestError::BadDigest { .. }));
    }

    #[test]
    fn limits_are_kept_and_said() {
        let l = Limits {
            max_file_bytes: 10,
            max_total_bytes: 15,
            max_files: 2,
            ..Limits::default()
        };
        let big = FileEntry {
            size: 11,
            ..file("big", b"")
        };
        let e = Manifest::new(vec![big], &l).unwrap_err();
        assert!(e.is_too_large() && matches!(e, ManifestError::FileTooLarge { size: 11, .. }));
        let nine = FileEntry {
            size: 9,
            ..file("a", b"")
        };
        let e = Manifest::new(
            vec![
                nine.clone(),
                FileEntry {
                    path: "b".into(),
                    ..nine
                },
            ],
            &l,
        )
        .unwrap_err();
        assert!(matches!(
            e,
            ManifestError::TotalTooLarge { size: 18, max: 15 }
        ));
        let e =
            Manifest::new(vec![file("a", b""), file("b", b""), file("c", b"")], &l).unwrap_err();
        assert!(matches!(
            e,
            ManifestError::TooManyFiles { count: 3, max: 2 }
        ));
        assert!(!ManifestError::Duplicate { path: "a".into() }.is_too_large());
    }

    #[test]
    fn a_link_is_not_the_file_of_its_target() {
        let l = Limits::default();
        let as_file = Manifest::new(vec![file("a", b"../b")], &l).unwrap();
        let as_link = Manifest::new(vec![FileEntry::symlink("a", "../b")], &l).unwrap();
        assert_ne!(as_file.version_id(), as_link.version_id());
        let text = format!("a\x004\x00{}\x00../b\n", sha(b"../b"));
        assert_eq!(as_link.version_id().as_str(), sha(text.as_bytes()));
        let mut lying = FileEntry::symlink("a", "../b");
        lying.link = Some("/etc".into());
        assert!(matches!(
            Manifest::new(vec![lying], &l),
            Err(ManifestError::BadLink { .. })
        ));
        assert!(matches!(
            Manifest::new(vec![FileEntry::symlink("a", "x\ny")], &l),
            Err(ManifestError::BadLink { .. })
        ));
    }

    #[test]
    fn ids_and_prefixes_parse_strictly() {
        let id = "ab".repeat(32);
        assert!(VersionId::parse(&id).is_some());
        assert!(VersionId::parse(&id[..63]).is_none());
        assert!(VersionId::parse(&id.to_uppercase()).is_none());
        let full = VersionId::parse(&id).unwrap();
        assert!(full.starts_with(&VersionPrefix::parse("abababab").unwrap()));
        assert!(!full.starts_with(&VersionPrefix::parse("abababac").unwrap()));
        assert!(VersionPrefix::parse("abababa").is_none(), "7 characters");
        assert!(VersionPrefix::parse("abababag").is_none());
        let json: Result<VersionId, _> = serde_json::from_str("\"nope\"");
        assert!(json.is_err());
    }
}
