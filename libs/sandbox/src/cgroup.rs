//! Resource limits for sandboxes that share the host kernel (bubblewrap): one cgroup
//! per run with memory, CPU and process-count limits, whose OOM-kill count says
//! whether the kernel ended the run for memory.
//!
//! Runs are `vm0-w<worker pid>-<n>/vm0-run-<run id>` under the worker's own cgroup, so
//! that workers sharing a cgroup never touch each other's runs; a worker sweeps the
//! groups of workers that are gone. cgroup v2: the worker's cgroup must be delegated
//! to it (systemd `Delegate=yes`, or a container's cgroup namespace); the worker moves
//! its processes into a `vm0-worker` leaf and enables the controllers for children.
//! cgroup v1: the same under the worker's cgroup of each controller (memory, cpu, pids).

use std::path::{Path, PathBuf};

/// Processes a run may have at once (fork bombs end here, not in the host's table).
pub const PIDS_MAX: u64 = 4096;
/// The CFS period; a run's quota is `vcpus` periods.
const CPU_PERIOD_US: u64 = 100_000;
/// Prefix of run cgroups.
const RUN_PREFIX: &str = "vm0-run-";
/// Prefix of a worker's group of runs, followed by `<worker pid>-<instance>`.
const WORKER_PREFIX: &str = "vm0-w";

/// Whether runs that share the host kernel get cgroup limits
/// (`VM0_BUBBLEWRAP_LIMITS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HostLimits {
    /// When the host lets this process make cgroups; runs say why not otherwise.
    #[default]
    Auto,
    /// Never (the host's cgroups are someone else's to manage).
    Off,
}

impl std::str::FromStr for HostLimits {
    type Err = String;

    fn from_str(s: &str) -> Result<HostLimits, String> {
        match s {
            "auto" => Ok(HostLimits::Auto),
            "off" => Ok(HostLimits::Off),
            other => Err(format!(
                "unknown limits setting {other:?} (one of: auto, off)"
            )),
        }
    }
}

/// What a run may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub memory_mb: u64,
    pub vcpus: u32,
    pub pids: u64,
}

impl Limits {
    /// What the run's agent config asks for.
    pub fn of(spec: &crate::SandboxSpec) -> Limits {
        Limits {
            memory_mb: spec.memory_mb,
            vcpus: spec.vcpus,
            pids: PIDS_MAX,
        }
    }
}

impl std::fmt::Display for Limits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "limits: {} MB memory, {} vCPU, {} processes",
            self.memory_mb, self.vcpus, self.pids
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("no cgroup hierarchy this worker may use: {0}")]
    Unavailable(String),
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
}

fn io<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> CgroupError + 'a {
    move |source| CgroupError::Io {
        action,
        path: path.display().to_string(),
        source,
    }
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    std::fs::write(path, value).map_err(io("writing", path))
}

/// Where run cgroups are made: this worker's `vm0-w<pid>` group(s).
#[derive(Debug)]
pub enum Hierarchy {
    /// cgroup v2: runs are children of `base`, which has the controllers enabled.
    V2 { base: PathBuf },
    /// cgroup v1: a base directory per controller.
    V1 {
        memory: PathBuf,
        cpu: Option<PathBuf>,
        pids: Option<PathBuf>,
    },
}

/// Removes the groups of workers that are gone (their runs' groups are empty:
/// sandboxes die with their worker), then makes this worker's group in `parent`.
fn worker_group(parent: &Path) -> Result<PathBuf, CgroupError> {
    if let Ok(dir) = std::fs::read_dir(parent) {
        for entry in dir.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some((pid, _)) = name
                .strip_prefix(WORKER_PREFIX)
                .and_then(|rest| rest.split_once('-'))
            else {
                continue;
            };
            if !pid.is_empty() && !Path::new("/proc").join(pid).exists() {
                remove_group(&entry.path());
            }
        }
    }
    // One group per `Hierarchy`, removed with it: a process may have several.
    static INSTANCE: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = INSTANCE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let group = parent.join(format!("{WORKER_PREFIX}{}-{n}", std::process::id()));
    match std::fs::create_dir(&group) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => Err(io("creating", &group)(e)),
        _ => Ok(group),
    }
}

