//! The decoder's output layer and the reconstruction terms as one training step, through the
//! Gram matrix G = W·Wᵀ, without forming the reconstruction x' = h·W + b.
//!
//! The terms ([`crate::reconstruction`]) see x' only through ‖x'‖² and x·x' (with ‖x‖² and
//! ‖x − x'‖² = ‖x‖² − 2 x·x' + ‖x'‖²), and their gradient with respect to a row of x' is
//! α·x' + β·x. So, row by row and for the whole batch H, X:
//!
//! ```text
//!   ‖x'‖² = h·(h·G) + 2 h·(W·b) + ‖b‖²          x·x' = h·(x·Wᵀ) + b·x
//!   ∂/∂h  = α (h·G + W·b) + β x·Wᵀ
//!   ∂/∂W  = (Hᵀ diag(α) H)·W + (Hᵀα) bᵀ + Hᵀ diag(β) X
//!   ∂/∂b  = (Hᵀα)ᵀ·W + (Σα) b + Xᵀβ
//! ```
//!
//! With m hidden values, d outputs and x mostly zeros (KDDCUP99: m = 60, d = 118, about a tenth
//! of x nonzero), the layer's three n × m × d products give way to two n × m × m ones and two
//! through x's nonzeros, which the first layer already found. Timed apart on one core (n =
//! 1024, d = 120, a tenth nonzero), 585 µs of products became 316 µs; the passes over x' went
//! as well.
//!
//! The price is precision: ‖x − x'‖² is now a difference of sums of f32 products, correct to
//! about 1e-7·‖x‖² rather than to 1e-7 of itself. For a row reconstructed to 1 % of its norm
//! that leaves the squared error right to about 1e-3 of its value, well inside a step's
//! noise; it is summed in f64 and never let below zero (a NaN stays NaN, for the divergence
//! check). Only training takes this path: the forward pass of a fitted model, like the plain
//! scorer, forms x'.

use std::mem::MaybeUninit;
use std::ops::Range;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Dispatch, Flex, TensorMetadata, backend_extension};
use burn::tensor::{DType, Tensor, TensorData};

use crate::dense::{
    DenseBackend, Matrix, SparseInput, f32_values, prepared_input, product, stood_for,
};
use crate::helper_threads;
use crate::network::Layer;
#[cfg(target_arch = "x86_64")]
use crate::reconstruction::columns_of_eight_rows;
use crate::reconstruction::{ReconstructionBackend, row_coefficients};
use crate::scorer::{Isa, features_from_sums, on_isa};
use crate::step_support::to_f64;

#[backend_extension(Flex, Autodiff)]
pub trait ReconstructionLayerBackend: Backend {
    /// `[n, 3]`: the reconstruction terms ([`crate::reconstruction::reconstruction_terms`]) of x
    /// `[n, d]` and x' = h·W + b, for h `[n, m]` and the layer's parameters `[m + 1, d]`: W's
    /// rows, then b ([`Layer`]).
    fn reconstruction_terms_through(
        x: FloatTensor<Self>,
        h: FloatTensor<Self>,
        params: FloatTensor<Self>,
    ) -> FloatTensor<Self>;
}

/// The reconstruction terms of x and `layer` applied to `h` (no tanh): the decoder's output
/// layer and the terms in one.
pub fn reconstruction_terms_through(x: Tensor<2>, h: Tensor<2>, layer: &Layer) -> Tensor<2> {
    Tensor::from_dispatch(
        <Dispatch as ReconstructionLayerBackend>::reconstruction_terms_through(
            x.into_dispatch(),
            h.into_dispatch(),
            layer.params.val().into_dispatch(),
        ),
    )
}

/// Without gradients, x' is formed: the bits the plain scorer gives.
impl ReconstructionLayerBackend for Flex {
    fn reconstruction_terms_through(
        x: FlexTensor,
        h: FlexTensor,
        params: FlexTensor,
    ) -> FlexTensor {
        let x_hat = <Flex as DenseBackend>::dense(h, params, false);
        <Flex as ReconstructionBackend>::reconstruction_terms(x, x_hat)
    }
}

