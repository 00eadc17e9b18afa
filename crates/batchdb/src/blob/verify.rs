use std::io;

use crate::error::Error;
use crate::hash::{Hash, Hasher};
use crate::io::{Inspect, Inspector};

/// Checks, as a blob's bytes pass, that they hash to the blob's name. At the end of
/// the stream a mismatch becomes an [`io::ErrorKind::InvalidData`] error carrying
/// [`Error::BlobCorrupt`], so a reader of a corrupt blob never sees a clean end.
pub(crate) struct Verify {
    expected: Hash,
    hasher: Hasher,
}

/// A reader of a blob that verifies it against its hash (see [`Verify`]).
pub(crate) type VerifyingReader<R> = Inspect<R, Verify>;

/// Wraps `inner`, the bytes of the blob named `expected`.
pub(crate) fn verifying<R>(inner: R, expected: Hash) -> VerifyingReader<R> {
    Inspect::new(
        inner,
        Verify {
            expected,
            hasher: Hasher::new(),
        },
    )
}

impl Inspector for Verify {
    fn chunk(&mut self, bytes: &[u8]) {
        self.hasher.update(bytes);
    }

    fn end(&mut self) -> io::Result<()> {
        let actual = std::mem::take(&mut self.hasher).finish();
        if actual == self.expected {
            return Ok(());
        }
        Err(io::Error::new(
            io::ErrorKind::InvalidData,
            Error::BlobCorrupt {
                hash: self.expected,
                actual,
            },
        ))
    }
}
