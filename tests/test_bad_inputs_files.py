"""Corrupt, foreign and inconsistent files: every one raises ``CheckpointError`` naming the file and what is
wrong, never ``struct.error`` / ``JSONDecodeError`` / ``KeyError`` / a shape error / an unwrapped pickle error;
pickled code is never executed; killed writers' temporaries are swept; every checkpoint file gets the same
permissions.

The table ``CASES`` holds one row per bad input: a builder that writes the bad file(s) under ``tmp_path`` and
returns (the call to make, the path the message must name), the exception type, and a regex the message must
match.  The builders start from small valid files (a tiny DiT) made once per module and copied per case.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import re
import shutil
import stat
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import ospfn.model as M
from ospfn._fs import pid_alive, write_text_atomic
from ospfn.model.checkpoint import (
    CheckpointError,
    CheckpointMissingError,
    load_checkpoint,
    load_config,
    read_safetensors,
    save_checkpoint,
    torch_load,
)
from ospfn.model.text import TinyTextConfig, init_tiny_text_params
from ospfn.pipeline import BUNDLED, load_pipeline, save_pipeline
from ospfn.train.state import latest_checkpoint, load_train_state, save_train_state, sweep_stale_temporaries

CFG = M.DiTConfig.preset("tiny", dim=32, ffn_dim=64, num_heads=2, num_layers=2, num_full_blocks=0, text_dim=16, freq_dim=16)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Valid files to corrupt: params, a safetensors file, a .pt, a DCP dir, a training checkpoint, a pipeline."""
    import torch.distributed.checkpoint as dcp

    root = tmp_path_factory.mktemp("base")
    g = torch.Generator().manual_seed(0)
    params = {k: torch.randn(v.shape, generator=g) for k, v in M.init_params(CFG).items()}
    save_file(params, root / "model.safetensors")
    torch.save(params, root / "model.pt")
    dcp.save({k: v.clone() for k, v in params.items()}, checkpoint_id=str(root / "dcp"), no_dist=True)
    save_train_state(root / "run", 4, params={"w": torch.ones(3)}, ema={"w": torch.ones(3)}, state={"data_pos": 8})
    return {"root": root, "params": params}


