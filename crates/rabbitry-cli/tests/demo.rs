//! The whole demo, end to end: two sites, their web processes and workers,
//! the PDF service, pub/sub between the sites, a foreign client, and a
//! worker killed while messages are pending. The tests share the broker's
//! fixed exchanges, so they run one at a time.

mod common;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use amqprs::channel::{
    BasicConsumeArguments, BasicPublishArguments, QueueBindArguments, QueueDeclareArguments,
};
use amqprs::connection::{Connection, OpenConnectionArguments};
use amqprs::BasicProperties;
use common::{create, get_json, http, wait_rendered, Demo};

static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn pdf_text(bytes: &[u8]) -> String {
    let doc = lopdf::Document::load_mem(bytes).expect("a PDF parser reads it");
    doc.extract_text(&[1]).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forty_documents_are_rendered_fetched_and_announced_to_the_other_site() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let demo = Demo::start();
    let base = demo.base.clone();
    let mut ids: BTreeMap<&str, Vec<(String, String)>> = BTreeMap::new();
    let mut tasks = Vec::new();
    for site in ["a", "b"] {
        for i in 0..20 {
            let base = base.clone();
            let title = format!("Report {i} from site {site}");
            tasks.push(tokio::spawn(async move {
                let id = create(&base, site, &title).await;
                (site, id, title)
            }));
        }
    }
    for t in tasks {
        let (site, id, title) = t.await.unwrap();
        ids.entry(site).or_default().push((id, title));
    }
    // Any title: markup, other scripts, a character the font lacks.
    let shown = "Grüße — Привет €";
    let any_title = format!("<img src=x onerror=alert(1)> {shown} 🐇");
    let any = create(&base, "a", &any_title).await;
    let rendered = wait_rendered(
        &base,
        "a",
        std::slice::from_ref(&any),
        Duration::from_secs(90),
    )
    .await;
    assert_eq!(rendered[0]["title"], any_title.as_str());
    assert_eq!(rendered[0]["missing"], "🐇", "{}", rendered[0]);
    let pdf_url = rendered[0]["pdf_url"].as_str().unwrap();
    let (status, headers, pdf) = common::http_full("GET", &format!("{base}{pdf_url}"), None).await;
    assert_eq!(status, 200);
    let text = pdf_text(&pdf);
    assert!(text.contains(shown), "the PDF's text: {text}");
    assert!(
        text.contains("U+1F407"),
        "the PDF names what it left out: {text}"
    );
    let disposition = headers["content-disposition"].to_str().unwrap();
    assert!(
        disposition.starts_with("inline; filename=\"_img src=x onerror=alert(1)_ "),
        "{disposition}"
    );
    assert!(
        disposition.contains("filename*=UTF-8''%3Cimg%20src%3Dx"),
        "{disposition}"
    );
    for (site, docs) in &ids {
        let just_ids: Vec<String> = docs.iter().map(|(id, _)| id.clone()).collect();
        let rendered = wait_rendered(&base, site, &just_ids, Duration::from_secs(90)).await;
        for d in &rendered {
            assert_eq!(d["renders"], 1, "stored once: {d}");
        }
        for (id, title) in docs {
            let doc = get_json(&format!("{base}/sites/{site}/documents/{id}")).await;
            assert_eq!(doc["status"], "rendered");
            assert_eq!(doc["title"], title.as_str());
            let pdf_url = doc["pdf_url"].as_str().unwrap();
            let (status, pdf) = http("GET", &format!("{base}{pdf_url}"), None).await;
            assert_eq!(status, 200);
            assert!(pdf.starts_with(b"%PDF-"), "starts with %PDF-");
            assert!(pdf.trim_ascii_end().ends_with(b"%%EOF"), "ends with %%EOF");
            assert!(
                pdf_text(&pdf).contains(title.as_str()),
                "the PDF shows {title}"
            );
        }
    }
    // Each site's feed holds the other site's 20 events.
    for (site, other) in [("a", "b"), ("b", "a")] {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let feed = get_json(&format!("{base}/sites/{site}/feed")).await;
            let from_other: Vec<&serde_json::Value> = feed
                .as_array()
                .unwrap()
                .iter()
                .filter(|e| e["from_site"] == other && e["title"] != any_title.as_str())
                .collect();
            // Site b also has site a's document with any title.
            let any_seen = site == "a"
                || feed
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|e| e["title"] == any_title.as_str());
            if from_other.len() == 20 && any_seen {
                let titles: Vec<&str> = from_other
                    .iter()
                    .map(|e| e["title"].as_str().unwrap())
                    .collect();
                for (_, title) in &ids[other] {
                    assert!(
                        titles.contains(&title.as_str()),
                        "{title} missing from site {site}'s feed"
                    );
                }
                assert!(
                    feed.as_array()
                        .unwrap()
                        .iter()
                        .all(|e| e["from_site"] == other),
                    "only the other site's events"
                );
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "site {site}'s feed has {} of site {other}'s 20 events",
                from_other.len()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    // The slow job ran too.
    let docs = get_json(&format!("{base}/sites/a/documents")).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut docs = docs;
    while docs
        .as_array()
        .unwrap()
        .iter()
        .any(|d| d["words"].is_null())
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "word counts missing"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        docs = get_json(&format!("{base}/sites/a/documents")).await;
    }
    assert!(
        docs.as_array()
            .unwrap()
            .iter()
            .filter(|d| d["title"] != any_title.as_str())
            .all(|d| d["words"] == 5),
        "\"Report N from site a\" has 5 words"
    );
    // The page is there, and bad input gets a clear error.
    let (status, page) = http("GET", &format!("{base}/sites/a/"), None).await;
    assert_eq!(status, 200);
    assert!(String::from_utf8_lossy(&page).contains("<form"));
    let (status, body) = http(
        "POST",
        &format!("{base}/sites/a/documents"),
        Some(serde_json::json!({"title": ""})),
    )
    .await;
    assert_eq!(status, 400, "{}", String::from_utf8_lossy(&body));
    assert!(String::from_utf8_lossy(&body).contains("title"));
    let instance = demo.instance.clone();
    assert!(demo.stop().success(), "the demo stops cleanly");
    common::cleanup(&instance).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_client_with_the_seeds_exact_properties_gets_a_pdf() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let demo = Demo::start();
    let conn = Connection::open(&OpenConnectionArguments::new(
        "127.0.0.1",
        5672,
        "guest",
        "guest",
    ))
    .await
    .unwrap();
    let ch = conn.open_channel(None).await.unwrap();
    // The site's side of the seed: my_queue bound to service.results.
    let my_queue = format!("test.seed.my_queue.{}", demo.instance);
    ch.queue_declare(
        QueueDeclareArguments::new(&my_queue)
            .auto_delete(true)
            .finish(),
    )
    .await
    .unwrap();
    ch.queue_bind(QueueBindArguments::new(
        &my_queue,
        "service.results",
        &my_queue,
    ))
    .await
    .unwrap();
    let (_, mut replies) = ch
        .basic_consume_rx(
            BasicConsumeArguments::new(&my_queue, "")
                .auto_ack(true)
                .finish(),
        )
        .await
        .unwrap();
    let correlation_id = uuid::Uuid::new_v4().to_string();
    let mut p = BasicProperties::default();
    p.with_content_type("application/x-msgpack")
        .with_correlation_id(&correlation_id)
        .with_reply_to(&my_queue);
    let body = rmp_serde::to_vec_named(&BTreeMap::from([("title", "Hello World!")])).unwrap();
    ch.basic_publish(
        p.finish(),
        body,
        BasicPublishArguments::new("service.tasks", "service.my_template"),
    )
    .await
    .unwrap();
    let m = tokio::time::timeout(Duration::from_secs(30), replies.recv())
        .await
        .expect("a reply")
        .unwrap();
    let props = m.basic_properties.unwrap();
    assert_eq!(
        props.content_type().map(String::as_str),
        Some("application/pdf")
    );
    assert_eq!(props.correlation_id(), Some(&correlation_id));
    let deliver = m.deliver.unwrap();
    assert_eq!(deliver.exchange(), "service.results");
    assert_eq!(deliver.routing_key(), &my_queue);
    let pdf = m.content.unwrap();
    assert!(pdf.starts_with(b"%PDF-") && pdf_text(&pdf).contains("Hello World!"));
    let instance = demo.instance.clone();
    assert!(demo.stop().success());
    common::cleanup(&instance).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_sites_worker_loses_nothing_and_renders_each_document_once() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let demo = Demo::start();
    let base = demo.base.clone();
    let workers = demo.part_pids("worker --site a");
    assert_eq!(workers.len(), 1, "one worker for site a: {workers:?}");
    let mut ids = Vec::new();
    for i in 0..15 {
        ids.push(create(&base, "a", &format!("Survivor {i}")).await);
    }
    // Kill it hard while replies and jobs are pending.
    assert!(Command::new("kill")
        .args(["-KILL", &workers[0].to_string()])
        .status()
        .unwrap()
        .success());
    for i in 15..20 {
        ids.push(create(&base, "a", &format!("Survivor {i}")).await);
    }
    // The demo starts a new worker; everything gets rendered, once.
    let docs = match tokio::time::timeout(
        Duration::from_secs(95),
        tokio::spawn(async move { wait_rendered(&base, "a", &ids, Duration::from_secs(90)).await }),
    )
    .await
    {
        Ok(Ok(docs)) => docs,
        _ => {
            common::diagnose(&demo).await;
            panic!("not every document was rendered after the worker was killed");
        }
    };
    assert_eq!(docs.len(), 20);
    for d in &docs {
        assert_eq!(d["renders"], 1, "rendered exactly once: {d}");
    }
    let now = demo.part_pids("worker --site a");
    let base = demo.base.clone();
    let _ = base;
    assert_eq!(now.len(), 1);
    assert_ne!(now[0], workers[0], "a new worker process took over");
    let instance = demo.instance.clone();
    assert!(demo.stop().success());
    common::cleanup(&instance).await;
}

