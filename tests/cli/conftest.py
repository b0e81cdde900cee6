"""The README's commands through their real entry points (``train.py``, ``sample.py``, ``eval.py``,
``python -m unclip_pl.data.make_shards``, ``python -m unclip_pl.data.embed``) in subprocesses, at a tiny size.

Every command runs with ``PROJECT_ROOT`` set to a temporary folder (``cli_root``), so what the README says lands in
``logs/`` and ``data/cache/`` lands there, never in the repository; the emoji data is the small set of the
``emoji_root`` fixture. Commands that do not depend on each other run side by side (each is one mostly
single-threaded process that spends most of its time importing torch):

1. ``stages``: the quick start ``train.py prior=diffusion`` (trains the tiny CLIP into ``data/cache/clip/``, embeds,
   trains the prior), beside ``train.py stage=clip``, ``--cfg job`` and ``make_shards``; then ``decoder=base``,
   ``upsampler=emoji`` and ``embed`` (with the cached CLIP).
2. ``launched``: every ``sample.py`` and ``eval.py`` command on those checkpoints, and training on the embedded
   shards (``data=shards``).

Each test waits for its command and asserts what it wrote.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import ROOT, emoji_overrides, tiny_ar_overrides, tiny_clip_overrides, tiny_stage_overrides

#: Training length of every training command here.
STEPS = "trainer.max_steps=2"
#: The sample.py modes run as one Hydra multirun (one process, one job per mode; see `launched`).
SWEPT_MODES = ("variations", "interpolate", "textdiff", "conditioning", "guidance", "probe")


@dataclass
class Done:
    """A finished command: its argv, exit code, output and wall time (start to its last output)."""

    args: list[str]
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    def check(self) -> Done:
        """Assert exit 0 (the message shows the command and the end of its output), and that the command named no
        path in the repository's logs/ or data/cache/ (it wrote under PROJECT_ROOT)."""
        assert self.returncode == 0, (f"`{' '.join(self.args)}` exited {self.returncode}\n--- stdout\n"
                                      f"{self.stdout[-3000:]}\n--- stderr\n{self.stderr[-6000:]}")
        for repo_dir in (ROOT / "logs", ROOT / "data" / "cache"):
            assert f"{repo_dir}/" not in self.stdout + self.stderr, f"`{' '.join(self.args)}` used {repo_dir}"
        return self


class Command:
    """``python ARGS`` started in the background with ``PROJECT_ROOT=root``; ``wait()`` gives its :class:`Done`."""

    def __init__(self, args: list, root: Path, cwd: Path | None = None, timeout: float = 600):
        self.args = [str(a) for a in args]
        self.root, self.timeout = root, timeout
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}  # run_name = a time stamp
        env.update(PROJECT_ROOT=str(root), HF_HUB_OFFLINE="1", WANDB_MODE="offline", OMP_NUM_THREADS="1",
                   PYTHONWARNINGS="ignore")
        out_dir = root.parent / f"{root.name}_output"
        out_dir.mkdir(exist_ok=True)
        stem = f"{time.time_ns()}"
        self.out_path, self.err_path = out_dir / f"{stem}.out", out_dir / f"{stem}.err"
        self._t0 = time.time()
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.proc = subprocess.Popen([sys.executable, *self.args], cwd=cwd or root, env=env, stdout=out,
                                         stderr=err, stdin=subprocess.DEVNULL)
        self._done: Done | None = None

    def wait(self) -> Done:
        if self._done is None:
            try:
                rc = self.proc.wait(timeout=self.timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                rc = self.proc.wait()
            ended = max(self.out_path.stat().st_mtime, self.err_path.stat().st_mtime, self._t0)  # last output
            self._done = Done(["python", *self.args], rc, self.out_path.read_text(), self.err_path.read_text(),
                              ended - self._t0)
            with open(self.out_path.parent / "timings.txt", "a") as f:  # what to look at when the folder is slow
                f.write(f"{self._done.seconds:7.1f} s  rc {rc}  {' '.join(self.args)[:200]}\n")
        return self._done

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def script(name: str) -> str:
    """An entry point of the repository root (train.py, sample.py, eval.py)."""
    return str(ROOT / name)


def listing(folder: Path) -> set[Path]:
    return set(folder.iterdir()) if folder.is_dir() else set()


def only_new(before: set[Path], folder: Path) -> Path:
    """The one entry of ``folder`` not in ``before`` (a run directory named by its time stamp)."""
    new = sorted(listing(folder) - before)
    assert len(new) == 1, f"expected one new run directory in {folder}, found {new}"
    return new[0]


def write_png(path: Path, w: int = 40, h: int = 30, seed: int = 0) -> Path:
    import numpy as np
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)
    return path


