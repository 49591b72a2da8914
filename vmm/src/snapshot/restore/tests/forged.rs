//! Property: random damage to a snapshot directory never panics, never opens or maps anything
//! that is not the snapshot's.

use super::*;

/// A small deterministic generator (xorshift), so failures reproduce.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// How the base snapshot of a round was sealed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Base {
    /// Disk, net and vhost-user, sealed by another user's key.
    Foreign,
    /// Only an rng, no MAC.
    NoResources,
    /// Disk, net and vhost-user, sealed with this user's key.
    Own,
}

/// Rewrites the state file with its header CRC recomputed, and the manifest's size and CRC to
/// match (and, when the payload still decodes, its resource list), as a forger would.
fn fix_up(dir: &Path, payload: &[u8], relist: bool) {
    use crate::snapshot::state_file::{HEADER_LEN, STATE_FORMAT_VERSION, STATE_MAGIC};
    let mut bytes = Vec::with_capacity(HEADER_LEN + payload.len());
    bytes.extend_from_slice(&STATE_MAGIC);
    bytes.extend_from_slice(&STATE_FORMAT_VERSION.to_le_bytes());
    bytes.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    let crc = crc32fast::hash(payload);
    bytes.extend_from_slice(&crc.to_le_bytes());
    bytes.extend_from_slice(payload);
    std::fs::write(dir.join(STATE_FILE), &bytes).unwrap();
    let decoded = state_file::decode(&bytes).ok();
    edit_manifest(dir, |m| {
        if !m["state"].is_object() {
            return;
        }
        m["state"]["size"] = (bytes.len() as u64).into();
        m["state"]["crc32"] = crc.into();
        if let (true, Some(state)) = (relist, decoded) {
            if let Ok(manifest) = serde_json::from_value::<SnapshotManifest>(m.clone()) {
                m["resources"] = serde_json::to_value(resources::list(&manifest, &state)).unwrap();
            }
        }
    });
}

fn mutate_state(rng: &mut Rng, dir: &Path, outside: &Path) {
    use crate::snapshot::state_file::HEADER_LEN;
    let bytes = std::fs::read(dir.join(STATE_FILE)).unwrap();
    let mut payload = bytes[HEADER_LEN..].to_vec();
    match rng.below(4) {
        0 => {
            for _ in 0..1 + rng.below(4) {
                let i = rng.below(payload.len());
                payload[i] ^= 1 << rng.below(8);
            }
        }
        1 => payload.truncate(rng.below(payload.len())),
        2 => {
            let n = rng.below(64);
            payload.extend((0..n).map(|_| rng.next() as u8));
        }
        _ => {
            // A well-formed state naming host resources: what an attacker really writes.
            let mut state = state_file::decode(&bytes).unwrap_or_else(|_| rng_only_state());
            let path = outside.to_path_buf();
            let saved = match rng.below(4) {
                0 => VirtioDeviceState::Blk(BlkState {
                    path,
                    readonly: rng.below(2) == 0,
                    id: None,
                    queues: 1,
                    engine: IoEngineKind::Auto,
                }),
                1 => VirtioDeviceState::Net(NetState {
                    tap: "evil0".into(),
                    mac: [2, 0, 0, 0, 0, 9],
                }),
                2 => VirtioDeviceState::VhostUser(devices::vhost_user::VhostUserState {
                    config: devices::vhost_user::VhostUserConfig::new(
                        devices::vhost_user::VhostUserKind::Blk,
                        path,
                    ),
                }),
                _ => VirtioDeviceState::Rng(RngState),
            };
            let mut device = sample_virtio_state();
            device.device = saved;
            if state.devices.virtio.is_empty() || rng.below(2) == 0 {
                state.devices.virtio.push(device);
            } else {
                let i = rng.below(state.devices.virtio.len());
                state.devices.virtio[i] = device;
            }
            payload = encode(&state).unwrap()[HEADER_LEN..].to_vec();
        }
    }
    fix_up(dir, &payload, rng.below(4) != 0);
}

