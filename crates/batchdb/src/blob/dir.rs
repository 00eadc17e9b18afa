//! The embedded default blob store: a content-addressed directory.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncSeekExt, AsyncWriteExt, BufReader};

use futures_util::stream::BoxStream;

use super::behind::{Behind, STEP};
use super::{BlobEntry, BlobInfo, BlobReader, BlobStore, verifying};
use crate::error::{Error, Result};
use crate::hash::Hash;

/// Chunk size for streaming writes and reads.
const CHUNK: usize = 256 * 1024;

/// Bytes read before a put decides whether the blob is small and already stored.
const HEAD: usize = 16 * 1024;

/// A content-addressed directory: blob `h` lives at `<root>/h[0..2]/h[2..4]/h`.
///
/// Writes go to `<root>/tmp/`, hashed as they stream, then are fsynced and renamed
/// into place, and the directory holding them is fsynced: once [`BlobStore::put`]
/// returns, the blob survives a crash. Only validated [`Hash`]es ever form a path.
#[derive(Debug, Clone)]
pub struct DirStore {
    root: PathBuf,
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Removes a temporary file when dropped, unless disarmed.
struct TempGuard(Option<PathBuf>);

impl Drop for TempGuard {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

impl DirStore {
    /// Opens (creating if needed) a store rooted at `root`.
    pub async fn open(root: impl Into<PathBuf>) -> Result<DirStore> {
        let root = root.into();
        let tmp = root.join("tmp");
        let t = tmp.clone();
        crate::io::blocking(move || std::fs::create_dir_all(&t))
            .await?
            .map_err(|e| Error::io("create blob directory", &tmp, e))?;
        Ok(DirStore { root })
    }

    /// The directory the store lives in.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The path blob `hash` lives at (whether or not it exists).
    pub fn path_of(&self, hash: &Hash) -> PathBuf {
        let hex = hash.to_hex();
        self.root.join(&hex[0..2]).join(&hex[2..4]).join(hex)
    }

    /// Opens blob `hash` for reading, refusing anything but a regular file reached
    /// without a symlink (a job running as this user could plant one at a blob's path
    /// to have the store serve another file's bytes, unverified in a range read).
    async fn open_blob(&self, hash: &Hash) -> Result<tokio::fs::File> {
        let path = self.path_of(hash);
        let io = |e| Error::io("open", &path, e);
        // The two fan-out directories below the root must be directories, not links.
        let mut dir = path.parent();
        for _ in 0..2 {
            let Some(d) = dir else { break };
            match tokio::fs::symlink_metadata(d).await {
                Ok(m) if m.file_type().is_symlink() => return Err(io(not_a_blob())),
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(Error::BlobNotFound(*hash));
                }
                Err(e) => return Err(io(e)),
            }
            dir = d.parent();
        }
        let f = match tokio::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .await
        {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::BlobNotFound(*hash));
            }
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => return Err(io(not_a_blob())),
            Err(e) => return Err(io(e)),
        };
        match f.metadata().await {
            Ok(m) if m.is_file() => Ok(f),
            Ok(_) => Err(io(not_a_blob())),
            Err(e) => Err(io(e)),
        }
    }

    fn temp_path(&self) -> PathBuf {
        let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        self.root.join("tmp").join(format!(
            "{}-{}-{:016x}.part",
            std::process::id(),
            n,
            fastrand::u64(..)
        ))
    }
}

async fn sync_dir(dir: &Path) -> Result<()> {
    let d = dir.to_path_buf();
    tokio::task::spawn_blocking(move || sync_dir_now(&d))
        .await
        .map_err(|e| Error::Task(e.to_string()))?
}

/// Fsyncs directory `dir`, so the names in it survive a power loss.
fn sync_dir_now(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io("fsync directory", dir, e))
}

