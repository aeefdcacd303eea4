//! Reading an initramfs image: the "newc" cpio archives the kernel unpacks, one after the
//! other (an uncompressed early one, such as CPU microcode, then a compressed main one), as
//! initramfs-tools and dracut write them. [`parse`] reads archives until the bytes end or a
//! compressed part starts (the caller decompresses it with the program [`Compression`] names
//! and parses again); [`Image`] answers what a path holds, through the image's own symlinks
//! (`/sbin` → `usr/sbin` on a merged-/usr system).

use std::collections::BTreeMap;

/// A compressed part of an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// gzip.
    Gzip,
    /// zstd (Debian 12's default).
    Zstd,
    /// xz.
    Xz,
    /// lz4 (legacy frame, as the kernel reads it).
    Lz4,
    /// bzip2.
    Bzip2,
    /// lzma.
    Lzma,
}

impl Compression {
    /// The program that decompresses it to standard output (`PROGRAM -dc`), and its Debian
    /// package.
    pub fn program(self) -> (&'static str, &'static str) {
        match self {
            Compression::Gzip => ("gzip", "gzip"),
            Compression::Zstd => ("zstd", "zstd"),
            Compression::Xz => ("xz", "xz-utils"),
            Compression::Lz4 => ("lz4", "lz4"),
            Compression::Bzip2 => ("bzip2", "bzip2"),
            Compression::Lzma => ("lzma", "xz-utils"),
        }
    }

    /// The compression `bytes` start with, if known.
    pub fn of(bytes: &[u8]) -> Option<Self> {
        const MAGIC: [(&[u8], Compression); 6] = [
            (b"\x1f\x8b", Compression::Gzip),
            (b"\x28\xb5\x2f\xfd", Compression::Zstd),
            (b"\xfd7zXZ\x00", Compression::Xz),
            (b"\x02\x21\x4c\x18", Compression::Lz4),
            (b"BZh", Compression::Bzip2),
            (b"\x5d\x00\x00", Compression::Lzma),
        ];
        MAGIC
            .iter()
            .find(|(m, _)| bytes.starts_with(m))
            .map(|(_, c)| *c)
    }
}

/// One entry of an archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Its path, without a leading `/` or `./`.
    pub name: String,
    /// Its mode (type and permissions).
    pub mode: u32,
    /// Its content (a symlink's target).
    pub data: Vec<u8>,
}

const S_IFMT: u32 = 0o170000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFDIR: u32 = 0o040000;

impl Entry {
    /// A regular file.
    pub fn is_file(&self) -> bool {
        self.mode & S_IFMT == S_IFREG
    }

    /// A symbolic link.
    pub fn is_symlink(&self) -> bool {
        self.mode & S_IFMT == S_IFLNK
    }

    /// A directory.
    pub fn is_dir(&self) -> bool {
        self.mode & S_IFMT == S_IFDIR
    }
}

/// What [`parse`] read: the entries, and where a compressed part starts, if one does.
pub type Parsed = (Vec<Entry>, Option<(Compression, usize)>);

/// The entries of the uncompressed archives at the start of `bytes`, and where a compressed
/// part starts, if one does. `Err` says what is wrong and where.
pub fn parse(bytes: &[u8]) -> Result<Parsed, String> {
    let mut entries = Vec::new();
    let mut at = 0;
    loop {
        // Archives are padded with zeros between them.
        while bytes.get(at) == Some(&0) {
            at += 1;
        }
        let rest = &bytes[at.min(bytes.len())..];
        if rest.is_empty() {
            return Ok((entries, None));
        }
        if rest.starts_with(b"070701") || rest.starts_with(b"070702") {
            at = read_archive(bytes, at, &mut entries)?;
            continue;
        }
        return match Compression::of(rest) {
            Some(c) => Ok((entries, Some((c, at)))),
            None => Err(format!(
                "byte {at}: neither a cpio archive nor a compression this reader knows"
            )),
        };
    }
}

/// Reads one newc archive starting at `at` up to its trailer; the offset after it.
fn read_archive(bytes: &[u8], mut at: usize, out: &mut Vec<Entry>) -> Result<usize, String> {
    const HEADER: usize = 110;
    let pad4 = |n: usize| (n + 3) & !3;
    loop {
        let header = bytes
            .get(at..at + HEADER)
            .ok_or_else(|| format!("byte {at}: the archive ends inside a header"))?;
        if !(header.starts_with(b"070701") || header.starts_with(b"070702")) {
            return Err(format!("byte {at}: not a newc cpio header"));
        }
        let field = |i: usize| -> Result<usize, String> {
            let text = std::str::from_utf8(&header[6 + 8 * i..6 + 8 * (i + 1)])
                .map_err(|_| format!("byte {at}: a header field is not text"))?;
            usize::from_str_radix(text, 16)
                .map_err(|_| format!("byte {at}: a header field is not hexadecimal"))
        };
        let mode = field(1)? as u32;
        let size = field(6)?;
        let name_len = field(11)?;
        let name_start = at + HEADER;
        let name = bytes
            .get(name_start..name_start + name_len)
            .ok_or_else(|| format!("byte {at}: the archive ends inside a name"))?;
        let name = name.strip_suffix(b"\0").unwrap_or(name);
        let name = String::from_utf8_lossy(name).into_owned();
        let data_start = pad4(name_start + name_len);
        let data = bytes
            .get(data_start..data_start + size)
            .ok_or_else(|| format!("byte {at}: the archive ends inside {name}"))?;
        at = pad4(data_start + size);
        if name == "TRAILER!!!" {
            return Ok(at);
        }
        let name = name
            .trim_start_matches("./")
            .trim_start_matches('/')
            .to_owned();
        if !name.is_empty() && name != "." {
            out.push(Entry {
                name,
                mode,
                data: data.to_vec(),
            });
        }
    }
}

