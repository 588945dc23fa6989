#!/usr/bin/env bash
# FP8 against bf16 on one CUDA GPU, in one go: `bench/step.py` on the Llama 3 1B shape and on the
# Llama 3 8B shape cut to 8 layers (the 8B's widths, which decide what fp8 gains per matmul; all
# 32 layers with fp32 master weights and AdamW need about 130 GB before activations). Each run
# measures bf16-mixed first, then fp8 (tensorwise, then rowwise on 1B), compiled, in one process,
# and prints each step time as a ratio to bf16-mixed's beside the planner's predicted ratio.
#
# Meant for a bare, lent GPU machine with the repository copied and nothing to download: Python
# packages the image lacks (torchao, hydra-core, omegaconf, antlr4-python3-runtime) come as wheels
# in .whl/ (see docs/benchmarks.md, "FP8 against bf16"). Sized for about 5 minutes on one H200,
# compilation included (not yet run there: the timeouts below cap it at 7).
#
#     OUT=/some/dir bash bench/gpu_check.sh      # results: $OUT/*.txt, $OUT/*.json
set -uo pipefail
OUT=${OUT:-bench-gpu-out}
PYTHON=${PYTHON:-python3}
HARDWARE=${HARDWARE:-h200}  # the catalog entry of the GPU at hand (peak FLOP/s for MFU)
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

# Llama 3 1B: bf16-mixed, fp8 tensorwise, fp8 rowwise
timeout 240 "$PYTHON" bench/step.py --steps 15 --warmup 5 --json "$OUT/llama3_1b.json" \
    "${COMMON[@]}" model=llama3_1b data.micro_batch_size=4 \
    --variant trainer.precision=bf16-mixed --variant trainer.precision=fp8 \
    --variant "trainer.precision=fp8 trainer.fp8_recipe=rowwise" \
    2>&1 | tee "$OUT/llama3_1b.txt"
echo "llama3_1b exit ${PIPESTATUS[0]}" | tee -a "$OUT/status.txt"

# Llama 3 8B widths, 8 layers: bf16-mixed, fp8 tensorwise
timeout 180 "$PYTHON" bench/step.py --steps 15 --warmup 5 --json "$OUT/llama3_8b_8layers.json" \
    "${COMMON[@]}" model=llama3_8b model.n_layers=8 data.micro_batch_size=2 \
    --variant trainer.precision=bf16-mixed --variant trainer.precision=fp8 \
    2>&1 | tee "$OUT/llama3_8b_8layers.txt"
echo "llama3_8b_8layers exit ${PIPESTATUS[0]}" | tee -a "$OUT/status.txt"
