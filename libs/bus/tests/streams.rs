//! The streams' own bounds, against a real nats-server: `RUN_TELEMETRY` holds
//! what it was sized for and then refuses (never drops unstored telemetry), and
//! a gateway brings an existing stream to the size it is configured with.

use vm0_api_types::runs::RunEventType;
use vm0_bus::server::NatsServer;
use vm0_bus::{Bus, Role, TELEMETRY_STREAM, Telemetry};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

#[tokio::test]
async fn telemetry_is_refused_when_its_stream_is_full_and_none_is_dropped() {
    let dir = tempfile::tempdir().expect("dir");
    let nats = NatsServer::start(free_port(), &dir.path().join("nats"), None)
        .await
        .expect("nats-server starts (scripts/test.sh installs it)");
    let gateway = Bus::connect(&nats.options(Role::Gateway), Role::Gateway, "gw")
        .await
        .expect("gateway");
    gateway.ensure_streams(8 << 20).await.expect("streams");
    // Shrunk by the next gateway to start (its configuration says 1 MiB).
    gateway
        .ensure_streams(1 << 20)
        .await
        .expect("streams again");
    let worker = Bus::connect(&nats.options(Role::Worker), Role::Worker, "w")
        .await
        .expect("worker");
    let line = "x".repeat(32 * 1024);
    let mut stored = 0u64;
    let mut refused = None;
    for seq in 1..=200 {
        let msg = Telemetry::Event {
            seq,
            event: RunEventType::Output,
            data: serde_json::json!({"content": line, "stream": "stdout"}),
            ts: 0,
        };
        match worker.publish_telemetry("run_full", &msg).await {
            Ok(()) => stored += 1,
            Err(e) => {
                refused = Some(e.to_string());
                break;
            }
        }
    }
    let refused = refused.expect("a full stream refuses telemetry");
    assert!(
        (20..40).contains(&stored),
        "about 1 MiB of 32 KiB messages is stored, {stored} were: {refused}"
    );
    let js = async_nats::jetstream::new(gateway.client().clone());
    let mut stream = js.get_stream(TELEMETRY_STREAM).await.expect("stream");
    let info = stream.info().await.expect("info");
    assert_eq!(info.config.max_bytes, 1 << 20);
    assert_eq!(
        info.state.messages, stored,
        "what was stored is all still there"
    );
    assert_eq!(info.state.first_sequence, 1, "nothing old was dropped");
}
