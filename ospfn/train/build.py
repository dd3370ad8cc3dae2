"""Build an SFT run from a validated recipe config: data, VAE, model, trainer, resumed state.

``make_trainer(cfg, out_dir, resume, device=...)`` returns an ``ospfn.train.step.Trainer`` on one process
or an ``ospfn.train.distributed.FSDPTrainer`` under torchrun (``WORLD_SIZE`` > 1).  Everything that can be
wrong with a config, the launch (a ``parallel`` section the number of processes cannot carry), the device or
a resume source raises ``TrainError`` before any training work starts.

``data.kind: latents`` trains from a latent cache (``ospfn.data.latents.LatentDataset``), checked against the
config before any work (text and VAE kinds and widths, the first-frame latents FlashI2V needs, the frames,
frame rate, buckets and seed it was prepared with); ``prepare_from_config`` writes that cache from the same
config (``recipes/prepare_data.py``), with the encoders ``make_text_encoder`` / ``make_vae`` build.

``text.kind: qwen_vl`` (Uniworld-OSP2.0): the cache holds the frozen Qwen2.5-VL's features of (frame 0, caption)
and, per sample, of (frame 0, ""); the run trains the ``adapter`` section's VLM adapter (``ContextAdapter``,
trainable names ``ctx.*``), with the DiT (``model.train``) and / or a LoRA (``lora``) or alone.

One process runs on ``device`` (cpu by default here; ``recipes/train.py`` defaults to cuda when available):
the model, the text encoder, the EMA, the optimizer state and every batch live there, and ``train.precision:
bf16`` autocasts on that device type.  Under torchrun each rank's device comes from the launch
(``ospfn.parallel.init_parallel``: cuda + nccl, npu + hccl, or cpu + gloo).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ospfn.train.step import RunParts, Trainer

__all__ = ["TrainError", "build_parts", "check_launch", "launch_world", "make_trainer", "local_trainer", "fsdp_trainer",
           "source_dataset", "make_text_encoder", "make_vae", "prepare_from_config", "open_cache"]


class TrainError(ValueError):
    """A run cannot start; the message names the config key or option at fault (``model.checkpoint: ...``)."""


def build_parts(cfg) -> RunParts:
    """Model config, text config, VAE and dataset of a recipe config (validated, before any work).  With
    ``data.kind: latents`` the dataset is the cache and the VAE is None for ``vae.kind: wan`` (not needed)."""
    from ospfn.model.vae import PixelVAE
    from ospfn.train.sft import derive_configs

    try:
        dit_cfg, text_cfg, _ = derive_configs(cfg)
    except ValueError as e:  # the message names the key (model.overrides.<key>, text.heads, ...)
        raise TrainError(str(e)) from e
    vae = PixelVAE(cfg.vae.stride[1]) if cfg.vae.kind == "pixel" else None
    if cfg.model.checkpoint and not Path(cfg.model.checkpoint).exists():
        raise TrainError(f"model.checkpoint: no such file or directory: {cfg.model.checkpoint}")
    if cfg.adapter is not None and cfg.adapter.checkpoint and not Path(cfg.adapter.checkpoint).is_file():
        raise TrainError(f"adapter.checkpoint: no such file: {cfg.adapter.checkpoint} (an adapter file: the released one or a "
                         "vlm_adapter.safetensors)")  # fmt: skip
    if cfg.train.attn_backend is not None:
        from ospfn import backends

        st = backends.info(cfg.train.attn_backend)
        if not st.available:
            raise TrainError(f"train.attn_backend: backend {cfg.train.attn_backend!r} is not available here: {st.reason}; "
                             f"available: {backends.available()} (or null for automatic)")  # fmt: skip
    if cfg.data.kind == "synthetic":
        from ospfn.data import SyntheticMotion

        styled = {} if cfg.data.styles is None else {"styles": cfg.data.styles if isinstance(cfg.data.styles, str) else list(cfg.data.styles)}
        dataset = SyntheticMotion(
            cfg.data.num_samples, frames=cfg.data.frames, size=tuple(cfg.data.size), split="train", seed=cfg.data.seed, **styled
        )
    elif cfg.data.kind == "latents":
        dataset = open_cache(cfg, dit_cfg)
    else:
        dataset, _ = source_dataset(cfg)
    adapter_cfg = None
    if cfg.text.kind == "qwen_vl":
        from ospfn.train.sft import adapter_config_of

        try:
            adapter_cfg = adapter_config_of(cfg, dit_cfg, dataset.spec["text"]["vlm_dim"])
        except ValueError as e:
            raise TrainError(f"adapter: {e}") from None
    return RunParts(dit_cfg, text_cfg, vae, dataset, adapter_cfg)


def source_dataset(cfg):
    """(the ``VideoDataset`` of ``data.index`` that ``data.kind: video`` trains on and ``prepare_from_config``
    encodes, its ``ClipEntry`` list after ``filter_clips``)."""
    from ospfn.data import VideoDataset, filter_clips, load_index

    if not cfg.data.index or not Path(cfg.data.index).exists():
        raise TrainError(f"data.index: no such file: {cfg.data.index}")
    kept, _ = filter_clips(load_index(cfg.data.index), train_fps=cfg.data.train_fps, sample_num_frames=cfg.data.frames)
    dataset = VideoDataset(
        kept, num_frames=cfg.data.frames, train_fps=cfg.data.train_fps, buckets=[tuple(b) for b in cfg.data.buckets], seed=cfg.data.seed
    )
    return dataset, kept


def _source_spec(cfg, entries) -> dict:
    """What a cache's samples depend on besides the encoders: the corpus (a digest of its clips) and how clips
    are sampled.  Stored in the cache and compared when a run reads it."""
    import hashlib
    import json

    clips = [[e.path, list(e.captions), None if e.cut is None else list(e.cut), e.fps] for e in entries]
    digest = hashlib.sha256(json.dumps(clips, sort_keys=True).encode()).hexdigest()
    return {"index": str(cfg.data.index), "num_clips": len(entries), "clips_sha256": digest, **_sampling(cfg)}


def _sampling(cfg) -> dict:
    dc = cfg.data
    return {"frames": dc.frames, "train_fps": dc.train_fps, "buckets": [list(b) for b in dc.buckets], "seed": dc.seed}


def open_cache(cfg, dit_cfg):
    """The ``LatentDataset`` of ``data.cache``, after checking that it is what this config trains on."""
    from ospfn.data.latents import LatentCacheError, LatentDataset

    path = cfg.data.cache
    try:
        ds = LatentDataset(path)
    except FileNotFoundError as e:
        raise TrainError(f"data.cache: {e}") from None
    except LatentCacheError as e:
        raise TrainError(f"data.cache: {e}") from None
    t, v, src = ds.spec["text"], ds.spec["vae"], ds.spec["source"]
    bad = []
    if t.get("kind") != cfg.text.kind:
        bad.append(f"text.kind is {cfg.text.kind!r}, the cache's text features come from {t.get('kind')!r}")
    if t["text_len"] != cfg.text.text_len:
        bad.append(f"text.text_len is {cfg.text.text_len}, the cache's is {t['text_len']}")
    if cfg.text.kind == "qwen_vl":  # VLM features: the adapter maps their width (vlm_dim) to the model's text_dim
        if not isinstance(t.get("vlm_dim"), int) or t.get("vlm_dim") != t["text_dim"] or not ds.per_sample_empty:
            bad.append(f"the cache's text spec is not a qwen_vl one (vlm_dim {t.get('vlm_dim')!r}, per-sample empty contexts "
                       f"{ds.per_sample_empty})")  # fmt: skip
        for key in ("text_only", "image_size", "max_caption_tokens"):
            want = list(getattr(cfg.text, key)) if key == "image_size" else getattr(cfg.text, key)
            if t.get(key) != want:
                bad.append(f"text.{key} is {want!r}, the cache's VLM read {t.get(key)!r}")
        n_style = cfg.adapter.style_tokens if cfg.adapter is not None else 0
        if n_style:
            try:
                unlabelled = [r.get("source_index") for r in ds.records() if r.get("style") is None]
            except (LatentCacheError, OSError) as e:
                raise TrainError(f"data.cache: {e}") from None
            if unlabelled:
                bad.append(f"adapter.style_tokens is {n_style}: every sample needs a style label, {len(unlabelled)} of {len(ds)} have "
                           f"none (source items {unlabelled[:5]})")  # fmt: skip
    elif t["text_dim"] != dit_cfg.text_dim:
        bad.append(f"the model's text_dim is {dit_cfg.text_dim} (model.preset / model.overrides), the cache's text features are {t['text_dim']} wide")
    if cfg.text.kind == "tiny":
        for key in ("vocab", "heads"):
            if t.get(key) != getattr(cfg.text, key):
                bad.append(f"text.{key} is {getattr(cfg.text, key)}, the cache's encoder has {t.get(key)}")
    if v.get("kind") != cfg.vae.kind:
        bad.append(f"vae.kind is {cfg.vae.kind!r}, the cache's latents come from {v.get('kind')!r}")
    elif cfg.vae.kind == "pixel" and v.get("spatial") != cfg.vae.stride[1]:
        bad.append(f"vae.spatial is {cfg.vae.stride[1]}, the cache's is {v.get('spatial')}")
    if v["latent_channels"] != dit_cfg.in_dim:
        bad.append(f"the model takes {dit_cfg.in_dim} latent channels, the cache's latents have {v['latent_channels']}")
    if dit_cfg.i2v == "flashi2v" and not ds.cond:
        bad.append("train.task flashi2v needs the first-frame latents, which the cache lacks (it was prepared for t2v)")
    for key, want in _sampling(cfg).items():
        if key in src and src[key] != want:
            bad.append(f"data.{key} is {want}, the cache was prepared with {src[key]}")
    if bad:
        raise TrainError(f"data.cache {path} does not match this config: " + "; ".join(bad))
    return ds


def _weights_file(path: Path) -> Path:
    return path / "text_encoder.safetensors" if path.is_dir() else path


def _qwen_vl_spec(cfg, enc) -> dict:
    """The cache's text spec of a VLM encoder, after checking that it reads what the ``text`` section says."""
    tc = cfg.text
    have = {"text_len": getattr(enc, "max_length", None), "text_only": getattr(enc, "text_only", None),
            "image_size": tuple(getattr(enc, "image_size", ()) or ()), "max_caption_tokens": getattr(enc, "max_caption_tokens", None)}  # fmt: skip
    want = {"text_len": tc.text_len, "text_only": tc.text_only, "image_size": tuple(tc.image_size), "max_caption_tokens": tc.max_caption_tokens}
    bad = [f"text.{k} is {want[k]!r}, the encoder's is {have[k]!r}" for k in want if have[k] != want[k]]
    if bad:
        raise TrainError("text: the VLM encoder does not match the config: " + "; ".join(bad))
    vlm_dim = int(enc.vlm_dim)
    return {"kind": "qwen_vl", "text_dim": vlm_dim, "vlm_dim": vlm_dim, "text_len": tc.text_len, "image_size": list(tc.image_size),
            "text_only": tc.text_only, "max_caption_tokens": tc.max_caption_tokens, "path": tc.path,
            "dtype": str(enc.dtype).replace("torch.", "")}  # fmt: skip


