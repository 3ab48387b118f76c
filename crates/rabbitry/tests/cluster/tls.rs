//! `amqps://` against the cluster's TLS ports, with the test CA that
//! `scripts/cluster` makes: publishing and consuming, the refusals in plain
//! words, mutual TLS with the EXTERNAL mechanism, and recovery after the
//! node is killed.

use std::time::Duration;

use rabbitry::{
    Connection, ConnectionSettings, Consumer, ConsumerSettings, ErrorKind, Message, Producer,
    ProducerSettings,
};
use rabbitry_test_support::{cluster, unique};

use crate::SERIAL;

fn ca() -> String {
    cluster::tls_file("ca.pem").display().to_string()
}

async fn open(url: &str, name: &str) -> rabbitry::Result<Connection> {
    let mut settings = ConnectionSettings::new(url).name(name);
    settings.backoff_initial = Duration::from_millis(100);
    settings.backoff_max = Duration::from_secs(1);
    settings.recovery_timeout = Duration::from_secs(60);
    Connection::open(settings).await
}

/// Publishes one message through `conn` to a new queue and consumes it.
async fn round_trip(conn: &Connection, body: &str) {
    let queue = unique("tls");
    let mut consumer = Consumer::start(conn, ConsumerSettings::new(&queue))
        .await
        .unwrap();
    let producer = Producer::new(conn, ProducerSettings::default().routing_key(&queue))
        .await
        .unwrap();
    producer.publish(Message::new(body)).await.unwrap();
    let delivery = tokio::time::timeout(Duration::from_secs(10), consumer.next())
        .await
        .expect("a delivery within 10 s")
        .expect("the consumer is open");
    assert_eq!(delivery.body, body.as_bytes());
    delivery.ack().await.unwrap();
    consumer.cancel().await;
    conn.delete_queue(&queue).await.unwrap();
}

async fn refused(url: &str) -> rabbitry::Error {
    open(url, &unique("tls.refused"))
        .await
        .expect_err("the connect is refused")
}

/// One cluster for the three parts: forming it takes longer than they do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls() {
    let _serial = SERIAL.lock().await;
    let _cluster = cluster::start();
    refusals_say_why().await;
    mutual_tls_logs_in_by_the_client_certificate().await;
    amqps_with_the_test_ca_publishes_consumes_and_recovers().await;
}

async fn amqps_with_the_test_ca_publishes_consumes_and_recovers() {
    let name = unique("tls.client");
    let conn = open(
        &cluster::tls_url(1, "localhost", &format!("cacertfile={}", ca())),
        &name,
    )
    .await
    .unwrap();
    round_trip(&conn, "over TLS").await;

    // The broker sees a TLS connection under the client's name.
    let listed = cluster::ctl(1, &["list_connections", "ssl", "client_properties"]).unwrap();
    assert!(
        listed
            .lines()
            .any(|l| l.starts_with("true") && l.contains(&format!("\"{name} ("))),
        "{listed}"
    );

    // The node dies and comes back: the same connection works again.
    let generation = conn.generation();
    cluster::kill(1);
    cluster::revive(1);
    rabbitry_test_support::eventually(Duration::from_secs(30), "reconnected over TLS", || async {
        conn.generation() > generation && conn.is_connected()
    })
    .await;
    round_trip(&conn, "over TLS, after the node came back").await;
    conn.close().await;
}

async fn refusals_say_why() {
    let other_ca = cluster::tls_file("other-ca.pem").display().to_string();

    let e = refused(&cluster::tls_url(
        1,
        "localhost",
        &format!("cacertfile={other_ca}"),
    ))
    .await;
    assert_eq!(e.kind(), ErrorKind::Tls, "{e}");
    assert!(e.to_string().contains("certificate not trusted"), "{e}");

    // The certificate names localhost, not 127.0.0.1.
    let e = refused(&cluster::tls_url(
        1,
        "127.0.0.1",
        &format!("cacertfile={}", ca()),
    ))
    .await;
    assert_eq!(e.kind(), ErrorKind::Tls, "{e}");
    assert!(e.to_string().contains("name mismatch"), "{e}");
    assert!(e.to_string().contains("`127.0.0.1`"), "{e}");
    // ... which server_name_indication sets right.
    let conn = open(
        &cluster::tls_url(
            1,
            "127.0.0.1",
            &format!("cacertfile={}&server_name_indication=localhost", ca()),
        ),
        &unique("tls.sni"),
    )
    .await
    .unwrap();
    conn.close().await;

    // amqps:// to the plain port, and amqp:// to the TLS port.
    let e = refused(&format!(
        "amqps://guest:guest@localhost:5681/%2f?cacertfile={}",
        ca()
    ))
    .await;
    assert_eq!(e.kind(), ErrorKind::Tls, "{e}");
    assert!(e.to_string().contains("plain AMQP port"), "{e}");
    let e = refused("amqp://guest:guest@localhost:5691/%2f").await;
    assert!(e.to_string().contains("amqps://"), "{e}");

    // A key file that cannot be read is named.
    let e = refused(&cluster::tls_url(
        1,
        "localhost",
        &format!(
            "cacertfile={}&certfile={}&keyfile=/nonexistent/client.key",
            ca(),
            cluster::tls_file("client.pem").display()
        ),
    ))
    .await;
    assert!(e.to_string().contains("/nonexistent/client.key"), "{e}");

    // Verification can be turned off, by its loud name only.
    let conn = open(
        &cluster::tls_url(1, "127.0.0.1", "verify=verify_none"),
        &unique("tls.unverified"),
    )
    .await
    .unwrap();
    conn.close().await;
}

async fn mutual_tls_logs_in_by_the_client_certificate() {
    // The client certificate says CN=guest; with auth_mechanism=external the
    // broker logs the connection in as that name, and no password is sent.
    let query = format!(
        "cacertfile={}&certfile={}&keyfile={}&auth_mechanism=external",
        ca(),
        cluster::tls_file("client.pem").display(),
        cluster::tls_file("client.key").display()
    );
    let url = cluster::tls_url(2, "localhost", &query).replace("guest:guest@", "nobody:wrong@");
    let name = unique("tls.mutual");
    let conn = open(&url, &name).await.unwrap();
    round_trip(&conn, "authenticated by certificate").await;
    let listed = cluster::ctl(
        2,
        &[
            "list_connections",
            "auth_mechanism",
            "user",
            "peer_cert_subject",
            "client_properties",
        ],
    )
    .unwrap();
    let line = listed
        .lines()
        .find(|l| l.contains(&format!("\"{name} (")))
        .unwrap_or_else(|| panic!("{name} not listed: {listed}"));
    assert!(line.starts_with("EXTERNAL\tguest\tCN=guest"), "{line}");
    conn.close().await;

    // Without the certificate, EXTERNAL has nothing to log in with.
    let e = refused(&cluster::tls_url(
        2,
        "localhost",
        &format!("cacertfile={}&auth_mechanism=external", ca()),
    ))
    .await;
    assert_eq!(e.kind(), ErrorKind::AccessRefused, "{e}");
}
