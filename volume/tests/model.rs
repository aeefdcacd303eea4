//! The volume against a plain in-memory reference disk: random operations at random offsets
//! and lengths, concurrent writers on shared sectors, reopen through the KMS, damaged headers.
//! The model tests run on every storage engine: the file engine, and the memory engine, on
//! which they also act out a crash after the last operation and check that exactly what was
//! flushed survives.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kms_client::local::{LocalKms, LocalKmsOptions};
use kms_client::{ContextKeys, IdentityContext, KmsBackend};
use proptest::prelude::*;
use store::BackingStore;
use store::file::Access;
use store::memory::MemStore;
use store::submit::{block_on, downcast};
use volume::{CreateOptions, OpenOptions, Volume, VolumeErrorKind};

const SID: &str = "S-1-5-21-277731876-1789304096-451871588-1107";
const DIR: &str = "d-1234abcd01";

/// Which storage engine holds the volume.
#[derive(Debug, Clone, Copy)]
enum Engine {
    File,
    Memory,
    /// The memory engine with its asynchronous data path: whole-sector reads, writes and
    /// flushes go through the volume's owned-buffer calls, completed on other threads.
    Threads,
}

struct Fixture {
    _tmp: tempfile::TempDir,
    kms: KmsBackend,
    key_id: String,
    path: PathBuf,
    /// The memory engine's store (None: the volume is the file at `path`).
    memory: Option<Arc<MemStore>>,
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime")
}

fn fixture(size: u64, sector_size: u32) -> (Fixture, Volume) {
    fixture_on(Engine::File, size, sector_size)
}

fn fixture_on(engine: Engine, size: u64, sector_size: u32) -> (Fixture, Volume) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let options = LocalKmsOptions {
        create_if_missing: true,
        ..LocalKmsOptions::default()
    };
    let local = LocalKms::open(&tmp.path().join("keystore"), options).expect("keystore");
    let key = local.create_key(Some("test"), "model test").expect("key");
    let kms = KmsBackend::Local(local);
    let path = tmp.path().join("vol.luks");
    let opts = CreateOptions {
        size,
        sector_size,
        key_id: key.key_id.clone(),
        identity: IdentityContext::new(SID, DIR, &IdentityContext::generate_volume_id())
            .expect("identity"),
        context_keys: ContextKeys::default(),
        extra_context: vec![],
    };
    let memory = match engine {
        Engine::File => None,
        Engine::Memory => Some(Arc::new(MemStore::new("model"))),
        Engine::Threads => Some(Arc::new(MemStore::new("model").completing_on_threads())),
    };
    let vol = rt()
        .block_on(async {
            match &memory {
                None => Volume::create(&path, &opts, &kms).await,
                Some(m) => Volume::create_on(Box::new(Arc::clone(m)), &opts, &kms).await,
            }
        })
        .expect("create");
    (
        Fixture {
            _tmp: tmp,
            kms,
            key_id: key.key_id,
            path,
            memory,
        },
        vol,
    )
}

fn reopen(f: &Fixture) -> Volume {
    match &f.memory {
        None => rt()
            .block_on(Volume::open(&f.path, &OpenOptions::default(), &f.kms))
            .expect("reopen"),
        Some(m) => open_store(f, Box::new(Arc::clone(m))),
    }
}

fn open_store(f: &Fixture, store: Box<dyn BackingStore>) -> Volume {
    rt().block_on(Volume::open_store(store, &OpenOptions::default(), &f.kms))
        .expect("reopen")
}

#[derive(Debug, Clone)]
enum Op {
    Write { off: u64, len: usize, seed: u8 },
    Read { off: u64, len: usize },
    Zero { off: u64, len: u64 },
    Trim { off: u64, len: u64 },
    Flush,
}

