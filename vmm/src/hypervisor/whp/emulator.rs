//! `Emulator`: WHP's instruction emulator (`winhvemulation.dll`) for the exits skiff cannot
//! finish from the exit context alone: string and `rep` port I/O, and MMIO. The emulator decodes
//! the instruction and calls back for each port or memory access, for the vCPU's registers and
//! for guest-virtual translations; the callbacks here unpack the Windows structures and hand the
//! accesses to `EmulatedAccess` (the same buses the run loop uses) and the register calls to a
//! `VpAccess` (the vCPU). Destroyed on drop.
//!
//! Windows only. The callbacks are tested under wine by calling them directly with structures
//! built by hand; the emulator itself needs `winhvemulation.dll`, which wine lacks.

use std::ffi::c_void;
use std::sync::Arc;

use windows::core::HRESULT;
use windows::Win32::Foundation::{E_INVALIDARG, S_OK};
use windows::Win32::System::Hypervisor::{
    WHV_EMULATOR_CALLBACKS, WHV_EMULATOR_IO_ACCESS_INFO, WHV_EMULATOR_MEMORY_ACCESS_INFO,
    WHV_EMULATOR_STATUS, WHV_MEMORY_ACCESS_CONTEXT, WHV_REGISTER_NAME, WHV_REGISTER_VALUE,
    WHV_TRANSLATE_GVA_FLAGS, WHV_TRANSLATE_GVA_RESULT_CODE, WHV_VP_EXIT_CONTEXT,
    WHV_X64_IO_PORT_ACCESS_CONTEXT,
};

use super::emulation::EmulatedAccess;
use super::library::WhpLibrary;

/// The vCPU the emulator works on: its registers and address translation.
pub trait VpAccess {
    /// Reads `names` into `values` (same length).
    fn get_registers(
        &self,
        names: &[WHV_REGISTER_NAME],
        values: &mut [WHV_REGISTER_VALUE],
    ) -> windows::core::Result<()>;
    /// Writes `values` to `names` (same length).
    fn set_registers(
        &self,
        names: &[WHV_REGISTER_NAME],
        values: &[WHV_REGISTER_VALUE],
    ) -> windows::core::Result<()>;
    /// Translates guest virtual `gva` as the vCPU would: the result code and the guest
    /// physical address.
    fn translate_gva(
        &self,
        gva: u64,
        flags: WHV_TRANSLATE_GVA_FLAGS,
    ) -> windows::core::Result<(WHV_TRANSLATE_GVA_RESULT_CODE, u64)>;
}

/// What one emulation's callbacks reach; passed to the emulator as its context pointer.
pub struct CallbackContext<'a> {
    /// The buses and guest RAM.
    pub access: EmulatedAccess<'a>,
    /// The vCPU.
    pub vp: &'a dyn VpAccess,
}

impl std::fmt::Debug for CallbackContext<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallbackContext").finish_non_exhaustive()
    }
}

/// # Safety (every callback)
/// `context` is the `&CallbackContext` `Emulator::try_io`/`try_mmio` passed, alive for the
/// emulation; the other pointers are the emulator's, valid for the call.
unsafe fn context<'a>(context: *const c_void) -> &'a CallbackContext<'a> {
    // SAFETY: see the function's contract.
    unsafe { &*context.cast::<CallbackContext<'a>>() }
}

/// `WHvEmulatorIoPortCallback`: one port access.
///
/// # Safety
/// See `context`; `io` points to a live `WHV_EMULATOR_IO_ACCESS_INFO`.
pub unsafe extern "system" fn io_port_callback(
    ctx: *const c_void,
    io: *mut WHV_EMULATOR_IO_ACCESS_INFO,
) -> HRESULT {
    // SAFETY: the emulator passes our context and a live access structure.
    let (ctx, io) = unsafe { (context(ctx), &mut *io) };
    match ctx
        .access
        .port(io.Direction != 0, io.Port, io.AccessSize, &mut io.Data)
    {
        Ok(()) => S_OK,
        Err(e) => {
            log::warn!("WHP emulator: {e}");
            E_INVALIDARG
        }
    }
}

/// `WHvEmulatorMemoryCallback`: one guest-physical access, RAM or MMIO.
///
/// # Safety
/// See `context`; `memory` points to a live `WHV_EMULATOR_MEMORY_ACCESS_INFO`.
pub unsafe extern "system" fn memory_callback(
    ctx: *const c_void,
    memory: *mut WHV_EMULATOR_MEMORY_ACCESS_INFO,
) -> HRESULT {
    // SAFETY: the emulator passes our context and a live access structure.
    let (ctx, m) = unsafe { (context(ctx), &mut *memory) };
    match ctx
        .access
        .memory(m.Direction != 0, m.GpaAddress, m.AccessSize, &mut m.Data)
    {
        Ok(()) => S_OK,
        Err(e) => {
            log::warn!("WHP emulator: {e}");
            E_INVALIDARG
        }
    }
}

