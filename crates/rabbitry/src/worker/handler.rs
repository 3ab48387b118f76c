//! Native handlers: async functions with extractors, in the axum manner.
//!
//! A handler is any `async fn` whose arguments implement [`FromContext`]
//! ([`Msg<T>`] for the decoded body, [`State<S>`] for shared state,
//! [`Meta`] for the delivery's properties and routing, [`UnitOfWork`] for
//! publishes that happen at commit) and whose result implements
//! [`IntoReply`]. Its error says which outcome a failure is:
//! [`HandlerError::conflict`] requeues at once, [`HandlerError::invalid`]
//! dead-letters at once, anything else is retried.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::codec::Serializer;
use crate::consume::Delivery;
use crate::error::{Error, ErrorKind};
use crate::message::Properties;
use crate::transaction::UnitOfWork;

/// A boxed future, as handlers return.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// What a failed handler wants done with the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// A conflict that trying again soon can resolve: retried after the
    /// shortest delay, counted against the retry budget like any retry.
    Conflict,
    /// Dead-letter at once: trying again cannot help (bad input).
    Invalid,
    /// Retry later through the delay queues.
    Retry,
}

impl FailureKind {
    /// `conflict`, `invalid` or `retry`: spans carry it as `error.type`.
    pub fn name(self) -> &'static str {
        match self {
            FailureKind::Conflict => "conflict",
            FailureKind::Invalid => "invalid",
            FailureKind::Retry => "retry",
        }
    }
}

/// Any error, boxed: what a [`HandlerError`] keeps as its cause.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What the worker was doing when an error happened, with the error as its
/// source: the worker's own failures wrap their cause this way instead of
/// formatting it into a string, so that [`HandlerError::find`] reaches it.
#[derive(Debug)]
pub(crate) struct Because {
    context: String,
    cause: BoxError,
}

impl Because {
    pub(crate) fn new(context: impl Into<String>, cause: impl Into<BoxError>) -> Self {
        Because {
            context: context.into(),
            cause: cause.into(),
        }
    }
}

impl std::fmt::Display for Because {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.context)
    }
}

impl std::error::Error for Because {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.cause)
    }
}

/// A handler's failure: what to do with the message, and the error that
/// caused it, kept with its sources.
///
/// `?` turns any error into one: a rabbitry decode error (a body that does
/// not decode) dead-letters, everything else is retried. [`ResultExt`]
/// says otherwise where a handler knows better:
/// `serde_json::from_slice(&body).invalid()?`.
///
/// Like `anyhow::Error`, it is not itself a `std::error::Error`, so that
/// `?` can convert every error into it.
pub struct HandlerError {
    kind: FailureKind,
    error: BoxError,
}

impl HandlerError {
    /// A conflict: the message is retried after the shortest delay (never
    /// requeued in a loop), and dead-lettered once the budget is spent.
    pub fn conflict(error: impl Into<BoxError>) -> Self {
        HandlerError::new(FailureKind::Conflict, error)
    }

    /// Bad input: the message is dead-lettered at once.
    pub fn invalid(error: impl Into<BoxError>) -> Self {
        HandlerError::new(FailureKind::Invalid, error)
    }

    /// A transient failure: the message is retried after a delay.
    pub fn retry(error: impl Into<BoxError>) -> Self {
        HandlerError::new(FailureKind::Retry, error)
    }

    /// A failure of `kind` caused by `error`.
    pub fn new(kind: FailureKind, error: impl Into<BoxError>) -> Self {
        HandlerError {
            kind,
            error: error.into(),
        }
    }

    /// What to do with the message.
    pub fn kind(&self) -> FailureKind {
        self.kind
    }

    /// The error that caused the failure (its sources hang off it).
    pub fn error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        &*self.error
    }

    /// The first error of type `E` in the chain: the cause itself or one
    /// of its sources. An error handler finds the [`rabbitry::Error`](crate::Error)
    /// behind a failed publish this way, with its kind.
    pub fn find<E: std::error::Error + 'static>(&self) -> Option<&E> {
        let mut next: Option<&(dyn std::error::Error + 'static)> = Some(self.error());
        while let Some(e) = next {
            if let Some(found) = e.downcast_ref::<E>() {
                return Some(found);
            }
            next = e.source();
        }
        None
    }

    /// The cause and its sources, each once: what goes into
    /// `x-rabbitry-error` and the logs.
    pub fn message(&self) -> String {
        let mut out = self.error.to_string();
        let mut next = self.error.source();
        while let Some(cause) = next {
            let text = cause.to_string();
            if !out.contains(&text) {
                out.push_str(": ");
                out.push_str(&text);
            }
            next = cause.source();
        }
        out
    }
}

