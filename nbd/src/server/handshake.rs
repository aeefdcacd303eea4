//! Fixed newstyle negotiation, up to the transmission phase.
//!
//! Every option is answered and the session goes on, except where the spec leaves no way to
//! answer (an `NBD_OPT_EXPORT_NAME` for an unknown export, a violation of the framing): then
//! the connection is closed. Option data is bounded: up to [`MAX_OPTION_LEN`] bytes are read
//! into the connection's buffer; longer data up to [`MAX_OPTION_SKIP`] is read and dropped
//! and answered `NBD_REP_ERR_TOO_BIG`; anything longer closes the connection. Nothing is
//! allocated from a length the client sent.
//!
//! TLS (proto.md "TLS support"): on a listener whose [`TlsMode`] is not `Off`,
//! `NBD_OPT_STARTTLS` is acknowledged and [`negotiate`] returns [`Outcome::StartTls`]; the
//! caller runs the TLS handshake on the socket and calls [`negotiate`] again over the TLS
//! stream with [`Phase::Tls`], which starts from a clean state (structured replies and meta
//! contexts negotiated before TLS are forgotten, as the spec requires). Before TLS, a
//! `Require` listener serves only STARTTLS and ABORT (`NBD_REP_ERR_TLS_REQD` for the rest),
//! and an `On` listener keeps TLS-only exports out of LIST and refuses them the same way.
//! `NBD_OPT_EXPORT_NAME`, which has no error reply, closes the connection in those cases.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tracing::debug;

use super::readbuf::ReadBuf;
use super::tls::TlsMode;
use super::transmission::{BASE_ALLOCATION_ID, Geometry};
use super::{Limits, Registration, Server};
use crate::device::TlsClient;
use crate::device::{BlockDevice, Export, Peer};
use crate::error::NbdError;
use crate::proto::{
    BASE_ALLOCATION, ClientFlags, ClientOption, Decoded, ExportNameReply, Greeting, InfoReply,
    OPTION_HEADER_LEN, OptionHeader, OptionReply, client_flags, handshake_flags, info, opt, rep,
    transmission_flags as tf,
};

/// Longest option data read into memory.
pub(crate) const MAX_OPTION_LEN: u32 = 16 * 1024;
/// Longest option data skipped (read and dropped) before answering `NBD_REP_ERR_TOO_BIG`.
pub(crate) const MAX_OPTION_SKIP: u32 = 1024 * 1024;
/// Options accepted on one connection before it is considered abusive.
const MAX_OPTIONS: usize = 1024;

