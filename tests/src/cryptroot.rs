//! The encrypted root of issue 16 in the VM rig (tests/src/vm.rs): a root volume made on the
//! host, the files the Debian root gets before its initramfs is built (our release binaries,
//! cryptnbd's initramfs-tools and dracut integration from `boot/`, the root configuration
//! and what its KMS needs), and AWS KMS on the host (moto behind the scripted endpoint of
//! [`crate::kms_proxy`], which the guest reaches as 10.0.2.2).
//!
//! The root volume is a volume file of a daemon on the host (`create root --from-image`),
//! handed to qemu as the guest's first raw virtio disk: a volume file holds exactly what a
//! device would (the LUKS2 header at byte 0, the data after the 16 MiB header area), so the
//! guest's `/dev/vda` is a cryptnbd volume on a device, found by its LUKS2 UUID.

use std::io::Read as _;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use crate::daemon::Daemon;
use crate::kms_proxy::{KmsProxy, Reply, Rule};
use crate::moto::{self, Moto, bare};
use crate::{TEST_DIRECTORY, TEST_SID, TestDir, require_tool, run, target_dir, workspace_root};

/// The root volume's name: the daemon's volume in the initramfs (`boot::cmdline::ROOT_VOLUME`)
/// and the host daemon's volume the tests create.
pub const ROOT_VOLUME: &str = "root";
/// The device the dm-crypt way maps (`boot::cmdline::DM_NAME` under /dev/mapper).
pub const DM_DEVICE: &str = "/dev/mapper/cryptnbd-root";
/// The root daemon's audit trail, which moves to the real root with /run
/// (docs/root-volume.md, "The audit trail of a boot").
pub const ROOT_TRAIL: &str = "/run/cryptnbd-root/state/audit/audit.jsonl";

/// AWS KMS for a root boot: moto on the host's loopback, behind the scripted endpoint (which
/// adds what moto does not enforce: a disabled key refused), one symmetric key.
pub struct HostKms {
    /// The KMS API server.
    pub moto: Moto,
    /// What the daemons talk to (host and guest alike).
    pub proxy: KmsProxy,
    /// The key's ARN.
    pub key: String,
}

impl HostKms {
    /// Starts moto and the endpoint in front of it, and creates the key.
    #[track_caller]
    pub fn start() -> Self {
        let moto = Moto::start();
        let proxy = KmsProxy::start(Some(moto.addr));
        let key = moto.create_key("cryptnbd root volume");
        Self { moto, proxy, key }
    }

    /// The endpoint's port on the host's 127.0.0.1; the guest reaches it as 10.0.2.2 (qemu's
    /// user networking).
    pub fn port(&self) -> u16 {
        port_of(&self.proxy.url())
    }

    /// Disables the key the way AWS does: DescribeKey says `Disabled` (moto), and the crypto
    /// calls get DisabledException (the scripted endpoint: moto would still decrypt).
    pub fn disable_key(&self) {
        self.moto.admin("disable_key", &self.key);
        self.proxy.push(
            Rule::on(
                &["Decrypt", "GenerateDataKey", "ReEncrypt"],
                Reply::error(
                    409,
                    "DisabledException",
                    &format!("{} is disabled.", self.key),
                ),
            )
            .for_key(bare(&self.key)),
        );
    }
}

/// The port of `http://127.0.0.1:PORT`.
#[track_caller]
fn port_of(url: &str) -> u16 {
    url.rsplit_once(':')
        .and_then(|(_, p)| p.trim_end_matches('/').parse().ok())
        .unwrap_or_else(|| panic!("no port in {url}"))
}

/// No credentials from the test's own environment, no instance metadata lookups.
const AWS_ENV: &[(&str, &str)] = &[
    ("AWS_ACCESS_KEY_ID", ""),
    ("AWS_SECRET_ACCESS_KEY", ""),
    ("AWS_EC2_METADATA_DISABLED", "true"),
];

