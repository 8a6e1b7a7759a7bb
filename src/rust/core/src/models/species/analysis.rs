//! Analyses of an aligned pair of species (scSpecies 0.1.4, section by
//! section): the likelihood-based similarity of a target cell to a context
//! cell, label transfer by the most similar context cells, the cell-type
//! similarity table, and log2 fold changes of homologous genes per shared
//! cell type.
//!
//! Similarity (scSpecies' `similarity_metric`): for target cell i with
//! counts x_i, batch s_i and library l_i = exp(E[log l | x_i]),
//! sim(i, j) = NLL(x_i | z = E[z_j], s_i, l_i) − NLL(x_i | z = E[z_i], s_i, l_i)
//! under the target decoder: 0 when context cell j explains x_i as well as
//! the cell's own latent; lower is more similar.

use super::align::{encode_all, Representations};
use super::{Side, SpeciesModel};
use crate::data::SparseBatch;
use crate::data::{Covariates, Csr};
use crate::de::stats::quantile;
use crate::error::{invalid, Result};
use crate::likelihood::Likelihood;
use crate::models::count_decoder::{CountDecoder, DecoderHeads, GeneHeads};
use crate::models::vae::VaeData;
use crate::nn::Pass;
use crate::numeric::nan_median;
use rand::seq::{IndexedRandom, SliceRandom};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use statrs::distribution::{ChiSquared, ContinuousCDF};
use tch::{Device, Kind, Tensor};

/// −log p(x_i | candidate) for each of `rows` (cells of `data`) and each of
/// its `k` candidates, whose decoder heads are `pool` rows `pick` (flat,
/// `k` per cell); `log_library` [rows, 1]. Returns [rows, k].
pub fn candidate_nll(
    decoder: &CountDecoder,
    data: &VaeData,
    rows: &[usize],
    pool: &DecoderHeads,
    pick: &Tensor,
    log_library: &Tensor,
    k: usize,
) -> Tensor {
    let heads = DecoderHeads {
        logits: pool.logits.index_select(0, pick),
        log_theta: pool
            .log_theta
            .as_ref()
            .map(|t| if t.dim() == 2 { t.index_select(0, pick) } else { t.shallow_clone() }),
        pi_logits: pool.pi_logits.as_ref().map(|t| t.index_select(0, pick)),
    };
    nll_of_heads(decoder, data, rows, heads, log_library, k, false)
}

/// Decoded candidates that many cells are scored against: on the CPU under
/// NB or ZINB, ρ and log σ(π) computed once and read in place by
/// [`crate::kernels::pool`]; elsewhere the heads, copied out per pair.
pub enum ScorePool {
    Host {
        family: Likelihood,
        n_genes: usize,
        rho: Vec<f32>,
        pi: Vec<f32>,
        log_sigmoid_pi: Vec<f32>,
        log_theta: Vec<f32>,
        theta_of: ThetaOf,
    },
    Heads(DecoderHeads),
}

/// Whose θ a pool's log θ rows are (see [`crate::kernels::pool::Theta`]).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum ThetaOf {
    Gene,
    Candidate,
    Cell,
}

impl ScorePool {
    /// The pool of `heads`. When the heads carry one θ row per row, a
    /// gene-cell dispersion keeps θ per candidate; otherwise (a gene-batch
    /// dispersion decoded with each row's batch) row i is the i-th scored
    /// cell's own decoding and θ is kept per cell.
    pub fn new(decoder: &CountDecoder, heads: DecoderHeads) -> ScorePool {
        let family = decoder.likelihood();
        let host = heads.logits.device() == Device::Cpu && matches!(family, Likelihood::Nb | Likelihood::Zinb);
        let Some(lt) = heads.log_theta.as_ref().filter(|_| host) else { return ScorePool::Heads(heads) };
        let flat = |t: &Tensor| Vec::<f32>::try_from(t.contiguous().flatten(0, -1)).expect("floats");
        let n_genes = heads.logits.size()[1] as usize;
        let (log_theta, theta_of) = if lt.dim() == 1 {
            (flat(lt), ThetaOf::Gene)
        } else if decoder.cell_dispersion() {
            (flat(lt), ThetaOf::Candidate)
        } else {
            (flat(lt), ThetaOf::Cell)
        };
        // Each tensor freed as soon as it is copied: the pool is the largest
        // thing the analyses hold.
        let DecoderHeads { logits, pi_logits, .. } = heads;
        let rho = tch::no_grad(|| flat(&logits.softmax(-1, Kind::Float)));
        drop(logits);
        let (pi, log_sigmoid_pi) = match pi_logits {
            Some(p) if family == Likelihood::Zinb => (flat(&p), tch::no_grad(|| flat(&p.log_sigmoid()))),
            _ => (vec![], vec![]),
        };
        ScorePool::Host { family, n_genes, rho, pi, log_sigmoid_pi, log_theta, theta_of }
    }

