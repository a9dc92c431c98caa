//! `/v1/openapi.json` as clients use it, against a live local stack (`vm0
//! dev`): Schemathesis, with every check and the stateful phase, finds nothing
//! the server and the document disagree on; and a Python client generated
//! from the document by openapi-python-client creates, lists and follows a run.
//!
//! Both tools come from PyPI, pinned, in `target/py` (`scripts/python-tools.sh`,
//! which the test command runs); `VM0_SCHEMATHESIS` and
//! `VM0_OPENAPI_PYTHON_CLIENT` point elsewhere.

mod stack;

use std::path::{Path, PathBuf};

use stack::{Stack, text};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The files these tests hand the tools (checks, config, the client script).
fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/openapi-clients")
}

fn tool(env: &str, name: &str) -> PathBuf {
    let path = std::env::var_os(env)
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target/py/bin").join(name));
    assert!(
        path.exists(),
        "{} is missing: `scripts/test.sh` installs it (see scripts/python-tools.sh), or set {env}",
        path.display()
    );
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_nothing() {
    let st = tool("VM0_SCHEMATHESIS", "st");
    let stack = Stack::start().await;
    let report = stack.dir.path().join("schemathesis");
    let out = tokio::process::Command::new(&st)
        .current_dir(fixtures())
        .env("PYTHONPATH", fixtures())
        .env("NO_COLOR", "1")
        .args([
            "run",
            &format!("{}/v1/openapi.json", stack.url),
            "--checks",
            "all",
            // Replaced by vm0_checks.vm0_positive_data_acceptance (`all` would
            // bring the stock one back whatever the config file says).
            "--exclude-checks",
            "positive_data_acceptance",
            "--header",
            &format!("Authorization: Bearer {}", stack.key),
            "--exclude-path",
            "/v1/runs/{id}/events",
            "--max-examples",
            "30",
            "--workers",
            "2",
            "--seed",
            "1",
            "--report-dir",
        ])
        .arg(&report)
        .output()
        .await
        .expect("schemathesis runs");
    let stdout = text(&out.stdout);
    let summary = stdout
        .rsplit_once("SUMMARY")
        .map_or(stdout.as_str(), |(_, s)| s);
    assert!(
        out.status.success(),
        "schemathesis found disagreements:\n{stdout}\n{}",
        text(&out.stderr)
    );
    eprintln!("schemathesis:{summary}");
    // Every phase ran and passed; the stateful one followed the links.
    for phase in ["Examples", "Coverage", "Fuzzing", "Stateful"] {
        assert!(
            summary
                .lines()
                .any(|l| l.contains(phase) && (l.contains('✅') || l.contains('⏭'))),
            "{phase} did not pass:\n{summary}"
        );
    }
    assert!(
        summary
            .lines()
            .any(|l| l.contains("Stateful") && l.contains('✅')),
        "the stateful phase must run:\n{summary}"
    );
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generated_client_creates_lists_and_follows_a_run() {
    let generator = tool("VM0_OPENAPI_PYTHON_CLIENT", "openapi-python-client");
    let python = generator.with_file_name("python3");
    let stack = Stack::start().await;
    let doc = reqwest::get(format!("{}/v1/openapi.json", stack.url))
        .await
        .expect("the document")
        .text()
        .await
        .expect("its text");
    let work = stack.dir.path().join("client");
    std::fs::create_dir_all(&work).expect("dir");
    std::fs::write(work.join("openapi.json"), doc).expect("write");
    // No formatter hooks: the generated code is used as it comes.
    std::fs::write(work.join("config.yml"), "post_hooks: []\n").expect("write");
    let generated = tokio::process::Command::new(&generator)
        .current_dir(&work)
        .args([
            "generate",
            "--path",
            "openapi.json",
            "--config",
            "config.yml",
            "--meta",
            "none",
            "--output-path",
            "vm0_client",
        ])
        .output()
        .await
        .expect("openapi-python-client runs");
    let said = format!("{}{}", text(&generated.stdout), text(&generated.stderr));
    assert!(generated.status.success(), "{said}");
    assert!(
        !said.contains("Warning"),
        "the generator skipped part of the document:\n{said}"
    );
    let out = tokio::process::Command::new(&python)
        .arg(fixtures().join("generated_client.py"))
        .env("PYTHONPATH", &work)
        .env("VM0_API_URL", &stack.url)
        .env("VM0_API_KEY", &stack.key)
        .output()
        .await
        .expect("python runs");
    assert!(
        out.status.success(),
        "the generated client failed:\n{}\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert_eq!(text(&out.stdout).trim(), "followed completed");
    stack.stop().await;
}