/// Removes an empty cgroup and its empty children.
fn remove_group(dir: &Path) {
    if let Ok(children) = std::fs::read_dir(dir) {
        for child in children.flatten() {
            if child.path().is_dir() {
                let _ = std::fs::remove_dir(child.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}

impl Hierarchy {
    /// Finds a hierarchy this process may make run cgroups in, preparing it (v2),
    /// and removes run cgroups a previous worker left (empty ones).
    pub fn detect() -> Result<Hierarchy, CgroupError> {
        let own = std::fs::read_to_string("/proc/self/cgroup")
            .map_err(|e| CgroupError::Unavailable(format!("/proc/self/cgroup: {e}")))?;
        let mounts = std::fs::read_to_string("/proc/self/mounts")
            .map_err(|e| CgroupError::Unavailable(format!("/proc/self/mounts: {e}")))?;
        match v1_bases(&own, &mounts) {
            Some(h) => Ok(h),
            None => v2_base(&own, &mounts),
        }
    }

    /// The base directories runs are made in.
    fn bases(&self) -> Vec<&Path> {
        match self {
            Hierarchy::V2 { base } => vec![base],
            Hierarchy::V1 { memory, cpu, pids } => std::iter::once(memory.as_path())
                .chain(cpu.as_deref())
                .chain(pids.as_deref())
                .collect(),
        }
    }

    /// Makes the cgroup of run `run_id` with `limits`.
    pub fn create(&self, run_id: &str, limits: &Limits) -> Result<RunCgroup, CgroupError> {
        let name = format!("{RUN_PREFIX}{run_id}");
        // Built up as the groups are made, so that a failure removes what was made.
        let mut cgroup = RunCgroup {
            v2: matches!(self, Hierarchy::V2 { .. }),
            dirs: Vec::new(),
        };
        for base in self.bases() {
            let dir = base.join(&name);
            // A run started again on this worker: its old group is empty.
            let _ = std::fs::remove_dir(&dir);
            std::fs::create_dir(&dir).map_err(io("creating", &dir))?;
            cgroup.dirs.push(dir);
        }
        cgroup.limit(self, limits)?;
        Ok(cgroup)
    }
}

impl Drop for Hierarchy {
    /// The worker's groups go with it (its runs' groups are gone by then).
    fn drop(&mut self) {
        for base in self.bases() {
            remove_group(base);
        }
    }
}

/// The cgroup(s) of one run; removed on drop (once its processes are gone).
#[derive(Debug)]
pub struct RunCgroup {
    v2: bool,
    /// v2: one directory; v1: memory first, then cpu and pids when mounted.
    dirs: Vec<PathBuf>,
}

impl RunCgroup {
    fn limit(&self, hierarchy: &Hierarchy, limits: &Limits) -> Result<(), CgroupError> {
        let memory = (limits.memory_mb * 1024 * 1024).to_string();
        let quota = (u64::from(limits.vcpus.max(1)) * CPU_PERIOD_US).to_string();
        let pids = limits.pids.to_string();
        match hierarchy {
            Hierarchy::V2 { .. } => {
                let dir = &self.dirs[0];
                write(&dir.join("memory.max"), &memory)?;
                // No swap: the limit is the memory the run has.
                let swap = dir.join("memory.swap.max");
                if swap.exists() {
                    write(&swap, "0")?;
                }
                write(&dir.join("cpu.max"), &format!("{quota} {CPU_PERIOD_US}"))?;
                write(&dir.join("pids.max"), &pids)?;
            }
            Hierarchy::V1 { cpu, pids: p, .. } => {
                let mem = &self.dirs[0];
                write(&mem.join("memory.limit_in_bytes"), &memory)?;
                let memsw = mem.join("memory.memsw.limit_in_bytes");
                if memsw.exists() {
                    write(&memsw, &memory)?;
                }
                let mut rest = self.dirs[1..].iter();
                if cpu.is_some()
                    && let Some(dir) = rest.next()
                {
                    write(&dir.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
                    write(&dir.join("cpu.cfs_quota_us"), &quota)?;
                }
                if p.is_some()
                    && let Some(dir) = rest.next()
                {
                    write(&dir.join("pids.max"), &pids)?;
                }
            }
        }
        Ok(())
    }

    /// Moves process `pid` into the run's cgroup(s); its later children follow.
    pub fn add(&self, pid: u32) -> Result<(), CgroupError> {
        for dir in &self.dirs {
            write(&dir.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
    }

    /// How many processes the kernel's OOM killer ended in this run.
    pub fn oom_kills(&self) -> u64 {
        let (file, key) = if self.v2 {
            ("memory.events", "oom_kill")
        } else {
            ("memory.oom_control", "oom_kill")
        };
        std::fs::read_to_string(self.dirs[0].join(file))
            .ok()
            .and_then(|text| {
                text.lines().find_map(|l| {
                    let (k, v) = l.split_once(' ')?;
                    (k == key).then(|| v.trim().parse().ok())?
                })
            })
            .unwrap_or(0)
    }

    /// The directories, for tests and diagnostics.
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }
}

impl Drop for RunCgroup {
    /// A cgroup is removable once its last process is gone; the kernel may take a
    /// moment after the final `wait`.
    fn drop(&mut self) {
        for dir in &self.dirs {
            for _ in 0..50 {
                match std::fs::remove_dir(dir) {
                    Err(e) if e.raw_os_error() == Some(nix::libc::EBUSY) => {
                        std::thread::sleep(std::time::Duration::from_millis(10));
                    }
                    _ => break,
                }
            }
        }
    }
}

/// The mount point of cgroup v1 `controller`, from `/proc/self/mounts`.
fn v1_mount(mounts: &str, controller: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (_, point, fstype, options) = (f.next()?, f.next()?, f.next()?, f.next()?);
        (fstype == "cgroup" && options.split(',').any(|o| o == controller))
            .then(|| PathBuf::from(point))
    })
}

/// This process's path in the v1 hierarchy holding `controller`.
fn v1_path<'a>(own: &'a str, controller: &str) -> Option<&'a str> {
    own.lines().find_map(|l| {
        let mut parts = l.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        controllers
            .split(',')
            .any(|c| c == controller)
            .then_some(path)
    })
}

fn v1_base(own: &str, mounts: &str, controller: &str) -> Option<PathBuf> {
    let base =
        v1_mount(mounts, controller)?.join(v1_path(own, controller)?.trim_start_matches('/'));
    if !writable_dir(&base) {
        return None;
    }
    worker_group(&base).ok()
}

fn v1_bases(own: &str, mounts: &str) -> Option<Hierarchy> {
    Some(Hierarchy::V1 {
        memory: v1_base(own, mounts, "memory")?,
        cpu: v1_base(own, mounts, "cpu"),
        pids: v1_base(own, mounts, "pids"),
    })
}

/// The cgroup2 mount point, from `/proc/self/mounts`.
fn v2_mount_of(mounts: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (_, point, fstype) = (f.next()?, f.next()?, f.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(point))
    })
}

