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
use tokio::task::JoinSet;

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

pub(super) async fn publish_case(
    raw: &RawConnection,
    gw: &Connection,
    queue: &str,
    n: usize,
    gateway: bool,
    confirms: bool,
) -> Result<Duration> {
    if gateway {
        let mut settings = ProducerSettings::default().routing_key(queue);
        settings.durable = confirms;
        settings.confirms = confirms;
        settings.max_in_flight = 1000;
        settings.message_ids = false;
        let producer = Producer::new(gw, settings).await?;
        let start = Instant::now();
        if confirms {
            let mut set = JoinSet::new();
            for _ in 0..n {
                if set.len() >= 1000 {
                    set.join_next()
                        .await
                        .transpose()
                        .ok()
                        .flatten()
                        .transpose()?;
                }
                let p = producer.clone();
                set.spawn(async move { p.publish(Message::new(vec![b'x'; BODY])).await });
            }
            while let Some(r) = set.join_next().await {
                r.map_err(|e| Error::new(ErrorKind::Closed, "bench task").with_source(e))??;
            }
        } else {
            for _ in 0..n {
                producer.publish(Message::new(vec![b'x'; BODY])).await?;
            }
            wait_for_depth(raw, queue, n).await?;
        }
        return Ok(start.elapsed());
    }
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
    let start = Instant::now();
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
    } else {
        wait_for_depth(raw, queue, n).await?;
    }
    let took = start.elapsed();
    let _ = ch.close().await;
    Ok(took)
}

pub(super) async fn end_to_end_case(
    raw: &RawConnection,
    raw_publisher: &RawConnection,
    gw: &Connection,
    gw_publisher: &Connection,
    queue: &str,
    n: usize,
    gateway: bool,
) -> Result<Duration> {
    if gateway {
        let mut cs = ConsumerSettings::new(queue);
        cs.auto_declare = false;
        cs.prefetch_count = Some(500);
        let mut consumer = Consumer::start(gw, cs).await?;
        let mut ps = ProducerSettings::default().routing_key(queue);
        ps.durable = false;
        ps.confirms = false;
        ps.message_ids = false;
        let producer = Producer::new(gw_publisher, ps).await?;
        let start = Instant::now();
        let publisher = tokio::spawn(async move {
            for _ in 0..n {
                producer.publish(Message::new(vec![b'x'; BODY])).await?;
            }
            Ok::<_, Error>(())
        });
        for _ in 0..n {
            let d = consumer
                .next()
                .await
                .ok_or_else(|| Error::new(ErrorKind::Closed, "bench consumer stopped"))?;
            d.ack().await?;
        }
        let took = start.elapsed();
        publisher
            .await
            .map_err(|e| Error::new(ErrorKind::Closed, "bench task").with_source(e))??;
        consumer.cancel().await;
        return Ok(took);
    }
    let (cch, tag, mut rx) = raw_consume(raw, queue).await?;
    let pch = raw_publisher.open_channel(None).await.map_err(raw_err)?;
    let queue_owned = queue.to_owned();
    let start = Instant::now();
    let publisher = tokio::spawn(async move {
        let mut props = BasicProperties::default();
        props.with_delivery_mode(1);
        let props = props.finish();
        for _ in 0..n {
            pch.basic_publish(
                props.clone(),
                vec![b'x'; BODY],
                BasicPublishArguments::new("", &queue_owned),
            )
            .await
            .map_err(raw_err)?;
        }
        Ok::<_, Error>(pch)
    });
    for _ in 0..n {
        let m = rx
            .recv()
            .await
            .ok_or_else(|| Error::new(ErrorKind::Closed, "raw consumer stopped"))?;
        let tag = m.deliver.map(|d| d.delivery_tag()).unwrap_or_default();
        cch.basic_ack(BasicAckArguments::new(tag, false))
            .await
            .map_err(raw_err)?;
    }
    let took = start.elapsed();
    let pch = publisher
        .await
        .map_err(|e| Error::new(ErrorKind::Closed, "bench task").with_source(e))??;
    let _ = cch
        .basic_cancel(amqprs::channel::BasicCancelArguments::new(&tag))
        .await;
    let _ = cch.close().await;
    let _ = pch.close().await;
    Ok(took)
}
