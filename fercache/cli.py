"""The `fercache` command: a thin Typer layer over the library.

Each command parses its options, calls one library function and prints the result. Every
`UserError` ends as one line on stderr and exit code 2; the library never calls `sys.exit`.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer

from fercache.errors import FERCacheWarning, UserError
from fercache.names import (CLASS_WEIGHTS, DEFAULT_MODEL, METHODS, PREPROCESS, SPLIT_CHOICES, TTA, VALS, VIEWS,
                            default_cache)

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="Facial expression recognition on cached frozen encoder features (FER2013, FER+, CK+, "
                       "JAFFE, RAF-DB, AffectNet, any labelled folder): stage one `extract`s once, stage two `fit`s "
                       "in seconds.")

# Options several commands share, defined once.
DataOpt = typer.Option(None, "--data", help="FER2013 zip, folder or CSV [default: ./data or $FERCACHE_DATA]")
JsonOpt = typer.Option(False, "--json", help="Print JSON instead of a table.")
DatasetOpt = typer.Option(None, "--dataset", help="Which dataset or layout the data is (fercache.datasets), "
                          "where it cannot be told from the files: ferplus (FER+ votes on a FER2013 source), "
                          "folders, rafdb, affectnet, ... [default: detected]")
ClassesOpt = typer.Option(None, "--classes", help="A generic [<split>/]<class>/<image> folder's classes, "
                          "in label order: a,b,c.")
VotesOpt = typer.Option(None, "--votes", help="FER+'s fer2013new.csv, for --dataset ferplus on a FER2013 source "
                        "[default: beside it]")
ImagesOpt = typer.Option("gray48", "--images", help="gray48: every face 48x48 gray, as FER2013's (the pixels "
                         "baseline's only form); native: each image's own colour and size, the model's own processor "
                         "rule applied.")
LabelsOpt = typer.Option(None, "--labels", help="FER+ caches: ferplus-majority (FER+'s majority vote, the default) or "
                         "ferplus-votes (the vote shares as soft targets); accuracy is always against the majority.")
FoldsOpt = typer.Option(None, "--folds", help="Datasets without a split (CK+, JAFFE): K subject-independent folds, "
                        "or 'subjects' (leave one subject out); reports the mean and spread over folds and the pooled "
                        "predictions.")
ModelOpt = typer.Option(DEFAULT_MODEL, help="Hub id or local folder of a Hugging Face vision model (CLIP, SigLIP, "
                        "DINOv2, ViT, ConvNeXt, ResNet, EfficientNet, ...), an OpenCLIP checkpoint (hf-hub:org/name), "
                        "a timm one (timm/name), or `pixels` for the raw-pixel baseline.")
RevisionOpt = typer.Option(None, help="Hub branch, tag or commit [default: main]; the commit it resolves to is "
                           "recorded, and heads and caches reload exactly that commit.")
PreprocessOpt = typer.Option(PREPROCESS[0], help="clip: the model's own image processor; seed: the reference "
                             "project's recipe (bilinear, mean/std 0.5).")
DeviceOpt = typer.Option("auto", help="auto, cpu, cuda or mps.")
ExcludeDuplicatesOpt = typer.Option(False, "--exclude-duplicates", help="Leave out the faces with a copy across "
                                    "train and test (exact or near, as `audit` finds them): train faces in fit, "
                                    "finetune and probe; the scored split's in evaluate.")
DtypeOpt = typer.Option("auto", help="auto (bfloat16 where native, else float32), float32, bfloat16, float16; "
                        "int8 (CPU: Linear layers quantised, fidelity measured and stored; a cache of its own).")
RuntimeOpt = typer.Option(None, help="What runs the encoder: auto (ONNX Runtime for float32 and int8 on the CPU "
                          "where the `cpu` extra is installed: 1.6-2x torch on the CPUs measured; else torch), "
                          "torch or onnxruntime [default: $FERCACHE_RUNTIME or auto].")
EncodeBatchOpt = typer.Option(64, "--batch-size", help="Images per forward pass of the encoder.")
ExtractBatchOpt = typer.Option(None, "--batch-size", help="Images per forward pass of the encoder "
                               "[default: 64; 256 on CUDA].")
LockingOpt = typer.Option(True, "--file-locking/--no-file-locking",
                          help="HDF5 file locks; turn them off on NFS or Lustre mounted without locks (then run "
                               "one job per cache at a time), as HDF5_USE_FILE_LOCKING=FALSE does.")
LimitOpt = typer.Option(None, help="Only the first N images of each split, for quick trials.")
SplitOpt = typer.Option("test", help=f"{', '.join(SPLIT_CHOICES[:-1])} or all.")
CacheOpt = typer.Option(None, help="Cache file [default: data/cache/<model>__<preprocess>.h5].")
DefaultCacheOpt = typer.Option(None, "--cache", help=f"Cache to read [default: the default model's, {default_cache()}].")
ViewsOpt = typer.Option(VIEWS[0], "--views", help="plain, flip or mean (plain and mirrored averaged; needs --tta flip).")


def _emit(obj: dict) -> None:
    typer.echo(json.dumps(obj, indent=2))

MethodOpt = typer.Option(METHODS[0], help="linear: nn.Linear + Adam (the reference recipe); logreg: L2 logistic "
                         "regression (L-BFGS to convergence), C chosen by the one-SE rule on validation.")
ValOpt = typer.Option(VALS[0], "--val", help="What chooses (logreg's C, probe's layer): train, a stratified 20% of "
                      "train; public_test: PublicTest, and test is PrivateTest (the challenge's protocol). Never test.")
ClassWeightOpt = typer.Option(CLASS_WEIGHTS[0], "--class-weight", help="none, or balanced: weigh each class's "
                              "loss by n / (classes present x its rows), so rare classes (disgust) count as much as common ones; logreg "
                              "then chooses C on balanced accuracy.")
EpochsOpt = typer.Option(20, help="Epochs of the linear head.")


@contextmanager
def _resumable() -> Iterator[None]:
    """Ctrl-C during extraction: finished batches are on disk, so say how to go on (exit 130)."""
    try:
        yield
    except KeyboardInterrupt:
        typer.echo("\nfercache: interrupted; the batches done are kept: the same command again goes on from them",
                   err=True)
        raise typer.Exit(130) from None


@contextmanager
def _stage_one(device: str, file_locking: bool) -> Iterator[tuple[str, int]]:
    """Where stage one runs: one process, or a rank under torchrun; yields (device, rank).

    A failure on any rank is raised on every rank: rank 0 says it once, and the others wait till
    it has before all exit 2. Ctrl-C says how to go on (`_resumable`).
    """
    from fercache.cache import file_locking as use_locks
    from fercache.distributed import RankFailed, barrier, torchrun_group

    use_locks(file_locking)
    with torchrun_group(device) as (device, rank), _resumable():
        try:
            yield device, rank
        except RankFailed as exc:
            if rank == 0:
                typer.echo(f"fercache: error: {exc}", err=True)
            if not exc.crashed:  # (a crashed rank is gone already, its traceback said it)
                barrier()  # torchrun stops all ranks when the first one exits
            raise typer.Exit(2) from None


def _echo_fit(result) -> None:
    """The epoch table (or logreg's C search), the test figures and where the files are."""
    from fercache.report import format_table, unseen_line, with_interval

    m = result.metrics
    if m.get("folds"):  # cross-validation: one row per fold
        keys = ["fold", "train_count", "test_count", "test_subjects", "accuracy", "macro_f1", "balanced_accuracy"]
        typer.echo(format_table(keys, [[r[k] for k in keys] for r in m["folds"]["per_fold"]]))
    elif m["method"] != "logreg":  # linear, and finetune's, whose rows add validation
        keys = [k for k in ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc")
                if k in m["history"][0]]
        typer.echo(format_table(keys, [[r[k] for k in keys] for r in m["history"]]))
    else:
        search = m["logreg"]
        keys = [k for k in ("C", "val_loss", "val_loss_se", "val_acc", "val_se", "val_bacc", "val_bacc_se", "n_iter",
                            "converged")
                if k in search["validation"][0]]
        typer.echo(format_table(keys, [[f"{r['C']:g}", *(r[k] for k in keys[1:])] for r in search["validation"]]))
        where = "PublicTest" if search["val"] == "given" else f"a {search['val_fraction']:.0%} validation part of train"
        typer.echo(f"chosen C = {search['C']:g} on {where} ({search['val_count']:,} faces): the strongest "
                   f"regularisation within one SE of the best "
                   f"{'balanced accuracy' if search['criterion'] == 'val_bacc' else 'accuracy'} "
                   f"(C = {search['best_val_C']:g}) and of the lowest loss (C = {search['lowest_val_loss_C']:g})")

    def figure(key: str, name: str) -> str:
        return f"{name} {with_interval(m, key)}"

    halves = [figure(f"{half}_test_accuracy", half) for half in ("public", "private")
              if m.get(f"{half}_test_accuracy") is not None and m.get("test_split", "test") == "test"]
    # (a --limit may hold one half only; with --val public_test, test is PrivateTest alone)
    typer.echo(figure("test_accuracy", "pooled accuracy" if m.get("folds") else f"{m.get('test_split', 'test')} accuracy")
               + (f" ({', '.join(halves)})" if halves else "") + ", " + figure("macro_f1", "macro-F1")
               + (", " + figure("balanced_accuracy", "balanced accuracy") if "balanced_accuracy" in m else "")
               + f" on {m['test_count']:,} faces (95% bootstrap intervals); fitted in {m['fit_seconds']:.2f} s")
    if "test_unseen_count" in m:
        typer.echo(unseen_line(m))
    if m.get("folds"):
        f = m["folds"]
        typer.echo(f"{f['count']} subject-independent folds ({f['subjects']} subjects, --folds {f['folds']}): accuracy "
                   f"{f['accuracy_mean']:.4f} ± {f['accuracy_std']:.4f}, macro-F1 {f['macro_f1_mean']:.4f} ± "
                   f"{f['macro_f1_std']:.4f} (mean ± sd over folds); pooled: every face predicted once, by the fold "
                   "that held it out; " + ("each fold's tuned model is in its fold-<k>/" if "blocks" in m
                                           else "the saved head is fitted on all faces"))
    if m.get("few_shot"):
        fs = m["few_shot"]
        typer.echo(f"{fs['shots']} faces per class, {fs['repeats']} draws: accuracy {fs['accuracy_mean']:.4f} ± "
                   f"{fs['accuracy_std']:.4f}, macro-F1 {fs['macro_f1_mean']:.4f} ± {fs['macro_f1_std']:.4f} "
                   "(mean ± sd; the head and figures above are the first draw's)")
    weights = "tuned.safetensors, tuned.json" if "blocks" in m else "head.safetensors, head.json"
    weights = f"fold-*/ ({weights}, fold.json)" if "blocks" in m and m.get("folds") else weights
    typer.echo(f"wrote {result.out}/: metrics.json, report.html, predictions.csv, history.csv, *.png, {weights}")


@app.command()
def run(
    data: Optional[Path] = DataOpt,
    model: str = ModelOpt,
    preprocess: str = PreprocessOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    batch_size: Optional[int] = ExtractBatchOpt,
    method: str = MethodOpt,
    epochs: int = EpochsOpt,
    limit: Optional[int] = LimitOpt,
    cache: Optional[Path] = CacheOpt,
    out: Optional[Path] = typer.Option(None, help="Run folder [default: runs/<cache-stem>-<method>]."),
    revision: Optional[str] = RevisionOpt,
    file_locking: bool = LockingOpt,
    dataset: Optional[str] = DatasetOpt,
    classes: Optional[str] = ClassesOpt,
    votes: Optional[Path] = VotesOpt,
    images: str = ImagesOpt,
    folds: Optional[str] = typer.Option(None, "--folds", help="Datasets without a split: K subject-independent "
                                        "folds or 'subjects' [default: 10 there; none where there is a split]."),
    labels: Optional[str] = LabelsOpt,
    runtime: Optional[str] = RuntimeOpt,
) -> None:
    """The whole job: extract train and test (reusing the cache), fit the head, report on test.

    A dataset without a split (CK+, JAFFE) is cross-validated over subject-independent folds.
    Under `torchrun ... -m fercache run ...` the ranks extract as `extract` does; rank 0 alone fits.
    """
    from fercache.pipeline import run as run_all

    with _stage_one(device, file_locking) as (device, rank):
        summaries, result = run_all(data, model, preprocess, device, dtype, batch_size, method, epochs, limit,
                                    cache, out, revision=revision, dataset=dataset, classes=classes, votes=votes,
                                    images=images, folds=folds, labels=labels, runtime=runtime)
    if rank == 0:
        for summary in summaries:
            typer.echo(str(summary))
        _echo_fit(result)


@app.command()
def info(path: Path = typer.Argument(..., help="A dataset (zip, folder, CSV) or a cache (.h5)."),
         as_json: bool = JsonOpt, dataset: Optional[str] = DatasetOpt, classes: Optional[str] = ClassesOpt,
         votes: Optional[Path] = VotesOpt) -> None:
    """Show a dataset's layout and per-split, per-class (and subject) counts, or what a cache holds."""
    from fercache.cache import describe_cache
    from fercache.datasets import DATASETS, open_dataset
    from fercache.report import format_table

    is_cache = path.suffix in (".h5", ".hdf5")
    desc = describe_cache(path) if is_cache else open_dataset(path, dataset, classes, votes).describe()
    if as_json:
        return _emit(desc)
    if is_cache:
        ran = f" on {desc['runtime']}" if desc.get("runtime") else ""
        typer.echo(f"{path}: cache of {desc['model']} ({desc['preprocess']} preprocessing, {desc['dtype']}{ran}, "
                   f"{desc['feature']}) on {desc.get('dataset', 'fer2013')} ({desc.get('images') or '48x48 gray'} "
                   f"images); made by fercache {desc['fercache_version']} from {desc['source']['path']}")
        if "int8_fidelity" in desc:
            from fercache.accelerate import INT8_MIN_COSINE

            typer.echo(f"int8 fidelity: cosine {desc['int8_fidelity']:.4f} to float32 on the first batch (heads fitted "
                       f"on float features need {INT8_MIN_COSINE})")
        tokens = desc.get("tokens")
        typer.echo(f"layers: {desc.get('layers') or 'none'}; views: {', '.join(desc.get('views', ['plain']))}; "
                   f"tokens: {'none' if tokens is None else f'entering block {tokens + 1} (--tokens {tokens})'}")
    else:
        title = DATASETS[desc["dataset"]].title if desc["dataset"] in DATASETS else desc["dataset"]
        typer.echo(f"{path}: {title} as {desc['format']}")
    names = desc["classes"]
    subjects = any("subjects" in s for s in desc["splits"].values())
    rows = [[name, s["count"], *s["per_class"].values()] + ([s["dim"], "yes" if s["complete"] else "NO"] if is_cache else [])
            + ([s.get("subjects", "")] if subjects else []) for name, s in desc["splits"].items()]
    typer.echo(format_table(["split", "count", *names] + (["dim", "complete"] if is_cache else [])
                            + (["subjects"] if subjects else []), rows))
    for reason, n in desc.get("dropped", {}).items():
        typer.echo(f"left out: {n} ({reason})")


@app.command()
def extract(
    data: Optional[Path] = DataOpt,
    split: str = typer.Option("train", help="train, test, public_test, private_test or all (train and test)."),
    model: str = ModelOpt,
    preprocess: str = PreprocessOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    batch_size: Optional[int] = ExtractBatchOpt,
    limit: Optional[int] = LimitOpt,
    cache: Optional[Path] = CacheOpt,
    force: bool = typer.Option(False, "--force", help="Redo complete splits; replace a cache made otherwise."),
    layers: Optional[str] = typer.Option(None, help="Also store the feature after these blocks (stages for conv nets): "
                                  "1,6,12 or all."),
    tta: str = typer.Option(TTA[0], help="none, or flip: also embed the mirrored faces."),
    strict: bool = typer.Option(False, "--strict", help="An unreadable image is an error, not a warning."),
    revision: Optional[str] = RevisionOpt,
    file_locking: bool = LockingOpt,
    tokens: Optional[int] = typer.Option(None, help="Also store the token sequence entering block K+1 (float16), "
                                         "for `finetune --blocks <depth - K>`; ViT-B/32: 2.8 GB for all of FER2013."),
    dataset: Optional[str] = DatasetOpt,
    classes: Optional[str] = ClassesOpt,
    votes: Optional[Path] = VotesOpt,
    images: str = ImagesOpt,
    runtime: Optional[str] = RuntimeOpt,
) -> None:
    """Stage one: encode a dataset (FER2013 by default) with a frozen vision model, once, into an HDF5 cache.

    Under `torchrun --nproc-per-node N -m fercache extract ...` each rank encodes a shard.
    """
    from fercache.extract import extract as run_extract

    with _stage_one(device, file_locking) as (device, rank):
        summaries = run_extract(data, split, model, preprocess, device, dtype, batch_size, limit, cache,
                                force, layers, tta, strict, revision=revision, tokens=tokens, dataset=dataset,
                                classes=classes, votes=votes, images=images, runtime=runtime)
    if rank == 0:
        for summary in summaries:
            typer.echo(str(summary))


@app.command()
def fit(
    cache: Optional[Path] = DefaultCacheOpt,
    method: str = MethodOpt,
    epochs: int = EpochsOpt,
    lr: float = typer.Option(1e-3, help="Adam's learning rate (linear)."),
    batch_size: int = typer.Option(256, help="Minibatch size (linear)."),
    weight_decay: float = typer.Option(0.0, help="Adam's weight decay (linear)."),
    seed: int = typer.Option(0, help="Seeds initialisation, shuffling and logreg's validation split."),
    standardize: bool = typer.Option(True, "--standardize/--no-standardize",
                                     help="Scale features to zero mean, unit variance on train (kept in the head)."),
    layer: Optional[int] = typer.Option(None, help="Train on the feature after block K (needs extract --layers)."),
    views: str = ViewsOpt,
    out: Optional[Path] = typer.Option(None, help="Run folder [default: runs/<cache-stem>-<method>]."),
    val: str = ValOpt,
    class_weight: str = ClassWeightOpt,
    shots: Optional[int] = typer.Option(None, help="Few-shot: fit on K training faces per class only."),
    repeats: int = typer.Option(1, help="With --shots: this many draws of K faces; mean and sd are reported."),
    exclude_duplicates: bool = ExcludeDuplicatesOpt,
    folds: Optional[str] = FoldsOpt,
    labels: Optional[str] = LabelsOpt,
) -> None:
    """Stage two: fit a linear head on the cached train features, report on test, save the head."""
    from fercache.fit import fit as run_fit

    _echo_fit(run_fit(cache, method, epochs, lr, batch_size, weight_decay, seed, standardize, layer, views, out,
                      val=val, class_weight=class_weight, shots=shots, repeats=repeats,
                      exclude_duplicates=exclude_duplicates, folds=folds, labels=labels))


@app.command()
def finetune(
    cache: Optional[Path] = typer.Option(None, help="Cache with tokens (extract --tokens K) of train and test "
                                         "[default: the default model's cache]."),
    blocks: Optional[str] = typer.Option(None, help="Top blocks to tune, or all [default: from a cache, every "
                                         "block above its tokens; from images, 2]."),
    from_images: bool = typer.Option(False, "--from-images", help="Feed the faces through the frozen lower blocks "
                                     "every epoch, augmented on the device (for GPUs), instead of cached tokens."),
    data: Optional[Path] = DataOpt,
    model: Optional[str] = typer.Option(None, help=f"With --from-images: the model [default: {DEFAULT_MODEL}]."),
    preprocess: str = PreprocessOpt,
    revision: Optional[str] = RevisionOpt,
    limit: Optional[int] = LimitOpt,
    epochs: int = typer.Option(10, help="Most epochs (early stopping may end sooner)."),
    lr: float = typer.Option(1e-4, help="AdamW's peak learning rate (head and final norm; blocks below get less)."),
    batch_size: int = typer.Option(64, help="Faces per step."),
    weight_decay: float = typer.Option(0.05, help="AdamW's decoupled weight decay (matrices only)."),
    label_smoothing: float = typer.Option(0.0, help="Label smoothing of the training loss."),
    layer_decay: float = typer.Option(0.75, help="Layer-wise lr decay: block j below the top learns at lr x decay^j."),
    warmup: float = typer.Option(0.1, help="Share of the steps with linear warm-up (then cosine decay)."),
    patience: int = typer.Option(3, help="Stop after this many epochs without a better validation score."),
    val: str = typer.Option("train", help="train: choose on a stratified 10% of train; public_test: choose on "
                            "PublicTest, report on PrivateTest (the challenge's protocol). Never on test."),
    seed: int = typer.Option(0, help="Seeds the head, the validation part, shuffling and augmentation."),
    device: str = DeviceOpt,
    dtype: str = typer.Option("auto", help="auto (bfloat16 autocast where native, else float32), float32, bfloat16."),
    augment: bool = typer.Option(True, "--augment/--no-augment", help="With --from-images: random resized crop, "
                                 "flip and small rotation."),
    out: Optional[Path] = typer.Option(None, help="Run folder [default: runs/<cache-stem>-finetune-top<N>]."),
    restart: bool = typer.Option(False, "--restart", help="Discard the run folder's checkpoint (with --folds, every "
                                 "finished fold too) instead of resuming."),
    labels: Optional[str] = LabelsOpt,
    exclude_duplicates: bool = ExcludeDuplicatesOpt,
    folds: Optional[str] = FoldsOpt,
) -> None:
    """Stage three: tune the top blocks, the final norm and a linear head; report like fit, save the weights.

    An interrupted run resumes from its last epoch's checkpoint (and, over folds, its finished folds)
    when the same command is run again.
    """
    from fercache.finetune import finetune as run_finetune

    try:
        result = run_finetune(cache, blocks, from_images=from_images, data=data, model=model, preprocess=preprocess,
                              revision=revision, limit=limit, epochs=epochs, lr=lr, batch_size=batch_size,
                              weight_decay=weight_decay, label_smoothing=label_smoothing, layer_decay=layer_decay,
                              warmup=warmup, patience=patience, val=val, seed=seed, device=device, dtype=dtype,
                              augment=augment, out=out, restart=restart, exclude_duplicates=exclude_duplicates,
                              labels=labels, folds=folds)
    except KeyboardInterrupt:
        typer.echo("\nfercache: interrupted; finished epochs (and folds) are kept: the same command again goes on "
                   "from the last", err=True)
        raise typer.Exit(130) from None
    _echo_fit(result)
    m = result.metrics
    if m.get("folds"):
        rows = m["folds"]["per_fold"]
        typer.echo(f"each fold chose its epoch on a stratified 10% of its training part: "
                   f"{', '.join(str(r['best_epoch']) for r in rows)} (0: the start, the linear probe); "
                   f"{sum(r['read_back'] for r in rows)} of {len(rows)} folds read back from an earlier run")
        return
    typer.echo(f"chosen at epoch {m['best_epoch']}{' (the start: the linear probe)' if m['best_epoch'] == 0 else ''} "
               f"on {'a part of train' if m['val'] == 'train' else 'PublicTest'} "
               f"({m['val_count']:,} faces); test is {m['test_split']}")


@app.command()
def evaluate(
    head: Path = typer.Option(..., help="A run folder of `fercache fit` (a head) or `fercache finetune` (tuned blocks)."),
    cache: Optional[Path] = DefaultCacheOpt,
    split: Optional[str] = typer.Option(None, help=f"{', '.join(SPLIT_CHOICES[:-1])} or all [default: test; all "
                                        "on a dataset without a split, as CK+ and JAFFE]."),
    out: Optional[Path] = typer.Option(None, help="Folder for evaluate-<split>.json and its plot [default: the head's]."),
    exclude_duplicates: bool = ExcludeDuplicatesOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Score a saved head on a split of a cache made with the same model and preprocessing; on another
    dataset's cache, on the classes the two share (matched by expression), naming those left out."""
    from fercache.fit import evaluate as run_evaluate
    from fercache.report import format_table, unseen_line, with_interval

    report = run_evaluate(cache, head, split, out, exclude_duplicates=exclude_duplicates)
    split = report["split"]
    if as_json:
        return _emit(report)
    def figure(key: str) -> str:
        return with_interval(report, key)

    parts = "".join(f", {k.removesuffix('_accuracy')} {figure(k)}" for k in report
                    if k.endswith("_test_accuracy"))
    typer.echo(f"{split} ({report['count']:,} faces, 95% bootstrap intervals): accuracy {figure('accuracy')}{parts}, "
               f"macro-F1 {figure('macro_f1')}, balanced accuracy {figure('balanced_accuracy')}"
               + (f", ECE {report['calibration']['ece']:.4f}" if "calibration" in report else ""))
    if "left_out" in report:  # a head of another dataset: its classes matched by expression
        left = ", ".join(f"{c} ({n:,} faces)" for c, n in report["left_out"].items()) or "none"
        typer.echo(f"a {report['head_dataset']} head on {report['dataset']}: scored on the {len(report['per_class'])} "
                   f"shared classes; left out: {left}"
                   + (f"; never predicted: {', '.join(report['head_classes_unused'])}"
                      if report["head_classes_unused"] else ""))
    elif split != "train":
        typer.echo(unseen_line(report))
    keys = ["precision", "recall", "f1", "support"]
    typer.echo(format_table(["class", *keys], [[c, *(r[k] for k in keys)] for c, r in report["per_class"].items()]))


HeadOpt = typer.Option(..., help="A run folder of `fercache fit` (a head) or `fercache finetune` (tuned blocks).")


@app.command()
def predict(
    images: Optional[list[Path]] = typer.Argument(None, help="Image files of any size, gray or colour."),
    head: Path = HeadOpt,
    device: str = DeviceOpt,
    detect_face: bool = typer.Option(False, "--detect-face", help="Crop the largest face (OpenCV Haar cascade) first."),
    as_json: bool = JsonOpt,
    video: Optional[Path] = typer.Option(None, help="A video instead of images: every face of every sampled frame, "
                                         "to emotions.csv and timeline.png (one panel per face track) in --out."),
    fps: Optional[float] = typer.Option(None, help="With --video: frames a second to sample [default: every frame]."),
    annotate: Optional[Path] = typer.Option(None, help="With --video: also write the video with labelled boxes (.mp4)."),
    out: Optional[Path] = typer.Option(None, help="With --video: output folder [default: runs/video-<video stem>]."),
) -> None:
    """Label new images (made 48x48 gray like FER2013, encoded like stage one, scored by the head), or the faces of a video."""
    from fercache.predict import predict as run_predict
    from fercache.report import format_table

    if (video is None) == (not images):
        raise UserError("predict takes image files or --video FILE (one of the two)")
    video_only = [f"--{k}" for k, v in (("fps", fps), ("annotate", annotate), ("out", out)) if v is not None]
    if video is None and video_only:
        raise UserError(f"{' and '.join(video_only)}: for --video; images are labelled on the screen (or --json)")
    if video is not None and detect_face:
        raise UserError("--detect-face: for images; --video finds every face of every frame itself")
    if video is not None:
        from fercache.video import predict_video

        done = predict_video(head, video, out or Path("runs") / f"video-{video.stem}", fps, device, annotate)
        if as_json:
            return typer.echo(json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in done.items()}))
        return typer.echo(f"{done['frames']} sampled frames, {done['faces']} faces in {done['tracks']} track(s): "
                          f"wrote {done['csv']}, {done['timeline']}" + (f", {done['annotated']}" if annotate else ""))
    results = run_predict(head, images, device, detect_face)
    if as_json:
        return typer.echo(json.dumps(results, indent=2))
    classes = list(results[0]["probs"])
    typer.echo(format_table(["image", "label", *classes], [[r["image"], r["label"], *r["probs"].values()]
                                                          for r in results]))


