//! Power cuts at every step of a header change. A recording engine over the memory engine
//! keeps, after each write and each flush of a rekey, a recovery keyslot's addition and its
//! removal, every store a power cut at that moment could leave: each write not yet flushed
//! lost, kept or torn (its first half on the disk, the rest not), in every combination. Each
//! of those stores must open through the KMS under the old wrapping or the new one, never
//! neither, with every byte of data the volume held before.

use std::any::Any;
use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex};

use kms_client::local::{LocalKms, LocalKmsOptions};
use kms_client::{ContextKeys, IdentityContext, Kms, KmsBackend};
use store::memory::MemStore;
use store::{BackingStore, Discarded, Extent};
use volume::keyslot::{self, Argon2Params};
use volume::lifecycle;
use volume::{CreateOptions, OpenOptions, Volume};

const SIZE: u64 = 1 << 20;

/// A store as a power cut left it, and when.
#[derive(Debug)]
struct Cut {
    when: String,
    store: MemStore,
}

/// The memory engine, recording a power cut after every write and every flush.
#[derive(Debug)]
struct Recording {
    inner: Arc<MemStore>,
    cuts: Arc<Mutex<Vec<Cut>>>,
    /// The writes since the last flush: a disk's volatile cache.
    pending: Mutex<Vec<(u64, Vec<u8>)>>,
}

/// What a power cut does to one write the disk had not yet made durable.
#[derive(Debug, Clone, Copy)]
enum Fate {
    Lost,
    Kept,
    /// Its first 512 bytes on the disk, the rest not.
    TornEarly,
    /// Its first half (at a 512-byte boundary) on the disk, the rest not.
    TornHalf,
}

const FATES: [Fate; 4] = [Fate::Lost, Fate::Kept, Fate::TornEarly, Fate::TornHalf];

impl Recording {
    fn record(&self, when: String, store: MemStore) {
        self.cuts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Cut { when, store });
    }

    /// Every way a power cut now could leave the store: each write since the last flush lost,
    /// kept or torn, in every combination (4^n; at most 6 writes are pending in these tests).
    fn cut_now(&self) -> io::Result<()> {
        let pending = self
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        assert!(pending.len() <= 6, "{} writes pending", pending.len());
        let step = self.cuts.lock().unwrap_or_else(|p| p.into_inner()).len();
        for combination in 0..FATES.len().pow(pending.len() as u32) {
            let mut fates = Vec::with_capacity(pending.len());
            let mut c = combination;
            for _ in &pending {
                fates.push(FATES[c % FATES.len()]);
                c /= FATES.len();
            }
            let store = self.inner.crashed();
            for ((offset, data), fate) in pending.iter().zip(&fates) {
                match fate {
                    Fate::Lost => {}
                    Fate::Kept => store.write_at(data, *offset)?,
                    Fate::TornEarly => store.write_at(&data[..data.len().min(512)], *offset)?,
                    Fate::TornHalf => {
                        store.write_at(&data[..(data.len() / 2) & !511], *offset)?;
                    }
                }
            }
            let writes: Vec<String> = pending
                .iter()
                .zip(&fates)
                .map(|((offset, data), fate)| format!("{} bytes at {offset} {fate:?}", data.len()))
                .collect();
            self.record(format!("step {step}: {}", writes.join(", ")), store);
        }
        Ok(())
    }
}

impl BackingStore for Recording {
    fn location(&self) -> &Path {
        self.inner.location()
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        self.inner.write_at(data, offset)?;
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((offset, data.to_vec()));
        self.cut_now()
    }
    fn flush(&self) -> io::Result<()> {
        self.inner.flush()?;
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        self.cut_now()
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<Discarded> {
        self.inner.discard(offset, len)
    }
    fn extents(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        self.inner.extents(offset, len)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.inner.set_len(len)
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime")
}

struct Fixture {
    _tmp: tempfile::TempDir,
    kms: KmsBackend,
    keys: [String; 2],
    store: Arc<MemStore>,
    data: Vec<u8>,
}

/// A 1 MiB volume on the memory engine, wrapped under the first of two keys, filled with a
/// pattern and flushed.
fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().expect("tempdir");
    let options = LocalKmsOptions {
        create_if_missing: true,
        ..LocalKmsOptions::default()
    };
    let local = LocalKms::open(&tmp.path().join("keystore"), options).expect("keystore");
    let keys = ["a", "b"].map(|n| local.create_key(Some(n), "power cuts").expect("key").key_id);
    let kms = KmsBackend::Local(local);
    let opts = CreateOptions {
        size: SIZE,
        sector_size: 4096,
        key_id: keys[0].clone(),
        identity: IdentityContext::new(
            "S-1-5-21-277731876-1789304096-451871588-1107",
            "d-1234abcd01",
            &IdentityContext::generate_volume_id(),
        )
        .expect("identity"),
        context_keys: ContextKeys::default(),
        extra_context: vec![],
    };
    let store = Arc::new(MemStore::new("power-cut"));
    let data: Vec<u8> = (0..SIZE).map(|i| (i * 7 % 251) as u8).collect();
    let vol = rt()
        .block_on(Volume::create_on(Box::new(Arc::clone(&store)), &opts, &kms))
        .expect("create");
    vol.write_at(&data, 0).expect("write");
    vol.flush().expect("flush");
    drop(vol);
    Fixture {
        _tmp: tmp,
        kms,
        keys,
        store,
        data,
    }
}

impl Fixture {
    /// Runs `change` on a recording engine over the volume; returns the power cuts it made.
    fn record(&self, change: impl FnOnce(&dyn BackingStore)) -> Vec<Cut> {
        let cuts = Arc::new(Mutex::new(Vec::new()));
        let recording = Recording {
            inner: Arc::clone(&self.store),
            cuts: Arc::clone(&cuts),
            pending: Mutex::default(),
        };
        change(&recording);
        let cuts = std::mem::take(&mut *cuts.lock().unwrap_or_else(|p| p.into_inner()));
        assert!(
            cuts.len() >= 4,
            "the change wrote and flushed too little to test"
        );
        cuts
    }

