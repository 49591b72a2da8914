//! MSI-X for one PCI function: the vector table and pending-bit array (PBA) the guest reaches
//! through a BAR, the capability's enable and function-mask bits, and interrupt delivery.
//!
//! Each vector has an irqfd (an `EventFd` the VMM bound to a GSI). Raising a vector writes its
//! irqfd, or sets its pending bit while the vector or the function is masked; unmasking delivers
//! a pending vector. When the guest programs a vector's address and data, `MsiRouteUpdater` tells
//! the hypervisor where that GSI's interrupt goes; routes are pushed when a vector is (or
//! becomes) deliverable with a message that differs from the last one pushed. Vectors out of
//! range are ignored. INTx fallback (MSI-X disabled) is not provided: interrupts are then dropped.

use std::sync::Arc;

use thiserror::Error;
use vmm_sys_util::eventfd::EventFd;

/// Capability ID of MSI-X.
pub const MSIX_CAPABILITY_ID: u8 = 0x11;
/// Bytes per vector table entry.
pub const MSIX_ENTRY_SIZE: u64 = 16;
/// Most vectors one function can have.
pub const MSIX_MAX_VECTORS: usize = 2048;
/// Message control: MSI-X enable.
pub const MSIX_CONTROL_ENABLE: u16 = 1 << 15;
/// Message control: function mask.
pub const MSIX_CONTROL_FUNCTION_MASK: u16 = 1 << 14;
/// Vector control: masked.
const VECTOR_MASKED: u32 = 1;

/// Errors from setting up MSI-X.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum MsixError {
    /// The vector count is zero or above the MSI-X limit.
    #[error("MSI-X vector count {0} is out of range 1..={MSIX_MAX_VECTORS}")]
    VectorCount(usize),
    /// A saved table of another size than this function's.
    #[error("saved MSI-X state has {entries} vectors and {pba} PBA words; the function has {expected} vectors")]
    StateSize {
        /// Saved vectors.
        entries: usize,
        /// Saved PBA qwords.
        pba: usize,
        /// The function's vectors.
        expected: usize,
    },
    /// A saved PBA with a bit for a vector that does not exist.
    #[error("saved MSI-X PBA marks vector {0} pending, beyond the table")]
    PendingBeyondTable(usize),
}

/// One saved vector table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MsixEntryState {
    /// Message address, low dword.
    pub address_low: u32,
    /// Message address, high dword.
    pub address_high: u32,
    /// Message data.
    pub data: u32,
    /// Vector control (mask bit).
    pub control: u32,
}

/// What a snapshot keeps of MSI-X: the vector table and the pending bits. Enable and function
/// mask live in the capability's message control, saved with the configuration space.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MsixState {
    /// The vector table.
    pub entries: Vec<MsixEntryState>,
    /// The PBA, 64 vectors per word.
    pub pending: Vec<u64>,
}

/// An MSI message: where the interrupt is written and what.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MsiMessage {
    /// Message address.
    pub address: u64,
    /// Message data.
    pub data: u32,
}

/// Keeps the hypervisor's interrupt routing in step with the guest's MSI-X table. Implemented
/// by the VMM, which knows the GSI behind each vector's irqfd.
pub trait MsiRouteUpdater: Send + Sync + std::fmt::Debug {
    /// The guest programmed `vector` with `message`: route that vector's GSI there.
    fn update_route(&self, vector: u16, message: MsiMessage) -> std::io::Result<()>;
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    address_low: u32,
    address_high: u32,
    data: u32,
    control: u32,
}

impl Default for Entry {
    fn default() -> Self {
        // Every vector is masked after reset.
        Self {
            address_low: 0,
            address_high: 0,
            data: 0,
            control: VECTOR_MASKED,
        }
    }
}

impl Entry {
    fn message(&self) -> MsiMessage {
        MsiMessage {
            address: u64::from(self.address_low) | (u64::from(self.address_high) << 32),
            data: self.data,
        }
    }