@pytest.fixture
def in_process(monkeypatch, capfd):
    """``run(name, args, root)``: ``python NAME ARGS`` (an entry script, its ``__main__`` block included) executed in
    this process with ``PROJECT_ROOT=root``; returns its :class:`Done` (exit code, captured stdout / stderr). For
    commands that stop early (usage errors), where a new interpreter would cost seconds of imports for nothing."""
    import logging
    import runpy

    def run(name: str, args: list, root: Path) -> Done:
        args = [str(a) for a in args]
        monkeypatch.setattr(sys, "argv", [script(name), *args])
        monkeypatch.setenv("PROJECT_ROOT", str(root))
        monkeypatch.syspath_prepend(str(ROOT))  # eval.py imports sample.py as a module, as when run as a script
        log = logging.getLogger()
        handlers, level = log.handlers[:], log.level
        capfd.readouterr()
        t0, code = time.time(), 0
        try:
            runpy.run_path(script(name), run_name="__main__")
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        finally:  # Hydra configured logging for the job (console and <run dir>/<task>.log): undo it
            for h in log.handlers[:]:
                if h not in handlers:
                    log.removeHandler(h)
                    h.close()
            log.handlers[:] = handlers
            log.setLevel(level)
        out, err = capfd.readouterr()
        return Done(["python", name, *args], code, out, err, time.time() - t0)

    return run


@pytest.fixture(scope="session")
def cli_root(tmp_path_factory) -> Path:
    """PROJECT_ROOT of the commands: their ``logs/`` and ``data/`` (the CLIP cache included) are temporary."""
    return tmp_path_factory.mktemp("cli_root")


@pytest.fixture(scope="session")
def inputs(cli_root) -> Path:
    """The user's files, with relative paths as the README writes them: ``face.png`` (working directory of the
    sampling commands) and ``photos/`` (7 images with same-named .txt captions, inside ``cli_root``)."""
    folder = cli_root.parent / f"{cli_root.name}_inputs"
    write_png(folder / "face.png")
    for i in range(7):
        write_png(cli_root / "photos" / f"p{i}.png", 24 + i, 20 + i, seed=10 + i)
        (cli_root / "photos" / f"p{i}.txt").write_text(["red heart", "blue car", "green tree"][i % 3] + f" {i}\n")
    return folder


