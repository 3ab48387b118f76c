//! Traces across the broker: OpenTelemetry spans for publishing,
//! processing and RPC calls, named and attributed after the OpenTelemetry
//! semantic conventions for messaging (RabbitMQ), and the W3C trace
//! context (`traceparent`, `tracestate`) carried in AMQP headers.
//!
//! With the `otel` feature, rabbitry makes its spans with the global
//! tracer provider (`opentelemetry::global::set_tracer_provider`) under
//! the instrumentation scope `rabbitry`:
//!
//! | span | kind | where |
//! |---|---|---|
//! | `publish {exchange}:{routing_key}` | producer | every publish, ended at the confirm |
//! | `process {queue}` | consumer | every delivery a worker handles, ended at its settlement |
//! | `call {exchange}:{routing_key}` | client | an RPC call, ended at its reply or timeout |
//!
//! The default exchange is written `amq.default` in span names, as the
//! broker's management tools show it; the `messaging.destination.name`
//! attribute is then empty, as the conventions say.
//!
//! Parents. A publish is a child of the current context
//! (`opentelemetry::Context::current()`) when that holds a span, and
//! otherwise of the `traceparent` the message already carries: that is
//! how the relay's publish of an outbox row continues the trace of the
//! transaction that wrote it, since the outbox stores the writer's
//! context in the row. A worker runs the handler, its unit of work and its
//! reply inside the process span, so they are its children. A retried
//! message starts a new trace with a link to the attempt that failed, as
//! the conventions advise for messages sent again later.
//!
//! Apps that trace through the `tracing` crate bridge with
//! `tracing-opentelemetry`: `Span::current().context().attach()` (or
//! `FutureExt::with_context`) makes their span the parent of rabbitry's.
//!
//! Without the feature, every function here does nothing, and costs
//! nothing; `traceparent` headers are still forwarded unchanged to HTTP
//! handlers.

use std::future::Future;

use crate::connection::Connection;
use crate::message::Properties;

/// The W3C trace context header, in AMQP headers and HTTP requests.
pub const TRACEPARENT: &str = "traceparent";
/// The W3C vendor trace state header that goes with [`TRACEPARENT`].
pub const TRACESTATE: &str = "tracestate";

#[cfg(feature = "otel")]
pub use otel::{extract, inject};

/// Where a publish span hangs.
#[derive(Clone, Debug, Default)]
pub(crate) enum Parent {
    /// The current context if it holds a span, else the message's own
    /// `traceparent`, else a new trace.
    #[default]
    Inherit,
    /// A new trace that links to the given context: a retry.
    Linked(Link),
}

/// A reference to a span, for a link from another trace.
#[derive(Clone, Debug, Default)]
pub(crate) struct Link {
    #[cfg(feature = "otel")]
    context: Option<opentelemetry::trace::SpanContext>,
}

impl Link {
    /// The span that is current now (a worker's process span).
    pub(crate) fn current() -> Link {
        #[cfg(feature = "otel")]
        {
            use opentelemetry::trace::TraceContextExt;
            let cx = opentelemetry::Context::current();
            let sc = cx.span().span_context().clone();
            Link {
                context: sc.is_valid().then_some(sc),
            }
        }
        #[cfg(not(feature = "otel"))]
        Link {}
    }

    /// The span a message's `traceparent` header names.
    #[cfg_attr(not(feature = "otel"), allow(unused_variables))]
    pub(crate) fn from_headers(headers: &crate::message::Headers) -> Link {
        Link {
            #[cfg(feature = "otel")]
            context: otel::extract(headers),
        }
    }
}

/// One of rabbitry's spans, ended when dropped (or by [`Span::finish`]).
#[derive(Default)]
pub(crate) struct Span {
    #[cfg(feature = "otel")]
    inner: Option<opentelemetry::global::BoxedSpan>,
}

impl std::fmt::Debug for Span {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Span")
    }
}

impl Span {
    /// Ends the span; an error sets `error.type` to its kind's name.
    pub(crate) fn finish<T>(mut self, result: &crate::Result<T>) {
        if let Err(e) = result {
            self.fail(e.kind().name());
        }
    }

