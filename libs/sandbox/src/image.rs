//! Guest images: a Debian kernel and an initramfs (cpio newc, gzip) holding the
//! static guest agent as `/init`, busybox, and the virtio modules it loads at boot.
//! Built from packages fetched with `apt-get download` (never installed on the
//! host), content-addressed and cached under the data dir.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

/// Modules the guest may load, `(group, path relative to the kernel's module dir)`,
/// in dependency order. The guest agent loads `base` always, `serial` for QEMU's
/// virtio-serial port, `vsock` for Cloud Hypervisor's vsock (a PCI device there),
/// `disk` when a root filesystem is attached, `net` when the run has a network
/// (its card is virtio-mmio, like QEMU's serial port).
const MODULES: &[(&str, &str)] = &[
    ("base", "kernel/drivers/virtio/virtio_ring.ko"),
    ("base", "kernel/drivers/virtio/virtio.ko"),
    ("serial", "kernel/drivers/virtio/virtio_mmio.ko"),
    ("serial", "kernel/drivers/char/virtio_console.ko"),
    ("vsock", "kernel/drivers/virtio/virtio_pci_legacy_dev.ko"),
    ("vsock", "kernel/drivers/virtio/virtio_pci_modern_dev.ko"),
    ("vsock", "kernel/drivers/virtio/virtio_pci.ko"),
    ("vsock", "kernel/net/vmw_vsock/vsock.ko"),
    (
        "vsock",
        "kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko",
    ),
    (
        "vsock",
        "kernel/net/vmw_vsock/vmw_vsock_virtio_transport.ko",
    ),
    ("disk", "kernel/drivers/block/virtio_blk.ko"),
    ("disk", "kernel/lib/crc16.ko"),
    ("disk", "kernel/fs/mbcache.ko"),
    ("disk", "kernel/fs/jbd2/jbd2.ko"),
    // ext4's metadata checksums ask the crypto API for crc32c; no modprobe here.
    ("disk", "kernel/crypto/crc32c_generic.ko"),
    ("disk", "kernel/fs/ext4/ext4.ko"),
    ("net", "kernel/net/core/failover.ko"),
    ("net", "kernel/drivers/net/net_failover.ko"),
    ("net", "kernel/drivers/net/virtio_net.ko"),
];

/// A bootable guest: kernel and initramfs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestImage {
    /// Hex SHA-256 over the kernel, the initramfs and the root filesystem.
    pub id: String,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// An ext4 root filesystem the command runs in (attached read-only).
    pub rootfs: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{what} failed: {detail}")]
    Command { what: String, detail: String },
    #[error("{0} not found")]
    Missing(String),
    #[error(
        "{0} is dynamically linked, and the initramfs has no libc (the guest agent: \
         scripts/guest-agent.sh builds it for musl; busybox: apt-get install busybox-static)"
    )]
    NotStatic(PathBuf),
    #[error("image file operation failed")]
    Io(#[from] std::io::Error),
}

/// What goes into an image.
#[derive(Debug, Clone)]
pub struct ImageRecipe {
    /// The static guest agent binary (becomes `/init`).
    pub guest_agent: PathBuf,
    /// A static busybox (`busybox-static` installs `/bin/busybox`).
    pub busybox: PathBuf,
    /// Debian kernel package; default: what `linux-image-amd64` depends on.
    pub kernel_package: Option<String>,
    /// Cache root (`<data dir>/images`).
    pub cache_dir: PathBuf,
    /// A directory to make into the root filesystem (`mkfs.ext4 -d`); without it
    /// the command runs in the initramfs's busybox userland.
    pub rootfs: Option<PathBuf>,
}

/// Root filesystems.
mod rootfs;

