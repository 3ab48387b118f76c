//! Broker addresses: parsing `amqp://user:password@host:port/vhost?query`
//! and `amqps://...`, with the query string of RabbitMQ's URI
//! specification, and `memory://NAME` for the in-memory broker.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use super::TlsSettings;
use crate::error::{Error, Result};

/// One broker address, parsed from an AMQP URL.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Endpoint {
    /// Host name or address.
    pub host: String,
    /// TCP port: 5672 unless given, 5671 for `amqps://`.
    pub port: u16,
    /// `amqps://`: the connection is made over TLS.
    pub tls: bool,
    /// User name, `guest` unless given.
    pub user: String,
    /// Password, `guest` unless given. Never printed.
    pub password: String,
    /// Virtual host, `/` unless given (`%2f` in the URL).
    pub vhost: String,
    /// What the URL's query string sets.
    pub options: UrlOptions,
    /// `memory://NAME` (feature `testing`): the in-memory broker called
    /// `NAME` (in `host`) in this process, not a socket.
    pub in_memory: bool,
}

/// The query string of an AMQP URL, as in RabbitMQ's URI specification:
/// `?heartbeat=10&connection_timeout=5000&auth_mechanism=external`, and for
/// `amqps://` also `cacertfile`, `certfile`, `keyfile`,
/// `server_name_indication` and `verify`. Unset values fall back to the
/// connection's settings.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UrlOptions {
    /// `heartbeat`: seconds; 0 turns heartbeats off.
    pub heartbeat: Option<u16>,
    /// `connection_timeout`: milliseconds to wait for the broker's answer.
    pub connection_timeout: Option<Duration>,
    /// `auth_mechanism`: `plain` (the default), `amqplain` or `external`
    /// (the broker authenticates the client by its TLS certificate).
    pub auth_mechanism: Option<AuthMechanism>,
    /// `cacertfile`, `certfile`, `keyfile` and `server_name_indication`:
    /// override the connection's [`TlsSettings`] for this URL (its
    /// `danger_skip_verification` is not used here; see `verify`).
    pub tls: TlsSettings,
    /// `verify`: `verify_peer` (`Some(true)`) or `verify_none`
    /// (`Some(false)`, which turns certificate verification off).
    pub verify: Option<bool>,
}

/// How the client authenticates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthMechanism {
    /// User name and password, in the clear (inside TLS where it matters).
    Plain,
    /// User name and password, in AMQP's own table encoding.
    AmqPlain,
    /// Nothing sent: the broker identifies the client by its TLS
    /// certificate.
    External,
}

impl UrlOptions {
    /// Parses `heartbeat=10&connection_timeout=5000`; an unknown key or a
    /// bad value is an error that names it and the URL.
    fn parse(query: &str, url: &str) -> Result<UrlOptions> {
        let mut options = UrlOptions::default();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let value = percent_decode(value)?;
            let bad = |expected: &str| {
                Error::config(format!(
                    "`{}`: `{key}={value}` in the query string: expected {expected}",
                    redact(url)
                ))
            };
            match key {
                "heartbeat" => {
                    options.heartbeat = Some(value.parse().map_err(|_| bad("seconds, 0 to 65535"))?)
                }
                "connection_timeout" => {
                    let ms: u64 = value.parse().map_err(|_| bad("milliseconds"))?;
                    if ms == 0 {
                        return Err(bad("milliseconds, more than 0"));
                    }
                    options.connection_timeout = Some(Duration::from_millis(ms));
                }
                "auth_mechanism" => {
                    options.auth_mechanism = Some(match value.to_ascii_lowercase().as_str() {
                        "plain" => AuthMechanism::Plain,
                        "amqplain" => AuthMechanism::AmqPlain,
                        "external" => AuthMechanism::External,
                        _ => return Err(bad("plain, amqplain or external")),
                    })
                }
                "cacertfile" => options.tls.ca_file = Some(PathBuf::from(value)),
                "certfile" => options.tls.cert_file = Some(PathBuf::from(value)),
                "keyfile" => options.tls.key_file = Some(PathBuf::from(value)),
                "server_name_indication" => options.tls.server_name = Some(value),
                "verify" => {
                    options.verify = Some(match value.as_str() {
                        "verify_peer" => true,
                        "verify_none" => false,
                        _ => return Err(bad("verify_peer or verify_none")),
                    })
                }
                "channel_max" | "frame_max" => {
                    return Err(Error::config(format!(
                        "`{}`: `{key}` in the query string cannot be applied: the client \
                         (amqprs) always takes the broker's {key}; set it on the broker",
                        redact(url)
                    )))
                }
                _ => {
                    return Err(Error::config(format!(
                        "`{}`: unknown key `{key}` in the query string; known: heartbeat, \
                         connection_timeout, auth_mechanism, and for amqps:// cacertfile, \
                         certfile, keyfile, server_name_indication, verify",
                        redact(url)
                    )))
                }
            }
        }
        Ok(options)
    }
}

