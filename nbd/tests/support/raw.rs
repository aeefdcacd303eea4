//! A blocking NBD client speaking through `nbd::proto`, for tests that need to send what no
//! real client would.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use nbd::proto::{
    self, ChunkPayload, ClientFlags, ClientOption, Command, Greeting, InfoRequest,
    MetaContextRequest, OptionReply, ReplyHeader, RequestHeader, client_flags, info, rep,
    reply_flags,
};

/// A finished reply.
#[derive(Debug, Default)]
pub struct Reply {
    pub handle: u64,
    /// 0 on success.
    pub error: u32,
    /// READ data, reassembled.
    pub data: Vec<u8>,
    /// Structured chunks as received (data chunks included).
    pub chunks: Vec<ChunkPayload>,
}

pub struct RawClient {
    pub s: UnixStream,
    pub structured: bool,
    pub size: u64,
    pub flags: u16,
    pending: HashMap<u64, (Command, u32)>,
    next_handle: u64,
}

impl RawClient {
    /// Connects without reading anything.
    pub fn connect_raw(path: &Path) -> Self {
        let s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        Self {
            s,
            structured: false,
            size: 0,
            flags: 0,
            pending: HashMap::new(),
            next_handle: 1,
        }
    }

    /// A client on a stream already in transmission phase (negotiated out of band, as a
    /// kernel NBD device is): simple replies.
    pub fn preconnected(s: UnixStream, size: u64, flags: u16) -> Self {
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        Self {
            s,
            structured: false,
            size,
            flags,
            pending: HashMap::new(),
            next_handle: 1,
        }
    }

    /// Connects and reads the greeting; None if the server closed the connection instead.
    pub fn try_connect(path: &Path) -> Option<Self> {
        let mut c = Self::connect_raw(path);
        let mut g = vec![0; proto::GREETING_LEN];
        c.s.read_exact(&mut g).ok()?;
        let (g, _) = Greeting::decode(&g).unwrap().complete().unwrap();
        assert_eq!(
            g.flags,
            proto::handshake_flags::FIXED_NEWSTYLE | proto::handshake_flags::NO_ZEROES
        );
        Some(c)
    }

    /// Connects and reads the greeting; nothing else.
    pub fn connect(path: &Path) -> Self {
        let mut c = Self::connect_raw(path);
        let g = c.read_exact(proto::GREETING_LEN);
        let (g, _) = Greeting::decode(&g).unwrap().complete().unwrap();
        assert_eq!(
            g.flags,
            proto::handshake_flags::FIXED_NEWSTYLE | proto::handshake_flags::NO_ZEROES
        );
        c
    }

    /// Connects and negotiates with GO, optionally structured replies and base:allocation.
    pub fn open(path: &Path, export: &str, structured: bool) -> Self {
        let mut c = Self::connect(path);
        c.send_flags(client_flags::FIXED_NEWSTYLE | client_flags::NO_ZEROES);
        if structured {
            let r = c.option(&ClientOption::StructuredReply);
            assert_eq!(r, vec![OptionReply::Ack]);
            let r = c.option(&ClientOption::SetMetaContext(MetaContextRequest {
                export: export.to_owned(),
                queries: vec![proto::BASE_ALLOCATION.to_owned()],
            }));
            assert_eq!(r.len(), 2, "{r:?}");
            c.structured = true;
        }
        c.go(export).unwrap();
        c
    }

    pub fn send_flags(&mut self, flags: u32) {
        let mut v = Vec::new();
        ClientFlags(flags).encode(&mut v);
        self.send(&v);
    }

