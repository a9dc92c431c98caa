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

    /// Stores a token by the hash of its secret.
    pub async fn insert_token(
        &self,
        org_id: &str,
        name: &str,
        token_hash: &str,
        prefix: &str,
        now: i64,
        expires_at: Option<i64>,
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

    /// Revokes a token of `org_id`; false if there is no such live token.
    pub async fn revoke_token(&self, org_id: &str, id: &str, now: i64) -> Result<bool, StoreError> {
        let txn = self.begin_write().await?;
        let res = api_token::Entity::update_many()
            .col_expr(
                api_token::Column::RevokedAt,
                sea_orm::sea_query::Expr::value(now),
            )
            .filter(api_token::Column::OrgId.eq(org_id))
            .filter(api_token::Column::Id.eq(id))
            .filter(api_token::Column::RevokedAt.is_null())
            .exec(&*txn)
            .await?;
        txn.commit().await?;
        Ok(res.rows_affected == 1)
    }
}