    fn dword(&self, index: u64) -> u32 {
        match index {
            0 => self.address_low,
            1 => self.address_high,
            2 => self.data,
            _ => self.control,
        }
    }

    fn set_dword(&mut self, index: u64, value: u32) {
        match index {
            // The message address is dword aligned: bits 1:0 read as zero.
            0 => self.address_low = value & !0b11,
            1 => self.address_high = value,
            2 => self.data = value,
            // Only the mask bit is defined.
            _ => self.control = value & VECTOR_MASKED,
        }
    }
}

/// The MSI-X state of one function.
#[derive(Debug)]
pub struct Msix {
    entries: Vec<Entry>,
    pending: Vec<u64>,
    enabled: bool,
    function_masked: bool,
    /// The message last pushed to the hypervisor for each vector.
    routed: Vec<Option<MsiMessage>>,
    irqs: Vec<EventFd>,
    routes: Arc<dyn MsiRouteUpdater>,
    /// Rate limit for the warnings the guest's table writes cause.
    warnings: crate::guest_warnings::GuestWarnings,
}

impl Msix {
    /// MSI-X with one vector per irqfd in `irqs`, all masked, disabled.
    pub fn new(irqs: Vec<EventFd>, routes: Arc<dyn MsiRouteUpdater>) -> Result<Self, MsixError> {
        let count = irqs.len();
        if count == 0 || count > MSIX_MAX_VECTORS {
            return Err(MsixError::VectorCount(count));
        }
        Ok(Self {
            entries: vec![Entry::default(); count],
            pending: vec![0; count.div_ceil(64)],
            enabled: false,
            function_masked: false,
            routed: vec![None; count],
            irqs,
            routes,
            warnings: crate::guest_warnings::GuestWarnings::new("MSI-X"),
        })
    }

    /// Number of vectors.
    pub fn vector_count(&self) -> u16 {
        // At most MSIX_MAX_VECTORS, checked in `new`.
        self.entries.len() as u16
    }

    /// Bytes the vector table occupies.
    pub fn table_size(&self) -> u64 {
        self.entries.len() as u64 * MSIX_ENTRY_SIZE
    }

    /// Bytes the PBA occupies (whole qwords).
    pub fn pba_size(&self) -> u64 {
        self.pending.len() as u64 * 8
    }

    /// The capability body after the ID and link bytes: message control (table size), table
    /// offset and BIR, PBA offset and BIR. Offsets must be 8-byte aligned.
    pub fn capability_body(
        &self,
        table_bar: u8,
        table_offset: u32,
        pba_bar: u8,
        pba_offset: u32,
    ) -> [u8; 10] {
        let mut body = [0u8; 10];
        body[0..2].copy_from_slice(&(self.vector_count() - 1).to_le_bytes());
        body[2..6]
            .copy_from_slice(&((table_offset & !0x7) | u32::from(table_bar & 0x7)).to_le_bytes());
        body[6..10]
            .copy_from_slice(&((pba_offset & !0x7) | u32::from(pba_bar & 0x7)).to_le_bytes());
        body
    }

    /// Write mask for `capability_body`: only the enable and function-mask bits.
    pub fn capability_writable() -> [u8; 2] {
        (MSIX_CONTROL_ENABLE | MSIX_CONTROL_FUNCTION_MASK).to_le_bytes()
    }

    /// Whether MSI-X is enabled.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Applies the capability's message control register after a guest write. Returns whether
    /// any vector became deliverable or stopped being so (see `deliverable_irqfd`).
    pub fn set_control(&mut self, control: u16) -> bool {
        let before: Vec<bool> = (0..self.entries.len())
            .map(|v| self.deliverable(v))
            .collect();
        self.enabled = control & MSIX_CONTROL_ENABLE != 0;
        self.function_masked = control & MSIX_CONTROL_FUNCTION_MASK != 0;
        for vector in 0..self.entries.len() {
            self.sync(vector);
        }
        before
            .iter()
            .enumerate()
            .any(|(v, &was)| was != self.deliverable(v))
    }

