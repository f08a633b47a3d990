//! The host functions (`env.proxy_*`) a plugin imports. Every guest pointer
//! and length is bounds-checked: a bad one answers `INVALID_MEMORY_ACCESS`,
//! never a trap. Only a failing guest allocator traps (the guest is broken).

use wasmtime::{Caller, Linker};

use super::abi::{
    BufferType, LogLevel, MapType, MetricType, Pairs, Status, StreamType, deserialize_pairs,
    serialize_pairs, serialize_pairs_into, split_path,
};
use super::properties::PropValue;
use super::state::{ContextState, HostState, HttpCallRequest, LocalResponse, LogLine};

/// Why a host call stops: a status for the guest, or a trap.
pub(crate) enum Fault {
    Status(Status),
    Trap(wasmtime::Error),
}

impl From<Status> for Fault {
    fn from(s: Status) -> Self {
        Fault::Status(s)
    }
}

pub(crate) type HostResult<T> = Result<T, Fault>;

/// Turns a host call's result into what the guest gets.
pub(crate) fn finish(r: HostResult<()>) -> wasmtime::Result<i32> {
    match r {
        Ok(()) => Ok(Status::Ok.code()),
        Err(Fault::Status(s)) => Ok(s.code()),
        Err(Fault::Trap(e)) => Err(e),
    }
}

type C<'a> = Caller<'a, HostState>;

fn range(ptr: i32, len: i32) -> Option<std::ops::Range<usize>> {
    let start = ptr as u32 as usize;
    let end = start.checked_add(len as u32 as usize)?;
    Some(start..end)
}

/// Copies `len` bytes at `ptr` out of guest memory.
pub(crate) fn read(caller: &mut C<'_>, ptr: i32, len: i32) -> HostResult<Vec<u8>> {
    let memory = caller.data().memory.ok_or(Status::InvalidMemoryAccess)?;
    let r = range(ptr, len).ok_or(Status::InvalidMemoryAccess)?;
    memory
        .data(&*caller)
        .get(r)
        .map(<[u8]>::to_vec)
        .ok_or(Fault::Status(Status::InvalidMemoryAccess))
}

/// Writes `bytes` at `ptr` in guest memory.
pub(crate) fn write(caller: &mut C<'_>, ptr: i32, bytes: &[u8]) -> HostResult<()> {
    let memory = caller.data().memory.ok_or(Status::InvalidMemoryAccess)?;
    let len = i32::try_from(bytes.len()).map_err(|_| Status::InvalidMemoryAccess)?;
    let r = range(ptr, len).ok_or(Status::InvalidMemoryAccess)?;
    let slot = memory
        .data_mut(&mut *caller)
        .get_mut(r)
        .ok_or(Status::InvalidMemoryAccess)?;
    slot.copy_from_slice(bytes);
    Ok(())
}

pub(crate) fn check_readable(caller: &mut C<'_>, ptr: i32, len: i32) -> HostResult<()> {
    check_writable(caller, ptr, len)
}

pub(crate) fn check_writable(caller: &mut C<'_>, ptr: i32, len: i32) -> HostResult<()> {
    let memory = caller.data().memory.ok_or(Status::InvalidMemoryAccess)?;
    let r = range(ptr, len).ok_or(Status::InvalidMemoryAccess)?;
    if memory.data(&*caller).get(r).is_none() {
        return Err(Status::InvalidMemoryAccess.into());
    }
    Ok(())
}

pub(crate) fn write_u32(caller: &mut C<'_>, ptr: i32, v: u32) -> HostResult<()> {
    write(caller, ptr, &v.to_le_bytes())
}

pub(crate) fn write_u64(caller: &mut C<'_>, ptr: i32, v: u64) -> HostResult<()> {
    write(caller, ptr, &v.to_le_bytes())
}

