//! `skiff test` end to end: small suites of test-guest cases written to temporary directories,
//! run through the real binary, with the results read back from its output, its JUnit file and
//! its artifact directory.

#![cfg(unix)] // KVM tests: Linux only (the Windows build compiles them to nothing)
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use skiff_tests::{processes_mentioning, require_kvm, skiff_bin, testguest};
use vmm::test_runner::test_vm::TestVm;

/// A suite directory with the VMs every test uses.
fn suite(tests: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let kernel = testguest().display().to_string();
    let text = format!(
        "[vm.fork]\nkernel = {kernel:?}\nagent = \"testguest\"\nfork = true\nboot_timeout = 60\n\n\
         [vm.cold]\nkernel = {kernel:?}\nagent = \"testguest\"\nboot_timeout = 60\n\n\
         [vm.plain]\nkernel = {kernel:?}\n\n\
         [vm.linux]\nkernel = {kernel:?}\nagent = \"linux\"\nfork = true\n\n{tests}"
    );
    let file = dir.path().join("skiff-test.toml");
    std::fs::write(&file, text).unwrap();
    (dir, file)
}

fn skiff_test(dir: &Path, args: &[&str]) -> Output {
    Command::new(skiff_bin())
        .current_dir(dir)
        .arg("test")
        .args(args)
        .output()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The case lines of human output, by name: (verdict word, whole line).
fn verdicts(out: &Output) -> BTreeMap<String, String> {
    text(&out.stdout)
        .lines()
        .filter_map(|l| {
            let (word, rest) = l.split_once(' ')?;
            if !["PASS", "FAIL", "SKIP"].contains(&word) {
                return None;
            }
            let name = rest.split([' ', ':']).next()?.to_string();
            Some((name, l.to_string()))
        })
        .collect()
}

const MIXED: &str = r#"
[[test]]
name = "pass"
vm = "fork"
run = ["exit=0"]

[[test]]
name = "echo"
vm = "fork"
run = ["echo", "hello", "runner"]
output = "hello runner"

[[test]]
name = "fail"
vm = "fork"
run = ["exit=3"]

[[test]]
name = "timeout"
vm = "fork"
run = ["spin"]
timeout = 1

[[test]]
name = "dies"
vm = "fork"
run = ["die"]

[[test]]
name = "skipped"
vm = "fork"
run = ["true"]
requires = "no-such-capability | (kvm & !kvm)"

[[test]]
name = "linux"
vm = "linux"
run = ["true"]

[[test]]
name = "scenario"
vm = "plain"
scenario = "hello"
output = "hello"

[[test]]
name = "cold-pass"
vm = "cold"
run = ["exit=7"]
exit_code = 7
"#;

#[test]
fn a_suite_reports_pass_fail_timeout_skip_with_junit_and_artifacts() {
    require_kvm();
    let (dir, _) = suite(MIXED);
    let junit = dir.path().join("junit.xml");
    let out = skiff_test(
        dir.path(),
        &[
            "--jobs",
            "2",
            "--junit",
            junit.to_str().unwrap(),
            "--artifacts",
            "art",
        ],
    );
    let stdout = text(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{stdout}\n{}",
        text(&out.stderr)
    );
    let v = verdicts(&out);
    let starts = |name: &str, word: &str| {
        assert!(v[name].starts_with(word), "{name}: {}\n{stdout}", v[name]);
    };
    starts("pass", "PASS");
    assert!(v["pass"].contains("fork"), "{}", v["pass"]);
    starts("echo", "PASS");
    starts("fail", "FAIL");
    assert!(v["fail"].contains("exit 3, expected 0"), "{}", v["fail"]);
    starts("timeout", "FAIL");
    assert!(v["timeout"].contains("timed out"), "{}", v["timeout"]);
    starts("dies", "FAIL");
    assert!(v["dies"].contains("the VM ended"), "{}", v["dies"]);
    starts("skipped", "SKIP");
    assert!(
        v["skipped"].contains("no-such-capability unmet"),
        "{}",
        v["skipped"]
    );
    starts("linux", "SKIP");
    assert!(v["linux"].contains("linux-userspace"), "{}", v["linux"]);
    starts("scenario", "PASS");
    starts("cold-pass", "PASS");
    assert!(v["cold-pass"].contains("cold"), "{}", v["cold-pass"]);
    assert!(stdout.contains("4 passed, 3 failed, 2 skipped"), "{stdout}");

    // JUnit, parsed back.
    let xml = std::fs::read_to_string(&junit).unwrap();
    let doc = roxmltree::Document::parse(&xml).unwrap();
    let root = doc.root_element();
    assert_eq!(root.tag_name().name(), "testsuites");
    assert_eq!(root.attribute("tests"), Some("9"));
    assert_eq!(root.attribute("failures"), Some("3"));
    assert_eq!(root.attribute("skipped"), Some("2"));
    let cases: BTreeMap<&str, roxmltree::Node> = doc
        .descendants()
        .filter(|n| n.has_tag_name("testcase"))
        .map(|n| (n.attribute("name").unwrap(), n))
        .collect();
    assert_eq!(cases.len(), 9);
    let child = |case: &str, tag: &str| {
        cases[case]
            .children()
            .find(|c| c.has_tag_name(tag))
            .and_then(|c| c.attribute("message"))
            .map(str::to_string)
    };
    assert!(child("fail", "failure").unwrap().contains("exit 3"));
    assert!(child("linux", "skipped")
        .unwrap()
        .contains("linux-userspace"));
    assert_eq!(child("pass", "failure"), None);

    // Artifacts of a failure.
    let fail_dir = dir.path().join("art/fail/attempt-1");
    for f in [
        "serial.log",
        "skiff-stderr.log",
        "stdout.log",
        "stderr.log",
        "agent-transcript.log",
        "result.txt",
    ] {
        assert!(
            fail_dir.join(f).exists(),
            "{f} missing in {}",
            fail_dir.display()
        );
    }
    let transcript = std::fs::read_to_string(fail_dir.join("agent-transcript.log")).unwrap();
    assert!(
        transcript.contains("Resume") && transcript.contains("exit 3"),
        "{transcript}"
    );
    let echo_out =
        std::fs::read_to_string(dir.path().join("art/echo/attempt-1/stdout.log")).unwrap();
    assert_eq!(echo_out, "hello runner\n");
    assert!(dir
        .path()
        .join("art/vm-fork/snapshot/manifest.json")
        .exists());
}

#[test]
fn require_turns_a_skip_into_a_failure() {
    require_kvm();
    let (dir, _) = suite(MIXED);
    let out = skiff_test(dir.path(), &["--filter", "^(linux|skipped)$"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stdout));
    let out = skiff_test(
        dir.path(),
        &[
            "--filter",
            "^(linux|skipped)$",
            "--require",
            "linux-userspace",
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    let v = verdicts(&out);
    assert!(v["linux"].starts_with("FAIL"), "{}", v["linux"]);
    assert!(
        v["linux"].contains("--require linux-userspace"),
        "{}",
        v["linux"]
    );
    assert!(v["skipped"].starts_with("SKIP"), "{}", v["skipped"]);
}

#[test]
fn retries_are_made_and_reported() {
    require_kvm();
    let (dir, _) = suite(
        "[[test]]\nname = \"flaky\"\nvm = \"fork\"\nrun = [\"exit=2\"]\nretries = 2\n\n\
         [[test]]\nname = \"shaky\"\nvm = \"fork\"\nrun = [\"exit=2\"]\nunstable = \"issue 99\"\n",
    );
    let out = skiff_test(dir.path(), &["--format", "jsonl", "--artifacts", "a"]);
    // An unstable case's failure does not fail the suite; the flaky one does.
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    let events: Vec<serde_json::Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let flaky = events.iter().find(|e| e["name"] == "flaky").unwrap();
    assert_eq!(flaky["attempts"], 3);
    assert_eq!(flaky["retried_failures"].as_array().unwrap().len(), 2);
    assert_eq!(flaky["outcome"], "fail");
    for n in 1..=3 {
        assert!(dir
            .path()
            .join(format!("a/flaky/attempt-{n}/result.txt"))
            .exists());
    }
    let shaky = events.iter().find(|e| e["name"] == "shaky").unwrap();
    assert_eq!(shaky["unstable"], "issue 99");
    assert_eq!(events.last().unwrap()["event"], "summary");
    assert_eq!(events.first().unwrap()["event"], "start");
}

fn listed(dir: &Path, args: &[&str]) -> Vec<String> {
    let mut all = vec!["--list"];
    all.extend_from_slice(args);
    let out = skiff_test(dir, &all);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    text(&out.stdout)
        .lines()
        .map(|l| l.split('\t').next().unwrap().to_string())
        .collect()
}

#[test]
fn list_filter_and_partitions_cover_the_suite_once() {
    let (dir, _) = suite(MIXED);
    let whole = listed(dir.path(), &[]);
    assert_eq!(whole.len(), 9);
    let out = skiff_test(dir.path(), &["--list"]);
    assert!(text(&out.stdout).contains("linux\tlinux\tskip: requires linux-userspace"));
    assert_eq!(
        listed(dir.path(), &["--filter", "^(pass|fail)$"]),
        ["pass", "fail"]
    );
    for n in 1..=4 {
        let mut seen: Vec<String> = Vec::new();
        for k in 1..=n {
            let slice = listed(dir.path(), &["--partition", &format!("{k}/{n}")]);
            assert!(!slice.is_empty(), "slice {k}/{n} is empty");
            seen.extend(slice);
        }
        let unique: BTreeSet<&String> = seen.iter().collect();
        assert_eq!(seen.len(), whole.len(), "overlap in {n} slices");
        assert_eq!(unique, whole.iter().collect(), "{n} slices");
    }
}

#[test]
fn forked_and_cold_cases_agree() {
    require_kvm();
    let mut tests = String::new();
    for (i, argv) in [
        "[\"exit=0\"]",
        "[\"exit=5\"]",
        "[\"signal=9\"]",
        "[\"echo\", \"x\"]",
        "[\"nope\"]",
    ]
    .iter()
    .enumerate()
    {
        for vm in ["fork", "cold"] {
            tests += &format!(
                "[[test]]\nname = \"{vm}-{i}\"\nvm = \"{vm}\"\nrun = {argv}\noutput = \"x\"\n\n"
            );
        }
    }
    let (dir, _) = suite(&tests);
    let out = skiff_test(dir.path(), &["--jobs", "2"]);
    let v = verdicts(&out);
    assert_eq!(v.len(), 10, "{}", text(&out.stdout));
    for i in 0..5 {
        let strip = |l: &str| {
            let (word, rest) = l.split_once(' ').unwrap();
            // The reason without the artifact path, which names the case.
            let reason = rest
                .split_once(": ")
                .map(|r| r.1.split(" (see ").next().unwrap().to_string());
            (word.to_string(), reason)
        };
        let (f, c) = (
            strip(&v[&format!("fork-{i}")]),
            strip(&v[&format!("cold-{i}")]),
        );
        assert_eq!(f, c, "case {i}: forked and cold differ");
    }
    assert!(v["fork-3"].starts_with("PASS"));
    assert!(v["fork-1"].contains("exit 5"));
}

#[test]
fn two_jobs_run_cases_at_the_same_time() {
    require_kvm();
    let mut tests = String::new();
    for i in 0..4 {
        tests += &format!(
            "[[test]]\nname = \"spin-{i}\"\nvm = \"fork\"\nrun = [\"spin\"]\ntimeout = 3\n\n"
        );
    }
    let (dir, _) = suite(&tests);
    let started = Instant::now();
    let out = skiff_test(dir.path(), &["--jobs", "2"]);
    let took = started.elapsed();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        verdicts(&out)
            .values()
            .filter(|l| l.contains("timed out"))
            .count(),
        4
    );
    // One at a time would take at least 4 x 3 s.
    assert!(took < Duration::from_secs(11), "{took:?}");
}

#[test]
fn a_failed_setup_fails_its_cases_without_running_them() {
    require_kvm();
    let (dir, file) = suite("[[test]]\nname = \"a\"\nvm = \"broken\"\nrun = [\"true\"]\n");
    let kernel = testguest().display().to_string();
    let mut s = std::fs::read_to_string(&file).unwrap();
    s = s.replace(
        "[[test]]",
        &format!("[vm.broken]\nkernel = {kernel:?}\nagent = \"testguest\"\nfork = true\nsetup = [[\"exit=4\"]]\n\n[[test]]"),
    );
    std::fs::write(&file, s).unwrap();
    let out = skiff_test(dir.path(), &[]);
    assert_eq!(out.status.code(), Some(1));
    let v = verdicts(&out);
    assert!(
        v["a"].contains("setup of vm \"broken\" failed"),
        "{}",
        v["a"]
    );
    assert!(v["a"].contains("exit 4"), "{}", v["a"]);
}

#[test]
fn snapshot_on_failure_restores_to_the_failed_vm() {
    require_kvm();
    let (dir, _) = suite("[[test]]\nname = \"bad\"\nvm = \"fork\"\nrun = [\"exit=9\"]\n");
    let out = skiff_test(dir.path(), &["--snapshot-on-failure"]);
    assert_eq!(out.status.code(), Some(1));
    let stdout = text(&out.stdout);
    let cmd = stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("restore the failed VM: "))
        .unwrap_or_else(|| panic!("no restore command in {stdout}"));
    let snapshot = Path::new(cmd.split(' ').nth(2).unwrap());
    assert!(snapshot.join("manifest.json").exists());
    let logs = tempfile::tempdir().unwrap();
    let mut vm = TestVm::fork(skiff_bin(), snapshot, logs.path()).unwrap();
    let run = vm.exec(&["exit=5"]).unwrap();
    assert_eq!(
        run.code(),
        Some(5),
        "the restored VM's agent did not run a command"
    );
}

#[test]
fn the_suite_watchdog_kills_the_vms_and_reports_the_rest_not_run() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let kernel = testguest().display().to_string();
    let mut text_file = format!(
        "watchdog = 3\n[vm.fork]\nkernel = {kernel:?}\nagent = \"testguest\"\nfork = true\n\n"
    );
    for i in 0..3 {
        text_file += &format!(
            "[[test]]\nname = \"spin-{i}\"\nvm = \"fork\"\nrun = [\"spin\"]\ntimeout = 8\n\n"
        );
    }
    std::fs::write(dir.path().join("skiff-test.toml"), text_file).unwrap();
    let started = Instant::now();
    let out = skiff_test(dir.path(), &["--junit", "junit.xml", "--artifacts", "art"]);
    let took = started.elapsed();
    let stdout = text(&out.stdout);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(10), "{stdout}\n{stderr}");
    // Killed at 3 s, not after the 8 s case timeout (let alone three of them).
    assert!(took < Duration::from_secs(8), "{took:?}");
    let v = verdicts(&out);
    assert!(v["spin-0"].starts_with("FAIL"), "{stdout}");
    assert!(
        v["spin-0"].contains("stopped: the suite watchdog (3.0 s) expired, its VM was killed"),
        "{}",
        v["spin-0"]
    );
    for name in ["spin-1", "spin-2"] {
        assert!(
            stdout.contains(&format!(
                "NOT-RUN {name}: not run: the suite watchdog (3.0 s) expired"
            )),
            "{stdout}"
        );
    }
    assert!(
        stdout.contains("0 passed, 1 failed, 0 skipped, 2 not run"),
        "{stdout}"
    );
    assert!(
        stderr.starts_with("skiff: the suite watchdog (3.0 s) expired")
            && stderr.contains("2 case(s) not run"),
        "{stderr}"
    );
    let xml = std::fs::read_to_string(dir.path().join("junit.xml")).unwrap();
    let doc = roxmltree::Document::parse(&xml).unwrap();
    assert_eq!(doc.root_element().attribute("errors"), Some("2"), "{xml}");
    // No VM outlives the run.
    assert_eq!(processes_mentioning(dir.path()), Vec::new());

    // --watchdog overrides the file's key: with 120 s the spin runs to its own timeout.
    let out = skiff_test(
        dir.path(),
        &[
            "--watchdog",
            "120",
            "--filter",
            "spin-0",
            "--artifacts",
            "art2",
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
}

#[test]
fn a_scenario_vm_that_does_not_boot_in_time_fails_with_its_serial_tail() {
    require_kvm();
    let (dir, file) = suite(
        "[[test]]\nname = \"never-ready\"\nvm = \"slow\"\nscenario = \"spin\"\ntimeout = 60\n\n\
         [[test]]\nname = \"ready\"\nvm = \"quick\"\nscenario = \"hello\"\noutput = \"hello\"\n",
    );
    let kernel = testguest().display().to_string();
    let mut s = std::fs::read_to_string(&file).unwrap();
    s = s.replacen(
        "[[test]]",
        &format!(
            "[vm.slow]\nkernel = {kernel:?}\nboot_timeout = 1\nready = \"never printed\"\n\n\
             [vm.quick]\nkernel = {kernel:?}\nboot_timeout = 30\nready = \"^testguest: boot \"\n\n[[test]]"
        ),
        1,
    );
    std::fs::write(&file, s).unwrap();
    let started = Instant::now();
    let out = skiff_test(dir.path(), &["--artifacts", "art"]);
    assert!(started.elapsed() < Duration::from_secs(30));
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    let v = verdicts(&out);
    let line = &v["never-ready"];
    assert!(line.starts_with("FAIL"), "{line}");
    assert!(
        line.contains("did not boot within 1.0 s (no serial line matched /never printed/"),
        "{line}"
    );
    assert!(
        line.contains("; serial: testguest: boot cmdline="),
        "{line}"
    );
    assert!(v["ready"].starts_with("PASS"), "{}", v["ready"]);
}

#[test]
fn a_fork_snapshot_that_fills_the_disk_is_one_line_and_its_own_code() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let kernel = testguest().display().to_string();
    // memcheck touches all 64 MiB before the agent listens: the snapshot cannot fit in 8 MiB.
    let suite_text = format!(
        "[vm.big]\nkernel = {kernel:?}\nagent = \"testguest\"\nfork = true\nmemory = \"size=64M\"\n\
         cmdline = \"memcheck\"\n\n[[test]]\nname = \"a\"\nvm = \"big\"\nrun = [\"true\"]\n"
    );
    std::fs::write(dir.path().join("s.toml"), suite_text).unwrap();
    let art = dir.path().join("art");
    std::fs::create_dir(&art).unwrap();
    let script = format!(
        "mount -t tmpfs -o size=8m skiff-test {} && exec \"$0\" test s.toml --artifacts {}",
        art.display(),
        art.display()
    );
    let out = Command::new("unshare")
        .current_dir(dir.path())
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .arg(skiff_bin())
        .output()
        .unwrap();
    let stderr = text(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(11),
        "{}\n{stderr}",
        text(&out.stdout)
    );
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("skiff: vm \"big\": its snapshot does not fit in ")
            && stderr.contains("the file system is full")
            && stderr.contains("No space left on device"),
        "{stderr}"
    );
    let v = verdicts(&out);
    assert!(v["a"].starts_with("FAIL"), "{}", v["a"]);
    assert!(v["a"].contains("case not run"), "{}", v["a"]);
}