def make_text_encoder(cfg, *, device="cpu", dtype=torch.float32, encoder=None):
    """(text encoder, its spec for the cache, its weights or None) of the config's ``text`` section.

    ``tiny``: the weights of ``text.path`` (a ``text_encoder.safetensors`` or a pipeline directory holding one)
    or, without a path, the seeded initialisation a run from videos starts with (``train.seed + 1``); fp32.
    ``umt5``: ``text.path`` read with ``UMT5TextEncoder.from_pretrained`` (a directory) or ``from_wan`` (a
    ``.pth`` file, with ``text.tokenizer``), in ``dtype`` on ``device``.  ``qwen_vl``: the local Qwen2.5-VL
    directory ``text.path`` read with ``QwenVLEncoder.from_pretrained`` (``text.text_only``, ``image_size``,
    ``max_caption_tokens``, ``text_len`` as its ``max_length``) in ``dtype`` on ``device``; or ``encoder``, a
    ``QwenVLEncoder`` built elsewhere (e.g. with a processor of your own), checked against those keys."""
    from ospfn.model.checkpoint import CheckpointError
    from ospfn.model.text import TinyTextEncoder, init_tiny_text_params
    from ospfn.train.sft import derive_configs

    dit_cfg, text_cfg, _ = derive_configs(cfg)
    tc = cfg.text
    dname = "bfloat16" if dtype == torch.bfloat16 else "float32"
    if encoder is not None and tc.kind != "qwen_vl":
        raise TrainError(f"text: an encoder built elsewhere is taken for text.kind 'qwen_vl' only, got text.kind {tc.kind!r}")
    if tc.kind == "qwen_vl":
        if encoder is None:
            from ospfn.model.vlm import QwenVLEncoder

            if tc.path is None:
                raise TrainError("text.path must name the local Qwen2.5-VL directory to encode with (e.g. Qwen2.5-VL-7B-Instruct)")
            try:
                encoder = QwenVLEncoder.from_pretrained(tc.path, text_only=tc.text_only, device=device, dtype=dtype,
                                                        image_size=tuple(tc.image_size), max_caption_tokens=tc.max_caption_tokens,
                                                        max_length=tc.text_len)  # fmt: skip
            except (OSError, ValueError, ImportError, TypeError) as e:
                raise TrainError(f"text.path: {e}") from None
        elif not callable(getattr(encoder, "encode", None)) or not isinstance(getattr(encoder, "vlm_dim", None), int):
            raise TrainError(f"text: the encoder must be an ospfn.model.vlm.QwenVLEncoder, got {type(encoder).__name__}")
        return encoder, _qwen_vl_spec(cfg, encoder), None
    if tc.kind == "tiny":
        if tc.path is None:
            weights = init_tiny_text_params(text_cfg, seed=cfg.train.seed + 1)
        else:
            from ospfn.model.checkpoint import read_safetensors

            f = _weights_file(Path(tc.path))
            if not f.is_file():
                raise TrainError(f"text.path: no such file: {f} (a text_encoder.safetensors or a pipeline directory holding one)")
            try:
                weights = read_safetensors(f)
            except CheckpointError as e:
                raise TrainError(f"text.path: {e}") from None
        try:
            enc = TinyTextEncoder({k: v.float().to(device) for k, v in weights.items()}, text_cfg)
        except ValueError as e:
            raise TrainError(f"text.path: {e}") from None
        spec = {"kind": "tiny", "text_dim": text_cfg.text_dim, "text_len": text_cfg.text_len, "vocab": text_cfg.vocab, "heads": text_cfg.heads}
        return enc, spec, weights
    from ospfn.model.umt5 import UMT5TextEncoder

    if tc.path is None:
        raise TrainError("text.path must name the UMT5 weights to encode with: a diffusers pipeline or text_encoder directory, "
                         "or Wan's models_t5_umt5-xxl-enc-bf16.pth (with text.tokenizer)")  # fmt: skip
    p = Path(tc.path)
    try:
        if p.is_dir():
            enc = UMT5TextEncoder.from_pretrained(p, tokenizer=tc.tokenizer, dtype=dtype, device=device, text_len=tc.text_len)
        elif p.is_file():
            if tc.tokenizer is None:
                raise TrainError(f"text.tokenizer must name the google/umt5-xxl tokenizer folder to read Wan's {p.name}")
            enc = UMT5TextEncoder.from_wan(p, tc.tokenizer, dtype=dtype, device=device, text_len=tc.text_len)
        else:
            raise TrainError(f"text.path: no such file or directory: {p}")
    except (OSError, ValueError, ImportError) as e:  # FileNotFoundError, CheckpointError, a missing library
        if isinstance(e, TrainError):
            raise
        raise TrainError(f"text.path: {e}") from None
    if enc.text_dim != dit_cfg.text_dim:
        raise TrainError(f"text.path: the UMT5 at {p} gives {enc.text_dim}-wide features; the model's text_dim is {dit_cfg.text_dim} "
                         "(model.preset / model.overrides.text_dim)")  # fmt: skip
    spec = {"kind": "umt5", "text_dim": enc.text_dim, "text_len": enc.text_len, "path": str(p), "tokenizer": tc.tokenizer, "dtype": dname}
    return enc, spec, None


