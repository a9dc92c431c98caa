//! Everything that crosses NATS: the connection, the two JetStream streams, their
//! consumers, subject names and message encodings. Services use this crate and
//! never spell a subject or a stream name themselves.
//!
//! - `RUN_JOBS` (work queue, subject `jobs.run`): protobuf [`RunJob`]s from gateways
//!   to workers, `Nats-Msg-Id` = run id so a duplicate publish is dropped.
//! - `RUN_TELEMETRY` (limits retention, subjects `runs.*.{output,logs,metrics,status}`):
//!   JSON [`Telemetry`] from workers and the control plane; the gateways' persister
//!   stores it, SSE handlers follow it live.
//! - `runs.<id>.cancel` (core NATS, not stored): cancel requests to the owning worker.
//!
//! Every connection is a role's user ([`auth`]): the gateway's or the workers'.

/// Roles, their subject permissions, the server's `authorization` block.
pub mod auth;
/// A local nats-server process (`vm0 dev`, tests, benchmarks).
pub mod server;
/// Subject names.
pub mod subjects;
/// The telemetry messages (JSON).
pub mod telemetry;

use std::path::PathBuf;
use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use prost::Message;
pub use vm0_proto::worker::RunJob;

pub use auth::{Credentials, Role};
pub use telemetry::Telemetry;

pub const JOBS_STREAM: &str = "RUN_JOBS";
pub const TELEMETRY_STREAM: &str = "RUN_TELEMETRY";
/// `RUN_TELEMETRY`'s size unless told otherwise: how far the persisters may
/// fall behind.
pub const TELEMETRY_MAX_BYTES: i64 = 1 << 30;
/// Telemetry the persister could not store, set aside for an operator
/// (`deadletter.<original subject>`).
pub const DEAD_LETTER_STREAM: &str = "RUN_DEADLETTER";
/// The durable consumer all workers pull jobs from.
pub const WORKERS_CONSUMER: &str = "workers";
/// The durable consumer all gateways' persisters pull telemetry from.
pub const PERSISTER_CONSUMER: &str = "persister";

/// How long a pulled job stays invisible to other workers without an ack or a
/// progress ack; workers send progress acks while a run lives.
pub const JOB_ACK_WAIT: Duration = Duration::from_secs(30);
/// How long telemetry a persister pulled stays its own without an ack: when a
/// gateway dies mid-batch, its messages reach another persister this much later
/// (event streams wait longer than this for a missing event: `VM0_SSE_GAP_WAIT_MS`).
pub const PERSIST_ACK_WAIT: Duration = Duration::from_secs(10);
/// Deliveries of a job before JetStream gives up on it (the gateway's sweeper
/// republishes runs that stay pending).
pub const JOB_MAX_DELIVER: i64 = 5;

/// Where and how to connect.
#[derive(Debug, Clone)]
pub struct NatsOptions {
    /// `nats://host:port` (or `tls://`), several comma-separated for a cluster.
    pub url: String,
    /// The role's user and password (`VM0_NATS_USER`, `VM0_NATS_PASSWORD`).
    pub credentials: Option<Credentials>,
    /// The CA that signed the servers' certificates (`VM0_NATS_CA`): TLS is then
    /// required, and only servers it signed are trusted.
    pub ca: Option<PathBuf>,
}

impl NatsOptions {
    pub fn new(url: impl Into<String>) -> NatsOptions {
        NatsOptions {
            url: url.into(),
            credentials: None,
            ca: None,
        }
    }

    pub fn with_credentials(mut self, credentials: Credentials) -> NatsOptions {
        self.credentials = Some(credentials);
        self
    }

    pub fn with_ca(mut self, ca: impl Into<PathBuf>) -> NatsOptions {
        self.ca = Some(ca.into());
        self
    }

    /// Adds what the environment says: `VM0_NATS_USER` and `VM0_NATS_PASSWORD`
    /// (the role's user), `VM0_NATS_CA` (TLS). The gateway's and the worker's
    /// configuration read them here, and only here.
    pub fn with_env(mut self) -> Result<NatsOptions, String> {
        match (
            std::env::var("VM0_NATS_USER"),
            std::env::var("VM0_NATS_PASSWORD"),
        ) {
            (Ok(user), Ok(password)) => {
                self = self.with_credentials(Credentials { user, password });
            }
            (Err(_), Err(_)) => {}
            _ => return Err("VM0_NATS_USER and VM0_NATS_PASSWORD go together".into()),
        }
        if let Some(ca) = std::env::var_os("VM0_NATS_CA") {
            self = self.with_ca(PathBuf::from(ca));
        }
        Ok(self)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("cannot connect to NATS at {url}")]
    Connect {
        url: String,
        #[source]
        source: async_nats::ConnectError,
    },
    #[error("JetStream request failed: {0}")]
    JetStream(String),
    #[error("publish to {subject} failed: {message}")]
    Publish { subject: String, message: String },
    #[error("undecodable message on {subject}: {message}")]
    Decode { subject: String, message: String },
}

