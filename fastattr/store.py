"""Per-round attribution records on disk: one compressed .npz per round under <run-dir>/attribution/.

No pickle anywhere (np.load(..., allow_pickle=False)); float arrays are stored as float32 to keep hundreds of rounds
small. Keys are free-form 1-D/2-D numeric arrays, e.g. obs, actions, rewards, dones, values, logp, adv_gae,
returns_mc, score_return, score_action.
"""
from __future__ import annotations

import json
import os
import re
import zipfile
from pathlib import Path

import numpy as np

FORMAT_VERSION = 1
_NAME = re.compile(r"round_(\d{5})\.npz$")


def round_path(run_dir: str | os.PathLike, k: int) -> Path:
    return Path(run_dir) / "attribution" / f"round_{k:05d}.npz"


def save_round(run_dir: str | os.PathLike, k: int, **arrays) -> Path:
    """Writes round k atomically (temp file + rename), so a crash never leaves a half-written round."""
    path = round_path(run_dir, k)
    path.parent.mkdir(parents=True, exist_ok=True)
    out = {"format_version": np.array(FORMAT_VERSION)}
    for key, value in arrays.items():
        a = np.asarray(value.detach().cpu().numpy() if hasattr(value, "detach") else value)
        if a.dtype == object:
            raise TypeError(f"save_round: array {key!r} has dtype object; only numeric arrays are stored")
        out[key] = a.astype(np.float32) if a.dtype == np.float64 else a
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, **out)
    os.replace(tmp, path)
    return path


def saved_rounds(run_dir: str | os.PathLike) -> list[int]:
    d = Path(run_dir) / "attribution"
    return sorted(int(m.group(1)) for p in d.glob("round_*.npz") if (m := _NAME.search(p.name))) if d.is_dir() else []


def load_round(run_dir: str | os.PathLike, k: int, keys: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
    """Round k's arrays (only `keys`, those of them it has, when given). Missing round: FileNotFoundError; damaged
    file or another format: ValueError naming the file and the fix."""
    path = round_path(run_dir, k)
    if not path.exists():
        have = saved_rounds(run_dir)
        raise FileNotFoundError(
            f"round {k} was not saved in {run_dir} (saved rounds: {have[:10]}{'...' if len(have) > 10 else ''}); "
            "train with --save-attribution to store every round"
        )
    try:
        with np.load(path, allow_pickle=False) as f:
            data = {key: f[key] for key in f.files if keys is None or key in keys or key == "format_version"}
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as e:  # cut or overwritten: np.load raises several kinds
        raise ValueError(f"{path} is damaged ({type(e).__name__}: {e}); delete it (the tools then skip round {k}) or "
                         "train the run again with --save-attribution") from None
    version = int(data.pop("format_version", -1))
    if version != FORMAT_VERSION:
        raise ValueError(f"{path} has attribution format {version}, this fastattr reads format {FORMAT_VERSION}")
    return data


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Every JSON object in a .jsonl file ([] when it does not exist); a cut last line (a run still writing) is
    skipped, a bad line anywhere else is a ValueError naming the file and the line."""
    out = []
    p = Path(path)
    if not p.exists():
        return out
    lines = p.read_text(errors="replace").splitlines()
    for i, line in enumerate(lines):
        line = line.strip()
        if not line:
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if i != len(lines) - 1:
                raise ValueError(f"{p}: line {i + 1} is not valid JSON") from None
    return out


def append_jsonl(path: str | os.PathLike, rec: dict) -> None:
    """Appends one JSON line and syncs it to disk."""
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")
        f.flush()
        os.fsync(f.fileno())
