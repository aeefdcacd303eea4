//! The audit trail: one JSON line per KMS operation and per key-related action, append-only,
//! rotated by size, never key material.
//!
//! Record fields: `time` (RFC 3339 UTC), `operation` (`create`, `attach`, `detach`, `delete`,
//! ...), `backend`, `key_id`, `context` (the full encryption context), `volume`,
//! `caller_uid`, `outcome` (`ok` or the error message), `latency_ms`. Records of calls to a
//! remote KMS (operation `kms:Decrypt`, `kms:GenerateDataKey`, ...) also carry `request_id`,
//! the id AWS CloudTrail logs for the same call.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::Serialize;

pub use crate::stamp::now;

tokio::task_local! {
    /// The volume and caller of the request being handled: records of KMS calls made while
    /// handling it name them (the daemon sets it around each request).
    pub static AUDIT_SCOPE: AuditScope;
}

/// See [`AUDIT_SCOPE`].
#[derive(Debug, Clone, Default)]
pub struct AuditScope {
    /// Volume name.
    pub volume: Option<String>,
    /// Caller uid.
    pub caller_uid: Option<u32>,
}

/// One audit record.
#[derive(Debug, Clone, Serialize)]
pub struct AuditRecord {
    /// When (RFC 3339 UTC).
    pub time: String,
    /// What.
    pub operation: String,
    /// KMS backend.
    pub backend: String,
    /// Master key id (when known).
    pub key_id: Option<String>,
    /// The full encryption context (when known).
    pub context: Option<std::collections::BTreeMap<String, String>>,
    /// Volume name.
    pub volume: Option<String>,
    /// Who asked (from peer credentials; None for the daemon itself, e.g. re-attach at start).
    pub caller_uid: Option<u32>,
    /// `ok` or the error.
    pub outcome: String,
    /// How long it took.
    pub latency_ms: u64,
    /// The KMS's request id (AWS: match it with CloudTrail), on records of KMS calls.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}

impl AuditRecord {
    /// A record about `volume`, stamped now, whose outcome is `ok` or the error: how the
    /// daemon records what it does to a volume (also from tasks that outlive a request).
    #[allow(clippy::too_many_arguments)]
    pub fn about_volume(
        operation: &str,
        backend: &str,
        volume: &str,
        key_id: Option<&str>,
        context: Option<&std::collections::BTreeMap<String, String>>,
        caller_uid: Option<u32>,
        latency: std::time::Duration,
        outcome: &Result<(), String>,
    ) -> Self {
        Self {
            time: crate::stamp::now(),
            operation: operation.into(),
            backend: backend.into(),
            key_id: key_id.map(str::to_owned),
            context: context.cloned(),
            volume: Some(volume.into()),
            caller_uid,
            outcome: match outcome {
                Ok(()) => "ok".into(),
                Err(e) => e.clone(),
            },
            latency_ms: latency.as_millis() as u64,
            request_id: None,
        }
    }
}

/// The audit log files.
pub struct AuditLog {
    path: PathBuf,
    max_bytes: u64,
    keep: u32,
    file: Mutex<File>,
    /// Told of every record as it is written ([`AuditLog::observe`]).
    observer: std::sync::OnceLock<RecordObserver>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("path", &self.path)
            .field("max_bytes", &self.max_bytes)
            .field("keep", &self.keep)
            .finish_non_exhaustive()
    }
}

/// What [`AuditLog::observe`] calls with each record.
pub type RecordObserver = Box<dyn Fn(&AuditRecord) + Send + Sync>;

fn open_append(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
}

fn rotated(path: &Path, n: u32) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".{n}"));
    PathBuf::from(s)
}

impl AuditLog {
    /// Opens (creates) the log at `path` (directory 0700, file 0600).
    pub fn open(path: &Path, max_bytes: u64, keep: u32) -> std::io::Result<Self> {
        if let Some(dir) = path.parent() {
            store::durable::create_private_dir(dir)?;
        }
        Ok(Self {
            path: path.into(),
            max_bytes,
            keep,
            file: Mutex::new(open_append(path)?),
            observer: std::sync::OnceLock::new(),
        })
    }

    /// Calls `observer` with every record written from now on (the daemon's metrics count
    /// operations this way). Only the first observer set is kept.
    pub fn observe(&self, observer: RecordObserver) {
        let _ = self.observer.set(observer);
    }

