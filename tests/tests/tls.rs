//! NBD over TLS (issue 14), with real clients: libnbd's nbdinfo and nbdcopy (GnuTLS) and
//! qemu-img, against certificates the test makes with openssl (tests/src/pki.rs). Each bad
//! client is refused while a good one goes on being served.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use e2e_tests::daemon::{Daemon, cryptnbd_bin, nbdcopy, nbdinfo};
use e2e_tests::pki::Pki;
use e2e_tests::{TestDir, require_tool, run};

/// A daemon with a TCP listener on loopback in TLS `mode`, serving `pki`'s certificates.
fn tls_daemon(dir: &TestDir, pki: &Pki, mode: &str, extra: &str) -> Daemon {
    Daemon::start(
        dir,
        &format!(
            "[nbd]\ntcp = \"127.0.0.1:0\"\n[nbd.tls]\nmode = \"{mode}\"\ncertificates = \"{}\"\n{extra}",
            pki.server.display()
        ),
    )
}

/// A daemon in TLS `mode` (with `extra` config) serving a 16 MiB volume `vol` on TCP, with
/// a client `host1` of its CA.
struct Served {
    dir: TestDir,
    pki: Pki,
    host1: std::path::PathBuf,
    d: Daemon,
    uri: String,
}

fn served(label: &str, mode: &str, extra: &str) -> Served {
    let dir = TestDir::new(label);
    let pki = Pki::new(&dir, "main");
    let host1 = pki.client("host1", "/O=Example/CN=host1.example.com");
    let d = tls_daemon(&dir, &pki, mode, extra);
    d.ctl.create_key("e2e");
    d.ctl.create_volume("vol", "16M", "alias/e2e", 4096, &[]);
    let uri = attach_tcp(&d, "vol", &[]);
    Served {
        dir,
        pki,
        host1,
        d,
        uri,
    }
}

/// Attaches `volume` on TCP (with `flags`) and returns its TCP URI.
fn attach_tcp(d: &Daemon, volume: &str, flags: &[&str]) -> String {
    let mut args = vec!["--json", "attach", volume, "--tcp"];
    args.extend_from_slice(flags);
    let a = d.ctl.run(&args).assert_success().json();
    a["uris"][1].as_str().expect("a TCP URI").to_owned()
}

/// `uri` with the client certificate directory `certs` (libnbd's query parameter).
fn with_certs(uri: &str, certs: &std::path::Path) -> String {
    format!("{uri}?tls-certificates={}", certs.display())
}

/// Whether nbdinfo opens `uri` with the client certificates in `certs`.
fn opens(uri: &str, certs: &std::path::Path) -> bool {
    run(Command::new(nbdinfo()).arg(with_certs(uri, certs))).code == Some(0)
}

/// The daemon's audit trail, as text.
fn audit_trail(d: &Daemon) -> String {
    std::fs::read_to_string(d.state_dir.join("audit").join("audit.jsonl")).expect("audit")
}

/// The one session that a `tls reload` or `tls allow` answer `r` says it cut, after checking
/// `checked` sessions: it must be `subject`'s.
fn the_one_cut<'a>(r: &'a serde_json::Value, checked: u64, subject: &str) -> &'a serde_json::Value {
    assert_eq!(r["sessions_checked"], checked, "{r}");
    let cut = r["disconnected"].as_array().expect("disconnected");
    assert_eq!(cut.len(), 1, "{r}");
    assert_eq!(cut[0]["certificate"], subject, "{r}");
    &cut[0]
}

fn port_of(uri: &str) -> u16 {
    let hostport = uri
        .split("://")
        .nth(1)
        .and_then(|r| r.split('/').next())
        .expect("host");
    hostport
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("port")
}

/// An nbdsh that opens `uri` with the certificates in `certs` and holds the connection until
/// killed.
fn hold_tls(uri: &str, certs: &std::path::Path) -> std::process::Child {
    e2e_tests::daemon::hold_connection(&with_certs(uri, certs))
}

/// The certificate subjects of `volume`'s live connections, once there are `n` of them.
fn wait_sessions(d: &Daemon, volume: &str, n: usize) -> Vec<String> {
    let mut dns: Vec<String> = e2e_tests::daemon::wait_connections(d, volume, n)
        .iter()
        .map(|c| c["certificate"].as_str().unwrap_or("(no TLS)").to_owned())
        .collect();
    dns.sort();
    dns
}

/// The export names `nbdinfo --list` shows at `uri`, sorted.
fn export_names(uri: &str) -> Vec<String> {
    let l = run(Command::new(nbdinfo()).args(["--list", "--json", uri]))
        .assert_success()
        .json();
    let mut names: Vec<String> = l["exports"]
        .as_array()
        .expect("exports")
        .iter()
        .filter_map(|e| e["export-name"].as_str().map(str::to_owned))
        .collect();
    names.sort();
    names
}

fn nbdinfo_ok(uri: &str) -> serde_json::Value {
    run(Command::new(nbdinfo()).args(["--json", uri]))
        .assert_success()
        .json()
}

