//! Batch-scoring history: read exports in chunks, route each row to its model, score with the
//! same verdict code as `POST /score`, and write every input column plus the scores.
//!
//! Memory is bounded for Parquet input: by the chunk size when every column is decoded and
//! re-encoded (row slices are read one at a time and written through a batched writer), and
//! also by the row-group size when the input is copied (`parquet_copy`), since a group's raw
//! columns and compressed scores are written together. CSV is read in blocks of whole
//! records; a long-shape export is read whole, because it is pivoted. Rows that cannot be
//! scored are kept with null scores and a `reason`.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use dagmm_datasets::read::{
    FileFormat, ReadOptions, Shape, ShapeOption, detect_shape, format_time, frame_to_table,
    read_file, resolve_inputs,
};
use dagmm_model::eval::{Detection, detection};
use dagmm_model::scorer::{LANES, Scratch};
use polars::polars_utils::float::IsFloat;
use polars::prelude::*;
use polars_arrow::array::BooleanArray;
use polars_arrow::bitmap::Bitmap;
use polars_arrow::datatypes::ArrowDataType;
use rayon::prelude::*;

use crate::parquet_copy::{self, CopyPlan, CopyWriter, RawRowGroup};
use crate::registry::{LoadedModel, ModelMap};

/// Rows read and scored per step.
pub const DEFAULT_CHUNK_ROWS: usize = 65_536;

/// What to score and where to write it.
pub struct BatchOptions {
    pub input: String,
    pub output: PathBuf,
    pub read: ReadOptions,
    /// Model for rows whose host has no model of its own.
    pub default_model: Option<String>,
    /// Ground-truth 0/1 (or boolean) column to evaluate the cutoff against.
    pub label_column: Option<String>,
    pub chunk_rows: usize,
    /// Which rows get `top_metric` and contribution columns.
    pub explain: Explain,
    /// Called with (rows done, rows total) after each chunk.
    pub progress: Option<Box<dyn Fn(usize, usize) + Sync>>,
}

/// Which rows are explained. Energies, flags, severities and percentiles are written for every
/// row either way and are the same numbers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Explain {
    /// Every row, as `POST /score` answers: five forward passes per row.
    #[default]
    All,
    /// Only flagged rows; the others get null `top_metric` and contributions, and cost one
    /// forward pass.
    Anomalies,
}

/// One of the highest-energy rows.
#[derive(Debug, Clone, PartialEq)]
pub struct TopRow {
    pub energy: f64,
    pub timestamp: Option<i64>,
    pub host: String,
    pub top_metric: String,
    pub severity: String,
}

/// What a batch run did.
#[derive(Debug, Default)]
pub struct BatchSummary {
    pub rows_in: usize,
    pub rows_scored: usize,
    /// Rows not scored, by reason.
    pub not_scored: BTreeMap<String, usize>,
    pub anomalies_by_severity: BTreeMap<String, usize>,
    pub anomalies_by_host: BTreeMap<String, usize>,
    pub top: Vec<TopRow>,
    pub labels: Option<Detection>,
    pub seconds: f64,
}

/// Hosts named in the summary's anomalies-by-host line.
const HOSTS_LISTED: usize = 20;

/// Number of highest-energy rows kept for the summary.
const TOP_ROWS: usize = 20;

/// A candidate for the top rows, ordered by energy (and, among equal energies, the earlier
/// row first).
struct Candidate {
    energy: f64,
    /// The row's place in the whole input.
    seq: usize,
    row: TopRow,
}
impl PartialEq for Candidate {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other).is_eq()
    }
}
impl Eq for Candidate {}
impl PartialOrd for Candidate {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Candidate {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.energy.total_cmp(&other.energy)).then(self.seq.cmp(&other.seq))
    }
}

/// A code that stands for no value in a code column.
const NO_CODE: u32 = u32::MAX;

/// Scores of a chunk, one vector per output column, so that each column is written from its
/// own contiguous values. A row that was not scored has a NaN energy (a scored one never has:
/// see `LaneMixture::energies`) and its reason in `reasons`; a row not explained has NaN
/// contributions and `NO_CODE` for its top metric. Contributions are f32, as `POST /score`
/// answers them. Text values are codes into the run's
/// [`Vocabulary`], so scoring a row allocates nothing.
struct ChunkScores {
    energy: Vec<f64>,
    /// Meaningful where the energy is.
    anomaly: Vec<bool>,
    severity: Vec<u32>,
    percentile: Vec<f64>,
    top_metric: Vec<u32>,
    /// One vector per output metric column, in their order.
    contributions: Vec<Vec<f32>>,
    model: Vec<u32>,
    /// (row, why) of the rows not scored, in row order.
    reasons: Vec<(usize, String)>,
}

/// The score slots of a run of consecutive rows, filled by one scoring task.
struct ScoreSlots<'a> {
    energy: &'a mut [f64],
    anomaly: &'a mut [bool],
    severity: &'a mut [u32],
    percentile: &'a mut [f64],
    top_metric: &'a mut [u32],
    contributions: Vec<&'a mut [f32]>,
    model: &'a mut [u32],
}

impl ChunkScores {
    /// Scores of `rows` rows, none scored yet.
    fn new(rows: usize, metrics: usize) -> Self {
        Self {
            energy: vec![f64::NAN; rows],
            anomaly: vec![false; rows],
            severity: vec![NO_CODE; rows],
            percentile: vec![f64::NAN; rows],
            top_metric: vec![NO_CODE; rows],
            contributions: vec![vec![f32::NAN; rows]; metrics],
            model: vec![NO_CODE; rows],
            reasons: Vec::new(),
        }
    }

    fn len(&self) -> usize {
        self.energy.len()
    }

    /// The slots split into runs of `size` rows.
    fn slots(&mut self, size: usize) -> Vec<ScoreSlots<'_>> {
        let mut anomaly = self.anomaly.chunks_mut(size);
        let mut severity = self.severity.chunks_mut(size);
        let mut percentile = self.percentile.chunks_mut(size);
        let mut top_metric = self.top_metric.chunks_mut(size);
        let mut model = self.model.chunks_mut(size);
        let mut contributions: Vec<_> = (self.contributions.iter_mut())
            .map(|c| c.chunks_mut(size))
            .collect();
        // Every vector has one value per row, so each yields a run wherever `energy` does.
        fn run<T>(next: Option<T>) -> T {
            next.expect("score columns of equal length")
        }
        (self.energy.chunks_mut(size))
            .map(|energy| ScoreSlots {
                energy,
                anomaly: run(anomaly.next()),
                severity: run(severity.next()),
                percentile: run(percentile.next()),
                top_metric: run(top_metric.next()),
                contributions: contributions.iter_mut().map(|c| run(c.next())).collect(),
                model: run(model.next()),
            })
            .collect()
    }
}

