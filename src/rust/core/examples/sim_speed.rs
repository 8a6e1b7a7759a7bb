//! Seconds to simulate counts, and a digest of them (to check that a change
//! leaves seeded output identical):
//!     cargo run --release --example sim_speed -- [n_cells] [n_genes] [threads]
use scdistill_core::device::thread_pool;
use scdistill_core::simulate::{simulate, SimParams};
use std::hash::{Hash, Hasher};

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let arg = |i: usize, d: usize| a.get(i).and_then(|s| s.parse().ok()).unwrap_or(d);
    let (n_cells, n_genes, threads) = (arg(1, 1_000_000), arg(2, 2_000), arg(3, 2));
    thread_pool(threads).unwrap().install(|| {
        let t0 = std::time::Instant::now();
        let s = simulate(&SimParams { n_cells, n_genes, batch_prob: vec![1.0; 4], ..Default::default() }).unwrap();
        let secs = t0.elapsed().as_secs_f64();
        let mut h = std::collections::hash_map::DefaultHasher::new();
        s.counts.csr.indptr.hash(&mut h);
        s.counts.csr.indices.hash(&mut h);
        s.counts.csr.values.iter().map(|v| v.to_bits()).collect::<Vec<_>>().hash(&mut h);
        println!(
            "{n_cells} cells x {n_genes} genes, {threads} threads: {secs:.1} s, {} non-zeros, digest {:016x}",
            s.counts.csr.nnz(),
            h.finish()
        );
    });
}
