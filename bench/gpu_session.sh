#!/usr/bin/env bash
# Everything a lent GPU is checked for, in one go (under 10 minutes on one H200):
#   1. `bench/step.py` on Llama 3 1B, compiled: bf16-true (the MFU target), bf16-mixed, fp8
#      tensorwise and rowwise, in one process; then the Llama 3 8B widths cut to 8 layers in
#      bf16-mixed and fp8. Each line gives MFU and the planner's memory estimate beside
#      torch.cuda.max_memory_allocated, and each variant's speed-up beside the planner's.
#   2. The CUDA path of `python -m trainer` itself: a short run on the GPU that saves a DCP
#      checkpoint, then a resume of it (one GPU: one rank, so the single-device strategy; a mesh
#      needs two GPUs).
# Packages the GPU image lacks come as wheels in .whl/ (docs/benchmarks.md, "FP8 against bf16").
#
#     OUT=/some/dir bash bench/gpu_session.sh      # results: $OUT/*.txt, $OUT/*.json
set -uo pipefail
OUT=${OUT:-bench-gpu-out}
PYTHON=${PYTHON:-python3}
HARDWARE=${HARDWARE:-h200}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

if compgen -G ".whl/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

{
    nvidia-smi --query-gpu=name,memory.total,driver_version,power.limit --format=csv
    "$PYTHON" - <<'EOF'
import sys, torch
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)
print("device", torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0))
import torchao
print("torchao", torchao.__version__)
EOF
} 2>&1 | tee "$OUT/environment.txt"

COMMON=(hardware="$HARDWARE" parallelism.compile=true data.seq_len=2048)
step() {  # name, timeout, then bench/step.py's arguments
    local name=$1 limit=$2
    shift 2
    timeout "$limit" "$PYTHON" bench/step.py --steps 12 --warmup 4 --json "$OUT/$name.json" "$@" \
        2>&1 | tee "$OUT/$name.txt"
    echo "$name exit ${PIPESTATUS[0]}" | tee -a "$OUT/status.txt"
}
step llama3_1b 230 "${COMMON[@]}" model=llama3_1b data.micro_batch_size=4 \
    --variant trainer.precision=bf16-true --variant trainer.precision=bf16-mixed \
    --variant trainer.precision=fp8 --variant "trainer.precision=fp8 trainer.fp8_recipe=rowwise"
step llama3_8b_8layers 150 "${COMMON[@]}" model=llama3_8b model.n_layers=8 \
    data.micro_batch_size=2 --variant trainer.precision=bf16-mixed \
    --variant trainer.precision=fp8

# The trainer on the GPU: 6 steps and a checkpoint, then resumed to 10.
RUN=(-m trainer hardware="$HARDWARE" trainer.devices=1 model=llama3_1b model.n_layers=4
     trainer.precision=bf16-mixed data.seq_len=1024 data.micro_batch_size=4 tracking=none
     trainer.log_every_n_steps=2 checkpoint.every_n_steps=6 hydra.run.dir="$OUT/trainer")
timeout 80 "$PYTHON" "${RUN[@]}" trainer.max_steps=6 2>&1 | tail -25 | tee "$OUT/trainer.txt"
echo "trainer exit ${PIPESTATUS[0]}" | tee -a "$OUT/status.txt"
timeout 80 "$PYTHON" "${RUN[@]}" trainer.max_steps=10 checkpoint.resume=last 2>&1 | tail -25 \
    | tee "$OUT/trainer-resumed.txt"
echo "trainer-resumed exit ${PIPESTATUS[0]}" | tee -a "$OUT/status.txt"
rm -rf "$OUT/trainer"  # checkpoints: too large to bring back
