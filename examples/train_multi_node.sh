#!/usr/bin/env bash
# Fine-tune on several nodes: run this same script once on every node (same MASTER_ADDR, MASTER_PORT, RUN_ID).
# Rendezvous: torchrun's c10d store on MASTER_ADDR:MASTER_PORT assigns node ranks; set NODE_RANK (0..NNODES-1)
# to use fixed ranks instead (then node 0 must run on MASTER_ADDR).
# OUT and DATA must be on storage every node sees: each process writes its shards and RNG state into checkpoints.
# Usage (on each node): MASTER_ADDR=node0 NNODES=2 MODEL=... DATA=... OUT=... bash examples/train_multi_node.sh
set -euo pipefail

MODEL="${MODEL:-$HOME/model_weights/llama-7b}"
DATA="${DATA:-data/dummy_conversation.json}"
OUT="${OUT:-output_vicuna_7b}"
NNODES="${NNODES:-2}"
GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
MASTER_ADDR="${MASTER_ADDR:?set MASTER_ADDR to the address of the first node}"
MASTER_PORT="${MASTER_PORT:-29500}"
RUN_ID="${RUN_ID:-chatsft}"           # the same on every node of one run
NODE_RANK="${NODE_RANK:-}"            # empty: c10d rendezvous assigns ranks
STRATEGY="${STRATEGY:-fsdp}"          # fsdp | zero2 | zero3 | zero3_offload
MICRO_BATCH="${MICRO_BATCH:-2}"
GLOBAL_BATCH="${GLOBAL_BATCH:-128}"
MAX_LEN="${MAX_LEN:-2048}"
EPOCHS="${EPOCHS:-3}"
LR="${LR:-2e-5}"
SHUTDOWN_TIMEOUT="${SHUTDOWN_TIMEOUT:-900}"  # seconds torchrun waits after SIGTERM before SIGKILL (its
                                           # default 30 is too short to checkpoint a 7B model)
DRY_RUN="${DRY_RUN:-0}"

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

WORLD=$(( NNODES * GPUS_PER_NODE ))
if (( GLOBAL_BATCH % (MICRO_BATCH * WORLD) != 0 )); then
    echo "GLOBAL_BATCH=$GLOBAL_BATCH is not a multiple of MICRO_BATCH*NNODES*GPUS_PER_NODE=$((MICRO_BATCH * WORLD))" >&2
    exit 2
fi
GRAD_ACCUM=$(( GLOBAL_BATCH / (MICRO_BATCH * WORLD) ))

case "$STRATEGY" in
    fsdp) PARALLEL=(--fsdp --fsdp_config "$HERE/fsdp_full_shard.json") ;;
    zero2|zero3|zero3_offload) PARALLEL=(--deepspeed "$HERE/$STRATEGY.json" --gradient_checkpointing True) ;;
    *) echo "STRATEGY must be fsdp, zero2, zero3 or zero3_offload, not '$STRATEGY'" >&2; exit 2 ;;
esac

if [[ -n "$NODE_RANK" ]]; then
    LAUNCH=(--nnodes="$NNODES" --node_rank="$NODE_RANK" --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT")
else
    LAUNCH=(--nnodes="$NNODES" --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv_id="$RUN_ID")
fi

CMD=(
    torchrun "${LAUNCH[@]}" --nproc_per_node="$GPUS_PER_NODE" --shutdown-timeout="$SHUTDOWN_TIMEOUT"
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
