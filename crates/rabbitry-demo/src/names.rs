//! Exchange, queue and routing-key names of the demo, in one place.
//!
//! The exchanges and the request's routing key are the seed's contract
//! (`service.tasks`, `service.my_template`, `service.results`) plus the
//! sites' topic exchange `sites.events`. Queue names and the sites' routing
//! keys carry an instance prefix, so that two demos (or a test and a demo)
//! on one broker do not take each other's messages.

/// Requests to the service.
pub const TASKS_EXCHANGE: &str = "service.tasks";
/// The seed's routing key for rendering.
pub const TEMPLATE_KEY: &str = "service.my_template";
/// Replies from the service.
pub const RESULTS_EXCHANGE: &str = "service.results";
/// Events between sites.
pub const EVENTS_EXCHANGE: &str = "sites.events";

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

    /// The service's queue.
    pub fn service_queue(&self) -> String {
        format!("{}.service.pdf", self.instance)
    }

    /// Every queue the instance declares (for cleanup).
    pub fn all_queues(&self, sites: &[&str]) -> Vec<String> {
        let mut out = vec![self.service_queue()];
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
        out.push(format!("{}.dead", self.service_queue()));
        out.push(format!("{}.retry.1s", self.service_queue()));
        out.push(format!("{}.retry.5s", self.service_queue()));
        out
    }
}
