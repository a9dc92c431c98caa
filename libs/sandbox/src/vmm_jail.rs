//! A VMM's jail, as Firecracker's jailer makes one for Firecracker: the process
//! that runs a guest (QEMU, Cloud Hypervisor) is the one a guest escape would
//! own, so it gets nothing it does not need.
//!
//! - **A uid of its own**: under a root worker, the slot's host uid and gid (no
//!   supplementary groups but the owner group of `/dev/kvm` when KVM is used, no
//!   capabilities, `no_new_privs`), dropped by `setpriv` before the VMM starts: it
//!   never runs as root. Under an unprivileged worker it is the worker's user.
//! - **A mount namespace holding only what the VM needs**, made by bubblewrap:
//!   the host's `/usr` (its libraries) read-only, the image's kernel, initramfs
//!   and root filesystem read-only under `/vm`, a minimal `/dev` (plus `/dev/kvm`),
//!   and one writable directory, `/jail`, for its sockets. No `/etc`, `/home`,
//!   `/var` or data dir; no network namespace but its own, empty one; its own
//!   pid, ipc and uts namespaces; an empty environment.
//! - **Tied to the worker**: bubblewrap's pid 1 dies with it (parent-death
//!   signal), and the kernel kills everything in the pid namespace then, also
//!   the VMM, whose own uid change cleared its parent-death signal.
//!
//! The VMM's own seccomp filter (QEMU's `-sandbox on`, Cloud Hypervisor's
//! default) and its cgroup (see `microvm`) come on top.

use std::path::{Path, PathBuf};

use tokio::process::Command;

use crate::image::GuestImage;
use crate::microvm::VmFiles;
use crate::slot_user::SlotUser;

/// Where the VMM sees its one writable directory.
const JAIL_DIR: &str = "/jail";
/// Where the VMM sees the image's files.
const IMAGE_DIR: &str = "/vm";

/// `VM0_VMM_JAIL`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum JailSetting {
    /// Every VMM in a jail; a worker that cannot make one does not start.
    #[default]
    On,
    /// VMMs run as the worker's user, unjailed (the worker says so at start and
    /// in every run's log).
    Off,
}

impl std::str::FromStr for JailSetting {
    type Err = String;

    fn from_str(s: &str) -> Result<JailSetting, String> {
        match s {
            "on" => Ok(JailSetting::On),
            "off" => Ok(JailSetting::Off),
            other => Err(format!("unknown jail setting {other:?} (one of: on, off)")),
        }
    }
}

/// What jails are made with here.
#[derive(Debug, Clone)]
pub struct VmmJail {
    bwrap: PathBuf,
    /// `setpriv`, to give up root (only a root worker needs it).
    setpriv: Option<PathBuf>,
}

impl VmmJail {
    /// Finds bubblewrap (and, under a root worker, `setpriv`), and checks that
    /// bubblewrap can make namespaces here.
    pub fn detect() -> Result<VmmJail, String> {
        let bwrap = crate::find_on_path("bwrap")
            .ok_or("bwrap is not on PATH (apt-get install bubblewrap); it jails the VMM")?;
        let root = nix::unistd::geteuid().is_root();
        let setpriv =
            if root {
                Some(crate::find_on_path("setpriv").ok_or(
                    "setpriv is not on PATH (Debian's util-linux); it drops the VMM's root",
                )?)
            } else {
                None
            };
        let out = std::process::Command::new(&bwrap)
            .env_clear()
            .args([
                "--unshare-pid",
                "--unshare-net",
                "--ro-bind",
                "/",
                "/",
                "true",
            ])
            .output()
            .map_err(|e| format!("running bwrap failed: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "bwrap cannot make namespaces here: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(VmmJail { bwrap, setpriv })
    }
}

/// How one VMM process starts: its command (jailed or not) and the paths its
/// arguments must name.
pub struct VmmLaunch {
    pub cmd: Command,
    pub paths: VmPaths,
}

/// A VM's files as its VMM sees them (inside the jail, or the host's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmPaths {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub rootfs: Option<PathBuf>,
    pub guest_socket: PathBuf,
    pub api_socket: PathBuf,
}

impl VmPaths {
    /// The host's own paths (an unjailed VMM).
    pub fn unjailed(image: &GuestImage, files: &VmFiles) -> VmPaths {
        VmPaths {
            kernel: image.kernel.clone(),
            initrd: image.initrd.clone(),
            rootfs: image.rootfs.clone(),
            guest_socket: files.guest_socket.clone(),
            api_socket: files.api_socket.clone(),
        }
    }
}

/// What a jail needs to know about one VM.
pub struct JailRequest<'a> {
    pub image: &'a GuestImage,
    pub files: &'a VmFiles,
    pub user: Option<SlotUser>,
    /// `/dev/kvm` is needed (KVM acceleration).
    pub kvm: bool,
}