/// `WHvEmulatorGetVirtualProcessorRegisters`.
///
/// # Safety
/// See `context`; `names` and `values` hold `count` elements.
pub unsafe extern "system" fn get_registers_callback(
    ctx: *const c_void,
    names: *const WHV_REGISTER_NAME,
    count: u32,
    values: *mut WHV_REGISTER_VALUE,
) -> HRESULT {
    let count = count as usize;
    // SAFETY: the emulator passes our context and two arrays of `count` elements.
    let (ctx, names, values) = unsafe {
        (
            context(ctx),
            std::slice::from_raw_parts(names, count),
            std::slice::from_raw_parts_mut(values, count),
        )
    };
    to_hresult(ctx.vp.get_registers(names, values))
}

/// `WHvEmulatorSetVirtualProcessorRegisters`.
///
/// # Safety
/// See `context`; `names` and `values` hold `count` elements.
pub unsafe extern "system" fn set_registers_callback(
    ctx: *const c_void,
    names: *const WHV_REGISTER_NAME,
    count: u32,
    values: *const WHV_REGISTER_VALUE,
) -> HRESULT {
    let count = count as usize;
    // SAFETY: the emulator passes our context and two arrays of `count` elements.
    let (ctx, names, values) = unsafe {
        (
            context(ctx),
            std::slice::from_raw_parts(names, count),
            std::slice::from_raw_parts(values, count),
        )
    };
    to_hresult(ctx.vp.set_registers(names, values))
}

/// `WHvEmulatorTranslateGvaPage`.
///
/// # Safety
/// See `context`; `result` and `gpa` are valid out-pointers.
pub unsafe extern "system" fn translate_gva_callback(
    ctx: *const c_void,
    gva: u64,
    flags: WHV_TRANSLATE_GVA_FLAGS,
    result: *mut WHV_TRANSLATE_GVA_RESULT_CODE,
    gpa: *mut u64,
) -> HRESULT {
    // SAFETY: the emulator passes our context.
    let ctx = unsafe { context(ctx) };
    match ctx.vp.translate_gva(gva, flags) {
        Ok((code, address)) => {
            // SAFETY: both are valid out-pointers for the call.
            unsafe {
                *result = code;
                *gpa = address;
            }
            S_OK
        }
        Err(e) => e.code(),
    }
}

fn to_hresult(r: windows::core::Result<()>) -> HRESULT {
    match r {
        Ok(()) => S_OK,
        Err(e) => e.code(),
    }
}

/// The callback table every `Emulator` is created with.
pub fn callbacks() -> WHV_EMULATOR_CALLBACKS {
    WHV_EMULATOR_CALLBACKS {
        Size: size_of::<WHV_EMULATOR_CALLBACKS>() as u32,
        Reserved: 0,
        WHvEmulatorIoPortCallback: Some(io_port_callback),
        WHvEmulatorMemoryCallback: Some(memory_callback),
        WHvEmulatorGetVirtualProcessorRegisters: Some(get_registers_callback),
        WHvEmulatorSetVirtualProcessorRegisters: Some(set_registers_callback),
        WHvEmulatorTranslateGvaPage: Some(translate_gva_callback),
    }
}

/// One instruction emulator (one per vCPU), destroyed on drop.
#[derive(Debug)]
pub struct Emulator {
    lib: Arc<WhpLibrary>,
    handle: *mut c_void,
}

// SAFETY: the emulator handle is used by one vCPU thread at a time (`&mut self` on the vCPU);
// moving it to that thread is fine.
unsafe impl Send for Emulator {}

impl Emulator {
    /// Creates an emulator with `callbacks()`.
    pub fn create(lib: Arc<WhpLibrary>) -> windows::core::Result<Self> {
        let table = callbacks();
        let mut handle = std::ptr::null_mut();
        // SAFETY: `table` is a complete callback table, read during the call; `handle` is a
        // valid out-pointer.
        unsafe { (lib.emulator_create)(&table, &mut handle) }.ok()?;
        Ok(Self { lib, handle })
    }

    /// Emulates the port I/O instruction of an exit; the status word says whether it finished.
    pub fn try_io(
        &mut self,
        context: &CallbackContext<'_>,
        vp: &WHV_VP_EXIT_CONTEXT,
        io: &WHV_X64_IO_PORT_ACCESS_CONTEXT,
    ) -> windows::core::Result<u32> {
        let mut status = WHV_EMULATOR_STATUS::default();
        // SAFETY: the handle is live; `context` outlives the call and is what the callbacks
        // read; the exit structures are read during the call only.
        unsafe {
            (self.lib.emulator_try_io)(
                self.handle,
                std::ptr::from_ref(context).cast(),
                vp,
                io,
                &mut status,
            )
        }
        .ok()?;
        // SAFETY: AsUINT32 covers the whole union.
        Ok(unsafe { status.AsUINT32 })
    }

