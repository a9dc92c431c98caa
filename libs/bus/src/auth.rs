//! Who may do what on NATS: two roles, each a nats-server user whose permissions
//! name exactly the subjects it needs (nats-server 2.9 `authorization { users }`);
//! anonymous clients are refused.
//!
//! - **gateway**: publishes jobs, the control plane's status events, cancels and
//!   token revocations; runs the JetStream API (streams, consumers, the
//!   persister's fetches and acks); reads every run's subjects (event streams).
//! - **worker**: publishes a run's output (with its `error` events), logs and metrics (never `status`, so no
//!   `complete` event, and never `auth.*` or `jobs.run`); pulls and acks jobs of
//!   the `workers` consumer; hears cancels. It subscribes to no run's telemetry.
//!
//! Replies (JetStream acks, pulled messages) go to per-role inbox prefixes: a
//! worker may subscribe to its role's inboxes only, never to the gateway's, where
//! the persister's deliveries (every tenant's telemetry) arrive.

use crate::{JOBS_STREAM, PERSISTER_CONSUMER, TELEMETRY_STREAM, WORKERS_CONSUMER, subjects};

/// A NATS user of the deployment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Gateway,
    Worker,
}

impl Role {
    /// The user name in the server's configuration.
    pub fn user(self) -> &'static str {
        match self {
            Role::Gateway => "vm0-gateway",
            Role::Worker => "vm0-worker",
        }
    }

    /// Where this role's replies arrive (`<prefix>.<nuid>`).
    pub fn inbox_prefix(self) -> &'static str {
        match self {
            Role::Gateway => "_INBOX_vm0_gateway",
            Role::Worker => "_INBOX_vm0_worker",
        }
    }

    /// Subjects this role may publish to and subscribe to.
    pub fn permissions(self) -> Permissions {
        let inbox = format!("{}.>", self.inbox_prefix());
        match self {
            Role::Gateway => Permissions {
                publish: vec![
                    subjects::JOBS.into(),
                    "runs.*.status".into(),
                    subjects::cancel("*"),
                    subjects::TOKENS_REVOKED.into(),
                    subjects::DEAD_LETTERS.into(),
                    "$JS.API.>".into(),
                    format!("$JS.ACK.{TELEMETRY_STREAM}.{PERSISTER_CONSUMER}.>"),
                ],
                subscribe: vec!["runs.>".into(), subjects::TOKENS_REVOKED.into(), inbox],
            },
            Role::Worker => Permissions {
                publish: vec![
                    "runs.*.output".into(),
                    "runs.*.logs".into(),
                    "runs.*.metrics".into(),
                    format!("$JS.API.CONSUMER.MSG.NEXT.{JOBS_STREAM}.{WORKERS_CONSUMER}"),
                    format!("$JS.API.CONSUMER.INFO.{JOBS_STREAM}.{WORKERS_CONSUMER}"),
                    format!("$JS.ACK.{JOBS_STREAM}.{WORKERS_CONSUMER}.>"),
                ],
                subscribe: vec![subjects::cancel("*"), inbox],
            },
        }
    }
}

/// Subjects a role may use (nats-server `allow` lists).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Permissions {
    pub publish: Vec<String>,
    pub subscribe: Vec<String>,
}

/// A role's user and password (the password never shows in `Debug`).
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub user: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials({}, ..)", self.user)
    }
}

impl Credentials {
    /// A role's user with a fresh random password (192 bits, hex).
    pub fn generate(role: Role) -> Credentials {
        let bytes: [u8; 24] = rand::random();
        Credentials {
            user: role.user().into(),
            password: hex::encode(bytes),
        }
    }
}

/// How a password appears in the server's configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PasswordForm {
    /// As is (a private, 0600 file of a local server).
    Plain,
    /// bcrypt (a fleet's configuration, which may be shared more widely).
    Bcrypt,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("hashing a password with bcrypt failed")]
    Bcrypt(#[from] bcrypt::BcryptError),
}

fn quoted(s: &str) -> String {
    serde_json::Value::String(s.to_owned()).to_string()
}

fn list(items: &[String]) -> String {
    let quoted: Vec<String> = items.iter().map(|s| quoted(s)).collect();
    format!("[{}]", quoted.join(", "))
}

/// The `authorization { users = [...] }` block of a nats-server configuration
/// for these users (each with its role's permissions).
pub fn authorization_block(
    users: &[(Role, &Credentials)],
    form: PasswordForm,
) -> Result<String, ConfigError> {
    let mut out = String::from("authorization {\n  users = [\n");
    for (role, creds) in users {
        let password = match form {
            PasswordForm::Plain => creds.password.clone(),
            // nats-server recognizes bcrypt by its `$2a$` prefix.
            PasswordForm::Bcrypt => bcrypt::hash_with_result(&creds.password, 11)?
                .format_for_version(bcrypt::Version::TwoA),
        };
        let p = role.permissions();
        out.push_str(&format!(
            "    {{\n      user: {}\n      password: {}\n      permissions: {{\n        publish: {{ allow: {} }}\n        subscribe: {{ allow: {} }}\n      }}\n    }}\n",
            quoted(&creds.user),
            quoted(&password),
            list(&p.publish),
            list(&p.subscribe),
        ));
    }
    out.push_str("  ]\n}\n");
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_may_not_read_telemetry_nor_publish_status_or_auth() {
        let w = Role::Worker.permissions();
        assert!(
            !w.subscribe
                .iter()
                .any(|s| s.starts_with("runs.") && !s.ends_with(".cancel"))
        );
        assert!(
            !w.subscribe
                .iter()
                .any(|s| s.contains("gateway") || s == "_INBOX.>")
        );
        assert!(
            !w.publish
                .iter()
                .any(|s| s.contains("status") || s.starts_with("auth."))
        );
        assert!(!w.publish.contains(&subjects::JOBS.to_owned()));
    }

    #[test]
    fn the_block_lists_every_user_and_hashes_on_request() {
        let (g, w) = (
            Credentials::generate(Role::Gateway),
            Credentials::generate(Role::Worker),
        );
        let plain = authorization_block(
            &[(Role::Gateway, &g), (Role::Worker, &w)],
            PasswordForm::Plain,
        )
        .expect("block");
        assert!(plain.contains(&g.password) && plain.contains("\"vm0-worker\""));
        let hashed =
            authorization_block(&[(Role::Worker, &w)], PasswordForm::Bcrypt).expect("block");
        assert!(
            !hashed.contains(&w.password) && hashed.contains("$2a$11$"),
            "{hashed}"
        );
        assert!(format!("{w:?}").find(&w.password).is_none());
    }
}