@app.command()
def serve(
    head: Path = HeadOpt,
    port: int = typer.Option(7860, help="Port to serve on."),
    device: str = DeviceOpt,
    host: str = typer.Option("127.0.0.1", help="Address to bind; 0.0.0.0 shows the page to your whole network."),
) -> None:
    """A local web page: webcam stream and image upload, every face boxed and labelled by the head (needs the `serve` extra)."""
    from fercache.serve import serve as run_serve

    run_serve(head, port, device, host)


@app.command()
def probe(
    cache: Path = typer.Option(..., help="A cache extracted with --layers (train and test)."),
    out: Optional[Path] = typer.Option(None, help="Folder for probe.json and probe.png [default: runs/<cache-stem>-probe]."),
    method: str = MethodOpt,
    views: str = ViewsOpt,
    val: str = ValOpt,
    class_weight: str = ClassWeightOpt,
    seed: int = typer.Option(0, help="Seeds the heads and the validation part of train."),
    exclude_duplicates: bool = ExcludeDuplicatesOpt,
    as_json: bool = JsonOpt,
    folds: Optional[str] = FoldsOpt,
) -> None:
    """Fit a head per stored layer (and the pooled feature): which block knows most about expression."""
    from fercache.probe import probe as run_probe
    from fercache.probe import probe_table
    from fercache.report import format_table

    result = run_probe(cache, out, method, views, seed, val=val, class_weight=class_weight,
                       exclude_duplicates=exclude_duplicates, folds=folds)
    if as_json:
        return _emit(result)
    typer.echo(f"{result['model']}: {method} probe fitted on {result['train_count']:,} train faces, chosen on "
               f"{result['val_count']:,} {result['val_split']} faces, tested on {result['test_count']:,} "
               f"{result['test_split']} faces ({views} view)")
    if result.get("folds"):
        c = result["chosen"]
        typer.echo(f"{result['folds']['count']} subject-independent folds: the layer chosen on each fold's validation "
                   f"part ({', '.join(map(str, c['layers']))}), pooled test accuracy {c['accuracy']:.4f} "
                   f"[{c['accuracy_low']:.4f}, {c['accuracy_high']:.4f}]; per layer, pooled over folds:")
    typer.echo(format_table(*probe_table(result)))
    typer.echo(f"best on validation: layer {result['best_layer']}; wrote {result['files']['json']} and "
               f"{result['files']['plot']}")


