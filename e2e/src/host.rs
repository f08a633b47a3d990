//! A proxy-wasm ABI v0.2.1 host on wasmtime, written from the specification
//! (`proxy-wasm/spec`, `abi-versions/v0.2.1`) so that the `.wasm` that runs
//! here runs unchanged in Envoy.
//!
//! [`Plugin`] is one plugin instance (one VM, one root context) driven
//! synchronously: create a stream, get an outcome; when the plugin pauses for
//! an HTTP callout, [`Plugin::take_http_calls`] hands the calls out and
//! [`Plugin::deliver_http_call_response`] feeds the answers back.
//! [`driver::SharedPlugin`] does that loop on tokio with real HTTP.

pub mod abi;
pub mod driver;
mod imports;
pub mod metrics;
pub mod properties;
mod state;
mod wasi;

#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::Instant;

use wasmtime::{Engine, ExternType, Instance, Linker, Module, Store, TypedFunc, Val, ValType};

pub use abi::{Action, LogLevel, Status};
pub use metrics::Metrics;
pub use properties::{PropValue, Properties};
pub use state::{
    Clock, HostEnv, HttpCallRequest, HttpCallResponse, LocalResponse, LogLine, LogSink,
    OffsetClock, SharedData, StaticUpstreams, SystemClock, Upstreams,
};

use state::{ContextMap, ContextState, HostState};

/// A context id, as the plugin sees it.
pub type ContextId = u32;

/// HTTP fields as the host API takes and gives them (lower-case names;
/// pseudo-headers `:method`, `:path`, `:authority`, `:scheme` included).
pub type HeaderList = Vec<(String, String)>;

/// What the host could not do.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// The bytes are not a valid module for this engine.
    #[error("cannot compile the plugin: {0}")]
    Compile(String),
    /// Linking or the start functions failed.
    #[error("cannot instantiate the plugin: {0}")]
    Instantiate(String),
    /// The module lacks an export the ABI requires.
    #[error("not a proxy-wasm ABI v0.2.1 plugin: missing export `{0}`")]
    NotAbi(&'static str),
    /// `proxy_on_vm_start` returned false.
    #[error("plugin rejected its VM configuration (proxy_on_vm_start returned false)")]
    VmStartRejected,
    /// `proxy_on_configure` returned false: the plugin does not start.
    #[error("plugin rejected its configuration (proxy_on_configure returned false): {}", .log.join(" | "))]
    ConfigureRejected {
        /// What the plugin logged while configuring.
        log: Vec<String>,
    },
    /// The guest trapped (a panic, an out-of-bounds access in the guest…).
    #[error("plugin trapped in {callback}: {message}")]
    Trap {
        /// The callback that trapped.
        callback: &'static str,
        /// wasmtime's description.
        message: String,
    },
    /// The plugin trapped earlier; like Envoy, a failed VM serves nothing more.
    #[error("plugin failed earlier and serves no more traffic")]
    Failed,
    /// The plugin paused a stream and has nothing pending that could resume it.
    #[error("plugin paused context {0} with no HTTP call pending")]
    Stalled(ContextId),
    /// The context is not (or no longer) known.
    #[error("unknown context {0}")]
    UnknownContext(ContextId),
}

/// How a plugin instance is configured (what a `WasmPlugin` carries).
#[derive(Debug, Clone)]
pub struct PluginConfig {
    /// `plugin_name`.
    pub name: String,
    /// `plugin_root_id`.
    pub root_id: String,
    /// `plugin_vm_id`.
    pub vm_id: String,
    /// The plugin configuration (`pluginConfig` as JSON text).
    pub configuration: Vec<u8>,
    /// The VM configuration.
    pub vm_configuration: Vec<u8>,
    /// The least severe level kept from the plugin's logs.
    pub log_level: LogLevel,
    /// Properties every context sees (e.g. `node.id`, `listener_direction`).
    pub properties: Properties,
}

impl PluginConfig {
    /// A configuration with `configuration` as the plugin config and defaults
    /// elsewhere (name `meshward`, empty root id).
    pub fn new(configuration: impl Into<Vec<u8>>) -> Self {
        Self {
            name: "meshward".to_owned(),
            root_id: String::new(),
            vm_id: String::new(),
            configuration: configuration.into(),
            vm_configuration: Vec::new(),
            log_level: LogLevel::Info,
            properties: Properties::new(),
        }
    }

