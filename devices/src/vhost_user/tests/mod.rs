//! Frontend tests against scripted fake backends on a socket pair: the handshake and what the
//! device offers the guest, refusals (too few queues, a rejected memory table), a backend that
//! hangs up while the driver uses the device, the enable barrier for a backend without
//! `REPLY_ACK`, stopping the rings for a snapshot (where they restart, a position no backend
//! could report), the dirty log (switched on and off with the rings logged; refused without
//! `LOG_SHMFD` or `VHOST_F_LOG_ALL`), and a property test feeding random replies to the
//! handshake (it must fail cleanly, never panic or hang). The scripted backend and its helpers
//! live here; `reconnect`, `log_reconnect` and `interrupts` hold the tests of reconnects, of a
//! restart while the dirty log is on, and of where a backend's interrupts go; `dirty_log` runs
//! the log end to end against skiff's own backend.

#![allow(clippy::unwrap_used)]

mod dirty_log;
mod interrupts;
mod log_reconnect;
mod reconnect;

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::config::{SharedMemoryRegion, VhostUserConfig, VhostUserKind};
use super::connection::{Connection, VhostUserError};
use super::device::VhostUserDevice;
use crate::virtio::device::{ActivateContext, DeviceSignals, QueueProgress, VirtioDevice};
use crate::virtio::test_support::{guest_memory, DriverQueue, RecordingSignals, TestLoop};

const GET_FEATURES: u32 = 1;
const SET_FEATURES: u32 = 2;
const SET_MEM_TABLE: u32 = 5;
const SET_LOG_BASE: u32 = 6;
const SET_VRING_ADDR: u32 = 9;
const SET_VRING_BASE: u32 = 10;
const GET_VRING_BASE: u32 = 11;
const SET_VRING_CALL: u32 = 13;
const GET_PROTOCOL_FEATURES: u32 = 15;
const GET_QUEUE_NUM: u32 = 17;
const SET_VRING_ENABLE: u32 = 18;
const GET_CONFIG: u32 = 24;
const NEED_REPLY: u32 = 0x8;

const VERSION_1: u64 = 1 << 32;
const PROTOCOL_FEATURES: u64 = 1 << 30;
const RING_PACKED: u64 = 1 << 34;
const BLK_SIZE_MAX: u64 = 1 << 1;
const BLK_FLUSH: u64 = 1 << 9;
const PF_MQ: u64 = 1 << 0;
const PF_REPLY_ACK: u64 = 1 << 3;
const PF_CONFIG: u64 = 1 << 9;
const PF_LOG_SHMFD: u64 = 1 << 1;
const LOG_ALL: u64 = 1 << 26;

/// How the scripted backend answers.
#[derive(Clone)]
struct Script {
    features: u64,
    protocol: u64,
    queue_num: u64,
    config: Vec<u8>,
    /// The acknowledgement value for `SET_MEM_TABLE` (0 = accepted).
    mem_table_ack: u64,
    /// The `GET_VRING_BASE` answer (none: 0, the request's own value).
    vring_base: Option<u32>,
    /// File descriptors sent along with every `GET_FEATURES` reply (a reply carries none).
    attach_fds: usize,
    /// Writes 1 to every call eventfd `SET_VRING_CALL` hands over, as a backend that used
    /// buffers would.
    signal_calls: bool,
}

impl Script {
    fn good() -> Self {
        let mut config = vec![0u8; 60];
        config[..8].copy_from_slice(&8192u64.to_le_bytes());
        Self {
            features: VERSION_1 | PROTOCOL_FEATURES | RING_PACKED | BLK_SIZE_MAX | BLK_FLUSH,
            protocol: PF_MQ | PF_REPLY_ACK | PF_CONFIG,
            queue_num: 4,
            config,
            mem_table_ack: 0,
            vring_base: None,
            attach_fds: 0,
            signal_calls: false,
        }
    }
}

fn reply(stream: &mut UnixStream, code: u32, body: &[u8]) {
    let mut msg = Vec::new();
    msg.extend_from_slice(&code.to_le_bytes());
    msg.extend_from_slice(&0x5u32.to_le_bytes());
    msg.extend_from_slice(&(body.len() as u32).to_le_bytes());
    msg.extend_from_slice(body);
    let _ = stream.write_all(&msg);
}

