//! The kernel's NBD driver, configured through its generic-netlink family `nbd` (as
//! `nbd-client` does): connect sockets to `/dev/nbdN`, replace dead ones, disconnect, and
//! ask which devices are configured. The kernel checks CAP_SYS_ADMIN on every command.
//!
//! Messages are built and parsed here (the layout is `linux/netlink.h`, `linux/genetlink.h`
//! and `linux/nbd-netlink.h`); the socket calls are rustix, so no unsafe code. The calls block
//! (the kernel answers at once, but a CONNECT makes it start reading the device's partition
//! table through the sockets just given): run them off the async runtime.

use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::time::Duration;

use rustix::net::netlink::SocketAddrNetlink;

const NLMSG_HDRLEN: usize = 16;
const GENL_HDRLEN: usize = 4;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLA_F_NESTED: u16 = 0x8000;
const NLA_TYPE_MASK: u16 = 0x3fff;

const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;

const NBD_GENL_VERSION: u8 = 1;
const NBD_CMD_CONNECT: u8 = 1;
const NBD_CMD_DISCONNECT: u8 = 2;
const NBD_CMD_RECONFIGURE: u8 = 3;
const NBD_CMD_STATUS: u8 = 5;

const NBD_ATTR_INDEX: u16 = 1;
const NBD_ATTR_SIZE_BYTES: u16 = 2;
const NBD_ATTR_BLOCK_SIZE_BYTES: u16 = 3;
const NBD_ATTR_TIMEOUT: u16 = 4;
const NBD_ATTR_SERVER_FLAGS: u16 = 5;
const NBD_ATTR_CLIENT_FLAGS: u16 = 6;
const NBD_ATTR_SOCKETS: u16 = 7;
const NBD_ATTR_DEAD_CONN_TIMEOUT: u16 = 8;
const NBD_ATTR_DEVICE_LIST: u16 = 9;
const NBD_ATTR_BACKEND_IDENTIFIER: u16 = 10;
const NBD_DEVICE_ITEM: u16 = 1;
const NBD_DEVICE_INDEX: u16 = 1;
const NBD_DEVICE_CONNECTED: u16 = 2;
const NBD_SOCK_ITEM: u16 = 1;
const NBD_SOCK_FD: u16 = 1;

/// How long a reply from the kernel may take before the call fails.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// A failed netlink call: which command, the kernel's errno, and what to do about it.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct NetlinkError {
    /// The errno the kernel (or the socket call) returned, when there was one.
    pub errno: Option<i32>,
    /// A sentence for the operator.
    pub message: String,
}

impl NetlinkError {
    fn new(errno: Option<i32>, message: impl Into<String>) -> Self {
        Self {
            errno,
            message: message.into(),
        }
    }

    fn os(what: &str, e: rustix::io::Errno) -> Self {
        Self::new(Some(e.raw_os_error()), format!("{what}: {e}"))
    }
}

/// What a CONNECT configures (see `nbd_genl_connect` in the kernel's `drivers/block/nbd.c`).
#[derive(Debug, Clone)]
pub struct ConnectConfig {
    /// Device index (N in /dev/nbdN); the kernel creates the device when it does not exist.
    pub index: u32,
    /// Size in bytes.
    pub size: u64,
    /// Logical and physical block size of the device (a power of two, 512..=page size).
    pub block_size: u64,
    /// Seconds a request may go unanswered before the kernel gives up on its connection and
    /// resends it on another (or after a reconnect); 0 waits for ever.
    pub io_timeout_secs: u64,
    /// Seconds the kernel queues requests while every connection is dead, waiting for a
    /// reconnect, before failing them with EIO; 0 fails them at once.
    pub dead_conn_timeout_secs: u64,
    /// The transmission flags (`NBD_FLAG_*`) the handshake would have sent.
    pub server_flags: u64,
    /// Shown in /sys/block/nbdN/backend; a reconnect must name the same.
    pub backend: String,
}

/// One device the kernel knows about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceState {
    /// N in /dev/nbdN.
    pub index: u32,
    /// Whether it has a configuration (bound to sockets, live or dead).
    pub connected: bool,
}

/// A generic-netlink socket talking to the `nbd` family.
pub struct NbdNetlink {
    fd: OwnedFd,
    family: u16,
    seq: u32,
}

