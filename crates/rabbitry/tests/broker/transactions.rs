//! Transactional delivery: the unit of work, the web layer, the outbox on
//! SQLite and PostgreSQL, the relay, the inbox, and handlers that write to
//! a database.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::http::{Request, StatusCode};
use axum::routing::post;
use axum::{Extension, Router};
use rabbitry::outbox::{self, Database, Outbox, RelayOptions};
use rabbitry::web::PublishOnSuccessLayer;
use rabbitry::worker::{HandlerError, Meta, State};
use rabbitry::{
    Connection, Consumer, ConsumerSettings, ExchangeKind, Message, Producer, ProducerSettings,
    UnitOfWork, Worker,
};
use tower::ServiceExt;

use crate::support::{connect, eventually, pg_url, sqlite_url, unique};

/// Reads `n` bodies from `queue`, in arrival order, then checks nothing
/// more arrives for a moment.
async fn read_bodies(conn: &Connection, queue: &str, n: usize) -> Vec<String> {
    let mut consumer = Consumer::start(conn, ConsumerSettings::new(queue))
        .await
        .unwrap();
    let mut out = Vec::new();
    while out.len() < n {
        let d = tokio::time::timeout(Duration::from_secs(20), consumer.next())
            .await
            .unwrap_or_else(|_| panic!("only {} of {n} arrived: {out:?}", out.len()))
            .unwrap();
        out.push(String::from_utf8(d.body.to_vec()).unwrap());
        d.ack().await.unwrap();
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(300), consumer.next())
            .await
            .is_err(),
        "more than {n} messages arrived"
    );
    out
}

