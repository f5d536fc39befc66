"""Collect every GPU run under results/gpu/<device>/<step>/metrics.json into summary.json.

    python results/gpu/summarize.py      # writes results/gpu/summary.json, prints a Markdown table

A step named <recipe>-seedN is seed N of <recipe>; recipes are averaged over their seeds.
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
    device, step = path.split(os.sep)[-3:-1]
    a = m["args"]
    epochs = m["epochs"]
    return {
        "device": device, "step": step, "recipe": re.sub(r"-seed\d+$", "", step), "device_name": m["device_name"],
        "flags": {"optimizer": a["optimizer"], "max_lr": m["max_lr"], "wd": a["wd"],
                  "label_smoothing": a["label_smoothing"], "flip": not a["no_flip"],
                  "cutout_p": a.get("cutout_p", 1.0), "compile": a["compile"], "seed": a["seed"]},
        "best_test_acc": m["best_test_acc"], "best_epoch": m["best_epoch"], "final_test_acc": m["final_test_acc"],
        "final_train_acc": epochs[-1]["train_acc"],
        "train_seconds": m["train_seconds"], "seconds_with_testing": sum(e["seconds"] for e in epochs),
        "median_epoch_images_per_s": statistics.median(e["train_images_per_s"] for e in epochs),
    }


def main():
    runs = [run_record(p) for p in sorted(glob.glob(os.path.join(HERE, "*", "*", "metrics.json")))]
    recipes = {}
    for r in runs:
        recipes.setdefault(r["recipe"], []).append(r)
    summary = {"runs": runs, "recipes": {}}
    print("| recipe | runs (device) | best test accuracy, each | mean | train s, each |")
    print("| --- | --- | --- | --- | --- |")
    for name, rs in sorted(recipes.items(), key=lambda kv: -statistics.mean(r["best_test_acc"] for r in kv[1])):
        accs = [r["best_test_acc"] for r in rs]
        summary["recipes"][name] = {"runs": len(rs), "mean_best_test_acc": statistics.mean(accs),
                                    "stdev_best_test_acc": statistics.stdev(accs) if len(accs) > 1 else None,
                                    "best_test_accs": accs, "devices": [r["device"] for r in rs]}
        devices = ", ".join(sorted({r["device"] for r in rs}))
        each = " ".join(f"{x:.2f}" for x in accs)
        seconds = " ".join(f"{r['train_seconds']:.1f}" for r in rs)
        print(f"| {name} | {len(rs)} ({devices}) | {each} | {statistics.mean(accs):.2f} | {seconds} |")
    with open(os.path.join(HERE, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
