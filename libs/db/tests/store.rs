//! Store behaviour under concurrency, on SQLite and on a real PostgreSQL server.

use vm0_api_types::Timestamp;
use vm0_db::{
    CancelOutcome, ClaimOutcome, FinishOutcome, FinishRun, NewRun, Store, StoreError, UpdateOutcome,
};

use vm0_db::testing::{TestDb as Db, fresh_database_url as url};

async fn store(db: Db, dir: &std::path::Path) -> Store {
    let store = Store::connect(&url(db, dir).await, 8)
        .await
        .expect("connect");
    store.migrate().await.expect("migrate");
    store
}

fn now() -> i64 {
    Timestamp::now().micros()
}

/// A pending run of a new agent of the organization `acme`.
async fn pending_run(
    store: &Store,
) -> (
    vm0_db::entity::organization::Model,
    vm0_db::entity::run::Model,
) {
    let org = store.ensure_organization("acme", now()).await.expect("org");
    let (agent, version) = store
        .create_agent(&org.id, "a", r#"{"command":["true"]}"#, "h", now())
        .await
        .expect("agent");
    let run = store
        .create_run(NewRun {
            id: vm0_api_types::ids::new_id(vm0_api_types::ids::IdKind::Run),
            org_id: org.id.clone(),
            agent_id: agent.id.clone(),
            agent_name: agent.name.clone(),
            agent_version_id: version.id.clone(),
            session_id: None,
            prompt: "p".into(),
            variables: "{}".into(),
            secret_names: "[]".into(),
            volumes: "{}".into(),
            artifact_name: None,
            artifact_version: None,
            secrets_sealed: None,
            timeout_seconds: 600,
            now: now(),
            resumed_from: None,
        })
        .await
        .expect("run");
    (org, run)
}

async fn migrations_are_idempotent_and_concurrent(db: Db) {
    let dir = tempfile::tempdir().expect("dir");
    let url = url(db, dir.path()).await;
    let a = Store::connect(&url, 2).await.expect("a");
    let b = Store::connect(&url, 2).await.expect("b");
    let (ra, rb) = tokio::join!(a.migrate(), b.migrate());
    ra.expect("first migrator");
    rb.expect("second migrator");
    a.migrate().await.expect("again");
    a.ping().await.expect("ping");
}

async fn one_of_many_concurrent_cancels_wins(db: Db) {
    let dir = tempfile::tempdir().expect("dir");
    let store = store(db, dir.path()).await;
    let (org, run) = pending_run(&store).await;
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let (store, org, id) = (store.clone(), org.id.clone(), run.id.clone());
            tokio::spawn(async move { store.cancel_run(&org, &id, now()).await })
        })
        .collect();
    let mut cancelled = 0;
    for t in tasks {
        match t.await.expect("join") {
            Ok(CancelOutcome::Cancelled(_)) => cancelled += 1,
            Ok(CancelOutcome::AlreadyFinished(r)) => assert_eq!(r.status, "cancelled"),
            Ok(CancelOutcome::NotFound) => panic!("run vanished"),
            Ok(CancelOutcome::Requested(_)) => panic!("the run is pending, not running"),
            Err(StoreError::Conflict) => {} // lost every retry: allowed, nothing written
            Err(e) => panic!("{e:?}"),
        }
    }
    assert_eq!(cancelled, 1, "exactly one cancel wins");
    let events = store.events_after(&run.id, 0, 100).await.expect("events");
    let seqs: Vec<i64> = events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, [1, 2, 3], "no holes, no duplicates");
    assert_eq!(events[2].event_type, "complete");
}