fn mutate_manifest(rng: &mut Rng, dir: &Path, outside: &Path, victim: &Path, victim_crc: u32) {
    let path = dir.join(MANIFEST_FILE);
    if rng.below(6) == 0 {
        // Raw byte damage.
        let mut text = std::fs::read(&path).unwrap();
        for _ in 0..1 + rng.below(3) {
            let i = rng.below(text.len());
            text[i] = rng.next() as u8;
        }
        std::fs::write(&path, text).unwrap();
        return;
    }
    let names = [
        "../memory-0.bin",
        "/etc/passwd",
        "link",
        "inside-link",
        "fifo",
        "sub",
        "memory-0.bin",
        "state.bin",
        "manifest.json",
        "",
    ];
    let outside_str = outside.display().to_string();
    let huge = crate::builder::host_ram_bytes().saturating_mul(4) & !0xfff;
    edit_manifest(dir, |m| {
        // Earlier damage may have changed the shape; index only a well-shaped manifest.
        let shaped = m["memory"]
            .as_array()
            .is_some_and(|a| a.first().is_some_and(|r| r.is_object()))
            && m["state"].is_object()
            && m["vm"].is_object();
        mutate_shaped(
            rng,
            m,
            shaped,
            &names,
            &outside_str,
            huge,
            victim,
            victim_crc,
        );
    });
}

#[allow(clippy::too_many_arguments)]
fn mutate_shaped(
    rng: &mut Rng,
    m: &mut serde_json::Value,
    shaped: bool,
    names: &[&str],
    outside_str: &str,
    huge: u64,
    victim: &Path,
    victim_crc: u32,
) {
    let choice = if shaped { rng.below(12) } else { 11 };
    match choice {
        0 => m["memory"][0]["file"] = (*rng.pick(names)).into(),
        1 => m["state"]["file"] = (*rng.pick(names)).into(),
        2 => {
            m["memory"][0]["guest_address"] =
                (*rng.pick(&[0xe000_0000u64, 0xc000_0000, 0x1_0000_0000, 0x1000, 0])).into()
        }
        3 => m["memory"][0]["size"] = (*rng.pick(&[4096u64, 16 << 20, 1 << 40, 0])).into(),
        4 => {
            let size = *rng.pick(&[huge, 1u64 << 40, 16 << 30, 4 << 20]);
            m["vm"]["memory_size"] = size.into();
            m["memory"][0]["size"] = size.into();
        }
        5 => {
            m["format_version"] = 2.into();
            m["parent"] = serde_json::json!({"dir": victim, "manifest_crc32": victim_crc});
            m["memory"][0]["data_bytes"] = 0.into();
        }
        6 => {
            m["resources"] = serde_json::json!([
                {"kind": "disk", "id": "disk0", "path": outside_str, "readonly": false}
            ])
        }
        7 => m["resources"] = serde_json::json!([]),
        8 => {
            let hex: String = (0..64).map(|_| format!("{:x}", rng.below(16))).collect();
            m["authentication"] = hex.into();
        }
        9 => {
            m["vm"]["kernel"] = outside_str.into();
            m["vm"]["memory_file"] = outside_str.into();
        }
        10 => {
            let extra = m["memory"][0].clone();
            m["memory"].as_array_mut().unwrap().push(extra);
        }
        _ => {
            let keys: Vec<String> = m.as_object().unwrap().keys().cloned().collect();
            let key = rng.pick(&keys).clone();
            m[key.as_str()] = match rng.below(3) {
                0 => serde_json::Value::Null,
                1 => (rng.next() as u32).into(),
                _ => "x".into(),
            };
        }
    }
}

