#!/usr/bin/env bash
# The own-images figures in the closing note (not part of make bench: about 8 min): a folder of 500 real images (Fashion-MNIST test images as PNG/JPEG files), 224 px.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
export PATH=$REPO/.venv/bin:$PATH
WORK=$(mktemp -d) && cd "$WORK" && echo "working in $WORK"
PYTHONPATH=$REPO python - <<'PY'
import numpy as np
from pathlib import Path
from headstart.fmnist import read_fmnist, idx_files, SYSTEM_DIR
from tests.tiny import write_image_folder
train, test = read_fmnist(idx_files(SYSTEM_DIR))
names = ["tshirt", "trouser", "pullover", "dress", "coat"]
imgs = np.concatenate([test.images[test.labels == l][:100] for l in range(5)])
write_image_folder(Path("photos"), imgs, np.repeat(np.arange(5), 100), names)
# held out: seen classes (train split images) and unseen classes (sandal 5, bag 8)
seen = np.concatenate([train.images[train.labels == l][:60] for l in range(5)])
write_image_folder(Path("seen"), seen, np.repeat(np.arange(5), 60), names, start=10000)
unseen = np.concatenate([test.images[test.labels == l][:150] for l in (5, 8)])
write_image_folder(Path("unseen"), unseen, np.repeat(np.arange(2), 150), ["sandal", "bag"], start=20000)
more = train.images[train.labels == 0][100:110]
write_image_folder(Path("more"), more, np.zeros(10, int), ["tshirt"], start=30000)
PY
s=$(date +%s.%N)
headstart init wardrobe --images photos > init.log 2>&1
install -D $REPO/.torch/hub/checkpoints/mobilenet_v2-b0353104.pth wardrobe/.torch/hub/checkpoints/mobilenet_v2-b0353104.pth
cd wardrobe
headstart run > ../run.log 2>&1
e=$(date +%s.%N); echo "init+run: $(echo "$e - $s" | bc) s"
grep -A6 "^| run" ../run.log
for r in frozen finetune; do echo "$r: $(cat reports/$r/metrics.json | tr -d '\n ')"; done
headstart predict --json ../unseen > ../unseen.json 2>/dev/null
headstart predict --json ../seen > ../seen.json 2>/dev/null
python -c "
import json
u=json.load(open('../unseen.json')); s=json.load(open('../seen.json'))
print('unseen rejected', sum(r['class']=='none' for r in u)/len(u), 'seen wrongly rejected', sum(r['class']=='none' for r in s)/len(s), 'seen accuracy', sum(r['class']==r['image'].split('/')[-2] for r in s)/len(s))"
headstart export frozen 2>&1 | tail -1
headstart export finetune 2>&1 | tail -1
git add -A >/dev/null; git -c user.email=m@m -c user.name=m commit -qm first
cp -r ../more/tshirt/* images/tshirt/
dvc add -q images
s=$(date +%s.%N)
dvc repro > ../repro.log 2>&1
e=$(date +%s.%N); echo "dvc repro after 10 photos: $(echo "$e - $s" | bc) s"
grep -E "Running stage|computed in" ../repro.log | sed 's/.*INFO headstart: //' | cut -c1-160
dvc metrics diff 2>&1 | head -20
