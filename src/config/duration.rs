//! Human durations ("250ms", "2s", "1h30m"): parsing for the config file and formatting for
//! `srvlb check`, so that what the operator wrote and what the plan prints read the same way.

use std::time::Duration;

/// The hint every duration error ends with, so operators see the accepted shape at once.
pub(crate) const DURATION_HINT: &str = r#"expected a duration like "250ms", "2s" or "5m""#;

/// Parses `<int><unit>` groups with units `h`, `m`, `s`, `ms`, largest first ("1h30m",
/// "1m30s", "2s500ms"). Integer amounts only: "1.5s" is rejected rather than rounded, since
/// "1500ms" says the same thing without ambiguity. Returns the reason on failure.
pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    if text.is_empty() {
        return Err("empty duration".to_string());
    }
    if text.starts_with('-') {
        return Err("negative durations are not allowed".to_string());
    }
    let mut total_ms: u64 = 0;
    // Rank of the previous unit: each group must use a strictly smaller unit than the one
    // before, which rejects both "30m1h" (probably a typo) and "1s1s".
    let mut previous_rank = usize::MAX;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(format!("{text:?} does not start a group with a number"));
        }
        let (amount, after) = rest.split_at(digits);
        let unit_len = after
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(after.len());
        let (unit, tail) = after.split_at(unit_len);
        // (rank, milliseconds per unit); "ms" must be matched before "m".
        let (rank, unit_ms) = match unit {
            "h" => (0, 3_600_000),
            "m" => (1, 60_000),
            "s" => (2, 1_000),
            "ms" => (3, 1),
            "" => return Err(format!("{text:?} has no unit")),
            u if u.starts_with('.') => return Err(format!("{text:?} is not a whole number")),
            u => return Err(format!("unknown unit {u:?} in {text:?}")),
        };
        if previous_rank != usize::MAX && rank <= previous_rank {
            return Err(format!(
                "{text:?}: units must go from largest to smallest, once each"
            ));
        }
        previous_rank = rank;
        let group_ms = amount
            .parse::<u64>()
            .ok()
            .and_then(|n| n.checked_mul(unit_ms))
            .and_then(|ms| ms.checked_add(total_ms));
        total_ms = group_ms.ok_or_else(|| format!("{text:?} is too large"))?;
        rest = tail;
    }
    Ok(Duration::from_millis(total_ms))
}

/// Formats a duration the way the config file spells it (the inverse of `parse_duration` for
/// whole milliseconds), so `srvlb check` output can be pasted back into the file.
pub(crate) fn format_duration(duration: Duration) -> String {
    let mut ms = duration.as_millis();
    if ms == 0 {
        return "0s".to_string();
    }
    let mut out = String::new();
    for (unit, size) in [("h", 3_600_000), ("m", 60_000), ("s", 1_000), ("ms", 1)] {
        if ms >= size {
            out.push_str(&format!("{}{unit}", ms / size));
            ms %= size;
        }
    }
    out
}
