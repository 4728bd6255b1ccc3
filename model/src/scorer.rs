//! A plain-Rust forward pass and energy, with no burn in the loop: what serving and batch
//! scoring use. It follows the burn graph operation by operation (f32 networks, f64 mixture),
//! and a test holds it to burn's energies. The energies behind an explanation's f32 shares
//! come from the same mixture evaluated in f32.
//!
//! Rows go through the networks side by side, one per SIMD lane (`[f32; L]` per feature):
//! batch scoring runs `L = LANES` rows per pass, a single request runs `L = 1`. Lanes never
//! mix, and each lane performs exactly the operations of a one-row pass in the same order, so a
//! row's energy does not depend on which rows it was scored with.

use crate::DagmmModel;
use crate::config::MAX_Z_DIM;
use crate::fastmath::LaneFloat;
use crate::gmm::LaneMixture;
use crate::network::{LayerWeights, NORM_EPS, tanh_f32};

/// Rows scored together in a block: sixteen f32 lanes fill an AVX-512 register or two AVX2
/// ones. On this project's benchmark machine sixteen gave 1.5× the verdicts per second of eight.
pub const LANES: usize = 16;

/// Scores samples with a fitted model's weights. Cheap to share between threads.
#[derive(Debug, Clone)]
pub struct Scorer {
    encoder: Vec<LayerWeights>,
    decoder: Vec<LayerWeights>,
    estimation: Vec<LayerWeights>,
    /// The mixture for reported energies.
    mixture: LaneMixture<f64>,
    /// The same mixture in f32, for the energy drops that explain a verdict.
    mixture_f32: LaneMixture<f32>,
    input_dim: usize,
    latent_dim: usize,
}

/// Reusable buffers for one thread's scoring, so the hot loop never allocates. Lane buffers
/// hold `[f32; L]` per feature, flattened.
#[derive(Debug, Default, Clone)]
pub struct Scratch {
    a: Vec<f32>,
    b: Vec<f32>,
    x_hat: Vec<f32>,
    z: Vec<f32>,
    /// Scaled inputs and counterfactuals in lanes, for `Explainer::assess_lanes`.
    pub(crate) lanes_x: Vec<f32>,
    pub(crate) lanes_counterfactual: Vec<f32>,
    pub(crate) lanes_expected: Vec<f32>,
    /// Reconstructions and per-metric shares, row-major (`rows × features`), as left by
    /// `Explainer::assess` and `Explainer::assess_lanes`.
    pub expected: Vec<f32>,
    pub shares: Vec<f64>,
}

/// View a flat lane buffer as one `[f32; L]` per feature.
#[inline(always)]
fn lanes<const L: usize>(v: &[f32]) -> &[[f32; L]] {
    v.as_chunks::<L>().0
}

#[inline(always)]
fn lanes_mut<const L: usize>(v: &mut [f32]) -> &mut [[f32; L]] {
    v.as_chunks_mut::<L>().0
}

/// Outputs `o0..o0 + G` of y = x W + b, accumulated like burn's matmul (fused multiply-adds from
/// zero over the inputs in order, bias added last) so both round the same way. The G × L
/// accumulators stay in registers; G independent chains hide the FMA latency.
#[inline(always)]
fn linear_group<const L: usize, const G: usize>(
    layer: &LayerWeights,
    input: &[[f32; L]],
    output: &mut [[f32; L]],
    o0: usize,
) {
    let d_out = layer.d_output;
    let mut acc = [[0f32; L]; G];
    for (i, xi) in input.iter().enumerate() {
        let w: &[f32; G] = layer.weight[i * d_out + o0..i * d_out + o0 + G]
            .try_into()
            .expect("G weights");
        for (acc_g, &wg) in acc.iter_mut().zip(w) {
            for (a, &x) in acc_g.iter_mut().zip(xi) {
                *a = x.mul_add(wg, *a);
            }
        }
    }
    for (g, acc_g) in acc.iter().enumerate() {
        let b = layer.bias[o0 + g];
        for (y, &a) in output[o0 + g].iter_mut().zip(acc_g) {
            *y = a + b;
        }
    }
}