    /// −log p(x_i | candidate) for each of `rows` (cells of `data`) and its
    /// `k` candidates (`cand`, rows of the pool, flat); `log_library`
    /// [rows, 1]. Returns [rows, k] on the pool's device.
    pub fn nll(
        &self,
        decoder: &CountDecoder,
        data: &VaeData,
        rows: &[usize],
        cand: &[i64],
        log_library: &Tensor,
        k: usize,
    ) -> Tensor {
        match self {
            ScorePool::Heads(pool) => {
                let pick = Tensor::from_slice(cand).to_device(log_library.device());
                candidate_nll(decoder, data, rows, pool, &pick, log_library, k)
            }
            ScorePool::Host { family, n_genes, rho, pi, log_sigmoid_pi, log_theta, theta_of } => {
                use crate::kernels::pool::{Pool, Theta};
                let log_theta = match theta_of {
                    ThetaOf::Gene => Theta::Shared(log_theta),
                    ThetaOf::Candidate => Theta::PerCandidate(log_theta),
                    ThetaOf::Cell => Theta::PerCell(log_theta),
                };
                let pool = Pool { family: *family, n_genes: *n_genes, rho, pi, log_sigmoid_pi, log_theta };
                let lib = Vec::<f32>::try_from(log_library.flatten(0, -1)).expect("floats");
                let cand: Vec<u32> = cand.iter().map(|&c| c as u32).collect();
                let mut ll = vec![0f32; rows.len() * k];
                data.counts.with_rows(rows, false, |m, local| {
                    let sub = m.select_rows(local);
                    let counts =
                        crate::kernels::fused::Rows { indptr: &sub.indptr, indices: &sub.indices, values: &sub.values };
                    crate::kernels::pool::pool_log_likelihood(&pool, counts, &lib, &cand, k, &mut ll);
                });
                for (x, v) in ll.iter_mut().enumerate() {
                    *v = data.log_factorial[rows[x / k]] - *v;
                }
                Tensor::from_slice(&ll).view([rows.len() as i64, k as i64])
            }
        }
    }
}

/// `candidate_nll` with the heads already one row per (cell, candidate);
/// with `ranking`, each value may leave out terms of the cell's counts and
/// θ alone (see `CountDecoder::ranking_log_likelihood_heads`): the order of
/// a cell's candidates is kept, not the values.
fn nll_of_heads(
    decoder: &CountDecoder,
    data: &VaeData,
    rows: &[usize],
    heads: DecoderHeads,
    log_library: &Tensor,
    k: usize,
    ranking: bool,
) -> Tensor {
    let device = heads.logits.device();
    let rep: Vec<usize> = rows.iter().flat_map(|&r| std::iter::repeat_n(r, k)).collect();
    let x = data.counts.with_rows(&rep, false, |m, local| SparseBatch::from_csr(m, local, device));
    let lf: Vec<f32> = rep.iter().map(|&r| data.log_factorial[r]).collect();
    let lf = Tensor::from_slice(&lf).to_device(device);
    let lib = log_library.repeat_interleave_self_int(k as i64, Some(0), None);
    let ll = if ranking {
        decoder.ranking_log_likelihood_heads(&x, &lf, heads, &lib)
    } else {
        decoder.log_likelihood_heads(&x, &lf, heads, &lib)
    };
    (-ll).view([rows.len() as i64, k as i64])
}

/// `candidate_nll` for candidate latents `z` ([rows · k, d]) decoded with
/// each cell's own batch (output products in bf16 when `bf16`), for ranking
/// each cell's candidates: a value may leave out terms of the cell's counts
/// and θ alone, the same for all its candidates.
#[allow(clippy::too_many_arguments)]
pub fn decode_candidates_nll(
    decoder: &CountDecoder,
    data: &VaeData,
    rows: &[usize],
    z: &Tensor,
    k: usize,
    log_library: &Tensor,
    pass: Pass,
    bf16: bool,
) -> Tensor {
    let device = z.device();
    let rep: Vec<usize> = rows.iter().flat_map(|&r| std::iter::repeat_n(r, k)).collect();
    let design = data.covariates.design(&rep, None, device);
    let batch = data.covariates.batch_codes(&rep, None, device);
    // Each candidate is scored by one cell only: the fused kernel on its
    // rows beat a pool here (3.8 against 5.0 ms per training step), which
    // pays off only when many cells share the pool's rows.
    let heads = decoder.heads_with(z, &design, &batch, pass, bf16);
    nll_of_heads(decoder, data, rows, heads, log_library, k, true)
}

