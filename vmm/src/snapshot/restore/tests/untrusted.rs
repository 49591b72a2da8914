//! A snapshot is untrusted input: each kind of bad file, layout, resource, MAC and override is
//! refused with one line naming it, and an override wins over what the state names.

use super::*;

#[test]
fn a_symlink_or_special_file_as_a_memory_file_is_refused() {
    let root = tempfile::tempdir().unwrap();
    let d = root.path().join("snap");
    std::fs::create_dir(&d).unwrap();
    write_sample(&d);
    let outside = root.path().join("host-file");
    File::create(&outside).unwrap().set_len(8 << 20).unwrap();
    std::fs::remove_file(d.join("memory-0.bin")).unwrap();
    std::os::unix::fs::symlink(&outside, d.join("memory-0.bin")).unwrap();
    let e = load_err(&d);
    assert!(e.contains("memory-0.bin is a symbolic link"), "{e}");
    // A link to a file inside the directory is refused just the same.
    File::create(d.join("real.bin"))
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    std::fs::remove_file(d.join("memory-0.bin")).unwrap();
    std::os::unix::fs::symlink("real.bin", d.join("memory-0.bin")).unwrap();
    assert!(load_err(&d).contains("is a symbolic link"));
    std::fs::remove_file(d.join("memory-0.bin")).unwrap();
    mkfifo(&d.join("memory-0.bin"));
    let e = load_err(&d);
    assert!(e.contains("is a FIFO, not a regular file"), "{e}");
    std::fs::remove_file(d.join("memory-0.bin")).unwrap();
    std::fs::create_dir(d.join("memory-0.bin")).unwrap();
    assert!(load_err(&d).contains("is a directory, not a regular file"));
}

#[test]
fn a_fifo_manifest_or_state_file_is_refused_without_blocking() {
    let d = tempfile::tempdir().unwrap();
    write_sample(d.path());
    std::fs::rename(d.path().join(STATE_FILE), d.path().join("state.saved")).unwrap();
    mkfifo(&d.path().join(STATE_FILE));
    let started = std::time::Instant::now();
    let e = load_err(d.path());
    assert!(
        e.contains("cannot read state file") && e.contains("is a FIFO"),
        "{e}"
    );
    std::fs::remove_file(d.path().join(MANIFEST_FILE)).unwrap();
    mkfifo(&d.path().join(MANIFEST_FILE));
    let e = load_err(d.path());
    assert!(e.contains("manifest.json is a FIFO"), "{e}");
    assert!(started.elapsed() < std::time::Duration::from_secs(2));
}

#[test]
fn a_2_gib_state_file_is_refused_before_it_is_read() {
    let d = tempfile::tempdir().unwrap();
    write_sample(d.path());
    let state = d.path().join(STATE_FILE);
    File::options()
        .write(true)
        .open(&state)
        .unwrap()
        .set_len(2 << 30)
        .unwrap();
    edit_manifest(d.path(), |m| m["state"]["size"] = (2u64 << 30).into());
    let started = std::time::Instant::now();
    let e = load_err(d.path());
    assert!(
        e.contains("is 2147483648 bytes, larger than a state file may be"),
        "{e}"
    );
    assert!(
        started.elapsed() < std::time::Duration::from_millis(500),
        "took {:?}",
        started.elapsed()
    );
    // A manifest larger than its limit likewise.
    File::options()
        .write(true)
        .open(d.path().join(MANIFEST_FILE))
        .unwrap()
        .set_len(2 << 30)
        .unwrap();
    assert!(load_err(d.path()).contains("larger than a manifest may be"));
}

#[test]
fn regions_must_be_the_layout_and_memory_must_fit_the_host() {
    let d = tempfile::tempdir().unwrap();
    write_sample(d.path());
    edit_manifest(d.path(), |m| {
        m["memory"][0]["guest_address"] = 0xe000_0000u64.into()
    });
    let e = load_err(d.path());
    assert!(
        e.contains("[0xe0000000+0x800000] are not the layout of a 0x800000-byte VM [0x0+0x800000]"),
        "{e}"
    );
    // A VM larger than the host, laid out as `run` would: refused like `run` refuses it.
    let size = (crate::builder::host_ram_bytes() + (1 << 30)) & !((2 << 20) - 1);
    let ranges = arch::layout::ram_ranges(size).unwrap();
    edit_manifest(d.path(), |m| {
        m["vm"]["memory_size"] = size.into();
        m["memory"] = ranges
            .iter()
            .enumerate()
            .map(|(i, r)| {
                serde_json::json!({"guest_address": r.start, "size": r.size,
                    "file": format!("memory-{i}.bin"), "page_size": 4096, "method": "sparse-copy"})
            })
            .collect();
    });
    let e = load_err(d.path());
    assert!(e.contains("exceeds the host's"), "{e}");
}

