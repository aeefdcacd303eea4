//! The verbs. Each prints text for people, or one JSON document with `--json`.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use kms_client::local::{LocalKms, LocalKmsOptions};
use kms_client::{IdentityContext, KeyMetadata, KmsBackend, context};
use serde::Serialize;
use zeroize::Zeroizing;

use control_api::{
    AttachRequest, AttachmentStatus, AuditQuery, DetachRequest, KmsKeyRequest, Request, Response,
};

use crate::cli::{AttachArgs, Cli, Command, CreateArgs, KmsCommand};
use crate::client::Client;
use crate::exit::CliError;
use crate::output::Output;
use crate::units::human;
use control_api::paths::{StateLayout, validate_name};
use store::catalog::Catalog as _;
use store::file::Access;

/// Runs one verb.
pub fn run(cli: Cli) -> Result<()> {
    let layout = StateLayout::new(cli.state_dir.clone(), None);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let out = Output { json: cli.json };
    let socket = cli
        .socket
        .clone()
        .unwrap_or_else(|| layout.control_socket());
    match &cli.command {
        Command::Create(args) if args.from_image.is_some() => {
            if let Some(path) = &args.path {
                // A block device is formatted and filled here, offline (an old root copied
                // onto the disk that will hold the encrypted one).
                if store::device::is_block_device(path) {
                    return rt.block_on(create(&cli, &layout, args, &out));
                }
                return Err(CliError::usage(
                    "--from-image runs in the daemon, which keeps volumes in its state \
                     directory: leave out --path (or give a block device to fill offline)",
                )
                .into());
            }
            let mut client = Client::connect(&socket)?;
            let r = crate::lifecycle::create_from_image(&mut client, args, out.json)?;
            created_response(r, &out)
        }
        Command::Create(args) => match Client::try_connect(&socket)? {
            Some(client) if args.path.is_none() => create_via_daemon(client, args, &out),
            _ => rt.block_on(create(&cli, &layout, args, &out)),
        },
        Command::Rebuild {
            volume,
            from_image,
            from_snapshot,
            force,
        } => crate::lifecycle::rebuild(
            &mut Client::connect(&socket)?,
            volume,
            from_image.as_deref(),
            from_snapshot.as_deref(),
            *force,
            out.json,
        ),
        Command::Snapshot { volume, name } => crate::lifecycle::snapshot(
            &mut Client::connect(&socket)?,
            volume,
            name.as_deref(),
            out.json,
        ),
        Command::Snapshots { volume } => {
            crate::lifecycle::snapshots(&mut Client::connect(&socket)?, volume, out.json)
        }
        Command::DeleteSnapshot { volume, name } => {
            let r = Client::connect(&socket)?.call(Request::DeleteSnapshot {
                volume: volume.clone(),
                name: name.clone(),
            })?;
            out.emit(&r, || {
                format!("deleted snapshot {name} of {volume} (header wiped)")
            })
        }
        Command::Rekey {
            volume,
            kms_key,
            context,
            clear_context,
        } => crate::lifecycle::rekey(
            &mut Client::connect(&socket)?,
            volume,
            kms_key,
            context,
            *clear_context,
            out.json,
        ),
        Command::Reencrypt { volume, force } => {
            crate::lifecycle::reencrypt(&mut Client::connect(&socket)?, volume, *force, out.json)
        }
        Command::Move { volume, to_store } => crate::lifecycle::move_volume(
            &mut Client::connect(&socket)?,
            volume,
            to_store,
            out.json,
        ),
        Command::Recovery(cmd) => {
            crate::lifecycle::recovery(&mut Client::connect(&socket)?, cmd, out.json)
        }
        Command::Export {
            volume,
            to,
            plaintext,
        } => crate::lifecycle::export(
            &mut Client::connect(&socket)?,
            volume,
            to,
            *plaintext,
            out.json,
        ),
        Command::Header(cmd) => {
            crate::lifecycle::header(&mut Client::connect(&socket)?, cmd, out.json)
        }
        Command::Cancel { volume } => {
            crate::lifecycle::cancel(&mut Client::connect(&socket)?, volume, out.json)
        }
        Command::Operations => {
            crate::lifecycle::operations(&mut Client::connect(&socket)?, out.json)
        }
        Command::Revoke { kms_key } => {
            let r = Client::connect(&socket)?.call(Request::Revoke {
                kms_key: kms_key.clone(),
            })?;
            out.emit(&r, || match &r {
                Response::Revoked {
                    kms_key, detached, ..
                } if detached.is_empty() => {
                    format!("no attached volume is wrapped under {kms_key}")
                }
                Response::Revoked {
                    kms_key,
                    detached,
                    cancelled,
                    ..
                } => format!(
                    "detached {} (keys wiped){}; to keep them detached, disable {kms_key} in \
                     the KMS: a recovery passphrase keyslot still opens a volume without it",
                    detached.join(", "),
                    if cancelled.is_empty() {
                        String::new()
                    } else {
                        format!(", cancelled the operations on {}", cancelled.join(", "))
                    }
                ),
                other => format!("{other:?}"),
            })
        }
        Command::Inspect { volume } => inspect(&layout, volume, &out),
        Command::Kms(cmd) => rt.block_on(kms(&cli, &layout, &socket, cmd, &out)),
        Command::Tls(crate::cli::TlsCommand::Reload) => tls_reload(&socket, &out),
        Command::Tls(crate::cli::TlsCommand::Allow(a)) => tls_allow(&socket, a, &out),
        Command::Attach(a) => attach(&socket, a, &out),
        Command::Open(a) => crate::dmcrypt::open(&socket, a, &out),
        Command::Initramfs(crate::cli::InitramfsCommand::Prepare(a)) => {
            crate::initramfs::prepare(a)
        }
        Command::Initramfs(crate::cli::InitramfsCommand::Unlock(a)) => crate::initramfs::unlock(a),
        Command::Initramfs(crate::cli::InitramfsCommand::Check(a)) => {
            crate::initramfs::check(a, &out)
        }
        Command::Close { name } => crate::dmcrypt::close(&socket, name, &out),
        Command::Detach { volume, force } => {
            let r = Client::connect(&socket)?.call(Request::Detach(DetachRequest {
                volume: volume.clone(),
                force: *force,
            }))?;
            out.emit(&r, || match &r {
                Response::Detached {
                    volume,
                    disconnected,
                    pending,
                } => {
                    let clients = if disconnected.is_empty() {
                        String::new()
                    } else {
                        format!(
                            " (disconnected {})",
                            disconnected
                                .iter()
                                .map(|c| c.peer.as_str())
                                .collect::<Vec<_>>()
                                .join(", ")
                        )
                    };
                    match pending {
                        None => format!("detached {volume}{clients}; key wiped"),
                        Some(p) => format!("detached {volume}{clients}, not finished: {p}"),
                    }
                }
                other => format!("{other:?}"),
            })
        }
        Command::List => list(&layout, &socket, &out),
        Command::Status { volume } => {
            let r = Client::connect(&socket)?.call(Request::Status {
                volume: volume.clone(),
            })?;
            out.emit(&r, || match &r {
                Response::Status {
                    attachments,
                    detaching,
                } if attachments.is_empty() && detaching.is_empty() => {
                    "no volume is attached ('cryptnbdctl attach VOLUME')".into()
                }
                Response::Status {
                    attachments,
                    detaching,
                } => attachments
                    .iter()
                    .map(attachment_text)
                    .chain(detaching.iter().map(|d| {
                        format!(
                            "{}: detaching since {} (forced): requests are stuck in its \
                             backing store; its key is wiped when they return",
                            d.volume, d.since
                        )
                    }))
                    .collect::<Vec<_>>()
                    .join("\n\n"),
                other => format!("{other:?}"),
            })
        }
        Command::Delete {
            volume,
            yes,
            with_snapshots,
        } => delete(&layout, &socket, volume, *yes, *with_snapshots, &out),
        Command::Audit {
            volume,
            since,
            limit,
        } => {
            let q = AuditQuery {
                volume: volume.clone(),
                since: since.clone(),
                limit: *limit,
            };
            let records = match Client::try_connect(&socket)? {
                Some(mut c) => match c.call(Request::Audit(q))? {
                    Response::Audit { records } => records,
                    other => anyhow::bail!("unexpected answer from the daemon: {other:?}"),
                },
                None => statedir::audit::AuditLog::read(
                    &layout.audit_log(),
                    AUDIT_KEEP,
                    q.volume.as_deref(),
                    q.since.as_deref(),
                    q.limit,
                )
                .map_err(|e| match e.kind() {
                    std::io::ErrorKind::InvalidInput => CliError::usage(e.to_string()).into(),
                    _ => anyhow::Error::new(e).context("cannot read the audit trail"),
                })?,
            };
            if out.json {
                crate::output::print_line(&serde_json::to_string_pretty(&records)?)?;
            } else {
                for r in &records {
                    crate::output::print_line(&audit_text(r))?;
                }
            }
            Ok(())
        }
    }
}