/// A reply with `fds` descriptors (of one eventfd) attached as `SCM_RIGHTS`.
fn reply_with_fds(stream: &UnixStream, code: u32, body: &[u8], fds: usize) {
    use std::os::fd::AsRawFd;
    let event = vmm_sys_util::eventfd::EventFd::new(0).unwrap();
    let raw = vec![event.as_raw_fd(); fds];
    let mut msg = Vec::new();
    msg.extend_from_slice(&code.to_le_bytes());
    msg.extend_from_slice(&0x5u32.to_le_bytes());
    msg.extend_from_slice(&(body.len() as u32).to_le_bytes());
    msg.extend_from_slice(body);
    let _ = stream.send_with_fds(&[&msg[..]], &raw);
}

/// Serves `script` on `stream` until the frontend hangs up or `stop_after` requests were seen;
/// returns the requests (code and body) it saw.
fn run_script(mut stream: UnixStream, script: Script, stop_after: usize) -> Requests {
    let mut seen = Vec::new();
    for _ in 0..stop_after {
        let mut hdr = [0u8; 12];
        let fd = match stream.recv_with_fd(&mut hdr) {
            Ok((12, fd)) => fd,
            Ok((n, fd)) if n > 0 && stream.read_exact(&mut hdr[n..]).is_ok() => fd,
            _ => return seen,
        };
        let code = u32::from_le_bytes(hdr[0..4].try_into().unwrap());
        let flags = u32::from_le_bytes(hdr[4..8].try_into().unwrap());
        let size = u32::from_le_bytes(hdr[8..12].try_into().unwrap());
        let mut body = vec![0u8; size as usize];
        if stream.read_exact(&mut body).is_err() {
            return seen;
        }
        seen.push((code, body.clone()));
        if let (SET_VRING_CALL, true, Some(mut call)) = (code, script.signal_calls, fd) {
            let _ = call.write_all(&1u64.to_le_bytes());
        }
        match code {
            GET_FEATURES if script.attach_fds > 0 => reply_with_fds(
                &stream,
                code,
                &script.features.to_le_bytes(),
                script.attach_fds,
            ),
            GET_FEATURES => reply(&mut stream, code, &script.features.to_le_bytes()),
            GET_PROTOCOL_FEATURES => reply(&mut stream, code, &script.protocol.to_le_bytes()),
            GET_QUEUE_NUM => reply(&mut stream, code, &script.queue_num.to_le_bytes()),
            GET_CONFIG => {
                let mut out = body[..12].to_vec();
                let len = u32::from_le_bytes(body[4..8].try_into().unwrap()) as usize;
                let mut cfg = script.config.clone();
                cfg.resize(len, 0);
                out.extend_from_slice(&cfg);
                reply(&mut stream, code, &out);
            }
            GET_VRING_BASE => {
                let mut state = body[..8].to_vec();
                if let Some(base) = script.vring_base {
                    state[4..].copy_from_slice(&base.to_le_bytes());
                }
                reply(&mut stream, code, &state)
            }
            // The log's size and offset come back (`LOG_SHMFD`'s reply).
            SET_LOG_BASE => reply(&mut stream, code, &body[..16.min(body.len())]),
            SET_MEM_TABLE if flags & NEED_REPLY != 0 => {
                reply(&mut stream, code, &script.mem_table_ack.to_le_bytes())
            }
            _ if flags & NEED_REPLY != 0 => reply(&mut stream, code, &0u64.to_le_bytes()),
            _ => {}
        }
    }
    seen
}

/// The requests (code, body) one connection saw.
type Requests = Vec<(u32, Vec<u8>)>;

/// The body of the first request with `code` among `seen`.
fn body_of(seen: &[(u32, Vec<u8>)], code: u32) -> Option<&[u8]> {
    seen.iter()
        .find(|(c, _)| *c == code)
        .map(|(_, body)| body.as_slice())
}
type Served = JoinHandle<Requests>;

fn start(script: Script, stop_after: usize) -> (UnixStream, Served) {
    let (ours, theirs) = UnixStream::pair().unwrap();
    ours.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    let backend = std::thread::spawn(move || run_script(theirs, script, stop_after));
    (ours, backend)
}

