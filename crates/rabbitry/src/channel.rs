//! Channel events: why the broker closed a channel, and publisher confirms.
//!
//! The AMQP client reports a broker's `channel.close` (with its reply code
//! and text) only to a callback; the failed call itself sees a bare
//! "channel closed". [`ChannelWatch`] keeps the broker's reason so that
//! errors can name it, and [`Events`] forwards confirms and returns to
//! whoever publishes on the channel.

use std::sync::{Arc, Mutex};

use amqprs::callbacks::ChannelCallback;
use amqprs::channel::Channel;
use amqprs::{Ack, BasicProperties, Cancel, CloseChannel, Nack, Return};

use crate::error::{Error, ErrorKind};

/// AMQP reply code: the queue or exchange does not exist.
pub(crate) const NOT_FOUND: u16 = 404;
/// AMQP reply code: the user may not do this.
pub(crate) const ACCESS_REFUSED: u16 = 403;

/// Why the broker closed a channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CloseReason {
    pub(crate) code: u16,
    pub(crate) text: String,
}

/// Remembers the broker's reason for closing one channel.
#[derive(Debug, Clone)]
pub(crate) struct ChannelWatch {
    reason: Arc<Mutex<Option<CloseReason>>>,
    /// The broker's version, as its `connection.start` gave it.
    pub(crate) server_version: Arc<str>,
    /// The largest frame the connection negotiated (0: no limit).
    pub(crate) frame_max: u32,
}

impl ChannelWatch {
    /// A watch for a channel on a broker of `server_version`, on a
    /// connection that negotiated `frame_max`.
    pub(crate) fn on(server_version: &str, frame_max: u32) -> ChannelWatch {
        ChannelWatch {
            reason: Arc::default(),
            server_version: server_version.into(),
            frame_max,
        }
    }

    /// What a message published on this channel may be.
    pub(crate) fn limits(&self) -> crate::limits::Limits {
        crate::limits::Limits::of(self.frame_max, &self.server_version)
    }

    /// The broker's reason, once it closed the channel.
    pub(crate) fn reason(&self) -> Option<CloseReason> {
        self.reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn set(&self, reason: CloseReason) {
        *self.reason.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason);
    }

    /// Turns a failed channel call into an error that carries the broker's
    /// reason when there is one, and otherwise says the connection went.
    pub(crate) fn refusal(
        &self,
        kind: ErrorKind,
        what: String,
        err: impl std::error::Error + Send + Sync + 'static,
    ) -> Error {
        match self.reason() {
            Some(r) => refused(kind, &what, r.code, &r.text),
            None => Error::new(ErrorKind::Disconnected, what).with_source(err),
        }
    }
}

/// The error of a broker's refusal of `what`, with its reply code and text.
/// The code says more than the caller's guess (`kind`): a missing entity or
/// a refused permission is not a passing channel problem, and retrying
/// will not fix it.
pub(crate) fn refused(kind: ErrorKind, what: &str, code: u16, text: &str) -> Error {
    let kind = match code {
        NOT_FOUND => ErrorKind::NotFound,
        ACCESS_REFUSED => ErrorKind::AccessRefused,
        _ => kind,
    };
    Error::new(kind, format!("{what}: broker said {text} ({code})"))
}

/// A message the broker returned as unroutable.
#[derive(Debug, Clone)]
pub(crate) struct Returned {
    pub(crate) message_id: Option<String>,
    pub(crate) correlation_id: Option<String>,
    pub(crate) text: String,
}

/// Receives publisher confirms and returns for one channel.
pub(crate) trait ConfirmSink: Send + Sync + 'static {
    /// `basic.ack` for `tag` (and every lower tag when `multiple`).
    fn ack(&self, tag: u64, multiple: bool);
    /// `basic.nack` for `tag` (and every lower tag when `multiple`).
    fn nack(&self, tag: u64, multiple: bool);
    /// `basic.return`: an unroutable mandatory message.
    fn returned(&self, returned: Returned);
    /// The broker closed the channel.
    fn closed(&self, reason: &CloseReason);
}

/// The callback registered on every channel rabbitry opens.
#[derive(Clone)]
pub(crate) struct Events {
    pub(crate) watch: ChannelWatch,
    pub(crate) confirms: Option<Arc<dyn ConfirmSink>>,
}

impl Events {
    /// The broker closed the channel: keep its reason, tell the publisher.
    pub(crate) fn broker_closed(&self, reason: CloseReason) {
        if reason.code == NOT_FOUND {
            // Usually a passive check of something that may be missing; the
            // caller's error names it, and callers that expect it stay quiet.
            tracing::debug!(code = reason.code, reason = %reason.text, "broker closed a channel");
        } else {
            tracing::warn!(code = reason.code, reason = %reason.text, "broker closed a channel");
        }
        self.watch.set(reason.clone());
        if let Some(sink) = &self.confirms {
            sink.closed(&reason);
        }
    }
}

#[async_trait::async_trait]
impl ChannelCallback for Events {
    async fn close(
        &mut self,
        _channel: &Channel,
        close: CloseChannel,
    ) -> std::result::Result<(), amqprs::error::Error> {
        self.broker_closed(CloseReason {
            code: close.reply_code(),
            text: close.reply_text().clone(),
        });
        Ok(())
    }

    async fn cancel(
        &mut self,
        _channel: &Channel,
        cancel: Cancel,
    ) -> std::result::Result<(), amqprs::error::Error> {
        tracing::warn!(consumer = %cancel.consumer_tag(), "broker cancelled a consumer");
        Ok(())
    }

    async fn flow(
        &mut self,
        _channel: &Channel,
        active: bool,
    ) -> std::result::Result<bool, amqprs::error::Error> {
        Ok(active)
    }

    async fn publish_ack(&mut self, _channel: &Channel, ack: Ack) {
        if let Some(sink) = &self.confirms {
            sink.ack(ack.delivery_tag(), ack.mutiple());
        }
    }

    async fn publish_nack(&mut self, _channel: &Channel, nack: Nack) {
        if let Some(sink) = &self.confirms {
            sink.nack(nack.delivery_tag(), nack.multiple());
        }
    }

    async fn publish_return(
        &mut self,
        _channel: &Channel,
        ret: Return,
        properties: BasicProperties,
        _content: Vec<u8>,
    ) {
        if let Some(sink) = &self.confirms {
            sink.returned(Returned {
                message_id: properties.message_id().cloned(),
                correlation_id: properties.correlation_id().cloned(),
                text: format!(
                    "{} {} (exchange '{}', routing key '{}')",
                    ret.reply_code(),
                    ret.reply_text(),
                    ret.exchange(),
                    ret.routing_key()
                ),
            });
        }
    }
}