    /// Appends a record (and rotates first if it would not fit). Errors are logged, not
    /// returned: an audit failure must be visible but must not fail the operation after the
    /// fact.
    pub fn record(&self, rec: &AuditRecord) {
        if let Some(observe) = self.observer.get() {
            observe(rec);
        }
        let mut line = match serde_json::to_vec(rec) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "cannot encode an audit record");
                return;
            }
        };
        line.push(b'\n');
        let mut file = self.file.lock().unwrap_or_else(|p| p.into_inner());
        let size = file.metadata().map(|m| m.len()).unwrap_or(0);
        if size > 0 && size + line.len() as u64 > self.max_bytes {
            match self.rotate() {
                Ok(f) => *file = f,
                Err(e) => {
                    tracing::error!(error = %e, path = %self.path.display(), "cannot rotate the audit log")
                }
            }
        }
        if let Err(e) = file.write_all(&line).and_then(|()| file.sync_data()) {
            tracing::error!(error = %e, path = %self.path.display(), "cannot write the audit log");
        }
    }

    fn rotate(&self) -> std::io::Result<File> {
        for n in (1..self.keep).rev() {
            let from = rotated(&self.path, n);
            if from.exists() {
                std::fs::rename(&from, rotated(&self.path, n + 1))?;
            }
        }
        if self.keep > 0 {
            std::fs::rename(&self.path, rotated(&self.path, 1))?;
        } else {
            std::fs::remove_file(&self.path)?;
        }
        open_append(&self.path)
    }

    /// Appends the records of another trail `from` (the root daemon's, written in the
    /// initramfs under `/run` before the state directory could be written) that were not
    /// merged before, each marked `"origin": origin`; `marker` remembers how far `from` was
    /// merged, with `epoch` (the boot id: a tmpfs of the next boot may give its file the same
    /// inode) and the file's inode: another file starts again at 0. A line not yet ended is
    /// left for next time. The number of records merged.
    pub fn merge_from(
        &self,
        from: &Path,
        marker: &Path,
        epoch: &str,
        origin: &str,
    ) -> std::io::Result<usize> {
        use std::io::{Read, Seek, SeekFrom};
        use std::os::unix::fs::MetadataExt;
        let mut file = match File::open(from) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(e),
        };
        let id = format!("{epoch} {}", file.metadata()?.ino());
        let done = std::fs::read_to_string(marker)
            .ok()
            .and_then(|m| {
                let (i, o) = m.trim().rsplit_once(' ')?;
                (i == id).then(|| o.parse::<u64>().ok())?
            })
            .unwrap_or(0);
        file.seek(SeekFrom::Start(done))?;
        let mut rest = Vec::new();
        file.read_to_end(&mut rest)?;
        let complete = rest.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        let mut merged = 0;
        for line in rest[..complete].split(|&b| b == b'\n') {
            let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(line) else {
                continue;
            };
            if let Some(o) = v.as_object_mut() {
                o.insert("origin".into(), origin.into());
            }
            let mut bytes = serde_json::to_vec(&v)?;
            bytes.push(b'\n');
            self.file
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .write_all(&bytes)?;
            merged += 1;
        }
        store::durable::write_atomic(
            marker,
            format!("{id} {}\n", done + complete as u64).as_bytes(),
            store::durable::Existing::Replace,
        )?;
        Ok(merged)
    }

    /// Reads records, oldest first, filtered by volume and time, the newest `limit`.
    pub fn read(
        path: &Path,
        keep: u32,
        volume: Option<&str>,
        since: Option<&str>,
        limit: Option<usize>,
    ) -> std::io::Result<Vec<serde_json::Value>> {
        let since = since
            .map(|s| {
                time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
                    .map_err(|_| {
                        std::io::Error::new(
                            std::io::ErrorKind::InvalidInput,
                            format!("'{s}' is not an RFC 3339 time such as 2026-11-22T10:00:00Z"),
                        )
                    })
            })
            .transpose()?;
        let mut files: Vec<PathBuf> = (1..=keep.max(1)).rev().map(|n| rotated(path, n)).collect();
        files.push(path.to_path_buf());
        let mut out = Vec::new();
        for f in files {
            let Ok(file) = File::open(&f) else { continue };
            for line in BufReader::new(file).lines() {
                let line = line?;
                let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                    continue;
                };
                if let Some(vol) = volume
                    && v.get("volume").and_then(|x| x.as_str()) != Some(vol)
                {
                    continue;
                }
                if let Some(since) = since {
                    let t = v.get("time").and_then(|x| x.as_str()).and_then(|s| {
                        time::OffsetDateTime::parse(
                            s,
                            &time::format_description::well_known::Rfc3339,
                        )
                        .ok()
                    });
                    if t.is_none_or(|t| t < since) {
                        continue;
                    }
                }
                out.push(v);
            }
        }
        if let Some(limit) = limit
            && out.len() > limit
        {
            out.drain(..out.len() - limit);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(op: &str, vol: &str) -> AuditRecord {
        AuditRecord {
            time: crate::stamp::now(),
            operation: op.into(),
            backend: "local".into(),
            key_id: Some("k".into()),
            context: None,
            volume: Some(vol.into()),
            caller_uid: Some(0),
            outcome: "ok".into(),
            latency_ms: 1,
            request_id: None,
        }
    }

    #[test]
    fn appends_rotates_and_filters() {
        let tmp = tempfile::tempdir().expect("tmp");
        let path = tmp.path().join("audit/audit.jsonl");
        let log = AuditLog::open(&path, 4096, 2).expect("open");
        for i in 0..100 {
            log.record(&rec("attach", if i % 2 == 0 { "a" } else { "b" }));
        }
        assert!(rotated(&path, 1).exists() && rotated(&path, 2).exists());
        assert!(!rotated(&path, 3).exists(), "keeps only 2 rotated files");
        for f in [path.clone(), rotated(&path, 1)] {
            assert!(std::fs::metadata(&f).expect("meta").len() <= 4096);
        }
        let all = AuditLog::read(&path, 2, None, None, None).expect("read");
        assert!(!all.is_empty() && all.len() < 100, "{}", all.len());
        let a = AuditLog::read(&path, 2, Some("a"), None, Some(3)).expect("read");
        assert_eq!(a.len(), 3);
        assert!(a.iter().all(|v| v["volume"] == "a"));
        let future =
            AuditLog::read(&path, 2, None, Some("2999-01-01T00:00:00Z"), None).expect("read");
        assert!(future.is_empty());
        assert!(AuditLog::read(&path, 2, None, Some("yesterday"), None).is_err());
    }

    #[test]
    fn another_trail_is_merged_once_even_as_it_grows() {
        let dir = tempfile::tempdir().expect("tempdir");
        let main = AuditLog::open(&dir.path().join("audit/audit.jsonl"), 1 << 20, 2).expect("open");
        let boot = dir.path().join("boot.jsonl");
        let marker = dir.path().join("audit/merged");
        let line =
            |op: &str| format!("{{\"time\":\"2026-12-04T00:00:00Z\",\"operation\":\"{op}\"}}\n");
        std::fs::write(
            &boot,
            line("open-dm-crypt") + &line("dm-crypt-opened") + "{\"partial",
        )
        .expect("write");
        assert_eq!(
            main.merge_from(&boot, &marker, "boot-1", "initramfs")
                .expect("merge"),
            2
        );
        assert_eq!(
            main.merge_from(&boot, &marker, "boot-1", "initramfs")
                .expect("again"),
            0
        );
        // The partial line is finished later, and one more record comes.
        let mut f = OpenOptions::new().append(true).open(&boot).expect("open");
        f.write_all(b"\":1}\n").expect("write");
        f.write_all(line("attach").as_bytes()).expect("write");
        assert_eq!(
            main.merge_from(&boot, &marker, "boot-1", "initramfs")
                .expect("merge"),
            2
        );
        let all = AuditLog::read(&dir.path().join("audit/audit.jsonl"), 2, None, None, None)
            .expect("read");
        let ops: Vec<_> = all
            .iter()
            .map(|v| v["operation"].as_str().unwrap_or("-").to_owned())
            .collect();
        assert_eq!(ops, ["open-dm-crypt", "dm-crypt-opened", "-", "attach"]);
        assert!(all.iter().all(|v| v["origin"] == "initramfs"));
        // Another boot's trail starts again from its beginning, even with the same inode.
        std::fs::write(&boot, line("open-dm-crypt")).expect("write");
        assert_eq!(
            main.merge_from(&boot, &marker, "boot-2", "initramfs")
                .expect("merge"),
            1
        );
        assert_eq!(
            main.merge_from(&dir.path().join("none"), &marker, "boot-2", "initramfs")
                .expect("none"),
            0
        );
    }
}
