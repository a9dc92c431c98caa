//! The object store on a local directory and on a real S3-compatible server
//! (moto, started here on loopback; `scripts/test.sh` installs it): the same
//! calls, byte for byte.

use std::process::Command;
use std::time::Duration;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use sha2::{Digest, Sha256};
use vm0_storage::{Objects, ObjectsError};

use vm0_storage::testing::Moto;

fn moto(bucket: &str) -> Moto {
    Moto::start(bucket)
}

fn s3(moto: &Moto, url: &str) -> Objects {
    let dir = std::env::temp_dir();
    let config = moto.s3_config();
    let pairs: Vec<(&str, &str)> = config
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    Objects::open_with(Some(url), &dir, &pairs).expect("open s3")
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

    // Rename replaces; a prefix goes at once.
    objects
        .put("w/a", Bytes::from_static(b"a"))
        .await
        .expect("put");
    objects
        .put("w/b", Bytes::from_static(b"b"))
        .await
        .expect("put");
    objects.rename("w/a", "w/b").await.expect("rename");
    assert_eq!(read_all(objects, "w/b").await, b"a");
    assert_eq!(objects.size("w/a").await.expect("head"), None);
    assert!(matches!(
        objects.rename("w/absent", "w/c").await,
        Err(ObjectsError::NotFound(_))
    ));
    objects
        .put("w/deep/c", Bytes::from_static(b"c"))
        .await
        .expect("put");
    objects.delete_prefix("w").await.expect("delete prefix");
    assert_eq!(objects.size("w/b").await.expect("head"), None);
    assert_eq!(objects.size("w/deep/c").await.expect("head"), None);
    assert!(objects.size("v/big.tar.gz").await.expect("head").is_some());
}

/// An archive assembled from stored objects unpacks to exactly them; a
/// missing object or a wrong size fails it and leaves no archive.
async fn assembles_archives(objects: &Objects) {
    use vm0_storage::{Limits, Part, archive_objects};
    let big = pattern(3 << 20);
    objects
        .put("up/1", Bytes::from(big.clone()))
        .await
        .expect("put");
    objects
        .put("up/2", Bytes::from_static(b"hello"))
        .await
        .expect("put");
    let parts = vec![
        Part {
            path: "a/big.bin".into(),
            size: big.len() as u64,
            key: Some("up/1".into()),
            link: None,
        },
        Part {
            path: "a/empty".into(),
            size: 0,
            key: None,
            link: None,
        },
        Part {
            path: "a/link".into(),
            size: 7,
            key: None,
            link: Some("big.bin".into()),
        },
        Part {
            path: "b.txt".into(),
            size: 5,
            key: Some("up/2".into()),
            link: None,
        },
    ];
    let digests = archive_objects(objects, parts.clone(), "out/v.tar.gz")
        .await
        .expect("archive");
    assert_eq!(
        digests,
        vec![
            hex::encode(Sha256::digest(&big)),
            hex::encode(Sha256::digest(b"")),
            hex::encode(Sha256::digest(b"big.bin")),
            hex::encode(Sha256::digest(b"hello")),
        ]
    );
    let archive = read_all(objects, "out/v.tar.gz").await;
    let dir = tempfile::tempdir().expect("dir");
    let dest = dir.path().join("x");
    let manifest = vm0_storage::unpack(&archive[..], &dest, &Limits::default()).expect("unpack");
    assert_eq!(manifest.files().len(), 4);
    assert_eq!(
        std::fs::read_link(dest.join("a/link")).expect("link"),
        std::path::Path::new("big.bin")
    );
    assert!(std::fs::read(dest.join("a/big.bin")).expect("read") == big);
    assert_eq!(std::fs::read(dest.join("b.txt")).expect("read"), b"hello");

    let mut short = parts.clone();
    short[3].size = 6;
    let err = archive_objects(objects, short, "out/w.tar.gz")
        .await
        .expect_err("short");
    assert!(err.to_string().contains("b.txt"), "{err}");
    let mut long = parts.clone();
    long[0].size -= 1;
    archive_objects(objects, long, "out/w.tar.gz")
        .await
        .expect_err("long");
    let mut missing = parts;
    missing[3].key = Some("up/none".into());
    let err = archive_objects(objects, missing, "out/w.tar.gz")
        .await
        .expect_err("missing");
    assert!(
        matches!(
            err,
            vm0_storage::AssembleError::Objects(ObjectsError::NotFound(_))
        ),
        "{err}"
    );
    assert_eq!(objects.size("out/w.tar.gz").await.expect("head"), None);
}

#[tokio::test]
async fn the_local_store_round_trips() {
    let dir = tempfile::tempdir().expect("dir");
    let objects = Objects::open(None, &dir.path().join("objects")).expect("open");
    assert!(objects.describe.starts_with("local:"));
    round_trips(&objects).await;
    assembles_archives(&objects).await;
    assert_eq!(
        objects
            .presigned_url(vm0_storage::Access::Get, "v/empty", Duration::from_secs(60))
            .await
            .expect("presign"),
        None,
        "the local store has no presigned URLs: the gateway signs its own"
    );
    // What a key names stays under the store's directory.
    assert!(dir.path().join("objects/v/big.tar.gz").is_file());
}

#[tokio::test]
async fn the_s3_store_round_trips() {
    let moto = moto("vm0-test");
    let objects = s3(&moto, "s3://vm0-test/deploy/a");
    assert_eq!(objects.describe, "s3://vm0-test/deploy/a");
    round_trips(&objects).await;
    assembles_archives(&objects).await;
    // A presigned URL reads the object without credentials.
    let url = objects
        .presigned_url(
            vm0_storage::Access::Get,
            "v/big.tar.gz",
            Duration::from_secs(60),
        )
        .await
        .expect("presign")
        .expect("S3 presigns");
    let fetched = Command::new("curl")
        .args(["-sf", &url])
        .output()
        .expect("curl");
    assert!(fetched.status.success(), "{url}");
    assert!(
        fetched.stdout == pattern(20 << 20),
        "presigned GET is byte for byte"
    );
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
