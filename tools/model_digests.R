# Seeded digests of every model's outputs, for refactors that must not change
# results: run it before and after, and compare the two outputs line by line.
#   Rscript tools/model_digests.R > before.txt
# Each line: what was computed, its dimensions, and an MD5 of its values
# rounded to 6 significant digits (1 thread, CPU). Needs the package installed.
suppressPackageStartupMessages(library(scdistill))
options(scdistill.threads = 1)
digest <- function(label, v) {
  v <- if (is.list(v)) unlist(lapply(v, as.vector)) else as.vector(as.matrix(v))
  f <- tempfile()
  writeLines(formatC(signif(as.numeric(v), 6), digits = 6, format = "g"), f)
  cat(sprintf("%-34s %9d  %s\n", label, length(v), unname(tools::md5sum(f))))
}
sce <- example_cellbench()
hvg <- highly_variable_genes(sce, n_hvg = 500, batch = "batch")
x <- sce[hvg$highly_variable, ]

vae <- fit_vae(x, batch = "batch", max_epochs = 15, seed = 3, threads = 1)
digest("vae history", vae$history[, c("train_loss", "validation_elbo")])
digest("vae latent (training)", latent(vae))
digest("vae latent (x)", latent(vae, x))
digest("vae latent draw", latent(vae, x, give_mean = FALSE, seed = 5))
digest("vae expression own", normalized_expression(vae, x))
digest("vae expression p1", normalized_expression(vae, x, transform_batch = "p1", library_size = 1e4))
digest("vae expression 3 draws", normalized_expression(vae, x, n_samples = 3, seed = 2))
digest("vae sample_counts", sample_counts(vae, x, seed = 4))
digest("vae elbo", c(elbo(vae, x), reconstruction_error(vae, x)))
f <- tempfile(fileext = ".safetensors")
save_model(vae, f)
digest("vae reloaded latent", latent(load_model(f), x))
sim <- simulation_scenario("s1", n_cells = 600)
vs <- fit_vae(sim, batch = "batch", max_epochs = 10, seed = 1, threads = 1)
de <- differential_expression(vs, sim, "condition", "treated", "control", seed = 1)
digest("vae DE change", de[, c("lfc_mean", "proba_de", "bayes_factor")])

d <- distill(sce, batch = "batch", n_latent = 10, max_epochs_encoder = 10, max_epochs_decoder = 10, seed = 2,
             threads = 1)
digest("distill latent (training)", latent(d))
digest("distill latent (x)", latent(d, sce))
digest("distill corrected p1", corrected_expression(d, sce, "p1"))
digest("distill normalized p2", normalized_expression(d, sce, transform_batch = "p2"))
ds <- distill(sim, batch = "batch", n_latent = 10, max_epochs_encoder = 5, max_epochs_decoder = 5, seed = 2,
              threads = 1, teacher = harmony_teacher(n_hvg = 300))
de2 <- differential_expression(ds, sim, "condition", "treated", "control", seed = 1)
digest("distill DE", de2[, c("lfc_mean", "proba_de")])

mo <- example_multiome()
mm <- fit_multimodal(mo, max_epochs = 10, seed = 1, threads = 1)
digest("multimodal latent (training)", latent(mm))
digest("multimodal latent ATAC", latent(mm, mo, modality = "ATAC"))
digest("multimodal normalized RNA", normalized_expression(mm, mo))
digest("multimodal normalized ATAC", normalized_expression(mm, mo, modality = "ATAC"))
digest("multimodal elbo", elbo(mm, mo))
digest("multimodal attribution", attr(modality_attribution(mm, mo), "share"))
save_model(mm, f, overwrite = TRUE)
digest("multimodal reloaded latent", latent(load_model(f), mo))
rv <- fit_vae(x, batch = "batch", regularized = TRUE, max_epochs = 10, seed = 1, threads = 1)
digest("regularized latent", latent(rv))
