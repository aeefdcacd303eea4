//! The NBD wire format as a pure codec: no sockets, no tokio, no allocation beyond the values
//! decoded. Encoders append to a `Vec<u8>`; decoders read from `&[u8]` and tell a message
//! that is not all there yet ([`Decoded::Incomplete`], with how many more bytes are needed at
//! least) apart from one that can never be valid ([`NbdError`]).
//!
//! Both directions are here, so tests (and a future client) speak the protocol with the same
//! code the server uses. The spec is NetworkBlockDevice/nbd `doc/proto.md`; only fixed
//! newstyle negotiation is implemented (no oldstyle, no extended headers).
//!
//! # Byte layouts (every integer big-endian)
//!
//! ```text
//! Greeting          S: u64 NBDMAGIC | u64 IHAVEOPT | u16 handshake flags          (18 bytes)
//! Client flags      C: u32                                                        (4 bytes)
//! Option            C: u64 IHAVEOPT | u32 option | u32 length | length bytes      (16 + n)
//! Option reply      S: u64 REPLY_MAGIC | u32 option | u32 reply type | u32 length | data
//! EXPORT_NAME reply S: u64 size | u16 transmission flags | 124 zero bytes unless NO_ZEROES
//! Request           C: u32 0x25609513 | u16 flags | u16 type | u64 handle | u64 offset
//!                      | u32 length | (length bytes for WRITE)                      (28 + n)
//! Simple reply      S: u32 0x67446698 | u32 error | u64 handle | (data for READ)    (16 + n)
//! Structured chunk  S: u32 0x668e33ef | u16 flags | u16 type | u64 handle | u32 length
//!                      | length bytes of payload                                  (20 + n)
//! ```
//!
//! Option payloads:
//!
//! ```text
//! INFO / GO               u32 name length | name | u16 n | n x u16 info request
//! LIST/SET_META_CONTEXT   u32 name length | name | u32 n | n x (u32 length | query)
//! REP_SERVER              u32 name length | name | description (rest of the reply)
//! REP_INFO                u16 info type | info payload
//!   INFO_EXPORT           u64 size | u16 transmission flags
//!   INFO_NAME/DESCRIPTION string (rest of the reply)
//!   INFO_BLOCK_SIZE       u32 minimum | u32 preferred | u32 maximum
//! REP_META_CONTEXT        u32 context id | name (rest of the reply)
//! REP_ERR_*               optional human-readable message
//! ```
//!
//! Structured reply payloads:
//!
//! ```text
//! NONE          (empty)
//! OFFSET_DATA   u64 offset | data (at least 1 byte)
//! OFFSET_HOLE   u64 offset | u32 hole size
//! BLOCK_STATUS  u32 context id | n x (u32 length | u32 status flags), n >= 1
//! ERROR         u32 error | u16 message length | message
//! ERROR_OFFSET  u32 error | u16 message length | message | u64 offset
//! ```

use crate::error::NbdError;

// ---------------------------------------------------------------------------------------------
// Magic numbers
// ---------------------------------------------------------------------------------------------

/// `0x4e42444d41474943`, ASCII "NBDMAGIC": first 8 bytes the server sends (`INIT_PASSWD`).
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `0x49484156454f5054`, ASCII "IHAVEOPT": newstyle greeting and the start of every option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// `0x0003e889045565a9`: starts every fixed-newstyle option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// `0x25609513` (`NBD_REQUEST_MAGIC`): starts every transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// `0x67446698` (`NBD_SIMPLE_REPLY_MAGIC`): starts a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// `0x668e33ef` (`NBD_STRUCTURED_REPLY_MAGIC`): starts a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// ---------------------------------------------------------------------------------------------
// Sizes and limits
// ---------------------------------------------------------------------------------------------

/// Length of the server greeting (NBDMAGIC, IHAVEOPT, handshake flags).
pub const GREETING_LEN: usize = 18;
/// Length of the client flags field.
pub const CLIENT_FLAGS_LEN: usize = 4;
/// Length of an option header (IHAVEOPT, option, length).
pub const OPTION_HEADER_LEN: usize = 16;
/// Length of an option reply header (magic, option, reply type, length).
pub const OPTION_REPLY_HEADER_LEN: usize = 20;
/// Length of a transmission request header.
pub const REQUEST_HEADER_LEN: usize = 28;
/// Length of a simple reply header.
pub const SIMPLE_REPLY_HEADER_LEN: usize = 16;
/// Length of a structured reply chunk header.
pub const STRUCTURED_REPLY_HEADER_LEN: usize = 20;
/// Length of the reserved zero padding after an `NBD_OPT_EXPORT_NAME` reply.
pub const EXPORT_NAME_PADDING: usize = 124;
/// Longest string the protocol allows (export names, error messages, queries).
pub const MAX_STRING_LEN: usize = 4096;

// ---------------------------------------------------------------------------------------------
// Flags
// ---------------------------------------------------------------------------------------------

/// Handshake flags (16 bits, sent by the server in the greeting).
pub mod handshake_flags {
    /// Bit 0, `NBD_FLAG_FIXED_NEWSTYLE`: the server speaks fixed newstyle.
    pub const FIXED_NEWSTYLE: u16 = 0x0001;
    /// Bit 1, `NBD_FLAG_NO_ZEROES`: the server can omit the 124 zero bytes.
    pub const NO_ZEROES: u16 = 0x0002;
}

/// Client flags (32 bits, the client's answer to the greeting).
pub mod client_flags {
    /// Bit 0, `NBD_FLAG_C_FIXED_NEWSTYLE`.
    pub const FIXED_NEWSTYLE: u32 = 0x0000_0001;
    /// Bit 1, `NBD_FLAG_C_NO_ZEROES`: omit the 124 zero bytes after EXPORT_NAME.
    pub const NO_ZEROES: u32 = 0x0000_0002;
    /// Every flag a client may set when the server offered both handshake flags.
    pub const KNOWN: u32 = FIXED_NEWSTYLE | NO_ZEROES;
}

/// Transmission flags (16 bits, per export).
pub mod transmission_flags {
    /// Bit 0, `NBD_FLAG_HAS_FLAGS`: always set.
    pub const HAS_FLAGS: u16 = 0x0001;
    /// Bit 1, `NBD_FLAG_READ_ONLY`: writes will fail.
    pub const READ_ONLY: u16 = 0x0002;
    /// Bit 2, `NBD_FLAG_SEND_FLUSH`: `NBD_CMD_FLUSH` is supported.
    pub const SEND_FLUSH: u16 = 0x0004;
    /// Bit 3, `NBD_FLAG_SEND_FUA`: `NBD_CMD_FLAG_FUA` is supported.
    pub const SEND_FUA: u16 = 0x0008;
    /// Bit 4, `NBD_FLAG_ROTATIONAL`: a scheduling hint (never set here).
    pub const ROTATIONAL: u16 = 0x0010;
    /// Bit 5, `NBD_FLAG_SEND_TRIM`: `NBD_CMD_TRIM` is supported.
    pub const SEND_TRIM: u16 = 0x0020;
    /// Bit 6, `NBD_FLAG_SEND_WRITE_ZEROES`: `NBD_CMD_WRITE_ZEROES` and `NO_HOLE` are supported.
    pub const SEND_WRITE_ZEROES: u16 = 0x0040;
    /// Bit 7, `NBD_FLAG_SEND_DF`: `NBD_CMD_FLAG_DF` on reads (only with structured replies).
    pub const SEND_DF: u16 = 0x0080;
    /// Bit 8, `NBD_FLAG_CAN_MULTI_CONN`: flush and FUA are visible across connections.
    pub const CAN_MULTI_CONN: u16 = 0x0100;
    /// Bit 9, `NBD_FLAG_SEND_RESIZE` (experimental; never set here).
    pub const SEND_RESIZE: u16 = 0x0200;
    /// Bit 10, `NBD_FLAG_SEND_CACHE`: `NBD_CMD_CACHE` is understood.
    pub const SEND_CACHE: u16 = 0x0400;
    /// Bit 11, `NBD_FLAG_SEND_FAST_ZERO`: `NBD_CMD_FLAG_FAST_ZERO` is understood.
    pub const SEND_FAST_ZERO: u16 = 0x0800;
}

/// Command flags (16 bits, per request).
pub mod command_flags {
    /// Bit 0, `NBD_CMD_FLAG_FUA`: reply only once the written data is durable.
    pub const FUA: u16 = 0x0001;
    /// Bit 1, `NBD_CMD_FLAG_NO_HOLE`: WRITE_ZEROES must not deallocate.
    pub const NO_HOLE: u16 = 0x0002;
    /// Bit 2, `NBD_CMD_FLAG_DF`: READ must be answered with at most one data chunk.
    pub const DF: u16 = 0x0004;
    /// Bit 3, `NBD_CMD_FLAG_REQ_ONE`: BLOCK_STATUS wants one extent only.
    pub const REQ_ONE: u16 = 0x0008;
    /// Bit 4, `NBD_CMD_FLAG_FAST_ZERO`: WRITE_ZEROES must fail with ENOTSUP unless fast.
    pub const FAST_ZERO: u16 = 0x0010;
}