fn run(what: &str, cmd: &mut Command) -> Result<String, ImageError> {
    let out = cmd.output().map_err(|e| ImageError::Command {
        what: what.into(),
        detail: e.to_string(),
    })?;
    if !out.status.success() {
        return Err(ImageError::Command {
            what: what.into(),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The kernel package `linux-image-amd64` points at.
fn default_kernel_package() -> Result<String, ImageError> {
    let deps = run(
        "apt-cache depends linux-image-amd64",
        Command::new("apt-cache").args(["depends", "linux-image-amd64"]),
    )?;
    deps.lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|p| p.starts_with("linux-image-"))
        .map(str::to_owned)
        .ok_or_else(|| ImageError::Missing("a linux-image package (apt-get update?)".into()))
}

/// Unpacks the kernel package once: `<cache>/kernels/<package>/{boot,lib}`.
fn kernel_tree(recipe: &ImageRecipe, package: &str) -> Result<(PathBuf, PathBuf), ImageError> {
    let root = recipe.cache_dir.join("kernels").join(package);
    if !root.join("boot").exists() {
        let download = tempfile::tempdir_in(&recipe.cache_dir)?;
        run(
            &format!("apt-get download {package}"),
            Command::new("apt-get")
                .arg("download")
                .arg(package)
                .current_dir(download.path()),
        )?;
        let deb = std::fs::read_dir(download.path())?
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|e| e == "deb"))
            .ok_or_else(|| ImageError::Missing(format!("{package}.deb")))?;
        let unpack = tempfile::tempdir_in(&recipe.cache_dir)?;
        run(
            "dpkg-deb -x",
            Command::new("dpkg-deb")
                .arg("-x")
                .arg(&deb)
                .arg(unpack.path()),
        )?;
        std::fs::create_dir_all(root.parent().unwrap_or(&recipe.cache_dir))?;
        let unpacked = unpack.keep();
        // A concurrent builder may have unpacked the same package first.
        if std::fs::rename(&unpacked, &root).is_err() {
            let _ = std::fs::remove_dir_all(&unpacked);
            if !root.join("boot").exists() {
                return Err(ImageError::Missing(root.display().to_string()));
            }
        }
    }
    let vmlinuz = std::fs::read_dir(root.join("boot"))?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .ok_or_else(|| ImageError::Missing(format!("vmlinuz in {package}")))?;
    let modules = std::fs::read_dir(root.join("lib/modules"))?
        .flatten()
        .map(|e| e.path())
        .next()
        .ok_or_else(|| ImageError::Missing(format!("modules in {package}")))?;
    Ok((vmlinuz, modules))
}

/// A cpio "newc" archive writer (the initramfs format).
struct Cpio<W: Write> {
    out: W,
    ino: u32,
}

impl<W: Write> Cpio<W> {
    fn entry(
        &mut self,
        name: &str,
        mode: u32,
        data: &[u8],
        rdev: (u32, u32),
    ) -> std::io::Result<()> {
        self.ino += 1;
        let header = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.ino,
            mode,
            0,
            0,
            1,
            0,
            data.len(),
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() + 1,
            0
        );
        self.out.write_all(header.as_bytes())?;
        self.out.write_all(name.as_bytes())?;
        self.out.write_all(&[0])?;
        self.pad(110 + name.len() + 1)?;
        self.out.write_all(data)?;
        self.pad(data.len())
    }

    fn pad(&mut self, len: usize) -> std::io::Result<()> {
        let pad = (4 - len % 4) % 4;
        self.out.write_all(&[0u8; 3][..pad])
    }

    fn dir(&mut self, name: &str) -> std::io::Result<()> {
        self.entry(name, 0o040755, &[], (0, 0))
    }

    fn file(&mut self, name: &str, mode: u32, data: &[u8]) -> std::io::Result<()> {
        self.entry(name, 0o100000 | mode, data, (0, 0))
    }

    fn symlink(&mut self, name: &str, target: &str) -> std::io::Result<()> {
        self.entry(name, 0o120777, target.as_bytes(), (0, 0))
    }

    fn finish(mut self) -> std::io::Result<W> {
        self.entry("TRAILER!!!", 0, &[], (0, 0))?;
        Ok(self.out)
    }
}

