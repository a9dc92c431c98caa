//! `/metrics` of a gateway and of a worker, scraped and parsed as Prometheus
//! reads them: the counters move by the runs the test made.

use std::time::Duration;

use serde_json::json;
use vm0_db::testing::TestDb as Db;

use crate::harness::{Stack, StackOptions, free_port};

/// The samples of a scrape of `url`.
async fn scrape(url: &str) -> Vec<prometheus_parse::Sample> {
    let response = reqwest::get(url).await.expect("scrape");
    assert_eq!(response.status(), 200, "{url}");
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert!(content_type.starts_with("text/plain"), "{content_type}");
    let body = response.text().await.expect("body");
    let lines = body.lines().map(|l| Ok(l.to_owned()));
    prometheus_parse::Scrape::parse(lines)
        .expect("the text format parses")
        .samples
}

/// The value of `metric` whose labels include `labels` (0 when absent).
fn value(samples: &[prometheus_parse::Sample], metric: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.metric == metric)
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match &s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => *v,
            prometheus_parse::Value::Histogram(buckets) => {
                buckets.iter().map(|b| b.count).fold(0.0, f64::max)
            }
            prometheus_parse::Value::Summary(_) => 0.0,
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_and_worker_metrics_count_the_runs_made() {
    let metrics_port = free_port();
    let stack = Stack::start(
        Db::Sqlite,
        StackOptions {
            worker_env: vec![("VM0_METRICS_ADDR", format!("127.0.0.1:{metrics_port}"))],
            ..Default::default()
        },
    )
    .await;
    let gateway = format!("{}/metrics", stack.gateways[0].base);
    let worker = format!("http://127.0.0.1:{metrics_port}/metrics");
    let before = scrape(&gateway).await;
    stack
        .create_agent("ok", json!({"command": ["sh", "-c", "echo hi"]}))
        .await;
    stack
        .create_agent("bad", json!({"command": ["sh", "-c", "exit 3"]}))
        .await;
    let mut ids = Vec::new();
    for agent in ["ok", "ok", "bad"] {
        ids.push(
            stack
                .create_run(0, json!({"agent": agent, "prompt": "p"}))
                .await,
        );
    }
    for id in &ids {
        stack.wait_finished(id, Duration::from_secs(60)).await;
        // An id that is no run: a 404, counted under its route's template.
        let (status, _) = stack
            .call(
                0,
                reqwest::Method::GET,
                "/v1/runs/run_doesnotexist0000000000000",
                None,
            )
            .await;
        assert_eq!(status.as_u16(), 404);
    }
    // The finish reaches the store, and so the counter, just before the run
    // reads as ended.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let after = scrape(&gateway).await;
    let moved = |metric: &str, labels: &[(&str, &str)]| {
        value(&after, metric, labels) - value(&before, metric, labels)
    };
    assert_eq!(moved("vm0_runs_created_total", &[]), 3.0);
    assert_eq!(
        moved(
            "vm0_runs_finished_total",
            &[("status", "completed"), ("reason", "worker")]
        ),
        2.0
    );
    assert_eq!(
        moved(
            "vm0_runs_finished_total",
            &[("status", "failed"), ("reason", "worker")]
        ),
        1.0
    );
    assert_eq!(
        moved(
            "vm0_http_requests_total",
            &[("method", "POST"), ("route", "/v1/runs"), ("status", "202")]
        ),
        3.0
    );
    assert!(
        moved(
            "vm0_http_requests_total",
            &[
                ("method", "GET"),
                ("route", "/v1/runs/:id"),
                ("status", "404")
            ]
        ) >= 3.0,
        "404s counted under the template, not the path: {:?}",
        after
            .iter()
            .filter(|s| s.metric == "vm0_http_requests_total")
            .map(|s| (
                s.labels.get("route"),
                s.labels.get("status"),
                s.labels.get("method")
            ))
            .collect::<Vec<_>>()
    );
    assert!(
        after
            .iter()
            .all(|s| !s.labels.values().any(|v| v.contains("run_doesnotexist"))),
        "no label holds an id"
    );
    assert!(
        moved(
            "vm0_http_request_duration_seconds_count",
            &[("route", "/v1/runs")]
        ) >= 3.0
    );
    assert_eq!(value(&after, "vm0_sse_streams_open", &[]), 0.0);
    assert_eq!(moved("vm0_run_dispatch_latency_seconds_count", &[]), 3.0);
    assert!(moved("vm0_persister_batch_messages_count", &[]) >= 1.0);
    assert!(
        moved("vm0_persister_batch_messages_sum", &[]) >= 9.0,
        "the runs' events and logs"
    );
    assert!(moved("vm0_persister_lag_seconds_count", &[]) >= 1.0);
    for stream in ["RUN_JOBS", "RUN_TELEMETRY"] {
        for gauge in [
            "vm0_jetstream_messages",
            "vm0_jetstream_consumer_pending",
            "vm0_jetstream_consumer_ack_pending",
        ] {
            assert!(
                after
                    .iter()
                    .any(|s| s.metric == gauge && s.labels.get("stream") == Some(stream)),
                "{gauge} of {stream}"
            );
        }
    }

    let w = scrape(&worker).await;
    let slots = value(&w, "vm0_worker_slots", &[("state", "free")])
        + value(&w, "vm0_worker_slots", &[("state", "used")]);
    assert!(slots >= 1.0, "slots: {slots}");
    assert_eq!(value(&w, "vm0_worker_slots", &[("state", "used")]), 0.0);
    assert_eq!(
        value(
            &w,
            "vm0_worker_runs_ended_total",
            &[("status", "completed"), ("reason", "exit")]
        ),
        2.0
    );
    assert_eq!(
        value(
            &w,
            "vm0_worker_runs_ended_total",
            &[("status", "failed"), ("reason", "exit")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &w,
            "vm0_worker_sandbox_start_seconds_count",
            &[("backend", "bubblewrap")]
        ),
        3.0
    );

    assert_eq!(
        value(&w, "vm0_worker_first_output_seconds_count", &[]),
        2.0,
        "the runs that printed"
    );
    // The dashboard in deploy/ reads only names these scrapes export.
    let exported: std::collections::HashSet<&str> =
        after.iter().chain(&w).map(|s| s.metric.as_str()).collect();
    let dashboard = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../deploy/grafana/vm0-fleet.json"),
    )
    .expect("the dashboard");
    let read = metric_names(&dashboard);
    assert!(read.len() >= 8, "{read:?}");
    for name in &read {
        let base = name.strip_suffix("_bucket").unwrap_or(name);
        assert!(
            exported.contains(name.as_str()) || exported.contains(base),
            "the dashboard reads {name}, which nothing exports ({exported:?})"
        );
    }
    // A stream held open by a client is one, for as long as it is open.
    stack
        .create_agent("sleeper", json!({"command": ["sleep", "30"]}))
        .await;
    let sleeping = stack
        .create_run(0, json!({"agent": "sleeper", "prompt": "p"}))
        .await;
    let stream = stack
        .client
        .get(stack.url(0, &format!("/v1/runs/{sleeping}/events")))
        .bearer_auth(&stack.token)
        .send()
        .await
        .expect("events");
    assert_eq!(stream.status(), 200);
    assert_eq!(
        value(&scrape(&gateway).await, "vm0_sse_streams_open", &[]),
        1.0
    );
    // The live runs, counted from the store every few seconds.
    let running =
        |samples: &[prometheus_parse::Sample]| value(samples, "vm0_runs", &[("status", "running")]);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while running(&scrape(&gateway).await) != 1.0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let now = scrape(&gateway).await;
    assert_eq!(running(&now), 1.0, "the sleeper runs");
    assert_eq!(value(&now, "vm0_runs", &[("status", "pending")]), 0.0);
    drop(stream);
    let (status, _) = stack
        .call(
            0,
            reqwest::Method::POST,
            &format!("/v1/runs/{sleeping}/cancel"),
            None,
        )
        .await;
    assert_eq!(status.as_u16(), 200);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while value(&scrape(&gateway).await, "vm0_sse_streams_open", &[]) > 0.0
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        value(&scrape(&gateway).await, "vm0_sse_streams_open", &[]),
        0.0
    );
}

/// The `vm0_...` names in `text`.
fn metric_names(text: &str) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("vm0_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(tail.len());
        names.insert(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}
