"""Collect every GPU run, results/gpu/<batch>/<step>/metrics.json, into summary.json and print a
Markdown table per batch (recipes are compared only within a batch: same code, same machine).

    python results/gpu/summarize.py      # writes results/gpu/summary.json

A step named <recipe>-seedN is seed N of <recipe>. Accuracies are at the last epoch (epoch 20):
one view per test image, and with flip TTA where the run scored it. train_seconds is a speed
figure only for a run that had the GPU to itself (step.json "alone"; the batches before
2026-11-30 ran one step at a time).
"""
import glob
import json
import os
import re
import statistics

HERE = os.path.dirname(os.path.abspath(__file__))


def run_record(path):
    with open(path) as f:
        m = json.load(f)
    folder = os.path.dirname(path)
    batch, step = folder.split(os.sep)[-2:]
    step_file = os.path.join(folder, "step.json")
    alone = True
    if os.path.isfile(step_file):
        with open(step_file) as f:
            alone = json.load(f)["alone"]
    return {"batch": batch, "step": step, "recipe": re.sub(r"-seed\d+$", "", step), "seed": m["args"]["seed"],
            "device_name": m["device_name"], "args": m["args"], "max_lr": m["max_lr"],
            "epochs": len(m["epochs"]), "final_test_acc": m["final_test_acc"],
            "final_test_acc_tta": m.get("final_test_acc_tta"), "final_test_acc_tta6": m.get("final_test_acc_tta6"),
            "final_test_acc_ema": m.get("final_test_acc_ema"),
            "best_test_acc": m["best_test_acc"],
            "final_train_acc": m["epochs"][-1]["train_acc"], "train_seconds": m["train_seconds"],
            "alone": alone}


def spread(values):
    """mean, lowest, highest of the values that exist; None where none do."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"mean": statistics.mean(values), "min": min(values), "max": max(values), "n": len(values)}


def recipe_summary(runs):
    return {"runs": len(runs), "seeds": [r["seed"] for r in runs],
            "final_test_acc": spread(r["final_test_acc"] for r in runs),
            "final_test_acc_tta": spread(r["final_test_acc_tta"] for r in runs),
            "final_test_acc_tta6": spread(r["final_test_acc_tta6"] for r in runs),
            "final_test_acc_ema": spread(r["final_test_acc_ema"] for r in runs),
            "train_seconds_alone": [r["train_seconds"] for r in runs if r["alone"]]}


def cell(stats):
    if stats is None:
        return "-"
    if stats["n"] == 1:
        return f"{stats['mean']:.2f}"
    return f"**{stats['mean']:.2f}** ({stats['min']:.2f} to {stats['max']:.2f})"


def main():
    runs = [run_record(p) for p in sorted(glob.glob(os.path.join(HERE, "*", "*", "metrics.json")))]
    summary = {"runs": runs, "batches": {}}
    for batch in sorted({r["batch"] for r in runs}):
        recipes = {}
        for r in (r for r in runs if r["batch"] == batch):
            recipes.setdefault(r["recipe"], []).append(r)
        summary["batches"][batch] = {name: recipe_summary(rs) for name, rs in recipes.items()}
        print(f"\n{batch}\n\n| recipe | seeds | epoch 20, one view: mean (range) | with flip TTA | six views | "
              f"EMA, one view | train s, alone |\n| --- | --- | --- | --- | --- | --- | --- |")
        order = sorted(summary["batches"][batch].items(), key=lambda kv: -kv[1]["final_test_acc"]["mean"])
        for name, s in order:
            seconds = " ".join(f"{x:.1f}" for x in s["train_seconds_alone"]) or "-"
            print(f"| {name} | {len(s['seeds'])} | {cell(s['final_test_acc'])} | {cell(s['final_test_acc_tta'])} "
                  f"| {cell(s['final_test_acc_tta6'])} | {cell(s['final_test_acc_ema'])} | {seconds} |")
    with open(os.path.join(HERE, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
