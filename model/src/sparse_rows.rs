//! Rows kept as their nonzero entries, for a first layer fed mostly zeros.
//!
//! One-hot encoded columns (KDDCUP99's protocol, service and flag) leave about nine in ten
//! scaled training features at exactly zero. Through gemm a first layer multiplies every one
//! of them, in its output x·W + b and again in its weight gradient xᵀ·g; here both visit the
//! nonzeros only. The loops take fused multiply-adds in the order of the columns (of the rows,
//! for the weight gradient), as gemm's kernels do, and a zero's multiply-add would leave a sum
//! as it was: the layer's output is the dense layer's, bit for bit where gemm's or our chained
//! kernel sums it (a test compares), and the weight gradient differs from gemm's only where
//! gemm splits a sum into blocks. Every instruction set gives the same bits; a CPU without FMA
//! takes its fused multiply-adds from the math library, slowly.

use std::mem::MaybeUninit;
use std::ops::Range;

use crate::helper_threads::{self, LineAligned};

use crate::scorer::{Isa, on_isa};

/// Largest share of nonzero entries kept sparse. A nonzero costs a pass over a row of the
/// weights (or of the gradient) where gemm spends a fused multiply-add per weight. At
/// KDDCUP99's tenth the sparse loops take about two fifths of the time gemm gave back; a
/// quarter is a margin below the break-even, not a measured one. Dense inputs (the four server
/// metrics, any hidden layer) are never compressed.
const MAX_DENSITY: f64 = 0.25;

/// A row-major `[rows, columns]` f32 matrix as its nonzero entries, row by row.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct SparseRows {
    columns: usize,
    /// Where each row's entries start in `column_indices` and `values`, and where the last ends.
    row_starts: Vec<usize>,
    column_indices: Vec<u32>,
    values: Vec<f32>,
}

impl SparseRows {
    /// The nonzero entries of row-major `values` with `columns` columns, or `None` when more
    /// than [`MAX_DENSITY`] of them are nonzero (or the shape does not divide). Rows are
    /// independent: a fit's spare cores take chunks of them, first for their bit masks, then
    /// for their entries.
    pub(crate) fn compress(values: &[f32], columns: usize) -> Option<Self> {
        Self::compress_on(Isa::Avx2.supported(), values, columns)
    }

    /// [`SparseRows::compress`], the masks taken with AVX2 compares when `avx2`, which only a
    /// CPU with AVX2 may ask for.
    fn compress_on(avx2: bool, values: &[f32], columns: usize) -> Option<Self> {
        #[cfg(not(target_arch = "x86_64"))]
        let _ = avx2;
        if columns == 0 || !values.len().is_multiple_of(columns) || columns > u32::MAX as usize {
            return None;
        }
        let (rows, words) = (values.len() / columns, columns.div_ceil(64));
        // Each row's nonzeros as bit masks of 64 entries.
        let masks_of = |rows: Range<usize>, out: &mut [MaybeUninit<u64>]| {
            row_masks_on(
                avx2,
                &values[rows.start * columns..rows.end * columns],
                columns,
                out,
            )
        };
        // SAFETY: `row_masks` writes every row's words.
        let masks =
            unsafe { helper_threads::rows_written_in_chunks(rows, words, columns, &masks_of) };
        let mut row_starts = Vec::with_capacity(rows + 1);
        row_starts.push(0);
        let mut nonzeros = 0;
        for row in masks.chunks_exact(words) {
            nonzeros += row
                .iter()
                .map(|mask| mask.count_ones() as usize)
                .sum::<usize>();
            row_starts.push(nonzeros);
        }
        if too_dense(nonzeros, values.len()) {
            return None;
        }
        // The entries, in chunks of whole rows: each chunk's entries follow the previous one's.
        let chunks = helper_threads::chunks_worth(values.len());
        let entry_ranges: Vec<Range<usize>> = (0..chunks)
            .map(|chunk| helper_threads::chunk_rows(rows, chunk, chunks))
            .map(|rows| row_starts[rows.start]..row_starts[rows.end])
            .collect();
        // The rows whose entries fill `entries`, from the last row starting at or before it (a
        // row with entries: an empty row shares its start with the next).
        let rows_of = |entries: &Range<usize>| {
            let first = row_starts.partition_point(|&start| start <= entries.start) - 1;
            let last = row_starts.partition_point(|&start| start < entries.end);
            first..last.max(first)
        };
        // Each chunk writes its entries' column indices and, through `kept_at`, their values.
        let mut kept: Vec<f32> = Vec::with_capacity(nonzeros);
        let kept_at = helper_threads::SharedBuffer::spare_of(&mut kept);
        let entries_of = |entries: Range<usize>, out: &mut [MaybeUninit<u32>]| {
            let mut written = 0;
            for row in rows_of(&entries) {
                let row_values = &values[row * columns..(row + 1) * columns];
                for_each_set_column(&masks[row * words..(row + 1) * words], |column| {
                    assert!(written < out.len(), "a chunk's rows fill its entries");
                    out[written].write(column as u32);
                    // SAFETY: entry `entries.start + written` lies inside `entries`, this
                    // chunk's alone, and `kept` has room for every entry.
                    unsafe { (*kept_at.add(entries.start + written)).write(row_values[column]) };
                    written += 1;
                });
            }
            assert_eq!(written, out.len(), "a chunk's rows fill its entries");
        };
        // SAFETY: the rows of a chunk hold exactly its entries (asserted), so each chunk writes
        // every column index and value of its range.
        let column_indices = unsafe {
            helper_threads::rows_written_in_ranges(nonzeros, 1, &entry_ranges, &entries_of)
        };
        // SAFETY: the ranges cover all `nonzeros` entries, each value written above.
        unsafe { kept.set_len(nonzeros) };
        Some(SparseRows {
            columns,
            row_starts,
            column_indices,
            values: kept,
        })
    }

    /// A whole data set kept for [`SparseGather`]: its nonzeros, or `None` where it has too
    /// many to keep sparse, or negative zeros (a gathered dense row would bring them back as
    /// positive ones). Both are counted in one pass before anything is allocated.
    pub(crate) fn to_gather_from(values: &[f32], columns: usize) -> Option<Self> {
        let (nonzeros, negative_zeros) = values.iter().fold((0, 0), |(set, negative), &v| {
            let zero = v == 0.0;
            (
                set + usize::from(!zero),
                negative + usize::from(zero && v.is_sign_negative()),
            )
        });
        if too_dense(nonzeros, values.len()) || negative_zeros > 0 {
            return None;
        }
        Self::compress(values, columns)
    }

    pub(crate) fn rows(&self) -> usize {
        self.row_starts.len() - 1
    }

    /// How many nonzero entries all the rows hold.
    pub(crate) fn nonzeros(&self) -> usize {
        self.values.len()
    }

