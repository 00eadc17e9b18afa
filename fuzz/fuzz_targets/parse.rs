//! Every parser of user input: hashes, selectors, list kinds, orders, `--db` and
//! `--blobs` locations. None may panic; a parsed hash must print back as its input;
//! nothing but a valid hash may ever become one.
#![no_main]

use batchdb::queue::{ListKind, Order, Selector};
use batchdb::{BlobLocation, DbLocation, Hash};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    if let Ok(h) = s.parse::<Hash>() {
        assert_eq!(h.to_hex(), s);
        assert!(s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
    }
    if let Ok(Selector::Hash(h)) = s.parse::<Selector>() {
        assert_eq!(h.to_hex(), s);
    }
    let _ = s.parse::<ListKind>();
    let _ = s.parse::<Order>();
    let _ = DbLocation::parse(s);
    let _ = BlobLocation::parse(s);
});
