//! HTTP handlers: thin adapters from requests to [`vm0_db::Store`] calls.

pub mod agents;
pub mod events;
pub mod health;
pub mod objects;
pub mod runs;
pub mod storage;
pub mod telemetry;
pub mod tokens;

use vm0_api_types::cursor::{Cursor, CursorId, parse_limit};
use vm0_db::KeysetAfter;

use crate::error::ApiError;
use crate::extract::QueryParams;

/// `limit` and `cursor` of a list request, decoded for the list `scope`.
pub struct PageRequest {
    pub limit: u64,
    pub after: Option<KeysetAfter>,
}

impl PageRequest {
    pub fn from_query(q: &QueryParams, scope: &str) -> Result<PageRequest, ApiError> {
        Self::decode(q, scope, CursorId::Name)
    }

    fn decode(q: &QueryParams, scope: &str, id: CursorId) -> Result<PageRequest, ApiError> {
        let limit = parse_limit(q.get("limit"))?;
        // An empty cursor is the first page: scripts often pass `cursor=$NEXT` with an
        // empty variable on their first call.
        let after = match q.get("cursor").filter(|c| !c.is_empty()) {
            None => None,
            Some(raw) => {
                let c = Cursor::decode(raw, scope, id)?;
                Some(KeysetAfter {
                    key: c.key,
                    id: c.id,
                })
            }
        };
        Ok(PageRequest { limit, after })
    }

    /// [`PageRequest::from_query`] for lists whose tie-breaker is a row number
    /// (logs, metrics): a cursor whose id is no such number is refused.
    pub fn with_row_ids(q: &QueryParams, scope: &str) -> Result<PageRequest, ApiError> {
        Self::decode(q, scope, CursorId::RowNumber)
    }
}

/// The cursor that resumes a list after the item with sort key `key` and `id`.
pub fn cursor(scope: &str, key: i64, id: impl Into<String>) -> Cursor {
    Cursor {
        scope: scope.to_owned(),
        key,
        id: id.into(),
    }
}
