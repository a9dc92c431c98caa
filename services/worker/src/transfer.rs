//! What the worker moves for a run: its volumes and artifact version in
//! (fetched from signed URLs, checked against their content hash, kept in a
//! cache by version id), and what it left in `/work` out (checked, uploaded
//! file by file to the URLs the control plane signs). Every step is a line of
//! the run's system log, with sizes and times.

use std::path::{Path, PathBuf};
use std::time::Instant;

use futures::StreamExt;
use tokio::io::AsyncWriteExt;
use vm0_proto::worker as pb;
use vm0_sandbox::{TreeIn, TreeOut};
use vm0_storage::{Limits, Manifest, VersionId};

/// The session's state directory in every sandbox (`VM0_STATE_DIR`): saved
/// with a completed run's checkpoint, given back to the next run of the session.
pub const STATE_DIR: &str = "/state";

/// PUTs in flight for one run's outputs.
const PUTS_IN_FLIGHT: usize = 8;

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1 << 20) as f64)
}

/// The limits a run's trees are held to (the deployment's, from the claim).
pub fn limits(spec: &pb::RunSpec) -> Limits {
    let d = Limits::default();
    Limits {
        max_file_bytes: if spec.max_tree_bytes == 0 {
            d.max_file_bytes
        } else {
            spec.max_tree_bytes
        },
        max_total_bytes: if spec.max_tree_bytes == 0 {
            d.max_total_bytes
        } else {
            spec.max_tree_bytes
        },
        max_files: if spec.max_tree_files == 0 {
            d.max_files
        } else {
            usize::try_from(spec.max_tree_files).unwrap_or(usize::MAX)
        },
        ..d
    }
}

/// Where a worker keeps versions (`<version>/archive.tar.gz` and `tree/`) and
/// each run's transfers.
#[derive(Debug)]
pub struct Transfers {
    pub cache_dir: PathBuf,
    pub runs_dir: PathBuf,
    pub http: reqwest::Client,
    /// Bytes of versions kept at most (archives and trees).
    pub cache_max_bytes: u64,
    /// Versions runs use now (run id → version ids): never evicted.
    in_use: std::sync::Mutex<std::collections::HashMap<String, Vec<String>>>,
}

/// A version on this worker: its archive and the tree it unpacks to.
struct Cached {
    archive: PathBuf,
    tree: PathBuf,
}

impl Transfers {
    pub fn new(worker_dir: &Path, cache_max_bytes: u64) -> Transfers {
        Transfers {
            cache_dir: worker_dir.join("versions"),
            runs_dir: worker_dir.join("transfers"),
            http: reqwest::Client::builder()
                .connect_timeout(std::time::Duration::from_secs(10))
                .build()
                .unwrap_or_default(),
            cache_max_bytes,
            in_use: Default::default(),
        }
    }

    fn using(&self, run_id: &str, version: &str) {
        if let Ok(mut in_use) = self.in_use.lock() {
            in_use
                .entry(run_id.to_owned())
                .or_default()
                .push(version.to_owned());
        }
    }

    /// Deletes the least recently used versions no run uses until the cache
    /// holds at most `cache_max_bytes`.
    fn evict(&self) {
        let busy: std::collections::HashSet<String> = self
            .in_use
            .lock()
            .map(|m| m.values().flatten().cloned().collect())
            .unwrap_or_default();
        let Ok(listing) = std::fs::read_dir(&self.cache_dir) else {
            return;
        };
        let mut kept: Vec<(std::time::SystemTime, u64, PathBuf)> = listing
            .flatten()
            .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
            .filter_map(|e| {
                let used = e.metadata().and_then(|m| m.modified()).ok()?;
                let size = std::fs::read_to_string(e.path().join("bytes"))
                    .ok()?
                    .trim()
                    .parse()
                    .ok()?;
                Some((used, size, e.path()))
            })
            .collect();
        let mut total: u64 = kept.iter().map(|k| k.1).sum();
        kept.sort();
        for (_, size, dir) in kept {
            if total <= self.cache_max_bytes {
                break;
            }
            let name = dir.file_name().map(|n| n.to_string_lossy().into_owned());
            if name.is_some_and(|n| busy.contains(&n)) {
                continue;
            }
            if std::fs::remove_dir_all(&dir).is_ok() {
                total = total.saturating_sub(size);
                tracing::info!(dir = %dir.display(), size, "version evicted from the cache");
            }
        }
    }

