"""Speed and memory of the composition engine vs a plain forward of theta_0.

    python benchmarks/compose.py --quick --out benchmarks/results/compose_quick.json   # tiny CLIP, batch 64, T = 7
    python benchmarks/compose.py --out benchmarks/results/compose_full.json            # + ViT-B/32 (random weights), batch 8/64

Writes a JSON list of records ``{model, method, rank, batch, n_tasks, forward_ms, forward_backward_ms, peak_mem_mb,
forward_ratio_to_plain, ...}``. Times are medians over repeats after warm-up; ``peak_mem_mb`` is the peak of
tensor memory allocated during one forward+backward (parameters excluded), measured by torch's MemTracker, so it
means the same on CPU and GPU. Backward is w.r.t. the coefficients (w.r.t. the input for ``plain``). Ratios are
to the plain forward measured in the same run on the same device.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

from pyro_tvc.backbones import TINY_MODEL, create_clip, image_encoder
from pyro_tvc.compose.engine import Composer
from pyro_tvc.task_vectors import TaskVector, TaskVectorBank
from pyro_tvc.runtime import write_json


def random_bank(encoder: torch.nn.Module, n_tasks: int, seed: int = 0) -> TaskVectorBank:
    """Task vectors of realistic relative size (1e-2 of each tensor's scale); values do not affect speed."""
    gen = torch.Generator().manual_seed(seed)
    vectors = []
    for t in range(n_tasks):
        params = {k: 1e-2 * (v.detach().std() + 1e-3) * torch.randn(v.shape, generator=gen)
                  for k, v in encoder.named_parameters()}
        vectors.append(TaskVector(params, {"task": f"task{t}"}))
    return TaskVectorBank.from_vectors(vectors)


def timed(fn, repeats: int, device: torch.device) -> float:
    """Median milliseconds of ``fn()`` after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times)


class PeakTensorMemory(TorchDispatchMode):
    """Peak bytes of tensor storages created inside the block and still alive (views counted once).

    Works the same on every device (the CPU allocator has no peak statistics), autograd's saved tensors and
    backward temporaries included, because every storage is created by some dispatched op.
    """

    def __init__(self):
        super().__init__()
        self.live = WeakIdKeyDictionary()
        self.current = 0
        self.peak = 0

    def _release(self, nbytes: int) -> None:
        self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # Views and in-place ops return storages of their inputs: not new memory (and possibly created before the block).
        inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                if storage._cdata not in inputs and storage not in self.live:
                    nbytes = storage.nbytes()
                    self.live[storage] = nbytes
                    self.current += nbytes
                    weakref.finalize(storage, self._release, nbytes)
                    self.peak = max(self.peak, self.current)
        return out


def peak_memory_mb(fn) -> float:
    with PeakTensorMemory() as tracker:
        fn()
    return tracker.peak / 2**20


def bench_model(model_name: str, batches: list[int], n_tasks: int, methods: list[tuple[str, int | None]],
                device: torch.device, repeats: int, skip) -> list[dict]:
    torch.manual_seed(0)
    encoder = image_encoder(create_clip(model_name)).to(device).requires_grad_(False)
    bank = random_bank(encoder, n_tasks)
    size = encoder.image_size[0]
    records = []
    for batch in batches:
        x = torch.randn(batch, 3, size, size, device=device)
        with torch.no_grad():
            plain_fwd = timed(lambda: encoder(x), repeats, device)

        def plain_fb():
            xi = x.detach().requires_grad_()
            encoder(xi).sum().backward()

        plain_fb_ms = timed(plain_fb, repeats, device)
        plain_mem = peak_memory_mb(plain_fb)
        base = {"model": model_name, "batch": batch, "n_tasks": n_tasks, "device": str(device)}
        records.append({**base, "method": "plain", "rank": None, "forward_ms": plain_fwd,
                        "forward_backward_ms": plain_fb_ms, "peak_mem_mb": plain_mem,
                        "forward_ratio_to_plain": 1.0, "forward_backward_ratio_to_plain": 1.0, "mem_ratio_to_plain": 1.0})
        for method, rank in methods:
            label = "lowrank" if rank is not None else method
            reason = skip(model_name, method, batch)
            if reason:
                records.append({**base, "method": label, "rank": rank, "skipped": reason})
                continue
            composer = Composer(encoder, bank, method=method, rank=rank).to(device)
            T, B = composer.coefficient_shape
            lam = 0.3 * torch.randn(batch, T, B, device=device)
            reps = max(2, repeats // 4) if method == "naive" else repeats
            with torch.no_grad():
                fwd = timed(lambda: composer(x, lam), reps, device)

            def fb():
                li = lam.detach().requires_grad_()
                composer(x, li).sum().backward()

            fb_ms = timed(fb, reps, device)
            mem = peak_memory_mb(fb)
            records.append({**base, "method": label, "rank": rank, "forward_ms": fwd, "forward_backward_ms": fb_ms,
                            "peak_mem_mb": mem, "forward_ratio_to_plain": fwd / plain_fwd,
                            "forward_backward_ratio_to_plain": fb_ms / plain_fb_ms, "mem_ratio_to_plain": mem / plain_mem})
            print(f"{model_name:>14} b={batch:<3} {label:>9} r={rank!s:>4}: fwd {fwd:8.1f} ms ({fwd / plain_fwd:5.2f}x)"
                  f"  fwd+bwd {fb_ms:8.1f} ms ({fb_ms / plain_fb_ms:5.2f}x)  peak {mem:7.1f} MB ({mem / plain_mem:4.2f}x)",
                  file=sys.stderr)
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model, batch 64 only (about a minute on 2 cores)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/compose.json"))
    parser.add_argument("--device", default="cpu", help="cpu | cuda")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    methods = [("naive", None), ("reference", None), ("fast", None), ("fast", 4), ("fast", 16), ("fast", 64)]

    def skip(model, method, batch):
        if model != TINY_MODEL and method in ("reference", "naive") and batch * 88e6 * 4 > 8e9:
            return "keeps N per-sample copies of theta for backward: > 8 GB at this batch (22 GB at 64)"
        return None

    records = bench_model(TINY_MODEL, [64] if args.quick else [8, 64], 7, methods, device, args.repeats, skip)
    if not args.quick:
        records += bench_model("ViT-B-32", [8, 64], 7, methods, device, max(3, args.repeats // 3), skip)
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.processor() or
            platform.machine(), "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None}
    for r in records:
        r.update(meta)
    write_json(args.out, records)  # atomic, creates the folder
    print(f"wrote {len(records)} records to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
