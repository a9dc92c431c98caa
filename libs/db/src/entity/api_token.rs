use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "api_tokens")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    pub org_id: String,
    pub name: String,
    /// Hex SHA-256 of the whole token; the token itself is never stored.
    #[sea_orm(unique)]
    pub token_hash: String,
    /// First characters of the token, shown in listings.
    pub prefix: String,
    pub created_at: i64,
    pub expires_at: Option<i64>,
    pub revoked_at: Option<i64>,
    /// The token that minted this one through the API (`None`: minted by the
    /// operator, `vm0-gateway token create`). Revoking a token revokes what it
    /// minted.
    pub created_by: Option<String>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
