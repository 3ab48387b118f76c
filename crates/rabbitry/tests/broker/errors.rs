//! Bad input gets a clear error: wrong credentials or host, and a
//! declaration that conflicts with the broker.

use rabbitry::{Connection, ConnectionSettings, ErrorKind, Queue, Topology};

use crate::support::{connect, unique};

#[tokio::test]
async fn wrong_credentials_say_access_refused_and_name_the_host() {
    let err = Connection::open(ConnectionSettings::new(
        "amqp://guest:wrong@127.0.0.1:5672/%2f",
    ))
    .await
    .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::AccessRefused, "{err}");
    let text = err.to_string();
    assert!(
        text.contains("127.0.0.1:5672") && text.contains("access refused"),
        "{text}"
    );
    assert!(
        !text.contains("wrong"),
        "the password is not printed: {text}"
    );
}

#[tokio::test]
async fn unreachable_host_says_connection_refused_and_names_it() {
    let err = Connection::open(ConnectionSettings::new(
        "amqp://guest:guest@127.0.0.1:1/%2f",
    ))
    .await
    .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Connect, "{err}");
    let text = err.to_string();
    assert!(
        text.contains("127.0.0.1:1") && text.contains("connection refused"),
        "{text}"
    );
}

#[tokio::test]
async fn conflicting_declaration_names_the_queue_and_argument_without_reconnecting() {
    let conn = connect().await;
    let name = unique("conflict");
    let mut durable = Topology::default();
    durable.queue(Queue::durable(&name));
    conn.declare(&durable).await.unwrap();
    let mut transient = Topology::default();
    let mut q = Queue::durable(&name);
    q.durable = false;
    transient.queue(q);
    let err = conn.declare(&transient).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Declare, "{err}");
    let text = err.to_string();
    assert!(text.contains(&name), "names the queue: {text}");
    assert!(
        text.contains("PRECONDITION_FAILED") && text.contains("durable"),
        "names the argument: {text}"
    );
    // A channel error is not a connection error: no reconnect happened.
    assert_eq!(conn.generation(), 1);
    assert!(conn.is_connected());
    conn.delete_queue(&name).await.unwrap();
}

#[tokio::test]
async fn a_negative_delivery_limit_is_not_sent_to_a_3x_broker() {
    let conn = connect().await;
    let server = conn.server().expect("connected");
    assert!(server.starts_with("RabbitMQ "), "{server}");
    let version = server.trim_start_matches("RabbitMQ ");
    let queue = unique("limit");
    let mut q = Queue::quorum(&queue);
    q.arguments
        .insert("x-delivery-limit".into(), rabbitry::HeaderValue::Int(-1));
    let mut t = Topology::default();
    t.queue(q);
    let result = conn.declare_once(&t).await;
    if version.starts_with("3.") {
        let e = result.expect_err("refused before it reaches the broker");
        assert_eq!(e.kind(), ErrorKind::Declare);
        assert!(
            e.to_string().contains(&format!("RabbitMQ {version}")),
            "{e}"
        );
        assert!(
            conn.queue_status(&queue).await.unwrap().is_none(),
            "nothing declared"
        );
    } else {
        result.expect("unlimited on RabbitMQ 4");
        conn.delete_queue(&queue).await.unwrap();
    }
    conn.close().await;
}