fn in_jail(file: &Path) -> PathBuf {
    Path::new(JAIL_DIR).join(file.file_name().unwrap_or_default())
}

/// The group that may open `/dev/kvm`, when group access is what allows it.
fn kvm_group() -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata("/dev/kvm").ok()?;
    (meta.mode() & 0o060 == 0o060).then(|| meta.gid())
}

impl VmmLaunch {
    /// `program` for the VM of `req`, jailed when `jail` is given.
    pub fn new(
        jail: Option<&VmmJail>,
        program: &Path,
        req: &JailRequest<'_>,
    ) -> std::io::Result<VmmLaunch> {
        let image = req.image;
        let files = req.files;
        std::fs::create_dir_all(&files.jail_dir)?;
        let Some(jail) = jail else {
            // No jail to tie it to the worker: the VMM gets the signal itself.
            let mut cmd = crate::spawn::command(program);
            crate::spawn::die_with_parent(&mut cmd);
            return Ok(VmmLaunch {
                cmd,
                paths: VmPaths::unjailed(image, files),
            });
        };
        // The jail's one writable place belongs to the VMM's user, and only to it.
        {
            use std::os::unix::fs::PermissionsExt;
            if let Some(user) = req.user {
                std::os::unix::fs::chown(&files.jail_dir, Some(user.uid), Some(user.gid))?;
            }
            std::fs::set_permissions(&files.jail_dir, std::fs::Permissions::from_mode(0o700))?;
        }
        let mut cmd = crate::spawn::command(&jail.bwrap);
        // bwrap sets its own parent-death signal only once its namespaces are made;
        // a VMM is rare enough to afford the fork that closes that window.
        crate::spawn::die_with_parent(&mut cmd);
        cmd.args([
            "--die-with-parent",
            "--new-session",
            "--unshare-pid",
            "--unshare-net",
            "--unshare-ipc",
            "--unshare-uts",
            "--unshare-cgroup-try",
        ]);
        crate::bubblewrap::bind_host_system(&mut cmd);
        cmd.args(["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp"]);
        if req.kvm {
            cmd.args(["--dev-bind", "/dev/kvm", "/dev/kvm"]);
        }
        // bwrap would make /vm root's own (0700): the VMM's user must traverse it.
        cmd.args(["--perms", "0755", "--dir", IMAGE_DIR]);
        let at = |name: &str| Path::new(IMAGE_DIR).join(name);
        cmd.arg("--ro-bind").arg(&image.kernel).arg(at("kernel"));
        cmd.arg("--ro-bind").arg(&image.initrd).arg(at("initrd"));
        if let Some(rootfs) = &image.rootfs {
            cmd.arg("--ro-bind").arg(rootfs).arg(at("rootfs"));
        }
        cmd.arg("--bind").arg(&files.jail_dir).arg(JAIL_DIR);
        cmd.args(["--chdir", JAIL_DIR, "--clearenv", "--"]);
        match (&jail.setpriv, req.user) {
            (Some(setpriv), Some(user)) => {
                let groups = match kvm_group().filter(|_| req.kvm) {
                    Some(gid) => vec!["--groups".to_owned(), gid.to_string()],
                    None => vec!["--clear-groups".to_owned()],
                };
                cmd.arg(setpriv)
                    .args([
                        "--reuid",
                        &user.uid.to_string(),
                        "--regid",
                        &user.gid.to_string(),
                    ])
                    .args(groups)
                    .args([
                        "--inh-caps=-all",
                        "--bounding-set=-all",
                        "--no-new-privs",
                        "--",
                    ]);
            }
            (Some(_), None) => {
                return Err(std::io::Error::other(
                    "a root worker's VMM needs the slot's uid to run as (SandboxSpec::slot_user)",
                ));
            }
            (None, _) => {}
        }
        cmd.arg(program);
        Ok(VmmLaunch {
            cmd,
            paths: VmPaths {
                kernel: at("kernel"),
                initrd: at("initrd"),
                rootfs: image.rootfs.as_ref().map(|_| at("rootfs")),
                guest_socket: in_jail(&files.guest_socket),
                api_socket: in_jail(&files.api_socket),
            },
        })
    }
}
