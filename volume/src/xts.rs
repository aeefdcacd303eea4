//! AES-256-XTS sector encryption, byte-compatible with dm-crypt's `aes-xts-plain64` (the LUKS2
//! default cipher).
//!
//! # What a sector looks like on disk
//!
//! Each sector is one XTS data unit (IEEE 1619-2007), encrypted with the 64-byte key
//! `K1 || K2` (K1 encrypts the data, K2 encrypts the tweak). The tweak of a sector is the
//! dm-crypt `plain64` IV, 16 bytes:
//!
//! ```text
//! offset  size  field
//! 0       8     IV number, u64 little-endian
//! 8       8     zero
//! ```
//!
//! The IV number counts 512-byte units even when the sector size is larger: a buffer that starts
//! at IV `first_iv` and holds 4096-byte sectors uses `first_iv`, `first_iv + 8`, `first_iv + 16`, ...
//! The sum wraps modulo 2^64, as dm-crypt's 64-bit `sector_t` arithmetic does.
//!
//! # Implementation
//!
//! The crypto is aws-lc's `EVP_aes_256_xts` through `aws-lc-sys` (aws-lc-rs does not expose XTS).
//! aws-lc chooses its AES code at run time from the CPU it finds (AVX-512/VAES, AES-NI, or a
//! constant-time software fallback), so the binary must not be built with `target-cpu=native`.
//!
//! The key schedules are computed once, in [`XtsCipher::new`], into two *template* contexts (one
//! per direction: aws-lc keys an XTS context for one direction only). Working contexts are
//! copies of a template (`EVP_CIPHER_CTX_copy` copies the schedules, it does not recompute them)
//! kept in a small pool per direction, so threads never share a context and never wait for each
//! other during the crypto itself: the pool lock is held only to pop or push a context. Per
//! sector the only set-up is loading the 16-byte tweak (`EVP_CipherInit_ex` with no cipher and no
//! key), which aws-lc does with a 16-byte copy.
//!
//! # Key hygiene
//!
//! The caller's key slice is handed to aws-lc by pointer: this module never copies the key
//! bytes, so there is no copy of ours to wipe. aws-lc keeps only the expanded key schedules,
//! inside its contexts; `EVP_CIPHER_CTX_free` cleanses them (`OPENSSL_free` zeroes every
//! allocation before freeing it) and every context is freed that way on drop. [`XtsCipher`]'s
//! `Debug` prints no key material and no error or panic message here contains key bytes.
//!
//! This is the only module of the crate with `unsafe` code: the FFI calls into aws-lc.

// The crate denies `unsafe_code`; this module is the one place that calls aws-lc's C API, which
// cannot be done without `unsafe`. Every block carries a `// SAFETY:` comment.
#![allow(unsafe_code)]

use std::ffi::c_int;
use std::fmt;
use std::ptr::{self, NonNull};
use std::sync::{Mutex, PoisonError};

use aws_lc_sys as ffi;

/// Key length of AES-256-XTS: two 256-bit AES keys.
pub const XTS_KEY_LEN: usize = 64;

/// plain64 IVs count units of this many bytes, whatever the sector size.
const IV_UNIT: usize = 512;

/// Smallest and largest supported sector sizes (both powers of two, like every size between).
const MIN_SECTOR_SIZE: usize = 512;
const MAX_SECTOR_SIZE: usize = 4096;

/// Idle contexts kept per direction. A pool grows to the peak number of threads encrypting at
/// once; beyond this many idle ones, returned contexts are freed instead of kept. Each context
/// holds two AES-256 key schedules (about 0.5 KiB).
const MAX_IDLE_CONTEXTS: usize = 64;

/// The key was not 64 bytes or its two halves were equal (XTS forbids it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct InvalidKey {
    /// Which check failed; private so the message can change without breaking callers.
    reason: InvalidKeyReason,
}

/// Why a key was rejected. Neither variant carries key bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum InvalidKeyReason {
    /// The key had this many bytes instead of [`XTS_KEY_LEN`].
    Length(usize),
    /// `K1 == K2`, which IEEE 1619 and NIST SP 800-38E forbid.
    EqualHalves,
}

impl fmt::Display for InvalidKeyReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Length(len) => write!(
                f,
                "an AES-256-XTS key must be {XTS_KEY_LEN} bytes, this one has {len}"
            ),
            Self::EqualHalves => {
                f.write_str("the two halves of the AES-256-XTS key are equal, which XTS forbids")
            }
        }
    }
}

/// AES-256-XTS with dm-crypt `plain64` IVs, keyed once and shared by any number of threads.
///
/// `Send + Sync`: every call takes a context of its own from an internal pool, so concurrent
/// calls run in parallel.
pub struct XtsCipher {
    /// Contexts keyed for encryption.
    encrypt: CtxPool,
    /// Contexts keyed for decryption (the data key schedule differs from the encryption one).
    decrypt: CtxPool,
}

impl fmt::Debug for XtsCipher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Deliberately nothing from the contexts: they hold the key schedules.
        f.debug_struct("XtsCipher")
            .field("algorithm", &"AES-256-XTS")
            .finish_non_exhaustive()
    }
}