def make_vae(cfg, *, device="cpu", dtype=torch.float32, tiling: bool = False):
    """(VAE, its spec for the cache) of the config's ``vae`` section: the pixel VAE, or the Wan2.1 VAE of
    ``vae.path`` (``WanVAE.from_pretrained`` for a directory, ``from_wan`` for a file) in ``dtype`` on ``device``."""
    from ospfn.model.vae import PixelVAE
    from ospfn.train.sft import WAN_VAE

    if cfg.vae.kind == "pixel":
        s = cfg.vae.stride[1]
        vae = PixelVAE(s)
        return vae, {"kind": "pixel", "spatial": s, "latent_channels": vae.latent_channels, "stride": list(vae.stride)}
    from ospfn.model.wan_vae import WanVAE

    if cfg.vae.path is None:
        raise TrainError("vae.path must name the Wan2.1 VAE to encode with: a diffusers pipeline or vae directory, or Wan2.1_VAE.pth")
    p = Path(cfg.vae.path)
    try:
        if p.is_dir():
            vae = WanVAE.from_pretrained(p, dtype=dtype, device=device, tiling=tiling)
        elif p.is_file():
            vae = WanVAE.from_wan(p, dtype=dtype, device=device, tiling=tiling)
        else:
            raise TrainError(f"vae.path: no such file or directory: {p}")
    except (OSError, ValueError, ImportError) as e:
        if isinstance(e, TrainError):
            raise
        raise TrainError(f"vae.path: {e}") from None
    if vae.latent_channels != WAN_VAE["latent_channels"] or tuple(vae.stride) != WAN_VAE["stride"]:
        raise TrainError(f"vae.path: the VAE at {p} has {vae.latent_channels} latent channels and stride {tuple(vae.stride)}; "
                         f"vae.kind 'wan' is the Wan2.1 VAE ({WAN_VAE['latent_channels']} channels, stride {WAN_VAE['stride']})")  # fmt: skip
    spec = {"kind": "wan", "latent_channels": vae.latent_channels, "stride": list(vae.stride), "path": str(p),
            "dtype": "bfloat16" if dtype == torch.bfloat16 else "float32", "tiling": bool(tiling)}  # fmt: skip
    return vae, spec


