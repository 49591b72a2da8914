//! `WhpLibrary`: the Windows Hypervisor Platform's DLLs, loaded with `LoadLibraryW` and resolved
//! with `GetProcAddress` into typed function pointers, never linked, so skiff.exe starts on any
//! Windows and says in one line why it cannot run a VM where the platform is missing.
//!
//! The function types repeat the documented WinHvPlatform.h / WinHvEmulation.h signatures with
//! the `windows` crate's types; the crate's own `WHv*` functions are not called because calling
//! them would link the DLLs.

use std::ffi::c_void;

use thiserror::Error;
use windows::core::{s, w, HRESULT, PCSTR, PCWSTR};
use windows::Win32::Foundation::{FreeLibrary, HMODULE};
use windows::Win32::System::Hypervisor::{
    WHvCapabilityCodeHypervisorPresent, WHV_CAPABILITY, WHV_CAPABILITY_CODE,
    WHV_EMULATOR_CALLBACKS, WHV_EMULATOR_STATUS, WHV_INTERRUPT_CONTROL, WHV_MAP_GPA_RANGE_FLAGS,
    WHV_MEMORY_ACCESS_CONTEXT, WHV_PARTITION_HANDLE, WHV_PARTITION_PROPERTY_CODE,
    WHV_REGISTER_NAME, WHV_REGISTER_VALUE, WHV_TRANSLATE_GVA_FLAGS, WHV_TRANSLATE_GVA_RESULT,
    WHV_VP_EXIT_CONTEXT, WHV_X64_IO_PORT_ACCESS_CONTEXT,
};
use windows::Win32::System::LibraryLoader::{GetProcAddress, LoadLibraryW};

