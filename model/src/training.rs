//! The DAGMM training loop: Adam on reconstruction + λ1·energy + λ2·covariance penalty, then
//! GMM parameters over the whole training set and energy cutoffs from the plain scorer.

use std::time::Instant;

use burn::module::Module;
use burn::tensor::{Device, Tensor, TensorData};
use rand::Rng;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::adam::FusedAdam;
use crate::config::{NetworkConfig, TrainConfig};
use crate::dense::prepared_input;
use crate::gmm::{GmmParams, energy, gmm_stats};
use crate::helper_threads;
use crate::network::{DagmmNet, NetworkWeights};
use crate::objective::{LOSS, objective};
use crate::preprocess::Preprocessor;
use crate::scorer::Scorer;
use crate::sparse_rows::{
    Gathered, PREFETCH_ROWS_AHEAD, SparseGather, SparseRows, SparseRowsBuilder, prefetch,
};
use crate::thresholds::Thresholds;
use crate::{DagmmModel, ModelError};

/// Mean loss parts over one epoch's batches.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct EpochLosses {
    pub epoch: usize,
    pub total: f64,
    pub reconstruction: f64,
    pub energy: f64,
    pub cov_penalty: f64,
}

/// A fitted model plus what training observed.
#[derive(Debug)]
pub struct FitOutput {
    pub model: DagmmModel,
    pub history: Vec<EpochLosses>,
    /// Energy of every training row under the final model, in input order.
    pub train_energies: Vec<f64>,
    pub seconds: f64,
    /// Wall seconds of each epoch's shuffle and steps, in order (not the one-off work before
    /// and after them): what a per-epoch speed comparison counts.
    pub epoch_seconds: Vec<f64>,
}

/// Fewest rows a mixture can be estimated from.
pub const MIN_TRAIN_ROWS: usize = 2;

/// Fit a DAGMM on raw rows (row-major, `preprocessor.dim()` values each).
///
/// `on_epoch` sees each epoch's losses (for progress bars); it is not called concurrently.
pub fn fit(
    net_cfg: &NetworkConfig,
    cfg: &TrainConfig,
    preprocessor: Preprocessor,
    raw_rows: &[f64],
    on_epoch: &mut (dyn FnMut(&EpochLosses) + Send),
) -> Result<FitOutput, ModelError> {
    fit_on_cores(net_cfg, cfg, preprocessor, raw_rows, 1, on_epoch)
}

/// The most cores one fit takes. Splitting its products was measured on two cores only; on
/// more, the chunks get smaller and every extra helper spins while the fit runs.
pub const MAX_CORES_PER_FIT: usize = 2;

/// The cores each of `fits` fits run side by side on the current rayon pool may have: the
/// pool's threads shared out, at least one each and at most [`MAX_CORES_PER_FIT`].
pub fn cores_per_fit(fits: usize) -> usize {
    (rayon::current_num_threads() / fits.max(1)).clamp(1, MAX_CORES_PER_FIT)
}