/// `cells` ordered so that cells near each other in the latent space
/// (`latent`, row-major with `d` columns) come together: the leaves, in
/// order, of a k-d tree split at the median of the widest coordinate down
/// to 32 cells.
pub(crate) fn locality_order(latent: &[f32], d: usize, cells: &[usize]) -> Vec<usize> {
    fn split(latent: &[f32], d: usize, cells: &mut [usize]) {
        if cells.len() <= 32 || d == 0 {
            return;
        }
        let widest = (0..d)
            .map(|j| {
                let (lo, hi) = cells.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &c| {
                    let v = latent[c * d + j];
                    (lo.min(v), hi.max(v))
                });
                (j, hi - lo)
            })
            .fold((0, f32::NEG_INFINITY), |best, w| if w.1 > best.1 { w } else { best })
            .0;
        let mid = cells.len() / 2;
        cells.select_nth_unstable_by(mid, |&a, &b| latent[a * d + widest].total_cmp(&latent[b * d + widest]));
        let (left, right) = cells.split_at_mut(mid);
        split(latent, d, left);
        split(latent, d, right);
    }
    let mut cells = cells.to_vec();
    split(latent, d, &mut cells);
    cells
}

/// The decoder heads of every row of `z` under batch `b` (one-hot of
/// `n_batch`), in evaluation mode; a per-batch θ is kept as one row.
fn heads_under(decoder: &CountDecoder, z: &Tensor, b: usize, n_batch: usize) -> DecoderHeads {
    let device = z.device();
    let n = z.size()[0];
    let (mut logits, mut pis, mut theta) = (vec![], vec![], None);
    tch::no_grad(|| {
        for start in (0..n).step_by(4096) {
            let len = 4096.min(n - start);
            let batch = Tensor::full([len], b as i64, (Kind::Int64, device));
            let design = batch.one_hot(n_batch as i64).to_kind(Kind::Float);
            let h = decoder.heads(&z.narrow(0, start, len), &design, &batch, Pass::Eval);
            logits.push(h.logits);
            if let Some(p) = h.pi_logits {
                pis.push(p);
            }
            if theta.is_none() {
                theta = h.log_theta.map(|t| if t.dim() == 2 && !decoder.cell_dispersion() { t.get(0) } else { t });
            }
        }
    });
    DecoderHeads {
        logits: Tensor::cat(&logits, 0),
        log_theta: theta,
        pi_logits: (!pis.is_empty()).then(|| Tensor::cat(&pis, 0)),
    }
}

/// Target cells as the analyses read them.
pub struct TargetCells<'a> {
    pub data: VaeData<'a>,
    pub reps: Representations,
}

impl SpeciesModel {
    /// Encodes target cells (`counts` in the model's target gene order).
    pub fn target_cells<'a>(&self, counts: &'a Csr, cov: &'a Covariates) -> TargetCells<'a> {
        let data = VaeData::new(counts, cov);
        let reps = encode_all(&self.target, self.target_inner(), &data, self.device(), false);
        TargetCells { data, reps }
    }

    /// NLL of each target cell under its own posterior mean: the zero of sim.
    fn own_nll(&self, t: &TargetCells) -> Tensor {
        let n = t.data.n_cells();
        let rows: Vec<usize> = (0..n).collect();
        let mut out = Vec::new();
        tch::no_grad(|| {
            for chunk in rows.chunks(1024) {
                let at =
                    Tensor::from_slice(&chunk.iter().map(|&r| r as i64).collect::<Vec<_>>()).to_device(self.device());
                let z = t.reps.mean.index_select(0, &at);
                let lib = t.reps.log_library.index_select(0, &at);
                // Through the same scoring as the candidates, so that sim is
                // 0 at the cell's own latent up to rounding.
                let design = t.data.covariates.design(chunk, None, self.device());
                let batch = t.data.covariates.batch_codes(chunk, None, self.device());
                let heads = self.target.decoder.heads(&z, &design, &batch, Pass::Eval);
                let own = ScorePool::new(&self.target.decoder, heads);
                let cand: Vec<i64> = (0..chunk.len() as i64).collect();
                out.push(own.nll(&self.target.decoder, &t.data, chunk, &cand, &lib, 1));
            }
        });
        Tensor::cat(&out, 0).view([-1])
    }

    /// sim(i, j) for target cells `rows` (all of batch `b`) and context
    /// cells `cand` (flat, `k` per row), with `pool` the context latents
    /// decoded under `b`. Returns [rows, k] (f64, row-major).
    fn similarities(
        &self,
        t: &TargetCells,
        own: &[f32],
        rows: &[usize],
        pool: &ScorePool,
        cand: &[i64],
        k: usize,
    ) -> Vec<f64> {
        let device = self.device();
        let at = Tensor::from_slice(&rows.iter().map(|&r| r as i64).collect::<Vec<_>>()).to_device(device);
        let lib = t.reps.log_library.index_select(0, &at);
        let nll = tch::no_grad(|| pool.nll(&self.target.decoder, &t.data, rows, cand, &lib, k));
        let v: Vec<f32> = Vec::try_from(nll.to_device(Device::Cpu).flatten(0, -1)).expect("floats");
        v.iter().enumerate().map(|(x, &nll)| (nll - own[rows[x / k]]) as f64).collect()
    }

