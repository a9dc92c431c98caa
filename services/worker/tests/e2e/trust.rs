//! The control plane and the secrets from an intruder's side: a second worker's
//! credential, a plaintext client on the TLS listener, a gateway with another
//! secrets key, and the sealed secrets left behind by each way a run ends.

use std::time::Duration;

use reqwest::Method;
use serde_json::json;
use vm0_proto::worker::{self as pb, ClaimOutcome, FinalStatus};

use crate::harness::{Db, Stack, StackOptions};

const WAIT: Duration = Duration::from_secs(30);

/// A gRPC client of gateway 0 holding `credential`.
fn client(stack: &Stack, credential: &str) -> vm0_worker::control::Client {
    vm0_worker::control::connect(&stack.gateways[0].grpc, credential, Some(&stack.ca_file()))
        .expect("client")
}

/// Worker B holds a credential of its own: it cannot speak as worker A, nor
/// finish, report on or claim A's run; A's run ends as A says.
async fn worker_b_cannot_act_for_worker_a(db: Db) {
    let stack = Stack::start(db, StackOptions::default()).await;
    stack
        .create_agent(
            "slow",
            json!({"command": ["sh", "-c", "echo up; sleep 3; echo done"]}),
        )
        .await;
    let id = stack
        .create_run(
            0,
            json!({"agent": "slow", "prompt": "p", "secrets": {"TOKEN": "s3cr3t-value"}}),
        )
        .await;
    stack.wait_for(&id, WAIT, |s| s == "running").await;
    let a = stack.workers[0].id.clone();
    assert_eq!(
        stack
            .store
            .get_run_by_id(&id)
            .await
            .expect("q")
            .expect("run")
            .worker_id
            .as_deref(),
        Some(a.as_str())
    );
    let b_credential = stack.worker_credential("intruder").await;
    let mut b = client(&stack, &b_credential);

    let denied = |r: Result<(), tonic::Status>, what: &str| match r {
        Err(s) if s.code() == tonic::Code::PermissionDenied => {}
        other => panic!("{what}: {other:?}"),
    };
    denied(
        b.register_worker(pb::RegisterWorkerRequest {
            worker_id: a.clone(),
            ..Default::default()
        })
        .await
        .map(drop),
        "register as A",
    );
    denied(
        b.heartbeat(pb::HeartbeatRequest {
            worker_id: a.clone(),
            ..Default::default()
        })
        .await
        .map(drop),
        "heartbeat as A",
    );
    let finish = |worker_id: &str| pb::FinishRequest {
        run_id: id.clone(),
        worker_id: worker_id.to_owned(),
        attempt: 1,
        status: FinalStatus::Completed.into(),
        exit_code: Some(0),
        execution_time_ms: 1,
        last_event_seq: 2,
        ..Default::default()
    };
    denied(b.finish(finish(&a)).await.map(drop), "finish as A");
    // As itself, B registers, then is refused A's run: it does not hold it.
    let me = b
        .register_worker(pb::RegisterWorkerRequest::default())
        .await
        .expect("register as itself")
        .into_inner();
    assert_eq!(me.worker_id, "intruder", "the credential says who it is");
    let done = b.finish(finish("")).await.expect("finish").into_inner();
    assert!(!done.accepted, "B finished A's run");
    let report = b
        .report_status(pb::ReportStatusRequest {
            run_id: id.clone(),
            attempt: 1,
            message: "forged".into(),
            ..Default::default()
        })
        .await
        .expect("report")
        .into_inner();
    assert!(!report.accepted, "B reported on A's run");
    let claim = b
        .claim(pb::ClaimRequest {
            run_id: id.clone(),
            ..Default::default()
        })
        .await
        .expect("claim")
        .into_inner();
    assert_eq!(claim.outcome, i32::from(ClaimOutcome::AlreadyClaimed));
    assert!(claim.spec.is_none(), "no spec, no secrets for B");

    let run = stack.wait_finished(&id, WAIT).await;
    assert_eq!(run["status"], "completed", "A's run ends as A says: {run}");
    let logs = stack.logs(&id).await;
    assert!(!logs.iter().any(|l| l["message"] == "forged"), "{logs:?}");
    assert!(run["startedAt"].is_string());

    // An unknown credential, and the old shared token, are nobody.
    for credential in [
        format!("vm0_worker_{}", "0".repeat(64)),
        "e2e-worker-token-0123456789".to_owned(),
    ] {
        let err = client(&stack, &credential)
            .heartbeat(pb::HeartbeatRequest::default())
            .await
            .expect_err("refused");
        assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err}");
    }
    // A revoked credential is refused within the cache's few seconds.
    stack
        .store
        .revoke_worker_credential("intruder", vm0_api_types::Timestamp::now().micros())
        .await
        .expect("revoke");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match b.heartbeat(pb::HeartbeatRequest::default()).await {
            Err(s) if s.code() == tonic::Code::Unauthenticated => break,
            _ if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            other => panic!("a revoked credential still works: {other:?}"),
        }
    }
}

