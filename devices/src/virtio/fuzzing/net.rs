//! virtio-net frames from fuzzed chains (`gather_tx` on the transmit queue, `scatter_rx` on
//! the receive queue), the device's receive path with mergeable buffers (`net_rx_merged`), and the plain chain walk with indirect tables that every device relies
//! on, fed to both the blk and the net parsers.
use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixDatagram;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use super::{activated_queue, guest_memory, serve_chains, Config, NoSignals};
use crate::guest_memory::TrackedGuestMemory;
use crate::virtio::blk::request;
use crate::virtio::net::frames::{gather_tx, scatter_rx};
use crate::virtio::net::queue_handler::{NetQueueHandler, RxFeatures};
use crate::virtio::net::Tap;
use crate::virtio::net::{MAX_BUFFER_LEN, VNET_HDR_LEN};

/// Frame lengths (header included) a receive case delivers, by `Config::variant`.
const RX_FRAMES: [usize; 4] = [VNET_HDR_LEN, VNET_HDR_LEN + 60, VNET_HDR_LEN + 1514, 4096];

/// What `net_chains` and `indirect_chains` saw.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NetOutcome {
    /// Chains taken from the queue.
    pub chains: usize,
    /// Chains that carried a frame.
    pub frames: usize,
    /// Descriptors walked (`indirect_chains`).
    pub descriptors: usize,
}

/// One receive chain: the frame goes in whole or not at all.
fn receive(
    mem: &TrackedGuestMemory,
    chain: DescriptorChain<&TrackedGuestMemory>,
    len: usize,
) -> u32 {
    let mut frame: Vec<u8> = (0..len).map(|i| i as u8).collect();
    match scatter_rx(mem, chain, &mut frame) {
        Ok(used) => {
            assert_eq!(used as usize, len, "used length of a {len}-byte frame");
            used
        }
        Err(_) => 0,
    }
}

/// One transmit chain, gathered whole.
fn transmit(
    mem: &TrackedGuestMemory,
    chain: DescriptorChain<&TrackedGuestMemory>,
    buf: &mut [u8],
) -> bool {
    match gather_tx(mem, chain, buf) {
        Ok(n) => {
            assert!(
                (VNET_HDR_LEN..=MAX_BUFFER_LEN).contains(&n),
                "gathered {n} bytes"
            );
            true
        }
        Err(_) => false,
    }
}

/// Runs every chain of the fuzzed queue through virtio-net's frame copying: the receive queue
/// when `Config::alternate`, else the transmit queue.
pub fn net_chains(data: &[u8]) -> NetOutcome {
    let mut outcome = NetOutcome::default();
    let Some((&config, image)) = data.split_first() else {
        return outcome;
    };
    let config = Config(config);
    let Some(mem) = guest_memory(image) else {
        return outcome;
    };
    let Some(mut queue) = activated_queue(&mem, config, 0) else {
        return outcome;
    };
    let mut buf = vec![0u8; MAX_BUFFER_LEN];
    let rx_len = RX_FRAMES[usize::from(config.variant())];
    outcome.chains = serve_chains(&mem, &mut queue, |chain| {
        if config.alternate() {
            let used = receive(&mem, chain, rx_len);
            outcome.frames += usize::from(used > 0);
            used
        } else {
            outcome.frames += usize::from(transmit(&mem, chain, &mut buf));
            0
        }
    });
    outcome
}