/// Structured reply chunk flags.
pub mod reply_flags {
    /// Bit 0, `NBD_REPLY_FLAG_DONE`: the last chunk of this reply.
    pub const DONE: u16 = 0x0001;
}

/// `base:allocation` status flags.
pub mod state_flags {
    /// Bit 0, `NBD_STATE_HOLE`: the extent is not allocated.
    pub const HOLE: u32 = 0x0000_0001;
    /// Bit 1, `NBD_STATE_ZERO`: the extent reads as zeros.
    pub const ZERO: u32 = 0x0000_0002;
}

/// Option codes (`NBD_OPT_*`).
pub mod opt {
    /// 1: choose an export and enter transmission (no error reply possible).
    pub const EXPORT_NAME: u32 = 0x0000_0001;
    /// 2: end the negotiation.
    pub const ABORT: u32 = 0x0000_0002;
    /// 3: list the exports.
    pub const LIST: u32 = 0x0000_0003;
    /// 4: withdrawn `PEEK_EXPORT`.
    pub const PEEK_EXPORT: u32 = 0x0000_0004;
    /// 5: upgrade to TLS.
    pub const STARTTLS: u32 = 0x0000_0005;
    /// 6: describe an export.
    pub const INFO: u32 = 0x0000_0006;
    /// 7: describe an export and enter transmission.
    pub const GO: u32 = 0x0000_0007;
    /// 8: use structured replies.
    pub const STRUCTURED_REPLY: u32 = 0x0000_0008;
    /// 9: list metadata contexts.
    pub const LIST_META_CONTEXT: u32 = 0x0000_0009;
    /// 10: select metadata contexts.
    pub const SET_META_CONTEXT: u32 = 0x0000_000a;
    /// 11: extended headers (not implemented by this server: answered `ERR_UNSUP`).
    pub const EXTENDED_HEADERS: u32 = 0x0000_000b;
}

/// Option reply types (`NBD_REP_*`); errors have bit 31 set.
pub mod rep {
    /// 1: the option succeeded (or a list ended).
    pub const ACK: u32 = 0x0000_0001;
    /// 2: one export of a LIST.
    pub const SERVER: u32 = 0x0000_0002;
    /// 3: one piece of information for INFO/GO.
    pub const INFO: u32 = 0x0000_0003;
    /// 4: one metadata context.
    pub const META_CONTEXT: u32 = 0x0000_0004;
    /// Bit 31: the reply is an error.
    pub const ERROR_BIT: u32 = 0x8000_0000;
    /// 2^31 + 1: the option is unknown to this server.
    pub const ERR_UNSUP: u32 = 0x8000_0001;
    /// 2^31 + 2: the option is forbidden by policy.
    pub const ERR_POLICY: u32 = 0x8000_0002;
    /// 2^31 + 3: the option is syntactically or semantically invalid.
    pub const ERR_INVALID: u32 = 0x8000_0003;
    /// 2^31 + 4: not supported on this platform.
    pub const ERR_PLATFORM: u32 = 0x8000_0004;
    /// 2^31 + 5: TLS is required first.
    pub const ERR_TLS_REQD: u32 = 0x8000_0005;
    /// 2^31 + 6: the export is not available.
    pub const ERR_UNKNOWN: u32 = 0x8000_0006;
    /// 2^31 + 7: the server is shutting down.
    pub const ERR_SHUTDOWN: u32 = 0x8000_0007;
    /// 2^31 + 8: the client must ask for block sizes.
    pub const ERR_BLOCK_SIZE_REQD: u32 = 0x8000_0008;
    /// 2^31 + 9: the request or its reply is too large.
    pub const ERR_TOO_BIG: u32 = 0x8000_0009;
}

/// Information types for `NBD_REP_INFO` (`NBD_INFO_*`).
pub mod info {
    /// 0: size and transmission flags.
    pub const EXPORT: u16 = 0x0000;
    /// 1: canonical export name.
    pub const NAME: u16 = 0x0001;
    /// 2: human-readable description.
    pub const DESCRIPTION: u16 = 0x0002;
    /// 3: block size constraints.
    pub const BLOCK_SIZE: u16 = 0x0003;
}

/// Structured reply chunk types (`NBD_REPLY_TYPE_*`); errors have bit 15 set.
pub mod reply_type {
    /// 0: no payload; ends a reply.
    pub const NONE: u16 = 0x0000;
    /// 1: read data at an offset.
    pub const OFFSET_DATA: u16 = 0x0001;
    /// 2: a run of zeros at an offset.
    pub const OFFSET_HOLE: u16 = 0x0002;
    /// 5: block status extents of one metadata context.
    pub const BLOCK_STATUS: u16 = 0x0005;
    /// Bit 15: the chunk is an error.
    pub const ERROR_BIT: u16 = 0x8000;
    /// 2^15 + 1: an error for the whole request.
    pub const ERROR: u16 = 0x8001;
    /// 2^15 + 2: an error at an offset.
    pub const ERROR_OFFSET: u16 = 0x8002;
}

/// The only metadata context this crate knows.
pub const BASE_ALLOCATION: &str = "base:allocation";

// ---------------------------------------------------------------------------------------------
// Commands
// ---------------------------------------------------------------------------------------------

/// A transmission command (`NBD_CMD_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Command {
    /// 0: read data.
    Read,
    /// 1: write data (the payload follows the header).
    Write,
    /// 2: soft disconnect (no reply).
    Disc,
    /// 3: make completed writes durable.
    Flush,
    /// 4: discard a range (advisory).
    Trim,
    /// 5: prefetch hint.
    Cache,
    /// 6: make a range read as zeros.
    WriteZeroes,
    /// 7: query metadata (block status).
    BlockStatus,
}

impl Command {
    /// Every command, in wire order.
    pub const ALL: [Command; 8] = [
        Command::Read,
        Command::Write,
        Command::Disc,
        Command::Flush,
        Command::Trim,
        Command::Cache,
        Command::WriteZeroes,
        Command::BlockStatus,
    ];

    /// The wire value.
    pub const fn to_wire(self) -> u16 {
        match self {
            Command::Read => 0x0000,
            Command::Write => 0x0001,
            Command::Disc => 0x0002,
            Command::Flush => 0x0003,
            Command::Trim => 0x0004,
            Command::Cache => 0x0005,
            Command::WriteZeroes => 0x0006,
            Command::BlockStatus => 0x0007,
        }
    }

    /// The command for a wire value, if known.
    pub const fn from_wire(value: u16) -> Option<Self> {
        Some(match value {
            0x0000 => Command::Read,
            0x0001 => Command::Write,
            0x0002 => Command::Disc,
            0x0003 => Command::Flush,
            0x0004 => Command::Trim,
            0x0005 => Command::Cache,
            0x0006 => Command::WriteZeroes,
            0x0007 => Command::BlockStatus,
            _ => return None,
        })
    }

    /// The spec's name, for logs.
    pub const fn name(self) -> &'static str {
        match self {
            Command::Read => "NBD_CMD_READ",
            Command::Write => "NBD_CMD_WRITE",
            Command::Disc => "NBD_CMD_DISC",
            Command::Flush => "NBD_CMD_FLUSH",
            Command::Trim => "NBD_CMD_TRIM",
            Command::Cache => "NBD_CMD_CACHE",
            Command::WriteZeroes => "NBD_CMD_WRITE_ZEROES",
            Command::BlockStatus => "NBD_CMD_BLOCK_STATUS",
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Decoding helpers
// ---------------------------------------------------------------------------------------------

/// What a decoder found in a byte slice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded<T> {
    /// A whole message.
    Complete {
        /// The message.
        value: T,
        /// How many bytes of the slice it used.
        consumed: usize,
    },
    /// The slice ends before the message does.
    Incomplete {
        /// How many more bytes are needed at least (more may be asked for once they arrive).
        needed: usize,
    },
}

impl<T> Decoded<T> {
    /// The value if complete.
    pub fn complete(self) -> Option<(T, usize)> {
        match self {
            Decoded::Complete { value, consumed } => Some((value, consumed)),
            Decoded::Incomplete { .. } => None,
        }
    }

