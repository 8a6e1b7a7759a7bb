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

# How often is a cell's nearest neighbour from the same cell line / plate?
neighbours <- function(z) {
  d <- as.matrix(stats::dist(z))
  diag(d) <- Inf
  nn <- apply(d, 1, which.min)
  c(line = 100 * mean(sce$cell_line[nn] == sce$cell_line), plate = 100 * mean(sce$batch[nn] == sce$batch))
}
mixed <- 100 * sum((table(sce$batch) / ncol(sce))^2)

# Distillation: Harmony on 30 PCs of log2 CPM is the teacher; a student
# encoder learns it, then a batch-aware NB decoder learns the counts.
t0 <- proc.time()[["elapsed"]]
model <- distill(sce, batch = "batch", teacher = harmony_teacher(n_pcs = 30), seed = 1)
elapsed <- proc.time()[["elapsed"]] - t0
sce <- add_latent(sce, model)                                   # reducedDim(sce, "scDistill")
SingleCellExperiment::reducedDim(sce, "Harmony") <- teacher_latent(model)
SummarizedExperiment::assay(sce, "corrected") <- corrected_expression(model, sce, reference_batch = "p1")
h <- model$info
cat(sprintf("distill(): teacher + %d encoder and %d decoder epochs in %.1f s -> reducedDim(sce, \"scDistill\"), assay(sce, \"corrected\")\n",
            length(h$history_encoder$epoch), length(h$history_decoder$epoch), elapsed))
for (r in c("Harmony", "scDistill")) {
  n <- neighbours(SingleCellExperiment::reducedDim(sce, r))
  cat(sprintf("Nearest neighbour in %-9s space: same cell line %.1f%%, same plate %.1f%% (%.1f%% if perfectly mixed)\n",
              r, n[["line"]], n[["plate"]], mixed))
}
m <- integration_metrics(sce, batch = "batch", label = "cell_line", reduction = c("Harmony", "scDistill"))
print(round(m[, c("ilisi", "clisi", "ari_kmeans", "bio_conservation", "batch_correction", "total")], 3))
