use sea_orm::{
    ActiveModelTrait, ColumnTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect, Set,
};
use vm0_api_types::ids::{IdKind, new_id};

use super::{KeysetAfter, SortOrder, Store, StoreError, keyset, unique_or};
use crate::entity::{agent, agent_version};

/// What `PUT /v1/agents/:id` did.
#[derive(Debug, Clone)]
pub enum UpdateOutcome {
    /// The config differs from the current one: a new version was saved.
    NewVersion(agent::Model, agent_version::Model),
    /// Same config: nothing was written.
    Unchanged(agent::Model, agent_version::Model),
}

impl Store {
    /// Creates an agent and its version 1. `config` is the normalized JSON.
    pub async fn create_agent(
        &self,
        org_id: &str,
        name: &str,
        config: &str,
        config_hash: &str,
        now: i64,
    ) -> Result<(agent::Model, agent_version::Model), StoreError> {
        let agent_id = new_id(IdKind::Agent);
        let version = agent_version::ActiveModel {
            id: Set(new_id(IdKind::AgentVersion)),
            agent_id: Set(agent_id.clone()),
            org_id: Set(org_id.to_owned()),
            version_number: Set(1),
            config: Set(config.to_owned()),
            config_hash: Set(config_hash.to_owned()),
            created_at: Set(now),
        };
        let agent = agent::ActiveModel {
            id: Set(agent_id),
            org_id: Set(org_id.to_owned()),
            name: Set(name.to_owned()),
            current_version_id: version.id.clone(),
            created_at: Set(now),
            updated_at: Set(now),
        };
        let txn = self.begin_write().await?;
        let agent = agent
            .insert(&*txn)
            .await
            .map_err(|e| unique_or(e, || StoreError::NameTaken(name.to_owned())))?;
        let version = version.insert(&*txn).await?;
        txn.commit().await?;
        Ok((agent, version))
    }

    pub async fn get_agent(
        &self,
        org_id: &str,
        id: &str,
    ) -> Result<Option<agent::Model>, StoreError> {
        Ok(agent::Entity::find_by_id(id.to_owned())
            .filter(agent::Column::OrgId.eq(org_id))
            .one(self.conn())
            .await?)
    }

    pub async fn get_agent_by_name(
        &self,
        org_id: &str,
        name: &str,
    ) -> Result<Option<agent::Model>, StoreError> {
        Ok(agent::Entity::find()
            .filter(agent::Column::OrgId.eq(org_id))
            .filter(agent::Column::Name.eq(name))
            .one(self.conn())
            .await?)
    }

    /// Agents of `org_id`, newest first, optionally only the one named `name`.
    pub async fn list_agents(
        &self,
        org_id: &str,
        name: Option<&str>,
        after: Option<&KeysetAfter>,
        limit: u64,
    ) -> Result<Vec<agent::Model>, StoreError> {
        let mut q = agent::Entity::find().filter(agent::Column::OrgId.eq(org_id));
        if let Some(name) = name {
            q = q.filter(agent::Column::Name.eq(name));
        }
        if let Some(after) = after {
            q = q.filter(keyset(
                agent::Column::CreatedAt,
                agent::Column::Id,
                after,
                SortOrder::Desc,
            ));
        }
        Ok(q.order_by_desc(agent::Column::CreatedAt)
            .order_by_desc(agent::Column::Id)
            .limit(limit + 1)
            .all(self.conn())
            .await?)
    }

    /// A version of an agent of `org_id`.
    pub async fn get_agent_version(
        &self,
        org_id: &str,
        agent_id: &str,
        version_id: &str,
    ) -> Result<Option<agent_version::Model>, StoreError> {
        Ok(agent_version::Entity::find_by_id(version_id.to_owned())
            .filter(agent_version::Column::OrgId.eq(org_id))
            .filter(agent_version::Column::AgentId.eq(agent_id))
            .one(self.conn())
            .await?)
    }

