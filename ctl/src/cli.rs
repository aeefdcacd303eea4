//! The command line, as clap derive types. The doc comments are the help text; docs/cli.md
//! is the full reference and must match.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Control cryptnbd: encrypted volumes served over NBD, keys wrapped by a KMS.
#[derive(Debug, Parser)]
#[command(name = "cryptnbdctl", version, propagate_version = true)]
pub struct Cli {
    /// State directory (keystore, volumes). Default: /var/lib/cryptnbd as root, else
    /// $XDG_STATE_HOME/cryptnbd.
    #[arg(long, global = true, env = "CRYPTNBD_STATE_DIR", value_name = "DIR")]
    pub state_dir: Option<PathBuf>,

    /// Control socket of the daemon. Default: /run/cryptnbd/control.sock as root, else
    /// $XDG_RUNTIME_DIR/cryptnbd/control.sock.
    #[arg(long, global = true, env = "CRYPTNBD_SOCKET", value_name = "PATH")]
    pub socket: Option<PathBuf>,

    /// Print machine-readable JSON on stdout instead of text.
    #[arg(long, global = true)]
    pub json: bool,

    /// File holding the passphrase of a sealed local keystore (else env
    /// CRYPTNBD_KMS_PASSPHRASE).
    #[arg(long, global = true, value_name = "FILE")]
    pub kms_passphrase_file: Option<PathBuf>,