/// Walks every chain of the fuzzed queue (indirect tables followed as virtio-queue does for
/// every device here) and feeds it to the blk request parser and both net directions. Panics
/// when a walk does not end within the bound the descriptor tables allow, or a parser accepts
/// a chain the walk says is too long.
pub fn indirect_chains(data: &[u8]) -> NetOutcome {
    let mut outcome = NetOutcome::default();
    let Some((&config, image)) = data.split_first() else {
        return outcome;
    };
    let config = Config(config);
    let Some(mem) = guest_memory(image) else {
        return outcome;
    };
    let Some(mut queue) = activated_queue(&mem, config, 0) else {
        return outcome;
    };
    // The ring's table, then at most one indirect table of at most 2^16 - 1 entries.
    let bound = usize::from(config.queue_size()) + usize::from(u16::MAX);
    let mut buf = vec![0u8; MAX_BUFFER_LEN];
    let rx_len = RX_FRAMES[usize::from(config.variant())];
    outcome.chains = serve_chains(&mem, &mut queue, |chain| {
        let descs: Vec<Descriptor> = chain.clone().take(bound + 1).collect();
        assert!(
            descs.len() <= bound,
            "a chain of more than {bound} descriptors"
        );
        let bytes: u64 = descs.iter().map(|d| u64::from(d.len())).sum();
        assert!(bytes <= u64::from(u32::MAX), "a chain of {bytes} bytes");
        outcome.descriptors += descs.len();
        if let Ok(req) = request::parse(chain.clone(), &mem) {
            assert!(req.readable.len() + req.writable.len() <= descs.len());
        }
        let sent = transmit(&mem, chain.clone(), &mut buf);
        let used = receive(&mem, chain, rx_len);
        outcome.frames += usize::from(sent) + usize::from(used > 0);
        used
    });
    outcome
}

/// Frames (header included) the host side offers in `net_rx_merged`, by `Config::variant`.
const MERGED_FRAMES: [&[usize]; 4] = [
    &[VNET_HDR_LEN + 60],
    &[VNET_HDR_LEN + 1514, VNET_HDR_LEN + 60],
    &[VNET_HDR_LEN + 3000, VNET_HDR_LEN + 3000, VNET_HDR_LEN + 100],
    &[9000, VNET_HDR_LEN, VNET_HDR_LEN + 1],
];

/// What `net_rx_merged` saw: the handler's counters, and whether it waits for buffers.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RxOutcome {
    /// Frames delivered.
    pub delivered: u64,
    /// Frames dropped with their chains.
    pub dropped: u64,
    /// A frame is held until the driver offers more buffers.
    pub waiting: bool,
}

/// Runs virtio-net's receive path with `VIRTIO_NET_F_MRG_RXBUF` (and `EVENT_IDX` as the config
/// says) over the fuzzed queue 0, with a datagram socket pair standing in for the tap and the
/// frames of `Config::variant` queued on it. Panics when the counters account for more frames
/// than were offered.
pub fn net_rx_merged(data: &[u8]) -> RxOutcome {
    let Some((&config, image)) = data.split_first() else {
        return RxOutcome::default();
    };
    let config = Config(config);
    let Some(mem) = guest_memory(image) else {
        return RxOutcome::default();
    };
    let (Some(rx), Some(tx)) = (
        activated_queue(&mem, config, 0),
        activated_queue(&mem, config, 1),
    ) else {
        return RxOutcome::default();
    };
    let Ok((ours, host)) = UnixDatagram::pair() else {
        return RxOutcome::default();
    };
    if ours.set_nonblocking(true).is_err() {
        return RxOutcome::default();
    }
    let frames = MERGED_FRAMES[usize::from(config.variant())];
    for &len in frames {
        let frame: Vec<u8> = (0..len).map(|i| i as u8).collect();
        if host.send(&frame).is_err() {
            return RxOutcome::default();
        }
    }
    let mut handler = NetQueueHandler::new(
        mem,
        rx,
        tx,
        Arc::new(Tap::from_socket(OwnedFd::from(ours))),
        Arc::new(NoSignals),
        RxFeatures {
            guest_csum: config.alternate(),
            mrg_rxbuf: true,
        },
        Arc::new(AtomicBool::new(false)),
    );
    let waiting = handler.process_rx();
    let c = handler.counters();
    assert!(
        c.rx_frames + c.rx_dropped <= frames.len() as u64,
        "{c:?} for {} frames",
        frames.len()
    );
    RxOutcome {
        delivered: c.rx_frames,
        dropped: c.rx_dropped,
        waiting,
    }
}
