//! The Cloud Hypervisor backend. The schema check always runs: Cloud Hypervisor
//! ignores fields it does not know, so a wrong body would not fail loudly there.
//! The tests against a real VMM need `cloud-hypervisor` on PATH and `/dev/kvm`,
//! and skip with a printed reason otherwise (no distribution ships the VMM to
//! this project's CI machines).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;
use vm0_sandbox::cloud_hypervisor::api::ApiClient;
use vm0_sandbox::cloud_hypervisor::{CloudHypervisor, vm_config};
use vm0_sandbox::image::{GuestImage, ImageRecipe};
use vm0_sandbox::microvm::{MicroVm, VmFiles};
use vm0_sandbox::sample::processes_matching;
use vm0_sandbox::vmm_jail::VmPaths;
use vm0_sandbox::{Sandbox, SandboxEvent, SandboxSpec};

fn spec(scratch: &Path, argv: &[&str]) -> SandboxSpec {
    SandboxSpec {
        run_id: "run_ch".into(),
        argv: argv.iter().map(|s| s.to_string()).collect(),
        env: vec![("PATH".into(), "/bin".into())],
        working_dir: None,
        stdin: Vec::new(),
        stdin_file: None,
        vcpus: 2,
        memory_mb: 256,
        disk_mb: 256,
        image: None,
        files: Vec::new(),
        scratch_dir: scratch.to_owned(),
        sample_interval: Duration::from_millis(500),
        as_root: false,
        slot_user: None,
        trees_in: Vec::new(),
        trees_out: Vec::new(),
        network: None,
    }
}

/// Checks `value` against a JSON-schema subset (type, properties, required, enum,
/// minimum, items, $ref), reporting every field the schema does not define.
fn check(root: &Value, schema: &Value, value: &Value, at: &str, errors: &mut Vec<String>) {
    if let Some(name) = schema["$ref"].as_str() {
        let name = name.trim_start_matches("#/definitions/");
        return check(root, &root["definitions"][name], value, at, errors);
    }
    if let Some(allowed) = schema["enum"].as_array()
        && !allowed.contains(value)
    {
        errors.push(format!("{at}: {value} is not one of {allowed:?}"));
    }
    if let Some(min) = schema["minimum"].as_i64()
        && value.as_i64().is_some_and(|v| v < min)
    {
        errors.push(format!("{at}: {value} is below the minimum {min}"));
    }
    let ok = match schema["type"].as_str() {
        None => true,
        Some("object") => value.is_object(),
        Some("integer") => value.is_i64() || value.is_u64(),
        Some("string") => value.is_string(),
        Some("boolean") => value.is_boolean(),
        Some("array") => value.is_array(),
        Some(other) => panic!("schema type {other} is not handled"),
    };
    if !ok {
        errors.push(format!("{at}: {value} is not of type {}", schema["type"]));
        return;
    }
    if let Some(fields) = value.as_object() {
        for required in schema["required"].as_array().into_iter().flatten() {
            let name = required.as_str().unwrap_or_default();
            if !fields.contains_key(name) {
                errors.push(format!("{at}: required field {name} is missing"));
            }
        }
        for (name, field) in fields {
            match schema["properties"].get(name) {
                Some(sub) => check(root, sub, field, &format!("{at}.{name}"), errors),
                None => errors.push(format!("{at}: unknown field {name}")),
            }
        }
    }
    if let Some(items) = value.as_array() {
        for (i, item) in items.iter().enumerate() {
            check(root, &schema["items"], item, &format!("{at}[{i}]"), errors);
        }
    }
}

fn schema() -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/cloud-hypervisor-vm-config.schema.json"
    );
    serde_json::from_str(&std::fs::read_to_string(path).expect("schema file")).expect("json")
}

fn schema_errors(body: &Value) -> Vec<String> {
    let root = schema();
    let mut errors = Vec::new();
    let vm_config = serde_json::json!({"$ref": "#/definitions/VmConfig"});
    check(&root, &vm_config, body, "VmConfig", &mut errors);
    errors
}