/// Does this 64-bit little-endian ELF ask for a program interpreter (a dynamic
/// loader)? Anything else is left for the kernel to judge.
fn has_interpreter(elf: &[u8]) -> bool {
    const PT_INTERP: u32 = 3;
    let field = |at: usize, len: usize| -> Option<u64> {
        let bytes = elf.get(at..at + len)?;
        Some(
            bytes
                .iter()
                .rev()
                .fold(0, |acc, b| (acc << 8) | u64::from(*b)),
        )
    };
    if !elf.starts_with(b"\x7fELF\x02\x01") {
        return false;
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) =
        (field(0x20, 8), field(0x36, 2), field(0x38, 2))
    else {
        return false;
    };
    (0..phnum).any(|i| {
        let at = phoff + i * phentsize;
        usize::try_from(at)
            .ok()
            .and_then(|at| field(at, 4))
            .is_some_and(|t| t == u64::from(PT_INTERP))
    })
}

fn initramfs(recipe: &ImageRecipe, modules_dir: &Path) -> Result<Vec<u8>, ImageError> {
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut cpio = Cpio { out: gz, ino: 0 };
    for d in [
        "dev",
        "proc",
        "sys",
        "tmp",
        "run",
        "etc",
        "etc/vm0",
        "bin",
        "sbin",
        "usr",
        "usr/bin",
        "lib",
        "lib/modules",
        "work",
    ] {
        cpio.dir(d)?;
    }
    // The kernel opens /dev/console for init's stdio before devtmpfs is mounted.
    cpio.entry("dev/console", 0o020600, &[], (5, 1))?;
    let agent = std::fs::read(&recipe.guest_agent)
        .map_err(|_| ImageError::Missing(recipe.guest_agent.display().to_string()))?;
    if has_interpreter(&agent) {
        return Err(ImageError::NotStatic(recipe.guest_agent.clone()));
    }
    cpio.file("init", 0o755, &agent)?;
    let busybox = std::fs::read(&recipe.busybox)
        .map_err(|_| ImageError::Missing(recipe.busybox.display().to_string()))?;
    if has_interpreter(&busybox) {
        return Err(ImageError::NotStatic(recipe.busybox.clone()));
    }
    cpio.file("bin/busybox", 0o755, &busybox)?;
    for applet in [
        "sh", "echo", "cat", "sleep", "ls", "true", "false", "env", "dd", "head", "tail", "wc",
        "grep", "sed", "awk", "mkdir", "rm", "cp", "mv", "date", "uname", "yes", "seq", "tr",
        "cut", "sort", "printf", "test", "kill", "ps", "free", "df", "id", "hostname", "pwd",
        "touch", "whoami",
    ] {
        cpio.symlink(&format!("bin/{applet}"), "busybox")?;
    }
    let mut list = String::new();
    for (group, module) in MODULES {
        let data = std::fs::read(modules_dir.join(module))
            .map_err(|_| ImageError::Missing(module.to_string()))?;
        let name = Path::new(module)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        cpio.file(&format!("lib/modules/{name}"), 0o644, &data)?;
        list.push_str(&format!("{group} /lib/modules/{name}\n"));
    }
    cpio.file("etc/vm0/modules", 0o644, list.as_bytes())?;
    let passwd = format!(
        "root:x:0:0:root:/work:/bin/sh\n{}",
        crate::run_user::passwd_line(vm0_proto::guest::RUN_UID, vm0_proto::guest::RUN_GID)
    );
    cpio.file("etc/passwd", 0o644, passwd.as_bytes())?;
    let group = format!(
        "root:x:0:\n{}",
        crate::run_user::group_line(vm0_proto::guest::RUN_GID)
    );
    cpio.file("etc/group", 0o644, group.as_bytes())?;
    Ok(cpio.finish()?.finish()?)
}