def prepare_from_config(cfg, *, out=None, device="cpu", dtype=torch.float32, store_dtype=torch.float32, shard_size: int = 64,
                        skip_bad: bool = False, stop_after=None, vae_tiling: bool = False, progress: bool = True, log=None,
                        text_encoder=None, dataset=None) -> dict:  # fmt: skip
    """Encode the corpus of ``data.index`` into the latent cache ``out`` (default ``data.cache``) with the
    config's encoders; the first-frame latents too when ``train.task`` is flashi2v.  Returns the cache index.
    ``TrainError`` for what is wrong with the config or the encoders' files, ``LatentCacheError`` for the cache
    (another writer, a cache made with other settings, a failing clip without ``skip_bad``).

    ``text_encoder``: for ``text.kind: qwen_vl``, a ``QwenVLEncoder`` built elsewhere instead of ``text.path``'s
    (checked against the ``text`` section; see ``make_text_encoder``).  ``dataset``: any dataset of items
    ``{"video", "caption", ...}`` (e.g. ``ospfn.data.SyntheticMotion``) encoded instead of ``data.index``'s
    corpus; the cache then records its class and length with the config's sampling keys."""
    from ospfn.data.latents import prepare_cache

    if cfg.data.kind != "latents":
        raise TrainError(f"data.kind must be 'latents' to prepare a cache (data.cache: where to write it, data.index: the corpus), "
                         f"got {cfg.data.kind!r}")  # fmt: skip
    target = cfg.data.cache if out is None else out
    if dataset is None:
        if cfg.data.index is None:
            raise TrainError("data.index must name the OSP-Next index file of the corpus to encode")
        dataset, entries = source_dataset(cfg)
        if len(dataset) == 0:
            raise TrainError(f"data.index: no clip of {cfg.data.index} passes the filter (frames, fps, size); nothing to encode")
        source = _source_spec(cfg, entries)
    else:
        if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
            raise TrainError(f"dataset: must have len() and items, got {type(dataset).__name__}")
        source = {"dataset": type(dataset).__name__, "num_items": len(dataset), **_sampling(cfg)}
    dev = _device(device)
    text, text_spec, text_w = make_text_encoder(cfg, device=dev, dtype=dtype, encoder=text_encoder)
    vae, vae_spec = make_vae(cfg, device=dev, dtype=dtype, tiling=vae_tiling)
    return prepare_cache(dataset, target, text=text, vae=vae, text_spec=text_spec, vae_spec=vae_spec,
                         cond=cfg.train.task == "flashi2v", source=source, shard_size=shard_size,
                         dtype=store_dtype, text_weights=text_w, skip_bad=skip_bad, stop_after=stop_after, progress=progress,
                         log=log)  # fmt: skip