impl NbdNetlink {
    /// Opens the socket and resolves the family; fails with a clear message when the nbd
    /// module is not loaded.
    pub fn open() -> Result<Self, NetlinkError> {
        use rustix::net::{AddressFamily, SocketFlags, SocketType, netlink, sockopt};
        let fd = rustix::net::socket_with(
            AddressFamily::NETLINK,
            SocketType::RAW,
            SocketFlags::CLOEXEC,
            Some(netlink::GENERIC),
        )
        .map_err(|e| NetlinkError::os("cannot open a generic-netlink socket", e))?;
        rustix::net::bind(&fd, &SocketAddrNetlink::new(0, 0))
            .map_err(|e| NetlinkError::os("cannot bind the netlink socket", e))?;
        sockopt::set_socket_timeout(&fd, sockopt::Timeout::Recv, Some(REPLY_TIMEOUT))
            .map_err(|e| NetlinkError::os("cannot set the netlink receive timeout", e))?;
        let mut nl = Self {
            fd,
            family: GENL_ID_CTRL,
            seq: 0,
        };
        let mut a = Attrs::default();
        a.string(CTRL_ATTR_FAMILY_NAME, "nbd");
        let replies = nl
            .call(GENL_ID_CTRL, CTRL_CMD_GETFAMILY, 1, &a)
            .map_err(|e| match e.errno {
                Some(2) => NetlinkError::new(
                    Some(2),
                    "the kernel has no NBD driver loaded (no generic-netlink family \"nbd\"): \
                     run 'modprobe nbd' (or add nbd to /etc/modules-load.d)",
                ),
                _ => e,
            })?;
        let family = replies
            .iter()
            .find_map(|m| find_attr(m, CTRL_ATTR_FAMILY_ID).and_then(ne_u16))
            .ok_or_else(|| NetlinkError::new(None, "the kernel did not say the nbd family's id"))?;
        nl.family = family;
        Ok(nl)
    }

