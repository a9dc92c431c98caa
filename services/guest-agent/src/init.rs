//! PID-1 duties inside a microVM: mount the pseudo file systems, load the kernel
//! modules the image lists, find the host channel, reap orphans, power off.

use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::mount::{MsFlags, mount};

/// Modules to load, one path per line, in order (written by the image builder).
const MODULE_LIST: &str = "/etc/vm0/modules";
/// The virtio-serial port the host named `vm0`.
const SERIAL_PORT: &str = "/dev/virtio-ports/vm0";

fn mount_fs(source: &str, target: &str, fstype: &str) {
    let _ = std::fs::create_dir_all(target);
    if let Err(e) = mount(
        Some(source),
        target,
        Some(fstype),
        MsFlags::empty(),
        None::<&str>,
    ) {
        eprintln!("vm0-guest-agent: mounting {target}: {e}");
    }
}

fn load_modules() {
    let Ok(list) = std::fs::read_to_string(MODULE_LIST) else {
        return;
    };
    for path in list.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let Ok(image) = std::fs::read(path) else {
            eprintln!("vm0-guest-agent: module {path} missing");
            continue;
        };
        let Ok(params) = CString::new("") else {
            continue;
        };
        match nix::kmod::init_module(&image, &params) {
            Ok(()) | Err(nix::errno::Errno::EEXIST) => {}
            Err(e) => eprintln!("vm0-guest-agent: loading {path}: {e}"),
        }
    }
}

/// Prepares the VM and returns the path of the host channel.
pub fn boot() -> PathBuf {
    mount_fs("proc", "/proc", "proc");
    mount_fs("sysfs", "/sys", "sysfs");
    mount_fs("devtmpfs", "/dev", "devtmpfs");
    mount_fs("tmpfs", "/tmp", "tmpfs");
    mount_fs("tmpfs", "/run", "tmpfs");
    load_modules();
    // udev is absent: the named port appears as /dev/vportNpM; find ours by name.
    for _ in 0..500 {
        if let Some(port) = find_port("vm0") {
            return port;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    PathBuf::from(SERIAL_PORT)
}

fn find_port(name: &str) -> Option<PathBuf> {
    let ports = std::fs::read_dir("/sys/class/virtio-ports").ok()?;
    for port in ports.flatten() {
        let n = std::fs::read_to_string(port.path().join("name")).unwrap_or_default();
        if n.trim() == name {
            let dev = Path::new("/dev").join(port.file_name());
            if dev.exists() {
                return Some(dev);
            }
        }
    }
    None
}

/// Reaps orphans re-parented to PID 1, leaving `keep` (tokio waits for it).
pub fn reap_orphans(keep: Option<u32>) {
    use nix::sys::wait::{Id, WaitPidFlag, WaitStatus, waitid, waitpid};
    loop {
        let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT;
        let pid = match waitid(Id::All, flags) {
            Ok(WaitStatus::StillAlive) | Err(_) => return,
            Ok(status) => match status.pid() {
                Some(pid) => pid,
                None => return,
            },
        };
        if Some(pid.as_raw() as u32) == keep {
            return;
        }
        let _ = waitpid(pid, Some(WaitPidFlag::WNOHANG));
    }
}

/// Flushes and powers the VM off.
pub fn power_off() -> ! {
    nix::unistd::sync();
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
    // reboot(2) does not return on success.
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}
