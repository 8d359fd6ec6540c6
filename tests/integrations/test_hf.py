"""AsyncSaveCallback with the real transformers.Trainer (tiny GPT-2 on CPU)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("transformers", reason="transformers not installed: pip install 'torchaux[hf]'")

from safetensors import safe_open  # noqa: E402
from transformers.trainer_utils import get_last_checkpoint  # noqa: E402

from sinks import FailingSink  # noqa: E402
from tiny_runs import hf_trainer, losses, stop_at  # noqa: E402
from torchaux import AsyncSaver  # noqa: E402
from torchaux.integrations.hf import AsyncSaveCallback  # noqa: E402

_HERE = Path(__file__).resolve().parent


def test_layout_rotation_and_hf_reads_it(tmp_path: Path) -> None:
    """save_steps=2, save_total_limit=2: checkpoint-4 and -6 remain, in HF's layout, sharded with an index."""
    published: list[str] = []
    cb = AsyncSaveCallback(max_shard_size="100KB", on_committed=published.append)
    trainer = hf_trainer(str(tmp_path), callbacks=[cb])
    trainer.train()
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-4", "checkpoint-6"]
    assert [os.path.basename(p) for p in published] == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    ckpt = tmp_path / "checkpoint-6"
    names = set(os.listdir(ckpt))
    assert {"config.json", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json",
            "training_args.bin", "model.safetensors.index.json"} <= names
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2 and all(s in names for s in shards)
    weights = {}
    for shard in shards:
        with safe_open(str(ckpt / shard), "pt") as f:
            assert f.metadata()["format"] == "pt"
            weights.update({k: f.get_tensor(k) for k in f.keys()})
    live = trainer.model.state_dict()
    assert "lm_head.weight" not in weights  # tied to wte, dropped as save_pretrained does
    assert all(torch.equal(weights[k], live[k]) for k in weights)
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["global_step"] == 6
    assert [h["step"] for h in state["log_history"] if "loss" in h] == [1, 2, 3, 4, 5, 6]
    assert get_last_checkpoint(str(tmp_path)) == str(ckpt)


def test_resume_gives_the_same_loss_curve(tmp_path: Path) -> None:
    """Resume from checkpoint-4 (newest published) reproduces steps 5-6 of the uninterrupted run."""
    full = hf_trainer(str(tmp_path / "full"), callbacks=[AsyncSaveCallback()])
    full.train()
    run = tmp_path / "run"
    first = hf_trainer(str(run), callbacks=[AsyncSaveCallback(), stop_at(4)])
    first.train()
    assert get_last_checkpoint(str(run)) == str(run / "checkpoint-4")
    resumed = hf_trainer(str(run), max_steps=6, callbacks=[AsyncSaveCallback()])
    resumed.train(resume_from_checkpoint=True)
    assert losses(resumed) == losses(full)
    for a, b in zip(full.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)


def test_default_trainer_save_matches(tmp_path: Path) -> None:
    """Without the callback the Trainer writes the same files with the same weights."""
    plain = hf_trainer(str(tmp_path / "plain"), max_steps=2, save_total_limit=None)
    plain.train()
    ours = hf_trainer(str(tmp_path / "ours"), max_steps=2, save_total_limit=None,
                      callbacks=[AsyncSaveCallback()])
    ours.train()
    a, b = tmp_path / "plain" / "checkpoint-2", tmp_path / "ours" / "checkpoint-2"
    assert sorted(os.listdir(a)) == sorted(os.listdir(b))
    with safe_open(str(a / "model.safetensors"), "pt") as fa, safe_open(str(b / "model.safetensors"), "pt") as fb:
        assert sorted(fa.keys()) == sorted(fb.keys())
        assert all(torch.equal(fa.get_tensor(k), fb.get_tensor(k)) for k in fa.keys())
    opt_a = torch.load(a / "optimizer.pt", weights_only=True)
    opt_b = torch.load(b / "optimizer.pt", weights_only=True)
    assert torch.equal(opt_a["state"][0]["exp_avg"], opt_b["state"][0]["exp_avg"])


def test_failed_write_is_raised_by_train(tmp_path: Path) -> None:
    """A failing background write reaches trainer.train() as the original exception; nothing is published."""
    sink = FailingSink(fail_after=10)
    saver = AsyncSaver(sink=sink)
    trainer = hf_trainer(str(tmp_path), max_steps=2, callbacks=[AsyncSaveCallback(saver=saver)])
    with pytest.raises(OSError) as info:
        trainer.train()
    assert info.value is sink.raised[0]
    assert not (tmp_path / "checkpoint-2").exists()
    saver.close()


_CHILD = textwrap.dedent("""
    import contextlib, os, sys, time
    sys.path.insert(0, {here!r})
    from tiny_runs import hf_trainer
    from torchaux import AsyncSaver
    from torchaux.checkpoint.storage.commit import atomic_write
    from torchaux.integrations.hf import AsyncSaveCallback

    @contextlib.contextmanager
    def hang_in_step_4(path):
        with atomic_write(path) as f:
            yield f
            if "tmp-checkpoint-4" in path:
                open({marker!r}, "w").close()   # the parent kills us here, mid-save
                time.sleep(600)

    hf_trainer({out!r}, callbacks=[AsyncSaveCallback(saver=AsyncSaver(sink=hang_in_step_4))]).train()
""")