/// Sets the modification time of the file at `path` to now.
fn touch_now(path: &Path) -> std::io::Result<()> {
    std::fs::File::options()
        .write(true)
        .open(path)
        .and_then(|f| f.set_modified(std::time::SystemTime::now()))
}

/// Gives the open file `src` (which names it: `/proc/self/fd/N`) the new name `dest`,
/// as `linkat(..., AT_SYMLINK_FOLLOW)` does: the file itself, not the link to it.
fn link_open_file(src: &Path, dest: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| {
        std::ffi::CString::new(p.as_os_str().as_bytes())
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))
    };
    let (s, d) = (c(src)?, c(dest)?);
    // SAFETY: both are valid NUL-terminated paths that outlive the call.
    let r = unsafe {
        libc::linkat(
            libc::AT_FDCWD,
            s.as_ptr(),
            libc::AT_FDCWD,
            d.as_ptr(),
            libc::AT_SYMLINK_FOLLOW,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

impl DirStore {
    /// Creates the fan-out directories `dest` goes in, if missing, and makes the new
    /// ones durable (the directories that now name them are fsynced); returns the
    /// directory `dest` goes in.
    fn make_parent(&self, dest: &Path) -> Result<PathBuf> {
        let parent = dest.parent().unwrap_or(&self.root).to_path_buf();
        if !parent.is_dir() {
            std::fs::create_dir_all(&parent)
                .map_err(|e| Error::io("create directory", &parent, e))?;
            sync_dir_now(parent.parent().unwrap_or(&self.root))?;
            sync_dir_now(&self.root)?;
        }
        Ok(parent)
    }

    /// [`BlobStore::adopt`], blocking: fsyncs `file` and links it in as blob
    /// `info.hash` (or touches an identical blob already there).
    fn adopt_now(&self, file: &std::fs::File, info: BlobInfo) -> Result<bool> {
        use std::os::fd::AsRawFd;
        let src = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
        let meta = file.metadata().map_err(|e| Error::io("stat", &src, e))?;
        if !meta.is_file() || meta.len() != info.size {
            let e = std::io::Error::other(format!(
                "holds {} bytes, not the {} hashed",
                meta.len(),
                info.size
            ));
            return Err(Error::io("adopt", &src, e));
        }
        file.sync_all().map_err(|e| Error::io("fsync", &src, e))?;
        let dest = self.path_of(&info.hash);
        let parent = self.make_parent(&dest)?;
        // A blob deleted between a failed link and its touch is linked again.
        for _ in 0..4 {
            match link_open_file(&src, &dest) {
                Ok(()) => {
                    sync_dir_now(&parent)?;
                    return Ok(true);
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    if touch_now(&dest).is_ok() {
                        return Ok(true);
                    }
                }
                // Another file system, no /proc, a file system without hard links:
                // this file cannot become a blob, and its caller copies it instead.
                Err(e) => {
                    tracing::debug!("not linked as {}: {e}", dest.display());
                    return Ok(false);
                }
            }
        }
        Ok(false)
    }
}

/// Why a path that should hold a blob is refused.
fn not_a_blob() -> std::io::Error {
    std::io::Error::other("not a regular file (a symlink or other): refused as a blob")
}

/// How [`DirStore::put`] hashes its input: known whole from its head, or behind the
/// writes of a longer one.
enum Hashing {
    Whole(Hash),
    Behind(Behind),
}

#[async_trait]
impl BlobStore for DirStore {
    async fn put(&self, reader: &mut (dyn AsyncRead + Send + Unpin)) -> Result<BlobInfo> {
        let read_err = |e| Error::Stream {
            what: "read blob input".into(),
            source: e,
        };
        // Read a small head first: a small blob that is already stored (an empty
        // stderr, a payload added again) then costs no disk write and no fsync, and
        // no large buffer is allocated (and zeroed) for the many tiny outputs.
        let mut buf = vec![0u8; HEAD];
        let mut filled = 0;
        let mut eof = false;
        while filled < HEAD {
            let n = reader.read(&mut buf[filled..]).await.map_err(read_err)?;
            if n == 0 {
                eof = true;
                break;
            }
            filled += n;
        }
        // The whole input when it fit in the head, hashed at once.
        let whole = eof.then(|| Hash::of(&buf[..filled]));
        if let Some(hash) = whole {
            if self.contains(&hash).await? && self.touch(&hash).await.is_ok() {
                return Ok(BlobInfo {
                    hash,
                    size: filled as u64,
                });
            }
        }
        let tmp = self.temp_path();
        let mut guard = TempGuard(Some(tmp.clone()));
        let io_err = |what: &'static str| {
            let tmp = tmp.clone();
            move |e| Error::io(what, tmp, e)
        };
        let mut file = tokio::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .await
            .map_err(io_err("create"))?;
        // A longer input is hashed behind the writes, from the file.
        let mut hashing = if let Some(hash) = whole {
            Hashing::Whole(hash)
        } else {
            let theirs = file.try_clone().await.map_err(io_err("open"))?;
            Hashing::Behind(Behind::start(theirs.into_std().await))
        };
        let (mut size, mut flushed, mut n) = (0u64, 0u64, filled);
        loop {
            if n > 0 {
                file.write_all(&buf[..n]).await.map_err(io_err("write"))?;
                let before = size;
                size += n as u64;
                if let Hashing::Behind(b) = &mut hashing {
                    // Flushed at each whole step, so the bytes declared ready are in
                    // the file; declared at every write, so a hashing task that
                    // caught up is followed by the next soon.
                    if size / STEP > before / STEP {
                        file.flush().await.map_err(io_err("write"))?;
                        flushed = size;
                    }
                    b.ready(flushed);
                }
            }
            if eof {
                break;
            }
            if buf.len() < CHUNK {
                buf.resize(CHUNK, 0);
            }
            n = reader.read(&mut buf).await.map_err(read_err)?;
            eof = n == 0;
        }
        file.flush().await.map_err(io_err("write"))?;
        // Hashed (if it was not yet) while the file is fsynced.
        let (hashed, synced) = tokio::join!(
            async {
                match hashing {
                    Hashing::Whole(hash) => Ok(hash),
                    Hashing::Behind(b) => b.finish(size).await.map(crate::hash::Hasher::finish),
                }
            },
            file.sync_all()
        );
        synced.map_err(io_err("fsync"))?;
        let hash = hashed.map_err(io_err("hash"))?;
        drop(file);
        let dest = self.path_of(&hash);
        if tokio::fs::try_exists(&dest).await.unwrap_or(false) && self.touch(&hash).await.is_ok() {
            // Identical content is already durable; the guard removes our copy.
            return Ok(BlobInfo { hash, size });
        }
        let (store, d) = (self.clone(), dest.clone());
        let parent = crate::io::blocking(move || store.make_parent(&d)).await??;
        tokio::fs::rename(&tmp, &dest)
            .await
            .map_err(|e| Error::io("rename into place", &dest, e))?;
        guard.0 = None;
        sync_dir(&parent).await?;
        Ok(BlobInfo { hash, size })
    }

    async fn get(&self, hash: &Hash) -> Result<BlobReader> {
        let f = self.open_blob(hash).await?;
        Ok(Box::pin(verifying(
            BufReader::with_capacity(CHUNK, f),
            *hash,
        )))
    }

    async fn get_range(&self, hash: &Hash, range: std::ops::Range<u64>) -> Result<BlobReader> {
        let path = self.path_of(hash);
        let mut f = self.open_blob(hash).await?;
        f.seek(std::io::SeekFrom::Start(range.start))
            .await
            .map_err(|e| Error::io("seek", &path, e))?;
        let len = range.end.saturating_sub(range.start);
        Ok(Box::pin(BufReader::with_capacity(CHUNK, f).take(len)))
    }

    async fn size(&self, hash: &Hash) -> Result<u64> {
        let path = self.path_of(hash);
        match tokio::fs::symlink_metadata(&path).await {
            Ok(m) if !m.is_file() => Err(Error::io("stat", &path, not_a_blob())),
            Ok(m) => Ok(m.len()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(Error::BlobNotFound(*hash)),
            Err(e) => Err(Error::io("stat", &path, e)),
        }
    }

    async fn contains(&self, hash: &Hash) -> Result<bool> {
        let path = self.path_of(hash);
        tokio::fs::try_exists(&path)
            .await
            .map_err(|e| Error::io("stat", &path, e))
    }

    async fn delete(&self, hash: &Hash) -> Result<bool> {
        let path = self.path_of(hash);
        match tokio::fs::remove_file(&path).await {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(Error::io("remove", &path, e)),
        }
    }

    fn list(&self) -> BoxStream<'static, Result<BlobEntry>> {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<BlobEntry>>(256);
        let root = self.root.clone();
        tokio::task::spawn_blocking(move || walk(&root, &tx));
        Box::pin(futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        }))
    }

    async fn touch(&self, hash: &Hash) -> Result<()> {
        let path = self.path_of(hash);
        let p = path.clone();
        tokio::task::spawn_blocking(move || touch_now(&p))
            .await
            .map_err(|e| Error::Task(e.to_string()))?
            .map_err(|e| Error::io("touch", &path, e))
    }

    /// Temporary `.part` files of writes that never finished (a killed process).
    async fn sweep_leftovers(
        &self,
        older_than: std::time::Duration,
        dry_run: bool,
    ) -> Result<Vec<super::Leftover>> {
        let tmp = self.root.join("tmp");
        // Our own temporary names end in `.part`, exactly; anything else is not ours.
        let ours = |name: &str| Path::new(name).extension().is_some_and(|e| e == "part");
        super::sweep_dir(&tmp, older_than, dry_run, |name| !ours(name)).await
    }

    /// A file on the store's file system is linked in, not copied.
    fn adopts_files(&self) -> bool {
        true
    }

    async fn adopt(&self, file: &std::fs::File, info: BlobInfo) -> Result<bool> {
        let f = file
            .try_clone()
            .map_err(|e| Error::io("duplicate", format!("adopted {}", info.hash), e))?;
        let store = self.clone();
        crate::io::blocking(move || store.adopt_now(&f, info)).await?
    }

    fn location(&self) -> String {
        self.root.display().to_string()
    }
}

