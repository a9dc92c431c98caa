use std::time::Duration;

use futures::StreamExt;
use reqwest::Method;
use serde_json::{Value, json};
use vm0_api_types::sse::{SseDecoder, SseEvent};

use crate::common::{Db, TestGateway, assert_error};

/// One parsed SSE event.
#[derive(Debug, Clone, PartialEq)]
struct Sse {
    event: String,
    id: Option<String>,
    data: Value,
}

impl From<SseEvent> for Sse {
    fn from(e: SseEvent) -> Sse {
        Sse {
            event: e.event,
            id: e.id,
            data: serde_json::from_str(&e.data).expect("data is JSON"),
        }
    }
}

/// Opens the event stream and hands each event to `on_event` until it returns
/// false or the stream ends; returns the events and whether the server ended it.
async fn read_events(
    gw: &TestGateway,
    path: &str,
    last_event_id: Option<&str>,
    mut on_event: impl FnMut(&Sse) -> bool,
) -> (Vec<Sse>, bool) {
    let mut req = gw
        .client
        .get(gw.url(path))
        .bearer_auth(&gw.token)
        .header("accept", "text/event-stream");
    if let Some(id) = last_event_id {
        req = req.header("last-event-id", id);
    }
    let resp = req.send().await.expect("send");
    assert_eq!(resp.status().as_u16(), 200);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .expect("ct")
            .starts_with("text/event-stream")
    );
    let mut stream = resp.bytes_stream();
    let (mut decoder, mut events) = (SseDecoder::default(), Vec::new());
    loop {
        let chunk = tokio::time::timeout(Duration::from_secs(20), stream.next())
            .await
            .expect("stream stalled");
        let Some(chunk) = chunk else {
            return (events, true);
        };
        for ev in decoder.push(&chunk.expect("chunk")) {
            let ev = Sse::from(ev);
            let go_on = on_event(&ev);
            events.push(ev);
            if !go_on {
                return (events, false);
            }
        }
    }
}

async fn finished_run_replays_and_resumes_exactly(db: Db) {
    let gw = TestGateway::start(db).await;
    gw.create_agent("my-agent").await;
    let run = gw.create_run("my-agent", "p").await;
    let id = run["id"].as_str().expect("id");
    gw.post(&format!("/v1/runs/{id}/cancel"), json!({})).await;
    let path = format!("/v1/runs/{id}/events");

    let (all, ended) = read_events(&gw, &path, None, |_| true).await;
    assert!(ended, "the stream ends after complete");
    let kinds: Vec<_> = all.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(kinds, ["status", "status", "complete"]);
    assert_eq!(all[0].data, json!({"status": "pending"}));
    assert_eq!(all[1].data, json!({"status": "cancelled"}));
    assert_eq!(all[2].data["status"], "cancelled");
    let ids: Vec<_> = all.iter().map(|e| e.id.clone().expect("id")).collect();
    assert_eq!(ids, ["evt_1", "evt_2", "evt_3"]);

    // Resume at every position, through each of the three ways to say it.
    for (k, resume) in ids.iter().enumerate() {
        let (rest, ended) = read_events(&gw, &path, Some(resume), |_| true).await;
        assert!(ended);
        assert_eq!(rest, all[k + 1..].to_vec(), "after {resume} (header)");
        let (rest, _) =
            read_events(&gw, &format!("{path}?lastEventId={resume}"), None, |_| true).await;
        assert_eq!(rest, all[k + 1..].to_vec(), "after {resume} (lastEventId)");
        let (rest, _) = read_events(
            &gw,
            &format!("{path}?last_event_id={}", k + 1),
            None,
            |_| true,
        )
        .await;
        assert_eq!(
            rest,
            all[k + 1..].to_vec(),
            "after {resume} (last_event_id, bare number)"
        );
    }
    for bad in ["evt_x", "-1", "abc"] {
        let got = gw.get(&format!("{path}?lastEventId={bad}")).await;
        assert_error(
            &got,
            400,
            "invalid_request_error",
            "invalid_parameter",
            Some("lastEventId"),
        );
    }
    let got = gw.get("/v1/runs/run_nope/events").await;
    assert_error(&got, 404, "not_found_error", "resource_not_found", None);
}

