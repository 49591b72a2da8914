//! `VirtioNet`: the transport-facing side of virtio-net. Owns the configuration space (MAC,
//! link status), which features to offer (offloads only where the tap supports them), and
//! activation: setting the tap's offloads to what the driver accepted and starting the queue
//! handler on the event loop. Reset stops the handler before returning.
//!
//! Not here: moving frames (`queue_handler`, `frames`) and opening the tap (`tap`).

use std::io;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use thiserror::Error;
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_UFO, VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_STATUS,
    VIRTIO_NET_S_LINK_UP,
};
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};

use super::queue_handler::{NetCounters, NetQueueHandler, RxFeatures};
use super::tap::{Tap, TapError, TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN, TUN_F_UFO};
use super::QUEUE_SIZE;
use crate::virtio::device::{ActivateContext, ActivateError, QueueProgress, VirtioDevice};
use crate::virtio::queue_ops::rx_tx_slots;
use crate::virtio::subscription::ActiveHandler;

/// virtio device type of a network card.
const DEVICE_TYPE_NET: u32 = 1;
const NAME: &str = "net";

/// Guest receive offloads and the tap flag each needs.
const GUEST_OFFLOADS: [(u32, u32); 5] = [
    (VIRTIO_NET_F_GUEST_CSUM, TUN_F_CSUM),
    (VIRTIO_NET_F_GUEST_TSO4, TUN_F_TSO4),
    (VIRTIO_NET_F_GUEST_TSO6, TUN_F_TSO6),
    (VIRTIO_NET_F_GUEST_ECN, TUN_F_TSO_ECN),
    (VIRTIO_NET_F_GUEST_UFO, TUN_F_UFO),
];

/// Transmit offloads: a vnet_hdr tap takes partial checksums and TSO frames from its writer.
const HOST_OFFLOADS: [u32; 4] = [
    VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_HOST_TSO6,
    VIRTIO_NET_F_HOST_ECN,
];

/// Errors creating a virtio-net device.
#[derive(Debug, Error)]
pub enum NetError {
    /// The tap cannot be used.
    #[error(transparent)]
    Tap(#[from] TapError),
    /// The given MAC is a multicast or all-zero address.
    #[error("MAC {0}: not a unicast address")]
    BadMac(String),
    /// No random bytes for a MAC address.
    #[error("cannot draw a random MAC address")]
    Random(#[source] io::Error),
}

fn bit(feature: u32) -> u64 {
    1u64 << feature
}

/// Formats a MAC as `52:54:00:12:34:56`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// A random locally administered unicast MAC.
pub(super) fn random_mac() -> Result<[u8; 6], NetError> {
    let mut mac = [0u8; 6];
    // SAFETY: writes at most `mac.len()` bytes into `mac`, which is that large.
    let n = unsafe { libc::getrandom(mac.as_mut_ptr().cast(), mac.len(), 0) };
    if usize::try_from(n).ok() != Some(mac.len()) {
        return Err(NetError::Random(io::Error::last_os_error()));
    }
    mac[0] = (mac[0] & !0x01) | 0x02;
    Ok(mac)
}

/// A virtio-net device on a tap.
pub struct VirtioNet {
    tap: Arc<Tap>,
    mac: [u8; 6],
    features: u64,
    active: Option<ActiveHandler<NetQueueHandler>>,
}

impl std::fmt::Debug for VirtioNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioNet")
            .field("tap", &self.tap.name())
            .field("mac", &format_mac(&self.mac))
            .field("features", &format_args!("{:#x}", self.features))
            .field("active", &self.active.is_some())
            .finish()
    }
}

impl VirtioNet {
    /// Opens (or creates) tap `tap_name` and builds the device on it. `mac` defaults to a
    /// random locally administered address.
    pub fn open(tap_name: &str, mac: Option<[u8; 6]>) -> Result<Self, NetError> {
        Self::new(Tap::open(tap_name)?, mac)
    }

