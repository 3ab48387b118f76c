//! The front door over real TCP: 404 only for a site that does not exist,
//! 503 with `Retry-After` while a site's web processes restart, 413 for a
//! body past the limit, and requests passed to a live web process.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use rabbitry_demo::door::{self, Backends, MAX_BODY};

async fn serve(app: axum::Router) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    port
}

/// POSTs `body` with curl-like plain HTTP/1.1; returns status, headers, body.
async fn post(port: u16, path: &str, body: Vec<u8>) -> (u16, String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    // The door may answer (413) before it has read the whole body.
    let _ = s.write_all(&body).await;
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out).await;
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split(' ').nth(1).unwrap_or("0").parse().unwrap();
    (status, head.to_ascii_lowercase(), body.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_door_tells_missing_sites_from_restarting_ones_and_limits_bodies() {
    let web = serve(axum::Router::new().fallback(|| async { "from site a" })).await;
    let backends: Backends = Arc::new(RwLock::new(HashMap::from([
        ("a".to_owned(), vec![Some(web), None]),
        ("b".to_owned(), vec![None, None]),
    ])));
    let port = serve(door::router(backends)).await;

    let (status, _, body) = post(port, "/sites/a/documents", b"{}".to_vec()).await;
    assert_eq!((status, body.as_str()), (200, "from site a"));

    let (status, head, _) = post(port, "/sites/b/documents", b"{}".to_vec()).await;
    assert_eq!(status, 503, "a restarting site is unavailable, not missing");
    assert!(head.contains("retry-after: 1"), "{head}");

    let (status, _, _) = post(port, "/sites/zzz/documents", b"{}".to_vec()).await;
    assert_eq!(status, 404);

    let (status, _, _) = post(port, "/sites/a/documents", vec![b'x'; MAX_BODY + 1]).await;
    assert_eq!(status, 413);
}