def _st(path: Path, header, data: bytes = b"") -> Path:
    """A safetensors file with the given header (a dict, or raw bytes) and data section."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def _evil(marker: Path):
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    return Evil()


def _cut(path: Path, keep: float = 0.5) -> Path:
    b = path.read_bytes()
    path.write_bytes(b[: int(len(b) * keep)])
    return path


# -------------------------------------------------------------------------------------------------------
# builders: (tmp_path, base) -> (call, path the message must name)


def st_file(header, data=b""):
    def build(tmp, b):
        p = _st(tmp / "bad.safetensors", header, data)
        return lambda: load_checkpoint(p, CFG), p

    return build


def st_raw(raw: bytes):
    def build(tmp, b):
        p = tmp / "bad.safetensors"
        p.write_bytes(raw)
        return lambda: load_checkpoint(p, CFG), p

    return build


def st_truncated(tmp, b):
    p = tmp / "m.safetensors"
    shutil.copy(b["root"] / "model.safetensors", p)
    _cut(p)
    return lambda: load_checkpoint(p, CFG), p


def st_duplicate_across_shards(tmp, b):
    keys = sorted(b["params"])
    save_file({k: b["params"][k] for k in keys[: len(keys) // 2 + 1]}, tmp / "a.safetensors")
    save_file({k: b["params"][k] for k in keys[len(keys) // 2 :]}, tmp / "b.safetensors")
    return lambda: load_checkpoint(tmp, CFG), tmp / "b.safetensors"


def index(text: str, shards=()):
    def build(tmp, b):
        for s in shards:
            shutil.copy(b["root"] / "model.safetensors", tmp / s)
        p = tmp / "m.safetensors.index.json"
        p.write_text(text)
        return lambda: load_checkpoint(p, CFG), p

    return build


def index_missing_shard(tmp, b):
    p = tmp / "m.safetensors.index.json"
    p.write_text(json.dumps({"weight_map": {"head.head.weight": "m-00001-of-00002.safetensors"}}))
    return lambda: load_checkpoint(p, CFG), tmp / "m-00001-of-00002.safetensors"


def pt_bytes(raw: bytes):
    def build(tmp, b):
        p = tmp / "bad.pt"
        p.write_bytes(raw)
        return lambda: load_checkpoint(p, CFG), p

    return build


def pt_obj(obj, legacy=False):
    def build(tmp, b):
        p = tmp / "bad.pt"
        torch.save(obj, p, _use_new_zipfile_serialization=not legacy)
        return lambda: load_checkpoint(p, CFG), p

    return build


def pt_truncated(tmp, b):
    p = tmp / "model.pt"
    shutil.copy(b["root"] / "model.pt", p)
    _cut(p)
    return lambda: load_checkpoint(p, CFG), p


def pt_evil(legacy: bool):
    def build(tmp, b):
        p = tmp / "evil.pt"
        torch.save({"model": {"x": _evil(tmp / "pwned")}}, p, _use_new_zipfile_serialization=not legacy)
        return lambda: load_checkpoint(p, CFG), p

    return build


def dcp_case(mutate):
    def build(tmp, b):
        d = tmp / "dcp"
        shutil.copytree(b["root"] / "dcp", d)
        named = mutate(d)
        return lambda: load_checkpoint(d, CFG), named

    return build


def _dcp_garble(d: Path) -> Path:
    f = d / "__0_0.distcp"
    f.write_bytes(b"\x00" * f.stat().st_size)
    return f


def _dcp_evil_metadata(d: Path) -> Path:
    with open(d / ".metadata", "wb") as f:
        pickle.dump(_evil(d / "pwned"), f)
    return d / ".metadata"


def config_json(text: str):
    def build(tmp, b):
        p = tmp / "config.json"
        p.write_bytes(text.encode("latin-1"))
        return lambda: load_config(tmp), p

    return build


def run_case(mutate):
    def build(tmp, b):
        run = tmp / "run"
        shutil.copytree(b["root"] / "run", run)
        named = mutate(run, run / "ckpt-00000004")
        return lambda: load_train_state(run), named

    return build


def _write(p: Path, data) -> Path:
    p.write_bytes(data) if isinstance(data, bytes) else p.write_text(data)
    return p


def pipe_case(mutate):
    """The bundled pipeline copied, then ``mutate(dir)`` -> the file the message must name."""

    def build(tmp, b):
        d = tmp / "pipe"
        shutil.copytree(BUNDLED, d)
        named = mutate(d)
        return lambda: load_pipeline(d), named

    return build


def _pipe_meta(**changes):
    def mutate(d: Path) -> Path:
        meta = json.loads((d / "pipeline.json").read_text())
        for key, value in changes.items():
            node, *path = key.split("__")
            target = meta
            for k in [node, *path][:-1]:
                target = target[k]
            if value is _DROP:
                del target[[node, *path][-1]]
            else:
                target[[node, *path][-1]] = value
        (d / "pipeline.json").write_text(json.dumps(meta))
        return d / "pipeline.json"

    return mutate


_DROP = object()


def _pipe_text_weights(d: Path) -> Path:
    w = load_file(d / "text_encoder.safetensors")
    w["qkv.weight"] = w["qkv.weight"][:, :-1].contiguous()
    del w["mlp.2.bias"]
    save_file(w, d / "text_encoder.safetensors")
    return d / "text_encoder.safetensors"


def _pipe_config(**changes):
    def mutate(d: Path) -> Path:
        c = json.loads((d / "config.json").read_text())
        c.update(changes)
        (d / "config.json").write_text(json.dumps(c))
        return d / "config.json"

    return mutate


def call(fn, named=None):
    return lambda tmp, b: (fn, named)


def save_pipeline_call(**changes):
    def build(tmp, b):
        tcfg = TinyTextConfig(text_dim=16, text_len=8, vocab=64, heads=2)
        kw = dict(cfg=dataclasses.replace(CFG, in_dim=12, out_dim=12), params={k: torch.zeros(v) for k, v in M.param_shapes(dataclasses.replace(CFG, in_dim=12, out_dim=12)).items()},
                  text_params=init_tiny_text_params(tcfg), text_cfg=tcfg, vae={"kind": "pixel", "spatial": 2})  # fmt: skip
        kw.update(changes)
        return (lambda: save_pipeline(tmp / "out", **kw)), None

    return build


H = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}  # a well-formed entry
CE, CME = CheckpointError, CheckpointMissingError

CASES = [
    # --- safetensors ----------------------------------------------------------------------------------
    ("st-empty", st_raw(b""), CE, r"not a safetensors file: 0 bytes, shorter than the 8-byte header length"),
    ("st-4-bytes", st_raw(b"abcd"), CE, r"not a safetensors file: 4 bytes"),
    ("st-header-past-end", st_raw(struct.pack("<Q", 1000) + b"{}"), CE, r"header length 1000 does not fit the file of 10 bytes"),
    ("st-header-implausible", st_raw(struct.pack("<Q", 2**40) + b"{}"), CE, r"implausible safetensors header of \d+ bytes"),
    ("st-header-not-json", st_file(b"hello"), CE, r"safetensors header is not valid JSON \(JSONDecodeError"),
    ("st-header-not-utf8", st_file(b"\xff\xfe{}"), CE, r"safetensors header is not valid JSON \(UnicodeDecodeError"),
    ("st-header-list", st_file([1, 2]), CE, r"safetensors header must be a JSON object, got list"),
    ("st-entry-not-object", st_file({"x": 3}), CE, r"tensor 'x': entry must be an object with dtype, shape and data_offsets"),
    ("st-no-dtype", st_file({"x": {"shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8), CE, r"tensor 'x': entry lacks \['dtype'\]"),
    ("st-unknown-dtype", st_file({"x": {**H, "dtype": "F99"}}, b"\0" * 8), CE, r"tensor 'x' has unsupported dtype 'F99'; supported: \[.*'F32'"),
    ("st-no-shape", st_file({"x": {"dtype": "F32", "data_offsets": [0, 8]}}, b"\0" * 8), CE, r"tensor 'x': entry lacks \['shape'\]"),
    ("st-negative-shape", st_file({"x": {**H, "shape": [-2]}}, b"\0" * 8), CE, r"tensor 'x': shape must be a list of non-negative ints, got \[-2\]"),
    ("st-no-offsets", st_file({"x": {"dtype": "F32", "shape": [2]}}, b"\0" * 8), CE, r"tensor 'x': entry lacks \['data_offsets'\]"),
    ("st-offsets-reversed", st_file({"x": {**H, "data_offsets": [8, 0]}}, b"\0" * 8), CE, r"data_offsets must be \[start, end\] with 0 <= start <= end, got \[8, 0\]"),
    ("st-offsets-vs-shape", st_file({"head.head.bias": {**H, "shape": [1, 2, 64]}}, b"\0" * 8), CE,
     r"tensor 'head.head.bias': data_offsets \[0, 8\] hold 8 bytes but shape \[1, 2, 64\] x F32 needs 512"),
    ("st-offsets-past-end", st_file({"x": {**H, "shape": [128], "data_offsets": [0, 512]}}, b"\0" * 8), CE,
     r"data_offsets \[0, 512\] run past the end of the data \(8 bytes\): the file is truncated"),
    ("st-overlap", st_file({"a": {**H, "shape": [4], "data_offsets": [0, 16]}, "b": {**H, "data_offsets": [8, 16]}}, b"\0" * 16), CE,
     r"tensors 'a' and 'b' overlap in the data section"),
    ("st-truncated", st_truncated, CE, r"run past the end of the data .*: the file is truncated"),
    ("st-duplicate-across-shards", st_duplicate_across_shards, CE, r"tensor '.*' is in both .*a\.safetensors and .*b\.safetensors"),
    # --- sharded index --------------------------------------------------------------------------------
    ("index-not-json", index("{not json"), CE, r"safetensors index is not valid JSON \(JSONDecodeError"),
    ("index-list", index("[1]"), CE, r"safetensors index must be a JSON object, got list"),
    ("index-no-weight-map", index("{}"), CE, r"safetensors index needs a non-empty 'weight_map' object \(tensor name -> shard file\), got None"),
    ("index-weight-map-list", index('{"weight_map": ["a"]}'), CE, r"needs a non-empty 'weight_map' object .*got \['a'\]"),
    ("index-missing-shard", index_missing_shard, CME, r"shards listed in .*index\.json are missing: \[.*m-00001-of-00002\.safetensors"),
    ("index-shard-outside", index('{"weight_map": {"x": "../m.safetensors"}}'), CE, r"weight_map values must be shard file names inside .*, got '\.\./m\.safetensors'"),
    # --- torch .pt ------------------------------------------------------------------------------------
    ("pt-empty", pt_bytes(b""), CE, r"empty file \(0 bytes\), not a torch checkpoint"),
    ("pt-truncated-zip", pt_truncated, CE, r"a truncated or corrupt zip archive \(RuntimeError"),
    ("pt-garbage", pt_bytes(b"garbage!!"), CE, r"not a torch checkpoint readable with weights_only=True \(UnpicklingError: Unsupported operand"),
    ("pt-raw-pickle", pt_bytes(pickle.dumps({"a": 1}, protocol=2)[:-3]), CE, r"not a torch checkpoint"),
    ("pt-evil-zip", pt_evil(legacy=False), CE, r"refused to unpickle \(.*GLOBAL posix\.system.*\): .*weights_only=True, which never runs pickled code"),
    ("pt-evil-legacy", pt_evil(legacy=True), CE, r"refused to unpickle \(.*GLOBAL posix\.system"),
    ("pt-not-a-dict", pt_obj([torch.zeros(2)]), CE, r"expected a state dict, got list"),
    ("pt-int-keys", pt_obj({0: torch.zeros(2)}), CE, r"state dict keys must be str, got \['int'\]"),
    ("pt-legacy-not-a-dict", pt_obj(torch.zeros(2), legacy=True), CE, r"expected a state dict, got Tensor"),
    # --- DCP ------------------------------------------------------------------------------------------
    ("dcp-truncated-shard", dcp_case(lambda d: _cut(d / "__0_0.distcp")), CE, r"__0_0\.distcp: truncated DCP shard: '.*' needs bytes \d+\.\.\d+, the file has \d+"),
    ("dcp-garbled-shard", dcp_case(_dcp_garble), CE, r"__0_0\.distcp: corrupt DCP shard: cannot read '.*' at bytes"),
    ("dcp-missing-shard", dcp_case(lambda d: (d / "__0_0.distcp").unlink() or d / "__0_0.distcp"), CME, r"__0_0\.distcp: DCP shard named in .*\.metadata is missing"),
    ("dcp-no-metadata", dcp_case(lambda d: (d / ".metadata").unlink() or d), CME, r"holds DCP shards \(\*\.distcp\) but no \.metadata"),
    ("dcp-truncated-metadata", dcp_case(lambda d: _cut(d / ".metadata")), CE, r"\.metadata: not readable DCP metadata \("),
    ("dcp-foreign-metadata", dcp_case(lambda d: _write(d / ".metadata", pickle.dumps({"a": 1}))), CE, r"\.metadata: not DCP metadata \(got dict\)"),
    ("dcp-evil-metadata", dcp_case(_dcp_evil_metadata), CE, r"\.metadata: not readable DCP metadata \(UnpicklingError: global posix\.system is not allowed"),
    # --- config.json ----------------------------------------------------------------------------------
    ("config-not-json", config_json("{nope"), CE, r"config\.json: config\.json is not valid JSON \(JSONDecodeError"),
    ("config-not-utf8", config_json("\xff\xfe"), CE, r"config\.json is not valid JSON \(UnicodeDecodeError"),
    ("config-list", config_json("[1]"), CE, r"config\.json must be a JSON object, got list"),
    ("config-bad-value", config_json('{"dim": "x"}'), CE, r"config\.json: not a valid DiT config: .*dim must be a positive int, got 'x'"),
    # --- training checkpoints -------------------------------------------------------------------------
    ("state-truncated-state-pt", run_case(lambda r, c: _cut(c / "state.pt")), CE, r"state\.pt: a truncated or corrupt zip archive"),
    ("state-empty-state-pt", run_case(lambda r, c: _write(c / "state.pt", b"")), CE, r"state\.pt: empty file \(0 bytes\)"),
    ("state-evil-state-pt", run_case(lambda r, c: torch.save({"step": 1, "x": _evil(r / "pwned")}, c / "state.pt") or c / "state.pt"), CE,
     r"state\.pt: refused to unpickle"),
    ("state-not-a-dict", run_case(lambda r, c: torch.save([1], c / "state.pt") or c / "state.pt"), CE, r"state\.pt: expected a dict of training state, got list"),
    ("state-bad-step", run_case(lambda r, c: torch.save({"step": "4"}, c / "state.pt") or c / "state.pt"), CE, r"state\.pt: 'step' must be an int >= 0, got '4'"),
    ("state-empty-model", run_case(lambda r, c: _write(c / "model.safetensors", b"")), CE, r"model\.safetensors: not a safetensors file: 0 bytes"),
    ("state-truncated-ema", run_case(lambda r, c: _cut(c / "ema.safetensors", 0.9)), CE, r"ema\.safetensors: tensor 'w': data_offsets .* run past the end"),
    ("state-missing-model", run_case(lambda r, c: (c / "model.safetensors").unlink() or c), CME, r"lacks \['model\.safetensors'\]: an incomplete or foreign checkpoint"),
    ("state-latest-missing-dir", run_case(lambda r, c: _write(r / "latest", "ckpt-00000099\n")), CME,
     r"latest names ckpt-00000099, which is not a directory in .*\(checkpoints there: \['ckpt-00000004'\]\)"),
    ("state-latest-not-a-name", run_case(lambda r, c: _write(r / "latest", "../../etc\n")), CE, r"latest must hold the name of a ckpt-<step> directory in .*, got '\.\./\.\./etc'"),
    ("state-latest-empty", run_case(lambda r, c: _write(r / "latest", "")), CE, r"latest must hold the name of a ckpt-<step> directory .*, got ''"),
    ("state-latest-binary", run_case(lambda r, c: _write(r / "latest", b"\xff\x00")), CE, r"latest must hold the name .*, got binary data"),
    ("state-path-is-a-file", lambda tmp, b: (lambda: load_train_state(b["root"] / "model.pt"), b["root"] / "model.pt"), CE,
     r"is a file; expected a checkpoint directory"),
    ("state-incomplete-dir", lambda tmp, b: (_write(tmp / "model.safetensors", b""), (lambda: load_train_state(tmp), tmp))[1], CME,
     r"has model\.safetensors but no state\.pt: an incomplete checkpoint"),
    # --- pipeline directories -------------------------------------------------------------------------
    ("pipe-json-not-json", pipe_case(lambda d: _write(d / "pipeline.json", "{")), CE, r"pipeline\.json: pipeline\.json is not valid JSON"),
    ("pipe-json-list", pipe_case(lambda d: _write(d / "pipeline.json", "[]")), CE, r"pipeline\.json must be a JSON object, got list"),
    ("pipe-unknown-key", pipe_case(_pipe_meta(extra=1)), CE, r"unknown key\(s\) \['extra'\] in .*pipeline\.json; allowed: defaults, info, text_encoder, vae"),
    ("pipe-no-vae", pipe_case(_pipe_meta(vae=_DROP)), CE, r"pipeline\.json lacks \['vae'\]"),
    ("pipe-text-kind", pipe_case(_pipe_meta(text_encoder__kind="umt5")), CE, r"unknown text_encoder kind 'umt5' in .*pipeline\.json \(supported: 'tiny'\)"),
    ("pipe-text-not-object", pipe_case(_pipe_meta(text_encoder="tiny")), CE, r"pipeline\.json: text_encoder must be an object such as \{'kind': 'tiny', \.\.\.\}, got str"),
    ("pipe-text-bad-field", pipe_case(_pipe_meta(text_encoder__heads=0)), CE, r"pipeline\.json: text_encoder: TinyTextConfig: heads must be a positive int, got 0"),
    ("pipe-text-unknown-field", pipe_case(_pipe_meta(text_encoder__layers=2)), CE, r"pipeline\.json: text_encoder: .*unexpected keyword argument 'layers'"),
    ("pipe-vae-kind", pipe_case(_pipe_meta(vae__kind="wan")), CE, r"pipeline\.json: pipeline: unknown vae kind 'wan' \(supported: 'pixel'"),
    ("pipe-vae-spatial", pipe_case(_pipe_meta(vae__spatial="2")), CE, r"pipeline\.json: pipeline: vae\.spatial must be an int in \[1, 64\], got '2'"),
    ("pipe-vae-unknown-key", pipe_case(_pipe_meta(vae__scale=1)), CE, r"unknown key\(s\) \['scale'\] in vae"),
    ("pipe-defaults-unknown", pipe_case(_pipe_meta(defaults__cfg=2)), CE, r"pipeline\.json: unknown key\(s\) \['cfg'\] in defaults; allowed: \["),
    ("pipe-defaults-steps-0", pipe_case(_pipe_meta(defaults__steps=0)), CE, r"pipeline\.json: defaults\.steps must be an int in \[1, 1000000\], got 0"),
    ("pipe-defaults-guidance-nan", pipe_case(_pipe_meta(defaults__guidance=float("nan"))), CE, r"defaults\.guidance must be a finite number >= 0, got nan"),
    ("pipe-defaults-size", pipe_case(_pipe_meta(defaults__size=[32])), CE, r"defaults\.size must be \[H, W\], positive ints, got \[32\]"),
    ("pipe-info-not-object", pipe_case(_pipe_meta(info=[1])), CE, r"pipeline\.json: info must be an object, got list"),
    ("pipe-config-not-json", pipe_case(lambda d: _write(d / "config.json", "{")), CE, r"config\.json: config\.json is not valid JSON"),
    ("pipe-missing-text-file", pipe_case(lambda d: (d / "text_encoder.safetensors").unlink() or d), CME,
     r"lacks \['text_encoder\.safetensors'\]: an incomplete pipeline directory"),
    ("pipe-text-weights-mismatch", pipe_case(_pipe_text_weights), CE,
     r"text_encoder\.safetensors: text encoder weights do not match .*missing 1: \['mlp\.2\.bias'\]; mis-shaped 1: \['qkv\.weight: \(192, 63\) vs \(192, 64\)'\]"),
    ("pipe-text-dim-mismatch", pipe_case(_pipe_config(text_dim=32)), CE, r"gives text_dim 64, .*config\.json expects 32"),
    ("pipe-vae-channels-mismatch", pipe_case(_pipe_meta(vae__spatial=4)), CE, r"has 48 latent channels, .*config\.json has in_dim 12, out_dim 12"),
    ("pipe-truncated-dit", pipe_case(lambda d: _cut(d / "diffusion_pytorch_model.safetensors", 0.7)), CE,
     r"diffusion_pytorch_model\.safetensors: tensor '.*': data_offsets .* run past the end"),
    ("pipe-not-a-dir", lambda tmp, b: (lambda: load_pipeline(tmp / "nope"), tmp / "nope"), FileNotFoundError, r"is not a pipeline directory \(no pipeline\.json\)"),
    # --- arguments of the file functions ---------------------------------------------------------------
    ("load-checkpoint-path-int", call(lambda: load_checkpoint(3, CFG)), TypeError, r"load_checkpoint: path must be a str or os\.PathLike, got int"),
    ("load-checkpoint-dtype-int", lambda tmp, b: (lambda: load_checkpoint(b["root"] / "model.safetensors", CFG, dtype=torch.int8), None), TypeError,
     r"load_checkpoint: dtype must be a floating torch\.dtype or None, got torch\.int8"),
    ("load-checkpoint-cfg-dict", lambda tmp, b: (lambda: load_checkpoint(b["root"] / "model.safetensors", {"dim": 32}), None), TypeError,
     r"load_checkpoint: cfg must be a DiTConfig or None, got dict"),
    ("load-checkpoint-dir-as-file", lambda tmp, b: ((tmp / "x.safetensors").mkdir(), (lambda: load_checkpoint(tmp / "x.safetensors", CFG), tmp / "x.safetensors"))[1],
     FileNotFoundError, r"holds no \*\.safetensors, index json, single \.pt/\.pth or DCP checkpoint"),
    ("load-pipeline-dtype", call(lambda: load_pipeline(BUNDLED, dtype="bf16")), TypeError, r"load_pipeline: dtype must be a floating torch\.dtype or None, got 'bf16'"),
    ("read-safetensors-missing", lambda tmp, b: (lambda: read_safetensors(tmp / "no.safetensors"), tmp / "no.safetensors"), CME, r"read_safetensors: no such file"),
    ("torch-load-missing", lambda tmp, b: (lambda: torch_load(tmp / "no.pt"), tmp / "no.pt"), CME, r"torch_load: no such file"),
    ("save-train-state-keep-0", lambda tmp, b: (lambda: save_train_state(tmp, 1, params={}, keep=0), None), ValueError,
     r"save_train_state: keep must be an int >= 1 .*got 0"),
    ("save-train-state-step-negative", lambda tmp, b: (lambda: save_train_state(tmp, -1, params={}), None), ValueError,
     r"save_train_state: step must be an int >= 0, got -1"),
    ("save-train-state-params-list", lambda tmp, b: (lambda: save_train_state(tmp, 1, params=[torch.ones(1)]), None), TypeError,
     r"save_train_state: params must be a dict, got list"),
    ("save-pipeline-vae", save_pipeline_call(vae={"kind": "wan"}), ValueError, r"pipeline: unknown vae kind 'wan'"),
    ("save-pipeline-defaults", save_pipeline_call(defaults={"steps": 0}), ValueError, r"save_pipeline: defaults\.steps must be an int in \[1, 1000000\], got 0"),
    ("save-pipeline-params", save_pipeline_call(params={}), ValueError, r"save_pipeline: params do not match cfg: missing \["),
    ("save-pipeline-text-params", save_pipeline_call(text_params={"tok_emb": torch.zeros(2, 2)}), ValueError, r"save_pipeline: text_params: text encoder weights do not match"),
    ("save-pipeline-vae-channels", save_pipeline_call(vae={"kind": "pixel", "spatial": 1}), ValueError, r"save_pipeline: the vae .* has 3 latent channels; cfg has in_dim 12"),
    ("save-pipeline-cfg", save_pipeline_call(cfg={"dim": 1}), TypeError, r"save_pipeline: cfg must be a DiTConfig, got dict"),
]  # fmt: skip


@pytest.mark.parametrize("build,exc,pattern", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_file(tmp_path, base, build, exc, pattern):
    fn, named = build(tmp_path, base)
    with pytest.raises(exc, match=pattern) as e:
        fn()
    if named is not None:
        assert str(named) in str(e.value), f"the message does not name {named}: {e.value}"
    assert not list(tmp_path.rglob("pwned")), "pickled code ran"
    assert not (tmp_path / "out").exists(), "save_pipeline wrote files for a bad input"


def test_table_has_enough_distinct_cases():
    assert len(CASES) >= 25 and len({c[0] for c in CASES}) == len(CASES)


def test_missing_file_errors_are_also_file_not_found(tmp_path):
    (tmp_path / "m.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "gone.safetensors"}}))
    with pytest.raises(FileNotFoundError, match="gone.safetensors"):
        load_checkpoint(tmp_path / "m.safetensors.index.json", CFG)


# -------------------------------------------------------------------------------------------------------
# valid but unusual files


def test_legacy_torch_save_file_loads(tmp_path, base):
    params = base["params"]
    torch.save({"model": params}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    got = load_checkpoint(tmp_path / "legacy.pt", CFG)
    assert set(got) == set(params) and all(torch.equal(got[k], params[k]) for k in params)


def test_dcp_nested_state_dict_and_non_tensor_entries(tmp_path, base):
    """{"model": sd, "step": 3} saved with DCP loads like the same dict in a .pt; a pickled non-tensor entry is
    skipped, never unpickled (the old loader, DCP's dcp_to_torch_save, ran it)."""
    import torch.distributed.checkpoint as dcp

    params = base["params"]
    dcp.save({"model": {k: v.clone() for k, v in params.items()}, "step": 3, "obj": _evil(tmp_path / "pwned")},
             checkpoint_id=str(tmp_path / "dcp"), no_dist=True)  # fmt: skip
    got = load_checkpoint(tmp_path / "dcp", CFG, dtype=torch.bfloat16)
    assert set(got) == set(params) and all(torch.equal(got[k], params[k].bfloat16()) for k in params)
    assert not (tmp_path / "pwned").exists()


def test_read_safetensors_matches_safetensors(base):
    want = load_file(base["root"] / "model.safetensors")
    got = read_safetensors(base["root"] / "model.safetensors")
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) and got[k].dtype == want[k].dtype for k in want)


