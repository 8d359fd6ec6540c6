"""TorchauxCheckpointIO with the real Lightning Trainer and Fabric (tiny model on CPU)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

try:
    import lightning.pytorch as pl
    from lightning.fabric import Fabric
except ImportError:  # the standalone packages work the same
    pl = pytest.importorskip(
        "pytorch_lightning", reason="neither lightning nor pytorch_lightning installed: "
        "pip install 'torchaux[lightning]'")
    from lightning_fabric import Fabric

from sinks import BLOCKED_S, FailingSink, GatedSink, background, still_running  # noqa: E402
from torchaux import AsyncSaver  # noqa: E402
from torchaux.integrations.lightning import TorchauxCheckpointIO  # noqa: E402


class Tiny(pl.LightningModule):  # type: ignore[misc,name-defined]
    """Linear regression on fixed data; deterministic step by step."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(0)
        self.net = torch.nn.Linear(width, width)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=0.01)

    def train_dataloader(self) -> torch.utils.data.DataLoader:  # type: ignore[type-arg]
        g = torch.Generator().manual_seed(1)
        x = torch.randn(64, self.hparams.width, generator=g)
        # One batch per epoch: every checkpoint is at an epoch boundary, where a
        # plain (not resumable) DataLoader restarts exactly.
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, 2 * x), batch_size=64)


def _trainer(root: Path, max_steps: int, plugins: list[Any], every: int = 2) -> Any:
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=root, every_n_train_steps=every, save_top_k=-1,
                                        filename="{step}")
    return pl.Trainer(max_steps=max_steps, plugins=plugins, callbacks=[ckpt], accelerator="cpu",
                      logger=False, enable_progress_bar=False, enable_model_summary=False)


def test_fit_resume_gives_the_same_weights(tmp_path: Path) -> None:
    """ModelCheckpoint every 2 steps through torchaux; resuming from step 4 equals the uninterrupted run."""
    full = Tiny()
    _trainer(tmp_path / "a", 8, [TorchauxCheckpointIO()]).fit(full)
    assert sorted(os.listdir(tmp_path / "a")) == [f"step={s}.ckpt" for s in (2, 4, 6, 8)]
    resumed = Tiny()
    _trainer(tmp_path / "b", 8, [TorchauxCheckpointIO()]).fit(
        resumed, ckpt_path=str(tmp_path / "a" / "step=4.ckpt"))
    assert torch.equal(full.net.weight, resumed.net.weight)
    assert torch.equal(full.net.bias, resumed.net.bias)


def test_files_are_plain_lightning_checkpoints(tmp_path: Path) -> None:
    """Without torchaux: load_from_checkpoint and fit(ckpt_path=) with Lightning's own CheckpointIO."""
    model = Tiny()
    _trainer(tmp_path / "a", 4, [TorchauxCheckpointIO()]).fit(model)
    path = tmp_path / "a" / "step=4.ckpt"
    loaded = Tiny.load_from_checkpoint(str(path))
    assert torch.equal(loaded.net.weight, model.net.weight)
    raw = torch.load(path, weights_only=False)
    assert raw["global_step"] == 4 and "optimizer_states" in raw
    again = Tiny()
    _trainer(tmp_path / "b", 6, []).fit(again, ckpt_path=str(path))  # stock TorchCheckpointIO
    assert again.trainer.global_step == 6


def test_failing_write_surfaces_in_fit(tmp_path: Path) -> None:
    """A failed background write is raised out of fit, as the original exception."""
    sink = FailingSink(fail_after=10)
    saver = AsyncSaver(sink=sink)
    with pytest.raises(OSError) as info:
        _trainer(tmp_path, 4, [TorchauxCheckpointIO(saver=saver)]).fit(Tiny())
    assert info.value is sink.raised[0]
    assert not (tmp_path / "step=2.ckpt").exists()
    saver.close()


def test_teardown_raises_a_failure_of_the_last_save(tmp_path: Path) -> None:
    """The only save fails: teardown (end of fit) raises it."""
    sink = FailingSink(fail_after=10)
    saver = AsyncSaver(sink=sink)
    with pytest.raises(OSError) as info:
        _trainer(tmp_path, 2, [TorchauxCheckpointIO(saver=saver)]).fit(Tiny())
    assert info.value is sink.raised[0]
    saver.close()


def test_load_and_remove_wait_for_the_pending_save(tmp_path: Path) -> None:
    """load_checkpoint / remove_checkpoint of a path being written block until it is durable."""
    gate = GatedSink()
    saver = AsyncSaver(sink=gate)
    io = TorchauxCheckpointIO(saver=saver)
    path = str(tmp_path / "x.ckpt")
    state = {"w": torch.ones(3)}
    io.save_checkpoint(state, path)
    state["w"].zero_()  # the snapshot was taken at the call
    assert gate.entered.wait(10)
    loading = background(io.load_checkpoint, path)
    assert still_running(loading, BLOCKED_S)
    gate.release()
    assert torch.equal(loading.result(10)["w"], torch.ones(3))
    gate2 = GatedSink()
    io2 = TorchauxCheckpointIO(saver=AsyncSaver(sink=gate2))
    io2.save_checkpoint({"w": torch.ones(1)}, path)
    assert gate2.entered.wait(10)
    removing = background(io2.remove_checkpoint, path)
    assert still_running(removing, BLOCKED_S)
    gate2.release()
    removing.result(10)
    assert not os.path.exists(path)
    io.teardown(), io2.teardown()
    saver.close()


