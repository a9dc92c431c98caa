use std::collections::HashSet;

use serde_json::json;

use crate::common::{Db, TestGateway, assert_error, assert_invalid};

const N: usize = 250;

async fn walks_of_250_runs_and_agents(db: Db) {
    let gw = TestGateway::start(db).await;
    gw.create_agent("my-agent").await;
    let mut created = Vec::with_capacity(N);
    for i in 0..N {
        created.push(
            gw.create_run("my-agent", &format!("run {i}")).await["id"]
                .as_str()
                .expect("id")
                .to_owned(),
        );
    }
    for limit in [1, 7, 100] {
        let walked: Vec<String> = gw
            .walk("/v1/runs", limit)
            .await
            .iter()
            .map(|r| r["id"].as_str().expect("id").to_owned())
            .collect();
        assert_eq!(walked.len(), N, "limit {limit}");
        let unique: HashSet<_> = walked.iter().collect();
        assert_eq!(unique.len(), N, "duplicates with limit {limit}");
        let mut newest_first = created.clone();
        newest_first.reverse();
        assert_eq!(walked, newest_first, "limit {limit}: order is newest first");
    }
    // Rows inserted during a walk do not disturb it.
    let (_, first) = gw.get("/v1/runs?limit=50").await;
    let cursor = first["pagination"]["nextCursor"]
        .as_str()
        .expect("cursor")
        .to_owned();
    gw.create_run("my-agent", "late").await;
    let (_, second) = gw.get(&format!("/v1/runs?limit=50&cursor={cursor}")).await;
    assert_eq!(second["data"][0]["id"], created[N - 51].as_str());

    for i in 0..N {
        let (status, _) = gw
            .post(
                "/v1/agents",
                json!({"name": format!("agent-{i}"), "config": {"command": ["true"]}}),
            )
            .await;
        assert_eq!(status.as_u16(), 201);
    }
    let agents = gw.walk("/v1/agents", 33).await;
    assert_eq!(agents.len(), N + 1);
    let unique: HashSet<_> = agents.iter().map(|a| a["id"].to_string()).collect();
    assert_eq!(unique.len(), N + 1);
}

async fn bad_limits_and_forged_cursors(db: Db) {
    let gw = TestGateway::start(db).await;
    gw.create_agent("my-agent").await;
    for _ in 0..3 {
        gw.create_run("my-agent", "p").await;
    }
    let (_, page) = gw.get("/v1/runs?limit=1").await;
    let run_cursor = page["pagination"]["nextCursor"]
        .as_str()
        .expect("cursor")
        .to_owned();
    for path in ["/v1/runs", "/v1/agents", "/v1/tokens"] {
        for q in ["limit=0", "limit=101", "limit=-5", "limit=ten", "limit="] {
            let got = gw.get(&format!("{path}?{q}")).await;
            assert_error(
                &got,
                400,
                "invalid_request_error",
                "invalid_parameter",
                Some("limit"),
            );
        }
        for cursor in ["garbage", "eyJpZCI6ImFnX2RlZiJ9", "%00", "A"] {
            let got = gw.get(&format!("{path}?cursor={cursor}")).await;
            assert_invalid(&got, "cursor");
        }
    }
    // A cursor of the runs list is not one of the agents list.
    let got = gw.get(&format!("/v1/agents?cursor={run_cursor}")).await;
    assert_error(
        &got,
        400,
        "invalid_request_error",
        "invalid_parameter",
        Some("cursor"),
    );
    let got = gw.get("/v1/runs?limit=1&limit=2").await;
    assert_error(
        &got,
        400,
        "invalid_request_error",
        "invalid_parameter",
        Some("limit"),
    );
}

/// A cursor of the right form and scope whose id is not the integer these lists
/// key on: a client error, not a 500.
async fn forged_cursors_on_logs_and_metrics_are_400(db: Db) {
    let gw = TestGateway::start(db).await;
    gw.create_agent("a").await;
    let run = gw.create_run("a", "p").await;
    let id = run["id"].as_str().expect("id");
    for (path, scope) in [
        ("logs", "logs"),
        ("logs?order=desc", "logs"),
        ("metrics", "metrics"),
    ] {
        for forged_id in ["not-a-number", "1.5", "", "99999999999999999999999"] {
            let cursor = vm0_api_types::cursor::Cursor {
                scope: scope.into(),
                key: 1,
                id: forged_id.into(),
            }
            .encode();
            let sep = if path.contains('?') { '&' } else { '?' };
            let got = gw
                .get(&format!("/v1/runs/{id}/{path}{sep}cursor={cursor}"))
                .await;
            assert_invalid(&got, "cursor");
        }
    }
}

vm0_db::on_both_databases!(
    walks_of_250_runs_and_agents,
    bad_limits_and_forged_cursors,
    forged_cursors_on_logs_and_metrics_are_400,
);
