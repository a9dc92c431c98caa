//! NATS from a neighbour's side: a real nats-server as `vm0 dev` and the tests
//! run it, probed by clients without credentials, with the workers' role, and
//! without TLS where TLS is on.

use std::time::Duration;

use futures::StreamExt;
use vm0_bus::server::{NatsServer, ServerTls};
use vm0_bus::{Bus, NatsOptions, Role};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

async fn server(dir: &std::path::Path) -> NatsServer {
    NatsServer::start(free_port(), &dir.join("nats"), None)
        .await
        .expect("nats-server starts (scripts/test.sh installs it)")
}

/// A plain client with `options`, reporting server errors (permission
/// violations) on the returned channel.
async fn client(
    options: &NatsOptions,
) -> Result<
    (
        async_nats::Client,
        tokio::sync::mpsc::UnboundedReceiver<String>,
    ),
    async_nats::ConnectError,
> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let mut connect = async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(3))
        .event_callback(move |event| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(event.to_string());
            }
        });
    if let Some(c) = &options.credentials {
        connect = connect.user_and_password(c.user.clone(), c.password.clone());
    }
    if let Some(ca) = &options.ca {
        connect = connect.add_root_certificates(ca.clone()).require_tls(true);
    }
    connect.connect(&options.url).await.map(|c| (c, rx))
}

#[tokio::test]
async fn an_anonymous_client_is_refused() {
    let dir = tempfile::tempdir().expect("dir");
    let nats = server(dir.path()).await;
    let err = client(&NatsOptions::new(nats.url()))
        .await
        .expect_err("no credentials, no connection");
    assert!(
        err.to_string().to_lowercase().contains("authorization"),
        "{err}"
    );
    let mut wrong = nats.options(Role::Worker);
    if let Some(c) = wrong.credentials.as_mut() {
        c.password.push('x');
    }
    assert!(client(&wrong).await.is_err(), "a wrong password is refused");
}

/// A stolen worker credential: it cannot read any run's output, nor the
/// gateway's inboxes (where the persister's deliveries of every tenant's
/// telemetry arrive), nor fake a run's status or a token revocation.
#[tokio::test]
async fn a_worker_credential_reads_no_run_s_output_and_fakes_no_status() {
    let dir = tempfile::tempdir().expect("dir");
    let nats = server(dir.path()).await;
    let gateway = Bus::connect(&nats.options(Role::Gateway), Role::Gateway, "gw")
        .await
        .expect("gateway connects");
    gateway
        .ensure_streams(vm0_bus::TELEMETRY_MAX_BYTES)
        .await
        .expect("streams");
    let (worker, mut errors) = client(&nats.options(Role::Worker))
        .await
        .expect("worker connects");

    let mut output = worker
        .subscribe("runs.run_victim.output")
        .await
        .expect("sub");
    let mut everything = worker.subscribe("runs.>").await.expect("sub");
    let mut inboxes = worker.subscribe("_INBOX_vm0_gateway.>").await.expect("sub");
    worker.flush().await.expect("flush");
    let mut refused = Vec::new();
    while refused.len() < 3 {
        let e = tokio::time::timeout(Duration::from_secs(5), errors.recv())
            .await
            .expect("the server answers each subscription")
            .expect("event");
        if e.contains("Permissions Violation") {
            refused.push(e);
        }
    }
    // Another worker publishes the victim run's output: the gateway hears it, the
    // stolen credential does not.
    let mut seen = gateway
        .client()
        .subscribe("runs.run_victim.>")
        .await
        .expect("sub");
    gateway.client().flush().await.expect("flush");
    let (owner, _) = client(&nats.options(Role::Worker))
        .await
        .expect("owner connects");
    owner
        .publish("runs.run_victim.output", "secret output".into())
        .await
        .expect("publish");
    owner.flush().await.expect("flush");
    let heard = tokio::time::timeout(Duration::from_secs(2), seen.next()).await;
    assert!(matches!(heard, Ok(Some(_))), "the gateway hears the output");
    for sub in [&mut output, &mut everything, &mut inboxes] {
        let got = tokio::time::timeout(Duration::from_millis(300), sub.next()).await;
        assert!(!matches!(got, Ok(Some(_))), "the worker read {got:?}");
    }

    // What the worker may not publish never arrives.
    for subject in ["runs.run_victim.status", "auth.tokens.revoked", "jobs.run"] {
        worker
            .publish(subject, "forged".into())
            .await
            .expect("send");
        worker.flush().await.expect("flush");
        let e = tokio::time::timeout(Duration::from_secs(5), errors.recv())
            .await
            .expect("refused")
            .expect("event");
        assert!(
            e.contains("Permissions Violation") && e.contains(subject),
            "{e}"
        );
    }
    let forged = tokio::time::timeout(Duration::from_millis(300), seen.next()).await;
    assert!(
        !matches!(forged, Ok(Some(_))),
        "a forged status arrived: {forged:?}"
    );

    // What a worker must do still works: pull the job consumer, publish output.
    let bus = Bus::connect(&nats.options(Role::Worker), Role::Worker, "w")
        .await
        .expect("worker bus");
    bus.jobs_consumer()
        .await
        .expect("the worker sees the jobs consumer");
    let msg = vm0_bus::Telemetry::Log {
        key: "1:l1".into(),
        ts: 1,
        log_type: vm0_api_types::runs::LogType::System,
        level: vm0_api_types::runs::LogLevel::Info,
        message: "hello".into(),
        metadata: serde_json::Value::Null,
    };
    bus.publish_telemetry("run_victim", &msg)
        .await
        .expect("JetStream stores the worker's telemetry and acks it to its inbox");
}

#[tokio::test]
async fn with_tls_a_plaintext_client_is_refused() {
    let dir = tempfile::tempdir().expect("dir");
    let ca = vm0_tls::Authority::new("vm0 test CA").expect("ca");
    let cert = ca
        .server(&["127.0.0.1".into(), "localhost".into()])
        .expect("cert");
    vm0_tls::write_set(dir.path(), &ca, "nats", &cert).expect("files");
    let tls = ServerTls {
        cert_file: dir.path().join("nats.pem"),
        key_file: dir.path().join("nats.key"),
        ca_file: dir.path().join("ca.pem"),
    };
    let nats = NatsServer::start_with(free_port(), &dir.path().join("nats"), None, Some(tls))
        .await
        .expect("nats-server with TLS starts");
    let secure = nats.options(Role::Gateway);
    assert!(secure.url.starts_with("tls://"));
    let bus = Bus::connect(&secure, Role::Gateway, "gw")
        .await
        .expect("TLS connects");
    bus.ensure_streams(vm0_bus::TELEMETRY_MAX_BYTES)
        .await
        .expect("JetStream over TLS");

    let mut plain = secure.clone();
    plain.ca = None;
    plain.url = plain.url.replace("tls://", "nats://");
    let refused = tokio::time::timeout(Duration::from_secs(10), client(&plain)).await;
    assert!(!matches!(refused, Ok(Ok(_))), "a client without TLS got in");
    // A CA the server's certificate does not chain to is refused too.
    let other = vm0_tls::Authority::new("someone else").expect("ca");
    std::fs::write(dir.path().join("other.pem"), other.cert_pem()).expect("write");
    let mut wrong_ca = secure.clone();
    wrong_ca.ca = Some(dir.path().join("other.pem"));
    let refused = tokio::time::timeout(Duration::from_secs(10), client(&wrong_ca)).await;
    assert!(
        !matches!(refused, Ok(Ok(_))),
        "a server signed by another CA was trusted"
    );
}
