//! The seed's system, runnable with one command.
//!
//! Two sites (`a` and `b`), each with two web processes and one dedicated
//! worker sharing the site's own database; a PDF service; and one front
//! door that routes `/sites/{site}/...` to the site's web processes. Every
//! part is its own OS process, as in collective.zamqp's diagram.
//!
//! - [`web`]: a site's HTTP API and page; creating a document writes the
//!   document, the seed's render request and a slow job in one transaction
//!   (outbox).
//! - [`worker`]: the site worker (PDF replies by correlation id, the other
//!   site's events, the slow job), one message at a time; and the PDF service.
//! - [`door`]: the front door.
//! - [`run`]: the parent process that starts, restarts and stops the parts.

pub mod db;
pub mod door;
pub mod names;
mod pdf;
pub mod run;
pub mod web;
pub mod worker;

pub use pdf::{render, Rendered, FONT_DIR};
pub use run::{run_demo, run_part, Common, Part, SITES};
