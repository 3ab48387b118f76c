//! The worker against the real broker and a real HTTP server: outcomes by
//! status, retries through delay queues, dead letters, replies,
//! concurrency, sites and bad input.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::IntoResponse;
use axum::Router;
use rabbitry::worker::{HandlerError, Meta, Msg, Reply, Retry, State, Worker};
use rabbitry::{
    Connection, Consumer, ConsumerSettings, ExchangeKind, HeaderValue, Message, Producer,
    ProducerSettings, Serializer, Settings,
};
use serde::Deserialize;

use crate::support::{connect, eventually, unique};

/// What the handlers saw: per routing key, the attempts in order.
#[derive(Clone, Default)]
struct Seen {
    calls: Arc<Mutex<HashMap<String, Vec<String>>>>,
}

impl Seen {
    fn record(&self, key: &str, attempt: &str) -> usize {
        let mut calls = self.calls.lock().unwrap();
        let v = calls.entry(key.to_owned()).or_default();
        v.push(attempt.to_owned());
        v.len()
    }
    fn count(&self, key: &str) -> usize {
        self.calls.lock().unwrap().get(key).map_or(0, Vec::len)
    }
    fn attempts(&self, key: &str) -> Vec<String> {
        self.calls
            .lock()
            .unwrap()
            .get(key)
            .cloned()
            .unwrap_or_default()
    }
}

/// The four behaviours, by routing key: `ok` 200, `bad` 400, `flaky` 500
/// twice then 200, `reply` 200 with a body.
fn behaviour(seen: &Seen, key: &str, attempt: &str) -> (StatusCode, &'static str) {
    let n = seen.record(key, attempt);
    match key {
        "ok" => (StatusCode::OK, ""),
        "bad" => (StatusCode::BAD_REQUEST, "missing field title"),
        "flaky" if n <= 2 => (StatusCode::INTERNAL_SERVER_ERROR, "database is down"),
        "flaky" => (StatusCode::OK, ""),
        "reply" => (StatusCode::OK, "pong"),
        _ => (StatusCode::NOT_FOUND, "unknown"),
    }
}

fn app(seen: Seen) -> Router {
    Router::new().fallback(move |headers: HeaderMap, uri: Uri, _body: Bytes| {
        let seen = seen.clone();
        async move {
            let h = |k: &str| {
                headers
                    .get(k)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_owned()
            };
            let key = h("amqp-routing-key");
            // The path follows the contract: /{connection}/{exchange}/{routing_key}[/{correlation_id}]
            // (the connection is `default` from a config file, or the
            // name of the Connection a worker built in code was given).
            let segments: Vec<&str> = uri.path().split('/').collect();
            assert!(
                segments.len() >= 4
                    && (segments[1] == "default" || segments[1].starts_with("test.conn."))
                    && segments[2].starts_with("test.shop."),
                "path {}",
                uri.path()
            );
            assert!(
                uri.path().contains(&format!("/{key}")),
                "path {}",
                uri.path()
            );
            let (status, body) = behaviour(&seen, &key, &h("amqp-attempt"));
            (status, [("content-type", "text/plain")], body).into_response()
        }
    })
}

async fn serve(app: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}")
}

fn settings(queue: &str, exchange: &str, extra: &str) -> Settings {
    Settings::from_toml(
        &format!(
            r##"
[worker]
shutdown_timeout = "5s"

[consumers.orders]
queue = "{queue}"
exchange = "{exchange}"
exchange_type = "topic"
routing_keys = ["#"]
retry = {{ attempts = 3, delays = ["100ms", "200ms"] }}
{extra}
"##
        ),
        "test.toml",
    )
    .unwrap()
}

/// The consumer the tests use: `orders` on `queue`, bound to `exchange`
/// (topic, `#`).
fn orders(queue: &str, exchange: &str) -> ConsumerSettings {
    ConsumerSettings::new(queue)
        .name("orders")
        .bind(exchange, ExchangeKind::Topic, &["#"])
}