    /// scSpecies' label transfer: each target cell's `n_candidates` nearest
    /// context cells in the latent space, ranked by sim; the majority label
    /// of the `top_neigh` most similar (ties: the first label in level
    /// order), with its vote share as confidence, and the median sim of
    /// those `top_neigh` cells.
    pub fn transfer_labels(
        &self,
        t: &TargetCells,
        n_candidates: usize,
        top_neigh: usize,
        interrupted: &dyn Fn() -> bool,
    ) -> Result<Transfer> {
        let nc = self.meta.context_cells.len();
        let k = n_candidates.min(nc).max(1);
        let top = top_neigh.min(k).max(1);
        let n = t.data.n_cells();
        let own: Vec<f32> = Vec::try_from(self.own_nll(t).to_device(Device::Cpu)).expect("floats");
        let neighbours = latent_neighbours(&t.reps.mean, &self.context_latent, k);
        let n_levels = self.meta.label_levels.len();
        let mut out = Transfer { label: vec![0; n], confidence: vec![0.0; n], similarity: vec![0.0; n] };
        let latent: Vec<f32> = Vec::try_from(t.reps.mean.to_device(Device::Cpu).flatten(0, -1)).expect("floats");
        for (b, cells) in t.data.covariates.batch.cells_by_level().iter().enumerate() {
            if cells.is_empty() {
                continue;
            }
            // Cells near in the latent space share most of their candidates:
            // scored one after the other, they find the candidates' decoded
            // rows still in cache (each cell's result is its own).
            let cells = locality_order(&latent, self.meta.config.n_latent, cells);
            let pool = ScorePool::new(
                &self.target.decoder,
                heads_under(&self.target.decoder, &self.context_latent, b, self.target.shape.n_batch),
            );
            for chunk in cells.chunks(16) {
                if interrupted() {
                    return invalid!("interrupted");
                }
                let cand: Vec<i64> =
                    chunk.iter().flat_map(|&r| neighbours[r * k..(r + 1) * k].iter().map(|&c| c as i64)).collect();
                let sims = self.similarities(t, &own, chunk, &pool, &cand, k);
                for (x, &r) in chunk.iter().enumerate() {
                    let mut order: Vec<usize> = (0..k).collect();
                    let s = &sims[x * k..(x + 1) * k];
                    order.sort_by(|&a, &b| s[a].total_cmp(&s[b]));
                    let mut votes = vec![0usize; n_levels];
                    for &o in &order[..top] {
                        votes[self.meta.context_labels[cand[x * k + o] as usize] as usize] += 1;
                    }
                    let most = *votes.iter().max().unwrap_or(&0);
                    let best = votes.iter().position(|&v| v == most).unwrap_or(0);
                    out.label[r] = best as u32;
                    out.confidence[r] = most as f64 / top as f64;
                    out.similarity[r] = nan_median(&order[..top].iter().map(|&o| s[o]).collect::<Vec<_>>());
                }
            }
        }
        Ok(out)
    }