/// [`fit`] with `cores` cores to itself: its larger matrix products are split by rows over that
/// many threads, pinned to CPUs of their own where the system allows (see `helper_threads`).
/// The model is the same bit for bit whatever the number.
pub fn fit_on_cores(
    net_cfg: &NetworkConfig,
    cfg: &TrainConfig,
    preprocessor: Preprocessor,
    raw_rows: &[f64],
    cores: usize,
    on_epoch: &mut (dyn FnMut(&EpochLosses) + Send),
) -> Result<FitOutput, ModelError> {
    // The flex backend splits element-wise kernels over the rayon pool. At DAGMM's layer sizes
    // the hand-offs cost more than they save (KDDCUP99 preset: 0.61 s per epoch on one thread,
    // 0.69 s on two), so a fit runs its kernels in a pool of one thread; more cores fit more
    // models, and cores to spare take parts of its products through helpers that wait for
    // them spinning. The pool is entered from a plain thread: a rayon worker entering another pool
    // steals more work while it waits, and a parallel loop over fits would start them all at
    // once.
    std::thread::scope(|scope| {
        let fit_here = move || {
            let _helpers = helper_threads::lend(cores);
            fit_on_one_thread(net_cfg, cfg, preprocessor, raw_rows, on_epoch)
        };
        let handle =
            scope.spawn(
                move || match rayon::ThreadPoolBuilder::new().num_threads(1).build() {
                    Ok(pool) => pool.install(fit_here),
                    Err(_) => fit_here(),
                },
            );
        handle
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

fn fit_on_one_thread(
    net_cfg: &NetworkConfig,
    cfg: &TrainConfig,
    preprocessor: Preprocessor,
    raw_rows: &[f64],
    on_epoch: &mut (dyn FnMut(&EpochLosses) + Send),
) -> Result<FitOutput, ModelError> {
    net_cfg.validate()?;
    cfg.validate()?;
    let d = preprocessor.dim();
    if net_cfg.input_dim != d {
        return Err(ModelError::InvalidConfig {
            field: "input_dim",
            why: format!(
                "network expects {} features, data has {d}",
                net_cfg.input_dim
            ),
        });
    }
    if !raw_rows.len().is_multiple_of(d) {
        return Err(ModelError::InvalidData(format!(
            "{} values do not make rows of {d}",
            raw_rows.len()
        )));
    }
    let n = raw_rows.len() / d;
    if n < MIN_TRAIN_ROWS {
        return Err(ModelError::InvalidData(format!(
            "{n} rows; at least {MIN_TRAIN_ROWS} are needed"
        )));
    }
    let start = Instant::now();
    let x = preprocessor.scale_rows(raw_rows);
    if x.iter().any(|v| !v.is_finite()) {
        return Err(ModelError::InvalidData(
            "scaled features contain NaN or infinity".into(),
        ));
    }

    // Mostly-zero data is kept as its nonzeros too: batches gather from there.
    let x_sparse = SparseRows::to_gather_from(&x, d);

    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let device = Device::flex().autodiff();
    let mut weights = NetworkWeights::init(net_cfg, &mut rng);
    // Start the reconstruction at the feature means: Adam moves a parameter about one learning
    // rate per step, too slowly to walk an output bias to the data from zero.
    if let Some(out_layer) = weights.decoder.last_mut() {
        out_layer.bias = column_means(&x, d);
    }
    let mut net = DagmmNet::from_weights(&weights, &device);
    let mut optimizer = FusedAdam::new();

    // Equal-sized batches (sizes differ by at most one) so no step sees a sliver of data.
    let n_batches = n.div_ceil(cfg.batch_size);
    let mut order: Vec<usize> = (0..n).collect();
    let mut history = Vec::with_capacity(cfg.epochs);
    let mut epoch_seconds = Vec::with_capacity(cfg.epochs);
    let warmup_epochs = (cfg.epochs as f64 * cfg.warmup_fraction).round() as usize;
    let mut split_chooser = helper_threads::SplitChooser::new();
    // A batch's rows, copied and made ready for its step in the background.
    let prepare = |rows: Vec<usize>, rng: ChaCha8Rng| {
        helper_threads::background(batch_prepared(&x, x_sparse.as_ref(), d, rows, net_cfg, rng))
    };
    let mut stand_ins = StandIns::new(d, &device);
    for epoch in 1..=cfg.epochs {
        let epoch_start = Instant::now();
        let joint = epoch > warmup_epochs;
        order.shuffle(&mut rng);
        let mut sums = [0f64; 4];
        // Each batch is gathered, its nonzeros found for the first layer and its dropout masks
        // drawn by the fit's helper in the background during the step before (the first of an
        // epoch here, after the shuffle): one copy per batch, straight into the buffer the
        // tensor takes over, or where the set is kept sparse, its nonzeros alone, for which a
        // stand-in tensor goes through the network.
        let batch_rows = |b: usize| &order[b * n / n_batches..(b + 1) * n / n_batches];
        // The generator goes with the batch being prepared (for its dropout masks) and comes
        // back with it, so its draws keep their order.
        let mut next_batch = None;
        let mut rng_home = Some(rng);
        for b in 0..n_batches {
            split_chooser.start_step();
            let rows = batch_rows(b);
            let prepared = next_batch
                .take()
                .unwrap_or_else(|| {
                    let rng = rng_home
                        .take()
                        .expect("the generator is home between batches");
                    prepare(rows.to_vec(), rng)
                })
                .finish();
            rng_home = Some(prepared.rng);
            let (xb, key, stand_in) = match prepared.batch {
                Some(batch) => {
                    let key = prepared_input::Key::of(&batch, d);
                    let xb =
                        Tensor::<2>::from_data(TensorData::new(batch, [rows.len(), d]), &device);
                    (xb, key, false)
                }
                None => {
                    let (xb, key) = stand_ins.for_rows(rows.len());
                    (xb, key, true)
                }
            };
            let masks = prepared.masks.map(|masks| {
                masks
                    .into_iter()
                    .zip(&net_cfg.estimation_hidden)
                    .map(|(mask, &h)| {
                        Tensor::<2>::from_data(TensorData::new(mask, [rows.len(), h]), &device)
                    })
                    .collect::<Vec<_>>()
            });
            let out = prepared_input::with(key, prepared.nonzeros, stand_in, || {
                net.forward(xb, masks.as_deref())
            });
            // Started here, past the layers' products, so that the helper prepares the next
            // batch while this thread works through the mixture's small tensors alone.
            next_batch = (b + 1 < n_batches).then(|| {
                let rng = rng_home
                    .take()
                    .expect("the generator is home between batches");
                prepare(batch_rows(b + 1).to_vec(), rng)
            });
            let parts = objective(
                out.terms,
                out.z,
                out.gamma,
                cfg.cov_reg,
                joint.then_some([cfg.lambda_energy, cfg.lambda_cov]),
            );
            let loss = parts.clone().slice(LOSS..LOSS + 1);
            let parts = parts
                .into_data()
                .try_into_vec::<f32>()
                .expect("loss is f32");
            for (sum, part) in sums.iter_mut().zip(parts) {
                *sum += f64::from(part);
            }
            let mut grads = loss.backward();
            net = optimizer.step(cfg.learning_rate, net, &mut grads);
            split_chooser.end_step();
        }
        rng = rng_home.expect("the last batch of an epoch brings the generator home");
        epoch_seconds.push(epoch_start.elapsed().as_secs_f64());
        let mean = |i: usize| sums[i] / n_batches as f64;
        let losses = EpochLosses {
            epoch,
            total: mean(0),
            reconstruction: mean(1),
            energy: mean(2),
            cov_penalty: mean(3),
        };
        if !losses.total.is_finite() {
            return Err(ModelError::Diverged {
                epoch,
                what: "the loss",
            });
        }
        on_epoch(&losses);
        history.push(losses);
    }

    let net = net.valid();
    let weights = net.weights();
    let gmm = whole_set_gmm(&net, &x, n, d, cfg.cov_reg)?;
    let mut model = DagmmModel {
        network: net_cfg.clone(),
        preprocessor,
        weights,
        gmm,
        thresholds: Thresholds::default(),
    };
    let scorer = Scorer::new(&model);
    let train_energies = scorer.energies_scaled(&x);
    if train_energies.iter().any(|e| !e.is_finite()) {
        return Err(ModelError::Diverged {
            epoch: cfg.epochs,
            what: "a training energy",
        });
    }
    model.thresholds = Thresholds::from_energies(&train_energies, cfg.percentile, &cfg.severities);
    Ok(FitOutput {
        model,
        history,
        train_energies,
        seconds: start.elapsed().as_secs_f64(),
        epoch_seconds,
    })
}

/// Rows gathered per piece of background work: a few microseconds, so that the helper doing
/// it soon turns to the chunks of the step's products.
const GATHER_PIECE_ROWS: usize = 64;

/// Pieces of [`helper_threads::background`] work that copy `rows` of `x` (rows of `d` values)
/// one after another into a new buffer, and give it after the last.
fn rows_gathered(
    x: &[f32],
    d: usize,
    rows: Vec<usize>,
) -> impl FnMut() -> Option<Vec<f32>> + Send + '_ {
    let mut gathered = Vec::with_capacity(rows.len() * d);
    let mut next = 0;
    move || {
        let end = (next + GATHER_PIECE_ROWS).min(rows.len());
        for i in next..end {
            if let Some(&ahead) = rows.get(i + PREFETCH_ROWS_AHEAD) {
                prefetch(&x[ahead * d..(ahead + 1) * d]);
            }
            let r = rows[i];
            gathered.extend_from_slice(&x[r * d..(r + 1) * d]);
        }
        next = end;
        (next == rows.len()).then(|| std::mem::take(&mut gathered))
    }
}

/// Tensors that stand in for batches gathered as their nonzeros alone ([`prepared_input::with`]):
/// zeros, `[rows, d]`, one per batch size (a fit's batches take at most two), made once.
struct StandIns {
    d: usize,
    device: Device,
    made: Vec<(usize, Tensor<2>, prepared_input::Key)>,
}

impl StandIns {
    fn new(d: usize, device: &Device) -> Self {
        StandIns {
            d,
            device: device.clone(),
            made: Vec::new(),
        }
    }

    /// The stand-in for a batch of `rows` rows, and its key.
    fn for_rows(&mut self, rows: usize) -> (Tensor<2>, prepared_input::Key) {
        let d = self.d;
        let index = match self
            .made
            .iter()
            .position(|(made_rows, ..)| *made_rows == rows)
        {
            Some(index) => index,
            None => {
                let zeros = vec![0f32; rows * d];
                let key = prepared_input::Key::of(&zeros, d);
                let tensor =
                    Tensor::<2>::from_data(TensorData::new(zeros, [rows, d]), &self.device);
                self.made.push((rows, tensor, key));
                self.made.len() - 1
            }
        };
        let (_, tensor, key) = &self.made[index];
        (tensor.clone(), *key)
    }
}

/// A batch made ready for its step by [`batch_prepared`].
struct PreparedBatch {
    /// The batch's rows, row-major: `None` where they were gathered as their nonzeros alone.
    batch: Option<Vec<f32>>,
    /// Their nonzeros ([`prepared_input`]), `None` where too dense to keep sparse.
    nonzeros: Option<SparseRows>,
    /// The dropout masks' values, one per estimation hidden layer ([`dropout_mask_values`]).
    masks: Option<Vec<Vec<f32>>>,
    /// The generator the masks were drawn from, handed back.
    rng: ChaCha8Rng,
}

/// Pieces of [`helper_threads::background`] work that draw the batch's dropout masks from
/// `rng`, gather `rows` of `x` and find their nonzeros for a first layer fed mostly zeros, a
/// few rows at a time; all of it after the last piece. Where the whole set is kept sparse as
/// well (`x_sparse`), the rows come from there as their nonzeros alone ([`SparseGather`]), or
/// dense where a batch is too dense to keep sparse; else they are copied ([`rows_gathered`])
/// and then searched.
fn batch_prepared<'a>(
    x: &'a [f32],
    x_sparse: Option<&'a SparseRows>,
    d: usize,
    rows: Vec<usize>,
    net_cfg: &'a NetworkConfig,
    rng: ChaCha8Rng,
) -> impl FnMut() -> Option<PreparedBatch> + Send + 'a {
    let count = rows.len();
    let mut rng = Some(rng);
    let mut masks = None;
    enum Gather<'a, G> {
        Sparse(Option<SparseGather<'a>>),
        Dense {
            gather: G,
            gathered: Option<Vec<f32>>,
            nonzeros: Option<SparseRowsBuilder>,
            next: usize,
        },
    }
    let mut gather = match x_sparse {
        Some(source) => Gather::Sparse(Some(SparseGather::new(source, rows))),
        None => Gather::Dense {
            gather: rows_gathered(x, d, rows),
            gathered: None,
            nonzeros: SparseRowsBuilder::new(count, d),
            next: 0,
        },
    };
    move || {
        if masks.is_none() {
            masks = Some(
                rng.as_mut()
                    .and_then(|rng| dropout_mask_values(net_cfg, count, rng)),
            );
            return None;
        }
        let (batch, nonzeros) = match &mut gather {
            Gather::Sparse(sparse) => {
                let all = sparse.as_mut()?.add_rows(GATHER_PIECE_ROWS);
                if !all {
                    return None;
                }
                match sparse.take()?.finish() {
                    Gathered::Nonzeros(nonzeros) => (None, Some(nonzeros)),
                    Gathered::Dense(batch) => (Some(batch), None),
                }
            }
            Gather::Dense {
                gather,
                gathered,
                nonzeros,
                next,
            } => {
                let Some(batch) = gathered else {
                    *gathered = gather();
                    return None;
                };
                let end = (*next + GATHER_PIECE_ROWS).min(count);
                if let Some(builder) = nonzeros {
                    builder.add_rows(&batch[*next * d..end * d]);
                }
                *next = end;
                if *next < count {
                    return None;
                }
                (
                    Some(gathered.take().unwrap_or_default()),
                    nonzeros.take().and_then(SparseRowsBuilder::finish),
                )
            }
        };
        Some(PreparedBatch {
            batch,
            nonzeros,
            masks: masks.take().flatten(),
            rng: rng.take().expect("the last piece runs once"),
        })
    }
}

