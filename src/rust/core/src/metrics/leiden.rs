//! Leiden clustering NMI/ARI as scib-metrics computes them
//! (`nmi_ari_cluster_labels_leiden`): the UMAP fuzzy connectivities of the
//! 15-nearest-neighbour graph (McInnes et al. 2018, as scanpy), Leiden
//! clustering with the modularity objective (Traag et al. 2019) at the
//! resolutions 0.2, 0.4, ..., 2.0, and NMI/ARI at the resolution with the
//! best NMI. igraph's Leiden is randomized; this one is seeded and repeats
//! until the partition no longer changes, so values agree with scib-metrics
//! closely but not to the last digit.

use super::cluster::{ari, nmi};
use super::knn::Knn;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use std::collections::{HashMap, VecDeque};

/// An undirected weighted graph as adjacency lists (each edge listed at both
/// ends; a self-loop once, with the weight it adds to the node's degree).
pub struct Graph {
    adj: Vec<Vec<(u32, f64)>>,
}

impl Graph {
    fn n(&self) -> usize {
        self.adj.len()
    }

    /// Each node's neighbours and edge weights (each edge at both ends).
    pub fn adjacency(&self) -> &[Vec<(u32, f64)>] {
        &self.adj
    }

    fn degree(&self, v: usize) -> f64 {
        self.adj[v].iter().map(|&(_, w)| w).sum()
    }
}

/// UMAP's fuzzy simplicial set of a kNN graph whose neighbours exclude the
/// cell itself (`k_self` counts it, as UMAP does: 15 means 14 others):
/// ρ_i = distance to the nearest neighbour, σ_i such that
/// Σ_j exp(−(d_ij − ρ_i)/σ_i) = log2(k_self), w_ij = exp(−(d_ij − ρ_i)/σ_i),
/// symmetrized as w + wᵀ − w∘wᵀ.
pub fn umap_connectivities(g: &Knn, k_self: usize) -> Graph {
    let k = (k_self - 1).min(g.k);
    let target = (k_self as f64).log2();
    let mean_all = g.distances.iter().sum::<f64>() / g.distances.len().max(1) as f64;
    let directed: Vec<Vec<(u32, f64)>> = (0..g.n)
        .into_par_iter()
        .map(|i| {
            let d = &g.dists(i)[..k];
            let rho = d.iter().copied().find(|&v| v > 0.0).unwrap_or(0.0);
            let (mut lo, mut hi, mut mid) = (0.0f64, f64::INFINITY, 1.0f64);
            for _ in 0..64 {
                let psum: f64 = d.iter().map(|&v| if v - rho > 0.0 { (-(v - rho) / mid).exp() } else { 1.0 }).sum();
                if (psum - target).abs() < 1e-5 {
                    break;
                }
                if psum > target {
                    hi = mid;
                    mid = (lo + hi) / 2.0;
                } else {
                    lo = mid;
                    mid = if hi.is_infinite() { mid * 2.0 } else { (lo + hi) / 2.0 };
                }
            }
            // UMAP's floor on σ: 1e-3 of the mean neighbour distance.
            let mean_i = d.iter().sum::<f64>() / k.max(1) as f64;
            let sigma = mid.max(1e-3 * if rho > 0.0 { mean_i } else { mean_all });
            g.neighbors(i)[..k]
                .iter()
                .zip(d)
                .map(|(&j, &v)| (j, if v - rho <= 0.0 || sigma == 0.0 { 1.0 } else { (-(v - rho) / sigma).exp() }))
                .collect()
        })
        .collect();
    let mut pairs: HashMap<(u32, u32), (f64, f64)> = HashMap::new();
    for (i, row) in directed.iter().enumerate() {
        for &(j, w) in row {
            let (a, b) = (i as u32, j);
            if a == b {
                continue;
            }
            let e = pairs.entry((a.min(b), a.max(b))).or_insert((0.0, 0.0));
            if a < b {
                e.0 = w;
            } else {
                e.1 = w;
            }
        }
    }
    let mut adj = vec![Vec::new(); g.n];
    for ((a, b), (w1, w2)) in pairs {
        let w = w1 + w2 - w1 * w2;
        if w > 0.0 {
            adj[a as usize].push((b, w));
            adj[b as usize].push((a, w));
        }
    }
    for row in &mut adj {
        row.sort_unstable_by_key(|e| e.0);
    }
    Graph { adj }
}

