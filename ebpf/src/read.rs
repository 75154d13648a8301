//! Bounded reads of kernel memory at offsets resolved from BTF by user space.

use aya_ebpf::helpers::bpf_probe_read_kernel;

/// Reads a `T` at `base + offset` from kernel memory.
///
/// Returns `None` when the offset is absent on this kernel or the read faults;
/// callers count that and skip the packet.
#[inline(always)]
pub fn at<T: Copy>(base: usize, offset: u32) -> Option<T> {
    if base == 0 || offset == u32::MAX {
        return None;
    }
    // SAFETY: bpf_probe_read_kernel copies into a local and never dereferences
    // `base` directly; a bad address makes the helper fail, which we map to None.
    unsafe { bpf_probe_read_kernel((base + offset as usize) as *const T).ok() }
}
