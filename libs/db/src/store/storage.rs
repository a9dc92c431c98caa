//! Volumes and artifacts (`storages`, one table for both kinds), their
//! versions and upload sessions. The bytes are in the object store; here is
//! what names them.

use sea_orm::{
    ActiveModelTrait, ColumnTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect, Set,
};
use vm0_api_types::ids::{IdKind, new_id};

use super::{KeysetAfter, SortOrder, Store, StoreError, keyset, unique_or};
use crate::entity::{storage, storage_upload, storage_version};

/// Volumes hold a run's inputs, artifacts its outputs; they share one shape.
/// A session's state directory is a storage too (named by the session's id,
/// not listed in the API): its versions are what checkpoints point at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StorageKind {
    Volume,
    Artifact,
    State,
}

impl StorageKind {
    pub const fn as_str(self) -> &'static str {
        match self {
            StorageKind::Volume => "volume",
            StorageKind::Artifact => "artifact",
            StorageKind::State => "state",
        }
    }

    pub const fn id_kind(self) -> IdKind {
        match self {
            StorageKind::Volume => IdKind::Volume,
            StorageKind::Artifact => IdKind::Artifact,
            StorageKind::State => IdKind::SessionState,
        }
    }
}

/// What committing a version did.
#[derive(Debug, Clone)]
pub struct Committed {
    pub storage: storage::Model,
    pub version: storage_version::Model,
    /// `false` when a version with the same content already existed.
    pub created: bool,
}

impl Store {
    pub async fn create_storage(
        &self,
        org_id: &str,
        kind: StorageKind,
        name: &str,
        now: i64,
    ) -> Result<storage::Model, StoreError> {
        let row = storage::ActiveModel {
            id: Set(new_id(kind.id_kind())),
            org_id: Set(org_id.to_owned()),
            kind: Set(kind.as_str().to_owned()),
            name: Set(name.to_owned()),
            current_version_id: Set(None),
            size: Set(0),
            file_count: Set(0),
            created_at: Set(now),
            updated_at: Set(now),
        };
        let txn = self.begin_write().await?;
        let row = row
            .insert(&*txn)
            .await
            .map_err(|e| unique_or(e, || StoreError::NameTaken(name.to_owned())))?;
        txn.commit().await?;
        Ok(row)
    }

    /// Volumes or artifacts of `org_id`, newest first, optionally only the one
    /// named `name`.
    pub async fn list_storages(
        &self,
        org_id: &str,
        kind: StorageKind,
        name: Option<&str>,
        after: Option<&KeysetAfter>,
        limit: u64,
    ) -> Result<Vec<storage::Model>, StoreError> {
        let mut q = storage::Entity::find()
            .filter(storage::Column::OrgId.eq(org_id))
            .filter(storage::Column::Kind.eq(kind.as_str()));
        if let Some(name) = name {
            q = q.filter(storage::Column::Name.eq(name));
        }
        if let Some(after) = after {
            q = q.filter(keyset(
                storage::Column::CreatedAt,
                storage::Column::Id,
                after,
                SortOrder::Desc,
            ));
        }
        Ok(q.order_by_desc(storage::Column::CreatedAt)
            .order_by_desc(storage::Column::Id)
            .limit(limit + 1)
            .all(self.conn())
            .await?)
    }

    pub async fn get_storage(
        &self,
        org_id: &str,
        kind: StorageKind,
        id: &str,
    ) -> Result<Option<storage::Model>, StoreError> {
        Ok(storage::Entity::find_by_id(id.to_owned())
            .filter(storage::Column::OrgId.eq(org_id))
            .filter(storage::Column::Kind.eq(kind.as_str()))
            .one(self.conn())
            .await?)
    }

    /// A volume or artifact of `org_id` by name.
    pub async fn find_storage(
        &self,
        org_id: &str,
        kind: StorageKind,
        name: &str,
    ) -> Result<Option<storage::Model>, StoreError> {
        Ok(storage::Entity::find()
            .filter(storage::Column::OrgId.eq(org_id))
            .filter(storage::Column::Kind.eq(kind.as_str()))
            .filter(storage::Column::Name.eq(name))
            .one(self.conn())
            .await?)
    }

    /// Deletes a volume or artifact with its versions and upload sessions;
    /// returns the ids of those sessions, or `None` if there was no such
    /// storage. Its objects are the caller's to delete.
    pub async fn delete_storage(
        &self,
        org_id: &str,
        kind: StorageKind,
        id: &str,
    ) -> Result<Option<Vec<String>>, StoreError> {
        let txn = self.begin_write().await?;
        let gone = storage::Entity::delete_many()
            .filter(storage::Column::Id.eq(id))
            .filter(storage::Column::OrgId.eq(org_id))
            .filter(storage::Column::Kind.eq(kind.as_str()))
            .exec(&*txn)
            .await?
            .rows_affected
            > 0;
        if !gone {
            txn.rollback().await?;
            return Ok(None);
        }
        let uploads: Vec<String> = storage_upload::Entity::find()
            .filter(storage_upload::Column::StorageId.eq(id))
            .all(&*txn)
            .await?
            .into_iter()
            .map(|u| u.id)
            .collect();
        {
            storage_version::Entity::delete_many()
                .filter(storage_version::Column::StorageId.eq(id))
                .exec(&*txn)
                .await?;
            storage_upload::Entity::delete_many()
                .filter(storage_upload::Column::StorageId.eq(id))
                .exec(&*txn)
                .await?;
        }
        txn.commit().await?;
        Ok(Some(uploads))
    }

