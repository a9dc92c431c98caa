use std::collections::HashMap;
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::json;

use vm0_gateway::config::DispatchConfig;

use crate::harness::{Db, Stack, StackOptions, processes_with};

async fn two_gateways_two_workers_run_50_runs_exactly_once(db: Db) {
    let stack = Stack::start(
        db,
        StackOptions {
            gateways: 2,
            workers: 2,
            worker_slots: 4,
            ..Default::default()
        },
    )
    .await;
    stack
        .create_agent(
            "once",
            json!({"command": ["sh", "-c", "echo \"ran $VM0_RUN_ID\"; sleep 0.2"]}),
        )
        .await;
    let mut ids = Vec::new();
    for i in 0..50 {
        ids.push(
            stack
                .create_run(i % 2, json!({"agent": "once", "prompt": format!("n{i}")}))
                .await,
        );
    }
    let mut per_worker: HashMap<String, usize> = HashMap::new();
    for id in &ids {
        let run = stack.wait_finished(id, Duration::from_secs(120)).await;
        assert_eq!(run["status"], "completed", "{run}");
    }
    // Exactly one claim and one execution per run, on either gateway's view.
    for (i, id) in ids.iter().enumerate() {
        let events = stack.events(i % 2, id, None).await;
        let ran: Vec<_> = events.iter().filter(|e| e.0 == "output").collect();
        assert_eq!(ran.len(), 1, "run {id} output {ran:?}");
        assert_eq!(ran[0].2["content"], format!("ran {id}\n"));
        let claims: Vec<String> = stack
            .logs(id)
            .await
            .iter()
            .filter_map(|l| {
                l["message"]
                    .as_str()
                    .filter(|m| m.starts_with("claimed by"))
                    .map(str::to_owned)
            })
            .collect();
        assert_eq!(claims.len(), 1, "{id}: {claims:?}");
        *per_worker
            .entry(
                claims[0]
                    .clone()
                    .split_whitespace()
                    .nth(3)
                    .unwrap_or_default()
                    .to_owned(),
            )
            .or_default() += 1;
    }
    assert_eq!(per_worker.values().sum::<usize>(), 50);
    assert_eq!(
        per_worker.len(),
        2,
        "both workers took runs: {per_worker:?}"
    );
    assert_eq!(stack.scratch_dirs(), 0, "no scratch dir remains");
}

async fn a_killed_worker_loses_its_run_and_the_others_complete(db: Db) {
    let e2e_lost_marker = crate::harness::marker("lost");
    let mut stack = Stack::start(
        db,
        StackOptions {
            workers: 1,
            worker_slots: 1,
            // The defaults an operator gets.
            worker_lost_after: DispatchConfig::DEFAULT_WORKER_LOST_AFTER,
            heartbeat_interval: DispatchConfig::DEFAULT_HEARTBEAT_INTERVAL,
            ..Default::default()
        },
    )
    .await;
    stack
        .create_agent(
            "long",
            json!({"command": ["sh", "-c", format!("echo up; sleep 600 # {e2e_lost_marker}")]}),
        )
        .await;
    stack
        .create_agent("short", json!({"command": ["sh", "-c", "echo quick"]}))
        .await;
    let doomed = stack
        .create_run(0, json!({"agent": "long", "prompt": "p"}))
        .await;
    stack
        .wait_for(&doomed, Duration::from_secs(30), |s| s == "running")
        .await;
    // Its first output is stored: it really runs.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !stack
        .logs(&doomed)
        .await
        .iter()
        .any(|l| l["message"] == "up\n")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no output from the run"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stack.workers[0].kill_9();
    let killed = std::time::Instant::now();
    // The sandbox dies with its worker (bubblewrap --die-with-parent).
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while processes_with(&e2e_lost_marker) > 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        processes_with(&e2e_lost_marker),
        0,
        "the sandbox outlived its worker"
    );
    let lost = stack.wait_finished(&doomed, Duration::from_secs(30)).await;
    let noticed = killed.elapsed();
    eprintln!("a worker killed with SIGKILL: its run failed after {noticed:?}");
    assert_eq!(lost["status"], "failed");
    assert_eq!(lost["error"], "worker_lost");
    assert!(
        noticed <= Duration::from_secs(10),
        "the lost worker was noticed after {noticed:?}, not within 10 s"
    );
    let survivor = stack.add_worker().await;
    let others: Vec<String> = futures_ids(&stack, 3).await;
    for id in &others {
        let run = stack.wait_finished(id, Duration::from_secs(30)).await;
        assert_eq!(run["status"], "completed", "{run}");
    }
    // The redelivered job of the lost run was not executed again.
    let events = stack.events(0, &doomed, None).await;
    assert_eq!(events.iter().filter(|e| e.0 == "output").count(), 1);
    assert!(stack.workers[survivor].id.starts_with('w'));
}

