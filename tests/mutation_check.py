"""Mutation check: one deliberate bug at a time in a scratch copy of the repository, then the tests.

    python tests/mutation_check.py [--tier fast|all]

Each mutant is a bug a user would fear (a wrong loss, lost flips, a skipped all-reduce, a lossy resume,
...). A line per mutant says CAUGHT (the tests failed, with the first failing test) or MISSED. The fast
tier (-m "not slow") is the default and must catch every one; exit status 1 if any is missed.
"""

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

SRC = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MUTANTS = {
    "mixup partner loss without (1 - lam)": (
        "trainer/engine.py",
        "loss = lam * loss + (1 - lam) * classification_loss(logits, partners, smoothing)",
        "loss = lam * loss + classification_loss(logits, partners, smoothing)",
    ),
    "label smoothing applied twice in the loop (0.1 -> 0.19)": (
        "trainer/engine.py",
        "    loss = classification_loss(logits, labels, smoothing)\n",
        "    loss = classification_loss(logits, labels, 1 - (1 - smoothing) ** 2)\n",
    ),
    "10-crop test views lose their flips": (
        "dali_pipelines/crops.py",
        "[(w, True) for w in windows]",
        "[(w, False) for w in windows]",
    ),
    "precise-BN without the cross-rank average": (
        "trainer/precise_bn.py",
        "    dist.average_bn_buffers(model, env)\n",
        "\n",
    ),
    "eval counts every sample twice": (
        "trainer/engine.py",
        "counts += (c1, c5, truth.shape[0], float(loss))",
        "counts += (c1, c5, 2 * truth.shape[0], float(loss))",
    ),
    "eval skips the last partial batch": (
        "dali_pipelines/loader.py",
        'drop_last=(spec.mode == "train") if run.drop_last is None',
        "drop_last=True if run.drop_last is None",
    ),
    "resume without optimizer state": (
        "trainer/checkpoint.py",
        '    optimizer.set_state_dict(state["optimizer"])\n',
        "\n",
    ),
    "resume without the LR scheduler position": (
        "trainer/checkpoint.py",
        '    optimizer.set_state_dict(state["optimizer"])\n',
        '    optimizer.set_state_dict({k: v for k, v in state["optimizer"].items() if k != "LR_Scheduler"})\n',
    ),
    "consensus max instead of mean": (
        "trainer/models.py",
        "feats.reshape([-1, num_views, feats.shape[-1]]).mean(axis=1)",
        "feats.reshape([-1, num_views, feats.shape[-1]]).max(axis=1)",
    ),
    "feed: a skipped training sample is not replaced (no top-up)": (
        "dali_pipelines/loader.py",
        "        self._budget += 1  #",
        "        self._budget += 0  #",
    ),
    "video probe facts trusted after the file changed": (
        "clipdata/video.py",
        "        return (self.size, self.mtime_ns) == (st.st_size, st.st_mtime_ns)\n",
        "        return True\n",
    ),
    "sparse decode without the frame-count consistency check": (
        "clipdata/video.py",
        "if any(p.pts is None for p in shown) or len(shown) != promised:",
        "if any(p.pts is None for p in shown):",
    ),
    "pkl index without the end anchor (a frame left out goes unnoticed)": (
        "clipdata/pkl.py",
        "not pickle_end - _MAX_TAIL_OPCODES <= ends[-1] <= pickle_end",
        "not ends[-1] <= pickle_end",
    ),
    "weights loaded with a plain unpickler": (
        "trainer/weights.py",
        "            return _ALLOWED[(module, name)]\n",
        "            return super().find_class(module, name)\n",
    ),
    # issue 25: bugs the suite let through, each a silently wrong number
    "evaluation's top-5 computed as top-4": (
        "trainer/engine.py",
        "c1, c5 = topk_correct(scores, truth, (1, min(5, scores.shape[1])))",
        "c1, c5 = topk_correct(scores, truth, (1, min(4, scores.shape[1])))",
    ),
    "predict prints each probability beside another class's name": (
        "trainer/predict.py",
        "[(names[i], float(p[i])) for i in top]",
        "[(names[i], float(p[j])) for i, j in zip(sorted(top), top)]",
    ),
    "normalisation mean/std in BGR order": (
        "dali_pipelines/clipspec.py",
        "MEAN = (0.485, 0.456, 0.406)\nSTD = (0.229, 0.224, 0.225)\n",
        "MEAN = (0.406, 0.456, 0.485)\nSTD = (0.225, 0.224, 0.229)\n",
    ),
    "every rank draws the same crops, flips and segments": (
        "dali_pipelines/loader.py",
        "items.append((s, (self.seed, self.rank, self.epoch, k), self.facts.get(s.path)))",
        "items.append((s, (self.seed, 0, self.epoch, k), self.facts.get(s.path)))",
    ),
    # the same classes, found while fixing issue 25's bad inputs
    "pkl index trusted after the file was rewritten in place": (
        "dali_pipelines/feed.py",
        "index = read_pkl_index(fd, st.st_size, st.st_mtime_ns)",
        "index = read_pkl_index(fd, st.st_size)",
    ),
    "a list's duplicate lines counted twice": (
        "clipdata/lists.py",
        "        key = os.path.normpath(path)\n",
        "        key = (os.path.normpath(path), no)\n",
    ),
    "resume=auto falls back to the oldest epoch checkpoint": (
        "trainer/checkpoint.py",
        "[p for _, p in sorted(epochs, reverse=True)]",
        "[p for _, p in sorted(epochs)]",
    ),
    "a label file naming one class twice accepted": (
        "clipdata/lists.py",
        "        if name in lines:",
        "        if name in names:",
    ),
    "mean class accuracy averaged over classes absent from the list": (
        "trainer/engine.py",
        "mean_class_accuracy=float(per_class[present].mean())",
        "mean_class_accuracy=float(per_class.mean())",
    ),
    "rawframes read one frame late": (
        "dali_pipelines/feed.py",
        'f"img_{i + 1:05d}.jpg"',
        'f"img_{i + 2:05d}.jpg"',
    ),
    "check_videos misses a video shorter than the list says": (
        "preprocessing/check_videos.py",
        "elif s.num_frames > f.frames:",
        "elif s.num_frames > f.frames + 1:",
    ),
    "merge_shards keeps shard order, not the unsharded run's order": (
        "preprocessing/shards.py",
        'lines = sorted(tuple(x) for p in parts for x in p["lines"])',
        'lines = [tuple(x) for p in parts for x in p["lines"]]',
    ),
    "export writes the normalisation mean in BGR order into preprocessing.json": (
        "trainer/export.py",
        '"mean": list(MEAN),',
        '"mean": list(MEAN)[::-1],',
    ),
    "mpirun ranks pick their GPU by global rank": (
        "launch/mpi_env.py",
        "local_rank = _first(LOCAL_RANK_VARS, env) or 0",
        "local_rank = _first(RANK_VARS, env) or 0",
    ),
    "PP-TSMv2 shifts before stage 4 instead of stage 3": (
        "trainer/pptsmv2.py",
        "SHIFT_STAGE = 2",
        "SHIFT_STAGE = 3",
    ),
    "PP-TSMv2's folding drops the BN mean (exported model differs)": (
        "trainer/pptsmv2.py",
        "return kernel, bn.bias.numpy() - bn._mean.numpy().astype(np.float64) * scale",
        "return kernel, bn.bias.numpy()",
    ),
    "the restart's cause is the first rank to end, even one that only lost its peer": (
        "common/exits.py",
        'own = [e for e in found if not e["secondary"] and e["kind"] != "stuck"]',
        'own = [e for e in found if e["kind"] != "stuck"]',
    ),
    "a data error is restarted": (
        "common/exits.py",
        'NOT_RESTARTABLE = ("config", "data", "usage", "output")',
        'NOT_RESTARTABLE = ("config", "usage", "output")',
    ),
    "the loader's worker timeout outlasts the ranks' collective timeout": (
        "common/processes.py",
        "return min(timeout, max(1.0, collective * 2 / 3))",
        "return min(timeout, max(1.0, collective * 3 / 2))",
    ),
    "a rank whose launcher died before it linked trains on": (
        "common/lifeline.py",
        "os.getppid() != int(expected_parent)",
        "os.getppid() == int(expected_parent)",
    ),
}