    pub(crate) fn columns(&self) -> usize {
        self.columns
    }

    /// The row-major dense matrix again.
    pub(crate) fn to_dense(&self) -> Vec<f32> {
        let mut dense = vec![0f32; self.rows() * self.columns];
        for (i, row) in dense.chunks_exact_mut(self.columns).enumerate() {
            let (columns, values) = self.row(i);
            for (&column, &value) in columns.iter().zip(values) {
                row[column as usize] = value;
            }
        }
        dense
    }

    /// Row `i`'s column indices and values, in column order.
    pub(crate) fn row(&self, i: usize) -> (&[u32], &[f32]) {
        let range = self.row_starts[i]..self.row_starts[i + 1];
        (&self.column_indices[range.clone()], &self.values[range])
    }

    /// x·W + b as a row-major `[rows, outputs]` buffer, for W row-major `[columns, outputs]`
    /// and b of length `outputs`: each output row sums its nonzeros' weight rows in column
    /// order, then adds the bias, as the dense layer adds it to the finished product. `finish`
    /// then takes each finished block of rows (tanh, say) while it is still in cache. Rows
    /// are independent: a fit's spare cores take chunks of them.
    pub(crate) fn product(
        &self,
        weight: &[f32],
        bias: &[f32],
        finish: &(dyn Fn(&mut [f32]) + Sync),
    ) -> Vec<f32> {
        self.product_on(Isa::best(16), weight, bias, finish)
    }

    /// [`SparseRows::product`] through the copy of the loop compiled for `isa`, which only a
    /// CPU with it may ask for.
    fn product_on(
        &self,
        isa: Isa,
        weight: &[f32],
        bias: &[f32],
        finish: &(dyn Fn(&mut [f32]) + Sync),
    ) -> Vec<f32> {
        let outputs = bias.len();
        assert_eq!(weight.len(), self.columns * outputs, "weight shape");
        if outputs == 0 {
            return Vec::new();
        }
        let (weight, stride) = padded(weight, outputs);
        let nonzeros_per_row = self.values.len() / self.rows().max(1);
        let values_per_row = (nonzeros_per_row + 1) * outputs;
        let product_of = |rows: Range<usize>, out: &mut [MaybeUninit<f32>]| {
            // With AVX-512 a 64-lane block of sums takes four registers where AVX2 takes
            // eight: each entry half as many loads and multiply-adds.
            // Only AVX-512 has the registers to hold two rows' 64-lane blocks of sums.
            let in_pairs = isa == Isa::Avx512;
            let out = on_isa!(isa, || {
                self.product_rows(rows, &weight, stride, bias, in_pairs, out)
            });
            finish(out);
        };
        // SAFETY: each chunk writes every value of its rows (`SparseRows::product_rows`).
        unsafe {
            helper_threads::rows_written_in_chunks(
                self.rows(),
                outputs,
                values_per_row,
                &product_of,
            )
        }
    }

