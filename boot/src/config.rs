//! What the root configuration (the daemon's TOML, docs/daemon.md, that the initramfs starts
//! the root daemon with) says about the files an initramfs must carry: the keystore of the
//! local KMS, the AWS configuration and credentials, the CA bundle of a KMS reached over
//! HTTPS. Only those keys are read here; the daemon checks the rest when it starts.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Where the initramfs keeps the keystore copy when the configuration does not name a
/// keystore directory of its own: the root daemon's state directory is made from it at boot.
pub const INITRAMFS_STATE: &str = "/etc/cryptnbd/root-state";
/// The CA bundle a KMS reached over HTTPS is checked against.
pub const CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";
/// The file name of the dracut module's boot script, by which `initramfs check` knows an
/// image dracut built.
pub const DRACUT_HOOK: &str = "cryptnbd-unlock.sh";
/// The state directory when the configuration names none (as root).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/cryptnbd";

/// The keys of the root configuration that decide what the initramfs holds.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct RootConfig {
    /// `state_dir`.
    pub state_dir: Option<PathBuf>,
    /// `[kms]`.
    pub kms: Kms,
    /// `[store]`.
    pub store: Store,
}

/// `[kms]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct Kms {
    /// `backend`: `local` or `aws`.
    pub backend: String,
    /// `keystore`.
    pub keystore: Option<PathBuf>,
    /// `passphrase_file`: never allowed in the initramfs (it would sit beside the keystore).
    pub passphrase_file: Option<PathBuf>,
    /// `[kms.aws]`.
    pub aws: Aws,
}

impl Default for Kms {
    fn default() -> Self {
        Self {
            backend: "local".into(),
            keystore: None,
            passphrase_file: None,
            aws: Aws::default(),
        }
    }
}

/// `[kms.aws]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Aws {
    /// `endpoint_url`.
    pub endpoint_url: Option<String>,
    /// `config_file`.
    pub config_file: Option<PathBuf>,
    /// `credentials_file`.
    pub credentials_file: Option<PathBuf>,
}

/// `[store]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Store {
    /// `[store.devices]`.
    pub devices: BTreeMap<String, String>,
}

/// A file (or directory) the initramfs must hold: from `source` on the host to `dest` in
/// the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageFile {
    /// On the host.
    pub source: PathBuf,
    /// In the image (absolute).
    pub dest: PathBuf,
    /// What it is, for messages ("the local KMS keystore").
    pub what: &'static str,
    /// Whether it holds secrets (written 0600, and the image must not be readable by others).
    pub secret: bool,
}

impl ImageFile {
    /// The files it stands for, each as (on the host, in the image): itself, or for a
    /// directory its regular files, not the hidden ones (the `.lock` of a live keystore).
    pub fn files(&self) -> std::io::Result<Vec<(PathBuf, PathBuf)>> {
        if !std::fs::metadata(&self.source)?.is_dir() {
            return Ok(vec![(self.source.clone(), self.dest.clone())]);
        }
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.source)? {
            let entry = entry?;
            let name = entry.file_name();
            if entry.file_type()?.is_file() && !name.to_string_lossy().starts_with('.') {
                out.push((entry.path(), self.dest.join(&name)));
            }
        }
        out.sort();
        Ok(out)
    }
}