/// Every value the `severity`, `top_metric` and `model` columns can take, known before the
/// first row is read. The columns are written as categoricals over these values: the Parquet
/// writer then stores each value once in the dictionary and the codes as they are, instead of
/// hashing, counting and comparing one string per row and column.
struct Vocabulary {
    severity: ColumnCategories,
    top_metric: ColumnCategories,
    model: ColumnCategories,
    /// Per model name: its codes into the categories above.
    codes: HashMap<String, ModelCodes>,
}

/// One output column's categories.
struct ColumnCategories {
    dtype: DataType,
    mapping: Arc<CategoricalMapping>,
}

impl ColumnCategories {
    fn new(column: &str) -> Self {
        let categories = Categories::new(
            column.into(),
            "dagmm-score".into(),
            CategoricalPhysical::U32,
        );
        let mapping = categories.mapping();
        Self {
            dtype: DataType::Categorical(categories, mapping.clone()),
            mapping,
        }
    }

    fn code(&self, value: &str) -> PolarsResult<u32> {
        self.mapping.insert_cat(value)
    }

    /// The value of a code; empty for `NO_CODE`.
    fn text(&self, code: u32) -> &str {
        self.mapping.cat_to_str(code).unwrap_or_default()
    }

    /// A column of codes into these categories; `NO_CODE` is a null.
    fn column(&self, name: &str, codes: &[u32]) -> Column {
        let validity = validity_of(codes, |&c| c != NO_CODE);
        // A null's slot holds a valid code all the same.
        let values = codes.iter().map(|&c| if c == NO_CODE { 0 } else { c });
        let codes = UInt32Chunked::from_vec_validity(name.into(), values.collect(), validity);
        // SAFETY: every code came from `code`, which inserted its value into this mapping.
        unsafe { Categorical32Chunked::from_cats_and_dtype_unchecked(codes, self.dtype.clone()) }
            .into_column()
    }
}

/// One model's codes into the [`Vocabulary`].
struct ModelCodes {
    /// By [`Thresholds::severity_level`](dagmm_model::thresholds::Thresholds::severity_level).
    severity: Vec<u32>,
    /// By model feature index.
    top_metric: Vec<u32>,
    model: u32,
}

impl Vocabulary {
    fn new(models: &ModelMap) -> PolarsResult<Self> {
        let mut v = Vocabulary {
            severity: ColumnCategories::new("severity"),
            top_metric: ColumnCategories::new("top_metric"),
            model: ColumnCategories::new("model"),
            codes: HashMap::new(),
        };
        for model in models.values() {
            let def = model.explainer.model();
            let levels = std::iter::once(dagmm_model::thresholds::NORMAL)
                .chain(def.thresholds.severities.iter().map(|l| l.name.as_str()));
            let codes = ModelCodes {
                severity: levels
                    .map(|l| v.severity.code(l))
                    .collect::<PolarsResult<_>>()?,
                top_metric: (def.preprocessor.features.iter())
                    .map(|f| v.top_metric.code(&f.name))
                    .collect::<PolarsResult<_>>()?,
                model: v.model.code(&model.name)?,
            };
            v.codes.insert(model.name.clone(), codes);
        }
        Ok(v)
    }

    fn codes(&self, model: &LoadedModel) -> &ModelCodes {
        &self.codes[&model.name]
    }
}

fn route<'a>(
    models: &'a ModelMap,
    host: &str,
    default_model: Option<&'a LoadedModel>,
) -> Option<&'a LoadedModel> {
    if models.len() == 1 {
        return models.values().next().map(|m| m.as_ref());
    }
    models.get(host).map(|m| m.as_ref()).or(default_model)
}

/// The model of each of a chunk's hosts (by host index), looked up once per chunk.
fn host_models<'a>(
    models: &'a ModelMap,
    table: &dagmm_datasets::MetricTable,
    default_model: Option<&'a LoadedModel>,
) -> Vec<Option<&'a LoadedModel>> {
    (table.host_names.iter())
        .map(|h| route(models, h, default_model))
        .collect()
}

