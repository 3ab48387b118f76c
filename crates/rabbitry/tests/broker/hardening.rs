//! What broke when rabbitry was tried by other clients and hostile input:
//! replies to direct reply-to and to missing queues, handlers that outlive
//! their timeout, cancelled RPC calls, errors that claimed to be retryable,
//! `${site}` left in names, and AMQP headers that HTTP cannot carry.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use amqprs::channel::{BasicConsumeArguments, BasicPublishArguments, ExchangeDeclareArguments};
use amqprs::connection::{Connection as RawConnection, OpenConnectionArguments};
use amqprs::{BasicProperties, FieldTable, FieldValue};
use axum::http::HeaderMap;
use axum::Router;
use rabbitry::rpc::{RpcClient, RpcSettings};
use rabbitry::worker::{HandlerError, Reply, Retry, State};
use rabbitry::{
    Connection, Consumer, ConsumerSettings, ErrorKind, ExchangeKind, Message, Producer,
    ProducerSettings, Settings, UnitOfWork, Worker,
};

use crate::support::{connect, eventually, unique};

async fn raw() -> RawConnection {
    RawConnection::open(&OpenConnectionArguments::new(
        "127.0.0.1",
        5672,
        "guest",
        "guest",
    ))
    .await
    .expect("raw connection")
}

/// A worker consumer named `svc` on `queue`, bound to `exchange` (topic,
/// `#`), as the demo's PDF service is bound to `service.tasks`.
fn svc(queue: &str, exchange: &str) -> ConsumerSettings {
    ConsumerSettings::new(queue)
        .name("svc")
        .bind(exchange, ExchangeKind::Topic, &["#"])
}

/// Two attempts, 100 ms apart.
fn quick_retry() -> Retry {
    Retry::attempts(2).delays([Duration::from_millis(100)])
}

/// A worker on `conn` with a short shutdown.
fn worker<S: Clone + Send + Sync + 'static>(conn: &Connection, state: S) -> Worker<S> {
    Worker::new(conn, state).shutdown_timeout(Duration::from_secs(5))
}