fn memfd_region() -> SharedMemoryRegion {
    let file = tempfile::tempfile().unwrap();
    file.set_len(1 << 20).unwrap();
    SharedMemoryRegion {
        guest_address: 0,
        size: 1 << 20,
        host_address: 0x7f00_0000_0000,
        fd: OwnedFd::from(file),
        file_offset: 0,
    }
}

fn blk_config() -> VhostUserConfig {
    VhostUserConfig::new(VhostUserKind::Blk, "/fake.sock")
}

fn device(script: Script, stop_after: usize, events: &TestLoop) -> (VhostUserDevice, Served) {
    let (stream, backend) = start(script, stop_after);
    let cfg = blk_config();
    let conn = Connection::handshake(Path::new("/fake.sock"), stream, cfg.queues).unwrap();
    let dev = VhostUserDevice::from_connection(&cfg, conn, vec![memfd_region()], events.endpoint())
        .unwrap();
    (dev, backend)
}

#[test]
fn offers_the_backend_features_the_transport_can_carry_and_its_config() {
    let events = TestLoop::new();
    let (dev, _backend) = device(Script::good(), usize::MAX, &events);
    assert_eq!(dev.device_type(), 2);
    // Protocol-features bit, packed rings and a SIZE_MAX contradicted by size_max 0 are cut.
    assert_eq!(dev.device_features(), VERSION_1 | BLK_FLUSH);
    let mut capacity = [0u8; 8];
    dev.read_config(0, &mut capacity);
    assert_eq!(u64::from_le_bytes(capacity), 8192);
    let mut beyond = [0xffu8; 4];
    dev.read_config(4096, &mut beyond);
    assert_eq!(beyond, [0; 4]);
}

#[test]
fn too_few_backend_queues_and_a_rejected_memory_table_are_refused() {
    let mut script = Script::good();
    script.queue_num = 1;
    let (stream, _backend) = start(script, usize::MAX);
    let e = Connection::handshake(Path::new("/fake.sock"), stream, 2).unwrap_err();
    assert!(
        matches!(
            e,
            VhostUserError::TooManyQueues {
                offered: 1,
                requested: 2,
                ..
            }
        ),
        "{e}"
    );

    let mut script = Script::good();
    script.mem_table_ack = 1;
    let (stream, _backend) = start(script, usize::MAX);
    let cfg = blk_config();
    let conn = Connection::handshake(Path::new("/fake.sock"), stream, 1).unwrap();
    let events = TestLoop::new();
    let e = VhostUserDevice::from_connection(&cfg, conn, vec![memfd_region()], events.endpoint())
        .unwrap_err();
    assert!(
        e.to_string().contains("rejected the guest memory table"),
        "{e}"
    );
}

#[test]
fn a_backend_that_hangs_up_while_active_marks_the_device_broken() {
    // Handshake (owner, features, protocol features twice, queue count, config, memory
    // table), then activation (features, memory table, 6 ring messages), then hang up.
    let mut events = TestLoop::new();
    let (mut dev, backend) = device(Script::good(), 7 + 8, &events);
    let mem = guest_memory(1 << 20);
    let driver = DriverQueue::new(&mem, 0x1_0000, 16);
    let signals = Arc::new(RecordingSignals::default());
    activate_at(&mut dev, &driver, &mem, &signals, &events, 0);
    backend.join().unwrap();
    for _ in 0..20 {
        events.wait(50);
        if signals.needs_reset() {
            break;
        }
    }
    assert!(signals.needs_reset(), "the hang-up was not noticed");
    // The next activation fails at once instead of talking to a dead socket.
    dev.reset();
    let (queue, _kick) = driver.activated(0);
    let e = dev
        .activate(ActivateContext {
            mem: mem.clone(),
            acked_features: VERSION_1,
            queues: vec![queue],
            signals: signals.clone(),
            event_loop: events.endpoint(),
        })
        .unwrap_err();
    assert!(e.to_string().contains("vhost-user-blk"), "{e}");
}

