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

/// Raw slices of one block, moved to the thread that updates it.
struct Block {
    p: *mut f32,
    g: *const f32,
    m: *mut f32,
    v: *mut f32,
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
    /// computed outside autograd) takes that gradient, added to autograd's
    /// if it has one.
    pub fn step(&mut self, extra: &[(Tensor, Tensor)]) {
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
            let g = if g.is_contiguous() { g } else { g.contiguous() };
            let n = m.len();
            let (pp, gp) = (p.data_ptr() as *mut f32, g.data_ptr() as *const f32);
            for start in (0..n).step_by(BLOCK) {
                let len = BLOCK.min(n - start);
                // SAFETY: start + len ≤ n, the length of all four buffers.
                unsafe {
                    blocks.push(Mutex::new(Some(Block {
                        p: pp.add(start),
                        g: gp.add(start),
                        m: m.as_mut_ptr().add(start),
                        v: v.as_mut_ptr().add(start),
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
                let (p, g, m, v) = unsafe {
                    (
                        std::slice::from_raw_parts_mut(b.p, b.len),
                        std::slice::from_raw_parts(b.g, b.len),
                        std::slice::from_raw_parts_mut(b.m, b.len),
                        std::slice::from_raw_parts_mut(b.v, b.len),
                    )
                };
                update(p, g, m, v, wd, eps, step_size, sqrt_bc2);
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
        let gi = g[i] + wd * p[i];
        let mi = BETA1 * m[i] + (1.0 - BETA1) * gi;
        let vi = BETA2 * v[i] + (1.0 - BETA2) * gi * gi;
        m[i] = mi;
        v[i] = vi;
        p[i] -= step_size * mi / (vi.sqrt() / sqrt_bc2 + eps);
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
                    ours.step(&[]);
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
}
