//! `vm0 auth`: where the CLI finds the API and its token. `login` checks a token
//! against the API and stores it with the URL in
//! `$XDG_CONFIG_HOME/vm0/config.toml` (mode 0600); `setup-token` prints the
//! token (what the documents tell users to run); `logout` forgets both.
//! `VM0_API_URL` and `VM0_API_KEY` override the file.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use serde::{Deserialize, Serialize};

/// Where the API is when nothing says otherwise (`vm0 dev`'s default).
pub const DEFAULT_URL: &str = "http://127.0.0.1:8080";

#[derive(Subcommand)]
pub enum AuthCommand {
    /// Check a token against the API and store it (read from stdin without --token).
    Login(LoginArgs),
    /// Print the stored token (VM0_API_KEY, when set, wins).
    SetupToken,
    /// Forget the stored URL and token.
    Logout,
}

#[derive(Args)]
pub struct LoginArgs {
    /// The API's base URL (default: VM0_API_URL, the stored one, or http://127.0.0.1:8080).
    #[arg(long)]
    url: Option<String>,
    /// The API token; read from stdin when absent.
    #[arg(long)]
    token: Option<String>,
}

/// What is stored.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credentials {
    pub url: String,
    pub token: String,
}

/// `$XDG_CONFIG_HOME/vm0/config.toml`, or `~/.config/vm0/config.toml`.
pub fn config_file() -> Result<PathBuf> {
    let base = match std::env::var_os("XDG_CONFIG_HOME").filter(|v| !v.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(
            std::env::var_os("HOME").context("neither XDG_CONFIG_HOME nor HOME is set")?,
        )
        .join(".config"),
    };
    Ok(base.join("vm0").join("config.toml"))
}

fn read_stored() -> Result<Option<Credentials>> {
    let file = config_file()?;
    match std::fs::read_to_string(&file) {
        Ok(text) => toml::from_str(&text)
            .map(Some)
            .with_context(|| format!("reading {}", file.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", file.display())),
    }
}

/// Writes `creds` readable by this user only (the file is made 0600 before
/// the token is in it).
pub fn store(creds: &Credentials) -> Result<PathBuf> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = config_file()?;
    let dir = file.parent().context("the config file has no directory")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let text = toml::to_string(creds).context("encoding the credentials")?;
    let partial = file.with_extension("toml.partial");
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&partial)
        .with_context(|| format!("writing {}", partial.display()))?;
    out.write_all(text.as_bytes())?;
    out.sync_all()?;
    std::fs::rename(&partial, &file).with_context(|| format!("writing {}", file.display()))?;
    Ok(file)
}

/// The URL and token every other command uses: the environment's, else the
/// stored ones.
pub fn current() -> Result<Credentials> {
    let stored = read_stored()?.unwrap_or_default();
    let url = std::env::var("VM0_API_URL")
        .ok()
        .filter(|u| !u.is_empty())
        .or(Some(stored.url).filter(|u| !u.is_empty()))
        .unwrap_or_else(|| DEFAULT_URL.to_owned());
    let token = std::env::var("VM0_API_KEY")
        .ok()
        .filter(|t| !t.is_empty())
        .unwrap_or(stored.token);
    Ok(Credentials { url, token })
}

/// Checks `creds` with an authenticated request the API answers cheaply.
async fn check(creds: &Credentials) -> Result<()> {
    let url = format!("{}/v1/agents?limit=1", creds.url.trim_end_matches('/'));
    let response = reqwest::Client::new()
        .get(&url)
        .bearer_auth(&creds.token)
        .send()
        .await
        .with_context(|| format!("reaching {}", creds.url))?;
    crate::api::checked(response)
        .await
        .map(drop)
        .context("the token was not accepted")
}

pub async fn run(command: AuthCommand) -> Result<()> {
    match command {
        AuthCommand::Login(args) => {
            let url = match args.url {
                Some(url) => url,
                None => current()?.url,
            };
            let token = match args.token {
                Some(t) => t,
                None => {
                    let mut line = String::new();
                    std::io::stdin()
                        .read_line(&mut line)
                        .context("reading the token from stdin")?;
                    line
                }
            };
            let token = token.trim().to_owned();
            if token.is_empty() {
                bail!("no token given (--token, or on stdin)");
            }
            let creds = Credentials { url, token };
            check(&creds).await?;
            let file = store(&creds)?;
            println!("logged in to {} (stored in {})", creds.url, file.display());
            Ok(())
        }
        AuthCommand::SetupToken => {
            let creds = current()?;
            if creds.token.is_empty() {
                bail!("no token stored: run `vm0 auth login` first (or set VM0_API_KEY)");
            }
            println!("{}", creds.token);
            Ok(())
        }
        AuthCommand::Logout => {
            let file = config_file()?;
            match std::fs::remove_file(&file) {
                Ok(()) => println!("logged out ({} removed)", file.display()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => println!("not logged in"),
                Err(e) => return Err(e).with_context(|| format!("removing {}", file.display())),
            }
            Ok(())
        }
    }
}
