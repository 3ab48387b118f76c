//! rabbitry's parts on the in-memory broker (`memory://NAME`), through the
//! same `Connection` as on RabbitMQ: the worker with its retry queues under
//! tokio's paused clock, RPC with both kinds of reply queue, recovery after
//! a cut, and the README's handler test. Every test here is named
//! `in_memory_*` and needs no broker and no network (`unshare -n` runs
//! them).

use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use rabbitry::rpc::{ReplyQueue, RpcClient, RpcSettings};
use rabbitry::testing::TestBroker;
use rabbitry::worker::{
    dead, Counted, HandlerError, Json, Msg, PartitionKey, Retry, State, Worker,
};
use rabbitry::{
    Consumer, ConsumerSettings, ExchangeKind, Message, Producer, ProducerSettings, Serializer,
};

/// The README's handler test, verbatim (its tests' paths hold `in_memory`).
#[path = "readme/handler.rs"]
mod readme_in_memory;

/// A handler that fails its first two attempts.
async fn flaky(
    Msg(_order): Msg<serde_json::Value>,
    State(attempts): State<Arc<AtomicU32>>,
) -> Result<(), HandlerError> {
    if attempts.fetch_add(1, Ordering::SeqCst) < 2 {
        return Err(HandlerError::retry("the stock service is away"));
    }
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn in_memory_a_handler_that_fails_twice_is_retried_after_five_minutes_each_then_acked() {
    let wall = std::time::Instant::now();
    let virtual_start = tokio::time::Instant::now();
    let broker = TestBroker::new();
    let conn = broker.connect().await.unwrap();
    let attempts = Arc::new(AtomicU32::new(0));
    let running = Worker::new(&conn, attempts.clone())
        .consumer(ConsumerSettings::new("orders"), flaky)
        .retry(Retry::attempts(5).delays([Duration::from_secs(300)]))
        .start()
        .await
        .unwrap();
    broker
        .publish(
            "",
            Message::encode(Serializer::Json, &serde_json::json!({"id": 7}))
                .unwrap()
                .routing_key("orders"),
        )
        .unwrap();

    let metrics = running.metrics();
    metrics
        .until(Duration::from_secs(3600), |m| {
            m.outcomes("orders", Counted::Ack) == 1
        })
        .await
        .unwrap();
    assert_eq!(attempts.load(Ordering::SeqCst), 3);
    assert_eq!(metrics.outcomes("orders", Counted::Retry), 2);
    assert_eq!(metrics.outcomes("orders", Counted::DeadLetter), 0);
    // Each retry waited its five minutes of the test's clock.
    let waited = virtual_start.elapsed();
    assert!(waited >= Duration::from_secs(600), "{waited:?}");
    assert_eq!(broker.ready("orders"), Some(0));
    running.shutdown().await;
    println!(
        "two 5-minute retries took {:?} of wall time ({:?} on the test's clock)",
        wall.elapsed(),
        waited
    );
}

async fn echo(Msg(v): Msg<serde_json::Value>) -> Result<Json<serde_json::Value>, HandlerError> {
    Ok(Json(serde_json::json!({ "echo": v })))
}

#[tokio::test]
async fn in_memory_rpc_calls_get_replies_on_direct_reply_to_and_on_a_named_queue() {
    let broker = TestBroker::new();
    let conn = broker.connect().await.unwrap();
    let running = Worker::new(&conn, ())
        .consumer(ConsumerSettings::new("sums"), echo)
        .start()
        .await
        .unwrap();
    for reply_queue in [
        ReplyQueue::DirectReplyTo,
        ReplyQueue::Named("replies".into()),
    ] {
        let client = RpcClient::new(
            &conn,
            RpcSettings {
                reply_queue,
                ..RpcSettings::default()
            },
        )
        .await
        .unwrap();
        for n in 0..3 {
            let reply: serde_json::Value = client
                .call_value("sums", Serializer::Json, &serde_json::json!({ "n": n }))
                .await
                .unwrap();
            assert_eq!(reply, serde_json::json!({"echo": {"n": n}}));
        }
    }
    running.shutdown().await;
}

#[tokio::test]
async fn in_memory_a_cut_connection_recovers_and_nothing_published_is_lost() {
    let broker = TestBroker::new();
    let conn = broker.connect().await.unwrap();
    let mut consumer = Consumer::start(
        &conn,
        ConsumerSettings::new("audit").bind("shop", ExchangeKind::Topic, &["#"]),
    )
    .await
    .unwrap();
    let producer = Producer::new(
        &conn,
        ProducerSettings::new("shop", ExchangeKind::Topic).routing_key("order.created"),
    )
    .await
    .unwrap();
    producer.publish(Message::new("before")).await.unwrap();
    let first = consumer.next().await.unwrap();
    assert_eq!(&first.body[..], b"before");
    first.ack().await.unwrap();

    let generation = conn.generation();
    // The consuming and the publishing connections both go.
    assert_eq!(broker.cut_connections(), 2);
    conn.wait_connected(generation, Duration::from_secs(30))
        .await
        .unwrap();
    producer.publish(Message::new("after")).await.unwrap();
    let second = tokio::time::timeout(Duration::from_secs(30), consumer.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&second.body[..], b"after");
    second.ack().await.unwrap();
    // The harness's own connection was cut too; it publishes all the same.
    broker
        .publish(
            "shop",
            Message::new("from outside").routing_key("order.paid"),
        )
        .unwrap();
    let third = tokio::time::timeout(Duration::from_secs(30), consumer.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&third.body[..], b"from outside");
    third.ack().await.unwrap();
    consumer.cancel().await;
    conn.close().await;
}

#[test]
fn in_memory_the_readme_shows_the_handler_test_that_runs() {
    let readme = include_str!("../../../README.md");
    let test = include_str!("readme/handler.rs");
    let start = test.find("// README:begin").unwrap();
    let end = test.find("// README:end").unwrap();
    let shown = test[start..end]
        .lines()
        .skip(1)
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        readme.contains(&format!("```rust,ignore\n{shown}\n```")),
        "the README's handler test differs from tests/readme/handler.rs"
    );
}