/// The command line of a process, as `ps` shows it.
fn cmdline(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default()
}

fn alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_demos_share_a_broker_serve_other_clients_and_die_with_their_parent() {
    let _serial = ONE_AT_A_TIME.lock().await;
    // Two demos with their default instance names, on one broker.
    let a = Demo::start();
    let b = Demo::start();
    assert_ne!(a.instance, b.instance, "instances differ by data folder");

    // A raw client on direct reply-to calls the PDF service.
    let conn = Connection::open(&OpenConnectionArguments::new(
        "127.0.0.1",
        5672,
        "guest",
        "guest",
    ))
    .await
    .unwrap();
    let ch = conn.open_channel(None).await.unwrap();
    let (_, mut replies) = ch
        .basic_consume_rx(
            BasicConsumeArguments::new("amq.rabbitmq.reply-to", "")
                .auto_ack(true)
                .finish(),
        )
        .await
        .unwrap();
    let mut p = BasicProperties::default();
    p.with_content_type("application/json")
        .with_correlation_id("direct-1")
        .with_reply_to("amq.rabbitmq.reply-to");
    ch.basic_publish(
        p.finish(),
        br#"{"title":"Direct reply-to"}"#.to_vec(),
        BasicPublishArguments::new("service.tasks", "service.my_template"),
    )
    .await
    .unwrap();
    let m = tokio::time::timeout(Duration::from_secs(30), replies.recv())
        .await
        .expect("the PDF comes back on direct reply-to")
        .unwrap();
    assert_eq!(
        m.basic_properties
            .unwrap()
            .correlation_id()
            .map(String::as_str),
        Some("direct-1")
    );
    let pdf = m.content.unwrap();
    assert!(pdf.starts_with(b"%PDF-") && pdf_text(&pdf).contains("Direct reply-to"));
    let _ = conn.close().await;

    // The README's own example.
    let out_file = std::env::temp_dir().join(format!("{}-hello.pdf", a.instance));
    let out = Command::new(env!("CARGO_BIN_EXE_rabbitry"))
        .args([
            "rpc",
            "--exchange",
            "service.tasks",
            "--routing-key",
            "service.my_template",
            "--serializer",
            "msgpack",
            "--output",
        ])
        .arg(&out_file)
        .arg(r#"{"title":"Hello World!"}"#)
        .env_remove("AMQP_URL")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("content-type: application/pdf"));
    assert!(std::fs::read(&out_file).unwrap().starts_with(b"%PDF-"));

    // Each demo renders its own documents, once, with nothing dead-lettered.
    let mut ids = (Vec::new(), Vec::new());
    for i in 0..10 {
        ids.0.push(create(&a.base, "a", &format!("A{i}")).await);
        ids.1.push(create(&b.base, "a", &format!("B{i}")).await);
    }
    for (demo, ids) in [(&a, &ids.0), (&b, &ids.1)] {
        let docs = wait_rendered(&demo.base, "a", ids, Duration::from_secs(60)).await;
        assert!(docs.iter().all(|d| d["renders"] == 1), "{docs:?}");
    }
    let gw = rabbitry::Connection::open(rabbitry::ConnectionSettings::default())
        .await
        .unwrap();
    for demo in [&a, &b] {
        let names = rabbitry_demo::names::Names::new(&demo.instance);
        let dead = rabbitry::worker::dead::list(&gw, &names.results_queue("a"), 10)
            .await
            .unwrap_or_default();
        assert!(dead.is_empty(), "{dead:?}");
    }
    gw.close().await;

    // Nothing secret on the parts' command lines.
    let parts: Vec<u32> = ["web", "worker", "service"]
        .iter()
        .flat_map(|p| a.part_pids(p))
        .collect();
    assert_eq!(parts.len(), 7, "seven parts: {parts:?}");
    for pid in &parts {
        let line = cmdline(*pid);
        assert!(
            !line.contains("amqp://") && !line.contains("guest"),
            "{line}"
        );
    }

    // SIGKILL the parent: every part stops by itself.
    let (a_instance, b_instance) = (a.instance.clone(), b.instance.clone());
    let mut a = a;
    a.child.kill().unwrap();
    a.child.wait().unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(45);
    while parts.iter().any(|p| alive(*p)) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "parts still running after their parent died: {:?}",
            parts.iter().filter(|p| alive(**p)).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(b.stop().success());
    common::cleanup(&a_instance).await;
    common::cleanup(&b_instance).await;
}

