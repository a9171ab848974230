#!/usr/bin/env bash
# Fine-tune on one node with one process per GPU (torchrun), FastChat's train_vicuna_7b.sh recipe.
# Usage: MODEL=/path/to/llama-7b DATA=data.json OUT=runs/vicuna GPUS=8 bash examples/train_single_node.sh [extra flags]
set -euo pipefail

MODEL="${MODEL:-$HOME/model_weights/llama-7b}"
DATA="${DATA:-data/dummy_conversation.json}"
OUT="${OUT:-output_vicuna_7b}"
GPUS="${GPUS:-8}"
STRATEGY="${STRATEGY:-fsdp}"          # fsdp | zero2 | zero3 | zero3_offload
MICRO_BATCH="${MICRO_BATCH:-2}"       # sequences per GPU per step
GLOBAL_BATCH="${GLOBAL_BATCH:-128}"   # sequences per optimizer step, over all GPUs (FastChat: 128)
MAX_LEN="${MAX_LEN:-2048}"
EPOCHS="${EPOCHS:-3}"
LR="${LR:-2e-5}"
SHUTDOWN_TIMEOUT="${SHUTDOWN_TIMEOUT:-900}"  # seconds torchrun waits after SIGTERM before SIGKILL (its
                                           # default 30 is too short to checkpoint a 7B model)
DRY_RUN="${DRY_RUN:-0}"               # 1: print the command instead of running it

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

if (( GLOBAL_BATCH % (MICRO_BATCH * GPUS) != 0 )); then
    echo "GLOBAL_BATCH=$GLOBAL_BATCH is not a multiple of MICRO_BATCH*GPUS=$((MICRO_BATCH * GPUS))" >&2
    exit 2
fi
GRAD_ACCUM=$(( GLOBAL_BATCH / (MICRO_BATCH * GPUS) ))

case "$STRATEGY" in
    fsdp) PARALLEL=(--fsdp --fsdp_config "$HERE/fsdp_full_shard.json") ;;
    zero2|zero3|zero3_offload) PARALLEL=(--deepspeed "$HERE/$STRATEGY.json" --gradient_checkpointing True) ;;
    *) echo "STRATEGY must be fsdp, zero2, zero3 or zero3_offload, not '$STRATEGY'" >&2; exit 2 ;;
esac

CMD=(
    torchrun --standalone --nnodes=1 --nproc_per_node="$GPUS" --shutdown-timeout="$SHUTDOWN_TIMEOUT"
    -m chatsft.train
    --model_name_or_path "$MODEL"
    --data_path "$DATA"
    --output_dir "$OUT"
    --bf16 True
    --tf32 True
    --num_train_epochs "$EPOCHS"
    --per_device_train_batch_size "$MICRO_BATCH"
    --per_device_eval_batch_size "$MICRO_BATCH"
    --gradient_accumulation_steps "$GRAD_ACCUM"
    --eval_strategy no
    --save_strategy steps
    --save_steps 1200
    --save_total_limit 10
    --learning_rate "$LR"
    --weight_decay 0.
    --warmup_steps 0.03
    --lr_scheduler_type cosine
    --logging_steps 1
    --model_max_length "$MAX_LEN"
    --lazy_preprocess True
    "${PARALLEL[@]}"
    "$@"
)

if [[ "$DRY_RUN" == 1 ]]; then
    printf '%q ' "${CMD[@]}"
    echo
else
    exec "${CMD[@]}"
fi
