//! Exchange, queue and routing-key names of the demo, in one place.
//!
//! The exchanges and the request's routing key are the seed's contract
//! (`service.tasks`, `service.my_template`, `service.results`) plus the
//! sites' topic exchange `sites.events`. Queue names and the sites' routing
//! keys carry an instance prefix, so that two demos (or a test and a demo)
//! on one broker do not take each other's messages. The instance defaults
//! to a name derived from the data folder ([`default_instance`]).
//!
//! The PDF service's queue is the exception: it is one shared queue,
//! `service.pdf`, with every running demo's service as a competing
//! consumer, as a real service would have. Each request is rendered once,
//! by whichever service takes it, and its reply goes to the requesting
//! site's results queue by its `reply_to`. Nothing collects messages
//! forever: the shared queue expires after an hour without consumers, and
//! an instance's queues after a week without use.

/// Requests to the service.
pub const TASKS_EXCHANGE: &str = "service.tasks";
/// The seed's routing key for rendering.
pub const TEMPLATE_KEY: &str = "service.my_template";
/// Replies from the service.
pub const RESULTS_EXCHANGE: &str = "service.results";
/// Events between sites.
pub const EVENTS_EXCHANGE: &str = "sites.events";

/// The shared queue of the PDF service.
pub const SERVICE_QUEUE: &str = "service.pdf";

/// How long the shared service queue lives without consumers (ms).
pub const SERVICE_QUEUE_EXPIRES_MS: i64 = 3_600_000;

/// How long an instance's queues live unused (ms): a week.
pub const SITE_QUEUE_EXPIRES_MS: i64 = 7 * 24 * 3_600_000;

/// The instance name for a demo whose data lives in `data_dir`: `demo-`
/// and six random hex digits, written to `data_dir/instance` on the first
/// start and read from there afterwards. Two demos never share queues
/// unless they share their data, even when their folders have the same
/// path on two machines (two containers, two CI runners).
pub fn default_instance(data_dir: &std::path::Path) -> std::io::Result<String> {
    use std::io::Write;
    let file = data_dir.join("instance");
    let read = |file: &std::path::Path| -> Option<String> {
        let text = std::fs::read_to_string(file).ok()?;
        let name = text.trim();
        let ok = name.len() == 11
            && name.starts_with("demo-")
            && name[5..].bytes().all(|b| b.is_ascii_hexdigit());
        ok.then(|| name.to_owned())
    };
    if let Some(name) = read(&file) {
        return Ok(name);
    }
    std::fs::create_dir_all(data_dir)?;
    let name = format!("demo-{}", &uuid::Uuid::new_v4().simple().to_string()[..6]);
    // Two starts at once: the first file written wins, the other reads it.
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&file)
    {
        Ok(mut f) => {
            f.write_all(format!("{name}\n").as_bytes())?;
            Ok(name)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => read(&file).ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{} is not a demo instance name", file.display()),
            )
        }),
        Err(e) => Err(e),
    }
}

/// The names one demo instance uses.
#[derive(Debug, Clone)]
pub struct Names {
    /// The instance prefix.
    pub instance: String,
}

impl Names {
    /// Names for `instance`.
    pub fn new(instance: &str) -> Self {
        Names {
            instance: instance.to_owned(),
        }
    }

    /// The durable queue a site's replies come back to (its `reply_to`).
    pub fn results_queue(&self, site: &str) -> String {
        format!("{}.site-{site}.results", self.instance)
    }

    /// The queue of a site's slow jobs.
    pub fn jobs_queue(&self, site: &str) -> String {
        format!("{}.site-{site}.jobs", self.instance)
    }

    /// The queue of a site's feed (events from other sites).
    pub fn feed_queue(&self, site: &str) -> String {
        format!("{}.site-{site}.feed", self.instance)
    }

    /// The routing key of a site's `document.rendered` events.
    pub fn rendered_key(&self, site: &str) -> String {
        format!("{}.{site}.document.rendered", self.instance)
    }

    /// The service's queue: shared by every demo ([`SERVICE_QUEUE`]).
    pub fn service_queue(&self) -> String {
        SERVICE_QUEUE.to_owned()
    }

    /// Every queue the instance declares and owns (for cleanup). The shared
    /// service queue is not among them: other demos may be using it.
    pub fn all_queues(&self, sites: &[&str]) -> Vec<String> {
        let mut out = Vec::new();
        for s in sites {
            for q in [
                self.results_queue(s),
                self.jobs_queue(s),
                self.feed_queue(s),
            ] {
                out.push(format!("{q}.dead"));
                out.push(format!("{q}.retry.1s"));
                out.push(format!("{q}.retry.5s"));
                out.push(q);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_instance_is_its_data_folders_and_two_folders_at_one_path_differ() {
        let dir = std::env::temp_dir().join(format!("names-{}", uuid::Uuid::new_v4().simple()));
        let a = default_instance(&dir).unwrap();
        assert!(a.starts_with("demo-") && a.len() == 11, "{a}");
        assert_eq!(a, default_instance(&dir).unwrap(), "stable for its data");
        // The same path on another machine (here: the folder made anew)
        // is another instance.
        std::fs::remove_dir_all(&dir).unwrap();
        let b = default_instance(&dir).unwrap();
        assert_ne!(a, b);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
