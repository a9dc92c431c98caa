//! Every resource id is `<prefix>_<24 chars of [0-9a-z]>`. Ids are random, not
//! sequential: they reveal nothing about volume or order.

use rand::Rng;

use crate::FieldError;

/// The kinds of ids the API hands out, each with its prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdKind {
    Organization,
    Token,
    Agent,
    AgentVersion,
    Run,
    Session,
    Checkpoint,
    Volume,
    Artifact,
    StorageVersion,
    Upload,
    /// The storage of a session's state directory (not part of the public API).
    SessionState,
    Request,
    /// A worker's credential (not part of the public API).
    WorkerCredential,
}

impl IdKind {
    pub const fn prefix(self) -> &'static str {
        match self {
            IdKind::Organization => "org",
            IdKind::Token => "tok",
            IdKind::Agent => "ag",
            IdKind::AgentVersion => "ver",
            IdKind::Run => "run",
            IdKind::Session => "sess",
            IdKind::Checkpoint => "chk",
            IdKind::Volume => "vol",
            IdKind::Artifact => "art",
            IdKind::StorageVersion => "sv",
            IdKind::Upload => "upl",
            IdKind::SessionState => "sst",
            IdKind::Request => "req",
            IdKind::WorkerCredential => "wcr",
        }
    }

    /// What a person calls it, for error messages.
    pub const fn noun(self) -> &'static str {
        match self {
            IdKind::Organization => "organization",
            IdKind::Token => "token",
            IdKind::Agent => "agent",
            IdKind::AgentVersion => "agent version",
            IdKind::Run => "run",
            IdKind::Session => "session",
            IdKind::Checkpoint => "checkpoint",
            IdKind::Volume => "volume",
            IdKind::Artifact => "artifact",
            IdKind::StorageVersion => "version",
            IdKind::Upload => "upload session",
            IdKind::SessionState => "session state",
            IdKind::Request => "request",
            IdKind::WorkerCredential => "worker credential",
        }
    }
}

const ALPHABET: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
const RANDOM_LEN: usize = 24;
/// Longest suffix accepted on input (ids minted elsewhere may be longer than ours).
const MAX_SUFFIX_LEN: usize = 64;

/// A fresh random id of `kind` (about 124 bits of entropy).
pub fn new_id(kind: IdKind) -> String {
    let mut rng = rand::rng();
    let mut id = String::with_capacity(kind.prefix().len() + 1 + RANDOM_LEN);
    id.push_str(kind.prefix());
    id.push('_');
    for _ in 0..RANDOM_LEN {
        id.push(ALPHABET[rng.random_range(0..ALPHABET.len())] as char);
    }
    id
}

/// Whether `s` has the form of an id of `kind`.
pub fn is_id(kind: IdKind, s: &str) -> bool {
    let Some(rest) = s.strip_prefix(kind.prefix()) else {
        return false;
    };
    let Some(suffix) = rest.strip_prefix('_') else {
        return false;
    };
    !suffix.is_empty()
        && suffix.len() <= MAX_SUFFIX_LEN
        && suffix
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

/// The JSON Schema pattern of ids of `kind`: exactly what [`is_id`] accepts.
pub fn id_pattern(kind: IdKind) -> String {
    format!("^{}_[a-z0-9]{{1,{MAX_SUFFIX_LEN}}}$", kind.prefix())
}

/// Checks that `value`, given as request parameter `param`, is an id of `kind`.
pub fn check_id(kind: IdKind, param: &str, value: &str) -> Result<(), FieldError> {
    if is_id(kind, value) {
        Ok(())
    } else {
        Err(FieldError::invalid(
            param,
            format!(
                "'{}' is not a valid {} id (expected '{}_' followed by lowercase letters and digits)",
                truncate_for_message(value),
                kind.noun(),
                kind.prefix()
            ),
        ))
    }
}

/// Shortens user input echoed in an error message, so a huge value cannot bloat it.
pub fn truncate_for_message(value: &str) -> String {
    const MAX: usize = 80;
    if value.chars().count() <= MAX {
        value.to_owned()
    } else {
        let mut s: String = value.chars().take(MAX).collect();
        s.push('…');
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_ids_have_their_prefix_and_validate() {
        let id = new_id(IdKind::Run);
        assert!(id.starts_with("run_"));
        assert_eq!(id.len(), 4 + RANDOM_LEN);
        assert!(is_id(IdKind::Run, &id));
        assert!(!is_id(IdKind::Agent, &id));
        assert_ne!(new_id(IdKind::Run), id);
    }

    #[test]
    fn malformed_ids_are_rejected() {
        for bad in [
            "", "run_", "run", "run-abc", "run_ABC", "run_a b", "ag_abc", "run_é",
        ] {
            assert!(!is_id(IdKind::Run, bad), "{bad:?} accepted");
        }
        let long = format!("run_{}", "a".repeat(65));
        assert!(!is_id(IdKind::Run, &long));
        let err = check_id(IdKind::Run, "id", "nope").unwrap_err();
        assert_eq!(err.param, "id");
        assert!(err.message.contains("run_"));
    }
}