    /// Rows `rows` of [`SparseRows::product`] written into `output`, W padded to `stride`
    /// columns; every value is written. `in_pairs`: two rows at a time where W is one block
    /// wide ([`sum_row_pair`]).
    #[inline(always)]
    fn product_rows<'o>(
        &self,
        rows: Range<usize>,
        weight: &[f32],
        stride: usize,
        bias: &[f32],
        in_pairs: bool,
        output: &'o mut [MaybeUninit<f32>],
    ) -> &'o mut [f32] {
        let outputs = bias.len();
        assert_eq!(output.len(), rows.len() * outputs, "output rows");
        let in_pairs = in_pairs && [64, 32, LANES].contains(&stride);
        let mut i = 0;
        while i < rows.len() {
            let row = rows.start + i;
            // From this row to the end: the rows after it are written later.
            let out = &mut output[i * outputs..];
            let written = if in_pairs && i + 1 < rows.len() {
                sum_row_pair(
                    self.row(row),
                    self.row(row + 1),
                    weight,
                    stride,
                    out,
                    outputs,
                );
                2
            } else {
                sum_rows(self.row(row), weight, stride, out, outputs);
                1
            };
            // SAFETY: the sums above wrote every value of these rows.
            let sums = unsafe { out[..written * outputs].assume_init_mut() };
            for sums in sums.chunks_exact_mut(outputs) {
                for (sum, b) in sums.iter_mut().zip(bias) {
                    *sum += b;
                }
            }
            i += written;
        }
        // SAFETY: every row was written above.
        unsafe { output.assume_init_mut() }
    }

    /// xᵀ·g as a row-major `[columns, outputs]` buffer, for g row-major `[rows, outputs]`:
    /// each nonzero x[i][j] adds x[i][j]·g[i] to row j, rows i in order.
    #[cfg(test)]
    pub(crate) fn transposed_product(&self, grad: &[f32], outputs: usize) -> Vec<f32> {
        self.transposed_product_by(&self.by_column(), grad, outputs)
    }

    /// The entries column by column, rows in order within each: each output row of
    /// [`SparseRows::transposed_product_by`] then sums in registers, and in the same order as
    /// row after row would. Apart from the product so that it can be arranged while the
    /// gradient is still being formed ([`by_column_in_pieces`]).
    pub(crate) fn by_column(&self) -> ByColumn {
        let mut pieces = by_column_in_pieces(self);
        loop {
            if let Some(by_column) = pieces() {
                return by_column;
            }
        }
    }

    /// [`SparseRows::transposed_product`] from its entries already arranged [`by_column`].
    ///
    /// [`by_column`]: SparseRows::by_column
    pub(crate) fn transposed_product_by(
        &self,
        by_column: &ByColumn,
        grad: &[f32],
        outputs: usize,
    ) -> Vec<f32> {
        self.transposed_product_on(Isa::best(16), by_column, grad, outputs)
    }

    /// [`SparseRows::transposed_product_by`] through the copy of the loop compiled for `isa`,
    /// which only a CPU with it may ask for.
    fn transposed_product_on(
        &self,
        isa: Isa,
        by_column: &ByColumn,
        grad: &[f32],
        outputs: usize,
    ) -> Vec<f32> {
        assert_eq!(grad.len(), self.rows() * outputs, "gradient shape");
        assert_eq!(
            by_column.rows.len(),
            self.values.len(),
            "these rows' entries"
        );
        if outputs == 0 {
            return Vec::new();
        }
        let ByColumn {
            column_starts,
            rows: rows_by_column,
            values: values_by_column,
        } = by_column;
        let (grad, stride) = padded(grad, outputs);
        // Output rows are independent: a fit's spare cores take runs of them with about equal
        // shares of the entries.
        let entries = self.values.len();
        let chunks = helper_threads::chunks_worth(entries * outputs);
        let mut bounds = vec![0];
        bounds.extend(
            (1..chunks).map(|chunk| {
                column_starts.partition_point(|&start| start < chunk * entries / chunks)
            }),
        );
        bounds.push(self.columns);
        bounds.dedup();
        // No ranges at all where there are no columns.
        let ranges: Vec<Range<usize>> = bounds.windows(2).map(|w| w[0]..w[1]).collect();
        let gradient_of = |columns: Range<usize>, out: &mut [MaybeUninit<f32>]| {
            on_isa!(isa, || {
                for (i, column) in columns.enumerate() {
                    let range = column_starts[column]..column_starts[column + 1];
                    let entries = (&rows_by_column[range.clone()], &values_by_column[range]);
                    // From this output row to the end: the rows after it are written later.
                    sum_rows(entries, &grad, stride, &mut out[i * outputs..], outputs);
                }
            })
        };
        // SAFETY: each chunk writes every value of its rows (`sum_rows`).
        unsafe {
            helper_threads::rows_written_in_ranges(self.columns, outputs, &ranges, &gradient_of)
        }
    }

    /// [`SparseRows::transposed_product_by`] without the arrangement by column: each row's
    /// entries add their share to the output rows they name, rows in order, so every sum
    /// takes its terms in the same order and gives the same bits. One thread does it all; it
    /// is for a fit without helpers, which would otherwise arrange the entries itself (about
    /// as long again as the product).
    pub(crate) fn transposed_product_by_rows(&self, grad: &[f32], outputs: usize) -> Vec<f32> {
        self.transposed_product_by_rows_on(Isa::best(16), grad, outputs)
    }

    /// [`SparseRows::transposed_product_by_rows`] through the copy of the loop compiled for
    /// `isa`, which only a CPU with it may ask for. With AVX-512 each output row's 64-lane
    /// block is loaded, updated and stored as four registers, not eight.
    fn transposed_product_by_rows_on(&self, isa: Isa, grad: &[f32], outputs: usize) -> Vec<f32> {
        on_isa!(isa, || self.transposed_product_by_rows_lanes(grad, outputs))
    }

    #[inline(always)]
    fn transposed_product_by_rows_lanes(&self, grad: &[f32], outputs: usize) -> Vec<f32> {
        assert_eq!(grad.len(), self.rows() * outputs, "gradient shape");
        let stride = outputs.next_multiple_of(LANES);
        // Output rows padded to whole vectors, and a gradient row's lanes past its end taken
        // from the next row (or zeros after the last): they only reach the padding. Each
        // entry loads and stores its output row's vectors, so the rows start on cache lines
        // ([`LineAligned`]).
        let mut sums = LineAligned::<f32>::new(64);
        sums.resize(self.columns * stride, 0.0);
        let mut start = 0;
        for width in [64, 32, LANES] {
            while start + width <= stride && start < outputs {
                match width {
                    64 => self.add_rows_block::<64>(grad, outputs, start, stride, &mut sums),
                    32 => self.add_rows_block::<32>(grad, outputs, start, stride, &mut sums),
                    _ => self.add_rows_block::<LANES>(grad, outputs, start, stride, &mut sums),
                }
                start += width;
            }
        }
        // Compacted (or, where the rows were whole vectors already, copied) into a plain buffer
        // for the tensor.
        let mut compact = Vec::with_capacity(self.columns * outputs);
        for row in sums.chunks_exact(stride) {
            compact.extend_from_slice(&row[..outputs]);
        }
        compact
    }

    /// Lanes `start..start + W` of every output row: Σ value·grad[row] over the entries.
    ///
    /// Two neighbouring rows with the same columns (half of KDDCUP99's, whose one-hot columns
    /// most rows of a kind share) update each output row once for both: one load and one store
    /// where there were two, and the same two additions in the same order. Timed apart on
    /// KDDCUP99-like rows: 47 µs per product against 60 µs.
    #[inline(always)]
    fn add_rows_block<const W: usize>(
        &self,
        grad: &[f32],
        outputs: usize,
        start: usize,
        stride: usize,
        sums: &mut [f32],
    ) {
        let lanes_of = |row: usize| -> [f32; W] {
            let from = row * outputs + start;
            match grad.get(from..from + W) {
                Some(lanes) => lanes.try_into().expect("W values"),
                None => {
                    let mut lanes = [0f32; W];
                    let available = &grad[from.min(grad.len())..];
                    let count = available.len().min(W);
                    lanes[..count].copy_from_slice(&available[..count]);
                    lanes
                }
            }
        };
        let rows = self.rows();
        let mut row = 0;
        while row < rows {
            let (columns, values) = self.row(row);
            let lanes = lanes_of(row);
            let pair = (row + 1 < rows)
                .then(|| self.row(row + 1))
                .filter(|(next_columns, _)| *next_columns == columns);
            if let Some((_, next_values)) = pair {
                let next_lanes = lanes_of(row + 1);
                for ((&column, &value), &next_value) in columns.iter().zip(values).zip(next_values)
                {
                    let at = column as usize * stride + start;
                    let target: &mut [f32; W] = (&mut sums[at..at + W]).try_into().expect("W sums");
                    for ((sum, &g), &next_g) in target.iter_mut().zip(&lanes).zip(&next_lanes) {
                        *sum = next_value.mul_add(next_g, value.mul_add(g, *sum));
                    }
                }
                row += 2;
                continue;
            }
            for (&column, &value) in columns.iter().zip(values) {
                let at = column as usize * stride + start;
                let target: &mut [f32; W] = (&mut sums[at..at + W]).try_into().expect("W sums");
                for (sum, &g) in target.iter_mut().zip(&lanes) {
                    *sum = value.mul_add(g, *sum);
                }
            }
            row += 1;
        }
    }
}

/// Rows of entries placed by column per piece of [`by_column_in_pieces`]: a few microseconds.
const BY_COLUMN_PIECE_ROWS: usize = 128;

/// [`SparseRows::by_column`] as pieces of [`helper_threads::background`] work: the columns'
/// counts first, then the entries of a run of rows per piece, each after the last; the
/// arrangement comes with the last piece.
pub(crate) fn by_column_in_pieces<R: std::borrow::Borrow<SparseRows> + Send>(
    sparse: R,
) -> impl FnMut() -> Option<ByColumn> + Send {
    // The arrangement so far and each column's next slot, once the columns are counted.
    let mut arranged: Option<(ByColumn, Vec<usize>)> = None;
    let mut next_row = 0;
    move || {
        let x: &SparseRows = sparse.borrow();
        let Some((by_column, cursor)) = arranged.as_mut() else {
            let mut column_starts = vec![0usize; x.columns + 1];
            for &column in &x.column_indices {
                column_starts[column as usize + 1] += 1;
            }
            for column in 0..x.columns {
                column_starts[column + 1] += column_starts[column];
            }
            let cursor = column_starts.clone();
            let entries = x.values.len();
            let by_column = ByColumn {
                column_starts,
                rows: vec![0u32; entries],
                values: vec![0f32; entries],
            };
            arranged = Some((by_column, cursor));
            return None;
        };
        let end = (next_row + BY_COLUMN_PIECE_ROWS).min(x.rows());
        for row in next_row..end {
            for entry in x.row_starts[row]..x.row_starts[row + 1] {
                let slot = &mut cursor[x.column_indices[entry] as usize];
                by_column.rows[*slot] = row as u32;
                by_column.values[*slot] = x.values[entry];
                *slot += 1;
            }
        }
        next_row = end;
        (next_row == x.rows()).then(|| arranged.take().map(|(by_column, _)| by_column))?
    }
}

