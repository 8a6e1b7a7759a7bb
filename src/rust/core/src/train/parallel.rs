//! The training loop's data-parallel side (see `crate::dist`): checks that
//! the ranks agree, starts them from rank 0's weights, sums the gradients of
//! each step, and the epoch's sums and validation ELBO.

use super::{TrainConfig, Trainable};
use crate::dist::{self, Group, Op};
use crate::error::{Error, Result};
use std::sync::Arc;
use tch::{Kind, Tensor};

/// One training run's view of the process group.
pub(super) struct Parallel {
    pub group: Arc<Group>,
    /// The trainable variables, in the order every rank lists them.
    trainable: Vec<Tensor>,
    /// The variables without gradients that training changes per rank
    /// (batch-norm statistics), by name.
    buffers: Vec<Tensor>,
}

/// Stops unless every rank holds the same `values` (named by `names`).
pub fn agree(group: &Group, names: &[&str], values: &[f64]) -> Result<()> {
    let mut lo = Tensor::from_slice(values).to_kind(Kind::Double);
    let mut hi = lo.copy();
    group.all_reduce(&mut lo, Op::Min)?;
    group.all_reduce(&mut hi, Op::Max)?;
    let (lo, hi) = (Vec::<f64>::try_from(&lo)?, Vec::<f64>::try_from(&hi)?);
    let differ: Vec<String> = names
        .iter()
        .zip(lo.iter().zip(&hi))
        .filter(|(_, (a, b))| a != b)
        .map(|(n, (a, b))| format!("{n} (from {a} to {b})"))
        .collect();
    if differ.is_empty() {
        Ok(())
    } else {
        Err(Error::Distributed(format!("the ranks disagree on {}", differ.join(", "))))
    }
}

/// A stable number for a list of names (FNV-1a, cut to what an f64 holds exactly).
fn name_hash(names: &[String]) -> f64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in names.iter().flat_map(|n| n.bytes().chain([0])) {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    (h >> 12) as f64
}

fn flat(ts: &[Tensor]) -> Tensor {
    let parts: Vec<Tensor> = ts.iter().map(|t| t.detach().reshape([-1]).to_kind(Kind::Float)).collect();
    Tensor::cat(&parts, 0)
}

impl Parallel {
    /// Checks the set-up against the other ranks and starts every rank from
    /// rank 0's weights.
    pub fn start(
        group: Arc<Group>,
        task: &dyn Trainable,
        cfg: &TrainConfig,
        n_train: usize,
        n_validation: usize,
    ) -> Result<Parallel> {
        let vs = task.var_store();
        let mut named: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        let names: Vec<String> = named.iter().map(|(n, _)| n.clone()).collect();
        let numel: usize = named.iter().map(|(_, t)| t.numel()).sum();
        agree(
            &group,
            &[
                "the number of cells",
                "the training cells",
                "the validation cells",
                "the model's variables",
                "the model's size",
                "batch_size",
                "max_epochs",
                "seed",
                "lr",
                "kl_warmup",
                "validation_fraction",
                "bf16 (mixed precision: options(scdistill.bf16) and a CPU with native bf16)",
            ],
            &[
                task.n_cells() as f64,
                n_train as f64,
                n_validation as f64,
                name_hash(&names),
                numel as f64,
                cfg.batch_size as f64,
                cfg.max_epochs as f64,
                (cfg.seed % (1 << 52)) as f64,
                cfg.lr,
                cfg.kl_warmup,
                cfg.validation_fraction,
                cfg.bf16 as u8 as f64,
            ],
        )?;
        // The weights travel as floats; the model holds no other kind.
        let all: Vec<Tensor> =
            named.iter().filter(|(_, t)| t.is_floating_point()).map(|(_, t)| t.shallow_clone()).collect();
        let mut buf = flat(&all);
        group.broadcast(&mut buf, 0)?;
        scatter(&buf, &all);
        let trainable = vs.trainable_variables();
        let buffers =
            named.into_iter().filter(|(_, t)| !t.requires_grad() && t.is_floating_point()).map(|(_, t)| t).collect();
        Ok(Parallel { group, trainable, buffers })
    }

