//! Publishing with and without confirms, and end to end: raw amqprs
//! against the gateway.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use amqprs::callbacks::ChannelCallback;
use amqprs::channel::{BasicAckArguments, BasicPublishArguments, Channel, ConfirmSelectArguments};
use amqprs::connection::Connection as RawConnection;
use amqprs::{Ack, BasicProperties, Cancel, CloseChannel, Nack, Return};
use tokio::sync::{Notify, Semaphore};

use rabbitry::connection::Connection;
use rabbitry::Message;
use rabbitry::{Consumer, ConsumerSettings};
use rabbitry::{Error, ErrorKind, Result};
use rabbitry::{Producer, ProducerSettings};

use super::*;

/// Counts confirms for the raw publisher and frees a permit for each.
struct RawConfirms {
    acked: Arc<AtomicU64>,
    permits: Arc<Semaphore>,
    done: Arc<Notify>,
    target: u64,
}

impl RawConfirms {
    fn settle(&self, tag: u64, multiple: bool) {
        let prev = self.acked.load(Ordering::Relaxed);
        let now = if multiple { tag } else { prev + 1 };
        self.acked.store(now, Ordering::Relaxed);
        self.permits.add_permits(now.saturating_sub(prev) as usize);
        if now >= self.target {
            self.done.notify_one();
        }
    }
}

#[async_trait::async_trait]
impl ChannelCallback for RawConfirms {
    async fn close(
        &mut self,
        _: &Channel,
        _: CloseChannel,
    ) -> std::result::Result<(), amqprs::error::Error> {
        Ok(())
    }
    async fn cancel(
        &mut self,
        _: &Channel,
        _: Cancel,
    ) -> std::result::Result<(), amqprs::error::Error> {
        Ok(())
    }
    async fn flow(
        &mut self,
        _: &Channel,
        active: bool,
    ) -> std::result::Result<bool, amqprs::error::Error> {
        Ok(active)
    }
    async fn publish_ack(&mut self, _: &Channel, ack: Ack) {
        self.settle(ack.delivery_tag(), ack.mutiple());
    }
    /// A nack settles too, or the round would wait for ever; it is logged,
    /// since the broker did not take the message.
    async fn publish_nack(&mut self, _: &Channel, nack: Nack) {
        tracing::warn!(
            tag = nack.delivery_tag(),
            "bench: the broker nacked a raw publish"
        );
        self.settle(nack.delivery_tag(), nack.multiple());
    }
    async fn publish_return(&mut self, _: &Channel, _: Return, _: BasicProperties, _: Vec<u8>) {}
}

/// Publishes `n` bodies through the gateway: with confirms, 1,000 in
/// flight, persistent; without, one after the other, transient.
async fn gateway_publish_all(gw: &Connection, queue: &str, n: usize, confirms: bool) -> Result<()> {
    let mut settings = ProducerSettings::default().routing_key(queue);
    settings.durable = confirms;
    settings.confirms = confirms;
    settings.max_in_flight = 1000;
    settings.message_ids = false;
    let producer = Producer::new(gw, settings).await?;
    if !confirms {
        for _ in 0..n {
            producer.publish(Message::new(vec![b'x'; BODY])).await?;
        }
        return Ok(());
    }
    // The producer's pipelined path: each message handed over in order
    // (waiting while 1,000 are unconfirmed), the confirms awaited oldest
    // first, as `rabbitry publish` and the relay do it.
    let mut pending: std::collections::VecDeque<rabbitry::publish::Confirmation> =
        std::collections::VecDeque::with_capacity(1000);
    for _ in 0..n {
        if pending.len() >= 1000 {
            if let Some(confirmation) = pending.pop_front() {
                confirmation.wait().await?;
            }
        }
        pending.push_back(producer.submit(Message::new(vec![b'x'; BODY])).await?);
    }
    for confirmation in pending {
        confirmation.wait().await?;
    }
    Ok(())
}

/// Publishes `n` bodies with the raw client on a channel of its own: with
/// confirms, 1,000 in flight, persistent, returning once all are
/// confirmed; without, transient, once all are handed to the socket.
async fn raw_publish_all(raw: &RawConnection, queue: &str, n: usize, confirms: bool) -> Result<()> {
    let ch = raw.open_channel(None).await.map_err(raw_err)?;
    let permits = Arc::new(Semaphore::new(1000));
    let done = Arc::new(Notify::new());
    if confirms {
        ch.register_callback(RawConfirms {
            acked: Arc::default(),
            permits: permits.clone(),
            done: done.clone(),
            target: n as u64,
        })
        .await
        .map_err(raw_err)?;
        ch.confirm_select(ConfirmSelectArguments::default())
            .await
            .map_err(raw_err)?;
    }
    let mut props = BasicProperties::default();
    props.with_delivery_mode(if confirms { 2 } else { 1 });
    let props = props.finish();
    for _ in 0..n {
        if confirms {
            permits
                .acquire()
                .await
                .map_err(|e| Error::new(ErrorKind::Closed, "bench").with_source(e))?
                .forget();
        }
        ch.basic_publish(
            props.clone(),
            vec![b'x'; BODY],
            BasicPublishArguments::new("", queue),
        )
        .await
        .map_err(raw_err)?;
    }
    if confirms {
        done.notified().await;
    }
    let _ = ch.close().await;
    Ok(())
}