    /// scSpecies' cell-type similarity: for each target type T (codes
    /// `labels` into `n_levels` target types) and context type C, sim over
    /// up to `max_target` cells of T each against up to `max_context`
    /// cells of C; the value is minus the mode of those values (the
    /// midpoint of the fullest bin of a Freedman–Diaconis histogram), so
    /// that 0 is most similar. Row-major [target types, context types];
    /// NaN where a type has no cells.
    pub fn similarity_table(
        &self,
        t: &TargetCells,
        labels: &[u32],
        n_levels: usize,
        max_target: usize,
        max_context: usize,
        seed: u64,
    ) -> Result<Vec<f64>> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let nl = self.meta.label_levels.len();
        let mut by_ctx: Vec<Vec<usize>> = vec![Vec::new(); nl];
        for (i, &l) in self.meta.context_labels.iter().enumerate() {
            by_ctx[l as usize].push(i);
        }
        let own: Vec<f32> = Vec::try_from(self.own_nll(t).to_device(Device::Cpu)).expect("floats");
        let mut values: Vec<Vec<f64>> = vec![Vec::new(); n_levels * nl];
        let batches = t.data.covariates.batch.cells_by_level();
        for (b, cells) in batches.iter().enumerate() {
            if cells.is_empty() {
                continue;
            }
            let pool = ScorePool::new(
                &self.target.decoder,
                heads_under(&self.target.decoder, &self.context_latent, b, self.target.shape.n_batch),
            );
            for tt in 0..n_levels {
                let mut of_type: Vec<usize> = cells.iter().copied().filter(|&c| labels[c] as usize == tt).collect();
                // Cells of T over all batches share `max_target`, by batch size.
                let total = labels.iter().filter(|&&l| l as usize == tt).count();
                let quota = ((max_target as f64) * of_type.len() as f64 / total.max(1) as f64).ceil() as usize;
                of_type.shuffle(&mut rng);
                of_type.truncate(quota);
                for chunk in of_type.chunks(8) {
                    // Each target cell gets its own draw of context cells per type.
                    let mut cand = Vec::new();
                    let mut segment = Vec::new();
                    for _ in chunk {
                        for (c, members) in by_ctx.iter().enumerate() {
                            for &j in members.choose_multiple(&mut rng, max_context.min(members.len())) {
                                cand.push(j as i64);
                                segment.push(c);
                            }
                        }
                    }
                    let k = cand.len() / chunk.len().max(1);
                    if k == 0 {
                        continue;
                    }
                    let sims = self.similarities(t, &own, chunk, &pool, &cand, k);
                    for (x, &s) in sims.iter().enumerate() {
                        values[tt * nl + segment[x]].push(s);
                    }
                }
            }
        }
        Ok(values.into_iter().map(|v| if v.is_empty() { f64::NAN } else { -histogram_mode(&v) }).collect())
    }

    /// scSpecies' homologous-gene log2 fold changes, target vs context, for
    /// each cell type shared by the target labels (`labels` codes into
    /// `levels`) and the context; see [`FoldChanges`].
    #[allow(clippy::too_many_arguments)]
    pub fn fold_changes(
        &self,
        t: &TargetCells,
        labels: &[u32],
        levels: &[String],
        n_samples: usize,
        delta: f64,
        seed: u64,
    ) -> Result<Vec<FoldChanges>> {
        let device = self.device();
        let d = self.meta.config.n_latent;
        let h_ctx: Vec<i64> = self.meta.homologs.iter().map(|p| p.0 as i64).collect();
        let h_tgt: Vec<i64> = self.meta.homologs.iter().map(|p| p.1 as i64).collect();
        let h_ctx_t = Tensor::from_slice(&h_ctx).to_device(device);
        let h_tgt_t = Tensor::from_slice(&h_tgt).to_device(device);
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut perm: Vec<usize> = (0..h_ctx.len()).collect();
        perm.shuffle(&mut rng);
        let (t_heads, c_heads) = (self.target.decoder.gene_heads(&h_tgt_t), self.context.decoder.gene_heads(&h_ctx_t));
        tch::manual_seed(seed as i64);
        let chi = ChiSquared::new(d as f64).expect("positive df").inverse_cdf(0.9).sqrt();
        let mut out = Vec::new();
        for (tt, name) in levels.iter().enumerate() {
            let Some(ct) = self.meta.label_levels.iter().position(|l| l == name) else { continue };
            let cells: Vec<usize> = (0..labels.len()).filter(|&i| labels[i] as usize == tt).collect();
            let ctx_cells: Vec<usize> =
                (0..self.meta.context_labels.len()).filter(|&i| self.meta.context_labels[i] as usize == ct).collect();
            if cells.is_empty() || ctx_cells.is_empty() {
                continue;
            }
            let at = Tensor::from_slice(&cells.iter().map(|&c| c as i64).collect::<Vec<_>>()).to_device(device);
            let mean = t.reps.mean.index_select(0, &at);
            let kept = mahalanobis_keep(&mean, chi);
            let keep = Tensor::from_slice(&kept.iter().map(|&i| i as i64).collect::<Vec<_>>()).to_device(device);
            let (mean, var) = (mean.index_select(0, &keep), t.reps.var.index_select(0, &at).index_select(0, &keep));
            let (lm, lv) = (
                t.reps.log_library.index_select(0, &at).index_select(0, &keep),
                t.reps.log_library_var.index_select(0, &at).index_select(0, &keep),
            );
            // The context library of each kept cell: mean library of its 25
            // nearest context cells of the type in the latent space.
            let ctx_at = Tensor::from_slice(&ctx_cells.iter().map(|&c| c as i64).collect::<Vec<_>>()).to_device(device);
            let ctx_z = self.context_latent.index_select(0, &ctx_at);
            let kn = 25.min(ctx_cells.len());
            let nb = latent_neighbours(&mean, &ctx_z, kn);
            let nb = Tensor::from_slice(&nb.iter().map(|&i| i as i64).collect::<Vec<_>>()).to_device(device);
            let ctx_lib = self
                .context_log_library
                .index_select(0, &ctx_at)
                .exp()
                .index_select(0, &nb)
                .view([-1, kn as i64])
                .mean_dim(-1, true, Kind::Float);
            let t_batches =
                present_batches(cells.iter().map(|&c| t.data.covariates.batch.codes[c]), self.target.shape.n_batch);
            let c_batches =
                present_batches(ctx_cells.iter().map(|&c| self.meta.context_batches[c]), self.context.shape.n_batch);
            let draws = (n_samples / kept.len().max(1)).max(1);
            // Each draw's ρ gene-major ([genes, cells]) so that a gene's
            // values over all draws are one contiguous run.
            let (mut rt, mut rc, mut lib_t) = (vec![], vec![], vec![]);
            tch::no_grad(|| {
                for _ in 0..draws {
                    let z = &mean + var.sqrt() * mean.randn_like();
                    lib_t.push((&lm + lv.sqrt() * lm.randn_like()).exp());
                    rt.push(homologous_scale(&self.target, &t_heads, &z, &t_batches).tr());
                    rc.push(homologous_scale(&self.context, &c_heads, &z, &c_batches).tr());
                }
            });
            let floats = |x: Tensor| -> Vec<f32> {
                Vec::try_from(x.to_device(Device::Cpu).contiguous().flatten(0, -1)).expect("floats")
            };
            let lib_c = floats(ctx_lib).repeat(draws);
            let s = summarise_draws(
                &floats(Tensor::cat(&rt, 1)),
                &floats(Tensor::cat(&rc, 1)),
                &floats(Tensor::cat(&lib_t, 0)),
                &lib_c,
                &perm,
                delta,
            );
            out.push(FoldChanges {
                cell_type: name.clone(),
                n_target_cells: cells.len(),
                n_used: kept.len(),
                rho_median_context: s.iter().map(|g| g.rho_context).collect(),
                mu_median_context: s.iter().map(|g| g.mu_context).collect(),
                rho_median_target: s.iter().map(|g| g.rho_target).collect(),
                mu_median_target: s.iter().map(|g| g.mu_target).collect(),
                lfc: s.iter().map(|g| g.lfc).collect(),
                p: s.iter().map(|g| g.p).collect(),
                lfc_rand: s.iter().map(|g| g.lfc_rand).collect(),
                p_rand: s.iter().map(|g| g.p_rand).collect(),
            });
        }
        Ok(out)
    }
}

