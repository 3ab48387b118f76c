//! Background tasks: every task rabbitry spawns (a connection's supervisor,
//! a consumer, the publisher, an RPC client's reply reader, an outbox relay,
//! a worker's consumer loops) runs under one [`Background`] handle, with one
//! stop signal and one drop policy.
//!
//! **The stop signal** is a [`CancellationToken`]: the task's loops select
//! on [`CancellationToken::cancelled`] beside their work, so they stop at
//! the next point where stopping is safe, never halfway through a step.
//!
//! **The drop policy:** dropping the handle cancels the token and lets the
//! task finish on its own (it is not aborted): work that was handed over
//! (a publish waiting for its confirm, a delivery being settled) ends the
//! way stopping ends it, with an error or on the broker's side, never with
//! a half-written step. [`Background::stop`] cancels and waits;
//! [`Background::stop_within`] aborts what is still running at a deadline.

use std::future::Future;

use tokio::task::JoinHandle;
pub(crate) use tokio_util::sync::CancellationToken;

/// A spawned task and the token that asks it to stop.
#[derive(Debug)]
pub(crate) struct Background<T> {
    token: CancellationToken,
    handle: Option<JoinHandle<T>>,
}

impl<T: Send + 'static> Background<T> {
    /// Spawns `task` with a token of its own.
    pub(crate) fn spawn<F, Fut>(task: F) -> Self
    where
        F: FnOnce(CancellationToken) -> Fut,
        Fut: Future<Output = T> + Send + 'static,
    {
        Background::spawn_with(CancellationToken::new(), task)
    }

    /// Spawns `task` with `token` (a child token, to stop many at once).
    pub(crate) fn spawn_with<F, Fut>(token: CancellationToken, task: F) -> Self
    where
        F: FnOnce(CancellationToken) -> Fut,
        Fut: Future<Output = T> + Send + 'static,
    {
        let handle = tokio::spawn(task(token.clone()));
        Background {
            token,
            handle: Some(handle),
        }
    }

    /// Asks the task to stop and waits for it. `None` if it panicked.
    pub(crate) async fn stop(mut self) -> Option<T> {
        self.token.cancel();
        match self.handle.take() {
            Some(h) => h.await.ok(),
            None => None,
        }
    }

    /// Asks the task to stop and waits until `deadline`; what is still
    /// running then is aborted. `Err(())` when it had to be aborted.
    pub(crate) async fn stop_within(
        mut self,
        deadline: tokio::time::Instant,
    ) -> Result<Option<T>, ()> {
        self.token.cancel();
        let Some(mut h) = self.handle.take() else {
            return Ok(None);
        };
        match tokio::time::timeout_at(deadline, &mut h).await {
            Ok(r) => Ok(r.ok()),
            Err(_) => {
                h.abort();
                Err(())
            }
        }
    }
}

impl<T> Drop for Background<T> {
    fn drop(&mut self) {
        self.token.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn stop_ends_a_cooperative_task_and_drop_signals_it() {
        let task = Background::spawn(|token| async move {
            token.cancelled().await;
            7
        });
        assert_eq!(task.stop().await, Some(7));

        let (tx, rx) = tokio::sync::oneshot::channel();
        let task = Background::spawn(|token| async move {
            token.cancelled().await;
            let _ = tx.send("stopped");
        });
        drop(task);
        assert_eq!(
            rx.await,
            Ok("stopped"),
            "dropping the handle stops the task"
        );
    }

    #[tokio::test]
    async fn stop_within_aborts_what_ignores_the_signal() {
        let task = Background::spawn(|_token| async move {
            tokio::time::sleep(Duration::from_secs(3600)).await;
        });
        let deadline = tokio::time::Instant::now() + Duration::from_millis(50);
        assert!(task.stop_within(deadline).await.is_err());
    }
}
