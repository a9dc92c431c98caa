//! Volumes and artifacts in runs, through the API to real workers: a run
//! reads a volume (read-only at /volumes/<name>) and leaves files in /work,
//! which become its artifact's next version; the next run starts from it.
//! On bubblewrap (both databases) and on QEMU.

use std::collections::BTreeMap;
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::harness::{Db, Stack, StackOptions};

/// Commits `files` as the next version of the volume or artifact `name`
/// (created if new), through upload, PUT and commit; returns the version id.
async fn push(stack: &Stack, kind: &str, name: &str, files: &[(&str, &[u8])]) -> String {
    let (status, list) = stack
        .call(0, Method::GET, &format!("/v1/{kind}?name={name}"), None)
        .await;
    assert_eq!(status, StatusCode::OK, "{list}");
    let id = match list["data"][0]["id"].as_str() {
        Some(id) => id.to_owned(),
        None => {
            let (status, made) = stack
                .call(
                    0,
                    Method::POST,
                    &format!("/v1/{kind}"),
                    Some(json!({"name": name})),
                )
                .await;
            assert_eq!(status, StatusCode::CREATED, "{made}");
            made["id"].as_str().expect("id").to_owned()
        }
    };
    let announced: Vec<Value> = files
        .iter()
        .map(|(p, b)| json!({"path": p, "size": b.len(), "sha256": hex::encode(Sha256::digest(b))}))
        .collect();
    let (status, session) = stack
        .call(
            0,
            Method::POST,
            &format!("/v1/{kind}/{id}/upload"),
            Some(json!({"files": announced})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{session}");
    let http = reqwest::Client::new();
    for (target, (_, bytes)) in session["files"]
        .as_array()
        .expect("files")
        .iter()
        .zip(files)
    {
        if let Some(url) = target["uploadUrl"].as_str() {
            let resp = http
                .put(url)
                .body(bytes.to_vec())
                .send()
                .await
                .expect("put");
            assert_eq!(resp.status(), StatusCode::OK);
        }
    }
    let (status, version) = stack
        .call(
            0,
            Method::POST,
            &format!("/v1/{kind}/{id}/commit"),
            Some(json!({"uploadSessionId": session["uploadSessionId"]})),
        )
        .await;
    assert!(status.is_success(), "{version}");
    version["id"].as_str().expect("version").to_owned()
}

/// The files of the artifact `name`'s current version, from its archive.
async fn pull(stack: &Stack, name: &str) -> BTreeMap<String, String> {
    let (_, list) = stack
        .call(0, Method::GET, &format!("/v1/artifacts?name={name}"), None)
        .await;
    let id = list["data"][0]["id"].as_str().expect("artifact").to_owned();
    let (status, listing) = stack
        .call(
            0,
            Method::GET,
            &format!("/v1/artifacts/{id}/download?format=json"),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{listing}");
    let http = reqwest::Client::new();
    let mut files = BTreeMap::new();
    for f in listing["files"].as_array().expect("files") {
        let path = f["path"].as_str().expect("path").to_owned();
        let content = match f["link"].as_str() {
            Some(target) => format!("-> {target}"),
            None => {
                let url = f["downloadUrl"].as_str().expect("url");
                http.get(url)
                    .send()
                    .await
                    .expect("get")
                    .text()
                    .await
                    .expect("text")
            }
        };
        files.insert(path, content);
    }
    files
}

fn system_log(logs: &[Value]) -> String {
    logs.iter()
        .filter_map(|l| l["message"].as_str())
        .collect::<Vec<_>>()
        .join("\n")
}

async fn volumes_and_artifacts(stack: &Stack, timeout: Duration) {
    let vol = push(
        stack,
        "volumes",
        "inputs",
        &[("a.txt", b"from the volume\n"), ("deep/b.txt", b"b\n")],
    )
    .await;
    stack
        .create_agent(
            "writer",
            json!({"command": ["sh", "-c", "cat /volumes/inputs/a.txt /volumes/inputs/deep/b.txt; \
                touch /volumes/inputs/x 2>/dev/null && echo wrote-volume; \
                cat /work/notes.txt 2>/dev/null; echo \"run $VM0_PROMPT\" >> /work/notes.txt; \
                ln -sf notes.txt /work/latest; mkdir -p /work/empty-dir"], "resources": {"memoryMb": 256}}),
        )
        .await;
    stack
        .create_agent(
            "reader",
            json!({"command": ["cat", "/work/notes.txt"], "resources": {"memoryMb": 256}}),
        )
        .await;

    // Run 1: the volume in, a new artifact out.
    let id = stack
        .create_run(0, json!({"agent": "writer", "prompt": "one", "volumes": {"inputs": &vol[..8]}, "artifactName": "notes"}))
        .await;
    let run = stack.wait_finished(&id, timeout).await;
    let logs = stack.logs(&id).await;
    assert_eq!(run["status"], "completed", "{run} {}", system_log(&logs));
    assert_eq!(run["volumes"]["inputs"], vol.as_str());
    assert_eq!(
        stack.output(&id).await,
        "from the volume\nb\n",
        "read, and read-only"
    );
    let v1 = run["artifactVersion"]
        .as_str()
        .expect("a new version")
        .to_owned();
    assert_eq!(v1.len(), 64);
    let text = system_log(&logs);
    assert!(
        text.contains("volume version") && text.contains("'inputs'"),
        "{text}"
    );
    assert!(text.contains("/work: 2 files"), "{text}");
    assert!(
        text.contains(&format!("/work saved as artifact 'notes' version {v1}")),
        "{text}"
    );
    let files = pull(stack, "notes").await;
    assert_eq!(
        files,
        BTreeMap::from([
            ("latest".into(), "-> notes.txt".into()),
            ("notes.txt".into(), "run one\n".into())
        ]),
        "links stay links"
    );

    // Run 2 starts from run 1's /work.
    let id = stack
        .create_run(0, json!({"agent": "writer", "prompt": "two", "volumes": {"inputs": "latest"}, "artifactName": "notes"}))
        .await;
    let run = stack.wait_finished(&id, timeout).await;
    assert_eq!(run["status"], "completed", "{run}");
    assert_eq!(stack.output(&id).await, "from the volume\nb\nrun one\n");
    let v2 = run["artifactVersion"].as_str().expect("version").to_owned();
    assert_ne!(v2, v1);
    assert_eq!(
        pull(stack, "notes").await["notes.txt"],
        "run one\nrun two\n"
    );
    assert!(
        system_log(&stack.logs(&id).await).contains("from this worker's cache"),
        "the volume was cached"
    );

    // A run that changes nothing leaves the same version; an older one is named by prefix.
    let id = stack
        .create_run(
            0,
            json!({"agent": "reader", "prompt": "read", "artifactName": "notes"}),
        )
        .await;
    let run = stack.wait_finished(&id, timeout).await;
    assert_eq!(run["artifactVersion"], v2.as_str(), "{run}");
    assert!(system_log(&stack.logs(&id).await).contains("the same content as before"));
    let id = stack
        .create_run(
            0,
            json!({"agent": "reader", "prompt": "read", "artifactName": "notes", "artifactVersion": &v1[..10]}),
        )
        .await;
    let run = stack.wait_finished(&id, timeout).await;
    assert_eq!(stack.output(&id).await, "run one\n", "{run}");

    // A run without an artifact has a /work of its own, discarded.
    let id = stack
        .create_run(0, json!({"agent": "writer", "prompt": "alone"}))
        .await;
    let run = stack.wait_finished(&id, timeout).await;
    assert_eq!(run["status"], "completed");
    assert_eq!(run["artifactVersion"], Value::Null);
    assert_eq!(
        pull(stack, "notes").await["notes.txt"],
        "run one\n",
        "the last run on 'notes' made it current"
    );
}

async fn on_bubblewrap(db: Db) {
    let stack = Stack::start(db, StackOptions::default()).await;
    volumes_and_artifacts(&stack, Duration::from_secs(60)).await;
}

/// The same with S3: the worker fetches and uploads through presigned URLs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_s3() {
    let stack = Stack::start(
        Db::Sqlite,
        StackOptions {
            s3: true,
            ..Default::default()
        },
    )
    .await;
    volumes_and_artifacts(&stack, Duration::from_secs(60)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_qemu() {
    let stack = Stack::start(
        Db::Sqlite,
        StackOptions {
            sandbox: "qemu",
            ..Default::default()
        },
    )
    .await;
    volumes_and_artifacts(&stack, Duration::from_secs(180)).await;
}

/// Sessions: every completed run leaves a checkpoint with its state directory
/// (`VM0_STATE_DIR`); a session continues from its latest, a checkpoint
/// resumes exactly itself. Variables are kept, secrets are not.
async fn sessions_and_checkpoints(db: Db) {
    let stack = Stack::start(db, StackOptions::default()).await;
    stack
        .create_agent(
            "diary",
            json!({"command": ["sh", "-c", "cat \"$VM0_STATE_DIR/diary\" 2>/dev/null; echo \"$VM0_PROMPT\" >> \"$VM0_STATE_DIR/diary\"; echo \"v=$V s=${S:-none}\""]}),
        )
        .await;
    let timeout = Duration::from_secs(60);
    let id = stack
        .create_run(0, json!({"agent": "diary", "prompt": "one", "variables": {"V": "kept"}, "secrets": {"S": "hidden"}}))
        .await;
    let first = stack.wait_finished(&id, timeout).await;
    assert_eq!(first["status"], "completed", "{first}");
    assert_eq!(stack.output(&id).await, "v=kept s=***\n");
    let session = first["sessionId"].as_str().expect("session").to_owned();
    let chk1 = first["checkpointId"]
        .as_str()
        .expect("a checkpoint")
        .to_owned();
    assert!(chk1.starts_with("chk_"));
    assert!(system_log(&stack.logs(&id).await).contains(&format!("checkpoint {chk1} saved")));

    let id = stack
        .create_run(0, json!({"sessionId": session, "prompt": "two"}))
        .await;
    let second = stack.wait_finished(&id, timeout).await;
    assert_eq!(second["sessionId"], session.as_str());
    assert_eq!(
        stack.output(&id).await,
        "one\nv=kept s=none\n",
        "the state, the variables; not the secret"
    );
    let id = stack
        .create_run(
            0,
            json!({"sessionId": session, "prompt": "three", "secrets": {"S": "again"}}),
        )
        .await;
    let third = stack.wait_finished(&id, timeout).await;
    assert_eq!(
        stack.output(&id).await,
        "one\ntwo\nv=kept s=***\n",
        "{third}"
    );
    assert_ne!(third["checkpointId"], second["checkpointId"]);

    // The first checkpoint, exactly: what the first run left, not what came after.
    let id = stack
        .create_run(0, json!({"checkpointId": chk1, "prompt": "again"}))
        .await;
    let resumed = stack.wait_finished(&id, timeout).await;
    assert_eq!(resumed["status"], "completed", "{resumed}");
    assert_eq!(stack.output(&id).await, "one\nv=kept s=none\n");
    assert_eq!(resumed["sessionId"], session.as_str());

    // Unknown, malformed, and another organization's: 404 (or 400 for a bad id).
    for body in [
        json!({"sessionId": "sess_000000000000000000000000", "prompt": "x"}),
        json!({"checkpointId": "chk_000000000000000000000000", "prompt": "x"}),
    ] {
        let (status, err) = stack.call(0, Method::POST, "/v1/runs", Some(body)).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{err}");
    }
    let other = stack.mint_token("globex").await;
    for body in [
        json!({"sessionId": session, "prompt": "x"}),
        json!({"checkpointId": chk1, "prompt": "x"}),
    ] {
        let resp = reqwest::Client::new()
            .post(stack.url(0, "/v1/runs"))
            .bearer_auth(&other)
            .json(&body)
            .send()
            .await
            .expect("post");
        assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    }
}

vm0_db::on_both_databases!(on_bubblewrap, sessions_and_checkpoints);

/// What cannot be saved fails the run, saying why, and leaves no version: a
/// /work past the deployment's limits, and special files skipped with a line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outputs_past_the_limits_fail_the_run() {
    let stack = Stack::start(
        Db::Sqlite,
        StackOptions {
            storage_limits: Some(vm0_storage::Limits {
                max_files: 3,
                ..Default::default()
            }),
            ..Default::default()
        },
    )
    .await;
    stack
        .create_agent(
            "many",
            json!({"command": ["sh", "-c", "for i in 1 2 3 4 5; do echo $i > /work/f$i; done"]}),
        )
        .await;
    stack
        .create_agent(
            "fifo",
            json!({"command": ["sh", "-c", "mkfifo /work/pipe; echo x > /work/file"]}),
        )
        .await;
    let id = stack
        .create_run(
            0,
            json!({"agent": "many", "prompt": "p", "artifactName": "out"}),
        )
        .await;
    let run = stack.wait_finished(&id, Duration::from_secs(60)).await;
    assert_eq!(run["status"], "failed", "{run}");
    let error = run["error"].as_str().expect("error");
    assert!(
        error.starts_with("saving /work as artifact 'out' failed:")
            && error.contains("more than 3"),
        "{error}"
    );
    assert_eq!(run["artifactVersion"], Value::Null);
    let (_, list) = stack
        .call(0, Method::GET, "/v1/artifacts?name=out", None)
        .await;
    assert!(
        list["data"][0]["currentVersionId"].is_null(),
        "no version: {list}"
    );

    let id = stack
        .create_run(
            0,
            json!({"agent": "fifo", "prompt": "p", "artifactName": "out"}),
        )
        .await;
    let run = stack.wait_finished(&id, Duration::from_secs(60)).await;
    assert_eq!(run["status"], "completed", "{run}");
    let logs = stack.logs(&id).await;
    assert!(
        logs.iter().any(|l| l["level"] == "warn"
            && l["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("/work/pipe"))),
        "the FIFO was skipped with a line: {}",
        system_log(&logs)
    );
    assert_eq!(
        pull(&stack, "out").await.keys().collect::<Vec<_>>(),
        ["file"]
    );
}

/// The worker's cache of versions is bounded: past VM0_VERSION_CACHE_MAX_BYTES
/// the least recently used version no run uses goes; nothing of a run's
/// transfers outlives it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_version_cache_is_bounded() {
    let stack = Stack::start(
        Db::Sqlite,
        StackOptions {
            // Room for one small version.
            worker_env: vec![("VM0_VERSION_CACHE_MAX_BYTES", "1500".into())],
            ..Default::default()
        },
    )
    .await;
    let a = push(&stack, "volumes", "a", &[("f", &[b'a'; 1000])]).await;
    let b = push(&stack, "volumes", "b", &[("f", &[b'b'; 1000])]).await;
    stack
        .create_agent(
            "cat",
            json!({"command": ["sh", "-c", "cat /volumes/*/f | wc -c"]}),
        )
        .await;
    for volumes in [json!({"a": "latest"}), json!({"b": "latest"})] {
        let id = stack
            .create_run(
                0,
                json!({"agent": "cat", "prompt": "p", "volumes": volumes}),
            )
            .await;
        let run = stack.wait_finished(&id, Duration::from_secs(60)).await;
        assert_eq!(run["status"], "completed", "{run}");
        assert_eq!(stack.output(&id).await.trim(), "1000");
    }
    let (versions, transfers) = stack.cached_versions();
    assert_eq!(versions, vec![b], "a went, b (used last) stayed; not {a}");
    assert_eq!(transfers, 0, "no run's transfers are left");
}
