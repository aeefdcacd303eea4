//! `cryptnbd`: the daemon. `main` parses flags, installs logging, and runs the library until
//! SIGTERM or SIGINT.

#![forbid(unsafe_code)]

use std::path::PathBuf;

use clap::Parser;

/// Serve encrypted volumes over NBD. Runs with no configuration on the embedded local KMS.
#[derive(Debug, Parser)]
#[command(name = "cryptnbd", version)]
struct Args {
    /// TOML configuration file (docs/daemon.md).
    #[arg(long, env = "CRYPTNBD_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// State directory (overrides the configuration).
    #[arg(long, env = "CRYPTNBD_STATE_DIR", value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Socket directory (overrides the configuration).
    #[arg(long, env = "CRYPTNBD_RUNTIME_DIR", value_name = "DIR")]
    runtime_dir: Option<PathBuf>,
    /// File with the passphrase of a sealed keystore (overrides `kms.passphrase_file`;
    /// `/dev/stdin` reads it from a pipe, as the initramfs does).
    #[arg(long, value_name = "FILE")]
    kms_passphrase_file: Option<PathBuf>,
    /// A volume on a block device, added to `[store.devices]`: NAME=UUID=… or NAME=/dev/…
    /// (the encrypted root names its volume this way; repeatable).
    #[arg(long, value_name = "NAME=DEVICE")]
    store_device: Vec<String>,
    /// More log output (-v debug, -vv trace); or CRYPTNBD_LOG with a tracing filter.
    #[arg(short, long, action = clap::ArgAction::Count)]
    verbose: u8,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let level = match args.verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        // A log line that cannot be written (a full disk under a log file) is dropped. The
        // default reports it on standard error, which fails the same way and panics: the
        // daemon would die of its own log.
        .log_internal_errors(false)
        // Colours only on a terminal: the journal and log files get plain text.
        .with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CRYPTNBD_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level)),
        )
        .init();
    match run(args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // Not eprintln!, which panics when standard error cannot be written.
            use std::io::Write;
            let mut stderr = std::io::stderr().lock();
            let _ = writeln!(stderr, "cryptnbd: error: {e}");
            for cause in e.chain().skip(1) {
                let _ = writeln!(stderr, "  caused by: {cause}");
            }
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let mut config = match &args.config {
        Some(path) => cryptnbd::Config::load(path)?,
        None => cryptnbd::Config::default(),
    };
    if args.state_dir.is_some() {
        config.state_dir = args.state_dir;
    }
    if args.runtime_dir.is_some() {
        config.runtime_dir = args.runtime_dir;
    }
    if args.kms_passphrase_file.is_some() {
        config.kms.passphrase_file = args.kms_passphrase_file;
    }
    for entry in &args.store_device {
        let Some((name, device)) = entry.split_once('=') else {
            anyhow::bail!("--store-device {entry}: write NAME=UUID=… or NAME=/dev/…");
        };
        config
            .store
            .devices
            .insert(name.to_owned(), device.to_owned());
    }
    config.validate()?;
    // The initramfs starts the daemon that serves the root as `@cryptnbd`: systemd's killing
    // sprees spare a root process whose argv[0] begins with '@' (ROOT_STORAGE_DAEMONS.md).
    config.root_daemon = std::env::args_os()
        .next()
        .is_some_and(|a| a.as_encoded_bytes().first() == Some(&b'@'));
    // Before any thread starts, so every thread inherits it (and each runtime thread sets it
    // again, in case it was started from elsewhere).
    let io_flusher = cryptnbd::hardening::set_io_flusher();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .on_thread_start(|| {
            let _ = cryptnbd::hardening::set_io_flusher();
        })
        .build()?;
    match io_flusher {
        Ok(()) => tracing::debug!("running as an I/O flusher (PR_SET_IO_FLUSHER)"),
        Err(m) if rustix::process::geteuid().is_root() => tracing::warn!("{m}"),
        Err(m) => tracing::debug!("{m}"),
    }
    rt.block_on(async { cryptnbd::run(config, cryptnbd::stop_signal()).await })?;
    Ok(())
}
