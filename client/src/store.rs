//! The optional on-disk client store: a saved document plus a log of local changes not
//! yet Durable, so that unacknowledged edits survive an app restart.
//!
//! Files per document under the store directory: `<hex id>.am` (the last `save()`), and
//! `<hex id>.pending` (records `[len u32][crc32 u32][change]`, fsynced on every append).

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use meridian_protocol::DocId;

use crate::ClientError;

pub(crate) struct DocStore {
    dir: PathBuf,
    saved: PathBuf,
    pending: PathBuf,
}

fn io(error: std::io::Error) -> ClientError {
    ClientError::Store(error.to_string())
}

impl DocStore {
    pub(crate) fn open(dir: &Path, doc: &DocId) -> Result<Self, ClientError> {
        fs::create_dir_all(dir).map_err(io)?;
        let name = hex::encode(doc.as_str());
        Ok(DocStore {
            dir: dir.to_path_buf(),
            saved: dir.join(format!("{name}.am")),
            pending: dir.join(format!("{name}.pending")),
        })
    }

    /// The saved document (if any) and the pending changes, oldest first. A torn last
    /// record (a crash mid-append) is ignored: that edit was never acknowledged to anyone.
    pub(crate) fn load(&self) -> Result<(Option<Vec<u8>>, Vec<Bytes>), ClientError> {
        let saved = match fs::read(&self.saved) {
            Ok(bytes) => Some(bytes),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(io(e)),
        };
        let data = match fs::read(&self.pending) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(io(e)),
        };
        let mut changes = Vec::new();
        let mut at = 0;
        while data.len() - at >= 8 {
            let len =
                u32::from_be_bytes([data[at], data[at + 1], data[at + 2], data[at + 3]]) as usize;
            let crc = u32::from_be_bytes([data[at + 4], data[at + 5], data[at + 6], data[at + 7]]);
            if data.len() - at - 8 < len {
                break;
            }
            let record = &data[at + 8..at + 8 + len];
            at += 8 + len;
            if crc32fast::hash(record) != crc {
                break;
            }
            changes.push(Bytes::copy_from_slice(record));
        }
        Ok((saved, changes))
    }

    pub(crate) fn append_pending(&self, changes: &[Bytes]) -> Result<(), ClientError> {
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.pending)
            .map_err(io)?;
        file.write_all(&encode(changes)).map_err(io)?;
        file.sync_data().map_err(io)
    }

    /// Replaces the pending log (and the saved document, when given) atomically.
    pub(crate) fn rewrite(
        &self,
        saved: Option<&[u8]>,
        pending: &[Bytes],
    ) -> Result<(), ClientError> {
        if let Some(saved) = saved {
            self.replace(&self.saved, saved)?;
        }
        self.replace(&self.pending, &encode(pending))
    }

    fn replace(&self, path: &Path, bytes: &[u8]) -> Result<(), ClientError> {
        let tmp = path.with_extension("tmp");
        let mut file = File::create(&tmp).map_err(io)?;
        file.write_all(bytes).map_err(io)?;
        file.sync_data().map_err(io)?;
        fs::rename(&tmp, path).map_err(io)?;
        File::open(&self.dir).and_then(|d| d.sync_all()).map_err(io)
    }
}

fn encode(changes: &[Bytes]) -> Vec<u8> {
    let mut out = Vec::new();
    for change in changes {
        out.extend_from_slice(&(change.len() as u32).to_be_bytes());
        out.extend_from_slice(&crc32fast::hash(change).to_be_bytes());
        out.extend_from_slice(change);
    }
    out
}