#[test]
fn vm_create_body_matches_the_api_schema() {
    let image = GuestImage {
        id: "x".into(),
        kernel: PathBuf::from("/images/x/vmlinuz"),
        initrd: PathBuf::from("/images/x/initrd.img"),
        rootfs: Some(PathBuf::from("/images/x/rootfs.ext4")),
    };
    let scratch = Path::new("/var/lib/vm0/runs/run_1");
    // The paths a jailed VMM sees.
    let paths = VmPaths {
        kernel: PathBuf::from("/vm/kernel"),
        initrd: PathBuf::from("/vm/initrd"),
        rootfs: Some(PathBuf::from("/vm/rootfs")),
        guest_socket: PathBuf::from("/jail/guest.sock"),
        api_socket: PathBuf::from("/jail/vmm.sock"),
    };
    let body = serde_json::to_value(vm_config(&image, &spec(scratch, &["true"]), &paths))
        .expect("serializes");
    assert_eq!(schema_errors(&body), Vec::<String>::new(), "{body:#}");
    // What the backend depends on, beyond the schema.
    assert_eq!(body["console"]["mode"], "Off", "never the worker's TTY");
    assert_eq!(
        body["serial"]["mode"], "Tty",
        "the VMM's stdout, which the host reads"
    );
    assert_eq!(body["payload"]["kernel"], "/vm/kernel");
    assert_eq!(body["vsock"]["socket"], "/jail/guest.sock");
    assert_eq!(body["memory"]["size"], 256 * 1024 * 1024);
    assert_eq!(body["cpus"]["boot_vcpus"], 2);
    assert_eq!(body["disks"][0]["readonly"], true, "runs share the rootfs");
    assert!(
        body["payload"]["cmdline"]
            .as_str()
            .is_some_and(|c| c.contains("vm0.transport=vsock:1024")),
        "{body}"
    );

    // The check itself catches the mistakes it exists for.
    let mut wrong = body.clone();
    wrong["console"]["mode"] = "off".into();
    wrong["cpus"]["boot_cpus"] = 2.into();
    wrong["vsock"]["cid"] = 2.into();
    let errors = schema_errors(&wrong);
    assert_eq!(errors.len(), 3, "{errors:#?}");
}

/// Why the real-VMM tests cannot run here, if they cannot.
fn skip_reason() -> Option<String> {
    if vm0_sandbox::select::kvm_device().is_err() {
        return Some("/dev/kvm is not usable".into());
    }
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join("cloud-hypervisor").is_file()))
        .unwrap_or(false);
    if !on_path {
        return Some("cloud-hypervisor is not on PATH".into());
    }
    if std::env::var_os("VM0_GUEST_AGENT").is_none() {
        return Some("VM0_GUEST_AGENT is not set (scripts/test.sh builds it)".into());
    }
    None
}

fn image() -> GuestImage {
    let cache = std::env::var("VM0_IMAGE_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../target/vm0-images"
            ))
        });
    vm0_sandbox::image::build(&ImageRecipe {
        guest_agent: std::env::var("VM0_GUEST_AGENT").expect("checked").into(),
        busybox: PathBuf::from("/bin/busybox"),
        kernel_package: None,
        cache_dir: cache,
        rootfs: None,
    })
    .expect("guest image builds")
}