@pytest.fixture(scope="session")
def stages(cli_root, emoji_root, inputs, tmp_path_factory):
    """The README's training commands at a tiny size (see the module docstring). Returns ``{"root", "clip" (the
    cached CLIP), "runs": {stage: run dir}, "done": {stage: Done}, "prior"/"decoder"/"upsampler": last.ckpt,
    "side": {name: Command} (commands started here whose tests wait for them)}``."""
    data, clip = emoji_overrides(emoji_root), tiny_clip_overrides()
    runs_dir = cli_root / "logs" / "train" / "runs"
    clip_root = tmp_path_factory.mktemp("clip_stage_root")  # its own root: what a stage=clip run leaves in a cache
    side = {
        "clip": Command([script("train.py"), "stage=clip", *data, *clip, "run_name=clip"], clip_root),
        # README: `stage=clip clip.export_to=data/cache/clip/unclip-tiny.pt` and the judge CLIP
        "clip_export": Command([script("train.py"), "stage=clip", *data, *clip, "run_name=exported",
                                "clip.export_to=data/cache/clip/unclip-tiny.pt"], tmp_path_factory.mktemp("export")),
        "judge": Command([script("train.py"), "stage=clip", "clip=judge", "seed=1", "run_name=judge", *data, *clip],
                         clip_root),
        "cfg_job": Command([script("train.py"), "prior=diffusion", "--cfg", "job"], cli_root),
        "make_shards": Command(["-m", "unclip_pl.data.make_shards", "photos/", "data/photos", "--maxcount", "4",
                                "--maxsize", "1e9", "--prefix", "photos"], cli_root),
    }
    before = listing(runs_dir)
    try:
        prior = Command([script("train.py"), "prior=diffusion", *data, *clip, *tiny_stage_overrides("prior"),
                         STEPS], cli_root).wait().check()
        out = {"root": cli_root, "clip": cli_root / "data" / "cache" / "clip" / "unclip-tiny.pt",
               "runs": {"prior": only_new(before, runs_dir)}, "done": {"prior": prior}, "side": side}
        later = {stage: Command([script("train.py"), f"{stage}={option}", *data, *clip, *tiny_stage_overrides(stage),
                                 STEPS, f"run_name={stage}"], cli_root)
                 for stage, option in (("decoder", "base"), ("upsampler", "emoji"))}
        # the autoregressive prior: `python train.py prior=ar`
        later["prior_ar"] = Command([script("train.py"), "prior=ar", *data, *clip, *tiny_ar_overrides(), STEPS,
                                     "run_name=prior_ar"], cli_root)
        side["make_shards"].wait()
        side["embed"] = Command(["-m", "unclip_pl.data.embed", "data/photos/photos-{000000..000001}.tar",
                                 "data/photos_emb", "--clip", "small"], cli_root)
        for stage, cmd in later.items():
            out["done"][stage] = cmd.wait().check()
            out["runs"][stage] = runs_dir / stage
    except BaseException:
        for cmd in side.values():
            cmd.stop()
        raise
    for stage, run_dir in out["runs"].items():
        out[stage] = run_dir / "checkpoints" / "last.ckpt"
    yield out
    for cmd in side.values():
        cmd.stop()


def sample_args(stages, *args: str) -> list[str]:
    """``sample.py ARGS checkpoints.prior=P checkpoints.decoder=D checkpoints.upsamplers=[U]`` (the whole cascade)."""
    return [script("sample.py"), *args, f"checkpoints.prior={stages['prior']}",
            f"checkpoints.decoder={stages['decoder']}", f"checkpoints.upsamplers=[{stages['upsampler']}]"]


