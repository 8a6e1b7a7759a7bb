//! A trained multimodal model: fitting, its description, model files, and
//! the covariates of new cells.

use super::{infer, Multimodal, MultimodalConfig, MultimodalCovariates, MultimodalData, MultimodalTask};
use crate::data::{Categorical, CountMatrix, Csr, DiskCsr, Scan};
use crate::device::seed_torch;
use crate::error::{invalid, Result};
use crate::io;
use crate::mapping::{new_levels, transplant, FrozenTask, MapOptions};
use crate::models::fitted::{
    after_fit, codes_of, describe_meta, Cells, Elbo, ExpressionOptions, FittedModel, Latent, LatentOptions, LatentOut,
    Matrix,
};
use crate::train::{default_max_epochs, train, EpochRecord, TrainConfig, Trainable, TrainingRecord};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::any::Any;
use std::collections::HashMap;
use tch::Device;

/// A categorical covariate key of the model: its name and levels.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Key {
    pub name: String,
    pub levels: Vec<String>,
}

impl Key {
    fn of(c: &Categorical) -> Key {
        Key { name: c.name.clone(), levels: c.levels.clone() }
    }
}

/// Everything a trained multimodal model needs to be used again.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MultimodalMeta {
    pub config: MultimodalConfig,
    /// Feature names of each modality, in the model's order.
    pub features: Vec<Vec<String>>,
    pub ambient: Key,
    pub scaling: Key,
    pub dispersion: Key,
    pub library: Key,
    pub decoder: Vec<Key>,
    pub encoder: Vec<Key>,
    /// Training cells the global prior terms are divided by.
    pub n_obs: usize,
    /// Batches added by `map_query()` (the last levels of the batch's keys).
    #[serde(default)]
    pub query_batches: Vec<String>,
    #[serde(flatten)]
    pub training: TrainingRecord,
}

pub struct MultimodalModel {
    pub meta: MultimodalMeta,
    pub model: Multimodal,
}

impl std::fmt::Debug for MultimodalModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MultimodalModel").field("config", &self.meta.config).finish_non_exhaustive()
    }
}

impl MultimodalModel {
    /// Builds and trains a model on paired modalities `counts` (same cells,
    /// same order) with covariates `cov`. The feature counts and covariate
    /// widths of `config` are filled in from the data; `max_epochs == 0`
    /// means scvi-tools' default for this many cells.
    pub fn fit(
        counts: &[&CountMatrix],
        cov: &MultimodalCovariates,
        config: MultimodalConfig,
        train_cfg: TrainConfig,
        device: Device,
        interrupted: &dyn Fn() -> bool,
        on_epoch: &dyn Fn(&EpochRecord),
    ) -> Result<MultimodalModel> {
        let features: Vec<&[String]> = counts.iter().map(|c| c.genes.as_slice()).collect();
        let n_cells: Vec<usize> = counts.iter().map(|c| c.n_cells()).collect();
        Self::fit_with(&features, &n_cells, cov, config, train_cfg, device, interrupted, on_epoch, || {
            MultimodalData::new(counts.iter().map(|c| &c.csr).collect(), cov)
        })
    }

    /// `fit` on modalities that stay on disk (the same cells in the same
    /// order, read in step: `DiskCsr::in_step`), streamed epoch by epoch;
    /// `scans` are their passes of per-cell totals, `features` their
    /// feature names.
    #[allow(clippy::too_many_arguments)]
    pub fn fit_on_disk(
        disks: &[&DiskCsr],
        scans: &[Scan],
        features: &[&[String]],
        cov: &MultimodalCovariates,
        config: MultimodalConfig,
        train_cfg: TrainConfig,
        device: Device,
        interrupted: &dyn Fn() -> bool,
        on_epoch: &dyn Fn(&EpochRecord),
    ) -> Result<MultimodalModel> {
        let n_cells: Vec<usize> = disks.iter().map(|d| d.n_rows()).collect();
        Self::fit_with(features, &n_cells, cov, config, train_cfg, device, interrupted, on_epoch, || {
            MultimodalData::on_disk(disks, scans, cov)
        })
    }

