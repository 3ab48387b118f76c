//! Deliveries as HTTP requests, responses as outcomes: the collective.zamqp
//! idea, for a tower `Service` (an axum `Router`) in the same process or an
//! HTTP application in any language.
//!
//! A delivery becomes
//! `POST {prefix}/{connection}/{exchange or "(default)"}/{routing_key}[/{correlation_id}]`
//! with the body and content type passed through, the AMQP properties as
//! `amqp-*` headers, each AMQP header as `amqp-header-<name>`, and an AMQP
//! header `authorization` as the HTTP `Authorization` header. The status
//! decides the outcome: 2xx ack (the body is the reply); 409 a conflict,
//! retried after the shortest delay; 408, 429 and 5xx retried; other 4xx
//! dead-lettered. Every retry counts against the retry budget.
//!
//! Header values are text ([`HeaderValue::to_text`](crate::HeaderValue::to_text):
//! numbers and decimals as number strings, tables and arrays as JSON).
//! HTTP headers carry only printable ASCII, so the text goes through
//! [`encode_header_text`]: printable ASCII other than `%` unchanged; `%`,
//! control characters (CR and LF included) and non-ASCII characters
//! percent-encoded as UTF-8 (`Grüße` is `Gr%C3%BC%C3%9Fe`). Any URL
//! decoder (`urllib.parse.unquote`, `decodeURIComponent`) gives the text
//! back. Header names are lower-cased, and bytes that HTTP does not allow
//! in a name are percent-encoded the same way.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tower::{Service, ServiceExt};

use super::handler::{BoxFuture, HandlerError, Reply};
use crate::telemetry::{TRACEPARENT, TRACESTATE};

/// A request's body type.
pub type RequestBody = Full<Bytes>;

/// A tower service that can handle deliveries as requests (an axum
/// `Router`, say): the bounds [`Worker::service`](super::Worker::service)
/// needs, named once.
pub trait RequestService<RB>:
    Service<
        Request<RequestBody>,
        Response = Response<RB>,
        Future: Send + 'static,
        Error: std::fmt::Display,
    > + Clone
    + Send
    + Sync
    + 'static
{
}

impl<T, RB> RequestService<RB> for T
where
    T: Service<Request<RequestBody>, Response = Response<RB>> + Clone + Send + Sync + 'static,
    T::Future: Send + 'static,
    T::Error: std::fmt::Display,
{
}

/// A response body the worker can read to the end.
pub trait ResponseBody:
    http_body::Body<Data = Bytes, Error: std::fmt::Display> + Send + 'static
{
}

impl<B> ResponseBody for B
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: std::fmt::Display,
{
}

/// A service with its types erased: a request and the largest response
/// body to read in; status, headers and body out, or why there is none (a
/// transport error is retried; a response past the limit is not).
pub(crate) type BoxService = Arc<
    dyn Fn(Request<RequestBody>, usize) -> BoxFuture<Result<Response<Bytes>, HandlerError>>
        + Send
        + Sync,
>;

/// Reads a response body, at most `limit` bytes of it: past the limit, the
/// rest is not read and the request fails for good (the same response
/// would come again).
async fn read_limited<B>(body: B, limit: usize, what: &str) -> Result<Bytes, HandlerError>
where
    B: http_body::Body<Data = Bytes> + Send,
    B::Error: std::fmt::Display,
{
    let mut body = std::pin::pin!(body);
    let mut read = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame =
            frame.map_err(|e| HandlerError::retry(format!("{what}: reading the response: {e}")))?;
        if let Ok(data) = frame.into_data() {
            if read.len() + data.len() > limit {
                return Err(HandlerError::invalid(format!(
                    "{what}: the response body is larger than the consumer's max_response \
                     ({limit} bytes); the rest was not read"
                )));
            }
            read.extend_from_slice(&data);
        }
    }
    Ok(read.freeze())
}

/// A handler URL must be an absolute `http://` URL with a host: the one
/// home of that rule (the worker's start and the configuration call it).
pub(crate) fn check_url(url: &str) -> crate::Result<()> {
    let bad = |why: &str| {
        crate::Error::invalid_setting(
            "handler",
            format!("`{url}` {why}; expected an URL like http://127.0.0.1:8000/amqp"),
        )
    };
    let uri: http::Uri = url.parse().map_err(|_| bad("is not a URL"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Err(bad(
                "uses https, which the HTTP dispatch does not support yet (use a local http:// address)",
            ))
        }
        Some(other) => return Err(bad(&format!("has the scheme `{other}`, not http"))),
        None => return Err(bad("is not an absolute URL")),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(bad("has no host"));
    }
    Ok(())
}

