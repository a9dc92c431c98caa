//! Following a run's events (`GET /v1/runs/:id/events`): output as it comes,
//! reconnecting with `Last-Event-ID` when the connection drops, until the
//! `complete` event, whose status is the process's exit code.
//!
//! Ctrl-C at a terminal asks whether to cancel the run; elsewhere (a CI job
//! being stopped, SIGINT or SIGTERM) the run is cancelled, since nobody is left
//! to want it, and following goes on until it ends.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use reqwest::{Method, StatusCode};
use vm0_api_types::runs::RunStatus;
use vm0_api_types::sse::{SseDecoder, SseEvent};

use crate::api::{Api, api_error, request_id, segment};
use crate::output::Output;

/// Exit codes of `vm0 run --follow` and `vm0 runs events`: the run's outcome.
pub mod exit {
    pub const COMPLETED: u8 = 0;
    /// The CLI itself failed: a bad argument, an API error, the API unreachable.
    pub const ERROR: u8 = 1;
    pub const FAILED: u8 = 3;
    pub const TIMEOUT: u8 = 4;
    pub const CANCELLED: u8 = 5;
    /// Stopped following (a second Ctrl-C, or "no" was not the answer asked for).
    pub const INTERRUPTED: u8 = 130;
}

pub fn exit_code(status: RunStatus) -> ExitCode {
    ExitCode::from(match status {
        RunStatus::Completed => exit::COMPLETED,
        RunStatus::Failed => exit::FAILED,
        RunStatus::Timeout => exit::TIMEOUT,
        RunStatus::Cancelled => exit::CANCELLED,
        RunStatus::Pending | RunStatus::Running => exit::ERROR,
    })
}

/// No byte for this long (heartbeats come every 15 s) and the connection is
/// taken for dead.
const IDLE: Duration = Duration::from_secs(45);
/// Reconnecting gives up after this long without a working connection.
const GIVE_UP_AFTER: Duration = Duration::from_secs(300);

/// Why one connection ended.
enum Ended {
    Complete(RunStatus),
    /// Dropped, timed out or refused for a while: try again from `last_id`.
    Lost(String),
    Interrupted,
}

pub struct Follow<'a> {
    pub api: &'a Api,
    pub run_id: String,
    pub out: Output,
    /// Resume after this event id (`evt_N`).
    pub after: Option<String>,
    /// Print status and other non-output events to stderr.
    pub verbose: bool,
}

