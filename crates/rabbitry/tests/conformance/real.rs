//! The cases' channel on the real RabbitMQ, through the raw AMQP client:
//! confirms on, the broker's reason for closing a channel kept from its
//! callback, headers converted both ways.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use amqprs::callbacks::{ChannelCallback, DefaultConnectionCallback};
use amqprs::channel::{
    BasicAckArguments, BasicConsumeArguments, BasicGetArguments, BasicNackArguments,
    BasicPublishArguments, BasicQosArguments, Channel, ConfirmSelectArguments,
    ExchangeBindArguments, ExchangeDeclareArguments, ExchangeDeleteArguments, QueueBindArguments,
    QueueDeclareArguments, QueueDeleteArguments,
};
use amqprs::connection::{Connection, OpenConnectionArguments};
use amqprs::{Ack, BasicProperties, Cancel, CloseChannel, FieldTable, FieldValue, Nack, Return};
use async_trait::async_trait;
use rabbitry::memory::{Published, Settle};
use rabbitry::{ExchangeKind, HeaderValue, Headers, Properties};
use tokio::sync::mpsc;

use super::{Broker, Chan, Conn, Got, Reason, Refused};

/// The local broker.
pub(crate) struct Real;

struct RealConn(Connection);

/// What the channel's callback saw of one publish.
#[derive(Debug)]
enum Confirm {
    Ack,
    Nack,
    Returned,
}

struct RealChan {
    channel: Channel,
    reason: Reason,
    confirms: tokio::sync::Mutex<mpsc::UnboundedReceiver<Confirm>>,
}

struct Callback {
    reason: Reason,
    confirms: mpsc::UnboundedSender<Confirm>,
}

#[async_trait]
impl ChannelCallback for Callback {
    async fn close(
        &mut self,
        _: &Channel,
        close: CloseChannel,
    ) -> Result<(), amqprs::error::Error> {
        *self.reason.lock().unwrap() = Some((close.reply_code(), close.reply_text().clone()));
        Ok(())
    }
    async fn cancel(&mut self, _: &Channel, _: Cancel) -> Result<(), amqprs::error::Error> {
        Ok(())
    }
    async fn flow(&mut self, _: &Channel, active: bool) -> Result<bool, amqprs::error::Error> {
        Ok(active)
    }
    async fn publish_ack(&mut self, _: &Channel, _: Ack) {
        let _ = self.confirms.send(Confirm::Ack);
    }
    async fn publish_nack(&mut self, _: &Channel, _: Nack) {
        let _ = self.confirms.send(Confirm::Nack);
    }
    async fn publish_return(&mut self, _: &Channel, _: Return, _: BasicProperties, _: Vec<u8>) {
        let _ = self.confirms.send(Confirm::Returned);
    }
}

#[async_trait]
impl Broker for Real {
    async fn connect(&self) -> Box<dyn Conn> {
        let conn = Connection::open(&OpenConnectionArguments::new(
            "127.0.0.1",
            5672,
            "guest",
            "guest",
        ))
        .await
        .expect("the broker on 127.0.0.1:5672");
        conn.register_callback(DefaultConnectionCallback)
            .await
            .unwrap();
        Box::new(RealConn(conn))
    }
}

#[async_trait]
impl Conn for RealConn {
    async fn channel(&self) -> Box<dyn Chan> {
        let channel = self.0.open_channel(None).await.expect("a channel");
        let reason: Reason = Arc::new(Mutex::new(None));
        let (tx, rx) = mpsc::unbounded_channel();
        channel
            .register_callback(Callback {
                reason: reason.clone(),
                confirms: tx,
            })
            .await
            .unwrap();
        channel
            .confirm_select(ConfirmSelectArguments::default())
            .await
            .unwrap();
        Box::new(RealChan {
            channel,
            reason,
            confirms: tokio::sync::Mutex::new(rx),
        })
    }
    async fn close(&self) {
        let _ = self.0.clone().close().await;
    }
}

impl RealChan {
    /// The broker's reason for closing the channel, which its callback
    /// receives shortly after the failed call returns.
    async fn refusal(&self) -> Refused {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(r) = self.reason.lock().unwrap().clone() {
                return r;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the channel failed without a reason"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn check<T, E>(&self, r: Result<T, E>) -> Result<T, Refused> {
        match r {
            Ok(v) => Ok(v),
            Err(_) => Err(self.refusal().await),
        }
    }
}

fn kind_name(kind: ExchangeKind) -> &'static str {
    kind.as_str()
}

