//! Attempt ids: what every process of one attempt carries, unique to that attempt.

/// A new attempt id: 128 random bits from the kernel, as 32 hex digits (from a
/// weaker source, mixed with the time and pid, only if the kernel will not answer).
pub(crate) fn new_attempt_id() -> String {
    let mut bytes = [0u8; 16];
    // SAFETY: the buffer is 16 writable bytes.
    let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if usize::try_from(n).ok() != Some(bytes.len()) {
        let seed = fastrand::u128(..)
            ^ (u128::from(std::process::id()) << 64)
            ^ std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos());
        bytes = seed.to_le_bytes();
    }
    hex::encode(bytes)
}
