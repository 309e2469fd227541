//! One file per algorithm: its loss, written like the paper's equation, and its task for the
//! shared training loop (SFT, RM, DPO) or its objective for the online-RL loop (PPO, GRPO).

pub mod dpo;
pub mod grpo;
pub mod ppo;
pub mod rm;
pub mod sft;