def _initial_weights(cfg, parts: RunParts) -> tuple[dict, dict]:
    """(DiT weights: ``model.checkpoint`` or a seeded init, text-encoder weights: ``text.path`` or a seeded init).

    A FlashI2V run may start from a text-to-video checkpoint: its two branches are then created with their
    zero-output initialisation.  On a latent cache the text weights are the (frozen) tiny encoder stored with
    the cache, or none for UMT5 (its features are in the cache and nothing of it is trained)."""
    from ospfn.model import init_params
    from ospfn.model.checkpoint import load_checkpoint
    from ospfn.model.text import init_tiny_text_params

    seed = cfg.train.seed
    init_missing = "flashi2v" if parts.dit_cfg.i2v == "flashi2v" else None
    dit = (
        load_checkpoint(cfg.model.checkpoint, parts.dit_cfg, dtype=torch.float32, init_missing=init_missing)
        if cfg.model.checkpoint
        else init_params(parts.dit_cfg, seed=seed)
    )
    if cfg.data.kind == "latents":
        return dit, (parts.dataset.text_weights() if cfg.text.kind == "tiny" else {})
    if cfg.text.path is not None:  # fine-tuning a pipeline: its tiny encoder's weights (checked against text.*)
        _, _, text = make_text_encoder(cfg)
        return dit, {k: v.float() for k, v in text.items()}
    return dit, init_tiny_text_params(parts.text_cfg, seed=seed + 1)


