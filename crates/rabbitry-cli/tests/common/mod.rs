//! Helpers for the tests that run the whole demo: start it, talk HTTP to
//! its front door, stop it, and clean its queues.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// A running `rabbitry demo`.
pub(crate) struct Demo {
    pub child: Child,
    pub base: String,
    pub instance: String,
    pub data_dir: std::path::PathBuf,
}

impl Demo {
    /// Starts the demo on a free port with its own data dir, and the
    /// instance name it derives from that folder (as a user's demo does).
    pub(crate) fn start() -> Demo {
        Demo::start_with(&[])
    }

    /// [`Demo::start`] with extra flags and environment.
    pub(crate) fn start_with(env: &[(&str, &str)]) -> Demo {
        let dir_name = format!(
            "rabbitry-demo-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..10]
        );
        let data_dir = std::env::temp_dir().join(dir_name);
        Demo::launch("127.0.0.1:0", data_dir, env)
    }

    /// The same demo started again, at the same address with the same
    /// data, after [`Demo::stop`].
    pub(crate) fn start_again(base: &str, data_dir: std::path::PathBuf) -> Demo {
        let listen = base.trim_start_matches("http://").to_owned();
        Demo::launch(&listen, data_dir, &[])
    }

    fn launch(listen: &str, data_dir: std::path::PathBuf, env: &[(&str, &str)]) -> Demo {
        let mut child = Command::new(env!("CARGO_BIN_EXE_rabbitry"))
            .args(["demo", "--listen", listen])
            .arg("--data-dir")
            .arg(&data_dir)
            .env_remove("AMQP_URL")
            .env("RABBITRY_LOG", "warn")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start rabbitry demo");
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let mut base = None;
        let mut instance = None;
        for line in lines.by_ref() {
            let line = line.unwrap();
            let line = line.trim();
            if let Some(rest) = line.strip_prefix("site a: ") {
                base = Some(rest.trim_end_matches("/sites/a/").to_owned());
            }
            if let Some(rest) = line.strip_prefix("instance: ") {
                instance = rest.split_whitespace().next().map(str::to_owned);
                break;
            }
        }
        // Keep draining stdout so the demo never blocks on it.
        std::thread::spawn(move || for _ in lines {});
        Demo {
            child,
            base: base.expect("the demo printed its URLs"),
            instance: instance.expect("the demo printed its instance"),
            data_dir,
        }
    }

    /// Stops the demo with SIGTERM and waits for it.
    pub(crate) fn stop(mut self) -> std::process::ExitStatus {
        Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        for _ in 0..600 {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.child.kill().unwrap();
        panic!("the demo did not stop within 60 s");
    }

    /// The PIDs of one part's processes (`worker --site a`...).
    pub(crate) fn part_pids(&self, pattern: &str) -> Vec<u32> {
        let out = Command::new("pgrep")
            .args([
                "-f",
                &format!("demo-part {pattern}.*--instance {}", self.instance),
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }
}

/// Prints what a stuck demo holds: each site's outbox, the instance's
/// queues, and the dead letters of the results queues.
pub(crate) async fn diagnose(demo: &Demo) {
    let conn = rabbitry::Connection::open(rabbitry::ConnectionSettings::default())
        .await
        .unwrap();
    let names = rabbitry_demo::names::Names::new(&demo.instance);
    for q in names.all_queues(&rabbitry_demo::SITES) {
        if let Ok(Some(s)) = conn.queue_status(&q).await {
            eprintln!("queue {q}: {} ready, {} consumers", s.messages, s.consumers);
        }
    }
    let docs = get_json(&format!("{}/sites/a/documents", demo.base)).await;
    for d in docs
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["status"] != "rendered")
    {
        eprintln!("pending document: {d}");
        let url = format!("sqlite://{}/site-a.db", demo.data_dir.display());
        let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
        let cid = d["correlation_id"].as_str().unwrap();
        let req: Option<(String, Option<i64>)> = sqlx::query_as(
            "SELECT kind, replied_at FROM rabbitry_requests WHERE correlation_id = ?1",
        )
        .bind(cid)
        .fetch_optional(&pool)
        .await
        .unwrap();
        let inbox: Vec<(String, String)> =
            sqlx::query_as("SELECT consumer, message_id FROM rabbitry_inbox WHERE message_id = ?1")
                .bind(cid)
                .fetch_all(&pool)
                .await
                .unwrap();
        let outbox: Vec<(i64, String, Option<String>)> =
            sqlx::query_as("SELECT id, status, lease_owner FROM rabbitry_outbox")
                .fetch_all(&pool)
                .await
                .unwrap();
        eprintln!("  request: {req:?}; inbox: {inbox:?}; outbox rows: {outbox:?}");
    }
    for site in rabbitry_demo::SITES {
        let url = format!("sqlite://{}/site-{site}.db", demo.data_dir.display());
        if let Ok(o) = rabbitry::outbox::Outbox::connect(&url).await {
            eprintln!("site {site} outbox: {:?}", o.status().await);
        }
        for d in rabbitry::worker::dead::list(&conn, &names.results_queue(site), 20)
            .await
            .unwrap_or_default()
        {
            eprintln!("site {site} dead result: {:?}", d.error);
        }
    }
}

/// Deletes every queue of a demo instance (after it stopped).
pub(crate) async fn cleanup(instance: &str) {
    let conn = rabbitry::Connection::open(rabbitry::ConnectionSettings::default())
        .await
        .unwrap();
    for q in rabbitry_demo::names::Names::new(instance).all_queues(&rabbitry_demo::SITES) {
        let _ = conn.delete_queue(&q).await;
    }
    conn.close().await;
}

impl Drop for Demo {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // A test that failed midway: stop the demo and remove its
            // queues, so that its service queue does not keep collecting
            // copies of later runs' requests.
            let _ = Command::new("kill")
                .args(["-TERM", &self.child.id().to_string()])
                .status();
            let _ = self.child.wait();
            let instance = self.instance.clone();
            let _ = std::thread::spawn(move || {
                if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    rt.block_on(cleanup(&instance));
                }
            })
            .join();
        }
    }
}