/// A small deterministic generator (xorshift64*), so failures reproduce from the seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// A reply that is partly right: a real code or not, odd flags, a size that may lie, a body
/// of noise, or a header cut short.
fn random_reply(rng: &mut Rng, request: u32) -> Vec<u8> {
    let code = match rng.next() % 3 {
        0 => request,
        1 => (rng.next() % 64) as u32,
        _ => rng.next() as u32,
    };
    let flags = match rng.next() % 3 {
        0 => 0x5,
        1 => 0x1,
        _ => rng.next() as u32,
    };
    let body_len = match rng.next() % 4 {
        0 => 8,
        1 => rng.next() % 300,
        2 => 0,
        _ => 12 + 60,
    } as usize;
    let claimed = match rng.next() % 3 {
        0 => body_len as u32,
        1 => rng.next() as u32,
        _ => (rng.next() % 0x1000) as u32,
    };
    let mut msg = Vec::new();
    msg.extend_from_slice(&code.to_le_bytes());
    msg.extend_from_slice(&flags.to_le_bytes());
    msg.extend_from_slice(&claimed.to_le_bytes());
    for _ in 0..body_len {
        msg.push(rng.next() as u8);
    }
    if rng.next().is_multiple_of(8) {
        msg.truncate((rng.next() % 12) as usize);
    }
    msg
}

#[test]
fn random_replies_never_panic_the_frontend() {
    for seed in 1..=150u64 {
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        ours.set_read_timeout(Some(std::time::Duration::from_millis(100)))
            .unwrap();
        // Answer the first few requests well and then badly, so every step gets garbage.
        let good_replies = (rng.next() % 6) as usize;
        let backend = std::thread::spawn(move || {
            let script = Script::good();
            for n in 0..12 {
                let mut hdr = [0u8; 12];
                if theirs.read_exact(&mut hdr).is_err() {
                    return;
                }
                let code = u32::from_le_bytes(hdr[0..4].try_into().unwrap());
                let size = u32::from_le_bytes(hdr[8..12].try_into().unwrap());
                let mut body = vec![0u8; size as usize];
                if theirs.read_exact(&mut body).is_err() {
                    return;
                }
                let answer = match (n < good_replies, code) {
                    (true, GET_FEATURES) => Some(script.features),
                    (true, GET_PROTOCOL_FEATURES) => Some(script.protocol),
                    (true, GET_QUEUE_NUM) => Some(script.queue_num),
                    _ => None,
                };
                match answer {
                    Some(v) => reply(&mut theirs, code, &v.to_le_bytes()),
                    None if code == 3 => {} // SET_OWNER has no reply
                    None => {
                        let _ = theirs.write_all(&random_reply(&mut rng, code));
                        if rng.next().is_multiple_of(4) {
                            return; // hang up
                        }
                    }
                }
            }
        });
        let cfg = blk_config();
        let timeout = std::time::Duration::from_millis(200);
        let path = Path::new("/fake.sock");
        let events = TestLoop::new();
        let result = Connection::handshake_with_timeout(path, ours, 1, timeout).and_then(|conn| {
            VhostUserDevice::from_connection(&cfg, conn, vec![memfd_region()], events.endpoint())
        });
        // Whatever the outcome, the device (if any) answers config reads within bounds.
        if let Ok(dev) = result {
            let mut buf = [0u8; 8];
            dev.read_config(0, &mut buf);
            dev.read_config(u64::MAX, &mut buf);
            assert_eq!(dev.device_features() & (PROTOCOL_FEATURES | RING_PACKED), 0);
        }
        backend.join().unwrap();
    }
}

/// One reply message: code, flags "version 1, reply", size, body.
fn reply_bytes(code: u32, body: &[u8]) -> Vec<u8> {
    let mut msg = Vec::new();
    msg.extend_from_slice(&code.to_le_bytes());
    msg.extend_from_slice(&0x5u32.to_le_bytes());
    msg.extend_from_slice(&(body.len() as u32).to_le_bytes());
    msg.extend_from_slice(body);
    msg
}