fn op(size: u64) -> impl Strategy<Value = Op> {
    let range = (0..size).prop_flat_map(move |off| (Just(off), 0..=(size - off).min(20_000)));
    // Whole 4 KiB blocks: whole sectors of either size (what the owned-buffer path takes).
    let blocks = (0..size / 4096).prop_flat_map(move |k| {
        (
            Just(k * 4096),
            (0..=(size / 4096 - k).min(5)).prop_map(|n| n * 4096),
        )
    });
    prop_oneof![
        4 => (range.clone(), any::<u8>()).prop_map(|((off, len), seed)| Op::Write { off, len: len as usize, seed }),
        3 => range.clone().prop_map(|(off, len)| Op::Read { off, len: len as usize }),
        3 => (blocks.clone(), any::<u8>()).prop_map(|((off, len), seed)| Op::Write { off, len: len as usize, seed }),
        2 => blocks.prop_map(|(off, len)| Op::Read { off, len: len as usize }),
        1 => range.clone().prop_map(|(off, len)| Op::Zero { off, len }),
        1 => range.prop_map(|(off, len)| Op::Trim { off, len }),
        1 => Just(Op::Flush),
    ]
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
        .collect()
}

fn run_model(engine: Engine, sector_size: u32, ops: &[Op]) {
    let size = 64 * 1024;
    let (f, vol) = fixture_on(engine, size, sector_size);
    let vol = Arc::new(vol);
    let owned = matches!(engine, Engine::Threads);
    assert_eq!(vol.submits(), owned);
    let mut model = vec![0u8; size as usize];
    // The model as of the last flush: what a crash must leave.
    let mut flushed = model.clone();
    let ss = u64::from(sector_size);
    for op in ops {
        match *op {
            Op::Write { off, len, seed } => {
                let data = pattern(len, seed);
                match vol.write_owned(Box::new(data.clone()), off) {
                    Ok(w) => {
                        let (r, buf) = block_on(w);
                        r.expect("owned write");
                        assert_eq!(downcast::<Vec<u8>>(buf).len(), len);
                    }
                    Err(_) => vol.write_at(&data, off).expect("write"),
                }
                model[off as usize..off as usize + len].copy_from_slice(&data);
            }
            Op::Read { off, len } => {
                let buf = match vol.read_owned(Box::new(vec![0xeeu8; len]), off) {
                    Ok(r) => {
                        let (r, buf) = block_on(r);
                        r.expect("owned read");
                        *downcast::<Vec<u8>>(buf)
                    }
                    Err(_) => {
                        let mut buf = vec![0xeeu8; len];
                        vol.read_at(&mut buf, off).expect("read");
                        buf
                    }
                };
                assert_eq!(
                    buf,
                    model[off as usize..off as usize + len],
                    "read {off}+{len}"
                );
            }
            Op::Zero { off, len } => {
                vol.write_zeroes(off, len).expect("zero");
                model[off as usize..(off + len) as usize].fill(0);
            }
            Op::Trim { off, len } => {
                vol.trim(off, len).expect("trim");
                // Whole sectors inside the range read as zeros afterwards; the edges are kept.
                let start = off.div_ceil(ss) * ss;
                let end = (off + len) / ss * ss;
                if end > start {
                    model[start as usize..end as usize].fill(0);
                }
            }
            Op::Flush => {
                if owned {
                    block_on(vol.flush_owned()).expect("owned flush");
                } else {
                    vol.flush().expect("flush");
                }
                flushed.clone_from(&model);
            }
        }
    }
    if let Some(m) = &f.memory {
        // A crash now: only what the last flush made durable is there, all of it.
        let crashed = open_store(&f, Box::new(m.crashed()));
        let mut all = vec![0u8; size as usize];
        crashed
            .read_at(&mut all, 0)
            .expect("read all after the crash");
        assert!(
            all == flushed,
            "content after a crash differs from the model at the last flush"
        );
    }
    vol.flush().expect("flush");
    drop(vol);
    let vol = reopen(&f);
    let mut all = vec![0u8; size as usize];
    vol.read_at(&mut all, 0).expect("read all");
    assert!(all == model, "content after reopen differs from the model");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, .. ProptestConfig::default() })]

    #[test]
    fn matches_reference_disk_4096(ops in proptest::collection::vec(op(64 * 1024), 1..40)) {
        run_model(Engine::File, 4096, &ops);
    }

    #[test]
    fn matches_reference_disk_512(ops in proptest::collection::vec(op(64 * 1024), 1..40)) {
        run_model(Engine::File, 512, &ops);
    }

    #[test]
    fn matches_reference_disk_4096_in_memory(ops in proptest::collection::vec(op(64 * 1024), 1..40)) {
        run_model(Engine::Memory, 4096, &ops);
    }

    #[test]
    fn matches_reference_disk_512_in_memory(ops in proptest::collection::vec(op(64 * 1024), 1..40)) {
        run_model(Engine::Memory, 512, &ops);
    }

    #[test]
    fn matches_reference_disk_4096_completing_on_threads(ops in proptest::collection::vec(op(64 * 1024), 1..40)) {
        run_model(Engine::Threads, 4096, &ops);
    }

    #[test]
    fn matches_reference_disk_512_completing_on_threads(ops in proptest::collection::vec(op(64 * 1024), 1..40)) {
        run_model(Engine::Threads, 512, &ops);
    }
}