fn column_means(x: &[f32], d: usize) -> Vec<f32> {
    let n = (x.len() / d).max(1) as f64;
    let mut sums = vec![0f64; d];
    for row in x.chunks_exact(d) {
        for (s, &v) in sums.iter_mut().zip(row) {
            *s += f64::from(v);
        }
    }
    sums.into_iter().map(|s| (s / n) as f32).collect()
}

/// Mixture parameters from every training row (evaluation mode, no dropout) rather than the
/// last batch, so the scoring GMM does not depend on which rows happened to come last.
fn whole_set_gmm(
    net: &DagmmNet,
    x: &[f32],
    n: usize,
    d: usize,
    cov_reg: f64,
) -> Result<GmmParams, ModelError> {
    let device = Device::flex();
    // The network runs over slices of rows: its activations for the whole set would be
    // allocated afresh from the kernel, page by page (hundreds of MB on KDDCUP99), while a
    // slice's are reused from the allocator. Only z and γ are kept for the statistics.
    let (mut zs, mut gammas) = (Vec::new(), Vec::new());
    for start in (0..n).step_by(WHOLE_SET_ROWS_PER_PASS) {
        let rows = WHOLE_SET_ROWS_PER_PASS.min(n - start);
        let slice = x[start * d..(start + rows) * d].to_vec();
        let out = net.forward(
            Tensor::<2>::from_data(TensorData::new(slice, [rows, d]), &device),
            None,
        );
        zs.push(out.z);
        gammas.push(out.gamma);
    }
    let stats = gmm_stats(Tensor::cat(zs, 0), Tensor::cat(gammas, 0));
    GmmParams::from_tensors(&stats, cov_reg)
}