    /// Builds the device on an open tap.
    pub fn new(tap: Tap, mac: Option<[u8; 6]>) -> Result<Self, NetError> {
        let mac = match mac {
            Some(mac) if mac[0] & 0x01 != 0 || mac == [0; 6] => {
                return Err(NetError::BadMac(format_mac(&mac)))
            }
            Some(mac) => mac,
            None => random_mac()?,
        };
        let mut features = bit(VIRTIO_F_VERSION_1)
            | bit(VIRTIO_RING_F_INDIRECT_DESC)
            | bit(VIRTIO_RING_F_EVENT_IDX)
            | bit(VIRTIO_NET_F_MAC)
            | bit(VIRTIO_NET_F_MRG_RXBUF)
            | bit(VIRTIO_NET_F_STATUS);
        for feature in HOST_OFFLOADS {
            features |= bit(feature);
        }
        let tap_offloads = tap.supported_offloads();
        for (feature, flag) in GUEST_OFFLOADS {
            if tap_offloads & flag != 0 {
                features |= bit(feature);
            }
        }
        Ok(Self {
            tap: Arc::new(tap),
            mac,
            features,
            active: None,
        })
    }

    /// The guest's MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// The tap's name.
    pub fn tap_name(&self) -> &str {
        self.tap.name()
    }

    /// Frame counters of the current activation (`None` while the driver has not started it).
    pub fn counters(&self) -> Option<NetCounters> {
        let active = self.active.as_ref()?;
        Some(active.handler().counters())
    }

    /// The configuration space: mac, status, max_virtqueue_pairs.
    fn config_bytes(&self) -> [u8; 10] {
        let mut config = [0u8; 10];
        config[..6].copy_from_slice(&self.mac);
        config[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        config[8..10].copy_from_slice(&1u16.to_le_bytes());
        config
    }
}

/// The `TUN_F_*` flags matching the guest offloads in `acked`.
fn tun_offloads(acked: u64) -> u32 {
    if acked & bit(VIRTIO_NET_F_GUEST_CSUM) == 0 {
        // Every other receive offload builds on checksum offload.
        return 0;
    }
    GUEST_OFFLOADS
        .iter()
        .filter(|(feature, _)| acked & bit(*feature) != 0)
        .fold(0, |flags, (_, flag)| flags | flag)
}

impl VirtioDevice for VirtioNet {
    fn device_type(&self) -> u32 {
        DEVICE_TYPE_NET
    }

