//! GNU parallel-compatible command templates, for `batchdb map TEMPLATE ::: args...`.
//!
//! [`Template::expand_into`] produces, byte for byte, the line `parallel --dry-run
//! TEMPLATE ::: ...` (GNU parallel 20221122, default options, Bourne-compatible
//! `$SHELL`) prints for a job, without the trailing newline.
//!
//! Replacement strings: `{}` the input, `{.}` without extension, `{/}` basename,
//! `{//}` dirname, `{/.}` basename without extension, `{#}` the job number; each also
//! positional (`{2}`, `{2.}`, `{-1/}`, ...), where `{0}` means all inputs like `{}`.
//! GNU's quirks are kept: a position beyond the inputs yields nothing (not `''`), a
//! negative one wraps around twice like a Perl array index, `{N#}` takes position
//! `N1`, and when a replacement string is part of the template's first word (e.g.
//! `{} -v`) no input is quoted at all.
//!
//! Not supported (left literal, unlike GNU parallel): `{%}` (job slot), `{= perl =}`
//! and the `--plus` strings, which are literal in GNU's default mode anyway.

use std::borrow::Cow;

/// What a replacement string computes from one input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    /// `{}`: the input.
    Whole,
    /// `{.}`: Perl `s:\.[^/.]*$::`.
    NoExt,
    /// `{/}`: Perl `s:.*/::` (`.` does not match a newline).
    Base,
    /// `{//}`: Perl `File::Basename::dirname`.
    Dir,
    /// `{/.}`: `{/}` then `{.}`.
    BaseNoExt,
    /// `{#}`: the job's sequence number.
    Seq,
}

/// Which inputs a replacement string reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    /// Every input of the job, each replaced then joined by one space.
    Each,
    /// GNU's position number (1-based; 0 and below count from the end).
    At(i64),
}

/// One piece of a parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(Vec<u8>),
    Replace(Source, Op),
}

/// A parsed template: literal bytes and replacement strings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    parts: Vec<Part>,
    /// Whether substituted values are shell-quoted.
    quote: bool,
    /// Whether the template itself held a replacement string.
    explicit: bool,
}

impl Template {
    /// Parses `template`. Never fails: text that is not a known replacement string
    /// stays literal (as GNU parallel does). Without any replacement string, the
    /// template gets `" {}"` appended, as GNU parallel does.
    pub fn parse(template: &str) -> Template {
        let mut parts = split_parts(template.as_bytes());
        let explicit = parts.iter().any(|p| matches!(p, Part::Replace(..)));
        if !explicit {
            parts.push(Part::Literal(b" ".to_vec()));
            parts.push(Part::Replace(Source::Each, Op::Whole));
        }
        let quote = !replacement_in_first_word(&parts);
        Template {
            parts,
            quote,
            explicit,
        }
    }

    /// Whether the template contains any replacement string (if not, `expand`
    /// appends the inputs after a space, quoted).
    pub fn has_replacements(&self) -> bool {
        self.explicit
    }

    /// The payload for job number `seq` (1-based) whose inputs are `args` (one per
    /// `:::` source, or one line of a file), written into `out` (cleared first).
    ///
    /// It equals GNU parallel's `--dry-run` line for that job. No `args` at all is
    /// treated as one empty input, as GNU parallel does.
    pub fn expand_into(&self, seq: u64, args: &[&[u8]], out: &mut Vec<u8>) {
        out.clear();
        let args: &[&[u8]] = if args.is_empty() { &[b""] } else { args };
        for part in &self.parts {
            match *part {
                Part::Literal(ref bytes) => out.extend_from_slice(bytes),
                Part::Replace(Source::Each, op) => {
                    for (i, arg) in args.iter().enumerate() {
                        if i > 0 {
                            out.push(b' ');
                        }
                        self.push_value(&op.apply(arg, seq), out);
                    }
                }
                Part::Replace(Source::At(at), op) => {
                    if let Some(i) = resolve(at, args.len()) {
                        self.push_value(&op.apply(args[i], seq), out);
                    }
                }
            }
        }
    }

    fn push_value(&self, value: &[u8], out: &mut Vec<u8>) {
        if self.quote {
            shell_quote(value, out);
        } else {
            out.extend_from_slice(value);
        }
    }
}

