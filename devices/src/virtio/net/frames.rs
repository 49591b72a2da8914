//! Copies one frame between a descriptor chain and a host buffer, treating every descriptor as
//! untrusted: direction, total length and guest addresses are checked, and guest memory is only
//! touched through `vm-memory` accessors (which also mark written pages dirty).
//!
//! A transmit chain is all device-readable: the virtio-net header, then the frame. A receive
//! chain is all device-writable; a frame goes into one chain, or with mergeable receive
//! buffers across several (`RxBuffers`), and the header's `num_buffers` says how many.
//! Not here: which queue the chain came from, the used ring, and notifications.

use thiserror::Error;
use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemory, Permissions};

use super::{MAX_BUFFER_LEN, VNET_HDR_LEN};

/// Offset of `num_buffers` in `virtio_net_hdr_v1`.
const NUM_BUFFERS_OFFSET: usize = 10;

/// Why a chain could not carry a frame. The chain is returned to the driver unused.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum FrameError {
    /// A descriptor of the wrong direction (device-writable in a transmit chain, or
    /// device-readable in a receive chain).
    #[error("chain {head}: descriptor at {addr:#x} has the wrong direction for this queue")]
    WrongDirection {
        /// Head descriptor index.
        head: u16,
        /// The descriptor's guest address.
        addr: u64,
    },
    /// Fewer bytes than the virtio-net header.
    #[error("chain {head}: {len} bytes, less than the {VNET_HDR_LEN}-byte virtio-net header")]
    TooShort {
        /// Head descriptor index.
        head: u16,
        /// Total chain length.
        len: u64,
    },
    /// A transmit chain longer than the largest frame.
    #[error(
        "chain {head}: {len} bytes, more than the largest frame ({MAX_BUFFER_LEN} with header)"
    )]
    TooLong {
        /// Head descriptor index.
        head: u16,
        /// Chain length so far.
        len: u64,
    },
    /// A buffer outside guest memory.
    #[error("chain {head}: buffer {addr:#x}+{len:#x} is not in guest memory")]
    OutOfMemory {
        /// Head descriptor index.
        head: u16,
        /// The descriptor's guest address.
        addr: u64,
        /// The descriptor's length.
        len: u32,
    },
    /// A receive chain too small for the frame waiting for it.
    #[error("chain {head}: {room} bytes of room for a {needed}-byte frame")]
    NoRoom {
        /// Head descriptor index.
        head: u16,
        /// The chain's total writable length.
        room: u64,
        /// Header plus frame length.
        needed: usize,
    },
}

/// Gathers a transmit chain (header then frame, all device-readable) into `buf`, which must
/// hold at least `MAX_BUFFER_LEN` bytes. Returns the number of bytes copied.
pub fn gather_tx<M: GuestMemory>(
    mem: &M,
    chain: DescriptorChain<&M>,
    buf: &mut [u8],
) -> Result<usize, FrameError> {
    let head = chain.head_index();
    let limit = buf.len().min(MAX_BUFFER_LEN);
    let mut total: usize = 0;
    for desc in chain {
        let addr = desc.addr().0;
        if desc.is_write_only() {
            return Err(FrameError::WrongDirection { head, addr });
        }
        let len = desc.len() as usize;
        let end =
            total
                .checked_add(len)
                .filter(|&end| end <= limit)
                .ok_or(FrameError::TooLong {
                    head,
                    len: total as u64 + u64::from(desc.len()),
                })?;
        // `end <= limit <= buf.len()`, so the range is in bounds.
        mem.read_slice(&mut buf[total..end], desc.addr())
            .map_err(|_| FrameError::OutOfMemory {
                head,
                addr,
                len: desc.len(),
            })?;
        total = end;
    }
    if total < VNET_HDR_LEN {
        return Err(FrameError::TooShort {
            head,
            len: total as u64,
        });
    }
    Ok(total)
}

/// The receive chains taken for one frame, each checked once (all device-writable, inside
/// guest memory, room for at least the virtio-net header) and kept as the segments that were
/// checked, so what is written is exactly what was checked. With `VIRTIO_NET_F_MRG_RXBUF` a
/// frame spans as many chains as it needs; without it, one. Reused frame after frame.
#[derive(Debug, Default)]
pub struct RxBuffers {
    segments: Vec<(GuestAddress, u32)>,
    /// Per chain: its head index and where its segments end in `segments`.
    chains: Vec<(u16, usize)>,
    room: u64,
}

impl RxBuffers {
    /// Forgets every chain.
    pub fn clear(&mut self) {
        self.segments.clear();
        self.chains.clear();
        self.room = 0;
    }

    /// How many chains are held.
    pub fn len(&self) -> usize {
        self.chains.len()
    }

