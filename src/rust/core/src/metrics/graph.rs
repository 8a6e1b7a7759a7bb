//! Graph connectivity (Luecken et al. 2022, as scib-metrics): for each label,
//! the share of its cells in the largest strongly connected component of the
//! directed kNN graph restricted to that label; the mean over labels.

use super::knn::Knn;

pub fn graph_connectivity(g: &Knn, labels: &[u32]) -> f64 {
    let n_labels = labels.iter().max().map_or(0, |&m| m as usize + 1);
    let mut scores = Vec::new();
    for l in 0..n_labels as u32 {
        let cells: Vec<usize> = (0..g.n).filter(|&i| labels[i] == l).collect();
        if cells.is_empty() {
            continue;
        }
        let mut local = vec![usize::MAX; g.n];
        for (k, &c) in cells.iter().enumerate() {
            local[c] = k;
        }
        let adj: Vec<Vec<usize>> = cells
            .iter()
            .map(|&c| g.neighbors(c).iter().map(|&j| local[j as usize]).filter(|&k| k != usize::MAX).collect())
            .collect();
        let largest = strongly_connected_sizes(&adj).into_iter().max().unwrap_or(0);
        scores.push(largest as f64 / cells.len() as f64);
    }
    scores.iter().sum::<f64>() / scores.len() as f64
}

/// Sizes of the strongly connected components (Kosaraju, iterative).
fn strongly_connected_sizes(adj: &[Vec<usize>]) -> Vec<usize> {
    let n = adj.len();
    let mut order = Vec::with_capacity(n);
    let mut seen = vec![false; n];
    for s in 0..n {
        if seen[s] {
            continue;
        }
        seen[s] = true;
        let mut stack = vec![(s, 0usize)];
        while let Some((v, next)) = stack.pop() {
            if next < adj[v].len() {
                stack.push((v, next + 1));
                let w = adj[v][next];
                if !seen[w] {
                    seen[w] = true;
                    stack.push((w, 0));
                }
            } else {
                order.push(v);
            }
        }
    }
    let mut radj = vec![Vec::new(); n];
    for (v, out) in adj.iter().enumerate() {
        for &w in out {
            radj[w].push(v);
        }
    }
    let mut comp = vec![false; n];
    let mut sizes = Vec::new();
    for &s in order.iter().rev() {
        if comp[s] {
            continue;
        }
        comp[s] = true;
        let (mut stack, mut size) = (vec![s], 0);
        while let Some(v) = stack.pop() {
            size += 1;
            for &w in &radj[v] {
                if !comp[w] {
                    comp[w] = true;
                    stack.push(w);
                }
            }
        }
        sizes.push(size);
    }
    sizes
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::knn::{knn, Embedding};

    #[test]
    fn split_labels_lose_connectivity() {
        // label 0 at 0,1,2 and 100,101 (two islands); label 1 at 50,51,52
        let v = [0.0, 1.0, 2.0, 100.0, 101.0, 50.0, 51.0, 52.0];
        let g = knn(&Embedding::row_major(&v, 8, 1), 2).unwrap();
        let c = graph_connectivity(&g, &[0, 0, 0, 0, 0, 1, 1, 1]);
        assert!((c - (3.0 / 5.0 + 1.0) / 2.0).abs() < 1e-12, "{c}");
    }

    #[test]
    fn strong_components_need_both_directions() {
        // 0 → 1 → 2 → 0 is one component; 3 → 0 alone is not part of it
        let adj = vec![vec![1], vec![2], vec![0], vec![0]];
        let mut s = strongly_connected_sizes(&adj);
        s.sort_unstable();
        assert_eq!(s, vec![1, 3]);
    }
}