/// Whether the step through G pays for x's `nonzeros` over `n` rows: its multiply-adds per row
/// (2·m² in the two n × m × m products, 2·m per nonzero through x) at most half the layer's
/// 3·m·d, the margin for its smaller, less efficient products.
fn gram_pays(n: usize, m: usize, d: usize, nonzeros: usize) -> bool {
    n > 0 && m > 0 && 2 * m * m + 2 * m * (nonzeros / n) <= 3 * m * d / 2
}

/// The shapes (n, m, d) of f32 tensors that fit the step, and x's nonzeros where the first
/// layer shared them and the step pays; `None` sends the layer and terms their usual way.
fn gram_inputs(
    x: &FlexTensor,
    h: &FlexTensor,
    params: &FlexTensor,
) -> Option<((usize, usize, usize), SparseInput)> {
    if [x, h, params].iter().any(|t| t.dtype() != DType::F32)
        || x.shape().num_dims() != 2
        || h.shape().num_dims() != 2
        || params.shape().num_dims() != 2
    {
        return None;
    }
    let [n, d] = x.shape().dims();
    let [h_rows, m] = h.shape().dims();
    let fits = h_rows == n && params.shape().dims::<2>() == [m + 1, d];
    // Only a contiguous x is the buffer the first layer shared (a copy would have its own key).
    let sparse = prepared_input::shared(x.as_slice::<f32>()?, d)?;
    let rows = sparse.rows();
    (fits && rows.rows() == n && gram_pays(n, m, d, rows.nonzeros())).then_some(((n, m, d), sparse))
}

/// What the backward pass needs of the forward one.
#[derive(Debug, Clone)]
struct GramState {
    shape: (usize, usize, usize),
    h: FlexTensor,
    /// The layer's parameters: W's rows, then b.
    params: FlexTensor,
    x: SparseInput,
    kept: Kept,
}

/// What the forward pass formed that the backward pass uses again.
#[derive(Debug, Clone)]
struct Kept {
    /// h·G + 2 W·b, row-major `[n, m]`.
    hg_2wb: Vec<f32>,
    /// x·Wᵀ and, after each row's m values, b·x: row-major `[n, m + 1]`.
    xw_bx: Vec<f32>,
    /// W·b `[m]`.
    wb: Vec<f32>,
    /// ‖x‖², ‖x − x'‖², ‖x'‖², x·x' per row: f32 values, as the terms were formed from them.
    sums: Vec<f64>,
}

/// Wᵀ with b as one more column, `[d, m + 1]` row-major from W `[m, d]`: through x's
/// nonzeros it gives x·Wᵀ and b·x in one pass (the column takes a lane the pass would pad).
fn transposed_with_bias(w: &[f32], b: &[f32], m: usize, d: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(d * (m + 1));
    for (j, &b) in b.iter().enumerate() {
        out.extend((0..m).map(|k| w[k * d + j]));
        out.push(b);
    }
    out
}

/// a·b in eight f32 lanes whose sums are added in f64: as precise as the f32 products (h·G,
/// x·Wᵀ) it takes, so f64 lanes would buy nothing. Each ISA adds in the same order (Rust never
/// fuses the multiply and add); the lanes vectorise.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f64 {
    let mut lanes = [0f32; 8];
    let (a_blocks, b_blocks) = (a.chunks_exact(8), b.chunks_exact(8));
    let (a_rest, b_rest) = (a_blocks.remainder(), b_blocks.remainder());
    for (a, b) in a_blocks.zip(b_blocks) {
        for l in 0..8 {
            lanes[l] += a[l] * b[l];
        }
    }
    for (l, (&a, &b)) in a_rest.iter().zip(b_rest).enumerate() {
        lanes[l] += a * b;
    }
    lanes.iter().map(|&lane| f64::from(lane)).sum()
}