/// A [`SparseRows`]'s entries column by column ([`SparseRows::by_column`]).
pub(crate) struct ByColumn {
    /// Where each column's entries start, and after the last, their count.
    column_starts: Vec<usize>,
    rows: Vec<u32>,
    values: Vec<f32>,
}

/// Whether `nonzeros` of `values` entries are too many to keep sparse ([`MAX_DENSITY`]).
fn too_dense(nonzeros: usize, values: usize) -> bool {
    nonzeros as f64 > MAX_DENSITY * values as f64
}

/// Calls `f` with each column whose bit is set in a row's mask words, in column order.
#[inline(always)]
fn for_each_set_column(words: &[u64], mut f: impl FnMut(usize)) {
    for (word_index, &word) in words.iter().enumerate() {
        // One step per set bit: which entries are zero is too irregular to branch on one
        // entry at a time.
        let mut mask = word;
        while mask != 0 {
            f(word_index * 64 + mask.trailing_zeros() as usize);
            mask &= mask - 1;
        }
    }
}

/// [`SparseRows::compress`] a few rows at a time, one after another: for background work,
/// where a fit's helper compresses the next batch between the current step's products.
/// [`SparseRowsBuilder::finish`] gives what `compress` gives for all the rows added.
pub(crate) struct SparseRowsBuilder {
    built: SparseRows,
    /// Entries of all the rows to come, for the density limit.
    expected_values: usize,
    /// Entries of the rows added so far.
    added_values: usize,
    too_dense: bool,
    masks: Vec<u64>,
}

impl SparseRowsBuilder {
    /// For `rows` rows of `columns` values; `None` for shapes `compress` refuses.
    pub(crate) fn new(rows: usize, columns: usize) -> Option<Self> {
        if columns == 0 || columns > u32::MAX as usize {
            return None;
        }
        let mut row_starts = Vec::with_capacity(rows + 1);
        row_starts.push(0);
        Some(SparseRowsBuilder {
            built: SparseRows {
                columns,
                row_starts,
                column_indices: Vec::new(),
                values: Vec::new(),
            },
            expected_values: rows.checked_mul(columns)?,
            added_values: 0,
            too_dense: false,
            masks: Vec::new(),
        })
    }

    /// Adds the whole rows in `values`. Once the rows so far hold too many nonzeros for the
    /// whole to stay sparse, the rest are only counted.
    pub(crate) fn add_rows(&mut self, values: &[f32]) {
        let columns = self.built.columns;
        assert!(values.len().is_multiple_of(columns), "whole rows");
        self.added_values += values.len();
        if self.too_dense {
            return;
        }
        let (rows, words) = (values.len() / columns, columns.div_ceil(64));
        self.masks.clear();
        self.masks.reserve(rows * words);
        let out = &mut self.masks.spare_capacity_mut()[..rows * words];
        row_masks_on(Isa::Avx2.supported(), values, columns, out);
        // SAFETY: `row_masks_on` wrote every row's words.
        unsafe { self.masks.set_len(rows * words) };
        // Room for exactly these rows' entries, as `compress` allocates them.
        let entries = self.masks.iter().map(|m| m.count_ones() as usize).sum();
        let built = &mut self.built;
        built.column_indices.reserve(entries);
        built.values.reserve(entries);
        for (row_values, masks) in values
            .chunks_exact(columns)
            .zip(self.masks.chunks_exact(words))
        {
            for_each_set_column(masks, |column| {
                built.column_indices.push(column as u32);
                built.values.push(row_values[column]);
            });
            built.row_starts.push(built.values.len());
        }
        self.too_dense = too_dense(built.values.len(), self.expected_values);
    }

    /// The rows added, as `compress` gives them: `None` when too many are nonzero.
    pub(crate) fn finish(self) -> Option<SparseRows> {
        assert_eq!(self.added_values, self.expected_values, "every row added");
        (!self.too_dense).then_some(self.built)
    }
}

/// Rows of a whole mostly-zero data set, kept as a [`SparseRows`], gathered into a batch a few
/// at a time (for background work): the batch's nonzeros, as [`SparseRows::compress`] gives
/// them for those rows. A row's entries take a tenth of its dense values' room at KDDCUP99's
/// density, so fewer of the cache lines a shuffled gather waits on, and its nonzeros need no
/// search. The rows are made dense only for a batch too dense to keep sparse: the layers
/// that take nonzeros never read them, and writing them dense was half the gather's time
/// (about 33 of 67 µs per 1024-row KDDCUP99 batch) and 480 KB through the cache.
pub(crate) struct SparseGather<'a> {
    source: &'a SparseRows,
    rows: Vec<usize>,
    next: usize,
    gathered: SparseRows,
}

/// A batch as [`SparseGather`] gives it.
#[derive(Debug, PartialEq)]
pub(crate) enum Gathered {
    /// Its nonzeros, as [`SparseRows::compress`] gives them.
    Nonzeros(SparseRows),
    /// Its rows, row-major, where too many of its values are nonzero to keep sparse.
    Dense(Vec<f32>),
}

impl<'a> SparseGather<'a> {
    /// For `rows` of `source`, in this order (repeats allowed).
    pub(crate) fn new(source: &'a SparseRows, rows: Vec<usize>) -> Self {
        let count = rows.len();
        let mut row_starts = Vec::with_capacity(count + 1);
        row_starts.push(0);
        // Room for a fifth more entries than the set's average rows hold: growing as the rows
        // come would reallocate, and copy what was gathered, a dozen times a batch.
        let entries = (count * source.values.len() / source.rows().max(1)) * 5 / 4;
        SparseGather {
            source,
            gathered: SparseRows {
                columns: source.columns,
                row_starts,
                column_indices: Vec::with_capacity(entries),
                values: Vec::with_capacity(entries),
            },
            rows,
            next: 0,
        }
    }

