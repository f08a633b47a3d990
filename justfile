# meshward developer commands. `just presubmit` does what CI does.

default:
    @just --list

# Run the demo (signer, three workloads, the filter) on embedded defaults.
demo *ARGS:
    scripts/demo {{ARGS}}

# The whole test suite.
test *ARGS:
    scripts/test {{ARGS}}

# Build the proxy-wasm filter and print its size.
wasm:
    scripts/wasm

# Build the dashboard's policy playground module.
playground:
    scripts/playground

# The filter as an OCI image layout for WasmPlugin url: oci://… (prints its digest).
oci *ARGS:
    scripts/oci {{ARGS}}

# The signer's container image as an OCI image layout (static musl build).
signer-image *ARGS:
    scripts/signer-image {{ARGS}}

# Helm's own engine without a helm binary: `just helm template meshward charts/meshward -n istio-system`.
helm *ARGS:
    scripts/helm {{ARGS}}

# fmt, clippy (native and wasm32), tests: what .ci/run does.
presubmit:
    .ci/run

# Benchmarks; writes BENCHMARKS.md.
bench:
    scripts/bench

# Quick benchmark run that fails if a target ratio is missed.
bench-check:
    scripts/bench --check
