//! The kernel command line of an encrypted root, in the style of `nbdroot=` and `rd.luks.*`:
//!
//! - `cryptnbd.root=VOLUME` — a volume named in the root configuration's `[store.devices]`,
//!   or `cryptnbd.root=UUID=…` (the LUKS2 header's UUID), or `cryptnbd.root=/dev/…`;
//! - `cryptnbd.mode=dm-crypt|nbd` — the kernel's dm-crypt maps the root and the daemon exits
//!   (the default), or the daemon serves it on `/dev/nbd0` for the life of the system;
//! - `cryptnbd.config=PATH` — the root configuration in the initramfs (default
//!   [`DEFAULT_CONFIG`]).
//!
//! Without `cryptnbd.root` nothing is asked of us ([`parse`] gives `None`). Any other
//! `cryptnbd.` option, or a wrong value, is a [`CmdlineError`]: one sentence that names the
//! option and says what to write instead, which the initramfs shows before its emergency
//! shell. Words are split as the kernel splits them (double quotes group, and are dropped);
//! nothing after `--` is the kernel's.

use std::fmt;
use std::path::PathBuf;

use store::device::Locator;

/// The root configuration when `cryptnbd.config` does not name one.
pub const DEFAULT_CONFIG: &str = "/etc/cryptnbd/root.toml";
/// The device-mapper name of a root mapped by dm-crypt (`/dev/mapper/cryptnbd-root`).
pub const DM_NAME: &str = "cryptnbd-root";
/// The kernel NBD device a root served by the daemon is attached to.
pub const NBD_DEVICE: &str = "/dev/nbd0";
/// The volume name a root named by UUID or path gets in the daemon.
pub const ROOT_VOLUME: &str = "root";

const ROOT: &str = "cryptnbd.root";
const MODE: &str = "cryptnbd.mode";
const CONFIG: &str = "cryptnbd.config";
const OPTIONS: [&str; 3] = [ROOT, MODE, CONFIG];

/// Which volume is the root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A volume of the root configuration, by name.
    Volume(String),
    /// A block device, by the UUID of its LUKS2 header or by path.
    Device(Locator),
}

/// How the root is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The kernel's dm-crypt, with the key the daemon unwrapped; the daemon then exits.
    DmCrypt,
    /// The daemon, on [`NBD_DEVICE`], for the life of the system.
    Nbd,
}

impl Mode {
    /// `dm-crypt` or `nbd`, as written on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::DmCrypt => "dm-crypt",
            Mode::Nbd => "nbd",
        }
    }

    /// The device the root filesystem is mounted from.
    pub fn device(self) -> String {
        match self {
            Mode::DmCrypt => format!("/dev/mapper/{DM_NAME}"),
            Mode::Nbd => NBD_DEVICE.to_owned(),
        }
    }
}

/// What the command line asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootRequest {
    /// The root volume.
    pub target: Target,
    /// How it is served.
    pub mode: Mode,
    /// The root configuration.
    pub config: PathBuf,
    /// The `ip=` value, when given (the initramfs brings the network up with it).
    pub ip: Option<String>,
}

impl RootRequest {
    /// The name the daemon knows the root volume by.
    pub fn volume(&self) -> &str {
        match &self.target {
            Target::Volume(name) => name,
            Target::Device(_) => ROOT_VOLUME,
        }
    }
}

/// A command line that asks for something wrong: the sentence says what to fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CmdlineError(pub String);

impl fmt::Display for CmdlineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}; fix the kernel command line (at the boot loader's menu, or in \
             GRUB_CMDLINE_LINUX of /etc/default/grub, then update-grub)",
            self.0
        )
    }
}

impl std::error::Error for CmdlineError {}

/// The words of a kernel command line, split as the kernel does: at white space outside
/// double quotes, the quotes dropped; none after `--`.
pub fn words(cmdline: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut word = String::new();
    let (mut quoted, mut started) = (false, false);
    for c in cmdline.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                started = true;
            }
            c if c.is_whitespace() && !quoted => {
                if started {
                    if word == "--" {
                        return out;
                    }
                    out.push(std::mem::take(&mut word));
                    started = false;
                }
            }
            c => {
                word.push(c);
                started = true;
            }
        }
    }
    if started && word != "--" {
        out.push(word);
    }
    out
}

/// Reads what `cmdline` (the text of `/proc/cmdline`) asks of cryptnbd: None when it does not
/// name a root. The last of a repeated option counts, as for the kernel's own.
pub fn parse(cmdline: &str) -> Result<Option<RootRequest>, CmdlineError> {
    let (mut root, mut mode, mut config, mut ip) = (None, None, None, None);
    let mut given = Vec::new();
    for word in words(cmdline) {
        let (key, value) = match word.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (word.as_str(), None),
        };
        if key == "ip" {
            ip = value.map(str::to_owned);
            continue;
        }
        if !key.starts_with("cryptnbd.") {
            continue;
        }
        if !OPTIONS.contains(&key) {
            return Err(CmdlineError(format!(
                "{key} is not an option of cryptnbd: the options are {}",
                OPTIONS.join(", ")
            )));
        }
        let value = match value {
            Some(v) if !v.is_empty() => v,
            _ => {
                return Err(CmdlineError(format!(
                    "{key} needs a value ({key}=…): {}",
                    expected(key)
                )));
            }
        };
        given.push(key.to_owned());
        match key {
            ROOT => root = Some(target(value)?),
            MODE => {
                mode = Some(match value {
                    "dm-crypt" => Mode::DmCrypt,
                    "nbd" => Mode::Nbd,
                    _ => {
                        return Err(CmdlineError(format!("{MODE}={value}: {}", expected(MODE))));
                    }
                })
            }
            _ => {
                if !value.starts_with('/') {
                    return Err(CmdlineError(format!(
                        "{CONFIG}={value}: {}",
                        expected(CONFIG)
                    )));
                }
                config = Some(PathBuf::from(value));
            }
        }
    }
    let Some(target) = root else {
        if let Some(key) = given.first() {
            return Err(CmdlineError(format!(
                "{key} is given but {ROOT} is not: add {ROOT}=UUID=… (or remove {key})"
            )));
        }
        return Ok(None);
    };
    Ok(Some(RootRequest {
        target,
        mode: mode.unwrap_or(Mode::DmCrypt),
        config: config.unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG)),
        ip,
    }))
}