    /// Gathers the next `count` rows (fewer at the end); whether all are gathered.
    pub(crate) fn add_rows(&mut self, count: usize) -> bool {
        let source = self.source;
        let end = (self.next + count).min(self.rows.len());
        for i in self.next..end {
            // A row's start and its entries are two places apart in memory, each a wait:
            // asked for well ahead, the start first.
            if let Some(&far) = self.rows.get(i + 2 * PREFETCH_ROWS_AHEAD) {
                prefetch(&source.row_starts[far..far + 1]);
            }
            if let Some(&near) = self.rows.get(i + PREFETCH_ROWS_AHEAD) {
                let entries = source.row_starts[near]..source.row_starts[near + 1];
                prefetch(&source.column_indices[entries.clone()]);
                prefetch(&source.values[entries]);
            }
            let (indices, values) = source.row(self.rows[i]);
            let gathered = &mut self.gathered;
            gathered.column_indices.extend_from_slice(indices);
            gathered.values.extend_from_slice(values);
            gathered.row_starts.push(gathered.values.len());
        }
        self.next = end;
        end == self.rows.len()
    }

    /// The gathered batch: its nonzeros, or its rows dense where it holds too many to keep
    /// sparse, as `compress` would find.
    pub(crate) fn finish(self) -> Gathered {
        assert_eq!(self.next, self.rows.len(), "every row gathered");
        let gathered = self.gathered;
        if too_dense(gathered.values.len(), gathered.rows() * gathered.columns) {
            Gathered::Dense(gathered.to_dense())
        } else {
            Gathered::Nonzeros(gathered)
        }
    }
}

/// How many rows ahead a shuffled gather asks for a row's cache lines. The shuffled rows lie
/// anywhere in the training set (95 MB dense for KDDCUP99), so each copy waited on memory.
/// Asking for the row 24 rows ahead took 3–5 % off the epoch on a Zen 5 VM (ten alternating
/// pairs, all faster); 8 and 48 rows ahead gained less or nothing. On an AVX2-only Zen 4 VM no
/// distance (4, 8, 24 or none) differed beyond noise for the dense copy, while the gather from
/// the nonzeros took 210 µs per 1024-row batch without asking ahead and 89 µs with it (12, 24
/// and 48 rows ahead alike).
pub(crate) const PREFETCH_ROWS_AHEAD: usize = 24;

/// Asks the CPU to start loading every cache line of `values`; a hint, which changes no value.
#[inline(always)]
pub(crate) fn prefetch<T>(values: &[T]) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
        const LINE: usize = 64;
        let start = values.as_ptr() as usize;
        let end = start + std::mem::size_of_val(values);
        for line in (start & !(LINE - 1)..end).step_by(LINE) {
            // SAFETY: a prefetch never faults and reads nothing the program sees, whatever
            // the address; these lines hold `values` anyway.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(line as *const i8) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = values;
}

/// The bit masks of rows of `values` (`columns` wide), 64 entries a word, into `out`.
#[inline(always)]
fn row_masks<const AVX2: bool>(values: &[f32], columns: usize, out: &mut [MaybeUninit<u64>]) {
    let words = columns.div_ceil(64);
    for (row, out) in values
        .chunks_exact(columns)
        .zip(out.chunks_exact_mut(words))
    {
        for (word, out) in row.chunks(64).zip(out) {
            out.write(nonzero_mask::<AVX2>(word));
        }
    }
}

/// [`row_masks`] with AVX2 compares when `avx2`, which only a CPU with AVX2 may ask for.
fn row_masks_on(avx2: bool, values: &[f32], columns: usize, out: &mut [MaybeUninit<u64>]) {
    #[cfg(target_arch = "x86_64")]
    if avx2 {
        // SAFETY: only a CPU with AVX2 asks for it.
        return unsafe { row_masks_avx2(values, columns, out) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = avx2;
    row_masks::<false>(values, columns, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn row_masks_avx2(values: &[f32], columns: usize, out: &mut [MaybeUninit<u64>]) {
    row_masks::<true>(values, columns, out)
}

/// Bit k set where `word[k]` (at most 64 entries) is not zero (NaN included); eight entries
/// to one vector compare when `AVX2`, which only code compiled for AVX2 may ask for.
#[inline(always)]
fn nonzero_mask<const AVX2: bool>(word: &[f32]) -> u64 {
    debug_assert!(word.len() <= 64);
    let mut mask = 0u64;
    let mut first_unmasked = 0;
    #[cfg(target_arch = "x86_64")]
    if AVX2 {
        let eights = word.chunks_exact(8);
        first_unmasked = word.len() - eights.remainder().len();
        for (c, chunk) in eights.enumerate() {
            // SAFETY: AVX2 is only asked for from code compiled for it (`row_masks_avx2`), and
            // the load reads the chunk's eight values.
            let bits = unsafe {
                use std::arch::x86_64::*;
                let lanes = _mm256_loadu_ps(chunk.as_ptr());
                _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_NEQ_UQ>(lanes, _mm256_setzero_ps()))
            };
            mask |= u64::from(bits as u8) << (8 * c);
        }
    }
    for (k, &value) in word.iter().enumerate().skip(first_unmasked) {
        mask |= u64::from(value != 0.0) << k;
    }
    mask
}

/// f32 lanes of an AVX2 vector: rows are padded to a whole number of them, so every block of
/// sums is whole vectors.
const LANES: usize = 8;

/// `matrix` (row-major, `columns` wide) with each row padded with zeros to a multiple of
/// [`LANES`], and the padded width. A copy starts on a cache line ([`LineAligned`]), so that
/// the rows' whole vectors never straddle two. Each value is written once (zeroing the
/// whole copy first was most of the fit thread's `memset`), and a fit's spare cores take
/// chunks of the rows.
fn padded(matrix: &[f32], columns: usize) -> (Padded<'_>, usize) {
    let stride = columns.next_multiple_of(LANES);
    if stride == columns {
        return (Padded::InPlace(matrix), stride);
    }
    let rows_of = |rows: Range<usize>, out: &mut [MaybeUninit<f32>]| {
        let from = &matrix[rows.start * columns..rows.end * columns];
        for (to, from) in out.chunks_exact_mut(stride).zip(from.chunks_exact(columns)) {
            let (values, padding) = to.split_at_mut(columns);
            values.write_copy_of_slice(from);
            padding.fill(MaybeUninit::new(0.0));
        }
    };
    let rows = matrix.len() / columns;
    // SAFETY: each row's values and padding are written.
    let padded = unsafe {
        helper_threads::line_aligned_rows_written_in_chunks(rows, stride, stride, &rows_of)
    };
    (Padded::Copied(padded), stride)
}

/// What [`padded`] gives: the matrix itself where its rows were whole vectors already, or a
/// padded copy.
enum Padded<'a> {
    InPlace(&'a [f32]),
    Copied(LineAligned<f32>),
}

impl std::ops::Deref for Padded<'_> {
    type Target = [f32];

    fn deref(&self) -> &[f32] {
        match self {
            Padded::InPlace(values) => values,
            Padded::Copied(values) => values,
        }
    }
}

/// sums[l] = Σ value·matrix[index][l] over the (index, value) entries, in their order, for
/// `matrix` row-major with rows `stride` ≥ `count` wide, padded to whole vectors: the first
/// `count` values of `out`, returned. The sums are kept in registers, eight vectors (64 lanes)
/// at a time at most: each entry then starts eight independent additions, where one would
/// wait on the one before.
///
/// Where `out` has room, a block's lanes past `count` are stored too (the sums of the
/// padding's zeros), into values the caller writes after: a fixed-size copy of whole vectors,
/// where one of `count` values was a `memmove` call per row.
#[inline(always)]
fn sum_rows<'s>(
    entries: (&[u32], &[f32]),
    matrix: &[f32],
    stride: usize,
    out: &'s mut [MaybeUninit<f32>],
    count: usize,
) -> &'s mut [f32] {
    assert!(
        stride >= count && stride.is_multiple_of(LANES) && out.len() >= count,
        "padded rows"
    );
    let mut start = 0;
    for width in [64, 32, LANES] {
        while start + width <= stride && start < count {
            let valid = width.min(count - start);
            match width {
                64 => put(
                    sum_block::<64>(entries, matrix, stride, start),
                    out,
                    start,
                    valid,
                ),
                32 => put(
                    sum_block::<32>(entries, matrix, stride, start),
                    out,
                    start,
                    valid,
                ),
                _ => put(
                    sum_block::<LANES>(entries, matrix, stride, start),
                    out,
                    start,
                    valid,
                ),
            }
            start += width;
        }
    }
    // SAFETY: the blocks ran up to the padded width, which covers the first `count` values
    // (asserted above), each block writing at least its `valid` ones.
    unsafe { out[..count].assume_init_mut() }
}