    /// More log output on stderr (-v info, -vv debug).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The verbs.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create an encrypted volume: a fresh 64-byte data key from the KMS, wrapped under the
    /// identity context (SID, directory, volume id), stored in a LUKS2 header.
    Create(CreateArgs),
    /// Show a volume's header and KMS token (never key material).
    Inspect {
        /// Volume name (in the state directory) or path to a volume file.
        volume: String,
    },
    /// Attach a volume: the daemon unwraps its key through the KMS and exports it over NBD.
    Attach(AttachArgs),
    /// Detach a volume: drain in-flight requests, flush, close, wipe the key.
    Detach {
        /// Volume name.
        volume: String,
        /// Disconnect connected clients (their in-flight requests are finished first)
        /// instead of refusing.
        #[arg(long)]
        force: bool,
    },
    /// List every volume in the state directory, attached or not.
    List,
    /// Show attached volumes: exports, URIs, connections, bytes read and written.
    Status {
        /// One volume (all attached ones when absent).
        volume: Option<String>,
    },
    /// Delete a detached volume: wipe both header copies and the keyslot area, then remove
    /// the file. Without the header the data cannot be decrypted, even with the KMS.
    Delete {
        /// Volume name.
        volume: String,
        /// Do not ask for confirmation (needed when stdin is not a terminal).
        #[arg(long)]
        yes: bool,
        /// Also delete the volume's snapshots (each holds the same wrapped key).
        #[arg(long)]
        with_snapshots: bool,
    },
    /// Restore a volume's content from its recorded base image, another image or a
    /// snapshot. The KMS must still unwrap the volume's key; the swap is atomic.
    Rebuild {
        /// Volume name.
        volume: String,
        /// Rebuild from this image (raw, or any format qemu-img reads) instead of the
        /// recorded base image.
        #[arg(long, value_name = "PATH", conflicts_with = "from_snapshot")]
        from_image: Option<PathBuf>,
        /// Rebuild from this snapshot.
        #[arg(long, value_name = "NAME")]
        from_snapshot: Option<String>,
        /// If attached: detach (draining clients), rebuild, re-attach under the same export.
        #[arg(long)]
        force: bool,
    },
    /// Take a crash-consistent snapshot (a reflink where the filesystem can, else a copy
    /// while writes wait). Each snapshot is a LUKS2 volume file cryptsetup reads.
    Snapshot {
        /// Volume name.
        volume: String,
        /// Snapshot name (default: the UTC time, YYYYMMDD-HHMMSS).
        name: Option<String>,
    },
    /// List a volume's snapshots.
    Snapshots {
        /// Volume name.
        volume: String,
    },
    /// Delete a snapshot (its header is wiped first).
    DeleteSnapshot {
        /// Volume name.
        volume: String,
        /// Snapshot name.
        name: String,
    },
    /// Re-wrap the volume key under another master key and/or context (KMS ReEncrypt); no
    /// data is rewritten. Snapshots keep their old wrapping.
    Rekey {
        /// Volume name.
        volume: String,
        /// The new master key: key id or alias/NAME.
        #[arg(long, value_name = "KEY")]
        kms_key: String,
        /// New extra context pair, repeatable (replaces the old extra pairs; the identity
        /// pairs stay).
        #[arg(long = "context", value_name = "K=V")]
        context: Vec<String>,
        /// Drop the extra context pairs (keep only the identity pairs).
        #[arg(long, conflicts_with = "context")]
        clear_context: bool,
    },
    /// A new data key and every sector re-encrypted into a new file, then an atomic swap.
    /// Recovery keyslots (they hold the old key) are removed.
    Reencrypt {
        /// Volume name.
        volume: String,
        /// If attached: detach (draining clients), re-encrypt, re-attach.
        #[arg(long)]
        force: bool,
    },
    /// Move a detached volume to another store of the daemon (its files, its RBD pool): a
    /// copy of the same header and ciphertext, swapped in crash-safely, with progress.
    Move {
        /// Volume name.
        volume: String,
        /// Where it goes.
        #[arg(long, value_name = "file|rbd", value_parser = ["file", "rbd"])]
        to_store: String,
    },
    /// Recovery passphrase keyslots: break-glass access without the KMS (cryptsetup opens
    /// the volume with the passphrase). Off by default.
    #[command(subcommand)]
    Recovery(RecoveryCommand),
    /// Decrypt a volume into a raw image file, for migration off cryptnbd.
    Export {
        /// Volume name.
        volume: String,
        /// The raw image to write (must not exist).
        #[arg(long, value_name = "PATH")]
        to: PathBuf,
        /// Required: the output is not encrypted.
        #[arg(long)]
        plaintext: bool,
    },
    /// Header backup and restore (the same file as cryptsetup luksHeaderBackup).
    #[command(subcommand)]
    Header(HeaderCommand),
    /// Cancel the long operation running on a volume (it cleans up; nothing is changed).
    Cancel {
        /// Volume name.
        volume: String,
    },
    /// Show the long operations running now.
    Operations,
    /// Incident response: detach every attached volume wrapped under a master key now
    /// (clients disconnected, keys wiped, long operations cancelled).
    Revoke {
        /// Key id, ARN or alias.
        #[arg(long, value_name = "KEY")]
        kms_key: String,
    },
    /// Read the audit trail: one record per KMS operation and key-related action.
    Audit {
        /// Only records about this volume.
        #[arg(long)]
        volume: Option<String>,
        /// Only records at or after this time (RFC 3339, e.g. 2026-11-22T10:00:00Z).
        #[arg(long)]
        since: Option<String>,
        /// At most this many (the newest).
        #[arg(long)]
        limit: Option<usize>,
    },
    /// Manage the embedded local KMS.
    #[command(subcommand)]
    Kms(KmsCommand),
    /// TLS of the NBD listeners (docs/tls.md).
    #[command(subcommand)]
    Tls(TlsCommand),
    /// The encrypted root at boot: what the initramfs hooks and scripts run
    /// (docs/root-volume.md).
    #[command(subcommand)]
    Initramfs(InitramfsCommand),
    /// Open a volume with the kernel's dm-crypt (the fast path; root): the daemon unwraps its
    /// key through the KMS as for attach and hands it to cryptsetup through a pipe.
    Open(OpenArgs),
    /// Close a dm-crypt mapping made by 'open --dm-crypt' (cryptsetup close).
    Close {
        /// The device-mapper name (/dev/mapper/NAME).
        name: String,
    },
}

/// `recovery` verbs.
#[derive(Debug, Subcommand)]
pub enum RecoveryCommand {
    /// Add an argon2id keyslot holding the volume key, opened by a passphrase.
    Add {
        /// Volume name.
        volume: String,
        /// File holding the passphrase (at least 8 characters; a trailing newline is
        /// dropped).
        #[arg(long, value_name = "FILE")]
        passphrase_file: PathBuf,
    },
    /// Remove a recovery keyslot (all of them when --keyslot is absent); its area is
    /// overwritten.
    Remove {
        /// Volume name.
        volume: String,
        /// The keyslot id (see 'cryptnbdctl inspect').
        #[arg(long)]
        keyslot: Option<u32>,
    },
}