#[test]
fn an_edited_state_naming_another_host_file_is_refused_and_an_override_wins() {
    let d = tempfile::tempdir().unwrap();
    write_sample(d.path());
    assert_eq!(
        load_ok(d.path()).authentication,
        Authentication::Authenticated
    );
    // Edit the state: the disk now points at a host file; CRC and manifest fixed up to match
    // (resources too), as an attacker would. The MAC no longer matches.
    let mut state = sample_state();
    if let VirtioDeviceState::Blk(disk) = &mut state.devices.virtio[0].device {
        disk.path = "/etc/shadow".into();
    }
    write_snapshot(d.path(), manifest::tests::sample(), &state, None);
    let snap = load_ok(d.path());
    let e = crate::error_chain(&authorize(&snap, &ResourceOverrides::default()).unwrap_err());
    assert_eq!(
        e,
        format!(
            "snapshot {} is not authenticated for this user (it carries no MAC); refusing to \
             open disk \"disk0\" at /etc/shadow (name it again with --disk id=disk0,path=PATH)",
            d.path().display()
        )
    );
    // Sealed by another user's key: refused too.
    let other = SnapshotKey::from_bytes([1; KEY_BYTES]);
    write_snapshot(d.path(), manifest::tests::sample(), &state, Some(&other));
    let snap = load_ok(d.path());
    let e = crate::error_chain(&authorize(&snap, &ResourceOverrides::default()).unwrap_err());
    assert!(
        e.contains("does not match this user's key") && e.contains("/etc/shadow"),
        "{e}"
    );
    // Without any key: refused.
    let snap = load(d.path(), None).unwrap();
    assert!(authorize(&snap, &ResourceOverrides::default()).is_err());
    // Named again: allowed, and the device opens the override.
    let overrides = ResourceOverrides {
        disks: vec![("disk0".into(), "/tmp/mine.img".into())],
        ..Default::default()
    };
    let plan = authorize(&snap, &overrides).unwrap();
    assert_eq!(
        plan.host_opens,
        [HostResource::Disk {
            id: "disk0".into(),
            path: "/tmp/mine.img".into(),
            readonly: false
        }]
    );
    assert!(
        matches!(&plan.devices[0].device, VirtioDeviceState::Blk(disk) if disk.path == Path::new("/tmp/mine.img"))
    );
    // An override wins for an authenticated snapshot too.
    write_sample(d.path());
    let plan = authorize(&load_ok(d.path()), &overrides).unwrap();
    assert_eq!(plan.host_opens[0].location(), "/tmp/mine.img");
    // An unknown id is an error.
    let bad = ResourceOverrides {
        nets: vec![("net0".into(), "tap1".into())],
        ..Default::default()
    };
    let e = crate::error_chain(&authorize(&load_ok(d.path()), &bad).unwrap_err());
    assert!(
        e.contains("--net id=\"net0\": the snapshot has no net device with that id (it has: none)"),
        "{e}"
    );
}

#[test]
fn the_first_refused_resource_is_named_in_bus_order_and_each_kind_has_its_option() {
    let d = tempfile::tempdir().unwrap();
    write_snapshot(
        d.path(),
        manifest::tests::sample(),
        &three_resource_state(),
        None,
    );
    File::create(d.path().join("memory-0.bin"))
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    let snap = load_ok(d.path());
    let mut o = ResourceOverrides::default();
    let err = |o: &ResourceOverrides| crate::error_chain(&authorize(&snap, o).unwrap_err());
    assert!(err(&o).contains("refusing to open disk \"disk0\""));
    o.disks.push(("disk0".into(), "/d".into()));
    assert!(err(&o).contains("refusing to open net \"net0\" at tap \"tap-victim\" (name it again with --net id=net0,tap=TAP)"), "{}", err(&o));
    o.nets.push(("net0".into(), "tap1".into()));
    assert!(err(&o).contains("vhost-user \"vhost-user0\" at /run/v.sock (name it again with --vhost-user id=vhost-user0,socket=PATH)"));
    o.vhost_user.push(("vhost-user0".into(), "/s".into()));
    let plan = authorize(&snap, &o).unwrap();
    assert_eq!(plan.host_opens.len(), 3);
    o.disks.push(("disk0".into(), "/e".into()));
    assert!(err(&o).contains("given twice"));
}

#[test]
fn an_unauthenticated_snapshot_without_host_resources_restores() {
    let d = tempfile::tempdir().unwrap();
    write_snapshot(d.path(), manifest::tests::sample(), &rng_only_state(), None);
    File::create(d.path().join("memory-0.bin"))
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    let snap = load(d.path(), None).unwrap();
    assert!(!snap.authentication.is_authenticated());
    let plan = authorize(&snap, &ResourceOverrides::default()).unwrap();
    assert!(plan.host_opens.is_empty() && plan.parents.is_empty());
    // A manifest hiding a resource the state names is refused.
    write_snapshot(d.path(), manifest::tests::sample(), &sample_state(), None);
    edit_manifest(d.path(), |m| {
        m["resources"].as_array_mut().unwrap().remove(0);
    });
    assert!(load_err(d.path()).contains("its resources list"));
}

#[test]
fn an_unauthenticated_diffs_parent_is_opened_only_when_named() {
    let root = tempfile::tempdir().unwrap();
    let (base, diff) = (root.path().join("base"), root.path().join("diff"));
    std::fs::create_dir(&base).unwrap();
    std::fs::create_dir(&diff).unwrap();
    write_sample(&base);
    let crc = crc32fast::hash(&std::fs::read(base.join(MANIFEST_FILE)).unwrap());
    let mut m = manifest::tests::sample();
    m.format_version = DIFF_FORMAT_VERSION;
    m.parent = Some(ParentRef {
        dir: base.clone(),
        manifest_crc32: crc,
    });
    write_snapshot(&diff, m, &rng_only_state(), None);
    File::create(diff.join("memory-0.bin"))
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    let snap = load_ok(&diff);
    let e = crate::error_chain(&authorize(&snap, &ResourceOverrides::default()).unwrap_err());
    assert!(
        e.contains(&format!(
            "refusing to open parent \"parent\" at {} (name it again with --parent DIR)",
            base.display()
        )),
        "{e}"
    );
    let o = ResourceOverrides {
        parent: Some(base.clone()),
        ..Default::default()
    };
    let plan = authorize(&snap, &o).unwrap();
    assert_eq!(plan.parents.len(), 1);
    assert_eq!(plan.host_opens, [HostResource::Parent { path: base }]);
}
