//! Scored Parquet output that copies the input as it is: each input row group becomes an output
//! row group whose input columns are the input's column chunks byte for byte (pages,
//! dictionaries and page statistics), followed by the freshly encoded score columns.
//!
//! Decoding, re-encoding and re-compressing every input column was most of the work of batch
//! scoring, and none of it changes a value. Only the columns scoring needs are decoded.
//!
//! Used when every input is a Parquet file with the same flat schema, the output is Parquet,
//! and no row group is larger than [`MAX_ROW_GROUP_ROWS`] or [`MAX_ROW_GROUP_BYTES`]; anything
//! else goes through the general path that decodes and re-encodes. Copied columns keep their
//! input codec; score columns are zstd, each slice encoded and compressed as it is scored.

use std::fs::File;
use std::io::{Cursor, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use polars::prelude::*;
use polars_buffer::Buffer;
use polars_parquet::parquet::CowBuffer;
use polars_parquet::parquet::compression::Compression;
use polars_parquet::parquet::error::ParquetError;
use polars_parquet::parquet::page::{CompressedDataPage, CompressedDictPage, DataPageHeader};
use polars_parquet::parquet::read::{PageMetaData, PageReader};
use polars_parquet::parquet::schema::Repetition;
use polars_parquet::read::{FileMetadata, infer_schema};
use polars_parquet::write::{
    CompressedPage, CompressionOptions, DynIter, DynStreamingIterator, Encoding, FileWriter, Page,
    ParquetType, SchemaDescriptor, StatisticsOptions, Version, WriteOptions, ZstdLevel,
    array_to_columns, fallible_streaming_iterator, get_dtype_encoding, to_parquet_schema,
};
use rayon::prelude::*;

/// Largest row group copied (pyarrow's default size): its raw bytes and its compressed score
/// pages are held until its last slice is scored, about 75 MB at this size for the four
/// metrics with every row explained (a 10 M-row run then peaks near 200 MB). Larger ones take
/// the decoding path.
pub const MAX_ROW_GROUP_ROWS: usize = 1024 * 1024;

/// Largest row group copied, in compressed bytes: a group with many more columns than scoring
/// needs would otherwise be held whole however few its rows.
pub const MAX_ROW_GROUP_BYTES: u64 = 64 << 20;

/// zstd level of the score columns. A fast level: energies and percentiles are nearly random
/// bits (level 1 saves 8 % of their size), and f64 contributions saved 26 % at level 1
/// against 22 % here (the f32 ones now save 13–23 %), while level 1 took about a seventh of a
/// 10 M-row run's CPU time, twice this.
pub const SCORE_ZSTD_LEVEL: i32 = -1;

/// Pages are slices of a column chunk already in memory; this only bounds a corrupt header.
const MAX_PAGE_BYTES: usize = 1 << 30;

/// One input row group.
#[derive(Debug, Clone)]
pub struct RowGroupRef {
    pub file: usize,
    pub index: usize,
    /// Row of the file the group starts at.
    pub first_row: usize,
    pub rows: usize,
}

/// What copying needs to know about the inputs (cheap to clone).
#[derive(Clone)]
pub struct CopyPlan {
    pub files: Vec<PathBuf>,
    metadata: Vec<Arc<FileMetadata>>,
    /// The inputs' columns as Parquet types, as in the files.
    input_fields: Vec<ParquetType>,
    /// The same columns as Arrow fields (polars' reading of the first file).
    input_arrow: ArrowSchema,
    pub row_groups: Vec<RowGroupRef>,
}

/// The input's column chunks of one row group, as compressed pages.
pub struct RawRowGroup {
    pub rows: usize,
    columns: Vec<Vec<CompressedPage>>,
}

/// The error for an input Parquet file that cannot be read.
pub(crate) fn cannot_read(path: &Path, e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("{}: cannot read as Parquet: {e}", path.display())
}

/// A copy plan for these inputs, or `None` when they need the general path: a non-Parquet or
/// nested input, inputs whose schemas differ, a column polars would write with another
/// Parquet type than the input has, or a row group over [`MAX_ROW_GROUP_ROWS`] or
/// [`MAX_ROW_GROUP_BYTES`].
pub fn plan(files: &[PathBuf]) -> Result<Option<CopyPlan>> {
    let mut metadata = Vec::with_capacity(files.len());
    for path in files {
        if dagmm_datasets::read::FileFormat::of(path)
            != Some(dagmm_datasets::read::FileFormat::Parquet)
        {
            return Ok(None);
        }
        metadata.push(dagmm_datasets::read::parquet_footer(path)?);
    }
    let Some(first) = metadata.first() else {
        return Ok(None);
    };
    let fields = first.schema().fields();
    let flat = |f: &ParquetType| matches!(f, ParquetType::PrimitiveType(p) if p.field_info.repetition != Repetition::Repeated);
    if !fields.iter().all(flat) || metadata.iter().any(|m| m.schema().fields() != fields) {
        return Ok(None);
    }
    let input_arrow = infer_schema(first).map_err(|e| cannot_read(&files[0], e))?;
    // The footer will describe the input columns by this Arrow schema as well, so it must
    // map back to the Parquet types of the copied chunks (legacy annotations aside).
    let Ok(written) = to_parquet_schema(&input_arrow) else {
        return Ok(None);
    };
    let written = written.fields();
    if written.len() != fields.len() || !written.iter().zip(fields).all(|(a, b)| same_column(a, b))
    {
        return Ok(None);
    }
    let mut row_groups = Vec::new();
    for (file, meta) in metadata.iter().enumerate() {
        let mut first_row = 0;
        for (index, group) in meta.row_groups.iter().enumerate() {
            let rows = group.num_rows();
            let span = group.full_byte_range();
            if rows > MAX_ROW_GROUP_ROWS || span.end - span.start > MAX_ROW_GROUP_BYTES {
                return Ok(None);
            }
            if rows > 0 {
                row_groups.push(RowGroupRef {
                    file,
                    index,
                    first_row,
                    rows,
                });
            }
            first_row += rows;
        }
    }
    Ok(Some(CopyPlan {
        files: files.to_vec(),
        input_fields: fields.to_vec(),
        metadata,
        input_arrow,
        row_groups,
    }))
}

/// Same name, repetition, physical and logical type: the same values. The legacy converted
/// type (which some writers add and polars does not) is not compared.
fn same_column(a: &ParquetType, b: &ParquetType) -> bool {
    match (a, b) {
        (ParquetType::PrimitiveType(a), ParquetType::PrimitiveType(b)) => {
            a.field_info.name == b.field_info.name
                && a.field_info.repetition == b.field_info.repetition
                && a.physical_type == b.physical_type
                && a.logical_type == b.logical_type
        }
        _ => false,
    }
}

impl CopyPlan {
    /// Footer of input file `file`.
    pub fn metadata(&self, file: usize) -> Arc<FileMetadata> {
        self.metadata[file].clone()
    }

    /// Names of the input columns.
    pub fn column_names(&self) -> impl Iterator<Item = &str> {
        self.input_arrow.iter_values().map(|f| f.name.as_str())
    }

    /// Read one row group's column chunks as they are (one read for the whole group).
    pub fn read_raw(&self, group: &RowGroupRef) -> Result<RawRowGroup> {
        let path = &self.files[group.file];
        let meta = &self.metadata[group.file].row_groups[group.index];
        let span = meta.full_byte_range();
        // The span is the union of the chunks' ranges, all checked against the file's length
        // when the footer was read (`parquet_footer`).
        let mut file = File::open(path).with_context(|| path.display().to_string())?;
        let mut bytes = vec![0u8; (span.end - span.start) as usize];
        file.seek(SeekFrom::Start(span.start))
            .and_then(|_| file.read_exact(&mut bytes))
            .map_err(|e| cannot_read(path, e))?;
        let bytes = Buffer::from(bytes);
        let mut columns = Vec::with_capacity(meta.n_columns());
        for chunk in meta.parquet_columns() {
            let range = chunk.byte_range();
            let start = (range.start - span.start) as usize;
            let end = (range.end - span.start) as usize;
            let page_meta = PageMetaData {
                column_start: 0,
                ..PageMetaData::from(chunk)
            };
            let pages = PageReader::new_with_page_meta(
                Cursor::new(bytes.clone().sliced(start..end)),
                page_meta,
                Vec::new(),
                MAX_PAGE_BYTES,
            )
            .map(|page| {
                // The writer wants each data page's row count, which a read page leaves
                // open; in a flat column every value is a row.
                page.map(|mut page| {
                    if let CompressedPage::Data(data) = &mut page {
                        data.num_rows = Some(data.num_values());
                    }
                    page
                })
            })
            .collect::<Result<Vec<_>, ParquetError>>()
            .map_err(|e| cannot_read(path, e))?;
            columns.push(pages);
        }
        Ok(RawRowGroup {
            rows: group.rows,
            columns,
        })
    }
}

/// A series as the one Arrow array it is written from. A categorical keeps its codes, with all
/// its categories as the dictionary: polars' general conversion looks every row's category up
/// in a hash map to keep only those used.
fn arrow_array(series: &Series) -> PolarsResult<ArrayRef> {
    let series = series.rechunk();
    Ok(match series.dtype() {
        DataType::Categorical(..) => Box::new(series.cat32()?.to_arrow(CompatLevel::newest())),
        _ => series.to_arrow(0, CompatLevel::newest()),
    })
}

/// Pages already compressed, as the writer takes a column chunk.
fn stream(
    pages: &[CompressedPage],
) -> PolarsResult<DynStreamingIterator<'_, CompressedPage, PolarsError>> {
    Ok(DynStreamingIterator::new(
        fallible_streaming_iterator::convert(pages.iter().map(PolarsResult::Ok)),
    ))
}

