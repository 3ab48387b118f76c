//! The front door: one address that routes `/sites/{site}/...` to that
//! site's web processes, round robin, trying the other process when one
//! does not answer. A site whose processes are all restarting answers 503
//! with `Retry-After`; 404 means only a site that does not exist; request
//! bodies are limited to [`MAX_BODY`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{StatusCode, Uri};
use axum::response::{Html, IntoResponse, Response};
use axum::Router;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// The largest request body the door forwards (1 MiB); larger gets 413.
pub const MAX_BODY: usize = 1024 * 1024;

/// The ports of each site's web processes (`None` while one restarts).
pub type Backends = Arc<RwLock<HashMap<String, Vec<Option<u16>>>>>;

#[derive(Clone)]
struct Door {
    backends: Backends,
    next: Arc<AtomicUsize>,
    client: Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
}

/// The front door's router.
pub fn router(backends: Backends) -> Router {
    let door = Door {
        backends,
        next: Arc::new(AtomicUsize::new(0)),
        client: Client::builder(TokioExecutor::new()).build_http(),
    };
    Router::new()
        .route("/", axum::routing::get(index))
        .fallback(proxy)
        .with_state(door)
}

async fn index(State(d): State<Door>) -> Html<String> {
    let mut sites: Vec<String> = d
        .backends
        .read()
        .map(|b| b.keys().cloned().collect())
        .unwrap_or_default();
    sites.sort();
    let frames: String = sites
        .iter()
        .map(|s| {
            format!(
                "<figure><figcaption><a href=\"/sites/{s}/\">Site {s}</a></figcaption>\
                 <iframe src=\"/sites/{s}/\" title=\"Site {s}\"></iframe></figure>"
            )
        })
        .collect();
    Html(include_str!("landing.html").replace("{{SITES}}", &frames))
}

async fn proxy(State(d): State<Door>, req: Request) -> Response {
    let path = req.uri().path().to_owned();
    let Some(site) = path
        .strip_prefix("/sites/")
        .and_then(|rest| rest.split('/').next())
        .filter(|s| !s.is_empty())
    else {
        return (
            StatusCode::NOT_FOUND,
            "not found: try /sites/a/ or /sites/b/",
        )
            .into_response();
    };
    let ports: Option<Vec<u16>> = d
        .backends
        .read()
        .ok()
        .and_then(|b| b.get(site).map(|v| v.iter().flatten().copied().collect()));
    let Some(ports) = ports else {
        return (StatusCode::NOT_FOUND, format!("no site '{site}'")).into_response();
    };
    if ports.is_empty() {
        return unavailable(site);
    }
    let (parts, body) = req.into_parts();
    let body = match axum::body::to_bytes(body, MAX_BODY).await {
        Ok(b) => b,
        Err(_) => {
            return (
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request bodies are limited to {} KiB", MAX_BODY / 1024),
            )
                .into_response()
        }
    };
    let first = d.next.fetch_add(1, Ordering::Relaxed);
    let path_and_query = parts
        .uri
        .path_and_query()
        .map_or_else(|| path.clone(), |p| p.as_str().to_owned());
    for attempt in 0..ports.len() {
        let port = ports[(first + attempt) % ports.len()];
        let Ok(uri) = format!("http://127.0.0.1:{port}{path_and_query}").parse::<Uri>() else {
            return (StatusCode::BAD_REQUEST, "bad path").into_response();
        };
        let mut forward = axum::http::Request::builder()
            .method(parts.method.clone())
            .uri(uri);
        for (k, v) in &parts.headers {
            forward = forward.header(k, v);
        }
        let Ok(forward) = forward.body(Full::new(body.clone())) else {
            return (StatusCode::BAD_REQUEST, "bad request").into_response();
        };
        match d.client.request(forward).await {
            Ok(resp) => {
                let (p, b) = resp.into_parts();
                return Response::from_parts(p, Body::new(b));
            }
            Err(e) => {
                tracing::warn!(site, port, error = %e, "web process did not answer; trying the next")
            }
        }
    }
    unavailable(site)
}

/// 503 with `Retry-After`: the site exists, but none of its web processes
/// answers right now (they are restarting).
fn unavailable(site: &str) -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        [(axum::http::header::RETRY_AFTER, "1")],
        format!("site '{site}' is restarting; try again in a second"),
    )
        .into_response()
}
