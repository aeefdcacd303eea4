//! Temporary AES-256-XTS (replaced by the tuned engine): one EVP context per call.
#![allow(unsafe_code)]

/// Key length of AES-256-XTS.
pub const XTS_KEY_LEN: usize = 64;

/// The key was not 64 bytes or its halves were equal.
#[derive(Debug, thiserror::Error)]
#[error("an AES-256-XTS key is 64 bytes with two different halves")]
pub struct InvalidKey;

/// AES-256-XTS over whole sectors.
pub struct XtsCipher {
    key: zeroize::Zeroizing<Vec<u8>>,
}

impl std::fmt::Debug for XtsCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("XtsCipher(redacted)")
    }
}

impl XtsCipher {
    /// A cipher for `key`.
    pub fn new(key: &[u8]) -> Result<Self, InvalidKey> {
        if key.len() != XTS_KEY_LEN || key[..32] == key[32..] {
            return Err(InvalidKey);
        }
        Ok(Self {
            key: zeroize::Zeroizing::new(key.to_vec()),
        })
    }
    fn run(&self, buf: &mut [u8], sector_size: usize, first_iv: u64, enc: i32) {
        assert!(buf.len() % sector_size == 0);
        // SAFETY: temporary engine; pointers are valid for the lengths given.
        unsafe {
            let ctx = aws_lc_sys::EVP_CIPHER_CTX_new();
            assert!(
                aws_lc_sys::EVP_CipherInit_ex(
                    ctx,
                    aws_lc_sys::EVP_aes_256_xts(),
                    std::ptr::null_mut(),
                    self.key.as_ptr(),
                    std::ptr::null(),
                    enc
                ) == 1
            );
            for (i, s) in buf.chunks_mut(sector_size).enumerate() {
                let mut iv = [0u8; 16];
                iv[..8].copy_from_slice(&(first_iv + (i * sector_size / 512) as u64).to_le_bytes());
                assert!(
                    aws_lc_sys::EVP_CipherInit_ex(
                        ctx,
                        std::ptr::null(),
                        std::ptr::null_mut(),
                        std::ptr::null(),
                        iv.as_ptr(),
                        enc
                    ) == 1
                );
                let mut outl = 0;
                let p = s.as_mut_ptr();
                assert!(aws_lc_sys::EVP_CipherUpdate(ctx, p, &mut outl, p, s.len() as i32) == 1);
            }
            aws_lc_sys::EVP_CIPHER_CTX_free(ctx);
        }
    }
    /// Encrypts whole sectors in place.
    pub fn encrypt_sectors(&self, buf: &mut [u8], sector_size: usize, first_iv: u64) {
        self.run(buf, sector_size, first_iv, 1)
    }
    /// Decrypts whole sectors in place.
    pub fn decrypt_sectors(&self, buf: &mut [u8], sector_size: usize, first_iv: u64) {
        self.run(buf, sector_size, first_iv, 0)
    }
}