impl Endpoint {
    /// Parses an `amqp://` or `amqps://` URL. A build without the `tls`
    /// feature refuses `amqps://` with an error that says so, and one
    /// without `testing` refuses `memory://`.
    pub fn parse(url: &str) -> Result<Endpoint> {
        if let Some(name) = url.strip_prefix("memory://") {
            return Endpoint::in_memory(name, url);
        }
        let (rest, tls) = if let Some(rest) = url.strip_prefix("amqp://") {
            (rest, false)
        } else if let Some(rest) = url.strip_prefix("amqps://") {
            if !cfg!(feature = "tls") {
                return Err(Error::config(format!(
                    "`{}`: amqps:// (TLS) needs rabbitry's `tls` cargo feature, which this build \
                     leaves out",
                    redact(url)
                )));
            }
            (rest, true)
        } else {
            return Err(Error::config(format!(
                "`{}`: expected a URL starting with amqp:// or amqps://",
                redact(url)
            )));
        };
        let (rest, query) = match rest.split_once('?') {
            Some((rest, query)) => (rest, query),
            None => (rest, ""),
        };
        let options = UrlOptions::parse(query, url)?;
        if !tls && (options.tls != TlsSettings::default() || options.verify.is_some()) {
            return Err(Error::config(format!(
                "`{}`: TLS options in the query string of a plain amqp:// URL; use amqps://",
                redact(url)
            )));
        }
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], Some(&rest[i + 1..])),
            None => (rest, None),
        };
        let (userinfo, hostport) = match authority.rfind('@') {
            Some(i) => (Some(&authority[..i]), &authority[i + 1..]),
            None => (None, authority),
        };
        let (user, password) = match userinfo {
            Some(info) => match info.split_once(':') {
                Some((u, p)) => (percent_decode(u)?, percent_decode(p)?),
                None => (percent_decode(info)?, String::new()),
            },
            None => ("guest".to_owned(), "guest".to_owned()),
        };
        let (host, port) = match hostport.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || hostport.starts_with('[') => {
                let port = p
                    .parse::<u16>()
                    .map_err(|_| Error::config(format!("`{}`: invalid port `{p}`", redact(url))))?;
                (h, port)
            }
            _ => (hostport, if tls { 5671 } else { 5672 }),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let host = if host.is_empty() { "localhost" } else { host };
        let vhost = match path {
            None | Some("") => "/".to_owned(),
            Some(p) => percent_decode(p)?,
        };
        Ok(Endpoint {
            host: host.to_owned(),
            port,
            tls,
            user,
            password,
            vhost,
            options,
            in_memory: false,
        })
    }

    /// `memory://NAME`: the in-memory broker `NAME`.
    fn in_memory(name: &str, url: &str) -> Result<Endpoint> {
        if !cfg!(feature = "testing") {
            return Err(Error::config(format!(
                "`{url}`: memory:// (the in-memory broker) needs rabbitry's `testing` cargo \
                 feature, which this build leaves out"
            )));
        }
        if name.is_empty() || name.contains(['/', '?', '@']) {
            return Err(Error::config(format!(
                "`{url}`: expected memory://NAME, a name without '/', '?' or '@'"
            )));
        }
        Ok(Endpoint {
            host: name.to_owned(),
            port: 0,
            tls: false,
            user: String::new(),
            password: String::new(),
            vhost: "/".to_owned(),
            options: UrlOptions::default(),
            in_memory: true,
        })
    }

    /// `host:port` (`memory://NAME` for the in-memory broker), for messages.
    pub fn address(&self) -> String {
        if self.in_memory {
            return format!("memory://{}", self.host);
        }
        format!("{}:{}", self.host, self.port)
    }
}

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.in_memory {
            return write!(f, "memory://{}", self.host);
        }
        let vhost = self.vhost.replace('/', "%2f");
        let scheme = if self.tls { "amqps" } else { "amqp" };
        write!(
            f,
            "{scheme}://{}:***@{}:{}/{}",
            self.user, self.host, self.port, vhost
        )
    }
}

