//! Benchmarks live in benches/*.rs and the scripts in this folder; this library is empty.