#[test]
fn concurrent_writers_sharing_sectors_lose_nothing() {
    for engine in [Engine::File, Engine::Memory] {
        concurrent_writers_on(engine);
    }
}

fn concurrent_writers_on(engine: Engine) {
    // 8 threads write interleaved 100-byte stripes, so every 4096-byte sector is shared by
    // several writers doing read-modify-write at the same time.
    let size = 256 * 1024u64;
    let (f, vol) = fixture_on(engine, size, 4096);
    let vol = Arc::new(vol);
    let threads = 8u64;
    let stripe = 100u64;
    std::thread::scope(|s| {
        for t in 0..threads {
            let vol = Arc::clone(&vol);
            s.spawn(move || {
                for round in 0..20u8 {
                    let mut off = t * stripe;
                    while off + stripe <= size {
                        vol.write_at(&[round.wrapping_add(t as u8) | 0x80; 100], off)
                            .expect("write");
                        off += threads * stripe;
                    }
                }
            });
        }
    });
    vol.flush().expect("flush");
    drop(vol);
    let vol = reopen(&f);
    let mut all = vec![0u8; size as usize];
    vol.read_at(&mut all, 0).expect("read");
    for (i, chunk) in all.chunks(stripe as usize).enumerate() {
        if chunk.len() < stripe as usize {
            break;
        }
        let t = i as u64 % threads;
        assert!(
            chunk
                .iter()
                .all(|&b| b == (19u8.wrapping_add(t as u8) | 0x80)),
            "stripe {i} (thread {t}) lost its last write"
        );
    }
}

fn raw(path: &Path) -> Vec<u8> {
    std::fs::read(path).expect("read file")
}

#[test]
fn payload_holds_no_plaintext_and_zeroes_are_encrypted() {
    let (f, vol) = fixture(1 << 20, 4096);
    let marker = b"CRYPTNBD-PLAINTEXT-MARKER-0123456789".repeat(200);
    vol.write_at(&marker, 12345).expect("write");
    vol.write_zeroes(8192, 8192).expect("zeroes");
    vol.write_at(&[0u8; 4096], 65536).expect("write zeros");
    vol.flush().expect("flush");
    let file = raw(&f.path);
    let data = &file[16 << 20..];
    assert!(
        !data.windows(36).any(|w| w == &marker[..36]),
        "plaintext found on disk"
    );
    // Written zeros are ciphertext, not zero bytes (dm-crypt must read them as zeros).
    assert!(data[8192..16384].iter().any(|&b| b != 0));
    assert!(data[65536..65536 + 4096].iter().any(|&b| b != 0));
    // Never-written sectors are holes (zero bytes) and read as zeros.
    assert!(data[512 * 1024..516 * 1024].iter().all(|&b| b == 0));
    let mut buf = vec![1u8; 4096];
    vol.read_at(&mut buf, 512 * 1024).expect("read");
    assert!(buf.iter().all(|&b| b == 0));
}