#[test]
fn require_mode_serves_libnbd_and_qemu_over_tls_and_refuses_plaintext() {
    let dir = TestDir::new("tls-require");
    let pki = Pki::new(&dir, "main");
    let client = pki.client("host1", "/O=Example/CN=host1.example.com");
    let d = tls_daemon(&dir, &pki, "require", "");
    d.ctl.create_key("e2e");
    d.ctl.create_volume("vol", "256M", "alias/e2e", 4096, &[]);
    let uri = attach_tcp(&d, "vol", &[]);
    assert!(uri.starts_with("nbds://127.0.0.1:"), "{uri}");

    // nbdinfo over TLS shows the export; --list over TLS lists it.
    let info = nbdinfo_ok(&with_certs(&uri, &client));
    assert_eq!(info["exports"][0]["export-size"], 256 << 20, "{info}");
    assert_eq!(
        export_names(&with_certs(&uri.replace("/vol", "/"), &client)),
        ["vol"]
    );

    // Plaintext against a require-mode listener fails.
    let plain = uri.replace("nbds://", "nbd://");
    let refused = run(Command::new(nbdinfo()).arg(&plain));
    assert_ne!(refused.code, Some(0), "a plaintext client was served");

    // 256 MiB round trip with nbdcopy over nbds://.
    let data: Vec<u8> = (0..256u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let src = dir.join("src.img");
    std::fs::write(&src, &data).expect("write");
    let started = Instant::now();
    run(Command::new(nbdcopy())
        .arg(&src)
        .arg(with_certs(&uri, &client)))
    .assert_success();
    let back = dir.join("back.img");
    run(Command::new(nbdcopy())
        .arg(with_certs(&uri, &client))
        .arg(&back))
    .assert_success();
    eprintln!(
        "256 MiB nbdcopy there and back over TLS: {:?}",
        started.elapsed()
    );
    assert!(
        std::fs::read(&back).expect("read") == data,
        "the copy over TLS differs"
    );

    // qemu-img with x509 credentials: info, convert, compare.
    let qemu_img = require_tool("qemu-img", "qemu-utils");
    let port = port_of(&uri);
    let object = format!(
        "tls-creds-x509,id=tls0,endpoint=client,dir={}",
        client.display()
    );
    let image = format!(
        "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},export=vol,tls-creds=tls0"
    );
    let info =
        run(Command::new(&qemu_img).args(["info", "--object", &object, "--image-opts", &image]))
            .assert_success()
            .stdout_text();
    assert!(info.contains("256 MiB"), "{info}");
    run(Command::new(&qemu_img).args([
        "compare",
        "--object",
        &object,
        "--image-opts",
        &image,
        &format!("driver=raw,file.filename={}", src.display()),
    ]))
    .assert_success();
    let converted = dir.join("converted.img");
    run(Command::new(&qemu_img)
        .args([
            "convert",
            "--object",
            &object,
            "--image-opts",
            &image,
            "-O",
            "raw",
        ])
        .arg(&converted))
    .assert_success();
    assert!(
        std::fs::read(&converted).expect("read") == data,
        "qemu-img convert over TLS differs"
    );

    // qemu-nbd -L with TLS credentials lists the export.
    let qemu_nbd = require_tool("qemu-nbd", "qemu-utils");
    let listed = run(Command::new(qemu_nbd).args([
        "-L",
        "-b",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "--object",
        &object,
        "--tls-creds",
        "tls0",
    ]))
    .assert_success()
    .stdout_text();
    assert!(listed.contains("vol"), "{listed}");
    d.stop();
}

#[test]
fn untrusted_expired_revoked_and_missing_client_certificates_are_refused() {
    let Served {
        dir,
        pki,
        host1: good,
        d,
        uri,
    } = served("tls-bad-clients", "require", "");
    let other = Pki::new(&dir, "other");
    let revoked = pki.client("revoked", "/CN=revoked.example.com");
    pki.revoke(&revoked);
    let expired = pki.expired_client("expired", "/CN=expired.example.com");
    let foreign = other.client("foreign", "/CN=good.example.com");
    // The foreign client trusts our server's CA, so only its own certificate is wrong.
    std::fs::copy(good.join("ca-cert.pem"), foreign.join("ca-cert.pem")).expect("copy");
    let anonymous = pki.anonymous_client();
    // The daemon started before the revocation: it reads the new CRL.
    d.ctl.run(&["tls", "reload"]).assert_success();
    nbdinfo_ok(&with_certs(&uri, &good));
    for (what, certs) in [
        ("another CA's certificate", &foreign),
        ("an expired certificate", &expired),
        ("a revoked certificate", &revoked),
        ("no certificate", &anonymous),
    ] {
        let out = run(Command::new(nbdinfo()).arg(with_certs(&uri, certs)));
        assert_ne!(out.code, Some(0), "a client with {what} was served");
        // The daemon goes on serving the good client.
        nbdinfo_ok(&with_certs(&uri, &good));
    }
    // Every refusal is audited, with the address and the rejected certificate's subject.
    let audit = audit_trail(&d);
    let refusals: Vec<&str> = audit
        .lines()
        .filter(|l| l.contains("\"nbd-tls\""))
        .collect();
    for who in [
        "certificate CN=expired.example.com",
        "certificate CN=revoked.example.com",
        "certificate none",
    ] {
        assert!(
            refusals
                .iter()
                .any(|l| l.contains(who) && l.contains("refused tcp 127.0.0.1:")),
            "no audit record of the refusal of {who}: {refusals:#?}"
        );
    }
    let log = d.stop();
    assert!(log.contains("TLS handshake refused"), "{log}");
}

#[test]
fn on_mode_keeps_tls_only_exports_behind_tls() {
    let dir = TestDir::new("tls-on");
    let pki = Pki::new(&dir, "main");
    let client = pki.client("host1", "/CN=host1.example.com");
    let d = tls_daemon(&dir, &pki, "on", "");
    d.ctl.create_key("e2e");
    d.ctl.create_volume("open", "16M", "alias/e2e", 4096, &[]);
    d.ctl.create_volume("secret", "16M", "alias/e2e", 4096, &[]);
    let open = attach_tcp(&d, "open", &[]);
    let secret = attach_tcp(&d, "secret", &["--tls-only"]);
    let status = d
        .ctl
        .run(&["--json", "status", "secret"])
        .assert_success()
        .json();
    assert_eq!(status["attachments"][0]["tls_only"], true, "{status}");

    // Plaintext: the open export is served and listed; the TLS-only one is neither.
    let plain = |u: &str| u.replace("nbds://", "nbd://");
    nbdinfo_ok(&plain(&open));
    let refused = run(Command::new(nbdinfo()).arg(plain(&secret)));
    assert_ne!(
        refused.code,
        Some(0),
        "a TLS-only export was served in plaintext"
    );
    // What the server answered: NBD_REP_ERR_TLS_REQD to NBD_OPT_INFO (libnbd words it as
    // "Operation not supported").
    let mut r = Raw::connect(port_of(&secret));
    r.option(OPT_INFO, &info_request("secret"));
    assert_eq!(r.reply(OPT_INFO), REP_ERR_TLS_REQD);
    let listed = |u: String| export_names(&u);
    assert_eq!(listed(plain(&open).replace("/open", "/")), ["open"]);
    // Over TLS: both.
    nbdinfo_ok(&with_certs(&secret, &client));
    assert_eq!(
        listed(with_certs(&open.replace("/open", "/"), &client)),
        ["open", "secret"]
    );
    d.stop();
}

/// Sends an option (over the socket or over TLS).
fn send_option(w: &mut impl Write, option: u32, data: &[u8]) {
    let mut m = Vec::new();
    m.extend_from_slice(&OPT_MAGIC.to_be_bytes());
    m.extend_from_slice(&option.to_be_bytes());
    m.extend_from_slice(&(data.len() as u32).to_be_bytes());
    m.extend_from_slice(data);
    w.write_all(&m).expect("option");
    w.flush().expect("flush");
}

/// The next reply's type (its data read and dropped).
fn read_reply(r: &mut impl Read, option: u32) -> u32 {
    let mut h = [0u8; 20];
    r.read_exact(&mut h).expect("reply header");
    let be32 = |at: usize| u32::from_be_bytes([h[at], h[at + 1], h[at + 2], h[at + 3]]);
    assert_eq!((u64::from(be32(0)) << 32) | u64::from(be32(4)), REP_MAGIC);
    assert_eq!(be32(8), option);
    let mut data = vec![0u8; be32(16) as usize];
    r.read_exact(&mut data).expect("reply data");
    be32(12)
}

/// NBD_OPT_INFO data for `export` (no information requests).
fn info_request(export: &str) -> Vec<u8> {
    let mut info = Vec::new();
    info.extend_from_slice(&(export.len() as u32).to_be_bytes());
    info.extend_from_slice(export.as_bytes());
    info.extend_from_slice(&0u16.to_be_bytes());
    info
}

/// A raw NBD client for what no real client does on purpose: the newstyle greeting read,
/// client flags sent, then options written by hand.
struct Raw(TcpStream);

const OPT_MAGIC: u64 = 0x4948_4156_454F_5054;
const REP_MAGIC: u64 = 0x0003_e889_0455_65a9;
const OPT_STARTTLS: u32 = 5;
const OPT_LIST: u32 = 3;
const OPT_INFO: u32 = 6;
const REP_ACK: u32 = 1;
const REP_ERR_POLICY: u32 = 0x8000_0002;
const REP_ERR_INVALID: u32 = 0x8000_0003;
const REP_ERR_TLS_REQD: u32 = 0x8000_0005;

impl Raw {
    fn connect(port: u16) -> Self {
        let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        let mut greeting = [0u8; 18];
        s.read_exact(&mut greeting).expect("greeting");
        assert_eq!(&greeting[..8], b"NBDMAGIC");
        s.write_all(&1u32.to_be_bytes()).expect("client flags"); // FIXED_NEWSTYLE
        Self(s)
    }

    fn option(&mut self, option: u32, data: &[u8]) {
        send_option(&mut self.0, option, data);
    }

    /// The next reply's type (its data read and dropped).
    fn reply(&mut self, option: u32) -> u32 {
        read_reply(&mut self.0, option)
    }

    /// True once the server closed the connection (within the read timeout).
    fn closed(&mut self) -> bool {
        let mut b = [0u8; 1024];
        loop {
            match self.0.read(&mut b) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(e) => return matches!(e.kind(), std::io::ErrorKind::ConnectionReset),
            }
        }
    }
}

