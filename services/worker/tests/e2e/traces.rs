//! OpenTelemetry export: a run is one trace from the client's request through the
//! gateway, the job on NATS and the worker, received over OTLP/gRPC by
//! `vm0_telemetry::receiver` (the OpenTelemetry protocol's own service definition).

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::json;
use vm0_telemetry::receiver::{OtlpReceiver, ReceivedSpan};
use vm0_telemetry::{LogFormat, TelemetryOptions};

use crate::harness::{Db, Stack, StackOptions};

const SECRET: &str = "sk-traced-secret-4242";

fn find<'a>(spans: &'a [ReceivedSpan], service: &str, name: &str) -> Option<&'a ReceivedSpan> {
    spans
        .iter()
        .find(|s| s.service == service && s.name == name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_is_one_trace_from_the_request_to_the_worker() {
    let receiver = OtlpReceiver::start(([127, 0, 0, 1], 0).into(), true)
        .await
        .expect("receiver");
    // The gateways run in this process (one test per process under nextest).
    let telemetry = vm0_telemetry::init(TelemetryOptions {
        service: "vm0-gateway",
        format: LogFormat::Text,
        otlp_endpoint: Some(receiver.url().to_owned()),
    })
    .expect("telemetry");
    assert!(telemetry.is_exporting());
    let options = StackOptions {
        worker_env: vec![
            ("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.url().to_owned()),
            ("OTEL_BSP_SCHEDULE_DELAY", "100".to_owned()),
            // Quiet log lines keep traces: they have their own filter.
            ("RUST_LOG", "warn".to_owned()),
        ],
        ..StackOptions::default()
    };
    let stack = Stack::start(Db::Sqlite, options).await;
    stack
        .create_agent(
            "traced",
            json!({"command": ["sh", "-c", "echo \"key: $API_KEY\""]}),
        )
        .await;

    // The client traces its own work: the run continues the client's trace.
    let trace_id = hex::encode(rand_bytes::<16>());
    let client_span = hex::encode(rand_bytes::<8>());
    let resp = stack
        .client
        .post(stack.url(0, "/v1/runs"))
        .bearer_auth(&stack.token)
        .header("traceparent", format!("00-{trace_id}-{client_span}-01"))
        .json(&json!({"agent": "traced", "prompt": "p", "secrets": {"API_KEY": SECRET}}))
        .send()
        .await
        .expect("POST /v1/runs");
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let run: serde_json::Value = resp.json().await.expect("run");
    let id = run["id"].as_str().expect("id").to_owned();
    let run = stack.wait_finished(&id, Duration::from_secs(30)).await;
    assert_eq!(run["status"], "completed", "{run}");
    telemetry.flush().await;

    // The worker exports on its own schedule: wait for its last span of the run.
    let deadline = Instant::now() + Duration::from_secs(20);
    let spans = loop {
        let spans = receiver.spans();
        // `run` closes last: after `finish`, once the run's files are removed.
        if find(&spans, "vm0-worker", "finish").is_some()
            && find(&spans, "vm0-worker", "run").is_some()
            && find(&spans, "vm0-gateway", "ControlPlane/Finish").is_some()
        {
            break spans;
        }
        assert!(
            Instant::now() < deadline,
            "the worker's spans never arrived: {spans:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        telemetry.flush().await;
    };

    let request = find(&spans, "vm0-gateway", "POST /v1/runs").expect("the request span");
    assert_eq!(request.trace_id, trace_id, "{request:?}");
    assert_eq!(request.parent_span_id, client_span, "{request:?}");
    assert_eq!(request.attributes["http.response.status_code"], "202");
    assert_eq!(request.attributes["http.route"], "/v1/runs");

    let worker_run = find(&spans, "vm0-worker", "run").expect("the worker's run span");
    assert_eq!(worker_run.trace_id, trace_id, "{worker_run:?}");
    assert_eq!(
        worker_run.parent_span_id, request.span_id,
        "child of the request"
    );
    assert_eq!(worker_run.attributes["run_id"], id);
    assert_eq!(worker_run.attributes["status"], "completed");
    assert_eq!(worker_run.attributes["exit_code"], "0");
    for name in ["claim", "sandbox.start", "sandbox.run", "finish"] {
        let step = find(&spans, "vm0-worker", name).unwrap_or_else(|| panic!("no {name} span"));
        assert_eq!(
            step.parent_span_id, worker_run.span_id,
            "{name} is a step of the run"
        );
    }
    // The control plane's side of a call is a child of the worker's call.
    let claim = find(&spans, "vm0-worker", "claim").expect("claim");
    let served = find(&spans, "vm0-gateway", "ControlPlane/Claim").expect("served claim");
    assert_eq!(served.trace_id, trace_id);
    assert_eq!(served.parent_span_id, claim.span_id);
    // Background calls make no traces of their own.
    assert!(
        find(&spans, "vm0-gateway", "ControlPlane/Heartbeat").is_none(),
        "heartbeats are not traced"
    );
    assert!(
        !receiver.everything().contains(SECRET),
        "a secret was exported in a span"
    );
    telemetry.shutdown().await;
}

/// A collector that never answers costs a run nothing, and a worker still stops
/// promptly: the last export is bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_that_never_answers_slows_nothing() {
    // Connections complete in the kernel's backlog, and nothing ever reads them.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let address = silent.local_addr().expect("addr");
    let options = StackOptions {
        worker_env: vec![("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{address}"))],
        ..StackOptions::default()
    };
    let mut stack = Stack::start(Db::Sqlite, options).await;
    stack
        .create_agent("plain", json!({"command": ["echo", "hi"]}))
        .await;
    let started = Instant::now();
    let id = stack
        .create_run(0, json!({"agent": "plain", "prompt": "p"}))
        .await;
    let run = stack.wait_finished(&id, Duration::from_secs(30)).await;
    assert_eq!(run["status"], "completed", "{run}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "a run took {:?} with the collector silent",
        started.elapsed()
    );
    let worker = &mut stack.workers[0];
    let stopping = Instant::now();
    worker.terminate();
    let status = worker.wait_exit(Duration::from_secs(15));
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    assert!(
        stopping.elapsed() < Duration::from_secs(8),
        "stopping took {:?}: the last export must be bounded",
        stopping.elapsed()
    );
}

/// A malformed endpoint stops the worker at start with a message naming it.
#[test]
fn a_malformed_endpoint_is_refused_at_start() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vm0-worker"))
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", "not a url")
        .output()
        .expect("run vm0-worker");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cannot export traces to OTLP endpoint \"not a url\""),
        "{stderr}"
    );
}

fn rand_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    rand::fill(&mut b);
    // An all-zero id is invalid in W3C trace context.
    b[0] |= 1;
    b
}