/// The control plane speaks TLS: a plaintext client, and a client that trusts
/// another CA, get nowhere.
async fn a_plaintext_client_is_refused_on_the_tls_listener(db: Db) {
    let stack = Stack::start(
        db,
        StackOptions {
            workers: 0,
            ..Default::default()
        },
    )
    .await;
    let credential = stack.worker_credential("w-plain").await;
    let plain = stack.gateways[0].grpc.replace("https://", "http://");
    let err = vm0_worker::control::connect(&plain, &credential, None)
        .expect("client")
        .register_worker(pb::RegisterWorkerRequest::default())
        .await
        .expect_err("a plaintext call on the TLS port fails");
    // Refused at the transport: the call never reached the service (which would
    // have answered with an authentication or permission status).
    assert!(
        matches!(
            err.code(),
            tonic::Code::Unavailable
                | tonic::Code::Unknown
                | tonic::Code::Internal
                | tonic::Code::Cancelled
        ),
        "{err}"
    );
    let dir = tempfile::tempdir().expect("dir");
    let other = vm0_tls::Authority::new("someone else").expect("ca");
    std::fs::write(dir.path().join("ca.pem"), other.cert_pem()).expect("write");
    let err = vm0_worker::control::connect(
        &stack.gateways[0].grpc,
        &credential,
        Some(&dir.path().join("ca.pem")),
    )
    .expect("client")
    .register_worker(pb::RegisterWorkerRequest::default())
    .await
    .expect_err("a certificate from another CA is not trusted");
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err}");
    // With the right CA it works.
    let ok = client(&stack, &credential)
        .register_worker(pb::RegisterWorkerRequest::default())
        .await
        .expect("TLS with the stack's CA");
    assert_eq!(ok.into_inner().worker_id, "w-plain");
}

/// A gateway whose secrets key is not the deployment's stops at start, naming
/// VM0_SECRETS_KEY; during a rotation (the old key among the old ones) it starts.
async fn a_gateway_with_another_secrets_key_refuses_to_start(db: Db) {
    let stack = Stack::start(
        db,
        StackOptions {
            workers: 0,
            ..Default::default()
        },
    )
    .await;
    let config = || vm0_gateway::GatewayConfig::for_database(stack.database_url());
    let err = vm0_gateway::Gateway::open(config(), vm0_gateway::secrets::SecretBox::random())
        .await
        .err()
        .map(|e| format!("{e:#}"))
        .expect("a second key is refused");
    assert!(err.contains("VM0_SECRETS_KEY"), "{err}");
    let rotated = vm0_gateway::secrets::SecretBox::random().with_old_keys(&[stack.secrets_key()]);
    let next_id = rotated.key_id().to_owned();
    vm0_gateway::Gateway::open(config(), rotated)
        .await
        .expect("a rotation that keeps the old key starts");
    assert!(
        stack
            .store
            .secrets_key_ids()
            .await
            .expect("ids")
            .contains(&next_id)
    );
}

/// Whatever ends a run, its sealed secrets are gone from the store afterwards.
async fn every_way_a_run_ends_erases_its_secrets(db: Db) {
    let mut stack = Stack::start(
        db,
        StackOptions {
            workers: 0,
            worker_lost_after: Duration::from_secs(2),
            ..Default::default()
        },
    )
    .await;
    let secrets = json!({"TOKEN": "s3cr3t-value"});
    for (name, config) in [
        ("ok", json!({"command": ["true"]})),
        ("fails", json!({"command": ["sh", "-c", "exit 3"]})),
        (
            "slow",
            json!({"command": ["sh", "-c", "echo up; sleep 600"], "timeoutSeconds": 1}),
        ),
        (
            "waits",
            json!({"command": ["sh", "-c", "echo up; sleep 600"]}),
        ),
        (
            "huge",
            json!({"command": ["true"], "resources": {"vcpus": 64}}),
        ),
    ] {
        stack.create_agent(name, config).await;
    }
    let run = |agent: &str| json!({"agent": agent, "prompt": "p", "secrets": secrets});
    // Cancelled while pending: no worker yet.
    let pending = stack.create_run(0, run("ok")).await;
    let sealed = stack
        .store
        .get_run_by_id(&pending)
        .await
        .expect("q")
        .expect("run")
        .secrets_sealed;
    assert!(
        sealed.as_deref().is_some_and(|s| !s.contains("s3cr3t")),
        "stored sealed: {sealed:?}"
    );
    let (status, _) = stack
        .call(0, Method::POST, &format!("/v1/runs/{pending}/cancel"), None)
        .await;
    assert_eq!(status.as_u16(), 200);
    stack.add_worker().await;
    let mut ended = vec![("cancelled while pending", pending)];
    for (what, agent) in [
        ("completed", "ok"),
        ("failed", "fails"),
        ("timed out", "slow"),
        ("rejected at claim", "huge"),
    ] {
        let id = stack.create_run(0, run(agent)).await;
        stack.wait_finished(&id, WAIT).await;
        ended.push((what, id));
    }
    let running = stack.create_run(0, run("waits")).await;
    stack.wait_for(&running, WAIT, |s| s == "running").await;
    let (status, _) = stack
        .call(0, Method::POST, &format!("/v1/runs/{running}/cancel"), None)
        .await;
    assert_eq!(status.as_u16(), 200);
    stack.wait_finished(&running, WAIT).await;
    ended.push(("cancelled while running", running));
    let lost = stack.create_run(0, run("waits")).await;
    stack.wait_for(&lost, WAIT, |s| s == "running").await;
    stack.workers[0].kill_9();
    let run_lost = stack.wait_finished(&lost, WAIT).await;
    assert_eq!(run_lost["error"], "worker_lost", "{run_lost}");
    ended.push(("its worker lost", lost));
    for (what, id) in ended {
        let row = stack
            .store
            .get_run_by_id(&id)
            .await
            .expect("q")
            .expect("run");
        assert!(
            row.secrets_sealed.is_none(),
            "a run {what} ({}) kept its sealed secrets",
            row.status
        );
    }
}

vm0_db::on_both_databases!(
    worker_b_cannot_act_for_worker_a,
    a_plaintext_client_is_refused_on_the_tls_listener,
    a_gateway_with_another_secrets_key_refuses_to_start,
    every_way_a_run_ends_erases_its_secrets,
);