    /// The vector table and pending bits.
    pub fn save(&self) -> MsixState {
        MsixState {
            entries: self
                .entries
                .iter()
                .map(|e| MsixEntryState {
                    address_low: e.address_low,
                    address_high: e.address_high,
                    data: e.data,
                    control: e.control,
                })
                .collect(),
            pending: self.pending.clone(),
        }
    }

    /// Takes back a saved table and PBA (untrusted: sizes must match this function's, reserved
    /// bits are cleared as a guest write would). Routes are pushed, and pending vectors that
    /// are deliverable delivered, by the next `set_control`.
    pub fn restore(&mut self, state: &MsixState) -> Result<(), MsixError> {
        let expected = self.entries.len();
        if state.entries.len() != expected || state.pending.len() != self.pending.len() {
            return Err(MsixError::StateSize {
                entries: state.entries.len(),
                pba: state.pending.len(),
                expected,
            });
        }
        for (q, word) in state.pending.iter().enumerate() {
            for bit in 0..64 {
                let vector = q * 64 + bit;
                if word & (1 << bit) != 0 && vector >= expected {
                    return Err(MsixError::PendingBeyondTable(vector));
                }
            }
        }
        for (entry, saved) in self.entries.iter_mut().zip(&state.entries) {
            entry.set_dword(0, saved.address_low);
            entry.set_dword(1, saved.address_high);
            entry.set_dword(2, saved.data);
            entry.set_dword(3, saved.control);
        }
        self.pending.copy_from_slice(&state.pending);
        self.routed.fill(None);
        Ok(())
    }