/// The PDF service cannot render (its font is missing): the document does
/// not stay "pending" for ever, it fails and says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_document_that_cannot_be_rendered_fails_with_the_reason() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let demo = Demo::start_with(&[("RABBITRY_DEMO_FONTS", "/nonexistent/fonts")]);
    let base = demo.base.clone();
    let id = create(&base, "a", "No font for me").await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let doc = loop {
        let doc = get_json(&format!("{base}/sites/a/documents/{id}")).await;
        if doc["status"] != "pending" {
            break doc;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still pending: {doc}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(doc["status"], "failed", "{doc}");
    let why = doc["error"].as_str().unwrap();
    assert!(
        why.contains("text/plain") && why.contains("DejaVuSans.ttf"),
        "{why}"
    );
    assert!(
        !why.contains("/nonexistent"),
        "no server path in the reason: {why}"
    );
    assert!(doc["pdf_url"].is_null());
    demo.stop();
}

/// Where the tests' screenshots go, for a developer to look at.
fn screenshot_path(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("screenshots")
        .join(format!("{name}.png"))
}

/// The site page in a real headless Chromium (Debian's, installed by
/// `scripts/browser`): any title shown as text, a failing document with its
/// reason and a working Retry render, a phone's width with a 200-character
/// word, and the page without JavaScript.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_site_page_holds_up_in_a_real_browser() {
    use rabbitry_test_support::browser::Browser;
    let _serial = ONE_AT_A_TIME.lock().await;
    let demo = Demo::start();
    let base = demo.base.clone();
    let fail_switch = demo.data_dir.join("pdf-service-fails");
    let hostile = "<img src=x onerror=alert(1)> Grüße — Привет € 🐇";
    let long = "W".repeat(200);
    tokio::task::spawn_blocking(move || {
        let row_with = |b: &Browser, text: &str, status: &str| {
            b.texts("#docs tr")
                .iter()
                .any(|t| t.contains(text) && t.contains(status))
        };
        // Desktop: any title, as text, in the list and in the other
        // site's feed.
        // Site b's page is open before the title is submitted on site a.
        let site_b = Browser::start(1000);
        site_b.goto(&format!("{base}/sites/b/"));
        let b = Browser::start(1000);
        b.goto(&format!("{base}/sites/a/"));
        b.type_into(&b.find_all("#title")[0], hostile);
        b.click(&b.find_all("#create")[0]);
        b.wait_until(Duration::from_secs(60), "the title rendered", |b| {
            row_with(b, "Привет", "rendered")
        });
        assert!(b.find_all("img").is_empty(), "no element made from the title");
        // Its timeline: all seven steps, each with its time, the last two
        // from site b.
        b.wait_until(Duration::from_secs(30), "all seven steps timed", |b| {
            let at = b.texts("#docs tr:first-child ol.timeline .at");
            at.len() == 7 && at.iter().all(|t| t.contains(':'))
        });
        let steps = b.texts("#docs tr:first-child ol.timeline li");
        println!("the timeline:\n{}", steps.join("\n"));
        assert!(steps[1].contains("correlation id "), "{steps:?}");
        assert!(steps[6].contains("received by site b") && steps[6].contains("ms)"), "{steps:?}");
        let row = b.texts("#docs tr").remove(0);
        assert!(row.contains("Grüße — Привет €"), "{row}");
        assert!(row.contains("left out: 🐇"), "{row}");
        // The broker panel: the site's queues and the PDF service's, each
        // with its consumers, and the outbox.
        b.wait_until(Duration::from_secs(10), "the broker panel", |b| {
            let rows = b.texts("#queues tr");
            rows.len() == 4 && rows.iter().any(|r| r.contains("service.pdf"))
        });
        assert!(b.texts("#outbox")[0].starts_with("outbox: "));
        b.screenshot(&screenshot_path("demo-site-a-desktop"));
        // Its link: the status page, where dead letters are replayed.
        b.click(&b.find_all("a[href='/admin/status']")[0]);
        b.wait_until(Duration::from_secs(10), "the status page, live", |b| {
            b.texts("#live") == ["live"] && b.texts("#consumers tbody tr").len() == 7
        });
        b.screenshot(&screenshot_path("demo-status"));
        // Site b's feed shows it without a reload, as text.
        site_b.wait_until(Duration::from_secs(30), "site b's feed, live", |b| {
            b.texts("#feed li").iter().any(|t| t.contains("<img src=x"))
        });
        assert!(site_b.find_all("img").is_empty());
        drop(site_b);

        // A failing document says why; Retry render, once the cause is
        // gone, renders it.
        std::fs::write(&fail_switch, b"").unwrap();
        b.goto(&format!("{base}/sites/a/"));
        b.type_into(&b.find_all("#title")[0], "please fail now");
        b.click(&b.find_all("#create")[0]);
        b.wait_until(Duration::from_secs(60), "the failure shown", |b| {
            row_with(b, "please fail now", "told to fail this title")
        });
        b.screenshot(&screenshot_path("demo-site-a-failed"));
        std::fs::remove_file(&fail_switch).unwrap();
        let retry = b.find_all("form.retry button");
        assert_eq!(retry.len(), 1, "one Retry render button");
        b.click(&retry[0]);
        b.wait_until(Duration::from_secs(60), "rendered after the retry", |b| {
            row_with(b, "please fail now", "rendered")
        });
        drop(b);

        // A phone: no horizontal scrolling, even with a 200-character
        // word listed, and the feed is on the screen.
        let phone = Browser::start(375);
        phone.goto(&format!("{base}/sites/a/"));
        phone.type_into(&phone.find_all("#title")[0], &long);
        phone.click(&phone.find_all("#create")[0]);
        phone.wait_until(Duration::from_secs(60), "the long title listed", |b| {
            row_with(b, &long[..50], "")
        });
        let sizes = phone.execute(
            "const f = document.getElementById('feed').getBoundingClientRect();\
             return [window.innerWidth, document.documentElement.scrollWidth, f.left, f.right, f.width];",
        );
        assert_eq!(sizes[0], 375, "{sizes}");
        assert!(sizes[1].as_f64().unwrap() <= 375.0, "the page is wider than the phone: {sizes}");
        assert!(sizes[2].as_f64().unwrap() >= 0.0 && sizes[3].as_f64().unwrap() <= 375.0, "the feed is off screen: {sizes}");
        assert!(sizes[4].as_f64().unwrap() > 100.0, "the feed has room: {sizes}");
        phone.screenshot(&screenshot_path("demo-site-a-phone"));
        drop(phone);

        // Without JavaScript: the documents are listed, and the form
        // creates one (a plain POST and a redirect).
        let plain = Browser::start_with(1000, false);
        plain.goto(&format!("{base}/sites/a/"));
        assert!(row_with(&plain, "please fail now", "rendered"), "listed by the server");
        plain.type_into(&plain.find_all("#title")[0], "Made without JavaScript");
        plain.click(&plain.find_all("#create")[0]);
        plain.wait_until(Duration::from_secs(10), "back on the page", |b| {
            b.url().ends_with("/sites/a/") && row_with(b, "Made without JavaScript", "")
        });
        plain.screenshot(&screenshot_path("demo-site-a-no-javascript"));
        drop(plain);

        // The front door shows both sites side by side.
        let door = Browser::start(1200);
        door.goto(&format!("{base}/"));
        assert_eq!(door.find_all("iframe").len(), 2);
        door.screenshot(&screenshot_path("demo-landing"));
        drop(door);

        // The demo stops: within 3 s the page says it is not connected.
        // It starts again: the page is live, and submitting works.
        let b = Browser::start(1000);
        b.goto(&format!("{base}/sites/a/"));
        b.wait_until(Duration::from_secs(10), "live", |b| b.texts("#live") == ["live"]);
        let data_dir = demo.data_dir.clone();
        let stopped = std::time::Instant::now();
        demo.stop();
        println!("the demo stopped in {:?}", stopped.elapsed());
        let stopped = std::time::Instant::now();
        b.wait_until(Duration::from_secs(3), "not reachable within 3 s", |b| {
            b.texts("#live")
                .first()
                .is_some_and(|t| t.starts_with("not reachable since"))
        });
        println!("the page said it was not connected {:?} after the stop", stopped.elapsed());
        b.screenshot(&screenshot_path("demo-site-a-stopped"));
        let demo = common::Demo::start_again(&base, data_dir);
        b.wait_until(Duration::from_secs(20), "live again", |b| b.texts("#live") == ["live"]);
        b.type_into(&b.find_all("#title")[0], "After the restart");
        b.click(&b.find_all("#create")[0]);
        b.wait_until(Duration::from_secs(60), "rendered after the restart", |b| {
            row_with(b, "After the restart", "rendered")
        });
        drop(b);
        demo
    })
    .await
    .unwrap()
    .stop();
}

