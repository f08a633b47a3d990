use std::time::Instant;
use wasmtime::*;
struct S { mem: Option<Memory>, alloc: Option<TypedFunc<i32, i32>> }
fn main() {
    let mut config = Config::new();
    config.wasm_gc(false); config.wasm_function_references(false); config.wasm_exceptions(false); config.gc_support(false);
    let engine = Engine::new(&config).unwrap();
    let module = Module::new(&engine, std::fs::read("/tmp/xc/m.wasm").unwrap()).unwrap();
    let mut linker = Linker::new(&engine);
    linker.func_wrap("env", "nop", |_c: Caller<'_, S>, x: i32| -> i32 { x }).unwrap();
    linker.func_wrap("env", "get", |mut c: Caller<'_, S>, pp: i32, sp: i32| -> Result<i32> {
        let bytes = [7u8; 100];
        let alloc = c.data().alloc.clone().unwrap();
        let addr = alloc.call(&mut c, 100)?;
        let mem = c.data().mem.unwrap();
        let d = mem.data_mut(&mut c);
        d[addr as usize..addr as usize + 100].copy_from_slice(&bytes);
        d[pp as usize..pp as usize + 4].copy_from_slice(&addr.to_le_bytes());
        d[sp as usize..sp as usize + 4].copy_from_slice(&100i32.to_le_bytes());
        Ok(0)
    }).unwrap();
    let mut store = Store::new(&engine, S { mem: None, alloc: None });
    let inst = linker.instantiate(&mut store, &module).unwrap();
    store.data_mut().mem = inst.get_memory(&mut store, "memory");
    store.data_mut().alloc = Some(inst.get_typed_func::<i32, i32>(&mut store, "alloc").unwrap());
    for name in ["empty", "one_nop", "one_get", "floor"] {
        let f = inst.get_typed_func::<(i32, i32, i32), i32>(&mut store, name).unwrap();
        let mut best = f64::MAX;
        for _ in 0..20 {
            let n = 200_000;
            let t = Instant::now();
            for i in 0..n { std::hint::black_box(f.call(&mut store, (i, 1, 0)).unwrap()); }
            best = best.min(t.elapsed().as_nanos() as f64 / n as f64);
        }
        println!("{name}: {best:.1} ns");
    }
}