/// Allocates `bytes.len()` in the guest with its allocator, copies `bytes`
/// there and writes the pointer and size to `ptr_ptr` / `size_ptr`, like
/// Envoy (an empty value is a null pointer and size 0).
pub(crate) fn copy_out(
    caller: &mut C<'_>,
    bytes: &[u8],
    ptr_ptr: i32,
    size_ptr: i32,
) -> HostResult<()> {
    check_writable(caller, ptr_ptr, 4)?;
    check_writable(caller, size_ptr, 4)?;
    let size = i32::try_from(bytes.len()).map_err(|_| Status::InvalidMemoryAccess)?;
    let mut addr = 0i32;
    if !bytes.is_empty() {
        let alloc = caller
            .data()
            .alloc
            .clone()
            .ok_or(Status::InvalidMemoryAccess)?;
        addr = alloc.call(&mut *caller, size).map_err(Fault::Trap)?;
        if addr == 0 {
            return Err(Status::InvalidMemoryAccess.into());
        }
        write(caller, addr, bytes)?;
    }
    write_u32(caller, ptr_ptr, addr as u32)?;
    write_u32(caller, size_ptr, size as u32)
}

fn utf8(bytes: Vec<u8>) -> String {
    String::from_utf8(bytes).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

fn pairs_to_strings(pairs: &Pairs) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (utf8(k.clone()), utf8(v.clone())))
        .collect()
}

fn effective<'a>(caller: &'a mut C<'_>) -> HostResult<&'a mut ContextState> {
    let id = caller.data().effective;
    caller
        .data_mut()
        .contexts
        .get_mut(&id)
        .ok_or(Fault::Status(Status::NotFound))
}

fn map_mut<'a>(caller: &'a mut C<'_>, map: MapType) -> HostResult<&'a mut Pairs> {
    if matches!(
        map,
        MapType::HttpCallResponseHeaders | MapType::HttpCallResponseTrailers
    ) {
        return Err(Status::BadArgument.into());
    }
    let ctx = effective(caller)?;
    match map {
        MapType::HttpRequestHeaders => Ok(&mut ctx.request_headers),
        MapType::HttpRequestTrailers => Ok(&mut ctx.request_trailers),
        MapType::HttpResponseHeaders => Ok(&mut ctx.response_headers),
        MapType::HttpResponseTrailers => Ok(&mut ctx.response_trailers),
        _ => Err(Status::BadArgument.into()),
    }
}

/// A copy of a readable map; `None` where the map is not available now.
fn map_read(caller: &mut C<'_>, map: MapType) -> HostResult<Option<Pairs>> {
    match map {
        MapType::HttpCallResponseHeaders | MapType::HttpCallResponseTrailers => {
            let resp = caller.data().call_response.as_ref();
            Ok(resp.map(|r| {
                let src = if map == MapType::HttpCallResponseHeaders {
                    &r.headers
                } else {
                    &r.trailers
                };
                src.iter()
                    .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
                    .collect()
            }))
        }
        MapType::GrpcCallInitialMetadata | MapType::GrpcCallTrailingMetadata => Ok(None),
        _ => match map_mut(caller, map) {
            Ok(m) => Ok(Some(m.clone())),
            Err(Fault::Status(Status::NotFound)) => Ok(None),
            Err(e) => Err(e),
        },
    }
}

/// Appends the first value of `key` (any case) in a readable map to `out`
/// — without copying the map. `false` when the map or the key is not there.
fn map_get_into(
    state: &HostState,
    map: MapType,
    key: &[u8],
    out: &mut Vec<u8>,
) -> HostResult<bool> {
    let same = |k: &[u8]| k.eq_ignore_ascii_case(key);
    let found = match map {
        MapType::HttpCallResponseHeaders | MapType::HttpCallResponseTrailers => {
            state.call_response.as_ref().and_then(|r| {
                let src = if map == MapType::HttpCallResponseHeaders {
                    &r.headers
                } else {
                    &r.trailers
                };
                src.iter()
                    .find(|(k, _)| same(k.as_bytes()))
                    .map(|(_, v)| v.as_bytes())
            })
        }
        MapType::GrpcCallInitialMetadata | MapType::GrpcCallTrailingMetadata => None,
        _ => {
            let Some(ctx) = state.contexts.get(&state.effective) else {
                return Ok(false);
            };
            let pairs = match map {
                MapType::HttpRequestHeaders => &ctx.request_headers,
                MapType::HttpRequestTrailers => &ctx.request_trailers,
                MapType::HttpResponseHeaders => &ctx.response_headers,
                MapType::HttpResponseTrailers => &ctx.response_trailers,
                _ => return Err(Status::BadArgument.into()),
            };
            pairs
                .iter()
                .find(|(k, _)| same(k))
                .map(|(_, v)| v.as_slice())
        }
    };
    Ok(found.is_some_and(|v| {
        out.extend_from_slice(v);
        true
    }))
}