/// A URL with its password replaced by `***`, for logs and errors.
pub fn redact(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_owned();
    };
    let after = &url[scheme_end + 3..];
    let authority_end = after.find('/').unwrap_or(after.len());
    match after[..authority_end].rfind('@') {
        Some(at) => match after[..at].find(':') {
            Some(colon) => format!(
                "{}{}:***{}",
                &url[..scheme_end + 3],
                &after[..colon],
                &after[at..]
            ),
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

fn percent_decode(s: &str) -> Result<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| Error::config(format!("invalid percent-encoding in `{s}`")))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| Error::config(format!("`{s}` is not UTF-8 once decoded")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_urls_name_an_in_memory_broker() {
        let e = Endpoint::parse("memory://shop").unwrap();
        assert!(e.in_memory);
        assert_eq!(e.host, "shop");
        assert_eq!(e.to_string(), "memory://shop");
        assert_eq!(e.address(), "memory://shop");
        for bad in [
            "memory://",
            "memory://a/b",
            "memory://a?x=1",
            "memory://u@a",
        ] {
            let err = Endpoint::parse(bad).unwrap_err().to_string();
            assert!(err.contains("memory://NAME"), "{bad}: {err}");
        }
        assert!(!Endpoint::parse("amqp://localhost").unwrap().in_memory);
    }

    #[test]
    fn parses_full_and_short_urls() {
        let e = Endpoint::parse("amqp://guest:guest@127.0.0.1:5672/%2f").unwrap();
        assert_eq!(
            (e.host.as_str(), e.port, e.vhost.as_str()),
            ("127.0.0.1", 5672, "/")
        );
        let e = Endpoint::parse("amqp://u:p%40ss@rabbit/prod").unwrap();
        assert_eq!((e.user.as_str(), e.password.as_str()), ("u", "p@ss"));
        assert_eq!(
            (e.host.as_str(), e.port, e.vhost.as_str()),
            ("rabbit", 5672, "prod")
        );
        let e = Endpoint::parse("amqp://localhost").unwrap();
        assert_eq!((e.user.as_str(), e.vhost.as_str()), ("guest", "/"));
        assert!(Endpoint::parse("http://x").is_err());
        assert!(Endpoint::parse("amqp://h:notaport/").is_err());
    }

    #[test]
    fn the_query_string_sets_options_not_the_vhost() {
        let e = Endpoint::parse(
            "amqp://h/%2f?heartbeat=10&connection_timeout=2500&auth_mechanism=EXTERNAL",
        )
        .unwrap();
        assert_eq!(e.vhost, "/");
        assert_eq!(
            e.options,
            UrlOptions {
                heartbeat: Some(10),
                connection_timeout: Some(Duration::from_millis(2500)),
                auth_mechanism: Some(AuthMechanism::External),
                ..UrlOptions::default()
            }
        );
        let e = Endpoint::parse("amqp://h?heartbeat=0").unwrap();
        assert_eq!((e.vhost.as_str(), e.options.heartbeat), ("/", Some(0)));
        for (url, says) in [
            ("amqp://h/v?heartbeat=often", "`heartbeat=often`"),
            ("amqp://h/v?heartbeat=70000", "seconds, 0 to 65535"),
            ("amqp://h/v?connection_timeout=0", "more than 0"),
            (
                "amqp://h/v?auth_mechanism=kerberos",
                "plain, amqplain or external",
            ),
            ("amqp://h/v?hearbeat=10", "unknown key `hearbeat`"),
            ("amqp://h/v?frame_max=4096", "takes the broker's frame_max"),
            ("amqp://h/v?cacertfile=/ca.pem", "use amqps://"),
            ("amqps://h/v?verify=maybe", "verify_peer or verify_none"),
        ] {
            let err = Endpoint::parse(url).unwrap_err().to_string();
            assert!(err.contains(says), "{url}: {err}");
        }
    }

    #[test]
    fn amqps_urls_carry_their_tls_options() {
        let e = Endpoint::parse(
            "amqps://u:p@rabbit/%2f?cacertfile=%2Fetc%2Fca.pem&certfile=/c.pem&keyfile=/k.pem\
             &server_name_indication=rabbit.internal&verify=verify_none",
        )
        .unwrap();
        assert!(e.tls);
        assert_eq!((e.port, e.vhost.as_str()), (5671, "/"));
        assert_eq!(
            e.options.tls,
            TlsSettings {
                ca_file: Some("/etc/ca.pem".into()),
                cert_file: Some("/c.pem".into()),
                key_file: Some("/k.pem".into()),
                server_name: Some("rabbit.internal".into()),
                danger_skip_verification: false,
            }
        );
        assert_eq!(e.options.verify, Some(false));
        assert!(e.to_string().starts_with("amqps://u:***@rabbit:5671/"));
        // The URL's options win over the connection's; verify_none turns
        // verification off, verify_peer on.
        let base = TlsSettings {
            ca_file: Some("/other.pem".into()),
            server_name: Some("other".into()),
            danger_skip_verification: false,
            ..TlsSettings::default()
        };
        let merged = base.with_url(&e.options);
        assert_eq!(merged.ca_file, Some("/etc/ca.pem".into()));
        assert_eq!(merged.server_name.as_deref(), Some("rabbit.internal"));
        assert!(merged.danger_skip_verification);
        let plain = Endpoint::parse("amqps://rabbit?verify=verify_peer").unwrap();
        let skipping = TlsSettings {
            danger_skip_verification: true,
            ..TlsSettings::default()
        };
        assert!(!skipping.with_url(&plain.options).danger_skip_verification);
        assert_eq!(Endpoint::parse("amqps://rabbit:5691").unwrap().port, 5691);
    }

    #[test]
    fn secrets_are_redacted() {
        let e = Endpoint::parse("amqp://u:secret@h:1/v").unwrap();
        assert!(!format!("{e:?} {e}").contains("secret"));
        assert_eq!(redact("amqp://u:secret@h:1/v"), "amqp://u:***@h:1/v");
        assert_eq!(redact("amqp://h:1/v"), "amqp://h:1/v");
    }
}
