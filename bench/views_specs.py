"""Which augmentation helps a frozen head? `python -m bench.views_specs [FRACTION ...]` (6 min; not in make bench).

Benchmark 13 compares stored views with on-the-fly augmentation for one pipeline; this compares
pipelines. The same pretrained FMNIST-2 CNN, frozen at its cut, params.yaml's frozen recipe, a head
on FMNIST-1's plain rows and one on K = 4 stored views per pipeline, each also scored with test-time
augmentation read from the store (the plain image and its horizontal flip averaged). Prints JSON
lines; docs/benchmarks.md (benchmark 13) holds the figures.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from headstart.env import configure_environment

SPECS = {
    "flip": [{"RandomHorizontalFlip": {}}],
    "flip+translate": [{"RandomHorizontalFlip": {}}, {"RandomAffine": {"degrees": 0, "translate": [0.06, 0.06]}}],
    "default": [
        {"RandomResizedCrop": {"scale": [0.8, 1.0], "ratio": [0.9, 1.1]}},
        {"RandomHorizontalFlip": {}},
        {"RandomRotation": {"degrees": 10}},
    ],
}


def main(fractions: list[float]) -> None:
    root = Path(tempfile.mkdtemp(prefix="headstart-views-specs-"))
    configure_environment(root)  # before Prefect or MLflow is imported

    from bench.views import accuracy, pretrained_source
    from bench.workspace import Workspace
    from headstart.augment import TTA_VIEWS
    from headstart.calibration import averaged_probabilities
    from headstart.extraction import sample_keys
    from headstart.fit import predict_logits
    from headstart.strategies import Recipe, train_frozen_head
    from headstart.streaming import keyed_rows, stored_rows, viewed_rows
    from headstart.views import tta_keys

    ws = Workspace(root / "bench", quick=False)
    source, target = pretrained_source(ws), ws.target
    recipe = Recipe(ws.params.train.head, ws.params.train.frozen, ws.params.train.seed, "cpu")
    stream = ws.params.train.stream
    for fraction in fractions:
        task = ws.subset(round(len(target.train) * fraction), len(target.val), len(target.test))
        data_dir, meta = ws.save(task, f"specs-{fraction}")
        for name, spec in SPECS.items():
            params = ws.params.extract.model_copy(update={"views": 4, "tta": 1, "augment": spec})
            record, _ = ws.extract(source, data_dir, meta, root / "features" / f"specs-{fraction}", params=params)
            flips = tta_keys(sample_keys(task.test.images), TTA_VIEWS[:1])[0]
            out = {}
            for label, rows in (("plain", stored_rows), ("views", viewed_rows)):
                train = (rows(record, task.train.images, record.cut, stream), task.train.labels)
                val = (stored_rows(record, task.val.images, record.cut, stream), task.val.labels)
                head, _ = train_frozen_head(train, val, task.num_classes, recipe)
                logits = predict_logits(head, stored_rows(record, task.test.images, record.cut, stream))
                flipped = predict_logits(head, keyed_rows(record, flips, record.cut, stream))
                tta = float((averaged_probabilities([logits, flipped]).argmax(1) == task.test.labels).mean())
                out[label] = {"accuracy": accuracy(logits, task.test.labels), "tta_flip": tta}
            print(json.dumps({"fraction": fraction, "spec": name, **out}), flush=True)


if __name__ == "__main__":
    main([float(f) for f in sys.argv[1:]] or [0.05, 0.25])
