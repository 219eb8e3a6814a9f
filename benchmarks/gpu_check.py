"""The GPU check of issue 15: fused Triton composition vs the PyTorch paths on ViT-B/32, in one run of <= 8 minutes.

    bash benchmarks/gpu_check.sh            # sets up the GPU image, then runs this file
    python benchmarks/gpu_check.py --out benchmarks/results/gpu_check.json

Sections of the JSON (written after each section, so a run cut short still leaves what it measured):

* ``env``: torch, Triton, GPU, TF32 setting;
* ``kernel_correctness``: the fused kernel vs an explicit per-sample ``F.linear`` (fp32, no TF32) on a ViT-B/32 MLP
  shape, outputs and gradients (x, coefficients); and the whole encoder, fused vs the PyTorch fast path;
* ``kernel_sweep``: one MLP layer (N = 64, L = 50, 768 -> 3072, C = 8): plain ``F.linear``, weight space (PyTorch),
  fused with 1, 2, 4 samples per program, and with tf32 / ieee dot precision; forward and forward+backward;
* ``dispatch``: the dispatcher's choice, predicted and measured times for every linear shape of ViT-B/32;
* ``compose``: plain / naive / reference / fast (PyTorch) / fused / low rank r = 4, 16 on ViT-B/32 (random weights),
  T = 8, batch 64 and 256: forward and forward+backward ms (median), peak memory (``torch.cuda.max_memory_allocated``
  above what was allocated before the call), ratios to plain;
* ``svi_step``: one VTVC SVI step vs one task-level step on the prepared tiny artefacts (when present), on CUDA.

Fails at once, with one line, when no CUDA device is present.
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from compose import timed  # noqa: E402  (median ms after a warm-up, synchronised on CUDA)

# The setting; module constants so that a CPU smoke run of this script's logic can shrink them.
MODEL = "ViT-B-32"
T_TASKS = 8
BATCHES = (64, 256)
TOKENS = 50  # ViT-B/32 at 224 px: 49 patches + the class token
CHECK_SHAPE = (8, TOKENS, 768, 3072)  # samples, tokens, in, out of the kernel correctness check
MLP_SHAPE = (64, TOKENS, 768, 3072)  # of the kernel sweep
LINEAR_SHAPES = [(768, 2304), (768, 768), (768, 3072), (3072, 768)]  # in_proj, out_proj, c_fc, c_proj


class Report:
    """The JSON document, rewritten after every section; and the time budget."""

    def __init__(self, out: Path, budget_s: float):
        self.out, self.doc, self.t0, self.budget_s = out, {}, time.perf_counter(), budget_s

    def left_s(self) -> float:
        return self.budget_s - (time.perf_counter() - self.t0)

    def put(self, key: str, value) -> None:
        from pyro_tvc.runtime import write_json

        self.doc[key] = value
        self.doc["elapsed_s"] = round(time.perf_counter() - self.t0, 1)
        write_json(self.out, self.doc)
        print(f"[{self.doc['elapsed_s']:6.1f} s] {key} done", file=sys.stderr, flush=True)


def peak_mb(fn) -> float:
    """Peak CUDA memory of ``fn()`` above what was allocated before it (MB)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def naive_layer(x3, w0, comps, coef):
    return torch.stack([F.linear(x3[i], w0 + torch.einsum("c,coi->oi", coef[i], comps)) for i in range(x3.shape[0])])


def kernel_correctness(device) -> dict:
    from pyro_tvc.compose.triton_linear import fused_composed_linear

    g = torch.Generator(device=device).manual_seed(0)
    (n, L, k, o), C = CHECK_SHAPE, T_TASKS
    x = torch.randn(n, L, k, device=device, generator=g).requires_grad_()
    w0 = torch.randn(o, k, device=device, generator=g) / k ** 0.5
    comps = 1e-2 * torch.randn(C, o, k, device=device, generator=g) / k ** 0.5
    coef = torch.randn(n, C, device=device, generator=g).requires_grad_()
    y = fused_composed_linear(x, w0, comps, coef)
    ref = naive_layer(x, w0, comps, coef)
    dy = torch.randn_like(ref)
    got = torch.autograd.grad(y, (x, coef), dy)
    exp = torch.autograd.grad(ref, (x, coef), dy)

    def rel(a, b):
        return ((a - b).abs().max() / b.abs().max()).item()

    return {"shape": [n, L, k, o, C], "tf32": torch.backends.cuda.matmul.allow_tf32,
            "out_rel_err": rel(y, ref), "dx_rel_err": rel(got[0], exp[0]), "dcoef_rel_err": rel(got[1], exp[1])}