/// Labels transferred to target cells.
#[derive(Debug, Clone)]
pub struct Transfer {
    /// Codes into the context's label levels.
    pub label: Vec<u32>,
    /// Share of the `top_neigh` most similar context cells with that label.
    pub confidence: Vec<f64>,
    /// Median sim of those cells (0: as good as the cell's own latent).
    pub similarity: Vec<f64>,
}

/// Fold changes of one shared cell type, one value per homologous pair (in
/// the model's pair order): medians over posterior draws of the target
/// cells of the type, decoded by both decoders (averaged over the batches
/// in which the type has more than 3 cells) with the softmax taken over the
/// homologous genes only (times 1 − π under ZINB); `p` the share of draws
/// with |LFC| > δ; `*_rand` the same with the context genes permuted (one
/// permutation for all types), the null of no gene-wise correspondence.
#[derive(Debug, Clone)]
pub struct FoldChanges {
    pub cell_type: String,
    pub n_target_cells: usize,
    /// Cells kept after the outlier filter (Mahalanobis distance of the
    /// posterior mean within the type under the χ² 0.9 quantile).
    pub n_used: usize,
    pub rho_median_context: Vec<f64>,
    pub mu_median_context: Vec<f64>,
    pub rho_median_target: Vec<f64>,
    pub mu_median_target: Vec<f64>,
    pub lfc: Vec<f64>,
    pub p: Vec<f64>,
    pub lfc_rand: Vec<f64>,
    pub p_rand: Vec<f64>,
}

/// Batches with more than 3 of the cells (all batches present if none).
fn present_batches(codes: impl Iterator<Item = u32>, n_batch: usize) -> Vec<usize> {
    let mut count = vec![0usize; n_batch];
    for c in codes {
        count[c as usize] += 1;
    }
    let many: Vec<usize> = (0..n_batch).filter(|&b| count[b] > 3).collect();
    if many.is_empty() {
        (0..n_batch).filter(|&b| count[b] > 0).collect()
    } else {
        many
    }
}

/// Expected proportions over the homologous genes (`heads`) of latents `z`,
/// averaged over `batches`: the softmax over those genes alone, times 1 − π
/// under ZINB.
fn homologous_scale(side: &Side, heads: &GeneHeads, z: &Tensor, batches: &[usize]) -> Tensor {
    let n = z.size()[0];
    let mut acc: Option<Tensor> = None;
    for &b in batches {
        let design = Tensor::full([n], b as i64, (Kind::Int64, z.device()))
            .one_hot(side.shape.n_batch as i64)
            .to_kind(Kind::Float);
        let rho = side.decoder.gene_scale(heads, z, &design, Pass::Eval);
        acc = Some(match acc {
            Some(a) => a + rho,
            None => rho,
        });
    }
    acc.expect("at least one batch") / batches.len().max(1) as f64
}