/// Rows per forward pass when the mixture is estimated over the whole training set.
const WHOLE_SET_ROWS_PER_PASS: usize = 8192;

/// Inverted-dropout masks (0 or 1/(1−p)) for each estimation hidden layer, `rows` × its
/// width, from our own RNG; `None` without dropout.
fn dropout_mask_values(
    cfg: &NetworkConfig,
    rows: usize,
    rng: &mut ChaCha8Rng,
) -> Option<Vec<Vec<f32>>> {
    if cfg.dropout <= 0.0 {
        return None;
    }
    let keep = 1.0 - cfg.dropout;
    let scale = (1.0 / keep) as f32;
    Some(
        cfg.estimation_hidden
            .iter()
            .map(|&h| keep_mask(keep, scale, rows * h, rng))
            .collect(),
    )
}

/// `len` dropout decisions, each kept with probability `keep`, as `scale` (kept) or 0. Each
/// decision is one u16 of the stream below 2¹⁶·keep: a quarter of the generator work of
/// `random_bool`'s u64 per unit (those draws took 8 % of a 4-metric fit), with `keep` resolved
/// to 1/65,536.
fn keep_mask(keep: f64, scale: f32, len: usize, rng: &mut ChaCha8Rng) -> Vec<f32> {
    let cut = (keep * 65_536.0).round() as u32;
    let mut draws = vec![0u16; len];
    rng.fill(&mut draws[..]);
    // A multiply, not a branch: the outcomes are random, so a branch mispredicts half the time
    // (that cost more than drawing the numbers).
    draws
        .into_iter()
        .map(|v| scale * f32::from(u8::from(u32::from(v) < cut)))
        .collect()
}