    fn map<U>(self, f: impl FnOnce(T) -> U) -> Decoded<U> {
        match self {
            Decoded::Complete { value, consumed } => Decoded::Complete {
                value: f(value),
                consumed,
            },
            Decoded::Incomplete { needed } => Decoded::Incomplete { needed },
        }
    }
}

/// Result of every decoder.
pub type DecodeResult<T> = Result<Decoded<T>, NbdError>;

fn incomplete<T>(have: usize, want: usize) -> DecodeResult<T> {
    Ok(Decoded::Incomplete {
        needed: want.saturating_sub(have).max(1),
    })
}

/// A bounds-checked big-endian reader over a slice whose length the caller already checked
/// or will check through the `Option`s.
struct Cursor<'a> {
    buf: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.buf.len() < n {
            return None;
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Some(head)
    }
    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N).and_then(|s| s.try_into().ok())
    }
    fn u16(&mut self) -> Option<u16> {
        self.array().map(u16::from_be_bytes)
    }
    fn u32(&mut self) -> Option<u32> {
        self.array().map(u32::from_be_bytes)
    }
    fn u64(&mut self) -> Option<u64> {
        self.array().map(u64::from_be_bytes)
    }
    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }
    fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
}

/// Checks a protocol string: UTF-8, no NUL, at most 4096 bytes.
fn string(bytes: &[u8], what: &'static str) -> Result<String, NbdError> {
    if bytes.len() > MAX_STRING_LEN {
        return Err(NbdError::invalid(what, "string longer than 4096 bytes"));
    }
    if bytes.contains(&0) {
        return Err(NbdError::invalid(what, "string contains NUL"));
    }
    String::from_utf8(bytes.to_vec()).map_err(|_| NbdError::invalid(what, "string is not UTF-8"))
}

fn put_u16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_be_bytes());
}
fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_be_bytes());
}
fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_be_bytes());
}

/// Length of a string or list as a u32 field. Strings are at most 4096 bytes by construction;
/// anything longer is a caller bug, and saturating keeps the encoder total.
fn len32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

// ---------------------------------------------------------------------------------------------
// Handshake: greeting and client flags
// ---------------------------------------------------------------------------------------------

/// The server's first message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Greeting {
    /// Handshake flags ([`handshake_flags`]).
    pub flags: u16,
}

impl Greeting {
    /// Appends the 18-byte greeting.
    pub fn encode(&self, out: &mut Vec<u8>) {
        put_u64(out, NBDMAGIC);
        put_u64(out, IHAVEOPT);
        put_u16(out, self.flags);
    }

    /// Decodes a greeting (client side); oldstyle servers are rejected.
    pub fn decode(buf: &[u8]) -> DecodeResult<Self> {
        let mut c = Cursor::new(buf);
        let Some(magic) = c.u64() else {
            return incomplete(buf.len(), GREETING_LEN);
        };
        if magic != NBDMAGIC {
            return Err(NbdError::BadMagic {
                what: "greeting",
                expected: NBDMAGIC,
                found: magic,
            });
        }
        let (Some(opt), Some(flags)) = (c.u64(), c.u16()) else {
            return incomplete(buf.len(), GREETING_LEN);
        };
        if opt != IHAVEOPT {
            return Err(NbdError::BadMagic {
                what: "newstyle greeting",
                expected: IHAVEOPT,
                found: opt,
            });
        }
        Ok(Decoded::Complete {
            value: Self { flags },
            consumed: GREETING_LEN,
        })
    }
}

/// The client's answer to the greeting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientFlags(pub u32);

impl ClientFlags {
    /// Appends the 4-byte flags.
    pub fn encode(&self, out: &mut Vec<u8>) {
        put_u32(out, self.0);
    }

    /// Decodes the flags and checks them against what the server offered.
    pub fn decode(buf: &[u8], offered: u16) -> DecodeResult<Self> {
        let Some(flags) = Cursor::new(buf).u32() else {
            return incomplete(buf.len(), CLIENT_FLAGS_LEN);
        };
        let mut allowed = 0;
        if offered & handshake_flags::FIXED_NEWSTYLE != 0 {
            allowed |= client_flags::FIXED_NEWSTYLE;
        }
        if offered & handshake_flags::NO_ZEROES != 0 {
            allowed |= client_flags::NO_ZEROES;
        }
        if flags & !allowed != 0 {
            return Err(NbdError::UnknownClientFlags(flags));
        }
        Ok(Decoded::Complete {
            value: Self(flags),
            consumed: CLIENT_FLAGS_LEN,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Options (client -> server)
// ---------------------------------------------------------------------------------------------

/// The fixed part of an option: which one, and how many data bytes follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    /// Option code ([`opt`]).
    pub option: u32,
    /// Length of the option data that follows.
    pub length: u32,
}

impl OptionHeader {
    /// Appends the 16-byte header.
    pub fn encode(&self, out: &mut Vec<u8>) {
        put_u64(out, IHAVEOPT);
        put_u32(out, self.option);
        put_u32(out, self.length);
    }

    /// Decodes the header only, so the length can be checked before any data is read.
    pub fn decode(buf: &[u8]) -> DecodeResult<Self> {
        let mut c = Cursor::new(buf);
        let Some(magic) = c.u64() else {
            return incomplete(buf.len(), OPTION_HEADER_LEN);
        };
        if magic != IHAVEOPT {
            return Err(NbdError::BadMagic {
                what: "option",
                expected: IHAVEOPT,
                found: magic,
            });
        }
        let (Some(option), Some(length)) = (c.u32(), c.u32()) else {
            return incomplete(buf.len(), OPTION_HEADER_LEN);
        };
        Ok(Decoded::Complete {
            value: Self { option, length },
            consumed: OPTION_HEADER_LEN,
        })
    }
}

/// Payload of `NBD_OPT_INFO` and `NBD_OPT_GO`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    /// Export name ("" for the default export).
    pub name: String,
    /// Information types asked for ([`info`]).
    pub requests: Vec<u16>,
}

/// Payload of `NBD_OPT_LIST_META_CONTEXT` and `NBD_OPT_SET_META_CONTEXT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextRequest {
    /// Export name the contexts are for.
    pub export: String,
    /// Queries such as `base:allocation`.
    pub queries: Vec<String>,
}

/// An option with its data parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientOption {
    /// `NBD_OPT_EXPORT_NAME`.
    ExportName(String),
    /// `NBD_OPT_ABORT` (any data is ignored, as the spec asks).
    Abort,
    /// `NBD_OPT_LIST`.
    List,
    /// `NBD_OPT_STARTTLS`.
    StartTls,
    /// `NBD_OPT_INFO`.
    Info(InfoRequest),
    /// `NBD_OPT_GO`.
    Go(InfoRequest),
    /// `NBD_OPT_STRUCTURED_REPLY`.
    StructuredReply,
    /// `NBD_OPT_LIST_META_CONTEXT`.
    ListMetaContext(MetaContextRequest),
    /// `NBD_OPT_SET_META_CONTEXT`.
    SetMetaContext(MetaContextRequest),
    /// Any other option, with its raw data.
    Unknown {
        /// Option code.
        option: u32,
        /// Raw data.
        data: Vec<u8>,
    },
}

impl ClientOption {
    /// The option code.
    pub fn code(&self) -> u32 {
        match self {
            ClientOption::ExportName(_) => opt::EXPORT_NAME,
            ClientOption::Abort => opt::ABORT,
            ClientOption::List => opt::LIST,
            ClientOption::StartTls => opt::STARTTLS,
            ClientOption::Info(_) => opt::INFO,
            ClientOption::Go(_) => opt::GO,
            ClientOption::StructuredReply => opt::STRUCTURED_REPLY,
            ClientOption::ListMetaContext(_) => opt::LIST_META_CONTEXT,
            ClientOption::SetMetaContext(_) => opt::SET_META_CONTEXT,
            ClientOption::Unknown { option, .. } => *option,
        }
    }