def test_text_weight_shapes_match_the_encoder():
    """load_pipeline's shape table for the tiny text encoder is the one init_tiny_text_params builds."""
    from ospfn.pipeline import _check_text_weights

    for tcfg in (TinyTextConfig(), TinyTextConfig(text_dim=48, text_len=5, vocab=77, heads=3)):
        _check_text_weights(init_tiny_text_params(tcfg), tcfg, "here")


def test_pipeline_round_trip_through_save_pipeline(tmp_path):
    tcfg = TinyTextConfig(text_dim=16, text_len=8, vocab=64, heads=2)
    cfg = dataclasses.replace(CFG, in_dim=12, out_dim=12)
    params = {k: torch.zeros(v) for k, v in M.param_shapes(cfg).items()}
    save_pipeline(tmp_path / "p", cfg=cfg, params=params, text_params=init_tiny_text_params(tcfg), text_cfg=tcfg,
                  vae={"kind": "pixel", "spatial": 2}, defaults={"steps": 4})  # fmt: skip
    pipe = load_pipeline(tmp_path / "p")
    assert pipe.cfg == cfg and pipe.defaults["steps"] == 4 and pipe.vae.latent_channels == 12


# -------------------------------------------------------------------------------------------------------
# latest pointer, stale temporaries, permissions


