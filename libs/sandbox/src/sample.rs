//! Resource samples of a process tree, read from `/proc`.

use std::collections::HashMap;
use std::path::Path;

/// One sample of a sandbox's resources.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct ResourceSample {
    pub cpu_percent: f64,
    pub memory_used_bytes: i64,
    pub memory_total_bytes: i64,
    pub disk_used_bytes: i64,
    pub disk_total_bytes: i64,
    pub network_rx_bytes: i64,
    pub network_tx_bytes: i64,
}

/// Kernel clock ticks per second (`USER_HZ`), 100 on every Linux architecture we run on.
const TICKS_PER_SEC: f64 = 100.0;
const PAGE_SIZE: i64 = 4096;

/// `(utime + stime, rss pages, ppid)` of one process.
fn stat(pid: u32) -> Option<(u64, i64, u32)> {
    let raw = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses: fields start after the last ')'.
    let rest = &raw[raw.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state): ppid is field 4, utime 14, stime 15,
    // cutime 16, cstime 17 (of children reaped: a tree's CPU counter never goes
    // back when a process of it ends), rss 24.
    let ppid = fields.get(1)?.parse().ok()?;
    let mut ticks = 0u64;
    for i in 11..=14 {
        ticks += fields.get(i)?.parse::<u64>().ok()?;
    }
    let rss: i64 = fields.get(21)?.parse().ok()?;
    Some((ticks, rss, ppid))
}

/// A walk stops after this many processes: a run has at most
/// `RUN_PROCESSES_MAX`, and a sample or a kill must not take longer than that.
const TREE_MAX: usize = 2 * vm0_proto::guest::RUN_PROCESSES_MAX as usize;

/// `root` and its descendants, `root` first ([`TREE_MAX`] at most).
pub fn process_tree(root: u32) -> Vec<u32> {
    // Children lists cost reads of the tree's own processes; a scan of every
    // process's ppid (kernels without CONFIG_PROC_CHILDREN) costs reads of all.
    if Path::new(&format!("/proc/{root}/task/{root}/children")).exists() {
        tree_from_children_lists(root)
    } else {
        tree_from_ppids(root)
    }
}

/// The direct children of `pid` (of all its threads).
pub fn children(pid: u32) -> Vec<u32> {
    let mut kids = Vec::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for task in tasks.flatten() {
            let list = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
            kids.extend(
                list.split_whitespace()
                    .filter_map(|c| c.parse::<u32>().ok()),
            );
        }
    }
    kids
}

fn tree_from_children_lists(root: u32) -> Vec<u32> {
    let mut tree = vec![root];
    let mut i = 0;
    while i < tree.len() && tree.len() < TREE_MAX {
        tree.extend(children(tree[i]));
        i += 1;
    }
    tree.truncate(TREE_MAX);
    tree
}

fn tree_from_ppids(root: u32) -> Vec<u32> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            if let Some((_, _, ppid)) = stat(pid) {
                children.entry(ppid).or_default().push(pid);
            }
        }
    }
    let mut tree = vec![root];
    let mut i = 0;
    while i < tree.len() && tree.len() < TREE_MAX {
        if let Some(kids) = children.get(&tree[i]) {
            tree.extend(kids);
        }
        i += 1;
    }
    tree.truncate(TREE_MAX);
    tree
}

/// Processes whose command line contains `marker` (leak checks: a run's processes
/// carry its id or a marker in their arguments).
pub fn processes_matching(marker: &str) -> usize {
    pids_matching(marker).len()
}

/// The pids of those processes (arguments joined by spaces).
pub fn pids_matching(marker: &str) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                String::from_utf8_lossy(&c)
                    .replace('\0', " ")
                    .contains(marker)
            })
        })
        .collect()
}

/// CPU ticks and resident bytes of a set of processes.
pub fn cpu_and_memory(pids: &[u32]) -> (u64, i64) {
    pids.iter()
        .filter_map(|p| stat(*p))
        .fold((0, 0), |(t, m), (ticks, rss, _)| {
            (t + ticks, m + rss * PAGE_SIZE)
        })
}

/// Received and sent bytes over the interfaces of `pid`'s network namespace,
/// loopback not counted (the sandbox talking to itself moves nothing).
pub fn network(pid: u32) -> (i64, i64) {
    let Ok(raw) = std::fs::read_to_string(format!("/proc/{pid}/net/dev")) else {
        return (0, 0);
    };
    raw.lines()
        .skip(2)
        .filter_map(|line| {
            let (name, counters) = line.split_once(':')?;
            if name.trim() == "lo" {
                return None;
            }
            let f: Vec<i64> = counters
                .split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect();
            Some((*f.first()?, *f.get(8)?))
        })
        .fold((0, 0), |(r, t), (rx, tx)| (r + rx, t + tx))
}

/// Bytes of the regular files under `dir`.
pub fn disk_usage(dir: &Path) -> i64 {
    let mut total = 0i64;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => stack.push(e.path()),
                Ok(m) if m.is_file() => total += i64::try_from(m.len()).unwrap_or(i64::MAX),
                _ => {}
            }
        }
    }
    total
}

/// CPU percent from two tick readings `interval_secs` apart (100 % = one core).
pub fn cpu_percent(prev_ticks: u64, ticks: u64, interval_secs: f64) -> f64 {
    if interval_secs <= 0.0 {
        return 0.0;
    }
    let used = ticks.saturating_sub(prev_ticks) as f64 / TICKS_PER_SEC;
    (used / interval_secs * 100.0 * 10.0).round() / 10.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let me = std::process::id();
        let tree = process_tree(me);
        assert_eq!(tree[0], me);
        let (_ticks, rss) = cpu_and_memory(&tree);
        assert!(rss > 0);
        assert_eq!(cpu_percent(0, 100, 1.0), 100.0);
        let dir = tempfile::tempdir().expect("dir");
        std::fs::write(dir.path().join("f"), [0u8; 1000]).expect("write");
        std::fs::create_dir(dir.path().join("d")).expect("mkdir");
        std::fs::write(dir.path().join("d/g"), [0u8; 24]).expect("write");
        assert_eq!(disk_usage(dir.path()), 1024);
    }

    #[test]
    fn both_ways_of_finding_a_tree_agree() {
        let mut child = std::process::Command::new("sh")
            .args(["-c", "sleep 5 & sh -c 'sleep 5 & wait' & wait"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("sh");
        std::thread::sleep(std::time::Duration::from_millis(300));
        let mut fast = tree_from_children_lists(child.id());
        let mut full = tree_from_ppids(child.id());
        for pid in &full {
            if let Ok(pid) = i32::try_from(*pid) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        let _ = child.wait();
        fast.sort_unstable();
        full.sort_unstable();
        assert_eq!(fast.len(), 4, "sh, sleep, sh, sleep: {fast:?}");
        assert_eq!(fast, full);
    }
}