/// Runs `lookup` on the guest bytes at `ptr`/`len` and the host state, then
/// copies what it appended to the host's scratch buffer out to the guest
/// (`NOT_FOUND` when it found nothing). Neither the guest's bytes nor the
/// answer are copied into a fresh allocation: a property or header read is
/// the plugin's most frequent host call.
fn answer_with(
    caller: &mut C<'_>,
    ptr: i32,
    len: i32,
    ret_ptr: i32,
    ret_size: i32,
    lookup: impl FnOnce(&HostState, &[u8], &mut Vec<u8>) -> HostResult<bool>,
) -> HostResult<()> {
    let memory = caller.data().memory.ok_or(Status::InvalidMemoryAccess)?;
    let r = range(ptr, len).ok_or(Status::InvalidMemoryAccess)?;
    let mut buf = std::mem::take(&mut caller.data_mut().scratch);
    buf.clear();
    let found = {
        let (mem, state) = memory.data_and_store_mut(&mut *caller);
        match mem.get(r) {
            Some(input) => lookup(state, input, &mut buf),
            None => Err(Status::InvalidMemoryAccess.into()),
        }
    };
    let result = match found {
        Ok(true) => copy_out(caller, &buf, ret_ptr, ret_size),
        Ok(false) => Err(Status::NotFound.into()),
        Err(e) => Err(e),
    };
    caller.data_mut().scratch = buf;
    result
}

fn lower(key: &[u8]) -> Vec<u8> {
    key.to_ascii_lowercase()
}

fn proxy_log(mut caller: C<'_>, level: i32, ptr: i32, len: i32) -> wasmtime::Result<i32> {
    finish((|| {
        let level = LogLevel::from_guest(level).ok_or(Status::BadArgument)?;
        if level < caller.data().log_level {
            // Still a bad pointer is an error, like Envoy (it reads first).
            check_readable(&mut caller, ptr, len)?;
            return Ok(());
        }
        let message = utf8(read(&mut caller, ptr, len)?);
        let state = caller.data();
        {
            state.env.logs.push(LogLine {
                level,
                plugin: state.plugin_name.clone(),
                message,
            });
        }
        Ok(())
    })())
}

fn proxy_get_log_level(mut caller: C<'_>, ret: i32) -> wasmtime::Result<i32> {
    let level = caller.data().log_level as u32;
    finish(write_u32(&mut caller, ret, level))
}

fn proxy_get_current_time_nanoseconds(mut caller: C<'_>, ret: i32) -> wasmtime::Result<i32> {
    let nanos = caller
        .data_mut()
        .now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0);
    finish(write_u64(&mut caller, ret, nanos))
}

fn proxy_set_tick_period_milliseconds(mut caller: C<'_>, period: i32) -> wasmtime::Result<i32> {
    caller.data_mut().tick_period_ms = period as u32;
    Ok(Status::Ok.code())
}

fn buffer(caller: &mut C<'_>, which: BufferType) -> HostResult<Vec<u8>> {
    let state = caller.data();
    match which {
        BufferType::PluginConfiguration => Ok(state.plugin_configuration.clone()),
        BufferType::VmConfiguration => Ok(state.vm_configuration.clone()),
        BufferType::HttpCallResponseBody => state
            .call_response
            .as_ref()
            .map(|r| r.body.clone())
            .ok_or(Fault::Status(Status::NotFound)),
        BufferType::HttpRequestBody => Ok(effective(caller)?.request_body.clone()),
        BufferType::HttpResponseBody => Ok(effective(caller)?.response_body.clone()),
        BufferType::DownstreamData => Ok(effective(caller)?.downstream_data.clone()),
        BufferType::UpstreamData => Ok(effective(caller)?.upstream_data.clone()),
        BufferType::GrpcCallMessage | BufferType::ForeignFunctionArguments => {
            Err(Status::NotFound.into())
        }
    }
}

