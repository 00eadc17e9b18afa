//! Parsing of `--at` times (second counts are checked by the library's `secs`).

pub use batchdb::queue::secs;

/// Parses `--at`: epoch seconds, or `YYYY-MM-DDTHH:MM:SS` (optionally with `Z`, a
/// space instead of `T`, or no time part), in UTC. Returns epoch milliseconds.
pub fn parse_at(s: &str) -> Result<i64, batchdb::Error> {
    let bad = || batchdb::Error::Config {
        what: "time",
        value: s.into(),
        why: "expected epoch seconds or YYYY-MM-DDTHH:MM:SS[Z] (UTC)".into(),
    };
    if let Ok(secs) = s.parse::<f64>() {
        // Years 0 to 9999 only.
        if secs.is_finite() && (0.0..=253_402_300_799.0).contains(&secs) {
            return Ok((secs * 1000.0) as i64);
        }
        return Err(bad());
    }
    let s2 = s.trim_end_matches('Z');
    let (date, time) = match s2.split_once(['T', ' ']) {
        Some((d, t)) => (d, t),
        None => (s2, "00:00:00"),
    };
    let d: Vec<i64> = date
        .split('-')
        .map(|p| p.parse().map_err(|_| bad()))
        .collect::<Result<_, _>>()?;
    let t: Vec<i64> = time
        .split(':')
        .map(|p| p.parse().map_err(|_| bad()))
        .collect::<Result<_, _>>()?;
    let (&[y, m, day], &[hh, mm, ss]) = (d.as_slice(), t.as_slice()) else {
        return Err(bad());
    };
    if !(0..=9999).contains(&y)
        || !(1..=12).contains(&m)
        || !(1..=31).contains(&day)
        || hh > 23
        || mm > 59
        || ss > 60
        || hh < 0
        || mm < 0
        || ss < 0
    {
        return Err(bad());
    }
    Ok((days_from_civil(y, m, day) * 86400 + hh * 3600 + mm * 60 + ss) * 1000)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_formats() {
        assert_eq!(parse_at("0").unwrap(), 0);
        assert_eq!(parse_at("1409895158").unwrap(), 1409895158000);
        assert_eq!(parse_at("1970-01-01T00:00:00Z").unwrap(), 0);
        assert_eq!(parse_at("2014-09-05T05:32:38Z").unwrap(), 1409895158000);
        assert_eq!(parse_at("2014-09-05 05:32:38").unwrap(), 1409895158000);
        assert_eq!(parse_at("2000-03-01").unwrap(), 951868800000);
        for bad in [
            "",
            "yesterday",
            "2014-13-01",
            "2014-09-05T25:00:00",
            "NaN",
            "2014-09",
        ] {
            assert!(parse_at(bad).is_err(), "{bad}");
        }
    }
}
