//! PID-1 duties inside a microVM: mount the pseudo file systems, load the kernel
//! modules the image lists, find the host channel the kernel command line names,
//! address the network card when the run has a network, reap orphans, power off.

use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::mount::{MsFlags, mount};

/// Modules to load: lines of `<group> <path>`, in load order (written by the image
/// builder). Group `base` always loads; the others when the boot needs them.
const MODULE_LIST: &str = "/etc/vm0/modules";

/// The byte stream to the host, as the kernel command line names it
/// (`vm0.transport=serial:<port name>` or `vm0.transport=vsock:<port>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Channel {
    /// A virtio-serial port (QEMU): the device node found for that name.
    Serial(PathBuf),
    /// A vsock port to listen on (Cloud Hypervisor).
    Vsock(u32),
}

/// What [`boot`] found.
pub struct Booted {
    pub channel: Channel,
    pub times: crate::agent::BootTimes,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Transport {
    Serial(String),
    Vsock(u32),
}

fn transport(cmdline: &str) -> Transport {
    let value = cmdline
        .split_whitespace()
        .find_map(|arg| arg.strip_prefix("vm0.transport="));
    match value.and_then(|v| v.split_once(':')) {
        Some(("vsock", port)) => port
            .parse()
            .map_or(Transport::Serial("vm0".into()), Transport::Vsock),
        Some(("serial", name)) => Transport::Serial(name.into()),
        _ => Transport::Serial("vm0".into()),
    }
}

fn mount_fs(source: &str, target: &str, fstype: &str) {
    mount_with(source, target, fstype, None);
}

fn mount_with(source: &str, target: &str, fstype: &str, options: Option<&str>) {
    let _ = std::fs::create_dir_all(target);
    if let Err(e) = mount(
        Some(source),
        target,
        Some(fstype),
        MsFlags::empty(),
        options,
    ) {
        eprintln!("vm0-guest-agent: mounting {target}: {e}");
    }
}

/// `vm0.work_mb=N`: the size of the run's `/work` (the agent config's disk).
fn work_mb(cmdline: &str) -> Option<u64> {
    cmdline
        .split_whitespace()
        .find_map(|arg| arg.strip_prefix("vm0.work_mb="))?
        .parse()
        .ok()
        .filter(|mb| *mb > 0)
}

/// The session's state directory, as the worker names it (`VM0_STATE_DIR`).
const STATE_DIR: &str = "/state";

/// Guest memory that `/work` and `/tmp` may never take: the kernel's and the
/// agent's.
const RESERVED_MB: u64 = 96;

/// The sizes of `/work` and `/tmp` for a disk of `disk_mb` in `memory_mb` of
/// guest memory: `/work` is `disk_mb` (what the agent config asks), `/tmp` as
/// much but no more than the memory less [`RESERVED_MB`] leaves beside `/work`
/// (16 MB at least).
fn tmpfs_sizes(disk_mb: u64, memory_mb: u64) -> (u64, u64) {
    let room = memory_mb.saturating_sub(RESERVED_MB);
    let tmp = disk_mb.min(room.saturating_sub(disk_mb)).max(16);
    (disk_mb, tmp)
}

/// The guest's memory in MB (`MemTotal`).
fn memory_mb() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb / 1024)
}

