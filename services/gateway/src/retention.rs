//! Retention: every gateway deletes, now and then, the events, logs and metrics
//! of runs that ended more than `VM0_RUN_RECORDS_RETENTION_DAYS` ago. The run
//! objects stay; reading a purged run's records is `400 invalid_state` saying
//! when they went. Concurrent gateways are safe: a run is marked and emptied in
//! one transaction, once.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use vm0_api_types::Timestamp;
use vm0_db::Store;

use crate::error::ErrorChain;

/// Runs read per query (each is emptied in a transaction of its own); a pass
/// goes on until none is due.
const PAGE: u64 = 100;

pub async fn run(store: Store, keep: Duration, every: Duration, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        match pass(&store, keep, &shutdown).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                runs = n,
                "retention: deleted the records of runs ended long ago"
            ),
            Err(e) => tracing::warn!(error = %ErrorChain(&e), "retention pass failed"),
        }
    }
}

/// Empties every run due now; returns how many.
pub async fn pass(
    store: &Store,
    keep: Duration,
    shutdown: &CancellationToken,
) -> Result<usize, vm0_db::StoreError> {
    let now = Timestamp::now().micros();
    let cutoff = now.saturating_sub(i64::try_from(keep.as_micros()).unwrap_or(i64::MAX));
    let mut total = 0;
    while !shutdown.is_cancelled() {
        let purged = store.purge_run_records(cutoff, PAGE, now).await?;
        total += purged.len();
        if (purged.len() as u64) < PAGE {
            break;
        }
    }
    Ok(total)
}

/// The error for reading records retention deleted.
pub fn purged_error(what: &str, purged_at: i64) -> crate::error::ApiError {
    crate::error::ApiError::invalid_state(format!(
        "this run's {what} were deleted on {} (VM0_RUN_RECORDS_RETENTION_DAYS: records of ended \
         runs are kept that many days); the run itself is still here",
        Timestamp(purged_at).to_rfc3339()
    ))
}
