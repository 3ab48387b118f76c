//! HTTP dispatch: the worker forwarding each delivery to an HTTP
//! application over a keep-alive connection, against a raw loop doing the
//! same HTTP calls, one at a time, fed by raw consume with manual acks.
//! Both sides call the same minimal axum app, which counts the requests.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use amqprs::channel::{BasicAckArguments, BasicPublishArguments};
use amqprs::connection::Connection as RawConnection;
use amqprs::BasicProperties;
use axum::body::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::sync::Notify;

use rabbitry::connection::{Connection, ConnectionSettings, Endpoint};
use rabbitry::worker::{Retry, Worker};
use rabbitry::{ConsumerSettings, Error, ErrorKind, Result};

use super::{
    open_raw, purge, raw_consume, raw_err, BenchOptions, Progress, Rounds, ScenarioResult, BODY,
};

/// The app both sides call: it answers 200 and counts.
struct App {
    url: String,
    served: Arc<AtomicU64>,
    reached: Arc<Notify>,
    target: Arc<AtomicU64>,
}

async fn serve() -> Result<App> {
    let served = Arc::new(AtomicU64::new(0));
    let reached = Arc::new(Notify::new());
    let target = Arc::new(AtomicU64::new(u64::MAX));
    let router = axum::Router::new().fallback({
        let (served, reached, target) = (served.clone(), reached.clone(), target.clone());
        move || {
            let (served, reached, target) = (served.clone(), reached.clone(), target.clone());
            async move {
                if served.fetch_add(1, Ordering::Relaxed) + 1 == target.load(Ordering::Relaxed) {
                    reached.notify_one();
                }
                axum::http::StatusCode::OK
            }
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| Error::new(ErrorKind::Connect, "bench HTTP app").with_source(e))?;
    let addr = listener
        .local_addr()
        .map_err(|e| Error::new(ErrorKind::Connect, "bench HTTP app").with_source(e))?;
    tokio::spawn(async move { axum::serve(listener, router).await });
    Ok(App {
        url: format!("http://{addr}/amqp"),
        served,
        reached,
        target,
    })
}

/// The HTTP-dispatch scenario.
pub(crate) async fn run_http(
    opts: &BenchOptions,
    progress: Progress<'_>,
) -> Result<ScenarioResult> {
    let ep = Endpoint::parse(&opts.url)?;
    let raw = open_raw(&ep).await?;
    let raw_publisher = open_raw(&ep).await?;
    let gw =
        Connection::open(ConnectionSettings::new(&opts.url).name("rabbitry-bench-http")).await?;
    let queue = format!(
        "rabbitry.bench.http.{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let mut topology = rabbitry::topology::Topology::default();
    topology.queue(rabbitry::topology::Queue::durable(&queue));
    gw.declare_once(&topology).await?;
    let app = serve().await?;
    // HTTP round trips are slower than AMQP ones: a quarter of the messages.
    let n = (opts.messages / 4).max(1);
    let mut rounds = Rounds::default();
    for round in 0..opts.rounds.max(1) {
        progress(&format!("http dispatch: raw round {}", round + 1));
        publish(&raw_publisher, &queue, n).await?;
        rounds
            .measure(false, n, raw_dispatch(&raw, &queue, n, &app.url))
            .await?;
        purge(&raw, &queue).await?;

        progress(&format!("http dispatch: gateway round {}", round + 1));
        publish(&raw_publisher, &queue, n).await?;
        rounds
            .measure(true, n, worker_dispatch(&gw, &queue, n, &app))
            .await?;
        purge(&raw, &queue).await?;
    }
    for q in [queue.clone(), format!("{queue}.dead")] {
        let _ = gw.delete_queue(&q).await;
    }
    let _ = raw_publisher.close().await;
    let _ = raw.close().await;
    gw.close().await;
    Ok(rounds.result("worker_http_dispatch_keep_alive"))
}

/// Fills the queue first, so both sides measure dispatch alone.
async fn publish(raw: &RawConnection, queue: &str, n: usize) -> Result<()> {
    let ch = raw.open_channel(None).await.map_err(raw_err)?;
    let mut props = BasicProperties::default();
    props
        .with_delivery_mode(1)
        .with_content_type("application/octet-stream");
    let props = props.finish();
    for _ in 0..n {
        ch.basic_publish(
            props.clone(),
            vec![b'x'; BODY],
            BasicPublishArguments::new("", queue),
        )
        .await
        .map_err(raw_err)?;
    }
    super::wait_for_depth(raw, queue, n).await?;
    let _ = ch.close().await;
    Ok(())
}

/// Raw consume, one HTTP POST per delivery on a keep-alive client, then
/// the ack: what the worker does, written directly.
async fn raw_dispatch(raw: &RawConnection, queue: &str, n: usize, url: &str) -> Result<Duration> {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let (ch, tag, mut rx) = raw_consume(raw, queue).await?;
    let start = Instant::now();
    for _ in 0..n {
        let m = rx
            .recv()
            .await
            .ok_or_else(|| Error::new(ErrorKind::Closed, "raw consumer ended"))?;
        let body = Bytes::from(m.content.unwrap_or_default());
        let request = hyper::Request::post(url)
            .header("content-type", "application/octet-stream")
            .body(Full::new(body))
            .map_err(|e| Error::new(ErrorKind::Invalid, "bench request").with_source(e))?;
        let response = client
            .request(request)
            .await
            .map_err(|e| Error::new(ErrorKind::Connect, "bench HTTP app").with_source(e))?;
        let _ = response.into_body().collect().await;
        let tag = m.deliver.map(|d| d.delivery_tag()).unwrap_or_default();
        ch.basic_ack(BasicAckArguments::new(tag, false))
            .await
            .map_err(raw_err)?;
    }
    let took = start.elapsed();
    let _ = ch
        .basic_cancel(amqprs::channel::BasicCancelArguments::new(&tag))
        .await;
    let _ = ch.close().await;
    Ok(took)
}

/// The worker forwarding to the app's URL, one delivery at a time, with
/// the same prefetch as the raw side. The time includes starting the
/// worker (declaring its retry queues), which favours the raw side.
async fn worker_dispatch(gw: &Connection, queue: &str, n: usize, app: &App) -> Result<Duration> {
    let before = app.served.load(Ordering::Relaxed);
    app.target.store(before + n as u64, Ordering::Relaxed);
    let mut consumer = ConsumerSettings::new(queue).name("bench-http");
    consumer.prefetch_count = Some(500);
    consumer.auto_declare = false;
    let start = Instant::now();
    let running = Worker::new(gw, ())
        .forward(consumer, app.url.clone())
        .retry(Retry::never())
        .start()
        .await?;
    app.reached.notified().await;
    let took = start.elapsed();
    running.shutdown().await;
    Ok(took)
}
