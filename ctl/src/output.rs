//! What a verb prints on standard output: text for people, `--json` for scripts, and a
//! reader that closed the pipe early (`cryptnbdctl status | head -1`) ends the command
//! quietly instead of a panic.

use std::io::{ErrorKind, Write};

use anyhow::Result;
use serde::Serialize;

/// The exit status of a command whose standard output was closed under it: 128 + SIGPIPE,
/// what a shell reports for a program that SIGPIPE ended (Rust ignores the signal, so the
/// command sees EPIPE instead and exits with this status itself).
pub(crate) const CLOSED_STDOUT: u8 = 128 + 13;

/// Standard output was closed by its reader: nothing is wrong with the command.
#[derive(Debug, thiserror::Error)]
#[error("standard output was closed by its reader")]
pub(crate) struct ClosedStdout;

/// Whether `err` is (or was caused by) a closed standard output.
pub(crate) fn is_closed_stdout(err: &anyhow::Error) -> bool {
    err.chain().any(|c| c.is::<ClosedStdout>())
}

/// Writes `line` and a newline to standard output.
pub(crate) fn print_line(line: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    match writeln!(out, "{line}").and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::BrokenPipe => Err(ClosedStdout.into()),
        Err(e) => Err(anyhow::Error::new(e).context("cannot write to standard output")),
    }
}

/// How a verb prints its result: `--json` or text.
pub(crate) struct Output {
    /// `--json`: print the value as JSON (for scripts) instead of the text.
    pub(crate) json: bool,
}

impl Output {
    /// Prints `value` as JSON, or the text `text` makes.
    pub(crate) fn emit<T: Serialize>(
        &self,
        value: &T,
        text: impl FnOnce() -> String,
    ) -> Result<()> {
        if self.json {
            print_line(&serde_json::to_string_pretty(value)?)
        } else {
            print_line(&text())
        }
    }
}