/// One gene's summaries over the posterior draws of a cell type.
pub(super) struct GeneDraws {
    pub rho_context: f64,
    pub mu_context: f64,
    pub rho_target: f64,
    pub mu_target: f64,
    pub lfc: f64,
    pub p: f64,
    pub lfc_rand: f64,
    pub p_rand: f64,
}

/// Per-gene summaries of the draws: `rt`, `rc` the target's and context's
/// ρ gene-major (one run of `lib_t.len()` draws per gene), `lib_t`, `lib_c`
/// the libraries of the draws (μ = ρ · library); LFC = log2(ρ_t + ε) −
/// log2(ρ_c + ε) with ε = 1e-6 (scSpecies), its `_rand` twin against the
/// context gene `perm[g]`. Medians are the lower middle value (as torch's
/// `median`), shares those with |LFC| > `delta`. One pass per gene, in
/// parallel, instead of a [draws, genes] tensor per quantity.
pub(super) fn summarise_draws(
    rt: &[f32],
    rc: &[f32],
    lib_t: &[f32],
    lib_c: &[f32],
    perm: &[usize],
    delta: f64,
) -> Vec<GeneDraws> {
    use rayon::prelude::*;
    const EPS: f32 = 1e-6;
    let n = lib_t.len();
    let log2 = |x: &[f32]| -> Vec<f32> { x.par_iter().map(|v| (v + EPS).log2()).collect() };
    let (lt, lc) = (log2(rt), log2(rc));
    let median = |v: &mut [f32]| -> f64 { f64::from(*v.select_nth_unstable_by((v.len() - 1) / 2, f32::total_cmp).1) };
    let at = |g: usize| g * n..(g + 1) * n;
    (0..perm.len())
        .into_par_iter()
        .map_init(
            || vec![0f32; n],
            |buf, g| {
                let (t, c) = (&rt[at(g)], &rc[at(g)]);
                let mut med = |f: &dyn Fn(usize) -> f32| -> (f64, f64) {
                    let mut big = 0usize;
                    for (i, v) in buf.iter_mut().enumerate() {
                        *v = f(i);
                        big += usize::from(f64::from(v.abs()) > delta);
                    }
                    (median(buf), big as f64 / n as f64)
                };
                let (rho_target, _) = med(&|i| t[i]);
                let (rho_context, _) = med(&|i| c[i]);
                let (mu_target, _) = med(&|i| t[i] * lib_t[i]);
                let (mu_context, _) = med(&|i| c[i] * lib_c[i]);
                let (log_t, log_c, log_r) = (&lt[at(g)], &lc[at(g)], &lc[at(perm[g])]);
                let (lfc, p) = med(&|i| log_t[i] - log_c[i]);
                let (lfc_rand, p_rand) = med(&|i| log_t[i] - log_r[i]);
                GeneDraws { rho_context, mu_context, rho_target, mu_target, lfc, p, lfc_rand, p_rand }
            },
        )
        .collect()
}

/// Rows of `x` within Mahalanobis distance `limit` of their mean (all rows
/// when there are too few to estimate a covariance).
fn mahalanobis_keep(x: &Tensor, limit: f64) -> Vec<usize> {
    let n = x.size()[0] as usize;
    let d = x.size()[1] as usize;
    if n <= d + 1 {
        return (0..n).collect();
    }
    let x = x.to_device(Device::Cpu).to_kind(Kind::Double);
    let c = &x - x.mean_dim(0, true, Kind::Double);
    let cov = c.tr().matmul(&c) / (n as f64 - 1.0) + Tensor::eye(d as i64, (Kind::Double, Device::Cpu)) * 1e-9;
    let inv = cov.inverse();
    let m2 = (c.matmul(&inv) * &c).sum_dim_intlist(-1, false, Kind::Double);
    let m2: Vec<f64> = Vec::try_from(m2).expect("doubles");
    let kept: Vec<usize> = (0..n).filter(|&i| m2[i].sqrt() < limit).collect();
    if kept.is_empty() {
        (0..n).collect()
    } else {
        kept
    }
}

