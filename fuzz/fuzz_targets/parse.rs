//! Every parser of user input: hashes, selectors, list kinds, orders, `--db` and
//! `--blobs` locations, batch names, `map` templates. None may panic; a parsed hash
//! must print back as its input; nothing but a valid hash may ever become one; a
//! batch selector holds a valid batch name.
#![no_main]

use batchdb::queue::{ListKind, Order, Selector, check_batch_name};
use batchdb::template::Template;
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
    if let Ok(Selector::Batch(name)) = s.parse::<Selector>() {
        assert!(check_batch_name(&name).is_ok());
        assert_eq!(format!("batch:{name}"), s);
    }
    // A template split at its first NUL: the rest are the inputs (one per source).
    let mut parts = s.split('\0');
    let t = Template::parse(parts.next().unwrap_or_default());
    let args: Vec<&[u8]> = parts.map(str::as_bytes).collect();
    let mut out = Vec::new();
    t.expand_into(7, &args, &mut out);
    let _ = s.parse::<ListKind>();
    let _ = s.parse::<Order>();
    let _ = DbLocation::parse(s);
    let _ = BlobLocation::parse(s);
});