#[test]
fn out_of_range_and_read_only_are_refused() {
    let (f, vol) = fixture(1 << 20, 4096);
    let mut buf = [0u8; 10];
    assert_eq!(
        vol.read_at(&mut buf, (1 << 20) - 5)
            .expect_err("past end")
            .kind(),
        VolumeErrorKind::InvalidArgument
    );
    assert_eq!(
        vol.write_at(&buf, u64::MAX - 2)
            .expect_err("overflow")
            .kind(),
        VolumeErrorKind::InvalidArgument
    );
    assert_eq!(
        vol.trim(1 << 20, 1).expect_err("past end").kind(),
        VolumeErrorKind::InvalidArgument
    );
    // The read-write open holds an exclusive lock: a second open is refused.
    let err = rt()
        .block_on(Volume::open(&f.path, &OpenOptions::default(), &f.kms))
        .expect_err("second open");
    assert_eq!(err.kind(), VolumeErrorKind::InUse);
    drop(vol);
    let ro = OpenOptions {
        read_only: true,
        ..OpenOptions::default()
    };
    let vol = rt()
        .block_on(Volume::open(&f.path, &ro, &f.kms))
        .expect("open ro");
    assert_eq!(
        vol.write_at(&buf, 0).expect_err("ro").kind(),
        VolumeErrorKind::ReadOnly
    );
    // Two read-only opens may share the volume.
    let _vol2 = rt()
        .block_on(Volume::open(&f.path, &ro, &f.kms))
        .expect("second ro");
}

#[test]
fn identity_is_checked_before_the_kms() {
    let (f, vol) = fixture(1 << 20, 512);
    drop(vol);
    let wrong_sid = OpenOptions {
        expect_sid: Some("S-1-5-21-1-2-3-500".into()),
        ..OpenOptions::default()
    };
    let err = rt()
        .block_on(Volume::open(&f.path, &wrong_sid, &f.kms))
        .expect_err("sid");
    assert_eq!(err.kind(), VolumeErrorKind::IdentityMismatch);
    assert!(err.to_string().contains(SID), "{err}");
    let right = OpenOptions {
        expect_sid: Some(SID.into()),
        expect_directory: Some(DIR.into()),
        ..OpenOptions::default()
    };
    rt().block_on(Volume::open(&f.path, &right, &f.kms))
        .expect("right identity");
}

#[test]
fn damaged_primary_header_falls_back_to_secondary() {
    let (f, vol) = fixture(1 << 20, 4096);
    vol.write_at(b"hello", 100).expect("write");
    vol.flush().expect("flush");
    drop(vol);
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&f.path)
        .expect("open");
    file.write_all_at(&[0xffu8; 64], 4200)
        .expect("damage JSON of primary");
    drop(file);
    let info = volume::inspect(&f.path).expect("inspect");
    assert!(info.primary_header_problem.is_some());
    assert!(info.secondary_header_problem.is_none());
    let vol = reopen(&f);
    let mut buf = [0u8; 5];
    vol.read_at(&mut buf, 100).expect("read");
    assert_eq!(&buf, b"hello");
    drop(vol);
    // Both copies damaged: a precise error, nothing panics.
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&f.path)
        .expect("open");
    file.write_all_at(&[0u8; 8], 16384)
        .expect("damage secondary magic");
    drop(file);
    let err = volume::inspect(&f.path).expect_err("both damaged");
    assert_eq!(err.kind(), VolumeErrorKind::Corrupt);
    assert!(
        err.to_string().contains("primary copy") && err.to_string().contains("secondary copy"),
        "{err}"
    );
}

#[test]
fn truncated_file_is_refused_at_open() {
    let (f, vol) = fixture(1 << 20, 4096);
    drop(vol);
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&f.path)
        .expect("open");
    file.set_len((16 << 20) + 4096).expect("truncate");
    drop(file);
    let err = rt()
        .block_on(Volume::open(&f.path, &OpenOptions::default(), &f.kms))
        .expect_err("short");
    assert_eq!(err.kind(), VolumeErrorKind::Corrupt);
    assert!(err.to_string().contains("truncated"), "{err}");
}