/// Every reply `fuzzing::frontend_replies` needs, well formed, in order.
fn well_formed_reply_stream() -> Vec<u8> {
    let u64_reply = |code: u32, v: u64| reply_bytes(code, &v.to_le_bytes());
    let ack = |code: u32| u64_reply(code, 0);
    let mut config = vec![0u8; 12];
    config[4..8].copy_from_slice(&60u32.to_le_bytes());
    config.extend_from_slice(&[0u8; 60]);
    let mut stream = [
        u64_reply(GET_FEATURES, VERSION_1 | PROTOCOL_FEATURES | BLK_FLUSH),
        u64_reply(GET_PROTOCOL_FEATURES, PF_MQ | PF_REPLY_ACK | PF_CONFIG),
        u64_reply(GET_QUEUE_NUM, 4),
        reply_bytes(GET_CONFIG, &config),
        ack(SET_MEM_TABLE),
        ack(2), // SET_FEATURES
    ]
    .concat();
    // SET_VRING_NUM, ADDR, BASE, CALL, KICK, ENABLE; then ENABLE 0 and GET_VRING_BASE.
    for code in [8, 9, 10, 13, 12, 18, 18] {
        stream.extend(ack(code));
    }
    stream.extend(reply_bytes(GET_VRING_BASE, &[1, 0, 0, 0, 7, 0, 0, 0]));
    stream.extend(ack(25)); // SET_CONFIG
    stream
}

#[test]
fn the_fuzz_entry_point_completes_on_good_replies_and_fails_cleanly_on_cut_ones() {
    let stream = well_formed_reply_stream();
    assert_eq!(super::fuzzing::frontend_replies(&stream), 7);
    for cut in (0..stream.len()).step_by(5) {
        assert!(
            super::fuzzing::frontend_replies(&stream[..cut]) < 7,
            "cut at {cut}"
        );
    }
    let mut flipped = stream.clone();
    flipped[4] ^= 0x4; // the first reply without its reply flag
    assert_eq!(super::fuzzing::frontend_replies(&flipped), 0);
}

#[test]
fn a_configuration_space_skiff_built_is_read_only_to_the_driver() {
    // virtiofsd has no GET_CONFIG: skiff builds virtio-fs's tag and queue count, and a driver
    // writing over them changes nothing.
    let mut script = Script::good();
    script.protocol = PF_MQ | PF_REPLY_ACK;
    script.features = VERSION_1 | PROTOCOL_FEATURES;
    let (stream, _backend) = start(script, usize::MAX);
    let mut cfg = VhostUserConfig::new(VhostUserKind::Fs, "/fake.sock");
    cfg.queues = 2;
    cfg.tag = Some("share".into());
    let conn = Connection::handshake(Path::new("/fake.sock"), stream, cfg.queues).unwrap();
    let events = TestLoop::new();
    let mut dev =
        VhostUserDevice::from_connection(&cfg, conn, vec![memfd_region()], events.endpoint())
            .unwrap();
    dev.write_config(0, b"evil\0");
    dev.write_config(36, &9u32.to_le_bytes());
    let mut tag = [0u8; 6];
    dev.read_config(0, &mut tag);
    assert_eq!(&tag, b"share\0");
    let mut queues = [0u8; 4];
    dev.read_config(36, &mut queues);
    assert_eq!(u32::from_le_bytes(queues), 1);
}

#[test]
fn without_reply_ack_activation_waits_for_the_backend_to_apply_the_enable() {
    // SET_VRING_ENABLE is one-way without REPLY_ACK; a backend reading kicks on another thread
    // drops a kick that beats the enable, so activation ends with a request that has a reply.
    let mut script = Script::good();
    script.protocol = PF_MQ | PF_CONFIG;
    let events = TestLoop::new();
    let (mut dev, backend) = device(script, usize::MAX, &events);
    let mem = guest_memory(1 << 20);
    let driver = DriverQueue::new(&mem, 0x1_0000, 16);
    let signals = Arc::new(RecordingSignals::default());
    activate_at(&mut dev, &driver, &mem, &signals, &events, 0);
    drop(dev);
    let seen: Vec<u32> = backend.join().unwrap().iter().map(|r| r.0).collect();
    let enable = seen.iter().rposition(|&c| c == SET_VRING_ENABLE);
    let enable = enable.unwrap_or_else(|| panic!("no SET_VRING_ENABLE in {seen:?}"));
    assert_eq!(seen.get(enable + 1), Some(&GET_FEATURES), "{seen:?}");
}

