//! Where a VAE training step spends its time (forward, backward, optimiser).
use scdistill_core::data::Covariates;
use scdistill_core::device::thread_pool;
use scdistill_core::models::vae::{Vae, VaeConfig, VaeData};
use scdistill_core::simulate::{simulate, SimParams};
use tch::nn::OptimizerConfig;
use tch::{Device, Kind};

fn main() {
    let pool = thread_pool(2).unwrap();
    pool.install(|| {
        let p = SimParams { n_cells: 5000, n_genes: 2000, batch_prob: vec![1.0; 4], ..Default::default() };
        let s = simulate(&p).unwrap();
        let cov = Covariates::new(s.batch.clone(), vec![], vec![]).unwrap();
        let cfg = VaeConfig { n_genes: 2000, n_batch: 4, n_design: 4, ..Default::default() };
        let vae = Vae::new(cfg, Device::Cpu).unwrap();
        let data = VaeData::new(&s.counts.csr, &cov);
        println!("density {:.3}", s.counts.csr.nnz() as f64 / (5000.0 * 2000.0));
        let mut opt = tch::nn::Adam { wd: 1e-6, eps: 0.01, ..Default::default() }.build(&vae.vs, 1e-3).unwrap();
        let rows: Vec<usize> = (0..128).collect();
        let n = 50;
        let t = std::time::Instant::now();
        for _ in 0..n {
            let _ = data.inputs(&rows, None, Device::Cpu);
        }
        let inputs = t.elapsed().as_secs_f64() / n as f64;
        let inp = data.inputs(&rows, None, Device::Cpu);
        let t = std::time::Instant::now();
        for _ in 0..n {
            let l = vae.loss_terms(&inp, true);
            let _ = (l.reconstruction + l.kl_warmup).mean(Kind::Float).double_value(&[]);
        }
        let fwd = t.elapsed().as_secs_f64() / n as f64;
        let t = std::time::Instant::now();
        for _ in 0..n {
            let l = vae.loss_terms(&inp, true);
            let loss = (l.reconstruction + l.kl_warmup).mean(Kind::Float);
            opt.zero_grad();
            loss.backward();
        }
        let bwd = t.elapsed().as_secs_f64() / n as f64 - fwd;
        let t = std::time::Instant::now();
        for _ in 0..n {
            opt.step();
        }
        let step = t.elapsed().as_secs_f64() / n as f64;
        let time = |f: &dyn Fn()| {
            let t = std::time::Instant::now();
            for _ in 0..n {
                f();
            }
            t.elapsed().as_secs_f64() / n as f64 * 1e3
        };
        let ((qm, _), _) = vae.encode(&inp, true);
        let dd = vae.decode(&qm, &inp.log_library, &inp.design, &inp.batch, true);
        println!(
            "encode {:.2} ms, decode {:.2} ms, likelihood {:.2} ms, log1p {:.2}",
            time(&|| {
                let _ = vae.encode(&inp, true);
            }),
            time(&|| {
                let _ = vae.decode(&qm, &inp.log_library, &inp.design, &inp.batch, true);
            }),
            time(&|| {
                let _ = vae.log_likelihood(&inp, &dd);
            }),
            time(&|| {
                let _ = inp.x.log1p();
            })
        );
        println!(
            "per step (ms): inputs {:.2}  forward {:.2}  backward {:.2}  adam {:.2}",
            inputs * 1e3,
            fwd * 1e3,
            bwd * 1e3,
            step * 1e3
        );
    });
}