#[test]
fn disabled_key_and_changed_context_are_refused() {
    let (f, vol) = fixture(1 << 20, 4096);
    drop(vol);
    // Irrefutable when kms-client is built without its `aws` feature.
    #[allow(irrefutable_let_patterns)]
    let KmsBackend::Local(local) = &f.kms else {
        unreachable!("the fixture uses the local KMS")
    };
    local.disable_key(&f.key_id).expect("disable");
    let err = rt()
        .block_on(Volume::open(&f.path, &OpenOptions::default(), &f.kms))
        .expect_err("disabled");
    assert_eq!(err.kind(), VolumeErrorKind::Kms);
    assert_eq!(err.kms_kind(), Some(kms_client::KmsErrorKind::KeyDisabled));
    local.enable_key(&f.key_id).expect("enable");
    reopen(&f);
}

#[test]
fn create_refuses_bad_sizes_and_existing_files() {
    let (f, vol) = fixture(1 << 20, 4096);
    drop(vol);
    let opts = |size, sector_size| CreateOptions {
        size,
        sector_size,
        key_id: f.key_id.clone(),
        identity: IdentityContext::new(SID, DIR, &IdentityContext::generate_volume_id())
            .expect("id"),
        context_keys: ContextKeys::default(),
        extra_context: vec![],
    };
    let other = f.path.with_file_name("other.luks");
    for (size, ss) in [(0, 4096), (4097, 4096), (4096, 1024)] {
        let err = rt()
            .block_on(Volume::create(&other, &opts(size, ss), &f.kms))
            .expect_err("bad");
        assert_eq!(err.kind(), VolumeErrorKind::InvalidArgument);
    }
    assert!(!other.exists());
    let before = raw(&f.path);
    let err = rt()
        .block_on(Volume::create(&f.path, &opts(4096, 4096), &f.kms))
        .expect_err("exists");
    assert_eq!(err.kind(), VolumeErrorKind::AlreadyExists);
    assert!(raw(&f.path) == before, "an existing volume was modified");
}

/// Rewrites the volume's token through the real header writer (both copies, new seqid).
fn rewrite_token(path: &Path, edit: impl FnOnce(&mut volume::token::KmsToken)) {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("open");
    let file = store::file::FileStore::from_file(file, path).expect("store");
    let set = volume::header::read_headers(&file).expect("headers");
    let mut md = set.active.metadata.clone();
    let (id, obj) = md.token(volume::token::TOKEN_TYPE).expect("token");
    let mut token = volume::token::KmsToken::from_json(obj).expect("decode");
    edit(&mut token);
    md.set_token(id, token.to_json()).expect("set");
    volume::header::write_headers(&file, &set.active.binary, set.active.binary.seqid + 1, &md)
        .expect("write");
}

#[test]
fn changed_context_and_pending_deletion_are_refused() {
    let (f, vol) = fixture(1 << 20, 4096);
    drop(vol);
    // Someone edits the stored context (moves the volume to another user): the KMS refuses.
    let original = volume::token::KmsToken::from_json(
        volume::header::read_headers(
            &volume::open_file_store(&f.path, Access::Inspect).expect("open"),
        )
        .expect("headers")
        .active
        .metadata
        .token(volume::token::TOKEN_TYPE)
        .expect("token")
        .1,
    )
    .expect("token");
    rewrite_token(&f.path, |t| {
        let mut pairs = t.context.pairs().clone();
        pairs.insert(
            "cryptnbd:sid-directoryid".into(),
            "[S-1-5-21-1-2-3-500]@[d-1234abcd01]".into(),
        );
        t.context = kms_client::EncryptionContext::new(pairs).expect("context");
    });
    let err = rt()
        .block_on(Volume::open(&f.path, &OpenOptions::default(), &f.kms))
        .expect_err("ctx");
    assert_eq!(
        err.kms_kind(),
        Some(kms_client::KmsErrorKind::InvalidCiphertext),
        "{err}"
    );
    // Back to the original context: it opens again (nothing was damaged).
    rewrite_token(&f.path, |t| *t = original.clone());
    drop(reopen(&f));
    // A key pending deletion refuses to unwrap; cancelling leaves it disabled; enabling it
    // brings the volume back.
    // Irrefutable when kms-client is built without its `aws` feature.
    #[allow(irrefutable_let_patterns)]
    let KmsBackend::Local(local) = &f.kms else {
        unreachable!("the fixture uses the local KMS")
    };
    local.schedule_key_deletion(&f.key_id, 7).expect("schedule");
    let err = rt()
        .block_on(Volume::open(&f.path, &OpenOptions::default(), &f.kms))
        .expect_err("pending");
    assert_eq!(
        err.kms_kind(),
        Some(kms_client::KmsErrorKind::KeyPendingDeletion),
        "{err}"
    );
    local.cancel_key_deletion(&f.key_id).expect("cancel");
    let err = rt()
        .block_on(Volume::open(&f.path, &OpenOptions::default(), &f.kms))
        .expect_err("disabled");
    assert_eq!(
        err.kms_kind(),
        Some(kms_client::KmsErrorKind::KeyDisabled),
        "{err}"
    );
    local.enable_key(&f.key_id).expect("enable");
    drop(reopen(&f));
}