pub(super) async fn publish_case(
    raw: &RawConnection,
    gw: &Connection,
    queue: &str,
    n: usize,
    gateway: bool,
    confirms: bool,
) -> Result<Duration> {
    let start = Instant::now();
    if gateway {
        gateway_publish_all(gw, queue, n, confirms).await?;
    } else {
        raw_publish_all(raw, queue, n, confirms).await?;
    }
    if !confirms {
        wait_for_depth(raw, queue, n).await?;
    }
    Ok(start.elapsed())
}

/// How long a consumer may wait for the next message before the round
/// fails: a message published without confirms can be lost.
pub(super) const IDLE_LIMIT: Duration = Duration::from_secs(30);

pub(super) fn lost(got: usize, n: usize) -> Error {
    Error::new(
        ErrorKind::Timeout,
        format!("bench: {got} of {n} messages arrived, then none for {IDLE_LIMIT:?}"),
    )
}

/// The gateway's end-to-end round: a consumer (prefetch 500) acking each
/// delivery while a producer on `gw_publisher` publishes `n`.
pub(super) async fn gateway_end_to_end(
    gw: &Connection,
    gw_publisher: &Connection,
    queue: &str,
    n: usize,
    confirms: bool,
) -> Result<Duration> {
    let mut cs = ConsumerSettings::new(queue);
    cs.auto_declare = false;
    cs.prefetch_count = Some(500);
    let mut consumer = Consumer::start(gw, cs).await?;
    let (publishing, queue_owned) = (gw_publisher.clone(), queue.to_owned());
    let start = Instant::now();
    let publisher =
        tokio::spawn(
            async move { gateway_publish_all(&publishing, &queue_owned, n, confirms).await },
        );
    for got in 0..n {
        let d = tokio::time::timeout(IDLE_LIMIT, consumer.next())
            .await
            .map_err(|_| lost(got, n))?
            .ok_or_else(|| Error::new(ErrorKind::Closed, "bench consumer stopped"))?;
        d.ack().await?;
    }
    let took = start.elapsed();
    publisher
        .await
        .map_err(|e| Error::new(ErrorKind::Closed, "bench task").with_source(e))??;
    consumer.cancel().await;
    Ok(took)
}

/// End to end: one side publishes `n` on `*_publisher` while it consumes
/// them on the other connection, acking each. With `confirms`, the
/// publishes are persistent and confirmed, 1,000 in flight (the shape for
/// quorum queues, which may drop an unconfirmed publish).
#[allow(clippy::too_many_arguments)]
pub(super) async fn end_to_end_case(
    raw: &RawConnection,
    raw_publisher: &RawConnection,
    gw: &Connection,
    gw_publisher: &Connection,
    queue: &str,
    n: usize,
    gateway: bool,
    confirms: bool,
) -> Result<Duration> {
    if gateway {
        return gateway_end_to_end(gw, gw_publisher, queue, n, confirms).await;
    }
    let queue_owned = queue.to_owned();
    let (cch, tag, mut rx) = raw_consume(raw, queue).await?;
    let publishing = raw_publisher.clone();
    let start = Instant::now();
    let publisher =
        tokio::spawn(async move { raw_publish_all(&publishing, &queue_owned, n, confirms).await });
    for got in 0..n {
        let m = tokio::time::timeout(IDLE_LIMIT, rx.recv())
            .await
            .map_err(|_| lost(got, n))?
            .ok_or_else(|| Error::new(ErrorKind::Closed, "raw consumer stopped"))?;
        let tag = m.deliver.map(|d| d.delivery_tag()).unwrap_or_default();
        cch.basic_ack(BasicAckArguments::new(tag, false))
            .await
            .map_err(raw_err)?;
    }
    let took = start.elapsed();
    publisher
        .await
        .map_err(|e| Error::new(ErrorKind::Closed, "bench task").with_source(e))??;
    let _ = cch
        .basic_cancel(amqprs::channel::BasicCancelArguments::new(&tag))
        .await;
    let _ = cch.close().await;
    Ok(took)
}
