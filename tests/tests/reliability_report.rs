//! docs/RELIABILITY.md names the test behind every row; this checks each named test exists, so
//! the report cannot drift from the code.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;

#[test]
fn every_test_named_in_the_reliability_report_exists() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let report = std::fs::read_to_string(root.join("docs/RELIABILITY.md")).unwrap();
    let mut named = 0;
    let mut missing = Vec::new();
    for line in report.lines().filter(|l| l.starts_with('|')) {
        // Names look like `path/to/file.rs::test_name`.
        for cell in line.split('`').skip(1).step_by(2) {
            let Some((file, test)) = cell.split_once(".rs::") else {
                continue;
            };
            named += 1;
            let path = root.join(format!("{file}.rs"));
            let source = std::fs::read_to_string(&path).unwrap_or_default();
            if !source.contains(&format!("fn {test}(")) {
                missing.push(cell.to_owned());
            }
        }
    }
    assert!(
        missing.is_empty(),
        "named in the report but not found: {missing:?}"
    );
    assert!(
        named >= 40,
        "only {named} tests named; is the table intact?"
    );
}
