//! A tower layer that gives every web request a unit of work: messages
//! registered while the request is handled are published only if the
//! response is a success (2xx). This is the analog of Zope's transaction
//! per request.
//!
//! ```ignore
//! let app = Router::new()
//!     .route("/orders", post(create_order))   // takes Extension<UnitOfWork>
//!     .layer(PublishOnSuccessLayer::new());
//! ```
//!
//! If publishing fails after a 2xx (the broker is away longer than the
//! recovery timeout), the response becomes a 503 so the client knows the
//! work is incomplete. Messages that must not depend on the broker being
//! up belong in the [`outbox`](crate::outbox).

use std::task::{Context, Poll};

use http::{Request, Response, StatusCode};
use tower::{Layer, Service};

use crate::transaction::UnitOfWork;
use futures_util::future::BoxFuture;

/// Wraps a service in [`PublishOnSuccess`].
#[derive(Debug, Clone, Copy, Default)]
pub struct PublishOnSuccessLayer;

impl PublishOnSuccessLayer {
    /// The layer.
    pub fn new() -> Self {
        PublishOnSuccessLayer
    }
}

impl<S> Layer<S> for PublishOnSuccessLayer {
    type Service = PublishOnSuccess<S>;

    fn layer(&self, inner: S) -> Self::Service {
        PublishOnSuccess { inner }
    }
}

/// A service whose requests each carry a [`UnitOfWork`] in their
/// extensions, committed on 2xx and aborted otherwise.
#[derive(Debug, Clone)]
pub struct PublishOnSuccess<S> {
    inner: S,
}

impl<S, B, RB> Service<Request<B>> for PublishOnSuccess<S>
where
    S: Service<Request<B>, Response = Response<RB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
    RB: Default + Send + 'static,
{
    type Response = Response<RB>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Response<RB>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let unit = UnitOfWork::new();
        req.extensions_mut().insert(unit.clone());
        // The clone that was made ready is the one to call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        // The request's `traceparent` (when no tracing layer in front made
        // a span) becomes the parent of what the handler publishes.
        let scope = crate::telemetry::from_http(req.headers());
        Box::pin(scope.run(async move {
            let resp = inner.call(req).await?;
            if !resp.status().is_success() {
                unit.abort();
                return Ok(resp);
            }
            match unit.commit(None).await {
                Ok(_) => Ok(resp),
                Err(e) => {
                    tracing::error!(error = %e, "publishing the request's messages failed");
                    let mut failed = Response::new(RB::default());
                    *failed.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                    Ok(failed)
                }
            }
        }))
    }
}
