//! `state.bin`: the vCPU, VM and device state of a snapshot, and its on-disk encoding.
//!
//! Layout (little-endian):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `SKIFFSTA` |
//! | 8 | 4 | format version (`STATE_FORMAT_VERSION`) |
//! | 12 | 8 | payload length in bytes |
//! | 20 | 4 | CRC-32 (IEEE) of the payload |
//! | 24 | n | payload: `SnapshotState` in postcard encoding |
//!
//! The file is untrusted input: `decode` checks every length against the bytes it has before it
//! reads, the checksum before it parses, and the parsed state's sizes (`validate`) before anyone
//! uses them. It returns an error, never panics, on any input.

use devices::legacy::i8042::I8042State;
use devices::legacy::serial::SerialState;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::hypervisor::state::{StateError, VcpuState, VmState};
use crate::virtio_devices::VirtioFunctionState;

/// The state file's magic bytes.
pub const STATE_MAGIC: [u8; 8] = *b"SKIFFSTA";
/// The version of the state file's layout and payload.
/// Version 3: each virtio function's state is the device's own (`VirtioDeviceState`, a
/// disk's `io=` engine as configured) beside the transport's. Version 4: a vsock device's
/// state holds its next host port.
pub const STATE_FORMAT_VERSION: u32 = 4;
/// Bytes before the payload.
pub const HEADER_LEN: usize = 24;
/// Largest payload `decode` accepts (254 vCPUs with large XSAVE areas fit easily).
pub const MAX_PAYLOAD: u64 = 64 << 20;
/// Largest state file restore opens (checked before a byte is read).
pub const MAX_STATE_FILE_BYTES: u64 = HEADER_LEN as u64 + MAX_PAYLOAD;

/// Everything a snapshot holds besides guest memory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotState {
    /// One per vCPU, index = APIC ID.
    pub vcpus: Vec<VcpuState>,
    /// The VM's interrupt controllers, timer and clock.
    pub vm: VmState,
    /// The emulated devices.
    pub devices: DeviceStates,
}

/// The emulated devices' state. The debug-exit port has none.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceStates {
    /// COM1.
    pub serial: SerialState,
    /// The i8042 controller.
    pub i8042: I8042State,
    /// Every virtio PCI function, in bus order (the device rebuilt from its own state, the
    /// transport's checked against it on restore: `VirtioPciDevice::restore`).
    pub virtio: Vec<VirtioFunctionState>,
}

/// Why a state file cannot be used.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum StateFileError {
    /// Fewer bytes than the header.
    #[error("state file is truncated: {len} bytes, shorter than its {HEADER_LEN}-byte header")]
    TooShort {
        /// The file's length.
        len: usize,
    },
    /// Not a skiff state file.
    #[error("state file has magic {found:02x?}, not a skiff state file")]
    Magic {
        /// The first eight bytes.
        found: [u8; 8],
    },
    /// Another format version.
    #[error(
        "state file has format version {found}; this skiff reads version {STATE_FORMAT_VERSION} only (take the snapshot again with this skiff)"
    )]
    Version {
        /// The file's version.
        found: u32,
    },
    /// The header's length does not match the file.
    #[error("state file is truncated or has trailing bytes: header says {declared} payload bytes, file has {actual}")]
    Length {
        /// Payload length in the header.
        declared: u64,
        /// Bytes after the header.
        actual: usize,
    },
    /// The checksum does not match.
    #[error(
        "state file is corrupt: CRC-32 {actual:#010x} does not match the recorded {expected:#010x}"
    )]
    Checksum {
        /// Recorded.
        expected: u32,
        /// Computed.
        actual: u32,
    },
    /// The payload does not parse.
    #[error("state file payload does not parse: {0}")]
    Parse(String),
    /// The payload parsed but holds unusable values.
    #[error("state file holds an invalid state")]
    Invalid(#[source] StateError),
    /// The state does not fit the manifest.
    #[error("state file holds {found} vCPUs but the manifest says {expected}")]
    VcpuCount {
        /// In the manifest.
        expected: u32,
        /// In the state.
        found: usize,
    },
    /// Encoding failed (only on write).
    #[error("cannot encode the snapshot state: {0}")]
    Encode(String),
}

