"""Hard-negative mining at 10k and 40k samples on 1 and 2 ranks, beside sentence-transformers' mine_hard_negatives.

The embeddings are synthetic (images in clusters, a caption its image plus noise), with duplicates
as real data has them: every 50th sample repeats the previous caption, and 1% of the corpus shares
one caption (one large duplicate group, which made the old search retrieve range_max + 1% of the
corpus per query, as sentence-transformers still does). Per rank (gloo processes on this machine,
one thread each) it measures, phase by phase:

* corpus: hashing keys and captions, gathering the hashes, duplicate groups;
* mine: the distributed search and the selection (`retrieval.mining.mine_hard_negatives`);
* keys: fetching the chosen negatives' keys from their owners;
* shards: writing the groups as WebDataset shards (`retrieval.groups.write_group_shards`) from
  corpus shards of small JPEGs, the images exchanged in rounds of `--round-mb`;

time and peak RSS above the process's RSS at the phase's start (sampled every 5 ms). Then
sentence-transformers 6's `mine_hard_negatives` mines the same caption -> image score matrix in
one process (its "model" is a lookup table of these embeddings, `tools/st_reference.py`), with the
same settings and the same query block, and the share of queries whose negatives are identical is
reported. Prints a table and writes JSON (default bench_results/mining.json).

    python tools/bench_mining.py --sizes 10000 40000 --ranks 1 2
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

SETTINGS = {"range_min": 0, "range_max": 100, "num_negatives": 7, "relative_margin": 0.05, "sampling_strategy": "top"}


class PeakRSS:
    """Peak resident memory of this process above its level at `start`, sampled by a thread."""

    def __init__(self) -> None:
        import psutil

        self.process = psutil.Process()
        self.base = self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakRSS:
        self.base = self.peak = self.process.memory_info().rss
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self.t0, self.cpu0 = time.perf_counter(), time.process_time()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.t0
        self.cpu_seconds = time.process_time() - self.cpu0  # less disturbed than wall time by other jobs
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)

    @property
    def mb(self) -> float:
        return (self.peak - self.base) / 2**20


def make_corpus(n: int, dim: int, per_shard: int = 1000, seed: int = 0):
    """(image_emb, text_emb, keys, captions) with duplicate captions (every 50th, and one group of n/100).

    Keys are the ones `ShardWriter` gives sample i of shards of `per_shard` samples.
    """
    from mmscale.data.writer import KEY_WIDTH, key_digits

    g = torch.Generator().manual_seed(seed)
    # Images in clusters of about 20 (the hard negatives), captions their noisy copies: text -> image
    # Recall@1 about 0.38 and Recall@10 about 0.81, as a trained CLIP model at this scale.
    centers = F.normalize(torch.randn(max(n // 20, 1), dim, generator=g), dim=-1)
    cluster = torch.randint(0, centers.shape[0], (n,), generator=g)
    images = F.normalize(centers[cluster] + 0.5 * torch.randn(n, dim, generator=g) / dim**0.5, dim=-1)
    texts = F.normalize(images + 4.0 * torch.randn(n, dim, generator=g) / dim**0.5, dim=-1)
    digits = key_digits(per_shard)
    keys = [f"{(i // per_shard) * 10**digits + i % per_shard:0{KEY_WIDTH}d}" for i in range(n)]
    captions = [f"caption {i}" for i in range(n)]
    for i in range(50, n, 50):
        captions[i], texts[i] = captions[i - 1], texts[i - 1]
    big = torch.arange(7, n, 100)[: max(2, n // 100)]  # spread over every rank's part
    for i in big.tolist():
        captions[i], texts[i] = "a photo", texts[int(big[0])]
    return images, texts, keys, captions


def write_corpus_shards(root: Path, keys: list[str], captions: list[str], size: int, per_shard: int) -> int:
    """Corpus shards of random `size`-px JPEGs (the images' content does not matter here); returns their bytes."""
    from PIL import Image

    from mmscale.data.writer import ShardWriter, write_stats

    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    total = 0
    writer = ShardWriter(root, per_shard)
    with writer:
        for key, caption in zip(keys, captions):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
            total += buf.tell()
            if writer.write({"jpg": buf.getvalue(), "txt": caption.encode()}) != key:
                raise AssertionError("corpus keys must be the writer's")
    write_stats(root, writer.shards)
    return total


def _worker(rank: int, world: int, port: int, spec: dict, queue) -> None:
    import torch.distributed as dist

    from mmscale.retrieval.corpus import build_corpus
    from mmscale.retrieval.groups import write_group_shards
    from mmscale.retrieval.mining import group_to_record, mine_hard_negatives

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    images, texts, keys, captions = make_corpus(spec["n"], spec["dim"], spec["per_shard"])
    if spec["shards"]:
        # The eval loader's split: rank r reads shards r, r + W, ...; its samples in that order.
        per = spec["per_shard"]
        own = [i for s in range(rank, -(-spec["n"] // per), world) for i in range(s * per, min((s + 1) * per, spec["n"]))]
    else:
        lo, hi = rank * spec["n"] // world, (rank + 1) * spec["n"] // world
        own = list(range(lo, hi))
    images, texts = images[own].contiguous(), texts[own].contiguous()
    keys, captions = [keys[i] for i in own], [captions[i] for i in own]
    phases = {}
    dist.barrier()
    with PeakRSS() as m:
        corpus = build_corpus(images, texts, keys, captions)
    phases["corpus"] = (m.seconds, m.mb, m.cpu_seconds)
    dist.barrier()
    with PeakRSS() as m:
        groups, summary = mine_hard_negatives(texts, corpus.images, corpus.local_indices, duplicate_of=corpus.groups,
                                              item_ids=corpus.item_ids, block_size=spec["block"], **SETTINGS)  # fmt: skip
    phases["mine"] = (m.seconds, m.mb, m.cpu_seconds)
    dist.barrier()
    with PeakRSS() as m:
        wanted = torch.tensor(sorted({i for g in groups for i in g.negative_idx}), dtype=torch.long)
        key_of = dict(zip(wanted.tolist(), corpus.fetch_strings(keys, wanted)))
        key_of.update(zip(corpus.local_indices.tolist(), keys))
        records = [group_to_record(g, key_of, keys[g.query_idx], captions[g.query_idx]) for g in groups]
    phases["keys"] = (m.seconds, m.mb, m.cpu_seconds)
    stats = {}
    if spec["shards"]:
        dist.barrier()
        with PeakRSS() as m:
            stats = write_group_shards(Path(spec["out"]), groups, records, corpus, spec["corpus_urls"],
                                       groups_per_shard=1000, round_bytes=spec["round_bytes"])  # fmt: skip
        phases["shards"] = (m.seconds, m.mb, m.cpu_seconds)
    negatives = {r["query_key"]: r["negative_keys"] for r in records}
    queue.put((rank, phases, summary, stats.get("exchange"), stats.get("total_bytes"), negatives))
    dist.barrier()
    dist.destroy_process_group()


def run_ranks(n: int, world: int, args, corpus_urls: str | None, work: Path) -> dict:
    import torch.multiprocessing as mp

    from mmscale.distributed import free_port

    out = work / f"groups_{n}_{world}"
    spec = {"n": n, "dim": args.dim, "block": args.block_size, "shards": corpus_urls is not None,
            "corpus_urls": corpus_urls, "per_shard": args.per_shard, "out": str(out),
            "round_bytes": int(args.round_mb * 2**20)}  # fmt: skip
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, spec, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results = sorted((queue.get(timeout=3600) for _ in procs), key=lambda r: r[0])
    for p in procs:
        p.join(timeout=120)
        if p.exitcode != 0:
            raise RuntimeError(f"rank exited with {p.exitcode}")
    phases = {name: {"seconds": max(r[1][name][0] for r in results), "peak_mb_per_rank": max(r[1][name][1] for r in results),
                     "cpu_seconds_per_rank": max(r[1][name][2] for r in results)}
              for name in results[0][1]}  # fmt: skip
    negatives = {k: v for r in results for k, v in r[5].items()}
    summary = results[0][2]
    return {
        "phases": phases,
        "negatives": negatives,
        "exchange": results[0][3],
        "group_shard_bytes": results[0][4],
        "groups_full": summary["groups_with_all_negatives"],
        "duplicates_excluded": summary["duplicates_excluded"],
    }


def run_st(n: int, args) -> dict:
    from tools.st_reference import st_mine

    images, texts, keys, captions = make_corpus(n, args.dim, args.per_shard)
    settings = {k: v for k, v in SETTINGS.items()}
    with PeakRSS() as m:
        mined = st_mine(texts, images, captions, keys, faiss_batch_size=args.block_size, **settings)
    return {"seconds": m.seconds, "cpu_seconds": m.cpu_seconds, "peak_mb": m.mb,
            "negatives": {pos: negs for (_, pos), negs in mined.items()}}


def agreement(ours: dict, reference: dict) -> dict:
    """Share of queries with the same negatives; the others split by why they differ.

    `beyond_range_max`: ours is a strict prefix of the reference's, which is longer: margins left
    fewer than num_negatives among the range_max candidates, and sentence-transformers, which
    retrieves range_max + max_positives (the largest duplicate group) before dropping positives,
    took the rest from ranks beyond range_max.
    """
    same = beyond = other = 0
    for key in set(ours) | set(reference):
        a, b = ours.get(key, []), reference.get(key, [])
        if a == b:
            same += bool(a)
        elif len(a) < len(b) and b[: len(a)] == a:
            beyond += 1
        else:
            other += 1
    total = max(same + beyond + other, 1)
    return {"same": same / total, "beyond_range_max": beyond / total, "other": other / total, "queries": total}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10000, 40000])
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--block-size", type=int, default=4096, help="query (and corpus) block of both searches")
    p.add_argument("--image-size", type=int, default=32, help="px of the corpus JPEGs for the group-shard phase")
    p.add_argument("--per-shard", type=int, default=1000)
    p.add_argument("--round-mb", type=float, default=16.0, help="bytes per exchange round (per rank), MiB")
    p.add_argument("--skip-st", action="store_true")
    p.add_argument("--skip-shards", action="store_true")
    p.add_argument("--output", default=str(Path(__file__).resolve().parents[1] / "bench_results" / "mining.json"))
    args = p.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.set_num_threads(1)
    rows, result = [], {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                        "torch": torch.__version__, "settings": SETTINGS, "dim": args.dim,
                        "block_size": args.block_size, "runs": []}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for n in args.sizes:
            _, _, keys, captions = make_corpus(n, args.dim, args.per_shard)  # the shards' keys and captions
            urls, corpus_bytes = None, 0
            if not args.skip_shards:
                corpus_bytes = write_corpus_shards(work / f"corpus_{n}", keys, captions, args.image_size, args.per_shard)
                urls = str(work / f"corpus_{n}")
            ours = {}
            for world in args.ranks:
                run = run_ranks(n, world, args, urls, work)
                ours[world] = run["negatives"]
                entry = {"n": n, "ranks": world, "corpus_image_bytes": corpus_bytes,
                         **{k: v for k, v in run.items() if k != "negatives"}}  # fmt: skip
                if world != args.ranks[0]:
                    entry["same_negatives_as_1_rank"] = agreement(run["negatives"], ours[args.ranks[0]])
                result["runs"].append(entry)
                rows.append(entry)
                print(_row(entry), flush=True)
            if not args.skip_st:
                st = run_st(n, args)
                entry = {"n": n, "ranks": "st", "seconds": st["seconds"], "cpu_seconds": st["cpu_seconds"], "peak_mb": st["peak_mb"],
                         "same_negatives_as_mmscale": agreement(ours[args.ranks[0]], st["negatives"])}  # fmt: skip
                result["runs"].append(entry)
                print(_row(entry), flush=True)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


def _row(e: dict) -> str:
    if e["ranks"] == "st":
        a = e["same_negatives_as_mmscale"]
        return (f"N={e['n']:>6} sentence-transformers (1 process): {e['seconds']:.1f} s ({e['cpu_seconds']:.1f} s CPU), "
                f"peak +{e['peak_mb']:.0f} MB; "
                f"same negatives as mmscale for {a['same']:.3f} of {a['queries']} queries, "
                f"{a['beyond_range_max']:.3f} differ by candidates beyond range_max, {a['other']:.3f} otherwise")
    parts = ", ".join(f"{k} {v['seconds']:.1f} s ({v['cpu_seconds_per_rank']:.1f} s CPU) +{v['peak_mb_per_rank']:.0f} MB"
                      for k, v in e["phases"].items())
    text = f"N={e['n']:>6} ranks={e['ranks']}: {parts} (per rank: slowest, largest)"
    if "same_negatives_as_1_rank" in e:
        text += f"; same negatives as 1 rank: {e['same_negatives_as_1_rank']['same']:.3f}"
    return text


if __name__ == "__main__":
    sys.exit(main())