    /// Binds `/dev/nbd{cfg.index}` to `sockets` (one connection each: the kernel spreads
    /// its hardware queues over them). The kernel takes its own reference to each socket:
    /// the caller may close its copies afterwards.
    pub fn connect(
        &mut self,
        cfg: &ConnectConfig,
        sockets: &[BorrowedFd<'_>],
    ) -> Result<u32, NetlinkError> {
        let mut a = Attrs::default();
        a.u32(NBD_ATTR_INDEX, cfg.index);
        a.u64(NBD_ATTR_SIZE_BYTES, cfg.size);
        a.u64(NBD_ATTR_BLOCK_SIZE_BYTES, cfg.block_size);
        a.u64(NBD_ATTR_TIMEOUT, cfg.io_timeout_secs);
        a.u64(NBD_ATTR_DEAD_CONN_TIMEOUT, cfg.dead_conn_timeout_secs);
        a.u64(NBD_ATTR_SERVER_FLAGS, cfg.server_flags);
        // No NBD_CFLAG_DESTROY_ON_DISCONNECT (the device node stays) and no
        // NBD_CFLAG_DISCONNECT_ON_CLOSE (a restarting daemon reconnects instead).
        a.u64(NBD_ATTR_CLIENT_FLAGS, 0);
        a.string(NBD_ATTR_BACKEND_IDENTIFIER, &cfg.backend);
        a.sockets(sockets);
        let replies = self
            .call(self.family, NBD_CMD_CONNECT, NBD_GENL_VERSION, &a)
            .map_err(|e| explain(e, "connect", cfg.index))?;
        Ok(replies
            .iter()
            .find_map(|m| find_attr(m, NBD_ATTR_INDEX).and_then(ne_u32))
            .unwrap_or(cfg.index))
    }

    /// Gives a configured device new sockets in place of dead ones (one dead connection
    /// replaced per socket). The backend must be the one it was connected with.
    pub fn reconfigure(
        &mut self,
        index: u32,
        backend: &str,
        sockets: &[BorrowedFd<'_>],
    ) -> Result<(), NetlinkError> {
        let mut a = Attrs::default();
        a.u32(NBD_ATTR_INDEX, index);
        a.string(NBD_ATTR_BACKEND_IDENTIFIER, backend);
        a.sockets(sockets);
        self.call(self.family, NBD_CMD_RECONFIGURE, NBD_GENL_VERSION, &a)
            .map_err(|e| explain(e, "reconnect", index))?;
        Ok(())
    }

    /// Disconnects a device: the kernel sends NBD_CMD_DISC on every connection, fails what
    /// is still queued, and drops its configuration (the node stays).
    pub fn disconnect(&mut self, index: u32) -> Result<(), NetlinkError> {
        let mut a = Attrs::default();
        a.u32(NBD_ATTR_INDEX, index);
        self.call(self.family, NBD_CMD_DISCONNECT, NBD_GENL_VERSION, &a)
            .map_err(|e| explain(e, "disconnect", index))?;
        Ok(())
    }

    /// The devices the kernel has (one, or all).
    pub fn status(&mut self, index: Option<u32>) -> Result<Vec<DeviceState>, NetlinkError> {
        let mut a = Attrs::default();
        if let Some(i) = index {
            a.u32(NBD_ATTR_INDEX, i);
        }
        let replies = self.call(self.family, NBD_CMD_STATUS, NBD_GENL_VERSION, &a)?;
        let mut out = Vec::new();
        for m in &replies {
            let Some(list) = find_attr(m, NBD_ATTR_DEVICE_LIST) else {
                continue;
            };
            for (t, item) in AttrIter(list) {
                if t != NBD_DEVICE_ITEM {
                    continue;
                }
                let index = AttrIter(item)
                    .find(|(t, _)| *t == NBD_DEVICE_INDEX)
                    .and_then(|(_, v)| ne_u32(v));
                let connected = AttrIter(item)
                    .find(|(t, _)| *t == NBD_DEVICE_CONNECTED)
                    .and_then(|(_, v)| v.first().copied());
                if let Some(index) = index {
                    out.push(DeviceState {
                        index,
                        connected: connected.unwrap_or(0) != 0,
                    });
                }
            }
        }
        out.sort_by_key(|d| d.index);
        Ok(out)
    }

    /// Sends one request and collects the family's replies up to the kernel's ACK.
    fn call(
        &mut self,
        family: u16,
        cmd: u8,
        version: u8,
        attrs: &Attrs,
    ) -> Result<Vec<Vec<u8>>, NetlinkError> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let msg = encode_request(family, seq, cmd, version, &attrs.0);
        rustix::net::sendto(
            &self.fd,
            &msg,
            rustix::net::SendFlags::empty(),
            &SocketAddrNetlink::new(0, 0),
        )
        .map_err(|e| NetlinkError::os("cannot send to the kernel over netlink", e))?;
        let mut replies = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let (n, _) = rustix::net::recv(&self.fd, &mut buf[..], rustix::net::RecvFlags::empty())
                .map_err(|e| {
                    if e == rustix::io::Errno::AGAIN {
                        NetlinkError::new(
                            Some(e.raw_os_error()),
                            format!(
                                "the kernel did not answer a netlink request within {} s",
                                REPLY_TIMEOUT.as_secs()
                            ),
                        )
                    } else {
                        NetlinkError::os("cannot read the kernel's netlink answer", e)
                    }
                })?;
            for m in split_messages(&buf[..n]) {
                if m.seq != seq {
                    continue;
                }
                match m.kind {
                    NLMSG_ERROR => {
                        let code = m
                            .payload
                            .get(..4)
                            .and_then(|b| b.try_into().ok())
                            .map_or(0, i32::from_ne_bytes);
                        if code == 0 {
                            return Ok(replies);
                        }
                        let errno = -code;
                        return Err(NetlinkError::new(
                            Some(errno),
                            format!(
                                "the kernel refused: {}",
                                rustix::io::Errno::from_raw_os_error(errno)
                            ),
                        ));
                    }
                    NLMSG_DONE => return Ok(replies),
                    _ => replies.push(m.payload.get(GENL_HDRLEN..).unwrap_or(&[]).to_vec()),
                }
            }
        }
    }
}

impl std::fmt::Debug for NbdNetlink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdNetlink")
            .field("fd", &self.fd.as_raw_fd())
            .field("family", &self.family)
            .finish()
    }
}