/// Writes copied row groups with their score columns.
pub struct CopyWriter<W: Write> {
    inner: FileWriter<W>,
    encoder: ScoreEncoder,
    /// Score columns of the row group being assembled, in schema order: each slice is encoded
    /// and compressed as it arrives, so only compressed pages wait for the row group.
    pending: Vec<Vec<CompressedPage>>,
    pending_rows: usize,
    /// By score column, its dictionary page's bytes as first encoded: every later slice must
    /// encode the same one (see `add_scores`).
    dictionaries: Vec<Option<Vec<u8>>>,
    /// By score column, a zstd context kept from page to page.
    compressors: Vec<zstd::bulk::Compressor<'static>>,
}

/// A score page compressed with zstd at [`SCORE_ZSTD_LEVEL`] (polars' own `compress` takes
/// levels from 1 up, and makes and zero-fills buffers and a context for every page).
fn compress_page(
    page: Page,
    compressor: &mut zstd::bulk::Compressor<'static>,
) -> PolarsResult<CompressedPage> {
    let zstd = |bytes: &[u8], compressor: &mut zstd::bulk::Compressor<'static>| {
        let mut out = Vec::with_capacity(zstd::zstd_safe::compress_bound(bytes.len()));
        compressor
            .compress_to_buffer(bytes, &mut out)
            .map_err(|e| polars_err!(ComputeError: "zstd: {e}"))?;
        PolarsResult::Ok(out)
    };
    Ok(match page {
        Page::Data(page) => {
            // Version 1 pages (what the writer is set to) compress levels and values together.
            let DataPageHeader::V1(_) = page.header() else {
                polars_bail!(ComputeError: "score pages must be Parquet data pages version 1");
            };
            let num_rows = page
                .num_rows()
                .ok_or_else(|| polars_err!(ComputeError: "score page without a row count"))?;
            CompressedPage::Data(CompressedDataPage::new(
                page.header().clone(),
                CowBuffer::Owned(zstd(page.buffer(), compressor)?),
                Compression::Zstd,
                page.buffer().len(),
                page.descriptor.clone(),
                num_rows,
            ))
        }
        Page::Dict(page) => CompressedPage::Dict(CompressedDictPage::new(
            CowBuffer::Owned(zstd(page.buffer.as_ref(), compressor)?),
            Compression::Zstd,
            page.buffer.len(),
            page.num_values,
            page.is_sorted,
        )),
    })
}