    /// Marks the span failed with `error.type` = `kind`.
    #[cfg_attr(not(feature = "otel"), allow(unused_variables))]
    pub(crate) fn fail(&mut self, kind: &str) {
        #[cfg(feature = "otel")]
        if let Some(span) = self.inner.as_mut() {
            use opentelemetry::trace::Span as _;
            span.set_attribute(opentelemetry::KeyValue::new("error.type", kind.to_owned()));
            span.set_status(opentelemetry::trace::Status::error(kind.to_owned()));
        }
    }
}

/// What a publish span describes.
#[cfg_attr(not(feature = "otel"), allow(dead_code))]
pub(crate) struct Publish<'a> {
    pub(crate) exchange: &'a str,
    pub(crate) routing_key: &'a str,
    /// The connection it goes out on (its node, for `server.*`).
    pub(crate) conn: &'a Connection,
}

/// Starts the span of one publish (`call` = an RPC call's client span)
/// and writes its context into the message's headers.
#[cfg_attr(not(feature = "otel"), allow(unused_variables))]
pub(crate) fn publish(
    properties: &mut Properties,
    body_size: usize,
    what: Publish<'_>,
    parent: &Parent,
    call: bool,
) -> Span {
    #[cfg(feature = "otel")]
    {
        otel::publish(properties, body_size, what, parent, call)
    }
    #[cfg(not(feature = "otel"))]
    Span {}
}

/// Writes the current context into `properties`' headers, when there is
/// one: an outbox row or a unit of work's message then continues the
/// trace it was written in, whenever it is published.
#[cfg_attr(not(feature = "otel"), allow(unused_variables))]
pub(crate) fn capture(properties: &mut Properties) {
    #[cfg(feature = "otel")]
    otel::capture(properties);
}

/// A context to run work in: a delivery's process span, or the trace an
/// HTTP request came with.
#[derive(Debug)]
pub(crate) struct Scope {
    #[cfg(feature = "otel")]
    context: opentelemetry::Context,
    /// Whether the context's span is rabbitry's, to end after the work.
    #[cfg(feature = "otel")]
    owned: bool,
}

/// What a process span says of a delivery: telemetry sits below the
/// consumers, so they describe their deliveries to it with this.
#[cfg_attr(not(feature = "otel"), allow(dead_code))]
pub(crate) struct Received<'a> {
    pub(crate) exchange: &'a str,
    pub(crate) routing_key: &'a str,
    pub(crate) properties: &'a crate::message::Properties,
    pub(crate) body_len: usize,
    pub(crate) queue: &'a str,
    pub(crate) delivery_tag: u64,
}

/// Starts the process span of a delivery, a child of the context its
/// headers carry.
#[cfg_attr(not(feature = "otel"), allow(unused_variables))]
pub(crate) fn process(delivery: Received<'_>, conn: &Connection) -> Scope {
    #[cfg(feature = "otel")]
    {
        Scope {
            context: otel::process(delivery, conn),
            owned: true,
        }
    }
    #[cfg(not(feature = "otel"))]
    Scope {}
}

/// The trace context an HTTP request carries in its `traceparent` and
/// `tracestate` headers, unless a span is current already (a tracing
/// layer in front of this one made it).
#[cfg(feature = "http")]
#[cfg_attr(not(feature = "otel"), allow(unused_variables))]
pub(crate) fn from_http(headers: &http::HeaderMap) -> Scope {
    #[cfg(feature = "otel")]
    {
        use opentelemetry::trace::TraceContextExt;
        let current = opentelemetry::Context::current();
        if current.has_active_span() {
            return Scope {
                context: current,
                owned: false,
            };
        }
        let mut carried = crate::message::Headers::new();
        for name in [TRACEPARENT, TRACESTATE] {
            if let Some(v) = headers.get(name).and_then(|v| v.to_str().ok()) {
                carried.insert(name.into(), v.into());
            }
        }
        let context = match otel::extract(&carried) {
            Some(sc) => current.with_remote_span_context(sc),
            None => current,
        };
        Scope {
            context,
            owned: false,
        }
    }
    #[cfg(not(feature = "otel"))]
    Scope {}
}

