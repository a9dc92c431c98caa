//! Pagination cursors: opaque to clients, base64url of a small JSON record naming the
//! list they belong to (`scope`) and the sort key of the last item returned.
//!
//! A cursor from another list, another sort order, or one that was edited fails to
//! decode and is rejected as `invalid_parameter` rather than silently restarting.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::FieldError;

/// Items per page when `limit` is absent.
pub const DEFAULT_LIMIT: u64 = 20;
/// Largest accepted `limit`.
pub const MAX_LIMIT: u64 = 100;
/// Longest cursor accepted (ours are far shorter).
const MAX_CURSOR_LEN: usize = 512;

/// The position after which the next page starts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    /// Which list (and order) this cursor walks, e.g. `runs` or `logs:desc`.
    #[serde(rename = "s")]
    pub scope: String,
    /// Primary sort key of the last item (microseconds or a sequence number).
    #[serde(rename = "t")]
    pub key: i64,
    /// Tie-breaker of the last item (its id).
    #[serde(rename = "i")]
    pub id: String,
}

impl Cursor {
    pub fn encode(&self) -> String {
        // Serializing a struct of strings and integers cannot fail.
        let json = serde_json::to_vec(self).unwrap_or_default();
        URL_SAFE_NO_PAD.encode(json)
    }

    /// Decodes `raw`, the `cursor` query parameter, for the list `scope`.
    pub fn decode(raw: &str, scope: &str) -> Result<Cursor, FieldError> {
        let invalid = || {
            FieldError::invalid(
                "cursor",
                "cursor is not one this list returned; pass `pagination.nextCursor` unchanged",
            )
        };
        if raw.is_empty() || raw.len() > MAX_CURSOR_LEN {
            return Err(invalid());
        }
        let bytes = URL_SAFE_NO_PAD.decode(raw).map_err(|_| invalid())?;
        let cursor: Cursor = serde_json::from_slice(&bytes).map_err(|_| invalid())?;
        if cursor.scope != scope || cursor.id.len() > 128 {
            return Err(invalid());
        }
        Ok(cursor)
    }
}

/// Parses the `limit` query parameter: 1–100, default 20.
pub fn parse_limit(raw: Option<&str>) -> Result<u64, FieldError> {
    let Some(raw) = raw else {
        return Ok(DEFAULT_LIMIT);
    };
    match raw.parse::<u64>() {
        Ok(n) if (1..=MAX_LIMIT).contains(&n) => Ok(n),
        _ => Err(FieldError::invalid(
            "limit",
            format!("limit must be an integer from 1 to {MAX_LIMIT}"),
        )),
    }
}

/// `{hasMore, nextCursor}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Pagination {
    pub has_more: bool,
    pub next_cursor: Option<String>,
}

/// One page of a list: `{data, pagination}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Page<T> {
    pub data: Vec<T>,
    pub pagination: Pagination,
}

impl<T> Page<T> {
    /// Builds a page from up to `limit + 1` fetched items: the extra one only says
    /// that more exist. `key` gives the cursor of an item.
    pub fn from_overfetch(mut items: Vec<T>, limit: u64, key: impl Fn(&T) -> Cursor) -> Page<T> {
        let limit = usize::try_from(limit).unwrap_or(usize::MAX);
        let has_more = items.len() > limit;
        items.truncate(limit);
        let next_cursor = if has_more {
            items.last().map(|last| key(last).encode())
        } else {
            None
        };
        Page {
            data: items,
            pagination: Pagination {
                has_more,
                next_cursor,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_round_trips_and_rejects_forgeries() {
        let c = Cursor {
            scope: "runs".into(),
            key: 1_700_000_000_000_000,
            id: "run_abc".into(),
        };
        let raw = c.encode();
        assert_eq!(Cursor::decode(&raw, "runs").expect("decodes"), c);
        assert!(Cursor::decode(&raw, "agents").is_err());
        for forged in ["", "abc", "!!!!", "eyJpZCI6ImFnX2RlZiJ9", &"A".repeat(600)] {
            let err = Cursor::decode(forged, "runs").unwrap_err();
            assert_eq!(err.param, "cursor");
        }
    }

    #[test]
    fn limit_bounds() {
        assert_eq!(parse_limit(None).expect("default"), 20);
        assert_eq!(parse_limit(Some("1")).expect("1"), 1);
        assert_eq!(parse_limit(Some("100")).expect("100"), 100);
        for bad in ["0", "101", "-1", "abc", "1.5", ""] {
            assert!(parse_limit(Some(bad)).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn overfetch_sets_has_more() {
        let key = |n: &i64| Cursor {
            scope: "x".into(),
            key: *n,
            id: String::new(),
        };
        let page = Page::from_overfetch(vec![1, 2, 3], 2, key);
        assert_eq!(page.data, vec![1, 2]);
        assert!(page.pagination.has_more);
        assert!(page.pagination.next_cursor.is_some());
        let page = Page::from_overfetch(vec![1, 2], 2, key);
        assert!(!page.pagination.has_more);
        assert_eq!(page.pagination.next_cursor, None);
    }
}