    /// Parses the data of option `option`. An error means the server should answer
    /// `NBD_REP_ERR_INVALID` (or, for `EXPORT_NAME`, which cannot be answered, disconnect).
    pub fn parse(option: u32, data: &[u8]) -> Result<Self, NbdError> {
        let no_data = |v: ClientOption, what: &'static str| {
            if data.is_empty() {
                Ok(v)
            } else {
                Err(NbdError::invalid(what, "this option carries no data"))
            }
        };
        match option {
            opt::EXPORT_NAME => Ok(ClientOption::ExportName(string(data, "export name")?)),
            opt::ABORT => Ok(ClientOption::Abort),
            opt::LIST => no_data(ClientOption::List, "NBD_OPT_LIST"),
            opt::STARTTLS => no_data(ClientOption::StartTls, "NBD_OPT_STARTTLS"),
            opt::STRUCTURED_REPLY => {
                no_data(ClientOption::StructuredReply, "NBD_OPT_STRUCTURED_REPLY")
            }
            opt::INFO => Ok(ClientOption::Info(parse_info_request(data)?)),
            opt::GO => Ok(ClientOption::Go(parse_info_request(data)?)),
            opt::LIST_META_CONTEXT => Ok(ClientOption::ListMetaContext(parse_meta_request(data)?)),
            opt::SET_META_CONTEXT => Ok(ClientOption::SetMetaContext(parse_meta_request(data)?)),
            other => Ok(ClientOption::Unknown {
                option: other,
                data: data.to_vec(),
            }),
        }
    }

    /// Appends the whole option: header and data.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        OptionHeader {
            option: self.code(),
            length: 0,
        }
        .encode(out);
        let data_start = out.len();
        match self {
            ClientOption::ExportName(name) => out.extend_from_slice(name.as_bytes()),
            ClientOption::Abort
            | ClientOption::List
            | ClientOption::StartTls
            | ClientOption::StructuredReply => {}
            ClientOption::Info(r) | ClientOption::Go(r) => {
                put_u32(out, len32(r.name.len()));
                out.extend_from_slice(r.name.as_bytes());
                put_u16(out, u16::try_from(r.requests.len()).unwrap_or(u16::MAX));
                for i in r.requests.iter().take(usize::from(u16::MAX)) {
                    put_u16(out, *i);
                }
            }
            ClientOption::ListMetaContext(r) | ClientOption::SetMetaContext(r) => {
                put_u32(out, len32(r.export.len()));
                out.extend_from_slice(r.export.as_bytes());
                put_u32(out, len32(r.queries.len()));
                for q in &r.queries {
                    put_u32(out, len32(q.len()));
                    out.extend_from_slice(q.as_bytes());
                }
            }
            ClientOption::Unknown { data, .. } => out.extend_from_slice(data),
        }
        let length = len32(out.len() - data_start);
        out[start + 12..start + 16].copy_from_slice(&length.to_be_bytes());
    }
}

fn parse_info_request(data: &[u8]) -> Result<InfoRequest, NbdError> {
    const WHAT: &str = "NBD_OPT_INFO/GO data";
    let mut c = Cursor::new(data);
    let name_len = c
        .u32()
        .ok_or(NbdError::invalid(WHAT, "shorter than 6 bytes"))?;
    let name_len = usize::try_from(name_len).unwrap_or(usize::MAX);
    if name_len > data.len().saturating_sub(6) {
        return Err(NbdError::invalid(WHAT, "name length runs past the option"));
    }
    let name = string(c.take(name_len).unwrap_or_default(), WHAT)?;
    let n = c
        .u16()
        .ok_or(NbdError::invalid(WHAT, "missing request count"))?;
    let rest = c.rest();
    if rest.len() != usize::from(n) * 2 {
        return Err(NbdError::invalid(
            WHAT,
            "request count does not match the option length",
        ));
    }
    let requests = rest
        .chunks_exact(2)
        .map(|p| u16::from_be_bytes([p[0], p[1]]))
        .collect();
    Ok(InfoRequest { name, requests })
}

fn parse_meta_request(data: &[u8]) -> Result<MetaContextRequest, NbdError> {
    const WHAT: &str = "meta context option data";
    let mut c = Cursor::new(data);
    let name_len = c
        .u32()
        .ok_or(NbdError::invalid(WHAT, "missing name length"))?;
    let name = c
        .take(usize::try_from(name_len).unwrap_or(usize::MAX))
        .ok_or(NbdError::invalid(WHAT, "name runs past the option"))?;
    let export = string(name, WHAT)?;
    let n = c
        .u32()
        .ok_or(NbdError::invalid(WHAT, "missing query count"))?;
    // Never trust the count for an allocation: each query takes at least 4 bytes.
    let cap = usize::try_from(n).unwrap_or(usize::MAX).min(data.len() / 4);
    let mut queries = Vec::with_capacity(cap);
    for _ in 0..n {
        let len = c
            .u32()
            .ok_or(NbdError::invalid(WHAT, "query count too large"))?;
        let q = c
            .take(usize::try_from(len).unwrap_or(usize::MAX))
            .ok_or(NbdError::invalid(WHAT, "query runs past the option"))?;
        queries.push(string(q, WHAT)?);
    }
    if !c.is_empty() {
        return Err(NbdError::invalid(WHAT, "trailing bytes after the queries"));
    }
    Ok(MetaContextRequest { export, queries })
}

/// Decodes a whole option (header and data) from `buf`, refusing data longer than
/// `max_len` without waiting for it.
pub fn decode_option(buf: &[u8], max_len: u32) -> DecodeResult<ClientOption> {
    let (header, _) = match OptionHeader::decode(buf)? {
        Decoded::Complete { value, consumed } => (value, consumed),
        Decoded::Incomplete { needed } => return Ok(Decoded::Incomplete { needed }),
    };
    if header.length > max_len {
        return Err(NbdError::TooLong {
            what: "option data",
            length: header.length.into(),
            limit: max_len.into(),
        });
    }
    let total = OPTION_HEADER_LEN + header.length as usize;
    if buf.len() < total {
        return incomplete(buf.len(), total);
    }
    let value = ClientOption::parse(header.option, &buf[OPTION_HEADER_LEN..total])?;
    Ok(Decoded::Complete {
        value,
        consumed: total,
    })
}

// ---------------------------------------------------------------------------------------------
// Option replies (server -> client)
// ---------------------------------------------------------------------------------------------

/// The fixed part of an option reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    /// The option this answers.
    pub option: u32,
    /// Reply type ([`rep`]).
    pub reply_type: u32,
    /// Length of the reply data.
    pub length: u32,
}

impl OptionReplyHeader {
    /// Appends the 20-byte header.
    pub fn encode(&self, out: &mut Vec<u8>) {
        put_u64(out, OPTION_REPLY_MAGIC);
        put_u32(out, self.option);
        put_u32(out, self.reply_type);
        put_u32(out, self.length);
    }

    /// Decodes the header.
    pub fn decode(buf: &[u8]) -> DecodeResult<Self> {
        let mut c = Cursor::new(buf);
        let Some(magic) = c.u64() else {
            return incomplete(buf.len(), OPTION_REPLY_HEADER_LEN);
        };
        if magic != OPTION_REPLY_MAGIC {
            return Err(NbdError::BadMagic {
                what: "option reply",
                expected: OPTION_REPLY_MAGIC,
                found: magic,
            });
        }
        let (Some(option), Some(reply_type), Some(length)) = (c.u32(), c.u32(), c.u32()) else {
            return incomplete(buf.len(), OPTION_REPLY_HEADER_LEN);
        };
        Ok(Decoded::Complete {
            value: Self {
                option,
                reply_type,
                length,
            },
            consumed: OPTION_REPLY_HEADER_LEN,
        })
    }
}

/// One `NBD_REP_INFO` item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InfoReply {
    /// `NBD_INFO_EXPORT`: size and transmission flags.
    Export {
        /// Export size in bytes.
        size: u64,
        /// Transmission flags ([`transmission_flags`]).
        flags: u16,
    },
    /// `NBD_INFO_NAME`: canonical name.
    Name(String),
    /// `NBD_INFO_DESCRIPTION`.
    Description(String),
    /// `NBD_INFO_BLOCK_SIZE`.
    BlockSize {
        /// Minimum block size (alignment of offsets and lengths).
        minimum: u32,
        /// Preferred block size.
        preferred: u32,
        /// Maximum request payload.
        maximum: u32,
    },
    /// An information type this crate does not know.
    Unknown {
        /// Information type.
        info_type: u16,
        /// Raw payload.
        data: Vec<u8>,
    },
}

/// An option reply with its data parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OptionReply {
    /// `NBD_REP_ACK`.
    Ack,
    /// `NBD_REP_SERVER`: one export of a LIST.
    Server {
        /// Export name.
        name: String,
        /// Description (may be empty).
        description: String,
    },
    /// `NBD_REP_INFO`.
    Info(InfoReply),
    /// `NBD_REP_META_CONTEXT`.
    MetaContext {
        /// Context id (0 in LIST replies).
        id: u32,
        /// Context name.
        name: String,
    },
    /// An error reply (bit 31 set), with its optional message.
    Error {
        /// Reply type, e.g. [`rep::ERR_UNSUP`].
        reply_type: u32,
        /// Human-readable message (may be empty).
        message: String,
    },
    /// A non-error reply type this crate does not know.
    Unknown {
        /// Reply type.
        reply_type: u32,
        /// Raw data.
        data: Vec<u8>,
    },
}

impl OptionReply {
    /// The reply type on the wire.
    pub fn reply_type(&self) -> u32 {
        match self {
            OptionReply::Ack => rep::ACK,
            OptionReply::Server { .. } => rep::SERVER,
            OptionReply::Info(_) => rep::INFO,
            OptionReply::MetaContext { .. } => rep::META_CONTEXT,
            OptionReply::Error { reply_type, .. } | OptionReply::Unknown { reply_type, .. } => {
                *reply_type
            }
        }
    }