@app.command()
def zeroshot(
    data: Optional[Path] = DataOpt,
    split: str = SplitOpt,
    limit: Optional[int] = LimitOpt,
    model: str = typer.Option(DEFAULT_MODEL, help="Hub id or local folder of a full CLIP model (vision and text towers), "
                              "or an OpenCLIP checkpoint (hf-hub:org/name)."),
    device: str = DeviceOpt,
    batch_size: int = EncodeBatchOpt,
    as_json: bool = JsonOpt,
    revision: Optional[str] = RevisionOpt,
    dataset: Optional[str] = DatasetOpt,
    classes: Optional[str] = ClassesOpt,
    votes: Optional[Path] = VotesOpt,
    images: str = ImagesOpt,
) -> None:
    """CLIP's zero-shot guess from text prompts alone (each class by its expression's word): the baseline a
    linear probe must beat."""
    from fercache.report import format_table
    from fercache.zeroshot import zeroshot as run_zeroshot

    summary = run_zeroshot(data, split, limit, model, device, batch_size, revision=revision, dataset=dataset,
                           classes=classes, votes=votes, images=images).summary()
    if as_json:
        return _emit(summary)
    typer.echo(f"{model} zero-shot on {summary['count']:,} {split} faces ({len(summary['templates'])} prompts "
               f"per class): accuracy {summary['accuracy']:.4f}")
    typer.echo(format_table(["class", "recall"], list(summary["per_class_recall"].items())))


