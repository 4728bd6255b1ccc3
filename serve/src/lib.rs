//! dagmm-serve: score server-metric samples with DAGMM bundles over HTTP, and batch-score
//! history with the same scorer.
//!
//! Reading order: `registry` (loading and hot-reloading bundles), `request` (parsing and checking
//! bodies), `app` (routes, auth, limits), `metrics` (Prometheus), `error` (the one JSON error
//! shape), `server` (listening and graceful shutdown), `stream` (the NATS JetStream consumer),
//! `batch` (scoring history files) with `parquet_copy` (its Parquet-to-Parquet fast path).

pub mod app;
pub mod batch;
pub mod error;
pub mod metrics;
pub mod parquet_copy;
pub mod registry;
pub mod request;
pub mod server;
pub mod stream;