/// Energies of scaled rows computed entirely with burn (network and mixture on tensors), from
/// a fitted model's parameters, `rows_per_call` rows per forward pass: the reference the plain
/// scorer is held to. (burn's matmul kernel, and so the last bit of z, depends on the batch
/// size; one row per call follows the plain scorer's accumulation order.)
pub fn burn_energies(model: &DagmmModel, x: &[f32], rows_per_call: usize) -> Vec<f64> {
    let device = Device::flex();
    let d = model.network.input_dim;
    let net = DagmmNet::from_weights(&model.weights, &device);
    x.chunks(rows_per_call.max(1) * d)
        .flat_map(|chunk| burn_energies_with(&net, model, chunk, &device))
        .collect()
}

fn burn_energies_with(net: &DagmmNet, model: &DagmmModel, x: &[f32], device: &Device) -> Vec<f64> {
    let device = device.clone();
    let d = model.network.input_dim;
    let n = x.len() / d;
    let out = net.forward(
        Tensor::<2>::from_data(TensorData::new(x.to_vec(), [n, d]), &device),
        None,
    );
    use burn::tensor::DType::F64;
    let g = &model.gmm;
    // The mixture maths runs in f64 (flex picks the element type at run time): in f32 the
    // Cholesky of a nearly singular covariance alone moves energies by ~1e-4.
    let flat = |v: &[Vec<f64>]| v.iter().flatten().copied().collect::<Vec<f64>>();
    let tensors = crate::gmm::GmmTensors {
        phi: Tensor::<1>::from_data(TensorData::new(g.phi.clone(), [g.k]), &device).cast(F64),
        mu: Tensor::<2>::from_data(TensorData::new(flat(&g.mu), [g.k, g.d]), &device).cast(F64),
        cov: Tensor::<3>::from_data(TensorData::new(flat(&g.cov), [g.k, g.d, g.d]), &device)
            .cast(F64),
    };
    let z = out.z.cast(F64);
    let (e, _) = energy(z, &tensors, g.cov_reg);
    e.into_data().try_into_vec::<f64>().expect("energy is f64")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_gathered_in_pieces_come_in_the_order_asked() {
        let d = 3;
        let x: Vec<f32> = (0..500 * d).map(|v| v as f32).collect();
        // More than two pieces, the last one short, rows repeated and out of order.
        let rows: Vec<usize> = (0..150).map(|i| (i * 37) % 500).chain([7, 7]).collect();
        let mut pieces = rows_gathered(&x, d, rows.clone());
        let mut calls = 1;
        let gathered = loop {
            match pieces() {
                Some(gathered) => break gathered,
                None => calls += 1,
            }
        };
        assert_eq!(calls, rows.len().div_ceil(GATHER_PIECE_ROWS));
        let expected: Vec<f32> = rows
            .iter()
            .flat_map(|&r| x[r * d..(r + 1) * d].iter().copied())
            .collect();
        assert_eq!(gathered, expected);
        let _lent = helper_threads::lend_unpinned(1);
        let in_background = helper_threads::background(rows_gathered(&x, d, rows));
        assert_eq!(in_background.finish(), expected);
    }
    use crate::preprocess::FeatureSpec;
    use rand_distr::{Distribution, Normal};

    #[test]
    fn a_batch_prepared_in_the_background_is_the_batch_its_nonzeros_and_its_masks() {
        let d = 20;
        // A tenth of the entries set, so the first layer keeps them sparse.
        let x: Vec<f32> = (0..400 * d)
            .map(|v| if v % 10 == 3 { v as f32 * 0.01 } else { 0.0 })
            .collect();
        let rows: Vec<usize> = (0..150).map(|i| (i * 37) % 400).collect();
        let cfg = NetworkConfig {
            dropout: 0.5,
            input_dim: d,
            ..NetworkConfig::metrics4()
        };
        let expected: Vec<f32> = rows
            .iter()
            .flat_map(|&r| x[r * d..(r + 1) * d].iter().copied())
            .collect();
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let masks = dropout_mask_values(&cfg, rows.len(), &mut rng).expect("dropout");
        let next_draw: u64 = rng.random();
        let x_sparse = SparseRows::to_gather_from(&x, d);
        assert!(x_sparse.is_some(), "kept sparse");
        for (helpers, from_sparse) in [(0, false), (1, false), (0, true), (1, true)] {
            let _lent = (helpers > 0).then(|| helper_threads::lend_unpinned(helpers));
            let rng = ChaCha8Rng::seed_from_u64(3);
            let source = x_sparse.as_ref().filter(|_| from_sparse);
            let pieces = batch_prepared(&x, source, d, rows.clone(), &cfg, rng);
            let mut prepared = helper_threads::background(pieces).finish();
            // From the whole set's nonzeros, the batch comes as its nonzeros alone.
            let batch = (!from_sparse).then(|| expected.clone());
            assert_eq!(prepared.batch, batch);
            assert_eq!(prepared.nonzeros, SparseRows::compress(&expected, d));
            assert!(prepared.nonzeros.is_some(), "sparse enough");
            assert_eq!(prepared.masks.as_ref(), Some(&masks));
            // The generator comes back where the masks left it.
            assert_eq!(prepared.rng.random::<u64>(), next_draw);
        }
    }

    #[test]
    fn keep_masks_keep_the_asked_share_and_follow_the_seed() {
        for (keep, len) in [(0.5, 200_000), (0.8, 200_000), (0.1, 200_000), (0.999, 64)] {
            let mut rng = ChaCha8Rng::seed_from_u64(7);
            let mask = keep_mask(keep, 2.0, len, &mut rng);
            assert_eq!(mask.len(), len);
            assert!(mask.iter().all(|&m| m == 0.0 || m == 2.0));
            let kept = mask.iter().filter(|&&m| m == 2.0).count() as f64 / len as f64;
            // Five standard errors of a binomial share.
            let bound = 5.0 * (keep * (1.0 - keep) / len as f64).sqrt() + 1.0 / 65_536.0;
            assert!((kept - keep).abs() <= bound, "keep {keep}: kept {kept}");
            let again = keep_mask(keep, 2.0, len, &mut ChaCha8Rng::seed_from_u64(7));
            assert_eq!(mask, again, "same seed, same mask");
        }
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        assert!(
            keep_mask(1.0, 1.0, 1000, &mut rng)
                .iter()
                .all(|&m| m == 1.0)
        );
        assert!(
            keep_mask(0.0, 1.0, 1000, &mut rng)
                .iter()
                .all(|&m| m == 0.0)
        );
    }

    fn blob_rows(n: usize, seed: u64) -> Vec<f64> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let noise = Normal::new(0.0, 1.0).unwrap();
        let mut rows = Vec::with_capacity(n * 4);
        for _ in 0..n {
            let load: f64 = rng.random_range(0.0..1.0);
            rows.push(20.0 + 50.0 * load + 2.0 * noise.sample(&mut rng));
            rows.push(40.0 + 5.0 * noise.sample(&mut rng));
            rows.push(5.0 + 10.0 * load + noise.sample(&mut rng).abs());
            rows.push(1e4 * (1.0 + 20.0 * load) * (1.0 + 0.05 * noise.sample(&mut rng)));
        }
        rows
    }

    fn quick(epochs: usize, seed: u64) -> TrainConfig {
        TrainConfig {
            epochs,
            batch_size: 128,
            seed,
            ..TrainConfig::default()
        }
    }

    fn fit_rows(rows: &[f64], cfg: &TrainConfig) -> FitOutput {
        let pre = Preprocessor::fit(FeatureSpec::server_metrics(), rows).unwrap();
        fit(&NetworkConfig::metrics4(), cfg, pre, rows, &mut |_| {}).unwrap()
    }

    #[test]
    fn same_seed_same_data_gives_bit_identical_model() {
        let rows = blob_rows(300, 1);
        let a = fit_rows(&rows, &quick(20, 7));
        let b = fit_rows(&rows, &quick(20, 7));
        assert_eq!(a.model, b.model);
        assert_eq!(a.history, b.history);
        // One time per epoch, each inside the fit's own.
        assert_eq!(a.epoch_seconds.len(), 20);
        assert!(a.epoch_seconds.iter().all(|&s| s > 0.0));
        assert!(a.epoch_seconds.iter().sum::<f64>() <= a.seconds);
        let c = fit_rows(&rows, &quick(20, 8));
        assert_ne!(a.model.weights, c.model.weights);
    }

    #[test]
    fn cores_are_shared_out_between_fits_up_to_the_cap() {
        let in_pool = |threads: usize, fits: usize| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap()
                .install(|| cores_per_fit(fits))
        };
        assert_eq!(in_pool(1, 1), 1);
        assert_eq!(in_pool(2, 1), 2);
        assert_eq!(in_pool(2, 2), 1);
        assert_eq!(in_pool(2, 0), 2);
        assert_eq!(in_pool(3, 2), 1);
        assert_eq!(in_pool(8, 3), 2);
        assert_eq!(in_pool(8, 1), MAX_CORES_PER_FIT);
    }

    #[test]
    fn a_fit_on_two_cores_is_the_fit_on_one_bit_for_bit() {
        let _one_at_a_time = crate::testing::PINNING.lock();
        // Wide enough layers (1024 × 12 × 96 multiply-adds) that the products are split over
        // the second core wherever two CPUs can be pinned; and a mostly-zero input (64
        // features, a tenth of them set) whose first layer goes through its nonzeros, with
        // the batch gather and the reconstruction rows split too.
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        let dense: Vec<f64> = (0..1100 * 12).map(|_| rng.random_range(0.0..1.0)).collect();
        let sparse: Vec<f64> = (0..1100 * 64)
            .map(|_| {
                if rng.random_bool(0.1) {
                    rng.random_range(0.1..1.0)
                } else {
                    0.0
                }
            })
            .collect();
        // Scaled into [0, 1] rather than the default [1, 2], so that zeros stay zeros.
        for (d, rows, offset) in [(12, dense, 1.0), (64, sparse, 0.0)] {
            let names: Vec<String> = (0..d).map(|i| format!("f{i}")).collect();
            let net = NetworkConfig {
                input_dim: d,
                hidden: vec![96, 48],
                latent_dim: 1,
                estimation_hidden: vec![10],
                gmm_k: 2,
                dropout: 0.5,
            };
            let cfg = TrainConfig {
                epochs: 3,
                batch_size: 1024,
                seed: 1,
                ..TrainConfig::default()
            };
            let fit_on = |cores| {
                let mut pre = Preprocessor::fit(FeatureSpec::plain(&names), &rows).unwrap();
                pre.offset = offset;
                fit_on_cores(&net, &cfg, pre, &rows, cores, &mut |_| {}).unwrap()
            };
            let (one, two) = (fit_on(1), fit_on(2));
            assert_eq!(one.model, two.model, "{d} features");
            assert_eq!(one.history, two.history, "{d} features");
            assert_eq!(one.train_energies, two.train_energies, "{d} features");
        }
    }

    #[test]
    fn plain_scorer_reproduces_burn_energies() {
        let rows = blob_rows(600, 2);
        let out = fit_rows(&rows, &quick(40, 3));
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        // Real (training) samples plus random ones, many well outside the training range.
        let mut x = out.model.preprocessor.scale_rows(&rows);
        x.extend((0..2400 * 4).map(|_| rng.random_range(0.5f32..2.5)));
        let n = x.len() / 4;
        let scorer = Scorer::new(&out.model);
        let plain = scorer.energies_scaled(&x);

        // 1. The networks agree (the mixture maths is checked on identical codes below): burn's z and the plain z differ at most in the last f32 bits.
        let device = Device::flex();
        let net = DagmmNet::from_weights(&out.model.weights, &device);
        let z_burn = net
            .forward(
                Tensor::<2>::from_data(TensorData::new(x.clone(), [n, 4]), &device),
                None,
            )
            .z
            .into_data()
            .try_into_vec::<f32>()
            .unwrap();
        let mut scratch = scorer.new_scratch();
        for (i, row) in x.chunks_exact(4).enumerate() {
            let z_plain = scorer.code(row, &mut scratch);
            for j in 0..3 {
                let (a, b) = (z_plain[j], f64::from(z_burn[i * 3 + j]));
                assert!(
                    (a - b).abs() <= 1e-6 * b.abs().max(1.0),
                    "row {i} z[{j}]: {a} vs {b}"
                );
            }
        }

        // 2. End to end against burn (network in f32, mixture in f64, one row per call).
        let reference = burn_energies(&out.model, &x, 1);
        let errors: Vec<f64> = plain
            .iter()
            .zip(&reference)
            .map(|(p, r)| (p - r).abs() / r.abs().max(1.0))
            .collect();
        // Both compute tanh to the same bits, but burn's matrix products may sum in another
        // order, so activations may differ in the last bit. On samples like the training data
        // that moves energies by well under 1e-5; far outside the training range, near-singular
        // covariances amplify it, which the looser bounds below allow for.
        let n_train = rows.len() / 4;
        let train_worst = errors[..n_train].iter().copied().fold(0.0, f64::max);
        let within = errors.iter().filter(|&&e| e <= 1e-5).count() as f64 / n as f64;
        let worst = errors.iter().copied().fold(0.0, f64::max);
        eprintln!(
            "{n_train} training samples: worst relative error {train_worst:.2e}; \
             all {n}: {:.2} % within 1e-5, worst {worst:.2e}",
            100.0 * within
        );
        assert!(
            train_worst <= 1e-5,
            "training samples differ from burn by up to {train_worst}"
        );
        assert!(
            within >= 0.97,
            "only {:.2} % of energies within 1e-5 of burn's",
            100.0 * within
        );
        assert!(worst <= 1e-4, "worst relative error against burn {worst}");
    }

    #[test]
    fn rows_scored_in_lanes_get_exactly_their_one_row_numbers() {
        use crate::explain::Explainer;
        use crate::scorer::{Isa, LANES, Scorer};
        let rows = blob_rows(300, 4);
        let out = fit_rows(&rows, &quick(20, 5));
        let explainer = Explainer::new(out.model.clone());
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        // Training rows, then 205 random ones (many far outside the training range), so the
        // last block is partly padding.
        let mut raws: Vec<Vec<f64>> = rows.chunks_exact(4).map(<[f64]>::to_vec).collect();
        raws.extend((0..205).map(|_| {
            vec![
                rng.random_range(0.0..100.0),
                rng.random_range(0.0..100.0),
                rng.random_range(0.0..100.0),
                rng.random_range(0.0..1e7),
            ]
        }));
        let (mut one_s, mut many_s) = (
            explainer.scorer().new_scratch(),
            explainer.scorer().new_scratch(),
        );
        let mut flagged = 0;
        for block in raws.chunks(LANES) {
            let refs: Vec<&[f64]> = block.iter().map(Vec::as_slice).collect();
            let many = explainer.assess_lanes::<LANES>(&refs, &mut many_s);
            for (r, raw) in block.iter().enumerate() {
                let one = explainer.assess(raw, &mut one_s);
                assert_eq!(
                    one.energy.to_bits(),
                    many[r].energy.to_bits(),
                    "row {raw:?}"
                );
                assert_eq!(one, many[r]);
                assert_eq!(one_s.shares, many_s.shares[r * 4..(r + 1) * 4]);
                assert_eq!(one_s.expected, many_s.expected[r * 4..(r + 1) * 4]);
                assert_eq!(
                    explainer.energy(raw, &mut one_s).to_bits(),
                    one.energy.to_bits()
                );
                flagged += usize::from(one.anomaly);
            }
        }
        // The random rows must reach the explanation's interesting cases, not only normal ones.
        assert!(flagged > 50, "{flagged} rows flagged");
        let refs: Vec<&[f64]> = raws.iter().map(Vec::as_slice).collect();
        for n in [1, 2, 3, 8, 11, refs.len()] {
            let rows = &refs[refs.len() - n..];
            let verdicts = explainer.verdicts(rows, &mut many_s);
            assert_eq!(verdicts.len(), n);
            for (raw, v) in rows.iter().zip(&verdicts) {
                assert_eq!(*v, explainer.verdict(raw, &mut one_s));
            }
        }
        let x = out.model.preprocessor.scale_rows(&rows);
        let blocked = explainer.scorer().energies_scaled(&x);
        for (row, e) in x.chunks_exact(4).zip(&blocked) {
            assert_eq!(
                explainer.scorer().energy_scaled(row, &mut one_s).to_bits(),
                e.to_bits()
            );
        }
        // Every instruction set this CPU has gives those bits too, whatever the lane count.
        fn energies_on<const L: usize>(scorer: &Scorer, isa: Isa, x: &[f32]) -> Vec<f64> {
            let mut s = scorer.new_scratch();
            let mut energies = Vec::new();
            for rows in x.chunks(4 * L) {
                let mut block = vec![0f32; 4 * L];
                for (r, row) in rows.chunks_exact(4).enumerate() {
                    for (j, &v) in row.iter().enumerate() {
                        block[j * L + r] = v;
                    }
                }
                let used = rows.len() / 4;
                energies.extend_from_slice(
                    &scorer.energies_lanes_on::<L>(isa, &block, used, &mut s)[..used],
                );
            }
            energies
        }
        let bits = |v: &[f64]| v.iter().map(|e| e.to_bits()).collect::<Vec<_>>();
        for isa in Isa::available() {
            let scorer = explainer.scorer();
            let by_lanes = [
                (1, energies_on::<1>(scorer, isa, &x)),
                (8, energies_on::<8>(scorer, isa, &x)),
                (16, energies_on::<16>(scorer, isa, &x)),
            ];
            for (lanes, energies) in by_lanes {
                assert_eq!(bits(&energies), bits(&blocked), "{isa:?}, {lanes} lanes");
            }
        }
    }

    #[test]
    fn mixture_energy_matches_burn_on_identical_codes() {
        let rows = blob_rows(300, 6);
        let out = fit_rows(&rows, &quick(20, 4));
        let x = out.model.preprocessor.scale_rows(&rows);
        let device = Device::flex();
        let net = DagmmNet::from_weights(&out.model.weights, &device);
        let burn = burn_energies(&out.model, &x, x.len());
        let z = net
            .forward(
                Tensor::<2>::from_data(TensorData::new(x.clone(), [300, 4]), &device),
                None,
            )
            .z;
        let z: Vec<f32> = z.into_data().try_into_vec::<f32>().unwrap();
        for (i, e) in burn.iter().enumerate() {
            let codes: Vec<f64> = z[i * 3..i * 3 + 3].iter().map(|&v| f64::from(v)).collect();
            let plain = out.model.gmm.energy(&codes);
            assert!(
                (plain - e).abs() <= 1e-9 * e.abs().max(1.0),
                "row {i}: {plain} vs {e}"
            );
        }
    }

    #[test]
    fn degenerate_data_trains_without_nan() {
        let mut constant_column = blob_rows(200, 4);
        constant_column
            .chunks_exact_mut(4)
            .for_each(|r| r[1] = 55.0);
        let duplicated: Vec<f64> = (0..200).flat_map(|_| [30.0, 40.0, 5.0, 1e5]).collect();
        let ten_rows = blob_rows(10, 5);
        for rows in [constant_column, duplicated, ten_rows] {
            let out = fit_rows(&rows, &quick(30, 1));
            assert!(out.train_energies.iter().all(|e| e.is_finite()));
            assert!(out.history.iter().all(|l| l.total.is_finite()));
            assert!(out.model.thresholds.cutoff.is_finite());
            out.model.validate().unwrap();
        }
    }

    #[test]
    fn too_few_rows_and_bad_shapes_are_errors() {
        let pre = Preprocessor::fit(FeatureSpec::server_metrics(), &[1.0, 2.0, 3.0, 4.0]).unwrap();
        let err = fit(
            &NetworkConfig::metrics4(),
            &quick(1, 0),
            pre.clone(),
            &[1.0, 2.0, 3.0, 4.0],
            &mut |_| {},
        );
        assert!(err.unwrap_err().to_string().contains("at least"));
        let bad_k = NetworkConfig {
            gmm_k: 0,
            ..NetworkConfig::metrics4()
        };
        let err = fit(&bad_k, &quick(1, 0), pre, &blob_rows(10, 0), &mut |_| {});
        assert!(err.unwrap_err().to_string().contains("gmm_k"));
    }
}