fn proxy_get_buffer_bytes(
    mut caller: C<'_>,
    which: i32,
    start: i32,
    max: i32,
    ret_ptr: i32,
    ret_size: i32,
) -> wasmtime::Result<i32> {
    finish((|| {
        let which = BufferType::from_guest(which).ok_or(Status::BadArgument)?;
        let data = buffer(&mut caller, which)?;
        let start = start as u32 as usize;
        let end = start.saturating_add(max as u32 as usize).min(data.len());
        if start > data.len() {
            return Err(Status::BadArgument.into());
        }
        let slice = data.get(start..end).ok_or(Status::BadArgument)?;
        copy_out(&mut caller, slice, ret_ptr, ret_size)
    })())
}

fn proxy_get_buffer_status(
    mut caller: C<'_>,
    which: i32,
    ret_size: i32,
    ret_flags: i32,
) -> wasmtime::Result<i32> {
    finish((|| {
        let which = BufferType::from_guest(which).ok_or(Status::BadArgument)?;
        let data = buffer(&mut caller, which)?;
        write_u32(
            &mut caller,
            ret_size,
            u32::try_from(data.len()).unwrap_or(u32::MAX),
        )?;
        write_u32(&mut caller, ret_flags, 0)
    })())
}

fn proxy_set_buffer_bytes(
    mut caller: C<'_>,
    which: i32,
    start: i32,
    size: i32,
    ptr: i32,
    len: i32,
) -> wasmtime::Result<i32> {
    finish((|| {
        let which = BufferType::from_guest(which).ok_or(Status::BadArgument)?;
        let value = read(&mut caller, ptr, len)?;
        let ctx = effective(&mut caller)?;
        let buf = match which {
            BufferType::HttpRequestBody => &mut ctx.request_body,
            BufferType::HttpResponseBody => &mut ctx.response_body,
            BufferType::DownstreamData => &mut ctx.downstream_data,
            BufferType::UpstreamData => &mut ctx.upstream_data,
            _ => return Err(Status::NotFound.into()),
        };
        let start = (start as u32 as usize).min(buf.len());
        let end = start.saturating_add(size as u32 as usize).min(buf.len());
        buf.splice(start..end, value);
        Ok(())
    })())
}

fn proxy_get_header_map_size(mut caller: C<'_>, map: i32, ret_size: i32) -> wasmtime::Result<i32> {
    finish((|| {
        let map = MapType::from_guest(map).ok_or(Status::BadArgument)?;
        let pairs = map_read(&mut caller, map)?.unwrap_or_default();
        let size = serialize_pairs(&pairs).len();
        write_u32(
            &mut caller,
            ret_size,
            u32::try_from(size).unwrap_or(u32::MAX),
        )
    })())
}

fn proxy_get_header_map_pairs(
    mut caller: C<'_>,
    map: i32,
    ret_ptr: i32,
    ret_size: i32,
) -> wasmtime::Result<i32> {
    finish((|| {
        let map = MapType::from_guest(map).ok_or(Status::BadArgument)?;
        let stream_map = matches!(
            map,
            MapType::HttpRequestHeaders
                | MapType::HttpRequestTrailers
                | MapType::HttpResponseHeaders
                | MapType::HttpResponseTrailers
        );
        if !stream_map {
            let pairs = map_read(&mut caller, map)?.unwrap_or_default();
            return copy_out(&mut caller, &serialize_pairs(&pairs), ret_ptr, ret_size);
        }
        // A stream's own map (every request's headers): serialized straight
        // from the context into the scratch buffer, no copy of the map.
        let mut buf = std::mem::take(&mut caller.data_mut().scratch);
        buf.clear();
        if let Ok(pairs) = map_mut(&mut caller, map) {
            serialize_pairs_into(pairs, &mut buf);
        }
        let result = copy_out(&mut caller, &buf, ret_ptr, ret_size);
        caller.data_mut().scratch = buf;
        result
    })())
}

