//! Pagination cursors: `<list>.<key>.<id>`, naming the list they belong to
//! (`scope`) and the sort key and id of the last item returned. Clients pass
//! them back unchanged; the grammar is exact and published as each `cursor`
//! parameter's pattern, so every string of that form is a position in the list
//! (the items after it) and everything else is refused as `invalid_parameter`
//! rather than silently restarting.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::FieldError;

/// Items per page when `limit` is absent.
pub const DEFAULT_LIMIT: u64 = 20;
/// Largest accepted `limit`.
pub const MAX_LIMIT: u64 = 100;

/// The position after which the next page starts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    /// Which list (and order) this cursor walks, e.g. `runs` or `logs`
    /// (lowercase letters and `_`).
    pub scope: String,
    /// Primary sort key of the last item (microseconds or a sequence number, ≥ 0).
    pub key: i64,
    /// Tie-breaker of the last item (its id).
    pub id: String,
}

/// What a list's tie-breaker looks like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CursorId {
    /// A resource id (`run_…`) or content hash: lowercase letters, digits, `_`.
    Name,
    /// A row number (logs, metrics).
    RowNumber,
}

impl CursorId {
    fn pattern(self) -> &'static str {
        match self {
            CursorId::Name => "[a-z0-9_]{1,128}",
            CursorId::RowNumber => "[0-9]{1,18}",
        }
    }

    fn accepts(self, id: &str) -> bool {
        match self {
            CursorId::Name => {
                (1..=128).contains(&id.len())
                    && id
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
            }
            CursorId::RowNumber => is_digits(id),
        }
    }
}

/// 1–18 ASCII digits (always an `i64`).
fn is_digits(s: &str) -> bool {
    (1..=18).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_digit())
}

impl Cursor {
    pub fn encode(&self) -> String {
        format!("{}.{}.{}", self.scope, self.key, self.id)
    }

    /// The pattern of the `cursor` parameter of the list `scope`: exactly
    /// what [`Cursor::decode`] accepts, or empty (the first page: scripts
    /// often pass `cursor=$NEXT` with an empty variable on their first call).
    pub fn pattern(scope: &str, id: CursorId) -> String {
        format!("^({scope}\\.[0-9]{{1,18}}\\.{})?$", id.pattern())
    }

    /// Decodes `raw`, the `cursor` query parameter, for the list `scope`.
    pub fn decode(raw: &str, scope: &str, id: CursorId) -> Result<Cursor, FieldError> {
        let invalid = || {
            FieldError::invalid(
                "cursor",
                "cursor is not one this list returned; pass `pagination.nextCursor` unchanged",
            )
        };
        let mut parts = raw.splitn(3, '.');
        let (Some(s), Some(key), Some(last)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(invalid());
        };
        if s != scope || !is_digits(key) || !id.accepts(last) {
            return Err(invalid());
        }
        Ok(Cursor {
            scope: s.to_owned(),
            key: key.parse().map_err(|_| invalid())?,
            id: last.to_owned(),
        })
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
        assert_eq!(raw, "runs.1700000000000000.run_abc");
        assert_eq!(
            Cursor::decode(&raw, "runs", CursorId::Name).expect("decodes"),
            c
        );
        assert!(Cursor::decode(&raw, "agents", CursorId::Name).is_err());
        assert!(Cursor::decode(&raw, "runs", CursorId::RowNumber).is_err());
        let long = "1".repeat(19);
        for forged in [
            "",
            "abc",
            "!!!!",
            "runs.1",
            "runs..run_a",
            "runs.-1.run_a",
            "runs.1.RUN",
            "runs.1.a.b",
            &format!("runs.{long}.run_a"),
            &format!("runs.1.{}", "a".repeat(129)),
        ] {
            let err = Cursor::decode(forged, "runs", CursorId::Name).unwrap_err();
            assert_eq!(err.param, "cursor", "{forged}");
        }
    }

    #[test]
    fn the_published_pattern_is_what_decode_accepts() {
        let re = |scope, id| regex::Regex::new(&Cursor::pattern(scope, id)).expect("regex");
        let names = re("runs", CursorId::Name);
        let rows = re("logs_asc", CursorId::RowNumber);
        for raw in [
            "runs.1.run_abc",
            "runs.0.a",
            "runs.123456789012345678.x_9",
            "runs.1.RUN",
            "runs.1.a.b",
            "runs.1234567890123456789.a",
            "agents.1.a",
            "runs.1.",
            "runs.1.a\n",
            "xruns.1.a",
            "",
        ] {
            assert_eq!(
                names.is_match(raw),
                raw.is_empty() || Cursor::decode(raw, "runs", CursorId::Name).is_ok(),
                "{raw}"
            );
        }
        for raw in [
            "logs_asc.1.2",
            "logs_asc.1.a",
            "logs_asc.1.-2",
            "logs_desc.1.2",
        ] {
            assert_eq!(
                rows.is_match(raw),
                Cursor::decode(raw, "logs_asc", CursorId::RowNumber).is_ok(),
                "{raw}"
            );
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