impl Scope {
    /// Runs `work` with this context current; a span of rabbitry's own
    /// ends after it.
    pub(crate) fn run<F: Future>(self, work: F) -> impl Future<Output = F::Output> {
        #[cfg(feature = "otel")]
        {
            use opentelemetry::context::FutureExt;
            use opentelemetry::trace::TraceContextExt;
            let Scope { context, owned } = self;
            async move {
                let out = work.with_context(context.clone()).await;
                if owned {
                    context.span().end();
                }
                out
            }
        }
        #[cfg(not(feature = "otel"))]
        work
    }
}

/// Marks the current process span failed with `error.type` = `kind`.
#[cfg_attr(not(feature = "otel"), allow(unused_variables))]
pub(crate) fn fail_current(kind: &str) {
    #[cfg(feature = "otel")]
    {
        use opentelemetry::trace::TraceContextExt;
        opentelemetry::Context::map_current(|cx| {
            let span = cx.span();
            span.set_attribute(opentelemetry::KeyValue::new("error.type", kind.to_owned()));
            span.set_status(opentelemetry::trace::Status::error(kind.to_owned()));
        });
    }
}

/// `work` with the current context carried into it, for a spawned task.
pub(crate) fn carry<F: Future>(work: F) -> impl Future<Output = F::Output> {
    #[cfg(feature = "otel")]
    {
        use opentelemetry::context::FutureExt;
        work.with_current_context()
    }
    #[cfg(not(feature = "otel"))]
    work
}

#[cfg(feature = "otel")]
mod otel {
    use std::borrow::Cow;
    use std::str::FromStr;

    use opentelemetry::global::{self, BoxedTracer};
    use opentelemetry::trace::{
        Link as OtelLink, Span as _, SpanContext, SpanId, SpanKind, TraceContextExt, TraceFlags,
        TraceId, TraceState, Tracer,
    };
    use opentelemetry::{Context, InstrumentationScope, KeyValue};

    use super::{Parent, Publish, Span, TRACEPARENT, TRACESTATE};
    use crate::connection::Connection;
    use crate::message::{HeaderValue, Headers, Properties};

    fn tracer() -> BoxedTracer {
        global::tracer_with_scope(
            InstrumentationScope::builder("rabbitry")
                .with_version(env!("CARGO_PKG_VERSION"))
                .build(),
        )
    }

    /// The span context a `traceparent` (and `tracestate`) header carries,
    /// if it is a valid W3C trace context.
    pub fn extract(headers: &Headers) -> Option<SpanContext> {
        let parent = headers.get(TRACEPARENT)?.as_str()?.trim();
        let mut parts = parent.split('-');
        let version = parts.next()?;
        let (trace_id, span_id, flags) = (parts.next()?, parts.next()?, parts.next()?);
        // Version 00 has exactly four fields; later versions may add more.
        let well_formed = version.len() == 2
            && version != "ff"
            && u8::from_str_radix(version, 16).is_ok()
            && (version != "00" || parts.next().is_none())
            && trace_id.len() == 32
            && span_id.len() == 16
            && flags.len() == 2
            && [trace_id, span_id, flags].iter().all(|p| {
                p.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            });
        if !well_formed {
            return None;
        }
        let trace_id = TraceId::from_hex(trace_id).ok()?;
        let span_id = SpanId::from_hex(span_id).ok()?;
        let flags = u8::from_str_radix(flags, 16).ok()? & TraceFlags::SAMPLED.to_u8();
        let state = headers
            .get(TRACESTATE)
            .and_then(HeaderValue::as_str)
            .and_then(|s| TraceState::from_str(s).ok())
            .unwrap_or_default();
        let sc = SpanContext::new(trace_id, span_id, TraceFlags::new(flags), true, state);
        sc.is_valid().then_some(sc)
    }

    /// Writes `context` as `traceparent` and `tracestate` headers.
    pub fn inject(context: &SpanContext, headers: &mut Headers) {
        if !context.is_valid() {
            return;
        }
        let parent = format!(
            "00-{}-{}-{:02x}",
            context.trace_id(),
            context.span_id(),
            context.trace_flags().to_u8() & TraceFlags::SAMPLED.to_u8()
        );
        headers.insert(TRACEPARENT.into(), HeaderValue::String(parent));
        let state = context.trace_state().header();
        if state.is_empty() {
            headers.remove(TRACESTATE);
        } else {
            headers.insert(TRACESTATE.into(), HeaderValue::String(state));
        }
    }