    /// Appends the whole reply (header and data) answering `option`.
    pub fn encode(&self, option: u32, out: &mut Vec<u8>) {
        let start = out.len();
        OptionReplyHeader {
            option,
            reply_type: self.reply_type(),
            length: 0,
        }
        .encode(out);
        let data_start = out.len();
        match self {
            OptionReply::Ack => {}
            OptionReply::Server { name, description } => {
                put_u32(out, len32(name.len()));
                out.extend_from_slice(name.as_bytes());
                out.extend_from_slice(description.as_bytes());
            }
            OptionReply::Info(i) => match i {
                InfoReply::Export { size, flags } => {
                    put_u16(out, info::EXPORT);
                    put_u64(out, *size);
                    put_u16(out, *flags);
                }
                InfoReply::Name(s) => {
                    put_u16(out, info::NAME);
                    out.extend_from_slice(s.as_bytes());
                }
                InfoReply::Description(s) => {
                    put_u16(out, info::DESCRIPTION);
                    out.extend_from_slice(s.as_bytes());
                }
                InfoReply::BlockSize {
                    minimum,
                    preferred,
                    maximum,
                } => {
                    put_u16(out, info::BLOCK_SIZE);
                    put_u32(out, *minimum);
                    put_u32(out, *preferred);
                    put_u32(out, *maximum);
                }
                InfoReply::Unknown { info_type, data } => {
                    put_u16(out, *info_type);
                    out.extend_from_slice(data);
                }
            },
            OptionReply::MetaContext { id, name } => {
                put_u32(out, *id);
                out.extend_from_slice(name.as_bytes());
            }
            OptionReply::Error { message, .. } => out.extend_from_slice(message.as_bytes()),
            OptionReply::Unknown { data, .. } => out.extend_from_slice(data),
        }
        let length = len32(out.len() - data_start);
        out[start + 16..start + 20].copy_from_slice(&length.to_be_bytes());
    }

    /// Parses the data of a reply of type `reply_type`.
    pub fn parse(reply_type: u32, data: &[u8]) -> Result<Self, NbdError> {
        let mut c = Cursor::new(data);
        Ok(match reply_type {
            rep::ACK => {
                if !data.is_empty() {
                    return Err(NbdError::invalid("NBD_REP_ACK", "carries data"));
                }
                OptionReply::Ack
            }
            rep::SERVER => {
                const WHAT: &str = "NBD_REP_SERVER";
                let len = c.u32().ok_or(NbdError::invalid(WHAT, "too short"))?;
                let name = c
                    .take(usize::try_from(len).unwrap_or(usize::MAX))
                    .ok_or(NbdError::invalid(WHAT, "name runs past the reply"))?;
                OptionReply::Server {
                    name: string(name, WHAT)?,
                    description: string(c.rest(), WHAT)?,
                }
            }
            rep::INFO => OptionReply::Info(parse_info_reply(data)?),
            rep::META_CONTEXT => {
                const WHAT: &str = "NBD_REP_META_CONTEXT";
                let id = c.u32().ok_or(NbdError::invalid(WHAT, "too short"))?;
                OptionReply::MetaContext {
                    id,
                    name: string(c.rest(), WHAT)?,
                }
            }
            t if t & rep::ERROR_BIT != 0 => OptionReply::Error {
                reply_type: t,
                message: string(data, "option error message")?,
            },
            t => OptionReply::Unknown {
                reply_type: t,
                data: data.to_vec(),
            },
        })
    }

    /// Decodes a whole reply (header and data); returns the option it answers too.
    pub fn decode(buf: &[u8]) -> DecodeResult<(u32, OptionReply)> {
        let header = match OptionReplyHeader::decode(buf)? {
            Decoded::Complete { value, .. } => value,
            Decoded::Incomplete { needed } => return Ok(Decoded::Incomplete { needed }),
        };
        let total = OPTION_REPLY_HEADER_LEN.saturating_add(header.length as usize);
        if buf.len() < total {
            return incomplete(buf.len(), total);
        }
        let reply = Self::parse(header.reply_type, &buf[OPTION_REPLY_HEADER_LEN..total])?;
        Ok(Decoded::Complete {
            value: (header.option, reply),
            consumed: total,
        })
    }
}

fn parse_info_reply(data: &[u8]) -> Result<InfoReply, NbdError> {
    const WHAT: &str = "NBD_REP_INFO";
    let mut c = Cursor::new(data);
    let info_type = c.u16().ok_or(NbdError::invalid(WHAT, "too short"))?;
    let exact = |c: &Cursor<'_>| {
        if c.is_empty() {
            Ok(())
        } else {
            Err(NbdError::invalid(WHAT, "wrong length for its type"))
        }
    };
    Ok(match info_type {
        info::EXPORT => {
            let (Some(size), Some(flags)) = (c.u64(), c.u16()) else {
                return Err(NbdError::invalid(WHAT, "NBD_INFO_EXPORT too short"));
            };
            exact(&c)?;
            InfoReply::Export { size, flags }
        }
        info::NAME => InfoReply::Name(string(c.rest(), WHAT)?),
        info::DESCRIPTION => InfoReply::Description(string(c.rest(), WHAT)?),
        info::BLOCK_SIZE => {
            let (Some(minimum), Some(preferred), Some(maximum)) = (c.u32(), c.u32(), c.u32())
            else {
                return Err(NbdError::invalid(WHAT, "NBD_INFO_BLOCK_SIZE too short"));
            };
            exact(&c)?;
            InfoReply::BlockSize {
                minimum,
                preferred,
                maximum,
            }
        }
        other => InfoReply::Unknown {
            info_type: other,
            data: c.rest().to_vec(),
        },
    })
}

/// The reply to `NBD_OPT_EXPORT_NAME`: export size and transmission flags, then 124 zero bytes
/// unless the client negotiated `NBD_FLAG_C_NO_ZEROES`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportNameReply {
    /// Export size in bytes.
    pub size: u64,
    /// Transmission flags.
    pub flags: u16,
}

impl ExportNameReply {
    /// Appends the reply; `no_zeroes` omits the padding.
    pub fn encode(&self, no_zeroes: bool, out: &mut Vec<u8>) {
        put_u64(out, self.size);
        put_u16(out, self.flags);
        if !no_zeroes {
            out.extend_from_slice(&[0; EXPORT_NAME_PADDING]);
        }
    }