/// Quotes `arg` for a POSIX shell exactly as GNU parallel does (so the shell sees
/// one word, whatever bytes it holds): unchanged if it is non-empty and only holds
/// ASCII letters, digits and `-_.+/`; `''` if empty; otherwise wrapped in single
/// quotes, each `'` written `'"'"'`, and a leading or trailing `''` dropped.
pub fn shell_quote(arg: &[u8], out: &mut Vec<u8>) {
    if arg.is_empty() {
        out.extend_from_slice(b"''");
    } else if arg
        .iter()
        .all(|&b| b.is_ascii_alphanumeric() || b"-_.+/".contains(&b))
    {
        out.extend_from_slice(arg);
    } else {
        let mut quoted = Vec::with_capacity(arg.len() + 2);
        quoted.push(b'\'');
        for &b in arg {
            if b == b'\'' {
                quoted.extend_from_slice(b"'\"'\"'");
            } else {
                quoted.push(b);
            }
        }
        quoted.push(b'\'');
        let trimmed = quoted.strip_prefix(b"''").unwrap_or(&quoted);
        out.extend_from_slice(trimmed.strip_suffix(b"''").unwrap_or(trimmed));
    }
}

/// Splits a template into literal runs and replacement strings.
fn split_parts(template: &[u8]) -> Vec<Part> {
    let mut parts = Vec::new();
    let mut literal = Vec::new();
    let mut i = 0;
    while i < template.len() {
        if let Some((part, len)) = replacement_at(&template[i..]) {
            if !literal.is_empty() {
                parts.push(Part::Literal(std::mem::take(&mut literal)));
            }
            parts.push(part);
            i += len;
        } else {
            literal.push(template[i]);
            i += 1;
        }
    }
    if !literal.is_empty() {
        parts.push(Part::Literal(literal));
    }
    parts
}

/// The replacement string at the start of `s` and its length, if there is one.
fn replacement_at(s: &[u8]) -> Option<(Part, usize)> {
    let rest = s.strip_prefix(b"{")?;
    let end = rest.iter().position(|&b| b == b'}')?;
    let (number, modifier) = split_position(&rest[..end]);
    let op = match modifier {
        b"" => Op::Whole,
        b"." => Op::NoExt,
        b"/" => Op::Base,
        b"//" => Op::Dir,
        b"/." => Op::BaseNoExt,
        b"#" => Op::Seq,
        _ => return None,
    };
    let source = match (op, number) {
        // GNU's `{#}` is `1 $_=$job->seq()`, so `{N#}` reads as position `N1`.
        (Op::Seq, _) => Source::At(perl_number(&[number, b"1"].concat())),
        (_, b"" | b"0") => Source::Each,
        _ => Source::At(perl_number(number)),
    };
    Some((Part::Replace(source, op), end + 2))
}

/// Splits `inner` (between the braces) into a leading `-?\d+` and the modifier after
/// it and any whitespace; no number means no whitespace is allowed either.
fn split_position(inner: &[u8]) -> (&[u8], &[u8]) {
    let sign = usize::from(inner.first() == Some(&b'-'));
    let digits = inner[sign..]
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .count();
    if digits == 0 {
        return (b"", inner);
    }
    let (number, rest) = inner.split_at(sign + digits);
    // Perl's `\s`: ASCII whitespace including vertical tab.
    let blanks = rest
        .iter()
        .take_while(|b| b" \t\n\x0b\x0c\r".contains(b))
        .count();
    (number, &rest[blanks..])
}

/// The value of `-?\d+`, saturated (any saturated position is out of range anyway).
fn perl_number(text: &[u8]) -> i64 {
    let (negative, digits) = match text.strip_prefix(b"-") {
        Some(digits) => (true, digits),
        None => (false, text),
    };
    let magnitude = digits.iter().fold(0_i64, |n, &d| {
        n.saturating_mul(10).saturating_add(i64::from(d - b'0'))
    });
    if negative { -magnitude } else { magnitude }
}

/// The index GNU parallel's `$argref->[$p > 0 ? $p-1 : $n+$p]` reaches, if any
/// (a negative Perl array index counts from the end once more).
fn resolve(at: i64, n: usize) -> Option<usize> {
    let n = i128::try_from(n).ok()?;
    let at = i128::from(at);
    let mut index = if at > 0 { at - 1 } else { n + at };
    if index < 0 {
        index += n;
    }
    if (0..n).contains(&index) {
        usize::try_from(index).ok()
    } else {
        None
    }
}

/// Whether a replacement string comes before any space, tab, newline or `=`: GNU
/// parallel then quotes nothing, as the input is (part of) the command itself.
fn replacement_in_first_word(parts: &[Part]) -> bool {
    for part in parts {
        match part {
            Part::Replace(..) => return true,
            Part::Literal(bytes) if bytes.iter().any(|b| b" \t\n=".contains(b)) => {
                return false;
            }
            Part::Literal(_) => {}
        }
    }
    false
}

impl Op {
    fn apply(self, arg: &[u8], seq: u64) -> Cow<'_, [u8]> {
        match self {
            Op::Whole => Cow::Borrowed(arg),
            Op::NoExt => Cow::Borrowed(without_extension(arg)),
            Op::Base => basename(arg),
            Op::Dir => Cow::Borrowed(dirname(arg)),
            Op::BaseNoExt => match basename(arg) {
                Cow::Borrowed(base) => Cow::Borrowed(without_extension(base)),
                Cow::Owned(base) => Cow::Owned(without_extension(&base).to_vec()),
            },
            Op::Seq => Cow::Owned(seq.to_string().into_bytes()),
        }
    }
}

