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

# fmt, clippy (native and wasm32), tests: what .ci/run does.
presubmit:
    .ci/run

# Benchmarks; writes BENCHMARKS.md.
bench:
    scripts/bench

# Quick benchmark run that fails if a target ratio is missed.
bench-check:
    scripts/bench --check