    /// Fills `config`'s data-dependent sizes, checks everything, then trains
    /// on the data `data` builds.
    #[allow(clippy::too_many_arguments)]
    fn fit_with<'a>(
        features: &[&[String]],
        n_cells: &[usize],
        cov: &MultimodalCovariates,
        mut config: MultimodalConfig,
        mut train_cfg: TrainConfig,
        device: Device,
        interrupted: &dyn Fn() -> bool,
        on_epoch: &dyn Fn(&EpochRecord),
        data: impl FnOnce() -> Result<MultimodalData<'a>>,
    ) -> Result<MultimodalModel> {
        if features.len() != config.modalities.len() {
            return invalid!("{} count matrices for {} modalities", features.len(), config.modalities.len());
        }
        let n = cov.n_cells();
        for (&c, spec) in n_cells.iter().zip(&config.modalities) {
            if c != n {
                return invalid!("modality `{}` has {c} cells where the others have {n}", spec.name);
            }
        }
        for (f, spec) in features.iter().zip(config.modalities.iter_mut()) {
            spec.n_features = f.len();
        }
        config.n_ambient = cov.ambient.n_levels();
        config.n_scaling = cov.scaling.n_levels();
        config.n_dispersion = cov.dispersion.n_levels();
        config.n_library = cov.library.n_levels();
        config.n_decoder_cov = MultimodalCovariates::width(&cov.decoder);
        config.n_encoder_cov = MultimodalCovariates::width(&cov.encoder);
        if train_cfg.max_epochs == 0 {
            train_cfg.max_epochs = default_max_epochs(n);
        }
        train_cfg.check()?;
        // Every check before the global generator is seeded: a refused call
        // leaves libtorch's random state as it was.
        config.check()?;
        let data = data()?;
        seed_torch(train_cfg.seed);
        let mut model = Multimodal::new(config.clone(), device)?;
        model.init_from_data(&data)?;
        // The global terms are shared out over the cells the loop trains on
        // (on disk: outside the held-out blocks).
        let split = MultimodalTask { model: &model, data: &data }.split(train_cfg.validation_fraction, train_cfg.seed);
        let n_obs = split.0.len();
        model.n_obs = n_obs.max(1) as f64;
        let history = train(&MultimodalTask { model: &model, data: &data }, &train_cfg, interrupted, on_epoch)?;
        let meta = MultimodalMeta {
            config,
            features: features.iter().map(|f| f.to_vec()).collect(),
            ambient: Key::of(&cov.ambient),
            scaling: Key::of(&cov.scaling),
            dispersion: Key::of(&cov.dispersion),
            library: Key::of(&cov.library),
            decoder: cov.decoder.iter().map(Key::of).collect(),
            encoder: cov.encoder.iter().map(Key::of).collect(),
            n_obs,
            query_batches: vec![],
            training: TrainingRecord::new(train_cfg, history, n),
        };
        Ok(MultimodalModel { meta, model })
    }

    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        io::model_to_bytes(&self.model.vs, "multimodal", &self.meta)
    }

    pub fn from_bytes(bytes: &[u8], device: Device) -> Result<MultimodalModel> {
        let (meta, tensors): (MultimodalMeta, _) = io::model_from_bytes(bytes, "multimodal", "a multimodal model")?;
        let c = &meta.config;
        io::check_meta("modalities", meta.features.len(), c.modalities.len())?;
        for (f, spec) in meta.features.iter().zip(&c.modalities) {
            io::check_meta(&format!("features of modality `{}`", spec.name), f.len(), spec.n_features)?;
        }
        io::check_meta("ambient levels", meta.ambient.levels.len(), c.n_ambient)?;
        io::check_meta("dispersion levels", meta.dispersion.levels.len(), c.n_dispersion)?;
        io::check_meta("library levels", meta.library.levels.len(), c.n_library)?;
        io::check_meta("scaling levels", meta.scaling.levels.len(), c.n_scaling)?;
        let mut model = Multimodal::new(meta.config.clone(), device)?;
        io::load_into(&model.vs, &tensors)?;
        model.n_obs = meta.n_obs.max(1) as f64;
        Ok(MultimodalModel { meta, model })
    }

    /// The columns of each modality of new cells in the model's feature
    /// order; missing features are an error naming the modality.
    pub fn align(&self, counts: Vec<CountMatrix>) -> Result<Vec<Csr>> {
        if counts.len() != self.meta.features.len() {
            return invalid!("the model has {} modalities; got {}", self.meta.features.len(), counts.len());
        }
        counts
            .into_iter()
            .zip(&self.meta.features)
            .zip(&self.meta.config.modalities)
            .map(|((c, f), spec)| {
                let keep = c.columns_of(f, &format!(" of modality `{}`", spec.name))?;
                Ok(c.into_columns(&keep))
            })
            .collect()
    }

    /// Covariates of new cells from their labels (see `MultimodalMeta::covariates_for`).
    pub fn covariates_for(
        &self,
        n_cells: usize,
        labels: &[Option<Vec<String>>],
        strict: bool,
    ) -> Result<MultimodalCovariates> {
        self.meta.covariates_for(n_cells, labels, strict)
    }
}

