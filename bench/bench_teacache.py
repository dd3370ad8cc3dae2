"""TeaCache on the bundled tiny FlashI2V model (and a tiny random Wan2.1 pipeline): wall-clock speed-up and video quality against uncached sampling.

The model, prompt, image and sampling settings are the bundled pipeline's defaults (``load_pipeline()``:
30 Euler steps, shift 3, guidance 1 -- so one branch, no CFG --, 5 frames of 32x32, its ``example.txt`` /
``example.png``).  Each video is generated as ``Pipeline.generate`` does it (prompt encoding, first-frame VAE
encoding, sampling, decoding; the uncached video is checked to equal ``pipe.generate``'s bit for bit), with
the sampler driven as ``ospfn.sched.sample(..., forward_fn=TeaCache(...).wrap(ospfn.model.forward))``.

Cases: thresholds 0.05 / 0.10 / 0.20 (``--thresholds``), ``warmup_steps`` 5, the last step always computed
(``steps=`` given), for each coefficient preset of ``--coefficients``.  The tiny model is not Wan2.1 and has
no fitted polynomial: ``identity`` (the accumulator sums the relative changes of the time modulation e0
themselves) is the primary preset; ``wan2.1-t2v-1.3b`` (Wan's fit, applied to a model it was not fitted on)
is shown for comparison.

Figures, per case over ``--seeds`` seeds (same noise for the cached and the uncached video):

* ``speedup``: median over (seed, round) of the paired ratio uncached time / cached time of the same round
  (whole generation, wall clock); ``speedup_cpu``: the same with process CPU time (robust to other tenants
  of a shared machine); ``speedup_sampling``: the ratio of the sampling part alone (model calls + Euler).
* ``psnr_db`` / ``ssim``: the cached video against the uncached one (mean over seeds; the video in [-1, 1],
  so the peak-to-peak range is 2).  PSNR = 10 log10(2^2 / MSE) over the whole video.  SSIM: Wang et al.
  (2004) with an 11x11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03, dynamic range 2, valid windows
  only, computed per frame and channel and averaged.
* ``psnr_loss_db``: how much closer to the exact ODE solution the uncached video is than the cached one:
  PSNR(uncached, ref) - PSNR(cached, ref), ``ref`` = the uncached sampler at 4x the steps (an estimate of the
  exact solution that both try to reach).
* ``skipped``: model calls skipped of the steps x guidance branches (30 for the bundled model, 100 for wan-tiny).

``--pipeline wan-tiny`` measures the same on a tiny random Wan2.1 T2V pipeline built by diffusers and read back
with ``load_pipeline`` (4 blocks of width 64, 50 UniPC steps, guidance 5 with Wan's negative prompt, 9 frames of
64x64; text-to-video, so no image).  Its weights are random: the figures show the mechanism at work on the real
stack (both guidance branches cached, UniPC), not what TeaCache does to a trained Wan2.1.

Run (about 5-10 minutes on a 2-core machine; prefer one thread on a shared one)::

    python bench/bench_teacache.py [--pipeline bundled|wan-tiny] [--seeds 0 1 2 3 4] [--rounds 2] [--threads 1] [--out PATH]

Writes ``bench/results/teacache-cpu.json`` (pytest-benchmark layout, so ``bench/report.py`` reads it; the
device, CPU model and thread count in ``machine_info`` and in every row) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from conftest import cpu_name, sync  # noqa: E402

import ospfn.model as M  # noqa: E402
from ospfn.io import read_image  # noqa: E402
from ospfn.pipeline import BUNDLED, load_pipeline  # noqa: E402
from ospfn.sched import sample  # noqa: E402
from ospfn.sched.teacache import TeaCache, TeaCacheConfig  # noqa: E402

DEFAULT_OUT = os.path.join(HERE, "results", "teacache-cpu.json")
DEFAULT_OUT_WAN = os.path.join(HERE, "results", "teacache-wan-tiny-cpu.json")
DATA_RANGE = 2.0  # videos in [-1, 1]


# ----------------------------------------------------------------------------------------------------------
# quality


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float((a.double() - b.double()).square().mean())
    return math.inf if mse == 0 else 10 * math.log10(DATA_RANGE**2 / mse)


def _gauss_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean SSIM of two videos [3, F, H, W] (see the module docstring), frames and channels averaged."""
    x = a.double().permute(1, 0, 2, 3).reshape(-1, 1, *a.shape[-2:])  # [F*3, 1, H, W]
    y = b.double().permute(1, 0, 2, 3).reshape(-1, 1, *b.shape[-2:])
    w = _gauss_window()[None, None]
    c1, c2 = (0.01 * DATA_RANGE) ** 2, (0.03 * DATA_RANGE) ** 2
    mx, my = F.conv2d(x, w), F.conv2d(y, w)
    sxx = F.conv2d(x * x, w) - mx * mx
    syy = F.conv2d(y * y, w) - my * my
    sxy = F.conv2d(x * y, w) - mx * my
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return float(s.mean())


