//! Reading exports into a [`MetricTable`]: file, directory or glob; Parquet or CSV; wide or
//! long shape.

use std::fs::File;
use std::path::{Path, PathBuf};

use polars::frame::PivotColumnNaming;
use polars::prelude::*;
use polars_parquet::read::FileMetadata;

use crate::DataError;
use crate::columns::{ColumnMap, METRICS};

/// Shape of an export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// One column per metric.
    Wide,
    /// `timestamp, host, metric, value` rows.
    Long,
}

/// Shape choice: detect, or force one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ShapeOption {
    #[default]
    Auto,
    Wide,
    Long,
}

/// File kinds we read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileFormat {
    Parquet,
    Csv,
}

impl FileFormat {
    /// By extension; `None` for anything else.
    pub fn of(path: &Path) -> Option<Self> {
        match path.extension()?.to_str()?.to_ascii_lowercase().as_str() {
            "parquet" | "pq" => Some(Self::Parquet),
            "csv" => Some(Self::Csv),
            _ => None,
        }
    }
}

/// Expand an input argument (file, directory or glob) into the files it names, sorted.
pub fn resolve_inputs(input: &str) -> Result<Vec<PathBuf>, DataError> {
    let path = Path::new(input);
    let mut files = if path.is_dir() {
        let entries = std::fs::read_dir(path).map_err(|source| DataError::Io {
            path: path.into(),
            source,
        })?;
        entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file() && FileFormat::of(p).is_some())
            .collect()
    } else if input.contains(['*', '?', '[']) {
        glob::glob(input)
            .map_err(|e| DataError::InvalidOption {
                option: "--input",
                why: format!("bad glob {input}: {e}"),
            })?
            .filter_map(Result::ok)
            .filter(|p| p.is_file())
            .collect()
    } else if path.exists() {
        vec![path.to_path_buf()]
    } else {
        return Err(DataError::Io {
            path: path.into(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or directory"),
        });
    };
    files.sort();
    if files.is_empty() {
        return Err(DataError::NoInput(input.to_string()));
    }
    for f in &files {
        if FileFormat::of(f).is_none() {
            return Err(DataError::UnsupportedFormat { path: f.clone() });
        }
    }
    Ok(files)
}

/// The footer of a Parquet file, checked against the file's length: a truncated file whose
/// footer survived would otherwise make polars' reader slice past the end of the file (a panic,
/// not an error).
pub fn parquet_footer(path: &Path) -> Result<Arc<FileMetadata>, DataError> {
    let read_err = |why: String| DataError::Read {
        path: path.into(),
        format: "Parquet",
        why,
    };
    let mut file = File::open(path).map_err(|source| DataError::Io {
        path: path.into(),
        source,
    })?;
    let len = file
        .metadata()
        .map_err(|source| DataError::Io {
            path: path.into(),
            source,
        })?
        .len();
    let footer =
        polars_parquet::read::read_metadata(&mut file).map_err(|e| read_err(e.to_string()))?;
    for (i, group) in footer.row_groups.iter().enumerate() {
        let bad = group
            .parquet_columns()
            .iter()
            .map(|c| c.byte_range())
            .find(|r| r.start > r.end || r.end > len);
        if let Some(r) = bad {
            return Err(read_err(format!(
                "row group {i} refers to bytes {}..{} of a {len}-byte file (truncated?)",
                r.start, r.end
            )));
        }
    }
    Ok(Arc::new(footer))
}

/// Read one file into a DataFrame.
pub fn read_file(path: &Path) -> Result<DataFrame, DataError> {
    let format =
        FileFormat::of(path).ok_or_else(|| DataError::UnsupportedFormat { path: path.into() })?;
    let file = File::open(path).map_err(|source| DataError::Io {
        path: path.into(),
        source,
    })?;
    let meta = file.metadata().map_err(|source| DataError::Io {
        path: path.into(),
        source,
    })?;
    if meta.len() == 0 {
        return Err(DataError::Empty(path.display().to_string()));
    }
    let read_err = |format, e: PolarsError| DataError::Read {
        path: path.into(),
        format,
        why: e.to_string(),
    };
    let df = match format {
        FileFormat::Parquet => {
            let mut reader = ParquetReader::new(file);
            reader.set_metadata(parquet_footer(path)?);
            reader.finish().map_err(|e| read_err("Parquet", e))?
        }
        FileFormat::Csv => CsvReadOptions::default()
            .with_has_header(true)
            .with_infer_schema_length(Some(10_000))
            .try_into_reader_with_file_path(Some(path.to_path_buf()))
            .and_then(|r| r.finish())
            .map_err(|e| read_err("CSV", e))?,
    };
    if df.height() == 0 {
        return Err(DataError::Empty(path.display().to_string()));
    }
    Ok(df)
}

