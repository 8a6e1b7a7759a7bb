//! Query-to-reference mapping by architectural surgery (scArches; Lotfollahi
//! et al. 2022). A trained model is rebuilt with its batch covariate
//! extended by the query's new levels: every tensor of the reference is
//! copied in, and the new slots (columns of the layers that read the batch
//! one-hot, rows of a batch embedding, entries of per-batch parameters)
//! start at the average of the reference batches' slots. (scvi-tools'
//! `load_query_data` starts them at a fresh random initialisation; from the
//! average, the query's first steps already decode with a reference batch's
//! typical effect, and per-batch dispersions start at trained values rather
//! than at exp(N(0, 1)), which a few hundred steps cannot undo.)
//! Training on the query then updates only those new slots (and, as an
//! option, the decoder's first layer): after every optimiser step each
//! reference value is put back. Adam is elementwise, so this is the same
//! update as masking the gradients, and the reference values stay exactly
//! what they were, batch-norm statistics included.

use crate::error::{invalid, Result};
use crate::train::{LossTerms, Trainable};
use serde::Deserialize;
use std::collections::{BTreeSet, HashMap};
use tch::{nn, Kind, Tensor};

/// Options of `map_query()`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MapOptions {
    /// Also train the decoder's first layer (weights and bias), as
    /// scvi-tools' `freeze_decoder_first_layer = False`.
    pub train_decoder_first_layer: bool,
}

/// The query's batch levels that are new to the model (sorted, as R's
/// `factor()` orders them). A query batch that is also a reference batch is
/// an error: its cells need no mapping.
pub fn new_levels(reference: &[String], query: &[String], batch_name: &str) -> Result<Vec<String>> {
    let levels: BTreeSet<&String> = query.iter().collect();
    if let Some(seen) = levels.iter().find(|l| reference.contains(l)) {
        return invalid!(
            "query batch '{seen}' is also a batch of the reference{}: give the query's batches names of their \
             own (a batch the model already knows needs no mapping: use latent() on its cells)",
            if batch_name.is_empty() { String::new() } else { format!(" (`{batch_name}`)") }
        );
    }
    if levels.is_empty() {
        return invalid!("the query has no cells");
    }
    Ok(levels.into_iter().cloned().collect())
}

/// Where the new slots of a grown tensor go: given a variable's name and the
/// old size of the dimension that grew, `(at, from)`: the new slots are
/// inserted before index `at`, and the reference batches' slots are
/// `from..at` (their average starts the new ones).
pub type InsertAt<'a> = &'a dyn Fn(&str, i64) -> (i64, i64);

/// The reference values of a mapped model and which entries training may change.
pub struct Frozen {
    /// (variable, its reference values, trainable entries (None: none)).
    vars: Vec<(Tensor, Tensor, Option<Tensor>)>,
}

impl Frozen {
    /// Puts every frozen entry back to its reference value.
    pub fn restore(&self) {
        tch::no_grad(|| {
            for (v, saved, mask) in &self.vars {
                let mut v = v.shallow_clone();
                match mask {
                    None => {
                        v.copy_(saved);
                    }
                    Some(m) => {
                        let kept = v.where_self(m, saved);
                        v.copy_(&kept);
                    }
                }
            }
        });
    }
}

/// Copies every tensor of `old` into the same-named variable of `new`,
/// growing the one dimension where their shapes differ: the old values
/// split at `insert_at(name, old size)` around the new slots, which start
/// at the reference batches' average. Variables named by `whole(name)` are
/// trainable in full; otherwise only the new slots are. Variables with
/// nothing trainable stop requiring a gradient (no backward pass through a
/// frozen encoder).
pub fn transplant(
    old: &nn::VarStore,
    new: &nn::VarStore,
    insert_at: InsertAt,
    whole: &dyn Fn(&str) -> bool,
) -> Result<Frozen> {
    let old_vars: HashMap<String, Tensor> = old.variables();
    let mut vars = Vec::new();
    let mut names: Vec<(String, Tensor)> = new.variables().into_iter().collect();
    names.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, mut var) in names {
        let Some(src) = old_vars.get(&name) else {
            return invalid!("internal: the mapped model has a tensor '{name}' the reference lacks");
        };
        let (ns, os) = (var.size(), src.size());
        let grown: Vec<usize> = (0..ns.len()).filter(|&d| ns.get(d) != os.get(d)).collect();
        if ns.len() != os.len() || grown.len() > 1 {
            return invalid!("internal: tensor '{name}' cannot be mapped ({os:?} to {ns:?})");
        }
        let trainable_whole = whole(&name) && var.requires_grad();
        let _guard = tch::no_grad_guard();
        let src = src.to_device(var.device());
        let (values, mask) = match grown.first() {
            None => (src, trainable_whole.then(|| var.ones_like().to_kind(Kind::Bool))),
            Some(&d) => {
                let (d, old_n) = (d as i64, os[d]);
                let k = ns[d as usize] - old_n;
                let (at, from) = insert_at(&name, old_n);
                if k <= 0 || !(0..=old_n).contains(&at) || !(0..at).contains(&from) {
                    return invalid!("internal: tensor '{name}' cannot be mapped ({os:?} to {ns:?})");
                }
                let average = src.narrow(d, from, at - from).mean_dim(d, true, src.kind());
                let fresh = average.repeat_interleave_self_int(k, d, None);
                let values = Tensor::cat(&[src.narrow(d, 0, at), fresh, src.narrow(d, at, old_n - at)], d);
                let mut mask = values.zeros_like().to_kind(Kind::Bool);
                let _ = if trainable_whole { mask.fill_(1) } else { mask.narrow(d, at, k).fill_(1) };
                (values, Some(mask))
            }
        };
        var.copy_(&values);
        if mask.is_none() && var.requires_grad() {
            let _ = var.set_requires_grad(false);
        }
        vars.push((var, values, mask));
    }
    Ok(Frozen { vars })
}

/// A model's training task whose frozen entries are put back after every step.
pub struct FrozenTask<'a> {
    pub inner: &'a dyn Trainable,
    pub frozen: &'a Frozen,
}

impl Trainable for FrozenTask<'_> {
    fn var_store(&self) -> &nn::VarStore {
        self.inner.var_store()
    }
    fn n_cells(&self) -> usize {
        self.inner.n_cells()
    }
    fn loss(&self, rows: &[usize], train: bool) -> LossTerms {
        self.inner.loss(rows, train)
    }
    fn start_epoch(&self, epoch: usize) {
        self.inner.start_epoch(epoch)
    }
    fn after_step(&self) {
        self.frozen.restore()
    }
}

#[cfg(test)]
#[path = "mapping_tests.rs"]
mod tests;