async fn concurrent_agent_updates_never_share_a_version_number(db: Db) {
    let dir = tempfile::tempdir().expect("dir");
    let store = store(db, dir.path()).await;
    let org = store.ensure_organization("acme", now()).await.expect("org");
    let (agent, _) = store
        .create_agent(&org.id, "a", "{}", "h0", now())
        .await
        .expect("agent");
    let tasks: Vec<_> = (1..=8)
        .map(|i| {
            let (store, org, id) = (store.clone(), org.id.clone(), agent.id.clone());
            tokio::spawn(async move {
                store
                    .update_agent_config(&org, &id, "{}", &format!("h{i}"), now())
                    .await
            })
        })
        .collect();
    let mut new_versions = 0;
    for t in tasks {
        match t.await.expect("join") {
            Ok(Some(UpdateOutcome::NewVersion(..))) => new_versions += 1,
            Ok(other) => panic!("unexpected {other:?}"),
            Err(StoreError::Conflict) | Err(StoreError::Db(_)) => {} // lost the race
            Err(e) => panic!("{e:?}"),
        }
    }
    assert!(new_versions >= 1);
    let versions = store
        .list_agent_versions(&org.id, &agent.id, None, 100)
        .await
        .expect("versions");
    assert_eq!(versions.len(), new_versions + 1);
    let mut numbers: Vec<i64> = versions.iter().map(|v| v.version_number).collect();
    numbers.sort_unstable();
    let expected: Vec<i64> = (1..=numbers.len() as i64).collect();
    assert_eq!(
        numbers, expected,
        "version numbers are 1..n without gaps or duplicates"
    );
    let current = store
        .get_agent(&org.id, &agent.id)
        .await
        .expect("q")
        .expect("agent");
    let newest = versions
        .iter()
        .max_by_key(|v| v.version_number)
        .expect("newest");
    assert_eq!(current.current_version_id, newest.id);
}

/// The control plane ends a run (a forced cancel, the reaper) while its worker's
/// telemetry is still being stored: `complete` is the run's last event, right
/// after its `status`, with no number skipped or taken twice, and what the
/// worker sent after it is not stored.
async fn complete_stays_last_while_a_worker_keeps_sending(db: Db) {
    let dir = tempfile::tempdir().expect("dir");
    let store = store(db, dir.path()).await;
    let (_, run) = pending_run(&store).await;
    let ClaimOutcome::Claimed(claim) = store
        .claim_run(&run.id, "w1", "t", now())
        .await
        .expect("claim")
    else {
        panic!("not claimed");
    };
    let first = claim.next_event_seq;
    let worker = {
        let (store, id) = (store.clone(), run.id.clone());
        tokio::spawn(async move {
            for seq in first..first + 200 {
                let e = vm0_db::entity::run_event::Model {
                    run_id: id.clone(),
                    seq,
                    event_type: "output".into(),
                    data: r#"{"content":"x\n","stream":"stdout"}"#.into(),
                    created_at: now(),
                };
                store
                    .insert_telemetry(&[e], &[], &[])
                    .await
                    .expect("telemetry");
            }
        })
    };
    // Ended by the control plane, which does not know the worker's numbers.
    while store.max_event_seq(&run.id).await.expect("max") < first + 50 {
        tokio::task::yield_now().await;
    }
    let ended = store
        .finish_run(FinishRun {
            run_id: run.id.clone(),
            attempt: claim.attempt,
            worker_id: None,
            status: vm0_api_types::runs::RunStatus::Cancelled,
            exit_code: None,
            error: Some("cancelled by user".into()),
            execution_time_ms: Some(1),
            last_worker_seq: 0,
            log: "forced".into(),
            now: now(),
            artifact_version: None,
            checkpoint: None,
        })
        .await
        .expect("finish");
    assert!(matches!(ended, FinishOutcome::Finished { .. }));
    worker.await.expect("worker");
    let events = store.events_after(&run.id, 0, 1000).await.expect("events");
    let seqs: Vec<i64> = events.iter().map(|e| e.seq).collect();
    assert_eq!(
        seqs,
        (1..=seqs.len() as i64).collect::<Vec<_>>(),
        "no number skipped or taken twice"
    );
    let kinds: Vec<&str> = events.iter().map(|e| e.event_type.as_str()).collect();
    assert_eq!(
        kinds.last(),
        Some(&"complete"),
        "complete is last: {kinds:?}"
    );
    assert_eq!(kinds[kinds.len() - 2], "status");
    assert_eq!(kinds.iter().filter(|k| **k == "complete").count(), 1);
    assert!(
        seqs.len() < 200 + 4,
        "what the worker sent after complete is not stored ({} events)",
        seqs.len()
    );
}

vm0_db::on_both_databases!(
    complete_stays_last_while_a_worker_keeps_sending,
    migrations_are_idempotent_and_concurrent,
    one_of_many_concurrent_cancels_wins,
    concurrent_agent_updates_never_share_a_version_number
);