impl XtsCipher {
    /// Computes the key schedules of a 64-byte AES-256-XTS key (`K1 || K2`, as stored in a LUKS2
    /// keyslot for `aes-xts-plain64` with a 512-bit key).
    ///
    /// Fails if the key is not [`XTS_KEY_LEN`] bytes or if `K1 == K2`.
    ///
    /// # Panics
    ///
    /// If aws-lc cannot allocate a context (out of memory).
    pub fn new(key: &[u8]) -> Result<Self, InvalidKey> {
        let key: &[u8; XTS_KEY_LEN] = key.try_into().map_err(|_| InvalidKey {
            reason: InvalidKeyReason::Length(key.len()),
        })?;
        let (k1, k2) = key.split_at(XTS_KEY_LEN / 2);
        if ct_eq(k1, k2) {
            return Err(InvalidKey {
                reason: InvalidKeyReason::EqualHalves,
            });
        }
        Ok(Self {
            encrypt: CtxPool::new(Ctx::keyed(key, Direction::Encrypt)),
            decrypt: CtxPool::new(Ctx::keyed(key, Direction::Decrypt)),
        })
    }

    /// Encrypts whole sectors in place.
    ///
    /// Sector `i` of `buf` uses the plain64 IV `first_iv + i * (sector_size / 512)` (wrapping
    /// modulo 2^64), as a 16-byte little-endian tweak: the IV in the first 8 bytes, zeros after.
    ///
    /// # Panics
    ///
    /// Contract, checked on every call: `sector_size` is a power of two in `512..=4096` and
    /// `buf.len()` is a multiple of it (callers in this crate guarantee both). An empty `buf` is a
    /// no-op. Also panics if aws-lc reports a failure, which would be a bug; the message carries
    /// no key material.
    pub fn encrypt_sectors(&self, buf: &mut [u8], sector_size: usize, first_iv: u64) {
        crypt_sectors(&self.encrypt, buf, sector_size, first_iv);
    }

    /// Decrypts whole sectors in place: the inverse of [`XtsCipher::encrypt_sectors`] with the
    /// same `sector_size` and `first_iv`, under the same contract.
    ///
    /// # Panics
    ///
    /// As [`XtsCipher::encrypt_sectors`].
    pub fn decrypt_sectors(&self, buf: &mut [u8], sector_size: usize, first_iv: u64) {
        crypt_sectors(&self.decrypt, buf, sector_size, first_iv);
    }
}

/// The shared body of encryption and decryption: the pool decides the direction.
fn crypt_sectors(pool: &CtxPool, buf: &mut [u8], sector_size: usize, first_iv: u64) {
    assert!(
        sector_size.is_power_of_two() && (MIN_SECTOR_SIZE..=MAX_SECTOR_SIZE).contains(&sector_size),
        "XTS sector size must be a power of two in {MIN_SECTOR_SIZE}..={MAX_SECTOR_SIZE}, got {sector_size}"
    );
    assert!(
        buf.len().is_multiple_of(sector_size),
        "XTS buffer length {} is not a multiple of the sector size {sector_size}",
        buf.len()
    );
    if buf.is_empty() {
        return;
    }
    // Lossless: sector_size <= 4096, so the step is at most 8.
    let iv_step = (sector_size / IV_UNIT) as u64;
    let mut ctx = pool.take();
    let mut iv = first_iv;
    for sector in buf.chunks_exact_mut(sector_size) {
        ctx.crypt_data_unit(sector, iv);
        iv = iv.wrapping_add(iv_step);
    }
    pool.give_back(ctx);
}

/// Compares two equal-length byte strings in time that does not depend on where they differ.
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    debug_assert_eq!(a.len(), b.len());
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    // black_box keeps the optimiser from turning the fold into an early-exit comparison.
    std::hint::black_box(diff) == 0
}

/// Which way a context was keyed.
#[derive(Clone, Copy)]
enum Direction {
    Encrypt,
    Decrypt,
}

/// An owned aws-lc `EVP_CIPHER_CTX` holding an AES-256-XTS key schedule; freed (and cleansed) on
/// drop.
struct Ctx(NonNull<ffi::EVP_CIPHER_CTX>);

// SAFETY: an EVP_CIPHER_CTX is plain heap memory with no thread affinity (no thread-locals, no
// locks); `Ctx` owns it exclusively and only touches it through `&mut self` or, for
// `EVP_CIPHER_CTX_copy`, through `&self` behind the pool's mutex, so moving it to another thread
// is sound.
unsafe impl Send for Ctx {}

impl Ctx {
    /// Allocates an empty context.
    fn alloc() -> Self {
        // SAFETY: EVP_CIPHER_CTX_new has no preconditions; it returns a fresh, initialised
        // context or NULL on allocation failure, which is checked below.
        let raw = unsafe { ffi::EVP_CIPHER_CTX_new() };
        match NonNull::new(raw) {
            Some(ptr) => Self(ptr),
            None => panic!("aws-lc could not allocate an AES-256-XTS context (out of memory)"),
        }
    }

    /// A context holding the key schedules of `key` for one direction, with no tweak set yet.
    fn keyed(key: &[u8; XTS_KEY_LEN], direction: Direction) -> Self {
        let ctx = Self::alloc();
        let enc = match direction {
            Direction::Encrypt => 1,
            Direction::Decrypt => 0,
        };
        // SAFETY: `ctx` is a valid, exclusively owned context; EVP_aes_256_xts returns a pointer
        // to a static cipher; `key` points to 64 readable bytes, the cipher's key length; a NULL
        // engine and a NULL IV are allowed (the tweak is set per sector). aws-lc reads the key
        // during the call only and keeps no pointer to it.
        let rc = unsafe {
            ffi::EVP_CipherInit_ex(
                ctx.0.as_ptr(),
                ffi::EVP_aes_256_xts(),
                ptr::null_mut(),
                key.as_ptr(),
                ptr::null(),
                enc,
            )
        };
        check(rc, "EVP_CipherInit_ex (key schedule)");
        ctx
    }

