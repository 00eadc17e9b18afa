//! The database's files as the operating system sees them: side files left
//! read-only by a reader, and a full disk behind an I/O error.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// `db` with `suffix` appended (`-wal`, `-shm`).
fn side(db: &Path, suffix: &str) -> PathBuf {
    let mut p = db.as_os_str().to_owned();
    p.push(suffix);
    PathBuf::from(p)
}

/// Gives the `-wal` and `-shm` files the database file's permission bits when the
/// database is writable but they are not (SQLite creates them with the database's
/// mode, so a reader that opened a read-only database leaves them read-only, and
/// every writer then fails with "attempt to write a readonly database" even after
/// the database's own mode is restored). Only files this user owns are changed;
/// anything else is left for SQLite to report.
pub(super) fn repair_side_files(db: &Path) {
    let Ok(meta) = std::fs::metadata(db) else {
        return;
    };
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    let writable = |m: &std::fs::Metadata| me == 0 || (m.uid() == me && m.mode() & 0o200 != 0);
    if !writable(&meta) {
        return;
    }
    for suffix in ["-wal", "-shm"] {
        let path = side(db, suffix);
        let Ok(m) = std::fs::metadata(&path) else {
            continue;
        };
        if m.uid() == me && m.mode() & 0o200 == 0 {
            let mode = meta.permissions().mode() & 0o777;
            match std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)) {
                Ok(()) => tracing::warn!(
                    "{} was read-only (left so by a reader of a read-only database): made it {mode:o} like the database",
                    path.display()
                ),
                Err(e) => tracing::warn!("{}: {e}", path.display()),
            }
        }
    }
}

/// Why an I/O failure on `db` happened, when the file system says: its disk is
/// full. `None` when there is room (or statvfs cannot tell).
pub(super) fn disk_full_hint(db: &Path) -> Option<String> {
    let dir = db
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: statvfs writes only into the zeroed struct passed; `c` is a valid C
    // string for the call's duration.
    let st = unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(c.as_ptr(), &raw mut st) != 0 {
            return None;
        }
        st
    };
    let free = st.f_bavail.saturating_mul(st.f_frsize);
    // Less than a few pages: SQLite cannot grow its WAL or shared memory.
    (free < 256 * 1024).then(|| {
        format!(
            "the file system holding {} is full ({free} bytes free)",
            dir.display()
        )
    })
}
