//! A real headless Chromium for page tests, driven through Debian's
//! `chromedriver` over the W3C WebDriver protocol (`scripts/browser`
//! installs both). Only what the tests use: open a page, find elements,
//! read their text, type, click.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// One browser session; the driver is stopped when dropped.
#[derive(Debug)]
pub struct Browser {
    driver: Child,
    port: u16,
    session: String,
}

/// An element of the page, as the driver names it.
#[derive(Debug, Clone)]
pub struct Element(String);

const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";

impl Browser {
    /// Starts `chromedriver` and a headless Chromium whose page is `width`
    /// pixels wide (below 800, a phone's screen is emulated). Panics with
    /// what to run when they are missing.
    pub fn start(width: u32) -> Browser {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver (run scripts/browser to install it)");
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut browser = Browser {
            driver,
            port,
            session: String::new(),
        };
        // Chromium will not make a window narrower than about 500 px;
        // phone widths are emulated.
        let mut chrome = json!({
            "binary": "/usr/bin/chromium",
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                     "--disable-dev-shm-usage", format!("--window-size={},900", width.max(800))]
        });
        if width < 800 {
            chrome["mobileEmulation"] =
                json!({ "deviceMetrics": { "width": width, "height": 800, "pixelRatio": 2.0 } });
        }
        let created = browser.call(
            "POST",
            "/session",
            json!({ "capabilities": { "alwaysMatch": {
                "browserName": "chrome",
                "goog:chromeOptions": chrome
            }}}),
        );
        browser.session = created["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {created}"))
            .to_owned();
        browser
    }

    /// Opens `url` and waits for it to load.
    pub fn goto(&self, url: &str) {
        self.session_call("POST", "/url", json!({ "url": url }));
    }

    /// The elements matching a CSS selector (none is not an error).
    pub fn find_all(&self, css: &str) -> Vec<Element> {
        let found = self.session_call(
            "POST",
            "/elements",
            json!({ "using": "css selector", "value": css }),
        );
        found
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|e| e[ELEMENT_KEY].as_str().map(|id| Element(id.to_owned())))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The element's rendered text.
    pub fn text(&self, e: &Element) -> String {
        self.session_call("GET", &format!("/element/{}/text", e.0), Value::Null)
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    /// Clicks the element.
    pub fn click(&self, e: &Element) {
        self.session_call("POST", &format!("/element/{}/click", e.0), json!({}));
    }

    /// Types `text` into the element.
    pub fn type_into(&self, e: &Element, text: &str) {
        self.session_call(
            "POST",
            &format!("/element/{}/value", e.0),
            json!({ "text": text }),
        );
    }

    /// Runs `script` in the page and returns its value.
    pub fn execute(&self, script: &str) -> Value {
        self.session_call(
            "POST",
            "/execute/sync",
            json!({ "script": script, "args": [] }),
        )
    }

    /// Polls `check` every 50 ms until it is true, for at most `limit`.
    pub fn wait_until(&self, limit: Duration, what: &str, mut check: impl FnMut(&Browser) -> bool) {
        let deadline = Instant::now() + limit;
        while !check(self) {
            assert!(
                Instant::now() < deadline,
                "browser: {what} within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn session_call(&self, method: &str, path: &str, body: Value) -> Value {
        self.call(method, &format!("/session/{}{path}", self.session), body)
    }

    /// One WebDriver command; its `value`. Panics on a WebDriver error.
    fn call(&self, method: &str, path: &str, body: Value) -> Value {
        let body = if body.is_null() {
            String::new()
        } else {
            body.to_string()
        };
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).expect("reach chromedriver");
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .expect("send to chromedriver");
        // chromedriver says `Connection: close` but keeps the socket
        // open: read the headers, then exactly Content-Length bytes.
        let mut reader = std::io::BufReader::new(stream);
        let mut length = 0usize;
        let mut status = String::new();
        loop {
            let mut line = String::new();
            std::io::BufRead::read_line(&mut reader, &mut line).expect("read from chromedriver");
            if status.is_empty() {
                status = line.trim().to_owned();
            }
            let line = line.trim();
            if line.is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse().unwrap_or(0);
                }
            }
        }
        let mut body = vec![0u8; length];
        reader
            .read_exact(&mut body)
            .expect("read from chromedriver");
        let json = String::from_utf8_lossy(&body);
        let response = &status;
        let value: Value = serde_json::from_str(&json)
            .unwrap_or_else(|e| panic!("chromedriver answered {response}: {json}: {e}"));
        if let Some(error) = value["value"]["error"].as_str() {
            panic!(
                "webdriver {method} {path}: {error}: {}",
                value["value"]["message"]
            );
        }
        value["value"].clone()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.call("DELETE", &format!("/session/{}", self.session), Value::Null)
            }));
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}