/// Leiden with the modularity objective at `resolution` γ: quality
/// Σ_c [e_c − γ K_c² / (2m)] (e_c twice the weight inside c, K_c its total
/// degree). Returns community codes 0..K.
pub fn leiden(graph: &Graph, resolution: f64, seed: u64) -> Vec<u32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let two_m: f64 = (0..graph.n()).map(|v| graph.degree(v)).sum();
    if two_m == 0.0 {
        return (0..graph.n() as u32).collect();
    }
    let mut membership: Vec<usize> = (0..graph.n()).collect();
    for _ in 0..20 {
        let before = membership.clone();
        // One multilevel pass starting from the current partition.
        let mut level_graph = Graph { adj: graph.adj.clone() };
        let mut partition = membership.clone();
        let mut node_of: Vec<usize> = (0..graph.n()).collect(); // original node -> level node
        loop {
            move_nodes(&level_graph, &mut partition, resolution, two_m, &mut rng);
            let refined = refine(&level_graph, &partition, resolution, two_m, &mut rng);
            let n_refined = refined.iter().max().map_or(0, |&c| c + 1);
            if n_refined == level_graph.n() {
                break;
            }
            // Aggregate on the refined partition; aggregate nodes start in
            // the community of their members.
            let mut agg_partition = vec![0; n_refined];
            for (v, &r) in refined.iter().enumerate() {
                agg_partition[r] = partition[v];
            }
            level_graph = aggregate(&level_graph, &refined, n_refined);
            for v in node_of.iter_mut() {
                *v = refined[*v];
            }
            partition = agg_partition;
        }
        membership = node_of.iter().map(|&v| partition[v]).collect();
        membership = relabel(&membership);
        if membership == relabel(&before) {
            break;
        }
    }
    membership.into_iter().map(|c| c as u32).collect()
}

/// Codes renumbered 0.. in order of first appearance.
fn relabel(c: &[usize]) -> Vec<usize> {
    let mut map = vec![usize::MAX; c.iter().max().map_or(0, |&m| m + 1)];
    let mut next = 0;
    c.iter()
        .map(|&x| {
            if map[x] == usize::MAX {
                map[x] = next;
                next += 1;
            }
            map[x]
        })
        .collect()
}

/// Edge weights summed per community in a dense array (no hashing); the
/// communities touched come back in ascending order, each sum accumulated
/// in edge order.
struct WeightTo {
    sum: Vec<f64>,
    seen: Vec<bool>,
    touched: Vec<usize>,
}

impl WeightTo {
    fn new(n: usize) -> WeightTo {
        WeightTo { sum: vec![0.0; n], seen: vec![false; n], touched: Vec::new() }
    }

    fn add(&mut self, c: usize, w: f64) {
        if !self.seen[c] {
            self.seen[c] = true;
            self.touched.push(c);
        }
        self.sum[c] += w;
    }

    fn get(&self, c: usize) -> f64 {
        if self.seen[c] {
            self.sum[c]
        } else {
            0.0
        }
    }

    /// The touched communities and their sums, ascending, then resets.
    fn drain_sorted(&mut self) -> Vec<(usize, f64)> {
        self.touched.sort_unstable();
        let out = self.touched.iter().map(|&c| (c, self.sum[c])).collect();
        for &c in &self.touched {
            self.sum[c] = 0.0;
            self.seen[c] = false;
        }
        self.touched.clear();
        out
    }
}