/// [`dot`] of eight pairs of rows side by side in AVX2 registers: row r of `a` (rows of m
/// values from `a[0]`) with row r of `b` (the first m of each `b_stride` values). Each row's
/// lanes take the same multiplies and adds; the rest of a row is loaded under a mask, zeros
/// past it (a lane, which starts at +0 and so is never −0, plus +0 keeps its bits). The eight
/// rows' lanes are then turned into columns, so that one f64 add per lane adds the next lane
/// of all eight rows, in [`dot`]'s order. Row by row, the plain loop's lanes compile to scalar
/// code and each row's sum waits on a chain of some twenty adds.
///
/// # Safety
/// The CPU must have AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn dots_of_eight_rows(a: &[f32], b: &[f32], m: usize, b_stride: usize) -> [f64; 8] {
    use std::arch::x86_64::*;
    assert!(a.len() >= 8 * m && b.len() >= 7 * b_stride + m && b_stride >= m);
    let whole = m - m % 8;
    let mut lanes = [_mm256_setzero_ps(); 8];
    for at in (0..whole).step_by(8) {
        for (r, lanes) in lanes.iter_mut().enumerate() {
            // SAFETY: at + 8 ≤ m, inside row r of each (asserted above).
            let (a, b) = unsafe {
                (
                    _mm256_loadu_ps(a.as_ptr().add(r * m + at)),
                    _mm256_loadu_ps(b.as_ptr().add(r * b_stride + at)),
                )
            };
            *lanes = _mm256_add_ps(*lanes, _mm256_mul_ps(a, b));
        }
    }
    if whole < m {
        let rest = (m - whole) as i32;
        let mask = _mm256_cmpgt_epi32(
            _mm256_set1_epi32(rest),
            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
        );
        for (r, lanes) in lanes.iter_mut().enumerate() {
            // SAFETY: the mask loads only the m − whole values left in row r of each.
            let (a, b) = unsafe {
                (
                    _mm256_maskload_ps(a.as_ptr().add(r * m + whole), mask),
                    _mm256_maskload_ps(b.as_ptr().add(r * b_stride + whole), mask),
                )
            };
            *lanes = _mm256_add_ps(*lanes, _mm256_mul_ps(a, b));
        }
    }
    let mut by_rows = [0f32; 64];
    for (r, &lanes) in lanes.iter().enumerate() {
        // SAFETY: row r's eight values fit `by_rows`.
        unsafe { _mm256_storeu_ps(by_rows.as_mut_ptr().add(8 * r), lanes) };
    }
    let columns = columns_of_eight_rows(&by_rows, 8, 0, 8);
    let halves = |column: __m256| {
        (
            _mm256_cvtps_pd(_mm256_castps256_ps128(column)),
            _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(column)),
        )
    };
    // The iterator's sum starts from a zero, and a zero plus the first lane (never −0) is that
    // lane.
    let (mut low, mut high) = halves(columns[0]);
    for &column in &columns[1..] {
        let (column_low, column_high) = halves(column);
        low = _mm256_add_pd(low, column_low);
        high = _mm256_add_pd(high, column_high);
    }
    let mut sums = [0f64; 8];
    // SAFETY: eight f64 fit `sums`.
    unsafe {
        _mm256_storeu_pd(sums.as_mut_ptr(), low);
        _mm256_storeu_pd(sums.as_mut_ptr().add(4), high);
    }
    sums
}

