//! Certificates for the TLS tests, made with `openssl` the way docs/tls.md tells users to:
//! a CA, the server's certificate (for 127.0.0.1, 10.0.2.2 and localhost) and key, client
//! certificates (good, expired, revoked, from another CA) and the CA's CRL.
//!
//! Directories use the layout nbdkit, qemu and libnbd share: the server's has `ca-cert.pem`,
//! `server-cert.pem`, `server-key.pem` and `ca-crl.pem`; each client's has `ca-cert.pem`,
//! `client-cert.pem` and `client-key.pem`.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{TestDir, require_tool, run};

/// A CA and what it signed.
pub struct Pki {
    /// The server's certificate directory.
    pub server: PathBuf,
    root: PathBuf,
    ca: PathBuf,
}

fn openssl() -> PathBuf {
    require_tool("openssl", "openssl")
}

const CONFIG: &str = r#"
[ ca ]
default_ca = ca_default
[ ca_default ]
dir = .
database = $dir/index.txt
new_certs_dir = $dir/newcerts
serial = $dir/serial
crlnumber = $dir/crlnumber
default_md = sha256
default_days = 30
default_crl_days = 30
policy = policy_any
copy_extensions = none
unique_subject = no
[ policy_any ]
organizationName = optional
organizationalUnitName = optional
commonName = supplied
[ req ]
distinguished_name = dn
prompt = no
[ dn ]
CN = unused
[ ca_ext ]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[ server_ext ]
basicConstraints = CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1, IP:10.0.2.2, DNS:localhost
[ client_ext ]
basicConstraints = CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = clientAuth
"#;

impl Pki {
    /// A new CA under `dir/NAME`, with a server certificate (and an empty CRL) in
    /// `dir/NAME/server`.
    pub fn new(dir: &TestDir, name: &str) -> Self {
        let root = dir.join(name);
        let ca = root.join("ca");
        std::fs::create_dir_all(ca.join("newcerts")).expect("mkdir");
        std::fs::write(ca.join("openssl.cnf"), CONFIG).expect("config");
        std::fs::write(ca.join("index.txt"), "").expect("index");
        std::fs::write(ca.join("serial"), "1000\n").expect("serial");
        std::fs::write(ca.join("crlnumber"), "1000\n").expect("crlnumber");
        let pki = Self {
            server: root.join("server"),
            root,
            ca,
        };
        pki.openssl(&[
            "req",
            "-x509",
            "-config",
            "openssl.cnf",
            "-extensions",
            "ca_ext",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "ca-key.pem",
            "-out",
            "ca-cert.pem",
            "-days",
            "30",
            "-subj",
            &format!("/O=cryptnbd tests/CN={name} CA"),
        ]);
        std::fs::create_dir_all(&pki.server).expect("mkdir");
        pki.copy_ca(&pki.server);
        let signed = pki.sign("server", "/CN=localhost", "server_ext", None);
        install(signed, &pki.server, "server");
        pki.write_crl();
        pki
    }

    fn openssl(&self, args: &[&str]) {
        run(Command::new(openssl()).current_dir(&self.ca).args(args)).assert_success();
    }

    fn copy_ca(&self, to: &Path) {
        std::fs::copy(self.ca.join("ca-cert.pem"), to.join("ca-cert.pem")).expect("copy CA");
    }

    /// Signs a new key for `subject` with `extensions`; `dates` (start, end as
    /// YYYYMMDDHHMMSSZ) instead of 30 days from now. Returns the certificate and key files.
    fn sign(
        &self,
        name: &str,
        subject: &str,
        extensions: &str,
        dates: Option<(&str, &str)>,
    ) -> (PathBuf, PathBuf) {
        let (key, csr, cert) = (
            format!("{name}-key.pem"),
            format!("{name}.csr"),
            format!("{name}-cert.pem"),
        );
        self.openssl(&[
            "req",
            "-new",
            "-config",
            "openssl.cnf",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &csr,
            "-subj",
            subject,
        ]);
        let mut args = vec![
            "ca",
            "-batch",
            "-notext",
            "-config",
            "openssl.cnf",
            "-cert",
            "ca-cert.pem",
            "-keyfile",
            "ca-key.pem",
            "-extensions",
            extensions,
            "-in",
            &csr,
            "-out",
            &cert,
        ];
        if let Some((start, end)) = dates {
            args.extend(["-startdate", start, "-enddate", end]);
        }
        self.openssl(&args);
        (self.ca.join(cert), self.ca.join(key))
    }

