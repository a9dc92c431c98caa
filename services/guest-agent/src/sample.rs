//! Whole-system resource samples (inside a VM the whole system is the run):
//! `/proc/stat`, `/proc/meminfo`, `statvfs` of the working directory, `/proc/net/dev`.

use vm0_proto::guest::Sample;

/// CPU jiffies: (busy, total) over all CPUs.
fn cpu_jiffies() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    Some((total - idle, total))
}

fn meminfo_kb(field: &str) -> Option<i64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    info.lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn network() -> (i64, i64) {
    let Ok(raw) = std::fs::read_to_string("/proc/net/dev") else {
        return (0, 0);
    };
    raw.lines()
        .skip(2)
        .filter_map(|l| {
            let (name, counters) = l.split_once(':')?;
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

/// The OOM killer's kill counter (`/proc/vmstat`), to tell an OOM kill from others.
pub fn oom_kills() -> u64 {
    std::fs::read_to_string("/proc/vmstat")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("oom_kill "))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Samples relative to the previous CPU reading.
pub struct Sampler {
    last_cpu: Option<(u64, u64)>,
    cpus: f64,
    dir: String,
}

impl Sampler {
    pub fn new(dir: &str) -> Sampler {
        Sampler {
            last_cpu: cpu_jiffies(),
            cpus: std::thread::available_parallelism().map_or(1.0, |n| n.get() as f64),
            dir: if dir.is_empty() {
                "/".into()
            } else {
                dir.to_owned()
            },
        }
    }

    pub fn sample(&mut self) -> Sample {
        let now = cpu_jiffies();
        let cpu_percent = match (self.last_cpu, now) {
            (Some((b0, t0)), Some((b1, t1))) if t1 > t0 => {
                ((b1 - b0) as f64 / (t1 - t0) as f64 * self.cpus * 1000.0).round() / 10.0
            }
            _ => 0.0,
        };
        self.last_cpu = now;
        let total = meminfo_kb("MemTotal:").unwrap_or(0) * 1024;
        let available = meminfo_kb("MemAvailable:").unwrap_or(0) * 1024;
        let (disk_used, disk_total) = nix::sys::statvfs::statvfs(self.dir.as_str())
            .map(|s| {
                let frag = s.fragment_size() as i64;
                let total = s.blocks() as i64 * frag;
                (total - s.blocks_free() as i64 * frag, total)
            })
            .unwrap_or((0, 0));
        let (rx, tx) = network();
        Sample {
            cpu_percent,
            memory_used_bytes: total - available,
            memory_total_bytes: total,
            disk_used_bytes: disk_used,
            disk_total_bytes: disk_total,
            network_rx_bytes: rx,
            network_tx_bytes: tx,
        }
    }
}
