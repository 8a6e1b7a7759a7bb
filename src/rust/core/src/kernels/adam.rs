//! Adam for CPU f32 parameters in one pass per parameter element.
//!
//! libtorch's Adam makes about nine passes over every parameter per step
//! (weight decay, two moment updates, square root, bias corrections, the
//! update), each its own parallel loop. Here each element is read and written
//! once, in blocks shared out among libtorch's OpenMP threads. The rule is
//! PyTorch's `Adam` (L2 weight decay added to the gradient, not AdamW):
//!
//! g ← g + wd·p; m ← β1 m + (1 − β1) g; v ← β2 v + (1 − β2) g²;
//! p ← p − lr / (1 − β1^t) · m / (√v / √(1 − β2^t) + ε).
//!
//! Parameters that do not require a gradient (frozen), or have none yet, are
//! left alone, as PyTorch does.
//!
//! A gradient may come in bf16 (a mixed-precision product's, see
//! `nn::Bf16Switch`), and a parameter may have a bf16 shadow: the copy its
//! bf16 products read. The update writes the shadow in the same pass, so
//! that no layer casts its weight to bf16 at every step.

use std::sync::Mutex;
use tch::{nn, Device, Kind, Tensor};

const BETA1: f32 = 0.9;
const BETA2: f32 = 0.999;
/// Elements per block of work.
const BLOCK: usize = 1 << 15;

pub struct Adam {
    lr: f32,
    eps: f32,
    wd: f32,
    t: i32,
    params: Vec<(Tensor, Vec<f32>, Vec<f32>)>,
}

/// Raw slices of one block, moved to the thread that updates it: the
/// gradient is f32 or bf16 (`g16`), the shadow null when there is none.
struct Block {
    p: *mut f32,
    g: *const f32,
    g16: *const u16,
    m: *mut f32,
    v: *mut f32,
    shadow: *mut u16,
    len: usize,
}

// SAFETY: blocks cover disjoint ranges of live buffers; each is used by one
// thread at a time (taken out of a Mutex) while `step` keeps the buffers alive.
unsafe impl Send for Block {}

impl Adam {
    /// Adam over `vs`'s trainable variables when all are CPU f32 tensors;
    /// `None` otherwise (use libtorch's).
    pub fn new(vs: &nn::VarStore, lr: f64, wd: f64, eps: f64) -> Option<Adam> {
        let vars = vs.trainable_variables();
        if !vars.iter().all(|v| v.device() == Device::Cpu && v.kind() == Kind::Float && v.is_contiguous()) {
            return None;
        }
        let params = vars
            .into_iter()
            .map(|v| {
                let n = v.numel();
                (v, vec![0f32; n], vec![0f32; n])
            })
            .collect();
        Some(Adam { lr: lr as f32, eps: eps as f32, wd: wd as f32, t: 0, params })
    }