/// The terms `[n, 3]` and what the backward pass keeps, from f32 values of h `[n, m]`, W
/// `[m, d]`, b `[d]` and x's nonzeros.
fn gram_forward(
    (n, m, d): (usize, usize, usize),
    x: &SparseInput,
    h: &[f32],
    w: &[f32],
    b: &[f32],
) -> (Vec<f32>, Kept) {
    let w_view = Matrix::row_major(w, m, d);
    let gram = product(&w_view, &w_view.transposed(), None, false);
    // As f32, as h·G is: ‖x'‖² − ‖b‖² = h·(h·G + 2 W·b) then takes one dot product a row.
    let wb: Vec<f32> = w.chunks_exact(d).map(|row| dot(row, b) as f32).collect();
    let twice_wb: Vec<f32> = wb.iter().map(|&v| 2.0 * v).collect();
    let hg_2wb = product(
        &Matrix::row_major(h, n, m),
        &Matrix::row_major(&gram, m, m),
        Some(&twice_wb),
        false,
    );
    let rows = x.rows();
    let xw_bx = rows.product(
        &transposed_with_bias(w, b, m, d),
        &vec![0.0; m + 1],
        &|_| {},
    );
    let bb = dot(b, b);
    let isa = Isa::best(16);
    // h·(x·Wᵀ) and h·(h·G + 2 W·b) of rows `first..first + 8`.
    #[cfg(target_arch = "x86_64")]
    let eight_rows_of_dots = |first: usize| {
        // SAFETY (both): only called where the CPU has AVX2 (AVX-512 comes with it).
        let h = &h[first * m..];
        unsafe {
            (
                dots_of_eight_rows(h, &xw_bx[first * (m + 1)..], m, m + 1),
                dots_of_eight_rows(h, &hg_2wb[first * m..], m, m),
            )
        }
    };
    let row_sums = |i: usize, xh_dot: f64, hh_dot: f64| {
        let xx: f64 = rows.row(i).1.iter().map(|&v| f64::from(v).powi(2)).sum();
        let xh = xh_dot + f64::from(xw_bx[i * (m + 1) + m]);
        let hh = hh_dot + bb;
        // Never below zero, and NaN stays NaN (`max` would turn it into 0) so that a diverging
        // fit still shows in its loss.
        let difference = xx - 2.0 * xh + hh;
        let dd = if difference < 0.0 { 0.0 } else { difference };
        [xx, dd, hh, xh].map(|s| s as f32)
    };
    let sums_of = |range: Range<usize>, out: &mut [MaybeUninit<[f32; 4]>]| {
        on_isa!(isa, || {
            let mut i = range.start;
            while i < range.end {
                let out = &mut out[i - range.start..];
                #[cfg(target_arch = "x86_64")]
                if isa != Isa::Portable && i + 8 <= range.end {
                    let (xh_dots, hh_dots) = eight_rows_of_dots(i);
                    for (r, out) in out[..8].iter_mut().enumerate() {
                        out.write(row_sums(i + r, xh_dots[r], hh_dots[r]));
                    }
                    i += 8;
                    continue;
                }
                let h_row = &h[i * m..(i + 1) * m];
                let xw = &xw_bx[i * (m + 1)..i * (m + 1) + m];
                let hg = &hg_2wb[i * m..(i + 1) * m];
                out[0].write(row_sums(i, dot(h_row, xw), dot(h_row, hg)));
                i += 1;
            }
        })
    };
    // SAFETY: each chunk writes one value per row.
    let sums = unsafe { helper_threads::rows_written_in_chunks(n, 1, 2 * m, &sums_of) };
    let mut terms = Vec::with_capacity(3 * n);
    let mut sums_f64 = Vec::with_capacity(4 * n);
    for &[xx, dd, hh, xh] in &sums {
        let (distance, cosine) = features_from_sums(xx, dd, hh, xh);
        terms.extend([distance, cosine, dd]);
        sums_f64.extend([xx, dd, hh, xh].map(f64::from));
    }
    let kept = Kept {
        hg_2wb,
        xw_bx,
        wb,
        sums: sums_f64,
    };
    (terms, kept)
}

/// `values`, `rows` × `columns` row-major, transposed.
fn transposed(values: &[f32], rows: usize, columns: usize) -> Vec<f32> {
    let mut out = vec![0f32; values.len()];
    for (i, row) in values.chunks_exact(columns).enumerate() {
        for (j, &value) in row.iter().enumerate() {
            out[j * rows + i] = value;
        }
    }
    out
}

/// Per row, α and β of the gradient α·x' + β·x with respect to x', from `grad` `[n, 3]`.
fn row_factors(sums: &[f64], grad: &[f64]) -> Vec<(f64, f64)> {
    row_coefficients(sums, grad, true)
        .into_iter()
        // along·(x − x') + own_x·x + own_x_hat·x'
        .map(|[along, own_x, own_x_hat]| (own_x_hat - along, along + own_x))
        .collect()
}