fn proxy_set_header_map_pairs(
    mut caller: C<'_>,
    map: i32,
    ptr: i32,
    len: i32,
) -> wasmtime::Result<i32> {
    finish((|| {
        let map = MapType::from_guest(map).ok_or(Status::BadArgument)?;
        let bytes = read(&mut caller, ptr, len)?;
        let pairs = deserialize_pairs(&bytes).map_err(|_| Status::BadArgument)?;
        let target = map_mut(&mut caller, map)?;
        *target = pairs.into_iter().map(|(k, v)| (lower(&k), v)).collect();
        Ok(())
    })())
}

fn proxy_get_header_map_value(
    mut caller: C<'_>,
    map: i32,
    key_ptr: i32,
    key_len: i32,
    ret_ptr: i32,
    ret_size: i32,
) -> wasmtime::Result<i32> {
    finish((|| {
        let map = MapType::from_guest(map).ok_or(Status::BadArgument)?;
        answer_with(
            &mut caller,
            key_ptr,
            key_len,
            ret_ptr,
            ret_size,
            |state, key, out| map_get_into(state, map, key, out),
        )
    })())
}

fn proxy_add_header_map_value(
    mut caller: C<'_>,
    map: i32,
    kp: i32,
    kl: i32,
    vp: i32,
    vl: i32,
) -> wasmtime::Result<i32> {
    finish((|| {
        let map = MapType::from_guest(map).ok_or(Status::BadArgument)?;
        let key = lower(&read(&mut caller, kp, kl)?);
        let value = read(&mut caller, vp, vl)?;
        map_mut(&mut caller, map)?.push((key, value));
        Ok(())
    })())
}

fn proxy_replace_header_map_value(
    mut caller: C<'_>,
    map: i32,
    kp: i32,
    kl: i32,
    vp: i32,
    vl: i32,
) -> wasmtime::Result<i32> {
    finish((|| {
        let map = MapType::from_guest(map).ok_or(Status::BadArgument)?;
        let key = lower(&read(&mut caller, kp, kl)?);
        let value = read(&mut caller, vp, vl)?;
        let target = map_mut(&mut caller, map)?;
        target.retain(|(k, _)| *k != key);
        target.push((key, value));
        Ok(())
    })())
}

fn proxy_remove_header_map_value(
    mut caller: C<'_>,
    map: i32,
    kp: i32,
    kl: i32,
) -> wasmtime::Result<i32> {
    finish((|| {
        let map = MapType::from_guest(map).ok_or(Status::BadArgument)?;
        let key = lower(&read(&mut caller, kp, kl)?);
        map_mut(&mut caller, map)?.retain(|(k, _)| *k != key);
        Ok(())
    })())
}

/// Envoy's `request.*` attributes, derived from the request headers.
fn request_attribute(headers: &Pairs, path: &[String]) -> Option<PropValue> {
    let header = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k.as_slice() == name.as_bytes())
            .map(|(_, v)| utf8(v.clone()))
    };
    let (first, rest) = path.split_first()?;
    if first != "request" {
        return None;
    }
    let field = rest.first()?;
    if rest.len() > 1 && field != "headers" {
        return None;
    }
    let value = match field.as_str() {
        "path" => PropValue::Str(header(":path")?),
        "url_path" => {
            let p = header(":path")?;
            PropValue::Str(p.split('?').next().unwrap_or("").to_owned())
        }
        "host" => PropValue::Str(header(":authority")?),
        "method" => PropValue::Str(header(":method")?),
        "scheme" => PropValue::Str(header(":scheme")?),
        "referer" => PropValue::Str(header("referer")?),
        "useragent" => PropValue::Str(header("user-agent")?),
        "id" => PropValue::Str(header("x-request-id")?),
        "query" => {
            let p = header(":path")?;
            PropValue::Str(
                p.split_once('?')
                    .map(|(_, q)| q.to_owned())
                    .unwrap_or_default(),
            )
        }
        "headers" => {
            let map = pairs_to_strings(headers);
            match rest.get(1) {
                None => PropValue::Map(map),
                Some(name) => {
                    let name = name.to_ascii_lowercase();
                    PropValue::Str(map.into_iter().find(|(k, _)| *k == name)?.1)
                }
            }
        }
        _ => return None,
    };
    Some(value)
}