# ----------------------------------------------------------------------------------------------------------
# generation, as Pipeline.generate does it


class Generator:
    def __init__(self, pipe, prompt: str, image: torch.Tensor):
        self.pipe, self.prompt, self.image = pipe, prompt, image
        d = pipe.defaults
        self.steps, self.guidance, self.shift, self.ratio = d["steps"], d["guidance"], d["shift"], d["fourier_ratio"]
        self.frames, (self.H, self.W) = d["frames"], d["size"]
        self.neg = d["negative_prompt"]
        self.scheduler = d.get("scheduler", "euler")
        self.branches = 2 if self.guidance != 1.0 else 1  # sample() runs the unconditional branch only with guidance

    def __call__(self, seed: int, *, cache: TeaCache | None = None, steps: int | None = None, forward_fn=None):
        """(video [3, F, H, W], whole time, sampling time, whole CPU time); ``forward_fn`` replaces the model
        call (``bench_cfg_batch.py`` runs the guidance branches as two passes this way)."""
        pipe = self.pipe
        t0, c0 = time.perf_counter(), time.process_time()
        with torch.no_grad():
            st, sh, sw = pipe.vae.stride
            shape = (1, pipe.vae.latent_channels, (self.frames - 1) // st + 1, self.H // sh, self.W // sw)
            noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(pipe.device)
            ctx = pipe.encode_prompts([self.prompt]).to(pipe.device)
            neg = pipe.encode_prompts([self.neg]).to(pipe.device)
            cond = None
            if self.image is not None:  # image-to-video
                img = pipe.check_image(self.image, (self.H, self.W)).to(pipe.device)
                cond = pipe.vae.encode(img[None, :, None]).to(pipe.device)
            t1 = time.perf_counter()
            z = sample(
                pipe.params, pipe.cfg, noise=noise, context=ctx, neg_context=neg, guidance=self.guidance, scheduler=self.scheduler,
                steps=self.steps if steps is None else steps, shift=self.shift, cond_image_latent=cond,
                fourier_ratio=self.ratio, forward_fn=forward_fn if cache is None else cache.wrap(forward_fn or M.forward),
            )  # fmt: skip
            sync(pipe.device)
            t2 = time.perf_counter()
            video = pipe.vae.decode(z)[0].clamp(-1, 1)
            sync(pipe.device)
        return video.cpu(), time.perf_counter() - t0, t2 - t1, time.process_time() - c0


WAN_TINY = {"frames": 9, "size": [64, 64], "steps": 50}  # the tiny random Wan pipeline's sampling (its other defaults: Wan's)


def wan_tiny_pipeline(root: str, device: str):
    """A tiny random Wan2.1 T2V pipeline built by diffusers / transformers (4 blocks of width 64, a 2-layer UMT5, the
    small AutoencoderKLWan), written in the diffusers layout under ``root`` and read back with ``load_pipeline``
    (UniPC, shift 3, guidance 5 and Wan's negative prompt, as the layout says); 9 frames of 64x64, 50 steps."""
    import diffusers
    import transformers

    torch.manual_seed(0)
    transformer = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=32, ffn_dim=192, num_layers=4,
    )  # fmt: skip
    with torch.no_grad():  # off the library's near-zero initialisation, so every block changes the stream
        for prm in transformer.parameters():
            prm.add_(torch.randn_like(prm) * 0.05)
    vae = diffusers.AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True])
    text = transformers.UMT5EncoderModel(transformers.UMT5Config(vocab_size=384, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4))
    pipe = diffusers.WanPipeline(tokenizer=transformers.ByT5Tokenizer(), text_encoder=text, vae=vae, transformer=transformer,
                                 scheduler=diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                                             flow_shift=3.0))  # fmt: skip
    pipe.save_pretrained(root)
    loaded = load_pipeline(root, device=device)
    loaded.defaults.update(WAN_TINY)
    return loaded


