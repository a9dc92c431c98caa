//! The object store on a local directory and on a real S3-compatible server
//! (moto, started here on loopback; `scripts/test.sh` installs it): the same
//! calls, byte for byte.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use sha2::{Digest, Sha256};
use vm0_storage::{Objects, ObjectsError};

/// A moto S3 server, killed on drop.
struct Moto {
    child: Child,
    endpoint: String,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn moto(bucket: &str) -> Moto {
    let port = free_port();
    let child = Command::new("python3")
        .args([
            "-m",
            "moto.server",
            "-H",
            "127.0.0.1",
            "-p",
            &port.to_string(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("python3 -m moto.server (scripts/test.sh installs moto[server] from PyPI)");
    let endpoint = format!("http://127.0.0.1:{port}");
    let moto = Moto { child, endpoint };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        // Creating the bucket is also the readiness check.
        let made = Command::new("curl")
            .args(["-sf", "-X", "PUT", &format!("{}/{bucket}", moto.endpoint)])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if made {
            return moto;
        }
        assert!(
            Instant::now() < deadline,
            "moto_server did not start in 30 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn s3(moto: &Moto, url: &str) -> Objects {
    let dir = std::env::temp_dir();
    Objects::open_with(
        Some(url),
        &dir,
        &[
            ("aws_endpoint", moto.endpoint.as_str()),
            ("aws_allow_http", "true"),
            ("aws_region", "us-east-1"),
            ("aws_access_key_id", "testing"),
            ("aws_secret_access_key", "testing"),
        ],
    )
    .expect("open s3")
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
}

async fn read_all(objects: &Objects, key: &str) -> Vec<u8> {
    let stream = objects.get_stream(key).await.expect("get");
    let chunks: Vec<Bytes> = stream.try_collect().await.expect("read");
    chunks.concat()
}

/// The same round trips on any store.
async fn round_trips(objects: &Objects) {
    // Empty.
    let empty = futures::stream::iter(Vec::<Result<Bytes, std::io::Error>>::new());
    let stored = objects
        .put_stream("v/empty", empty, 1 << 30)
        .await
        .expect("put empty");
    assert_eq!(stored.size, 0);
    assert_eq!(stored.sha256, hex::encode(Sha256::digest(b"")));
    assert_eq!(read_all(objects, "v/empty").await, Vec::<u8>::new());
    assert_eq!(objects.size("v/empty").await.expect("head"), Some(0));

    // 20 MiB in 64 KiB chunks: three parts.
    let data = pattern(20 << 20);
    let chunks: Vec<Result<Bytes, std::io::Error>> = data
        .chunks(64 << 10)
        .map(|c| Ok(Bytes::copy_from_slice(c)))
        .collect();
    let stored = objects
        .put_stream("v/big.tar.gz", futures::stream::iter(chunks), 1 << 30)
        .await
        .expect("put big");
    assert_eq!(stored.size, data.len() as u64);
    assert_eq!(stored.sha256, hex::encode(Sha256::digest(&data)));
    assert!(
        read_all(objects, "v/big.tar.gz").await == data,
        "byte for byte"
    );

    // Past the limit: refused, nothing left.
    let over: Vec<Result<Bytes, std::io::Error>> = (0..3)
        .map(|_| Ok(Bytes::from(vec![1u8; 512 << 10])))
        .collect();
    let refused = objects
        .put_stream("v/over", futures::stream::iter(over), 1 << 20)
        .await;
    assert!(
        matches!(refused, Err(ObjectsError::TooLarge { got, limit, .. }) if got > limit && limit == 1 << 20),
        "{refused:?}"
    );
    assert_eq!(objects.size("v/over").await.expect("head"), None);

    // A source that fails midway leaves nothing either.
    let failing = futures::stream::iter(vec![
        Ok(Bytes::from_static(b"part")),
        Err(std::io::Error::other("client went away")),
    ]);
    assert!(matches!(
        objects.put_stream("v/broken", failing, 1 << 20).await,
        Err(ObjectsError::Source { .. })
    ));
    assert_eq!(objects.size("v/broken").await.expect("head"), None);

    // Small objects, delete, not found.
    objects
        .put("v/manifest.json", Bytes::from_static(b"{}"))
        .await
        .expect("put");
    assert_eq!(read_all(objects, "v/manifest.json").await, b"{}");
    objects.delete("v/manifest.json").await.expect("delete");
    objects
        .delete("v/manifest.json")
        .await
        .expect("delete twice");
    assert!(matches!(
        objects.get_stream("v/manifest.json").await.err(),
        Some(ObjectsError::NotFound(_))
    ));
    let stream = objects.get_stream("v/big.tar.gz").await.expect("get");
    assert!(stream.boxed().next().await.is_some());
}

#[tokio::test]
async fn the_local_store_round_trips() {
    let dir = tempfile::tempdir().expect("dir");
    let objects = Objects::open(None, &dir.path().join("objects")).expect("open");
    assert!(objects.describe.starts_with("local:"));
    round_trips(&objects).await;
    // What a key names stays under the store's directory.
    assert!(dir.path().join("objects/v/big.tar.gz").is_file());
}

#[tokio::test]
async fn the_s3_store_round_trips() {
    let moto = moto("vm0-test");
    let objects = s3(&moto, "s3://vm0-test/deploy/a");
    assert_eq!(objects.describe, "s3://vm0-test/deploy/a");
    round_trips(&objects).await;
    // Keys live under the URL's prefix.
    let listed = Command::new("curl")
        .args([
            "-sf",
            &format!("{}/vm0-test?prefix=deploy/a/v/", moto.endpoint),
        ])
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&listed.stdout);
    assert!(text.contains("<Key>deploy/a/v/big.tar.gz</Key>"), "{text}");
}

#[test]
fn bad_urls_say_what_is_expected() {
    let dir = std::env::temp_dir();
    for url in ["gs://bucket", "s3://", "file:///tmp"] {
        let err = Objects::open(Some(url), &dir).expect_err(url);
        assert!(
            matches!(err, ObjectsError::BadUrl(_)) && err.to_string().contains("s3://bucket"),
            "{url}: {err}"
        );
    }
}