def kernel_sweep(device, repeats: int) -> list[dict]:
    from pyro_tvc.compose import layers
    from pyro_tvc.compose.triton_linear import DEFAULT_BLOCKS, fused_composed_linear

    (n, L, k, o), C = MLP_SHAPE, T_TASKS
    x = torch.randn(n, L, k, device=device)
    w0 = torch.randn(o, k, device=device) / k ** 0.5
    comps = 1e-2 * torch.randn(C, o, k, device=device) / k ** 0.5
    coef = torch.randn(n, C, device=device)
    variants = {"plain": lambda q, xx: F.linear(xx, w0),
                "weight_space": lambda q, xx: layers._weight_space(xx, w0, comps, q, None)}
    # Samples per program (component tiles shared by that many samples) at the default precision (tf32x3 unless
    # TF32 is allowed), then the other tl.dot precisions at the default tiles.
    for s, precision in ((1, None), (2, None), (4, None), (DEFAULT_BLOCKS[0], "tf32"), (DEFAULT_BLOCKS[0], "ieee")):
        blocks = (s,) + DEFAULT_BLOCKS[1:]
        variants[f"fused_s{s}" + (f"_{precision}" if precision else "")] = (
            lambda q, xx, b=blocks, p=precision: fused_composed_linear(xx, w0, comps, q, blocks=b, precision=p))
    records = []
    for name, fn in variants.items():
        def fwd():
            with torch.no_grad():
                fn(coef, x)

        def fb():
            q, xx = coef.clone().requires_grad_(), x.clone().requires_grad_()
            fn(q, xx).sum().backward()

        records.append({"variant": name, "forward_ms": timed(fwd, repeats, device),
                        "forward_backward_ms": timed(fb, repeats, device), "peak_mem_mb": peak_mb(fb)})
    plain = records[0]
    for r in records:
        r["forward_ratio_to_plain"] = r["forward_ms"] / plain["forward_ms"]
        r["forward_backward_ratio_to_plain"] = r["forward_backward_ms"] / plain["forward_backward_ms"]
    return records


def dispatch_choices(device) -> list[dict]:
    from pyro_tvc.compose.dispatch import LinearShape, choose_linear

    out = []
    for batch in BATCHES:
        for i, o in LINEAR_SHAPES:
            for grad in (False, True):
                c = choose_linear(LinearShape(batch, TOKENS, i, o, T_TASKS), device, grad=grad,
                                  candidates=("weight", "activation", "fused"), top=3)
                out.append({"batch": batch, "in": i, "out": o, "grad": grad, "choice": c.strategy,
                            "predicted_ms": c.predicted_ms, "measured_ms": c.measured_ms, "model_agreed": c.model_agreed})
    return out


def random_bank(encoder, n_tasks: int, device):
    """Task vectors of realistic relative size (1e-2 of each tensor's scale), made on the GPU."""
    from pyro_tvc.task_vectors import TaskVector, TaskVectorBank

    g = torch.Generator(device=device).manual_seed(0)
    vectors = [TaskVector({k: 1e-2 * (v.detach().std() + 1e-3) * torch.randn(v.shape, device=device, generator=g)
                           for k, v in encoder.named_parameters()}, {"task": f"task{t}"}) for t in range(n_tasks)]
    return TaskVectorBank.from_vectors(vectors)


def compose_bench(report: Report, device, repeats: int) -> list[dict]:
    from pyro_tvc.backbones import create_clip, image_encoder
    from pyro_tvc.compose import layers
    from pyro_tvc.compose.engine import Composer

    torch.manual_seed(0)
    encoder = image_encoder(create_clip(MODEL)).to(device).requires_grad_(False)
    bank = random_bank(encoder, T_TASKS, device)
    size = encoder.image_size[0] if isinstance(encoder.image_size, (tuple, list)) else encoder.image_size
    methods = [("naive", None, "off"), ("reference", None, "off"), ("fast", None, "off"), ("fused", None, "on"),
               ("lowrank", 4, "off"), ("lowrank", 16, "off")]
    records = []
    # Whole-encoder agreement of the fused and PyTorch fast paths (batch 8).
    composers = {("fast", None): Composer(encoder, bank, method="fast").to(device)}
    x8 = torch.randn(8, 3, size, size, device=device)
    lam8 = (0.3 * torch.randn(8, *composers["fast", None].coefficient_shape, device=device)).requires_grad_()
    outs = {}
    for mode in ("off", "on"):
        layers.FUSED_KERNEL = mode
        y = composers["fast", None](x8, lam8)
        outs[mode] = (y.detach(), torch.autograd.grad(y.square().sum(), lam8)[0])
    layers.FUSED_KERNEL = "auto"
    agreement = {"out_rel_err": ((outs["on"][0] - outs["off"][0]).abs().max() / outs["off"][0].abs().max()).item(),
                 "dlam_rel_err": ((outs["on"][1] - outs["off"][1]).abs().max() / outs["off"][1].abs().max()).item()}
    report.put("encoder_fused_vs_fast", agreement)
    for batch in BATCHES:
        x = torch.randn(batch, 3, size, size, device=device)
        base = {"model": MODEL, "batch": batch, "n_tasks": T_TASKS}

        def plain_fb():
            encoder(x.detach().requires_grad_()).sum().backward()

        with torch.no_grad():
            plain_fwd = timed(lambda: encoder(x), repeats, device)
        plain = {**base, "method": "plain", "rank": None, "forward_ms": plain_fwd,
                 "forward_backward_ms": timed(plain_fb, repeats, device), "peak_mem_mb": peak_mb(plain_fb)}
        records.append(plain)
        for label, rank, fused in methods:
            rec = {**base, "method": label, "rank": rank}
            if label in ("naive", "reference") and batch > BATCHES[0]:
                rec["skipped"] = ("batch-1 forwards one by one: minutes at this batch" if label == "naive" else
                                  "per-sample copies of theta and their gradients: > 139 GB at batch 256")
            elif report.left_s() < 60:
                rec["skipped"] = "time budget"
            if "skipped" in rec:
                records.append(rec)
                continue
            method = label if label in ("naive", "reference") else "fast"
            key = (method, rank)
            if key not in composers:
                composers[key] = Composer(encoder, bank, method=method, rank=rank).to(device)
            composer = composers[key]
            lam = 0.3 * torch.randn(batch, *composer.coefficient_shape, device=device)
            reps = 2 if label in ("naive", "reference") else repeats
            layers.FUSED_KERNEL = fused
            try:
                with torch.no_grad():
                    rec["forward_ms"] = timed(lambda: composer(x, lam), reps, device)

                def fb():
                    composer(x, lam.detach().requires_grad_()).sum().backward()

                rec["forward_backward_ms"] = timed(fb, reps, device)
                rec["peak_mem_mb"] = peak_mb(fb)
            except torch.cuda.OutOfMemoryError as e:
                rec["skipped"] = f"out of memory: {str(e).splitlines()[0]}"
                torch.cuda.empty_cache()
            finally:
                layers.FUSED_KERNEL = "auto"
            if "skipped" not in rec:
                for m in ("forward_ms", "forward_backward_ms", "peak_mem_mb"):
                    rec[m.replace("_ms", "").replace("_mb", "") + "_ratio_to_plain"] = rec[m] / plain[m]
            records.append(rec)
            print(rec, file=sys.stderr, flush=True)
        report.put("compose", records)
    return records