async fn open_stream_sends_heartbeats_then_follows_a_cancel(db: Db) {
    let gw = TestGateway::start_with(db, |c| {
        c.sse_heartbeat = Duration::from_secs(1);
        c.sse_poll = Duration::from_millis(50);
    })
    .await;
    gw.create_agent("my-agent").await;
    let run = gw.create_run("my-agent", "p").await;
    let id = run["id"].as_str().expect("id").to_owned();
    let path = format!("/v1/runs/{id}/events");

    // Cancel from another task once the stream has shown a heartbeat.
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let canceller = {
        let (client, url, token) = (
            gw.client.clone(),
            gw.url(&format!("/v1/runs/{id}/cancel")),
            gw.token.clone(),
        );
        tokio::spawn(async move {
            rx.await.expect("heartbeat seen");
            let resp = client
                .post(url)
                .bearer_auth(token)
                .send()
                .await
                .expect("cancel");
            assert_eq!(resp.status().as_u16(), 200);
        })
    };
    let mut tx = Some(tx);
    let (events, ended) = read_events(&gw, &path, None, |e| {
        if e.event == "heartbeat"
            && let Some(tx) = tx.take()
        {
            let _ = tx.send(());
        }
        true
    })
    .await;
    canceller.await.expect("canceller");
    assert!(ended);
    let heartbeat = events
        .iter()
        .find(|e| e.event == "heartbeat")
        .expect("a heartbeat");
    assert_eq!(heartbeat.id, None, "heartbeats carry no id");
    assert!(heartbeat.data["timestamp"].is_string());
    let real: Vec<_> = events
        .iter()
        .filter(|e| e.event != "heartbeat")
        .map(|e| (e.event.as_str(), e.id.as_deref()))
        .collect();
    assert_eq!(
        real,
        [
            ("status", Some("evt_1")),
            ("status", Some("evt_2")),
            ("complete", Some("evt_3"))
        ]
    );
}

/// Stores output events `from..=to` and a `complete` after them, and marks the run
/// completed: what a worker and the control plane would have left, with whatever
/// came before `from` missing.
async fn finish_with_events(gw: &TestGateway, run_id: &str, from: i64, to: i64) {
    let now = vm0_api_types::Timestamp::now().micros();
    let mut events: Vec<vm0_db::entity::run_event::Model> = (from..=to)
        .map(|seq| vm0_db::entity::run_event::Model {
            run_id: run_id.to_owned(),
            seq,
            event_type: "output".into(),
            data: json!({"content": format!("line {seq}\n"), "stream": "stdout"}).to_string(),
            created_at: now,
        })
        .collect();
    events.push(vm0_db::entity::run_event::Model {
        run_id: run_id.to_owned(),
        seq: to + 1,
        event_type: "complete".into(),
        data: json!({"status": "completed", "exitCode": 0}).to_string(),
        created_at: now,
    });
    gw.store
        .insert_telemetry(&events, &[], &[])
        .await
        .expect("events");
    vm0_db::testing::execute(
        &gw.database_url,
        &format!(
            "UPDATE runs SET status = 'completed', last_event_seq = {}, completed_at = {now} WHERE id = '{run_id}'",
            to + 1
        ),
    )
    .await
    .expect("finish the run");
}

/// A lost event (a hole in the sequence) is waited for a bounded time, then
/// reported as an `error` event naming it; the stream goes on to `complete`,
/// whether few or a replay batch's worth of events follow the hole.
async fn a_lost_event_is_reported_and_the_stream_still_ends(db: Db) {
    let gw = TestGateway::start_with(db, |c| c.sse_gap_wait = Duration::from_millis(300)).await;
    gw.create_agent("my-agent").await;
    for after in [10, 600] {
        let run = gw.create_run("my-agent", "p").await;
        let id = run["id"].as_str().expect("id").to_owned();
        // Event 2 (the `running` status) never made it.
        finish_with_events(&gw, &id, 3, 2 + after).await;
        let started = std::time::Instant::now();
        let (events, ended) =
            read_events(&gw, &format!("/v1/runs/{id}/events"), None, |_| true).await;
        assert!(ended, "the stream ends");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(events[0].id.as_deref(), Some("evt_1"));
        assert_eq!(events[1].event, "error", "{:?}", events[1]);
        assert_eq!(events[1].id, None);
        assert_eq!(events[1].data["code"], "events_missing", "{:?}", events[1]);
        assert_eq!(events[1].data["missing"], json!(["evt_2"]));
        let ids: Vec<i64> = events[2..]
            .iter()
            .filter_map(|e| e.id.as_deref()?.strip_prefix("evt_")?.parse().ok())
            .collect();
        assert_eq!(
            ids,
            (3..=3 + after).collect::<Vec<_>>(),
            "every event after the hole, in order"
        );
        assert_eq!(events.last().map(|e| e.event.as_str()), Some("complete"));
    }
    // The end itself lost (`status` and `complete` of an ended run): reported, and
    // the stream ends.
    let run = gw.create_run("my-agent", "p").await;
    let id = run["id"].as_str().expect("id").to_owned();
    finish_with_events(&gw, &id, 2, 5).await;
    vm0_db::testing::execute(
        &gw.database_url,
        &format!("DELETE FROM run_events WHERE run_id = '{id}' AND seq = 6"),
    )
    .await
    .expect("lose the complete event");
    vm0_db::testing::execute(
        &gw.database_url,
        &format!("UPDATE runs SET last_event_seq = 7 WHERE id = '{id}'"),
    )
    .await
    .expect("a last event after it");
    let (events, ended) = read_events(&gw, &format!("/v1/runs/{id}/events"), None, |_| true).await;
    assert!(ended);
    let last = events.last().expect("events");
    assert_eq!(last.event, "error", "{events:?}");
    assert_eq!(last.data["missing"], json!(["evt_6", "evt_7"]));
    assert_eq!(last.data["missingCount"], 2);
}

