//! `vm0-otlp-sink`: an OTLP/gRPC trace receiver that only counts spans, the collector
//! of the tracing-overhead benchmark (`TRACES=1 load-tests/gateway-api.sh`). Prints
//! the count every second and when stopped.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Result;
use clap::Parser;
use vm0_telemetry::receiver::OtlpReceiver;

#[derive(Parser)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:4317")]
    addr: SocketAddr,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let receiver = OtlpReceiver::start(args.addr, false).await?;
    eprintln!("listening on {}", receiver.url());
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            _ = tick.tick() => println!("spans {}", receiver.span_count()),
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    println!("spans {}", receiver.span_count());
    Ok(())
}