/// Sends every blob under `root` (`xx/yy/<hash>` whose name matches its place) to `tx`.
fn walk(root: &Path, tx: &tokio::sync::mpsc::Sender<Result<BlobEntry>>) {
    let is_fan = |name: &str| {
        name.len() == 2 && name.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    };
    let read = |dir: &Path| match std::fs::read_dir(dir) {
        Ok(rd) => rd.filter_map(std::result::Result::ok).collect::<Vec<_>>(),
        Err(e) => {
            let _ = tx.blocking_send(Err(Error::io("read directory", dir, e)));
            Vec::new()
        }
    };
    for a in read(root) {
        let an = a.file_name().to_string_lossy().into_owned();
        if !is_fan(&an) {
            continue;
        }
        for b in read(&a.path()) {
            let bn = b.file_name().to_string_lossy().into_owned();
            if !is_fan(&bn) {
                continue;
            }
            for f in read(&b.path()) {
                let name = f.file_name().to_string_lossy().into_owned();
                let Ok(hash) = name.parse::<Hash>() else {
                    continue;
                };
                if !name.starts_with(&format!("{an}{bn}")) {
                    continue;
                }
                let item = f
                    .metadata()
                    .map(|m| BlobEntry {
                        hash,
                        size: m.len(),
                        modified: m.modified().ok(),
                    })
                    .map_err(|e| Error::io("stat", f.path(), e));
                if tx.blocking_send(item).is_err() {
                    return;
                }
            }
        }
    }
}