/// Rotated audit files the CLI reads when the daemon is not running (the daemon's default).
const AUDIT_KEEP: u32 = 5;

fn audit_text(r: &serde_json::Value) -> String {
    let f = |k: &str| r.get(k).and_then(|v| v.as_str()).unwrap_or("-").to_string();
    format!(
        "{}  {:<19} {:<12} uid {:<6} key {}  {}  ({} ms)",
        f("time"),
        f("operation"),
        f("volume"),
        r.get("caller_uid")
            .and_then(|v| v.as_u64())
            .map_or("-".into(), |u| u.to_string()),
        f("key_id"),
        f("outcome"),
        r.get("latency_ms").and_then(|v| v.as_u64()).unwrap_or(0)
    ) + &r
        .get("request_id")
        .and_then(|v| v.as_str())
        .map_or(String::new(), |id| format!("  request {id}"))
}

fn attachment_text(a: &AttachmentStatus) -> String {
    let mut s = format!(
        "{} -> export {}{}{}\n  size {}, store {}, attached {} by uid {}, read {} / written {}{}",
        a.volume,
        a.export_name,
        if a.read_only { " (read-only)" } else { "" },
        if a.transient { " (transient)" } else { "" },
        human(a.size),
        if a.store.is_empty() { "file" } else { &a.store },
        a.since,
        a.owner_uid,
        human(a.bytes_read),
        human(a.bytes_written),
        match (a.fenced, a.failed) {
            (true, _) => {
                "\n  FENCED: another host took this volume over and the cluster refuses this \
                 one; every request fails. Detach it here"
            }
            (false, true) => "\n  FAILED: a flush failed; detach and reattach, then check the data",
            (false, false) => "",
        }
    );
    s.push_str(&format!(
        "\n  master key {}: {}",
        a.kms_key,
        match (&a.key_state, &a.key_checked) {
            (Some(state), Some(c)) if state == "Enabled" => format!("Enabled (checked {})", c.at),
            (Some(state), Some(c)) => format!(
                "{state} (checked {}): the volume works until detached but cannot be attached \
                 again until the key is enabled",
                c.at
            ),
            (_, Some(c)) => format!(
                "not checked at {}: {}",
                c.at,
                c.error.as_deref().unwrap_or("unknown error")
            ),
            _ => "not checked yet".into(),
        }
    ));
    if let Some(d) = &a.device {
        s.push_str(&format!(
            "\n  kernel device {}: {} connection(s), block size {}, io timeout {} s, \
             dead-connection timeout {} s{}{}",
            d.path,
            d.connections,
            d.block_size,
            d.io_timeout_secs,
            d.dead_conn_timeout_secs,
            if d.resumed {
                ", reconnected at daemon start"
            } else {
                ""
            },
            if d.reconnects > 0 {
                format!(", {} dead connection(s) replaced", d.reconnects)
            } else {
                String::new()
            }
        ));
    }
    for u in &a.uris {
        s.push_str(&format!("\n  {u}"));
    }
    if a.tls_only {
        s.push_str("\n  served only over TLS");
    }
    if a.uris.iter().any(|u| u.starts_with("nbds")) || a.tls_only {
        if a.allow_certs.is_empty() {
            s.push_str("\n  admits any client certificate the CA signed and did not revoke");
        } else {
            let rules: Vec<String> = a.allow_certs.iter().map(ToString::to_string).collect();
            s.push_str(&format!(
                "\n  admits only client certificates with: {}",
                rules.join("; ")
            ));
        }
    }
    if a.connections.is_empty() {
        s.push_str("\n  no connections");
    }
    for c in &a.connections {
        s.push_str(&format!(
            "\n  connection {} from {}{} since {}: read {} / written {}",
            c.id,
            c.peer,
            c.certificate
                .as_ref()
                .map(|dn| format!(" (TLS, certificate {dn})"))
                .unwrap_or_default(),
            c.since,
            human(c.bytes_read),
            human(c.bytes_written)
        ));
    }
    s
}