def _initial_adapter(cfg, parts: RunParts, ckpt=None):
    """The LoRA of an adapter run (``lora`` section): ``init_lora`` with ``lora.seed``, or the adapter of the
    checkpoint ``ckpt`` a run resumes from; None without a ``lora`` section."""
    from ospfn.lora import LoraAdapter, init_lora
    from ospfn.train.sft import LORA_PREFIX, lora_config_of

    if cfg.lora is None:
        return None
    lcfg = lora_config_of(cfg)
    if ckpt is None:
        return init_lora(parts.dit_cfg, lcfg, seed=cfg.lora.seed)
    tensors = {k[len(LORA_PREFIX):]: v for k, v in ckpt["params"].items() if k.startswith(LORA_PREFIX)}
    if not tensors:
        raise TrainError(f"--resume: the checkpoint {ckpt['path']} holds no LoRA adapter (written by a run without a lora section)")
    return LoraAdapter(lcfg, tensors)


def _initial_context_adapter(cfg, parts: RunParts, ckpt=None):
    """The VLM adapter's weights of a ``text.kind: qwen_vl`` run (None otherwise): those of the checkpoint
    ``ckpt`` a run resumes from, else ``init_adapter`` with ``adapter.seed`` overwritten by what
    ``adapter.checkpoint`` holds (the released adapter or an ospfn ``vlm_adapter.safetensors``)."""
    from ospfn.model.checkpoint import CheckpointError
    from ospfn.model.vlm import adapter_shapes, check_adapter_params, init_adapter
    from ospfn.train.sft import CTX_PREFIX

    if cfg.text.kind != "qwen_vl":
        return None
    acfg = parts.adapter_cfg
    if ckpt is not None:
        tensors = {k[len(CTX_PREFIX):]: v for k, v in ckpt["params"].items() if k.startswith(CTX_PREFIX)}
        if not tensors:
            raise TrainError(f"--resume: the checkpoint {ckpt['path']} holds no VLM adapter ({CTX_PREFIX}*: written by a run without one)")
        try:
            check_adapter_params(tensors, acfg, "--resume")
        except (TypeError, ValueError) as e:
            raise TrainError(f"{e} (the checkpoint {ckpt['path']})") from None
        return tensors
    params = init_adapter(acfg, seed=cfg.adapter.seed)
    if cfg.adapter.checkpoint:
        from ospfn.pipeline import read_vlm_adapter

        try:
            loaded, _ = read_vlm_adapter(cfg.adapter.checkpoint, "adapter.checkpoint")
        except CheckpointError as e:
            raise TrainError(str(e)) from None
        want = adapter_shapes(acfg)
        unknown = sorted(set(loaded) - set(want))
        if unknown:
            raise TrainError(f"adapter.checkpoint: {cfg.adapter.checkpoint} holds {unknown[:6]}, which the adapter section has no "
                             f"branch for (adapter.first_frame_tokens is {cfg.adapter.first_frame_tokens}, adapter.style_tokens is "
                             f"{cfg.adapter.style_tokens})")  # fmt: skip
        bad = [f"{k} {tuple(v.shape)} vs {want[k]}" for k, v in loaded.items() if tuple(v.shape) != want[k]]
        if bad:
            raise TrainError(f"adapter.checkpoint: {cfg.adapter.checkpoint} does not fit the adapter (adapter.hidden_dim "
                             f"{acfg.hidden_dim}, the cache's vlm_dim {acfg.vlm_dim}, the model's text_dim {acfg.text_dim}): {bad[:4]}")  # fmt: skip
        params.update({k: v.float() for k, v in loaded.items()})
    return params