    /// Sets `plugin_root_id`.
    pub fn with_root_id(mut self, root_id: &str) -> Self {
        self.root_id = root_id.to_owned();
        self
    }

    /// Sets `plugin_name`.
    pub fn with_name(mut self, name: &str) -> Self {
        self.name = name.to_owned();
        self
    }
}

/// What the plugin decided about an HTTP request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HttpOutcome {
    /// Forward upstream, with the request headers as the plugin left them.
    Continue {
        /// The (possibly modified) request headers.
        headers: HeaderList,
    },
    /// Answer locally (`proxy_send_local_response`).
    LocalResponse(LocalResponse),
    /// The plugin reset the stream (`proxy_close_stream`).
    Reset,
    /// The plugin paused and is waiting (for an HTTP callout).
    Paused,
}

/// What the plugin decided about a TCP connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnOutcome {
    /// Let it through.
    Continue,
    /// Close it (`proxy_close_stream`).
    Close,
    /// The plugin paused and is waiting (for an HTTP callout).
    Paused,
}

/// A compiled module; instantiate it many times without compiling again.
#[derive(Clone)]
pub struct CompiledPlugin {
    engine: Engine,
    module: Module,
}

impl std::fmt::Debug for CompiledPlugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompiledPlugin").finish_non_exhaustive()
    }
}

impl CompiledPlugin {
    /// Compiles `wasm` (binary format).
    pub fn compile(wasm: &[u8]) -> Result<Self, HostError> {
        // The workspace builds wasmtime with `gc` but no collector: plugins
        // are plain linear-memory modules, so the GC proposal stays off.
        let mut config = wasmtime::Config::new();
        config.wasm_gc(false);
        config.wasm_function_references(false);
        config.wasm_exceptions(false);
        config.gc_support(false);
        // MESHWARD_WASM_PERFMAP=1 writes /tmp/perf-<pid>.map so `perf` can
        // name the plugin's functions (profiling the filter in this host).
        if std::env::var_os("MESHWARD_WASM_PERFMAP").is_some_and(|v| v == "1") {
            config.profiler(wasmtime::ProfilingStrategy::PerfMap);
        }
        let engine = Engine::new(&config).map_err(|e| HostError::Compile(format!("{e:#}")))?;
        let module =
            Module::new(&engine, wasm).map_err(|e| HostError::Compile(format!("{e:#}")))?;
        Ok(Self { engine, module })
    }

    /// Starts an instance: `_initialize`/`_start`, root context,
    /// `proxy_on_vm_start`, `proxy_on_configure`.
    pub fn instantiate(&self, config: PluginConfig, env: HostEnv) -> Result<Plugin, HostError> {
        Plugin::start(self, config, env)
    }
}

/// `proxy_on_http_call_response`'s parameters.
type I32x5 = (i32, i32, i32, i32, i32);

/// One exported callback, shared: a `TypedFunc` clone copies its registered
/// type, which costs more than some callbacks.
type Callback<P, R> = Option<Arc<TypedFunc<P, R>>>;

/// The plugin's exported callbacks.
#[derive(Default)]
struct Callbacks {
    context_create: Callback<(i32, i32), ()>,
    done: Callback<i32, i32>,
    log: Callback<i32, ()>,
    delete: Callback<i32, ()>,
    vm_start: Callback<(i32, i32), i32>,
    configure: Callback<(i32, i32), i32>,
    tick: Callback<i32, ()>,
    new_connection: Callback<i32, i32>,
    downstream_data: Callback<(i32, i32, i32), i32>,
    downstream_close: Callback<(i32, i32), ()>,
    request_headers: Callback<(i32, i32, i32), i32>,
    request_body: Callback<(i32, i32, i32), i32>,
    response_headers: Callback<(i32, i32, i32), i32>,
    http_call_response: Callback<I32x5, ()>,
}

/// One running plugin instance.
pub struct Plugin {
    store: Store<HostState>,
    callbacks: Callbacks,
    root_id: ContextId,
    next_context: ContextId,
    failed: bool,
}

impl std::fmt::Debug for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin")
            .field("root_id", &self.root_id)
            .field("failed", &self.failed)
            .finish_non_exhaustive()
    }
}