fn target(value: &str) -> Result<Target, CmdlineError> {
    if value.starts_with("UUID=") || value.starts_with('/') {
        return Locator::parse(value)
            .map(Target::Device)
            .map_err(|m| CmdlineError(format!("{ROOT}={value}: {m}")));
    }
    if let Some((tag, _)) = value.split_once('=') {
        return Err(CmdlineError(format!(
            "{ROOT}={value}: {tag}= is not a way cryptnbd finds a volume: {}",
            expected(ROOT)
        )));
    }
    control_api::paths::validate_name(value)
        .map(|()| Target::Volume(value.to_owned()))
        .map_err(|m| CmdlineError(format!("{ROOT}={value}: {m}")))
}

fn expected(key: &str) -> &'static str {
    match key {
        ROOT => {
            "give the LUKS2 header's UUID (UUID=…, as cryptsetup luksUUID prints it), a \
             device path (/dev/…) or the name of a volume in the root configuration's \
             [store.devices]"
        }
        MODE => "use dm-crypt (the default) or nbd",
        _ => "give the absolute path of the root configuration in the initramfs",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UUID: &str = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0";

    fn ok(line: &str) -> RootRequest {
        parse(line)
            .unwrap_or_else(|e| panic!("{line}: {e}"))
            .unwrap_or_else(|| panic!("{line}: no root"))
    }

    fn err(line: &str) -> String {
        parse(line).expect_err(line).to_string()
    }

    #[test]
    fn words_split_as_the_kernel_splits_them() {
        assert_eq!(
            words("a  b=\"c d\" \"e=f g\" h=\"\"\n-- init args"),
            ["a", "b=c d", "e=f g", "h="]
        );
        assert!(words("   ").is_empty());
        assert_eq!(words("x --"), ["x"]);
    }

    #[test]
    fn a_root_is_named_by_uuid_path_or_volume_with_defaults() {
        let r = ok(&format!(
            "BOOT_IMAGE=/vmlinuz ro quiet cryptnbd.root=UUID={} ip=dhcp",
            UUID.to_uppercase()
        ));
        assert_eq!(r.target, Target::Device(Locator::Uuid(UUID.into())));
        assert_eq!(
            (r.mode, r.mode.device()),
            (Mode::DmCrypt, "/dev/mapper/cryptnbd-root".into())
        );
        assert_eq!(r.config, PathBuf::from(DEFAULT_CONFIG));
        assert_eq!(r.ip.as_deref(), Some("dhcp"));
        assert_eq!(r.volume(), ROOT_VOLUME);

        let r = ok("cryptnbd.root=/dev/vdb cryptnbd.mode=nbd cryptnbd.config=/etc/c.toml");
        assert_eq!(r.target, Target::Device(Locator::Path("/dev/vdb".into())));
        assert_eq!((r.mode, r.mode.device()), (Mode::Nbd, NBD_DEVICE.into()));
        assert_eq!(r.config, PathBuf::from("/etc/c.toml"));

        let r = ok("cryptnbd.root=home.2 cryptnbd.mode=dm-crypt cryptnbd.mode=nbd");
        assert_eq!(r.target, Target::Volume("home.2".into()));
        assert_eq!(r.volume(), "home.2");
        assert_eq!(r.mode, Mode::Nbd, "the last one counts");

        assert_eq!(parse("ro quiet root=/dev/vda1"), Ok(None));
        assert_eq!(
            parse("-- cryptnbd.root=bad=value"),
            Ok(None),
            "after --: init's"
        );
    }

    #[test]
    fn each_wrong_value_gets_one_sentence_naming_it() {
        for (line, said) in [
            ("cryptnbd.root", "cryptnbd.root needs a value"),
            ("cryptnbd.root=", "cryptnbd.root needs a value"),
            ("cryptnbd.root=UUID=1234", "a UUID is 36 characters"),
            (
                "cryptnbd.root=LABEL=root",
                "LABEL= is not a way cryptnbd finds a volume",
            ),
            ("cryptnbd.root=.hidden", "invalid volume name"),
            (
                "cryptnbd.root=r cryptnbd.mode=luks",
                "cryptnbd.mode=luks: use dm-crypt",
            ),
            ("cryptnbd.root=r cryptnbd.config=root.toml", "absolute path"),
            (
                "cryptnbd.root=r cryptnbd.rot=x",
                "cryptnbd.rot is not an option of cryptnbd",
            ),
            (
                "cryptnbd.mode=nbd",
                "cryptnbd.mode is given but cryptnbd.root is not",
            ),
        ] {
            let e = err(line);
            assert!(e.contains(said), "{line}: {e}");
            assert!(e.contains("fix the kernel command line"), "{line}: {e}");
        }
    }
}
