//! The library's one error type.
//!
//! [`Error`] carries a [`ErrorKind`] that says what went wrong in terms a
//! caller can act on, a human-readable context naming the things involved
//! (host, queue, exchange, config key), and the source error when there is
//! one. [`Error::is_retryable`] answers the question every caller of a
//! messaging library eventually asks. The message includes the cause, once;
//! `source()` does not repeat it.

use std::fmt;

/// A convenient alias for results returned by this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What kind of failure an [`Error`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The broker could not be reached (connection refused, DNS, network cut).
    Connect,
    /// The broker refused the credentials or the virtual host.
    AccessRefused,
    /// The TLS handshake failed: the broker's certificate is not trusted or
    /// not valid for its name, the port does not speak TLS, or the broker
    /// refused the client certificate.
    Tls,
    /// The connection was lost and did not come back within the allowed time.
    Disconnected,
    /// The broker refused a declaration (for example `PRECONDITION_FAILED`:
    /// an existing queue or exchange has other arguments).
    Declare,
    /// The broker closed a channel because of an operation (not a declaration).
    Channel,
    /// A mandatory message could not be routed to any queue.
    Unroutable,
    /// The broker negatively acknowledged a published message.
    Nacked,
    /// Encoding or decoding a message body failed.
    Codec,
    /// A configuration file or setting is invalid.
    Config,
    /// An operation did not finish within its deadline.
    Timeout,
    /// The component was shut down.
    Closed,
    /// A database operation failed.
    Database,
    /// A call argument was invalid.
    Invalid,
    /// The broker has no such queue or exchange (`NOT_FOUND`). Waiting will
    /// not create it.
    NotFound,
    /// A delivery was settled before; the second settle was not sent.
    AlreadySettled,
}

impl ErrorKind {
    /// A short stable name: `unroutable`, `timeout`, `access_refused`.
    /// Spans carry it as `error.type`.
    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::Connect => "connect",
            ErrorKind::AccessRefused => "access_refused",
            ErrorKind::Tls => "tls",
            ErrorKind::Disconnected => "disconnected",
            ErrorKind::Declare => "declare",
            ErrorKind::Channel => "channel",
            ErrorKind::Unroutable => "unroutable",
            ErrorKind::Nacked => "nacked",
            ErrorKind::Codec => "codec",
            ErrorKind::Config => "config",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Closed => "closed",
            ErrorKind::Database => "database",
            ErrorKind::Invalid => "invalid",
            ErrorKind::NotFound => "not_found",
            ErrorKind::AlreadySettled => "already_settled",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            ErrorKind::Connect => "connection failed",
            ErrorKind::AccessRefused => "access refused",
            ErrorKind::Tls => "TLS handshake failed",
            ErrorKind::Disconnected => "disconnected",
            ErrorKind::Declare => "declaration refused",
            ErrorKind::Channel => "channel closed by broker",
            ErrorKind::Unroutable => "unroutable message",
            ErrorKind::Nacked => "message nacked by broker",
            ErrorKind::Codec => "codec error",
            ErrorKind::Config => "configuration error",
            ErrorKind::Timeout => "timed out",
            ErrorKind::Closed => "closed",
            ErrorKind::Database => "database error",
            ErrorKind::Invalid => "invalid argument",
            ErrorKind::NotFound => "not found",
            ErrorKind::AlreadySettled => "already settled",
        }
    }
}

/// An error from rabbitry: a kind, a context naming what was involved, and
/// the underlying cause when there is one.
pub struct Error {
    kind: ErrorKind,
    context: String,
    /// The settings field a configuration error is about.
    setting: Option<String>,
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

impl Error {
    /// Creates an error of `kind` with a message naming what was involved.
    pub fn new(kind: ErrorKind, context: impl Into<String>) -> Self {
        Error {
            kind,
            context: context.into(),
            setting: None,
            source: None,
        }
    }

    /// Attaches the underlying cause.
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    /// The kind of failure.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The underlying error, when there is one (it is also in the message).
    pub fn cause(&self) -> Option<&(dyn std::error::Error + Send + Sync + 'static)> {
        self.source.as_deref()
    }

    /// The message naming what was involved, without the kind's description
    /// (nor the [`setting`](Error::setting) it is about).
    pub fn context(&self) -> &str {
        &self.context
    }

    /// For an error of a settings type's `validate`: the field it is about,
    /// as a path (`concurrency`, `retry.delays[1]`). The configuration
    /// layer puts its key path in front of it.
    pub fn setting(&self) -> Option<&str> {
        self.setting.as_deref()
    }

