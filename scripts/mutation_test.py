#!/usr/bin/env python3
"""Mutation testing of chosen lines: does the test suite notice when one line is wrong?

Each mutation below replaces one piece of text in one source file (it must occur exactly once) by
a plausible mistake: the EMA with ``decay`` for ``1 - decay``, the cosine schedule rising from 0,
a loader that never augments, SAM's perturbation with the wrong sign... For each, the script
copies ``src/``, ``tests/`` and ``pyproject.toml`` to a temporary directory (the working tree, or
``--rev REV`` from git), applies the mutation there, and runs the tests chosen for it with
``PYTHONPATH`` pointing at the copy's ``src`` (checked: ``samkit.__file__`` is the copy's; the
tests' subprocesses inherit the variable). The real files are never touched. A mutation is
*caught* when the tests fail, *survived* when they pass. The tests run unmutated first (the
baseline): a failure there voids the run.

    python scripts/mutation_test.py                   # all mutations, the working tree
    python scripts/mutation_test.py --rev HEAD        # the committed tree
    python scripts/mutation_test.py --only ema-decay-swapped cosine-rises-from-zero
    python scripts/mutation_test.py --list

Prints a table and writes docs/mutation_results.json (``--json``); exit status 1 if a mutation
survived or the baseline failed. docs/testing.md has the latest table. Standard library only.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COPIED = ("src", "tests", "pyproject.toml")


@dataclasses.dataclass(frozen=True)
class Mutation:
    name: str
    file: str  # relative to the repository root
    original: str  # must occur exactly once in the file
    mutated: str
    tests: tuple[str, ...]  # pytest arguments: files or node ids
    what: str  # the mistake, in words


T = "tests/train/"
D = "tests/data/"
AUG = (D + "test_augmentation_applied.py",)

MUTATIONS: tuple[Mutation, ...] = (
    # -- the two the issue found uncaught ---------------------------------------------------------
    Mutation(
        "ema-decay-swapped",
        "src/samkit/train/ema.py",
        "[current[k] for k in floats], 1.0 - self.decay",
        "[current[k] for k in floats], self.decay",
        (T + "test_ema.py", T + "test_loop_values.py"),
        "EMA update with decay in place of 1 - decay",
    ),
    Mutation(
        "cosine-rises-from-zero",
        "src/samkit/train/schedule.py",
        "(1.0 + math.cos(math.pi * t))",
        "(1.0 - math.cos(math.pi * t))",
        (T + "test_schedule.py", T + "test_loop_values.py"),
        "cosine schedule with 1 - cos (learning rate rising from 0)",
    ),
    # -- the four the issue found caught (optimizers, training step) ------------------------------
    Mutation(
        "sam-perturbation-sign",
        "src/samkit/optim/sam.py",
        "F.add_(shards[span], us, alpha=rho, foreach=fe)",
        "F.add_(shards[span], us, alpha=-rho, foreach=fe)",
        ("tests/optim/test_sam.py",),
        "SAM perturbs down the gradient (w - e)",
    ),
    Mutation(
        "sam-eps-dropped",
        "src/samkit/optim/sam.py",
        "coef, base = 1.0 / (grad_norm + self.eps), directions",
        "coef, base = 1.0 / grad_norm, directions",
        ("tests/optim/test_sam.py", T + "test_step.py"),
        "SAM ignores eps in rho g / (norm(g) + eps)",
    ),
    Mutation(
        "step-batchnorm-not-restored",
        "src/samkit/train/step.py",
        "            self._restore_bn_buffers()",
        "            pass",
        (T + "test_skipped_steps.py", T + "test_step.py"),
        "a skipped step keeps the BatchNorm statistics of its forward passes",
    ),
    Mutation(
        "esam-floor-not-ceil",
        "src/samkit/optim/esam.py",
        "math.ceil(round(self.gamma * batch_size, 6))",
        "math.floor(round(self.gamma * batch_size, 6))",
        ("tests/optim/test_esam.py",),
        "ESAM keeps floor(gamma B) samples instead of ceil(gamma B)",
    ),
    # -- the training loop ------------------------------------------------------------------------
    Mutation(
        "loop-schedule-not-applied",
        "src/samkit/train/loop.py",
        "    run.schedule.apply()\n",
        "    pass\n",
        (T + "test_loop_values.py",),
        "the loop never sets the scheduled learning rate (stays at the peak)",
    ),
    Mutation(
        "loop-evaluates-trained-not-ema",
        "src/samkit/train/loop.py",
        "model.load_state_dict(run.ema.state_dict())",
        "model.load_state_dict(run.model.state_dict())",
        (T + "test_loop_values.py",),
        "with --ema-decay the trained weights are evaluated instead of the EMA",
    ),
    Mutation(
        "loop-train-loss-batch-mean",
        "src/samkit/train/loop.py",
        'loss_sum = F.cross_entropy(out.outputs.float(), y, reduction="sum")',
        'loss_sum = F.cross_entropy(out.outputs.float(), y, reduction="mean")',
        (T + "test_loop_values.py",),
        "the epoch's train loss sums batch means and divides by images",
    ),
    Mutation(
        "loop-train-error-inverted",
        "src/samkit/train/loop.py",
        "wrong = (out.outputs.argmax(1) != y).sum()",
        "wrong = (out.outputs.argmax(1) == y).sum()",
        (T + "test_loop_values.py",),
        "the train error rate counts the right answers",
    ),
    Mutation(
        "loop-resume-restarts-epoch",
        "src/samkit/train/loop.py",
        "run.train_loader.set_epoch(state.epoch, start_batch=state.batch)",
        "run.train_loader.set_epoch(state.epoch)",
        (
            T
            + "test_resume.py::test_stochastic_model_resumes_mid_epoch_with_the_same_random_draws",
            T + "test_fp16_resume.py",
        ),
        "a run resumed mid-epoch reads the epoch's batches from the start again",
    ),
    Mutation(
        "loop-last-epoch-not-evaluated",
        "src/samkit/train/loop.py",
        "if epoch % run.cfg.evaluate_every == 0 or epoch == run.cfg.num_epochs:",
        "if epoch % run.cfg.evaluate_every == 0:",
        (T + "test_cli_train.py::test_many_flags_together",),
        "with --evaluate-every the last epoch is not evaluated",
    ),
    Mutation(
        "ema-integer-buffers-not-copied",
        "src/samkit/train/ema.py",
        "                v.copy_(current[k])",
        "                pass",
        (T + "test_ema.py",),
        "the EMA keeps num_batches_tracked at its initial value",
    ),
    Mutation(
        "ema-state-not-loaded",
        "src/samkit/train/ema.py",
        "            v.copy_(state[k])",
        "            pass",
        (T + "test_ema.py",),
        "a resumed EMA starts over from the model's weights",
    ),
    Mutation(
        "schedule-position-not-loaded",
        "src/samkit/train/schedule.py",
        'self.steps_done = int(state["steps_done"])',
        "self.steps_done = 0",
        (T + "test_schedule.py", T + "test_fp16_resume.py"),
        "a resumed schedule starts again at the peak learning rate",
    ),
    Mutation(
        "step-grad-scaler-not-loaded",
        "src/samkit/train/step.py",
        '            self.grad_scaler.load_state_dict(state["grad_scaler"])',
        "            pass",
        (T + "test_fp16_resume.py",),
        "an fp16 resume starts the GradScaler over (scale, growth counter)",
    ),
    Mutation(
        "resume-accepts-other-steps-per-epoch",
        "src/samkit/train/run.py",
        'if saved.get("steps_per_epoch") != steps_per_epoch:',
        "if False:",
        (T + "test_resume_refusals.py",),
        "resume accepts a checkpoint of another number of steps per epoch",
    ),
    Mutation(
        "resume-accepts-other-world-size",
        "src/samkit/train/run.py",
        'if saved.get("world_size", 1) != world_size:',
        "if False:",
        (T + "test_resume_refusals.py",),
        "resume accepts a checkpoint of another number of processes",
    ),
    # -- evaluation and records -------------------------------------------------------------------
    Mutation(
        "evaluate-loss-batch-mean",
        "src/samkit/train/evaluate.py",
        'total_loss += F.cross_entropy(logits, y, reduction="sum").item()',
        'total_loss += F.cross_entropy(logits, y, reduction="mean").item()',
        (T + "test_evaluate_metrics.py",),
        "the test loss adds batch means (the last, partial batch weighs as a full one)",
    ),
    Mutation(
        "evaluate-top-4",
        "src/samkit/train/evaluate.py",
        "k = min(5, logits.shape[1])",
        "k = min(4, logits.shape[1])",
        (T + "test_evaluate_metrics.py",),
        "the top-5 error rate looks at the top 4",
    ),
    Mutation(
        "evaluate-in-training-mode",
        "src/samkit/train/evaluate.py",
        "    model.eval()\n",
        "    pass\n",
        (T + "test_evaluate_metrics.py",),
        "evaluation normalises with batch statistics (BatchNorm left in training mode)",
    ),
    Mutation(
        "records-train-loss-per-step",
        "src/samkit/train/records.py",
        "keys.TRAIN_LOSS: stats.loss_sum.item() / stats.seen,",
        "keys.TRAIN_LOSS: stats.loss_sum.item() / max(1, stats.grad_norm_count),",
        (T + "test_loop_values.py",),
        "the train loss is divided by the number of steps, not of images",
    ),
    Mutation(
        "records-test-error-is-accuracy",
        "src/samkit/train/records.py",
        'record[keys.TEST_ERROR_RATE] = result["error_rate"]',
        'record[keys.TEST_ERROR_RATE] = result["accuracy"]',
        (T + "test_loop_values.py",),
        "the record's test error rate is the accuracy",
    ),
    # -- the data pipeline ------------------------------------------------------------------------
    Mutation(
        "loader-batched-never-augments",
        "src/samkit/data/loader.py",
        "        augment = dataset.batch_augment(train)",
        "        augment = dataset.batch_augment(False)",
        AUG,
        "the batched loader applies the evaluation pipeline when training",
    ),
    Mutation(
        "loader-per-sample-never-augments",
        "src/samkit/data/loader.py",
        "view = _SeededView(self.dataset, self.train, seeds)",
        "view = _SeededView(self.dataset, False, seeds)",
        AUG,
        "the per-sample loader applies the evaluation transform when training",
    ),
    Mutation(
        "loader-evaluation-augmented",
        "src/samkit/data/loader.py",
        "        return batch_augment(self.dataset)\n",
        "        return batch_augment(self.dataset, self.image_level, self.batch_level,"
        " self.cutout_length)\n",
        AUG,
        "evaluation batches get the training augmentation",
    ),
    Mutation(
        "loader-same-draws-every-batch",
        "src/samkit/data/loader.py",
        "gen = generator(self.seed, epoch, _AUGMENT, k) if self.train else None",
        "gen = generator(self.seed, epoch, _AUGMENT) if self.train else None",
        AUG,
        "every batch of an epoch gets the same augmentation draws",
    ),
    Mutation(
        "transforms-never-flip",
        "src/samkit/data/transforms.py",
        "flips = torch.rand(batch, generator=generator) < 0.5",
        "flips = torch.rand(batch, generator=generator) < 0.0",
        AUG,
        "the batched flip never happens",
    ),
    Mutation(
        "transforms-flip-not-applied",
        "src/samkit/data/transforms.py",
        "cols = torch.where(flips[:, None], w - 1 - cols, cols)",
        "cols = torch.where(flips[:, None], cols, cols)",
        AUG,
        "the flip is drawn but not applied",
    ),
    Mutation(
        "transforms-half-the-offsets",
        "src/samkit/data/transforms.py",
        "dy = torch.randint(0, 2 * padding + 1, (batch,), generator=generator)",
        "dy = torch.randint(0, padding + 1, (batch,), generator=generator)",
        AUG,
        "vertical crop offsets only 0..4 (the image only ever moves down)",
    ),
    Mutation(
        "transforms-svhn-flipped",
        "src/samkit/data/transforms.py",
        "flip=basic and spec.flip,",
        "flip=basic,",
        AUG,
        "the batched pipeline flips SVHN digits (the data-set table says not to)",
    ),
    Mutation(
        "transforms-cutout-dropped",
        "src/samkit/data/transforms.py",
        'cutout_length=cutout_length if batch_level == "cutout" else None,',
        "cutout_length=None,",
        AUG,
        "the batched pipeline ignores --batch-level-augmentations cutout",
    ),
    Mutation(
        "transforms-autoaugment-dropped",
        "src/samkit/data/transforms.py",
        '        if image_level in ("autoaugment", "aa-only"):',
        "        if False:",
        AUG,
        "autoaugment / aa-only apply no AutoAugment",
    ),
    Mutation(
        "transforms-autoaugment-policy",
        "src/samkit/data/transforms.py",
        "v2.AutoAugment(v2.AutoAugmentPolicy(spec.autoaugment))",
        "v2.AutoAugment()",
        (D + "test_transforms.py", *AUG),
        "SVHN gets the CIFAR-10 AutoAugment policy (the table says svhn)",
    ),
    Mutation(
        "noise-may-keep-the-label",
        "src/samkit/data/noise.py",
        "shift = torch.randint(1, num_classes, (k,), generator=gen)",
        "shift = torch.randint(0, num_classes, (k,), generator=gen)",
        (D + "test_noise_registry.py",),
        "a 'flipped' label may stay the same class",
    ),
)


def copy_tree(dest: Path, rev: str | None) -> str:
    """The files to test, from the working tree or from git revision ``rev``; returns a label."""
    if rev is None:
        ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", ".pytest_cache")
        for name in COPIED:
            source = ROOT / name
            if source.is_dir():
                shutil.copytree(source, dest / name, ignore=ignore)
            else:
                shutil.copy2(source, dest / name)
        head = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--", *COPIED)
        return f"working tree at {head}" + (" (with uncommitted changes)" if dirty else "")
    archive = dest / "tree.tar"
    with archive.open("wb") as out:
        subprocess.run(["git", "archive", rev, *COPIED], cwd=ROOT, stdout=out, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="data")
    archive.unlink()
    return git("rev-parse", "--short", rev)


def git(*args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()


def environment(copy: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(copy / "src"), env.get("PYTHONPATH")]))
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def check_import_path(copy: Path, env: dict[str, str]) -> None:
    """``import samkit`` in the copy must find the copy (not the editable install)."""
    found = subprocess.run(
        [sys.executable, "-c", "import samkit; print(samkit.__file__)"],
        cwd=copy,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if not Path(found).resolve().is_relative_to((copy / "src").resolve()):
        sys.exit(f"mutation_test: samkit is imported from {found}, not from the copy {copy}")


def run_tests(
    copy: Path, env: dict[str, str], tests: tuple[str, ...], timeout: float, stop_first: bool
) -> tuple[str, float, list[str], str]:
    """``(outcome, seconds, failed test ids, output tail)``; outcome passed / failed / timeout /
    error (pytest could not run the tests: collection or usage errors)."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", *tests]
    if stop_first:
        cmd.insert(4, "-x")
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return "timeout", time.perf_counter() - start, [], ""
    seconds = time.perf_counter() - start
    output = proc.stdout + proc.stderr
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", output, flags=re.M)
    outcome = {0: "passed", 1: "failed"}.get(proc.returncode, "error")
    return outcome, seconds, failed, "\n".join(output.splitlines()[-15:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rev", help="test this git revision instead of the working tree")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="these mutations only")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument(
        "--json",
        type=Path,
        default=ROOT / "docs" / "mutation_results.json",
        help="where to write the results (default: docs/mutation_results.json)",
    )
    parser.add_argument(
        "--all-failures",
        action="store_true",
        help="run every chosen test under each mutation (default: stop at the first failure)",
    )
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per test run")
    args = parser.parse_args(argv)

    chosen = list(MUTATIONS)
    if args.only:
        unknown = set(args.only) - {m.name for m in MUTATIONS}
        if unknown:
            parser.error(f"unknown mutation(s): {', '.join(sorted(unknown))}")
        chosen = [m for m in MUTATIONS if m.name in args.only]
    if args.list:
        for m in chosen:
            print(f"{m.name:40} {m.file}: {m.what}")
        return 0

    results = []
    with tempfile.TemporaryDirectory(prefix="samkit-mutation-") as tmp:
        copy = Path(tmp)
        source = copy_tree(copy, args.rev)
        env = environment(copy)
        check_import_path(copy, env)
        print(f"mutation testing {source} in {copy}", flush=True)

        tests = tuple(dict.fromkeys(t for m in chosen for t in m.tests))
        outcome, seconds, failed, tail = run_tests(copy, env, tests, args.timeout, False)
        print(f"baseline (unmutated, {len(tests)} test files / ids): {outcome} in {seconds:.0f} s")
        if outcome != "passed":
            print(tail)
            print("mutation_test: the tests fail without any mutation; nothing to conclude")
            return 1

        for m in chosen:
            path = copy / m.file
            text = path.read_text()
            count = text.count(m.original)
            if count != 1:
                status, seconds, failed = f"not applied (text found {count} times)", 0.0, []
            else:
                path.write_text(text.replace(m.original, m.mutated))
                try:
                    outcome, seconds, failed, tail = run_tests(
                        copy, env, m.tests, args.timeout, not args.all_failures
                    )
                finally:
                    path.write_text(text)
                status = {"failed": "caught", "passed": "survived"}.get(outcome, outcome)
            results.append(
                {
                    **dataclasses.asdict(m),
                    "tests": list(m.tests),
                    "status": status,
                    "seconds": round(seconds, 1),
                    "caught_by": failed,
                }
            )
            print(f"{m.name:40} {status:9} {seconds:6.0f} s  {failed[0] if failed else ''}",
                  flush=True)  # fmt: skip

    caught = sum(r["status"] == "caught" for r in results)
    print()
    print(table(results))
    print(f"\n{caught} of {len(results)} mutations caught")
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": source,
        "machine": {
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch_version(),
        },
        "command": "python scripts/mutation_test.py " + " ".join(argv or sys.argv[1:]),
        "caught": caught,
        "total": len(results),
        "mutations": results,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1) + "\n")
    print(f"written to {args.json}")
    return 0 if caught == len(results) else 1


def table(results: list[dict]) -> str:
    rows = ["| mutation | file | the mistake | result | failing tests |", "|---" * 5 + "|"]
    for r in results:
        failed = r["caught_by"]
        first = f"`{failed[0]}`" if failed else ""
        if len(failed) > 1:
            first += f" and {len(failed) - 1} more"
        rows.append(
            f"| `{r['name']}` | `{r['file'].removeprefix('src/samkit/')}` | {r['what']} | "
            f"{r['status']} | {first} |"
        )
    return "\n".join(rows)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def torch_version() -> str:
    try:
        import torch
    except ImportError:
        return "not installed"
    return torch.__version__


if __name__ == "__main__":
    sys.exit(main())