fn typed<P, R>(
    instance: &Instance,
    store: &mut Store<HostState>,
    name: &str,
) -> Option<Arc<TypedFunc<P, R>>>
where
    P: wasmtime::WasmParams,
    R: wasmtime::WasmResults,
{
    let func = instance.get_func(&mut *store, name)?;
    match func.typed::<P, R>(&*store) {
        Ok(f) => Some(Arc::new(f)),
        Err(e) => {
            tracing::warn!("plugin export {name} has an unexpected signature, ignored: {e}");
            None
        }
    }
}

fn pairs_of(headers: &[(String, String)]) -> abi::Pairs {
    headers
        .iter()
        .map(|(k, v)| (k.to_ascii_lowercase().into_bytes(), v.as_bytes().to_vec()))
        .collect()
}

fn strings_of(pairs: &abi::Pairs) -> HeaderList {
    pairs
        .iter()
        .map(|(k, v)| {
            (
                String::from_utf8_lossy(k).into_owned(),
                String::from_utf8_lossy(v).into_owned(),
            )
        })
        .collect()
}

fn len_i32(n: usize) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

impl Plugin {
    /// Compiles `wasm` and starts it with `plugin_config_json` as its
    /// configuration, a fresh [`HostEnv`] and default names.
    pub fn load(wasm: &[u8], plugin_config_json: &str) -> Result<Plugin, HostError> {
        CompiledPlugin::compile(wasm)?.instantiate(
            PluginConfig::new(plugin_config_json.as_bytes().to_vec()),
            HostEnv::default(),
        )
    }

    fn start(
        compiled: &CompiledPlugin,
        config: PluginConfig,
        env: HostEnv,
    ) -> Result<Plugin, HostError> {
        let root_id: ContextId = 1;
        let mut root_props = config.properties.clone();
        root_props
            .set_str("plugin_name", config.name.clone())
            .set_str("plugin_root_id", config.root_id.clone())
            .set_str("plugin_vm_id", config.vm_id.clone());
        let mut contexts = ContextMap::default();
        contexts.insert(root_id, ContextState::default());
        let state = HostState {
            memory: None,
            alloc: None,
            plugin_name: config.name.clone(),
            effective: root_id,
            contexts,
            root_props,
            plugin_configuration: config.configuration.clone(),
            vm_configuration: config.vm_configuration.clone(),
            env,
            log_level: config.log_level,
            pending_calls: Vec::new(),
            next_token: 0,
            call_response: None,
            tick_period_ms: 0,
            now: None,
            started: Instant::now(),
            done_requested: false,
            unimplemented_calls: Vec::new(),
            scratch: Vec::new(),
        };
        let mut store = Store::new(&compiled.engine, state);
        let mut linker: Linker<HostState> = Linker::new(&compiled.engine);
        let inst = |e: wasmtime::Error| HostError::Instantiate(format!("{e:#}"));
        imports::define(&mut linker).map_err(inst)?;
        wasi::define(&mut linker).map_err(inst)?;
        define_unimplemented(&mut linker, &mut store, &compiled.module).map_err(inst)?;
        let instance = linker
            .instantiate(&mut store, &compiled.module)
            .map_err(inst)?;
        if instance
            .get_func(&mut store, "proxy_abi_version_0_2_1")
            .is_none()
        {
            return Err(HostError::NotAbi("proxy_abi_version_0_2_1"));
        }
        let memory = instance
            .get_memory(&mut store, "memory")
            .ok_or(HostError::NotAbi("memory"))?;
        let alloc = typed::<i32, i32>(&instance, &mut store, "proxy_on_memory_allocate")
            .or_else(|| typed::<i32, i32>(&instance, &mut store, "malloc"))
            .ok_or(HostError::NotAbi("proxy_on_memory_allocate"))?;
        store.data_mut().memory = Some(memory);
        store.data_mut().alloc = Some(alloc);
        let callbacks = Callbacks {
            context_create: typed(&instance, &mut store, "proxy_on_context_create"),
            done: typed(&instance, &mut store, "proxy_on_done"),
            log: typed(&instance, &mut store, "proxy_on_log"),
            delete: typed(&instance, &mut store, "proxy_on_delete"),
            vm_start: typed(&instance, &mut store, "proxy_on_vm_start"),
            configure: typed(&instance, &mut store, "proxy_on_configure"),
            tick: typed(&instance, &mut store, "proxy_on_tick"),
            new_connection: typed(&instance, &mut store, "proxy_on_new_connection"),
            downstream_data: typed(&instance, &mut store, "proxy_on_downstream_data"),
            downstream_close: typed(
                &instance,
                &mut store,
                "proxy_on_downstream_connection_close",
            ),
            request_headers: typed(&instance, &mut store, "proxy_on_request_headers"),
            request_body: typed(&instance, &mut store, "proxy_on_request_body"),
            response_headers: typed(&instance, &mut store, "proxy_on_response_headers"),
            http_call_response: typed(&instance, &mut store, "proxy_on_http_call_response"),
        };
        let mut plugin = Plugin {
            store,
            callbacks,
            root_id,
            next_context: root_id + 1,
            failed: false,
        };
        // Integration: `_initialize` (then `main` if exported), else `_start`.
        if let Some(init) = typed::<(), ()>(&instance, &mut plugin.store, "_initialize") {
            plugin.invoke(root_id, "_initialize", &init, ())?;
            if let Some(main) = typed::<(i32, i32), i32>(&instance, &mut plugin.store, "main") {
                plugin.invoke(root_id, "main", &main, (0, 0))?;
            }
        } else if let Some(start) = typed::<(), ()>(&instance, &mut plugin.store, "_start") {
            plugin.invoke(root_id, "_start", &start, ())?;
        }
        if let Some(f) = plugin.callbacks.context_create.clone() {
            plugin.invoke(root_id, "proxy_on_context_create", &f, (root_id as i32, 0))?;
        }
        let vm_len = len_i32(config.vm_configuration.len());
        if let Some(f) = plugin.callbacks.vm_start.clone()
            && plugin.invoke(root_id, "proxy_on_vm_start", &f, (root_id as i32, vm_len))? == 0
        {
            return Err(HostError::VmStartRejected);
        }
        let log_mark = plugin.store.data().env.logs.lines().len();
        let cfg_len = len_i32(config.configuration.len());
        if let Some(f) = plugin.callbacks.configure.clone()
            && plugin.invoke(root_id, "proxy_on_configure", &f, (root_id as i32, cfg_len))? == 0
        {
            let log = plugin
                .store
                .data()
                .env
                .logs
                .lines()
                .into_iter()
                .skip(log_mark)
                .filter(|l| l.plugin == config.name)
                .map(|l| l.message)
                .collect();
            return Err(HostError::ConfigureRejected { log });
        }
        Ok(plugin)
    }