/// The gradients of Σ grad ⊙ terms with respect to h, W and b, each where `wanted`.
fn gram_backward(
    state: &GramState,
    grad: &FlexTensor,
    wanted: [bool; 2],
) -> [Option<FlexTensor>; 2] {
    let (n, m, d) = state.shape;
    let Kept {
        hg_2wb, xw_bx, wb, ..
    } = &state.kept;
    let factors = row_factors(&state.kept.sums, &to_f64(grad));
    let h = f32_values(&state.h);
    let tensor = |values: Vec<f32>, shape: &[usize]| {
        FlexTensor::from_data(TensorData::new(values, shape.to_vec()))
    };
    let dh = wanted[0].then(|| {
        let rows_of = |range: Range<usize>, out: &mut [MaybeUninit<f32>]| {
            on_isa!(Isa::best(16), || {
                for (i, out) in range.zip(out.chunks_exact_mut(m)) {
                    let (alpha, beta) = factors[i];
                    let hg_2wb = &hg_2wb[i * m..(i + 1) * m];
                    let xw = &xw_bx[i * (m + 1)..i * (m + 1) + m];
                    for (((out, &hg_2wb), &wb), &xw) in out.iter_mut().zip(hg_2wb).zip(wb).zip(xw) {
                        // x'·Wᵀ = h·G + W·b. In f64: the two parts nearly cancel where x' is
                        // close to x.
                        let value = alpha * f64::from(hg_2wb - wb) + beta * f64::from(xw);
                        out.write(value as f32);
                    }
                }
            })
        };
        // SAFETY: each chunk writes every value of its rows.
        let dh = unsafe { helper_threads::rows_written_in_chunks(n, m, 3 * m, &rows_of) };
        tensor(dh, &[n, m])
    });
    if !wanted[1] {
        return [dh, None];
    }
    let params = f32_values(&state.params);
    let (w, b) = params.split_at(m * d);
    // Hᵀα and Σα, in f64.
    let (h_alpha, alpha_total) = on_isa!(Isa::best(16), || {
        let mut h_alpha = vec![0f64; m];
        for (row, &(alpha, _)) in h.chunks_exact(m).zip(&factors) {
            for (sum, &value) in h_alpha.iter_mut().zip(row) {
                *sum += alpha * f64::from(value);
            }
        }
        (
            h_alpha,
            factors.iter().map(|&(alpha, _)| alpha).sum::<f64>(),
        )
    });
    // diag(α)·H, and diag(β)·H with β itself after each row, so that the product through x
    // gives Xᵀβ in the column it would pad.
    let scaled_rows = |with_factor: bool| {
        let width = m + usize::from(with_factor);
        let rows_of = |range: Range<usize>, out: &mut [MaybeUninit<f32>]| {
            on_isa!(Isa::best(16), || {
                for (i, out) in range.zip(out.chunks_exact_mut(width)) {
                    let (alpha, beta) = factors[i];
                    let factor = if with_factor { beta } else { alpha };
                    let (values, rest) = out.split_at_mut(m);
                    for (out, &v) in values.iter_mut().zip(&h[i * m..(i + 1) * m]) {
                        out.write((factor * f64::from(v)) as f32);
                    }
                    if let Some(last) = rest.first_mut() {
                        last.write(factor as f32);
                    }
                }
            })
        };
        // SAFETY: each chunk writes every value of its rows.
        unsafe { helper_threads::rows_written_in_chunks(n, width, 2 * width, &rows_of) }
    };
    let beta_h_beta = scaled_rows(true);
    // Xᵀ·[diag(β)·H | β], `[d, m + 1]`.
    let through_x = state.x.transposed_product(&beta_h_beta, m + 1);
    // By columns, `[m + 1, d]`: the loops below then read each in order, d values side by side.
    let through_x = transposed(&through_x, d, m + 1);
    let db = on_isa!(Isa::best(16), || {
        let mut db: Vec<f64> = (b.iter().zip(&through_x[m * d..]))
            .map(|(&b, &through_x)| alpha_total * f64::from(b) + f64::from(through_x))
            .collect();
        for (row, &u) in w.chunks_exact(d).zip(&h_alpha) {
            for (sum, &value) in db.iter_mut().zip(row) {
                *sum += u * f64::from(value);
            }
        }
        db.into_iter().map(|v| v as f32).collect::<Vec<f32>>()
    });
    let dparams = {
        let alpha_h = scaled_rows(false);
        let h_alpha_h = product(
            &Matrix::row_major(&alpha_h, n, m).transposed(),
            &Matrix::row_major(&h, n, m),
            None,
            false,
        );
        let through_w = product(
            &Matrix::row_major(&h_alpha_h, m, m),
            &Matrix::row_major(w, m, d),
            None,
            false,
        );
        let mut dw = Vec::with_capacity((m + 1) * d);
        on_isa!(Isa::best(16), || {
            let rows = through_w.chunks_exact(d).zip(through_x.chunks_exact(d));
            for ((through_w, through_x), &h_alpha) in rows.zip(&h_alpha) {
                dw.extend(
                    through_w
                        .iter()
                        .zip(b)
                        .zip(through_x)
                        .map(|((&tw, &b), &tx)| {
                            (f64::from(tw) + h_alpha * f64::from(b) + f64::from(tx)) as f32
                        }),
                );
            }
        });
        dw.extend_from_slice(&db);
        tensor(dw, &[m + 1, d])
    };
    [dh, Some(dparams)]
}