/// How each client reaches a TLS export at `uri` (`nbds://HOST:PORT/EXPORT`), with the
/// client's certificate directory (ca-cert.pem, client-cert.pem, client-key.pem) as CERTS.
fn tls_client_lines(uri: &str, export: &str) -> String {
    let hostport = uri
        .trim_start_matches("nbds://")
        .split('/')
        .next()
        .unwrap_or_default();
    let (host, port) = hostport.rsplit_once(':').unwrap_or((hostport, "10809"));
    format!(
        "Reach it over TLS with a client certificate directory CERTS (ca-cert.pem, \
         client-cert.pem, client-key.pem; docs/tls.md):\n  \
         nbdinfo '{uri}?tls-certificates=CERTS'\n  \
         qemu-img info --object tls-creds-x509,id=tls0,endpoint=client,dir=CERTS --image-opts \
         driver=nbd,server.type=inet,server.host={host},server.port={port},export={export},tls-creds=tls0\n  \
         nbd-client {host} {port} /dev/nbd0 -N {export} -cacertfile CERTS/ca-cert.pem -certfile CERTS/client-cert.pem -keyfile CERTS/client-key.pem"
    )
}

fn tls_reload(socket: &Path, out: &Output) -> Result<()> {
    let r = Client::connect(socket)?.call(Request::TlsReload)?;
    out.emit(&r, || match &r {
        Response::TlsReloaded {
            tcp,
            unix,
            sessions_checked,
            disconnected,
        } => {
            let mut s = format!(
                "TLS reloaded (tcp: {tcp}, unix socket: {unix}); {sessions_checked} live TLS \
                 session(s) checked, {} disconnected",
                disconnected.len()
            );
            for d in disconnected {
                s.push_str(&format!(
                    "\n  volume {}: connection {} from {} (certificate {}): {}",
                    d.volume, d.connection, d.peer, d.certificate, d.reason
                ));
            }
            s
        }
        other => format!("{other:?}"),
    })
}

fn tls_allow(socket: &Path, a: &crate::cli::TlsAllowArgs, out: &Output) -> Result<()> {
    validate_name(&a.volume).map_err(CliError::usage)?;
    let allow_certs = cert_rules(&a.certs)?;
    if allow_certs.is_empty() && !a.any {
        return Err(CliError::usage(
            "say which certificates may open the export (--allow-cert, --allow-cert-issuer with \
             --allow-cert-serial, --allow-cert-sha256), or --any for every certificate the CA signed",
        )
        .into());
    }
    let r = Client::connect(socket)?.call(Request::TlsAllow {
        volume: a.volume.clone(),
        allow_certs,
    })?;
    out.emit(&r, || match &r {
        Response::TlsAllowed {
            volume,
            allow_certs,
            sessions_checked,
            disconnected,
        } => {
            let who = if allow_certs.is_empty() {
                "any certificate the CA signed".to_owned()
            } else {
                allow_certs
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("; ")
            };
            let mut s = format!(
                "volume {volume} now admits {who}; {sessions_checked} live TLS session(s) \
                 checked, {} disconnected",
                disconnected.len()
            );
            for d in disconnected {
                s.push_str(&format!(
                    "\n  connection {} from {} (certificate {}): {}",
                    d.connection, d.peer, d.certificate, d.reason
                ));
            }
            s
        }
        other => format!("{other:?}"),
    })
}

/// A certificate allow-list, from the --allow-cert* flags.
fn cert_rules(a: &crate::cli::CertRuleArgs) -> Result<Vec<control_api::CertRule>> {
    use control_api::CertRule;
    if a.allow_cert_issuers.len() != a.allow_cert_serials.len() {
        return Err(CliError::usage(
            "--allow-cert-issuer and --allow-cert-serial go in pairs: give each issuer its serial",
        )
        .into());
    }
    let mut rules: Vec<CertRule> = a
        .allow_certs
        .iter()
        .cloned()
        .map(CertRule::Subject)
        .collect();
    rules.extend(
        a.allow_cert_issuers
            .iter()
            .zip(&a.allow_cert_serials)
            .map(|(issuer, serial)| CertRule::IssuerSerial {
                issuer: issuer.clone(),
                serial: serial.clone(),
            }),
    );
    rules.extend(a.allow_cert_sha256.iter().cloned().map(CertRule::Sha256));
    Ok(rules)
}