    /// Versions of a storage, newest first.
    pub async fn list_storage_versions(
        &self,
        storage_id: &str,
        after: Option<&KeysetAfter>,
        limit: u64,
    ) -> Result<Vec<storage_version::Model>, StoreError> {
        let mut q = storage_version::Entity::find()
            .filter(storage_version::Column::StorageId.eq(storage_id));
        if let Some(after) = after {
            q = q.filter(keyset(
                storage_version::Column::CreatedAt,
                storage_version::Column::Id,
                after,
                SortOrder::Desc,
            ));
        }
        Ok(q.order_by_desc(storage_version::Column::CreatedAt)
            .order_by_desc(storage_version::Column::Id)
            .limit(limit + 1)
            .all(self.conn())
            .await?)
    }

    /// Up to two versions of a storage whose id starts with `prefix` (lowercase
    /// hex, checked by the caller): two means the prefix is ambiguous.
    pub async fn find_storage_versions(
        &self,
        storage_id: &str,
        prefix: &str,
    ) -> Result<Vec<storage_version::Model>, StoreError> {
        Ok(storage_version::Entity::find()
            .filter(storage_version::Column::StorageId.eq(storage_id))
            .filter(storage_version::Column::Id.starts_with(prefix))
            .order_by_asc(storage_version::Column::Id)
            .limit(2)
            .all(self.conn())
            .await?)
    }

    pub async fn create_upload(
        &self,
        upload: storage_upload::Model,
    ) -> Result<storage_upload::Model, StoreError> {
        let txn = self.begin_write().await?;
        let row = storage_upload::ActiveModel::from(upload)
            .insert(&*txn)
            .await?;
        txn.commit().await?;
        Ok(row)
    }

    /// An upload session by id, whoever asks (a signed URL names it; the
    /// signature is the permission).
    pub async fn get_upload(&self, id: &str) -> Result<Option<storage_upload::Model>, StoreError> {
        Ok(storage_upload::Entity::find_by_id(id.to_owned())
            .one(self.conn())
            .await?)
    }

    /// When upload session `id` expires (microseconds), if it is open: the
    /// check of a PUT, which reads nothing else of it.
    pub async fn upload_expiry(&self, id: &str) -> Result<Option<i64>, StoreError> {
        Ok(storage_upload::Entity::find_by_id(id.to_owned())
            .select_only()
            .column(storage_upload::Column::ExpiresAt)
            .into_tuple::<i64>()
            .one(self.conn())
            .await?)
    }

    /// Records `version` (unless one of the same id exists: then that one is
    /// kept and returned), makes it the storage's current version, and ends the
    /// upload session `upload_id` if given.
    pub async fn commit_storage_version(
        &self,
        version: storage_version::Model,
        upload_id: Option<&str>,
        now: i64,
    ) -> Result<Committed, StoreError> {
        let txn = self.begin_write().await?;
        let existing =
            storage_version::Entity::find_by_id((version.storage_id.clone(), version.id.clone()))
                .one(&*txn)
                .await?;
        let (version, created) = match existing {
            Some(v) => (v, false),
            None => (
                storage_version::ActiveModel::from(version)
                    .insert(&*txn)
                    .await?,
                true,
            ),
        };
        let Some(row) = storage::Entity::find_by_id(version.storage_id.clone())
            .one(&*txn)
            .await?
        else {
            txn.rollback().await?;
            return Err(StoreError::Conflict);
        };
        let mut row: storage::ActiveModel = row.into();
        row.current_version_id = Set(Some(version.id.clone()));
        row.size = Set(version.size);
        row.file_count = Set(version.file_count);
        row.updated_at = Set(now);
        let storage = row.update(&*txn).await?;
        if let Some(id) = upload_id {
            storage_upload::Entity::delete_by_id(id.to_owned())
                .exec(&*txn)
                .await?;
        }
        txn.commit().await?;
        Ok(Committed {
            storage,
            version,
            created,
        })
    }

    /// Deletes upload sessions expired before `now`; returns them (their
    /// staged objects are the caller's to delete).
    pub async fn take_expired_uploads(
        &self,
        now: i64,
        limit: u64,
    ) -> Result<Vec<storage_upload::Model>, StoreError> {
        let rows = storage_upload::Entity::find()
            .filter(storage_upload::Column::ExpiresAt.lt(now))
            .limit(limit)
            .all(self.conn())
            .await?;
        if !rows.is_empty() {
            let txn = self.begin_write().await?;
            storage_upload::Entity::delete_many()
                .filter(storage_upload::Column::Id.is_in(rows.iter().map(|r| r.id.clone())))
                .exec(&*txn)
                .await?;
            txn.commit().await?;
        }
        Ok(rows)
    }
}
