//! rlhf: align language models with feedback — SFT, reward models, PPO(-ptx) and DPO — on real
//! Hugging Face checkpoints, CPU first.

pub mod algos;
pub mod checkpoint;
pub mod commands;
pub mod data;
pub mod dist;
pub mod eval;
#[doc(hidden)]
pub mod fuzzing; // the fuzz targets' bodies (fuzz/, tests/fuzz_corpus.rs)
pub mod generate;
pub mod io;
pub mod model;
pub mod ops;
pub mod reward;
pub mod rl;
pub mod settings;
pub mod text;
pub mod train;