    pub async fn get_agent_version_by_number(
        &self,
        org_id: &str,
        agent_id: &str,
        number: i64,
    ) -> Result<Option<agent_version::Model>, StoreError> {
        Ok(agent_version::Entity::find()
            .filter(agent_version::Column::OrgId.eq(org_id))
            .filter(agent_version::Column::AgentId.eq(agent_id))
            .filter(agent_version::Column::VersionNumber.eq(number))
            .one(self.conn())
            .await?)
    }

    /// Versions of an agent, newest first; keyed by version number.
    pub async fn list_agent_versions(
        &self,
        org_id: &str,
        agent_id: &str,
        after: Option<&KeysetAfter>,
        limit: u64,
    ) -> Result<Vec<agent_version::Model>, StoreError> {
        let mut q = agent_version::Entity::find()
            .filter(agent_version::Column::OrgId.eq(org_id))
            .filter(agent_version::Column::AgentId.eq(agent_id));
        if let Some(after) = after {
            q = q.filter(keyset(
                agent_version::Column::VersionNumber,
                agent_version::Column::Id,
                after,
                SortOrder::Desc,
            ));
        }
        Ok(q.order_by_desc(agent_version::Column::VersionNumber)
            .order_by_desc(agent_version::Column::Id)
            .limit(limit + 1)
            .all(self.conn())
            .await?)
    }

    /// Saves `config` as a new version unless it equals the current one. `None` when
    /// the agent does not exist in `org_id`.
    pub async fn update_agent_config(
        &self,
        org_id: &str,
        agent_id: &str,
        config: &str,
        config_hash: &str,
        now: i64,
    ) -> Result<Option<UpdateOutcome>, StoreError> {
        let txn = self.begin_write().await?;
        let Some(agent) = agent::Entity::find_by_id(agent_id.to_owned())
            .filter(agent::Column::OrgId.eq(org_id))
            .one(&*txn)
            .await?
        else {
            return Ok(None);
        };
        let current = agent_version::Entity::find_by_id(agent.current_version_id.clone())
            .one(&*txn)
            .await?
            .ok_or_else(|| {
                StoreError::Corrupt(format!("agent {agent_id} has no current version"))
            })?;
        if current.config_hash == config_hash {
            return Ok(Some(UpdateOutcome::Unchanged(agent, current)));
        }
        let version = agent_version::ActiveModel {
            id: Set(new_id(IdKind::AgentVersion)),
            agent_id: Set(agent.id.clone()),
            org_id: Set(org_id.to_owned()),
            version_number: Set(current.version_number + 1),
            config: Set(config.to_owned()),
            config_hash: Set(config_hash.to_owned()),
            created_at: Set(now),
        }
        .insert(&*txn)
        .await
        // Two updates raced to the same version number: one must retry.
        .map_err(|e| unique_or(e, || StoreError::Conflict))?;
        let mut active: agent::ActiveModel = agent.into();
        active.current_version_id = Set(version.id.clone());
        active.updated_at = Set(now);
        let agent = active.update(&*txn).await?;
        txn.commit().await?;
        Ok(Some(UpdateOutcome::NewVersion(agent, version)))
    }

    /// Deletes an agent and its versions. Its runs stay, naming it. False if absent.
    pub async fn delete_agent(&self, org_id: &str, agent_id: &str) -> Result<bool, StoreError> {
        let txn = self.begin_write().await?;
        let res = agent::Entity::delete_many()
            .filter(agent::Column::OrgId.eq(org_id))
            .filter(agent::Column::Id.eq(agent_id))
            .exec(&*txn)
            .await?;
        if res.rows_affected == 0 {
            return Ok(false);
        }
        agent_version::Entity::delete_many()
            .filter(agent_version::Column::AgentId.eq(agent_id))
            .exec(&*txn)
            .await?;
        txn.commit().await?;
        Ok(true)
    }
}
