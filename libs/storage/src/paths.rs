//! The rules of a path inside a version: relative, `/`-separated, normal
//! components only, printable, bounded. A path that breaks one is refused
//! whole, never cleaned up: `a/../b` is not `b`.

/// Longest path, in bytes (Linux's `PATH_MAX`).
pub const MAX_PATH_BYTES: usize = 4096;
/// Longest component, in bytes (Linux's `NAME_MAX`).
pub const MAX_COMPONENT_BYTES: usize = 255;

/// Why a path is refused; the message names the rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the path is empty")]
    Empty,
    #[error("the path is absolute: paths are relative to the version's root")]
    Absolute,
    #[error("the path has a '{0}' component: only plain names are allowed")]
    DotComponent(&'static str),
    #[error("the path has an empty component (a doubled or trailing '/')")]
    EmptyComponent,
    #[error("the path has a control character (NUL, newline, ...) at byte {0}")]
    ControlCharacter(usize),
    #[error("the path is {0} bytes long, more than {MAX_PATH_BYTES}")]
    TooLong(usize),
    #[error("a component of the path is {0} bytes long, more than {MAX_COMPONENT_BYTES}")]
    ComponentTooLong(usize),
}

/// Checks `path` against the rules; returns its components.
pub fn check(path: &str) -> Result<Vec<&str>, PathError> {
    if path.is_empty() {
        return Err(PathError::Empty);
    }
    if path.len() > MAX_PATH_BYTES {
        return Err(PathError::TooLong(path.len()));
    }
    if let Some(at) = path.find(char::is_control) {
        return Err(PathError::ControlCharacter(at));
    }
    if path.starts_with('/') {
        return Err(PathError::Absolute);
    }
    let components: Vec<&str> = path.split('/').collect();
    for c in &components {
        match *c {
            "" => return Err(PathError::EmptyComponent),
            "." => return Err(PathError::DotComponent(".")),
            ".." => return Err(PathError::DotComponent("..")),
            c if c.len() > MAX_COMPONENT_BYTES => {
                return Err(PathError::ComponentTooLong(c.len()));
            }
            _ => {}
        }
    }
    Ok(components)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_relative_paths_pass() {
        for ok in [
            "a",
            "a/b/c.txt",
            ".hidden",
            "a/.b",
            "..x",
            "x..",
            "sp ace/ünï",
            "a\\b",
        ] {
            assert!(check(ok).is_ok(), "{ok:?}");
        }
        assert_eq!(check("a/b/c").unwrap(), ["a", "b", "c"]);
    }

    #[test]
    fn hostile_paths_are_refused_with_their_rule() {
        let long_component = "x".repeat(MAX_COMPONENT_BYTES + 1);
        let long_path = ["y"; 2100].join("/");
        let cases: Vec<(&str, PathError)> = vec![
            ("", PathError::Empty),
            ("/etc/passwd", PathError::Absolute),
            ("../escape", PathError::DotComponent("..")),
            ("a/../../b", PathError::DotComponent("..")),
            ("a/..", PathError::DotComponent("..")),
            ("./a", PathError::DotComponent(".")),
            ("a//b", PathError::EmptyComponent),
            ("a/", PathError::EmptyComponent),
            ("a\0b", PathError::ControlCharacter(1)),
            ("a\nb", PathError::ControlCharacter(1)),
            ("\u{7f}", PathError::ControlCharacter(0)),
            (
                &long_component,
                PathError::ComponentTooLong(MAX_COMPONENT_BYTES + 1),
            ),
            (&long_path, PathError::TooLong(long_path.len())),
        ];
        for (path, why) in cases {
            assert_eq!(check(path), Err(why), "{path:?}");
        }
    }
}
