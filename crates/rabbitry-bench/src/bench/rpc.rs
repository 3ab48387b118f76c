//! Request/reply: the RPC client against raw amqprs on direct reply-to.

use std::time::{Duration, Instant};

use amqprs::channel::{
    BasicConsumeArguments, BasicPublishArguments, Channel, QueueDeclareArguments,
};
use amqprs::connection::Connection as RawConnection;
use amqprs::BasicProperties;
use tokio::task::JoinSet;

use rabbitry::connection::{Connection, ConnectionSettings, Endpoint};
use rabbitry::Message;
use rabbitry::{Error, ErrorKind, Result};

use super::*;

/// RPC: sequential round trips (p50, p99) and throughput with 64 calls in
/// flight, through `RpcClient` and through raw
/// amqprs doing the same (direct reply-to), against one raw responder.
pub(crate) async fn run_rpc(
    opts: &BenchOptions,
    progress: Progress<'_>,
) -> Result<(Vec<ScenarioResult>, Vec<LatencyResult>)> {
    use rabbitry::rpc::{RpcClient, RpcSettings};
    let ep = Endpoint::parse(&opts.url)?;
    let raw = open_raw(&ep).await?;
    let gw = Connection::open(ConnectionSettings::new(&opts.url).name("rabbitry-bench")).await?;
    let queue = format!(
        "rabbitry.bench.rpc.{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let responder = spawn_raw_responder(&raw, &queue).await?;
    let calls = (opts.messages / 10).clamp(200, 5_000);

    let client = RpcClient::new(&gw, RpcSettings::default()).await?;
    let body = vec![b'x'; BODY];
    // The sequential round whose median latency is lowest, per side, for
    // the latency percentiles; every round counts for the rates.
    let mut best_seq = [Vec::new(), Vec::new()];
    let mut sequential = Rounds::default();
    let mut windowed = Rounds::default();
    for round in 0..opts.rounds.max(1) {
        progress(&format!("rpc: raw sequential, round {}", round + 1));
        let cpu = cpu_time();
        let samples = raw_rpc_sequential(&raw, &queue, calls).await?;
        record_sequential(&mut sequential, &mut best_seq, false, samples, cpu);
        progress(&format!("rpc: gateway sequential, round {}", round + 1));
        let cpu = cpu_time();
        let mut samples = Vec::with_capacity(calls);
        for _ in 0..calls {
            let start = Instant::now();
            client
                .call(Message::new(body.clone()).routing_key(&queue), None)
                .await?;
            samples.push(start.elapsed());
        }
        record_sequential(&mut sequential, &mut best_seq, true, samples, cpu);
        progress(&format!("rpc: raw 64 in flight, round {}", round + 1));
        windowed
            .measure(
                false,
                calls * 4,
                raw_rpc_window(&raw, &queue, calls * 4, 64),
            )
            .await?;
        progress(&format!("rpc: gateway 64 in flight, round {}", round + 1));
        let start = Instant::now();
        let cpu = cpu_time();
        let mut set = JoinSet::new();
        for _ in 0..calls * 4 {
            if set.len() >= 64 {
                if let Some(r) = set.join_next().await {
                    joined(r)?;
                }
            }
            let client = client.clone();
            let m = Message::new(body.clone()).routing_key(&queue);
            set.spawn(async move { client.call(m, None).await.map(|_| ()) });
        }
        while let Some(r) = set.join_next().await {
            joined(r)?;
        }
        windowed.record(
            true,
            calls * 4,
            start.elapsed(),
            cpu_time().saturating_sub(cpu),
        );
    }
    responder.abort();
    let _ = gw.delete_queue(&queue).await;
    let scenarios = vec![
        sequential.result("rpc_sequential"),
        windowed.result("rpc_64_in_flight"),
    ];
    let [mut raw_s, mut gw_s] = best_seq;
    let latencies = vec![LatencyResult {
        name: "rpc_sequential_round_trip".into(),
        raw_p50_ms: Some(percentile(&mut raw_s, 50.0)),
        raw_p99_ms: Some(percentile(&mut raw_s, 99.0)),
        gateway_p50_ms: percentile(&mut gw_s, 50.0),
        gateway_p99_ms: percentile(&mut gw_s, 99.0),
    }];
    let _ = raw.close().await;
    gw.close().await;
    Ok((scenarios, latencies))
}

/// Records one sequential round of `samples` round trips (its rate from
/// their sum, its CPU since `cpu_before`), and keeps the samples as the
/// side's best round if their median is the lowest so far.
fn record_sequential(
    rounds: &mut Rounds,
    best: &mut [Vec<Duration>; 2],
    gateway: bool,
    samples: Vec<Duration>,
    cpu_before: Duration,
) {
    rounds.record(
        gateway,
        samples.len(),
        samples.iter().sum(),
        cpu_time().saturating_sub(cpu_before),
    );
    let best = &mut best[usize::from(gateway)];
    if best.is_empty() || median(&samples) < median(best) {
        *best = samples;
    }
}

/// The result of one call task in flight.
fn joined(r: std::result::Result<Result<()>, tokio::task::JoinError>) -> Result<()> {
    r.map_err(|e| Error::new(ErrorKind::Closed, "bench task").with_source(e))?
}

/// A responder written with the raw client: echoes each request to its
/// `reply_to` with the same correlation id.
async fn spawn_raw_responder(
    raw: &RawConnection,
    queue: &str,
) -> Result<tokio::task::JoinHandle<()>> {
    let ch = raw.open_channel(None).await.map_err(raw_err)?;
    ch.queue_declare(QueueDeclareArguments::new(queue).auto_delete(true).finish())
        .await
        .map_err(raw_err)?;
    let (_, mut rx) = ch
        .basic_consume_rx(
            BasicConsumeArguments::new(queue, "")
                .auto_ack(true)
                .finish(),
        )
        .await
        .map_err(raw_err)?;
    Ok(tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            let Some(props) = m.basic_properties else {
                continue;
            };
            let (Some(reply_to), Some(cid)) = (props.reply_to(), props.correlation_id()) else {
                continue;
            };
            let mut reply = BasicProperties::default();
            reply
                .with_correlation_id(cid)
                .with_content_type("application/octet-stream");
            let _ = ch
                .basic_publish(
                    reply.finish(),
                    m.content.unwrap_or_default(),
                    BasicPublishArguments::new("", reply_to),
                )
                .await;
        }
    }))
}