/// Appends the encoded value at a raw (NUL-separated) property path to
/// `out`: the stream's own properties, then Envoy's `request.*` attributes,
/// then the root's. `false` when none has it.
fn lookup_property_into(state: &HostState, raw_path: &[u8], out: &mut Vec<u8>) -> bool {
    if let Some(ctx) = state.contexts.get(&state.effective) {
        if ctx.props.encode_raw_into(raw_path, out) {
            return true;
        }
        if ctx.is_http
            && raw_path.starts_with(b"request\0")
            && let Some(v) = request_attribute(&ctx.request_headers, &split_path(raw_path))
        {
            v.encode_into(out);
            return true;
        }
    }
    state.root_props.encode_raw_into(raw_path, out)
}

fn proxy_get_property(
    mut caller: C<'_>,
    pp: i32,
    pl: i32,
    ret_ptr: i32,
    ret_size: i32,
) -> wasmtime::Result<i32> {
    finish(answer_with(
        &mut caller,
        pp,
        pl,
        ret_ptr,
        ret_size,
        |state, path, out| Ok(lookup_property_into(state, path, out)),
    ))
}

fn proxy_set_property(
    mut caller: C<'_>,
    pp: i32,
    pl: i32,
    vp: i32,
    vl: i32,
) -> wasmtime::Result<i32> {
    finish((|| {
        let path = split_path(&read(&mut caller, pp, pl)?);
        let value = read(&mut caller, vp, vl)?;
        effective(&mut caller)?
            .props
            .set_path(path, PropValue::Bytes(value));
        Ok(())
    })())
}

fn proxy_get_shared_data(
    mut caller: C<'_>,
    kp: i32,
    kl: i32,
    ret_ptr: i32,
    ret_size: i32,
    ret_cas: i32,
) -> wasmtime::Result<i32> {
    finish((|| {
        let key = read(&mut caller, kp, kl)?;
        check_writable(&mut caller, ret_cas, 4)?;
        let (value, cas) = caller.data().env.shared.get(&key).ok_or(Status::NotFound)?;
        copy_out(&mut caller, &value, ret_ptr, ret_size)?;
        write_u32(&mut caller, ret_cas, cas)
    })())
}

fn proxy_set_shared_data(
    mut caller: C<'_>,
    kp: i32,
    kl: i32,
    vp: i32,
    vl: i32,
    cas: i32,
) -> wasmtime::Result<i32> {
    finish((|| {
        let key = read(&mut caller, kp, kl)?;
        let value = read(&mut caller, vp, vl)?;
        match caller.data().env.shared.set(&key, &value, cas as u32) {
            Status::Ok => Ok(()),
            s => Err(s.into()),
        }
    })())
}

fn proxy_continue_stream(mut caller: C<'_>, stream: i32) -> wasmtime::Result<i32> {
    finish((|| {
        let stream = StreamType::from_guest(stream).ok_or(Status::BadArgument)?;
        let ctx = effective(&mut caller)?;
        match stream {
            StreamType::HttpRequest => ctx.continued_request = true,
            StreamType::HttpResponse => ctx.continued_response = true,
            StreamType::Downstream => ctx.continued_downstream = true,
            StreamType::Upstream => return Err(Status::Unimplemented.into()),
        }
        Ok(())
    })())
}

fn proxy_close_stream(mut caller: C<'_>, stream: i32) -> wasmtime::Result<i32> {
    finish((|| {
        StreamType::from_guest(stream).ok_or(Status::BadArgument)?;
        effective(&mut caller)?.closed = true;
        Ok(())
    })())
}

