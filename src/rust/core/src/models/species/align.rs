//! The alignment of the target to the context (scSpecies): homologous gene
//! pairs, the context cells' representations, the data-level neighbour
//! search on homologous genes, the neighbour-label agreement that picks the
//! target cells to pull, and the alignment term of a minibatch.

use super::analysis::decode_candidates_nll;
use super::{Alignment, Encoded, Side, SpeciesModel};
use crate::data::Csr;
use crate::error::{invalid, Result};
use crate::models::vae::VaeData;
use crate::nn::{GaussianEncoder, Pass};
use std::collections::{HashMap, HashSet};
use tch::{Device, Kind, Tensor};

/// One-to-one (context gene, target gene) index pairs from name pairs
/// (target, context), in the order given: a gene already paired keeps its
/// first partner (as scSpecies, which keeps the first homolog it meets).
/// Pairs naming a gene absent from the data are dropped; none left is an
/// error that says how many names matched.
pub fn homolog_pairs(pairs: &[(String, String)], context: &[String], target: &[String]) -> Result<Vec<(u32, u32)>> {
    let at = |genes: &[String]| -> HashMap<String, u32> {
        genes.iter().enumerate().map(|(i, g)| (g.clone(), i as u32)).collect()
    };
    let (c_at, t_at) = (at(context), at(target));
    let (mut c_used, mut t_used) = (HashSet::new(), HashSet::new());
    let mut out = Vec::new();
    for (t, c) in pairs {
        if let (Some(&ci), Some(&ti)) = (c_at.get(c), t_at.get(t)) {
            if !c_used.contains(&ci) && !t_used.contains(&ti) {
                c_used.insert(ci);
                t_used.insert(ti);
                out.push((ci, ti));
            }
        }
    }
    if out.is_empty() {
        let t_hit = pairs.iter().filter(|p| t_at.contains_key(&p.0)).count();
        let c_hit = pairs.iter().filter(|p| c_at.contains_key(&p.1)).count();
        return invalid!(
            "no homologous genes in common: of {} homolog pairs, {t_hit} name a gene of the target data and {c_hit} a \
             gene of the context data, but none both (check that the table's columns are target, then context genes, \
             and that the gene names are of the same kind, e.g. symbols)",
            pairs.len()
        );
    }
    Ok(out)
}

/// Representations of a set of cells, in evaluation mode: the outer
/// encoder's output, the posterior of z and the library's log mean.
pub struct Representations {
    pub inter: Tensor,
    pub mean: Tensor,
    pub var: Tensor,
    pub log_library: Tensor,
    pub log_library_var: Tensor,
}

/// Runs every cell of `data` through `side`'s encoders (with `inner`).
pub fn encode_all(
    side: &Side,
    inner: &GaussianEncoder,
    data: &VaeData,
    device: Device,
    keep_inter: bool,
) -> Representations {
    let n = data.n_cells();
    let rows: Vec<usize> = (0..n).collect();
    let (mut inter, mut mean, mut var, mut lm, mut lv) = (vec![], vec![], vec![], vec![], vec![]);
    tch::no_grad(|| {
        for chunk in rows.chunks(1024) {
            let inp = data.inputs(chunk, None, device);
            let e: Encoded = side.encode(inner, &inp, Pass::Eval);
            if keep_inter {
                inter.push(e.inter);
            }
            mean.push(e.qz.0);
            var.push(e.qz.1);
            lm.push(e.ql.0);
            lv.push(e.ql.1);
        }
    });
    let cat =
        |v: Vec<Tensor>| if v.is_empty() { Tensor::zeros([0], (Kind::Float, device)) } else { Tensor::cat(&v, 0) };
    Representations {
        inter: cat(inter),
        mean: cat(mean),
        var: cat(var),
        log_library: cat(lm),
        log_library_var: cat(lv),
    }
}

/// The context cells' representations after the context phase.
pub fn context_representations(model: &SpeciesModel, data: &VaeData) -> Representations {
    let inner = model.context.inner.as_ref().expect("the context has an inner encoder");
    encode_all(&model.context, inner, data, model.device(), true)
}

/// For each target cell, its `k` nearest context cells by cosine distance
/// of log(1 + counts) on the homologous genes (scSpecies' data-level
/// search: no normalisation, no PCA, all context cells), nearest first;
/// flat, `k` per target cell.
///
/// With `bf16`, the all-pairs product (most of the cost) runs in bf16 and
/// picks 2k + 10 candidates per cell, which are then ranked by their exact
/// f32 similarity: the result differs from the f32 search only where a
/// true neighbour falls outside those candidates (a near tie at the k-th
/// place).
pub fn data_neighbours(
    context: &Csr,
    target: &Csr,
    pairs: &[(u32, u32)],
    k: usize,
    device: Device,
    bf16: bool,
) -> Vec<u32> {
    neighbours_with(context, target, pairs, k, device, bf16, device == Device::Cpu)
}