/// Percent-encodes one path segment.
fn segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~()*".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The path a delivery is dispatched to, under `base` (a prefix or URL).
pub(crate) fn request_path(base: &str, ctx_meta: &super::handler::Meta) -> String {
    let exchange = if ctx_meta.exchange.is_empty() {
        "(default)"
    } else {
        &ctx_meta.exchange
    };
    let mut path = format!(
        "{}/{}/{}/{}",
        base.trim_end_matches('/'),
        segment(&ctx_meta.connection),
        segment(exchange),
        segment(&ctx_meta.routing_key)
    );
    if let Some(c) = &ctx_meta.properties.correlation_id {
        path.push('/');
        path.push_str(&segment(c));
    }
    path
}

/// Text for an HTTP header value: printable ASCII except `%` as it is,
/// everything else percent-encoded as UTF-8. [`decode_header_text`]
/// reverses it.
pub fn encode_header_text(text: &str) -> String {
    percent_encode(text, |b| (b' '..=b'~').contains(&b) && b != b'%')
}

/// The text that [`encode_header_text`] encoded; `None` when `value` is not
/// such an encoding (a stray `%`, or bytes that are not UTF-8).
pub fn decode_header_text(value: &str) -> Option<String> {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = value.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// An HTTP header name for an AMQP header name: lower case, and bytes that
/// are not HTTP token characters percent-encoded.
fn header_name_text(name: &str) -> String {
    percent_encode(&name.to_ascii_lowercase(), |b| {
        b.is_ascii_alphanumeric() || b"!#$&'*+-.^_`|~".contains(&b)
    })
}

fn percent_encode(text: &str, keep: impl Fn(u8) -> bool) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if keep(b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn put(req: &mut Request<RequestBody>, name: &str, value: &str) {
    let encoded = encode_header_text(value);
    match (
        HeaderName::from_bytes(name.as_bytes()),
        HeaderValue::from_str(&encoded),
    ) {
        (Ok(n), Ok(v)) => {
            req.headers_mut().append(n, v);
        }
        // Only an empty name gets here: every encoded value is valid.
        _ => tracing::debug!(header = name, "header not representable in HTTP; skipped"),
    }
}

/// Builds the request for a delivery.
pub(crate) fn to_request(
    uri: String,
    meta: &super::handler::Meta,
    body: Bytes,
) -> Result<Request<RequestBody>, HandlerError> {
    let mut req = Request::builder()
        .method(Method::POST)
        .uri(&uri)
        .body(Full::new(body))
        .map_err(|e| HandlerError::invalid(format!("cannot build a request for {uri}: {e}")))?;
    let p = &meta.properties;
    if let Some(ct) = &p.content_type {
        put(&mut req, "content-type", ct);
    }
    let optional = [
        ("amqp-correlation-id", p.correlation_id.as_deref()),
        ("amqp-reply-to", p.reply_to.as_deref()),
        ("amqp-message-id", p.message_id.as_deref()),
        ("amqp-site", meta.site.as_deref()),
        ("amqp-user", meta.user.as_deref()),
    ];
    for (name, value) in optional {
        if let Some(v) = value {
            put(&mut req, name, v);
        }
    }
    put(&mut req, "amqp-exchange", &meta.exchange);
    put(&mut req, "amqp-routing-key", &meta.routing_key);
    put(
        &mut req,
        "amqp-redelivered",
        if meta.redelivered { "true" } else { "false" },
    );
    put(&mut req, "amqp-attempt", &meta.attempt.to_string());
    for (name, value) in &p.headers {
        let text = value.to_text();
        if name.eq_ignore_ascii_case("authorization") {
            put(&mut req, "authorization", &text);
        }
        // The W3C trace context goes on as it came, so that the handler's
        // spans join the message's trace.
        let trace = [TRACEPARENT, TRACESTATE]
            .into_iter()
            .find(|t| name.eq_ignore_ascii_case(t));
        if let (Some(trace), Ok(v)) = (trace, HeaderValue::from_str(&text)) {
            req.headers_mut().insert(HeaderName::from_static(trace), v);
        }
        put(
            &mut req,
            &format!("amqp-header-{}", header_name_text(name)),
            &text,
        );
    }
    Ok(req)
}

/// Maps a response to the handler's result.
pub(crate) fn from_response(resp: Response<Bytes>) -> Result<Reply, HandlerError> {
    let status = resp.status();
    let content_type = resp
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    // `amqp-header-NAME` response headers become the reply's headers, as
    // request headers carry the message's.
    let headers = resp
        .headers()
        .iter()
        .filter_map(|(name, value)| {
            let name = name.as_str().strip_prefix("amqp-header-")?;
            let value = decode_header_text(value.to_str().ok()?)?;
            Some((name.to_owned(), crate::message::HeaderValue::String(value)))
        })
        .collect();
    let body = resp.into_body();
    let detail = || {
        let text = String::from_utf8_lossy(&body[..body.len().min(500)])
            .trim()
            .to_owned();
        if text.is_empty() {
            format!("HTTP {status}")
        } else {
            format!("HTTP {status}: {text}")
        }
    };
    if status.is_success() {
        Ok(Reply {
            body: body.to_vec(),
            content_type,
            headers,
        })
    } else if status == StatusCode::CONFLICT {
        Err(HandlerError::conflict(detail()))
    } else if matches!(
        status,
        StatusCode::REQUEST_TIMEOUT | StatusCode::TOO_MANY_REQUESTS
    ) {
        // The app asks to be asked again later.
        Err(HandlerError::retry(detail()))
    } else if status.is_client_error() {
        Err(HandlerError::invalid(detail()))
    } else {
        Err(HandlerError::retry(detail()))
    }
}

/// Erases a tower service (an axum `Router`, say).
pub(crate) fn boxed_service<Svc: RequestService<RB>, RB: ResponseBody>(service: Svc) -> BoxService {
    Arc::new(move |req, limit| {
        let svc = service.clone();
        Box::pin(async move {
            let resp = svc
                .oneshot(req)
                .await
                .map_err(|e| HandlerError::retry(e.to_string()))?;
            let (parts, body) = resp.into_parts();
            let bytes = read_limited(body, limit, "the service").await?;
            Ok(Response::from_parts(parts, bytes))
        })
    })
}

/// A client for forwarding to an HTTP application. Its time is the
/// consumer's handler timeout, which the dispatcher applies to the whole
/// request (and reports, one way).
pub(crate) fn url_client() -> BoxService {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build_http::<RequestBody>();
    Arc::new(move |req, limit| {
        let client = client.clone();
        Box::pin(async move {
            let uri = req.uri().to_string();
            let resp = client.request(req).await.map_err(|e| {
                // Which it was: no connection at all, or one the app
                // dropped (reset, closed before answering).
                let what = if e.is_connect() {
                    "unreachable"
                } else {
                    "the connection failed before a response"
                };
                let cause = std::error::Error::source(&e)
                    .map(|s| format!(" ({s})"))
                    .unwrap_or_default();
                HandlerError::retry(format!("{uri}: {what}: {e}{cause}"))
            })?;
            let (parts, body) = resp.into_parts();
            let bytes = read_limited(body, limit, &uri).await?;
            Ok(Response::from_parts(parts, bytes))
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Properties;
    use crate::worker::handler::Meta;

    fn meta() -> Meta {
        Meta {
            exchange: "shop".into(),
            routing_key: "order.created".into(),
            queue: "a.orders".into(),
            connection: "default".into(),
            redelivered: false,
            attempt: 1,
            site: Some("a".into()),
            user: Some("admin".into()),
            properties: Properties {
                correlation_id: Some("c 1".into()),
                ..Properties::default()
            },
        }
    }

    #[test]
    fn path_follows_the_contract() {
        let mut m = meta();
        assert_eq!(
            request_path("http://h:1/amqp/", &m),
            "http://h:1/amqp/default/shop/order.created/c%201"
        );
        m.exchange.clear();
        m.properties.correlation_id = None;
        assert_eq!(request_path("", &m), "/default/(default)/order.created");
    }

    #[test]
    fn properties_and_headers_become_http_headers() {
        let mut m = meta();
        m.properties.content_type = Some("application/json".into());
        m.properties.reply_to = Some("replies".into());
        m.properties.message_id = Some("m-1".into());
        m.properties
            .headers
            .insert("authorization".into(), "Bearer t0k".into());
        m.properties
            .headers
            .insert("Tenant".into(), crate::message::HeaderValue::Int(7));
        let parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        m.properties
            .headers
            .insert("traceparent".into(), parent.into());
        m.properties.headers.insert(
            "tracestate".into(),
            "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7".into(),
        );
        m.attempt = 2;
        m.redelivered = true;
        let req = to_request("http://h/x".into(), &m, Bytes::from_static(b"{}")).unwrap();
        let h = |k: &str| req.headers().get(k).map(|v| v.to_str().unwrap().to_owned());
        assert_eq!(req.method(), Method::POST);
        assert_eq!(h("content-type").as_deref(), Some("application/json"));
        assert_eq!(h("authorization").as_deref(), Some("Bearer t0k"));
        assert_eq!(h("amqp-header-tenant").as_deref(), Some("7"));
        assert_eq!(h("traceparent").as_deref(), Some(parent));
        assert_eq!(
            h("tracestate").as_deref(),
            Some("congo=t61rcWkgMzE,rojo=00f067aa0ba902b7")
        );
        assert_eq!(h("amqp-correlation-id").as_deref(), Some("c 1"));
        assert_eq!(h("amqp-reply-to").as_deref(), Some("replies"));
        assert_eq!(h("amqp-message-id").as_deref(), Some("m-1"));
        assert_eq!(h("amqp-exchange").as_deref(), Some("shop"));
        assert_eq!(h("amqp-routing-key").as_deref(), Some("order.created"));
        assert_eq!(h("amqp-redelivered").as_deref(), Some("true"));
        assert_eq!(h("amqp-attempt").as_deref(), Some("2"));
        assert_eq!(h("amqp-site").as_deref(), Some("a"));
        assert_eq!(h("amqp-user").as_deref(), Some("admin"));
    }

    #[test]
    fn header_values_are_percent_encoded_reversibly() {
        let mut m = meta();
        m.properties
            .headers
            .insert("Grüße".into(), "Grüße — € 100%".into());
        m.properties
            .headers
            .insert("multi".into(), "line\r\nInjected: yes".into());
        m.properties.headers.insert(
            "price".into(),
            crate::message::HeaderValue::Decimal {
                scale: 2,
                value: 125,
            },
        );
        let req = to_request("http://h/x".into(), &m, Bytes::new()).unwrap();
        let h = |k: &str| req.headers().get(k).map(|v| v.to_str().unwrap().to_owned());
        let v = h("amqp-header-gr%c3%bc%c3%9fe").expect("non-ASCII name kept, encoded");
        assert_eq!(v, "Gr%C3%BC%C3%9Fe %E2%80%94 %E2%82%AC 100%25");
        assert_eq!(decode_header_text(&v).unwrap(), "Grüße — € 100%");
        let v = h("amqp-header-multi").expect("CR/LF value kept, encoded");
        assert_eq!(v, "line%0D%0AInjected: yes");
        assert!(req.headers().get("injected").is_none());
        assert_eq!(h("amqp-header-price").as_deref(), Some("1.25"));
    }

    #[test]
    fn statuses_map_to_outcomes() {
        let resp = |s: u16| {
            Response::builder()
                .status(s)
                .body(Bytes::from_static(b"why"))
                .unwrap()
        };
        assert!(from_response(resp(200)).is_ok());
        assert_eq!(
            from_response(resp(409)).unwrap_err().kind(),
            super::super::handler::FailureKind::Conflict
        );
        assert_eq!(
            from_response(resp(400)).unwrap_err().kind(),
            super::super::handler::FailureKind::Invalid
        );
        let e = from_response(resp(503)).unwrap_err();
        assert_eq!(e.kind(), super::super::handler::FailureKind::Retry);
        assert_eq!(e.message(), "HTTP 503 Service Unavailable: why");
        // Reply headers come back from `amqp-header-*` response headers.
        let with_header = Response::builder()
            .status(200)
            .header("amqp-header-x-missing-glyphs", encode_header_text("🐇"))
            .header("x-other", "not a reply header")
            .body(Bytes::from_static(b"pdf"))
            .unwrap();
        let reply = from_response(with_header).unwrap();
        assert_eq!(
            reply.headers.get("x-missing-glyphs"),
            Some(&crate::message::HeaderValue::String("🐇".into()))
        );
        assert_eq!(reply.headers.len(), 1);
    }
}