/// Perl `s:\.[^/.]*$::`: drops the last `.` and what follows, unless a `/` follows.
fn without_extension(arg: &[u8]) -> &[u8] {
    match arg.iter().rposition(|&b| b == b'.') {
        Some(dot) if !arg[dot..].contains(&b'/') => &arg[..dot],
        _ => arg,
    }
}

/// Perl `s:.*/::` without `/s`: in the first line holding a `/`, drops everything
/// up to and including that line's last `/`.
fn basename(arg: &[u8]) -> Cow<'_, [u8]> {
    let mut start = 0;
    for line in arg.split(|&b| b == b'\n') {
        if let Some(slash) = line.iter().rposition(|&b| b == b'/') {
            let cut = start..=start + slash;
            if start == 0 {
                return Cow::Borrowed(&arg[slash + 1..]);
            }
            let mut out = arg.to_vec();
            out.drain(cut);
            return Cow::Owned(out);
        }
        start += line.len() + 1;
    }
    Cow::Borrowed(arg)
}

/// Perl `File::Basename::dirname` (Unix): `.` without a `/`, trailing slashes
/// ignored, `/` for the root.
fn dirname(arg: &[u8]) -> &[u8] {
    let (dir, base_empty) = split_dir(arg);
    let dir = strip_trailing_slashes(dir);
    if base_empty {
        strip_trailing_slashes(split_dir(dir).0)
    } else {
        dir
    }
}

/// Perl `fileparse` (Unix): the directory part up to the last `/` (or `./`) and
/// whether the rest is empty.
fn split_dir(path: &[u8]) -> (&[u8], bool) {
    match path.iter().rposition(|&b| b == b'/') {
        Some(slash) => (&path[..=slash], slash + 1 == path.len()),
        None => (b"./", path.is_empty()),
    }
}

/// Perl `s{(.)/*\z}{$1}s`: drops trailing slashes but keeps the first byte.
fn strip_trailing_slashes(dir: &[u8]) -> &[u8] {
    let keep = dir.iter().rposition(|&b| b != b'/').map_or(1, |i| i + 1);
    &dir[..keep.min(dir.len())]
}

#[cfg(test)]
mod tests {
    //! Every expected string below was printed by GNU parallel 20221122's
    //! `parallel --dry-run TEMPLATE ::: ...` (or `-0` input for newlines and
    //! non-UTF-8 bytes).
    use super::*;

    fn expand_bytes(template: &str, seq: u64, args: &[&[u8]]) -> Vec<u8> {
        let mut out = b"stale".to_vec();
        Template::parse(template).expand_into(seq, args, &mut out);
        out
    }

    fn expand(template: &str, seq: u64, args: &[&str]) -> String {
        let args: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
        String::from_utf8(expand_bytes(template, seq, &args)).expect("utf-8")
    }

    /// `echo {}` over each input, one job per input.
    fn echo_each(inputs: &[&str]) -> Vec<String> {
        inputs.iter().map(|i| expand("echo {}", 1, &[i])).collect()
    }

    fn quote(arg: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        shell_quote(arg, &mut out);
        out
    }

    #[test]
    fn quoted_input_stays_one_word() {
        let got = echo_each(&["a b", "say \"hi\"", "$HOME", "back\\slash", "tab\there"]);
        let want = [
            "echo 'a b'",
            "echo 'say \"hi\"'",
            "echo '$HOME'",
            "echo 'back\\slash'",
            "echo 'tab\there'",
        ];
        assert_eq!(got, want);
        assert_eq!(expand("echo {}", 1, &["new\nline"]), "echo 'new\nline'");
    }

    #[test]
    fn single_quotes_become_double_quoted() {
        let got = echo_each(&["it's", "'", "''", "a'"]);
        let want = [
            "echo 'it'\"'\"'s'",
            "echo \"'\"",
            "echo \"'\"''\"'\"",
            "echo 'a'\"'\"",
        ];
        assert_eq!(got, want);
    }

    #[test]
    fn safe_words_are_not_quoted() {
        let got = echo_each(&["-n", "plain-OK_1.2+3/x", "*", "~", "%", "a=b"]);
        let want = [
            "echo -n",
            "echo plain-OK_1.2+3/x",
            "echo '*'",
            "echo '~'",
            "echo '%'",
            "echo 'a=b'",
        ];
        assert_eq!(got, want);
    }

    #[test]
    fn empty_input_is_two_quotes() {
        assert_eq!(expand("echo {}", 1, &[""]), "echo ''");
        assert_eq!(quote(b""), b"''");
    }