/// y = x W + b for a `[d_input, d_output]` row-major W, on L rows at once.
#[inline(always)]
fn linear<const L: usize>(layer: &LayerWeights, input: &[[f32; L]], output: &mut Vec<f32>) {
    let d_out = layer.d_output;
    // Every element is written below, so only a change of size needs filling.
    output.resize(d_out * L, 0.0);
    let out = lanes_mut::<L>(output);
    let mut o0 = 0;
    // About 64 accumulator floats at once: eight outputs for eight lanes, four for sixteen.
    if L <= 8 {
        while o0 + 8 <= d_out {
            linear_group::<L, 8>(layer, input, out, o0);
            o0 += 8;
        }
    }
    if L <= 16 {
        while o0 + 4 <= d_out {
            linear_group::<L, 4>(layer, input, out, o0);
            o0 += 4;
        }
    }
    while o0 + 2 <= d_out {
        linear_group::<L, 2>(layer, input, out, o0);
        o0 += 2;
    }
    while o0 < d_out {
        linear_group::<L, 1>(layer, input, out, o0);
        o0 += 1;
    }
}

/// Run an MLP (tanh between layers, linear output) on L rows; the result is left in `a`.
#[inline(always)]
fn mlp_body<const L: usize>(
    layers: &[LayerWeights],
    input: &[f32],
    a: &mut Vec<f32>,
    b: &mut Vec<f32>,
) {
    a.clear();
    a.extend_from_slice(input);
    let last = layers.len() - 1;
    for (i, layer) in layers.iter().enumerate() {
        linear::<L>(layer, lanes::<L>(a), b);
        if i < last {
            b.iter_mut().for_each(|v| *v = tanh_f32(*v));
        }
        std::mem::swap(a, b);
    }
}

/// Adds one value x of a row and its reconstruction x' to the row's sums ‖x‖², ‖x − x'‖²,
/// ‖x'‖² and x·x'.
#[inline(always)]
pub(crate) fn add_to_sums(x: f32, x_hat: f32, [xx, dd, hh, xh]: [&mut f32; 4]) {
    *xx += x * x;
    *dd += (x - x_hat) * (x - x_hat);
    *hh += x_hat * x_hat;
    *xh += x * x_hat;
}

/// The relative distance ‖x − x'‖ / ‖x‖ and the cosine similarity from a row's sums
/// ‖x‖², ‖x − x'‖², ‖x'‖² and x·x' (each summed in f32 over the row in order). Training's
/// reconstruction step calls it too, so both give the same bits for the same x'.
#[inline(always)]
pub(crate) fn features_from_sums(xx: f32, dd: f32, hh: f32, xh: f32) -> (f32, f32) {
    let x_norm = (xx + NORM_EPS).sqrt();
    (
        (dd + NORM_EPS).sqrt() / x_norm,
        xh / (x_norm * (hh + NORM_EPS).sqrt()),
    )
}

/// Encoder, decoder and the reconstruction features of L rows: z = [z_c, relative distance,
/// cosine] into `z`, x' into `x_hat` (both in lanes).
#[inline(always)]
fn code_body<const L: usize>(scorer: &Scorer, x: &[f32], s: &mut Scratch) {
    mlp_body::<L>(&scorer.encoder, x, &mut s.a, &mut s.b);
    s.z.clear();
    s.z.extend_from_slice(&s.a);
    mlp_body::<L>(&scorer.decoder, &s.z, &mut s.a, &mut s.b);
    s.x_hat.clear();
    s.x_hat.extend_from_slice(&s.a);
    let (mut xx, mut dd, mut hh, mut xh) = ([0f32; L], [0f32; L], [0f32; L], [0f32; L]);
    for (xi, hi) in lanes::<L>(x).iter().zip(lanes::<L>(&s.x_hat)) {
        for r in 0..L {
            add_to_sums(
                xi[r],
                hi[r],
                [&mut xx[r], &mut dd[r], &mut hh[r], &mut xh[r]],
            );
        }
    }
    let (mut distance, mut cosine) = ([0f32; L], [0f32; L]);
    for r in 0..L {
        (distance[r], cosine[r]) = features_from_sums(xx[r], dd[r], hh[r], xh[r]);
    }
    s.z.extend_from_slice(&distance);
    s.z.extend_from_slice(&cosine);
}