    /// A second context with the same key schedules and direction.
    fn duplicate(&self) -> Self {
        let out = Self::alloc();
        // SAFETY: `out` is a valid, initialised, exclusively owned context (as the function
        // requires); `self.0` is a valid keyed context that is only read (the XTS copy hook reads
        // the source's key pointers and rewires the copy's to its own schedules), and the caller
        // holds the pool mutex, so no other thread uses `self` meanwhile.
        let rc = unsafe { ffi::EVP_CIPHER_CTX_copy(out.0.as_ptr(), self.0.as_ptr()) };
        check(rc, "EVP_CIPHER_CTX_copy");
        out
    }

    /// Encrypts or decrypts (as the context was keyed) one XTS data unit in place, with the
    /// plain64 tweak of `iv`.
    #[inline]
    fn crypt_data_unit(&mut self, unit: &mut [u8], iv: u64) {
        let mut tweak = [0u8; 16];
        tweak[..8].copy_from_slice(&iv.to_le_bytes());
        // Lossless: a data unit is one sector, at most MAX_SECTOR_SIZE bytes.
        let len = unit.len() as c_int;
        let ctx = self.0.as_ptr();
        // SAFETY: `ctx` is a valid keyed context used by this thread only (`&mut self`); the NULL
        // cipher, engine and key keep the existing key schedules; `tweak` is 16 readable bytes,
        // the cipher's IV length, copied by aws-lc during the call; enc = -1 keeps the
        // direction the context was keyed for.
        let rc = unsafe {
            ffi::EVP_CipherInit_ex(
                ctx,
                ptr::null(),
                ptr::null_mut(),
                ptr::null(),
                tweak.as_ptr(),
                -1,
            )
        };
        check(rc, "EVP_CipherInit_ex (tweak)");
        let mut out_len: c_int = 0;
        // SAFETY: `ctx` as above, with its tweak now set; `unit` is valid for reads and writes of
        // `len` bytes for the whole call and we hold its only reference; aws-lc allows the output
        // to be the input (in == out), and with a block size of 1 it writes exactly `len` bytes
        // and buffers nothing; `out_len` is a valid c_int to write.
        let rc = unsafe {
            ffi::EVP_CipherUpdate(ctx, unit.as_mut_ptr(), &mut out_len, unit.as_ptr(), len)
        };
        check(rc, "EVP_CipherUpdate");
        assert!(
            out_len == len,
            "aws-lc AES-256-XTS wrote {out_len} bytes for a {len}-byte sector; this is a bug"
        );
    }
}

impl Drop for Ctx {
    fn drop(&mut self) {
        // SAFETY: `self.0` came from EVP_CIPHER_CTX_new, is owned by this value alone and is
        // freed exactly once, here. EVP_CIPHER_CTX_free cleanses the key schedules.
        unsafe { ffi::EVP_CIPHER_CTX_free(self.0.as_ptr()) };
    }
}

/// Panics unless an aws-lc call returned 1 (success). The message names the call only: aws-lc
/// errors in these calls never depend on the key's value (equal halves are rejected before).
#[track_caller]
fn check(rc: c_int, call: &str) {
    if rc != 1 {
        // SAFETY: ERR_clear_error has no preconditions; it empties this thread's aws-lc error
        // queue so the failure does not leak into unrelated later calls.
        unsafe { ffi::ERR_clear_error() };
        panic!("aws-lc {call} failed for AES-256-XTS; this is a bug");
    }
}

/// Keyed contexts for one direction: a template that is never used for crypto, only copied, and
/// the idle copies ready for use.
struct CtxPool {
    /// Behind one mutex, held only to pop, push or copy a context, never during crypto.
    inner: Mutex<PoolInner>,
}

struct PoolInner {
    /// The context made from the key; the source of every copy.
    template: Ctx,
    /// Contexts not in use right now, each keyed like `template`.
    idle: Vec<Ctx>,
}

