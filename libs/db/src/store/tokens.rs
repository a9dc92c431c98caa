use sea_orm::{
    ActiveModelTrait, ColumnTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect, Set,
};
use vm0_api_types::ids::{IdKind, new_id};

use super::{KeysetAfter, SortOrder, Store, StoreError, keyset, unique_or};
use crate::entity::{api_token, organization};

impl Store {
    /// The organization named `name`, created if it does not exist yet.
    pub async fn ensure_organization(
        &self,
        name: &str,
        now: i64,
    ) -> Result<organization::Model, StoreError> {
        if let Some(org) = self.find_organization(name).await? {
            return Ok(org);
        }
        let created = organization::ActiveModel {
            id: Set(new_id(IdKind::Organization)),
            name: Set(name.to_owned()),
            created_at: Set(now),
        }
        .insert(self.conn())
        .await;
        match created {
            Ok(org) => Ok(org),
            // Lost a race with another creator: theirs is as good as ours.
            Err(e) => match unique_or(e, || StoreError::Conflict) {
                StoreError::Conflict => self
                    .find_organization(name)
                    .await?
                    .ok_or(StoreError::Conflict),
                other => Err(other),
            },
        }
    }

    pub async fn find_organization(
        &self,
        name: &str,
    ) -> Result<Option<organization::Model>, StoreError> {
        Ok(organization::Entity::find()
            .filter(organization::Column::Name.eq(name))
            .one(self.conn())
            .await?)
    }

    /// Stores a token by the hash of its secret; `created_by` is the token that
    /// minted it through the API (`None`: the operator).
    #[allow(clippy::too_many_arguments)]
    pub async fn insert_token(
        &self,
        org_id: &str,
        name: &str,
        token_hash: &str,
        prefix: &str,
        now: i64,
        expires_at: Option<i64>,
        created_by: Option<&str>,
    ) -> Result<api_token::Model, StoreError> {
        let row = api_token::ActiveModel {
            id: Set(new_id(IdKind::Token)),
            org_id: Set(org_id.to_owned()),
            name: Set(name.to_owned()),
            token_hash: Set(token_hash.to_owned()),
            prefix: Set(prefix.to_owned()),
            created_at: Set(now),
            expires_at: Set(expires_at),
            revoked_at: Set(None),
            created_by: Set(created_by.map(str::to_owned)),
        };
        Ok(row.insert(self.conn()).await?)
    }

    /// The token row with this hash, whatever its state (the caller checks expiry
    /// and revocation, so it can compare hashes in constant time first).
    pub async fn find_token_by_hash(
        &self,
        token_hash: &str,
    ) -> Result<Option<api_token::Model>, StoreError> {
        Ok(api_token::Entity::find()
            .filter(api_token::Column::TokenHash.eq(token_hash))
            .one(self.conn())
            .await?)
    }

    /// A token by id, whatever its organization and state (operator commands).
    pub async fn find_token_by_id(&self, id: &str) -> Result<Option<api_token::Model>, StoreError> {
        Ok(api_token::Entity::find_by_id(id.to_owned())
            .one(self.conn())
            .await?)
    }

    /// Live (not revoked) tokens of `org_id`, newest first.
    pub async fn list_tokens(
        &self,
        org_id: &str,
        after: Option<&KeysetAfter>,
        limit: u64,
    ) -> Result<Vec<api_token::Model>, StoreError> {
        let mut q = api_token::Entity::find()
            .filter(api_token::Column::OrgId.eq(org_id))
            .filter(api_token::Column::RevokedAt.is_null());
        if let Some(after) = after {
            q = q.filter(keyset(
                api_token::Column::CreatedAt,
                api_token::Column::Id,
                after,
                SortOrder::Desc,
            ));
        }
        Ok(q.order_by_desc(api_token::Column::CreatedAt)
            .order_by_desc(api_token::Column::Id)
            .limit(limit + 1)
            .all(self.conn())
            .await?)
    }

    /// A live token of `org_id` by id.
    pub async fn get_token(
        &self,
        org_id: &str,
        id: &str,
    ) -> Result<Option<api_token::Model>, StoreError> {
        Ok(api_token::Entity::find_by_id(id.to_owned())
            .filter(api_token::Column::OrgId.eq(org_id))
            .filter(api_token::Column::RevokedAt.is_null())
            .one(self.conn())
            .await?)
    }

    /// Whether `ancestor` minted `id`, directly or through tokens it minted.
    pub async fn token_descends_from(
        &self,
        org_id: &str,
        id: &str,
        ancestor: &str,
    ) -> Result<bool, StoreError> {
        let mut current = api_token::Entity::find_by_id(id.to_owned())
            .filter(api_token::Column::OrgId.eq(org_id))
            .one(self.conn())
            .await?;
        // A minting chain is short; the bound only guards against a corrupt cycle.
        for _ in 0..1000 {
            let Some(parent) = current.and_then(|t| t.created_by) else {
                return Ok(false);
            };
            if parent == ancestor {
                return Ok(true);
            }
            current = api_token::Entity::find_by_id(parent)
                .filter(api_token::Column::OrgId.eq(org_id))
                .one(self.conn())
                .await?;
        }
        Ok(false)
    }

    /// Revokes a live token of `org_id` and every live token it minted, directly
    /// or not; the ids revoked (empty if there is no such live token).
    pub async fn revoke_token(
        &self,
        org_id: &str,
        id: &str,
        now: i64,
    ) -> Result<Vec<String>, StoreError> {
        let txn = self.begin_write().await?;
        let mut revoked = Vec::new();
        let mut frontier = vec![id.to_owned()];
        while let Some(next) = frontier.pop() {
            let res = api_token::Entity::update_many()
                .col_expr(
                    api_token::Column::RevokedAt,
                    sea_orm::sea_query::Expr::value(now),
                )
                .filter(api_token::Column::OrgId.eq(org_id))
                .filter(api_token::Column::Id.eq(next.clone()))
                .filter(api_token::Column::RevokedAt.is_null())
                .exec(&*txn)
                .await?;
            if res.rows_affected != 1 {
                continue;
            }
            let children = api_token::Entity::find()
                .filter(api_token::Column::OrgId.eq(org_id))
                .filter(api_token::Column::CreatedBy.eq(next.clone()))
                .filter(api_token::Column::RevokedAt.is_null())
                .all(&*txn)
                .await?;
            frontier.extend(children.into_iter().map(|c| c.id));
            revoked.push(next);
        }
        txn.commit().await?;
        Ok(revoked)
    }
}