@pytest.mark.multiprocess
def test_sigkill_mid_save_resumes_from_newest_complete(tmp_path: Path) -> None:
    """SIGKILL while checkpoint-4 is half written: resume picks checkpoint-2 and matches the full run."""
    run, marker = tmp_path / "run", tmp_path / "killed-here"
    script = _CHILD.format(here=str(_HERE), marker=str(marker), out=str(run))
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while not marker.exists():
        if child.poll() is not None or time.monotonic() > deadline:
            child.kill()
            pytest.fail(f"child never reached the save of step 4: {child.stderr.read().decode()[-2000:]}")
        time.sleep(0.05)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    child.stderr.close()
    assert (run / "checkpoint-2").is_dir() and (run / "tmp-checkpoint-4").is_dir()
    assert not (run / "checkpoint-4").exists()
    assert get_last_checkpoint(str(run)) == str(run / "checkpoint-2")

    resumed = hf_trainer(str(run), callbacks=[AsyncSaveCallback()])
    resumed.train(resume_from_checkpoint=True)
    full = hf_trainer(str(tmp_path / "full"), callbacks=[AsyncSaveCallback()])
    full.train()
    assert {s: v for s, v in losses(resumed).items() if s > 2} == {
        s: v for s, v in losses(full).items() if s > 2}
    assert not (run / "tmp-checkpoint-4").exists()  # the killed run's leftovers were cleaned
    assert sorted(os.listdir(run)) == ["checkpoint-4", "checkpoint-6"]


def test_load_best_model_at_end_waits_for_the_checkpoint_in_flight(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The last checkpoint (step 5, saved at the end) is still being published when training ends.

    Its publication is held until the Trainer has run ``_load_best_model`` (or 3 s):
    only a callback that publishes before the final metrics are logged lets HF find
    the best checkpoint (here the last one) complete when it loads it.
    """
    import threading

    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    import torchaux.integrations.hf as hf
    from tiny_runs import TokenData

    loaded = threading.Event()
    found: list[bool] = []
    real_load, real_publish = Trainer._load_best_model, hf.publish_directory

    def load_best(self: Trainer) -> None:
        found.append(os.path.isfile(os.path.join(self.state.best_model_checkpoint, "model.safetensors")))
        real_load(self)
        loaded.set()

    def slow_publish(staging: str, final: str) -> str:
        if final.endswith("checkpoint-5"):
            loaded.wait(3.0)
        return real_publish(staging, final)

    monkeypatch.setattr(Trainer, "_load_best_model", load_best)
    monkeypatch.setattr(hf, "publish_directory", slow_publish)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2))
    args = TrainingArguments(
        str(tmp_path), max_steps=5, per_device_train_batch_size=4, save_steps=2, eval_steps=2,
        eval_strategy="steps", load_best_model_at_end=True, metric_for_best_model="loss",
        greater_is_better=False, save_total_limit=1, logging_steps=1, report_to=[], use_cpu=True,
        seed=0, disable_tqdm=True, dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=TokenData(), eval_dataset=TokenData(16),
                      callbacks=[AsyncSaveCallback()])
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert found == [True], f"{best} was not published when the Trainer loaded it"
    # save_total_limit=1 at the end keeps the best checkpoint only (HF's own pruning).
    assert sorted(os.listdir(tmp_path)) == [os.path.basename(best)]


def test_other_callbacks_on_save_run_once_their_checkpoint_is_published(tmp_path: Path) -> None:
    """on_save of another callback sees checkpoint-{global_step} complete, once per checkpoint."""
    from transformers import TrainerCallback

    seen: list[tuple[int, bool]] = []

    class Record(TrainerCallback):  # type: ignore[misc]
        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            seen.append((state.global_step, (ckpt / "trainer_state.json").is_file()))

    trainer = hf_trainer(str(tmp_path), callbacks=[AsyncSaveCallback(), Record()])
    trainer.train()
    assert seen == [(2, True), (4, True), (6, True)]
    assert trainer.state.global_step == 6


def test_distributed_and_best_are_refused(tmp_path: Path) -> None:
    """save_strategy='best' is refused with a message naming what to use instead."""
    from transformers import TrainingArguments

    trainer = hf_trainer(str(tmp_path), callbacks=[AsyncSaveCallback()])
    trainer.args = TrainingArguments(str(tmp_path), save_strategy="best", eval_strategy="steps",
                                     metric_for_best_model="loss", report_to=[], use_cpu=True,
                                     max_steps=2)
    with pytest.raises(ValueError, match="save_strategy='steps'"):
        AsyncSaveCallback(trainer=trainer).on_train_begin(trainer.args, trainer.state, trainer.control)


def test_arguments_are_checked() -> None:
    """Wrong argument types fail at construction, before any training."""
    with pytest.raises(TypeError, match="max_shard_size"):
        AsyncSaveCallback(max_shard_size=1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="on_committed"):
        AsyncSaveCallback(on_committed="print")  # type: ignore[arg-type]