/// How the score columns are encoded.
struct ScoreEncoder {
    /// By score column: zstd, with page statistics (null counts only for floats).
    options: Vec<WriteOptions>,
    types: Vec<ParquetType>,
    encodings: Vec<Vec<Encoding>>,
}

impl ScoreEncoder {
    /// Encoded pages of score column `column`.
    fn encode(
        &self,
        column: usize,
        array: &ArrayRef,
    ) -> PolarsResult<Vec<DynIter<'static, PolarsResult<Page>>>> {
        array_to_columns(
            array,
            self.types[column].clone(),
            self.options[column],
            &self.encodings[column],
        )
    }
}

impl<W: Write> CopyWriter<W> {
    /// A writer for the plan's columns followed by score columns of this schema.
    pub fn new(writer: W, plan: &CopyPlan, scores: &Schema) -> PolarsResult<Self> {
        let score_arrow = scores.to_arrow(CompatLevel::newest());
        let mut arrow = plan.input_arrow.clone();
        for (name, field) in score_arrow.iter() {
            arrow.insert(name.clone(), field.clone());
        }
        let score_types = to_parquet_schema(&score_arrow)?.fields().to_vec();
        // The input columns keep the input's own Parquet types.
        let parquet_schema = SchemaDescriptor::new(
            "root".into(),
            plan.input_fields
                .iter()
                .chain(&score_types)
                .cloned()
                .collect(),
        );
        // Floats are written plain: polars would hash every value to find out that a
        // dictionary does not pay, which it never does for energies or shares. So are the rare
        // reasons, whose dictionary would differ from slice to slice.
        let score_encodings: Vec<Vec<Encoding>> = score_arrow
            .iter_values()
            .map(|f| match f.dtype {
                ArrowDataType::Float64
                | ArrowDataType::Float32
                | ArrowDataType::Utf8View
                | ArrowDataType::LargeUtf8 => vec![Encoding::Plain],
                ref other => get_dtype_encoding(other),
            })
            .collect();
        let encode = WriteOptions {
            statistics: StatisticsOptions::default(),
            // Not applied here: `compress_page` compresses score pages at SCORE_ZSTD_LEVEL.
            compression: CompressionOptions::Zstd(Some(ZstdLevel::try_new(1)?)),
            version: Version::V1,
            data_page_size: None,
        };
        // No column index: it needs statistics on every page, which an input file may not
        // have written. Chunk statistics are still written, reduced from the pages'.
        let file_options = WriteOptions {
            statistics: StatisticsOptions::empty(),
            ..encode
        };
        // Energies, percentiles and contributions follow the metrics, not the row order, so
        // every row group spans nearly their whole range and min/max would never let a reader
        // skip one; over nullable columns they cost about 4 % of a run. Null counts stay.
        let float_options = WriteOptions {
            statistics: StatisticsOptions {
                min_value: false,
                max_value: false,
                distinct_count: false,
                ..StatisticsOptions::default()
            },
            ..encode
        };
        let score_options = (score_arrow.iter_values())
            .map(|f| match f.dtype {
                ArrowDataType::Float64 | ArrowDataType::Float32 => float_options,
                _ => encode,
            })
            .collect();
        let pending = score_types.iter().map(|_| Vec::new()).collect();
        let dictionaries = score_types.iter().map(|_| None).collect();
        let compressors = (score_types.iter())
            .map(|_| zstd::bulk::Compressor::new(SCORE_ZSTD_LEVEL))
            .collect::<std::io::Result<_>>()?;
        Ok(Self {
            inner: FileWriter::new_with_parquet_schema(writer, arrow, parquet_schema, file_options),
            encoder: ScoreEncoder {
                options: score_options,
                types: score_types,
                encodings: score_encodings,
            },
            pending,
            pending_rows: 0,
            dictionaries,
            compressors,
        })
    }