    /// Decodes the reply (client side).
    pub fn decode(buf: &[u8], no_zeroes: bool) -> DecodeResult<Self> {
        let total = if no_zeroes {
            10
        } else {
            10 + EXPORT_NAME_PADDING
        };
        if buf.len() < total {
            return incomplete(buf.len(), total);
        }
        let mut c = Cursor::new(buf);
        let (Some(size), Some(flags)) = (c.u64(), c.u16()) else {
            return incomplete(buf.len(), total);
        };
        Ok(Decoded::Complete {
            value: Self { size, flags },
            consumed: total,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Transmission: requests
// ---------------------------------------------------------------------------------------------

/// A transmission request header. The command is kept raw so an unknown one can be answered
/// with EINVAL and the session can go on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    /// Command flags ([`command_flags`]).
    pub flags: u16,
    /// Command type on the wire (see [`Command::from_wire`]).
    pub command: u16,
    /// Opaque value echoed in the reply.
    pub handle: u64,
    /// Byte offset.
    pub offset: u64,
    /// Byte length (for WRITE, the payload length that follows).
    pub length: u32,
}

impl RequestHeader {
    /// Appends the 28-byte header (the caller appends any WRITE payload).
    pub fn encode(&self, out: &mut Vec<u8>) {
        put_u32(out, REQUEST_MAGIC);
        put_u16(out, self.flags);
        put_u16(out, self.command);
        put_u64(out, self.handle);
        put_u64(out, self.offset);
        put_u32(out, self.length);
    }

    /// The same bytes as [`RequestHeader::encode`], without a buffer.
    pub fn to_bytes(&self) -> [u8; REQUEST_HEADER_LEN] {
        let mut b = [0; REQUEST_HEADER_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.command.to_be_bytes());
        b[8..16].copy_from_slice(&self.handle.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.length.to_be_bytes());
        b
    }

    /// Decodes a header; only the magic can make it invalid.
    pub fn decode(buf: &[u8]) -> DecodeResult<Self> {
        let mut c = Cursor::new(buf);
        let Some(magic) = c.u32() else {
            return incomplete(buf.len(), REQUEST_HEADER_LEN);
        };
        if magic != REQUEST_MAGIC {
            return Err(NbdError::BadMagic {
                what: "request",
                expected: REQUEST_MAGIC.into(),
                found: magic.into(),
            });
        }
        let (Some(flags), Some(command), Some(handle), Some(offset), Some(length)) =
            (c.u16(), c.u16(), c.u64(), c.u64(), c.u32())
        else {
            return incomplete(buf.len(), REQUEST_HEADER_LEN);
        };
        Ok(Decoded::Complete {
            value: Self {
                flags,
                command,
                handle,
                offset,
                length,
            },
            consumed: REQUEST_HEADER_LEN,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Transmission: replies
// ---------------------------------------------------------------------------------------------

/// A simple reply header (READ data, if any, follows it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimpleReplyHeader {
    /// 0 or an NBD errno.
    pub error: u32,
    /// The request's handle.
    pub handle: u64,
}

impl SimpleReplyHeader {
    /// Appends the 16-byte header.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_bytes());
    }

    /// The 16 header bytes, without a buffer.
    pub fn to_bytes(&self) -> [u8; SIMPLE_REPLY_HEADER_LEN] {
        let mut b = [0; SIMPLE_REPLY_HEADER_LEN];
        b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        b[4..8].copy_from_slice(&self.error.to_be_bytes());
        b[8..16].copy_from_slice(&self.handle.to_be_bytes());
        b
    }

    /// Decodes the header.
    pub fn decode(buf: &[u8]) -> DecodeResult<Self> {
        let mut c = Cursor::new(buf);
        let Some(magic) = c.u32() else {
            return incomplete(buf.len(), SIMPLE_REPLY_HEADER_LEN);
        };
        if magic != SIMPLE_REPLY_MAGIC {
            return Err(NbdError::BadMagic {
                what: "simple reply",
                expected: SIMPLE_REPLY_MAGIC.into(),
                found: magic.into(),
            });
        }
        let (Some(error), Some(handle)) = (c.u32(), c.u64()) else {
            return incomplete(buf.len(), SIMPLE_REPLY_HEADER_LEN);
        };
        Ok(Decoded::Complete {
            value: Self { error, handle },
            consumed: SIMPLE_REPLY_HEADER_LEN,
        })
    }
}

/// A structured reply chunk header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StructuredReplyHeader {
    /// Chunk flags ([`reply_flags`]).
    pub flags: u16,
    /// Chunk type ([`reply_type`]).
    pub reply_type: u16,
    /// The request's handle.
    pub handle: u64,
    /// Payload length.
    pub length: u32,
}

impl StructuredReplyHeader {
    /// Appends the 20-byte header.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_bytes());
    }

    /// The 20 header bytes, without a buffer.
    pub fn to_bytes(&self) -> [u8; STRUCTURED_REPLY_HEADER_LEN] {
        let mut b = [0; STRUCTURED_REPLY_HEADER_LEN];
        b[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.reply_type.to_be_bytes());
        b[8..16].copy_from_slice(&self.handle.to_be_bytes());
        b[16..20].copy_from_slice(&self.length.to_be_bytes());
        b
    }

    /// Decodes the header.
    pub fn decode(buf: &[u8]) -> DecodeResult<Self> {
        let mut c = Cursor::new(buf);
        let Some(magic) = c.u32() else {
            return incomplete(buf.len(), STRUCTURED_REPLY_HEADER_LEN);
        };
        if magic != STRUCTURED_REPLY_MAGIC {
            return Err(NbdError::BadMagic {
                what: "structured reply",
                expected: STRUCTURED_REPLY_MAGIC.into(),
                found: magic.into(),
            });
        }
        let (Some(flags), Some(reply_type), Some(handle), Some(length)) =
            (c.u16(), c.u16(), c.u64(), c.u32())
        else {
            return incomplete(buf.len(), STRUCTURED_REPLY_HEADER_LEN);
        };
        Ok(Decoded::Complete {
            value: Self {
                flags,
                reply_type,
                handle,
                length,
            },
            consumed: STRUCTURED_REPLY_HEADER_LEN,
        })
    }
}

/// The header of an `OFFSET_DATA` chunk carrying `data_len` bytes at `offset`: the chunk
/// header and the 8-byte offset (28 bytes). The caller sends the data itself (zero copy).
pub fn offset_data_header(handle: u64, flags: u16, offset: u64, data_len: u32) -> [u8; 28] {
    let mut b = [0; 28];
    b[..STRUCTURED_REPLY_HEADER_LEN].copy_from_slice(
        &StructuredReplyHeader {
            flags,
            reply_type: reply_type::OFFSET_DATA,
            handle,
            length: data_len.saturating_add(8),
        }
        .to_bytes(),
    );
    b[STRUCTURED_REPLY_HEADER_LEN..].copy_from_slice(&offset.to_be_bytes());
    b
}

/// One `base:allocation`-style descriptor of a BLOCK_STATUS chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockDescriptor {
    /// Extent length (never 0 on the wire).
    pub length: u32,
    /// Status flags ([`state_flags`]).
    pub flags: u32,
}

/// A structured reply chunk payload, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChunkPayload {
    /// `NBD_REPLY_TYPE_NONE`.
    None,
    /// `NBD_REPLY_TYPE_OFFSET_DATA`.
    OffsetData {
        /// Absolute offset of the data.
        offset: u64,
        /// The data (at least one byte).
        data: Vec<u8>,
    },
    /// `NBD_REPLY_TYPE_OFFSET_HOLE`.
    OffsetHole {
        /// Absolute offset.
        offset: u64,
        /// Hole size (non-zero).
        size: u32,
    },
    /// `NBD_REPLY_TYPE_BLOCK_STATUS`.
    BlockStatus {
        /// Metadata context id.
        context_id: u32,
        /// At least one descriptor.
        descriptors: Vec<BlockDescriptor>,
    },
    /// `NBD_REPLY_TYPE_ERROR`.
    Error {
        /// NBD errno (non-zero).
        error: u32,
        /// Human-readable message.
        message: String,
    },
    /// `NBD_REPLY_TYPE_ERROR_OFFSET`.
    ErrorOffset {
        /// NBD errno (non-zero).
        error: u32,
        /// Human-readable message.
        message: String,
        /// Offset the error applies to.
        offset: u64,
    },
    /// Another chunk type, raw.
    Unknown {
        /// Chunk type.
        reply_type: u16,
        /// Raw payload.
        data: Vec<u8>,
    },
}

impl ChunkPayload {
    /// The chunk type on the wire.
    pub fn reply_type(&self) -> u16 {
        match self {
            ChunkPayload::None => reply_type::NONE,
            ChunkPayload::OffsetData { .. } => reply_type::OFFSET_DATA,
            ChunkPayload::OffsetHole { .. } => reply_type::OFFSET_HOLE,
            ChunkPayload::BlockStatus { .. } => reply_type::BLOCK_STATUS,
            ChunkPayload::Error { .. } => reply_type::ERROR,
            ChunkPayload::ErrorOffset { .. } => reply_type::ERROR_OFFSET,
            ChunkPayload::Unknown { reply_type, .. } => *reply_type,
        }
    }

    /// Appends a whole chunk (header and payload). Error messages longer than 4096 bytes are
    /// cut at a character boundary.
    pub fn encode(&self, handle: u64, flags: u16, out: &mut Vec<u8>) {
        let start = out.len();
        StructuredReplyHeader {
            flags,
            reply_type: self.reply_type(),
            handle,
            length: 0,
        }
        .encode(out);
        let data_start = out.len();
        match self {
            ChunkPayload::None => {}
            ChunkPayload::OffsetData { offset, data } => {
                put_u64(out, *offset);
                out.extend_from_slice(data);
            }
            ChunkPayload::OffsetHole { offset, size } => {
                put_u64(out, *offset);
                put_u32(out, *size);
            }
            ChunkPayload::BlockStatus {
                context_id,
                descriptors,
            } => {
                put_u32(out, *context_id);
                for d in descriptors {
                    put_u32(out, d.length);
                    put_u32(out, d.flags);
                }
            }
            ChunkPayload::Error { error, message } => {
                put_error_fields(out, *error, message);
            }
            ChunkPayload::ErrorOffset {
                error,
                message,
                offset,
            } => {
                put_error_fields(out, *error, message);
                put_u64(out, *offset);
            }
            ChunkPayload::Unknown { data, .. } => out.extend_from_slice(data),
        }
        let length = len32(out.len() - data_start);
        out[start + 16..start + 20].copy_from_slice(&length.to_be_bytes());
    }