impl CtxPool {
    fn new(template: Ctx) -> Self {
        Self {
            inner: Mutex::new(PoolInner {
                template,
                idle: Vec::new(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PoolInner> {
        // A panic while the lock is held (only possible in a failed allocation) leaves the pool
        // consistent: every context in it is still a keyed, unused one. So ignore poisoning.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes an idle context, or makes one if none is idle.
    fn take(&self) -> Ctx {
        let mut inner = self.lock();
        match inner.idle.pop() {
            Some(ctx) => ctx,
            None => inner.template.duplicate(),
        }
    }

    /// Returns a context after a successful operation. A context whose operation panicked is
    /// not given back (the unwinding drops and frees it), so a half-used context is never reused.
    fn give_back(&self, ctx: Ctx) {
        let mut inner = self.lock();
        if inner.idle.len() < MAX_IDLE_CONTEXTS {
            inner.idle.push(ctx);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use aes::Aes256;
    use aes::cipher::KeyInit;
    use proptest::prelude::*;
    use xts_mode::{Xts128, get_tweak_default};

    // ---- IEEE 1619-2007 Annex B, XTS-AES-256 vectors 10 to 14 ----
    //
    // All five use Key1 = digits of e, Key2 = digits of pi, a 512-byte data unit holding the bytes
    // 00..ff twice, and the data unit sequence numbers ff, ffff, ffffff, ffffffff, ffffffffff.
    // Ciphertexts as published in the standard (the same values appear in aws-lc's
    // crypto/fipsmodule/modes/xts_test.cc, OpenSSL's evptests, libgcrypt's basic.c).

    const IEEE_KEY1: &str = "2718281828459045235360287471352662497757247093699959574966967627";
    const IEEE_KEY2: &str = "3141592653589793238462643383279502884197169399375105820974944592";

    const IEEE_VECTORS: [(u32, u64, &str); 5] = [
        (
            10,
            0xff,
            "1c3b3a102f770386e4836c99e370cf9bea00803f5e482357a4ae12d414a3e63b\
             5d31e276f8fe4a8d66b317f9ac683f44680a86ac35adfc3345befecb4bb188fd\
             5776926c49a3095eb108fd1098baec70aaa66999a72a82f27d848b21d4a741b0\
             c5cd4d5fff9dac89aeba122961d03a757123e9870f8acf1000020887891429ca\
             2a3e7a7d7df7b10355165c8b9a6d0a7de8b062c4500dc4cd120c0f7418dae3d0\
             b5781c34803fa75421c790dfe1de1834f280d7667b327f6c8cd7557e12ac3a0f\
             93ec05c52e0493ef31a12d3d9260f79a289d6a379bc70c50841473d1a8cc81ec\
             583e9645e07b8d9670655ba5bbcfecc6dc3966380ad8fecb17b6ba02469a020a\
             84e18e8f84252070c13e9f1f289be54fbc481457778f616015e1327a02b140f1\
             505eb309326d68378f8374595c849d84f4c333ec4423885143cb47bd71c5edae\
             9be69a2ffeceb1bec9de244fbe15992b11b77c040f12bd8f6a975a44a0f90c29\
             a9abc3d4d893927284c58754cce294529f8614dcd2aba991925fedc4ae74ffac\
             6e333b93eb4aff0479da9a410e4450e0dd7ae4c6e2910900575da401fc07059f\
             645e8b7e9bfdef33943054ff84011493c27b3429eaedb4ed5376441a77ed4385\
             1ad77f16f541dfd269d50d6a5f14fb0aab1cbb4c1550be97f7ab4066193c4caa\
             773dad38014bd2092fa755c824bb5e54c4f36ffda9fcea70b9c6e693e148c151",
        ),
        (
            11,
            0xffff,
            "77a31251618a15e6b92d1d66dffe7b50b50bad552305ba0217a610688eff7e11\
             e1d0225438e093242d6db274fde801d4cae06f2092c728b2478559df58e837c2\
             469ee4a4fa794e4bbc7f39bc026e3cb72c33b0888f25b4acf56a2a9804f1ce6d\
             3d6e1dc6ca181d4b546179d55544aa7760c40d06741539c7e3cd9d2f6650b201\
             3fd0eeb8c2b8e3d8d240ccae2d4c98320a7442e1c8d75a42d6e6cfa4c2eca179\
             8d158c7aecdf82490f24bb9b38e108bcda12c3faf9a21141c3613b58367f922a\
             aa26cd22f23d708dae699ad7cb40a8ad0b6e2784973dcb605684c08b8d6998c6\
             9aac049921871ebb65301a4619ca80ecb485a31d744223ce8ddc2394828d6a80\
             470c092f5ba413c3378fa6054255c6f9df4495862bbb3287681f931b687c888a\
             bf844dfc8fc28331e579928cd12bd2390ae123cf03818d14dedde5c0c24c8ab0\
             18bfca75ca096f2d531f3d1619e785f1ada437cab92e980558b3dce1474afb75\
             bfedbf8ff54cb2618e0244c9ac0d3c66fb51598cd2db11f9be39791abe447c63\
             094f7c453b7ff87cb5bb36b7c79efb0872d17058b83b15ab0866ad8a58656c5a\
             7e20dbdf308b2461d97c0ec0024a2715055249cf3b478ddd4740de654f75ca68\
             6e0d7345c69ed50cdc2a8b332b1f8824108ac937eb050585608ee734097fc090\
             54fbff89eeaeea791f4a7ab1f9868294a4f9e27b42af8100cb9d59cef9645803",
        ),
        (
            12,
            0xff_ffff,
            "e387aaa58ba483afa7e8eb469778317ecf4cf573aa9d4eac23f2cdf914e4e200\
             a8b490e42ee646802dc6ee2b471b278195d60918ececb44bf79966f83faba049\
             9298ebc699c0c8634715a320bb4f075d622e74c8c932004f25b41e361025b5a8\
             7815391f6108fc4afa6a05d9303c6ba68a128a55705d415985832fdeaae6c8e1\
             9110e84d1b1f199a2692119edc96132658f09da7c623efcec712537a3d94c0bf\
             5d7e352ec94ae5797fdb377dc1551150721adf15bd26a8efc2fcaad56881fa9e\
             62462c28f30ae1ceaca93c345cf243b73f542e2074a705bd2643bb9f7cc79bb6\
             e7091ea6e232df0f9ad0d6cf502327876d82207abf2115cdacf6d5a48f6c1879\
             a65b115f0f8b3cb3c59d15dd8c769bc014795a1837f3901b5845eb491adfefe0\
             97b1fa30a12fc1f65ba22905031539971a10f2f36c321bb51331cdefb39e3964\
             c7ef079994f5b69b2edd83a71ef549971ee93f44eac3938fcdd61d01fa71799d\
             a3a8091c4c48aa9ed263ff0749df95d44fef6a0bb578ec69456aa5408ae32c7a\
             f08ad7ba8921287e3bbee31b767be06a0e705c864a769137df28292283ea81a2\
             480241b44d9921cdbec1bc28dc1fda114bd8e5217ac9d8ebafa720e9da4f9ace\
             231cc949e5b96fe76ffc21063fddc83a6b8679c00d35e09576a875305bed5f36\
             ed242c8900dd1fa965bc950dfce09b132263a1eef52dd6888c309f5a7d712826",
        ),
        (
            13,
            0xffff_ffff,
            "bf53d2dade78e822a4d949a9bc6766b01b06a8ef70d26748c6a7fc36d80ae4c5\
             520f7c4ab0ac8544424fa405162fef5a6b7f229498063618d39f0003cb5fb8d1\
             c86b643497da1ff945c8d3bedeca4f479702a7a735f043ddb1d6aaade3c4a0ac\
             7ca7f3fa5279bef56f82cd7a2f38672e824814e10700300a055e1630b8f1cb0e\
             919f5e942010a416e2bf48cb46993d3cb6a51c19bacf864785a00bc2ecff15d3\
             50875b246ed53e68be6f55bd7e05cfc2b2ed6432198a6444b6d8c247fab941f5\
             69768b5c429366f1d3f00f0345b96123d56204c01c63b22ce78baf116e525ed9\
             0fdea39fa469494d3866c31e05f295ff21fea8d4e6e13d67e47ce722e9698a1c\
             1048d68ebcde76b86fcf976eab8aa9790268b7068e017a8b9b749409514f1053\
             027fd16c3786ea1bac5f15cb79711ee2abe82f5cf8b13ae73030ef5b9e4457e7\
             5d1304f988d62dd6fc4b94ed38ba831da4b7634971b6cd8ec325d9c61c00f1df\
             73627ed3745a5e8489f3a95c69639c32cd6e1d537a85f75cc844726e8a72fc00\
             77ad22000f1d5078f6b866318c668f1ad03d5a5fced5219f2eabbd0aa5c0f460\
             d183f04404a0d6f469558e81fab24a167905ab4c7878502ad3e38fdbe62a4155\
             6cec37325759533ce8f25f367c87bb5578d667ae93f9e2fd99bcbc5f2fbba88c\
             f6516139420fcff3b7361d86322c4bd84c82f335abb152c4a93411373aaa8220",
        ),
        (
            14,
            0xff_ffff_ffff,
            "64497e5a831e4a932c09be3e5393376daa599548b816031d224bbf50a818ed23\
             50eae7e96087c8a0db51ad290bd00c1ac1620857635bf246c176ab463be30b80\
             8da548081ac847b158e1264be25bb0910bbc92647108089415d45fab1b3d2604\
             e8a8eff1ae4020cfa39936b66827b23f371b92200be90251e6d73c5f86de5fd4\
             a950781933d79a28272b782a2ec313efdfcc0628f43d744c2dc2ff3dcb66999b\
             50c7ca895b0c64791eeaa5f29499fb1c026f84ce5b5c72ba1083cddb5ce45434\
             631665c333b60b11593fb253c5179a2c8db813782a004856a1653011e93fb6d8\
             76c18366dd8683f53412c0c180f9c848592d593f8609ca736317d356e13e2bff\
             3a9f59cd9aeb19cd482593d8c46128bb32423b37a9adfb482b99453fbe25a41b\
             f6feb4aa0bef5ed24bf73c762978025482c13115e4015aac992e5613a3b5c2f6\
             85b84795cb6e9b2656d8c88157e52c42f978d8634c43d06fea928f2822e465aa\
             6576e9bf419384506cc3ce3c54ac1a6f67dc66f3b30191e698380bc999b05abc\
             e19dc0c6dcc2dd001ec535ba18deb2df1a101023108318c75dc98611a09dc48a\
             0acdec676fabdf222f07e026f059b672b56e5cbc8e1d21bbd867dd9272120546\
             81d70ea737134cdfce93b6f82ae22423274e58a0821cc5502e2d0ab4585e94de\
             6975be5e0b4efce51cd3e70c25a1fbbbd609d273ad5b0d59631c531f6a0a57b9",
        ),
    ];

    fn unhex(s: &str) -> Vec<u8> {
        let digits: Vec<u8> = s.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
        assert!(digits.len().is_multiple_of(2), "odd number of hex digits");
        digits
            .chunks_exact(2)
            .map(|pair| {
                let text = std::str::from_utf8(pair).expect("test hex is ASCII");
                u8::from_str_radix(text, 16).expect("test hex is valid")
            })
            .collect()
    }

    fn ieee_key() -> Vec<u8> {
        let mut key = unhex(IEEE_KEY1);
        key.extend(unhex(IEEE_KEY2));
        key
    }

    /// The plaintext of vectors 10 to 14: bytes 00..ff, twice.
    fn ieee_plaintext() -> Vec<u8> {
        (0..512).map(|i| (i % 256) as u8).collect()
    }

    /// Deterministic filler (splitmix64) so tests need no RNG crate and proptest only has to
    /// generate a seed, not every byte.
    fn fill(buf: &mut [u8], seed: u64) {
        let mut state = seed;
        for chunk in buf.chunks_mut(8) {
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            chunk.copy_from_slice(&z.to_le_bytes()[..chunk.len()]);
        }
    }

    fn key_from_seed(seed: u64) -> [u8; XTS_KEY_LEN] {
        let mut key = [0u8; XTS_KEY_LEN];
        fill(&mut key, seed);
        key
    }

    /// The independent oracle: RustCrypto's `xts-mode` over `aes`, one data unit per sector,
    /// with the tweak computed in 128-bit arithmetic and reduced modulo 2^64 (plain64 wraps).
    struct Oracle(Xts128<Aes256>);

    impl Oracle {
        fn new(key: &[u8]) -> Self {
            let k1 = Aes256::new_from_slice(&key[..32]).expect("32-byte AES key");
            let k2 = Aes256::new_from_slice(&key[32..]).expect("32-byte AES key");
            Self(Xts128::new(k1, k2))
        }

        fn tweak(first_iv: u64, index: usize, sector_size: usize) -> u128 {
            let iv = u128::from(first_iv) + (index as u128) * (sector_size as u128 / 512);
            iv % (1u128 << 64)
        }

        fn encrypt(&self, buf: &mut [u8], sector_size: usize, first_iv: u64) {
            for (i, sector) in buf.chunks_exact_mut(sector_size).enumerate() {
                let tweak = get_tweak_default(Self::tweak(first_iv, i, sector_size));
                self.0.encrypt_sector(sector, tweak);
            }
        }

        fn decrypt(&self, buf: &mut [u8], sector_size: usize, first_iv: u64) {
            for (i, sector) in buf.chunks_exact_mut(sector_size).enumerate() {
                let tweak = get_tweak_default(Self::tweak(first_iv, i, sector_size));
                self.0.decrypt_sector(sector, tweak);
            }
        }
    }

    #[test]
    fn ieee1619_vectors_10_to_14_encrypt() {
        let cipher = XtsCipher::new(&ieee_key()).expect("IEEE key is valid");
        for (number, dusn, ciphertext) in IEEE_VECTORS {
            let mut buf = ieee_plaintext();
            cipher.encrypt_sectors(&mut buf, 512, dusn);
            assert!(
                buf == unhex(ciphertext),
                "IEEE 1619 vector {number} encrypt"
            );
        }
    }

    #[test]
    fn ieee1619_vectors_10_to_14_decrypt() {
        let cipher = XtsCipher::new(&ieee_key()).expect("IEEE key is valid");
        for (number, dusn, ciphertext) in IEEE_VECTORS {
            let mut buf = unhex(ciphertext);
            cipher.decrypt_sectors(&mut buf, 512, dusn);
            assert!(buf == ieee_plaintext(), "IEEE 1619 vector {number} decrypt");
        }
    }

    /// The oracle itself agrees with the standard, so agreeing with the oracle means something.
    #[test]
    fn oracle_passes_ieee1619_vectors() {
        let oracle = Oracle::new(&ieee_key());
        for (number, dusn, ciphertext) in IEEE_VECTORS {
            let mut buf = ieee_plaintext();
            oracle.encrypt(&mut buf, 512, dusn);
            assert!(
                buf == unhex(ciphertext),
                "oracle on IEEE 1619 vector {number}"
            );
        }
    }

    /// Vector 10 as the second of two 512-byte sectors (first IV fe): checks the per-sector IV
    /// step of one against published data.
    #[test]
    fn ieee1619_vector_10_as_second_sector() {
        let cipher = XtsCipher::new(&ieee_key()).expect("IEEE key is valid");
        let (_, dusn, ciphertext) = IEEE_VECTORS[0];
        let mut buf = [ieee_plaintext(), ieee_plaintext()].concat();
        cipher.encrypt_sectors(&mut buf, 512, dusn - 1);
        assert!(buf[512..] == unhex(ciphertext)[..]);
    }

    #[test]
    fn sector_of_4096_uses_plain64_step_of_8() {
        let cipher = XtsCipher::new(&key_from_seed(1)).expect("random key is valid");
        let mut plain = vec![0u8; 8192];
        fill(&mut plain, 2);
        let first_iv = 1000;
        let mut both = plain.clone();
        cipher.encrypt_sectors(&mut both, 4096, first_iv);
        // The second 4096-byte sector is 8 plain64 units after the first...
        let mut second_at_8 = plain[4096..].to_vec();
        cipher.encrypt_sectors(&mut second_at_8, 4096, first_iv + 8);
        assert!(both[4096..] == second_at_8[..]);
        // ...not 1, as a naive "sector number" IV would have it.
        let mut second_at_1 = plain[4096..].to_vec();
        cipher.encrypt_sectors(&mut second_at_1, 4096, first_iv + 1);
        assert!(both[4096..] != second_at_1[..]);
    }

    /// Explicit edge IVs for both sector sizes: beyond 2^32, and wrapping past u64::MAX.
    #[test]
    fn edge_ivs_match_oracle() {
        let key = key_from_seed(3);
        let cipher = XtsCipher::new(&key).expect("random key is valid");
        let oracle = Oracle::new(&key);
        let ivs = [
            0,
            1,
            (1 << 32) - 1,
            1 << 32,
            (1 << 32) + 7,
            1 << 40,
            u64::MAX / 2,
            u64::MAX - 8,
            u64::MAX - 7,
            u64::MAX - 1,
            u64::MAX,
        ];
        for sector_size in [512, 1024, 2048, 4096] {
            for first_iv in ivs {
                let mut ours = vec![0u8; 4 * sector_size];
                fill(&mut ours, first_iv ^ sector_size as u64);
                let plain = ours.clone();
                let mut expected = plain.clone();
                cipher.encrypt_sectors(&mut ours, sector_size, first_iv);
                oracle.encrypt(&mut expected, sector_size, first_iv);
                assert!(
                    ours == expected,
                    "encrypt, sector {sector_size}, iv {first_iv}"
                );
                cipher.decrypt_sectors(&mut ours, sector_size, first_iv);
                assert!(
                    ours == plain,
                    "round trip, sector {sector_size}, iv {first_iv}"
                );
            }
        }
    }

    /// The tweak is the plain64 IV and nothing else: at IV u64::MAX the next 512-byte sector
    /// uses IV 0, exactly like a lone sector at IV 0.
    #[test]
    fn iv_wraps_modulo_2_pow_64() {
        let cipher = XtsCipher::new(&key_from_seed(4)).expect("random key is valid");
        let mut pair = vec![0u8; 1024];
        fill(&mut pair, 5);
        let mut at_zero = pair[512..].to_vec();
        cipher.encrypt_sectors(&mut pair, 512, u64::MAX);
        cipher.encrypt_sectors(&mut at_zero, 512, 0);
        assert!(pair[512..] == at_zero[..]);
    }

    #[test]
    fn empty_buffer_is_a_no_op() {
        let cipher = XtsCipher::new(&key_from_seed(6)).expect("random key is valid");
        cipher.encrypt_sectors(&mut [], 4096, 42);
        cipher.decrypt_sectors(&mut [], 512, 42);
    }

    #[test]
    fn rejects_equal_halves() {
        let half = key_from_seed(7);
        let mut key = [0u8; XTS_KEY_LEN];
        key[..32].copy_from_slice(&half[..32]);
        key[32..].copy_from_slice(&half[..32]);
        let err = XtsCipher::new(&key).expect_err("equal halves must be rejected");
        assert_eq!(err.reason, InvalidKeyReason::EqualHalves);
        // All-zero keys are the likeliest accident.
        assert!(XtsCipher::new(&[0u8; XTS_KEY_LEN]).is_err());
        // One differing byte, anywhere, is enough.
        for i in [0, 31, 32, 63] {
            let mut nearly = key;
            nearly[i] ^= 1;
            assert!(XtsCipher::new(&nearly).is_ok(), "byte {i} differs");
        }
    }

    #[test]
    fn rejects_wrong_length() {
        let long = [0x5au8; 2 * XTS_KEY_LEN];
        for len in [0, 1, 16, 32, 48, 63, 65, 96, 128] {
            let mut key = long[..len].to_vec();
            fill(&mut key, len as u64);
            let err = XtsCipher::new(&key).expect_err("wrong length must be rejected");
            assert_eq!(err.reason, InvalidKeyReason::Length(len));
            assert!(err.to_string().contains(&len.to_string()));
        }
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn debug_and_errors_print_no_key_material() {
        let key = key_from_seed(8);
        let cipher = XtsCipher::new(&key).expect("random key is valid");
        let printed = [format!("{cipher:?}"), format!("{cipher:#?}")];
        for text in &printed {
            assert!(text.starts_with("XtsCipher"), "{text}");
            // No hex run of the key, upper or lower case, and no Debug-formatted byte run.
            for window in key.windows(4) {
                assert!(!text.to_lowercase().contains(&hex(window)), "{text}");
                let as_list = format!("{window:?}");
                assert!(!text.contains(&as_list[1..as_list.len() - 1]), "{text}");
            }
        }
        let mut equal = key;
        equal.copy_within(..32, 32);
        let err = XtsCipher::new(&equal).expect_err("equal halves");
        for text in [err.to_string(), format!("{err:?}")] {
            for window in equal.windows(4) {
                assert!(!text.to_lowercase().contains(&hex(window)), "{text}");
            }
        }
    }

    #[test]
    fn cipher_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<XtsCipher>();
    }

    /// Many threads share one cipher (so the pool hands out and takes back several contexts at
    /// once) and every one of them gets the single-threaded answer.
    #[test]
    fn concurrent_use_matches_single_thread() {
        let key = key_from_seed(9);
        let cipher = XtsCipher::new(&key).expect("random key is valid");
        let oracle = Oracle::new(&key);
        std::thread::scope(|scope| {
            for t in 0..8u64 {
                let (cipher, oracle) = (&cipher, &oracle);
                scope.spawn(move || {
                    for round in 0..50u64 {
                        let sector_size = if (t + round) % 2 == 0 { 512 } else { 4096 };
                        let first_iv = (t << 40) + round * 64;
                        let mut ours = vec![0u8; 3 * sector_size];
                        fill(&mut ours, t * 1000 + round);
                        let plain = ours.clone();
                        let mut expected = plain.clone();
                        oracle.encrypt(&mut expected, sector_size, first_iv);
                        cipher.encrypt_sectors(&mut ours, sector_size, first_iv);
                        assert!(ours == expected, "thread {t} round {round}");
                        cipher.decrypt_sectors(&mut ours, sector_size, first_iv);
                        assert!(ours == plain, "thread {t} round {round}");
                    }
                });
            }
        });
        let idle = cipher.encrypt.lock().idle.len();
        assert!((1..=8).contains(&idle), "{idle} idle contexts");
    }

    #[test]
    #[should_panic(expected = "is not a multiple of the sector size")]
    fn panics_on_partial_sector() {
        let cipher = XtsCipher::new(&key_from_seed(10)).expect("random key is valid");
        cipher.encrypt_sectors(&mut [0u8; 4096 + 512], 4096, 0);
    }

    #[test]
    #[should_panic(expected = "sector size must be a power of two")]
    fn panics_on_sector_size_not_power_of_two() {
        let cipher = XtsCipher::new(&key_from_seed(11)).expect("random key is valid");
        cipher.decrypt_sectors(&mut [0u8; 3000], 1000, 0);
    }

    #[test]
    #[should_panic(expected = "sector size must be a power of two")]
    fn panics_on_sector_size_too_small() {
        let cipher = XtsCipher::new(&key_from_seed(12)).expect("random key is valid");
        cipher.encrypt_sectors(&mut [0u8; 512], 256, 0);
    }

    #[test]
    #[should_panic(expected = "sector size must be a power of two")]
    fn panics_on_sector_size_too_large() {
        let cipher = XtsCipher::new(&key_from_seed(13)).expect("random key is valid");
        cipher.encrypt_sectors(&mut vec![0u8; 8192], 8192, 0);
    }

    /// IVs that matter: small, around 2^32, anywhere, and at the top where plain64 wraps.
    fn interesting_iv() -> impl Strategy<Value = u64> {
        prop_oneof![
            0..1_000u64,
            (1u64 << 32) - 64..(1u64 << 32) + 64,
            any::<u64>(),
            u64::MAX - 128..=u64::MAX,
        ]
    }

    fn sector_size() -> impl Strategy<Value = usize> {
        prop_oneof![Just(512usize), Just(1024), Just(2048), Just(4096)]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Random keys, sector sizes, IVs and buffers of 1 to 8 sectors: our ciphertext is the
        /// oracle's, our decryption is the oracle's, and decrypt(encrypt(x)) == x.
        #[test]
        fn matches_xts_mode_oracle(
            key_seed in any::<u64>(),
            data_seed in any::<u64>(),
            sector_size in sector_size(),
            sectors in 1usize..=8,
            first_iv in interesting_iv(),
        ) {
            let key = key_from_seed(key_seed);
            prop_assume!(key[..32] != key[32..]);
            let cipher = XtsCipher::new(&key).expect("halves differ");
            let oracle = Oracle::new(&key);

            let mut plain = vec![0u8; sectors * sector_size];
            fill(&mut plain, data_seed);

            let mut ours = plain.clone();
            let mut expected = plain.clone();
            cipher.encrypt_sectors(&mut ours, sector_size, first_iv);
            oracle.encrypt(&mut expected, sector_size, first_iv);
            prop_assert!(ours == expected, "encryption differs from xts-mode");

            let mut oracle_plain = ours.clone();
            oracle.decrypt(&mut oracle_plain, sector_size, first_iv);
            cipher.decrypt_sectors(&mut ours, sector_size, first_iv);
            prop_assert!(ours == plain, "decrypt(encrypt(x)) != x");
            prop_assert!(oracle_plain == plain, "xts-mode cannot decrypt our output");
        }

        /// Decrypting random "ciphertext" agrees with the oracle too (decryption is not only
        /// tested through round trips of our own output).
        #[test]
        fn decrypt_matches_xts_mode_oracle(
            key_seed in any::<u64>(),
            data_seed in any::<u64>(),
            sector_size in sector_size(),
            sectors in 1usize..=4,
            first_iv in interesting_iv(),
        ) {
            let key = key_from_seed(key_seed);
            prop_assume!(key[..32] != key[32..]);
            let cipher = XtsCipher::new(&key).expect("halves differ");
            let oracle = Oracle::new(&key);

            let mut ours = vec![0u8; sectors * sector_size];
            fill(&mut ours, data_seed);
            let mut expected = ours.clone();
            cipher.decrypt_sectors(&mut ours, sector_size, first_iv);
            oracle.decrypt(&mut expected, sector_size, first_iv);
            prop_assert!(ours == expected);
        }

        /// Encrypting sectors one call at a time equals encrypting them in one call.
        #[test]
        fn split_calls_equal_one_call(
            key_seed in any::<u64>(),
            data_seed in any::<u64>(),
            sector_size in sector_size(),
            sectors in 1usize..=8,
            first_iv in interesting_iv(),
        ) {
            let key = key_from_seed(key_seed);
            prop_assume!(key[..32] != key[32..]);
            let cipher = XtsCipher::new(&key).expect("halves differ");
            let mut whole = vec![0u8; sectors * sector_size];
            fill(&mut whole, data_seed);
            let mut pieces = whole.clone();
            cipher.encrypt_sectors(&mut whole, sector_size, first_iv);
            let step = (sector_size / 512) as u64;
            for (i, sector) in pieces.chunks_exact_mut(sector_size).enumerate() {
                cipher.encrypt_sectors(sector, sector_size, first_iv.wrapping_add(i as u64 * step));
            }
            prop_assert!(whole == pieces);
        }
    }
}
