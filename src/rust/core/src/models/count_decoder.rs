//! The count decoder shared by the VAE-family models (scVI's `DecoderSCVI`):
//! a fully connected stack on z with the design vector injected, then
//! ρ = softmax(scale head), μ = library · ρ, the NB inverse dispersion θ
//! per gene, gene and batch, or gene and cell, and the ZINB dropout logits.
//! The VAE and both species of the cross-species model decode through it.

use crate::likelihood::{
    fused_log_kernel_rows, fused_log_kernel_rows_for_ranking, nb_log_kernel_rows, poisson_log_kernel_rows,
    zinb_log_kernel_rows, Likelihood, RawDecoded, SparseBatch,
};
use crate::nn::{linear, FcLayers, FcSpec, Pass};
use serde::{Deserialize, Serialize};
use tch::nn::{self, Module};
use tch::{Kind, Tensor};

/// Where the NB inverse dispersion θ varies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Dispersion {
    #[serde(rename = "gene")]
    Gene,
    #[serde(rename = "gene-batch")]
    GeneBatch,
    #[serde(rename = "gene-cell")]
    GeneCell,
}

impl Dispersion {
    pub fn parse(s: &str) -> Option<Dispersion> {
        match s {
            "gene" => Some(Dispersion::Gene),
            "gene-batch" => Some(Dispersion::GeneBatch),
            "gene-cell" => Some(Dispersion::GeneCell),
            _ => None,
        }
    }
}

/// The decoded distribution of a minibatch.
pub struct Decoded {
    /// ρ: expected proportions per gene (rows sum to 1).
    pub scale: Tensor,
    /// μ = library · ρ.
    pub rate: Tensor,
    /// θ, broadcastable to `rate`.
    pub theta: Tensor,
    pub pi_logits: Option<Tensor>,
}

/// The decoder's outputs before the softmax and the exponential of θ.
pub struct DecoderHeads {
    pub logits: Tensor,
    /// log θ: [genes] or [cells, genes]; `None` for Poisson.
    pub log_theta: Option<Tensor>,
    pub pi_logits: Option<Tensor>,
}

/// A count decoder's scale and dropout heads (weight, bias) cut to a set of
/// genes; see [`CountDecoder::gene_heads`].
pub struct GeneHeads {
    scale: (Tensor, Option<Tensor>),
    dropout: Option<(Tensor, Option<Tensor>)>,
}

/// Shape of a count decoder: `stack` reads z (`n_in`) and the design vector
/// (`n_cov`); its hidden widths are `widths`.
pub struct CountDecoderSpec<'a> {
    pub stack: FcSpec,
    pub widths: &'a [usize],
    pub n_genes: usize,
    pub likelihood: Likelihood,
    pub dispersion: Dispersion,
    pub n_batch: usize,
}

pub struct CountDecoder {
    fc: FcLayers,
    scale_head: nn::Linear,
    r_head: Option<nn::Linear>,
    pi_head: Option<nn::Linear>,
    px_r: Option<Tensor>,
    likelihood: Likelihood,
    dispersion: Dispersion,
    n_batch: usize,
    /// Output products in bf16 while training ([`CountDecoder::set_bf16_training`]).
    bf16_train: crate::nn::Bf16Switch,
}

impl CountDecoder {
    /// Variables under `root`: "decoder" (the stack), "px_scale",
    /// "px_r_decoder" (gene-cell θ), "px_dropout" (ZINB), "px_r" (θ per gene
    /// or gene and batch), drawn in that order.
    pub fn new(root: &nn::Path, s: CountDecoderSpec) -> CountDecoder {
        let fc = FcLayers::with_widths(&(root / "decoder"), s.stack, s.widths);
        let last = s.widths.last().copied().unwrap_or(s.stack.n_in);
        let scale_head = linear(root / "px_scale", last, s.n_genes);
        let r_head = (s.dispersion == Dispersion::GeneCell && s.likelihood != Likelihood::Poisson)
            .then(|| linear(root / "px_r_decoder", last, s.n_genes));
        let pi_head = (s.likelihood == Likelihood::Zinb).then(|| linear(root / "px_dropout", last, s.n_genes));
        let px_r = match (s.likelihood, s.dispersion) {
            (Likelihood::Poisson, _) | (_, Dispersion::GeneCell) => None,
            (_, Dispersion::Gene) => Some(root.randn_standard("px_r", &[s.n_genes as i64])),
            (_, Dispersion::GeneBatch) => Some(root.randn_standard("px_r", &[s.n_genes as i64, s.n_batch as i64])),
        };
        CountDecoder {
            fc,
            scale_head,
            r_head,
            pi_head,
            px_r,
            likelihood: s.likelihood,
            dispersion: s.dispersion,
            n_batch: s.n_batch,
            bf16_train: Default::default(),
        }
    }

    /// Runs the gene-wide output products in bf16 in training passes
    /// (mixed precision, [`crate::nn::linear_bf16`]); inference stays in
    /// f32. For CPUs with native bf16 ([`crate::nn::fast_bf16`]).
    pub fn set_bf16_training(&self, on: bool) {
        self.bf16_train.set(on);
    }

    pub fn likelihood(&self) -> Likelihood {
        self.likelihood
    }

    /// Whether θ varies by cell (a head on the hidden layer).
    pub fn cell_dispersion(&self) -> bool {
        self.r_head.is_some()
    }

    /// The decoder's heads for latent `z`.
    pub fn heads(&self, z: &Tensor, design: &Tensor, batch: &Tensor, train: impl Into<Pass>) -> DecoderHeads {
        let pass = train.into();
        self.heads_with(z, design, batch, pass, self.bf16_train.active(pass))
    }