fn attach(socket: &Path, a: &AttachArgs, out: &Output) -> Result<()> {
    validate_name(&a.volume).map_err(CliError::usage)?;
    let req = AttachRequest {
        volume: a.volume.clone(),
        read_only: a.read_only,
        export_name: a.export_name.clone(),
        transient: a.transient,
        sid: a.sid.clone(),
        directory: a.directory.clone(),
        allow_uids: a.allow_uids.clone(),
        allow_gids: a.allow_gids.clone(),
        tcp: a.tcp,
        tls_only: a.tls_only,
        allow_certs: cert_rules(&a.certs)?,
        device: a.device.clone(),
        connections: a.connections,
        io_timeout_secs: a.io_timeout,
        dead_conn_timeout_secs: a.dead_conn_timeout,
        take_over: match (a.take_over, a.force) {
            (false, _) => None,
            (true, false) => Some(control_api::TakeOver::IfGone),
            (true, true) => Some(control_api::TakeOver::Force),
        },
    };
    let r = if req.take_over.is_some() {
        crate::lifecycle::long_call(
            &mut Client::connect(socket)?,
            Request::Attach(req),
            None,
            out.json,
        )?
    } else {
        Client::connect(socket)?.call(Request::Attach(req))?
    };
    out.emit(&r, || match &r {
        Response::Attached(s) if s.device.is_some() => {
            let dev = s.device.as_ref().map(|d| d.path.as_str()).unwrap_or_default();
            format!(
                "{}\n\nThe volume is the block device {dev}:\n  mkfs.ext4 {dev}   # first time only\n  mount {dev} /mnt",
                attachment_text(s),
            )
        }
        Response::Attached(s) => match s.uris.iter().find(|u| u.starts_with("nbds://")) {
            Some(uri) => format!("{}\n\n{}", attachment_text(s), tls_client_lines(uri, &s.export_name)),
            None => {
                let uri = s.uris.first().cloned().unwrap_or_default();
                format!(
                    "{}\n\nReach it with:\n  nbdinfo '{uri}'\n  qemu-img info '{uri}'\n  nbdfuse DIR/disk '{uri}' &   # then losetup, mkfs, mount",
                    attachment_text(s),
                )
            }
        },
        other => format!("{other:?}"),
    })
}