/// The delegated v2 cgroup of this process, prepared for run children.
fn v2_base(own: &str, mounts: &str) -> Result<Hierarchy, CgroupError> {
    let unavailable = |why: String| CgroupError::Unavailable(why);
    let mount = v2_mount_of(mounts)
        .ok_or_else(|| unavailable("no cgroup2 mount and no cgroup v1 memory controller".into()))?;
    let path = own
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or_else(|| unavailable("this process has no cgroup v2 path".into()))?;
    let base = mount.join(path.trim_start_matches('/'));
    let controllers = std::fs::read_to_string(base.join("cgroup.controllers")).unwrap_or_default();
    let missing: Vec<&str> = ["memory", "cpu", "pids"]
        .into_iter()
        .filter(|c| !controllers.split_whitespace().any(|have| have == *c))
        .collect();
    if !missing.is_empty() {
        return Err(unavailable(format!(
            "the cgroup v2 controllers {} are not delegated to {} (systemd: Delegate=yes)",
            missing.join(", "),
            base.display()
        )));
    }
    if !writable_dir(&base) {
        return Err(unavailable(format!("{} is not writable", base.display())));
    }
    // Another manager's cgroup (a login session's, say) is not ours to rearrange.
    if !delegated(path, &base) {
        return Err(unavailable(format!(
            "{} is not delegated to this worker (systemd >= 251 with Delegate=yes marks it; \
             a container's own cgroup namespace needs nothing)",
            base.display()
        )));
    }
    // "No internal processes": this cgroup's processes move to a leaf before its
    // controllers can be enabled for children.
    let leaf = base.join("vm0-worker");
    match std::fs::create_dir(&leaf) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
            return Err(io("creating", &leaf)(e));
        }
        _ => {}
    }
    let procs = std::fs::read_to_string(base.join("cgroup.procs")).unwrap_or_default();
    for pid in procs.lines().filter(|l| !l.trim().is_empty()) {
        // A process that exited meanwhile cannot be moved, and need not be.
        let _ = std::fs::write(leaf.join("cgroup.procs"), pid.trim());
    }
    write(&base.join("cgroup.subtree_control"), "+memory +cpu +pids")?;
    let group = worker_group(&base)?;
    write(&group.join("cgroup.subtree_control"), "+memory +cpu +pids")?;
    Ok(Hierarchy::V2 { base: group })
}

