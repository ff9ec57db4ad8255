#!/usr/bin/env bash
# One GPU at full speed (issue 9), in one call:
#   DIT_DATA_DIR=<folder with mnist.npz> bash tools/gpu_fast.sh OUT [stages]
# stages (default "bench sweep quality"):
#   bench    python -m dit_core.bench --profile: the course loop, each fix, this project's loop, sampling
#   sweep    the fast path's throughput for candidate model sizes and batches ($SWEEP: one "--set ..." list per line)
#   quality  tools/time_to_quality.py at configs/mnist.yaml (+ $QSET overrides), $QSECONDS of training
set -uo pipefail
OUT=${1:-results/gpu_fast}; STAGES=${2:-"bench sweep quality"}; mkdir -p "$OUT"
export TQDM_DISABLE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))"
for stage in $STAGES; do
  echo "=== $stage $(date +%T)"
  case $stage in
    bench) timeout 300 python3 -m dit_core.bench --profile --steps ${BSTEPS:-40} --warmup 10 --json "$OUT/bench.json" 2>&1 \
             | grep -v -E "USDT|Warning|warn" ;;
    sweep) echo "${SWEEP:-}" | while read -r line; do
             [ -z "$line" ] && continue
             timeout 120 python3 -m dit_core.bench --rows fast --steps 30 --warmup 10 $line --json /tmp/s.json 2>&1 \
               | grep -E "^\[bench\]|Error|error" ; python3 -c "import json,sys; r=json.load(open('/tmp/s.json'))['rows'][0]; r['set']=sys.argv[1]; print(json.dumps(r))" "$line" >> "$OUT/sweep.jsonl"
           done ;;
    quality) timeout ${QTIMEOUT:-420} python3 tools/time_to_quality.py --config configs/mnist.yaml ${QSET:-} \
             --snap-every ${QSNAP:-15} --tstr ${QTSTR:-5000} --out /tmp/q 2>&1 | grep -v -E "USDT|Warning|warn"
           for f in quality.json quality_curve.png samples.png; do cp /tmp/q/$f "$OUT/${QNAME:-q}_$f" 2>/dev/null; done ;;
  esac
done
echo "=== done $(date +%T)"
