//! Broker addresses: parsing `amqp://user:password@host:port/vhost`.

use std::fmt;

use crate::error::{Error, Result};

/// One broker address, parsed from an AMQP URL.
#[derive(Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Host name or address.
    pub host: String,
    /// TCP port, 5672 unless given.
    pub port: u16,
    /// User name, `guest` unless given.
    pub user: String,
    /// Password, `guest` unless given. Never printed.
    pub password: String,
    /// Virtual host, `/` unless given (`%2f` in the URL).
    pub vhost: String,
}

impl Endpoint {
    /// Parses an `amqp://` URL. `amqps://` needs TLS, which this build does
    /// not include, and is refused with a clear error.
    pub fn parse(url: &str) -> Result<Endpoint> {
        let rest = if let Some(rest) = url.strip_prefix("amqp://") {
            rest
        } else if url.starts_with("amqps://") {
            return Err(Error::config(format!(
                "`{}`: amqps:// (TLS) is not supported by this build",
                redact(url)
            )));
        } else {
            return Err(Error::config(format!(
                "`{}`: expected a URL starting with amqp://",
                redact(url)
            )));
        };
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
            _ => (hostport, 5672),
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
            user,
            password,
            vhost,
        })
    }

    /// `host:port`, for messages.
    pub fn address(&self) -> String {
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
        let vhost = self.vhost.replace('/', "%2f");
        write!(
            f,
            "amqp://{}:***@{}:{}/{}",
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
    fn secrets_are_redacted() {
        let e = Endpoint::parse("amqp://u:secret@h:1/v").unwrap();
        assert!(!format!("{e:?} {e}").contains("secret"));
        assert_eq!(redact("amqp://u:secret@h:1/v"), "amqp://u:***@h:1/v");
        assert_eq!(redact("amqp://h:1/v"), "amqp://h:1/v");
    }
}
