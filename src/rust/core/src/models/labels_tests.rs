use super::*;
use crate::models::TORCH;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

/// Cells around `centres` in 5 dimensions (sd 0.5); returns z and true classes.
fn blobs(centres: &[[f32; 5]], per: usize, seed: u64) -> (Vec<f32>, Vec<u32>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let noise = Normal::new(0.0f32, 0.5).unwrap();
    let (mut z, mut y) = (vec![], vec![]);
    for i in 0..per * centres.len() {
        let c = i % centres.len();
        z.extend(centres[c].iter().map(|m| m + noise.sample(&mut rng)));
        y.push(c as u32);
    }
    (z, y)
}

const CENTRES: [[f32; 5]; 4] =
    [[3.0, 0.0, 0.0, 0.0, 0.0], [0.0, 3.0, 0.0, 0.0, 0.0], [0.0, 0.0, 3.0, 0.0, 0.0], [0.0, 0.0, 0.0, 3.0, 3.0]];

fn levels() -> Vec<String> {
    vec!["a".into(), "b".into(), "c".into()]
}

fn quick() -> TrainConfig {
    TrainConfig { max_epochs: 30, batch_size: 128, ..Default::default() }
}

fn fit(z: &[f32], codes: &[u32]) -> Result<LabelModel> {
    LabelModel::fit(z, codes, levels(), LabelConfig::default(), quick(), &|| false, &|_| {})
}

#[test]
fn labels_carry_to_unlabelled_cells_and_an_unseen_type_lies_far_from_every_class() {
    let _turn = TORCH.lock().unwrap_or_else(|e| e.into_inner());
    // Three labelled types; half the cells unlabelled.
    let (z, y) = blobs(&CENTRES[..3], 200, 1);
    let codes: Vec<u32> = y.iter().enumerate().map(|(i, &c)| if i % 2 == 0 { c } else { UNLABELED }).collect();
    let m = fit(&z, &codes).unwrap();
    // New cells of the three types, and of a fourth type nobody labelled.
    let (zn, yn) = blobs(&CENTRES, 100, 2);
    let p = m.predict(&zn).unwrap();
    let (mut right, mut known, mut far_known, mut far_novel) = (0, 0, 0, 0);
    for (i, &t) in yn.iter().enumerate() {
        let row = &p.probabilities[i * 3..(i + 1) * 3];
        let best = (0..3).max_by(|&a, &b| row[a].total_cmp(&row[b])).unwrap() as u32;
        // χ²(5) 0.999 quantile: 20.5.
        let far = p.distance[i] > 20.5;
        if t < 3 {
            known += 1;
            right += usize::from(best == t);
            far_known += usize::from(far);
        } else {
            far_novel += usize::from(far);
        }
    }
    assert!(right as f64 / known as f64 > 0.97, "accuracy {right}/{known}");
    assert!(far_known <= 3, "{far_known} known-type cells called far");
    assert!(far_novel >= 95, "only {far_novel} of 100 unseen-type cells called far");
    // Round trip and reproducibility.
    let back = LabelModel::from_bytes(&m.to_bytes().unwrap()).unwrap();
    assert!(back.predict(&zn).unwrap().probabilities == p.probabilities);
    let again = fit(&z, &codes).unwrap();
    assert!(again.predict(&zn).unwrap().probabilities == p.probabilities);
}

#[test]
fn bad_labels_are_refused_with_a_reason() {
    let _turn = TORCH.lock().unwrap_or_else(|e| e.into_inner());
    let (z, y) = blobs(&CENTRES[..3], 20, 3);
    let err = |codes: Vec<u32>| fit(&z, &codes).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err(vec![UNLABELED; y.len()]).contains("every cell is unlabelled"));
    assert!(err(vec![1; y.len()]).contains("one class only"));
    let no_c: Vec<u32> = y.iter().map(|&c| c.min(1)).collect();
    assert!(err(no_c).contains("label 'c' has no cells"));
    let m = fit(&z, &y).unwrap();
    assert!(m.predict(&z[..4]).unwrap_err().to_string().contains("dimensions per cell"));
}