def test_latest_checkpoint(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    for s in (3, 12):
        (tmp_path / f"ckpt-{s:08d}").mkdir()
    (tmp_path / "ckpt-notes").mkdir()  # not a checkpoint name
    assert latest_checkpoint(tmp_path).name == "ckpt-00000012"  # no 'latest': the newest
    write_text_atomic(tmp_path / "latest", "ckpt-00000003\n")
    assert latest_checkpoint(tmp_path).name == "ckpt-00000003"  # 'latest' wins


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    assert not pid_alive(p.pid)
    return p.pid


def test_sweep_removes_only_dead_writers_temporaries(tmp_path):
    dead = _dead_pid()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = [tmp_path / f".ckpt-00000005.tmp-{dead}", tmp_path / f".ckpt-00000004.old-{dead}"]
        kept = [tmp_path / f".ckpt-00000006.tmp-{os.getpid()}", tmp_path / f".ckpt-00000007.tmp-{live.pid}", tmp_path / "ckpt-00000004",
                tmp_path / ".ckpt-00000008.tmp"]  # fmt: skip
        for d in stale + kept:
            d.mkdir()
            (d / "model.safetensors").write_bytes(b"x" * 10)
        stale_files = [tmp_path / f".latest.tmp-{dead}.abcd1234.tmp", tmp_path / "final" / f".pipeline.json.tmp-{dead}.zz_9y8x7.tmp"]
        kept_files = [tmp_path / f".latest.tmp-{live.pid}.abcd1234.tmp", tmp_path / "log.jsonl", tmp_path / f".notes.tmp-{dead}"]
        for f in stale_files + kept_files:
            f.parent.mkdir(exist_ok=True)
            f.write_text("x")
        removed = sweep_stale_temporaries(tmp_path)
        assert removed == sorted(stale + stale_files)
        assert not any(p.exists() for p in stale + stale_files)
        assert all(p.exists() for p in kept + kept_files)
        assert sweep_stale_temporaries(tmp_path) == []
        assert sweep_stale_temporaries(tmp_path / "missing") == []
    finally:
        live.kill()
        live.wait()


def test_save_train_state_sweeps_and_resaves(tmp_path):
    dead = _dead_pid()
    (tmp_path / f".ckpt-00000001.tmp-{dead}").mkdir(parents=True)
    save_train_state(tmp_path, 2, params={"w": torch.ones(2)})
    assert not (tmp_path / f".ckpt-00000001.tmp-{dead}").exists()
    final = save_train_state(tmp_path, 2, params={"w": torch.full((2,), 3.0)})  # the same step again replaces it
    assert torch.equal(load_train_state(tmp_path)["params"]["w"], torch.full((2,), 3.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == [final.name, "latest"]


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_every_checkpoint_file_gets_the_same_permissions(tmp_path, umask):
    tcfg = TinyTextConfig(text_dim=16, text_len=8, vocab=64, heads=2)
    cfg = dataclasses.replace(CFG, in_dim=12, out_dim=12)
    params = {k: torch.zeros(v) for k, v in M.param_shapes(cfg).items()}
    old = os.umask(umask)
    try:
        save_train_state(tmp_path / "run", 1, params={"w": torch.ones(2)}, ema={"w": torch.ones(2)}, state={"a": 1})
        save_checkpoint(params, tmp_path / "one.safetensors")
        save_checkpoint(params, tmp_path / "sharded", cfg=cfg, max_shard_bytes=20_000)
        save_pipeline(tmp_path / "pipe", cfg=cfg, params=params, text_params=init_tiny_text_params(tcfg), text_cfg=tcfg,
                      vae={"kind": "pixel", "spatial": 2})  # fmt: skip
    finally:
        os.umask(old)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert {"model.safetensors", "ema.safetensors", "state.pt", "latest", "one.safetensors", "config.json", "pipeline.json",
            "text_encoder.safetensors", "diffusion_pytorch_model.safetensors.index.json"} <= names  # fmt: skip
    modes = {str(p.relative_to(tmp_path)): oct(stat.S_IMODE(p.stat().st_mode)) for p in files}
    assert set(modes.values()) == {oct(0o666 & ~umask)}, modes
    assert not [p for p in tmp_path.rglob("*") if re.search(r"\.tmp", p.name)]
