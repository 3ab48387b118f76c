//! A worker: deliveries dispatched to a native handler (an async function
//! with extractors) and to an axum `Router` (the delivery arrives as a
//! `POST /{connection}/{exchange}/{routing_key}` request), one at a time.
//!
//! ```sh
//! cargo run -p rabbitry --example worker
//! ```

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::routing::post;
use rabbitry::worker::{HandlerError, Meta, Msg, Retry, State, Worker};
use rabbitry::{
    Connection, ConnectionSettings, ConsumerSettings, ExchangeKind, Message, Producer,
    ProducerSettings, Serializer,
};

#[derive(serde::Deserialize)]
struct Order {
    id: u64,
}

/// A native handler: the body decoded by its content type, the routing,
/// and the worker's state.
async fn save_order(
    Msg(order): Msg<Order>,
    meta: Meta,
    State(handled): State<Arc<AtomicUsize>>,
) -> Result<(), HandlerError> {
    if order.id == 0 {
        return Err(HandlerError::invalid("order 0 does not exist")); // dead-lettered
    }
    println!("order {} via {}", order.id, meta.routing_key);
    handled.fetch_add(1, Ordering::SeqCst);
    Ok(()) // acked
}

/// Runs a worker with both kinds of handler on queues of `prefix`, sends
/// two orders and two invoices, and returns how many were handled.
pub(crate) async fn run(url: &str, prefix: &str) -> rabbitry::Result<usize> {
    let conn = Connection::open(ConnectionSettings::new(url)).await?;
    let shop = format!("{prefix}.shop");
    let handled = Arc::new(AtomicUsize::new(0));
    let invoices = axum::Router::new().route(
        "/{connection}/{exchange}/{key}",
        post({
            let handled = handled.clone();
            move |body: String| async move {
                println!("invoice {body} via HTTP-style dispatch");
                handled.fetch_add(1, Ordering::SeqCst);
                axum::http::StatusCode::OK // 2xx acks; 409 requeues; 4xx dead-letters
            }
        }),
    );
    let worker = Worker::new(&conn, handled.clone())
        .consumer(
            ConsumerSettings::new(format!("{prefix}.orders")).bind(
                &shop,
                ExchangeKind::Topic,
                &["order.*"],
            ),
            save_order,
        )
        .retry(Retry::attempts(3).delays([Duration::from_millis(500)]))
        .concurrency(1)
        .service(
            ConsumerSettings::new(format!("{prefix}.invoices")).bind(
                &shop,
                ExchangeKind::Topic,
                &["invoice.*"],
            ),
            invoices,
        );
    // What it declares, for the cleanup at the end.
    let topology = worker.topology();
    let running = worker.start().await?;

    let producer = Producer::new(&conn, ProducerSettings::new(&shop, ExchangeKind::Topic)).await?;
    for id in [1, 2] {
        let order = serde_json::json!({"id": id});
        producer
            .publish(Message::encode(Serializer::Json, &order)?.routing_key("order.created"))
            .await?;
        producer
            .publish(Message::new(format!("#{id}")).routing_key("invoice.created"))
            .await?;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while handled.load(Ordering::SeqCst) < 4 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    running.shutdown().await;
    for q in &topology.queues {
        conn.delete_queue(&q.name).await?;
    }
    conn.delete_exchange(&shop).await?;
    conn.close().await;
    Ok(handled.load(Ordering::SeqCst))
}

#[tokio::main]
async fn main() -> rabbitry::Result<()> {
    run(
        rabbitry::defaults::URL,
        &format!("example.{}", std::process::id()),
    )
    .await
    .map(drop)
}