#[test]
fn a_stateful_case_gives_the_same_result_forked_and_cold() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let kernel = testguest().display().to_string();
    let mut s = String::new();
    for (vm, fork) in [("state-fork", true), ("state-cold", false)] {
        s += &format!(
            "[vm.{vm}]\nkernel = {kernel:?}\nagent = \"testguest\"\nfork = {fork}\n\
             setup = [[\"put\", \"/state\", \"set\", \"up\", \"by\", \"setup\"]]\n\n"
        );
    }
    s += &format!("[vm.no-setup]\nkernel = {kernel:?}\nagent = \"testguest\"\nfork = true\n\n");
    for vm in ["state-fork", "state-cold", "no-setup"] {
        // In file order with one job: `overwrite` runs between the two reads, so the second read
        // shows whether one case's state leaks into the next.
        for (case, run) in [
            ("read", r#"["cat", "/state"]"#),
            ("overwrite", r#"["put", "/state", "changed"]"#),
            ("read-again", r#"["cat", "/state"]"#),
        ] {
            s += &format!(
                "[[test]]\nname = \"{vm}-{case}\"\nvm = \"{vm}\"\nrun = {run}\noutput = \"^(set up by setup\\n)?$\"\n\n"
            );
        }
    }
    std::fs::write(dir.path().join("skiff-test.toml"), s).unwrap();
    let out = skiff_test(
        dir.path(),
        &["--jobs", "1", "--format", "jsonl", "--artifacts", "art"],
    );
    let events: BTreeMap<String, serde_json::Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|e| e["event"] == "case")
        .map(|e| (e["name"].as_str().unwrap().to_string(), e))
        .collect();
    assert_eq!(events.len(), 9, "{}", text(&out.stdout));
    let stdout_of = |name: &str| {
        std::fs::read_to_string(dir.path().join(format!("art/{name}/attempt-1/stdout.log")))
            .unwrap()
    };
    for case in ["read", "overwrite", "read-again"] {
        let (f, c) = (
            &events[&format!("state-fork-{case}")],
            &events[&format!("state-cold-{case}")],
        );
        assert_eq!(f["forked"], true);
        assert_eq!(c["forked"], false);
        assert_eq!(f["outcome"], "pass", "{f}");
        assert_eq!(
            (&f["outcome"], &f["reason"]),
            (&c["outcome"], &c["reason"]),
            "{case}"
        );
        assert_eq!(
            stdout_of(&format!("state-fork-{case}")),
            stdout_of(&format!("state-cold-{case}")),
            "{case}"
        );
    }
    // The state came from setup, before the snapshot; the overwrite stayed in its own VM.
    assert_eq!(stdout_of("state-fork-read"), "set up by setup\n");
    assert_eq!(stdout_of("state-fork-read-again"), "set up by setup\n");
    // Without setup there is nothing to read.
    assert_eq!(events["no-setup-read"]["outcome"], "fail");
    assert!(events["no-setup-read"]["reason"]
        .as_str()
        .unwrap()
        .contains("exit 1"));
}

/// Runs `skiff test` on `body` and checks for one `skiff:` line with `needle` and `code`.
fn bad(dir: &Path, body: &str, args: &[&str], code: i32, needle: &str) {
    std::fs::write(dir.join("s.toml"), body).unwrap();
    let mut all = vec!["s.toml"];
    all.extend_from_slice(args);
    let out = skiff_test(dir, &all);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "{body}: {err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("skiff: ") && err.contains(needle),
        "{needle}: {err}"
    );
}