    /// Bytes the held chains can take.
    pub fn room(&self) -> u64 {
        self.room
    }

    /// Head indices of the held chains, in order.
    pub fn heads(&self) -> impl Iterator<Item = u16> + '_ {
        self.chains.iter().map(|&(head, _)| head)
    }

    /// Checks `chain` and holds it after the others. A refused chain adds nothing.
    pub fn push<M: GuestMemory>(
        &mut self,
        mem: &M,
        chain: DescriptorChain<&M>,
    ) -> Result<(), FrameError> {
        let head = chain.head_index();
        let first = self.segments.len();
        let mut room: u64 = 0;
        let refuse = |this: &mut Self, e: FrameError| {
            this.segments.truncate(first);
            Err(e)
        };
        for desc in chain {
            let (addr, len) = (desc.addr(), desc.len());
            if !desc.is_write_only() {
                return refuse(self, FrameError::WrongDirection { head, addr: addr.0 });
            }
            if !mem.check_range(addr, len as usize, Permissions::Write) {
                return refuse(
                    self,
                    FrameError::OutOfMemory {
                        head,
                        addr: addr.0,
                        len,
                    },
                );
            }
            if len > 0 {
                self.segments.push((addr, len));
            }
            room += u64::from(len);
        }
        if room < VNET_HDR_LEN as u64 {
            return refuse(self, FrameError::TooShort { head, len: room });
        }
        self.chains.push((head, self.segments.len()));
        self.room += room;
        Ok(())
    }

    /// Writes `frame` (virtio-net header first, as the tap delivered it) across the held
    /// chains in order, with the header's `num_buffers` set to their number, and appends each
    /// chain's head and written length to `used`. The caller holds no more chains than the
    /// frame needs, so every chain gets bytes.
    pub fn write<M: GuestMemory>(
        &self,
        mem: &M,
        frame: &mut [u8],
        used: &mut Vec<(u16, u32)>,
    ) -> Result<(), FrameError> {
        let head = self.chains.first().map_or(0, |&(head, _)| head);
        let no_room = FrameError::NoRoom {
            head,
            room: self.room,
            needed: frame.len(),
        };
        let count = u16::try_from(self.chains.len()).map_err(|_| no_room.clone())?;
        if frame.len() < VNET_HDR_LEN || frame.len() as u64 > self.room {
            return Err(no_room);
        }
        frame[NUM_BUFFERS_OFFSET..VNET_HDR_LEN].copy_from_slice(&count.to_le_bytes());
        let mut rest: &[u8] = frame;
        let mut seg_start = 0;
        for &(chain_head, seg_end) in &self.chains {
            let mut written: u32 = 0;
            for &(addr, len) in &self.segments[seg_start..seg_end] {
                if rest.is_empty() {
                    break;
                }
                let n = rest.len().min(len as usize);
                mem.write_slice(&rest[..n], addr)
                    .map_err(|_| FrameError::OutOfMemory {
                        head: chain_head,
                        addr: addr.0,
                        len,
                    })?;
                rest = &rest[n..];
                // `n <= len`, a u32, and the chain's total fits the frame's u32-sized length.
                written = written.saturating_add(n as u32);
            }
            seg_start = seg_end;
            used.push((chain_head, written));
        }
        Ok(())
    }
}