#[async_trait]
impl Chan for RealChan {
    async fn declare_exchange(
        &self,
        name: &str,
        kind: ExchangeKind,
        arguments: &Headers,
    ) -> Result<(), Refused> {
        let mut args = ExchangeDeclareArguments::new(name, kind_name(kind));
        args.durable = true;
        args.arguments = to_table(arguments);
        let r = self.channel.exchange_declare(args).await;
        self.check(r).await
    }
    async fn declare_queue(
        &self,
        name: &str,
        durable: bool,
        exclusive: bool,
        arguments: &Headers,
        passive: bool,
    ) -> Result<String, Refused> {
        let args = QueueDeclareArguments::new(name)
            .durable(durable)
            .exclusive(exclusive)
            .passive(passive)
            .arguments(to_table(arguments))
            .finish();
        let r = self.channel.queue_declare(args).await;
        let declared = self.check(r).await?;
        Ok(declared
            .map(|(n, _, _)| n)
            .unwrap_or_else(|| name.to_owned()))
    }
    async fn bind(
        &self,
        queue: &str,
        exchange: &str,
        key: &str,
        arguments: &Headers,
    ) -> Result<(), Refused> {
        let mut args = QueueBindArguments::new(queue, exchange, key);
        args.arguments = to_table(arguments);
        let r = self.channel.queue_bind(args).await;
        self.check(r).await
    }
    async fn bind_exchange(
        &self,
        destination: &str,
        source: &str,
        key: &str,
    ) -> Result<(), Refused> {
        let r = self
            .channel
            .exchange_bind(ExchangeBindArguments::new(destination, source, key))
            .await;
        self.check(r).await
    }
    async fn publish(
        &self,
        exchange: &str,
        key: &str,
        mandatory: bool,
        properties: Properties,
        body: &str,
    ) -> Result<Published, Refused> {
        let mut confirms = self.confirms.lock().await;
        let args = BasicPublishArguments::new(exchange, key)
            .mandatory(mandatory)
            .finish();
        let r = self
            .channel
            .basic_publish(to_basic(&properties), body.as_bytes().to_vec(), args)
            .await;
        self.check(r).await?;
        let mut returned = false;
        loop {
            let next = tokio::time::timeout(Duration::from_secs(5), confirms.recv()).await;
            match next {
                Ok(Some(Confirm::Returned)) => returned = true,
                Ok(Some(Confirm::Ack)) => {
                    return Ok(if returned {
                        Published::Returned
                    } else {
                        Published::Ack
                    })
                }
                Ok(Some(Confirm::Nack)) => return Ok(Published::Nack),
                // No confirm: the broker closed the channel instead.
                Ok(None) | Err(_) => return Err(self.refusal().await),
            }
        }
    }
    async fn consume(
        &self,
        queue: &str,
        prefetch: u16,
        no_ack: bool,
    ) -> Result<mpsc::UnboundedReceiver<Got>, Refused> {
        let r = self
            .channel
            .basic_qos(BasicQosArguments::new(0, prefetch, false))
            .await;
        self.check(r).await?;
        let args = BasicConsumeArguments::new(queue, &uuid::Uuid::new_v4().to_string())
            .manual_ack(!no_ack)
            .finish();
        let r = self.channel.basic_consume_rx(args).await;
        let (_, mut messages) = self.check(r).await?;
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(m) = messages.recv().await {
                let (Some(deliver), Some(p), Some(body)) =
                    (m.deliver, m.basic_properties, m.content)
                else {
                    continue;
                };
                let got = Got {
                    tag: deliver.delivery_tag(),
                    body: String::from_utf8_lossy(&body).into_owned(),
                    redelivered: deliver.redelivered(),
                    properties: from_basic(&p),
                };
                if tx.send(got).is_err() {
                    break;
                }
            }
        });
        Ok(rx)
    }
    async fn settle(&self, tag: u64, outcome: Settle) -> Result<(), Refused> {
        let r = match outcome {
            Settle::Ack => {
                self.channel
                    .basic_ack(BasicAckArguments::new(tag, false))
                    .await
            }
            Settle::Requeue => {
                self.channel
                    .basic_nack(BasicNackArguments::new(tag, false, true))
                    .await
            }
            Settle::Discard => {
                self.channel
                    .basic_nack(BasicNackArguments::new(tag, false, false))
                    .await
            }
        };
        self.check(r).await?;
        // An unknown tag is refused asynchronously: a round trip shows it.
        let r = self
            .channel
            .basic_qos(BasicQosArguments::new(0, 0, false))
            .await;
        self.check(r).await
    }
    async fn get(&self, queue: &str) -> Result<Option<Got>, Refused> {
        let r = self
            .channel
            .basic_get(BasicGetArguments::new(queue).no_ack(true).finish())
            .await;
        Ok(self.check(r).await?.map(|(ok, p, body)| Got {
            tag: ok.delivery_tag(),
            body: String::from_utf8_lossy(&body).into_owned(),
            redelivered: ok.redelivered(),
            properties: from_basic(&p),
        }))
    }
    async fn delete_queue(&self, queue: &str) {
        let _ = self
            .channel
            .queue_delete(QueueDeleteArguments::new(queue))
            .await;
    }
    async fn delete_exchange(&self, exchange: &str) {
        let _ = self
            .channel
            .exchange_delete(ExchangeDeleteArguments::new(exchange))
            .await;
    }
}