/// Turns the errnos the nbd driver returns into sentences that say what to do.
fn explain(e: NetlinkError, op: &str, index: u32) -> NetlinkError {
    let device = format!("/dev/nbd{index}");
    let name = format!("nbd{index}");
    let message = match e.errno {
        Some(1) => format!(
            "cannot {op} {device}: binding kernel NBD devices needs CAP_SYS_ADMIN (run the \
             daemon as root, or give its unit AmbientCapabilities=CAP_SYS_ADMIN)"
        ),
        Some(16) => format!(
            "cannot {op} {device}: it is already in use by another NBD client (see \
             /sys/block/{name}/pid and backend); choose another device or --device auto"
        ),
        Some(22) if op == "reconnect" => {
            let backend = std::fs::read_to_string(format!("/sys/block/{name}/backend"))
                .map(|s| s.trim().to_owned())
                .unwrap_or_default();
            if backend.is_empty() {
                format!("cannot {op} {device}: the kernel has no configuration to reconnect")
            } else {
                format!("cannot {op} {device}: it is bound to \"{backend}\", not to this volume")
            }
        }
        Some(28) if op == "reconnect" => format!(
            "cannot {op} {device}: none of its connections is dead (another process serves it)"
        ),
        _ => format!("cannot {op} {device}: {}", e.message),
    };
    NetlinkError::new(e.errno, message)
}

/// Attributes being built (each 4-byte aligned, as netlink wants).
#[derive(Default)]
struct Attrs(Vec<u8>);

impl Attrs {
    fn put(&mut self, kind: u16, value: &[u8]) {
        let len = u16::try_from(4 + value.len()).unwrap_or(u16::MAX);
        self.0.extend_from_slice(&len.to_ne_bytes());
        self.0.extend_from_slice(&kind.to_ne_bytes());
        self.0.extend_from_slice(value);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.0.len().is_multiple_of(4) {
            self.0.push(0);
        }
    }

    fn u32(&mut self, kind: u16, v: u32) {
        self.put(kind, &v.to_ne_bytes());
    }

    fn u64(&mut self, kind: u16, v: u64) {
        self.put(kind, &v.to_ne_bytes());
    }

    fn string(&mut self, kind: u16, s: &str) {
        let mut v = s.as_bytes().to_vec();
        v.push(0);
        self.put(kind, &v);
    }

    /// Opens a nested attribute; returns where its length goes.
    fn nest(&mut self, kind: u16) -> usize {
        let at = self.0.len();
        self.0.extend_from_slice(&0u16.to_ne_bytes());
        self.0
            .extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
        at
    }

    fn end_nest(&mut self, at: usize) {
        let len = u16::try_from(self.0.len() - at).unwrap_or(u16::MAX);
        self.0[at..at + 2].copy_from_slice(&len.to_ne_bytes());
    }

    /// NBD_ATTR_SOCKETS { NBD_SOCK_ITEM { NBD_SOCK_FD } ... }.
    fn sockets(&mut self, fds: &[BorrowedFd<'_>]) {
        let outer = self.nest(NBD_ATTR_SOCKETS);
        for fd in fds {
            let item = self.nest(NBD_SOCK_ITEM);
            self.u32(
                NBD_SOCK_FD,
                u32::try_from(fd.as_raw_fd()).unwrap_or(u32::MAX),
            );
            self.end_nest(item);
        }
        self.end_nest(outer);
    }
}

fn encode_request(family: u16, seq: u32, cmd: u8, version: u8, attrs: &[u8]) -> Vec<u8> {
    let len = NLMSG_HDRLEN + GENL_HDRLEN + attrs.len();
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_ne_bytes());
    m.extend_from_slice(&family.to_ne_bytes());
    m.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(&[cmd, version, 0, 0]);
    m.extend_from_slice(attrs);
    m
}

/// One netlink message of a datagram.
struct Message<'a> {
    kind: u16,
    seq: u32,
    payload: &'a [u8],
}

/// The messages of a datagram; stops at the first malformed header.
fn split_messages(mut buf: &[u8]) -> Vec<Message<'_>> {
    let mut out = Vec::new();
    while buf.len() >= NLMSG_HDRLEN {
        let len = u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        if len < NLMSG_HDRLEN || len > buf.len() {
            break;
        }
        out.push(Message {
            kind: u16::from_ne_bytes([buf[4], buf[5]]),
            seq: u32::from_ne_bytes([buf[8], buf[9], buf[10], buf[11]]),
            payload: &buf[NLMSG_HDRLEN..len],
        });
        let next = len.div_ceil(4) * 4;
        buf = buf.get(next..).unwrap_or(&[]);
    }
    out
}