#[test]
fn the_negotiation_follows_the_spec_before_and_around_starttls() {
    // `_dir` keeps the daemon's directory (a `..` would drop it at once).
    let Served {
        dir: _dir,
        host1: client,
        d,
        uri,
        ..
    } = served(
        "tls-raw",
        "require",
        "[limits]\nhandshake_timeout_secs = 2\n",
    );
    let port = port_of(&uri);

    // Before TLS, a require-mode listener answers everything but STARTTLS with TLS_REQD.
    let mut r = Raw::connect(port);
    r.option(OPT_LIST, &[]);
    assert_eq!(r.reply(OPT_LIST), REP_ERR_TLS_REQD);
    // STARTTLS with data is invalid.
    r.option(OPT_STARTTLS, b"x");
    assert_eq!(r.reply(OPT_STARTTLS), REP_ERR_INVALID);
    // NBD_OPT_EXPORT_NAME before TLS closes the connection (it has no error reply).
    r.option(1, b"vol");
    assert!(
        r.closed(),
        "EXPORT_NAME before TLS left the connection open"
    );

    // Garbage instead of a ClientHello: a hard disconnect.
    let mut r = Raw::connect(port);
    r.option(OPT_STARTTLS, &[]);
    assert_eq!(r.reply(OPT_STARTTLS), REP_ACK);
    r.0.write_all(&[0x47; 600]).expect("garbage");
    assert!(
        r.closed(),
        "garbage instead of a ClientHello was not disconnected"
    );

    // A client that stops mid-handshake is timed out.
    let mut r = Raw::connect(port);
    r.option(OPT_STARTTLS, &[]);
    assert_eq!(r.reply(OPT_STARTTLS), REP_ACK);
    let started = Instant::now();
    assert!(r.closed(), "a stalled handshake was not closed");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );

    // 200 handshakes left hanging at once hold no slot for ever: all are closed, and a good
    // client is served meanwhile.
    let stalled: Vec<Raw> = (0..200)
        .map(|_| {
            let mut r = Raw::connect(port);
            r.option(OPT_STARTTLS, &[]);
            r
        })
        .collect();
    nbdinfo_ok(&with_certs(&uri, &client));
    for mut r in stalled {
        assert_eq!(r.reply(OPT_STARTTLS), REP_ACK);
        assert!(r.closed());
    }
    nbdinfo_ok(&with_certs(&uri, &client));
    d.stop();

    // With TLS off, STARTTLS is refused by policy.
    let dir2 = TestDir::new("tls-off");
    let d = Daemon::start(&dir2, "[nbd]\ntcp = \"127.0.0.1:0\"\n");
    d.ctl.create_key("e2e");
    d.ctl.create_volume("vol", "16M", "alias/e2e", 4096, &[]);
    let uri = attach_tcp(&d, "vol", &[]);
    assert!(uri.starts_with("nbd://"), "{uri}");
    let mut r = Raw::connect(port_of(&uri));
    r.option(OPT_STARTTLS, &[]);
    assert_eq!(r.reply(OPT_STARTTLS), REP_ERR_POLICY);
    r.option(OPT_LIST, &[]);
    let mut kinds = Vec::new();
    loop {
        let k = r.reply(OPT_LIST);
        kinds.push(k);
        if k == REP_ACK {
            break;
        }
    }
    assert_eq!(kinds.len(), 2, "{kinds:?}");
    d.stop();
}