def svi_step(device, artifacts: Path, repeats: int) -> list[dict] | dict:
    """One SVI step vs one task-level step on the tiny artefacts, as benchmarks/svi_step.py does on CPU."""
    if not (artifacts / "table.json").exists():
        return {"skipped": f"no prepared artefacts at {artifacts} (carry artifacts/pyro-tvc-tiny)"}
    import pyro
    from pyro.infer import SVI, TraceMeanField_ELBO

    from pyro_tvc.infer import TrainConfig, build_problem

    records = []
    for rank in (None, 16):
        pyro.clear_param_store()
        cfg = TrainConfig(artifacts=artifacts, target="mnist", out=Path("/tmp/unused"), rank=rank, max_train=256,
                          quiet=True, device=str(device))
        problem = build_problem(cfg)
        x, f, y = (t[:128] for t in problem.splits["train"])
        idx = torch.arange(len(y), device=y.device)
        svi = SVI(problem.model, problem.guide, pyro.optim.ClippedAdam({"lr": 1e-3}),
                  TraceMeanField_ELBO(max_plate_nesting=1))
        svi_ms = timed(lambda: svi.step(x, f, y, **problem.kwargs("train", idx)), repeats, device)
        T, B = problem.composer.coefficient_shape
        lam = torch.zeros(T, B, device=device, requires_grad=True)
        opt = torch.optim.Adam([lam], lr=1e-3)

        def task_level_step():
            loss = F.cross_entropy(problem.likelihood.logits(x, lam), y)
            opt.zero_grad()
            loss.backward()
            opt.step()

        task_ms = timed(task_level_step, repeats, device)
        records.append({"rank": rank, "batch": len(y), "n_tasks": T, "n_blocks": B, "svi_step_ms": svi_ms,
                        "task_level_step_ms": task_ms, "ratio": svi_ms / task_ms})
    return records


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu_check.json"))
    parser.add_argument("--artifacts", type=Path, default=Path("artifacts/pyro-tvc-tiny"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--budget-s", type=float, default=420.0, help="skip what would start after this (seconds)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit(f"gpu_check: no CUDA device visible to torch {torch.__version__} on {platform.node()}; "
                 "run it on a GPU machine (bash benchmarks/gpu_check.sh)")
    run(Report(args.out, args.budget_s), torch.device("cuda"), args.artifacts, args.repeats)
    print(f"wrote {args.out}", file=sys.stderr)


def run(report: Report, device: torch.device, artifacts: Path, repeats: int) -> None:
    import triton

    report.put("env", {"torch": torch.__version__, "triton": triton.__version__, "gpu": torch.cuda.get_device_name(),
                       "tf32": torch.backends.cuda.matmul.allow_tf32, "python": platform.python_version()})
    report.put("kernel_correctness", kernel_correctness(device))
    report.put("kernel_sweep", kernel_sweep(device, repeats))
    report.put("dispatch", dispatch_choices(device))
    compose_bench(report, device, repeats)
    if report.left_s() < 30:
        report.put("svi_step", {"skipped": "time budget"})
    else:
        try:  # the last, optional section: record a failure (e.g. an API change in infer) instead of losing the run
            report.put("svi_step", svi_step(device, artifacts, repeats))
        except Exception as e:  # noqa: BLE001
            report.put("svi_step", {"failed": repr(e)})


if __name__ == "__main__":
    main()