    /// One update. A parameter listed in `extra` (parameter, gradient pairs
    /// computed outside autograd, f32 or bf16) takes that gradient, added to
    /// autograd's if it has one. A parameter listed in `shadows`
    /// (parameter, contiguous bf16 tensor of its shape) has its shadow
    /// rewritten from the updated values (rounded to nearest even, as
    /// libtorch's cast).
    pub fn step(&mut self, extra: &[(Tensor, Tensor)], shadows: &[(Tensor, Tensor)]) {
        self.t += 1;
        let step_size = self.lr / (1.0 - BETA1.powi(self.t));
        let sqrt_bc2 = (1.0 - BETA2.powi(self.t)).sqrt();
        let (wd, eps) = (self.wd, self.eps);
        // Gradients kept alive (and made contiguous) until the update is done.
        let mut grads = Vec::with_capacity(self.params.len());
        let mut blocks = Vec::new();
        for (p, m, v) in &mut self.params {
            let mut g = p.grad();
            if let Some((_, e)) = extra.iter().find(|(q, _)| q.data_ptr() == p.data_ptr()) {
                g = if g.defined() { g + e } else { e.shallow_clone() };
            }
            if !p.requires_grad() || !g.defined() {
                continue;
            }
            let n = m.len();
            let shadow = shadows
                .iter()
                .find(|(q, s)| {
                    q.data_ptr() == p.data_ptr() && s.kind() == Kind::BFloat16 && s.is_contiguous() && s.numel() == n
                })
                .map_or(std::ptr::null_mut(), |(_, s)| s.data_ptr() as *mut u16);
            // A bf16 gradient is read as such where it updates a shadow too;
            // any other gradient is widened to f32 here.
            let g = match g.kind() {
                Kind::Float => g,
                Kind::BFloat16 if !shadow.is_null() => g,
                _ => g.to_kind(Kind::Float),
            };
            let g = if g.is_contiguous() { g } else { g.contiguous() };
            let pp = p.data_ptr() as *mut f32;
            let (gp, gp16) = match g.kind() {
                Kind::BFloat16 => (std::ptr::null(), g.data_ptr() as *const u16),
                _ => (g.data_ptr() as *const f32, std::ptr::null()),
            };
            for start in (0..n).step_by(BLOCK) {
                let len = BLOCK.min(n - start);
                // SAFETY: start + len ≤ n, the length of all the buffers
                // (a null pointer stays null: it is never offset).
                unsafe {
                    let at16 = |q: *const u16| if q.is_null() { q } else { q.add(start) };
                    blocks.push(Mutex::new(Some(Block {
                        p: pp.add(start),
                        g: if gp.is_null() { gp } else { gp.add(start) },
                        g16: at16(gp16),
                        m: m.as_mut_ptr().add(start),
                        v: v.as_mut_ptr().add(start),
                        shadow: at16(shadow) as *mut u16,
                        len,
                    })));
                }
            }
            grads.push(g);
        }
        let threads = (tch::get_num_threads().max(1) as usize).min(blocks.len().max(1));
        super::omp::run(threads, &|member, members| {
            let _ftz = super::flush::Subnormals::flushed();
            for b in blocks.iter().skip(member).step_by(members) {
                let Some(b) = b.lock().unwrap_or_else(|e| e.into_inner()).take() else { continue };
                // SAFETY: see `Block`.
                let (p, m, v) = unsafe {
                    (
                        std::slice::from_raw_parts_mut(b.p, b.len),
                        std::slice::from_raw_parts_mut(b.m, b.len),
                        std::slice::from_raw_parts_mut(b.v, b.len),
                    )
                };
                // SAFETY: as above; a non-null pointer covers `len` elements.
                let g16 = (!b.g16.is_null()).then(|| unsafe { std::slice::from_raw_parts(b.g16, b.len) });
                let shadow = (!b.shadow.is_null()).then(|| unsafe { std::slice::from_raw_parts_mut(b.shadow, b.len) });
                match (g16, shadow) {
                    (Some(g), Some(s)) => update_mixed(p, g, m, v, s, wd, eps, step_size, sqrt_bc2),
                    (Some(_), None) => unreachable!("a bf16 gradient is kept only with a shadow"),
                    (None, shadow) => {
                        // SAFETY: as above (the gradient is f32 when not bf16).
                        let g = unsafe { std::slice::from_raw_parts(b.g, b.len) };
                        update(p, g, m, v, wd, eps, step_size, sqrt_bc2);
                        if let Some(s) = shadow {
                            for (s, &x) in s.iter_mut().zip(p.iter()) {
                                *s = f32_to_bf16(x);
                            }
                        }
                    }
                }
            }
        });
        drop(grads);
    }
}

crate::kernels::simd::wide_copies! {
    /// One block of the update, in the widest vectors the CPU has.
    fn update(
        p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], wd: f32, eps: f32, step_size: f32, sqrt_bc2: f32,
    ) = update_portable
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn update_portable(
    p: &mut [f32],
    g: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    wd: f32,
    eps: f32,
    step_size: f32,
    sqrt_bc2: f32,
) {
    let n = p.len();
    let (g, m, v) = (&g[..n], &mut m[..n], &mut v[..n]);
    for i in 0..n {
        p[i] = adam_rule(p[i], g[i], &mut m[i], &mut v[i], wd, eps, step_size, sqrt_bc2);
    }
}

/// The rule of the module's header for one element: the new parameter,
/// the moments updated in place.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn adam_rule(p: f32, g: f32, m: &mut f32, v: &mut f32, wd: f32, eps: f32, step_size: f32, sqrt_bc2: f32) -> f32 {
    let g = g + wd * p;
    *m = BETA1 * *m + (1.0 - BETA1) * g;
    *v = BETA2 * *v + (1.0 - BETA2) * g * g;
    p - step_size * *m / (v.sqrt() / sqrt_bc2 + eps)
}