/// Runs the daemon on `config` and returns its stderr, asserting it refused to start.
fn refused_start(dir: &TestDir, name: &str, tls: &str) -> String {
    let config = dir.join(&format!("{name}.toml"));
    std::fs::write(
        &config,
        format!(
            "state_dir = \"{}\"\nruntime_dir = \"{}\"\n[nbd]\ntcp = \"127.0.0.1:0\"\n[nbd.tls]\n{tls}\n",
            dir.join(&format!("{name}-state")).display(),
            dir.join(&format!("{name}-run")).display()
        ),
    )
    .expect("config");
    let out = run(Command::new(cryptnbd_bin()).arg("--config").arg(&config));
    assert_ne!(out.code, Some(0), "cryptnbd started with {tls}");
    out.stderr
}

#[test]
fn the_daemon_refuses_to_start_with_unusable_certificates() {
    use std::os::unix::fs::PermissionsExt;
    let dir = TestDir::new("tls-start");
    let pki = Pki::new(&dir, "main");
    let other = Pki::new(&dir, "other");
    let conf = |certs: &std::path::Path| {
        format!("mode = \"require\"\ncertificates = \"{}\"", certs.display())
    };

    // A key others can read.
    let loose = pki.server_variant("loose", None, None);
    std::fs::set_permissions(
        loose.join("server-key.pem"),
        std::fs::Permissions::from_mode(0o644),
    )
    .expect("chmod");
    let e = refused_start(&dir, "loose", &conf(&loose));
    assert!(
        e.contains("server-key.pem") && e.contains("chmod 600"),
        "{e}"
    );

    // A missing file.
    let missing = pki.server_variant("missing", None, None);
    std::fs::remove_file(missing.join("ca-cert.pem")).expect("rm");
    let e = refused_start(&dir, "missing", &conf(&missing));
    assert!(e.contains("ca-cert.pem"), "{e}");

    // A key that is not the certificate's.
    let mismatched = pki.server_variant("mismatched", None, None);
    std::fs::copy(
        pki.server.join("server-key.pem"),
        mismatched.join("server-key.pem"),
    )
    .expect("copy");
    let e = refused_start(&dir, "mismatched", &conf(&mismatched));
    assert!(e.contains("is not the key of"), "{e}");

    // An expired server certificate.
    let expired = pki.server_variant(
        "expired",
        Some(("20200101000000Z", "20200201000000Z")),
        None,
    );
    let e = refused_start(&dir, "expired", &conf(&expired));
    assert!(e.contains("server-cert.pem has expired"), "{e}");

    // A server certificate the CA did not sign.
    let foreign = pki.server_variant("foreign", None, Some(&other));
    let e = refused_start(&dir, "foreign", &conf(&foreign));
    assert!(e.contains("was not signed by the CA"), "{e}");

    // A non-loopback listener needs TLS that checks clients (or the explicit opt-out).
    let config = dir.join("public.toml");
    std::fs::write(
        &config,
        format!(
            "state_dir = \"{}\"\nruntime_dir = \"{}\"\n[nbd]\ntcp = \"0.0.0.0:0\"\n[nbd.tls]\nmode = \"on\"\ncertificates = \"{}\"\n",
            dir.join("public-state").display(),
            dir.join("public-run").display(),
            pki.server.display()
        ),
    )
    .expect("config");
    let out = run(Command::new(cryptnbd_bin()).arg("--config").arg(&config));
    assert_ne!(out.code, Some(0));
    assert!(out.stderr.contains("mode = \"require\""), "{}", out.stderr);
}