/// A root volume made by a daemon on the host.
pub struct RootVolume {
    /// The host daemon (AWS KMS at [`HostKms::proxy`]); the volume is not attached.
    pub daemon: Daemon,
    /// The volume file, the guest's `/dev/vda`.
    pub path: PathBuf,
    /// Its LUKS2 UUID (`cryptnbd.root=UUID=…`).
    pub uuid: String,
}

/// What a new root volume holds.
#[derive(Debug, Clone, Copy)]
pub enum Content<'a> {
    /// The root image (`create --from-image`, which must keep the image's size).
    Image(&'a Path),
    /// Nothing, this long (`--size`, as the CLI takes it): for boots that stop at the unlock.
    Empty(&'a str),
}

impl Content<'_> {
    /// The `create` arguments that give the volume this content.
    fn create_args(&self) -> Vec<String> {
        match self {
            Content::Image(i) => vec!["--from-image".into(), i.to_string_lossy().into_owned()],
            Content::Empty(size) => vec!["--size".into(), (*size).to_owned()],
        }
    }

    /// Checks what `create --json` answered: a volume made from an image has its size.
    #[track_caller]
    pub fn check_created(&self, created: &serde_json::Value) {
        if let Content::Image(i) = self {
            let len = std::fs::metadata(i).expect("the root image").len();
            assert_eq!(
                created["size"].as_u64(),
                Some(len),
                "the volume made from the image does not have its size: {created}"
            );
        }
    }
}

/// `create root CONTENT --kms-key KEY --sid TEST_SID --directory TEST_DIRECTORY --json`
/// through `daemon`; returns its answer, checked against `content`.
#[track_caller]
pub fn create_root(daemon: &Daemon, key: &str, content: Content<'_>) -> serde_json::Value {
    let content_args = content.create_args();
    let mut args = vec!["--json", "create", ROOT_VOLUME];
    args.extend(content_args.iter().map(String::as_str));
    args.extend([
        "--kms-key",
        key,
        "--sid",
        TEST_SID,
        "--directory",
        TEST_DIRECTORY,
    ]);
    let created = daemon.ctl.run(&args).assert_success().json();
    content.check_created(&created);
    created
}

impl RootVolume {
    /// The volume `root` holding `content` under `kms`'s key, created by a host daemon whose
    /// KMS is `kms`.
    #[track_caller]
    pub fn on_aws(dir: &TestDir, kms: &HostKms, content: Content<'_>) -> Self {
        let daemon = Daemon::start_env(
            dir,
            &moto::daemon_aws_config(dir.path(), &kms.proxy.url(), "", "", (2.0, 5.0)),
            AWS_ENV,
        );
        create_root(&daemon, &kms.key, content);
        let path = daemon
            .state_dir
            .join("volumes")
            .join(format!("{ROOT_VOLUME}.luks"));
        let uuid = luks_uuid(&path);
        Self { daemon, path, uuid }
    }

    /// The SHA-256 of the whole volume file (header and data).
    #[track_caller]
    pub fn sha256(&self) -> String {
        file_sha256(&self.path)
    }
}

/// The UUID of the LUKS2 header at the start of `path` (bytes 168..208, NUL-padded text),
/// read without the volume crate.
#[track_caller]
pub fn luks_uuid(path: &Path) -> String {
    let mut head = [0u8; 512];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut head))
        .unwrap_or_else(|e| panic!("cannot read the header of {}: {e}", path.display()));
    assert_eq!(
        &head[..6],
        b"LUKS\xba\xbe",
        "{} has no LUKS magic",
        path.display()
    );
    let field = &head[168..208];
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    let uuid = String::from_utf8_lossy(&field[..end]).into_owned();
    assert_eq!(uuid.len(), 36, "{}: UUID {uuid:?}", path.display());
    uuid
}