    /// Opens the volume on `store` through the KMS and checks every byte of its data.
    fn opens_whole(&self, store: MemStore, when: &str) {
        let vol = rt()
            .block_on(Volume::open_store(
                Box::new(store),
                &OpenOptions::default(),
                &self.kms,
            ))
            .unwrap_or_else(|e| panic!("power cut at {when}: the volume does not open: {e}"));
        let mut back = vec![0u8; SIZE as usize];
        vol.read_at(&mut back, 0).expect("read");
        assert!(back == self.data, "power cut at {when}: the data changed");
    }
}

/// The key that wraps the volume on `store` (a power cut at `when`).
fn key_of(store: &dyn BackingStore, when: &str) -> String {
    lifecycle::read_token_in(store)
        .unwrap_or_else(|e| panic!("power cut at {when}: no readable token: {e}"))
        .key_id
}

#[test]
fn a_power_cut_at_any_step_of_a_rekey_leaves_the_old_wrapping_or_the_new() {
    let f = fixture();
    let old = lifecycle::read_token_in(&*f.store).expect("token");
    let path = f.store.location().to_path_buf();
    let rewrapped = rt()
        .block_on(f.kms.re_encrypt(
            &old.wrapped_in(&path).expect("wrapped"),
            &old.context,
            &old.key_id,
            &f.keys[1],
            &old.context,
        ))
        .expect("re-encrypt");
    let cuts = f.record(|store| {
        lifecycle::rewrite_token(store, |t| {
            t.rewrap(&rewrapped.key_id, &rewrapped.wrapped, old.context.clone());
        })
        .expect("rewrite the token");
    });
    let mut seen = std::collections::BTreeSet::new();
    for cut in &cuts {
        let key = key_of(&cut.store, &cut.when);
        assert!(f.keys.contains(&key), "{}: wrapped by {key}", cut.when);
        seen.insert(key);
        f.opens_whole(cut.store.crashed(), &cut.when);
    }
    assert_eq!(seen.len(), 2, "the cuts never saw both wrappings");
    // The last cut is after the final flush: the new wrapping is durable once the call
    // returned.
    let last = cuts.last().expect("cuts");
    assert_eq!(key_of(&last.store, &last.when), f.keys[1], "{}", last.when);
    println!("rekey: {} power cuts, each opened whole", cuts.len());
}

#[test]
fn a_power_cut_at_any_step_of_adding_or_removing_a_recovery_keyslot_leaves_a_volume_that_opens() {
    let f = fixture();
    // The volume key, unwrapped as the daemon does before it adds a keyslot.
    let token = lifecycle::read_token_in(&*f.store).expect("token");
    let key = rt()
        .block_on(f.kms.decrypt(
            &token.wrapped_in(f.store.location()).expect("wrapped"),
            &token.context,
            &token.key_id,
        ))
        .expect("decrypt");
    let key = key.expose();
    let params = Argon2Params::for_tests(32);
    let passphrase = b"correct horse battery staple";
    let mut id = None;
    let added = f.record(|store| {
        id = Some(keyslot::add_recovery_keyslot(store, key, passphrase, &params).expect("add"));
    });
    let id = id.expect("keyslot id");
    let mut with_slot = 0;
    for cut in &added {
        f.opens_whole(cut.store.crashed(), &cut.when);
        let info = volume::inspect_store(&cut.store)
            .unwrap_or_else(|e| panic!("power cut at {}: {e}", cut.when));
        if info.keyslot_ids.contains(&id) {
            // A keyslot in the header has its area: the passphrase opens it.
            let unlocked = keyslot::unlock_keyslot(&cut.store, passphrase)
                .unwrap_or_else(|e| panic!("{}: the keyslot does not unlock: {e}", cut.when));
            assert!(
                unlocked[..] == key[..],
                "{}: the keyslot holds another key",
                cut.when
            );
            with_slot += 1;
        }
    }
    assert!(
        with_slot > 0 && with_slot < added.len(),
        "{with_slot} of {}",
        added.len()
    );
    let removed = f.record(|store| keyslot::remove_keyslot(store, id).expect("remove"));
    for cut in &removed {
        f.opens_whole(cut.store.crashed(), &cut.when);
    }
    let last = removed.last().expect("cuts");
    let info = volume::inspect_store(&last.store).expect("inspect");
    assert!(!info.keyslot_ids.contains(&id), "{}", last.when);
    println!(
        "recovery keyslot: {} power cuts adding it, {} removing it, each opened whole",
        added.len(),
        removed.len()
    );
}