/// `block` into `out` from `start`: whole where `out` has room, else its first `valid` lanes.
#[inline(always)]
fn put<const W: usize>(block: [f32; W], out: &mut [MaybeUninit<f32>], start: usize, valid: usize) {
    match out.get_mut(start..start + W) {
        Some(whole) => {
            let whole: &mut [MaybeUninit<f32>; W] = whole.try_into().expect("W values");
            whole.write_copy_of_slice(&block);
        }
        None => {
            out[start..start + valid].write_copy_of_slice(&block[..valid]);
        }
    }
}

/// Two rows' [`sum_rows`] (the entries `first` into `out`, then `second` into the next
/// `count` values) for `matrix` one block of sums wide (`stride` 64, 32 or [`LANES`]). Each
/// row's multiply-adds follow one another, each waiting on the one before; the two rows' chains
/// are independent, so taken in turn they overlap, and each row still adds its entries in order.
#[inline(always)]
fn sum_row_pair(
    first: (&[u32], &[f32]),
    second: (&[u32], &[f32]),
    matrix: &[f32],
    stride: usize,
    out: &mut [MaybeUninit<f32>],
    count: usize,
) {
    assert!(
        count <= stride && out.len() >= 2 * count,
        "two rows of {count} values"
    );
    // The first row's block may spill past its values into the second row's, which is
    // stored after it.
    macro_rules! pair {
        ($width:expr) => {{
            let (first, second) = sum_block_pair::<$width>(first, second, matrix, stride);
            put(first, out, 0, count);
            put(second, &mut out[count..], 0, count);
        }};
    }
    match stride {
        64 => pair!(64),
        32 => pair!(32),
        LANES => pair!(LANES),
        _ => panic!("a pair of rows needs a matrix one block wide, not {stride}"),
    }
}

/// [`sum_block`] for two rows' entries from lane 0, their entries taken in turn.
#[inline(always)]
fn sum_block_pair<const W: usize>(
    first: (&[u32], &[f32]),
    second: (&[u32], &[f32]),
    matrix: &[f32],
    stride: usize,
) -> ([f32; W], [f32; W]) {
    let add = |sums: &mut [f32; W], index: u32, value: f32| {
        add_entry(sums, matrix, index as usize * stride, value);
    };
    let (mut first_sums, mut second_sums) = ([0f32; W], [0f32; W]);
    let both = first.0.len().min(second.0.len());
    for e in 0..both {
        add(&mut first_sums, first.0[e], first.1[e]);
        add(&mut second_sums, second.0[e], second.1[e]);
    }
    for e in both..first.0.len() {
        add(&mut first_sums, first.0[e], first.1[e]);
    }
    for e in both..second.0.len() {
        add(&mut second_sums, second.0[e], second.1[e]);
    }
    (first_sums, second_sums)
}

/// Σ value·matrix[index][start..start + W] over the entries, in order.
#[inline(always)]
fn sum_block<const W: usize>(
    (indices, values): (&[u32], &[f32]),
    matrix: &[f32],
    stride: usize,
    start: usize,
) -> [f32; W] {
    let mut sums = [0f32; W];
    for (&index, &value) in indices.iter().zip(values) {
        add_entry(&mut sums, matrix, index as usize * stride + start, value);
    }
    sums
}

