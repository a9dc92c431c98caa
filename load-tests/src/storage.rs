//! `vm0-bench --scenario storage`: volumes and artifacts through the API and in
//! runs, on the store the gateway was started with (local, or S3 with `--s3`):
//!
//! - upload (PUT to the signed URL), commit, and download (the archive through
//!   the 302; the file through the listing) of one file of `--mib` MiB of
//!   incompressible bytes, in MB/s, the median of three;
//! - what a volume of that size adds to a run's start (fetched into the
//!   worker's cache, then from the cache), and what an artifact of that size
//!   adds to its end (taken out, checked, uploaded, committed): run durations
//!   (created → completed, from the store) against the same run without;
//! - against `cp` and `tar czf` of the same bytes on the same disk.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::Bench;

fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

fn mbps(bytes: usize, took: Duration) -> f64 {
    bytes as f64 / 1e6 / took.as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

impl Bench {
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value> {
        let mut req = self
            .client
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token);
        if let Some(body) = body {
            req = req.json(&body);
        }
        let resp = req.send().await?;
        let status = resp.status();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        anyhow::ensure!(status.is_success(), "{path}: {status} {body}");
        Ok(body)
    }

    /// One version of one file; returns (PUT time, commit time, version id).
    async fn push_one(
        &self,
        kind: &str,
        id: &str,
        data: &[u8],
    ) -> Result<(Duration, Duration, String)> {
        let session = self
            .call(
                reqwest::Method::POST,
                &format!("/v1/{kind}/{id}/upload"),
                Some(json!({"files": [{"path": "data.bin", "size": data.len(), "sha256": hex::encode(Sha256::digest(data))}]})),
            )
            .await?;
        let url = session["files"][0]["uploadUrl"].as_str().context("url")?;
        let started = Instant::now();
        let resp = self.client.put(url).body(data.to_vec()).send().await?;
        anyhow::ensure!(resp.status().is_success(), "PUT: {}", resp.status());
        let put = started.elapsed();
        let started = Instant::now();
        let version = self
            .call(
                reqwest::Method::POST,
                &format!("/v1/{kind}/{id}/commit"),
                Some(json!({"uploadSessionId": session["uploadSessionId"]})),
            )
            .await?;
        Ok((
            put,
            started.elapsed(),
            version["id"].as_str().context("id")?.to_owned(),
        ))
    }

    /// Run duration, created → completed, in ms (the store's clock).
    async fn run_ms(&self, org: &str, body: Value) -> Result<(f64, Value)> {
        let run = self
            .call(reqwest::Method::POST, "/v1/runs", Some(body))
            .await?;
        let id = run["id"].as_str().context("id")?.to_owned();
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            let row = self.store.get_run(org, &id).await?.context("run")?;
            if let Some(done) = row.completed_at {
                anyhow::ensure!(
                    row.status == "completed",
                    "run {id} ended {}: {:?}",
                    row.status,
                    row.error
                );
                let run = self
                    .call(reqwest::Method::GET, &format!("/v1/runs/{id}"), None)
                    .await?;
                return Ok(((done - row.created_at) as f64 / 1000.0, run));
            }
            anyhow::ensure!(Instant::now() < deadline, "run {id} did not finish");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn agent(&self, name: &str, command: Value) -> Result<()> {
        self.call(
            reqwest::Method::POST,
            "/v1/agents",
            Some(json!({"name": name, "config": {"command": command, "resources": {"memoryMb": 512, "diskMb": 1024}}})),
        )
        .await
        .map(drop)
    }
}

/// `cp` and `tar czf` of `data` on the disk of `dir`, in ms (the median of three).
fn baselines(dir: &std::path::Path, data: &[u8]) -> Result<(f64, f64)> {
    let src = dir.join("baseline/src");
    std::fs::create_dir_all(&src)?;
    std::fs::write(src.join("data.bin"), data)?;
    let time = |cmd: &mut std::process::Command| -> Result<f64> {
        let started = Instant::now();
        let status = cmd.status()?;
        anyhow::ensure!(status.success(), "{cmd:?}: {status}");
        Ok(started.elapsed().as_secs_f64() * 1000.0)
    };
    let mut cp = Vec::new();
    let mut tar = Vec::new();
    for i in 0..3 {
        let to = dir.join(format!("baseline/copy{i}"));
        cp.push(time(
            std::process::Command::new("cp")
                .arg(src.join("data.bin"))
                .arg(&to),
        )?);
        let out = dir.join(format!("baseline/t{i}.tar.gz"));
        tar.push(time(
            std::process::Command::new("tar")
                .arg("czf")
                .arg(&out)
                .arg("-C")
                .arg(&src)
                .arg("."),
        )?);
    }
    Ok((median(cp), median(tar)))
}

pub async fn storage(
    b: &Bench,
    org: &str,
    mib: usize,
    dir: &std::path::Path,
    store: &str,
) -> Result<()> {
    let size = mib << 20;
    let (cp_ms, tar_ms) = baselines(dir, &noise(size, 99))?;
    println!(
        "storage ({store}): {mib} MiB of incompressible bytes; on this disk cp takes {cp_ms:.0} ms, tar czf {tar_ms:.0} ms"
    );

    // Through the API.
    let vol = b
        .call(
            reqwest::Method::POST,
            "/v1/volumes",
            Some(json!({"name": "bench-volume"})),
        )
        .await?;
    let vol = vol["id"].as_str().context("id")?.to_owned();
    let (mut up, mut commit, mut archive, mut file) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()?;
    for round in 0..3u64 {
        let data = noise(size, round + 1);
        let (put, committed, _) = b.push_one("volumes", &vol, &data).await?;
        up.push(mbps(size, put));
        commit.push(committed.as_secs_f64() * 1000.0);
        let started = Instant::now();
        let resp = http
            .get(format!("{}/v1/volumes/{vol}/download", b.base))
            .bearer_auth(&b.token)
            .send()
            .await?;
        let location = resp
            .headers()
            .get("location")
            .context("302")?
            .to_str()?
            .to_owned();
        let got = http.get(&location).send().await?.bytes().await?;
        archive.push(mbps(got.len(), started.elapsed()));
        let listing = b
            .call(
                reqwest::Method::GET,
                &format!("/v1/volumes/{vol}/download?format=json"),
                None,
            )
            .await?;
        let url = listing["files"][0]["downloadUrl"].as_str().context("url")?;
        let started = Instant::now();
        let got = http.get(url).send().await?.bytes().await?;
        file.push(mbps(got.len(), started.elapsed()));
        anyhow::ensure!(
            got.len() == size && got[..] == data[..],
            "download is byte for byte"
        );
    }
    println!(
        "  API: upload (PUT) {:.0} MB/s, commit {:.0} ms ({:.0} MB/s), download archive {:.0} MB/s, download file {:.0} MB/s",
        median(up),
        median(commit.clone()),
        size as f64 / 1e6 / (median(commit) / 1000.0),
        median(archive),
        median(file)
    );

    // In runs: a volume at the start, an artifact at the end.
    b.agent("bench-noop", json!(["true"])).await?;
    b.agent(
        "bench-write",
        json!([
            "sh",
            "-c",
            format!("head -c {size} /dev/urandom > \"$OUT/data.bin\"")
        ]),
    )
    .await?;
    let mut plain = Vec::new();
    for _ in 0..3 {
        plain.push(
            b.run_ms(org, json!({"agent": "bench-noop", "prompt": "p"}))
                .await?
                .0,
        );
    }
    let plain = median(plain);
    // The last version pushed: fresh to the worker's cache first.
    let fresh = b
        .run_ms(
            org,
            json!({"agent": "bench-noop", "prompt": "p", "volumes": {"bench-volume": "latest"}}),
        )
        .await?
        .0;
    let mut cached = Vec::new();
    for _ in 0..3 {
        cached.push(
            b.run_ms(org, json!({"agent": "bench-noop", "prompt": "p", "volumes": {"bench-volume": "latest"}}))
                .await?
                .0,
        );
    }
    let cached = median(cached);
    println!(
        "  run start: {plain:.0} ms without a volume; with a {mib} MiB volume {fresh:.0} ms (+{:.0} ms) fetched, {cached:.0} ms (+{:.0} ms) from the worker's cache",
        fresh - plain,
        cached - plain
    );
    let mut to_tmp = Vec::new();
    let mut to_work = Vec::new();
    for i in 0..3 {
        to_tmp.push(
            b.run_ms(
                org,
                json!({"agent": "bench-write", "prompt": "p", "variables": {"OUT": "/tmp"}}),
            )
            .await?
            .0,
        );
        let (ms, run) = b
            .run_ms(org, json!({"agent": "bench-write", "prompt": "p", "variables": {"OUT": "/work"}, "artifactName": format!("bench-artifact-{i}")}))
            .await?;
        anyhow::ensure!(
            run["artifactVersion"].is_string(),
            "an artifact version: {run}"
        );
        to_work.push(ms);
    }
    let (to_tmp, to_work) = (median(to_tmp), median(to_work));
    println!(
        "  run end: writing {mib} MiB to /tmp {to_tmp:.0} ms; to /work as an artifact {to_work:.0} ms (+{:.0} ms to save it)",
        to_work - to_tmp
    );
    Ok(())
}
