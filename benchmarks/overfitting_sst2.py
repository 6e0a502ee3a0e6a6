"""Overfitting on a small SST-2 sample, with and without regularization, in one script run.

Fine-tunes the bundled MiniLM on the first 256 SST-2 training sentences for
8 epochs at max length 64, evaluating on the first 256 dev sentences after
each epoch, once per configuration. The overfitting monitor runs with
action "warn", so every run goes the full 8 epochs and reports the first
evaluation at which a rule fired.

    python benchmarks/overfitting_sst2.py [--glue PATH] [--configs none,all]

Needs the GLUE data (default: ../shared/data/glue beside the repository).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from tfft.config import TrainConfig  # noqa: E402
from tfft.train import prepare_run, run  # noqa: E402

CONFIGURATIONS = {
    "none": {"dropout": 0.0, "weight_decay": 0.0, "augment": None},
    "dropout": {"dropout": 0.2, "weight_decay": 0.0, "augment": None},
    "weight_decay": {"dropout": 0.0, "weight_decay": 0.1, "augment": None},
    "augment": {"dropout": 0.0, "weight_decay": 0.0, "augment": ["delete", "swap", "insert", "synonym"]},
    "all": {"dropout": 0.2, "weight_decay": 0.1, "augment": ["delete", "swap", "insert", "synonym"]},
}


def write_head(source: Path, target: Path, count: int) -> Path:
    with source.open(encoding="utf-8-sig", newline="") as file:
        rows = list(csv.reader(file, delimiter="\t", quoting=csv.QUOTE_NONE))[: count + 1]
    with target.open("w", encoding="utf-8", newline="") as file:
        csv.writer(file, delimiter="\t", quoting=csv.QUOTE_NONE, escapechar="\\").writerows(rows)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--glue", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "glue"))
    parser.add_argument("--configs", default="none,all")
    parser.add_argument("--epochs", type=int, default=8)
    args = parser.parse_args()
    sst2 = Path(args.glue) / "SST-2"
    if not sst2.is_dir():
        sys.exit(f"SST-2 not found at {sst2}; pass --glue with the GLUE folder.")

    folder = Path(tempfile.mkdtemp(prefix="tfft-overfitting-"))
    train_file = write_head(sst2 / "train.tsv", folder / "train.tsv", 256)
    dev_file = write_head(sst2 / "dev.tsv", folder / "dev.tsv", 256)
    rows = []
    for name in args.configs.split(","):
        options = CONFIGURATIONS[name]
        config = TrainConfig(
            train_data=str(train_file),
            eval_data=str(dev_file),
            text_columns=["sentence"],
            max_length=64,
            epochs=args.epochs,
            overfitting_action="warn",
            output_dir=str(folder / name),
            **options,
        )
        start = time.perf_counter()
        result = run(prepare_run(config))
        seconds = time.perf_counter() - start
        metrics = result.metrics
        accuracies = [epoch["val_accuracy"] for epoch in metrics["epochs"]]
        fired = metrics["overfitting"]["fired"]
        rows.append(
            {
                "config": name,
                "fired_at": f"{fired[0]['evaluation']} ({fired[0]['rule']})" if fired else "never",
                "best_accuracy": max(accuracies),
                "best_epoch": accuracies.index(max(accuracies)) + 1,
                "last_accuracy": accuracies[-1],
                "last_train_loss": metrics["epochs"][-1]["loss"],
                "last_val_loss": metrics["epochs"][-1]["val_loss"],
                "seconds": seconds,
                "accuracies": accuracies,
            }
        )
        print(json.dumps(rows[-1]), flush=True)

    print()
    print(f"{'config':<14}{'monitor fired at':>18}{'best dev acc':>14}{'epoch':>7}{'last dev acc':>14}"
          f"{'last train loss':>17}{'last dev loss':>15}{'seconds':>9}")
    for row in rows:
        print(f"{row['config']:<14}{row['fired_at']:>18}{row['best_accuracy']:>14.4f}{row['best_epoch']:>7}"
              f"{row['last_accuracy']:>14.4f}{row['last_train_loss']:>17.4f}{row['last_val_loss']:>15.4f}"
              f"{row['seconds']:>9.0f}")


if __name__ == "__main__":
    main()
