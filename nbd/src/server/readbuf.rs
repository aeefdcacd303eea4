//! The per-connection input buffer: one fixed allocation, reused for every message.

use tokio::io::{AsyncRead, AsyncReadExt};

/// Bytes received and not yet consumed live in `buf[start..end]`.
pub(crate) struct ReadBuf {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

impl ReadBuf {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            buf: vec![0; capacity].into_boxed_slice(),
            start: 0,
            end: 0,
        }
    }

    /// The buffered bytes.
    pub(crate) fn data(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    pub(crate) fn len(&self) -> usize {
        self.end - self.start
    }

    pub(crate) fn consume(&mut self, n: usize) {
        self.start += n.min(self.len());
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Reads until at least `min` bytes are buffered (`min` <= capacity). Returns false on
    /// end of stream before that. Cancel-safe: bytes already read stay buffered.
    pub(crate) async fn fill<R: AsyncRead + Unpin>(
        &mut self,
        rd: &mut R,
        min: usize,
    ) -> std::io::Result<bool> {
        debug_assert!(min <= self.buf.len());
        while self.len() < min {
            if self.buf.len() - self.start < min {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            let n = rd.read(&mut self.buf[self.end..]).await?;
            if n == 0 {
                return Ok(false);
            }
            self.end += n;
        }
        Ok(true)
    }

    /// Copies exactly `out.len()` bytes of the stream into `out`: first what is buffered, then
    /// straight from the stream (large payloads never pass through this buffer). Returns false
    /// on end of stream first.
    pub(crate) async fn read_exact_into<R: AsyncRead + Unpin>(
        &mut self,
        rd: &mut R,
        out: &mut [u8],
    ) -> std::io::Result<bool> {
        let have = self.len().min(out.len());
        out[..have].copy_from_slice(&self.data()[..have]);
        self.consume(have);
        let mut done = have;
        let rest = out.len() - done;
        // A short remainder is read through the buffer: the same system call may bring the
        // next requests along.
        if rest > 0 && rest <= self.buf.len() / 4 {
            if !self.fill(rd, rest).await? {
                return Ok(false);
            }
            out[done..].copy_from_slice(&self.data()[..rest]);
            self.consume(rest);
            return Ok(true);
        }
        while done < out.len() {
            let n = rd.read(&mut out[done..]).await?;
            if n == 0 {
                return Ok(false);
            }
            done += n;
        }
        Ok(true)
    }

    /// Reads and drops `n` bytes of the stream (a payload that is refused) without any
    /// allocation. Returns false on end of stream first.
    pub(crate) async fn skip<R: AsyncRead + Unpin>(
        &mut self,
        rd: &mut R,
        mut n: u64,
    ) -> std::io::Result<bool> {
        loop {
            let have = u64::try_from(self.len()).unwrap_or(u64::MAX).min(n);
            // `have` <= self.len(), a usize.
            self.consume(usize::try_from(have).unwrap_or(usize::MAX));
            n -= have;
            if n == 0 {
                return Ok(true);
            }
            if !self.fill(rd, 1).await? {
                return Ok(false);
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly on purpose
mod tests {
    use super::*;

    #[tokio::test]
    async fn fill_compacts_and_reads_across_boundaries() {
        let data: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
        let mut rd = &data[..];
        let mut rb = ReadBuf::new(64);
        let mut seen = Vec::new();
        while rb.fill(&mut rd, 10).await.unwrap() {
            seen.extend_from_slice(&rb.data()[..10]);
            rb.consume(10);
        }
        assert_eq!(seen, data);
    }

    #[tokio::test]
    async fn read_exact_into_and_skip() {
        let data: Vec<u8> = (0..=255u8).cycle().take(5000).collect();
        let mut rd = &data[..];
        let mut rb = ReadBuf::new(64);
        assert!(rb.fill(&mut rd, 4).await.unwrap());
        let mut out = vec![0; 1000];
        assert!(rb.read_exact_into(&mut rd, &mut out).await.unwrap());
        assert_eq!(out, data[..1000]);
        let mut small = [0; 10];
        assert!(rb.read_exact_into(&mut rd, &mut small).await.unwrap());
        assert_eq!(small, data[1000..1010]);
        assert!(rb.skip(&mut rd, 3000).await.unwrap());
        assert!(rb.fill(&mut rd, 1).await.unwrap());
        assert_eq!(rb.data()[0], data[4010]);
        assert!(!rb.skip(&mut rd, 10_000).await.unwrap());
    }
}
