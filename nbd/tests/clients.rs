//! The server against real NBD clients: nbdinfo, nbdcopy, nbdsh (libnbd), qemu-img, qemu-io
//! and fio. A missing tool fails the test, naming the Debian package to install.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

mod support;

use std::sync::Arc;

use nbd::Limits;
use support::raw::RawClient;
use support::{MemDevice, MemRegistry, TestServer, command, nbdsh, pattern, run, stdout, tool};

const MIB: u64 = 1 << 20;

struct Disks {
    disk: Arc<MemDevice>,
}

/// "disk": 64 MiB, minimum 1, preferred 4096 (the default export).
/// "ro": 16 MiB read-only. "d512": 16 MiB with minimum 512 and maximum 1 MiB.
fn server_with(tcp: bool) -> (TestServer, Disks) {
    let reg = MemRegistry::new();
    let disk = Arc::new(MemDevice::new(64 * MIB));
    reg.add("disk", "64 MiB test disk", disk.clone());
    reg.add(
        "ro",
        "read-only disk",
        Arc::new(MemDevice::with(16 * MIB, 1, 4096, 32 << 20, true)),
    );
    reg.add(
        "d512",
        "512-byte sectors",
        Arc::new(MemDevice::with(16 * MIB, 512, 4096, 1 << 20, false)),
    );
    reg.set_default("disk");
    (
        TestServer::start_with(reg, Limits::default(), tcp),
        Disks { disk },
    )
}

fn server() -> (TestServer, Disks) {
    server_with(false)
}

fn field<'a>(text: &'a str, key: &str) -> &'a str {
    text.lines()
        .find_map(|l| l.trim().strip_prefix(key).and_then(|r| r.strip_prefix(':')))
        .map(str::trim)
        .unwrap_or_else(|| panic!("no `{key}` in:\n{text}"))
}

#[test]
fn nbdinfo_reports_size_flags_block_sizes_and_base_allocation() {
    let nbdinfo = tool("nbdinfo", "libnbd-bin");
    let (ts, _) = server();
    let out = stdout(&run(command(&nbdinfo).arg(ts.uri("disk"))));
    assert!(out.contains("newstyle-fixed"), "{out}");
    assert!(out.contains("using structured packets"), "{out}");
    assert_eq!(field(&out, "export-size"), "67108864 (64M)");
    assert_eq!(field(&out, "description"), "64 MiB test disk");
    assert!(out.contains("base:allocation"), "{out}");
    for yes in [
        "can_cache",
        "can_df",
        "can_fast_zero",
        "can_flush",
        "can_fua",
        "can_multi_conn",
        "can_trim",
        "can_zero",
    ] {
        assert_eq!(field(&out, yes), "true", "{yes} in\n{out}");
    }
    assert_eq!(field(&out, "is_read_only"), "false");
    assert_eq!(field(&out, "block_size_minimum"), "1");
    assert_eq!(field(&out, "block_size_preferred"), "4096");
    assert_eq!(field(&out, "block_size_maximum"), "33554432");

    let out = stdout(&run(command(&nbdinfo).arg(ts.uri("ro"))));
    assert_eq!(field(&out, "is_read_only"), "true");
    // Read-only: nothing that modifies the export is advertised.
    for no in ["can_trim", "can_zero", "can_fast_zero"] {
        assert_eq!(field(&out, no), "false", "{no} in\n{out}");
    }
    assert_eq!(field(&out, "export-size"), "16777216 (16M)");

    let out = stdout(&run(command(&nbdinfo).arg(ts.uri("d512"))));
    assert_eq!(field(&out, "block_size_minimum"), "512");
    assert_eq!(field(&out, "block_size_maximum"), "1048576");

    // The empty name is the default export.
    let out = stdout(&run(command(&nbdinfo)
        .arg("--size")
        .arg(format!("nbd+unix:///?socket={}", ts.socket.display()))));
    assert_eq!(out.trim(), "67108864");
}

#[test]
fn nbdinfo_list_shows_every_export() {
    let nbdinfo = tool("nbdinfo", "libnbd-bin");
    let (ts, _) = server();
    let out = stdout(&run(command(&nbdinfo).arg("--list").arg(ts.uri(""))));
    for (name, desc) in [
        ("disk", "64 MiB test disk"),
        ("ro", "read-only disk"),
        ("d512", "512-byte sectors"),
    ] {
        assert!(out.contains(&format!("export=\"{name}\"")), "{out}");
        assert!(out.contains(desc), "{out}");
    }
}

#[test]
fn nbdinfo_map_shows_allocation() {
    let nbdinfo = tool("nbdinfo", "libnbd-bin");
    let (ts, _) = server();
    let mut c = RawClient::open(&ts.socket, "disk", true);
    assert_eq!(c.write_at(MIB, &pattern(1, 2 * MIB as usize)).error, 0);
    c.disconnect();
    let out = stdout(&run(command(&nbdinfo).arg("--map").arg(ts.uri("disk"))));
    let rows: Vec<(u64, u64, u32)> = out
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (
                f[0].parse().unwrap(),
                f[1].parse().unwrap(),
                f[2].parse().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        rows,
        [(0, MIB, 3), (MIB, 2 * MIB, 0), (3 * MIB, 61 * MIB, 3)],
        "{out}"
    );
}

