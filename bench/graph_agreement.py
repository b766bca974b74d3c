"""How much ``model.graph: optimized`` changes the numbers: plain against optimized on real test images.

For each demo config (``configs/demo/0*.yaml``: fashion_cnn, drn_tiny_seg, lenet5_mnist_adv, maskrcnn_small, their
shipped weights and TEST splits), the runtime is built twice, as the pipeline builds it, with ``model.graph: plain``
and ``optimized``, and both run on the same ``--limit`` images (default: each config's own limit):

- features: max |optimized - plain| of the adapter's features (the layer the equivariance defense works on), and
  that relative to max |plain features|;
- logits (classification, segmentation): max |difference| and the agreement of the predictions (top-1 labels,
  segmentation pixels);
- detections (Mask R-CNN): images with the same labels in the same order, and the max |difference| of their boxes
  (pixels) and scores.

    python -m bench.graph_agreement                 # ~1 minute on a 2-core CPU
    python -m bench.graph_agreement --limit 256 --json out.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
CONFIGS = sorted((REPO / "configs" / "demo").glob("0*.yaml"))


def _runtimes(config: Path, limit: int | None) -> dict[str, Any]:
    from tasks.config import load_config
    from tasks.runtime import build_runtime

    return {
        g: build_runtime(load_config(config, sets=[f"model.graph={g}"], limit=limit)) for g in ("plain", "optimized")
    }


def compare(config: Path, limit: int | None, batch: int) -> dict[str, Any]:
    rts = _runtimes(config, limit)
    plain, opt = rts["plain"], rts["optimized"]
    row: dict[str, Any] = {"config": config.name, "model": plain.cfg.model.label, "task": plain.task}
    feat_diff = feat_max = logit_diff = 0.0
    agree = total = same_dets = n_images = 0
    box_diff = score_diff = 0.0
    for start in range(0, len(plain.indices), batch):
        x, _, _ = plain.batch(plain.indices[start : start + batch])
        with torch.no_grad():
            fp, fo = plain.adapter.forward(x), opt.adapter.forward(x)
        feat_diff = max(feat_diff, float((fo.features - fp.features).abs().max()))
        feat_max = max(feat_max, float(fp.features.abs().max()))
        n_images += x.shape[0]
        if plain.task == "instance":
            for p, o in zip(plain.adapter.predict(x), opt.adapter.predict(x), strict=True):
                if p["labels"].tolist() == o["labels"].tolist():
                    same_dets += 1
                    if len(p["labels"]):
                        box_diff = max(box_diff, float((p["boxes"] - o["boxes"]).abs().max()))
                        score_diff = max(score_diff, float((p["scores"] - o["scores"]).abs().max()))
            continue
        logit_diff = max(logit_diff, float((fo.logits - fp.logits).abs().max()))
        pred_p, pred_o = fp.logits.argmax(1), fo.logits.argmax(1)
        agree += int((pred_p == pred_o).sum())
        total += pred_p.numel()
    row.update(images=n_images, features_max_abs_diff=feat_diff, features_rel_diff=feat_diff / max(feat_max, 1e-12))
    if plain.task == "instance":
        row.update(same_detections=same_dets, boxes_max_abs_diff=box_diff, scores_max_abs_diff=score_diff)
    else:
        row.update(logits_max_abs_diff=logit_diff, prediction_agreement=agree / total, predictions=total)
    return row


def report(rows: list[dict[str, Any]]) -> str:
    lines = []
    for r in rows:
        head = f"{r['model']:<17}{r['task']:<15}{r['images']:>4} images  features max|diff| "
        head += f"{r['features_max_abs_diff']:.2g} ({r['features_rel_diff']:.1e} of max)"
        if r["task"] == "instance":
            tail = (
                f"same detections {r['same_detections']}/{r['images']} images, boxes max|diff| "
                f"{r['boxes_max_abs_diff']:.2g} px, scores max|diff| {r['scores_max_abs_diff']:.2g}"
            )
        else:
            what = "pixels" if r["task"] == "segmentation" else "top-1 labels"
            tail = (
                f"logits max|diff| {r['logits_max_abs_diff']:.2g}, {what} agree "
                f"{100 * r['prediction_agreement']:.3f}% of {r['predictions']}"
            )
        lines.append(f"{head}; {tail}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--limit", type=int, default=None, help="images per config (default: the config's limit)")
    p.add_argument("--batch", type=int, default=16, help="images per forward")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--json", dest="json_out", default=None, help="write the figures to this file")
    args = p.parse_args(argv)
    if (args.limit is not None and args.limit < 1) or args.batch < 1 or args.threads < 1:
        p.error("--limit, --batch and --threads must be >= 1")
    torch.set_num_threads(args.threads)
    rows = [compare(c, args.limit, args.batch) for c in CONFIGS]
    print(report(rows))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
