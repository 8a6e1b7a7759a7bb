//! Building blocks shared by the models: fully connected stacks with
//! covariate injection, and the Gaussian encoder head.
//!
//! Layers follow scvi-tools' `FCLayers` (Lopez et al. 2018): each hidden layer
//! is Linear → norm → ReLU → Dropout, and the covariate vector (one-hot
//! categories and continuous values) is concatenated to the input of the
//! first layer, and of every layer when `inject_all` is set
//! (`deeply_inject_covariates`).

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use tch::nn::{self, Module, ModuleT};
use tch::{Device, Kind, Tensor};

use crate::kernels::sparse;
pub use crate::kernels::sparse::{Deferred, GradBuffer, SparseInput};

/// Normalization after each hidden linear layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Norm {
    /// BatchNorm1d with momentum 0.01 and eps 1e-3 (scvi-tools' default).
    Batch,
    /// LayerNorm without affine parameters.
    Layer,
    None,
}

impl Norm {
    pub fn parse(s: &str) -> Option<Norm> {
        match s {
            "batch" => Some(Norm::Batch),
            "layer" => Some(Norm::Layer),
            "none" => Some(Norm::None),
            _ => None,
        }
    }
}

/// How a forward pass treats dropout and batch normalization.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    /// Dropout on, batch statistics in batch norm (training).
    Train,
    /// Dropout off, running statistics (inference).
    Eval,
    /// Dropout on, running statistics: Monte Carlo dropout (Gal and
    /// Ghahramani 2016), a draw from the approximate weight posterior.
    McDropout,
}

impl From<bool> for Pass {
    fn from(train: bool) -> Pass {
        if train {
            Pass::Train
        } else {
            Pass::Eval
        }
    }
}

/// A linear layer initialised like PyTorch's `nn.Linear`: weights and bias
/// uniform on ±1/√fan_in.
pub fn linear(p: nn::Path, n_in: usize, n_out: usize) -> nn::Linear {
    let bound = 1.0 / (n_in.max(1) as f64).sqrt();
    let init = nn::Init::Uniform { lo: -bound, up: bound };
    nn::linear(p, n_in as i64, n_out as i64, nn::LinearConfig { ws_init: init, bs_init: Some(init), bias: true })
}

/// Whether products on `device` may run in bf16 (f32 accumulation) at
/// speed: a CPU with native bf16 dot products (AVX512-BF16, which oneDNN
/// uses). Elsewhere libtorch's bf16 product is an emulation slower than
/// f32, so callers keep f32.
pub fn fast_bf16(device: tch::Device) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        device == tch::Device::Cpu && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = device;
        false
    }
}

/// Whether a model asked for mixed precision (`TrainConfig::bf16`) gets
/// it on `device`: only where [`fast_bf16`] holds.
pub fn bf16_on(asked: bool, device: tch::Device) -> bool {
    asked && fast_bf16(device)
}

