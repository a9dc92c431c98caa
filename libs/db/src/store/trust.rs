//! Who may talk to the control plane (worker credentials) and which secrets keys
//! this deployment seals with.

use sea_orm::sea_query::Expr;
use sea_orm::{ActiveModelTrait, ColumnTrait, EntityTrait, QueryFilter, QueryOrder, Set};
use vm0_api_types::ids::{IdKind, new_id};

use super::{Store, StoreError, unique_or};
use crate::entity::{secrets_key, worker_credential};

impl Store {
    /// Stores a worker's credential by its hash; `NameTaken` when the worker has
    /// a live one already.
    pub async fn insert_worker_credential(
        &self,
        name: &str,
        token_hash: &str,
        now: i64,
    ) -> Result<worker_credential::Model, StoreError> {
        let txn = self.begin_write().await?;
        let live = worker_credential::Entity::find()
            .filter(worker_credential::Column::Name.eq(name))
            .filter(worker_credential::Column::RevokedAt.is_null())
            .one(&*txn)
            .await?;
        if live.is_some() {
            return Err(StoreError::NameTaken(name.to_owned()));
        }
        let row = worker_credential::ActiveModel {
            id: Set(new_id(IdKind::WorkerCredential)),
            name: Set(name.to_owned()),
            token_hash: Set(token_hash.to_owned()),
            created_at: Set(now),
            revoked_at: Set(None),
        }
        .insert(&*txn)
        .await
        .map_err(|e| unique_or(e, || StoreError::Conflict))?;
        txn.commit().await?;
        Ok(row)
    }

    /// The live credential with this hash.
    pub async fn find_worker_credential(
        &self,
        token_hash: &str,
    ) -> Result<Option<worker_credential::Model>, StoreError> {
        Ok(worker_credential::Entity::find()
            .filter(worker_credential::Column::TokenHash.eq(token_hash))
            .filter(worker_credential::Column::RevokedAt.is_null())
            .one(self.conn())
            .await?)
    }

    /// Every credential, live or revoked, oldest first.
    pub async fn list_worker_credentials(
        &self,
    ) -> Result<Vec<worker_credential::Model>, StoreError> {
        Ok(worker_credential::Entity::find()
            .order_by_asc(worker_credential::Column::CreatedAt)
            .all(self.conn())
            .await?)
    }

    /// Revokes the worker's live credential; false if it has none.
    pub async fn revoke_worker_credential(&self, name: &str, now: i64) -> Result<bool, StoreError> {
        let txn = self.begin_write().await?;
        let res = worker_credential::Entity::update_many()
            .col_expr(worker_credential::Column::RevokedAt, Expr::value(now))
            .filter(worker_credential::Column::Name.eq(name))
            .filter(worker_credential::Column::RevokedAt.is_null())
            .exec(&*txn)
            .await?;
        txn.commit().await?;
        Ok(res.rows_affected > 0)
    }

    /// The ids of the secrets keys this deployment has sealed with.
    pub async fn secrets_key_ids(&self) -> Result<Vec<String>, StoreError> {
        Ok(secrets_key::Entity::find()
            .order_by_asc(secrets_key::Column::CreatedAt)
            .all(self.conn())
            .await?
            .into_iter()
            .map(|k| k.key_id)
            .collect())
    }

    /// Records a key id (idempotent).
    pub async fn add_secrets_key_id(&self, key_id: &str, now: i64) -> Result<(), StoreError> {
        let txn = self.begin_write().await?;
        let exists = secrets_key::Entity::find_by_id(key_id.to_owned())
            .one(&*txn)
            .await?
            .is_some();
        if !exists {
            let inserted = secrets_key::ActiveModel {
                key_id: Set(key_id.to_owned()),
                created_at: Set(now),
            }
            .insert(&*txn)
            .await;
            // Another gateway recorded it first: as good.
            if let Err(e) = inserted {
                return match unique_or(e, || StoreError::Conflict) {
                    StoreError::Conflict => Ok(()),
                    other => Err(other),
                };
            }
        }
        txn.commit().await?;
        Ok(())
    }
}