fn to_table(headers: &Headers) -> FieldTable {
    let mut table = FieldTable::new();
    for (k, v) in headers {
        table.insert(k.as_str().try_into().unwrap(), to_field(v));
    }
    table
}

fn to_field(v: &HeaderValue) -> FieldValue {
    match v {
        HeaderValue::Bool(b) => FieldValue::t(*b),
        HeaderValue::Int(n) => FieldValue::l(*n),
        HeaderValue::String(s) => FieldValue::from(s.as_str()),
        HeaderValue::Table(t) => FieldValue::F(to_table(t)),
        HeaderValue::Array(items) => FieldValue::A(
            items
                .iter()
                .map(to_field)
                .collect::<Vec<_>>()
                .try_into()
                .expect("an array"),
        ),
        HeaderValue::Timestamp(t) => FieldValue::T(*t),
        other => panic!("the conformance cases do not send {other:?}"),
    }
}

fn from_field(v: &FieldValue) -> HeaderValue {
    match v {
        FieldValue::t(b) => HeaderValue::Bool(*b),
        FieldValue::b(n) => HeaderValue::Int((*n).into()),
        FieldValue::B(n) => HeaderValue::Int((*n).into()),
        FieldValue::s(n) => HeaderValue::Int((*n).into()),
        FieldValue::u(n) => HeaderValue::Int((*n).into()),
        FieldValue::I(n) => HeaderValue::Int((*n).into()),
        FieldValue::i(n) => HeaderValue::Int((*n).into()),
        FieldValue::l(n) => HeaderValue::Int(*n),
        FieldValue::S(s) => HeaderValue::String(String::from(s.clone())),
        FieldValue::A(items) => {
            HeaderValue::Array(Vec::from(items.clone()).iter().map(from_field).collect())
        }
        FieldValue::T(t) => HeaderValue::Timestamp(*t),
        FieldValue::F(t) => HeaderValue::Table(from_table(t)),
        FieldValue::V => HeaderValue::Void,
        other => HeaderValue::String(format!("{other:?}")),
    }
}

fn from_table(t: &FieldTable) -> Headers {
    t.as_ref()
        .iter()
        .map(|(k, v)| (String::from(k.clone()), from_field(v)))
        .collect()
}

fn to_basic(p: &Properties) -> BasicProperties {
    let mut b = BasicProperties::default();
    if !p.headers.is_empty() {
        b.with_headers(to_table(&p.headers));
    }
    if let Some(v) = &p.expiration {
        b.with_expiration(v);
    }
    if let Some(v) = &p.reply_to {
        b.with_reply_to(v);
    }
    b.finish()
}

fn from_basic(b: &BasicProperties) -> Properties {
    Properties {
        headers: b.headers().map(from_table).unwrap_or_default(),
        expiration: b.expiration().cloned(),
        reply_to: b.reply_to().cloned(),
        ..Properties::default()
    }
}