fn score_rows(
    host_models: &[Option<&LoadedModel>],
    vocabulary: &Vocabulary,
    table: &dagmm_datasets::MetricTable,
    metric_names: &[String],
    explain: Explain,
) -> ChunkScores {
    let values = &table.values;
    const PAR_CHUNK: usize = 4096;
    let mut out = ChunkScores::new(values.len(), metric_names.len());
    let reasons: Vec<Vec<(usize, String)>> = (out.slots(PAR_CHUNK).into_par_iter())
        .enumerate()
        .map(|(c, mut chunk)| {
            let first = c * PAR_CHUNK;
            let mut reasons = Vec::new();
            // Valid rows with their model, grouped by model so they can be scored LANES at a
            // time (per-host exports interleave hosts row by row).
            let mut routed: Vec<(&LoadedModel, usize)> = Vec::with_capacity(chunk.energy.len());
            for i in 0..chunk.energy.len() {
                let row = first + i;
                let Some(model) = host_models[table.host_index[row] as usize] else {
                    reasons.push((row, format!("no model for host `{}`", table.host(row))));
                    continue;
                };
                match model.explainer.validate(&values[row]) {
                    Ok(()) => routed.push((model, i)),
                    Err(e) => reasons.push((row, reason_of(e))),
                }
            }
            routed.sort_by_key(|(m, _)| std::ptr::from_ref::<LoadedModel>(m) as usize);
            let mut scratch = None;
            for group in routed.chunk_by(|a, b| std::ptr::eq(a.0, b.0)) {
                let model = group[0].0;
                let codes = vocabulary.codes(model);
                let explainer = &model.explainer;
                let model_def = explainer.model();
                let features = &model_def.preprocessor.features;
                let d = features.len();
                // Output column → model feature index.
                let mut feature_of = [None; 4];
                for (m, name) in feature_of.iter_mut().zip(metric_names) {
                    *m = features.iter().position(|f| &f.name == name);
                }
                let s = scratch.get_or_insert_with(|| explainer.scorer().new_scratch());
                let thresholds = &model_def.thresholds;
                // Full verdict numbers for up to LANES rows, written into their slots.
                let explain_full =
                    |rows: &[&[f64]], slots: &[usize], chunk: &mut ScoreSlots, s: &mut Scratch| {
                        let assessed = explainer.assess_lanes::<LANES>(rows, s);
                        for (r, (&i, a)) in slots.iter().zip(&assessed).enumerate() {
                            chunk.energy[i] = a.energy;
                            chunk.anomaly[i] = a.anomaly;
                            chunk.severity[i] = codes.severity[thresholds.severity_level(a.energy)];
                            chunk.percentile[i] = a.percentile;
                            chunk.top_metric[i] = codes.top_metric[a.top];
                            for (column, j) in chunk.contributions.iter_mut().zip(feature_of) {
                                column[i] = j.map_or(f32::NAN, |j| s.shares[r * d + j] as f32);
                            }
                            chunk.model[i] = codes.model;
                        }
                    };
                // Flagged rows waiting to fill a block of lanes (`--explain anomalies`).
                let mut pending_rows: [&[f64]; LANES] = [&[]; LANES];
                let mut pending_slots = [0usize; LANES];
                let mut n_pending = 0;
                for block in group.chunks(LANES) {
                    let mut rows: [&[f64]; LANES] = [&[]; LANES];
                    let mut slots = [0usize; LANES];
                    for ((r, slot), &(_, i)) in rows.iter_mut().zip(&mut slots).zip(block) {
                        *r = &values[first + i];
                        *slot = i;
                    }
                    let n = block.len();
                    if explain == Explain::All {
                        explain_full(&rows[..n], &slots[..n], &mut chunk, s);
                        continue;
                    }
                    let energies = explainer.energies_lanes::<LANES>(&rows[..n], s);
                    for ((&row, &i), &energy) in rows.iter().zip(&slots).zip(&energies).take(n) {
                        if thresholds.is_anomaly(energy) {
                            pending_rows[n_pending] = row;
                            pending_slots[n_pending] = i;
                            n_pending += 1;
                            if n_pending == LANES {
                                explain_full(&pending_rows, &pending_slots, &mut chunk, s);
                                n_pending = 0;
                            }
                            continue;
                        }
                        chunk.energy[i] = energy;
                        chunk.anomaly[i] = false;
                        chunk.severity[i] = codes.severity[thresholds.severity_level(energy)];
                        chunk.percentile[i] = explainer.percentile_rank(energy);
                        chunk.model[i] = codes.model;
                    }
                }
                if n_pending > 0 {
                    explain_full(
                        &pending_rows[..n_pending],
                        &pending_slots[..n_pending],
                        &mut chunk,
                        s,
                    );
                }
            }
            reasons
        })
        .collect();
    out.reasons = reasons.into_iter().flatten().collect();
    out
}

/// The `reason` written for a row that fails validation.
fn reason_of(e: dagmm_model::ModelError) -> String {
    match e {
        dagmm_model::ModelError::InvalidSample { field, why } if why.contains("finite") => {
            format!("missing {field}")
        }
        dagmm_model::ModelError::InvalidSample { field, why } => {
            format!("invalid {field}: {why}")
        }
        other => other.to_string(),
    }
}

/// Validity of values where absent ones are marked: `None` when every value is present.
fn validity_of<T>(values: &[T], present: impl Fn(&T) -> bool) -> Option<Bitmap> {
    let validity: Bitmap = values.iter().map(present).collect();
    (validity.unset_bits() > 0).then_some(validity)
}

/// A nullable float column (f64 or f32) from values where NaN marks a null.
fn float_column<T>(name: &str, values: &[T::Native]) -> Column
where
    T: PolarsFloatType,
    ChunkedArray<T>: IntoColumn,
{
    let validity = validity_of(values, |v| !IsFloat::is_nan(v));
    ChunkedArray::<T>::from_vec_validity(name.into(), values.to_vec(), validity).into_column()
}

/// The score columns of a chunk, in output order.
fn score_columns(
    scores: &ChunkScores,
    metric_names: &[String],
    vocabulary: &Vocabulary,
) -> Vec<Column> {
    let scored = || validity_of(&scores.energy, |v| !v.is_nan());
    let metrics = metric_names.len();
    // Each column is one pass over its values; they are built side by side.
    (0..metrics + 7)
        .into_par_iter()
        .map(|c| match c {
            0 => float_column::<Float64Type>("energy", &scores.energy),
            1 => {
                let values: Bitmap = scores.anomaly.iter().copied().collect();
                let array = BooleanArray::new(ArrowDataType::Boolean, values, scored());
                BooleanChunked::with_chunk("anomaly".into(), array).into_column()
            }
            2 => vocabulary.severity.column("severity", &scores.severity),
            3 => float_column::<Float64Type>("percentile", &scores.percentile),
            4 => (vocabulary.top_metric).column("top_metric", &scores.top_metric),
            c if c < 5 + metrics => {
                let j = c - 5;
                let name = format!("contribution_{}", metric_names[j]);
                float_column::<Float32Type>(&name, &scores.contributions[j])
            }
            c if c == 5 + metrics => vocabulary.model.column("model", &scores.model),
            _ if scores.reasons.is_empty() => {
                StringChunked::full_null("reason".into(), scores.len()).into_column()
            }
            _ => {
                let mut reasons = vec![None; scores.len()];
                for (row, why) in &scores.reasons {
                    reasons[*row] = Some(why.as_str());
                }
                Column::new("reason".into(), reasons)
            }
        })
        .collect()
}

/// The score columns must not replace an input column.
fn ensure_new_columns<'a>(
    columns: &[Column],
    mut input_names: impl Iterator<Item = &'a str>,
) -> Result<()> {
    if let Some(taken) = input_names.find(|n| columns.iter().any(|c| c.name().as_str() == *n)) {
        bail!("input already has a column named `{taken}`; rename it before scoring");
    }
    Ok(())
}

/// Append the score columns to a chunk of the input.
fn with_scores(
    mut df: DataFrame,
    scores: &ChunkScores,
    metric_names: &[String],
    vocabulary: &Vocabulary,
) -> Result<DataFrame> {
    let columns = score_columns(scores, metric_names, vocabulary);
    ensure_new_columns(
        &columns,
        df.get_column_names().into_iter().map(|n| n.as_str()),
    )?;
    for c in columns {
        df.with_column(c)?;
    }
    Ok(df)
}

