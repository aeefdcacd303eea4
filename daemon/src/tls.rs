//! TLS for the NBD listeners: the certificate directory read and checked, and the rustls
//! server configuration built from it.
//!
//! The directory has the layout nbdkit and qemu use, so one directory serves every tool:
//! `ca-cert.pem` (the CA that signs the server's and the clients' certificates),
//! `server-cert.pem` (the server's certificate, then any intermediates), `server-key.pem`
//! (its key, readable by the daemon's user only) and, optionally, `ca-crl.pem` (revoked
//! client certificates). Every check that can fail is made here, at start, with a sentence
//! that names the file and says what is wrong: a missing file, a key others can read, a key
//! that is not the certificate's, a server certificate that has expired or that the CA did
//! not sign.
//!
//! Only TLS 1.3 and 1.2 (Debian 12's `nbd-client` speaks 1.2 only). No PSK: rustls has no
//! server-side PSK, and certificates work with every client.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nbd::server::{TlsMode, TlsSettings};
use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;

use crate::config::TlsConfig;

/// The files of a certificate directory.
pub const CA_CERT: &str = "ca-cert.pem";
/// The server's certificate chain.
pub const SERVER_CERT: &str = "server-cert.pem";
/// The server's key.
pub const SERVER_KEY: &str = "server-key.pem";
/// Revoked client certificates (optional).
pub const CA_CRL: &str = "ca-crl.pem";

/// Why the TLS configuration cannot be used: a sentence naming the file and the fix.
#[derive(Debug, thiserror::Error)]
#[error("TLS: {0}")]
pub struct TlsError(String);

fn err(message: impl Into<String>) -> TlsError {
    TlsError(message.into())
}

/// What `[nbd.tls]` loads to: the NBD server's settings, and the verifier of client
/// certificates (to check live sessions again after a reload).
#[derive(Clone, Default)]
pub struct Loaded {
    /// For [`nbd::server::Server::set_tls`].
    pub settings: TlsSettings,
    /// Checks client certificates against the CA and the CRL (None without TLS).
    pub verifier: Option<Arc<dyn ClientCertVerifier>>,
}

/// The TLS configuration a daemon runs with: `[nbd.tls]`, read again on reload.
#[derive(Default)]
pub struct TlsService {
    /// `[nbd.tls]` as configured.
    pub config: TlsConfig,
    /// What it loaded to last.
    pub loaded: std::sync::Mutex<Loaded>,
}

impl TlsService {
    /// The client certificate verifier in force (None without TLS).
    pub fn verifier(&self) -> Option<Arc<dyn ClientCertVerifier>> {
        self.loaded
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .verifier
            .clone()
    }
}

/// Loads `[nbd.tls]`: nothing when both modes are off.
pub fn load(cfg: &TlsConfig) -> Result<Loaded, TlsError> {
    let tcp = cfg.mode.into();
    let unix = cfg.unix_mode.into();
    if tcp == TlsMode::Off && unix == TlsMode::Off {
        return Ok(Loaded::default());
    }
    let (config, verifier) = server_config(&cfg.certificates, cfg.verify_peer)?;
    Ok(Loaded {
        settings: TlsSettings {
            config: Some(config),
            tcp,
            unix,
        },
        verifier: Some(verifier),
    })
}