fn copy_roundtrip(connections: u32) {
    let nbdcopy = tool("nbdcopy", "libnbd-bin");
    let (ts, d) = server();
    let len = 64 * MIB as usize;
    let data = pattern(u64::from(connections), len);
    let src = ts.dir.path().join("src.img");
    let back = ts.dir.path().join("back.img");
    std::fs::write(&src, &data).unwrap();
    let conns = format!("--connections={connections}");
    run(command(&nbdcopy)
        .args([conns.as_str(), "--flush"])
        .arg(&src)
        .arg(ts.uri("disk")));
    assert!(d.disk.contents() == data, "device differs after nbdcopy");
    assert!(d.disk.flushes.load(std::sync::atomic::Ordering::SeqCst) > 0);
    run(command(&nbdcopy).arg(&conns).arg(ts.uri("disk")).arg(&back));
    assert!(std::fs::read(&back).unwrap() == data, "read back differs");
}

#[test]
fn nbdcopy_roundtrip_one_connection() {
    copy_roundtrip(1);
}

#[test]
fn nbdcopy_roundtrip_four_connections() {
    copy_roundtrip(4);
}

#[test]
fn qemu_img_convert_and_compare() {
    let qemu_img = tool("qemu-img", "qemu-utils");
    let (ts, _) = server();
    let src = ts.dir.path().join("q.img");
    let mut data = pattern(9, 16 * MIB as usize);
    data[5 * MIB as usize..9 * MIB as usize].fill(0); // a zero run qemu may write as zeroes
    std::fs::write(&src, &data).unwrap();
    run(command(&qemu_img)
        .args(["convert", "-n", "-f", "raw", "-O", "raw"])
        .arg(&src)
        .arg(ts.uri("d512")));
    run(command(&qemu_img)
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&src)
        .arg(ts.uri("d512")));
}

#[test]
fn qemu_io_unaligned_patterns() {
    let qemu_io = tool("qemu-io", "qemu-utils");
    let (ts, _) = server();
    // On "disk" (minimum 1) qemu sends the unaligned requests as they are; on "d512" it
    // aligns them itself with read-modify-write, as the advertised minimum requires.
    for export in ["disk", "d512"] {
        let out = run(command(&qemu_io).args([
            "-f",
            "raw",
            &ts.uri(export),
            "-c",
            "write -P 0xab 1000 3000",
            "-c",
            "write -P 0xcd 4095 2",
            "-c",
            "write -P 0x11 65535 131073",
            "-c",
            "write -z 70000 1000",
            "-c",
            "read -P 0xab 1000 3000",
            "-c",
            "read -P 0xcd 4095 2",
            "-c",
            "read -P 0x11 65535 4465",
            "-c",
            "read -P 0 70000 1000",
            "-c",
            "read -P 0x11 71000 125608",
            "-c",
            "aio_write -P 0x77 300001 4097",
            "-c",
            "aio_flush",
            "-c",
            "read -P 0x77 300001 4097",
            "-c",
            "read -P 0 0 1000",
        ]));
        let text = format!("{}{}", stdout(&out), String::from_utf8_lossy(&out.stderr));
        assert!(
            !text.contains("fail") && !text.contains("error"),
            "{export}: {text}"
        );
        assert_eq!(text.matches("read ").count(), 7, "{export}: {text}");
    }
}

