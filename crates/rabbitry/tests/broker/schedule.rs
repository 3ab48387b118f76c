//! Scheduled delivery from the outbox: rows published no earlier than
//! their time, in order, across a relay restart; cancelled rows never; a
//! due row found at once among a million future ones; rows written by
//! another program, validated.

use std::time::{Duration, SystemTime};

use rabbitry::outbox::{self, Database, Outbox, RelayOptions};
use rabbitry::{Consumer, ConsumerSettings, ErrorKind, Message, Queue, Topology};

use crate::support::{connect, eventually, pg_url, sqlite_url, unique};

fn millis(t: SystemTime) -> i64 {
    rabbitry::clock::millis_of(t)
}

/// The next delivery on `consumer` within `limit`: its body and when it
/// arrived (epoch ms).
async fn arrival(consumer: &mut Consumer, limit: Duration) -> Option<(String, i64)> {
    let d = tokio::time::timeout(limit, consumer.next()).await.ok()??;
    let at = rabbitry::clock::now_millis();
    d.ack().await.unwrap();
    Some((String::from_utf8(d.body.to_vec()).unwrap(), at))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_messages_arrive_in_order_never_early_across_a_relay_restart_and_a_cancelled_one_never(
) {
    let conn = connect().await;
    let queue = unique("scheduled");
    let mut t = Topology::default();
    t.queue(Queue::durable(&queue));
    conn.declare(&t).await.unwrap();
    let outbox = Outbox::connect(&sqlite_url()).await.unwrap();
    let start = SystemTime::now();
    let plan = [("first", 2), ("second", 4), ("cancelled", 5), ("third", 6)];
    let mut ids = Vec::new();
    let mut tx = outbox.begin::<sqlx::Sqlite>().await.unwrap();
    for (body, secs) in plan {
        let when = start + Duration::from_secs(secs);
        ids.push((
            body,
            when,
            tx.publish_at(Message::new(body).routing_key(&queue), when)
                .unwrap(),
        ));
    }
    tx.commit().await.unwrap();
    let status = outbox.status().await.unwrap();
    assert_eq!((status.pending, status.scheduled), (0, 4), "{status:?}");
    let listed = outbox.scheduled(10).await.unwrap();
    assert_eq!(listed.len(), 4);
    assert_eq!(listed[0].message_id, ids[0].2, "next due first");

    outbox.cancel(&ids[2].2).await.unwrap();
    let again = outbox.cancel(&ids[2].2).await.unwrap_err();
    assert_eq!(again.kind(), ErrorKind::NotFound, "{again}");

    let mut consumer = Consumer::start(&conn, ConsumerSettings::new(&queue))
        .await
        .unwrap();
    let relay = outbox
        .spawn_relay(&conn, RelayOptions::default())
        .await
        .unwrap();
    let mut arrived = Vec::new();
    for _ in 0..2 {
        arrived.push(
            arrival(&mut consumer, Duration::from_secs(10))
                .await
                .expect("a scheduled message"),
        );
    }
    // The relay stops between the second and the third due time, and the
    // third's time passes while it is down.
    relay.stop().await.unwrap();
    let third_due = ids[3].1;
    let down_until = third_due + Duration::from_millis(500);
    tokio::time::sleep(
        down_until
            .duration_since(SystemTime::now())
            .unwrap_or_default(),
    )
    .await;
    assert!(
        arrival(&mut consumer, Duration::from_millis(100))
            .await
            .is_none(),
        "nothing is published while no relay runs"
    );
    let relay = outbox
        .spawn_relay(&conn, RelayOptions::default())
        .await
        .unwrap();
    arrived.push(
        arrival(&mut consumer, Duration::from_secs(10))
            .await
            .expect("the third, after the restart"),
    );
    assert!(
        arrival(&mut consumer, Duration::from_millis(1500))
            .await
            .is_none(),
        "the cancelled message never arrives"
    );

    let bodies: Vec<&str> = arrived.iter().map(|(b, _)| b.as_str()).collect();
    assert_eq!(bodies, ["first", "second", "third"]);
    for ((body, at), (_, due, _)) in arrived.iter().zip([&ids[0], &ids[1], &ids[3]]) {
        let late = at - millis(*due);
        println!(
            "{body}: due {}, arrived {late} ms after its time",
            rabbitry::clock::rfc3339(*due)
        );
        assert!(late >= 0, "{body} arrived {} ms early", -late);
    }
    // Published is not cancellable.
    let published = outbox.cancel(&ids[0].2).await.unwrap_err();
    assert_eq!(published.kind(), ErrorKind::NotFound);
    assert!(
        published.to_string().contains("published already"),
        "{published}"
    );
    eventually(
        Duration::from_secs(10),
        "nothing left to publish",
        || async {
            let status = outbox.status().await.unwrap();
            (status.pending, status.scheduled) == (0, 0)
        },
    )
    .await;
    relay.stop().await.unwrap();
    conn.delete_queue(&queue).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_time_in_the_past_is_due_at_once() {
    let conn = connect().await;
    let queue = unique("scheduled-past");
    let mut t = Topology::default();
    t.queue(Queue::durable(&queue));
    conn.declare(&t).await.unwrap();
    let outbox = Outbox::connect(&sqlite_url()).await.unwrap();
    let relay = outbox
        .spawn_relay(&conn, RelayOptions::default())
        .await
        .unwrap();
    let Database::Sqlite(pool) = outbox.database() else {
        unreachable!()
    };
    let mut tx = pool.begin().await.unwrap();
    let past = SystemTime::now() - Duration::from_secs(3600);
    outbox::publish_at(&mut *tx, Message::new("late").routing_key(&queue), past)
        .await
        .unwrap();
    outbox.commit(tx).await.unwrap();
    let mut consumer = Consumer::start(&conn, ConsumerSettings::new(&queue))
        .await
        .unwrap();
    let (body, _) = arrival(&mut consumer, Duration::from_secs(10))
        .await
        .expect("published at once");
    assert_eq!(body, "late");
    relay.stop().await.unwrap();
    conn.delete_queue(&queue).await.unwrap();
}

/// Drops the schema `pg_url` made (a million rows are not left behind).
async fn drop_schema(url: &str) {
    let schema = url
        .split("search_path%3D")
        .nth(1)
        .expect("a pg_url with its schema")
        .to_owned();
    let base = url.split('?').next().unwrap();
    let pool = sqlx::PgPool::connect(base).await.unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE")))
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_due_row_among_a_million_future_rows_is_published_at_its_time() {
    let conn = connect().await;
    let queue = unique("scheduled-million");
    let mut t = Topology::default();
    t.queue(Queue::durable(&queue));
    conn.declare(&t).await.unwrap();
    let url = pg_url().await;
    let outbox = Outbox::connect(&url).await.unwrap();
    let Database::Postgres(pool) = outbox.database() else {
        unreachable!()
    };
    // A million rows due in a day or more, written by SQL in one go.
    let loaded = std::time::Instant::now();
    let future = millis(SystemTime::now()) + 86_400_000;
    sqlx::query(
        "INSERT INTO rabbitry_outbox (message_id, exchange, routing_key, properties, body, created_at, not_before) \
         SELECT 'future-' || n, '', $1, '{}', '\\x00'::bytea, $2, $2 + n FROM generate_series(1, 1000000) AS n",
    )
    .bind(&queue)
    .bind(future)
    .execute(pool)
    .await
    .unwrap();
    sqlx::raw_sql("ANALYZE rabbitry_outbox")
        .execute(pool)
        .await
        .unwrap();
    println!("a million future rows written in {:?}", loaded.elapsed());

    let relay = outbox
        .spawn_relay(&conn, RelayOptions::default())
        .await
        .unwrap();
    let mut consumer = Consumer::start(&conn, ConsumerSettings::new(&queue))
        .await
        .unwrap();
    let mut lateness = Vec::new();
    for i in 0..5 {
        let when = SystemTime::now() + Duration::from_millis(700);
        let mut tx = pool.begin().await.unwrap();
        outbox::publish_at(
            &mut *tx,
            Message::new(format!("due-{i}")).routing_key(&queue),
            when,
        )
        .await
        .unwrap();
        tx.commit().await.unwrap();
        let (body, at) = arrival(&mut consumer, Duration::from_secs(10))
            .await
            .expect("the due row");
        assert_eq!(body, format!("due-{i}"));
        let late = at - millis(when);
        assert!(late >= 0, "{late} ms early");
        lateness.push(late);
    }
    println!(
        "among 1,000,000 future rows, due rows arrived {lateness:?} ms after their time (target: within 100 ms)"
    );
    // The relay deletes a row after its confirm, a moment after the
    // consumer may have it.
    eventually(Duration::from_secs(10), "the due rows deleted", || async {
        outbox.status().await.unwrap().pending == 0
    })
    .await;
    assert_eq!(outbox.status().await.unwrap().scheduled, 1_000_000);
    relay.stop().await.unwrap();
    pool.close().await;
    drop_schema(&url).await;
    conn.delete_queue(&queue).await.unwrap();
}
