//! The stream (TCP) contexts of this VM, by context id: our dispatcher for
//! the stream callbacks, and the tick that re-checks connections waiting for
//! their TLS handshake.
//!
//! The SDK's dispatcher `panic!`s when the host calls a stream callback for
//! a context id it does not hold, and Envoy does exactly that when the plugin
//! closes a connection from inside `proxy_on_upstream_data`:
//! `Context::onWrite` then calls `proxy_on_upstream_connection_close` after
//! the close has already run `proxy_on_done` and `proxy_on_delete` (seen
//! with `direct_response` behind the filter; a panic traps the VM and Envoy
//! fails every later connection). The connection gate never decides — so
//! never closes — on upstream data, which removes that sequence, and the
//! module does not export `proxy_on_upstream_connection_close` at all
//! (`scripts/wasm`: the plugin has nothing to do in it), so Envoy never makes
//! that call; the Envoy test
//! `network_filter_survives_envoy_closing_a_connection_it_answered_itself`
//! keeps it so.
//!
//! The SDK creates, dispatches, finishes and deletes the contexts: what it
//! holds for a stream context is a [`StreamHandle`], which forwards every
//! callback to the filter kept here (so the tick can reach it by id) and
//! removes it when the SDK drops the handle (`proxy_on_delete`). The SDK
//! routes a callout's answer to the context it was dispatching when the
//! callout was made; one made from a tick is the root context's, so the
//! root hands it back here ([`tick_callout_response`]), by token.

use super::abi;
use super::host::log;
use super::stream::{self, TcpFilter};
use crate::pattern::FixedState;
use proxy_wasm::traits::{Context, StreamContext};
use proxy_wasm::types::{Action, LogLevel, PeerType};
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

/// How often connections waiting for their TLS handshake are looked at
/// (a server-first upstream is connected at most this much after the
/// handshake ends). Ticks run only while some connection waits.
pub const TICK_MS: u32 = 10;

struct Streams {
    /// Keyed by `u64`: the same table shape as the connection cache's, which
    /// the optimizer can then share.
    by_id: RefCell<HashMap<u64, Rc<RefCell<TcpFilter>>, FixedState>>,
    /// Contexts waiting for their TLS handshake, looked at on every tick.
    awaiting: RefCell<Vec<u32>>,
    /// The context a tick is looking at now.
    ticking: std::cell::Cell<Option<u32>>,
    /// Callouts made from a tick: token → stream context.
    tick_callouts: RefCell<Vec<(u32, u32)>>,
}

thread_local! {
    static STREAMS: Streams = const {
        Streams {
            by_id: RefCell::new(HashMap::with_hasher(FixedState::new())),
            awaiting: RefCell::new(Vec::new()),
            ticking: std::cell::Cell::new(None),
            tick_callouts: RefCell::new(Vec::new()),
        }
    };
}

/// What the SDK holds for a stream context: its id here.
pub struct StreamHandle(u32);

/// Keeps `filter` as stream context `context_id`; the SDK holds the handle.
pub fn register(context_id: u32, filter: TcpFilter) -> StreamHandle {
    STREAMS.with(|s| {
        // Never busy here (the SDK creates contexts outside our callbacks);
        // if it were, the context would be unknown, and closed on its first
        // callback.
        if let Ok(mut by_id) = s.by_id.try_borrow_mut() {
            by_id.insert(u64::from(context_id), Rc::new(RefCell::new(filter)));
        }
    });
    StreamHandle(context_id)
}

/// `proxy_on_delete`: the filter goes. (A deleted context still on the tick
/// list is dropped from it by the next tick, which no longer finds it;
/// Envoy never reuses a context id.)
impl Drop for StreamHandle {
    fn drop(&mut self) {
        let id = u64::from(self.0);
        STREAMS.with(|s| {
            if let Ok(mut by_id) = s.by_id.try_borrow_mut() {
                by_id.remove(&id);
            }
        });
    }
}

/// Context `id`'s filter, when there is one and no callback is running on
/// it. Not generic: the callbacks share it.
#[inline(never)]
fn entry(id: u32, _callback: &str) -> Option<Rc<RefCell<TcpFilter>>> {
    STREAMS
        .with(|s| s.by_id.try_borrow().ok()?.get(&u64::from(id)).cloned())
        .filter(|entry| entry.try_borrow_mut().is_ok())
}

/// Logs a host call that answered `status`.
#[inline(never)]
fn log_status(level: LogLevel, what: &str, status: u32) {
    log(level, &format!("meshward: {what}: status {status}"));
}

/// Runs `f` on context `id`'s filter; `None` when [`entry`] finds none.
fn with<R>(id: u32, callback: &str, f: impl FnOnce(&mut TcpFilter) -> R) -> Option<R> {
    let entry = entry(id, callback)?;
    let mut filter = entry.try_borrow_mut().ok()?;
    Some(f(&mut filter))
}

/// A data callback for a context whose filter is missing or busy (it
/// cannot be, as the SDK dispatches one callback at a time): hold the bytes
/// and close, failing closed.
fn refuse(_id: u32, _callback: &str) -> Action {
    stream::close();
    Action::Pause
}

