#!/usr/bin/env bash
# Every README command, in a fresh clone with no ../shared beside it, timed (a Markdown table on
# stdout; each command's own output goes to $OUT_FILE). Run `make demo` in the clone first.
#   git clone . /tmp/fresh/launcher && (cd /tmp/fresh/launcher && make demo) && scripts/readme-commands.sh /tmp/fresh/launcher
set -u
cd "$1"
OUT_FILE=${OUT_FILE:-/tmp/readme_out.txt}
source .venv/bin/activate
export HF_HUB_OFFLINE=1
t() { local s=$(date +%s.%N); "$@" >> "$OUT_FILE" 2>&1; local rc=$?; local e=$(date +%s.%N);
      printf '| `%s` | %s | %.1f s |\n' "$*" "$rc" "$(echo "$e - $s" | bc)"; }
echo "| command | exit | wall |"
echo "| --- | --- | --- |"
t launcher recipes validate recipes/
t launcher recipes show recipes/sft/llama-3.1-8b-full-sft.yaml train.lr=2e-5
t launcher run recipes/examples/tiny-sft.yaml train.max_steps=100 --run-dir runs/try1
t launcher run recipes/examples/tiny-pretrain.yaml --run-dir runs/pretrain
t launcher data prepare recipes/examples/tiny-mix.yaml
t launcher run recipes/examples/tiny-lora.yaml train.max_steps=50 --run-dir runs/lora
t launcher ckpt export runs/lora --out hf/lora-adapter
t launcher ckpt export runs/lora --merge --out hf/lora-merged
t launcher run recipes/examples/tiny-dpo.yaml train.max_steps=50 --run-dir runs/dpo
t launcher plot runs/try1
t launcher run recipes/examples/tiny-sft.yaml train.max_step=5
t launcher estimate recipes/sft/llama-3.1-8b-full-sft.yaml --gpu A100-80GB
t launcher estimate --model meta-llama/Llama-3.1-8B --gpu RTX4090-24GB train.method=qlora
t launcher submit recipes/sft/llama-3.1-8b-full-sft.yaml --cluster cluster/example-slurm.yaml --dry-run
t launcher submit recipes/sft/llama-3.1-8b-full-sft.yaml --cluster cluster/example-skypilot.yaml --dry-run
t launcher status
RID=$(launcher status --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["run_id"])')
t launcher logs "$RID" -f
t launcher cancel "$RID"
t launcher resume runs/try1 train.max_steps=200
t launcher ckpt list runs/try1
t launcher ckpt verify runs/try1
t launcher ckpt export runs/try1 --out hf/try1
t launcher resume runs/try1