/// `data_neighbours`, with the exact re-ranking of the bf16 candidates read
/// in place from the unit rows (`in_place`, CPU only) or made of gathered
/// rows by libtorch (any device).
pub(super) fn neighbours_with(
    context: &Csr,
    target: &Csr,
    pairs: &[(u32, u32)],
    k: usize,
    device: Device,
    bf16: bool,
    in_place: bool,
) -> Vec<u32> {
    let c_cols: Vec<usize> = pairs.iter().map(|p| p.0 as usize).collect();
    let t_cols: Vec<usize> = pairs.iter().map(|p| p.1 as usize).collect();
    let unit = |m: &Csr, cols: &[usize]| -> Tensor {
        let h = m.select_columns(cols);
        let rows: Vec<usize> = (0..h.n_rows).collect();
        let x = crate::data::log1p_rows_to_tensor(&h, &rows, device);
        let norm = x.square().sum_dim_intlist(-1, true, Kind::Float).sqrt().clamp_min(1e-12);
        (x / norm).contiguous()
    };
    let c = unit(context, &c_cols);
    let t = unit(target, &t_cols);
    let nc = context.n_rows as i64;
    let k = k.min(context.n_rows) as i64;
    let wide = (2 * k + 10).min(nc);
    let bf16 = bf16 && wide < nc;
    let ct = if bf16 { c.to_kind(Kind::BFloat16).tr() } else { c.tr() };
    let block = 1024.min(target.n_rows.max(1) as i64);
    // One product buffer for all blocks: a fresh one per block costs its
    // page faults again (100 MB at 50,000 context cells).
    let product = Tensor::empty([block, nc], (ct.kind(), device));
    let mut out = Vec::with_capacity(target.n_rows * k as usize);
    tch::no_grad(|| {
        for start in (0..target.n_rows as i64).step_by(block as usize) {
            let len = block.min(target.n_rows as i64 - start);
            let tb = t.narrow(0, start, len);
            let p = product.narrow(0, 0, len);
            if !bf16 {
                let _ = tb.mm_out(&p, &ct);
                let idx = p.topk(k, 1, true, true).1;
                out.extend(
                    Vec::<i64>::try_from(idx.to_device(Device::Cpu).flatten(0, -1))
                        .expect("indices")
                        .into_iter()
                        .map(|i| i as u32),
                );
                continue;
            }
            let _ = tb.to_kind(Kind::BFloat16).mm_out(&p, &ct);
            let near = p.topk(wide, 1, true, false).1;
            if in_place {
                let near = Vec::<i64>::try_from(near.flatten(0, -1)).expect("indices");
                rerank_in_place(&c, &t, start as usize, &near, wide as usize, k as usize, &mut out);
            } else {
                // The exact similarity of each candidate, in blocks of 128 cells.
                for s in (0..len).step_by(128) {
                    let l = 128.min(len - s);
                    let cand = near.narrow(0, s, l);
                    let rows = c.index_select(0, &cand.flatten(0, -1)).view([l, wide, -1]);
                    let exact = rows.bmm(&tb.narrow(0, s, l).unsqueeze(2)).squeeze_dim(2);
                    let (_, best) = exact.topk(k, 1, true, true);
                    let idx = cand.gather(1, &best, false).to_device(Device::Cpu).flatten(0, -1);
                    out.extend(Vec::<i64>::try_from(idx).expect("indices").into_iter().map(|i| i as u32));
                }
            }
        }
    });
    out
}

/// The exact re-ranking on the CPU: for target cells `first..` (one row of
/// `wide` candidates each in `near`), the `k` candidates with the largest
/// f32 dot product of the unit rows of `t` and `c` (ties: the lower context
/// index), appended to `out`. Reads the rows where they lie, on the
/// OpenMP team; each cell's result does not depend on the team's size.
fn rerank_in_place(c: &Tensor, t: &Tensor, first: usize, near: &[i64], wide: usize, k: usize, out: &mut Vec<u32>) {
    let h = c.size()[1] as usize;
    let (nc, nt) = (c.size()[0] as usize, t.size()[0] as usize);
    assert!(c.is_contiguous() && t.is_contiguous() && c.kind() == Kind::Float && t.kind() == Kind::Float);
    // SAFETY: contiguous f32 CPU tensors of these shapes, alive for the call.
    let cs = unsafe { std::slice::from_raw_parts(c.data_ptr() as *const f32, nc * h) };
    let ts = unsafe { std::slice::from_raw_parts(t.data_ptr() as *const f32, nt * h) };
    let n = near.len() / wide;
    let at = out.len();
    out.resize(at + n * k, 0);
    let cells: Vec<usize> = (0..n).collect();
    crate::kernels::omp::on_row_blocks(&cells, &mut out[at..], k, 0, |_, cells, out| {
        let mut sims: Vec<(f32, u32)> = Vec::with_capacity(wide);
        for (&i, o) in cells.iter().zip(out.chunks_mut(k)) {
            let row = &ts[(first + i) * h..(first + i + 1) * h];
            sims.clear();
            for &j in &near[i * wide..(i + 1) * wide] {
                let j = j as usize;
                sims.push((crate::kernels::vmath::dot(row, &cs[j * h..(j + 1) * h]), j as u32));
            }
            sims.sort_unstable_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
            for (o, s) in o.iter_mut().zip(&sims) {
                *o = s.1;
            }
        }
    });
}

