//! Content hashes: the key of a job and the id of a result.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest, Sha256};

use crate::error::Error;

/// A sha256 digest, shown and parsed as exactly 64 lowercase hex characters.
///
/// A `Hash` can only be built from 32 raw bytes or from a string that passed
/// validation, so its textual form is always safe to use as a file name or
/// object key: it can never contain `/`, `..` or anything but `[0-9a-f]`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Hash([u8; 32]);

impl Hash {
    /// The hash of `bytes`.
    pub fn of(bytes: &[u8]) -> Hash {
        Hash(Sha256::digest(bytes).into())
    }

    /// Wraps 32 raw digest bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Hash {
        Hash(bytes)
    }

    /// The 32 raw digest bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The 64-character lowercase hex form.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl FromStr for Hash {
    type Err = Error;

    /// Accepts exactly 64 characters from `[0-9a-f]`; anything else (uppercase, a
    /// path, a wrong length) is [`Error::InvalidHash`].
    fn from_str(s: &str) -> Result<Hash, Error> {
        let ok = s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        let invalid = || Error::InvalidHash {
            input: s.chars().take(100).collect(),
        };
        if !ok {
            return Err(invalid());
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).map_err(|_| invalid())?;
        Ok(Hash(out))
    }
}

impl fmt::Display for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Hash({})", self.to_hex())
    }
}

impl Serialize for Hash {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for Hash {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Hash, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// An incremental sha256 hasher that also counts the bytes it has seen.
#[derive(Default, Clone)]
pub struct Hasher {
    inner: Sha256,
    len: u64,
}

impl Hasher {
    /// A new, empty hasher.
    pub fn new() -> Hasher {
        Hasher::default()
    }

    /// Feeds more bytes.
    pub fn update(&mut self, bytes: &[u8]) {
        self.inner.update(bytes);
        self.len += bytes.len() as u64;
    }

    /// The number of bytes fed so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether no bytes have been fed.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The digest of everything fed.
    pub fn finish(self) -> Hash {
        Hash(self.inner.finalize().into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_key() {
        assert_eq!(
            Hash::of(b"sleep 5; date").to_hex(),
            "ce6cc4e7fcb4a902f7c836cb93a32ae02cb47679c86e3d99c811233bf6f258c0"
        );
    }

    #[test]
    fn parse_rejects_everything_but_lowercase_hex() {
        let good = "ce6cc4e7fcb4a902f7c836cb93a32ae02cb47679c86e3d99c811233bf6f258c0";
        assert_eq!(good.parse::<Hash>().unwrap().to_hex(), good);
        for bad in [
            "",
            "../etc/passwd",
            &good.to_uppercase(),
            &good[..63],
            &format!("{good}0"),
            &format!("{}g", &good[..63]),
            &format!("../{}", &good[3..]),
            &format!("{}/", &good[..63]),
            &format!("{}é", &good[..62]),
        ] {
            assert!(
                matches!(bad.parse::<Hash>(), Err(Error::InvalidHash { .. })),
                "{bad:?}"
            );
        }
    }
}