crate::kernels::simd::wide_copies! {
    /// `update` from a bf16 gradient, writing the bf16 shadow of the result.
    fn update_mixed(
        p: &mut [f32], g: &[u16], m: &mut [f32], v: &mut [f32], s: &mut [u16], wd: f32, eps: f32, step_size: f32,
        sqrt_bc2: f32,
    ) = update_mixed_portable
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn update_mixed_portable(
    p: &mut [f32],
    g: &[u16],
    m: &mut [f32],
    v: &mut [f32],
    s: &mut [u16],
    wd: f32,
    eps: f32,
    step_size: f32,
    sqrt_bc2: f32,
) {
    let n = p.len();
    let (g, m, v, s) = (&g[..n], &mut m[..n], &mut v[..n], &mut s[..n]);
    for i in 0..n {
        p[i] = adam_rule(p[i], bf16_to_f32(g[i]), &mut m[i], &mut v[i], wd, eps, step_size, sqrt_bc2);
        s[i] = f32_to_bf16(p[i]);
    }
}

/// A bf16's bits as the f32 it is (exact).
#[inline(always)]
pub(crate) fn bf16_to_f32(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// The bf16 nearest `x` (ties to even; NaN stays NaN), as libtorch rounds.
#[inline(always)]
pub(crate) fn f32_to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        0x7FC0
    } else {
        ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) as u16
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::nn::OptimizerConfig;

    /// A few steps of a small regression with both optimizers from the same start.
    #[test]
    fn matches_libtorch_adam_step_for_step() {
        // The generator is global: take a turn with the training tests.
        let _turn = crate::models::TORCH.lock().unwrap_or_else(|e| e.into_inner());
        let run = |fused: bool| -> Vec<Tensor> {
            tch::manual_seed(7);
            let vs = nn::VarStore::new(Device::Cpu);
            let lin = nn::linear(vs.root() / "lin", 50, 70_000 / 50, Default::default());
            let frozen = vs.root().randn_standard("frozen", &[3]);
            let _ = frozen.set_requires_grad(false);
            let before = frozen.detach().copy();
            let x = Tensor::randn([16, 50], (Kind::Float, Device::Cpu));
            let y = Tensor::randn([16, 1400], (Kind::Float, Device::Cpu));
            let mut torch = nn::Adam { wd: 1e-2, eps: 0.01, ..Default::default() }.build(&vs, 1e-2).unwrap();
            let mut ours = Adam::new(&vs, 1e-2, 1e-2, 0.01).unwrap();
            // libtorch's zero_grad in both runs (the training loop does the same).
            for _ in 0..5 {
                let loss = (x.apply(&lin) - &y).square().mean(Kind::Float);
                torch.zero_grad();
                loss.backward();
                if fused {
                    ours.step(&[], &[]);
                } else {
                    torch.step();
                }
            }
            vec![lin.ws.detach().copy(), lin.bs.as_ref().unwrap().detach().copy(), frozen.detach().copy(), before]
        };
        let (a, b) = (run(false), run(true));
        for (x, y) in a.iter().zip(&b) {
            let err = (x - y).abs().max().double_value(&[]);
            assert!(err < 1e-6, "max difference {err}");
        }
        assert!(b[2].equal(&b[3]), "a frozen parameter moved");
    }

    /// A bf16 gradient updates as its (exact) f32 widening does, with a
    /// shadow or without, and a shadow ends as the bf16 rounding of the
    /// updated parameter.
    #[test]
    fn a_bf16_gradient_and_a_shadow_follow_the_f32_update() {
        let _turn = crate::models::TORCH.lock().unwrap_or_else(|e| e.into_inner());
        let run = |grad16: bool, mixed: bool| {
            tch::manual_seed(2);
            let vs = nn::VarStore::new(Device::Cpu);
            let p = vs.root().randn_standard("p", &[70_000]);
            let mut adam = Adam::new(&vs, 1e-2, 1e-3, 1e-8).unwrap();
            let shadow = p.detach().to_kind(Kind::BFloat16);
            for step in 0..3 {
                let g =
                    Tensor::from_slice(&(0..70_000).map(|i| ((i * 7 + step) % 13) as f32 - 6.0).collect::<Vec<_>>())
                        .to_kind(Kind::BFloat16);
                let g = if grad16 { g } else { g.to_kind(Kind::Float) };
                let shadows = if mixed { vec![(p.shallow_clone(), shadow.shallow_clone())] } else { vec![] };
                adam.step(&[(p.shallow_clone(), g)], &shadows);
            }
            (p.detach().copy(), shadow)
        };
        let (p32, _) = run(false, false);
        let (p16, shadow) = run(true, true);
        assert!(p32.equal(&p16), "the bf16 gradient updated differently");
        assert!(p32.equal(&run(true, false).0), "the bf16 gradient without a shadow updated differently");
        assert!(shadow.equal(&p16.to_kind(Kind::BFloat16)), "the shadow is not libtorch's rounding of the parameter");
        // Ties round to even, NaN stays NaN.
        assert_eq!(f32_to_bf16(f32::from_bits(0x3F80_8000)), 0x3F80);
        assert_eq!(f32_to_bf16(f32::from_bits(0x3F81_8000)), 0x3F82);
        assert!(bf16_to_f32(f32_to_bf16(f32::NAN)).is_nan());
    }
}