/// The SHA-256 of a file, by `sha256sum`.
#[track_caller]
pub fn file_sha256(path: &Path) -> String {
    let sha256sum = require_tool("sha256sum", "coreutils");
    run(Command::new(sha256sum).arg(path))
        .assert_success()
        .stdout_text()
        .split_whitespace()
        .next()
        .unwrap_or_else(|| panic!("sha256sum printed nothing for {}", path.display()))
        .to_owned()
}

/// The guest's root configuration for AWS KMS at 10.0.2.2:`port` (the host's endpoint), with
/// the credentials files of [`RootFiles::aws_files`]: two attempts per call, 5 s each, 15 s
/// per operation.
pub fn guest_aws_config(port: u16) -> String {
    format!(
        "# The root configuration of the VM rig's root boots (tests/src/cryptroot.rs).\n\
         [kms]\nbackend = \"aws\"\n[kms.aws]\nregion = \"{}\"\n\
         endpoint_url = \"http://10.0.2.2:{port}\"\n\
         config_file = \"/etc/cryptnbd/aws-config\"\n\
         credentials_file = \"/etc/cryptnbd/aws-credentials\"\n\
         max_attempts = 2\ninitial_backoff_ms = 200\nmax_backoff_ms = 1000\n\
         attempt_timeout_secs = 5.0\noperation_timeout_secs = 15.0\n",
        moto::REGION
    )
}

/// The tree laid over the Debian root before its initramfs is built
/// (`tests/vm/root-initramfs.sh FILES_DIR`), as a user's system would have it installed.
pub struct RootFiles {
    /// The tree's top.
    pub dir: PathBuf,
}

impl RootFiles {
    /// `dir/NAME`: the release binaries (stripped) as /usr/sbin/cryptnbd and
    /// /usr/sbin/cryptnbdctl; boot/initramfs-tools/ under /usr/share/initramfs-tools/;
    /// boot/dracut/90cryptnbd/ as /usr/lib/dracut/modules.d/90cryptnbd/; `root_toml` as
    /// /etc/cryptnbd/root.toml.
    #[track_caller]
    pub fn new(dir: &TestDir, name: &str, root_toml: &str) -> Self {
        let top = dir.join(name);
        let (daemon, ctl) = stripped_release_bins();
        install(daemon, &top.join("usr/sbin/cryptnbd"), 0o755);
        install(ctl, &top.join("usr/sbin/cryptnbdctl"), 0o755);
        let boot = workspace_root().join("boot");
        for f in [
            "hooks/cryptnbd",
            "scripts/local-top/cryptnbd",
            "conf-hooks.d/cryptnbd",
        ] {
            let mode = if f.starts_with("conf-hooks.d") {
                0o644
            } else {
                0o755
            };
            install(
                &boot.join("initramfs-tools").join(f),
                &top.join("usr/share/initramfs-tools").join(f),
                mode,
            );
        }
        for f in [
            "module-setup.sh",
            "cryptnbd-cmdline.sh",
            "cryptnbd-unlock.sh",
        ] {
            install(
                &boot.join("dracut/90cryptnbd").join(f),
                &top.join("usr/lib/dracut/modules.d/90cryptnbd").join(f),
                0o755,
            );
        }
        let config = top.join("etc/cryptnbd/root.toml");
        std::fs::create_dir_all(config.parent().expect("a directory"))
            .unwrap_or_else(|e| panic!("mkdir for {}: {e}", config.display()));
        std::fs::write(&config, root_toml)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", config.display()));
        Self { dir: top }
    }

    /// The AWS configuration and credentials files (moto's fake keys) as
    /// /etc/cryptnbd/aws-config and /etc/cryptnbd/aws-credentials, mode 0600.
    #[track_caller]
    pub fn aws_files(self) -> Self {
        let etc = self.dir.join("etc/cryptnbd");
        let (config, credentials) = moto::write_aws_files(&etc);
        for f in [config, credentials] {
            std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600))
                .unwrap_or_else(|e| panic!("chmod {}: {e}", f.display()));
        }
        self
    }
}