/// Output writer; one per run, so the size difference between variants does not matter.
#[allow(clippy::large_enum_variant)]
enum Writer {
    Parquet(polars::io::parquet::write::BatchedWriter<BufWriter<File>>),
    Csv(polars::io::csv::write::BatchedWriter<BufWriter<File>>),
    /// Copied input row groups plus score columns.
    Copy(CopyWriter<BufWriter<File>>),
}

impl Writer {
    fn open(file: File, format: FileFormat, schema: &Schema) -> PolarsResult<Self> {
        let w = BufWriter::with_capacity(1 << 20, file);
        Ok(match format {
            FileFormat::Parquet => Writer::Parquet(
                ParquetWriter::new(w)
                    // Level 1, as the copy path's score columns: energies barely compress, and
                    // polars' default level spent a tenth of a run on finding that out.
                    .with_compression(ParquetCompression::Zstd(Some(
                        polars_parquet::write::ZstdLevel::try_new(1)?,
                    )))
                    .batched(schema)?,
            ),
            FileFormat::Csv => Writer::Csv(CsvWriter::new(w).include_header(true).batched(schema)?),
        })
    }

    fn write(&mut self, out: Output) -> PolarsResult<()> {
        let Output { mut frame, raw } = out;
        if let Writer::Copy(w) = self {
            w.add_scores(frame)?;
            return raw.map_or(Ok(()), |raw| w.write(raw));
        }
        polars_ensure!(
            raw.is_none(),
            InvalidOperation: "a copied row group without a copying writer"
        );
        // Input slices keep their own chunk layout per column; the batched writers expect
        // every column chunked alike.
        frame.rechunk_mut_par();
        match self {
            Writer::Parquet(w) => w.write_batch(&frame),
            Writer::Csv(w) => w.write_batch(&frame),
            Writer::Copy(_) => Ok(()),
        }
    }

    fn finish(self) -> PolarsResult<()> {
        match self {
            Writer::Parquet(w) => w.finish().map(|_| ()),
            Writer::Csv(mut w) => w.finish(),
            Writer::Copy(w) => w.finish(),
        }
    }
}

/// Frames of one input file, read lazily.
type Chunks = Box<dyn Iterator<Item = Result<DataFrame>> + Send>;

/// Chunks of an input file: row slices of a wide Parquet file, blocks of a wide CSV file, a
/// long-shape file whole.
fn chunks_of(path: &Path, chunk_rows: usize, read: &ReadOptions) -> Result<(usize, Chunks)> {
    match FileFormat::of(path) {
        Some(FileFormat::Parquet) => {
            let footer = dagmm_datasets::read::parquet_footer(path)?;
            let total = footer.num_rows;
            if total == 0 {
                bail!("{}: no rows", path.display());
            }
            // A long export's rows for one time and host may lie on both sides of any chunk
            // boundary (or far apart, if it is sorted by metric), and they are pivoted into
            // one row together: such a file is read whole.
            let mut head =
                ParquetReader::new(File::open(path).with_context(|| path.display().to_string())?);
            head.set_metadata(footer.clone());
            let head = (head.with_slice(Some((0, 0))).finish())
                .map_err(|e| parquet_copy::cannot_read(path, e))?;
            let source = path.display().to_string();
            if detect_shape(&head, &read.columns, read.shape, &source)? == Shape::Long {
                return whole_file(path);
            }
            let path = path.to_path_buf();
            let iter = (0..total).step_by(chunk_rows.max(1)).map(move |offset| {
                let file = File::open(&path).with_context(|| path.display().to_string())?;
                let mut reader = ParquetReader::new(file);
                reader.set_metadata(footer.clone());
                reader
                    .with_slice(Some((offset, chunk_rows)))
                    .finish()
                    .map_err(|e| parquet_copy::cannot_read(&path, e))
            });
            Ok((total, Box::new(iter)))
        }
        Some(FileFormat::Csv) => csv_chunks(path, chunk_rows, read),
        None => whole_file(path),
    }
}

/// A whole file as one chunk.
fn whole_file(path: &Path) -> Result<(usize, Chunks)> {
    let df = read_file(path)?;
    Ok((df.height(), Box::new(std::iter::once(Ok(df)))))
}

/// Chunks of a wide CSV export: blocks of whole lines read one after another and parsed with
/// the schema polars infers from the file's start (as `read_file` does). A long export is read
/// whole, as for Parquet, and so is a file whose path is not UTF-8 (polars' scan, which infers
/// the schema, cannot take it).
fn csv_chunks(path: &Path, chunk_rows: usize, read: &ReadOptions) -> Result<(usize, Chunks)> {
    let source = path.display().to_string();
    let bytes = std::fs::metadata(path)
        .with_context(|| source.clone())?
        .len();
    let Some(text_path) = path.to_str().filter(|_| bytes > 0) else {
        // An empty file gets `read_file`'s error.
        return whole_file(path);
    };
    let schema = LazyCsvReader::new(PlRefPath::from(text_path))
        .with_has_header(true)
        .with_infer_schema_length(Some(10_000))
        .finish()
        .and_then(|mut lf| lf.collect_schema())
        .map_err(|e| anyhow::anyhow!("{source}: cannot read as CSV: {e}"))?;
    let head = DataFrame::empty_with_schema(&schema);
    if detect_shape(&head, &read.columns, read.shape, &source)? == Shape::Long {
        return whole_file(path);
    }
    let rows = csv_rows_estimate(path, bytes).with_context(|| source.clone())?;
    if rows == 0 {
        bail!("{source}: no rows");
    }
    let blocks = CsvBlocks {
        file: File::open(path).with_context(|| source.clone())?,
        source,
        schema,
        // About a chunk of rows at the width of a metrics export.
        block_bytes: chunk_rows.saturating_mul(CSV_BYTES_PER_ROW).max(1 << 16),
        pending: Vec::new(),
        at_end: false,
        first: true,
    };
    Ok((rows, Box::new(blocks)))
}

/// Bytes a CSV block is read in per chunk row: a timestamp, a host and four metrics take
/// about 130.
const CSV_BYTES_PER_ROW: usize = 128;

/// A CSV file read as frames of whole records, each parsed from its own bytes: memory holds a
/// block, not the file (polars' readers map the whole file, which then counts as resident).
struct CsvBlocks {
    file: File,
    source: String,
    schema: SchemaRef,
    block_bytes: usize,
    /// Bytes read after the last complete record so far.
    pending: Vec<u8>,
    at_end: bool,
    /// The next block starts with the header line.
    first: bool,
}

