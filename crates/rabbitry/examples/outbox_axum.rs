//! The durable outbox with an axum app on SQLite: the web handler writes
//! its order and the message that announces it in one database
//! transaction; the relay publishes the message, confirmed, after the
//! commit. A crash between the two can lose neither.
//!
//! ```sh
//! cargo run -p rabbitry --example outbox_axum
//! ```

use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::Json;
use rabbitry::outbox::{self, Outbox, RelayOptions};
use rabbitry::{Connection, ConnectionSettings, Consumer, ConsumerSettings, Message, Serializer};

#[derive(Clone)]
struct App {
    outbox: Outbox,
    queue: String,
}

#[derive(serde::Deserialize, serde::Serialize)]
struct Order {
    item: String,
}

/// `POST /orders`: the order row and its message, in one transaction.
async fn create_order(State(app): State<App>, Json(order): Json<Order>) -> StatusCode {
    let result: Result<(), Box<dyn std::error::Error + Send + Sync>> = async {
        let mut tx = app.outbox.begin::<sqlx::Sqlite>().await?;
        sqlx::query("INSERT INTO orders (item) VALUES (?1)")
            .bind(&order.item)
            .execute(&mut *tx)
            .await?;
        let message = Message::encode(Serializer::Json, &order)?.routing_key(&app.queue);
        tx.publish(message)?; // staged; written in this transaction at commit
        tx.commit().await?; // writes, commits, then wakes the relay at once
        Ok(())
    }
    .await;
    match result {
        Ok(()) => StatusCode::ACCEPTED,
        Err(e) => {
            eprintln!("order not taken: {e}");
            StatusCode::INTERNAL_SERVER_ERROR
        }
    }
}

/// Builds the app, posts one order to it, and returns the body
/// of the message that arrived on the queue of `prefix`.
pub(crate) async fn run(
    url: &str,
    prefix: &str,
    database_dir: &std::path::Path,
) -> rabbitry::Result<String> {
    let conn = Connection::open(ConnectionSettings::new(url)).await?;
    let queue = format!("{prefix}.orders");
    let url = format!("sqlite://{}/shop.db", database_dir.display());
    let outbox = Outbox::connect(&url).await?; // creates the outbox tables
    let mut tx = outbox.begin::<sqlx::Sqlite>().await?;
    sqlx::raw_sql("CREATE TABLE IF NOT EXISTS orders (item TEXT NOT NULL)")
        .execute(&mut *tx)
        .await
        .map_err(|e| outbox::db_error(&url, "creating the orders table", e))?;
    tx.commit().await?;
    let mut consumer = Consumer::start(&conn, ConsumerSettings::new(&queue)).await?;
    let relay = outbox.spawn_relay(&conn, RelayOptions::default()).await?;

    let app = axum::Router::new()
        .route("/orders", post(create_order))
        .with_state(App {
            outbox,
            queue: queue.clone(),
        });
    // A client posts an order. The router is called as the server would
    // call it (`axum::serve(listener, app)` in a real app), so the example
    // needs no port.
    let request = axum::http::Request::post("/orders")
        .header("content-type", "application/json")
        .body(axum::body::Body::from(r#"{"item":"book"}"#))
        .map_err(|e| {
            rabbitry::Error::new(rabbitry::ErrorKind::Invalid, "the request").with_source(e)
        })?;
    let response = tower::ServiceExt::oneshot(app, request)
        .await
        .map_err(|e| match e {})?;
    println!("the app answered {}", response.status());

    let delivery = tokio::time::timeout(Duration::from_secs(10), consumer.next())
        .await
        .ok()
        .flatten()
        .ok_or_else(|| {
            rabbitry::Error::new(rabbitry::ErrorKind::Timeout, "no message within 10 s")
        })?;
    let text = String::from_utf8_lossy(&delivery.body).into_owned();
    println!("the relay published: {text}");
    delivery.ack().await?;

    relay.stop().await?;
    consumer.cancel().await;
    conn.delete_queue(&queue).await?;
    conn.close().await;
    Ok(text)
}

#[tokio::main]
async fn main() -> rabbitry::Result<()> {
    let dir = std::env::temp_dir().join(format!("rabbitry-example-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| {
        rabbitry::Error::new(rabbitry::ErrorKind::Database, "creating the data folder")
            .with_source(e)
    })?;
    run(
        rabbitry::defaults::URL,
        &format!("example.{}", std::process::id()),
        &dir,
    )
    .await
    .map(drop)
}
