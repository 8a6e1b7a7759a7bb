# The main job on the example shipped in the package: 571 cells of five lung
# cancer cell lines sequenced on three plates (CellBench). Run by tools/setup.sh.
suppressPackageStartupMessages(library(scdistill))

cfg <- torch_config()
cat(sprintf("scdistill %s: libtorch %s on %s, %d thread(s)\n",
            utils::packageVersion("scdistill"), cfg$libtorch_version, cfg$device, cfg$threads))

sce <- example_cellbench()
cat(sprintf("Example: %d cells x %s genes, %d cell lines on %d plates\n",
            ncol(sce), format(nrow(sce), big.mark = ","),
            nlevels(sce$cell_line), nlevels(sce$batch)))

t0 <- proc.time()[["elapsed"]]
sce <- run_pca(sce, n_pcs = 30, n_hvg = 2000, batch = "batch")
elapsed <- proc.time()[["elapsed"]] - t0
pcs <- SingleCellExperiment::reducedDim(sce, "PCA")
cat(sprintf("Batch-aware HVGs (2,000) + PCA (30 PCs) in %.2f s -> reducedDim(sce, \"PCA\")\n", elapsed))
cat("Variance explained by PC1-PC5 (%):", sprintf("%.1f", attr(pcs, "percentVar")[1:5]), "\n")

# How well do nearest neighbours in PC space agree on cell line and on plate?
d <- as.matrix(stats::dist(pcs))
diag(d) <- Inf
nn <- apply(d, 1, which.min)
same_line <- mean(sce$cell_line[nn] == sce$cell_line)
same_plate <- mean(sce$batch[nn] == sce$batch)
expected_plate <- sum((table(sce$batch) / ncol(sce))^2)
cat(sprintf("Nearest neighbour in PC space: same cell line %.1f%%, same plate %.1f%% (%.1f%% if plates were perfectly mixed)\n",
            100 * same_line, 100 * same_plate, 100 * expected_plate))

# scVI-style VAE on the 2,000 HVGs: a batch-corrected latent space.
t0 <- proc.time()[["elapsed"]]
hvg <- highly_variable_genes(sce, n_hvg = 2000, batch = "batch")
model <- fit_vae(sce[hvg$highly_variable, ], batch = "batch", max_epochs = 200, seed = 1)
elapsed <- proc.time()[["elapsed"]] - t0
sce <- add_latent(sce, model, "scVI")
z <- SingleCellExperiment::reducedDim(sce, "scVI")
d <- as.matrix(stats::dist(z))
diag(d) <- Inf
nn <- apply(d, 1, which.min)
cat(sprintf("fit_vae(): %d epochs in %.1f s, held-out -ELBO %.1f per cell -> reducedDim(sce, \"scVI\")\n",
            nrow(model$history), elapsed, model$history$validation_elbo[model$info$best_epoch]))
cat(sprintf("Nearest neighbour in scVI space: same cell line %.1f%%, same plate %.1f%%\n",
            100 * mean(sce$cell_line[nn] == sce$cell_line), 100 * mean(sce$batch[nn] == sce$batch)))