#[test]
fn in_place_writes_and_allocation_map() {
    let (f, vol) = fixture(1 << 20, 4096);
    let mut data = vec![0x42u8; 8192];
    vol.write_at_mut(&mut data, 65536)
        .expect("aligned in place");
    assert_ne!(
        data,
        vec![0x42u8; 8192],
        "aligned data is encrypted in place"
    );
    let mut odd = vec![0x43u8; 100];
    vol.write_at_mut(&mut odd, 10)
        .expect("unaligned falls back");
    let mut back = vec![0u8; 8192];
    vol.read_at(&mut back, 65536).expect("read");
    assert!(back.iter().all(|&b| b == 0x42));
    vol.flush().expect("flush");
    let map = vol.allocation(0, 1 << 20).expect("allocation");
    assert_eq!(map.iter().map(|r| r.0).sum::<u64>(), 1 << 20, "{map:?}");
    let allocated: Vec<(u64, u64)> = map
        .iter()
        .scan(0u64, |at, &(n, a)| {
            let start = *at;
            *at += n;
            Some((start, n, a))
        })
        .filter(|r| r.2)
        .map(|r| (r.0, r.1))
        .collect();
    assert!(
        allocated
            .iter()
            .any(|&(s, n)| s <= 65536 && s + n >= 65536 + 8192),
        "{map:?}"
    );
    assert!(
        allocated.iter().any(|&(s, n)| s == 0 && n >= 4096),
        "{map:?}"
    );
    assert!(
        !allocated
            .iter()
            .any(|&(s, n)| s < 600_000 && s + n > 600_000),
        "{map:?}"
    );
    drop(vol);
    drop(f);
}

#[test]
fn wipe_and_remove_leaves_no_token_and_refuses_open_or_foreign_files() {
    let (f, vol) = fixture(1 << 20, 4096);
    // In use: refused, nothing changed.
    let err = volume::wipe_and_remove(&f.path).expect_err("in use");
    assert_eq!(err.kind(), VolumeErrorKind::InUse);
    drop(vol);
    // Not a volume: refused, the file is left alone.
    let other = f.path.with_file_name("notes.txt");
    std::fs::write(&other, b"not a volume").expect("write");
    assert!(volume::wipe_and_remove(&other).is_err());
    assert_eq!(std::fs::read(&other).expect("read"), b"not a volume");
    // Keep a second name on the same inode to look at its blocks after the unlink.
    let witness = f.path.with_file_name("witness");
    std::fs::hard_link(&f.path, &witness).expect("link");
    assert!(raw(&witness).windows(12).any(|w| w == b"cryptnbd-kms"));
    volume::wipe_and_remove(&f.path).expect("wipe");
    assert!(!f.path.exists());
    let left = raw(&witness);
    assert!(
        !left.windows(12).any(|w| w == b"cryptnbd-kms"),
        "the token survived"
    );
    assert!(
        left[..16 << 20].iter().all(|&b| b == 0),
        "the header area is not zero"
    );
}