    fn name(&self) -> &'static str {
        NAME
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE, QUEUE_SIZE]
    }

    fn device_features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = self.config_bytes();
        data.fill(0);
        let Some(src) = usize::try_from(offset).ok().and_then(|o| config.get(o..)) else {
            return;
        };
        let n = src.len().min(data.len());
        data[..n].copy_from_slice(&src[..n]);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // Every field is read-only for a VERSION_1 driver (the MAC changes only through the
        // control queue, which this device does not have).
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        if self.active.is_some() {
            self.reset();
        }
        let ActivateContext {
            mem,
            acked_features,
            queues,
            signals,
            event_loop,
        } = ctx;
        let (rx, tx) = rx_tx_slots(NAME, queues, &self.queue_max_sizes())?;
        self.tap
            .set_offloads(tun_offloads(acked_features))
            .map_err(|e| ActivateError::Host {
                device: NAME,
                source: io::Error::other(e),
            })?;
        let stopped = Arc::new(AtomicBool::new(false));
        let handler = NetQueueHandler::new(
            mem,
            rx,
            tx,
            self.tap.clone(),
            signals,
            RxFeatures {
                guest_csum: acked_features & bit(VIRTIO_NET_F_GUEST_CSUM) != 0,
                mrg_rxbuf: acked_features & bit(VIRTIO_NET_F_MRG_RXBUF) != 0,
            },
            stopped.clone(),
        );
        let active = ActiveHandler::start(&event_loop, stopped, handler).map_err(|source| {
            ActivateError::Host {
                device: NAME,
                source,
            }
        })?;
        self.active = Some(active);
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(active) = self.active.take() {
            // After this no handler run touches guest memory.
            active.stop();
        }
    }

    fn quiesce(&mut self) -> Option<Vec<QueueProgress>> {
        // Requests are handled within one handler run: nothing is in flight between runs.
        // A frame read from the tap and not yet delivered (no receive buffer) is dropped, as a
        // full queue would drop it.
        Some(self.active.take()?.stop_with(|h| h.progress()))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::os::fd::OwnedFd;

    use super::*;

    fn socket_tap() -> Tap {
        let (a, _b) = std::os::unix::net::UnixDatagram::pair().unwrap();
        Tap::from_socket(OwnedFd::from(a))
    }

    #[test]
    fn config_space_holds_mac_and_link_up() {
        let mac = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
        let dev = VirtioNet::new(socket_tap(), Some(mac)).unwrap();
        let mut all = [0xffu8; 10];
        dev.read_config(0, &mut all);
        assert_eq!(&all[..6], &mac);
        assert_eq!(&all[6..8], &1u16.to_le_bytes(), "VIRTIO_NET_S_LINK_UP");
        assert_eq!(&all[8..10], &1u16.to_le_bytes(), "one queue pair");
        let mut status = [0u8; 2];
        dev.read_config(6, &mut status);
        assert_eq!(status, [1, 0]);
        let mut past_end = [0xffu8; 4];
        dev.read_config(8, &mut past_end);
        assert_eq!(past_end, [1, 0, 0, 0], "bytes past the end read as zero");
        dev.read_config(u64::MAX, &mut past_end);
        assert_eq!(past_end, [0; 4]);
    }

    #[test]
    fn writes_to_config_are_ignored() {
        let mac = [0x02, 1, 2, 3, 4, 5];
        let mut dev = VirtioNet::new(socket_tap(), Some(mac)).unwrap();
        dev.write_config(0, &[0xff; 6]);
        assert_eq!(dev.mac(), mac);
        let mut back = [0u8; 6];
        dev.read_config(0, &mut back);
        assert_eq!(back, mac);
    }

    #[test]
    fn random_mac_is_local_unicast() {
        let a = VirtioNet::new(socket_tap(), None).unwrap().mac();
        let b = VirtioNet::new(socket_tap(), None).unwrap().mac();
        for mac in [a, b] {
            assert_eq!(mac[0] & 0x03, 0x02, "{}", format_mac(&mac));
        }
        assert_ne!(a, b);
    }

    #[test]
    fn multicast_or_zero_mac_is_refused() {
        for mac in [[0x01, 0, 0x5e, 0, 0, 1], [0; 6]] {
            let err = VirtioNet::new(socket_tap(), Some(mac)).unwrap_err();
            assert!(matches!(err, NetError::BadMac(_)), "{err}");
        }
    }

    #[test]
    fn features_follow_the_tap() {
        let dev = VirtioNet::new(socket_tap(), None).unwrap();
        let f = dev.device_features();
        for feature in [VIRTIO_F_VERSION_1, VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS] {
            assert_ne!(f & bit(feature), 0, "feature {feature}");
        }
        for (feature, _) in GUEST_OFFLOADS {
            assert_eq!(
                f & bit(feature),
                0,
                "a tap without offloads: no guest feature {feature}"
            );
        }
        assert_eq!(dev.queue_max_sizes(), vec![QUEUE_SIZE, QUEUE_SIZE]);
        assert_eq!(dev.device_type(), 1);
    }

    #[test]
    fn acked_features_map_to_tap_flags() {
        assert_eq!(tun_offloads(0), 0);
        assert_eq!(
            tun_offloads(bit(VIRTIO_NET_F_GUEST_TSO4)),
            0,
            "TSO needs CSUM"
        );
        assert_eq!(tun_offloads(bit(VIRTIO_NET_F_GUEST_CSUM)), TUN_F_CSUM);
        let all = GUEST_OFFLOADS.iter().fold(0, |f, (b, _)| f | bit(*b));
        assert_eq!(
            tun_offloads(all | bit(VIRTIO_NET_F_HOST_TSO4)),
            TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN | TUN_F_UFO
        );
    }
}