fn load_modules(groups: &[&str]) {
    let Ok(list) = std::fs::read_to_string(MODULE_LIST) else {
        return;
    };
    let wanted = list
        .lines()
        .filter_map(|l| l.trim().split_once(' '))
        .filter(|(group, _)| groups.contains(group));
    for (_, path) in wanted {
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

fn uptime_ms() -> u64 {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|u| u.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0, |secs| (secs * 1000.0) as u64)
}

/// Prepares the VM and finds the host channel.
pub fn boot() -> Booted {
    mount_fs("proc", "/proc", "proc");
    let kernel_boot_ms = uptime_ms();
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    mount_system("");
    let channel = match transport(&cmdline) {
        Transport::Vsock(port) => {
            load_modules(&["base", "vsock"]);
            Channel::Vsock(port)
        }
        Transport::Serial(name) => {
            load_modules(&["base", "serial"]);
            Channel::Serial(wait_for_port(&name))
        }
    };
    // Before the root filesystem: the addressing is the kernel's, and the
    // initramfs's busybox does it.
    let network = net_config(&cmdline);
    if let Some(net) = &network
        && let Err(e) = net.configure()
    {
        eprintln!("vm0-guest-agent: {e}");
        let _ = SETUP_ERROR.set(e);
    }
    // The serial port was found first: its node is in the rootfs's /dev too.
    let mut read_only_root = false;
    if let Some(device) = rootfs_device(&cmdline) {
        match enter_rootfs(&device) {
            Ok(()) => read_only_root = true,
            Err(e) => {
                eprintln!("vm0-guest-agent: {e}");
                let _ = SETUP_ERROR.set(e);
            }
        }
    }
    if let Some(net) = &network
        && let Err(e) = net.name_resolver()
    {
        // Lookups fail then; addresses still work.
        eprintln!("vm0-guest-agent: {e}");
    }
    // The run's disk, and /tmp: tmpfs backed by guest memory. /work is the size
    // asked for; /tmp as large, but only as far as the guest's memory leaves room
    // beside /work for the kernel and this agent (a guest whose memory is all
    // tmpfs panics).
    if let Some(mb) = work_mb(&cmdline) {
        let (work, tmp) = tmpfs_sizes(mb, memory_mb());
        mount_with("tmpfs", "/work", "tmpfs", Some(&format!("size={work}m")));
        mount_with(
            "tmpfs",
            "/tmp",
            "tmpfs",
            Some(&format!("size={tmp}m,mode=1777")),
        );
        // The session's state directory cannot be made in a read-only root:
        // a tmpfs as large as /tmp (the image builder made its mount point).
        if read_only_root {
            mount_with("tmpfs", STATE_DIR, "tmpfs", Some(&format!("size={tmp}m")));
        }
    }
    if let Err(e) = crate::run_user::give_to_run_user(Path::new("/work")) {
        eprintln!("vm0-guest-agent: chown /work: {e}");
    }
    expose_self();
    Booted {
        channel,
        times: crate::agent::BootTimes {
            kernel_boot_ms,
            init_ms: uptime_ms().saturating_sub(kernel_boot_ms),
        },
    }
}

/// The agent at `/run/vm0-guest-agent`, where bubblewrap puts it too, so that a
/// command can run `vm0-guest-agent probe` in every backend (also from inside a
/// root filesystem, where `/init` is not visible).
fn expose_self() {
    let at = "/run/vm0-guest-agent";
    let made = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(at);
    if let Err(e) = made.and_then(|_| {
        mount(
            Some("/proc/self/exe"),
            at,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(std::io::Error::from)
    }) {
        eprintln!("vm0-guest-agent: binding itself to {at}: {e}");
    }
}

/// Why the machine is not what the host asked for (the root filesystem did not
/// mount): the command is refused with this rather than run elsewhere.
pub static SETUP_ERROR: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// The pseudo file systems, under `root` ("" for `/`).
fn mount_system(root: &str) {
    if !root.is_empty() {
        mount_fs("proc", &format!("{root}/proc"), "proc");
    }
    mount_fs("sysfs", &format!("{root}/sys"), "sysfs");
    mount_fs("devtmpfs", &format!("{root}/dev"), "devtmpfs");
    mount_fs("tmpfs", &format!("{root}/tmp"), "tmpfs");
    mount_fs("tmpfs", &format!("{root}/run"), "tmpfs");
}

/// `vm0.net=<address>/<prefix>,<gateway>`: the run's network card, as the host
/// set up its side of it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct NetConfig {
    address: std::net::Ipv4Addr,
    prefix: u8,
    gateway: std::net::Ipv4Addr,
}

fn net_config(cmdline: &str) -> Option<NetConfig> {
    let value = cmdline
        .split_whitespace()
        .find_map(|arg| arg.strip_prefix("vm0.net="))?;
    let (cidr, gateway) = value.split_once(',')?;
    let (address, prefix) = cidr.split_once('/')?;
    Some(NetConfig {
        address: address.parse().ok()?,
        prefix: prefix.parse().ok().filter(|p| *p <= 32)?,
        gateway: gateway.parse().ok()?,
    })
}

/// The card's name: the only one the VM has.
const NET_DEVICE: &str = "eth0";

impl NetConfig {
    /// Loads the card's driver and addresses it, with the default route
    /// through the gateway.
    fn configure(&self) -> Result<(), String> {
        load_modules(&["net"]);
        let dev = Path::new("/sys/class/net").join(NET_DEVICE);
        for _ in 0..500 {
            if dev.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        if !dev.exists() {
            return Err(format!("the network card {NET_DEVICE} never appeared"));
        }
        let address = format!("{}/{}", self.address, self.prefix);
        let gateway = self.gateway.to_string();
        for args in [
            vec!["link", "set", "lo", "up"],
            vec!["addr", "add", &address, "dev", NET_DEVICE],
            vec!["link", "set", NET_DEVICE, "up"],
            vec!["route", "add", "default", "via", &gateway],
        ] {
            let out = std::process::Command::new("/bin/busybox")
                .arg("ip")
                .args(&args)
                .output()
                .map_err(|e| format!("busybox ip: {e}"))?;
            if !out.status.success() {
                return Err(format!(
                    "ip {}: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
        }
        Ok(())
    }

    /// `/etc/resolv.conf` names the gateway (where every lookup is answered by
    /// the host's resolver). In a read-only root filesystem, a file in `/run`
    /// is bound over the image's own.
    fn name_resolver(&self) -> Result<(), String> {
        let conf = format!("nameserver {}\n", self.gateway);
        if std::fs::write("/etc/resolv.conf", &conf).is_ok() {
            return Ok(());
        }
        let ours = "/run/vm0-resolv.conf";
        std::fs::write(ours, &conf).map_err(|e| format!("writing {ours}: {e}"))?;
        mount(
            Some(ours),
            "/etc/resolv.conf",
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|e| format!("binding {ours} over /etc/resolv.conf: {e}"))
    }
}

/// `vm0.rootfs=/dev/vda`: a root filesystem to run the command in.
fn rootfs_device(cmdline: &str) -> Option<String> {
    cmdline
        .split_whitespace()
        .find_map(|arg| arg.strip_prefix("vm0.rootfs="))
        .filter(|d| d.starts_with("/dev/"))
        .map(str::to_owned)
}

/// Mounts the root filesystem read-only at `/rootfs`, the pseudo file systems in
/// it, and makes it this process's root (the command inherits it).
fn enter_rootfs(device: &str) -> Result<(), String> {
    load_modules(&["disk"]);
    for _ in 0..500 {
        if Path::new(device).exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = std::fs::create_dir_all("/rootfs");
    mount(
        Some(device),
        "/rootfs",
        Some("ext4"),
        MsFlags::MS_RDONLY,
        None::<&str>,
    )
    .map_err(|e| format!("mounting the root filesystem {device}: {e}"))?;
    mount_system("/rootfs");
    std::os::unix::fs::chroot("/rootfs").map_err(|e| format!("chroot /rootfs: {e}"))?;
    std::env::set_current_dir("/").map_err(|e| format!("chdir / in the rootfs: {e}"))
}

/// udev is absent: the named port appears as /dev/vportNpM; find ours by name.
fn wait_for_port(name: &str) -> PathBuf {
    for _ in 0..500 {
        if let Some(port) = find_port(name) {
            return port;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Path::new("/dev/virtio-ports").join(name)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_names_the_transport() {
        assert_eq!(
            transport("console=ttyS0 vm0.transport=vsock:1024 quiet"),
            Transport::Vsock(1024)
        );
        assert_eq!(
            transport("vm0.transport=serial:ctl"),
            Transport::Serial("ctl".into())
        );
        assert_eq!(work_mb("quiet vm0.work_mb=512"), Some(512));
        assert_eq!(
            rootfs_device("vm0.rootfs=/dev/vda quiet"),
            Some("/dev/vda".into())
        );
        assert_eq!(rootfs_device("vm0.rootfs=vda"), None);
        assert_eq!(
            net_config("quiet vm0.net=169.254.100.2/30,169.254.100.1"),
            Some(NetConfig {
                address: "169.254.100.2".parse().unwrap(),
                prefix: 30,
                gateway: "169.254.100.1".parse().unwrap(),
            })
        );
        assert_eq!(net_config("vm0.net=169.254.100.2/33,169.254.100.1"), None);
        assert_eq!(net_config("vm0.net=169.254.100.2,169.254.100.1"), None);
        assert_eq!(net_config("quiet"), None);
        assert_eq!(work_mb("vm0.work_mb=0"), None);
        assert_eq!(work_mb("vm0.work_mb=x"), None);
        // /work and /tmp of the disk's size each, leaving the kernel its share.
        assert_eq!(tmpfs_sizes(64, 240), (64, 64));
        assert_eq!(tmpfs_sizes(100, 240), (100, 44));
        assert_eq!(tmpfs_sizes(1024, 240), (1024, 16));
        // Absent or malformed: the QEMU default.
        assert_eq!(transport("quiet"), Transport::Serial("vm0".into()));
        assert_eq!(
            transport("vm0.transport=vsock:x"),
            Transport::Serial("vm0".into())
        );
    }
}