/// Reads an event stream until its text contains `needle`.
async fn stream_until(base: &str, path: &str, needle: &str) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let host = base.trim_start_matches("http://");
    let mut s = tokio::net::TcpStream::connect(host).await.unwrap();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    while !String::from_utf8_lossy(&seen).contains(needle) {
        let n = s.read(&mut buf).await.unwrap();
        assert!(n > 0, "the stream ended before '{needle}'");
        seen.extend_from_slice(&buf[..n]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forty_open_pages_share_one_reader_and_each_sees_a_new_document() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let demo = Demo::start();
    let base = demo.base.clone();
    let title = format!("Seen by every page {}", uuid::Uuid::new_v4().simple());
    let pages: Vec<_> = (0..40)
        .map(|_| {
            let (base, title) = (base.clone(), title.clone());
            tokio::spawn(async move { stream_until(&base, "/sites/a/events", &title).await })
        })
        .collect();
    // Every page has its first event before the document exists.
    let first: Vec<_> = (0..40)
        .map(|_| {
            let base = base.clone();
            tokio::spawn(async move { stream_until(&base, "/sites/a/events", "event: site").await })
        })
        .collect();
    for f in first {
        tokio::time::timeout(Duration::from_secs(30), f)
            .await
            .expect("a first event")
            .unwrap();
    }
    create(&base, "a", &title).await;
    for p in pages {
        tokio::time::timeout(Duration::from_secs(60), p)
            .await
            .expect("every open page sees the new document")
            .unwrap();
    }
    demo.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_demo_whose_port_is_taken_says_so_and_declares_nothing() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let instance = format!("demo-{}", &uuid::Uuid::new_v4().simple().to_string()[..6]);
    let dir = std::env::temp_dir().join(format!("taken-{instance}"));
    let out = tokio::task::spawn_blocking({
        let (addr, instance, dir) = (addr.clone(), instance.clone(), dir.clone());
        move || {
            Command::new(env!("CARGO_BIN_EXE_rabbitry"))
                .args(["demo", "--listen", &addr, "--instance", &instance])
                .arg("--data-dir")
                .arg(&dir)
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains(&format!("binding {addr}")), "{err}");
    let conn = rabbitry::Connection::open(rabbitry::ConnectionSettings::default())
        .await
        .unwrap();
    let names = rabbitry_demo::names::Names::new(&instance);
    for q in [names.results_queue("a"), names.jobs_queue("b")] {
        assert!(
            conn.queue_status(&q).await.unwrap().is_none(),
            "{q} was declared"
        );
    }
    conn.close().await;
    drop(taken);
}