impl std::fmt::Debug for HandlerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HandlerError")
            .field("kind", &self.kind)
            .field("error", &self.error)
            .finish()
    }
}

impl std::fmt::Display for HandlerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message())
    }
}

impl<E: std::error::Error + Send + Sync + 'static> From<E> for HandlerError {
    fn from(e: E) -> Self {
        let error: BoxError = Box::new(e);
        let kind = match error.downcast_ref::<Error>().map(Error::kind) {
            Some(ErrorKind::Codec | ErrorKind::Invalid) => FailureKind::Invalid,
            _ => FailureKind::Retry,
        };
        HandlerError { kind, error }
    }
}

/// Says which outcome an error is, where `?` would otherwise retry:
/// `parse(&body).invalid()?` dead-letters, `lock().conflict()?` requeues.
pub trait ResultExt<T> {
    /// An error here is bad input: dead-letter the message at once.
    fn invalid(self) -> Result<T, HandlerError>;
    /// An error here is a conflict: requeue the message at once.
    fn conflict(self) -> Result<T, HandlerError>;
    /// An error here is transient: retry the message after a delay.
    fn retry(self) -> Result<T, HandlerError>;
}

impl<T, E: Into<BoxError>> ResultExt<T> for Result<T, E> {
    fn invalid(self) -> Result<T, HandlerError> {
        self.map_err(HandlerError::invalid)
    }
    fn conflict(self) -> Result<T, HandlerError> {
        self.map_err(HandlerError::conflict)
    }
    fn retry(self) -> Result<T, HandlerError> {
        self.map_err(HandlerError::retry)
    }
}

/// A handler's successful result: nothing, or a body to send as the reply
/// when the delivery has `reply_to`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Reply {
    /// The reply body; empty means no reply.
    pub body: Vec<u8>,
    /// Its content type.
    pub content_type: Option<String>,
    /// Headers the reply message carries.
    pub headers: crate::message::Headers,
}

impl Reply {
    /// A reply with this body and content type.
    pub fn new(body: impl Into<Vec<u8>>, content_type: impl Into<String>) -> Self {
        Reply {
            body: body.into(),
            content_type: Some(content_type.into()),
            headers: crate::message::Headers::new(),
        }
    }

    /// Adds a header to the reply message.
    pub fn header(
        mut self,
        name: impl Into<String>,
        value: impl Into<crate::message::HeaderValue>,
    ) -> Self {
        self.headers.insert(name.into(), value.into());
        self
    }

    /// `value` encoded with `serializer`.
    pub fn encode<T: Serialize + ?Sized>(
        serializer: Serializer,
        value: &T,
    ) -> Result<Self, HandlerError> {
        Ok(Reply::new(
            serializer.encode(value)?,
            serializer.content_type(),
        ))
    }
}

/// Turns a handler's return value into a reply or a failure.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be a handler's result",
    label = "a handler returns (), Reply, Json<T>, Msgpack<T>, or a Result of those",
    note = "errors in a Result must convert into HandlerError: any std::error::Error does, and HandlerError::{{retry, invalid, conflict}} build one"
)]
pub trait IntoReply {
    /// The conversion.
    fn into_reply(self) -> Result<Reply, HandlerError>;
}

impl IntoReply for () {
    fn into_reply(self) -> Result<Reply, HandlerError> {
        Ok(Reply::default())
    }
}

impl IntoReply for Reply {
    fn into_reply(self) -> Result<Reply, HandlerError> {
        Ok(self)
    }
}

impl<T: IntoReply, E: Into<HandlerError>> IntoReply for Result<T, E> {
    fn into_reply(self) -> Result<Reply, HandlerError> {
        self.map_err(Into::into).and_then(IntoReply::into_reply)
    }
}

