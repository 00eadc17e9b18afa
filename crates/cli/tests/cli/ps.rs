//! `ps` and `status` for people: an aligned table of the newest instances with a
//! one-line preview of each payload (control characters escaped, wide characters
//! counted as the terminal does), colour and cutting only on a terminal; `status` as
//! one readable line there and JSON everywhere else.

use unicode_width::UnicodeWidthStr;

use crate::util::*;

/// The payloads of `mixed`, oldest first, and the preview `ps` must show for each.
const PAYLOADS: [(&str, &str); 5] = [
    ("echo plain", "echo plain"),
    (
        "printf 'a\\tb\\n'\t# tab\n# and a second line",
        "printf 'a\\tb\\n'\\t# tab…",
    ),
    ("\n\n  echo after blank lines", "echo after blank lines"),
    (
        "echo \u{1b}[31mred\u{7}; exit 3",
        "echo \\u{1b}[31mred\\u{7}; exit 3",
    ),
    ("echo 日本語のテキスト ✓", "echo 日本語のテキスト ✓"),
];

/// The five payloads added and run (the fourth fails with exit 3), then a sixth,
/// `exit 0`, left pending in batch `later`.
fn mixed(env: &Env) {
    for (payload, _) in PAYLOADS {
        env.add(payload);
    }
    env.run_until_empty(&[]);
    env.add_with(&["--batch", "later"], "exit 0");
}

/// The cells of a table line, split at the header's column starts.
fn cells<'a>(header: &str, line: &'a str) -> Vec<&'a str> {
    let starts: Vec<usize> = header
        .match_indices(|c: char| c.is_ascii_uppercase())
        .filter(|(i, _)| *i == 0 || header.as_bytes()[i - 1] == b' ')
        .map(|(i, _)| i)
        .collect();
    let mut out = Vec::new();
    for (k, &s) in starts.iter().enumerate() {
        let end = starts.get(k + 1).copied().unwrap_or(line.len());
        if k > 0 {
            assert_eq!(&line[s - 2..s], "  ", "column {k} misaligned in {line:?}");
        }
        out.push(line[s..end.min(line.len())].trim_end());
    }
    out
}

#[test]
fn ps_is_an_aligned_table_of_the_newest_instances_with_one_line_previews() {
    let env = Env::new();
    mixed(&env);
    let table = env.ok(&["ps"]);
    assert!(
        !table.contains('\u{1b}'),
        "no colour off a terminal: {table:?}"
    );
    assert!(
        !table.chars().any(|c| c.is_control() && c != '\n'),
        "{table:?}"
    );
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 7, "{table}");
    let header = lines[0];
    assert_eq!(
        header.split_whitespace().collect::<Vec<_>>(),
        [
            "ID", "STATE", "AGE", "TIME", "TRIES", "EXIT", "BATCH", "COMMAND"
        ]
    );
    let rows: Vec<Vec<&str>> = lines[1..].iter().map(|l| cells(header, l)).collect();
    let ids: Vec<&str> = rows.iter().map(|r| r[0]).collect();
    assert_eq!(ids, ["6", "5", "4", "3", "2", "1"], "newest first");
    assert_eq!(
        rows[0][1..],
        ["pending", rows[0][2], "-", "0", "-", "later", "exit 0"]
    );
    for (row, (_, preview)) in rows[1..].iter().zip(PAYLOADS.iter().rev()) {
        assert_eq!(row[7], *preview, "{table}");
        assert_eq!((row[4], row[6]), ("1", "-"), "{table}");
    }
    assert_eq!((rows[2][1], rows[2][5]), ("fail", "3"));
    assert_eq!((rows[1][1], rows[1][5]), ("result", "0"));
}

#[test]
fn ps_filters_by_state_and_batch_and_keeps_to_the_limit() {
    let env = Env::new();
    mixed(&env);
    let ids = |args: &[&str]| -> Vec<String> {
        let mut a = vec!["ps"];
        a.extend_from_slice(args);
        let out = env.ok(&a);
        out.lines()
            .skip(1)
            .map(|l| l.split_whitespace().next().unwrap_or("").to_owned())
            .collect()
    };
    assert_eq!(ids(&["--state", "fail"]), ["4"]);
    assert_eq!(ids(&["--state", "fail", "--state", "pending"]), ["6", "4"]);
    assert_eq!(ids(&["--batch", "later"]), ["6"]);
    assert_eq!(ids(&["--limit", "2"]), ["6", "5"]);
    assert_eq!(ids(&["--batch", "nothing-here"]), Vec::<String>::new());
    let out = env.cmd(&["ps", "--state", "done"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).starts_with("batchdb: "),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(text(&out.stderr).lines().count(), 1);
}

#[test]
fn ps_on_a_terminal_is_coloured_and_cut_to_its_width_unless_no_color() {
    let env = Env::new();
    mixed(&env);
    env.add(&format!("echo {}", "wide✓".repeat(40)));
    let shown = env.on_terminal_with("ps", None, &[("COLUMNS", "70")]);
    assert!(
        shown.contains("\u{1b}[31mfail"),
        "the failure is red: {shown:?}"
    );
    let plain = strip_ansi(&shown);
    for line in plain.lines() {
        assert!(
            line.trim_end().width() <= 70,
            "wider than 70 columns: {line:?}"
        );
    }
    assert!(
        plain.contains("echo wide✓wide✓") && plain.contains('…'),
        "{plain}"
    );

    let shown = env.on_terminal_with("ps", None, &[("COLUMNS", "70"), ("NO_COLOR", "1")]);
    assert!(
        !shown.contains('\u{1b}'),
        "NO_COLOR is respected: {shown:?}"
    );
}

#[test]
fn status_is_a_readable_line_on_a_terminal_and_json_elsewhere() {
    let env = Env::new();
    mixed(&env);
    let shown = env.on_terminal("status", None);
    assert_eq!(
        shown.trim_end(),
        "1 pending, 0 running, 4 results, 1 failed"
    );
    let shown = env.on_terminal("status --batch later", None);
    assert_eq!(shown.trim_end(), "1 pending, 0 running");
    let json = env.on_terminal("status --json", None);
    let v: serde_json::Value = serde_json::from_str(json.trim_end()).expect("JSON");
    assert_eq!(
        (v["result"].as_u64(), v["fail"].as_u64()),
        (Some(4), Some(1))
    );
    let piped = env.ok(&["status"]);
    let v: serde_json::Value = serde_json::from_str(piped.trim_end()).expect("JSON");
    assert_eq!(v["pending"].as_u64(), Some(1));
}

/// `text` without ANSI escape sequences (`ESC [ ... letter`) and carriage returns.
fn strip_ansi(text: &str) -> String {
    let mut out = String::new();
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match c {
            '\u{1b}' => {
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            '\r' => {}
            c => out.push(c),
        }
    }
    out
}

#[test]
fn ps_says_when_a_payload_is_gone_instead_of_failing() {
    let env = Env::new();
    // Over 16 KiB: kept in the blob store, not inline.
    let big = format!("echo big # {}", "x".repeat(20_000));
    let (key, _) = env.add(&big);
    env.add("echo small");
    let blob = env.blob_path(&key);
    std::fs::remove_file(&blob).expect("remove the payload's blob");
    let table = env.ok(&["ps"]);
    let rows: Vec<&str> = table.lines().skip(1).collect();
    assert_eq!(rows.len(), 2, "{table}");
    assert!(rows[0].ends_with("echo small"), "{table}");
    assert!(rows[1].ends_with("(payload missing)"), "{table}");
}
