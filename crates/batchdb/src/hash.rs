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
    /// The hash of no bytes at all (`e3b0c442...b855`): the name of every empty
    /// output, which the queue knows without storing it.
    pub const EMPTY: Hash = Hash([
        0xe3, 0xb0, 0xc4, 0x42, 0x98, 0xfc, 0x1c, 0x14, 0x9a, 0xfb, 0xf4, 0xc8, 0x99, 0x6f, 0xb9,
        0x24, 0x27, 0xae, 0x41, 0xe4, 0x64, 0x9b, 0x93, 0x4c, 0xa4, 0x95, 0x99, 0x1b, 0x78, 0x52,
        0xb8, 0x55,
    ]);

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
        self.with_hex(str::to_owned)
    }

    /// Calls `f` with the 64-character lowercase hex form, built on the stack (every
    /// row written names hashes in hex: this is on the bulk add's hot path).
    pub(crate) fn with_hex<T>(&self, f: impl FnOnce(&str) -> T) -> T {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut buf = [0u8; 64];
        for (pair, b) in buf.chunks_exact_mut(2).zip(self.0) {
            pair[0] = DIGITS[usize::from(b >> 4)];
            pair[1] = DIGITS[usize::from(b & 0x0f)];
        }
        // Hex digits are ASCII, so this is always valid UTF-8.
        f(std::str::from_utf8(&buf).unwrap_or_default())
    }
}

/// The value of each lowercase hex digit; 0xff for every other byte.
#[allow(clippy::cast_possible_truncation)] // i < 10 and i < 6: a digit's value fits a u8
const HEX_VALUE: [u8; 256] = {
    let mut t = [0xffu8; 256];
    let mut i = 0;
    while i < 10 {
        t[b'0' as usize + i] = i as u8;
        i += 1;
    }
    let mut i = 0;
    while i < 6 {
        t[b'a' as usize + i] = 10 + i as u8;
        i += 1;
    }
    t
};

impl FromStr for Hash {
    type Err = Error;

    /// Accepts exactly 64 characters from `[0-9a-f]`; anything else (uppercase, a
    /// path, a wrong length) is [`Error::InvalidHash`].
    fn from_str(s: &str) -> Result<Hash, Error> {
        let invalid = || Error::InvalidHash {
            input: s.chars().take(100).collect(),
        };
        let digits = s.as_bytes();
        if digits.len() != 64 {
            return Err(invalid());
        }
        // One pass, one table lookup per digit (listing a million rows parses a
        // million hashes); any byte outside [0-9a-f] maps to 0xff and fails.
        let mut out = [0u8; 32];
        let mut bad = 0u8;
        for (o, pair) in out.iter_mut().zip(digits.chunks_exact(2)) {
            let (hi, lo) = (HEX_VALUE[pair[0] as usize], HEX_VALUE[pair[1] as usize]);
            bad |= hi | lo;
            *o = (hi << 4) | (lo & 0x0f);
        }
        if bad & 0xf0 != 0 {
            return Err(invalid());
        }
        Ok(Hash(out))
    }
}

impl fmt::Display for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.with_hex(|h| f.write_str(h))
    }
}

impl fmt::Debug for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.with_hex(|h| write!(f, "Hash({h})"))
    }
}

impl Serialize for Hash {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.with_hex(|h| s.serialize_str(h))
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
    fn empty_is_the_hash_of_no_bytes() {
        assert_eq!(Hash::EMPTY, Hash::of(b""));
    }

    #[test]
    fn seed_key() {
        assert_eq!(
            Hash::of(b"sleep 5; date").to_hex(),
            "ce6cc4e7fcb4a902f7c836cb93a32ae02cb47679c86e3d99c811233bf6f258c0"
        );
    }

    #[test]
    fn parse_accepts_exactly_lowercase_hex_at_every_position() {
        let good = Hash::of(b"x").to_hex();
        for pos in [0, 1, 31, 62, 63] {
            for b in 0..=255u8 {
                let mut bytes = good.clone().into_bytes();
                bytes[pos] = b;
                let Ok(text) = String::from_utf8(bytes) else {
                    continue;
                };
                let parsed = text.parse::<Hash>();
                if b.is_ascii_digit() || (b'a'..=b'f').contains(&b) {
                    assert_eq!(parsed.unwrap().to_hex(), text);
                } else {
                    assert!(parsed.is_err(), "{text:?}");
                }
            }
        }
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