impl RootConfig {
    /// Reads the root configuration at `path`; `Err` is a sentence.
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            format!(
                "cannot read the root configuration {}: {e} (create it: docs/root-volume.md)",
                path.display()
            )
        })?;
        toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Whether the KMS is reached over the network (the initramfs brings it up first).
    pub fn needs_network(&self) -> bool {
        self.kms.backend == "aws"
    }

    /// The keystore directory on the host, for the local KMS.
    pub fn keystore(&self) -> Option<PathBuf> {
        (self.kms.backend == "local").then(|| {
            self.kms.keystore.clone().unwrap_or_else(|| {
                self.state_dir
                    .clone()
                    .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR))
                    .join("keystore")
            })
        })
    }

    /// Where the keystore copy goes in the image: the path the configuration names, else
    /// under [`INITRAMFS_STATE`].
    pub fn keystore_in_image(&self) -> PathBuf {
        self.kms
            .keystore
            .clone()
            .unwrap_or_else(|| Path::new(INITRAMFS_STATE).join("keystore"))
    }

    /// The files the initramfs must hold besides the configuration itself (which goes to
    /// `config_in_image`), and the warnings a user should read before relying on it. `Err`:
    /// a configuration that must not go into an initramfs at all.
    pub fn image_files(
        &self,
        config: &Path,
        config_in_image: &Path,
    ) -> Result<(Vec<ImageFile>, Vec<String>), String> {
        let mut files = vec![ImageFile {
            source: config.to_path_buf(),
            dest: config_in_image.to_path_buf(),
            what: "the root configuration",
            secret: false,
        }];
        let mut warnings = Vec::new();
        if let Some(p) = &self.kms.passphrase_file {
            return Err(format!(
                "the root configuration names kms.passphrase_file ({}): the initramfs would \
                 hold the keystore's passphrase next to the keystore; remove it, and the \
                 passphrase is asked on the console at boot",
                p.display()
            ));
        }
        match self.kms.backend.as_str() {
            "local" => {
                let keystore = self.keystore().unwrap_or_default();
                files.push(ImageFile {
                    source: keystore.clone(),
                    dest: self.keystore_in_image(),
                    what: "the local KMS keystore",
                    secret: true,
                });
                if !keystore_is_sealed(&keystore) {
                    warnings.push(format!(
                        "the keystore {} is not sealed: whoever reads the initramfs can unwrap \
                         the root volume's key; seal it with a passphrase (cryptnbdctl kms \
                         seal), which is then asked at every boot",
                        keystore.display()
                    ));
                }
            }
            "aws" => {
                let aws = &self.kms.aws;
                for (p, what) in [
                    (&aws.config_file, "the AWS configuration"),
                    (&aws.credentials_file, "the AWS credentials"),
                ] {
                    if let Some(p) = p {
                        files.push(ImageFile {
                            source: p.clone(),
                            dest: p.clone(),
                            what,
                            secret: true,
                        });
                    }
                }
                // credential_process (IAM Roles Anywhere's signing helper, say): the files
                // its command line names by absolute path (a certificate, a private key).
                for command in self.credential_processes() {
                    for word in command.split_whitespace().skip(1) {
                        let word = word.trim_matches(['"', '\'']);
                        if word.starts_with('/') && Path::new(word).is_file() {
                            files.push(ImageFile {
                                source: PathBuf::from(word),
                                dest: PathBuf::from(word),
                                what: "a file credential_process names",
                                secret: true,
                            });
                        }
                    }
                }
                if let Some(p) = &aws.credentials_file
                    && std::fs::read_to_string(p).is_ok_and(|t| t.contains("aws_secret_access_key"))
                {
                    warnings.push(format!(
                        "{} holds a long-lived access key: whoever reads the initramfs can use \
                         it; prefer an instance role, or IAM Roles Anywhere through \
                         credential_process (docs/root-volume.md)",
                        p.display()
                    ));
                }
                let https = aws
                    .endpoint_url
                    .as_deref()
                    .is_none_or(|u| u.starts_with("https:"));
                if https {
                    files.push(ImageFile {
                        source: PathBuf::from(CA_BUNDLE),
                        dest: PathBuf::from(CA_BUNDLE),
                        what: "the CA bundle the KMS endpoint is checked against",
                        secret: false,
                    });
                }
            }
            other => {
                return Err(format!(
                    "kms.backend = \"{other}\" in the root configuration: use \"local\" or \"aws\""
                ));
            }
        }
        Ok((files, warnings))
    }
}

impl RootConfig {
    /// The `credential_process` commands of the AWS configuration file `[kms.aws]` names.
    pub fn credential_processes(&self) -> Vec<String> {
        let Some(file) = &self.kms.aws.config_file else {
            return Vec::new();
        };
        std::fs::read_to_string(file)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let (k, v) = l.split_once('=')?;
                (k.trim() == "credential_process").then(|| v.trim().to_owned())
            })
            .collect()
    }

    /// The programs the initramfs needs besides cryptnbd's own: each `credential_process`'s
    /// executable (given by absolute path, as the daemon needs it).
    pub fn programs(&self) -> Vec<PathBuf> {
        self.credential_processes()
            .iter()
            .filter_map(|c| c.split_whitespace().next())
            .map(|p| PathBuf::from(p.trim_matches(['"', '\''])))
            .collect()
    }
}