/// Encodes `state` as a complete state file.
pub fn encode(state: &SnapshotState) -> Result<Vec<u8>, StateFileError> {
    let payload = postcard::to_stdvec(state).map_err(|e| StateFileError::Encode(e.to_string()))?;
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&STATE_MAGIC);
    out.extend_from_slice(&STATE_FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

fn array<const N: usize>(bytes: &[u8], at: usize) -> [u8; N] {
    let mut out = [0u8; N];
    if let Some(src) = bytes.get(at..at + N) {
        out.copy_from_slice(src);
    }
    out
}

/// Decodes and checks a state file.
pub fn decode(bytes: &[u8]) -> Result<SnapshotState, StateFileError> {
    if bytes.len() < HEADER_LEN {
        return Err(StateFileError::TooShort { len: bytes.len() });
    }
    let magic: [u8; 8] = array(bytes, 0);
    if magic != STATE_MAGIC {
        return Err(StateFileError::Magic { found: magic });
    }
    let version = u32::from_le_bytes(array(bytes, 8));
    if version != STATE_FORMAT_VERSION {
        return Err(StateFileError::Version { found: version });
    }
    let declared = u64::from_le_bytes(array(bytes, 12));
    let payload = &bytes[HEADER_LEN..];
    if declared > MAX_PAYLOAD || declared != payload.len() as u64 {
        return Err(StateFileError::Length {
            declared,
            actual: payload.len(),
        });
    }
    let expected = u32::from_le_bytes(array(bytes, 20));
    let actual = crc32fast::hash(payload);
    if expected != actual {
        return Err(StateFileError::Checksum { expected, actual });
    }
    let (state, rest): (SnapshotState, _) =
        postcard::take_from_bytes(payload).map_err(|e| StateFileError::Parse(e.to_string()))?;
    if !rest.is_empty() {
        return Err(StateFileError::Parse(format!(
            "{} unexpected bytes after the state",
            rest.len()
        )));
    }
    for vcpu in &state.vcpus {
        vcpu.validate().map_err(StateFileError::Invalid)?;
    }
    state.vm.validate().map_err(StateFileError::Invalid)?;
    Ok(state)
}

/// Checks the state against the manifest's vCPU count.
pub fn check_vcpus(state: &SnapshotState, expected: u32) -> Result<(), StateFileError> {
    if usize::try_from(expected).ok() != Some(state.vcpus.len()) {
        return Err(StateFileError::VcpuCount {
            expected,
            found: state.vcpus.len(),
        });
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::hypervisor::state::{
        ClockState, CpuidLeaf, DebugRegisters, FpuState, IoapicState, MsrValue, PicState, PitState,
        VcpuEvents, Xcr, IOAPIC_PINS, LAPIC_PAGE_SIZE, XSAVE_LEGACY_SIZE,
    };

    pub(crate) fn sample_state() -> SnapshotState {
        let vcpu = VcpuState {
            cpuid: vec![CpuidLeaf {
                function: 0,
                index: 0,
                significant_index: false,
                eax: 0xd,
                ebx: 1,
                ecx: 2,
                edx: 3,
            }],
            mp_state: 0,
            regs: arch::regs::StandardRegisters {
                rip: 0x10_0000,
                rflags: 0x202,
                ..Default::default()
            },
            sregs: arch::regs::SpecialRegisters::default(),
            interrupt_bitmap: [0; 4],
            fpu: FpuState::default(),
            xsave: Some((0..XSAVE_LEGACY_SIZE).map(|i| i as u8).collect()),
            xcrs: vec![Xcr { index: 0, value: 7 }],
            debug_regs: DebugRegisters::default(),
            lapic: vec![0x5a; LAPIC_PAGE_SIZE],
            msrs: (0..40)
                .map(|i| MsrValue {
                    index: 0xc000_0000 + i,
                    data: u64::from(i) << 40,
                })
                .collect(),
            events: VcpuEvents::default(),
            tsc_khz: Some(2_500_000),
        };
        SnapshotState {
            vcpus: vec![vcpu.clone(), vcpu],
            vm: VmState {
                pic_master: PicState::default(),
                pic_slave: PicState::default(),
                ioapic: IoapicState {
                    base_address: 0xfec0_0000,
                    ioregsel: 0,
                    id: 0,
                    irr: 0,
                    redirection_table: vec![0x1_0000; IOAPIC_PINS],
                },
                pit: PitState::default(),
                clock: ClockState {
                    clock_ns: 1_000_000,
                    tsc_stable: true,
                },
            },
            devices: DeviceStates {
                serial: SerialState {
                    baud_divisor_low: 12,
                    baud_divisor_high: 0,
                    interrupt_enable: 0,
                    interrupt_identification: 1,
                    line_control: 3,
                    line_status: 0x60,
                    modem_control: 8,
                    modem_status: 0xb0,
                    scratch: 0,
                    rx_fifo: vec![],
                },
                i8042: I8042State {
                    ccb: 0x45,
                    output_port: 3,
                    pending_command: None,
                    output: vec![],
                    last_output: 0,
                    port_b: 0,
                },
                virtio: vec![sample_virtio_state()],
            },
        }
    }

    /// A running virtio-blk function's state, with every part filled in.
    pub(crate) fn sample_virtio_state() -> VirtioFunctionState {
        use devices::pci::config_space::ConfigSpaceState;
        use devices::pci::msix::{MsixEntryState, MsixState};
        use devices::virtio::blk::{BlkState, IoEngineKind};
        use devices::virtio::transport::{
            CommonConfigState, QueueSetupState, SignalsState, VirtioPciState,
        };
        use devices::virtio::QueueProgress;
        VirtioFunctionState {
            device: crate::virtio_devices::VirtioDeviceState::Blk(BlkState {
                path: "/var/tmp/disk.img".into(),
                readonly: false,
                id: Some("disk0".into()),
                queues: 1,
                engine: IoEngineKind::IoUring,
            }),
            transport: VirtioPciState {
                config: ConfigSpaceState {
                    bytes: (0..=255).collect(),
                },
                msix: MsixState {
                    entries: vec![
                        MsixEntryState {
                            address_low: 0xfee0_0000,
                            address_high: 0,
                            data: 0x41,
                            control: 0,
                        };
                        2
                    ],
                    pending: vec![0b10],
                },
                common: CommonConfigState {
                    device_feature_select: 1,
                    driver_feature_select: 1,
                    driver_features: 1 << 32,
                    status: 0xf,
                    queue_select: 0,
                    queues: vec![QueueSetupState {
                        size: 128,
                        desc: 0x10_0000,
                        driver: 0x10_1000,
                        device: 0x10_2000,
                        enabled: true,
                    }],
                },
                signals: SignalsState {
                    config_vector: 1,
                    queue_vectors: vec![0],
                    isr: 1,
                    needs_reset: false,
                    config_generation: 0,
                },
                progress: vec![QueueProgress {
                    index: 0,
                    next_avail: 300,
                    next_used: 299,
                }],
            },
        }
    }

    #[test]
    fn round_trip() {
        let s = sample_state();
        let bytes = encode(&s).unwrap();
        assert_eq!(&bytes[..8], b"SKIFFSTA");
        assert_eq!(decode(&bytes).unwrap(), s);
        assert_eq!(check_vcpus(&s, 2), Ok(()));
        assert!(check_vcpus(&s, 1).is_err());
    }

    #[test]
    fn each_damage_gives_its_own_error() {
        let bytes = encode(&sample_state()).unwrap();
        assert!(matches!(
            decode(&bytes[..10]),
            Err(StateFileError::TooShort { len: 10 })
        ));
        assert!(matches!(
            decode(&bytes[..bytes.len() - 1]),
            Err(StateFileError::Length { .. })
        ));
        let mut b = bytes.clone();
        b[0] = b'X';
        assert!(matches!(decode(&b), Err(StateFileError::Magic { .. })));
        let mut b = bytes.clone();
        b[8] = 5;
        assert_eq!(decode(&b), Err(StateFileError::Version { found: 5 }));
        b[8] = 3;
        assert_eq!(
            decode(&b),
            Err(StateFileError::Version { found: 3 }),
            "a version 3 file (a vsock state without its next host port) is refused"
        );
        b[8] = 1;
        assert_eq!(
            decode(&b),
            Err(StateFileError::Version { found: 1 }),
            "a version 1 file (no device state) is refused"
        );
        let mut b = bytes.clone();
        let last = b.len() - 1;
        b[last] ^= 0x10;
        assert!(matches!(decode(&b), Err(StateFileError::Checksum { .. })));
        let mut b = bytes;
        b.push(0);
        assert!(matches!(decode(&b), Err(StateFileError::Length { .. })));
    }

    /// A payload with a valid checksum but nonsense inside must fail to parse or validate.
    fn with_payload(payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&STATE_MAGIC);
        out.extend_from_slice(&STATE_FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
        out.extend_from_slice(payload);
        out
    }

    /// A small deterministic generator (xorshift), so failures reproduce.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    #[test]
    fn random_and_bit_flipped_input_never_panics() {
        let good = encode(&sample_state()).unwrap();
        let payload = good[HEADER_LEN..].to_vec();
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut parsed_ok = 0;
        for round in 0..3000 {
            let mut p = payload.clone();
            match round % 3 {
                // Flip a few bits anywhere in the payload.
                0 => {
                    for _ in 0..1 + rng.next() % 4 {
                        let i = (rng.next() as usize) % p.len();
                        p[i] ^= 1 << (rng.next() % 8);
                    }
                }
                // Cut it short.
                1 => p.truncate((rng.next() as usize) % p.len()),
                // Pure noise of random length.
                _ => {
                    let n = (rng.next() % 4096) as usize;
                    p = (0..n).map(|_| rng.next() as u8).collect();
                }
            }
            if decode(&with_payload(&p)).is_ok() {
                parsed_ok += 1;
            }
            // Unfixed checksum: must always be rejected (unless nothing changed).
            let mut raw = good.clone();
            let i = HEADER_LEN + (rng.next() as usize) % payload.len();
            raw[i] ^= 1 << (rng.next() % 8);
            assert!(decode(&raw).is_err(), "bit flip at {i} not detected");
            // Random header garbage never panics either.
            let n = (rng.next() % 64) as usize;
            let noise: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
            assert!(decode(&noise).is_err());
        }
        // Some flips land in plain values and still parse; that is fine, the point is no panic.
        assert!(parsed_ok < 3000);
    }

    #[test]
    fn huge_length_claims_are_refused_without_allocating() {
        // A vector length prefix claiming 2^60 entries.
        let payload = [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x0f];
        assert!(matches!(
            decode(&with_payload(&payload)),
            Err(StateFileError::Parse(_))
        ));
    }
}