    fn invoke<P, R>(
        &mut self,
        ctx: ContextId,
        callback: &'static str,
        f: &TypedFunc<P, R>,
        params: P,
    ) -> Result<R, HostError>
    where
        P: wasmtime::WasmParams,
        R: wasmtime::WasmResults,
    {
        if self.failed {
            return Err(HostError::Failed);
        }
        let state = self.store.data_mut();
        state.effective = ctx;
        state.now = None;
        match f.call(&mut self.store, params) {
            Ok(r) => Ok(r),
            Err(e) => {
                self.failed = true;
                tracing::error!(callback, "plugin trapped: {e:#}");
                Err(HostError::Trap {
                    callback,
                    message: format!("{e:#}"),
                })
            }
        }
    }

    fn new_context(&mut self, state: ContextState) -> Result<ContextId, HostError> {
        if self.failed {
            return Err(HostError::Failed);
        }
        let id = self.next_context;
        self.next_context = self.next_context.wrapping_add(1).max(self.root_id + 1);
        self.store.data_mut().contexts.insert(id, state);
        if let Some(f) = self.callbacks.context_create.clone() {
            self.invoke(
                id,
                "proxy_on_context_create",
                &f,
                (id as i32, self.root_id as i32),
            )?;
        }
        Ok(id)
    }

    fn context(&self, id: ContextId) -> Result<&ContextState, HostError> {
        self.store
            .data()
            .contexts
            .get(&id)
            .ok_or(HostError::UnknownContext(id))
    }