/// Fast local moving: nodes in a queue (random order), each moved to the
/// neighbouring (or an empty) community with the largest quality gain;
/// neighbours of a moved node outside its new community are queued again.
fn move_nodes(g: &Graph, part: &mut [usize], gamma: f64, two_m: f64, rng: &mut ChaCha8Rng) {
    let n = g.n();
    let deg: Vec<f64> = (0..n).map(|v| g.degree(v)).collect();
    let n_comm = n.max(part.iter().max().map_or(0, |&c| c + 1));
    let (mut tot, mut size) = (vec![0.0; n_comm], vec![0usize; n_comm]);
    for v in 0..n {
        tot[part[v]] += deg[v];
        size[part[v]] += 1;
    }
    let mut empty: Vec<usize> = (0..n_comm).filter(|&c| size[c] == 0).collect();
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(rng);
    let mut queue: VecDeque<usize> = order.into();
    let mut queued = vec![true; n];
    let mut w_to = WeightTo::new(n_comm);
    while let Some(v) = queue.pop_front() {
        queued[v] = false;
        let old = part[v];
        tot[old] -= deg[v];
        size[old] -= 1;
        for &(u, w) in &g.adj[v] {
            if u as usize != v {
                w_to.add(part[u as usize], w);
            }
        }
        // Gain of joining c (the node's own community included, as left).
        let gain = |c: usize, w: f64| w - gamma * deg[v] * tot[c] / two_m;
        let mut best = old;
        let mut best_gain = if size[old] == 0 { 0.0 } else { gain(old, w_to.get(old)) };
        for (c, w) in w_to.drain_sorted() {
            let g_c = gain(c, w);
            if g_c > best_gain + 1e-12 {
                best = c;
                best_gain = g_c;
            }
        }
        if best_gain < 0.0 && size[old] > 0 {
            // Alone (gain 0) is better than anywhere: take an empty community.
            while empty.last().is_some_and(|&c| size[c] > 0) {
                empty.pop();
            }
            if let Some(c) = empty.pop() {
                best = c;
            }
        }
        part[v] = best;
        tot[best] += deg[v];
        size[best] += 1;
        if size[old] == 0 && old != best {
            empty.push(old);
        }
        if best != old {
            for &(u, _) in &g.adj[v] {
                let u = u as usize;
                if !queued[u] && part[u] != best {
                    queued[u] = true;
                    queue.push_back(u);
                }
            }
        }
    }
}

/// Refinement: inside each community, start from singletons and merge each
/// still-single, well-connected node into the sub-community of its community
/// with the largest non-negative gain (greedy form of Leiden's randomized
/// merge). Returns refined codes 0..R.
fn refine(g: &Graph, part: &[usize], gamma: f64, two_m: f64, rng: &mut ChaCha8Rng) -> Vec<usize> {
    let n = g.n();
    let deg: Vec<f64> = (0..n).map(|v| g.degree(v)).collect();
    let n_comm = part.iter().max().map_or(0, |&c| c + 1);
    let mut comm_tot = vec![0.0; n_comm];
    for v in 0..n {
        comm_tot[part[v]] += deg[v];
    }
    // Weight from each node to the rest of its community.
    let w_in: Vec<f64> = (0..n)
        .map(|v| g.adj[v].iter().filter(|&&(u, _)| u as usize != v && part[u as usize] == part[v]).map(|e| e.1).sum())
        .collect();
    let mut refined: Vec<usize> = (0..n).collect();
    let mut sub_tot = deg.clone();
    let mut singleton = vec![true; n];
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(rng);
    let mut w_to = WeightTo::new(n);
    for v in order {
        let c = part[v];
        if !singleton[v] || w_in[v] < gamma * deg[v] * (comm_tot[c] - deg[v]) / two_m {
            continue;
        }
        for &(u, w) in &g.adj[v] {
            let u = u as usize;
            if u != v && part[u] == c {
                w_to.add(refined[u], w);
            }
        }
        let mut best = refined[v];
        let mut best_gain = 0.0;
        for (r, w) in w_to.drain_sorted() {
            if r == refined[v] {
                continue;
            }
            let gain = w - gamma * deg[v] * sub_tot[r] / two_m;
            if gain > best_gain + 1e-12 {
                best = r;
                best_gain = gain;
            }
        }
        if best != refined[v] {
            sub_tot[refined[v]] -= deg[v];
            sub_tot[best] += deg[v];
            refined[v] = best;
            singleton[v] = false;
            // The node it joined is no longer alone either.
            if best < n {
                singleton[best] = false;
            }
        }
    }
    relabel(&refined)
}