fn list(layout: &StateLayout, socket: &Path, out: &Output) -> Result<()> {
    let volumes = match Client::try_connect(socket)? {
        Some(mut c) => match c.call(Request::List)? {
            Response::Volumes { volumes } => volumes,
            other => anyhow::bail!("unexpected answer from the daemon: {other:?}"),
        },
        None => statedir::summary::scan_volumes(
            &store::catalog::DirCatalog::new(&layout.volumes(), &layout.snapshots()),
            |_| false,
        )
        .with_context(|| format!("cannot list {}", layout.volumes().display()))?,
    };
    out.emit(&volumes, || {
        if volumes.is_empty() {
            return format!("no volumes in {}", layout.volumes().display());
        }
        volumes
            .iter()
            .map(|v| {
                format!(
                    "{:<20} {:>12}  {:<5} {:<8} {}{}{}",
                    v.name,
                    human(v.size),
                    v.store,
                    match (v.attached, &v.dm_crypt, &v.held_by) {
                        (true, _, _) => "attached",
                        (false, Some(_), _) => "dm-crypt",
                        (false, None, Some(_)) => "held",
                        (false, None, None) => "-",
                    },
                    v.volume_id.as_deref().unwrap_or("-"),
                    v.held_by
                        .as_ref()
                        .map(|h| format!("  held by {h}"))
                        .unwrap_or_default(),
                    v.problem
                        .as_ref()
                        .map(|p| format!("  PROBLEM: {p}"))
                        .unwrap_or_default()
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    })
}

fn delete(
    layout: &StateLayout,
    socket: &Path,
    volume: &str,
    yes: bool,
    with_snapshots: bool,
    out: &Output,
) -> Result<()> {
    validate_name(volume).map_err(CliError::usage)?;
    if !yes {
        use std::io::IsTerminal;
        if !std::io::stdin().is_terminal() {
            return Err(CliError::usage(format!(
                "deleting {volume} destroys its data for good: add --yes to confirm"
            ))
            .into());
        }
        eprint!("Delete volume {volume} and all its data for good? Type its name to confirm: ");
        let mut answer = String::new();
        std::io::stdin().read_line(&mut answer)?;
        if answer.trim() != volume {
            return Err(CliError::usage("not confirmed; nothing was deleted").into());
        }
    }
    match Client::try_connect(socket)? {
        Some(mut c) => {
            c.call(Request::Delete {
                volume: volume.into(),
                with_snapshots,
            })?;
        }
        None => {
            let catalog = store::catalog::DirCatalog::new(&layout.volumes(), &layout.snapshots());
            if catalog
                .snapshots(volume)
                .and_then(|snaps| snaps.list())
                .is_ok_and(|names| !names.is_empty())
            {
                return Err(CliError::new(
                    crate::exit::NO_DAEMON,
                    format!(
                        "volume {volume} has snapshots: delete it through the daemon \
                         (start cryptnbd), which handles them"
                    ),
                )
                .into());
            }
            let store = volume::open_in(&catalog, volume, Access::Inspect);
            let token = store
                .as_ref()
                .ok()
                .and_then(|s| volume::inspect_store(&**s).ok())
                .and_then(|i| i.token);
            let grant = store
                .as_ref()
                .ok()
                .and_then(|s| volume::lifecycle::read_token_in(&**s).ok())
                .and_then(|t| t.grant());
            drop(store);
            let started = std::time::Instant::now();
            let result = volume::wipe_and_remove_in(&catalog, volume);
            offline_audit(layout, "delete", volume, token.as_ref(), started, &result);
            result?;
            if let Some(g) = grant {
                // Only the daemon talks to AWS KMS; the grant outlives an offline delete.
                eprintln!(
                    "cryptnbdctl: warning: the volume's KMS grant {} on key {} was not retired \
                     (no daemon running): revoke it with `aws kms revoke-grant --key-id {} \
                     --grant-id {}`",
                    g.grant_id, g.key_id, g.key_id, g.grant_id
                );
            }
        }
    }
    #[derive(Serialize)]
    struct Deleted<'a> {
        volume: &'a str,
    }
    out.emit(&Deleted { volume }, || {
        format!("deleted {volume} (headers and keyslot area wiped)")
    })
}

/// Offline verbs append to the same audit trail the daemon writes.
#[allow(clippy::too_many_arguments)]
fn record(
    layout: &StateLayout,
    operation: &str,
    volume: Option<&str>,
    backend: &str,
    key_id: Option<String>,
    context: Option<std::collections::BTreeMap<String, String>>,
    started: std::time::Instant,
    outcome: Result<(), String>,
) {
    append_audit(
        layout,
        &statedir::audit::AuditRecord {
            time: statedir::stamp::now(),
            operation: operation.into(),
            backend: backend.into(),
            key_id,
            context,
            volume: volume.map(str::to_owned),
            caller_uid: Some(rustix::process::getuid().as_raw()),
            outcome: outcome.map_or_else(|e| e, |()| "ok".into()),
            latency_ms: started.elapsed().as_millis() as u64,
            request_id: None,
        },
    );
}

/// Appends `record` to the audit trail of `layout` (a trail that cannot be opened is
/// reported, and the command goes on).
fn append_audit(layout: &StateLayout, record: &statedir::audit::AuditRecord) {
    match statedir::audit::AuditLog::open(&layout.audit_log(), 10 << 20, AUDIT_KEEP) {
        Ok(log) => log.record(record),
        Err(e) => tracing::warn!(error = %e, "cannot open the audit trail"),
    }
}

/// Audits an offline volume operation.
fn offline_audit<T>(
    layout: &StateLayout,
    operation: &str,
    volume: &str,
    token: Option<&volume::TokenInfo>,
    started: std::time::Instant,
    result: &Result<T, volume::VolumeError>,
) {
    record(
        layout,
        operation,
        Some(volume),
        &token.map_or("local".into(), |t| t.backend.clone()),
        token.map(|t| t.key_id.clone()),
        token.map(|t| t.context.clone()),
        started,
        result
            .as_ref()
            .map(|_| ())
            .map_err(|e| control_api::chain(e)),
    );
}

/// Runs a local-KMS operation and audits it (`operation`, the key id from the result or
/// `key`, the outcome).
fn audited<T>(
    layout: &StateLayout,
    operation: &str,
    key: Option<&str>,
    id_of: impl Fn(&T) -> Option<String>,
    op: impl FnOnce() -> Result<T, kms_client::KmsError>,
) -> Result<T, kms_client::KmsError> {
    let started = std::time::Instant::now();
    let result = op();
    let key_id = result
        .as_ref()
        .ok()
        .and_then(&id_of)
        .or(key.map(str::to_owned));
    let outcome = result
        .as_ref()
        .map(|_| ())
        .map_err(|e| control_api::chain(e));
    record(
        layout, operation, None, "local", key_id, None, started, outcome,
    );
    result
}

fn create_via_daemon(mut client: Client, args: &CreateArgs, out: &Output) -> Result<()> {
    let r = client.call(Request::Create(crate::lifecycle::create_request(
        args, None,
    )?))?;
    created_response(r, out)
}

fn created_response(r: Response, out: &Output) -> Result<()> {
    let Response::Created(v) = r else {
        anyhow::bail!("unexpected answer from the daemon: {r:?}");
    };
    let created = Created {
        name: v.name.clone(),
        path: PathBuf::from(&v.path),
        volume_id: v.volume_id.clone().unwrap_or_default(),
        size: v.size,
        sector_size: v.sector_size,
        key_id: v.key_id.clone().unwrap_or_default(),
        context: v.context.clone(),
        store: v.store.clone(),
        uuid: None,
    };
    out.emit(&created, || created_text(&created, "via the daemon"))
}

fn created_text(c: &Created, how: &str) -> String {
    let next = if let Some(uuid) = &c.uuid {
        format!(
            "  uuid:      {uuid}\nTo serve it, name it in the daemon's config and restart the \
             daemon:\n  [store.devices]\n  {} = \"UUID={uuid}\"\nthen attach it (cryptnbdctl \
             attach {}), or boot from it with cryptnbd.root=UUID={uuid} (docs/root-volume.md)",
            c.name, c.name
        )
    } else {
        format!("Attach it with: cryptnbdctl attach {}", c.name)
    };
    format!(
        "created volume {} ({}, {}-byte sectors, {how})\n  {:<10} {}\n  volume id: {}\n  kms key:   {}\n{next}",
        c.name,
        human(c.size),
        c.sector_size,
        match c.store.as_str() {
            "file" => "file:",
            "device" => "device:",
            _ => "image:",
        },
        c.path.display(),
        c.volume_id,
        c.key_id,
    )
}

fn read_secret_file(path: &Path) -> Result<Zeroizing<Vec<u8>>> {
    let mut bytes = Zeroizing::new(
        std::fs::read(path)
            .with_context(|| format!("cannot read the passphrase file {}", path.display()))?,
    );
    while bytes.last().is_some_and(|&b| b == b'\n' || b == b'\r') {
        bytes.pop();
    }
    if bytes.is_empty() {
        return Err(
            CliError::usage(format!("the passphrase file {} is empty", path.display())).into(),
        );
    }
    Ok(bytes)
}

fn secret_from(file: Option<&PathBuf>, env: &str) -> Result<Option<Zeroizing<Vec<u8>>>> {
    if let Some(f) = file {
        return read_secret_file(f).map(Some);
    }
    Ok(std::env::var_os(env)
        .filter(|v| !v.is_empty())
        .map(|v| Zeroizing::new(v.into_encoded_bytes())))
}

/// The passphrase of a keystore backup: from `--passphrase-file` or
/// CRYPTNBD_BACKUP_PASSPHRASE.
fn backup_passphrase(file: Option<&PathBuf>) -> Result<Zeroizing<Vec<u8>>> {
    secret_from(file, "CRYPTNBD_BACKUP_PASSPHRASE")?.ok_or_else(|| {
        CliError::usage(
            "give the backup passphrase with --passphrase-file or CRYPTNBD_BACKUP_PASSPHRASE",
        )
        .into()
    })
}

fn keystore_options(cli: &Cli, create: bool) -> Result<LocalKmsOptions> {
    Ok(LocalKmsOptions {
        create_if_missing: create,
        passphrase: secret_from(cli.kms_passphrase_file.as_ref(), "CRYPTNBD_KMS_PASSPHRASE")?,
        ..LocalKmsOptions::default()
    })
}

fn open_local_kms(cli: &Cli, layout: &StateLayout, create: bool) -> Result<LocalKms> {
    open_keystore(cli, layout, &layout.keystore(), create)
}

/// Opens the local KMS's keystore `dir` (creating it, and the state directory of `layout`,
/// when `create`).
fn open_keystore(cli: &Cli, layout: &StateLayout, dir: &Path, create: bool) -> Result<LocalKms> {
    if create {
        make_private_dir(&layout.state_dir)?;
    } else if !dir.exists() {
        return Err(CliError::not_found(format!(
            "there is no keystore in {}: create a master key with 'cryptnbdctl kms create-key --alias alias/NAME' \
             (it creates the keystore), restore one with 'cryptnbdctl kms restore', or point --state-dir at your state",
            dir.display()
        ))
        .into());
    }
    LocalKms::open(dir, keystore_options(cli, create)?).map_err(|e| {
        if e.kind() == kms_client::KmsErrorKind::AccessDenied {
            anyhow::Error::new(e).context(
                "cannot open the sealed keystore: give its passphrase with --kms-passphrase-file FILE or CRYPTNBD_KMS_PASSPHRASE",
            )
        } else {
            e.into()
        }
    })
}

fn make_private_dir(dir: &Path) -> Result<()> {
    store::durable::create_private_dir(dir)
        .with_context(|| format!("cannot create the directory {}", dir.display()))
}

#[derive(Serialize)]
struct Created {
    name: String,
    path: PathBuf,
    volume_id: String,
    size: u64,
    sector_size: u32,
    key_id: String,
    context: std::collections::BTreeMap<String, String>,
    /// `file`, `rbd` or `device`.
    store: String,
    /// The LUKS2 header's UUID, for a volume made on a block device (what its
    /// `[store.devices]` entry and `cryptnbd.root=UUID=` name).
    #[serde(skip_serializing_if = "Option::is_none")]
    uuid: Option<String>,
}

async fn create(cli: &Cli, layout: &StateLayout, args: &CreateArgs, out: &Output) -> Result<()> {
    validate_name(&args.name).map_err(CliError::usage)?;
    let volume_id = match &args.volume_id {
        Some(v) => v.clone(),
        None => IdentityContext::generate_volume_id(),
    };
    let identity = IdentityContext::new(&args.sid, &args.directory, &volume_id)?;
    let extra = args
        .context
        .iter()
        .map(|p| context::parse_pair(p))
        .collect::<Result<Vec<_>, _>>()?;
    let context_keys = args.context_keys();
    let path = match &args.path {
        Some(p) => p.clone(),
        None => {
            let dir = layout.volumes();
            make_private_dir(&dir)?;
            layout.volume_file(&args.name)
        }
    };
    let kms = KmsBackend::Local(open_local_kms(cli, layout, false)?);
    // A block device is formatted in place, by default all of it.
    let device = store::device::is_block_device(&path);
    let size = match (args.size, device) {
        (Some(size), _) => size,
        (None, true) => {
            let len = std::io::Seek::seek(
                &mut std::fs::File::open(&path)
                    .with_context(|| format!("cannot open {}", path.display()))?,
                std::io::SeekFrom::End(0),
            )?;
            volume::device_data_size(len, args.sector_size)
        }
        (None, false) => {
            return Err(CliError::usage("--size is required (or --from-image)").into());
        }
    };
    // An image to fill it with is opened first: one that does not fit changes nothing.
    let source = match &args.from_image {
        Some(image) => {
            let source = open_source(image)?;
            if source.2 > size {
                return Err(CliError::usage(format!(
                    "the image {} is {} bytes, more than the volume's {size}: it does not \
                     fit; nothing was written",
                    image.display(),
                    source.2
                ))
                .into());
            }
            Some(source)
        }
        None => None,
    };
    let opts = volume::CreateOptions {
        size,
        sector_size: args.sector_size,
        key_id: args.kms_key.clone(),
        identity,
        context_keys,
        extra_context: extra,
    };
    let started = std::time::Instant::now();
    let created = if device {
        volume::Volume::create_on_device(&path, &opts, &kms).await
    } else {
        volume::Volume::create(&path, &opts, &kms).await
    };
    if args.path.is_none() {
        let token = volume::inspect(&path).ok().and_then(|i| i.token);
        offline_audit(
            layout,
            "create",
            &args.name,
            token.as_ref(),
            started,
            &created,
        );
    }
    let created = created?;
    if let (Some(image), Some(source)) = (&args.from_image, source) {
        fill_offline(&created, &args.name, image, source, out.json)?;
    }
    drop(created);
    let info = volume::inspect(&path)?;
    let token = info
        .token
        .context("the new volume has no token (this is a bug: please report it)")?;
    let created = Created {
        name: args.name.clone(),
        path: path.clone(),
        volume_id: token.volume_id.clone(),
        size: info.size,
        sector_size: info.sector_size,
        key_id: token.key_id.clone(),
        context: token.context.clone(),
        store: if device { "device" } else { "file" }.into(),
        uuid: device.then(|| info.uuid.clone()),
    };
    out.emit(&created, || {
        created_text(&created, "offline: no daemon running")
    })
}

/// An image opened to fill a volume offline: raw bytes to read, and how many.
type Source = (crate::lifecycle::OpenedImage, std::fs::File, u64);

/// Opens `image` (raw, a block device, or any format qemu-img reads) as raw bytes.
fn open_source(image: &Path) -> Result<Source> {
    let opened = crate::lifecycle::open_image(image)?;
    let mut file = std::fs::File::from(opened.fd.try_clone()?);
    let len = match file.metadata()? {
        m if m.is_file() => m.len(),
        _ => match opened.source.size {
            Some(s) => s,
            None => std::io::Seek::seek(&mut file, std::io::SeekFrom::End(0))
                .and_then(|n| {
                    std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(0)).map(|_| n)
                })
                .with_context(|| format!("cannot find the size of {}", image.display()))?,
        },
    };
    Ok((opened, file, len))
}

/// Fills a volume just made offline (on a block device) with the image `source`, showing
/// progress as the daemon's imports do.
fn fill_offline(
    vol: &volume::Volume,
    name: &str,
    image: &Path,
    source: Source,
    json: bool,
) -> Result<()> {
    let (opened, mut file, len) = source;
    let progress = volume::lifecycle::Progress::new();
    let cancel = volume::lifecycle::Cancel::default();
    let what = format!("the image {}", image.display());
    let mut view = crate::lifecycle::ProgressView::new(json);
    let filled = std::thread::scope(|s| {
        let worker = s
            .spawn(|| volume::lifecycle::fill_from(vol, &mut file, len, &what, &progress, &cancel));
        while !worker.is_finished() {
            let (phase, done, total) = progress.get();
            view.show(&control_api::ProgressEvent {
                operation: "import".into(),
                volume: name.into(),
                phase: phase.into(),
                done,
                total,
            });
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        worker.join().unwrap_or_else(|_| {
            Err(volume::VolumeError::new(
                volume::VolumeErrorKind::Io,
                "the copy stopped unexpectedly",
            ))
        })
    });
    view.finish();
    filled?;
    opened.finish()
}

fn inspect(layout: &StateLayout, volume: &str, out: &Output) -> Result<()> {
    let path = layout.resolve_volume(volume);
    let info = volume::inspect(&path)?;
    out.emit(&info, || {
        let mut s = String::new();
        let mut line = |k: &str, v: String| s.push_str(&format!("{k:<18} {v}\n"));
        line("file:", info.path.display().to_string());
        line("uuid:", info.uuid.clone());
        line(
            "size:",
            format!("{} ({} bytes)", human(info.size), info.size),
        );
        line(
            "cipher:",
            format!("{} ({}-bit key)", info.cipher, info.key_bits),
        );
        line("sector size:", info.sector_size.to_string());
        line("data offset:", info.data_offset.to_string());
        line(
            "header:",
            format!("2 x {} bytes, seqid {}", info.header_size, info.seqid),
        );
        for (which, p) in [
            ("primary", &info.primary_header_problem),
            ("secondary", &info.secondary_header_problem),
        ] {
            line(
                &format!("{which} copy:"),
                p.clone().map_or("ok".into(), |p| format!("DAMAGED: {p}")),
            );
        }
        line("recovery keyslots:", info.keyslots.to_string());
        match &info.token {
            Some(t) => {
                line("kms backend:", t.backend.clone());
                line("kms key:", t.key_id.clone());
                line("volume id:", t.volume_id.clone());
                line("created:", t.created.clone());
                for (k, v) in &t.context {
                    line("context:", format!("{k} = {v}"));
                }
            }
            None => line("kms token:", "none (a plain LUKS2 volume)".into()),
        }
        s.trim_end().to_string()
    })
}

fn key_text(k: &KeyMetadata) -> String {
    let mut s = format!(
        "{}  {:<16} versions {}  created {}",
        k.key_id,
        format!("{:?}", k.state),
        k.versions,
        k.created
    );
    if !k.aliases.is_empty() {
        s.push_str(&format!("  aliases {}", k.aliases.join(",")));
    }
    if let Some(d) = &k.deletion_date {
        s.push_str(&format!("  deletion on {d}"));
    }
    if !k.description.is_empty() {
        s.push_str(&format!("  \"{}\"", k.description));
    }
    s
}

/// The keystore the `kms` verbs work on, and the state directory whose audit trail records
/// them.
struct KmsTarget {
    layout: StateLayout,
    keystore: PathBuf,
    /// The connection to the daemon that answered (None: no daemon); the key verbs use it.
    daemon: Option<Client>,
}

/// Which keystore `kms` manages: the one of the daemon that answers on `socket` (so
/// `--socket` names the daemon whose keys change), else the state directory's. A daemon on
/// another KMS backend is refused, and so is a `--state-dir` that is not the answering
/// daemon's: the user pointed at two places. The keystore used is named on stderr.
fn kms_target(cli: &Cli, layout: &StateLayout, socket: &Path) -> Result<KmsTarget> {
    let Some(mut client) = Client::try_connect(socket)? else {
        let keystore = layout.keystore();
        eprintln!(
            "cryptnbdctl: note: no daemon answers on {}: using the keystore in {}",
            socket.display(),
            keystore.display()
        );
        return Ok(KmsTarget {
            layout: layout.clone(),
            keystore,
            daemon: None,
        });
    };
    let Response::Hello(info) = client.call(Request::Hello)? else {
        anyhow::bail!("unexpected answer from the daemon on {}", socket.display());
    };
    let Some(keystore) = info.keystore.map(PathBuf::from) else {
        return Err(CliError::new(
            crate::exit::CONFLICT,
            format!(
                "the daemon on {} uses the {} KMS, whose keys are managed there (AWS KMS: the \
                 aws CLI or console); 'cryptnbdctl kms' manages the embedded local KMS",
                socket.display(),
                info.kms_backend
            ),
        )
        .into());
    };
    let daemon = StateLayout::new(Some(PathBuf::from(&info.state_dir)), None);
    if cli.state_dir.is_some() && daemon.state_dir != layout.state_dir {
        return Err(CliError::new(
            crate::exit::CONFLICT,
            format!(
                "--state-dir {} is not the state directory of the daemon on {} ({}): leave out \
                 --state-dir to manage that daemon's keys, or point --socket at no daemon to \
                 manage the keystore in {} without one",
                layout.state_dir.display(),
                socket.display(),
                daemon.state_dir.display(),
                layout.state_dir.display()
            ),
        )
        .into());
    }
    if keystore != layout.keystore() {
        eprintln!(
            "cryptnbdctl: note: using the keystore of the daemon on {}: {}",
            socket.display(),
            keystore.display()
        );
    }
    Ok(KmsTarget {
        layout: daemon,
        keystore,
        daemon: Some(client),
    })
}

async fn kms(
    cli: &Cli,
    layout: &StateLayout,
    socket: &Path,
    cmd: &KmsCommand,
    out: &Output,
) -> Result<()> {
    let target = kms_target(cli, layout, socket)?;
    let layout = &target.layout;
    let open_local_kms = |cli: &Cli, layout: &StateLayout, create| {
        open_keystore(cli, layout, &target.keystore, create)
    };
    let request = match cmd {
        KmsCommand::CreateKey { alias, description } => KmsKeyRequest::CreateKey {
            alias: alias.clone(),
            description: description.clone(),
        },
        KmsCommand::ListKeys => KmsKeyRequest::ListKeys,
        KmsCommand::DescribeKey { key } => KmsKeyRequest::DescribeKey { key: key.clone() },
        KmsCommand::EnableKey { key } => KmsKeyRequest::EnableKey { key: key.clone() },
        KmsCommand::DisableKey { key } => KmsKeyRequest::DisableKey { key: key.clone() },
        KmsCommand::ScheduleKeyDeletion { key, days } => KmsKeyRequest::ScheduleKeyDeletion {
            key: key.clone(),
            days: *days,
        },
        KmsCommand::CancelKeyDeletion { key } => {
            KmsKeyRequest::CancelKeyDeletion { key: key.clone() }
        }
        KmsCommand::RotateKey { key } => KmsKeyRequest::RotateKey { key: key.clone() },
        KmsCommand::Seal {
            new_passphrase_file,
        } => {
            return {
                let pass = secret_from(new_passphrase_file.as_ref(), "CRYPTNBD_NEW_KMS_PASSPHRASE")?
                .ok_or_else(|| {
                    CliError::usage(
                        "give the new passphrase with --new-passphrase-file or CRYPTNBD_NEW_KMS_PASSPHRASE",
                    )
                })?;
                let kms = open_local_kms(cli, layout, false)?;
                let was_sealed = kms.is_sealed();
                audited(layout, "kms-seal", None, |_| None, || kms.seal(&pass))?;
                #[derive(Serialize)]
                struct Sealed<'a> {
                    keystore: &'a Path,
                    sealed: bool,
                    passphrase_changed: bool,
                }
                out.emit(
                &Sealed { keystore: kms.dir(), sealed: true, passphrase_changed: was_sealed },
                || {
                    format!(
                        "{} {}: give the passphrase to every later use with --kms-passphrase-file or \
                         CRYPTNBD_KMS_PASSPHRASE. A forgotten passphrase loses every volume.",
                        if was_sealed { "changed the passphrase of" } else { "sealed" },
                        kms.dir().display()
                    )
                },
            )
            };
        }
        KmsCommand::Backup {
            to,
            passphrase_file,
        } => {
            return {
                let pass = backup_passphrase(passphrase_file.as_ref())?;
                let kms = open_local_kms(cli, layout, false)?;
                audited(
                    layout,
                    "kms-backup",
                    None,
                    |_| None,
                    || kms.backup(to, &pass),
                )?;
                let n = kms.list_keys()?.len();
                #[derive(Serialize)]
                struct Backup<'a> {
                    file: &'a Path,
                    keys: usize,
                }
                out.emit(&Backup { file: to, keys: n }, || {
                format!(
                    "wrote {} keys to {} (encrypted with the passphrase). Keep it apart from this machine: \
                     without the keystore every volume is lost.",
                    n,
                    to.display()
                )
            })
            };
        }
        KmsCommand::Restore {
            from,
            passphrase_file,
        } => {
            return {
                let pass = backup_passphrase(passphrase_file.as_ref())?;
                make_private_dir(&layout.state_dir)?;
                let options = keystore_options(cli, true)?;
                let kms = audited(
                    layout,
                    "kms-restore",
                    None,
                    |_| None,
                    || LocalKms::restore(&layout.keystore(), from, &pass, options),
                )?;
                let keys = kms.list_keys()?;
                out.emit(&keys, || {
                    format!(
                        "restored {} keys into {}",
                        keys.len(),
                        layout.keystore().display()
                    )
                })
            };
        }
    };
    // The key verbs run in the daemon when one answers (it checks the caller and audits),
    // else here, on the keystore named above, audited the same way.
    let keys = match target.daemon {
        Some(mut client) => {
            let r = client.call(Request::Kms(request.clone()))?;
            let Response::KmsKeys { keys } = r else {
                anyhow::bail!("unexpected answer from the daemon: {r:?}");
            };
            keys.into_iter()
                .map(serde_json::from_value)
                .collect::<Result<Vec<KeyMetadata>, _>>()
                .context("the daemon sent key metadata this CLI cannot read")?
        }
        None => {
            let create = matches!(request, KmsKeyRequest::CreateKey { .. });
            let kms = open_local_kms(cli, layout, create)?;
            let uid = rustix::process::getuid().as_raw();
            let (result, record) = statedir::keys::run(&kms, &request, uid);
            if let Some(record) = record {
                append_audit(layout, &record);
            }
            result?
        }
    };
    print_keys(&request, keys, out)
}