    /// A client's certificate directory, `subject` e.g. `/O=Example/CN=host1`.
    pub fn client(&self, name: &str, subject: &str) -> PathBuf {
        self.client_with(name, subject, None)
    }

    /// A client certificate that expired long ago.
    pub fn expired_client(&self, name: &str, subject: &str) -> PathBuf {
        self.client_with(name, subject, Some(("20200101000000Z", "20200201000000Z")))
    }

    /// A client certificate valid from a minute ago until `secs` seconds from now.
    pub fn client_expiring_in(&self, name: &str, subject: &str, secs: u64) -> PathBuf {
        let stamp = |offset: i64| {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .expect("clock")
                .as_secs() as i64;
            let out = std::process::Command::new("date")
                .args(["-u", "-d", &format!("@{}", now + offset), "+%Y%m%d%H%M%SZ"])
                .output()
                .expect("date");
            String::from_utf8(out.stdout)
                .expect("date")
                .trim()
                .to_owned()
        };
        let (start, end) = (stamp(-60), stamp(secs as i64));
        self.client_with(name, subject, Some((&start, &end)))
    }

    fn client_with(&self, name: &str, subject: &str, dates: Option<(&str, &str)>) -> PathBuf {
        let dir = self.root.join(format!("client-{name}"));
        std::fs::create_dir_all(&dir).expect("mkdir");
        install(
            self.sign(name, subject, "client_ext", dates),
            &dir,
            "client",
        );
        self.copy_ca(&dir);
        dir
    }

    /// Revokes the client whose directory is `client` and rewrites the server's CRL.
    pub fn revoke(&self, client: &Path) {
        let cert = client.join("client-cert.pem");
        self.openssl(&[
            "ca",
            "-config",
            "openssl.cnf",
            "-cert",
            "ca-cert.pem",
            "-keyfile",
            "ca-key.pem",
            "-revoke",
            &cert.display().to_string(),
        ]);
        self.write_crl();
    }

    fn write_crl(&self) {
        self.openssl(&[
            "ca",
            "-gencrl",
            "-config",
            "openssl.cnf",
            "-cert",
            "ca-cert.pem",
            "-keyfile",
            "ca-key.pem",
            "-out",
            "ca-crl.pem",
        ]);
        std::fs::copy(self.ca.join("ca-crl.pem"), self.server.join("ca-crl.pem")).expect("copy");
    }

    /// A directory with only the CA certificate: a client that sends no certificate.
    pub fn anonymous_client(&self) -> PathBuf {
        let dir = self.root.join("client-anonymous");
        std::fs::create_dir_all(&dir).expect("mkdir");
        self.copy_ca(&dir);
        dir
    }

    /// A server certificate directory like the good one, with `server-cert.pem` replaced by
    /// one from `dates` (start, end), or signed by `other`'s CA.
    pub fn server_variant(
        &self,
        name: &str,
        dates: Option<(&str, &str)>,
        other: Option<&Pki>,
    ) -> PathBuf {
        let dir = self.root.join(format!("server-{name}"));
        std::fs::create_dir_all(&dir).expect("mkdir");
        self.copy_ca(&dir);
        let signer = other.unwrap_or(self);
        let signed = signer.sign(
            &format!("server-{name}"),
            "/CN=localhost",
            "server_ext",
            dates,
        );
        install(signed, &dir, "server");
        dir
    }
}

/// Copies a signed certificate and its key into `dir` as `WHO-cert.pem` and `WHO-key.pem`
/// (0600).
fn install((cert, key): (PathBuf, PathBuf), dir: &Path, who: &str) {
    std::fs::copy(cert, dir.join(format!("{who}-cert.pem"))).expect("copy the certificate");
    let key_file = dir.join(format!("{who}-key.pem"));
    std::fs::copy(key, &key_file).expect("copy the key");
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
}