/// Writes `frame` (virtio-net header first, as the tap delivered it) into one receive chain,
/// with the header's `num_buffers` set to 1. Checks the whole chain before writing anything.
/// Returns the number of bytes written (the used length).
#[cfg(any(test, feature = "fuzzing"))]
pub fn scatter_rx<M: GuestMemory>(
    mem: &M,
    chain: DescriptorChain<&M>,
    frame: &mut [u8],
) -> Result<u32, FrameError> {
    let mut buffers = RxBuffers::default();
    buffers.push(mem, chain)?;
    let mut used = Vec::with_capacity(1);
    buffers.write(mem, frame, &mut used)?;
    Ok(used.first().map_or(0, |&(_, len)| len))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    use super::*;

    const RAM: usize = 0x20_0000;
    const W: u16 = VRING_DESC_F_WRITE as u16;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM)]).unwrap()
    }

    fn desc(addr: u64, len: u32, flags: u16) -> RawDescriptor {
        RawDescriptor::from(Descriptor::new(addr, len, flags, 0))
    }

    #[test]
    fn tx_gathers_header_and_frame_across_descriptors() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 16);
        m.write_slice(&[7u8; VNET_HDR_LEN], GuestAddress(0x10_0000))
            .unwrap();
        m.write_slice(b"hello ", GuestAddress(0x11_0000)).unwrap();
        m.write_slice(b"world", GuestAddress(0x12_0000)).unwrap();
        let chain = vq
            .build_desc_chain(&[
                desc(0x10_0000, VNET_HDR_LEN as u32, 0),
                desc(0x11_0000, 6, 0),
                desc(0x12_0000, 5, 0),
            ])
            .unwrap();
        let mut buf = vec![0u8; MAX_BUFFER_LEN];
        let n = gather_tx(&m, chain, &mut buf).unwrap();
        assert_eq!(n, VNET_HDR_LEN + 11);
        assert_eq!(&buf[..VNET_HDR_LEN], &[7u8; VNET_HDR_LEN]);
        assert_eq!(&buf[VNET_HDR_LEN..n], b"hello world");
    }

    #[test]
    fn tx_refuses_bad_chains() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 16);
        let mut buf = vec![0u8; MAX_BUFFER_LEN];
        let cases: Vec<(Vec<RawDescriptor>, &str)> = vec![
            (vec![desc(0x10_0000, 64, W)], "wrong direction"),
            (vec![desc(0x10_0000, 8, 0)], "shorter than the header"),
            (
                vec![desc(RAM as u64 - 4, 64, 0)],
                "runs past the end of RAM",
            ),
            (vec![desc(u64::MAX - 8, 64, 0)], "address wraps"),
            (
                vec![desc(0x10_0000, 0x1_0000, 0), desc(0x10_0000, 0x1_0000, 0)],
                "longer than the largest frame",
            ),
        ];
        for (descs, what) in cases {
            let chain = vq.build_desc_chain(&descs).unwrap();
            let err = gather_tx(&m, chain, &mut buf).unwrap_err();
            let expected = match what {
                "wrong direction" => matches!(err, FrameError::WrongDirection { .. }),
                "shorter than the header" => matches!(err, FrameError::TooShort { len: 8, .. }),
                "longer than the largest frame" => matches!(err, FrameError::TooLong { .. }),
                _ => matches!(err, FrameError::OutOfMemory { .. }),
            };
            assert!(expected, "{what}: got {err}");
        }
    }

    #[test]
    fn rx_scatters_and_sets_num_buffers() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 16);
        let chain = vq
            .build_desc_chain(&[desc(0x10_0000, 8, W), desc(0x11_0000, 100, W)])
            .unwrap();
        let mut frame = vec![0xaau8; VNET_HDR_LEN];
        frame.extend_from_slice(b"payload");
        let used = scatter_rx(&m, chain, &mut frame).unwrap();
        assert_eq!(used as usize, VNET_HDR_LEN + 7);
        let mut first = [0u8; 8];
        m.read_slice(&mut first, GuestAddress(0x10_0000)).unwrap();
        assert_eq!(first, [0xaa; 8]);
        let mut second = [0u8; 4 + 7];
        m.read_slice(&mut second, GuestAddress(0x11_0000)).unwrap();
        assert_eq!(&second[..2], &[0xaa, 0xaa]);
        assert_eq!(&second[2..4], &1u16.to_le_bytes(), "num_buffers = 1");
        assert_eq!(&second[4..], b"payload");
    }

    #[test]
    fn rx_refuses_bad_chains_without_writing() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 16);
        let mut frame = vec![0x55u8; VNET_HDR_LEN + 20];
        let chain = vq
            .build_desc_chain(&[desc(0x10_0000, 64, W), desc(0x11_0000, 64, 0)])
            .unwrap();
        assert!(matches!(
            scatter_rx(&m, chain, &mut frame),
            Err(FrameError::WrongDirection {
                addr: 0x11_0000,
                ..
            })
        ));
        let chain = vq.build_desc_chain(&[desc(0x10_0000, 4, W)]).unwrap();
        assert!(matches!(
            scatter_rx(&m, chain, &mut frame),
            Err(FrameError::TooShort { len: 4, .. })
        ));
        let chain = vq.build_desc_chain(&[desc(0x10_0000, 16, W)]).unwrap();
        assert!(matches!(
            scatter_rx(&m, chain, &mut frame),
            Err(FrameError::NoRoom { room: 16, .. })
        ));
        let chain = vq.build_desc_chain(&[desc(RAM as u64 - 8, 64, W)]).unwrap();
        assert!(matches!(
            scatter_rx(&m, chain, &mut frame),
            Err(FrameError::OutOfMemory { .. })
        ));
        let mut untouched = [0u8; 64];
        m.read_slice(&mut untouched, GuestAddress(0x10_0000))
            .unwrap();
        assert_eq!(untouched, [0u8; 64], "nothing written for refused chains");
        let mut tail = [0u8; 8];
        m.read_slice(&mut tail, GuestAddress(RAM as u64 - 8))
            .unwrap();
        assert_eq!(
            tail, [0u8; 8],
            "a chain running out of RAM is refused before writing"
        );
    }
}
