//! `vm0-guest-agent`: runs inside a sandbox and executes the agent's command for the
//! host, over one byte stream carrying length-prefixed protobuf frames
//! (`proto/vm0/guest/v1/guest.proto`).
//!
//! `vm0-guest-agent --stdio [--work DIR]` speaks on stdin/stdout (bubblewrap, which
//! names its `/work`);
//! `vm0-guest-agent --device PATH` on a character device such as a virtio-serial
//! port (`/dev/vport0p1`). As PID 1 of a microVM it sets the machine up (`init`),
//! then serves the host on the virtio-serial port (QEMU) or the vsock port
//! (Cloud Hypervisor) the kernel command line names, and powers off.

mod agent;
mod files;
mod init;
mod run_user;
mod sample;

use agent::BootTimes;
use init::{Booted, Channel};

use std::process::ExitCode;

fn usage() -> ExitCode {
    eprintln!("usage: vm0-guest-agent --stdio [--work DIR] | --device PATH");
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // As a VM's init: set the machine up, serve the host, power off.
    if std::process::id() == 1 {
        let booted = init::boot();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build();
        if let Ok(runtime) = runtime {
            let served = runtime.block_on(async {
                let reaper = tokio::spawn(async {
                    loop {
                        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                        init::reap_orphans(agent::main_child());
                    }
                });
                let result = serve_host(booted).await;
                reaper.abort();
                result
            });
            if let Err(e) = served {
                eprintln!("vm0-guest-agent: {e}");
            }
        }
        init::power_off();
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("vm0-guest-agent: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["--stdio"] => runtime.block_on(agent::serve(
            tokio::io::stdin(),
            tokio::io::stdout(),
            BootTimes::default(),
        )),
        // bubblewrap: DIR is the sandbox's /work, made by bwrap as root.
        ["--stdio", "--work", dir] => {
            if let Err(e) = run_user::give_to_run_user(std::path::Path::new(dir)) {
                eprintln!("vm0-guest-agent: giving {dir} to the run user: {e}");
            }
            runtime.block_on(agent::serve(
                tokio::io::stdin(),
                tokio::io::stdout(),
                BootTimes::default(),
            ))
        }
        ["--device", path] => runtime.block_on(serve_device(path.as_ref(), BootTimes::default())),
        _ => return usage(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vm0-guest-agent: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve_device(path: &std::path::Path, boot: BootTimes) -> std::io::Result<()> {
    let device = tokio::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .await?;
    let reader = device.try_clone().await?;
    agent::serve(reader, device, boot).await
}

/// Serves the host on the channel the kernel command line named. Over vsock the
/// host connects to us (Cloud Hypervisor's hybrid vsock); one session per boot.
async fn serve_host(booted: Booted) -> std::io::Result<()> {
    match booted.channel {
        Channel::Serial(path) => serve_device(&path, booted.times).await,
        Channel::Vsock(port) => {
            let addr = tokio_vsock::VsockAddr::new(tokio_vsock::VMADDR_CID_ANY, port);
            let listener = tokio_vsock::VsockListener::bind(addr)?;
            let (stream, _) = listener.accept().await?;
            let (reader, writer) = tokio::io::split(stream);
            agent::serve(reader, writer, booted.times).await
        }
    }
}
