//! The curl + jq commands of the API documents, run by bash against a live gateway.

use crate::common::{Db, TestGateway};

async fn documented_curl_commands_give_documented_shapes(db: Db) {
    let gw = TestGateway::start(db).await;
    let work = tempfile::tempdir().expect("dir");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/doc-examples.sh");
    let out = tokio::process::Command::new("bash")
        .arg(script)
        .env("API", &gw.base)
        .env("VM0_API_KEY", &gw.token)
        .env("WORK", work.path())
        .output()
        .await
        .expect("bash runs (curl and jq are installed by scripts/test.sh)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "doc examples failed:\n{stdout}\n{stderr}"
    );
    assert_eq!(
        stdout.lines().filter(|l| l.starts_with("ok: ")).count(),
        24,
        "{stdout}"
    );
}

vm0_db::on_both_databases!(documented_curl_commands_give_documented_shapes);
