//! `vm0-guest-agent`: runs inside a sandbox and executes the agent's command for the
//! host, over one byte stream carrying length-prefixed protobuf frames
//! (`proto/vm0/guest/v1/guest.proto`).
//!
//! `vm0-guest-agent --stdio` speaks on stdin/stdout (bubblewrap);
//! `vm0-guest-agent --device PATH` on a character device such as a virtio-serial
//! port (`/dev/vport0p1`, QEMU). PID-1 duties in a VM (mounts, modules, power-off)
//! arrive with the microVM backends.

mod agent;
mod init;
mod sample;

use std::process::ExitCode;

fn usage() -> ExitCode {
    eprintln!("usage: vm0-guest-agent --stdio | --device PATH");
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // As a VM's init: set the machine up, serve the host on the serial port, power off.
    if std::process::id() == 1 {
        let port = init::boot();
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
                let device = tokio::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&port)
                    .await?;
                let reader = device.try_clone().await?;
                let result = agent::serve(reader, device).await;
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
        ["--stdio"] => runtime.block_on(agent::serve(tokio::io::stdin(), tokio::io::stdout())),
        ["--device", path] => runtime.block_on(async {
            let device = tokio::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(path)
                .await?;
            let reader = device.try_clone().await?;
            agent::serve(reader, device).await
        }),
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