/// scSpecies' choice of the target cells to pull: each cell's majority
/// label among its first `k` neighbours' context labels (ties: the label met
/// first) and the votes it got; within each majority label, the cells are
/// ranked by votes and the `top_percent` % with the most are pulled.
pub fn agreement(neighbours: &[u32], labels: &[u32], n_levels: usize, k: usize, top_percent: f64) -> Vec<bool> {
    let n = neighbours.len() / k;
    let mut majority = vec![(0u32, 0usize); n];
    for (i, m) in majority.iter_mut().enumerate() {
        let mut votes = vec![0usize; n_levels];
        let mut order = Vec::new();
        for &c in &neighbours[i * k..(i + 1) * k] {
            let l = labels[c as usize] as usize;
            if votes[l] == 0 {
                order.push(l);
            }
            votes[l] += 1;
        }
        // The most votes; among equals, the label met first.
        let most = order.iter().map(|&l| votes[l]).max().unwrap_or(0);
        let best = order.iter().copied().find(|&l| votes[l] == most).unwrap_or(0);
        *m = (best as u32, votes[best]);
    }
    let mut by_label: Vec<Vec<usize>> = vec![Vec::new(); n_levels];
    for (i, &(l, _)) in majority.iter().enumerate() {
        by_label[l as usize].push(i);
    }
    let mut pulled = vec![false; n];
    for cells in by_label {
        let size = cells.len();
        let mut ranked = cells;
        // Ascending votes, stable; the score of rank r is 1 − (r + 1) / size
        // and a cell is pulled when it is below top_percent / 100.
        ranked.sort_by_key(|&i| majority[i].1);
        for (r, &i) in ranked.iter().enumerate() {
            let score = 1.0 - (r + 1) as f64 / size as f64;
            pulled[i] = score < top_percent / 100.0;
        }
    }
    pulled
}

/// What the target phase pulls toward: each target cell's candidates, the
/// cells pulled, and the context cells' representations.
pub struct AlignmentTargets {
    candidates: Vec<u32>,
    pulled: Vec<bool>,
    reps: Representations,
    k: usize,
    /// Score the candidates with bf16 output products.
    pub bf16: bool,
}

impl AlignmentTargets {
    pub fn new(candidates: Vec<u32>, pulled: Vec<bool>, reps: Representations, k: usize) -> AlignmentTargets {
        let k = if pulled.is_empty() { k } else { candidates.len() / pulled.len() };
        AlignmentTargets { candidates, pulled, reps, k, bf16: false }
    }

    pub fn n_aligned(&self) -> usize {
        self.pulled.iter().filter(|&&p| p).count()
    }

    /// The alignment term of a minibatch (before η), or `None` when none
    /// of its cells is pulled. For each pulled cell, a draw of z from each
    /// candidate's posterior is scored under the target decoder with the
    /// cell's own batch, library draw and counts (no gradient); the best
    /// candidate's "inter" (or z) is the cell's anchor, and the term is the
    /// mean squared Euclidean distance to it (scSpecies 0.1.4).
    #[allow(clippy::too_many_arguments)]
    pub fn penalty(
        &self,
        side: &Side,
        data: &VaeData,
        rows: &[usize],
        enc: &Encoded,
        z: &Tensor,
        log_library: &Tensor,
        alignment: Alignment,
        pass: Pass,
    ) -> Option<Tensor> {
        let sel: Vec<usize> = (0..rows.len()).filter(|&p| self.pulled[rows[p]]).collect();
        if sel.is_empty() {
            return None;
        }
        let device = z.device();
        let k = self.k;
        let cand: Vec<i64> = sel
            .iter()
            .flat_map(|&p| self.candidates[rows[p] * k..(rows[p] + 1) * k].iter().map(|&c| c as i64))
            .collect();
        let cand = Tensor::from_slice(&cand).to_device(device);
        let at = Tensor::from_slice(&sel.iter().map(|&p| p as i64).collect::<Vec<_>>()).to_device(device);
        let sel_rows: Vec<usize> = sel.iter().map(|&p| rows[p]).collect();
        let (best, z_best) = tch::no_grad(|| {
            let mu = self.reps.mean.index_select(0, &cand);
            let zc = &mu + self.reps.var.index_select(0, &cand).sqrt() * mu.randn_like();
            let lib = log_library.detach().index_select(0, &at);
            let nll = decode_candidates_nll(&side.decoder, data, &sel_rows, &zc, k, &lib, pass, self.bf16);
            let flat = nll.argmin(1, false) + Tensor::arange(sel.len() as i64, (Kind::Int64, device)) * k as i64;
            (cand.index_select(0, &flat), zc.index_select(0, &flat))
        });
        let gap = match alignment {
            Alignment::Inter => enc.inter.index_select(0, &at) - self.reps.inter.index_select(0, &best),
            Alignment::Latent => z.index_select(0, &at) - z_best,
        };
        Some(gap.square().sum_dim_intlist(-1, false, Kind::Float).mean(Kind::Float))
    }
}
