//! Traces across the broker (feature `otel`), checked with an in-memory
//! span exporter on the real broker: one trace from an HTTP request through
//! its outbox row, a restarted relay, a worker and the worker's reply; a
//! retry's new trace linked to the attempt that failed; and a
//! `traceparent` from another client reaching an HTTP handler unchanged.
//!
//! The tracer provider is process-wide, so these tests live in a binary of
//! their own, and each one looks only at the traces it started.

use std::sync::OnceLock;
use std::time::Duration;

use amqprs::channel::BasicPublishArguments;
use amqprs::connection::{Connection as RawConnection, OpenConnectionArguments};
use amqprs::{BasicProperties, FieldTable, FieldValue};
use axum::body::Body as HttpBody;
use axum::http::{HeaderMap, Request, StatusCode};
use axum::routing::post;
use axum::Router;
use opentelemetry::trace::{SpanId, SpanKind, TraceContextExt, TraceId, Tracer};
use opentelemetry::{Context, Value};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use rabbitry::outbox::{self, Database, Outbox, RelayOptions};
use rabbitry::web::PublishOnSuccessLayer;
use rabbitry::worker::{Body, HandlerError, Meta, Reply, Retry};
use rabbitry::{
    Connection, ConnectionSettings, Consumer, ConsumerSettings, Message, Producer,
    ProducerSettings, Queue, Topology, Worker,
};
use rabbitry_test_support::db::sqlite_url;
use rabbitry_test_support::{broker, eventually, unique};
use tower::ServiceExt;

/// The exporter every span of this test binary goes to.
fn exporter() -> &'static InMemorySpanExporter {
    static EXPORTER: OnceLock<InMemorySpanExporter> = OnceLock::new();
    EXPORTER.get_or_init(|| {
        let exporter = InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(exporter.clone())
            .build();
        opentelemetry::global::set_tracer_provider(provider);
        exporter
    })
}

/// The finished spans of `trace`.
fn spans_of(trace: TraceId) -> Vec<SpanData> {
    exporter()
        .get_finished_spans()
        .unwrap()
        .into_iter()
        .filter(|s| s.span_context.trace_id() == trace)
        .collect()
}

/// Waits until a finished span of `trace` is named `name`, and returns it.
async fn span_named(trace: TraceId, name: &str) -> SpanData {
    eventually(
        Duration::from_secs(20),
        &format!("span '{name}'"),
        || async { spans_of(trace).iter().any(|s| s.name == name) },
    )
    .await;
    spans_of(trace)
        .into_iter()
        .find(|s| s.name == name)
        .unwrap()
}

fn attribute(span: &SpanData, key: &str) -> Option<Value> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| kv.value.clone())
}

fn text(span: &SpanData, key: &str) -> String {
    match attribute(span, key) {
        Some(v) => v.as_str().into_owned(),
        None => panic!(
            "span '{}' has no attribute {key}: {:?}",
            span.name, span.attributes
        ),
    }
}

async fn connect() -> Connection {
    Connection::open(ConnectionSettings::new(broker::url()).name(unique("trace")))
        .await
        .expect("connect to the broker")
}

async fn declare_queue(conn: &Connection, name: &str) {
    let mut t = Topology::default();
    t.queue(Queue::durable(name));
    conn.declare(&t).await.unwrap();
}

/// A worker on `conn` whose consumer `svc` reads `queue`; it answers
/// "handled: BODY", and fails a message's first attempt when the body is
/// "fail once".
async fn echo_worker(conn: &Connection, queue: &str) -> rabbitry::worker::RunningWorker {
    Worker::new(conn, ())
        .consumer(
            ConsumerSettings::new(queue).name("svc"),
            |body: Body, meta: Meta| async move {
                if &body.0[..] == b"fail once" && meta.attempt == 1 {
                    return Err(HandlerError::retry("the first attempt fails"));
                }
                let text = format!("handled: {}", String::from_utf8_lossy(&body.0));
                Ok(Reply::new(text, "text/plain"))
            },
        )
        .retry(Retry::attempts(2).delays([Duration::from_millis(100)]))
        .shutdown_timeout(Duration::from_secs(5))
        .start()
        .await
        .unwrap()
}

async fn cleanup(conn: &Connection, queues: &[&str]) {
    for q in queues {
        for name in [
            q.to_string(),
            format!("{q}.dead"),
            format!("{q}.retry.100ms"),
        ] {
            conn.delete_queue(&name).await.unwrap();
        }
    }
}

/// The first delivery on `queue`, acked.
async fn first_delivery(conn: &Connection, queue: &str) -> rabbitry::Delivery {
    let mut consumer = Consumer::start(conn, ConsumerSettings::new(queue))
        .await
        .unwrap();
    let d = tokio::time::timeout(Duration::from_secs(20), consumer.next())
        .await
        .unwrap_or_else(|_| panic!("nothing arrived on {queue}"))
        .unwrap();
    d.ack().await.unwrap();
    d
}