// ---- Snapshots: `quiesce` stops the rings, the resume restarts them ----

/// Activates `dev` on the driver's queue 0, continuing at `next_avail`.
fn activate_at(
    dev: &mut VhostUserDevice,
    driver: &DriverQueue<'_>,
    mem: &crate::guest_memory::TrackedGuestMemory,
    signals: &Arc<impl DeviceSignals + 'static>,
    events: &TestLoop,
    next_avail: u16,
) {
    use virtio_queue::QueueT;
    let (mut queue, _kick) = driver.activated(0);
    queue.queue.set_next_avail(next_avail);
    dev.activate(ActivateContext {
        mem: mem.clone(),
        acked_features: VERSION_1,
        queues: vec![queue],
        signals: signals.clone(),
        event_loop: events.endpoint(),
    })
    .unwrap();
}

#[test]
fn quiesce_stops_each_ring_and_the_resume_restarts_it_at_the_backend_position() {
    // Handshake (7), activation (8), the stop (enable 0, GET_VRING_BASE), the resume (8).
    let script = Script {
        vring_base: Some(7),
        ..Script::good()
    };
    let events = TestLoop::new();
    let (mut dev, backend) = device(script, 7 + 8 + 2 + 8, &events);
    let mem = guest_memory(1 << 20);
    let driver = DriverQueue::new(&mem, 0x1_0000, 16);
    let signals = Arc::new(RecordingSignals::default());
    activate_at(&mut dev, &driver, &mem, &signals, &events, 0);
    // The backend completed 7 requests, every one it took.
    driver.set_used_idx(7);
    signals.take_notified();
    let progress = dev.quiesce().expect("the device was active");
    assert_eq!(
        progress,
        vec![QueueProgress {
            index: 0,
            next_avail: 7,
            next_used: 7
        }]
    );
    assert_eq!(
        signals.take_notified(),
        vec![0],
        "one notification per queue"
    );
    assert!(dev.quiesce().is_none(), "nothing active any more");
    activate_at(&mut dev, &driver, &mem, &signals, &events, 7);
    let seen = backend.join().unwrap();
    let codes: Vec<u32> = seen.iter().map(|(c, _)| *c).collect();
    let get = codes
        .iter()
        .position(|&c| c == GET_VRING_BASE)
        .expect("stopped");
    assert_eq!(
        codes[get - 1],
        SET_VRING_ENABLE,
        "disabled first: {codes:?}"
    );
    let set = body_of(&seen[get..], SET_VRING_BASE).expect("restarted");
    assert_eq!(
        &set[..8],
        &[0, 0, 0, 0, 7, 0, 0, 0],
        "at the backend's position"
    );
    assert!(!signals.needs_reset());
    drop(dev);
}

#[test]
fn a_stop_position_no_backend_could_report_fails_the_device() {
    // 40 entries past a used index of 0 on a 16-entry queue.
    let script = Script {
        vring_base: Some(40),
        ..Script::good()
    };
    let events = TestLoop::new();
    let (mut dev, backend) = device(script, 7 + 8 + 2, &events);
    let mem = guest_memory(1 << 20);
    let driver = DriverQueue::new(&mem, 0x1_0000, 16);
    let signals = Arc::new(RecordingSignals::default());
    activate_at(&mut dev, &driver, &mem, &signals, &events, 0);
    assert!(dev.quiesce().is_none(), "no position to resume at");
    assert!(signals.needs_reset(), "the device failed instead");
    backend.join().unwrap();
}

#[test]
fn the_saved_state_is_the_configuration_and_writes_are_untracked() {
    let events = TestLoop::new();
    let (dev, _backend) = device(Script::good(), 7, &events);
    assert_eq!(
        crate::persist::Persist::save(&dev),
        crate::vhost_user::VhostUserState {
            config: blk_config()
        }
    );
    assert!(dev
        .untracked_writes()
        .is_some_and(|why| why.contains("dirty log")));
}

/// Descriptors open in this process.
fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