/// For each row of `q`, the `k` nearest rows of `r` (Euclidean), nearest
/// first; flat.
pub fn latent_neighbours(q: &Tensor, r: &Tensor, k: usize) -> Vec<u32> {
    let nr = r.size()[0] as usize;
    let n = q.size()[0] as usize;
    let k = k.min(nr);
    let mut out = vec![0u32; n * k];
    if k == 0 || n == 0 {
        return out;
    }
    let (q, r) = (q.to_device(Device::Cpu), r.to_device(Device::Cpu));
    let rt = r.tr();
    let rn: Vec<f32> = Vec::try_from(r.square().sum_dim_intlist(-1, false, Kind::Float)).expect("floats");
    let qn: Vec<f32> = Vec::try_from(q.square().sum_dim_intlist(-1, false, Kind::Float)).expect("floats");
    tch::no_grad(|| {
        // Blocks of 256 query rows: their products with every reference row
        // (50 MB at 50,000 references) into one buffer, read in place.
        let buffer = Tensor::empty([256.min(n as i64), nr as i64], (Kind::Float, Device::Cpu));
        for start in (0..n).step_by(256) {
            let len = 256.min(n - start);
            let mm = buffer.narrow(0, 0, len as i64);
            let _ = q.narrow(0, start as i64, len as i64).matmul_out(&mm, &rt);
            // SAFETY: `mm` is the first len rows of the contiguous f32 CPU
            // buffer, which outlives `dots`.
            let dots = unsafe { std::slice::from_raw_parts(mm.data_ptr() as *const f32, len * nr) };
            // The rows shared out among libtorch's OpenMP team (which has
            // just run the product), in contiguous parts.
            let threads = (tch::get_num_threads().max(1) as usize).min(len);
            let parts: Vec<std::sync::Mutex<&mut [u32]>> = out[start * k..(start + len) * k]
                .chunks_mut(len.div_ceil(threads) * k)
                .map(std::sync::Mutex::new)
                .collect();
            crate::kernels::omp::run(threads, &|member, members| {
                let mut cand = Vec::new();
                for (p, part) in parts.iter().enumerate().skip(member).step_by(members) {
                    let mut part = part.lock().unwrap_or_else(|e| e.into_inner());
                    let first = p * len.div_ceil(threads);
                    for (x, o) in part.chunks_mut(k).enumerate() {
                        let (qi, dot) = (qn[start + first + x], &dots[(first + x) * nr..(first + x + 1) * nr]);
                        // |q|² + |r|² − 2 q·r, in the order of the tensor expression it replaced.
                        nearest_k(nr, |j| (qi + rn[j]) - dot[j] * 2.0, k, &mut cand, o);
                    }
                }
            });
        }
    });
    out
}

/// The indices of the `k` smallest of `d(0..n)` into `out`, ascending
/// (ties: the lower index first). Only the entries at or under a threshold
/// are ranked: a value from a strided sample of d that about 2k + 100
/// entries fall under; where fewer than k do, every entry is ranked.
fn nearest_k(n: usize, d: impl Fn(usize) -> f32, k: usize, cand: &mut Vec<(f32, u32)>, out: &mut [u32]) {
    let before = |a: &(f32, u32), b: &(f32, u32)| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1));
    cand.clear();
    if n > 8 * k + 1024 {
        let stride = (n / 4096).max(1);
        let mut sample: Vec<f32> = (0..n).step_by(stride).map(&d).collect();
        let at = ((2 * k + 100) / stride).min(sample.len() - 1);
        let threshold = *sample.select_nth_unstable_by(at, |a, b| a.total_cmp(b)).1;
        for j in 0..n {
            let v = d(j);
            if v <= threshold {
                cand.push((v, j as u32));
            }
        }
    }
    if cand.len() < k {
        cand.clear();
        cand.extend((0..n).map(|j| (d(j), j as u32)));
    }
    if cand.len() > k {
        cand.select_nth_unstable_by(k - 1, before);
    }
    let first = &mut cand[..k];
    first.sort_unstable_by(before);
    for (o, c) in out.iter_mut().zip(first.iter()) {
        *o = c.1;
    }
}

/// The mode of `v` as the midpoint of the fullest bin of a histogram with
/// Freedman–Diaconis bins (width 2 · IQR · n^(−1/3); numpy's `bins='fd'`).
pub fn histogram_mode(v: &[f64]) -> f64 {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if s.is_empty() {
        return f64::NAN;
    }
    let lo = s.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let iqr = quantile(&mut s, 0.75) - quantile(&mut s, 0.25);
    let width = 2.0 * iqr / (s.len() as f64).cbrt();
    if !(width > 0.0) || hi <= lo {
        return nan_median(&s);
    }
    let bins = (((hi - lo) / width).ceil() as usize).clamp(1, 100_000);
    let w = (hi - lo) / bins as f64;
    let mut count = vec![0usize; bins];
    for &x in &s {
        count[(((x - lo) / w) as usize).min(bins - 1)] += 1;
    }
    let best = count.iter().enumerate().max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(&a.0))).map_or(0, |(i, _)| i);
    lo + (best as f64 + 0.5) * w
}