    /// Parses the payload of a chunk of type `reply_type`.
    pub fn parse(reply_type: u16, data: &[u8]) -> Result<Self, NbdError> {
        let mut c = Cursor::new(data);
        Ok(match reply_type {
            reply_type::NONE => {
                if !data.is_empty() {
                    return Err(NbdError::invalid(
                        "NBD_REPLY_TYPE_NONE",
                        "carries a payload",
                    ));
                }
                ChunkPayload::None
            }
            reply_type::OFFSET_DATA => {
                if data.len() < 9 {
                    return Err(NbdError::invalid(
                        "NBD_REPLY_TYPE_OFFSET_DATA",
                        "shorter than 9 bytes",
                    ));
                }
                let offset = c.u64().unwrap_or_default();
                ChunkPayload::OffsetData {
                    offset,
                    data: c.rest().to_vec(),
                }
            }
            reply_type::OFFSET_HOLE => {
                let (Some(offset), Some(size)) = (c.u64(), c.u32()) else {
                    return Err(NbdError::invalid("NBD_REPLY_TYPE_OFFSET_HOLE", "too short"));
                };
                if !c.is_empty() || size == 0 {
                    return Err(NbdError::invalid(
                        "NBD_REPLY_TYPE_OFFSET_HOLE",
                        "wrong length or empty hole",
                    ));
                }
                ChunkPayload::OffsetHole { offset, size }
            }
            reply_type::BLOCK_STATUS => {
                const WHAT: &str = "NBD_REPLY_TYPE_BLOCK_STATUS";
                let context_id = c.u32().ok_or(NbdError::invalid(WHAT, "too short"))?;
                let rest = c.rest();
                if rest.is_empty() || !rest.len().is_multiple_of(8) {
                    return Err(NbdError::invalid(
                        WHAT,
                        "length is not 4 plus a positive multiple of 8",
                    ));
                }
                let descriptors = rest
                    .chunks_exact(8)
                    .map(|d| BlockDescriptor {
                        length: u32::from_be_bytes([d[0], d[1], d[2], d[3]]),
                        flags: u32::from_be_bytes([d[4], d[5], d[6], d[7]]),
                    })
                    .collect();
                ChunkPayload::BlockStatus {
                    context_id,
                    descriptors,
                }
            }
            reply_type::ERROR | reply_type::ERROR_OFFSET => {
                const WHAT: &str = "structured error chunk";
                let (Some(error), Some(mlen)) = (c.u32(), c.u16()) else {
                    return Err(NbdError::invalid(WHAT, "too short"));
                };
                let msg = c
                    .take(mlen.into())
                    .ok_or(NbdError::invalid(WHAT, "message runs past the chunk"))?;
                let message = string(msg, WHAT)?;
                if error == 0 {
                    return Err(NbdError::invalid(WHAT, "error value is zero"));
                }
                if reply_type == reply_type::ERROR {
                    if !c.is_empty() {
                        return Err(NbdError::invalid(WHAT, "trailing bytes"));
                    }
                    ChunkPayload::Error { error, message }
                } else {
                    let offset = c.u64().ok_or(NbdError::invalid(WHAT, "missing offset"))?;
                    if !c.is_empty() {
                        return Err(NbdError::invalid(WHAT, "trailing bytes"));
                    }
                    ChunkPayload::ErrorOffset {
                        error,
                        message,
                        offset,
                    }
                }
            }
            other => ChunkPayload::Unknown {
                reply_type: other,
                data: data.to_vec(),
            },
        })
    }
}

fn put_error_fields(out: &mut Vec<u8>, error: u32, message: &str) {
    let mut end = message.len().min(MAX_STRING_LEN);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    put_u32(out, error);
    // `end` <= 4096, so it fits in 16 bits.
    put_u16(out, u16::try_from(end).unwrap_or(0));
    out.extend_from_slice(&message.as_bytes()[..end]);
}

/// Either kind of reply header, told apart by its magic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyHeader {
    /// A simple reply.
    Simple(SimpleReplyHeader),
    /// A structured reply chunk.
    Structured(StructuredReplyHeader),
}

impl ReplyHeader {
    /// Decodes whichever reply header starts `buf` (client side).
    pub fn decode(buf: &[u8]) -> DecodeResult<Self> {
        let Some(magic) = Cursor::new(buf).u32() else {
            return incomplete(buf.len(), SIMPLE_REPLY_HEADER_LEN);
        };
        match magic {
            SIMPLE_REPLY_MAGIC => Ok(SimpleReplyHeader::decode(buf)?.map(ReplyHeader::Simple)),
            STRUCTURED_REPLY_MAGIC => {
                Ok(StructuredReplyHeader::decode(buf)?.map(ReplyHeader::Structured))
            }
            other => Err(NbdError::BadMagic {
                what: "reply",
                expected: SIMPLE_REPLY_MAGIC.into(),
                found: other.into(),
            }),
        }
    }
}