/// One HTTP request; returns the status and the body.
pub(crate) async fn http(
    method: &str,
    url: &str,
    json: Option<serde_json::Value>,
) -> (u16, Vec<u8>) {
    let (status, _, body) = http_full(method, url, json).await;
    (status, body)
}

/// One HTTP request; returns the status, the headers and the body.
pub(crate) async fn http_full(
    method: &str,
    url: &str,
    json: Option<serde_json::Value>,
) -> (u16, hyper::HeaderMap, Vec<u8>) {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let body = json.map(|j| j.to_string()).unwrap_or_default();
    let req = hyper::Request::builder()
        .method(method)
        .uri(url)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(30), client.request(req))
        .await
        .expect("an answer within 30 s")
        .expect("the front door answers");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let bytes = resp
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes()
        .to_vec();
    (status, headers, bytes)
}

/// GET a JSON document.
pub(crate) async fn get_json(url: &str) -> serde_json::Value {
    let (status, body) = http("GET", url, None).await;
    assert_eq!(status, 200, "GET {url}: {}", String::from_utf8_lossy(&body));
    serde_json::from_slice(&body).unwrap()
}

/// Creates a document; returns its id.
pub(crate) async fn create(base: &str, site: &str, title: &str) -> String {
    let (status, body) = http(
        "POST",
        &format!("{base}/sites/{site}/documents"),
        Some(serde_json::json!({"title": title})),
    )
    .await;
    assert_eq!(status, 202, "{}", String::from_utf8_lossy(&body));
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert!(v["correlation_id"].as_str().is_some_and(|c| c.len() == 36));
    v["id"].as_str().unwrap().to_owned()
}

/// Waits until every listed document of `site` is rendered; returns them.
pub(crate) async fn wait_rendered(
    base: &str,
    site: &str,
    ids: &[String],
    limit: Duration,
) -> Vec<serde_json::Value> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let docs = get_json(&format!("{base}/sites/{site}/documents")).await;
        let docs: Vec<serde_json::Value> = docs
            .as_array()
            .unwrap()
            .iter()
            .filter(|d| ids.contains(&d["id"].as_str().unwrap().to_owned()))
            .cloned()
            .collect();
        let rendered = docs.iter().filter(|d| d["status"] == "rendered").count();
        if rendered == ids.len() {
            return docs;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {rendered} of {} documents of site {site} rendered within {limit:?}",
            ids.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
