//! Live and diff snapshots end to end, with the `counter` test guest rewriting its 16 MiB buffer
//! all the time: a live snapshot taken while it runs restores into one uninterrupted run with
//! its memory consistent (the guest checks every page against its ledger); a chain of a full
//! snapshot and two diffs restores the same way, and so does the chain merged into one full
//! snapshot; a diff whose parent is missing or changed, a diff with no earlier snapshot, and a
//! snapshot requested while a live one runs are each refused with one clear error.

#![cfg(unix)] // KVM tests: Linux only (the Windows build compiles them to nothing)
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::path::Path;
use std::time::{Duration, Instant};

use skiff_tests::require_kvm;

mod snapshot_support;
use snapshot_support::*;

/// Reads a snapshot's manifest.
fn manifest(dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap()
}

#[test]
fn a_live_snapshot_of_a_guest_dirtying_memory_restores_consistently() {
    let root = tempfile::tempdir().unwrap();
    let (mut vm, sock) = start_counter(root.path(), &[]);
    vm.wait_for_line("testguest: counter 3 ", T);
    let snap = root.path().join("live");
    let s = ctl_ok(
        &sock,
        &["snapshot", snap.to_str().unwrap(), "--live", "--stop"],
    );
    assert_eq!(s["kind"], "full");
    assert_eq!(s["stopped"], true);
    let live = &s["live"];
    let passes = live["passes"].as_array().unwrap();
    // The first pass copies the touched memory (the 16 MiB buffer and the image); at least one
    // more pass copies what the guest rewrote meanwhile.
    assert!(passes.len() >= 2, "{s}");
    assert!(passes[0]["bytes"].as_u64().unwrap() >= 16 << 20, "{s}");
    assert!(passes[1]["pages"].as_u64().unwrap() > 0, "{s}");
    assert!(live["final_pass"]["pages"].as_u64().is_some(), "{s}");
    let blackout = s["blackout_ms"].as_f64().unwrap();
    assert!(
        blackout > 0.0 && blackout < 500.0,
        "blackout {blackout} ms: {s}"
    );
    assert!(blackout < s["time_ms"].as_f64().unwrap());
    let r = vm.wait(T);
    r.assert_code(0);
    assert_eq!(manifest(&snap)["format_version"], 1);
    assert_one_run(&r.stdout, &restore(&snap, &[]));
    assert_one_run(&r.stdout, &restore(&snap, &["--memory-mode", "copy"]));
}