/// `header` verbs.
#[derive(Debug, Subcommand)]
pub enum HeaderCommand {
    /// Copy the header area (both copies and the keyslots) to a file. Keep it safe: with the
    /// KMS, or a recovery passphrase, it opens the volume.
    Backup {
        /// Volume name.
        volume: String,
        /// The backup file to write (must not exist).
        #[arg(long, value_name = "FILE")]
        to: PathBuf,
    },
    /// Write a header backup back over a detached volume's header area.
    Restore {
        /// Volume name.
        volume: String,
        /// The backup file.
        #[arg(long, value_name = "FILE")]
        from: PathBuf,
        /// Accept a backup of another volume (a different UUID).
        #[arg(long)]
        force: bool,
    },
}

/// Arguments of `create`.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Volume name: 1-64 letters, digits, '.', '_', '-'. The file is
    /// STATE_DIR/volumes/NAME.luks.
    pub name: String,
    /// Size of the volume's data: 10G, 512M, 1T (powers of 1024), 10GB (powers of 1000) or
    /// bytes. With --from-image: the image's size when absent; on a block device (--path):
    /// all of the device after the header area when absent.
    #[arg(long, value_parser = crate::units::parse_size, required_unless_present_any = ["from_image", "path"])]
    pub size: Option<u64>,
    /// Encrypt this existing image into the new volume (raw, or any format qemu-img reads:
    /// qcow2, vmdk, vhdx, ...). Needs the daemon.
    #[arg(long, value_name = "PATH")]
    pub from_image: Option<PathBuf>,
    /// Record the image (path, size, SHA-256) as the volume's base image, for 'rebuild'.
    #[arg(long, requires = "from_image")]
    pub record_base: bool,
    /// KMS master key that wraps the data key: key id or alias/NAME.
    #[arg(long, value_name = "KEY")]
    pub kms_key: String,
    /// The user's Windows-style SID, e.g. S-1-5-21-277731876-1789304096-451871588-1107.
    #[arg(long)]
    pub sid: String,
    /// The directory id, e.g. d-1234abcd01.
    #[arg(long)]
    pub directory: String,
    /// Extra encryption-context pair, repeatable: --context classification=secret.
    #[arg(long = "context", value_name = "K=V")]
    pub context: Vec<String>,
    /// Encryption sector size in bytes.
    #[arg(long, default_value_t = 4096, value_parser = parse_sector_size)]
    pub sector_size: u32,
    /// Volume id (vol- and 17 hex digits); generated when absent.
    #[arg(long)]
    pub volume_id: Option<String>,
    /// Context key holding "[SID]@[DIRECTORY]".
    #[arg(long, default_value = "cryptnbd:sid-directoryid", value_name = "KEY")]
    pub sid_directory_key: String,
    /// Context key holding the volume id.
    #[arg(long, default_value = "cryptnbd:volume-id", value_name = "KEY")]
    pub volume_id_key: String,
    /// The context keys Amazon EBS uses for encrypted WorkSpaces:
    /// `aws:workspaces:sid-directoryid` and `aws:ebs:id` (docs/aws-kms.md).
    #[arg(long, conflicts_with_all = ["sid_directory_key", "volume_id_key"])]
    pub ebs_context: bool,
    /// Create the volume file at this path instead of in the state directory; a block device
    /// (a partition or a whole disk) is formatted in place, all of it unless --size says less.
    /// A device that is in use, or holds a filesystem, a partition table, a LUKS header, LVM
    /// or swap, is refused.
    #[arg(long, value_name = "PATH", conflicts_with = "store")]
    pub path: Option<PathBuf>,
    /// Where the volume lives: `file` (the state directory) or `rbd` (the daemon's Ceph
    /// pool, [store.rbd]) [default: the daemon's [store] default].
    #[arg(long, value_name = "file|rbd", value_parser = ["file", "rbd"])]
    pub store: Option<String>,
}