/// Bumped whenever what an image holds changes for the same inputs.
const IMAGE_FORMAT: &str = "vm0-guest-image-4";

/// The kernel to boot: the uncompressed ELF inside the bzImage, extracted once
/// next to it. Booting it directly (PVH) skips the kernel's self-decompression,
/// which takes seconds under TCG; Cloud Hypervisor prefers it too. Falls back to
/// the bzImage when the payload is not one we can unpack.
fn boot_kernel(vmlinuz: &Path) -> Result<PathBuf, ImageError> {
    let vmlinux = vmlinuz.with_file_name("vmlinux");
    if vmlinux.exists() {
        return Ok(vmlinux);
    }
    let bzimage = std::fs::read(vmlinuz)?;
    let Some(elf) = unpack_payload(&bzimage) else {
        tracing::warn!(kernel = %vmlinuz.display(), "no xz or gzip payload found; booting the bzImage");
        return Ok(vmlinuz.to_owned());
    };
    write_atomically(&vmlinux, &elf)?;
    Ok(vmlinux)
}

/// The ELF kernel compressed inside a bzImage (xz, as Debian builds it, or gzip).
fn unpack_payload(bzimage: &[u8]) -> Option<Vec<u8>> {
    let find = |magic: &[u8]| bzimage.windows(magic.len()).position(|w| w == magic);
    let elf = if let Some(at) = find(b"\xfd7zXZ\x00") {
        let mut xz = std::process::Command::new("xz")
            .args(["-dc", "--single-stream"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .ok()?;
        let mut stdin = xz.stdin.take()?;
        let payload = bzimage[at..].to_vec();
        let feeder = std::thread::spawn(move || stdin.write_all(&payload));
        let out = xz.wait_with_output().ok()?;
        // xz stops reading at the end of its stream: the rest is not ours to feed.
        let _ = feeder.join();
        out.stdout
    } else {
        let at = find(b"\x1f\x8b\x08")?;
        let mut elf = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&bzimage[at..]), &mut elf)
            .ok()?;
        elf
    };
    elf.starts_with(b"\x7fELF").then_some(elf)
}

/// Concurrent builders (workers starting together) never see a partial file.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), ImageError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.write_all(bytes)?;
    // Readable as the images are: a cache built ahead by root serves
    // unprivileged workers too (a temporary file is born 0600).
    use std::os::unix::fs::PermissionsExt;
    tmp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(0o644))?;
    tmp.persist(path).map_err(|e| ImageError::Io(e.error))?;
    Ok(())
}

/// A key over everything an image is built from, so that a worker's start finds
/// its image without rebuilding and hashing it.
fn recipe_key(recipe: &ImageRecipe, package: &str) -> Result<String, ImageError> {
    let mut h = Sha256::new();
    h.update(IMAGE_FORMAT);
    h.update(package);
    for file in [&recipe.guest_agent, &recipe.busybox] {
        let bytes =
            std::fs::read(file).map_err(|_| ImageError::Missing(file.display().to_string()))?;
        h.update(Sha256::digest(&bytes));
    }
    for (group, module) in MODULES {
        h.update(format!("{group} {module}\n"));
    }
    if let Some(dir) = &recipe.rootfs {
        rootfs::fingerprint(dir, &mut h);
    }
    Ok(hex::encode(h.finalize()))
}

fn image_in(dir: &Path, id: &str) -> Option<GuestImage> {
    let initrd = dir.join("initrd.img");
    let kernel = ["vmlinux", "vmlinuz"]
        .iter()
        .map(|name| dir.join(name))
        .find(|p| p.exists())?;
    let rootfs = Some(dir.join("rootfs.ext4")).filter(|r| r.exists());
    initrd.exists().then(|| GuestImage {
        id: id.to_owned(),
        kernel,
        initrd,
        rootfs,
    })
}

