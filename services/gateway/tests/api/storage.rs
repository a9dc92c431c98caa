//! Volumes and artifacts through the HTTP API, on the local store and on a
//! real S3-compatible server (moto): upload, PUT to the signed URLs, commit,
//! download (302 to a signed archive; per-file listing), byte for byte; dedup,
//! prefixes, limits, hostile paths, tampered and expired URLs, tenancy.

use std::collections::BTreeMap;
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use vm0_storage::testing::Moto;

use crate::common::{Db, TestGateway, assert_error, assert_invalid};

/// A client that shows redirects instead of following them, with no token.
fn bare_client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(120))
        .build()
        .expect("client")
}

/// PUTs `body` to a signed URL; the answer's status.
async fn put_status(url: &str, body: impl Into<reqwest::Body>) -> StatusCode {
    bare_client()
        .put(url)
        .body(body)
        .send()
        .await
        .expect("put")
        .status()
}

fn sha(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

async fn start(db: Db, moto: Option<&Moto>) -> TestGateway {
    TestGateway::start_with(db, |c| {
        if let Some(m) = moto {
            c.storage.object_store_url = Some(format!("s3://{}/deploy", m.bucket));
            c.storage.object_store_options = m.s3_config();
        }
    })
    .await
}

async fn create(gw: &TestGateway, kind: &str, name: &str) -> String {
    let (status, body) = gw.post(&format!("/v1/{kind}"), json!({"name": name})).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    body["id"].as_str().expect("id").to_owned()
}

/// Announces `files`, PUTs each non-empty one to its URL; returns the session id.
async fn upload(gw: &TestGateway, kind: &str, id: &str, files: &[(String, Vec<u8>)]) -> String {
    let announced: Vec<Value> = files
        .iter()
        .map(|(p, b)| json!({"path": p, "size": b.len(), "sha256": sha(b)}))
        .collect();
    let (status, session) = gw
        .post(
            &format!("/v1/{kind}/{id}/upload"),
            json!({"files": announced, "message": "test"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{session}");
    let targets = session["files"].as_array().expect("files");
    assert_eq!(targets.len(), files.len());
    let client = bare_client();
    let puts = targets
        .iter()
        .zip(files)
        .filter(|(_, (_, b))| !b.is_empty())
        .map(|(t, (p, b))| {
            assert_eq!(t["path"], p.as_str());
            let url = t["uploadUrl"].as_str().expect("url").to_owned();
            let client = client.clone();
            let body = b.clone();
            async move {
                let resp = client.put(&url).body(body).send().await.expect("put");
                assert!(resp.status().is_success(), "PUT {url}: {}", resp.status());
            }
        });
    futures::future::join_all(puts).await;
    session["uploadSessionId"]
        .as_str()
        .expect("session")
        .to_owned()
}

async fn commit(gw: &TestGateway, kind: &str, id: &str, session: &str) -> (StatusCode, Value) {
    gw.post(
        &format!("/v1/{kind}/{id}/commit"),
        json!({"uploadSessionId": session}),
    )
    .await
}

async fn fetch(url: &str) -> Vec<u8> {
    let resp = bare_client().get(url).send().await.expect("get");
    assert_eq!(resp.status(), StatusCode::OK, "GET {url}");
    resp.bytes().await.expect("body").to_vec()
}

/// The archive of the current (or given) version, through the 302.
async fn download(
    gw: &TestGateway,
    kind: &str,
    id: &str,
    query: &str,
) -> BTreeMap<String, Vec<u8>> {
    let resp = bare_client()
        .get(gw.url(&format!("/v1/{kind}/{id}/download{query}")))
        .bearer_auth(&gw.token)
        .send()
        .await
        .expect("download");
    assert_eq!(resp.status(), StatusCode::FOUND, "download is a redirect");
    let location = resp.headers()["location"]
        .to_str()
        .expect("location")
        .to_owned();
    let archive = fetch(&location).await;
    let dir = tempfile::tempdir().expect("dir");
    let dest = dir.path().join("x");
    let manifest =
        vm0_storage::unpack(&archive[..], &dest, &vm0_storage::Limits::default()).expect("unpack");
    manifest
        .files()
        .iter()
        .map(|f| {
            (
                f.path.clone(),
                std::fs::read(dest.join(&f.path)).expect("read"),
            )
        })
        .collect()
}

fn tree() -> Vec<(String, Vec<u8>)> {
    let mut files = vec![
        ("empty".to_owned(), Vec::new()),
        (
            "nested/deep/er/file.bin".to_owned(),
            (0..70_000u32).map(|i| (i % 251) as u8).collect(),
        ),
        ("nested/also-empty".to_owned(), Vec::new()),
        (
            "a b/ünïcode name.txt".to_owned(),
            b"spaces and unicode".to_vec(),
        ),
    ];
    for i in 0..1000 {
        files.push((
            format!("many/{i:04}.txt"),
            format!("file {i}\n").into_bytes(),
        ));
    }
    files
}

async fn round_trip(db: Db, moto: Option<&Moto>) {
    let gw = start(db, moto).await;
    let id = create(&gw, "volumes", "inputs").await;
    assert!(id.starts_with("vol_"));
    let (_, got) = gw.get(&format!("/v1/volumes/{id}")).await;
    assert_eq!(got["currentVersionId"], Value::Null);
    assert_eq!(got["currentVersion"], Value::Null);
    assert_error(
        &gw.post("/v1/volumes", json!({"name": "inputs"})).await,
        409,
        "conflict_error",
        "resource_already_exists",
        Some("name"),
    );
    assert_invalid(
        &gw.post("/v1/volumes", json!({"name": "Bad Name"})).await,
        "name",
    );
    let (status, _) = gw.get(&format!("/v1/volumes/{id}/download")).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "no version yet");

    let files = tree();
    let session = upload(&gw, "volumes", &id, &files).await;
    let (status, v1) = commit(&gw, "volumes", &id, &session).await;
    assert_eq!(status, StatusCode::CREATED, "{v1}");
    let vid = v1["id"].as_str().expect("id").to_owned();
    assert_eq!(vid.len(), 64);
    assert_eq!(v1["volumeId"], id.as_str());
    assert_eq!(v1["fileCount"], files.len());
    assert_eq!(
        v1["size"],
        files.iter().map(|(_, b)| b.len()).sum::<usize>()
    );
    assert_eq!(v1["message"], "test");
    assert!(
        v1["createdBy"]
            .as_str()
            .is_some_and(|c| c.starts_with("tok_"))
    );
    // The id is the content hash the library computes for the same files.
    let entries = files
        .iter()
        .map(|(p, b)| vm0_storage::FileEntry {
            path: p.clone(),
            size: b.len() as u64,
            sha256: sha(b),
            link: None,
        })
        .collect();
    let manifest =
        vm0_storage::Manifest::new(entries, &vm0_storage::Limits::default()).expect("manifest");
    assert_eq!(manifest.version_id().as_str(), vid);

    // A commit is once: the session is spent.
    let (status, _) = commit(&gw, "volumes", &id, &session).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    let (_, got) = gw.get(&format!("/v1/volumes/{id}")).await;
    assert_eq!(got["currentVersionId"], vid.as_str());
    assert_eq!(got["currentVersion"]["id"], vid.as_str());
    assert_eq!(got["fileCount"], files.len());

    // Byte for byte, through the archive.
    let back = download(&gw, "volumes", &id, "").await;
    let want: BTreeMap<String, Vec<u8>> = files.iter().cloned().collect();
    assert!(back == want, "the archive holds exactly what was uploaded");

    // And file by file.
    let (status, listing) = gw
        .get(&format!("/v1/volumes/{id}/download?format=json"))
        .await;
    assert_eq!(status, StatusCode::OK, "{listing}");
    assert_eq!(listing["versionId"], vid.as_str());
    let listed = listing["files"].as_array().expect("files");
    assert_eq!(listed.len(), files.len());
    for f in listed
        .iter()
        .filter(|f| !f["path"].as_str().unwrap_or("").starts_with("many/0"))
    {
        let path = f["path"].as_str().expect("path");
        let bytes = fetch(f["downloadUrl"].as_str().expect("url")).await;
        assert!(bytes == want[path], "{path}");
        assert_eq!(f["sha256"], sha(&want[path]));
    }

    // Identical content is the same version (200, nothing new).
    let again = upload(&gw, "volumes", &id, &files).await;
    let (status, same) = commit(&gw, "volumes", &id, &again).await;
    assert_eq!(status, StatusCode::OK, "{same}");
    assert_eq!(same["id"], vid.as_str());
    let (_, versions) = gw.get(&format!("/v1/volumes/{id}/versions")).await;
    assert_eq!(versions["data"].as_array().map(Vec::len), Some(1));

    // A second version; prefixes name either.
    let v2_files = vec![("only.txt".to_owned(), b"v2".to_vec())];
    let s2 = upload(&gw, "volumes", &id, &v2_files).await;
    let (status, v2) = commit(&gw, "volumes", &id, &s2).await;
    assert_eq!(status, StatusCode::CREATED);
    let v2id = v2["id"].as_str().expect("id").to_owned();
    let (_, versions) = gw.get(&format!("/v1/volumes/{id}/versions")).await;
    assert_eq!(versions["data"][0]["id"], v2id.as_str(), "newest first");
    assert_eq!(versions["data"][1]["id"], vid.as_str());
    let old = download(&gw, "volumes", &id, &format!("?versionId={}", &vid[..8])).await;
    assert_eq!(old.len(), files.len());
    let new = download(&gw, "volumes", &id, "").await;
    assert_eq!(new.keys().collect::<Vec<_>>(), ["only.txt"]);
    assert_invalid(
        &gw.get(&format!(
            "/v1/volumes/{id}/download?versionId={}",
            &vid[..7]
        ))
        .await,
        "versionId",
    );
    assert_invalid(
        &gw.get(&format!("/v1/volumes/{id}/download?versionId=XYZ12345"))
            .await,
        "versionId",
    );
    let absent = if vid.starts_with("00000000") {
        "11111111"
    } else {
        "00000000"
    };
    let (status, _) = gw
        .get(&format!("/v1/volumes/{id}/download?versionId={absent}"))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_invalid(
        &gw.get(&format!("/v1/volumes/{id}/download?format=zip"))
            .await,
        "format",
    );

    // A run names a version by prefix; the run shows the full id.
    gw.create_agent("reader").await;
    let (status, run) = gw
        .post(
            "/v1/runs",
            json!({"agent": "reader", "prompt": "x", "volumes": {"inputs": &vid[..10]}}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{run}");
    assert_eq!(run["volumes"]["inputs"], vid.as_str());
    let (status, err) = gw
        .post(
            "/v1/runs",
            json!({"agent": "reader", "prompt": "x", "volumes": {"nope": "latest"}}),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{err}");
    assert!(
        err["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("nope")),
        "{err}"
    );

    // Artifacts: the same shape under their own name.
    let art = create(&gw, "artifacts", "outputs").await;
    assert!(art.starts_with("art_"));
    let s = upload(&gw, "artifacts", &art, &v2_files).await;
    let (status, av) = commit(&gw, "artifacts", &art, &s).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(
        av["id"],
        v2id.as_str(),
        "the same content has the same id anywhere"
    );
    assert_eq!(av["artifactId"], art.as_str());
    let (status, _) = gw.get(&format!("/v1/volumes/{art}")).await;
    assert_eq!(status.as_u16(), 400, "an artifact id is not a volume id");

    // Delete: gone, and so are its bytes (an old signed URL finds nothing).
    let resp = bare_client()
        .get(gw.url(&format!("/v1/volumes/{id}/download")))
        .bearer_auth(&gw.token)
        .send()
        .await
        .expect("download");
    let location = resp.headers()["location"]
        .to_str()
        .expect("location")
        .to_owned();
    let (status, _) = gw
        .call(Method::DELETE, &format!("/v1/volumes/{id}"), None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = gw.get(&format!("/v1/volumes/{id}")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let gone = bare_client().get(&location).send().await.expect("get");
    assert_eq!(
        gone.status(),
        StatusCode::NOT_FOUND,
        "the archive was deleted with the volume"
    );
}

#[tokio::test]
async fn volumes_round_trip_on_the_local_store_sqlite() {
    round_trip(Db::Sqlite, None).await;
}

#[tokio::test]
async fn volumes_round_trip_on_the_local_store_postgres() {
    round_trip(Db::Postgres, None).await;
}

#[tokio::test]
async fn volumes_round_trip_on_s3() {
    let moto = Moto::start("vm0-api");
    round_trip(Db::Sqlite, Some(&moto)).await;
}

/// Hostile paths and past-the-limit uploads are refused before anything is stored.
#[tokio::test]
async fn hostile_uploads_are_refused() {
    let gw = TestGateway::start_with(Db::Sqlite, |c| {
        c.storage.limits.max_files = 50;
        c.storage.limits.max_file_bytes = 1000;
        c.storage.limits.max_total_bytes = 2000;
        c.storage.limits.max_path_bytes = 100;
    })
    .await;
    let id = create(&gw, "volumes", "v").await;
    let path = format!("/v1/volumes/{id}/upload");
    let one = |p: &str| json!({"files": [{"path": p, "size": 1}]});
    for bad in [
        "../escape",
        "a/../../b",
        "/etc/passwd",
        "a\0b",
        "a\nb",
        "",
        "a//b",
        "a/./b",
        "trailing/",
        "x\u{7f}",
    ] {
        assert_invalid(&gw.post(&path, one(bad)).await, "files[0].path");
    }
    assert_invalid(
        &gw.post(&path, one(&"a".repeat(101))).await,
        "files[0].path",
    );
    let two = |a: &str, b: &str| json!({"files": [{"path": a, "size": 1}, {"path": b, "size": 1}]});
    assert_invalid(&gw.post(&path, two("same", "same")).await, "files");
    assert_invalid(&gw.post(&path, two("dir", "dir/file")).await, "files");
    assert_invalid(
        &gw.post(
            &path,
            json!({"files": [{"path": "a", "size": 1, "sha256": "xyz"}]}),
        )
        .await,
        "files[0].sha256",
    );
    assert_invalid(
        &gw.post(&path, json!({"files": [{"path": "a", "size": -1}]}))
            .await,
        "files[0].size",
    );
    assert_invalid(
        &gw.post(&path, json!({"files": [], "message": "m".repeat(1001)}))
            .await,
        "message",
    );
    // A file too large, files too large together, too many files.
    let n_files = |n: usize, size: u64| -> Value {
        let files: Vec<Value> = (0..n)
            .map(|i| json!({"path": format!("f{i}"), "size": size}))
            .collect();
        json!({ "files": files })
    };
    // One file's fault names it; the list's, the list.
    for (body, param) in [
        (n_files(1, 1001), "files[0].size"),
        (n_files(3, 900), "files"),
        (n_files(51, 0), "files"),
    ] {
        assert_error(
            &gw.post(&path, body).await,
            413,
            "invalid_request_error",
            "payload_too_large",
            Some(param),
        );
    }
    // Nothing was stored: no upload left a version, no session can commit.
    let (_, v) = gw.get(&format!("/v1/volumes/{id}")).await;
    assert_eq!(v["currentVersionId"], Value::Null);
    let (_, versions) = gw.get(&format!("/v1/volumes/{id}/versions")).await;
    assert_eq!(versions["data"], json!([]));
}

/// A commit with files missing is 409 naming them; a PUT of the wrong size or
/// digest is refused and stores nothing.
#[tokio::test]
async fn incomplete_and_wrong_uploads_are_refused() {
    let gw = TestGateway::start(Db::Sqlite).await;
    let id = create(&gw, "volumes", "v").await;
    let good = b"hello".to_vec();
    let (status, session) = gw
        .post(
            &format!("/v1/volumes/{id}/upload"),
            json!({"files": [
                {"path": "a.txt", "size": 5, "sha256": sha(&good)},
                {"path": "dir/b.txt", "size": 5},
                {"path": "c.txt", "size": 3},
            ]}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{session}");
    let sid = session["uploadSessionId"].as_str().expect("id").to_owned();
    let url = |i: usize| {
        session["files"][i]["uploadUrl"]
            .as_str()
            .expect("url")
            .to_owned()
    };
    let client = bare_client();

    let conflict = commit(&gw, "volumes", &id, &sid).await;
    assert_error(
        &conflict,
        409,
        "conflict_error",
        "invalid_state",
        Some("files"),
    );
    let message = conflict.1["error"]["message"].as_str().expect("message");
    assert!(
        message.contains("a.txt") && message.contains("dir/b.txt") && message.contains("c.txt"),
        "{message}"
    );

    // Wrong digest: refused, not kept.
    let resp = client
        .put(url(0))
        .body(b"HELLO".to_vec())
        .send()
        .await
        .expect("put");
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let err: Value = resp.json().await.expect("json");
    assert!(
        err["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("SHA-256")),
        "{err}"
    );
    // Wrong size, with an honest Content-Length: refused before reading.
    assert_eq!(
        put_status(&url(1), b"toolong".to_vec()).await,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        put_status(&url(1), b"shrt".to_vec()).await,
        StatusCode::BAD_REQUEST
    );
    // Without a Content-Length (chunked): more is cut off at the size, less is refused.
    let chunked = |data: &'static [u8]| {
        reqwest::Body::wrap_stream(futures::stream::iter(vec![Ok::<_, std::io::Error>(
            bytes::Bytes::from_static(data),
        )]))
    };
    assert_eq!(
        put_status(&url(1), chunked(b"much too long")).await,
        StatusCode::PAYLOAD_TOO_LARGE
    );
    assert_eq!(
        put_status(&url(1), chunked(b"abc")).await,
        StatusCode::BAD_REQUEST
    );

    let conflict = commit(&gw, "volumes", &id, &sid).await;
    assert_eq!(conflict.0, StatusCode::CONFLICT, "nothing refused was kept");
    let message = conflict.1["error"]["message"].as_str().expect("message");
    assert!(message.starts_with("3 of 3"), "{message}");

    for (i, body) in [(0, good.clone()), (1, b"world".to_vec())] {
        let resp = client.put(url(i)).body(body).send().await.expect("put");
        assert_eq!(resp.status(), StatusCode::OK);
    }
    let conflict = commit(&gw, "volumes", &id, &sid).await;
    let message = conflict.1["error"]["message"].as_str().expect("message");
    assert!(
        message.starts_with("1 of 3") && message.contains("c.txt") && !message.contains("a.txt"),
        "{message}"
    );
    client
        .put(url(2))
        .body(b"abc".to_vec())
        .send()
        .await
        .expect("put");
    let (status, v) = commit(&gw, "volumes", &id, &sid).await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    assert_eq!(v["fileCount"], 3);
}

/// Signed URLs from the attacker's side: every change to what was signed, a
/// signature of another deployment, junk and expiry are refused.
#[tokio::test]
async fn tampered_and_expired_urls_are_refused() {
    let gw = TestGateway::start(Db::Sqlite).await;
    let id = create(&gw, "volumes", "v").await;
    let session = upload(&gw, "volumes", &id, &[("f".to_owned(), b"secret".to_vec())]).await;
    commit(&gw, "volumes", &id, &session).await;
    let resp = bare_client()
        .get(gw.url(&format!("/v1/volumes/{id}/download")))
        .bearer_auth(&gw.token)
        .send()
        .await
        .expect("download");
    let good = resp.headers()["location"]
        .to_str()
        .expect("location")
        .to_owned();
    assert!(!fetch(&good).await.is_empty());
    let (path, query) = good.split_once('?').expect("query");
    let params: BTreeMap<&str, &str> = query.split('&').filter_map(|p| p.split_once('=')).collect();
    let with = |k: &str, v: &str| {
        let mut p = params.clone();
        p.insert(k, v);
        let q: Vec<String> = p.iter().map(|(k, v)| format!("{k}={v}")).collect();
        format!("{path}?{}", q.join("&"))
    };
    let expires: i64 = params["expires"].parse().expect("expires");
    let mut sig = params["signature"].to_owned();
    let last = sig.pop().expect("char");
    sig.push(if last == 'A' { 'B' } else { 'A' });
    let other_key = path.replace("/versions/", "/files/");
    let tampered = [
        with("expires", &(expires + 3600).to_string()),
        with("signature", &sig),
        with("signature", "junk"),
        format!("{other_key}?{query}"),
        path.to_owned(),
        with("size", "1"),
    ];
    for url in &tampered {
        let resp = bare_client().get(url).send().await.expect("get");
        assert_eq!(resp.status(), StatusCode::FORBIDDEN, "{url}");
        let body: Value = resp.json().await.expect("json");
        assert_eq!(body["error"]["type"], "permission_error", "{body}");
    }
    // A PUT with a GET's signature is refused too.
    let resp = bare_client()
        .put(&good)
        .body("x")
        .send()
        .await
        .expect("put");
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);

    // Another deployment (another shared key) signs nothing this one takes.
    let other = TestGateway::start(Db::Sqlite).await;
    let moved = good.replace(&gw.base, &other.base);
    let resp = bare_client().get(&moved).send().await.expect("get");
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);

    // Expiry, with URLs that last one second.
    let short =
        TestGateway::start_with(Db::Sqlite, |c| c.storage.url_ttl = Duration::from_secs(1)).await;
    let id = create(&short, "volumes", "v").await;
    let (_, session) = short
        .post(
            &format!("/v1/volumes/{id}/upload"),
            json!({"files": [{"path": "f", "size": 1}]}),
        )
        .await;
    let url = session["files"][0]["uploadUrl"]
        .as_str()
        .expect("url")
        .to_owned();
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let resp = bare_client().put(&url).body("x").send().await.expect("put");
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let body: Value = resp.json().await.expect("json");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("expired")),
        "{body}"
    );
    let sid = session["uploadSessionId"].as_str().expect("id");
    let (status, err) = commit(&short, "volumes", &id, sid).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{err}");
    assert_eq!(err["error"]["code"], "invalid_state");
}

/// Another organization's volumes and upload sessions do not exist for it.
#[tokio::test]
async fn storage_is_per_organization() {
    let gw = TestGateway::start(Db::Sqlite).await;
    let id = create(&gw, "volumes", "mine").await;
    let (_, session) = gw
        .post(&format!("/v1/volumes/{id}/upload"), json!({"files": []}))
        .await;
    let sid = session["uploadSessionId"].as_str().expect("id").to_owned();
    let other = gw.mint_token("globex").await;
    for (method, path, body) in [
        (Method::GET, format!("/v1/volumes/{id}"), None),
        (Method::GET, format!("/v1/volumes/{id}/versions"), None),
        (Method::GET, format!("/v1/volumes/{id}/download"), None),
        (
            Method::POST,
            format!("/v1/volumes/{id}/upload"),
            Some(json!({"files": []})),
        ),
        (
            Method::POST,
            format!("/v1/volumes/{id}/commit"),
            Some(json!({"uploadSessionId": sid})),
        ),
        (Method::DELETE, format!("/v1/volumes/{id}"), None),
    ] {
        let (status, body) = gw.call_as(&other, method.clone(), &path, body).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{method} {path}: {body}");
    }
    let (_, list) = gw.call_as(&other, Method::GET, "/v1/volumes", None).await;
    assert_eq!(list["data"], json!([]));
    // Their own volume of the same name is theirs; our session does not commit into it.
    let (_, theirs) = gw
        .call_as(
            &other,
            Method::POST,
            "/v1/volumes",
            Some(json!({"name": "mine"})),
        )
        .await;
    let theirs = theirs["id"].as_str().expect("id");
    let (status, _) = gw
        .call_as(
            &other,
            Method::POST,
            &format!("/v1/volumes/{theirs}/commit"),
            Some(json!({"uploadSessionId": sid})),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // An empty version is a version.
    let (status, v) = commit(&gw, "volumes", &id, &sid).await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    assert_eq!(v["fileCount"], 0);
}

/// Peak resident memory of this process (the gateway and the client), bytes.
fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("status");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM");
    kb * 1024
}

/// 1 MiB chunks of a reproducible, incompressible stream.
fn noise(total: u64) -> impl futures::Stream<Item = Result<bytes::Bytes, std::io::Error>> {
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let chunks = total.div_ceil(1 << 20);
    futures::stream::iter((0..chunks).map(move |i| {
        let len = (total - i * (1 << 20)).min(1 << 20) as usize;
        let mut buf = Vec::with_capacity(len);
        while buf.len() < len {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            buf.extend_from_slice(&state.to_le_bytes());
        }
        buf.truncate(len);
        Ok(bytes::Bytes::from(buf))
    }))
}

/// Hashes a response body as it streams.
async fn hash_body(resp: reqwest::Response) -> (u64, String) {
    use futures::StreamExt;
    let mut hash = Sha256::new();
    let mut size = 0u64;
    let mut body = resp.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.expect("chunk");
        size += chunk.len() as u64;
        hash.update(&chunk);
    }
    (size, hex::encode(hash.finalize()))
}

/// One 1 GiB file up, committed, and down (archive and file), byte for byte,
/// with the process's peak memory a small fraction of it: nothing is ever
/// whole in memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_gigabyte_file_streams_through_the_local_store() {
    one_gigabyte(None).await;
}

/// The same on S3: the file goes to and comes from the S3 server by presigned
/// URLs, and the gateway streams it through once, to build the archive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_gigabyte_file_streams_through_s3() {
    let moto = Moto::start("vm0-big");
    one_gigabyte(Some(&moto)).await;
}

async fn one_gigabyte(moto: Option<&Moto>) {
    const SIZE: u64 = 1 << 30;
    let store = if moto.is_some() {
        "S3"
    } else {
        "the local store"
    };
    let gw = start(Db::Sqlite, moto).await;
    let id = create(&gw, "volumes", "big").await;
    let mut want = Sha256::new();
    {
        use futures::StreamExt;
        let mut chunks = std::pin::pin!(noise(SIZE));
        while let Some(c) = chunks.next().await {
            want.update(c.expect("chunk"));
        }
    }
    let want = hex::encode(want.finalize());
    let before = peak_rss();
    let started = std::time::Instant::now();
    let (status, session) = gw
        .post(
            &format!("/v1/volumes/{id}/upload"),
            json!({"files": [{"path": "data/big.bin", "size": SIZE, "sha256": want}]}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{session}");
    let url = session["files"][0]["uploadUrl"].as_str().expect("url");
    let resp = bare_client()
        .put(url)
        .body(reqwest::Body::wrap_stream(noise(SIZE)))
        .send()
        .await
        .expect("put");
    assert_eq!(resp.status(), StatusCode::OK);
    let uploaded = started.elapsed();
    let resp = bare_client()
        .post(gw.url(&format!("/v1/volumes/{id}/commit")))
        .bearer_auth(&gw.token)
        .json(&json!({"uploadSessionId": session["uploadSessionId"]}))
        .send()
        .await
        .expect("commit");
    assert_eq!(resp.status(), StatusCode::CREATED);
    let committed = started.elapsed();

    // The archive, unpacked as it streams.
    let resp = bare_client()
        .get(gw.url(&format!("/v1/volumes/{id}/download")))
        .bearer_auth(&gw.token)
        .send()
        .await
        .expect("download");
    let location = resp.headers()["location"]
        .to_str()
        .expect("location")
        .to_owned();
    let archive = bare_client().get(&location).send().await.expect("archive");
    let (tx, rx) = std::sync::mpsc::sync_channel::<bytes::Bytes>(4);
    let reader = std::thread::spawn(move || {
        struct Chunks(std::sync::mpsc::Receiver<bytes::Bytes>, bytes::Bytes);
        impl std::io::Read for Chunks {
            fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
                while self.1.is_empty() {
                    match self.0.recv() {
                        Ok(next) => self.1 = next,
                        Err(_) => return Ok(0),
                    }
                }
                let n = buf.len().min(self.1.len());
                buf[..n].copy_from_slice(&self.1.split_to(n));
                Ok(n)
            }
        }
        let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(Chunks(
            rx,
            bytes::Bytes::new(),
        )));
        let mut seen = Vec::new();
        for entry in tar.entries().expect("entries") {
            let mut entry = entry.expect("entry");
            let path = entry.path().expect("path").display().to_string();
            let mut hash = Sha256::new();
            let n = std::io::copy(&mut entry, &mut HashWriter(&mut hash)).expect("read");
            seen.push((path, n, hex::encode(hash.finalize())));
        }
        seen
    });
    {
        use futures::StreamExt;
        let mut body = archive.bytes_stream();
        while let Some(chunk) = body.next().await {
            tx.send(chunk.expect("chunk")).expect("reader");
        }
        drop(tx);
    }
    let seen = reader.join().expect("reader");
    assert_eq!(seen, vec![("data/big.bin".to_owned(), SIZE, want.clone())]);
    let archived = started.elapsed();

    // The file itself.
    let (_, listing) = gw
        .get(&format!("/v1/volumes/{id}/download?format=json"))
        .await;
    let file_url = listing["files"][0]["downloadUrl"].as_str().expect("url");
    let resp = bare_client().get(file_url).send().await.expect("file");
    assert_eq!(resp.content_length(), Some(SIZE));
    assert_eq!(hash_body(resp).await, (SIZE, want));
    let peak = peak_rss();
    eprintln!(
        "1 GiB on {store}: upload {uploaded:?}, commit {:?}, archive download {:?}, file download {:?}; peak RSS {} MiB (before {} MiB)",
        committed - uploaded,
        archived - committed,
        started.elapsed() - archived,
        peak >> 20,
        before >> 20
    );
    assert!(
        peak < before + (192 << 20),
        "peak RSS grew by {} MiB moving 1 GiB: something held it in memory",
        (peak - before) >> 20
    );
}

struct HashWriter<'a>(&'a mut Sha256);

impl std::io::Write for HashWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// An upload never committed goes, with the files it received, an hour after
/// it expired (every gateway sweeps at its retention interval).
#[tokio::test]
async fn expired_uploads_are_swept() {
    let gw = TestGateway::start_with(Db::Sqlite, |c| {
        c.retention_interval = Duration::from_millis(200);
    })
    .await;
    let id = create(&gw, "volumes", "v").await;
    let (_, session) = gw
        .post(
            &format!("/v1/volumes/{id}/upload"),
            json!({"files": [{"path": "f", "size": 3}]}),
        )
        .await;
    let sid = session["uploadSessionId"].as_str().expect("id").to_owned();
    let url = session["files"][0]["uploadUrl"].as_str().expect("url");
    let resp = bare_client()
        .put(url)
        .body("abc")
        .send()
        .await
        .expect("put");
    assert_eq!(resp.status(), StatusCode::OK);
    let staged = gw
        .data_dir
        .join(format!("objects/storages/{id}/uploads/{sid}/0"));
    assert!(staged.is_file(), "{}", staged.display());
    // Expired two hours ago.
    let two_hours_ago = vm0_api_types::Timestamp::now().micros() - 7_200_000_000;
    vm0_db::testing::execute(
        &gw.database_url,
        &format!("UPDATE storage_uploads SET expires_at = {two_hours_ago} WHERE id = '{sid}'"),
    )
    .await
    .expect("update");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while staged.exists() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!staged.exists(), "the expired upload's file was deleted");
    let (status, _) = commit(&gw, "volumes", &id, &sid).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "and the session");
}