/// Every endpoint the backend uses, against the real VMM (the guest need not boot).
#[tokio::test]
async fn api_round_trip_against_a_real_vmm() {
    if let Some(why) = skip_reason() {
        eprintln!("SKIPPED api_round_trip_against_a_real_vmm: {why}");
        return;
    }
    let dir = tempfile::tempdir().expect("dir");
    let files = VmFiles::in_dir(dir.path());
    std::fs::create_dir_all(&files.jail_dir).expect("dir");
    let mut vmm = tokio::process::Command::new("cloud-hypervisor")
        .arg("--api-socket")
        .arg(format!("path={}", files.api_socket.display()))
        .kill_on_drop(true)
        .spawn()
        .expect("spawn cloud-hypervisor");
    let api = ApiClient::new(&files.api_socket);
    let deadline = Instant::now() + Duration::from_secs(5);
    let ping = loop {
        match api.ping().await {
            Ok(p) => break p,
            Err(e) if Instant::now() > deadline => panic!("vmm.ping never answered: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    };
    eprintln!("cloud-hypervisor {}", ping.version);
    let image = image();
    let config = vm_config(
        &image,
        &spec(dir.path(), &["true"]),
        &VmPaths::unjailed(&image, &files),
    );
    api.create(&config).await.expect("vm.create");
    assert_eq!(api.info().await.expect("vm.info").state, "Created");
    api.boot().await.expect("vm.boot");
    assert_eq!(api.info().await.expect("vm.info").state, "Running");
    // Devices report counters once they move data; an idle VM may have none.
    let counters = api.counters().await.expect("vm.counters decodes");
    eprintln!("vm.counters: {counters:?}");
    api.shutdown().await.expect("vm.shutdown");
    api.delete().await.expect("vm.delete");
    api.shutdown_vmm().await.expect("vmm.shutdown");
    let status = tokio::time::timeout(Duration::from_secs(5), vmm.wait())
        .await
        .expect("the VMM exits after vmm.shutdown")
        .expect("wait");
    assert!(status.success(), "{status}");
}

/// A run on the backend: the command's output where KVM boots the guest kernel;
/// where it does not (nested KVM such as PVM), a boot failure at the kernel-boot
/// stage with the VMM gone. Either way no process is left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_boots_or_fails_at_the_boot_stage() {
    if let Some(why) = skip_reason() {
        eprintln!("SKIPPED a_run_boots_or_fails_at_the_boot_stage: {why}");
        return;
    }
    let dir = tempfile::tempdir().expect("dir");
    let vmm = CloudHypervisor::new().expect("on PATH");
    let image = image();
    let probe_dir = dir.path().join("run_ch_probe");
    // As a worker runs it: jailed, as a slot's uid under root.
    let jail = vm0_sandbox::vmm_jail::VmmJail::detect().expect("the VMM jail");
    let leases = tempfile::tempdir().expect("leases");
    let slots = vm0_sandbox::slot_user::can_switch_uids().then(|| {
        vm0_sandbox::slot_user::SlotUsers::lease(Default::default(), 1, leases.path())
            .expect("a slot uid")
    });
    let user = slots.as_ref().and_then(|s| s.users().first().copied());
    match vm0_sandbox::microvm::probe(
        &vmm,
        &image,
        Some(&jail),
        user,
        &probe_dir,
        Duration::from_secs(5),
    )
    .await
    {
        Err(failure) => {
            eprintln!(
                "the guest kernel does not boot here: stage {}: {}",
                failure.stage, failure.reason
            );
            assert_eq!(failure.stage, "kernel-boot", "{}", failure.reason);
            assert!(
                failure.reason.contains("vsock port 1024"),
                "{}",
                failure.reason
            );
        }
        Ok(timings) => {
            eprintln!("probe booted: {timings:?}");
            let sandbox = MicroVm::new(vmm, image).with_jail(jail);
            let scratch = dir.path().join("run_ch_run");
            let mut s = spec(&scratch, &["sh", "-c", "echo from-ch; exit 4"]);
            s.slot_user = user;
            let mut run = sandbox.start(s).await.expect("start");
            let mut out = Vec::new();
            let exit = loop {
                match run.next_event().await.expect("events end with Exited") {
                    SandboxEvent::Stdout(b) => out.extend_from_slice(&b),
                    SandboxEvent::Exited(x) => break x,
                    _ => {}
                }
            };
            assert_eq!(String::from_utf8_lossy(&out), "from-ch\n");
            assert_eq!(exit.code, Some(4));
        }
    }
    assert_eq!(processes_matching("run_ch_"), 0, "no VMM process remains");
}
