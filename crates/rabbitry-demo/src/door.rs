//! The front door: one address that routes `/sites/{site}/...` to that
//! site's web processes, round robin, trying the other process when one
//! does not answer.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{StatusCode, Uri};
use axum::response::{Html, IntoResponse, Response};
use axum::Router;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

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
    let links: String = sites
        .iter()
        .map(|s| format!("<li><a href=\"/sites/{s}/\">Site {s}</a></li>"))
        .collect();
    Html(format!(
        "<!doctype html><meta charset=utf-8><title>rabbitry demo</title>\
         <body style=\"font:16px system-ui;margin:40px\"><h1>rabbitry demo</h1><ul>{links}</ul></body>"
    ))
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
    let ports: Vec<u16> = match d.backends.read() {
        Ok(b) => b
            .get(site)
            .map(|v| v.iter().flatten().copied().collect())
            .unwrap_or_default(),
        Err(_) => Vec::new(),
    };
    if ports.is_empty() {
        return (StatusCode::NOT_FOUND, format!("no site '{site}'")).into_response();
    }
    let (parts, body) = req.into_parts();
    let Ok(body) = body.collect().await.map(|b| b.to_bytes()) else {
        return (StatusCode::BAD_REQUEST, "could not read the request body").into_response();
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
    (
        StatusCode::BAD_GATEWAY,
        format!("no web process of site '{site}' answered"),
    )
        .into_response()
}