impl MultimodalMeta {
    /// Covariates of new cells from their labels, one vector per key in the
    /// order ambient, scaling, dispersion, library, decoder keys, encoder
    /// keys. `None` for a key means its first level (allowed only for a key
    /// with one level, or when `strict` is false: computations that do not use it).
    pub fn covariates_for(
        &self,
        n_cells: usize,
        labels: &[Option<Vec<String>>],
        strict: bool,
    ) -> Result<MultimodalCovariates> {
        let m = self;
        let keys: Vec<&Key> = [&m.ambient, &m.scaling, &m.dispersion, &m.library]
            .into_iter()
            .chain(&m.decoder)
            .chain(&m.encoder)
            .collect();
        if labels.len() != keys.len() {
            return invalid!("internal: {} covariate label vectors for {} keys", labels.len(), keys.len());
        }
        let mut cats = Vec::with_capacity(keys.len());
        for (key, lab) in keys.iter().zip(labels) {
            let cat = match lab {
                Some(l) => {
                    let at: HashMap<&str, u32> =
                        key.levels.iter().enumerate().map(|(i, l)| (l.as_str(), i as u32)).collect();
                    let mut codes = Vec::with_capacity(l.len());
                    for v in l {
                        match at.get(v.as_str()) {
                            Some(&c) => codes.push(c),
                            None => {
                                return invalid!(
                                    "`{}` value '{v}' was not seen in training (levels: {})",
                                    key.name,
                                    crate::data::quote_some(key.levels.iter())
                                )
                            }
                        }
                    }
                    Categorical::new(&key.name, codes, key.levels.clone(), n_cells, 0)?
                }
                None if key.levels.len() == 1 || !strict => {
                    Categorical { name: key.name.clone(), codes: vec![0; n_cells], levels: key.levels.clone() }
                }
                None => return invalid!("the model uses covariate `{}`: give it for the new cells", key.name),
            };
            cats.push(cat);
        }
        let mut it = cats.into_iter();
        let mut next = || it.next().expect("one per key");
        let (ambient, scaling, dispersion, library) = (next(), next(), next(), next());
        let decoder = (0..m.decoder.len()).map(|_| next()).collect();
        let encoder = (0..m.encoder.len()).map(|_| next()).collect();
        Ok(MultimodalCovariates { ambient, scaling, dispersion, library, decoder, encoder })
    }
}

impl MultimodalModel {
    /// Posterior means of the training cells (`counts` and `cov` as fitted).
    pub fn training_latent(&self, counts: &[&CountMatrix], cov: &MultimodalCovariates) -> Result<Latent> {
        let data = MultimodalData::new(counts.iter().map(|c| &c.csr).collect(), cov)?;
        Ok(self.latent_of(&data, true))
    }