impl CreateArgs {
    /// The context keys the identity goes under.
    pub fn context_keys(&self) -> kms_client::ContextKeys {
        if self.ebs_context {
            kms_client::ContextKeys {
                sid_directory: "aws:workspaces:sid-directoryid".into(),
                volume_id: "aws:ebs:id".into(),
            }
        } else {
            kms_client::ContextKeys {
                sid_directory: self.sid_directory_key.clone(),
                volume_id: self.volume_id_key.clone(),
            }
        }
    }
}

/// Arguments of `attach`.
#[derive(Debug, Args)]
pub struct AttachArgs {
    /// Volume name.
    pub volume: String,
    /// Export read-only.
    #[arg(long)]
    pub read_only: bool,
    /// NBD export name (default: the volume name).
    #[arg(long, value_name = "NAME")]
    pub export_name: Option<String>,
    /// Do not re-attach when the daemon restarts.
    #[arg(long)]
    pub transient: bool,
    /// Refuse unless the volume belongs to this SID (checked before any KMS call).
    #[arg(long)]
    pub sid: Option<String>,
    /// Refuse unless the volume belongs to this directory.
    #[arg(long)]
    pub directory: Option<String>,
    /// Another user who may open the export (repeatable); root and you always may.
    #[arg(long = "allow-uid", value_name = "UID")]
    pub allow_uids: Vec<u32>,
    /// A group whose members (by primary group) may open the export (repeatable).
    #[arg(long = "allow-gid", value_name = "GID")]
    pub allow_gids: Vec<u32>,
    /// Also export on the daemon's TCP listener.
    #[arg(long)]
    pub tcp: bool,
    /// Serve the export only over TLS (the daemon's [nbd.tls] mode must be on or require).
    #[arg(long)]
    pub tls_only: bool,
    /// Who may open the export over TLS.
    #[command(flatten)]
    pub certs: CertRuleArgs,
    /// Also make the volume a kernel block device: the daemon binds /dev/nbdN through the
    /// kernel's netlink NBD interface (nbd module loaded, CAP_SYS_ADMIN); `auto` takes the
    /// first free device.
    #[arg(long, value_name = "/dev/nbdN|auto")]
    pub device: Option<String>,
    /// Kernel device: connections to the daemon (1-16; the kernel spreads its queues over
    /// them) [default: 1].
    #[arg(long, value_name = "N", requires = "device")]
    pub connections: Option<u32>,
    /// Kernel device: seconds a request may go unanswered before the kernel drops that
    /// connection and resends it once reconnected (0: wait for ever) [default: 30].
    #[arg(long, value_name = "SECS", requires = "device")]
    pub io_timeout: Option<u64>,
    /// Kernel device: seconds the kernel keeps I/O queued while the daemon is away (a
    /// restart) before failing it with EIO [default: 120].
    #[arg(long, value_name = "SECS", requires = "device")]
    pub dead_conn_timeout: Option<u64>,
    /// Take the volume from the host that holds it (an RBD volume): waits until that host is
    /// gone (its watch lapses, 30 s by default), then fences it so it can never write again.
    #[arg(long)]
    pub take_over: bool,
    /// With --take-over: do not wait; fence the holder even if it is alive.
    #[arg(long, requires = "take_over")]
    pub force: bool,
}

/// The `--allow-cert*` flags of `attach` and `tls allow`.
#[derive(Debug, Args)]
pub struct CertRuleArgs {
    /// A client certificate subject that may open the export, as `certtool -i` prints it,
    /// e.g. `CN=host1.example.com,O=Example` (`*` matches within a value; repeatable).
    /// Without any --allow-cert*, every certificate the CA signed may.
    #[arg(long = "allow-cert", value_name = "DN")]
    pub allow_certs: Vec<String>,
    /// A client certificate by issuer and serial: give --allow-cert-serial with it
    /// (repeatable, in pairs).
    #[arg(
        long = "allow-cert-issuer",
        value_name = "DN",
        requires = "allow_cert_serials"
    )]
    pub allow_cert_issuers: Vec<String>,
    /// The serial number (hex) that goes with --allow-cert-issuer.
    #[arg(
        long = "allow-cert-serial",
        value_name = "HEX",
        requires = "allow_cert_issuers"
    )]
    pub allow_cert_serials: Vec<String>,
    /// A client certificate by its SHA-256 fingerprint (hex, colons allowed; repeatable).
    #[arg(long = "allow-cert-sha256", value_name = "FINGERPRINT")]
    pub allow_cert_sha256: Vec<String>,
}