/// Why the platform cannot be used. Every message reads as the tail of
/// "Windows Hypervisor Platform is not enabled: ...".
#[derive(Debug, Error)]
pub enum WhpLoadError {
    /// A DLL could not be loaded (the optional feature is not installed).
    #[error("Windows Hypervisor Platform is not enabled: {dll} cannot be loaded (turn on the \"Windows Hypervisor Platform\" feature and restart)")]
    Library {
        /// The DLL.
        dll: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A DLL lacks a function skiff needs (a Windows too old for it).
    #[error("Windows Hypervisor Platform is not enabled: {dll} has no {function} (this Windows is too old)")]
    Function {
        /// The DLL.
        dll: &'static str,
        /// The missing export.
        function: &'static str,
    },
    /// The DLLs are there but the hypervisor is not running.
    #[error("Windows Hypervisor Platform is not enabled: the hypervisor is not running (turn on virtualization in the firmware and the \"Windows Hypervisor Platform\" feature)")]
    NotPresent,
    /// `WHvGetCapability` itself failed.
    #[error("Windows Hypervisor Platform is not enabled: WHvGetCapability failed")]
    Capability(#[source] windows::core::Error),
}

/// `WHvGetCapability`.
pub type GetCapabilityFn =
    unsafe extern "system" fn(WHV_CAPABILITY_CODE, *mut c_void, u32, *mut u32) -> HRESULT;
/// `WHvCreatePartition`.
pub type CreatePartitionFn = unsafe extern "system" fn(*mut WHV_PARTITION_HANDLE) -> HRESULT;
/// `WHvSetupPartition` and `WHvDeletePartition`.
pub type PartitionFn = unsafe extern "system" fn(WHV_PARTITION_HANDLE) -> HRESULT;
/// `WHvSetPartitionProperty`.
pub type SetPartitionPropertyFn = unsafe extern "system" fn(
    WHV_PARTITION_HANDLE,
    WHV_PARTITION_PROPERTY_CODE,
    *const c_void,
    u32,
) -> HRESULT;
/// `WHvMapGpaRange`.
pub type MapGpaRangeFn = unsafe extern "system" fn(
    WHV_PARTITION_HANDLE,
    *const c_void,
    u64,
    u64,
    WHV_MAP_GPA_RANGE_FLAGS,
) -> HRESULT;
/// `WHvUnmapGpaRange`.
pub type UnmapGpaRangeFn = unsafe extern "system" fn(WHV_PARTITION_HANDLE, u64, u64) -> HRESULT;
/// `WHvCreateVirtualProcessor` and `WHvCancelRunVirtualProcessor` (index, flags).
pub type VpFlagsFn = unsafe extern "system" fn(WHV_PARTITION_HANDLE, u32, u32) -> HRESULT;
/// `WHvDeleteVirtualProcessor`.
pub type DeleteVpFn = unsafe extern "system" fn(WHV_PARTITION_HANDLE, u32) -> HRESULT;
/// `WHvRunVirtualProcessor`.
pub type RunVpFn =
    unsafe extern "system" fn(WHV_PARTITION_HANDLE, u32, *mut c_void, u32) -> HRESULT;
/// `WHvGetVirtualProcessorRegisters`.
pub type GetRegistersFn = unsafe extern "system" fn(
    WHV_PARTITION_HANDLE,
    u32,
    *const WHV_REGISTER_NAME,
    u32,
    *mut WHV_REGISTER_VALUE,
) -> HRESULT;
/// `WHvSetVirtualProcessorRegisters`.
pub type SetRegistersFn = unsafe extern "system" fn(
    WHV_PARTITION_HANDLE,
    u32,
    *const WHV_REGISTER_NAME,
    u32,
    *const WHV_REGISTER_VALUE,
) -> HRESULT;
/// `WHvRequestInterrupt`.
pub type RequestInterruptFn =
    unsafe extern "system" fn(WHV_PARTITION_HANDLE, *const WHV_INTERRUPT_CONTROL, u32) -> HRESULT;
/// `WHvQueryGpaRangeDirtyBitmap`.
pub type QueryDirtyBitmapFn =
    unsafe extern "system" fn(WHV_PARTITION_HANDLE, u64, u64, *mut u64, u32) -> HRESULT;
/// `WHvTranslateGva`.
pub type TranslateGvaFn = unsafe extern "system" fn(
    WHV_PARTITION_HANDLE,
    u32,
    u64,
    WHV_TRANSLATE_GVA_FLAGS,
    *mut WHV_TRANSLATE_GVA_RESULT,
    *mut u64,
) -> HRESULT;
/// `WHvGetVirtualProcessorInterruptControllerState2`.
pub type GetApicStateFn =
    unsafe extern "system" fn(WHV_PARTITION_HANDLE, u32, *mut c_void, u32, *mut u32) -> HRESULT;
/// `WHvSetVirtualProcessorInterruptControllerState2`.
pub type SetApicStateFn =
    unsafe extern "system" fn(WHV_PARTITION_HANDLE, u32, *const c_void, u32) -> HRESULT;
/// `WHvEmulatorCreateEmulator`.
pub type EmulatorCreateFn =
    unsafe extern "system" fn(*const WHV_EMULATOR_CALLBACKS, *mut *mut c_void) -> HRESULT;
/// `WHvEmulatorDestroyEmulator`.
pub type EmulatorDestroyFn = unsafe extern "system" fn(*const c_void) -> HRESULT;
/// `WHvEmulatorTryIoEmulation`.
pub type EmulatorTryIoFn = unsafe extern "system" fn(
    *const c_void,
    *const c_void,
    *const WHV_VP_EXIT_CONTEXT,
    *const WHV_X64_IO_PORT_ACCESS_CONTEXT,
    *mut WHV_EMULATOR_STATUS,
) -> HRESULT;
/// `WHvEmulatorTryMmioEmulation`.
pub type EmulatorTryMmioFn = unsafe extern "system" fn(
    *const c_void,
    *const c_void,
    *const WHV_VP_EXIT_CONTEXT,
    *const WHV_MEMORY_ACCESS_CONTEXT,
    *mut WHV_EMULATOR_STATUS,
) -> HRESULT;

/// A loaded DLL, freed on drop.
#[derive(Debug)]
struct Library {
    name: &'static str,
    module: HMODULE,
}

impl Library {
    fn load(name: &'static str, wide: PCWSTR) -> Result<Self, WhpLoadError> {
        // SAFETY: `wide` is a NUL-terminated UTF-16 literal; the module is freed on drop.
        let module = unsafe { LoadLibraryW(wide) }.map_err(|e| WhpLoadError::Library {
            dll: name,
            source: e.into(),
        })?;
        Ok(Self { name, module })
    }

    /// The export `function` (`symbol` is the same name, NUL-terminated) as a `F`.
    ///
    /// # Safety
    /// `F` must be the `unsafe extern "system" fn` type of the export's documented signature.
    unsafe fn resolve<F: Copy>(
        &self,
        function: &'static str,
        symbol: PCSTR,
    ) -> Result<F, WhpLoadError> {
        // SAFETY: the module is loaded while `self` lives and `symbol` is NUL-terminated.
        let address =
            unsafe { GetProcAddress(self.module, symbol) }.ok_or(WhpLoadError::Function {
                dll: self.name,
                function,
            })?;
        const { assert!(size_of::<F>() == size_of::<unsafe extern "system" fn() -> isize>()) };
        // SAFETY: the caller names the export's true signature as `F`, a function pointer of
        // the same size (asserted above).
        Ok(
            unsafe {
                std::mem::transmute_copy::<unsafe extern "system" fn() -> isize, F>(&address)
            },
        )
    }
}

impl Drop for Library {
    fn drop(&mut self) {
        // SAFETY: the module was loaded by `Library::load` and is freed once, here; the
        // function pointers resolved from it live in the same `WhpLibrary`, dropped together.
        let _ = unsafe { FreeLibrary(self.module) };
    }
}

macro_rules! resolve {
    ($lib:expr, $name:literal) => {
        // SAFETY: the field's type is the export's documented signature.
        unsafe { $lib.resolve($name, s!($name)) }?
    };
}

/// The platform's entry points. The function pointers are valid while this value lives.
#[derive(Debug)]
pub struct WhpLibrary {
    /// `WHvGetCapability`.
    pub get_capability: GetCapabilityFn,
    /// `WHvCreatePartition`.
    pub create_partition: CreatePartitionFn,
    /// `WHvSetupPartition`.
    pub setup_partition: PartitionFn,
    /// `WHvDeletePartition`.
    pub delete_partition: PartitionFn,
    /// `WHvSetPartitionProperty`.
    pub set_partition_property: SetPartitionPropertyFn,
    /// `WHvMapGpaRange`.
    pub map_gpa_range: MapGpaRangeFn,
    /// `WHvUnmapGpaRange`.
    pub unmap_gpa_range: UnmapGpaRangeFn,
    /// `WHvCreateVirtualProcessor`.
    pub create_virtual_processor: VpFlagsFn,
    /// `WHvDeleteVirtualProcessor`.
    pub delete_virtual_processor: DeleteVpFn,
    /// `WHvRunVirtualProcessor`.
    pub run_virtual_processor: RunVpFn,
    /// `WHvCancelRunVirtualProcessor`.
    pub cancel_run_virtual_processor: VpFlagsFn,
    /// `WHvGetVirtualProcessorRegisters`.
    pub get_registers: GetRegistersFn,
    /// `WHvSetVirtualProcessorRegisters`.
    pub set_registers: SetRegistersFn,
    /// `WHvRequestInterrupt`.
    pub request_interrupt: RequestInterruptFn,
    /// `WHvQueryGpaRangeDirtyBitmap`.
    pub query_dirty_bitmap: QueryDirtyBitmapFn,
    /// `WHvTranslateGva`.
    pub translate_gva: TranslateGvaFn,
    /// `WHvGetVirtualProcessorInterruptControllerState2`.
    pub get_apic_state: GetApicStateFn,
    /// `WHvSetVirtualProcessorInterruptControllerState2`.
    pub set_apic_state: SetApicStateFn,
    /// `WHvEmulatorCreateEmulator`.
    pub emulator_create: EmulatorCreateFn,
    /// `WHvEmulatorDestroyEmulator`.
    pub emulator_destroy: EmulatorDestroyFn,
    /// `WHvEmulatorTryIoEmulation`.
    pub emulator_try_io: EmulatorTryIoFn,
    /// `WHvEmulatorTryMmioEmulation`.
    pub emulator_try_mmio: EmulatorTryMmioFn,
    // Last: the modules are freed after nothing can call through the pointers above.
    _platform: Library,
    _emulation: Library,
}

// SAFETY: module handles are process-wide and the function pointers are plain code addresses;
// nothing in the library is mutated after `load`, and the WHP functions may be called from any
// thread.
unsafe impl Send for WhpLibrary {}
// SAFETY: as above.
unsafe impl Sync for WhpLibrary {}

impl WhpLibrary {
    /// Loads both DLLs, resolves every entry point and checks that the hypervisor runs.
    pub fn load() -> Result<Self, WhpLoadError> {
        let platform = Library::load("winhvplatform.dll", w!("winhvplatform.dll"))?;
        let emulation = Library::load("winhvemulation.dll", w!("winhvemulation.dll"))?;
        let lib = Self {
            get_capability: resolve!(platform, "WHvGetCapability"),
            create_partition: resolve!(platform, "WHvCreatePartition"),
            setup_partition: resolve!(platform, "WHvSetupPartition"),
            delete_partition: resolve!(platform, "WHvDeletePartition"),
            set_partition_property: resolve!(platform, "WHvSetPartitionProperty"),
            map_gpa_range: resolve!(platform, "WHvMapGpaRange"),
            unmap_gpa_range: resolve!(platform, "WHvUnmapGpaRange"),
            create_virtual_processor: resolve!(platform, "WHvCreateVirtualProcessor"),
            delete_virtual_processor: resolve!(platform, "WHvDeleteVirtualProcessor"),
            run_virtual_processor: resolve!(platform, "WHvRunVirtualProcessor"),
            cancel_run_virtual_processor: resolve!(platform, "WHvCancelRunVirtualProcessor"),
            get_registers: resolve!(platform, "WHvGetVirtualProcessorRegisters"),
            set_registers: resolve!(platform, "WHvSetVirtualProcessorRegisters"),
            request_interrupt: resolve!(platform, "WHvRequestInterrupt"),
            query_dirty_bitmap: resolve!(platform, "WHvQueryGpaRangeDirtyBitmap"),
            translate_gva: resolve!(platform, "WHvTranslateGva"),
            get_apic_state: resolve!(platform, "WHvGetVirtualProcessorInterruptControllerState2"),
            set_apic_state: resolve!(platform, "WHvSetVirtualProcessorInterruptControllerState2"),
            emulator_create: resolve!(emulation, "WHvEmulatorCreateEmulator"),
            emulator_destroy: resolve!(emulation, "WHvEmulatorDestroyEmulator"),
            emulator_try_io: resolve!(emulation, "WHvEmulatorTryIoEmulation"),
            emulator_try_mmio: resolve!(emulation, "WHvEmulatorTryMmioEmulation"),
            _platform: platform,
            _emulation: emulation,
        };
        if !lib.hypervisor_present()? {
            return Err(WhpLoadError::NotPresent);
        }
        Ok(lib)
    }

    fn hypervisor_present(&self) -> Result<bool, WhpLoadError> {
        let mut capability = WHV_CAPABILITY::default();
        let mut written = 0u32;
        // SAFETY: the buffer is a WHV_CAPABILITY of the size passed; `written` is a valid u32.
        unsafe {
            (self.get_capability)(
                WHvCapabilityCodeHypervisorPresent,
                (&raw mut capability).cast(),
                size_of::<WHV_CAPABILITY>() as u32,
                &mut written,
            )
        }
        .ok()
        .map_err(WhpLoadError::Capability)?;
        // SAFETY: HypervisorPresent is the union member WHvCapabilityCodeHypervisorPresent fills.
        Ok(unsafe { capability.HypervisorPresent }.as_bool())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs under wine, which has no winhvplatform.dll (and on a Windows without the feature).
    #[test]
    fn a_missing_platform_is_one_clear_error() {
        let e = WhpLibrary::load().unwrap_err();
        assert!(
            matches!(
                e,
                WhpLoadError::Library {
                    dll: "winhvplatform.dll",
                    ..
                }
            ),
            "{e:?}"
        );
        let text = crate::error_chain(&e);
        assert!(
            text.starts_with(
                "Windows Hypervisor Platform is not enabled: winhvplatform.dll cannot be loaded"
            ),
            "{text}"
        );
        assert!(!text.contains(['\n', '\r']), "{text:?}");
    }
}