#[test]
fn nbdsh_hostile_requests() {
    let nbdsh = nbdsh();
    let (ts, _) = server();
    let script = r#"
import errno, os
import nbd

def expect_err(fn, code, what):
    try:
        fn()
    except nbd.Error as e:
        # libnbd gives the errno's name, e.g. "EINVAL"
        names = [n for n in dir(errno) if n.startswith("E") and getattr(errno, n) == code]
        assert e.errno in names, "%s: %s (%s), expected %s" % (what, e.errno, e.string, names)
        return
    raise AssertionError("%s: succeeded, expected errno %s" % (what, code))

def handle(uri, contexts=()):
    h = nbd.NBD()
    h.set_strict_mode(0)  # send what the server must refuse
    for c in contexts:
        h.add_meta_context(c)
    h.connect_uri(uri)
    return h

h = handle(os.environ["DISK"], ["base:allocation", "x-unknown:thing", "qemu:dirty-bitmap:x"])
size = h.get_size()
assert h.can_meta_context("base:allocation")
assert not h.can_meta_context("x-unknown:thing")
assert not h.can_meta_context("qemu:dirty-bitmap:x")
assert h.can_fast_zero() and h.can_df() and h.can_multi_conn() and h.can_cache()

expect_err(lambda: h.pread(1024, size - 512), errno.EINVAL, "read past the end")
expect_err(lambda: h.pwrite(b"x" * 1024, size - 512), errno.ENOSPC, "write past the end")
expect_err(lambda: h.zero(1024, size - 512), errno.ENOSPC, "write zeroes past the end")
expect_err(lambda: h.trim(1024, size - 512), errno.EINVAL, "trim past the end")
expect_err(lambda: h.cache(1024, size - 512), errno.EINVAL, "cache past the end")
expect_err(lambda: h.block_status(1024, size, lambda *a: 0), errno.EINVAL, "block status past the end")
expect_err(lambda: h.pread(512, 2**63), errno.EINVAL, "offset overflow")
expect_err(lambda: h.zero(4096, 0, nbd.CMD_FLAG_FAST_ZERO), errno.ENOTSUP, "fast zero")
expect_err(lambda: h.pread(512, 0, 0x80), errno.EINVAL, "unknown command flag")
expect_err(lambda: h.pwrite(b"x" * 512, 0, nbd.CMD_FLAG_REQ_ONE), errno.EINVAL, "flag of another command")

# The session is intact after every refusal.
data = os.urandom(65536)
h.pwrite(data, 1 << 20, nbd.CMD_FLAG_FUA)
assert h.pread(65536, 1 << 20, nbd.CMD_FLAG_DF) == data
h.flush()
entries = []
def cb(ctx, offset, e, err):
    if ctx == "base:allocation":
        entries.extend(e)
    return 0
h.block_status(4 << 20, 0, cb)
assert entries[:4] == [1 << 20, 3, 65536, 0], entries
entries.clear()
h.block_status(4 << 20, 0, cb, nbd.CMD_FLAG_REQ_ONE)
assert len(entries) == 2 and entries[0] <= 4 << 20, entries
h.zero(65536, 1 << 20, nbd.CMD_FLAG_NO_HOLE)
assert h.pread(65536, 1 << 20) == bytes(65536)
h.pwrite(data, 1 << 20)
h.zero(65536, 1 << 20)
assert h.pread(65536, 1 << 20) == bytes(65536)
h.pwrite(data, 1 << 20)
h.trim(65536, 1 << 20)
h.cache(65536, 0)
assert h.pread(512, size - 512) == bytes(512)
h.shutdown()

ro = handle(os.environ["RO"])
assert ro.is_read_only()
expect_err(lambda: ro.pwrite(b"x" * 512, 0), errno.EPERM, "write to a read-only export")
expect_err(lambda: ro.trim(512, 0), errno.EPERM, "trim on a read-only export")
expect_err(lambda: ro.zero(512, 0), errno.EPERM, "zero on a read-only export")
assert ro.pread(512, 0) == bytes(512)
ro.shutdown()

a = handle(os.environ["D512"])
assert a.get_block_size(nbd.SIZE_MINIMUM) == 512
assert a.get_block_size(nbd.SIZE_MAXIMUM) == 1 << 20
expect_err(lambda: a.pread(100, 0), errno.EINVAL, "misaligned length")
expect_err(lambda: a.pwrite(b"x" * 512, 100), errno.EINVAL, "misaligned offset")
expect_err(lambda: a.pread(2 << 20, 0), errno.EINVAL, "over the maximum block size")
expect_err(lambda: a.block_status(512, 0, lambda *x: 0), errno.EINVAL, "block status without a context")
assert a.pread(512, 512) == bytes(512)
a.shutdown()
print("nbdsh checks passed")
"#;
    let out = run(command(&nbdsh)
        .arg("-c")
        .arg(script)
        .env("DISK", ts.uri("disk"))
        .env("RO", ts.uri("ro"))
        .env("D512", ts.uri("d512")));
    assert!(stdout(&out).contains("nbdsh checks passed"));
}

#[test]
fn fio_random_rw_with_verify() {
    let fio = tool("fio", "fio");
    let (ts, _) = server();
    let uri = ts.uri("disk");
    let out = run(command(&fio).args([
        "--name=nbdrw",
        "--ioengine=nbd",
        &format!("--uri={uri}"),
        "--rw=randrw",
        "--bs=4k",
        "--iodepth=32",
        "--numjobs=4",
        "--size=8m",
        "--offset_increment=16m",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
        "--group_reporting",
    ]));
    let text = stdout(&out);
    assert!(text.contains("err= 0"), "{text}");
    assert!(!text.contains("verify:"), "{text}");
}

#[test]
fn tcp_listener_serves_real_clients() {
    let nbdinfo = tool("nbdinfo", "libnbd-bin");
    let qemu_img = tool("qemu-img", "qemu-utils");
    let (ts, _) = server_with(true);
    let out = stdout(&run(command(&nbdinfo).arg(ts.tcp_uri("disk"))));
    assert_eq!(field(&out, "export-size"), "67108864 (64M)");
    let src = ts.dir.path().join("t.img");
    std::fs::write(&src, pattern(5, 8 * MIB as usize)).unwrap();
    run(command(&qemu_img)
        .args(["convert", "-n", "-f", "raw", "-O", "raw"])
        .arg(&src)
        .arg(ts.tcp_uri("d512")));
    run(command(&qemu_img)
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&src)
        .arg(ts.tcp_uri("d512")));
}
