//! Teachers: the batch-free embeddings a student is distilled from.
//! Harmony on principal components; any embedding the user supplies is used
//! as it is.

mod harmony;

pub use harmony::{harmony, harmony_into, Embedding, HarmonyCells, HarmonyCovariate, HarmonyParams, HarmonyResult};
