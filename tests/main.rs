//! The integration tests, in one test binary: each file below is a module, and `common` holds the
//! helpers they share (fixture paths, running the `rlhf` binary, reading its outputs). One binary
//! links the crate once instead of once per file.

mod common;

mod accumulation;
mod bf16;
mod chat_template;
mod checkpointing;
mod cli_errors;
mod convert;
mod distributed;
mod eval;
mod frozen_storage;
mod fused_ops;
mod fuzz_corpus;
mod generate;
mod grad;
mod grpo;
mod hostile_inputs;
mod interruption;
mod lora;
mod metrics;
mod output_dir;
mod parity;
mod parquet_files;
mod ppo;
mod preference;
mod quickstart;
mod settings;
mod sft;
mod sft_data;
mod smollm2;
mod sources;
mod tokenizer;
mod train_guard;