    /// Opens an HTTP stream with these properties, request headers and
    /// body: the host's bookkeeping and `proxy_on_context_create`, nothing
    /// else. [`Plugin::request_headers`] is next.
    pub fn begin_http_request(
        &mut self,
        props: &Properties,
        headers: &[(String, String)],
        body: &[u8],
    ) -> Result<ContextId, HostError> {
        self.new_context(ContextState {
            props: props.clone(),
            request_headers: pairs_of(headers),
            request_body: body.to_vec(),
            is_http: true,
            ..ContextState::default()
        })
    }

    /// `proxy_on_request_headers` for stream `ctx` — where the plugin
    /// decides — and the action it returned.
    pub fn request_headers(
        &mut self,
        ctx: ContextId,
        end_of_stream: bool,
    ) -> Result<Action, HostError> {
        let Some(f) = self.callbacks.request_headers.clone() else {
            return Ok(Action::Continue);
        };
        let n = len_i32(self.context(ctx)?.request_headers.len());
        Ok(Action::from_guest(self.invoke(
            ctx,
            "proxy_on_request_headers",
            &f,
            (ctx as i32, n, i32::from(end_of_stream)),
        )?))
    }

    /// A new HTTP stream: `proxy_on_context_create`, then
    /// `proxy_on_request_headers` (and `proxy_on_request_body` with `body`
    /// when it is not empty). The context stays open until [`Plugin::finish`].
    pub fn new_http_request(
        &mut self,
        props: &Properties,
        headers: &[(String, String)],
        body: &[u8],
    ) -> Result<(ContextId, HttpOutcome), HostError> {
        let ctx = self.begin_http_request(props, headers, body)?;
        let mut action = self.request_headers(ctx, body.is_empty())?;
        let undecided = {
            let c = self.context(ctx)?;
            c.local_response.is_none() && !c.closed
        };
        if action == Action::Continue
            && !body.is_empty()
            && undecided
            && let Some(f) = self.callbacks.request_body.clone()
        {
            let n = len_i32(body.len());
            action = Action::from_guest(self.invoke(
                ctx,
                "proxy_on_request_body",
                &f,
                (ctx as i32, n, 1),
            )?);
        }
        if action == Action::Continue {
            self.store
                .data_mut()
                .contexts
                .get_mut(&ctx)
                .ok_or(HostError::UnknownContext(ctx))?
                .continued_request = true;
        }
        Ok((ctx, self.http_state(ctx)?))
    }

    /// Where HTTP stream `ctx` stands now.
    pub fn http_state(&self, ctx: ContextId) -> Result<HttpOutcome, HostError> {
        let c = self.context(ctx)?;
        Ok(if let Some(r) = &c.local_response {
            HttpOutcome::LocalResponse(r.clone())
        } else if c.closed {
            HttpOutcome::Reset
        } else if c.continued_request {
            HttpOutcome::Continue {
                headers: strings_of(&c.request_headers),
            }
        } else {
            HttpOutcome::Paused
        })
    }

    /// Runs `proxy_on_response_headers` for stream `ctx`; returns the
    /// (possibly modified) response headers, or the local reply or reset the
    /// plugin chose instead.
    pub fn http_response(
        &mut self,
        ctx: ContextId,
        headers: &[(String, String)],
    ) -> Result<HttpOutcome, HostError> {
        {
            let c = self
                .store
                .data_mut()
                .contexts
                .get_mut(&ctx)
                .ok_or(HostError::UnknownContext(ctx))?;
            c.response_headers = pairs_of(headers);
        }
        if let Some(f) = self.callbacks.response_headers.clone() {
            let n = len_i32(headers.len());
            self.invoke(ctx, "proxy_on_response_headers", &f, (ctx as i32, n, 0))?;
        }
        let c = self.context(ctx)?;
        Ok(if let Some(r) = &c.local_response {
            HttpOutcome::LocalResponse(r.clone())
        } else if c.closed {
            HttpOutcome::Reset
        } else {
            HttpOutcome::Continue {
                headers: strings_of(&c.response_headers),
            }
        })
    }

    /// Opens a TCP connection context with these properties: the host's
    /// bookkeeping and `proxy_on_context_create`. [`Plugin::connection_opened`]
    /// is next.
    pub fn begin_connection(&mut self, props: &Properties) -> Result<ContextId, HostError> {
        self.new_context(ContextState {
            props: props.clone(),
            ..ContextState::default()
        })
    }

