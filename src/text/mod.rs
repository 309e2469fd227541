//! Text in and out of token ids: tokenizers (Hugging Face `tokenizer.json` or built from a GGUF
//! file's vocabulary) and chat templates, rendered in a minijinja sandbox.

pub mod chat_template;
pub mod tokenizer;

pub use chat_template::{apply_chat_template, render_chat, ChatTemplate};
pub use tokenizer::Tokenizer;
