//! Go duration syntax (`300ms`, `1.5h`, `2h45m`), the format of every duration in the
//! upstream config file. Written here because no maintained crate parses exactly Go's grammar
//! (humantime rejects fractions and accepts units Go refuses), and an existing config must
//! mean the same thing in both routers.

use std::time::Duration;

/// Parses a Go duration. Negative values are returned as `Err` with the sign noted, because
/// no field of ours takes a negative duration except `request_timeout`, which handles `-`
/// itself.
pub fn parse(input: &str) -> Result<Duration, String> {
    let s = input.trim();
    if s.is_empty() {
        return Err("empty duration".into());
    }
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    let mut rest = s;
    let mut total: f64 = 0.0;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (num, tail) = rest.split_at(num_len);
        if num.is_empty() || num == "." {
            return Err(format!("invalid duration {input:?}"));
        }
        let value: f64 = num
            .parse()
            .map_err(|_| format!("invalid duration {input:?}"))?;
        let unit_len = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_len);
        let nanos_per_unit = match unit {
            "ns" => 1.0,
            "us" | "µs" | "μs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            "" => return Err(format!("missing unit in duration {input:?}")),
            other => return Err(format!("unknown unit {other:?} in duration {input:?}")),
        };
        total += value * nanos_per_unit;
        rest = tail;
    }
    if !total.is_finite() || total > u64::MAX as f64 {
        return Err(format!("duration {input:?} is out of range"));
    }
    Ok(Duration::from_nanos(total.round() as u64))
}

/// Formats a duration so that [`parse`] reads it back exactly (and Go does too).
pub fn format(d: Duration) -> String {
    let nanos = d.as_nanos();
    if nanos == 0 {
        return "0s".into();
    }
    const UNITS: [(u128, &str); 6] = [
        (3_600_000_000_000, "h"),
        (60_000_000_000, "m"),
        (1_000_000_000, "s"),
        (1_000_000, "ms"),
        (1_000, "us"),
        (1, "ns"),
    ];
    let mut out = String::new();
    let mut rest = nanos;
    for (size, unit) in UNITS {
        if rest >= size {
            out.push_str(&format!("{}{unit}", rest / size));
            rest %= size;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_go_syntax() {
        assert_eq!(parse("300ms").unwrap(), Duration::from_millis(300));
        assert_eq!(parse("1.5h").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse("2h45m").unwrap(), Duration::from_secs(9900));
        assert_eq!(parse("0").unwrap(), Duration::ZERO);
        assert_eq!(parse("10µs").unwrap(), Duration::from_micros(10));
        assert!(parse("10").is_err());
        assert!(parse("1d").is_err());
        assert!(parse("-1").is_err());
        assert!(parse("").is_err());
        assert!(parse("ms").is_err());
    }

    #[test]
    fn format_round_trips() {
        for d in [
            Duration::from_secs(0),
            Duration::from_millis(1500),
            Duration::from_secs(9900),
            Duration::from_nanos(1_000_001),
        ] {
            assert_eq!(parse(&format(d)).unwrap(), d, "{}", format(d));
        }
    }
}
