//! The proxy-wasm imports the per-request path calls most, and the two the
//! handshake tick needs, called directly instead of through the SDK's
//! `hostcalls`:
//!
//! - `proxy_get_property` with a path serialized at compile time (the SDK
//!   builds a `Vec<&str>` and then a byte vector for every read);
//! - `proxy_get_header_map_pairs`, whose answer is read in place (the SDK
//!   turns every header into a `String` and a `Vec`);
//! - `proxy_get_current_time_nanoseconds`, read as Unix nanoseconds (the
//!   SDK makes a `SystemTime`, which every decision then turned back into
//!   seconds: ~25 ns in wasm);
//! - `proxy_set_effective_context` and `proxy_set_tick_period_milliseconds`,
//!   on the tick that re-checks connections waiting for their TLS handshake.
//!
//! All answer an unexpected status as an error — the SDK panics on one,
//! which would trap the VM — so the caller denies instead.
//!
//! Safety: the host answers with a pointer and size it obtained from our
//! exported allocator (`proxy_on_memory_allocate`, the SDK's, which returns
//! a boxed slice of exactly `size` bytes) — the ABI's contract, which the
//! SDK's own hostcalls rely on in the same way; ownership passes to us and
//! `Vec::from_raw_parts(ptr, size, size)` takes it back. A null pointer means
//! no buffer (an absent or empty value).

use std::ptr::null_mut;

/// `Status::Ok`.
const OK: u32 = 0;
/// `Status::NotFound`.
const NOT_FOUND: u32 = 1;

/// `MapType::HttpRequestHeaders`.
pub const HTTP_REQUEST_HEADERS: u32 = 0;

// Declared with `u32` for the status and map type (the SDK declares them
// with its enums): a status outside the SDK's enum must be an error here,
// not undefined behaviour.
#[allow(clashing_extern_declarations)]
#[link(wasm_import_module = "env")]
unsafe extern "C" {
    fn proxy_get_property(
        path_data: *const u8,
        path_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
    ) -> u32;
    fn proxy_get_header_map_pairs(
        map_type: u32,
        return_map_data: *mut *mut u8,
        return_map_size: *mut usize,
    ) -> u32;
    fn proxy_get_current_time_nanoseconds(return_time: *mut u64) -> u32;
    fn proxy_set_effective_context(context_id: u32) -> u32;
    fn proxy_set_tick_period_milliseconds(period: u32) -> u32;
}

/// Takes ownership of a buffer the host allocated through our allocator.
fn take(data: *mut u8, size: usize) -> Option<Vec<u8>> {
    if data.is_null() {
        return None;
    }
    // SAFETY: see the module documentation — `data` came from
    // `proxy_on_memory_allocate(size)`, a boxed slice of exactly `size` bytes
    // that the host filled and handed over.
    Some(unsafe { Vec::from_raw_parts(data, size, size) })
}

/// `proxy_get_property`: `Ok(None)` for `NotFound`, `Ok(Some(None))` for
/// `Ok` with no buffer (an empty value), `Err` for any other status.
fn property_call(raw_path: &[u8]) -> Result<Option<Option<Vec<u8>>>, u32> {
    let mut data: *mut u8 = null_mut();
    let mut size: usize = 0;
    // SAFETY: the path is a live slice for the call; `data` and `size` are
    // live locals the host writes.
    let status =
        unsafe { proxy_get_property(raw_path.as_ptr(), raw_path.len(), &mut data, &mut size) };
    match status {
        OK => Ok(Some(take(data, size))),
        NOT_FOUND => Ok(None),
        other => Err(other),
    }
}

/// A property by its raw path (segments joined by NUL, e.g.
/// `b"connection\0id"`). `Ok(None)` when the host does not have it (or has
/// it empty); `Err` carries any other status.
pub fn get_property(raw_path: &[u8]) -> Result<Option<Vec<u8>>, u32> {
    property_call(raw_path).map(Option::flatten)
}

/// Whether the host has a property at all, even an empty one, as opposed
/// to `NotFound`.
pub fn has_property(raw_path: &[u8]) -> Result<bool, u32> {
    property_call(raw_path).map(|found| found.is_some())
}

/// A header map in the ABI's serialized-pairs form (see [`super::host::Pairs`]);
/// empty when the host has no such map or it is empty.
pub fn get_header_map_pairs(map_type: u32) -> Result<Vec<u8>, u32> {
    let mut data: *mut u8 = null_mut();
    let mut size: usize = 0;
    // SAFETY: `data` and `size` are live locals the host writes.
    let status = unsafe { proxy_get_header_map_pairs(map_type, &mut data, &mut size) };
    match status {
        OK => Ok(take(data, size).unwrap_or_default()),
        other => Err(other),
    }
}

/// The host's wall clock, in nanoseconds since the Unix epoch.
pub fn current_time_nanos() -> Result<u64, u32> {
    let mut nanos: u64 = 0;
    // SAFETY: `nanos` is a live local the host writes.
    let status = unsafe { proxy_get_current_time_nanoseconds(&mut nanos) };
    match status {
        OK => Ok(nanos),
        other => Err(other),
    }
}

/// Makes `context_id` the context later host calls act on (from the root
/// context's tick). `Err` with the status when the host refuses (an unknown
/// context: `BadArgument`).
pub fn set_effective_context(context_id: u32) -> Result<(), u32> {
    // SAFETY: plain values in, a status out.
    match unsafe { proxy_set_effective_context(context_id) } {
        OK => Ok(()),
        other => Err(other),
    }
}

/// Asks for `proxy_on_tick` every `period_ms` on the calling context's root
/// context; 0 stops the ticks.
pub fn set_tick_period_ms(period_ms: u32) -> Result<(), u32> {
    // SAFETY: a plain value in, a status out.
    match unsafe { proxy_set_tick_period_milliseconds(period_ms) } {
        OK => Ok(()),
        other => Err(other),
    }
}