fn trace_of(d: &rabbitry::Delivery) -> TraceId {
    rabbitry::telemetry::extract(&d.properties.headers)
        .unwrap_or_else(|| panic!("no valid traceparent in {:?}", d.properties.headers))
        .trace_id()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_follows_a_request_through_the_outbox_a_restarted_relay_a_worker_and_its_reply() {
    exporter();
    let conn = connect().await;
    let queue = unique("trace-svc");
    let replies = unique("trace-replies");
    declare_queue(&conn, &replies).await;
    let worker = echo_worker(&conn, &queue).await;

    let outbox = Outbox::connect(&sqlite_url()).await.unwrap();
    // The relay runs, and is stopped: the request's row waits for the next.
    let relay = outbox
        .spawn_relay(&conn, RelayOptions::default())
        .await
        .unwrap();
    relay.stop().await.unwrap();

    let app = {
        let (outbox, queue, replies) = (outbox.clone(), queue.clone(), replies.clone());
        Router::new()
            .route(
                "/orders",
                post(move || async move {
                    let Database::Sqlite(pool) = outbox.database() else {
                        unreachable!()
                    };
                    let mut tx = pool.begin().await.unwrap();
                    let request = Message::new("order 7")
                        .routing_key(&queue)
                        .reply_to(&replies)
                        .correlation_id("order-7");
                    let id = outbox::publish(&mut *tx, request).await.unwrap();
                    outbox.commit(tx).await.unwrap();
                    (StatusCode::CREATED, id)
                }),
            )
            .layer(PublishOnSuccessLayer::new())
    };
    // The browser's (or the gateway's) trace, as its HTTP header says.
    let trace = TraceId::from_hex(&uuid::Uuid::new_v4().simple().to_string()).unwrap();
    let root = SpanId::from_hex("00f067aa0ba902b7").unwrap();
    let response = app
        .oneshot(
            Request::post("/orders")
                .header("traceparent", format!("00-{trace}-{root}-01"))
                .body(HttpBody::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let message_id = String::from_utf8(
        axum::body::to_bytes(response.into_body(), 1024)
            .await
            .unwrap()
            .to_vec(),
    )
    .unwrap();
    assert_eq!(outbox.status().await.unwrap().pending, 1, "the row waits");

    // A new relay (a restarted process would do the same) publishes it.
    let relay = outbox
        .spawn_relay(&conn, RelayOptions::default())
        .await
        .unwrap();
    let reply = first_delivery(&conn, &replies).await;
    assert_eq!(&reply.body[..], b"handled: order 7");
    assert_eq!(
        trace_of(&reply),
        trace,
        "the reply carries the request's trace"
    );

    let published = span_named(trace, &format!("publish amq.default:{queue}")).await;
    let processed = span_named(trace, &format!("process {queue}")).await;
    let replied = span_named(trace, &format!("publish amq.default:{replies}")).await;
    println!(
        "trace {trace}: request {root} -> relay publish {} -> process {} -> reply {}",
        published.span_context.span_id(),
        processed.span_context.span_id(),
        replied.span_context.span_id()
    );

    assert_eq!(published.span_kind, SpanKind::Producer);
    assert_eq!(
        published.parent_span_id, root,
        "the row kept the request's context"
    );
    assert_eq!(text(&published, "messaging.system"), "rabbitmq");
    assert_eq!(text(&published, "messaging.operation.name"), "publish");
    assert_eq!(text(&published, "messaging.destination.name"), "");
    assert_eq!(
        text(&published, "messaging.rabbitmq.destination.routing_key"),
        queue
    );
    assert_eq!(text(&published, "messaging.message.id"), message_id);
    assert_eq!(
        text(&published, "messaging.message.conversation_id"),
        "order-7"
    );
    assert_eq!(text(&published, "server.address"), "127.0.0.1");
    assert_eq!(attribute(&published, "server.port"), Some(Value::I64(5672)));

    assert_eq!(processed.span_kind, SpanKind::Consumer);
    assert_eq!(processed.parent_span_id, published.span_context.span_id());
    assert_eq!(text(&processed, "messaging.operation.name"), "process");
    assert_eq!(
        text(&processed, "messaging.destination.subscription.name"),
        queue
    );
    assert_eq!(text(&processed, "messaging.message.id"), message_id);
    assert!(
        matches!(attribute(&processed, "messaging.rabbitmq.message.delivery_tag"), Some(Value::I64(t)) if t >= 1),
        "delivery tag: {:?}",
        processed.attributes
    );
    assert!(attribute(&processed, "error.type").is_none());

    assert_eq!(replied.span_kind, SpanKind::Producer);
    assert_eq!(replied.parent_span_id, processed.span_context.span_id());
    assert_eq!(
        text(&replied, "messaging.rabbitmq.destination.routing_key"),
        replies
    );
    assert_eq!(
        text(&replied, "messaging.message.conversation_id"),
        "order-7"
    );

    relay.stop().await.unwrap();
    worker.shutdown().await;
    cleanup(&conn, &[&queue, &replies]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_message_starts_a_new_trace_linked_to_the_attempt_that_failed() {
    exporter();
    let conn = connect().await;
    let queue = unique("trace-retry");
    let replies = unique("trace-retry-replies");
    declare_queue(&conn, &replies).await;
    let worker = echo_worker(&conn, &queue).await;
    let producer = Producer::new(&conn, ProducerSettings::default().routing_key(&queue))
        .await
        .unwrap();

    // The app's own span around the publish.
    let tracer = opentelemetry::global::tracer("app");
    let app_span = tracer.start("checkout");
    let cx = Context::current_with_span(app_span);
    let trace = cx.span().span_context().trace_id();
    {
        use opentelemetry::context::FutureExt;
        producer
            .publish(Message::new("fail once").reply_to(&replies))
            .with_context(cx.clone())
            .await
            .unwrap();
    }
    cx.span().end();

    let reply = first_delivery(&conn, &replies).await;
    assert_eq!(&reply.body[..], b"handled: fail once");
    let retry_trace = trace_of(&reply);
    assert_ne!(retry_trace, trace, "the retry is a new trace");

    // The first attempt failed, in the original trace.
    let failed = span_named(trace, &format!("process {queue}")).await;
    assert_eq!(text(&failed, "error.type"), "retry");
    // The retry's publish starts the new trace, linked to that attempt.
    let retried = exporter()
        .get_finished_spans()
        .unwrap()
        .into_iter()
        .find(|s| s.span_context.trace_id() == retry_trace && s.parent_span_id == SpanId::INVALID)
        .expect("the retry trace's root span");
    assert_eq!(retried.span_kind, SpanKind::Producer);
    assert_eq!(
        retried.links.links.len(),
        1,
        "one link: {:?}",
        retried.links
    );
    let link = &retried.links.links[0].span_context;
    assert_eq!(link.trace_id(), trace);
    assert_eq!(link.span_id(), failed.span_context.span_id());
    // The second attempt is processed in the new trace.
    let second = span_named(retry_trace, &format!("process {queue}")).await;
    assert!(attribute(&second, "error.type").is_none());
    println!(
        "original trace {trace}, failed attempt {}; retry trace {retry_trace}",
        failed.span_context.span_id()
    );

    worker.shutdown().await;
    cleanup(&conn, &[&queue, &replies]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_traceparent_from_another_client_reaches_the_http_handler_unchanged() {
    let conn = connect().await;
    let queue = unique("trace-http");
    let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
    let app = Router::new().fallback(move |headers: HeaderMap| {
        let seen_tx = seen_tx.clone();
        async move {
            let get = |k: &str| headers.get(k).map(|v| v.to_str().unwrap().to_owned());
            seen_tx
                .send((get("traceparent"), get("tracestate")))
                .unwrap();
            StatusCode::NO_CONTENT
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let worker = Worker::new(&conn, ())
        .forward(
            ConsumerSettings::new(&queue).name("svc"),
            format!("http://{addr}"),
        )
        .retry(Retry::attempts(2).delays([Duration::from_millis(100)]))
        .shutdown_timeout(Duration::from_secs(5))
        .start()
        .await
        .unwrap();

    // Another client (raw amqprs) publishes with a W3C trace context.
    let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let state = "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE";
    let raw = RawConnection::open(&OpenConnectionArguments::new(
        "127.0.0.1",
        5672,
        "guest",
        "guest",
    ))
    .await
    .unwrap();
    let ch = raw.open_channel(None).await.unwrap();
    let mut headers = FieldTable::new();
    headers.insert(
        "traceparent".try_into().unwrap(),
        FieldValue::S(parent.try_into().unwrap()),
    );
    headers.insert(
        "tracestate".try_into().unwrap(),
        FieldValue::S(state.try_into().unwrap()),
    );
    ch.basic_publish(
        BasicProperties::default().with_headers(headers).finish(),
        b"{}".to_vec(),
        BasicPublishArguments::new("", &queue),
    )
    .await
    .unwrap();

    let (got_parent, got_state) = tokio::time::timeout(Duration::from_secs(20), seen.recv())
        .await
        .expect("the handler was called")
        .unwrap();
    assert_eq!(got_parent.as_deref(), Some(parent));
    assert_eq!(got_state.as_deref(), Some(state));

    raw.close().await.unwrap();
    worker.shutdown().await;
    cleanup(&conn, &[&queue]).await;
}
