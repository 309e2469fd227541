//! One file per algorithm: its loss, written like the paper's equation, and its task for the
//! shared training loop.

pub mod dpo;
pub mod ppo;
pub mod ppo_trainer;
pub mod rm;
pub mod sft;
