#!/usr/bin/env bash
# Writes the starting corpus of every fuzz target (fuzz/corpus/<target>/) from the repo's test
# fixtures and a few hand-written records. The campaign (`run.sh`) grows it; `minimize.sh` shrinks it again.
set -euo pipefail
cd "$(dirname "$0")"
fx=../tests/fixtures
sep() { printf '\0\0\0\0'; }
c() { mkdir -p "corpus/$1"; cat > "corpus/$1/$2"; }

cp_seed() { mkdir -p "corpus/$1"; cp "$2" "corpus/$1/$3"; }
cp_seed safetensors_file $fx/models/llama-tied/model.safetensors llama-tied
cp_seed safetensors_file $fx/models/llama-untied-bf16/model.safetensors llama-untied-bf16
cp_seed gguf_file $fx/models/llama-gguf/model.gguf llama
for m in $fx/models/*/config.json; do
  cp_seed model_config "$m" "$(basename "$(dirname "$m")")"
done
for t in tokenizer tokenizer-llama3; do
  { cat $fx/$t/tokenizer.json; sep; cat $fx/$t/tokenizer_config.json; } | c tokenizer_files $t
done
for j in $fx/chat-templates/*.jinja; do cp_seed chat_template "$j" "$(basename "$j" .jinja)"; done
python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["chat_template"], end="")' \
  $fx/tokenizer/tokenizer_config.json | c chat_template chatml

c sft_jsonl text <<'J'
{"text": "The movie was great."}
{"text": "Terrible plot, fine acting."}
J
c sft_jsonl prompt_completion <<'J'
{"prompt": "Review: ", "completion": "It was fun."}
{"prompt": [{"role": "user", "content": "Hi"}], "completion": [{"role": "assistant", "content": "Hello"}]}
J
c sft_jsonl messages <<'J'
{"messages": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}
J
c preference_jsonl pairs <<'J'
{"prompt": "Q: ", "chosen": "yes", "rejected": "no"}
{"prompt": "Q2: ", "chosen": "good", "rejected": "bad", "margin": 1.5}
J
c preference_jsonl implicit_prompt <<'J'
{"chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}], "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Go away"}]}
J
c preference_jsonl rankings <<'J'
{"prompt": "Rate: ", "completions": ["best", "middle", "worst"], "ranking": [0, 1, 2]}
{"prompt": "Rate: ", "completions": ["a", "b", "c", "d"], "ranking": [3, 0, 2, 1]}
J
c prompt_jsonl text <<'J'
{"prompt": "This film is"}
{"prompt": "I think", "answer": "42"}
J
c prompt_jsonl messages <<'J'
{"prompt": [{"role": "user", "content": "What is 2+2?"}], "solution": "4"}
J
for p in $fx/parquet/*.parquet; do cp_seed parquet_file "$p" "$(basename "$p" .parquet)"; done

n=0
for t in ../configs/*.toml; do
  case "$(basename "$t")" in sft*) cmd='\0' ;; ppo*) cmd='\3' ;; *) cmd='\1' ;; esac
  { printf "$cmd"; cat "$t"; sep; printf 'learning_rate=1e-5\nmax_steps=3\n'; } | c toml_settings "config-$n"
  n=$((n + 1))
done
{ printf '\2'; printf 'model = "m"\ntrain_file = "d.jsonl"\nbeta = 0.1\nloss_type = "ipo"\n'; } | c toml_settings dpo
{ printf '\4'; printf 'model = "m"\nprompt_file = "p.jsonl"\nnum_generations = 4\nreward_funcs = ["accuracy:answer"]\n'; sep; printf 'use_peft=true\nlora_r=8\n'; } | c toml_settings grpo

cp_seed peft_adapter $fx/lora/llama-tied-all-rslora/adapter_config.json rslora
{ cat $fx/lora/llama-tied-all-rslora/adapter_config.json; sep; cat $fx/lora/llama-tied-all-rslora/adapter_model.safetensors; } | c peft_adapter rslora_with_weights

printf '{"reward": 0.5}' | c reward_reply plain
printf '  {"reward": -1e-3, "details": {"x": [1, 2]}}\n' | c reward_reply nested
printf '{"reward": 1e400}' | c reward_reply overflow
