//! Getting metric data in: Parquet/CSV readers, column mapping, wide/long shapes, cleaning,
//! training windows, and the seeded generator of the bundled sample export.
//!
//! Nothing here knows about DAGMM; the output is plain rows of the four metrics.

pub mod clean;
#[cfg(feature = "cli")]
pub mod cli;
pub mod columns;
mod error;
pub mod read;
pub mod synthetic;

pub use clean::{CleanOptions, CleaningReport, GroupData, MissingPolicy, Window, prepare_groups};
pub use columns::{ColumnMap, METRICS};
pub use error::DataError;
pub use read::{MetricTable, ReadOptions, ShapeOption, read_metrics};