fn js_err(e: impl std::fmt::Display) -> BusError {
    BusError::JetStream(e.to_string())
}

/// A NATS connection with JetStream.
#[derive(Clone, Debug)]
pub struct Bus {
    client: async_nats::Client,
    js: jetstream::Context,
}

impl Bus {
    /// Connects as `role` (retrying in the background if the server goes away
    /// later).
    pub async fn connect(options: &NatsOptions, role: Role, name: &str) -> Result<Bus, BusError> {
        let url = options.url.as_str();
        let mut connect = async_nats::ConnectOptions::new()
            .name(name)
            .custom_inbox_prefix(role.inbox_prefix())
            .retry_on_initial_connect()
            .connection_timeout(Duration::from_secs(5));
        if let Some(c) = &options.credentials {
            connect = connect.user_and_password(c.user.clone(), c.password.clone());
        }
        if let Some(ca) = &options.ca {
            connect = connect.add_root_certificates(ca.clone()).require_tls(true);
        }
        let client = connect
            .connect(url)
            .await
            .map_err(|source| BusError::Connect {
                url: redact(url),
                source,
            })?;
        // Wait briefly for the first connection so that callers fail fast on a typo.
        for _ in 0..100 {
            if client.connection_state() == async_nats::connection::State::Connected {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let js = jetstream::new(client.clone());
        Ok(Bus { client, js })
    }

    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    pub fn is_connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    /// Creates the streams and their durable consumers if missing (idempotent;
    /// every gateway calls it at start; workers may not). `RUN_TELEMETRY` holds
    /// `telemetry_max_bytes` at most and then refuses new messages (workers send
    /// them again once the persister caught up) rather than dropping unstored ones;
    /// an existing stream is brought to that limit.
    pub async fn ensure_streams(&self, telemetry_max_bytes: i64) -> Result<(), BusError> {
        self.js
            .get_or_create_stream(stream::Config {
                name: JOBS_STREAM.into(),
                subjects: vec![subjects::JOBS.into()],
                retention: stream::RetentionPolicy::WorkQueue,
                storage: stream::StorageType::File,
                duplicate_window: Duration::from_secs(120),
                max_age: Duration::from_secs(7 * 86_400),
                ..Default::default()
            })
            .await
            .map_err(js_err)?;
        let telemetry = stream::Config {
            name: TELEMETRY_STREAM.into(),
            subjects: subjects::TELEMETRY_WILDCARDS
                .iter()
                .map(|s| s.to_string())
                .collect(),
            retention: stream::RetentionPolicy::Limits,
            storage: stream::StorageType::File,
            max_age: Duration::from_secs(7 * 86_400),
            duplicate_window: Duration::from_secs(120),
            max_bytes: telemetry_max_bytes,
            discard: stream::DiscardPolicy::New,
            ..Default::default()
        };
        let mut existing = self
            .js
            .get_or_create_stream(telemetry.clone())
            .await
            .map_err(js_err)?;
        let now = existing.info().await.map_err(js_err)?.config.clone();
        if now.max_bytes != telemetry.max_bytes || now.discard != telemetry.discard {
            let updated = stream::Config {
                max_bytes: telemetry.max_bytes,
                discard: telemetry.discard,
                ..now
            };
            self.js.update_stream(&updated).await.map_err(js_err)?;
        }
        self.js
            .get_or_create_stream(stream::Config {
                name: DEAD_LETTER_STREAM.into(),
                subjects: vec![subjects::DEAD_LETTERS.into()],
                retention: stream::RetentionPolicy::Limits,
                storage: stream::StorageType::File,
                max_age: Duration::from_secs(14 * 86_400),
                max_bytes: 1 << 30,
                ..Default::default()
            })
            .await
            .map_err(js_err)?;
        self.create_jobs_consumer().await?;
        self.persister_consumer().await?;
        Ok(())
    }

    /// Sets a telemetry message aside on the dead-letter stream, with why; the
    /// subject it went to.
    pub async fn publish_dead_letter(
        &self,
        subject: &str,
        payload: &[u8],
        why: &str,
    ) -> Result<String, BusError> {
        let dead = subjects::dead_letter(subject);
        let mut headers = async_nats::HeaderMap::new();
        let why: String = why.chars().filter(|c| !c.is_control()).take(1000).collect();
        headers.insert("Vm0-Error", why.as_str());
        let err = |e: &dyn std::fmt::Display| BusError::Publish {
            subject: dead.clone(),
            message: e.to_string(),
        };
        self.js
            .publish_with_headers(dead.clone(), headers, payload.to_vec().into())
            .await
            .map_err(|e| err(&e))?
            .await
            .map_err(|e| err(&e))?;
        Ok(dead)
    }

    /// Publishes a run's first job and waits for JetStream to store it.
    /// Publishing it twice within two minutes (a retried create) stores it once.
    pub async fn publish_job(&self, job: &RunJob) -> Result<(), BusError> {
        self.publish_job_with_id(job, &job.run_id).await
    }

    /// Publishes a run's job again (the run is still pending, its first job may
    /// be lost): under a message id of its own, so JetStream's duplicate window
    /// does not drop it. A run's job stored twice is harmless: claims are fenced
    /// and a worker drops a job whose run it is already running.
    pub async fn publish_job_again(&self, job: &RunJob) -> Result<(), BusError> {
        let id = format!("{}:again:{:016x}", job.run_id, rand::random::<u64>());
        self.publish_job_with_id(job, &id).await
    }

    async fn publish_job_with_id(&self, job: &RunJob, msg_id: &str) -> Result<(), BusError> {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", msg_id);
        let err = |e: &dyn std::fmt::Display| BusError::Publish {
            subject: subjects::JOBS.into(),
            message: e.to_string(),
        };
        self.js
            .publish_with_headers(subjects::JOBS, headers, job.encode_to_vec().into())
            .await
            .map_err(|e| err(&e))?
            .await
            .map_err(|e| err(&e))?;
        Ok(())
    }

    /// The durable pull consumer workers share, which the gateways create. Each
    /// worker fetches at most as many jobs as it has free slots, which is what
    /// bounds its in-flight jobs.
    pub async fn jobs_consumer(&self) -> Result<consumer::PullConsumer, BusError> {
        self.js
            .get_consumer_from_stream(WORKERS_CONSUMER, JOBS_STREAM)
            .await
            .map_err(js_err)
    }

    async fn create_jobs_consumer(&self) -> Result<consumer::PullConsumer, BusError> {
        let stream = self.js.get_stream(JOBS_STREAM).await.map_err(js_err)?;
        stream
            .get_or_create_consumer(
                WORKERS_CONSUMER,
                consumer::pull::Config {
                    durable_name: Some(WORKERS_CONSUMER.into()),
                    ack_policy: consumer::AckPolicy::Explicit,
                    ack_wait: JOB_ACK_WAIT,
                    max_deliver: JOB_MAX_DELIVER,
                    max_ack_pending: 10_000,
                    ..Default::default()
                },
            )
            .await
            .map_err(js_err)
    }

    /// What `RUN_JOBS` and `RUN_TELEMETRY` hold, and how far their consumers
    /// (the workers, the persisters) are behind.
    pub async fn queue_depths(&self) -> Result<Vec<QueueDepth>, BusError> {
        let mut depths = Vec::new();
        for (stream, consumer) in [
            (JOBS_STREAM, WORKERS_CONSUMER),
            (TELEMETRY_STREAM, PERSISTER_CONSUMER),
        ] {
            let mut s = self.js.get_stream(stream).await.map_err(js_err)?;
            let messages = s.info().await.map_err(js_err)?.state.messages;
            let mut c: consumer::PullConsumer = s.get_consumer(consumer).await.map_err(js_err)?;
            let info = c.info().await.map_err(js_err)?;
            depths.push(QueueDepth {
                stream,
                messages,
                pending: info.num_pending,
                ack_pending: u64::try_from(info.num_ack_pending).unwrap_or(u64::MAX),
            });
        }
        Ok(depths)
    }

    /// The durable pull consumer the gateways' persisters share.
    pub async fn persister_consumer(&self) -> Result<consumer::PullConsumer, BusError> {
        let stream = self.js.get_stream(TELEMETRY_STREAM).await.map_err(js_err)?;
        let config = consumer::pull::Config {
            durable_name: Some(PERSISTER_CONSUMER.into()),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: PERSIST_ACK_WAIT,
            max_ack_pending: 20_000,
            ..Default::default()
        };
        // Created, or updated in place (ack_wait and max_ack_pending are editable):
        // a consumer made by an older gateway gets today's settings.
        match stream.create_consumer(config).await {
            Ok(consumer) => Ok(consumer),
            Err(e) => {
                tracing::warn!(error = %e, "cannot update the persister consumer; using it as it is");
                stream
                    .get_consumer(PERSISTER_CONSUMER)
                    .await
                    .map_err(js_err)
            }
        }
    }

    /// Publishes telemetry of a run to its JetStream subject and waits for the ack.
    pub async fn publish_telemetry(&self, run_id: &str, msg: &Telemetry) -> Result<(), BusError> {
        let ack = self.send_telemetry(run_id, msg, None).await?;
        ack.await.map_err(|e| BusError::Publish {
            subject: subjects::telemetry(run_id, msg.channel()),
            message: e.to_string(),
        })?;
        Ok(())
    }

    /// Sends telemetry without waiting for JetStream's ack; the returned future
    /// resolves when it is stored. Lets a busy run pipeline its publishes. With
    /// `msg_id`, a message sent again (after a lost ack) is stored once.
    pub async fn send_telemetry(
        &self,
        run_id: &str,
        msg: &Telemetry,
        msg_id: Option<&str>,
    ) -> Result<async_nats::jetstream::context::PublishAckFuture, BusError> {
        let subject = subjects::telemetry(run_id, msg.channel());
        let payload = serde_json::to_vec(msg).map_err(|e| BusError::Publish {
            subject: subject.clone(),
            message: e.to_string(),
        })?;
        let mut headers = async_nats::HeaderMap::new();
        if let Some(id) = msg_id {
            headers.insert("Nats-Msg-Id", id);
        }
        self.js
            .publish_with_headers(subject.clone(), headers, payload.into())
            .await
            .map_err(|e| BusError::Publish {
                subject,
                message: e.to_string(),
            })
    }

    /// Asks the worker running `run_id` to cancel it (fire and forget; the heartbeat
    /// answer repeats it).
    pub async fn publish_cancel(&self, run_id: &str) -> Result<(), BusError> {
        self.client
            .publish(subjects::cancel(run_id), bytes::Bytes::new())
            .await
            .map_err(|e| BusError::Publish {
                subject: subjects::cancel(run_id),
                message: e.to_string(),
            })
    }

    /// Live telemetry of one run (core subscription; replay comes from the store).
    pub async fn subscribe_run(&self, run_id: &str) -> Result<async_nats::Subscriber, BusError> {
        self.client
            .subscribe(subjects::run_all(run_id))
            .await
            .map_err(js_err)
    }

    /// Tells every gateway that `token_id` was revoked (best effort: the auth
    /// cache's time limit is the backstop when NATS is down).
    pub async fn publish_token_revoked(&self, token_id: &str) -> Result<(), BusError> {
        self.client
            .publish(subjects::TOKENS_REVOKED, token_id.to_owned().into())
            .await
            .map_err(|e| BusError::Publish {
                subject: subjects::TOKENS_REVOKED.into(),
                message: e.to_string(),
            })
    }

    /// Token revocations from every gateway (the payload is the token id).
    pub async fn subscribe_token_revocations(&self) -> Result<async_nats::Subscriber, BusError> {
        self.client
            .subscribe(subjects::TOKENS_REVOKED)
            .await
            .map_err(js_err)
    }

    /// Cancel requests for every run (a worker filters for the runs it has).
    pub async fn subscribe_cancels(&self) -> Result<async_nats::Subscriber, BusError> {
        self.client
            .subscribe(subjects::cancel("*"))
            .await
            .map_err(js_err)
    }
}

/// One stream's depth and its consumer's lag ([`Bus::queue_depths`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueDepth {
    pub stream: &'static str,
    /// Messages the stream holds.
    pub messages: u64,
    /// Messages its consumer has not been given yet.
    pub pending: u64,
    /// Messages given and not acknowledged yet.
    pub ack_pending: u64,
}

/// Hands every message of `sub` to `on`, until `stop` is cancelled or the
/// subscription ends: the loop of a task that listens to a core-NATS signal.
pub async fn each_message(
    mut sub: async_nats::Subscriber,
    stop: &tokio_util::sync::CancellationToken,
    mut on: impl FnMut(async_nats::Message),
) {
    use futures::StreamExt;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            msg = sub.next() => match msg {
                Some(msg) => on(msg),
                None => return,
            },
        }
    }
}

/// `url` without a password it may carry (`nats://user:pass@host`), for messages.
pub fn redact(url: &str) -> String {
    url.split(',')
        .map(|u| match (u.find("://"), u.rfind('@')) {
            (Some(scheme), Some(at)) if at > scheme => {
                format!("{}://***@{}", &u[..scheme], &u[at + 1..])
            }
            _ => u.to_owned(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Decodes a job pulled from `RUN_JOBS`.
pub fn decode_job(payload: &[u8]) -> Result<RunJob, BusError> {
    RunJob::decode(payload).map_err(|e| BusError::Decode {
        subject: subjects::JOBS.into(),
        message: e.to_string(),
    })
}