/// sums += value·matrix[offset..offset + W], one fused multiply-add a lane.
#[inline(always)]
fn add_entry<const W: usize>(sums: &mut [f32; W], matrix: &[f32], offset: usize, value: f32) {
    let row: &[f32; W] = matrix[offset..offset + W].try_into().expect("W values");
    for (sum, &m) in sums.iter_mut().zip(row) {
        *sum = value.mul_add(m, *sum);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// A `[rows, columns]` matrix with about `density` of its entries nonzero.
    fn mostly_zeros(rows: usize, columns: usize, density: f64, seed: u64) -> Vec<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..rows * columns)
            .map(|_| {
                if rng.random_bool(density) {
                    rng.random_range(-1.0f32..1.0)
                } else {
                    0.0
                }
            })
            .collect()
    }

    fn uniform(len: usize, seed: u64) -> Vec<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..len).map(|_| rng.random_range(-1.0f32..1.0)).collect()
    }

    /// x·W + b in f64, the dense way.
    fn dense_product(x: &[f32], weight: &[f32], bias: &[f32], columns: usize) -> Vec<f64> {
        let outputs = bias.len();
        x.chunks_exact(columns)
            .flat_map(|row| {
                (0..outputs).map(move |o| {
                    f64::from(bias[o])
                        + row
                            .iter()
                            .enumerate()
                            .map(|(j, &v)| f64::from(v) * f64::from(weight[j * outputs + o]))
                            .sum::<f64>()
                })
            })
            .collect()
    }

    fn assert_close(actual: &[f32], expected: &[f64]) {
        assert_eq!(actual.len(), expected.len());
        for (i, (&a, &e)) in actual.iter().zip(expected).enumerate() {
            assert!(
                (f64::from(a) - e).abs() <= 1e-5 * (1.0 + e.abs()),
                "entry {i}: {a} against {e}"
            );
        }
    }

    #[test]
    fn keeps_exactly_the_nonzeros_and_gives_the_matrix_back() {
        // Rows shorter than a mask word, and rows over two words with a ragged end.
        for columns in [11, 118] {
            let mut x = mostly_zeros(37, columns, 0.15, columns as u64);
            x[5] = f32::NAN;
            x[7] = -0.0;
            let rows = SparseRows::compress(&x, columns).expect("sparse enough");
            assert_eq!(rows.rows(), 37);
            assert_eq!(rows.columns(), columns);
            assert_eq!(rows.values.len(), x.iter().filter(|v| **v != 0.0).count());
            assert!(rows.values.iter().all(|v| *v != 0.0));
            assert!(rows.values.iter().any(|v| v.is_nan()));
            let back = rows.to_dense();
            assert_eq!(back.len(), x.len());
            assert!(
                back.iter()
                    .zip(&x)
                    .all(|(a, b)| a == b || (a.is_nan() && b.is_nan()))
            );
            // The masks from vector compares and from one entry at a time agree.
            let portable = SparseRows::compress_on(false, &x, columns).unwrap();
            assert_eq!(portable.row_starts, rows.row_starts);
            assert_eq!(portable.column_indices, rows.column_indices);
        }
    }

    #[test]
    fn compressed_in_chunks_over_helpers_gives_the_same_rows() {
        // KDDCUP99's batch shape, with empty rows at both ends and a run of them long enough
        // to leave a chunk without entries.
        let (n, columns) = (1021, 118);
        let mut x = mostly_zeros(n, columns, 0.1, 9);
        for row in (0..5).chain(300..560).chain(n - 3..n) {
            x[row * columns..(row + 1) * columns].fill(0.0);
        }
        let whole = SparseRows::compress(&x, columns).expect("sparse enough");
        assert_eq!(whole.to_dense(), x);
        for helpers in [1, 3] {
            let _lent = helper_threads::lend_unpinned(helpers);
            assert!(helper_threads::chunks_worth(n * columns) > 1, "split");
            assert_eq!(SparseRows::compress(&x, columns).as_ref(), Some(&whole));
        }
    }

    #[test]
    fn rows_added_a_few_at_a_time_give_what_compress_gives() {
        // Pieces of uneven length, empty rows across a piece boundary, and inputs too dense to
        // keep: past the limit early on, just past it at the very end, and just under it.
        let columns = 118;
        let mut sparse = mostly_zeros(301, columns, 0.1, 12);
        sparse[50 * columns..80 * columns].fill(0.0);
        let dense_early = mostly_zeros(301, columns, 0.6, 13);
        let limit = (MAX_DENSITY * (301 * columns) as f64) as usize;
        let at_limit = |extra: usize| {
            let mut x = vec![0f32; 301 * columns];
            x[..limit + extra].fill(1.5);
            x
        };
        for x in [sparse, dense_early, at_limit(0), at_limit(1)] {
            let whole = SparseRows::compress(&x, columns);
            let mut builder = SparseRowsBuilder::new(301, columns).expect("a shape compress takes");
            for rows in [0..1, 1..64, 64..64, 64..200, 200..301] {
                builder.add_rows(&x[rows.start * columns..rows.end * columns]);
            }
            assert_eq!(builder.finish(), whole);
        }
        assert!(SparseRows::compress(&at_limit(0), columns).is_some());
        assert!(SparseRows::compress(&at_limit(1), columns).is_none());
        assert!(SparseRowsBuilder::new(5, 0).is_none());
    }

    #[test]
    fn rows_gathered_from_the_whole_set_are_their_nonzeros_or_the_copied_rows() {
        let columns = 118;
        let mut x = mostly_zeros(500, columns, 0.1, 21);
        // Empty rows, and a few rows dense enough that a batch of them alone is not sparse.
        x[40 * columns..90 * columns].fill(0.0);
        for row in 450..500 {
            x[row * columns..(row + 1) * columns].fill(0.25);
        }
        let whole = SparseRows::to_gather_from(&x, columns).expect("a tenth or so set");
        let batches: [Vec<usize>; 3] = [
            // Out of order, repeated, across the empty run, pieces of uneven length.
            (0..300)
                .map(|i| (i * 37 + 11) % 450)
                .chain([45, 45, 0])
                .collect(),
            (450..500).chain(0..10).collect(),
            Vec::new(),
        ];
        for rows in batches {
            let copied: Vec<f32> = rows
                .iter()
                .flat_map(|&r| x[r * columns..(r + 1) * columns].iter().copied())
                .collect();
            let mut gather = SparseGather::new(&whole, rows.clone());
            let mut pieces = 0;
            for count in [1, 63, 0, 100].into_iter().cycle() {
                pieces += 1;
                if gather.add_rows(count) {
                    break;
                }
            }
            assert!(pieces > 1 || rows.len() <= 1);
            let expected = match SparseRows::compress(&copied, columns) {
                Some(nonzeros) => Gathered::Nonzeros(nonzeros),
                None => Gathered::Dense(copied),
            };
            assert_eq!(gather.finish(), expected);
        }
        assert!(
            SparseRows::compress(&x[450 * columns..], columns).is_none(),
            "the dense rows' batch is too dense to keep"
        );
        // Sets that are kept dense: too many nonzeros, or a zero whose sign would be lost.
        assert!(SparseRows::to_gather_from(&mostly_zeros(100, 20, 0.6, 3), 20).is_none());
        let mut signed = mostly_zeros(100, 20, 0.1, 4);
        assert!(SparseRows::to_gather_from(&signed, 20).is_some());
        signed[7] = -0.0;
        assert!(SparseRows::to_gather_from(&signed, 20).is_none());
    }

    #[test]
    fn entries_arranged_by_column_in_pieces_keep_row_order_whoever_arranges_them() {
        // Several pieces of rows, the last one short, and a run of empty rows across a piece
        // boundary.
        let (n, columns) = (1021, 118);
        let mut x = mostly_zeros(n, columns, 0.1, 4);
        for row in 100..300 {
            x[row * columns..(row + 1) * columns].fill(0.0);
        }
        let rows = SparseRows::compress(&x, columns).expect("sparse enough");
        assert!(n > 3 * BY_COLUMN_PIECE_ROWS);
        let check = |by_column: &ByColumn| {
            for column in 0..columns {
                let expected: Vec<(u32, f32)> = (0..n)
                    .filter(|&i| x[i * columns + column] != 0.0)
                    .map(|i| (i as u32, x[i * columns + column]))
                    .collect();
                let range = by_column.column_starts[column]..by_column.column_starts[column + 1];
                let found: Vec<(u32, f32)> = by_column.rows[range.clone()]
                    .iter()
                    .copied()
                    .zip(by_column.values[range].iter().copied())
                    .collect();
                assert_eq!(found, expected, "column {column}");
            }
        };
        check(&rows.by_column());
        let _lent = helper_threads::lend_unpinned(1);
        let shared = std::sync::Arc::new(rows);
        let in_background = helper_threads::background(by_column_in_pieces(shared));
        check(&in_background.finish());
    }

    #[test]
    fn refuses_dense_rows_and_shapes_that_do_not_divide() {
        let x = mostly_zeros(64, 8, 0.6, 2);
        assert!(x.iter().filter(|v| **v != 0.0).count() as f64 > MAX_DENSITY * x.len() as f64);
        assert_eq!(SparseRows::compress(&x, 8), None);
        assert_eq!(SparseRows::compress(&[0.0; 10], 3), None);
        assert_eq!(SparseRows::compress(&[0.0; 10], 0), None);
        let empty = SparseRows::compress(&[], 5).expect("no rows is sparse");
        assert_eq!(empty.rows(), 0);
        assert_eq!(
            empty.product(&[0.5; 15], &[1.0; 3], &|_| {}),
            Vec::<f32>::new()
        );
        assert_eq!(empty.transposed_product(&[], 3), vec![0.0; 15]);
        assert_eq!(empty.transposed_product_by_rows(&[], 3), vec![0.0; 15]);
    }

    #[test]
    fn product_is_the_dense_product_plus_bias() {
        // Widths across the vector lengths and their remainders (rows taken in pairs where
        // the sums are one block wide, an odd one left over); a row of zeros keeps the bias.
        for (columns, outputs) in [(118, 60), (9, 7), (3, 1), (20, 33), (50, 32)] {
            let mut x = mostly_zeros(51, columns, 0.12, columns as u64);
            x[..columns].fill(0.0);
            let weight = uniform(columns * outputs, 3);
            let bias = uniform(outputs, 4);
            let rows = SparseRows::compress(&x, columns).unwrap();
            let product = rows.product(&weight, &bias, &|_| {});
            assert_close(&product, &dense_product(&x, &weight, &bias, columns));
            assert_eq!(product[..outputs], bias[..]);
            // Where the dense layer's products are our chained kernel's (AVX2 or AVX-512), the
            // same bits as the dense layer: a zero's multiply-add leaves a sum as it was.
            let chained = crate::chained_product::inner_block(51, columns, outputs, false);
            if chained.is_some() && crate::chained_product::isa().is_some() {
                let dense = crate::dense::product(
                    &crate::dense::Matrix::row_major(&x, 51, columns),
                    &crate::dense::Matrix::row_major(&weight, columns, outputs),
                    Some(&bias),
                    false,
                );
                assert_eq!(product, dense, "{columns} × {outputs}");
            }
            // Every instruction set's copy of the loop, the same bits.
            for isa in Isa::available() {
                assert_eq!(
                    rows.product_on(isa, &weight, &bias, &|_| {}),
                    product,
                    "{isa:?}"
                );
            }
        }
    }

    #[test]
    fn transposed_product_is_the_dense_weight_gradient() {
        // Widths that end inside a vector, fill whole ones, and take each block width.
        for (columns, outputs) in [(118, 60), (9, 7), (3, 1), (20, 33), (20, 64), (7, 100)] {
            let mut x = mostly_zeros(50, columns, 0.12, 10 + columns as u64);
            // Runs of one to four rows with the same columns, other values, the last row in
            // one: the row-by-row product takes neighbours with the same columns in pairs.
            let mut rng = ChaCha8Rng::seed_from_u64(columns as u64);
            for row in 1..50 {
                if row % 10 > 3 && row != 49 {
                    continue;
                }
                let (before, this) = x.split_at_mut(row * columns);
                let previous = &before[(row - 1) * columns..];
                for (value, &was) in this[..columns].iter_mut().zip(previous) {
                    *value = if was == 0.0 {
                        0.0
                    } else {
                        rng.random_range(0.1f32..1.0)
                    };
                }
            }
            let same_as_before = (1..50)
                .filter(|&row| {
                    let pattern = |r: usize| {
                        x[r * columns..(r + 1) * columns]
                            .iter()
                            .map(|&v| v != 0.0)
                            .collect::<Vec<_>>()
                    };
                    pattern(row) == pattern(row - 1)
                })
                .count();
            assert!(same_as_before >= 20, "{same_as_before} rows repeat columns");
            let grad = uniform(50 * outputs, 5);
            let rows = SparseRows::compress(&x, columns).unwrap();
            let expected: Vec<f64> = (0..columns)
                .flat_map(|j| {
                    let (x, grad) = (&x, &grad);
                    (0..outputs).map(move |o| {
                        (0..50)
                            .map(|i| {
                                f64::from(x[i * columns + j]) * f64::from(grad[i * outputs + o])
                            })
                            .sum::<f64>()
                    })
                })
                .collect();
            let gradient = rows.transposed_product(&grad, outputs);
            assert_close(&gradient, &expected);
            // By column or row by row, the same sums in the same order, whichever instruction
            // set's copy of the loop: the same bits.
            for isa in Isa::available() {
                let by_column = rows.transposed_product_on(isa, &rows.by_column(), &grad, outputs);
                assert!(by_column == gradient, "{isa:?} by column");
                let by_rows = rows.transposed_product_by_rows_on(isa, &grad, outputs);
                assert!(by_rows == gradient, "{isa:?} row by row");
            }
        }
    }

    #[test]
    fn products_split_over_helpers_give_the_same_bits() {
        let (n, columns, outputs) = (1024, 118, 60);
        let x = mostly_zeros(n, columns, 0.1, 21);
        let weight = uniform(columns * outputs, 22);
        let bias = uniform(outputs, 23);
        let grad = uniform(n * outputs, 24);
        let rows = SparseRows::compress(&x, columns).unwrap();
        let square = |out: &mut [f32]| out.iter_mut().for_each(|v| *v *= *v);
        let whole = (
            rows.product(&weight, &bias, &square),
            rows.transposed_product(&grad, outputs),
        );
        for helpers in [1, 3] {
            let _lent = helper_threads::lend_unpinned(helpers);
            assert!(
                helper_threads::chunks_worth(n * columns * outputs) > 1,
                "split"
            );
            // Compared whole: a mismatch would print two thousand-value buffers.
            assert!(
                rows.product(&weight, &bias, &square) == whole.0,
                "{helpers}"
            );
            assert!(
                rows.transposed_product(&grad, outputs) == whole.1,
                "{helpers}"
            );
        }
    }
}