/// A client that leaves takes its stream's task with it, also while the stream
/// waits for a lost event (with a replay batch's worth of events after it).
async fn a_stream_ends_when_its_client_leaves(db: Db) {
    let gw = TestGateway::start_with(db, |c| {
        c.sse_heartbeat = Duration::from_secs(60);
        c.sse_gap_wait = Duration::from_secs(60);
    })
    .await;
    gw.create_agent("my-agent").await;
    let run = gw.create_run("my-agent", "p").await;
    let id = run["id"].as_str().expect("id").to_owned();
    finish_with_events(&gw, &id, 3, 602).await;
    let before = vm0_gateway::routes::events::open_streams();
    for _ in 0..3 {
        let (events, ended) =
            read_events(&gw, &format!("/v1/runs/{id}/events"), None, |_| false).await;
        assert!(!ended && events.len() == 1, "{events:?}");
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while vm0_gateway::routes::events::open_streams() > before {
        assert!(
            std::time::Instant::now() < deadline,
            "{} streams still open after their clients left",
            vm0_gateway::routes::events::open_streams() - before
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One organization may hold `VM0_SSE_MAX_STREAMS_PER_ORG` streams open on a
/// gateway; the next is `429` in the error envelope, another organization is
/// not affected, and a stream closed makes room again.
async fn event_streams_are_bounded_per_organization(db: Db) {
    let gw = TestGateway::start_with(db, |c| {
        c.sse_max_streams_per_org = 2;
        c.sse_heartbeat = Duration::from_secs(60);
    })
    .await;
    gw.create_agent("my-agent").await;
    // No dispatch here: the run stays pending, its streams stay open.
    let run = gw.create_run("my-agent", "p").await;
    let path = format!("/v1/runs/{}/events", run["id"].as_str().expect("id"));
    let open = |token: String| {
        let req = gw.client.get(gw.url(&path)).bearer_auth(token);
        async move { req.send().await.expect("send") }
    };
    let first = open(gw.token.clone()).await;
    let second = open(gw.token.clone()).await;
    assert_eq!(
        (first.status().as_u16(), second.status().as_u16()),
        (200, 200)
    );
    let refused = gw.get(&path).await;
    assert_error(&refused, 429, "rate_limit_error", "rate_limited", None);
    assert!(
        refused.1["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("VM0_SSE_MAX_STREAMS_PER_ORG")),
        "{}",
        refused.1
    );
    // Another organization's streams are its own. (Its run, its stream.)
    let other = gw.mint_token("globex").await;
    let (status, _) = gw
        .call_as(
            &other,
            Method::POST,
            "/v1/agents",
            Some(json!({"name": "theirs", "config": {"command": ["true"]}})),
        )
        .await;
    assert_eq!(status.as_u16(), 201);
    let (status, theirs) = gw
        .call_as(
            &other,
            Method::POST,
            "/v1/runs",
            Some(json!({"agent": "theirs", "prompt": "p"})),
        )
        .await;
    assert_eq!(status.as_u16(), 202, "{theirs}");
    let resp = gw
        .client
        .get(gw.url(&format!(
            "/v1/runs/{}/events",
            theirs["id"].as_str().expect("id")
        )))
        .bearer_auth(&other)
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status().as_u16(), 200);
    // One closed: room for one more.
    drop(first);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let resp = gw
            .client
            .get(gw.url(&path))
            .bearer_auth(&gw.token)
            .send()
            .await
            .expect("send");
        if resp.status().as_u16() == 200 {
            break;
        }
        assert_eq!(resp.status().as_u16(), 429);
        assert!(
            std::time::Instant::now() < deadline,
            "no room after a stream closed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(second);
}

vm0_db::on_both_databases!(
    event_streams_are_bounded_per_organization,
    finished_run_replays_and_resumes_exactly,
    open_stream_sends_heartbeats_then_follows_a_cancel,
    a_lost_event_is_reported_and_the_stream_still_ends,
    a_stream_ends_when_its_client_leaves,
);