#[test]
fn a_chain_of_full_diff_diff_restores_and_merges() {
    let root = tempfile::tempdir().unwrap();
    let (mut vm, sock) = start_counter(root.path(), &[]);
    // No earlier snapshot: nothing to diff against.
    let early = root.path().join("early");
    vm.wait_for_line("testguest: counter 1 ", T);
    let (code, _, err) = ctl(&sock, &["snapshot", early.to_str().unwrap(), "--diff"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("no earlier snapshot of this VM to diff against"),
        "{err}"
    );
    assert!(err.contains("HTTP 409"), "{err}");
    assert!(!early.exists());

    let full = root.path().join("full");
    let d1 = root.path().join("d1");
    let d2 = root.path().join("d2");
    let s = ctl_ok(&sock, &["snapshot", full.to_str().unwrap()]);
    assert_eq!(
        (s["kind"].as_str(), s["stopped"].as_bool()),
        (Some("full"), Some(false))
    );
    vm.wait_for_line("testguest: counter 3 ", T);
    assert_eq!(
        ctl_ok(&sock, &["status"])["diff_parent"],
        full.to_str().unwrap()
    );
    // A live diff in the middle, a paused one at the end.
    let s1 = ctl_ok(
        &sock,
        &["snapshot", d1.to_str().unwrap(), "--diff", "--live"],
    );
    assert_eq!(s1["kind"], "diff");
    assert_eq!(s1["parent"], full.to_str().unwrap());
    assert_eq!(s1["regions"][0]["method"], "dirty-pages");
    vm.wait_for_line("testguest: counter 5 ", T);
    let s2 = ctl_ok(
        &sock,
        &["snapshot", d2.to_str().unwrap(), "--diff", "--stop"],
    );
    assert_eq!(s2["parent"], d1.to_str().unwrap());
    let r = vm.wait(T);
    r.assert_code(0);
    // The guest rewrites its buffer, so a diff holds about 16 MiB, but not the guest image and
    // page tables the full snapshot holds, nor the untouched rest of 256 MiB.
    let diff_bytes = s2["regions"][0]["copied_bytes"].as_u64().unwrap();
    let full_bytes = s["regions"][0]["copied_bytes"].as_u64().unwrap();
    assert!(
        (16 << 20..full_bytes).contains(&diff_bytes),
        "diff {diff_bytes} vs full {full_bytes}"
    );
    let m = manifest(&d2);
    assert_eq!(m["format_version"], 2);
    assert_eq!(m["parent"]["dir"], d1.to_str().unwrap());

    assert_one_run(&r.stdout, &restore(&d2, &[]));
    assert_one_run(&r.stdout, &restore(&d2, &["--memory-mode", "copy"]));

    // Merged into one full snapshot in d2's place: no parents needed any more.
    let merged = root.path().join("merged");
    copy_dir(&d2, &merged);
    let out = std::process::Command::new(skiff_tests::skiff_bin())
        .args(["snapshot-merge", merged.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["layers"], 3);
    assert_eq!(manifest(&merged)["format_version"], 1);
    assert!(manifest(&merged).get("parent").is_none());
    // A copy of d2 that filled its holes with zeros would restore zero pages over the
    // parents' data: refused.
    let filled = root.path().join("filled");
    std::fs::create_dir(&filled).unwrap();
    for f in ["manifest.json", "state.bin", "memory-0.bin"] {
        let data = std::fs::read(d2.join(f)).unwrap();
        std::fs::write(filled.join(f), data).unwrap();
    }
    assert_restore_fails(&filled, "without keeping its holes");
    std::fs::rename(&full, root.path().join("full-moved")).unwrap();
    assert_one_run(&r.stdout, &restore(&merged, &[]));

    // The unmerged d2 now misses its base.
    assert_restore_fails(&d2, "is missing or unreadable");
    std::fs::rename(root.path().join("full-moved"), &full).unwrap();
    // A changed parent: d1's manifest edited (a different snapshot in the same place).
    let mut m1 = manifest(&d1);
    m1["notes"] = serde_json::json!(["edited"]);
    std::fs::write(d1.join("manifest.json"), m1.to_string()).unwrap();
    assert_restore_fails(&d2, "has changed since the diff was taken");
}

/// Copies a snapshot directory keeping its memory files' holes (a diff's holes mean "the
/// parent's page").
fn copy_dir(from: &Path, to: &Path) {
    let ok = std::process::Command::new("cp")
        .args(["-r", "--sparse=auto"])
        .arg(from)
        .arg(to)
        .status()
        .unwrap()
        .success();
    assert!(ok, "cp failed");
}

#[test]
fn a_snapshot_requested_while_a_live_one_runs_is_a_conflict() {
    require_kvm();
    let root = tempfile::tempdir().unwrap();
    // memcheck writes every page of 1 GiB, so the first pass copies 1 GiB and takes a while.
    let (vm, sock) = start_touched_1gib(root.path());
    let snap = root.path().join("big");
    let first = {
        let (sock, snap) = (sock.clone(), snap.clone());
        std::thread::spawn(move || ctl(&sock, &["snapshot", snap.to_str().unwrap(), "--live"]))
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, body) = http(&sock, "GET", "/vm", "");
        if body["snapshot_in_progress"].as_bool().unwrap_or(false) {
            // Live: the guest keeps running while memory is copied.
            assert_eq!(body["state"], "running");
            break;
        }
        assert!(Instant::now() < deadline, "the snapshot never started");
        assert!(!first.is_finished(), "the snapshot ended too soon");
        std::thread::sleep(Duration::from_millis(2));
    }
    let second = root.path().join("second");
    let (status, body) = http(
        &sock,
        "PUT",
        "/vm/snapshot",
        &format!(r#"{{"dir": "{}", "live": true}}"#, second.display()),
    );
    assert_eq!(status, 409, "{body}");
    assert!(body["error"]
        .as_str()
        .unwrap()
        .contains("already being written"));
    let (code, out, err) = first.join().unwrap();
    assert_eq!(code, 0, "{err}");
    let s: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(s["bytes_written"].as_u64().unwrap() > 1000 << 20, "{s}");
    assert!(s["blackout_ms"].as_f64().unwrap() < 500.0, "{s}");
    assert!(!second.exists());
    assert_eq!(ctl_ok(&sock, &["status"])["state"], "running");
    ctl_ok(&sock, &["shutdown"]);
    vm.wait(T).assert_code(0);
}