    pub(super) fn capture(properties: &mut Properties) {
        let cx = Context::current();
        let sc = cx.span().span_context().clone();
        inject(&sc, &mut properties.headers);
    }

    fn shown(exchange: &str) -> &str {
        if exchange.is_empty() {
            "amq.default"
        } else {
            exchange
        }
    }

    /// Attributes every rabbitry span carries.
    fn common(
        operation: &'static str,
        kind: &'static str,
        exchange: &str,
        routing_key: &str,
        properties: &Properties,
        body_size: usize,
        conn: &Connection,
    ) -> Vec<KeyValue> {
        let mut a = Vec::with_capacity(12);
        a.push(KeyValue::new("messaging.system", "rabbitmq"));
        a.push(KeyValue::new("messaging.operation.name", operation));
        a.push(KeyValue::new("messaging.operation.type", kind));
        a.push(KeyValue::new(
            "messaging.destination.name",
            exchange.to_owned(),
        ));
        a.push(KeyValue::new(
            "messaging.rabbitmq.destination.routing_key",
            routing_key.to_owned(),
        ));
        a.push(KeyValue::new(
            "messaging.message.body.size",
            body_size as i64,
        ));
        if let Some(id) = &properties.message_id {
            a.push(KeyValue::new("messaging.message.id", id.clone()));
        }
        if let Some(id) = &properties.correlation_id {
            a.push(KeyValue::new(
                "messaging.message.conversation_id",
                id.clone(),
            ));
        }
        // Read only here, when a span is made: no cost without the feature.
        if let Some(peer) = conn.peer() {
            a.push(KeyValue::new("server.address", peer.host));
            a.push(KeyValue::new("server.port", i64::from(peer.port)));
        }
        a
    }

    pub(super) fn publish(
        properties: &mut Properties,
        body_size: usize,
        what: Publish<'_>,
        parent: &Parent,
        call: bool,
    ) -> Span {
        let (parent_cx, links) = match parent {
            Parent::Inherit => {
                let current = Context::current();
                if current.has_active_span() {
                    (current, Vec::new())
                } else if let Some(sc) = extract(&properties.headers) {
                    (Context::new().with_remote_span_context(sc), Vec::new())
                } else {
                    (Context::new(), Vec::new())
                }
            }
            Parent::Linked(link) => {
                let links = link
                    .context
                    .iter()
                    .map(|sc| OtelLink::with_context(sc.clone()))
                    .collect();
                (Context::new(), links)
            }
        };
        let (operation, kind, span_kind) = if call {
            ("call", "send", SpanKind::Client)
        } else {
            ("publish", "send", SpanKind::Producer)
        };
        let name = format!("{operation} {}:{}", shown(what.exchange), what.routing_key);
        let attributes = common(
            operation,
            kind,
            what.exchange,
            what.routing_key,
            properties,
            body_size,
            what.conn,
        );
        let tracer = tracer();
        let span = tracer
            .span_builder(Cow::Owned(name))
            .with_kind(span_kind)
            .with_attributes(attributes)
            .with_links(links)
            .start_with_context(&tracer, &parent_cx);
        inject(span.span_context(), &mut properties.headers);
        Span { inner: Some(span) }
    }

    pub(super) fn process(d: super::Received<'_>, conn: &Connection) -> Context {
        let parent = match extract(&d.properties.headers) {
            Some(sc) => Context::new().with_remote_span_context(sc),
            None => Context::new(),
        };
        let mut attributes = common(
            "process",
            "process",
            d.exchange,
            d.routing_key,
            d.properties,
            d.body_len,
            conn,
        );
        attributes.push(KeyValue::new(
            "messaging.destination.subscription.name",
            d.queue.to_owned(),
        ));
        attributes.push(KeyValue::new(
            "messaging.rabbitmq.message.delivery_tag",
            d.delivery_tag as i64,
        ));
        let tracer = tracer();
        let span = tracer
            .span_builder(format!("process {}", d.queue))
            .with_kind(SpanKind::Consumer)
            .with_attributes(attributes)
            .start_with_context(&tracer, &parent);
        parent.with_span(span)
    }
}