def run(name: str, tier: str, work: str, tests: list[str], timeout: float) -> tuple[int, list[str], float]:
    path, old, new = MUTANTS[name]
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(SRC, work, ignore=shutil.ignore_patterns(".venv", "data", "output", "log", ".git", "__pycache__"))
    text = open(os.path.join(work, path)).read()
    assert text.count(old) == 1, f"{name}: the code to mutate changed; update the mutant"
    with open(os.path.join(work, path), "w") as f:
        f.write(text.replace(old, new))
    args = [sys.executable, "-m", "pytest", *(tests or ["tests"]), "-x", "-q", "-p", "no:cacheprovider"]
    if tier == "fast":
        args += ["-m", "not slow"]
    t = time.time()
    # a session of its own: on a timeout the whole run goes (a child stuck at pytest's exit included)
    proc = subprocess.Popen(
        args,
        cwd=work,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONPATH": work},
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        tests_ran = [line for line in out.splitlines() if line.startswith("FAILED")]
        return (1 if tests_ran else 124), tests_ran, time.time() - t
    return proc.returncode, [line for line in out.splitlines() if line.startswith("FAILED")], time.time() - t


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tier", choices=("fast", "all"), default="fast")
    p.add_argument(
        "--only", nargs="+", default=[], metavar="WORDS", help="only the mutants whose name contains one of WORDS"
    )
    p.add_argument(
        "--tests",
        nargs="+",
        default=[],
        metavar="PATH",
        help="run these test files (or node ids) instead of the suite: a CAUGHT holds for the suite, a MISSED "
        "only for them",
    )
    p.add_argument("--timeout", type=float, default=1800, help="seconds one mutant's test run may take")
    args = p.parse_args()
    tier, names = args.tier, [n for n in MUTANTS if not args.only or any(w in n for w in args.only)]
    missed = 0
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            rc, failed, dt = run(name, tier, os.path.join(tmp, "tree"), args.tests, args.timeout)
            missed += rc == 0
            verdict = "CAUGHT" if rc == 1 else "MISSED" if rc == 0 else f"ERROR rc={rc}"
            print(f"{verdict} [{tier}] {name}: {failed[0].split(' - ')[0] if failed else ''} ({dt:.0f}s)", flush=True)
    print(
        f"{len(names) - missed} of {len(names)} mutants caught" + (f" by {' '.join(args.tests)}" if args.tests else "")
    )
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