/// Whether the keystore in `dir` is sealed with a passphrase (its file holds `"sealed"`).
pub fn keystore_is_sealed(dir: &Path) -> bool {
    std::fs::read(dir.join("keystore.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .is_some_and(|v| v.get("sealed").is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_image_holds_what_the_kms_needs_and_never_a_passphrase_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("root.toml");
        let image_config = Path::new("/etc/cryptnbd/root.toml");

        // The local KMS, unsealed: its keystore, with a warning.
        let c: RootConfig = toml::from_str(&format!(
            "state_dir = \"{}\"\n[nbd]\ntcp = \"127.0.0.1:1\"\n",
            dir.path().display()
        ))
        .expect("parse");
        let (files, warnings) = c.image_files(&config, image_config).expect("files");
        assert_eq!(files.len(), 2);
        assert_eq!(files[1].source, dir.path().join("keystore"));
        assert_eq!(files[1].dest, Path::new(INITRAMFS_STATE).join("keystore"));
        assert!(files[1].secret);
        assert!(warnings[0].contains("is not sealed"), "{warnings:?}");
        assert!(!c.needs_network());

        // Sealed: no warning.
        std::fs::create_dir(dir.path().join("keystore")).expect("mkdir");
        std::fs::write(
            dir.path().join("keystore/keystore.json"),
            br#"{"format": 1, "sealed": "AAAA"}"#,
        )
        .expect("write");
        assert!(
            c.image_files(&config, image_config)
                .expect("files")
                .1
                .is_empty()
        );

        // AWS over HTTPS with a credentials file: the CA bundle, and a warning on the key.
        let creds = dir.path().join("credentials");
        std::fs::write(
            &creds,
            "[default]\naws_access_key_id = A\naws_secret_access_key = B\n",
        )
        .expect("write");
        let c: RootConfig = toml::from_str(&format!(
            "[kms]\nbackend = \"aws\"\n[kms.aws]\nregion = \"eu-west-1\"\ncredentials_file = \"{}\"\n",
            creds.display()
        ))
        .expect("parse");
        assert!(c.needs_network());
        let (files, warnings) = c.image_files(&config, image_config).expect("files");
        let whats: Vec<&str> = files.iter().map(|f| f.what).collect();
        assert_eq!(
            whats,
            [
                "the root configuration",
                "the AWS credentials",
                "the CA bundle the KMS endpoint is checked against"
            ]
        );
        assert!(
            warnings[0].contains("long-lived access key"),
            "{warnings:?}"
        );
        // Roles Anywhere through credential_process: the helper, its certificate and key.
        let (cert, key) = (dir.path().join("host.pem"), dir.path().join("host.key"));
        std::fs::write(&cert, "cert").expect("write");
        std::fs::write(&key, "key").expect("write");
        let aws_config = dir.path().join("aws-config");
        std::fs::write(
            &aws_config,
            format!(
                "[profile cryptnbd]\ncredential_process = /usr/local/bin/aws_signing_helper \
                 credential-process --certificate {} --private-key \"{}\" --role-arn arn:x\n",
                cert.display(),
                key.display()
            ),
        )
        .expect("write");
        let c: RootConfig = toml::from_str(&format!(
            "[kms]\nbackend = \"aws\"\n[kms.aws]\nconfig_file = \"{}\"\n",
            aws_config.display()
        ))
        .expect("parse");
        assert_eq!(
            c.programs(),
            [PathBuf::from("/usr/local/bin/aws_signing_helper")]
        );
        let (files, _) = c.image_files(&config, image_config).expect("files");
        let sources: Vec<&Path> = files.iter().map(|f| f.source.as_path()).collect();
        assert!(
            sources.contains(&cert.as_path()) && sources.contains(&key.as_path()),
            "{sources:?}"
        );
        assert!(sources.contains(&aws_config.as_path()));

        // A plain-HTTP test endpoint needs no CA bundle.
        let c: RootConfig = toml::from_str(
            "[kms]\nbackend = \"aws\"\n[kms.aws]\nendpoint_url = \"http://10.0.2.2:5000\"\n",
        )
        .expect("parse");
        assert_eq!(
            c.image_files(&config, image_config).expect("files").0.len(),
            1
        );

        let c: RootConfig =
            toml::from_str("[kms]\npassphrase_file = \"/etc/pass\"\n").expect("parse");
        let e = c
            .image_files(&config, image_config)
            .expect_err("a passphrase file");
        assert!(e.contains("kms.passphrase_file"), "{e}");
    }
}