/// The attributes of a payload (type without flags, value).
struct AttrIter<'a>(&'a [u8]);

impl<'a> Iterator for AttrIter<'a> {
    type Item = (u16, &'a [u8]);
    fn next(&mut self) -> Option<Self::Item> {
        let b = self.0;
        if b.len() < 4 {
            return None;
        }
        let len = usize::from(u16::from_ne_bytes([b[0], b[1]]));
        if len < 4 || len > b.len() {
            self.0 = &[];
            return None;
        }
        let kind = u16::from_ne_bytes([b[2], b[3]]) & NLA_TYPE_MASK;
        let value = &b[4..len];
        self.0 = b.get(len.div_ceil(4) * 4..).unwrap_or(&[]);
        Some((kind, value))
    }
}

fn find_attr(payload: &[u8], kind: u16) -> Option<&[u8]> {
    AttrIter(payload).find(|(t, _)| *t == kind).map(|(_, v)| v)
}

fn ne_u16(v: &[u8]) -> Option<u16> {
    Some(u16::from_ne_bytes(v.get(..2)?.try_into().ok()?))
}

fn ne_u32(v: &[u8]) -> Option<u32> {
    Some(u32::from_ne_bytes(v.get(..4)?.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_are_aligned_and_nested() {
        let mut a = Attrs::default();
        a.string(NBD_ATTR_BACKEND_IDENTIFIER, "ab");
        a.u64(NBD_ATTR_SIZE_BYTES, 1 << 30);
        let outer = a.nest(NBD_ATTR_SOCKETS);
        let item = a.nest(NBD_SOCK_ITEM);
        a.u32(NBD_SOCK_FD, 7);
        a.end_nest(item);
        a.end_nest(outer);
        assert!(a.0.len().is_multiple_of(4));
        let attrs: Vec<_> = AttrIter(&a.0).collect();
        assert_eq!(attrs.len(), 3);
        assert_eq!(attrs[0], (NBD_ATTR_BACKEND_IDENTIFIER, &b"ab\0"[..]));
        assert_eq!(attrs[1].1, (1u64 << 30).to_ne_bytes());
        let sockets = find_attr(&a.0, NBD_ATTR_SOCKETS).expect("sockets");
        let item = find_attr(sockets, NBD_SOCK_ITEM).expect("item");
        assert_eq!(find_attr(item, NBD_SOCK_FD).and_then(ne_u32), Some(7));
        // The nested flag is set on the wire and masked when read.
        assert_eq!(
            u16::from_ne_bytes([a.0[22], a.0[23]]) & NLA_F_NESTED,
            NLA_F_NESTED
        );
    }

    #[test]
    fn replies_are_split_and_truncated_input_is_safe() {
        let mut a = Attrs::default();
        a.u32(NBD_ATTR_INDEX, 3);
        let mut buf = encode_request(0x22, 9, NBD_CMD_CONNECT, 1, &a.0);
        let ack = {
            let mut m = Vec::new();
            m.extend_from_slice(&(NLMSG_HDRLEN as u32 + 4).to_ne_bytes());
            m.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
            m.extend_from_slice(&0u16.to_ne_bytes());
            m.extend_from_slice(&9u32.to_ne_bytes());
            m.extend_from_slice(&0u32.to_ne_bytes());
            m.extend_from_slice(&(-16i32).to_ne_bytes());
            m
        };
        buf.extend_from_slice(&ack);
        let msgs = split_messages(&buf);
        assert_eq!(msgs.len(), 2);
        assert_eq!(msgs[0].kind, 0x22);
        assert_eq!(
            find_attr(&msgs[0].payload[GENL_HDRLEN..], NBD_ATTR_INDEX).and_then(ne_u32),
            Some(3)
        );
        assert_eq!(msgs[1].kind, NLMSG_ERROR);
        for cut in 0..buf.len() {
            let _ = split_messages(&buf[..cut]);
            let _: Vec<_> = AttrIter(&buf[..cut]).collect();
        }
        // A length that points past the end, or below the header size, stops the walk.
        let mut bad = buf.clone();
        bad[0..4].copy_from_slice(&1000u32.to_ne_bytes());
        assert!(split_messages(&bad).is_empty());
        bad[0..4].copy_from_slice(&3u32.to_ne_bytes());
        assert!(split_messages(&bad).is_empty());
    }
}