    /// Whether trying the same operation again later can succeed without a
    /// change of code or configuration.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self.kind,
            ErrorKind::Connect
                | ErrorKind::Disconnected
                | ErrorKind::Timeout
                | ErrorKind::Nacked
                | ErrorKind::Channel
        )
    }

    pub(crate) fn config(context: impl Into<String>) -> Self {
        Error::new(ErrorKind::Config, context)
    }

    /// A settings field that breaks a rule: `field` names it, `rule` says
    /// what it must be.
    pub(crate) fn invalid_setting(field: impl Into<String>, rule: impl Into<String>) -> Self {
        Error {
            setting: Some(field.into()),
            ..Error::config(rule)
        }
    }

    /// A settings error said of its owner (a consumer, a connection, a
    /// producer): a configuration error whose message is `owner`, then the
    /// field when there is one, then the rule.
    pub(crate) fn config_of(self, owner: impl fmt::Display) -> Self {
        let context = match &self.setting {
            Some(field) => format!("{owner}: {field}: {}", self.context),
            None => format!("{owner}: {}", self.context),
        };
        Error {
            kind: ErrorKind::Config,
            context,
            setting: None,
            source: self.source,
        }
    }

    /// The same error about `outer.{field}`: a settings type that holds
    /// another (a worker's options hold its retry policy) names the path.
    pub(crate) fn within(mut self, outer: &str) -> Self {
        self.setting = Some(match self.setting.take() {
            Some(field) => format!("{outer}.{field}"),
            None => outer.to_owned(),
        });
        self
    }

    pub(crate) fn codec(context: impl Into<String>) -> Self {
        Error::new(ErrorKind::Codec, context)
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Error");
        d.field("kind", &self.kind).field("context", &self.context);
        if let Some(setting) = &self.setting {
            d.field("setting", setting);
        }
        if let Some(source) = &self.source {
            d.field("source", source);
        }
        d.finish()
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", self.kind.describe())?;
        if let Some(setting) = &self.setting {
            write!(f, "{setting}: ")?;
        }
        f.write_str(&self.context)?;
        if let Some(source) = &self.source {
            write!(f, ": {source}")?;
        }
        Ok(())
    }
}

/// The cause is part of the message (`Display`), so that a log line with
/// `%error` says everything, and it is also the `source()`, so that code can
/// walk the chain and downcast it (an error handler looking for an
/// `std::io::Error`). A reporter that prints the whole chain prints each
/// text once by skipping a cause its effect already contains, as the CLI
/// and [`HandlerError::message`](crate::worker::HandlerError::message) do.
impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_names_kind_context_and_source() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let e = Error::new(ErrorKind::Connect, "127.0.0.1:1").with_source(io);
        assert_eq!(e.to_string(), "connection failed: 127.0.0.1:1: refused");
        // The cause is in the message, and also the source for code that
        // walks the chain.
        let source = std::error::Error::source(&e).unwrap();
        assert_eq!(
            source.downcast_ref::<std::io::Error>().unwrap().kind(),
            std::io::ErrorKind::ConnectionRefused
        );
        assert_eq!(e.cause().unwrap().to_string(), "refused");
        assert!(e.is_retryable());
        assert!(!Error::config("x").is_retryable());
        assert!(!Error::new(ErrorKind::NotFound, "queue 'q'").is_retryable());
    }

    #[test]
    fn a_setting_error_names_its_field_path() {
        let e = Error::invalid_setting("delays[1]", "a retry delay is between 1ms and 49d")
            .within("retry");
        assert_eq!(e.setting(), Some("retry.delays[1]"));
        assert_eq!(e.context(), "a retry delay is between 1ms and 49d");
        assert_eq!(
            e.to_string(),
            "configuration error: retry.delays[1]: a retry delay is between 1ms and 49d"
        );
        let e = e.config_of("consumer 'orders'");
        assert_eq!(
            e.to_string(),
            "configuration error: consumer 'orders': retry.delays[1]: a retry delay is between 1ms and 49d"
        );
        assert_eq!(e.setting(), None);
        let plain = Error::new(ErrorKind::Invalid, "name 'x' is long").config_of("consumer 'x'");
        assert_eq!(
            (plain.kind(), plain.context()),
            (ErrorKind::Config, "consumer 'x': name 'x' is long")
        );
    }
}
