//! Request/reply: a responder (a worker whose handler returns a reply)
//! and an `RpcClient` calling it over direct reply-to, with a deadline.
//!
//! ```sh
//! cargo run -p rabbitry --example rpc
//! ```

use std::time::Duration;

use rabbitry::rpc::{RpcClient, RpcSettings};
use rabbitry::worker::{Json, Msg, Worker};
use rabbitry::{Connection, ConnectionSettings, ConsumerSettings, Serializer};

#[derive(serde::Deserialize)]
struct Sum {
    a: i64,
    b: i64,
}

/// Starts a responder on a queue of `prefix`, calls it, returns the answer.
pub(crate) async fn run(url: &str, prefix: &str) -> rabbitry::Result<i64> {
    let conn = Connection::open(ConnectionSettings::new(url)).await?;
    let queue = format!("{prefix}.sums");
    // The responder: whatever the handler returns goes to `reply_to`.
    let responder = Worker::new(&conn, ())
        .consumer(
            ConsumerSettings::new(&queue),
            |Msg(s): Msg<Sum>| async move { Json(serde_json::json!({"sum": s.a + s.b})) },
        )
        .start()
        .await?;

    let client = RpcClient::new(
        &conn,
        RpcSettings {
            timeout: Duration::from_secs(5),
            ..RpcSettings::default()
        },
    )
    .await?;
    let answer: serde_json::Value = client
        .call_value(
            &queue,
            Serializer::Msgpack,
            &serde_json::json!({"a": 2, "b": 40}),
        )
        .await?;
    println!("2 + 40 = {}", answer["sum"]);

    responder.shutdown().await;
    for q in [
        queue.clone(),
        format!("{queue}.dead"),
        format!("{queue}.retry.1s"),
        format!("{queue}.retry.5s"),
    ] {
        conn.delete_queue(&q).await?;
    }
    conn.close().await;
    Ok(answer["sum"].as_i64().unwrap_or_default())
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
