"""Stage three: does tuning the top block learn on real labels, and what an epoch costs from tokens vs images.

    python bench/finetune.py                       # both parts, on ../shared/data/fer2013.zip
    python bench/finetune.py --data PATH --faces 512

1. The gap, on real FER2013 labels: a random-weight tiny CLIP (64-d, 2 blocks, 8x8 patches on the
   48x48 faces, position embeddings at the patch embeddings' scale) has its top block tuned from
   cached tokens, its head starting from a logistic-regression probe of the pooled feature (epoch 0);
   the baseline is the linear probe (`fit_linear`, its best epoch, judged on the held-out faces:
   generous) of the same encoder's pooled feature. Both fit on the first `--gap-train` training
   faces and are scored on the training faces after them (held out), and on the test split.
2. Time per epoch with the ViT-B/32 architecture (`CLIPVisionConfig()` defaults, random weights),
   top 2 blocks, on a subset of `--faces` training faces (10% of them for validation) and 64 test
   faces: from the token cache vs from the images through the 10 frozen blocks (augmented), one
   epoch each, plus the one-off cost of computing the tokens. On 2 CPU cores a full-size epoch
   takes tens of minutes, so the subset is small; the figures scale linearly with the faces.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import random_clip  # noqa: E402  (the encoder the real-label test uses, at full size)

from fercache.data import load_images  # noqa: E402
from fercache.encoder import load_encoder  # noqa: E402
from fercache.finetune import Settings, Split, tokens_of, tune  # noqa: E402
from fercache.heads import fit_linear  # noqa: E402
from fercache.report import format_table  # noqa: E402

ZIP = Path(__file__).resolve().parents[2] / "shared" / "data" / "fer2013.zip"


def cpu_name() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    name = next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "?")
    return f"{name}, {torch.get_num_threads()} torch threads"


def split(x: np.ndarray, faces, rows: slice | np.ndarray) -> Split:
    ids = [faces.ids[i] for i in np.arange(len(faces.ids))[rows]]
    usage = [faces.usage[i] for i in np.arange(len(faces.ids))[rows]]
    return Split(x[rows], faces.labels[rows], ids, usage)


def gap(data: Path, n_fit: int, epochs: int, tmp: Path) -> list[list]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 64-d model: one thread is faster than two
    try:
        encoder = load_encoder(str(random_clip(tmp / "tiny")), "clip", "cpu", "float32")
        train, test = load_images(data, "train"), load_images(data, "test")
        n_fit = min(n_fit, len(train.ids) - 1000)
        pooled = {name: np.concatenate([encoder.encode(f.pixels[i:i + 1000])["embeddings"]
                                        for i in range(0, len(f.ids), 1000)]) for name, f in (("train", train),
                                                                                              ("test", test))}
        held = slice(n_fit, None)
        start = time.perf_counter()
        _, hist = fit_linear(pooled["train"][:n_fit], train.labels[:n_fit], pooled["train"][held],
                             train.labels[held], epochs=50)
        best = max(range(50), key=lambda e: hist[e]["test_acc"])
        head, _ = fit_linear(pooled["train"][:n_fit], train.labels[:n_fit], epochs=best + 1)
        t_probe = time.perf_counter() - start
        probe = [head.score(pooled["train"][held], train.labels[held])[1], head.score(pooled["test"], test.labels)[1]]
        tok_train = tokens_of(encoder, train.pixels, 1).astype(np.float16)
        tok_test = tokens_of(encoder, test.pixels, 1).astype(np.float16)
        start = time.perf_counter()
        result = tune(encoder, split(tok_train, train, slice(0, n_fit)), split(tok_train, train, held),
                      Settings(blocks=1, epochs=epochs, lr=2e-3, batch_size=32, layer_decay=1.0), tmp / "gap",
                      device="cpu", progress=False)
        t_tune = time.perf_counter() - start
        tuned_held = float((result.test_logits.argmax(1) == train.labels[held]).mean())
        with torch.no_grad():
            z = result.model(torch.from_numpy(tok_test).float())
        tuned_test = float((z.argmax(1).numpy() == test.labels).mean())
    finally:
        torch.set_num_threads(threads)
    n_held = len(train.ids) - n_fit
    return [[f"linear probe, pooled feature (epoch {best + 1} of 50)", probe[0], probe[1], t_probe],
            ["the tuned run's start: logreg probe (epoch 0)", result.history[0]["test_acc"], None, None],
            [f"top block tuned from tokens (epoch {result.best_epoch} of {epochs})", tuned_held, tuned_test, t_tune],
            ["gap (tuned - probe)", tuned_held - probe[0], tuned_test - probe[1], None],
            [f"faces: fit {n_fit:,} (10% of it validation), held-out train {n_held:,}, test {len(test.ids):,}",
             None, None, None]]


def epoch_times(data: Path, n_faces: int, tmp: Path) -> list[list]:
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    folder = tmp / "vitb32"
    CLIPVisionModel(CLIPVisionConfig()).save_pretrained(folder)
    CLIPImageProcessor().save_pretrained(folder)
    encoder = load_encoder(str(folder), "clip", "cpu", "float32")
    train, test = load_images(data, "train", limit=n_faces), load_images(data, "test", limit=64)
    start = time.perf_counter()
    tokens = [tokens_of(encoder, f.pixels, 10).astype(np.float16) for f in (train, test)]
    t_tokens = time.perf_counter() - start
    rows = [["tokens entering block 11, once", "", t_tokens, n_faces + 64]]
    for name, x, images in (("from the token cache", tokens, False), ("from images (10 frozen blocks, augmented)",
                                                                      [train.pixels, test.pixels], True)):
        result = tune(encoder, split(x[0], train, slice(None)), split(x[1], test, slice(None)),
                      Settings(blocks=2, epochs=1, batch_size=32, from_images=images), tmp / name[:10],
                      device="cpu", progress=False)
        rows.append([f"1 epoch {name}", "", result.epoch_seconds[0], n_faces + 64])
    for row in rows:
        row[1] = f"{row[2] / row[3] * 1000:.1f} s per 1,000 faces"
    rows.append(["speed-up per epoch", f"{rows[2][2] / rows[1][2]:.1f}x", None, None])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ZIP, help="FER2013 zip, folder or CSV")
    parser.add_argument("--gap-train", type=int, default=24000, help="training faces the gap fits on")
    parser.add_argument("--gap-epochs", type=int, default=6)
    parser.add_argument("--faces", type=int, default=256, help="training faces the ViT-B/32 epoch is timed on")
    parser.add_argument("--skip-gap", action="store_true")
    parser.add_argument("--skip-times", action="store_true")
    args = parser.parse_args()
    print(f"CPU: {cpu_name()}")
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_gap:
            print("\n1. Tuning the top block vs the linear probe, real FER2013 labels, random-weight tiny CLIP")
            print(format_table(["model", "held-out train acc", "test acc", "seconds"],
                               gap(args.data, args.gap_train, args.gap_epochs, Path(tmp))))
        if not args.skip_times:
            print(f"\n2. Time per epoch, ViT-B/32 architecture (random weights), top 2 blocks, {args.faces} train "
                  "+ 64 test faces (the epoch includes scoring validation and test)")
            print(format_table(["step", "rate", "seconds", "faces"], epoch_times(args.data, args.faces, Path(tmp))))


if __name__ == "__main__":
    main()