/// Which weights a bf16 shadow was cast from: raised at the start of each
/// training run ([`new_weights_generation`]), so that a shadow never
/// outlives the run whose optimiser keeps it current.
static WEIGHTS_GENERATION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Marks every bf16 shadow stale: weights may have changed outside the
/// optimiser (a new training run, loaded or restored weights).
pub fn new_weights_generation() {
    WEIGHTS_GENERATION.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

/// A layer's switch for mixed precision: when set, its products run in
/// bf16 ([`linear_bf16`]) in training passes; inference passes stay in
/// f32. Set it only where [`fast_bf16`] holds: elsewhere bf16 is slower.
///
/// A layer that reads a bf16 input ([`Input::DenseBf16`]) also keeps a
/// bf16 shadow of its weight, cast once per training run and then
/// rewritten by the optimiser at each step (`kernels::adam`).
#[derive(Default)]
pub struct Bf16Switch {
    on: std::sync::atomic::AtomicBool,
    shadow: std::sync::Mutex<Option<(u64, Tensor)>>,
    grad: GradBuffer,
}

impl Bf16Switch {
    pub fn set(&self, on: bool) {
        self.on.store(on, std::sync::atomic::Ordering::Relaxed);
        *self.shadow.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Whether products of a `pass` run in bf16.
    pub fn active(&self, pass: Pass) -> bool {
        pass == Pass::Train && self.on.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// `l(x)`, in bf16 where [`Bf16Switch::active`].
    pub fn linear(&self, x: &Tensor, l: &nn::Linear, pass: Pass) -> Tensor {
        if self.active(pass) {
            linear_bf16(x, l)
        } else {
            l.forward(x)
        }
    }

    /// The bf16 shadow of `w`: the one kept for this training run, or a
    /// fresh cast.
    fn shadow(&self, w: &Tensor) -> Tensor {
        let generation = WEIGHTS_GENERATION.load(std::sync::atomic::Ordering::Relaxed);
        let mut kept = self.shadow.lock().unwrap_or_else(|e| e.into_inner());
        match &*kept {
            Some((g, t)) if *g == generation && t.size() == w.size() => t.shallow_clone(),
            _ => {
                let t = tch::no_grad(|| w.detach().to_kind(Kind::BFloat16).contiguous());
                *kept = Some((generation, t.shallow_clone()));
                t
            }
        }
    }
}

/// `x · Wᵀ + b` of layer `l` with both factors rounded to bf16 (products
/// accumulated in f32 by oneDNN, the result rounded to bf16 and returned
/// as f32). Under autograd the gradients' products run in bf16 too and
/// reach `x` and the f32 weight through the casts: mixed-precision
/// training as torch.autocast does it, the weights and the optimiser
/// staying in f32.
pub fn linear_bf16(x: &Tensor, l: &nn::Linear) -> Tensor {
    let y = x.to_kind(Kind::BFloat16).linear::<Tensor>(&l.ws.to_kind(Kind::BFloat16), None).to_kind(Kind::Float);
    match &l.bs {
        Some(b) => y + b,
        None => y,
    }
}

/// The linear map of a hidden layer: libtorch's layout (weight
/// [out, in]), or the weight stored transposed ([in, out], under the name
/// `weight_t`) so that the layer can read a sparse input (`sparse`).
enum Lin {
    Plain(nn::Linear),
    Transposed { wt: Tensor, bs: Tensor, grad: GradBuffer },
}

impl Lin {
    fn new(p: nn::Path, n_in: usize, n_out: usize, transposed: bool) -> Lin {
        if !transposed {
            return Lin::Plain(linear(p, n_in, n_out));
        }
        // The same draws as `linear`, in the same order (bias, then weight
        // as [out, in]), the weight then transposed.
        let bound = 1.0 / (n_in.max(1) as f64).sqrt();
        let init = nn::Init::Uniform { lo: -bound, up: bound };
        let bs = p.var("bias", &[n_out as i64], init);
        let drawn = nn::init(init, &[n_out as i64, n_in as i64], p.device()).tr().contiguous();
        Lin::Transposed { wt: p.var_copy("weight_t", &drawn), bs, grad: GradBuffer::default() }
    }

    fn weight(&self) -> &Tensor {
        match self {
            Lin::Plain(l) => &l.ws,
            Lin::Transposed { wt, .. } => wt,
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        match self {
            Lin::Plain(l) => l.forward(x),
            Lin::Transposed { wt, bs, .. } => x.matmul(wt) + bs,
        }
    }
}

enum NormLayer {
    Batch(nn::BatchNorm),
    Layer(nn::LayerNorm),
    None,
}

/// Shape of a fully connected stack.
#[derive(Debug, Clone, Copy)]
pub struct FcSpec {
    pub n_in: usize,
    pub n_hidden: usize,
    pub n_layers: usize,
    /// Width of the covariate vector (0 for none).
    pub n_cov: usize,
    pub dropout: f64,
    pub norm: Norm,
    pub inject_all: bool,
    /// Store the first layer's weight transposed (`weight_t`, [in, out]) so
    /// that the stack can read a sparse input (`Input::Sparse`).
    pub sparse_input: bool,
}

/// What a stack reads. `Sparse` holds the input with its covariates already
/// appended as one-hot columns; the tensor beside it is the covariate vector
/// for the deeper layers that inject it (`inject_all`).
#[derive(Clone, Copy)]
pub enum Input<'a> {
    Dense(&'a Tensor, Option<&'a Tensor>),
    Sparse(&'a std::rc::Rc<SparseInput>, Option<&'a Tensor>),
    /// A dense bf16 input with its covariates already appended (as
    /// `Sparse`), for training passes of a stack whose first product runs
    /// in bf16 ([`FcLayers::set_bf16_training`]): the product reads the
    /// weight's bf16 shadow and its gradient is deferred (see
    /// [`crate::kernels::sparse::linear_bf16_deferred`]). Elsewhere it is
    /// widened to f32 and read as a dense input.
    DenseBf16(&'a Tensor, Option<&'a Tensor>),
}

/// `n_layers` × [Linear → norm → ReLU → Dropout], covariates injected.
pub struct FcLayers {
    layers: Vec<(Lin, NormLayer, bool)>,
    dropout: f64,
    /// The first layer's product in bf16 while training (see
    /// [`FcLayers::set_bf16_training`]).
    bf16_first: Bf16Switch,
}

impl FcLayers {
    pub fn new(p: &nn::Path, s: FcSpec) -> FcLayers {
        FcLayers::with_widths(p, s, &vec![s.n_hidden; s.n_layers])
    }

    /// A stack whose hidden layers have the given widths (scSpecies'
    /// decoder is [200, 300]); `s.n_hidden` and `s.n_layers` are ignored.
    pub fn with_widths(p: &nn::Path, s: FcSpec, widths: &[usize]) -> FcLayers {
        let layers = widths
            .iter()
            .enumerate()
            .map(|(i, &width)| {
                let inject = s.n_cov > 0 && (i == 0 || s.inject_all);
                let n_in = if i == 0 { s.n_in } else { widths[i - 1] } + if inject { s.n_cov } else { 0 };
                let q = p / format!("layer{i}");
                let lin = Lin::new(&q / "linear", n_in, width, i == 0 && s.sparse_input);
                let norm = match s.norm {
                    Norm::Batch => NormLayer::Batch(nn::batch_norm1d(
                        &q / "norm",
                        width as i64,
                        nn::BatchNormConfig { momentum: 0.01, eps: 1e-3, ..Default::default() },
                    )),
                    Norm::Layer => NormLayer::Layer(nn::layer_norm(
                        &q / "norm",
                        vec![width as i64],
                        nn::LayerNormConfig { elementwise_affine: false, eps: 1e-5, ..Default::default() },
                    )),
                    Norm::None => NormLayer::None,
                };
                (lin, norm, inject)
            })
            .collect();
        FcLayers { layers, dropout: s.dropout, bf16_first: Default::default() }
    }

    /// Runs the first layer's product (the one that reads the genes, most
    /// of the stack's work) in bf16 in training passes ([`linear_bf16`]);
    /// inference stays in f32. For CPUs with native bf16
    /// ([`fast_bf16`]): elsewhere it is slower than f32.
    pub fn set_bf16_training(&self, on: bool) {
        self.bf16_first.set(on);
    }

    /// The weight matrices of the linear layers (for ridge penalties).
    pub fn weights(&self) -> Vec<&Tensor> {
        self.layers.iter().map(|l| l.0.weight()).collect()
    }

    /// Runs the stack; `cov` is `[batch, n_cov]` or None when `n_cov` is 0.
    pub fn forward(&self, x: &Tensor, cov: Option<&Tensor>, pass: impl Into<Pass>) -> Tensor {
        self.forward_input(Input::Dense(x, cov), pass, &mut Vec::new())
    }

    /// Runs the stack on `x`. A sparse input is multiplied by the transposed
    /// first layer on the CPU (densified elsewhere); when autograd records,
    /// the weight's gradient is left to the `Deferred` pushed on `deferred`.
    pub fn forward_input(&self, x: Input, pass: impl Into<Pass>, deferred: &mut Vec<Deferred>) -> Tensor {
        let pass = pass.into();
        let (mut h, cov, first) = match x {
            Input::Dense(x, cov) => (x.shallow_clone(), cov, None),
            Input::DenseBf16(x, cov) => match &self.layers[0].0 {
                Lin::Plain(l) if self.bf16_first.active(pass) && x.device() == Device::Cpu => {
                    let shadow = self.bf16_first.shadow(&l.ws);
                    let (y, d) = sparse::linear_bf16_deferred(x, &l.ws, &shadow, l.bs.as_ref(), &self.bf16_first.grad);
                    deferred.extend(d);
                    (Tensor::new(), cov, Some(y))
                }
                lin => (Tensor::new(), cov, Some(lin.forward(&x.to_kind(Kind::Float)))),
            },
            Input::Sparse(s, cov) => match &self.layers[0].0 {
                Lin::Transposed { wt, bs, grad } if wt.device() == Device::Cpu && wt.kind() == Kind::Float => {
                    let (y, d) = sparse::linear_t(s, wt, bs, grad);
                    deferred.extend(d);
                    (Tensor::new(), cov, Some(y))
                }
                lin => (Tensor::new(), cov, Some(lin.forward(&s.to_dense(lin.weight().device())))),
            },
        };
        for (i, (lin, norm, inject)) in self.layers.iter().enumerate() {
            h = match (i, &first) {
                (0, Some(y)) => y.shallow_clone(),
                _ => {
                    if *inject {
                        if let Some(c) = cov {
                            h = Tensor::cat(&[&h, c], 1);
                        }
                    }
                    match lin {
                        Lin::Plain(l) if i == 0 => self.bf16_first.linear(&h, l, pass),
                        _ => lin.forward(&h),
                    }
                }
            };
            h = match norm {
                NormLayer::Batch(b) => b.forward_t(&h, pass == Pass::Train),
                NormLayer::Layer(l) => l.forward(&h),
                NormLayer::None => h,
            };
            h = h.relu();
            if self.dropout > 0.0 && pass != Pass::Eval {
                h = dropout(&h, self.dropout);
            }
        }
        h
    }
}

impl FcLayers {
    /// Sets each batch norm's running mean and variance to those of its
    /// input over every cell, with dropout off and the layers before it
    /// already recalibrated: the statistics inference will see.
    ///
    /// Training leaves running statistics that do not match inference:
    /// they are a moving average over minibatches whose earlier layers had
    /// dropout on (Li et al. 2019, "Understanding the disharmony between
    /// dropout and batch normalization") and older weights. `chunks(i)` is
    /// the i-th block of input rows with its covariates, `None` past the
    /// last. Without batch norm this does nothing.
    pub fn recalibrate_batch_norm(&self, chunks: &dyn Fn(usize) -> Option<(Tensor, Option<Tensor>)>) {
        let _guard = tch::no_grad_guard();
        for (l, (_, norm, _)) in self.layers.iter().enumerate() {
            let NormLayer::Batch(bn) = norm else { continue };
            let (mut n, mut sum, mut sumsq) = (0i64, None::<Tensor>, None::<Tensor>);
            for c in 0.. {
                let Some((x, cov)) = chunks(c) else { break };
                let h = self.pre_norm(&x, cov.as_ref(), l).to_kind(Kind::Double);
                n += h.size()[0];
                let (s, q) =
                    (h.sum_dim_intlist(0, false, Kind::Double), h.square().sum_dim_intlist(0, false, Kind::Double));
                sum = Some(sum.map_or(s.shallow_clone(), |a| a + &s));
                sumsq = Some(sumsq.map_or(q.shallow_clone(), |a| a + &q));
            }
            let (Some(sum), Some(sumsq)) = (sum, sumsq) else { return };
            if n < 2 {
                return;
            }
            let mean = &sum / n as f64;
            // Unbiased, as batch norm's running variance is.
            let var = ((sumsq - &mean * &sum) / (n - 1) as f64).clamp_min(0.0);
            let (mut rm, mut rv) = (bn.running_mean.shallow_clone(), bn.running_var.shallow_clone());
            rm.copy_(&mean.to_kind(rm.kind()));
            rv.copy_(&var.to_kind(rv.kind()));
        }
    }

    /// Input of layer `upto`'s normalization (its linear output), in
    /// inference mode, for a dense input.
    fn pre_norm(&self, x: &Tensor, cov: Option<&Tensor>, upto: usize) -> Tensor {
        let mut h = x.shallow_clone();
        for (i, (lin, norm, inject)) in self.layers.iter().enumerate() {
            if *inject {
                if let Some(c) = cov {
                    h = Tensor::cat(&[&h, c], 1);
                }
            }
            h = lin.forward(&h);
            if i == upto {
                return h;
            }
            h = match norm {
                NormLayer::Batch(b) => b.forward_t(&h, false),
                NormLayer::Layer(l) => l.forward(&h),
                NormLayer::None => h,
            };
            h = h.relu();
        }
        h
    }
}

/// Inverted dropout: each entry kept with probability 1 − p and scaled by
/// 1 / (1 − p). On the CPU the mask comes from a ChaCha8 stream seeded from
/// libtorch's generator, so `manual_seed` still fixes it; libtorch's own CPU
/// dropout draws its mask one entry at a time (about 0.1 ms for 128 × 128,
/// against 0.03 ms here).
///
/// The rows of `h` are cells: in data-parallel training the mask is drawn
/// for the whole minibatch and cut to this rank's cells (`dist`).
pub fn dropout(h: &Tensor, p: f64) -> Tensor {
    let rows = crate::dist::rows_of_minibatch(&h.size());
    if h.device() != Device::Cpu || h.kind() != Kind::Float {
        return match rows {
            Some((whole, rows)) => {
                let keep = Tensor::empty(whole, (h.kind(), h.device())).bernoulli_float_(1.0 - p);
                h * keep.index_select(0, &rows.to_device(h.device())) / (1.0 - p)
            }
            None => h.dropout(p, true),
        };
    }
    let seed = Tensor::randint(i64::MAX, [1], (Kind::Int64, Device::Cpu)).int64_value(&[0]) as u64;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    // Keep where a uniform 32-bit draw is below (1 − p) · 2^32.
    let keep = ((1.0 - p) * 4_294_967_296.0) as u64;
    let scale = (1.0 / (1.0 - p)) as f32;
    let shape = rows.as_ref().map_or_else(|| h.size(), |r| r.0.clone());
    let mask = Tensor::empty(shape, (Kind::Float, Device::Cpu));
    // SAFETY: a fresh contiguous f32 tensor of exactly numel elements, seen
    // first as its raw 32-bit words (filled with random bits) then as floats.
    let bits = unsafe { std::slice::from_raw_parts_mut(mask.data_ptr() as *mut u32, mask.numel()) };
    let fill = |rng: &mut ChaCha8Rng, bits: &mut [u32]| {
        rng.fill(bits);
        for b in bits.iter_mut() {
            *b = if (*b as u64) < keep { scale.to_bits() } else { 0 };
        }
    };
    // On libtorch's OpenMP team in parts, each from its own position in
    // the one stream (a 32-bit draw is one word of it): the same mask as
    // one pass, as the serial part of a training step shrinks.
    let threads = (tch::get_num_threads().max(1) as usize).min(bits.len() / 4096);
    if threads < 2 {
        fill(&mut rng, bits);
    } else {
        let per = bits.len().div_ceil(threads);
        let parts: Vec<_> =
            bits.chunks_mut(per).enumerate().map(|(k, b)| std::sync::Mutex::new((k * per, b))).collect();
        crate::kernels::omp::run(threads, &|member, members| {
            for part in parts.iter().skip(member).step_by(members) {
                let mut part = part.lock().unwrap_or_else(|e| e.into_inner());
                let (start, bits) = &mut *part;
                let mut rng = rng.clone();
                rng.set_word_pos(*start as u128);
                fill(&mut rng, bits);
            }
        });
    }
    match rows {
        Some((_, rows)) => h * mask.index_select(0, &rows),
        None => h * mask,
    }
}

/// Gaussian head on a fully connected stack: returns the mean and the
/// variance exp(v) + 1e-4 (scvi-tools' `Encoder`).
pub struct GaussianEncoder {
    fc: FcLayers,
    mean: nn::Linear,
    var: nn::Linear,
}

impl GaussianEncoder {
    pub fn new(p: &nn::Path, s: FcSpec, n_out: usize) -> GaussianEncoder {
        GaussianEncoder::with_widths(p, s, &vec![s.n_hidden; s.n_layers], n_out)
    }

    /// Heads on a stack of the given widths (see `FcLayers::with_widths`).
    pub fn with_widths(p: &nn::Path, s: FcSpec, widths: &[usize], n_out: usize) -> GaussianEncoder {
        let last = widths.last().copied().unwrap_or(s.n_in);
        GaussianEncoder {
            fc: FcLayers::with_widths(&(p / "fc"), s, widths),
            mean: linear(p / "mean", last, n_out),
            var: linear(p / "var", last, n_out),
        }
    }

    /// See [`FcLayers::set_bf16_training`].
    pub fn set_bf16_training(&self, on: bool) {
        self.fc.set_bf16_training(on);
    }

    /// Starts the mean head's outputs around `v` (its bias).
    pub fn set_mean_bias(&mut self, v: f64) {
        if let Some(b) = self.mean.bs.as_mut() {
            tch::no_grad(|| {
                let _ = b.fill_(v);
            });
        }
    }

    pub fn forward(&self, x: &Tensor, cov: Option<&Tensor>, pass: impl Into<Pass>) -> (Tensor, Tensor) {
        self.forward_input(Input::Dense(x, cov), pass, &mut Vec::new())
    }

    /// As `forward`, from any input (see `FcLayers::forward_input`).
    pub fn forward_input(&self, x: Input, pass: impl Into<Pass>, deferred: &mut Vec<Deferred>) -> (Tensor, Tensor) {
        let h = self.fc.forward_input(x, pass, deferred);
        (self.mean.forward(&h), self.var.forward(&h).exp() + 1e-4)
    }
}

/// KL(N(m, v) ‖ N(m0, v0)), elementwise.
pub fn kl_normal(m: &Tensor, v: &Tensor, m0: &Tensor, v0: &Tensor) -> Tensor {
    ((v0 / v).log() + (v + (m - m0).square()) / v0 - 1.0) * 0.5
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn covariates_are_injected_where_asked() {
        // Layers draw their weights from libtorch's global generator: take the
        // turn, or a model test running beside this one trains on other draws.
        let _turn = crate::models::TORCH.lock().unwrap_or_else(|e| e.into_inner());
        let vs = nn::VarStore::new(Device::Cpu);
        let spec = FcSpec {
            n_in: 5,
            n_hidden: 4,
            n_layers: 2,
            n_cov: 3,
            dropout: 0.1,
            norm: Norm::Batch,
            inject_all: true,
            sparse_input: false,
        };
        let fc = FcLayers::new(&(vs.root() / "a"), spec);
        let shapes: Vec<Vec<i64>> = fc.layers.iter().map(|l| l.0.weight().size()).collect();
        assert_eq!(shapes, vec![vec![4, 8], vec![4, 7]]);
        let fc1 = FcLayers::new(&(vs.root() / "b"), FcSpec { inject_all: false, ..spec });
        assert_eq!(fc1.layers[1].0.weight().size(), vec![4, 4]);
        let x = Tensor::randn([6, 5], (Kind::Float, Device::Cpu));
        let c = Tensor::ones([6, 3], (Kind::Float, Device::Cpu));
        assert_eq!(fc.forward(&x, Some(&c), true).size(), vec![6, 4]);
        // Evaluation mode is deterministic (no dropout, running statistics).
        let a = fc.forward(&x, Some(&c), false);
        let b = fc.forward(&x, Some(&c), false);
        assert!(a.equal(&b));
    }

    #[test]
    fn a_transposed_first_layer_starts_from_the_plain_layers_draws_and_computes_the_same() {
        let _turn = crate::models::TORCH.lock().unwrap_or_else(|e| e.into_inner());
        let vs = nn::VarStore::new(Device::Cpu);
        let spec = FcSpec {
            n_in: 6,
            n_hidden: 4,
            n_layers: 2,
            n_cov: 2,
            dropout: 0.0,
            norm: Norm::None,
            inject_all: true,
            sparse_input: false,
        };
        tch::manual_seed(21);
        let plain = FcLayers::new(&(vs.root() / "p"), spec);
        tch::manual_seed(21);
        let tr = FcLayers::new(&(vs.root() / "t"), FcSpec { sparse_input: true, ..spec });
        assert_eq!(tr.layers[0].0.weight().size(), vec![8, 4]);
        assert!(tr.layers[0].0.weight().tr().equal(plain.layers[0].0.weight()));
        assert!(tr.layers[1].0.weight().equal(plain.layers[1].0.weight()));
        let x = Tensor::randn([5, 6], (Kind::Float, Device::Cpu));
        let c = Tensor::ones([5, 2], (Kind::Float, Device::Cpu));
        assert!(tr.forward(&x, Some(&c), false).allclose(&plain.forward(&x, Some(&c), false), 1e-6, 1e-6, false));
        let names: Vec<String> = vs.variables().into_keys().filter(|k| k.starts_with("t.layer0")).collect();
        assert!(names.iter().any(|k| k.ends_with("weight_t")), "{names:?}");

        // A file written before the transposed layer (weight [out, in]) loads into it.
        let old = nn::VarStore::new(Device::Cpu);
        tch::manual_seed(4);
        let saved = FcLayers::new(&(old.root() / "t"), spec);
        let file: std::collections::BTreeMap<String, Tensor> = old.variables().into_iter().collect();
        let new = nn::VarStore::new(Device::Cpu);
        let loaded = FcLayers::new(&(new.root() / "t"), FcSpec { sparse_input: true, ..spec });
        crate::io::load_into(&new, &file).unwrap();
        assert!(loaded.layers[0].0.weight().equal(&saved.layers[0].0.weight().tr()));
    }

    #[test]
    fn dropout_keeps_the_expected_share_scaled_and_follows_the_seed() {
        let _turn = crate::models::TORCH.lock().unwrap_or_else(|e| e.into_inner());
        let h = Tensor::ones([200, 300], (Kind::Float, Device::Cpu));
        tch::manual_seed(3);
        let a = dropout(&h, 0.25);
        let v: Vec<f32> = Vec::try_from(a.flatten(0, -1)).unwrap();
        assert!(v.iter().all(|&x| x == 0.0 || (x - 1.0 / 0.75).abs() < 1e-6));
        let kept = v.iter().filter(|&&x| x > 0.0).count() as f64 / v.len() as f64;
        // 60,000 draws: the share kept is 0.75 ± 0.0018 (sd), so ± 0.01 is 5.6 sd.
        assert!((kept - 0.75).abs() < 0.01, "kept {kept}");
        tch::manual_seed(3);
        assert!(dropout(&h, 0.25).equal(&a), "same seed, same mask");
        assert!(!dropout(&h, 0.25).equal(&a), "the next draw differs");
        // Drawn in parts on two threads, the mask is the one-thread mask.
        let before = tch::get_num_threads();
        let masks: Vec<Tensor> = [1, 2]
            .iter()
            .map(|&t| {
                tch::set_num_threads(t);
                tch::manual_seed(5);
                dropout(&h, 0.25)
            })
            .collect();
        tch::set_num_threads(before);
        assert!(masks[0].equal(&masks[1]), "one and two threads draw different masks");
        // The gradient is the mask.
        let x = Tensor::ones([4, 5], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let y = dropout(&x, 0.5);
        y.sum(Kind::Float).backward();
        assert!(x.grad().equal(&y.detach()));
    }

    #[test]
    fn kl_of_a_normal_with_itself_is_zero_and_known_otherwise() {
        let m = Tensor::from_slice(&[0.5f64, -1.0]);
        let v = Tensor::from_slice(&[2.0f64, 0.25]);
        let zero = kl_normal(&m, &v, &m, &v);
        assert!(zero.abs().max().double_value(&[]) < 1e-12);
        // KL(N(0,1) ‖ N(1,4)) = 0.5 (log 4 + (1 + 1)/4 − 1)
        let kl = kl_normal(&Tensor::from(0.0f64), &Tensor::from(1.0f64), &Tensor::from(1.0f64), &Tensor::from(4.0f64));
        assert!((kl.double_value(&[]) - 0.5 * (4f64.ln() + 0.5 - 1.0)).abs() < 1e-12);
    }

    /// Mixed-precision layers: gradients reach the input and the f32 weight
    /// within bf16's rounding of the f32 gradients, and only training
    /// passes use bf16 (inference is f32, bit for bit).
    #[test]
    fn bf16_training_products_carry_gradients_and_leave_inference_in_f32() {
        let _turn = crate::models::TORCH.lock().unwrap_or_else(|e| e.into_inner());
        tch::manual_seed(3);
        let vs = nn::VarStore::new(Device::Cpu);
        let spec = FcSpec {
            n_in: 400,
            n_hidden: 32,
            n_layers: 2,
            n_cov: 0,
            dropout: 0.0,
            norm: Norm::Layer,
            inject_all: false,
            sparse_input: false,
        };
        let fc = FcLayers::new(&(vs.root() / "a"), spec);
        let x = Tensor::randn([16, 400], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let w = &fc.layers[0].0.weight().shallow_clone();
        let grads = |on: bool| {
            fc.set_bf16_training(on);
            let y = fc.forward(&x, None, Pass::Train);
            let (gx, gw) = {
                let g = Tensor::run_backward(&[y.square().sum(Kind::Float)], &[&x, w], false, false);
                (g[0].shallow_clone(), g[1].shallow_clone())
            };
            (y.detach(), gx, gw)
        };
        let (y32, gx32, gw32) = grads(false);
        let (y16, gx16, gw16) = grads(true);
        for (name, a, b) in
            [("output", &y32, &y16), ("input gradient", &gx32, &gx16), ("weight gradient", &gw32, &gw16)]
        {
            let rel = ((a - b).norm().double_value(&[])) / a.norm().double_value(&[]);
            // bf16 keeps 8 bits of mantissa: about 0.4% per rounding.
            assert!(rel > 0.0 && rel < 0.03, "{name}: bf16 differs from f32 by {rel} (relative)");
        }
        // Inference ignores the switch.
        let e16 = fc.forward(&x, None, Pass::Eval);
        fc.set_bf16_training(false);
        assert!(fc.forward(&x, None, Pass::Eval).equal(&e16));
    }

    /// A bf16 input read through the weight's shadow gives the output and
    /// the weight gradient of the cast path (`linear_bf16`), the gradient
    /// deferred; the optimiser's step then leaves the shadow equal to the
    /// cast of the updated weight, and a new training run casts afresh.
    #[test]
    fn a_bf16_input_reads_the_shadow_and_the_optimiser_keeps_it_current() {
        let _turn = crate::models::TORCH.lock().unwrap_or_else(|e| e.into_inner());
        tch::manual_seed(4);
        let vs = nn::VarStore::new(Device::Cpu);
        let spec = FcSpec {
            n_in: 300,
            n_hidden: 24,
            n_layers: 2,
            n_cov: 3,
            dropout: 0.0,
            norm: Norm::Layer,
            inject_all: false,
            sparse_input: false,
        };
        let fc = FcLayers::new(&(vs.root() / "a"), spec);
        fc.set_bf16_training(true);
        // Counts (exact in bf16) and a one-hot design.
        let x = Tensor::randint(9, [32, 300], (Kind::Float, Device::Cpu));
        let cov = Tensor::arange(32, (Kind::Int64, Device::Cpu)).remainder(3).one_hot(3).to_kind(Kind::Float);
        let xb = Tensor::cat(&[&x, &cov], 1).to_kind(Kind::BFloat16);
        let w = fc.layers[0].0.weight().shallow_clone();

        // The cast path: autograd's gradient of the weight.
        let y_cast = fc.forward(&x, Some(&cov), Pass::Train);
        let g_cast = Tensor::run_backward(&[y_cast.square().sum(Kind::Float)], &[&w], false, false)[0].shallow_clone();
        // The shadow path: the same output; the weight's gradient deferred, in bf16.
        let mut deferred = Vec::new();
        let y = fc.forward_input(Input::DenseBf16(&xb, Some(&cov)), Pass::Train, &mut deferred);
        assert_eq!(deferred.len(), 1);
        let rel = |a: &Tensor, b: &Tensor| (a - b).norm().double_value(&[]) / a.norm().double_value(&[]);
        assert!(rel(&y_cast, &y) < 1e-6, "outputs differ by {}", rel(&y_cast, &y));
        y.square().sum(Kind::Float).backward();
        assert!(!w.grad().defined() || w.grad().abs().max().double_value(&[]) == 0.0, "autograd reached the weight");
        let (param, g) = deferred[0].gradient().expect("a gradient");
        assert_eq!(param.data_ptr(), w.data_ptr());
        assert_eq!(g.kind(), Kind::BFloat16);
        // Both are bf16 products of the same factors (rounded once).
        assert!(
            rel(&g_cast, &g.to_kind(Kind::Float)) < 0.01,
            "gradients differ by {}",
            rel(&g_cast, &g.to_kind(Kind::Float))
        );

        // The optimiser updates the weight and rewrites its shadow.
        let mut adam = crate::kernels::adam::Adam::new(&vs, 1e-2, 0.0, 1e-8).expect("CPU f32");
        let extra = vec![(param, g)];
        let shadows: Vec<(Tensor, Tensor)> = deferred.iter().filter_map(|d| d.shadow()).collect();
        let before = w.detach().copy();
        adam.step(&extra, &shadows);
        assert!(!w.equal(&before), "the weight did not move");
        assert!(shadows[0].1.equal(&w.detach().to_kind(Kind::BFloat16)), "the shadow is not the updated weight");
        // The next product reads it: equal to the cast path on the new weight.
        let y2 = fc.forward_input(Input::DenseBf16(&xb, Some(&cov)), Pass::Train, &mut Vec::new());
        assert!(rel(&fc.forward(&x, Some(&cov), Pass::Train), &y2) < 1e-6);

        // A weight changed outside the optimiser is seen after a new generation.
        tch::no_grad(|| {
            let _ = w.shallow_clone().g_mul_scalar_(0.5);
        });
        new_weights_generation();
        let y3 = fc.forward_input(Input::DenseBf16(&xb, Some(&cov)), Pass::Train, &mut Vec::new());
        assert!(rel(&fc.forward(&x, Some(&cov), Pass::Train), &y3) < 1e-6);
        // Inference widens the bf16 input and runs in f32.
        let e = fc.forward_input(Input::DenseBf16(&xb, Some(&cov)), Pass::Eval, &mut Vec::new());
        assert!(e.equal(&fc.forward(&x, Some(&cov), Pass::Eval)));
    }
}