#[test]
fn a_reply_carrying_file_descriptors_fails_cleanly_and_leaks_none() {
    // No reply the frontend asks for carries descriptors: a backend that attaches some (a few,
    // or as many as the protocol allows in one message) is refused at once, never a panic or a
    // wait, and every descriptor it pushed is closed again.
    // Other tests run in this process meanwhile, so the count moves a little; a leak here
    // would keep all 3 * (1 + 8 + 32) = 123 descriptors.
    let before = open_fds();
    for fds in [1, 8, 32] {
        for _ in 0..3 {
            let script = Script {
                attach_fds: fds,
                ..Script::good()
            };
            let (stream, backend) = start(script, usize::MAX);
            let e = Connection::handshake(Path::new("/fake.sock"), stream, 1).unwrap_err();
            assert!(e.to_string().contains("GET_FEATURES"), "{e}");
            backend.join().unwrap();
        }
    }
    let after = open_fds();
    assert!(
        after < before + 60,
        "attached descriptors leaked: {before} open before, {after} after"
    );
}

#[test]
fn without_log_shmfd_or_log_all_the_device_keeps_no_dirty_log() {
    let events = TestLoop::new();
    for (features, protocol, missing) in [
        (0, 0, "LOG_SHMFD protocol feature and VHOST_F_LOG_ALL"),
        (LOG_ALL, 0, "the LOG_SHMFD protocol feature"),
        (0, PF_LOG_SHMFD, "the VHOST_F_LOG_ALL feature"),
    ] {
        let mut script = Script::good();
        script.features |= features;
        script.protocol |= protocol;
        let (dev, _backend) = device(script, usize::MAX, &events);
        let why = dev.dirty_log().err().unwrap().to_string();
        assert!(
            why.contains("keeps no dirty log") && why.contains(missing),
            "{why}"
        );
        assert!(dev.untracked_writes().unwrap().contains(missing));
    }
}

#[test]
fn the_dirty_log_is_switched_on_with_the_rings_logged_and_off_again() {
    // Handshake (7 with LOG_SHMFD negotiated), activation (8), on (3), off (2).
    let mut script = Script::good();
    script.features |= LOG_ALL;
    script.protocol |= PF_LOG_SHMFD;
    let events = TestLoop::new();
    let (mut dev, backend) = device(script, 7 + 8 + 3 + 2, &events);
    let mem = guest_memory(1 << 20);
    let driver = DriverQueue::new(&mem, 0x1_0000, 16);
    let used_guest = {
        use virtio_queue::QueueT;
        driver.activated(0).0.queue.used_ring()
    };
    let signals = Arc::new(RecordingSignals::default());
    activate_at(&mut dev, &driver, &mem, &signals, &events, 0);
    let log = dev.dirty_log().unwrap();
    log.start(1 << 20).unwrap();
    log.stop();
    log.stop(); // A second stop sends nothing.
    drop(dev);
    let seen = backend.join().unwrap();
    let u64_at = |b: &[u8], at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap());
    let tail: Vec<_> = seen[seen.len() - 5..].to_vec();
    let codes: Vec<u32> = tail.iter().map(|(c, _)| *c).collect();
    assert_eq!(
        codes,
        [
            SET_LOG_BASE,
            SET_FEATURES,
            SET_VRING_ADDR,
            SET_FEATURES,
            SET_VRING_ADDR
        ],
        "{seen:?}"
    );
    // One bit per 4 KiB page of 1 MiB: 32 bytes, one host page.
    assert_eq!((u64_at(&tail[0].1, 0), u64_at(&tail[0].1, 8)), (4096, 0));
    assert_ne!(u64_at(&tail[1].1, 0) & LOG_ALL, 0, "on: LOG_ALL");
    assert_eq!(u64_at(&tail[3].1, 0) & LOG_ALL, 0, "off: without it");
    // VhostUserVringAddr: index, flags (u32), desc, used, avail, log (u64).
    let (on, off) = (&tail[2].1, &tail[4].1);
    assert_eq!(
        u32::from_le_bytes(on[4..8].try_into().unwrap()),
        1,
        "VHOST_VRING_F_LOG"
    );
    assert_eq!(
        u64_at(on, 32),
        used_guest,
        "the used ring's guest address is logged"
    );
    assert_eq!(u32::from_le_bytes(off[4..8].try_into().unwrap()), 0);
}