impl Follow<'_> {
    /// Follows until the run ends; the exit code says how it ended.
    pub async fn run(mut self) -> Result<ExitCode> {
        let mut signals = Signals::new()?;
        let mut failing_since: Option<tokio::time::Instant> = None;
        let mut backoff = Duration::from_millis(250);
        loop {
            let connected = self.connect_once(&mut signals, &mut failing_since).await?;
            match connected {
                Ended::Complete(status) => return Ok(exit_code(status)),
                Ended::Interrupted => return Ok(ExitCode::from(exit::INTERRUPTED)),
                Ended::Lost(why) => {
                    let since = *failing_since.get_or_insert_with(tokio::time::Instant::now);
                    if since.elapsed() > GIVE_UP_AFTER {
                        bail!("lost the event stream of {} for good: {why}", self.run_id);
                    }
                    eprintln!(
                        "{}",
                        self.out.paint(
                            &format!(
                                "connection lost ({why}); reconnecting after {}",
                                self.after.as_deref().unwrap_or("the start")
                            ),
                            "2"
                        )
                    );
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    async fn connect_once(
        &mut self,
        signals: &mut Signals,
        failing_since: &mut Option<tokio::time::Instant>,
    ) -> Result<Ended> {
        let path = format!("/v1/runs/{}/events", segment(&self.run_id));
        let mut request = self
            .api
            .request(Method::GET, &path)
            .header("accept", "text/event-stream");
        if let Some(after) = &self.after {
            request = request.header("last-event-id", after);
        }
        let response = match request.send().await {
            Ok(r) => r,
            Err(e) => return Ok(Ended::Lost(e.to_string())),
        };
        let status = response.status();
        if !status.is_success() {
            let id = request_id(&response);
            let body = response.text().await.unwrap_or_default();
            let error = api_error(status, id.as_deref(), &body);
            // Busy or broken for a moment: again. Anything else is the answer.
            if status.is_server_error()
                || status == StatusCode::TOO_MANY_REQUESTS
                || status == StatusCode::REQUEST_TIMEOUT
            {
                return Ok(Ended::Lost(error.to_string()));
            }
            return Err(error.context(format!("following run {}", self.run_id)));
        }
        let mut body = response.bytes_stream();
        let mut decoder = SseDecoder::default();
        loop {
            tokio::select! {
                chunk = tokio::time::timeout(IDLE, body.next()) => {
                    let chunk = match chunk {
                        Err(_) => return Ok(Ended::Lost(format!("nothing for {} s", IDLE.as_secs()))),
                        Ok(None) => return Ok(Ended::Lost("the server closed the stream".into())),
                        Ok(Some(Err(e))) => return Ok(Ended::Lost(e.to_string())),
                        Ok(Some(Ok(chunk))) => chunk,
                    };
                    *failing_since = None;
                    for event in decoder.push(&chunk) {
                        if let Some(status) = self.show(&event)? {
                            return Ok(Ended::Complete(status));
                        }
                    }
                }
                signal = signals.next() => {
                    if self.on_signal(signal, signals).await? {
                        return Ok(Ended::Interrupted);
                    }
                }
            }
        }
    }

    /// Prints one event; `Some(status)` once the run is complete.
    fn show(&mut self, event: &SseEvent) -> Result<Option<RunStatus>> {
        if let Some(id) = &event.id {
            self.after = Some(id.clone());
        }
        let data: serde_json::Value = serde_json::from_str(&event.data).unwrap_or_default();
        if self.out.json {
            if event.event != "heartbeat" {
                let line = serde_json::json!({"event": event.event, "id": event.id, "data": data});
                println!("{line}");
            }
        } else {
            match event.event.as_str() {
                "output" => {
                    let content = data["content"].as_str().unwrap_or_default();
                    // Verbatim: the content carries its own line ends.
                    if data["stream"] == "stderr" {
                        eprint!("{content}");
                    } else {
                        let mut stdout = std::io::stdout().lock();
                        write!(stdout, "{content}")?;
                        stdout.flush()?;
                    }
                }
                "status" if self.verbose => {
                    let status = data["status"].as_str().unwrap_or("?");
                    eprintln!("{}", self.out.paint(&format!("[{status}]"), "2"));
                }
                "error" => {
                    let message = data["message"].as_str().unwrap_or(&event.data);
                    eprintln!("{}", self.out.paint(&format!("error: {message}"), "31"));
                }
                _ => {}
            }
        }
        if event.event == "complete" {
            let status = data["status"]
                .as_str()
                .and_then(RunStatus::parse)
                .context("a complete event without a status")?;
            if !self.out.json {
                let mut line = format!("run {} {}", self.run_id, self.out.status(status));
                if let Some(ms) = data["executionTimeMs"].as_i64() {
                    line.push_str(&format!(" in {:.1} s", ms as f64 / 1000.0));
                }
                if let Some(code) = data["exitCode"].as_i64() {
                    line.push_str(&format!(", exit code {code}"));
                }
                if let Some(error) = data["error"].as_str() {
                    line.push_str(&format!(": {error}"));
                }
                eprintln!("{line}");
            }
            return Ok(Some(status));
        }
        Ok(None)
    }

    /// `true` to stop following.
    async fn on_signal(&mut self, signal: Signal, signals: &mut Signals) -> Result<bool> {
        let interactive = signal == Signal::Interrupt
            && std::io::stdin().is_terminal()
            && std::io::stderr().is_terminal();
        if interactive {
            eprint!("\ncancel run {}? [y/N] ", self.run_id);
            let answer = tokio::task::spawn_blocking(|| {
                let mut line = String::new();
                std::io::stdin().read_line(&mut line).map(|_| line)
            });
            let answer = tokio::select! {
                answer = answer => answer.context("reading the answer")?.context("reading the answer")?,
                // Ctrl-C again: stop following, leave the run alone.
                _ = signals.next() => {
                    eprintln!("\nstopped following; the run goes on (vm0 runs events {})", self.run_id);
                    return Ok(true);
                }
            };
            if !answer.trim().eq_ignore_ascii_case("y")
                && !answer.trim().eq_ignore_ascii_case("yes")
            {
                eprintln!("still following (Ctrl-C twice stops following without cancelling)");
                return Ok(false);
            }
        }
        let path = format!("/v1/runs/{}/cancel", segment(&self.run_id));
        match self.api.send(self.api.request(Method::POST, &path)).await {
            Ok(_) => eprintln!("cancelling run {}", self.run_id),
            // Already over: its complete event is on its way.
            Err(e) if e.to_string().contains("invalid_state") => {}
            Err(e) => return Err(e.context(format!("cancelling run {}", self.run_id))),
        }
        Ok(false)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Signal {
    Interrupt,
    Terminate,
}

/// SIGINT and SIGTERM as a stream of [`Signal`]s.
struct Signals {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> Result<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            interrupt: signal(SignalKind::interrupt()).context("listening for SIGINT")?,
            terminate: signal(SignalKind::terminate()).context("listening for SIGTERM")?,
        })
    }

    async fn next(&mut self) -> Signal {
        tokio::select! {
            _ = self.interrupt.recv() => Signal::Interrupt,
            _ = self.terminate.recv() => Signal::Terminate,
        }
    }
}