/// The rustls configuration from the certificate directory `dir`, and its client verifier.
pub fn server_config(
    dir: &Path,
    verify_peer: bool,
) -> Result<(Arc<rustls::ServerConfig>, Arc<dyn ClientCertVerifier>), TlsError> {
    let file = |name: &str| dir.join(name);
    let (ca_path, cert_path, key_path, crl_path) = (
        file(CA_CERT),
        file(SERVER_CERT),
        file(SERVER_KEY),
        file(CA_CRL),
    );
    check_key_mode(&key_path)?;
    let chain = certificates(&cert_path)?;
    let key = PrivateKeyDer::from_pem_file(&key_path).map_err(|e| {
        err(format!(
            "{}: no private key could be read ({e}): it must hold the PEM key of {}",
            key_path.display(),
            cert_path.display()
        ))
    })?;
    let mut roots = RootCertStore::empty();
    for ca in certificates(&ca_path)? {
        roots.add(ca).map_err(|e| {
            err(format!(
                "{}: not a usable CA certificate: {e}",
                ca_path.display()
            ))
        })?;
    }
    let crls = if crl_path.exists() {
        CertificateRevocationListDer::pem_file_iter(&crl_path)
            .and_then(|i| i.collect::<Result<Vec<_>, _>>())
            .map_err(|e| err(format!("{}: cannot read the CRL: {e}", crl_path.display())))?
    } else {
        Vec::new()
    };
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    check_server_certificate(&chain, &roots, &provider, &cert_path, &ca_path)?;

    let roots = Arc::new(roots);
    let mut verifier = WebPkiClientVerifier::builder_with_provider(roots, Arc::clone(&provider));
    if !crls.is_empty() {
        verifier = verifier.with_crls(crls).only_check_end_entity_revocation();
    }
    if !verify_peer {
        // A certificate is asked for and checked when sent, but not required.
        verifier = verifier.allow_unauthenticated();
    }
    let verifier = verifier.build().map_err(|e| {
        err(format!(
            "cannot verify clients with {} and {}: {e}",
            ca_path.display(),
            crl_path.display()
        ))
    })?;
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| err(format!("no TLS version to offer: {e}")))?
        .with_client_cert_verifier(Arc::new(nbd::server::NamingVerifier(Arc::clone(&verifier))))
        .with_single_cert(chain, key)
        .map_err(|e| match e {
            rustls::Error::InconsistentKeys(_) => err(format!(
                "{} is not the key of {}: put the key that goes with the certificate there",
                key_path.display(),
                cert_path.display()
            )),
            other => err(format!(
                "{} or {} cannot be used: {other}",
                cert_path.display(),
                key_path.display()
            )),
        })?;
    Ok((Arc::new(config), verifier))
}

/// The key must be readable by its owner only (as ssh and nbdkit's users expect).
fn check_key_mode(key: &Path) -> Result<(), TlsError> {
    let meta = std::fs::metadata(key).map_err(|e| missing(key, &e))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(err(format!(
            "{} is readable or writable by others (mode {mode:o}): run 'chmod 600 {}' so that \
             only the daemon's user can read the server's private key",
            key.display(),
            key.display()
        )));
    }
    Ok(())
}

fn missing(path: &Path, e: &std::io::Error) -> TlsError {
    let dir = path.parent().map_or_else(PathBuf::new, Path::to_path_buf);
    err(format!(
        "{}: {e}: the certificate directory {} must hold {CA_CERT}, {SERVER_CERT} and \
         {SERVER_KEY} (see docs/tls.md), or set [nbd.tls] certificates to the directory that \
         does",
        path.display(),
        dir.display()
    ))
}

/// The PEM certificates in `path` (at least one).
fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    if let Err(e) = std::fs::metadata(path) {
        return Err(missing(path, &e));
    }
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .map_err(|e| {
            err(format!(
                "{}: cannot read the certificates: {e}",
                path.display()
            ))
        })?;
    if certs.is_empty() {
        return Err(err(format!(
            "{}: no PEM certificate in it (-----BEGIN CERTIFICATE-----)",
            path.display()
        )));
    }
    Ok(certs)
}

/// The server certificate must be valid now and signed (through any intermediates that
/// follow it in its file) by the CA: clients would refuse it otherwise, with a less helpful
/// message.
fn check_server_certificate(
    chain: &[CertificateDer<'static>],
    roots: &RootCertStore,
    provider: &rustls::crypto::CryptoProvider,
    cert_path: &Path,
    ca_path: &Path,
) -> Result<(), TlsError> {
    let ee = webpki::EndEntityCert::try_from(&chain[0]).map_err(|e| {
        err(format!(
            "{}: not a usable certificate: {e}",
            cert_path.display()
        ))
    })?;
    let verified = ee.verify_for_usage(
        provider.signature_verification_algorithms.all,
        &roots.roots,
        &chain[1..],
        UnixTime::now(),
        webpki::KeyUsage::server_auth(),
        None,
        None,
    );
    match verified {
        Ok(_) => Ok(()),
        Err(webpki::Error::CertExpired { .. }) => Err(err(format!(
            "{} has expired: renew it (docs/tls.md, rotation) and restart or reload",
            cert_path.display()
        ))),
        Err(webpki::Error::CertNotValidYet { .. }) => Err(err(format!(
            "{} is not valid yet: check the clock, or the certificate's start date",
            cert_path.display()
        ))),
        Err(webpki::Error::UnknownIssuer) => Err(err(format!(
            "{} was not signed by the CA in {}: use the CA that signed it, or a certificate \
             that CA signed",
            cert_path.display(),
            ca_path.display()
        ))),
        Err(e) => Err(err(format!(
            "{} cannot be used as a server certificate with the CA in {}: {e}",
            cert_path.display(),
            ca_path.display()
        ))),
    }
}