    /// [`CountDecoder::heads`] with the gene-wide output products in bf16
    /// when `bf16` (see [`crate::nn::linear_bf16`]): for scoring without
    /// gradient, where those products are most of the cost.
    pub fn heads_with(&self, z: &Tensor, design: &Tensor, batch: &Tensor, pass: Pass, bf16: bool) -> DecoderHeads {
        let h = self.fc.forward(z, Some(design), pass);
        let out = |l: &nn::Linear| if bf16 { crate::nn::linear_bf16(&h, l) } else { l.forward(&h) };
        let logits = out(&self.scale_head);
        let log_theta = match (&self.px_r, &self.r_head) {
            (_, Some(head)) => Some(out(head)),
            (Some(r), None) if self.dispersion == Dispersion::GeneBatch => {
                Some(batch.one_hot(self.n_batch as i64).to_kind(Kind::Float).matmul(&r.tr()))
            }
            (Some(r), None) => Some(r.shallow_clone()),
            (None, None) => None,
        };
        let pi_logits = self.pi_head.as_ref().map(out);
        DecoderHeads { logits, log_theta, pi_logits }
    }

    /// The scale and ZINB dropout heads cut to the rows of `genes` (indices
    /// into the decoder's genes), to decode those genes alone.
    pub fn gene_heads(&self, genes: &Tensor) -> GeneHeads {
        let cut = |l: &nn::Linear| (l.ws.index_select(0, genes), l.bs.as_ref().map(|b| b.index_select(0, genes)));
        GeneHeads { scale: cut(&self.scale_head), dropout: self.pi_head.as_ref().map(cut) }
    }

    /// ρ of `heads`' genes, the softmax taken over them alone, times 1 − π
    /// under ZINB: the same numbers as the full heads' logits cut to those
    /// genes, without computing the other genes' columns.
    pub fn gene_scale(&self, heads: &GeneHeads, z: &Tensor, design: &Tensor, train: impl Into<Pass>) -> Tensor {
        let h = self.fc.forward(z, Some(design), train);
        let rho = h.linear(&heads.scale.0, heads.scale.1.as_ref()).softmax(-1, Kind::Float);
        match &heads.dropout {
            Some((w, b)) => rho * h.linear(w, b.as_ref()).neg().sigmoid(),
            None => rho,
        }
    }

    /// The decoded distribution from the heads and the log library ([B, 1]).
    pub fn distribution(&self, heads: DecoderHeads, log_library: &Tensor) -> Decoded {
        let scale = heads.logits.softmax(-1, Kind::Float);
        let rate = log_library.exp() * &scale;
        let theta = match &heads.log_theta {
            Some(t) if t.dim() == 1 => t.exp().unsqueeze(0),
            Some(t) => t.exp(),
            None => Tensor::ones([1], (Kind::Float, log_library.device())),
        };
        Decoded { scale, rate, theta, pi_logits: heads.pi_logits }
    }

    /// log p(x | z, l) per cell straight from the heads: the fused CPU
    /// kernel where it applies, else softmax and the tensor kernels. `x`:
    /// the cells' non-zero counts; `log_factorial`: Σ log Γ(x + 1) per cell.
    pub fn log_likelihood_heads(
        &self,
        x: &SparseBatch,
        log_factorial: &Tensor,
        heads: DecoderHeads,
        log_library: &Tensor,
    ) -> Tensor {
        if let Some(kernel) = fused_log_kernel_rows(x, &self.raw(&heads, log_library)) {
            return kernel - log_factorial;
        }
        self.log_likelihood(x, log_factorial, &self.distribution(heads, log_library))
    }

    /// `log_likelihood_heads` for ranking rows that share their counts and θ
    /// (candidates decoded for one cell, θ not by cell): where the fused CPU
    /// kernel runs, each value leaves out the terms of the row's counts and
    /// θ alone (log Γ(x + θ) − log Γ(θ) and log Γ(x + 1)); elsewhere it is
    /// the full value. Differences between such rows are the same.
    pub fn ranking_log_likelihood_heads(
        &self,
        x: &SparseBatch,
        log_factorial: &Tensor,
        heads: DecoderHeads,
        log_library: &Tensor,
    ) -> Tensor {
        if !self.cell_dispersion() {
            if let Some(kernel) = fused_log_kernel_rows_for_ranking(x, &self.raw(&heads, log_library)) {
                return kernel;
            }
        }
        self.log_likelihood_heads(x, log_factorial, heads, log_library)
    }

    /// The heads as the fused kernel reads them.
    fn raw<'a>(&self, heads: &'a DecoderHeads, log_library: &'a Tensor) -> RawDecoded<'a> {
        RawDecoded {
            family: self.likelihood,
            logits: &heads.logits,
            log_library,
            log_theta: heads.log_theta.as_ref(),
            pi_logits: heads.pi_logits.as_ref(),
        }
    }

    /// log p(x | decoded) per cell, the full value (log Γ(x+1) included).
    pub fn log_likelihood(&self, x: &SparseBatch, log_factorial: &Tensor, d: &Decoded) -> Tensor {
        const EPS: f64 = 1e-8;
        let c = x;
        let kernel = match self.likelihood {
            Likelihood::Nb => nb_log_kernel_rows(c, &d.rate, &d.theta, EPS),
            Likelihood::Zinb => {
                let pi = d.pi_logits.as_ref().expect("ZINB has a dropout head");
                zinb_log_kernel_rows(c, &d.rate, &d.theta, pi, EPS)
            }
            Likelihood::Poisson => poisson_log_kernel_rows(c, &d.rate, EPS),
        };
        kernel - log_factorial
    }
}