    /// The directory of one run's transfers (removed by [`Transfers::done`]).
    pub fn run_dir(&self, run_id: &str) -> PathBuf {
        self.runs_dir.join(run_id)
    }

    pub async fn done(&self, run_id: &str) {
        let _ = tokio::fs::remove_dir_all(self.run_dir(run_id)).await;
        if let Ok(mut in_use) = self.in_use.lock() {
            in_use.remove(run_id);
        }
    }

    /// Downloads `url` to `to`, at most `limit` bytes.
    async fn download(&self, url: &str, to: &Path, limit: u64) -> Result<u64, String> {
        let resp = self
            .http
            .get(url)
            .send()
            .await
            .map_err(|e| format!("fetching: {e}"))?;
        if !resp.status().is_success() {
            return Err(format!("fetching: the store answered {}", resp.status()));
        }
        let mut file = tokio::fs::File::create(to)
            .await
            .map_err(|e| format!("{}: {e}", to.display()))?;
        let mut body = resp.bytes_stream();
        let mut got: u64 = 0;
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| format!("fetching: {e}"))?;
            got += chunk.len() as u64;
            if got > limit {
                return Err(format!("the archive is larger than {}", mib(limit)));
            }
            file.write_all(&chunk)
                .await
                .map_err(|e| format!("{}: {e}", to.display()))?;
        }
        file.flush()
            .await
            .map_err(|e| format!("{}: {e}", to.display()))?;
        Ok(got)
    }

    /// A version, from the cache or fetched into it; checked: the tree it
    /// unpacks to must hash to its id. Returns it and a log line.
    async fn version(
        &self,
        run_id: &str,
        tree: &pb::TreeVersion,
        limits: &Limits,
    ) -> Result<(Cached, String), String> {
        let id = VersionId::parse(&tree.version_id)
            .ok_or_else(|| format!("{:?} is not a version id", tree.version_id))?;
        let dir = self.cache_dir.join(id.as_str());
        let cached = Cached {
            archive: dir.join("archive.tar.gz"),
            tree: dir.join("tree"),
        };
        self.using(run_id, id.as_str());
        if tokio::fs::try_exists(&cached.tree).await.unwrap_or(false) {
            // Used now: the last to go.
            if let Ok(dir) = std::fs::File::open(&dir) {
                let _ = dir.set_modified(std::time::SystemTime::now());
            }
            let line = format!(
                "version {} of '{}' ({} files, {}) from this worker's cache",
                &id.as_str()[..12],
                tree.name,
                tree.file_count,
                mib(tree.size)
            );
            return Ok((cached, line));
        }
        let started = Instant::now();
        let tmp = self
            .cache_dir
            .join(format!(".{}.{:016x}", id.as_str(), rand::random::<u64>()));
        tokio::fs::create_dir_all(&tmp)
            .await
            .map_err(|e| format!("{}: {e}", tmp.display()))?;
        let result = async {
            let archive = tmp.join("archive.tar.gz");
            let limit = limits.max_total_bytes.saturating_add(limits.max_total_bytes / 16) + (1 << 20);
            let fetched = self.download(&tree.archive_url, &archive, limit).await?;
            let fetch_ms = started.elapsed().as_millis();
            let dest = tmp.join("tree");
            let limits = *limits;
            let manifest = tokio::task::spawn_blocking(move || -> Result<Manifest, String> {
                let file = std::fs::File::open(&archive).map_err(|e| e.to_string())?;
                vm0_storage::unpack(std::io::BufReader::new(file), &dest, &limits)
                    .map_err(|e| e.to_string())
            })
            .await
            .map_err(|e| e.to_string())??;
            if manifest.version_id() != id {
                return Err(format!(
                    "the archive holds version {}, not {}: refused",
                    manifest.version_id(),
                    id
                ));
            }
            let bytes = fetched + manifest.total_bytes();
            tokio::fs::write(tmp.join("bytes"), bytes.to_string())
                .await
                .map_err(|e| e.to_string())?;
            Ok::<_, String>(format!(
                "version {} of '{}' ({} files, {}; {} archive) fetched in {fetch_ms} ms, checked and unpacked in {} ms",
                &id.as_str()[..12],
                tree.name,
                manifest.files().len(),
                mib(manifest.total_bytes()),
                mib(fetched),
                started.elapsed().as_millis() - fetch_ms
            ))
        }
        .await;
        match result {
            Ok(line) => {
                // Another run may have cached it meanwhile: theirs is the same.
                if tokio::fs::rename(&tmp, &dir).await.is_err() {
                    let _ = tokio::fs::remove_dir_all(&tmp).await;
                }
                self.evict();
                Ok((cached, line))
            }
            Err(e) => {
                let _ = tokio::fs::remove_dir_all(&tmp).await;
                Err(e)
            }
        }
    }

    /// The run's trees: each volume read-only at `/volumes/<name>`, the
    /// artifact's version in `/work`; with a log line for each.
    pub async fn inputs(&self, spec: &pb::RunSpec) -> Result<(Vec<TreeIn>, Vec<String>), String> {
        let limits = limits(spec);
        let dir = self.run_dir(&spec.run_id);
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(|e| format!("{}: {e}", dir.display()))?;
        let mut trees = Vec::new();
        let mut lines = Vec::new();
        for volume in &spec.volumes {
            let (cached, line) = self
                .version(&spec.run_id, volume, &limits)
                .await
                .map_err(|e| format!("volume '{}': {e}", volume.name))?;
            lines.push(format!("volume {line}"));
            trees.push(TreeIn {
                dest: format!("/volumes/{}", volume.name),
                archive: cached.archive,
                unpacked: Some(cached.tree),
                read_only: true,
                max_bytes: limits.max_total_bytes,
                max_files: limits.max_files as u64,
            });
        }
        // The session's state, when the run resumes one (the guest agent makes
        // an empty state directory otherwise).
        if let Some(state) = &spec.state {
            let (cached, line) = self
                .version(&spec.run_id, state, &limits)
                .await
                .map_err(|e| format!("the session's state: {e}"))?;
            lines.push(format!("state {line}"));
            trees.push(TreeIn {
                dest: STATE_DIR.into(),
                archive: cached.archive,
                unpacked: None,
                read_only: false,
                max_bytes: limits.max_total_bytes,
                max_files: limits.max_files as u64,
            });
        }
        if let Some(artifact) = &spec.artifact {
            let (cached, line) = self
                .version(&spec.run_id, artifact, &limits)
                .await
                .map_err(|e| format!("artifact '{}': {e}", artifact.name))?;
            lines.push(format!("artifact {line}"));
            trees.push(TreeIn {
                dest: "/work".into(),
                archive: cached.archive,
                unpacked: None,
                read_only: false,
                max_bytes: limits.max_total_bytes,
                max_files: limits.max_files as u64,
            });
        }
        Ok((trees, lines))
    }

    /// What the run leaves: `/work` when it has an artifact, and the state
    /// directory (a completed run's checkpoint).
    pub fn outputs(&self, spec: &pb::RunSpec) -> Vec<TreeOut> {
        let limits = limits(spec);
        let out = |src: &str, name: &str| TreeOut {
            src: src.into(),
            archive: self.run_dir(&spec.run_id).join(format!("{name}.tar.gz")),
            max_bytes: limits.max_total_bytes,
            max_files: limits.max_files as u64,
        };
        let mut trees = vec![out(STATE_DIR, "state")];
        if !spec.artifact_name.is_empty() {
            trees.push(out("/work", "work"));
        }
        trees
    }

    /// Checks the archive the sandbox gave (it comes from inside: unpacked here
    /// under the limits, as any upload would be) and uploads its files to
    /// where the control plane says. Returns the upload's id and a log line.
    pub async fn save_output(
        &self,
        control: &crate::control::Client,
        worker_id: &str,
        spec: &pb::RunSpec,
        attempt: u32,
        tree: &str,
    ) -> Result<(String, String), String> {
        let started = Instant::now();
        let limits = limits(spec);
        let archive = self.run_dir(&spec.run_id).join(format!("{tree}.tar.gz"));
        let archive = archive.as_path();
        let dest = self.run_dir(&spec.run_id).join(tree);
        let manifest = {
            let (archive, dest) = (archive.to_owned(), dest.clone());
            tokio::task::spawn_blocking(move || -> Result<Manifest, String> {
                let file = std::fs::File::open(&archive).map_err(|e| e.to_string())?;
                vm0_storage::unpack(std::io::BufReader::new(file), &dest, &limits)
                    .map_err(|e| e.to_string())
            })
            .await
            .map_err(|e| e.to_string())??
        };
        let files = manifest
            .files()
            .iter()
            .map(|f| pb::OutputFile {
                path: f.path.clone(),
                size: f.size,
                sha256: f.sha256.clone(),
                link: f.link.clone().unwrap_or_default(),
            })
            .collect();
        let req = pb::BeginOutputRequest {
            run_id: spec.run_id.clone(),
            worker_id: worker_id.to_owned(),
            attempt,
            files,
            tree: tree.to_owned(),
        };
        let begun = crate::control::retry("begin output", || {
            let mut client = control.clone();
            let req = req.clone();
            async move { client.begin_output(req).await }
        })
        .await
        .map_err(|s| s.message().to_owned())?;
        if begun.upload_urls.len() != manifest.files().len() {
            return Err("the control plane answered with the wrong number of URLs".into());
        }
        let jobs: Vec<(PathBuf, String, u64, String)> = manifest
            .files()
            .iter()
            .zip(&begun.upload_urls)
            .filter(|(_, url)| !url.is_empty())
            .map(|(f, url)| (dest.join(&f.path), url.clone(), f.size, f.path.clone()))
            .collect();
        let http = self.http.clone();
        let puts = jobs.into_iter().map(move |(path, url, size, name)| {
            let http = http.clone();
            async move {
                let file = tokio::fs::File::open(&path)
                    .await
                    .map_err(|e| format!("{name}: {e}"))?;
                let body = reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::new(file));
                let resp = http
                    .put(&url)
                    .header(reqwest::header::CONTENT_LENGTH, size)
                    .body(body)
                    .send()
                    .await
                    .map_err(|e| format!("{name}: {e}"))?;
                if resp.status().is_success() {
                    Ok(())
                } else {
                    Err(format!("{name}: the store answered {}", resp.status()))
                }
            }
        });
        futures::stream::iter(puts)
            .buffer_unordered(PUTS_IN_FLIGHT)
            .collect::<Vec<Result<(), String>>>()
            .await
            .into_iter()
            .collect::<Result<Vec<()>, String>>()?;
        let line = format!(
            "{}: {} files, {} checked and uploaded in {} ms",
            if tree == "state" { STATE_DIR } else { "/work" },
            manifest.files().len(),
            mib(manifest.total_bytes()),
            started.elapsed().as_millis()
        );
        Ok((begun.upload_id, line))
    }
}