    /// GO; Err(reply type) if refused.
    pub fn go(&mut self, export: &str) -> Result<(), u32> {
        let replies = self.option(&ClientOption::Go(InfoRequest {
            name: export.to_owned(),
            requests: vec![info::NAME, info::BLOCK_SIZE],
        }));
        match replies.last() {
            Some(OptionReply::Ack) => {}
            Some(OptionReply::Error { reply_type, .. }) => return Err(*reply_type),
            other => panic!("unexpected final reply {other:?}"),
        }
        for r in &replies {
            if let OptionReply::Info(proto::InfoReply::Export { size, flags }) = r {
                self.size = *size;
                self.flags = *flags;
            }
        }
        Ok(())
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).unwrap();
    }

    /// Sends without failing the test if the server already closed.
    pub fn try_send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.s.write_all(bytes)
    }

    pub fn read_exact(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0; n];
        self.s.read_exact(&mut v).unwrap();
        v
    }

    /// True if the server closed the connection (EOF or reset) rather than sending more.
    pub fn closed_by_server(&mut self) -> bool {
        let mut b = [0u8; 1];
        match self.s.read(&mut b) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => is_hang_up(&e),
        }
    }

    /// Reads one successful reply for each of `handles`, in whatever order they complete.
    pub fn expect_success_of(&mut self, handles: &[u64]) {
        let mut answered: Vec<u64> = handles
            .iter()
            .map(|_| {
                let r = self.reply();
                assert_eq!(r.error, 0, "request {} failed", r.handle);
                r.handle
            })
            .collect();
        answered.sort();
        let mut asked = handles.to_vec();
        asked.sort();
        assert_eq!(answered, asked);
    }

    /// Reads what the server still sends until it closes the connection (EOF or reset);
    /// false if it kept the connection open past the read timeout.
    pub fn drained_until_closed(&mut self) -> bool {
        let mut b = vec![0u8; 1 << 16];
        loop {
            match self.s.read(&mut b) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(e) => return is_hang_up(&e),
            }
        }
    }

    /// Sends an option and reads replies up to the final one (ACK or error).
    pub fn option(&mut self, o: &ClientOption) -> Vec<OptionReply> {
        let mut v = Vec::new();
        o.encode(&mut v);
        self.send(&v);
        self.option_replies(o.code())
    }

    pub fn option_replies(&mut self, code: u32) -> Vec<OptionReply> {
        let mut out = Vec::new();
        loop {
            let h = self.read_exact(proto::OPTION_REPLY_HEADER_LEN);
            let (header, _) = proto::OptionReplyHeader::decode(&h)
                .unwrap()
                .complete()
                .unwrap();
            assert_eq!(header.option, code);
            let data = self.read_exact(header.length as usize);
            let r = OptionReply::parse(header.reply_type, &data).unwrap();
            let last = matches!(r, OptionReply::Ack) || header.reply_type & rep::ERROR_BIT != 0;
            out.push(r);
            if last {
                return out;
            }
        }
    }

    /// Sends a request; returns its handle.
    pub fn request(
        &mut self,
        command: Command,
        flags: u16,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) -> u64 {
        let handle = self.next_handle;
        self.next_handle += 1;
        self.request_raw(
            RequestHeader {
                flags,
                command: command.to_wire(),
                handle,
                offset,
                length,
            },
            payload,
        );
        self.pending.insert(handle, (command, length));
        handle
    }

    pub fn request_raw(&mut self, h: RequestHeader, payload: &[u8]) {
        let mut v = Vec::with_capacity(proto::REQUEST_HEADER_LEN + payload.len());
        h.encode(&mut v);
        v.extend_from_slice(payload);
        self.send(&v);
    }

    /// Records a request sent with `request_raw` so its reply can be read.
    pub fn expect(&mut self, handle: u64, command: Command, length: u32) {
        self.pending.insert(handle, (command, length));
    }

    /// Reads one whole reply (all chunks of a structured one).
    pub fn reply(&mut self) -> Reply {
        let mut reply = Reply::default();
        let mut data: Vec<(u64, Vec<u8>)> = Vec::new();
        loop {
            let mut h = self.read_exact(4);
            let magic = u32::from_be_bytes([h[0], h[1], h[2], h[3]]);
            let rest = if magic == proto::STRUCTURED_REPLY_MAGIC {
                proto::STRUCTURED_REPLY_HEADER_LEN - 4
            } else {
                proto::SIMPLE_REPLY_HEADER_LEN - 4
            };
            h.extend(self.read_exact(rest));
            let (header, _) = ReplyHeader::decode(&h).unwrap().complete().unwrap();
            match header {
                ReplyHeader::Simple(s) => {
                    let (cmd, len) = self.pending.remove(&s.handle).expect("known handle");
                    reply.handle = s.handle;
                    reply.error = s.error;
                    if cmd == Command::Read && s.error == 0 {
                        reply.data = self.read_exact(len as usize);
                    }
                    return reply;
                }
                ReplyHeader::Structured(sh2) => {
                    let payload = self.read_exact(sh2.length as usize);
                    let chunk = ChunkPayload::parse(sh2.reply_type, &payload).unwrap();
                    reply.handle = sh2.handle;
                    match &chunk {
                        ChunkPayload::Error { error, .. }
                        | ChunkPayload::ErrorOffset { error, .. } => reply.error = *error,
                        ChunkPayload::OffsetData { offset, data: d } => {
                            data.push((*offset, d.clone()))
                        }
                        _ => {}
                    }
                    reply.chunks.push(chunk);
                    if sh2.flags & reply_flags::DONE != 0 {
                        let (_, len) = self.pending.remove(&sh2.handle).expect("known handle");
                        if reply.error == 0 && !data.is_empty() {
                            let base = data.iter().map(|d| d.0).min().unwrap();
                            reply.data = vec![0; len as usize];
                            for (o, d) in data {
                                let at = (o - base) as usize;
                                reply.data[at..at + d.len()].copy_from_slice(&d);
                            }
                        }
                        return reply;
                    }
                }
            }
        }
    }

    /// Sends a read and returns its reply.
    pub fn read_at(&mut self, offset: u64, len: u32) -> Reply {
        self.request(Command::Read, 0, offset, len, &[]);
        self.reply()
    }

    /// Sends a write and returns its reply.
    pub fn write_at(&mut self, offset: u64, data: &[u8]) -> Reply {
        self.request(Command::Write, 0, offset, data.len() as u32, data);
        self.reply()
    }

    pub fn disconnect(mut self) {
        let _ = self.try_send(
            &RequestHeader {
                flags: 0,
                command: Command::Disc.to_wire(),
                handle: 0,
                offset: 0,
                length: 0,
            }
            .to_bytes(),
        );
    }
}

/// A read error that means the server closed the connection (a reset), not a timeout.
fn is_hang_up(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
    )
}
