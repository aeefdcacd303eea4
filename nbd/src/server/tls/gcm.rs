//! AES-GCM for TLS records in pieces, through aws-lc's streaming `EVP_CIPHER` interface:
//! a record is sealed from the reply's own buffers straight into the send buffer, and opened
//! from the receive buffer straight into the request's buffer, with no copy beside the
//! cipher's own pass. aws-lc-rs offers AEADs only in place or from one slice, and a record's
//! plaintext is several pieces (reply headers, data, the TLS 1.3 content type).
//!
//! aws-lc runs the same AVX-512/AES-NI code for the streaming calls as for its one-shot AEAD.
//! The only unsafe code of the crate lives here; every block says why it is sound.

#![allow(unsafe_code)]

use std::ffi::c_int;
use std::ptr::{self, NonNull};

use aws_lc_sys as ffi;

/// The GCM tag length TLS uses.
pub(crate) const TAG_LEN: usize = 16;

/// An owned aws-lc `EVP_CIPHER_CTX` keyed for AES-GCM in one direction; freed (and its key
/// schedule cleansed) on drop.
pub(crate) struct Gcm {
    ctx: NonNull<ffi::EVP_CIPHER_CTX>,
}

// SAFETY: an EVP_CIPHER_CTX is plain heap memory with no thread affinity (no thread-locals,
// no locks); `Gcm` owns it exclusively and touches it only through `&mut self`, so moving it
// to another thread is sound, and `&Gcm` gives no access at all, so sharing it is too.
unsafe impl Send for Gcm {}
// SAFETY: as above: no method takes `&self`.
unsafe impl Sync for Gcm {}

/// Whether aws-lc reported success (1).
fn ok(rc: c_int) -> bool {
    rc == 1
}

impl Gcm {
    /// A context for AES-128-GCM or AES-256-GCM (by the key's length), sealing or opening.
    /// `None` for another key length, or if aws-lc cannot allocate.
    pub(crate) fn new(key: &[u8], seal: bool) -> Option<Self> {
        // SAFETY: these return pointers to static cipher descriptions.
        let cipher = unsafe {
            match key.len() {
                16 => ffi::EVP_aes_128_gcm(),
                32 => ffi::EVP_aes_256_gcm(),
                _ => return None,
            }
        };
        // SAFETY: no preconditions; NULL on allocation failure, checked below.
        let ctx = NonNull::new(unsafe { ffi::EVP_CIPHER_CTX_new() })?;
        let gcm = Self { ctx };
        // SAFETY: `ctx` is a fresh context we own; `cipher` is static; `key` holds exactly the
        // cipher's key length and is read during the call only; a NULL engine and IV are
        // allowed (the IV is set per record, and its default length is GCM's 12 bytes).
        let rc = unsafe {
            ffi::EVP_CipherInit_ex(
                gcm.ctx.as_ptr(),
                cipher,
                ptr::null_mut(),
                key.as_ptr(),
                ptr::null(),
                c_int::from(seal),
            )
        };
        ok(rc).then_some(gcm)
    }

    /// Starts a record: its nonce and its additional data.
    pub(crate) fn begin(&mut self, nonce: &[u8; 12], aad: &[u8]) -> bool {
        // SAFETY: `ctx` is keyed and ours alone (`&mut self`); NULL cipher, engine and key keep
        // the key schedule; `nonce` is 12 readable bytes (the IV length) copied during the
        // call; enc = -1 keeps the direction.
        let rc = unsafe {
            ffi::EVP_CipherInit_ex(
                self.ctx.as_ptr(),
                ptr::null(),
                ptr::null_mut(),
                ptr::null(),
                nonce.as_ptr(),
                -1,
            )
        };
        if !ok(rc) {
            return false;
        }
        let Ok(len) = c_int::try_from(aad.len()) else {
            return false;
        };
        let mut written: c_int = 0;
        // SAFETY: a NULL output makes this call take `aad` as additional data; `aad` is
        // readable for `len` bytes; `written` is a valid c_int.
        ok(unsafe {
            ffi::EVP_CipherUpdate(
                self.ctx.as_ptr(),
                ptr::null_mut(),
                &mut written,
                aad.as_ptr(),
                len,
            )
        })
    }