def _check_resume_config(saved, cfg, path) -> None:
    from ospfn.train.sft import resume_conflicts

    conflicts = resume_conflicts(saved or {}, cfg.to_dict())
    if conflicts:
        raise TrainError(f"--resume: the checkpoint {path} was written with different values of {', '.join(conflicts)}")


def launch_world() -> int:
    """The number of processes of this launch (torchrun's ``WORLD_SIZE``; 1 without torchrun)."""
    from ospfn.parallel.mesh import world_from_env

    try:
        return world_from_env(1, where="train")
    except ValueError as e:
        raise TrainError(str(e)) from None


def check_launch(cfg, world: int) -> None:
    """``TrainError`` naming the ``parallel`` keys when this launch of ``world`` processes cannot carry them
    (the same verdict on every rank: it depends on the config and WORLD_SIZE only)."""
    S, U = cfg.parallel.skiparse_sp, cfg.parallel.ulysses_sp
    su = S * U
    if world % su:
        launch = "one process (no torchrun)" if world == 1 else f"{world} processes"
        raise TrainError(
            f"parallel.skiparse_sp * parallel.ulysses_sp = {S} * {U} = {su} does not divide the launch: {launch}; "
            f"launch a multiple of {su} processes (torchrun --nproc-per-node {su}) or set both to 1"
        )


def make_trainer(cfg, out_dir, resume=None, *, device=None) -> Trainer:
    """The run's trainer, resumed from ``resume`` ("latest" = the newest checkpoint in ``out_dir``, or a path).

    ``device``: one process runs there (default cpu); under torchrun it may only be ``"cpu"`` or ``"cuda"``
    (the device type of every rank; default: from the launch)."""
    world = launch_world()
    check_launch(cfg, world)
    if world > 1:
        return fsdp_trainer(cfg, out_dir, resume, device=device)
    return local_trainer(cfg, out_dir, resume, device=device)


def _device(device):
    from ospfn.train.config import resolve_device

    if device is None:
        return torch.device("cpu")
    try:
        return resolve_device(device)
    except ValueError as e:
        raise TrainError(f"device: {e}") from None


def local_trainer(cfg, out_dir, resume=None, *, device=None) -> Trainer:
    """One process on ``device`` (default cpu): the DiT as ``ospfn.nn.DiT`` and the text encoder as
    ``TextModule`` over the weights, moved there with the EMA and the optimizer state."""
    from ospfn.nn import DiT
    from ospfn.train.distributed import ContextAdapter, TextModule
    from ospfn.train.sft import CTX_PREFIX, LORA_PREFIX, dit_trained, split_params
    from ospfn.model.checkpoint import CheckpointError
    from ospfn.train.state import latest_checkpoint, load_train_state

    dev = _device(device)
    check_launch(cfg, 1)
    parts = build_parts(cfg)
    ckpt = None
    if resume is not None:
        src = Path(out_dir) if resume == "latest" else Path(resume)
        try:
            if latest_checkpoint(src) is None and not (src / "state.pt").exists():
                raise TrainError(f"--resume: no checkpoint found in {src}")
            ckpt = load_train_state(src)
        except CheckpointError as e:
            raise TrainError(f"--resume: {e}") from None
        _check_resume_config(ckpt["state"].get("config"), cfg, ckpt["path"])
    train_dit = dit_trained(cfg)
    if ckpt is not None and train_dit:
        dit_w, text_w = split_params(ckpt["params"])
    else:  # the checkpoints of a run with a frozen DiT hold the trained parts only: the frozen base comes from the config
        dit_w, text_w = _initial_weights(cfg, parts)
    dit_w = {k: v.to(dev) for k, v in dit_w.items()}
    text_w = {k: v.to(dev) for k, v in text_w.items()}
    adapter = _initial_adapter(cfg, parts, ckpt)
    ctx_w = _initial_context_adapter(cfg, parts, ckpt)
    model = DiT(parts.dit_cfg, dit_w, lora=None if adapter is None else adapter.to(dev))  # parameters share the tensors' storage
    text = TextModule(text_w, parts.text_cfg)
    text.requires_grad_(cfg.text.train)
    ctx = None if ctx_w is None else ContextAdapter({k: v.to(dev) for k, v in ctx_w.items()}, parts.adapter_cfg)
    if adapter is not None:  # only the adapter trains (and is checkpointed, EMA'd and exported)
        model.freeze_base()
        named = {f"{LORA_PREFIX}{k}": v for k, v in model.named_lora_parameters()}
    elif train_dit:
        named = {**{f"dit.{k}": v for k, v in model.named_parameters()}, **{f"text.{k}": v for k, v in text.params().items()}}
    else:  # model.train: false -- the DiT is frozen and neither checkpointed nor EMA'd
        model.requires_grad_(False)
        named = {}
    if ctx is not None and cfg.adapter.train:  # the VLM adapter of a qwen_vl run trains unless adapter.train is false
        named.update({f"{CTX_PREFIX}{k}": v for k, v in ctx.named_parameters()})
    elif ctx is not None:
        ctx.requires_grad_(False)
    trainer = Trainer(cfg, parts, named, model=model, text=text, device=dev, ctx=ctx)
    if ckpt is not None:
        trainer.load(ckpt)
        trainer.resumed_from = ckpt["path"]
    return trainer