impl CsvBlocks {
    /// Read up to one more block into `pending`; false at the end of the file.
    fn fill(&mut self) -> std::io::Result<bool> {
        use std::io::Read;
        let start = self.pending.len();
        self.pending.resize(start + self.block_bytes, 0);
        let mut filled = start;
        while filled < self.pending.len() {
            match self.file.read(&mut self.pending[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.pending.truncate(filled);
        Ok(filled > start)
    }

    /// Parse whole records (the header too, in the first block) with the file's schema.
    fn parse(&mut self, records: Vec<u8>) -> Result<DataFrame> {
        let has_header = std::mem::replace(&mut self.first, false);
        CsvReadOptions::default()
            .with_has_header(has_header)
            .with_schema(Some(self.schema.clone()))
            .into_reader_with_file_handle(std::io::Cursor::new(records))
            .finish()
            .map_err(|e| anyhow::anyhow!("{}: cannot read as CSV: {e}", self.source))
    }
}

/// Where the last complete record of `bytes` ends (just past its line break), for bytes that
/// start at a record: a line break inside a quoted field does not end one. A field's quotes
/// come in pairs (an escaped quote is two), so a line break ends a record when an even number
/// of quotes precede it.
fn last_record_end(bytes: &[u8]) -> Option<usize> {
    let mut quotes_before = bytes.iter().filter(|&&b| b == b'"').count();
    for (i, &b) in bytes.iter().enumerate().rev() {
        match b {
            b'"' => quotes_before -= 1,
            b'\n' if quotes_before % 2 == 0 => return Some(i + 1),
            _ => {}
        }
    }
    None
}

impl Iterator for CsvBlocks {
    type Item = Result<DataFrame>;

    fn next(&mut self) -> Option<Result<DataFrame>> {
        loop {
            if !self.at_end {
                match self.fill() {
                    Ok(more) => self.at_end = !more,
                    Err(e) => {
                        self.at_end = true;
                        self.pending.clear();
                        return Some(Err(anyhow::anyhow!("{}: {e}", self.source)));
                    }
                }
            }
            let end = if self.at_end {
                self.pending.len()
            } else {
                match last_record_end(&self.pending) {
                    Some(end) => end,
                    // A record longer than a block: read on.
                    None => continue,
                }
            };
            if end == 0 && !self.first {
                return None;
            }
            let rest = self.pending.split_off(end);
            let records = std::mem::replace(&mut self.pending, rest);
            return Some(self.parse(records));
        }
    }
}

/// Rows after the header, for progress: counted when the file is no larger than a 1 MiB
/// sample of its start, else extrapolated from the sample's bytes per line (a second pass over
/// a large file only to count its lines would delay the first chunk). 0 only for a file
/// without data rows. (A quoted field with a line break in it counts as two lines.)
fn csv_rows_estimate(path: &Path, bytes: u64) -> std::io::Result<usize> {
    use std::io::Read;
    const SAMPLE: u64 = 1 << 20;
    let mut sample = Vec::new();
    File::open(path)?.take(SAMPLE).read_to_end(&mut sample)?;
    // A last line without a line break still counts.
    let lines = sample.iter().filter(|&&b| b == b'\n').count()
        + usize::from(sample.last().is_some_and(|&b| b != b'\n'));
    if sample.len() as u64 >= bytes {
        return Ok(lines.saturating_sub(1));
    }
    let estimate = lines as f64 * bytes as f64 / sample.len() as f64;
    Ok((estimate as usize).saturating_sub(1).max(1))
}

/// Rows read from an input.
enum Source {
    /// A chunk with every column, written from its values.
    Decoded(DataFrame),
    /// Rows of a copied row group with the columns scoring needs; the group's columns as they
    /// are come with its last rows.
    Copied(DataFrame, Option<RawRowGroup>),
}

/// Chunks of all inputs, in order, with the name of their source.
type SourceChunks = Box<dyn Iterator<Item = Result<(String, Source)>> + Send>;

/// Most chunks' worth of a copied row group decoded at once. A larger group is decoded in
/// parts, so that only its raw bytes, not its decoded columns, are held whole: with the
/// default chunk size a part is at most 320 Ki rows, so polars' groups of about 262 k rows
/// are one part and pyarrow's of 1 Mi rows four. (Smaller parts cost more: the pages that
/// straddle two parts are decompressed twice.)
const DECODE_CHUNKS: usize = 5;

/// The row groups of the plan's files, with the columns scoring needs decoded (in parts of at
/// most [`DECODE_CHUNKS`] chunks) and every column as it is; with the total row count.
fn copied_chunks(plan: &CopyPlan, opts: &BatchOptions) -> Result<(usize, SourceChunks)> {
    for (i, path) in plan.files.iter().enumerate() {
        if plan.metadata(i).num_rows == 0 {
            bail!("{}: no rows", path.display());
        }
    }
    let map = &opts.read.columns;
    let wanted = [&map.time, &map.host, &map.alert]
        .into_iter()
        .chain(&map.metrics)
        .chain(&opts.label_column);
    let present: Vec<&str> = plan.column_names().collect();
    let mut columns: Vec<String> = Vec::new();
    for c in wanted {
        if present.contains(&c.as_str()) && !columns.contains(c) {
            columns.push(c.clone());
        }
    }
    let rows = plan.row_groups.iter().map(|g| g.rows).sum();
    let most_rows = opts.chunk_rows.saturating_mul(DECODE_CHUNKS).max(1);
    let parts = plan.row_groups.clone().into_iter().flat_map(move |group| {
        let parts = group.rows.div_ceil(most_rows);
        let part_rows = group.rows.div_ceil(parts);
        (0..parts).map(move |p| {
            let start = p * part_rows;
            (group.clone(), start, part_rows.min(group.rows - start))
        })
    });
    let chunks = parts.map({
        let plan = plan.clone();
        move |(group, start, rows)| {
            let path = &plan.files[group.file];
            let file = File::open(path).with_context(|| path.display().to_string())?;
            let mut reader = ParquetReader::new(file);
            reader.set_metadata(plan.metadata(group.file));
            let df = reader
                .with_columns(Some(columns.clone()))
                .with_slice(Some((group.first_row + start, rows)))
                .finish()
                .map_err(|e| parquet_copy::cannot_read(path, e))?;
            // Read after the group's last part is decoded, to hold it no longer than needed.
            let raw = if start + rows == group.rows {
                Some(plan.read_raw(&group)?)
            } else {
                None
            };
            Ok((path.display().to_string(), Source::Copied(df, raw)))
        }
    });
    Ok((rows, Box::new(chunks)))
}

/// A chunk ready to score: the frame to write the scores beside, its rows as a metric table,
/// and the labels if asked for.
struct ReadChunk {
    frame: DataFrame,
    table: dagmm_datasets::MetricTable,
    labels: Option<Vec<bool>>,
    /// The chunk's row group as it is in the input, when the output copies it.
    raw: Option<RawRowGroup>,
}

/// A scored chunk on its way to the writer: the columns to write, or, when the output copies
/// the input, the chunk's scores and (after a row group's last chunk) the row group.
struct Output {
    frame: DataFrame,
    raw: Option<RawRowGroup>,
}

fn read_chunk(
    df: DataFrame,
    source: &str,
    first_schema: &mut Option<Schema>,
    opts: &BatchOptions,
    metric_names: &[String],
) -> Result<ReadChunk> {
    let in_schema = df.schema().as_ref().clone();
    match first_schema {
        None => *first_schema = Some(in_schema),
        Some(s) if s != &in_schema => bail!("{source}: columns differ from the first input file"),
        Some(_) => {}
    }
    let read = &opts.read;
    let table = frame_to_table(df.clone(), read, source)?;
    let frame = if read.shape == ShapeOption::Long || table.len() != df.height() {
        // Long input was pivoted: write the wide rows we scored instead of the raw ones.
        table_frame(&table, metric_names)?
    } else {
        df
    };
    let labels = match &opts.label_column {
        Some(c) => Some(label_values(&frame, c, source)?),
        None => None,
    };
    Ok(ReadChunk {
        frame,
        table,
        labels,
        raw: None,
    })
}

/// The summary's totals, fed one scored chunk at a time.
struct Tally<'a> {
    vocabulary: &'a Vocabulary,
    summary: BatchSummary,
    /// The highest-energy rows so far (at most `TOP_ROWS`), lowest on top.
    top: BinaryHeap<Reverse<Candidate>>,
    /// (energy − the row's model cutoff, label) of labelled rows.
    labelled: Vec<(f64, bool)>,
}

impl<'a> Tally<'a> {
    fn new(vocabulary: &'a Vocabulary) -> Self {
        Self {
            vocabulary,
            summary: BatchSummary::default(),
            top: BinaryHeap::new(),
            labelled: Vec::new(),
        }
    }

    fn add(
        &mut self,
        scores: &ChunkScores,
        table: &dagmm_datasets::MetricTable,
        labels: Option<&[bool]>,
        host_models: &[Option<&LoadedModel>],
    ) {
        let (summary, vocabulary) = (&mut self.summary, self.vocabulary);
        let first_seq = summary.rows_in;
        summary.rows_in += scores.len();
        for (_, why) in &scores.reasons {
            match summary.not_scored.get_mut(why) {
                Some(n) => *n += 1,
                None => {
                    summary.not_scored.insert(why.clone(), 1);
                }
            }
        }
        // Flagged rows per host index, named once at the end of the chunk.
        let mut flagged_by_host = vec![0usize; table.host_names.len()];
        for (i, &energy) in scores.energy.iter().enumerate() {
            if energy.is_nan() {
                continue;
            }
            let host = table.host_index[i] as usize;
            summary.rows_scored += 1;
            if scores.anomaly[i] {
                // No String per flagged row once its severity is counted.
                let severity = vocabulary.severity.text(scores.severity[i]);
                match summary.anomalies_by_severity.get_mut(severity) {
                    Some(n) => *n += 1,
                    None => {
                        summary
                            .anomalies_by_severity
                            .insert(severity.to_string(), 1);
                    }
                }
                flagged_by_host[host] += 1;
            }
            if let (Some(l), Some(m)) = (labels, host_models[host]) {
                // Energy above the row's own model cutoff: comparable across models, and > 0
                // exactly when the row was flagged.
                let cutoff = m.explainer.model().thresholds.cutoff;
                self.labelled.push((energy - cutoff, l[i]));
            }
            if self.top.len() < TOP_ROWS
                || self.top.peek().is_some_and(|Reverse(m)| energy > m.energy)
            {
                let row = TopRow {
                    energy,
                    timestamp: table.time_ms[i],
                    host: table.host_names[host].clone(),
                    top_metric: vocabulary.top_metric.text(scores.top_metric[i]).to_string(),
                    severity: vocabulary.severity.text(scores.severity[i]).to_string(),
                };
                let seq = first_seq + i;
                self.top.push(Reverse(Candidate { energy, seq, row }));
                if self.top.len() > TOP_ROWS {
                    self.top.pop();
                }
            }
        }
        for (name, n) in table.host_names.iter().zip(flagged_by_host) {
            if n > 0 {
                *summary.anomalies_by_host.entry(name.clone()).or_default() += n;
            }
        }
    }

    /// The summary, with the top rows highest first and, when labels were read, detection
    /// figures of the cutoff rule.
    fn finish(self, with_labels: bool) -> BatchSummary {
        let mut summary = self.summary;
        let mut best: Vec<Candidate> = self.top.into_iter().map(|Reverse(c)| c).collect();
        // Highest first; equal energies in input order.
        best.sort_by(|a, b| (b.energy.total_cmp(&a.energy)).then(a.seq.cmp(&b.seq)));
        summary.top = best.into_iter().map(|c| c.row).collect();
        if with_labels {
            let (scores, labels): (Vec<f64>, Vec<bool>) = self.labelled.into_iter().unzip();
            summary.labels = Some(detection(&scores, &labels, 0.0));
        }
        summary
    }
}

/// Score the input into the output file; the output appears only if everything succeeded.
pub fn run(models: &ModelMap, opts: &BatchOptions) -> Result<BatchSummary> {
    let start = Instant::now();
    let out_format = FileFormat::of(&opts.output).with_context(|| {
        format!(
            "{}: output must end in .parquet or .csv",
            opts.output.display()
        )
    })?;
    let default_model = match &opts.default_model {
        Some(name) => Some(
            models
                .get(name)
                .with_context(|| format!("--default-model: no model named `{name}` is loaded"))?
                .as_ref(),
        ),
        None => None,
    };
    let metric_names: Vec<String> = models
        .values()
        .next()
        .context("no model loaded")?
        .explainer
        .model()
        .preprocessor
        .features
        .iter()
        .map(|f| f.name.clone())
        .collect();
    let vocabulary = Vocabulary::new(models)?;
    let files = resolve_inputs(&opts.input)?;
    let dir = opts
        .output
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = tempfile::Builder::new()
        .prefix(".dagmm-score-")
        .suffix(".tmp")
        .tempfile_in(dir)
        .with_context(|| format!("{}: cannot write here", opts.output.display()))?;

    let copy_plan = match out_format {
        FileFormat::Parquet if opts.read.shape != ShapeOption::Long => parquet_copy::plan(&files)?
            .filter(|plan| {
                // Wide input: long input is pivoted, and its rows are not the file's.
                let names: Vec<&str> = plan.column_names().collect();
                opts.read
                    .columns
                    .metrics
                    .iter()
                    .all(|m| names.contains(&m.as_str()))
            }),
        _ => None,
    };
    let copy_plan = copy_plan.as_ref();
    let (rows_total, sources): (usize, SourceChunks) = match copy_plan {
        Some(plan) => copied_chunks(plan, opts)?,
        None => {
            let mut rows_total = 0;
            let mut all = Vec::new();
            for f in &files {
                let (n, chunks) = chunks_of(f, opts.chunk_rows, &opts.read)?;
                rows_total += n;
                let source = f.display().to_string();
                all.push(chunks.map(move |c| c.map(|df| (source.clone(), Source::Decoded(df)))));
            }
            (rows_total, Box::new(all.into_iter().flatten()))
        }
    };
    let mut tally = Tally::new(&vocabulary);

    // Three stages on their own threads: reading and decoding the next chunks and encoding the
    // previous ones overlap with scoring this one. Bounded channels keep memory bounded by the
    // chunk and row-group sizes. Copied row groups are read and written whole, so their
    // channels hold a group's worth of slices (polars' groups are four) to smooth those bursts;
    // decoded chunks carry every input column and get shallower ones.
    let (read_depth, write_depth) = if copy_plan.is_some() { (4, 4) } else { (1, 2) };
    std::thread::scope(|scope| -> Result<()> {
        let (read_tx, read_rx) = std::sync::mpsc::sync_channel::<Result<ReadChunk>>(read_depth);
        let (write_tx, write_rx) = std::sync::mpsc::sync_channel::<Output>(write_depth);
        let metric_names = &metric_names;
        scope.spawn(move || {
            let mut first_schema: Option<Schema> = None;
            // False when the reader should stop: on an error, or when scoring has stopped (a
            // closed channel; its error is reported there).
            let send = |item: Result<ReadChunk>| {
                let failed = item.is_err();
                read_tx.send(item).is_ok() && !failed
            };
            for chunk in sources {
                let (source, df, mut raw) = match chunk {
                    Ok((source, Source::Copied(df, raw))) => (source, df, raw),
                    Ok((source, Source::Decoded(df))) => {
                        if !send(read_chunk(
                            df,
                            &source,
                            &mut first_schema,
                            opts,
                            metric_names,
                        )) {
                            return;
                        }
                        continue;
                    }
                    Err(e) => {
                        send(Err(e));
                        return;
                    }
                };
                // A copied row group is scored in slices of the chunk size, so that scores
                // in flight stay small; its raw columns travel with its last slice.
                let rows = df.height();
                for offset in (0..rows).step_by(opts.chunk_rows.max(1)) {
                    let len = opts.chunk_rows.min(rows - offset);
                    let slice = df.slice(offset as i64, len);
                    let item = read_chunk(slice, &source, &mut first_schema, opts, metric_names)
                        .map(|mut read| {
                            // Written from `raw`: the decoded columns are done with.
                            read.frame = DataFrame::empty();
                            if offset + len == rows {
                                read.raw = raw.take();
                            }
                            read
                        });
                    if !send(item) {
                        return;
                    }
                }
            }
        });
        let tmp = &tmp;
        let writer = scope.spawn(move || -> Result<()> {
            let mut writer: Option<Writer> = None;
            for out in write_rx {
                let w = match &mut writer {
                    Some(w) => w,
                    None => {
                        let opened = match copy_plan {
                            Some(plan) => {
                                let file = BufWriter::with_capacity(1 << 20, tmp.reopen()?);
                                CopyWriter::new(file, plan, out.frame.schema()).map(Writer::Copy)
                            }
                            _ => Writer::open(tmp.reopen()?, out_format, out.frame.schema()),
                        };
                        writer.insert(
                            opened
                                .map_err(|e| anyhow::anyhow!("{}: {e}", opts.output.display()))?,
                        )
                    }
                };
                w.write(out)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", opts.output.display()))?;
            }
            writer.context("no rows to score")?.finish()?;
            Ok(())
        });
        let scored = (|| -> Result<()> {
            for item in read_rx {
                let ReadChunk {
                    frame,
                    table,
                    labels,
                    raw,
                } = item?;
                let host_models = host_models(models, &table, default_model);
                let scores = score_rows(
                    &host_models,
                    &vocabulary,
                    &table,
                    metric_names,
                    opts.explain,
                );
                // The score columns are built while the summary is tallied.
                let (frame, ()) = rayon::join(
                    || -> Result<DataFrame> {
                        Ok(match copy_plan {
                            // The input columns are copied as they are; only the scores are written.
                            Some(plan) => {
                                let columns = score_columns(&scores, metric_names, &vocabulary);
                                ensure_new_columns(&columns, plan.column_names())?;
                                DataFrame::new(scores.len(), columns)?
                            }
                            _ => with_scores(frame, &scores, metric_names, &vocabulary)?,
                        })
                    },
                    || tally.add(&scores, &table, labels.as_deref(), &host_models),
                );
                let frame = frame?;
                if write_tx.send(Output { frame, raw }).is_err() {
                    // The writer failed; its error is the one to report.
                    break;
                }
                if let Some(p) = &opts.progress {
                    // A CSV file's total is an estimate, which the rows read may pass.
                    p(tally.summary.rows_in, rows_total.max(tally.summary.rows_in));
                }
            }
            Ok(())
        })();
        drop(write_tx);
        let written = writer.join().expect("writer thread panicked");
        scored?;
        written
    })?;
    if let Some(p) = &opts.progress {
        // Every row is read: the total is known exactly now.
        p(tally.summary.rows_in, tally.summary.rows_in);
    }
    let mut summary = tally.finish(opts.label_column.is_some());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        tmp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o644))?;
    }
    tmp.persist(&opts.output)
        .map_err(|e| anyhow::anyhow!("{}: {}", opts.output.display(), e.error))?;
    summary.seconds = start.elapsed().as_secs_f64();
    Ok(summary)
}