#[allow(clippy::too_many_arguments)]
fn proxy_send_local_response(
    mut caller: C<'_>,
    status: i32,
    dp: i32,
    dl: i32,
    bp: i32,
    bl: i32,
    hp: i32,
    hl: i32,
    _grpc_status: i32,
) -> wasmtime::Result<i32> {
    finish((|| {
        let details = utf8(read(&mut caller, dp, dl)?);
        let body = read(&mut caller, bp, bl)?;
        let headers =
            deserialize_pairs(&read(&mut caller, hp, hl)?).map_err(|_| Status::BadArgument)?;
        let ctx = effective(&mut caller)?;
        if !ctx.is_http {
            return Err(Status::BadArgument.into());
        }
        ctx.local_response = Some(LocalResponse {
            status: status as u32,
            details,
            headers: pairs_to_strings(&headers),
            body,
        });
        Ok(())
    })())
}

#[allow(clippy::too_many_arguments)]
fn proxy_http_call(
    mut caller: C<'_>,
    up: i32,
    ul: i32,
    hp: i32,
    hl: i32,
    bp: i32,
    bl: i32,
    tp: i32,
    tl: i32,
    timeout: i32,
    ret_token: i32,
) -> wasmtime::Result<i32> {
    finish((|| {
        let upstream = utf8(read(&mut caller, up, ul)?);
        let headers =
            deserialize_pairs(&read(&mut caller, hp, hl)?).map_err(|_| Status::BadArgument)?;
        let body = read(&mut caller, bp, bl)?;
        let _trailers = read(&mut caller, tp, tl)?;
        check_writable(&mut caller, ret_token, 4)?;
        let headers = pairs_to_strings(&headers);
        for required in [":method", ":path", ":authority"] {
            if !headers.iter().any(|(k, v)| k == required && !v.is_empty()) {
                return Err(Status::BadArgument.into());
            }
        }
        let addr = caller
            .data()
            .env
            .upstreams
            .resolve(&upstream)
            .ok_or(Status::BadArgument)?;
        let state = caller.data_mut();
        state.next_token = state.next_token.wrapping_add(1).max(1);
        let token = state.next_token;
        state.pending_calls.push(HttpCallRequest {
            token,
            upstream,
            addr,
            headers,
            body,
            timeout_ms: timeout as u32,
        });
        write_u32(&mut caller, ret_token, token)
    })())
}

fn proxy_get_status(
    mut caller: C<'_>,
    ret_code: i32,
    ret_ptr: i32,
    ret_size: i32,
) -> wasmtime::Result<i32> {
    finish((|| {
        let code = caller
            .data()
            .call_response
            .as_ref()
            .and_then(|r| r.headers.iter().find(|(k, _)| k == ":status"))
            .and_then(|(_, v)| v.parse::<u32>().ok())
            .unwrap_or(0);
        write_u32(&mut caller, ret_code, code)?;
        copy_out(&mut caller, &[], ret_ptr, ret_size)
    })())
}

fn proxy_set_effective_context(mut caller: C<'_>, id: i32) -> wasmtime::Result<i32> {
    let id = id as u32;
    if caller.data().contexts.contains_key(&id) {
        caller.data_mut().effective = id;
        Ok(Status::Ok.code())
    } else {
        Ok(Status::BadArgument.code())
    }
}

fn proxy_done(mut caller: C<'_>) -> wasmtime::Result<i32> {
    caller.data_mut().done_requested = true;
    Ok(Status::Ok.code())
}

fn proxy_define_metric(
    mut caller: C<'_>,
    kind: i32,
    np: i32,
    nl: i32,
    ret_id: i32,
) -> wasmtime::Result<i32> {
    finish((|| {
        let kind = MetricType::from_guest(kind).ok_or(Status::BadArgument)?;
        let name = utf8(read(&mut caller, np, nl)?);
        check_writable(&mut caller, ret_id, 4)?;
        let id = caller.data().env.metrics.define(kind, &name);
        write_u32(&mut caller, ret_id, id)
    })())
}