/// Whether this process may manage the cgroup `base` (its path `path`): the root
/// of its cgroup namespace (a container), or marked delegated by systemd.
fn delegated(path: &str, base: &Path) -> bool {
    path.trim() == "/"
        || ["trusted.delegate", "user.delegate"]
            .iter()
            .any(|name| xattr::get(base, name).is_ok_and(|v| v.is_some()))
}

fn writable_dir(dir: &Path) -> bool {
    nix::unistd::access(dir, nix::unistd::AccessFlags::W_OK).is_ok() && dir.is_dir()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTS: &str = "\
tmpfs /sys/fs/cgroup tmpfs rw,relatime,mode=755 0 0
cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0
cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0
cgroup /sys/fs/cgroup/pids cgroup rw,relatime,pids 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0
";
    const OWN: &str = "8:pids:/\n4:memory:/process_api/abc\n1:cpu:/\n0::/\n";

    #[test]
    fn systemd_s_delegation_mark_is_read_from_cgroupfs() {
        let Some(v2) =
            v2_mount_of(&std::fs::read_to_string("/proc/self/mounts").unwrap_or_default())
        else {
            eprintln!("SKIPPED: no cgroup2 mount here");
            return;
        };
        let dir = v2.join(format!("vm0-delegate-test-{}", std::process::id()));
        if std::fs::create_dir(&dir).is_err() {
            eprintln!(
                "SKIPPED: cannot make a cgroup under {} (not root?)",
                v2.display()
            );
            return;
        }
        let before = delegated("/some.service", &dir);
        let marked = xattr::set(&dir, "trusted.delegate", b"1");
        let after = delegated("/some.service", &dir);
        let _ = std::fs::remove_dir(&dir);
        assert!(!before, "an unmarked cgroup is not ours");
        marked.expect("cgroupfs takes trusted.* attributes");
        assert!(after, "a cgroup marked by systemd is ours");
        assert!(delegated("/", &dir), "a cgroup namespace's root is ours");
    }

    #[test]
    fn v1_controllers_are_found_with_this_process_s_path() {
        assert_eq!(
            v1_mount(MOUNTS, "memory"),
            Some(PathBuf::from("/sys/fs/cgroup/memory"))
        );
        assert_eq!(v1_path(OWN, "memory"), Some("/process_api/abc"));
        assert_eq!(v1_path(OWN, "cpu"), Some("/"));
        assert_eq!(v1_mount(MOUNTS, "blkio"), None);
        // "cpu" is not "cpuacct" or "cpuset".
        assert_eq!(v1_mount("cgroup /c cgroup rw,cpuset 0 0\n", "cpu"), None);
    }
}