/// `openssl x509 -noout FLAGS` of a client's certificate: the value after `=`.
fn cert_field(client: &std::path::Path, flags: &[&str]) -> String {
    let out = run(Command::new(require_tool("openssl", "openssl"))
        .args(["x509", "-noout"])
        .args(flags)
        .arg("-in")
        .arg(client.join("client-cert.pem")))
    .assert_success()
    .stdout_text();
    out.trim()
        .split_once('=')
        .map(|(_, v)| v.to_owned())
        .expect("field")
}

#[test]
fn allow_lists_admit_only_the_named_certificates() {
    let dir = TestDir::new("tls-allow");
    let pki = Pki::new(&dir, "main");
    let host1 = pki.client("host1", "/O=Example/CN=host1.example.com");
    let host2 = pki.client("host2", "/O=Example/CN=host2.example.com");
    let d = tls_daemon(&dir, &pki, "on", "");
    d.ctl.create_key("e2e");
    for v in ["vol", "any", "wild", "fp", "ser"] {
        d.ctl.create_volume(v, "16M", "alias/e2e", 4096, &[]);
    }
    let attached = d
        .ctl
        .run(&[
            "--json",
            "attach",
            "vol",
            "--tcp",
            "--allow-cert",
            "CN=host1.example.com,O=Example",
        ])
        .assert_success()
        .json();
    assert_eq!(
        attached["allow_certs"],
        serde_json::json!([{"subject": "CN=host1.example.com,O=Example"}]),
        "{attached}"
    );
    let vol = attached["uris"][1].as_str().expect("uri").to_owned();
    let any = attach_tcp(&d, "any", &[]);
    let wild = attach_tcp(&d, "wild", &["--allow-cert", "cn=*.example.com,o=Example"]);
    let fp = attach_tcp(
        &d,
        "fp",
        &[
            "--allow-cert-sha256",
            &cert_field(&host1, &["-fingerprint", "-sha256"]),
        ],
    );
    let ser = attach_tcp(
        &d,
        "ser",
        &[
            "--allow-cert-issuer",
            "CN=main CA,O=cryptnbd tests",
            "--allow-cert-serial",
            &cert_field(&host1, &["-serial"]),
        ],
    );
    assert!(
        opens(&vol, &host1),
        "host1 refused on its own export; the daemon's log:\n{}",
        d.log_text()
    );
    assert!(
        !opens(&vol, &host2),
        "host2 opened an export that lists only host1"
    );
    assert!(
        opens(&any, &host2),
        "an export without a list refused a CA-signed client"
    );
    assert!(
        opens(&wild, &host1) && opens(&wild, &host2),
        "the wildcard did not match"
    );
    assert!(
        opens(&fp, &host1) && !opens(&fp, &host2),
        "the fingerprint rule is wrong"
    );
    assert!(
        opens(&ser, &host1) && !opens(&ser, &host2),
        "the issuer/serial rule is wrong"
    );

    // Without TLS, an export with a list is refused by policy.
    let mut r = Raw::connect(port_of(&vol));
    r.option(OPT_INFO, &info_request("vol"));
    assert_eq!(r.reply(OPT_INFO), REP_ERR_POLICY);

    // LIST shows a certificate only what it may open.
    let listed =
        |certs: &std::path::Path| export_names(&with_certs(&any.replace("/any", "/"), certs));
    assert_eq!(listed(&host1), ["any", "fp", "ser", "vol", "wild"]);
    assert_eq!(listed(&host2), ["any", "wild"]);

    // status names the certificate of a live connection, as GnuTLS prints it.
    let mut held = hold_tls(&vol, &host1);
    let deadline = Instant::now() + Duration::from_secs(20);
    let dn = loop {
        let s = d
            .ctl
            .run(&["--json", "status", "vol"])
            .assert_success()
            .json();
        if let Some(c) = s["attachments"][0]["connections"][0]["certificate"].as_str() {
            break c.to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "no TLS connection in status: {s}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(dn, "CN=host1.example.com,O=Example");
    let text = d.ctl.run(&["status", "vol"]).assert_success().stdout_text();
    assert!(
        text.contains("certificate CN=host1.example.com,O=Example"),
        "{text}"
    );
    assert!(
        text.contains("admits only client certificates with"),
        "{text}"
    );
    let _ = held.kill();
    let _ = held.wait();

    // Every refusal is audited with the certificate and the address.
    let audit = audit_trail(&d);
    let refusal = audit
        .lines()
        .find(|l| l.contains("\"nbd-open\"") && l.contains("CN=host2.example.com,O=Example"))
        .unwrap_or_else(|| panic!("no audit record of host2's refusal:\n{audit}"));
    assert!(refusal.contains("tcp 127.0.0.1:"), "{refusal}");

    // A pattern that is no name is refused at attach.
    d.ctl.create_volume("bad", "16M", "alias/e2e", 4096, &[]);
    let out = d
        .ctl
        .run(&["attach", "bad", "--tcp", "--allow-cert", "host1"]);
    assert_eq!(out.code, Some(2), "{}", out.stderr);
    assert!(out.stderr.contains("TYPE=VALUE"), "{}", out.stderr);
    d.stop();
}

#[test]
fn a_reload_cuts_revoked_sessions_and_a_broken_one_changes_nothing() {
    let Served {
        dir: _dir,
        pki,
        host1,
        d,
        uri,
    } = served("tls-reload", "require", "");
    let host2 = pki.client("host2", "/O=Example/CN=host2.example.com");
    let mut one = hold_tls(&uri, &host1);
    let mut two = hold_tls(&uri, &host2);
    assert_eq!(
        wait_sessions(&d, "vol", 2),
        [
            "CN=host1.example.com,O=Example",
            "CN=host2.example.com,O=Example"
        ]
    );

    // host2 is revoked: one reload cuts its live session, and only its.
    pki.revoke(&host2);
    let r = d
        .ctl
        .run(&["--json", "tls", "reload"])
        .assert_success()
        .json();
    let cut = the_one_cut(&r, 2, "CN=host2.example.com,O=Example");
    assert!(
        cut["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("no longer accepted"),
        "{r}"
    );
    assert_eq!(
        wait_sessions(&d, "vol", 1),
        ["CN=host1.example.com,O=Example"]
    );
    assert_ne!(
        run(Command::new(nbdinfo()).arg(with_certs(&uri, &host2))).code,
        Some(0)
    );
    let audit = audit_trail(&d);
    assert!(
        audit
            .lines()
            .any(|l| l.contains("\"nbd-disconnect\"") && l.contains("CN=host2.example.com")),
        "{audit}"
    );

    // A broken certificate: the reload is refused, naming the file, and nothing changes.
    let key = pki.server.join("server-key.pem");
    let good_key = std::fs::read(&key).expect("key");
    std::fs::write(&key, b"not a key").expect("break the key");
    let out = d.ctl.run(&["tls", "reload"]);
    assert_eq!(out.code, Some(7), "{}", out.stderr);
    assert!(
        out.stderr.contains("server-key.pem") && out.stderr.contains("unchanged"),
        "{}",
        out.stderr
    );
    assert_eq!(
        wait_sessions(&d, "vol", 1),
        ["CN=host1.example.com,O=Example"]
    );
    nbdinfo_ok(&with_certs(&uri, &host1));

    // SIGHUP reloads too: host1 revoked, its session cut without a cryptnbdctl call.
    std::fs::write(&key, &good_key).expect("restore the key");
    pki.revoke(&host1);
    run(Command::new("kill").args(["-HUP", &d.pid().to_string()])).assert_success();
    wait_sessions(&d, "vol", 0);
    for c in [&mut one, &mut two] {
        let _ = c.kill();
        let _ = c.wait();
    }
    d.stop();
}

/// A rustls client configuration with the certificates of the client directory `certs`.
fn client_config(certs: &std::path::Path) -> std::sync::Arc<rustls::ClientConfig> {
    client_config_for(certs, rustls::DEFAULT_VERSIONS, None)
}

#[test]
fn a_thousand_handshakes_at_once_are_all_served() {
    const N: usize = 1000;
    // `_dir` keeps the daemon's directory (a `..` would drop it at once).
    let Served {
        dir: _dir,
        host1: client,
        d,
        uri,
        ..
    } = served(
        "tls-many",
        "require",
        "[limits]\nhandshake_timeout_secs = 120\n",
    );
    let port = port_of(&uri);
    let config = client_config(&client);
    let server_name = rustls::pki_types::ServerName::try_from("127.0.0.1").expect("name");

    // N connections upgrade; every ClientHello is sent before any handshake completes, so
    // the daemon has N handshakes in progress at once.
    let started = Instant::now();
    let mut raws: Vec<Raw> = (0..N)
        .map(|_| {
            let mut r = Raw::connect(port);
            r.option(OPT_STARTTLS, &[]);
            r
        })
        .collect();
    let mut sessions = Vec::with_capacity(N);
    for r in &mut raws {
        assert_eq!(r.reply(OPT_STARTTLS), REP_ACK);
        let mut tls = rustls::ClientConnection::new(config.clone(), server_name.clone())
            .expect("client session");
        tls.write_tls(&mut r.0).expect("ClientHello");
        sessions.push(tls);
    }
    // Meanwhile a real client is served.
    nbdinfo_ok(&with_certs(&uri, &client));
    for (r, tls) in raws.iter_mut().zip(&mut sessions) {
        while tls.is_handshaking() {
            tls.complete_io(&mut r.0).expect("handshake");
        }
        let mut s = rustls::Stream::new(tls, &mut r.0);
        send_option(&mut s, OPT_INFO, &info_request("vol"));
        let mut kinds = Vec::new();
        loop {
            let k = read_reply(&mut s, OPT_INFO);
            kinds.push(k);
            if k == REP_ACK || k >= 0x8000_0000 {
                break;
            }
        }
        assert_eq!(kinds.last(), Some(&REP_ACK), "{kinds:?}");
    }
    eprintln!(
        "{N} TLS handshakes at once, each then served: {:?}",
        started.elapsed()
    );
    drop(sessions);
    drop(raws);
    nbdinfo_ok(&with_certs(&uri, &client));
    d.stop();
}

/// A rustls client configuration for `certs` that offers only `versions` and, if given, the
/// suites `suites` (one AEAD, with both kinds of server key for TLS 1.2).
fn client_config_for(
    certs: &std::path::Path,
    versions: &[&'static rustls::SupportedProtocolVersion],
    suites: Option<&[rustls::CipherSuite]>,
) -> std::sync::Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_file_iter(certs.join("ca-cert.pem")).expect("CA") {
        roots.add(ca.expect("CA")).expect("add the CA");
    }
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(certs.join("client-cert.pem"))
            .expect("cert")
            .map(|c| c.expect("cert"))
            .collect();
    let key = PrivateKeyDer::from_pem_file(certs.join("client-key.pem")).expect("key");
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    if let Some(suites) = suites {
        provider
            .cipher_suites
            .retain(|s| suites.contains(&s.suite()));
        assert!(!provider.cipher_suites.is_empty(), "{suites:?}");
    }
    std::sync::Arc::new(
        rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(provider))
            .with_protocol_versions(versions)
            .expect("versions")
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .expect("client certificate"),
    )
}

const OPT_GO: u32 = 7;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

/// Sends one transmission request (and its data) and reads its simple reply: the error
/// and, for a READ, the data.
fn command(
    s: &mut (impl Read + Write),
    kind: u16,
    handle: u64,
    offset: u64,
    data: &[u8],
    read_len: u32,
) -> (u32, Vec<u8>) {
    let mut m = Vec::with_capacity(28 + data.len());
    m.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
    m.extend_from_slice(&0u16.to_be_bytes());
    m.extend_from_slice(&kind.to_be_bytes());
    m.extend_from_slice(&handle.to_be_bytes());
    m.extend_from_slice(&offset.to_be_bytes());
    let len = if kind == 1 {
        data.len() as u32
    } else {
        read_len
    };
    m.extend_from_slice(&len.to_be_bytes());
    m.extend_from_slice(data);
    s.write_all(&m).expect("request");
    s.flush().expect("flush");
    if kind == 2 {
        return (0, Vec::new());
    }
    let mut h = [0u8; 16];
    s.read_exact(&mut h).expect("reply");
    assert_eq!(
        u32::from_be_bytes([h[0], h[1], h[2], h[3]]),
        SIMPLE_REPLY_MAGIC
    );
    assert_eq!(
        u64::from_be_bytes(h[8..].try_into().expect("8 bytes")),
        handle
    );
    let error = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
    let mut out = vec![
        0u8;
        if kind == 0 && error == 0 {
            read_len as usize
        } else {
            0
        }
    ];
    s.read_exact(&mut out).expect("read data");
    (error, out)
}

/// The server's own record layer (it seals and opens records itself after rustls's
/// handshake) against rustls clients of every version and AEAD rustls offers: data both
/// ways in records of every size, TLS 1.3 key updates the client asks the server to answer,
/// and close_notify after NBD_CMD_DISC.
#[test]
fn every_tls_version_and_cipher_carries_data_through_key_updates_and_close_notify() {
    use rustls::CipherSuite as C;
    let Served {
        dir: _dir,
        host1,
        d,
        uri,
        ..
    } = served("tls-suites", "require", "");
    let port = port_of(&uri);
    let server_name = rustls::pki_types::ServerName::try_from("127.0.0.1").expect("name");
    let cases: [(&str, &'static rustls::SupportedProtocolVersion, Vec<C>); 6] = [
        (
            "1.3 AES-128-GCM",
            &rustls::version::TLS13,
            vec![C::TLS13_AES_128_GCM_SHA256],
        ),
        (
            "1.3 AES-256-GCM",
            &rustls::version::TLS13,
            vec![C::TLS13_AES_256_GCM_SHA384],
        ),
        (
            "1.3 ChaCha20-Poly1305",
            &rustls::version::TLS13,
            vec![C::TLS13_CHACHA20_POLY1305_SHA256],
        ),
        (
            "1.2 AES-128-GCM",
            &rustls::version::TLS12,
            vec![
                C::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
                C::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
            ],
        ),
        (
            "1.2 AES-256-GCM",
            &rustls::version::TLS12,
            vec![
                C::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
                C::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
            ],
        ),
        (
            "1.2 ChaCha20-Poly1305",
            &rustls::version::TLS12,
            vec![
                C::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
                C::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
            ],
        ),
    ];
    for (n, (label, version, suites)) in cases.into_iter().enumerate() {
        let config = client_config_for(&host1, &[version], Some(&suites));
        let mut raw = Raw::connect(port);
        raw.option(OPT_STARTTLS, &[]);
        assert_eq!(raw.reply(OPT_STARTTLS), REP_ACK, "{label}");
        let tls = rustls::ClientConnection::new(config, server_name.clone()).expect("session");
        let mut s = rustls::StreamOwned::new(tls, raw.0);
        send_option(&mut s, OPT_GO, &info_request("vol"));
        while read_reply(&mut s, OPT_GO) != REP_ACK {}
        let negotiated = s.conn.negotiated_cipher_suite().expect("a suite").suite();
        assert!(suites.contains(&negotiated), "{label}: {negotiated:?}");

        // Sizes around a record's 16 KiB, and many records in one request.
        let base = (n as u64) << 21;
        let mut offset = base;
        for (i, len) in [
            512usize,
            16 * 1024 - 16,
            16 * 1024,
            16 * 1024 + 512,
            1 << 20,
        ]
        .into_iter()
        .enumerate()
        {
            let data: Vec<u8> = (0..len).map(|b| (b * 31 + i + n) as u8).collect();
            if *version == rustls::version::TLS13 && i % 2 == 1 {
                // The client moves to new keys and asks the server to move too.
                s.conn.refresh_traffic_keys().expect("key update");
            }
            assert_eq!(
                command(&mut s, 1, 2 * i as u64, offset, &data, 0).0,
                0,
                "{label}"
            );
            let (error, back) = command(&mut s, 0, 2 * i as u64 + 1, offset, &[], len as u32);
            assert_eq!(error, 0, "{label}");
            assert!(back == data, "{label}: {len} bytes read back differ");
            offset += len.next_multiple_of(4096) as u64;
        }
        command(&mut s, 2, 99, 0, &[], 0);
        // close_notify: rustls reports a clean end (0 bytes), not an unexpected EOF.
        let mut rest = Vec::new();
        let end = s.read_to_end(&mut rest);
        assert!(
            matches!(end, Ok(0)),
            "{label}: the session did not end with close_notify: {end:?}"
        );
    }
    d.stop();
}

#[test]
fn tls_allow_changes_a_live_exports_list_cuts_who_it_refuses_and_survives_a_restart() {
    let Served {
        dir: _dir,
        pki,
        host1,
        d,
        uri,
    } = served("tls-allow-live", "require", "");
    let host2 = pki.client("host2", "/O=Example/CN=host2.example.com");
    let mut one = hold_tls(&uri, &host1);
    let mut two = hold_tls(&uri, &host2);
    assert_eq!(wait_sessions(&d, "vol", 2).len(), 2);

    // Without a rule or --any, nothing changes and the user is told what to give.
    let bare = d.ctl.run(&["tls", "allow", "vol"]);
    assert_eq!(bare.code, Some(2), "{}", bare.stderr);
    assert!(bare.stderr.contains("--any"), "{}", bare.stderr);
    // A pattern that is not a DN is refused before anything changes.
    let bad = d.ctl.run(&["tls", "allow", "vol", "--allow-cert", "host1"]);
    assert_ne!(bad.code, Some(0), "{}", bad.stderr);
    assert_eq!(wait_sessions(&d, "vol", 2).len(), 2);

    // Only host1 now: host2's live session is cut and audited, host1's goes on.
    let r = d
        .ctl
        .run(&[
            "--json",
            "tls",
            "allow",
            "vol",
            "--allow-cert",
            "CN=host1.example.com,O=Example",
        ])
        .assert_success()
        .json();
    the_one_cut(&r, 2, "CN=host2.example.com,O=Example");
    assert_eq!(
        wait_sessions(&d, "vol", 1),
        ["CN=host1.example.com,O=Example"]
    );
    assert!(
        !opens(&uri, &host2),
        "host2 opened the export after it was taken off"
    );
    assert!(opens(&uri, &host1));
    let status = d
        .ctl
        .run(&["--json", "status", "vol"])
        .assert_success()
        .json();
    assert_eq!(
        status["attachments"][0]["allow_certs"],
        serde_json::json!([{"subject": "CN=host1.example.com,O=Example"}]),
        "{status}"
    );
    let audit = audit_trail(&d);
    assert!(
        audit.lines().any(|l| l.contains("\"tls-allow\"")),
        "no tls-allow record:\n{audit}"
    );
    assert!(
        audit
            .lines()
            .any(|l| l.contains("nbd-disconnect") && l.contains("host2.example.com")),
        "host2's disconnection is not audited:\n{audit}"
    );
    for c in [&mut one, &mut two] {
        let _ = c.kill();
        let _ = c.wait();
    }

    // The attachment is persistent: the daemon re-attaches it with the new list.
    let d = d.restart();
    let uri = d
        .ctl
        .run(&["--json", "status", "vol"])
        .assert_success()
        .json()["attachments"][0]["uris"][1]
        .as_str()
        .expect("uri")
        .to_owned();
    assert!(opens(&uri, &host1));
    assert!(!opens(&uri, &host2), "the list was lost in the restart");

    // --any empties the list: every certificate the CA signed may open it again.
    let r = d
        .ctl
        .run(&["--json", "tls", "allow", "vol", "--any"])
        .assert_success()
        .json();
    assert_eq!(r["allow_certs"], serde_json::json!([]), "{r}");
    assert!(opens(&uri, &host2));
    d.stop();
}

#[test]
fn a_session_whose_certificate_expires_is_cut_without_a_reload() {
    let Served {
        dir: _dir,
        pki,
        d,
        uri,
        ..
    } = served("tls-expiry", "require", "session_check_interval_secs = 1\n");
    let brief = pki.client_expiring_in("brief", "/O=Example/CN=brief.example.com", 6);
    let mut held = hold_tls(&uri, &brief);
    assert_eq!(
        wait_sessions(&d, "vol", 1),
        ["CN=brief.example.com,O=Example"]
    );
    // It expires within 6 s; the check every second cuts it soon after (wait_sessions gives
    // up after 20 s), with no reload.
    wait_sessions(&d, "vol", 0);
    let audit = audit_trail(&d);
    assert!(
        audit
            .lines()
            .any(|l| l.contains("nbd-disconnect") && l.contains("brief.example.com")),
        "the expiry is not audited:\n{audit}"
    );
    let _ = held.kill();
    let _ = held.wait();
    d.stop();
}
