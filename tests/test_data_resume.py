"""Exact resume of the training loader: from every step of an epoch, with 1, 2 and 3 workers, the rest of the
run's batches (keys and pixels) are the uninterrupted run's, through the epoch's merged tails and repeats and
across the epoch boundary; a resumed worker opens no shard it had drained."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest
import torch

from mmscale.config import DataConfig, ImagePreprocess
from mmscale.data import build_train_loader
from mmscale.data import shards as shards_mod
from mmscale.data.stream import worker_shards
from tests.test_data_shards import MEAN, STD, ids_tokenizer, make_shards, write_manifest

B = 4
SIZES = [5, 3, 7, 4, 3, 6, 5]  # 33 samples: every worker count leaves tails to merge
pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")  # 3 workers, 2 cores


def cut_after(path: str, n: int) -> None:
    """Truncate a shard in the middle of sample `n`'s image: it delivers `n` samples, then fails."""
    with tarfile.open(path) as tar:
        member = [m for m in tar if m.name.endswith(".jpg")][n]
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: member.offset_data + member.size // 2])


def make_data(root: Path, damaged: bool) -> None:
    paths = make_shards(root, SIZES)
    write_manifest(root, paths)
    if damaged:
        cut_after(paths[2], 1)  # the manifest still says 7: 6 lost, the epoch ends in a part- and a whole repeat batch


def loader_for(root: Path, workers: int, remainder: str, **cfg):
    data = DataConfig(train=str(root), workers=workers, shuffle_buffer=5, remainder=remainder, **cfg)
    return build_train_loader(data, batch_size=B, rank=0, world_size=1, seed=3, preprocess=ImagePreprocess(8, MEAN, STD),
                              tokenizer=ids_tokenizer, max_length=8)


def take(loader, n: int) -> list[tuple[list[str], torch.Tensor]]:
    """The next `n` batches, across epoch boundaries (each `iter()` is one epoch)."""
    out: list[tuple[list[str], torch.Tensor]] = []
    while len(out) < n:
        before = len(out)
        for batch in loader:
            out.append((list(batch["key"]), batch["image"].clone()))
            if len(out) == n:
                break
        assert len(out) > before, "the loader yielded nothing"
    return out


def uninterrupted(loader, epochs: int) -> tuple[list, list[dict]]:
    batches, states = [], []
    for _ in range(epochs):
        for batch in loader:
            batches.append((list(batch["key"]), batch["image"].clone()))
            states.append(loader.state_dict())
    return batches, states


def assert_same(got: list, want: list, where: str) -> None:
    assert [k for k, _ in got] == [k for k, _ in want], where
    for i, ((_, a), (_, b)) in enumerate(zip(got, want)):
        assert torch.equal(a, b), f"{where}: pixels of batch {i} differ"


@pytest.mark.parametrize(("case", "workers"), [("pad", 1), ("pad", 2), ("pad", 3), ("damaged", 2), ("damaged", 3)])
def test_resume_from_every_step_continues_the_same_batches(tmp_path, workers, case):
    make_data(tmp_path, damaged=case == "damaged")
    remainder = "pad" if case == "pad" else "drop"
    reference = loader_for(tmp_path, workers, remainder)
    per_epoch = reference.batches_per_epoch
    batches, states = uninterrupted(reference, epochs=2)
    assert len(batches) == 2 * per_epoch
    if case == "damaged":
        assert reference.bad_samples == {"truncated_tar": 12} and reference.padded_samples == 10
    for k in [*range(1, per_epoch + 1), per_epoch + 2]:
        resumed = loader_for(tmp_path, workers, remainder)
        resumed.load_state_dict(states[k - 1])
        # The rest of the epoch; from the last three cuts, on through the next epoch to its end.
        end = 2 * per_epoch if k >= per_epoch - 1 else per_epoch
        assert_same(take(resumed, end - k), batches[k:end], f"{workers} workers, resumed after batch {k}")
        if end == 2 * per_epoch:
            assert resumed.padded_samples == reference.padded_samples
            assert resumed.bad_samples == reference.bad_samples and resumed.bad_shards == reference.bad_shards


def test_each_sample_once_across_the_cut(tmp_path):
    make_data(tmp_path, damaged=False)
    reference = loader_for(tmp_path, 2, "drop")
    batches, states = uninterrupted(reference, epochs=1)
    for k in range(1, len(batches)):
        resumed = loader_for(tmp_path, 2, "drop")
        resumed.load_state_dict(states[k - 1])
        flat = [key for keys, _ in batches[:k] + take(resumed, len(batches) - k) for key in keys]
        assert len(flat) == len(set(flat)) == 32  # 8 batches of 4 from 33 samples, none twice


def test_resume_opens_no_drained_shard(tmp_path, monkeypatch):
    """Whole shards a worker had finished are skipped without opening them."""
    paths = make_shards(tmp_path, [12] * 8)
    write_manifest(tmp_path, paths)
    opens = tmp_path / "opens.log"
    real = shards_mod.gopen

    def counting(url, *args, **kwargs):  # a file, so that dataloader workers (forked) count too
        with open(opens, "a") as f:
            f.write(url + "\n")
        return real(url, *args, **kwargs)

    monkeypatch.setattr(shards_mod, "gopen", counting)
    reference = loader_for(tmp_path, 2, "drop", prefetch_factor=1)
    batches, states = uninterrupted(reference, epochs=1)
    k = 17  # 68 of 96 samples handed out: each worker is well into its fourth shard
    opens.unlink()
    resumed = loader_for(tmp_path, 2, "drop", prefetch_factor=1)
    resumed.load_state_dict(states[k - 1])
    assert_same(take(resumed, len(batches) - k), batches[k:], "resumed after batch 17")
    opened = opens.read_text().split()

    drained, reread = [], []
    spec = resumed.spec
    for w, record in states[k - 1]["progress"]["workers"].items():
        urls = worker_shards(spec, worker=int(w), epoch=0, round_=0)
        held = {s for s, _ in record["state"]["buffer"]}
        current = record["state"]["shard"]
        drained += [u for i, u in enumerate(urls[:current]) if i not in held]
        reread += [u for i, u in enumerate(urls[:current]) if i in held]
    assert len(drained) >= 4, drained  # most of what was read is behind the workers
    assert not set(drained) & set(opened), "a drained shard was opened again"
    assert len(opened) == len(set(opened))  # and nothing twice
    # What is opened: the shards the buffers still hold samples of, the current ones, and those ahead.
    assert set(reread) <= set(opened) and len(opened) == 8 - len(drained)
