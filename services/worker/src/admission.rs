//! Admission: a run starts only when the worker has the vCPUs and memory it asks
//! for free, beside the runs it already has (slots count runs, not their size).
//! Waiting is first come, first served; a job waits here, in progress, rather
//! than being handed back (every hand-back counts toward its delivery limit).

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// A worker's vCPUs and memory (MB), as permits.
#[derive(Debug, Clone)]
pub struct Admission {
    vcpus: Arc<Semaphore>,
    memory_mb: Arc<Semaphore>,
    total: (u32, u32),
}

/// What a run holds of the worker while it lives.
#[derive(Debug)]
pub struct Admitted {
    _vcpus: Option<OwnedSemaphorePermit>,
    _memory: Option<OwnedSemaphorePermit>,
}

impl Admission {
    pub fn new(vcpus: u32, memory_mb: u64) -> Admission {
        let memory = u32::try_from(memory_mb).unwrap_or(u32::MAX);
        Admission {
            vcpus: Arc::new(Semaphore::new(vcpus as usize)),
            memory_mb: Arc::new(Semaphore::new(memory as usize)),
            total: (vcpus, memory),
        }
    }

    /// Waits until `vcpus` and `memory_mb` are free. A run larger than the whole
    /// worker is let through: the control plane refuses it at claim, saying why.
    pub async fn admit(&self, vcpus: u32, memory_mb: u64) -> Admitted {
        let memory = u32::try_from(memory_mb).unwrap_or(u32::MAX);
        if vcpus > self.total.0 || memory > self.total.1 {
            return Admitted {
                _vcpus: None,
                _memory: None,
            };
        }
        // Always CPUs first, then memory: two waiters never hold one each.
        let cpus = self.vcpus.clone().acquire_many_owned(vcpus).await.ok();
        let mem = self.memory_mb.clone().acquire_many_owned(memory).await.ok();
        Admitted {
            _vcpus: cpus,
            _memory: mem,
        }
    }

    /// vCPUs and memory (MB) free now.
    pub fn free(&self) -> (u32, u64) {
        (
            u32::try_from(self.vcpus.available_permits()).unwrap_or(u32::MAX),
            self.memory_mb.available_permits() as u64,
        )
    }
}