def fsdp_trainer(cfg, out_dir, resume=None, *, device=None) -> Trainer:
    """torch.distributed (already initialised, or by ``init_parallel``): FSDP2 over all ranks, the config's
    sequence parallelism inside each data-parallel replica.  ``device``: None (from the launch), "cpu" or
    "cuda" (rank r uses cuda:LOCAL_RANK).  Collective."""
    from torch.distributed.device_mesh import init_device_mesh

    from ospfn.nn import DiT
    from ospfn.parallel import ParallelConfig, agree, init_parallel
    from ospfn.train.distributed import ContextAdapter, FSDPTrainer, TextModule, TrainModules, latest_dcp, shard
    from ospfn.train.sft import dit_trained

    if device is not None:
        dev_type = _device(device)
        if dev_type.index is not None:
            raise TrainError(f"device: under torchrun give a device type (cpu or cuda; each rank uses cuda:LOCAL_RANK), got {device!r}")
        device = dev_type.type
    try:
        st = init_parallel(ParallelConfig(skiparse_sp=cfg.parallel.skiparse_sp, ulysses_sp=cfg.parallel.ulysses_sp), device=device)
    except ValueError as e:
        raise TrainError(f"parallel: {e}") from e
    # what only some ranks may see (a data index, model.checkpoint or resume source missing on one node) is
    # checked on every rank and agreed on: the same TrainError everywhere, before the run's first collective
    problem, src = "", None
    try:
        parts = build_parts(cfg)
        dit_w, text_w = _initial_weights(cfg, parts)
        ctx_w = _initial_context_adapter(cfg, parts)  # a resumed run reads the adapter's values from the checkpoint
        if resume is not None:
            src = latest_dcp(out_dir) if resume == "latest" else Path(resume)
            if src is None or not src.exists():
                raise TrainError(f"--resume: no checkpoint found in {out_dir if resume == 'latest' else resume}")
    except (ValueError, OSError) as e:  # TrainError, CheckpointError (model.checkpoint), a file that vanished
        problem = str(e) or type(e).__name__
    agree(not problem, problem, error=TrainError)
    dev = st.device
    adapter = _initial_adapter(cfg, parts)  # a resumed adapter run reads the adapter's values from the checkpoint
    ctx = None if ctx_w is None else ContextAdapter({k: v.to(dev) for k, v in ctx_w.items()}, parts.adapter_cfg)
    modules = TrainModules(DiT(parts.dit_cfg, {k: v.to(dev) for k, v in dit_w.items()}, lora=None if adapter is None else adapter.to(dev)),
                           TextModule({k: v.to(dev) for k, v in text_w.items()}, parts.text_cfg), ctx=ctx)  # fmt: skip
    if adapter is not None:
        modules.dit.freeze_base()
    elif not dit_trained(cfg):
        modules.dit.requires_grad_(False)
    if not cfg.text.train:
        modules.text.requires_grad_(False)
    if ctx is not None and not cfg.adapter.train:
        ctx.requires_grad_(False)
    shard(modules, init_device_mesh(dev.type, (st.world,)))
    trainer = FSDPTrainer(cfg, parts, modules, st)  # compiles the blocks (train.compile) after fully_shard
    if resume is not None:
        extra = trainer.load(src)
        _check_resume_config(extra.get("config"), cfg, src)
        trainer.resumed_from = src
    return trainer