    /// Reads the vector table at `offset`: 4- or 8-byte accesses aligned to their size; others
    /// read as zero, as does anything past the last entry.
    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if !aligned_dword_access(offset, data.len()) {
            return;
        }
        for (i, chunk) in data.chunks_exact_mut(4).enumerate() {
            let at = offset + 4 * i as u64;
            if let Some(entry) = self
                .entries
                .get(usize::try_from(at / MSIX_ENTRY_SIZE).unwrap_or(usize::MAX))
            {
                chunk.copy_from_slice(&entry.dword((at % MSIX_ENTRY_SIZE) / 4).to_le_bytes());
            }
        }
    }

    /// Writes the vector table at `offset` (same access rules as `read_table`). Returns whether
    /// a vector became deliverable or stopped being so (see `deliverable_irqfd`).
    pub fn write_table(&mut self, offset: u64, data: &[u8]) -> bool {
        let mut changed = false;
        if !aligned_dword_access(offset, data.len()) {
            return changed;
        }
        for (i, chunk) in data.chunks_exact(4).enumerate() {
            let at = offset + 4 * i as u64;
            let Ok(vector) = usize::try_from(at / MSIX_ENTRY_SIZE) else {
                return changed;
            };
            let was = self.deliverable(vector);
            let Some(entry) = self.entries.get_mut(vector) else {
                return changed;
            };
            let mut value = [0u8; 4];
            value.copy_from_slice(chunk);
            entry.set_dword((at % MSIX_ENTRY_SIZE) / 4, u32::from_le_bytes(value));
            self.sync(vector);
            changed |= was != self.deliverable(vector);
        }
        changed
    }

    /// Reads the PBA at `offset` (any width; past the end reads zero). The PBA is read-only.
    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            let at = offset.saturating_add(i as u64);
            *byte = usize::try_from(at / 8)
                .ok()
                .and_then(|q| self.pending.get(q))
                .map_or(0, |q| (q >> (8 * (at % 8))) as u8);
        }
    }

    /// Whether `vector`'s pending bit is set.
    pub fn is_pending(&self, vector: u16) -> bool {
        let v = usize::from(vector);
        self.pending
            .get(v / 64)
            .is_some_and(|q| q & (1 << (v % 64)) != 0)
    }

    /// Raises `vector`: delivers it, or marks it pending while masked. Vectors out of range, and
    /// every vector while MSI-X is disabled, are dropped.
    pub fn trigger(&mut self, vector: u16) -> std::io::Result<()> {
        let v = usize::from(vector);
        if v >= self.entries.len() || !self.enabled {
            return Ok(());
        }
        if self.masked(v) {
            self.pending[v / 64] |= 1 << (v % 64);
            return Ok(());
        }
        self.irqs[v].write(1)
    }

    /// A duplicate of `vector`'s irqfd while the vector is deliverable (MSI-X enabled, function
    /// and vector unmasked, its route pushed): a write to it interrupts the guest at once, so a
    /// device model in another process may be given it instead of an eventfd the VMM forwards.
    /// Whoever holds it must stop writing it once the vector is masked (`set_control` and
    /// `write_table` say when deliverability changes); interrupts raised meanwhile go through
    /// `trigger`, which keeps them pending.
    pub fn deliverable_irqfd(&self, vector: u16) -> Option<EventFd> {
        let v = usize::from(vector);
        if !self.deliverable(v) {
            return None;
        }
        match self.irqs[v].try_clone() {
            Ok(fd) => Some(fd),
            Err(e) => {
                log::warn!("MSI-X vector {v}: cannot duplicate its irqfd: {e}");
                None
            }
        }
    }

    fn deliverable(&self, v: usize) -> bool {
        v < self.entries.len() && self.enabled && !self.masked(v) && self.routed[v].is_some()
    }

    fn masked(&self, v: usize) -> bool {
        self.function_masked || self.entries[v].control & VECTOR_MASKED != 0
    }

    /// Brings `vector`'s route up to date if it is deliverable, then delivers it if pending.
    fn sync(&mut self, v: usize) {
        if !self.enabled || self.masked(v) {
            return;
        }
        let message = self.entries[v].message();
        if self.routed[v] != Some(message) {
            // `v` < entries.len() <= MSIX_MAX_VECTORS fits u16.
            match self.routes.update_route(v as u16, message) {
                Ok(()) => self.routed[v] = Some(message),
                Err(e) => crate::guest_warn!(
                    Some(&self.warnings),
                    "unroutable message",
                    "MSI-X vector {v}: cannot route {message:x?}: {e}"
                ),
            }
        }
        if self.pending[v / 64] & (1 << (v % 64)) != 0 {
            self.pending[v / 64] &= !(1 << (v % 64));
            if let Err(e) = self.irqs[v].write(1) {
                log::warn!("MSI-X vector {v}: cannot signal its irqfd: {e}");
            }
        }
    }
}