@pytest.fixture(scope="session")
def launched(stages, inputs, emoji_root, tmp_path_factory):
    """Every sampling / evaluation command on the session's checkpoints, started at once: ``{name: Command}``."""
    root = stages["root"]
    face_dir = inputs  # `image=face.png` is relative to the working directory
    cmds: dict[str, Command] = {}

    def start(name: str, args: list, cwd: Path | None = None) -> None:
        cmds[name] = Command(args, root, cwd=cwd)

    try:
        # README: text -> prior -> decoder -> upsampler, 4 images per caption
        start("text", sample_args(stages, "mode=text", "prompt=grinning face", "n=4"))
        # README: variations from the image's DDIM inversion, decoder only
        start("variations_inverted", [script("sample.py"), "mode=variations", "image=face.png", "invert=true",
                                      f"checkpoints.decoder={stages['decoder']}"], cwd=face_dir)
        # the other modes (README "Modes: ..."), one job each; input images generated from the prompts
        start("modes", sample_args(stages, "-m", f"mode={','.join(SWEPT_MODES)}",
                                   'prompt=["grinning face","red heart"]', "n=2", "k=3", "thetas=[0.0,0.5]",
                                   "caption=grinning face", "new_caption=red heart", "scales=[1.0,3.0]",
                                   'labels=["a grinning face","a red heart","a car"]'))
        # README: python eval.py checkpoints.prior=... checkpoints.decoder=...
        start("eval", [script("eval.py"), f"checkpoints.prior={stages['prior']}",
                       f"checkpoints.decoder={stages['decoder']}", *emoji_overrides(emoji_root),
                       "max_samples.val=4", "max_samples.train=4", "batch_size=4", "diversity.captions=2",
                       "diversity.samples=2"])
        # experiments/emoji_cascade/README.md: the decoder-guidance sweep, one G, scored by the judge CLIP too
        judge = stages["side"]["judge"]
        judge.wait().check()
        cmds["eval_guidance"] = Command(
            [script("eval.py"), f"checkpoints.prior={stages['prior']}", f"checkpoints.decoder={stages['decoder']}",
             *emoji_overrides(emoji_root), "settings.decoder.sampler=dpmpp_2m", "settings.decoder.steps=4",
             "settings.decoder.guidance_scale=1.5", "upsample=false",
             f"judge={judge.root / 'logs' / 'train' / 'runs' / 'judge' / 'clip.pt'}", "splits=[val]",
             "variants=[prior,oracle]", "max_samples.val=4", "batch_size=4", "diversity.captions=2",
             "diversity.samples=2"], tmp_path_factory.mktemp("eval_guidance"))
        # README "Run directories": rerunning in a run directory that holds checkpoints/last.ckpt resumes from it
        # (a copy of the upsampler's run, so that the checkpoint the sampling commands load stays as it is)
        shutil.copytree(stages["runs"]["upsampler"], stages["runs"]["upsampler"].with_name("resumed"))
        start("resume", [script("train.py"), "upsampler=emoji", *emoji_overrides(emoji_root), *tiny_clip_overrides(),
                         *tiny_stage_overrides("upsampler"), "trainer.max_steps=3", "run_name=resumed"])
        # a resumed AR prior keeps the codec of its checkpoint (a copy of its run, as for the upsampler below)
        shutil.copytree(stages["runs"]["prior_ar"], stages["runs"]["prior_ar"].with_name("prior_ar_resumed"))
        start("resume_ar", [script("train.py"), "prior=ar", *emoji_overrides(emoji_root), *tiny_clip_overrides(),
                            *tiny_ar_overrides(), "trainer.max_steps=3", "run_name=prior_ar_resumed"])
        # text -> AR prior -> decoder, with a prior setting of the AR kind (in a root of its own: its text.png)
        cmds["text_ar"] = Command([script("sample.py"), "mode=text", "prompt=grinning face", "n=2",
                                   f"checkpoints.prior={stages['prior_ar']}",
                                   f"checkpoints.decoder={stages['decoder']}", "settings.prior.temperature=0.8"],
                                  tmp_path_factory.mktemp("ar_sample_root"))
        # an AR prior checkpoint through eval.py and sample.py mode=conditioning (each in a root of its own)
        cmds["eval_ar"] = Command([script("eval.py"), f"checkpoints.prior={stages['prior_ar']}",
                                   f"checkpoints.decoder={stages['decoder']}", *emoji_overrides(emoji_root),
                                   "splits=[val]", "variants=[prior,no_prior]", "max_samples.val=4", "batch_size=4",
                                   "settings.decoder.guidance_scale=1.5", "diversity.captions=2",
                                   "diversity.samples=2"], tmp_path_factory.mktemp("ar_eval"))
        cmds["conditioning_ar"] = Command([script("sample.py"), "mode=conditioning",
                                           'prompt=["grinning face","red heart"]', "settings.prior.top_k=4",
                                           f"checkpoints.prior={stages['prior_ar']}",
                                           f"checkpoints.decoder={stages['decoder']}"],
                                          tmp_path_factory.mktemp("ar_conditioning"))
        # README: one stage of the emoji cascade as its experiment, with another time budget
        start("experiment", [script("train.py"), "experiment=emoji_cascade/prior", "trainer.max_time=00:00:15:00",
                             *emoji_overrides(emoji_root), *tiny_clip_overrides(), *tiny_stage_overrides("prior"),
                             "data.batch_size=8", STEPS])
        # a prior checkpoint given as the decoder: one line on stderr (the other wrong checkpoints: in-process)
        start("wrong_stage", [script("sample.py"), "mode=text", "prompt=x", f"checkpoints.decoder={stages['prior']}"])
        # data/README.md step 3: train on the embedded shards
        stages["side"]["embed"].wait()
        start("train_shards", [script("train.py"), "prior=diffusion", "data=shards",
                               "data.train_urls=data/photos/*.tar", "data.val_urls=data/photos",
                               "data.embeddings=sidecar", "data.sidecar_urls=data/photos_emb",
                               "data.num_workers=0", "data.batch_size=4", *tiny_clip_overrides(),
                               *tiny_stage_overrides("prior"), STEPS, "run_name=shards"])
    except BaseException:
        for cmd in cmds.values():
            cmd.stop()
        raise
    yield cmds
    for cmd in cmds.values():
        cmd.stop()