/// Read every file an input argument names and stack them (same columns required).
pub fn read_input(input: &str) -> Result<DataFrame, DataError> {
    let files = resolve_inputs(input)?;
    let mut frames = files.iter().map(|f| read_file(f).map(|df| (f, df)));
    let (first_path, mut all) = frames
        .next()
        .expect("resolve_inputs returns at least one file")?;
    for next in frames {
        let (path, df) = next?;
        if df.get_column_names() != all.get_column_names() {
            return Err(DataError::Other(format!(
                "{}: columns differ from {} ({:?} vs {:?})",
                path.display(),
                first_path.display(),
                df.get_column_names(),
                all.get_column_names()
            )));
        }
        all.vstack_mut(&df)
            .map_err(|e| DataError::Other(format!("{}: {e}", path.display())))?;
    }
    Ok(all)
}

/// Wide if every metric column is present, long if the metric/value pair is, else an error
/// naming the first missing metric column.
pub fn detect_shape(
    df: &DataFrame,
    map: &ColumnMap,
    choice: ShapeOption,
    source: &str,
) -> Result<Shape, DataError> {
    let has = |c: &str| df.schema().contains(c);
    match choice {
        ShapeOption::Wide => Ok(Shape::Wide),
        ShapeOption::Long => Ok(Shape::Long),
        ShapeOption::Auto if map.metrics.iter().all(|m| has(m)) => Ok(Shape::Wide),
        ShapeOption::Auto if has(&map.long_metric) && has(&map.long_value) => Ok(Shape::Long),
        ShapeOption::Auto => {
            let missing = map
                .metrics
                .iter()
                .find(|m| !has(m))
                .expect("some metric column is missing");
            Err(DataError::MissingColumn {
                source_name: source.to_string(),
                column: missing.clone(),
                hint: format!(
                    " (wide exports need {}; long exports need `{}` and `{}`; rename with --columns)",
                    map.metrics.join(", "),
                    map.long_metric,
                    map.long_value
                ),
            })
        }
    }
}

/// Pivot a long export into wide: one column per metric named as `map.metrics`, keyed by
/// time and host (first value wins when a key repeats).
pub fn pivot_long(df: DataFrame, map: &ColumnMap, source: &str) -> Result<DataFrame, DataError> {
    for c in [&map.time, &map.long_metric, &map.long_value] {
        require_column(&df, c, source)?;
    }
    let mut index = vec![map.time.clone()];
    if df.schema().contains(&map.host) {
        index.push(map.host.clone());
    }
    let names: Vec<&str> = map.metrics.iter().map(String::as_str).collect();
    let on_columns =
        DataFrame::new_infer_height(vec![Column::new(map.long_metric.as_str().into(), names)])
            .map_err(|e| DataError::Other(e.to_string()))?;
    let metric_as_text = col(map.long_metric.as_str()).cast(DataType::String);
    let value_as_float = col(map.long_value.as_str()).cast(DataType::Float64);
    df.lazy()
        .with_columns([metric_as_text, value_as_float])
        .pivot(
            cols([map.long_metric.as_str()]),
            Arc::new(on_columns),
            cols(index.iter().map(String::as_str)),
            cols([map.long_value.as_str()]),
            element().first(),
            true,
            "_".into(),
            PivotColumnNaming::Auto,
        )
        .collect()
        .map_err(|e| DataError::Other(format!("{source}: cannot pivot the long export: {e}")))
}

fn require_column<'a>(
    df: &'a DataFrame,
    column: &str,
    source: &str,
) -> Result<&'a Column, DataError> {
    df.column(column).map_err(|_| DataError::MissingColumn {
        source_name: source.to_string(),
        column: column.to_string(),
        hint: String::new(),
    })
}

