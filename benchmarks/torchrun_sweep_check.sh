#!/bin/bash
# Device check of `tome-fx sweep` under torchrun (issue 30), about a minute on one GPU:
#   bash benchmarks/torchrun_sweep_check.sh OUT_DIR
# 1. one process on CUDA; 2. torchrun, 2 processes, nccl (on a machine with one GPU NCCL may
# refuse two ranks on it: then both print the same one-line error); 3. torchrun, 2 processes,
# CUDA models in the script's own gloo group (tome_fx.sweep). Prints whether 2 and 3 give
# one process's numbers (throughput aside).
OUT=${1:-/tmp/torchrun_sweep_check}; mkdir -p "$OUT"
export PYTHONPATH=$PWD OMP_NUM_THREADS=1 OUT
W=$(mktemp -d); cd "$W"
python - <<'PY'
import numpy as np, timm, torch
from pathlib import Path
from PIL import Image
torch.manual_seed(0)
torch.save(timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=4,
                             num_classes=3).eval(), "m.pt")
for i, p in enumerate(np.random.default_rng(0).integers(0, 256, (12, 40, 48, 3), np.uint8)):
    Path(f"tree/c{i % 3}").mkdir(parents=True, exist_ok=True)
    Image.fromarray(p).save(f"tree/c{i % 3}/{i:02d}.png")
PY
A="sweep m.pt --trust-pickle --data tree --calib 4 --budgets 1,0.7 --batch-size 2 --warmup 1 --runs 3"
RUN="python -m torch.distributed.run --standalone --nproc_per_node 2"
timeout 120 python -m tome_fx $A --device cuda --json "$OUT/one.json"; echo "one process: rc=$?"
timeout 180 $RUN --redirects 3 --log-dir "$OUT/logs" -m tome_fx $A --device cuda \
    --json "$OUT/nccl.json"; echo "torchrun nccl: rc=$?"
cat > api.py <<'PY'
import json, os, torch, torch.distributed as dist, tome_fx
dist.init_process_group("gloo")
model = torch.load("m.pt", weights_only=False).cuda()
res = tome_fx.sweep(model, "tree", budgets=(1, 0.7), calibration=4, batch_size=2, warmup=1,
                    runs=3, quiet=True)
if dist.get_rank() == 0:
    json.dump(res.to_dict(), open(os.environ["OUT"] + "/api.json", "w"), indent=1)
dist.destroy_process_group()
PY
timeout 180 $RUN api.py; echo "torchrun api gloo+cuda: rc=$?"
find "$OUT/logs" -name "*.log" -size +0 2>/dev/null | sort | while read -r f; do
    echo "== $f"; head -c 2000 "$f"; done
python - <<'PY'
import json, os
out = os.environ["OUT"]
def strip(name):
    try:
        d = json.load(open(f"{out}/{name}"))
    except OSError:
        return None
    print(name, d["world_size"], d["items_per_rank"], [(r["strategy"], r["items_per_s"]) for r in d["rows"]])
    d = {k: v for k, v in d.items() if k not in ("world_size", "items_per_rank", "throughput_note")}
    d["rows"] = [{k: v for k, v in r.items() if k not in ("items_per_s", "speedup")} for r in d["rows"]]
    return d
one, nccl, api = strip("one.json"), strip("nccl.json"), strip("api.json")
print("nccl equals one process:", nccl is not None and nccl == one)
print("api (gloo, CUDA models) equals one process:",
      api is not None and {**api, "model": one["model"]} == one)
PY