    /// Scores of the next rows of the row group being assembled (columns in the schema given
    /// to [`CopyWriter::new`]).
    pub fn add_scores(&mut self, scores: DataFrame) -> PolarsResult<()> {
        let mut pending = std::mem::take(&mut self.pending);
        let encoder = &self.encoder;
        let columns = (pending.par_iter_mut())
            .zip(self.dictionaries.par_iter_mut())
            .zip(self.compressors.par_iter_mut())
            .zip(scores.columns().par_iter());
        // Columns are encoded and compressed side by side.
        let added = columns.enumerate().try_for_each(
            |(c, (((pages, dictionary), compressor), column))| -> PolarsResult<()> {
                let array = arrow_array(column.as_materialized_series())?;
                for encoded in encoder.encode(c, &array)? {
                    for page in encoded {
                        let page = page?;
                        // A column chunk holds one dictionary page, first. Categorical score
                        // columns are encoded over the run's whole vocabulary with codes as
                        // they are, so every slice has the same dictionary and its keys mean
                        // the same: the group's first slice's page stands for all.
                        if let Page::Dict(dict) = &page {
                            let bytes: &[u8] = dict.buffer.as_ref();
                            match dictionary {
                                Some(first) => polars_ensure!(
                                    first.as_slice() == bytes,
                                    ComputeError: "score column {c}: its dictionary changed between slices"
                                ),
                                None => *dictionary = Some(bytes.to_vec()),
                            }
                            if !pages.is_empty() {
                                continue;
                            }
                        }
                        pages.push(compress_page(page, compressor)?);
                    }
                }
                Ok(())
            },
        );
        self.pending = pending;
        added?;
        self.pending_rows += scores.height();
        Ok(())
    }

    /// Write one row group: the copied input chunks, then the scores added since the last
    /// row group (as many rows).
    pub fn write(&mut self, raw: RawRowGroup) -> PolarsResult<()> {
        polars_ensure!(
            self.pending_rows == raw.rows,
            ShapeMismatch: "{} score rows for a row group of {}", self.pending_rows, raw.rows
        );
        let fresh = self.pending.iter().map(|_| Vec::new()).collect();
        let pending = std::mem::replace(&mut self.pending, fresh);
        self.pending_rows = 0;
        let columns = (raw.columns.iter().chain(&pending)).map(|pages| stream(pages));
        self.inner.write(raw.rows as u64, DynIter::new(columns))
    }

    /// Write the footer.
    pub fn finish(mut self) -> PolarsResult<()> {
        self.inner.end(None).map(|_| ())
    }
}
