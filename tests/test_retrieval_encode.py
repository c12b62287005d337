"""The one encoder: lockstep forwards under ZeRO-3, embeddings kept on the device, parts joined in rank order,
a progress total from the shard manifests."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from mmscale.data.writer import ShardWriter, write_stats
from mmscale.distributed import free_port
from mmscale.retrieval.encode import _progress_bar, encode_shards


class CountingModel(nn.Module):
    """Embeds sample i as a fixed vector of i; counts forwards (ZeRO-3 needs the same count on every rank)."""

    embed_dim = 4

    def __init__(self) -> None:
        super().__init__()
        self.forwards = 0

    def forward(self, pixel_values, input_ids, attention_mask, normalize=True):
        self.forwards += 1
        i = input_ids[:, :1].float()
        return {"image_emb": torch.cat([i + 1, 2 * i, torch.ones_like(i), -i], 1) * 3,
                "text_emb": torch.cat([i, torch.ones_like(i), i + 2, i * i], 1)}  # fmt: skip


def _batches(indices: list[int], size: int):
    for start in range(0, len(indices), size):
        part = indices[start : start + size]
        yield {
            "image": torch.zeros(len(part), 3, 2, 2, dtype=torch.uint8) + torch.tensor(part, dtype=torch.uint8).view(-1, 1, 1, 1),
            "input_ids": torch.tensor(part).view(-1, 1),
            "attention_mask": torch.ones(len(part), 1, dtype=torch.long),
            "key": [f"k{i:03d}" for i in part],
            "text": [f"t{i}" for i in part],
        }


def _expected(indices):
    out = CountingModel()(None, torch.tensor(indices).view(-1, 1), None)
    return (torch.nn.functional.normalize(out["image_emb"], dim=-1), torch.nn.functional.normalize(out["text_emb"], dim=-1))


def _worker(rank: int, world: int, port: int, out: str, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    mine = [list(range(0, 7)), list(range(7, 9))][rank]  # 4 batches of 2 on rank 0, 1 on rank 1
    model = CountingModel()
    enc = encode_shards(model, _batches(mine, 2), lockstep=True, keep_pixels=True, output=out, progress=False,
                        meta={"model": "counting"})  # fmt: skip
    queue.put((rank, model.forwards, enc.keys, enc.image_emb, enc.text_emb, enc.pixels, enc.meta))
    dist.barrier()
    dist.destroy_process_group()


def test_two_ranks_encode_in_lockstep_and_write_one_set_of_files_in_rank_order(tmp_path):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, str(tmp_path / "out"), queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted((queue.get(timeout=120) for _ in procs), key=lambda r: r[0])
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    (_, f0, keys0, img0, txt0, pix0, meta0), (_, f1, keys1, img1, txt1, pix1, meta1) = results
    assert f0 == f1 == 4  # rank 1 ran 3 throw-away forwards while rank 0 still had batches
    assert keys0 == [f"k{i:03d}" for i in range(7)] and keys1 == ["k007", "k008"]
    want_img, want_txt = _expected(list(range(9)))
    torch.testing.assert_close(torch.cat([img0, img1]), want_img)  # each rank keeps its own rows only
    torch.testing.assert_close(torch.cat([txt0, txt1]), want_txt)
    assert pix1.dtype == torch.uint8 and pix1[:, 0, 0, 0].tolist() == [7, 8]  # pixels as the loader gave them
    out = tmp_path / "out"
    assert (out / "keys.txt").read_text().split() == [f"k{i:03d}" for i in range(9)]
    np.testing.assert_allclose(np.load(out / "image_emb.npy"), want_img.numpy(), rtol=0, atol=1e-7)
    np.testing.assert_allclose(np.load(out / "text_emb.npy"), want_txt.numpy(), rtol=0, atol=1e-7)
    meta = json.loads((out / "meta.json").read_text())
    assert meta == meta0 == meta1 and meta["count"] == 9 and meta["ranks"] == 2 and meta["model"] == "counting"
    assert sorted(p.name for p in out.iterdir()) == ["image_emb.npy", "keys.txt", "meta.json", "text_emb.npy"]


def test_truncate_dim_keeps_the_renormalised_prefix():
    enc = encode_shards(CountingModel(), _batches([3, 5], 2), truncate_dim=2, progress=False)
    raw = CountingModel()(None, torch.tensor([[3], [5]]), None)["text_emb"][:, :2]
    torch.testing.assert_close(enc.text_emb, torch.nn.functional.normalize(raw, dim=-1))


def test_progress_total_comes_from_this_ranks_shards_manifest(tmp_path):
    with ShardWriter(tmp_path, 3) as writer:
        for i in range(8):  # shards of 3, 3, 2 samples
            writer.write({"txt": b"x", "jpg": bytes([i])})
    write_stats(tmp_path, writer.shards)
    urls = sorted(str(p) for p in tmp_path.glob("*.tar"))
    loader = SimpleNamespace(spec=SimpleNamespace(all_urls=urls))
    assert _progress_bar(loader, 0, 1).total == 8
    assert _progress_bar(loader, 0, 2).total == 5  # rank 0 reads shards 0 and 2
    (tmp_path / "stats.json").unlink()
    assert _progress_bar(loader, 0, 1).total is None  # no manifest: no scan just for a total
