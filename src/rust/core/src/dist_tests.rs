use super::*;
use crate::models::vae::{VaeConfig, VaeModel};
use crate::nn::Norm;
use crate::train::TrainConfig;
use std::net::TcpListener;
use std::process::Command;
use std::thread;
use tch::{Device, Kind};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Runs `f(group)` on `world` threads, one rank each, and returns their results by rank.
fn on_ranks<T: Send + 'static>(world: usize, f: fn(&Group) -> T) -> Vec<T> {
    // libtorch's c10d flight recorder (a process-wide record of collectives)
    // inserts each process group into a map outside its lock; with several
    // groups in one process, as here, their first collectives race on it
    // and crashed the test binary about one run in three. A real rank is a
    // process with one group, which cannot race with itself. Off for the
    // tests, set once before any group exists.
    static OFF: std::sync::Once = std::sync::Once::new();
    OFF.call_once(|| {
        std::env::set_var("TORCH_FR_BUFFER_SIZE", "0");
        std::env::set_var("TORCH_NCCL_TRACE_BUFFER_SIZE", "0");
    });
    let port = free_port();
    let handles: Vec<_> = (0..world)
        .map(|rank| {
            thread::spawn(move || {
                let g = Group::connect("127.0.0.1", port, rank, world, Duration::from_secs(30)).unwrap();
                f(&g)
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

#[test]
fn collectives_combine_every_ranks_values() {
    let out = on_ranks(3, |g| {
        let r = g.rank() as f64;
        let mut sum = Tensor::from_slice(&[r, 10.0 * r]);
        g.all_reduce(&mut sum, Op::Sum).unwrap();
        let mut min = Tensor::from_slice(&[r + 1.0]);
        g.all_reduce(&mut min, Op::Min).unwrap();
        let mut max = Tensor::from_slice(&[r + 1.0]).to_kind(Kind::Float);
        g.all_reduce(&mut max, Op::Max).unwrap();
        let mut b = Tensor::from_slice(&[r * 7.0 + 1.0; 4]);
        g.broadcast(&mut b, 2).unwrap();
        (
            Vec::<f64>::try_from(&sum).unwrap(),
            min.double_value(&[0]),
            max.double_value(&[0]),
            Vec::<f64>::try_from(&b).unwrap(),
        )
    });
    for (sum, min, max, b) in out {
        assert_eq!(sum, vec![3.0, 30.0]);
        assert_eq!((min, max), (1.0, 3.0));
        assert_eq!(b, vec![15.0; 4], "rank 2's values everywhere");
    }
}

#[test]
fn ranks_that_disagree_are_told_which_setting_differs() {
    let out = on_ranks(2, |g| {
        let same = crate::train::agree(g, &["seed", "batch_size"], &[7.0, 128.0]);
        let differ = crate::train::agree(g, &["seed", "batch_size"], &[7.0, 128.0 + g.rank() as f64]);
        (same.is_ok(), differ.unwrap_err().to_string())
    });
    for (ok, msg) in out {
        assert!(ok);
        assert_eq!(msg, "distributed training: the ranks disagree on batch_size (from 128 to 129)");
    }
}

#[test]
fn a_rank_that_never_comes_is_an_error_after_the_timeout_not_a_hang() {
    let port = free_port();
    let err = Group::connect("127.0.0.1", port, 0, 2, Duration::from_secs(2)).err().expect("rank 1 never came");
    let msg = err.to_string();
    assert!(msg.contains("rank 0 of 2 could not join the group at 127.0.0.1"), "{msg}");
    let bad = Group::connect("127.0.0.1", port, 2, 2, Duration::from_secs(1)).err().unwrap().to_string();
    assert!(bad.contains("rank 2 is not below the world size 2"), "{bad}");
}

#[test]
fn a_rank_that_dies_stops_the_others_with_an_error() {
    let out = on_ranks(2, |g| {
        let mut t = Tensor::ones([3], (Kind::Float, Device::Cpu));
        g.all_reduce(&mut t, Op::Sum).unwrap();
        if g.rank() == 1 {
            // Leaves without the second collective: its group closes.
            return None;
        }
        thread::sleep(Duration::from_millis(200));
        Some(g.all_reduce(&mut t, Op::Sum).err().map(|e| e.to_string()))
    });
    let msg = out[0].clone().unwrap().expect("rank 0's collective fails");
    assert!(msg.contains("all_reduce failed on rank 0 of 2"), "{msg}");
}

#[test]
fn per_cell_draws_of_a_slice_are_the_whole_minibatchs_rows() {
    let _turn = crate::models::TORCH.lock().unwrap_or_else(|e| e.into_inner());
    let like = Tensor::zeros([10, 4], (Kind::Float, Device::Cpu));
    tch::manual_seed(5);
    let whole = randn_rows(&like);
    let h = Tensor::ones([10, 50], (Kind::Float, Device::Cpu));
    let drop_whole = crate::nn::dropout(&h, 0.3);
    tch::manual_seed(5);
    let local = Tensor::zeros([4, 4], (Kind::Float, Device::Cpu));
    let rows = Tensor::from_slice(&[1i64, 4, 7, 8]);
    let (part, drop_part) = {
        let _s = shard(10, vec![1, 4, 7, 8]);
        (randn_rows(&local), crate::nn::dropout(&h.index_select(0, &rows), 0.3))
    };
    assert!(part.equal(&whole.index_select(0, &rows)));
    assert!(drop_part.equal(&drop_whole.index_select(0, &rows)));
    // Outside a shard, and for tensors whose rows are not the shard's cells,
    // draws are plain.
    assert!(rows_of_minibatch(&[4, 4]).is_none());
    let _s = shard(10, vec![1, 4, 7, 8]);
    assert!(rows_of_minibatch(&[5, 4]).is_none());
}

#[test]
fn an_epochs_cells_are_dealt_to_the_ranks_in_turn() {
    let out = on_ranks(3, |g| (g.dealt(0, 7), g.dealt(7, 7), g.dealt(14, 2)));
    // Positions 0..16 of the order: rank r holds p ≡ r (mod 3).
    for (rank, (a, b, c)) in out.into_iter().enumerate() {
        let all: Vec<usize> =
            a.iter().copied().chain(b.iter().map(|j| j + 7)).chain(c.iter().map(|j| j + 14)).collect();
        assert_eq!(all, (rank..16).step_by(3).collect::<Vec<_>>());
    }
}

// --- Training on two processes ------------------------------------------------

const WORKER: &str = "SCDISTILL_DIST_TEST_WORKER";

fn small_fit() -> VaeModel {
    let p = crate::simulate::SimParams {
        n_cells: 400,
        n_genes: 120,
        group_prob: vec![0.5, 0.3, 0.2],
        batch_prob: vec![0.5, 0.5],
        seed: 3,
        ..Default::default()
    };
    let s = crate::simulate::simulate(&p).unwrap();
    let cov = crate::data::Covariates::new(s.batch.clone(), vec![], vec![]).unwrap();
    let config = VaeConfig { norm: Norm::Layer, ..Default::default() };
    let tc = TrainConfig { max_epochs: 4, batch_size: 64, early_stopping: false, seed: 11, ..Default::default() };
    crate::device::with_threads(1, || VaeModel::fit(&s.counts, &cov, config, tc, Device::Cpu, &|| false, &|_| {}))
        .unwrap()
        .unwrap()
}

fn weights(m: &VaeModel) -> Vec<(String, Vec<f32>)> {
    let mut v: Vec<(String, Vec<f32>)> = m
        .vae
        .vs
        .variables()
        .into_iter()
        .map(|(k, t)| (k, Vec::<f32>::try_from(t.to_kind(Kind::Float).reshape([-1])).unwrap()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// A rank of `two_processes_train_the_single_process_model` (does nothing
/// unless that test started this process).
#[test]
fn dist_worker() {
    let Ok(out) = std::env::var(WORKER) else { return };
    let g = Group::from_env(Duration::from_secs(60)).unwrap().expect("WORLD_SIZE is set");
    install(g);
    let m = small_fit();
    uninstall();
    let h: Vec<f64> = m.meta.training.history.iter().flat_map(|e| [e.train_loss, e.validation_elbo]).collect();
    let json = serde_json::to_string(&(weights(&m), h)).unwrap();
    std::fs::write(out, json).unwrap();
}

#[test]
fn two_processes_train_the_single_process_model() {
    let single = {
        let _turn = crate::models::TORCH.lock().unwrap_or_else(|e| e.into_inner());
        small_fit()
    };
    let dir = std::env::temp_dir().join(format!("scdistill-dist-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let port = free_port().to_string();
    let exe = std::env::current_exe().unwrap();
    let children: Vec<_> = (0..2)
        .map(|rank| {
            Command::new(&exe)
                .args(["--exact", "dist::tests::dist_worker", "--test-threads=1", "--quiet"])
                .env(WORKER, dir.join(format!("rank{rank}.json")))
                .env("WORLD_SIZE", "2")
                .env("RANK", rank.to_string())
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", &port)
                // The worker's own test summary would count as tests of this run.
                .stdout(std::process::Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    for mut c in children {
        assert!(c.wait().unwrap().success(), "a worker failed");
    }
    type Out = (Vec<(String, Vec<f32>)>, Vec<f64>);
    let read = |rank: usize| -> Out {
        serde_json::from_str(&std::fs::read_to_string(dir.join(format!("rank{rank}.json"))).unwrap()).unwrap()
    };
    let (w0, h0) = read(0);
    let (w1, h1) = read(1);
    std::fs::remove_dir_all(&dir).ok();
    assert_eq!(w0, w1, "every rank holds the same model");
    assert_eq!(h0, h1, "and the same history");
    let ws = weights(&single);
    let hs: Vec<f64> = single.meta.training.history.iter().flat_map(|e| [e.train_loss, e.validation_elbo]).collect();
    assert_eq!(ws.len(), w0.len());
    let mut worst = 0f32;
    for ((name, a), (name0, b)) in ws.iter().zip(&w0) {
        assert_eq!(name, name0);
        for (x, y) in a.iter().zip(b) {
            worst = worst.max((x - y).abs() / (1.0 + x.abs()));
        }
    }
    // Up to the order of floating-point sums (the minibatch's gradient as
    // two halves), over 24 Adam steps: 4e-8 when written.
    assert!(worst < 1e-5, "largest weight difference {worst}");
    for (a, b) in hs.iter().zip(&h0) {
        assert!((a - b).abs() < 1e-6 * a.abs(), "history {hs:?} vs {h0:?}");
    }
}
