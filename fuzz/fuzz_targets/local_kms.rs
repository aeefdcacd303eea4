//! The embedded local KMS's two formats that come from files: the wrapped data key ("CNKW"
//! blob, from a volume's header) and the keystore file. A blob the keystore did not make
//! never unwraps and never panics; a keystore file that is not one is refused with a
//! sentence. The keystore is unsealed (a sealed one would run argon2 with the file's own
//! parameters on every input).
#![no_main]

use std::sync::OnceLock;

use kms_client::local::{LocalKms, LocalKmsOptions};
use kms_client::{EncryptionContext, Kms};
use libfuzzer_sys::fuzz_target;

struct Fixture {
    _dir: std::path::PathBuf,
    kms: LocalKms,
    key_id: String,
    context: EncryptionContext,
    /// A keystore directory (0700) whose file (0600) each input replaces.
    scratch: std::path::PathBuf,
    rt: tokio::runtime::Runtime,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("cryptnbd-fuzz-kms-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let options = LocalKmsOptions {
            create_if_missing: true,
            ..LocalKmsOptions::default()
        };
        let kms = LocalKms::open(&dir.join("keystore"), options).expect("keystore");
        let key_id = kms.create_key(Some("fuzz"), "fuzz").expect("key").key_id;
        let context =
            EncryptionContext::from_pairs([("cryptnbd:volume-id", "vol-0123456789abcdef0")])
                .expect("context");
        let scratch = dir.join("scratch");
        std::fs::create_dir_all(&scratch).expect("scratch");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&scratch, std::fs::Permissions::from_mode(0o700)).expect("mode");
        let file = scratch.join("keystore.json");
        std::fs::write(&file, b"").expect("write");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).expect("mode");
        Fixture {
            _dir: dir,
            kms,
            key_id,
            context,
            scratch,
            rt: tokio::runtime::Builder::new_current_thread()
                .build()
                .expect("runtime"),
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let f = fixture();
    if which % 2 == 0 {
        // A wrapped key from a header.
        let unwrapped = f.rt.block_on(f.kms.decrypt(rest, &f.context, &f.key_id));
        assert!(
            unwrapped.is_err(),
            "a blob this keystore did not make unwrapped"
        );
    } else {
        // A keystore file (writing keeps its mode).
        std::fs::write(f.scratch.join("keystore.json"), rest).expect("write");
        if let Ok(kms) = LocalKms::open(&f.scratch, LocalKmsOptions::default()) {
            let _ = kms.list_keys();
        }
    }
});
