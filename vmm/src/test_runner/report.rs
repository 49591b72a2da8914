//! Results and how they are shown: the human lines (one per case, with timings and retries),
//! `--format jsonl` (one JSON event per line), and the JUnit XML file (`--junit`), written
//! atomically, in the shape nextest and common CI readers take (`<testsuites>`, one
//! `<testsuite>`, `<testcase>` with `<failure>`, `<error>` (not run: the run was cut short),
//! `<skipped>` and `<system-out>`).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::json;

use super::artifacts::write_atomically;

/// How a case ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Fail(String),
    Skip(String),
    /// Not run because the run was cut short (the suite watchdog): this reason.
    NotRun(String),
}

/// One case's result.
#[derive(Debug, Clone)]
pub struct CaseResult {
    pub name: String,
    pub vm: String,
    pub verdict: Verdict,
    /// Attempts made (0 for a skip).
    pub attempts: u32,
    /// The failures of the attempts before the last (retries).
    pub earlier_failures: Vec<String>,
    pub duration: Duration,
    /// `unstable = "reason"`: a failure does not fail the suite.
    pub unstable: Option<String>,
    /// Forked from the VM's snapshot (else booted cold).
    pub forked: bool,
    /// The last attempt's artifact directory.
    pub artifacts: Option<PathBuf>,
    /// The command that restores the failing VM (`--snapshot-on-failure`).
    pub restore_command: Option<String>,
}

impl CaseResult {
    /// Whether this result fails the suite.
    pub fn fails_suite(&self) -> bool {
        match self.verdict {
            Verdict::Fail(_) => self.unstable.is_none(),
            Verdict::NotRun(_) => true,
            Verdict::Pass | Verdict::Skip(_) => false,
        }
    }
}

/// Output format on stdout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Human,
    Jsonl,
}

fn millis(d: Duration) -> u128 {
    d.as_millis()
}

/// The line (or event) for one case.
pub fn case_line(r: &CaseResult, format: Format) -> String {
    match format {
        Format::Human => {
            let mode = if r.forked { "fork" } else { "cold" };
            let retried = if r.attempts > 1 {
                format!(", {} attempts", r.attempts)
            } else {
                String::new()
            };
            let unstable = r
                .unstable
                .as_ref()
                .map(|u| format!(" [unstable: {u}]"))
                .unwrap_or_default();
            let mut line = match &r.verdict {
                Verdict::Pass => format!(
                    "PASS {} ({} ms, {mode}{retried}){unstable}",
                    r.name,
                    millis(r.duration)
                ),
                Verdict::Fail(why) => format!(
                    "FAIL {} ({} ms, {mode}{retried}){unstable}: {why}",
                    r.name,
                    millis(r.duration)
                ),
                Verdict::Skip(why) => format!("SKIP {}: {why}", r.name),
                Verdict::NotRun(why) => format!("NOT-RUN {}: {why}", r.name),
            };
            for (i, f) in r.earlier_failures.iter().enumerate() {
                let _ = write!(line, "\n     attempt {} failed: {f}", i + 1);
            }
            if let (Verdict::Fail(_), Some(dir)) = (&r.verdict, &r.artifacts) {
                let _ = write!(line, "\n     artifacts: {}", dir.display());
            }
            if let Some(cmd) = &r.restore_command {
                let _ = write!(line, "\n     restore the failed VM: {cmd}");
            }
            line
        }
        Format::Jsonl => {
            let (outcome, reason) = match &r.verdict {
                Verdict::Pass => ("pass", None),
                Verdict::Fail(w) => ("fail", Some(w)),
                Verdict::Skip(w) => ("skip", Some(w)),
                Verdict::NotRun(w) => ("not-run", Some(w)),
            };
            json!({
                "event": "case",
                "name": r.name,
                "vm": r.vm,
                "outcome": outcome,
                "reason": reason,
                "attempts": r.attempts,
                "retried_failures": r.earlier_failures,
                "duration_ms": millis(r.duration),
                "forked": r.forked,
                "unstable": r.unstable,
                "artifacts": r.artifacts,
                "restore_command": r.restore_command,
            })
            .to_string()
        }
    }
}

/// Counts of a run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    pub passed: usize,
    pub failed: usize,
    pub skipped: usize,
    pub not_run: usize,
    pub retried: usize,
}

/// Counts `results`.
pub fn totals(results: &[CaseResult]) -> Totals {
    let mut t = Totals::default();
    for r in results {
        match r.verdict {
            Verdict::Pass => t.passed += 1,
            Verdict::Fail(_) => t.failed += 1,
            Verdict::Skip(_) => t.skipped += 1,
            Verdict::NotRun(_) => t.not_run += 1,
        }
        if r.attempts > 1 {
            t.retried += 1;
        }
    }
    t
}

/// The summary line (or event).
pub fn summary_line(results: &[CaseResult], elapsed: Duration, format: Format) -> String {
    let t = totals(results);
    match format {
        Format::Human => format!(
            "{} passed, {} failed, {} skipped{} ({} retried) in {:.2} s",
            t.passed,
            t.failed,
            t.skipped,
            if t.not_run > 0 {
                format!(", {} not run", t.not_run)
            } else {
                String::new()
            },
            t.retried,
            elapsed.as_secs_f64()
        ),
        Format::Jsonl => json!({
            "event": "summary",
            "passed": t.passed,
            "failed": t.failed,
            "skipped": t.skipped,
            "not_run": t.not_run,
            "retried": t.retried,
            "duration_ms": millis(elapsed),
        })
        .to_string(),
    }
}

fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            // Characters XML 1.0 cannot hold at all.
            c if (c as u32) < 0x20 && !matches!(c, '\t' | '\n' | '\r') => out.push('?'),
            c => out.push(c),
        }
    }
    out
}

/// The JUnit XML document for `results` (suite name `suite`).
pub fn junit_xml(suite: &str, results: &[CaseResult], elapsed: Duration) -> String {
    let t = totals(results);
    let mut x = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    let _ = writeln!(
        x,
        "<testsuites name=\"skiff-test\" tests=\"{}\" failures=\"{}\" errors=\"{}\" skipped=\"{}\" time=\"{:.3}\">",
        results.len(),
        t.failed,
        t.not_run,
        t.skipped,
        elapsed.as_secs_f64()
    );
    let _ = writeln!(
        x,
        "  <testsuite name=\"{}\" tests=\"{}\" failures=\"{}\" errors=\"{}\" skipped=\"{}\" time=\"{:.3}\">",
        escape(suite),
        results.len(),
        t.failed,
        t.not_run,
        t.skipped,
        elapsed.as_secs_f64()
    );
    for r in results {
        let _ = write!(
            x,
            "    <testcase name=\"{}\" classname=\"{}\" time=\"{:.3}\"",
            escape(&r.name),
            escape(&r.vm),
            r.duration.as_secs_f64()
        );
        let mut out = String::new();
        if r.attempts > 1 {
            let _ = writeln!(out, "attempts: {}", r.attempts);
            for (i, f) in r.earlier_failures.iter().enumerate() {
                let _ = writeln!(out, "attempt {} failed: {f}", i + 1);
            }
        }
        if let Some(u) = &r.unstable {
            let _ = writeln!(out, "unstable: {u}");
        }
        if let Some(dir) = &r.artifacts {
            let _ = writeln!(out, "artifacts: {}", dir.display());
        }
        if let Some(cmd) = &r.restore_command {
            let _ = writeln!(out, "restore: {cmd}");
        }
        x.push_str(">\n");
        match &r.verdict {
            Verdict::Pass => {}
            Verdict::Fail(why) => {
                let _ = writeln!(
                    x,
                    "      <failure message=\"{}\" type=\"failure\">{}</failure>",
                    escape(why),
                    escape(why)
                );
            }
            Verdict::Skip(why) => {
                let _ = writeln!(x, "      <skipped message=\"{}\"/>", escape(why));
            }
            Verdict::NotRun(why) => {
                let _ = writeln!(
                    x,
                    "      <error message=\"{}\" type=\"not-run\"/>",
                    escape(why)
                );
            }
        }
        if !out.is_empty() {
            let _ = writeln!(x, "      <system-out>{}</system-out>", escape(&out));
        }
        x.push_str("    </testcase>\n");
    }
    x.push_str("  </testsuite>\n</testsuites>\n");
    x
}

/// Writes the JUnit file atomically.
pub fn write_junit(
    path: &Path,
    suite: &str,
    results: &[CaseResult],
    elapsed: Duration,
) -> std::io::Result<()> {
    write_atomically(path, junit_xml(suite, results, elapsed).as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn junit_escapes_and_counts() {
        let r = CaseResult {
            name: "a<b>&\"c\"".into(),
            vm: "tg".into(),
            verdict: Verdict::Fail("exit 3, expected 0 \u{1}".into()),
            attempts: 2,
            earlier_failures: vec!["timeout".into()],
            duration: Duration::from_millis(5),
            unstable: None,
            forked: true,
            artifacts: None,
            restore_command: None,
        };
        let x = junit_xml("s", &[r], Duration::from_millis(9));
        assert!(x.contains("name=\"a&lt;b&gt;&amp;&quot;c&quot;\""), "{x}");
        assert!(x.contains("failures=\"1\""));
        assert!(x.contains("expected 0 ?"));
        assert!(x.contains("attempt 1 failed: timeout"));
    }

    #[test]
    fn not_run_cases_are_junit_errors_and_fail_the_suite() {
        let r = CaseResult {
            name: "late".into(),
            vm: "tg".into(),
            verdict: Verdict::NotRun("not run: the suite watchdog (3.0 s) expired".into()),
            attempts: 0,
            earlier_failures: Vec::new(),
            duration: Duration::ZERO,
            unstable: Some("flaky".into()),
            forked: false,
            artifacts: None,
            restore_command: None,
        };
        assert!(
            r.fails_suite(),
            "unstable does not excuse a case that never ran"
        );
        let x = junit_xml("s", std::slice::from_ref(&r), Duration::from_millis(9));
        assert!(x.contains("errors=\"1\" skipped=\"0\""), "{x}");
        assert!(
            x.contains("<error message=\"not run: the suite watchdog"),
            "{x}"
        );
        let line = summary_line(&[r], Duration::from_secs(1), Format::Human);
        assert!(line.contains("0 failed, 0 skipped, 1 not run"), "{line}");
    }
}