    /// `training_latent` of the training cells of `data` (in memory or on
    /// disk, as fitted) into `joint` and one `parts` per modality, in
    /// order, a minibatch at a time: never all cells in single precision
    /// beside them. `progress(done, all)` as the cells are encoded; after a
    /// fit that an interrupt ended, that interrupt does not stop it
    /// ([`after_fit`]).
    pub fn training_latent_into(
        &self,
        data: &MultimodalData,
        progress: &dyn Fn(usize, usize),
        interrupted: &dyn Fn() -> bool,
        joint: &mut LatentOut,
        parts: &mut [LatentOut],
    ) -> Result<()> {
        let n = data.n_cells();
        let specs = &self.meta.config.modalities;
        let dims: Vec<usize> = specs.iter().map(|m| m.n_latent).collect();
        let d = self.meta.config.n_latent();
        if parts.len() != dims.len() {
            return invalid!("{} latent outputs for the model's {} modalities", parts.len(), dims.len());
        }
        for (out, (&k, spec)) in std::iter::once((&*joint, (&d, None)))
            .chain(parts.iter().zip(dims.iter().zip(specs.iter().map(|m| Some(&m.name)))))
        {
            if out.len() != n * k {
                let what = spec.map_or_else(|| "the joint latent space".to_string(), |m| format!("modality '{m}'"));
                return invalid!("room for {} values of {what}; expected cells ({n}) × dimensions ({k})", out.len());
            }
        }
        let mut joint = joint.in_order(d);
        let mut parts: Vec<_> = parts.iter_mut().zip(&dims).map(|(p, &k)| p.in_order(k)).collect();
        let interrupted = after_fit(self.meta.training.interrupted, interrupted);
        infer::latent_each(&self.model, data, true, progress, interrupted, &mut |first, z, per| {
            joint.push(first, z)?;
            parts.iter_mut().zip(per).try_for_each(|(out, p)| out.push(first, p))
        })?;
        joint.finish()?;
        parts.into_iter().try_for_each(|p| p.finish())
    }

    /// The joint and per-modality latent spaces of `data`.
    fn latent_of(&self, data: &MultimodalData, give_mean: bool) -> Latent {
        let n = data.n_cells();
        let (joint, per) = infer::latent(&self.model, data, give_mean);
        let parts = self
            .meta
            .config
            .modalities
            .iter()
            .zip(per)
            .map(|(spec, z)| (spec.name.clone(), Matrix::new(n, spec.n_latent, z)))
            .collect();
        Latent { joint: Matrix::new(n, self.meta.config.n_latent(), joint), parts }
    }

    /// The cells' counts aligned to the model's features, and their
    /// covariates (`strict`: every key with several levels must be given).
    fn prepare(&self, cells: Cells, strict: bool) -> Result<(Vec<Csr>, MultimodalCovariates)> {
        let n = cells.n_cells();
        let aligned = self.align(cells.counts)?;
        let cov = self.covariates_for(n, &cells.categorical, strict)?;
        Ok((aligned, cov))
    }

    /// The keys made from the batch (named as the ambient key), set to
    /// `level` for every cell.
    fn under_batch(&self, cov: &MultimodalCovariates, level: u32) -> MultimodalCovariates {
        let name = &self.meta.ambient.name;
        let set = |c: &Categorical| -> Categorical {
            if &c.name == name {
                Categorical { codes: vec![level; c.codes.len()], ..c.clone() }
            } else {
                c.clone()
            }
        };
        MultimodalCovariates {
            ambient: set(&cov.ambient),
            scaling: set(&cov.scaling),
            dispersion: set(&cov.dispersion),
            library: set(&cov.library),
            decoder: cov.decoder.iter().map(set).collect(),
            encoder: cov.encoder.iter().map(set).collect(),
        }
    }
}

