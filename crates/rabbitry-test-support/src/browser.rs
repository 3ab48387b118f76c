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
        Browser::start_with(width, true)
    }

    /// [`Browser::start`], with the page's JavaScript turned off when
    /// `javascript` is false (as a user who blocks scripts has it).
    pub fn start_with(width: u32, javascript: bool) -> Browser {
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
        if !javascript {
            chrome["prefs"] = json!({ "profile.managed_default_content_settings.javascript": 2 });
        }
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

    /// The rendered texts of the elements matching `css`, read together:
    /// when the page replaces an element while it is read (a live page
    /// does), the reading starts again.
    pub fn texts(&self, css: &str) -> Vec<String> {
        for _ in 0..20 {
            let texts: Option<Vec<String>> = self
                .find_all(css)
                .iter()
                .map(|e| {
                    self.try_call(
                        "GET",
                        &self.session_path(&format!("/element/{}/text", e.0)),
                        Value::Null,
                    )
                    .ok()
                    .map(|v| v.as_str().unwrap_or_default().to_owned())
                })
                .collect();
            if let Some(texts) = texts {
                return texts;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("browser: the elements {css} kept changing while read");
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

    /// Saves a PNG of the page's viewport at `path` (its folder is made).
    pub fn screenshot(&self, path: &std::path::Path) {
        let data = self.session_call("GET", "/screenshot", Value::Null);
        let png = base64_decode(data.as_str().unwrap_or_default());
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).expect("screenshot folder");
        }
        std::fs::write(path, png).expect("write the screenshot");
    }

    /// The page's URL now.
    pub fn url(&self) -> String {
        self.session_call("GET", "/url", Value::Null)
            .as_str()
            .unwrap_or_default()
            .to_owned()
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

    fn session_path(&self, path: &str) -> String {
        format!("/session/{}{path}", self.session)
    }

    fn session_call(&self, method: &str, path: &str, body: Value) -> Value {
        self.call(method, &self.session_path(path), body)
    }

    /// One WebDriver command; its `value`. Panics on a WebDriver error.
    fn call(&self, method: &str, path: &str, body: Value) -> Value {
        self.try_call(method, path, body)
            .unwrap_or_else(|e| panic!("webdriver {method} {path}: {e}"))
    }

    /// One WebDriver command; its `value`, or the WebDriver error.
    fn try_call(&self, method: &str, path: &str, body: Value) -> Result<Value, String> {
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
            return Err(format!("{error}: {}", value["value"]["message"]));
        }
        Ok(value["value"].clone())
    }
}

/// Standard base64 (what WebDriver sends screenshots in) to bytes.
fn base64_decode(text: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    };
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0);
    for v in text.bytes().filter_map(value) {
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
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