/// The same code compiled for [`Isa::Avx2`] and [`Isa::Avx512`]; the caller checks the CPU.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "fma,avx2")]
fn code_fma<const L: usize>(scorer: &Scorer, x: &[f32], s: &mut Scratch) {
    code_body::<L>(scorer, x, s)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "fma,avx2")]
fn mlp_fma<const L: usize>(
    layers: &[LayerWeights],
    input: &[f32],
    a: &mut Vec<f32>,
    b: &mut Vec<f32>,
) {
    mlp_body::<L>(layers, input, a, b)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "fma,avx2")]
fn mixture_fma<T: LaneFloat, const L: usize>(mixture: &LaneMixture<T>, code: &[[T; L]]) -> [T; L] {
    mixture.energies::<L>(code)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma,avx2")]
fn code_avx512<const L: usize>(scorer: &Scorer, x: &[f32], s: &mut Scratch) {
    code_body::<L>(scorer, x, s)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma,avx2")]
fn mixture_avx512<T: LaneFloat, const L: usize>(
    mixture: &LaneMixture<T>,
    code: &[[T; L]],
) -> [T; L] {
    mixture.energies::<L>(code)
}

/// [`LaneMixture::energies`] compiled for `isa`; training's energy step calls it too, so the
/// energies training optimises are the ones the scorer reports.
pub(crate) fn mixture_energies<T: LaneFloat, const L: usize>(
    isa: Isa,
    mixture: &LaneMixture<T>,
    code: &[[T; L]],
) -> [T; L] {
    assert!(isa.supported(), "{isa:?} is not supported by this CPU");
    match isa {
        // SAFETY: the CPU has the features each variant needs, asserted just above.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { mixture_avx512::<T, L>(mixture, code) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { mixture_fma::<T, L>(mixture, code) },
        _ => mixture.energies::<L>(code),
    }
}

/// The instruction sets a pass is compiled for. All give the same bits: each lane performs the
/// same IEEE operations (fused multiply-adds included) whichever registers hold it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Isa {
    Portable,
    /// AVX2 with hardware FMA (without it `mul_add` is a library call per element).
    Avx2,
    /// AVX-512F: 32 vector registers, sixteen f32 lanes in one.
    Avx512,
}

impl Isa {
    /// What this CPU runs for L lanes. AVX-512 pays from sixteen lanes on; below that the
    /// AVX2 code already fills its registers.
    #[inline]
    pub(crate) fn best(lanes: usize) -> Self {
        if lanes >= 16 && Isa::Avx512.supported() {
            Isa::Avx512
        } else if Isa::Avx2.supported() {
            Isa::Avx2
        } else {
            Isa::Portable
        }
    }

    /// Whether this CPU has the features (detection is cached by the standard library), and,
    /// in tests, no cap on this thread ([`Isa::capped`]) excludes it.
    #[inline]
    pub(crate) fn supported(self) -> bool {
        #[cfg(test)]
        if ISA_CAP.get().is_some_and(|cap| self > cap) {
            return false;
        }
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 =
                || std::is_x86_feature_detected!("fma") && std::is_x86_feature_detected!("avx2");
            match self {
                Isa::Portable => true,
                Isa::Avx2 => avx2(),
                Isa::Avx512 => avx2() && std::is_x86_feature_detected!("avx512f"),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            self == Isa::Portable
        }
    }

    /// Every instruction set this CPU supports.
    #[cfg(test)]
    pub(crate) fn available() -> Vec<Self> {
        [Isa::Portable, Isa::Avx2, Isa::Avx512]
            .into_iter()
            .filter(|isa| isa.supported())
            .collect()
    }

    /// `f` run with no instruction set above `self` taken on this thread: every pass that
    /// asks [`Isa::supported`] or [`Isa::best`] runs its copy for `self` or below.
    #[cfg(test)]
    pub(crate) fn capped<R>(self, f: impl FnOnce() -> R) -> R {
        struct Restore(Option<Isa>);
        impl Drop for Restore {
            fn drop(&mut self) {
                ISA_CAP.set(self.0);
            }
        }
        let _restore = Restore(ISA_CAP.replace(Some(self)));
        f()
    }
}

/// `on_isa!(isa, || body)`: the closure compiled for `isa` and run, where the CPU has it
/// (panics if not). For loops written once whose lanes do the same IEEE operations at every
/// width, so each copy gives the same bits. A macro, not a method: the copies are functions
/// made at each call site, and the closure is inlined into them (through a method taking it
/// as an argument it was not, and ran at the build's SSE2 baseline).
macro_rules! on_isa {
    ($isa:expr, $body:expr) => {{
        let isa: $crate::scorer::Isa = $isa;
        assert!(isa.supported(), "{isa:?} is not supported by this CPU");
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx512f,avx2,fma")]
            fn avx512<R>(body: impl FnOnce() -> R) -> R {
                body()
            }
            #[target_feature(enable = "avx2,fma")]
            fn avx2<R>(body: impl FnOnce() -> R) -> R {
                body()
            }
            match isa {
                // SAFETY (both): this CPU has the instruction set (asserted above).
                $crate::scorer::Isa::Avx512 => unsafe { avx512($body) },
                $crate::scorer::Isa::Avx2 => unsafe { avx2($body) },
                $crate::scorer::Isa::Portable => ($body)(),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            ($body)()
        }
    }};
}
pub(crate) use on_isa;

#[cfg(test)]
thread_local! {
    /// The highest instruction set this thread's passes may take ([`Isa::capped`]).
    static ISA_CAP: std::cell::Cell<Option<Isa>> = const { std::cell::Cell::new(None) };
}

impl Scorer {
    pub fn new(model: &DagmmModel) -> Self {
        Self {
            encoder: model.weights.encoder.clone(),
            decoder: model.weights.decoder.clone(),
            estimation: model.weights.estimation.clone(),
            mixture: LaneMixture::new(&model.gmm),
            mixture_f32: LaneMixture::new(&model.gmm),
            input_dim: model.network.input_dim,
            latent_dim: model.network.latent_dim,
        }
    }

    pub fn input_dim(&self) -> usize {
        self.input_dim
    }

    pub fn new_scratch(&self) -> Scratch {
        Scratch::default()
    }

    /// Codes and reconstructions of L scaled rows given in lanes (`input_dim × L`), left in the
    /// scratch.
    fn code_lanes<const L: usize>(&self, isa: Isa, x: &[f32], s: &mut Scratch) {
        assert!(isa.supported(), "{isa:?} is not supported by this CPU");
        match isa {
            // SAFETY: the CPU has the features each variant needs, asserted just above.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => unsafe { code_avx512::<L>(self, x, s) },
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { code_fma::<L>(self, x, s) },
            _ => code_body::<L>(self, x, s),
        }
    }

    /// Energies of the first `used` of L scaled rows given in lanes; the other lanes are
    /// padding and get 0. Their reconstructions are left in the scratch.
    pub(crate) fn energies_lanes<const L: usize>(
        &self,
        x: &[f32],
        used: usize,
        s: &mut Scratch,
    ) -> [f64; L] {
        self.energies_lanes_on::<L>(Isa::best(L), x, used, s)
    }

    /// [`Scorer::energies_lanes`] compiled for a given instruction set (one the CPU has).
    pub(crate) fn energies_lanes_on<const L: usize>(
        &self,
        isa: Isa,
        x: &[f32],
        used: usize,
        s: &mut Scratch,
    ) -> [f64; L] {
        self.code_lanes::<L>(isa, x, s);
        self.last_energies_on::<f64, L>(isa, &self.mixture, used, s)
    }

    /// [`Scorer::energies_lanes`] in f32: what the energy drops that explain a verdict are
    /// taken from.
    pub(crate) fn energies_f32_lanes<const L: usize>(
        &self,
        x: &[f32],
        used: usize,
        s: &mut Scratch,
    ) -> [f32; L] {
        let isa = Isa::best(L);
        self.code_lanes::<L>(isa, x, s);
        self.last_energies_on::<f32, L>(isa, &self.mixture_f32, used, s)
    }

    /// The energies of the last pass's codes, which are still in the scratch, in f32.
    pub(crate) fn last_energies_f32<const L: usize>(&self, used: usize, s: &Scratch) -> [f32; L] {
        self.last_energies_on::<f32, L>(Isa::best(L), &self.mixture_f32, used, s)
    }

    /// Mixture energies of the first `used` codes the last pass left in the scratch; the
    /// other lanes are padding and get 0.
    fn last_energies_on<T: LaneFloat, const L: usize>(
        &self,
        isa: Isa,
        mixture: &LaneMixture<T>,
        used: usize,
        s: &Scratch,
    ) -> [T; L] {
        let z_dim = self.latent_dim + 2;
        let mut code = [[T::ZERO; L]; MAX_Z_DIM];
        for (c, zj) in code.iter_mut().zip(lanes::<L>(&s.z)) {
            for r in 0..L {
                // Padding lanes get a copy of the first row, so they cannot produce NaN work.
                c[r] = T::from(zj[if r < used { r } else { 0 }]);
            }
        }
        let mut energies = mixture_energies::<T, L>(isa, mixture, &code[..z_dim]);
        energies[used..].fill(T::ZERO);
        energies
    }

    /// Reconstructions of the last pass, in lanes.
    pub(crate) fn reconstruction_lanes<'a>(&self, s: &'a Scratch) -> &'a [f32] {
        &s.x_hat
    }

    /// Code z = [z_c, relative distance, cosine] of one scaled sample; x' is left in the scratch.
    pub fn code(&self, x: &[f32], s: &mut Scratch) -> [f64; MAX_Z_DIM] {
        self.code_lanes::<1>(Isa::best(1), x, s);
        let mut z = [0f64; MAX_Z_DIM];
        for (zi, &v) in z.iter_mut().zip(&s.z) {
            *zi = f64::from(v);
        }
        z
    }

    /// The reconstruction x' of the last sample passed to [`Scorer::code`].
    pub fn reconstruction<'a>(&self, s: &'a Scratch) -> &'a [f32] {
        &s.x_hat
    }

    /// Energy of one scaled sample.
    pub fn energy_scaled(&self, x: &[f32], s: &mut Scratch) -> f64 {
        self.energies_lanes::<1>(x, 1, s)[0]
    }

    /// Soft mixture memberships γ of a code z (estimation network without dropout, softmax).
    pub fn memberships(&self, z: &[f64], s: &mut Scratch) -> Vec<f64> {
        let input: Vec<f32> = z[..self.latent_dim + 2].iter().map(|&v| v as f32).collect();
        match Isa::best(1) {
            // SAFETY: `Isa::best` found FMA and AVX2.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { mlp_fma::<1>(&self.estimation, &input, &mut s.a, &mut s.b) },
            _ => mlp_body::<1>(&self.estimation, &input, &mut s.a, &mut s.b),
        }
        let max = s.a.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let exps: Vec<f64> = s.a.iter().map(|&v| f64::from(v - max).exp()).collect();
        let total: f64 = exps.iter().sum();
        exps.into_iter().map(|e| e / total).collect()
    }

    /// Energies of row-major scaled samples, LANES rows per pass.
    pub fn energies_scaled(&self, x: &[f32]) -> Vec<f64> {
        let d = self.input_dim;
        let mut s = self.new_scratch();
        let mut block = vec![0f32; d * LANES];
        let mut energies = Vec::with_capacity(x.len() / d.max(1));
        for rows in x.chunks(d * LANES) {
            let used = rows.len() / d;
            block.fill(0.0);
            for (r, row) in rows.chunks_exact(d).enumerate() {
                for (j, &v) in row.iter().enumerate() {
                    block[j * LANES + r] = v;
                }
            }
            let e = self.energies_lanes::<LANES>(&block, used, &mut s);
            energies.extend_from_slice(&e[..used]);
        }
        energies
    }
}