#[test]
fn bad_input_is_one_line_with_a_distinct_exit_code() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("k"), b"").unwrap();
    let vm = "[vm.a]\nkernel = \"k\"\n";
    let case = "[[test]]\nname = \"t\"\nvm = \"a\"\nscenario = \"hello\"\n";
    bad(d, "[vm.a\nkernel = 1\n", &[], 3, "s.toml:1:");
    bad(
        d,
        &format!("{vm}colour = \"red\"\n"),
        &[],
        4,
        "s.toml:3:1: unknown field `colour`",
    );
    bad(
        d,
        "[vm.a]\nkernel = \"missing\"\n",
        &[],
        5,
        "s.toml:2:10: kernel",
    );
    bad(d, "[vm.a]\ncpus = 1\n", &[], 3, "missing field `kernel`");
    bad(
        d,
        &format!("{vm}{case}requires = \"kvm & (\"\n"),
        &[],
        6,
        "s.toml:7:12: requires",
    );
    bad(
        d,
        &format!("{vm}{case}"),
        &["--filter", "nothing"],
        7,
        "no case of s.toml matches --filter",
    );
    std::fs::write(d.join("file"), b"").unwrap();
    bad(
        d,
        &format!("{vm}{case}"),
        &["--artifacts", "file/sub"],
        8,
        "artifact directory",
    );
    bad(
        d,
        &format!("{vm}{case}[[test]]\nname = \"u\"\nvm = \"zz\"\nscenario = \"x\"\n"),
        &[],
        9,
        "no vm \"zz\"",
    );
    let out = skiff_test(d, &["s.toml", "--partition", "3/2"]);
    assert_eq!(out.status.code(), Some(2));
}