/// Rows of the four metrics with their time, host and alert flag. Missing values are NaN.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MetricTable {
    /// Milliseconds since the Unix epoch; `None` where the export had no usable time.
    pub time_ms: Vec<Option<i64>>,
    /// Host of each row, as an index into `host_names` (see [`MetricTable::host`]).
    pub host_index: Vec<u32>,
    /// Each host once, in first-seen order (one empty name when the export has no host
    /// column). Millions of rows share a few thousand hosts: a name per row would be a heap
    /// allocation per row.
    pub host_names: Vec<String>,
    /// Value of the grouping column of each row, when a column other than the host was chosen
    /// (`None`: rows group by host, see [`MetricTable::group_of`]).
    pub group: Option<Vec<String>>,
    /// The four metrics in [`METRICS`] order.
    pub values: Vec<[f64; 4]>,
    pub alert: Vec<bool>,
}

impl MetricTable {
    pub fn len(&self) -> usize {
        self.values.len()
    }

    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// Host of a row (empty when the export has no host column).
    pub fn host(&self, row: usize) -> &str {
        &self.host_names[self.host_index[row] as usize]
    }

    /// The group of a row: its grouping column's value, or its host.
    pub fn group_of(&self, row: usize) -> &str {
        match &self.group {
            Some(group) => &group[row],
            None => self.host(row),
        }
    }
}

/// How to read an export into a [`MetricTable`].
#[derive(Debug, Clone, Default)]
pub struct ReadOptions {
    pub columns: ColumnMap,
    pub shape: ShapeOption,
    /// Column to group rows by (default: the host column).
    pub group_by: Option<String>,
}

/// Read an input argument into a [`MetricTable`].
pub fn read_metrics(input: &str, opts: &ReadOptions) -> Result<MetricTable, DataError> {
    let df = read_input(input)?;
    frame_to_table(df, opts, input)
}

/// Convert an export DataFrame (either shape) into a [`MetricTable`].
pub fn frame_to_table(
    df: DataFrame,
    opts: &ReadOptions,
    source: &str,
) -> Result<MetricTable, DataError> {
    let map = &opts.columns;
    let df = match detect_shape(&df, map, opts.shape, source)? {
        Shape::Wide => df,
        Shape::Long => pivot_long(df, map, source)?,
    };
    let n = df.height();
    let time_ms = time_column(require_column(&df, &map.time, source)?, source)?;
    let (host_index, host_names) = match df.column(&map.host) {
        Ok(c) => {
            let text = c
                .cast(&DataType::String)
                .map_err(|_| wrong_type(c, source, "text"))?;
            let text = text.str().expect("cast to str");
            index_names(text.iter().map(|v| v.unwrap_or("")))
        }
        Err(_) => (vec![0; n], vec![String::new()]),
    };
    // Grouping by host needs no copy of the host column.
    let group = match &opts.group_by {
        Some(g) if g != &map.host => Some(text_column(require_column(&df, g, source)?, source)?),
        Some(_) => {
            require_column(&df, &map.host, source)?;
            None
        }
        None => None,
    };
    let mut values = vec![[f64::NAN; 4]; n];
    for (j, name) in map.metrics.iter().enumerate() {
        let column = require_column(&df, name, source).map_err(|e| match e {
            DataError::MissingColumn {
                source_name,
                column,
                ..
            } => DataError::MissingColumn {
                source_name,
                column,
                hint: format!(" (metric {}; rename with --columns)", METRICS[j]),
            },
            other => other,
        })?;
        for (row, v) in values.iter_mut().zip(float_column(column, source)?.iter()) {
            row[j] = v.unwrap_or(f64::NAN);
        }
    }
    let alert = match df.column(&map.alert) {
        Ok(c) => bool_column(c, source)?,
        Err(_) => vec![false; n],
    };
    Ok(MetricTable {
        time_ms,
        host_index,
        host_names,
        group,
        values,
        alert,
    })
}

fn wrong_type(column: &Column, source: &str, expected: &'static str) -> DataError {
    DataError::WrongType {
        source_name: source.to_string(),
        column: column.name().to_string(),
        found: column.dtype().to_string(),
        expected,
    }
}

/// A numeric column as f64 (nulls as `None`).
pub fn numeric_column(column: &Column, source: &str) -> Result<Vec<Option<f64>>, DataError> {
    Ok(float_column(column, source)?.iter().collect())
}