/// Start and end of each handled message, by index, on the test's clock.
#[derive(Clone, Default)]
struct Timeline {
    spans: Arc<Mutex<Vec<(u32, Instant, Instant)>>>,
    active: Arc<AtomicUsize>,
    max_active: Arc<AtomicUsize>,
}

/// Handles 20 messages, each taking 40 ms of the (paused) clock, with
/// `concurrency` handlers at most.
async fn run_timeline(concurrency: usize) -> Timeline {
    let broker = TestBroker::new();
    let conn = broker.connect().await.unwrap();
    let timeline = Timeline::default();
    let running = Worker::new(&conn, timeline.clone())
        .consumer(
            ConsumerSettings::new("serial"),
            |Msg(i): Msg<u32>, State(t): State<Timeline>| async move {
                let start = Instant::now();
                let now = t.active.fetch_add(1, Ordering::SeqCst) + 1;
                t.max_active.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(40)).await;
                t.active.fetch_sub(1, Ordering::SeqCst);
                t.spans.lock().unwrap().push((i, start, Instant::now()));
            },
        )
        .concurrency(concurrency)
        .start()
        .await
        .unwrap();
    for i in 0..20u32 {
        let message = Message::encode(Serializer::Json, &i)
            .unwrap()
            .routing_key("serial");
        broker.publish("", message).unwrap();
    }
    running
        .metrics()
        .until(Duration::from_secs(60), |m| {
            m.finished("serial") == Some(20)
        })
        .await
        .unwrap();
    running.shutdown().await;
    timeline
}