#[derive(Debug)]
struct GramStep;

impl Backward<Flex, 2> for GramStep {
    type State = GramState;

    fn backward(
        self,
        ops: Ops<Self::State, 2>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let grad = grads.consume::<Flex>(&ops.node);
        let wanted = ops.parents.each_ref().map(Option::is_some);
        let gradients = gram_backward(&ops.state, &grad, wanted);
        for (parent, gradient) in ops.parents.into_iter().zip(gradients) {
            if let (Some(parent), Some(gradient)) = (parent, gradient) {
                grads.register::<Flex>(parent.id, gradient);
            }
        }
    }
}

impl<C: CheckpointStrategy> ReconstructionLayerBackend for Autodiff<Flex, C> {
    fn reconstruction_terms_through(
        x: FloatTensor<Self>,
        h: FloatTensor<Self>,
        params: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        // Only for data (x needs no gradient) whose nonzeros the first layer shared.
        let gram = (!x.is_tracked())
            .then(|| gram_inputs(x.primitive(), h.primitive(), params.primitive()))
            .flatten();
        let Some((shape, sparse)) = gram else {
            let x = stood_for::<C>(x);
            let x_hat = <Self as DenseBackend>::dense(h, params, false);
            return <Self as ReconstructionBackend>::reconstruction_terms(x, x_hat);
        };
        match GramStep
            .prepare::<C>([h.node(), params.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                #[cfg(test)]
                tests::GRAM_STEPS.with(|steps| steps.set(steps.get() + 1));
                let (h, params) = (h.into_primitive(), params.into_primitive());
                let (n, m, d) = shape;
                let values = f32_values(&params);
                let (weight, bias) = values.split_at(m * d);
                let (terms, kept) = gram_forward(shape, &sparse, &f32_values(&h), weight, bias);
                drop(values);
                let state = GramState {
                    shape,
                    h,
                    params,
                    x: sparse,
                    kept,
                };
                prep.finish(state, FlexTensor::from_data(TensorData::new(terms, [n, 3])))
            }
            OpsKind::UnTracked(prep) => prep.finish(Flex::reconstruction_terms_through(
                stood_for::<C>(x).into_primitive(),
                h.into_primitive(),
                params.into_primitive(),
            )),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::cell::Cell;

    use super::*;
    use burn::tensor::Device;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use crate::dense::prepared_input;
    use crate::network::{DagmmNet, NetworkWeights};
    use crate::sparse_rows::SparseRows;
    use crate::testing::assert_close_to_reference;

    thread_local! {
        /// Steps taken through the Gram matrix on this thread.
        pub(crate) static GRAM_STEPS: Cell<usize> = const { Cell::new(0) };
    }

    fn gram_steps() -> usize {
        GRAM_STEPS.with(Cell::get)
    }

    fn values<const D: usize>(t: Tensor<D>) -> Vec<f64> {
        t.into_data()
            .convert::<f64>()
            .try_into_vec::<f64>()
            .unwrap()
    }

    const ROWS: usize = 96;
    const INPUTS: usize = 24;

    /// A net whose last hidden layer (12 wide) is half its 24 inputs, and rows with two to four
    /// nonzeros in [0, 1] each (a tenth to a sixth of the entries), as scaled one-hot data.
    fn net_and_rows(device: &Device) -> (DagmmNet, Vec<f32>) {
        let cfg = crate::NetworkConfig {
            input_dim: INPUTS,
            hidden: vec![12],
            latent_dim: 2,
            estimation_hidden: vec![4],
            gmm_k: 2,
            dropout: 0.0,
        };
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let net = DagmmNet::from_weights(&NetworkWeights::init(&cfg, &mut rng), device);
        let mut xs = vec![0f32; ROWS * INPUTS];
        for row in xs.chunks_exact_mut(INPUTS) {
            for _ in 0..rng.random_range(2..=4) {
                row[rng.random_range(0..INPUTS)] = rng.random_range(0.05..1.0);
            }
        }
        (net, xs)
    }

    /// z (with both reconstruction features) and the squared errors, then the gradients of
    /// every decoder and encoder weight and bias, of a loss that weighs each value differently.
    fn forward_and_gradients(net: &DagmmNet, x: Tensor<2>) -> Vec<Vec<f64>> {
        let out = net.forward(x, None);
        let [n, width] = out.z.dims();
        let device = out.z.device();
        let weights = |columns: usize, phase: f32| {
            let w: Vec<f32> = (0..n * columns)
                .map(|i| (i as f32 * 0.37 + phase).sin())
                .collect();
            Tensor::<2>::from_data(TensorData::new(w, [n, columns]), &device)
        };
        let loss = (out.z.clone() * weights(width, 0.0)).sum()
            + (out.squared_error() * weights(1, 1.0)).sum();
        let grads = loss.backward();
        let mut series = vec![values(out.squared_error()), values(out.z)];
        for layer in net.decoder.iter().chain(&net.encoder) {
            series.push(values(layer.params.val().grad(&grads).unwrap()));
        }
        series
    }

    #[test]
    fn through_the_gram_matrix_terms_and_gradients_match_those_through_the_reconstruction() {
        let device = Device::flex().autodiff();
        let (net, xs) = net_and_rows(&device);
        let rows = SparseRows::compress(&xs, INPUTS).expect("sparse enough");
        assert!(gram_pays(ROWS, 12, INPUTS, rows.nonzeros()));
        let tensor =
            |xs: Vec<f32>| Tensor::<2>::from_data(TensorData::new(xs, [ROWS, INPUTS]), &device);

        // Without the first layer's nonzeros to share, the layer forms x'.
        let before = gram_steps();
        let reference = forward_and_gradients(&net, tensor(xs.clone()));
        assert_eq!(gram_steps(), before, "the reference formed x'");

        let key = prepared_input::Key::of(&xs, INPUTS);
        let x = tensor(xs);
        let gram = prepared_input::with(key, Some(rows), false, || forward_and_gradients(&net, x));
        assert_eq!(gram_steps(), before + 1, "one step through the Gram matrix");

        let mut names = vec!["squared error".to_string(), "z".to_string()];
        for part in ["decoder", "encoder"] {
            for i in 0..2 {
                names.push(format!("{part} {i} parameters"));
            }
        }
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        assert_close_to_reference(&names, &gram, &reference, 1e-4);
    }

    #[test]
    fn through_the_gram_matrix_every_instruction_set_gives_the_same_bits() {
        let device = Device::flex().autodiff();
        let (net, xs) = net_and_rows(&device);
        let through_gram = |isa: Isa| {
            let rows = SparseRows::compress(&xs, INPUTS).expect("sparse enough");
            let key = prepared_input::Key::of(&xs, INPUTS);
            let x = Tensor::<2>::from_data(TensorData::new(xs.clone(), [ROWS, INPUTS]), &device);
            let before = gram_steps();
            let series = isa.capped(|| {
                prepared_input::with(key, Some(rows), false, || forward_and_gradients(&net, x))
            });
            assert_eq!(gram_steps(), before + 1, "{isa:?} through the Gram matrix");
            series
        };
        let portable = through_gram(Isa::Portable);
        for isa in Isa::available() {
            assert!(through_gram(isa) == portable, "{isa:?}");
        }
    }

    #[test]
    fn a_stand_in_for_the_rows_gives_their_terms_and_gradients_through_either_path() {
        let device = Device::flex().autodiff();
        let (net, xs) = net_and_rows(&device);
        let rows = SparseRows::compress(&xs, INPUTS).expect("sparse enough");
        let tensor =
            |xs: Vec<f32>| Tensor::<2>::from_data(TensorData::new(xs, [ROWS, INPUTS]), &device);
        let key = prepared_input::Key::of(&xs, INPUTS);
        let x = tensor(xs);
        let zeros = vec![0f32; ROWS * INPUTS];
        let stand_in_key = prepared_input::Key::of(&zeros, INPUTS);
        let stand_in = tensor(zeros);
        // A hidden layer as wide as the inputs, where the Gram matrix does not pay and the
        // layer reads x itself (the nonzeros the first layer shared, made dense again).
        let wide = DagmmNet::from_weights(
            &NetworkWeights::init(
                &crate::NetworkConfig {
                    input_dim: INPUTS,
                    hidden: vec![INPUTS],
                    latent_dim: 2,
                    estimation_hidden: vec![4],
                    gmm_k: 2,
                    dropout: 0.0,
                },
                &mut ChaCha8Rng::seed_from_u64(6),
            ),
            &device,
        );
        for (net, gram) in [(&net, 1), (&wide, 0)] {
            let before = gram_steps();
            let expected = prepared_input::with(key, Some(rows.clone()), false, || {
                forward_and_gradients(net, x.clone())
            });
            assert_eq!(gram_steps(), before + gram, "steps through the Gram matrix");
            let got = prepared_input::with(stand_in_key, Some(rows.clone()), true, || {
                forward_and_gradients(net, stand_in.clone())
            });
            assert_eq!(gram_steps(), before + 2 * gram);
            assert!(got == expected, "through the Gram matrix: {}", gram == 1);
        }
        // The layer and terms alone, before any first layer took the nonzeros.
        let h = Tensor::<2>::from_data(
            TensorData::new(
                (0..ROWS * INPUTS)
                    .map(|i| (i as f32 * 0.11).cos())
                    .collect::<Vec<_>>(),
                [ROWS, INPUTS],
            ),
            &device,
        );
        let output_layer = wide.decoder.last().expect("a decoder layer");
        let own = values(reconstruction_terms_through(x, h.clone(), output_layer));
        let read = prepared_input::with(stand_in_key, Some(rows), true, || {
            values(reconstruction_terms_through(stand_in, h, output_layer))
        });
        assert!(read == own);
    }

    #[test]
    fn a_row_with_nan_keeps_nan_in_its_squared_error_and_the_others_stay_finite() {
        let (m, d) = (3, 8);
        let xs: Vec<f32> = (0..2 * d)
            .map(|i| if i % 5 == 0 { 0.5 } else { 0.0 })
            .collect();
        let x = SparseInput::new(SparseRows::compress(&xs, d).expect("sparse enough"));
        let h = [0.1, -0.2, f32::NAN, 0.3, 0.2, -0.1];
        let w: Vec<f32> = (0..m * d).map(|i| (i as f32 * 0.7).sin() * 0.3).collect();
        let b = vec![0.05; d];
        let (terms, _) = gram_forward((2, m, d), &x, &h, &w, &b);
        assert!(
            terms[2].is_nan(),
            "the NaN row's squared error is {}",
            terms[2]
        );
        assert!(terms[3..].iter().all(|t| t.is_finite()), "{terms:?}");
    }

    #[test]
    fn the_gram_matrix_pays_only_for_narrow_hidden_layers_over_mostly_zero_inputs() {
        // KDDCUP99: 60 hidden, 120 inputs, about twelve nonzeros a row.
        assert!(gram_pays(1024, 60, 120, 12 * 1024));
        // The same inputs all nonzero, a hidden layer as wide as the output, the four metrics.
        assert!(!gram_pays(1024, 60, 120, 120 * 1024));
        assert!(!gram_pays(1024, 120, 120, 12 * 1024));
        assert!(!gram_pays(1000, 10, 4, 4 * 1000));
        assert!(!gram_pays(0, 10, 4, 0));
    }
}
