//! A one-line preview of a payload, for people: its first non-blank line, bounded,
//! with every control character escaped, so it can be printed in a table cell or a
//! web page without breaking either.

use std::collections::HashMap;

use futures_util::StreamExt;
use tokio::io::AsyncReadExt;

use crate::hash::Hash;
use crate::{BatchDb, Result};

/// Bytes read from the start of a payload to make its preview: a payload kept in the
/// blob store is never read further than this.
pub const PREVIEW_READ: u64 = 1024;

/// The longest preview, in bytes of text before the trailing `…`.
pub const PREVIEW_MAX: usize = 120;

/// The preview of a payload that starts with `head`: its first line that is not
/// blank (or the first line, if all are), without leading or trailing blanks, cut at
/// [`PREVIEW_MAX`] bytes on a character boundary. Invalid UTF-8 becomes U+FFFD and
/// control characters (tab, carriage return, escape, …) are written as escapes
/// (`\t`, `\r`, `\u{1b}`), so the result is one line of printable text. It ends in
/// `…` when anything was left out: the rest of a long line, or further lines.
pub fn preview(head: &[u8]) -> String {
    let text = String::from_utf8_lossy(head);
    let lines: Vec<&str> = text.split('\n').collect();
    let at = lines.iter().position(|l| !l.trim().is_empty()).unwrap_or(0);
    let line = lines.get(at).copied().unwrap_or("");
    let more = lines.iter().skip(at + 1).any(|l| !l.trim().is_empty());
    let mut out = String::with_capacity(PREVIEW_MAX + 4);
    let mut cut = false;
    for c in line.trim().chars() {
        let piece: String = if c.is_control() {
            c.escape_default().collect()
        } else {
            c.into()
        };
        if out.len() + piece.len() > PREVIEW_MAX {
            cut = true;
            break;
        }
        out.push_str(&piece);
    }
    if cut || more {
        out.push('…');
    }
    out
}

impl BatchDb {
    /// The [`preview`] of payload (or any blob) `job`, from its first
    /// [`PREVIEW_READ`] bytes only. The bytes are not checked against the hash (a
    /// preview is for display); [`Error::BlobNotFound`](crate::Error::BlobNotFound) if
    /// there is no such blob.
    pub async fn preview(&self, job: &Hash) -> Result<String> {
        let mut reader = self.get_range(job, 0..PREVIEW_READ).await?;
        let mut head = Vec::with_capacity(usize::try_from(PREVIEW_READ).unwrap_or(1024));
        reader
            .read_to_end(&mut head)
            .await
            .map_err(|e| crate::Error::io("read the preview of", format!("blob {job}"), e))?;
        Ok(preview(&head))
    }

    /// The [`preview`] of each distinct payload in `jobs`, read [`PREVIEWS_AT_ONCE`]
    /// at a time (on S3 each is a ranged GET of a payload's head); each payload's
    /// own error (e.g. [`Error::BlobNotFound`](crate::Error::BlobNotFound) for a
    /// lost blob) is kept beside it rather than failing the others.
    pub async fn previews(
        &self,
        jobs: impl IntoIterator<Item = Hash>,
    ) -> HashMap<Hash, Result<String>> {
        let mut distinct: Vec<Hash> = jobs.into_iter().collect();
        distinct.sort_unstable();
        distinct.dedup();
        futures_util::stream::iter(distinct)
            .map(|job| async move { (job, self.preview(&job).await) })
            .buffered(PREVIEWS_AT_ONCE)
            .collect()
            .await
    }
}

/// Payload heads [`BatchDb::previews`] reads at once.
pub const PREVIEWS_AT_ONCE: usize = 8;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preview_is_the_first_non_blank_line_marked_when_more_follows() {
        assert_eq!(preview(b"echo hi"), "echo hi");
        assert_eq!(preview(b"echo hi\n"), "echo hi");
        assert_eq!(preview(b"\n\n  echo hi  \nmore\n"), "echo hi…");
        assert_eq!(preview(b""), "");
        assert_eq!(preview(b"\n \n"), "");
    }

    #[test]
    fn preview_escapes_control_characters_and_keeps_wide_text() {
        assert_eq!(preview(b"a\tb\x1b[31mc\r"), "a\\tb\\u{1b}[31mc");
        assert_eq!(preview("ls 日本語 ✓".as_bytes()), "ls 日本語 ✓");
        assert_eq!(preview(b"cat \xff\xfe"), "cat \u{fffd}\u{fffd}");
    }

    #[test]
    fn preview_is_cut_on_a_character_boundary_at_the_bound() {
        let long = "é".repeat(200);
        let p = preview(long.as_bytes());
        assert!(p.ends_with('…'));
        let text = p.trim_end_matches('…');
        assert!(text.len() <= PREVIEW_MAX && text.len() >= PREVIEW_MAX - 1);
        assert!(text.chars().all(|c| c == 'é'));
    }
}