fn label_values(df: &DataFrame, column: &str, source: &str) -> Result<Vec<bool>> {
    let c = df
        .column(column)
        .map_err(|_| anyhow::anyhow!("{source}: missing label column `{column}`"))?;
    let values = if c.dtype().is_bool() {
        c.bool()?.iter().map(|v| v.unwrap_or(false)).collect()
    } else {
        dagmm_datasets::read::numeric_column(c, source)?
            .into_iter()
            .map(|v| v.is_some_and(|v| v != 0.0))
            .collect()
    };
    Ok(values)
}

/// Wide frame of a pivoted table (time, host, metrics).
fn table_frame(table: &dagmm_datasets::MetricTable, names: &[String]) -> Result<DataFrame> {
    let mut cols = vec![
        Column::new("timestamp".into(), table.time_ms.clone()),
        Column::new(
            "host".into(),
            (0..table.len()).map(|i| table.host(i)).collect::<Vec<_>>(),
        ),
    ];
    for (j, n) in names.iter().enumerate() {
        cols.push(Column::new(
            n.as_str().into(),
            table.values.iter().map(|v| v[j]).collect::<Vec<f64>>(),
        ));
    }
    Ok(DataFrame::new_infer_height(cols)?)
}

impl BatchSummary {
    /// Human-readable summary.
    pub fn render(&self, output: &Path) -> String {
        let mut s = String::new();
        let rate = self.rows_in as f64 / self.seconds.max(1e-9);
        s += &format!(
            "scored {} of {} rows in {:.2} s ({:.0} rows/s) -> {}\n",
            self.rows_scored,
            self.rows_in,
            self.seconds,
            rate,
            output.display()
        );
        for (reason, n) in &self.not_scored {
            s += &format!("  not scored: {n} rows: {reason}\n");
        }
        let total: usize = self.anomalies_by_severity.values().sum();
        s += &format!("anomalies: {total}");
        for (sev, n) in &self.anomalies_by_severity {
            s += &format!(", {sev} {n}");
        }
        s += "\n";
        if !self.anomalies_by_host.is_empty() {
            // Most first; a fleet of thousands gets the head of the list and a count.
            let mut hosts: Vec<(&String, &usize)> = self.anomalies_by_host.iter().collect();
            hosts.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
            s += "anomalies by host (most first):";
            for (h, n) in hosts.iter().take(HOSTS_LISTED) {
                s += &format!(" {h}={n}");
            }
            if hosts.len() > HOSTS_LISTED {
                s += &format!(" … and {} more hosts", hosts.len() - HOSTS_LISTED);
            }
            s += "\n";
        }
        if !self.top.is_empty() {
            s += &format!("top {} rows by energy:\n", self.top.len());
            s += &format!(
                "  {:<22} {:<12} {:>12} {:<10} {}\n",
                "timestamp", "host", "energy", "severity", "top metric"
            );
            for r in &self.top {
                let t = r.timestamp.map_or("-".to_string(), format_time);
                s += &format!(
                    "  {:<22} {:<12} {:>12.3} {:<10} {}\n",
                    t, r.host, r.energy, r.severity, r.top_metric
                );
            }
        }
        if let Some(d) = &self.labels {
            s += &format!(
                "against labels (cutoff rule: energy > model cutoff): precision {:.4} recall {:.4} F1 {:.4}; ROC-AUC {:.4} PR-AUC {:.4}\n",
                d.precision, d.recall, d.f1, d.roc_auc, d.pr_auc
            );
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_csv_record_ends_at_a_line_break_outside_quotes() {
        assert_eq!(last_record_end(b"a,b\n1,2\n3,"), Some(8));
        // The last break is inside the open quoted field of the record being read.
        assert_eq!(last_record_end(b"a,\"x\ny\"\n1,\"p\nq"), Some(8));
        // Escaped quotes come in pairs and leave the field open.
        assert_eq!(last_record_end(b"1,\"say \"\"hi\"\"\nthere\""), None);
        assert_eq!(last_record_end(b"no break"), None);
    }

    #[test]
    fn csv_blocks_give_the_whole_files_rows_whatever_the_block_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("export.csv");
        let mut text = String::from("timestamp,host,cpu_usage,note\n");
        for i in 0..200 {
            let note = if i % 7 == 0 {
                "\"two\nlines, \"\"quoted\"\"\""
            } else {
                "plain"
            };
            text.push_str(&format!("{i},web-{:02},{}.5,{note}\n", i % 3, i % 100));
        }
        std::fs::write(&path, &text).unwrap();
        let whole = read_file(&path).unwrap();
        for block_bytes in [1, 10, 100, 1000, 1 << 20] {
            let mut blocks = CsvBlocks {
                file: File::open(&path).unwrap(),
                source: "export.csv".into(),
                schema: Arc::new(whole.schema().as_ref().clone()),
                block_bytes,
                pending: Vec::new(),
                at_end: false,
                first: true,
            };
            let mut frames = Vec::new();
            for frame in &mut blocks {
                frames.push(frame.unwrap());
            }
            let mut joined = frames[0].clone();
            for f in &frames[1..] {
                joined.vstack_mut(f).unwrap();
            }
            assert!(joined.equals_missing(&whole), "block size {block_bytes}");
            if block_bytes < 1000 {
                assert!(frames.len() > 10, "{} frames", frames.len());
            }
        }
        let bytes = std::fs::metadata(&path).unwrap().len();
        assert_eq!(csv_rows_estimate(&path, bytes).unwrap(), 200 + 200 / 7 + 1);
    }

    #[test]
    fn summary_names_the_hosts_with_most_anomalies_first_and_counts_the_rest() {
        let mut summary = BatchSummary::default();
        for h in 0..HOSTS_LISTED + 5 {
            summary
                .anomalies_by_host
                .insert(format!("host-{h:02}"), h + 1);
        }
        let text = summary.render(Path::new("out.parquet"));
        let line = text
            .lines()
            .find(|l| l.starts_with("anomalies by host"))
            .expect("a host line");
        let top = format!("host-{:02}={}", HOSTS_LISTED + 4, HOSTS_LISTED + 5);
        assert!(line.contains(&format!(": {top} ")), "{line}");
        assert!(line.ends_with("… and 5 more hosts"), "{line}");
        assert!(
            !line.contains("host-00="),
            "the fewest are left out: {line}"
        );
    }
}
