#!/usr/bin/env bash
# Every benchmark that matters on a GPU, in one go, each part bounded, then one table:
#   1. training speed against the tutorial's loop: fp32, then fp16 and bf16 (auto on a CPU)
#   2. run.compile and run.allow_tf32: first step, later steps, break-even
#   3. peak memory with and without the memory savers (benchmarks/memory.py)
#   4. a short text-to-image LoRA run on a tiny Stable Diffusion pipeline
# Usage: bash benchmarks/gpu.sh [SECONDS_PER_PART]   (default 240; run from anywhere)
# It also runs on a CPU (smaller sizes), which is how it is tested without a GPU.
set -u
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
LIMIT=${1:-240}
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT

DEVICE=$($PYTHON -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')")
if [ "$DEVICE" = cpu ]; then
    # compiling takes minutes on a CPU: compile is left to the GPU run and benchmarks/compile.py
    SIZE=small-32; PRECISIONS=no,auto; STEPS=4; MEMORY=(--models b --steps 2 --batch-b 2); SETTINGS=eager,tf32
else
    SIZE=tutorial-64; PRECISIONS=no,fp16,bf16; STEPS=8; MEMORY=(--models a,b --steps 3); SETTINGS=eager,compile,tf32
fi

NAMES=(); STATUS=(); SECONDS_TAKEN=()
part() {  # part NAME COMMAND...: run it under the time limit, keep its output and status
    local name=$1; shift
    local started=$SECONDS
    echo "== $name: $*" >&2
    timeout "$LIMIT" "$@" >"$OUT/$name.txt" 2>&1
    local rc=$?
    NAMES+=("$name"); SECONDS_TAKEN+=($((SECONDS - started)))
    if [ $rc -eq 0 ]; then STATUS+=(ok); elif [ $rc -eq 124 ]; then STATUS+=("cut at ${LIMIT} s"); else STATUS+=("failed ($rc)"); fi
}

part speed $PYTHON -m benchmarks.train --sizes "$SIZE" --precisions "$PRECISIONS" --steps "$STEPS" --rounds 1
part compile $PYTHON -m benchmarks.compile --size "$SIZE" --steps $((STEPS * 4)) --rounds 1 --settings "$SETTINGS"
part memory $PYTHON -m benchmarks.memory "${MEMORY[@]}"
part tiny-sd-lora bash -c "$PYTHON -m difftool.tiny_models '$OUT/tiny-sd' >/dev/null && \
    $PYTHON -m difftool run recipes/sd-lora-tiny.toml --set model.pretrained='\"$OUT/tiny-sd\"' \
    --set run.output_dir='\"$OUT/sd-lora\"' --set dataset.latent_cache_dir='\"$OUT/cache\"' \
    --set run.max_steps=20 --set run.mixed_precision='\"auto\"' && test -f '$OUT/sd-lora/pytorch_lora_weights.safetensors'"

echo
echo "# benchmarks/gpu.sh on $DEVICE ($(date -u +%Y-%m-%d), torch $($PYTHON -c 'import torch; print(torch.__version__)'))"
echo
echo "| part | status | seconds |"
echo "|---|---|---|"
for i in "${!NAMES[@]}"; do echo "| ${NAMES[$i]} | ${STATUS[$i]} | ${SECONDS_TAKEN[$i]} |"; done
for name in "${NAMES[@]}"; do
    echo
    echo "## $name"
    if grep -q '^|' "$OUT/$name.txt"; then grep -E '^(\||[a-z].*(steps|peaks|batch))' "$OUT/$name.txt"; else tail -n 5 "$OUT/$name.txt"; fi
done
failed=0
for status in "${STATUS[@]}"; do [ "$status" = ok ] || failed=1; done
exit $failed