/// Builds (or finds in the cache) the image for `recipe`.
pub fn build(recipe: &ImageRecipe) -> Result<GuestImage, ImageError> {
    std::fs::create_dir_all(recipe.cache_dir.join("recipes"))?;
    let package = match &recipe.kernel_package {
        Some(p) => p.clone(),
        None => default_kernel_package()?,
    };
    let key_file = recipe
        .cache_dir
        .join("recipes")
        .join(recipe_key(recipe, &package)?);
    if let Ok(id) = std::fs::read_to_string(&key_file)
        && let Some(image) = image_in(&recipe.cache_dir.join(id.trim()), id.trim())
    {
        return Ok(image);
    }
    let (vmlinuz, modules) = kernel_tree(recipe, &package)?;
    let kernel_path = boot_kernel(&vmlinuz)?;
    let kernel_name = kernel_path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "vmlinuz".into());
    let kernel = std::fs::read(&kernel_path)?;
    let initrd = initramfs(recipe, &modules)?;
    let tmp = tempfile::tempdir_in(&recipe.cache_dir)?;
    let mut h = Sha256::new();
    h.update(&kernel);
    h.update(&initrd);
    if let Some(tree) = &recipe.rootfs {
        let disk = tmp.path().join("rootfs.ext4");
        rootfs::build(tree, &disk)?;
        h.update(rootfs::digest(&disk)?);
    }
    let id = hex::encode(h.finalize());
    let dir = recipe.cache_dir.join(&id);
    if image_in(&dir, &id).is_none() {
        std::fs::write(tmp.path().join(&kernel_name), &kernel)?;
        std::fs::write(tmp.path().join("initrd.img"), &initrd)?;
        let built = tmp.keep();
        // Another builder may have won the race: theirs is identical.
        if std::fs::rename(&built, &dir).is_err() {
            let _ = std::fs::remove_dir_all(&built);
        }
    }
    let image =
        image_in(&dir, &id).ok_or_else(|| ImageError::Missing(dir.display().to_string()))?;
    write_atomically(&key_file, id.as_bytes())?;
    Ok(image)
}

/// Named images in a cache (`vm0 image build --name NAME`): one file per name
/// under `<cache>/names/`, holding the image id.
#[derive(Debug, Clone)]
pub struct ImageCatalog {
    cache_dir: PathBuf,
}

impl ImageCatalog {
    pub fn new(cache_dir: &Path) -> ImageCatalog {
        ImageCatalog {
            cache_dir: cache_dir.to_owned(),
        }
    }

    fn name_file(&self, name: &str) -> PathBuf {
        // Hex keeps any name (`/`, `:`) a single safe file name.
        self.cache_dir.join("names").join(hex::encode(name))
    }

    /// Gives `image` the name `name` (replacing what had it).
    pub fn set_name(&self, name: &str, image: &GuestImage) -> Result<(), ImageError> {
        std::fs::create_dir_all(self.cache_dir.join("names"))?;
        write_atomically(&self.name_file(name), image.id.as_bytes())
    }

    /// The image named `name`, or whose id is `name`.
    pub fn find(&self, name: &str) -> Option<GuestImage> {
        let id = std::fs::read_to_string(self.name_file(name))
            .map(|id| id.trim().to_owned())
            .unwrap_or_else(|_| name.to_owned());
        if id.len() != 64 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        image_in(&self.cache_dir.join(&id), &id)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_dynamic_guest_agent_is_refused() {
        // This test binary is dynamically linked (glibc); busybox-static is not,
        // when it is installed.
        let me = std::fs::read(std::env::current_exe().expect("current exe")).expect("read");
        assert!(super::has_interpreter(&me));
        if let Ok(busybox) = std::fs::read("/bin/busybox") {
            assert!(!super::has_interpreter(&busybox));
        }
        assert!(!super::has_interpreter(b"#!/bin/sh\n"));
    }
}