/// The entries of a whole image, by path; a later archive's entry replaces an earlier one's,
/// as when the kernel unpacks them.
#[derive(Debug, Default)]
pub struct Image {
    entries: BTreeMap<String, Entry>,
}

impl Image {
    /// Adds `entries`.
    pub fn add(&mut self, entries: Vec<Entry>) {
        for e in entries {
            self.entries.insert(e.name.clone(), e);
        }
    }

    /// Every entry, by path.
    pub fn entries(&self) -> impl Iterator<Item = &Entry> {
        self.entries.values()
    }

    /// The entry at absolute `path`, following the image's symlinks on the way (up to 40, as
    /// the kernel does).
    pub fn get(&self, path: &str) -> Option<&Entry> {
        let mut parts: Vec<String> = Vec::new();
        let mut todo: Vec<String> = path
            .split('/')
            .filter(|p| !p.is_empty())
            .rev()
            .map(str::to_owned)
            .collect();
        let mut hops = 0;
        while let Some(part) = todo.pop() {
            match part.as_str() {
                "." => continue,
                ".." => {
                    parts.pop();
                    continue;
                }
                _ => {}
            }
            parts.push(part);
            // A directory an archive does not list is still a directory.
            let here = parts.join("/");
            if let Some(entry) = self.entries.get(&here)
                && entry.is_symlink()
            {
                hops += 1;
                if hops > 40 {
                    return None;
                }
                let target = String::from_utf8_lossy(&entry.data).into_owned();
                parts.pop();
                if target.starts_with('/') {
                    parts.clear();
                }
                todo.extend(
                    target
                        .split('/')
                        .filter(|p| !p.is_empty())
                        .rev()
                        .map(str::to_owned),
                );
            }
        }
        self.entries.get(&parts.join("/"))
    }

    /// The regular files whose file name `pred` accepts.
    pub fn files_named<'a>(
        &'a self,
        pred: impl Fn(&str) -> bool + 'a,
    ) -> impl Iterator<Item = &'a Entry> + 'a {
        self.entries
            .values()
            .filter(move |e| e.is_file() && pred(e.name.rsplit('/').next().unwrap_or(&e.name)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A newc archive of `(name, mode, data)`.
    fn newc(entries: &[(&str, u32, &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        let pad = |out: &mut Vec<u8>| {
            while !out.len().is_multiple_of(4) {
                out.push(0);
            }
        };
        let trailer: (&str, u32, &[u8]) = ("TRAILER!!!", 0, b"");
        for (name, mode, data) in entries.iter().chain(std::iter::once(&trailer)) {
            out.extend_from_slice(b"070701");
            for v in [
                0,
                *mode as usize,
                0,
                0,
                1,
                0,
                data.len(),
                0,
                0,
                0,
                0,
                name.len() + 1,
                0,
            ] {
                out.extend_from_slice(format!("{v:08x}").as_bytes());
            }
            out.extend_from_slice(name.as_bytes());
            out.push(0);
            pad(&mut out);
            out.extend_from_slice(data);
            pad(&mut out);
        }
        out
    }

    #[test]
    fn archives_one_after_another_and_symlinks_are_read() {
        let mut bytes = newc(&[("kernel/x86/microcode/GenuineIntel.bin", 0o100644, b"uc")]);
        bytes.extend_from_slice(&[0; 512]);
        bytes.extend(newc(&[
            (".", 0o040755, b""),
            ("usr", 0o040755, b""),
            ("usr/sbin", 0o040755, b""),
            ("sbin", 0o120777, b"usr/sbin"),
            ("usr/sbin/cryptnbd", 0o100755, b"\x7fELF"),
            ("etc/cryptnbd/root.toml", 0o100644, b"[kms]\n"),
            ("bin", 0o120777, b"/usr/bin"),
        ]));
        let (entries, rest) = parse(&bytes).expect("parse");
        assert_eq!(rest, None);
        let mut image = Image::default();
        image.add(entries);
        assert_eq!(
            image.get("/sbin/cryptnbd").expect("through sbin").data,
            b"\x7fELF"
        );
        assert_eq!(
            image.get("/usr/sbin/../sbin/cryptnbd").map(|e| e.is_file()),
            Some(true)
        );
        assert!(image.get("/etc/cryptnbd/root.toml").is_some());
        assert!(image.get("/etc/cryptnbd/other.toml").is_none());
        assert!(image.get("/bin/sh").is_none());
        assert_eq!(image.files_named(|n| n == "cryptnbd").count(), 1);

        // A compressed part after the first archive: where it starts.
        let mut two = newc(&[("early", 0o100644, b"e")]);
        let start = two.len();
        two.extend_from_slice(b"\x28\xb5\x2f\xfd....");
        let (entries, rest) = parse(&two).expect("parse");
        assert_eq!(entries.len(), 1);
        assert_eq!(rest, Some((Compression::Zstd, start)));
    }

    #[test]
    fn damaged_archives_are_errors_not_panics() {
        let good = newc(&[("a", 0o100644, b"abcdef")]);
        for cut in [5, 60, 112, 118] {
            assert!(parse(&good[..cut]).is_err(), "cut at {cut}");
        }
        assert!(parse(b"garbage!").is_err());
        let mut bad = good.clone();
        bad[14] = b'z'; // the mode field
        assert!(parse(&bad).is_err());
    }
}