    /// Sums the step's gradients (autograd's and the model's own `extra`)
    /// over the ranks, in place; returns whether any rank was interrupted.
    pub fn reduce_gradients(&self, extra: &[(Tensor, Tensor)], interrupted: bool) -> Result<bool> {
        let grads: Vec<Tensor> = self.trainable.iter().map(|p| p.grad()).collect();
        let defined: Vec<bool> = grads.iter().map(|g| g.defined()).collect();
        let mut parts: Vec<Tensor> = grads
            .iter()
            .zip(&self.trainable)
            .map(|(g, p)| if g.defined() { g.detach().reshape([-1]) } else { p.detach().zeros_like().reshape([-1]) })
            .collect();
        parts.extend(extra.iter().map(|(_, g)| g.detach().reshape([-1])));
        let device = self.trainable.first().map_or(tch::Device::Cpu, |t| t.device());
        let flags: Vec<f32> =
            defined.iter().map(|&d| f32::from(u8::from(d))).chain([f32::from(u8::from(interrupted))]).collect();
        parts.push(Tensor::from_slice(&flags).to_device(device));
        let parts: Vec<Tensor> = parts.into_iter().map(|t| t.to_kind(Kind::Float)).collect();
        let mut buf = Tensor::cat(&parts, 0);
        // Two halves reduced side by side move a large gradient about twice
        // as fast over Gloo's TCP (bench allreduce: 1M floats 2.0 ms against
        // 3.9 ms on loopback); small ones go whole.
        let pieces = if buf.numel() > 1 << 18 { 2 } else { 1 };
        self.group.all_reduce_pieces(&mut buf, Op::Sum, pieces)?;
        let n_flags = flags.len() as i64;
        let total = buf.size()[0];
        let reduced_flags = Vec::<f32>::try_from(buf.narrow(0, total - n_flags, n_flags).to_device(tch::Device::Cpu))?;
        let mut offset = 0i64;
        tch::no_grad(|| {
            for (i, (p, g)) in self.trainable.iter().zip(&grads).enumerate() {
                let n = p.numel() as i64;
                let part = buf.narrow(0, offset, n).view_as(p);
                offset += n;
                if reduced_flags[i] == 0.0 {
                    continue;
                }
                if g.defined() {
                    g.shallow_clone().copy_(&part);
                } else {
                    // Another rank's cells reached this weight: give it the gradient.
                    tch::with_grad(|| (p * part.to_kind(p.kind())).sum(Kind::Float).backward());
                }
            }
            for (_, g) in extra {
                let n = g.numel() as i64;
                g.shallow_clone().copy_(&buf.narrow(0, offset, n).view_as(g));
                offset += n;
            }
        });
        Ok(reduced_flags[reduced_flags.len() - 1] > 0.0)
    }

    /// Sums scalars (an epoch's loss sums) over the ranks.
    pub fn sum(&self, values: &[f64]) -> Result<Vec<f64>> {
        let mut t = Tensor::from_slice(values);
        self.group.all_reduce(&mut t, Op::Sum)?;
        Ok(Vec::<f64>::try_from(&t)?)
    }

    /// Averages the per-rank statistics (batch norm's running mean and
    /// variance) so every rank holds the same model.
    pub fn average_buffers(&self) -> Result<()> {
        if self.buffers.is_empty() {
            return Ok(());
        }
        let mut buf = flat(&self.buffers);
        self.group.all_reduce(&mut buf, Op::Sum)?;
        scatter(&(buf / self.group.world() as f64), &self.buffers);
        Ok(())
    }

    /// This rank's cells of `chunk`, the minibatch at position `start` of an
    /// epoch's order, dealt to the ranks in turn; the guard makes per-cell
    /// draws this rank's rows of the whole minibatch's.
    pub fn share(&self, start: usize, chunk: &[usize]) -> (Vec<usize>, dist::ShardGuard) {
        let at = self.group.dealt(start, chunk.len());
        let cells = at.iter().map(|&j| chunk[j]).collect();
        (cells, dist::shard(chunk.len(), at))
    }

    /// Mean negative ELBO, reconstruction and KL per cell over `rows`, each
    /// rank evaluating its share of every chunk, dealt as training deals a
    /// minibatch (as `super::evaluate`).
    pub fn evaluate(&self, task: &dyn Trainable, rows: &[usize], batch_size: usize) -> Result<(f64, f64, f64)> {
        if rows.is_empty() {
            return Ok((f64::NAN, f64::NAN, f64::NAN));
        }
        let (mut rec, mut kl) = (0f64, 0f64);
        tch::no_grad(|| {
            for chunk in rows.chunks(batch_size.max(1)) {
                let (cells, _shard) = self.share(0, chunk);
                if cells.is_empty() {
                    continue;
                }
                let t = task.loss(&cells, false);
                rec += t.reconstruction.sum(Kind::Double).double_value(&[]);
                kl += (t.kl_warmup + t.kl_fixed).sum(Kind::Double).double_value(&[]);
            }
        });
        let s = self.sum(&[rec, kl])?;
        let n = rows.len() as f64;
        Ok(((s[0] + s[1]) / n, s[0] / n, s[1] / n))
    }
}

/// Copies consecutive pieces of `buf` into `ts`.
fn scatter(buf: &Tensor, ts: &[Tensor]) {
    let mut offset = 0i64;
    tch::no_grad(|| {
        for t in ts {
            let n = t.numel() as i64;
            t.shallow_clone().copy_(&buf.narrow(0, offset, n).view_as(t).to_kind(t.kind()));
            offset += n;
        }
    });
}