@app.command()
def compare(runs: list[Path] = typer.Argument(..., help="Run folders (e.g. runs/*) holding metrics.json."),
            as_json: bool = JsonOpt) -> None:
    """One table across runs, ranked within each test set: test accuracy with its interval, macro-F1,
    McNemar p-value against the set's best (Holm over all pairs)."""
    from fercache.probe import compare as run_compare
    from fercache.probe import compare_table
    from fercache.report import format_table

    rows = run_compare(runs)
    if as_json:
        return _emit({"runs": rows})
    typer.echo(format_table(*compare_table(rows)))


@app.command()
def audit(
    data: Optional[Path] = DataOpt,
    cache: Optional[Path] = typer.Option(None, "--cache", help="A cache of this source (extract --split all): adds "
                                         "cosine near-duplicates and suspected label errors."),
    out: Path = typer.Option(Path("runs/audit"), help="Folder for audit.json and audit.html."),
    ferplus: Optional[Path] = typer.Option(None, "--ferplus", help="FER+ votes (fer2013new.csv): how many suspected "
                                           "label errors FER+ relabelled (FER2013 sources, CSV or Kaggle)."),
    dataset: Optional[str] = DatasetOpt,
    classes: Optional[str] = ClassesOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Is this copy sound? Train/test shift, exact and near duplicates (across splits too), label errors.

    With --cache and neither --dataset nor --classes, the source is read as the cache was made."""
    from fercache.audit import audit as run_audit
    from fercache.audit import summary_lines

    report = run_audit(data, cache, out, ferplus, dataset, classes)
    if as_json:
        return _emit(report)
    for line in summary_lines(report):
        typer.echo(line)


def _format_warning(message, category, filename, lineno, file=None, line=None) -> str:
    if issubclass(category, FERCacheWarning):
        return f"fercache: warning: {message}\n"
    return f"{filename}:{lineno}: {category.__name__}: {message}\n"


def main() -> None:
    """Console entry point: run the app, turning user errors into one line and exit code 2."""
    warnings.formatwarning = _format_warning
    # transformers' own notices (a torchvision fallback, unused text-tower weights) are noise here
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        app()
    except UserError as exc:
        typer.echo(f"fercache: error: {exc}", err=True)
        sys.exit(2)