/// `tls` verbs.
#[derive(Debug, Subcommand)]
pub enum TlsCommand {
    /// Re-read the certificates and the CRL (as SIGHUP does), then check every live TLS
    /// session again: those whose certificate is now revoked, expired or no longer allowed
    /// are disconnected. A configuration that fails its checks is not used.
    Reload,
    /// Replace the certificate allow-list of an attached export, without detaching it: its
    /// live TLS sessions that the new list refuses are disconnected. A persistent attachment
    /// keeps the new list when the daemon restarts.
    Allow(TlsAllowArgs),
}

/// Arguments of `tls allow`.
#[derive(Debug, Args)]
pub struct TlsAllowArgs {
    /// Volume name (attached).
    pub volume: String,
    /// The new list.
    #[command(flatten)]
    pub certs: CertRuleArgs,
    /// Admit every certificate the CA signed and did not revoke (an empty list).
    #[arg(long, conflicts_with_all = ["allow_certs", "allow_cert_issuers", "allow_cert_sha256"])]
    pub any: bool,
}

/// `kms` verbs (local KMS).
#[derive(Debug, Subcommand)]
pub enum KmsCommand {
    /// Create a master key.
    CreateKey {
        /// Alias, used as alias/NAME.
        #[arg(long)]
        alias: Option<String>,
        /// Free-form description.
        #[arg(long, default_value = "")]
        description: String,
    },
    /// List the master keys.
    ListKeys,
    /// Show one master key.
    DescribeKey {
        /// Key id or alias/NAME.
        key: String,
    },
    /// Enable a disabled key.
    EnableKey {
        /// Key id or alias/NAME.
        key: String,
    },
    /// Disable a key: volumes wrapped by it cannot be attached until it is enabled again.
    DisableKey {
        /// Key id or alias/NAME.
        key: String,
    },
    /// Schedule a key for deletion after a waiting period. Every volume wrapped by it is lost
    /// when the period ends, unless the deletion is cancelled.
    ScheduleKeyDeletion {
        /// Key id or alias/NAME.
        key: String,
        /// Waiting period in days (7-30).
        #[arg(long, default_value_t = 30)]
        days: u32,
    },
    /// Cancel a scheduled deletion (the key is left disabled, as in AWS KMS).
    CancelKeyDeletion {
        /// Key id or alias/NAME.
        key: String,
    },
    /// Rotate a key: new data keys use a new backing key; old ones still unwrap.
    RotateKey {
        /// Key id or alias/NAME.
        key: String,
    },
    /// Seal the keystore with a passphrase (argon2id): master keys are then encrypted at rest
    /// and every later use needs the passphrase (--kms-passphrase-file or
    /// CRYPTNBD_KMS_PASSPHRASE). On a sealed keystore this changes the passphrase.
    Seal {
        /// File holding the new passphrase (else env CRYPTNBD_NEW_KMS_PASSPHRASE).
        #[arg(long, value_name = "FILE")]
        new_passphrase_file: Option<PathBuf>,
    },
    /// Write an encrypted backup of the whole keystore. Without the keystore every volume is
    /// lost: keep a backup somewhere else.
    Backup {
        /// Backup file to write.
        #[arg(long, value_name = "FILE")]
        to: PathBuf,
        /// File holding the backup passphrase (else env CRYPTNBD_BACKUP_PASSPHRASE).
        #[arg(long, value_name = "FILE")]
        passphrase_file: Option<PathBuf>,
    },
    /// Restore a keystore backup into an empty keystore.
    Restore {
        /// Backup file to read.
        #[arg(long, value_name = "FILE")]
        from: PathBuf,
        /// File holding the backup passphrase (else env CRYPTNBD_BACKUP_PASSPHRASE).
        #[arg(long, value_name = "FILE")]
        passphrase_file: Option<PathBuf>,
    },
}

fn parse_sector_size(s: &str) -> Result<u32, String> {
    match s {
        "512" => Ok(512),
        "4096" => Ok(4096),
        _ => Err(format!(
            "sector size '{s}' is not supported: use 512 or 4096"
        )),
    }
}