/// A JSON reply.
#[derive(Debug, Clone)]
pub struct Json<T>(pub T);

impl<T: Serialize> IntoReply for Json<T> {
    fn into_reply(self) -> Result<Reply, HandlerError> {
        Reply::encode(Serializer::Json, &self.0)
    }
}

/// A msgpack reply.
#[derive(Debug, Clone)]
pub struct Msgpack<T>(pub T);

impl<T: Serialize> IntoReply for Msgpack<T> {
    fn into_reply(self) -> Result<Reply, HandlerError> {
        Reply::encode(Serializer::Msgpack, &self.0)
    }
}

/// Everything a handler can extract from.
#[derive(Clone, Debug)]
pub struct Context {
    pub(crate) delivery: Arc<Delivery>,
    pub(crate) meta: Meta,
    pub(crate) unit: UnitOfWork,
}

/// Where a delivery came from and how: its routing, properties, attempt,
/// and the worker's site and user.
#[derive(Debug, Clone)]
pub struct Meta {
    /// The exchange it was first published to (kept across retries).
    pub exchange: String,
    /// The routing key it was first published with (kept across retries).
    pub routing_key: String,
    /// The queue it was consumed from.
    pub queue: String,
    /// The connection's name.
    pub connection: String,
    /// Delivered before.
    pub redelivered: bool,
    /// 1 for the first attempt, 2 for the first retry...
    pub attempt: u32,
    /// The worker's site.
    pub site: Option<String>,
    /// The worker's user.
    pub user: Option<String>,
    /// The message's properties.
    pub properties: Properties,
}

/// Builds a handler argument from the delivery and the shared state.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be a handler's argument",
    label = "not an extractor",
    note = "handler arguments are Msg<T>, Body, Meta, Properties, UnitOfWork or State<S> (with S the worker's state type)"
)]
pub trait FromContext<S>: Sized {
    /// The extraction; an error fails the delivery with that error.
    fn from_context(ctx: &Context, state: &S) -> Result<Self, HandlerError>;
}

/// The body, decoded by its content type into `T`. A body that does not
/// decode dead-letters the message with the decode error as the reason.
#[derive(Debug, Clone)]
pub struct Msg<T>(pub T);

impl<S, T: DeserializeOwned> FromContext<S> for Msg<T> {
    fn from_context(ctx: &Context, _: &S) -> Result<Self, HandlerError> {
        ctx.delivery.decode::<T>().map(Msg).map_err(|e| {
            HandlerError::invalid(Because::new(
                format!("body does not decode into {}", std::any::type_name::<T>()),
                e,
            ))
        })
    }
}

/// Shared state given to [`Worker::new`](crate::worker::Worker::new).
#[derive(Debug, Clone)]
pub struct State<S>(pub S);

impl<S: Clone> FromContext<S> for State<S> {
    fn from_context(_: &Context, state: &S) -> Result<Self, HandlerError> {
        Ok(State(state.clone()))
    }
}

impl<S> FromContext<S> for Meta {
    fn from_context(ctx: &Context, _: &S) -> Result<Self, HandlerError> {
        Ok(ctx.meta.clone())
    }
}

impl<S> FromContext<S> for Properties {
    fn from_context(ctx: &Context, _: &S) -> Result<Self, HandlerError> {
        Ok(ctx.meta.properties.clone())
    }
}

impl<S> FromContext<S> for UnitOfWork {
    fn from_context(ctx: &Context, _: &S) -> Result<Self, HandlerError> {
        Ok(ctx.unit.clone())
    }
}

/// The raw body.
#[derive(Debug, Clone)]
pub struct Body(pub bytes::Bytes);

impl<S> FromContext<S> for Body {
    fn from_context(ctx: &Context, _: &S) -> Result<Self, HandlerError> {
        Ok(Body(ctx.delivery.body.clone()))
    }
}