/// How a negotiation ended.
pub(crate) enum Outcome {
    /// The client chose an export; the connection is registered.
    Transmission {
        export: Arc<Export>,
        geometry: Geometry,
        registration: Registration,
    },
    /// The session ended without a protocol error.
    Closed(&'static str),
    /// `NBD_OPT_STARTTLS` was acknowledged: the TLS handshake comes next, then negotiation
    /// goes on with [`Phase::Tls`].
    StartTls {
        /// The client's flags said NO_ZEROES (they stay in force after TLS).
        no_zeroes: bool,
    },
}

/// Where a negotiation starts.
#[derive(Debug, Clone)]
pub(crate) enum Phase {
    /// A new connection: greeting and client flags first.
    Plain,
    /// After the TLS handshake: options again, from a clean state.
    Tls {
        /// Carried over from the client flags.
        no_zeroes: bool,
        /// What the handshake established.
        client: Arc<TlsClient>,
    },
}

struct State {
    structured: bool,
    no_zeroes: bool,
    /// Export named by the last NBD_OPT_SET_META_CONTEXT, and whether it selected
    /// `base:allocation`.
    meta: Option<(String, bool)>,
}

/// Block sizes to advertise, made consistent with the spec whatever the device says:
/// minimum a power of two in 1..=64 KiB; preferred a power of two, at least the minimum and
/// 512; maximum a multiple of the minimum, at most `max_payload`.
pub(crate) fn block_sizes(dev: &dyn BlockDevice, limits: &Limits) -> (u32, u32, u32) {
    let bs = dev.block_sizes();
    let minimum = bs
        .minimum
        .clamp(1, 1 << 16)
        .checked_next_power_of_two()
        .unwrap_or(1 << 16);
    let cap = if bs.maximum == 0 {
        limits.max_payload
    } else {
        bs.maximum.min(limits.max_payload)
    };
    let maximum = (cap / minimum * minimum).max(minimum);
    let floor = minimum.max(512);
    let mut preferred = bs
        .preferred
        .clamp(floor, 1 << 25)
        .checked_next_power_of_two()
        .unwrap_or(1 << 25);
    while preferred > maximum && preferred / 2 >= floor {
        preferred /= 2;
    }
    (minimum, preferred, maximum)
}

fn geometry(export: &Export, limits: &Limits, st: &State) -> Geometry {
    geometry_for(export, limits, st.structured, st.meta.as_ref())
}

/// The geometry of a session on `export`: `structured` replies negotiated or not, and the
/// meta context selected by the last `NBD_OPT_SET_META_CONTEXT` (export name, whether it
/// chose `base:allocation`).
pub(crate) fn geometry_for(
    export: &Export,
    limits: &Limits,
    structured: bool,
    meta: Option<&(String, bool)>,
) -> Geometry {
    let dev = &*export.device;
    let (minimum, preferred, maximum) = block_sizes(dev, limits);
    let read_only = dev.read_only();
    let mut flags =
        tf::HAS_FLAGS | tf::SEND_FLUSH | tf::SEND_FUA | tf::SEND_CACHE | tf::CAN_MULTI_CONN;
    if read_only {
        // Commands that modify the export are not advertised (a client that sends them
        // anyway still gets EPERM).
        flags |= tf::READ_ONLY;
    } else {
        flags |= tf::SEND_TRIM | tf::SEND_WRITE_ZEROES | tf::SEND_FAST_ZERO;
    }
    if structured {
        flags |= tf::SEND_DF;
    }
    let meta_context = match meta {
        Some((name, true)) if *name == export.name => Some(BASE_ALLOCATION_ID),
        _ => None,
    };
    Geometry {
        size: dev.size(),
        minimum,
        preferred,
        maximum,
        read_only,
        fast_zero: dev.fast_zero(),
        structured,
        meta_context,
        flags,
    }
}

async fn send<S: AsyncWrite + Unpin>(io: &mut S, out: &mut Vec<u8>) -> Result<(), NbdError> {
    io.write_all(out).await?;
    io.flush().await?;
    out.clear();
    Ok(())
}

/// Reads until `n` bytes are buffered; None if the client closed the connection first or the
/// server started shutting down.
async fn need<S: AsyncRead + Unpin>(
    server: &Server,
    io: &mut S,
    rb: &mut ReadBuf,
    n: usize,
) -> Result<bool, NbdError> {
    let mut shutdown = server.shutdown_receiver();
    tokio::select! {
        biased;
        _ = super::flow::stopped(&mut shutdown) => Ok(false),
        r = rb.fill(io, n) => Ok(r?),
    }
}

/// Runs the negotiation: on a fresh connection ([`Phase::Plain`]) or over TLS after
/// `NBD_OPT_STARTTLS` ([`Phase::Tls`]), on a listener in TLS mode `mode`.
pub(crate) async fn negotiate<S: AsyncRead + AsyncWrite + Unpin>(
    server: &Arc<Server>,
    io: &mut S,
    rb: &mut ReadBuf,
    peer: &Peer,
    conn_id: u64,
    mode: TlsMode,
    phase: Phase,
) -> Result<Outcome, NbdError> {
    const OFFERED: u16 = handshake_flags::FIXED_NEWSTYLE | handshake_flags::NO_ZEROES;
    let mut out = Vec::with_capacity(512);
    let no_zeroes = match &phase {
        Phase::Tls { no_zeroes, .. } => *no_zeroes,
        Phase::Plain => {
            Greeting { flags: OFFERED }.encode(&mut out);
            send(io, &mut out).await?;
            if !need(server, io, rb, 4).await? {
                return Ok(Outcome::Closed("client left before sending its flags"));
            }
            let flags = match ClientFlags::decode(rb.data(), OFFERED)? {
                Decoded::Complete { value, consumed } => {
                    rb.consume(consumed);
                    value.0
                }
                Decoded::Incomplete { .. } => {
                    return Err(NbdError::UnexpectedEof("client flags"));
                }
            };
            flags & client_flags::NO_ZEROES != 0
        }
    };
    let client = match &phase {
        Phase::Tls { client, .. } => Some(client),
        Phase::Plain => None,
    };
    let tls = client.is_some();
    let admit = |export: &Export, opening: bool| {
        server
            .registry
            .admit(export, peer, client.map(|c| &**c), opening)
    };
    let mut st = State {
        structured: false,
        no_zeroes,
        meta: None,
    };

    for _ in 0..MAX_OPTIONS {
        if !need(server, io, rb, OPTION_HEADER_LEN).await? {
            return Ok(Outcome::Closed(
                "client closed the connection or the server shut down during the handshake",
            ));
        }
        let header = match OptionHeader::decode(rb.data())? {
            Decoded::Complete { value, consumed } => {
                rb.consume(consumed);
                value
            }
            Decoded::Incomplete { .. } => return Err(NbdError::UnexpectedEof("an option")),
        };
        let code = header.option;
        if header.length > MAX_OPTION_LEN {
            let too_long = NbdError::TooLong {
                what: "option data",
                length: header.length.into(),
                limit: MAX_OPTION_LEN.into(),
            };
            if code == opt::EXPORT_NAME || header.length > MAX_OPTION_SKIP {
                reply_error(code, rep::ERR_TOO_BIG, "option data too long", &mut out);
                let _ = send(io, &mut out).await;
                return Err(too_long);
            }
            if !rb.skip(io, header.length.into()).await? {
                return Err(NbdError::UnexpectedEof("option data"));
            }
            debug!(option = code, "{too_long}; answered NBD_REP_ERR_TOO_BIG");
            reply_error(code, rep::ERR_TOO_BIG, "option data too long", &mut out);
            send(io, &mut out).await?;
            continue;
        }
        let len = header.length as usize;
        if !need(server, io, rb, len).await? {
            return Err(NbdError::UnexpectedEof("option data"));
        }
        let parsed = ClientOption::parse(code, &rb.data()[..len]);
        rb.consume(len);
        let option = match parsed {
            Ok(o) => o,
            Err(e) if code == opt::EXPORT_NAME => return Err(e),
            Err(e) => {
                debug!(option = code, "invalid option: {e}");
                reply_error(code, rep::ERR_INVALID, &e.to_string(), &mut out);
                send(io, &mut out).await?;
                continue;
            }
        };
        if server.is_shutting_down() && option != ClientOption::Abort {
            if code == opt::EXPORT_NAME {
                return Ok(Outcome::Closed("server shutting down"));
            }
            reply_error(
                code,
                rep::ERR_SHUTDOWN,
                "the server is shutting down",
                &mut out,
            );
            send(io, &mut out).await?;
            continue;
        }
        if mode == TlsMode::Require
            && !tls
            && !matches!(option, ClientOption::StartTls | ClientOption::Abort)
        {
            if code == opt::EXPORT_NAME {
                return Ok(Outcome::Closed(
                    "NBD_OPT_EXPORT_NAME before TLS on a listener that requires TLS",
                ));
            }
            reply_error(
                code,
                rep::ERR_TLS_REQD,
                "this server requires TLS: send NBD_OPT_STARTTLS first",
                &mut out,
            );
            send(io, &mut out).await?;
            continue;
        }
        match option {
            ClientOption::Abort => {
                OptionReply::Ack.encode(code, &mut out);
                // The client may already be gone; that is fine.
                let _ = send(io, &mut out).await;
                return Ok(Outcome::Closed("client sent NBD_OPT_ABORT"));
            }
            ClientOption::StartTls if mode == TlsMode::Off => {
                reply_error(
                    code,
                    rep::ERR_POLICY,
                    "TLS is not enabled on this listener",
                    &mut out,
                );
            }
            ClientOption::StartTls if tls => {
                reply_error(code, rep::ERR_INVALID, "TLS is already active", &mut out);
            }
            ClientOption::StartTls => {
                OptionReply::Ack.encode(code, &mut out);
                send(io, &mut out).await?;
                if rb.len() > 0 {
                    // The client must wait for the answer before its ClientHello.
                    return Err(NbdError::invalid(
                        "NBD_OPT_STARTTLS",
                        "the client sent data before the TLS handshake could start",
                    ));
                }
                return Ok(Outcome::StartTls {
                    no_zeroes: st.no_zeroes,
                });
            }
            ClientOption::StructuredReply => {
                st.structured = true;
                OptionReply::Ack.encode(code, &mut out);
            }
            ClientOption::List => {
                for (name, description) in server.registry.list(peer) {
                    // TLS-only exports are not shown before TLS, nor exports this client's
                    // certificate may not open.
                    let hidden = server
                        .registry
                        .lookup(&name, peer)
                        .is_some_and(|e| (e.tls_only && !tls) || admit(&e, false).is_err());
                    if hidden {
                        continue;
                    }
                    OptionReply::Server { name, description }.encode(code, &mut out);
                }
                OptionReply::Ack.encode(code, &mut out);
            }
            ClientOption::ListMetaContext(req) => {
                let wanted = req.queries.is_empty()
                    || req
                        .queries
                        .iter()
                        .any(|q| q == "base:" || q == BASE_ALLOCATION);
                if wanted {
                    OptionReply::MetaContext {
                        id: 0,
                        name: BASE_ALLOCATION.to_owned(),
                    }
                    .encode(code, &mut out);
                }
                OptionReply::Ack.encode(code, &mut out);
            }
            ClientOption::SetMetaContext(req) => {
                if !st.structured {
                    st.meta = None;
                    reply_error(
                        code,
                        rep::ERR_INVALID,
                        "negotiate structured replies first",
                        &mut out,
                    );
                } else {
                    // Other namespaces and leaves are ignored, as the spec requires.
                    let selected = req.queries.iter().any(|q| q == BASE_ALLOCATION);
                    if selected {
                        OptionReply::MetaContext {
                            id: BASE_ALLOCATION_ID,
                            name: BASE_ALLOCATION.to_owned(),
                        }
                        .encode(code, &mut out);
                    }
                    OptionReply::Ack.encode(code, &mut out);
                    st.meta = Some((server.resolve_name(&req.export), selected));
                }
            }
            ClientOption::Info(req) => {
                let name = server.resolve_name(&req.name);
                match server.registry.lookup(&name, peer) {
                    Some(export) if export.tls_only && !tls => tls_required(code, &mut out),
                    Some(export) if admit(&export, true).is_err() => refused(code, &mut out),
                    Some(export) => {
                        let g = geometry(&export, &server.limits, &st);
                        info_replies(code, &export, &g, &req.requests, &mut out);
                        OptionReply::Ack.encode(code, &mut out);
                    }
                    None => reply_error(code, rep::ERR_UNKNOWN, "unknown export", &mut out),
                }
            }
            ClientOption::Go(req) => {
                let name = server.resolve_name(&req.name);
                match server.open_export(&name, peer, conn_id, client.cloned()) {
                    Some((export, _)) if export.tls_only && !tls => {
                        tls_required(code, &mut out);
                    }
                    Some((export, _)) if admit(&export, true).is_err() => refused(code, &mut out),
                    Some((export, registration)) => {
                        let g = geometry(&export, &server.limits, &st);
                        info_replies(code, &export, &g, &req.requests, &mut out);
                        OptionReply::Ack.encode(code, &mut out);
                        send(io, &mut out).await?;
                        return Ok(Outcome::Transmission {
                            export,
                            geometry: g,
                            registration,
                        });
                    }
                    None => reply_error(code, rep::ERR_UNKNOWN, "unknown export", &mut out),
                }
            }
            ClientOption::ExportName(name) => {
                let name = server.resolve_name(&name);
                let opened = server.open_export(&name, peer, conn_id, client.cloned());
                let Some((export, registration)) = opened else {
                    return Ok(Outcome::Closed(
                        "client asked for an unknown export with NBD_OPT_EXPORT_NAME",
                    ));
                };
                if export.tls_only && !tls {
                    return Ok(Outcome::Closed(
                        "NBD_OPT_EXPORT_NAME of a TLS-only export before TLS",
                    ));
                }
                if admit(&export, true).is_err() {
                    return Ok(Outcome::Closed(
                        "NBD_OPT_EXPORT_NAME of an export this client may not open",
                    ));
                }
                let g = geometry(&export, &server.limits, &st);
                ExportNameReply {
                    size: g.size,
                    flags: g.flags,
                }
                .encode(st.no_zeroes, &mut out);
                send(io, &mut out).await?;
                return Ok(Outcome::Transmission {
                    export,
                    geometry: g,
                    registration,
                });
            }
            ClientOption::Unknown { option, .. } => {
                debug!(option, "unknown option; answered NBD_REP_ERR_UNSUP");
                reply_error(option, rep::ERR_UNSUP, "unknown option", &mut out);
            }
        }
        send(io, &mut out).await?;
    }
    Err(NbdError::invalid(
        "negotiation",
        "too many options on one connection",
    ))
}

fn refused(option: u32, out: &mut Vec<u8>) {
    reply_error(
        option,
        rep::ERR_POLICY,
        "this client may not open this export (its certificate is not on the export's \
         allow-list)",
        out,
    );
}

fn tls_required(option: u32, out: &mut Vec<u8>) {
    reply_error(
        option,
        rep::ERR_TLS_REQD,
        "this export requires TLS: send NBD_OPT_STARTTLS first",
        out,
    );
}

fn reply_error(option: u32, reply_type: u32, message: &str, out: &mut Vec<u8>) {
    OptionReply::Error {
        reply_type,
        message: message.to_owned(),
    }
    .encode(option, out);
}

fn info_replies(option: u32, export: &Export, g: &Geometry, asked: &[u16], out: &mut Vec<u8>) {
    let mut item = |i: InfoReply| OptionReply::Info(i).encode(option, out);
    item(InfoReply::Export {
        size: g.size,
        flags: g.flags,
    });
    if asked.contains(&info::NAME) {
        item(InfoReply::Name(export.name.clone()));
    }
    if asked.contains(&info::DESCRIPTION) {
        item(InfoReply::Description(export.description.clone()));
    }
    // Sent even when not asked: the server enforces these constraints either way.
    item(InfoReply::BlockSize {
        minimum: g.minimum,
        preferred: g.preferred,
        maximum: g.maximum,
    });
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly on purpose
mod tests {
    use super::*;
    use crate::device::{BlockSizes, DeviceError, Extent};

    struct Sizes(BlockSizes);
    impl BlockDevice for Sizes {
        fn size(&self) -> u64 {
            1 << 30
        }
        fn block_sizes(&self) -> BlockSizes {
            self.0
        }
        fn read_only(&self) -> bool {
            false
        }
        fn read(&self, _: u64, _: &mut [u8]) -> Result<(), DeviceError> {
            Ok(())
        }
        fn write(&self, _: u64, _: &mut [u8], _: bool) -> Result<(), DeviceError> {
            Ok(())
        }
        fn flush(&self) -> Result<(), DeviceError> {
            Ok(())
        }
        fn trim(&self, _: u64, _: u64, _: bool) -> Result<(), DeviceError> {
            Ok(())
        }
        fn write_zeroes(&self, _: u64, _: u64, _: bool, _: bool) -> Result<(), DeviceError> {
            Ok(())
        }
        fn block_status(&self, _: u64, _: u64) -> Result<Vec<Extent>, DeviceError> {
            Ok(Vec::new())
        }
    }

    fn sizes(minimum: u32, preferred: u32, maximum: u32) -> (u32, u32, u32) {
        block_sizes(
            &Sizes(BlockSizes {
                minimum,
                preferred,
                maximum,
            }),
            &Limits::default(),
        )
    }

    #[test]
    fn block_sizes_are_made_consistent() {
        assert_eq!(sizes(1, 4096, 32 << 20), (1, 4096, 32 << 20));
        assert_eq!(sizes(512, 4096, u32::MAX), (512, 4096, 32 << 20));
        assert_eq!(sizes(0, 0, 0), (1, 512, 32 << 20));
        assert_eq!(sizes(3, 1000, 5000), (4, 1024, 5000));
        assert_eq!(sizes(1 << 20, 1, 1), (1 << 16, 1 << 16, 1 << 16));
        assert_eq!(sizes(4096, 1 << 30, 1 << 20), (4096, 1 << 20, 1 << 20));
    }
}