/// The graph whose nodes are the communities `c` (0..k), edge weights summed.
fn aggregate(g: &Graph, c: &[usize], k: usize) -> Graph {
    let mut members = vec![Vec::new(); k];
    for (v, &cv) in c.iter().enumerate() {
        members[cv].push(v);
    }
    let mut w_to = WeightTo::new(k);
    let adj = members
        .iter()
        .map(|vs| {
            for &v in vs {
                for &(u, w) in &g.adj[v] {
                    w_to.add(c[u as usize], w);
                }
            }
            w_to.drain_sorted().into_iter().map(|(u, w)| (u as u32, w)).collect()
        })
        .collect();
    Graph { adj }
}

/// NMI and ARI of Leiden clusters against `labels` at the resolution (0.2,
/// 0.4, ..., 2.0) with the best NMI, on the 15-NN UMAP connectivities.
pub fn leiden_nmi_ari(g: &Knn, labels: &[u32], seed: u64) -> (f64, f64) {
    let graph = umap_connectivities(g, 15);
    let scores: Vec<(f64, f64)> = (1..=10)
        .into_par_iter()
        .map(|r| {
            let clusters = leiden(&graph, 0.2 * r as f64, seed);
            (nmi(labels, &clusters), ari(labels, &clusters))
        })
        .collect();
    scores.into_iter().fold((f64::NEG_INFINITY, f64::NAN), |best, s| if s.0 > best.0 { s } else { best })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{knn, Embedding};

    fn blobs(n_per: usize, centres: &[[f64; 2]], seed: u64) -> (Vec<f64>, Vec<u32>) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let normal = rand_distr::Normal::new(0.0, 1.0).unwrap();
        let mut x = Vec::new();
        let mut lab = Vec::new();
        for (c, centre) in centres.iter().enumerate() {
            for _ in 0..n_per {
                x.push(centre[0] + rand_distr::Distribution::sample(&normal, &mut rng));
                x.push(centre[1] + rand_distr::Distribution::sample(&normal, &mut rng));
                lab.push(c as u32);
            }
        }
        (x, lab)
    }

    #[test]
    fn separated_groups_are_found_and_resolution_splits_them_further() {
        let (x, lab) = blobs(60, &[[0.0, 0.0], [20.0, 0.0], [0.0, 20.0], [20.0, 20.0]], 3);
        let g = knn(&Embedding::row_major(&x, 240, 2), 30).unwrap();
        let graph = umap_connectivities(&g, 15);
        let c = leiden(&graph, 0.2, 1);
        assert!((ari(&lab, &c) - 1.0).abs() < 1e-12, "ARI {}", ari(&lab, &c));
        let many = leiden(&graph, 2.0, 1);
        let k = |c: &[u32]| c.iter().max().unwrap() + 1;
        assert!(k(&many) > k(&c), "{} vs {} clusters", k(&many), k(&c));
        // Every cluster at high resolution stays inside one group.
        for cl in 0..k(&many) {
            let groups: std::collections::HashSet<u32> = (0..240).filter(|&i| many[i] == cl).map(|i| lab[i]).collect();
            assert_eq!(groups.len(), 1);
        }
        let (nmi_best, ari_best) = leiden_nmi_ari(&g, &lab, 0);
        assert!(nmi_best > 0.999 && ari_best > 0.999);
        assert_eq!(leiden(&graph, 1.0, 7), leiden(&graph, 1.0, 7));
    }

    #[test]
    fn connectivities_are_symmetric_and_in_the_unit_interval() {
        let (x, _) = blobs(40, &[[0.0, 0.0], [5.0, 0.0]], 9);
        let g = knn(&Embedding::row_major(&x, 80, 2), 20).unwrap();
        let graph = umap_connectivities(&g, 15);
        for (i, row) in graph.adj.iter().enumerate() {
            for &(j, w) in row {
                assert!(w > 0.0 && w <= 1.0);
                let back = graph.adj[j as usize].iter().find(|e| e.0 as usize == i).unwrap().1;
                assert_eq!(w, back);
            }
        }
    }
}
