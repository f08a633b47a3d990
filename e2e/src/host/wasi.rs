//! The WASI (`wasi_snapshot_preview1`) functions a `wasm32-wasip1` plugin
//! imports, as the proxy-wasm ABI v0.2.1 specifies them: stdout/stderr are
//! logs, no environment, no arguments, a clock and randomness. Anything else
//! WASI offers answers `NOSYS` (see `Plugin::load`).

use rand::RngCore;
use wasmtime::{Caller, Linker};

use super::abi::{LogLevel, errno};
use super::imports::{Fault, HostResult, read, write, write_u32, write_u64};
use super::state::{HostState, LogLine};

type C<'a> = Caller<'a, HostState>;

fn to_errno(r: HostResult<()>) -> wasmtime::Result<i32> {
    match r {
        Ok(()) => Ok(errno::SUCCESS),
        Err(Fault::Status(_)) => Ok(errno::FAULT),
        Err(Fault::Trap(e)) => Err(e),
    }
}

fn fd_write(
    mut caller: C<'_>,
    fd: i32,
    iovs: i32,
    iovs_len: i32,
    ret_written: i32,
) -> wasmtime::Result<i32> {
    let level = match fd {
        1 => LogLevel::Info,
        2 => LogLevel::Error,
        _ => return Ok(errno::BADF),
    };
    to_errno((|| {
        let count = iovs_len as u32;
        if count > 1024 {
            return Err(Fault::Status(super::abi::Status::InvalidMemoryAccess));
        }
        let mut text = Vec::new();
        for i in 0..count {
            let at = (iovs as u32)
                .checked_add(i * 8)
                .ok_or(super::abi::Status::InvalidMemoryAccess)? as i32;
            let raw = read(&mut caller, at, 8)?;
            let ptr = u32::from_le_bytes(
                raw.get(0..4)
                    .and_then(|s| s.try_into().ok())
                    .unwrap_or([0; 4]),
            );
            let len = u32::from_le_bytes(
                raw.get(4..8)
                    .and_then(|s| s.try_into().ok())
                    .unwrap_or([0; 4]),
            );
            text.extend(read(&mut caller, ptr as i32, len as i32)?);
        }
        write_u32(
            &mut caller,
            ret_written,
            u32::try_from(text.len()).unwrap_or(u32::MAX),
        )?;
        let message = String::from_utf8_lossy(&text).trim_end().to_owned();
        if !message.is_empty() {
            let state = caller.data();
            state.env.logs.push(LogLine {
                level,
                plugin: state.plugin_name.clone(),
                message,
            });
        }
        Ok(())
    })())
}

fn environ_sizes_get(mut caller: C<'_>, ret_count: i32, ret_size: i32) -> wasmtime::Result<i32> {
    to_errno((|| {
        write_u32(&mut caller, ret_count, 0)?;
        write_u32(&mut caller, ret_size, 0)
    })())
}

fn nothing_to_write(_caller: C<'_>, _a: i32, _b: i32) -> wasmtime::Result<i32> {
    Ok(errno::SUCCESS)
}

fn clock_time_get(
    mut caller: C<'_>,
    clock: i32,
    _precision: i64,
    ret: i32,
) -> wasmtime::Result<i32> {
    let nanos = match clock {
        0 => caller
            .data_mut()
            .now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
            .unwrap_or(0),
        1 => u64::try_from(caller.data().started.elapsed().as_nanos()).unwrap_or(u64::MAX),
        _ => return Ok(errno::NOTSUP),
    };
    to_errno(write_u64(&mut caller, ret, nanos))
}

fn random_get(mut caller: C<'_>, ptr: i32, len: i32) -> wasmtime::Result<i32> {
    if len as u32 > 64 * 1024 {
        return Ok(errno::INVAL);
    }
    let mut bytes = vec![0u8; len as u32 as usize];
    rand::rng().fill_bytes(&mut bytes);
    to_errno(write(&mut caller, ptr, &bytes))
}

fn proc_exit(_caller: C<'_>, code: i32) -> wasmtime::Result<()> {
    Err(wasmtime::Error::msg(format!(
        "plugin called proc_exit({code})"
    )))
}

fn sched_yield(_caller: C<'_>) -> wasmtime::Result<i32> {
    Ok(errno::SUCCESS)
}

/// Registers the WASI functions above.
pub(crate) fn define(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    let m = "wasi_snapshot_preview1";
    linker.func_wrap(m, "fd_write", fd_write)?;
    linker.func_wrap(m, "environ_sizes_get", environ_sizes_get)?;
    linker.func_wrap(m, "environ_get", nothing_to_write)?;
    linker.func_wrap(m, "args_sizes_get", environ_sizes_get)?;
    linker.func_wrap(m, "args_get", nothing_to_write)?;
    linker.func_wrap(m, "clock_time_get", clock_time_get)?;
    linker.func_wrap(m, "random_get", random_get)?;
    linker.func_wrap(m, "proc_exit", proc_exit)?;
    linker.func_wrap(m, "sched_yield", sched_yield)?;
    Ok(())
}