/// Prints what a key verb answered: the list for `list-keys`, else its one key.
fn print_keys(request: &KmsKeyRequest, keys: Vec<KeyMetadata>, out: &Output) -> Result<()> {
    if let KmsKeyRequest::ListKeys = request {
        return out.emit(&keys, || {
            if keys.is_empty() {
                "no keys (create one with 'cryptnbdctl kms create-key --alias NAME')".into()
            } else {
                keys.iter().map(key_text).collect::<Vec<_>>().join("\n")
            }
        });
    }
    let k = keys
        .into_iter()
        .next()
        .ok_or_else(|| anyhow::anyhow!("the KMS returned no key"))?;
    out.emit(&k, || match request {
        KmsKeyRequest::CreateKey { .. } => format!("created key {}", key_text(&k)),
        KmsKeyRequest::EnableKey { .. } => format!("enabled {}", key_text(&k)),
        KmsKeyRequest::DisableKey { .. } => format!("disabled {}", key_text(&k)),
        KmsKeyRequest::ScheduleKeyDeletion { .. } => format!(
            "scheduled for deletion: {}\nEvery volume wrapped by this key becomes unreadable when it is deleted; \
             'cryptnbdctl kms cancel-key-deletion {}' undoes this until then.",
            key_text(&k),
            k.key_id
        ),
        KmsKeyRequest::CancelKeyDeletion { .. } => format!(
            "deletion cancelled; the key is disabled until enabled: {}",
            key_text(&k)
        ),
        KmsKeyRequest::RotateKey { .. } => format!("rotated {}", key_text(&k)),
        KmsKeyRequest::ListKeys | KmsKeyRequest::DescribeKey { .. } => key_text(&k),
    })
}