async fn queue_producer(conn: &Connection) -> (String, Producer) {
    let queue = unique("tx");
    let mut t = rabbitry::Topology::default();
    t.queue(rabbitry::Queue::durable(&queue));
    conn.declare(&t).await.unwrap();
    let p = Producer::new(conn, ProducerSettings::default().routing_key(&queue))
        .await
        .unwrap();
    (queue, p)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unit_of_work_publishes_at_commit_in_order_and_never_after_abort() {
    let conn = connect().await;
    let (queue, producer) = queue_producer(&conn).await;

    let aborted = UnitOfWork::new();
    aborted.publish(&producer, Message::new("never-1")).unwrap();
    aborted.publish(&producer, Message::new("never-2")).unwrap();
    aborted.abort();
    assert!(aborted.publish(&producer, Message::new("late")).is_err());
    {
        let dropped = UnitOfWork::new();
        dropped.publish(&producer, Message::new("never-3")).unwrap();
    }
    let unit = UnitOfWork::new();
    for i in 0..5 {
        unit.publish(&producer, Message::new(format!("m{i}")))
            .unwrap();
    }
    assert_eq!(
        conn.queue_status(&queue).await.unwrap().unwrap().messages,
        0,
        "nothing before commit"
    );
    assert_eq!(unit.commit(None).await.unwrap(), 5);
    assert_eq!(
        read_bodies(&conn, &queue, 5).await,
        ["m0", "m1", "m2", "m3", "m4"]
    );
    conn.delete_queue(&queue).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn web_layer_publishes_on_2xx_only() {
    let conn = connect().await;
    let (queue, producer) = queue_producer(&conn).await;
    let app = Router::new()
        .route(
            "/orders/{status}",
            post(
                |axum::extract::Path(status): axum::extract::Path<u16>,
                 Extension(unit): Extension<UnitOfWork>,
                 Extension(producer): Extension<Producer>| async move {
                    unit.publish(&producer, Message::new(format!("from-{status}")))
                        .unwrap();
                    unit.publish(&producer, Message::new(format!("from-{status}-b")))
                        .unwrap();
                    StatusCode::from_u16(status).unwrap()
                },
            ),
        )
        .layer(PublishOnSuccessLayer::new())
        .layer(Extension(producer));
    for status in [500, 201, 404] {
        let resp = app
            .clone()
            .oneshot(
                Request::post(format!("/orders/{status}"))
                    .body(axum::body::Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), status);
    }
    assert_eq!(
        read_bodies(&conn, &queue, 2).await,
        ["from-201", "from-201-b"]
    );
    conn.delete_queue(&queue).await.unwrap();
}

async fn outbox_commit_and_rollback(url: String) {
    let conn = connect().await;
    let (queue, _) = queue_producer(&conn).await;
    let outbox = Outbox::connect(&url).await.unwrap();
    let relay = outbox
        .spawn_relay(&conn, RelayOptions::default())
        .await
        .unwrap();
    let write = |label: &'static str, n: usize, commit: bool| {
        let outbox = outbox.clone();
        let queue = queue.clone();
        async move {
            match outbox.database() {
                Database::Sqlite(pool) => {
                    let mut tx = pool.begin().await.unwrap();
                    for i in 0..n {
                        outbox::publish(
                            &mut *tx,
                            Message::new(format!("{label}{i}")).routing_key(&queue),
                        )
                        .await
                        .unwrap();
                    }
                    if commit {
                        outbox.commit(tx).await.unwrap()
                    } else {
                        tx.rollback().await.unwrap()
                    }
                }
                Database::Postgres(pool) => {
                    let mut tx = pool.begin().await.unwrap();
                    for i in 0..n {
                        outbox::publish(
                            &mut *tx,
                            Message::new(format!("{label}{i}")).routing_key(&queue),
                        )
                        .await
                        .unwrap();
                    }
                    if commit {
                        tx.commit().await.unwrap()
                    } else {
                        tx.rollback().await.unwrap()
                    }
                }
            }
        }
    };
    write("rolled-back-", 3, false).await;
    write("c", 10, true).await;
    let expected: Vec<String> = (0..10).map(|i| format!("c{i}")).collect();
    assert_eq!(read_bodies(&conn, &queue, 10).await, expected);
    // Many small commits while the relay runs: each published once, in order.
    for i in 0..300 {
        write(["s", "t", "u"][i % 3], 1, true).await;
    }
    let bodies = read_bodies(&conn, &queue, 300).await;
    assert_eq!(
        bodies.len(),
        300,
        "no duplicates (read_bodies fails on extras)"
    );
    eventually(Duration::from_secs(5), "the outbox to be empty", || async {
        outbox.status().await.unwrap().pending == 0
    })
    .await;
    relay.stop().await.unwrap();
    conn.delete_queue(&queue).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_on_sqlite_publishes_exactly_the_committed_messages_in_order() {
    outbox_commit_and_rollback(sqlite_url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_on_postgres_publishes_exactly_the_committed_messages_in_order() {
    outbox_commit_and_rollback(pg_url().await).await;
}

/// Messages staged in an outbox transaction: written at commit in one
/// statement per 500, in order, together with the application's own row;
/// nothing from a rollback or a dropped transaction.
async fn staged_messages<DB: outbox::OutboxDatabase>(url: String)
where
    DB::Connection: outbox::OutboxExecutor,
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
{
    let conn = connect().await;
    let (queue, _) = queue_producer(&conn).await;
    let outbox = Outbox::connect(&url).await.unwrap();
    let mut tx = outbox.begin::<DB>().await.unwrap();
    sqlx::raw_sql("CREATE TABLE orders (v TEXT NOT NULL)")
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();

    let relay = outbox
        .spawn_relay(&conn, RelayOptions::default())
        .await
        .unwrap();
    let mut rolled_back = outbox.begin::<DB>().await.unwrap();
    sqlx::raw_sql("INSERT INTO orders VALUES ('rolled back')")
        .execute(&mut *rolled_back)
        .await
        .unwrap();
    rolled_back
        .publish(Message::new("rolled back").routing_key(&queue))
        .unwrap();
    rolled_back.rollback().await.unwrap();
    let mut dropped = outbox.begin::<DB>().await.unwrap();
    dropped
        .publish(Message::new("dropped").routing_key(&queue))
        .unwrap();
    drop(dropped);

    // More than one statement's worth (500 rows), beside the app's row.
    let mut tx = outbox.begin::<DB>().await.unwrap();
    sqlx::raw_sql("INSERT INTO orders VALUES ('paid')")
        .execute(&mut *tx)
        .await
        .unwrap();
    let mut ids = Vec::new();
    for i in 0..1_200 {
        ids.push(
            tx.publish(Message::new(format!("m{i}")).routing_key(&queue))
                .unwrap(),
        );
    }
    assert_eq!(tx.staged(), 1_200);
    let err = tx.publish(Message::new("no routing key")).unwrap_err();
    assert!(err.to_string().contains("routing key"), "{err}");
    tx.commit().await.unwrap();

    let expected: Vec<String> = (0..1_200).map(|i| format!("m{i}")).collect();
    assert_eq!(read_bodies(&conn, &queue, 1_200).await, expected);
    let rows: Vec<String> = match outbox.database() {
        Database::Sqlite(pool) => sqlx::query_scalar("SELECT v FROM orders")
            .fetch_all(pool)
            .await
            .unwrap(),
        Database::Postgres(pool) => sqlx::query_scalar("SELECT v FROM orders")
            .fetch_all(pool)
            .await
            .unwrap(),
    };
    assert_eq!(rows, ["paid"], "the app's row committed with its messages");
    assert_eq!(
        ids.iter().collect::<std::collections::HashSet<_>>().len(),
        1_200
    );
    relay.stop().await.unwrap();
    conn.delete_queue(&queue).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn staged_outbox_messages_on_sqlite_are_written_at_commit_in_order() {
    staged_messages::<sqlx::Sqlite>(sqlite_url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn staged_outbox_messages_on_postgres_are_written_at_commit_in_order() {
    staged_messages::<sqlx::Postgres>(pg_url().await).await;
}

#[tokio::test]
async fn an_outbox_transaction_on_the_wrong_database_says_which_it_is_on() {
    let outbox = Outbox::connect(&sqlite_url()).await.unwrap();
    let err = outbox.begin::<sqlx::Postgres>().await.unwrap_err();
    assert!(err.to_string().contains("not on postgres"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unroutable_outbox_message_is_marked_failed_not_retried() {
    let conn = connect().await;
    let outbox = Outbox::connect(&sqlite_url()).await.unwrap();
    let Database::Sqlite(pool) = outbox.database() else {
        unreachable!()
    };
    let mut tx = pool.begin().await.unwrap();
    let id = outbox::publish(
        &mut *tx,
        Message::new("x")
            .routing_key(unique("nowhere"))
            .mandatory(true),
    )
    .await
    .unwrap();
    outbox.commit(tx).await.unwrap();
    let relay = outbox
        .spawn_relay(&conn, RelayOptions::default())
        .await
        .unwrap();
    eventually(
        Duration::from_secs(10),
        "the row to be marked failed",
        || async { outbox.status().await.unwrap().failed.len() == 1 },
    )
    .await;
    let status = outbox.status().await.unwrap();
    assert_eq!(status.pending, 0, "a failed row is not retried");
    assert_eq!(status.failed[0].message_id, id);
    assert!(
        status.failed[0]
            .error
            .as_deref()
            .unwrap()
            .contains("NO_ROUTE"),
        "{status:?}"
    );
    relay.stop().await.unwrap();
}

#[tokio::test]
async fn unreachable_database_error_names_it() {
    let err = Outbox::connect("postgres://postgres@127.0.0.1:1/test")
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("127.0.0.1:1") && text.contains("database"),
        "{text}"
    );
    assert_eq!(err.kind(), rabbitry::ErrorKind::Database);
    let err = Outbox::connect("mysql://x").await.unwrap_err();
    assert!(err.to_string().contains("sqlite://"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mark_lost_after_publishing_resends_with_the_same_id_and_the_inbox_dedupes() {
    let conn = connect().await;
    let (queue, _) = queue_producer(&conn).await;
    let outbox = Outbox::connect(&sqlite_url()).await.unwrap();
    let Database::Sqlite(pool) = outbox.database().clone() else {
        unreachable!()
    };
    // The first attempt to delete the relayed row is lost, as it is when
    // a relay is killed between publishing and marking: the row stays
    // pending (RAISE(IGNORE) skips the delete; the log row stays).
    sqlx::raw_sql(
        "CREATE TABLE lost_marks (id INTEGER); \
         CREATE TRIGGER lose_mark BEFORE DELETE ON rabbitry_outbox \
         BEGIN INSERT INTO lost_marks VALUES (old.id); SELECT RAISE(IGNORE); END",
    )
    .execute(&pool)
    .await
    .unwrap();
    let mut tx = pool.begin().await.unwrap();
    let id = outbox::publish(&mut *tx, Message::new("charge 10 EUR").routing_key(&queue))
        .await
        .unwrap();
    outbox.commit(tx).await.unwrap();
    let mut consumer = Consumer::start(&conn, ConsumerSettings::new(&queue))
        .await
        .unwrap();
    let relay = outbox
        .spawn_relay(&conn, RelayOptions::default().lease(Duration::from_secs(1)))
        .await
        .unwrap();
    let first = tokio::time::timeout(Duration::from_secs(10), consumer.next())
        .await
        .unwrap()
        .unwrap();
    eventually(Duration::from_secs(10), "the lost mark", || {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM lost_marks")
                .fetch_one(&pool)
                .await
                .unwrap()
                == 1
        }
    })
    .await;
    assert_eq!(outbox.status().await.unwrap().pending, 1, "still pending");
    // Marks work again; once the lease is over the row is sent again.
    sqlx::raw_sql("DROP TRIGGER lose_mark")
        .execute(&pool)
        .await
        .unwrap();
    let mut deliveries = vec![first];

    // The consumer applies each message once, guarded by the inbox.
    sqlx::raw_sql("CREATE TABLE charges (message_id TEXT, amount TEXT)")
        .execute(&pool)
        .await
        .unwrap();
    let mut ids = Vec::new();
    for _ in 0..2 {
        let d = match deliveries.pop() {
            Some(d) => d,
            None => tokio::time::timeout(Duration::from_secs(10), consumer.next())
                .await
                .unwrap()
                .unwrap(),
        };
        let mid = d.properties.message_id.clone().unwrap();
        ids.push(mid.clone());
        let mut tx = pool.begin().await.unwrap();
        if outbox::inbox_claim(&mut *tx, "charges", &mid)
            .await
            .unwrap()
        {
            sqlx::query("INSERT INTO charges VALUES (?1, ?2)")
                .bind(&mid)
                .bind(String::from_utf8(d.body.to_vec()).unwrap())
                .execute(&mut *tx)
                .await
                .unwrap();
        }
        tx.commit().await.unwrap();
        d.ack().await.unwrap();
    }
    assert_eq!(
        ids,
        [id.clone(), id.clone()],
        "sent twice with the same message id"
    );
    let charges: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM charges")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(charges, 1, "the effect happened once");
    relay.stop().await.unwrap();
    conn.delete_queue(&queue).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_on_postgres_drain_ten_thousand_rows_without_duplicates() {
    const N: usize = 10_000;
    let conn = connect().await;
    let (queue, _) = queue_producer(&conn).await;
    let outbox = Outbox::connect(&pg_url().await).await.unwrap();
    let Database::Postgres(pool) = outbox.database().clone() else {
        unreachable!()
    };
    for chunk in 0..(N / 500) {
        let mut tx = pool.begin().await.unwrap();
        for i in 0..500 {
            let n = chunk * 500 + i;
            outbox::publish(
                &mut *tx,
                Message::new(format!("{n}"))
                    .routing_key(&queue)
                    .message_id(format!("r-{n}")),
            )
            .await
            .unwrap();
        }
        tx.commit().await.unwrap();
    }
    let opts = RelayOptions::default().batch(200);
    let a = outbox.spawn_relay(&conn, opts.clone()).await.unwrap();
    let b = outbox.spawn_relay(&conn, opts.owner("b")).await.unwrap();
    let mut consumer = Consumer::start(&conn, ConsumerSettings::new(&queue))
        .await
        .unwrap();
    let mut seen: HashMap<String, usize> = HashMap::new();
    while seen.len() < N {
        let d = tokio::time::timeout(Duration::from_secs(30), consumer.next())
            .await
            .unwrap_or_else(|_| panic!("only {} of {N} distinct ids arrived", seen.len()))
            .unwrap();
        *seen
            .entry(d.properties.message_id.clone().unwrap())
            .or_default() += 1;
        d.ack().await.unwrap();
    }
    eventually(Duration::from_secs(10), "the outbox to drain", || async {
        outbox.status().await.unwrap().pending == 0
    })
    .await;
    // Anything still in flight would be a duplicate.
    while let Ok(Some(d)) = tokio::time::timeout(Duration::from_millis(500), consumer.next()).await
    {
        *seen
            .entry(d.properties.message_id.clone().unwrap())
            .or_default() += 1;
        d.ack().await.unwrap();
    }
    let duplicates: usize = seen.values().map(|n| n - 1).sum();
    let max = seen.values().max().copied().unwrap_or(0);
    eprintln!(
        "two relays: {N} rows, {} distinct published, {duplicates} duplicates",
        seen.len()
    );
    assert_eq!(seen.len(), N, "every row published");
    assert!(max <= 2, "each at most twice");
    assert_eq!(duplicates, 0, "SKIP LOCKED keeps relays apart");
    a.stop().await.unwrap();
    b.stop().await.unwrap();
    conn.delete_queue(&queue).await.unwrap();
}

/// A handler that writes a row and publishes through its unit of work,
/// then fails on its first attempt when asked to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_handler_rows_publishes_and_ack_commit_together() {
    let conn = connect().await;
    let (events, events_producer) = queue_producer(&conn).await;
    let queue = unique("orders");
    let exchange = unique("ex");
    let db = Database::connect(&sqlite_url()).await.unwrap();
    let Database::Sqlite(pool) = db.clone() else {
        unreachable!()
    };
    sqlx::raw_sql("CREATE TABLE orders (name TEXT)")
        .execute(&pool)
        .await
        .unwrap();
    let attempts = Arc::new(AtomicUsize::new(0));
    #[derive(Clone)]
    struct Ctx {
        pool: sqlx::SqlitePool,
        events: Producer,
        attempts: Arc<AtomicUsize>,
    }
    let ctx = Ctx {
        pool: pool.clone(),
        events: events_producer,
        attempts: attempts.clone(),
    };
    let running = Worker::new(&conn, ctx)
        .consumer(
            ConsumerSettings::new(&queue).bind(&exchange, ExchangeKind::Topic, &["#"]),
            |meta: Meta, unit: UnitOfWork, State(ctx): State<Ctx>| async move {
                ctx.attempts.fetch_add(1, Ordering::SeqCst);
                let mut tx = ctx.pool.begin().await?;
                sqlx::query("INSERT INTO orders VALUES (?1)")
                    .bind(&meta.routing_key)
                    .execute(&mut *tx)
                    .await?;
                unit.publish(
                    &ctx.events,
                    Message::new(format!("created {}", meta.routing_key)),
                )?;
                if meta.routing_key == "flaky" && meta.attempt == 1 {
                    // Fails after writing and registering: both must vanish.
                    return Err(HandlerError::retry("payment service down"));
                }
                tx.commit().await?;
                Ok(())
            },
        )
        .retry(rabbitry::worker::Retry::attempts(3).delays([Duration::from_millis(100)]))
        .start()
        .await
        .unwrap();
    let producer = Producer::new(&conn, ProducerSettings::new(&exchange, ExchangeKind::Topic))
        .await
        .unwrap();
    producer
        .publish(Message::new("x").routing_key("flaky"))
        .await
        .unwrap();
    eventually(Duration::from_secs(10), "the retry", || async {
        attempts.load(Ordering::SeqCst) == 2
    })
    .await;
    // Each published event is read after its row is visible: rows commit first.
    let bodies = read_bodies(&conn, &events, 1).await;
    assert_eq!(
        bodies,
        ["created flaky"],
        "only the successful attempt published"
    );
    let rows: Vec<String> = sqlx::query_scalar("SELECT name FROM orders")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(rows, ["flaky"], "the failed attempt left no row");
    eventually(Duration::from_secs(5), "the ack", || async {
        conn.queue_status(&queue).await.unwrap().unwrap().messages == 0
    })
    .await;
    running.shutdown().await;
    for q in [
        queue.clone(),
        format!("{queue}.dead"),
        format!("{queue}.retry.100ms"),
        events,
    ] {
        conn.delete_queue(&q).await.unwrap();
    }
    conn.delete_exchange(&exchange).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_publish_at_commit_is_not_acked_as_success() {
    // The ack waits for the unit of work: when its publish is refused, the
    // delivery takes the retry path (here: one attempt, so dead-lettered
    // with the reason) instead of being acked or spun in a loop.
    let conn = connect().await;
    let queue = unique("uow");
    let calls = Arc::new(AtomicUsize::new(0));
    let mut ps = ProducerSettings::default().routing_key(unique("nowhere"));
    ps.mandatory = true;
    let nowhere = Producer::new(&conn, ps).await.unwrap();
    let running = Worker::new(&conn, (calls.clone(), nowhere))
        .consumer(ConsumerSettings::new(&queue), |unit: UnitOfWork, State((calls, nowhere)): State<(Arc<AtomicUsize>, Producer)>| async move {
            calls.fetch_add(1, Ordering::SeqCst);
            unit.publish(&nowhere, Message::new("lost?"))?;
            Ok::<(), HandlerError>(())
        })
        .retry(rabbitry::worker::Retry::never())
        .start()
        .await
        .unwrap();
    let p = Producer::new(&conn, ProducerSettings::default().routing_key(&queue))
        .await
        .unwrap();
    p.publish(Message::new("job")).await.unwrap();
    let dead = format!("{queue}.dead");
    eventually(Duration::from_secs(10), "the dead letter", || async {
        conn.queue_status(&dead).await.unwrap().unwrap().messages == 1
    })
    .await;
    running.shutdown().await;
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    let letters = rabbitry::worker::dead::list(&conn, &queue, 5)
        .await
        .unwrap();
    let reason = letters[0].error.clone().unwrap();
    assert!(
        reason.contains("publishing the handler's messages failed") && reason.contains("NO_ROUTE"),
        "{reason}"
    );
    for q in [queue.clone(), dead] {
        conn.delete_queue(&q).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_handler_finds_the_rabbitry_error_behind_a_failed_commit() {
    // The worker wraps the cause of its own failures instead of formatting
    // it: an error handler reaches the publish's rabbitry::Error, kind and
    // all, through HandlerError::find.
    let conn = connect().await;
    let queue = unique("uow-find");
    let mut ps = ProducerSettings::default().routing_key(unique("nowhere"));
    ps.mandatory = true;
    let nowhere = Producer::new(&conn, ps).await.unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let running = Worker::new(&conn, nowhere)
        .consumer(
            ConsumerSettings::new(&queue),
            |unit: UnitOfWork, State(nowhere): State<Producer>| async move {
                unit.publish(&nowhere, Message::new("lost?"))?;
                Ok::<(), HandlerError>(())
            },
        )
        .on_error("", move |_delivery, err| {
            let found = err.find::<rabbitry::Error>().map(rabbitry::Error::kind);
            let _ = tx.send((found, err.message()));
            async {}
        })
        .start()
        .await
        .unwrap();
    let p = Producer::new(&conn, ProducerSettings::default().routing_key(&queue))
        .await
        .unwrap();
    p.publish(Message::new("job")).await.unwrap();
    let (kind, message) = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("the error handler was called")
        .unwrap();
    running.shutdown().await;
    assert_eq!(kind, Some(rabbitry::ErrorKind::Unroutable), "{message}");
    assert!(
        message.starts_with("publishing the handler's messages failed: ")
            && message.matches("NO_ROUTE").count() == 1,
        "each cause once: {message}"
    );
    conn.delete_queue(&queue).await.unwrap();
    conn.delete_queue(&format!("{queue}.dead")).await.unwrap();
}