    /// `proxy_on_new_connection` for connection `ctx` — where the plugin
    /// decides — and the action it returned.
    pub fn connection_opened(&mut self, ctx: ContextId) -> Result<Action, HostError> {
        self.context(ctx)?;
        let Some(f) = self.callbacks.new_connection.clone() else {
            return Ok(Action::Continue);
        };
        Ok(Action::from_guest(self.invoke(
            ctx,
            "proxy_on_new_connection",
            &f,
            ctx as i32,
        )?))
    }

    /// A new TCP connection: `proxy_on_context_create`, then
    /// `proxy_on_new_connection`. The context stays open until
    /// [`Plugin::finish_connection`].
    pub fn new_connection(
        &mut self,
        props: &Properties,
    ) -> Result<(ContextId, ConnOutcome), HostError> {
        let ctx = self.begin_connection(props)?;
        let action = self.connection_opened(ctx)?;
        if action == Action::Continue {
            self.store
                .data_mut()
                .contexts
                .get_mut(&ctx)
                .ok_or(HostError::UnknownContext(ctx))?
                .continued_downstream = true;
        }
        Ok((ctx, self.connection_state(ctx)?))
    }

    /// Where connection `ctx` stands now.
    pub fn connection_state(&self, ctx: ContextId) -> Result<ConnOutcome, HostError> {
        let c = self.context(ctx)?;
        Ok(if c.closed {
            ConnOutcome::Close
        } else if c.continued_downstream {
            ConnOutcome::Continue
        } else {
            ConnOutcome::Paused
        })
    }

    /// `proxy_on_downstream_data` with `data` as the `DOWNSTREAM_DATA` buffer;
    /// returns the plugin's action and the buffer as it left it.
    pub fn downstream_data(
        &mut self,
        ctx: ContextId,
        data: &[u8],
        end_of_stream: bool,
    ) -> Result<(Action, Vec<u8>), HostError> {
        self.store
            .data_mut()
            .contexts
            .get_mut(&ctx)
            .ok_or(HostError::UnknownContext(ctx))?
            .downstream_data = data.to_vec();
        let mut action = Action::Continue;
        if let Some(f) = self.callbacks.downstream_data.clone() {
            let n = len_i32(data.len());
            action = Action::from_guest(self.invoke(
                ctx,
                "proxy_on_downstream_data",
                &f,
                (ctx as i32, n, i32::from(end_of_stream)),
            )?);
        }
        let out = std::mem::take(
            &mut self
                .store
                .data_mut()
                .contexts
                .get_mut(&ctx)
                .ok_or(HostError::UnknownContext(ctx))?
                .downstream_data,
        );
        Ok((action, out))
    }

    /// The connection ended: `proxy_on_downstream_connection_close`, then
    /// the context is finished.
    pub fn finish_connection(&mut self, ctx: ContextId) -> Result<(), HostError> {
        if let Some(f) = self.callbacks.downstream_close.clone() {
            self.invoke(
                ctx,
                "proxy_on_downstream_connection_close",
                &f,
                (ctx as i32, abi::PEER_REMOTE),
            )?;
        }
        self.finish(ctx)
    }

    /// Ends a stream context: `proxy_on_done`, `proxy_on_log`,
    /// `proxy_on_delete`, and the host forgets it.
    pub fn finish(&mut self, ctx: ContextId) -> Result<(), HostError> {
        self.context(ctx)?;
        let id = ctx as i32;
        if let Some(f) = self.callbacks.done.clone() {
            self.invoke(ctx, "proxy_on_done", &f, id)?;
        }
        if let Some(f) = self.callbacks.log.clone() {
            self.invoke(ctx, "proxy_on_log", &f, id)?;
        }
        if let Some(f) = self.callbacks.delete.clone() {
            self.invoke(ctx, "proxy_on_delete", &f, id)?;
        }
        let state = self.store.data_mut();
        state.contexts.remove(&ctx);
        state.done_requested = false;
        Ok(())
    }

    /// HTTP calls the plugin dispatched since the last time (drained).
    pub fn take_http_calls(&mut self) -> Vec<HttpCallRequest> {
        std::mem::take(&mut self.store.data_mut().pending_calls)
    }