/// A worker with the tests' short shutdown, whose `orders` consumer
/// retries three times, 100 and 200 ms apart, as `settings` says.
fn worker<S: Clone + Send + Sync + 'static>(conn: &Connection, state: S) -> Worker<S> {
    Worker::new(conn, state).shutdown_timeout(Duration::from_secs(5))
}

fn retry3() -> Retry {
    Retry::attempts(3).delays([Duration::from_millis(100), Duration::from_millis(200)])
}

async fn cleanup(conn: &Connection, queue: &str, exchange: &str) {
    // The tests' retry queues, and those of the default policy (workers
    // built from a configuration file).
    for q in [
        queue.to_owned(),
        format!("{queue}.dead"),
        format!("{queue}.retry.100ms"),
        format!("{queue}.retry.200ms"),
        format!("{queue}.retry.1s"),
        format!("{queue}.retry.5s"),
    ] {
        conn.delete_queue(&q).await.unwrap();
    }
    conn.delete_exchange(exchange).await.unwrap();
}

enum Kind {
    Url,
    Router,
    Native,
}

#[derive(Deserialize)]
struct Order {
    #[allow(dead_code)]
    title: String,
}

async fn four_cases(kind: Kind) {
    let conn = connect().await;
    let queue = unique("orders");
    let exchange = unique("shop");
    let seen = Seen::default();
    let running = match kind {
        // The configuration path: the TOML file, as `rabbitry worker` runs it.
        Kind::Url => {
            let extra = format!("handler = \"{}\"", serve(app(seen.clone())).await);
            settings(&queue, &exchange, &extra)
                .forwarding_worker()
                .await
                .unwrap()
                .start()
                .await
        }
        Kind::Router => {
            worker(&conn, ())
                .service(orders(&queue, &exchange), app(seen.clone()))
                .retry(retry3())
                .start()
                .await
        }
        Kind::Native => {
            worker(&conn, seen.clone())
                .consumer(
                    orders(&queue, &exchange),
                    |Msg(_order): Msg<Order>, meta: Meta, State(seen): State<Seen>| async move {
                        let (status, body) =
                            behaviour(&seen, &meta.routing_key, &meta.attempt.to_string());
                        match status.as_u16() {
                            200 if body.is_empty() => Ok(Reply::default()),
                            200 => Ok(Reply::new(body, "text/plain")),
                            400 => Err(HandlerError::invalid(body)),
                            _ => Err(HandlerError::retry(body)),
                        }
                    },
                )
                .retry(retry3())
                .start()
                .await
        }
    }
    .unwrap();

    let replies = unique("replies");
    let mut reply_consumer = Consumer::start(&conn, ConsumerSettings::new(&replies))
        .await
        .unwrap();
    let producer = Producer::new(&conn, ProducerSettings::new(&exchange, ExchangeKind::Topic))
        .await
        .unwrap();
    for key in ["ok", "bad", "flaky", "reply"] {
        let mut m = Message::encode(Serializer::Msgpack, &serde_json::json!({"title": key}))
            .unwrap()
            .routing_key(key);
        if key == "reply" {
            m = m.reply_to(&replies).correlation_id("corr-7");
        }
        producer.publish(m).await.unwrap();
    }

    let reply = tokio::time::timeout(Duration::from_secs(10), reply_consumer.next())
        .await
        .expect("a reply within 10 s")
        .unwrap();
    assert_eq!(&reply.body[..], b"pong");
    assert_eq!(reply.properties.correlation_id.as_deref(), Some("corr-7"));
    assert_eq!(reply.properties.content_type.as_deref(), Some("text/plain"));
    reply.ack().await.unwrap();

    eventually(
        Duration::from_secs(10),
        "flaky to be tried 3 times",
        || async { seen.count("flaky") == 3 },
    )
    .await;
    assert_eq!(
        seen.attempts("flaky"),
        ["1", "2", "3"],
        "the attempt number goes with each try"
    );
    let dead = format!("{queue}.dead");
    eventually(
        Duration::from_secs(10),
        "the 400 in the dead-letter queue",
        || async { conn.queue_status(&dead).await.unwrap().unwrap().messages == 1 },
    )
    .await;
    eventually(Duration::from_secs(10), "the queue to drain", || async {
        conn.queue_status(&queue).await.unwrap().unwrap().messages == 0
    })
    .await;
    // The worker counted what it did: ok, reply and the third flaky try were
    // acked; flaky failed twice into retry; the 400 was dead-lettered.
    let metrics = running.metrics();
    eventually(Duration::from_secs(10), "three acks counted", || async {
        metrics.outcomes("orders", rabbitry::worker::Counted::Ack) == 3
    })
    .await;
    use rabbitry::worker::Counted;
    assert_eq!(metrics.outcomes("orders", Counted::Retry), 2);
    assert_eq!(metrics.outcomes("orders", Counted::DeadLetter), 1);
    assert_eq!(metrics.handler_runs("orders"), 6);
    running.shutdown().await;
    assert_eq!(seen.count("ok"), 1, "a 200 is handled once");
    assert_eq!(seen.count("bad"), 1, "a 400 is requested exactly once");
    assert_eq!(seen.count("flaky"), 3, "acked after the third try");
    assert_eq!(seen.count("reply"), 1);

    let letters = rabbitry::worker::dead::list(&conn, &queue, 10)
        .await
        .unwrap();
    assert_eq!(letters.len(), 1, "only the 400 is dead");
    let l = &letters[0];
    assert!(
        l.error.as_deref().unwrap().contains("missing field title"),
        "{l:?}"
    );
    assert_eq!(l.original_routing_key.as_deref(), Some("bad"));
    assert_eq!(l.original_exchange.as_deref(), Some(exchange.as_str()));
    assert_eq!(l.attempts, Some(1));
    assert!(l.failed_at.as_deref().unwrap().ends_with('Z'));
    cleanup(&conn, &queue, &exchange).await;
    conn.delete_queue(&replies).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_handler_outcomes_by_status() {
    four_cases(Kind::Url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn axum_router_outcomes_by_status() {
    four_cases(Kind::Router).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_handler_outcomes() {
    four_cases(Kind::Native).await;
}

#[derive(Deserialize)]
struct Typed {
    #[allow(dead_code)]
    id: u32,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_body_and_panics_are_dead_lettered_while_others_are_served() {
    let conn = connect().await;
    let queue = unique("bad");
    let exchange = unique("ex");
    let handled = Arc::new(AtomicUsize::new(0));
    let running = worker(&conn, handled.clone())
        .consumer(
            orders(&queue, &exchange),
            |Msg(_t): Msg<Typed>, meta: Meta, State(n): State<Arc<AtomicUsize>>| async move {
                if meta.routing_key == "panic" {
                    panic!("the handler blew up");
                }
                n.fetch_add(1, Ordering::SeqCst);
            },
        )
        .retry(retry3())
        .start()
        .await
        .unwrap();
    let producer = Producer::new(&conn, ProducerSettings::new(&exchange, ExchangeKind::Topic))
        .await
        .unwrap();
    let send = |key: &'static str, body: serde_json::Value| {
        let producer = producer.clone();
        async move {
            producer
                .publish(
                    Message::encode(Serializer::Msgpack, &body)
                        .unwrap()
                        .routing_key(key),
                )
                .await
                .unwrap()
        }
    };
    send("undecodable", serde_json::json!({"title": "no id"})).await;
    send("panic", serde_json::json!({"id": 1})).await;
    send("ok", serde_json::json!({"id": 2})).await;
    send("ok", serde_json::json!({"id": 3})).await;

    let dead = format!("{queue}.dead");
    eventually(Duration::from_secs(10), "two dead letters", || async {
        conn.queue_status(&dead).await.unwrap().unwrap().messages == 2
    })
    .await;
    assert_eq!(
        handled.load(Ordering::SeqCst),
        2,
        "the good messages were served"
    );
    running.shutdown().await;
    let letters = rabbitry::worker::dead::list(&conn, &queue, 10)
        .await
        .unwrap();
    let by_key: HashMap<_, _> = letters
        .iter()
        .map(|l| (l.original_routing_key.clone().unwrap(), l.clone()))
        .collect();
    let undecodable = &by_key["undecodable"];
    let reason = undecodable.error.as_deref().unwrap();
    assert!(
        reason.contains("does not decode") && reason.contains("missing field `id`"),
        "{reason}"
    );
    assert_eq!(undecodable.attempts, Some(1), "bad input is not retried");
    let panicked = &by_key["panic"];
    assert!(
        panicked
            .error
            .as_deref()
            .unwrap()
            .contains("the handler blew up"),
        "{panicked:?}"
    );
    assert_eq!(
        panicked.attempts,
        Some(3),
        "a panic is retried, then dead-lettered"
    );
    cleanup(&conn, &queue, &exchange).await;
}

/// (site, routing key) per handled message.
type SiteLog = Arc<Mutex<Vec<(String, String)>>>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn site_substitution_gives_each_site_its_own_queue() {
    let conn = connect().await;
    let exchange = unique("shop");
    let base = unique("site");
    let text = format!(
        "[consumers.orders]\nqueue = \"{base}.${{site}}.orders\"\nexchange = \"{exchange}\"\nexchange_type = \"topic\"\nrouting_keys = [\"${{site}}.order.*\"]\n"
    );
    let settings = Settings::from_toml(&text, "sites.toml").unwrap();
    let seen: SiteLog = Arc::default();
    let mut workers = Vec::new();
    for site in ["a", "b"] {
        // The typed pieces of a configuration file, given to the builder.
        let for_site = settings.for_site(site);
        let c = &for_site.consumers["orders"];
        let running = worker(&conn, seen.clone())
            .site(site)
            .consumer(
                c.consumer.clone(),
                |meta: Meta, State(seen): State<SiteLog>| async move {
                    seen.lock()
                        .unwrap()
                        .push((meta.site.unwrap_or_default(), meta.routing_key));
                },
            )
            .options(c.options.clone())
            .start()
            .await
            .unwrap();
        workers.push(running);
    }
    let producer = Producer::new(&conn, ProducerSettings::new(&exchange, ExchangeKind::Topic))
        .await
        .unwrap();
    for key in ["a.order.1", "b.order.1", "b.order.2"] {
        producer
            .publish(Message::new("x").routing_key(key))
            .await
            .unwrap();
    }
    eventually(Duration::from_secs(10), "3 messages handled", || async {
        seen.lock().unwrap().len() == 3
    })
    .await;
    for w in workers {
        w.shutdown().await;
    }
    let mut got = seen.lock().unwrap().clone();
    got.sort();
    assert_eq!(
        got,
        [
            ("a".to_owned(), "a.order.1".to_owned()),
            ("b".to_owned(), "b.order.1".to_owned()),
            ("b".to_owned(), "b.order.2".to_owned())
        ]
    );
    for site in ["a", "b"] {
        let q = format!("{base}.{site}.orders");
        cleanup(&conn, &q, &exchange).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_dead_letter_is_handled_successfully() {
    let conn = connect().await;
    let queue = unique("replay");
    let exchange = unique("ex");
    let fixed = Arc::new(AtomicUsize::new(0));
    let running = worker(&conn, fixed.clone())
        .consumer(
            orders(&queue, &exchange),
            |State(fixed): State<Arc<AtomicUsize>>, meta: Meta| async move {
                if fixed.load(Ordering::SeqCst) == 0 {
                    return Err(HandlerError::invalid("not ready yet"));
                }
                assert_eq!(meta.attempt, 1, "replay resets the attempts");
                fixed.fetch_add(1, Ordering::SeqCst);
                Ok(())
            },
        )
        .retry(retry3())
        .start()
        .await
        .unwrap();
    let producer = Producer::new(&conn, ProducerSettings::new(&exchange, ExchangeKind::Topic))
        .await
        .unwrap();
    producer
        .publish(Message::new("x").routing_key("order.1"))
        .await
        .unwrap();
    let dead = format!("{queue}.dead");
    eventually(Duration::from_secs(10), "the dead letter", || async {
        conn.queue_status(&dead).await.unwrap().unwrap().messages == 1
    })
    .await;
    fixed.store(1, Ordering::SeqCst);
    let n = rabbitry::worker::dead::replay(&conn, &queue, 10)
        .await
        .unwrap();
    assert_eq!(n, 1);
    eventually(
        Duration::from_secs(10),
        "the replayed message handled",
        || async { fixed.load(Ordering::SeqCst) == 2 },
    )
    .await;
    assert_eq!(conn.queue_status(&dead).await.unwrap().unwrap().messages, 0);
    running.shutdown().await;
    cleanup(&conn, &queue, &exchange).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_request_is_acked_without_handling_and_error_handler_takes_failures() {
    let conn = connect().await;
    let queue = unique("deadline");
    let exchange = unique("ex");
    let calls = Arc::new(AtomicUsize::new(0));
    let errors: Arc<Mutex<Vec<String>>> = Arc::default();
    let errors2 = errors.clone();
    let running = worker(&conn, calls.clone())
        .consumer(
            orders(&queue, &exchange),
            |State(calls): State<Arc<AtomicUsize>>, meta: Meta| async move {
                calls.fetch_add(1, Ordering::SeqCst);
                if meta.routing_key == "fail" {
                    return Err(HandlerError::retry("boom"));
                }
                Ok(())
            },
        )
        .retry(retry3())
        .on_error(&exchange, move |_d, e| {
            let errors = errors2.clone();
            async move { errors.lock().unwrap().push(e.message()) }
        })
        .start()
        .await
        .unwrap();
    let producer = Producer::new(&conn, ProducerSettings::new(&exchange, ExchangeKind::Topic))
        .await
        .unwrap();
    let past = rabbitry::clock::now_millis() - 1_000;
    producer
        .publish(
            Message::new("x")
                .routing_key("late")
                .header(rabbitry::headers::DEADLINE, HeaderValue::Int(past)),
        )
        .await
        .unwrap();
    producer
        .publish(Message::new("x").routing_key("fail"))
        .await
        .unwrap();
    producer
        .publish(Message::new("x").routing_key("ok"))
        .await
        .unwrap();
    eventually(Duration::from_secs(10), "two handled", || async {
        calls.load(Ordering::SeqCst) == 2
    })
    .await;
    eventually(Duration::from_secs(10), "the queue to drain", || async {
        conn.queue_status(&queue).await.unwrap().unwrap().messages == 0
    })
    .await;
    running.shutdown().await;
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "the expired request was not handled"
    );
    assert_eq!(
        *errors.lock().unwrap(),
        ["boom"],
        "the error handler got the failure"
    );
    let dead = conn
        .queue_status(&format!("{queue}.dead"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        dead.messages, 0,
        "with an error handler the message is acked, not dead-lettered"
    );
    cleanup(&conn, &queue, &exchange).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_deleted_under_a_running_worker_is_declared_again_and_consumed() {
    let conn = connect().await;
    let queue = unique("deleted");
    let exchange = unique("ex");
    let handled = Arc::new(AtomicUsize::new(0));
    let running = worker(&conn, handled.clone())
        .consumer(
            orders(&queue, &exchange),
            |State(handled): State<Arc<AtomicUsize>>| async move {
                handled.fetch_add(1, Ordering::SeqCst);
                Ok::<_, HandlerError>(())
            },
        )
        .retry(retry3())
        .start()
        .await
        .unwrap();
    let producer = Producer::new(&conn, ProducerSettings::new(&exchange, ExchangeKind::Topic))
        .await
        .unwrap();
    let publish = || async {
        producer
            .publish(Message::new("x").routing_key("order.1"))
            .await
            .unwrap()
    };
    publish().await;
    eventually(
        Duration::from_secs(5),
        "the first message handled",
        || async { handled.load(Ordering::SeqCst) == 1 },
    )
    .await;
    // Deleted by someone else: the broker cancels the worker's consumer.
    let other = connect().await;
    assert_eq!(conn.cancelled_consumers(), 0);
    other.delete_queue(&queue).await.unwrap();
    eventually(
        Duration::from_secs(10),
        "the queue declared again, with its consumer",
        || async {
            other
                .queue_status(&queue)
                .await
                .unwrap()
                .is_some_and(|s| s.consumers == 1)
        },
    )
    .await;
    assert_eq!(conn.cancelled_consumers(), 1, "counted once");
    publish().await;
    eventually(
        Duration::from_secs(5),
        "the next message handled",
        || async { handled.load(Ordering::SeqCst) == 2 },
    )
    .await;
    running.shutdown().await;
    other.close().await;
    cleanup(&conn, &queue, &exchange).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quorum_consumer_gets_quorum_retry_and_dead_queues_that_dead_letter_at_least_once() {
    use rabbitry::QueueType;
    use rabbitry_test_support::broker::queue_type_and_arguments;
    let conn = connect().await;
    let queue = unique("quorum");
    let exchange = unique("ex");
    let seen = Seen::default();
    let running = worker(&conn, seen.clone())
        .consumer(
            orders(&queue, &exchange).queue_type(QueueType::Quorum),
            |State(seen): State<Seen>, meta: Meta| async move {
                // Fails twice, through both delay queues, then succeeds.
                if seen.record("q", &meta.attempt.to_string()) < 3 {
                    return Err(HandlerError::retry("not yet"));
                }
                Ok(())
            },
        )
        .retry(retry3())
        .delivery_limit(3)
        .start()
        .await
        .unwrap();
    let info =
        |name: &str| queue_type_and_arguments(name).unwrap_or_else(|| panic!("no queue {name}"));
    let (kind, args) = info(&queue);
    assert_eq!(kind, "quorum", "{args}");
    for expected in [
        "{\"x-delivery-limit\",3}".to_owned(),
        format!("{{\"x-dead-letter-routing-key\",\"{queue}.dead\"}}"),
        "{\"x-dead-letter-strategy\",\"at-least-once\"}".to_owned(),
        "{\"x-overflow\",\"reject-publish\"}".to_owned(),
    ] {
        assert!(
            args.contains(&expected),
            "{queue}: {expected} not in {args}"
        );
    }
    assert_eq!(info(&format!("{queue}.dead")).0, "quorum");
    for delay in ["100ms", "200ms"] {
        let name = format!("{queue}.retry.{delay}");
        let (kind, args) = info(&name);
        assert_eq!(kind, "quorum", "{name}: {args}");
        for expected in [
            format!("{{\"x-dead-letter-routing-key\",\"{queue}\"}}"),
            "{\"x-dead-letter-strategy\",\"at-least-once\"}".to_owned(),
            "{\"x-overflow\",\"reject-publish\"}".to_owned(),
        ] {
            assert!(args.contains(&expected), "{name}: {expected} not in {args}");
        }
    }
    let producer = Producer::new(&conn, ProducerSettings::new(&exchange, ExchangeKind::Topic))
        .await
        .unwrap();
    producer
        .publish(Message::new("x").routing_key("order.1"))
        .await
        .unwrap();
    eventually(
        Duration::from_secs(10),
        "three attempts, through the quorum delay queues",
        || async { seen.count("q") == 3 },
    )
    .await;
    assert_eq!(seen.attempts("q"), ["1", "2", "3"]);
    running.shutdown().await;
    cleanup(&conn, &queue, &exchange).await;
}

#[tokio::test]
async fn a_delivery_limit_needs_a_quorum_queue_and_a_worker_refuses_streams() {
    use rabbitry::QueueType;
    let conn = connect().await;
    let queue = unique("limit");
    let handler = |_: Meta| async { Ok::<_, HandlerError>(()) };
    let err = worker(&conn, ())
        .consumer(ConsumerSettings::new(&queue), handler)
        .delivery_limit(3)
        .start()
        .await
        .expect_err("a classic queue with a delivery limit");
    assert!(
        err.to_string().contains("needs queue_type = quorum"),
        "{err}"
    );
    let err = worker(&conn, ())
        .consumer(
            ConsumerSettings::new(&queue).queue_type(QueueType::Stream),
            handler,
        )
        .start()
        .await
        .expect_err("a stream");
    assert!(err.to_string().contains("cannot consume a stream"), "{err}");
    assert!(
        conn.queue_status(&queue).await.unwrap().is_none(),
        "nothing declared for a refused worker"
    );
}