/// (device, inode) of every regular file directly in `dir`.
fn own_files(dir: &Path) -> Vec<(u64, u64)> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| std::fs::symlink_metadata(e.unwrap().path()).unwrap())
        .filter(|m| m.file_type().is_file())
        .map(|m| (m.dev(), m.ino()))
        .collect()
}

#[test]
fn a_thousand_forged_snapshots_never_panic_open_outside_or_map_foreign_files() {
    let root = tempfile::tempdir().unwrap();
    let outside = root.path().join("host-secret.img");
    File::create(&outside).unwrap().set_len(8 << 20).unwrap();
    // This user's own snapshot, which a forged diff may name as its parent.
    let victim = root.path().join("victim");
    std::fs::create_dir(&victim).unwrap();
    write_sample(&victim);
    let victim_crc = crc32fast::hash(&std::fs::read(victim.join(MANIFEST_FILE)).unwrap());
    let other = SnapshotKey::from_bytes([0x11; KEY_BYTES]);
    let own_resources = resources::list(&manifest::tests::sample(), &three_resource_state());
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let (mut loaded, mut authorized) = (0, 0);
    for round in 0..1000 {
        let base = *rng.pick(&[Base::Foreign, Base::NoResources, Base::Own]);
        let dir = root.path().join(format!("round-{round}"));
        std::fs::create_dir(&dir).unwrap();
        let (state, key) = match base {
            Base::Foreign => (three_resource_state(), Some(&other)),
            Base::NoResources => (rng_only_state(), None),
            Base::Own => (three_resource_state(), None),
        };
        let own_key = test_key();
        let key = if base == Base::Own {
            Some(&own_key)
        } else {
            key
        };
        write_snapshot(&dir, manifest::tests::sample(), &state, key);
        File::create(dir.join("memory-0.bin"))
            .unwrap()
            .set_len(8 << 20)
            .unwrap();
        std::os::unix::fs::symlink(&outside, dir.join("link")).unwrap();
        std::os::unix::fs::symlink("memory-0.bin", dir.join("inside-link")).unwrap();
        mkfifo(&dir.join("fifo"));
        std::fs::create_dir(dir.join("sub")).unwrap();
        for _ in 0..1 + rng.below(3) {
            if rng.below(2) == 0 {
                mutate_state(&mut rng, &dir, &outside);
            } else {
                mutate_manifest(&mut rng, &dir, &outside, &victim, victim_crc);
            }
        }
        let own = own_files(&dir);
        let Ok(snap) = load(&dir, Some(&test_key())) else {
            std::fs::remove_dir_all(&dir).unwrap();
            continue;
        };
        loaded += 1;
        for f in &snap.memory_files {
            assert!(
                own.contains(&f.identity) && f.path.parent() == Some(dir.as_path()),
                "round {round}: memory file {} is not the snapshot's own",
                f.path.display()
            );
        }
        if let Ok(plan) = authorize(&snap, &ResourceOverrides::default()) {
            authorized += 1;
            match base {
                // Whatever was forged, nothing outside the directory is opened...
                Base::Foreign | Base::NoResources => {
                    assert!(
                        plan.host_opens.is_empty() && plan.parents.is_empty(),
                        "round {round} ({base:?}): would open {:?}",
                        plan.host_opens
                    );
                }
                // ...and an authenticated snapshot opens only what its owner sealed.
                Base::Own => {
                    for r in &plan.host_opens {
                        assert!(own_resources.contains(r), "round {round}: would open {r:?}");
                    }
                    assert!(plan.parents.is_empty(), "round {round}");
                }
            }
            // The memory it would map is the files `load` opened; building it must not panic.
            let _ = build_ram(&snap, &plan.parents, MemoryMode::Cow, 32);
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
    // The rounds reach every stage: some forgeries load, some are even allowed (harmlessly).
    eprintln!("loaded {loaded}, authorized {authorized}");
    assert!(
        loaded > 100 && authorized > 20,
        "loaded {loaded}, authorized {authorized}"
    );
}