async fn raw_rpc_channel(
    raw: &RawConnection,
) -> Result<(
    Channel,
    tokio::sync::mpsc::UnboundedReceiver<amqprs::channel::ConsumerMessage>,
)> {
    let ch = raw.open_channel(None).await.map_err(raw_err)?;
    let (_, rx) = ch
        .basic_consume_rx(
            BasicConsumeArguments::new(rabbitry::rpc::DIRECT_REPLY_TO, "")
                .auto_ack(true)
                .finish(),
        )
        .await
        .map_err(raw_err)?;
    Ok((ch, rx))
}

fn raw_request(i: usize) -> BasicProperties {
    let mut p = BasicProperties::default();
    p.with_correlation_id(&i.to_string())
        .with_reply_to(rabbitry::rpc::DIRECT_REPLY_TO);
    p.finish()
}

async fn raw_rpc_sequential(
    raw: &RawConnection,
    queue: &str,
    calls: usize,
) -> Result<Vec<Duration>> {
    let (ch, mut rx) = raw_rpc_channel(raw).await?;
    let mut samples = Vec::with_capacity(calls);
    for i in 0..calls {
        let start = Instant::now();
        ch.basic_publish(
            raw_request(i),
            vec![b'x'; BODY],
            BasicPublishArguments::new("", queue),
        )
        .await
        .map_err(raw_err)?;
        rx.recv()
            .await
            .ok_or_else(|| Error::new(ErrorKind::Closed, "raw rpc channel closed"))?;
        samples.push(start.elapsed());
    }
    let _ = ch.close().await;
    Ok(samples)
}

async fn raw_rpc_window(
    raw: &RawConnection,
    queue: &str,
    calls: usize,
    window: usize,
) -> Result<Duration> {
    let (ch, mut rx) = raw_rpc_channel(raw).await?;
    let start = Instant::now();
    let mut sent = 0;
    while sent < window.min(calls) {
        ch.basic_publish(
            raw_request(sent),
            vec![b'x'; BODY],
            BasicPublishArguments::new("", queue),
        )
        .await
        .map_err(raw_err)?;
        sent += 1;
    }
    for _ in 0..calls {
        rx.recv()
            .await
            .ok_or_else(|| Error::new(ErrorKind::Closed, "raw rpc channel closed"))?;
        if sent < calls {
            ch.basic_publish(
                raw_request(sent),
                vec![b'x'; BODY],
                BasicPublishArguments::new("", queue),
            )
            .await
            .map_err(raw_err)?;
            sent += 1;
        }
    }
    let took = start.elapsed();
    let _ = ch.close().await;
    Ok(took)
}
