//! A worker's slots: how many runs it takes at once, and under a root worker the
//! host uid each slot's run gets (leased for the worker's life, see
//! `vm0_sandbox::slot_user`). A run holds a [`Slot`] from the job's arrival to its
//! end; the uid goes back to the pool with it.

use std::sync::{Arc, Mutex};

use anyhow::Context;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use vm0_sandbox::slot_user::{SlotUser, SlotUsers, default_lock_dir};

use crate::WorkerConfig;

/// The slots of one worker.
#[derive(Debug)]
pub struct Slots {
    permits: Arc<Semaphore>,
    free: Arc<Mutex<Vec<SlotUser>>>,
    leased: SlotUsers,
}

/// One slot in use.
#[derive(Debug)]
pub struct Slot {
    _permit: OwnedSemaphorePermit,
    user: Option<SlotUser>,
    free: Arc<Mutex<Vec<SlotUser>>>,
}

impl Slot {
    /// The host identity of this slot's run (`None` under an unprivileged worker).
    pub fn user(&self) -> Option<SlotUser> {
        self.user
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let (Some(user), Ok(mut free)) = (self.user.take(), self.free.lock()) {
            free.push(user);
        }
    }
}

impl Slots {
    /// `config.slots` slots; a root worker leases a uid per slot from
    /// `VM0_SLOT_UIDS`.
    pub fn for_config(config: &WorkerConfig) -> anyhow::Result<Slots> {
        let leased = if vm0_sandbox::slot_user::can_switch_uids() {
            let dir = default_lock_dir();
            let leased =
                SlotUsers::lease(config.slot_uids, config.slots, &dir).with_context(|| {
                    format!("leasing slot uids (VM0_SLOT_UIDS={})", config.slot_uids)
                })?;
            let uids: Vec<u32> = leased.users().iter().map(|u| u.uid).collect();
            tracing::info!(?uids, "each slot runs as a host uid of its own");
            leased
        } else {
            tracing::info!(
                "this worker is not root: every run is its own user, in a user namespace of its own"
            );
            SlotUsers::none()
        };
        Ok(Slots::new(config.slots, leased))
    }

    /// `count` slots with the identities of `leased` (none, or one per slot).
    pub fn new(count: u32, leased: SlotUsers) -> Slots {
        Slots {
            permits: Arc::new(Semaphore::new(count as usize)),
            free: Arc::new(Mutex::new(leased.users().iter().rev().copied().collect())),
            leased,
        }
    }

    /// The host identities of every slot (for the sandbox's `/etc`).
    pub fn users(&self) -> &[SlotUser] {
        self.leased.users()
    }

    /// Free slots now.
    pub fn available(&self) -> usize {
        self.permits.available_permits()
    }

    /// Waits for a free slot.
    pub async fn acquire(&self) -> Result<Slot, tokio::sync::AcquireError> {
        let permit = self.permits.clone().acquire_owned().await?;
        // A permit guarantees a free identity: there are as many as permits.
        let user = self.free.lock().ok().and_then(|mut f| f.pop());
        Ok(Slot {
            _permit: permit,
            user,
            free: self.free.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_slot_s_uid_returns_to_the_pool_and_is_never_held_twice() {
        let dir = tempfile::tempdir().expect("dir");
        let leased = SlotUsers::lease(vm0_sandbox::slot_user::UidRange::default(), 2, dir.path())
            .expect("lease");
        let slots = Slots::new(2, leased);
        let a = slots.acquire().await.expect("a");
        let b = slots.acquire().await.expect("b");
        assert_ne!(a.user(), b.user());
        assert!(a.user().is_some());
        assert_eq!(slots.available(), 0);
        let uid_a = a.user();
        drop(a);
        let c = slots.acquire().await.expect("c");
        assert_eq!(c.user(), uid_a, "the freed uid is reused");
        assert_ne!(c.user(), b.user());
    }
}
