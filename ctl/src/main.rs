//! `cryptnbdctl`: the control CLI of cryptnbd. `main` parses flags, installs logging, runs
//! the verb and maps the error to an exit code (docs/cli.md, "Exit codes").

#![forbid(unsafe_code)]

mod cli;
mod client;
mod commands;
mod dmcrypt;
mod exit;
mod initramfs;
mod lifecycle;
mod output;
mod units;

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = cli::Cli::parse();
    let level = match cli.verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CRYPTNBD_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level)),
        )
        .init();
    match commands::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        // A reader that went away (`cryptnbdctl status | head -1`): end quietly, as a program
        // killed by SIGPIPE would, instead of an error about our own output.
        Err(err) if output::is_closed_stdout(&err) => {
            std::process::ExitCode::from(output::CLOSED_STDOUT)
        }
        Err(err) => {
            let code = exit::code_for(&err);
            eprintln!("cryptnbdctl: error: {err}");
            for cause in err.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            std::process::ExitCode::from(code)
        }
    }
}