async fn cleanup(conn: &Connection, queue: &str, exchanges: &[&str]) {
    for q in [
        queue.to_owned(),
        format!("{queue}.dead"),
        format!("{queue}.retry.100ms"),
    ] {
        conn.delete_queue(&q).await.unwrap();
    }
    for e in exchanges {
        conn.delete_exchange(e).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raw_client_on_direct_reply_to_gets_the_workers_reply() {
    let conn = connect().await;
    let queue = unique("svc");
    let tasks = unique("tasks");
    let results = unique("results");
    // The reply exchange exists, as service.results does in the demo; a
    // reply to direct reply-to must not go through it.
    conn.declare_once(&{
        let mut t = rabbitry::Topology::default();
        t.exchange(rabbitry::Exchange::new(&results, ExchangeKind::Direct));
        t
    })
    .await
    .unwrap();
    let running = worker(&conn, ())
        .consumer(
            svc(&queue, &tasks),
            |body: rabbitry::worker::Body| async move {
                Reply::new([b"echo:".as_slice(), &body.0].concat(), "text/plain")
            },
        )
        .retry(quick_retry())
        .reply_exchange(&results)
        .start()
        .await
        .unwrap();

    let raw = raw().await;
    let ch = raw.open_channel(None).await.unwrap();
    let (_, mut replies) = ch
        .basic_consume_rx(
            BasicConsumeArguments::new("amq.rabbitmq.reply-to", "")
                .auto_ack(true)
                .finish(),
        )
        .await
        .unwrap();
    let mut p = BasicProperties::default();
    p.with_reply_to("amq.rabbitmq.reply-to")
        .with_correlation_id("c-1")
        .with_content_type("text/plain");
    ch.basic_publish(
        p.finish(),
        b"hi".to_vec(),
        BasicPublishArguments::new(&tasks, "any.key"),
    )
    .await
    .unwrap();
    let reply = tokio::time::timeout(Duration::from_secs(10), replies.recv())
        .await
        .expect("the reply arrives on direct reply-to")
        .unwrap();
    assert_eq!(reply.content.unwrap(), b"echo:hi");
    assert_eq!(
        reply
            .basic_properties
            .unwrap()
            .correlation_id()
            .map(String::as_str),
        Some("c-1")
    );
    assert_eq!(
        running.metrics().replies_unroutable("svc"),
        0,
        "a delivered direct reply is not counted as unroutable"
    );
    let _ = raw.close().await;
    running.shutdown().await;
    cleanup(&conn, &queue, &[&tasks, &results]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_to_a_missing_queue_is_counted_and_the_request_acked_not_retried() {
    let conn = connect().await;
    let queue = unique("svc");
    let tasks = unique("tasks");
    let handled = Arc::new(AtomicUsize::new(0));
    let running = worker(&conn, handled.clone())
        .consumer(
            svc(&queue, &tasks),
            |State(n): State<Arc<AtomicUsize>>| async move {
                n.fetch_add(1, Ordering::SeqCst);
                Reply::new("pong", "text/plain")
            },
        )
        .retry(quick_retry())
        .start()
        .await
        .unwrap();
    let metrics = running.metrics();
    let producer = Producer::new(&conn, ProducerSettings::new(&tasks, ExchangeKind::Topic))
        .await
        .unwrap();
    producer
        .publish(
            Message::new("ping")
                .routing_key("k")
                .reply_to(unique("nobody-listens"))
                .correlation_id("c-404"),
        )
        .await
        .unwrap();
    eventually(
        Duration::from_secs(10),
        "the unroutable reply counted",
        || {
            let m = metrics.clone();
            async move { m.replies_unroutable("svc") == 1 }
        },
    )
    .await;
    eventually(Duration::from_secs(5), "the request acked", || {
        let m = metrics.clone();
        async move { m.outcomes("svc", rabbitry::worker::Counted::Ack) == 1 }
    })
    .await;
    assert_eq!(
        handled.load(Ordering::SeqCst),
        1,
        "handled once, not retried"
    );
    assert_eq!(metrics.outcomes("svc", rabbitry::worker::Counted::Retry), 0);
    running.shutdown().await;
    cleanup(&conn, &queue, &[&tasks]).await;
}

/// Counts handlers running at once: `enter` returns a guard that leaves
/// when dropped, which is also what cancelling a handler does.
#[derive(Clone, Default)]
struct Overlap {
    active: Arc<AtomicUsize>,
    max: Arc<AtomicUsize>,
    started: Arc<AtomicUsize>,
}

struct Inside(Arc<AtomicUsize>);

impl Drop for Inside {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Overlap {
    fn enter(&self) -> Inside {
        self.started.fetch_add(1, Ordering::SeqCst);
        let now = self.active.fetch_add(1, Ordering::SeqCst) + 1;
        self.max.fetch_max(now, Ordering::SeqCst);
        Inside(self.active.clone())
    }
}

/// An axum app that answers at once with a status and headers, then takes
/// longer than the worker's timeout to send its body: the handler is still
/// "inside" until its body is done or dropped (the connection closed).
fn slow_app(overlap: Overlap) -> Router {
    Router::new().fallback(move || {
        let inside = overlap.enter();
        async move {
            let body = futures_util::stream::once(async move {
                let _inside = inside;
                tokio::time::sleep(Duration::from_secs(5)).await;
                Ok::<_, std::convert::Infallible>(axum::body::Bytes::from("too late"))
            });
            axum::body::Body::from_stream(body)
        }
    })
}

async fn serve(app: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}")
}

enum Kind {
    Native,
    Tower,
    Http,
}

/// Two messages to a consumer with concurrency 1, a 300 ms timeout and two
/// attempts each, whose handler always outlives the timeout: four attempts
/// in all, and never two at once, because each timed-out handler is torn
/// down before the next attempt or message starts.
async fn timed_out_handlers_never_overlap(kind: Kind) {
    let conn = connect().await;
    let queue = unique("slow");
    let tasks = unique("tasks");
    let side_effects = unique("side-effects");
    let mut side_consumer = Consumer::start(&conn, ConsumerSettings::new(&side_effects))
        .await
        .unwrap();
    let side_producer = Producer::new(&conn, ProducerSettings::default())
        .await
        .unwrap();
    let overlap = Overlap::default();
    let built = worker(
        &conn,
        (overlap.clone(), side_producer, side_effects.clone()),
    );
    let built = match kind {
        Kind::Native => built.consumer(
            svc(&queue, &tasks),
            |unit: UnitOfWork, State((o, p, q)): State<(Overlap, Producer, String)>| async move {
                let _inside = o.enter();
                // Registered in the unit of work, which a cancelled handler
                // must never commit.
                unit.publish(&p, Message::new("side effect").routing_key(q))?;
                tokio::time::sleep(Duration::from_secs(5)).await;
                Ok::<_, HandlerError>(())
            },
        ),
        Kind::Tower => built.service(svc(&queue, &tasks), slow_app(overlap.clone())),
        Kind::Http => built.forward(svc(&queue, &tasks), serve(slow_app(overlap.clone())).await),
    };
    let worker = built
        .retry(quick_retry())
        .timeout(Duration::from_millis(300));
    let running = worker.start().await.unwrap();
    let producer = Producer::new(&conn, ProducerSettings::new(&tasks, ExchangeKind::Topic))
        .await
        .unwrap();
    for i in 0..2 {
        producer
            .publish(Message::new(format!("m{i}")).routing_key("k"))
            .await
            .unwrap();
    }
    let dead = format!("{queue}.dead");
    eventually(
        Duration::from_secs(20),
        "both messages dead-lettered",
        || {
            let conn = conn.clone();
            let dead = dead.clone();
            async move {
                conn.queue_status(&dead)
                    .await
                    .unwrap()
                    .is_some_and(|s| s.messages == 2)
            }
        },
    )
    .await;
    eventually(Duration::from_secs(5), "every handler torn down", || {
        let o = overlap.clone();
        async move { o.active.load(Ordering::SeqCst) == 0 }
    })
    .await;
    assert_eq!(
        overlap.started.load(Ordering::SeqCst),
        4,
        "2 messages × 2 attempts"
    );
    assert_eq!(
        overlap.max.load(Ordering::SeqCst),
        1,
        "a timed-out handler was still running when the next attempt started"
    );
    // Nothing of a cancelled native handler survives: its unit of work
    // never published.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), side_consumer.next())
            .await
            .is_err(),
        "a cancelled handler's publish went out"
    );
    running.shutdown().await;
    side_consumer.cancel().await;
    conn.delete_queue(&side_effects).await.unwrap();
    cleanup(&conn, &queue, &[&tasks]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_native_handler_is_cancelled_and_its_unit_of_work_rolled_back() {
    timed_out_handlers_never_overlap(Kind::Native).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_tower_service_is_cancelled() {
    timed_out_handlers_never_overlap(Kind::Tower).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_http_request_is_aborted_before_the_next_starts() {
    timed_out_handlers_never_overlap(Kind::Http).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_rpc_call_leaves_nothing_waiting() {
    let conn = connect().await;
    let queue = unique("silent");
    // A queue with no responder: the request is routed, no reply comes.
    conn.declare_once(&{
        let mut t = rabbitry::Topology::default();
        t.queue(rabbitry::Queue::durable(&queue));
        t
    })
    .await
    .unwrap();
    let client = RpcClient::new(&conn, RpcSettings::default()).await.unwrap();
    let call = client.call(Message::new("ping").routing_key(&queue), None);
    assert!(
        tokio::time::timeout(Duration::from_millis(300), call)
            .await
            .is_err(),
        "no reply expected"
    );
    assert_eq!(client.in_flight(), 0, "the dropped call left its entry");
    conn.delete_queue(&queue).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_queue_is_not_found_and_not_retryable() {
    let conn = connect().await;
    let mut cs = ConsumerSettings::new(unique("missing"));
    cs.auto_declare = false;
    let err = Consumer::start(&conn, cs).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    assert!(!err.is_retryable(), "{err}");
    assert!(err.to_string().contains("NOT_FOUND"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_placeholder_without_a_site_is_a_config_error_and_declares_nothing() {
    let conn = connect().await;
    let prefix = unique("site");
    let s = Settings::from_toml(
        &format!("[consumers.orders]\nqueue = \"{prefix}.${{site}}.orders\"\nhandler = \"http://127.0.0.1:9/\"\n"),
        "app.toml",
    )
    .unwrap();
    let Err(err) = s.forwarding_worker().await else {
        panic!("a worker was built with ${{site}} in a queue name");
    };
    assert_eq!(err.kind(), ErrorKind::Config);
    let text = err.to_string();
    assert!(
        text.contains("consumers.orders.queue") && text.contains("${site}"),
        "{text}"
    );
    assert!(conn
        .queue_status(&format!("{prefix}.${{site}}.orders"))
        .await
        .unwrap()
        .is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_from_another_client_reach_an_http_app_readably() {
    let conn = connect().await;
    let queue = unique("hdr");
    let tasks = unique("tasks");
    let seen: Arc<Mutex<Option<HeaderMap>>> = Arc::default();
    let store = seen.clone();
    let app = Router::new().fallback(move |headers: HeaderMap| {
        let store = store.clone();
        async move {
            *store.lock().unwrap() = Some(headers);
            ""
        }
    });
    let url = serve(app).await;
    let running = worker(&conn, ())
        .forward(svc(&queue, &tasks), url)
        .retry(quick_retry())
        .start()
        .await
        .unwrap();
    let raw = raw().await;
    let ch = raw.open_channel(None).await.unwrap();
    ch.exchange_declare(
        ExchangeDeclareArguments::new(&tasks, "topic")
            .passive(true)
            .finish(),
    )
    .await
    .unwrap();
    let mut headers = FieldTable::new();
    headers.insert("city".try_into().unwrap(), FieldValue::from("Zürich — €"));
    headers.insert(
        "price".try_into().unwrap(),
        FieldValue::D(amqprs::DecimalValue::new(2, 125)),
    );
    headers.insert(
        "evil".try_into().unwrap(),
        FieldValue::from("a\r\nX-Injected: 1"),
    );
    let mut p = BasicProperties::default();
    p.with_headers(headers);
    ch.basic_publish(
        p.finish(),
        b"{}".to_vec(),
        BasicPublishArguments::new(&tasks, "k"),
    )
    .await
    .unwrap();
    eventually(
        Duration::from_secs(10),
        "the HTTP app got the request",
        || {
            let seen = seen.clone();
            async move { seen.lock().unwrap().is_some() }
        },
    )
    .await;
    let h = seen.lock().unwrap().clone().unwrap();
    let get = |k: &str| h.get(k).map(|v| v.to_str().unwrap().to_owned());
    let city = get("amqp-header-city").expect("the non-ASCII header arrives");
    assert_eq!(
        rabbitry::worker::http::decode_header_text(&city).as_deref(),
        Some("Zürich — €")
    );
    assert_eq!(get("amqp-header-price").as_deref(), Some("1.25"));
    assert_eq!(
        get("amqp-header-evil").as_deref(),
        Some("a%0D%0AX-Injected: 1")
    );
    assert!(h.get("x-injected").is_none());
    let _ = raw.close().await;
    running.shutdown().await;
    cleanup(&conn, &queue, &[&tasks]).await;
}