impl MultimodalModel {
    /// The model mapped onto query cells whose batches are all new (see
    /// `crate::mapping`). Every key made from the batch (named as the
    /// ambient key: by default ambient, dispersion and library; decoder or
    /// encoder keys too when the batch was given there) gains the query's
    /// levels: new rows of per-level parameters, started from the query's
    /// own data where the model starts them from data (ambient profile,
    /// library prior) and elsewhere at the reference levels' average, and
    /// new one-hot columns in the layers that read the key. Only those are
    /// trained on the query.
    pub fn map_query_cells(
        &self,
        cells: Cells,
        opts: &MapOptions,
        mut train_cfg: TrainConfig,
        interrupted: &dyn Fn() -> bool,
        on_epoch: &dyn Fn(&EpochRecord),
    ) -> Result<MultimodalModel> {
        let n = cells.n_cells();
        let batch_name = self.meta.ambient.name.clone();
        let m = &self.meta;
        let keys: Vec<&Key> = [&m.ambient, &m.scaling, &m.dispersion, &m.library]
            .into_iter()
            .chain(&m.decoder)
            .chain(&m.encoder)
            .collect();
        if batch_name.is_empty() {
            return invalid!("the model was trained without a batch: there is no batch to add the query's to");
        }
        let Some(Some(batch)) =
            keys.iter().zip(&cells.categorical).find(|(k, _)| k.name == batch_name).map(|(_, l)| l.clone())
        else {
            return invalid!(
                "give the batch of the query cells (`batch =`): each of their batches becomes a new batch of the model"
            );
        };
        let new = new_levels(&m.ambient.levels, &batch, &batch_name)?;
        let k = new.len();
        let mut meta = self.meta.clone();
        meta.query_batches.extend(new.iter().cloned());
        let grow = |key: &mut Key| {
            if key.name == batch_name {
                key.levels.extend(new.iter().cloned());
            }
        };
        for key in [&mut meta.ambient, &mut meta.scaling, &mut meta.dispersion, &mut meta.library]
            .into_iter()
            .chain(meta.decoder.iter_mut())
            .chain(meta.encoder.iter_mut())
        {
            grow(key);
        }
        let widen = |key: &Key| if key.name == batch_name { k } else { 0 };
        let (wa, ws, wd, wl) =
            (widen(&meta.ambient), widen(&meta.scaling), widen(&meta.dispersion), widen(&meta.library));
        let wdec = meta.decoder.iter().map(widen).sum::<usize>();
        let wenc = meta.encoder.iter().map(widen).sum::<usize>();
        let c = &mut meta.config;
        c.n_ambient += wa;
        c.n_scaling += ws;
        c.n_dispersion += wd;
        c.n_library += wl;
        c.n_decoder_cov += wdec;
        c.n_encoder_cov += wenc;
        // Where the batch's one-hot block ends in the decoder's and the
        // encoders' covariate vectors (keys in order), counted from the end.
        let block = |keys: &[Key]| -> Result<Option<(i64, i64)>> {
            let at: Vec<usize> =
                keys.iter().enumerate().filter(|(_, key)| key.name == batch_name).map(|(i, _)| i).collect();
            match at.as_slice() {
                [] => Ok(None),
                [i] => {
                    let after: usize = keys[i + 1..].iter().map(|key| key.levels.len()).sum();
                    Ok(Some((after as i64, keys[*i].levels.len() as i64)))
                }
                _ => invalid!("the batch `{batch_name}` enters the network twice; such a model cannot be mapped"),
            }
        };
        let (dec_block, enc_block) = (block(&self.meta.decoder)?, block(&self.meta.encoder)?);
        let cov = meta.covariates_for(n, &cells.categorical, true)?;
        let aligned = self.align(cells.counts)?;
        if train_cfg.max_epochs == 0 {
            train_cfg.max_epochs = default_max_epochs(n);
        }
        train_cfg.check()?;
        let data = MultimodalData::new(aligned.iter().collect(), &cov)?;
        let device = self.model.device();
        seed_torch(train_cfg.seed);
        let mut model = Multimodal::new(meta.config.clone(), device)?;
        let first_layer = opts.train_decoder_first_layer;
        let frozen = transplant(
            &self.model.vs,
            &model.vs,
            &|name, old| {
                let is_weight = name.ends_with(".weight") || name.ends_with(".weight_t");
                let blk = if name.contains(".decoder.") { dec_block } else { enc_block };
                match (is_weight, blk) {
                    (true, Some((after, levels))) => (old - after, old - after - levels),
                    _ => (old, 0),
                }
            },
            &|name| first_layer && name.contains(".decoder.layer0.linear."),
        )?;
        // The query's own starting values where the model takes them from
        // data (ambient profile, library prior); the reference's stay.
        model.init_from_data(&data)?;
        frozen.restore();
        let n_obs = crate::data::train_validation_split(n, train_cfg.validation_fraction, train_cfg.seed).0.len();
        model.n_obs = n_obs.max(1) as f64;
        let task = MultimodalTask { model: &model, data: &data };
        let history = train(&FrozenTask { inner: &task, frozen: &frozen }, &train_cfg, interrupted, on_epoch)?;
        meta.n_obs = n_obs;
        meta.training = TrainingRecord::new(train_cfg, history, n);
        Ok(MultimodalModel { meta, model })
    }
}

