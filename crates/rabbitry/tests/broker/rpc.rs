//! Request/reply: the RPC client against responders written with the raw
//! client, timeouts and deadlines, connection loss, and durable replies
//! handled by a worker.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use amqprs::channel::{BasicConsumeArguments, BasicPublishArguments, QueueDeclareArguments};
use amqprs::connection::{Connection as RawConnection, OpenConnectionArguments};
use amqprs::BasicProperties;
use rabbitry::outbox::{Database, Outbox, RelayOptions};
use rabbitry::rpc::{durable, ReplyQueue, RpcClient, RpcSettings};
use rabbitry::worker::{HandlerError, Meta, State};
use rabbitry::{
    Connection, ConsumerSettings, ErrorKind, ExchangeKind, Message, Serializer, Worker,
};

use crate::support::{connect, eventually, settings, sqlite_url, unique, Proxy};

/// A responder written with the raw client (not the gateway): it answers
/// each request on `queue` after `delay`, with `{"echo": <request>}` in the
/// request's own serializer and its correlation id.
async fn raw_responder(queue: &str, delay: Duration) -> (RawConnection, Arc<AtomicUsize>) {
    let conn = RawConnection::open(&OpenConnectionArguments::new(
        "127.0.0.1",
        5672,
        "guest",
        "guest",
    ))
    .await
    .unwrap();
    let ch = conn.open_channel(None).await.unwrap();
    ch.queue_declare(QueueDeclareArguments::new(queue).auto_delete(true).finish())
        .await
        .unwrap();
    let (_, mut rx) = ch
        .basic_consume_rx(
            BasicConsumeArguments::new(queue, "")
                .auto_ack(true)
                .finish(),
        )
        .await
        .unwrap();
    let served = Arc::new(AtomicUsize::new(0));
    let counter = served.clone();
    tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            let props = m.basic_properties.unwrap();
            let ct = props.content_type().cloned().unwrap_or_default();
            let body = m.content.unwrap_or_default();
            let request: serde_json::Value = if ct == "application/x-msgpack" {
                rmp_serde::from_slice(&body).unwrap()
            } else {
                serde_json::from_slice(&body).unwrap()
            };
            let reply = serde_json::json!({ "echo": request });
            let bytes = if ct == "application/x-msgpack" {
                rmp_serde::to_vec_named(&reply).unwrap()
            } else {
                serde_json::to_vec(&reply).unwrap()
            };
            let mut p = BasicProperties::default();
            p.with_content_type(&ct)
                .with_correlation_id(props.correlation_id().unwrap());
            let ch = ch.clone();
            let reply_to = props.reply_to().unwrap().clone();
            let counter = counter.clone();
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                ch.basic_publish(p.finish(), bytes, BasicPublishArguments::new("", &reply_to))
                    .await
                    .unwrap();
                counter.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    (conn, served)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_with_a_raw_responder_in_msgpack_and_json() {
    let conn = connect().await;
    let queue = unique("rpc");
    let (_raw, _) = raw_responder(&queue, Duration::ZERO).await;
    for reply_queue in [
        ReplyQueue::DirectReplyTo,
        ReplyQueue::Named(unique("replies")),
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
        for ser in [Serializer::Msgpack, Serializer::Json] {
            let request = Message::encode(ser, &serde_json::json!({"title": "Hello World!"}))
                .unwrap()
                .routing_key(&queue);
            let reply = client.call(request, None).await.unwrap();
            assert_eq!(
                reply.properties.content_type.as_deref(),
                Some(ser.content_type())
            );
            assert!(reply.properties.correlation_id.is_some());
            let v: serde_json::Value = reply.decode().unwrap();
            assert_eq!(v, serde_json::json!({"echo": {"title": "Hello World!"}}));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_calls_each_get_their_own_reply() {
    let conn = connect().await;
    let queue = unique("rpc200");
    // Replies come back out of order: each waits a little, some longer.
    let (_raw, served) = raw_responder(&queue, Duration::from_millis(5)).await;
    let client = RpcClient::new(&conn, RpcSettings::default()).await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..200u32 {
        let client = client.clone();
        let queue = queue.clone();
        tasks.push(tokio::spawn(async move {
            let v: BTreeMap<String, BTreeMap<String, u32>> = client
                .call_value(
                    &queue,
                    Serializer::Msgpack,
                    &BTreeMap::from([("n".to_owned(), i)]),
                )
                .await
                .unwrap();
            (i, v["echo"]["n"])
        }));
    }
    for t in tasks {
        let (sent, got) = t.await.unwrap();
        assert_eq!(sent, got, "call {sent} got the reply of call {got}");
    }
    assert_eq!(served.load(Ordering::SeqCst), 200);
    assert_eq!(client.in_flight(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_fail_on_time_and_late_replies_are_dropped_without_harm() {
    let conn = connect().await;
    let client = RpcClient::new(&conn, RpcSettings::default()).await.unwrap();

    // Nobody consumes this queue.
    let silent = unique("silent");
    let mut t = rabbitry::Topology::default();
    t.queue(rabbitry::Queue::durable(&silent));
    conn.declare(&t).await.unwrap();
    let timeout = Duration::from_millis(300);
    let started = Instant::now();
    let err = client
        .call(Message::new("ping").routing_key(&silent), Some(timeout))
        .await
        .unwrap_err();
    let took = started.elapsed();
    assert_eq!(err.kind(), ErrorKind::Timeout);
    assert!(err.to_string().contains("timed out after 300ms"), "{err}");
    assert!(
        took < timeout + Duration::from_millis(100),
        "failed after {took:?}"
    );
    assert_eq!(client.in_flight(), 0, "the entry is removed");

    // A responder slower than the timeout: its reply arrives late.
    let slow = unique("slow");
    let (_raw, served) = raw_responder(&slow, Duration::from_millis(400)).await;
    let request = Message::encode(Serializer::Json, &serde_json::json!({"n": 1})).unwrap();
    let err = client
        .call(
            request.clone().routing_key(&slow),
            Some(Duration::from_millis(100)),
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Timeout);
    eventually(Duration::from_secs(5), "the late reply", || async {
        served.load(Ordering::SeqCst) == 1
    })
    .await;
    // The client is unharmed: the next call gets its own reply.
    let reply = client
        .call(request.routing_key(&slow), Some(Duration::from_secs(5)))
        .await
        .unwrap();
    let v: serde_json::Value = reply.decode().unwrap();
    assert_eq!(v["echo"]["n"], 1);
    conn.delete_queue(&silent).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_past_its_deadline_is_not_handled_by_the_worker() {
    let conn = connect().await;
    let queue = unique("late");
    let handled = Arc::new(AtomicUsize::new(0));
    // Declare the queue first, with no worker on it yet.
    let mut t = rabbitry::Topology::default();
    t.queue(rabbitry::Queue::durable(&queue));
    conn.declare(&t).await.unwrap();
    let client = RpcClient::new(&conn, RpcSettings::default()).await.unwrap();
    let err = client
        .call(
            Message::new("ping").routing_key(&queue),
            Some(Duration::from_millis(200)),
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Timeout);
    // The worker starts after the deadline: the request is acked unhandled.
    let running = Worker::new(&conn, handled.clone())
        .consumer(
            ConsumerSettings::new(&queue),
            |State(n): State<Arc<AtomicUsize>>| async move {
                n.fetch_add(1, Ordering::SeqCst);
            },
        )
        .start()
        .await
        .unwrap();
    eventually(
        Duration::from_secs(5),
        "the request to be taken off the queue",
        || async { conn.queue_status(&queue).await.unwrap().unwrap().messages == 0 },
    )
    .await;
    running.shutdown().await;
    assert_eq!(
        handled.load(Ordering::SeqCst),
        0,
        "an expired request is not handled"
    );
    for q in [
        queue.clone(),
        format!("{queue}.dead"),
        format!("{queue}.retry.1s"),
        format!("{queue}.retry.5s"),
    ] {
        conn.delete_queue(&q).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_connection_fails_calls_in_flight_at_once_and_recovers() {
    let proxy = Proxy::start().await;
    let conn = Connection::open(settings(&proxy.url(), &unique("rpc-cut")))
        .await
        .unwrap();
    let queue = unique("cut");
    let (_raw, _) = raw_responder(&queue, Duration::from_secs(3)).await;
    let client = RpcClient::new(&conn, RpcSettings::default()).await.unwrap();
    let mut calls = Vec::new();
    for i in 0..5 {
        let client = client.clone();
        let m = Message::encode(Serializer::Json, &serde_json::json!({"n": i}))
            .unwrap()
            .routing_key(&queue);
        calls.push(tokio::spawn(async move {
            let started = Instant::now();
            (
                client.call(m, Some(Duration::from_secs(30))).await,
                started.elapsed(),
            )
        }));
    }
    eventually(Duration::from_secs(5), "5 calls in flight", || async {
        client.in_flight() == 5
    })
    .await;
    assert!(proxy.cut() >= 1);
    for c in calls {
        let (result, took) = c.await.unwrap();
        let err = result.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Disconnected, "{err}");
        assert!(err.to_string().contains("lost"), "{err}");
        assert!(
            took < Duration::from_secs(3),
            "failed fast, not at the timeout: {took:?}"
        );
    }
    // After recovery, new calls succeed.
    eventually(
        Duration::from_secs(20),
        "a successful call after recovery",
        || async {
            let m = Message::encode(Serializer::Json, &serde_json::json!({"n": 9}))
                .unwrap()
                .routing_key(&queue);
            client.call(m, Some(Duration::from_secs(5))).await.is_ok()
        },
    )
    .await;
    conn.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seed_flow_with_a_durable_reply_queue_survives_the_requester_restarting() {
    let conn = connect().await;
    let tasks = unique("service.tasks");
    let results = unique("service.results");
    let reply_queue = unique("my_queue");
    let db_url = sqlite_url();

    // The service, written with the raw client: the seed's reply.
    let raw = RawConnection::open(&OpenConnectionArguments::new(
        "127.0.0.1",
        5672,
        "guest",
        "guest",
    ))
    .await
    .unwrap();
    let ch = raw.open_channel(None).await.unwrap();
    let mut ex = amqprs::channel::ExchangeDeclareArguments::new(&tasks, "topic");
    ex.durable = true;
    ch.exchange_declare(ex).await.unwrap();
    let mut ex = amqprs::channel::ExchangeDeclareArguments::new(&results, "direct");
    ex.durable = true;
    ch.exchange_declare(ex).await.unwrap();
    let service_queue = unique("pdf");
    ch.queue_declare(
        QueueDeclareArguments::new(&service_queue)
            .auto_delete(true)
            .finish(),
    )
    .await
    .unwrap();
    ch.queue_bind(amqprs::channel::QueueBindArguments::new(
        &service_queue,
        &tasks,
        "service.my_template",
    ))
    .await
    .unwrap();
    let (_, mut requests) = ch
        .basic_consume_rx(
            BasicConsumeArguments::new(&service_queue, "")
                .auto_ack(true)
                .finish(),
        )
        .await
        .unwrap();

    // The requesting process: request and context in one transaction.
    let correlation_id = {
        let outbox = Outbox::connect(&db_url).await.unwrap();
        durable::migrate(outbox.database()).await.unwrap();
        let Database::Sqlite(pool) = outbox.database() else {
            unreachable!()
        };
        let mut tx = pool.begin().await.unwrap();
        let message = Message::encode(
            Serializer::Msgpack,
            &serde_json::json!({"title": "Hello World!"}),
        )
        .unwrap()
        .exchange(&tasks)
        .routing_key("service.my_template")
        .reply_to(&reply_queue);
        let id = durable::send(
            &mut *tx,
            "render",
            &serde_json::json!({"document": 42}),
            message,
        )
        .await
        .unwrap();
        outbox.commit(tx).await.unwrap();
        let requester_conn = connect().await;
        let relay = outbox
            .spawn_relay(&requester_conn, RelayOptions::default())
            .await
            .unwrap();
        eventually(
            Duration::from_secs(10),
            "the request to leave the outbox",
            || async { outbox.status().await.unwrap().pending == 0 },
        )
        .await;
        // The requesting process exits before any reply.
        relay.stop().await.unwrap();
        requester_conn.close().await;
        id
    };

    // The service sees the seed's request, exactly.
    let m = tokio::time::timeout(Duration::from_secs(10), requests.recv())
        .await
        .unwrap()
        .unwrap();
    let props = m.basic_properties.unwrap();
    assert_eq!(
        props.content_type().map(String::as_str),
        Some("application/x-msgpack")
    );
    assert_eq!(props.correlation_id(), Some(&correlation_id));
    assert_eq!(props.reply_to(), Some(&reply_queue));
    let title: BTreeMap<String, String> = rmp_serde::from_slice(&m.content.unwrap()).unwrap();
    assert_eq!(title["title"], "Hello World!");

    // The site's worker consumes the durable reply queue and stores replies.
    let db = Database::connect(&db_url).await.unwrap();
    let running = Worker::new(&conn, db.clone())
        .consumer(
            ConsumerSettings::new(&reply_queue).bind(
                &results,
                ExchangeKind::Direct,
                &[&reply_queue],
            ),
            |meta: Meta, body: rabbitry::worker::Body, State(db): State<Database>| async move {
                let Database::Sqlite(pool) = db else {
                    return Err(HandlerError::invalid("sqlite only"));
                };
                let id = meta
                    .properties
                    .correlation_id
                    .clone()
                    .ok_or_else(|| HandlerError::invalid("no correlation id"))?;
                let mut tx = pool.begin().await?;
                let stored = durable::complete(
                    &mut *tx,
                    &id,
                    meta.properties.content_type.as_deref(),
                    &body.0,
                )
                .await?;
                if stored.is_none() {
                    return Err(HandlerError::invalid(format!(
                        "no request with correlation id {id}"
                    )));
                }
                tx.commit().await?;
                Ok(())
            },
        )
        .start()
        .await
        .unwrap();

    // The service replies as in the seed: service.results, routing key = reply_to.
    let mut p = BasicProperties::default();
    p.with_content_type("application/pdf")
        .with_correlation_id(&correlation_id);
    ch.basic_publish(
        p.finish(),
        b"%PDF-1.4 hello %%EOF".to_vec(),
        BasicPublishArguments::new(&results, &reply_queue),
    )
    .await
    .unwrap();

    // A new requesting process finds the reply by correlation id.
    let fresh = Database::connect(&db_url).await.unwrap();
    eventually(Duration::from_secs(10), "the stored reply", || async {
        durable::get(&fresh, &correlation_id)
            .await
            .unwrap()
            .is_some_and(|r| r.replied_at.is_some())
    })
    .await;
    let stored = durable::get(&fresh, &correlation_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.kind, "render");
    assert_eq!(stored.request, serde_json::json!({"document": 42}));
    assert_eq!(
        stored.reply_content_type.as_deref(),
        Some("application/pdf")
    );
    assert_eq!(stored.reply.as_deref(), Some(&b"%PDF-1.4 hello %%EOF"[..]));
    running.shutdown().await;
    for q in [
        reply_queue.clone(),
        format!("{reply_queue}.dead"),
        format!("{reply_queue}.retry.1s"),
        format!("{reply_queue}.retry.5s"),
    ] {
        conn.delete_queue(&q).await.unwrap();
    }
    conn.delete_exchange(&tasks).await.unwrap();
    conn.delete_exchange(&results).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpc_calls_are_counted_and_timed_by_outcome() {
    // Before the client makes its handles.
    let prometheus = rabbitry::admin::install_prometheus().expect("the test's recorder");
    let name = unique("rpc.metrics");
    let conn = Connection::open(settings(&crate::support::url(), &name))
        .await
        .unwrap();
    let queue = unique("rpc");
    let (_raw, _) = raw_responder(&queue, Duration::ZERO).await;
    let client = RpcClient::new(&conn, RpcSettings::default()).await.unwrap();
    for _ in 0..3 {
        let request = Message::encode(Serializer::Json, &serde_json::json!({"n": 1}))
            .unwrap()
            .routing_key(&queue);
        client.call(request, None).await.unwrap();
    }
    // This one's answer comes too late.
    let slow = unique("rpc.slow");
    let (_slow_raw, _) = raw_responder(&slow, Duration::from_secs(1)).await;
    let request = Message::encode(Serializer::Json, &serde_json::json!({"n": 2}))
        .unwrap()
        .routing_key(&slow);
    let err = client
        .call(request, Some(Duration::from_millis(200)))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Timeout, "{err}");
    let text = prometheus.render();
    for line in [
        format!("rabbitry_rpc_calls_total{{connection=\"{name}\",outcome=\"reply\"}} 3"),
        format!("rabbitry_rpc_calls_total{{connection=\"{name}\",outcome=\"timeout\"}} 1"),
        format!("rabbitry_rpc_duration_seconds_count{{connection=\"{name}\"}} 3"),
        format!("rabbitry_rpc_in_flight{{connection=\"{name}\"}} 0"),
    ] {
        assert!(text.contains(&line), "{line} in:\n{text}");
    }
    conn.close().await;
}