async fn futures_ids(stack: &Stack, n: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for _ in 0..n {
        ids.push(
            stack
                .create_run(0, json!({"agent": "short", "prompt": "p"}))
                .await,
        );
    }
    ids
}

async fn sigterm_drains_running_runs(db: Db) {
    let mut stack = Stack::start(db, StackOptions::default()).await;
    stack
        .create_agent(
            "brief",
            json!({"command": ["sh", "-c", "sleep 1; echo finished"]}),
        )
        .await;
    let id = stack
        .create_run(0, json!({"agent": "brief", "prompt": "p"}))
        .await;
    stack
        .wait_for(&id, Duration::from_secs(30), |s| s == "running")
        .await;
    stack.workers[0].terminate();
    let status = stack.workers[0]
        .wait_exit(Duration::from_secs(20))
        .expect("the worker exits after draining");
    assert!(status.success(), "{status:?}");
    let run = stack.run(&id).await;
    assert_eq!(
        run["status"], "completed",
        "the running run finished before the worker left: {run}"
    );
}

async fn runs_created_while_nats_is_down_are_not_lost(db: Db) {
    let mut stack = Stack::start(
        db,
        StackOptions {
            pending_republish_after: Duration::from_secs(2),
            ..Default::default()
        },
    )
    .await;
    stack
        .create_agent("hello", json!({"command": ["echo", "hello"]}))
        .await;
    stack.nats.stop().await;
    // The store takes the run; its job cannot be published.
    let id = stack
        .create_run(0, json!({"agent": "hello", "prompt": "p"}))
        .await;
    tokio::time::sleep(Duration::from_secs(6)).await; // past every publish retry
    assert_eq!(stack.run(&id).await["status"], "pending");
    stack.nats.resume().await;
    // The sweeper republishes it and a worker runs it, once.
    let run = stack.wait_finished(&id, Duration::from_secs(60)).await;
    assert_eq!(run["status"], "completed", "{run}");
    let events = stack.events(0, &id, None).await;
    let outputs: Vec<_> = events.iter().filter(|e| e.0 == "output").collect();
    assert_eq!(outputs.len(), 1, "{events:?}");
}

/// Each gateway caches verified tokens; a revocation through one gateway reaches
/// the others' caches over NATS at once, not after the cache's time limit.
#[tokio::test]
async fn a_token_revoked_through_one_gateway_is_refused_by_the_others_at_once() {
    let stack = Stack::start(
        Db::Sqlite,
        StackOptions {
            gateways: 2,
            workers: 0,
            auth_cache_ttl: Duration::from_secs(120),
            ..Default::default()
        },
    )
    .await;
    let (status, created) = stack
        .call(0, Method::POST, "/v1/tokens", Some(json!({"name": "ci"})))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let (id, secret) = (
        created["id"].as_str().expect("id"),
        created["token"].as_str().expect("token"),
    );
    let agents_on = |gateway: usize| {
        stack
            .client
            .get(stack.url(gateway, "/v1/agents"))
            .bearer_auth(secret)
            .send()
    };
    // Gateway 1 verifies the token, and caches it for two minutes.
    assert_eq!(agents_on(1).await.expect("GET").status(), StatusCode::OK);
    let (status, body) = stack
        .call(0, Method::DELETE, &format!("/v1/tokens/{id}"), None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    let revoked = std::time::Instant::now();
    loop {
        let resp = agents_on(1).await.expect("GET");
        if resp.status() == StatusCode::UNAUTHORIZED {
            let body: serde_json::Value = resp.json().await.expect("json");
            assert_eq!(body["error"]["code"], "invalid_api_key", "{body}");
            break;
        }
        assert!(
            revoked.elapsed() < Duration::from_secs(2),
            "gateway 1 still accepts the revoked token after {:?}",
            revoked.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    eprintln!(
        "revocation reached the other gateway in {:?}",
        revoked.elapsed()
    );
}

vm0_db::on_both_databases!(
    runs_created_while_nats_is_down_are_not_lost,
    two_gateways_two_workers_run_50_runs_exactly_once,
    a_killed_worker_loses_its_run_and_the_others_complete,
    sigterm_drains_running_runs,
);