impl FittedModel for MultimodalModel {
    fn kind(&self) -> &'static str {
        "multimodal"
    }

    fn device(&self) -> Device {
        self.model.device()
    }

    fn describe(&self) -> Result<Value> {
        describe_meta(self.kind(), self.device(), &self.meta)
    }

    fn to_bytes(&self) -> Result<Vec<u8>> {
        MultimodalModel::to_bytes(self)
    }

    fn latent(&self, cells: Cells, opts: &LatentOptions) -> Result<Latent> {
        let (aligned, cov) = self.prepare(cells, false)?;
        seed_torch(opts.seed);
        let data = MultimodalData::new(aligned.iter().collect(), &cov)?;
        Ok(self.latent_of(&data, opts.give_mean))
    }

    fn expression(&self, cells: Cells, opts: &ExpressionOptions) -> Result<Matrix> {
        let specs = &self.meta.config.modalities;
        let Some(spec) = specs.get(opts.modality) else {
            return invalid!("the model has {} modalities; `modality` {} is not one", specs.len(), opts.modality + 1);
        };
        let (aligned, cov) = self.prepare(cells, true)?;
        let n = aligned.first().map_or(0, |c| c.n_rows);
        let covs = if opts.transform_batch.is_empty() {
            vec![cov]
        } else {
            let ambient = &self.meta.ambient;
            if ambient.levels.len() < 2 {
                return invalid!("`transform_batch` does not apply: the model was trained without a batch");
            }
            let codes = codes_of(&opts.transform_batch, &ambient.levels, "`transform_batch`")?;
            codes.into_iter().map(|b| self.under_batch(&cov, b)).collect()
        };
        seed_torch(opts.seed);
        let draws = opts.n_samples.max(1);
        let mut sum = vec![0f32; n * spec.n_features];
        for c in &covs {
            let data = MultimodalData::new(aligned.iter().collect(), c)?;
            let v = infer::normalized(&self.model, &data, opts.modality, opts.library_size, opts.ambient, draws);
            sum.iter_mut().zip(v).for_each(|(s, x)| *s += x);
        }
        if covs.len() > 1 {
            let k = covs.len() as f32;
            sum.iter_mut().for_each(|s| *s /= k);
        }
        Ok(Matrix::new(n, spec.n_features, sum))
    }

    fn elbo(&self, cells: Cells, seed: u64) -> Result<Elbo> {
        let (aligned, cov) = self.prepare(cells, true)?;
        seed_torch(seed);
        let data = MultimodalData::new(aligned.iter().collect(), &cov)?;
        let rows: Vec<usize> = (0..data.n_cells()).collect();
        let (elbo, reconstruction, kl) =
            crate::train::evaluate(&MultimodalTask { model: &self.model, data: &data }, &rows, 1024);
        Ok(Elbo { elbo, reconstruction, kl })
    }

    fn map_query(
        &self,
        cells: Cells,
        opts: &MapOptions,
        train: TrainConfig,
        interrupted: &dyn Fn() -> bool,
        on_epoch: &dyn Fn(&EpochRecord),
    ) -> Result<Box<dyn FittedModel>> {
        Ok(Box::new(self.map_query_cells(cells, opts, train, interrupted, on_epoch)?))
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl MultimodalModel {
    /// Modality attribution of `cells` (see [`infer::attribution`]).
    pub fn attribution(&self, cells: Cells, interrupted: &dyn Fn() -> bool) -> Result<Vec<f32>> {
        let (aligned, cov) = self.prepare(cells, true)?;
        seed_torch(0);
        let data = MultimodalData::new(aligned.iter().collect(), &cov)?;
        let a = infer::attribution(&self.model, &data, interrupted);
        if interrupted() {
            return Err(crate::Error::Interrupted);
        }
        Ok(a)
    }
}
