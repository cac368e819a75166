//! The kernel's event timestamps (CLOCK_BOOTTIME nanoseconds) as wall-clock time, so a log
//! line says when the attempt was made, not when the agent got round to reading it.

/// Nanoseconds since the Unix epoch at CLOCK_BOOTTIME `boot_ns`: now on the real-time clock,
/// less how long ago `boot_ns` was. `None` when a clock cannot be read.
pub fn boot_to_unix_ns(boot_ns: u64) -> Option<i128> {
    let boot_now = clock_ns(libc::CLOCK_BOOTTIME)?;
    let real_now = clock_ns(libc::CLOCK_REALTIME)?;
    Some(real_now - (boot_now - i128::from(boot_ns)))
}

fn clock_ns(clock: libc::clockid_t) -> Option<i128> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime(2) writes one timespec we own.
    if unsafe { libc::clock_gettime(clock, &mut ts) } != 0 {
        return None;
    }
    Some(i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec))
}

/// `unix_ns` as RFC 3339 in UTC with microseconds, the form of the log's own `timestamp`.
pub fn rfc3339(unix_ns: i128) -> String {
    let secs = unix_ns.div_euclid(1_000_000_000);
    let micros = unix_ns.rem_euclid(1_000_000_000) / 1000;
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{micros:06}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Howard Hinnant's days-to-civil: days since 1970-01-01 to (year, month, day).
fn civil_from_days(days: i128) -> (i128, i128, i128) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i128::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_like_the_log_timestamp() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(
            rfc3339(1_700_000_000_123_456_789),
            "2023-11-14T22:13:20.123456Z"
        );
        assert_eq!(
            rfc3339(951_782_400_000_000_000),
            "2000-02-29T00:00:00.000000Z"
        );
        assert_eq!(rfc3339(-1_000), "1969-12-31T23:59:59.999999Z");
    }

    #[test]
    fn a_boot_time_of_now_is_the_wall_time_of_now_and_earlier_is_earlier() {
        let boot_now = clock_ns(libc::CLOCK_BOOTTIME).unwrap_or(0);
        let real_now = clock_ns(libc::CLOCK_REALTIME).unwrap_or(0);
        let boot_ns = u64::try_from(boot_now).unwrap_or(0);
        let at = boot_to_unix_ns(boot_ns).unwrap_or(0);
        assert!((at - real_now).abs() < 1_000_000_000, "{at} vs {real_now}");
        let earlier = boot_to_unix_ns(boot_ns - 5_000_000_000).unwrap_or(0);
        let gap = at - earlier;
        assert!((gap - 5_000_000_000).abs() < 100_000_000, "{gap}");
    }
}
