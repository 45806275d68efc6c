//! Test counts: parsing nextest's summary line and libtest's `test result:` lines.

/// Test counts gathered from nextest / libtest output.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Counts {
    /// Tests that passed.
    pub(crate) passed: u64,
    /// Tests that failed, timed out or could not be executed.
    pub(crate) failed: u64,
    /// Tests that were skipped / ignored.
    pub(crate) skipped: u64,
}

impl Counts {
    /// Adds `other` to `self`.
    pub(crate) fn add(&mut self, other: Counts) {
        self.passed += other.passed;
        self.failed += other.failed;
        self.skipped += other.skipped;
    }
}

/// Tests that skipped at run time (one skip-log line each) were reported as passed by the
/// harness: count them as skipped instead.
pub(crate) fn with_notices(mut counts: Counts, notices: u64) -> Counts {
    let moved = notices.min(counts.passed);
    counts.passed -= moved;
    counts.skipped += notices;
    counts
}

/// Whether `line` is nextest's final `Summary [ ... ] N tests run: ...` line.
pub(crate) fn is_nextest_summary(line: &str) -> bool {
    parse_nextest_summary(line).is_some()
}

/// Parses `Summary [  1.2s] 120 tests run: 118 passed (1 flaky), 2 failed, 1 timed out, 3 skipped`.
pub(crate) fn parse_nextest_summary(line: &str) -> Option<Counts> {
    let rest = line.trim_start().strip_prefix("Summary [")?;
    let (_, rest) = rest.split_once(']')?;
    let (head, tail) = rest.split_once(" run:")?;
    if !(head.trim_end().ends_with(" tests") || head.trim_end().ends_with(" test")) {
        return None;
    }
    let tail = tail.split(';').next().unwrap_or_default();
    let mut counts = Counts::default();
    for (n, what) in count_phrases(&strip_parens(tail), ',') {
        match what.as_str() {
            "passed" => counts.passed += n,
            "skipped" => counts.skipped += n,
            "failed" | "exec failed" | "timed out" => counts.failed += n,
            _ => {}
        }
    }
    Some(counts)
}

/// Whether `line` is a libtest `test result:` line.
pub(crate) fn is_libtest_result(line: &str) -> bool {
    parse_libtest_result(line).is_some()
}

/// Parses `test result: ok. 3 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; ...`.
pub(crate) fn parse_libtest_result(line: &str) -> Option<Counts> {
    let rest = line.trim_start().strip_prefix("test result: ")?;
    let (_, rest) = rest.split_once(". ")?;
    let mut counts = Counts::default();
    let mut seen = false;
    for (n, what) in count_phrases(rest, ';') {
        match what.as_str() {
            "passed" => counts.passed += n,
            "failed" => counts.failed += n,
            "ignored" => counts.skipped += n,
            _ => continue,
        }
        seen = true;
    }
    seen.then_some(counts)
}

/// Sums every libtest result line.
pub(crate) fn sum_libtest(lines: &[String]) -> Counts {
    let mut total = Counts::default();
    for counts in lines.iter().filter_map(|l| parse_libtest_result(l)) {
        total.add(counts);
    }
    total
}

/// Removes parenthesised parts, e.g. `5 passed (1 slow, 1 flaky), 2 failed` -> `5 passed , 2 failed`.
fn strip_parens(text: &str) -> String {
    let mut depth = 0usize;
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            c if depth == 0 => out.push(c),
            _ => {}
        }
    }
    out
}

/// Splits `3 passed; 0 failed` on `sep` into `(3, "passed"), (0, "failed")`.
fn count_phrases(text: &str, sep: char) -> Vec<(u64, String)> {
    text.split(sep)
        .filter_map(|part| {
            let mut words = part.split_whitespace();
            let n = words.next()?.parse().ok()?;
            Some((n, words.collect::<Vec<_>>().join(" ")))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(passed: u64, failed: u64, skipped: u64) -> Counts {
        Counts {
            passed,
            failed,
            skipped,
        }
    }

    #[test]
    fn nextest_summaries() {
        let ok = "     Summary [  12.345s] 120 tests run: 120 passed, 3 skipped";
        assert_eq!(parse_nextest_summary(ok), Some(counts(120, 0, 3)));
        let bad = "     Summary [  15.750s] 8/10 tests run: 5 passed (1 slow, 1 flaky, 1 leaky), \
                   2 failed, 1 exec failed, 1 timed out, 2 skipped";
        assert_eq!(parse_nextest_summary(bad), Some(counts(5, 4, 2)));
        let one = "     Summary [   0.1s] 1 test run: 1 passed, 0 skipped";
        assert_eq!(parse_nextest_summary(one), Some(counts(1, 0, 0)));
        let cancelled =
            "Summary [ 1.0s] 3 tests run: 2 passed, 1 failed; cancelled due to interrupt";
        assert_eq!(parse_nextest_summary(cancelled), Some(counts(2, 1, 0)));
        assert_eq!(parse_nextest_summary("Summary of the thing"), None);
        assert_eq!(parse_nextest_summary("running 3 tests"), None);
    }

    #[test]
    fn libtest_results() {
        let lines = [
            "test result: ok. 3 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.00s".to_owned(),
            "test result: FAILED. 4 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out; finished in 1.02s".to_owned(),
            "test foo ... ok".to_owned(),
        ];
        assert_eq!(sum_libtest(&lines), counts(7, 2, 1));
        assert!(!is_libtest_result("test result"));
    }

    #[test]
    fn notices_move_passed_to_skipped() {
        assert_eq!(with_notices(counts(10, 1, 2), 3), counts(7, 1, 5));
        assert_eq!(with_notices(counts(1, 0, 0), 3), counts(0, 0, 3));
    }

    #[test]
    fn phrases_ignore_parenthesised_details() {
        let phrases = count_phrases(&strip_parens(" 5 passed (1 slow, 1 flaky), 2 failed"), ',');
        assert_eq!(
            phrases,
            vec![(5, "passed".to_owned()), (2, "failed".to_owned())]
        );
    }
}