    /// Calls `proxy_on_http_call_response` for `token`; `None` means the call
    /// failed (the plugin sees zero headers).
    pub fn deliver_http_call_response(
        &mut self,
        token: u32,
        response: Option<HttpCallResponse>,
    ) -> Result<(), HostError> {
        let (nh, nb, nt) = response
            .as_ref()
            .map(|r| (r.headers.len(), r.body.len(), r.trailers.len()))
            .unwrap_or((0, 0, 0));
        self.store.data_mut().call_response = response;
        let result = match self.callbacks.http_call_response.clone() {
            Some(f) => self
                .invoke(
                    self.root_id,
                    "proxy_on_http_call_response",
                    &f,
                    (
                        self.root_id as i32,
                        token as i32,
                        len_i32(nh),
                        len_i32(nb),
                        len_i32(nt),
                    ),
                )
                .map(|_| ()),
            None => Ok(()),
        };
        self.store.data_mut().call_response = None;
        result
    }

    /// `proxy_on_tick` on the root context.
    pub fn tick(&mut self) -> Result<(), HostError> {
        if let Some(f) = self.callbacks.tick.clone() {
            self.invoke(self.root_id, "proxy_on_tick", &f, self.root_id as i32)?;
        }
        Ok(())
    }

    /// The tick period the plugin asked for (0: none).
    pub fn tick_period_ms(&self) -> u32 {
        self.store.data().tick_period_ms
    }

    /// The metrics of this plugin's proxy.
    pub fn metrics(&self) -> &Metrics {
        &self.store.data().env.metrics
    }

    /// The metrics in Prometheus text format.
    pub fn metrics_prometheus(&self) -> String {
        self.store.data().env.metrics.prometheus()
    }

    /// The environment this instance runs in (logs, shared data, …).
    pub fn env(&self) -> &HostEnv {
        &self.store.data().env
    }

    /// Guest linear memory size in bytes.
    pub fn memory_size(&self) -> usize {
        self.store
            .data()
            .memory
            .map(|m| m.data_size(&self.store))
            .unwrap_or(0)
    }

    /// Open contexts, root included.
    pub fn open_contexts(&self) -> usize {
        self.store.data().contexts.len()
    }

    /// Imports the module has that this host does not implement (they answer
    /// `UNIMPLEMENTED` / `NOSYS`).
    pub fn unimplemented_imports(&self) -> &[String] {
        &self.store.data().unimplemented_calls
    }

    /// Reads `len` bytes of guest memory at `addr` (tests and debugging).
    pub fn peek_memory(&self, addr: usize, len: usize) -> Option<Vec<u8>> {
        let memory = self.store.data().memory?;
        memory
            .data(&self.store)
            .get(addr..addr.checked_add(len)?)
            .map(<[u8]>::to_vec)
    }

    /// Whether the plugin trapped (and so serves nothing more).
    pub fn has_failed(&self) -> bool {
        self.failed
    }
}

/// Every function import the host does not implement gets a definition that
/// answers the ABI's `UNIMPLEMENTED` (WASI: `NOSYS`) instead of failing to link
/// or trapping.
fn define_unimplemented(
    linker: &mut Linker<HostState>,
    store: &mut Store<HostState>,
    module: &Module,
) -> wasmtime::Result<()> {
    for import in module.imports() {
        let ExternType::Func(ty) = import.ty() else {
            continue;
        };
        if linker
            .get(&mut *store, import.module(), import.name())
            .is_ok()
        {
            continue;
        }
        let qualified = format!("{}.{}", import.module(), import.name());
        store.data_mut().unimplemented_calls.push(qualified.clone());
        let code = if import.module() == "wasi_snapshot_preview1" {
            abi::errno::NOSYS
        } else {
            Status::Unimplemented.code()
        };
        let results: Vec<ValType> = ty.results().collect();
        linker.func_new(
            import.module(),
            import.name(),
            ty.clone(),
            move |_caller, _params, out| {
                tracing::debug!("plugin called unimplemented host function {qualified}");
                for (slot, ty) in out.iter_mut().zip(results.iter()) {
                    *slot = match ty {
                        ValType::I32 => Val::I32(code),
                        ValType::I64 => Val::I64(i64::from(code)),
                        ValType::F32 => Val::F32(0),
                        ValType::F64 => Val::F64(0),
                        _ => Val::null_func_ref(),
                    };
                }
                Ok(())
            },
        )?;
    }
    Ok(())
}
