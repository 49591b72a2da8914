/*
 * Test fixture for running skiff's Windows tests under wine; never shipped with skiff.exe.
 *
 * Why: Rust's standard library (1.78 and later) imports ProcessPrng from bcryptprimitives.dll
 * on Windows for its random numbers. Wine 8.0 (Debian 12's wine64) has no such export, so
 * every Rust program fails to load under it. This stand-in implements ProcessPrng over
 * advapi32's SystemFunction036 (RtlGenRandom), which wine does have. scripts/wine-prefix builds
 * it with mingw and installs it into the test prefix's system32.
 */
#include <windows.h>

BOOLEAN WINAPI SystemFunction036(PVOID buffer, ULONG length);

__declspec(dllexport) BOOL WINAPI ProcessPrng(PBYTE data, SIZE_T length)
{
    while (length > 0) {
        ULONG chunk = length > 0x40000000 ? 0x40000000 : (ULONG)length;
        if (!SystemFunction036(data, chunk))
            return FALSE;
        data += chunk;
        length -= chunk;
    }
    return TRUE;
}
