//! `vm0 image build`: builds a guest image (kernel + initramfs with the guest
//! agent) into the image cache workers read, and names it, so that an agent's
//! `config.image` can ask for it.

use std::path::PathBuf;

use anyhow::{Context, Result};
use vm0_sandbox::image::{ImageCatalog, ImageRecipe};

#[derive(clap::Args)]
pub struct BuildArgs {
    /// Name runs use in `config.image` ("default" is what runs without one get).
    #[arg(long, default_value = "default")]
    name: String,
    /// The static guest agent (scripts/guest-agent.sh builds it).
    #[arg(long, env = "VM0_GUEST_AGENT")]
    guest_agent: PathBuf,
    /// Debian kernel package (default: what linux-image-amd64 depends on).
    #[arg(long, env = "VM0_KERNEL_PACKAGE")]
    kernel_package: Option<String>,
    /// A static busybox for the guest's userland.
    #[arg(long, default_value = "/bin/busybox")]
    busybox: PathBuf,
    /// Image cache (default: VM0_IMAGE_CACHE, else <VM0_DATA_DIR>/images).
    #[arg(long, env = "VM0_IMAGE_CACHE")]
    cache: Option<PathBuf>,
    /// A directory (e.g. a debootstrap tree) to attach as the read-only root
    /// filesystem the agent's command runs in (`mkfs.ext4 -d`).
    #[arg(long)]
    rootfs: Option<PathBuf>,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

pub fn build(args: BuildArgs) -> Result<()> {
    anyhow::ensure!(
        vm0_api_types::agents::is_image_name(&args.name),
        "--name {:?}: {}",
        args.name,
        vm0_api_types::agents::IMAGE_NAME_RULE
    );
    let cache = args.cache.unwrap_or_else(|| {
        std::env::var_os("VM0_DATA_DIR")
            .map_or_else(|| PathBuf::from(".vm0"), PathBuf::from)
            .join("images")
    });
    let started = std::time::Instant::now();
    let image = vm0_sandbox::image::build(&ImageRecipe {
        guest_agent: args.guest_agent,
        busybox: args.busybox,
        kernel_package: args.kernel_package,
        cache_dir: cache.clone(),
        rootfs: args.rootfs,
    })
    .context("building the guest image")?;
    ImageCatalog::new(&cache)
        .set_name(&args.name, &image)
        .context("naming the image")?;
    let took_ms = started.elapsed().as_millis();
    if args.json {
        let out = serde_json::json!({
            "name": args.name,
            "id": image.id,
            "kernel": image.kernel,
            "initrd": image.initrd,
            "rootfs": image.rootfs,
            "buildMs": took_ms,
        });
        println!("{out}");
    } else {
        println!("image {} ({}), built in {took_ms} ms", args.name, image.id);
        println!("  kernel: {}", image.kernel.display());
        println!("  initrd: {}", image.initrd.display());
        if let Some(rootfs) = &image.rootfs {
            println!("  rootfs: {}", rootfs.display());
        }
    }
    Ok(())
}
