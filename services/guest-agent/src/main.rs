//! `vm0-guest-agent`: runs inside a sandbox and executes the agent's command for the
//! host, over one byte stream carrying length-prefixed protobuf frames
//! (`proto/vm0/guest/v1/guest.proto`).
//!
//! `vm0-guest-agent --stdio [--work DIR] [--run-as UID:GID]` speaks on stdin/stdout
//! (bubblewrap, which names its `/work` and the host uid of the run's slot);
//! `vm0-guest-agent --device PATH` on a character device such as a virtio-serial
//! port (`/dev/vport0p1`). As PID 1 of a microVM it sets the machine up (`init`),
//! then serves the host on the virtio-serial port (QEMU) or the vsock port
//! (Cloud Hypervisor) the kernel command line names, and powers off.
//! `vm0-guest-agent probe` reports, from inside a sandbox, what the jail refuses.

mod agent;
mod files;
mod init;
mod probe;
mod run_user;
mod sample;
mod trees;

use agent::BootTimes;
use init::{Booted, Channel};

use std::process::ExitCode;

fn usage() -> ExitCode {
    eprintln!(
        "usage: vm0-guest-agent --stdio [--work DIR] [--run-as UID:GID] | --device PATH | probe [--connect HOST:PORT]..."
    );
    ExitCode::from(2)
}

/// What `--stdio` was told.
#[derive(Default)]
struct StdioArgs<'a> {
    work: Option<&'a str>,
    run_as: Option<(u32, u32)>,
}

fn stdio_args<'a>(args: &[&'a str]) -> Option<StdioArgs<'a>> {
    let mut parsed = StdioArgs::default();
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        match (*arg, rest.next()) {
            ("--work", Some(dir)) => parsed.work = Some(dir),
            ("--run-as", Some(ids)) => parsed.run_as = Some(run_user::parse(ids)?),
            _ => return None,
        }
    }
    Some(parsed)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
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
    // Before any thread exists: the probe forks.
    if let ["probe", rest @ ..] = args.as_slice() {
        return probe::run(rest);
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
    let result = match args.as_slice() {
        ["--stdio", rest @ ..] => {
            let Some(stdio) = stdio_args(rest) else {
                return usage();
            };
            // The command (same uid under an unprivileged worker) may not read this
            // process's memory or /proc entries.
            let _ = nix::sys::prctl::set_dumpable(false);
            if let Some((uid, gid)) = stdio.run_as {
                run_user::set(uid, gid);
            }
            // bubblewrap: DIR is the sandbox's /work, made by bwrap as root.
            if let Some(dir) = stdio.work
                && let Err(e) = run_user::give_to_run_user(std::path::Path::new(dir))
            {
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