/// The product installed on the real root of a root-boot test (laid over the root image,
/// `tests/vm/root-image.sh OVERLAY`), as a source build installs it (docs/systemd.md): the
/// release binaries in /usr/local/bin, `cryptnbd.service` enabled, and the shipped
/// /etc/cryptnbd/cryptnbd.toml. Returns the tree's top, `dir/NAME`.
#[track_caller]
pub fn system_daemon_overlay(dir: &TestDir, name: &str) -> PathBuf {
    let top = dir.join(name);
    let (daemon, ctl) = stripped_release_bins();
    install(daemon, &top.join("usr/local/bin/cryptnbd"), 0o755);
    install(ctl, &top.join("usr/local/bin/cryptnbdctl"), 0o755);
    let systemd = workspace_root().join("systemd");
    let unit = "etc/systemd/system/cryptnbd.service";
    install(&systemd.join("cryptnbd.service"), &top.join(unit), 0o644);
    install(
        &systemd.join("cryptnbd.toml"),
        &top.join("etc/cryptnbd/cryptnbd.toml"),
        0o644,
    );
    let wants = top.join("etc/systemd/system/multi-user.target.wants");
    std::fs::create_dir_all(&wants).unwrap_or_else(|e| panic!("mkdir {}: {e}", wants.display()));
    std::os::unix::fs::symlink(format!("/{unit}"), wants.join("cryptnbd.service"))
        .unwrap_or_else(|e| panic!("cannot enable cryptnbd.service in {}: {e}", top.display()));
    top
}

/// The release binaries of the guest, stripped of their debug information (line tables:
/// 97 and 65 MiB, against 15 and 10) into `target/vm-rig/root-bin/` once per test process.
#[track_caller]
fn stripped_release_bins() -> (&'static Path, &'static Path) {
    static BINS: OnceLock<Result<(PathBuf, PathBuf), String>> = OnceLock::new();
    let got = BINS.get_or_init(|| {
        let out = crate::vm::rig_dir().join("root-bin");
        std::fs::create_dir_all(&out).map_err(|e| format!("mkdir {}: {e}", out.display()))?;
        let strip = require_tool("strip", "binutils");
        let mut done = Vec::new();
        for name in ["cryptnbd", "cryptnbdctl"] {
            let bin = target_dir().join("release").join(name);
            if !bin.is_file() {
                return Err(format!(
                    "{} is missing: the root boots put the release binaries in the guest's \
                     initramfs, build them first with `cargo build --release -p daemon -p ctl`",
                    bin.display()
                ));
            }
            let to = out.join(name);
            let _ = std::fs::remove_file(&to);
            let o = run(Command::new(&strip).arg("-o").arg(&to).arg(&bin));
            if o.code != Some(0) {
                return Err(format!("`{}` failed: {}", o.command, o.stderr));
            }
            done.push(to);
        }
        Ok((done[0].clone(), done[1].clone()))
    });
    match got {
        Ok((d, c)) => (d, c),
        Err(e) => panic!("{e}"),
    }
}

/// Copies `from` to `to` (creating its directory) with `mode`.
#[track_caller]
pub fn install(from: &Path, to: &Path, mode: u32) {
    let parent = to.parent().expect("a file in a directory");
    std::fs::create_dir_all(parent).unwrap_or_else(|e| panic!("mkdir {}: {e}", parent.display()));
    std::fs::copy(from, to)
        .unwrap_or_else(|e| panic!("copy {} to {}: {e}", from.display(), to.display()));
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", to.display()));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guest_configuration_names_the_host_endpoint_and_the_files() {
        let c = guest_aws_config(4566);
        assert!(c.contains("endpoint_url = \"http://10.0.2.2:4566\""), "{c}");
        assert!(c.contains("backend = \"aws\""), "{c}");
        assert!(c.contains("/etc/cryptnbd/aws-credentials"), "{c}");
        assert_eq!(port_of("http://127.0.0.1:4566"), 4566);
    }
}