/// A numeric column as f64 values, without collecting them.
fn float_column(column: &Column, source: &str) -> Result<Float64Chunked, DataError> {
    if !(column.dtype().is_primitive_numeric() || column.dtype().is_null()) {
        return Err(wrong_type(column, source, "numbers"));
    }
    let cast = column
        .cast(&DataType::Float64)
        .map_err(|_| wrong_type(column, source, "numbers"))?;
    Ok(cast.f64().expect("cast to f64").clone())
}

/// Each row's name as an index into the distinct names, which are in first-seen order.
pub fn index_names<'a>(names: impl Iterator<Item = &'a str>) -> (Vec<u32>, Vec<String>) {
    let mut index = Vec::with_capacity(names.size_hint().0);
    let mut distinct: Vec<String> = Vec::new();
    let mut seen: PlHashMap<&'a str, u32> = PlHashMap::default();
    // Exports often hold a host's rows together: the previous row's name needs no lookup.
    let mut previous: Option<(&'a str, u32)> = None;
    for name in names {
        let i = match previous {
            Some((p, i)) if p == name => i,
            _ => *seen.entry(name).or_insert_with(|| {
                distinct.push(name.to_string());
                (distinct.len() - 1) as u32
            }),
        };
        previous = Some((name, i));
        index.push(i);
    }
    (index, distinct)
}

fn text_column(column: &Column, source: &str) -> Result<Vec<String>, DataError> {
    let cast = column
        .cast(&DataType::String)
        .map_err(|_| wrong_type(column, source, "text"))?;
    Ok(cast
        .str()
        .expect("cast to str")
        .iter()
        .map(|v| v.unwrap_or("").to_string())
        .collect())
}

fn bool_column(column: &Column, source: &str) -> Result<Vec<bool>, DataError> {
    let dtype = column.dtype();
    if dtype.is_bool() {
        return Ok(column
            .bool()
            .expect("bool")
            .iter()
            .map(|v| v.unwrap_or(false))
            .collect());
    }
    if dtype.is_primitive_numeric() {
        return Ok(numeric_column(column, source)?
            .into_iter()
            .map(|v| v.is_some_and(|v| v != 0.0))
            .collect());
    }
    if dtype == &DataType::String {
        return column
            .str()
            .expect("str")
            .iter()
            .enumerate()
            .map(
                |(row, v)| match v.map(|s| s.trim().to_ascii_lowercase()).as_deref() {
                    None | Some("") | Some("false") | Some("0") | Some("no") => Ok(false),
                    Some("true") | Some("1") | Some("yes") => Ok(true),
                    Some(other) => Err(DataError::BadValue {
                        source_name: source.to_string(),
                        column: column.name().to_string(),
                        row,
                        why: format!("`{other}` is not a boolean"),
                    }),
                },
            )
            .collect();
    }
    Err(wrong_type(column, source, "booleans"))
}

/// Epoch values below this are seconds, at or above it milliseconds (1e11 s is year 5138).
const SECONDS_LIMIT: f64 = 1e11;

/// Parse a time column (datetime, date, epoch seconds/ms, or text) into epoch milliseconds.
pub fn time_column(column: &Column, source: &str) -> Result<Vec<Option<i64>>, DataError> {
    match column.dtype() {
        DataType::Datetime(unit, _) => {
            let per_ms: i64 = match unit {
                TimeUnit::Nanoseconds => 1_000_000,
                TimeUnit::Microseconds => 1_000,
                TimeUnit::Milliseconds => 1,
            };
            let raw = column
                .cast(&DataType::Int64)
                .map_err(|_| wrong_type(column, source, "a time"))?;
            Ok(raw
                .i64()
                .expect("i64")
                .iter()
                .map(|v| v.map(|v| v.div_euclid(per_ms)))
                .collect())
        }
        DataType::Date => {
            let raw = column
                .cast(&DataType::Int32)
                .map_err(|_| wrong_type(column, source, "a time"))?;
            Ok(raw
                .i32()
                .expect("i32")
                .iter()
                .map(|v| v.map(|d| i64::from(d) * 86_400_000))
                .collect())
        }
        DataType::String => column
            .str()
            .expect("str")
            .iter()
            .enumerate()
            .map(|(row, v)| match v {
                None => Ok(None),
                Some(text) => parse_time_text(text)
                    .map(Some)
                    .ok_or_else(|| DataError::BadValue {
                        source_name: source.to_string(),
                        column: column.name().to_string(),
                        row,
                        why: format!("`{text}` is not an RFC 3339 time or epoch number"),
                    }),
            })
            .collect(),
        dtype if dtype.is_primitive_numeric() => {
            let values = numeric_column(column, source)?;
            let max = values.iter().flatten().fold(0f64, |m, v| m.max(v.abs()));
            let scale = if max < SECONDS_LIMIT { 1000.0 } else { 1.0 };
            Ok(values
                .into_iter()
                .map(|v| {
                    v.filter(|v| v.is_finite())
                        .map(|v| (v * scale).round() as i64)
                })
                .collect())
        }
        _ => Err(wrong_type(
            column,
            source,
            "a time (datetime, epoch seconds/ms or RFC 3339 text)",
        )),
    }
}

/// RFC 3339, `YYYY-MM-DD HH:MM:SS[.fff]` (UTC) or an epoch number, to epoch milliseconds.
pub fn parse_time_text(text: &str) -> Option<i64> {
    let text = text.trim();
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(text) {
        return Some(t.timestamp_millis());
    }
    for format in ["%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%dT%H:%M:%S%.f"] {
        if let Ok(t) = chrono::NaiveDateTime::parse_from_str(text, format) {
            return Some(t.and_utc().timestamp_millis());
        }
    }
    let number: f64 = text.parse().ok()?;
    number.is_finite().then(|| {
        if number.abs() < SECONDS_LIMIT {
            (number * 1000.0).round() as i64
        } else {
            number as i64
        }
    })
}

/// RFC 3339 text of epoch milliseconds (UTC).
pub fn format_time(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_else(|| ms.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> String {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p.to_str().unwrap().to_string()
    }

    const WIDE: &str = "timestamp,host,cpu_usage,mem_usage,disk_busy,net_in_bps,alert\n\
        1791158400,web-01,10,20,3,1000,false\n\
        1791158460,web-01,12,21,,1100,true\n";

    #[test]
    fn wide_csv_with_epoch_seconds_reads_every_field() {
        let dir = tempfile::tempdir().unwrap();
        let t = read_metrics(&write(dir.path(), "a.csv", WIDE), &ReadOptions::default()).unwrap();
        assert_eq!(
            t.time_ms,
            vec![Some(1_791_158_400_000), Some(1_791_158_460_000)]
        );
        assert_eq!(t.values[0], [10.0, 20.0, 3.0, 1000.0]);
        assert!(t.values[1][2].is_nan());
        assert_eq!(t.alert, vec![false, true]);
    }

    #[test]
    fn long_shape_is_detected_and_pivoted() {
        let dir = tempfile::tempdir().unwrap();
        let long = "timestamp,host,metric,value\n\
            2026-10-05T00:00:00Z,a,cpu_usage,10\n2026-10-05T00:00:00Z,a,mem_usage,20\n\
            2026-10-05T00:00:00Z,a,disk_busy,3\n2026-10-05T00:00:00Z,a,net_in_bps,1000\n\
            2026-10-05T00:01:00Z,a,cpu_usage,11\n2026-10-05T00:01:00Z,a,net_in_bps,900\n\
            2026-10-05T00:01:00Z,a,mem_usage,21\n2026-10-05T00:01:00Z,a,disk_busy,4\n\
            2026-10-05T00:01:00Z,a,load_avg,9\n";
        let t = read_metrics(
            &write(dir.path(), "long.csv", long),
            &ReadOptions::default(),
        )
        .unwrap();
        assert_eq!(t.len(), 2);
        let second = t
            .time_ms
            .iter()
            .position(|&x| x == Some(1_791_158_460_000))
            .unwrap();
        assert_eq!(t.values[second], [11.0, 21.0, 4.0, 900.0]);
    }

    #[test]
    fn directories_and_globs_stack_their_files() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "a.csv", WIDE);
        write(dir.path(), "b.csv", WIDE);
        write(dir.path(), "notes.txt", "ignored");
        let by_dir = read_metrics(dir.path().to_str().unwrap(), &ReadOptions::default()).unwrap();
        assert_eq!(by_dir.len(), 4);
        let pattern = format!("{}/a*.csv", dir.path().display());
        assert_eq!(
            read_metrics(&pattern, &ReadOptions::default())
                .unwrap()
                .len(),
            2
        );
    }

    #[test]
    fn bad_inputs_give_one_line_errors_naming_file_or_column() {
        let dir = tempfile::tempdir().unwrap();
        let no_disk = write(
            dir.path(),
            "m.csv",
            "timestamp,host,cpu_usage,mem_usage,net_in_bps\n1,a,1,2,3\n",
        );
        let err = read_metrics(&no_disk, &ReadOptions::default())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("m.csv") && err.contains("`disk_busy`"),
            "{err}"
        );

        let text_cpu = write(
            dir.path(),
            "t.csv",
            "timestamp,host,cpu_usage,mem_usage,disk_busy,net_in_bps\n1,a,high,2,3,4\n",
        );
        let err = read_metrics(&text_cpu, &ReadOptions::default())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`cpu_usage`") && err.contains("expected numbers"),
            "{err}"
        );

        let empty = write(dir.path(), "e.csv", "");
        assert!(
            read_metrics(&empty, &ReadOptions::default())
                .unwrap_err()
                .to_string()
                .contains("no rows")
        );
        let header_only = write(
            dir.path(),
            "h.csv",
            "timestamp,host,cpu_usage,mem_usage,disk_busy,net_in_bps\n",
        );
        assert!(
            read_metrics(&header_only, &ReadOptions::default())
                .unwrap_err()
                .to_string()
                .contains("no rows")
        );

        let corrupt = write(dir.path(), "c.parquet", "PAR1 this is not parquet");
        let err = read_metrics(&corrupt, &ReadOptions::default())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("c.parquet") && err.contains("Parquet"),
            "{err}"
        );

        // Footer intact, data cut short: the footer's offsets run past the end of the file.
        let spec = crate::synthetic::SampleSpec {
            hosts: 1,
            days: 1.0,
            ..Default::default()
        };
        let mut df = crate::synthetic::generate(&spec).to_dataframe().unwrap();
        let whole_path = dir.path().join("whole.parquet");
        ParquetWriter::new(File::create(&whole_path).unwrap())
            .finish(&mut df)
            .unwrap();
        let whole = std::fs::read(&whole_path).unwrap();
        let tail = &whole[whole.len() - 8..whole.len() - 4];
        let data_end = whole.len() - 8 - u32::from_le_bytes(tail.try_into().unwrap()) as usize;
        let mut cut = whole[..data_end / 2].to_vec();
        cut.extend_from_slice(&whole[data_end..]);
        let truncated = dir.path().join("cut.parquet");
        std::fs::write(&truncated, cut).unwrap();
        let err = read_file(&truncated).unwrap_err().to_string();
        assert!(
            err.contains("cut.parquet") && err.contains("truncated?"),
            "{err}"
        );

        let missing = format!("{}/nope.parquet", dir.path().display());
        assert!(
            read_metrics(&missing, &ReadOptions::default())
                .unwrap_err()
                .to_string()
                .contains("nope.parquet")
        );
        let none = format!("{}/*.pq", dir.path().display());
        assert!(
            read_metrics(&none, &ReadOptions::default())
                .unwrap_err()
                .to_string()
                .contains("no input files")
        );
        let bad_time = write(
            dir.path(),
            "bt.csv",
            "timestamp,host,cpu_usage,mem_usage,disk_busy,net_in_bps\nyesterday,a,1,2,3,4\n",
        );
        let err = read_metrics(&bad_time, &ReadOptions::default())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`timestamp`") && err.contains("yesterday"),
            "{err}"
        );
        assert!(!err.contains('\n'));
    }

    #[test]
    fn renamed_columns_are_honoured() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            dir.path(),
            "r.csv",
            "ts,node,CPU,mem_usage,disk_busy,rx\n1,a,5,6,7,8\n",
        );
        let opts = ReadOptions {
            columns: ColumnMap {
                time: "ts".into(),
                host: "node".into(),
                ..ColumnMap::default()
                    .with_metric_overrides("cpu=CPU,net_in=rx")
                    .unwrap()
            },
            ..Default::default()
        };
        let t = read_metrics(&p, &opts).unwrap();
        assert_eq!((t.host(0), t.values[0]), ("a", [5.0, 6.0, 7.0, 8.0]));
    }
}