fn proxy_increment_metric(caller: C<'_>, id: i32, delta: i64) -> wasmtime::Result<i32> {
    Ok(caller.data().env.metrics.increment(id as u32, delta).code())
}

fn proxy_record_metric(caller: C<'_>, id: i32, value: i64) -> wasmtime::Result<i32> {
    Ok(caller
        .data()
        .env
        .metrics
        .record(id as u32, value as u64)
        .code())
}

fn proxy_get_metric(mut caller: C<'_>, id: i32, ret: i32) -> wasmtime::Result<i32> {
    finish((|| {
        let value = caller.data().env.metrics.get(id as u32)?;
        write_u64(&mut caller, ret, value)
    })())
}

/// Registers every `env.proxy_*` function this host implements.
pub(crate) fn define(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    let m = "env";
    linker.func_wrap(m, "proxy_log", proxy_log)?;
    linker.func_wrap(m, "proxy_get_log_level", proxy_get_log_level)?;
    linker.func_wrap(
        m,
        "proxy_get_current_time_nanoseconds",
        proxy_get_current_time_nanoseconds,
    )?;
    linker.func_wrap(
        m,
        "proxy_set_tick_period_milliseconds",
        proxy_set_tick_period_milliseconds,
    )?;
    linker.func_wrap(m, "proxy_get_buffer_bytes", proxy_get_buffer_bytes)?;
    linker.func_wrap(m, "proxy_get_buffer_status", proxy_get_buffer_status)?;
    linker.func_wrap(m, "proxy_set_buffer_bytes", proxy_set_buffer_bytes)?;
    linker.func_wrap(m, "proxy_get_header_map_size", proxy_get_header_map_size)?;
    linker.func_wrap(m, "proxy_get_header_map_pairs", proxy_get_header_map_pairs)?;
    linker.func_wrap(m, "proxy_set_header_map_pairs", proxy_set_header_map_pairs)?;
    linker.func_wrap(m, "proxy_get_header_map_value", proxy_get_header_map_value)?;
    linker.func_wrap(m, "proxy_add_header_map_value", proxy_add_header_map_value)?;
    linker.func_wrap(
        m,
        "proxy_replace_header_map_value",
        proxy_replace_header_map_value,
    )?;
    linker.func_wrap(
        m,
        "proxy_remove_header_map_value",
        proxy_remove_header_map_value,
    )?;
    linker.func_wrap(m, "proxy_get_property", proxy_get_property)?;
    linker.func_wrap(m, "proxy_set_property", proxy_set_property)?;
    linker.func_wrap(m, "proxy_get_shared_data", proxy_get_shared_data)?;
    linker.func_wrap(m, "proxy_set_shared_data", proxy_set_shared_data)?;
    linker.func_wrap(m, "proxy_continue_stream", proxy_continue_stream)?;
    linker.func_wrap(m, "proxy_close_stream", proxy_close_stream)?;
    linker.func_wrap(m, "proxy_continue_request", |c: C<'_>| {
        proxy_continue_stream(c, 0)
    })?;
    linker.func_wrap(m, "proxy_continue_response", |c: C<'_>| {
        proxy_continue_stream(c, 1)
    })?;
    linker.func_wrap(m, "proxy_send_local_response", proxy_send_local_response)?;
    linker.func_wrap(m, "proxy_http_call", proxy_http_call)?;
    linker.func_wrap(m, "proxy_get_status", proxy_get_status)?;
    linker.func_wrap(
        m,
        "proxy_set_effective_context",
        proxy_set_effective_context,
    )?;
    linker.func_wrap(m, "proxy_done", proxy_done)?;
    linker.func_wrap(m, "proxy_define_metric", proxy_define_metric)?;
    linker.func_wrap(m, "proxy_increment_metric", proxy_increment_metric)?;
    linker.func_wrap(m, "proxy_record_metric", proxy_record_metric)?;
    linker.func_wrap(m, "proxy_get_metric", proxy_get_metric)?;
    Ok(())
}