    /// Emulates the MMIO instruction of an exit; the status word says whether it finished.
    pub fn try_mmio(
        &mut self,
        context: &CallbackContext<'_>,
        vp: &WHV_VP_EXIT_CONTEXT,
        memory: &WHV_MEMORY_ACCESS_CONTEXT,
    ) -> windows::core::Result<u32> {
        let mut status = WHV_EMULATOR_STATUS::default();
        // SAFETY: as in `try_io`.
        unsafe {
            (self.lib.emulator_try_mmio)(
                self.handle,
                std::ptr::from_ref(context).cast(),
                vp,
                memory,
                &mut status,
            )
        }
        .ok()?;
        // SAFETY: AsUINT32 covers the whole union.
        Ok(unsafe { status.AsUINT32 })
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        // SAFETY: the handle is live and destroyed once, here.
        if let Err(e) = unsafe { (self.lib.emulator_destroy)(self.handle) }.ok() {
            log::warn!("WHvEmulatorDestroyEmulator failed: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hypervisor::whp::emulation::GuestRam;
    use devices::bus::{Bus, BusDevice};
    use std::cell::RefCell;
    use std::sync::Mutex;
    use windows::Win32::System::Hypervisor::{
        WHvTranslateGvaFlagValidateRead, WHvTranslateGvaResultSuccess, WHvX64RegisterRip,
        WHvX64RegisterRsi,
    };

    struct Latch(u8);

    impl BusDevice for Latch {
        fn read(&mut self, _: u64, data: &mut [u8]) {
            data.fill(self.0);
        }
        fn write(&mut self, _: u64, data: &[u8]) {
            self.0 = data[0];
        }
    }

    struct NoRam;

    impl GuestRam for NoRam {
        fn read(&self, _: u64, _: &mut [u8]) -> bool {
            false
        }
        fn write(&self, _: u64, _: &[u8]) -> bool {
            false
        }
    }

    /// A vCPU with RSI and RIP, and an identity translation one page up.
    #[derive(Default)]
    struct FakeVp {
        regs: RefCell<[u64; 2]>,
    }

    fn slot(name: WHV_REGISTER_NAME) -> windows::core::Result<usize> {
        match name {
            n if n == WHvX64RegisterRsi => Ok(0),
            n if n == WHvX64RegisterRip => Ok(1),
            _ => Err(E_INVALIDARG.into()),
        }
    }

    impl VpAccess for FakeVp {
        fn get_registers(
            &self,
            names: &[WHV_REGISTER_NAME],
            values: &mut [WHV_REGISTER_VALUE],
        ) -> windows::core::Result<()> {
            for (n, v) in names.iter().zip(values) {
                v.Reg64 = self.regs.borrow()[slot(*n)?];
            }
            Ok(())
        }
        fn set_registers(
            &self,
            names: &[WHV_REGISTER_NAME],
            values: &[WHV_REGISTER_VALUE],
        ) -> windows::core::Result<()> {
            for (n, v) in names.iter().zip(values) {
                // SAFETY: the test writes 64-bit values.
                self.regs.borrow_mut()[slot(*n)?] = unsafe { v.Reg64 };
            }
            Ok(())
        }
        fn translate_gva(
            &self,
            gva: u64,
            _: WHV_TRANSLATE_GVA_FLAGS,
        ) -> windows::core::Result<(WHV_TRANSLATE_GVA_RESULT_CODE, u64)> {
            Ok((WHvTranslateGvaResultSuccess, gva + 0x1000))
        }
    }

    fn with_context(test: impl FnOnce(&CallbackContext<'_>, &Bus, &Bus)) {
        let pio = Bus::new();
        let mmio = Bus::new();
        pio.insert(Arc::new(Mutex::new(Latch(0x11))), 0x70, 2)
            .unwrap();
        mmio.insert(Arc::new(Mutex::new(Latch(0x22))), 0xfed0_0000, 0x1000)
            .unwrap();
        let vp = FakeVp::default();
        let ctx = CallbackContext {
            access: EmulatedAccess {
                pio: &pio,
                mmio: &mmio,
                ram: &NoRam,
            },
            vp: &vp,
        };
        test(&ctx, &pio, &mmio);
    }

    fn ptr(ctx: &CallbackContext<'_>) -> *const c_void {
        std::ptr::from_ref(ctx).cast()
    }

    #[test]
    fn the_io_port_callback_reaches_the_port_bus() {
        with_context(|ctx, pio, _| {
            let mut io = WHV_EMULATOR_IO_ACCESS_INFO {
                Direction: 1,
                Port: 0x71,
                AccessSize: 1,
                Data: 0x5a,
            };
            // SAFETY: a live context and access structure.
            assert_eq!(unsafe { io_port_callback(ptr(ctx), &mut io) }, S_OK);
            let mut back = [0u8; 1];
            pio.read(0x71, &mut back);
            assert_eq!(back, [0x5a]);
            io.Direction = 0;
            io.Port = 0x70;
            io.AccessSize = 2;
            io.Data = 0xffff_ffff;
            // SAFETY: as above.
            assert_eq!(unsafe { io_port_callback(ptr(ctx), &mut io) }, S_OK);
            assert_eq!(io.Data, 0x5a5a);
            io.AccessSize = 3;
            // SAFETY: as above.
            assert_eq!(unsafe { io_port_callback(ptr(ctx), &mut io) }, E_INVALIDARG);
        });
    }

    #[test]
    fn the_memory_callback_reaches_the_mmio_bus_outside_ram() {
        with_context(|ctx, _, mmio| {
            let mut m = WHV_EMULATOR_MEMORY_ACCESS_INFO {
                GpaAddress: 0xfed0_0040,
                Direction: 1,
                AccessSize: 1,
                Data: [0x33, 0, 0, 0, 0, 0, 0, 0],
            };
            // SAFETY: a live context and access structure.
            assert_eq!(unsafe { memory_callback(ptr(ctx), &mut m) }, S_OK);
            let mut back = [0u8; 1];
            mmio.read(0xfed0_0000, &mut back);
            assert_eq!(back, [0x33]);
            m.Direction = 0;
            m.AccessSize = 4;
            m.Data = [0xee; 8];
            // SAFETY: as above.
            assert_eq!(unsafe { memory_callback(ptr(ctx), &mut m) }, S_OK);
            assert_eq!(m.Data, [0x33, 0x33, 0x33, 0x33, 0, 0, 0, 0]);
            m.AccessSize = 9;
            // SAFETY: as above.
            assert_eq!(unsafe { memory_callback(ptr(ctx), &mut m) }, E_INVALIDARG);
        });
    }

    #[test]
    fn the_register_and_translation_callbacks_reach_the_vcpu() {
        with_context(|ctx, _, _| {
            let names = [WHvX64RegisterRip, WHvX64RegisterRsi];
            let values = [
                WHV_REGISTER_VALUE { Reg64: 0x1002 },
                WHV_REGISTER_VALUE { Reg64: 0x8000 },
            ];
            // SAFETY: two names and two values.
            let hr =
                unsafe { set_registers_callback(ptr(ctx), names.as_ptr(), 2, values.as_ptr()) };
            assert_eq!(hr, S_OK);
            let mut back = [WHV_REGISTER_VALUE::default(); 2];
            // SAFETY: as above.
            let hr =
                unsafe { get_registers_callback(ptr(ctx), names.as_ptr(), 2, back.as_mut_ptr()) };
            assert_eq!(hr, S_OK);
            // SAFETY: the fake wrote 64-bit values.
            assert_eq!(unsafe { (back[0].Reg64, back[1].Reg64) }, (0x1002, 0x8000));
            // A register the vCPU does not know fails the call with its error.
            let unknown = [WHV_REGISTER_NAME(0x7fff)];
            // SAFETY: one name, one value.
            let hr =
                unsafe { get_registers_callback(ptr(ctx), unknown.as_ptr(), 1, back.as_mut_ptr()) };
            assert_eq!(hr, E_INVALIDARG);

            let mut code = WHV_TRANSLATE_GVA_RESULT_CODE(-1);
            let mut gpa = 0;
            // SAFETY: valid out-pointers.
            let hr = unsafe {
                translate_gva_callback(
                    ptr(ctx),
                    0x40_0000,
                    WHvTranslateGvaFlagValidateRead,
                    &mut code,
                    &mut gpa,
                )
            };
            assert_eq!(
                (hr, code, gpa),
                (S_OK, WHvTranslateGvaResultSuccess, 0x40_1000)
            );
        });
    }

    #[test]
    fn the_callback_table_is_complete_and_sized() {
        let t = callbacks();
        assert_eq!(t.Size as usize, size_of::<WHV_EMULATOR_CALLBACKS>());
        assert!(t.WHvEmulatorIoPortCallback.is_some());
        assert!(t.WHvEmulatorMemoryCallback.is_some());
        assert!(t.WHvEmulatorGetVirtualProcessorRegisters.is_some());
        assert!(t.WHvEmulatorSetVirtualProcessorRegisters.is_some());
        assert!(t.WHvEmulatorTranslateGvaPage.is_some());
    }
}