    #[test]
    fn non_ascii_bytes_are_quoted_verbatim() {
        assert_eq!(expand("echo {}", 1, &["ünï"]), "echo 'ünï'");
        let got = expand_bytes("echo {}", 1, &[b"\xff\xfe.\x80"]);
        assert_eq!(got, b"echo '\xff\xfe.\x80'");
    }

    #[test]
    fn path_modifiers_match_gnu() {
        let t = "echo {.} {/} {//} {/.}";
        let cases = [
            ("a.b.c", "echo a.b a.b.c . a.b"),
            ("dir/", "echo dir/ '' . ''"),
            ("/", "echo / '' / ''"),
            (".hidden", "echo '' .hidden . ''"),
            ("dir.d/file", "echo dir.d/file file dir.d file"),
            ("a.b/c", "echo a.b/c c a.b c"),
            ("file", "echo file file . file"),
            ("/file", "echo /file file / file"),
            ("", "echo '' '' . ''"),
            (".", "echo '' . . ''"),
            ("..", "echo . .. . ."),
            ("a//b", "echo a//b b a b"),
            ("a/b//", "echo a/b// '' a ''"),
            ("//a", "echo //a a / a"),
            ("a/.b", "echo a/ .b a ''"),
        ];
        for (input, want) in cases {
            assert_eq!(expand(t, 1, &[input]), want, "input {input:?}");
        }
    }

    #[test]
    fn basename_stops_at_newlines_like_perl_dot() {
        let got = expand("echo {/} {.}", 1, &["a\nb/c\nd/e"]);
        assert_eq!(got, "echo 'a\nc\nd/e' 'a\nb/c\nd/e'");
        assert_eq!(expand("echo {/} {.}", 1, &["x.y\n"]), "echo 'x.y\n' x");
    }

    #[test]
    fn seq_is_the_job_number() {
        let got: Vec<String> = (1..=3).map(|n| expand("echo {#}", n, &["a"])).collect();
        assert_eq!(got, ["echo 1", "echo 2", "echo 3"]);
        // `{N#}` is GNU's position `N1`: `{0#}` is input 1, `{1#}` input 11.
        assert_eq!(expand("echo {#} {0#} {1#}", 1, &["a"]), "echo 1 1 ");
    }

    #[test]
    fn positional_picks_one_source() {
        assert_eq!(expand("cmd {1} {2.}", 1, &["x y", "a.txt"]), "cmd 'x y' a");
        let got = expand("cmd {1} {2.}", 2, &["x y", "b c.tar.gz"]);
        assert_eq!(got, "cmd 'x y' 'b c.tar'");
        let got = expand("{1/} {1//} {1/.} {-1}", 1, &["d/f.x", "z"]);
        assert_eq!(got, "f.x d f z");
    }

    #[test]
    fn out_of_range_position_is_empty_and_negatives_wrap() {
        let t = "echo {3} {-1} {-3} {-5} {0} {00} {01} [{1 .}]";
        let got = expand(t, 1, &["a", "b.c"]);
        assert_eq!(got, "echo  b.c b.c  a b.c  a [a]");
    }

    #[test]
    fn all_inputs_join_with_one_space() {
        assert_eq!(expand("echo x{}y", 1, &["a b", "c"]), "echo x'a b' cy");
        assert_eq!(expand("echo {/}", 1, &["p/q", "r s/t"]), "echo q t");
    }

    #[test]
    fn no_replacement_appends_inputs() {
        let t = Template::parse("echo");
        assert!(!t.has_replacements());
        assert!(Template::parse("{#}").has_replacements());
        assert_eq!(expand("echo", 1, &["a b"]), "echo 'a b'");
        assert_eq!(expand("echo", 1, &["a b", "c"]), "echo 'a b' c");
        assert_eq!(expand("", 1, &["a b"]), " 'a b'");
    }

    #[test]
    fn replacement_in_first_word_disables_quoting() {
        assert_eq!(expand("{} -v", 1, &["a b"]), "a b -v");
        assert_eq!(expand("x{}y {2}", 1, &["a b", "c d"]), "xa b c dy c d");
        assert_eq!(expand("A={} echo {}", 1, &["a b"]), "A='a b' echo 'a b'");
    }

    #[test]
    fn unknown_braces_stay_literal() {
        let got = expand("echo {{}} {x} {%} {1/ } {=}", 1, &["a b"]);
        assert_eq!(got, "echo {'a b'} {x} {%} {1/ } {=}");
    }

    #[test]
    fn no_inputs_means_one_empty_input() {
        assert_eq!(expand("echo {} {1}", 1, &[]), "echo '' ''");
    }

    #[test]
    fn expand_clears_the_buffer() {
        assert_eq!(expand_bytes("x", 1, &[b"y"]), b"x y");
    }
}
