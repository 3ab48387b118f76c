//! Exit codes: one meaning each, documented in `--help` and the README,
//! and the one place where an error becomes a code and a message.

use std::process::ExitCode;

use rabbitry::ErrorKind;

/// Something failed (the broker, the database, a refused publish...).
pub(crate) const FAILURE: u8 = 1;
/// Wrong flags, or a configuration that does not validate.
pub(crate) const USAGE: u8 = 2;
/// A queue or database that was named does not exist.
pub(crate) const NOT_FOUND: u8 = 3;
/// No answer in time (`rpc` without a reply).
pub(crate) const TIMEOUT: u8 = 4;
/// `declare --check` found differences.
pub(crate) const DRIFT: u8 = 5;
/// Interrupted by a second Ctrl-C before a clean stop.
pub(crate) const INTERRUPTED: u8 = 130;

/// The table shown at the end of `rabbitry --help`.
pub(crate) const HELP: &str = "\
Exit codes:
  0    success (also when the reader of stdout went away, as with | head)
  1    failure: broker, database, refused or unroutable publish
  2    usage or configuration error
  3    not found: a named queue or database does not exist
  4    timeout: no reply in time (rpc)
  5    drift: declare --check found differences
  130  interrupted: a second Ctrl-C stopped the command at once";

/// Prints `err` once (each cause shown once) and maps it to its exit code.
/// A closed stdout is not an error: the reader has what it wanted.
pub(crate) fn report(err: &anyhow::Error) -> ExitCode {
    if is_broken_pipe(err) {
        return ExitCode::SUCCESS;
    }
    eprintln!("error: {}", message(err));
    ExitCode::from(code_for(err))
}

/// The exit code for an error.
pub(crate) fn code_for(err: &anyhow::Error) -> u8 {
    if is_broken_pipe(err) {
        return 0;
    }
    let kind = err
        .chain()
        .find_map(|c| c.downcast_ref::<rabbitry::Error>())
        .map(rabbitry::Error::kind);
    match kind {
        Some(ErrorKind::Config | ErrorKind::Invalid) => USAGE,
        Some(ErrorKind::NotFound) => NOT_FOUND,
        Some(ErrorKind::Timeout) => TIMEOUT,
        _ if err.chain().any(|c| c.downcast_ref::<Usage>().is_some()) => USAGE,
        _ => FAILURE,
    }
}

fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// The error and its causes, each shown once: rabbitry's errors already
/// include their source in their message.
fn message(err: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if !out.contains(&text) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&text);
        }
    }
    out
}

/// A usage error found after parsing (a flag combination, a missing file
/// argument): exit code 2, like the parser's own.
#[derive(Debug)]
pub(crate) struct Usage(pub String);

impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Usage {}

/// Returns a usage error.
macro_rules! usage {
    ($($arg:tt)*) => {
        return Err(anyhow::Error::new($crate::exit::Usage(format!($($arg)*))))
    };
}
pub(crate) use usage;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_map_to_their_codes() {
        let e = |k| anyhow::Error::new(rabbitry::Error::new(k, "x"));
        assert_eq!(code_for(&e(ErrorKind::Config)), USAGE);
        assert_eq!(code_for(&e(ErrorKind::NotFound)), NOT_FOUND);
        assert_eq!(code_for(&e(ErrorKind::Timeout)), TIMEOUT);
        assert_eq!(code_for(&e(ErrorKind::Connect)), FAILURE);
        let pipe = anyhow::Error::new(std::io::Error::from(std::io::ErrorKind::BrokenPipe));
        assert_eq!(code_for(&pipe), 0);
        assert_eq!(code_for(&anyhow::Error::new(Usage("u".into()))), USAGE);
    }
}
