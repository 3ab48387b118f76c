//! What rabbitry's test binaries share, so each says only what it tests:
//!
//! - [`unique`]: names no other test (or run) uses;
//! - [`eventually`]: wait for a condition, with a limit, never a sleep;
//! - [`Proxy`]: a TCP proxy to the broker whose connections can be cut;
//! - [`broker`]: the broker under test and its own tools (`rabbitmqctl`);
//! - [`cluster`]: the three-node cluster of `scripts/cluster`;
//! - [`db`]: fresh SQLite files and PostgreSQL schemas;
//! - [`browser`]: a real headless Chromium through `chromedriver`.

pub mod broker;
pub mod browser;
pub mod cluster;
pub mod db;
mod proxy;

use std::future::Future;
use std::time::Duration;

pub use proxy::Proxy;

/// A name no other test uses: `test.{prefix}.{12 hex digits}`.
pub fn unique(prefix: &str) -> String {
    format!(
        "test.{prefix}.{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

/// Waits for `f` to be true, checking every 20 ms, for at most `limit`;
/// panics naming `what` when the limit passes.
pub async fn eventually<F, Fut>(limit: Duration, what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if f().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