    /// Encrypts or decrypts (as keyed) `input` into `output`, of the same length.
    pub(crate) fn update(&mut self, input: &[u8], output: &mut [u8]) -> bool {
        assert_eq!(
            input.len(),
            output.len(),
            "GCM pieces in and out differ in length"
        );
        // SAFETY: `input` and `output` are valid for `len` bytes and do not overlap (one is
        // shared, the other exclusive); GCM is a stream mode: it writes exactly `len` bytes.
        unsafe { self.update_raw(input.as_ptr(), output.as_mut_ptr(), input.len()) }
    }

    /// Encrypts or decrypts `buf` in place.
    pub(crate) fn update_in_place(&mut self, buf: &mut [u8]) -> bool {
        let p = buf.as_mut_ptr();
        // SAFETY: `buf` is valid for reads and writes of its length and ours alone; aws-lc
        // allows the output to be exactly the input.
        unsafe { self.update_raw(p, p, buf.len()) }
    }

    /// # Safety
    /// `input` must be readable and `output` writable for `len` bytes, either not overlapping
    /// at all or exactly equal.
    unsafe fn update_raw(&mut self, input: *const u8, output: *mut u8, len: usize) -> bool {
        if len == 0 {
            return true;
        }
        let Ok(n) = c_int::try_from(len) else {
            return false;
        };
        let mut written: c_int = 0;
        // SAFETY: the caller vouches for the buffers; `ctx` is keyed and ours alone; GCM
        // buffers nothing, so it writes exactly `n` bytes, checked below.
        let rc =
            unsafe { ffi::EVP_CipherUpdate(self.ctx.as_ptr(), output, &mut written, input, n) };
        ok(rc) && written == n
    }

    /// Ends a record (`EVP_CipherFinal_ex`; for an opened one, this checks the tag set
    /// before, in constant time).
    fn finish(&mut self) -> bool {
        let mut none = [0u8; 16];
        let mut written: c_int = 0;
        // SAFETY: `ctx` is keyed and ours alone; GCM writes no bytes at the end (`none` has
        // room for a block anyway); `written` is a valid c_int.
        ok(unsafe { ffi::EVP_CipherFinal_ex(self.ctx.as_ptr(), none.as_mut_ptr(), &mut written) })
    }

    /// Gets (`EVP_CTRL_GCM_GET_TAG`) or sets (`EVP_CTRL_GCM_SET_TAG`) the record's tag.
    fn tag_ctrl(&mut self, op: c_int, tag: &mut [u8; TAG_LEN]) -> bool {
        // SAFETY: `ctx` is keyed and ours alone; both controls read or write exactly
        // `TAG_LEN` bytes at `tag`, which holds them.
        ok(unsafe {
            ffi::EVP_CIPHER_CTX_ctrl(
                self.ctx.as_ptr(),
                op,
                TAG_LEN as c_int,
                tag.as_mut_ptr().cast(),
            )
        })
    }

    /// Ends a sealed record: its tag.
    pub(crate) fn seal_tag(&mut self) -> Option<[u8; TAG_LEN]> {
        let mut tag = [0u8; TAG_LEN];
        (self.finish() && self.tag_ctrl(ffi::EVP_CTRL_GCM_GET_TAG, &mut tag)).then_some(tag)
    }

    /// Ends an opened record: true if `tag` authenticates it. Until then, what
    /// [`update`](Self::update) produced must not be used.
    pub(crate) fn open_check(&mut self, tag: &[u8]) -> bool {
        let Ok(mut tag): Result<[u8; TAG_LEN], _> = tag.try_into() else {
            return false;
        };
        let verified = self.tag_ctrl(ffi::EVP_CTRL_GCM_SET_TAG, &mut tag) && self.finish();
        if !verified {
            // A failed check leaves an entry on aws-lc's per-thread error queue; drop it.
            // SAFETY: no preconditions.
            unsafe { ffi::ERR_clear_error() };
        }
        verified
    }
}

impl Drop for Gcm {
    fn drop(&mut self) {
        // SAFETY: `ctx` came from EVP_CIPHER_CTX_new, is owned by this value alone and freed
        // exactly once, here; EVP_CIPHER_CTX_free cleanses the key schedule.
        unsafe { ffi::EVP_CIPHER_CTX_free(self.ctx.as_ptr()) };
    }
}