def run(seeds, rounds, thresholds, presets, device, log=print, pipeline: str = "bundled") -> dict:
    if pipeline == "bundled":
        pipe = load_pipeline(device=device)
        prompt = (BUNDLED / "example.txt").read_text().strip()
        image = read_image(str(BUNDLED / "example.png"))
        what = "bundled tiny FlashI2V"
    else:
        import tempfile

        pipe = wan_tiny_pipeline(tempfile.mkdtemp(prefix="wan-tiny-"), device)
        prompt, image, what = "a red circle moving left on a navy background", None, "tiny random Wan2.1 T2V (diffusers layout)"
    gen = Generator(pipe, prompt, image)
    cases = [(p, thr) for p in presets for thr in thresholds]
    log(f"model: {what} ({pipe.cfg.num_layers} blocks, dim {pipe.cfg.dim}), {gen.steps} steps ({gen.scheduler}), shift {gen.shift}, "
        f"guidance {gen.guidance} ({gen.branches} branch(es)), {gen.frames} frames {gen.H}x{gen.W}; seeds {seeds}, {rounds} rounds")  # fmt: skip

    gen(seeds[0])  # warm-up (first-call allocations, kernel selection)
    base, ref, per_case = {}, {}, {c: {"t": [], "ts": [], "tc": [], "psnr": [], "ssim": [], "loss": [], "skipped": []} for c in cases}
    base_times = {"t": [], "ts": [], "tc": []}
    for seed in seeds:
        video, *_ = gen(seed)
        if seed == seeds[0]:  # the driver reproduces Pipeline.generate
            want = pipe.generate(prompt, image=image, seed=seed).cpu()  # (Wan: the layout's UniPC, CFG 5, Wan's negative)
            assert torch.equal(video, want), "the benchmark's generation differs from Pipeline.generate"
        base[seed] = video
        ref[seed], *_ = gen(seed, steps=4 * gen.steps)
        for r in range(rounds):
            order = [None] + cases
            k = (r + seeds.index(seed)) % len(order)
            order = order[k:] + order[:k]  # rotate so slow drifts of a shared machine hit every case alike
            times = {}
            for case in order:
                if case is None:
                    v, t, ts, tc = gen(seed)
                    assert torch.equal(v, base[seed]), "uncached sampling is not deterministic"
                    times[None] = (t, ts, tc)
                    continue
                preset, thr = case
                cache = TeaCache(TeaCacheConfig(thr, warmup_steps=5, coefficients=preset), branches=gen.branches, steps=gen.steps)
                v, t, ts, tc = gen(seed, cache=cache)
                times[case] = (t, ts, tc)
                if r == 0:
                    d = per_case[case]
                    d["psnr"].append(psnr(v, base[seed]))
                    d["ssim"].append(ssim(v, base[seed]))
                    d["loss"].append(psnr(base[seed], ref[seed]) - psnr(v, ref[seed]))
                    d["skipped"].append(cache.skipped)
            bt = times[None]
            for key, i in (("t", 0), ("ts", 1), ("tc", 2)):
                base_times[key].append(bt[i])
            for case in cases:
                for key, i in (("t", 0), ("ts", 1), ("tc", 2)):
                    per_case[case][key].append(bt[i] / times[case][i])
                per_case[case].setdefault("abs_t", []).append(times[case][0])
        log(f"seed {seed}: done")
    return {"cases": cases, "per_case": per_case, "base_times": base_times, "steps": gen.steps, "branches": gen.branches,
            "seeds": list(seeds), "rounds": rounds, "device": device, "model": what, "scheduler": gen.scheduler}  # fmt: skip


def summarize(res: dict) -> list[dict]:
    rows = [{"preset": "-", "threshold": 0.0, "skipped": 0, "speedup": 1.0, "speedup_cpu": 1.0, "speedup_sampling": 1.0,
             "psnr_db": math.inf, "ssim": 1.0, "psnr_loss_db": 0.0, "median_s": statistics.median(res["base_times"]["t"]),
             "times": res["base_times"]["t"]}]  # fmt: skip
    for case in res["cases"]:
        d = res["per_case"][case]
        rows.append({
            "preset": case[0], "threshold": case[1], "skipped": statistics.mean(d["skipped"]),
            "speedup": statistics.median(d["t"]), "speedup_cpu": statistics.median(d["tc"]),
            "speedup_sampling": statistics.median(d["ts"]), "psnr_db": statistics.mean(d["psnr"]),
            "ssim": statistics.mean(d["ssim"]), "psnr_loss_db": statistics.mean(d["loss"]),
            "median_s": statistics.median(d["abs_t"]), "times": d["abs_t"],
        })  # fmt: skip
    return rows


