//! The process as the standard Prometheus `process_*` series describe it (open and maximum
//! descriptors, resident and virtual memory, CPU time, threads, start time), read from
//! /proc at scrape time. Linux only: elsewhere, or with /proc unreadable, the readings are
//! absent and so are their series.

use std::sync::OnceLock;

/// One reading of /proc/self/stat (and /proc/stat for the boot time).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct ProcessStat {
    pub(crate) cpu_seconds: f64,
    pub(crate) threads: u64,
    pub(crate) virtual_bytes: u64,
    pub(crate) resident_bytes: u64,
    /// Unix time the process started, in seconds.
    pub(crate) start_time_seconds: f64,
}

impl ProcessStat {
    pub(super) fn read() -> Option<ProcessStat> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        let boot = boot_time_seconds()?;
        parse_stat(
            &stat,
            rustix::param::clock_ticks_per_second(),
            rustix::param::page_size() as u64,
            boot,
        )
    }
}

/// Parses /proc/self/stat. The command name (field 2) is in parentheses and may itself hold
/// spaces and parentheses, so the fields are counted from the last `)`.
fn parse_stat(stat: &str, ticks_per_second: u64, page_size: u64, boot: u64) -> Option<ProcessStat> {
    let (_, rest) = stat.rsplit_once(')')?;
    // After the name: field 3 (state) is index 0, so field N is index N - 3.
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| -> Option<u64> { fields.get(n - 3)?.parse().ok() };
    let ticks = ticks_per_second.max(1) as f64;
    let (utime, stime) = (field(14)?, field(15)?);
    Some(ProcessStat {
        cpu_seconds: (utime + stime) as f64 / ticks,
        threads: field(20)?,
        start_time_seconds: boot as f64 + field(22)? as f64 / ticks,
        virtual_bytes: field(23)?,
        resident_bytes: field(24)?.saturating_mul(page_size),
    })
}

/// The `btime` line of /proc/stat (boot time, Unix seconds); read once, it never changes.
fn boot_time_seconds() -> Option<u64> {
    static BOOT: OnceLock<Option<u64>> = OnceLock::new();
    *BOOT.get_or_init(|| {
        let text = std::fs::read_to_string("/proc/stat").ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix("btime "))
            .and_then(|v| v.trim().parse().ok())
    })
}

/// The soft RLIMIT_NOFILE (`process_max_fds`); `None` when unlimited.
pub(super) fn max_fds() -> Option<u64> {
    rustix::process::getrlimit(rustix::process::Resource::Nofile).current
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_after_the_last_parenthesis() {
        // A name with a space and a parenthesis, as `prctl` allows.
        let stat = "4242 (srv lb) x) S 1 4242 4242 0 -1 4194560 900 0 0 0 250 50 0 0 20 0 7 0 \
                    12345 104857600 2560 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0";
        let s = parse_stat(stat, 100, 4096, 1_700_000_000).expect("parses");
        assert_eq!(s.cpu_seconds, 3.0);
        assert_eq!(s.threads, 7);
        assert_eq!(s.start_time_seconds, 1_700_000_123.45);
        assert_eq!(s.virtual_bytes, 104_857_600);
        assert_eq!(s.resident_bytes, 2560 * 4096);
    }

    #[test]
    fn this_process_reads_sensibly() {
        let Some(s) = ProcessStat::read() else {
            return; // no /proc here
        };
        assert!(s.resident_bytes > 0 && s.threads >= 1, "{s:?}");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        assert!(
            s.start_time_seconds <= now + 1.0 && s.start_time_seconds > now - 86_400.0 * 365.0,
            "{s:?}"
        );
    }
}