#[tokio::test(start_paused = true)]
async fn in_memory_concurrency_one_never_overlaps_and_keeps_order() {
    let t = run_timeline(1).await;
    let spans = t.spans.lock().unwrap().clone();
    let order: Vec<u32> = spans.iter().map(|s| s.0).collect();
    assert_eq!(
        order,
        (0..20).collect::<Vec<_>>(),
        "handled in publish order"
    );
    for w in spans.windows(2) {
        assert!(
            w[0].2 <= w[1].1,
            "message {} started before {} ended",
            w[1].0,
            w[0].0
        );
    }
    assert_eq!(t.max_active.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn in_memory_concurrency_four_overlaps_but_never_more_than_four() {
    let t = run_timeline(4).await;
    let max = t.max_active.load(Ordering::SeqCst);
    assert!(max > 1, "handlers overlapped");
    assert!(max <= 4, "at most 4 at once, saw {max}");
}

/// What the partitions' handlers saw: (key, sequence number), in order,
/// and a wake-up for each.
#[derive(Clone, Default)]
struct Seen {
    handled: Arc<Mutex<Vec<(String, u32)>>>,
    more: Arc<tokio::sync::Notify>,
}

#[tokio::test]
async fn in_memory_partitions_keep_each_keys_order_across_two_workers() {
    let broker = TestBroker::new();
    let seen = Seen::default();
    let mut running = Vec::new();
    for _ in 0..2 {
        let conn = broker.connect().await.unwrap();
        let worker = Worker::new(&conn, seen.clone())
            .consumer(
                ConsumerSettings::new("orders").bind(
                    "orders-hash",
                    ExchangeKind::ConsistentHash,
                    &[],
                ),
                |Msg(seq): Msg<u32>, p: rabbitry::Properties, State(seen): State<Seen>| async move {
                    let key = p.headers["order_id"].as_str().unwrap().to_owned();
                    seen.handled.lock().unwrap().push((key, seq));
                    seen.more.notify_waiters();
                },
            )
            .partitions(4, PartitionKey::Header("order_id".into()))
            .start()
            .await
            .unwrap();
        running.push(worker);
    }
    for seq in 0..200u32 {
        let message = Message::encode(Serializer::Json, &seq)
            .unwrap()
            .header("order_id", format!("k{}", seq % 10));
        broker.publish("orders-hash", message).unwrap();
    }
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let more = seen.more.notified();
            tokio::pin!(more);
            more.as_mut().enable();
            if seen.handled.lock().unwrap().len() == 200 {
                return;
            }
            more.await;
        }
    })
    .await
    .expect("200 messages handled within 30 s");
    let handled = seen.handled.lock().unwrap().clone();
    for k in 0..10 {
        let key = format!("k{k}");
        let order: Vec<u32> = handled
            .iter()
            .filter(|(k, _)| *k == key)
            .map(|(_, s)| *s)
            .collect();
        let expected: Vec<u32> = (0..200).filter(|s| s % 10 == k).collect();
        assert_eq!(order, expected, "key {key} out of order");
    }
    for r in running {
        r.shutdown().await;
    }
}

#[tokio::test]
async fn in_memory_a_replayed_dead_letter_is_handled_again() {
    let broker = TestBroker::new();
    let conn = broker.connect().await.unwrap();
    let attempts = Arc::new(AtomicU32::new(0));
    let running = Worker::new(&conn, attempts.clone())
        .consumer(
            ConsumerSettings::new("orders"),
            |State(attempts): State<Arc<AtomicU32>>| async move {
                if attempts.fetch_add(1, Ordering::SeqCst) == 0 {
                    return Err(HandlerError::invalid("not yet"));
                }
                Ok(())
            },
        )
        .start()
        .await
        .unwrap();
    broker
        .publish("", Message::new("order").routing_key("orders"))
        .unwrap();
    let metrics = running.metrics();
    metrics
        .until(Duration::from_secs(5), |m| {
            m.outcomes("orders", Counted::DeadLetter) == 1
        })
        .await
        .unwrap();
    assert_eq!(dead::replay(&conn, "orders", 10).await.unwrap(), 1);
    metrics
        .until(Duration::from_secs(5), |m| {
            m.outcomes("orders", Counted::Ack) == 1
        })
        .await
        .unwrap();
    assert!(dead::list(&conn, "orders", 10).await.unwrap().is_empty());
    running.shutdown().await;
}