pub fn new_connection(id: u32) -> Action {
    match with(id, "proxy_on_new_connection", |f| {
        (f.on_new_connection(), f.awaits_handshake())
    }) {
        Some((action, true)) => {
            if await_handshake(id) {
                action
            } else {
                stream::close();
                Action::Pause
            }
        }
        Some((action, false)) => action,
        None => refuse(id, "proxy_on_new_connection"),
    }
}

pub fn downstream_data(id: u32) -> Action {
    with(
        id,
        "proxy_on_downstream_data",
        TcpFilter::on_downstream_data,
    )
    .unwrap_or_else(|| refuse(id, "proxy_on_downstream_data"))
}

pub fn upstream_data(id: u32) -> Action {
    with(id, "proxy_on_upstream_data", TcpFilter::on_upstream_data)
        .unwrap_or_else(|| refuse(id, "proxy_on_upstream_data"))
}

pub fn downstream_close(id: u32) {
    with(
        id,
        "proxy_on_downstream_connection_close",
        TcpFilter::on_downstream_close,
    );
}

/// Puts `id` on the tick list, starting the ticks for the first one.
/// False when the ticks cannot be started (the caller closes).
fn await_handshake(id: u32) -> bool {
    let first = STREAMS.with(|s| match s.awaiting.try_borrow_mut() {
        Ok(mut awaiting) => {
            awaiting.push(id);
            Some(awaiting.len() == 1)
        }
        Err(_) => None,
    });
    match first {
        Some(true) => match abi::set_tick_period_ms(TICK_MS) {
            Ok(()) => true,
            Err(status) => {
                log_status(LogLevel::Error, "set_tick_period, closing", status);
                false
            }
        },
        Some(false) => true,
        None => false,
    }
}

/// `proxy_on_tick` on the root context: looks at every connection waiting
/// for its TLS handshake (as the effective context), judges those whose
/// handshake is over, and stops the ticks when none waits.
pub fn tick() {
    let ids = STREAMS.with(|s| s.awaiting.try_borrow().map(|a| a.clone()).ok());
    let Some(ids) = ids else {
        return;
    };
    let mut still = Vec::with_capacity(ids.len());
    for id in ids {
        // Closed and deleted since the last tick: nothing to look at.
        if entry(id, "proxy_on_tick").is_none() {
            continue;
        }
        if let Err(status) = abi::set_effective_context(id) {
            log_status(LogLevel::Warn, "set_effective_context", status);
            continue;
        }
        STREAMS.with(|s| s.ticking.set(Some(id)));
        let waits = with(id, "proxy_on_tick", TcpFilter::on_tick);
        STREAMS.with(|s| s.ticking.set(None));
        if waits == Some(true) {
            still.push(id);
        }
    }
    let none_left = still.is_empty();
    STREAMS.with(|s| {
        if let Ok(mut awaiting) = s.awaiting.try_borrow_mut() {
            *awaiting = still;
        }
    });
    if none_left && let Err(status) = abi::set_tick_period_ms(0) {
        log_status(LogLevel::Warn, "stopping ticks", status);
    }
}

/// A callout was dispatched with `token`: when a tick made it, the answer
/// will reach the root context; remember which connection it is for.
pub fn note_callout(token: u32) {
    STREAMS.with(|s| {
        if let Some(id) = s.ticking.get()
            && let Ok(mut callouts) = s.tick_callouts.try_borrow_mut()
        {
            callouts.push((token, id));
        }
    });
}

/// The root context got the answer to callout `token`: hand it to the
/// connection whose tick made it (nothing, when none did or it is gone).
pub fn tick_callout_response(token: u32, body_size: usize) {
    let id = STREAMS.with(|s| {
        let mut callouts = s.tick_callouts.try_borrow_mut().ok()?;
        let at = callouts.iter().position(|(t, _)| *t == token)?;
        Some(callouts.swap_remove(at).1)
    });
    let Some(id) = id else {
        return;
    };
    if let Err(status) = abi::set_effective_context(id) {
        log_status(LogLevel::Warn, "set_effective_context", status);
        return;
    }
    with(id, "proxy_on_http_call_response", |f| {
        f.on_http_call_response(body_size);
    });
}

impl Context for StreamHandle {
    fn on_http_call_response(
        &mut self,
        _token_id: u32,
        _num_headers: usize,
        body_size: usize,
        _num_trailers: usize,
    ) {
        with(self.0, "proxy_on_http_call_response", |f| {
            f.on_http_call_response(body_size);
        });
    }
}

/// The SDK dispatches; the filter kept here decides.
impl StreamContext for StreamHandle {
    fn on_new_connection(&mut self) -> Action {
        new_connection(self.0)
    }

    fn on_downstream_data(&mut self, _data_size: usize, _end_of_stream: bool) -> Action {
        downstream_data(self.0)
    }

    fn on_downstream_close(&mut self, _peer_type: PeerType) {
        downstream_close(self.0);
    }

    fn on_upstream_data(&mut self, _data_size: usize, _end_of_stream: bool) -> Action {
        upstream_data(self.0)
    }
}