fn aligned_dword_access(offset: u64, len: usize) -> bool {
    matches!(len, 4 | 8) && offset.is_multiple_of(len as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    #[derive(Debug, Default)]
    struct Routes(Mutex<Vec<(u16, MsiMessage)>>);

    impl MsiRouteUpdater for Routes {
        fn update_route(&self, vector: u16, message: MsiMessage) -> std::io::Result<()> {
            self.0.lock().unwrap().push((vector, message));
            Ok(())
        }
    }

    fn msix(n: usize) -> (Msix, Arc<Routes>) {
        let routes = Arc::new(Routes::default());
        let irqs = (0..n)
            .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
            .collect();
        (Msix::new(irqs, routes.clone()).unwrap(), routes)
    }

    fn fired(m: &Msix, v: usize) -> bool {
        m.irqs[v].read().is_ok()
    }

    fn program(m: &mut Msix, v: u64, address: u64, data: u32) {
        m.write_table(v * 16, &address.to_le_bytes());
        m.write_table(v * 16 + 8, &data.to_le_bytes());
    }

    fn unmask(m: &mut Msix, v: u64) {
        m.write_table(v * 16 + 12, &0u32.to_le_bytes());
    }

    #[test]
    fn table_reads_back_and_starts_masked() {
        let (mut m, _) = msix(3);
        let mut b = [0u8; 4];
        m.read_table(16 + 12, &mut b);
        assert_eq!(
            u32::from_le_bytes(b),
            1,
            "vector control masked after reset"
        );
        program(&mut m, 1, 0xfee0_1003, 0x4041);
        let mut q = [0u8; 8];
        m.read_table(16, &mut q);
        assert_eq!(
            u64::from_le_bytes(q),
            0xfee0_1000,
            "address bits 1:0 read as zero"
        );
        m.read_table(16 + 8, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x4041);
        m.write_table(16 + 12, &0xffff_fffeu32.to_le_bytes());
        m.read_table(16 + 12, &mut b);
        assert_eq!(
            u32::from_le_bytes(b),
            0,
            "reserved control bits read as zero"
        );
    }

    #[test]
    fn bad_accesses_are_ignored() {
        let (mut m, routes) = msix(2);
        let mut b = [0xaau8; 4];
        m.read_table(2, &mut b);
        assert_eq!(b, [0; 4], "unaligned");
        let mut w = [0xaau8; 2];
        m.read_table(0, &mut w);
        assert_eq!(w, [0; 2], "16-bit");
        m.read_table(32, &mut b);
        assert_eq!(b, [0; 4], "past the last entry");
        m.write_table(1, &[1, 2, 3, 4]);
        m.write_table(32, &[0; 4]);
        m.write_table(u64::MAX - 3, &[0; 4]);
        m.write_table(8, &[0xff]);
        m.read_table(8, &mut b);
        assert_eq!(b, [0; 4]);
        assert!(routes.0.lock().unwrap().is_empty());
        let mut p = [0xaau8; 8];
        m.read_pba(u64::MAX, &mut p);
        assert_eq!(p, [0; 8]);
    }

    #[test]
    fn delivery_masking_and_pending_bits() {
        let (mut m, routes) = msix(2);
        m.set_control(MSIX_CONTROL_ENABLE);
        program(&mut m, 1, 0xfee0_0000, 0x31);
        m.trigger(1).unwrap();
        assert!(!fired(&m, 1), "masked vector does not fire");
        assert!(m.is_pending(1));
        let mut p = [0u8; 8];
        m.read_pba(0, &mut p);
        assert_eq!(u64::from_le_bytes(p), 0b10);
        assert!(routes.0.lock().unwrap().is_empty(), "no route while masked");

        unmask(&mut m, 1);
        assert_eq!(
            *routes.0.lock().unwrap(),
            vec![(
                1,
                MsiMessage {
                    address: 0xfee0_0000,
                    data: 0x31
                }
            )]
        );
        assert!(fired(&m, 1), "pending vector delivered on unmask");
        assert!(!m.is_pending(1));
        m.trigger(1).unwrap();
        assert!(fired(&m, 1));

        // Function mask holds everything back; clearing it delivers.
        m.set_control(MSIX_CONTROL_ENABLE | MSIX_CONTROL_FUNCTION_MASK);
        m.trigger(1).unwrap();
        assert!(!fired(&m, 1));
        assert!(m.is_pending(1));
        m.set_control(MSIX_CONTROL_ENABLE);
        assert!(fired(&m, 1));
        assert_eq!(
            routes.0.lock().unwrap().len(),
            1,
            "unchanged message is not re-routed"
        );

        // A new message while unmasked is routed again.
        m.write_table(16 + 8, &0x32u32.to_le_bytes());
        assert_eq!(routes.0.lock().unwrap().last().unwrap().1.data, 0x32);
    }

    #[test]
    fn out_of_range_and_disabled_vectors_are_dropped() {
        let (mut m, _) = msix(1);
        unmask(&mut m, 0);
        m.trigger(0).unwrap();
        assert!(!fired(&m, 0), "MSI-X disabled");
        assert!(!m.is_pending(0));
        m.set_control(MSIX_CONTROL_ENABLE);
        m.trigger(1).unwrap();
        m.trigger(u16::MAX).unwrap();
        assert!(!m.is_pending(u16::MAX));
        m.trigger(0).unwrap();
        assert!(fired(&m, 0));
    }

    #[test]
    fn save_restore_keeps_table_and_pending_bits_and_reroutes() {
        let (mut m, _) = msix(3);
        m.set_control(MSIX_CONTROL_ENABLE);
        program(&mut m, 0, 0xfee0_0000, 0x41);
        unmask(&mut m, 0);
        program(&mut m, 2, 0xfee0_1000, 0x42);
        m.trigger(2).unwrap();
        assert!(m.is_pending(2), "masked vector 2 pending");
        let saved = m.save();

        let (mut fresh, routes) = msix(3);
        fresh.restore(&saved).unwrap();
        assert_eq!(fresh.save(), saved);
        assert!(fresh.is_pending(2), "the pending bit survives");
        fresh.set_control(MSIX_CONTROL_ENABLE);
        assert_eq!(
            *routes.0.lock().unwrap(),
            vec![(
                0,
                MsiMessage {
                    address: 0xfee0_0000,
                    data: 0x41
                }
            )],
            "the unmasked vector is routed again"
        );
        unmask(&mut fresh, 2);
        assert!(
            fired(&fresh, 2),
            "the saved pending interrupt is delivered on unmask"
        );

        let mut bad = saved.clone();
        bad.entries.pop();
        assert!(matches!(
            fresh.restore(&bad),
            Err(MsixError::StateSize { .. })
        ));
        let mut bad = saved;
        bad.pending[0] |= 1 << 5;
        assert_eq!(fresh.restore(&bad), Err(MsixError::PendingBeyondTable(5)));
    }

    #[test]
    fn capability_and_sizes() {
        let (m, _) = msix(65);
        assert_eq!(m.table_size(), 65 * 16);
        assert_eq!(m.pba_size(), 16);
        let body = m.capability_body(0, 0x4000, 0, 0x6000);
        assert_eq!(u16::from_le_bytes([body[0], body[1]]), 64);
        assert_eq!(u32::from_le_bytes(body[2..6].try_into().unwrap()), 0x4000);
        assert_eq!(u32::from_le_bytes(body[6..10].try_into().unwrap()), 0x6000);
        assert_eq!(
            Msix::new(vec![], Arc::new(Routes::default())).unwrap_err(),
            MsixError::VectorCount(0)
        );
    }

    #[test]
    fn a_vector_irqfd_is_handed_out_only_while_deliverable_and_changes_are_reported() {
        let (mut m, _) = msix(2);
        assert!(m.deliverable_irqfd(0).is_none(), "disabled");
        assert!(
            !m.set_control(MSIX_CONTROL_ENABLE),
            "every vector still masked"
        );
        program(&mut m, 0, 0xfee0_0000, 0x41);
        assert!(m.deliverable_irqfd(0).is_none(), "masked");
        assert!(m.write_table(12, &0u32.to_le_bytes()), "unmasking vector 0");
        let irqfd = m.deliverable_irqfd(0).expect("deliverable");
        irqfd.write(1).unwrap();
        assert!(fired(&m, 0), "the duplicate is the vector's irqfd");
        assert!(m.deliverable_irqfd(1).is_none(), "vector 1 is still masked");
        assert!(m.deliverable_irqfd(7).is_none(), "out of range");
        assert!(
            !m.write_table(8, &0x42u32.to_le_bytes()),
            "new data, still deliverable"
        );
        assert!(m.set_control(MSIX_CONTROL_ENABLE | MSIX_CONTROL_FUNCTION_MASK));
        assert!(m.deliverable_irqfd(0).is_none(), "function masked");
        assert!(m.set_control(MSIX_CONTROL_ENABLE));
        assert!(m.write_table(12, &1u32.to_le_bytes()), "masking vector 0");
        assert!(m.deliverable_irqfd(0).is_none());
    }
}