/// An async function usable as a handler, with arguments `T`.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a rabbitry handler",
    label = "not a handler for this worker",
    note = "a handler is a Clone + Send + Sync async fn or closure with up to 5 arguments, each an extractor (Msg<T>, Body, Meta, Properties, UnitOfWork, State<S>), returning (), Reply, Json<T>, Msgpack<T> or a Result of those",
    note = "its future must be Send: do not hold a non-Send value (a std MutexGuard, an Rc) across an .await"
)]
pub trait Handler<T, S>: Clone + Send + Sync + 'static {
    /// Runs the handler.
    fn call(&self, ctx: Context, state: S) -> BoxFuture<Result<Reply, HandlerError>>;
}

macro_rules! impl_handler {
    ($($t:ident),*) => {
        impl<F, Fut, R, S, $($t,)*> Handler<($($t,)*), S> for F
        where
            F: Fn($($t),*) -> Fut + Clone + Send + Sync + 'static,
            Fut: Future<Output = R> + Send + 'static,
            R: IntoReply,
            S: Send + Sync + 'static,
            $($t: FromContext<S> + Send + 'static,)*
        {
            #[allow(non_snake_case, unused_variables)]
            fn call(&self, ctx: Context, state: S) -> BoxFuture<Result<Reply, HandlerError>> {
                $(
                    let $t = match $t::from_context(&ctx, &state) {
                        Ok(v) => v,
                        Err(e) => return Box::pin(async move { Err(e) }),
                    };
                )*
                let fut = (self)($($t),*);
                Box::pin(async move { fut.await.into_reply() })
            }
        }
    };
}

impl_handler!();
impl_handler!(T1);
impl_handler!(T1, T2);
impl_handler!(T1, T2, T3);
impl_handler!(T1, T2, T3, T4);
impl_handler!(T1, T2, T3, T4, T5);

/// A handler with its argument types erased.
pub(crate) type BoxHandler<S> =
    Arc<dyn Fn(Context, S) -> BoxFuture<Result<Reply, HandlerError>> + Send + Sync>;

pub(crate) fn boxed<H, T, S>(handler: H) -> BoxHandler<S>
where
    H: Handler<T, S>,
    T: 'static,
{
    Arc::new(move |ctx, state| handler.call(ctx, state))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Outer(std::io::Error);
    impl std::fmt::Display for Outer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("saving the order")
        }
    }
    impl std::error::Error for Outer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    fn question_mark<E: std::error::Error + Send + Sync + 'static>(
        e: E,
    ) -> Result<(), HandlerError> {
        Err(e)?
    }

    #[test]
    fn question_mark_retries_any_error_and_keeps_its_cause() {
        let io = std::io::Error::new(std::io::ErrorKind::TimedOut, "database timed out");
        let e = question_mark(Outer(io)).unwrap_err();
        assert_eq!(e.kind(), FailureKind::Retry);
        assert_eq!(e.message(), "saving the order: database timed out");
        assert!(e.error().source().is_some(), "the source is kept");
    }

    #[test]
    fn decode_errors_dead_letter_and_helpers_classify() {
        let decode = Serializer::Json.decode::<u32>(b"{").unwrap_err();
        assert_eq!(
            question_mark(decode).unwrap_err().kind(),
            FailureKind::Invalid
        );
        let parsed: Result<u32, _> = "x".parse::<u32>();
        assert_eq!(
            parsed.clone().invalid().unwrap_err().kind(),
            FailureKind::Invalid
        );
        assert_eq!(
            parsed.clone().conflict().unwrap_err().kind(),
            FailureKind::Conflict
        );
        assert_eq!(parsed.retry().unwrap_err().kind(), FailureKind::Retry);
        assert_eq!(HandlerError::invalid("no title").message(), "no title");
    }

    #[test]
    fn a_wrapped_cause_is_found_by_type_and_printed_once() {
        let cause = Error::new(ErrorKind::Unroutable, "exchange '', routing key 'x'")
            .with_source(std::io::Error::other("NO_ROUTE"));
        let err = HandlerError::retry(Because::new("publishing the reply failed", cause));
        assert_eq!(
            err.find::<Error>().map(Error::kind),
            Some(ErrorKind::Unroutable)
        );
        assert_eq!(
            err.find::<std::io::Error>()
                .map(ToString::to_string)
                .as_deref(),
            Some("NO_ROUTE")
        );
        assert_eq!(
            err.message(),
            "publishing the reply failed: unroutable message: exchange '', routing key 'x': NO_ROUTE"
        );
    }
}