/// Arguments of `open`.
#[derive(Debug, Args)]
pub struct OpenArgs {
    /// Volume name.
    pub volume: String,
    /// Map it with the kernel's dm-crypt as /dev/mapper/NAME (needs root, cryptsetup and a
    /// kernel with dm-crypt).
    #[arg(long = "dm-crypt", value_name = "NAME", required = true)]
    pub dm_crypt: String,
    /// Map it read-only.
    #[arg(long)]
    pub read_only: bool,
    /// Refuse unless the volume belongs to this SID (checked before any KMS call).
    #[arg(long)]
    pub sid: Option<String>,
    /// Refuse unless the volume belongs to this directory.
    #[arg(long)]
    pub directory: Option<String>,
}

/// `initramfs …`.
#[derive(Debug, Subcommand)]
pub enum InitramfsCommand {
    /// Copy the root configuration and what its KMS needs (keystore, AWS files, CA bundle)
    /// into an initramfs being built, and print the programs to copy with their libraries
    /// (run by the initramfs-tools hook and the dracut module).
    Prepare(PrepareArgs),
    /// Unlock the root volume the kernel command line names (cryptnbd.root=…), and print
    /// the device to mount (run by the initramfs at boot).
    Unlock(UnlockArgs),
    /// Tell, before a reboot, whether the installed initramfs can unlock the root: what is
    /// missing, what is stale (a keystore older than the last rekey, another build), and
    /// whether others may read it. Exit 1 when it cannot.
    Check(CheckArgs),
}

/// `initramfs check`.
#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The image. Default: /boot/initrd.img-RELEASE of --kver, else of the running kernel.
    #[arg(long, value_name = "FILE")]
    pub image: Option<PathBuf>,
    /// The kernel release the image is for.
    #[arg(long, value_name = "RELEASE")]
    pub kver: Option<String>,
    /// The root configuration on this host.
    #[arg(long, value_name = "FILE", default_value = boot::cmdline::DEFAULT_CONFIG)]
    pub config: PathBuf,
    /// Where the root configuration is in the image.
    #[arg(long, value_name = "PATH", default_value = boot::cmdline::DEFAULT_CONFIG)]
    pub config_in_image: PathBuf,
    /// A kernel command line whose cryptnbd.mode says which kernel modules are needed (both
    /// ways' when it names no root).
    #[arg(long, value_name = "FILE", default_value = "/proc/cmdline")]
    pub cmdline: PathBuf,
}

/// `initramfs prepare`.
#[derive(Debug, Args)]
pub struct PrepareArgs {
    /// The image tree being built (DESTDIR of an initramfs-tools hook, initdir of dracut).
    #[arg(long, value_name = "DIR")]
    pub dest: PathBuf,
    /// The root configuration on this host.
    #[arg(long, value_name = "FILE", default_value = boot::cmdline::DEFAULT_CONFIG)]
    pub config: PathBuf,
    /// Where the root configuration goes in the image (what cryptnbd.config= names).
    #[arg(long, value_name = "PATH", default_value = boot::cmdline::DEFAULT_CONFIG)]
    pub config_in_image: PathBuf,
}

/// `initramfs unlock`.
#[derive(Debug, Args)]
pub struct UnlockArgs {
    /// The kernel command line to read.
    #[arg(long, value_name = "FILE", default_value = "/proc/cmdline")]
    pub cmdline: PathBuf,
    /// Where the root daemon keeps its sockets and state (moved with /run to the real root).
    #[arg(long, value_name = "DIR", default_value = control_api::paths::ROOT_RUNTIME_DIR)]
    pub runtime_dir: PathBuf,
    /// The root of the initramfs tree the keystore copy is read from.
    #[arg(long, value_name = "DIR", default_value = "/")]
    pub initramfs_root: PathBuf,
    /// The daemon to start. Default: cryptnbd beside this program.
    #[arg(long, value_name = "FILE")]
    pub daemon: Option<PathBuf>,
    /// Where a sealed keystore's passphrase is asked. Default: systemd's password agents in
    /// a systemd initramfs, else /dev/console.
    #[arg(long, value_name = "TTY")]
    pub console: Option<PathBuf>,
}