def machine_info(device: str) -> dict:
    dev = torch.cuda.get_device_name() if device.startswith("cuda") else f"{cpu_name()}, {torch.get_num_threads()} threads"
    return {
        "device": dev,
        "cpu": cpu_name(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "loadavg_at_start": list(os.getloadavg()),
        "node": platform.node(),
        "machine": platform.machine(),
        "system": platform.system(),
    }


def to_benchmark_json(rows: list[dict], res: dict, info: dict) -> dict:
    benches = []
    for r in rows:
        name = "uncached" if r["preset"] == "-" else f"{r['preset']}@{r['threshold']:.2f}"
        ts = r["times"]
        extra = {k: v for k, v in r.items() if k not in ("times", "median_s")}
        if math.isinf(extra["psnr_db"]):
            extra["psnr_db"] = "inf"
        extra.update(device=info["device"], steps=res["steps"], seeds=len(res["seeds"]))
        benches.append({
            "group": f"{res['model']} sampling, TeaCache ({res['steps']} {res['scheduler']} steps)", "name": f"teacache[{name}]",
            "fullname": f"bench/bench_teacache.py::teacache[{name}]", "params": {"preset": r["preset"], "threshold": r["threshold"]},
            "stats": {"min": min(ts), "max": max(ts), "mean": statistics.fmean(ts), "median": statistics.median(ts),
                      "stddev": statistics.stdev(ts) if len(ts) > 1 else 0.0, "rounds": len(ts), "iterations": 1, "data": ts},
            "extra_info": extra,
        })  # fmt: skip
    return {"machine_info": info, "commit_info": {}, "benchmarks": benches,
            "datetime": datetime.datetime.now(datetime.timezone.utc).isoformat(), "version": "bench_teacache (script mode)"}  # fmt: skip


def table(rows: list[dict], res: dict) -> str:
    out = ["| preset | threshold | skipped / %d | speed-up (wall) | speed-up (CPU time) | speed-up (sampling) | PSNR vs uncached (dB) "
           "| SSIM vs uncached | PSNR loss vs ODE ref (dB) |" % (res["steps"] * res["branches"]), "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        p = "inf" if math.isinf(r["psnr_db"]) else f"{r['psnr_db']:.1f}"
        out.append(f"| {r['preset'] if r['preset'] != '-' else 'uncached'} | {r['threshold']:.2f} | {r['skipped']:.1f} | "
                   f"{r['speedup']:.2f}x | {r['speedup_cpu']:.2f}x | {r['speedup_sampling']:.2f}x | {p} | {r['ssim']:.4f} | "
                   f"{r['psnr_loss_db']:.2f} |")  # fmt: skip
    return "\n".join(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--rounds", type=int, default=2, help="timed rounds per seed (quality is measured in the first)")
    ap.add_argument("--thresholds", type=float, nargs="+", default=[0.05, 0.10, 0.20])
    ap.add_argument("--coefficients", nargs="+", default=["identity", "wan2.1-t2v-1.3b"], help="TeaCache presets")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's own choice)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--pipeline", choices=["bundled", "wan-tiny"], default="bundled",
                    help="bundled: the tiny FlashI2V model; wan-tiny: a tiny random Wan2.1 T2V pipeline (coefficients "
                         "default to wan2.1-t2v-1.3b and identity)")  # fmt: skip
    ap.add_argument("--out", default=None, help=f"JSON output (pytest-benchmark layout; default {DEFAULT_OUT} or "
                                                f"{DEFAULT_OUT_WAN} for wan-tiny); '-' for none")  # fmt: skip
    a = ap.parse_args(argv)
    if a.out is None:
        a.out = DEFAULT_OUT if a.pipeline == "bundled" else DEFAULT_OUT_WAN
    if a.rounds < 1 or not a.seeds:
        ap.error("--rounds must be >= 1 and --seeds non-empty")
    if a.threads:
        torch.set_num_threads(a.threads)
    info = machine_info(a.device)
    res = run(a.seeds, a.rounds, a.thresholds, a.coefficients, a.device, pipeline=a.pipeline)
    rows = summarize(res)
    print(f"\n{info['device']}; torch {info['torch']}; load average at start {info['loadavg_at_start'][0]:.2f}; "
          f"{len(res['seeds'])} seeds x {res['rounds']} rounds\n")  # fmt: skip
    print(table(rows, res))
    if a.out != "-":
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(to_benchmark_json(rows, res, info), f, indent=2)
            f.write("\n")
        print(f"\nwrote {a.out}")


if __name__ == "__main__":
    main()
