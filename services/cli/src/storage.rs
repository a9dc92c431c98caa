//! `vm0 volumes` and `vm0 artifacts`: a directory pushed as a new version
//! (announce the files, PUT each one's bytes to its signed URL, commit) and a
//! version pulled back into a directory, file by file, streaming, checked
//! against its SHA-256. Progress bars only on a terminal.

use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use futures::{StreamExt, TryStreamExt};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use reqwest::{Method, StatusCode};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use vm0_api_types::cursor::Page;
use vm0_api_types::storage::{
    DownloadFile, DownloadListing, Storage, StorageVersion, UploadSession,
};

use crate::api::{Api, decode, segment};
use crate::output::{Output, bytes, or_dash};

/// Files moved at once.
const PARALLEL: usize = 4;

/// Which of the two kinds a command is about.
#[derive(Clone, Copy)]
pub struct Kind {
    /// `/v1/volumes`
    pub path: &'static str,
    /// `volume`
    pub noun: &'static str,
}

pub const VOLUMES: Kind = Kind {
    path: "/v1/volumes",
    noun: "volume",
};
pub const ARTIFACTS: Kind = Kind {
    path: "/v1/artifacts",
    noun: "artifact",
};

#[derive(Subcommand)]
pub enum StorageCommand {
    /// Upload DIR as the next version of NAME (created when new).
    Push(PushArgs),
    /// Download a version (the current one by default) into DIR.
    Pull(PullArgs),
    /// List them.
    Ls {
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// List NAME's versions, newest first.
    Versions {
        name: String,
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Delete NAME with every version.
    Rm { name: String },
}

#[derive(Args)]
pub struct PushArgs {
    dir: PathBuf,
    name: String,
    /// Describes the version.
    #[arg(short, long)]
    message: Option<String>,
}

#[derive(Args)]
pub struct PullArgs {
    /// NAME or NAME:VERSION (a version id or a prefix of 8 or more of its characters).
    spec: String,
    dir: PathBuf,
}

/// One file found under the pushed directory.
struct Local {
    /// `/`-separated, relative.
    path: String,
    full: PathBuf,
    size: u64,
    sha256: Option<String>,
    link: Option<String>,
}

fn bar(out: Output, total: u64, what: &str) -> ProgressBar {
    use std::io::IsTerminal;
    let bar = ProgressBar::with_draw_target(
        Some(total),
        if !out.json && std::io::stderr().is_terminal() {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        },
    );
    if let Ok(style) = ProgressStyle::with_template(
        "{msg:10} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(what.to_owned());
    bar
}

/// Every file and link under `root`, sorted by path. Other kinds (sockets,
/// devices) are skipped with a warning; directories are implied by their files.
fn walk(root: &Path) -> Result<Vec<Local>> {
    let mut found = Vec::new();
    let mut pending = vec![(root.to_path_buf(), String::new())];
    while let Some((dir, prefix)) = pending.pop() {
        let entries =
            std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))?;
        for entry in entries {
            let entry = entry.with_context(|| format!("reading {}", dir.display()))?;
            let name = entry.file_name();
            let name = name.to_str().with_context(|| {
                format!("{}: a file name that is not UTF-8", entry.path().display())
            })?;
            let path = format!("{prefix}{name}");
            let full = entry.path();
            let meta = std::fs::symlink_metadata(&full)
                .with_context(|| format!("reading {}", full.display()))?;
            let kind = meta.file_type();
            if kind.is_dir() {
                pending.push((full, format!("{path}/")));
            } else if kind.is_symlink() {
                let target = std::fs::read_link(&full)
                    .with_context(|| format!("reading the link {}", full.display()))?;
                let target = target
                    .to_str()
                    .with_context(|| {
                        format!("{}: a link target that is not UTF-8", full.display())
                    })?
                    .to_owned();
                found.push(Local {
                    path,
                    full,
                    size: target.len() as u64,
                    sha256: None,
                    link: Some(target),
                });
            } else if kind.is_file() {
                found.push(Local {
                    path,
                    full,
                    size: meta.len(),
                    sha256: None,
                    link: None,
                });
            } else {
                eprintln!(
                    "skipping {} (not a file, directory or link)",
                    full.display()
                );
            }
        }
    }
    found.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(found)
}

async fn sha256_of(file: &Path, progress: &ProgressBar) -> Result<String> {
    use tokio::io::AsyncReadExt;
    let mut f = tokio::fs::File::open(file)
        .await
        .with_context(|| format!("opening {}", file.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = f
            .read(&mut buf)
            .await
            .with_context(|| format!("reading {}", file.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        progress.inc(n as u64);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// The storage named `name`, if there is one.
async fn find(api: &Api, kind: Kind, name: &str) -> Result<Option<Storage>> {
    let page: Page<Storage> = api
        .get(
            kind.path,
            &[("name", name.to_owned()), ("limit", "1".into())],
        )
        .await?;
    Ok(page.data.into_iter().next())
}

async fn named(api: &Api, kind: Kind, name: &str) -> Result<Storage> {
    find(api, kind, name)
        .await?
        .with_context(|| format!("no {} named {name}", kind.noun))
}

pub async fn run(kind: Kind, command: StorageCommand, out: Output) -> Result<()> {
    let api = Api::from_config()?;
    match command {
        StorageCommand::Push(args) => push(&api, kind, args, out).await,
        StorageCommand::Pull(args) => pull(&api, kind, args, out).await,
        StorageCommand::Ls { limit } => {
            let items: Vec<Storage> = api.list_all(kind.path, &[], limit).await?;
            if out.json {
                return out.json(&items);
            }
            let rows: Vec<Vec<String>> = items
                .iter()
                .map(|s| {
                    vec![
                        s.name.clone(),
                        s.id.clone(),
                        or_dash(s.current_version_id.as_ref().map(|v| short(v))),
                        s.file_count.to_string(),
                        bytes(s.size),
                        s.updated_at.to_rfc3339(),
                    ]
                })
                .collect();
            out.table(
                &["NAME", "ID", "VERSION", "FILES", "SIZE", "UPDATED"],
                &rows,
            );
            Ok(())
        }
        StorageCommand::Versions { name, limit } => {
            let storage = named(&api, kind, &name).await?;
            let path = format!("{}/{}/versions", kind.path, segment(&storage.id));
            let versions: Vec<StorageVersion> = api.list_all(&path, &[], limit).await?;
            if out.json {
                return out.json(&versions);
            }
            let rows: Vec<Vec<String>> = versions
                .iter()
                .map(|v| {
                    vec![
                        v.id.clone(),
                        v.file_count.to_string(),
                        bytes(v.size),
                        v.created_at.to_rfc3339(),
                        or_dash(v.message.as_ref()),
                    ]
                })
                .collect();
            out.table(&["VERSION", "FILES", "SIZE", "CREATED", "MESSAGE"], &rows);
            Ok(())
        }
        StorageCommand::Rm { name } => {
            let storage = named(&api, kind, &name).await?;
            api.delete(&format!("{}/{}", kind.path, segment(&storage.id)))
                .await?;
            if out.json {
                return out.json(&serde_json::json!({"deleted": storage.id}));
            }
            println!("deleted {} {name} ({})", kind.noun, storage.id);
            Ok(())
        }
    }
}

fn files_count(n: u64) -> String {
    if n == 1 {
        "1 file".into()
    } else {
        format!("{n} files")
    }
}

fn short(version: &str) -> String {
    version.chars().take(12).collect()
}

async fn push(api: &Api, kind: Kind, args: PushArgs, out: Output) -> Result<()> {
    let meta =
        std::fs::metadata(&args.dir).with_context(|| format!("reading {}", args.dir.display()))?;
    if !meta.is_dir() {
        bail!("{} is not a directory", args.dir.display());
    }
    let root = args.dir.clone();
    let mut files = tokio::task::spawn_blocking(move || walk(&root)).await??;
    let total: u64 = files
        .iter()
        .filter(|f| f.link.is_none())
        .map(|f| f.size)
        .sum();

    let hashing = bar(out, total, "hashing");
    for file in files.iter_mut().filter(|f| f.link.is_none()) {
        file.sha256 = Some(sha256_of(&file.full, &hashing).await?);
    }
    hashing.finish_and_clear();

    let storage = match find(api, kind, &args.name).await? {
        Some(s) => s,
        None => api
            .send_json(
                Method::POST,
                kind.path,
                &serde_json::json!({"name": args.name}),
            )
            .await
            .with_context(|| format!("creating {} {}", kind.noun, args.name))?,
    };
    let announced: Vec<serde_json::Value> = files
        .iter()
        .map(|f| {
            let mut v = serde_json::json!({"path": f.path, "size": f.size});
            if let Some(sha) = &f.sha256 {
                v["sha256"] = sha.clone().into();
            }
            if let Some(link) = &f.link {
                v["link"] = link.clone().into();
            }
            v
        })
        .collect();
    let mut body = serde_json::json!({"files": announced});
    if let Some(m) = &args.message {
        body["message"] = m.clone().into();
    }
    let base = format!("{}/{}", kind.path, segment(&storage.id));
    let session: UploadSession = api
        .send_json(Method::POST, &format!("{base}/upload"), &body)
        .await
        .context("announcing the upload")?;
    if session.files.len() != files.len() {
        bail!(
            "the API answered for {} files of {}",
            session.files.len(),
            files.len()
        );
    }

    let uploading = bar(out, total, "uploading");
    let jobs = files
        .iter()
        .zip(&session.files)
        .filter_map(|(local, target)| target.upload_url.as_ref().map(|url| (local, url)));
    futures::stream::iter(jobs)
        .map(|(local, url)| put(api, local, url, &uploading))
        .buffer_unordered(PARALLEL)
        .try_collect::<Vec<()>>()
        .await?;
    uploading.finish_and_clear();

    let response = api
        .send(
            api.request(Method::POST, &format!("{base}/commit"))
                .json(&serde_json::json!({"uploadSessionId": session.upload_session_id})),
        )
        .await
        .context("committing the upload")?;
    let new = response.status() == StatusCode::CREATED;
    let version: StorageVersion = decode(response).await?;
    if out.json {
        return out.json(&serde_json::json!({"new": new, "version": version}));
    }
    println!(
        "{} {} version {} ({}, {}){}",
        kind.noun,
        args.name,
        version.id,
        files_count(version.file_count as u64),
        bytes(version.size),
        if new {
            ""
        } else {
            ": unchanged, the same content is already a version"
        }
    );
    Ok(())
}

async fn put(api: &Api, local: &Local, url: &str, progress: &ProgressBar) -> Result<()> {
    let file = tokio::fs::File::open(&local.full)
        .await
        .with_context(|| format!("opening {}", local.full.display()))?;
    let progress = progress.clone();
    let stream = tokio_util::io::ReaderStream::with_capacity(file, 256 * 1024)
        .inspect_ok(move |chunk| progress.inc(chunk.len() as u64));
    let response = api
        .http()
        .put(url)
        .header(reqwest::header::CONTENT_LENGTH, local.size)
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .with_context(|| format!("uploading {}", local.path))?;
    crate::api::checked(response)
        .await
        .with_context(|| format!("uploading {}", local.path))?;
    Ok(())
}

/// `path` as a relative path under the pulled directory, refusing anything
/// that would leave it.
fn safe_relative(path: &str) -> Result<PathBuf> {
    let p = Path::new(path);
    if path.is_empty() || !p.components().all(|c| matches!(c, Component::Normal(_))) {
        bail!("refusing the file {path:?}: not a plain relative path");
    }
    Ok(p.to_path_buf())
}

/// Refuses to write through a symbolic link that is already under `root`.
fn no_link_between(root: &Path, relative: &Path) -> Result<()> {
    let mut at = root.to_path_buf();
    let parents: Vec<_> = relative.components().collect();
    for c in &parents[..parents.len().saturating_sub(1)] {
        at.push(c);
        if let Ok(meta) = std::fs::symlink_metadata(&at)
            && meta.file_type().is_symlink()
        {
            bail!(
                "refusing to write through the symbolic link {}",
                at.display()
            );
        }
    }
    Ok(())
}

async fn pull(api: &Api, kind: Kind, args: PullArgs, out: Output) -> Result<()> {
    let (name, version) = match args.spec.split_once(':') {
        Some((n, v)) => (n.to_owned(), Some(v.to_owned())),
        None => (args.spec.clone(), None),
    };
    let storage = named(api, kind, &name).await?;
    let mut query = vec![("format", "json".to_owned())];
    if let Some(v) = version.filter(|v| v != "latest") {
        query.push(("versionId", v));
    }
    let listing: DownloadListing = api
        .get(
            &format!("{}/{}/download", kind.path, segment(&storage.id)),
            &query,
        )
        .await?;
    tokio::fs::create_dir_all(&args.dir)
        .await
        .with_context(|| format!("creating {}", args.dir.display()))?;
    let planned: Vec<(PathBuf, &DownloadFile)> = listing
        .files
        .iter()
        .map(|f| Ok((safe_relative(&f.path)?, f)))
        .collect::<Result<_>>()?;
    let total: u64 = planned
        .iter()
        .filter(|(_, f)| f.link.is_none())
        .map(|(_, f)| f.size)
        .sum();
    let downloading = bar(out, total, "downloading");
    let files = planned.iter().filter(|(_, f)| f.link.is_none());
    futures::stream::iter(files)
        .map(|(rel, f)| fetch(api, &args.dir, rel, f, &downloading))
        .buffer_unordered(PARALLEL)
        .try_collect::<Vec<()>>()
        .await?;
    downloading.finish_and_clear();
    // Links last: nothing is ever written through one of them.
    for (rel, f) in planned.iter().filter(|(_, f)| f.link.is_some()) {
        let target = f.link.as_deref().unwrap_or_default();
        no_link_between(&args.dir, rel)?;
        let at = args.dir.join(rel);
        if let Some(parent) = at.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        match std::fs::symlink_metadata(&at) {
            Ok(m) if m.is_dir() => bail!(
                "{} is a directory; the version has a link there",
                at.display()
            ),
            Ok(_) => {
                std::fs::remove_file(&at).with_context(|| format!("replacing {}", at.display()))?
            }
            Err(_) => {}
        }
        std::os::unix::fs::symlink(target, &at)
            .with_context(|| format!("linking {}", at.display()))?;
    }
    let size: u64 = listing.files.iter().map(|f| f.size).sum();
    if out.json {
        return out.json(&serde_json::json!({
            "versionId": listing.version_id,
            "fileCount": listing.files.len(),
            "size": size,
            "dir": args.dir,
        }));
    }
    println!(
        "pulled {} {name} version {} into {} ({}, {})",
        kind.noun,
        listing.version_id,
        args.dir.display(),
        files_count(listing.files.len() as u64),
        bytes(size as i64)
    );
    Ok(())
}

async fn fetch(
    api: &Api,
    root: &Path,
    rel: &Path,
    file: &DownloadFile,
    progress: &ProgressBar,
) -> Result<()> {
    no_link_between(root, rel)?;
    let at = root.join(rel);
    if let Some(parent) = at.parent() {
        tokio::fs::create_dir_all(parent)
            .await
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    let partial = at.with_file_name(format!(
        ".{}.vm0-partial",
        at.file_name().and_then(|n| n.to_str()).unwrap_or("file")
    ));
    let mut out = tokio::fs::File::create(&partial)
        .await
        .with_context(|| format!("writing {}", partial.display()))?;
    let mut hasher = Sha256::new();
    let mut received = 0u64;
    if let Some(url) = &file.download_url {
        let response = api
            .http()
            .get(url)
            .timeout(Duration::from_secs(3600))
            .send()
            .await
            .with_context(|| format!("downloading {}", file.path))?;
        let response = crate::api::checked(response)
            .await
            .with_context(|| format!("downloading {}", file.path))?;
        let mut body = response.bytes_stream();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.with_context(|| format!("downloading {}", file.path))?;
            received += chunk.len() as u64;
            if received > file.size {
                break;
            }
            hasher.update(&chunk);
            out.write_all(&chunk).await?;
            progress.inc(chunk.len() as u64);
        }
    }
    out.flush().await?;
    drop(out);
    let sha = hex::encode(hasher.finalize());
    if received != file.size || sha != file.sha256 {
        let _ = tokio::fs::remove_file(&partial).await;
        bail!(
            "{}: received {received} bytes with SHA-256 {sha}, the version says {} bytes, {}",
            file.path,
            file.size,
            file.sha256
        );
    }
    tokio::fs::rename(&partial, &at)
        .await
        .with_context(|| format!("writing {}", at.display()))?;
    Ok(())
}