/// Decodes a whole structured chunk (header and payload).
pub fn decode_structured_chunk(buf: &[u8]) -> DecodeResult<(StructuredReplyHeader, ChunkPayload)> {
    let header = match StructuredReplyHeader::decode(buf)? {
        Decoded::Complete { value, .. } => value,
        Decoded::Incomplete { needed } => return Ok(Decoded::Incomplete { needed }),
    };
    let total = STRUCTURED_REPLY_HEADER_LEN.saturating_add(header.length as usize);
    if buf.len() < total {
        return incomplete(buf.len(), total);
    }
    let payload = ChunkPayload::parse(header.reply_type, &buf[STRUCTURED_REPLY_HEADER_LEN..total])?;
    Ok(Decoded::Complete {
        value: (header, payload),
        consumed: total,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly on purpose
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn roundtrip_option(o: &ClientOption) {
        let mut out = Vec::new();
        o.encode(&mut out);
        let (back, used) = decode_option(&out, u32::MAX).unwrap().complete().unwrap();
        assert_eq!(used, out.len());
        assert_eq!(&back, o);
        // Every strict prefix is incomplete, never invalid.
        for cut in 0..out.len() {
            match decode_option(&out[..cut], u32::MAX).unwrap() {
                Decoded::Incomplete { needed } => assert!(needed >= 1 && cut + needed <= out.len()),
                Decoded::Complete { .. } => panic!("prefix of {cut} bytes decoded"),
            }
        }
    }

    #[test]
    fn magics_spell_what_they_say() {
        assert_eq!(&NBDMAGIC.to_be_bytes(), b"NBDMAGIC");
        assert_eq!(&IHAVEOPT.to_be_bytes(), b"IHAVEOPT");
    }

    #[test]
    fn request_bytes_match_the_spec() {
        let h = RequestHeader {
            flags: command_flags::FUA,
            command: Command::Write.to_wire(),
            handle: 0x0102_0304_0506_0708,
            offset: 4096,
            length: 512,
        };
        let b = h.to_bytes();
        assert_eq!(
            b,
            [
                0x25, 0x60, 0x95, 0x13, 0, 1, 0, 1, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 0, 0, 0, 0x10,
                0, 0, 0, 2, 0
            ]
        );
        let mut v = Vec::new();
        h.encode(&mut v);
        assert_eq!(v, b);
    }

    #[test]
    fn bad_request_magic_is_invalid_not_incomplete() {
        let err = RequestHeader::decode(&[0, 0, 0, 0]).unwrap_err();
        assert!(matches!(err, NbdError::BadMagic { .. }));
        assert_eq!(
            RequestHeader::decode(&[0x25, 0x60]).unwrap(),
            Decoded::Incomplete { needed: 26 }
        );
    }

    #[test]
    fn client_flags_must_match_the_offer() {
        let all = handshake_flags::FIXED_NEWSTYLE | handshake_flags::NO_ZEROES;
        assert!(ClientFlags::decode(&3u32.to_be_bytes(), all).is_ok());
        assert!(ClientFlags::decode(&4u32.to_be_bytes(), all).is_err());
        assert!(ClientFlags::decode(&2u32.to_be_bytes(), handshake_flags::FIXED_NEWSTYLE).is_err());
    }

    #[test]
    fn option_limits_are_checked_before_the_data_arrives() {
        let mut out = Vec::new();
        OptionHeader {
            option: opt::GO,
            length: u32::MAX,
        }
        .encode(&mut out);
        assert!(matches!(
            decode_option(&out, 65536),
            Err(NbdError::TooLong { .. })
        ));
    }

    #[test]
    fn info_request_rejects_inconsistent_lengths() {
        // name length 10 in a 6-byte option
        let mut d = Vec::new();
        put_u32(&mut d, 10);
        put_u16(&mut d, 0);
        assert!(ClientOption::parse(opt::GO, &d).is_err());
        // count 2 but one request
        let mut d = Vec::new();
        put_u32(&mut d, 0);
        put_u16(&mut d, 2);
        put_u16(&mut d, info::BLOCK_SIZE);
        assert!(ClientOption::parse(opt::INFO, &d).is_err());
        // data on NBD_OPT_LIST
        assert!(ClientOption::parse(opt::LIST, &[1]).is_err());
        // ABORT ignores data
        assert_eq!(
            ClientOption::parse(opt::ABORT, &[1, 2]).unwrap(),
            ClientOption::Abort
        );
    }

    #[test]
    fn meta_query_count_is_not_trusted() {
        let mut d = Vec::new();
        put_u32(&mut d, 0);
        put_u32(&mut d, u32::MAX);
        assert!(ClientOption::parse(opt::SET_META_CONTEXT, &d).is_err());
    }

    #[test]
    fn export_name_reply_padding() {
        let r = ExportNameReply {
            size: 1 << 30,
            flags: 3,
        };
        for nz in [false, true] {
            let mut v = Vec::new();
            r.encode(nz, &mut v);
            assert_eq!(v.len(), if nz { 10 } else { 134 });
            assert_eq!(
                ExportNameReply::decode(&v, nz).unwrap().complete(),
                Some((r, v.len()))
            );
        }
    }

    #[test]
    fn offset_data_header_matches_full_encoding() {
        let data = vec![7u8; 100];
        let mut full = Vec::new();
        ChunkPayload::OffsetData {
            offset: 512,
            data: data.clone(),
        }
        .encode(9, reply_flags::DONE, &mut full);
        let mut split = offset_data_header(9, reply_flags::DONE, 512, 100).to_vec();
        split.extend_from_slice(&data);
        assert_eq!(full, split);
    }

    fn proto_string() -> impl Strategy<Value = String> + Clone {
        "[a-zA-Z0-9:._/ -]{0,40}"
    }

    fn arb_option() -> impl Strategy<Value = ClientOption> {
        let info = (
            proto_string(),
            proptest::collection::vec(any::<u16>(), 0..8),
        )
            .prop_map(|(name, requests)| InfoRequest { name, requests });
        let meta = (
            proto_string(),
            proptest::collection::vec(proto_string(), 0..5),
        )
            .prop_map(|(export, queries)| MetaContextRequest { export, queries });
        prop_oneof![
            proto_string().prop_map(ClientOption::ExportName),
            Just(ClientOption::Abort),
            Just(ClientOption::List),
            Just(ClientOption::StartTls),
            Just(ClientOption::StructuredReply),
            info.clone().prop_map(ClientOption::Info),
            info.prop_map(ClientOption::Go),
            meta.clone().prop_map(ClientOption::ListMetaContext),
            meta.prop_map(ClientOption::SetMetaContext),
            (12u32..1000, proptest::collection::vec(any::<u8>(), 0..32))
                .prop_map(|(option, data)| ClientOption::Unknown { option, data }),
        ]
    }

    fn arb_option_reply() -> impl Strategy<Value = OptionReply> {
        let info = prop_oneof![
            (any::<u64>(), any::<u16>())
                .prop_map(|(size, flags)| InfoReply::Export { size, flags }),
            proto_string().prop_map(InfoReply::Name),
            proto_string().prop_map(InfoReply::Description),
            (any::<u32>(), any::<u32>(), any::<u32>()).prop_map(|(minimum, preferred, maximum)| {
                InfoReply::BlockSize {
                    minimum,
                    preferred,
                    maximum,
                }
            }),
            (4u16.., proptest::collection::vec(any::<u8>(), 0..16))
                .prop_map(|(info_type, data)| InfoReply::Unknown { info_type, data }),
        ];
        prop_oneof![
            Just(OptionReply::Ack),
            (proto_string(), proto_string())
                .prop_map(|(name, description)| OptionReply::Server { name, description }),
            info.prop_map(OptionReply::Info),
            (any::<u32>(), proto_string())
                .prop_map(|(id, name)| OptionReply::MetaContext { id, name }),
            ((1u32..10).prop_map(|t| t | rep::ERROR_BIT), proto_string()).prop_map(
                |(reply_type, message)| OptionReply::Error {
                    reply_type,
                    message
                }
            ),
        ]
    }

    fn arb_chunk() -> impl Strategy<Value = ChunkPayload> {
        prop_oneof![
            Just(ChunkPayload::None),
            (any::<u64>(), proptest::collection::vec(any::<u8>(), 1..64))
                .prop_map(|(offset, data)| ChunkPayload::OffsetData { offset, data }),
            (any::<u64>(), 1u32..)
                .prop_map(|(offset, size)| ChunkPayload::OffsetHole { offset, size }),
            (
                any::<u32>(),
                proptest::collection::vec((1u32.., 0u32..4), 1..8)
            )
                .prop_map(|(context_id, d)| ChunkPayload::BlockStatus {
                    context_id,
                    descriptors: d
                        .into_iter()
                        .map(|(length, flags)| BlockDescriptor { length, flags })
                        .collect(),
                }),
            (1u32.., proto_string())
                .prop_map(|(error, message)| ChunkPayload::Error { error, message }),
            (1u32.., proto_string(), any::<u64>()).prop_map(|(error, message, offset)| {
                ChunkPayload::ErrorOffset {
                    error,
                    message,
                    offset,
                }
            }),
        ]
    }

    proptest! {
        #[test]
        fn option_roundtrip(o in arb_option()) {
            roundtrip_option(&o);
        }

        #[test]
        fn option_reply_roundtrip(r in arb_option_reply(), option in any::<u32>()) {
            let mut out = Vec::new();
            r.encode(option, &mut out);
            let ((o, back), used) = OptionReply::decode(&out).unwrap().complete().unwrap();
            prop_assert_eq!(used, out.len());
            prop_assert_eq!(o, option);
            prop_assert_eq!(back, r);
        }

        #[test]
        fn request_roundtrip(flags in any::<u16>(), command in any::<u16>(), handle in any::<u64>(),
                             offset in any::<u64>(), length in any::<u32>()) {
            let h = RequestHeader { flags, command, handle, offset, length };
            let mut out = Vec::new();
            h.encode(&mut out);
            prop_assert_eq!(RequestHeader::decode(&out).unwrap().complete(), Some((h, REQUEST_HEADER_LEN)));
        }

        #[test]
        fn simple_reply_roundtrip(error in any::<u32>(), handle in any::<u64>()) {
            let h = SimpleReplyHeader { error, handle };
            let mut out = Vec::new();
            h.encode(&mut out);
            prop_assert_eq!(ReplyHeader::decode(&out).unwrap().complete(),
                Some((ReplyHeader::Simple(h), SIMPLE_REPLY_HEADER_LEN)));
        }

        #[test]
        fn chunk_roundtrip(c in arb_chunk(), handle in any::<u64>(), flags in any::<u16>()) {
            let mut out = Vec::new();
            c.encode(handle, flags, &mut out);
            let ((h, back), used) = decode_structured_chunk(&out).unwrap().complete().unwrap();
            prop_assert_eq!(used, out.len());
            prop_assert_eq!(h.handle, handle);
            prop_assert_eq!(h.flags, flags);
            prop_assert_eq!(back, c);
        }

        #[test]
        fn greeting_roundtrip(flags in any::<u16>()) {
            let g = Greeting { flags };
            let mut out = Vec::new();
            g.encode(&mut out);
            prop_assert_eq!(Greeting::decode(&out).unwrap().complete(), Some((g, GREETING_LEN)));
        }

        #[test]
        fn decoders_never_panic(buf in proptest::collection::vec(any::<u8>(), 0..256),
                                option in any::<u32>(), rt in any::<u32>(), ct in any::<u16>(),
                                offered in any::<u16>(), nz in any::<bool>()) {
            let _ = Greeting::decode(&buf);
            let _ = ClientFlags::decode(&buf, offered);
            let _ = OptionHeader::decode(&buf);
            let _ = decode_option(&buf, 4096);
            let _ = ClientOption::parse(option, &buf);
            let _ = OptionReplyHeader::decode(&buf);
            let _ = OptionReply::decode(&buf);
            let _ = OptionReply::parse(rt, &buf);
            let _ = ExportNameReply::decode(&buf, nz);
            let _ = RequestHeader::decode(&buf);
            let _ = ReplyHeader::decode(&buf);
            let _ = decode_structured_chunk(&buf);
            let _ = ChunkPayload::parse(ct, &buf);
        }

        #[test]
        fn decoders_never_panic_on_valid_magics(tail in proptest::collection::vec(any::<u8>(), 0..128),
                                                 which in 0u8..5) {
            let mut buf = Vec::new();
            match which {
                0 => put_u64(&mut buf, IHAVEOPT),
                1 => put_u64(&mut buf, OPTION_REPLY_MAGIC),
                2 => put_u32(&mut buf, REQUEST_MAGIC),
                3 => put_u32(&mut buf, STRUCTURED_REPLY_MAGIC),
                _ => put_u32(&mut buf, SIMPLE_REPLY_MAGIC),
            }
            buf.extend_from_slice(&tail);
            let _ = decode_option(&buf, u32::MAX);
            let _ = OptionReply::decode(&buf);
            let _ = RequestHeader::decode(&buf);
            let _ = decode_structured_chunk(&buf);
            let _ = ReplyHeader::decode(&buf);
        }
    }
}