def test_on_committed_fires_only_once_durable(tmp_path: Path) -> None:
    """on_committed(path) runs after the file is in place, never before; its failure is raised later."""
    seen: list[tuple[str, bool]] = []
    gate = GatedSink()
    io = TorchauxCheckpointIO(saver=AsyncSaver(sink=gate),
                              on_committed=lambda p: seen.append((p, os.path.isfile(p))))
    path = str(tmp_path / "c.ckpt")
    io.save_checkpoint({"w": torch.ones(2)}, path)
    assert gate.entered.wait(10) and seen == []
    gate.release()
    io.teardown()
    assert seen == [(os.path.realpath(path), True)]

    def broken(p: str) -> None:
        raise RuntimeError("uploader down")

    io2 = TorchauxCheckpointIO(on_committed=broken)
    io2.save_checkpoint({"w": torch.ones(2)}, str(tmp_path / "d.ckpt"))
    with pytest.raises(RuntimeError, match="uploader down"):
        io2.teardown()
    io2.teardown()  # reported once


def test_encrypted_and_crc_round_trip(tmp_path: Path) -> None:
    """enc_key/crc_check files load through the plugin; a wrong key is refused."""
    import torchaux

    path = str(tmp_path / "e.ckpt")
    io = TorchauxCheckpointIO(enc_key=bytes(range(32)), crc_check=True, async_save=False)
    io.save_checkpoint({"state_dict": {"w": torch.arange(4.0)}, "epoch": 1}, path)
    assert io.load_checkpoint(path)["state_dict"]["w"].tolist() == [0.0, 1.0, 2.0, 3.0]
    with pytest.raises(torchaux.DecryptionError):
        TorchauxCheckpointIO(enc_key=bytes(32)).load_checkpoint(path)


def test_bad_arguments_and_remote_paths(tmp_path: Path) -> None:
    """Arguments are checked at construction; remote URLs and storage_options get a clear error."""
    with pytest.raises(TypeError, match="async_save"):
        TorchauxCheckpointIO(async_save="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        TorchauxCheckpointIO(enc_key=b"short")
    with pytest.raises(TypeError, match="storage_options"):
        TorchauxCheckpointIO(storage_options="anon")  # type: ignore[arg-type]
    io = TorchauxCheckpointIO()
    with pytest.raises(ValueError, match="not supported"):
        io.save_checkpoint({}, "gs://bucket/x.ckpt")
    with pytest.raises(TypeError, match="storage_options"):
        io.save_checkpoint({}, str(tmp_path / "x.ckpt"), storage_options={"anon": True})


@pytest.mark.parametrize("enc_key", [None, bytes(range(32))], ids=["plain", "encrypted"])
def test_s3_urls_with_storage_options(s3_bucket: Any, enc_key: bytes | None) -> None:
    """s3:// paths on a local S3 server: save, wait-then-load, remove; options per call or once."""
    state = {"state_dict": {"w": torch.arange(6.0)}, "global_step": 7}
    url = s3_bucket.url("run/step=7.ckpt")
    io = TorchauxCheckpointIO(enc_key=enc_key, storage_options=s3_bucket.storage_options)
    io.save_checkpoint(state, url)
    loaded = io.load_checkpoint(url)  # waits for the pending upload
    assert loaded["global_step"] == 7 and torch.equal(loaded["state_dict"]["w"], state["state_dict"]["w"])
    assert s3_bucket.keys() == ["run/step=7.ckpt"]
    if enc_key is None:  # a plain Lightning checkpoint: torch.load reads the object as it is
        with s3_bucket.fs.open(f"{s3_bucket.name}/run/step=7.ckpt", "rb") as f:
            assert torch.load(f, weights_only=False)["global_step"] == 7
    io.remove_checkpoint(url)
    assert s3_bucket.keys() == []
    # per-call options, no default: the same round trip
    other = TorchauxCheckpointIO(enc_key=enc_key)
    other.save_checkpoint(state, url, storage_options=s3_bucket.storage_options)
    other.teardown()
    assert io.load_checkpoint(url)["global_step"] == 7
    io.teardown()


def test_pytorch_lightning_and_fabric(tmp_path: Path) -> None:
    """The same plugin is accepted by pytorch_lightning's Trainer and by Fabric (save/load)."""
    fabric = Fabric(accelerator="cpu", devices=1, plugins=[TorchauxCheckpointIO()])
    model = torch.nn.Linear(4, 4)
    path = str(tmp_path / "fabric.ckpt")
    fabric.save(path, {"model": model, "step": 3})
    fresh = torch.nn.Linear(4, 4)
    rest = fabric.load(path, {"model": fresh})
    assert rest == {"step": 3} and torch.equal(fresh.weight, model.weight)
    ptl = pytest.importorskip("pytorch_lightning", reason="pytorch_lightning not installed")
    trainer = ptl.Trainer(plugins=[TorchauxCheckpointIO()], accelerator="cpu", logger=False)
    assert isinstance(trainer.strategy.checkpoint_io, TorchauxCheckpointIO)
